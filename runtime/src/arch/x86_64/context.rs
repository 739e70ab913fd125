//! The context of a thread interrupted by a signal, as the kernel saved it:
//! the trapped program counter, the stack pointer, the register frame.
//!
//! The portable trap path sees only [`TrapContext`] and its methods; the
//! `ucontext_t`/`mcontext_t` layout and the `REG_*` indices stay here.
//!
//! # Safety
//!
//! [`TrapContext::from_raw`] and [`interrupted_pc`] dereference the third
//! argument of an `SA_SIGINFO` handler, which the kernel passes as a valid
//! `ucontext_t` for the duration of the handler (glibc and musl lay it out
//! as the kernel does on x86_64).
#![allow(unsafe_code)]

use std::ffi::c_void;

use super::regs::{Reg, Regs, USER_FLAGS};
use super::TRAP_INSN;
use crate::sigctx::SignalContext;

/// `mcontext_t.gregs` index of each [`Reg`] (glibc and musl share the layout).
const GREG_OF: [usize; 18] = [
    libc::REG_RAX as usize,
    libc::REG_RBX as usize,
    libc::REG_RCX as usize,
    libc::REG_RDX as usize,
    libc::REG_RSI as usize,
    libc::REG_RDI as usize,
    libc::REG_RBP as usize,
    libc::REG_RSP as usize,
    libc::REG_R8 as usize,
    libc::REG_R9 as usize,
    libc::REG_R10 as usize,
    libc::REG_R11 as usize,
    libc::REG_R12 as usize,
    libc::REG_R13 as usize,
    libc::REG_R14 as usize,
    libc::REG_R15 as usize,
    libc::REG_RIP as usize,
    libc::REG_EFL as usize,
];
const RIP: usize = libc::REG_RIP as usize;
const EFL: usize = libc::REG_EFL as usize;

/// The interrupted thread's saved context, writable: what the thread resumes
/// with when the handler returns.
#[derive(Debug)]
pub struct TrapContext<'a> {
    mc: &'a mut libc::mcontext_t,
}

impl TrapContext<'_> {
    /// The context behind a handler's third argument; `None` if it is null.
    ///
    /// # Safety
    /// `uc` is null or the `ucontext_t` the kernel passed to the running
    /// `SA_SIGINFO` handler, not otherwise borrowed while the result lives.
    ///
    /// # Signal safety
    /// A pointer conversion.
    #[inline(always)]
    pub unsafe fn from_raw<'a>(_cx: SignalContext, uc: *mut c_void) -> Option<TrapContext<'a>> {
        if uc.is_null() {
            return None;
        }
        // SAFETY: the caller's contract.
        let uc = unsafe { &mut *uc.cast::<libc::ucontext_t>() };
        Some(TrapContext {
            mc: &mut uc.uc_mcontext,
        })
    }

    /// The address of the trap instruction that raised this `SIGTRAP`: the
    /// kernel reports the address after the `int3`.
    ///
    /// # Signal safety
    /// Arithmetic on a saved register.
    #[inline(always)]
    pub fn trap_address(&self) -> usize {
        self.pc().wrapping_sub(TRAP_INSN.len())
    }

    /// Whether the exception the kernel last took for the thread was the
    /// trap instruction's (`#BP`, vector 3, in the saved `trapno`): so for a
    /// `SIGSEGV` the kernel forced when it could not push a trap's frame,
    /// not for a fault of the instruction after a 1-byte site (a `#GP`,
    /// vector 13, also `SI_KERNEL` with address 0).
    ///
    /// # Signal safety
    /// A load.
    #[inline(always)]
    pub fn raised_by_trap_instruction(&self) -> bool {
        self.mc.gregs[libc::REG_TRAPNO as usize] == 3
    }

    /// The program counter the thread resumes at.
    ///
    /// # Signal safety
    /// A load.
    #[inline(always)]
    pub fn pc(&self) -> usize {
        self.mc.gregs[RIP] as usize
    }

    /// Sets the program counter the thread resumes at.
    ///
    /// # Signal safety
    /// A store.
    #[inline(always)]
    pub fn set_pc(&mut self, pc: usize) {
        self.mc.gregs[RIP] = pc as i64;
    }

    /// The registers as a handler sees them.
    ///
    /// # Signal safety
    /// Plain copies; no allocation, lock or panic.
    #[inline]
    pub fn regs(&self) -> Regs {
        let mut regs = Regs::default();
        for (i, &g) in GREG_OF.iter().enumerate() {
            regs.set(Reg::ALL[i], self.mc.gregs[g] as u64);
        }
        regs
    }

    /// Writes `regs` back; the kernel restores them on `sigreturn`. Of RFLAGS
    /// only the status flags and DF are taken (as on the fast path): the
    /// system flags (TF, IF, AC, …) are not a handler's to change.
    ///
    /// # Signal safety
    /// Plain copies; no allocation, lock or panic.
    #[inline]
    pub fn set_regs(&mut self, regs: &Regs) {
        let flags = self.mc.gregs[EFL] as u64;
        for (i, &g) in GREG_OF.iter().enumerate() {
            self.mc.gregs[g] = regs.get(Reg::ALL[i]) as i64;
        }
        self.mc.gregs[EFL] = ((flags & !USER_FLAGS) | (regs.rflags & USER_FLAGS)) as i64;
    }
}

