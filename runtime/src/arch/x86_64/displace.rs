//! The displaced part of a fast-site stub for a run of whole instructions
//! ([`FunctionFlow::displaceable`](super::FunctionFlow::displaceable)):
//! each instruction relocated to the stub, then a jump back.
//!
//! | displaced instruction        | emitted at its new address                          |
//! |------------------------------|-----------------------------------------------------|
//! | no RIP dependence, `push`    | its bytes                                           |
//! | RIP-relative operand         | re-encoded (`BlockEncoder`), decoded again to check |
//! | `nop`, `endbr64`             | nothing                                             |
//! | `jcc rel8/rel32`             | `jcc rel32` to the absolute target                  |
//! | `loop`/`loope`/`loopne`/`jrcxz` | the same with rel8 `+2`, `jmp +5`, `jmp rel32`   |
//! | `jmp rel8/rel32`             | `jmp rel32` (ends the run)                           |
//! | `jmp reg/[mem]`, `ret`       | as any instruction (ends the run)                   |
//! | `call rel32`, last           | push the original return address, `jmp rel32`      |
//! | `call reg/[mem]`, last       | push it, `jmp` through the same operand              |
//!
//! The return address is pushed with `push imm32` when it sign-extends from
//! 32 bits, else with `lea rsp, [rsp - 8]` and two `mov dword`s (no flags
//! change either way). `call [rsp + d]` becomes `jmp [rsp + d + 8]`: the
//! operand is read after the push. Unless the run ended in a jump or `ret`,
//! a `jmp rel32` goes back to the end of the run.
//!
//! Refused with an error, never a panic: a call that is not the last
//! instruction (it would return into the stub), `call rsp`, every
//! instruction [`analyze`](super::analyze) refuses, targets and operands out
//! of rel32 reach of the stub, and a result longer than the space given.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Register};

use super::fast::stub_prologue;
use super::fast::{STUB_DATA, STUB_PROLOGUE};
use super::faultmap::{with_fault_map, FaultPoint};
use super::insn::{decode_and_classify, LoopKind, Target};
use super::relocate::relocate_insn;
use super::Displaced;
use crate::error::{Error, Result};

/// The displaced run `code` (the original bytes of whole instructions,
/// mapped at `addr`) relocated to run at `at`, with the jump back to
/// `addr + code.len()` unless the run ends in a jump; at most `max_len`
/// bytes.
#[cfg(test)]
pub fn emit_displaced(code: &[u8], addr: usize, at: usize, max_len: usize) -> Result<Vec<u8>> {
    emit_displaced_mapped(code, addr, at, max_len).map(|(b, _)| b)
}

/// [`emit_displaced`], with the fault points of the result (see
/// [`super::faultmap`]; `stub_off` counted from `at`): every emitted
/// instruction that may fault for a displaced one.
pub fn emit_displaced_mapped(
    code: &[u8],
    addr: usize,
    at: usize,
    max_len: usize,
) -> Result<(Vec<u8>, Vec<FaultPoint>)> {
    let end = addr
        .checked_add(code.len())
        .ok_or_else(|| Error::unsupported(addr, "the run wraps around"))?;
    let (mut out, left) = relocate_run(code, addr, at, end)?;
    if !left {
        out.jmp(end)?;
    }
    fits(&out.bytes, addr, max_len)?;
    Ok((out.bytes, out.points))
}

/// Whether `bytes` fit in `max_len`.
fn fits(bytes: &[u8], addr: usize, max_len: usize) -> Result<()> {
    if bytes.len() > max_len {
        return Err(Error::unsupported(
            addr,
            format!(
                "the displaced instructions need {} bytes, more than the {max_len} left in the stub",
                bytes.len()
            ),
        ));
    }
    Ok(())
}

