//! Out-of-line stubs: the pool, emission, and their lifetime.
//!
//! An instruction that is not emulated runs from a *stub*: a copy relocated to
//! the stub's address followed by a jump back (see
//! [`crate::arch::emit_out_of_line`]). Stubs live in slots of
//! [`STUB_SLOT`] bytes in chunks mapped within ±2 GiB of the code they serve
//! (rel32 reach), with `MAP_FIXED_NOREPLACE`, readable and executable and never
//! writable: they are written through `/proc/self/mem`
//! ([`crate::sys::code::write_code`]).
//!
//! # Lifetime
//!
//! A thread can be inside a stub, or inside the trap handler that is about to
//! send it there, for as long as the scheduler likes. A freed stub therefore
//! goes through two stages before reuse:
//!
//! 1. *awaiting a grace period* until a read-side grace period has passed (no handler is
//!    still deciding to jump into it — the trap handler leaves its section
//!    only after writing the resume address);
//! 2. *awaiting a scan* until a thread scan ([`crate::sys::threads::quiescent`])
//!    has seen every thread outside it.
//!
//! Either way, a thread leaves its read-side section before it is back in
//! the stub: through the trap handler's epilogue and the signal return
//! trampoline, or the fast dispatcher's epilogue and the chunk's trampoline.
//! That code lives in the `probert_fast` linker section and the trampolines,
//! which every scan treats as busy.
//!
//! A fast-path stub is entered by a jump and reaches its read-side section
//! only inside the chunk's trampoline (its inline case) or the dispatcher it
//! calls, so a thread can be on its way in (in the stub, the trampoline or
//! the dispatcher's prologue) with no section to wait for. Such a stub needs a scan *before* its grace period
//! too — one that treats the trampolines and the dispatcher's code
//! ([`crate::fast::code_range`]) as busy — then the grace period, then the
//! scan after it: in, through, out.
//!
//! Scans cost microseconds to milliseconds, so they are batched: the pool
//! scans only when it would otherwise have to map a new chunk, and only if
//! retired stubs could come back from it. Every detach waits a grace period,
//! so a workload that attaches and detaches forever settles on a few chunks
//! without calling `recycle_stubs`. A recycled slot
//! is poisoned with `ud2` first, so a violation of the above crashes loudly
//! instead of running stale code.
//!
//! # Faults in stubs
//!
//! Every slot ends with a fault map (see [`arch::fault_origin`]), and the
//! pool keeps, in memory a fault handler may read, where each chunk's slots
//! start: [`fault_origin`] turns a faulting program counter in a stub into
//! the displaced instruction it stands for (see `crate::trap`).
//!
//! # Safety
//!
//! [`fault_origin`] dereferences the slot-start arrays [`trace_chunk`]
//! leaked, and reads stub slots, which are never unmapped.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicPtr, AtomicU8, AtomicUsize, Ordering};

use crate::arch::{self, CpuState, POISON, STUB_SLOT, TRAMPOLINE_SIZE};
use crate::error::{Error, Result};
use crate::fast;
use crate::sigctx::SignalContext;
use crate::sys::{code, maps, threads};

/// Bytes mapped per chunk: a fast-path trampoline, then stub slots.
const CHUNK: usize = 64 * 1024;
/// Farthest a stub may be from the code it serves (rel32 reach, with margin
/// for the chunk and the instruction).
const REACH: usize = (2 << 30) - (1 << 20);
/// Retiring stubs at which an allocation scans rather than maps.
const SCAN_BATCH: usize = 64;
/// Scans tried in a row before giving up for now. A scan already asks a
/// thread seen inside again until it leaves; a retry covers a thread that
/// outlasted the scan's timeout.
const SCAN_TRIES: usize = 3;
/// The slot sizes: [`STUB_SLOT`] (nearly every stub), and twice that for a
/// site stub whose displaced instructions grow when relocated.
const SIZES: [usize; 2] = [STUB_SLOT, 2 * STUB_SLOT];

/// A stub: its slot and the slot's size (one of [`SIZES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stub {
    pub addr: usize,
    class: u8,
}

impl Stub {
    pub(crate) fn len(self) -> usize {
        SIZES[usize::from(self.class)]
    }
}

