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
//! Readers pay no fence and no atomic read-modify-write: entering a section
//! is a load and a plain store of a slot only the entering thread writes,
//! then the reads it protects; leaving is one more store. (Leaving stores the
//! value entering stored plus one, from a register: back-to-back hits on one
//! thread then wait on one store-to-load forward each, not three.) The writer's
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
//! plain stores safe. A signal on the same thread can arrive between
//! entering's load and its store: its handler, seeing the slot even, runs a
//! whole section of its own (odd, then even) before the interrupted entry
//! stores its odd value — which repeats the handler's odd value. A writer
//! that snapshotted the handler's odd value waits until the slot holds any
//! other value, which is only written after the handler's section ended (it
//! may also wait for the interrupted section, never less); and whatever
//! value of the handler's the writer read, its barrier came before the
//! interrupted store, so that section's reads come after the barrier.
//! Between entering and leaving, any handler on the thread sees the slot odd
//! and writes nothing.
//!
//! Thread pointers are reused by later threads (glibc caches thread stacks),
//! so a dead thread's slot passes to the next thread with the same pointer. If
//! the persistent table is ever full, a thread borrows one of the
//! [`TRANSIENT`] slots for the length of one section (claimed by CAS, released
//! by a store); a transient slot is equally exclusive while borrowed.
//!
//! # Giving slots back
//!
//! A thread that claims a persistent slot arms a thread-exit hook
//! ([`crate::sys::thread_exit`], a `pthread` key destructor: stores only,
//! also in signal context). When the thread exits, the hook — normal
//! context, the thread outside any section — marks the slot *exiting*:
//! owner `tp | EXITING_TAG`, with the thread's kernel id beside it. Nothing
//! writes an exiting slot's sequence any more: the thread, still running
//! its exit path (later destructors may hit probes), sees an exiting slot of
//! its own pointer *and* its own id and borrows transient slots for the
//! rest of its life (claiming again would arm a hook that no longer runs).
//! An exiting slot becomes another thread's by one CAS of its owner: a
//! thread with the same pointer but another id (its previous owner is dead:
//! two live threads never share a thread pointer), or any thread once
//! `tgkill` says the recorded id has exited. So a server that creates
//! threads forever keeps finding private slots. Slots never become empty
//! again (that would cut the probe sequences of the slots after them);
//! a slot freed by `fork` is marked `DEAD`, claimable like an exiting one.
//!
//! # Per-thread hit counts
//!
//! Counting every hit into the consumer's record would write a cache line
//! every hitting thread shares, and two threads hitting one probe would
//! bounce it between cores. So each slot owns a direct-mapped cache of
//! `(consumer tag, count)` (1024 ways, in a table beside the slots),
//! written by the slot's owner; an entry is flushed into the consumer record
//! when another consumer needs its place, and [`pending_hits`] adds up what
//! is still cached when statistics are read. The ways are many because real
//! code sends a thread's hits to hundreds of consumers in turn, and a flush
//! — a locked add into a record that has left the CPU's caches — costs
//! more than the rest of a fast hit (on an AMD EPYC Zen 3 guest, with every
//! function entry of SQLite probed, 8 ways cost about 3 ns more per hit than
//! 1024).
//! The one other writer is the probert writer, which clears the tags of
//! detached consumers with a compare-and-swap ([`purge_hit_entries`]) before
//! their records are reused, so that no late flush reaches the next consumer
//! of a record.
//!
//! # Recursion
//!
//! A thread that enters while its slot is already odd is inside a handler (a
//! consumer called probed code, or a signal handler interrupted one): the
//! section is [`Section::is_nested`] and the dispatcher counts a *missed* hit.
//!
//! # Safety
//!
//! No `unsafe` code outside the tests: slots are atomics, written by one
//! thread at a time (see above). The lint is allowed for the
//! `#[link_section]` that places the entry and exit paths in
//! `probert_fast` (see `crate::fast::code_range`).
#![allow(unsafe_code)]

use std::sync::atomic::compiler_fence;

#[cfg(not(all(test, loom)))]
use crate::arch::thread_pointer;
use crossbeam_utils::CachePadded;

use crate::sigctx::SignalContext;
use crate::sync::{fence, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(all(test, loom)))]
use crate::sys::membarrier;

/// Slots claimed for good by one thread pointer (a power of two: the hash
/// is a multiply and a shift, the probe step a mask).
#[cfg(not(all(test, loom)))]
pub(crate) const PERSISTENT: usize = 512;
/// Loom explores every step: two threads need two slots.
#[cfg(all(test, loom))]
pub(crate) const PERSISTENT: usize = 2;
const PERSISTENT_BITS: u32 = PERSISTENT.trailing_zeros();
/// Slots borrowed for one section when the persistent table is full.
#[cfg(not(all(test, loom)))]
pub(crate) const TRANSIENT: usize = 64;
#[cfg(all(test, loom))]
pub(crate) const TRANSIENT: usize = 1;
const SLOTS: usize = PERSISTENT + TRANSIENT;
/// Marks a transient owner: thread pointers are at least 8-aligned.
const TRANSIENT_TAG: usize = 1;
/// Marks a persistent slot whose owner has exited, or is exiting (see
/// "Giving slots back").
const EXITING_TAG: usize = 2;
/// A persistent slot freed by `fork`: claimable, and not the end of a
/// probe sequence (no thread pointer lies in the first page).
const DEAD: usize = 4;

/// Entries of a slot's hit cache (a power of two: the way is a mask of the
/// tag, whose low bits are the consumer index). Real code sends its hits to
/// hundreds of consumers in turn (every function entry of a library probed):
/// with few ways nearly every hit evicts, and an eviction's locked add into
/// a consumer record that is not in the cache costs more than the rest of
/// a fast hit (see [`HitWays`] for the memory).
#[cfg(not(all(test, loom)))]
pub(crate) const HIT_WAYS: usize = 1024;
#[cfg(all(test, loom))]
pub(crate) const HIT_WAYS: usize = 2;

