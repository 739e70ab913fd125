//! Process-wide memory barrier: the heavy side of an asymmetric fence.
//!
//! Readers (the trap handler, fast-path dispatchers) pay only a compiler
//! fence; the rare writer calls [`barrier`], which makes every thread of the
//! process execute a full memory barrier before it returns. Between the two, a
//! store-then-load on each side can no longer both miss the other's store.
//! This is the scheme of `membarrier(2)`, Linux RCU's `sys_membarrier` users,
//! folly's `asymmetricHeavyBarrier`, .NET's `FlushProcessWriteBuffers` and
//! liburcu's signal flavour.
//!
//! [`init_barrier`] picks the first mechanism that is a real barrier here
//! ([`Barrier`]), and fails if there is none, rather than degrade:
//!
//! 1. `MEMBARRIER_CMD_PRIVATE_EXPEDITED` (Linux 4.14+), after a one-time
//!    `MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED`. The kernel IPIs every CPU
//!    currently running a thread of this process and executes a full barrier
//!    there; threads not running get one at their next context switch.
//! 2. `MEMBARRIER_CMD_GLOBAL` (Linux 4.3+): the same guarantee for every
//!    thread of the system, through an RCU grace period — milliseconds, but
//!    no signal and no help from the host.
//! 3. Without `membarrier` (seccomp-filtered, or older kernels): the host's
//!    quiescent points, if it chose them (`sys::quiescent`: every registered
//!    thread reports between two fences), else the signal barrier
//!    (`threads::signal_barrier`: every thread takes the scan signal and runs
//!    a full fence in its handler, or is seen asleep in the kernel). The
//!    signal barrier needs the scan signal's handler and a listing of
//!    `/proc/self/task`; without them initialisation fails.
//!
//! A mechanism that fails later (a seccomp filter installed after
//! initialisation) is replaced by the next that works, at the barrier that
//! notices. The TLB-shootdown trick (`mprotect` of a touched page, as .NET
//! and folly do) is not used: it is a barrier only where the kernel flushes
//! remote TLBs by IPI, which broadcast invalidation (AMD `INVLPGB`, arm64
//! `TLBI …IS`) does not.
//!
//! Every path also issues a local `SeqCst` fence on both sides, so the
//! caller's own accesses are ordered around the remote barriers.
//!
//! [`sync_core`] is the variant for cross-modifying code: after it returns,
//! every thread has executed a core-serializing instruction, so none runs a
//! stale pre-decoded copy of bytes written before the call.
//!
//! # Safety
//!
//! The unsafe code here is raw `membarrier` system calls.

#![allow(unsafe_code)]

use std::sync::atomic::{fence, AtomicU8, Ordering};

use super::raw;
use super::scan_mode::{self, ScanMode};
use crate::error::{Error, Result};

/// `MEMBARRIER_CMD_QUERY`: returns the mask of supported commands.
const CMD_QUERY: i64 = 0;
/// `MEMBARRIER_CMD_GLOBAL` (formerly `MEMBARRIER_CMD_SHARED`).
const CMD_GLOBAL: i64 = 1;
/// `MEMBARRIER_CMD_PRIVATE_EXPEDITED`.
const CMD_PRIVATE_EXPEDITED: i64 = 1 << 3;
/// `MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED`.
const CMD_REGISTER_PRIVATE_EXPEDITED: i64 = 1 << 4;
/// `MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE`.
const CMD_PRIVATE_EXPEDITED_SYNC_CORE: i64 = 1 << 5;
/// `MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE`.
const CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: i64 = 1 << 6;

/// Registration state: not tried yet.
const UNKNOWN: u8 = 0;
/// Registration state: registered, the command works.
const REGISTERED: u8 = 1;
/// Registration state: the kernel lacks (or refused) the command.
const UNSUPPORTED: u8 = 2;

/// State of `PRIVATE_EXPEDITED`.
static EXPEDITED: AtomicU8 = AtomicU8::new(UNKNOWN);
/// State of `PRIVATE_EXPEDITED_SYNC_CORE`.
static SYNC_CORE: AtomicU8 = AtomicU8::new(UNKNOWN);
/// The [`Barrier`] in use, as `1 + discriminant`; 0 before [`init_barrier`].
static MECHANISM: AtomicU8 = AtomicU8::new(0);

