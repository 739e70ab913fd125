//! Fast-path code: a site becomes `jmp rel32` to a per-site stub that calls
//! the dispatcher through a shared trampoline — no signal, no syscall.
//!
//! # The per-site stub (a pool slot)
//!
//! ```text
//! slot:       .quad record              ; the probe record (data, never run)
//!             .quad site                ; the patch address it belongs to
//! entry:      lea  rsp, [rsp - 128]     ; step over the red zone
//!             call trampoline           ; pushes ret_point
//! ret_point:  <displaced instructions>  ; relocated (see `displace`)
//!             jmp  site_end
//! ```
//!
//! The site jumps to `entry`. The trap path resumes at `ret_point` too, so
//! a site whose instructions are being switched never runs them in place.
//!
//! # The trampoline (one per stub chunk, shared by its stubs)
//!
//! Pushes RFLAGS and stores the GPRs a call may change (rax, rcx, rdx, rsi,
//! rdi, r8–r11) right below the stub's return address, in the [`Regs`]
//! layout the handler sees on the trap path ([`FastFrame::regs`], built in
//! place: no copy). It reads the stub's data words (through the return
//! address) and the probe record's *clobber classes* (`effects`): what the
//! probe's handlers may change or see beyond the caller-saved GPRs and the
//! flags.
//!
//! - **None** (a handler that counts hits and never looks at its frame):
//!   the *lean case*, the inline case below with nothing more saved — the
//!   callee-saved registers are the handler's to keep (the ABI), and it
//!   cannot see the frame's missing ones ([`Clobbers::FRAME`] is clear).
//!   Its `Hit` and the words it needs after the call lie just below the
//!   registers; it restores the caller-saved GPRs and the flags and leaves
//!   by `ret 128`. Whatever it does not serve it hands to the full case
//!   with every callee-saved register still untouched; a handler that
//!   returns `Remove` completes the frame and goes on as the full case's
//!   inline case does.
//! - **Some**: the *full case*. The callee-saved GPRs join the frame; r15
//!   holds the registers' address from then on, and the rest of the
//!   [`FastFrame`] lies below them, with the stack pointer 16-byte aligned
//!   under it. The classes are saved — xmm0–15 and MXCSR; the upper vector
//!   state, the opmasks and the x87 stack (by what `xgetbv(1)` says is in
//!   use, into an area below the frame); `errno` — and restored after the
//!   call; components that were in their initial state are put back there
//!   (zeroed) rather than saved.
//!
//! DF is cleared if it was set (the ABI requires it clear at calls). Then
//! the full case dispatches:
//!
//! - **The inline case**, in assembly: the thread's home section slot is its
//!   own and not in a section; the probe record is still the site's; its
//!   consumer list says it may be dispatched inline (one consumer of the
//!   plain kind — the writer decides, so a new kind of consumer needs no
//!   change here), whose classes were saved, and attached. It enters the
//!   section, calls the handler, counts the hit (taking over the consumer's
//!   way of the slot's hit cache when another consumer holds it, whose count
//!   it flushes into that consumer's record) and leaves — the fast path of
//!   `grace::enter`, `probe::dispatch` and `Section::count_hit`/`exit`,
//!   repeated over the layout in [`InlineLayout`]. A handler that returns
//!   `Remove` or moves RIP or RSP sends it to `after`, still inside the
//!   section. Real code, whose hits go to thousands of consumers in turn,
//!   stays inline: a way held by another consumer is taken over there.
//! - **Anything else** (first hit of a thread, recursion, several
//!   consumers, a stale stub...): `dispatch(record, site, frame)`, the
//!   general dispatcher in Rust, which enters a section of its own.
//!
//! It then restores everything from the frame (so register writes take
//! effect; the status flags and DF of RFLAGS, but not the system flags, and
//! without the microcoded `popfq`) and leaves with
//!
//! ```text
//!             lea  rsp, [r15 + 0x90]    ; the return address's slot
//!             mov  r15, [rsp - 0x18]    ; regs.r15
//!             ret  128
//! ```
//!
//! so `ret 128` lands on `ret_point` with `rsp = rsp₀`. Once rsp is the exit
//! slot the frame lies below the stack pointer, where a signal frame may
//! land at any instruction — except in the 128 bytes right under it, the
//! red zone the kernel skips: r15 is the frame register because its slot
//! is there. A handler that writes RIP or RSP sends the hit through another
//! exit, `mov rsp, [r15 + exit]` instead of the `lea`, to a slot
//! [`FastFrame::retarget`] prepared (with a copy of r15 under it); where the
//! new stack pointer is too far below for that, the exit goes through a
//! trap instruction whose handler sets both ([`far_exit`]).
//!
//! The costs that matter (AMD Zen 4, per hit): the stub's four control
//! transfers (jump in, call, ret, jump back) about 2 ns, `pushfq` under
//! 1 ns, and the stores — the path is store-bound, which is why the
//! registers are stored where the handler reads them and nothing is copied,
//! and why the lean case stores nine GPRs instead of sixteen (about 1.8 ns
//! less per hit on an AMD EPYC Zen 3 guest, with an empty handler).
//! A load narrower than, and at an offset into, a store still in flight
//! waits for the store to retire (no forwarding): DF is tested in a whole
//! reload of the flags, not a byte.
//!
//! The trampoline is assembled with `dynasmrt`; the AVX, AVX-512 and XSAVE
//! instructions of its slow paths, which `dynasm` does not know, are encoded
//! with `iced-x86` and spliced in.
//!
//! # Safety
//!
//! Nothing here runs code; it computes bytes, and [`FastFrame::retarget`]
//! writes the resume slot on the thread's own stack, above the stack
//! pointer the trampoline runs with. The frame layout below is shared with
//! the assembly it emits, checked by the compile-time assertions.
#![allow(unsafe_code)]

use dynasmrt::x64::X64Relocation;
use dynasmrt::{dynasm, DynasmApi, DynasmLabelApi, VecAssembler};
use iced_x86::{Code, Encoder, Instruction, MemoryOperand, Register};

use super::effects::Clobbers;
use super::{Regs, TrapContext};
use crate::error::{Error, Result};
use crate::sigctx::SignalContext;

/// What the trampoline saves: the registers it pushes below the stub's
/// return address ([`Regs`] layout, the same the handler sees on the trap
/// path), and below them what the hit needs. Lies on the thread's stack,
/// above the stack pointer the trampoline runs with.
#[repr(C)]
#[derive(Debug)]
pub struct FastFrame {
    /// The inline case's `Hit` (address, registers, user data, session,
    /// is_return).
    pub hit: [u64; 5],
    /// `xgetbv(1)` when the upper vector, opmask or x87 state was saved.
    xinuse: u32,
    /// MXCSR, saved with [`Clobbers::SSE`].
    mxcsr: u32,
    /// `errno`, saved with [`Clobbers::ERRNO`].
    errno: u32,
    _pad: u32,
    /// After a redirect: the address of the slot `ret 128` resumes from (see
    /// [`FastFrame::retarget`]).
    exit: u64,
    /// The far exit's words (see [`FastFrame::retarget`]): its exit slot at
    /// [`FAR_SLOT`], with the copy of r15 the exit reads
    /// [`FRAME_REG_BELOW_EXIT`] bytes below it and the target and stack
    /// pointer 16 and 24 bytes above it.
    far: [u64; FAR_WORDS],
    /// xmm0–15, saved with [`Clobbers::SSE`].
    xmm: [[u64; 2]; 16],
    /// The registers, as the handler sees them (pushed by the trampoline).
    pub regs: Regs,
    /// The stub `call`'s return address: the stub's `ret_point`, and the
    /// slot the normal exit's `ret 128` resumes from.
    pub ret_point: u64,
}

