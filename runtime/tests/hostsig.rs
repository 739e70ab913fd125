//! Hosts that own their signals, threads and sandboxes (issue 13, items
//! 4–6): dispositions probert did not set, host `SIGTRAP` handlers installed
//! after probert, a chosen scan signal, quiescent points instead of scan
//! signals, no `membarrier`, the descriptor limit. Each test runs in its own
//! process (`isolated!`, or [`run_child`] where the process must start with
//! a given disposition or environment).
#![allow(unsafe_code)]
// Test code calls assembly targets, libc and probert's unsafe attach on
// purpose; the safety premise of every such call is the test itself.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;
mod targets;

use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{bytes, count, counter};
use probert::{Action, Barrier, Error, Hit, Mode};
use targets::*;

// ---- running a test in a child that starts as a host would ---------------

const CHILD_ENV: &str = "PROBERT_TEST_CHILD";

/// Runs `body` in a fresh process running only the test `name`, started
/// with `SIGTRAP` ignored (inherited across `exec`) if `sigtrap_ignored`, and
/// with `env` set.
fn run_child(name: &str, sigtrap_ignored: bool, env: &[(&str, &str)], body: impl FnOnce()) {
    if std::env::var_os(CHILD_ENV).as_deref() == Some(name.as_ref()) {
        body();
        return;
    }
    let mut cmd = std::process::Command::new(std::env::current_exe().expect("current_exe"));
    cmd.args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD_ENV, name)
        .envs(env.iter().copied());
    if sigtrap_ignored {
        // SAFETY: between fork and exec only async-signal-safe calls.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGTRAP, libc::SIG_IGN);
                Ok(())
            });
        }
    }
    let out = cmd.output().expect("spawn the test child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child `{name}` failed: {:?}\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The handler now installed for `sig`, as libc reports it.
fn handler_of(sig: i32) -> usize {
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) },
        0
    );
    old.sa_sigaction
}

/// Runs `f` in a forked child and returns how it ended: `Ok(exit code)` or
/// `Err(signal)`.
fn in_fork(f: impl FnOnce()) -> Result<i32, i32> {
    match unsafe { libc::fork() } {
        0 => {
            f();
            unsafe { libc::_exit(0) }
        }
        pid => {
            let mut status = 0;
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            if libc::WIFSIGNALED(status) {
                Err(libc::WTERMSIG(status))
            } else {
                Ok(libc::WEXITSTATUS(status))
            }
        }
    }
}

/// A probe on `t_push_rbp` counting into `hits`; checks one hit.
/// A hit on the trap path (the signal is what these tests are about).
fn probe_hits(hits: &'static AtomicU64) {
    let before = hits.load(Ordering::SeqCst);
    let id = unsafe { probert::attach_ex(addr!(t_push_rbp), count, counter(hits), Mode::Trap) }
        .expect("attach");
    assert_eq!(unsafe { t_push_rbp(1) }, 2);
    assert_eq!(hits.load(Ordering::SeqCst), before + 1);
    probert::detach(id).expect("detach");
}

// ---- item 4a: dispositions probert did not set ---------------------------

