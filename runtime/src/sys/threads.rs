//! Threads of this process, and the thread scan: the grace period for
//! trampoline memory (DESIGN.md part 7); and the signal barrier, the heavy
//! side of the asymmetric fence where `membarrier` is missing.
//!
//! # The thread scan
//!
//! A retired out-of-line stub may still hold a thread: one that was
//! preempted inside it, or that trapped and has not yet reached the handler.
//! Read-side sections cannot see those threads, so before a stub is reused
//! [`quiescent`] looks at every thread's program counter:
//!
//! 1. One scan at a time (a mutex; normal context). The caller's half-open
//!    ranges `[a, b)` are published in a static table under a sequence lock,
//!    whose even value after publication is the scan's *generation*.
//! 2. Every other thread listed in `/proc/self/task` (through the cached
//!    descriptor of [`super::tasks`]; no complete listing, no scan: the
//!    answer is `false`) gets the scan signal ([`scan_signal`], see
//!    [`super::scan_mode`]) through `rt_tgsigqueueinfo`, carrying the
//!    generation and an ack slot in `si_value`. Its handler reads the
//!    interrupted `rip` from the `ucontext`, checks it — and the contexts
//!    saved in signal frames above it ([`super::sigframes`]) — against the
//!    ranges under the sequence lock (a stale or foreign signal is ignored)
//!    and acks `inside`/`outside` into the slot with one compare-and-swap,
//!    then wakes the scanner with a futex.
//! 3. The scanner waits for every slot. A thread that has exited
//!    (`tgkill(.., 0)` → `ESRCH`) or is a zombie counts as quiescent. A thread
//!    that does not ack within 20 ms (it blocks the signal, or is in
//!    uninterruptible sleep) is read from `/proc/self/task/<tid>/syscall`: if
//!    it sleeps in the kernel with its user `pc` outside the ranges, and the
//!    signal frames on its stack (walked by the scanner from the `sp` procfs
//!    gives, then that state read again unchanged) hold no context inside,
//!    it is quiescent; if it is running, the scanner keeps polling.
//! 4. Any thread seen inside a range, or not seen before the timeout, makes
//!    the answer `false`: the caller keeps the memory retired and asks again
//!    later. `false` is always safe; `true` means every thread was observed
//!    outside every range at some moment after the call began, and since the
//!    caller made the ranges unreachable before calling, none can enter them
//!    again.
//!
//! With quiescent points chosen instead, no signal is sent: [`quiescent`]
//! waits until every thread the host registered has passed one
//! ([`super::quiescent`]).
//!
//! Limits, all erring on `false`:
//! - Threads blocking the scan signal are checked through procfs only; one
//!   spinning with the signal blocked is never seen (the scan times out). At
//!   most one of our signals is left pending per such thread (a tid seen
//!   blocking it is checked in `/proc/self/task/<tid>/status` first). At the
//!   descriptor limit procfs files cannot be opened: such threads time out.
//! - `SA_RESTART` restarts most interrupted system calls, but the ones
//!   signal(7) lists as never restarted (`epoll_wait`, `poll`, `select`,
//!   `nanosleep`, `sigtimedwait`, timed socket reads, …) return `EINTR` in
//!   the signalled thread, as with any signal (a profiler's `SIGPROF` does the
//!   same); hosts must already handle that.
//!
//! # The signal barrier
//!
//! [`signal_barrier`] is a scan round with no ranges: every handler
//! executes a full fence before it acks, and a thread that does not ack but
//! that procfs shows asleep in the kernel counts too — `/proc/<tid>/syscall`
//! reports a system call only for a thread that is off its CPU
//! (`wait_task_inactive`), so it went through the scheduler's full barrier
//! after its last user-mode access and goes through another before its next
//! one (the argument `membarrier` itself makes for threads not running). It
//! retries until every thread has been covered: a thread that blocks the
//! signal and never sleeps delays it for as long as it does so.
//!
//! # Safety
//!
//! The unsafe code here installs a signal handler (`sigaction`), sends
//! signals to threads of this process only (`rt_tgsigqueueinfo` and `tgkill`
//! with our own pid), reads the kernel-provided `siginfo_t` and `ucontext_t`
//! inside the handler, waits and wakes on a static futex word, and keeps the
//! scan lock's guard in a static between the `pthread_atfork` handlers of
//! one `fork`, which run on one thread. The handler touches nothing but
//! static atomics and its own stack, allocates nothing and cannot panic.

#![allow(unsafe_code)]

use std::ffi::{c_int, c_void};
use std::sync::atomic::{fence, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::raw;
use super::scan_mode::{self, ScanMode};
use super::sigframes::Saved;
use crate::error::{Error, Result};
use crate::sigctx::SignalContext;

/// The calling thread's kernel thread id (raw `gettid`).
///
/// # Signal safety
/// One raw system call: async-signal-safe, `errno` untouched.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and no memory effects.
    let tid = unsafe { raw::syscall0(libc::SYS_gettid) };
    // Thread ids fit in i32 (PID_MAX_LIMIT is 2^22).
    tid as i32
}

/// The real-time signal thread scans use once [`scan_init`] installed its
/// handler (chosen with [`super::scan_mode::set_scan_signal`] or
/// `PROBERT_SCAN_SIGNAL`, else `SIGRTMAX - 1`, 63 with glibc and musl); the
/// default before. [`scan_init`] refuses to replace a handler it finds
/// there, and [`quiescent`] fails if the host replaces ours.
#[cfg(test)]
pub fn scan_signal() -> i32 {
    match *INSTALLED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        0 => scan_mode::default_signal(),
        sig => sig,
    }
}

/// Most ranges one scan round publishes; [`quiescent`] splits larger sets.
pub const MAX_RANGES: usize = 4096;
/// Most threads one scan round signals; [`quiescent`] batches more.
const ACK_SLOTS: usize = 1024;
/// Bits of `si_value` holding the ack slot; the generation sits above.
const SLOT_BITS: u32 = 16;
/// The generation as carried in `si_value` and ack words (48 bits).
const GEN_MASK: u64 = (1 << 48) - 1;

/// Ack word state: the scanner is waiting for this slot's thread.
const ARMED: u64 = 1;
/// Ack word state: the thread was outside every range.
const OUTSIDE: u64 = 2;
/// Ack word state: the thread was inside a range (or its pc is unknown).
const INSIDE: u64 = 3;

/// Sequence lock over [`RANGES`] and [`RANGE_COUNT`]: odd while the scanner
/// writes them; the even value after is the scan generation.
static SEQ: AtomicU64 = AtomicU64::new(0);
/// Number of valid ranges in [`RANGES`].
static RANGE_COUNT: AtomicUsize = AtomicUsize::new(0);
/// The [`Depth`] of the published scan, as its discriminant.
static DEPTH: AtomicUsize = AtomicUsize::new(0);
/// `[a0, b0, a1, b1, …]`: the published half-open ranges.
static RANGES: [AtomicUsize; 2 * MAX_RANGES] = [const { AtomicUsize::new(0) }; 2 * MAX_RANGES];
/// Per-slot ack words: `generation << 2 | ARMED/OUTSIDE/INSIDE`.
static ACKS: [AtomicU64; ACK_SLOTS] = [const { AtomicU64::new(0) }; ACK_SLOTS];
/// Futex word bumped by every ack; the scanner sleeps on it.
static ACK_EVENTS: AtomicU32 = AtomicU32::new(0);
/// The pid the current scan's signals come from (checked in the handler).
static SCAN_PID: AtomicI32 = AtomicI32::new(0);

