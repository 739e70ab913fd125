//! What a host tells probert about its own signals and threads: the signal
//! thread scans may use, or none (quiescent points, and the threads that
//! report them), and a `SIGTRAP` handler of its own that chains to
//! probert's.
//!
//! Every function but the quiescent-point ones is for normal context and
//! refuses to run inside a handler; the choices of mechanism must be made
//! before initialisation (before [`crate::init`] or the first call that
//! initialises lazily).

use crate::error::Result;
use crate::sys::{membarrier, quiescent, scan_mode};

pub use crate::sys::membarrier::Barrier;
pub use crate::sys::quiescent::HostThread;

/// Chooses the real-time signal (`SIGRTMIN..=SIGRTMAX`) thread scans send
/// (and the memory barrier, where `membarrier` is missing), instead of
/// `SIGRTMAX - 1` or the `PROBERT_SCAN_SIGNAL` environment variable (which
/// this call overrides).
///
/// Errors: [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a
/// signal outside the real-time range, after [`use_quiescent_points`], after
/// initialisation with another signal, or from a handler;
/// [`Error::Signal`](crate::Error::Signal) if the host already has a handler
/// for it.
pub fn set_scan_signal(sig: i32) -> Result<()> {
    refuse_in_handler()?;
    scan_mode::set_scan_signal(sig)
}

/// Chooses quiescent points: probert then sends no signal to any thread and
/// installs no handler but its `SIGTRAP` one. A thread scan completes once
/// every thread registered with [`register_thread`] has passed a
/// [`quiescent`] point after it began (or is offline, unregistered or
/// gone); without `membarrier`, so does the memory barrier of every grace
/// period (then [`crate::sync`] waits for the slowest registered thread).
///
/// The host promises that a registered thread runs nothing probert patched
/// or placed (probed instructions, out-of-line stubs, handlers) between a
/// quiescent point and its return to the host's own code, nor while
/// offline, and that an unregistered thread never runs probed code at all
/// (see `sys::quiescent`): a thread that breaks it may be inside a stub
/// that probert reuses.
///
/// Errors: [`Error::InvalidArgument`](crate::Error::InvalidArgument) after
/// initialisation with a scan signal, or from a handler.
pub fn use_quiescent_points() -> Result<()> {
    refuse_in_handler()?;
    scan_mode::use_quiescent_points()
}

/// Registers the calling thread for quiescent points; it starts online.
/// Meaningful once [`use_quiescent_points`] is chosen (harmless otherwise).
/// Unregister it before it exits.
///
/// Errors: [`Error::NoMemory`](crate::Error::NoMemory) if 4096 threads are
/// registered.
pub fn register_thread() -> Result<HostThread> {
    quiescent::register()
}

/// Unregisters `t`; the handle becomes stale. Call it from the thread, or
/// from another one after the thread's last use of `t`.
///
/// Errors: [`Error::NotFound`](crate::Error::NotFound) for a stale handle.
pub fn unregister_thread(t: HostThread) -> Result<()> {
    quiescent::unregister(t)
}

/// A quiescent point of the calling thread `t` (see
/// [`use_quiescent_points`] for the promise it makes). One load and a
/// compare while no scan waits; async-signal-safe.
///
/// Errors: [`Error::NotFound`](crate::Error::NotFound) for a stale handle.
#[inline]
pub fn quiescent(t: HostThread) -> Result<()> {
    quiescent::quiescent(t)
}

/// Takes the calling thread `t` offline (around a long blocking call):
/// scans and barriers do not wait for it until [`thread_online`]. It must
/// run no probed code meanwhile. Async-signal-safe.
///
/// Errors: [`Error::NotFound`](crate::Error::NotFound) for a stale handle.
pub fn thread_offline(t: HostThread) -> Result<()> {
    quiescent::offline(t)
}

/// Brings the calling thread `t` back online; counts as a quiescent point.
/// Async-signal-safe.
///
/// Errors: [`Error::NotFound`](crate::Error::NotFound) for a stale handle.
pub fn thread_online(t: HostThread) -> Result<()> {
    quiescent::online(t)
}

/// The mechanism of the memory barrier in every grace period, once probert
/// is initialised: `membarrier`, or what stands in for it (see
/// [`Barrier`]). For diagnostics.
pub fn barrier_mechanism() -> Option<Barrier> {
    membarrier::mechanism()
}

fn refuse_in_handler() -> Result<()> {
    if crate::grace::in_section() {
        Err(crate::Error::InvalidArgument(
            "probert's control calls cannot be made from a handler".into(),
        ))
    } else {
        Ok(())
    }
}
