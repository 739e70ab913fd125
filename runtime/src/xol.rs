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

use crate::arch::{self, Displaced, POISON, STUB_SLOT, TRAMPOLINE_SIZE};
use crate::error::{Error, Result};
use crate::fast;
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

#[derive(Debug)]
struct Chunk {
    base: usize,
    used: usize,
}

impl Chunk {
    fn trampoline(&self) -> usize {
        self.base
    }
}

/// A retired stub waiting for its grace periods.
#[derive(Debug, Clone, Copy)]
struct RetiredStub {
    addr: usize,
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
    chunks: Vec<Chunk>,
    free: Vec<usize>,
    /// Retired, waiting for a read-side grace period.
    awaiting_grace: Vec<RetiredStub>,
    /// Past their grace period, waiting for a thread scan.
    awaiting_scan: Vec<usize>,
    /// Successful scans so far.
    scans: u64,
    /// The next retirement's `seq`.
    next_seq: u64,
}

fn within_reach(a: usize, b: usize) -> bool {
    a.abs_diff(b) < REACH
}

impl Pool {
    /// Whether `addr` lies in a stub chunk (probes there are refused).
    pub(crate) fn contains(&self, addr: usize) -> bool {
        self.chunks
            .iter()
            .any(|c| (c.base..c.base + CHUNK).contains(&addr))
    }

    /// Builds and writes the out-of-line stub for the instruction `code` at
    /// `addr`; returns its address.
    pub(crate) fn create(&mut self, code: &[u8], addr: usize) -> Result<usize> {
        let slot = self.alloc(addr)?.0;
        let bytes = arch::emit_out_of_line(code, addr, slot);
        self.fill(slot, bytes)
    }

    /// Builds and writes the fast-path stub of the site `site`; returns its
    /// address.
    pub(crate) fn create_fast(
        &mut self,
        code: &[u8],
        site: usize,
        len: u8,
        displaced: &Displaced,
        tag: u32,
    ) -> Result<usize> {
        let (slot, trampoline) = self.alloc(site)?;
        let bytes = arch::emit_site_stub(code, site, len, displaced, slot, trampoline, tag);
        self.fill(slot, bytes)
    }

    fn fill(&mut self, slot: usize, bytes: Result<Vec<u8>>) -> Result<usize> {
        match bytes.and_then(|b| code::write_code(slot, &b)) {
            Ok(()) => Ok(slot),
            Err(e) => {
                self.free.push(slot);
                Err(e)
            }
        }
    }

    /// Frees a stub that was never published (no thread can be in it).
    pub(crate) fn free_unpublished(&mut self, slot: usize) {
        self.free.push(slot);
    }

    /// Frees a published stub: reused only after its grace periods.
    pub(crate) fn retire(&mut self, slot: usize, fast: bool) {
        self.awaiting_grace.push(RetiredStub {
            addr: slot,
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
                .map(|r| r.addr),
        );
        self.awaiting_grace.retain(|r| !ready(r));
    }

    /// Stubs not yet reusable: (waiting for a grace period, waiting for a
    /// thread scan).
    pub(crate) fn retired_counts(&self) -> (usize, usize) {
        (self.awaiting_grace.len(), self.awaiting_scan.len())
    }

    /// Allocates a slot within reach of `near`; returns it and the
    /// trampoline of its chunk.
    fn alloc(&mut self, near: usize) -> Result<(usize, usize)> {
        if let Some(s) = self.take_free(near) {
            return Ok(s);
        }
        if let Some(s) = self.bump(near) {
            return Ok(s);
        }
        // Reuse before mapping more: a scan frees the stubs past their grace
        // period and counts as the scan-before of fast stubs still waiting
        // for one (which a later `sync` then moves on), so retired stubs of
        // every kind come back without the user calling `recycle_stubs`.
        let retired = self.awaiting_scan.len() + self.awaiting_grace.len();
        let near_enough = |s: usize| within_reach(s, near);
        if retired >= SCAN_BATCH
            || self.awaiting_scan.iter().copied().any(near_enough)
            || self.awaiting_grace.iter().any(|r| near_enough(r.addr))
        {
            self.recycle()?;
            if let Some(s) = self.take_free(near) {
                return Ok(s);
            }
        }
        let base = maps::map_exec_near(near, CHUNK)?;
        let tramp = arch::emit_trampoline(base, &fast::inline_layout())?;
        code::write_code(base, &tramp)?;
        self.chunks.push(Chunk {
            base,
            used: TRAMPOLINE_SIZE,
        });
        self.bump(near)
            .ok_or_else(|| Error::Internal("a fresh stub chunk has no room".into()))
    }

    fn chunk_of(&self, slot: usize) -> Option<&Chunk> {
        self.chunks
            .iter()
            .find(|c| (c.base..c.base + CHUNK).contains(&slot))
    }

    fn take_free(&mut self, near: usize) -> Option<(usize, usize)> {
        let i = self.free.iter().rposition(|&s| within_reach(s, near))?;
        let s = self.free.swap_remove(i);
        Some((s, self.chunk_of(s)?.trampoline()))
    }

    fn bump(&mut self, near: usize) -> Option<(usize, usize)> {
        let c = self
            .chunks
            .iter_mut()
            .find(|c| c.used + STUB_SLOT <= CHUNK && within_reach(c.base + c.used, near))?;
        let s = c.base + c.used;
        c.used += STUB_SLOT;
        Some((s, c.trampoline()))
    }

    /// The number of successful thread scans so far: a scan numbered `n`
    /// began after everything the writer did before `scans()` returned
    /// `n - 1` (scans run under the writer lock).
    pub(crate) fn scans(&self) -> u64 {
        self.scans
    }

    /// Scans threads: `true` if none was inside a retired stub or on its way
    /// into or out of one (a trampoline, or the `probert_fast` code: the fast
    /// dispatcher's prologue and epilogue, the SIGTRAP handler, the signal
    /// return trampoline). Fast stubs waiting for a grace period then count
    /// as scanned before it.
    pub(crate) fn scan(&mut self) -> Result<bool> {
        let mut ranges: Vec<(usize, usize)> = self
            .awaiting_scan
            .iter()
            .copied()
            .chain(self.awaiting_grace.iter().map(|r| r.addr))
            .map(|s| (s, s + STUB_SLOT))
            .collect();
        // Always also the code a thread runs outside any read-side section on
        // its way into or out of a stub. A thread there is asked again until
        // it leaves.
        ranges.extend(
            self.chunks
                .iter()
                .map(|c| (c.base, c.base + TRAMPOLINE_SIZE)),
        );
        ranges.push(fast::code_range());
        let mut quiet = false;
        for _ in 0..SCAN_TRIES {
            if threads::quiescent(&ranges, std::time::Duration::from_millis(200))? {
                quiet = true;
                break;
            }
            std::thread::yield_now();
        }
        if !quiet {
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
        let poison: Vec<u8> = POISON.iter().copied().cycle().take(STUB_SLOT).collect();
        while let Some(s) = self.awaiting_scan.pop() {
            if let Err(e) = code::write_code(s, &poison) {
                self.awaiting_scan.push(s);
                return Err(e);
            }
            self.free.push(s);
        }
        Ok(())
    }
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
        pool.retire(0x1000, false);
        let first = pool.grace_snapshot();
        pool.retire(0x2000, false);
        let second = pool.grace_snapshot();
        pool.after_grace_period(second);
        assert_eq!(pool.retired_counts(), (0, 2));
        pool.retire(0x3000, false);
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
        pool.retire(0x1000, true);
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
