//! Register state across a probe, on both paths: the probed code loads
//! known values into one class of state (zmm0–31 and k0–7, the x87 stack
//! and control word, MXCSR, `errno`), passes the site, and writes what it
//! finds back to memory. The handlers call the C library, which may change
//! that class (so the fast path's trampoline must save it: the effects
//! analysis answers "everything" for a call into another module), and
//! change it themselves; a counting handler (which needs nothing saved)
//! must leave it alone too. Every test patches code, so each runs in its
//! own process (`isolated!`).
#![allow(unsafe_code)]
// Test code calls assembly targets, libc and probert's unsafe attach on
// purpose; the safety premise of every such call is the test itself.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use std::arch::global_asm;
use std::hint::black_box;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use common::{count, counter};
use probert::{Handler, Hit, Mode};

global_asm!(
    r#"
    .text
    .macro STFUNC name
    .p2align 4
    .globl \name
    .type \name,@function
\name:
    .endm
    .macro STEND name
    .size \name, .-\name
    .endm
    .macro NOP5
    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00
    .endm

    // st_zmm(values rdi, out rsi): zmm0-31 from rdi[64 * i], k0-7 from
    // rdi[2048 + 8 * i]; after the site, the same layout to rsi.
    STFUNC st_zmm
    .irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    vmovdqu64 zmm\i, zmmword ptr [rdi + 64 * \i]
    .endr
    .irp i, 0,1,2,3,4,5,6,7
    kmovq k\i, qword ptr [rdi + 2048 + 8 * \i]
    .endr
    .globl st_zmm_site
st_zmm_site:
    NOP5
    .irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    vmovdqu64 zmmword ptr [rsi + 64 * \i], zmm\i
    .endr
    .irp i, 0,1,2,3,4,5,6,7
    kmovq qword ptr [rsi + 2048 + 8 * \i], k\i
    .endr
    vzeroupper
    ret
    STEND st_zmm

    // Every bit of zmm0-31 and k0-7 set.
    STFUNC st_dirty_avx512
    .irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    vpternlogd zmm\i, zmm\i, zmm\i, 0xff
    .endr
    .irp i, 0,1,2,3,4,5,6,7
    kxnorq k\i, k\i, k\i
    .endr
    ret
    STEND st_dirty_avx512

    // st_x87(values rdi, out rsi, fcw dx): the control word, then eight
    // 80-bit values (16-byte slots) pushed; FXSAVE before the site (out),
    // after it (out + 0x200), then the stack popped to out + 0x400.
    STFUNC st_x87
    mov word ptr [rsp - 8], dx
    fldcw word ptr [rsp - 8]
    .irp i, 0,1,2,3,4,5,6,7
    fld tbyte ptr [rdi + 16 * \i]
    .endr
    fxsave [rsi]
    .globl st_x87_site
st_x87_site:
    NOP5
    fxsave [rsi + 0x200]
    .irp i, 0,1,2,3,4,5,6,7
    fstp tbyte ptr [rsi + 0x400 + 16 * \i]
    .endr
    mov word ptr [rsp - 8], 0x037f
    fldcw word ptr [rsp - 8]
    ret
    STEND st_x87

    // x87 state a handler leaves behind: three values pushed and another
    // control word (round toward zero, single precision).
    STFUNC st_dirty_x87
    fninit
    fld1
    fldpi
    fldl2t
    mov word ptr [rsp - 8], 0x0c7f
    fldcw word ptr [rsp - 8]
    ret
    STEND st_dirty_x87

    // strtold(rdi, NULL), its long double result popped.
    STFUNC st_strtold
    push rbx
    xor esi, esi
    call strtold@PLT
    fstp st(0)
    pop rbx
    ret
    STEND st_strtold

    // st_mxcsr(out rdi, mxcsr esi, fcw dx): MXCSR, and the x87 control word
    // unless dx is 0 (then no x87 instruction runs before the site); after
    // the site both to out[0] and out[4]; the defaults restored.
    STFUNC st_mxcsr
    mov dword ptr [rsp - 8], esi
    ldmxcsr dword ptr [rsp - 8]
    test dx, dx
    jz 2f
    mov word ptr [rsp - 8], dx
    fldcw word ptr [rsp - 8]
2:
    .globl st_mxcsr_site
st_mxcsr_site:
    NOP5
    stmxcsr dword ptr [rdi]
    fnstcw word ptr [rdi + 4]
    mov dword ptr [rsp - 8], 0x1f80
    ldmxcsr dword ptr [rsp - 8]
    mov word ptr [rsp - 8], 0x037f
    fldcw word ptr [rsp - 8]
    ret
    STEND st_mxcsr

    // errno = 1234 before the site; returns errno after it.
    STFUNC st_errno
    push rbx
    call __errno_location@PLT
    mov rbx, rax
    mov dword ptr [rbx], 1234
    .globl st_errno_site
st_errno_site:
    NOP5
    mov eax, dword ptr [rbx]
    pop rbx
    ret
    STEND st_errno
"#
);

