//! `probert_regs`: the registers of the thread that hit a probe.
//!
//! `probert_regs` is opaque in C; it is the runtime's `Regs`, reached only
//! through the `probert_hit` a handler receives and valid only during that
//! handler call. These functions are the ones a handler calls, so they are
//! async-signal-safe: bounded reads and writes, no allocation, lock or panic.
//!
//! # Safety
//!
//! A non-NULL `probert_regs *` is, by the C contract, the `regs` field of a
//! `probert_hit` passed to a handler that is still running, i.e. a live
//! `core_rt::Regs` that only this thread uses during the call. The casts
//! between the two pointer types rely on that.
#![allow(unsafe_code)]

use std::ffi::c_uint;

use core_rt::{Reg, Regs};

use crate::from_c;
use crate::status::probert_status;

/// A register, numbered as the runtime's `Reg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum probert_reg {
    PROBERT_REG_RAX = 0,
    PROBERT_REG_RBX,
    PROBERT_REG_RCX,
    PROBERT_REG_RDX,
    PROBERT_REG_RSI,
    PROBERT_REG_RDI,
    PROBERT_REG_RBP,
    PROBERT_REG_RSP,
    PROBERT_REG_R8,
    PROBERT_REG_R9,
    PROBERT_REG_R10,
    PROBERT_REG_R11,
    PROBERT_REG_R12,
    PROBERT_REG_R13,
    PROBERT_REG_R14,
    PROBERT_REG_R15,
    PROBERT_REG_RIP,
    PROBERT_REG_RFLAGS,
}

/// The registers of the thread that hit a probe (opaque; the runtime's
/// `Regs`). Valid only during the handler call that received it.
#[derive(Debug)]
pub struct probert_regs {
    _opaque: [u8; 0],
}

/// The runtime's registers behind a C pointer.
fn regs<'a>(p: *const probert_regs) -> &'a Regs {
    // SAFETY: the caller checked `p` is not NULL; see the module's Safety.
    unsafe { &*p.cast::<Regs>() }
}

/// Returns the value of register `reg` at the probed instruction (as modified
/// by earlier `probert_regs_set` calls of this hit). PROBERT_REG_RIP reads
/// the probed address on every path.
///
/// `regs` must be the `regs` of the `probert_hit` of a running handler.
/// Returns 0 if `regs` is NULL or `reg` is not a `probert_reg` (0 is also a
/// valid register value: pass valid arguments).
///
/// Errors: none (see above). Blocks: no. From a handler: yes
/// (async-signal-safe). Thread safety: only on the thread running the handler
/// that received `regs`.
#[no_mangle]
pub extern "C" fn probert_regs_get(regs: *const probert_regs, reg: from_c::probert_reg) -> u64 {
    ffi_panic_boundary! {
        not_null!(regs);
        match Reg::from_index(reg) {
            Some(r) => self::regs(regs).get(r),
            None => 0,
        }
    }
}

/// Sets register `reg` to `value`; the thread resumes with it when the hit
/// resumes (after every consumer of the probe has run). Writing
/// PROBERT_REG_RIP redirects the thread: it resumes at `value` and the
/// probed instruction is not executed.
///
/// `regs` must be the `regs` of the `probert_hit` of a running handler.
///
/// Errors: PROBERT_ERR_INVALID_ARGUMENT (`regs` NULL, `reg` not a
/// `probert_reg`). Blocks: no. From a handler: yes (async-signal-safe).
/// Thread safety: only on the thread running the handler that received
/// `regs`.
#[no_mangle]
pub extern "C" fn probert_regs_set(
    regs: *mut probert_regs,
    reg: from_c::probert_reg,
    value: u64,
) -> probert_status {
    ffi_panic_boundary! {
        not_null!(regs);
        let Some(reg) = Reg::from_index(reg) else {
            return probert_status::PROBERT_ERR_INVALID_ARGUMENT;
        };
        // SAFETY: not NULL; a live `Regs` used only by this thread during the
        // handler call (module Safety), so a unique borrow for this statement.
        unsafe { &mut *regs.cast::<Regs>() }.set(reg, value);
        probert_status::PROBERT_OK
    }
}

/// Returns the System V integer argument `n` (0 to 5: rdi, rsi, rdx, rcx, r8,
/// r9) — meaningful at a function's first instruction. Returns 0 if `regs` is
/// NULL or `n` > 5 (later arguments are on the stack: read them through
/// PROBERT_REG_RSP).
///
/// Errors: none (see above). Blocks: no. From a handler: yes
/// (async-signal-safe). Thread safety: only on the thread running the handler
/// that received `regs`.
#[no_mangle]
pub extern "C" fn probert_regs_arg(regs: *const probert_regs, n: c_uint) -> u64 {
    ffi_panic_boundary! {
        not_null!(regs);
        self::regs(regs).arg(n as usize).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reg_numbers_are_the_runtimes() {
        for (i, r) in Reg::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        assert_eq!(probert_reg::PROBERT_REG_RFLAGS as u32, 17);
        assert_eq!(
            Reg::from_index(probert_reg::PROBERT_REG_RIP as u32),
            Some(Reg::Rip)
        );
        assert_eq!(
            Reg::from_index(probert_reg::PROBERT_REG_RFLAGS as u32 + 1),
            None
        );
    }

    #[test]
    fn get_set_arg_and_bad_input() {
        let mut r = Regs::default();
        let p = (&mut r as *mut Regs).cast::<probert_regs>();
        assert_eq!(
            probert_regs_set(p, probert_reg::PROBERT_REG_RDI as u32, 7),
            probert_status::PROBERT_OK
        );
        assert_eq!(probert_regs_get(p, probert_reg::PROBERT_REG_RDI as u32), 7);
        assert_eq!(probert_regs_arg(p, 0), 7);
        assert_eq!(probert_regs_arg(p, 6), 0);
        assert_eq!(probert_regs_get(p, 18), 0);
        assert_eq!(
            probert_regs_set(p, 18, 1),
            probert_status::PROBERT_ERR_INVALID_ARGUMENT
        );
        assert_eq!(probert_regs_get(std::ptr::null(), 0), 0);
        assert_eq!(probert_regs_arg(std::ptr::null(), 0), 0);
        assert_eq!(
            probert_regs_set(std::ptr::null_mut(), 0, 1),
            probert_status::PROBERT_ERR_INVALID_ARGUMENT
        );
    }
}
