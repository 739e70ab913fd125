//! Where a function returns: every way an invocation leaves it for its
//! caller, found in the machine code as it is (return probes).
//!
//! A call of `f` ends when a `ret` pops the return address its caller
//! pushed. That `ret` is one of `f`'s own, or — after a tail call, a jump
//! out of `f` that leaves the caller's return address where it was — one of
//! the function jumped to (and so on). So the exits of `f` are its `ret`s
//! and the exits of every function its jumps leave for: [`function_exits`]
//! reports the first and the targets of the second (direct jumps and
//! conditional jumps whose target lies outside the function, and jumps
//! through a code pointer in memory, `jmp [rip + slot]`, the form of a
//! tail call through the GOT), and the caller follows them.
//!
//! A jump to the function's own entry (a tail call to itself, or a loop
//! back to its first instruction) leaves the invocation for a new one of
//! the same function at the same return address: it is reported among the
//! leaves too, as the function's start, so that the caller can tell such
//! functions (their invocations chain, see `crate::shadow`).
//!
//! An indirect jump that is a bounded jump table stays inside the function
//! ([`super::FunctionFlow`] proved that); any other indirect jump (through
//! a register, or memory the code computes — a code pointer, even where
//! the flow knows it lands on an entry point) may go anywhere: the
//! function's exits cannot all be known, and it is refused.

use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind, Register};

use super::flow::{FunctionFlow, Refusal};

/// How an invocation of one function may leave it for its caller.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exits {
    /// Its `ret` instructions (near returns, with or without an immediate).
    pub rets: Vec<usize>,
    /// Where its jumps out of the function go (tail calls, or a jump into
    /// another part of a split function): their exits are its exits too.
    /// Its own start, if it jumps there (or just after its leading
    /// `endbr64`, where a probe's jump may be).
    pub leaves: Vec<usize>,
    /// Code-pointer slots of its indirect jumps through memory at a fixed
    /// address (`jmp qword [rip + d]`): the function the slot names.
    pub slots: Vec<usize>,
}

/// Why a function's exits cannot all be found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExitsUnknown {
    /// The bytes at this address do not decode.
    #[error("the bytes at {at:#x} do not decode")]
    Undecodable {
        /// The first undecodable byte.
        at: usize,
    },
    /// An indirect jump that is not a bounded jump table nor a jump through
    /// a fixed slot.
    #[error("the indirect jump at {at:#x} may go anywhere")]
    IndirectJump {
        /// The jump.
        at: usize,
    },
    /// A far return or an interrupt return.
    #[error("the instruction at {at:#x} leaves the function in a way return probes do not follow")]
    Unusual {
        /// The instruction.
        at: usize,
    },
}

/// The exits of the function `flow` analysed, whose original bytes are
/// `code` (from its start). Bounded jump tables are the ones `flow` did not
/// leave unproven.
pub fn function_exits(code: &[u8], flow: &FunctionFlow) -> Result<Exits, ExitsUnknown> {
    let start = flow.start();
    let end = flow.end();
    let code = &code[..code.len().min(end - start)];
    let unbounded = match flow.unproven() {
        Some(Refusal::UnboundedJump { at, .. }) => Some(*at),
        Some(Refusal::Undecodable { at }) => return Err(ExitsUnknown::Undecodable { at: *at }),
        _ => None,
    };
    let mut exits = Exits::default();
    // Where a jump enters the function again: its start, and after a
    // leading `endbr64`.
    let after_endbr = code
        .starts_with(&[0xf3, 0x0f, 0x1e, 0xfa])
        .then_some(start + 4);
    let mut decoder = Decoder::with_ip(64, code, start as u64, DecoderOptions::NONE);
    while decoder.can_decode() {
        let i = decoder.decode();
        let at = i.ip() as usize;
        if i.is_invalid() {
            return Err(ExitsUnknown::Undecodable { at });
        }
        match i.flow_control() {
            FlowControl::Return => match i.mnemonic() {
                Mnemonic::Ret => exits.rets.push(at),
                _ => return Err(ExitsUnknown::Unusual { at }),
            },
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                if matches!(
                    i.op0_kind(),
                    OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
                ) {
                    let t = i.near_branch_target() as usize;
                    if t == start || Some(t) == after_endbr {
                        exits.leaves.push(start);
                    } else if !(start..end).contains(&t) {
                        exits.leaves.push(t);
                    }
                } else {
                    return Err(ExitsUnknown::Unusual { at });
                }
            }
            FlowControl::IndirectBranch => {
                let slot = i.op0_kind() == OpKind::Memory
                    && i.memory_base() == Register::RIP
                    && i.memory_index() == Register::None;
                if slot {
                    exits.slots.push(i.ip_rel_memory_address() as usize);
                } else if flow.jumps_through_pointer(at) {
                    // A tail call through a pointer: to a function nobody
                    // can name here.
                    return Err(ExitsUnknown::IndirectJump { at });
                } else if unbounded.is_some() {
                    // The flow could not bound some indirect jump of the
                    // function (the first one it met is named).
                    return Err(ExitsUnknown::IndirectJump {
                        at: unbounded.unwrap_or(at),
                    });
                }
            }
            FlowControl::Interrupt if i.mnemonic() == Mnemonic::Iret => {
                return Err(ExitsUnknown::Unusual { at });
            }
            _ => {}
        }
    }
    if decoder.position() < code.len() {
        return Err(ExitsUnknown::Undecodable {
            at: start + decoder.position(),
        });
    }
    exits.leaves.sort_unstable();
    exits.leaves.dedup();
    exits.slots.sort_unstable();
    exits.slots.dedup();
    Ok(exits)
}

