//! Probes, consumers, and the dispatcher every path runs.
//!
//! A *probe* is one patched address. Its [`ProbeRecord`] (in a never-unmapped
//! arena) holds what the trap path needs: the displaced instruction, its
//! out-of-line stub, and the consumer list. The list is immutable and
//! published by one atomic pointer: attaching or detaching builds a new list
//! and swaps it in; the old list is freed after a grace period.
//!
//! A *consumer* is a handler plus user data. Its [`ConsumerRecord`] holds the
//! state the dispatcher checks (a handler that returned `Remove` flips it) and
//! the statistics.
//!
//! # Safety
//!
//! The dispatcher dereferences a consumer-list pointer loaded inside a
//! read-side section; lists are freed only after being unpublished and a
//! grace period passing. Handlers are called through the function pointer the
//! user supplied at attach, with the contract documented on [`Handler`].
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::arch::{Clobbers, Displaced, Regs};
use crate::arena::{Arena, Zeroable};
use crate::grace::Section;
use crate::hit::{Action, Handler, Hit};
use crate::shadow;
use crate::sigctx::SignalContext;

/// Most probes alive at once.
pub(crate) const MAX_PROBES: usize = 1 << 20;
/// Most consumers alive at once.
pub(crate) const MAX_CONSUMERS: usize = 1 << 20;

/// What the trap path reads about a probe, speculatively.
#[repr(C, align(64))]
#[derive(Debug)]
pub(crate) struct ProbeRecord {
    /// The patch address: where the trap instruction (or the fast site's
    /// jump) is, the probe's key in the index; 0 while the record is free.
    /// A fast stub names its record and this address: a stub that outlived
    /// its probe (and a record reused elsewhere) is recognised by it.
    pub addr: AtomicUsize,
    /// The probed address: what handlers see as RIP. The patch address,
    /// except at an `endbr64` entry whose jump goes after it.
    pub report: AtomicUsize,
    /// `Displaced::encode` of the displaced instruction.
    pub displaced: [AtomicU64; 3],
    /// Where the trap path resumes for an instruction it does not emulate:
    /// an out-of-line stub, or the displaced instructions of the site stub.
    pub stub: AtomicUsize,
    /// The current consumer list (null while the probe has none).
    pub consumers: AtomicPtr<ConsumerList>,
    /// The union of the [`Clobbers`] classes of the consumers: what the fast
    /// path saves around their handlers. Widened before a list that needs
    /// more is published, narrowed after one that needs less (see
    /// `writer::publish_list`); a dispatcher skips a consumer whose classes
    /// were not saved (one attached during this very hit).
    pub clobbers: AtomicU32,
    /// Length of the displaced instruction.
    pub len: AtomicU32,
}

// One cache line: a hit loads it once, and 250k probes take 16 MB.
const _: () = assert!(std::mem::size_of::<ProbeRecord>() == 64);

// SAFETY: atomics only.
unsafe impl Zeroable for ProbeRecord {}

/// A consumer's state and statistics.
#[repr(C, align(64))]
#[derive(Debug)]
pub(crate) struct ConsumerRecord {
    /// One of the `STATE_*` values.
    pub state: AtomicU32,
    /// Handler calls flushed from the threads' hit caches. No flush for a
    /// previous consumer of the record can arrive: the writer purges a
    /// detached consumer's entries from every cache and waits a grace
    /// period before it gives the record to another (see `writer`).
    pub hits: AtomicU64,
    /// Hits skipped because the thread was already in a handler.
    pub missed: AtomicU64,
    /// The generation of the consumer the record belongs to (its handle's):
    /// a return probe's pending invocation names it, and is not delivered
    /// to a later consumer of the record.
    pub gen: AtomicU32,
    /// Return handler calls.
    pub returns: AtomicU64,
    /// Invocations that left without returning (see `crate::shadow`).
    pub abandoned: AtomicU64,
}

// SAFETY: atomics only.
unsafe impl Zeroable for ConsumerRecord {}

/// The record is free.
pub(crate) const STATE_FREE: u32 = 0;
/// Attached: the dispatcher calls it.
pub(crate) const STATE_ACTIVE: u32 = 1;
/// Its handler returned `Remove`; awaiting reclamation by the writer.
pub(crate) const STATE_REMOVED: u32 = 2;
/// Detached by the writer; awaiting a grace period.
pub(crate) const STATE_DETACHED: u32 = 3;

