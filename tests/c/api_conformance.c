/*
 * include/probert.h against the contract, shared/API.md: every name, type
 * and value of API.md, checked by the compiler. Built with -std=c11 -Wall
 * -Wextra -Wpedantic -Werror; if it compiles, the header declares what
 * API.md promises.
 *
 * - Function prototypes are repeated verbatim from API.md: C accepts a
 *   redeclaration only if the types are compatible, so any difference in a
 *   parameter or return type is a compile error.
 * - Plain typedefs are repeated too (C11 allows an identical typedef again).
 * - Enums: every constant's value, by static assertion.
 * - Structs: a copy of API.md's definition under another tag, and static
 *   assertions that the two have the same size and the same fields at the
 *   same offsets with the same types.
 *
 * It also runs: main() makes one call of each function with arguments that
 * exercise no code patching.
 */
#include <stddef.h>
#include <stdint.h>

#include "probert.h"

/* ---- verbatim from API.md ------------------------------------------- */

const char *probert_status_str(probert_status s);
const char *probert_version(void);
probert_status probert_init(void);

typedef uint64_t probert_region;
typedef int (*probert_write_fn)(void *dst, const void *src, size_t len, void *ctx);
probert_status probert_region_add(const probert_region_desc *desc, probert_region *out);
probert_status probert_region_remove(probert_region region);

uint64_t       probert_regs_get(const probert_regs *regs, probert_reg reg);
probert_status probert_regs_set(probert_regs *regs, probert_reg reg, uint64_t value);
uint64_t       probert_regs_arg(const probert_regs *regs, unsigned n);

typedef probert_action (*probert_handler)(probert_hit *hit);
typedef uint64_t probert_consumer;
probert_status probert_attach(const void *addr, probert_handler handler,
                              void *user_data, probert_consumer *out);
probert_status probert_attach_batch(const probert_attach_req *reqs, size_t n,
                                    probert_consumer *out, size_t *err_index);
probert_status probert_detach(probert_consumer c);
probert_status probert_detach_batch(const probert_consumer *cs, size_t n);
probert_status probert_detach_nosync(probert_consumer c);
probert_status probert_sync(void);
probert_status probert_attach_ex(const void *addr, probert_handler handler, void *user_data,
                                 const probert_attach_opts *opts, probert_consumer *out);
probert_status probert_probe_mode(const void *addr, probert_mode *out);
/* The name in parentheses: the header also defines a function-like macro of
   that name (it passes the struct's size; see probert.h), which a
   redeclaration must not expand. */
probert_status (probert_consumer_get_stats)(probert_consumer c, probert_consumer_stats *out);

/* Additions of version 0.2. */
probert_status probert_attach_batch_ex(const probert_attach_req *reqs, size_t n,
                                       const probert_attach_opts *opts,
                                       probert_consumer *out, size_t *err_index);
probert_status probert_symbol_addr(const char *module, const char *symbol,
                                   const void **out);

/* The tags API.md names exist, as the types their typedefs name. */
typedef enum probert_status probert_status;
typedef enum probert_reg probert_reg;
typedef enum probert_action probert_action;
typedef enum probert_mode probert_mode;
typedef struct probert_regs probert_regs;
typedef struct probert_hit probert_hit;
typedef struct probert_region_desc probert_region_desc;
typedef struct probert_attach_req probert_attach_req;
typedef struct probert_attach_opts probert_attach_opts;
typedef struct probert_consumer_stats probert_consumer_stats;

/* ---- enum values ----------------------------------------------------- */

#define VALUE(name, v) _Static_assert((name) == (v), #name " == " #v)
VALUE(PROBERT_OK, 0);
VALUE(PROBERT_ERR_INVALID_ARGUMENT, 1);
VALUE(PROBERT_ERR_NO_REGION, 2);
VALUE(PROBERT_ERR_REGION_OVERLAP, 3);
VALUE(PROBERT_ERR_UNSUPPORTED_INSN, 4);
VALUE(PROBERT_ERR_NOT_FOUND, 5);
VALUE(PROBERT_ERR_CONFLICT, 6);
VALUE(PROBERT_ERR_PROTECT, 7);
VALUE(PROBERT_ERR_NO_MEMORY, 8);
VALUE(PROBERT_ERR_SIGNAL, 9);
VALUE(PROBERT_ERR_MISALIGNED, 10);
VALUE(PROBERT_ERR_INTERNAL, 255);

VALUE(PROBERT_REG_RAX, 0);
VALUE(PROBERT_REG_RBX, 1);
VALUE(PROBERT_REG_RCX, 2);
VALUE(PROBERT_REG_RDX, 3);
VALUE(PROBERT_REG_RSI, 4);
VALUE(PROBERT_REG_RDI, 5);
VALUE(PROBERT_REG_RBP, 6);
VALUE(PROBERT_REG_RSP, 7);
VALUE(PROBERT_REG_R8, 8);
VALUE(PROBERT_REG_R9, 9);
VALUE(PROBERT_REG_R10, 10);
VALUE(PROBERT_REG_R11, 11);
VALUE(PROBERT_REG_R12, 12);
VALUE(PROBERT_REG_R13, 13);
VALUE(PROBERT_REG_R14, 14);
VALUE(PROBERT_REG_R15, 15);
VALUE(PROBERT_REG_RIP, 16);
VALUE(PROBERT_REG_RFLAGS, 17);

VALUE(PROBERT_CONTINUE, 0);
VALUE(PROBERT_REMOVE, 1);
VALUE(PROBERT_NO_RETURN, 2);

VALUE(PROBERT_MODE_AUTO, 0);
VALUE(PROBERT_MODE_TRAP, 1);
VALUE(PROBERT_MODE_FAST, 2);

/* ---- struct layouts ---------------------------------------------------- */

