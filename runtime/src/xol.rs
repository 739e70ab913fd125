//! Out-of-line stubs: the pool, emission, and their lifetime.
//!
//! An instruction that is not emulated runs from a *stub*: a copy relocated to
//! the stub's address followed by a jump back (see
//! [`crate::arch::emit_out_of_line`]). Stubs live in slots of
//! [`STUB_SLOT`] bytes in chunks mapped within ±2 GiB of the code they serve
//! (rel32 reach), with `MAP_FIXED_NOREPLACE`, readable and executable and never
//! writable: they are written through `/proc/self/mem`
//! ([`crate::sys::mem::write_code`]).
//!
//! # Lifetime
//!
//! A thread can be inside a stub, or inside the trap handler that is about to
//! send it there, for as long as the scheduler likes. A freed stub therefore
//! goes through two stages before reuse:
//!
//! 1. *pending* until a read-side grace period has passed (no handler is
//!    still deciding to jump into it — the trap handler leaves its section
//!    only after writing the resume address);
//! 2. *retiring* until a thread scan ([`crate::sys::threads::quiescent`])
//!    has seen every thread outside it.
//!
//! Scans cost microseconds to milliseconds, so they are batched: the pool
//! scans only when it would otherwise have to map a new chunk. A recycled slot
//! is poisoned with `ud2` first, so a violation of the above crashes loudly
//! instead of running stale code.

use crate::arch::{self, POISON, STUB_SLOT};
use crate::error::{Error, Result};
use crate::sys::{mem, threads};

/// Bytes mapped per chunk.
const CHUNK: usize = 64 * 1024;
/// Farthest a stub may be from the code it serves (rel32 reach, with margin
/// for the chunk and the instruction).
const REACH: usize = (2 << 30) - (1 << 20);
/// Retiring stubs at which an allocation scans rather than maps.
const SCAN_BATCH: usize = 64;

#[derive(Debug)]
struct Chunk {
    base: usize,
    used: usize,
}

/// The stub pool. Writer only (under the writer lock).
#[derive(Debug, Default)]
pub(crate) struct Pool {
    chunks: Vec<Chunk>,
    free: Vec<usize>,
    pending: Vec<usize>,
    retiring: Vec<usize>,
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

    /// Builds and writes the stub for the instruction `code` at `addr`;
    /// returns its address.
    pub(crate) fn create(&mut self, code: &[u8], addr: usize) -> Result<usize> {
        let slot = self.alloc(addr)?;
        let bytes = match arch::emit_out_of_line(code, addr, slot) {
            Ok(b) => b,
            Err(e) => {
                self.free.push(slot);
                return Err(e);
            }
        };
        if let Err(e) = mem::write_code(slot, &bytes) {
            self.free.push(slot);
            return Err(e);
        }
        Ok(slot)
    }

    /// Frees a stub that was never published (no thread can be in it).
    pub(crate) fn free_unpublished(&mut self, slot: usize) {
        self.free.push(slot);
    }

    /// Frees a published stub: reused only after a grace period and a
    /// thread scan.
    pub(crate) fn retire(&mut self, slot: usize) {
        self.pending.push(slot);
    }

    /// A read-side grace period has passed since every stub now pending was
    /// retired.
    pub(crate) fn after_grace_period(&mut self, pending_then: usize) {
        let n = pending_then.min(self.pending.len());
        self.retiring.extend(self.pending.drain(..n));
    }

    /// Number of stubs pending now (to pass to [`Pool::after_grace_period`]).
    pub(crate) fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Stubs not yet reusable: (pending, retiring).
    pub(crate) fn retired_counts(&self) -> (usize, usize) {
        (self.pending.len(), self.retiring.len())
    }

    fn alloc(&mut self, near: usize) -> Result<usize> {
        if let Some(s) = self.take_free(near) {
            return Ok(s);
        }
        if let Some(s) = self.bump(near) {
            return Ok(s);
        }
        if self.retiring.len() >= SCAN_BATCH || self.retiring.iter().any(|&s| within_reach(s, near))
        {
            self.recycle()?;
            if let Some(s) = self.take_free(near) {
                return Ok(s);
            }
        }
        let base = mem::map_exec_near(near, CHUNK)?;
        self.chunks.push(Chunk { base, used: 0 });
        self.bump(near)
            .ok_or_else(|| Error::Internal("a fresh stub chunk has no room".into()))
    }

    fn take_free(&mut self, near: usize) -> Option<usize> {
        let i = self.free.iter().rposition(|&s| within_reach(s, near))?;
        Some(self.free.swap_remove(i))
    }

    fn bump(&mut self, near: usize) -> Option<usize> {
        let c = self
            .chunks
            .iter_mut()
            .find(|c| c.used + STUB_SLOT <= CHUNK && within_reach(c.base + c.used, near))?;
        let s = c.base + c.used;
        c.used += STUB_SLOT;
        Some(s)
    }

    /// Scans threads once; if none is inside a retiring stub, poisons them
    /// and makes them free.
    pub(crate) fn recycle(&mut self) -> Result<()> {
        if self.retiring.is_empty() {
            return Ok(());
        }
        let ranges: Vec<(usize, usize)> =
            self.retiring.iter().map(|&s| (s, s + STUB_SLOT)).collect();
        if !threads::quiescent(&ranges, std::time::Duration::from_millis(200))? {
            return Ok(());
        }
        let poison: Vec<u8> = POISON.iter().copied().cycle().take(STUB_SLOT).collect();
        for s in std::mem::take(&mut self.retiring) {
            mem::write_code(s, &poison)?;
            self.free.push(s);
        }
        Ok(())
    }
}