#[test]
fn inherited_sig_ign_survives_kill_trap_and_probes_still_work() {
    run_child(
        "inherited_sig_ign_survives_kill_trap_and_probes_still_work",
        true,
        &[],
        || {
            assert_eq!(handler_of(libc::SIGTRAP), libc::SIG_IGN, "inherited");
            probert::init().unwrap();
            static HITS: AtomicU64 = AtomicU64::new(0);
            let id = unsafe { probert::attach(addr!(t_push_rbp), count, counter(&HITS)) }.unwrap();
            // Sent traps, each ignored as the inherited disposition says.
            unsafe {
                assert_eq!(libc::kill(libc::getpid(), libc::SIGTRAP), 0);
                assert_eq!(libc::raise(libc::SIGTRAP), 0);
                let pid = libc::getpid();
                let tid = libc::gettid();
                assert_eq!(
                    libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGTRAP),
                    0,
                    "tgkill"
                );
                let v = libc::sigval {
                    sival_ptr: std::ptr::null_mut(),
                };
                assert_eq!(libc::sigqueue(pid, libc::SIGTRAP, v), 0);
            }
            // probert's handler is still there: the next hit is a hit, not
            // a death.
            let h = handler_of(libc::SIGTRAP);
            assert!(h != libc::SIG_IGN && h != libc::SIG_DFL, "handler kept");
            for _ in 0..3 {
                assert_eq!(unsafe { t_push_rbp(1) }, 2);
            }
            assert_eq!(HITS.load(Ordering::SeqCst), 3);
            probert::detach(id).unwrap();
            // From another thread too (a process-directed kill may land on
            // any thread).
            std::thread::spawn(|| unsafe { libc::kill(libc::getpid(), libc::SIGTRAP) })
                .join()
                .unwrap();
            probe_hits(&HITS);
            // A foreign int3 is forced by the kernel: it kills even with
            // SIGTRAP ignored, as it would without probert.
            assert_eq!(
                in_fork(|| {
                    unsafe { t_foreign(1) };
                }),
                Err(libc::SIGTRAP)
            );
            // And the parent's probes still work afterwards.
            probe_hits(&HITS);
        },
    );
}

isolated!(default_disposition_still_kills_on_kill_trap, {
    probert::init().unwrap();
    assert_eq!(
        in_fork(|| unsafe {
            libc::kill(libc::getpid(), libc::SIGTRAP);
            // Not reached: the default action of SIGTRAP terminates.
            libc::_exit(3);
        }),
        Err(libc::SIGTRAP)
    );
    static HITS: AtomicU64 = AtomicU64::new(0);
    probe_hits(&HITS);
});

isolated!(a_previous_handler_with_sa_resethand_runs_once, {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    extern "C" fn once(_: i32, _: *mut libc::siginfo_t, _: *mut std::ffi::c_void) {
        CALLS.fetch_add(1, Ordering::SeqCst);
    }
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = once as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
        assert_eq!(
            libc::sigaction(libc::SIGTRAP, &act, std::ptr::null_mut()),
            0
        );
    }
    probert::init().unwrap();
    unsafe { libc::raise(libc::SIGTRAP) };
    assert_eq!(CALLS.load(Ordering::SeqCst), 1);
    // The disposition is now the default, as the kernel would have made it.
    assert_eq!(
        in_fork(|| unsafe {
            libc::raise(libc::SIGTRAP);
        }),
        Err(libc::SIGTRAP)
    );
    assert_eq!(CALLS.load(Ordering::SeqCst), 1);
    static HITS: AtomicU64 = AtomicU64::new(0);
    probe_hits(&HITS);
});

// ---- item 4b: a host SIGTRAP handler installed after probert -------------

/// The disposition probert's handler had, saved by the host's handler.
static OLD: AtomicUsize = AtomicUsize::new(0);
/// Calls of the host's handler.
static HOST_CALLS: AtomicUsize = AtomicUsize::new(0);

isolated!(a_host_handler_that_does_not_chain_refuses_attach, {
    extern "C" fn host(_: i32) {
        HOST_CALLS.fetch_add(1, Ordering::SeqCst);
    }
    probert::init().unwrap();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let before = bytes(addr!(t_push_rbp), 8);
    let id = unsafe { probert::attach(addr!(t_push_rbp), count, counter(&HITS)) }.unwrap();
    let mut saved: libc::sigaction = unsafe { std::mem::zeroed() };
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = host as *const () as usize;
        assert_eq!(libc::sigaction(libc::SIGTRAP, &act, &mut saved), 0);
    }
    // Attaching is refused; a plain handler cannot be declared to chain.
    let err = unsafe { probert::attach(addr!(t_endbr), count, counter(&HITS)) }.unwrap_err();
    assert!(matches!(err, Error::Signal(_)), "{err}");
    let err = probert::declare_chained_sigtrap_handler().unwrap_err();
    assert!(matches!(err, Error::Signal(_)), "{err}");
    // Detaching what was attached before still restores the code.
    probert::detach(id).unwrap();
    assert_eq!(bytes(addr!(t_push_rbp), 8), before);
    probert::sync().unwrap();
    // The host puts probert's handler back (through libc, as it saved it):
    // probes work again.
    assert_eq!(
        unsafe { libc::sigaction(libc::SIGTRAP, &saved, std::ptr::null_mut()) },
        0
    );
    probe_hits(&HITS);
    assert_eq!(HOST_CALLS.load(Ordering::SeqCst), 0);
});

