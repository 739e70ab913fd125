//! What a handler receives and returns.
//!
//! # Safety
//!
//! [`Hit::regs_mut`] dereferences the register pointer the dispatcher stored;
//! it points at a live [`Regs`] for the duration of the handler call.
#![allow(unsafe_code)]

use std::ffi::c_void;

use crate::arch::Regs;

/// What a handler asks for after a hit.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Keep the consumer attached.
    Continue = 0,
    /// Detach this consumer: no further calls after the ones already running
    /// finish, and its handle becomes stale. (Its resources are reclaimed by
    /// the next probert call made in normal context.)
    Remove = 1,
    /// From an entry handler of a consumer with a return handler: do not
    /// call the return handler for this invocation (anywhere else, the same
    /// as [`Action::Continue`]).
    NoReturn = 2,
}

impl Action {
    /// Reads an action returned through the C ABI: `1` and `2` are
    /// [`Action::Remove`] and [`Action::NoReturn`], anything else is
    /// [`Action::Continue`].
    #[inline]
    pub fn from_raw(raw: u32) -> Action {
        match raw {
            1 => Action::Remove,
            2 => Action::NoReturn,
            _ => Action::Continue,
        }
    }
}

/// One execution of a probed instruction, as a handler sees it. Layout-equal
/// to `probert_hit` in the C ABI.
#[repr(C)]
#[derive(Debug)]
pub struct Hit {
    /// The probed address.
    pub addr: usize,
    /// Registers at the probed instruction; writes take effect on resume.
    pub regs: *mut Regs,
    /// The `user_data` given at attach.
    pub user_data: *mut c_void,
    /// For a consumer with a return handler: 8 bytes private to this
    /// invocation of this consumer, zero at the entry hit, the same bytes at
    /// its return hit. Null for other consumers.
    pub session: *mut u64,
    /// 1 on a return hit (then `addr` is the function's entry and the
    /// registers are as just after the return), 0 otherwise.
    pub is_return: u32,
}

impl Hit {
    /// The registers of the thread that hit the probe, writable.
    ///
    /// # Signal safety
    /// A pointer dereference.
    #[inline]
    pub fn regs_mut(&mut self) -> &mut Regs {
        // SAFETY: the dispatcher sets `regs` to a live, exclusively borrowed
        // `Regs` for the duration of the handler call, and `Hit` is only
        // handed out by `&mut` for that duration.
        unsafe { &mut *self.regs }
    }

    /// The registers of the thread that hit the probe.
    #[inline]
    pub fn regs(&self) -> &Regs {
        // SAFETY: as in `regs_mut`.
        unsafe { &*self.regs }
    }

    /// The invocation's session word (consumers with a return handler):
    /// zero at the entry hit, and what the entry handler left in it at the
    /// return hit.
    #[inline]
    pub fn session(&mut self) -> Option<&mut u64> {
        // SAFETY: the dispatcher sets `session` to null or to the word of
        // this invocation's pending frame, live for the handler call.
        unsafe { self.session.as_mut() }
    }

    /// Whether this is a return hit.
    #[inline]
    pub fn is_return(&self) -> bool {
        self.is_return != 0
    }
}

/// A handler, as the C ABI declares it: called on every hit with the hit, and
/// returns an [`Action`] as an integer (`0` continue, `1` remove).
///
/// Handlers may run in signal context (the trap path), so they must be
/// **async-signal-safe**: no `malloc`, no locks another thread may hold, no
/// `println!`, no panics (a panic in an `extern "C"` function aborts).
/// Handlers may call probed code: the nested hit is counted as *missed* and the
/// consumers are not called again.
///
/// A handler reaches the probed code's registers through its hit only (its
/// `regs`, or a function given the hit), never by reading its caller's
/// stack: on the fast path a handler whose code never reaches `regs`
/// (found by analysing it, see `arch::Clobbers::FRAME`) is called with
/// only the registers a call may change saved.
pub type Handler = unsafe extern "C" fn(hit: *mut Hit) -> u32;
