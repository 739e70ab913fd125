//! Emulation in the handler: the trap path applies a displaced `call`,
//! `jmp`, `jcc`, `loop`, `push`, `ret` or NOP to the interrupted thread's
//! registers instead of executing it.
//!
//! # Safety
//! [`emulate`] reads and writes the interrupted thread's memory at the
//! addresses the displaced instruction itself would have accessed — its
//! stack slot for `call`/`push`/`ret`, its memory operand for `call [mem]` /
//! `jmp [mem]` — and nothing else. A bad address faults exactly as the
//! original instruction would have (with the handler's `rip`).
#![allow(unsafe_code)]

use super::insn::{LoopKind, Target};
use super::{Displaced, Reg, Regs};
use crate::sigctx::SignalContext;

/// RFLAGS bits that condition codes read.
const CF: u64 = 1 << 0;
const PF: u64 = 1 << 2;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const OF: u64 = 1 << 11;

/// Applies `d` (the instruction of length `len` at `addr`) to `regs`.
///
/// Returns `true` if the instruction was emulated: `regs` (and, for `call`
/// and `push`, the stack) now hold its effect and `regs.rip` where execution
/// continues. Returns `false`, leaving `regs` and memory untouched, for
/// [`Displaced::OutOfLine`] (the caller runs its stub) and for values
/// [`analyze`](super::analyze) never produces (`Rip` or `Rflags` as an
/// operand register).
///
/// Stack writes land below the interrupted `rsp`, in the red zone; the
/// kernel places the signal frame below the red zone, so they never hit the
/// handler's own frame.
///
/// # Signal safety
/// Register arithmetic plus at most one 8-byte load and one 8-byte store
/// through raw pointers; no allocation, lock, formatting or panic (wrapping
/// arithmetic only, no slice indexing).
pub fn emulate(_cx: SignalContext, d: &Displaced, addr: u64, len: u8, regs: &mut Regs) -> bool {
    let next = addr.wrapping_add(u64::from(len));
    match *d {
        Displaced::Skip => regs.rip = next,
        Displaced::Call(target) => {
            // The operand is evaluated before rsp moves: `call rsp` and
            // `call [rsp + 8]` see the old rsp.
            let Some(to) = branch_target(&target, regs) else {
                return false;
            };
            let sp = regs.get(Reg::Rsp).wrapping_sub(8);
            // SAFETY: `call` itself would have stored its return address at
            // the new rsp; a bad stack faults as the original would.
            unsafe { store_u64(sp, next) };
            regs.set(Reg::Rsp, sp);
            regs.rip = to;
        }
        Displaced::Jmp(target) => {
            let Some(to) = branch_target(&target, regs) else {
                return false;
            };
            regs.rip = to;
        }
        Displaced::Jcc { cond, target } => {
            regs.rip = if cond_holds(cond.0, regs.rflags) {
                target
            } else {
                next
            };
        }
        Displaced::Loop { kind, target } => {
            let zf = regs.rflags & ZF != 0;
            let rcx = regs.get(Reg::Rcx);
            // `loop*` decrements rcx (without touching flags) before testing
            // it; `jrcxz` only tests it.
            let taken = match kind {
                LoopKind::Jrcxz => rcx == 0,
                LoopKind::Loop | LoopKind::Loope | LoopKind::Loopne => {
                    let rcx = rcx.wrapping_sub(1);
                    regs.set(Reg::Rcx, rcx);
                    rcx != 0
                        && match kind {
                            LoopKind::Loope => zf,
                            LoopKind::Loopne => !zf,
                            _ => true,
                        }
                }
            };
            regs.rip = if taken { target } else { next };
        }
        Displaced::Push(reg) => {
            if matches!(reg, Reg::Rip | Reg::Rflags) {
                return false;
            }
            // Read before rsp moves: `push rsp` pushes the old rsp.
            let value = regs.get(reg);
            let sp = regs.get(Reg::Rsp).wrapping_sub(8);
            // SAFETY: `push` itself would have stored there.
            unsafe { store_u64(sp, value) };
            regs.set(Reg::Rsp, sp);
            regs.rip = next;
        }
        Displaced::Ret { pop } => {
            let sp = regs.get(Reg::Rsp);
            // SAFETY: `ret` itself would have loaded its target from there.
            regs.rip = unsafe { load_u64(sp) };
            regs.set(Reg::Rsp, sp.wrapping_add(8).wrapping_add(u64::from(pop)));
        }
        Displaced::OutOfLine => return false,
    }
    true
}