/// When set, the host's handler blocks (reading this pipe) after probert's
/// handler returned, as a host that does slow work on its way out would.
static STALL_FD: AtomicUsize = AtomicUsize::new(0);
/// Set while the host's handler is blocked there.
static STALLED: AtomicBool = AtomicBool::new(false);

/// The host's `SIGTRAP` handler: chains to the saved one (probert's), then
/// maybe stalls.
extern "C" fn chaining_host(sig: i32, info: *mut libc::siginfo_t, uc: *mut std::ffi::c_void) {
    HOST_CALLS.fetch_add(1, Ordering::SeqCst);
    let old = OLD.load(Ordering::SeqCst);
    let f: extern "C" fn(i32, *mut libc::siginfo_t, *mut std::ffi::c_void) =
        unsafe { std::mem::transmute(old) };
    f(sig, info, uc);
    let fd = STALL_FD.swap(0, Ordering::SeqCst);
    if fd != 0 {
        STALLED.store(true, Ordering::SeqCst);
        let mut b = 0u8;
        unsafe { libc::read(fd as i32, (&mut b as *mut u8).cast(), 1) };
        STALLED.store(false, Ordering::SeqCst);
    }
}

/// Installs [`chaining_host`] through libc, saving probert's handler.
fn install_chaining_host_libc() {
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        let mut old: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = chaining_host as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        assert_eq!(libc::sigaction(libc::SIGTRAP, &act, &mut old), 0);
        OLD.store(old.sa_sigaction, Ordering::SeqCst);
    }
}

/// The kernel's `struct sigaction` on x86_64.
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

std::arch::global_asm!(
    ".text",
    ".globl host_restorer",
    "host_restorer:",
    "mov rax, 15",
    "syscall",
    "ud2",
);

extern "C" {
    fn host_restorer();
}

/// Installs [`chaining_host`] as a language runtime would: the raw system
/// call, a signal return trampoline of its own, and every signal but
/// `SIGTRAP` blocked while it runs (the scan signal included).
fn install_chaining_host_raw() {
    const SA_RESTORER: u64 = 0x0400_0000;
    let mut old = KernelSigaction {
        handler: 0,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    let act = KernelSigaction {
        handler: chaining_host as *const () as usize,
        flags: (libc::SA_SIGINFO | libc::SA_NODEFER) as u64 | SA_RESTORER,
        restorer: host_restorer as *const () as usize,
        mask: !(1u64 << (libc::SIGTRAP - 1)),
    };
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            libc::SIGTRAP,
            &act as *const KernelSigaction,
            &mut old as *mut KernelSigaction,
            8,
        )
    };
    assert_eq!(rc, 0);
    OLD.store(old.handler, Ordering::SeqCst);
}

