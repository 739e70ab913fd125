/*
 * funclat: per-function call counts and latency (p50, p99, max) with a log2
 * histogram, through return probes, on SQLite's public API functions: the
 * system's libsqlite3 is loaded with dlopen (no headers needed) and runs an
 * in-memory workload of prepared statements.
 *
 * The handlers are async-signal-safe: the entry stores clock_gettime
 * (vDSO) in the invocation's session word, the return adds the elapsed time
 * to preallocated per-function atomic counters and log2 buckets. Checks its
 * own results: output identical to the unprobed run, counts that add up.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "probert.h"

#define CHECK(c)                                                        \
  do {                                                                  \
    if (!(c)) {                                                         \
      fprintf(stderr, "funclat: %s:%d: %s\n", __FILE__, __LINE__, #c); \
      exit(1);                                                          \
    }                                                                   \
  } while (0)

static const char *const NAMES[] = {
    "sqlite3_open",        "sqlite3_close",        "sqlite3_exec",        "sqlite3_prepare_v2",
    "sqlite3_step",        "sqlite3_reset",        "sqlite3_finalize",    "sqlite3_bind_int",
    "sqlite3_bind_text",   "sqlite3_column_int64", "sqlite3_column_text", "sqlite3_clear_bindings",
    "sqlite3_malloc",      "sqlite3_free",         "sqlite3_mprintf",     "sqlite3_changes",
};
#define N (sizeof NAMES / sizeof NAMES[0])

struct lat {
  const char *name;
  _Atomic uint64_t calls, returns, sum_ns, max_ns;
  _Atomic uint64_t buckets[64]; /* [2^(b-1), 2^b) ns */
};
static struct lat lats[N];

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static probert_action on_entry(probert_hit *hit) {
  struct lat *l = hit->user_data;
  atomic_fetch_add_explicit(&l->calls, 1, memory_order_relaxed);
  *hit->session = now_ns();
  return PROBERT_CONTINUE;
}

static probert_action on_return(probert_hit *hit) {
  uint64_t dt = now_ns() - *hit->session;
  struct lat *l = hit->user_data;
  atomic_fetch_add_explicit(&l->returns, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&l->sum_ns, dt, memory_order_relaxed);
  uint64_t m = atomic_load_explicit(&l->max_ns, memory_order_relaxed);
  while (dt > m && !atomic_compare_exchange_weak(&l->max_ns, &m, dt)) {
  }
  unsigned b = dt ? 64 - (unsigned)__builtin_clzll(dt) : 0;
  atomic_fetch_add_explicit(&l->buckets[b > 63 ? 63 : b], 1, memory_order_relaxed);
  return PROBERT_CONTINUE;
}

/* Upper bound of the log2 bucket holding quantile q (permille). */
static uint64_t quantile(struct lat *l, uint64_t permille) {
  uint64_t n = atomic_load(&l->returns), want = (n * permille + 999) / 1000, seen = 0;
  if (want == 0) {
    want = 1;
  }
  for (unsigned b = 0; b < 64; b++) {
    seen += atomic_load(&l->buckets[b]);
    if (seen >= want) {
      return b == 0 ? 0 : (UINT64_C(1) << b) - 1;
    }
  }
  return atomic_load(&l->max_ns);
}

/* ---- SQLite, by dlsym -------------------------------------------------- */

typedef struct sqlite3 sqlite3;
typedef struct sqlite3_stmt sqlite3_stmt;
static struct {
  int (*open)(const char *, sqlite3 **);
  int (*close)(sqlite3 *);
  int (*exec)(sqlite3 *, const char *, void *, void *, char **);
  int (*prepare_v2)(sqlite3 *, const char *, int, sqlite3_stmt **, const char **);
  int (*step)(sqlite3_stmt *);
  int (*reset)(sqlite3_stmt *);
  int (*finalize)(sqlite3_stmt *);
  int (*bind_int)(sqlite3_stmt *, int, int);
  int (*bind_text)(sqlite3_stmt *, int, const char *, int, void (*)(void *));
  int64_t (*column_int64)(sqlite3_stmt *, int);
  const unsigned char *(*column_text)(sqlite3_stmt *, int);
  int (*clear_bindings)(sqlite3_stmt *);
  void *(*malloc)(int);
  void (*free)(void *);
  char *(*mprintf)(const char *, ...);
  int (*changes)(sqlite3 *);
} sq;
static void *addrs[N];

#define SQLITE_ROW 100
#define SQLITE_DONE 101
#define SQLITE_TRANSIENT ((void (*)(void *)) - 1)

/* Inserts 3000 rows with bound parameters, queries them back; returns a
   digest of what the queries returned. */