/// Whether the `jcc` condition `cond` (opcode nibble) holds under `rflags`.
/// Odd conditions are the negations of the even ones before them.
fn cond_holds(cond: u8, rflags: u64) -> bool {
    let set = |bit: u64| rflags & bit != 0;
    let base = match (cond >> 1) & 7 {
        0 => set(OF),
        1 => set(CF),
        2 => set(ZF),
        3 => set(CF) || set(ZF),
        4 => set(SF),
        5 => set(PF),
        6 => set(SF) != set(OF),
        _ => set(ZF) || set(SF) != set(OF),
    };
    base != (cond & 1 != 0)
}

/// The address a `call` or `jmp` goes to; `None` for a register operand
/// `analyze` never produces.
///
/// # Signal safety
/// At most one load; no allocation, lock or panic.
fn branch_target(target: &Target, regs: &Regs) -> Option<u64> {
    let gpr = |r: Reg| match r {
        Reg::Rip | Reg::Rflags => None,
        r => Some(regs.get(r)),
    };
    Some(match *target {
        Target::Abs(a) => a,
        Target::Reg(r) => gpr(r)?,
        Target::Mem(m) => {
            let base = match m.base {
                Some(r) => gpr(r)?,
                None => 0,
            };
            let index = match m.index {
                Some(r) => gpr(r)?.wrapping_mul(u64::from(m.scale)),
                None => 0,
            };
            let ea = base.wrapping_add(index).wrapping_add(m.disp as u64);
            // SAFETY: the original instruction would have read the same
            // 8 bytes to find its target.
            unsafe { load_u64(ea) }
        }
    })
}

/// Loads 8 bytes from `addr`, which need not be aligned (neither does an x86
/// memory operand).
///
/// # Safety
/// `addr..addr + 8` must be readable, or reading it must fault the way the
/// emulated instruction would have.
///
/// # Signal safety
/// Plain loads; no allocation, lock or panic.
unsafe fn load_u64(addr: u64) -> u64 {
    let p = addr as usize as *const u64;
    if p.is_aligned() {
        // SAFETY: aligned, and readable per the caller's contract.
        return unsafe { core::ptr::read_volatile(p) };
    }
    let mut b = [0u8; 8];
    for (i, slot) in b.iter_mut().enumerate() {
        // SAFETY: byte `i` of the readable range; a byte is always aligned.
        *slot = unsafe { core::ptr::read_volatile((addr as usize).wrapping_add(i) as *const u8) };
    }
    u64::from_le_bytes(b)
}

/// Stores 8 bytes at `addr`, which need not be aligned.
///
/// # Safety
/// `addr..addr + 8` must be writable memory the interrupted thread owns (its
/// stack below `rsp`), or writing it must fault the way the emulated
/// instruction would have.
///
/// # Signal safety
/// Plain stores; no allocation, lock or panic.
unsafe fn store_u64(addr: u64, value: u64) {
    let p = addr as usize as *mut u64;
    if p.is_aligned() {
        // SAFETY: aligned, and writable per the caller's contract.
        unsafe { core::ptr::write_volatile(p, value) };
        return;
    }
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        // SAFETY: byte `i` of the writable range; a byte is always aligned.
        unsafe { core::ptr::write_volatile((addr as usize).wrapping_add(i) as *mut u8, byte) };
    }
}

#[cfg(test)]
mod tests {
    use super::super::insn::{Cond, MemOperand};
    use super::*;

    const ADDR: u64 = 0x40_1000;

    fn cx() -> SignalContext {
        // SAFETY: a test stands in for the handler entry; `emulate` only
        // needs the token to exist.
        unsafe { SignalContext::new() }
    }

    /// Registers with rsp pointing at `stack[4]`, so pushes land in `stack`.
    fn regs_on(stack: &mut [u64; 8]) -> Regs {
        let mut r = Regs::default();
        for (i, g) in r.gpr.iter_mut().enumerate() {
            *g = 0x1000 + i as u64;
        }
        r.set(Reg::Rsp, &mut stack[4] as *mut u64 as u64);
        r.rip = ADDR;
        r
    }

    fn run(d: Displaced, len: u8, regs: &mut Regs) -> bool {
        emulate(cx(), &d, ADDR, len, regs)
    }

    #[test]
    fn skip() {
        let mut stack = [0; 8];
        let mut r = regs_on(&mut stack);
        let before = r;
        assert!(run(Displaced::Skip, 4, &mut r));
        assert_eq!(
            r,
            Regs {
                rip: ADDR + 4,
                ..before
            }
        );
    }