pub(crate) static PROBES: Arena<ProbeRecord> = Arena::new(MAX_PROBES);
pub(crate) static CONSUMERS: Arena<ConsumerRecord> = Arena::new(MAX_CONSUMERS);

/// Set by a handler's `Remove`: the writer should reap removed consumers.
pub(crate) static REAP_PENDING: AtomicU32 = AtomicU32::new(0);

/// One consumer as the dispatcher calls it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    pub handler: Handler,
    pub user_data: usize,
    /// The consumer's record (arena records are never unmapped).
    pub record: &'static ConsumerRecord,
    /// [`consumer_tag`] of the consumer.
    pub tag: u64,
    /// What its handler may change beyond the GPRs and flags.
    pub clobbers: Clobbers,
    /// What kind of consumer it is.
    pub kind: EntryKind,
    /// A consumer with a return handler: that handler.
    pub on_return: Option<Handler>,
}

/// What a consumer of the dispatcher's list does on a hit.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum EntryKind {
    /// Calls its handler.
    #[default]
    Plain,
    /// A consumer with a return handler, at its function's entry: calls its
    /// entry handler and records the pending invocation (`crate::shadow`).
    Returns,
    /// The same, for a function that may jump to its own entry (a tail
    /// call to itself, directly or through other functions' tail jumps):
    /// its invocations pending at the same return address are a chain,
    /// which the last one's return ends (`crate::shadow`).
    Chain,
    /// probert's own consumer at a `ret` that ends functions with return
    /// probes: ends the pending invocations it returns from, calling their
    /// return handlers. `user_data` is the `ret`'s immediate (bytes popped
    /// after the return address).
    Exit,
}

impl EntryKind {
    /// Whether it is a consumer with a return handler.
    pub(crate) fn returns(self) -> bool {
        matches!(self, EntryKind::Returns | EntryKind::Chain)
    }
}

/// The tag a thread's hit cache files a consumer under: never 0.
pub(crate) fn consumer_tag(idx: u32, gen: u32) -> u64 {
    (u64::from(gen) << 32) | (u64::from(idx) + 1)
}

/// Adds `n` hits counted by a thread to the consumer `tag`'s record (its
/// index is in the tag; the record is still that consumer's, see
/// [`ConsumerRecord::hits`]).
///
/// # Signal safety
/// One atomic add.
pub(crate) fn flush_hits(tag: u64, n: u64) {
    let idx = (tag & 0xFFFF_FFFF).wrapping_sub(1) as usize;
    if let Some(rec) = CONSUMERS.get(idx) {
        // Ordering: Relaxed — a statistic.
        rec.hits.fetch_add(n, Ordering::Relaxed);
    }
}

/// An immutable, non-empty list of consumers, published by one atomic
/// pointer (null for none).
///
/// The first entry is inline: a probe's only consumer is one dependent load
/// from the probe record, its handler and state one more. On a hit, the
/// chain of dependent loads is the latency to beat.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct ConsumerList {
    /// The number of entries (at least 1).
    pub len: usize,
    /// Non-zero when the fast path's trampoline may dispatch this list by
    /// itself (`arch`'s inline case): exactly one consumer, of the kind it
    /// knows (an entry handler). Any other list sends the hit to the Rust
    /// dispatcher, so a new kind of consumer needs no assembly change.
    pub inline: usize,
    pub first: Entry,
    /// The others, in order.
    pub rest: Box<[Entry]>,
}

impl ConsumerList {
    /// A heap list of `entries` as a raw pointer to publish: null if there
    /// are none.
    /// Whether the trampoline's inline case may dispatch a list of
    /// `entries` (see [`ConsumerList::inline`]).
    pub(crate) fn inline_dispatchable(entries: &[Entry]) -> bool {
        matches!(entries, [e] if e.kind == EntryKind::Plain)
    }

    pub(crate) fn publishable(entries: Vec<Entry>) -> *mut ConsumerList {
        let inline = ConsumerList::inline_dispatchable(&entries);
        let mut it = entries.into_iter();
        let Some(first) = it.next() else {
            return std::ptr::null_mut();
        };
        let rest: Box<[Entry]> = it.collect();
        Box::into_raw(Box::new(ConsumerList {
            len: 1 + rest.len(),
            inline: usize::from(inline),
            first,
            rest,
        }))
    }
}