/// The exit stub of a function's exit run (`code`: the original bytes of
/// whole instructions mapped at `jump`, ending with a `ret` of `ret_len`
/// bytes), in the slot at `slot` (`slot_len` bytes), for probe record
/// `record`:
///
/// ```text
/// slot:       <the instructions before the ret, relocated>
///             jmp  +16
///             .quad record, jump          ; the data words
///             lea  rsp, [rsp - 128]
///             call trampoline             ; the hit, at the ret
/// ret_point:  ret [imm16]
/// ```
///
/// The site's jump enters at `slot`, and so does the trap path (which
/// dispatches nothing itself): the hit happens at the `ret`, with the
/// registers the epilogue left.
pub fn emit_exit_stub(
    code: &[u8],
    jump: usize,
    ret_len: usize,
    slot: usize,
    slot_len: usize,
    trampoline: usize,
    record: usize,
) -> Result<Vec<u8>> {
    let body = code
        .len()
        .checked_sub(ret_len)
        .ok_or_else(|| Error::unsupported(jump, "an exit run holds its ret"))?;
    let ret_at = jump + body;
    let (mut out, left) = relocate_run(&code[..body], jump, slot, ret_at)?;
    if left {
        return Err(Error::unsupported(
            jump,
            "an exit run leaves before its ret",
        ));
    }
    out.bytes.extend_from_slice(&[0xEB, STUB_DATA as u8]);
    let data_at = out.pc();
    let prologue = stub_prologue(data_at, trampoline, record, jump)?;
    out.bytes.extend_from_slice(&prologue);
    out.orig_off = body as u8;
    out.point(0);
    out.bytes.extend_from_slice(&code[body..]);
    with_fault_map(out.bytes, &out.points, jump, slot_len)
}

/// Relocates the whole instructions `code` (mapped at `addr`) to run at
/// `at`; `end` is where the run ends in the original (a call's return
/// address). Returns the bytes and whether they left (a jump or `ret`
/// ended them).
fn relocate_run(code: &[u8], addr: usize, at: usize, end: usize) -> Result<(Out, bool)> {
    let mut out = Out {
        at,
        addr,
        ..Out::default()
    };
    let mut off = 0;
    let mut left = false;
    while off < code.len() && !left {
        let here = addr + off;
        let (instr, displaced) = decode_and_classify(&code[off..], here)?;
        let len = instr.len();
        let bytes = &code[off..off + len];
        let last = off + len == code.len();
        off += len;
        out.orig_off = (here - addr) as u8;
        match displaced {
            Displaced::Skip => {}
            Displaced::Push(_) | Displaced::OutOfLine | Displaced::Deferred => {
                out.point(0);
                let b = relocate_insn(&instr, bytes, here, out.pc())?;
                out.bytes.extend_from_slice(&b);
            }
            Displaced::Jcc { cond, target } => {
                out.bytes.extend_from_slice(&[0x0F, 0x80 | (cond.0 & 0xF)]);
                out.rel32(target as usize)?;
            }
            Displaced::Loop { kind, target } => {
                let op = match kind {
                    LoopKind::Loopne => 0xE0,
                    LoopKind::Loope => 0xE1,
                    LoopKind::Loop => 0xE2,
                    LoopKind::Jrcxz => 0xE3,
                };
                // loop +2 (taken: to the jmp rel32); jmp +5 (not taken: past it)
                out.bytes.extend_from_slice(&[op, 0x02, 0xEB, 0x05]);
                out.jmp(target as usize)?;
            }
            Displaced::Jmp(Target::Abs(t)) => {
                out.jmp(t as usize)?;
                left = true;
            }
            Displaced::Jmp(_) | Displaced::Ret { .. } => {
                out.point(0);
                let b = relocate_insn(&instr, bytes, here, out.pc())?;
                out.bytes.extend_from_slice(&b);
                left = true;
            }
            Displaced::Call(target) => {
                if !last {
                    return Err(Error::unsupported(
                        here,
                        "a call that is not the last displaced instruction would return \
                         into the stub",
                    ));
                }
                out.push_return(end as u64);
                match target {
                    Target::Abs(t) => out.jmp(t as usize)?,
                    Target::Reg(_) | Target::Mem(_) => out.jmp_through(&instr, here)?,
                }
                left = true;
            }
        }
    }
    Ok((out, left))
}

/// The whole per-site stub in the slot at `slot` (`slot_len` bytes) for the
/// run `code` (the original bytes of whole instructions, mapped at `jump`,
/// where the site's `jmp` goes): the data words and prologue of
/// [`stub_prologue`] calling `trampoline` for probe record `record`, then
/// [`emit_displaced`].
pub fn emit_site_stub(
    code: &[u8],
    jump: usize,
    slot: usize,
    slot_len: usize,
    trampoline: usize,
    record: usize,
) -> Result<Vec<u8>> {
    let mut b = stub_prologue(slot, trampoline, record, jump)?;
    let room = slot_len.checked_sub(STUB_PROLOGUE).ok_or_else(|| {
        Error::unsupported(
            jump,
            format!("a {slot_len}-byte slot cannot hold a fast stub"),
        )
    })?;
    // The fault map takes room from the displaced instructions: at most
    // one point per emitted instruction, bounded by the longest run.
    let (d, mut points) = emit_displaced_mapped(code, jump, slot + STUB_PROLOGUE, room)?;
    for p in &mut points {
        p.stub_off += STUB_PROLOGUE as u8;
    }
    b.extend(d);
    with_fault_map(b, &points, jump, slot_len)
}

