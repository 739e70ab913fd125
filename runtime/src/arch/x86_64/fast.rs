//! Fast-path code: a site becomes `jmp rel32` to a per-site stub that calls
//! the dispatcher through a shared trampoline — no signal, no syscall.
//!
//! # The per-site stub (one [`STUB_SLOT`])
//!
//! ```text
//! stub:       lea  rsp, [rsp - 128]     ; step over the red zone
//!             push TAG                  ; which probe (record index | generation)
//!             call trampoline           ; pushes ret_point
//! ret_point:  <displaced instruction>   ; relocated, emulated, or nothing
//!             jmp  site + len
//! ```
//!
//! # The trampoline (one per stub chunk, shared by its stubs)
//!
//! Saves RFLAGS, every GPR and xmm0–15 into a [`FastFrame`] on the stack (so
//! the handler sees the same [`Regs`] layout as on the trap path), clears DF
//! (the ABI requires it clear at calls), aligns the stack, calls
//! `dispatch(tag, frame)`, restores everything from the frame (so register
//! writes take effect; the status flags and DF of RFLAGS, but not the system
//! flags) and leaves with
//!
//! ```text
//!             mov  rsp, [frame.exit]
//!             ret  136
//! ```
//!
//! `frame.exit` points at a slot holding where to go, 136 bytes (the `call`'s
//! return address, the tag, the red zone) below the stack pointer to resume
//! with: by default the `call`'s own return address (`ret_point`) at
//! `rsp₀ - 144`, so `ret 136` lands on `ret_point` with `rsp = rsp₀`. A
//! handler that writes RIP or RSP moves that slot (see `fast::finish`).
//!
//! # Safety
//!
//! Nothing here runs code; it only computes bytes. The frame layout below is
//! shared with the assembly it emits, checked by the compile-time assertions.

use dynasmrt::x64::X64Relocation;
use dynasmrt::{dynasm, DynasmApi, DynasmLabelApi, VecAssembler};

use super::insn::Target;
use super::{emit_out_of_line, Displaced, Regs, STUB_SLOT};
use crate::error::{Error, Result};

/// What the trampoline saves, at the stack pointer it calls the dispatcher
/// with (before alignment).
#[repr(C)]
#[derive(Debug)]
pub struct FastFrame {
    /// The registers, as the handler sees them.
    pub regs: Regs,
    /// xmm0–15, restored unchanged.
    pub xmm: [[u64; 2]; 16],
    /// The address of the slot `ret 136` resumes from (see the module docs).
    pub exit: u64,
    /// RFLAGS as `pushfq` saved it.
    pub flags_raw: u64,
    /// The `call`'s return address: the stub's `ret_point`.
    pub ret_point: u64,
    /// The stub's tag.
    pub tag: u64,
}

/// Bytes of the frame the trampoline reserves below its `pushfq`.
const FRAME_SUB: i32 = 408;
const _: () = assert!(std::mem::size_of::<Regs>() == 144);
const _: () = assert!(std::mem::offset_of!(FastFrame, xmm) == 144);
const _: () = assert!(std::mem::offset_of!(FastFrame, exit) == FRAME_SUB as usize - 8);
const _: () = assert!(std::mem::offset_of!(FastFrame, flags_raw) == FRAME_SUB as usize);
const _: () = assert!(std::mem::offset_of!(FastFrame, tag) == FRAME_SUB as usize + 16);
/// From the frame to the stack pointer at the probed instruction: the frame,
/// `pushfq`, the `call`, the tag, and the red zone.
pub const FRAME_TO_RSP: u64 = FRAME_SUB as u64 + 8 + 8 + 8 + 128;
/// What `ret 136` pops besides the target: the tag and the red zone.
pub const EXIT_POP: u64 = 136;
/// The length of the stub's prologue, up to `ret_point`.
pub const STUB_PROLOGUE: usize = 8 + 5 + 5;
/// The length of the jump written over a fast site.
pub const JMP_LEN: usize = 5;

/// Bytes of the trampoline (fits in this many bytes of the chunk).
pub const TRAMPOLINE_SIZE: usize = 1024;