/// A snapshot of a probe, taken in one validated speculative window.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ProbeView {
    /// The probed address (handlers' RIP).
    pub report: usize,
    pub len: u8,
    pub displaced: Displaced,
    pub stub: usize,
    pub consumers: *const ConsumerList,
}

impl ProbeRecord {
    /// Reads the record for `addr`; `None` if it is not (or no longer) the
    /// record of `addr` or its fields are torn. The caller validates the
    /// window.
    ///
    /// # Signal safety
    /// Atomic loads and a pure decode.
    #[inline]
    pub(crate) fn view_speculative(&self, _cx: SignalContext, addr: usize) -> Option<ProbeView> {
        // Ordering (all): Relaxed — validated by the latch re-check in
        // `Index::read_speculative`; the writer initialises a record before
        // indexing it (Release by the latch bump).
        if self.addr.load(Ordering::Relaxed) != addr {
            return None;
        }
        let words = [
            self.displaced[0].load(Ordering::Relaxed),
            self.displaced[1].load(Ordering::Relaxed),
            self.displaced[2].load(Ordering::Relaxed),
        ];
        let len = self.len.load(Ordering::Relaxed) as usize;
        if len == 0 || len > crate::arch::MAX_INSN_LEN {
            return None;
        }
        Some(ProbeView {
            report: self.report.load(Ordering::Relaxed),
            len: len as u8,
            displaced: Displaced::decode(words)?,
            stub: self.stub.load(Ordering::Relaxed),
            // Ordering: Acquire — the list was built before it was published
            // (Release in the writer's swap).
            consumers: self.consumers.load(Ordering::Acquire),
        })
    }
}

/// Calls every consumer of a probe hit at `addr` whose clobber classes are
/// among the `saved` ones (the trap path saves everything: the kernel does).
/// The one dispatcher of every path (trap and fast). Must run inside a
/// read-side section; if that section is a recursive one no handler runs and
/// each consumer counts a missed hit.
///
/// # Signal safety
/// Atomic loads and counters, and the user's handlers, which the attach
/// contract requires to be async-signal-safe. No allocation, lock or panic.
#[inline(always)] // one copy in each path's dispatcher: no call on the hit path
pub(crate) fn dispatch(
    cx: SignalContext,
    section: &Section<'_>,
    list: *const ConsumerList,
    addr: usize,
    regs: &mut Regs,
    saved: Clobbers,
) {
    if list.is_null() {
        return;
    }
    // SAFETY: loaded inside the caller's read-side section; lists are freed
    // only after being unpublished and a grace period passing.
    let list = unsafe { &*list };
    if section.is_nested() {
        count_missed(list);
        return;
    }
    let mut hit = Hit {
        addr,
        regs,
        user_data: std::ptr::null_mut(),
        session: std::ptr::null_mut(),
        is_return: 0,
    };
    // Whether a return probe's entry already looked at this thread's shadow
    // stack during this hit (`call_entry`).
    let mut scanned = false;
    call(cx, section, &list.first, &mut hit, saved, &mut scanned);
    for e in list.rest.iter() {
        call(cx, section, e, &mut hit, saved, &mut scanned);
    }
}

/// Calls one consumer, counts the hit, and honours `Remove`. A consumer
/// whose classes were not saved is one attached after this hit began (see
/// [`ProbeRecord::clobbers`]): it is not called, as any consumer attached
/// during a hit may not be.
#[inline(always)]
fn call(
    cx: SignalContext,
    section: &Section<'_>,
    e: &Entry,
    hit: &mut Hit,
    saved: Clobbers,
    scanned: &mut bool,
) {
    if !e.clobbers.within(saved) {
        return;
    }
    // Ordering: Relaxed — a detached consumer is guaranteed no calls only
    // after the grace period that follows its unpublishing; this check just
    // stops calls early once a handler asked to be removed.
    if e.record.state.load(Ordering::Relaxed) != STATE_ACTIVE {
        return;
    }
    match e.kind {
        EntryKind::Plain => {
            hit.user_data = e.user_data as *mut _;
            // SAFETY: the handler and user data were supplied together at
            // attach, under the documented contract of `Handler`.
            let raw = unsafe { (e.handler)(hit) };
            section.count_hit(cx, e.tag, flush_hits);
            if Action::from_raw(raw) == Action::Remove {
                request_removal(e.record);
            }
        }
        EntryKind::Returns | EntryKind::Chain => call_entry(cx, section, e, hit, scanned),
        EntryKind::Exit => returns(cx, e, hit),
    }
}