/// A consumer's hits counted by one thread and not yet flushed.
#[repr(C)]
#[derive(Debug)]
struct HitEntry {
    /// The consumer's tag (0: empty).
    tag: AtomicU64,
    count: AtomicU64,
}

/// One thread's read-side state. Each lives alone in a [`CachePadded`]
/// block (128 bytes on x86_64, where the adjacent-line prefetcher pulls
/// lines in pairs), so that entering and leaving sections and counting hits
/// write no line another thread writes.
#[repr(C)]
#[derive(Debug)]
struct Slot {
    /// Thread pointer of the owner (`| TRANSIENT_TAG` for a borrowed slot);
    /// 0 when free.
    owner: AtomicUsize,
    /// Odd while the owner is inside a section.
    seq: AtomicU64,
    /// The kernel thread id of an exiting owner (set before the owner
    /// becomes `tp | EXITING_TAG`).
    exit_tid: AtomicU64,
}

/// A slot's hit cache, in a table of its own beside the slots: the slots
/// stay small and dense (a grace period reads every one of them), and the
/// caches, 16 KiB each, are memory only where a thread has counted hits
/// (the table is zero-initialised, so untouched pages are never
/// allocated). The slot of index `i` owns the hit cache of index `i`.
#[repr(C, align(128))]
#[derive(Debug)]
struct HitWays([HitEntry; HIT_WAYS]);

impl HitWays {
    /// The entry that may hold `tag`.
    #[inline(always)]
    fn way(&self, tag: u64) -> &HitEntry {
        &self.0[tag as usize & (HIT_WAYS - 1)]
    }
}

/// The section table: the algorithm is its methods. Production has one,
/// [`TABLE`], a `static` (the slot lookup is a static address); each loom
/// model builds its own (see `loom_tests`).
struct Sections {
    slots: [CachePadded<Slot>; SLOTS],
    hits: [HitWays; SLOTS],
    /// Loom only: whether `synchronize` issues the (modelled) membarrier —
    /// `false` in the model that shows it is needed.
    #[cfg(all(test, loom))]
    membarrier: bool,
}

#[cfg(not(all(test, loom)))]
#[allow(clippy::declare_interior_mutable_const)] // only used to initialise TABLE
const FREE_SLOT: CachePadded<Slot> = CachePadded::new(Slot {
    owner: AtomicUsize::new(0),
    seq: AtomicU64::new(0),
    exit_tid: AtomicU64::new(0),
});

#[cfg(not(all(test, loom)))]
#[allow(clippy::declare_interior_mutable_const)] // only used to initialise TABLE
const NO_HITS: HitWays = HitWays(
    [const {
        HitEntry {
            tag: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }; HIT_WAYS],
);

impl Sections {
    #[cfg(not(all(test, loom)))]
    const fn new() -> Sections {
        Sections {
            slots: [FREE_SLOT; SLOTS],
            hits: [NO_HITS; SLOTS],
        }
    }

    /// Loom's atomics are not `const`: built at run time, in the model.
    #[cfg(all(test, loom))]
    fn new(membarrier: bool) -> Sections {
        Sections {
            slots: std::array::from_fn(|_| {
                CachePadded::new(Slot {
                    owner: AtomicUsize::new(0),
                    seq: AtomicU64::new(0),
                    exit_tid: AtomicU64::new(0),
                })
            }),
            hits: std::array::from_fn(|_| {
                HitWays(std::array::from_fn(|_| HitEntry {
                    tag: AtomicU64::new(0),
                    count: AtomicU64::new(0),
                }))
            }),
            membarrier,
        }
    }
}

#[cfg(not(all(test, loom)))]
static TABLE: Sections = Sections::new();

// Only so that the free functions compile under loom: models use their own
// `Sections` (a loom lazy static is per execution, so this one would work too).
#[cfg(all(test, loom))]
loom::lazy_static! {
    static ref TABLE: Sections = Sections::new(true);
}

/// Under loom, a thread's identity: loom threads share one OS thread (and
/// its `%fs`), so the thread pointer comes from loom's thread number, shaped
/// like a thread pointer (non-zero, page-aligned). It must be the same in
/// every execution (loom replays them), which rules out hashing the
/// `ThreadId` (it includes the execution's id); the number is only
/// reachable through `Debug`.
#[cfg(all(test, loom))]
fn thread_pointer() -> usize {
    // The real one is unused under loom; say so rather than warn.
    let _ = crate::arch::thread_pointer;
    let id = format!("{:?}", loom::thread::current().id());
    let n: usize = id
        .trim_start_matches("ThreadId(")
        .trim_end_matches(')')
        .parse()
        .expect("loom's ThreadId(n)");
    (n + 1) << 12
}

/// A read-side section; leave it with [`Section::exit`].
#[derive(Debug)]
#[must_use = "a section must be left with exit()"]
pub(crate) struct Section<'t> {
    slot: &'t Slot,
    /// The slot's hit cache.
    hits: &'t HitWays,
    kind: Kind,
    /// The odd value entering stored (for `exit` to store plus one).
    seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Persistent,
    Transient,
    /// The thread was already inside a section: nothing to undo on exit.
    Nested,
}