/// The interrupted stack pointer from a handler's third argument, read only.
///
/// # Safety
/// `uc` is null or the third argument of a running `SA_SIGINFO` handler.
///
/// # Signal safety
/// Reads the context only.
#[inline]
pub unsafe fn interrupted_sp(_cx: SignalContext, uc: *const c_void) -> Option<usize> {
    if uc.is_null() {
        return None;
    }
    // SAFETY: the caller passes the kernel's ucontext.
    let uc = unsafe { &*uc.cast::<libc::ucontext_t>() };
    Some(uc.uc_mcontext.gregs[libc::REG_RSP as usize] as usize)
}

/// The signal return trampoline the running handler returns through: the
/// word just below its `ucontext` in the kernel's `rt_sigframe` (`pretcode`,
/// the handler's return address). libc's (`__restore_rt`) for a handler
/// installed through libc.
///
/// # Safety
/// `uc` is the third argument of a running `SA_SIGINFO` handler.
///
/// # Signal safety
/// One load from the handler's own signal frame.
#[inline]
pub unsafe fn handler_restorer(_cx: SignalContext, uc: *const c_void) -> usize {
    // SAFETY: `uc` points into the rt_sigframe the kernel built, which starts
    // with `pretcode` immediately before the ucontext.
    unsafe { *(uc as *const usize).sub(1) }
}

/// Where a saved context's program counter and stack pointer lie in a
/// signal frame, counted in bytes from the frame's first word (`pretcode`,
/// the address of the signal return trampoline).
pub const SIGFRAME_PC: usize =
    8 + std::mem::offset_of!(libc::ucontext_t, uc_mcontext) + 8 * libc::REG_RIP as usize;
/// See [`SIGFRAME_PC`].
pub const SIGFRAME_SP: usize =
    8 + std::mem::offset_of!(libc::ucontext_t, uc_mcontext) + 8 * libc::REG_RSP as usize;

/// The interrupted program counter from a handler's third argument, read
/// only (for the thread scan's handler).
///
/// # Safety
/// `uc` is null or the third argument of a running `SA_SIGINFO` handler.
///
/// # Signal safety
/// Reads the context only.
#[inline]
pub unsafe fn interrupted_pc(_cx: SignalContext, uc: *const c_void) -> Option<usize> {
    if uc.is_null() {
        return None;
    }
    // SAFETY: the caller passes the kernel's ucontext.
    let uc = unsafe { &*uc.cast::<libc::ucontext_t>() };
    Some(uc.uc_mcontext.gregs[RIP] as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx() -> SignalContext {
        // SAFETY: the tests call only signal-safe functions with it.
        unsafe { SignalContext::new() }
    }

    #[test]
    fn registers_round_trip_and_system_flags_stay() {
        // SAFETY: ucontext_t is plain data; all-zero is valid.
        let mut uc: libc::ucontext_t = unsafe { std::mem::zeroed() };
        uc.uc_mcontext.gregs[EFL] = 0x202 | 0x100; // IF and TF set
        let p = (&mut uc as *mut libc::ucontext_t).cast::<c_void>();
        // SAFETY: a live ucontext, borrowed only through the context.
        let mut ctx = unsafe { TrapContext::from_raw(cx(), p) }.unwrap();
        let mut r = ctx.regs();
        for (i, reg) in Reg::ALL.iter().enumerate().take(16) {
            r.set(*reg, 0x1000 + i as u64);
        }
        r.rip = 0x40_1001;
        r.rflags = 0x1 | 0x40 | 0x400; // CF ZF DF, no IF, no TF
        ctx.set_regs(&r);
        assert_eq!(ctx.pc(), 0x40_1001);
        assert_eq!(ctx.trap_address(), 0x40_1000);
        let back = ctx.regs();
        assert_eq!(back.gpr, r.gpr);
        assert_eq!(back.rflags, 0x1 | 0x40 | 0x400 | 0x202 | 0x100);
        ctx.set_pc(7);
        // SAFETY: as above.
        assert_eq!(unsafe { interrupted_pc(cx(), p) }, Some(7));
        // SAFETY: null is allowed.
        assert!(unsafe { TrapContext::from_raw(cx(), std::ptr::null_mut()) }.is_none());
    }
}
