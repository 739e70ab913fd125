/*
 * Return probes through the C ABI (API.md, "Additions of version 0.2"):
 * the registers after a return (a return handler rewrites the value the
 * caller gets), invocations abandoned by longjmp, pthread_exit and
 * cancellation (counted, leaking nothing), a program that cannot tell a
 * return is pending (backtrace(), __builtin_return_address, dlsym(RTLD_NEXT)
 * with dlsym itself probed), NO_RETURN, batch_ex, exact counts on threads,
 * in both the trap and the default mode. C++ exceptions:
 * test_returns_cxx.cpp.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdatomic.h>
#include <stdint.h>

#include "harness.h"
#include "probert.h"

#define NOINLINE __attribute__((noinline, noclone, used))
#define FN_ADDR(f) ((const void *)(uintptr_t)(f))

static const probert_mode MODES[2] = {PROBERT_MODE_TRAP, PROBERT_MODE_AUTO};

/* ---- a checking pair of handlers -------------------------------------- */

/* Entry: the session keeps the stack pointer at entry (where the return
   address is). Return: RIP is that return address, RSP is 8 above it, RAX
   is expect(first argument); `rewrite` (if not 0) replaces RAX. */
struct spec {
  uint64_t (*expect)(uint64_t);
  _Atomic uint64_t entries, returns, bad;
  uint64_t rewrite;
};

static uint64_t last_arg;

static probert_action spec_entry(probert_hit *hit) {
  struct spec *s = hit->user_data;
  atomic_fetch_add(&s->entries, 1);
  if (hit->session == NULL || *hit->session != 0 || hit->is_return != 0) {
    atomic_fetch_add(&s->bad, 1);
    return PROBERT_CONTINUE;
  }
  *hit->session = probert_regs_get(hit->regs, PROBERT_REG_RSP);
  return PROBERT_CONTINUE;
}

static probert_action spec_return(probert_hit *hit) {
  struct spec *s = hit->user_data;
  atomic_fetch_add(&s->returns, 1);
  uint64_t sp = hit->session ? *hit->session : 0;
  uint64_t rip = probert_regs_get(hit->regs, PROBERT_REG_RIP);
  uint64_t rsp = probert_regs_get(hit->regs, PROBERT_REG_RSP);
  if (hit->is_return != 1 || sp == 0 || rsp != sp + 8 || rip != *(const uint64_t *)(uintptr_t)sp) {
    atomic_fetch_add(&s->bad, 1);
  }
  if (s->expect) {
    /* The argument is not in a register any more: the callers below pass
       it in a global for the check. */
    if (probert_regs_get(hit->regs, PROBERT_REG_RAX) != s->expect(last_arg)) {
      atomic_fetch_add(&s->bad, 1);
    }
  }
  if (s->rewrite) {
    CHECK_OK(probert_regs_set(hit->regs, PROBERT_REG_RAX, s->rewrite));
  }
  return PROBERT_CONTINUE;
}

static probert_consumer attach_spec(const void *f, struct spec *s, probert_mode mode) {
  probert_attach_opts o = {sizeof o, mode, spec_return};
  probert_consumer c = 0;
  CHECK_OK(probert_attach_ex(f, spec_entry, s, &o, &c));
  return c;
}

static probert_consumer_stats stats_of(probert_consumer c) {
  probert_consumer_stats st;
  memset(&st, 0xff, sizeof st);
  CHECK_OK(probert_consumer_get_stats(c, &st));
  return st;
}

NOINLINE uint64_t triple(uint64_t x) {
  __asm__ volatile("" ::: "memory");
  return x * 3;
}
static uint64_t triple_expect(uint64_t x) { return x * 3; }
static uint64_t (*volatile triple_p)(uint64_t) = triple;