/// A probe through the chaining host's handler; then a thread that trapped,
/// went through probert's handler (now resuming in the stub) and stalls in
/// the host's handler keeps the stub from reuse until it has returned.
fn chaining_host_keeps_probes_and_stubs_safe(install: fn()) {
    probert::init().unwrap();
    install();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let err = unsafe { probert::attach(addr!(t_push_rbp), count, counter(&HITS)) }.unwrap_err();
    assert!(matches!(err, Error::Signal(_)), "undeclared: {err}");
    probert::declare_chained_sigtrap_handler().unwrap();
    probe_hits(&HITS);
    assert_eq!(HOST_CALLS.load(Ordering::SeqCst), 1);
    probert::recycle_stubs().unwrap();
    assert_eq!(probert::retired_stubs(), (0, 0));

    let site = addr!(t_riprel_mov);
    let id = unsafe { probert::attach_ex(site, count, counter(&HITS), Mode::Trap) }.unwrap();
    let mut fds = [0i32; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    STALL_FD.store(fds[0] as usize, Ordering::SeqCst);
    let worker = std::thread::spawn(|| unsafe { t_riprel_mov(5) });
    while !STALLED.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    // The worker's context points into the stub, under the host's frames.
    probert::detach(id).unwrap();
    probert::recycle_stubs().unwrap();
    let (grace, scan) = probert::retired_stubs();
    assert_eq!(
        grace + scan,
        1,
        "the stub the worker will return to is kept"
    );
    assert_eq!(unsafe { libc::write(fds[1], b"x".as_ptr().cast(), 1) }, 1);
    assert_eq!(
        worker.join().unwrap(),
        1005,
        "the worker ran an intact stub"
    );
    probert::recycle_stubs().unwrap();
    assert_eq!(probert::retired_stubs(), (0, 0), "reusable once it left");
    // A foreign trap still reaches the disposition before probert (the
    // default: death), through both handlers.
    assert_eq!(
        in_fork(|| {
            unsafe { libc::raise(libc::SIGTRAP) };
        }),
        Err(libc::SIGTRAP)
    );
}

isolated!(a_chaining_host_handler_installed_through_libc, {
    chaining_host_keeps_probes_and_stubs_safe(install_chaining_host_libc);
});

isolated!(
    a_chaining_host_handler_with_its_own_trampoline_and_a_full_mask,
    {
        chaining_host_keeps_probes_and_stubs_safe(install_chaining_host_raw);
    }
);

isolated!(a_host_handler_blocking_sigtrap_cannot_be_declared, {
    extern "C" fn h(_: i32, _: *mut libc::siginfo_t, _: *mut std::ffi::c_void) {}
    probert::init().unwrap();
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = h as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO; // no SA_NODEFER
        assert_eq!(
            libc::sigaction(libc::SIGTRAP, &act, std::ptr::null_mut()),
            0
        );
    }
    let err = probert::declare_chained_sigtrap_handler().unwrap_err();
    assert!(matches!(err, Error::Signal(_)), "{err}");
});

// ---- item 5a: the scan signal ---------------------------------------------

