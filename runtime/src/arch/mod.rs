//! The architecture interface: everything that knows an instruction
//! encoding, a register layout or how code may be changed under running
//! threads. The portable core (`trap`, `site`, `writer`, `fast`, `xol`)
//! calls only the hooks below and never looks at an opcode, a `gregs` index
//! or a trap byte. The model is the kernel's small set of `arch_uprobe_*`
//! hooks (`arch_uprobe_analyze_insn`, `arch_uprobe_pre_xol`/`post_xol`,
//! `is_trap_insn`, `set_swbp`, `instruction_pointer`).
//!
//! # The contract, hook by hook
//!
//! **The trap instruction.** [`TRAP_INSN`] is written over the first bytes
//! ([`HEAD`]) of a probed instruction; writing it must be atomic with
//! respect to instruction fetch (other threads run the old instruction or
//! the trap, never a mix). A `SIGTRAP` it raises has `si_code`
//! [`TRAP_SI_CODE`]; [`TrapContext::trap_address`] is the address of
//! the trap instruction that raised a `SIGTRAP` (x86 reports the address
//! after it). [`classify_trap_site`] says, when the lookup found no probe at
//! that address, whether the bytes there still hold a trap (someone else's),
//! a different trap instruction of someone else's, or the restored
//! instruction (our probe was removed meanwhile: resume there).
//!
//! **The trapped context.** [`TrapContext`] wraps a handler's `ucontext_t`:
//! [`TrapContext::pc`]/[`TrapContext::set_pc`], and the register frame
//! [`Regs`] (the stack pointer among them) a handler sees ([`TrapContext::regs`],
//! [`TrapContext::set_regs`], which keeps the system flags). The thread scan
//! reads a context with [`interrupted_pc`] and [`interrupted_sp`], and
//! finds contexts saved deeper on a stack by their signal frames: each
//! starts with the address of a signal return trampoline (ours,
//! [`restorer_address`], or the one a running handler returns through,
//! [`handler_restorer`]), with the saved pc and sp at [`SIGFRAME_PC`] and
//! [`SIGFRAME_SP`] bytes from it.
//!
//! **Instruction analysis.** [`analyze`] decodes the instruction at a probe
//! address and classifies how the trap path gets past it ([`Displaced`]):
//! skip, emulate, or run out of line; it refuses what can be neither.
//! [`Displaced::encode`]/[`Displaced::decode`] pack it into words the trap
//! path reads speculatively. [`check_boundary`] refuses an address inside an
//! instruction where no layout is known, and [`FunctionFlow`] analyses a
//! whole function: every instruction boundary, and which runs of whole
//! instructions a jump may displace ([`link_module`] across a module). [`MAX_INSN_LEN`] bounds an instruction.
//!
//! **Relocation into a stub.** [`emit_out_of_line_slot`] gives the bytes of an
//! out-of-line stub: the instruction relocated to the stub's address and a
//! jump back; at most [`STUB_SLOT`] bytes. Freed stubs are poisoned with
//! [`POISON`]. Every stub slot ([`emit_out_of_line_slot`], [`emit_site_stub`])
//! ends with a fault map: [`fault_origin`] says which displaced instruction
//! a fault at a stub's program counter belongs to, and how far the stub had
//! moved the stack pointer, so a fault handler can rewind the context.
//!
//! **Before and after out-of-line execution.** [`resume_out_of_line`] sets
//! the registers to run the stub (the kernel's `pre_xol`); nothing runs
//! after (`post_xol`): the stub's own jump leads back.
//!
//! **Emulation.** [`emulate`] applies a displaced instruction the trap path
//! emulates (branches, `call` with the original return address, `push`,
//! `ret`) to the registers, in signal context; its memory accesses are the
//! instruction's own ([`Access::Direct`], a fault a nested signal) or
//! system calls ([`Access::Careful`], for a trap served on an alternate
//! stack with no room for a second frame).
//!
//! **The patch sequence of a site.** A fast site's [`JUMP_LEN`]-byte jump
//! ([`jump_to`]) replaces the trap in steps ([`TO_JUMP`], and [`TO_TRAP`]
//! back): which bytes ([`HEAD`], [`TAIL`]), in which order, and where every
//! core must be serialised ([`SwitchStep::Serialise`]). The site module runs
//! these steps over many sites at once and owns the bookkeeping.
//! [`fast_eligible`] says whether one instruction can be displaced by the
//! jump.
//!
//! **The fast path's code.** [`emit_trampoline`] (one per stub chunk) and
//! [`emit_site_stub`] (one per fast site) produce the code that saves the
//! registers into a [`FastFrame`], dispatches and resumes; [`InlineLayout`]
//! is what the trampoline's inline dispatch knows of the portable data
//! structures, all offsets taken from the Rust definitions.
//!
//! **What a handler may change.** [`function_effects`] reads one
//! function's machine code and says which [`Clobbers`] classes of register
//! state beyond the general-purpose registers it may change, which
//! functions it calls or tail-jumps to, or why that is [`Unknowable`]; the
//! portable `effects` module walks a handler's call graph with it, so the
//! fast path saves only what the handler may change.
//!
//! **Registers, thread identity, signals.** [`Reg`]/[`Regs`] are the frame
//! handlers see (the C ABI's `probert_regs`); [`thread_pointer`] is an
//! allocation-free thread identity for signal context;
//! [`KernelSigaction`] is the kernel's `struct sigaction` with probert's
//! own signal return trampoline.
//!
//! # aarch64, on paper
//!
//! What an aarch64 backend would do, hook by hook. No code exists yet.
//!
//! - **Trap instruction**: `brk #0x5` (some fixed immediate of our own), 4
//!   bytes; instructions are 4-byte aligned, so [`HEAD`] is the whole
//!   instruction and an aligned 4-byte store of it is single-copy atomic for
//!   instruction fetch (ARM ARM, "concurrent modification and execution of
//!   instructions": `B`, `BL`, `BRK`, `NOP` and `HVC/SMC/SVC` may be swapped
//!   concurrently with other of these). `SIGTRAP` reports the pc *at* the
//!   `brk` (`trap_address` is the pc itself), with `si_code == TRAP_BRKPT`;
//!   the `brk` immediate (in `esr` of the signal frame's `esr_context`)
//!   tells ours from a debugger's, so `classify_trap_site` needs no
//!   recently-removed table.
//! - **Context**: `ucontext_t.uc_mcontext.regs[0..31]`, `sp`, `pc`,
//!   `pstate` (NZCV are the user-writable flags); `Regs` gains x0–x30.
//! - **Analysis**: every instruction is 4 bytes, so boundaries are
//!   alignment; classify PC-relative instructions: `b`/`bl`/`b.cond`/`cbz`/
//!   `tbz` (emulate: the target is known), `adr`/`adrp` (emulate: write the
//!   computed address into the register), `ldr` (literal) (emulate: load from
//!   the absolute address, or relocate as `ldr xN, [stub_literal]` with the
//!   address in the stub), `ret`/`br`/`blr` (emulate), exclusives
//!   (`ldxr`/`stxr` pairs: refuse — running one out of line breaks the
//!   monitor, as the kernel's `aarch64_insn_is_steppable` rules out).
//! - **Relocation**: copy the instruction; follow it with a branch back.
//!   Branches reach ±128 MiB: a stub pool beyond that needs a veneer
//!   (`ldr x16, #8; br x16; .quad target`, using the IP0 register the
//!   procedure-call standard reserves for veneers) instead of `b`.
//! - **Before/after out of line**: as x86 (set pc); no red zone to step over.
//! - **Cache maintenance**: after writing code (a site or a stub) to the
//!   data side, `dc cvau` + `dsb ish` + `ic ivau` + `dsb ish` over the bytes,
//!   then `isb` on the writing thread; other threads get their context
//!   synchronisation from `membarrier(PRIVATE_EXPEDITED_SYNC_CORE)`, which is
//!   [`SwitchStep::Serialise`].
//! - **Patch sequence**: a fast site's jump is one `b stub` (4 bytes, ±128
//!   MiB, so stubs live within reach, or the site keeps its trap):
//!   `TO_JUMP = [Serialise, WriteHead, Serialise]`, `TAIL` empty. A
//!   multi-instruction site (displacing a `bti c` or a pair of instructions
//!   to reach a register-indirect veneer) would need the same
//!   no-thread-inside check as on x86.
//! - **Fast path**: the stub needs no red-zone step (AAPCS64 has none
//!   below `sp`); it saves x0–x30, `nzcv`, `fpcr`/`fpsr` and v0–v31 (and
//!   SVE/SME state where present) and calls the dispatcher with `bl`,
//!   keeping the link register: `x30` must be saved first, since the branch
//!   into the stub cannot set it.
//! - **Thread pointer**: `mrs xN, tpidr_el0`.
//! - **Signals**: the kernel's `struct sigaction` has no restorer on
//!   aarch64 (the kernel returns through the vDSO's `__kernel_rt_sigreturn`):
//!   `KernelSigaction::new` sets no `SA_RESTORER`, and thread scans treat the
//!   vDSO's sigreturn as on the way out of a handler.

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::{
    analyze, check_boundary, classify_trap_site, disassemble, emit_exit_stub, emit_out_of_line,
    emit_out_of_line_slot, emit_site_stub, emit_trampoline, emulate, errno_get, errno_offset,
    errno_set, far_exit, fast_eligible, fault_origin, function_exits, handler_restorer,
    interrupted_pc, interrupted_sp, jump_to, leading_jump, link_module, recover_emulator_fault,
    restorer_address, resume_out_of_line, stub_entry, stub_resume, thread_id, thread_pointer,
    tid_offset, Access, Clobbers, CpuState, Displaced, EmuFault, Emulated, FastFrame, FunctionFlow,
    InlineLayout, KernelSigaction, LeadingJump, PointerJumps, Refusal, Reg, Regs, SwitchStep,
    TrapContext, TrapSite, HEAD, JUMP_LEN, MAX_INSN_LEN, POISON, SIGFRAME_PC, SIGFRAME_SP,
    STUB_SLOT, TAIL, TO_JUMP, TO_TRAP, TRAMPOLINE_SIZE, TRAP_INSN, TRAP_SI_CODE,
};
#[cfg(target_arch = "x86_64")]
pub use x86_64::{function_effects, Callee, FunctionEffects, Unknowable};

#[cfg(not(target_arch = "x86_64"))]
compile_error!("probert supports x86_64 only for now (see the aarch64 notes in `arch`)");