#[derive(Debug)]
struct Chunk {
    base: usize,
    used: usize,
    /// The chunk's slot starts, for fault handlers ([`fault_origin`]);
    /// `None` past [`MAX_TRACED_CHUNKS`].
    starts: Option<&'static SlotStarts>,
}

/// Granules of [`STUB_SLOT`] bytes after a chunk's trampoline: every slot
/// starts on one.
const GRANULES: usize = (CHUNK - TRAMPOLINE_SIZE) / STUB_SLOT;
/// Per granule: 0, or `1 + class` where a slot of that size class starts.
/// Set when the slot is first carved out; a slot keeps its place and class
/// for good (free lists are per class), so an entry never changes again.
type SlotStarts = [AtomicU8; GRANULES];
/// Most chunks whose stubs' faults can be traced back to the displaced
/// instruction (256 MiB of stubs); faults in stubs past them reach the
/// host with the stub's address.
const MAX_TRACED_CHUNKS: usize = 4096;
/// The traced chunks' bases and slot starts, the first [`TRACED`] entries
/// filled. Writer only; fault handlers read them.
static TRACED_BASES: [AtomicUsize; MAX_TRACED_CHUNKS] =
    [const { AtomicUsize::new(0) }; MAX_TRACED_CHUNKS];
static TRACED_STARTS: [AtomicPtr<SlotStarts>; MAX_TRACED_CHUNKS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_TRACED_CHUNKS];
static TRACED: AtomicUsize = AtomicUsize::new(0);

/// Registers the chunk at `base` for [`fault_origin`]. Writer only.
fn trace_chunk(base: usize) -> Option<&'static SlotStarts> {
    // Ordering: Relaxed — only the writer stores it.
    let n = TRACED.load(Ordering::Relaxed);
    if n == MAX_TRACED_CHUNKS {
        return None;
    }
    let starts: &'static SlotStarts = Box::leak(Box::new([const { AtomicU8::new(0) }; GRANULES]));
    // Ordering: Relaxed, both — published by the Release store of the count
    // below.
    TRACED_STARTS[n].store(std::ptr::from_ref(starts).cast_mut(), Ordering::Relaxed);
    TRACED_BASES[n].store(base, Ordering::Relaxed);
    // Ordering: Release — pairs with the Acquire in `fault_origin`.
    TRACED.store(n + 1, Ordering::Release);
    Some(starts)
}

/// If `pc` lies in an instruction of a stub that stands for a displaced
/// instruction, the displaced instruction's address and the bytes to add
/// to the stack pointer to undo what the stub pushed before it (see
/// [`arch::fault_origin`]): where a fault at `pc` must appear to the host.
///
/// # Signal safety
/// Atomic loads over the traced chunks and the slot's fault map.
pub(crate) fn fault_origin(cx: SignalContext, pc: usize) -> Option<(usize, u64)> {
    // Ordering: Acquire — pairs with the Release in `trace_chunk`.
    let n = TRACED.load(Ordering::Acquire);
    for i in 0..n.min(MAX_TRACED_CHUNKS) {
        // Ordering: Relaxed — published by the count's Release/Acquire.
        let base = TRACED_BASES[i].load(Ordering::Relaxed);
        let first = base + TRAMPOLINE_SIZE;
        if !(first..base + CHUNK).contains(&pc) {
            continue;
        }
        // Ordering: Relaxed, as the base.
        let starts = TRACED_STARTS[i].load(Ordering::Relaxed);
        // SAFETY: set with the base to a leaked array, never freed.
        let starts = unsafe { &*starts };
        let g = (pc - first) / STUB_SLOT;
        // Ordering: Acquire — pairs with the Release in `Pool::bump`; the
        // slot was carved out before its code was written and published,
        // and this thread ran that code.
        let class = |g: usize| starts.get(g).map_or(0, |k| k.load(Ordering::Acquire));
        let (slot, len) = match class(g) {
            0 if g > 0 && class(g - 1) == 2 => (first + (g - 1) * STUB_SLOT, SIZES[1]),
            0 => return None,
            k => (first + g * STUB_SLOT, SIZES[usize::from(k - 1).min(1)]),
        };
        // SAFETY: a slot of this chunk, which is never unmapped.
        return unsafe { arch::fault_origin(cx, slot, len, pc) };
    }
    None
}

