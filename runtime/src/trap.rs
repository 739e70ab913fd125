//! The trap path: the `SIGTRAP` handler.
//!
//! For a trap instruction (`si_code == SI_KERNEL`) at `rip - 1`:
//!
//! 1. enter a read-side section (a nested one if this thread is already in a
//!    handler: the hit is then counted as *missed*);
//! 2. in one validated speculative window, look the probe up and, if there is
//!    none, read the byte at `rip - 1`;
//! 3. a probe: run its consumers with the registers, then resume at the
//!    displaced instruction — emulated here, or run from its out-of-line stub;
//! 4. no probe and the byte is no longer `int3`: the probe was removed between
//!    the trap and the lookup; resume at `rip - 1` (the kernel's
//!    `is_trap_insn` rule);
//! 5. no probe and still `int3`: not ours; chain to the previous handler.
//!
//! The section is left last, after the registers are written back: a grace
//! period therefore also covers a thread that has decided to resume in a stub
//! but not yet returned to it (the thread scan covers it from there on).
//!
//! # Safety
//!
//! The handler dereferences the `siginfo_t` and `ucontext_t` the kernel
//! passes, and reads one code byte at an address the thread just executed.
#![allow(unsafe_code)]

use std::ffi::c_void;

use crate::arch::{self, Displaced, Regs, TRAP_INSN};
use crate::grace;
use crate::map::Index;
use crate::probe::{self, ProbeView, PROBES};
use crate::sigctx::SignalContext;
use crate::sys::signal::{self as sig, Chained};

/// `si_code` of a trap raised by an instruction (`int3`).
const SI_KERNEL: i32 = 0x80;

/// The probe index the trap path reads (address → probe record index).
pub(crate) static INDEX: Index = Index::new();

/// Addresses whose probe was removed recently, for the one ambiguous case of
/// the restart rule (see [`Lookup::Restart`]). Written by the writer before it
/// restores an instruction; read speculatively.
pub(crate) static RECENTLY_REMOVED: [std::sync::atomic::AtomicUsize; 4096] =
    [const { std::sync::atomic::AtomicUsize::new(0) }; 4096];

/// The [`RECENTLY_REMOVED`] slot of an address.
#[inline(always)]
pub(crate) fn recent_slot(addr: usize) -> usize {
    ((addr as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 52) as usize
}

/// What one validated window found at the trap address.
#[derive(Clone, Copy, Debug)]
enum Lookup {
    Probe(ProbeView),
    /// Our `int3` is gone: re-execute the restored instruction.
    Restart,
    /// Not ours: chain.
    Foreign,
}

/// Installs the handler. Normal context, once.
pub(crate) fn install() -> crate::Result<()> {
    sig::install_trap(on_sigtrap)
}

/// The `SIGTRAP` handler.
///
/// # Signal safety
/// It is the signal handler: everything it calls is signal-safe (each has
/// its own `# Signal safety` section), and so must be the consumers. It lives
/// in the `probert_fast` section, with the signal return trampoline, so that
/// thread scans see a thread between its read-side section and its return
/// into an out-of-line stub (see `crate::xol`).
#[link_section = "probert_fast"]
extern "C" fn on_sigtrap(signo: libc::c_int, info: *mut libc::siginfo_t, uc: *mut c_void) {
    // SAFETY: we are the signal handler's entry point.
    let cx = unsafe { SignalContext::new() };
    // SAFETY: the kernel passes valid pointers to a SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    if code != SI_KERNEL || uc.is_null() {
        chain(signo, info, uc, 0);
        return;
    }
    // SAFETY: the kernel's ucontext for this signal, exclusively ours until we
    // return.
    let mc = unsafe { &mut (*uc.cast::<libc::ucontext_t>()).uc_mcontext };
    let addr = (mc.gregs[libc::REG_RIP as usize] as usize).wrapping_sub(1);
    let section = grace::enter(cx);
    match lookup(cx, addr) {
        Lookup::Probe(view) => {
            let mut regs = Regs::from_mcontext(mc);
            regs.rip = addr as u64;
            probe::dispatch(cx, &section, view.consumers, addr, &mut regs);
            if regs.rip == addr as u64 {
                resume_displaced(cx, &view, addr, &mut regs);
            }
            regs.to_mcontext(mc);
            section.exit(cx);
        }
        Lookup::Restart => {
            mc.gregs[libc::REG_RIP as usize] = addr as i64;
            section.exit(cx);
        }
        Lookup::Foreign => {
            section.exit(cx);
            let len = foreign_trap_len(addr);
            chain(signo, info, uc, len);
        }
    }
}