extern "C" {
    fn st_zmm(values: *const u8, out: *mut u8);
    fn st_zmm_site();
    fn st_dirty_avx512();
    fn st_x87(values: *const u8, out: *mut u8, fcw: u16);
    fn st_x87_site();
    fn st_dirty_x87();
    fn st_strtold(s: *const libc::c_char);
    fn st_mxcsr(out: *mut u32, mxcsr: u32, fcw: u16);
    fn st_mxcsr_site();
    fn st_errno() -> i32;
    fn st_errno_site();
}

#[link(name = "m")]
extern "C" {
    fn fesetround(round: libc::c_int) -> libc::c_int;
    fn fegetround() -> libc::c_int;
}

/// `FE_TOWARDZERO` on x86.
const FE_TOWARDZERO: libc::c_int = 0xc00;

/// The address of a target.
macro_rules! at {
    ($f:ident) => {
        $f as *const () as usize
    };
}

/// A 64-byte aligned buffer (FXSAVE wants 16, zmm stores are happier at 64).
#[repr(C, align(64))]
struct Buf<const N: usize>([u8; N]);

impl<const N: usize> Buf<N> {
    fn zeroed() -> Box<Self> {
        Box::new(Buf([0; N]))
    }
}

/// Deterministic noise: every byte of the patterns different from the
/// values a handler leaves.
fn noise(seed: u64, out: &mut [u8]) {
    let mut x = seed | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        for (b, v) in chunk.iter_mut().zip(x.to_le_bytes()) {
            *b = v;
        }
    }
}

static HITS: AtomicU64 = AtomicU64::new(0);

/// Attaches `handler` (counting into [`HITS`]) at `site` in `mode`, runs
/// `check` three times (the first hit of a thread takes the trampoline's
/// general dispatcher, later ones its inline case), and detaches.
fn on_each_path(site: usize, handler: Handler, modes: &[Mode], mut check: impl FnMut(Mode)) {
    for &mode in modes {
        HITS.store(0, Ordering::SeqCst);
        let id = unsafe { probert::attach_ex(site, handler, counter(&HITS), mode) }.unwrap();
        assert_eq!(probert::probe_mode(site), Ok(mode));
        for _ in 0..3 {
            check(mode);
        }
        assert_eq!(HITS.load(Ordering::SeqCst), 3, "{mode:?}");
        probert::detach(id).unwrap();
    }
}

const BOTH: &[Mode] = &[Mode::Fast, Mode::Trap];

/// Calls the C library's string functions on buffers large enough for its
/// vector variants (glibc's EVEX and AVX-512 ones use ymm16–31).
fn libc_strings() {
    let mut a = [0u8; 4096];
    let mut b = [0u8; 4096];
    unsafe {
        libc::memset(a.as_mut_ptr().cast(), 0x5A, black_box(a.len()));
        libc::memcpy(b.as_mut_ptr().cast(), a.as_ptr().cast(), black_box(b.len()));
    }
    black_box(&b);
}