/// Scanner state kept between scans; the mutex makes scans one at a time.
struct ScanState {
    /// Threads seen blocking the scan signal: checked before re-signalling,
    /// so at most one of our signals waits in their queue.
    blocked: Vec<i32>,
}

/// The one-scan-at-a-time lock and its state. Normal context only.
static SCAN: Mutex<ScanState> = Mutex::new(ScanState {
    blocked: Vec::new(),
});
/// The signal [`scan_init`] installed the handler for (0: not installed).
/// Normal context only.
static INSTALLED: Mutex<i32> = Mutex::new(0);
/// The signal return trampoline the scan handler returns through (libc's,
/// which installed it), for the scanner's own walks of sleeping threads.
static SCAN_RESTORER: AtomicUsize = AtomicUsize::new(0);

/// `siginfo_t` as `rt_tgsigqueueinfo` takes it for `SI_QUEUE`: the kernel's
/// 128-byte layout with the `_rt` member of the union.
#[repr(C)]
struct QueueInfo {
    signo: c_int,
    errno: c_int,
    code: c_int,
    _pad: c_int,
    pid: libc::pid_t,
    uid: libc::uid_t,
    value: usize,
    _rest: [u64; 12],
}

const _: () = assert!(std::mem::size_of::<QueueInfo>() == 128);
const _: () = assert!(std::mem::size_of::<libc::siginfo_t>() == 128);

/// Installs (once) the handler for [`scan_signal`], fixing the scan mode
/// ([`super::scan_mode::freeze`]); with quiescent points, installs nothing.
///
/// Flags: `SA_SIGINFO` to receive `si_value` (the generation and slot) and
/// the `ucontext` (the interrupted `rip`); `SA_RESTART` so the scan is
/// invisible to system calls that can be restarted. Not `SA_ONSTACK`: the
/// handler needs a few hundred bytes, and the interrupted stack has them. No
/// `SA_NODEFER`: a second scan signal waits until the first returns.
///
/// Also opens the `/proc/self/task` descriptor listings use, so that scans
/// work at the descriptor limit later (a failure here is not an error: a
/// scan without a listing answers `false`).
///
/// Fails with [`Error::Signal`] if another handler is installed for the
/// signal (the host uses it), [`Error::InvalidArgument`] if
/// `PROBERT_SCAN_SIGNAL` names no real-time signal. Idempotent and
/// thread-safe. Normal context only.
pub fn scan_init() -> Result<()> {
    let mut installed = INSTALLED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if *installed != 0 {
        return Ok(());
    }
    let ScanMode::Signal(sig) = scan_mode::freeze()? else {
        return Ok(());
    };
    let current = current_handler(sig)?;
    if current != libc::SIG_DFL && current != libc::SIG_IGN && current != our_handler() {
        return Err(Error::Signal(
            format!(
                "the thread-scan signal {sig} already has a handler (choose another with \
                 probert_set_scan_signal or {})",
                scan_mode::ENV
            )
            .into(),
        ));
    }
    // SAFETY: `sigaction` is plain data; all-zero is a valid start.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = our_handler();
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // SAFETY: `sa.sa_mask` is a valid sigset to initialise.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: installs a handler that is async-signal-safe (see
    // `on_scan_signal`) for a signal checked above to be unused.
    if unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) } != 0 {
        return Err(Error::Signal(
            format!(
                "sigaction({sig}) for the thread scan: {}",
                std::io::Error::last_os_error()
            )
            .into(),
        ));
    }
    // Ordering: Relaxed — read by the scanner, which runs under SCAN after
    // taking INSTALLED in `quiescent_at` (the mutexes order it).
    SCAN_RESTORER.store(super::signal::restorer_of(sig), Ordering::Relaxed);
    *installed = sig;
    super::tasks::open();
    Ok(())
}

/// The scan handler's address as `sigaction` stores it.
pub(crate) fn scan_handler() -> libc::sighandler_t {
    our_handler()
}

/// The handler's address as `sigaction` stores it.
fn our_handler() -> libc::sighandler_t {
    on_scan_signal as unsafe extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) as usize
}

/// The handler currently installed for `sig`.
fn current_handler(sig: c_int) -> Result<libc::sighandler_t> {
    // SAFETY: `sigaction` is plain data; all-zero is valid.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a query (null new action) writing only `old`.
    if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } != 0 {
        return Err(Error::Signal(
            format!(
                "sigaction({sig}) query: {}",
                std::io::Error::last_os_error()
            )
            .into(),
        ));
    }
    Ok(old.sa_sigaction)
}

/// The installed scan signal, checking our handler is still there.
fn installed_signal() -> Result<i32> {
    scan_init()?;
    let sig = *INSTALLED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if current_handler(sig)? != our_handler() {
        return Err(Error::Signal(
            format!("the thread-scan signal {sig} handler was replaced by the host").into(),
        ));
    }
    Ok(sig)
}

/// How much of each thread's state a scan checks against its ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Depth {
    /// The context the scan's signal interrupted, and, where the stack can
    /// be read, the contexts saved in signal frames above it (see
    /// [`super::sigframes`]); an unreadable stack counts as outside.
    Frames,
    /// As [`Depth::Frames`], but an unreadable stack (or a frame the walk
    /// cannot read) counts as inside: for proofs that must not have blind
    /// spots.
    FramesRequired,
}

/// Whether every other thread has been observed with its program counter
/// outside every half-open range `[a, b)` of `ranges`.
///
/// `Ok(true)`: every thread was seen outside (or has exited) at some moment
/// after the call began. A thread seen inside is asked again until it is seen
/// outside — the ranges are unreachable, so it can only leave them — so a busy
/// thread passing through does not fail the scan. `Ok(false)`: some thread was
/// still inside, or could not be seen, at `timeout`, or the threads could not
/// be listed; keep the memory retired and try again later.
/// The calling thread is not checked. The ranges must already be unreachable
/// (no thread can newly enter them), or the answer means nothing.
///
/// Costs one signal per thread (tens of microseconds idle, milliseconds with
/// more threads than CPUs), so batch retirements. Scans are serialized. With
/// quiescent points, waits instead until every registered thread has passed
/// one ([`super::quiescent::wait`]).
/// `Err` if the signal handler cannot be installed or was replaced. Normal
/// context only.
#[cfg(test)]
pub fn quiescent(ranges: &[(usize, usize)], timeout: Duration) -> Result<bool> {
    quiescent_at(ranges, timeout, Depth::Frames)
}

