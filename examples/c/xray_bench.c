/*
 * xray_bench: what one LLVM XRay-patched function entry costs per call,
 * measured side by side with the bare call and the unpatched sled, the same
 * way examples/bench.rs measures probert (a warm-up repetition, then 15
 * time-bounded repetitions of 20 ms, calls in chunks of about 50 us between
 * clock reads; median ns per call). Not built by cargo or ./scripts/test.
 *
 * Debian 12: apt-get install -y clang-14 libclang-rt-14-dev
 *   clang-14 -std=c11 -O2 -Wall -Wextra -fxray-instrument \
 *     -fxray-instrumentation-bundle=function-entry -fxray-modes=none \
 *     examples/c/xray_bench.c -o xray_bench
 *   ./xray_bench
 *
 * -fxray-instrumentation-bundle=function-entry gives `probed` an entry sled
 * only, so a patched call runs the handler once, like one probe per call;
 * leave it out to get XRay's default entry + exit sleds (two handler calls
 * per call; the `handler_calls_per_call` line says which). -fxray-modes=none
 * links only XRay's core runtime, without its basic/FDR logging modes, so no
 * XRAY_OPTIONS setting can make it write a log; the defaults
 * (patch_premain=false, xray_mode empty) already keep it silent.
 *
 * Output, one `xray <row> <value>` line each, ns per call (median):
 *   bare                    a plain noinline function with the same body
 *   unpatched               `probed` before __xray_patch (the sled's 2-byte jmp)
 *   patched                 `probed` patched, handler increments a plain global
 *   patched_empty           `probed` patched, handler does nothing
 *   patched_nohandler       `probed` patched, no handler (trampoline only)
 *   unpatched_after         `probed` after __xray_unpatch
 *   handler_calls_per_call  1 (entry sleds only) or 2 (entry + exit)
 * The counting rows check that the handler ran exactly once per sled per call
 * (and never after unpatching); the program exits 1 if not.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* XRay's own header (<xray/xray_interface.h>) is C++ only; these are its
   declarations in C. The enums there are plain `int`s. */
enum { XRAY_SUCCESS = 1 }; /* XRayPatchingStatus::SUCCESS */
extern int __xray_set_handler(void (*entry)(int32_t, int));
extern int __xray_remove_handler(void);
extern int __xray_patch(void);
extern int __xray_unpatch(void);
extern uintptr_t __xray_function_address(int32_t func_id);
extern size_t __xray_max_function_id(void);

#define NEVER __attribute__((xray_never_instrument))

/* The instrumented function and the bare one: same body, `lea rax,[rdi+1];
   ret`, like bench_bare in examples/bench.rs. */
__attribute__((xray_always_instrument, noinline)) uint64_t probed(uint64_t x) {
  return x + 1;
}
NEVER __attribute__((noinline)) uint64_t bare(uint64_t x) { return x + 1; }

/* The handlers. The counting one is what the rows compare with probert's
   consumers; the empty one shows the trampoline with a handler call that
   does no work. */
static uint64_t hits;
NEVER static void counting_handler(int32_t id, int type) {
  (void)id;
  (void)type;
  hits++;
}
NEVER static void empty_handler(int32_t id, int type) {
  (void)id;
  (void)type;
}

typedef uint64_t (*target)(uint64_t);
/* Read through a volatile so the loop makes a real indirect call the
   compiler cannot specialize or fold, as bench.rs does. */
static target volatile the_target;

#define REPS 15
#define REP_NS 20000000LL  /* 20 ms */
#define CHUNK_NS 50000.0   /* calls between clock reads: about 50 us */

NEVER static int64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Calls the target for REP_NS in chunks of `chunk` calls, checking every
   result. Returns the calls made; *elapsed gets the time they took. */