isolated!(zmm_and_opmask_registers_survive_a_handler_calling_libc, {
    if !(std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw"))
    {
        eprintln!("skipped: no AVX-512 (F and BW) on this CPU");
        return;
    }
    unsafe extern "C" fn dirty(hit: *mut Hit) -> u32 {
        libc_strings();
        unsafe {
            st_dirty_avx512();
            count(hit)
        }
    }
    const LEN: usize = 32 * 64 + 8 * 8;
    let mut values = Buf::<LEN>::zeroed();
    noise(0x243F_6A88_85A3_08D3, &mut values.0);
    let check = |mode: Mode| {
        let mut out = Buf::<LEN>::zeroed();
        unsafe { st_zmm(values.0.as_ptr(), out.0.as_mut_ptr()) };
        for i in 0..32 {
            let r = 64 * i..64 * i + 64;
            assert_eq!(out.0[r.clone()], values.0[r], "zmm{i} ({mode:?})");
        }
        for i in 0..8 {
            let r = 2048 + 8 * i..2048 + 8 * i + 8;
            assert_eq!(out.0[r.clone()], values.0[r], "k{i} ({mode:?})");
        }
    };
    on_each_path(at!(st_zmm_site), dirty, BOTH, check);
    on_each_path(at!(st_zmm_site), count, &[Mode::Fast], check);
});

/// What FXSAVE holds of the x87 state that a site must not change: the
/// control, status and (abridged) tag words, and ST0–7.
fn x87_of(fx: &[u8]) -> Vec<u8> {
    let mut v = fx[..5].to_vec();
    for i in 0..8 {
        v.extend_from_slice(&fx[32 + 16 * i..32 + 16 * i + 10]);
    }
    v
}

isolated!(the_x87_stack_survives_a_handler_calling_libc, {
    unsafe extern "C" fn dirty(hit: *mut Hit) -> u32 {
        unsafe {
            st_strtold(c"1.25e3".as_ptr());
            st_dirty_x87();
            count(hit)
        }
    }
    // Eight normal 80-bit values: explicit integer bit, random fraction,
    // exponents around 1.
    let mut values = Buf::<128>::zeroed();
    for i in 0..8 {
        let mut m = [0u8; 8];
        noise(0x1319_8A2E_0370_7344 + i as u64, &mut m);
        let m = u64::from_le_bytes(m) | 1 << 63;
        let slot = &mut values.0[16 * i..16 * i + 10];
        slot[..8].copy_from_slice(&m.to_le_bytes());
        slot[8..].copy_from_slice(&(0x3FFF + i as u16 - 4).to_le_bytes());
    }
    // Round up, 53-bit precision, every exception masked.
    const FCW: u16 = 0x0A7F;
    let check = |mode: Mode| {
        let mut out = Buf::<0x480>::zeroed();
        unsafe { st_x87(values.0.as_ptr(), out.0.as_mut_ptr(), FCW) };
        let (before, after) = (&out.0[..0x200], &out.0[0x200..0x400]);
        assert_eq!(u16::from_le_bytes([before[0], before[1]]), FCW);
        assert_eq!(before[4], 0xFF, "all eight registers in use");
        assert_eq!(x87_of(after), x87_of(before), "x87 state ({mode:?})");
        for i in 0..8 {
            // Popped last-in first.
            let (got, want) = (0x400 + 16 * i, 16 * (7 - i));
            assert_eq!(
                out.0[got..got + 10],
                values.0[want..want + 10],
                "ST{i} ({mode:?})"
            );
        }
    };
    on_each_path(at!(st_x87_site), dirty, BOTH, check);
    on_each_path(at!(st_x87_site), count, &[Mode::Fast], check);
});

/// `fegetround()` as the last handler saw it.
static ROUND_SEEN: AtomicI32 = AtomicI32::new(-1);

isolated!(mxcsr_and_the_x87_control_word_survive_fesetround, {
    unsafe extern "C" fn round(hit: *mut Hit) -> u32 {
        unsafe {
            assert_eq!(fesetround(FE_TOWARDZERO), 0);
            ROUND_SEEN.store(fegetround(), Ordering::SeqCst);
            count(hit)
        }
    }
    // Round up, flush to zero; the x87 control word set to round up too,
    // or left alone (then the x87 state is in its initial configuration,
    // which the fast path puts back rather than saves).
    const MXCSR: u32 = 0x1F80 | 0x4000 | 0x8000;
    for fcw in [0x0B7Fu16, 0] {
        let check = |mode: Mode| {
            let mut out = [0u32; 2];
            unsafe { st_mxcsr(out.as_mut_ptr(), MXCSR, fcw) };
            assert_eq!(out[0], MXCSR, "MXCSR ({mode:?}, fcw {fcw:#x})");
            let want = if fcw == 0 { 0x037F } else { fcw };
            assert_eq!(
                out[1] & 0xFFFF,
                u32::from(want),
                "x87 control word ({mode:?})"
            );
        };
        ROUND_SEEN.store(-1, Ordering::SeqCst);
        on_each_path(at!(st_mxcsr_site), round, BOTH, check);
        assert_eq!(
            ROUND_SEEN.load(Ordering::SeqCst),
            FE_TOWARDZERO,
            "the handler ran"
        );
        on_each_path(at!(st_mxcsr_site), count, &[Mode::Fast], check);
    }
});

/// `errno` as the last handler saw it after its failed `write`.
static ERRNO_SEEN: AtomicI32 = AtomicI32::new(0);

isolated!(errno_survives_a_handler_whose_write_fails, {
    unsafe extern "C" fn fail(hit: *mut Hit) -> u32 {
        unsafe {
            assert_eq!(libc::write(-1, b"x".as_ptr().cast(), 1), -1);
            ERRNO_SEEN.store(*libc::__errno_location(), Ordering::SeqCst);
            count(hit)
        }
    }
    let check = |mode: Mode| {
        assert_eq!(unsafe { st_errno() }, 1234, "errno ({mode:?})");
    };
    on_each_path(at!(st_errno_site), fail, BOTH, check);
    assert_eq!(ERRNO_SEEN.load(Ordering::SeqCst), libc::EBADF);
    on_each_path(at!(st_errno_site), count, &[Mode::Fast], check);
});
