//! What a handler's machine code may change besides the general-purpose
//! registers, by class, so that the fast path saves exactly that.
//!
//! The trampoline always saves and restores the general-purpose registers
//! a call may change and the flags; the other GPRs too when a handler may
//! see its frame ([`Clobbers::FRAME`]: the handler sees them all).
//! Everything else — vector registers, opmasks, the x87 stack, MXCSR,
//! `errno` — it saves only for the classes the probe's handlers may change:
//! a handler that counts hits with one atomic add needs none of it, and
//! saving all of it would cost four times an XRay handler call on this
//! kind of machine.
//!
//! # The analysis of one function
//!
//! [`function_effects`] decodes a function linearly over its exact extent
//! and takes the union of what each instruction may change ([`Clobbers`];
//! each class's constant says which instructions set it), as `iced-x86`
//! reports its register and memory accesses, encoding and CPUID features.
//! It lists the function's direct callees and the targets of its branches
//! that leave it (tail calls, `foo.cold`), for the caller to analyse in
//! turn ([`Callee`]); a call or jump through a RIP-relative pointer slot
//! (`call [rip + got]`, a PLT stub's `jmp`) is a callee named by its slot,
//! which the caller may trust or not. Other indirect jumps go to the
//! jump-table recogniser ([`FunctionFlow`]); table targets outside the
//! function are callees. The answer is *unknowable* ([`Unknowable`]) for
//! any other indirect call or jump, bytes that do not decode, a branch
//! into the middle of an instruction, and instructions that change state
//! no class describes: `xsave*`/`xrstor*`/`fxsave`/`fxrstor`, privileged
//! and I/O instructions, segment and thread-pointer writes (`mov fs`,
//! `wrfsbase`), `popf` (AC, TF), far returns, `int`/`int3`/`sysenter`,
//! transactions, `wrpkru`, shadow-stack and user-interrupt instructions,
//! AMX tiles. `syscall` is fine: the kernel preserves all register state
//! but `rax`, `rcx` and `r11`, and a raw system call does not touch
//! `errno`.
//!
//! A call directly followed by `ud2`, or that is the function's last
//! instruction, *cannot return* (Rust's `call core::panicking::*; ud2`,
//! gcc's `call __stack_chk_fail` at the end), whatever it calls: its
//! target is not a callee.
//!
//! # Why this is correct
//!
//! - *Every instruction is seen.* With exact bounds, the linear decode of
//!   compiler output is the set of instructions that can execute in the
//!   function: every direct branch target inside it is checked to be an
//!   instruction start, jump-table targets too ([`FunctionFlow`]), and
//!   control leaves it only through calls, returns and branches whose
//!   targets are callees. Dead code only adds classes.
//! - *Every instruction's effect is in a class or unknowable.* Registers
//!   come from `iced-x86`'s per-instruction tables (implicit operands
//!   included); what those do not show (the x87 stack of `fld`, MXCSR,
//!   errno, system flags) is decided by encoding, CPUID feature and
//!   mnemonic, each rule erring towards a class or towards unknowable.
//! - *A call that cannot return adds nothing.* If it returned, the next
//!   instruction would be `ud2` or whatever follows the function: the
//!   probed code never resumes. It can still *unwind*, but the unwinder's
//!   first phase only searches, and cleanups run only once it has found a
//!   frame that catches. The trampoline has no unwind information, so
//!   without a catching frame in the handler's own tree the search ends
//!   there and the process aborts before any handler code runs again. A
//!   frame that catches resumes normal flow only after taking the exception
//!   over (`__cxa_end_catch`, Rust's `cleanup` of the payload), which leads
//!   to `_Unwind_DeleteException`: in another module, or calling the
//!   exception's cleanup through a pointer. Either way such a tree is
//!   [`Clobbers::ALL`]. Likewise `longjmp` back into the tree needs a
//!   `setjmp` in it: a call into the C library.
//!
//! Assumed: the bytes are the function's code (probert's own `int3`s and
//! jumps in them only make the answer more conservative), and the system
//! calls made are ordinary (not `rt_sigreturn` or `arch_prctl(ARCH_SET_FS)`).

use std::borrow::Cow;
use std::fmt;

use iced_x86::{
    CpuidFeature, Decoder, DecoderOptions, EncodingKind, FlowControl, Formatter, Instruction,
    InstructionInfoFactory, IntelFormatter, MemorySize, Mnemonic, OpAccess, OpKind, Register,
};

use super::flow::{FunctionFlow, PointerJumps};

/// Classes of register state beyond the general-purpose registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Clobbers(pub u32);