impl Section<'_> {
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
    #[inline(always)]
    pub(crate) fn count_hit(&self, _cx: SignalContext, tag: u64, flush: impl FnOnce(u64, u64)) {
        let e = self.hits.way(tag);
        // Ordering (all): Relaxed — the entry is written by its owner only;
        // readers (`pending_hits`) want a value, not an ordering.
        if e.tag.load(Ordering::Relaxed) == tag {
            e.count
                .store(e.count.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        } else {
            replace_hit_entry(e, tag, flush);
        }
    }

    /// Leaves the section.
    ///
    /// # Signal safety
    /// One store (and one more for a transient slot); no allocation, lock or
    /// panic.
    #[inline(always)]
    pub(crate) fn exit(self, _cx: SignalContext) {
        match self.kind {
            Kind::Nested => {}
            Kind::Persistent => {
                // Ordering: the Release store keeps the section's reads
                // before it, so a writer that loads the new even value
                // (Acquire, in `wait_for`) sees the section over — pairs
                // with `synchronize`.
                slot_store(self.slot, self.seq + 1);
            }
            Kind::Transient => {
                slot_store(self.slot, self.seq + 1);
                // Ordering: Release — the next borrower's CAS (Acquire in
                // `enter_transient`) sees our final `seq`.
                self.slot.owner.store(0, Ordering::Release);
            }
        }
    }
}

/// A hit of a consumer not in its way of the thread's hit cache: flush the
/// entry's previous consumer and start counting `tag`.
///
/// # Signal safety
/// Loads and stores to the caller's own slot, and `flush`.
#[cold]
#[inline(never)]
#[link_section = "probert_fast"] // see `crate::fast::code_range`
fn replace_hit_entry(e: &HitEntry, tag: u64, flush: impl FnOnce(u64, u64)) {
    // Ordering (all): Relaxed — see `Section::count_hit`.
    let (cur, old) = (
        e.tag.load(Ordering::Relaxed),
        e.count.load(Ordering::Relaxed),
    );
    e.tag.store(0, Ordering::Relaxed);
    if cur != 0 && old != 0 {
        flush(cur, old);
    }
    e.count.store(1, Ordering::Relaxed);
    e.tag.store(tag, Ordering::Relaxed);
}

/// Sets the calling thread's own `slot.seq`.
///
/// # Signal safety
/// One store (a `mov`; Release costs nothing more on x86): a signal on this
/// thread sees it done or not done.
#[inline(always)]
fn slot_store(slot: &Slot, seq: u64) {
    // Ordering: Release — orders a section's reads before the store that
    // ends it; pairs with the Acquire loads in `synchronize`/`wait_for`.
    // (Entering's store→load order is supplied by the writer's membarrier.)
    slot.seq.store(seq, Ordering::Release);
}

/// Fibonacci hashing; thread pointers differ mostly in the middle bits.
const HOME_MUL: u64 = 0x9E37_79B9_7F4A_7C15;
const HOME_SHIFT: u32 = 64 - PERSISTENT_BITS;

/// A cheap, well-mixed hash of a thread pointer into the persistent table.
#[inline(always)]
fn home(tp: usize) -> usize {
    ((tp as u64).wrapping_mul(HOME_MUL) >> HOME_SHIFT) as usize
}

/// Where generated code finds a thread's home slot, for the fast-path
/// trampoline's inline case (`arch::x86_64::fast`), which repeats in
/// assembly the fast path of [`enter`] (home slot, not nested), of
/// [`Section::exit`] for it, and of [`Section::count_hit`] (with
/// `replace_hit_entry`).
#[derive(Debug)]
pub(crate) struct SlotLayout {
    /// Address of slot 0.
    pub table: usize,
    pub size: usize,
    pub owner: usize,
    pub seq: usize,
    /// The hit caches: the address of slot 0's, and the distance between
    /// two (slot `i` owns cache `i`), each `hit_ways` entries of `(tag,
    /// count)` words.
    pub hits_table: usize,
    pub hits_size: usize,
    pub hit_ways: usize,
    /// Slot `(tp * home_mul) >> home_shift` is the home of thread pointer `tp`.
    pub home_mul: u64,
    pub home_shift: u32,
}

pub(crate) fn slot_layout() -> SlotLayout {
    const _: () = assert!(std::mem::size_of::<HitEntry>() == 16);
    const _: () = assert!(std::mem::offset_of!(HitEntry, count) == 8);
    // Offsets measured on the real table: where `CachePadded` puts its value
    // is not a layout promise.
    let base = TABLE.slots.as_ptr() as usize;
    let first: &Slot = &TABLE.slots[0];
    let at = |p: *const u8| p as usize - base;
    SlotLayout {
        table: base,
        size: std::mem::size_of::<CachePadded<Slot>>(),
        owner: at(std::ptr::addr_of!(first.owner).cast()),
        seq: at(std::ptr::addr_of!(first.seq).cast()),
        hits_table: TABLE.hits.as_ptr() as usize,
        hits_size: std::mem::size_of::<HitWays>(),
        hit_ways: HIT_WAYS,
        home_mul: HOME_MUL,
        home_shift: HOME_SHIFT,
    }
}

/// Enters a read-side section on the calling thread.
///
/// # Signal safety
/// Loads and one store; on a thread's first section (and once its exit
/// hook ran) also CASes, raw
/// `gettid`/`getpid`/`tgkill` system calls and the exit hook's
/// `pthread_setspecific` (stores only, see [`crate::sys::thread_exit`]);
/// bounded by the table size; no allocation, lock or panic.
#[inline]
#[link_section = "probert_fast"] // see `crate::fast::code_range`
pub(crate) fn enter(cx: SignalContext) -> Section<'static> {
    TABLE.enter(cx)
}

/// Whether the calling thread is inside a section right now (so waiting for
/// a grace period would wait for itself).
pub(crate) fn in_section() -> bool {
    TABLE.in_section()
}

/// Hits of the consumer `tag` counted by threads and not yet flushed to its
/// record. Exact once the consumer's hits have stopped; while they run, a
/// concurrent eviction may be missed or counted twice for an instant.
pub(crate) fn pending_hits(tag: u64) -> u64 {
    TABLE.pending_hits(tag)
}

