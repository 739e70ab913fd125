/* An independent count for probert's tests: an LD_PRELOAD interposer that
   counts every call bound to readdir or readdir64 (one function in glibc on
   x86-64) and forwards it to the next definition. At exit it writes the
   count to $COUNT_FILE (count_file.h). */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdlib.h>

static atomic_ulong calls;

static struct dirent *(*next)(DIR *);

static struct dirent *counted(DIR *d) {
  atomic_fetch_add_explicit(&calls, 1, memory_order_relaxed);
  if (!next) *(void **)&next = dlsym(RTLD_NEXT, "readdir");
  return next(d);
}

struct dirent *readdir(DIR *d) { return counted(d); }
struct dirent64 *readdir64(DIR *d) { return (struct dirent64 *)counted(d); }

#include "count_file.h"