/// How the memory barrier of every grace period reaches every thread
/// (`membarrier`, or what stands in for it where it is missing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Barrier {
    /// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`: microseconds.
    MembarrierExpedited,
    /// `membarrier(MEMBARRIER_CMD_GLOBAL)`: an RCU grace period, milliseconds.
    MembarrierGlobal,
    /// Every registered thread passes a quiescent point (the host's
    /// safepoints): as long as the slowest takes.
    QuiescentPoints,
    /// Every thread takes the scan signal (or is seen asleep in the kernel):
    /// tens of microseconds per thread.
    Signals,
}

const ALL: [Barrier; 4] = [
    Barrier::MembarrierExpedited,
    Barrier::MembarrierGlobal,
    Barrier::QuiescentPoints,
    Barrier::Signals,
];

/// Raw `membarrier(cmd, flags = 0, cpu_id = 0)`.
fn membarrier(cmd: i64) -> Result<i64, i32> {
    // SAFETY: membarrier takes no pointers; any command is memory-safe.
    raw::check(unsafe { raw::syscall3(libc::SYS_membarrier, cmd, 0, 0) })
}

/// Registers for `command` with `register_cmd` once, caching the outcome in
/// `state`. Idempotent and thread-safe: racing first calls both register,
/// which the kernel accepts.
fn register(state: &AtomicU8, command: i64, register_cmd: i64) -> bool {
    // Ordering: Acquire so a thread that sees REGISTERED issues its command
    // after the registering thread's system call — pairs with the Release
    // store below.
    match state.load(Ordering::Acquire) {
        REGISTERED => return true,
        UNSUPPORTED => return false,
        _ => {}
    }
    let ok = membarrier(CMD_QUERY)
        .is_ok_and(|mask| mask & command != 0 && mask & register_cmd != 0)
        && membarrier(register_cmd).is_ok();
    // Ordering: Release publishes "registered" after the registration —
    // pairs with the Acquire load above.
    state.store(if ok { REGISTERED } else { UNSUPPORTED }, Ordering::Release);
    ok
}

/// Registers for `MEMBARRIER_CMD_PRIVATE_EXPEDITED` (once). Returns whether
/// it is available; [`init_barrier`] decides what [`barrier`] uses.
/// Idempotent and thread-safe.
pub fn init() -> bool {
    register(
        &EXPEDITED,
        CMD_PRIVATE_EXPEDITED,
        CMD_REGISTER_PRIVATE_EXPEDITED,
    )
}

/// The mechanism [`barrier`] uses, once [`init_barrier`] has chosen one.
pub fn mechanism() -> Option<Barrier> {
    // Ordering: Acquire — pairs with the Release in `choose`: the
    // mechanism's own set-up (registration, handler) happened before.
    let m = MECHANISM.load(Ordering::Acquire);
    ALL.get(usize::from(m).checked_sub(1)?).copied()
}

/// Chooses the mechanism of [`barrier`] (once; see the module docs), and
/// fails with [`Error::Signal`] if none is a real barrier here: no
/// `membarrier`, and neither quiescent points nor the signal barrier (the
/// scan signal has a host handler, or `/proc/self/task` cannot be listed).
/// Idempotent and thread-safe. Normal context.
pub fn init_barrier() -> Result<Barrier> {
    if let Some(m) = mechanism() {
        return Ok(m);
    }
    choose(&ALL)
}

/// The first of `candidates` that works here, stored as the mechanism.
fn choose(candidates: &[Barrier]) -> Result<Barrier> {
    let mut why = Vec::new();
    for &m in candidates {
        match available(m) {
            Ok(()) => {
                // Ordering: Release — publishes the choice after the set-up
                // `available` did — pairs with the Acquire in `mechanism`.
                MECHANISM.store(m as u8 + 1, Ordering::Release);
                return Ok(m);
            }
            Err(e) => why.push(format!("{m:?}: {e}")),
        }
    }
    Err(Error::Signal(
        format!(
            "no process-wide memory barrier is available ({}); allow membarrier(2), or give \
             probert a scan signal and /proc, or use quiescent points",
            why.join("; ")
        )
        .into(),
    ))
}

