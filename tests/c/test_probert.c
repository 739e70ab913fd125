/*
 * The C test suite of libprobert: every function and every status code of
 * API.md, through the C ABI only. Built with -std=c11 -Wall -Wextra
 * -Wpedantic -Werror against libprobert.so and libprobert.a, and once more
 * under AddressSanitizer (tests/c/Makefile). Each case runs in a process of
 * its own (harness.h).
 *
 * Probe targets: C functions of this program (PROBED), functions written in
 * assembly below (their bytes are known, so boundaries and foreign int3s are
 * exact), and JIT code mapped at run time.
 */
#define _GNU_SOURCE /* memfd_create, MAP_ANONYMOUS, MAP_NORESERVE */

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>

#include "harness.h"
#include "probert.h"

/* ---- probe targets --------------------------------------------------- */

/* Functions probes go on: never inlined, cloned or analysed across calls,
   so every call runs the function's own first instruction. */
#if defined(__clang__)
#define PROBED __attribute__((noinline, used))
#else
#define PROBED __attribute__((noinline, noipa, used))
#endif

/* The address of a function as probert takes it (ISO C has no conversion
   between function and object pointers; through uintptr_t is exact here). */
#define FN_ADDR(f) ((const void *)(uintptr_t)(f))

PROBED long target_add(long a, long b) { return a + b; }
PROBED long target_six(long a, long b, long c, long d, long e, long f) {
  return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f;
}
PROBED long target_rec(long x) { return x + 1; }
PROBED long target_block(long x) { return x * 3; }
PROBED long target_other(long x) { return x - 1; }

/* Calls through volatile pointers: the compiler cannot drop or fold them. */
static long (*volatile call_add)(long, long) = target_add;
static long (*volatile call_six)(long, long, long, long, long, long) = target_six;
static long (*volatile call_rec)(long) = target_rec;
static long (*volatile call_block)(long) = target_block;
static long (*volatile call_other)(long) = target_other;

/* Assembly targets with known bytes:
   asm_inc:       48 8d 47 01   lea rax, [rdi + 1]
                  c3            ret
   asm_int3:      cc            int3 (a foreign breakpoint)  ; c3 ret
   asm_invalid:   06            (invalid in 64-bit mode)     ; c3 ret
   asm_raise_trap: cc c3        executes a foreign int3 and returns
   asm_countdown: 48 89 f8      mov rax, rdi
               1: 48 83 e8 01   sub rax, 1       <- the loop's branch lands here
                  7f fa         jg 1b
                  c3            ret              (returns 0 for x >= 1) */
/* asm_nop5: 0f 1f 44 00 00  nop5 (a patchable site: fast-path capable);
              48 8d 47 02     lea rax, [rdi + 2]; c3 ret */
__asm__(".text\n"
        ".p2align 4\n"
        ".globl asm_nop5\n"
        ".type asm_nop5, @function\n"
        "asm_nop5:\n"
        "  .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
        "  leaq 2(%rdi), %rax\n"
        "  ret\n"
        ".size asm_nop5, .-asm_nop5\n");
long asm_nop5(long x);

__asm__(".text\n"
        ".p2align 4\n"
        ".globl asm_inc\n"
        ".type asm_inc, @function\n"
        "asm_inc:\n"
        "  leaq 1(%rdi), %rax\n"
        "  ret\n"
        ".size asm_inc, .-asm_inc\n"
        ".p2align 4\n"
        ".globl asm_int3\n"
        ".type asm_int3, @function\n"
        "asm_int3:\n"
        "  int3\n"
        "  ret\n"
        ".size asm_int3, .-asm_int3\n"
        ".p2align 4\n"
        ".globl asm_invalid\n"
        ".type asm_invalid, @function\n"
        "asm_invalid:\n"
        "  .byte 0x06\n"
        "  ret\n"
        ".size asm_invalid, .-asm_invalid\n"
        ".p2align 4\n"
        ".globl asm_raise_trap\n"
        ".type asm_raise_trap, @function\n"
        "asm_raise_trap:\n"
        "  int3\n"
        "  ret\n"
        ".size asm_raise_trap, .-asm_raise_trap\n"
        ".p2align 4\n"
        ".globl asm_countdown\n"
        ".type asm_countdown, @function\n"
        "asm_countdown:\n"
        "  movq %rdi, %rax\n"
        "1:\n"
        "  subq $1, %rax\n"
        "  jg 1b\n"
        "  ret\n"
        ".size asm_countdown, .-asm_countdown\n");
long asm_inc(long x);
void asm_int3(void);
void asm_invalid(void);
void asm_raise_trap(void);
long asm_countdown(long x);
static long (*volatile call_countdown)(long) = asm_countdown;
static long (*volatile call_inc)(long) = asm_inc;
static void (*volatile call_raise_trap)(void) = asm_raise_trap;

/* JIT code: f(x) = (x + 1) * 3, position-independent.
   Instruction starts: 0, 1, 4, 8, 12, 13. */
static const unsigned char JIT_CODE[] = {
    0x55,                   /* 0:  push rbp          */
    0x48, 0x89, 0xe5,       /* 1:  mov rbp, rsp      */
    0x48, 0x8d, 0x47, 0x01, /* 4:  lea rax, [rdi+1] */
    0x48, 0x6b, 0xc0, 0x03, /* 8:  imul rax, rax, 3  */
    0x5d,                   /* 12: pop rbp           */
    0xc3,                   /* 13: ret               */
};
static const size_t JIT_STARTS[] = {0, 1, 4, 8, 12, 13};
#define JIT_N_INSNS (sizeof JIT_STARTS / sizeof JIT_STARTS[0])
#define PAGE 4096
typedef long (*jit_fn)(long);

/* One page, RW while filled, then RX. */
static unsigned char *map_code(const unsigned char *code, size_t len) {
  unsigned char *p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(p != MAP_FAILED);
  memcpy(p, code, len);
  CHECK(mprotect(p, PAGE, PROT_READ | PROT_EXEC) == 0);
  return p;
}

static jit_fn as_fn(const void *p) { return (jit_fn)(uintptr_t)p; }

/* ---- handlers (async-signal-safe: atomics only) ---------------------- */

/* Counts hits in the atomic_ulong its user data points at. */
static probert_action count_hit(probert_hit *hit) {
  atomic_ulong *c = hit->user_data;
  atomic_fetch_add(c, 1);
  return PROBERT_CONTINUE;
}

/* Counts its calls in a global (for consumers detached at once). */
static atomic_ulong short_lived_calls;
static probert_action short_lived(probert_hit *hit) {
  (void)hit;
  atomic_fetch_add(&short_lived_calls, 1);
  return PROBERT_CONTINUE;
}

static size_t code_snapshot(const void *addr, unsigned char *buf, size_t n) {
  memcpy(buf, addr, n);
  return n;
}

static int mapping_is_wx(void) {
  FILE *f = fopen("/proc/self/maps", "r");
  CHECK(f != NULL);
  char line[512];
  int wx = 0;
  while (fgets(line, sizeof line, f)) {
    char perms[8] = {0};
    if (sscanf(line, "%*s %7s", perms) == 1 && perms[1] == 'w' && perms[2] == 'x') {
      fprintf(stderr, "writable and executable: %s", line);
      wx = 1;
    }
  }
  fclose(f);
  return wx;
}

/* The permissions of the mapping holding addr, e.g. "r-xs". */
static void mapping_perms(const void *addr, char perms[8]) {
  FILE *f = fopen("/proc/self/maps", "r");
  CHECK(f != NULL);
  char line[512];
  perms[0] = 0;
  while (fgets(line, sizeof line, f)) {
    unsigned long lo, hi;
    char p[8] = {0};
    if (sscanf(line, "%lx-%lx %7s", &lo, &hi, p) == 3 && lo <= (uintptr_t)addr &&
        (uintptr_t)addr < hi) {
      memcpy(perms, p, 8);
    }
  }
  fclose(f);
}

static void sleep_ms(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

/* ---- the library ----------------------------------------------------- */

/* probert_status_str is total; probert_version; probert_init idempotent. */
static void t_status_version_init(void) {
  static const probert_status all[] = {
      PROBERT_OK,           PROBERT_ERR_INVALID_ARGUMENT, PROBERT_ERR_NO_REGION,
      PROBERT_ERR_REGION_OVERLAP, PROBERT_ERR_UNSUPPORTED_INSN, PROBERT_ERR_NOT_FOUND,
      PROBERT_ERR_CONFLICT, PROBERT_ERR_PROTECT,        PROBERT_ERR_NO_MEMORY,
      PROBERT_ERR_SIGNAL,   PROBERT_ERR_MISALIGNED,     PROBERT_ERR_CODE_CHANGED,
      PROBERT_ERR_INTERNAL,
  };
  static const int values[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 255};
  const char *unknown = probert_status_str((probert_status)12);
  CHECK(unknown != NULL && strlen(unknown) > 0);
  for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
    CHECK_EQ(all[i], values[i]);
    const char *s = probert_status_str(all[i]);
    CHECK(s != NULL && strlen(s) > 0);
    CHECK(strcmp(s, unknown) != 0);
    for (size_t j = 0; j < i; j++) {
      CHECK(strcmp(s, probert_status_str(all[j])) != 0);
    }
  }
  /* Every other integer: the "unknown" text, never NULL, never a crash. */
  static const long others[] = {12, 13, 100, 254, 256, 1000, -1, -255, 0x7fffffff, -0x7fffffff - 1};
  for (size_t i = 0; i < sizeof others / sizeof others[0]; i++) {
    const char *s = probert_status_str((probert_status)others[i]);
    CHECK(s != NULL && strcmp(s, unknown) == 0);
  }
  for (long v = -300; v < 300; v++) {
    CHECK(probert_status_str((probert_status)v) != NULL);
  }
  const char *v = probert_version();
  CHECK(v != NULL);
  unsigned major, minor, patch;
  CHECK(sscanf(v, "%u.%u.%u", &major, &minor, &patch) == 3);
  CHECK(probert_version() == v || strcmp(probert_version(), v) == 0);
  CHECK_OK(probert_init());
  CHECK_OK(probert_init());
}

