//! Keeping `SIGTRAP` out of the signal masks a host sets through the C
//! library (issue 13, item 2).
//!
//! The kernel delivers a trap instruction's `SIGTRAP` with `force_sig`: if
//! the thread has it blocked, the disposition is reset to the default and
//! the process dies. Threads block it without meaning to: a worker that
//! blocks everything and waits in `sigwait`/`signalfd`, a handler installed
//! with a full `sa_mask`. probert therefore interposes the C library's
//! `pthread_sigmask`, `sigprocmask` and `sigaction` (every binary or shared
//! object linking probert defines them, and the dynamic linker binds the
//! host's calls to them ahead of libc's): `SIGTRAP` is taken out of every
//! set that blocks signals (`SIG_BLOCK`, `SIG_SETMASK`) and out of every
//! handler's `sa_mask`. Everything else is passed on unchanged. The glibc
//! internals `pthread_sigmask` also protects (the cancellation and set-id
//! signals, 32 and 33) stay protected: they are left out too, as glibc does.
//!
//! What the host can see: a mask it reads back never contains `SIGTRAP`,
//! and a `kill -TRAP` reaches probert's handler (which passes it to the
//! previous disposition, see [`super::signal`]) even in a thread that
//! "blocked" everything. What remains (not interposable):
//!
//! - masks set by raw system calls (`syscall(SYS_rt_sigprocmask)`, Go's
//!   runtime, a statically linked libc inside a sandboxed helper);
//! - the C library's own all-signals-blocked windows: `pthread_create`
//!   around `clone` (and the new thread until it restores its mask). Probes
//!   in code that runs there (`clone`) kill the process if they are served
//!   by a trap; fast (jump) sites need no signal and work there. (The spawn
//!   functions run a child of probert's: [`super::spawn`].)
//! - temporary masks of `sigsuspend`, `pselect`, `ppoll`, `epoll_pwait`,
//!   `signalfd` readers that set a mask by `ppoll`: a handler interrupting
//!   those runs with the temporary mask.
//!
//! # Safety
//!
//! The interposers dereference the caller's signal sets and `sigaction`
//! (as libc would) and call the next definition of `sigaction`, found with
//! `dlsym(RTLD_NEXT)`, with the same arguments but for the mask.
#![allow(unsafe_code)]

use std::ffi::c_int;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::raw;

/// The signals a host's mask never blocks here: `SIGTRAP`, and glibc's
/// internal cancellation and set-id signals (which its `pthread_sigmask`
/// protects).
const KEEP_UNBLOCKED: u64 = (1 << (libc::SIGTRAP - 1)) | (1 << 31) | (1 << 32);
const TRAP_BIT: u64 = 1 << (libc::SIGTRAP - 1);

/// `rt_sigprocmask` with the kernel's 8-byte set; `-errno` on failure.
///
/// # Safety
/// `set` and `old` are null or valid kernel signal sets (the first 8 bytes
/// of a `sigset_t`).
unsafe fn rt_sigprocmask(how: c_int, set: *const libc::sigset_t, old: *mut libc::sigset_t) -> i64 {
    let copy: u64;
    let mut p = set.cast::<u64>();
    if !set.is_null() && how != libc::SIG_UNBLOCK {
        // SAFETY: the caller's set, at least 8 bytes.
        copy = unsafe { set.cast::<u64>().read_unaligned() } & !KEEP_UNBLOCKED;
        p = &copy;
    }
    // SAFETY: per the caller's contract; the kernel reads and writes 8 bytes.
    unsafe {
        raw::syscall4(
            libc::SYS_rt_sigprocmask,
            i64::from(how),
            p as i64,
            old as i64,
            8,
        )
    }
}

/// `pthread_sigmask(3)`, keeping `SIGTRAP` unblocked.
///
/// # Safety
/// As `pthread_sigmask(3)`.
///
/// # Signal safety
/// One raw system call.
#[no_mangle]
pub unsafe extern "C" fn pthread_sigmask(
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> c_int {
    // SAFETY: the caller's contract.
    let rc = unsafe { rt_sigprocmask(how, set, old) };
    if rc < 0 {
        -rc as c_int
    } else {
        0
    }
}

/// `sigprocmask(2)`, keeping `SIGTRAP` unblocked.
///
/// # Safety
/// As `sigprocmask(2)`.
///
/// # Signal safety
/// One raw system call (and `errno` on failure).
#[no_mangle]
pub unsafe extern "C" fn sigprocmask(
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> c_int {
    // SAFETY: the caller's contract.
    let rc = unsafe { rt_sigprocmask(how, set, old) };
    if rc < 0 {
        // SAFETY: this thread's errno.
        unsafe { *libc::__errno_location() = -rc as c_int };
        -1
    } else {
        0
    }
}

type SigactionFn =
    unsafe extern "C" fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int;

/// The C library's `sigaction` (the next definition after ours).
static NEXT_SIGACTION: AtomicUsize = AtomicUsize::new(0);

/// Resolves the C library's `sigaction`: at probert's initialisation, or at
/// the first call before it (normal context then: `dlsym` is not
/// async-signal-safe).
pub fn resolve() -> usize {
    // Ordering: Relaxed — a function address, the same whoever resolves it.
    let f = NEXT_SIGACTION.load(Ordering::Relaxed);
    if f != 0 {
        return f;
    }
    // SAFETY: a NUL-terminated name; RTLD_NEXT looks past this object.
    let f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"sigaction".as_ptr()) } as usize;
    // Ordering: Relaxed — see above.
    NEXT_SIGACTION.store(f, Ordering::Relaxed);
    f
}

/// `sigaction(2)`, with `SIGTRAP` taken out of the new handler's
/// `sa_mask`: a handler that calls probed code must not run with it
/// blocked.
///
/// # Safety
/// As `sigaction(2)`.
///
/// # Signal safety
/// The C library's `sigaction` once resolved ([`resolve`], done at
/// initialisation).
#[no_mangle]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    let next = resolve();
    if next == 0 || next == sigaction as *const () as usize {
        // SAFETY: this thread's errno.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return -1;
    }
    // SAFETY: the address dlsym gave for the C library's `sigaction`.
    let next: SigactionFn = unsafe { std::mem::transmute::<usize, SigactionFn>(next) };
    if act.is_null() {
        // SAFETY: the caller's arguments, passed on.
        return unsafe { next(sig, act, old) };
    }
    // SAFETY: the caller's valid `sigaction`, copied.
    let mut copy = unsafe { act.read() };
    let mask = std::ptr::addr_of_mut!(copy.sa_mask).cast::<u64>();
    // SAFETY: the first 8 bytes of the copy's sigset.
    unsafe { mask.write_unaligned(mask.read_unaligned() & !TRAP_BIT) };
    // SAFETY: the caller's arguments, the mask changed.
    unsafe { next(sig, &copy, old) }
}
