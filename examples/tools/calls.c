/* An example probert tool in C: counts the calls of every matched function
   and reports the busiest one. Build (no -lprobert: the agent holds probert):
     cc -shared -fPIC -O2 -Wall -Wextra -Werror -Iinclude examples/tools/calls.c -o calls.so
   Run:
     probert trace --tool ./calls.so -p 'libc.so.6:str*' -- ls */
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

#include "probert_tool.h"

struct site {
  atomic_ulong hits;
  const char *name;
  const probert_tool_host *host;
  int entry; /* at a function's entry: the caller can be told */
};

/* Whether the host table is new enough to have `is_agent_call`. */
static int has_agent_call(const probert_tool_host *host) {
  return host->size >= offsetof(probert_tool_host, is_agent_call) + sizeof host->is_agent_call;
}

struct state {
  const probert_tool_host *host;
  probert_tool_ctx *ctx;
  struct site *sites;
  size_t n, cap;
};

/* A handler: async-signal-safe (one atomic add). */
static probert_action on_hit(probert_hit *hit) {
  struct site *s = hit->user_data;
  /* The agent's own calls (its thread, or its code calling the function)
     are not the program's. */
  int agents = s->entry && has_agent_call(s->host) ? s->host->is_agent_call(hit->regs)
                                                   : s->host->is_agent_thread();
  if (!agents) atomic_fetch_add_explicit(&s->hits, 1, memory_order_relaxed);
  return PROBERT_CONTINUE;
}

static void *start(const probert_tool_host *host, probert_tool_ctx *ctx, const char *args) {
  (void)args;
  if (host->abi != PROBERT_TOOL_ABI) return NULL;
  struct state *st = calloc(1, sizeof *st);
  if (!st) return NULL;
  st->host = host;
  st->ctx = ctx;
  st->cap = 4096; /* sites are never moved: handlers hold pointers to them */
  st->sites = calloc(st->cap, sizeof *st->sites);
  if (!st->sites) {
    free(st);
    return NULL;
  }
  return st;
}

static int attach(void *state, const probert_tool_match *m, size_t n) {
  struct state *st = state;
  int failed = 0;
  for (size_t i = 0; i < n && st->n < st->cap; i++) {
    struct site *s = &st->sites[st->n];
    s->name = m[i].symbol ? m[i].symbol : "?";
    s->host = st->host;
    s->entry = m[i].is_entry != 0;
    probert_consumer c;
    if (st->host->attach_ex((const void *)m[i].addr, on_hit, s, NULL, &c) == PROBERT_OK)
      st->n++;
    else
      failed++;
  }
  return failed;
}

static void report(void *state, int final) {
  struct state *st = state;
  unsigned long total = 0, best = 0;
  const char *best_name = "none";
  for (size_t i = 0; i < st->n; i++) {
    unsigned long h = atomic_load_explicit(&st->sites[i].hits, memory_order_relaxed);
    total += h;
    if (h > best) {
      best = h;
      best_name = st->sites[i].name;
    }
  }
  char line[512];
  if (st->host->json)
    snprintf(line, sizeof line, "{\"sites\":%zu,\"calls\":%lu,\"busiest\":\"%s\",\"final\":%d}", st->n,
             total, best_name, final);
  else
    snprintf(line, sizeof line, "calls.so: %lu calls over %zu sites; busiest %s (%lu)\n", total, st->n,
             best_name, best);
  st->host->print(st->ctx, line);
}

static void forked(void *state) {
  struct state *st = state;
  for (size_t i = 0; i < st->n; i++) atomic_store(&st->sites[i].hits, 0);
}

static const probert_tool TOOL = {PROBERT_TOOL_ABI, "calls", start, attach, NULL, report, forked};

const probert_tool *probert_tool_v1(void) { return &TOOL; }
