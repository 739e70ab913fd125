/* A deterministic workload for probert trace's tests: calls work() N times,
   crc32() of libz M times through a dlopen'ed libz, forks a child that calls
   work() K times (K = -1: no fork), and prints what it did. A fifth argument
   says how it ends: "kill" (SIGKILL itself), "segv" (a null write), "_exit"
   (no exit handlers), "sleep:MS" (sleeps MS ms, then returns); all after
   flushing stdout. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <stdint.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) long work(long a, long b) {
  __asm__ volatile("" ::: "memory");
  return a * 3 + b;
}

int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 10, m = argc > 2 ? atol(argv[2]) : 0;
  long k = argc > 3 ? atol(argv[3]) : -1;
  long sum = 0;
  for (long i = 0; i < n; i++) sum += work(i, 7);
  if (m > 0) {
    void *z = dlopen("libz.so.1", RTLD_NOW);
    if (!z) return 3;
    unsigned long (*crc)(unsigned long, const unsigned char *, unsigned) =
        (unsigned long (*)(unsigned long, const unsigned char *, unsigned))dlsym(z, "crc32");
    for (long i = 0; i < m; i++) sum += (long)crc(0, (const unsigned char *)"probert", 7);
  }
  if (k >= 0) {
    fflush(stdout);
    pid_t p = fork();
    if (p == 0) {
      for (long i = 0; i < k; i++) sum += work(i, 1);
      printf("child %ld\n", sum);
      exit(0);
    }
    int st = 0;
    waitpid(p, &st, 0);
  }
  printf("sum %ld\n", sum);
  const char *end = argc > 4 ? argv[4] : "";
  fflush(stdout);
  if (!strcmp(end, "kill")) raise(SIGKILL);
  if (!strcmp(end, "segv")) *(volatile int *)(uintptr_t)(sum & 0xff0) = 0; /* page 0: unmapped */
  if (!strcmp(end, "_exit")) _exit(9);
  if (!strncmp(end, "sleep:", 6)) {
    long ms = atol(end + 6);
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
  }
  return (int)(n % 7);
}
