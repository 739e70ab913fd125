//! Quiescent points: threads the host registers, and that tell probert at
//! their own safepoints that they run no probed code — in place of scan
//! signals, for hosts that forbid foreign signals (see `sys::scan_mode`).
//!
//! This is the quiescent-state-based scheme of userspace RCU's QSBR flavour
//! (liburcu `rcu_quiescent_state`, `rcu_thread_offline`): a global
//! grace-period number, one counter per registered thread, and a waiter that
//! bumps the number and waits until every online thread's counter has
//! caught up.
//!
//! - [`register`] gives the calling thread a record and a handle
//!   ([`HostThread`]: index and generation, so a stale handle is
//!   [`Error::NotFound`], never a crash). The thread starts *online*.
//! - [`quiescent`] — the host's safepoint: one load and a compare when
//!   nothing waits; when a wait is in progress, fences, a store and a futex
//!   wake, once per wait.
//! - [`offline`] / [`online`]: around a long blocking call, so that waits do
//!   not wait for it.
//! - [`wait`] (a thread scan, or the memory barrier without `membarrier`):
//!   bumps the grace-period number, then waits until every registered thread
//!   other than the caller is offline, has passed a quiescent point since, is
//!   unregistered, or has exited.
//!
//! # The host's promise
//!
//! A registered thread, between a quiescent point (or going offline) and
//! its return to the host's code, and while offline, executes nothing that
//! probert may have patched or placed: no probed instruction, no out-of-line
//! stub, no probert handler. The safepoint code and whatever a thread runs
//! while offline must therefore stay unprobed, and `quiescent` must not be
//! called from a probert handler nor from a signal handler that may have
//! interrupted probed code. A thread that is not registered at all runs no
//! probed code, ever. probert cannot check either promise: a thread that
//! breaks it may be inside a stub probert reuses.
//!
//! # Why this is correct
//!
//! A scan's ranges are unreachable before [`wait`] bumps the number; a
//! thread that then reports the new number (or goes offline, or exits) was,
//! at that moment, outside them by the promise, and cannot enter them again.
//! As a memory barrier: [`quiescent`] loads the number, then executes a full
//! fence before it stores its counter and another after; the waiter fences
//! before bumping the number and after reading the counters. So every access
//! the thread made before its report happens before the waiter's return
//! (the waiter acquires the counter), and every access after it happens
//! after the waiter's bump (the thread's load read the bump, and its fence
//! follows) — the two halves `membarrier` gives. Going online stores the
//! counter, then fences: a waiter that still read it offline is ordered
//! before the thread's accesses by the same store-buffering argument.
//!
//! # Safety
//!
//! No unsafe code but the futex system calls on a static word.
#![allow(unsafe_code)]

