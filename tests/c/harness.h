/*
 * A minimal test harness for probert's C tests.
 *
 * Every test case runs in a child process of its own (tests patch code and
 * install signal handlers, and a crash must fail one case, not hide the
 * others): the runner forks, the child runs the case and exits 0, and the
 * parent reports a failed check, a nonzero exit or a signal by name. A case
 * that takes longer than TEST_TIMEOUT seconds is killed by SIGALRM.
 *
 *   ./test_probert            run every case
 *   ./test_probert NAME...    run the named cases
 *   ./test_probert --list     print the names
 *
 * The last line is "N passed, N failed"; the exit status is 0 iff none failed.
 */
#ifndef PROBERT_TEST_HARNESS_H
#define PROBERT_TEST_HARNESS_H

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef TEST_TIMEOUT
#define TEST_TIMEOUT 60
#endif

typedef void (*test_fn)(void);
struct test_case {
  const char *name;
  test_fn fn;
};

/* Fails the current case (in its child process). */
#define CHECK(cond)                                                             \
  do {                                                                          \
    if (!(cond)) {                                                              \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);  \
      _exit(1);                                                                 \
    }                                                                           \
  } while (0)

/* Checks that a probert call returns the status `want`, naming both. */
#define CHECK_STATUS(call, want)                                                \
  do {                                                                          \
    probert_status got_ = (call);                                               \
    probert_status want_ = (want);                                              \
    if (got_ != want_) {                                                        \
      fprintf(stderr, "%s:%d: %s\n  returned %d (%s), expected %d (%s)\n",      \
              __FILE__, __LINE__, #call, (int)got_, probert_status_str(got_),   \
              (int)want_, probert_status_str(want_));                           \
      _exit(1);                                                                 \
    }                                                                           \
  } while (0)

#define CHECK_OK(call) CHECK_STATUS(call, PROBERT_OK)

/* Checks two unsigned integers are equal, printing both. */
#define CHECK_EQ(a, b)                                                          \
  do {                                                                          \
    unsigned long long a_ = (unsigned long long)(a);                            \
    unsigned long long b_ = (unsigned long long)(b);                            \
    if (a_ != b_) {                                                             \
      fprintf(stderr, "%s:%d: CHECK_EQ failed: %s == %s\n  %llu (%#llx) != %llu (%#llx)\n", \
              __FILE__, __LINE__, #a, #b, a_, a_, b_, b_);                      \
      _exit(1);                                                                 \
    }                                                                           \
  } while (0)

static const char *signal_name(int sig) {
  switch (sig) {
  case SIGSEGV: return "SIGSEGV";
  case SIGBUS: return "SIGBUS";
  case SIGILL: return "SIGILL";
  case SIGTRAP: return "SIGTRAP";
  case SIGABRT: return "SIGABRT";
  case SIGFPE: return "SIGFPE";
  case SIGALRM: return "SIGALRM (timed out)";
  case SIGKILL: return "SIGKILL";
  case SIGTERM: return "SIGTERM";
  case SIGSYS: return "SIGSYS";
  default: return "a signal";
  }
}

/* Runs one case in a child; returns 1 if it passed. */
static int run_case(const struct test_case *t) {
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  if (pid < 0) {
    perror("fork");
    return 0;
  }
  if (pid == 0) {
    alarm(TEST_TIMEOUT);
    t->fn();
    fflush(stdout);
    fflush(stderr);
    exit(0); /* exit, not _exit: let sanitizers run their exit checks */
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
    printf("ok      %s\n", t->name);
    return 1;
  }
  if (WIFSIGNALED(status)) {
    printf("FAILED  %s: killed by %s (%d)\n", t->name, signal_name(WTERMSIG(status)),
           WTERMSIG(status));
  } else {
    printf("FAILED  %s: exit status %d\n", t->name, WEXITSTATUS(status));
  }
  return 0;
}

/* The runner: every case, or those named on the command line. */
static int run_tests(const struct test_case *tests, size_t n, int argc, char **argv) {
  int passed = 0, failed = 0;
  if (argc == 2 && strcmp(argv[1], "--list") == 0) {
    for (size_t i = 0; i < n; i++) {
      printf("%s\n", tests[i].name);
    }
    return 0;
  }
  for (int a = 1; a < argc; a++) {
    int found = 0;
    for (size_t i = 0; i < n; i++) {
      found |= strcmp(argv[a], tests[i].name) == 0;
    }
    if (!found) {
      printf("FAILED  %s: no such test\n", argv[a]);
      failed++;
    }
  }
  for (size_t i = 0; i < n; i++) {
    int selected = argc < 2;
    for (int a = 1; a < argc; a++) {
      selected |= strcmp(argv[a], tests[i].name) == 0;
    }
    if (!selected) {
      continue;
    }
    if (run_case(&tests[i])) {
      passed++;
    } else {
      failed++;
    }
  }
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

#endif /* PROBERT_TEST_HARNESS_H */