impl Clobbers {
    /// Nothing beyond the general-purpose registers and the flags.
    pub const NONE: Clobbers = Clobbers(0);
    /// The low 128 bits of xmm0–15, and MXCSR (legacy SSE instructions).
    ///
    /// Set by writes of xmm/ymm/zmm0–15; by `ldmxcsr`/`vldmxcsr`; and, for
    /// MXCSR's sticky exception flags, by every instruction that reads or
    /// writes a vector register of any width or index or has a
    /// floating-point memory operand (`cvttsd2si rax, [rdi]`). Integer
    /// vector instructions are not told from floating-point ones: where
    /// [`VECTOR`](Self::VECTOR) must be saved, SSE costs little more.
    pub const SSE: Clobbers = Clobbers(1 << 0);
    /// The upper bits of ymm/zmm0–15 and all of zmm16–31 (any VEX or EVEX
    /// instruction that writes a vector register, `vzeroupper`).
    ///
    /// Set by writes of ymm/zmm (any encoding) and xmm16–31, by any VEX,
    /// EVEX, XOP or MVEX instruction writing a vector register (VEX.128
    /// zeroes the upper bits), and by `vzeroupper` and `vzeroall`.
    pub const VECTOR: Clobbers = Clobbers(1 << 1);
    /// The AVX-512 opmask registers k0–7 (any instruction writing one,
    /// gathers and scatters included).
    pub const OPMASK: Clobbers = Clobbers(1 << 2);
    /// The x87 stack and control/status words (and MMX, which aliases it).
    ///
    /// Set by any x87, MMX or 3DNow! instruction (by CPUID feature, or by
    /// an st/mm operand: SSE instructions on mm registers too), and `fwait`.
    pub const X87: Clobbers = Clobbers(1 << 3);
    /// The C library's `errno` of the thread.
    ///
    /// Set by any write through the `fs` segment (`errno` is a thread-local
    /// variable: `mov fs:[rax], edx`), and by any read of a thread pointer,
    /// through which `errno` can be written with a plain store:
    /// `rdfsbase`, and `fs` reads of the thread control block's first words
    /// (`fs:[0]`, what `__errno_location` adds to) or at an offset held in a
    /// register. Reads of static TLS variables and of the stack guard
    /// (`fs:[0x28]`) are fine.
    pub const ERRNO: Clobbers = Clobbers(1 << 4);
    /// The registers of the frame the handler is given (`hit->regs`): read
    /// or written, the frame must hold every general-purpose register, and
    /// the trampoline restores them all from it. Without this class it
    /// saves only what the call itself may change (the ABI's caller-saved
    /// registers and the flags).
    ///
    /// Set by any function that calls or branches out (a callee may be
    /// passed the hit) — but not for a call that cannot return (a panic):
    /// the probed code never resumes, so no register it would read is
    /// missing — and by any use of `rdi` — the hit pointer at entry
    /// — other than as the base of a load or store within the hit's fields
    /// outside `regs` (`mov rax, [rdi + 16]`, its user data). The rule
    /// holds for every function of the walk, so it applies to the
    /// handler's own; it is flow-insensitive (a use of `rdi` after it was
    /// overwritten counts too). Assumed: a handler reaches the registers
    /// only through its hit, not by reading its caller's stack.
    pub const FRAME: Clobbers = Clobbers(1 << 5);
    /// Everything: what an unknown handler may change.
    pub const ALL: Clobbers = Clobbers(0x3F);

    /// The union.
    pub const fn union(self, other: Clobbers) -> Clobbers {
        Clobbers(self.0 | other.0)
    }

    /// Whether every class of `self` is in `other`.
    pub const fn within(self, other: Clobbers) -> bool {
        self.0 & !other.0 == 0
    }
}

impl fmt::Display for Clobbers {
    /// `none`, or the classes joined by `|`: `sse|vector`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(Clobbers, &str); 6] = [
            (Clobbers::SSE, "sse"),
            (Clobbers::VECTOR, "vector"),
            (Clobbers::OPMASK, "opmask"),
            (Clobbers::X87, "x87"),
            (Clobbers::ERRNO, "errno"),
            (Clobbers::FRAME, "frame"),
        ];
        let mut sep = "";
        for (c, name) in NAMES {
            if c.within(*self) {
                write!(f, "{sep}{name}")?;
                sep = "|";
            }
        }
        if sep.is_empty() {
            f.write_str("none")?;
        }
        Ok(())
    }
}

/// Where a call or jump that leaves a function goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Callee {
    /// To this address.
    Direct(usize),
    /// To the address held by the 8-byte pointer at this address:
    /// `call [rip + slot]`, `jmp [rip + slot]` (a GOT entry, a PLT stub's
    /// jump). Whether the slot can be trusted to keep its value is the
    /// caller's question.
    Through(usize),
}

/// What one function's code may do, from [`function_effects`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionEffects {
    /// The classes its own instructions may change; [`Clobbers::ALL`] if
    /// `unknown` is set.
    pub clobbers: Clobbers,
    /// What it calls or branches to outside itself (calls, tail calls,
    /// jump-table targets), sorted, each once; empty if `unknown` is set.
    /// Their effects are the function's too.
    pub callees: Vec<Callee>,
    /// The calls that cannot return (see the module docs), whose targets
    /// are not followed, sorted.
    pub noreturn_calls: Vec<usize>,
    /// Why nothing can be said, if that is so (the first reason found).
    pub unknown: Option<Unknowable>,
}

impl FunctionEffects {
    fn unknowable(why: Unknowable) -> FunctionEffects {
        FunctionEffects {
            clobbers: Clobbers::ALL,
            callees: Vec::new(),
            noreturn_calls: Vec::new(),
            unknown: Some(why),
        }
    }
}