/// Removes the entries of the consumers `tags` from every thread's hit cache
/// (their counts are dropped: those consumers are detached, nobody reads
/// their statistics any more). Writer only, normal context.
///
/// An owner may be evicting such an entry at the same moment (it loaded the
/// tag before the purge and will flush its count): its section then began
/// before the purge, so a grace period after the purge covers that flush.
/// No section that begins after the purge sees the tags: the consumers were
/// unpublished a grace period before, so no new entry for them is made.
pub(crate) fn purge_hit_entries(tags: &crate::addr_hash::AddrSet<u64>) {
    TABLE.purge_hit_entries(tags);
}

/// Waits one grace period: every section that began before this call has
/// ended when it returns. Normal context only; must not be called from inside
/// a section (see [`in_section`]).
pub(crate) fn synchronize() {
    TABLE.synchronize(None);
}

/// [`synchronize`], giving up at `deadline`: `false` if a section that
/// began before the call was still running then (a handler that blocks).
/// For waits that must not hang on a handler, which may wait for the very
/// thread that calls this.
pub(crate) fn synchronize_until(deadline: std::time::Instant) -> bool {
    TABLE.synchronize(Some(deadline))
}

/// Sets up the thread-exit hook that gives persistent slots back (see
/// "Giving slots back"). Normal context, under the writer lock; without
/// it (or where the hook cannot be used) slots are kept for good, as
/// before.
pub(crate) fn init() {
    #[cfg(not(all(test, loom)))]
    crate::sys::thread_exit::init(thread_exiting);
}

/// The thread-exit hook: `value` is the index of the slot the thread
/// claimed, plus one.
#[cfg(not(all(test, loom)))]
unsafe extern "C" fn thread_exiting(value: *mut std::ffi::c_void) {
    if let Some(idx) = (value as usize).checked_sub(1) {
        TABLE.give_back(idx, thread_pointer(), own_tid());
    }
}

/// The calling thread's kernel id (loom: its loom number).
///
/// # Signal safety
/// One raw system call.
#[inline(always)]
fn own_tid() -> u64 {
    #[cfg(not(all(test, loom)))]
    return crate::sys::thread_exit::tid();
    #[cfg(all(test, loom))]
    return thread_pointer() as u64;
}

/// This process's id (loom: 0).
///
/// # Signal safety
/// One raw system call.
#[inline(always)]
fn own_pid() -> u64 {
    #[cfg(not(all(test, loom)))]
    return crate::sys::thread_exit::pid();
    #[cfg(all(test, loom))]
    return 0;
}

/// Whether thread `tid` of process `pid` has exited (loom: never).
///
/// # Signal safety
/// One raw system call.
#[inline(always)]
fn exited(pid: u64, tid: u64) -> bool {
    #[cfg(not(all(test, loom)))]
    return crate::sys::thread_exit::has_exited(pid, tid);
    #[cfg(all(test, loom))]
    return {
        let _ = (pid, tid);
        false
    };
}

/// In a forked child only the forking thread survives; every other slot is
/// freed (its owner may have been mid-section at `fork`, and would otherwise
/// hold grace periods forever). Runs in the `pthread_atfork` child handler.
/// Freed persistent slots become `DEAD`, not empty, so probe sequences
/// stay whole.
///
/// # Signal safety
/// Plain atomic stores.
pub(crate) fn reset_after_fork(flush: impl Fn(u64, u64)) {
    TABLE.reset_after_fork(flush);
}