use std::sync::atomic::{fence, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;

use super::raw;
use crate::error::{Error, Result};

/// Most threads registered at once.
pub const MAX_THREADS: usize = 4096;
/// Bits of a handle holding the record index (plus one).
const INDEX_BITS: u32 = 20;

/// A registered thread, as the host names it: the record index and the
/// registration's generation. 0 is never a valid handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostThread(pub u64);

/// One registered thread. Each lives alone in a [`CachePadded`] block: its
/// owner writes it at every report, waiters only read it.
#[derive(Debug)]
struct Record {
    /// `2 * generation + 1` while registered, even while free.
    state: AtomicU64,
    /// 0 while offline; else the last grace-period number the thread
    /// reported (written by the owner only).
    ctr: AtomicU64,
    /// The owner's thread id (waiters skip their own record).
    tid: AtomicI32,
}

#[allow(clippy::declare_interior_mutable_const)] // only initialises RECORDS
const FREE: CachePadded<Record> = CachePadded::new(Record {
    state: AtomicU64::new(0),
    ctr: AtomicU64::new(0),
    tid: AtomicI32::new(0),
});

static RECORDS: [CachePadded<Record>; MAX_THREADS] = [FREE; MAX_THREADS];
/// Records `[0, HIGH)` have ever been used.
static HIGH: AtomicUsize = AtomicUsize::new(0);
/// The grace-period number: never 0 (0 marks "offline").
static GP: AtomicU64 = AtomicU64::new(1);
/// Threads inside [`wait`]: reports wake them only then.
static WAITERS: AtomicU32 = AtomicU32::new(0);
/// Futex word bumped by reports while someone waits.
static EVENTS: AtomicU32 = AtomicU32::new(0);

/// Registers the calling thread, online. [`Error::NoMemory`] if
/// [`MAX_THREADS`] are registered. Normal context (or a signal handler: it
/// takes no lock and allocates nothing).
pub fn register() -> Result<HostThread> {
    let tid = super::threads::gettid();
    let claim = |idx: usize| -> Option<HostThread> {
        let rec = &RECORDS[idx];
        // Ordering: Relaxed — a hint; the CAS decides.
        let st = rec.state.load(Ordering::Relaxed);
        if st & 1 != 0 {
            return None;
        }
        // Ordering: Acquire on success — takes over the record after its
        // last owner's release (the Release store in `unregister`).
        rec.state
            .compare_exchange(st, st + 1, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        // Ordering: Relaxed — read by waiters only to skip their own record.
        rec.tid.store(tid, Ordering::Relaxed);
        // Online at the current number: registering is a quiescent point.
        // Ordering: Relaxed load, Release store, then the SeqCst fence of
        // `online` — pairs with the Acquire loads and fences in `wait`.
        rec.ctr.store(GP.load(Ordering::Relaxed), Ordering::Release);
        // Ordering: SeqCst — as in `online`.
        fence(Ordering::SeqCst);
        Some(HostThread(((st + 1) << INDEX_BITS) | (idx as u64 + 1)))
    };
    // Ordering: Acquire — records below it were claimed (and published).
    let high = HIGH.load(Ordering::Acquire).min(MAX_THREADS);
    if let Some(h) = (0..high).find_map(claim) {
        return Ok(h);
    }
    loop {
        // Ordering: AcqRel — hands out a fresh index exactly once.
        let idx = HIGH.fetch_add(1, Ordering::AcqRel);
        if idx >= MAX_THREADS {
            // Ordering: Relaxed — only bounds `HIGH` again.
            HIGH.store(MAX_THREADS, Ordering::Relaxed);
            return Err(Error::NoMemory(
                "more threads registered for quiescent points than MAX_THREADS".into(),
            ));
        }
        if let Some(h) = claim(idx) {
            return Ok(h);
        }
    }
}

/// The record of `h` and its registration state, if `h` names a live
/// registration.
///
/// # Signal safety
/// Arithmetic and one atomic load.
fn record(h: HostThread) -> Result<(&'static Record, u64)> {
    let idx = (h.0 & ((1 << INDEX_BITS) - 1)) as usize;
    let st = h.0 >> INDEX_BITS;
    let rec = idx
        .checked_sub(1)
        .and_then(|i| RECORDS.get(i))
        .ok_or(Error::NotFound)?;
    // Ordering: Relaxed — the owner's own registration (or a stale handle,
    // refused); nothing is published through it here.
    if st & 1 == 0 || rec.state.load(Ordering::Relaxed) != st {
        return Err(Error::NotFound);
    }
    Ok((rec, st))
}

/// Unregisters `h` (the thread, or another thread after its last use of
/// `h`): waits no longer wait for it, and the handle becomes stale.
pub fn unregister(h: HostThread) -> Result<()> {
    let (rec, st) = record(h)?;
    // Ordering: SeqCst fence, then the stores — as `offline`.
    fence(Ordering::SeqCst);
    // Ordering: Release — pairs with the Acquire load in `all_passed`.
    rec.ctr.store(0, Ordering::Release);
    // Ordering: Relaxed — see `register`.
    rec.tid.store(0, Ordering::Relaxed);
    // Ordering: Release — hands the record to the next registrant (Acquire
    // CAS in `register`); waiters re-check it (Acquire in `wait`).
    rec.state.store(st + 1, Ordering::Release);
    // Ordering: SeqCst — the stores before WAITERS is read (as in `report`).
    fence(Ordering::SeqCst);
    wake_waiters();
    Ok(())
}

/// A quiescent point of the thread `h` (see the module docs for the
/// promise it makes). Cheap when nothing waits: one load and a compare.
/// Called from inside a probert handler, it reports nothing.
///
/// # Signal safety
/// Atomics, a scan of the thread's read-side slots and at most one raw
/// `futex` wake: no lock, no allocation.
#[inline]
pub fn quiescent(h: HostThread) -> Result<()> {
    let (rec, _) = record(h)?;
    // Ordering: Relaxed — the SeqCst fence in `report` orders what follows
    // after this load; see "Why this is correct".
    let g = GP.load(Ordering::Relaxed);
    // Ordering: Relaxed — our own counter.
    let c = rec.ctr.load(Ordering::Relaxed);
    if c == g || c == 0 {
        // Reported already, or offline (a quiescent point changes nothing).
        return Ok(());
    }
    if crate::grace::in_section() {
        // Called from a probert handler (against the promise): the thread
        // resumes in probed code or a stub, so this is no quiescent point.
        // Checked only here, where a report would be made.
        return Ok(());
    }
    report(rec, g);
    Ok(())
}

/// The slow path of [`quiescent`]: store the number between two fences and
/// wake the waiters.
///
/// # Signal safety
/// As [`quiescent`].
#[cold]
fn report(rec: &Record, g: u64) {
    // Ordering: SeqCst — everything before the report happens before a
    // waiter that reads it — pairs with the fences in `wait`.
    fence(Ordering::SeqCst);
    // Ordering: Release — pairs with the Acquire load in `all_passed`.
    rec.ctr.store(g, Ordering::Release);
    // Ordering: SeqCst — the report is visible before we read WAITERS (a
    // waiter increments WAITERS before reading counters) — pairs with the
    // fence after the increment in `wait`.
    fence(Ordering::SeqCst);
    wake_waiters();
}

/// Takes the thread `h` offline: waits do not wait for it until
/// [`online`]. While offline it must run no probed code.
///
/// # Signal safety
/// As [`quiescent`].
pub fn offline(h: HostThread) -> Result<()> {
    let (rec, _) = record(h)?;
    // Ordering: SeqCst fences around the store, as in `report`.
    fence(Ordering::SeqCst);
    // Ordering: Release — pairs with the Acquire load in `all_passed`.
    rec.ctr.store(0, Ordering::Release);
    // Ordering: SeqCst — as the second fence in `report`.
    fence(Ordering::SeqCst);
    wake_waiters();
    Ok(())
}

/// Brings the thread `h` back online (a quiescent point at once).
///
/// # Signal safety
/// Atomics only.
pub fn online(h: HostThread) -> Result<()> {
    let (rec, _) = record(h)?;
    // Ordering: the store, then a SeqCst fence before any probed code runs:
    // see "Why this is correct" — pairs with the fences in `wait`.
    rec.ctr.store(GP.load(Ordering::Relaxed), Ordering::Release);
    // Ordering: SeqCst — see above.
    fence(Ordering::SeqCst);
    Ok(())
}

/// Wakes threads in [`wait`], if any.
///
/// # Signal safety
/// Atomics and one raw `futex` wake.
#[inline]
fn wake_waiters() {
    // Ordering: Relaxed — after the caller's SeqCst fence, which orders its
    // counter store before this load — pairs with the fence after the
    // increment in `wait`.
    if WAITERS.load(Ordering::Relaxed) == 0 {
        return;
    }
    // Ordering: Release — a waiter that sees the new count re-reads the
    // counters — pairs with the Acquire load in `wait`.
    EVENTS.fetch_add(1, Ordering::Release);
    // SAFETY: a static futex word; waking has no memory effects.
    unsafe {
        raw::syscall3(
            libc::SYS_futex,
            EVENTS.as_ptr() as i64,
            FUTEX_WAKE_PRIVATE,
            i64::from(i32::MAX),
        )
    };
}

/// `FUTEX_WAIT | FUTEX_PRIVATE_FLAG`.
const FUTEX_WAIT_PRIVATE: i64 = 128;
/// `FUTEX_WAKE | FUTEX_PRIVATE_FLAG`.
const FUTEX_WAKE_PRIVATE: i64 = 1 | 128;
/// Longest single sleep: reports wake the waiter; this bounds a missed wake
/// and the checks for exited threads.
const MAX_SLEEP: Duration = Duration::from_millis(5);

/// Waits until every registered thread other than the caller has passed a
/// quiescent point after this call began, is offline, was unregistered, or
/// has exited. `false` if `deadline` passed first; without a deadline, waits
/// for as long as it takes. Normal context.
pub fn wait(deadline: Option<Instant>) -> bool {
    let me = super::threads::gettid();
    // Ordering: SeqCst fence, then the bump: what the caller did before
    // (the ranges made unreachable, the pointers unpublished) happens before
    // any access a thread makes after reporting the new number — pairs with
    // the fences in `report`.
    fence(Ordering::SeqCst);
    // Ordering: SeqCst — the bump a reporting thread's load reads (see the
    // fence above) — pairs with the Relaxed load and fence in `quiescent`.
    let g = GP.fetch_add(1, Ordering::SeqCst) + 1;
    // Ordering: SeqCst, then a fence: either a thread's report is visible
    // below, or it sees WAITERS non-zero and wakes us — pairs with the
    // fence after the store in `report`.
    WAITERS.fetch_add(1, Ordering::SeqCst);
    // Ordering: SeqCst — the increment before the counters are read.
    fence(Ordering::SeqCst);
    let pid = std::process::id() as i32;
    let result = loop {
        // Ordering: Acquire — pairs with the Release increment in
        // `wake_waiters`.
        let events = EVENTS.load(Ordering::Acquire);
        if all_passed(g, me, pid) {
            break true;
        }
        let timeout = match deadline {
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    break false;
                }
                (d - now).min(MAX_SLEEP)
            }
            None => MAX_SLEEP,
        };
        futex_wait(events, timeout);
    };
    // Ordering: SeqCst — a report after this is not needed by us.
    WAITERS.fetch_sub(1, Ordering::SeqCst);
    // Ordering: SeqCst — the caller's later accesses (the free) come after
    // the counters read — pairs with the fences in `report`.
    fence(Ordering::SeqCst);
    result
}

