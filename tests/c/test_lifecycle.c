/*
 * Code lifecycle through the C ABI: memory the host frees, reprotects,
 * rewrites or reserves under probes. Each case in its own process.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#include "harness.h"
#include "probert.h"

/* mov eax, 1; add eax, edi; ret */
static const unsigned char CODE[] = {0xB8, 0x01, 0x00, 0x00, 0x00, 0x01, 0xF8, 0xC3};
#define PAGE 4096

static uint64_t hits;
static probert_action count(probert_hit *hit) {
  (void)hit;
  __atomic_fetch_add(&hits, 1, __ATOMIC_RELAXED);
  return PROBERT_CONTINUE;
}

static unsigned char *jit_page(int prot) {
  unsigned char *p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(p != MAP_FAILED);
  memcpy(p, CODE, sizeof CODE);
  CHECK(mprotect(p, PAGE, prot) == 0);
  return p;
}

static int call(const unsigned char *f, int x) {
  int (*fn)(int);
  memcpy(&fn, &f, sizeof fn);
  return fn(x);
}

static probert_region add(unsigned char *p, size_t len) {
  probert_region_desc d = {p, len, "jit", NULL, NULL};
  probert_region r = 0;
  CHECK_OK(probert_region_add(&d, &r));
  return r;
}

static void t_remove_after_munmap(void) {
  unsigned char *p = jit_page(PROT_READ | PROT_EXEC);
  probert_region r = add(p, PAGE);
  probert_consumer c;
  CHECK_OK(probert_attach(p, count, NULL, &c));
  CHECK_EQ(call(p, 1), 2);
  CHECK(munmap(p, PAGE) == 0);
  CHECK_OK(probert_region_remove(r));
  CHECK_STATUS(probert_detach(c), PROBERT_ERR_NOT_FOUND);
}

static void t_remove_gone_writes_nothing(void) {
  unsigned char *p = jit_page(PROT_READ | PROT_EXEC);
  probert_region r = add(p, PAGE);
  probert_consumer c;
  CHECK_OK(probert_attach(p, count, NULL, &c));
  /* The host reuses the memory for other code. */
  static const unsigned char other[] = {0xB8, 0x07, 0x00, 0x00, 0x00, 0xC3};
  CHECK(mprotect(p, PAGE, PROT_READ | PROT_WRITE) == 0);
  memcpy(p, other, sizeof other);
  CHECK(mprotect(p, PAGE, PROT_READ | PROT_EXEC) == 0);
  CHECK_OK(probert_region_remove_gone(r));
  CHECK(memcmp(p, other, sizeof other) == 0);
  CHECK_EQ(call(p, 0), 7);
  CHECK_STATUS(probert_region_remove_gone(r), PROBERT_ERR_NOT_FOUND);
}

static void t_prot_none_detach(void) {
  unsigned char *p = jit_page(PROT_READ | PROT_EXEC);
  (void)add(p, PAGE);
  probert_consumer c;
  CHECK_OK(probert_attach(p, count, NULL, &c));
  CHECK(mprotect(p, PAGE, PROT_NONE) == 0);
  CHECK_OK(probert_detach(c));
  CHECK(mprotect(p, PAGE, PROT_READ | PROT_EXEC) == 0);
  CHECK(memcmp(p, CODE, sizeof CODE) == 0);
}

static void t_region_add_rules(void) {
  unsigned char *arena = mmap(NULL, 16 * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(arena != MAP_FAILED);
  probert_region_desc huge = {arena, (size_t)64 << 40, "huge", NULL, NULL};
  probert_region r = 0;
  CHECK_STATUS(probert_region_add(&huge, &r), PROBERT_ERR_INVALID_ARGUMENT);
  /* A reserved arena: attaching in its uncommitted part fails cleanly. */
  r = add(arena, 16 * PAGE);
  probert_consumer c;
  CHECK_STATUS(probert_attach(arena, count, NULL, &c), PROBERT_ERR_PROTECT);
  CHECK(mprotect(arena, PAGE, PROT_READ | PROT_WRITE) == 0);
  memcpy(arena, CODE, sizeof CODE);
  /* Still read-write: refused, nothing written. */
  CHECK_STATUS(probert_attach(arena, count, NULL, &c), PROBERT_ERR_PROTECT);
  CHECK(memcmp(arena, CODE, sizeof CODE) == 0);
  CHECK_OK(probert_region_remove(r));
  /* Unless the host asks. */
  probert_region_desc d = {arena, 16 * PAGE, "rw", NULL, NULL};
  probert_region_opts bad = {sizeof bad, 0x80};
  CHECK_STATUS(probert_region_add_ex(&d, &bad, &r), PROBERT_ERR_INVALID_ARGUMENT);
  probert_region_opts opts = {sizeof opts, PROBERT_REGION_ANY_PROTECTION};
  CHECK_OK(probert_region_add_ex(&d, &opts, &r));
  CHECK_OK(probert_attach(arena, count, NULL, &c));
  CHECK(arena[0] != CODE[0]);
  CHECK_OK(probert_detach(c));
  CHECK(memcmp(arena, CODE, sizeof CODE) == 0);
  CHECK_OK(probert_region_remove(r));
}

static void t_code_write(void) {
  unsigned char *p = jit_page(PROT_READ | PROT_EXEC);
  probert_region r = add(p, PAGE);
  probert_consumer c;
  hits = 0;
  CHECK_OK(probert_attach(p + 5, count, NULL, &c));
  static const unsigned char imm[] = {0x05, 0x00, 0x00, 0x00};
  size_t retired = 99;
  CHECK_OK(probert_code_write(p + 1, imm, sizeof imm, &retired));
  CHECK_EQ(retired, 0);
  CHECK_EQ(call(p, 1), 6);
  CHECK_EQ(hits, 1);
  /* mov rax, 5 (10 bytes) over the probed add: the probe is retired. */
  static const unsigned char longer[] = {0x48, 0xB8, 5, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xF8, 0xC3};
  CHECK_OK(probert_code_write(p, longer, sizeof longer, &retired));
  CHECK_EQ(retired, 1);
  CHECK(memcmp(p, longer, sizeof longer) == 0);
  probert_mode mode;
  CHECK_STATUS(probert_probe_mode(p + 5, &mode), PROBERT_ERR_CODE_CHANGED);
  CHECK_EQ(call(p, 1), 6);
  CHECK_EQ(hits, 1);
  CHECK_OK(probert_detach(c));
  CHECK_STATUS(probert_code_write(p, NULL, 1, NULL), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_OK(probert_region_remove(r));
}

#define T(name) {#name, t_##name}
static const struct test_case TESTS[] = {
    T(remove_after_munmap), T(remove_gone_writes_nothing), T(prot_none_detach),
    T(region_add_rules),    T(code_write),
};

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  return run_tests(TESTS, sizeof TESTS / sizeof TESTS[0], argc, argv);
}