    #[test]
    fn call_abs_reg_and_mem() {
        let mut stack = [0; 8];
        let mut r = regs_on(&mut stack);
        let sp = r.get(Reg::Rsp);
        assert!(run(Displaced::Call(Target::Abs(0x5000)), 5, &mut r));
        assert_eq!((r.rip, r.get(Reg::Rsp)), (0x5000, sp - 8));
        assert_eq!(stack[3], ADDR + 5);

        let mut r = regs_on(&mut stack);
        r.set(Reg::R11, 0x6000);
        assert!(run(Displaced::Call(Target::Reg(Reg::R11)), 3, &mut r));
        assert_eq!((r.rip, r.get(Reg::Rsp)), (0x6000, sp - 8));
        assert_eq!(stack[3], ADDR + 3);

        // call [rbx + rcx*8 - 8] with a table in test memory.
        let table = [0x7000u64, 0x7100, 0x7200];
        let mut r = regs_on(&mut stack);
        r.set(Reg::Rbx, table.as_ptr() as u64);
        r.set(Reg::Rcx, 2);
        let m = MemOperand {
            base: Some(Reg::Rbx),
            index: Some(Reg::Rcx),
            scale: 8,
            disp: -8,
        };
        assert!(run(Displaced::Call(Target::Mem(m)), 4, &mut r));
        assert_eq!(r.rip, 0x7100);
        assert_eq!(stack[3], ADDR + 4);

        // An absolute (resolved RIP-relative) slot.
        let m = MemOperand {
            base: None,
            index: None,
            scale: 1,
            disp: &table[2] as *const u64 as i64,
        };
        let mut r = regs_on(&mut stack);
        assert!(run(Displaced::Call(Target::Mem(m)), 6, &mut r));
        assert_eq!(r.rip, 0x7200);
    }

    #[test]
    fn call_through_rsp_uses_the_old_rsp() {
        let mut stack = [0, 0, 0, 0, 0x8000, 0x8800, 0, 0];
        let mut r = regs_on(&mut stack);
        let sp = r.get(Reg::Rsp);
        // call [rsp + 8]: reads stack[5], before the push.
        let m = MemOperand {
            base: Some(Reg::Rsp),
            index: None,
            scale: 1,
            disp: 8,
        };
        assert!(run(Displaced::Call(Target::Mem(m)), 4, &mut r));
        assert_eq!(r.rip, 0x8800);
        assert_eq!(stack[3], ADDR + 4);
        // call rsp: goes to the old rsp.
        let mut r = regs_on(&mut stack);
        assert!(run(Displaced::Call(Target::Reg(Reg::Rsp)), 2, &mut r));
        assert_eq!((r.rip, r.get(Reg::Rsp)), (sp, sp - 8));
    }

    #[test]
    fn unaligned_memory_operand() {
        let mut bytes = [0u8; 16];
        bytes[3..11].copy_from_slice(&0x1234_5678_9abc_def0u64.to_le_bytes());
        let mut stack = [0; 8];
        let mut r = regs_on(&mut stack);
        r.set(Reg::Rax, bytes.as_ptr() as u64);
        let m = MemOperand {
            base: Some(Reg::Rax),
            index: None,
            scale: 1,
            disp: 3,
        };
        assert!(run(Displaced::Jmp(Target::Mem(m)), 3, &mut r));
        assert_eq!(r.rip, 0x1234_5678_9abc_def0);
    }

    #[test]
    fn jmp() {
        let mut stack = [7; 8];
        let mut r = regs_on(&mut stack);
        let before = r;
        assert!(run(Displaced::Jmp(Target::Abs(0x9000)), 2, &mut r));
        assert_eq!(
            r,
            Regs {
                rip: 0x9000,
                ..before
            }
        );
        assert!(run(Displaced::Jmp(Target::Reg(Reg::R15)), 3, &mut r));
        assert_eq!(r.rip, before.get(Reg::R15));
        assert_eq!(stack, [7; 8]);
    }

    #[test]
    fn jcc_taken_and_not_taken() {
        let mut stack = [0; 8];
        let mut r = regs_on(&mut stack);
        // je (74 xx / 0f 84 rel32).
        let je = Displaced::Jcc {
            cond: Cond(4),
            target: 0xa000,
        };
        r.rflags = ZF;
        assert!(run(je, 2, &mut r));
        assert_eq!(r.rip, 0xa000);
        r.rflags = 0;
        assert!(run(je, 6, &mut r));
        assert_eq!(r.rip, ADDR + 6);
    }

