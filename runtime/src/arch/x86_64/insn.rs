//! Decoding and classifying the instruction a probe displaces.
//!
//! [`analyze`] decodes one instruction with `iced-x86` (64-bit mode, Intel
//! decoding rules) and decides how the trap path gets past it once its first
//! byte is an `int3`: skip it, emulate it in the handler, or run it from an
//! out-of-line stub. It refuses, with a reason, everything that could neither
//! be emulated faithfully nor relocated: trap and privileged instructions,
//! far and 16/32-bit branches, EIP-relative operands, RTM, `ud2`, and
//! instructions that touch their own (patched) bytes.
//!
//! [`Displaced::encode`] packs the result into three words that the trap
//! path reads speculatively; [`Displaced::decode`] accepts exactly the
//! patterns `encode` produces, so a torn or stale read yields `None`, never a
//! wrong instruction.

use iced_x86::{
    Code, ConditionCode, Decoder, DecoderError, DecoderOptions, FlowControl, Formatter,
    Instruction, IntelFormatter, Mnemonic, OpKind, Register,
};

use super::Reg;
use crate::error::{Error, Result};

/// A condition code of `jcc`, numbered as the low nibble of its opcode
/// (`0x70 + cc`): O, NO, B, AE, E, NE, BE, A, S, NS, P, NP, L, GE, LE, G.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cond(pub u8);

/// The `loop` family and `jrcxz` (64-bit address size only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoopKind {
    /// `loop`: `rcx -= 1`, jump if `rcx != 0`.
    Loop,
    /// `loope`: `rcx -= 1`, jump if `rcx != 0 && ZF`.
    Loope,
    /// `loopne`: `rcx -= 1`, jump if `rcx != 0 && !ZF`.
    Loopne,
    /// `jrcxz`: jump if `rcx == 0`.
    Jrcxz,
}

/// A memory operand `[base + index*scale + disp]` (DS segment only).
/// A RIP-relative operand is resolved at analysis time: `base` and `index` are
/// `None` and `disp` is the absolute address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemOperand {
    /// Base register, if any (never `Rip`: resolved instead).
    pub base: Option<Reg>,
    /// Index register, if any.
    pub index: Option<Reg>,
    /// 1, 2, 4 or 8.
    pub scale: u8,
    /// Displacement, sign-extended (absolute address when RIP-relative).
    pub disp: i64,
}

/// Where a `call` or `jmp` goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A direct branch: the absolute target address.
    Abs(u64),
    /// `call reg` / `jmp reg`.
    Reg(Reg),
    /// `call [mem]` / `jmp [mem]`: a 64-bit target loaded from memory.
    Mem(MemOperand),
}

/// What the trap path does instead of executing the displaced instruction in
/// place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Displaced {
    /// `nop` (any form) or `endbr64`: resume at `addr + len`.
    Skip,
    /// A near call: push `addr + len`, go to the target.
    Call(Target),
    /// A near jump.
    Jmp(Target),
    /// A conditional jump; falls through to `addr + len`.
    Jcc {
        /// The condition.
        cond: Cond,
        /// The absolute target.
        target: u64,
    },
    /// `loop*` / `jrcxz`.
    Loop {
        /// Which one.
        kind: LoopKind,
        /// The absolute target.
        target: u64,
    },
    /// `push r64`.
    Push(Reg),
    /// `ret` / `ret imm16`: pop the return address, then `rsp += pop`.
    Ret {
        /// The immediate (0 for plain `ret`).
        pop: u16,
    },
    /// Run the instruction from an out-of-line stub.
    OutOfLine,
    /// Resume in the site's stub without calling the consumers there: the
    /// stub calls them itself, later (a function's exit run, whose hit is at
    /// its `ret`). Never produced by [`analyze`].
    Deferred,
}

/// A decoded, classified instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Its length in bytes (1..=15).
    pub len: u8,
    /// How the trap path handles it.
    pub displaced: Displaced,
}

// Word layout of `Displaced::encode`:
//
//   w0 bits  0..8   tag (TAG_*)
//          8..16   field A: target kind (Call/Jmp), cond (Jcc), loop kind,
//                  register (Push)
//         16..24   field B: register (Target::Reg) or base (Target::Mem)
//         24..32   field C: index (Target::Mem)
//         32..40   field D: scale (Target::Mem)
//         40..56   pop (Ret)
//         56..64   MAGIC
//   w1    the absolute target (Abs, Jcc, Loop) or the displacement (Mem); 0
//         otherwise
//   w2    check(w0, w1)
//
// Unused fields are zero. Absent registers are `NO_REG`.
const TAG_SKIP: u64 = 1;
const TAG_CALL: u64 = 2;
const TAG_JMP: u64 = 3;
const TAG_JCC: u64 = 4;
const TAG_LOOP: u64 = 5;
const TAG_PUSH: u64 = 6;
const TAG_RET: u64 = 7;
const TAG_OUT_OF_LINE: u64 = 8;
const TAG_DEFERRED: u64 = 9;

const TARGET_ABS: u64 = 0;
const TARGET_REG: u64 = 1;
const TARGET_MEM: u64 = 2;