/// The entry hit of a consumer with a return handler: its entry handler,
/// with the session word of the invocation it records. `scanned`: whether
/// an earlier consumer of this hit recorded its invocation (the frames it
/// showed over are dropped already; the ones above are this hit's).
///
/// # Signal safety
/// As [`dispatch`]; see `crate::shadow`.
#[cold]
#[inline(never)]
#[link_section = "probert_fast"] // see `crate::fast::code_range`
fn call_entry(
    cx: SignalContext,
    section: &Section<'_>,
    e: &Entry,
    hit: &mut Hit,
    scanned: &mut bool,
) {
    let regs = hit.regs();
    let sp = regs.sp();
    // SAFETY: at a function's entry the stack pointer points at the return
    // address its call pushed: the thread's own stack, mapped.
    let ret = unsafe { std::ptr::read_volatile(sp as *const usize) };
    let idx = CONSUMERS.index_of(e.record);
    let frame = shadow::Frame {
        sp,
        ret,
        func: hit.addr,
        on_return: e.on_return.map_or(0, |h| h as usize),
        user_data: e.user_data,
        session: 0,
        record: idx,
        // Ordering: Relaxed — set before the consumer was published.
        gen: e.record.gen.load(Ordering::Relaxed),
    };
    let mut spare = 0u64;
    let mut stack = shadow::mine(cx, true);
    let chains = e.kind == EntryKind::Chain;
    let first = !std::mem::replace(scanned, true);
    let session = match stack.as_mut().and_then(|s| s.push(frame, first, chains)) {
        Some(w) => w as *mut u64,
        None => {
            if stack.is_none() {
                // Ordering: Relaxed — a statistic.
                e.record.abandoned.fetch_add(1, Ordering::Relaxed);
            }
            &mut spare
        }
    };
    let recorded = !std::ptr::eq(session, &spare);
    hit.user_data = e.user_data as *mut _;
    hit.session = session;
    // SAFETY: as for a plain consumer.
    let raw = unsafe { (e.handler)(hit) };
    hit.session = std::ptr::null_mut();
    section.count_hit(cx, e.tag, flush_hits);
    let action = Action::from_raw(raw);
    if action != Action::Continue && recorded {
        if let Some(s) = stack.as_mut() {
            s.pop_last();
        }
    }
    if action == Action::Remove {
        request_removal(e.record);
    }
}

/// The hit of a `ret` that ends invocations with return probes: their
/// return handlers, innermost first, with the registers as just after the
/// return (writes take effect: moving RIP or RSP makes the thread resume
/// there instead of executing the `ret`).
///
/// # Signal safety
/// As [`dispatch`]; see `crate::shadow`.
#[cold]
#[inline(never)]
#[link_section = "probert_fast"] // see `crate::fast::code_range`
fn returns(cx: SignalContext, e: &Entry, hit: &mut Hit) {
    let (rip0, sp0) = (hit.regs().pc(), hit.regs().sp());
    if rip0 != hit.addr {
        // A consumer before this one redirected the thread: no return.
        return;
    }
    let Some(mut stack) = shadow::mine(cx, false) else {
        return;
    };
    // SAFETY: a `ret` is about to pop this word: the thread's own stack.
    let ret = unsafe { std::ptr::read_volatile(sp0 as *const usize) };
    // The invocations this `ret` ends, innermost first, popped one at a
    // time (a chain of tail calls may be of any length).
    let Some(mut f) = stack.pop_returning(sp0, ret) else {
        return;
    };
    let after = (ret, sp0 + 8 + e.user_data);
    {
        let r = hit.regs_mut();
        r.set_pc(after.0);
        r.set(crate::arch::Reg::Rsp, after.1 as u64);
    }
    let addr = hit.addr;
    loop {
        if let Some(rec) = CONSUMERS.get(f.record as usize) {
            return_hit(rec, &mut f, hit);
        }
        if (hit.regs().pc(), hit.regs().sp()) != after {
            // Redirected: the thread no longer returns here (the frames
            // left there end with whatever `ret` comes to them).
            break;
        }
        match stack.pop_returning(sp0, ret) {
            Some(next) => f = next,
            None => break,
        }
    }
    hit.addr = addr;
    hit.session = std::ptr::null_mut();
    hit.is_return = 0;
    if (hit.regs().pc(), hit.regs().sp()) == after {
        // Not redirected: the `ret` runs as displaced, with whatever else the
        // handlers changed.
        let r = hit.regs_mut();
        r.set_pc(rip0);
        r.set(crate::arch::Reg::Rsp, sp0 as u64);
    }
}

