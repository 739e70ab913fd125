//! The decode → classify → relocate step on arbitrary bytes at arbitrary
//! addresses.
//!
//! Input: 8 bytes of code address, 8 bytes of stub address (both folded into
//! the canonical user half), then up to 15 instruction bytes. The step must
//! either refuse with an error or produce a stub that
//! - fits its slot (`STUB_SLOT`),
//! - starts with one instruction that, decoded at the stub, is the same
//!   operation as the original decoded at its address: same mnemonic and
//!   operands, with a RIP-relative operand pointing at the same absolute
//!   address, and
//! - continues with `jmp rel32` back to `addr + len`.
//!
//! Never a panic.
#![no_main]

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, OpKind};
use libfuzzer_sys::fuzz_target;
use probert::__fuzz::{analyze, emit_out_of_line, STUB_SLOT};

/// Folds an arbitrary u64 into user-space addresses, keeping both stub and
/// code near each other half of the time (the pool is within ±2 GiB).
fn addrs(a: u64, b: u64) -> (usize, usize) {
    let addr = (a & 0x7fff_ffff_ffff).max(0x1000);
    let stub = if b & 1 == 0 {
        addr.wrapping_add((b >> 1) & 0xffff_fff0)
            .wrapping_sub(0x8000_0000)
            & 0x7fff_ffff_fff0
    } else {
        (b >> 1) & 0x7fff_ffff_fff0
    };
    (addr as usize, stub as usize)
}

fn decode(bytes: &[u8], ip: usize) -> Instruction {
    Decoder::with_ip(64, bytes, ip as u64, DecoderOptions::NONE).decode()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 17 {
        return;
    }
    let (a, rest) = data.split_at(8);
    let (b, code) = rest.split_at(8);
    let code = &code[..code.len().min(15)];
    let (addr, stub) = addrs(
        u64::from_le_bytes(a.try_into().unwrap()),
        u64::from_le_bytes(b.try_into().unwrap()),
    );
    let analyzed = analyze(code, addr);
    let Ok(out) = emit_out_of_line(code, addr, stub) else {
        return;
    };
    // Success implies analyze classified it as out of line.
    let (len, ool, text) = analyzed.expect("emit_out_of_line accepted what analyze refused");
    assert!(ool, "emitted a stub for an emulated instruction: {text}");
    assert!(
        out.len() <= STUB_SLOT,
        "stub of {} bytes for {text}",
        out.len()
    );
    let orig = decode(code, addr);
    assert_eq!(orig.len(), len);
    let reloc = decode(&out, stub);
    assert!(!reloc.is_invalid(), "stub does not decode: {out:02x?}");
    assert_eq!(reloc.mnemonic(), orig.mnemonic(), "{text}: {out:02x?}");
    assert_eq!(reloc.op_count(), orig.op_count(), "{text}");
    for i in 0..orig.op_count() {
        assert_eq!(reloc.op_kind(i), orig.op_kind(i), "{text}: operand {i}");
        match orig.op_kind(i) {
            OpKind::Register => assert_eq!(reloc.op_register(i), orig.op_register(i)),
            OpKind::Memory => {
                assert_eq!(reloc.memory_size(), orig.memory_size());
                assert_eq!(reloc.memory_index(), orig.memory_index());
                assert_eq!(reloc.memory_index_scale(), orig.memory_index_scale());
                assert_eq!(reloc.segment_prefix(), orig.segment_prefix());
                if orig.is_ip_rel_memory_operand() {
                    assert!(reloc.is_ip_rel_memory_operand(), "{text}");
                    assert_eq!(
                        reloc.ip_rel_memory_address(),
                        orig.ip_rel_memory_address(),
                        "{text}: the relocated operand points elsewhere"
                    );
                } else {
                    assert_eq!(reloc.memory_base(), orig.memory_base());
                    assert_eq!(reloc.memory_displacement64(), orig.memory_displacement64());
                }
            }
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                assert_eq!(
                    reloc.near_branch_target(),
                    orig.near_branch_target(),
                    "{text}: the relocated branch goes elsewhere"
                );
            }
            _ => {
                assert_eq!(
                    reloc.try_immediate(i).ok(),
                    orig.try_immediate(i).ok(),
                    "{text}: operand {i}"
                );
            }
        }
    }
    assert_eq!(reloc.has_lock_prefix(), orig.has_lock_prefix(), "{text}");
    assert_eq!(reloc.has_rep_prefix(), orig.has_rep_prefix(), "{text}");
    assert_eq!(reloc.has_repne_prefix(), orig.has_repne_prefix(), "{text}");
    // Then the jump back to the next instruction.
    let back = decode(&out[reloc.len()..], stub + reloc.len());
    assert_eq!(back.code(), Code::Jmp_rel32_64, "no jmp back: {out:02x?}");
    assert_eq!(
        back.near_branch64(),
        (addr + len) as u64,
        "{text}: jumps back elsewhere"
    );
    assert_eq!(
        reloc.len() + back.len(),
        out.len(),
        "trailing bytes in the stub"
    );
});