/// Whether `m` works here, setting it up if needed.
fn available(m: Barrier) -> Result<()> {
    let unavailable = |what: &str| Err(Error::Signal(what.to_owned().into()));
    match m {
        Barrier::MembarrierExpedited => {
            if init() && membarrier(CMD_PRIVATE_EXPEDITED).is_ok() {
                Ok(())
            } else {
                unavailable("membarrier PRIVATE_EXPEDITED unavailable")
            }
        }
        Barrier::MembarrierGlobal => {
            if membarrier(CMD_QUERY).is_ok_and(|mask| mask & CMD_GLOBAL != 0)
                && membarrier(CMD_GLOBAL).is_ok()
            {
                Ok(())
            } else {
                unavailable("membarrier GLOBAL unavailable")
            }
        }
        Barrier::QuiescentPoints => match scan_mode::freeze()? {
            ScanMode::QuiescentPoints => Ok(()),
            ScanMode::Signal(_) => unavailable("quiescent points not chosen"),
        },
        Barrier::Signals => match scan_mode::freeze()? {
            ScanMode::QuiescentPoints => unavailable("quiescent points chosen: no signals"),
            ScanMode::Signal(_) => {
                super::threads::scan_init()?;
                if super::tasks::open() && super::tasks::list_tids().is_some() {
                    Ok(())
                } else {
                    unavailable("/proc/self/task cannot be listed")
                }
            }
        },
    }
}

/// Issues a full memory barrier on every thread of the process.
///
/// Costs one IPI round (microseconds) with `membarrier`, more with the
/// fallbacks (see [`Barrier`]); blocks until every thread is covered.
/// Normal context only. Pairs with the readers' compiler fences.
pub fn barrier() {
    // Ordering: SeqCst orders the caller's earlier accesses before the
    // remote barriers — pairs with the readers' `compiler_fence(SeqCst)`.
    fence(Ordering::SeqCst);
    let mut m = match mechanism().map_or_else(init_barrier, Ok) {
        Ok(m) => m,
        Err(e) => no_barrier(&e),
    };
    while let Err(e) = barrier_with(m) {
        // It stopped working (a seccomp filter installed since, the scan
        // handler replaced): the next one that works, for good.
        let rest = ALL
            .iter()
            .position(|&c| c == m)
            .map_or(&[][..], |i| &ALL[i + 1..]);
        m = match choose(rest) {
            Ok(next) => next,
            Err(_) => no_barrier(&e),
        };
    }
    // Ordering: SeqCst orders the caller's later accesses after the remote
    // barriers — pairs with the readers' `compiler_fence(SeqCst)`.
    fence(Ordering::SeqCst);
}

/// A grace period without a barrier would be silently unsafe: stop.
fn no_barrier(e: &Error) -> ! {
    eprintln!("probert: no process-wide memory barrier is left ({e}); aborting");
    std::process::abort()
}

/// One barrier by `m`; `Err` if `m` does not work (any more).
fn barrier_with(m: Barrier) -> Result<()> {
    let failed = |errno: i32| {
        Error::Signal(
            format!(
                "membarrier failed: {}",
                std::io::Error::from_raw_os_error(errno)
            )
            .into(),
        )
    };
    match m {
        Barrier::MembarrierExpedited => membarrier(CMD_PRIVATE_EXPEDITED).map(drop).map_err(failed),
        Barrier::MembarrierGlobal => membarrier(CMD_GLOBAL).map(drop).map_err(failed),
        Barrier::QuiescentPoints => {
            super::quiescent::wait(None);
            Ok(())
        }
        Barrier::Signals => super::threads::signal_barrier(),
    }
}

/// Registers for `MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE` (Linux 4.16+,
/// once). Returns `false` if the kernel does not support it, in which case
/// [`sync_core`] falls back to [`barrier`]. Idempotent and thread-safe.
pub fn register_sync_core() -> bool {
    register(
        &SYNC_CORE,
        CMD_PRIVATE_EXPEDITED_SYNC_CORE,
        CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE,
    )
}