/// Looks the trap address up in one validated window.
///
/// # Signal safety
/// Loads only; see [`Index::read_speculative`].
#[inline]
fn lookup(cx: SignalContext, addr: usize) -> Lookup {
    INDEX.read_speculative(cx, addr, |found| {
        if let Some(view) = found
            .and_then(|idx| PROBES.get(idx))
            .and_then(|rec| rec.view_speculative(cx, addr))
        {
            return Lookup::Probe(view);
        }
        // SAFETY: the thread just executed the byte at `addr + 1`'s
        // predecessor, so its page is mapped; read it once, volatile.
        let byte = unsafe { std::ptr::read_volatile(addr as *const u8) };
        if byte == TRAP_INSN {
            return Lookup::Foreign;
        }
        // The byte is no longer `int3`. That is our removed probe — unless the
        // trap came from a two-byte `int 3` (`cd 03`), whose `03` we would
        // then execute. Tell them apart by our record of recent removals.
        // Ordering: Relaxed — validated by the latch re-check; the writer
        // records the address before restoring the byte.
        let recent = RECENTLY_REMOVED[recent_slot(addr)].load(std::sync::atomic::Ordering::Relaxed);
        // Never read across a page boundary: the page before may be unmapped.
        if recent != addr && byte == 0x03 && addr & 0xFFF != 0 {
            // SAFETY: `addr - 1` is the first byte of the instruction that
            // trapped, if it is `cd 03`; mapped for the same reason.
            if unsafe { std::ptr::read_volatile((addr - 1) as *const u8) } == 0xCD {
                return Lookup::Foreign;
            }
        }
        Lookup::Restart
    })
}

/// Length of the trap instruction that raised a foreign `SI_KERNEL` trap
/// ending at `addr + 1`.
///
/// # Signal safety
/// Two byte reads of code the thread just executed.
fn foreign_trap_len(addr: usize) -> u8 {
    // SAFETY: the thread just executed these bytes.
    let last = unsafe { std::ptr::read_volatile(addr as *const u8) };
    if last == TRAP_INSN {
        1
    } else {
        2
    }
}

/// Resumes at the displaced instruction: emulated here, or run from its stub.
///
/// # Signal safety
/// Register arithmetic and the emulator's loads and stores.
#[inline]
fn resume_displaced(cx: SignalContext, view: &ProbeView, addr: usize, regs: &mut Regs) {
    match view.displaced {
        Displaced::OutOfLine => regs.rip = view.stub as u64,
        d => {
            if !arch::emulate(cx, &d, addr as u64, view.len, regs) {
                fatal(b"probert: an emulated instruction could not be emulated\n");
            }
        }
    }
}

/// Hands a trap that is not ours to the previous disposition.
///
/// # Signal safety
/// See [`sig::chain`].
fn chain(signo: libc::c_int, info: *mut libc::siginfo_t, uc: *mut c_void, trap_len: u8) {
    if let Chained::Rewind(n) = sig::chain(signo, info, uc, trap_len) {
        if !uc.is_null() {
            // SAFETY: as in `on_sigtrap`.
            let mc = unsafe { &mut (*uc.cast::<libc::ucontext_t>()).uc_mcontext };
            mc.gregs[libc::REG_RIP as usize] -= n as i64;
        }
    }
}

/// Reports a broken invariant from signal context and aborts: `write(2)` and
/// `abort`, never formatting.
///
/// # Signal safety
/// `write` and `abort` are async-signal-safe.
pub(crate) fn fatal(msg: &[u8]) -> ! {
    // SAFETY: writing a valid buffer to stderr; abort never returns.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::abort()
    }
}
