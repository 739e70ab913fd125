//! The Rust API for attaching handlers and closures.
//!
//! # Safety
//!
//! Attaching is `unsafe`: probert cannot prove an address starts an
//! instruction everywhere, nor that a handler is async-signal-safe. Closures
//! are boxed and freed only after a grace period that follows their detach.
#![allow(unsafe_code)]

use crate::consumer::{ConsumerId, Owner, Stats};
use crate::error::Result;
use crate::hit::{Action, Handler, Hit};
use crate::site::Mode;
use crate::writer::{self, detach, stats};

/// Attaches `handler` to the instruction at `addr`.
///
/// Returns a handle for [`detach`]; [`Error::UnsupportedInstruction`](crate::Error::UnsupportedInstruction),
/// [`Error::Misaligned`](crate::Error::Misaligned), [`Error::Conflict`](crate::Error::Conflict), [`Error::NoRegion`](crate::Error::NoRegion) etc. when
/// the address cannot be probed.
///
/// # Safety
/// - `addr` must be the first byte of an instruction in code that stays mapped
///   while the probe is attached. probert checks the instruction boundary
///   where it knows the enclosing function (an ELF symbol, or the start of a
///   JIT region), but cannot elsewhere.
/// - `handler` must be async-signal-safe (see the crate docs) and may be
///   called with `user_data` from any thread until `detach` returns.
pub unsafe fn attach(
    addr: usize,
    handler: Handler,
    user_data: *mut std::ffi::c_void,
) -> Result<ConsumerId> {
    writer::attach_owned(addr, handler, user_data, Mode::Auto, None)
}

/// [`attach`] with a choice of mechanism: [`Mode::Trap`] keeps the site on
/// the `int3` path; [`Mode::Fast`] fails with
/// [`Error::UnsupportedInstruction`](crate::Error) unless the site can be fast.
///
/// # Safety
/// As [`attach`].
pub unsafe fn attach_ex(
    addr: usize,
    handler: Handler,
    user_data: *mut std::ffi::c_void,
    mode: Mode,
) -> Result<ConsumerId> {
    writer::attach_owned(addr, handler, user_data, mode, None)
}

/// Attaches a closure to the instruction at `addr`. The closure is dropped
/// after it is detached and a grace period has passed.
///
/// # Safety
/// As [`attach`]: `addr` must start an instruction in code that stays mapped,
/// and the closure must be async-signal-safe.
pub unsafe fn attach_fn<F>(addr: usize, f: F) -> Result<ConsumerId>
where
    F: Fn(&mut Hit) -> Action + Send + Sync + 'static,
{
    struct Owned<F>(*mut F);
    // SAFETY: `F: Send`, and the pointer is only dereferenced by handlers
    // (`F: Sync`) and freed once.
    unsafe impl<F: Send> Send for Owned<F> {}
    impl<F> Drop for Owned<F> {
        fn drop(&mut self) {
            // SAFETY: created by `Box::into_raw` below; dropped once, after
            // the last handler call (a grace period after detaching).
            drop(unsafe { Box::from_raw(self.0) });
        }
    }
    unsafe extern "C" fn call<F: Fn(&mut Hit) -> Action>(hit: *mut Hit) -> u32 {
        // SAFETY: the dispatcher passes a valid, exclusive `Hit` whose
        // `user_data` is the boxed `F` installed with this trampoline.
        let hit = unsafe { &mut *hit };
        // SAFETY: as above.
        let f = unsafe { &*(hit.user_data as *const F) };
        f(hit) as u32
    }
    let raw = Box::into_raw(Box::new(f));
    let owner: Owner = Box::new(Owned(raw));
    writer::attach_owned(addr, call::<F>, raw.cast(), Mode::Auto, Some(owner))
}

/// An attached closure that detaches (and waits for its handler) when
/// dropped.
#[derive(Debug)]
#[must_use = "dropping a Probe detaches it"]
pub struct Probe {
    id: ConsumerId,
}

impl Probe {
    /// The consumer handle.
    pub fn id(&self) -> ConsumerId {
        self.id
    }

    /// The consumer's statistics.
    pub fn stats(&self) -> Result<Stats> {
        stats(self.id)
    }

    /// Detaches now, reporting errors (dropping ignores them).
    pub fn detach(self) -> Result<()> {
        let id = self.id;
        std::mem::forget(self);
        detach(id)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        // A handler that returned `Remove` already made the handle stale.
        let _ = detach(self.id);
    }
}

/// Attaches a closure and returns a guard that detaches it on drop.
///
/// # Safety
/// As [`attach_fn`].
pub unsafe fn probe<F>(addr: usize, f: F) -> Result<Probe>
where
    F: Fn(&mut Hit) -> Action + Send + Sync + 'static,
{
    // SAFETY: forwarded contract.
    unsafe { attach_fn(addr, f) }.map(|id| Probe { id })
}
