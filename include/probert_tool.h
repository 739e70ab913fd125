/*
 * probert_tool.h — the plug-in ABI of the `probert` command (ABI version 1).
 *
 * A tool is a shared object that `probert trace --tool PATH.so[=ARGS]` loads
 * into the traced program, next to probert's agent. It exports one function,
 *
 *     const probert_tool *probert_tool_v1(void);
 *
 * which returns a static description of the tool. The agent calls it once per
 * process, then:
 *   1. start(host, ctx, args)  — normal context, before main: the tool makes
 *      its state (returned; NULL refuses, after printing why with host->print);
 *   2. attach(state, matches, n) — normal context, once with the matches of
 *      the -p specs in the modules loaded at start, and once more for every
 *      module loaded later with dlopen: the tool attaches its own consumers
 *      through the libprobert entry points in `host`;
 *   3. event(state, rec, len)  — on the agent's drain thread, for every
 *      record the tool's handlers passed to host->emit;
 *   4. report(state, final)    — every --interval and at exit (final = 1):
 *      the tool prints its report with host->print (text, or with
 *      host->json set one JSON value per report call);
 *   5. forked(state)           — in the child of a fork followed with -f: the
 *      child reports on its own from there, so forget what the parent saw.
 * Any function pointer may be NULL except start.
 *
 * Handlers run in signal context (see probert.h): they may call only
 * host->emit, host->now_ns, host->is_agent_thread, host->is_agent_call and
 * the libprobert functions marked async-signal-safe (probert_regs_*). They
 * never allocate, lock or print.
 *
 * A tool is built without -lprobert: the agent already contains probert, and
 * a second copy would install a second SIGTRAP handler. Build with e.g.
 *     cc -shared -fPIC -Iinclude tool.c -o tool.so
 */
#ifndef PROBERT_TOOL_H
#define PROBERT_TOOL_H

#include <stddef.h>
#include <stdint.h>

#include "probert.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PROBERT_TOOL_ABI 1

/* The context of one tool in one process; opaque. */
typedef struct probert_tool_ctx probert_tool_ctx;

/* One address a -p spec matched. Its strings live as long as the process. */
typedef struct probert_tool_match {
  uint32_t    id;          /* dense from 0 in this process, for the tool's tables */
  uint32_t    spec_index;  /* which -p spec (0-based) */
  const char *spec;        /* that spec, as given */
  const char *module;      /* the path of the module holding addr */
  const char *symbol;      /* the function's name, or NULL for a bare address */
  uintptr_t   addr;        /* the address to probe */
  uintptr_t   func_start;  /* the enclosing function, [func_start, func_end); 0 when unknown */
  uintptr_t   func_end;
  uintptr_t   module_base; /* the module's load bias (addr - module_base: its ELF address) */
  uint32_t    is_entry;    /* addr is func_start: return probes may be attached */
} probert_tool_match;

typedef struct probert_tool_host {
  size_t      size;        /* sizeof(probert_tool_host): lets the table grow */
  uint32_t    abi;         /* PROBERT_TOOL_ABI */
  uint32_t    json;        /* 1: print JSON values in report() (--json) */
  /* ---- libprobert (the entry points of probert.h) ---- */
  probert_status (*attach_ex)(const void *addr, probert_handler handler, void *user_data,
                              const probert_attach_opts *opts, probert_consumer *out);
  probert_status (*attach_batch_ex)(const probert_attach_req *reqs, size_t n,
                                    const probert_attach_opts *opts, probert_consumer *out,
                                    size_t *err_index);
  probert_status (*detach)(probert_consumer c);
  probert_status (*consumer_get_stats)(probert_consumer c, probert_consumer_stats *out);
  probert_status (*symbol_addr)(const char *module, const char *symbol, const void **out);
  uint64_t (*regs_get)(const probert_regs *regs, probert_reg reg); /* async-signal-safe */
  uint64_t (*regs_arg)(const probert_regs *regs, unsigned n);      /* async-signal-safe */
  /* ---- from handlers (async-signal-safe) ---- */
  /* Queues a record of len <= 256 bytes for the tool's event(); through a
     buffer of the calling thread. 0, or -1 when it was dropped (buffer full,
     too long, too many threads); drops are counted and reported. */
  int (*emit)(probert_tool_ctx *ctx, const void *rec, size_t len);
  /* CLOCK_MONOTONIC in nanoseconds. */
  uint64_t (*now_ns)(void);
  /* 1 on a thread of the agent itself (its drain thread, or a thread while
     the agent attaches or reports): handlers should ignore such hits. */
  int (*is_agent_thread)(void);
  /* ---- normal context ---- */
  /* Appends text to this report of the tool (report(), or start() to say
     why it refuses). */
  void (*print)(probert_tool_ctx *ctx, const char *text);
  /* Writes `len` bytes to `path` relative to the command's directory
     (for a tool's own output file); 0 or -1. */
  int (*write_file)(probert_tool_ctx *ctx, const char *path, const void *data, size_t len);
  /* ---- since probert 0.2.1: present when size reaches them ---- */
  /* The message of the calling thread's last failed attach_ex /
     attach_batch_ex / detach through this table ("" when none); valid
     until that thread's next call. Normal context. */
  const char *(*last_error)(void);
  /* Says that the tool could not attach at match m, and why: the report
     shows a "not attached" line for it (and --json a "not_attached" entry).
     Normal context (attach). */
  void (*not_attached)(probert_tool_ctx *ctx, const probert_tool_match *m, const char *reason);
  /* A zeroed 64-bit counter for match m, in memory the command reads itself:
     if the process ends without a report (killed by a signal, _exit, exec
     without -f) the command still reports its value, as column `what` (e.g.
     "hits") of the tool's table. Handlers add to it atomically (it is 8-byte
     aligned). NULL when no counter is left. Normal context (attach); a
     forked child gets its own copies, with the parent's values. */
  uint64_t *(*shared_counter)(probert_tool_ctx *ctx, const probert_tool_match *m, const char *what);
  /* For a hit at a function's entry (a match with is_entry), from its
     handler: 1 if the function was called from the agent's own code (its
     runtime allocates at a thread's exit, say) or on a thread of the
     agent's — is_agent_thread, plus the calls it cannot see. Handlers
     should ignore such hits. Async-signal-safe. */
  int (*is_agent_call)(const probert_regs *regs);
} probert_tool_host;

typedef struct probert_tool {
  uint32_t    abi;          /* PROBERT_TOOL_ABI */
  const char *name;         /* e.g. "count" */
  void *(*start)(const probert_tool_host *host, probert_tool_ctx *ctx, const char *args);
  int (*attach)(void *state, const probert_tool_match *matches, size_t n);
  void (*event)(void *state, const void *rec, size_t len);
  void (*report)(void *state, int final);
  void (*forked)(void *state);
} probert_tool;

/* The one function a plug-in exports. */
typedef const probert_tool *(*probert_tool_entry)(void);
#define PROBERT_TOOL_ENTRY "probert_tool_v1"

#ifdef __cplusplus
}
#endif

#endif /* PROBERT_TOOL_H */
