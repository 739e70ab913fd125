/*
 * C tests of the host-integration part of libprobert (issue 13, items 3–6):
 * spawn children, dispositions probert did not set, a host SIGTRAP handler
 * installed after probert, the scan signal, quiescent points. Built and run like
 * test_probert.c (tests/c/Makefile); each case in a process of its own.
 */
#define _GNU_SOURCE

#include <pthread.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/resource.h>

#include "harness.h"
#include "probert.h"

#define FN_ADDR(f) ((const void *)(uintptr_t)(f))

/* asm_inc: lea rax, [rdi + 1]; ret — runs out of line on the trap path. */
__asm__(".text\n"
        ".p2align 4\n"
        ".globl hs_inc\n"
        ".type hs_inc, @function\n"
        "hs_inc:\n"
        "  leaq 1(%rdi), %rax\n"
        "  ret\n"
        ".size hs_inc, .-hs_inc\n");
long hs_inc(long x);
static long (*volatile call_inc)(long) = hs_inc;

static probert_action count_hit(probert_hit *hit) {
  atomic_ulong *c = hit->user_data;
  atomic_fetch_add(c, 1);
  return PROBERT_CONTINUE;
}

/* Attaches a counting consumer on the trap path, calls once, detaches. */
static void one_hit(void) {
  static atomic_ulong hits;
  unsigned long before = atomic_load(&hits);
  probert_attach_opts opts = {sizeof opts, PROBERT_MODE_TRAP, NULL};
  probert_consumer c;
  CHECK_OK(probert_attach_ex(FN_ADDR(hs_inc), count_hit, &hits, &opts, &c));
  CHECK_EQ(call_inc(1), 2);
  CHECK_EQ(atomic_load(&hits), before + 1);
  CHECK_OK(probert_detach(c));
}

/* Runs body in a child of the case's process; returns its wait status. */
static int in_grandchild(void (*body)(void)) {
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    struct rlimit no_core = {0, 0};
    setrlimit(RLIMIT_CORE, &no_core);
    body();
    _exit(0);
  }
  int status;
  CHECK(waitpid(pid, &status, 0) == pid);
  return status;
}

/* ---- dispositions probert did not set ------------------------------------ */

static void kill_trap(void) { kill(getpid(), SIGTRAP); }

/* SIGTRAP ignored when probert initialises: a kill -TRAP stays ignored and
   probert's handler stays, so probes keep working; the default action
   still kills. */
static void t_ignored_sigtrap_survives_kill(void) {
  signal(SIGTRAP, SIG_IGN);
  CHECK_OK(probert_init());
  kill_trap();
  raise(SIGTRAP);
  one_hit();
  one_hit();
}

static void default_body(void) {
  CHECK_OK(probert_init());
  one_hit();
  kill_trap();
  _exit(3);
}

static void t_default_sigtrap_kill_still_kills(void) {
  int st = in_grandchild(default_body);
  CHECK(WIFSIGNALED(st));
  CHECK_EQ(WTERMSIG(st), SIGTRAP);
}

/* ---- a host SIGTRAP handler installed after probert ---------------------- */

static struct sigaction probert_sa;
static atomic_ulong host_calls;

static void chaining_host(int sig, siginfo_t *info, void *uc) {
  atomic_fetch_add(&host_calls, 1);
  probert_sa.sa_sigaction(sig, info, uc);
}

static void t_chaining_host_handler(void) {
  CHECK_OK(probert_init());
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = chaining_host;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  CHECK(sigaction(SIGTRAP, &sa, &probert_sa) == 0);
  static atomic_ulong hits;
  probert_consumer c;
  CHECK_STATUS(probert_attach(FN_ADDR(hs_inc), count_hit, &hits, &c), PROBERT_ERR_SIGNAL);
  CHECK_OK(probert_sigtrap_chained());
  one_hit();
  CHECK_EQ(atomic_load(&host_calls), 1);
  /* A foreign trap goes through both to the default: death. */
  int st = in_grandchild(kill_trap);
  CHECK(WIFSIGNALED(st));
  CHECK_EQ(WTERMSIG(st), SIGTRAP);
}