/// [`quiescent`], at `depth`.
pub fn quiescent_at(ranges: &[(usize, usize)], timeout: Duration, depth: Depth) -> Result<bool> {
    let ranges = merged(ranges);
    if ranges.is_empty() {
        return Ok(true);
    }
    let deadline = Instant::now() + timeout;
    if scan_mode::freeze()? == ScanMode::QuiescentPoints {
        return Ok(
            super::quiescent::wait(Some(deadline)) && children_outside(&ranges, depth, deadline)
        );
    }
    if super::signal::restorers_lost() {
        // A signal frame could go unrecognised: no thread can be proven out.
        return Ok(false);
    }
    let sig = installed_signal()?;
    let mut state = SCAN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let me = gettid();
    let Some(tids) = super::tasks::list_tids() else {
        return Ok(false);
    };
    let tids: Vec<i32> = tids.into_iter().filter(|&t| t != me).collect();
    state.blocked.retain(|t| tids.contains(t));
    for chunk in ranges.chunks(MAX_RANGES) {
        for batch in tids.chunks(ACK_SLOTS) {
            if !scan_round(chunk, depth, sig, batch, deadline, &mut state) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// One attempt of [`signal_barrier`].
const BARRIER_ROUND: Duration = Duration::from_secs(1);

/// Makes every other thread of the process execute a full memory barrier
/// (see "The signal barrier" in the module docs) before it returns. Blocks
/// until it has: retries rounds of [`BARRIER_ROUND`] for as long as a thread
/// neither takes the signal nor sleeps, or the threads cannot be listed.
/// `Err` only if the scan signal's handler cannot be installed or was
/// replaced (no barrier is possible then). Normal context only.
pub fn signal_barrier() -> Result<()> {
    let sig = installed_signal()?;
    let me = gettid();
    let mut complained = false;
    loop {
        let deadline = Instant::now() + BARRIER_ROUND;
        // Taken per round, so a `fork` (whose prepare handler takes it)
        // waits at most one round.
        let mut state = SCAN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(tids) = super::tasks::list_tids() {
            let tids: Vec<i32> = tids.into_iter().filter(|&t| t != me).collect();
            state.blocked.retain(|t| tids.contains(t));
            if tids
                .chunks(ACK_SLOTS)
                .all(|batch| scan_round(&[], Depth::Frames, sig, batch, deadline, &mut state))
            {
                return Ok(());
            }
        } else {
            drop(state);
            if !complained {
                complained = true;
                eprintln!(
                    "probert: /proc/self/task cannot be listed; the memory barrier of a grace \
                     period waits until it can"
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `pthread_atfork` prepare handler: takes the scan lock (then the listing's)
/// so that no scan or barrier round is half done in the child.
pub fn fork_prepare() {
    let g = SCAN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // SAFETY: the handlers of one fork run on one thread, in order; nothing
    // else touches FORK_SCAN.
    unsafe { *std::ptr::addr_of_mut!(FORK_SCAN) = Some(g) };
    super::tasks::fork_prepare();
}

/// `pthread_atfork` parent handler.
pub fn fork_parent() {
    super::tasks::fork_parent();
    // SAFETY: see `fork_prepare`.
    drop(unsafe { (*std::ptr::addr_of_mut!(FORK_SCAN)).take() });
}

/// `pthread_atfork` child handler: the parent's threads are gone.
pub fn fork_child() {
    super::tasks::fork_child();
    super::spawn::fork_child();
    // SAFETY: see `fork_prepare`.
    if let Some(mut g) = unsafe { (*std::ptr::addr_of_mut!(FORK_SCAN)).take() } {
        g.blocked.clear();
    }
}

/// Between the prepare and the parent/child handlers of one `fork`.
static mut FORK_SCAN: Option<MutexGuard<'static, ScanState>> = None;

/// `ranges` without empty ranges, sorted and with overlapping or touching
/// ones merged.
fn merged(ranges: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut v: Vec<(usize, usize)> = ranges.iter().copied().filter(|&(a, b)| a < b).collect();
    v.sort_unstable();
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// When an unacked thread is first checked for having exited.
const LIVENESS_AFTER: Duration = Duration::from_millis(2);
/// When an unacked thread is first read from procfs.
const PROC_AFTER: Duration = Duration::from_millis(20);
/// How often an unacked thread is re-read from procfs.
const PROC_EVERY: Duration = Duration::from_millis(5);
/// Longest single sleep of the scanner.
const MAX_SLEEP: Duration = Duration::from_millis(1);

/// One thread of a round.
#[derive(Debug)]
struct ScanTarget {
    tid: i32,
    slot: usize,
    /// Go straight to procfs (the signal could not be sent or is blocked).
    proc_now: bool,
    /// This round's signal was sent. It is held back while one of ours,
    /// perhaps of an earlier round, waits in the thread's queue: that one
    /// may be stale, which the handler ignores, so the round sends its own
    /// once the queue is empty again (see the procfs step).
    sent: bool,
    /// Seen outside, or gone.
    done: bool,
    /// Last procfs read.
    last_proc: Option<Instant>,
}

impl ScanTarget {
    /// Sends this round's signal (generation `gen`) to the target.
    fn send(&mut self, pid: i32, sig: c_int, gen: u64) {
        match send_scan_signal(pid, self.tid, sig, gen, self.slot) {
            Ok(()) => self.sent = true,
            Err(libc::ESRCH) => self.done = true,
            // EAGAIN: the queue limit (RLIMIT_SIGPENDING) is reached.
            Err(_) => self.proc_now = true,
        }
    }
}

/// One round: publish `ranges`, signal `tids`, wait. `false` if a thread was
/// inside or the deadline passed.
fn scan_round(
    ranges: &[(usize, usize)],
    depth: Depth,
    sig: c_int,
    tids: &[i32],
    deadline: Instant,
    state: &mut ScanState,
) -> bool {
    let gen = publish(ranges, depth);
    let pid = std::process::id() as i32;
    // Ordering: Relaxed — read by handlers run because of the signals sent
    // below; the kernel's signal queueing orders the two — pairs with the
    // load in `on_scan_signal`.
    SCAN_PID.store(pid, Ordering::Relaxed);
    let bit = 1u64 << (sig - 1);
    let mut pending: Vec<ScanTarget> = Vec::with_capacity(tids.len());
    for (slot, &tid) in tids.iter().enumerate() {
        // Ordering: Release — the arm precedes the signal that runs the
        // handler, which must see it — pairs with the compare_exchange in
        // `on_scan_signal`.
        ACKS[slot].store(gen << 2 | ARMED, Ordering::Release);
        let mut p = ScanTarget {
            tid,
            slot,
            proc_now: false,
            sent: false,
            done: false,
            last_proc: None,
        };
        let mut send = true;
        if state.blocked.contains(&tid) {
            match sig_masks(tid) {
                Some((blk, pnd)) if blk & bit != 0 => {
                    p.proc_now = true;
                    send = pnd & bit == 0;
                }
                Some(_) => state.blocked.retain(|&t| t != tid),
                None => p.proc_now = true,
            }
        }
        if send {
            p.send(pid, sig, gen);
        }
        pending.push(p);
    }
    let start = Instant::now();
    loop {
        // Ordering: Acquire — an ack counted here is visible in its slot
        // below — pairs with the fetch_add in `on_scan_signal`.
        let events = ACK_EVENTS.load(Ordering::Acquire);
        let mut all_done = true;
        for p in pending.iter_mut().filter(|p| !p.done) {
            // Ordering: Acquire — reads the handler's ack — pairs with the
            // compare_exchange in `on_scan_signal`.
            let ack = ACKS[p.slot].load(Ordering::Acquire);
            if ack == gen << 2 | INSIDE {
                // Seen inside: ask again until it is seen outside (the ranges
                // are unreachable, so a thread only ever leaves them) or the
                // deadline passes. A busy thread does not fail the whole scan.
                // Ordering: Release — as for the first arm above.
                ACKS[p.slot].store(gen << 2 | ARMED, Ordering::Release);
                p.send(pid, sig, gen);
                all_done = false;
                continue;
            }
            p.done = ack == gen << 2 | OUTSIDE;
            if !p.done && start.elapsed() >= LIVENESS_AFTER && !thread_alive(pid, p.tid) {
                p.done = true;
            }
            let proc_due = (p.proc_now || start.elapsed() >= PROC_AFTER)
                && p.last_proc.map_or(true, |t| t.elapsed() >= PROC_EVERY);
            if !p.done && proc_due {
                // The masks: on the first look (is it blocking the signal?)
                // and while this round's signal is held back.
                let masks = (p.last_proc.is_none() || !p.sent)
                    .then(|| sig_masks(p.tid))
                    .flatten();
                if p.last_proc.is_none()
                    && masks.is_some_and(|(blk, _)| blk & bit != 0)
                    && !state.blocked.contains(&p.tid)
                {
                    state.blocked.push(p.tid);
                }
                if !p.sent && masks.is_some_and(|(_, pnd)| pnd & bit == 0) {
                    // What held the signal back has been delivered (and,
                    // from an earlier round, ignored): send this round's.
                    p.send(pid, sig, gen);
                }
                p.last_proc = Some(Instant::now());
                p.done = asleep_outside(Task::Thread(p.tid), ranges, depth);
            }
            all_done &= p.done;
        }
        if all_done {
            return children_outside(ranges, depth, deadline);
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        futex_wait(&ACK_EVENTS, events, (deadline - now).min(MAX_SLEEP));
    }
}

/// Waits until every spawn child (`sys::spawn`) is outside `ranges` as
/// [`asleep_outside`] tells, or gone; `false` at the deadline. A child
/// shares our memory but is not one of our threads, and blocks every
/// signal but `SIGTRAP`: procfs is the only way to see it.
fn children_outside(ranges: &[(usize, usize)], depth: Depth, deadline: Instant) -> bool {
    loop {
        let outside = |pid| asleep_outside(Task::Child(pid), ranges, depth);
        if super::spawn::children_outside(outside) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// A task procfs shows: one of our threads, or a spawn child (a process of
/// its own, in our memory).
#[derive(Clone, Copy, Debug)]
enum Task {
    Thread(i32),
    Child(i32),
}

impl Task {
    fn proc_dir(self) -> String {
        match self {
            Task::Thread(tid) => format!("/proc/self/task/{tid}"),
            Task::Child(pid) => format!("/proc/{pid}/task/{pid}"),
        }
    }
}

/// Whether procfs shows `tid` gone, or asleep in the kernel with neither
/// its user `pc` nor a context saved in a signal frame on its stack inside
/// `ranges` (no ranges: a barrier round, which only needs it asleep; see the
/// module docs). The stack is walked while the thread sleeps, then its state
/// is read again: unchanged, the walk read a stack that did not move.
fn asleep_outside(task: Task, ranges: &[(usize, usize)], depth: Depth) -> bool {
    let (sp, pc) = match proc_state(task) {
        ProcState::Gone => return true,
        ProcState::Running => return false,
        ProcState::Blocked { sp, pc } => (sp, pc),
    };
    if ranges.is_empty() {
        return true;
    }
    if in_ranges(ranges, pc) {
        // Blocked in a syscall inside a range: look again later.
        return false;
    }
    // Ordering: Relaxed — stored by `scan_init` before this scan could run
    // (ordered by the INSTALLED and SCAN mutexes).
    let scan_restorer = SCAN_RESTORER.load(Ordering::Relaxed);
    let inside = |pc| Some(in_ranges(ranges, pc));
    // SAFETY: the normal-context scanner may call signal-safe functions.
    let cx = unsafe { SignalContext::new() };
    if let Some(found) = super::sigframes::in_restorer(cx, pc, sp, scan_restorer, inside) {
        if found != Some(false) {
            return false;
        }
    }
    match super::sigframes::saved_contexts_at(sp, scan_restorer, inside) {
        Saved::Inside => return false,
        Saved::Unknown if depth == Depth::FramesRequired => return false,
        Saved::Unknown | Saved::Outside => {}
    }
    match proc_state(task) {
        ProcState::Gone => true,
        ProcState::Blocked { sp: sp2, pc: pc2 } => (sp2, pc2) == (sp, pc),
        ProcState::Running => false,
    }
}

/// Publishes `ranges` (at most [`MAX_RANGES`]) under the sequence lock and
/// returns the new generation (48 bits, even, non-zero). Scanner only, under
/// [`SCAN`].
fn publish(ranges: &[(usize, usize)], depth: Depth) -> u64 {
    // Ordering: Relaxed — only the scanner, under SCAN, writes SEQ.
    let seq = SEQ.load(Ordering::Relaxed);
    // Skip generation 0 (and wrap at 48 bits): the seqlock stays even/odd.
    let odd = (seq + 1) & GEN_MASK;
    // Ordering: Relaxed, then the Release fence: a handler that reads any
    // range written below sees this odd value on its re-check — pairs with
    // the Acquire fence in `ranges_contain`.
    SEQ.store(odd, Ordering::Relaxed);
    fence(Ordering::Release);
    let n = ranges.len().min(MAX_RANGES);
    for (i, &(a, b)) in ranges.iter().take(n).enumerate() {
        // Ordering: Relaxed — published by the Release store of SEQ below.
        RANGES[2 * i].store(a, Ordering::Relaxed);
        // Ordering: Relaxed — as above.
        RANGES[2 * i + 1].store(b, Ordering::Relaxed);
    }
    // Ordering: Relaxed — as above.
    RANGE_COUNT.store(n, Ordering::Relaxed);
    // Ordering: Relaxed — as above.
    DEPTH.store(depth as usize, Ordering::Relaxed);
    let mut gen = (odd + 1) & GEN_MASK;
    if gen == 0 {
        gen = 2;
    }
    // Ordering: Release publishes the ranges — pairs with the Acquire load
    // in `ranges_contain`.
    SEQ.store(gen, Ordering::Release);
    gen
}

/// Sends [`scan_signal`] to `tid` with `si_value = gen << 16 | slot`.
fn send_scan_signal(pid: i32, tid: i32, sig: c_int, gen: u64, slot: usize) -> Result<(), i32> {
    let info = QueueInfo {
        signo: sig,
        errno: 0,
        code: libc::SI_QUEUE,
        _pad: 0,
        pid,
        // SAFETY: getuid has no preconditions.
        uid: unsafe { libc::getuid() },
        value: ((gen << SLOT_BITS) | slot as u64) as usize,
        _rest: [0; 12],
    };
    // SAFETY: `info` is a readable 128-byte siginfo; the target is a thread
    // of our own process, whose handler for `sig` is installed.
    let ret = unsafe {
        raw::syscall4(
            libc::SYS_rt_tgsigqueueinfo,
            i64::from(pid),
            i64::from(tid),
            i64::from(sig),
            &info as *const QueueInfo as i64,
        )
    };
    raw::check(ret).map(drop)
}

/// The handler of [`scan_signal`].
///
/// # Signal safety
/// Static atomics, the kernel-provided `siginfo`/`ucontext`, and at most one
/// raw `futex` wake: no allocation, lock, formatting, panic or thread-local.
/// It calls no libc function, and the raw system call cannot write `errno`,
/// so `errno` needs no saving.
///
/// # Safety
/// Installed as an `SA_SIGINFO` signal handler only: the kernel passes a
/// valid `siginfo` and `ucontext` for the signal being handled.
unsafe extern "C" fn on_scan_signal(_sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: we are at the entry of a signal handler.
    let cx = unsafe { SignalContext::new() };
    if info.is_null() {
        return;
    }
    // SAFETY: the kernel passes a 128-byte siginfo; `QueueInfo` is its
    // layout for SI_QUEUE, and we read it only after checking `code`.
    let info = unsafe { &*info.cast::<QueueInfo>() };
    // Ordering: Relaxed — stored before the signal was sent — pairs with
    // the store in `scan_round`.
    if info.code != libc::SI_QUEUE || info.pid != SCAN_PID.load(Ordering::Relaxed) {
        return;
    }
    let value = info.value as u64;
    let (gen, slot) = (
        value >> SLOT_BITS,
        (value & ((1 << SLOT_BITS) - 1)) as usize,
    );
    let Some(ack) = ACKS.get(slot) else {
        return;
    };
    // SAFETY: with SA_SIGINFO the third argument is the interrupted
    // context, valid for the duration of the handler.
    let pc = unsafe { crate::arch::interrupted_pc(cx, ctx) };
    let inside = match pc {
        Some(pc) => match ranges_contain(cx, gen, pc) {
            Some(inside) => inside,
            // A stale signal from an earlier round: not ours to answer.
            None => return,
        },
        // Unknown pc: say inside, the answer that is always safe.
        None => true,
    };
    // Ordering: Relaxed — the count of generation `gen`, or of a later one
    // whose slots are armed with another generation, so an answer based on
    // it cannot be taken for this round's (the CAS below checks `gen`).
    let barrier_round = RANGE_COUNT.load(Ordering::Relaxed) == 0;
    let inside = !barrier_round
        && (inside || {
            let within = |pc| ranges_contain(cx, gen, pc);
            // SAFETY: `ctx` is this handler's third argument.
            let (sp, current) = unsafe {
                (
                    crate::arch::interrupted_sp(cx, ctx),
                    crate::arch::handler_restorer(cx, ctx),
                )
            };
            // Stopped in a signal return trampoline: about to resume the
            // context saved at its stack pointer.
            let returning = match (pc, sp) {
                (Some(pc), Some(sp)) => super::sigframes::in_restorer(cx, pc, sp, current, within),
                _ => None,
            };
            match returning {
                Some(Some(false)) => false,
                Some(_) => true,
                None => {
                    // Ordering: Relaxed — validated with the ranges by `gen` (a
                    // stale depth only makes the walk's ranges stale, which
                    // `ranges_contain` refuses).
                    let required = DEPTH.load(Ordering::Relaxed) == Depth::FramesRequired as usize;
                    // Interrupted at the very entry of probert's SIGTRAP
                    // handler (the kernel delivered both signals at once):
                    // the trap's frame, the first one up, will be looked up
                    // after this scan began, and resumes where the probe
                    // that is indexed now says (a fast-capable site's stub),
                    // never at the byte after its trap instruction — but at
                    // the trap itself if that probe is gone. So its saved
                    // pc is skipped, and the walk's second question, the
                    // trap's own address, decides (`sigframes`).
                    let mut fresh_trap = pc == Some(crate::trap::handler_entry());
                    let within = |p| {
                        if std::mem::take(&mut fresh_trap) {
                            Some(false)
                        } else {
                            ranges_contain(cx, gen, p)
                        }
                    };
                    // SAFETY: `ctx` is this handler's third argument.
                    match unsafe { super::sigframes::saved_contexts(cx, ctx, within) } {
                        Saved::Outside => false,
                        Saved::Inside => true,
                        Saved::Unknown => required,
                    }
                }
            }
        });
    // Ordering: SeqCst — the barrier this signal exists for (in a barrier
    // round; harmless in a scan): this thread's accesses before it are
    // ordered before the ack the scanner reads, its later ones after —
    // pairs with the scanner's fences in `membarrier::barrier`.
    fence(Ordering::SeqCst);
    let answer = gen << 2 | if inside { INSIDE } else { OUTSIDE };
    // Ordering: AcqRel — Acquire pairs with the scanner's Release arm (the
    // slot is for this round), Release publishes the answer — pairs with
    // the Acquire load in `scan_round`.
    if ack
        .compare_exchange(
            gen << 2 | ARMED,
            answer,
            Ordering::AcqRel,
            Ordering::Relaxed,
        )
        .is_ok()
    {
        // Ordering: Release — a scanner that sees the new count sees the
        // ack — pairs with the Acquire load in `scan_round`.
        ACK_EVENTS.fetch_add(1, Ordering::Release);
        futex_wake(cx, &ACK_EVENTS);
    }
}

/// Whether `pc` is in the ranges published as generation `gen`; `None` if
/// that generation is not (or no longer) the published one.
///
/// # Signal safety
/// Atomic loads only; bounded by [`MAX_RANGES`].
fn ranges_contain(_cx: SignalContext, gen: u64, pc: usize) -> Option<bool> {
    // Ordering: Acquire — sees the ranges published with `gen` — pairs with
    // the Release store of SEQ in `publish`.
    let seq = SEQ.load(Ordering::Acquire);
    if seq != gen || seq & 1 != 0 {
        return None;
    }
    // Ordering: Relaxed — validated by the SEQ re-check below.
    let n = RANGE_COUNT.load(Ordering::Relaxed).min(MAX_RANGES);
    // The ranges are sorted and disjoint (`merged`): the last one starting
    // at or before `pc` is the only one that can hold it.
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        // Ordering: Relaxed — validated by the SEQ re-check below.
        if RANGES[2 * mid].load(Ordering::Relaxed) <= pc {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    // Ordering: Relaxed — as above.
    let inside = lo > 0 && pc < RANGES[2 * (lo - 1) + 1].load(Ordering::Relaxed);
    // Ordering: Acquire fence — if a range read above was written by a later
    // `publish`, its odd SEQ store is visible below — pairs with the Release
    // fence in `publish`.
    fence(Ordering::Acquire);
    // Ordering: Relaxed — ordered by the fence above.
    (SEQ.load(Ordering::Relaxed) == seq).then_some(inside)
}

/// Whether `pc` is in one of `ranges`.
fn in_ranges(ranges: &[(usize, usize)], pc: usize) -> bool {
    ranges.iter().any(|&(a, b)| a <= pc && pc < b)
}

/// `FUTEX_WAIT | FUTEX_PRIVATE_FLAG`.
const FUTEX_WAIT_PRIVATE: i64 = 128;
/// `FUTEX_WAKE | FUTEX_PRIVATE_FLAG`.
const FUTEX_WAKE_PRIVATE: i64 = 1 | 128;

/// Sleeps until `word` changes from `expected`, a wake, or `timeout`.
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        // Callers sleep at most MAX_SLEEP; saturate anything absurd.
        tv_sec: timeout.as_secs().try_into().unwrap_or(i32::MAX.into()),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    // SAFETY: `word` is a live, aligned u32; `ts` is readable. A spurious or
    // early return is fine: the caller re-checks.
    unsafe {
        raw::syscall4(
            libc::SYS_futex,
            word.as_ptr() as i64,
            FUTEX_WAIT_PRIVATE,
            i64::from(expected),
            &ts as *const libc::timespec as i64,
        )
    };
}

/// Wakes the scanner sleeping on `word`.
///
/// # Signal safety
/// One raw system call; `errno` untouched.
fn futex_wake(_cx: SignalContext, word: &AtomicU32) {
    // SAFETY: `word` is a live static u32; waking has no memory effects.
    unsafe { raw::syscall3(libc::SYS_futex, word.as_ptr() as i64, FUTEX_WAKE_PRIVATE, 1) };
}

/// Whether `tid` is still a thread of process `pid` (`tgkill(pid, tid, 0)`).
fn thread_alive(pid: i32, tid: i32) -> bool {
    // SAFETY: signal 0 only checks that the thread exists.
    let ret = unsafe { raw::syscall3(libc::SYS_tgkill, i64::from(pid), i64::from(tid), 0) };
    raw::check(ret) != Err(libc::ESRCH)
}

/// `(SigBlk, SigPnd)` of `tid` from `/proc/self/task/<tid>/status`.
fn sig_masks(tid: i32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    Some((field("SigBlk:")?, field("SigPnd:")?))
}

/// What procfs says about a thread that did not ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcState {
    /// Exited, or a zombie: it runs no more code.
    Gone,
    /// Asleep in the kernel, off its CPU; it will resume at this user `pc`,
    /// with this stack pointer.
    Blocked {
        /// The user stack pointer.
        sp: usize,
        /// The user program counter.
        pc: usize,
    },
    /// Running or runnable, or unreadable: nothing known.
    Running,
}

/// Reads `/proc/self/task/<tid>/{stat,syscall}`.
fn proc_state(task: Task) -> ProcState {
    let dir = task.proc_dir();
    let stat = match std::fs::read_to_string(format!("{dir}/stat")) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return ProcState::Gone,
        Err(_) => return ProcState::Running,
    };
    // "tid (comm) S …": the state follows the last ')' (comm may hold one).
    let state = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 1..))
        .and_then(|s| s.trim_start().chars().next());
    if matches!(state, Some('Z' | 'X')) {
        return ProcState::Gone;
    }
    match std::fs::read_to_string(format!("{dir}/syscall")) {
        Ok(s) => parse_syscall_file(&s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ProcState::Gone,
        Err(_) => ProcState::Running,
    }
}

/// Parses `/proc/<tid>/syscall`: `running`, or `nr args… sp pc` while in a
/// system call, or `-1 sp pc` while blocked outside one (e.g. a page fault).
/// The kernel prints the numbers only for a thread off its CPU
/// (`wait_task_inactive`).
fn parse_syscall_file(s: &str) -> ProcState {
    let s = s.trim();
    if s.is_empty() || s == "running" {
        return ProcState::Running;
    }
    let hex = |f: &str| {
        f.strip_prefix("0x")
            .and_then(|v| usize::from_str_radix(v, 16).ok())
    };
    let mut fields = s.split_whitespace().rev();
    match (fields.next().and_then(hex), fields.next().and_then(hex)) {
        (Some(pc), Some(sp)) => ProcState::Blocked { sp, pc },
        _ => ProcState::Running,
    }
}

#[cfg(test)]
pub(crate) use tests::in_own_process;
#[cfg(test)]
pub(crate) mod test_support {
    pub(crate) use super::tests::fill_descriptors;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// Runs `body` in a fresh copy of the test binary running only this
    /// test, so the scan sees only the threads the test makes (other tests'
    /// threads may block signals while running), and signal handlers it
    /// installs affect no other test.
    pub(crate) fn in_own_process(name: &str, body: fn()) {
        const VAR: &str = "PROBERT_THREADS_CHILD_TEST";
        if std::env::var(VAR).as_deref() == Ok(name) {
            body();
            return;
        }
        let status = std::process::Command::new(std::env::current_exe().expect("exe"))
            .args([name, "--exact", "--test-threads=1", "--nocapture"])
            .env(VAR, name)
            .status()
            .expect("spawn the test binary");
        assert!(
            status.success(),
            "{name} failed in its own process: {status}"
        );
    }

    /// Sets `*started`, then spins until `*stop` is non-zero, entirely in
    /// this function's own instructions.
    #[inline(never)]
    extern "C" fn spin_until(started: *const AtomicBool, stop: *const AtomicBool) {
        // SAFETY: both pointers are live atomics owned by the test; the
        // loop only reads and writes their bytes.
        unsafe {
            std::arch::asm!(
                "mov byte ptr [{started}], 1",
                "2:",
                "pause",
                "cmp byte ptr [{stop}], 0",
                "je 2b",
                started = in(reg) started,
                stop = in(reg) stop,
            );
        }
    }

    /// `[start, end)` of `spin_until`.
    fn spin_range() -> (usize, usize) {
        let f =
            std::hint::black_box(spin_until as extern "C" fn(*const AtomicBool, *const AtomicBool))
                as usize;
        let ext = super::super::modules::function_extent(f).expect("spin_until extent");
        assert_eq!(ext.start, f);
        (ext.start, ext.end)
    }

    /// A thread spinning in `spin_until`, stopped and joined on drop.
    struct Spinner {
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Spinner {
        fn start() -> Spinner {
            let started = Arc::new(AtomicBool::new(false));
            let stop = Arc::new(AtomicBool::new(false));
            let thread = {
                let (started, stop) = (started.clone(), stop.clone());
                std::thread::spawn(move || spin_until(&*started, &*stop))
            };
            // Ordering: Acquire — the spinner is in its loop once this is set
            // — pairs with the asm store in `spin_until`.
            while !started.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
            Spinner {
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for Spinner {
        fn drop(&mut self) {
            // Ordering: Relaxed — the spinner only polls it; joined below.
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// Every descriptor in use (under a soft limit lowered to 256); dropping
    /// it closes them and restores the limit.
    pub(crate) struct Filled {
        fds: Vec<i32>,
        old: libc::rlimit,
    }

    impl Drop for Filled {
        fn drop(&mut self) {
            for &fd in &self.fds {
                // SAFETY: descriptors this guard opened.
                unsafe { libc::close(fd) };
            }
            // SAFETY: restores the limit read at the start.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &self.old) };
        }
    }

    /// Uses every descriptor the process may open, as a host at its limit.
    pub(crate) fn fill_descriptors() -> Filled {
        // SAFETY: rlimit is plain data.
        let mut old: libc::rlimit = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers to rlimit structures.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut old), 0);
            let low = libc::rlimit {
                rlim_cur: old.rlim_cur.min(256),
                rlim_max: old.rlim_max,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &low), 0);
        }
        let mut fds = Vec::new();
        loop {
            // SAFETY: opens /dev/null; the descriptor is owned by `Filled`.
            let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
            if fd < 0 {
                assert_eq!(
                    std::io::Error::last_os_error().raw_os_error(),
                    Some(libc::EMFILE)
                );
                break;
            }
            fds.push(fd);
        }
        Filled { fds, old }
    }

    /// Blocks every signal in the calling thread.
    fn block_all_signals() {
        // SAFETY: sigset_t is plain data; it is filled before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset; pthread_sigmask only changes this
        // thread's mask.
        unsafe {
            libc::sigfillset(&mut set);
            assert_eq!(
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
                0
            );
        }
    }

    #[test]
    fn gettid_matches_libc_and_differs_per_thread() {
        // SAFETY: gettid has no preconditions.
        assert_eq!(gettid(), unsafe { libc::gettid() });
        let main = gettid();
        let other = std::thread::spawn(gettid).join().expect("thread");
        assert_ne!(main, other);
        assert!(super::super::tasks::list_tids()
            .expect("procfs")
            .contains(&main));
    }

    #[test]
    fn list_tids_sees_a_live_thread() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            tx.send(gettid()).expect("send");
            let _ = done_rx.recv();
        });
        let tid = rx.recv().expect("tid");
        assert!(super::super::tasks::list_tids()
            .expect("procfs")
            .contains(&tid));
        drop(done_tx);
        t.join().expect("join");
    }

    #[test]
    fn scan_signal_is_sigrtmax_minus_one_and_init_is_idempotent() {
        assert_eq!(scan_signal(), libc::SIGRTMAX() - 1);
        assert!(scan_signal() > libc::SIGRTMIN());
        scan_init().expect("init");
        scan_init().expect("init again");
        assert_eq!(
            current_handler(scan_signal()).expect("query"),
            our_handler()
        );
    }

    #[test]
    fn merges_and_drops_ranges() {
        assert_eq!(
            merged(&[(10, 20), (5, 5), (15, 30), (30, 40), (50, 60), (1, 2)]),
            [(1, 2), (10, 40), (50, 60)]
        );
        assert!(merged(&[(3, 3), (4, 1)]).is_empty());
    }

    #[test]
    fn parses_proc_syscall() {
        assert_eq!(parse_syscall_file("running\n"), ProcState::Running);
        assert_eq!(
            parse_syscall_file("230 0x1 0x0 0x7ffc 0x0 0x0 0x0 0x7ffd1230 0x7f12abcd\n"),
            ProcState::Blocked {
                sp: 0x7ffd1230,
                pc: 0x7f12abcd
            }
        );
        assert_eq!(
            parse_syscall_file("-1 0x7ffd1230 0x55aa00\n"),
            ProcState::Blocked {
                sp: 0x7ffd1230,
                pc: 0x55aa00
            }
        );
        assert_eq!(parse_syscall_file(""), ProcState::Running);
    }

    #[test]
    fn stale_generations_are_not_answered() {
        // SAFETY: a test standing in for the handler; nothing here needs
        // signal safety beyond what the functions document.
        let cx = unsafe { SignalContext::new() };
        let _scan = SCAN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let gen = publish(&[(100, 200), (300, 400)], Depth::Frames);
        assert_eq!(gen % 2, 0);
        assert_eq!(ranges_contain(cx, gen, 150), Some(true));
        assert_eq!(ranges_contain(cx, gen, 200), Some(false));
        assert_eq!(ranges_contain(cx, gen, 399), Some(true));
        assert_eq!(ranges_contain(cx, gen - 2, 150), None);
        let next = publish(&[(0, 1)], Depth::Frames);
        assert_ne!(next, gen);
        assert_eq!(ranges_contain(cx, gen, 0), None);
        assert_eq!(ranges_contain(cx, next, 0), Some(true));
    }

    #[test]
    fn empty_ranges_are_quiescent() {
        assert_eq!(quiescent(&[], Duration::ZERO), Ok(true));
        assert_eq!(quiescent(&[(5, 5)], Duration::ZERO), Ok(true));
    }

    /// Each thread's state and `syscall` line, for a failure message.
    fn task_states() -> String {
        let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
            return "(unlisted)".into();
        };
        dir.flatten()
            .map(|e| {
                let p = e.path();
                let stat = std::fs::read_to_string(p.join("stat")).unwrap_or_default();
                let state = stat.rsplit(") ").next().unwrap_or("").split(' ').next();
                let sc = std::fs::read_to_string(p.join("syscall")).unwrap_or_default();
                format!(
                    "[{:?} {} syscall {}]",
                    e.file_name(),
                    state.unwrap_or("?"),
                    sc.trim()
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn spinner_inside_is_not_quiescent_body() {
        let range = spin_range();
        let spinner = Spinner::start();
        // Still inside at the deadline: not quiescent.
        assert_eq!(quiescent(&[range], Duration::from_millis(300)), Ok(false));
        // Disjoint ranges: everyone is outside.
        let (a, b) = range;
        let disjoint = [(1, a), (b, b + 4096)];
        assert_eq!(
            quiescent(&disjoint, Duration::from_secs(5)),
            Ok(true),
            "disjoint ranges: threads {}",
            task_states()
        );
        // Many ranges (several rounds), one containing the spinner.
        let mut many: Vec<(usize, usize)> = (0..2 * MAX_RANGES)
            .map(|i| (b + 16 * i + 16, b + 16 * i + 24))
            .collect();
        assert_eq!(quiescent(&many, Duration::from_secs(5)), Ok(true));
        many.push(range);
        assert_eq!(quiescent(&many, Duration::from_millis(300)), Ok(false));
        // A thread seen inside is asked again: once it leaves, the scan that
        // saw it inside succeeds.
        let stop = spinner.stop.clone();
        let leaver = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            // Ordering: Relaxed — the spinner only polls it.
            stop.store(true, Ordering::Relaxed);
        });
        assert_eq!(quiescent(&[range], Duration::from_secs(5)), Ok(true));
        // Ordering: Relaxed — set by `leaver` before the spinner could leave.
        assert!(
            spinner.stop.load(Ordering::Relaxed),
            "quiescent while the spinner was still told to spin inside"
        );
        leaver.join().expect("join");
        drop(spinner);
        assert_eq!(quiescent(&[range], Duration::from_secs(5)), Ok(true));
    }

    #[test]
    fn spinner_inside_is_not_quiescent() {
        in_own_process(
            "sys::threads::tests::spinner_inside_is_not_quiescent",
            spinner_inside_is_not_quiescent_body,
        );
    }

    fn blocked_sleeper_is_quiescent_via_procfs_body() {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let sleeper = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                block_all_signals();
                tx.send(gettid()).expect("send");
                // Ordering: Relaxed — polled between sleeps; joined below.
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        let tid = rx.recv().expect("tid");
        std::thread::sleep(Duration::from_millis(10));
        let (start, end) = spin_range();
        for _ in 0..3 {
            assert_eq!(quiescent(&[(start, end)], Duration::from_secs(5)), Ok(true));
        }
        // It was seen blocking the signal: later scans check its queue
        // before sending, so at most one of our signals waits there.
        let (blk, pnd) = sig_masks(tid).expect("status");
        let bit = 1u64 << (scan_signal() - 1);
        assert_ne!(blk & bit, 0);
        assert_ne!(pnd & bit, 0, "one scan signal stays queued");
        assert!(SCAN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .blocked
            .contains(&tid));
        // Ordering: Relaxed — the sleeper polls it; joined below.
        stop.store(true, Ordering::Relaxed);
        sleeper.join().expect("join");
    }

    #[test]
    fn blocked_sleeper_is_quiescent_via_procfs() {
        in_own_process(
            "sys::threads::tests::blocked_sleeper_is_quiescent_via_procfs",
            blocked_sleeper_is_quiescent_via_procfs_body,
        );
    }

    fn a_stale_queued_signal_does_not_hold_back_the_next_scan_body() {
        // A thread that blocks the scan signal and keeps running: a first
        // scan leaves its signal queued there (and cannot see the thread).
        // A second scan starts while that stale signal still waits; when the
        // thread unblocks, the stale one is delivered and ignored, and the
        // second scan must then send its own instead of waiting for an
        // answer that never comes.
        let bit = 1u64 << (scan_signal() - 1);
        let ready = Arc::new(AtomicBool::new(false));
        let unblock = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let runner = {
            let (ready, unblock, stop) = (ready.clone(), unblock.clone(), stop.clone());
            std::thread::spawn(move || {
                // SAFETY: sigset_t is plain data; it is filled before use.
                let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
                // SAFETY: `set` is a valid sigset; pthread_sigmask only
                // changes this thread's mask.
                unsafe {
                    libc::sigemptyset(&mut set);
                    libc::sigaddset(&mut set, scan_signal());
                    assert_eq!(
                        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
                        0
                    );
                }
                tx.send(gettid()).expect("send");
                // Ordering: Release — the main thread scans after this.
                ready.store(true, Ordering::Release);
                // Ordering: Relaxed — test flags, polled; joined below.
                while !unblock.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
                // SAFETY: as above.
                unsafe {
                    assert_eq!(
                        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()),
                        0
                    );
                }
                // Ordering: Relaxed — as above.
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let tid = rx.recv().expect("tid");
        // Ordering: Acquire — pairs with the runner's Release store.
        while !ready.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        let range = spin_range();
        assert_eq!(
            quiescent(&[range], Duration::from_millis(100)),
            Ok(false),
            "a running thread that blocks the signal cannot be seen"
        );
        let (_, pnd) = sig_masks(tid).expect("status");
        assert_ne!(pnd & bit, 0, "the first scan's signal waits in its queue");
        let unblocker = {
            let unblock = unblock.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                // Ordering: Relaxed — the runner polls it.
                unblock.store(true, Ordering::Relaxed);
            })
        };
        assert_eq!(
            quiescent(&[range], Duration::from_secs(10)),
            Ok(true),
            "the thread unblocked outside the range: threads {}",
            task_states()
        );
        // Ordering: Relaxed — see above.
        stop.store(true, Ordering::Relaxed);
        unblocker.join().expect("join");
        runner.join().expect("join");
    }

    #[test]
    fn a_stale_queued_signal_does_not_hold_back_the_next_scan() {
        in_own_process(
            "sys::threads::tests::a_stale_queued_signal_does_not_hold_back_the_next_scan",
            a_stale_queued_signal_does_not_hold_back_the_next_scan_body,
        );
    }

    fn exiting_thread_does_not_hang_the_scan_body() {
        // A thread that blocks the signal and keeps running (so procfs says
        // "running"), then exits mid-scan: the scan notices it is gone.
        let ready = Arc::new(AtomicBool::new(false));
        let runner = {
            let ready = ready.clone();
            std::thread::spawn(move || {
                block_all_signals();
                // Ordering: Release — the main thread scans after this.
                ready.store(true, Ordering::Release);
                let until = Instant::now() + Duration::from_millis(150);
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            })
        };
        // Ordering: Acquire — pairs with the runner's Release store.
        while !ready.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        let (start, end) = spin_range();
        // A hang would run into the timeout and answer `Ok(false)`.
        assert_eq!(
            quiescent(&[(start, end)], Duration::from_secs(10)),
            Ok(true)
        );
        runner.join().expect("join");
        // Threads coming and going during scans never hang them either.
        let stop = Arc::new(AtomicBool::new(false));
        let churn = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // Ordering: Relaxed — a test flag; joined below.
                while !stop.load(Ordering::Relaxed) {
                    std::thread::spawn(|| std::hint::black_box(0))
                        .join()
                        .expect("join");
                }
            })
        };
        for _ in 0..20 {
            let r = quiescent(&[(start, end)], Duration::from_secs(2)).expect("scan");
            assert!(r, "no thread is in spin_until, and none hung the scan");
        }
        // Ordering: Relaxed — see above.
        stop.store(true, Ordering::Relaxed);
        churn.join().expect("join");
    }

    #[test]
    fn exiting_thread_does_not_hang_the_scan() {
        in_own_process(
            "sys::threads::tests::exiting_thread_does_not_hang_the_scan",
            exiting_thread_does_not_hang_the_scan_body,
        );
    }

    fn the_signal_barrier_covers_every_thread_body() {
        // A thread that takes the signal, one that blocks it and sleeps (seen
        // asleep in procfs), and one that blocks it and spins for a while:
        // the barrier returns only once the spinner has stopped spinning and
        // gone to sleep.
        let stop = Arc::new(AtomicBool::new(false));
        let spinning = Arc::new(AtomicBool::new(true));
        let (tx, rx) = std::sync::mpsc::channel();
        let threads = [
            {
                let (stop, tx) = (stop.clone(), tx.clone());
                std::thread::spawn(move || {
                    tx.send(()).expect("send");
                    // Ordering: Relaxed — a test flag; joined below.
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            },
            {
                let (stop, tx) = (stop.clone(), tx.clone());
                std::thread::spawn(move || {
                    block_all_signals();
                    tx.send(()).expect("send");
                    // Ordering: Relaxed — as above.
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
            },
            {
                let (stop, spinning, tx) = (stop.clone(), spinning.clone(), tx.clone());
                std::thread::spawn(move || {
                    block_all_signals();
                    tx.send(()).expect("send");
                    let until = Instant::now() + Duration::from_millis(300);
                    while Instant::now() < until {
                        std::hint::spin_loop();
                    }
                    // Ordering: SeqCst — read by the main thread after the
                    // barrier returned.
                    spinning.store(false, Ordering::SeqCst);
                    // Ordering: Relaxed — as above.
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
            },
        ];
        for _ in 0..threads.len() {
            rx.recv().expect("started");
        }
        signal_barrier().expect("barrier");
        // Ordering: SeqCst — see the store.
        assert!(
            !spinning.load(Ordering::SeqCst),
            "the barrier returned while a thread that could not take it ran"
        );
        for _ in 0..20 {
            signal_barrier().expect("barrier");
        }
        // Ordering: Relaxed — the threads are joined right after.
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().expect("join");
        }
    }

    #[test]
    fn the_signal_barrier_covers_every_thread() {
        in_own_process(
            "sys::threads::tests::the_signal_barrier_covers_every_thread",
            the_signal_barrier_covers_every_thread_body,
        );
    }

    #[test]
    fn foreign_handler_is_not_replaced() {
        in_own_process(
            "sys::threads::tests::foreign_handler_is_not_replaced",
            || {
                extern "C" fn host(_: c_int) {}
                let sig = scan_signal();
                // SAFETY: installs a no-op handler in this child process.
                unsafe { libc::signal(sig, host as extern "C" fn(c_int) as usize) };
                assert!(matches!(scan_init(), Err(Error::Signal(_))));
                assert!(matches!(
                    quiescent(&[(1, 2)], Duration::from_millis(10)),
                    Err(Error::Signal(_))
                ));
            },
        );
    }
}
