//! The x86_64 backend of the arch interface (see [`crate::arch`] for the
//! contract, hook by hook).
//!
//! - `patch`: the trap instruction, the fast site's jump, the int3-first
//!   switching order, what a trap site's bytes say after a trap;
//! - `context`: the trapped context (`ucontext_t`): pc, sp, registers;
//! - `insn`: decoding and classifying a displaced instruction (`iced-x86`);
//! - `flow`: whole-function analysis: which runs of whole instructions a
//!   jump may displace (`indirect`: bounding jump tables), linked across a
//!   module's functions;
//! - `relocate`: the out-of-line stub of an instruction; `displace`: the
//!   relocated copy of a run of instructions;
//! - `emulate`: applying a displaced branch, `push` or `ret` to the registers;
//! - `effects`: which classes of register state a handler's code may change;
//! - `exits`: where a function returns (its `ret`s and the jumps it leaves by);
//! - `fast`: the fast path's trampoline and per-site stubs (`dynasmrt`);
//! - `regs`: the register frame handlers see;
//! - `signal`: the kernel's `sigaction` and our signal return trampoline;
//! - `tp`: the thread pointer.

mod context;
#[cfg(test)]
mod corpus;
mod displace;
mod effects;
mod emulate;
mod exits;
mod fast;
mod faultmap;
#[allow(dead_code)] // wired into sites next
mod flow;
mod indirect;
mod insn;
mod patch;
mod regs;
mod relocate;
mod signal;
mod tp;

pub use context::{
    handler_restorer, interrupted_pc, interrupted_sp, TrapContext, SIGFRAME_PC, SIGFRAME_SP,
};
pub use displace::{emit_exit_stub, emit_site_stub};
pub use effects::{function_effects, Callee, Clobbers, FunctionEffects, Unknowable};
pub use emulate::{emulate, recover_emulator_fault, Access, EmuFault, Emulated};
pub use exits::{function_exits, leading_jump, LeadingJump};
pub use fast::{
    emit_trampoline, far_exit, stub_entry, stub_resume, CpuState, FastFrame, InlineLayout,
    TRAMPOLINE_SIZE,
};
pub use faultmap::fault_origin;
#[allow(unused_imports)] // wired into sites next
pub use flow::{link_module, EntrySource, FunctionFlow, PointerJumps, Refusal, Site};
pub use insn::{analyze, check_boundary, disassemble, Displaced};
pub use patch::{
    classify_trap_site, fast_eligible, jump_to, SwitchStep, TrapSite, HEAD, JUMP_LEN, TAIL,
    TO_JUMP, TO_TRAP, TRAP_SI_CODE,
};
pub use regs::{Reg, Regs};
pub use relocate::{emit_out_of_line, emit_out_of_line_slot, resume_out_of_line};
pub use signal::{restorer_address, KernelSigaction};
pub use tp::{errno_get, errno_offset, errno_set, thread_id, thread_pointer, tid_offset};

/// The trap instruction written over a probed instruction's first byte:
/// `int3`.
pub const TRAP_INSN: &[u8] = &[0xCC];
/// The longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;
/// Size of one stub slot in the trampoline pool: an out-of-line stub (the
/// relocated instruction and a `jmp rel32` back) or a fast-path site stub.
pub const STUB_SLOT: usize = 64;
/// An instruction that faults (`ud2`), used to poison freed stub slots.
pub const POISON: [u8; 2] = [0x0F, 0x0B];