impl Chunk {
    fn trampoline(&self) -> usize {
        self.base
    }
}

/// A retired stub waiting for its grace periods.
#[derive(Debug, Clone, Copy)]
struct RetiredStub {
    stub: Stub,
    /// Retirement order: a grace period covers exactly the stubs retired
    /// before it began, whatever other grace periods run meanwhile.
    seq: u64,
    /// A fast-path stub also needs a scan *before* the grace period: a thread
    /// can be on its way in (stub, trampoline, dispatcher) before entering a
    /// read-side section.
    fast: bool,
    /// The number of the scan that saw no thread inside it, if any.
    prescanned: Option<u64>,
}

/// What [`Pool::grace_snapshot`] saw when a grace period began.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Snapshot {
    /// Stubs retired before the grace period have a smaller `seq`.
    seq: u64,
    scans: u64,
}

/// The stub pool. Writer only (under the writer lock).
#[derive(Debug, Default)]
pub(crate) struct Pool {
    /// In the order they were mapped: the newest, likeliest to have room,
    /// last.
    chunks: Vec<Chunk>,
    /// `(base, index in chunks)`, by base: which chunk holds an address.
    by_base: Vec<(usize, usize)>,
    /// Free slots, per size class.
    free: [Vec<usize>; 2],
    /// Retired, waiting for a read-side grace period.
    awaiting_grace: Vec<RetiredStub>,
    /// Past their grace period, waiting for a thread scan.
    awaiting_scan: Vec<Stub>,
    /// Successful scans so far.
    scans: u64,
    /// The next retirement's `seq`.
    next_seq: u64,
    /// The register state trampolines handle, detected once.
    cpu: Option<CpuState>,
    /// New stubs' bytes, not yet written ([`Pool::flush`]).
    staged: Vec<(usize, Vec<u8>)>,
}

fn within_reach(a: usize, b: usize) -> bool {
    a.abs_diff(b) < REACH
}

impl Pool {
    /// Whether `addr` lies in a stub chunk (probes there are refused).
    pub(crate) fn contains(&self, addr: usize) -> bool {
        self.chunk_of(addr).is_some()
    }

    /// Builds and writes the out-of-line stub for the instruction `code` at
    /// `addr`.
    pub(crate) fn create(&mut self, code: &[u8], addr: usize) -> Result<Stub> {
        let (stub, _) = self.alloc(addr, 0)?;
        let bytes = arch::emit_out_of_line_slot(code, addr, stub.addr);
        self.fill(stub, bytes)
    }