/// The stub bytes emitted so far, based at `at`.
#[derive(Default)]
struct Out {
    bytes: Vec<u8>,
    at: usize,
    /// The run's address, for errors and fault points.
    addr: usize,
    /// The fault points so far (offsets from `at`).
    points: Vec<FaultPoint>,
    /// The offset in the run of the instruction being emitted.
    orig_off: u8,
}

impl Out {
    /// Notes that the next emitted instruction may fault for the displaced
    /// one being emitted, with the stub having pushed `sp_adj` bytes.
    fn point(&mut self, sp_adj: u8) {
        self.points.push(FaultPoint {
            stub_off: self.bytes.len() as u8,
            orig_off: self.orig_off,
            sp_adj,
        });
    }

    /// The address of the next byte.
    fn pc(&self) -> usize {
        self.at + self.bytes.len()
    }

    /// A rel32 to `to`, ending the instruction.
    fn rel32(&mut self, to: usize) -> Result<()> {
        let end = self.pc() + 4;
        let d = i32::try_from(to as i128 - end as i128).map_err(|_| {
            Error::unsupported(
                self.addr,
                format!("{to:#x} is out of rel32 reach of the stub at {end:#x}"),
            )
        })?;
        self.bytes.extend_from_slice(&d.to_le_bytes());
        Ok(())
    }

    /// `jmp rel32` to `to`.
    fn jmp(&mut self, to: usize) -> Result<()> {
        self.bytes.push(0xE9);
        self.rel32(to)
    }

    /// Pushes `ret` without touching the flags or another register.
    fn push_return(&mut self, ret: u64) {
        if let Ok(imm) = i32::try_from(ret as i64) {
            // push imm32 (sign-extended)
            self.point(0);
            self.bytes.push(0x68);
            self.bytes.extend_from_slice(&imm.to_le_bytes());
        } else {
            // lea rsp, [rsp - 8]; mov dword [rsp], lo; mov dword [rsp + 4], hi
            self.bytes
                .extend_from_slice(&[0x48, 0x8D, 0x64, 0x24, 0xF8]);
            self.point(8);
            self.bytes.extend_from_slice(&[0xC7, 0x04, 0x24]);
            self.bytes.extend_from_slice(&(ret as u32).to_le_bytes());
            self.point(8);
            self.bytes.extend_from_slice(&[0xC7, 0x44, 0x24, 0x04]);
            self.bytes
                .extend_from_slice(&((ret >> 32) as u32).to_le_bytes());
        }
    }

    /// `jmp` through the operand of the indirect call `call` (at `here`),
    /// after the return address was pushed.
    fn jmp_through(&mut self, call: &Instruction, here: usize) -> Result<()> {
        let mut j = *call;
        j.set_code(Code::Jmp_rm64);
        if j.op0_kind() == iced_x86::OpKind::Register {
            if j.op0_register() == Register::RSP {
                return Err(Error::unsupported(
                    here,
                    "call rsp: its target moves with the pushed return address",
                ));
            }
        } else if j.memory_base() == Register::RSP {
            // The operand is read 8 bytes further from rsp now.
            let d = (j.memory_displacement64() as i64)
                .checked_add(8)
                .filter(|d| i32::try_from(*d).is_ok())
                .ok_or_else(|| Error::unsupported(here, "call [rsp + d]: d + 8 overflows"))?;
            j.set_memory_displacement64(d as u64);
            if j.memory_displ_size() == 0 {
                j.set_memory_displ_size(1);
            }
        }
        let pc = self.pc();
        let encoded = encode_checked(&j, pc, here)?;
        // It reads its operand with the return address pushed.
        self.point(8);
        self.bytes.extend_from_slice(&encoded);
        Ok(())
    }
}

