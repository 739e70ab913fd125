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
//! Pushes RFLAGS and rax, aligns the stack down to 64 bytes and saves every
//! GPR and xmm0–15 into a [`FastFrame`] there (the same [`Regs`] layout the
//! handler sees on the trap path; aligned, so no store splits a cache line),
//! and clears DF (the ABI requires it clear at calls). Then it dispatches:
//!
//! - **The inline case**, in assembly: the thread's home section slot is its
//!   own and not in a section; the probe record still has the tag's
//!   generation; the probe's consumer list says it may be dispatched inline
//!   (one consumer of the plain kind — the writer decides, so a new kind of
//!   consumer needs no change here), attached, whose way of the slot's hit
//!   cache is already its own. It enters the section, calls the
//!   handler, counts the hit and leaves. This is the fast path of
//!   `grace::enter`, `probe::dispatch` and `Section::count_hit`/`exit`,
//!   repeated instruction for instruction over the layout in
//!   [`InlineLayout`]: a compiled dispatcher costs about twice the
//!   instructions (prologue, spills, the general loop), which is most of a
//!   fast hit. A handler that returns `Remove` or moves RIP or RSP sends it
//!   to `after`, still inside the section.
//! - **Anything else** (first hit of a thread, recursion, several
//!   consumers, a stale stub...): `dispatch(tag, frame)`, the general
//!   dispatcher in Rust, which enters a section of its own.
//!
//! It then restores everything from the frame (so register writes take
//! effect; the status flags and DF of RFLAGS, but not the system flags, and
//! without the microcoded `popfq`) and leaves with
//!
//! ```text
//!             mov  rsp, [frame.exit]
//!             ret  136
//! ```
//!
//! `frame.exit` points at a slot holding where to go, 136 bytes (the tag and
//! the red zone) above which lies the stack pointer to resume with: by
//! default the `call`'s own return address (`ret_point`) at `rsp₀ - 144`, so
//! `ret 136` lands on `ret_point` with `rsp = rsp₀`. A handler that writes
//! RIP or RSP moves that slot (see `fast::redirect`).
//!
//! # Safety
//!
//! Nothing here runs code; it computes bytes, and [`FastFrame::retarget`]
//! writes the resume slot on the thread's own stack, below the stack pointer
//! it will resume with. The frame layout below is shared with the assembly
//! it emits, checked by the compile-time assertions.
#![allow(unsafe_code)]

use dynasmrt::x64::X64Relocation;
use dynasmrt::{dynasm, DynasmApi, DynasmLabelApi, VecAssembler};

use super::insn::Target;
use super::{emit_out_of_line, Displaced, Regs, STUB_SLOT};
use crate::error::{Error, Result};
use crate::sigctx::SignalContext;

/// What the trampoline saves, 64-byte aligned below the stack pointer the
/// stub called it with.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct FastFrame {
    /// The registers, as the handler sees them.
    pub regs: Regs,
    /// The address of the slot `ret 136` resumes from (see the module docs).
    pub exit: u64,
    /// The `call`'s return address: the stub's `ret_point`.
    pub ret_point: u64,
    /// The inline case's `Hit` (address, registers, user data).
    pub hit: [u64; 3],
    _pad: u64,
    /// xmm0–15, restored unchanged.
    pub xmm: [[u64; 2]; 16],
}

impl FastFrame {
    /// The stack pointer of the probed instruction (what RSP reads before
    /// any handler wrote it).
    ///
    /// # Signal safety
    /// Arithmetic.
    #[inline]
    pub fn entry_sp(&self) -> usize {
        (self.exit + EXIT_POP + 8) as usize
    }

