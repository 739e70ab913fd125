//! The host's own signals and threads: which signal thread scans send, or
//! none (quiescent points, reported by threads the host registers), and a
//! `SIGTRAP` handler of the host's that chains to probert's.
//!
//! A `probert_thread` is the runtime's `HostThread`: a record index and a
//! generation, so a stale or invented handle is `PROBERT_ERR_NOT_FOUND`.
//!
//! # Safety
//!
//! `#[no_mangle]` exports; the one pointer, `probert_thread_register`'s
//! out-parameter, is written once on success.
#![allow(unsafe_code)]

use std::ffi::c_int;

use core_rt::HostThread;

use crate::status::probert_status::{self, *};

/// A thread registered for quiescent points. 0 is never a valid handle.
pub type probert_thread = u64;

/// Chooses the real-time signal (`SIGRTMIN`..`SIGRTMAX`) probert's thread
/// scans send — and, where `membarrier(2)` is unavailable, the memory
/// barrier of its grace periods — instead of the default `SIGRTMAX - 1`.
/// For hosts that use real-time signals of their own. Overrides the
/// environment variable `PROBERT_SCAN_SIGNAL` (a number, or `SIGRTMIN+n` /
/// `SIGRTMAX-n`), which hosts that cannot be changed may set instead.
///
/// Call it before `probert_init` and before any other call that
/// initialises probert (every control call does, lazily); calling it again
/// with the same signal is harmless. The host must not install a handler
/// for that signal afterwards: thread scans then fail with
/// PROBERT_ERR_SIGNAL.
///
/// Errors: PROBERT_ERR_INVALID_ARGUMENT (not a real-time signal; quiescent
/// points chosen; probert already initialised with another signal; called
/// from a handler), PROBERT_ERR_SIGNAL (the host already has a handler for
/// `sig`).
/// Blocks: no. From a handler: no. Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_set_scan_signal(sig: c_int) -> probert_status {
    ffi_panic_boundary! {
        not_in_handler!();
        core_rt::set_scan_signal(sig).into()
    }
}

/// Chooses quiescent points instead of scan signals, for hosts that forbid
/// foreign signals (a VM that owns every real-time signal, a seccomp
/// sandbox): probert then sends no signal to any thread and installs no
/// handler but its SIGTRAP one. Before an out-of-line stub is reused, it
/// waits until every thread registered with `probert_thread_register` has
/// called `probert_quiescent` after the wait began (or is offline,
/// unregistered or gone); where `membarrier(2)` is unavailable, every grace
/// period (`probert_sync`, `probert_detach`) waits for that too.
///
/// The host promises: a registered thread runs nothing probert patched or
/// placed (probed instructions, out-of-line stubs, probert's handlers)
/// between a `probert_quiescent` call and its return to the host's own code,
/// nor while offline — so its safepoint code and what it runs offline stay
/// unprobed; and a thread that is not registered never runs probed code.
/// probert cannot check this: a thread that breaks it may be running a stub
/// that probert reuses.
///
/// Call it before `probert_init` and before any other call that initialises
/// probert. A stub waits up to 0.6 s per attempt for the registered threads;
/// one that cannot be reused yet stays retired (more stub memory is mapped
/// meanwhile) and is tried again later.
///
/// Errors: PROBERT_ERR_INVALID_ARGUMENT (probert already initialised with a
/// scan signal; called from a handler).
/// Blocks: no. From a handler: no. Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_use_quiescent_points() -> probert_status {
    ffi_panic_boundary! {
        not_in_handler!();
        core_rt::use_quiescent_points().into()
    }
}

/// Registers the calling thread for quiescent points and writes its handle
/// to `*out`. The thread starts online: from now on, waits (see
/// `probert_use_quiescent_points`) wait for its next `probert_quiescent`.
/// Keep the handle in the host's own thread structure; unregister the thread
/// before it exits (a thread that exits registered is noticed, more slowly).
///
/// Errors: PROBERT_ERR_INVALID_ARGUMENT (`out` NULL), PROBERT_ERR_NO_MEMORY
/// (4096 threads registered). On error `*out` is untouched.
/// Blocks: no. From a handler: yes (async-signal-safe).
/// Thread safety: registers the calling thread.
#[no_mangle]
pub extern "C" fn probert_thread_register(out: *mut probert_thread) -> probert_status {
    ffi_panic_boundary! {
        let out = not_null!(out);
        let t = try_rt!(core_rt::register_thread());
        // SAFETY: not NULL; the C contract is a writable probert_thread.
        unsafe { out.write(t.0) };
        PROBERT_OK
    }
}

