//! Being told when a thread exits: a `pthread` key whose destructor runs on
//! every exiting thread that set a value for it.
//!
//! The key is created once, in normal context ([`init`]); a thread arms it
//! with [`arm`], which may run in signal context (the read-side section
//! table arms it when a thread first claims its slot, possibly inside the
//! `SIGTRAP` handler). `pthread_setspecific` is not async-signal-safe by
//! POSIX; what the C libraries do is: musl stores into the thread's
//! preallocated key array; glibc stores into the thread descriptor's
//! first block for keys below 32 (`PTHREAD_KEY_2NDLEVEL_SIZE`) and may
//! `calloc` a second-level block for larger keys. So the hook is only used
//! where it is plain stores — any key with musl, a key below 32 with glibc —
//! and [`arm`] does nothing elsewhere (the caller then keeps its old
//! behaviour: nothing is given back at exit).
//!
//! # Safety
//!
//! Calls `pthread_key_create` with a destructor that has the C signature,
//! and `pthread_setspecific` with a key this module created.
#![allow(unsafe_code)]
// Loom models arm nothing (see `grace`).
#![cfg_attr(all(test, loom), allow(dead_code))]

use std::sync::atomic::{AtomicU32, Ordering};

/// The key, or [`NO_KEY`].
static KEY: AtomicU32 = AtomicU32::new(NO_KEY);
const NO_KEY: u32 = u32::MAX;
/// glibc's `PTHREAD_KEY_2NDLEVEL_SIZE`: keys below it are stored without
/// allocating.
#[cfg(target_env = "gnu")]
const GLIBC_FIRST_BLOCK: u32 = 32;

/// Creates the key with `destructor` (idempotent; normal context, under
/// the writer lock). Returns whether [`arm`] can be used.
pub fn init(destructor: unsafe extern "C" fn(*mut libc::c_void)) -> bool {
    // Ordering: Relaxed — the writer lock orders initialisation; readers in
    // `arm` that see the key see a created key (the Release store below).
    if KEY.load(Ordering::Relaxed) != NO_KEY {
        return true;
    }
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `key` is writable; the destructor has the C signature.
    if unsafe { libc::pthread_key_create(&mut key, Some(destructor)) } != 0 {
        return false;
    }
    let usable = cfg!(target_env = "musl") || {
        #[cfg(target_env = "gnu")]
        {
            key < GLIBC_FIRST_BLOCK
        }
        #[cfg(not(target_env = "gnu"))]
        {
            false
        }
    };
    if !usable {
        // SAFETY: the key was just created and holds no value.
        unsafe { libc::pthread_key_delete(key) };
        return false;
    }
    // Ordering: Release — pairs with the Acquire load in `arm`.
    KEY.store(key, Ordering::Release);
    true
}

/// Makes the destructor run with `value` (non-zero) when the calling thread
/// exits. Nothing if [`init`] has not succeeded.
///
/// # Signal safety
/// A load and, with the key usable ([`init`]), `pthread_setspecific`'s
/// stores into the thread's own descriptor: no allocation, no lock.
pub fn arm(value: usize) {
    // Ordering: Acquire — pairs with the Release store in `init`.
    let key = KEY.load(Ordering::Acquire);
    if key == NO_KEY {
        return;
    }
    // SAFETY: a key this module created; the value is an integer the
    // destructor decodes, never dereferenced.
    unsafe { libc::pthread_setspecific(key as libc::pthread_key_t, value as *const libc::c_void) };
}

/// The calling thread's kernel thread id (raw `gettid`).
///
/// # Signal safety
/// One raw system call.
#[inline(always)]
pub fn tid() -> u64 {
    // SAFETY: gettid has no arguments and no memory effects.
    unsafe { super::raw::syscall0(libc::SYS_gettid) as u64 }
}

/// This process's id (raw `getpid`).
///
/// # Signal safety
/// One raw system call.
#[inline(always)]
pub fn pid() -> u64 {
    // SAFETY: getpid has no arguments and no memory effects.
    unsafe { super::raw::syscall0(libc::SYS_getpid) as u64 }
}

/// Whether the thread `tid` of the process `pid` has exited
/// (`tgkill(pid, tid, 0)` fails with `ESRCH`). A thread id the kernel gave
/// to a new thread since reads as alive.
///
/// # Signal safety
/// One raw system call.
#[inline(always)]
pub fn has_exited(pid: u64, tid: u64) -> bool {
    // SAFETY: signal 0 only checks that the thread exists.
    let ret = unsafe { super::raw::syscall3(libc::SYS_tgkill, pid as i64, tid as i64, 0) };
    tid != 0 && super::raw::check(ret) == Err(libc::ESRCH)
}
