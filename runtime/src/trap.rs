//! The trap path: the `SIGTRAP` handler.
//!
//! For a trap instruction (`si_code` is [`arch::TRAP_SI_CODE`]) at the trapped address
//! ([`TrapContext::trap_address`]):
//!
//! 1. enter a read-side section (a nested one if this thread is already in a
//!    handler: the hit is then counted as *missed*);
//! 2. in one validated speculative window, look the probe up and, if there is
//!    none, read the bytes there ([`arch::classify_trap_site`]);
//! 3. a probe: run its consumers with the registers, then resume at the
//!    displaced instruction — emulated here, or run from its out-of-line stub;
//! 4. no probe and the trap instruction is gone: the probe was removed
//!    between the trap and the lookup; resume at the trapped address (the
//!    kernel's `is_trap_insn` rule);
//! 5. no probe and a trap instruction there: not ours; chain to the previous
//!    disposition, which decides as it would have without probert (see
//!    [`crate::sys::signal`]: an ignored `kill -TRAP` stays ignored, a
//!    foreign `int3` still kills, and probert's handler stays installed).
//!
//! Our handler may also be called by a host's `SIGTRAP` handler that chains
//! to it. The kernel's signal frame then starts with the host's signal
//! return trampoline rather than probert's: before a probe hit sends the
//! thread into a stub, the handler notes that trampoline, so that thread
//! scans recognise the frame while the thread runs the host's handler
//! (`sys::signal`, "Hosts that install a SIGTRAP handler after probert").
//!
//! # Faults in displaced instructions
//!
//! The same module holds the handler of `SIGSEGV`, `SIGBUS`, `SIGFPE` and
//! `SIGILL` ([`on_fault`], installed with the `SIGTRAP` handler and chaining
//! to the dispositions it replaced): a fault in a stub's copy of a displaced
//! instruction is rewound to the original instruction before the host's
//! handler sees it ([`crate::xol::fault_origin`]); a fault in an emulated
//! access is delivered as the instruction's own ([`deliver_fault`]). A
//! host that installs its own fault handler *after* probert's
//! initialisation replaces ours: faults in stubs then reach it with the
//! stub's address (not re-stacked yet).
//!
//! The section is left last, after the registers are written back: a grace
//! period therefore also covers a thread that has decided to resume in a stub
//! but not yet returned to it (the thread scan covers it from there on).
//!
//! # Safety
//!
//! The handler dereferences the `siginfo_t` and `ucontext_t` the kernel
//! passes, and reads code bytes the thread just executed.
#![allow(unsafe_code)]

use std::ffi::c_void;

use crate::arch::{
    self, Access, Clobbers, Displaced, EmuFault, Emulated, Reg, Regs, TrapContext, TrapSite,
    TRAP_INSN,
};
use crate::grace;
use crate::map::Index;
use crate::probe::{self, ProbeView, PROBES};
use crate::sigctx::SignalContext;
use crate::sys::signal as sig;

/// The probe index the trap path reads (address → probe record index).
pub(crate) static INDEX: Index = Index::new();

/// The index value of a *tombstone*: an address whose probe was removed
/// and whose code was restored, kept in the index until a thread scan has
/// shown that no thread can still be on its way from the trap to its lookup
/// (see `writer`). A trap that finds one re-executes the restored
/// instruction; without it, a late trap over an instruction that happens to
/// look like the tail of another trap instruction (`cd 03`) would be taken
/// for someone else's.
pub(crate) const TOMBSTONE: usize = usize::MAX;

/// What one validated window found at the trap address.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Lookup {
    Probe(ProbeView),
    /// Our trap instruction is gone: re-execute the restored instruction.
    Restart,
    /// Not ours: chain (the trap instruction was `len` bytes).
    Foreign {
        len: u8,
    },
}

/// [`arch::errno_offset`], computed in normal context before the handler is
/// installed.
static ERRNO_OFFSET: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Installs the handler. Normal context, once.
pub(crate) fn install() -> crate::Result<()> {
    // Ordering: Relaxed — the handler is installed by a system call after
    // this store (which orders it) — pairs with the load in `on_sigtrap`.
    ERRNO_OFFSET.store(arch::errno_offset(), std::sync::atomic::Ordering::Relaxed);
    // The C library's `sigaction`, resolved in normal context for the
    // interposer (see `sys::masks`).
    crate::sys::masks::resolve();
    sig::install_faults(on_fault)?;
    sig::install_trap(on_sigtrap)
}

/// The address of the `SIGTRAP` handler's entry, where a thread the kernel
/// just delivered a trap to starts (for thread scans).
pub(crate) fn handler_entry() -> usize {
    on_sigtrap as *const () as usize
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
    serve_trap(signo, info, uc, false);
}