/// Why a function's effects cannot be known from its code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unknowable {
    /// Decoding failed (data in code, or bounds that cut an instruction).
    #[error("the bytes at {at:#x} do not decode as an instruction")]
    Undecodable {
        /// The first undecodable byte.
        at: usize,
    },
    /// A call through a register or memory.
    #[error("`{insn}` at {at:#x} calls an address known only at run time")]
    IndirectCall {
        /// The call.
        at: usize,
        /// It, disassembled.
        insn: String,
    },
    /// An indirect jump that is not a bounded jump table (a tail call
    /// through a pointer, a PLT stub).
    #[error("the indirect jump at {at:#x} cannot be bounded: {why}")]
    IndirectJump {
        /// The jump.
        at: usize,
        /// What the jump-table recogniser said.
        why: String,
    },
    /// An instruction that changes state no class describes.
    #[error("`{insn}` at {at:#x} {why}")]
    Instruction {
        /// The instruction.
        at: usize,
        /// It, disassembled.
        insn: String,
        /// What it does, completing the sentence.
        why: &'static str,
    },
    /// A direct branch lands inside an instruction of the linear decode:
    /// the instructions that run are not the ones decoded.
    #[error("the branch at {from:#x} lands at {target:#x}, inside an instruction")]
    MisalignedTarget {
        /// The branch.
        from: usize,
        /// Its target.
        target: usize,
    },
}

/// Analyses the function whose bytes are `code`, mapped at `start` (its
/// exact extent): the classes its instructions may change, its callees, or
/// why that is unknowable (module docs). `read` reads memory without
/// faulting (`false` if it cannot), for jump tables.
///
/// Normal context only (allocates).
pub fn function_effects(
    code: &[u8],
    start: usize,
    read: &dyn Fn(usize, &mut [u8]) -> bool,
) -> FunctionEffects {
    let end = start + code.len();
    let mut instrs = Vec::with_capacity(code.len() / 4 + 1);
    let mut decoder = Decoder::with_ip(64, code, start as u64, DecoderOptions::NONE);
    while decoder.can_decode() {
        let i = decoder.decode();
        if i.is_invalid() {
            return FunctionEffects::unknowable(Unknowable::Undecodable {
                at: i.ip() as usize,
            });
        }
        instrs.push(i);
    }

    let mut factory = InstructionInfoFactory::new();
    let mut clobbers = Clobbers::NONE;
    let mut callees = Vec::new();
    let mut noreturn_calls = Vec::new();
    let mut inside_targets = Vec::new();
    let mut indirect_jumps = Vec::new();
    let mut slot_jumps = Vec::new();
    for (k, i) in instrs.iter().enumerate() {
        let at = i.ip() as usize;
        if reaches_frame(i, &mut factory) {
            clobbers = clobbers.union(Clobbers::FRAME);
        }
        match instruction_clobbers(i, &mut factory) {
            Ok(c) => clobbers = clobbers.union(c),
            Err(why) => {
                return FunctionEffects::unknowable(Unknowable::Instruction {
                    at,
                    insn: disassemble(i),
                    why,
                })
            }
        }
        let direct = matches!(
            i.op0_kind(),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        );
        let target = i.near_branch_target() as usize;
        // `call`/`jmp qword [rip + slot]`: through a pointer the walk may read.
        let slot = (i.op0_kind() == OpKind::Memory
            && i.memory_base() == Register::RIP
            && i.memory_size() == MemorySize::QwordOffset)
            .then(|| i.ip_rel_memory_address() as usize);
        match i.flow_control() {
            FlowControl::Next | FlowControl::Return | FlowControl::Exception => {}
            FlowControl::Call | FlowControl::IndirectCall if i.mnemonic() == Mnemonic::Call => {
                let cannot_return = instrs
                    .get(k + 1)
                    .map_or(true, |n| n.mnemonic() == Mnemonic::Ud2);
                if cannot_return {
                    noreturn_calls.push(at);
                } else if let Some(slot) = slot {
                    callees.push(Callee::Through(slot));
                } else if !direct {
                    return FunctionEffects::unknowable(Unknowable::IndirectCall {
                        at,
                        insn: disassemble(i),
                    });
                } else if (start..end).contains(&target) {
                    inside_targets.push((at, target));
                } else {
                    callees.push(Callee::Direct(target));
                }
            }
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch if direct => {
                if (start..end).contains(&target) {
                    inside_targets.push((at, target));
                } else {
                    callees.push(Callee::Direct(target));
                }
            }
            FlowControl::IndirectBranch if slot.is_some() => {
                callees.extend(slot.map(Callee::Through));
                slot_jumps.push((at - start, i.len()));
            }
            FlowControl::IndirectBranch
                if !matches!(
                    i.memory_size(),
                    MemorySize::SegPtr16 | MemorySize::SegPtr32 | MemorySize::SegPtr64
                ) =>
            {
                indirect_jumps.push(at);
            }
            // `syscall` (a `Call` to iced) changes only rax, rcx and r11.
            FlowControl::Call if i.mnemonic() == Mnemonic::Syscall => {}
            // Far branches and calls, `xbegin`, `int`, `vmcall`...: refused
            // above, or here if the tables above missed one.
            _ => {
                return FunctionEffects::unknowable(Unknowable::Instruction {
                    at,
                    insn: disassemble(i),
                    why: "transfers control in a way the analysis does not follow",
                })
            }
        }
    }
    for (from, target) in inside_targets {
        if instrs
            .binary_search_by_key(&(target as u64), Instruction::ip)
            .is_err()
        {
            return FunctionEffects::unknowable(Unknowable::MisalignedTarget { from, target });
        }
    }
    if !indirect_jumps.is_empty() {
        // The recogniser would refuse the jumps through slots (pointer
        // jumps); they end a path as a `ret` does, so it sees `ret`s.
        let mut patched = Cow::Borrowed(code);
        for &(off, len) in &slot_jumps {
            patched.to_mut()[off..off + len].fill(0xC3);
        }
        let mut flow = FunctionFlow::analyze(&patched, start, &[], read, PointerJumps::Anywhere);
        if let Some(r) = flow.unproven() {
            let at = match *r {
                super::flow::Refusal::UnboundedJump { at, .. } => at,
                _ => indirect_jumps[0],
            };
            return FunctionEffects::unknowable(Unknowable::IndirectJump {
                at,
                why: r.to_string(),
            });
        }
        // The flow's foreign targets whose source is an indirect jump are
        // its jump tables' targets outside the function.
        callees.extend(
            flow.take_foreign()
                .into_iter()
                .filter(|(_, from)| indirect_jumps.binary_search(from).is_ok())
                .map(|(target, _)| Callee::Direct(target)),
        );
    }
    callees.sort_unstable();
    callees.dedup();
    if !callees.is_empty() {
        // A callee may be passed the hit (`Clobbers::FRAME`).
        clobbers = clobbers.union(Clobbers::FRAME);
    }
    FunctionEffects {
        clobbers,
        callees,
        noreturn_calls,
        unknown: None,
    }
}