/// What the final `ret` pops besides the target: the red zone (the
/// target's own slot is the stub `call`'s return address, 136 bytes below
/// the probed instruction's stack pointer).
const EXIT_POP: u64 = 128;
/// Where the exit reads r15 (the trampoline's frame register) from, below
/// the exit slot: within the 128 bytes no signal frame can take (for the
/// normal exit it is `regs.r15` itself).
const FRAME_REG_BELOW_EXIT: i32 = (std::mem::size_of::<Regs>() - R15 as usize) as i32;
/// The far exit's slot, in [`FastFrame::far`] (words).
const FAR_SLOT: usize = FRAME_REG_BELOW_EXIT as usize / 8;
const FAR_WORDS: usize = FAR_SLOT + 4;

impl FastFrame {
    /// The stack pointer of the probed instruction (what RSP reads before
    /// any handler wrote it).
    ///
    /// # Signal safety
    /// Arithmetic.
    #[inline]
    pub fn entry_sp(&self) -> usize {
        std::ptr::addr_of!(self.ret_point) as usize + 8 + EXIT_POP as usize
    }

    /// Points the trampoline's exit at where the handlers sent the thread:
    /// `regs.rip` (or, if it is still the probed address `probed`, the
    /// displaced instructions at `ret_point`) with `regs.rsp`. The
    /// trampoline takes this exit when its dispatcher says so (returns
    /// non-zero).
    ///
    /// The exit slot must hold the target until the trampoline's `ret`, with
    /// the copy of r15 the exit reads [`FRAME_REG_BELOW_EXIT`] bytes below it, so
    /// both must lie above the stack pointer the trampoline runs with
    /// (memory below it belongs to any signal frame) and outside the frame
    /// still to be read. The slot 8 bytes under `EXIT_POP` below the new
    /// stack pointer qualifies when that is above the frame; otherwise (a
    /// handler that lowered RSP) the exit goes through [`far_exit`]: the
    /// frame's own far slot leads to a trap instruction, and the `SIGTRAP`
    /// handler sets RIP and RSP from the frame.
    ///
    /// # Signal safety
    /// Arithmetic and at most two stores to the thread's own stack.
    pub fn retarget(&mut self, _cx: SignalContext, probed: usize) {
        let (rip, rsp) = (self.regs.rip, self.regs.get(super::Reg::Rsp));
        let r15 = self.regs.get(super::Reg::R15);
        let target = if rip == probed as u64 {
            self.ret_point
        } else {
            rip
        };
        let frame_end = self.entry_sp() as u64 - EXIT_POP;
        let low = rsp.checked_sub(EXIT_POP + 8).and_then(|slot| {
            slot.checked_sub(FRAME_REG_BELOW_EXIT as u64)
                .map(|l| (slot, l))
        });
        match low {
            Some((slot, low)) if low >= frame_end => {
                // SAFETY: both words lie below the stack pointer the thread
                // resumes with, beyond its red zone (so they hold no live
                // data of the interrupted code), and above the frame and the
                // stack pointer the trampoline runs with (checked); the
                // handler chose that stack pointer for the thread.
                unsafe {
                    std::ptr::write_volatile(slot as *mut u64, target);
                    std::ptr::write_volatile(low as *mut u64, r15);
                }
                self.exit = slot;
            }
            _ => {
                self.far[FAR_SLOT] = far_exit_address() as u64;
                self.far[FAR_SLOT + 2] = target;
                self.far[FAR_SLOT + 3] = rsp;
                self.far[FAR_SLOT - FRAME_REG_BELOW_EXIT as usize / 8] = r15;
                self.exit = std::ptr::addr_of!(self.far[FAR_SLOT]) as u64;
            }
        }
    }
}

// The far exit: a trap instruction in `probert_fast` (thread scans treat a
// thread there as on its way out of a stub), reached with every register
// restored and RSP just above the frame's far exit slot.
std::arch::global_asm!(
    ".pushsection probert_fast,\"ax\",@progbits",
    ".p2align 4",
    ".globl __probert_far_exit",
    ".hidden __probert_far_exit",
    "__probert_far_exit:",
    "int3",
    "ud2",
    ".popsection",
);

fn far_exit_address() -> usize {
    extern "C" {
        #[link_name = "__probert_far_exit"]
        static FAR_EXIT: u8;
    }
    std::ptr::addr_of!(FAR_EXIT) as usize
}

/// The stack pointer at the far exit's trap, above the frame's far slot.
const FAR_SP_FROM_SLOT: usize = 8 + EXIT_POP as usize;

/// If the `SIGTRAP` in `ctx` is the fast path's far exit, resumes the
/// thread where its handler sent it and returns `true`.
///
/// # Signal safety
/// Two loads from the thread's own stack, above its stack pointer.
pub fn far_exit(_cx: SignalContext, ctx: &mut TrapContext<'_>) -> bool {
    if ctx.trap_address() != far_exit_address() {
        return false;
    }
    let regs = ctx.regs();
    let slot = regs.get(super::Reg::Rsp) as usize - FAR_SP_FROM_SLOT;
    // SAFETY: the trampoline left `rsp` just above the frame's far slot; the
    // target and stack pointer words lie above `rsp - 128`, where the kernel
    // put no signal frame, and were written by `retarget`.
    let (target, rsp) = unsafe {
        (
            std::ptr::read_volatile((slot + 16) as *const u64),
            std::ptr::read_volatile((slot + 24) as *const u64),
        )
    };
    let mut r = regs;
    r.rip = target;
    r.set(super::Reg::Rsp, rsp);
    ctx.set_regs(&r);
    true
}

/// Where the trampoline's inline case finds probert's data: addresses and
/// field offsets, all from `offset_of!`/`size_of` (see
/// `crate::fast::inline_layout`), and what it calls.
#[derive(Clone, Copy, Debug)]
pub struct InlineLayout {
    /// The read-side section table (`grace`): slot 0, slot size, fields,
    /// hit-cache ways, and the home hash `(tp * home_mul) >> home_shift`.
    pub table: usize,
    pub slot_size: usize,
    pub slot_owner: usize,
    pub slot_seq: usize,
    /// The hit caches: slot 0's, and the distance between two (slot `i`
    /// owns cache `i`).
    pub hits_table: usize,
    pub hits_size: usize,
    pub hit_ways: usize,
    pub home_mul: u64,
    pub home_shift: u32,
    /// Fields of a probe record (`probe::ProbeRecord`): the patch address
    /// (the site's key), the address handlers see as RIP, the consumer
    /// list, the union of its consumers' clobber classes (a 32-bit word).
    pub probe_addr: usize,
    pub probe_report: usize,
    pub probe_consumers: usize,
    pub probe_clobbers: usize,
    /// A consumer list's inline flag (non-zero: the inline case may
    /// dispatch it) and its first entry's fields (`clobbers` a 32-bit word).
    pub list_inline: usize,
    pub first_handler: usize,
    pub first_user_data: usize,
    pub first_record: usize,
    pub first_tag: usize,
    pub first_clobbers: usize,
    /// A consumer record's state, and the value that means attached.
    pub consumer_state: usize,
    pub state_active: u32,
    /// Where an evicted hit-cache entry's count goes (`probe::flush_hits`):
    /// the address of the consumer arena's base pointer, its capacity, a
    /// record's size and its `hits` counter.
    pub consumers_base: usize,
    pub consumers_cap: usize,
    pub consumer_size: usize,
    pub consumer_hits: usize,
    /// `errno` relative to the thread pointer, for [`Clobbers::ERRNO`].
    pub errno_offset: i32,
    /// The general dispatcher, `extern "C" fn(record, site, frame, saved)
    /// -> redirected`.
    pub dispatch: usize,
    /// What the inline case calls, still inside its section, when the
    /// handler asked to be removed or moved RIP or RSP:
    /// `extern "C" fn(frame, action: u32, consumer_record, addr) ->
    /// redirected`.
    pub after: usize,
}