static void t_rewrite_return_value(void) {
  for (int m = 0; m < 2; m++) {
    struct spec s = {.expect = triple_expect};
    probert_consumer c = attach_spec(FN_ADDR(triple), &s, MODES[m]);
    for (uint64_t x = 0; x < 100; x++) {
      last_arg = x;
      CHECK_EQ(triple_p(x), 3 * x);
    }
    s.rewrite = 4242;
    last_arg = 5;
    CHECK_EQ(triple_p(5), 4242);
    CHECK_EQ(atomic_load(&s.entries), 101);
    CHECK_EQ(atomic_load(&s.returns), 101);
    CHECK_EQ(atomic_load(&s.bad), 0);
    probert_consumer_stats st = stats_of(c);
    CHECK_EQ(st.hits, 101);
    CHECK_EQ(st.returns, 101);
    CHECK_EQ(st.abandoned, 0);
    CHECK_OK(probert_detach(c));
    CHECK_EQ(triple_p(5), 15);
    CHECK_EQ(atomic_load(&s.returns), 101);
  }
}

/* ---- abandoned: longjmp ------------------------------------------------ */

static jmp_buf env;

NOINLINE uint64_t jumper(uint64_t x) {
  __asm__ volatile("" ::: "memory");
  if (x & 1) {
    longjmp(env, 1);
  }
  return x + 1;
}
static uint64_t (*volatile jumper_p)(uint64_t) = jumper;

NOINLINE uint64_t nest_jumper(uint64_t x) {
  uint64_t r = jumper_p(x) * 2;
  __asm__ volatile("" ::: "memory");
  return r;
}
static uint64_t (*volatile nest_jumper_p)(uint64_t) = nest_jumper;

static struct spec js, ns;
static _Atomic uint64_t jumped;

static void *longjmp_workload(void *arg) {
  (void)arg;
  /* 200 calls: odd ones longjmp out of jumper (100 invocations), and, through
     nest_jumper, out of two probed functions at once. */
  for (volatile uint64_t i = 0; i < 100; i++) {
    if (setjmp(env) == 0) {
      CHECK_EQ(jumper_p(i), i + 1);
      CHECK((i & 1) == 0);
    } else {
      atomic_fetch_add(&jumped, 1);
    }
  }
  for (volatile uint64_t i = 0; i < 100; i++) {
    if (setjmp(env) == 0) {
      CHECK_EQ(nest_jumper_p(i), 2 * (i + 1));
      CHECK((i & 1) == 0);
    } else {
      atomic_fetch_add(&jumped, 1);
    }
  }
  return NULL;
}

static void t_longjmp_out_of_probed_functions(void) {
  for (int m = 0; m < 2; m++) {
    memset(&js, 0, sizeof js);
    memset(&ns, 0, sizeof ns);
    atomic_store(&jumped, 0);
    probert_consumer cj = attach_spec(FN_ADDR(jumper), &js, MODES[m]);
    probert_consumer cn = attach_spec(FN_ADDR(nest_jumper), &ns, MODES[m]);
    /* On a thread, so that its exit ends whatever is still pending. */
    pthread_t t;
    CHECK(pthread_create(&t, NULL, longjmp_workload, NULL) == 0);
    CHECK(pthread_join(t, NULL) == 0);
    CHECK_EQ(atomic_load(&jumped), 100);
    CHECK_OK(probert_sync());
    probert_consumer_stats j = stats_of(cj), n = stats_of(cn);
    CHECK_EQ(j.hits, 200);
    CHECK_EQ(j.returns, 100);
    CHECK_EQ(j.abandoned, 100);
    CHECK_EQ(n.hits, 100);
    CHECK_EQ(n.returns, 50);
    CHECK_EQ(n.abandoned, 50);
    CHECK_EQ(atomic_load(&js.returns), 100);
    CHECK_EQ(atomic_load(&ns.returns), 50);
    CHECK_EQ(atomic_load(&js.bad) + atomic_load(&ns.bad), 0);
    /* Same on the main thread, abandoned frames dropped as later entries
       show them over (no thread exit needed). */
    CHECK_OK(probert_detach(cj));
    CHECK_OK(probert_detach(cn));
  }
}

/* ---- abandoned: pthread_exit and cancellation ------------------------- */

static uint64_t (*volatile exiter_p)(uint64_t);
static uint64_t (*volatile blocker_p)(uint64_t);

NOINLINE uint64_t exiter(uint64_t depth) {
  if (depth == 0) {
    pthread_exit((void *)42);
  }
  uint64_t r = exiter_p(depth - 1) + 1;
  __asm__ volatile("" ::: "memory");
  return r;
}

