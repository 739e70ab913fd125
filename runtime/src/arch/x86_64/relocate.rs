//! Out-of-line stubs: the displaced instruction relocated to run from a stub
//! slot, followed by a `jmp rel32` back to the instruction after the probe.
//!
//! An instruction without a RIP-relative operand means the same at any
//! address and is copied byte for byte (keeping every prefix exactly). One
//! with a RIP-relative operand is re-encoded for the stub's address by
//! `iced-x86`'s `BlockEncoder`, and the result is decoded again and compared
//! with the original before it is used. The jump back is emitted by
//! `dynasmrt` into a `VecAssembler` based at its final address.

use dynasmrt::x64::X64Relocation;
use dynasmrt::{dynasm, DynasmLabelApi, VecAssembler};
use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Decoder, DecoderOptions, Instruction, InstructionBlock,
};

use super::insn::decode_and_classify;
use super::{Displaced, STUB_SLOT};
use crate::error::{Error, Result};

/// Length of the `jmp rel32` back.
const JMP_REL32_LEN: usize = 5;

/// The bytes of the out-of-line stub for the instruction `code` (mapped at
/// `addr`), to be placed at `stub`: the instruction relocated to `stub`,
/// followed by a jump back to `addr + len`. At most `STUB_SLOT` bytes.
///
/// Fails with [`Error::UnsupportedInstruction`] for an instruction that
/// [`analyze`](super::analyze) does not classify as
/// [`Displaced::OutOfLine`], for a RIP-relative operand or jump back out of
/// ±2 GiB range of `stub`, and for a stub longer than `STUB_SLOT`.
pub fn emit_out_of_line(code: &[u8], addr: usize, stub: usize) -> Result<Vec<u8>> {
    let (instr, displaced) = decode_and_classify(code, addr)?;
    if displaced != Displaced::OutOfLine {
        return Err(Error::unsupported(
            addr,
            "not an out-of-line instruction (the trap path emulates or skips it)",
        ));
    }
    let len = instr.len();
    let mut bytes = relocate_insn(&instr, code, addr, stub)?;

    let jmp_at = stub
        .checked_add(bytes.len())
        .ok_or_else(|| Error::unsupported(addr, "the stub address wraps around"))?;
    let back = addr
        .checked_add(len)
        .ok_or_else(|| Error::unsupported(addr, "the instruction wraps around"))?;
    if !fits_rel32(back as i128 - (jmp_at as i128 + JMP_REL32_LEN as i128)) {
        return Err(Error::unsupported(
            addr,
            format!("the jump back to {back:#x} is out of ±2 GiB range of the stub at {stub:#x}"),
        ));
    }
    // `extern` makes the operand an absolute address; dynasmrt resolves it
    // against the assembler's base (where the jmp will live) into a rel32,
    // and reports an out-of-range one as an error rather than truncating.
    let mut ops = VecAssembler::<X64Relocation>::new(jmp_at);
    dynasm!(ops
        ; .arch x64
        ; jmp extern back
    );
    let jmp = ops.finalize().map_err(|e| {
        Error::unsupported(addr, format!("cannot emit the jump back to {back:#x}: {e}"))
    })?;
    bytes.extend_from_slice(&jmp);

    if bytes.len() > STUB_SLOT {
        return Err(Error::unsupported(
            addr,
            format!(
                "the stub needs {} bytes, more than a {STUB_SLOT}-byte slot",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

/// The whole slot of the out-of-line stub for `code` at `addr`, placed at
/// `stub`: [`emit_out_of_line`] and the fault map of its one instruction
/// (see [`super::faultmap`]), [`STUB_SLOT`] bytes.
pub fn emit_out_of_line_slot(code: &[u8], addr: usize, stub: usize) -> Result<Vec<u8>> {
    let point = super::faultmap::FaultPoint {
        stub_off: 0,
        orig_off: 0,
        sp_adj: 0,
    };
    super::faultmap::with_fault_map(
        emit_out_of_line(code, addr, stub)?,
        &[point],
        addr,
        STUB_SLOT,
    )
}

/// What runs before an instruction executes out of line: the thread resumes
/// at its stub (`regs.rip`); every other register is as at the probed
/// instruction. Nothing runs after: the stub's own jump leads back to the
/// instruction after the probed one.
///
/// # Signal safety
/// One register write.
#[inline]
pub fn resume_out_of_line(regs: &mut super::Regs, stub: usize) {
    regs.rip = stub as u64;
}

/// The instruction `instr` (decoded from `code`, mapped at `addr`) relocated
/// to run at `at`: its bytes unchanged when it does not depend on RIP, else
/// re-encoded for `at` by `BlockEncoder` and verified by decoding it again.
/// Relative branches are the caller's (they need a different instruction).
pub(super) fn relocate_insn(
    instr: &Instruction,
    code: &[u8],
    addr: usize,
    at: usize,
) -> Result<Vec<u8>> {
    let len = instr.len();
    if instr.is_ip_rel_memory_operand() {
        // `decode_and_classify` refused EIP-relative operands: this is RIP.
        let target = instr.ip_rel_memory_address();
        if !fits_rel32(target as i128 - (at as i128 + len as i128)) {
            return Err(Error::unsupported(
                addr,
                format!(
                    "RIP-relative operand at {target:#x} is out of ±2 GiB range \
                     of the stub at {at:#x}"
                ),
            ));
        }
        let block = InstructionBlock::new(core::slice::from_ref(instr), at as u64);
        let encoded = BlockEncoder::encode(64, block, BlockEncoderOptions::NONE)
            .map_err(|e| Error::unsupported(addr, format!("cannot relocate to {at:#x}: {e}")))?
            .code_buffer;
        // Trust but verify: the bytes must decode, at `at`, to the same
        // instruction reading the same absolute address.
        let mut decoder = Decoder::with_ip(64, &encoded, at as u64, DecoderOptions::NONE);
        let again = decoder.decode();
        if again.is_invalid()
            || again.len() != encoded.len()
            || again != *instr
            || again.ip_rel_memory_address() != target
        {
            return Err(Error::unsupported(
                addr,
                "the re-encoded instruction does not match the original",
            ));
        }
        Ok(encoded)
    } else {
        // No RIP dependence (branches are emulated or refused): the original
        // bytes work anywhere. `get` cannot fail after a successful decode.
        Ok(code
            .get(..len)
            .ok_or_else(|| Error::Internal("decoded past the end of the code".into()))?
            .to_vec())
    }
}

/// Whether `d` fits a signed 32-bit displacement.
fn fits_rel32(d: i128) -> bool {
    i32::try_from(d).is_ok()
}

#[cfg(test)]
// The `runs_from_a_real_stub` test maps memory and jumps into it; each
// unsafe block says why that is sound.
#[allow(unsafe_code)]
mod tests {
    use super::*;

    const ADDR: usize = 0x40_0000;
    const STUB: usize = 0x50_0000;

    fn refused(code: &[u8], addr: usize, stub: usize) -> String {
        match emit_out_of_line(code, addr, stub) {
            Err(Error::UnsupportedInstruction { addr: a, reason }) => {
                assert_eq!(a, addr);
                reason.into_owned()
            }
            other => panic!("{code:02x?} should be refused, got {other:02x?}"),
        }
    }

    #[test]
    fn rip_relative_is_rewritten() {
        // mov rax, [rip + 0x10]: reads 0x400017.
        let code = [0x48, 0x8b, 0x05, 0x10, 0x00, 0x00, 0x00, 0xcc, 0xcc];
        let stub = emit_out_of_line(&code, ADDR, STUB).unwrap();
        let disp = (ADDR as i64 + 7 + 0x10 - (STUB as i64 + 7)) as i32;
        assert_eq!(disp, -0xF_FFF0);
        let back = (ADDR as i64 + 7 - (STUB as i64 + 7 + 5)) as i32;
        let mut want = vec![0x48, 0x8b, 0x05];
        want.extend_from_slice(&disp.to_le_bytes());
        want.push(0xe9);
        want.extend_from_slice(&back.to_le_bytes());
        assert_eq!(stub, want);
        assert_eq!(
            stub,
            [0x48, 0x8b, 0x05, 0x10, 0x00, 0xf0, 0xff, 0xe9, 0xfb, 0xff, 0xef, 0xff]
        );
    }

    #[test]
    fn rip_relative_with_an_immediate_after_the_displacement() {
        // add dword [rip + 0x100], 0x12345678: disp is relative to the end,
        // after the imm32. Relocated backwards, to a lower stub.
        let code = [0x81, 0x05, 0x00, 0x01, 0x00, 0x00, 0x78, 0x56, 0x34, 0x12];
        let stub_at = ADDR - 0x1000;
        let stub = emit_out_of_line(&code, ADDR, stub_at).unwrap();
        let disp = (ADDR as i64 + 10 + 0x100 - (stub_at as i64 + 10)) as i32;
        let mut want = vec![0x81, 0x05];
        want.extend_from_slice(&disp.to_le_bytes());
        want.extend_from_slice(&[0x78, 0x56, 0x34, 0x12, 0xe9]);
        want.extend_from_slice(&(0x1000i32 - 5).to_le_bytes());
        assert_eq!(stub, want);
    }

    #[test]
    fn lock_prefix_is_kept() {
        // lock inc qword [rip + 0x20]
        let code = [0xf0, 0x48, 0xff, 0x05, 0x20, 0x00, 0x00, 0x00];
        let stub = emit_out_of_line(&code, ADDR, STUB).unwrap();
        assert_eq!(stub.len(), 8 + 5);
        assert_eq!(stub[..4], [0xf0, 0x48, 0xff, 0x05]);
        let disp = i32::from_le_bytes(stub[4..8].try_into().unwrap());
        assert_eq!(STUB as i64 + 8 + i64::from(disp), ADDR as i64 + 8 + 0x20);
    }

    #[test]
    fn other_instructions_are_copied_verbatim() {
        // sub rsp, 16
        let stub = emit_out_of_line(&[0x48, 0x83, 0xec, 0x10, 0xc3], ADDR, STUB).unwrap();
        assert_eq!(stub, [0x48, 0x83, 0xec, 0x10, 0xe9, 0xfb, 0xff, 0xef, 0xff]);
        // mov rax, [rsp]; with a redundant cs prefix that must survive.
        let code = [0x2e, 0x48, 0x8b, 0x04, 0x24];
        let stub = emit_out_of_line(&code, ADDR, STUB).unwrap();
        assert_eq!(stub[..5], code);
        assert_eq!(stub[5], 0xe9);
        // A 15-byte instruction plus the jump still fits a slot:
        // cs cs cs mov qword [rax + rax*4 + 0x44332211], 1
        let long = [
            0x2e, 0x2e, 0x2e, 0x48, 0xc7, 0x84, 0x80, 0x11, 0x22, 0x33, 0x44, 0x01, 0x00, 0x00,
            0x00,
        ];
        let stub = emit_out_of_line(&long, ADDR, STUB).unwrap();
        assert_eq!(stub.len(), 20);
        assert_eq!(stub[..15], long);
    }

    #[test]
    fn out_of_range_is_refused() {
        let far = ADDR + (3 << 30);
        // The RIP-relative operand cannot reach 0x400017 from the stub.
        let reason = refused(&[0x48, 0x8b, 0x05, 0x10, 0, 0, 0], ADDR, far);
        assert!(
            reason.contains("RIP-relative") && reason.contains("2 GiB"),
            "{reason}"
        );
        // The jump back cannot reach either.
        let reason = refused(&[0x48, 0x83, 0xec, 0x10], ADDR, far);
        assert!(
            reason.contains("jump back") && reason.contains("2 GiB"),
            "{reason}"
        );
        // Just in range: the jump back's rel32 is exactly i32::MIN.
        let stub_at = ADDR + 4 - 5 + (1 << 31);
        let stub = emit_out_of_line(&[0x48, 0x83, 0xec, 0x10], ADDR, stub_at - 4).unwrap();
        assert_eq!(stub[5..], i32::MIN.to_le_bytes());
        assert!(emit_out_of_line(&[0x48, 0x83, 0xec, 0x10], ADDR, stub_at - 3).is_err());
        // Wrapping addresses fail cleanly.
        assert!(emit_out_of_line(&[0x48, 0x83, 0xec, 0x10], usize::MAX - 1, STUB).is_err());
        assert!(emit_out_of_line(&[0x48, 0x83, 0xec, 0x10], ADDR, usize::MAX - 1).is_err());
    }

    #[test]
    fn non_out_of_line_instructions_are_refused() {
        for code in [
            &[0x55][..],
            &[0x90],
            &[0xe8, 0, 0, 0, 0],
            &[0xff, 0xd0],
            &[0x74, 0x00],
            &[0xc3],
            &[0xcc],
            &[0xe8, 0x00],
            &[],
            &[0x67, 0x8b, 0x05, 0, 0, 0, 0],
        ] {
            assert!(emit_out_of_line(code, ADDR, STUB).is_err(), "{code:02x?}");
        }
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut code = [0u8; 15];
            for b in &mut code {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let stub = ADDR
                .wrapping_add((x >> 20) as usize % (1 << 32))
                .wrapping_sub(1 << 31);
            if let Ok(bytes) = emit_out_of_line(&code, ADDR, stub) {
                assert!(bytes.len() <= STUB_SLOT);
            }
        }
    }

    #[test]
    fn runs_from_a_real_stub() {
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
        // Page 0: at 0x00 `mov rax, [rip + d]` (reads `data`), then `ret`;
        // at 0x20 `add qword [rip + d], 5` (writes `data + 8`), then `ret`.
        let mut code = vec![0xccu8; PAGE];
        let d1 = (data - (base + 7)) as i32;
        code[..3].copy_from_slice(&[0x48, 0x8b, 0x05]);
        code[3..7].copy_from_slice(&d1.to_le_bytes());
        code[7] = 0xc3;
        let d2 = (data + 8 - (base + 0x20 + 8)) as i32;
        code[0x20..0x23].copy_from_slice(&[0x48, 0x83, 0x05]);
        code[0x23..0x27].copy_from_slice(&d2.to_le_bytes());
        code[0x27] = 0x05;
        code[0x28] = 0xc3;
        let stub1 = emit_out_of_line(&code[..15], base, base + 0x100).unwrap();
        let stub2 = emit_out_of_line(&code[0x20..0x2f], base + 0x20, base + 0x140).unwrap();
        code[0x100..0x100 + stub1.len()].copy_from_slice(&stub1);
        code[0x140..0x140 + stub2.len()].copy_from_slice(&stub2);
        // SAFETY: both pages are ours and writable; then page 0 becomes
        // read+exec, holding only the code written above.
        unsafe {
            core::ptr::copy_nonoverlapping(code.as_ptr(), base as *mut u8, PAGE);
            *(data as *mut u64) = 0x1122_3344_5566_7788;
            *((data + 8) as *mut u64) = 37;
            assert_eq!(
                libc::mprotect(base as *mut _, PAGE, libc::PROT_READ | libc::PROT_EXEC),
                0
            );
        }
        // SAFETY: each stub runs one relocated instruction and jumps to a
        // `ret`, so it behaves as an `extern "C" fn() -> u64` (rax).
        let (got, sum) = unsafe {
            let f1: extern "C" fn() -> u64 = core::mem::transmute(base + 0x100);
            let f2: extern "C" fn() -> u64 = core::mem::transmute(base + 0x140);
            f2();
            (f1(), *((data + 8) as *const u64))
        };
        assert_eq!(got, 0x1122_3344_5566_7788);
        assert_eq!(sum, 42);
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(base as *mut _, 2 * PAGE) };
    }
}