/// The hardware number of each register of [`Regs`], in its order (rax,
/// rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8–r15).
const GPR: [u8; 16] = [0, 3, 1, 2, 6, 7, 5, 4, 8, 9, 10, 11, 12, 13, 14, 15];

/// Offsets from the registers (rbx in the trampoline) into the frame.
const REGS_AT: i32 = std::mem::offset_of!(FastFrame, regs) as i32;
const FRAME_FROM_REGS: i32 = -REGS_AT;
const fn field(off: usize) -> i32 {
    off as i32 - REGS_AT
}
const EXIT: i32 = field(std::mem::offset_of!(FastFrame, exit));
const RET_POINT: i32 = field(std::mem::offset_of!(FastFrame, ret_point));
const HIT: i32 = field(std::mem::offset_of!(FastFrame, hit));
const XINUSE: i32 = field(std::mem::offset_of!(FastFrame, xinuse));
const MXCSR: i32 = field(std::mem::offset_of!(FastFrame, mxcsr));
const ERRNO: i32 = field(std::mem::offset_of!(FastFrame, errno));
const XMM: i32 = field(std::mem::offset_of!(FastFrame, xmm));
const ENTRY_SP: i32 = RET_POINT + 8 + EXIT_POP as i32;
const RCX: i32 = 0x10;
/// The lean case's area below the registers (see `emit_trampoline`): the
/// `Hit` at its (16-aligned) start, then the address of the registers, the
/// slot and the list; `LEAN_AREA` bytes leave room for the alignment.
const LEAN_REGS: i32 = 40;
const LEAN_SLOT: i32 = 48;
const LEAN_LIST: i32 = 56;
const LEAN_AREA: i32 = 72;
const R15: i32 = 0x78;
const RSP: i32 = 0x38;
const RIP: i32 = 0x80;
const RFLAGS: i32 = 0x88;
const _: () = assert!(std::mem::offset_of!(Regs, gpr) + 7 * 8 == RSP as usize);
const _: () = assert!(std::mem::size_of::<Regs>() == 144);
const _: () = assert!(std::mem::offset_of!(Regs, gpr) + 15 * 8 == R15 as usize);
const _: () = assert!(std::mem::offset_of!(Regs, rip) == RIP as usize);
const _: () = assert!(std::mem::offset_of!(Regs, rflags) == RFLAGS as usize);
// The registers end at the return address the stub's call pushed (the
// pushes build them in place), and the normal exit finds rbx within the 128
// bytes below it.
const _: () = assert!(RET_POINT == std::mem::size_of::<Regs>() as i32);
const _: () = assert!(RET_POINT - FRAME_REG_BELOW_EXIT == R15 && FRAME_REG_BELOW_EXIT < 128);
// The far exit's target and stack pointer lie above `rsp - 128` at its
// trap (rsp = far slot + FAR_SP_FROM_SLOT), out of the signal frame's reach.
const _: () = assert!(16 >= FAR_SP_FROM_SLOT - 128);

/// The area below the frame where the slow path saves the upper vector
/// state, the opmasks and the x87 state (64-byte aligned, like the frame).
const EXT_ZMM: i32 = 0;
const EXT_HI16: i32 = 0x400;
const EXT_K: i32 = 0x800;
const EXT_FX: i32 = 0x840;
const EXT_SIZE: i32 = 0xA40;

/// `XINUSE` bits (`xgetbv(1)`).
const XI_X87: u32 = 1 << 0;
const XI_AVX: u32 = 1 << 2;
const XI_OPMASK: u32 = 1 << 5;
const XI_ZMM_HI256: u32 = 1 << 6;
const XI_HI16_ZMM: u32 = 1 << 7;

/// The data words at the start of a site stub (the record and the site),
/// then the entry.
pub const STUB_DATA: usize = 16;
/// From a stub slot's start to `ret_point`: the data, `lea rsp, [rsp -
/// 128]` and `call rel32`.
pub const STUB_PROLOGUE: usize = STUB_DATA + 8 + 5;
/// The record's and the site's data words, below `ret_point`.
const STUB_RECORD_BELOW_RET: i32 = STUB_PROLOGUE as i32;
const STUB_SITE_BELOW_RET: i32 = STUB_PROLOGUE as i32 - 8;

/// Bytes of the trampoline (fits in this many bytes of the chunk).
pub const TRAMPOLINE_SIZE: usize = 4096;

/// The zeroed XSAVE area the trampoline's x87 reset restores from (64-byte
/// aligned, standard form: legacy area and header all zero, so every
/// component it restores is initialised). `xrstor` only reads it.
#[repr(C, align(64))]
struct XsaveInit([u8; 576]);
static XSAVE_INIT: XsaveInit = XsaveInit([0; 576]);

/// The register state the trampoline may have to save, from the CPU and the
/// kernel: which XSAVE components are enabled (`XCR0`), and whether
/// `xgetbv(1)` reports the ones in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuState {
    /// AVX (ymm upper halves) enabled.
    pub avx: bool,
    /// AVX-512 (opmasks, zmm upper halves, zmm16–31) enabled.
    pub avx512: bool,
    /// `xgetbv(1)` is available.
    pub xinuse: bool,
}

impl CpuState {
    /// This CPU's.
    pub fn detect() -> CpuState {
        let xsave = std::arch::is_x86_feature_detected!("xsave");
        let xcr0 = if xsave { xgetbv(0) } else { 3 };
        let leaf = std::arch::x86_64::__cpuid_count(0xD, 1);
        CpuState {
            avx: std::arch::is_x86_feature_detected!("avx") && xcr0 & 0x6 == 0x6,
            avx512: std::arch::is_x86_feature_detected!("avx512f") && xcr0 & 0xE6 == 0xE6,
            xinuse: xsave && leaf.eax & (1 << 2) != 0,
        }
    }
}

/// `xgetbv(ecx)`.
fn xgetbv(ecx: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: called only where `xsave` is supported (OSXSAVE set), so
    // XCR0 is readable; `xgetbv` only reads.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") ecx, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

fn disp(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Internal("fast trampoline: offset out of range".into()))
}

/// One instruction encoded by `iced-x86` (the ones `dynasm` lacks), for a
/// position-independent use.
fn enc(i: Instruction) -> Result<Vec<u8>> {
    let mut e = Encoder::new(64);
    e.encode(&i, 0)
        .map_err(|err| Error::Internal(format!("encoding {i}: {err}").into()))?;
    Ok(e.take_buffer())
}

fn mem(base: Register, d: i32) -> MemoryOperand {
    MemoryOperand::with_base_displ(base, i64::from(d))
}

/// The register `i` places after `kind` in iced's numbering (xmm, ymm, zmm
/// and k registers are numbered consecutively there).
fn reg(kind: Register, i: u32) -> Register {
    Register::values()
        .nth(kind as usize + i as usize)
        .unwrap_or(kind)
}