static void *exit_thread(void *arg) {
  (void)arg;
  exiter_p = exiter;
  CHECK_EQ(triple_p(2), 6); /* one that returns */
  return (void *)(uintptr_t)exiter_p(4);
}

static atomic_int parked;

NOINLINE uint64_t blocker(uint64_t depth) {
  if (depth == 0) {
    atomic_store(&parked, 1);
    for (;;) {
      pause(); /* a cancellation point: cancellation unwinds from here */
    }
  }
  uint64_t r = blocker_p(depth - 1) + 1;
  __asm__ volatile("" ::: "memory");
  return r;
}

static void *cancel_thread(void *arg) {
  (void)arg;
  blocker_p = blocker;
  return (void *)(uintptr_t)blocker_p(3);
}

static void t_pthread_exit_and_cancel_abandon(void) {
  for (int m = 0; m < 2; m++) {
    struct spec es = {0}, bs = {0}, ts = {0};
    probert_consumer ce = attach_spec(FN_ADDR(exiter), &es, MODES[m]);
    probert_consumer cb = attach_spec(FN_ADDR(blocker), &bs, MODES[m]);
    probert_consumer ct = attach_spec(FN_ADDR(triple), &ts, MODES[m]);
    pthread_t t;
    void *ret = NULL;
    for (int k = 0; k < 10; k++) {
      CHECK(pthread_create(&t, NULL, exit_thread, NULL) == 0);
      CHECK(pthread_join(t, &ret) == 0);
      CHECK(ret == (void *)42);
    }
    atomic_store(&parked, 0);
    CHECK(pthread_create(&t, NULL, cancel_thread, NULL) == 0);
    while (!atomic_load(&parked)) {
      usleep(1000);
    }
    CHECK(pthread_cancel(t) == 0);
    CHECK(pthread_join(t, &ret) == 0);
    CHECK(ret == PTHREAD_CANCELED);
    CHECK_OK(probert_sync());
    probert_consumer_stats e = stats_of(ce), b = stats_of(cb), tr = stats_of(ct);
    CHECK_EQ(e.hits, 50);
    CHECK_EQ(e.returns, 0);
    CHECK_EQ(e.abandoned, 50);
    CHECK_EQ(b.hits, 4);
    CHECK_EQ(b.returns, 0);
    CHECK_EQ(b.abandoned, 4);
    CHECK_EQ(tr.hits, 10);
    CHECK_EQ(tr.returns, 10);
    CHECK_EQ(tr.abandoned, 0);
    CHECK_EQ(atomic_load(&es.returns) + atomic_load(&bs.returns), 0);
    CHECK_OK(probert_detach(ce));
    CHECK_OK(probert_detach(cb));
    CHECK_OK(probert_detach(ct));
  }
  /* Nothing leaked: thousands of threads exiting with returns pending. */
  struct spec es = {0};
  probert_consumer ce = attach_spec(FN_ADDR(exiter), &es, PROBERT_MODE_AUTO);
  for (int k = 0; k < 5000; k++) {
    pthread_t t;
    CHECK(pthread_create(&t, NULL, exit_thread, NULL) == 0);
    CHECK(pthread_join(t, NULL) == 0);
    if (k % 500 == 0) {
      CHECK_OK(probert_sync());
    }
  }
  CHECK_OK(probert_sync());
  probert_consumer_stats e = stats_of(ce);
  CHECK_EQ(e.hits, 25000);
  CHECK_EQ(e.abandoned, 25000);
  CHECK_OK(probert_detach(ce));
}

/* ---- the program cannot tell ------------------------------------------ */

#define FRAMES 8
struct seen {
  void *bt[FRAMES];
  int n;
  void *ret0;
  void *next_malloc;
};

NOINLINE void look(struct seen *s) {
  s->n = backtrace(s->bt, FRAMES);
  s->next_malloc = dlsym(RTLD_NEXT, "malloc");
  __asm__ volatile("" ::: "memory");
}

NOINLINE void looker(struct seen *s) {
  s->ret0 = __builtin_return_address(0);
  look(s);
  __asm__ volatile("" ::: "memory");
}
static void (*volatile looker_p)(struct seen *) = looker;

