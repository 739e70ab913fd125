//! Emulation in the handler: the trap path applies a displaced `call`,
//! `jmp`, `jcc`, `loop`, `push`, `ret` or NOP to the interrupted thread's
//! registers instead of executing it.
//!
//! # Safety
//! [`emulate`] reads and writes the interrupted thread's memory at the
//! addresses the displaced instruction itself would have accessed — its
//! stack slot for `call`/`push`/`ret`, its memory operand for `call [mem]` /
//! `jmp [mem]` — and nothing else, through two accessors in assembly. A bad
//! address faults there; probert's fault handler recognises the accessor's
//! address and makes it return the fault ([`recover_emulator_fault`]), which
//! the trap path then delivers to the host as the original instruction's.
#![allow(unsafe_code)]

use super::insn::{LoopKind, Target};
use super::{Displaced, Reg, Regs};
use crate::sigctx::SignalContext;
use crate::sys::peek;

/// RFLAGS bits that condition codes read.
const CF: u64 = 1 << 0;
const PF: u64 = 1 << 2;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const OF: u64 = 1 << 11;

/// Applies `d` (the instruction of length `len` at `addr`) to `regs`.
///
/// Returns [`Emulated::Done`] if the instruction was emulated: `regs`
/// (and, for `call` and `push`, the stack) now hold its effect and
/// `regs.rip` where execution continues. Returns [`Emulated::Refused`],
/// leaving `regs` and memory untouched, for [`Displaced::OutOfLine`] (the
/// caller runs its stub) and for values [`analyze`](super::analyze) never
/// produces (`Rip` or `Rflags` as an operand register). Returns
/// [`Emulated::Faulted`], leaving `regs` and memory untouched, if the
/// instruction's memory access faulted (a `push` or `call` on a guard page,
/// a `ret` or `jmp [mem]` reading unmapped memory): the fault handler
/// recovers the emulator's access ([`recover_emulator_fault`]) and the
/// caller delivers the fault as the instruction's own.
///
/// Stack writes land below the interrupted `rsp`, in the red zone; the
/// kernel places the signal frame below the red zone, so they never hit the
/// handler's own frame.
///
/// # Signal safety
/// Register arithmetic plus at most one 8-byte load and one 8-byte store
/// through raw pointers; no allocation, lock, formatting or panic (wrapping
/// arithmetic only, no slice indexing).
pub fn emulate(
    _cx: SignalContext,
    d: &Displaced,
    addr: u64,
    len: u8,
    regs: &mut Regs,
    access: Access,
) -> Emulated {
    match emulate_inner(d, addr, len, regs, access) {
        Ok(true) => Emulated::Done,
        Ok(false) => Emulated::Refused,
        Err(f) => Emulated::Faulted(f),
    }
}

/// [`emulate`]: `Ok(false)` if refused.
///
/// # Signal safety
/// As [`emulate`].
fn emulate_inner(
    d: &Displaced,
    addr: u64,
    len: u8,
    regs: &mut Regs,
    access: Access,
) -> Result<bool, EmuFault> {
    let next = addr.wrapping_add(u64::from(len));
    match *d {
        Displaced::Skip => regs.rip = next,
        Displaced::Call(target) => {
            // The operand is evaluated before rsp moves: `call rsp` and
            // `call [rsp + 8]` see the old rsp.
            let Some(to) = branch_target(&target, regs, access)? else {
                return Ok(false);
            };
            let sp = regs.get(Reg::Rsp).wrapping_sub(8);
            // SAFETY: `call` itself would have stored its return address at
            // the new rsp; a bad stack faults as the original would.
            unsafe { store_u64(sp, next, access) }?;
            regs.set(Reg::Rsp, sp);
            regs.rip = to;
        }
        Displaced::Jmp(target) => {
            let Some(to) = branch_target(&target, regs, access)? else {
                return Ok(false);
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
                return Ok(false);
            }
            // Read before rsp moves: `push rsp` pushes the old rsp.
            let value = regs.get(reg);
            let sp = regs.get(Reg::Rsp).wrapping_sub(8);
            // SAFETY: `push` itself would have stored there.
            unsafe { store_u64(sp, value, access) }?;
            regs.set(Reg::Rsp, sp);
            regs.rip = next;
        }
        Displaced::Ret { pop } => {
            let sp = regs.get(Reg::Rsp);
            // SAFETY: `ret` itself would have loaded its target from there.
            regs.rip = unsafe { load_u64(sp, access) }?;
            regs.set(Reg::Rsp, sp.wrapping_add(8).wrapping_add(u64::from(pop)));
        }
        Displaced::OutOfLine | Displaced::Deferred => return Ok(false),
    }
    Ok(true)
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
fn branch_target(target: &Target, regs: &Regs, access: Access) -> Result<Option<u64>, EmuFault> {
    let gpr = |r: Reg| match r {
        Reg::Rip | Reg::Rflags => None,
        r => Some(regs.get(r)),
    };
    Ok(Some(match *target {
        Target::Abs(a) => a,
        Target::Reg(r) => match gpr(r) {
            Some(v) => v,
            None => return Ok(None),
        },
        Target::Mem(m) => {
            let (base, index) = match (m.base.map(gpr), m.index.map(gpr)) {
                (Some(None), _) | (_, Some(None)) => return Ok(None),
                (b, i) => (b.flatten().unwrap_or(0), i.flatten().unwrap_or(0)),
            };
            let index = index.wrapping_mul(u64::from(m.scale));
            let ea = base.wrapping_add(index).wrapping_add(m.disp as u64);
            // SAFETY: the original instruction would have read the same
            // 8 bytes to find its target.
            unsafe { load_u64(ea, access) }?
        }
    }))
}

/// A fault the emulator's own load or store took: the signal, its
/// `si_code` and the faulting address, as the kernel reported them. The
/// trap path delivers it to the host as the displaced instruction's own
/// fault.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmuFault {
    pub signo: i32,
    pub code: i32,
    pub addr: u64,
}