/// Emits the shared trampoline to be placed at `at`, calling `dispatch`
/// (an `extern "C" fn(tag: u64, frame: *mut FastFrame)`).
pub fn emit_trampoline(at: usize, dispatch: usize) -> Result<Vec<u8>> {
    let mut a = VecAssembler::<X64Relocation>::new(at);
    dynasm!(a
        ; .arch x64
        ; pushfq
        ; sub rsp, FRAME_SUB
        ; mov [rsp + 0x00], rax
        ; mov [rsp + 0x08], rbx
        ; mov [rsp + 0x10], rcx
        ; mov [rsp + 0x18], rdx
        ; mov [rsp + 0x20], rsi
        ; mov [rsp + 0x28], rdi
        ; mov [rsp + 0x30], rbp
        ; lea rax, [rsp + FRAME_TO_RSP as i32]
        ; mov [rsp + 0x38], rax
        ; mov [rsp + 0x40], r8
        ; mov [rsp + 0x48], r9
        ; mov [rsp + 0x50], r10
        ; mov [rsp + 0x58], r11
        ; mov [rsp + 0x60], r12
        ; mov [rsp + 0x68], r13
        ; mov [rsp + 0x70], r14
        ; mov [rsp + 0x78], r15
        ; mov rax, [rsp + FRAME_SUB]
        ; mov [rsp + 0x88], rax
        ; movdqu [rsp + 0x090], xmm0
        ; movdqu [rsp + 0x0a0], xmm1
        ; movdqu [rsp + 0x0b0], xmm2
        ; movdqu [rsp + 0x0c0], xmm3
        ; movdqu [rsp + 0x0d0], xmm4
        ; movdqu [rsp + 0x0e0], xmm5
        ; movdqu [rsp + 0x0f0], xmm6
        ; movdqu [rsp + 0x100], xmm7
        ; movdqu [rsp + 0x110], xmm8
        ; movdqu [rsp + 0x120], xmm9
        ; movdqu [rsp + 0x130], xmm10
        ; movdqu [rsp + 0x140], xmm11
        ; movdqu [rsp + 0x150], xmm12
        ; movdqu [rsp + 0x160], xmm13
        ; movdqu [rsp + 0x170], xmm14
        ; movdqu [rsp + 0x180], xmm15
        ; lea rax, [rsp + FRAME_SUB + 8]
        ; mov [rsp + FRAME_SUB - 8], rax
        ; cld
        ; mov rdi, [rsp + FRAME_SUB + 16]
        ; mov rsi, rsp
        ; mov rbx, rsp
        ; and rsp, -16
        ; mov rax, QWORD dispatch as i64
        ; call rax
        ; mov rsp, rbx
        ; movdqu xmm0, [rsp + 0x090]
        ; movdqu xmm1, [rsp + 0x0a0]
        ; movdqu xmm2, [rsp + 0x0b0]
        ; movdqu xmm3, [rsp + 0x0c0]
        ; movdqu xmm4, [rsp + 0x0d0]
        ; movdqu xmm5, [rsp + 0x0e0]
        ; movdqu xmm6, [rsp + 0x0f0]
        ; movdqu xmm7, [rsp + 0x100]
        ; movdqu xmm8, [rsp + 0x110]
        ; movdqu xmm9, [rsp + 0x120]
        ; movdqu xmm10, [rsp + 0x130]
        ; movdqu xmm11, [rsp + 0x140]
        ; movdqu xmm12, [rsp + 0x150]
        ; movdqu xmm13, [rsp + 0x160]
        ; movdqu xmm14, [rsp + 0x170]
        ; movdqu xmm15, [rsp + 0x180]
        ; mov rax, [rsp + 0x00]
        ; mov rbx, [rsp + 0x08]
        ; mov rcx, [rsp + 0x10]
        ; mov rdx, [rsp + 0x18]
        ; mov rsi, [rsp + 0x20]
        ; mov rdi, [rsp + 0x28]
        ; mov rbp, [rsp + 0x30]
        ; mov r8, [rsp + 0x40]
        ; mov r9, [rsp + 0x48]
        ; mov r10, [rsp + 0x50]
        ; mov r11, [rsp + 0x58]
        ; mov r12, [rsp + 0x60]
        ; mov r13, [rsp + 0x68]
        ; mov r14, [rsp + 0x70]
        ; mov r15, [rsp + 0x78]
        // RFLAGS without `popfq` (microcoded, tens of cycles): DF by hand,
        // OF from an `add` that overflows exactly when it was set, then
        // SF ZF AF PF CF with `sahf`. The system flags (IF, TF, AC...) are
        // not the handler's to change. rax and rcx are reloaded after.
        ; mov rax, [rsp + 0x88]
        ; bt eax, 10
        ; jnc >no_df
        ; std
        ; no_df:
        ; mov ecx, eax
        ; shr ecx, 11
        ; and ecx, 1
        ; mov ah, al
        ; mov al, cl
        ; add al, 0x7f
        ; sahf
        ; mov rax, [rsp + 0x00]
        ; mov rcx, [rsp + 0x10]
        ; mov rsp, [rsp + FRAME_SUB - 8]
        ; ret EXIT_POP as i16
    );
    let bytes = a
        .finalize()
        .map_err(|e| Error::Internal(format!("emitting the fast trampoline: {e:?}").into()))?;
    if bytes.len() > TRAMPOLINE_SIZE {
        return Err(Error::Internal(
            "the fast trampoline outgrew its space".into(),
        ));
    }
    Ok(bytes)
}