/// Makes every thread of the process execute a core-serializing instruction
/// (and a full memory barrier) before returning: the step between code writes
/// in the `int3`-first cross-modification protocol.
///
/// Uses `MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE`, registering on first
/// use. Without it, falls back to [`barrier`], which is not a serializing
/// guarantee; fast sites, the protocol's only user, are refused where
/// `register_sync_core` fails (`site::Sites::new`). Normal context only.
pub fn sync_core() {
    // Ordering: SeqCst orders the code writes before the remote
    // serialization — pairs with the instruction fetch of the other threads
    // (which the IPI serializes).
    fence(Ordering::SeqCst);
    if !(register_sync_core() && membarrier(CMD_PRIVATE_EXPEDITED_SYNC_CORE).is_ok()) {
        barrier();
    }
    // Ordering: SeqCst, as above, for the caller's later accesses.
    fence(Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{compiler_fence, AtomicBool, AtomicU32, AtomicU64};
    use std::sync::{Arc, Mutex};

    #[test]
    fn init_is_idempotent_and_thread_safe() {
        let first = init();
        let results: Vec<bool> = (0..8)
            .map(|_| std::thread::spawn(init))
            .map(|t| t.join().expect("init thread"))
            .collect();
        assert!(results.iter().all(|&r| r == first));
        // Linux 4.14+ has it; a sandbox may filter it, which is not a bug.
        if !first {
            eprintln!("membarrier PRIVATE_EXPEDITED unavailable: fallback in use");
        }
    }

    #[test]
    fn barriers_run_concurrently() {
        let threads: Vec<_> = (0..4)
            .map(|i| {
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        match i % 3 {
                            0 => barrier(),
                            1 => {
                                let _ = barrier_with(Barrier::MembarrierExpedited);
                            }
                            _ => sync_core(),
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("barrier thread");
        }
        assert_eq!(register_sync_core(), register_sync_core());
    }

    /// Spins a while, then yields: on a loaded machine the other side may
    /// need this CPU to make progress.
    fn spin_or_yield(spins: &mut u32) {
        *spins += 1;
        if *spins < 1000 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }

    /// Store buffering with an asymmetric fence: the light side stores X and
    /// loads Y with only a compiler fence, the heavy side stores Y, calls
    /// `heavy`, loads X. Both loads seeing 0 is forbidden. (Without `heavy`
    /// x86 shows it within a few thousand rounds when both threads run at
    /// once; whether they do is up to the scheduler, so a pass is evidence,
    /// not proof.)
    fn store_buffering(heavy: fn(), rounds: u64) {
        // One litmus at a time: they spin, and a 2-CPU machine has room for
        // one pair.
        static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
        let _serial = ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let xy = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
        let go = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let r1 = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let light = {
            let (go, done, r1, stop) = (go.clone(), done.clone(), r1.clone(), stop.clone());
            let xy = xy.clone();
            std::thread::spawn(move || {
                let [x, y] = &*xy;
                let (mut seen, mut spins) = (0, 0u32);
                // Ordering: Relaxed — the test's own flag; joins below.
                while !stop.load(Ordering::Relaxed) {
                    // Ordering: Acquire sees the round's reset of X/Y —
                    // pairs with the Release store of `go` below.
                    let round = go.load(Ordering::Acquire);
                    if round == seen {
                        spin_or_yield(&mut spins);
                        continue;
                    }
                    (seen, spins) = (round, 0);
                    // Ordering: Relaxed on purpose: the light side of an
                    // asymmetric fence — pairs with `heavy`.
                    x.store(1, Ordering::Relaxed);
                    compiler_fence(Ordering::SeqCst);
                    // Ordering: Relaxed, the light side, as above.
                    r1.store(y.load(Ordering::Relaxed), Ordering::Relaxed);
                    // Ordering: Release hands r1 over — pairs with the
                    // Acquire load of `done` below.
                    done.store(round, Ordering::Release);
                }
            })
        };
        let [x, y] = &*xy;
        for round in 1..=rounds {
            // Ordering: Relaxed — published by the Release store of `go`.
            x.store(0, Ordering::Relaxed);
            // Ordering: Relaxed — as above.
            y.store(0, Ordering::Relaxed);
            // Ordering: Release publishes the reset — pairs with the light
            // thread's Acquire load of `go`.
            go.store(round, Ordering::Release);
            // Ordering: Relaxed: the heavy side relies on `heavy`.
            y.store(1, Ordering::Relaxed);
            heavy();
            // Ordering: Relaxed: the heavy side relies on `heavy`.
            let r2 = x.load(Ordering::Relaxed);
            // Ordering: Acquire reads the light thread's r1 — pairs with its
            // Release store of `done`.
            let mut spins = 0;
            while done.load(Ordering::Acquire) != round {
                spin_or_yield(&mut spins);
            }
            // Ordering: Relaxed — ordered by `done`.
            let r1 = r1.load(Ordering::Relaxed);
            assert!(r1 == 1 || r2 == 1, "store buffering seen in round {round}");
        }
        // Ordering: Relaxed — the thread is joined right after.
        stop.store(true, Ordering::Relaxed);
        light.join().expect("light thread");
    }

    #[test]
    fn membarrier_forbids_store_buffering() {
        if init() {
            store_buffering(barrier, 5_000);
        }
    }

    /// Makes `membarrier` fail with `errno` for every thread of this
    /// process, as a seccomp sandbox does: a filter returning `errno` for
    /// `membarrier` and allowing everything else, synchronised to every
    /// thread.
    pub(crate) fn forbid_membarrier(errno: u32) {
        // Classic BPF: the architecture, then the system call number.
        const LD_W_ABS: u16 = 0x20;
        const JEQ_K: u16 = 0x15;
        const RET_K: u16 = 0x06;
        const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
        const RET_ALLOW: u32 = 0x7fff_0000;
        const RET_ERRNO: u32 = 0x0005_0000;
        let ins = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
        let filter = [
            ins(LD_W_ABS, 0, 0, 4),
            ins(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
            ins(RET_K, 0, 0, RET_ALLOW),
            ins(LD_W_ABS, 0, 0, 0),
            ins(JEQ_K, 0, 1, libc::SYS_membarrier as u32),
            ins(RET_K, 0, 0, RET_ERRNO | (errno & 0xffff)),
            ins(RET_K, 0, 0, RET_ALLOW),
        ];
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: installs a valid filter on this process (a test child):
        // no_new_privs first, as unprivileged seccomp requires; TSYNC (1)
        // applies it to every thread.
        unsafe {
            assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
            assert_eq!(
                libc::syscall(libc::SYS_seccomp, 1, 1, &prog as *const libc::sock_fprog),
                0,
                "seccomp: {}",
                std::io::Error::last_os_error()
            );
        }
        assert_eq!(membarrier(CMD_QUERY), Err(errno as i32));
    }

    fn without_membarrier_the_signal_barrier_forbids_store_buffering(errno: u32) {
        forbid_membarrier(errno);
        assert_eq!(init_barrier(), Ok(Barrier::Signals));
        assert_eq!(mechanism(), Some(Barrier::Signals));
        store_buffering(barrier, 5_000);
        // sync_core without SYNC_CORE falls back to the barrier.
        assert!(!register_sync_core());
        sync_core();
    }

    #[test]
    fn membarrier_filtered_with_enosys_falls_back_to_signals() {
        crate::sys::threads::in_own_process(
            "sys::membarrier::tests::membarrier_filtered_with_enosys_falls_back_to_signals",
            || without_membarrier_the_signal_barrier_forbids_store_buffering(libc::ENOSYS as u32),
        );
    }

    #[test]
    fn membarrier_filtered_with_eperm_falls_back_to_signals() {
        crate::sys::threads::in_own_process(
            "sys::membarrier::tests::membarrier_filtered_with_eperm_falls_back_to_signals",
            || without_membarrier_the_signal_barrier_forbids_store_buffering(libc::EPERM as u32),
        );
    }

    #[test]
    fn a_filter_installed_after_init_moves_barriers_to_signals() {
        crate::sys::threads::in_own_process(
            "sys::membarrier::tests::a_filter_installed_after_init_moves_barriers_to_signals",
            || {
                if init_barrier() != Ok(Barrier::MembarrierExpedited) {
                    return;
                }
                forbid_membarrier(libc::EPERM as u32);
                barrier();
                assert_eq!(mechanism(), Some(Barrier::Signals));
                store_buffering(barrier, 2_000);
            },
        );
    }

    #[test]
    fn without_membarrier_or_a_listing_init_fails() {
        crate::sys::threads::in_own_process(
            "sys::membarrier::tests::without_membarrier_or_a_listing_init_fails",
            || {
                forbid_membarrier(libc::ENOSYS as u32);
                // At the descriptor limit before /proc/self/task was ever
                // opened: the signal barrier could not list the threads.
                let filled = crate::sys::threads::test_support::fill_descriptors();
                let err = init_barrier().expect_err("no barrier");
                assert!(matches!(err, Error::Signal(_)), "{err}");
                assert_eq!(mechanism(), None);
                drop(filled);
                assert_eq!(init_barrier(), Ok(Barrier::Signals));
            },
        );
    }

    /// Cost of one barrier by each mechanism available here, with 0 and 4
    /// other threads (sleeping in `nanosleep`, or spinning), and of the
    /// quiescent-point wait with a worker reporting from a tight loop. A
    /// benchmark, not a test: run with `--ignored --nocapture` (in its own
    /// process: it installs the scan handler).
    #[test]
    #[ignore]
    fn barrier_costs() {
        use std::time::{Duration, Instant};
        fn per_call(n: u32, mut f: impl FnMut()) -> f64 {
            for _ in 0..n / 10 + 1 {
                f();
            }
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_nanos() as f64 / f64::from(n)
        }
        crate::sys::threads::scan_init().expect("scan handler");
        let row = |what: &str| {
            let n = if what.contains("GLOBAL") { 20 } else { 2_000 };
            let m = match what {
                "PRIVATE_EXPEDITED" => Barrier::MembarrierExpedited,
                "GLOBAL" => Barrier::MembarrierGlobal,
                _ => Barrier::Signals,
            };
            if available(m).is_err() {
                return format!("{what:>18}: unavailable");
            }
            let ns = per_call(n, || barrier_with(m).expect("barrier"));
            format!("{what:>18}: {:>9.1} us", ns / 1000.0)
        };
        for (label, spin) in [("idle", false), ("spinning", true)] {
            for others in [0usize, 4] {
                let stop = Arc::new(AtomicBool::new(false));
                let threads: Vec<_> = (0..others)
                    .map(|_| {
                        let stop = stop.clone();
                        std::thread::spawn(move || {
                            // Ordering: Relaxed — a benchmark flag.
                            while !stop.load(Ordering::Relaxed) {
                                if spin {
                                    std::hint::spin_loop();
                                } else {
                                    std::thread::sleep(Duration::from_millis(1));
                                }
                            }
                        })
                    })
                    .collect();
                println!("{others} other threads, {label}:");
                for what in ["PRIVATE_EXPEDITED", "GLOBAL", "signals"] {
                    println!("  {}", row(what));
                }
                // Ordering: Relaxed — joined right after.
                stop.store(true, Ordering::Relaxed);
                for t in threads {
                    t.join().expect("join");
                }
            }
        }
        // A thread scan by signals of one range no thread is in (the other
        // thread of this process: the test harness's, asleep), frames walked.
        let ns = per_call(500, || {
            let r = crate::sys::threads::quiescent(&[(1, 2)], Duration::from_secs(1));
            assert_eq!(r, Ok(true));
        });
        println!(
            "thread scan by signals, 1 other thread: {:.1} us",
            ns / 1000.0
        );
        // Quiescent points: one worker reporting in a loop.
        let stop = Arc::new(AtomicBool::new(false));
        let worker = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let h = super::super::quiescent::register().expect("register");
                // Ordering: Relaxed — a benchmark flag.
                while !stop.load(Ordering::Relaxed) {
                    super::super::quiescent::quiescent(h).expect("qs");
                    std::hint::spin_loop();
                }
                super::super::quiescent::unregister(h).expect("unregister");
            })
        };
        std::thread::sleep(Duration::from_millis(10));
        let ns = per_call(2_000, || {
            super::super::quiescent::wait(None);
        });
        println!(
            "quiescent-point wait (a scan, or a barrier), 1 worker reporting in a loop: \
             {:.1} us",
            ns / 1000.0
        );
        // Ordering: Relaxed — joined right after.
        stop.store(true, Ordering::Relaxed);
        worker.join().expect("join");
        let h = super::super::quiescent::register().expect("register");
        let ns = per_call(10_000_000, || {
            super::super::quiescent::quiescent(h).expect("qs");
        });
        println!("probert_quiescent with nothing waiting: {ns:.2} ns");
        super::super::quiescent::unregister(h).expect("unregister");
    }

    #[test]
    fn the_signal_barrier_forbids_store_buffering() {
        crate::sys::threads::in_own_process(
            "sys::membarrier::tests::the_signal_barrier_forbids_store_buffering",
            || {
                store_buffering(
                    || barrier_with(Barrier::Signals).expect("signal barrier"),
                    5_000,
                )
            },
        );
    }
}