/// The bytes of the handler's `Hit` (`crate::hit::Hit`), and where its
/// `regs` pointer lies in it.
const HIT_SIZE: i64 = 40;
const HIT_REGS: std::ops::Range<i64> = 8..16;

/// Whether `i` may lead to the register frame, taking `rdi` for the hit
/// pointer (see [`Clobbers::FRAME`]): it uses `rdi` other than as the base
/// of one memory operand, without index, within the hit and outside its
/// `regs` field.
fn reaches_frame(i: &Instruction, factory: &mut InstructionInfoFactory) -> bool {
    let is_rdi = |r: Register| r.full_register() == Register::RDI;
    let info = factory.info(i);
    if !info.used_registers().iter().any(|u| is_rdi(u.register())) {
        return false;
    }
    let mut base_use = false;
    for k in 0..i.op_count() {
        match i.op_kind(k) {
            OpKind::Register
                if is_rdi(i.op_register(k))
                    && !matches!(info.op_access(k), OpAccess::Write | OpAccess::None) =>
            {
                return true;
            }
            OpKind::Memory if is_rdi(i.memory_base()) || is_rdi(i.memory_index()) => {
                let d = i.memory_displacement64() as i64;
                let end = d.saturating_add(i.memory_size().size() as i64);
                // `lea` copies the pointer (to a field, from which `regs`
                // is a displacement away) instead of accessing the field.
                let inside = i.mnemonic() != Mnemonic::Lea
                    && i.memory_base() == Register::RDI
                    && i.memory_index() == Register::None
                    && d >= 0
                    && end <= HIT_SIZE
                    && (end <= HIT_REGS.start || d >= HIT_REGS.end);
                if !inside {
                    return true;
                }
                base_use = true;
            }
            OpKind::Memory | OpKind::Register => {}
            // `stos`/`movs`/`scas`... address through `rdi` implicitly.
            OpKind::MemoryESRDI | OpKind::MemoryESEDI | OpKind::MemoryESDI => return true,
            _ => {}
        }
    }
    // Any other read of `rdi` (an implicit operand) reaches it too.
    !base_use
        && info.used_registers().iter().any(|u| {
            is_rdi(u.register()) && !matches!(u.access(), OpAccess::Write | OpAccess::None)
        })
}