/// How the emulator reaches memory.
#[derive(Clone, Copy, Debug)]
pub enum Access {
    /// With the instruction's own loads and stores: a fault is a nested
    /// signal, which [`recover_emulator_fault`] turns into the fault
    /// returned. The trap path's way: one instruction each.
    Direct,
    /// Through system calls (`process_vm_readv`, `process_vm_writev`),
    /// which report a fault as an error (`EFAULT`): no nested signal frame
    /// (where they are unavailable, as `Direct`). For a trap
    /// served on an alternate stack because the thread's own stack had no
    /// room for its frame, where a second frame (several KiB with AVX-512
    /// state) may not fit either.
    Careful(SignalContext),
}

/// [`store_u64`] through `process_vm_writev`; nothing is written if any
/// byte faults. `None` if the system call is unavailable (a seccomp
/// filter): then the caller stores directly.
///
/// # Signal safety
/// Raw system calls only; wrapping arithmetic, no indexing.
fn careful_store(cx: SignalContext, addr: u64, value: u64) -> Option<Result<(), EmuFault>> {
    let page = PAGE as u64;
    let split = (addr | (page - 1)).wrapping_add(1);
    let first = split.wrapping_sub(addr);
    if first < 8 {
        // It straddles two pages: if the second faults, the first must not
        // be written. Write the second's bytes back first, unchanged (the
        // thread's own stack: nobody else writes it).
        let mut tail = [0u8; 8];
        let n = (8 - first) as usize;
        let tail = tail.get_mut(..n)?;
        let r = peek::read_memory_raw(cx, split as usize, tail)
            .and_then(|()| peek::write_memory_raw(cx, split as usize, tail));
        match r {
            Ok(()) => {}
            Err(libc::EFAULT) => return Some(Err(careful_fault(cx, split, n, true))),
            Err(_) => return None,
        }
    }
    match peek::write_memory_raw(cx, addr as usize, &value.to_le_bytes()) {
        Ok(()) => Some(Ok(())),
        Err(libc::EFAULT) => Some(Err(careful_fault(cx, addr, 8, true))),
        Err(_) => None,
    }
}

/// The fault the kernel would report for an access of `len` bytes at
/// `addr` that a system call found faulting: `SIGSEGV` at its first bad
/// byte's page (or `addr` itself, in the first page), `SEGV_MAPERR` if
/// nothing is mapped there, `SEGV_ACCERR` otherwise.
///
/// # Signal safety
/// Raw system calls only.
fn careful_fault(cx: SignalContext, addr: u64, len: usize, write: bool) -> EmuFault {
    let page = PAGE as u64;
    let first = addr & !(page - 1);
    let ok = |a: u64| {
        let mut b = [0u8; 1];
        peek::read_memory_raw(cx, a as usize, &mut b).is_ok()
            && (!write || peek::write_memory_raw(cx, a as usize, &b).is_ok())
    };
    // The first byte's page works: the fault is at the next page's start.
    let at = if ok(addr) && len > 1 {
        first.wrapping_add(page)
    } else {
        addr
    };
    EmuFault {
        signo: libc::SIGSEGV,
        code: if peek::is_mapped_raw(cx, at as usize & !(PAGE - 1)) {
            SEGV_ACCERR
        } else {
            SEGV_MAPERR
        },
        addr: at,
    }
}

/// The page size the careful accesses assume (x86_64's base page).
const PAGE: usize = 4096;
/// `si_code`s of `SIGSEGV` (`<asm-generic/siginfo.h>`): nothing mapped,
/// and mapped without the access.
const SEGV_MAPERR: i32 = 1;
const SEGV_ACCERR: i32 = 2;