static uint64_t workload(void) {
  sqlite3 *db = NULL;
  CHECK(sq.open(":memory:", &db) == 0);
  CHECK(sq.exec(db, "CREATE TABLE t(a INTEGER, b TEXT); BEGIN", NULL, NULL, NULL) == 0);
  sqlite3_stmt *ins = NULL, *sel = NULL;
  CHECK(sq.prepare_v2(db, "INSERT INTO t VALUES (?1, ?2)", -1, &ins, NULL) == 0);
  for (int i = 0; i < 3000; i++) {
    char *text = sq.mprintf("row %d", i * 7 % 100);
    CHECK(sq.bind_int(ins, 1, i) == 0);
    CHECK(sq.bind_text(ins, 2, text, -1, SQLITE_TRANSIENT) == 0);
    CHECK(sq.step(ins) == SQLITE_DONE);
    CHECK(sq.changes(db) == 1);
    CHECK(sq.reset(ins) == 0);
    CHECK(sq.clear_bindings(ins) == 0);
    sq.free(text);
  }
  CHECK(sq.finalize(ins) == 0);
  CHECK(sq.exec(db, "COMMIT", NULL, NULL, NULL) == 0);
  CHECK(sq.prepare_v2(db, "SELECT a, b FROM t WHERE b = ?1 ORDER BY a", -1, &sel, NULL) == 0);
  uint64_t digest = 0;
  for (int k = 0; k < 100; k++) {
    char key[16];
    snprintf(key, sizeof key, "row %d", k);
    CHECK(sq.bind_text(sel, 1, key, -1, SQLITE_TRANSIENT) == 0);
    while (sq.step(sel) == SQLITE_ROW) {
      digest = digest * 31 + (uint64_t)sq.column_int64(sel, 0) + strlen((const char *)sq.column_text(sel, 1));
    }
    CHECK(sq.reset(sel) == 0);
  }
  CHECK(sq.finalize(sel) == 0);
  void *p = sq.malloc(100);
  CHECK(p != NULL);
  sq.free(p);
  CHECK(sq.close(db) == 0);
  return digest;
}

int main(void) {
  void *h = dlopen("libsqlite3.so.0", RTLD_NOW | RTLD_LOCAL);
  if (h == NULL) {
    printf("funclat: no libsqlite3.so.0 on this system; nothing to do\n");
    return 0;
  }
  for (size_t i = 0; i < N; i++) {
    addrs[i] = dlsym(h, NAMES[i]);
    CHECK(addrs[i] != NULL);
    lats[i].name = NAMES[i];
  }
  /* The struct's members are in NAMES order. */
  memcpy(&sq, addrs, sizeof sq);
  uint64_t want = workload();

  probert_attach_req reqs[N];
  probert_consumer cs[N];
  size_t n = 0;
  probert_attach_opts o = {sizeof o, PROBERT_MODE_AUTO, on_return};
  for (size_t i = 0; i < N; i++) {
    reqs[0] = (probert_attach_req){addrs[i], on_entry, &lats[i]};
    /* One at a time: a function whose exits probert cannot all find is
       refused, and skipped. */
    if (probert_attach_batch_ex(reqs, 1, &o, &cs[n], NULL) == PROBERT_OK) {
      n++;
    } else {
      lats[i].name = NULL;
    }
  }
  CHECK(n >= N / 2);
  uint64_t got = workload();
  CHECK(got == want);
  CHECK(probert_sync() == PROBERT_OK);
  uint64_t calls = 0, returns = 0, abandoned = 0;
  size_t k = 0;
  for (size_t i = 0; i < N; i++) {
    if (lats[i].name == NULL) {
      continue;
    }
    probert_consumer_stats st;
    CHECK(probert_consumer_get_stats(cs[k++], &st) == PROBERT_OK);
    CHECK(st.hits == atomic_load(&lats[i].calls));
    CHECK(st.returns == atomic_load(&lats[i].returns));
    CHECK(st.hits == st.returns + st.abandoned);
    uint64_t in_buckets = 0;
    for (int b = 0; b < 64; b++) {
      in_buckets += atomic_load(&lats[i].buckets[b]);
    }
    CHECK(in_buckets == st.returns);
    calls += st.hits;
    returns += st.returns;
    abandoned += st.abandoned;
  }
  CHECK(probert_detach_batch(cs, n) == PROBERT_OK);
  CHECK(abandoned == 0);
  CHECK(calls > 10000);

  printf("funclat: %zu of %zu SQLite API functions probed (entry + return); %llu calls, "
         "%llu returns; result identical to unprobed\n\n",
         n, N, (unsigned long long)calls, (unsigned long long)returns);
  printf("%-24s %9s %11s %9s %9s %10s\n", "function", "calls", "total us", "p50 ns", "p99 ns",
         "max ns");
  size_t most = 0;
  for (size_t i = 0; i < N; i++) {
    struct lat *l = &lats[i];
    if (l->name == NULL || atomic_load(&l->returns) == 0) {
      continue;
    }
    if (atomic_load(&l->calls) > atomic_load(&lats[most].calls)) {
      most = i;
    }
    printf("%-24s %9llu %11llu %9llu %9llu %10llu\n", l->name,
           (unsigned long long)atomic_load(&l->calls),
           (unsigned long long)(atomic_load(&l->sum_ns) / 1000),
           (unsigned long long)quantile(l, 500), (unsigned long long)quantile(l, 990),
           (unsigned long long)atomic_load(&l->max_ns));
  }
  struct lat *l = &lats[most];
  uint64_t top = 1;
  int lo = 64, hi = -1;
  for (int b = 0; b < 64; b++) {
    uint64_t c = atomic_load(&l->buckets[b]);
    if (c > 0) {
      lo = b < lo ? b : lo;
      hi = b;
      top = c > top ? c : top;
    }
  }
  printf("\nlatency of %s (log2 buckets, %llu calls):\n", l->name,
         (unsigned long long)atomic_load(&l->calls));
  for (int b = lo; b <= hi; b++) {
    uint64_t c = atomic_load(&l->buckets[b]);
    printf("    %10llu ns .. | %8llu ", b ? 1ull << (b - 1) : 0ull, (unsigned long long)c);
    for (uint64_t j = 0; j < (c * 40 + top - 1) / top; j++) {
      putchar('#');
    }
    putchar('\n');
  }
  return 0;
}