/// A thread blocked in a probed `syscall` (inside its out-of-line stub)
/// keeps the stub retired until it left: the scan works.
fn scans_keep_a_stub_a_thread_is_in() {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let mut fds = [0i32; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let id = unsafe { probert::attach(addr!(t_read_syscall), count, counter(&HITS)) }.unwrap();
    let reader = std::thread::spawn(move || {
        let mut byte = 0u8;
        unsafe { t_read_byte(fds[0], &mut byte) }
    });
    while HITS.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    probert::detach(id).unwrap();
    probert::recycle_stubs().unwrap();
    let (grace, scan) = probert::retired_stubs();
    assert_eq!(grace + scan, 1, "the stub the reader is in stays retired");
    assert_eq!(unsafe { libc::write(fds[1], b"x".as_ptr().cast(), 1) }, 1);
    assert_eq!(reader.join().unwrap(), 1);
    probert::recycle_stubs().unwrap();
    assert_eq!(probert::retired_stubs(), (0, 0));
}

isolated!(a_chosen_scan_signal_is_the_one_used, {
    let sig = libc::SIGRTMIN() + 3;
    let default = libc::SIGRTMAX() - 1;
    assert!(matches!(
        probert::set_scan_signal(libc::SIGUSR1),
        Err(Error::InvalidArgument(_))
    ));
    extern "C" fn host(_: i32) {}
    unsafe { libc::signal(sig + 1, host as extern "C" fn(i32) as usize) };
    assert!(matches!(
        probert::set_scan_signal(sig + 1),
        Err(Error::Signal(_))
    ));
    probert::set_scan_signal(sig).unwrap();
    probert::init().unwrap();
    let h = handler_of(sig);
    assert!(
        h != libc::SIG_DFL && h != libc::SIG_IGN,
        "installed at {sig}"
    );
    assert_eq!(handler_of(default), libc::SIG_DFL, "SIGRTMAX-1 left alone");
    assert_eq!(probert::set_scan_signal(sig), Ok(()), "the same again");
    assert!(matches!(
        probert::set_scan_signal(sig + 2),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        probert::use_quiescent_points(),
        Err(Error::InvalidArgument(_))
    ));
    scans_keep_a_stub_a_thread_is_in();
});

#[test]
fn the_scan_signal_from_the_environment() {
    run_child(
        "the_scan_signal_from_the_environment",
        false,
        &[("PROBERT_SCAN_SIGNAL", "SIGRTMIN+5")],
        || {
            probert::init().unwrap();
            let h = handler_of(libc::SIGRTMIN() + 5);
            assert!(h != libc::SIG_DFL && h != libc::SIG_IGN);
            assert_eq!(handler_of(libc::SIGRTMAX() - 1), libc::SIG_DFL);
            scans_keep_a_stub_a_thread_is_in();
        },
    );
}

#[test]
fn a_bad_scan_signal_in_the_environment_fails_init() {
    run_child(
        "a_bad_scan_signal_in_the_environment_fails_init",
        false,
        &[("PROBERT_SCAN_SIGNAL", "SIGUSR1")],
        || {
            let err = probert::init().unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        },
    );
}

// ---- item 5b: quiescent points --------------------------------------------

/// Deliveries of each real-time signal, counted by handlers the host
/// installed on all of them (it owns them all).
static RT_DELIVERIES: [AtomicU64; 65] = [const { AtomicU64::new(0) }; 65];

extern "C" fn count_rt(sig: i32) {
    RT_DELIVERIES[sig as usize].fetch_add(1, Ordering::SeqCst);
}

fn own_every_rt_signal() {
    for sig in libc::SIGRTMIN()..=libc::SIGRTMAX() {
        unsafe { libc::signal(sig, count_rt as extern "C" fn(i32) as usize) };
    }
}

/// Every real-time signal delivered so far, and those pending now, for the
/// process or this thread (`ShdPnd`, `SigPnd` of `/proc/self/status`; not
/// `SigQ`, which counts the whole user's queued signals).
fn rt_signals_seen() -> (u64, u64) {
    let delivered = RT_DELIVERIES.iter().map(|c| c.load(Ordering::SeqCst)).sum();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let mask = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap()
    };
    let rt = !((1u64 << (libc::SIGRTMIN() - 1)) - 1);
    (delivered, (mask("ShdPnd:") | mask("SigPnd:")) & rt)
}

/// With quiescent points: a registered worker hammers an out-of-line site
/// and reports at its "safepoint" after every call, while this thread
/// attaches and detaches more stubs than a chunk holds. No signal is ever
/// sent, and stubs are recycled without `recycle_stubs`.
fn quiescent_points_recycle_stubs_without_signals(cycles: usize) {
    let me = probert::register_thread().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let worker = {
        let (stop, calls) = (stop.clone(), calls.clone());
        std::thread::spawn(move || {
            let t = probert::register_thread().unwrap();
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(unsafe { t_riprel_mov(5) }, 1005);
                calls.fetch_add(1, Ordering::Relaxed);
                probert::quiescent(t).unwrap();
            }
            probert::unregister_thread(t).unwrap();
        })
    };
    static HITS: AtomicU64 = AtomicU64::new(0);
    let site = addr!(t_riprel_mov);
    let mut most_retired = 0;
    for _ in 0..cycles {
        let id = unsafe { probert::attach_ex(site, count, counter(&HITS), Mode::Trap) }.unwrap();
        probert::detach(id).unwrap();
        let (g, s) = probert::retired_stubs();
        most_retired = most_retired.max(g + s);
    }
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    assert!(calls.load(Ordering::Relaxed) > 0);
    // A chunk holds about a thousand stubs: without recycling, every one of
    // the cycles would still be retired.
    assert!(
        most_retired < 1100,
        "stubs were recycled without recycle_stubs (at most {most_retired} retired)"
    );
    probert::unregister_thread(me).unwrap();
    assert_eq!(rt_signals_seen(), (0, 0), "no signal was sent");
}