/// What [`emulate`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emulated {
    /// The registers (and memory) hold the instruction's effect.
    Done,
    /// Not an instruction the emulator applies; nothing changed.
    Refused,
    /// Its memory access faulted; registers and memory are unchanged.
    Faulted(EmuFault),
}

// The emulator's memory accesses: one instruction each, at addresses the
// fault handler knows ([`recover_emulator_fault`]). A fault there is
// turned into a return with the fault written to the `EmuFault` the
// caller passed, instead of a fault inside probert's handler.
std::arch::global_asm!(
    ".pushsection probert_fast,\"ax\",@progbits",
    ".p2align 4",
    ".globl __probert_emu_load64",
    ".hidden __probert_emu_load64",
    ".type __probert_emu_load64,@function",
    // u64 load64(u64 addr /* rdi */, EmuFault *fault /* rsi */)
    "__probert_emu_load64:",
    "mov rax, qword ptr [rdi]",
    ".globl __probert_emu_load64_end",
    ".hidden __probert_emu_load64_end",
    "__probert_emu_load64_end:",
    "ret",
    ".size __probert_emu_load64, .-__probert_emu_load64",
    ".globl __probert_emu_store64",
    ".hidden __probert_emu_store64",
    ".type __probert_emu_store64,@function",
    // void store64(u64 addr /* rdi */, u64 value /* rsi */, EmuFault *fault /* rdx */)
    "__probert_emu_store64:",
    "mov qword ptr [rdi], rsi",
    ".globl __probert_emu_store64_end",
    ".hidden __probert_emu_store64_end",
    "__probert_emu_store64_end:",
    "ret",
    ".size __probert_emu_store64, .-__probert_emu_store64",
    ".popsection",
);

extern "C" {
    fn __probert_emu_load64(addr: u64, fault: *mut EmuFault) -> u64;
    fn __probert_emu_store64(addr: u64, value: u64, fault: *mut EmuFault);
    // Labels, never called: only their addresses are taken.
    static __probert_emu_load64_end: u8;
    static __probert_emu_store64_end: u8;
}

/// If the fault a handler received at the context `ctx` was taken by the
/// emulator's load or store, makes that access return with `fault`
/// written to the caller's `EmuFault` (and 0 loaded), and returns `true`.
///
/// # Signal safety
/// Register reads and writes of the context and one store to the
/// interrupted handler's own stack.
pub fn recover_emulator_fault(
    _cx: SignalContext,
    ctx: &mut super::TrapContext<'_>,
    fault: EmuFault,
) -> bool {
    let pc = ctx.pc();
    let (out, resume) = if pc == __probert_emu_load64 as *const () as usize {
        (
            Reg::Rsi,
            std::ptr::addr_of!(__probert_emu_load64_end) as usize,
        )
    } else if pc == __probert_emu_store64 as *const () as usize {
        (
            Reg::Rdx,
            std::ptr::addr_of!(__probert_emu_store64_end) as usize,
        )
    } else {
        return false;
    };
    let mut regs = ctx.regs();
    let p = regs.get(out) as usize as *mut EmuFault;
    if p.is_null() || !p.is_aligned() {
        return false;
    }
    // SAFETY: the accessors are called only by `load_u64`/`store_u64`,
    // with a pointer to an `EmuFault` on the interrupted handler's stack.
    unsafe { core::ptr::write_volatile(p, fault) };
    regs.set(Reg::Rax, 0);
    regs.rip = resume as u64;
    ctx.set_regs(&regs);
    true
}

/// Loads 8 bytes from `addr` (which need not be aligned: neither does an
/// x86 memory operand), or returns the fault that load took.
///
/// # Safety
/// Reading `addr..addr + 8` must either succeed or fault the way the
/// emulated instruction would have: the fault handler then recovers it.
///
/// # Signal safety
/// One load; no allocation, lock or panic.
unsafe fn load_u64(addr: u64, access: Access) -> Result<u64, EmuFault> {
    if let Access::Careful(cx) = access {
        let mut b = [0u8; 8];
        match peek::read_memory_raw(cx, addr as usize, &mut b) {
            Ok(()) => return Ok(u64::from_le_bytes(b)),
            Err(libc::EFAULT) => return Err(careful_fault(cx, addr, 8, false)),
            // Unavailable (a seccomp filter): the instruction's own load.
            Err(_) => {}
        }
    }
    let mut fault = EmuFault::default();
    // SAFETY: the accessor reads `addr`; a fault returns through
    // `recover_emulator_fault`, which writes `fault`.
    let v = unsafe { __probert_emu_load64(addr, &mut fault) };
    if fault.signo != 0 {
        Err(fault)
    } else {
        Ok(v)
    }
}

