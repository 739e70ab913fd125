//! Contexts saved in signal frames on a thread's stack.
//!
//! A thread scan's handler sees the context it interrupted. If that context
//! is itself a signal handler (the host's, say, waiting at a safepoint),
//! the code the thread will return to when that handler finishes is in a
//! signal frame further up the stack, invisible to the innermost check. A
//! scan that must prove no thread can resume inside a range (a site whose
//! displaced instructions are about to be overwritten) therefore also walks
//! the stack above the interrupted stack pointer, up to the end of its
//! mapping, for signal frames, and checks the program counter saved in
//! each.
//!
//! A signal frame is recognised by its first word, the address of the
//! signal return trampoline the handler returns through: probert's own, or
//! the one the scan's own handler returns through (libc's `__restore_rt`
//! for handlers installed through libc, as nearly every handler is), with a
//! plausible saved stack pointer (above the frame). A handler installed
//! with the raw system call and a trampoline of its own (a language
//! runtime's) is not recognised: its frames are not seen.
//!
//! # Cost
//!
//! One read of `/proc/self/maps` (to bound the walk) and one
//! `process_vm_readv` per 512 bytes of live stack, in the thread's handler;
//! only for the scans that ask for it.
//!
//! # Safety
//!
//! [`saved_contexts`] reads the running handler's own `ucontext` and signal
//! frame; every other byte of the stack is read with `process_vm_readv`,
//! which fails instead of faulting.
#![allow(unsafe_code)]

use crate::arch;
use crate::sigctx::SignalContext;
use crate::sys::{maps, peek};

/// Bytes read per step: on the interrupted stack (which may be a small
/// alternate signal stack), so kept small.
const CHUNK: usize = 512;

/// What a walk found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Saved {
    /// No saved context for which `inside` answered `Some(true)`.
    Outside,
    /// A saved context inside.
    Inside,
    /// The stack could not be read, or `inside` answered `None`: the caller
    /// treats it as inside (the answer that is always safe).
    Unknown,
}

/// Walks the signal frames saved on the stack of the handler whose third
/// argument is `uc` (the current signal's own frame is not among them: it
/// lies below the interrupted stack pointer) and asks `inside(pc)` of each
/// saved program counter.
///
/// # Safety
/// `uc` is the third argument of the running `SA_SIGINFO` handler.
///
/// # Signal safety
/// Raw system calls (`/proc/self/maps`, `process_vm_readv`), a stack buffer
/// of under 1.1 KiB, and `inside`, which must be signal-safe.
pub unsafe fn saved_contexts(
    cx: SignalContext,
    uc: *const std::ffi::c_void,
    mut inside: impl FnMut(usize) -> Option<bool>,
) -> Saved {
    // SAFETY: the caller's contract.
    let Some(sp) = (unsafe { arch::interrupted_sp(cx, uc) }) else {
        return Saved::Unknown;
    };
    // SAFETY: as above.
    let restorers = [arch::restorer_address(), unsafe {
        arch::handler_restorer(cx, uc)
    }];
    let Some(end) = maps::mapping_end(cx, sp) else {
        return Saved::Unknown;
    };
    let mut buf = [0u8; CHUNK];
    let mut at = sp & !7;
    while at < end {
        let n = CHUNK.min(end - at);
        let Some(chunk) = buf.get_mut(..n) else {
            return Saved::Unknown;
        };
        if peek::read_memory_raw(cx, at, chunk).is_err() {
            return Saved::Unknown;
        }
        for (i, word) in chunk.chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            if !restorers.contains(&(usize::from_ne_bytes(w))) {
                continue;
            }
            let frame = at + 8 * i;
            let (Some(pc), Some(saved_sp)) = (
                read_word(cx, frame + arch::SIGFRAME_PC),
                read_word(cx, frame + arch::SIGFRAME_SP),
            ) else {
                continue;
            };
            // A real frame saved a stack pointer above itself.
            if saved_sp <= frame {
                continue;
            }
            match inside(pc) {
                Some(false) => {}
                Some(true) => return Saved::Inside,
                None => return Saved::Unknown,
            }
        }
        at += n;
    }
    Saved::Outside
}

/// One word at `addr`, if readable.
///
/// # Signal safety
/// One raw system call.
fn read_word(cx: SignalContext, addr: usize) -> Option<usize> {
    let mut w = [0u8; 8];
    peek::read_memory_raw(cx, addr, &mut w).ok()?;
    Some(usize::from_ne_bytes(w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static OUTER_PC: AtomicUsize = AtomicUsize::new(0);
    static FOUND: AtomicUsize = AtomicUsize::new(0);

    extern "C" fn inner(_: i32, _: *mut libc::siginfo_t, uc: *mut std::ffi::c_void) {
        // SAFETY: the handler's entry.
        let cx = unsafe { SignalContext::new() };
        let want = OUTER_PC.load(Ordering::SeqCst);
        // SAFETY: `uc` is this handler's third argument.
        let r = unsafe { saved_contexts(cx, uc, |pc| Some(pc == want)) };
        FOUND.store(
            match r {
                Saved::Inside => 1,
                Saved::Outside => 2,
                Saved::Unknown => 3,
            },
            Ordering::SeqCst,
        );
    }

    extern "C" fn outer(_: i32, _: *mut libc::siginfo_t, uc: *mut std::ffi::c_void) {
        // SAFETY: the handler's entry.
        let cx = unsafe { SignalContext::new() };
        // SAFETY: `uc` is this handler's third argument.
        let pc = unsafe { arch::interrupted_pc(cx, uc) }.unwrap();
        OUTER_PC.store(pc, Ordering::SeqCst);
        // A second signal while this handler runs: its handler must find
        // the context this one interrupted.
        // SAFETY: raising a signal whose handler is installed.
        unsafe { libc::raise(libc::SIGUSR2) };
    }

    #[test]
    fn a_context_saved_under_a_running_handler_is_found() {
        crate::sys::threads::in_own_process(
            "sys::sigframes::tests::a_context_saved_under_a_running_handler_is_found",
            found_body,
        );
    }

    fn found_body() {
        // SAFETY: installs two handlers for signals this test owns (the
        // test binary uses neither) and raises one on this thread.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_flags = libc::SA_SIGINFO;
            sa.sa_sigaction = inner as *const () as usize;
            libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut());
            sa.sa_sigaction = outer as *const () as usize;
            libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
            libc::raise(libc::SIGUSR1);
        }
        assert_ne!(OUTER_PC.load(Ordering::SeqCst), 0);
        assert_eq!(FOUND.load(Ordering::SeqCst), 1, "1 = Inside");
    }
}