    /// Points the trampoline's exit at where the handlers sent the thread:
    /// `regs.rip` (or, if it is still the probed address `probed`, the
    /// displaced instruction at `ret_point`) with `regs.rsp`. `false` if the
    /// new stack pointer would put the exit slot inside the frames still in
    /// use (the caller reports and aborts).
    ///
    /// By default the exit slot holds the stub's `ret_point`, just below the
    /// original stack pointer; a handler that wrote RIP or RSP needs another
    /// target or slot. The slot is always the 8 bytes `EXIT_POP + 8` below
    /// the stack pointer to resume with (`ret 136` pops it, then the rest).
    ///
    /// # Signal safety
    /// Arithmetic and one store to the thread's own stack.
    pub fn retarget(&mut self, _cx: SignalContext, probed: usize) -> bool {
        let (rip, rsp) = (self.regs.rip, self.regs.get(super::Reg::Rsp));
        let target = if rip == probed as u64 {
            self.ret_point
        } else {
            rip
        };
        let slot = rsp.wrapping_sub(EXIT_POP + 8);
        // What the trampoline still reads after we return: the frame.
        let base = self as *const FastFrame as u64;
        let live = base..base + std::mem::size_of::<FastFrame>() as u64;
        // And the dispatcher's own frames, below the trampoline's, live until
        // it returns: from a little below this function's locals up to the
        // frame.
        let marker = 0u8;
        let own = (std::ptr::addr_of!(marker) as u64).saturating_sub(256);
        if slot.wrapping_add(8) > own.min(live.start) && slot < live.end {
            return false;
        }
        // SAFETY: the slot lies below the stack pointer the thread resumes
        // with (so it holds no live data of the interrupted code) and outside
        // the frame still to be restored (checked above); the handler chose
        // that stack pointer for the thread.
        unsafe { std::ptr::write_volatile(slot as *mut u64, target) };
        self.exit = slot;
        true
    }
}

/// What the trampoline's inline case knows of probert's data structures:
/// addresses and field offsets, all from `offset_of!`/`size_of` (see
/// `crate::fast::inline_layout`).
#[derive(Clone, Copy, Debug)]
pub struct InlineLayout {
    /// The read-side section table (`grace`): slot 0, slot size, fields,
    /// hit-cache ways, and the home hash `(tp * home_mul) >> home_shift`.
    pub table: usize,
    pub slot_size: usize,
    pub slot_owner: usize,
    pub slot_seq: usize,
    pub slot_hits: usize,
    pub hit_ways: usize,
    pub home_mul: u64,
    pub home_shift: u32,
    /// The probe records (`probe::PROBES`): record 0, the record size (a
    /// power of two), fields.
    pub probes: usize,
    pub probe_size: usize,
    pub probe_addr: usize,
    pub probe_gen: usize,
    pub probe_consumers: usize,
    /// How a stub's tag splits into record index and generation.
    pub tag_index_bits: u32,
    pub tag_gen_mask: u32,
    /// A consumer list's inline flag (non-zero: the inline case may
    /// dispatch it) and its first entry's fields.
    pub list_inline: usize,
    pub first_handler: usize,
    pub first_user_data: usize,
    pub first_record: usize,
    pub first_tag: usize,
    /// A consumer record's state, and the value that means attached.
    pub consumer_state: usize,
    pub state_active: u32,
    /// The general dispatcher, `extern "C" fn(tag, frame)`.
    pub dispatch: usize,
    /// What the inline case calls, still inside its section, when the
    /// handler asked to be removed or moved RIP or RSP:
    /// `extern "C" fn(frame, action: u32, consumer_record, addr)`.
    pub after: usize,
}

/// The hardware number of each register of [`Regs`], in its order (rax,
/// rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8–r15).
const GPR: [u8; 16] = [0, 3, 1, 2, 6, 7, 5, 4, 8, 9, 10, 11, 12, 13, 14, 15];