const NO_REG: u64 = 0xFF;
const MAGIC: u64 = 0xB5;

/// The third word: a mix of the first two, so that words from two different
/// `encode` calls (a torn read) are very likely rejected. It is a detection
/// aid only; the map's sequence counter is what makes a read consistent.
const fn check(w0: u64, w1: u64) -> u64 {
    (w0 ^ w1.rotate_left(29) ^ 0x9E37_79B9_7F4A_7C15).wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

/// The 8-bit field at `shift` of `w`.
const fn field(w: u64, shift: u32) -> u64 {
    (w >> shift) & 0xFF
}

/// A general-purpose register from its number; `None` for 16 and up (never
/// `Rip` or `Rflags`).
const fn gpr_from_bits(n: u64) -> Option<Reg> {
    if n < 16 {
        Reg::from_index(n as u32)
    } else {
        None
    }
}

/// The number of an optional register, `NO_REG` for none.
fn reg_bits(r: Option<Reg>) -> u64 {
    match r {
        Some(r) => r as u64,
        None => NO_REG,
    }
}

/// An optional general-purpose register from its bits; the outer `None` means
/// the bits are invalid.
fn opt_gpr_from_bits(n: u64) -> Option<Option<Reg>> {
    if n == NO_REG {
        Some(None)
    } else {
        gpr_from_bits(n).map(Some)
    }
}

/// Field A, B, C, D and w1 of a call or jump target.
fn encode_target(t: &Target) -> (u64, u64) {
    match *t {
        Target::Abs(a) => (TARGET_ABS, a),
        Target::Reg(r) => (TARGET_REG | (r as u64) << 8, 0),
        Target::Mem(m) => (
            TARGET_MEM | reg_bits(m.base) << 8 | reg_bits(m.index) << 16 | u64::from(m.scale) << 24,
            m.disp as u64,
        ),
    }
}

/// Inverse of [`encode_target`], from `w0 >> 8`.
fn decode_target(a: u64, w1: u64) -> Option<Target> {
    match field(a, 0) {
        TARGET_ABS => Some(Target::Abs(w1)),
        TARGET_REG => gpr_from_bits(field(a, 8)).map(Target::Reg),
        TARGET_MEM => {
            let scale = field(a, 24);
            if !matches!(scale, 1 | 2 | 4 | 8) {
                return None;
            }
            Some(Target::Mem(MemOperand {
                base: opt_gpr_from_bits(field(a, 8))?,
                index: opt_gpr_from_bits(field(a, 16))?,
                scale: scale as u8,
                disp: w1 as i64,
            }))
        }
        _ => None,
    }
}

impl Displaced {
    /// Packs into words that the trap path reads atomically.
    ///
    /// Values [`analyze`] never produces (a `Cond` of 16 or more, `Rip` or
    /// `Rflags` as a register, a scale other than 1, 2, 4 or 8) encode to
    /// words that [`Displaced::decode`] rejects.
    ///
    /// # Signal safety
    /// Pure arithmetic; no allocation, lock or panic ([`Displaced::decode`]
    /// calls it).
    pub fn encode(&self) -> [u64; 3] {
        let (tag, fields, w1) = match *self {
            Displaced::Skip => (TAG_SKIP, 0, 0),
            Displaced::Call(t) => {
                let (f, w1) = encode_target(&t);
                (TAG_CALL, f, w1)
            }
            Displaced::Jmp(t) => {
                let (f, w1) = encode_target(&t);
                (TAG_JMP, f, w1)
            }
            Displaced::Jcc { cond, target } => (TAG_JCC, u64::from(cond.0), target),
            Displaced::Loop { kind, target } => {
                let k = match kind {
                    LoopKind::Loop => 0,
                    LoopKind::Loope => 1,
                    LoopKind::Loopne => 2,
                    LoopKind::Jrcxz => 3,
                };
                (TAG_LOOP, k, target)
            }
            Displaced::Push(r) => (TAG_PUSH, r as u64, 0),
            Displaced::Ret { pop } => (TAG_RET, u64::from(pop) << 32, 0),
            Displaced::OutOfLine => (TAG_OUT_OF_LINE, 0, 0),
            Displaced::Deferred => (TAG_DEFERRED, 0, 0),
        };
        let w0 = tag | fields << 8 | MAGIC << 56;
        [w0, w1, check(w0, w1)]
    }

    /// Unpacks [`Displaced::encode`]; `None` for words no `encode` produced
    /// (a speculative read that will be discarded).
    ///
    /// # Signal safety
    /// Pure arithmetic; no allocation, lock or panic.
    pub fn decode(words: [u64; 3]) -> Option<Displaced> {
        let [w0, w1, _] = words;
        if field(w0, 56) != MAGIC {
            return None;
        }
        let a = w0 >> 8;
        let d = match field(w0, 0) {
            TAG_SKIP => Displaced::Skip,
            TAG_CALL => Displaced::Call(decode_target(a, w1)?),
            TAG_JMP => Displaced::Jmp(decode_target(a, w1)?),
            TAG_JCC => {
                let cond = field(a, 0);
                if cond >= 16 {
                    return None;
                }
                Displaced::Jcc {
                    cond: Cond(cond as u8),
                    target: w1,
                }
            }
            TAG_LOOP => Displaced::Loop {
                kind: match field(a, 0) {
                    0 => LoopKind::Loop,
                    1 => LoopKind::Loope,
                    2 => LoopKind::Loopne,
                    3 => LoopKind::Jrcxz,
                    _ => return None,
                },
                target: w1,
            },
            TAG_PUSH => Displaced::Push(gpr_from_bits(field(a, 0))?),
            TAG_RET => Displaced::Ret {
                pop: ((a >> 32) & 0xFFFF) as u16,
            },
            TAG_OUT_OF_LINE => Displaced::OutOfLine,
            TAG_DEFERRED => Displaced::Deferred,
            _ => return None,
        };
        // Every field was range-checked above; re-encoding now rejects what
        // they cannot see: non-zero unused bits, a w1 where none belongs,
        // and a wrong check word. So `decode` accepts exactly `encode`'s image.
        if d.encode() == words {
            Some(d)
        } else {
            None
        }
    }
}

/// Decodes and classifies the first instruction of `code`, which is mapped at
/// `addr`. `code` holds at least one whole instruction (up to 15 bytes, fewer
/// at the end of a region).
pub fn analyze(code: &[u8], addr: usize) -> Result<Decoded> {
    let (instr, displaced) = decode_and_classify(code, addr)?;
    Ok(Decoded {
        // At most 15: the decoder never returns a longer valid instruction.
        len: instr.len() as u8,
        displaced,
    })
}

/// The disassembly of the first instruction of `code`, mapped at `addr`
/// (Intel syntax, for messages and debugging): not on the attach path,
/// which would format every instruction it probes for nothing.
pub fn disassemble(code: &[u8], addr: usize) -> String {
    let mut decoder = Decoder::with_ip(64, code, addr as u64, DecoderOptions::NONE);
    let instr = decoder.decode();
    let mut formatter = IntelFormatter::new();
    let options = formatter.options_mut();
    options.set_space_after_operand_separator(true);
    options.set_hex_prefix("0x");
    options.set_hex_suffix("");
    options.set_branch_leading_zeros(false);
    let mut text = String::new();
    formatter.format(&instr, &mut text);
    text
}

/// Decodes forward from `func_start` (whose bytes are `code`) and fails with
/// `Error::Misaligned` if no instruction starts at `addr`.
///
/// `code` must hold the function's original bytes (with any `int3` probert
/// wrote replaced by the byte it displaced), from `func_start` up to at least
/// `addr + 15` or the end of the function.
///
/// - `addr < func_start` is an [`Error::InvalidArgument`].
/// - `addr` at or past the end of `code` is `Ok`: nothing to check against.
/// - If the bytes stop decoding before `addr` is reached (data in code, or a
///   truncated tail), the result is `Ok`: linear decoding can no longer prove
///   where instructions start, and refusing would reject valid probes in
///   functions with embedded jump tables or padding. [`analyze`] still checks
///   the instruction at `addr` itself.
pub fn check_boundary(code: &[u8], func_start: usize, addr: usize) -> Result<()> {
    let Some(target) = addr.checked_sub(func_start) else {
        return Err(Error::InvalidArgument(
            "probe address lies before the start of its function".into(),
        ));
    };
    if target >= code.len() {
        return Ok(());
    }
    let mut decoder = Decoder::with_ip(64, code, func_start as u64, DecoderOptions::NONE);
    let mut instr = Instruction::default();
    let mut offset = 0;
    while offset < target {
        decoder.decode_out(&mut instr);
        if instr.is_invalid() {
            return Ok(());
        }
        offset += instr.len();
    }
    if offset == target {
        Ok(())
    } else {
        Err(Error::Misaligned {
            addr,
            func: func_start,
        })
    }
}

/// Decodes the first instruction of `code` (mapped at `addr`) and classifies
/// it: [`analyze`] without the disassembly, and the decoded instruction for
/// the relocator.
pub(super) fn decode_and_classify(code: &[u8], addr: usize) -> Result<(Instruction, Displaced)> {
    let ip = addr as u64;
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let instr = decoder.decode();
    if instr.is_invalid() {
        return Err(Error::unsupported(
            addr,
            match decoder.last_error() {
                DecoderError::NoMoreBytes => {
                    "truncated instruction: the code ends before a whole instruction decodes"
                }
                _ => "invalid or undecodable instruction bytes",
            },
        ));
    }
    let displaced = classify(&instr, addr)?;
    // Intel ignores an operand-size prefix on near branches in 64-bit mode,
    // AMD (this project's test machine) honours it and truncates RIP to 16
    // bits. Neither emulation nor relocation can be right on both.
    let amd = Decoder::with_ip(64, code, ip, DecoderOptions::AMD).decode();
    if amd.code() != instr.code() || amd.len() != instr.len() {
        return Err(Error::unsupported(
            addr,
            "the instruction means different things on Intel and AMD CPUs \
             (an operand-size prefix on a branch)",
        ));
    }
    Ok((instr, displaced))
}

/// How the trap path handles `instr`, decoded at `addr`, or why it cannot.
pub(super) fn classify(instr: &Instruction, addr: usize) -> Result<Displaced> {
    let refuse = |reason: &'static str| Err(Error::unsupported(addr, reason));

    // Every NOP form and the CET landing pads do nothing; `pause` (`f3 90`)
    // is not a NOP (`Code::Pause`) and runs out of line. A NOP's memory
    // operand is never accessed, so even an EIP-relative one is harmless.
    if matches!(
        instr.mnemonic(),
        Mnemonic::Nop | Mnemonic::Endbr64 | Mnemonic::Endbr32
    ) {
        return Ok(Displaced::Skip);
    }
    if instr.memory_base() == Register::EIP {
        return refuse(
            "EIP-relative operand (0x67 address-size prefix): its address wraps \
             at 4 GiB and cannot be relocated",
        );
    }
    if instr.memory_base() == Register::RIP && instr.mnemonic() != Mnemonic::Lea {
        // Only the first byte is patched today, but a fast-path site rewrites
        // the whole instruction: refuse any overlap with it.
        let start = instr.ip_rel_memory_address();
        let size = instr.memory_size().size().max(1) as u64;
        let (lo, hi) = (instr.ip(), instr.next_ip());
        if start < hi && start.wrapping_add(size) > lo {
            return refuse(
                "the instruction reads or writes its own bytes, which the probe patches",
            );
        }
    }

    match instr.flow_control() {
        FlowControl::Next => {
            if matches!(instr.mnemonic(), Mnemonic::Xabort | Mnemonic::Xend) {
                return refuse(
                    "RTM instruction (xabort/xend): the trap aborts any transaction, \
                     so it cannot run as the program meant",
                );
            }
            if instr.is_privileged() {
                return refuse(
                    "privileged or I/O instruction (hlt, in/out, cli/sti, ...): \
                     it faults in user mode, and out of line it would fault at the stub",
                );
            }
            if instr.code() == Code::Push_r64 {
                return match gpr64(instr.op0_register()) {
                    Some(r) => Ok(Displaced::Push(r)),
                    None => refuse("push of an unexpected register"),
                };
            }
            Ok(Displaced::OutOfLine)
        }
        FlowControl::UnconditionalBranch => match instr.code() {
            Code::Jmp_rel8_64 | Code::Jmp_rel32_64 => {
                Ok(Displaced::Jmp(Target::Abs(instr.near_branch_target())))
            }
            _ => refuse("far or 16/32-bit jmp: only near 64-bit jumps are emulated"),
        },
        FlowControl::IndirectBranch => match instr.code() {
            Code::Jmp_rm64 => Ok(Displaced::Jmp(indirect_target(instr, addr)?)),
            _ => refuse("far or 16-bit indirect jmp: only near 64-bit jumps are emulated"),
        },
        FlowControl::ConditionalBranch => {
            if instr.is_jcc_short_or_near() && instr.op0_kind() == OpKind::NearBranch64 {
                return match cond_of(instr.condition_code()) {
                    Some(cond) => Ok(Displaced::Jcc {
                        cond,
                        target: instr.near_branch_target(),
                    }),
                    None => refuse("jcc without a condition code"),
                };
            }
            let kind = match instr.code() {
                Code::Loop_rel8_64_RCX => LoopKind::Loop,
                Code::Loope_rel8_64_RCX => LoopKind::Loope,
                Code::Loopne_rel8_64_RCX => LoopKind::Loopne,
                Code::Jrcxz_rel8_64 => LoopKind::Jrcxz,
                Code::Jecxz_rel8_64
                | Code::Loop_rel8_64_ECX
                | Code::Loope_rel8_64_ECX
                | Code::Loopne_rel8_64_ECX => {
                    return refuse(
                        "loop/jecxz with a 0x67 address-size prefix (counts in ecx): \
                         not emulated",
                    )
                }
                _ => return refuse("unsupported conditional branch"),
            };
            Ok(Displaced::Loop {
                kind,
                target: instr.near_branch_target(),
            })
        }
        FlowControl::Return => match instr.code() {
            Code::Retnq => Ok(Displaced::Ret { pop: 0 }),
            Code::Retnq_imm16 => Ok(Displaced::Ret {
                pop: instr.immediate16(),
            }),
            Code::Retnw | Code::Retnw_imm16 | Code::Retnd | Code::Retnd_imm16 => {
                refuse("16/32-bit near ret: only 64-bit ret is emulated")
            }
            _ => refuse(
                "far return or system return (retf, iret, sysret, ...): \
                 changes privilege or segment state",
            ),
        },
        FlowControl::Call => match instr.code() {
            Code::Call_rel32_64 => Ok(Displaced::Call(Target::Abs(instr.near_branch_target()))),
            // The kernel returns to the stub, which jumps back: only rcx (the
            // return address the CPU saves) differs, and it is clobbered.
            Code::Syscall => Ok(Displaced::OutOfLine),
            _ => refuse(
                "far call, 16/32-bit call or system/virtualization call: \
                 only near 64-bit calls are emulated",
            ),
        },
        FlowControl::IndirectCall => match instr.code() {
            Code::Call_rm64 => Ok(Displaced::Call(indirect_target(instr, addr)?)),
            _ => refuse("far or 16-bit indirect call: only near 64-bit calls are emulated"),
        },
        FlowControl::Interrupt => refuse(
            "interrupt instruction (int3, int1, int n, into): probing a trap \
             instruction would confuse its own trap with the probe's",
        ),
        FlowControl::XbeginXabortXend => refuse(
            "xbegin (RTM): its abort target is relative, and the trap aborts \
             the transaction anyway",
        ),
        FlowControl::Exception => refuse(
            "ud0/ud1/ud2 raises #UD on purpose; out of line it would fault at \
             the stub address",
        ),
    }
}

/// The target of `call r/m64` or `jmp r/m64`.
fn indirect_target(instr: &Instruction, addr: usize) -> Result<Target> {
    let refuse = |reason: &'static str| Err(Error::unsupported(addr, reason));
    match instr.op0_kind() {
        OpKind::Register => match gpr64(instr.op0_register()) {
            Some(r) => Ok(Target::Reg(r)),
            None => refuse("indirect branch through an unexpected register"),
        },
        OpKind::Memory => {
            if matches!(instr.segment_prefix(), Register::FS | Register::GS) {
                return refuse(
                    "indirect branch through fs:/gs: memory: the emulator reads \
                     memory without a segment base",
                );
            }
            if instr.memory_base() == Register::RIP {
                return Ok(Target::Mem(MemOperand {
                    base: None,
                    index: None,
                    scale: 1,
                    disp: instr.ip_rel_memory_address() as i64,
                }));
            }
            // With a 0x67 prefix the registers are 32-bit and the address
            // wraps at 4 GiB, which `MemOperand` cannot express.
            let reg = |r: Register| match r {
                Register::None => Some(None),
                r => gpr64(r).map(Some),
            };
            let (Some(base), Some(index)) = (reg(instr.memory_base()), reg(instr.memory_index()))
            else {
                return refuse("indirect branch with 32-bit addressing (0x67 prefix)");
            };
            Ok(Target::Mem(MemOperand {
                base,
                index,
                scale: instr.memory_index_scale() as u8,
                disp: instr.memory_displacement64() as i64,
            }))
        }
        _ => refuse("unexpected operand of an indirect branch"),
    }
}

/// A 64-bit general-purpose register in probert's numbering.
fn gpr64(r: Register) -> Option<Reg> {
    Some(match r {
        Register::RAX => Reg::Rax,
        Register::RBX => Reg::Rbx,
        Register::RCX => Reg::Rcx,
        Register::RDX => Reg::Rdx,
        Register::RSI => Reg::Rsi,
        Register::RDI => Reg::Rdi,
        Register::RBP => Reg::Rbp,
        Register::RSP => Reg::Rsp,
        Register::R8 => Reg::R8,
        Register::R9 => Reg::R9,
        Register::R10 => Reg::R10,
        Register::R11 => Reg::R11,
        Register::R12 => Reg::R12,
        Register::R13 => Reg::R13,
        Register::R14 => Reg::R14,
        Register::R15 => Reg::R15,
        _ => return None,
    })
}

/// The opcode nibble of a condition code.
fn cond_of(cc: ConditionCode) -> Option<Cond> {
    Some(Cond(match cc {
        ConditionCode::o => 0x0,
        ConditionCode::no => 0x1,
        ConditionCode::b => 0x2,
        ConditionCode::ae => 0x3,
        ConditionCode::e => 0x4,
        ConditionCode::ne => 0x5,
        ConditionCode::be => 0x6,
        ConditionCode::a => 0x7,
        ConditionCode::s => 0x8,
        ConditionCode::ns => 0x9,
        ConditionCode::p => 0xA,
        ConditionCode::np => 0xB,
        ConditionCode::l => 0xC,
        ConditionCode::ge => 0xD,
        ConditionCode::le => 0xE,
        ConditionCode::g => 0xF,
        ConditionCode::None => return None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: usize = 0x40_1000;

    fn kind(code: &[u8]) -> Displaced {
        analyze(code, A).unwrap().displaced
    }

    fn refused(code: &[u8]) -> String {
        match analyze(code, A) {
            Err(Error::UnsupportedInstruction { addr, reason }) => {
                assert_eq!(addr, A);
                reason.into_owned()
            }
            other => panic!("{code:02x?} should be refused, got {other:?}"),
        }
    }

    /// `base` with a little-endian `disp32` appended.
    fn with32(base: &[u8], d: i32) -> Vec<u8> {
        let mut v = base.to_vec();
        v.extend_from_slice(&d.to_le_bytes());
        v
    }

    #[test]
    fn push_reg() {
        let d = analyze(&[0x55], A).unwrap();
        assert_eq!(d.len, 1);
        assert_eq!(d.displaced, Displaced::Push(Reg::Rbp));
        assert_eq!(disassemble(&[0x55], A), "push rbp");
        assert_eq!(disassemble(&with32(&[0xe8], 0x100), A), "call 0x401105");
        let code = [0x64, 0x48, 0x8b, 0x04, 0x25, 0x28, 0, 0, 0];
        assert_eq!(disassemble(&code, A), "mov rax, fs:[0x28]");
        assert_eq!(kind(&[0x41, 0x57]), Displaced::Push(Reg::R15));
        assert_eq!(kind(&[0x54]), Displaced::Push(Reg::Rsp));
        // push imm / push [mem] run out of line.
        assert_eq!(kind(&[0x6a, 0x01]), Displaced::OutOfLine);
        assert_eq!(kind(&[0xff, 0x30]), Displaced::OutOfLine);
    }

    #[test]
    fn nops_and_endbr_are_skipped_but_not_pause() {
        for code in [
            &[0x90][..],
            &[0x66, 0x90],
            &[0x0f, 0x1f, 0x00],
            &[0x0f, 0x1f, 0x44, 0x00, 0x00],
            &[0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
            &[0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
            &[0xf3, 0x0f, 0x1e, 0xfa],
            &[0xf3, 0x0f, 0x1e, 0xfb],
        ] {
            let d = analyze(code, A).unwrap();
            assert_eq!(d.displaced, Displaced::Skip, "{code:02x?}");
            assert_eq!(usize::from(d.len), code.len());
        }
        assert_eq!(kind(&[0xf3, 0x90]), Displaced::OutOfLine);
        // `41 90` is `xchg r8d, eax`, not a NOP.
        assert_eq!(kind(&[0x41, 0x90]), Displaced::OutOfLine);
    }

    #[test]
    fn calls() {
        let d = analyze(&with32(&[0xe8], 0x100), A).unwrap();
        assert_eq!(d.len, 5);
        assert_eq!(
            d.displaced,
            Displaced::Call(Target::Abs(A as u64 + 5 + 0x100))
        );
        assert_eq!(
            kind(&with32(&[0xe8], -0x2000)),
            Displaced::Call(Target::Abs(A as u64 + 5 - 0x2000))
        );
        assert_eq!(kind(&[0xff, 0xd0]), Displaced::Call(Target::Reg(Reg::Rax)));
        assert_eq!(
            kind(&[0x41, 0xff, 0xd3]),
            Displaced::Call(Target::Reg(Reg::R11))
        );
        let d = analyze(&with32(&[0xff, 0x15], 0x20), A).unwrap();
        assert_eq!(d.len, 6);
        assert_eq!(
            d.displaced,
            Displaced::Call(Target::Mem(MemOperand {
                base: None,
                index: None,
                scale: 1,
                disp: (A + 6 + 0x20) as i64,
            }))
        );
        assert_eq!(
            kind(&[0xff, 0x14, 0x24]),
            Displaced::Call(Target::Mem(MemOperand {
                base: Some(Reg::Rsp),
                index: None,
                scale: 1,
                disp: 0,
            }))
        );
        // call [r12 + r13*8 - 8]
        assert_eq!(
            kind(&[0x43, 0xff, 0x54, 0xec, 0xf8]),
            Displaced::Call(Target::Mem(MemOperand {
                base: Some(Reg::R12),
                index: Some(Reg::R13),
                scale: 8,
                disp: -8,
            }))
        );
        // notrack call rax (CET): the 3e prefix changes nothing here.
        assert_eq!(
            kind(&[0x3e, 0xff, 0xd0]),
            Displaced::Call(Target::Reg(Reg::Rax))
        );
    }

    #[test]
    fn jumps() {
        assert_eq!(
            kind(&[0xeb, 0x10]),
            Displaced::Jmp(Target::Abs(A as u64 + 2 + 0x10))
        );
        assert_eq!(kind(&[0xeb, 0xfe]), Displaced::Jmp(Target::Abs(A as u64)));
        assert_eq!(
            kind(&with32(&[0xe9], 0x1234)),
            Displaced::Jmp(Target::Abs(A as u64 + 5 + 0x1234))
        );
        assert_eq!(
            kind(&[0x41, 0xff, 0xe7]),
            Displaced::Jmp(Target::Reg(Reg::R15))
        );
        assert_eq!(
            kind(&with32(&[0xff, 0x25], 0)),
            Displaced::Jmp(Target::Mem(MemOperand {
                base: None,
                index: None,
                scale: 1,
                disp: (A + 6) as i64,
            }))
        );
    }

    #[test]
    fn conditional_branches() {
        assert_eq!(
            kind(&[0x74, 0x05]),
            Displaced::Jcc {
                cond: Cond(4),
                target: A as u64 + 7
            }
        );
        assert_eq!(
            kind(&with32(&[0x0f, 0x84], -16)),
            Displaced::Jcc {
                cond: Cond(4),
                target: A as u64 + 6 - 16
            }
        );
        for cc in 0..16u8 {
            assert_eq!(
                kind(&[0x70 + cc, 0x00]),
                Displaced::Jcc {
                    cond: Cond(cc),
                    target: A as u64 + 2
                }
            );
            assert_eq!(
                kind(&with32(&[0x0f, 0x80 + cc], 0)),
                Displaced::Jcc {
                    cond: Cond(cc),
                    target: A as u64 + 6
                }
            );
        }
        for (op, k) in [
            (0xe2, LoopKind::Loop),
            (0xe1, LoopKind::Loope),
            (0xe0, LoopKind::Loopne),
            (0xe3, LoopKind::Jrcxz),
        ] {
            assert_eq!(
                kind(&[op, 0xfe]),
                Displaced::Loop {
                    kind: k,
                    target: A as u64
                }
            );
        }
        assert!(refused(&[0x67, 0xe3, 0x00]).contains("0x67"));
        assert!(refused(&[0x67, 0xe2, 0x00]).contains("0x67"));
    }

    #[test]
    fn returns() {
        assert_eq!(kind(&[0xc3]), Displaced::Ret { pop: 0 });
        assert_eq!(kind(&[0xc2, 0x08, 0x00]), Displaced::Ret { pop: 8 });
        assert_eq!(kind(&[0xf3, 0xc3]), Displaced::Ret { pop: 0 });
        assert!(refused(&[0xcb]).contains("far"));
        assert!(refused(&[0x48, 0xcf]).contains("far")); // iretq
    }

    #[test]
    fn out_of_line() {
        for code in [
            with32(&[0x48, 0x8b, 0x05], 0x10),        // mov rax, [rip + 0x10]
            with32(&[0x48, 0x3b, 0x05], 0x10),        // cmp rax, [rip + 0x10]
            vec![0x48, 0x83, 0xec, 0x10],             // sub rsp, 16
            vec![0x48, 0x8b, 0x04, 0x24],             // mov rax, [rsp]
            with32(&[0xf0, 0x48, 0xff, 0x05], 0x100), // lock inc qword [rip + 0x100]
            with32(&[0x48, 0x8d, 0x05], -7),          // lea rax, [rip - 7]: itself, but no access
            vec![0x0f, 0x05],                         // syscall
            vec![0x48, 0x89, 0xe5],                   // mov rbp, rsp
            vec![0xc9],                               // leave
            vec![0x8b, 0x00],                         // mov eax, [rax]
            vec![0x67, 0x8b, 0x00],                   // mov eax, [eax]: no RIP involved
        ] {
            let d = analyze(&code, A).unwrap();
            assert_eq!(d.displaced, Displaced::OutOfLine, "{code:02x?}");
            assert_eq!(usize::from(d.len), code.len(), "{code:02x?}");
        }
        assert!(disassemble(&with32(&[0x48, 0x8b, 0x05], 0x10), A).starts_with("mov rax,"));
    }

    #[test]
    fn refusals() {
        assert!(refused(&[0xcc]).contains("interrupt"));
        assert!(refused(&[0xcd, 0x80]).contains("interrupt"));
        assert!(refused(&[0xf1]).contains("interrupt"));
        assert!(refused(&with32(&[0x67, 0x8b, 0x05], 0x10)).contains("EIP-relative"));
        assert!(refused(&[0xe8, 0x00]).contains("truncated"));
        assert!(refused(&[]).contains("truncated"));
        assert!(refused(&[0xc4]).contains("truncated"));
        assert!(refused(&[0x0f, 0xff, 0xc0, 0x0f]).contains("ud0"));
        assert!(refused(&[0xc4, 0x90, 0x90, 0x90, 0x90]).contains("invalid"));
        assert!(refused(&[0x06, 0x90, 0x90]).contains("invalid")); // push es: not in 64-bit mode
        assert!(refused(&[0x0f, 0x0b]).contains("ud2"));
        assert!(refused(&[0xf4]).contains("privileged")); // hlt
        assert!(refused(&[0xfa]).contains("privileged")); // cli
        assert!(refused(&[0x0f, 0x01, 0xd5]).contains("RTM")); // xend
        assert!(refused(&[0xc6, 0xf8, 0x01]).contains("RTM")); // xabort 1
        assert!(refused(&with32(&[0xc7, 0xf8], 0)).contains("xbegin"));
        assert!(refused(&[0xff, 0x18]).contains("far")); // call far [rax]
        assert!(refused(&[0xff, 0x28]).contains("far")); // jmp far [rax]
        assert!(refused(&[0x64, 0xff, 0x10]).contains("fs:/gs:")); // call fs:[rax]
        assert!(refused(&[0x65, 0xff, 0x20]).contains("fs:/gs:")); // jmp gs:[rax]
        assert!(refused(&[0x67, 0xff, 0x10]).contains("32-bit addressing")); // call [eax]
        assert!(refused(&with32(&[0x66, 0xe8], 0)).contains("Intel and AMD"));
        assert!(refused(&[0x66, 0xc3]).contains("Intel and AMD"));
        // inc dword [rip - 6]: the instruction increments its own first bytes.
        assert!(refused(&with32(&[0xff, 0x05], -6)).contains("own bytes"));
    }

    /// A deterministic xorshift generator (no external crates needed).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn arbitrary_gpr(rng: &mut Rng) -> Reg {
        Reg::ALL[(rng.next() % 16) as usize]
    }

    fn arbitrary_target(rng: &mut Rng) -> Target {
        match rng.next() % 3 {
            0 => Target::Abs(rng.next()),
            1 => Target::Reg(arbitrary_gpr(rng)),
            _ => Target::Mem(MemOperand {
                base: (rng.next() & 1 == 0).then(|| arbitrary_gpr(rng)),
                index: (rng.next() & 1 == 0).then(|| arbitrary_gpr(rng)),
                scale: [1, 2, 4, 8][(rng.next() % 4) as usize],
                disp: rng.next() as i64,
            }),
        }
    }

    fn arbitrary(rng: &mut Rng) -> Displaced {
        match rng.next() % 8 {
            0 => Displaced::Skip,
            1 => Displaced::Call(arbitrary_target(rng)),
            2 => Displaced::Jmp(arbitrary_target(rng)),
            3 => Displaced::Jcc {
                cond: Cond((rng.next() % 16) as u8),
                target: rng.next(),
            },
            4 => Displaced::Loop {
                kind: [
                    LoopKind::Loop,
                    LoopKind::Loope,
                    LoopKind::Loopne,
                    LoopKind::Jrcxz,
                ][(rng.next() % 4) as usize],
                target: rng.next(),
            },
            5 => Displaced::Push(arbitrary_gpr(rng)),
            6 => Displaced::Ret {
                pop: rng.next() as u16,
            },
            _ => Displaced::OutOfLine,
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for _ in 0..200_000 {
            let d = arbitrary(&mut rng);
            assert_eq!(Displaced::decode(d.encode()), Some(d), "{d:?}");
        }
        for d in [
            Displaced::Jcc {
                cond: Cond(0),
                target: u64::MAX,
            },
            Displaced::Ret { pop: u16::MAX },
            Displaced::Call(Target::Mem(MemOperand {
                base: Some(Reg::R15),
                index: Some(Reg::Rsp),
                scale: 8,
                disp: i64::MIN,
            })),
        ] {
            assert_eq!(Displaced::decode(d.encode()), Some(d));
        }
    }

    #[test]
    fn decode_rejects_what_encode_cannot_produce() {
        // Values `analyze` never makes encode to rejected words.
        for d in [
            Displaced::Push(Reg::Rip),
            Displaced::Push(Reg::Rflags),
            Displaced::Call(Target::Reg(Reg::Rip)),
            Displaced::Jcc {
                cond: Cond(16),
                target: 0,
            },
            Displaced::Jmp(Target::Mem(MemOperand {
                base: Some(Reg::Rip),
                index: None,
                scale: 1,
                disp: 0,
            })),
            Displaced::Jmp(Target::Mem(MemOperand {
                base: None,
                index: None,
                scale: 3,
                disp: 0,
            })),
        ] {
            assert_eq!(Displaced::decode(d.encode()), None, "{d:?}");
        }
        assert_eq!(Displaced::decode([0; 3]), None);
        assert_eq!(Displaced::decode([u64::MAX; 3]), None);

        let mut rng = Rng(0xdead_beef_cafe_f00d);
        for _ in 0..100_000 {
            let a = arbitrary(&mut rng).encode();
            let b = arbitrary(&mut rng).encode();
            // Random words, and torn mixes of two encodings, never panic;
            // whatever decodes must re-encode to exactly the input.
            let r = [rng.next(), rng.next(), rng.next()];
            let mut magic = r;
            magic[0] = (magic[0] & !(0xFF << 56)) | (MAGIC << 56);
            for words in [
                r,
                magic,
                [a[0], b[1], a[2]],
                [a[0], a[1], b[2]],
                [b[0], a[1], a[2]],
            ] {
                if let Some(d) = Displaced::decode(words) {
                    assert_eq!(d.encode(), words);
                }
            }
            // Flipping any single bit of a valid encoding is detected.
            let bit = rng.next() % 192;
            let mut flipped = a;
            flipped[(bit / 64) as usize] ^= 1 << (bit % 64);
            assert_eq!(Displaced::decode(flipped), None, "{a:x?} bit {bit}");
        }
    }

    #[test]
    fn boundaries() {
        // push rbp; mov rbp, rsp; sub rsp, 16; ret
        let code = [0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x10, 0xc3];
        for off in [0, 1, 4, 8] {
            assert_eq!(check_boundary(&code, A, A + off), Ok(()), "{off}");
        }
        for off in [2, 3, 5, 6, 7] {
            assert_eq!(
                check_boundary(&code, A, A + off),
                Err(Error::Misaligned {
                    addr: A + off,
                    func: A
                }),
                "{off}"
            );
        }
        // Past the bytes we were given: nothing to check against.
        assert_eq!(check_boundary(&code, A, A + 9), Ok(()));
        assert_eq!(check_boundary(&code, A, A + 100), Ok(()));
        assert!(matches!(
            check_boundary(&code, A, A - 1),
            Err(Error::InvalidArgument(_))
        ));
        // Invalid bytes (data in code) before addr: cannot prove misalignment.
        let data = [0x55, 0x06, 0x06, 0x48, 0x89, 0xe5];
        assert_eq!(check_boundary(&data, A, A + 4), Ok(()));
        assert_eq!(check_boundary(&[], A, A), Ok(()));
    }
}