/// What one instruction may change, or why it makes the function's
/// effects unknowable (a phrase completing "`insn` at ADDR ...").
fn instruction_clobbers(
    i: &Instruction,
    factory: &mut InstructionInfoFactory,
) -> Result<Clobbers, &'static str> {
    use Mnemonic as M;
    if i.is_save_restore_instruction() {
        return Err("saves or restores register state wholesale");
    }
    if i.is_privileged() || !i.op_code().cpl3() {
        return Err("is privileged or does I/O: it faults in user mode");
    }
    let refused = match i.mnemonic() {
        M::Popf | M::Popfd | M::Popfq => "may change system flags (AC, TF) nothing restores",
        M::Iret | M::Iretd | M::Iretq | M::Retf | M::Uiret => "returns far or from an interrupt",
        M::Wrfsbase | M::Wrgsbase => "moves a segment base (the thread pointer)",
        M::Wrpkru => "changes the protection-key rights (PKRU)",
        M::Incsspd | M::Incsspq | M::Rstorssp | M::Saveprevssp | M::Setssbsy | M::Clrssbsy => {
            "changes the shadow stack"
        }
        M::Clui | M::Stui | M::Senduipi => "changes user-interrupt state",
        M::Xbegin | M::Xabort | M::Xend => "starts or ends a hardware transaction",
        M::Sysenter | M::Sysexit | M::Sysexitq | M::Sysret | M::Sysretq => {
            "enters or leaves the kernel other than by syscall"
        }
        M::Enclu | M::Enclv | M::Vmfunc | M::Vmcall | M::Vmmcall | M::Vmgexit => {
            "calls an enclave or the hypervisor"
        }
        M::Int | M::Int1 | M::Int3 | M::Into => "raises a software interrupt or trap",
        M::Vzeroupper => return Ok(Clobbers::VECTOR),
        _ => "",
    };
    if !refused.is_empty() {
        return Err(refused);
    }

    let mut c = Clobbers::NONE;
    let x87 = i.encoding() == EncodingKind::D3NOW
        || i.cpuid_features().iter().any(|f| {
            matches!(
                f,
                CpuidFeature::FPU
                    | CpuidFeature::FPU287
                    | CpuidFeature::FPU287XL_ONLY
                    | CpuidFeature::FPU387
                    | CpuidFeature::FPU387SL_ONLY
                    | CpuidFeature::MMX
                    | CpuidFeature::D3NOW
                    | CpuidFeature::D3NOWEXT
                    | CpuidFeature::CYRIX_D3NOW
                    | CpuidFeature::CYRIX_FPU
                    | CpuidFeature::CYRIX_EMMI
            )
        })
        || i.mnemonic() == M::Wait;
    if x87 {
        c = c.union(Clobbers::X87);
    } else if is_float(i.memory_size()) {
        c = c.union(Clobbers::SSE);
    }
    match i.mnemonic() {
        M::Ldmxcsr | M::Vldmxcsr => c = c.union(Clobbers::SSE),
        M::Rdfsbase => c = c.union(Clobbers::ERRNO),
        _ => {}
    }

    let info = factory.info(i);
    let legacy = i.encoding() == EncodingKind::Legacy;
    for r in info.used_registers() {
        let reg = r.register();
        let write = matches!(
            r.access(),
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        );
        if reg.is_vector_register() {
            // Any vector operand may be a floating-point one (MXCSR).
            c = c.union(Clobbers::SSE);
            if write && (!legacy || !reg.is_xmm() || reg.number() >= 16) {
                c = c.union(Clobbers::VECTOR);
            }
        } else if reg.is_k() {
            if write {
                c = c.union(Clobbers::OPMASK);
            }
        } else if reg.is_st() || reg.is_mm() {
            c = c.union(Clobbers::X87);
        } else if write && reg.is_segment_register() {
            return Err("writes a segment register");
        } else if write
            && (reg.is_tmm() || reg.is_bnd() || reg.is_cr() || reg.is_dr() || reg.is_tr())
        {
            return Err("writes tile, bound, control or debug registers");
        }
    }
    for m in info.used_memory() {
        if m.segment() != Register::FS {
            continue;
        }
        let write = matches!(
            m.access(),
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        );
        // The thread control block's first words hold pointers to the
        // thread's TLS (tcb, dtv, self); 0x28 and 0x30 are the guards.
        let pointer_read =
            m.base() != Register::None || m.index() != Register::None || m.displacement() < 0x28;
        if write || pointer_read {
            c = c.union(Clobbers::ERRNO);
        }
    }
    Ok(c)
}

/// Whether a memory operand's elements are floating-point.
fn is_float(size: MemorySize) -> bool {
    matches!(
        size.element_type(),
        MemorySize::Float16
            | MemorySize::Float32
            | MemorySize::Float64
            | MemorySize::Float80
            | MemorySize::Float128
            | MemorySize::BFloat16
            | MemorySize::Packed32_Float16
            | MemorySize::Packed32_BFloat16
    )
}