    /// Builds and writes the site stub for the run `code` (the original
    /// bytes of the instructions the site's jump displaces, at `jump`) of the
    /// probe record at `record`: the fast path enters it, the trap path
    /// resumes in its displaced instructions. A small slot if the stub fits,
    /// else a large one.
    pub(crate) fn create_site(&mut self, code: &[u8], jump: usize, record: usize) -> Result<Stub> {
        let mut last = None;
        for class in 0..SIZES.len() as u8 {
            let (stub, trampoline) = self.alloc(jump, class)?;
            match arch::emit_site_stub(code, jump, stub.addr, stub.len(), trampoline, record) {
                Ok(b) => return self.fill(stub, Ok(b)),
                Err(e) => {
                    self.free_unpublished(stub);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Internal("no stub size".into())))
    }

    /// A new exit stub ([`arch::emit_exit_stub`]) for the exit run `code` at
    /// `jump`, ending with a `ret` of `ret_len` bytes, naming probe record
    /// `record`: the site's jump and the trap path both enter at its start.
    pub(crate) fn create_exit(
        &mut self,
        code: &[u8],
        jump: usize,
        ret_len: usize,
        record: usize,
    ) -> Result<Stub> {
        let mut last = None;
        for class in 0..SIZES.len() as u8 {
            let (stub, trampoline) = self.alloc(jump, class)?;
            let bytes = arch::emit_exit_stub(
                code,
                jump,
                ret_len,
                stub.addr,
                stub.len(),
                trampoline,
                record,
            );
            match bytes {
                Ok(b) => return self.fill(stub, Ok(b)),
                Err(e) => {
                    self.free_unpublished(stub);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Internal("no stub size".into())))
    }

    /// Stages a new stub's bytes: they reach the slot at the next
    /// [`Pool::flush`], which must come before the stub is published.
    fn fill(&mut self, stub: Stub, bytes: Result<Vec<u8>>) -> Result<Stub> {
        match bytes {
            Ok(mut b) => {
                // The whole slot (the rest never runs: int3), so adjacent
                // stubs merge into one write.
                b.resize(stub.len().max(b.len()), 0xCC);
                self.staged.push((stub.addr, b));
                Ok(stub)
            }
            Err(e) => {
                self.free_unpublished(stub);
                Err(e)
            }
        }
    }

    /// Writes the stubs built since the last flush, one write per run of
    /// adjacent slots (a batch of stubs costs about as many writes as
    /// chunks). On error none of them may be published: the caller frees
    /// them ([`Pool::free_unpublished`]).
    pub(crate) fn flush(&mut self) -> Result<()> {
        let mut staged = std::mem::take(&mut self.staged);
        staged.sort_unstable_by_key(|&(a, _)| a);
        let mut i = 0;
        while i < staged.len() {
            let (start, mut run) = (staged[i].0, std::mem::take(&mut staged[i].1));
            let mut j = i + 1;
            while j < staged.len() && staged[j].0 == start + run.len() {
                run.extend_from_slice(&staged[j].1);
                j += 1;
            }
            code::write_code(start, &run)?;
            i = j;
        }
        Ok(())
    }

    /// Whether every stub built has been written.
    pub(crate) fn is_flushed(&self) -> bool {
        self.staged.is_empty()
    }

    /// Frees a stub that was never published (no thread can be in it).
    pub(crate) fn free_unpublished(&mut self, stub: Stub) {
        self.free[usize::from(stub.class)].push(stub.addr);
    }

    /// Frees a published stub: reused only after its grace periods.
    pub(crate) fn retire(&mut self, stub: Stub, fast: bool) {
        self.awaiting_grace.push(RetiredStub {
            stub,
            seq: self.next_seq,
            fast,
            prescanned: None,
        });
        self.next_seq += 1;
    }

    /// Taken when a read-side grace period begins; pass it to
    /// [`Pool::after_grace_period`] when it ends.
    pub(crate) fn grace_snapshot(&self) -> Snapshot {
        Snapshot {
            seq: self.next_seq,
            scans: self.scans,
        }
    }

    /// A read-side grace period that began at `snap` has passed: stubs
    /// retired before it (and, for fast stubs, scanned before it) now wait
    /// only for a thread scan.
    pub(crate) fn after_grace_period(&mut self, snap: Snapshot) {
        let ready = |r: &RetiredStub| {
            r.seq < snap.seq && (!r.fast || r.prescanned.is_some_and(|p| p <= snap.scans))
        };
        self.awaiting_scan.extend(
            self.awaiting_grace
                .iter()
                .filter(|r| ready(r))
                .map(|r| r.stub),
        );
        self.awaiting_grace.retain(|r| !ready(r));
    }

    /// Stubs not yet reusable: (waiting for a grace period, waiting for a
    /// thread scan).
    pub(crate) fn retired_counts(&self) -> (usize, usize) {
        (self.awaiting_grace.len(), self.awaiting_scan.len())
    }

    /// Allocates a slot of size class `class` within reach of `near`;
    /// returns it and the trampoline of its chunk.
    fn alloc(&mut self, near: usize, class: u8) -> Result<(Stub, usize)> {
        if let Some(s) = self.take_free(near, class) {
            return Ok(s);
        }
        if let Some(s) = self.bump(near, class) {
            return Ok(s);
        }
        // Reuse before mapping more: a scan frees the stubs past their grace
        // period and counts as the scan-before of fast stubs still waiting
        // for one (which a later `sync` then moves on), so retired stubs of
        // every kind come back without the user calling `recycle_stubs`.
        let retired = self.awaiting_scan.len() + self.awaiting_grace.len();
        let near_enough = |s: &Stub| within_reach(s.addr, near);
        if retired >= SCAN_BATCH
            || self.awaiting_scan.iter().any(near_enough)
            || self.awaiting_grace.iter().any(|r| near_enough(&r.stub))
        {
            self.recycle()?;
            if let Some(s) = self.take_free(near, class) {
                return Ok(s);
            }
            // Fast stubs that scan counted as scanned still wait for their
            // grace period: wait it here (normal context, the writer)
            // rather than map a chunk more for every chunk they fill.
            if self
                .awaiting_grace
                .iter()
                .any(|r| r.fast && r.prescanned.is_some() && near_enough(&r.stub))
            {
                let snap = self.grace_snapshot();
                crate::grace::synchronize();
                self.after_grace_period(snap);
                self.recycle()?;
                if let Some(s) = self.take_free(near, class) {
                    return Ok(s);
                }
            }
        }
        let base = maps::map_exec_near(near, CHUNK)?;
        let cpu = *self.cpu.get_or_insert_with(CpuState::detect);
        let tramp = arch::emit_trampoline(base, &fast::inline_layout(), cpu)?;
        code::write_code(base, &tramp)?;
        let at = self.by_base.partition_point(|&(b, _)| b < base);
        self.by_base.insert(at, (base, self.chunks.len()));
        self.chunks.push(Chunk {
            base,
            used: TRAMPOLINE_SIZE,
            starts: trace_chunk(base),
        });
        self.bump(near, class)
            .ok_or_else(|| Error::Internal("a fresh stub chunk has no room".into()))
    }

    fn chunk_of(&self, slot: usize) -> Option<&Chunk> {
        let i = self
            .by_base
            .partition_point(|&(b, _)| b <= slot)
            .checked_sub(1)?;
        let c = &self.chunks[self.by_base[i].1];
        (c.base..c.base + CHUNK).contains(&slot).then_some(c)
    }

    fn take_free(&mut self, near: usize, class: u8) -> Option<(Stub, usize)> {
        let free = &mut self.free[usize::from(class)];
        let i = free.iter().rposition(|&s| within_reach(s, near))?;
        let addr = free.swap_remove(i);
        let tramp = self.chunk_of(addr)?.trampoline();
        Some((Stub { addr, class }, tramp))
    }

    fn bump(&mut self, near: usize, class: u8) -> Option<(Stub, usize)> {
        let len = SIZES[usize::from(class)];
        // Newest first: older chunks are mostly full.
        let c = self
            .chunks
            .iter_mut()
            .rev()
            .find(|c| c.used + len <= CHUNK && within_reach(c.base + c.used, near))?;
        let addr = c.base + c.used;
        if let Some(k) = c
            .starts
            .and_then(|s| s.get((c.used - TRAMPOLINE_SIZE) / STUB_SLOT))
        {
            // Ordering: Release — pairs with the Acquire in `fault_origin`.
            k.store(class + 1, Ordering::Release);
        }
        c.used += len;
        Some((Stub { addr, class }, c.trampoline()))
    }

    /// The trampolines of every chunk: code a thread on the fast path runs
    /// outside any read-side section.
    pub(crate) fn trampolines(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.chunks
            .iter()
            .map(|c| (c.base, c.base + TRAMPOLINE_SIZE))
    }

    /// The number of successful thread scans so far: a scan numbered `n`
    /// began after everything the writer did before `scans()` returned
    /// `n - 1` (scans run under the writer lock).
    pub(crate) fn scans(&self) -> u64 {
        self.scans
    }

    /// The stubs retired and not yet reusable, by their bytes: a thread may
    /// still run one, towards the code it continues at.
    pub(crate) fn retired_ranges(&self) -> Vec<(usize, usize)> {
        self.awaiting_scan
            .iter()
            .copied()
            .chain(self.awaiting_grace.iter().map(|r| r.stub))
            .map(|s| (s.addr, s.addr + s.len()))
            .collect()
    }

    /// Scans threads: `true` if none was inside a retired stub or on its way
    /// into or out of one (a trampoline, or the `probert_fast` code: the fast
    /// dispatcher's prologue and epilogue, the SIGTRAP handler, the signal
    /// return trampoline). Fast stubs waiting for a grace period then count
    /// as scanned before it.
    pub(crate) fn scan(&mut self) -> Result<bool> {
        let mut ranges = self.retired_ranges();
        // Always also the code a thread runs outside any read-side section on
        // its way into or out of a stub. A thread there is asked again until
        // it leaves.
        ranges.extend(self.trampolines());
        ranges.push(fast::code_range());
        if !quiet(&ranges, threads::Depth::Frames)? {
            return Ok(false);
        }
        self.scans += 1;
        for r in self
            .awaiting_grace
            .iter_mut()
            .filter(|r| r.fast && r.prescanned.is_none())
        {
            r.prescanned = Some(self.scans);
        }
        Ok(true)
    }

    /// Scans threads if stubs are retired; if the scan sees no thread inside
    /// (see [`Pool::scan`]), the stubs awaiting a scan are poisoned and
    /// freed.
    pub(crate) fn recycle(&mut self) -> Result<()> {
        if self.awaiting_grace.is_empty() && self.awaiting_scan.is_empty() {
            return Ok(());
        }
        if !self.scan()? {
            return Ok(());
        }
        // Poisoned in runs of adjacent slots (every slot starts at an even
        // offset, so the pattern stays in step across a run).
        self.awaiting_scan.sort_unstable_by_key(|s| s.addr);
        while !self.awaiting_scan.is_empty() {
            let mut end = self.awaiting_scan.len() - 1;
            let mut bytes = self.awaiting_scan[end].len();
            while end > 0 && {
                let prev = self.awaiting_scan[end - 1];
                prev.addr + prev.len() == self.awaiting_scan[end].addr
            } {
                end -= 1;
                bytes += self.awaiting_scan[end].len();
            }
            let start = self.awaiting_scan[end].addr;
            let poison: Vec<u8> = POISON.iter().copied().cycle().take(bytes).collect();
            code::write_code(start, &poison)?;
            for s in self.awaiting_scan.drain(end..) {
                self.free[usize::from(s.class)].push(s.addr);
            }
        }
        Ok(())
    }
}

/// Whether every other thread is seen outside `ranges` (at `depth`), with
/// [`SCAN_TRIES`] tries: the ranges must be unreachable already.
pub(crate) fn quiet(ranges: &[(usize, usize)], depth: threads::Depth) -> Result<bool> {
    quiet_within(
        ranges,
        depth,
        SCAN_TRIES,
        std::time::Duration::from_millis(200),
    )
}

/// [`quiet`] with `tries` scans of at most `timeout` each.
pub(crate) fn quiet_within(
    ranges: &[(usize, usize)],
    depth: threads::Depth,
    tries: usize,
    timeout: std::time::Duration,
) -> Result<bool> {
    for _ in 0..tries {
        if threads::quiescent_at(ranges, timeout, depth)? {
            return Ok(true);
        }
        std::thread::yield_now();
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grace_period_covers_only_stubs_retired_before_it_began() {
        // Two overlapping grace periods (two threads in `sync`): the one that
        // began first must not release stubs retired after it began, even if
        // the later one finishes first.
        let mut pool = Pool::default();
        let stub = |addr| Stub { addr, class: 0 };
        pool.retire(stub(0x1000), false);
        let first = pool.grace_snapshot();
        pool.retire(stub(0x2000), false);
        let second = pool.grace_snapshot();
        pool.after_grace_period(second);
        assert_eq!(pool.retired_counts(), (0, 2));
        pool.retire(stub(0x3000), false);
        pool.after_grace_period(first);
        assert_eq!(
            pool.retired_counts(),
            (1, 2),
            "0x3000 retired after `first` began"
        );
    }

    #[test]
    fn a_fast_stub_needs_a_scan_before_its_grace_period() {
        let mut pool = Pool::default();
        pool.retire(
            Stub {
                addr: 0x1000,
                class: 0,
            },
            true,
        );
        let snap = pool.grace_snapshot();
        pool.after_grace_period(snap);
        assert_eq!(
            pool.retired_counts(),
            (1, 0),
            "not scanned before the grace period"
        );
        // A scan (as `recycle` records one), then a grace period.
        pool.scans += 1;
        pool.awaiting_grace[0].prescanned = Some(pool.scans);
        let snap = pool.grace_snapshot();
        pool.after_grace_period(snap);
        assert_eq!(pool.retired_counts(), (0, 1));
    }
}