/// Emits the shared trampoline to be placed at `at`, for the data described
/// by `l` and the state `cpu` has. The chunk reserves [`TRAMPOLINE_SIZE`]
/// bytes for it; the caller writes the bytes returned at `at`.
// dynasm's dynamic registers (`Rq(n)`) expand to an `.into()` of the number.
#[allow(clippy::useless_conversion)]
pub fn emit_trampoline(at: usize, l: &InlineLayout, cpu: CpuState) -> Result<Vec<u8>> {
    if !l.hit_ways.is_power_of_two() || !l.hits_size.is_power_of_two() {
        return Err(Error::Internal("fast trampoline: bad inline layout".into()));
    }
    let (owner, seq) = (disp(l.slot_owner)?, disp(l.slot_seq)?);
    let (p_addr, p_report, p_list, p_clobbers) = (
        disp(l.probe_addr)?,
        disp(l.probe_report)?,
        disp(l.probe_consumers)?,
        disp(l.probe_clobbers)?,
    );
    let (inline, handler, user_data, record, tag, e_clobbers) = (
        disp(l.list_inline)?,
        disp(l.first_handler)?,
        disp(l.first_user_data)?,
        disp(l.first_record)?,
        disp(l.first_tag)?,
        disp(l.first_clobbers)?,
    );
    let state = disp(l.consumer_state)?;
    let slow = (Clobbers::VECTOR.0 | Clobbers::OPMASK.0 | Clobbers::X87.0) as i32;
    let mut a = VecAssembler::<X64Relocation>::new(at);

    // ---- entry: the flags and what a call may change ------------------------
    // The stub's `call` pushed ret_point; everything below it, down to the
    // frame's start, is the trampoline's (the stub stepped over the red
    // zone). rsp = the registers (`FastFrame::regs`, `Regs` layout), of
    // which the ABI's caller-saved ones are stored; rdi = the record, rdx =
    // the site, esi = the record's classes.
    dynasm!(a
        ; .arch x64
        ; pushfq                             // regs.rflags
        ; lea rsp, [rsp - RFLAGS]            // regs.rip and the rest
        ; mov [rsp], rax
        ; mov [rsp + RCX], rcx
        ; mov [rsp + 0x18], rdx
        ; mov [rsp + 0x20], rsi
        ; mov [rsp + 0x28], rdi
        ; mov [rsp + 0x40], r8
        ; mov [rsp + 0x48], r9
        ; mov [rsp + 0x50], r10
        ; mov [rsp + 0x58], r11
        // DF: clear at calls (the ABI), restored with the flags. A whole
        // reload of what `pushfq` stored (a narrower load at an offset into
        // a store in flight is not forwarded: it would wait for the store).
        ; mov rax, [rsp + RFLAGS]
        ; test eax, 0x400
        ; jz >no_df
        ; cld
        ; no_df:
        ; mov rcx, [rsp + RET_POINT]
        ; mov rdi, [rcx - STUB_RECORD_BELOW_RET]
        ; mov rdx, [rcx - STUB_SITE_BELOW_RET]
        // The classes to save: the record's, read before its list (x86
        // keeps loads in order; the writer widens them before it publishes
        // a list that needs more, see `writer::publish_list`). None, not
        // even the frame: the lean case.
        ; mov esi, [rdi + p_clobbers]
        ; test esi, esi
        ; jnz ->full
    );

    // ---- the lean case ---------------------------------------------------------
    // The inline case for a consumer whose handler needs nothing saved and
    // never sees the frame (`Clobbers::FRAME` clear): only the registers a
    // call may change are saved, and restored; the callee-saved ones are
    // the handler's to keep. It uses only caller-saved registers until the
    // call, and keeps what it needs after it on the stack: r8 = slot, r9 =
    // its hit cache, r10 = list, r11 = the hit-cache entry. Anything it does
    // not serve goes to the full case (`->full`) with rsp, rdi, rdx and esi
    // as at entry and every callee-saved register untouched; a handler that
    // returns `Remove` completes the frame and goes on as the full case's
    // inline case does (`->inline_after`).
    emit_home(&mut a, l, R8, R9, R10)?;
    dynasm!(a
        ; .arch x64
        ; cmp [r8 + owner], rax
        ; jne ->full
        ; mov rcx, [r8 + seq]
        ; test cl, 1
        ; jnz ->full
        ; inc rcx
        ; mov [r8 + seq], rcx
        ; mov r10, [rdi + p_list]
        ; cmp [rdi + p_addr], rdx
        ; jne >lean_leave
        ; test r10, r10
        ; jz >lean_leave
        ; cmp QWORD [r10 + inline], 0
        ; je >lean_leave
        ; cmp DWORD [r10 + e_clobbers], 0
        ; jne >lean_leave
        ; mov rax, [r10 + record]
        ; cmp DWORD [rax + state], l.state_active as i32
        ; jne >lean_leave
        ; mov rax, [r10 + tag]
        ; mov ecx, eax
        ; and ecx, (l.hit_ways - 1) as i32
        ; shl ecx, 4
        ; lea r11, [r9 + rcx]
        ; cmp [r11], rax
        ; jne >lean_evict
        ; lean_counted:
        // Counted before the call (no other hit on this thread can use the
        // entry meanwhile: it would be nested).
        ; inc QWORD [r11 + 8]
        // The Hit, and what the rest needs, on a 16-aligned area below the
        // registers: [Hit: 40 bytes][registers][slot][list].
        ; mov rax, [rdi + p_report]
        ; mov rcx, rsp
        ; lea rsp, [rsp - LEAN_AREA]
        ; and rsp, -16
        ; mov [rsp + LEAN_REGS], rcx
        ; mov [rsp + LEAN_SLOT], r8
        ; mov [rsp + LEAN_LIST], r10
        ; mov [rsp], rax
        ; mov [rsp + 8], rcx
        ; mov rax, [r10 + user_data]
        ; mov [rsp + 16], rax
        ; mov QWORD [rsp + 24], 0
        ; mov QWORD [rsp + 32], 0
        ; mov rdi, rsp
        ; call QWORD [r10 + handler]
        ; mov r8, [rsp + LEAN_SLOT]
        ; cmp eax, 1
        ; je >lean_remove
        ; mov rcx, [r8 + seq]
        ; inc rcx
        ; mov [r8 + seq], rcx
        ; mov rsp, [rsp + LEAN_REGS]
        // Restore and leave: rsp is the registers until the final `lea`, so
        // no signal frame can reach them.
        ; mov eax, [rsp + RFLAGS]
        ; test eax, 0x400
        ; jz >lean_no_std
        ; std
        ; lean_no_std:
        ; mov ecx, eax
        ; shl eax, 8
        ; and ecx, 0x800
        ; shl ecx, 20
        ; add ecx, ecx
        ; sahf
        ; mov rdx, [rsp + 0x18]
        ; mov rsi, [rsp + 0x20]
        ; mov rdi, [rsp + 0x28]
        ; mov r8, [rsp + 0x40]
        ; mov r9, [rsp + 0x48]
        ; mov r10, [rsp + 0x50]
        ; mov r11, [rsp + 0x58]
        ; mov rax, [rsp]
        ; mov rcx, [rsp + RCX]
        ; lea rsp, [rsp + RET_POINT]
        ; ret EXIT_POP as i16
        // Checks failed inside the section: leave it, then the full case.
        ; lean_leave:
        ; mov rcx, [r8 + seq]
        ; inc rcx
        ; mov [r8 + seq], rcx
        ; jmp ->full
        // As the full case's `evict`, with these registers (rdx, the site,
        // is no longer needed).
        ; lean_evict:
    );
    emit_evict(&mut a, l, R11, RSI)?;
    dynasm!(a
        ; .arch x64
        ; jmp <lean_counted
        // `Remove`: the full frame from here (the callee-saved registers are
        // still the probed code's), with the full case's registers, into its
        // `after` (eax, the action, goes with it).
        ; lean_remove:
        ; mov rcx, [rsp + LEAN_REGS]
        ; mov [rcx + 0x08], rbx
        ; mov [rcx + 0x30], rbp
        ; mov [rcx + 0x60], r12
        ; mov [rcx + 0x68], r13
        ; mov [rcx + 0x70], r14
        ; mov [rcx + R15], r15
        ; mov r15, rcx
        ; lea rdx, [r15 + ENTRY_SP]
        ; mov [r15 + RSP], rdx
        ; mov r12, r8
        ; mov r14, [rsp + LEAN_LIST]
        ; mov rdx, [rsp]
        ; xor r13d, r13d
        // The frame's Hit lies below the lean area: rsp goes below it
        // before it is written (memory below rsp is any signal frame's).
        ; lea rsp, [r15 + FRAME_FROM_REGS]
        ; and rsp, -16
        ; mov [r15 + RIP], rdx
        ; mov [r15 + HIT], rdx
        ; jmp ->inline_after
    );

    // ---- the full case: every register in the frame ----------------------------
    // Registers from here: r15 = the registers, r13 = the record, rbx = the
    // site, esi = the classes saved.
    dynasm!(a
        ; .arch x64
        ; ->full:
        ; mov [rsp + 0x08], rbx
        ; mov [rsp + 0x30], rbp
        ; mov [rsp + 0x60], r12
        ; mov [rsp + 0x68], r13
        ; mov [rsp + 0x70], r14
        ; mov [rsp + R15], r15
        ; mov r15, rsp
        ; lea rax, [r15 + ENTRY_SP]
        ; mov [r15 + RSP], rax
        ; lea rsp, [r15 + FRAME_FROM_REGS]
        ; and rsp, -16
        ; mov r13, rdi
        ; mov rbx, rdx
        ; test esi, esi
        ; jnz ->save_state
        ; ->state_saved:
    );

    // ---- the inline case ---------------------------------------------------
    // r12 = slot, rdi = its hit cache, r14 = list, then rbx = the hit-cache
    // entry; esi = the classes saved (kept in r13d across the call). rbp
    // stays the interrupted code's, for handlers that walk frame pointers.
    // `grace::enter`, fast path: the home slot is ours and not in a
    // section.
    emit_home(&mut a, l, R12, RDI, RDX)?;
    dynasm!(a
        ; .arch x64
        ; cmp [r12 + owner], rax
        ; jne ->general
        ; mov rcx, [r12 + seq]
        ; test cl, 1
        ; jnz ->general
        ; inc rcx
        ; mov [r12 + seq], rcx
        // The record is still the site's, with a list the inline case may
        // dispatch, whose one consumer's classes were saved, attached, and
        // owning its way of the hit cache.
        ; mov r14, [r13 + p_list]
        ; cmp [r13 + p_addr], rbx
        ; jne >leave_general
        ; test r14, r14
        ; jz >leave_general
        ; cmp QWORD [r14 + inline], 0
        ; je >leave_general
        ; mov eax, [r14 + e_clobbers]
        ; mov ecx, esi
        ; not ecx
        ; test eax, ecx
        ; jnz >leave_general
        ; mov rax, [r14 + record]
        ; cmp DWORD [rax + state], l.state_active as i32
        ; jne >leave_general
        // rbx held the site for the general path until here: from now on
        // the hit is the inline case's (a way held by another consumer is
        // taken over below, at `evict`).
        ; mov rax, [r14 + tag]
        ; mov ecx, eax
        ; and ecx, (l.hit_ways - 1) as i32
        ; shl ecx, 4
        ; lea rbx, [rdi + rcx]
        ; cmp [rbx], rax
        ; jne >evict
        ; counted:
        // The call: regs.rip = the probed address; the Hit in the frame.
        ; mov rax, [r13 + p_report]
        ; mov r13d, esi
        ; mov [r15 + RIP], rax
        ; mov [r15 + HIT], rax
        ; mov [r15 + HIT + 8], r15
        ; mov rax, [r14 + user_data]
        ; mov [r15 + HIT + 16], rax
        ; mov QWORD [r15 + HIT + 24], 0
        ; mov QWORD [r15 + HIT + 32], 0
        ; lea rdi, [r15 + HIT]
        ; call QWORD [r14 + handler]
        ; inc QWORD [rbx + 8]
        // `Remove`, or RIP or RSP moved: the Rust side, still in the
        // section (eax, the handler's action, goes with it).
        ; xor r8d, r8d
        ; cmp eax, 1
        ; je >after
        ; mov rcx, [r15 + HIT]
        ; cmp [r15 + RIP], rcx
        ; jne >after
        ; lea rcx, [r15 + ENTRY_SP]
        ; cmp [r15 + RSP], rcx
        ; jne >after
        ; leave:
        ; mov rcx, [r12 + seq]
        ; inc rcx
        ; mov [r12 + seq], rcx
        ; mov esi, r13d
        ; jmp ->restore
        ; after:
        ; ->inline_after:
        ; test r13d, Clobbers::SSE.0 as i32
        ; jnz >after_sse
        // The Rust side may use the SSE registers (the compiler's own use):
        // saved now if the handler's classes did not ask for them (the
        // handler left them as the probed code had them).
        ; call ->save_sse
        ; or r13d, Clobbers::SSE.0 as i32
        ; after_sse:
        ; lea rdi, [r15 + FRAME_FROM_REGS]
        ; mov esi, eax
        ; mov rdx, [r14 + record]
        ; mov rcx, [r15 + HIT]
        ; mov rax, QWORD l.after as i64
        ; call rax
        ; mov r8d, eax
        ; jmp <leave
        // The way holds another consumer (or none): `replace_hit_entry` —
        // its tag cleared first, its count flushed into its record (the
        // record index is the tag's low word minus one), then this
        // consumer's tag with a count of 0 (the call above adds the hit).
        ; evict:
    );
    emit_evict(&mut a, l, RBX, R8)?;
    dynasm!(a
        ; .arch x64
        ; jmp <counted
        // Anything else: leave the section, and run the general dispatcher.
        ; leave_general:
        ; mov rcx, [r12 + seq]
        ; inc rcx
        ; mov [r12 + seq], rcx
        ; ->general:
        ; test esi, Clobbers::SSE.0 as i32
        ; jnz >general_sse
        // The general dispatcher is Rust: the compiler may use the SSE
        // registers there, whatever the consumers' classes.
        ; call ->save_sse
        ; or esi, Clobbers::SSE.0 as i32
        ; general_sse:
        // The general dispatcher is given the whole frame.
        ; or esi, Clobbers::FRAME.0 as i32
        ; mov r12d, esi
        ; mov rdi, r13
        ; mov rsi, rbx
        ; lea rdx, [r15 + FRAME_FROM_REGS]
        ; mov ecx, r12d
        ; mov rax, QWORD l.dispatch as i64
        ; call rax
        ; mov r8d, eax
        ; mov esi, r12d
        ; ->restore:
        ; test esi, esi
        ; jnz ->restore_state
        ; ->state_restored:
        ; test r8d, r8d
        ; jnz ->redirected
    );

    // ---- restore and leave ---------------------------------------------------
    // Twice: to where the call came from, and to where a handler redirected
    // the thread (`FastFrame::retarget`). rax, rcx and r15 last: the flags
    // need rax and rcx, and r15 is the frame. Once rsp is the exit slot, the
    // frame lies below it: only the 128 bytes under it are safe from a
    // signal frame, so r15 comes from there (`FRAME_REG_BELOW_EXIT`:
    // regs.r15 itself for the normal exit, a copy `retarget` made for a
    // redirect).
    for redirected in [false, true] {
        if redirected {
            dynasm!(a ; .arch x64 ; ->redirected:);
        }
        for i in (1..15i32).filter(|&i| i != 2 && i != 7) {
            dynasm!(a ; .arch x64 ; mov Rq(GPR[i as usize]), [r15 + 8 * i]);
        }
        dynasm!(a
            ; .arch x64
            // RFLAGS without `popfq` (microcoded, tens of cycles), and with
            // only full-register writes (no partial-register merge before
            // `sahf`): DF by hand (the dispatcher returned with it clear);
            // OF from an `add` that overflows exactly when it was set; then
            // SF ZF AF PF CF from AH with `sahf`, which leaves OF alone. The
            // system flags (IF, TF, AC...) are not the handler's to change.
            ; mov eax, [r15 + RFLAGS]
            ; test eax, 0x400
            ; jz >no_std
            ; std
            ; no_std:
            ; mov ecx, eax
            ; shl eax, 8
            ; and ecx, 0x800
            ; shl ecx, 20
            ; add ecx, ecx
            ; sahf
            ; mov rax, [r15]
            ; mov rcx, [r15 + RCX]
        );
        if redirected {
            dynasm!(a ; .arch x64 ; mov rsp, [r15 + EXIT]);
        } else {
            dynasm!(a ; .arch x64 ; lea rsp, [r15 + RET_POINT]);
        }
        dynasm!(a
            ; .arch x64
            ; mov r15, [rsp - FRAME_REG_BELOW_EXIT]
            ; ret EXIT_POP as i16
        );
    }

    // ---- slow path: save the classes the probe's handlers may change --------
    // esi = the classes; r15 = the registers; rsp = the frame, 16-aligned.
    dynasm!(a
        ; .arch x64
        ; ->save_state:
        ; test esi, Clobbers::ERRNO.0 as i32
        ; jz >no_errno
        ; fs mov eax, [l.errno_offset]
        ; mov [r15 + ERRNO], eax
        ; no_errno:
        ; test esi, Clobbers::SSE.0 as i32
        ; jz >no_sse
        ; call ->save_sse
        ; no_sse:
        ; test esi, slow
        ; jz ->state_saved
        ; sub rsp, EXT_SIZE
        ; and rsp, -64
    );
    if cpu.xinuse {
        dynasm!(a ; .arch x64 ; mov ecx, 1);
        a.extend(enc(Instruction::with(Code::Xgetbv))?);
    } else {
        // Without XINUSE, everything enabled counts as in use.
        dynasm!(a ; .arch x64 ; mov eax, -1);
    }
    dynasm!(a
        ; .arch x64
        ; mov [r15 + XINUSE], eax
        ; test esi, Clobbers::VECTOR.0 as i32
        ; jz >no_vec
    );
    if cpu.avx512 {
        dynasm!(a ; .arch x64 ; test eax, XI_ZMM_HI256 as i32 ; jz >no_z);
        for i in 0..16u32 {
            a.extend(zmm_store(Register::ZMM0, i, EXT_ZMM)?);
        }
        dynasm!(a ; .arch x64 ; jmp >hi16 ; no_z:);
    }
    if cpu.avx {
        dynasm!(a ; .arch x64 ; test eax, XI_AVX as i32 ; jz >hi16);
        for i in 0..16u32 {
            a.extend(enc(Instruction::with2(
                Code::VEX_Vmovdqa_ymmm256_ymm,
                mem(Register::RSP, EXT_ZMM + 64 * i as i32),
                reg(Register::YMM0, i),
            )
            .map_err(iced)?)?);
        }
    }
    dynasm!(a ; .arch x64 ; hi16:);
    if cpu.avx512 {
        dynasm!(a ; .arch x64 ; test eax, XI_HI16_ZMM as i32 ; jz >no_vec);
        for i in 0..16u32 {
            a.extend(zmm_store(Register::ZMM16, i, EXT_HI16)?);
        }
    }
    dynasm!(a ; .arch x64 ; no_vec:);
    if cpu.avx512 {
        dynasm!(a
            ; .arch x64
            ; test esi, Clobbers::OPMASK.0 as i32
            ; jz >no_k
            ; test eax, XI_OPMASK as i32
            ; jz >no_k
        );
        for i in 0..8u32 {
            a.extend(enc(Instruction::with2(
                Code::VEX_Kmovq_m64_kr,
                mem(Register::RSP, EXT_K + 8 * i as i32),
                reg(Register::K0, i),
            )
            .map_err(iced)?)?);
        }
        dynasm!(a ; .arch x64 ; no_k:);
    }
    dynasm!(a
        ; .arch x64
        ; test esi, Clobbers::X87.0 as i32
        ; jz ->state_saved
        ; test eax, XI_X87 as i32
        ; jz ->state_saved
    );
    a.extend(enc(Instruction::with1(
        Code::Fxsave64_m512byte,
        mem(Register::RSP, EXT_FX),
    )
    .map_err(iced)?)?);
    // A handler may assume an empty x87 stack (the ABI): give it one.
    dynasm!(a
        ; .arch x64
        ; cmp BYTE [rsp + EXT_FX + 4], 0
        ; je ->state_saved
    );
    a.extend(enc(Instruction::with(Code::Fninit))?);
    dynasm!(a ; .arch x64 ; jmp ->state_saved);

    // ---- slow path: restore ---------------------------------------------------
    // esi = the classes saved; rsp = the frame (the area below it if used);
    // r8d = the exit to take, kept.
    dynasm!(a
        ; .arch x64
        ; ->restore_state:
        ; test esi, slow
        ; jz >sse_back
        ; mov ecx, [r15 + XINUSE]
        ; test esi, Clobbers::VECTOR.0 as i32
        ; jz >vec_back
    );
    if cpu.avx {
        // What was in its initial state goes back to it; what was in use
        // comes back from the area.
        dynasm!(a ; .arch x64 ; test ecx, (XI_AVX | XI_ZMM_HI256) as i32 ; jnz >some_upper);
        a.extend(enc(Instruction::with(Code::VEX_Vzeroupper))?);
        dynasm!(a ; .arch x64 ; some_upper:);
    }
    if cpu.avx512 {
        dynasm!(a ; .arch x64 ; test ecx, XI_ZMM_HI256 as i32 ; jz >no_zb);
        for i in 0..16u32 {
            a.extend(zmm_load(Register::ZMM0, i, EXT_ZMM)?);
        }
        dynasm!(a ; .arch x64 ; jmp >hi16b ; no_zb:);
    }
    if cpu.avx {
        dynasm!(a ; .arch x64 ; test ecx, XI_AVX as i32 ; jz >hi16b);
        for i in 0..16u32 {
            // A VEX.256 load zeroes bits 511:256: ZMM_Hi256 was initial.
            a.extend(enc(Instruction::with2(
                Code::VEX_Vmovdqa_ymm_ymmm256,
                reg(Register::YMM0, i),
                mem(Register::RSP, EXT_ZMM + 64 * i as i32),
            )
            .map_err(iced)?)?);
        }
    }
    dynasm!(a ; .arch x64 ; hi16b:);
    if cpu.avx512 {
        dynasm!(a ; .arch x64 ; test ecx, XI_HI16_ZMM as i32 ; jz >hi16_zero);
        for i in 0..16u32 {
            a.extend(zmm_load(Register::ZMM16, i, EXT_HI16)?);
        }
        dynasm!(a ; .arch x64 ; jmp >vec_back ; hi16_zero:);
        for i in 0..16u32 {
            let z = reg(Register::ZMM16, i);
            a.extend(enc(Instruction::with3(
                Code::EVEX_Vpxord_zmm_k1z_zmm_zmmm512b32,
                z,
                z,
                z,
            )
            .map_err(iced)?)?);
        }
    }
    dynasm!(a ; .arch x64 ; vec_back:);
    if cpu.avx512 {
        dynasm!(a
            ; .arch x64
            ; test esi, Clobbers::OPMASK.0 as i32
            ; jz >k_back
            ; test ecx, XI_OPMASK as i32
            ; jz >k_zero
        );
        for i in 0..8u32 {
            a.extend(enc(Instruction::with2(
                Code::VEX_Kmovq_kr_km64,
                reg(Register::K0, i),
                mem(Register::RSP, EXT_K + 8 * i as i32),
            )
            .map_err(iced)?)?);
        }
        dynasm!(a ; .arch x64 ; jmp >k_back ; k_zero:);
        for i in 0..8u32 {
            let k = reg(Register::K0, i);
            a.extend(enc(
                Instruction::with3(Code::VEX_Kxorq_kr_kr_kr, k, k, k).map_err(iced)?
            )?);
        }
        dynasm!(a ; .arch x64 ; k_back:);
    }
    dynasm!(a
        ; .arch x64
        ; test esi, Clobbers::X87.0 as i32
        ; jz >x87_back
        ; test ecx, XI_X87 as i32
        ; jz >x87_was_init
    );
    a.extend(enc(Instruction::with1(
        Code::Fxrstor64_m512byte,
        mem(Register::RSP, EXT_FX),
    )
    .map_err(iced)?)?);
    dynasm!(a
        ; .arch x64
        ; jmp >x87_back
        ; x87_was_init:
    );
    // The handler may have used the x87 stack the probed code did not: if it
    // is in use now, put it back in its initial state (an XRSTOR of x87 from
    // an all-zero area initialises it; `fninit` would leave register
    // contents an `fxsave` could see).
    if cpu.xinuse {
        dynasm!(a ; .arch x64 ; mov ecx, 1);
        a.extend(enc(Instruction::with(Code::Xgetbv))?);
        dynasm!(a ; .arch x64 ; test eax, XI_X87 as i32 ; jz >x87_back);
    }
    dynasm!(a
        ; .arch x64
        ; mov eax, XI_X87 as i32
        ; xor edx, edx
        ; mov rcx, QWORD std::ptr::addr_of!(XSAVE_INIT) as i64
    );
    a.extend(enc(Instruction::with1(
        Code::Xrstor64_mem,
        MemoryOperand::with_base(Register::RCX),
    )
    .map_err(iced)?)?);
    dynasm!(a
        ; .arch x64
        ; x87_back:
        ; lea rsp, [r15 + FRAME_FROM_REGS]
        ; and rsp, -16
        ; sse_back:
        ; test esi, Clobbers::SSE.0 as i32
        ; jz >sse_done
    );
    for i in 0..16u8 {
        dynasm!(a ; .arch x64 ; movdqu Rx(i), [r15 + XMM + 16 * i32::from(i)]);
    }
    a.extend(enc(Instruction::with1(
        Code::Ldmxcsr_m32,
        mem(Register::R15, MXCSR),
    )
    .map_err(iced)?)?);
    dynasm!(a
        ; .arch x64
        ; sse_done:
        ; test esi, Clobbers::ERRNO.0 as i32
        ; jz ->state_restored
        ; mov eax, [r15 + ERRNO]
        ; fs mov [l.errno_offset], eax
        ; jmp ->state_restored
    );

    // ---- xmm0–15 and MXCSR into the frame (a subroutine: three callers) --
    dynasm!(a ; .arch x64 ; ->save_sse:);
    for i in 0..16u8 {
        dynasm!(a ; .arch x64 ; movdqu [r15 + XMM + 16 * i32::from(i)], Rx(i));
    }
    a.extend(enc(Instruction::with1(
        Code::Stmxcsr_m32,
        mem(Register::R15, MXCSR),
    )
    .map_err(iced)?)?);
    dynasm!(a ; .arch x64 ; ret);

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

/// Hardware numbers of the registers [`emit_home`] and [`emit_evict`] are
/// given.
const RDX: u8 = 2;
const RBX: u8 = 3;
const RSI: u8 = 6;
const RDI: u8 = 7;
const R8: u8 = 8;
const R9: u8 = 9;
const R10: u8 = 10;
const R11: u8 = 11;
const R12: u8 = 12;

/// The inline cases' home slot (`grace::home`): rax = the thread pointer,
/// `slot` = its home slot, `hits` = that slot's hit cache; uses rcx and
/// `tmp`.
// dynasm's dynamic registers (`Rq(n)`) expand to an `.into()` of the number.
#[allow(clippy::useless_conversion)]
fn emit_home(
    a: &mut VecAssembler<X64Relocation>,
    l: &InlineLayout,
    slot: u8,
    hits: u8,
    tmp: u8,
) -> Result<()> {
    dynasm!(a
        ; .arch x64
        ; fs mov rax, [0]
        ; mov rcx, QWORD l.home_mul as i64
        ; imul rcx, rax
        ; shr rcx, l.home_shift as i8
        ; mov Rq(hits), rcx
        ; shl Rq(hits), l.hits_size.trailing_zeros() as i8
        ; mov Rq(tmp), QWORD l.hits_table as i64
        ; add Rq(hits), Rq(tmp)
    );
    if l.slot_size.is_power_of_two() {
        dynasm!(a ; .arch x64 ; shl rcx, l.slot_size.trailing_zeros() as i8);
    } else {
        dynasm!(a ; .arch x64 ; imul rcx, rcx, disp(l.slot_size)?);
    }
    dynasm!(a
        ; .arch x64
        ; mov Rq(slot), QWORD l.table as i64
        ; add Rq(slot), rcx
    );
    Ok(())
}

/// The inline cases' `replace_hit_entry`: the way at `entry` holds another
/// consumer (or none), and rax this consumer's tag. The way's tag is
/// cleared first, its count (loaded into `count`) flushed into its record
/// (the record index is the tag's low word minus one), then it gets this
/// consumer's tag with a count of 0. Also uses rcx and rdx.
// dynasm's dynamic registers (`Rq(n)`) expand to an `.into()` of the number.
#[allow(clippy::useless_conversion)]
fn emit_evict(
    a: &mut VecAssembler<X64Relocation>,
    l: &InlineLayout,
    entry: u8,
    count: u8,
) -> Result<()> {
    let c_hits = disp(l.consumer_hits)?;
    dynasm!(a
        ; .arch x64
        ; mov rdx, [Rq(entry)]
        ; mov Rq(count), [Rq(entry) + 8]
        ; mov QWORD [Rq(entry)], 0
        ; test Rq(count), Rq(count)
        ; jz >fresh
        ; mov ecx, edx
        ; sub rcx, 1
        ; cmp rcx, disp(l.consumers_cap)?
        ; jae >fresh
        ; imul rcx, rcx, disp(l.consumer_size)?
        ; mov rdx, QWORD l.consumers_base as i64
        ; mov rdx, [rdx]
        ; test rdx, rdx
        ; jz >fresh
        ; lock add [rdx + rcx + c_hits], Rq(count)
        ; fresh:
        ; mov QWORD [Rq(entry) + 8], 0
        ; mov [Rq(entry)], rax
    );
    Ok(())
}

fn iced(e: iced_x86::IcedError) -> Error {
    Error::Internal(format!("encoding the fast trampoline: {e}").into())
}

/// `vmovdqa64 [rsp + area + 64 i], zmm(base + i)`.
fn zmm_store(base: Register, i: u32, area: i32) -> Result<Vec<u8>> {
    enc(Instruction::with2(
        Code::EVEX_Vmovdqa64_zmmm512_k1z_zmm,
        mem(Register::RSP, area + 64 * i as i32),
        reg(base, i),
    )
    .map_err(iced)?)
}

/// `vmovdqa64 zmm(base + i), [rsp + area + 64 i]`.
fn zmm_load(base: Register, i: u32, area: i32) -> Result<Vec<u8>> {
    enc(Instruction::with2(
        Code::EVEX_Vmovdqa64_zmm_k1z_zmmm512,
        reg(base, i),
        mem(Register::RSP, area + 64 * i as i32),
    )
    .map_err(iced)?)
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

/// A stub's first [`STUB_PROLOGUE`] bytes, for the slot at `slot` of the
/// site `site` (its patch address) and probe record `record`: the data
/// words, then `lea rsp, [rsp - 128]; call trampoline`.
pub(super) fn stub_prologue(
    slot: usize,
    trampoline: usize,
    record: usize,
    site: usize,
) -> Result<Vec<u8>> {
    let mut b = Vec::with_capacity(STUB_PROLOGUE + 32);
    b.extend_from_slice(&(record as u64).to_le_bytes());
    b.extend_from_slice(&(site as u64).to_le_bytes());
    b.extend_from_slice(&[0x48, 0x8D, 0xA4, 0x24, 0x80, 0xFF, 0xFF, 0xFF, 0xE8]);
    b.extend_from_slice(&rel32(site, slot + b.len() + 4, trampoline)?);
    debug_assert_eq!(b.len(), STUB_PROLOGUE);
    Ok(b)
}

/// Where a site jumps, in its stub at `slot`.
pub fn stub_entry(slot: usize) -> usize {
    slot + STUB_DATA
}

/// Where the trap path resumes, in the stub at `slot`: its displaced
/// instructions.
pub fn stub_resume(slot: usize) -> usize {
    slot + STUB_PROLOGUE
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn layout() -> InlineLayout {
        InlineLayout {
            table: 0x5555_0001_0000,
            slot_size: 256,
            slot_owner: 0,
            slot_seq: 8,
            hits_table: 0x5555_0002_0000,
            hits_size: 16 << 10,
            hit_ways: 1024,
            home_mul: 0x9E37_79B9_7F4A_7C15,
            home_shift: 55,
            probe_addr: 0,
            probe_report: 8,
            probe_consumers: 0x30,
            probe_clobbers: 0x38,
            list_inline: 8,
            first_handler: 16,
            first_user_data: 24,
            first_record: 32,
            first_tag: 40,
            first_clobbers: 48,
            consumer_state: 0,
            state_active: 1,
            consumers_base: 0x1000,
            consumers_cap: 1 << 20,
            consumer_size: 64,
            consumer_hits: 8,
            errno_offset: -128,
            dispatch: 0x5555_0000_1234,
            after: 0x5555_0000_5678,
        }
    }

    #[test]
    fn trampoline_fits_for_every_cpu_state() {
        for avx in [false, true] {
            for avx512 in [false, true] {
                for xinuse in [false, true] {
                    let cpu = CpuState {
                        avx: avx || avx512,
                        avx512,
                        xinuse,
                    };
                    let t = emit_trampoline(0x7000_0000, &layout(), cpu).unwrap();
                    assert!(t.len() <= TRAMPOLINE_SIZE, "{} bytes", t.len());
                    assert_eq!(t[0], 0x9C, "pushfq first: flags before any arithmetic");
                }
            }
        }
        assert!(XSAVE_INIT.0.iter().all(|&b| b == 0));
        assert_eq!(std::ptr::addr_of!(XSAVE_INIT) as usize % 64, 0);
    }

    #[test]
    fn the_exits_restore_r15_from_the_red_zone_then_ret_128() {
        let t = emit_trampoline(0x7000_0000, &layout(), CpuState::detect()).unwrap();
        // lea rsp, [r15 + 0x90]; mov r15, [rsp - 0x18]; ret 128 (dynasm
        // encodes both displacements in 32 bits)
        let normal = [
            0x49, 0x8D, 0xA7, 0x90, 0, 0, 0, 0x4C, 0x8B, 0xBC, 0x24, 0xE8, 0xFF, 0xFF, 0xFF, 0xC2,
            0x80, 0x00,
        ];
        assert!(
            t.windows(normal.len()).any(|w| w == normal),
            "the normal exit"
        );
        // mov rsp, [r15 + EXIT]; mov r15, [rsp - 0x18]; ret 128
        let mut redirected = vec![0x49, 0x8B, 0xA7];
        redirected.extend_from_slice(&EXIT.to_le_bytes());
        redirected.extend_from_slice(&[
            0x4C, 0x8B, 0xBC, 0x24, 0xE8, 0xFF, 0xFF, 0xFF, 0xC2, 0x80, 0x00,
        ]);
        assert!(
            t.windows(redirected.len()).any(|w| w == redirected),
            "the redirected exit"
        );
        assert_eq!(FRAME_REG_BELOW_EXIT, 0x18);
    }

    #[test]
    fn a_redirect_writes_nothing_below_the_stack_pointer_the_trampoline_runs_with() {
        // A frame in the middle of a zeroed buffer that stands for the
        // thread's stack: the trampoline runs with its stack pointer at or
        // below the frame's start, so memory below it belongs to any signal
        // frame, and the frame's registers are read until the exit switches
        // stacks. Whatever stack pointer a handler chose — far below (it
        // lowered RSP by kilobytes), just below, the same, above — the exit
        // slot and the copy of r15 under it lie above the frame, or are the
        // frame's own far slot, and nothing below the frame is written.
        const WORDS: usize = 8192;
        const AT: usize = 4096;
        let mut stack = vec![0u64; WORDS];
        let base = stack.as_mut_ptr() as usize;
        let frame_start = base + AT * 8;
        for delta in (-(16 << 10)..=2048i64).step_by(8) {
            stack.iter_mut().for_each(|w| *w = 0);
            // SAFETY: the frame lies inside the buffer, 8-aligned; a
            // `FastFrame` is plain words, valid when zeroed.
            let frame = unsafe { &mut *(frame_start as *mut FastFrame) };
            let entry = frame.entry_sp() as i64;
            let (probed, other) = (0x40_1000u64, 0x40_2000u64);
            frame.ret_point = 0x50_0000;
            frame.regs.rip = other;
            frame
                .regs
                .set(super::super::Reg::Rsp, (entry + delta) as u64);
            frame.regs.set(super::super::Reg::R15, 0x1515);
            // SAFETY: a test-only token; nothing here runs in a handler.
            frame.retarget(unsafe { SignalContext::new() }, probed as usize);
            let exit = frame.exit as usize;
            let far = std::ptr::addr_of!(frame.far[FAR_SLOT]) as usize;
            let frame_end = frame_start + std::mem::size_of::<FastFrame>();
            assert!(
                exit == far || exit - FRAME_REG_BELOW_EXIT as usize >= frame_end,
                "rsp {delta:+}: exit slot {exit:#x} within or below the frame \
                 [{frame_start:#x}, {frame_end:#x})"
            );
            // SAFETY: `exit` and the copy below it are inside the buffer.
            let (target, r15) = unsafe {
                (
                    *(exit as *const u64),
                    *((exit - FRAME_REG_BELOW_EXIT as usize) as *const u64),
                )
            };
            assert_eq!(r15, 0x1515, "rsp {delta:+}: the copy of r15 the exit reads");
            if exit == far {
                assert_eq!(target, far_exit_address() as u64);
                assert_eq!(frame.far[FAR_SLOT + 2], other);
            } else {
                assert_eq!(target, other, "rsp {delta:+}: the target");
            }
            assert!(
                stack[..AT].iter().all(|&w| w == 0),
                "rsp {delta:+}: a word below the frame was written"
            );
        }
    }

    #[test]
    fn stub_prologue_golden_bytes() {
        let (slot, tramp) = (0x50_0000, 0x4F_F000);
        let b = stub_prologue(slot, tramp, 0x1122_3344_5566, 0x40_1000).unwrap();
        let call_rel = (tramp as i64 - (slot as i64 + STUB_PROLOGUE as i64)) as i32;
        let mut expect = 0x1122_3344_5566u64.to_le_bytes().to_vec();
        expect.extend_from_slice(&0x40_1000u64.to_le_bytes());
        expect.extend_from_slice(&[0x48, 0x8D, 0xA4, 0x24, 0x80, 0xFF, 0xFF, 0xFF, 0xE8]);
        expect.extend_from_slice(&call_rel.to_le_bytes());
        assert_eq!(b, expect);
        assert_eq!(stub_entry(slot), slot + 16);
        assert_eq!(stub_resume(slot), slot + STUB_PROLOGUE);
    }

    #[test]
    fn encoded_slow_path_instructions() {
        // vmovdqa64 [rsp + 0x40], zmm1
        assert_eq!(
            zmm_store(Register::ZMM0, 1, 0).unwrap(),
            [0x62, 0xF1, 0xFD, 0x48, 0x7F, 0x4C, 0x24, 0x01]
        );
        // vmovdqa64 zmm17, [rsp + 0x440]
        assert_eq!(
            zmm_load(Register::ZMM16, 1, EXT_HI16).unwrap(),
            [0x62, 0xE1, 0xFD, 0x48, 0x6F, 0x4C, 0x24, 0x11]
        );
    }
}
