//! Read-side sections and grace periods.
//!
//! # The algorithm
//!
//! Every handler invocation runs inside a *read-side section*. A section is
//! recorded in a [`Slot`] of a static table: a 64-bit sequence number that is
//! odd while the section runs. [`synchronize`] (one *grace period*) waits until
//! every section that began before it has ended:
//!
//! 1. `membarrier()` — a full barrier on every running thread of the process;
//! 2. snapshot every slot whose sequence is odd;
//! 3. wait until each of those sequences has moved on.
//!
//! Readers pay no fence: entering a section is one non-locked `inc` of a slot
//! only the entering thread writes, then the reads it protects. The writer's
//! `membarrier` stands in for the reader's store→load fence (the *asymmetric
//! fence* of Linux's `sys_membarrier` users, folly and seize): either the
//! writer's step 2 sees the odd sequence, or the reader's reads come after the
//! barrier and see everything the writer unpublished before it.
//!
//! # Finding the slot without thread-locals
//!
//! A signal handler may not touch a lazily initialised thread-local (in a
//! `cdylib` the first touch can allocate), so a thread finds its slot by its
//! thread pointer ([`crate::arch::thread_pointer`]): the first
//! [`PERSISTENT`] slots are an open-addressed table keyed by the thread
//! pointer, claimed once by CAS and kept (never deleted, so linear probing has
//! no holes). The slot is then written by its owner alone, which is what makes
//! the non-locked `inc` safe: an `inc` is one instruction, so a signal on the
//! same thread sees the slot before or after it, never half-way.
//!
//! Thread pointers are reused by later threads (glibc caches thread stacks),
//! so a dead thread's slot passes to the next thread with the same pointer. If
//! the persistent table is ever full, a thread borrows one of the
//! [`TRANSIENT`] slots for the length of one section (claimed by CAS, released
//! by a store); a transient slot is equally exclusive while borrowed.
//!
//! # Per-thread hit counts
//!
//! Counting every hit into the consumer's record would write a cache line
//! every hitting thread shares, and two threads hitting one probe would
//! bounce it between cores. So a slot also holds a small direct-mapped cache
//! of `(consumer tag, count)`, written only by the slot's owner; an entry is
//! flushed into the consumer record when another consumer needs its place,
//! and [`pending_hits`] adds up what is still cached when statistics are read.
//!
//! # Recursion
//!
//! A thread that enters while its slot is already odd is inside a handler (a
//! consumer called probed code, or a signal handler interrupted one): the
//! section is [`Section::is_nested`] and the dispatcher counts a *missed* hit.
//!
//! # Safety
//!
//! The only `unsafe` is the inline `inc` of a slot, which is sound because
//! each slot has one writer at a time (see above) and the slot is an
//! `AtomicU64` that other threads read with atomic loads.
#![allow(unsafe_code)]

use std::sync::atomic::{compiler_fence, fence, AtomicU64, AtomicUsize, Ordering};

use crate::arch::thread_pointer;
use crate::sigctx::SignalContext;
use crate::sys::membarrier;

/// Slots claimed for good by one thread pointer.
pub(crate) const PERSISTENT: usize = 448;
/// Slots borrowed for one section when the persistent table is full.
pub(crate) const TRANSIENT: usize = 64;
const SLOTS: usize = PERSISTENT + TRANSIENT;
/// Marks a transient owner: thread pointers are at least 8-aligned.
const TRANSIENT_TAG: usize = 1;

/// Entries of a slot's hit cache.
const HIT_WAYS: usize = 7;

/// A consumer's hits counted by one thread and not yet flushed.
struct HitEntry {
    /// The consumer's tag (0: empty).
    tag: AtomicU64,
    count: AtomicU64,
}

/// One thread's read-side state, alone on its cache lines so that entering
/// and leaving sections and counting hits write no line another thread writes.
#[repr(C, align(128))]
struct Slot {
    /// Thread pointer of the owner (`| TRANSIENT_TAG` for a borrowed slot);
    /// 0 when free.
    owner: AtomicUsize,
    /// Odd while the owner is inside a section.
    seq: AtomicU64,
    hits: [HitEntry; HIT_WAYS],
}

