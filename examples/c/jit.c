/*
 * jit: probes on code generated at run time.
 *
 * Emits f(x) = x * x + 1 into fresh memory, registers it with
 * probert_region_add, probes its entry and an instruction in the middle,
 * runs it, then probert_region_remove (which detaches everything inside)
 * before the memory is unmapped.
 *
 * From the repository root:
 *   cargo build --release -p probert-ffi
 *   cc -std=c11 -O2 -Iinclude examples/c/jit.c -Ltarget/release -lprobert -lpthread -ldl -o jit
 *   LD_LIBRARY_PATH=target/release ./jit
 */
#define _DEFAULT_SOURCE /* MAP_ANONYMOUS */

#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include "probert.h"

/* x86-64 machine code of f(x) = x * x + 1 (System V: x in rdi, result in rax) */
static const unsigned char CODE[] = {
    0x48, 0x89, 0xf8,       /* 0: mov  rax, rdi */
    0x48, 0x0f, 0xaf, 0xc7, /* 3: imul rax, rdi */
    0x48, 0x83, 0xc0, 0x01, /* 7: add  rax, 1   <- probed: rax holds x * x */
    0xc3,                   /* b: ret           */
};
#define ADD_OFFSET 7

/* Handlers may run in signal context: atomics only. */
static atomic_ulong entries, last_arg, last_square, last_rip;

static probert_action on_entry(probert_hit *hit) {
  atomic_fetch_add(&entries, 1);
  atomic_store(&last_arg, probert_regs_arg(hit->regs, 0));
  return PROBERT_CONTINUE;
}

static probert_action on_add(probert_hit *hit) {
  atomic_store(&last_square, probert_regs_get(hit->regs, PROBERT_REG_RAX));
  atomic_store(&last_rip, probert_regs_get(hit->regs, PROBERT_REG_RIP));
  return PROBERT_CONTINUE;
}

static int fail(const char *what, probert_status s) {
  fprintf(stderr, "%s: %s\n", what, probert_status_str(s));
  return 1;
}

int main(void) {
  /* Emit the code: write it while the page is RW, then make it RX. */
  size_t len = 4096;
  unsigned char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) {
    perror("mmap");
    return 1;
  }
  memcpy(mem, CODE, sizeof CODE);
  if (mprotect(mem, len, PROT_READ | PROT_EXEC) != 0) {
    perror("mprotect");
    return 1;
  }
  long (*f)(long) = (long (*)(long))(uintptr_t)mem;

  /* Register the region: probert may now probe inside it. Its start is
     taken as a function start, so misaligned addresses are refused. */
  probert_region_desc desc = {mem, len, "square-plus-one", NULL, NULL};
  probert_region region;
  probert_status s = probert_region_add(&desc, &region);
  if (s != PROBERT_OK) {
    return fail("probert_region_add", s);
  }

  probert_attach_req reqs[2] = {
      {mem, on_entry, NULL},
      {mem + ADD_OFFSET, on_add, NULL},
  };
  probert_consumer probes[2];
  size_t bad;
  s = probert_attach_batch(reqs, 2, probes, &bad);
  if (s != PROBERT_OK) {
    fprintf(stderr, "request %zu: ", bad);
    return fail("probert_attach_batch", s);
  }
  /* One byte into the imul: inside an instruction. */
  probert_consumer nope;
  s = probert_attach(mem + 4, on_add, NULL, &nope);
  printf("attach inside an instruction: %s\n", probert_status_str(s));

  long r = f(7);
  printf("f(7) = %ld; entry probe saw x = %lu; mid probe saw rax = %lu at %#lx (code at %p)\n", r,
         (unsigned long)atomic_load(&last_arg), (unsigned long)atomic_load(&last_square),
         (unsigned long)atomic_load(&last_rip), (void *)mem);
  int ok = r == 50 && atomic_load(&last_arg) == 7 && atomic_load(&last_square) == 49 &&
           atomic_load(&last_rip) == (uintptr_t)(mem + ADD_OFFSET) &&
           s == PROBERT_ERR_MISALIGNED;

  /* Before freeing the memory: remove the region. It detaches both probes
     (waiting for running handlers) and restores the code. */
  s = probert_region_remove(region);
  if (s != PROBERT_OK) {
    return fail("probert_region_remove", s);
  }
  ok &= memcmp(mem, CODE, sizeof CODE) == 0;
  ok &= probert_detach(probes[0]) == PROBERT_ERR_NOT_FOUND; /* already detached */
  f(8);
  ok &= atomic_load(&entries) == 1;
  munmap(mem, len);
  printf("region removed, code restored byte for byte: %s\n", ok ? "yes" : "NO");
  return ok ? 0 : 1;
}
