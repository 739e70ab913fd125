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
//! signal return trampoline the handler returns through, with a plausible
//! saved stack pointer (above the frame). The trampolines recognised are
//! probert's own, the one the scan's own handler returns through (libc's
//! `__restore_rt` for handlers installed through libc, as nearly every
//! handler is), and those [`crate::sys::signal`] learned: the trampoline of
//! every foreign `SIGTRAP` handler seen chaining to probert's (it returns
//! into the stub probert's handler chose, through its own trampoline), and
//! of a host handler declared to chain. A handler of some other signal,
//! installed with the raw system call and a trampoline of its own (a
//! language runtime's), is not recognised: its frames are not seen.
//!
//! A thread stopped *in* a trampoline has already popped the frame's first
//! word: [`in_restorer`] recognises it by its program counter and reads the
//! context it is about to resume from its stack pointer.
//!
//! The walk reads up to the end of the stack's mapping, from
//! `/proc/self/maps`. Where that cannot be opened (the descriptor limit, no
//! procfs) it reads until the first unreadable 512-byte block (the end of
//! the mapping, or a guard page), at most [`WALK_WITHOUT_MAPS`] bytes; a
//! stack still readable there is [`Saved::Unknown`].
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
use crate::sys::{maps, peek, signal};

/// Bytes read per step: on the interrupted stack (which may be a small
/// alternate signal stack), so kept small. A power of two dividing the page
/// size, so that a block is either wholly readable or not.
const CHUNK: usize = 512;

/// Longest walk when the stack's mapping is unknown (see the module docs).
pub const WALK_WITHOUT_MAPS: usize = 256 * 1024;

/// Bytes of a signal return trampoline: `mov rax, 15; syscall`, the
/// sequence every libc and runtime uses (unwinders recognise it).
const RESTORER_LEN: usize = 9;

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

/// The trampolines a frame may start with: probert's, `current` (the one
/// the running handler returns through, or 0), and the learned ones.
///
/// # Signal safety
/// Atomic loads into a stack array.
fn restorers(cx: SignalContext, current: usize) -> [usize; 2 + signal::MAX_RESTORERS] {
    let mut all = [0usize; 2 + signal::MAX_RESTORERS];
    all[0] = arch::restorer_address();
    all[1] = current;
    for (slot, r) in all[2..].iter_mut().zip(signal::learned_restorers(cx)) {
        *slot = r;
    }
    all
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
    inside: impl FnMut(usize) -> Option<bool>,
) -> Saved {
    // SAFETY: the caller's contract.
    let Some(sp) = (unsafe { arch::interrupted_sp(cx, uc) }) else {
        return Saved::Unknown;
    };
    // SAFETY: as above.
    let current = unsafe { arch::handler_restorer(cx, uc) };
    walk(cx, sp, &restorers(cx, current), inside)
}

/// [`saved_contexts`] for a thread stopped at stack pointer `sp` (read from
/// procfs by another thread while it sleeps in the kernel), with the
/// trampoline of the scan's handler `scan_restorer`. Normal context.
pub fn saved_contexts_at(
    sp: usize,
    scan_restorer: usize,
    inside: impl FnMut(usize) -> Option<bool>,
) -> Saved {
    // SAFETY: normal context may call signal-safe functions; the token only
    // records that everything below is signal-safe.
    let cx = unsafe { SignalContext::new() };
    walk(cx, sp, &restorers(cx, scan_restorer), inside)
}

/// If `pc` lies in one of the known trampolines, the thread has popped its
/// frame's first word and is about to resume the context saved at `sp`:
/// `Some(inside(saved pc))` (`Some(None)` if it cannot be read); `None` if
/// `pc` is in no trampoline.
///
/// # Signal safety
/// Atomic loads, raw `process_vm_readv`, and `inside`.
pub fn in_restorer(
    cx: SignalContext,
    pc: usize,
    sp: usize,
    current: usize,
    mut inside: impl FnMut(usize) -> Option<bool>,
) -> Option<Option<bool>> {
    let known = restorers(cx, current);
    known
        .iter()
        .any(|&r| r != 0 && (r..r + RESTORER_LEN).contains(&pc))
        .then(|| {
            let frame = sp.wrapping_sub(8);
            read_word(cx, frame.wrapping_add(arch::SIGFRAME_PC))
                .and_then(|pc| resumes_inside(pc, &mut inside))
        })
}

/// Whether a thread resuming the context saved with program counter `pc`
/// may run inside: at `pc`, or at the trap instruction just before it. A
/// `SIGTRAP` frame its handler has not looked up yet holds the address after
/// the trap, and resumes at the trap itself if the probe there is gone by
/// then (the original instruction runs in place).
///
/// # Signal safety
/// Arithmetic, and `inside`.
fn resumes_inside(pc: usize, inside: &mut impl FnMut(usize) -> Option<bool>) -> Option<bool> {
    match inside(pc)? {
        true => Some(true),
        false => inside(pc.wrapping_sub(arch::TRAP_INSN.len())),
    }
}

/// The walk of [`saved_contexts`] from `sp`, recognising frames by
/// `restorers` (zeros are ignored).
///
/// # Signal safety
/// As [`saved_contexts`].
fn walk(
    cx: SignalContext,
    sp: usize,
    restorers: &[usize],
    mut inside: impl FnMut(usize) -> Option<bool>,
) -> Saved {
    let known_end = maps::mapping_end(cx, sp);
    let end = known_end.unwrap_or(sp.saturating_add(WALK_WITHOUT_MAPS));
    let mut buf = [0u8; CHUNK];
    let mut at = sp & !7;
    while at < end {
        // Without a known end, stop at block boundaries (see `CHUNK`).
        let n = if known_end.is_some() {
            CHUNK.min(end - at)
        } else {
            (CHUNK - at % CHUNK).min(end - at)
        };
        let Some(chunk) = buf.get_mut(..n) else {
            return Saved::Unknown;
        };
        if peek::read_memory_raw(cx, at, chunk).is_err() {
            // Past the end of the mapping (when it is unknown), or a stack
            // that cannot be read.
            return if known_end.is_none() && at > sp & !7 {
                Saved::Outside
            } else {
                Saved::Unknown
            };
        }
        for (i, word) in chunk.chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            let w = usize::from_ne_bytes(w);
            if w == 0 || !restorers.contains(&w) {
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
            match resumes_inside(pc, &mut inside) {
                Some(false) => {}
                Some(true) => return Saved::Inside,
                None => return Saved::Unknown,
            }
        }
        at += n;
    }
    if known_end.is_some() {
        Saved::Outside
    } else {
        // Still readable at the cap: the stack may go on.
        Saved::Unknown
    }
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
    /// The inner handler looks for the saved pc minus this.
    static BACK: AtomicUsize = AtomicUsize::new(0);

    extern "C" fn inner(_: i32, _: *mut libc::siginfo_t, uc: *mut std::ffi::c_void) {
        // SAFETY: the handler's entry.
        let cx = unsafe { SignalContext::new() };
        let want = OUTER_PC.load(Ordering::SeqCst) - BACK.load(Ordering::SeqCst);
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

    #[test]
    fn a_context_counts_at_the_trap_instruction_before_its_pc() {
        // A SIGTRAP frame not looked up yet resumes at its trap instruction
        // if the probe there is gone.
        crate::sys::threads::in_own_process(
            "sys::sigframes::tests::a_context_counts_at_the_trap_instruction_before_its_pc",
            || {
                BACK.store(arch::TRAP_INSN.len(), Ordering::SeqCst);
                found_body();
            },
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