/// Where code that begins with a jump goes, before it does anything else
/// ([`leading_jump`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeadingJump {
    /// `jmp rel`: to this address.
    To(usize),
    /// `jmp [rip + d]`: to the address this code-pointer slot holds (a PLT
    /// stub, bound; `.plt.got`, `.plt.sec`).
    Through(usize),
    /// `push imm; jmp …`: the lazy-binding half of a PLT entry, whose slot
    /// the dynamic loader has not bound yet. Where it leads is the
    /// loader's resolver, which jumps to the function it binds.
    Unbound,
}

/// The jump the code at `at` (its original bytes `code`) begins with, after
/// an optional `endbr64`: `None` if it begins with anything else.
///
/// An invocation entering such code leaves at once for the jump's target,
/// so its exits are the target's alone. Following the jump, rather than
/// decoding the function that covers `at`, matters for PLT stubs: one FDE
/// covers the whole `.plt`, and decoding all of it would take every other
/// stub's slot — other functions' exits — for this one's.
pub fn leading_jump(code: &[u8], at: usize) -> Option<LeadingJump> {
    let mut decoder = Decoder::with_ip(64, code, at as u64, DecoderOptions::NONE);
    let mut i = decoder.decode();
    if i.mnemonic() == Mnemonic::Endbr64 {
        i = decoder.decode();
    }
    let unconditional =
        |i: &iced_x86::Instruction| i.flow_control() == FlowControl::UnconditionalBranch;
    match (i.mnemonic(), i.op0_kind()) {
        (Mnemonic::Jmp, OpKind::NearBranch32 | OpKind::NearBranch64 | OpKind::NearBranch16)
            if unconditional(&i) =>
        {
            Some(LeadingJump::To(i.near_branch_target() as usize))
        }
        (Mnemonic::Jmp, OpKind::Memory)
            if i.memory_base() == Register::RIP && i.memory_index() == Register::None =>
        {
            Some(LeadingJump::Through(i.ip_rel_memory_address() as usize))
        }
        (Mnemonic::Push, OpKind::Immediate8to64 | OpKind::Immediate32to64) => {
            let next = decoder.decode();
            (next.mnemonic() == Mnemonic::Jmp && !next.is_invalid()).then_some(LeadingJump::Unbound)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::flow::PointerJumps;
    use super::*;

    const A: usize = 0x40_0000;

    fn flow(code: &[u8]) -> FunctionFlow {
        FunctionFlow::analyze(code, A, &[], &|_, _| false, PointerJumps::Anywhere)
    }

    #[test]
    fn rets_and_tail_jumps() {
        // test rdi, rdi; jz +6 (inside); ret 8; jmp rel32 (outside);
        // ret
        let code = [
            0x48, 0x85, 0xff, // test rdi, rdi
            0x74, 0x03, // jz +3 -> A+8
            0xc2, 0x08, 0x00, // ret 8
            0xe9, 0x00, 0x10, 0x00, 0x00, // jmp A+13+0x1000
            0xc3, // ret
        ];
        let e = function_exits(&code, &flow(&code)).unwrap();
        assert_eq!(e.rets, vec![A + 5, A + 13]);
        assert_eq!(e.leaves, vec![A + 13 + 0x1000]);
        assert!(e.slots.is_empty());
    }

    #[test]
    fn a_jump_to_its_own_entry_is_a_leave_to_its_start() {
        // test rdi, rdi; jz +5; dec rdi; jmp A (rel8); ret
        let code = [
            0x48, 0x85, 0xff, // test rdi, rdi
            0x74, 0x05, // jz +5 -> A+10
            0x48, 0xff, 0xcf, // dec rdi
            0xeb, 0xf6, // jmp A
            0xc3, // ret
        ];
        let e = function_exits(&code, &flow(&code)).unwrap();
        assert_eq!(e.rets, vec![A + 10]);
        assert_eq!(e.leaves, vec![A]);
        // endbr64; test rdi, rdi; jnz A+4 (rel8, after the endbr64); ret
        let code = [
            0xf3, 0x0f, 0x1e, 0xfa, // endbr64
            0x48, 0x85, 0xff, // test rdi, rdi
            0x75, 0xfb, // jnz A+4
            0xc3, // ret
        ];
        let e = function_exits(&code, &flow(&code)).unwrap();
        assert_eq!(e.rets, vec![A + 9]);
        assert_eq!(e.leaves, vec![A]);
    }

    #[test]
    fn a_jump_through_a_fixed_slot_names_the_slot() {
        // jmp qword [rip + 0x100]
        let code = [0xff, 0x25, 0x00, 0x01, 0x00, 0x00];
        let e = function_exits(&code, &flow(&code)).unwrap();
        assert_eq!(e.slots, vec![A + 6 + 0x100]);
        assert!(e.rets.is_empty());
    }

    #[test]
    fn leading_jumps_of_plt_stubs_and_other_code() {
        // A PLT entry: jmp [rip + 0x1afca]; push 0; jmp PLT0.
        let plt = [
            0xff, 0x25, 0xca, 0xaf, 0x01, 0x00, // jmp [rip + 0x1afca]
            0x68, 0x00, 0x00, 0x00, 0x00, // push 0
            0xe9, 0xe0, 0xff, 0xff, 0xff, // jmp A+16-0x20
        ];
        assert_eq!(
            leading_jump(&plt, A),
            Some(LeadingJump::Through(A + 6 + 0x1afca))
        );
        // Its second half, where an unbound slot points.
        assert_eq!(leading_jump(&plt[6..], A + 6), Some(LeadingJump::Unbound));
        // .plt.sec: endbr64; bnd jmp [rip + 0x100].
        let sec = [
            0xf3, 0x0f, 0x1e, 0xfa, 0xf2, 0xff, 0x25, 0x00, 0x01, 0x00, 0x00,
        ];
        assert_eq!(
            leading_jump(&sec, A),
            Some(LeadingJump::Through(A + 11 + 0x100))
        );
        // An IBT PLT entry's lazy half: endbr64; push 1; bnd jmp PLT0.
        let lazy = [
            0xf3, 0x0f, 0x1e, 0xfa, 0x68, 0x01, 0x00, 0x00, 0x00, 0xf2, 0xe9, 0x00, 0x00, 0x00,
            0x00,
        ];
        assert_eq!(leading_jump(&lazy, A), Some(LeadingJump::Unbound));
        // jmp rel8 and jmp rel32 to another function.
        assert_eq!(
            leading_jump(&[0xeb, 0x10], A),
            Some(LeadingJump::To(A + 0x12))
        );
        assert_eq!(
            leading_jump(&[0xe9, 0x00, 0x01, 0x00, 0x00], A),
            Some(LeadingJump::To(A + 0x105))
        );
        // Anything else: a function to decode.
        assert_eq!(leading_jump(&[0x89, 0xd2, 0xe9, 0, 0, 0, 0], A), None);
        assert_eq!(leading_jump(&[0xff, 0xe0], A), None, "jmp rax");
        assert_eq!(leading_jump(&[0x74, 0x02], A), None, "jz");
        assert_eq!(
            leading_jump(&[0x68, 0, 0, 0, 0, 0xc3], A),
            None,
            "push; ret"
        );
        assert_eq!(leading_jump(&[], A), None);
    }

    #[test]
    fn a_jump_through_a_register_is_refused() {
        // mov rax, rdi; jmp rax
        let code = [0x48, 0x89, 0xf8, 0xff, 0xe0];
        assert_eq!(
            function_exits(&code, &flow(&code)),
            Err(ExitsUnknown::IndirectJump { at: A + 3 })
        );
    }

    #[test]
    fn a_tail_call_through_a_pointer_is_refused_where_the_flow_is_proven() {
        // test rdi, rdi; je +7 (the ret); mov rax, [rdi]; jmp [rax + 0x78];
        // ret — SQLite's sqlite3_mutex_free. Where pointers only reach entry
        // points the flow is proven, yet the jump still leaves for a
        // function nobody names.
        let code = [
            0x48, 0x85, 0xff, // test rdi, rdi
            0x74, 0x06, // je A+11
            0x48, 0x8b, 0x07, // mov rax, [rdi]
            0xff, 0x60, 0x78, // jmp [rax + 0x78]
            0xc3, // ret
        ];
        for pointers in [PointerJumps::Anywhere, PointerJumps::ToEntries] {
            let f = FunctionFlow::analyze(&code, A, &[], &|_, _| false, pointers);
            assert_eq!(f.unproven().is_none(), pointers == PointerJumps::ToEntries);
            assert!(f.jumps_through_pointer(A + 8));
            assert_eq!(
                function_exits(&code, &f),
                Err(ExitsUnknown::IndirectJump { at: A + 8 }),
                "{pointers:?}"
            );
        }
    }

    #[test]
    fn undecodable_bytes_are_refused() {
        let code = [0xc3, 0x06];
        assert!(matches!(
            function_exits(&code, &flow(&code)),
            Err(ExitsUnknown::Undecodable { .. })
        ));
    }
}