/// `instr` encoded at `pc` (RIP-relative operands resolved for `pc`), and
/// checked by decoding it back.
fn encode_checked(instr: &Instruction, pc: usize, here: usize) -> Result<Vec<u8>> {
    let mut i = *instr;
    i.set_ip(pc as u64);
    let block = iced_x86::InstructionBlock::new(core::slice::from_ref(&i), pc as u64);
    let encoded = iced_x86::BlockEncoder::encode(64, block, iced_x86::BlockEncoderOptions::NONE)
        .map_err(|e| Error::unsupported(here, format!("cannot emit the jump at {pc:#x}: {e}")))?
        .code_buffer;
    let again = Decoder::with_ip(64, &encoded, pc as u64, DecoderOptions::NONE).decode();
    let same = !again.is_invalid()
        && again.len() == encoded.len()
        && again.code() == i.code()
        && again.op0_kind() == i.op0_kind()
        && if i.op0_kind() == iced_x86::OpKind::Register {
            again.op0_register() == i.op0_register()
        } else {
            again.memory_base() == i.memory_base()
                && again.memory_index() == i.memory_index()
                && again.memory_index_scale() == i.memory_index_scale()
                && again.memory_displacement64() == i.memory_displacement64()
                && again.segment_prefix() == i.segment_prefix()
        };
    if !same {
        return Err(Error::unsupported(
            here,
            "the re-encoded jump does not match the call's operand",
        ));
    }
    Ok(encoded)
}

#[cfg(test)]
// `runs_from_real_memory` maps memory and calls into it; each unsafe block
// says why that is sound.
#[allow(unsafe_code)]
mod tests {
    use super::*;

    const ADDR: usize = 0x40_0000;
    const AT: usize = 0x50_0000;

    fn rel(to: usize, from_end: usize) -> [u8; 4] {
        ((to as i64 - from_end as i64) as i32).to_le_bytes()
    }

    fn emit(code: &[u8]) -> Vec<u8> {
        emit_displaced(code, ADDR, AT, 64).unwrap()
    }

