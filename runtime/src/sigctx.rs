//! The proof that code runs on the trap path.
//!
//! Every function reachable from the `SIGTRAP` handler or from the fast
//! path's dispatchers takes a [`SignalContext`]. Only those entry points (and
//! the thread scan's signal handler) can create one, so a reader sees from the signature alone which
//! functions must keep the signal-safety rules: no allocation, no lock, no
//! formatting, no panic, no lazily initialised thread-local.
//!
//! # Safety
//!
//! Creating the token is `unsafe`: only handler entry points may.
#![allow(unsafe_code)]

/// Zero-sized token held by code running on the trap path.
#[derive(Clone, Copy, Debug)]
pub struct SignalContext(());

impl SignalContext {
    /// Creates the token.
    ///
    /// # Safety
    /// Call only at the entry of a signal handler or a fast-path dispatcher,
    /// and pass the token only to functions documented as signal-safe.
    #[inline(always)]
    pub(crate) unsafe fn new() -> Self {
        SignalContext(())
    }
}