const FRAME_SIZE: i32 = std::mem::size_of::<FastFrame>() as i32;
const EXIT: i32 = std::mem::offset_of!(FastFrame, exit) as i32;
const RET_POINT: i32 = std::mem::offset_of!(FastFrame, ret_point) as i32;
const HIT: i32 = std::mem::offset_of!(FastFrame, hit) as i32;
const XMM: i32 = std::mem::offset_of!(FastFrame, xmm) as i32;
const RSP: i32 = 0x38;
const RIP: i32 = 0x80;
const RFLAGS: i32 = 0x88;
const _: () = assert!(std::mem::offset_of!(Regs, gpr) + 7 * 8 == RSP as usize);
const _: () = assert!(std::mem::size_of::<Regs>() == 144);
const _: () = assert!(std::mem::offset_of!(Regs, rip) == RIP as usize);
const _: () = assert!(std::mem::offset_of!(Regs, rflags) == RFLAGS as usize);
const _: () = assert!(XMM % 64 == 0 && FRAME_SIZE % 64 == 0);
/// Below the stack pointer `rsp₀` of the probed instruction, what the stub
/// and the trampoline's first pushes leave: the red zone, the tag, the
/// `call`'s return address, RFLAGS and rax.
const TAG_AT: i32 = -136;
const RET_AT: i32 = -144;
const FLAGS_AT: i32 = -152;
const RAX_AT: i32 = -160;
/// What `ret 136` pops besides the target: the tag and the red zone.
pub const EXIT_POP: u64 = 136;
/// The length of the stub's prologue, up to `ret_point`.
pub const STUB_PROLOGUE: usize = 8 + 5 + 5;

/// Bytes of the trampoline (fits in this many bytes of the chunk).
pub const TRAMPOLINE_SIZE: usize = 2048;

fn disp(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Internal("fast trampoline: offset out of range".into()))
}