NOINLINE void outer_looker(struct seen *s) {
  looker_p(s);
  __asm__ volatile("" ::: "memory");
}
static void (*volatile outer_looker_p)(struct seen *) = outer_looker;

/* One call site for every pass (the compiler may duplicate the loop's). */
NOINLINE void capture(struct seen *s) {
  outer_looker_p(s);
  __asm__ volatile("" ::: "memory");
}

/* Frames compared: look, looker, outer_looker, capture (the rest are in
   code the compiler may duplicate). */
#define SAME_FRAMES 4

static void t_unwinders_and_rtld_next_see_nothing(void) {
  struct seen want, got;
  void *(*volatile dlsym_p)(void *, const char *) = dlsym;
  void *want_free = NULL;
  /* Pass 0 unprobed, then trap and default mode: the same call sites, so
     the same addresses. */
  for (int pass = 0; pass < 3; pass++) {
    struct spec a = {0}, b = {0}, c = {0}, d = {0};
    probert_consumer ids[4] = {0, 0, 0, 0};
    size_t n = 0;
    if (pass > 0) {
      ids[n++] = attach_spec(FN_ADDR(look), &a, MODES[pass - 1]);
      ids[n++] = attach_spec(FN_ADDR(looker), &b, MODES[pass - 1]);
      ids[n++] = attach_spec(FN_ADDR(outer_looker), &c, MODES[pass - 1]);
      /* dlsym itself, where it takes a return probe: RTLD_NEXT reads its
         caller's return address. (glibc 2.36's does not: an indirect
         jump probert cannot follow.) */
      probert_attach_opts o = {sizeof o, MODES[pass - 1], spec_return};
      probert_status st = probert_attach_ex(FN_ADDR(dlsym_p), spec_entry, &d, &o, &ids[n]);
      CHECK(st == PROBERT_OK || st == PROBERT_ERR_UNSUPPORTED_INSN);
      n += st == PROBERT_OK;
    }
    struct seen *s = pass == 0 ? &want : &got;
    memset(s, 0, sizeof *s);
    capture(s);
    void *next_free = dlsym_p(RTLD_NEXT, "free");
    if (pass == 0) {
      CHECK(want.n >= SAME_FRAMES + 1);
      CHECK(want.next_malloc != NULL);
      CHECK(next_free != NULL);
      want_free = next_free;
      continue;
    }
    CHECK_EQ(got.n, want.n);
    for (int i = 0; i < SAME_FRAMES; i++) {
      if (got.bt[i] != want.bt[i]) {
        fprintf(stderr, "frame %d of %d differs\n", i, want.n);
        backtrace_symbols_fd(&got.bt[i], 1, 2);
        backtrace_symbols_fd(&want.bt[i], 1, 2);
      }
      CHECK_EQ((uintptr_t)got.bt[i], (uintptr_t)want.bt[i]);
    }
    CHECK_EQ((uintptr_t)got.ret0, (uintptr_t)want.ret0);
    CHECK_EQ((uintptr_t)got.next_malloc, (uintptr_t)want.next_malloc);
    CHECK_EQ((uintptr_t)next_free, (uintptr_t)want_free);
    struct spec *all[4] = {&a, &b, &c, &d};
    for (size_t i = 0; i < n; i++) {
      CHECK(atomic_load(&all[i]->entries) >= 1);
      CHECK_EQ(atomic_load(&all[i]->returns), atomic_load(&all[i]->entries));
      CHECK_EQ(atomic_load(&all[i]->bad), 0);
    }
    CHECK_OK(probert_detach_batch(ids, n));
  }
}

/* ---- NO_RETURN, batch_ex, threads ------------------------------------- */

static _Atomic uint64_t nr_entries, nr_returns;

static probert_action odd_no_return(probert_hit *hit) {
  atomic_fetch_add(&nr_entries, 1);
  return (probert_regs_arg(hit->regs, 0) & 1) ? PROBERT_NO_RETURN : PROBERT_CONTINUE;
}

static probert_action even_return(probert_hit *hit) {
  atomic_fetch_add(&nr_returns, 1);
  if (probert_regs_get(hit->regs, PROBERT_REG_RAX) % 2 != 0) {
    atomic_fetch_add(&nr_returns, 1u << 20);
  }
  return PROBERT_CONTINUE;
}