/// `i` in Intel syntax, for messages.
fn disassemble(i: &Instruction) -> String {
    let mut s = String::new();
    IntelFormatter::new().format(i, &mut s);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the test functions are mapped.
    const A: usize = 0x40_1000;
    /// Another function, outside them.
    const B: usize = 0x50_0000;
    /// Where the jump-table test's table lives.
    const T: usize = 0x60_0000;

    fn no_memory(_: usize, _: &mut [u8]) -> bool {
        false
    }

    fn effects(code: &[u8]) -> FunctionEffects {
        function_effects(code, A, &no_memory)
    }

    /// `insn; ret`, which must be knowable.
    /// The classes of `insn; ret` but [`Clobbers::FRAME`] (which its use
    /// of `rdi` decides: see `the_frame_class_from_uses_of_rdi`).
    fn clobbers_of(insn: &[u8]) -> Clobbers {
        let code = [insn, &[0xC3]].concat();
        let e = effects(&code);
        assert_eq!(e.unknown, None, "{insn:02x?}");
        assert_eq!(e.callees, [], "{insn:02x?}");
        Clobbers(e.clobbers.0 & !Clobbers::FRAME.0)
    }

    #[test]
    fn the_frame_class_from_uses_of_rdi() {
        let frame = |insn: &[u8]| {
            let e = effects(&[insn, &[0xC3]].concat());
            assert_eq!(e.unknown, None, "{insn:02x?}");
            Clobbers::FRAME.within(e.clobbers)
        };
        let cases: &[(&str, &[u8], bool)] = &[
            ("xor eax, eax", &[0x31, 0xC0], false),
            // The hit's fields but `regs`: address, user data, session.
            ("mov rax, [rdi]", &[0x48, 0x8B, 0x07], false),
            ("mov rax, [rdi + 16]", &[0x48, 0x8B, 0x47, 0x10], false),
            (
                "lock inc qword [rdi + 16]",
                &[0xF0, 0x48, 0xFF, 0x47, 0x10],
                false,
            ),
            ("mov rdi, [rdi + 16]", &[0x48, 0x8B, 0x7F, 0x10], false),
            ("mov edi, 1", &[0xBF, 1, 0, 0, 0], false),
            // `regs`, or beyond what can be told.
            ("mov rax, [rdi + 8]", &[0x48, 0x8B, 0x47, 0x08], true),
            ("mov eax, [rdi + 12]", &[0x8B, 0x47, 0x0C], true),
            ("mov rax, [rdi + 4]", &[0x48, 0x8B, 0x47, 0x04], true),
            ("mov rax, [rdi + 40]", &[0x48, 0x8B, 0x47, 0x28], true),
            ("mov rax, [rdi - 8]", &[0x48, 0x8B, 0x47, 0xF8], true),
            ("mov rax, [rdi + rcx]", &[0x48, 0x8B, 0x04, 0x0F], true),
            ("mov rax, [rcx + rdi]", &[0x48, 0x8B, 0x04, 0x39], true),
            ("mov rax, rdi", &[0x48, 0x89, 0xF8], true),
            ("push rdi", &[0x57], true),
            ("lea rax, [rdi + 16]", &[0x48, 0x8D, 0x47, 0x10], true),
            ("add rdi, 8", &[0x48, 0x83, 0xC7, 0x08], true),
            ("stosb", &[0xAA], true),
            ("movsq", &[0x48, 0xA5], true),
        ];
        for &(name, insn, want) in cases {
            assert_eq!(frame(insn), want, "{name}");
        }
        // A call or a tail jump may pass the hit on.
        let mut call = vec![0xE8];
        call.extend_from_slice(&rel32(A, B));
        call.push(0xC3);
        assert!(Clobbers::FRAME.within(effects(&call).clobbers));
        let mut jmp = vec![0xE9];
        jmp.extend_from_slice(&rel32(A, B));
        assert!(Clobbers::FRAME.within(effects(&jmp).clobbers));
    }

    /// The rel32 of a 5-byte branch at `at` to `to`.
    fn rel32(at: usize, to: usize) -> [u8; 4] {
        ((to as i64 - (at as i64 + 5)) as i32).to_le_bytes()
    }

    #[test]
    fn each_class_from_its_instructions() {
        let sse = Clobbers::SSE;
        let vector = Clobbers::VECTOR.union(Clobbers::SSE);
        let cases: &[(&str, &[u8], Clobbers)] = &[
            ("ret", &[], Clobbers::NONE),
            (
                "lock add qword [rdi], 1",
                &[0xF0, 0x48, 0x83, 0x07, 0x01],
                Clobbers::NONE,
            ),
            ("pxor xmm0, xmm0", &[0x66, 0x0F, 0xEF, 0xC0], sse),
            ("addsd xmm0, xmm1", &[0xF2, 0x0F, 0x58, 0xC1], sse),
            ("movdqa xmm8, xmm9", &[0x66, 0x45, 0x0F, 0x6F, 0xC1], sse),
            ("ldmxcsr [rdi]", &[0x0F, 0xAE, 0x17], sse),
            // Writes only rax, but may set MXCSR's invalid/precision flags.
            ("cvttsd2si rax, [rdi]", &[0xF2, 0x48, 0x0F, 0x2C, 0x07], sse),
            ("vpaddd ymm0, ymm1, ymm2", &[0xC5, 0xF5, 0xFE, 0xC2], vector),
            // VEX.128 zeroes bits 128 and up.
            ("vpaddd xmm3, xmm1, xmm2", &[0xC5, 0xF1, 0xFE, 0xDA], vector),
            (
                "vmovdqu64 zmm17, [rdi]",
                &[0x62, 0xE1, 0xFE, 0x48, 0x6F, 0x0F],
                vector,
            ),
            ("vzeroupper", &[0xC5, 0xF8, 0x77], Clobbers::VECTOR),
            ("vzeroall", &[0xC5, 0xFC, 0x77], vector),
            // A compare of xmm16–31 writes only flags and MXCSR.
            (
                "vcomisd xmm16, xmm17",
                &[0x62, 0xA1, 0xFD, 0x08, 0x2F, 0xC1],
                sse,
            ),
            // Reads xmm0 (conservatively SSE), writes eax: no VECTOR.
            ("vmovd eax, xmm0", &[0xC5, 0xF9, 0x7E, 0xC0], sse),
            (
                "vpgatherdd xmm0, [rdi+xmm1*4], xmm2",
                &[0xC4, 0xE2, 0x69, 0x90, 0x04, 0x8F],
                vector,
            ),
            ("kmovw k1, eax", &[0xC5, 0xF8, 0x92, 0xC8], Clobbers::OPMASK),
            ("kortestw k0, k1", &[0xC5, 0xF8, 0x98, 0xC1], Clobbers::NONE),
            (
                "vptestmd k1, zmm0, zmm1",
                &[0x62, 0xF2, 0x7D, 0x48, 0x27, 0xC9],
                Clobbers::OPMASK.union(sse),
            ),
            (
                "fld qword [rdi]; fstp qword [rsi]",
                &[0xDD, 0x07, 0xDD, 0x1E],
                Clobbers::X87,
            ),
            ("fninit", &[0xDB, 0xE3], Clobbers::X87),
            ("fldcw [rdi]", &[0xD9, 0x2F], Clobbers::X87),
            ("emms", &[0x0F, 0x77], Clobbers::X87),
            ("movd mm0, eax", &[0x0F, 0x6E, 0xC0], Clobbers::X87),
            (
                "movq2dq xmm0, mm1",
                &[0xF3, 0x0F, 0xD6, 0xC1],
                Clobbers::X87.union(sse),
            ),
            ("mov fs:[rax], eax", &[0x64, 0x89, 0x00], Clobbers::ERRNO),
            (
                "mov rax, fs:[0]",
                &[0x64, 0x48, 0x8B, 0x04, 0x25, 0, 0, 0, 0],
                Clobbers::ERRNO,
            ),
            (
                "rdfsbase rax",
                &[0xF3, 0x48, 0x0F, 0xAE, 0xC0],
                Clobbers::ERRNO,
            ),
            // The stack guard and a static TLS variable's value.
            (
                "mov rax, fs:[0x28]",
                &[0x64, 0x48, 0x8B, 0x04, 0x25, 0x28, 0, 0, 0],
                Clobbers::NONE,
            ),
            (
                "mov eax, fs:[-8]",
                &[0x64, 0x8B, 0x04, 0x25, 0xF8, 0xFF, 0xFF, 0xFF],
                Clobbers::NONE,
            ),
            ("mov gs:[rax], eax", &[0x65, 0x89, 0x00], Clobbers::NONE),
            ("syscall", &[0x0F, 0x05], Clobbers::NONE),
            ("xgetbv", &[0x0F, 0x01, 0xD0], Clobbers::NONE),
            ("cpuid", &[0x0F, 0xA2], Clobbers::NONE),
            ("rdtsc", &[0x0F, 0x31], Clobbers::NONE),
            // BMI and SSE4.2 integer instructions touch no vector state.
            (
                "andn eax, ebx, ecx",
                &[0xC4, 0xE2, 0x60, 0xF2, 0xC1],
                Clobbers::NONE,
            ),
            (
                "crc32 eax, ecx",
                &[0xF2, 0x0F, 0x38, 0xF1, 0xC1],
                Clobbers::NONE,
            ),
            ("ud2", &[0x0F, 0x0B], Clobbers::NONE),
        ];
        for &(name, insn, want) in cases {
            assert_eq!(clobbers_of(insn), want, "{name}");
        }
    }

    #[test]
    fn state_management_and_privileged_instructions_are_unknowable() {
        let cases: &[(&str, &[u8], &str)] = &[
            ("xsave [rdi]", &[0x0F, 0xAE, 0x27], "wholesale"),
            ("fxrstor [rdi]", &[0x0F, 0xAE, 0x0F], "wholesale"),
            ("int3", &[0xCC], "interrupt"),
            ("int 0x80", &[0xCD, 0x80], "interrupt"),
            ("sysenter", &[0x0F, 0x34], "kernel"),
            (
                "wrfsbase rax",
                &[0xF3, 0x48, 0x0F, 0xAE, 0xD0],
                "thread pointer",
            ),
            ("mov fs, ax", &[0x8E, 0xE0], "segment register"),
            ("popfq", &[0x9D], "system flags"),
            ("in al, dx", &[0xEC], "privileged"),
        ];
        for &(name, insn, why_part) in cases {
            let e = effects(&[insn, &[0xC3]].concat());
            match &e.unknown {
                Some(Unknowable::Instruction { at, why, .. }) => {
                    assert_eq!(*at, A, "{name}");
                    assert!(why.contains(why_part), "{name}: {why}");
                }
                other => panic!("{name}: {other:?}"),
            }
            assert_eq!(e.clobbers, Clobbers::ALL, "{name}");
        }
        // An invalid opcode (`push es` does not exist in 64-bit mode), and an
        // instruction cut by the bounds.
        assert_eq!(
            effects(&[0x90, 0x06, 0xC3]).unknown,
            Some(Unknowable::Undecodable { at: A + 1 })
        );
        assert_eq!(
            effects(&[0xC3, 0xE8, 0x00]).unknown,
            Some(Unknowable::Undecodable { at: A + 1 })
        );
    }

    #[test]
    fn calls_and_tail_jumps_are_callees() {
        // call B; pxor xmm0, xmm0; jmp B + 0x40
        let mut code = vec![0xE8];
        code.extend_from_slice(&rel32(A, B));
        code.extend_from_slice(&[0x66, 0x0F, 0xEF, 0xC0, 0xE9]);
        code.extend_from_slice(&rel32(A + 9, B + 0x40));
        let e = effects(&code);
        assert_eq!(e.unknown, None);
        assert_eq!(e.clobbers, Clobbers::SSE.union(Clobbers::FRAME));
        assert_eq!(e.callees, [Callee::Direct(B), Callee::Direct(B + 0x40)]);
        assert_eq!(e.noreturn_calls, []);

        // test edi, edi; je B (a conditional tail call); call A (itself); ret
        let mut code = vec![0x85, 0xFF, 0x0F, 0x84];
        code.extend_from_slice(&rel32(A + 3, B)); // ends at A + 8
        code.push(0xE8);
        code.extend_from_slice(&rel32(A + 8, A));
        code.push(0xC3);
        let e = effects(&code);
        assert_eq!(e.unknown, None);
        assert_eq!(e.callees, [Callee::Direct(B)], "recursion is not a callee");
    }

    #[test]
    fn calls_that_cannot_return_are_not_followed() {
        // test edi, edi; jne ok; call B; ud2; ok: ret
        let mut code = vec![0x85, 0xFF, 0x75, 0x07, 0xE8];
        code.extend_from_slice(&rel32(A + 4, B));
        code.extend_from_slice(&[0x0F, 0x0B, 0xC3]);
        let e = effects(&code);
        assert_eq!((e.unknown.clone(), e.callees.clone()), (None, vec![]));
        assert_eq!(e.noreturn_calls, [A + 4]);

        // ret; call B (the last instruction: __stack_chk_fail)
        let mut code = vec![0xC3, 0xE8];
        code.extend_from_slice(&rel32(A + 1, B));
        let e = effects(&code);
        assert_eq!((e.unknown.clone(), e.callees.clone()), (None, vec![]));
        assert_eq!(e.noreturn_calls, [A + 1]);

        // The same through a pointer: call rax; ud2 cannot return either.
        let e = effects(&[0xFF, 0xD0, 0x0F, 0x0B]);
        assert_eq!(
            (e.unknown.clone(), e.noreturn_calls.clone()),
            (None, vec![A])
        );

        // But a call followed by anything else returns.
        let mut code = vec![0xE8];
        code.extend_from_slice(&rel32(A, B));
        code.push(0xC3);
        assert_eq!(effects(&code).callees, [Callee::Direct(B)]);
    }

    #[test]
    fn indirect_calls_and_jumps_are_unknowable() {
        let e = effects(&[0xFF, 0xD0, 0xC3]);
        assert!(matches!(
            e.unknown,
            Some(Unknowable::IndirectCall { at: A, ref insn }) if insn == "call rax"
        ));
        assert_eq!((e.clobbers, e.callees), (Clobbers::ALL, vec![]));
        // jmp rax, jmp [rax + 8], call [rdi]
        assert!(matches!(
            effects(&[0xFF, 0xE0]).unknown,
            Some(Unknowable::IndirectJump { at: A, .. })
        ));
        assert!(matches!(
            effects(&[0xFF, 0x60, 0x08]).unknown,
            Some(Unknowable::IndirectJump { at: A, .. })
        ));
        assert!(matches!(
            effects(&[0xFF, 0x17, 0xC3]).unknown,
            Some(Unknowable::IndirectCall { at: A, .. })
        ));
    }

    #[test]
    fn calls_and_jumps_through_rip_relative_slots_name_the_slot() {
        // call [rip + 0x100]; jmp [rip + 0x200] (a PLT stub's jump)
        let code = [0xFF, 0x15, 0x00, 0x01, 0, 0, 0xFF, 0x25, 0x00, 0x02, 0, 0];
        let e = effects(&code);
        assert_eq!(e.unknown, None);
        assert_eq!(
            e.callees,
            [
                Callee::Through(A + 6 + 0x100),
                Callee::Through(A + 12 + 0x200)
            ]
        );
        // A branch into the middle of an instruction: jmp +1; mov eax, imm32
        let e = effects(&[0xEB, 0x01, 0xB8, 0xC3, 0, 0, 0, 0xC3]);
        assert_eq!(
            e.unknown,
            Some(Unknowable::MisalignedTarget {
                from: A,
                target: A + 3
            })
        );
    }

    /// A PIC `switch` on edi whose third case is another function (B):
    ///
    /// ```text
    ///  0: cmp edi, 2
    ///  3: ja 1b
    ///  5: lea rdx, [rip + T]
    ///  c: movsxd rax, dword [rdx + rdi*4]
    /// 10: add rax, rdx
    /// 13: jmp rax
    /// 15: mov eax, 10; ret        (case 0)
    /// 1b: pxor xmm0, xmm0; ret    (case 1, default)
    /// ```
    #[test]
    fn jump_table_targets_outside_are_callees() {
        let mut code = vec![0x83, 0xFF, 0x02, 0x77, 0x16, 0x48, 0x8D, 0x15];
        code.extend_from_slice(&((T as i64 - (A as i64 + 0xC)) as i32).to_le_bytes());
        code.extend_from_slice(&[0x48, 0x63, 0x04, 0xBA, 0x48, 0x01, 0xD0, 0xFF, 0xE0]);
        code.extend_from_slice(&[0xB8, 10, 0, 0, 0, 0xC3, 0x66, 0x0F, 0xEF, 0xC0, 0xC3]);
        let mut table = Vec::new();
        for target in [A + 0x15, A + 0x1B, B] {
            table.extend_from_slice(&((target as i64 - T as i64) as i32).to_le_bytes());
        }
        let read = |addr: usize, buf: &mut [u8]| match addr
            .checked_sub(T)
            .and_then(|o| table.get(o..o + buf.len()))
        {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        };
        let e = function_effects(&code, A, &read);
        assert_eq!(e.unknown, None);
        assert_eq!(
            (e.clobbers, e.callees),
            (
                Clobbers::SSE.union(Clobbers::FRAME),
                vec![Callee::Direct(B)]
            )
        );
        // A tail call through a slot besides the table changes nothing.
        let mut with_slot = code.clone();
        with_slot.extend_from_slice(&[0xFF, 0x25, 0, 0, 0, 0]);
        let e = function_effects(&with_slot, A, &read);
        assert_eq!(e.unknown, None);
        assert_eq!(
            e.callees,
            [Callee::Direct(B), Callee::Through(A + with_slot.len())]
        );
        // Without the table, the jump is unbounded.
        assert!(matches!(
            effects(&code).unknown,
            Some(Unknowable::IndirectJump { at, .. }) if at == A + 0x13
        ));
    }

    #[test]
    fn clobbers_print_their_classes() {
        assert_eq!(Clobbers::NONE.to_string(), "none");
        assert_eq!(
            Clobbers::SSE.union(Clobbers::ERRNO).to_string(),
            "sse|errno"
        );
        assert_eq!(
            Clobbers::ALL.to_string(),
            "sse|vector|opmask|x87|errno|frame"
        );
    }
}