/// The algorithm, on one table; see the free functions above for the
/// contracts. The fast-path methods are `inline(always)`, so the free
/// functions compile to what they would with the table a bare `static`.
impl Sections {
    /// See [`enter`].
    #[inline(always)]
    fn enter(&self, cx: SignalContext) -> Section<'_> {
        let tp = thread_pointer();
        let start = home(tp);
        // Ordering: Relaxed — only this thread ever stores `tp` here, so
        // seeing it means we (or a dead thread with our pointer) claimed it.
        if self.slots[start].owner.load(Ordering::Relaxed) == tp {
            return self.enter_slot(start, Kind::Persistent);
        }
        self.enter_probing(cx, tp, start)
    }

    /// [`Sections::enter`] when the thread's slot is not its home slot (or
    /// not claimed yet): probe the table from home for our slot; else claim
    /// one (see "Giving slots back"), in this order of preference: an
    /// exiting slot of our thread pointer whose owner is dead, a `DEAD`
    /// one, an exiting one whose owner has exited, the empty slot that ends
    /// the sequence; else borrow a transient slot.
    #[cold]
    #[inline(never)]
    #[link_section = "probert_fast"] // see `crate::fast::code_range`
    fn enter_probing(&self, cx: SignalContext, tp: usize, start: usize) -> Section<'_> {
        // A failed CAS means another thread claimed that slot: look again
        // (bounded: each failure is another thread's claim).
        for _ in 0..PERSISTENT {
            let (mut own_exiting, mut dead, mut others_exiting, mut empty) =
                (None, None, false, None);
            for i in 0..PERSISTENT {
                let idx = (start + i) & (PERSISTENT - 1);
                // Ordering: Relaxed — only this thread ever stores `tp` here,
                // so seeing it means we (or a dead thread with our pointer)
                // claimed it; a claim below re-reads with an Acquire CAS.
                match self.slots[idx].owner.load(Ordering::Relaxed) {
                    o if o == tp => return self.enter_slot(idx, Kind::Persistent),
                    0 => {
                        empty = Some(idx);
                        break;
                    }
                    DEAD => {
                        dead.get_or_insert(idx);
                    }
                    o if o == tp | EXITING_TAG => own_exiting = Some(idx),
                    o if o & EXITING_TAG != 0 => others_exiting = true,
                    _ => {}
                }
            }
            let claim = if let Some(idx) = own_exiting {
                // Ordering: Relaxed — written before the exiting owner value
                // our load saw (Release in `give_back`).
                let exit_tid = self.slots[idx].exit_tid.load(Ordering::Relaxed);
                if exit_tid == own_tid() {
                    // We gave it back at our exit and are still running.
                    return self.enter_transient(cx, tp);
                }
                Some((idx, tp | EXITING_TAG))
            } else if let Some(idx) = dead {
                Some((idx, DEAD))
            } else if let Some(found) = others_exiting.then(|| self.exited_slot(start)).flatten() {
                Some(found)
            } else {
                empty.map(|idx| (idx, 0))
            };
            let Some((idx, seen)) = claim else {
                return self.enter_transient(cx, tp);
            };
            // Ordering: Acquire on success — we take over the slot's `seq`
            // and hit-cache history; pairs with the Release in `give_back`
            // and `reset_after_fork`.
            if self.slots[idx]
                .owner
                .compare_exchange(seen, tp, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                let section = self.enter_slot(idx, Kind::Persistent);
                // Inside the section: a probe on the C library's code this
                // calls is a nested hit.
                crate::sys::thread_exit::arm(idx + 1);
                return section;
            }
        }
        self.enter_transient(cx, tp)
    }

    /// An exiting slot on the probe sequence from `start` whose owner has
    /// exited: `(index, its owner value)`.
    ///
    /// # Signal safety
    /// Loads and at most one raw system call per slot.
    #[cold]
    #[inline(never)]
    #[link_section = "probert_fast"] // see `crate::fast::code_range`
    fn exited_slot(&self, start: usize) -> Option<(usize, usize)> {
        let pid = own_pid();
        for i in 0..PERSISTENT {
            let idx = (start + i) & (PERSISTENT - 1);
            let slot = &self.slots[idx];
            // Ordering: Acquire — the exit id was stored before the exiting
            // owner value (Release in `give_back`).
            match slot.owner.load(Ordering::Acquire) {
                0 => return None,
                o if o & EXITING_TAG != 0 => {
                    // Ordering: Relaxed — see above.
                    let tid = slot.exit_tid.load(Ordering::Relaxed);
                    if exited(pid, tid) {
                        return Some((idx, o));
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// The calling thread exits (its exit hook runs, normal context): its
    /// persistent slot `idx` becomes exiting, claimable once it is dead.
    /// Nothing if the slot is not ours, or if we are inside a section (a
    /// handler that ended its thread: the grace periods that wait for it
    /// wait for ever, as before).
    #[cfg_attr(all(test, loom), allow(dead_code))] // no exit hook under loom
    fn give_back(&self, idx: usize, tp: usize, tid: u64) {
        let Some(slot) = self.slots.get(idx).filter(|_| idx < PERSISTENT) else {
            return;
        };
        // Ordering (both): Relaxed — our own slot, written only by us. A
        // signal handler running on this thread between the checks and the
        // store runs whole sections of its own, leaving `seq` even.
        if slot.owner.load(Ordering::Relaxed) != tp || slot.seq.load(Ordering::Relaxed) & 1 == 1 {
            return;
        }
        slot.exit_tid.store(tid, Ordering::Relaxed);
        // Ordering: Release — the exit id and our last `seq` store come
        // before the slot is claimable; pairs with the Acquire claim in
        // `enter_probing` and the load in `exited_slot`.
        slot.owner.store(tp | EXITING_TAG, Ordering::Release);
    }

    #[inline(always)]
    fn enter_slot(&self, idx: usize, kind: Kind) -> Section<'_> {
        let (slot, hits) = (&self.slots[idx], &self.hits[idx]);
        // Ordering: Relaxed — our own slot; we are its only writer.
        let seq = slot.seq.load(Ordering::Relaxed);
        if seq & 1 == 1 {
            return Section {
                slot,
                hits,
                kind: Kind::Nested,
                seq,
            };
        }
        slot_store(slot, seq + 1);
        // Ordering: the compiler fence keeps the protected reads after the store;
        // the CPU-level store→load order is supplied by the writer's membarrier —
        // pairs with `synchronize`.
        compiler_fence(Ordering::SeqCst);
        // Under loom: what membarrier does to this thread. Loom cannot model
        // a barrier one thread forces onto another, so the model gives the
        // reader the full fence membarrier executes on it (the writer's
        // `barrier()` becomes a local fence): it checks the algorithm given
        // that membarrier provides what it promises, not membarrier itself.
        #[cfg(all(test, loom))]
        if self.membarrier {
            // Ordering: SeqCst — the modelled membarrier, reader side —
            // pairs with the fence standing for `barrier()` in `synchronize`.
            fence(Ordering::SeqCst);
        }
        Section {
            slot,
            hits,
            kind,
            seq: seq + 1,
        }
    }

    /// The persistent table is full: borrow a transient slot for this section.
    ///
    /// # Signal safety
    /// Bounded scans and CAS; if every transient slot is busy it spins until one
    /// is released, which only another thread's running handler can delay.
    #[cold]
    #[link_section = "probert_fast"] // see `crate::fast::code_range`
    fn enter_transient(&self, _cx: SignalContext, tp: usize) -> Section<'_> {
        let tagged = tp | TRANSIENT_TAG;
        // A borrowed slot of ours inside a section means this is a recursive
        // entry. One of ours that is not (a signal arrived between the claim
        // and the entering store, or between the leaving store and the
        // release) is left to the interrupted entry or exit; this entry
        // borrows another.
        for (slot, hits) in self.slots.iter().zip(&self.hits).skip(PERSISTENT) {
            // Ordering: Relaxed — only this thread stores `tagged`, and only
            // this thread writes the slot's `seq` while it holds it.
            if slot.owner.load(Ordering::Relaxed) == tagged
                && slot.seq.load(Ordering::Relaxed) & 1 == 1
            {
                return Section {
                    slot,
                    hits,
                    kind: Kind::Nested,
                    seq: 0,
                };
            }
        }
        loop {
            for (idx, slot) in self.slots.iter().enumerate().skip(PERSISTENT) {
                // Ordering: Acquire — see the previous borrower's last `seq`
                // store; pairs with the Release in `Section::exit`.
                if slot
                    .owner
                    .compare_exchange(0, tagged, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return self.enter_slot(idx, Kind::Transient);
                }
            }
            crate::sync::spin_loop();
        }
    }

    fn in_section(&self) -> bool {
        let tp = thread_pointer();
        // Ordering (all): Relaxed — our own slots, written only by this thread.
        let inside = |s: &Slot| s.seq.load(Ordering::Relaxed) & 1 == 1;
        // Our persistent slot lies on our probe sequence before the first
        // empty slot (a forked child may have left a second one there too).
        let start = home(tp);
        for i in 0..PERSISTENT {
            let s = &self.slots[(start + i) & (PERSISTENT - 1)];
            match s.owner.load(Ordering::Relaxed) {
                0 => break,
                o if o == tp && inside(s) => return true,
                _ => {}
            }
        }
        self.slots
            .iter()
            .skip(PERSISTENT)
            .any(|s| s.owner.load(Ordering::Relaxed) == tp | TRANSIENT_TAG && inside(s))
    }

    /// The hit caches of the slots that ever ran a section: a slot's `seq`
    /// only grows (a fork's reset empties its cache too), so the caches of
    /// the others are empty — and were never touched, so they are not read
    /// either (reading would map their pages).
    fn used_hit_caches(&self) -> impl Iterator<Item = &HitWays> {
        self.slots
            .iter()
            .zip(&self.hits)
            // Ordering: Relaxed — a slot that starts its first section
            // after this load has counted no hit of a consumer the caller
            // is asking about that it could not also miss by a moment.
            .filter(|(s, _)| s.seq.load(Ordering::Relaxed) != 0)
            .map(|(_, h)| h)
    }

    fn purge_hit_entries(&self, tags: &crate::addr_hash::AddrSet<u64>) {
        let purge = |e: &HitEntry| {
            // Ordering: Relaxed — a statistic; the owner's own eviction and
            // this compare-exchange decide which of the two drops the entry.
            let tag = e.tag.load(Ordering::Relaxed);
            if tag != 0 && tags.contains(&tag) {
                let _ = e
                    .tag
                    .compare_exchange(tag, 0, Ordering::Relaxed, Ordering::Relaxed);
            }
        };
        for cache in self.used_hit_caches() {
            // Each tag can only be in its own way: look there, or at every
            // way if that is fewer.
            if tags.len() < HIT_WAYS {
                tags.iter().for_each(|&t| purge(cache.way(t)));
            } else {
                cache.0.iter().for_each(purge);
            }
        }
    }

    fn pending_hits(&self, tag: u64) -> u64 {
        self.used_hit_caches()
            .map(|c| c.way(tag))
            // Ordering: Relaxed — statistics.
            .filter(|e| e.tag.load(Ordering::Relaxed) == tag)
            .map(|e| e.count.load(Ordering::Relaxed))
            .sum()
    }

    fn synchronize(&self, deadline: Option<std::time::Instant>) -> bool {
        // Ordering: a full barrier on every thread — pairs with the compiler
        // fences in `enter_slot`/`Section::exit`. Everything the caller
        // unpublished before this point is invisible to sections that begin
        // after it, and sections already running have their odd `seq`
        // visible below.
        fence(Ordering::SeqCst);
        #[cfg(not(all(test, loom)))]
        membarrier::barrier();
        #[cfg(all(test, loom))]
        if self.membarrier {
            // Ordering: SeqCst — the modelled membarrier, writer side (see
            // `enter_slot`) — pairs with the reader's fence there.
            fence(Ordering::SeqCst);
        }
        let mut waiting = [(0u16, 0u64); SLOTS];
        let mut n = 0;
        for (idx, slot) in self.slots.iter().enumerate() {
            // Ordering: Acquire — pairs with the readers' stores in enter/exit.
            let seq = slot.seq.load(Ordering::Acquire);
            if seq & 1 == 1 {
                waiting[n] = (idx as u16, seq);
                n += 1;
            }
        }
        for &(idx, seq) in &waiting[..n] {
            if !wait_for(&self.slots[idx as usize], seq, deadline) {
                return false;
            }
        }
        // Ordering: the caller frees memory after this; the Acquire loads in
        // `wait_for` ordered the readers' accesses before it.
        fence(Ordering::SeqCst);
        true
    }

    fn reset_after_fork(&self, flush: impl Fn(u64, u64)) {
        let tp = thread_pointer();
        for (idx, (slot, hits)) in self.slots.iter().zip(&self.hits).enumerate() {
            // Ordering: Relaxed — single-threaded here (the child has one thread).
            let owner = slot.owner.load(Ordering::Relaxed);
            if owner != tp && owner != tp | TRANSIENT_TAG {
                // The hits those threads counted in the parent still count.
                // (A cache whose slot never ran a section is empty: not
                // read, so its pages stay unallocated.)
                let used = slot.seq.load(Ordering::Relaxed) != 0;
                for e in hits.0.iter().filter(|_| used) {
                    let (tag, n) = (
                        e.tag.load(Ordering::Relaxed),
                        e.count.load(Ordering::Relaxed),
                    );
                    if tag != 0 && n != 0 {
                        flush(tag, n);
                    }
                    if tag != 0 || n != 0 {
                        e.tag.store(0, Ordering::Relaxed);
                        e.count.store(0, Ordering::Relaxed);
                    }
                }
                slot.seq.store(0, Ordering::Relaxed);
                slot.exit_tid.store(0, Ordering::Relaxed);
                let free = if idx < PERSISTENT && owner != 0 {
                    DEAD
                } else {
                    0
                };
                // Ordering: Release — pairs with the Acquire claim in `enter`.
                slot.owner.store(free, Ordering::Release);
            }
        }
    }
}

/// Waits until the section `seq` of `slot` has ended; `false` if `deadline`
/// passed first.
fn wait_for(slot: &Slot, seq: u64, deadline: Option<std::time::Instant>) -> bool {
    let mut spins = 0u32;
    // Ordering: Acquire — pairs with the reader's store in `Section::exit`:
    // once we see the sequence move, the section's reads are done.
    while slot.seq.load(Ordering::Acquire) == seq {
        if spins >= 256 && deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return false;
        }
        spins = spins.saturating_add(1);
        if cfg!(all(test, loom)) || spins < 64 {
            crate::sync::spin_loop();
        } else if spins < 256 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    #[cfg(not(loom))]
    use std::sync::atomic::AtomicUsize;
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

    #[cfg(not(loom))]
    #[test]
    fn a_thread_keeps_the_counts_of_a_thousand_consumers_hit_in_turn() {
        // Every function entry of a library probed: one thread's hits go to
        // hundreds of consumers in turn (consecutive records). Each of them
        // keeps its own way — no eviction, whose locked add into a record
        // out of the cache would cost more than the rest of the hit.
        const N: u32 = 1000;
        let tags: Vec<u64> = (0..N)
            .map(|i| crate::probe::consumer_tag(i, 0xABCD))
            .collect();
        let flushes = std::cell::Cell::new(0u32);
        let round = || {
            for &t in &tags {
                let s = enter(cx());
                assert!(!s.is_nested());
                s.count_hit(cx(), t, |_, _| flushes.set(flushes.get() + 1));
                s.exit(cx());
            }
        };
        // The first round may evict what other tests left in this thread's
        // cache; after it, nothing is evicted.
        round();
        flushes.set(0);
        for _ in 0..3 {
            round();
        }
        assert_eq!(flushes.get(), 0, "hits of {N} consumers evicted each other");
        for &t in &tags {
            assert_eq!(pending_hits(t), 4);
        }
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

    #[cfg(not(loom))]
    /// What a thread of [`slots_of_exited_threads_are_given_back`] saw.
    struct Seen {
        kind: Kind,
        tp: usize,
        barrier: *const std::sync::Barrier,
    }

    #[cfg(not(loom))]
    extern "C" fn section_then_wait(arg: *mut std::ffi::c_void) -> *mut std::ffi::c_void {
        // SAFETY: the test passes a `Seen` it keeps until the join.
        let seen = unsafe { &mut *arg.cast::<Seen>() };
        let s = enter(cx());
        (seen.kind, seen.tp) = (s.kind, thread_pointer());
        s.exit(cx());
        // SAFETY: the barrier outlives every thread.
        unsafe { &*seen.barrier }.wait();
        std::ptr::null_mut()
    }

    #[cfg(not(loom))]
    /// The kind of section a thread gets in a destructor that runs after
    /// probert's exit hook (a later key).
    static LATE_KIND: AtomicUsize = AtomicUsize::new(0);
    #[cfg(not(loom))]
    extern "C" fn late_destructor(_: *mut std::ffi::c_void) {
        let s = enter(cx());
        LATE_KIND.store(s.kind as usize + 1, Ordering::SeqCst);
        s.exit(cx());
    }

    #[cfg(not(loom))]
    fn slots_of_exited_threads_are_given_back_body() {
        init();
        // More threads than persistent slots alive at once, on stacks the
        // test owns (so their thread pointers come back to no later
        // thread): the table fills.
        const N: usize = PERSISTENT + 40;
        const STACK: usize = 256 << 10;
        let barrier = std::sync::Barrier::new(N);
        let mut stacks = vec![0u8; N * STACK];
        let mut seen: Vec<Seen> = (0..N)
            .map(|_| Seen {
                kind: Kind::Nested,
                tp: 0,
                barrier: &barrier,
            })
            .collect();
        let threads: Vec<libc::pthread_t> = (0..N)
            .map(|i| {
                // SAFETY: an attribute object with a stack the test keeps
                // mapped until every thread is joined; `seen[i]` likewise.
                unsafe {
                    let mut attr: libc::pthread_attr_t = std::mem::zeroed();
                    assert_eq!(libc::pthread_attr_init(&mut attr), 0);
                    let stack = stacks.as_mut_ptr().add(i * STACK).cast();
                    assert_eq!(libc::pthread_attr_setstack(&mut attr, stack, STACK), 0);
                    let mut t: libc::pthread_t = 0;
                    let arg = (&mut seen[i] as *mut Seen).cast();
                    assert_eq!(
                        libc::pthread_create(&mut t, &attr, section_then_wait, arg),
                        0
                    );
                    libc::pthread_attr_destroy(&mut attr);
                    t
                }
            })
            .collect();
        for t in threads {
            // SAFETY: a thread created above, joined once.
            assert_eq!(unsafe { libc::pthread_join(t, std::ptr::null_mut()) }, 0);
        }
        let persistent = seen.iter().filter(|s| s.kind == Kind::Persistent).count();
        assert_eq!(persistent, PERSISTENT, "the table was full");
        // They have all exited: a thread with a thread pointer none of them
        // had gets a slot of its own.
        let (kind, tp) = std::thread::spawn(|| {
            let s = enter(cx());
            let k = s.kind;
            s.exit(cx());
            (k, thread_pointer())
        })
        .join()
        .unwrap();
        assert!(seen.iter().all(|s| s.tp != tp));
        assert_eq!(kind, Kind::Persistent, "a new thread got no private slot");
        // A thread that hits after its exit hook ran (a later destructor)
        // borrows a transient slot rather than claiming one it would keep.
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: a key with a C destructor, set by the thread below.
        let rc = unsafe { libc::pthread_key_create(&mut key, Some(late_destructor)) };
        assert_eq!(rc, 0);
        std::thread::spawn(move || {
            enter(cx()).exit(cx());
            // SAFETY: the key was created above.
            unsafe { libc::pthread_setspecific(key, 1 as *const std::ffi::c_void) };
        })
        .join()
        .unwrap();
        assert_eq!(
            LATE_KIND.load(Ordering::SeqCst),
            Kind::Transient as usize + 1,
            "a section after the exit hook"
        );
        drop(stacks);
    }

    #[cfg(not(loom))]
    #[test]
    fn slots_of_exited_threads_are_given_back() {
        crate::sys::threads::in_own_process(
            "grace::tests::slots_of_exited_threads_are_given_back",
            slots_of_exited_threads_are_given_back_body,
        );
    }

    #[test]
    fn many_threads_get_distinct_slots() {
        // More threads than transient slots, all inside a section at once.
        let n = 100;
        let barrier = Arc::new(std::sync::Barrier::new(n));
        let slots: Vec<usize> = (0..n)
            .map(|_| {
                let b = barrier.clone();
                std::thread::spawn(move || {
                    let s = enter(cx());
                    let idx = s.slot as *const Slot as usize;
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

/// Loom models of the real section table: `enter`, `exit` and `synchronize`
/// on a per-model [`Sections`], with `membarrier` modelled as described in
/// `Sections::enter_slot`. Run with
/// `RUSTFLAGS="--cfg loom" cargo test -p probert --release --lib loom`.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;
    use loom::thread;

    /// What the writer's "free" leaves in an object.
    const DEAD: u64 = 0;

    fn cx() -> SignalContext {
        // SAFETY: the models call only signal-safe functions with it.
        unsafe { SignalContext::new() }
    }

    /// A reader runs `sections` sections, each loading the published object
    /// and reading it; the writer publishes the other object, waits a grace
    /// period and frees (overwrites) the old one. Loom reports the free
    /// racing with a read as a causality violation, and the reader asserts
    /// it never sees a dead object.
    fn unpublish_and_free(membarrier: bool, sections: usize) {
        crate::sync::model(move || {
            let table = Arc::new(Sections::new(membarrier));
            let objects = Arc::new([UnsafeCell::new(1u64), UnsafeCell::new(2u64)]);
            let published = Arc::new(AtomicUsize::new(0));
            let reader = {
                let (table, objects, published) =
                    (table.clone(), objects.clone(), published.clone());
                thread::spawn(move || {
                    for _ in 0..sections {
                        let section = table.enter(cx());
                        assert!(!section.is_nested());
                        // Ordering: Acquire — the object was initialised
                        // before it was published.
                        let i = published.load(Ordering::Acquire);
                        // SAFETY: a shared read inside a section; loom checks
                        // it against the free.
                        let v = objects[i].with(|p| unsafe { *p });
                        assert_ne!(v, DEAD, "read a freed object");
                        section.exit(cx());
                    }
                })
            };
            // Ordering: Release — as the runtime publishes a new list.
            published.store(1, Ordering::Release);
            table.synchronize(None);
            // SAFETY: the free; loom reports a race with any unordered read.
            objects[0].with_mut(|p| unsafe { *p = DEAD });
            reader.join().unwrap();
        });
    }

    #[test]
    fn loom_grace_period_orders_every_read_before_the_free() {
        unpublish_and_free(true, 1);
    }

    /// The second section reuses the slot the first one claimed.
    #[test]
    fn loom_grace_period_with_back_to_back_sections() {
        unpublish_and_free(true, 2);
    }

    /// Without the (modelled) membarrier the reader's slot store and its
    /// load of the pointer can pass the writer's pointer store and slot scan
    /// (store buffering): the model must fail, which shows it can.
    #[test]
    #[should_panic(expected = "Causality violation")]
    fn loom_grace_period_without_the_barrier_is_caught() {
        unpublish_and_free(false, 1);
    }

    /// A nested entry (a handler interrupting a section on the same thread)
    /// leaves the outer section running: the writer still waits for it.
    #[test]
    fn loom_nested_section_keeps_the_outer_one() {
        crate::sync::model(|| {
            let table = Arc::new(Sections::new(true));
            let object = Arc::new(UnsafeCell::new(1u64));
            let published = Arc::new(AtomicUsize::new(1));
            let reader = {
                let (table, object, published) = (table.clone(), object.clone(), published.clone());
                thread::spawn(move || {
                    let outer = table.enter(cx());
                    let inner = table.enter(cx());
                    assert!(inner.is_nested());
                    inner.exit(cx());
                    // Ordering: Acquire, as above.
                    if published.load(Ordering::Acquire) == 1 {
                        // SAFETY: loom checks it against the free.
                        let v = object.with(|p| unsafe { *p });
                        assert_ne!(v, DEAD, "read a freed object");
                    }
                    outer.exit(cx());
                })
            };
            // Ordering: Release, as above.
            published.store(0, Ordering::Release);
            table.synchronize(None);
            // SAFETY: the free, as above.
            object.with_mut(|p| unsafe { *p = DEAD });
            reader.join().unwrap();
        });
    }
}