/// The return hit of the invocation `f` recorded, if its consumer `rec` is
/// still the one that saw its entry and is active.
///
/// # Signal safety
/// As [`dispatch`].
#[inline(always)]
fn return_hit(rec: &ConsumerRecord, f: &mut shadow::Frame, hit: &mut Hit) {
    // Ordering: Relaxed — a consumer detached (or reused) since the entry
    // is not called: the grace period after its detach covers the calls
    // that passed this check.
    if rec.state.load(Ordering::Relaxed) != STATE_ACTIVE
        || rec.gen.load(Ordering::Relaxed) != f.gen
        || f.on_return == 0
    {
        return;
    }
    // SAFETY: `on_return` is the consumer's return handler, stored from a
    // `Handler` at its entry hit.
    let handler: crate::hit::Handler = unsafe { std::mem::transmute(f.on_return) };
    hit.addr = f.func;
    hit.user_data = f.user_data as *mut _;
    hit.session = &mut f.session;
    hit.is_return = 1;
    // SAFETY: as for a plain consumer.
    let raw = unsafe { handler(hit) };
    // Ordering: Relaxed — a statistic.
    rec.returns.fetch_add(1, Ordering::Relaxed);
    if Action::from_raw(raw) == Action::Remove {
        request_removal(rec);
    }
}

/// A recursive hit: every consumer counts a missed one.
///
/// # Signal safety
/// Atomic counters.
#[cold]
#[inline(never)]
#[link_section = "probert_fast"] // see `crate::fast::code_range`
fn count_missed(list: &ConsumerList) {
    for e in std::iter::once(&list.first).chain(list.rest.iter()) {
        // Ordering: Relaxed — a statistic.
        e.record.missed.fetch_add(1, Ordering::Relaxed);
    }
}

/// A handler returned `Remove`: mark its consumer for the writer to reap.
///
/// # Signal safety
/// One CAS and one store.
#[cold]
#[inline(never)]
#[link_section = "probert_fast"] // see `crate::fast::code_range`
pub(crate) fn request_removal(rec: &ConsumerRecord) {
    // Ordering: Relaxed on the state (the writer re-reads it under its lock);
    // Release on the flag so the writer that sees it (Acquire in `reap`)
    // sees the state change.
    if rec
        .state
        .compare_exchange(
            STATE_ACTIVE,
            STATE_REMOVED,
            Ordering::Relaxed,
            Ordering::Relaxed,
        )
        .is_ok()
    {
        REAP_PENDING.store(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" fn nothing(_: *mut Hit) -> u32 {
        0
    }

    #[test]
    fn only_one_plain_consumer_is_dispatched_inline() {
        CONSUMERS.init().unwrap();
        let entry = |i: u32| Entry {
            handler: nothing,
            user_data: i as usize,
            record: CONSUMERS.get(i as usize).unwrap(),
            tag: consumer_tag(i, 1),
            clobbers: Clobbers::NONE,
            kind: EntryKind::Plain,
            on_return: None,
        };
        assert!(ConsumerList::publishable(Vec::new()).is_null());
        let one = ConsumerList::publishable(vec![entry(0)]);
        let two = ConsumerList::publishable(vec![entry(0), entry(1)]);
        // SAFETY: both were just made by `publishable` and are freed here.
        let (one, two) = unsafe { (Box::from_raw(one), Box::from_raw(two)) };
        assert_eq!((one.len, one.inline), (1, 1));
        assert_eq!((two.len, two.inline), (2, 0));
    }
}