    fn refused(code: &[u8], addr: usize, at: usize, max: usize) -> String {
        match emit_displaced(code, addr, at, max) {
            Err(Error::UnsupportedInstruction { reason, .. }) => reason.into_owned(),
            other => panic!("{code:02x?} should be refused, got {other:02x?}"),
        }
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn plain_instructions_are_copied() {
        // push rbp; mov rbp, rsp; push rbx
        let want = cat(&[
            &[0x55, 0x48, 0x89, 0xE5, 0x53, 0xE9],
            &rel(ADDR + 5, AT + 10),
        ]);
        assert_eq!(emit(&[0x55, 0x48, 0x89, 0xE5, 0x53]), want);
        assert_eq!(want[6..], [0xFB, 0xFF, 0xEF, 0xFF]);
        // push r15; push r14; push r13 (prefixes kept)
        let code = [0x41, 0x57, 0x41, 0x56, 0x41, 0x55];
        assert_eq!(emit(&code), cat(&[&code, &[0xE9], &rel(ADDR + 6, AT + 11)]));
    }

    #[test]
    fn nops_and_endbr64_are_dropped() {
        // nop dword [rax]; push rbp; push rbx
        let want = cat(&[&[0x55, 0x53, 0xE9], &rel(ADDR + 5, AT + 7)]);
        assert_eq!(emit(&[0x0F, 0x1F, 0x00, 0x55, 0x53]), want);
        // endbr64; push rbp
        let want = cat(&[&[0x55, 0xE9], &rel(ADDR + 5, AT + 6)]);
        assert_eq!(emit(&[0xF3, 0x0F, 0x1E, 0xFA, 0x55]), want);
    }

    #[test]
    fn rip_relative_operands_are_reencoded() {
        // push rbp; mov rax, [rip + 0x10] (reads ADDR + 8 + 0x10)
        let b = emit(&[0x55, 0x48, 0x8B, 0x05, 0x10, 0, 0, 0]);
        let want = cat(&[
            &[0x55, 0x48, 0x8B, 0x05],
            &rel(ADDR + 0x18, AT + 8),
            &[0xE9],
            &rel(ADDR + 8, AT + 13),
        ]);
        assert_eq!(b, want);
        assert_eq!(b[4..8], [0x10, 0x00, 0xF0, 0xFF]);
        // lea rdi, [rip - 0x20]; push rbx
        let b = emit(&[0x48, 0x8D, 0x3D, 0xE0, 0xFF, 0xFF, 0xFF, 0x53]);
        assert_eq!(b[..3], [0x48, 0x8D, 0x3D]);
        assert_eq!(b[3..7], rel(ADDR + 7 - 0x20, AT + 7));
        assert_eq!(b[7], 0x53);
    }

    #[test]
    fn conditional_branches_become_rel32() {
        // test eax, eax; je +0x10; pop rbx
        let b = emit(&[0x85, 0xC0, 0x74, 0x10, 0x5B]);
        let want = cat(&[
            &[0x85, 0xC0, 0x0F, 0x84],
            &rel(ADDR + 4 + 0x10, AT + 8),
            &[0x5B, 0xE9],
            &rel(ADDR + 5, AT + 14),
        ]);
        assert_eq!(b, want);
        // jne rel32 backwards, then xor eax, eax
        let mut code = vec![0x0F, 0x85];
        code.extend_from_slice(&(-0x40i32).to_le_bytes());
        code.extend_from_slice(&[0x31, 0xC0]);
        let b = emit(&code);
        assert_eq!(b[..2], [0x0F, 0x85]);
        assert_eq!(b[2..6], rel(ADDR + 6 - 0x40, AT + 6));
        assert_eq!(b[6..9], [0x31, 0xC0, 0xE9]);
    }

    #[test]
    fn loops_keep_their_rel8_over_a_jump() {
        // loop ADDR (itself); nop x3
        let b = emit(&[0xE2, 0xFE, 0x90, 0x90, 0x90]);
        let want = cat(&[
            &[0xE2, 0x02, 0xEB, 0x05, 0xE9],
            &rel(ADDR, AT + 9),
            &[0xE9],
            &rel(ADDR + 5, AT + 14),
        ]);
        assert_eq!(b, want);
        // jrcxz +4; push rbx; push rbp; push rsi
        let b = emit(&[0xE3, 0x04, 0x53, 0x55, 0x56]);
        assert_eq!(b[..5], [0xE3, 0x02, 0xEB, 0x05, 0xE9]);
        assert_eq!(b[5..9], rel(ADDR + 6, AT + 9));
        assert_eq!(b[9..12], [0x53, 0x55, 0x56]);
    }

    #[test]
    fn jumps_and_returns_end_the_run() {
        // xor eax, eax; jmp +0x10; nop (dead)
        let b = emit(&[0x31, 0xC0, 0xEB, 0x10, 0x90]);
        assert_eq!(b, cat(&[&[0x31, 0xC0, 0xE9], &rel(ADDR + 0x14, AT + 7)]));
        // pop rbp; ret; int3 (padding, never decoded)
        assert_eq!(emit(&[0x5D, 0xC3, 0xCC, 0xCC, 0xCC]), [0x5D, 0xC3]);
        // pop rbx; jmp [rip + 0x100] (a tail call through the GOT)
        let b = emit(&[0x5B, 0xFF, 0x25, 0x00, 0x01, 0, 0]);
        assert_eq!(
            b,
            cat(&[&[0x5B, 0xFF, 0x25], &rel(ADDR + 7 + 0x100, AT + 7)])
        );
        // pop rbp; jmp rax
        assert_eq!(
            emit(&[0x5D, 0x41, 0x5C, 0xFF, 0xE0]),
            [0x5D, 0x41, 0x5C, 0xFF, 0xE0]
        );
    }

    #[test]
    fn a_last_call_pushes_the_original_return_address() {
        // mov ebx, edi; call f
        let f = 0x45_0000;
        let mut code = vec![0x89, 0xFB, 0xE8];
        code.extend_from_slice(&rel(f, ADDR + 7));
        let want = cat(&[
            &[0x89, 0xFB, 0x68],
            &((ADDR + 7) as u32).to_le_bytes(),
            &[0xE9],
            &rel(f, AT + 12),
        ]);
        assert_eq!(emit(&code), want);

        // High addresses need the 64-bit push: lea rsp, [rsp - 8]; two movs.
        let (addr, at) = (0x7F00_0000_1000usize, 0x7F00_0010_0000usize);
        let (f, ret) = (addr + 0x2000, addr + 7);
        let mut code = vec![0x89, 0xFB, 0xE8];
        code.extend_from_slice(&rel(f, ret));
        let want = cat(&[
            &[0x89, 0xFB],
            &[0x48, 0x8D, 0x64, 0x24, 0xF8, 0xC7, 0x04, 0x24],
            &(ret as u32).to_le_bytes(),
            &[0xC7, 0x44, 0x24, 0x04],
            &((ret >> 32) as u32).to_le_bytes(),
            &[0xE9],
            &rel(f, at + 27),
        ]);
        assert_eq!(emit_displaced(&code, addr, at, 64).unwrap(), want);
    }

    #[test]
    fn a_last_indirect_call_jumps_through_the_same_operand() {
        let ret = |n: usize| ((ADDR + n) as u32).to_le_bytes();
        // xor edi, edi; call [rip + 0x100]: jmp [rip + d'] to the same slot
        let b = emit(&[0x31, 0xFF, 0xFF, 0x15, 0x00, 0x01, 0, 0]);
        let want = cat(&[
            &[0x31, 0xFF, 0x68],
            &ret(8),
            &[0xFF, 0x25],
            &rel(ADDR + 8 + 0x100, AT + 13),
        ]);
        assert_eq!(b, want);
        // mov edi, ebx; xor esi, esi; call rax / call r11
        let b = emit(&[0x89, 0xDF, 0x31, 0xF6, 0xFF, 0xD0]);
        assert_eq!(
            b,
            cat(&[&[0x89, 0xDF, 0x31, 0xF6, 0x68], &ret(6), &[0xFF, 0xE0]])
        );
        let b = emit(&[0x89, 0xDF, 0x31, 0xF6, 0x41, 0xFF, 0xD3]);
        assert_eq!(
            b,
            cat(&[
                &[0x89, 0xDF, 0x31, 0xF6, 0x68],
                &ret(7),
                &[0x41, 0xFF, 0xE3]
            ])
        );
        // call [rsp + 8] reads 8 bytes further once the return address is in
        let b = emit(&[0x31, 0xFF, 0xFF, 0x54, 0x24, 0x08]);
        assert_eq!(
            b,
            cat(&[&[0x31, 0xFF, 0x68], &ret(6), &[0xFF, 0x64, 0x24, 0x10]])
        );
        // call [rsp]: a displacement appears
        let b = emit(&[0x31, 0xFF, 0x90, 0xFF, 0x14, 0x24]);
        assert_eq!(
            b,
            cat(&[&[0x31, 0xFF, 0x68], &ret(6), &[0xFF, 0x64, 0x24, 0x08]])
        );
        // call [rsp + 0x7c]: the displacement grows to 32 bits
        let b = emit(&[0x31, 0xFF, 0xFF, 0x54, 0x24, 0x7C]);
        assert_eq!(
            b,
            cat(&[
                &[0x31, 0xFF, 0x68],
                &ret(6),
                &[0xFF, 0xA4, 0x24, 0x84, 0, 0, 0]
            ])
        );
        // call [r12 + r13*8 - 8]: unchanged
        let b = emit(&[0x90, 0x43, 0xFF, 0x54, 0xEC, 0xF8]);
        assert_eq!(b, cat(&[&[0x68], &ret(6), &[0x43, 0xFF, 0x64, 0xEC, 0xF8]]));
    }

    #[test]
    fn what_cannot_be_emitted_is_refused() {
        // A call that is not last would return into the stub.
        let r = refused(&[0xE8, 0, 0, 0, 0, 0x90], ADDR, AT, 64);
        assert!(r.contains("not the last"), "{r}");
        assert!(refused(&[0x31, 0xFF, 0x90, 0xFF, 0xD4], ADDR, AT, 64).contains("call rsp"));
        // Out of rel32 reach: the branch target, and the jump back.
        let far = ADDR + (3 << 30);
        assert!(refused(&[0x85, 0xC0, 0x74, 0x10, 0x5B], ADDR, far, 64).contains("rel32"));
        assert!(refused(&[0x55, 0x48, 0x89, 0xE5, 0x53], ADDR, far, 64).contains("rel32"));
        assert!(refused(&[0x55, 0x48, 0x8B, 0x05, 0, 0, 0, 0], ADDR, far, 64).contains("2 GiB"));
        // Too long for the space left.
        let r = refused(&[0x55, 0x48, 0x89, 0xE5, 0x53], ADDR, AT, 9);
        assert!(r.contains("more than the 9"), "{r}");
        assert!(emit_displaced(&[0x55, 0x48, 0x89, 0xE5, 0x53], ADDR, AT, 10).is_ok());
        // What the trap path refuses, and bytes that do not decode whole.
        assert!(emit_displaced(&[0x55, 0xCC, 0x90, 0x90, 0x90], ADDR, AT, 64).is_err());
        assert!(emit_displaced(&[0x55, 0x0F, 0x0B, 0x90, 0x90], ADDR, AT, 64).is_err());
        assert!(emit_displaced(&[0x55, 0x90, 0xE8, 0x00], ADDR, AT, 64).is_err());
        assert!(emit_displaced(&[0x55], usize::MAX, AT, 64).is_err());
    }

    #[test]
    fn the_site_stub_starts_with_the_site_prologue_and_ends_with_its_fault_map() {
        let code = [0x55, 0x48, 0x89, 0xE5, 0x53];
        let (stub, tramp, rec) = (AT, AT - 0x1000, 0x7f00_1234_0000);
        let b = emit_site_stub(&code, ADDR, stub, 64, tramp, rec).unwrap();
        assert_eq!(
            b[..STUB_PROLOGUE],
            stub_prologue(stub, tramp, rec, ADDR).unwrap()[..]
        );
        let d = emit_displaced(&code, ADDR, stub + STUB_PROLOGUE, 64).unwrap();
        assert_eq!(b[STUB_PROLOGUE..STUB_PROLOGUE + d.len()], d[..]);
        // Three instructions that may fault, each mapped back to its own.
        let map = super::super::faultmap::fault_map_len(3);
        assert_eq!(b.len(), 64);
        let cx = {
            // SAFETY: the test calls only signal-safe functions with it.
            unsafe { crate::sigctx::SignalContext::new() }
        };
        let base = b.as_ptr() as usize;
        // SAFETY: `b` is the 64 readable bytes of the slot.
        let at = |off: usize| unsafe { super::super::fault_origin(cx, base, 64, base + off) };
        assert_eq!(at(STUB_PROLOGUE), Some((ADDR, 0)));
        assert_eq!(at(STUB_PROLOGUE + 1), Some((ADDR + 1, 0)));
        assert_eq!(at(STUB_PROLOGUE + 4), Some((ADDR + 4, 0)));
        assert_eq!(at(STUB_PROLOGUE + 5), None, "the jump back");
        assert!(emit_site_stub(&code, ADDR, stub, 16, tramp, rec).is_err());
        let room = STUB_PROLOGUE + 10 + map;
        assert!(emit_site_stub(&code, ADDR, stub, room - 1, tramp, rec).is_err());
        assert!(emit_site_stub(&code, ADDR, stub, room, tramp, rec).is_ok());
    }

    #[test]
    fn a_call_pushing_a_64_bit_return_address_maps_its_stores_with_the_push_undone() {
        // call [rip + 0]: a 64-bit return address takes `lea` and two `mov`s.
        let addr = 0x7f00_0000_1000usize;
        let code = [0xFF, 0x15, 0, 0, 0, 0];
        let (d, points) = emit_displaced_mapped(&code, addr, addr + 0x1000, 64).unwrap();
        let sp8: Vec<_> = points.iter().filter(|p| p.sp_adj == 8).collect();
        assert_eq!(
            sp8.len(),
            3,
            "two stores and the jmp through memory: {points:?}"
        );
        assert!(points.iter().all(|p| p.orig_off == 0));
        assert_eq!(d[usize::from(sp8[0].stub_off)..][..3], [0xC7, 0x04, 0x24]);
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut code = [0u8; 12];
            for b in &mut code {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let len = 5 + (x % 8) as usize;
            let at = ADDR
                .wrapping_add((x >> 24) as usize % (1 << 33))
                .wrapping_sub(1 << 32);
            if let Ok(b) = emit_displaced(&code[..len], ADDR, at, 64) {
                assert!(b.len() <= 64);
            }
        }
    }

    /// Runs relocated runs from a stub page: each stub is entered as a
    /// function, runs the displaced instructions and jumps back into the
    /// original code, which returns.
    #[test]
    fn runs_from_real_memory() {
        const PAGE: usize = 4096;
        // SAFETY: a fresh private anonymous mapping; checked below.
        let base = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                2 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base as usize;
        let data = base + PAGE;
        let mut page = vec![0xCCu8; PAGE];
        fn put(page: &mut [u8], at: usize, bytes: &[u8]) {
            page[at..at + bytes.len()].copy_from_slice(bytes);
        }

        // 0x000 f: push rbp; mov rbp, rsp; mov rax, [rip -> data]; add rax,
        //          rdi; pop rbp; ret
        let mut f = vec![0x55, 0x48, 0x89, 0xE5, 0x48, 0x8B, 0x05];
        f.extend_from_slice(&rel(data, base + 11));
        f.extend_from_slice(&[0x48, 0x01, 0xF8, 0x5D, 0xC3]);
        put(&mut page, 0x000, &f);
        // 0x040 h: lea eax, [rdi + rdi]; ret
        put(&mut page, 0x040, &[0x8D, 0x04, 0x3F, 0xC3]);
        // 0x080 g: push rbx; mov ebx, edi; call h; add eax, ebx; pop rbx; ret
        let mut g = vec![0x53, 0x89, 0xFB, 0xE8];
        g.extend_from_slice(&rel(base + 0x40, base + 0x88));
        g.extend_from_slice(&[0x01, 0xD8, 0x5B, 0xC3]);
        put(&mut page, 0x080, &g);
        // 0x0c0 k: test edi, edi; je +6; mov eax, 1; ret; mov eax, 2; ret
        put(
            &mut page,
            0x0C0,
            &[
                0x85, 0xFF, 0x74, 0x06, 0xB8, 1, 0, 0, 0, 0xC3, 0xB8, 2, 0, 0, 0, 0xC3,
            ],
        );
        // 0x100 m: push rsi; nop; call [rsp]; pop rcx; ret   (m(x, h) = h(x))
        put(
            &mut page,
            0x100,
            &[0x56, 0x90, 0xFF, 0x14, 0x24, 0x59, 0xC3],
        );
        // 0x140 p: push rbx; mov ebx, edi; call [rip -> data + 8]; add eax,
        //          ebx; pop rbx; ret   (data + 8 holds h)
        let mut p = vec![0x53, 0x89, 0xFB, 0xFF, 0x15];
        p.extend_from_slice(&rel(data + 8, base + 0x149));
        p.extend_from_slice(&[0x01, 0xD8, 0x5B, 0xC3]);
        put(&mut page, 0x140, &p);

        // (offset of the run, its length, where its stub goes)
        let runs = [
            (0x000, 11, 0x800),
            (0x080, 8, 0x840),
            (0x0C0, 9, 0x880),
            (0x100, 5, 0x8C0),
            (0x140, 9, 0x900),
        ];
        for (off, len, stub) in runs {
            let code = page[off..off + len].to_vec();
            let b = emit_displaced(&code, base + off, base + stub, 64).unwrap();
            put(&mut page, stub, &b);
        }
        // SAFETY: both pages are ours and writable; then page 0 becomes
        // read+exec, holding only the code written above.
        unsafe {
            core::ptr::copy_nonoverlapping(page.as_ptr(), base as *mut u8, PAGE);
            *(data as *mut u64) = 1000;
            *((data + 8) as *mut u64) = (base + 0x40) as u64;
            assert_eq!(
                libc::mprotect(base as *mut _, PAGE, libc::PROT_READ | libc::PROT_EXEC),
                0
            );
        }
        // SAFETY: each stub runs the displaced start of one of the functions
        // above and jumps back into it, so it behaves as that function: an
        // `extern "C" fn(u64, u64) -> u64` that touches only its own stack
        // and `data`.
        let call = |stub: usize, a: u64, b: u64| unsafe {
            let f: extern "C" fn(u64, u64) -> u64 = core::mem::transmute(base + stub);
            f(a, b)
        };
        assert_eq!(call(0x800, 5, 0), 1005, "f: rip-relative load");
        assert_eq!(call(0x840, 7, 0) as u32, 21, "g: call rel32 last");
        assert_eq!(call(0x880, 0, 0) as u32, 2, "k: je taken");
        assert_eq!(call(0x880, 3, 0) as u32, 1, "k: je not taken");
        assert_eq!(
            call(0x8C0, 9, (base + 0x40) as u64) as u32,
            18,
            "m: call [rsp]"
        );
        assert_eq!(call(0x900, 4, 0) as u32, 12, "p: call [rip]");
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(base as *mut _, 2 * PAGE) };
    }
}
