/*
 * Return probes and C++ exceptions: an exception thrown through probed
 * functions and caught outside unwinds exactly as without the probes (the
 * unwinder reads the real return addresses), backtrace() and
 * __builtin_return_address(0) inside see what they see unprobed, the
 * invocations left count as abandoned, and one caught inside a probed
 * function still returns normally.
 */
#include <execinfo.h>
#include <pthread.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "harness.h"
#include "probert.h"

#define NOINLINE __attribute__((noinline, noclone, used))

namespace {

std::atomic<uint64_t> entries{0}, returns{0};

probert_action on_entry(probert_hit *hit) {
  entries++;
  *hit->session = probert_regs_get(hit->regs, PROBERT_REG_RSP);
  return PROBERT_CONTINUE;
}

probert_action on_return(probert_hit *hit) {
  returns++;
  uint64_t sp = *hit->session;
  if (probert_regs_get(hit->regs, PROBERT_REG_RSP) != sp + 8 ||
      probert_regs_get(hit->regs, PROBERT_REG_RIP) != *reinterpret_cast<const uint64_t *>(sp)) {
    returns += 1u << 20;
  }
  return PROBERT_CONTINUE;
}

constexpr int FRAMES = 10;
/* Frames compared: thrower, middle, throw_through (the callers' may be
   duplicated by the compiler). */
constexpr int SAME_FRAMES = 3;
struct seen {
  void *bt[FRAMES];
  int n;
  void *ret0;
};
seen look;

}  // namespace

extern "C" {
NOINLINE int thrower(int x) {
  look.ret0 = __builtin_return_address(0);
  look.n = backtrace(look.bt, FRAMES);
  if (x > 0) {
    throw std::runtime_error("through the probes");
  }
  return 1;
}

NOINLINE int middle(int x) {
  int r = thrower(x) + 1;
  __asm__ volatile("" ::: "memory");
  return r;
}

NOINLINE int catcher(int x) {
  try {
    return middle(x);
  } catch (const std::runtime_error &) {
    return -1;
  }
}
}

namespace {

int (*volatile middle_p)(int) = middle;
int (*volatile catcher_p)(int) = catcher;

/* Throws through middle and thrower; returns what backtrace saw. */
NOINLINE seen throw_through() {
  memset(&look, 0, sizeof look);
  try {
    middle_p(1);
    CHECK(!"not reached");
  } catch (const std::runtime_error &e) {
    CHECK(strcmp(e.what(), "through the probes") == 0);
  }
  return look;
}

void *thread_body(void *) {
  for (int i = 0; i < 100; i++) {
    throw_through();
    CHECK(catcher_p(1) == -1);
    CHECK_EQ(catcher_p(0), 2);
  }
  return nullptr;
}

void t_exceptions_through_probed_functions() {
  seen want{};
  const probert_mode modes[2] = {PROBERT_MODE_TRAP, PROBERT_MODE_AUTO};
  /* Pass 0 unprobed, then trap and default mode: the same call sites, so
     the same addresses. */
  for (int pass = 0; pass < 3; pass++) {
    probert_consumer cs[3] = {0, 0, 0};
    if (pass > 0) {
      entries = 0;
      returns = 0;
      probert_attach_opts o = {sizeof o, modes[pass - 1], on_return};
      probert_attach_req reqs[3] = {{reinterpret_cast<const void *>(thrower), on_entry, nullptr},
                                    {reinterpret_cast<const void *>(middle), on_entry, nullptr},
                                    {reinterpret_cast<const void *>(catcher), on_entry, nullptr}};
      CHECK_OK(probert_attach_batch_ex(reqs, 3, &o, cs, nullptr));
    }
    const seen got = throw_through();
    if (pass == 0) {
      want = got;
      CHECK(want.n >= SAME_FRAMES + 1);
      continue;
    }
    CHECK_EQ(got.n, want.n);
    for (int i = 0; i < SAME_FRAMES; i++) {
      if (got.bt[i] != want.bt[i]) {
        fprintf(stderr, "frame %d of %d differs\n", i, want.n);
        backtrace_symbols_fd(&got.bt[i], 1, 2);
        backtrace_symbols_fd(&want.bt[i], 1, 2);
      }
      CHECK_EQ(reinterpret_cast<uintptr_t>(got.bt[i]), reinterpret_cast<uintptr_t>(want.bt[i]));
    }
    CHECK_EQ(reinterpret_cast<uintptr_t>(got.ret0), reinterpret_cast<uintptr_t>(want.ret0));
    CHECK_EQ(entries.load(), 2);
    CHECK_EQ(returns.load(), 0);
    /* On a thread, whose exit ends what is left pending. Per iteration:
       throw_through: middle, thrower abandoned; catcher(1): catcher returns,
       middle and thrower abandoned; catcher(0): three returns. */
    pthread_t t;
    CHECK(pthread_create(&t, nullptr, thread_body, nullptr) == 0);
    CHECK(pthread_join(t, nullptr) == 0);
    CHECK_OK(probert_sync());
    probert_consumer_stats st[3];
    for (int i = 0; i < 3; i++) {
      CHECK_OK(probert_consumer_get_stats(cs[i], &st[i]));
      /* The main thread's throw above left thrower and middle pending:
         no later entry or return on that thread has shown them over yet. */
      CHECK_EQ(st[i].hits, st[i].returns + st[i].abandoned + (i < 2 ? 1 : 0));
    }
    /* thrower */
    CHECK_EQ(st[0].hits, 301);
    CHECK_EQ(st[0].returns, 100);
    CHECK_EQ(st[0].abandoned, 200);
    /* middle */
    CHECK_EQ(st[1].hits, 301);
    CHECK_EQ(st[1].returns, 100);
    CHECK_EQ(st[1].abandoned, 200);
    /* catcher: it catches, and returns normally */
    CHECK_EQ(st[2].hits, 200);
    CHECK_EQ(st[2].returns, 200);
    CHECK_EQ(st[2].abandoned, 0);
    CHECK_EQ(returns.load(), 400);
    CHECK_OK(probert_detach_batch(cs, 3));
  }
}

}  // namespace

int main(int argc, char **argv) {
  static const test_case tests[] = {
      {"exceptions_through_probed_functions", t_exceptions_through_probed_functions},
  };
  return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}