/// [`on_sigtrap`]'s body. `exhausted`: the kernel could not push the trap's
/// frame on the thread's stack and forced a `SIGSEGV` onto the alternate
/// stack instead ([`on_fault`]); then an emulated access goes through
/// system calls ([`Access::Careful`]), since the nested signal of a
/// faulting one may not fit on that stack too.
///
/// # Signal safety
/// As [`on_sigtrap`].
#[inline(always)]
fn serve_trap(signo: libc::c_int, info: *mut libc::siginfo_t, uc: *mut c_void, exhausted: bool) {
    // SAFETY: we are (called at once by) the signal handler's entry point.
    let cx = unsafe { SignalContext::new() };
    let access = if exhausted {
        Access::Careful(cx)
    } else {
        Access::Direct
    };
    // SAFETY: the kernel passes valid pointers to a SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    // SAFETY: the kernel's ucontext for this signal, exclusively ours until
    // we return (and not touched through `uc` while `ctx` lives).
    let ctx = unsafe { TrapContext::from_raw(cx, uc) };
    let Some(mut ctx) = ctx.filter(|_| code == arch::TRAP_SI_CODE) else {
        chain(cx, signo, info, uc, 0);
        return;
    };
    if arch::far_exit(cx, &mut ctx) {
        return;
    }
    let addr = ctx.trap_address();
    // The kernel saves and restores every register around this handler;
    // `errno` is the C library's, and a handler may change it.
    let errno_off = ERRNO_OFFSET.load(std::sync::atomic::Ordering::Relaxed);
    let errno = arch::errno_get(errno_off);
    let section = grace::enter(cx);
    match lookup(cx, addr) {
        Lookup::Probe(view) if view.displaced == Displaced::Deferred => {
            // An exit run: its stub calls the consumers, at the `ret`.
            ctx.set_pc(view.stub);
            arch::errno_set(errno_off, errno);
            section.exit(cx);
        }
        Lookup::Probe(view) => {
            let mut regs = ctx.regs();
            // Until the handlers are done, the saved context says the trap
            // instruction, not the byte after it: a thread scan that finds
            // this frame while a multi-instruction site switches must not
            // take it for a thread inside the site's instructions (this one
            // resumes in the stub, or where its handlers send it).
            ctx.set_pc(addr);
            regs.set_pc(view.report);
            probe::dispatch(
                cx,
                &section,
                view.consumers,
                view.report,
                &mut regs,
                Clobbers::ALL,
            );
            let mut fault = None;
            if regs.pc() == view.report {
                fault = resume_displaced(cx, &view, addr, &mut regs, access);
            }
            note_frame_restorer(cx, uc);
            ctx.set_regs(&regs);
            arch::errno_set(errno_off, errno);
            section.exit(cx);
            if let Some(f) = fault {
                // Outside the section: the host's handler may never return
                // (`siglongjmp`).
                deliver_fault(cx, f, uc);
            }
        }
        Lookup::Restart => {
            ctx.set_pc(addr);
            section.exit(cx);
        }
        Lookup::Foreign { len } => {
            section.exit(cx);
            // `ctx` is not used again: `chain` passes `uc` on.
            chain(cx, signo, info, uc, len);
        }
    }
}

/// Looks the trap address up in one validated window.
///
/// # Signal safety
/// Loads only; see [`Index::read_speculative`].
#[inline]
pub(crate) fn lookup(cx: SignalContext, addr: usize) -> Lookup {
    INDEX.read_speculative(cx, addr, |found| {
        if let Some(view) = found
            .filter(|&idx| idx != TOMBSTONE)
            .and_then(|idx| PROBES.get(idx))
            .and_then(|rec| rec.view_speculative(cx, addr))
        {
            return Lookup::Probe(view);
        }
        // The writer puts the tombstone in before it restores the bytes.
        let removed = found == Some(TOMBSTONE);
        let read = |a: usize| {
            // SAFETY: the thread just executed the trap instruction ending
            // here, so these bytes are mapped; one volatile read each.
            unsafe { std::ptr::read_volatile(a as *const u8) }
        };
        match arch::classify_trap_site(cx, addr, removed, read) {
            TrapSite::Armed => Lookup::Foreign {
                len: TRAP_INSN.len() as u8,
            },
            TrapSite::OtherTrap { len } => Lookup::Foreign { len },
            TrapSite::Restored => Lookup::Restart,
        }
    })
}

/// Resumes at the displaced instruction: emulated here, or run from its stub.
/// If the emulated instruction's memory access faulted, `regs` are left as
/// at the instruction, with RIP at it, and the fault is returned for
/// [`deliver_fault`].
///
/// # Signal safety
/// Register arithmetic and the emulator's loads and stores.
#[inline]
fn resume_displaced(
    cx: SignalContext,
    view: &ProbeView,
    addr: usize,
    regs: &mut Regs,
    access: Access,
) -> Option<EmuFault> {
    match view.displaced {
        Displaced::OutOfLine => arch::resume_out_of_line(regs, view.stub),
        d => match arch::emulate(cx, &d, addr as u64, view.len, regs, access) {
            Emulated::Done => {}
            Emulated::Refused => fatal(b"probert: an emulated instruction could not be emulated\n"),
            Emulated::Faulted(f) => {
                regs.set_pc(addr);
                return Some(f);
            }
        },
    }
    None
}