/* A field of `ours` matches API.md's `theirs`: offset and type. */
#define SAME_FIELD(ours, theirs, field)                                        \
  _Static_assert(offsetof(ours, field) == offsetof(theirs, field),            \
                 #ours "." #field " offset");                                  \
  _Static_assert(_Generic(((ours *)0)->field,                                 \
                          __typeof__(((theirs *)0)->field): 1, default: 0),    \
                 #ours "." #field " type")
#define SAME_SIZE(ours, theirs) _Static_assert(sizeof(ours) == sizeof(theirs), #ours " size")

struct api_region_desc {
  const void      *start;
  size_t           len;
  const char      *name;
  probert_write_fn write;
  void            *write_ctx;
};
SAME_SIZE(probert_region_desc, struct api_region_desc);
SAME_FIELD(probert_region_desc, struct api_region_desc, start);
SAME_FIELD(probert_region_desc, struct api_region_desc, len);
SAME_FIELD(probert_region_desc, struct api_region_desc, name);
SAME_FIELD(probert_region_desc, struct api_region_desc, write);
SAME_FIELD(probert_region_desc, struct api_region_desc, write_ctx);

struct api_hit {
  uintptr_t     addr;
  probert_regs *regs;
  void         *user_data;
  uint64_t     *session;
  uint32_t      is_return;
};
SAME_SIZE(probert_hit, struct api_hit);
SAME_FIELD(probert_hit, struct api_hit, addr);
SAME_FIELD(probert_hit, struct api_hit, regs);
SAME_FIELD(probert_hit, struct api_hit, user_data);
SAME_FIELD(probert_hit, struct api_hit, session);
SAME_FIELD(probert_hit, struct api_hit, is_return);

struct api_attach_req {
  const void *addr; probert_handler handler; void *user_data;
};
SAME_SIZE(probert_attach_req, struct api_attach_req);
SAME_FIELD(probert_attach_req, struct api_attach_req, addr);
SAME_FIELD(probert_attach_req, struct api_attach_req, handler);
SAME_FIELD(probert_attach_req, struct api_attach_req, user_data);

struct api_attach_opts {
  size_t          size;
  probert_mode    mode;
  probert_handler on_return;
};
SAME_SIZE(probert_attach_opts, struct api_attach_opts);
SAME_FIELD(probert_attach_opts, struct api_attach_opts, size);
SAME_FIELD(probert_attach_opts, struct api_attach_opts, mode);
SAME_FIELD(probert_attach_opts, struct api_attach_opts, on_return);

struct api_consumer_stats {
  uint64_t hits;
  uint64_t missed;
  uint64_t returns;
  uint64_t abandoned;
};
SAME_SIZE(probert_consumer_stats, struct api_consumer_stats);
SAME_FIELD(probert_consumer_stats, struct api_consumer_stats, hits);
SAME_FIELD(probert_consumer_stats, struct api_consumer_stats, missed);
SAME_FIELD(probert_consumer_stats, struct api_consumer_stats, returns);
SAME_FIELD(probert_consumer_stats, struct api_consumer_stats, abandoned);

/* ---- and it links and runs ----------------------------------------------- */

static probert_action handler(probert_hit *hit) {
  (void)hit;
  return PROBERT_CONTINUE;
}

int main(void) {
  probert_consumer c = 0;
  probert_region r = 0;
  probert_mode m;
  probert_consumer_stats st;
  probert_attach_req req = {NULL, handler, NULL};
  probert_attach_opts opts = {sizeof opts, PROBERT_MODE_AUTO, NULL};
  size_t idx = 0;
  const void *cp = NULL;
  int ok = 1;
  ok &= probert_status_str(PROBERT_OK) != NULL;
  ok &= probert_version() != NULL;
  ok &= probert_init() == PROBERT_OK;
  ok &= probert_region_add(NULL, &r) == PROBERT_ERR_INVALID_ARGUMENT;
  ok &= probert_region_remove(r) == PROBERT_ERR_NOT_FOUND;
  ok &= probert_regs_get(NULL, PROBERT_REG_RAX) == 0;
  ok &= probert_regs_set(NULL, PROBERT_REG_RAX, 0) == PROBERT_ERR_INVALID_ARGUMENT;
  ok &= probert_regs_arg(NULL, 0) == 0;
  ok &= probert_attach(NULL, handler, NULL, &c) == PROBERT_ERR_INVALID_ARGUMENT;
  ok &= probert_attach_ex(NULL, handler, NULL, &opts, &c) == PROBERT_ERR_INVALID_ARGUMENT;
  ok &= probert_attach_batch(&req, 1, &c, &idx) == PROBERT_ERR_INVALID_ARGUMENT && idx == 0;
  idx = 7;
  ok &= probert_attach_batch_ex(&req, 1, &opts, &c, &idx) == PROBERT_ERR_INVALID_ARGUMENT &&
        idx == 0;
  ok &= probert_detach(c) == PROBERT_ERR_NOT_FOUND;
  ok &= probert_detach_batch(&c, 1) == PROBERT_ERR_NOT_FOUND;
  ok &= probert_detach_nosync(c) == PROBERT_ERR_NOT_FOUND;
  ok &= probert_sync() == PROBERT_OK;
  ok &= probert_probe_mode(&ok, &m) == PROBERT_ERR_NOT_FOUND;
  ok &= probert_consumer_get_stats(c, &st) == PROBERT_ERR_NOT_FOUND;
  ok &= probert_symbol_addr(NULL, NULL, &cp) == PROBERT_ERR_INVALID_ARGUMENT;
  ok &= probert_symbol_addr("libc.so.6", "no_such_function_here", &cp) == PROBERT_ERR_NOT_FOUND;
  return ok ? 0 : 1;
}
