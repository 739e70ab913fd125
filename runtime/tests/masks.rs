//! Threads that block signals (issue 13, item 2): a thread that blocks
//! everything (a `sigwait` worker) and a handler installed with a full
//! `sa_mask` run trap-served probed code without dying, because probert
//! keeps `SIGTRAP` out of the masks set through the C library
//! (`sys::masks`). Each test runs in its own process.
#![allow(unsafe_code)]
// Test code calls assembly targets, libc and probert's unsafe attach on
// purpose; the safety premise of every such call is the test itself.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::{count, counter};
use probert::Mode;

std::arch::global_asm!(
    ".text",
    ".p2align 4",
    ".globl m_inc",
    ".type m_inc,@function",
    "m_inc:",
    "lea rax, [rdi + 1]",
    "ret",
    ".size m_inc, .-m_inc",
);

extern "C" {
    fn m_inc(x: u64) -> u64;
}

static HITS: AtomicU64 = AtomicU64::new(0);

fn attach_trap() -> probert::ConsumerId {
    probert::init().unwrap();
    let id = unsafe {
        probert::attach_ex(
            m_inc as *const () as usize,
            count,
            counter(&HITS),
            Mode::Trap,
        )
    }
    .unwrap();
    assert_eq!(
        probert::probe_mode(m_inc as *const () as usize),
        Ok(Mode::Trap)
    );
    id
}

fn trap_blocked() -> bool {
    let mut cur: libc::sigset_t = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur) },
        0
    );
    unsafe { libc::sigismember(&cur, libc::SIGTRAP) == 1 }
}

isolated!(
    a_sigwait_worker_with_every_signal_blocked_runs_trap_served_code,
    {
        let id = attach_trap();
        // Set once the worker's mask is in place: SIGUSR1 sent before that
        // would take its default action and end the process (a loaded CI
        // machine saw it).
        static MASKED: AtomicBool = AtomicBool::new(false);
        let worker = std::thread::spawn(|| {
            let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
            unsafe { libc::sigfillset(&mut all) };
            assert_eq!(
                unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &all, std::ptr::null_mut()) },
                0
            );
            MASKED.store(true, Ordering::SeqCst);
            assert!(!trap_blocked(), "SIGTRAP stays out of the mask");
            // Other signals are blocked as asked: SIGUSR1 waits for sigwait.
            let mut usr1: libc::sigset_t = unsafe { std::mem::zeroed() };
            unsafe {
                libc::sigemptyset(&mut usr1);
                libc::sigaddset(&mut usr1, libc::SIGUSR1);
            }
            let mut sig = 0;
            assert_eq!(unsafe { libc::sigwait(&usr1, &mut sig) }, 0);
            assert_eq!(sig, libc::SIGUSR1);
            unsafe { m_inc(41) }
        });
        // Through sigprocmask too.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        unsafe { libc::sigfillset(&mut all) };
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        assert_eq!(
            unsafe { libc::sigprocmask(libc::SIG_BLOCK, &all, &mut old) },
            0
        );
        assert!(!trap_blocked());
        assert_eq!(unsafe { m_inc(1) }, 2);
        assert_eq!(
            unsafe { libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) },
            0
        );
        while !MASKED.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        use std::os::unix::thread::JoinHandleExt;
        assert_eq!(
            unsafe { libc::pthread_kill(worker.as_pthread_t(), libc::SIGUSR1) },
            0
        );
        assert_eq!(worker.join().unwrap(), 42);
        assert_eq!(HITS.load(Ordering::SeqCst), 2);
        probert::detach(id).unwrap();
    }
);

static IN_HANDLER: AtomicU64 = AtomicU64::new(0);

extern "C" fn full_mask_handler(_: i32) {
    IN_HANDLER.store(unsafe { m_inc(99) }, Ordering::SeqCst);
}

isolated!(a_handler_with_a_full_sa_mask_runs_probed_code, {
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = full_mask_handler as *const () as usize;
        libc::sigfillset(&mut act.sa_mask);
        assert_eq!(
            libc::sigaction(libc::SIGUSR1, &act, std::ptr::null_mut()),
            0
        );
    }
    let id = attach_trap();
    assert_eq!(unsafe { libc::raise(libc::SIGUSR1) }, 0);
    assert_eq!(IN_HANDLER.load(Ordering::SeqCst), 100);
    assert_eq!(HITS.load(Ordering::SeqCst), 1);
    probert::detach(id).unwrap();
});

/// Not a test: the cost of the interposed `pthread_sigmask` against the C
/// library's (`cargo test --release --test masks -- --ignored --nocapture`).
#[test]
#[ignore]
fn bench_pthread_sigmask() {
    type F = unsafe extern "C" fn(i32, *const libc::sigset_t, *mut libc::sigset_t) -> i32;
    let libc_fn: F = unsafe {
        std::mem::transmute::<*mut libc::c_void, F>(libc::dlsym(
            libc::RTLD_NEXT,
            c"pthread_sigmask".as_ptr(),
        ))
    };
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe { libc::sigaddset(&mut set, libc::SIGUSR2) };
    let n = 200_000;
    for (name, f) in [("probert", libc::pthread_sigmask as F), ("libc", libc_fn)] {
        let t = std::time::Instant::now();
        for _ in 0..n {
            unsafe {
                f(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                f(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            }
        }
        println!(
            "{name}: {:.1} ns per call",
            t.elapsed().as_nanos() as f64 / (2 * n) as f64
        );
    }
}