/// Whether a decoded first instruction can be displaced into a fast stub:
/// long enough for the 5-byte jump, and either relocatable or a direct
/// branch the stub can emulate.
pub fn fast_eligible(len: u8, displaced: &Displaced) -> bool {
    len as usize >= JMP_LEN
        && matches!(
            displaced,
            Displaced::Skip
                | Displaced::OutOfLine
                | Displaced::Call(Target::Abs(_))
                | Displaced::Jmp(Target::Abs(_))
                | Displaced::Jcc { .. }
        )
}

fn rel32(site: usize, from_end: usize, to: usize) -> Result<[u8; 4]> {
    let d = to as i128 - from_end as i128;
    i32::try_from(d).map(i32::to_le_bytes).map_err(|_| {
        Error::unsupported(
            site,
            format!("{to:#x} is out of rel32 reach of {from_end:#x}"),
        )
    })
}

/// The bytes of the per-site stub at `stub` for the instruction `code`
/// (decoded as `len`, `displaced`) at `site`, calling `trampoline` with `tag`.
pub fn emit_site_stub(
    code: &[u8],
    site: usize,
    len: u8,
    displaced: &Displaced,
    stub: usize,
    trampoline: usize,
    tag: u32,
) -> Result<Vec<u8>> {
    if tag > i32::MAX as u32 {
        return Err(Error::Internal("fast stub tag out of range".into()));
    }
    let back = site + len as usize;
    // lea rsp, [rsp - 128]; push imm32; call rel32
    let mut b = vec![0x48, 0x8D, 0xA4, 0x24, 0x80, 0xFF, 0xFF, 0xFF, 0x68];
    b.extend_from_slice(&tag.to_le_bytes());
    b.push(0xE8);
    b.extend_from_slice(&rel32(site, stub + b.len() + 4, trampoline)?);
    debug_assert_eq!(b.len(), STUB_PROLOGUE);
    let ret_point = stub + b.len();
    let jmp = |b: &mut Vec<u8>, to: usize| -> Result<()> {
        b.push(0xE9);
        let end = stub + b.len() + 4;
        b.extend_from_slice(&rel32(site, end, to)?);
        Ok(())
    };
    match *displaced {
        Displaced::Skip => jmp(&mut b, back)?,
        Displaced::OutOfLine => b.extend(emit_out_of_line(code, site, ret_point)?),
        Displaced::Jmp(Target::Abs(t)) => jmp(&mut b, t as usize)?,
        Displaced::Call(Target::Abs(t)) => {
            // Push the original return address (the callee sees its real
            // caller), then jump: lea rsp, [rsp - 8]; mov dword [rsp], lo;
            // mov dword [rsp + 4], hi; jmp target.
            let ret = back as u64;
            b.extend_from_slice(&[0x48, 0x8D, 0x64, 0x24, 0xF8]);
            b.extend_from_slice(&[0xC7, 0x04, 0x24]);
            b.extend_from_slice(&(ret as u32).to_le_bytes());
            b.extend_from_slice(&[0xC7, 0x44, 0x24, 0x04]);
            b.extend_from_slice(&((ret >> 32) as u32).to_le_bytes());
            jmp(&mut b, t as usize)?;
        }
        Displaced::Jcc { cond, target } => {
            b.extend_from_slice(&[0x0F, 0x80 | (cond.0 & 0xF)]);
            let end = stub + b.len() + 4;
            b.extend_from_slice(&rel32(site, end, target as usize)?);
            jmp(&mut b, back)?;
        }
        _ => {
            return Err(Error::unsupported(
                site,
                "this instruction cannot be displaced by a fast probe",
            ))
        }
    }
    if b.len() > STUB_SLOT {
        return Err(Error::unsupported(
            site,
            "the fast stub would outgrow its slot",
        ));
    }
    Ok(b)
}

