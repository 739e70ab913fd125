/*
 * quickstart: probe a function of this program, count its calls, read an
 * argument, detach.
 *
 * From the repository root:
 *   cargo build --release -p probert-ffi
 *   cc -std=c11 -O2 -Iinclude examples/c/quickstart.c -Ltarget/release -lprobert -lpthread -ldl -o quickstart
 *   LD_LIBRARY_PATH=target/release ./quickstart
 */
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>

#include "probert.h"

/* The function to probe. noinline keeps it a function of its own: a call
   that the compiler inlined would never reach the probed instruction. */
__attribute__((noinline)) long fib(long n) {
  long a = 0, b = 1;
  for (long i = 0; i < n; i++) {
    long t = a + b;
    a = b;
    b = t;
  }
  return a;
}

/* Called through a volatile pointer so the compiler cannot fold the calls
   below into constants at build time. */
static long (*volatile fib_fn)(long) = fib;

/* The handler may run inside a signal handler: it must be
   async-signal-safe. Atomics and probert_regs_* are; printf is not. */
static atomic_ulong calls;
static atomic_ulong arg_sum;

static probert_action on_fib(probert_hit *hit) {
  atomic_fetch_add(&calls, 1);
  atomic_fetch_add(&arg_sum, probert_regs_arg(hit->regs, 0)); /* n, in rdi */
  return PROBERT_CONTINUE;
}

static int fail(const char *what, probert_status s) {
  fprintf(stderr, "%s: %s\n", what, probert_status_str(s));
  return 1;
}

int main(void) {
  printf("libprobert %s\n", probert_version());

  /* A function's address as a data pointer: ISO C has no direct conversion,
     through uintptr_t is exact on every platform probert supports. */
  const void *where = (const void *)(uintptr_t)fib;
  probert_consumer probe;
  probert_status s = probert_attach(where, on_fib, NULL, &probe);
  if (s != PROBERT_OK) {
    return fail("probert_attach", s);
  }

  long total = 0;
  for (long n = 1; n <= 20; n++) {
    total += fib_fn(n);
  }

  probert_consumer_stats st;
  s = probert_consumer_get_stats(probe, &st);
  if (s != PROBERT_OK) {
    return fail("probert_consumer_get_stats", s);
  }
  /* After probert_detach returns, on_fib is never called again. */
  s = probert_detach(probe);
  if (s != PROBERT_OK) {
    return fail("probert_detach", s);
  }
  fib_fn(30); /* not counted: detached */

  printf("sum of fib(1..20) = %ld\n", total);
  printf("probe on fib at %p: %lu calls, arguments summing to %lu (%llu hits, %llu missed)\n",
         where, (unsigned long)atomic_load(&calls), (unsigned long)atomic_load(&arg_sum),
         (unsigned long long)st.hits, (unsigned long long)st.missed);
  return atomic_load(&calls) == 20 && atomic_load(&arg_sum) == 210 && st.hits == 20 ? 0 : 1;
}
