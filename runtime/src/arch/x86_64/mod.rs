//! x86_64: the trap instruction, decoding and classifying the displaced
//! instruction, relocating it into an out-of-line stub, emulating it in the
//! handler, the register frame, and the thread pointer.
//!
//! # The interface the generic core uses
//! - [`TRAP_INSN`]: the byte written over a probed instruction (`int3`).
//! - [`analyze`]: decode and classify the instruction at a probe address.
//! - [`check_boundary`]: refuse an address inside an instruction.
//! - [`emit_out_of_line`]: the bytes of an out-of-line stub.
//! - [`emulate`]: apply an emulated instruction to a [`Regs`] (signal-safe).
//! - [`thread_pointer`]: a signal-safe, allocation-free thread identity.
//! - the fast path: [`emit_trampoline`], [`emit_site_stub`], [`site_jump`],
//!   [`FastFrame`].
//! - multi-instruction fast sites: [`FunctionFlow`] (which runs of whole
//!   instructions a jump may displace, [`link_module`] across a module's
//!   functions) and [`emit_run_stub`] / [`emit_displaced`] (their stubs).

#[cfg(test)]
mod corpus;
// `displace` and `flow` are not called by the writer yet: the branch that
// adds them leaves the wiring to the merge.
#[allow(dead_code)]
mod displace;
mod emulate;
mod fast;
#[allow(dead_code)]
mod flow;
mod indirect;
mod insn;
mod regs;
mod relocate;
mod tp;

// Unused until the writer is wired (see above).
#[allow(unused_imports)]
pub use displace::{emit_displaced, emit_run_stub};
pub use emulate::emulate;
pub use fast::{
    emit_site_stub, emit_trampoline, fast_eligible, site_jump, FastFrame, InlineLayout, EXIT_POP,
    JMP_LEN, STUB_PROLOGUE, TRAMPOLINE_SIZE,
};
#[allow(unused_imports)]
pub use flow::{link_module, EntrySource, FunctionFlow, PointerJumps, Refusal, Site};
pub use insn::{analyze, check_boundary, Boundaries, Displaced};
pub use regs::{Reg, Regs};
pub use relocate::emit_out_of_line;
pub use tp::thread_pointer;

/// The breakpoint instruction: `int3`.
pub const TRAP_INSN: u8 = 0xCC;
/// The longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;
/// Size of one stub slot in the trampoline pool: an out-of-line stub (the
/// relocated instruction and a `jmp rel32` back) or a fast-path site stub.
pub const STUB_SLOT: usize = 64;
/// An instruction that faults (`ud2`), used to poison freed stub slots.
pub const POISON: [u8; 2] = [0x0F, 0x0B];