/* ---- quickstart path: attach, count, read, detach --------------------- */

static void t_attach_count_detach(void) {
  static atomic_ulong hits;
  unsigned char before[16], during[16], after[16];
  code_snapshot(FN_ADDR(target_add), before, sizeof before);
  probert_consumer c = 0;
  CHECK_OK(probert_attach(FN_ADDR(target_add), count_hit, &hits, &c));
  CHECK(c != 0);
  code_snapshot(FN_ADDR(target_add), during, sizeof during);
  CHECK_EQ(during[0], 0xCC);
  CHECK(memcmp(before + 1, during + 1, sizeof before - 1) == 0);
  probert_mode mode = (probert_mode)77;
  CHECK_OK(probert_probe_mode(FN_ADDR(target_add), &mode));
  CHECK_EQ(mode, PROBERT_MODE_TRAP);
  long sum = 0;
  for (long i = 0; i < 100; i++) {
    sum += call_add(i, 1);
  }
  CHECK_EQ(sum, 5050);
  CHECK_EQ(atomic_load(&hits), 100);
  probert_consumer_stats st = {0, 0, 0, 0};
  CHECK_OK(probert_consumer_get_stats(c, &st));
  CHECK_EQ(st.hits, 100);
  CHECK_EQ(st.missed, 0);
  CHECK_OK(probert_detach(c));
  code_snapshot(FN_ADDR(target_add), after, sizeof after);
  CHECK(memcmp(before, after, sizeof before) == 0);
  CHECK_EQ(call_add(2, 3), 5);
  CHECK_EQ(atomic_load(&hits), 100);
  CHECK_STATUS(probert_probe_mode(FN_ADDR(target_add), &mode), PROBERT_ERR_NOT_FOUND);
}

/* ---- registers --------------------------------------------------------- */

static _Atomic uint64_t seen_args[6], seen_rip, seen_addr, seen_rsp, seen_bad_get, seen_arg6;
static atomic_int seen_set_bad, seen_set_ok, seen_null_get, seen_null_set, seen_user_ok;
static int regs_cookie;

static probert_action regs_handler(probert_hit *hit) {
  for (unsigned i = 0; i < 6; i++) {
    atomic_store(&seen_args[i], probert_regs_arg(hit->regs, i));
  }
  atomic_store(&seen_arg6, probert_regs_arg(hit->regs, 6) + 1);
  atomic_store(&seen_rip, probert_regs_get(hit->regs, PROBERT_REG_RIP));
  atomic_store(&seen_rsp, probert_regs_get(hit->regs, PROBERT_REG_RSP));
  atomic_store(&seen_addr, hit->addr);
  atomic_store(&seen_user_ok, hit->user_data == &regs_cookie);
  /* An out-of-range register: 0 on get, an error on set. */
  atomic_store(&seen_bad_get, probert_regs_get(hit->regs, (probert_reg)18) + 1);
  atomic_store(&seen_set_bad, probert_regs_set(hit->regs, (probert_reg)18, 1));
  atomic_store(&seen_set_bad, atomic_load(&seen_set_bad) * 1000 +
                                  probert_regs_set(hit->regs, (probert_reg)-1, 1));
  atomic_store(&seen_null_get, probert_regs_get(NULL, PROBERT_REG_RAX) == 0 &&
                                   probert_regs_arg(NULL, 0) == 0);
  atomic_store(&seen_null_set, probert_regs_set(NULL, PROBERT_REG_RAX, 1));
  /* Rewrite the fifth argument (r8) and the first (rdi). */
  probert_status s1 = probert_regs_set(hit->regs, PROBERT_REG_R8, 1000);
  probert_status s2 = probert_regs_set(hit->regs, PROBERT_REG_RDI,
                                       probert_regs_get(hit->regs, PROBERT_REG_RDI) + 10);
  atomic_store(&seen_set_ok, s1 == PROBERT_OK && s2 == PROBERT_OK);
  return PROBERT_CONTINUE;
}