isolated!(quiescent_points_send_no_signal_and_still_recycle_stubs, {
    own_every_rt_signal();
    probert::use_quiescent_points().unwrap();
    probert::init().unwrap();
    assert!(matches!(
        probert::set_scan_signal(libc::SIGRTMIN() + 1),
        Err(Error::InvalidArgument(_))
    ));
    quiescent_points_recycle_stubs_without_signals(2500);
});

isolated!(quiescent_points_keep_a_stub_a_registered_thread_is_in, {
    own_every_rt_signal();
    probert::use_quiescent_points().unwrap();
    probert::init().unwrap();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let mut fds = [0i32; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let id = unsafe { probert::attach(addr!(t_read_syscall), count, counter(&HITS)) }.unwrap();
    let reader = std::thread::spawn(move || {
        let t = probert::register_thread().unwrap();
        let mut byte = 0u8;
        let n = unsafe { t_read_byte(fds[0], &mut byte) };
        probert::quiescent(t).unwrap();
        // Parked at a safepoint (offline) until told to go.
        probert::thread_offline(t).unwrap();
        unsafe { libc::read(fds[0], (&mut byte as *mut u8).cast(), 1) };
        probert::thread_online(t).unwrap();
        probert::unregister_thread(t).unwrap();
        n
    });
    while HITS.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    probert::detach(id).unwrap();
    probert::recycle_stubs().unwrap();
    let (grace, scan) = probert::retired_stubs();
    assert_eq!(grace + scan, 1, "no quiescent point yet: the stub stays");
    assert_eq!(unsafe { libc::write(fds[1], b"x".as_ptr().cast(), 1) }, 1);
    // It left the stub and reported, then went offline: reusable.
    let mut tries = 0;
    while probert::retired_stubs() != (0, 0) {
        probert::recycle_stubs().unwrap();
        tries += 1;
        assert!(tries < 20, "the stub was never recycled");
    }
    assert_eq!(unsafe { libc::write(fds[1], b"y".as_ptr().cast(), 1) }, 1);
    assert_eq!(reader.join().unwrap(), 1);
    assert_eq!(rt_signals_seen(), (0, 0), "no signal was sent");
});

isolated!(
    quiescent_points_complete_grace_periods_without_membarrier,
    {
        own_every_rt_signal();
        forbid_membarrier();
        probert::use_quiescent_points().unwrap();
        probert::init().unwrap();
        assert_eq!(probert::barrier_mechanism(), Some(Barrier::QuiescentPoints));
        quiescent_points_recycle_stubs_without_signals(300);
        detach_waits_for_a_running_handler(true);
    }
);

// ---- item 6a: no membarrier -----------------------------------------------

/// Makes `membarrier` fail with `ENOSYS` in every thread of this process, as
/// a seccomp sandbox does.
fn forbid_membarrier() {
    common::forbid_syscall(libc::SYS_membarrier);
    assert_eq!(unsafe { libc::syscall(libc::SYS_membarrier, 0, 0, 0) }, -1);
}

/// `detach` returns only after a handler running on another thread has
/// returned (the grace period's barrier is real). With quiescent points the
/// hitting thread is registered, as the host's promise requires.
fn detach_waits_for_a_running_handler(registered: bool) {
    static IN: AtomicBool = AtomicBool::new(false);
    static RELEASE: AtomicBool = AtomicBool::new(false);
    static FINISHED: AtomicBool = AtomicBool::new(false);
    unsafe extern "C" fn slow(_: *mut Hit) -> u32 {
        IN.store(true, Ordering::SeqCst);
        while !RELEASE.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        FINISHED.store(true, Ordering::SeqCst);
        Action::Continue as u32
    }
    let id =
        unsafe { probert::attach_ex(addr!(t_push_rbp), slow, std::ptr::null_mut(), Mode::Trap) }
            .unwrap();
    let hitter = std::thread::spawn(move || {
        let t = registered.then(|| probert::register_thread().unwrap());
        let r = unsafe { t_push_rbp(1) };
        if let Some(t) = t {
            probert::quiescent(t).unwrap();
            probert::unregister_thread(t).unwrap();
        }
        r
    });
    while !IN.load(Ordering::SeqCst) {
        std::hint::spin_loop();
    }
    let releaser = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(100));
        RELEASE.store(true, Ordering::SeqCst);
    });
    probert::detach(id).unwrap();
    assert!(
        FINISHED.load(Ordering::SeqCst),
        "detach returned while the handler ran"
    );
    assert_eq!(hitter.join().unwrap(), 2);
    releaser.join().unwrap();
}