/// Delivers the fault an emulated instruction took to the host's
/// disposition of that signal, as the kernel would have delivered the
/// instruction's own: a `siginfo` with the kernel's signal, code and
/// address, and the context `uc` (already rewound to the instruction).
/// The host's handler runs on this frame: with the mask of the `SIGTRAP`
/// handler rather than its own `sa_mask`, and not on its alternate stack.
///
/// # Signal safety
/// See [`sig::chain_fault`].
#[cold]
fn deliver_fault(_cx: SignalContext, f: EmuFault, uc: *mut c_void) {
    // SAFETY: siginfo_t is plain data; all-zero is valid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    info.si_signo = f.signo;
    info.si_code = f.code;
    // SAFETY: `si_addr` is the first field of the union after the three
    // ints and their padding (16 bytes in), as the kernel lays it out.
    unsafe {
        (&mut info as *mut libc::siginfo_t)
            .cast::<u8>()
            .add(16)
            .cast::<u64>()
            .write_unaligned(f.addr);
    }
    sig::chain_fault(f.signo, &mut info, uc);
}

/// The handler of the signals a displaced instruction can raise
/// ([`sig::FAULT_SIGNALS`]).
///
/// - A `SIGSEGV` the kernel forced because it could not push the frame of a
///   trap at one of our sites (an exhausted stack: a `push` or `call` on a
///   guard page, served on the host's alternate stack): handled as that
///   trap, so the displaced instruction's own fault is what the host sees.
/// - A fault taken by the emulator's own load or store (in the `SIGTRAP`
///   handler, emulating a `push`, `call`, `ret` or `jmp [mem]`): that
///   access returns the fault, and the trap path delivers it
///   ([`deliver_fault`]).
/// - A fault in a stub's instruction that stands for a displaced one
///   (an out-of-line stub, or a fast site's displaced run): the context is
///   rewound to the displaced instruction — RIP at it, the stack pointer
///   as before the stub pushed anything; every other register is already
///   as at that instruction — and the signal goes on to the host's
///   disposition, which sees the fault as if nothing were probed. Resuming
///   at the instruction hits the probe again; resuming past it leaves the
///   stub for good.
/// - Anything else goes on to the host's disposition unchanged.
///
/// # Signal safety
/// It is a signal handler; it calls only signal-safe functions.
#[link_section = "probert_fast"]
extern "C" fn on_fault(signo: libc::c_int, info: *mut libc::siginfo_t, uc: *mut c_void) {
    // SAFETY: we are the signal handler's entry point.
    let cx = unsafe { SignalContext::new() };
    // SAFETY: the kernel's ucontext for this signal, exclusively ours until
    // it is passed on (and not touched through `uc` while `ctx` lives).
    if let Some(mut ctx) = unsafe { TrapContext::from_raw(cx, uc) } {
        if !info.is_null() {
            // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO
            // handler; `si_addr` is meaningful for these signals.
            let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as u64) };
            let f = EmuFault { signo, code, addr };
            if code > 0 && arch::recover_emulator_fault(cx, &mut ctx, f) {
                return;
            }
            if signo == libc::SIGSEGV
                && code == arch::TRAP_SI_CODE
                && addr == 0
                && ctx.raised_by_trap_instruction()
                && INDEX.read_speculative(cx, ctx.trap_address(), |found| found.is_some())
            {
                // The kernel could not push the frame of a trap at one of
                // our sites (the stack is exhausted: a `push` or `call` on a
                // guard page) and forced this instead, on the alternate
                // stack: serve the trap here (an emulated access then faults
                // — found by a system call, not a second signal on this
                // stack — and is delivered as the instruction's own).
                sig::unblock(libc::SIGSEGV);
                // `ctx` is not used again: the trap path takes `uc`.
                serve_trap(libc::SIGTRAP, info, uc, true);
                return;
            }
        }
        if let Some((orig, sp_adj)) = crate::xol::fault_origin(cx, ctx.pc()) {
            let mut regs = ctx.regs();
            regs.set_pc(orig);
            regs.set(Reg::Rsp, (regs.sp() as u64).wrapping_add(sp_adj));
            ctx.set_regs(&regs);
        }
    }
    sig::chain_fault(signo, info, uc);
}

/// Hands a trap that is not ours (raised by a trap instruction of
/// `trap_len` bytes, or 0) to the previous disposition.
///
/// # Signal safety
/// See [`sig::chain`].
fn chain(
    _cx: SignalContext,
    signo: libc::c_int,
    info: *mut libc::siginfo_t,
    uc: *mut c_void,
    trap_len: u8,
) {
    sig::chain(signo, info, uc, trap_len);
}

/// If this signal's frame does not start with probert's signal return
/// trampoline, the kernel delivered it to another handler that called ours:
/// note that trampoline for the thread scans (see the module docs).
///
/// # Signal safety
/// One load from the handler's own frame; see [`sig::note_restorer`].
#[inline]
fn note_frame_restorer(cx: SignalContext, uc: *mut c_void) {
    // SAFETY: `uc` is the third argument of this SA_SIGINFO handler (the
    // kernel's, passed on unchanged by a chaining host).
    let restorer = unsafe { arch::handler_restorer(cx, uc) };
    if restorer != arch::restorer_address() {
        sig::note_restorer(cx, restorer);
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