/// Whether every registered thread but `me` is past grace period `g`.
fn all_passed(g: u64, me: i32, pid: i32) -> bool {
    // Ordering: Acquire — records below it are initialised.
    let high = HIGH.load(Ordering::Acquire).min(MAX_THREADS);
    RECORDS[..high].iter().all(|rec| {
        // Ordering: Acquire — pairs with the Release stores of `register`,
        // `report`, `offline` and `unregister`.
        let st = rec.state.load(Ordering::Acquire);
        if st & 1 == 0 {
            return true;
        }
        // Ordering: Relaxed — see `register`.
        let tid = rec.tid.load(Ordering::Relaxed);
        if tid == me {
            return true;
        }
        // Ordering: Acquire — the thread's accesses before its report
        // happen before ours after (see "Why this is correct").
        let c = rec.ctr.load(Ordering::Acquire);
        if c == 0 || c >= g {
            return true;
        }
        // Unregistered meanwhile, or exited without unregistering.
        // Ordering: Acquire — as above.
        rec.state.load(Ordering::Acquire) != st || !thread_alive(pid, tid)
    })
}

/// Whether `tid` is still a thread of `pid` (`tgkill(pid, tid, 0)`).
fn thread_alive(pid: i32, tid: i32) -> bool {
    if tid == 0 {
        return true;
    }
    // SAFETY: signal 0 only checks that the thread exists.
    let ret = unsafe { raw::syscall3(libc::SYS_tgkill, i64::from(pid), i64::from(tid), 0) };
    raw::check(ret) != Err(libc::ESRCH)
}