isolated!(without_membarrier_grace_periods_use_signals, {
    forbid_membarrier();
    probert::init().unwrap();
    assert_eq!(probert::barrier_mechanism(), Some(Barrier::Signals));
    detach_waits_for_a_running_handler(false);
    static HITS: AtomicU64 = AtomicU64::new(0);
    probe_hits(&HITS);
    scans_keep_a_stub_a_thread_is_in();
});

// ---- item 6b: the descriptor limit ----------------------------------------

/// Uses every descriptor the process may open (under a soft limit lowered
/// to 256), as a host at its limit; returns them.
fn fill_descriptors() -> Vec<i32> {
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_cur.min(256);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    let mut fds = Vec::new();
    loop {
        let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
        if fd < 0 {
            break;
        }
        fds.push(fd);
    }
    assert!(
        std::fs::File::open("/proc/self/status").is_err(),
        "at the limit"
    );
    fds
}

isolated!(a_stub_is_kept_at_the_descriptor_limit, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let mut fds = [0i32; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let id = unsafe { probert::attach(addr!(t_read_syscall), count, counter(&HITS)) }.unwrap();
    let reader = std::thread::spawn(move || {
        let mut byte = 0u8;
        unsafe { t_read_byte(fds[0], &mut byte) }
    });
    while HITS.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    let filled = fill_descriptors();
    probert::detach(id).unwrap();
    probert::recycle_stubs().unwrap();
    let (grace, scan) = probert::retired_stubs();
    assert_eq!(grace + scan, 1, "the stub the reader is in stays retired");
    assert_eq!(unsafe { libc::write(fds[1], b"x".as_ptr().cast(), 1) }, 1);
    assert_eq!(reader.join().unwrap(), 1, "the reader left the stub intact");
    // Scans keep working at the limit: the stub is reused once it is free.
    probert::recycle_stubs().unwrap();
    assert_eq!(probert::retired_stubs(), (0, 0));
    for fd in filled {
        unsafe { libc::close(fd) };
    }
});

isolated!(
    a_host_closing_every_descriptor_at_the_limit_gets_no_false_scan,
    {
        // The host closes every descriptor probert holds (closefrom) while at
        // the limit: the thread listing cannot be reopened, and a scan must say
        // "not quiescent" rather than "no threads".
        static HITS: AtomicU64 = AtomicU64::new(0);
        let mut fds = [0i32; 2];
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let id = unsafe { probert::attach(addr!(t_read_syscall), count, counter(&HITS)) }.unwrap();
        let reader = std::thread::spawn(move || {
            let mut byte = 0u8;
            unsafe { t_read_byte(fds[0], &mut byte) }
        });
        while HITS.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        probert::detach(id).unwrap();
        let keep = [0, 1, 2, fds[0], fds[1]];
        for fd in 3..1024 {
            if !keep.contains(&fd) {
                unsafe { libc::close(fd) };
            }
        }
        let filled = fill_descriptors();
        // Recycling fails to scan (or to write the poison: /proc/self/mem is
        // gone too); either way the stub must stay retired.
        let _ = probert::recycle_stubs();
        let (grace, scan) = probert::retired_stubs();
        assert_eq!(grace + scan, 1, "no listing: not quiescent");
        for fd in filled {
            unsafe { libc::close(fd) };
        }
        assert_eq!(unsafe { libc::write(fds[1], b"x".as_ptr().cast(), 1) }, 1);
        assert_eq!(reader.join().unwrap(), 1);
        probert::recycle_stubs().unwrap();
        assert_eq!(probert::retired_stubs(), (0, 0));
    }
);