/// The `jmp rel32` written over a fast site.
pub fn site_jump(site: usize, stub: usize) -> Result<[u8; JMP_LEN]> {
    let r = rel32(site, site + JMP_LEN, stub)?;
    Ok([0xE9, r[0], r[1], r[2], r[3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::analyze;

    #[test]
    fn trampoline_fits_and_ends_with_ret_136() {
        let t = emit_trampoline(0x7000_0000, 0x5555_0000_1234).unwrap();
        assert!(t.len() <= TRAMPOLINE_SIZE);
        assert_eq!(&t[t.len() - 3..], &[0xC2, 0x88, 0x00], "ret 136");
        assert_eq!(t[0], 0x9C, "pushfq first: flags before any arithmetic");
    }

    #[test]
    fn nop5_stub_golden_bytes() {
        let code = [0x0F, 0x1F, 0x44, 0x00, 0x00];
        let site = 0x40_1000;
        let d = analyze(&code, site).unwrap();
        assert!(fast_eligible(d.len, &d.displaced));
        let stub = 0x50_0000;
        let b = emit_site_stub(&code, site, d.len, &d.displaced, stub, 0x4F_F000, 7).unwrap();
        let call_rel = (0x4F_F000i64 - (stub as i64 + 18)) as i32;
        let back_rel = (site as i64 + 5 - (stub as i64 + 23)) as i32;
        let mut expect = vec![
            0x48, 0x8D, 0xA4, 0x24, 0x80, 0xFF, 0xFF, 0xFF, 0x68, 7, 0, 0, 0, 0xE8,
        ];
        expect.extend_from_slice(&call_rel.to_le_bytes());
        expect.push(0xE9);
        expect.extend_from_slice(&back_rel.to_le_bytes());
        assert_eq!(b, expect);
        assert_eq!(site_jump(site, stub).unwrap()[0], 0xE9);
        let r = i32::from_le_bytes(site_jump(site, stub).unwrap()[1..].try_into().unwrap());
        assert_eq!(site as i64 + 5 + r as i64, stub as i64);
    }

    #[test]
    fn eligibility() {
        let check = |code: &[u8]| {
            let d = analyze(code, 0x40_0000).unwrap();
            fast_eligible(d.len, &d.displaced)
        };
        assert!(check(&[0x0F, 0x1F, 0x44, 0x00, 0x00]), "nop5");
        assert!(check(&[0x48, 0x8B, 0x05, 1, 0, 0, 0]), "mov rax, [rip+1]");
        assert!(check(&[0xE8, 0, 0, 0, 0]), "call rel32");
        assert!(check(&[0xE9, 0, 0, 0, 0]), "jmp rel32");
        assert!(check(&[0x0F, 0x84, 0, 0, 0, 0]), "jz rel32");
        assert!(check(&[0xB8, 1, 0, 0, 0]), "mov eax, 1");
        assert!(!check(&[0x55]), "push rbp is too short");
        assert!(
            !check(&[0x48, 0x83, 0xEC, 0x10]),
            "sub rsp, 16 is too short"
        );
        assert!(
            !check(&[0xFF, 0x15, 0, 0, 0, 0]),
            "call [rip] is not emulated in a stub"
        );
    }

    #[test]
    fn call_is_emulated_with_the_original_return_address() {
        let code = [0xE8, 0x10, 0, 0, 0];
        let site = 0x40_1000;
        let d = analyze(&code, site).unwrap();
        let b = emit_site_stub(&code, site, d.len, &d.displaced, 0x50_0000, 0x4F_F000, 1).unwrap();
        let tail = &b[STUB_PROLOGUE..];
        assert_eq!(&tail[..5], &[0x48, 0x8D, 0x64, 0x24, 0xF8]);
        assert_eq!(&tail[8..12], &(site as u32 + 5).to_le_bytes());
        assert_eq!(&tail[16..20], &0u32.to_le_bytes());
    }
}