NOINLINE uint64_t twice(uint64_t x) {
  __asm__ volatile("" ::: "memory");
  return 2 * x;
}
static uint64_t (*volatile twice_p)(uint64_t) = twice;

static void t_no_return_and_batch_ex(void) {
  probert_attach_req reqs[2] = {{FN_ADDR(triple), odd_no_return, NULL},
                                {FN_ADDR(twice), odd_no_return, NULL}};
  probert_attach_opts o = {sizeof o, PROBERT_MODE_AUTO, even_return};
  probert_consumer cs[2] = {0, 0};
  size_t err = 99;
  CHECK_OK(probert_attach_batch_ex(reqs, 2, &o, cs, &err));
  for (uint64_t x = 0; x < 100; x++) {
    CHECK_EQ(triple_p(2 * x), 6 * x);  /* even: returns */
    CHECK_EQ(twice_p(2 * x + 1), 4 * x + 2); /* odd: NO_RETURN */
  }
  CHECK_EQ(atomic_load(&nr_entries), 200);
  CHECK_EQ(atomic_load(&nr_returns), 100);
  probert_consumer_stats a = stats_of(cs[0]), b = stats_of(cs[1]);
  CHECK_EQ(a.hits, 100);
  CHECK_EQ(a.returns, 100);
  CHECK_EQ(b.hits, 100);
  CHECK_EQ(b.returns, 0);
  CHECK_EQ(a.abandoned + b.abandoned, 0);
  CHECK_OK(probert_detach_batch(cs, 2));
  /* A return handler on an address inside a function: misaligned. */
  probert_consumer c = 0;
  CHECK_STATUS(probert_attach_ex((const char *)FN_ADDR(triple) + 1, odd_no_return, NULL, &o, &c),
               PROBERT_ERR_MISALIGNED);
  CHECK_EQ(c, 0);
}

#define THREADS 4
#define CALLS 20000

static void *call_triple(void *arg) {
  uintptr_t base = (uintptr_t)arg;
  for (uint64_t i = 0; i < CALLS; i++) {
    CHECK_EQ(triple_p(base + i), 3 * (base + i));
    CHECK_EQ(twice_p(base + i), 2 * (base + i));
  }
  return NULL;
}

static void t_threads_pair_exactly(void) {
  for (int m = 0; m < 2; m++) {
    struct spec a = {0}, b = {0};
    probert_consumer ca = attach_spec(FN_ADDR(triple), &a, MODES[m]);
    probert_consumer cb = attach_spec(FN_ADDR(twice), &b, MODES[m]);
    pthread_t t[THREADS];
    for (uintptr_t i = 0; i < THREADS; i++) {
      CHECK(pthread_create(&t[i], NULL, call_triple, (void *)(i * 1000000)) == 0);
    }
    for (int i = 0; i < THREADS; i++) {
      CHECK(pthread_join(t[i], NULL) == 0);
    }
    uint64_t n = (uint64_t)THREADS * CALLS;
    CHECK_EQ(atomic_load(&a.entries), n);
    CHECK_EQ(atomic_load(&a.returns), n);
    CHECK_EQ(atomic_load(&b.entries), n);
    CHECK_EQ(atomic_load(&b.returns), n);
    CHECK_EQ(atomic_load(&a.bad) + atomic_load(&b.bad), 0);
    probert_consumer_stats sa = stats_of(ca);
    CHECK_EQ(sa.returns, n);
    CHECK_EQ(sa.abandoned, 0);
    CHECK_OK(probert_detach(ca));
    CHECK_OK(probert_detach(cb));
  }
}

int main(int argc, char **argv) {
  static const struct test_case tests[] = {
      {"rewrite_return_value", t_rewrite_return_value},
      {"longjmp_out_of_probed_functions", t_longjmp_out_of_probed_functions},
      {"pthread_exit_and_cancel_abandon", t_pthread_exit_and_cancel_abandon},
      {"unwinders_and_rtld_next_see_nothing", t_unwinders_and_rtld_next_see_nothing},
      {"no_return_and_batch_ex", t_no_return_and_batch_ex},
      {"threads_pair_exactly", t_threads_pair_exactly},
  };
  return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}