    #[test]
    fn every_condition() {
        // (nibble, flags that make it true, flags that make it false)
        let cases: [(u8, u64, u64); 16] = [
            (0x0, OF, 0),
            (0x1, 0, OF),
            (0x2, CF, 0),
            (0x3, 0, CF),
            (0x4, ZF, 0),
            (0x5, 0, ZF),
            (0x6, ZF, 0),
            (0x7, 0, CF),
            (0x8, SF, 0),
            (0x9, 0, SF),
            (0xA, PF, 0),
            (0xB, 0, PF),
            (0xC, SF, SF | OF),
            (0xD, SF | OF, OF),
            (0xE, ZF | SF | OF, SF | OF),
            (0xF, SF | OF, ZF),
        ];
        for (cc, yes, no) in cases {
            assert!(cond_holds(cc, yes | 0x202), "{cc:x} with {yes:#x}");
            assert!(!cond_holds(cc, no | 0x202), "{cc:x} with {no:#x}");
        }
        assert!(cond_holds(0x6, CF) && !cond_holds(0x7, ZF));
        assert!(cond_holds(0xC, OF) && cond_holds(0xE, SF) && !cond_holds(0xF, SF));
    }

    #[test]
    fn loops() {
        let mut stack = [0; 8];
        let t = 0xb000;
        let cases = [
            // (kind, rcx, zf, taken, rcx after)
            (LoopKind::Loop, 2, false, true, 1),
            (LoopKind::Loop, 1, false, false, 0),
            (LoopKind::Loop, 0, false, true, u64::MAX),
            (LoopKind::Loope, 2, true, true, 1),
            (LoopKind::Loope, 2, false, false, 1),
            (LoopKind::Loope, 1, true, false, 0),
            (LoopKind::Loopne, 2, false, true, 1),
            (LoopKind::Loopne, 2, true, false, 1),
            (LoopKind::Jrcxz, 0, false, true, 0),
            (LoopKind::Jrcxz, 1, true, false, 1),
        ];
        for (kind, rcx, zf, taken, after) in cases {
            let mut r = regs_on(&mut stack);
            r.set(Reg::Rcx, rcx);
            r.rflags = if zf { ZF } else { 0 };
            assert!(run(Displaced::Loop { kind, target: t }, 2, &mut r));
            assert_eq!(r.rip, if taken { t } else { ADDR + 2 }, "{kind:?} {rcx}");
            assert_eq!(r.get(Reg::Rcx), after, "{kind:?} {rcx}");
            assert_eq!(r.rflags, if zf { ZF } else { 0 });
        }
    }

    #[test]
    fn push() {
        let mut stack = [0; 8];
        let mut r = regs_on(&mut stack);
        let sp = r.get(Reg::Rsp);
        assert!(run(Displaced::Push(Reg::Rbp), 1, &mut r));
        assert!(run(Displaced::Push(Reg::R15), 2, &mut r));
        // push rsp pushes the value before the push.
        assert!(run(Displaced::Push(Reg::Rsp), 1, &mut r));
        assert_eq!(r.get(Reg::Rsp), sp - 24);
        assert_eq!(r.rip, ADDR + 1);
        assert_eq!(stack[1..4], [sp - 16, 0x100f, 0x1006]);
        let before = r;
        assert!(!run(Displaced::Push(Reg::Rip), 1, &mut r));
        assert_eq!(r, before);
    }

    #[test]
    fn ret() {
        let mut stack = [0, 0, 0, 0, 0xc000, 1, 2, 3];
        let mut r = regs_on(&mut stack);
        let sp = r.get(Reg::Rsp);
        assert!(run(Displaced::Ret { pop: 0 }, 1, &mut r));
        assert_eq!((r.rip, r.get(Reg::Rsp)), (0xc000, sp + 8));
        let mut r = regs_on(&mut stack);
        assert!(run(Displaced::Ret { pop: 16 }, 3, &mut r));
        assert_eq!((r.rip, r.get(Reg::Rsp)), (0xc000, sp + 24));
    }

    #[test]
    fn out_of_line_is_not_emulated() {
        let mut stack = [0; 8];
        let mut r = regs_on(&mut stack);
        let before = r;
        assert!(!run(Displaced::OutOfLine, 7, &mut r));
        assert!(!run(Displaced::Call(Target::Reg(Reg::Rflags)), 2, &mut r));
        assert_eq!(r, before);
        assert_eq!(stack, [0; 8]);
    }

    #[test]
    fn analyzed_then_emulated() {
        // End to end: the bytes of `call rel32`, `jmp rel8` and `push r15`.
        let mut stack = [0; 8];
        let a = ADDR as usize;
        for (code, rip) in [
            (&[0xe8, 0x00, 0x01, 0x00, 0x00][..], ADDR + 5 + 0x100),
            (&[0xeb, 0xfe], ADDR),
            (&[0x41, 0x57], ADDR + 2),
        ] {
            let d = crate::arch::analyze(code, a).unwrap();
            let d2 = Displaced::decode(d.displaced.encode()).unwrap();
            let mut r = regs_on(&mut stack);
            assert!(emulate(cx(), &d2, ADDR, d.len, &mut r));
            assert_eq!(r.rip, rip, "{code:02x?}");
        }
    }
}