#[allow(clippy::declare_interior_mutable_const)] // only used to initialise TABLE
const FREE_SLOT: Slot = Slot {
    owner: AtomicUsize::new(0),
    seq: AtomicU64::new(0),
    hits: [const {
        HitEntry {
            tag: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }; HIT_WAYS],
};
static TABLE: [Slot; SLOTS] = [FREE_SLOT; SLOTS];

/// A read-side section; leave it with [`Section::exit`].
#[derive(Debug)]
#[must_use = "a section must be left with exit()"]
pub(crate) struct Section {
    slot: u16,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Persistent,
    Transient,
    /// The thread was already inside a section: nothing to undo on exit.
    Nested,
}

impl Section {
    /// Whether the thread was already inside a section (a recursive hit).
    ///
    /// # Signal safety
    /// A field read.
    #[inline]
    pub(crate) fn is_nested(&self) -> bool {
        self.kind == Kind::Nested
    }

    /// Counts one hit of the consumer `tag` on this thread; `flush` adds an
    /// evicted entry's count to its consumer's record.
    ///
    /// # Signal safety
    /// Loads and stores to the caller's own slot; `flush` must be
    /// signal-safe. Called only inside a non-nested section, so no other hit
    /// on this thread can interleave with it (a probe hit by a signal handler
    /// meanwhile is nested and only counts as missed).
    #[inline]
    pub(crate) fn count_hit(&self, _cx: SignalContext, tag: u64, flush: impl FnOnce(u64, u64)) {
        let e = &TABLE[self.slot as usize % SLOTS].hits[(tag % HIT_WAYS as u64) as usize];
        // Ordering (all): Relaxed — the entry is written by its owner only;
        // readers (`pending_hits`) want a value, not an ordering.
        let cur = e.tag.load(Ordering::Relaxed);
        if cur == tag {
            e.count
                .store(e.count.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            return;
        }
        let old = e.count.load(Ordering::Relaxed);
        e.tag.store(0, Ordering::Relaxed);
        if cur != 0 && old != 0 {
            flush(cur, old);
        }
        e.count.store(1, Ordering::Relaxed);
        e.tag.store(tag, Ordering::Relaxed);
    }

    /// Leaves the section.
    ///
    /// # Signal safety
    /// One store (and one more for a transient slot); no allocation, lock or
    /// panic.
    #[inline]
    #[link_section = "probert_fast"] // see `crate::fast::code_range`
    pub(crate) fn exit(self, _cx: SignalContext) {
        let slot = &TABLE[self.slot as usize % SLOTS];
        match self.kind {
            Kind::Nested => {}
            Kind::Persistent => {
                // Ordering: the compiler fence keeps the section's reads before
                // the `inc`; x86 stores are release, so a writer that loads the
                // new even value (Acquire, in `wait_for`) sees the section over
                // — pairs with `synchronize`.
                compiler_fence(Ordering::SeqCst);
                slot_inc(slot);
            }
            Kind::Transient => {
                compiler_fence(Ordering::SeqCst);
                slot_inc(slot);
                // Ordering: Release — the next borrower's CAS (Acquire in
                // `enter_transient`) sees our final `seq`.
                slot.owner.store(0, Ordering::Release);
            }
        }
    }
}

/// Increments `slot.seq` with one non-locked `inc`.
///
/// # Signal safety
/// One instruction: a signal on this thread sees it done or not done.
#[inline(always)]
fn slot_inc(slot: &Slot) {
    // SAFETY: the slot belongs to the calling thread (persistent owner or
    // current borrower), so no other thread writes `seq` concurrently; `inc`
    // on an aligned u64 is a single-copy-atomic store for other threads'
    // atomic loads; the pointer comes from a live `AtomicU64`.
    unsafe {
        core::arch::asm!("inc qword ptr [{0}]", in(reg) slot.seq.as_ptr(),
            options(nostack));
    }
}

/// A cheap, well-mixed hash of a thread pointer into the persistent table.
#[inline(always)]
fn home(tp: usize) -> usize {
    // Fibonacci hashing; thread pointers differ mostly in the middle bits.
    ((tp as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize % PERSISTENT
}

/// Enters a read-side section on the calling thread.
///
/// # Signal safety
/// Loads, at most one CAS per slot probed (only on a thread's first section)
/// and one non-locked `inc`; bounded by the table size; no allocation, lock or
/// panic.
#[inline]
#[link_section = "probert_fast"] // see `crate::fast::code_range`
pub(crate) fn enter(cx: SignalContext) -> Section {
    let tp = thread_pointer();
    let start = home(tp);
    for i in 0..PERSISTENT {
        let idx = (start + i) % PERSISTENT;
        let slot = &TABLE[idx];
        // Ordering: Relaxed — only this thread ever stores `tp` here, so
        // seeing it means we (or a dead thread with our pointer) claimed it.
        let owner = slot.owner.load(Ordering::Relaxed);
        if owner == 0 {
            // Ordering: Acquire on success — we take over the slot's `seq`
            // history; pairs with the Release in `reset_after_fork`.
            match slot
                .owner
                .compare_exchange(0, tp, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return enter_slot(idx, Kind::Persistent),
                Err(other) if other == tp => return enter_slot(idx, Kind::Persistent),
                Err(_) => continue,
            }
        }
        if owner == tp {
            return enter_slot(idx, Kind::Persistent);
        }
    }
    enter_transient(cx, tp)
}

#[inline(always)]
fn enter_slot(idx: usize, kind: Kind) -> Section {
    let slot = &TABLE[idx];
    // Ordering: Relaxed — our own slot; we are its only writer.
    if slot.seq.load(Ordering::Relaxed) & 1 == 1 {
        return Section {
            slot: idx as u16,
            kind: Kind::Nested,
        };
    }
    slot_inc(slot);
    // Ordering: the compiler fence keeps the protected reads after the `inc`;
    // the CPU-level store→load order is supplied by the writer's membarrier —
    // pairs with `synchronize`.
    compiler_fence(Ordering::SeqCst);
    Section {
        slot: idx as u16,
        kind,
    }
}

/// The persistent table is full: borrow a transient slot for this section.
///
/// # Signal safety
/// Bounded scans and CAS; if every transient slot is busy it spins until one
/// is released, which only another thread's running handler can delay.
#[cold]
#[link_section = "probert_fast"] // see `crate::fast::code_range`
fn enter_transient(_cx: SignalContext, tp: usize) -> Section {
    let tagged = tp | TRANSIENT_TAG;
    // A borrowed slot of ours means this is a recursive entry.
    for (idx, slot) in TABLE.iter().enumerate().skip(PERSISTENT) {
        // Ordering: Relaxed — only this thread stores `tagged`.
        if slot.owner.load(Ordering::Relaxed) == tagged {
            return Section {
                slot: idx as u16,
                kind: Kind::Nested,
            };
        }
    }
    loop {
        for (idx, slot) in TABLE.iter().enumerate().skip(PERSISTENT) {
            // Ordering: Acquire — see the previous borrower's last `seq`
            // store; pairs with the Release in `Section::exit`.
            if slot
                .owner
                .compare_exchange(0, tagged, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return enter_slot(idx, Kind::Transient);
            }
        }
        std::hint::spin_loop();
    }
}

/// Whether the calling thread is inside a section right now (so waiting for
/// a grace period would wait for itself).
pub(crate) fn in_section() -> bool {
    let tp = thread_pointer();
    TABLE.iter().any(|s| {
        // Ordering: Relaxed — our own slot, written only by this thread.
        let owner = s.owner.load(Ordering::Relaxed);
        (owner == tp || owner == tp | TRANSIENT_TAG) && s.seq.load(Ordering::Relaxed) & 1 == 1
    })
}

/// Hits of the consumer `tag` counted by threads and not yet flushed to its
/// record. Exact once the consumer's hits have stopped; while they run, a
/// concurrent eviction may be missed or counted twice for an instant.
pub(crate) fn pending_hits(tag: u64) -> u64 {
    TABLE
        .iter()
        .flat_map(|s| s.hits.iter())
        // Ordering: Relaxed — statistics.
        .filter(|e| e.tag.load(Ordering::Relaxed) == tag)
        .map(|e| e.count.load(Ordering::Relaxed))
        .sum()
}

/// Waits one grace period: every section that began before this call has
/// ended when it returns. Normal context only; must not be called from inside
/// a section (see [`in_section`]).
pub(crate) fn synchronize() {
    // Ordering: a full barrier on every thread — pairs with the compiler
    // fences in `enter_slot`/`Section::exit`. Everything the caller
    // unpublished before this point is invisible to sections that begin after
    // it, and sections already running have their odd `seq` visible below.
    fence(Ordering::SeqCst);
    membarrier::barrier();
    let mut waiting = [(0u16, 0u64); SLOTS];
    let mut n = 0;
    for (idx, slot) in TABLE.iter().enumerate() {
        // Ordering: Acquire — pairs with the readers' `inc` in enter/exit.
        let seq = slot.seq.load(Ordering::Acquire);
        if seq & 1 == 1 {
            waiting[n] = (idx as u16, seq);
            n += 1;
        }
    }
    for &(idx, seq) in &waiting[..n] {
        wait_for(&TABLE[idx as usize], seq);
    }
    // Ordering: the caller frees memory after this; the Acquire loads in
    // `wait_for` ordered the readers' accesses before it.
    fence(Ordering::SeqCst);
}

fn wait_for(slot: &Slot, seq: u64) {
    let mut spins = 0u32;
    // Ordering: Acquire — pairs with the reader's `inc` in `Section::exit`:
    // once we see the sequence move, the section's reads are done.
    while slot.seq.load(Ordering::Acquire) == seq {
        spins += 1;
        if spins < 64 {
            std::hint::spin_loop();
        } else if spins < 256 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }
}

/// In a forked child only the forking thread survives; every other slot is
/// freed (its owner may have been mid-section at `fork`, and would otherwise
/// hold grace periods forever). Runs in the `pthread_atfork` child handler.
///
/// # Signal safety
/// Plain atomic stores.
pub(crate) fn reset_after_fork(flush: impl Fn(u64, u64)) {
    let tp = thread_pointer();
    for slot in TABLE.iter() {
        // Ordering: Relaxed — single-threaded here (the child has one thread).
        let owner = slot.owner.load(Ordering::Relaxed);
        if owner != tp && owner != tp | TRANSIENT_TAG {
            // The hits those threads counted in the parent still count.
            for e in &slot.hits {
                let (tag, n) = (
                    e.tag.load(Ordering::Relaxed),
                    e.count.load(Ordering::Relaxed),
                );
                if tag != 0 && n != 0 {
                    flush(tag, n);
                }
                e.tag.store(0, Ordering::Relaxed);
                e.count.store(0, Ordering::Relaxed);
            }
            slot.seq.store(0, Ordering::Relaxed);
            // Ordering: Release — pairs with the Acquire claim in `enter`.
            slot.owner.store(0, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn cx() -> SignalContext {
        // SAFETY: tests call only signal-safe functions with it.
        unsafe { SignalContext::new() }
    }

    #[test]
    fn nested_entry_is_detected() {
        let outer = enter(cx());
        assert!(!outer.is_nested());
        assert!(in_section());
        let inner = enter(cx());
        assert!(inner.is_nested());
        inner.exit(cx());
        assert!(in_section());
        outer.exit(cx());
        assert!(!in_section());
        let again = enter(cx());
        assert!(!again.is_nested());
        again.exit(cx());
    }

    #[test]
    fn synchronize_waits_for_a_running_section() {
        crate::sys::membarrier::init();
        let entered = Arc::new(AtomicBool::new(false));
        let release = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (entered, release, done) = (entered.clone(), release.clone(), done.clone());
            std::thread::spawn(move || {
                let s = enter(cx());
                entered.store(true, Ordering::SeqCst);
                while !release.load(Ordering::SeqCst) {
                    std::hint::spin_loop();
                }
                done.store(true, Ordering::SeqCst);
                s.exit(cx());
            })
        };
        while !entered.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        let releaser = {
            let release = release.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                release.store(true, Ordering::SeqCst);
            })
        };
        synchronize();
        // The section ended before synchronize returned.
        assert!(done.load(Ordering::SeqCst));
        t.join().unwrap();
        releaser.join().unwrap();
    }

    #[test]
    fn many_threads_get_distinct_slots() {
        // More threads than transient slots, all inside a section at once.
        let n = 100;
        let barrier = Arc::new(std::sync::Barrier::new(n));
        let slots: Vec<u16> = (0..n)
            .map(|_| {
                let b = barrier.clone();
                std::thread::spawn(move || {
                    let s = enter(cx());
                    let idx = s.slot;
                    b.wait();
                    s.exit(cx());
                    idx
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        let mut sorted = slots.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), n, "two live threads shared a slot");
    }
}