static void t_regs_get_set_arg(void) {
  probert_consumer c;
  CHECK_OK(probert_attach(FN_ADDR(target_six), regs_handler, &regs_cookie, &c));
  long r = call_six(1, 2, 3, 4, 5, 6);
  for (unsigned i = 0; i < 6; i++) {
    CHECK_EQ(atomic_load(&seen_args[i]), i + 1);
  }
  CHECK_EQ(atomic_load(&seen_arg6), 1); /* n > 5 reads 0 */
  CHECK_EQ(atomic_load(&seen_rip), (uintptr_t)FN_ADDR(target_six));
  CHECK_EQ(atomic_load(&seen_addr), (uintptr_t)FN_ADDR(target_six));
  CHECK(atomic_load(&seen_rsp) != 0);
  CHECK(atomic_load(&seen_user_ok));
  CHECK_EQ(atomic_load(&seen_bad_get), 1);
  CHECK_EQ(atomic_load(&seen_set_bad),
           PROBERT_ERR_INVALID_ARGUMENT * 1000 + PROBERT_ERR_INVALID_ARGUMENT);
  CHECK(atomic_load(&seen_null_get));
  CHECK_EQ(atomic_load(&seen_null_set), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK(atomic_load(&seen_set_ok));
  /* (1 + 10) + 2*2 + 3*3 + 4*4 + 5*1000 + 6*6: the writes took effect. */
  CHECK_EQ(r, 11 + 4 + 9 + 16 + 5000 + 36);
  CHECK_OK(probert_detach(c));
  CHECK_EQ(call_six(1, 2, 3, 4, 5, 6), 1 + 4 + 9 + 16 + 25 + 36);
}

/* ---- handler rules: what a handler may not call ------------------------ */

enum { IN_ATTACH, IN_ATTACH_EX, IN_BATCH, IN_BATCH_IDX, IN_DETACH, IN_NOSYNC, IN_DETACH_BATCH,
       IN_SYNC, IN_INIT, IN_STATS, IN_MODE, IN_REGION_ADD, IN_REGION_REMOVE, IN_STR, IN_N };
static atomic_int in_handler_result[IN_N];
static probert_consumer in_handler_self;

static probert_action calls_from_handler(probert_hit *hit) {
  (void)hit;
  probert_consumer c = 0;
  probert_attach_req req = {FN_ADDR(target_other), count_hit, NULL};
  size_t idx = 99;
  probert_consumer_stats st;
  probert_mode m;
  probert_region r;
  probert_region_desc d = {FN_ADDR(target_other), 16, NULL, NULL, NULL};
  atomic_store(&in_handler_result[IN_ATTACH], probert_attach(FN_ADDR(target_other), count_hit, NULL, &c));
  atomic_store(&in_handler_result[IN_ATTACH_EX],
               probert_attach_ex(FN_ADDR(target_other), count_hit, NULL, NULL, &c));
  atomic_store(&in_handler_result[IN_BATCH], probert_attach_batch(&req, 1, &c, &idx));
  atomic_store(&in_handler_result[IN_BATCH_IDX], (int)idx);
  atomic_store(&in_handler_result[IN_DETACH], probert_detach(in_handler_self));
  atomic_store(&in_handler_result[IN_NOSYNC], probert_detach_nosync(in_handler_self));
  atomic_store(&in_handler_result[IN_DETACH_BATCH], probert_detach_batch(&in_handler_self, 1));
  atomic_store(&in_handler_result[IN_SYNC], probert_sync());
  atomic_store(&in_handler_result[IN_INIT], probert_init());
  atomic_store(&in_handler_result[IN_STATS], probert_consumer_get_stats(in_handler_self, &st));
  atomic_store(&in_handler_result[IN_MODE], probert_probe_mode(FN_ADDR(target_add), &m));
  atomic_store(&in_handler_result[IN_REGION_ADD], probert_region_add(&d, &r));
  atomic_store(&in_handler_result[IN_REGION_REMOVE], probert_region_remove(1));
  atomic_store(&in_handler_result[IN_STR],
               probert_status_str(PROBERT_OK) != NULL && probert_version() != NULL);
  return PROBERT_CONTINUE;
}

static void t_handler_may_not_call(void) {
  CHECK_OK(probert_attach(FN_ADDR(target_add), calls_from_handler, NULL, &in_handler_self));
  CHECK_EQ(call_add(1, 1), 2);
  for (int i = 0; i < IN_N; i++) {
    if (i == IN_BATCH_IDX) {
      CHECK_EQ(atomic_load(&in_handler_result[i]), 1); /* n: no single request */
    } else if (i == IN_STR) {
      CHECK_EQ(atomic_load(&in_handler_result[i]), 1);
    } else {
      if (atomic_load(&in_handler_result[i]) != PROBERT_ERR_INVALID_ARGUMENT) {
        fprintf(stderr, "call %d from a handler returned %d\n", i, atomic_load(&in_handler_result[i]));
      }
      CHECK_EQ(atomic_load(&in_handler_result[i]), PROBERT_ERR_INVALID_ARGUMENT);
    }
  }
  /* Nothing happened: still attached, nothing else attached. */
  probert_consumer_stats st;
  CHECK_OK(probert_consumer_get_stats(in_handler_self, &st));
  CHECK_EQ(st.hits, 1);
  probert_mode m;
  CHECK_STATUS(probert_probe_mode(FN_ADDR(target_other), &m), PROBERT_ERR_NOT_FOUND);
  CHECK_OK(probert_detach(in_handler_self));
}

/* ---- the bad-input matrix --------------------------------------------- */

#define SENTINEL 0x5e5e5e5e5e5e5e5eULL

static void t_bad_input_matrix(void) {
  static atomic_ulong hits;
  probert_consumer c = SENTINEL;
  const void *f = FN_ADDR(target_add);

  /* probert_attach / probert_attach_ex: NULLs. */
  CHECK_STATUS(probert_attach(NULL, count_hit, &hits, &c), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(probert_attach(f, NULL, &hits, &c), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(probert_attach(f, count_hit, &hits, NULL), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(probert_attach_ex(NULL, count_hit, &hits, NULL, &c), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(probert_attach_ex(f, NULL, &hits, NULL, &c), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(probert_attach_ex(f, count_hit, &hits, NULL, NULL), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_EQ(c, SENTINEL);

  /* probert_attach_ex: bad options. */
  probert_attach_opts o = {sizeof o, (probert_mode)3, NULL};
  CHECK_STATUS(probert_attach_ex(f, count_hit, &hits, &o, &c), PROBERT_ERR_INVALID_ARGUMENT);
  o.mode = (probert_mode)-1;
  CHECK_STATUS(probert_attach_ex(f, count_hit, &hits, &o, &c), PROBERT_ERR_INVALID_ARGUMENT);
  o.mode = (probert_mode)0x7fffffff;
  CHECK_STATUS(probert_attach_ex(f, count_hit, &hits, &o, &c), PROBERT_ERR_INVALID_ARGUMENT);
  o.mode = PROBERT_MODE_TRAP;
  o.size = 0;
  CHECK_STATUS(probert_attach_ex(f, count_hit, &hits, &o, &c), PROBERT_ERR_INVALID_ARGUMENT);
  o.size = sizeof o - 1;
  CHECK_STATUS(probert_attach_ex(f, count_hit, &hits, &o, &c), PROBERT_ERR_INVALID_ARGUMENT);
  o.size = 12; /* cuts the 0.1 struct */
  CHECK_STATUS(probert_attach_ex(f, count_hit, &hits, &o, &c), PROBERT_ERR_INVALID_ARGUMENT);
  o.size = 1u << 20;
  CHECK_STATUS(probert_attach_ex(f, count_hit, &hits, &o, &c), PROBERT_ERR_INVALID_ARGUMENT);
  struct {
    probert_attach_opts base;
    uint64_t future;
  } grown = {{sizeof grown, PROBERT_MODE_TRAP, NULL}, 1};
  CHECK_STATUS(probert_attach_ex(f, count_hit, &hits, &grown.base, &c), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_EQ(c, SENTINEL);
  /* A grown struct whose unknown tail is zero is fine. */
  grown.future = 0;
  CHECK_OK(probert_attach_ex(f, count_hit, &hits, &grown.base, &c));
  CHECK_OK(probert_detach(c));
  /* So is the 0.1 header's struct (size and mode): the fields past it are
     read as zero, whatever follows in memory. */
  struct {
    size_t size;
    probert_mode mode;
    void (*garbage)(void);
  } v01 = {16, PROBERT_MODE_TRAP, (void (*)(void))1};
  CHECK_OK(probert_attach_ex(f, count_hit, &hits, (const probert_attach_opts *)(void *)&v01, &c));
  probert_mode seen;
  CHECK_OK(probert_probe_mode(f, &seen));
  CHECK_EQ(seen, PROBERT_MODE_TRAP);
  CHECK_OK(probert_detach(c));
  /* A 0.1 program's 16-byte statistics: the classic entry point writes no
     more than that. */
  CHECK_OK(probert_attach(f, count_hit, &hits, &c));
  struct {
    uint64_t hits, missed;
    uint64_t guard[2];
  } old = {7, 7, {SENTINEL, SENTINEL}};
  CHECK_OK((probert_consumer_get_stats)(c, (probert_consumer_stats *)(void *)&old));
  CHECK_EQ(old.hits, 0);
  CHECK_EQ(old.guard[0], SENTINEL);
  CHECK_EQ(old.guard[1], SENTINEL);
  CHECK_OK(probert_detach(c));

  /* Addresses: in no region, inside an instruction, a foreign int3,
     an undecodable instruction, probert's own code. */
  c = SENTINEL;
  int on_stack = 0;
  unsigned char *anon = mmap(NULL, PAGE, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(anon != MAP_FAILED);
  CHECK_STATUS(probert_attach(&on_stack, count_hit, &hits, &c), PROBERT_ERR_NO_REGION);
  CHECK_STATUS(probert_attach(anon, count_hit, &hits, &c), PROBERT_ERR_NO_REGION);
  CHECK_STATUS(probert_attach((const char *)FN_ADDR(asm_inc) + 1, count_hit, &hits, &c),
               PROBERT_ERR_MISALIGNED);
  CHECK_STATUS(probert_attach((const char *)FN_ADDR(asm_inc) + 3, count_hit, &hits, &c),
               PROBERT_ERR_MISALIGNED);
  CHECK_STATUS(probert_attach(FN_ADDR(asm_int3), count_hit, &hits, &c), PROBERT_ERR_CONFLICT);
  CHECK_STATUS(probert_attach(FN_ADDR(asm_invalid), count_hit, &hits, &c),
               PROBERT_ERR_UNSUPPORTED_INSN);
  CHECK_STATUS(probert_attach(FN_ADDR(probert_attach), count_hit, &hits, &c),
               PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(probert_attach(FN_ADDR(probert_regs_get), count_hit, &hits, &c),
               PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_EQ(c, SENTINEL);
  /* The aligned neighbour works: the errors changed nothing. */
  CHECK_OK(probert_attach((const char *)FN_ADDR(asm_inc) + 4, count_hit, &hits, &c));
  CHECK_EQ(call_inc(1), 2);
  CHECK_EQ(atomic_load(&hits), 1);
  CHECK_OK(probert_detach(c));
  munmap(anon, PAGE);

  /* Handles: 0, invented, NULL out-parameters. */
  probert_consumer_stats st = {SENTINEL, SENTINEL, SENTINEL, SENTINEL};
  static const probert_consumer invented[] = {0, 1, 2, 0xffffffffULL, 0x100000001ULL,
                                              0xffffffffffffffffULL, SENTINEL};
  for (size_t i = 0; i < sizeof invented / sizeof invented[0]; i++) {
    CHECK_STATUS(probert_detach(invented[i]), PROBERT_ERR_NOT_FOUND);
    CHECK_STATUS(probert_detach_nosync(invented[i]), PROBERT_ERR_NOT_FOUND);
    CHECK_STATUS(probert_detach_batch(&invented[i], 1), PROBERT_ERR_NOT_FOUND);
    CHECK_STATUS(probert_consumer_get_stats(invented[i], &st), PROBERT_ERR_NOT_FOUND);
    CHECK_STATUS(probert_region_remove(invented[i]), PROBERT_ERR_NOT_FOUND);
  }
  CHECK_EQ(st.hits, SENTINEL);
  CHECK_EQ(st.missed, SENTINEL);
  CHECK_OK(probert_attach(f, count_hit, &hits, &c));
  CHECK_STATUS(probert_consumer_get_stats(c, NULL), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(probert_detach_batch(NULL, 1), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_OK(probert_detach_batch(NULL, 0)); /* nothing to detach: one grace period */
  CHECK_OK(probert_sync());

  /* probert_probe_mode. */
  probert_mode m = (probert_mode)77;
  CHECK_STATUS(probert_probe_mode(NULL, &m), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(probert_probe_mode(f, NULL), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(probert_probe_mode(FN_ADDR(target_other), &m), PROBERT_ERR_NOT_FOUND);
  CHECK_STATUS(probert_probe_mode((const char *)f + 1, &m), PROBERT_ERR_NOT_FOUND);
  CHECK_EQ(m, 77);
  CHECK_OK(probert_detach(c));

  /* probert_attach_batch. */
  size_t idx = 12345;
  probert_consumer outs[2] = {SENTINEL, SENTINEL};
  probert_attach_req req = {f, count_hit, &hits};
  CHECK_STATUS(probert_attach_batch(NULL, 1, outs, &idx), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_EQ(idx, 1);
  idx = 12345;
  CHECK_STATUS(probert_attach_batch(&req, 1, NULL, &idx), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_EQ(idx, 1);
  CHECK_STATUS(probert_attach_batch(&req, 1, NULL, NULL), PROBERT_ERR_INVALID_ARGUMENT);
  idx = 12345;
  CHECK_OK(probert_attach_batch(NULL, 0, NULL, &idx)); /* n == 0: nothing to do */
  CHECK_EQ(idx, 12345);
  CHECK_EQ(outs[0], SENTINEL);

  /* probert_region_add / probert_region_remove. */
  probert_region r = SENTINEL;
  unsigned char *code = map_code(JIT_CODE, sizeof JIT_CODE);
  probert_region_desc d = {code, PAGE, "bad-input", NULL, NULL};
  CHECK_STATUS(probert_region_add(NULL, &r), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(probert_region_add(&d, NULL), PROBERT_ERR_INVALID_ARGUMENT);
  d.start = NULL;
  CHECK_STATUS(probert_region_add(&d, &r), PROBERT_ERR_INVALID_ARGUMENT);
  d.start = code;
  d.len = 0;
  CHECK_STATUS(probert_region_add(&d, &r), PROBERT_ERR_INVALID_ARGUMENT);
  d.len = SIZE_MAX; /* wraps around the address space */
  CHECK_STATUS(probert_region_add(&d, &r), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_EQ(r, SENTINEL);
  d.len = PAGE;
  d.name = NULL; /* allowed */
  CHECK_OK(probert_region_add(&d, &r));
  CHECK(r != 0 && r != SENTINEL);
  CHECK_OK(probert_region_remove(r));
  CHECK_STATUS(probert_region_remove(r), PROBERT_ERR_NOT_FOUND);
  CHECK_STATUS(probert_region_remove(0), PROBERT_ERR_NOT_FOUND);
  munmap(code, PAGE);
}

/* ---- handles: stale, doubled, generations ------------------------------ */

static void t_stale_handles(void) {
  static atomic_ulong a, b;
  probert_consumer c1, c2;
  CHECK_OK(probert_attach(FN_ADDR(target_add), count_hit, &a, &c1));
  CHECK_OK(probert_detach(c1));
  /* Doubled. */
  CHECK_STATUS(probert_detach(c1), PROBERT_ERR_NOT_FOUND);
  CHECK_STATUS(probert_detach_nosync(c1), PROBERT_ERR_NOT_FOUND);
  CHECK_STATUS(probert_detach_batch(&c1, 1), PROBERT_ERR_NOT_FOUND);
  probert_consumer_stats st = {SENTINEL, SENTINEL, SENTINEL, SENTINEL};
  CHECK_STATUS(probert_consumer_get_stats(c1, &st), PROBERT_ERR_NOT_FOUND);
  CHECK_EQ(st.hits, SENTINEL);
  /* The slot is reused with a new generation: the old handle stays stale. */
  CHECK_OK(probert_attach(FN_ADDR(target_add), count_hit, &b, &c2));
  CHECK(c2 != c1);
  CHECK_STATUS(probert_detach(c1), PROBERT_ERR_NOT_FOUND);
  CHECK_EQ(call_add(1, 2), 3);
  CHECK_EQ(atomic_load(&a), 0);
  CHECK_EQ(atomic_load(&b), 1);
  /* Invented neighbours of a live handle. */
  CHECK_STATUS(probert_detach(c2 + 1), PROBERT_ERR_NOT_FOUND);
  CHECK_STATUS(probert_detach(c2 ^ (1ULL << 32)), PROBERT_ERR_NOT_FOUND);
  CHECK_STATUS(probert_detach(c2 + (1ULL << 32)), PROBERT_ERR_NOT_FOUND);
  CHECK_STATUS(probert_detach(c2 & 0xffffffffULL), PROBERT_ERR_NOT_FOUND);
  /* ... and after all that, the live one still works, once. */
  CHECK_OK(probert_detach_nosync(c2));
  CHECK_STATUS(probert_detach_nosync(c2), PROBERT_ERR_NOT_FOUND);
  CHECK_OK(probert_sync());
  CHECK_EQ(call_add(1, 2), 3);
  CHECK_EQ(atomic_load(&b), 1);
}

/* ---- batches ----------------------------------------------------------- */

static void t_attach_batch_all_or_nothing(void) {
  static atomic_ulong h[4];
  unsigned char add0[16], inc0[16], other0[16], now[16];
  code_snapshot(FN_ADDR(target_add), add0, 16);
  code_snapshot(FN_ADDR(asm_inc), inc0, 16);
  code_snapshot(FN_ADDR(target_other), other0, 16);
  probert_consumer out[4] = {SENTINEL, SENTINEL, SENTINEL, SENTINEL};
  size_t idx = 777;

  /* Request 2 is inside an instruction: nothing is attached, err_index 2. */
  probert_attach_req bad_addr[4] = {
      {FN_ADDR(target_add), count_hit, &h[0]},
      {FN_ADDR(asm_inc), count_hit, &h[1]},
      {(const char *)FN_ADDR(asm_inc) + 2, count_hit, &h[2]},
      {FN_ADDR(target_other), count_hit, &h[3]},
  };
  CHECK_STATUS(probert_attach_batch(bad_addr, 4, out, &idx), PROBERT_ERR_MISALIGNED);
  CHECK_EQ(idx, 2);
  /* Request 1 has no handler (earlier than a bad address at 3). */
  probert_attach_req no_handler[4] = {
      {FN_ADDR(target_add), count_hit, &h[0]},
      {FN_ADDR(target_other), NULL, &h[1]},
      {FN_ADDR(asm_inc), count_hit, &h[2]},
      {FN_ADDR(asm_int3), count_hit, &h[3]},
  };
  CHECK_STATUS(probert_attach_batch(no_handler, 4, out, &idx), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_EQ(idx, 1);
  /* ... and a foreign int3 at 3 when the rest is fine. */
  no_handler[1].handler = count_hit;
  CHECK_STATUS(probert_attach_batch(no_handler, 4, out, &idx), PROBERT_ERR_CONFLICT);
  CHECK_EQ(idx, 3);
  /* Request 0 with a NULL address; request 0 in no region. */
  probert_attach_req first[2] = {{NULL, count_hit, NULL}, {FN_ADDR(target_add), count_hit, &h[0]}};
  CHECK_STATUS(probert_attach_batch(first, 2, out, &idx), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_EQ(idx, 0);
  int on_stack;
  first[0].addr = &on_stack;
  CHECK_STATUS(probert_attach_batch(first, 2, out, &idx), PROBERT_ERR_NO_REGION);
  CHECK_EQ(idx, 0);
  /* err_index may be NULL. */
  CHECK_STATUS(probert_attach_batch(first, 2, out, NULL), PROBERT_ERR_NO_REGION);

  /* Nothing of it happened. */
  for (int i = 0; i < 4; i++) {
    CHECK_EQ(out[i], SENTINEL);
  }
  code_snapshot(FN_ADDR(target_add), now, 16);
  CHECK(memcmp(now, add0, 16) == 0);
  code_snapshot(FN_ADDR(asm_inc), now, 16);
  CHECK(memcmp(now, inc0, 16) == 0);
  code_snapshot(FN_ADDR(target_other), now, 16);
  CHECK(memcmp(now, other0, 16) == 0);
  CHECK_EQ(call_add(1, 1) + call_inc(1) + call_other(1), 2 + 2 + 0);
  for (int i = 0; i < 4; i++) {
    CHECK_EQ(atomic_load(&h[i]), 0);
  }
  probert_mode m;
  CHECK_STATUS(probert_probe_mode(FN_ADDR(target_add), &m), PROBERT_ERR_NOT_FOUND);

  /* A good batch, two consumers sharing an address. */
  probert_attach_req good[4] = {
      {FN_ADDR(target_add), count_hit, &h[0]},
      {FN_ADDR(asm_inc), count_hit, &h[1]},
      {FN_ADDR(target_add), count_hit, &h[2]},
      {FN_ADDR(target_other), count_hit, &h[3]},
  };
  idx = 777;
  CHECK_OK(probert_attach_batch(good, 4, out, &idx));
  CHECK_EQ(idx, 777); /* untouched on success */
  for (int i = 0; i < 4; i++) {
    CHECK(out[i] != 0 && out[i] != SENTINEL);
    for (int j = 0; j < i; j++) {
      CHECK(out[i] != out[j]);
    }
  }
  CHECK_EQ(call_add(1, 1) + call_inc(1) + call_other(1), 2 + 2 + 0);
  for (int i = 0; i < 4; i++) {
    CHECK_EQ(atomic_load(&h[i]), 1);
  }

  /* detach_batch is all or nothing on handle validity. */
  probert_consumer with_stale[3] = {out[0], 0x123456789ULL, out[1]};
  CHECK_STATUS(probert_detach_batch(with_stale, 3), PROBERT_ERR_NOT_FOUND);
  probert_consumer doubled[3] = {out[0], out[1], out[0]};
  CHECK_STATUS(probert_detach_batch(doubled, 3), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_EQ(call_add(1, 1) + call_inc(1), 4);
  CHECK_EQ(atomic_load(&h[0]), 2);
  CHECK_EQ(atomic_load(&h[1]), 2);
  CHECK_EQ(atomic_load(&h[2]), 2);

  CHECK_OK(probert_detach_batch(out, 4));
  for (int i = 0; i < 4; i++) {
    CHECK_STATUS(probert_detach(out[i]), PROBERT_ERR_NOT_FOUND);
  }
  CHECK_EQ(call_add(1, 1) + call_inc(1) + call_other(1), 4);
  CHECK_EQ(atomic_load(&h[0]), 2);
  CHECK_EQ(atomic_load(&h[3]), 1);
  code_snapshot(FN_ADDR(target_add), now, 16);
  CHECK(memcmp(now, add0, 16) == 0);
  code_snapshot(FN_ADDR(asm_inc), now, 16);
  CHECK(memcmp(now, inc0, 16) == 0);
  code_snapshot(FN_ADDR(target_other), now, 16);
  CHECK(memcmp(now, other0, 16) == 0);
}

/* ---- detach waits for a running handler -------------------------------- */

static atomic_int blk_entered, blk_release, blk_finished;

static probert_action blocking_handler(probert_hit *hit) {
  (void)hit;
  atomic_store(&blk_entered, 1);
  while (!atomic_load(&blk_release)) {
  }
  atomic_store(&blk_finished, 1);
  return PROBERT_CONTINUE;
}

static void *call_block_thread(void *arg) {
  (void)arg;
  return (void *)(intptr_t)call_block(5);
}

static void *release_later(void *arg) {
  (void)arg;
  sleep_ms(200);
  atomic_store(&blk_release, 1);
  return NULL;
}

static void blocked_start(probert_consumer *c, pthread_t *worker) {
  atomic_store(&blk_entered, 0);
  atomic_store(&blk_release, 0);
  atomic_store(&blk_finished, 0);
  CHECK_OK(probert_attach(FN_ADDR(target_block), blocking_handler, NULL, c));
  CHECK(pthread_create(worker, NULL, call_block_thread, NULL) == 0);
  while (!atomic_load(&blk_entered)) {
    sleep_ms(1);
  }
}

static void t_detach_waits_for_running_handler(void) {
  probert_consumer c;
  pthread_t worker, releaser;
  void *ret;
  blocked_start(&c, &worker);
  /* The handler is running on the worker and will not return before the
     releaser lets it, 200 ms from now: detach must wait for it. */
  CHECK(pthread_create(&releaser, NULL, release_later, NULL) == 0);
  CHECK_OK(probert_detach(c));
  CHECK_EQ(atomic_load(&blk_finished), 1);
  CHECK(pthread_join(worker, &ret) == 0);
  CHECK_EQ((intptr_t)ret, 15);
  CHECK(pthread_join(releaser, NULL) == 0);
  CHECK_STATUS(probert_detach(c), PROBERT_ERR_NOT_FOUND);

  /* detach_nosync does not wait; probert_sync does. */
  blocked_start(&c, &worker);
  CHECK_OK(probert_detach_nosync(c));
  CHECK_EQ(atomic_load(&blk_finished), 0); /* still running: nosync returned anyway */
  CHECK(pthread_create(&releaser, NULL, release_later, NULL) == 0);
  CHECK_OK(probert_sync());
  CHECK_EQ(atomic_load(&blk_finished), 1);
  CHECK(pthread_join(worker, &ret) == 0);
  CHECK(pthread_join(releaser, NULL) == 0);

  /* detach_batch waits too. */
  probert_consumer cs[2];
  static atomic_ulong other_hits;
  blocked_start(&cs[0], &worker);
  CHECK_OK(probert_attach(FN_ADDR(target_other), count_hit, &other_hits, &cs[1]));
  CHECK(pthread_create(&releaser, NULL, release_later, NULL) == 0);
  CHECK_OK(probert_detach_batch(cs, 2));
  CHECK_EQ(atomic_load(&blk_finished), 1);
  CHECK(pthread_join(worker, &ret) == 0);
  CHECK(pthread_join(releaser, NULL) == 0);
}

/* ---- PROBERT_REMOVE ----------------------------------------------------- */

static atomic_ulong remove_calls;
static probert_action remove_on_third(probert_hit *hit) {
  (void)hit;
  return atomic_fetch_add(&remove_calls, 1) + 1 == 3 ? PROBERT_REMOVE : PROBERT_CONTINUE;
}
static probert_action returns_garbage(probert_hit *hit) {
  atomic_fetch_add((atomic_ulong *)hit->user_data, 1);
  return (probert_action)42; /* not PROBERT_REMOVE: continues */
}

static void t_handler_remove(void) {
  unsigned char before[16], after[16];
  code_snapshot(FN_ADDR(target_add), before, 16);
  probert_consumer c;
  CHECK_OK(probert_attach(FN_ADDR(target_add), remove_on_third, NULL, &c));
  for (int i = 0; i < 10; i++) {
    CHECK_EQ(call_add(i, i), 2 * i);
  }
  CHECK_EQ(atomic_load(&remove_calls), 3);
  /* The handle is stale. */
  CHECK_STATUS(probert_detach(c), PROBERT_ERR_NOT_FOUND);
  probert_consumer_stats st;
  CHECK_STATUS(probert_consumer_get_stats(c, &st), PROBERT_ERR_NOT_FOUND);
  CHECK_OK(probert_sync());
  code_snapshot(FN_ADDR(target_add), after, 16);
  CHECK(memcmp(before, after, 16) == 0);
  probert_mode m;
  CHECK_STATUS(probert_probe_mode(FN_ADDR(target_add), &m), PROBERT_ERR_NOT_FOUND);

  /* Any value but PROBERT_REMOVE continues. */
  static atomic_ulong g;
  CHECK_OK(probert_attach(FN_ADDR(target_add), returns_garbage, &g, &c));
  for (int i = 0; i < 5; i++) {
    call_add(i, i);
  }
  CHECK_EQ(atomic_load(&g), 5);
  CHECK_OK(probert_detach(c));
}

/* ---- recursion is missed ------------------------------------------------ */

static atomic_ulong rec_nested_results;
static probert_action recurse(probert_hit *hit) {
  (void)hit;
  /* Calls the probed function from its own handler: the nested hit runs the
     instruction but no handler, and counts as missed. */
  atomic_fetch_add(&rec_nested_results, (unsigned long)call_rec(100));
  return PROBERT_CONTINUE;
}

static void t_recursion_missed(void) {
  probert_consumer c;
  static atomic_ulong other;
  probert_consumer c2;
  CHECK_OK(probert_attach(FN_ADDR(target_rec), recurse, NULL, &c));
  CHECK_OK(probert_attach(FN_ADDR(target_rec), count_hit, &other, &c2));
  for (long i = 0; i < 10; i++) {
    CHECK_EQ(call_rec(i), i + 1);
  }
  CHECK_EQ(atomic_load(&rec_nested_results), 10 * 101);
  probert_consumer_stats st;
  CHECK_OK(probert_consumer_get_stats(c, &st));
  CHECK_EQ(st.hits, 10);
  CHECK_EQ(st.missed, 10);
  CHECK_OK(probert_consumer_get_stats(c2, &st));
  CHECK_EQ(st.hits, 10);
  CHECK_EQ(atomic_load(&other), 10); /* the nested hits ran no consumer */
  CHECK_OK(probert_detach(c));
  CHECK_OK(probert_detach(c2));
}

/* ---- foreign SIGTRAP handlers ----------------------------------------- */

static atomic_int foreign_info_calls, foreign_plain_calls, foreign_last_code;

static void foreign_siginfo(int sig, siginfo_t *info, void *uc) {
  (void)uc;
  if (sig == SIGTRAP) {
    atomic_fetch_add(&foreign_info_calls, 1);
    atomic_store(&foreign_last_code, info->si_code);
  }
}
static void foreign_plain(int sig) {
  if (sig == SIGTRAP) {
    atomic_fetch_add(&foreign_plain_calls, 1);
  }
}

static void install_sigtrap(int siginfo, struct sigaction *old) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sigemptyset(&sa.sa_mask);
  if (siginfo) {
    sa.sa_sigaction = foreign_siginfo;
    sa.sa_flags = SA_SIGINFO;
  } else {
    sa.sa_handler = foreign_plain;
  }
  CHECK(sigaction(SIGTRAP, &sa, old) == 0);
}

/* The host's handler, installed before probert, gets every trap that is not
   probert's, while probes keep working. */
static void t_foreign_sigtrap_siginfo(void) {
  static atomic_ulong hits;
  install_sigtrap(1, NULL);
  CHECK_OK(probert_init());
  probert_consumer c;
  CHECK_OK(probert_attach(FN_ADDR(target_add), count_hit, &hits, &c));
  call_raise_trap(); /* a foreign int3 */
  CHECK_EQ(atomic_load(&foreign_info_calls), 1);
  CHECK_EQ(atomic_load(&foreign_last_code), 0x80); /* SI_KERNEL */
  CHECK_EQ(call_add(2, 2), 4);
  CHECK_EQ(atomic_load(&hits), 1);
  CHECK_EQ(atomic_load(&foreign_info_calls), 1);
  raise(SIGTRAP); /* a SIGTRAP sent by a process */
  CHECK_EQ(atomic_load(&foreign_info_calls), 2);
  call_raise_trap();
  CHECK_EQ(atomic_load(&foreign_info_calls), 3);
  CHECK_OK(probert_detach(c));
  call_raise_trap();
  CHECK_EQ(atomic_load(&foreign_info_calls), 4);
  CHECK_EQ(atomic_load(&hits), 1);
}

static void t_foreign_sigtrap_plain(void) {
  static atomic_ulong hits;
  install_sigtrap(0, NULL);
  probert_consumer c;
  CHECK_OK(probert_attach(FN_ADDR(target_add), count_hit, &hits, &c)); /* lazy init */
  call_raise_trap();
  CHECK_EQ(atomic_load(&foreign_plain_calls), 1);
  CHECK_EQ(call_add(2, 2), 4);
  CHECK_EQ(atomic_load(&hits), 1);
  raise(SIGTRAP);
  CHECK_EQ(atomic_load(&foreign_plain_calls), 2);
  CHECK_OK(probert_detach(c));
}

/* Runs body in a grandchild and returns its wait status. */
static int in_grandchild(void (*body)(void)) {
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    struct rlimit no_core = {0, 0};
    setrlimit(RLIMIT_CORE, &no_core);
    body();
    _exit(0);
  }
  int status;
  CHECK(waitpid(pid, &status, 0) == pid);
  return status;
}

static void default_trap_body(void) {
  static atomic_ulong hits;
  probert_consumer c;
  CHECK_OK(probert_attach(FN_ADDR(target_add), count_hit, &hits, &c));
  CHECK_EQ(call_add(1, 1), 2);
  call_raise_trap(); /* dies here, as it would without probert */
  _exit(3);
}
static void ignored_trap_body(void) {
  signal(SIGTRAP, SIG_IGN);
  default_trap_body();
}

/* With SIGTRAP at its default (or ignored), a foreign int3 kills the process
   with SIGTRAP exactly as without probert, instead of looping or being
   swallowed. */
static void t_foreign_sigtrap_default(void) {
  int st = in_grandchild(default_trap_body);
  CHECK(WIFSIGNALED(st));
  CHECK_EQ(WTERMSIG(st), SIGTRAP);
  st = in_grandchild(ignored_trap_body);
  CHECK(WIFSIGNALED(st));
  CHECK_EQ(WTERMSIG(st), SIGTRAP);
}

/* A host that replaces probert's SIGTRAP handler after init gets
   PROBERT_ERR_SIGNAL from attach, until it puts probert's back. */
static void t_sigtrap_replaced_is_signal_error(void) {
  static atomic_ulong hits;
  CHECK_OK(probert_init());
  struct sigaction probert_sa;
  install_sigtrap(1, &probert_sa);
  probert_consumer c = SENTINEL;
  CHECK_STATUS(probert_attach(FN_ADDR(target_add), count_hit, &hits, &c), PROBERT_ERR_SIGNAL);
  probert_attach_req req = {FN_ADDR(target_add), count_hit, &hits};
  size_t idx = 9;
  CHECK_STATUS(probert_attach_batch(&req, 1, &c, &idx), PROBERT_ERR_SIGNAL);
  CHECK_EQ(idx, 0);
  CHECK_EQ(c, SENTINEL);
  CHECK(sigaction(SIGTRAP, &probert_sa, NULL) == 0);
  CHECK_OK(probert_attach(FN_ADDR(target_add), count_hit, &hits, &c));
  CHECK_EQ(call_add(1, 1), 2);
  CHECK_EQ(atomic_load(&hits), 1);
  CHECK_OK(probert_detach(c));
}

/* ---- fork --------------------------------------------------------------- */

static void t_fork(void) {
  static atomic_ulong hits, inc_hits;
  unsigned char before[16], now[16];
  code_snapshot(FN_ADDR(target_add), before, 16);
  probert_consumer c;
  CHECK_OK(probert_attach(FN_ADDR(target_add), count_hit, &hits, &c));
  CHECK_EQ(call_add(1, 1), 2);
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    /* The child inherits the probe and can use probert fully. */
    CHECK_EQ(call_add(2, 2), 4);
    CHECK_EQ(atomic_load(&hits), 2);
    probert_consumer_stats st;
    CHECK_OK(probert_consumer_get_stats(c, &st));
    CHECK_EQ(st.hits, 2);
    probert_consumer c2;
    CHECK_OK(probert_attach(FN_ADDR(asm_inc), count_hit, &inc_hits, &c2));
    CHECK_EQ(call_inc(1), 2);
    CHECK_EQ(atomic_load(&inc_hits), 1);
    CHECK_OK(probert_detach(c2));
    CHECK_OK(probert_detach(c));
    code_snapshot(FN_ADDR(target_add), now, 16);
    CHECK(memcmp(before, now, 16) == 0);
    CHECK_EQ(call_add(3, 3), 6);
    CHECK_EQ(atomic_load(&hits), 2);
    _exit(0);
  }
  int status;
  CHECK(waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  /* The parent's probe is untouched by the child's detach. */
  code_snapshot(FN_ADDR(target_add), now, 16);
  CHECK_EQ(now[0], 0xCC);
  CHECK_EQ(call_add(2, 2), 4);
  CHECK_EQ(atomic_load(&hits), 2);
  CHECK_EQ(atomic_load(&inc_hits), 0);
  CHECK_OK(probert_detach(c));
  code_snapshot(FN_ADDR(target_add), now, 16);
  CHECK(memcmp(before, now, 16) == 0);
}

/* ---- JIT regions ---------------------------------------------------------- */

static void t_jit_region(void) {
  static atomic_ulong hits[JIT_N_INSNS];
  unsigned char *code = map_code(JIT_CODE, sizeof JIT_CODE);
  jit_fn f = as_fn(code);
  CHECK_EQ(f(1), 6);
  probert_consumer c = SENTINEL;
  /* Unregistered anonymous code is in no region. */
  CHECK_STATUS(probert_attach(code, count_hit, &hits[0], &c), PROBERT_ERR_NO_REGION);
  probert_region r, r2 = SENTINEL;
  probert_region_desc d = {code, PAGE, "jit", NULL, NULL};
  CHECK_OK(probert_region_add(&d, &r));
  /* Overlaps, partial and whole; an adjacent region is fine. */
  probert_region_desc o1 = {code + PAGE - 1, 2, "o1", NULL, NULL};
  probert_region_desc o2 = {code - 16, 17, "o2", NULL, NULL};
  probert_region_desc o3 = {code + 8, 4, "o3", NULL, NULL};
  CHECK_STATUS(probert_region_add(&o1, &r2), PROBERT_ERR_REGION_OVERLAP);
  CHECK_STATUS(probert_region_add(&o2, &r2), PROBERT_ERR_REGION_OVERLAP);
  CHECK_STATUS(probert_region_add(&o3, &r2), PROBERT_ERR_REGION_OVERLAP);
  CHECK_STATUS(probert_region_add(&d, &r2), PROBERT_ERR_REGION_OVERLAP);
  CHECK_EQ(r2, SENTINEL);
  /* Boundaries are checked from the region's start. */
  for (size_t off = 0; off < sizeof JIT_CODE; off++) {
    int start = 0;
    for (size_t i = 0; i < JIT_N_INSNS; i++) {
      start |= JIT_STARTS[i] == off;
    }
    if (!start) {
      CHECK_STATUS(probert_attach(code + off, count_hit, &hits[0], &c), PROBERT_ERR_MISALIGNED);
    }
  }
  CHECK_EQ(c, SENTINEL);
  /* A probe on every instruction. */
  probert_consumer cs[JIT_N_INSNS];
  for (size_t i = 0; i < JIT_N_INSNS; i++) {
    CHECK_OK(probert_attach(code + JIT_STARTS[i], count_hit, &hits[i], &cs[i]));
  }
  for (long x = 0; x < 10; x++) {
    CHECK_EQ(f(x), (x + 1) * 3);
  }
  for (size_t i = 0; i < JIT_N_INSNS; i++) {
    CHECK_EQ(atomic_load(&hits[i]), 10);
  }
  /* Removing the region detaches them all and restores the code. */
  CHECK_OK(probert_region_remove(r));
  CHECK(memcmp(code, JIT_CODE, sizeof JIT_CODE) == 0);
  for (size_t i = 0; i < JIT_N_INSNS; i++) {
    CHECK_STATUS(probert_detach(cs[i]), PROBERT_ERR_NOT_FOUND);
  }
  CHECK_STATUS(probert_region_remove(r), PROBERT_ERR_NOT_FOUND);
  CHECK_EQ(f(1), 6);
  CHECK_EQ(atomic_load(&hits[0]), 10);
  CHECK_STATUS(probert_attach(code, count_hit, &hits[0], &c), PROBERT_ERR_NO_REGION);
  /* The memory may now be freed and the range registered again. */
  CHECK_OK(probert_region_add(&d, &r2));
  CHECK(r2 != r);
  CHECK_OK(probert_region_remove(r2));
  CHECK(munmap(code, PAGE) == 0);
}

/* CONFLICT, UNSUPPORTED_INSN and truncated code in JIT regions. */
static void t_jit_bad_code(void) {
  static atomic_ulong hits;
  static const unsigned char int3_code[] = {0xcc, 0xc3};
  static const unsigned char invalid_code[] = {0x06, 0xc3};
  static const unsigned char lea_code[] = {0x48, 0x8d, 0x47, 0x01, 0xc3};
  unsigned char *a = map_code(int3_code, sizeof int3_code);
  unsigned char *b = map_code(invalid_code, sizeof invalid_code);
  unsigned char *t = map_code(lea_code, sizeof lea_code);
  probert_region ra, rb, rt;
  probert_region_desc da = {a, PAGE, "int3", NULL, NULL};
  probert_region_desc db = {b, PAGE, "invalid", NULL, NULL};
  probert_region_desc dt = {t, 2, "truncated", NULL, NULL}; /* ends inside the lea */
  CHECK_OK(probert_region_add(&da, &ra));
  CHECK_OK(probert_region_add(&db, &rb));
  CHECK_OK(probert_region_add(&dt, &rt));
  probert_consumer c = SENTINEL;
  CHECK_STATUS(probert_attach(a, count_hit, &hits, &c), PROBERT_ERR_CONFLICT);
  CHECK_STATUS(probert_attach(b, count_hit, &hits, &c), PROBERT_ERR_UNSUPPORTED_INSN);
  CHECK_STATUS(probert_attach(t, count_hit, &hits, &c), PROBERT_ERR_UNSUPPORTED_INSN);
  CHECK_EQ(c, SENTINEL);
  CHECK_EQ(a[0], 0xcc);
  CHECK_EQ(b[0], 0x06);
  CHECK_OK(probert_attach(a + 1, count_hit, &hits, &c)); /* the ret after it is fine */
  CHECK_OK(probert_detach(c));
  CHECK_OK(probert_region_remove(ra));
  CHECK_OK(probert_region_remove(rb));
  CHECK_OK(probert_region_remove(rt));
}

/* A dual-mapped memfd: the JIT writes through an RW view, code runs from an
   RX view that is never writable, so probert must write through the
   callback. */
struct dual {
  unsigned char *rw, *rx;
  atomic_int writes, fail, removed, late_calls, bad_args;
};

static int dual_write(void *dst, const void *src, size_t len, void *ctx) {
  struct dual *m = ctx;
  if (atomic_load(&m->removed)) {
    atomic_fetch_add(&m->late_calls, 1);
  }
  if (atomic_load(&m->fail)) {
    return -1;
  }
  unsigned char *d = dst;
  if (d < m->rx || d + len > m->rx + PAGE || len == 0 || src == NULL) {
    atomic_fetch_add(&m->bad_args, 1);
    return -1;
  }
  memcpy(m->rw + (d - m->rx), src, len);
  atomic_fetch_add(&m->writes, 1);
  return 0;
}

static void t_write_callback_region(void) {
  static atomic_ulong hits;
  static struct dual m;
  int fd = memfd_create("probert-test-jit", MFD_CLOEXEC);
  CHECK(fd >= 0);
  CHECK(ftruncate(fd, PAGE) == 0);
  m.rw = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  m.rx = mmap(NULL, PAGE, PROT_READ | PROT_EXEC, MAP_SHARED, fd, 0);
  CHECK(m.rw != MAP_FAILED && m.rx != MAP_FAILED);
  close(fd);
  memcpy(m.rw, JIT_CODE, sizeof JIT_CODE);
  jit_fn f = as_fn(m.rx);
  CHECK_EQ(f(1), 6);
  probert_region r;
  probert_region_desc d = {m.rx, PAGE, "dual-mapped", dual_write, &m};
  CHECK_OK(probert_region_add(&d, &r));

  /* A failing callback: PROBERT_ERR_PROTECT, and nothing changed. */
  atomic_store(&m.fail, 1);
  probert_consumer c = SENTINEL;
  CHECK_STATUS(probert_attach(m.rx, count_hit, &hits, &c), PROBERT_ERR_PROTECT);
  CHECK_EQ(c, SENTINEL);
  CHECK(memcmp(m.rx, JIT_CODE, sizeof JIT_CODE) == 0);
  probert_mode mode;
  CHECK_STATUS(probert_probe_mode(m.rx, &mode), PROBERT_ERR_NOT_FOUND);
  atomic_store(&m.fail, 0);

  /* Attach and detach write through the callback only. */
  int w0 = atomic_load(&m.writes);
  CHECK_OK(probert_attach(m.rx, count_hit, &hits, &c));
  CHECK(atomic_load(&m.writes) > w0);
  /* push rbp; mov rbp, rsp; lea rax, [rdi+1]: a fast site of three
     instructions, its jump written through the callback. */
  CHECK_EQ(m.rx[0], 0xE9);
  CHECK_OK(probert_probe_mode(m.rx, &mode));
  CHECK_EQ(mode, PROBERT_MODE_FAST);
  char perms[8];
  mapping_perms(m.rx, perms);
  CHECK(strcmp(perms, "r-xs") == 0);
  CHECK_EQ(f(2), 9);
  CHECK_EQ(atomic_load(&hits), 1);
  int w1 = atomic_load(&m.writes);
  CHECK_OK(probert_detach(c));
  CHECK(atomic_load(&m.writes) > w1);
  CHECK(memcmp(m.rx, JIT_CODE, sizeof JIT_CODE) == 0);

  /* A probe inside a fast site's run demotes that site to its first
     instruction (here on the trap path: push rbp is one byte), through the
     callback too; every probe keeps counting. */
  probert_consumer c1, c2, c3;
  CHECK_OK(probert_attach(m.rx, count_hit, &hits, &c1));
  CHECK_EQ(f(2), 9);
  CHECK_EQ(atomic_load(&hits), 2);
  CHECK_OK(probert_attach(m.rx + 4, count_hit, &hits, &c2));
  CHECK_OK(probert_probe_mode(m.rx, &mode));
  CHECK_EQ(mode, PROBERT_MODE_TRAP);
  CHECK_EQ(m.rx[0], 0xCC);
  CHECK(memcmp(m.rx + 1, JIT_CODE + 1, 3) == 0); /* the rest of its run is original again */
  CHECK_EQ(f(2), 9);
  CHECK_EQ(atomic_load(&hits), 4);
  /* lea; imul was a fast run too: a probe on the imul demotes it. */
  CHECK_OK(probert_attach(m.rx + 8, count_hit, &hits, &c3));
  CHECK_OK(probert_probe_mode(m.rx + 4, &mode));
  CHECK_EQ(mode, PROBERT_MODE_TRAP);
  CHECK_EQ(f(2), 9);
  CHECK_EQ(atomic_load(&hits), 7);
  /* region_remove restores through the callback, then never calls it. */
  CHECK_OK(probert_region_remove(r));
  atomic_store(&m.removed, 1);
  CHECK(memcmp(m.rx, JIT_CODE, sizeof JIT_CODE) == 0);
  CHECK_STATUS(probert_detach(c1), PROBERT_ERR_NOT_FOUND);
  CHECK_STATUS(probert_detach(c2), PROBERT_ERR_NOT_FOUND);
  CHECK_STATUS(probert_attach(m.rx, count_hit, &hits, &c), PROBERT_ERR_NO_REGION);
  CHECK_OK(probert_sync());
  CHECK_EQ(atomic_load(&m.late_calls), 0);
  CHECK_EQ(atomic_load(&m.bad_args), 0);
  mapping_perms(m.rx, perms);
  CHECK(strcmp(perms, "r-xs") == 0);
  CHECK(!mapping_is_wx());
  munmap(m.rw, PAGE);
  munmap(m.rx, PAGE);
}

/* ---- modes --------------------------------------------------------------- */

static void t_modes(void) {
  static atomic_ulong hits;
  probert_consumer c1, c2, c3 = SENTINEL;
  probert_attach_opts trap = {sizeof trap, PROBERT_MODE_TRAP, NULL};
  probert_attach_opts fast = {sizeof fast, PROBERT_MODE_FAST, NULL};
  probert_attach_opts autom = {sizeof autom, PROBERT_MODE_AUTO, NULL};
  CHECK_OK(probert_attach_ex(FN_ADDR(target_add), count_hit, &hits, &trap, &c1));
  CHECK_OK(probert_attach_ex(FN_ADDR(asm_inc), count_hit, &hits, &autom, &c2));
  probert_mode m = (probert_mode)77;
  CHECK_OK(probert_probe_mode(FN_ADDR(target_add), &m));
  CHECK_EQ(m, PROBERT_MODE_TRAP);
  m = (probert_mode)77;
  CHECK_OK(probert_probe_mode(FN_ADDR(asm_inc), &m));
  /* lea rax, [rdi + 1]; ret: whole instructions covering the 5-byte jump,
     and nothing branches between them: AUTO makes it fast. */
  CHECK_EQ(m, PROBERT_MODE_FAST);
  /* asm_countdown's loop branches back into its first 5 bytes, and its
     first instruction is 3 bytes: trap only, so FAST refuses it and AUTO
     serves it on the trap path. */
  CHECK_STATUS(probert_attach_ex(FN_ADDR(asm_countdown), count_hit, &hits, &fast, &c3),
               PROBERT_ERR_UNSUPPORTED_INSN);
  CHECK_EQ(c3, SENTINEL);
  probert_consumer c5;
  CHECK_OK(probert_attach_ex(FN_ADDR(asm_countdown), count_hit, &hits, &autom, &c5));
  CHECK_OK(probert_probe_mode(FN_ADDR(asm_countdown), &m));
  CHECK_EQ(m, PROBERT_MODE_TRAP);
  CHECK_EQ(call_countdown(3), 0);
  CHECK_OK(probert_detach(c5));
  CHECK_STATUS(probert_probe_mode(FN_ADDR(asm_nop5), &m), PROBERT_ERR_NOT_FOUND);
  CHECK_EQ(call_add(1, 1) + call_inc(1), 4);
  CHECK_EQ(atomic_load(&hits), 1 + 2);
  /* A 5-byte NOP is a fast site: FAST and AUTO both serve it without a
     signal, and a TRAP consumer holds it on the int3 path while attached. */
  long (*volatile nop5)(long) = asm_nop5;
  CHECK_OK(probert_attach_ex(FN_ADDR(asm_nop5), count_hit, &hits, &fast, &c3));
  CHECK_OK(probert_probe_mode(FN_ADDR(asm_nop5), &m));
  CHECK_EQ(m, PROBERT_MODE_FAST);
  CHECK_EQ(((const unsigned char *)FN_ADDR(asm_nop5))[0], 0xE9);
  CHECK_EQ(nop5(40), 42);
  probert_consumer c4;
  CHECK_OK(probert_attach_ex(FN_ADDR(asm_nop5), count_hit, &hits, &trap, &c4));
  CHECK_OK(probert_probe_mode(FN_ADDR(asm_nop5), &m));
  CHECK_EQ(m, PROBERT_MODE_TRAP);
  CHECK_EQ(nop5(40), 42);
  CHECK_OK(probert_detach(c4));
  CHECK_OK(probert_probe_mode(FN_ADDR(asm_nop5), &m));
  CHECK_EQ(m, PROBERT_MODE_FAST);
  CHECK_EQ(nop5(40), 42);
  CHECK_EQ(atomic_load(&hits), 1 + 2 + 1 + 2 + 1);
  CHECK_OK(probert_detach(c3));
  CHECK_EQ(((const unsigned char *)FN_ADDR(asm_nop5))[0], 0x0F);
  CHECK_OK(probert_detach(c1));
  CHECK_OK(probert_detach(c2));
}

/* ---- out of memory: no stub can be placed within reach ----------------- */

static void t_no_memory(void) {
  static atomic_ulong hits;
  /* Reserve 6 GiB of address space and put one page of code in its middle:
     an instruction that runs out of line needs a stub within +-2 GiB, and
     there is no room for one. */
  size_t span = (size_t)6 << 30;
  unsigned char *res = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  CHECK(res != MAP_FAILED);
  unsigned char *mid = res + ((size_t)3 << 30);
  /* imul rax, rdi, 3 ; ret  — runs out of line (not emulated) */
  static const unsigned char imul[] = {0x48, 0x6b, 0xc7, 0x03, 0xc3};
  CHECK(mmap(mid, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == mid);
  memcpy(mid, imul, sizeof imul);
  CHECK(mprotect(mid, PAGE, PROT_READ | PROT_EXEC) == 0);
  probert_region r;
  probert_region_desc d = {mid, PAGE, "far", NULL, NULL};
  CHECK_OK(probert_region_add(&d, &r));
  probert_consumer c = SENTINEL;
  CHECK_STATUS(probert_attach(mid, count_hit, &hits, &c), PROBERT_ERR_NO_MEMORY);
  CHECK_EQ(c, SENTINEL);
  CHECK(memcmp(mid, imul, sizeof imul) == 0);
  /* The ret is emulated: no stub needed, it attaches. */
  CHECK_OK(probert_attach(mid + 4, count_hit, &hits, &c));
  CHECK_EQ(as_fn(mid)(5), 15);
  CHECK_EQ(atomic_load(&hits), 1);
  CHECK_OK(probert_region_remove(r));
  CHECK(memcmp(mid, imul, sizeof imul) == 0);
  munmap(res, span);
}

/* ---- PROBERT_ERR_INTERNAL ----------------------------------------------- */

/* PROBERT_ERR_INTERNAL reports a bug (a caught panic): no C input reaches
   it. Its value and text are checked here; the panic boundary that produces
   it is tested in ffi/src/boundary.rs. */
static void t_internal_status(void) {
  CHECK_EQ(PROBERT_ERR_INTERNAL, 255);
  const char *s = probert_status_str(PROBERT_ERR_INTERNAL);
  CHECK(s != NULL && strstr(s, "internal") != NULL);
}

/* ---- many threads hitting probes while others attach and detach --------- */

static atomic_int stress_stop;
static atomic_ulong stress_calls;

static void *stress_caller(void *arg) {
  (void)arg;
  while (!atomic_load(&stress_stop)) {
    CHECK_EQ(call_add(20, 22), 42);
    CHECK_EQ(call_inc(41), 42);
    atomic_fetch_add(&stress_calls, 1);
  }
  return NULL;
}

static void t_threads_attach_detach(void) {
  enum { THREADS = 4, ROUNDS = 150 };
  static atomic_ulong counters[ROUNDS];
  static unsigned long frozen[ROUNDS];
  unsigned char add0[16], inc0[16], now[16];
  code_snapshot(FN_ADDR(target_add), add0, 16);
  code_snapshot(FN_ADDR(asm_inc), inc0, 16);
  pthread_t th[THREADS];
  for (int i = 0; i < THREADS; i++) {
    CHECK(pthread_create(&th[i], NULL, stress_caller, NULL) == 0);
  }
  for (int i = 0; i < ROUNDS; i++) {
    probert_consumer c[2];
    const void *where = (i % 2) ? FN_ADDR(target_add) : FN_ADDR(asm_inc);
    CHECK_OK(probert_attach(where, count_hit, &counters[i], &c[0]));
    CHECK_OK(probert_attach(FN_ADDR(target_add), short_lived, NULL, &c[1]));
    CHECK_OK(probert_detach_nosync(c[1])); /* may still run until the sync below */
    sleep_ms(1);
    switch (i % 3) {
    case 0: CHECK_OK(probert_detach(c[0])); break;
    case 1: CHECK_OK(probert_detach_batch(&c[0], 1)); break;
    default: CHECK_OK(probert_detach_nosync(c[0])); CHECK_OK(probert_sync()); break;
    }
    frozen[i] = atomic_load(&counters[i]);
  }
  unsigned long short_lived_frozen = atomic_load(&short_lived_calls);
  sleep_ms(20);
  atomic_store(&stress_stop, 1);
  for (int i = 0; i < THREADS; i++) {
    CHECK(pthread_join(th[i], NULL) == 0);
  }
  /* After detach returned, no handler call. */
  for (int i = 0; i < ROUNDS; i++) {
    CHECK_EQ(atomic_load(&counters[i]), frozen[i]);
  }
  CHECK_EQ(atomic_load(&short_lived_calls), short_lived_frozen);
  CHECK(atomic_load(&stress_calls) > 0);
  code_snapshot(FN_ADDR(target_add), now, 16);
  CHECK(memcmp(now, add0, 16) == 0);
  code_snapshot(FN_ADDR(asm_inc), now, 16);
  CHECK(memcmp(now, inc0, 16) == 0);
}

/* probert_symbol_addr: a libc function by module name (with and without its
   version suffix) and in every module, as dlsym resolves it; a symbol or a
   module that does not exist is NOT_FOUND; NULL is INVALID_ARGUMENT. */
static void t_symbol_addr(void) {
  const void *a = NULL, *b = NULL, *c = NULL;
  /* In every module: what dlsym gives (under a sanitizer, its interceptor
     in the executable); in libc: libc's own. */
  void *want = dlsym(RTLD_DEFAULT, "fopen");
  void *libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
  CHECK(want != NULL && libc != NULL);
  void *want_libc = dlsym(libc, "fopen");
  CHECK(want_libc != NULL);
  CHECK(probert_symbol_addr("libc.so.6", "fopen", &a) == PROBERT_OK);
  CHECK(probert_symbol_addr("libc", "fopen", &b) == PROBERT_OK);
  CHECK(probert_symbol_addr(NULL, "fopen", &c) == PROBERT_OK);
  CHECK(a == want_libc && b == want_libc && c == want);
  dlclose(libc);
  CHECK(probert_symbol_addr("", "t_symbol_addr_nonexistent", &a) == PROBERT_ERR_NOT_FOUND);
  CHECK(probert_symbol_addr("libnonexistent.so.9", "fopen", &a) == PROBERT_ERR_NOT_FOUND);
  CHECK(a == want_libc); /* out is written only on success */
  CHECK(probert_symbol_addr(NULL, NULL, &a) == PROBERT_ERR_INVALID_ARGUMENT);
  CHECK(probert_symbol_addr(NULL, "fopen", NULL) == PROBERT_ERR_INVALID_ARGUMENT);
  CHECK(strcmp(probert_version(), "0.2.0") >= 0);
}

/* ---- the runner ---------------------------------------------------------- */

#define T(name) {#name, t_##name}
static const struct test_case TESTS[] = {
    T(status_version_init),
    T(attach_count_detach),
    T(regs_get_set_arg),
    T(handler_may_not_call),
    T(bad_input_matrix),
    T(stale_handles),
    T(attach_batch_all_or_nothing),
    T(detach_waits_for_running_handler),
    T(handler_remove),
    T(recursion_missed),
    T(foreign_sigtrap_siginfo),
    T(foreign_sigtrap_plain),
    T(foreign_sigtrap_default),
    T(sigtrap_replaced_is_signal_error),
    T(fork),
    T(jit_region),
    T(jit_bad_code),
    T(write_callback_region),
    T(modes),
    T(no_memory),
    T(internal_status),
    T(threads_attach_detach),
    T(symbol_addr),
};

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  return run_tests(TESTS, sizeof TESTS / sizeof TESTS[0], argc, argv);
}