/// Unregisters thread `t`: waits no longer wait for it, and `t` becomes
/// stale. Call it from the thread itself, or from another thread after the
/// thread's last call with `t`.
///
/// Errors: PROBERT_ERR_NOT_FOUND (stale, unknown or 0).
/// Blocks: no. From a handler: yes (async-signal-safe).
/// Thread safety: any thread, as above.
#[no_mangle]
pub extern "C" fn probert_thread_unregister(t: probert_thread) -> probert_status {
    ffi_panic_boundary! {
        core_rt::unregister_thread(HostThread(t)).into()
    }
}

/// A quiescent point of the calling thread `t`: call it at the host's own
/// safepoints, in code probert has not probed (see
/// `probert_use_quiescent_points` for the promise it makes). While nothing
/// waits it is one load and a compare; during a wait, two fences, a store
/// and a futex wake, once per wait. While offline it does nothing.
///
/// Errors: PROBERT_ERR_NOT_FOUND (stale, unknown or 0).
/// Blocks: no. From a handler: yes (async-signal-safe), but not from a
/// probert handler, nor from a signal handler that may have interrupted
/// probed code: the thread would resume there.
/// Thread safety: only the thread `t` names.
#[no_mangle]
pub extern "C" fn probert_quiescent(t: probert_thread) -> probert_status {
    ffi_panic_boundary! {
        core_rt::quiescent(HostThread(t)).into()
    }
}

/// Takes the calling thread `t` offline, around a long blocking call (a
/// wait for work, I/O): waits do not wait for it until
/// `probert_thread_online`. It must run no probed code until then.
///
/// Errors: PROBERT_ERR_NOT_FOUND (stale, unknown or 0).
/// Blocks: no. From a handler: yes (async-signal-safe).
/// Thread safety: only the thread `t` names.
#[no_mangle]
pub extern "C" fn probert_thread_offline(t: probert_thread) -> probert_status {
    ffi_panic_boundary! {
        core_rt::thread_offline(HostThread(t)).into()
    }
}

/// Brings the calling thread `t` back online; counts as a quiescent point.
///
/// Errors: PROBERT_ERR_NOT_FOUND (stale, unknown or 0).
/// Blocks: no. From a handler: yes (async-signal-safe).
/// Thread safety: only the thread `t` names.
#[no_mangle]
pub extern "C" fn probert_thread_online(t: probert_thread) -> probert_status {
    ffi_panic_boundary! {
        core_rt::thread_online(HostThread(t)).into()
    }
}

/// Declares that the SIGTRAP handler the host installed after probert
/// chains to probert's: for every SIGTRAP it does not handle itself it calls
/// the `sigaction` it replaced (probert's) with the kernel's three
/// arguments, unchanged, and returns normally afterwards. Without this
/// declaration a handler installed after probert makes `probert_attach`
/// fail with PROBERT_ERR_SIGNAL (probes attached before then deliver their
/// hits to the host's handler; detaching them still restores the code). If
/// the host later installs yet another handler, it declares again.
///
/// Through the host's handler, probes work as they do directly, a SIGTRAP
/// that neither handles goes to the disposition that preceded probert, and
/// stub memory is not reused while a thread is on its way back through the
/// host's handler (its signal frame is recognised on the thread's stack).
/// The handler must be installed with SA_SIGINFO and SA_NODEFER and must not
/// block SIGTRAP in its `sa_mask`: a consumer that calls probed code would
/// otherwise trap with SIGTRAP blocked, which the kernel punishes with death.
///
/// PROBERT_OK, with nothing to declare, if the handler installed is
/// probert's own.
///
/// Errors: PROBERT_ERR_SIGNAL (SIGTRAP is SIG_DFL or SIG_IGN; the handler
/// lacks SA_SIGINFO or SA_NODEFER, or blocks SIGTRAP),
/// PROBERT_ERR_INVALID_ARGUMENT (called from a handler).
/// Blocks: takes the writer lock (briefly). From a handler: no.
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_sigtrap_chained() -> probert_status {
    ffi_panic_boundary! {
        not_in_handler!();
        core_rt::declare_chained_sigtrap_handler().into()
    }
}