NEVER __attribute__((noinline)) static uint64_t timed_loop(uint64_t chunk,
                                                           int64_t *elapsed) {
  target f = the_target;
  uint64_t want = chunk * (chunk + 1) / 2; /* sum of (i + 1) for i < chunk */
  uint64_t calls = 0;
  int64_t start = now_ns();
  for (;;) {
    uint64_t acc = 0;
    for (uint64_t i = 0; i < chunk; i++) {
      uint64_t x = i;
      __asm__("" : "+r"(x)); /* black_box */
      acc += f(x);
    }
    if (acc != want) {
      fprintf(stderr, "xray_bench: the target returned a wrong value\n");
      exit(1);
    }
    calls += chunk;
    int64_t now = now_ns();
    if (now - start >= REP_NS) {
      *elapsed = now - start;
      return calls;
    }
  }
}

NEVER static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Median ns per call of `f`; *total gets every call made (warm-up too). */
NEVER static double per_call(target f, uint64_t *total) {
  the_target = f;
  int64_t t;
  uint64_t n = timed_loop(1, &t); /* warm-up; sizes the chunk */
  *total = n;
  double est = (double)t / (double)n;
  double c = CHUNK_NS / est;
  uint64_t chunk = c < 1 ? 1 : c > 1e6 ? 1000000 : (uint64_t)c;
  double v[REPS];
  for (int r = 0; r < REPS; r++) {
    n = timed_loop(chunk, &t);
    *total += n;
    v[r] = (double)t / (double)n;
  }
  qsort(v, REPS, sizeof v[0], cmp_double);
  return v[REPS / 2];
}

NEVER static void row(const char *name, double ns) {
  printf("xray %s %.2f\n", name, ns);
  fflush(stdout);
}

NEVER static void fail(const char *what) {
  fprintf(stderr, "xray_bench: %s\n", what);
  exit(1);
}

NEVER int main(void) {
  uint64_t calls;

  /* `probed` must be the only instrumented function, and unpatched even if
     XRAY_OPTIONS=patch_premain=true was given. */
  if (__xray_max_function_id() != 1 ||
      __xray_function_address(1) != (uintptr_t)&probed)
    fail("expected exactly one XRay function, `probed`; build with "
         "-fxray-instrument and no -fxray-instruction-threshold");
  __xray_unpatch();

  row("bare", per_call(bare, &calls));
  row("unpatched", per_call(probed, &calls));

  /* Patched, counting handler; one call first to learn how many sleds a
     call runs (entry only, or entry and exit). */
  if (__xray_set_handler(counting_handler) != 1)
    fail("__xray_set_handler failed");
  if (__xray_patch() != XRAY_SUCCESS) fail("__xray_patch failed");
  hits = 0;
  the_target = probed;
  if (the_target(41) != 42) fail("probed returned a wrong value");
  __asm__ volatile("" ::: "memory"); /* `probed` is pure to the compiler */
  uint64_t per = hits;
  if (per != 1 && per != 2) fail("the handler did not run once or twice");
  hits = 0;
  double patched = per_call(probed, &calls);
  if (hits != per * calls) {
    fprintf(stderr,
            "xray_bench: handler ran %llu times for %llu calls (want %llu)\n",
            (unsigned long long)hits, (unsigned long long)calls,
            (unsigned long long)(per * calls));
    return 1;
  }
  row("patched", patched);

  if (__xray_set_handler(empty_handler) != 1)
    fail("__xray_set_handler failed");
  row("patched_empty", per_call(probed, &calls));

  if (__xray_remove_handler() != 1) fail("__xray_remove_handler failed");
  row("patched_nohandler", per_call(probed, &calls));

  /* Unpatched again: the handler must never run. */
  if (__xray_set_handler(counting_handler) != 1)
    fail("__xray_set_handler failed");
  if (__xray_unpatch() != XRAY_SUCCESS) fail("__xray_unpatch failed");
  hits = 0;
  row("unpatched_after", per_call(probed, &calls));
  if (hits != 0) fail("the handler ran after __xray_unpatch");
  __xray_remove_handler();

  printf("xray handler_calls_per_call %llu\n", (unsigned long long)per);
  return 0;
}
