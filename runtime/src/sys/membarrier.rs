//! Process-wide memory barrier: the heavy side of an asymmetric fence.
//!
//! Readers (the trap handler, fast-path dispatchers) pay only a compiler
//! fence; the rare writer calls [`barrier`], which makes every thread of the
//! process execute a full memory barrier before it returns. Between the two, a
//! store-then-load on each side can no longer both miss the other's store.
//! This is the scheme of `membarrier(2)`, Linux RCU's `sys_membarrier` users,
//! folly's `asymmetricHeavyBarrier` and .NET's `FlushProcessWriteBuffers`.
//!
//! - Preferred: `MEMBARRIER_CMD_PRIVATE_EXPEDITED` (Linux 4.14+), after a
//!   one-time `MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED`. The kernel IPIs
//!   every CPU currently running a thread of this process and executes a full
//!   barrier there; threads not running get one at their next context switch.
//! - Fallback (no `membarrier`, e.g. seccomp-filtered or old kernels): flip
//!   the protection of a dedicated, touched page RW → `PROT_NONE` → RW. Taking
//!   access away makes the kernel shoot down the page's TLB entries on every
//!   CPU that may run this address space, by IPI; the interrupt is a full
//!   barrier on each such CPU. This is what .NET and folly do without
//!   `membarrier`. It relies on the kernel flushing remote TLBs by IPI: true
//!   for x86 kernels today, not for hardware with broadcast TLB invalidation
//!   (arm64 `TLBI …IS`, AMD `INVLPGB` when the kernel uses it), where the
//!   fallback degrades to a local fence. [`init`] says which one is in use.
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
//! The unsafe code here is raw `membarrier` and `mprotect` system calls and
//! atomic accesses to the fallback page, which this module maps itself, never
//! unmaps, and is the only one to touch.

#![allow(unsafe_code)]

use std::sync::atomic::{fence, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::{maps, raw};

/// `MEMBARRIER_CMD_QUERY`: returns the mask of supported commands.
const CMD_QUERY: i64 = 0;
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
/// [`barrier`] is a real cross-thread barrier.
///
/// `true`: `membarrier` is registered. `false`: [`barrier`] uses the
/// mprotect TLB-shootdown fallback, a real barrier on kernels that shoot
/// down TLBs by IPI (x86 today) but not guaranteed elsewhere (see the module
/// docs). Idempotent and thread-safe; [`barrier`] calls it itself.
pub fn init() -> bool {
    register(
        &EXPEDITED,
        CMD_PRIVATE_EXPEDITED,
        CMD_REGISTER_PRIVATE_EXPEDITED,
    )
}

/// Issues a full memory barrier on every thread of the process.
///
/// Costs one IPI round (microseconds). Normal context only (the fallback
/// takes a lock). Pairs with the readers' compiler fences.
pub fn barrier() {
    barrier_with(true);
}

/// [`barrier`], with `membarrier` allowed or not (tests force the fallback).
fn barrier_with(use_membarrier: bool) {
    // Ordering: SeqCst orders the caller's earlier accesses before the
    // remote barriers — pairs with the readers' `compiler_fence(SeqCst)`.
    fence(Ordering::SeqCst);
    if !(use_membarrier && init() && membarrier(CMD_PRIVATE_EXPEDITED).is_ok()) {
        shootdown_barrier();
    }
    // Ordering: SeqCst orders the caller's later accesses after the remote
    // barriers — pairs with the readers' `compiler_fence(SeqCst)`.
    fence(Ordering::SeqCst);
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
/// use. Without it, falls back to [`barrier`]: on x86 each IPI returns to
/// user space through `IRET`, which is serializing, so that is best effort
/// there and not a guarantee elsewhere. Normal context only.
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

/// Address of the fallback page, mapped read-write; 0 until first needed.
static SHOOTDOWN_PAGE: AtomicUsize = AtomicUsize::new(0);
/// Serializes fallback barriers: two flipping one page would fault each
/// other's touch.
static SHOOTDOWN_LOCK: Mutex<()> = Mutex::new(());

/// The fallback: touch the page (so its PTE is present and dirty and the
/// kernel cannot skip the flush), revoke all access (TLB shootdown: an IPI to
/// every CPU in the address space's CPU mask), restore read-write.
fn shootdown_barrier() {
    let _lock = SHOOTDOWN_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let page_len = maps::page_size();
    // Ordering: Relaxed — written and read only under SHOOTDOWN_LOCK, which
    // orders them — pairs with the store below.
    let mut page = SHOOTDOWN_PAGE.load(Ordering::Relaxed);
    if page == 0 {
        match maps::reserve(page_len) {
            Ok(p) => page = p as usize,
            // No page, no shootdown: the local fences are all we can do.
            Err(_) => return,
        }
        // Ordering: Relaxed — under SHOOTDOWN_LOCK, as above.
        SHOOTDOWN_PAGE.store(page, Ordering::Relaxed);
    }
    // SAFETY: `page` is our own read-write page, page-aligned (mmap), so
    // valid and aligned for an `AtomicUsize`; only this function, under the
    // lock, accesses it.
    let cell = unsafe { &*(page as *const AtomicUsize) };
    // Ordering: Relaxed — the write only makes the PTE present and dirty;
    // ordering comes from the fences in `barrier` — pairs with nothing.
    cell.fetch_add(1, Ordering::Relaxed);
    let prot = |p: i32| {
        // SAFETY: our own page; nothing accesses it while it is PROT_NONE
        // (the lock is held and only this function touches it).
        unsafe {
            raw::syscall3(
                libc::SYS_mprotect,
                page as i64,
                page_len as i64,
                i64::from(p),
            )
        }
    };
    prot(libc::PROT_NONE);
    prot(libc::PROT_READ | libc::PROT_WRITE);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{compiler_fence, AtomicBool, AtomicU32, AtomicU64};
    use std::sync::Arc;

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
                            1 => barrier_with(false),
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

    #[test]
    fn shootdown_fallback_forbids_store_buffering() {
        store_buffering(|| barrier_with(false), 5_000);
    }
}