/// Stores 8 bytes at `addr` (not necessarily aligned), or returns the fault
/// that store took.
///
/// # Safety
/// `addr..addr + 8` must be memory the interrupted thread owns (its stack
/// below `rsp`), or writing it must fault the way the emulated instruction
/// would have.
///
/// # Signal safety
/// One store; no allocation, lock or panic.
unsafe fn store_u64(addr: u64, value: u64, access: Access) -> Result<(), EmuFault> {
    if let Access::Careful(cx) = access {
        if let Some(r) = careful_store(cx, addr, value) {
            return r;
        }
        // Unavailable (a seccomp filter): the instruction's own store.
    }
    let mut fault = EmuFault::default();
    // SAFETY: as `load_u64`.
    unsafe { __probert_emu_store64(addr, value, &mut fault) };
    if fault.signo != 0 {
        Err(fault)
    } else {
        Ok(())
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
        emulate(cx(), &d, ADDR, len, regs, Access::Direct) == Emulated::Done
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

    /// Careful accesses: through system calls, a fault is returned, never
    /// raised (no handler is installed here: a real access to these pages
    /// would kill the test).
    #[test]
    fn careful_accesses_report_faults_without_a_signal() {
        let careful = |d: Displaced, len: u8, r: &mut Regs| {
            emulate(cx(), &d, ADDR, len, r, Access::Careful(cx()))
        };
        // SAFETY: fresh anonymous pages; the second is made inaccessible,
        // the third unmapped.
        let base = unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                3 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(
                libc::mprotect(p.cast::<u8>().add(PAGE).cast(), PAGE, libc::PROT_NONE),
                0
            );
            assert_eq!(libc::munmap(p.cast::<u8>().add(2 * PAGE).cast(), PAGE), 0);
            std::ptr::write_bytes(p.cast::<u8>(), 0xAA, PAGE);
            p as u64
        };
        let (guard, gone) = (base + PAGE as u64, base + 2 * PAGE as u64);
        // The last bytes below the inaccessible page, from `guard - n`.
        let last = |n: u64| {
            let mut v = [0u8; 8];
            // SAFETY: `n` ≤ 8 bytes of the accessible page.
            unsafe {
                std::ptr::copy_nonoverlapping((guard - n) as *const u8, v.as_mut_ptr(), n as usize)
            };
            u64::from_le_bytes(v)
        };
        let mut r = Regs::default();
        r.set(Reg::Rbp, 0x1122_3344_5566_7788);

        // A push that fits.
        r.set(Reg::Rsp, guard);
        assert_eq!(
            careful(Displaced::Push(Reg::Rbp), 1, &mut r),
            Emulated::Done
        );
        assert_eq!(
            (r.get(Reg::Rsp), last(8)),
            (guard - 8, 0x1122_3344_5566_7788)
        );
        // A pop (`ret`) back.
        assert_eq!(
            careful(Displaced::Ret { pop: 0 }, 1, &mut r),
            Emulated::Done
        );
        assert_eq!((r.rip, r.get(Reg::Rsp)), (0x1122_3344_5566_7788, guard));

        // A push onto the inaccessible page: its address, SEGV_ACCERR.
        r.set(Reg::Rsp, guard + 8);
        let before = r;
        let fault = EmuFault {
            signo: libc::SIGSEGV,
            code: SEGV_ACCERR,
            addr: guard,
        };
        assert_eq!(
            careful(Displaced::Push(Reg::Rbp), 1, &mut r),
            Emulated::Faulted(fault)
        );
        assert_eq!(r, before);
        // Across the boundary: the fault at the page, nothing written below.
        r.set(Reg::Rsp, guard + 4);
        let before = r;
        let untouched = last(4);
        assert_eq!(
            careful(Displaced::Push(Reg::Rbp), 1, &mut r),
            Emulated::Faulted(fault)
        );
        assert_eq!((r, last(4)), (before, untouched));
        // A `ret` reading unmapped memory: SEGV_MAPERR.
        r.set(Reg::Rsp, gone + 16);
        assert_eq!(
            careful(Displaced::Ret { pop: 0 }, 1, &mut r),
            Emulated::Faulted(EmuFault {
                signo: libc::SIGSEGV,
                code: SEGV_MAPERR,
                addr: gone + 16,
            })
        );
        // SAFETY: the two pages still mapped.
        unsafe { libc::munmap(base as *mut libc::c_void, 2 * PAGE) };
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
            assert_eq!(
                emulate(cx(), &d2, ADDR, d.len, &mut r, Access::Direct),
                Emulated::Done
            );
            assert_eq!(r.rip, rip, "{code:02x?}");
        }
    }
}
