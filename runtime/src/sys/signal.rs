//! Installing the `SIGTRAP` handler and chaining to the one it replaced.
//!
//! # Safety
//!
//! `sigaction` is called with fully initialised structures. The previous
//! handler is stored as plain integers and called with the arguments the
//! kernel gave us, exactly as the kernel would have called it.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

use crate::arch::KernelSigaction;
use crate::error::{Error, Result};
use crate::sys::raw;

/// The previous disposition: its handler address and `sa_flags`.
static PREV_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static PREV_FLAGS: AtomicI32 = AtomicI32::new(0);
/// Our handler, once installed.
static OURS: AtomicUsize = AtomicUsize::new(0);

/// A signal handler with `SA_SIGINFO` arguments.
pub type SigInfoHandler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void);

/// Installs `handler` for `SIGTRAP` once, remembering the previous
/// disposition for [`chain`].
///
/// Flags, each for a reason:
/// - `SA_SIGINFO`: we need `si_code` (a trap instruction is `SI_KERNEL`) and
///   the interrupted context, to read and rewrite the registers;
/// - `SA_NODEFER`: a handler may run probed code; the nested trap must be
///   delivered (and counted as missed) rather than kill the process, which is
///   what the kernel does to a blocked synchronous trap;
/// - `SA_RESTART`: a trap interrupting nothing restartable changes nothing,
///   but a consumer's own blocking calls should not see `EINTR`;
/// - no `SA_ONSTACK`: an alternate stack is small (Rust gives 8 KiB, an
///   AVX-512 signal frame takes 3.4 KiB) while the interrupted stack has room
///   for the handler and the user's consumer.
pub fn install_trap(handler: SigInfoHandler) -> Result<()> {
    // Ordering: Acquire — pairs with the Release below; install is also
    // serialised by the caller's writer lock.
    if OURS.load(Ordering::Acquire) != 0 {
        return Ok(());
    }
    // SAFETY: as above.
    let mut prev: libc::sigaction = unsafe { std::mem::zeroed() };
    // Read the previous disposition first so the handler never sees a window
    // in which it is ours but `PREV_*` is not yet filled in.
    // SAFETY: valid pointers to initialised structures.
    if unsafe { libc::sigaction(libc::SIGTRAP, std::ptr::null(), &mut prev) } != 0 {
        return Err(Error::Signal(
            format!("sigaction: {}", std::io::Error::last_os_error()).into(),
        ));
    }
    // Ordering: Release — published before our handler can run (the
    // rt_sigaction below is a syscall, a full barrier); read with Acquire in
    // `chain`.
    PREV_HANDLER.store(prev.sa_sigaction, Ordering::Release);
    PREV_FLAGS.store(prev.sa_flags, Ordering::Release);
    // Installed with the raw system call and a restorer of our own, so that
    // the whole way from the handler back into the interrupted code (or an
    // out-of-line stub) runs probert's code, in the `probert_fast` section
    // that thread scans treat as busy (see `crate::xol`). libc's `sigaction`
    // would install its own restorer, in libc.
    let act = KernelSigaction::new(
        handler as usize,
        libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_RESTART,
    );
    // SAFETY: a valid kernel sigaction for SIGTRAP and its sigset size.
    let rc = unsafe {
        raw::syscall4(
            libc::SYS_rt_sigaction,
            libc::SIGTRAP as i64,
            &act as *const KernelSigaction as i64,
            0,
            KernelSigaction::SIGSET_SIZE,
        )
    };
    if let Err(errno) = raw::check(rc) {
        return Err(Error::Signal(
            format!("rt_sigaction: {}", std::io::Error::from_raw_os_error(errno)).into(),
        ));
    }
    // Ordering: Release — pairs with the Acquire at the top.
    OURS.store(handler as usize, Ordering::Release);
    Ok(())
}

/// Whether `SIGTRAP` is still handled by our handler (a host may have
/// replaced it after init).
pub fn trap_handler_installed() -> bool {
    // SAFETY: as in `install_trap`.
    let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to an initialised structure.
    let ok = unsafe { libc::sigaction(libc::SIGTRAP, std::ptr::null(), &mut cur) } == 0;
    // Ordering: Acquire — pairs with the Release in `install_trap`.
    ok && OURS.load(Ordering::Acquire) != 0 && cur.sa_sigaction == OURS.load(Ordering::Acquire)
}

/// What the caller must do to the interrupted context after [`chain`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chained {
    /// The previous handler ran (or the signal is ignored): return.
    Done,
    /// The previous disposition was the default action, now reinstated: rewind
    /// the instruction pointer by this many bytes so the trap instruction runs
    /// again and the kernel applies the default action, as it would have
    /// without us.
    Rewind(u8),
}

/// Passes a `SIGTRAP` that is not ours to the previous disposition, in the
/// three cases: an `SA_SIGINFO` handler, a plain handler, or `SIG_DFL` /
/// `SIG_IGN`. `trap_len` is the length of the trap instruction that raised it
/// (0 if it was not raised by an instruction).
///
/// # Signal safety
/// Calls only `sigaction`, `getpid`/`gettid`/`tgkill` (async-signal-safe)
/// and the previous handler.
pub fn chain(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    uc: *mut c_void,
    trap_len: u8,
) -> Chained {
    // Ordering: Acquire — pairs with the Release in `install_trap`.
    let handler = PREV_HANDLER.load(Ordering::Acquire);
    let flags = PREV_FLAGS.load(Ordering::Acquire);
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // Reinstate the default action: a trap instruction ignored or
        // defaulted kills the process with SIGTRAP (the kernel forces
        // synchronous traps), so do exactly that.
        // SAFETY: zeroed sigaction = SIG_DFL with no flags and an empty mask.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = libc::SIG_DFL;
        // SAFETY: valid pointer to an initialised structure.
        unsafe { libc::sigaction(sig, &act, std::ptr::null_mut()) };
        if trap_len > 0 {
            return Chained::Rewind(trap_len);
        }
        if handler == libc::SIG_DFL {
            // Raised by a process (kill, raise): raise it again for the
            // default action to apply once we return.
            // SAFETY: plain syscalls with valid arguments.
            unsafe {
                let pid = raw::syscall0(libc::SYS_getpid);
                let tid = raw::syscall0(libc::SYS_gettid);
                raw::syscall3(libc::SYS_tgkill, pid, tid, sig as i64);
            }
        }
        return Chained::Done;
    }
    if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it
        // has this signature; we pass the kernel's own arguments.
        let f: SigInfoHandler = unsafe { std::mem::transmute::<usize, SigInfoHandler>(handler) };
        f(sig, info, uc);
    } else {
        // SAFETY: a plain handler takes the signal number only.
        let f: extern "C" fn(libc::c_int) =
            unsafe { std::mem::transmute::<usize, extern "C" fn(libc::c_int)>(handler) };
        f(sig);
    }
    Chained::Done
}