/// Emits the shared trampoline to be placed at `at`, for the data described
/// by `l`.
// dynasm's dynamic registers (`Rq(n)`) expand to an `.into()` of the number.
#[allow(clippy::useless_conversion)]
pub fn emit_trampoline(at: usize, l: &InlineLayout) -> Result<Vec<u8>> {
    if l.probes == 0 || !l.probe_size.is_power_of_two() || !l.hit_ways.is_power_of_two() {
        return Err(Error::Internal("fast trampoline: bad inline layout".into()));
    }
    let (owner, seq, hits) = (disp(l.slot_owner)?, disp(l.slot_seq)?, disp(l.slot_hits)?);
    let (p_addr, p_gen, p_list) = (
        disp(l.probe_addr)?,
        disp(l.probe_gen)?,
        disp(l.probe_consumers)?,
    );
    let (inline, handler, user_data, record, tag) = (
        disp(l.list_inline)?,
        disp(l.first_handler)?,
        disp(l.first_user_data)?,
        disp(l.first_record)?,
        disp(l.first_tag)?,
    );
    let state = disp(l.consumer_state)?;
    let mut a = VecAssembler::<X64Relocation>::new(at);
    dynasm!(a
        ; .arch x64
        ; pushfq
        ; push rax
        ; lea rax, [rsp - RAX_AT]          // rsp₀
        ; and rsp, -64
        ; sub rsp, FRAME_SIZE
    );
    for i in 1..7i32 {
        dynasm!(a ; .arch x64 ; mov [rsp + 8 * i], Rq(GPR[i as usize]));
    }
    dynasm!(a
        ; .arch x64
        ; mov [rsp + RSP], rax
    );
    for i in 8..16i32 {
        dynasm!(a ; .arch x64 ; mov [rsp + 8 * i], Rq(GPR[i as usize]));
    }
    dynasm!(a
        ; .arch x64
        ; mov rcx, [rax + RAX_AT]
        ; mov [rsp + 0x00], rcx
        ; mov rcx, [rax + FLAGS_AT]
        ; mov [rsp + RFLAGS], rcx
        ; mov rcx, [rax + RET_AT]
        ; mov [rsp + RET_POINT], rcx
        ; lea rcx, [rax + RET_AT]
        ; mov [rsp + EXIT], rcx
        ; mov rdi, [rax + TAG_AT]
    );
    for i in 0..16u8 {
        dynasm!(a ; .arch x64 ; movdqa [rsp + XMM + 16 * i32::from(i)], Rx(i));
    }
    dynasm!(a
        ; .arch x64
        ; cld
    );
    // The inline case (module docs): rdi = tag, rsp = frame; every register
    // is saved, and rbx rbp r12–r15 survive the handler call.
    dynasm!(a
        ; .arch x64
        // `grace::enter`, fast path: the home slot is ours and not in a
        // section. rbx = slot, r12 = its sequence.
        ; fs mov rax, [0]
        ; mov rcx, QWORD l.home_mul as i64
        ; imul rcx, rax
        ; shr rcx, l.home_shift as i8
        ; imul rcx, rcx, disp(l.slot_size)?
        ; mov rbx, QWORD l.table as i64
        ; add rbx, rcx
        ; cmp [rbx + owner], rax
        ; jne >general
        ; mov r12, [rbx + seq]
        ; test r12b, 1
        ; jnz >general
        ; inc r12
        ; mov [rbx + seq], r12
        // The probe record of the tag (r13): its list (r14) and address
        // (r15), if the record is still of the tag's generation after them.
        // (The writer bumps the generation before it reinitialises a record,
        // and x86 keeps loads in order: fields of a newer probe come with
        // its generation.)
        ; mov eax, edi
        ; and eax, ((1u32 << l.tag_index_bits) - 1) as i32
        ; shl rax, l.probe_size.trailing_zeros() as i8
        ; mov r13, QWORD l.probes as i64
        ; add r13, rax
        ; mov esi, edi
        ; shr esi, l.tag_index_bits as i8
        ; mov r14, [r13 + p_list]
        ; mov r15, [r13 + p_addr]
        ; mov eax, [r13 + p_gen]
        ; and eax, l.tag_gen_mask as i32
        ; cmp eax, esi
        ; jne >leave_general
        ; test r15, r15
        ; jz >leave_general
        // A list the inline case may dispatch (one consumer of the plain
        // kind: decided by the writer, in the list's data), attached, whose
        // way of the hit cache (r13, the record no longer needed) is its
        // own. (rbp stays the interrupted code's, for handlers that walk
        // frame pointers.)
        ; test r14, r14
        ; jz >leave_general
        ; cmp QWORD [r14 + inline], 0
        ; je >leave_general
        ; mov rax, [r14 + record]
        ; cmp DWORD [rax + state], l.state_active as i32
        ; jne >leave_general
        ; mov rax, [r14 + tag]
        ; mov ecx, eax
        ; and ecx, (l.hit_ways - 1) as i32
        ; shl ecx, 4
        ; lea r13, [rbx + rcx + hits]
        ; cmp [r13], rax
        ; jne >leave_general
        // The call: regs.rip = the probed address; Hit in the frame.
        ; mov [rsp + RIP], r15
        ; mov [rsp + HIT], r15
        ; mov [rsp + HIT + 8], rsp
        ; mov rax, [r14 + user_data]
        ; mov [rsp + HIT + 16], rax
        ; lea rdi, [rsp + HIT]
        ; call QWORD [r14 + handler]
        ; inc QWORD [r13 + 8]
        // `Remove`, or RIP or RSP moved: the Rust side, still in the section
        // (eax, the handler's action, goes with it).
        ; cmp eax, 1
        ; je >after
        ; cmp [rsp + RIP], r15
        ; jne >after
        ; mov rcx, [rsp + EXIT]
        ; add rcx, (EXIT_POP + 8) as i32
        ; cmp [rsp + RSP], rcx
        ; jne >after
        ; leave:
        ; inc r12
        ; mov [rbx + seq], r12
        ; jmp >restore
        ; after:
        ; mov rdi, rsp
        ; mov esi, eax
        ; mov rdx, [r14 + record]
        ; mov rcx, r15
        ; mov rax, QWORD l.after as i64
        ; call rax
        ; jmp <leave
        // Anything else: leave the section, and run the general dispatcher.
        ; leave_general:
        ; inc r12
        ; mov [rbx + seq], r12
        ; general:
        ; mov rsi, rsp
        ; mov rax, QWORD l.dispatch as i64
        ; call rax
        ; restore:
    );
    for i in 0..16u8 {
        dynasm!(a ; .arch x64 ; movdqa Rx(i), [rsp + XMM + 16 * i32::from(i)]);
    }
    // rax and rcx last: the flags below need them; rsp from `exit`.
    for i in (1..16i32).filter(|&i| i != 2 && i != 7) {
        dynasm!(a ; .arch x64 ; mov Rq(GPR[i as usize]), [rsp + 8 * i]);
    }
    dynasm!(a
        ; .arch x64
        // RFLAGS without `popfq` (microcoded, tens of cycles), and with only
        // full-register writes (no partial-register merge before `sahf`):
        // DF by hand (the dispatcher returned with it clear); OF from an
        // `add` that overflows exactly when it was set; then SF ZF AF PF CF
        // from AH with `sahf`, which leaves OF alone. The system flags (IF,
        // TF, AC...) are not the handler's to change.
        ; test DWORD [rsp + RFLAGS], 0x400
        ; jz >no_df
        ; std
        ; no_df:
        ; mov eax, [rsp + RFLAGS]
        ; shl eax, 8
        ; mov ecx, [rsp + RFLAGS]
        ; and ecx, 0x800
        ; shl ecx, 20
        ; add ecx, ecx
        ; sahf
        ; mov rax, [rsp + 0x00]
        ; mov rcx, [rsp + 0x10]
        ; mov rsp, [rsp + EXIT]
        ; ret EXIT_POP as i16
    );
    let bytes = a
        .finalize()
        .map_err(|e| Error::Internal(format!("emitting the fast trampoline: {e:?}").into()))?;
    if bytes.len() > TRAMPOLINE_SIZE {
        return Err(Error::Internal(
            format!(
                "the fast trampoline outgrew its space: {} bytes",
                bytes.len()
            )
            .into(),
        ));
    }
    Ok(bytes)
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

/// The stub's first [`STUB_PROLOGUE`] bytes, up to `ret_point`: step over
/// the red zone, push `tag`, call `trampoline`.
pub(super) fn stub_prologue(
    site: usize,
    stub: usize,
    trampoline: usize,
    tag: u32,
) -> Result<Vec<u8>> {
    if tag > i32::MAX as u32 {
        return Err(Error::Internal("fast stub tag out of range".into()));
    }
    // lea rsp, [rsp - 128]; push imm32; call rel32
    let mut b = vec![0x48, 0x8D, 0xA4, 0x24, 0x80, 0xFF, 0xFF, 0xFF, 0x68];
    b.extend_from_slice(&tag.to_le_bytes());
    b.push(0xE8);
    b.extend_from_slice(&rel32(site, stub + b.len() + 4, trampoline)?);
    debug_assert_eq!(b.len(), STUB_PROLOGUE);
    Ok(b)
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
    let back = site + len as usize;
    let mut b = stub_prologue(site, stub, trampoline, tag)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::analyze;

    #[test]
    fn trampoline_fits_and_ends_with_ret_136() {
        let l = InlineLayout {
            table: 0x5555_0001_0000,
            slot_size: 192,
            slot_owner: 0,
            slot_seq: 8,
            slot_hits: 16,
            hit_ways: 8,
            home_mul: 0x9E37_79B9_7F4A_7C15,
            home_shift: 55,
            probes: 0x7f00_0000_0000,
            probe_size: 64,
            probe_addr: 0,
            probe_gen: 0x38,
            probe_consumers: 0x30,
            tag_index_bits: 20,
            tag_gen_mask: 0x7ff,
            list_inline: 8,
            first_handler: 16,
            first_user_data: 24,
            first_record: 32,
            first_tag: 40,
            consumer_state: 0,
            state_active: 1,
            dispatch: 0x5555_0000_1234,
            after: 0x5555_0000_5678,
        };
        let t = emit_trampoline(0x7000_0000, &l).unwrap();
        assert!(t.len() <= TRAMPOLINE_SIZE);
        assert_eq!(&t[t.len() - 3..], &[0xC2, 0x88, 0x00], "ret 136");
        assert_eq!(t[0], 0x9C, "pushfq first: flags before any arithmetic");
    }

    #[test]
    fn nop5_stub_golden_bytes() {
        let code = [0x0F, 0x1F, 0x44, 0x00, 0x00];
        let site = 0x40_1000;
        let d = analyze(&code, site).unwrap();
        assert!(super::super::patch::fast_eligible(d.len, &d.displaced));
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
    }

    #[test]
    fn eligibility() {
        let check = |code: &[u8]| {
            let d = analyze(code, 0x40_0000).unwrap();
            super::super::patch::fast_eligible(d.len, &d.displaced)
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