/// Sleeps until [`EVENTS`] changes from `expected`, a wake, or `timeout`.
fn futex_wait(expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    // SAFETY: a static, aligned u32; `ts` is readable. A spurious or early
    // return is fine: the caller re-checks.
    unsafe {
        raw::syscall4(
            libc::SYS_futex,
            EVENTS.as_ptr() as i64,
            FUTEX_WAIT_PRIVATE,
            i64::from(expected),
            &ts as *const libc::timespec as i64,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn handles_are_checked() {
        let h = register().expect("register");
        assert_eq!(quiescent(h), Ok(()));
        assert_eq!(offline(h), Ok(()));
        assert_eq!(online(h), Ok(()));
        unregister(h).expect("unregister");
        for bad in [h, HostThread(0), HostThread(u64::MAX), HostThread(7 << 20)] {
            assert_eq!(quiescent(bad), Err(Error::NotFound), "{bad:?}");
            assert_eq!(unregister(bad), Err(Error::NotFound));
        }
        let again = register().expect("register");
        assert_ne!(again, h, "a reused record has a new generation");
        assert_eq!(quiescent(h), Err(Error::NotFound));
        unregister(again).expect("unregister");
    }

    #[test]
    fn wait_needs_every_online_thread_to_report() {
        // In its own process: another test's registered thread would hold
        // this one's waits.
        crate::sys::threads::in_own_process(
            "sys::quiescent::tests::wait_needs_every_online_thread_to_report",
            wait_needs_every_online_thread_to_report_body,
        );
    }

    fn wait_needs_every_online_thread_to_report_body() {
        let stop = Arc::new(AtomicBool::new(false));
        let reported = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = {
            let (stop, reported) = (stop.clone(), reported.clone());
            std::thread::spawn(move || {
                let h = register().expect("register");
                tx.send(()).expect("send");
                // Silent (no quiescent point) until told.
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                reported.store(true, Ordering::SeqCst);
                quiescent(h).expect("qs");
                std::thread::sleep(Duration::from_millis(50));
                offline(h).expect("offline");
                std::thread::sleep(Duration::from_millis(200));
                unregister(h).expect("unregister");
            })
        };
        rx.recv().expect("registered");
        let short = Instant::now() + Duration::from_millis(50);
        assert!(!wait(Some(short)), "a silent online thread holds the wait");
        let releaser = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                stop.store(true, Ordering::SeqCst);
            })
        };
        assert!(wait(Some(Instant::now() + Duration::from_secs(10))));
        assert!(
            reported.load(Ordering::SeqCst),
            "passed only after its report"
        );
        releaser.join().expect("join");
        // Offline (then gone): no wait.
        std::thread::sleep(Duration::from_millis(100));
        assert!(wait(Some(Instant::now() + Duration::from_millis(100))));
        worker.join().expect("join");
        assert!(wait(None));
    }

    #[test]
    fn a_quiescent_point_inside_a_handler_does_not_count() {
        crate::sys::threads::in_own_process(
            "sys::quiescent::tests::a_quiescent_point_inside_a_handler_does_not_count",
            || {
                let h = register().expect("register");
                let waiter = std::thread::spawn(|| {
                    let ok = wait(Some(Instant::now() + Duration::from_millis(300)));
                    (ok, wait(Some(Instant::now() + Duration::from_secs(10))))
                });
                // SAFETY: only signal-safe calls are made with the token.
                let cx = unsafe { crate::sigctx::SignalContext::new() };
                let until = Instant::now() + Duration::from_millis(400);
                while Instant::now() < until {
                    // As a consumer would, in a read-side section.
                    let section = crate::grace::enter(cx);
                    quiescent(h).expect("qs");
                    section.exit(cx);
                    std::thread::sleep(Duration::from_millis(1));
                }
                // Out of the handler: a real quiescent point.
                while !waiter.is_finished() {
                    quiescent(h).expect("qs");
                    std::thread::sleep(Duration::from_millis(1));
                }
                assert_eq!(waiter.join().expect("join"), (false, true));
                unregister(h).expect("unregister");
            },
        );
    }

    #[test]
    fn an_exited_thread_does_not_hold_a_wait() {
        crate::sys::threads::in_own_process(
            "sys::quiescent::tests::an_exited_thread_does_not_hold_a_wait",
            || {
                let h = std::thread::spawn(|| register().expect("register"))
                    .join()
                    .expect("join");
                assert!(wait(Some(Instant::now() + Duration::from_secs(5))));
                unregister(h).expect("unregister");
            },
        );
    }
}