static void plain_host(int sig) { (void)sig; }

static void t_non_chaining_host_handler(void) {
  CHECK_OK(probert_init());
  struct sigaction sa, old;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = plain_host;
  CHECK(sigaction(SIGTRAP, &sa, &old) == 0);
  static atomic_ulong hits;
  probert_consumer c;
  CHECK_STATUS(probert_attach(FN_ADDR(hs_inc), count_hit, &hits, &c), PROBERT_ERR_SIGNAL);
  CHECK_STATUS(probert_sigtrap_chained(), PROBERT_ERR_SIGNAL);
  /* probert's own, put back: nothing to declare, and probes work. */
  CHECK(sigaction(SIGTRAP, &old, NULL) == 0);
  CHECK_OK(probert_sigtrap_chained());
  one_hit();
}

/* ---- the scan signal ------------------------------------------------------ */

static void host_rt(int sig) { (void)sig; }

static void t_scan_signal_choice(void) {
  int sig = SIGRTMIN + 3;
  CHECK_STATUS(probert_set_scan_signal(SIGUSR1), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(probert_set_scan_signal(SIGRTMAX + 1), PROBERT_ERR_INVALID_ARGUMENT);
  signal(sig + 1, host_rt);
  CHECK_STATUS(probert_set_scan_signal(sig + 1), PROBERT_ERR_SIGNAL);
  CHECK_OK(probert_set_scan_signal(sig));
  CHECK_OK(probert_init());
  struct sigaction cur;
  CHECK(sigaction(sig, NULL, &cur) == 0);
  CHECK((cur.sa_flags & SA_SIGINFO) != 0);
  CHECK(sigaction(SIGRTMAX - 1, NULL, &cur) == 0);
  CHECK(cur.sa_handler == SIG_DFL);
  CHECK_OK(probert_set_scan_signal(sig));
  CHECK_STATUS(probert_set_scan_signal(sig + 2), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_STATUS(probert_use_quiescent_points(), PROBERT_ERR_INVALID_ARGUMENT);
  one_hit();
}

/* ---- quiescent points ----------------------------------------------------- */

static atomic_ulong rt_deliveries;
static void count_rt(int sig) {
  (void)sig;
  atomic_fetch_add(&rt_deliveries, 1);
}

static atomic_int qs_stop;
static atomic_ulong qs_calls;

static void *qs_worker(void *arg) {
  (void)arg;
  probert_thread t;
  CHECK_OK(probert_thread_register(&t));
  while (!atomic_load(&qs_stop)) {
    CHECK_EQ(call_inc(5), 6);
    atomic_fetch_add(&qs_calls, 1);
    CHECK_OK(probert_quiescent(t)); /* the host's safepoint */
  }
  CHECK_OK(probert_thread_offline(t));
  CHECK_OK(probert_thread_online(t));
  CHECK_OK(probert_thread_unregister(t));
  return NULL;
}

/* The host owns every real-time signal; probert sends none of them, and
   stubs churned by attach/detach are still reused (the run stays within
   one stub chunk's worth of memory: no assertion here, see the Rust test). */
static void t_quiescent_points(void) {
  for (int sig = SIGRTMIN; sig <= SIGRTMAX; sig++) {
    signal(sig, count_rt);
  }
  CHECK_OK(probert_use_quiescent_points());
  CHECK_OK(probert_use_quiescent_points());
  CHECK_OK(probert_init());
  CHECK_STATUS(probert_set_scan_signal(SIGRTMIN + 1), PROBERT_ERR_INVALID_ARGUMENT);

  probert_thread me = 0;
  CHECK_STATUS(probert_thread_register(NULL), PROBERT_ERR_INVALID_ARGUMENT);
  CHECK_OK(probert_thread_register(&me));
  CHECK(me != 0);
  CHECK_STATUS(probert_quiescent(0), PROBERT_ERR_NOT_FOUND);
  CHECK_STATUS(probert_quiescent(~(probert_thread)0), PROBERT_ERR_NOT_FOUND);

  pthread_t w;
  CHECK(pthread_create(&w, NULL, qs_worker, NULL) == 0);
  static atomic_ulong hits;
  probert_attach_opts opts = {sizeof opts, PROBERT_MODE_TRAP, NULL};
  for (int i = 0; i < 1500; i++) {
    probert_consumer c;
    CHECK_OK(probert_attach_ex(FN_ADDR(hs_inc), count_hit, &hits, &opts, &c));
    CHECK_OK(probert_detach(c));
  }
  atomic_store(&qs_stop, 1);
  CHECK(pthread_join(w, NULL) == 0);
  CHECK(atomic_load(&qs_calls) > 0);
  CHECK_OK(probert_thread_unregister(me));
  CHECK_STATUS(probert_thread_unregister(me), PROBERT_ERR_NOT_FOUND);
  CHECK_STATUS(probert_quiescent(me), PROBERT_ERR_NOT_FOUND);
  CHECK_EQ(atomic_load(&rt_deliveries), 0);
}

/* ---- children that share memory ----------------------------------------- */

extern char **environ;

/* posix_spawn and system() with the C library's execve and dup2 on the trap
   path: glibc's own child would die on them; libprobert's serves them. */
static void t_spawn_children_serve_trap_probes(void) {
  static atomic_ulong execs, dups;
  CHECK_OK(probert_init());
  probert_attach_opts opts = {sizeof opts, PROBERT_MODE_TRAP, NULL};
  const void *execve_at, *dup2_at;
  CHECK_OK(probert_symbol_addr("libc.so.6", "execve", &execve_at));
  CHECK_OK(probert_symbol_addr("libc.so.6", "dup2", &dup2_at));
  probert_consumer ce, cd;
  CHECK_OK(probert_attach_ex(execve_at, count_hit, &execs, &opts, &ce));
  CHECK_OK(probert_attach_ex(dup2_at, count_hit, &dups, &opts, &cd));

  posix_spawn_file_actions_t fa;
  CHECK_EQ(posix_spawn_file_actions_init(&fa), 0);
  CHECK_EQ(posix_spawn_file_actions_adddup2(&fa, 1, 9), 0);
  char *argv[] = {"sh", "-c", "exit 7", NULL};
  pid_t pid;
  CHECK_EQ(posix_spawn(&pid, "/bin/sh", &fa, NULL, argv, environ), 0);
  posix_spawn_file_actions_destroy(&fa);
  int st;
  CHECK(waitpid(pid, &st, 0) == pid);
  CHECK(WIFEXITED(st));
  CHECK_EQ(WEXITSTATUS(st), 7);
  CHECK_EQ(atomic_load(&execs), 1);
  CHECK_EQ(atomic_load(&dups), 1);

  st = system("exit 3");
  CHECK(WIFEXITED(st));
  CHECK_EQ(WEXITSTATUS(st), 3);
  CHECK_EQ(atomic_load(&execs), 2);
  CHECK_OK(probert_detach(ce));
  CHECK_OK(probert_detach(cd));
}

#define T(name) {#name, t_##name}
static const struct test_case TESTS[] = {
    T(spawn_children_serve_trap_probes),
    T(ignored_sigtrap_survives_kill),
    T(default_sigtrap_kill_still_kills),
    T(chaining_host_handler),
    T(non_chaining_host_handler),
    T(scan_signal_choice),
    T(quiescent_points),
};

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  return run_tests(TESTS, sizeof TESTS / sizeof TESTS[0], argc, argv);
}
