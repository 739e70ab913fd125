//! Never-unmapped, fixed-capacity arrays of records that the trap path reads
//! speculatively.
//!
//! A record may be reused for another probe or consumer after a grace period,
//! but its memory is never unmapped, so a stale or torn read returns a wrong
//! value (discarded by the caller's validation), never a fault. All record
//! fields are atomics.
//!
//! # Safety
//!
//! The backing memory comes from [`crate::sys::maps::reserve`]: zeroed,
//! read-write, never unmapped, and sized for `CAP` records. `T` is
//! [`Zeroable`], so every record is valid from the start.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicPtr, Ordering};

use crate::error::{Error, Result};

/// Types whose all-zero bit pattern is a valid value (atomics, integers).
///
/// # Safety
/// Implement only for types made of atomics and integers.
pub(crate) unsafe trait Zeroable: Sync {}

/// An array of `cap` records of `T`, reserved lazily on first use.
#[derive(Debug)]
pub(crate) struct Arena<T: Zeroable> {
    base: AtomicPtr<T>,
    cap: usize,
}

impl<T: Zeroable> Arena<T> {
    /// An arena of `cap` records; memory is reserved by [`Arena::init`].
    pub(crate) const fn new(cap: usize) -> Self {
        Arena {
            base: AtomicPtr::new(std::ptr::null_mut()),
            cap,
        }
    }

    /// Reserves the memory. Writer only, before any record is published.
    pub(crate) fn init(&self) -> Result<()> {
        // Ordering: Relaxed — the writer lock orders initialisation.
        if !self.base.load(Ordering::Relaxed).is_null() {
            return Ok(());
        }
        let bytes = self
            .cap
            .checked_mul(std::mem::size_of::<T>())
            .ok_or(Error::NoMemory("arena size overflows".into()))?;
        let p = crate::sys::maps::reserve(bytes)?;
        // Ordering: Release — readers that see the pointer (Acquire in
        // `get`) see the zeroed mapping.
        self.base.store(p.cast(), Ordering::Release);
        Ok(())
    }

    /// Where the base pointer lies (null until [`Arena::init`]), for
    /// generated code that finds a record by its index (the fast path's
    /// trampoline).
    pub(crate) fn base_address(&self) -> usize {
        std::ptr::addr_of!(self.base) as usize
    }

    /// The number of records.
    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// The record at `idx`, or `None` if out of range or not yet reserved.
    ///
    /// # Signal safety
    /// A bounds check and a load.
    #[inline(always)]
    pub(crate) fn get(&self, idx: usize) -> Option<&T> {
        // Ordering: Acquire — pairs with the Release in `init`.
        let base = self.base.load(Ordering::Acquire);
        if base.is_null() || idx >= self.cap {
            return None;
        }
        // SAFETY: `base` points at `cap` zero-initialised, never-unmapped
        // records of a `Zeroable` type and `idx < cap`; records are only
        // accessed through atomics, so shared references are sound.
        Some(unsafe { &*base.add(idx) })
    }

    /// The index of `rec`, a record of this arena.
    ///
    /// # Signal safety
    /// Arithmetic.
    #[inline]
    pub(crate) fn index_of(&self, rec: &T) -> u32 {
        // Ordering: Acquire — as in `get`.
        let base = self.base.load(Ordering::Acquire) as usize;
        ((rec as *const T as usize - base) / std::mem::size_of::<T>()) as u32
    }
}
