/* An independent count for probert's tests: an LD_PRELOAD interposer that
   counts every call bound to malloc and forwards it to the next definition
   (found with dlsym, which does not allocate on success). At exit it writes
   the count to $COUNT_FILE (count_file.h). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdlib.h>

static atomic_ulong calls;

static void *(*next)(size_t);

void *malloc(size_t n) {
  atomic_fetch_add_explicit(&calls, 1, memory_order_relaxed);
  if (!next) *(void **)&next = dlsym(RTLD_NEXT, "malloc");
  return next(n);
}

#include "count_file.h"
