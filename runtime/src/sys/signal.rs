//! Installing the `SIGTRAP` handler, and what happens to a `SIGTRAP` that is
//! not probert's.
//!
//! # Foreign traps: exactly what the previous disposition would have done
//!
//! probert's handler replaces whatever disposition `SIGTRAP` had (inherited
//! across `exec`, or set by the host before probert), and must then act, for
//! every `SIGTRAP` that is not one of its probes, exactly as that disposition
//! would have — without ever giving up its own handler while the process
//! lives, or the next probe hit would kill it. [`chain`] tells two kinds of
//! `SIGTRAP` apart, as the kernel does:
//!
//! - *Forced* (`si_code > 0`: a trap instruction — an `int3` that is not
//!   ours —, a single step, a hardware breakpoint): the kernel delivers it
//!   with `force_sig`, which resets an ignored (or blocked) `SIGTRAP` to the
//!   default action. Without probert the process dies, whatever was
//!   inherited.
//! - *Sent* (`si_code <= 0`: `kill`, `raise`, `tgkill`, `sigqueue`): it
//!   honours the disposition. `SIG_IGN` ignores it, `SIG_DFL` kills.
//!
//! So: a previous handler is called (for both kinds; with its
//! `SA_RESETHAND` honoured: it is called once, then the default applies); an
//! ignored sent trap is ignored, with the disposition left alone; and where
//! the default action applies ([`die_by_default`]) probert reinstates
//! `SIG_DFL`, unblocks `SIGTRAP` and sends the same `siginfo` again to the
//! thread, which dies of it on the way back from that system call — in the
//! handler (a core dump shows the trap's context one signal frame up, and
//! the original `siginfo`). A tracer that suppresses that signal (a debugger)
//! lets the system call return: probert then puts its own handler and the
//! signal mask back, and the thread carries on as it would after a
//! suppressed signal.
//!
//! Not emulated: the previous handler's `sa_mask` and `SA_ONSTACK` (it runs
//! on probert's handler's stack, with probert's mask).
//!
//! # Hosts that install a `SIGTRAP` handler after probert
//!
//! A host handler installed after probert receives probert's traps first. If
//! it does not pass them on, probes no longer work: every attach fails with
//! [`Error::Signal`] (probes already attached deliver their hits to the
//! host's handler; detaching them still restores the code). A host handler
//! that chains — it saved the previous `sigaction` (probert's) and calls it,
//! with the kernel's three arguments, for traps it does not recognise — is
//! declared with [`declare_chained_handler`] and probes work through it.
//!
//! A thread that trapped into a chaining handler leaves probert's handler,
//! and its read-side section, with the register context already pointing
//! into an out-of-line stub, then runs the host's code and the host's
//! signal return trampoline: outside the `probert_fast` code a thread scan
//! treats as busy. The thread scan still sees it: its walk of the stack
//! above the interrupted context finds the `SIGTRAP` signal frame, whose
//! saved program counter is the stub ([`crate::sys::sigframes`]). For that
//! walk to recognise the frame, probert learns the trampoline it starts
//! with: a `SIGTRAP` frame that does not start with probert's own
//! trampoline was delivered to another handler, which then called ours, and
//! its trampoline is noted ([`note_restorer`]) before the context is changed;
//! the declared handler's is noted at declaration. A thread inside that
//! trampoline is recognised by its program counter.
//!
//! # Safety
//!
//! `sigaction` is called with fully initialised structures. The previous
//! handler is stored as plain integers and called with the arguments the
//! kernel gave us, exactly as the kernel would have called it. Signals are
//! sent to the calling thread only.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};

use crate::arch::KernelSigaction;
use crate::error::{Error, Result};
use crate::sigctx::SignalContext;
use crate::sys::raw;

/// A disposition probert replaced and chains to: its handler address,
/// `sa_flags` and `sa_mask`.
struct Prev {
    handler: AtomicUsize,
    flags: AtomicI32,
    mask: AtomicU64,
}

impl Prev {
    const fn new() -> Prev {
        Prev {
            handler: AtomicUsize::new(libc::SIG_DFL),
            flags: AtomicI32::new(0),
            mask: AtomicU64::new(0),
        }
    }

    /// Remembers `act`. Normal context, before our handler is installed
    /// over it.
    fn store(&self, act: &KernelSigaction) {
        // Ordering: Release, all — published before our handler can run (the
        // rt_sigaction installing it is a syscall, a full barrier); read
        // with Acquire in `chain_to`. The kernel's flags fit the C `int`
        // (`SA_RESTORER` included).
        self.mask.store(act.mask(), Ordering::Release);
        self.flags.store(act.flags() as i32, Ordering::Release);
        self.handler.store(act.handler(), Ordering::Release);
    }
}

/// The previous `SIGTRAP` disposition.
static PREV_TRAP: Prev = Prev::new();
/// Our handler, once installed.
static OURS: AtomicUsize = AtomicUsize::new(0);

/// The signals a displaced instruction can raise, which probert's fault
/// handler sees first (see "Faults in displaced instructions").
pub const FAULT_SIGNALS: [libc::c_int; 4] =
    [libc::SIGSEGV, libc::SIGBUS, libc::SIGFPE, libc::SIGILL];
/// The dispositions our fault handler replaced, per [`FAULT_SIGNALS`].
static PREV_FAULT: [Prev; 4] = [const { Prev::new() }; 4];
/// Our fault handler, once installed.
static OURS_FAULT: AtomicUsize = AtomicUsize::new(0);
/// The handler a host installed after probert and declared to chain to ours
/// ([`declare_chained_handler`]); 0 if none.
static CHAINED: AtomicUsize = AtomicUsize::new(0);

/// Most signal return trampolines [`note_restorer`] remembers.
pub const MAX_RESTORERS: usize = 8;
/// Learned signal return trampolines (0: free).
static RESTORERS: [AtomicUsize; MAX_RESTORERS] = [const { AtomicUsize::new(0) }; MAX_RESTORERS];
/// Set when a trampoline could not be remembered (all slots taken).
static RESTORERS_LOST: AtomicUsize = AtomicUsize::new(0);

/// A signal handler with `SA_SIGINFO` arguments.
pub type SigInfoHandler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void);

/// Installs `handler` for `SIGTRAP` once, remembering the previous
/// disposition for [`chain`].
///
/// Flags, each for a reason:
/// - `SA_SIGINFO`: we need `si_code` (a trap instruction is `SI_KERNEL`) and
///   the interrupted context, to read and rewrite the registers;
/// - `SA_NODEFER`: a handler may run probed code; the nested trap must be
///   delivered (and counted as missed) rather than kill the process, which is
///   what the kernel does to a blocked synchronous trap;
/// - `SA_RESTART`: a trap interrupting nothing restartable changes nothing,
///   but a consumer's own blocking calls should not see `EINTR`;
/// - no `SA_ONSTACK`: an alternate stack is small (Rust gives 8 KiB, an
///   AVX-512 signal frame takes 3.4 KiB) while the interrupted stack has room
///   for the handler and the user's consumer.
pub fn install_trap(handler: SigInfoHandler) -> Result<()> {
    // Ordering: Acquire — pairs with the Release below; install is also
    // serialised by the caller's writer lock.
    if OURS.load(Ordering::Acquire) != 0 {
        return Ok(());
    }
    let prev = query(libc::SIGTRAP)?;
    // Read the previous disposition first so the handler never sees a window
    // in which it is ours but `PREV_TRAP` is not yet filled in.
    PREV_TRAP.store(&prev);
    set_ours(handler as usize).map_err(|errno| {
        Error::Signal(format!("rt_sigaction: {}", std::io::Error::from_raw_os_error(errno)).into())
    })?;
    // Ordering: Release — pairs with the Acquire at the top.
    OURS.store(handler as usize, Ordering::Release);
    Ok(())
}

/// Installs `handler` as our disposition for `SIGTRAP`.
///
/// Installed with the raw system call and a restorer of our own, so that
/// the whole way from the handler back into the interrupted code (or an
/// out-of-line stub) runs probert's code, in the `probert_fast` section that
/// thread scans treat as busy (see `crate::xol`). libc's `sigaction` would
/// install its own restorer, in libc.
///
/// # Signal safety
/// One raw system call.
fn set_ours(handler: usize) -> Result<(), i32> {
    let act = KernelSigaction::new(
        handler,
        libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_RESTART,
    );
    // SAFETY: a valid kernel sigaction for SIGTRAP and its sigset size.
    let rc = unsafe {
        raw::syscall4(
            libc::SYS_rt_sigaction,
            libc::SIGTRAP as i64,
            &act as *const KernelSigaction as i64,
            0,
            KernelSigaction::SIGSET_SIZE,
        )
    };
    raw::check(rc).map(drop)
}

/// The kernel's current disposition of `sig` (raw `rt_sigaction`, so the
/// trampoline and flags are the kernel's, whatever libc the host uses).
fn query(sig: libc::c_int) -> Result<KernelSigaction> {
    let mut cur = KernelSigaction::zeroed();
    // SAFETY: a query: null new action, `cur` writable.
    let rc = unsafe {
        raw::syscall4(
            libc::SYS_rt_sigaction,
            i64::from(sig),
            0,
            &mut cur as *mut KernelSigaction as i64,
            KernelSigaction::SIGSET_SIZE,
        )
    };
    raw::check(rc).map_err(|errno| {
        Error::Signal(
            format!(
                "rt_sigaction({sig}) query: {}",
                std::io::Error::from_raw_os_error(errno)
            )
            .into(),
        )
    })?;
    Ok(cur)
}

/// The signal return trampoline the kernel's disposition of `sig` uses (0
/// if none), for the thread scan's own handler. Normal context.
pub fn restorer_of(sig: libc::c_int) -> usize {
    query(sig).map_or(0, |a| a.restorer())
}

/// Whether probes can work through the `SIGTRAP` disposition installed now:
/// it is probert's handler, or the handler a host declared to chain to it
/// ([`declare_chained_handler`]).
///
/// Our handler re-installed by the host through libc (it saved probert's
/// `sigaction` and restored it) is accepted and re-installed exactly as
/// probert installs it (its own trampoline, its flags): that displaces no
/// one. Normal context.
pub fn trap_handler_installed() -> bool {
    // Ordering: Acquire — pairs with the Release in `install_trap`.
    let ours = OURS.load(Ordering::Acquire);
    let Ok(cur) = query(libc::SIGTRAP) else {
        return false;
    };
    if ours == 0 {
        return false;
    }
    if cur.handler() == ours {
        let want =
            KernelSigaction::new(ours, libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_RESTART);
        if cur.flags() != want.flags()
            || cur.restorer() != want.restorer()
            || cur.mask() != want.mask()
        {
            return set_ours(ours).is_ok();
        }
        return true;
    }
    // Ordering: Relaxed — written under the writer lock, read under it.
    let chained = CHAINED.load(Ordering::Relaxed);
    chained != 0 && cur.handler() == chained
}

/// Declares that the `SIGTRAP` handler installed now (by the host, after
/// probert) chains to probert's: it calls the `sigaction` it replaced with
/// the kernel's three arguments for every `SIGTRAP` it does not handle
/// itself, and returns normally afterwards. Attaching then works through it.
///
/// Refused with [`Error::Signal`] if no handler other than probert's is
/// installed, or if it could not chain safely: it must be an `SA_SIGINFO`
/// handler (probert's needs `siginfo` and the context), and `SIGTRAP` must
/// not be blocked while it runs (`SA_NODEFER`, and not in its `sa_mask`) —
/// a consumer that calls probed code would otherwise trap with `SIGTRAP`
/// blocked, which the kernel punishes with death. Normal context.
pub fn declare_chained_handler() -> Result<()> {
    // Ordering: Acquire — pairs with the Release in `install_trap`.
    let ours = OURS.load(Ordering::Acquire);
    let cur = query(libc::SIGTRAP)?;
    let h = cur.handler();
    if h == ours && ours != 0 {
        return Ok(());
    }
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        return Err(Error::Signal(
            "no SIGTRAP handler is installed that could chain to probert's".into(),
        ));
    }
    let flags = cur.flags() as i32;
    let trap_bit = 1u64 << (libc::SIGTRAP - 1);
    if flags & libc::SA_SIGINFO == 0 {
        return Err(Error::Signal(
            "the host's SIGTRAP handler is not an SA_SIGINFO handler: it cannot pass \
             probert's handler the siginfo and context"
                .into(),
        ));
    }
    if flags & libc::SA_NODEFER == 0 || cur.mask() & trap_bit != 0 {
        return Err(Error::Signal(
            "the host's SIGTRAP handler blocks SIGTRAP while it runs (no SA_NODEFER, or \
             SIGTRAP in its sa_mask): a probe hit inside it would kill the process"
                .into(),
        ));
    }
    // SAFETY: a normal-context caller may call signal-safe functions.
    let cx = unsafe { SignalContext::new() };
    note_restorer(cx, cur.restorer());
    // Ordering: Relaxed — read by `trap_handler_installed` under the same
    // writer lock this runs under.
    CHAINED.store(h, Ordering::Relaxed);
    Ok(())
}

/// Remembers `restorer` as the first word of signal frames the thread scan
/// must recognise (see the module docs). No effect for 0, probert's own, or
/// one already known; if every slot is taken, scans stop trusting their
/// walks ([`restorers_lost`]).
///
/// # Signal safety
/// Atomic loads and at most [`MAX_RESTORERS`] compare-and-swaps.
pub fn note_restorer(_cx: SignalContext, restorer: usize) {
    if restorer == 0 || restorer == crate::arch::restorer_address() {
        return;
    }
    for slot in &RESTORERS {
        // Ordering: Release on success publishes the trampoline to scan
        // handlers on other threads; Acquire on the loads — pairs with
        // `learned_restorers`. (The thread that noted it is the one whose
        // frame it starts, and sees its own store in any case.)
        match slot.compare_exchange(0, restorer, Ordering::Release, Ordering::Acquire) {
            Ok(_) => return,
            Err(r) if r == restorer => return,
            Err(_) => {}
        }
    }
    // Ordering: Release — pairs with the Acquire in `restorers_lost`.
    RESTORERS_LOST.store(1, Ordering::Release);
}

/// The trampolines [`note_restorer`] learned (0: none in that slot).
///
/// # Signal safety
/// Atomic loads.
pub fn learned_restorers(_cx: SignalContext) -> [usize; MAX_RESTORERS] {
    // Ordering: Acquire — pairs with the Release CAS in `note_restorer`.
    std::array::from_fn(|i| RESTORERS[i].load(Ordering::Acquire))
}

/// Whether a trampoline could not be remembered: walks may then miss a
/// frame, and scans must not trust a thread they did not see inside.
///
/// # Signal safety
/// One atomic load.
pub fn restorers_lost() -> bool {
    // Ordering: Acquire — pairs with the Release in `note_restorer`.
    RESTORERS_LOST.load(Ordering::Acquire) != 0
}

/// Passes a `SIGTRAP` that is not ours to the previous disposition, in the
/// three cases: an `SA_SIGINFO` handler, a plain handler, or `SIG_DFL` /
/// `SIG_IGN` (see the module docs for what each does). `trap_len` is the
/// length of the trap instruction that raised it (0 if it was not raised by
/// an instruction of ours to classify). Returns only if the process lives
/// on.
///
/// # Signal safety
/// Raw system calls (`rt_sigaction`, `rt_sigprocmask`, `gettid`/`getpid`,
/// `rt_tgsigqueueinfo`, `tgkill`) and the previous handler.
pub fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut c_void, trap_len: u8) {
    chain_to(&PREV_TRAP, sig, info, uc, trap_len > 0);
}

/// [`chain`] for the previous disposition `prev` of `sig`; `forced` if the
/// signal was raised by an instruction whatever its `si_code` says.
///
/// # Signal safety
/// As [`chain`].
fn chain_to(
    prev: &Prev,
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    uc: *mut c_void,
    forced: bool,
) {
    // Ordering: Acquire — pairs with the Release in `Prev::store`.
    let handler = prev.handler.load(Ordering::Acquire);
    let flags = prev.flags.load(Ordering::Acquire);
    let code = if info.is_null() {
        0
    } else {
        // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler
        // (and a chaining host passes the kernel's).
        unsafe { (*info).si_code }
    };
    let forced = forced || code > 0;
    if handler == libc::SIG_IGN && !forced {
        // Sent by a process and ignored: nothing happens, as without us.
        return;
    }
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        die_by_default(sig, info);
        return;
    }
    if flags & libc::SA_RESETHAND != 0 {
        // The kernel resets the disposition on entry to such a handler: the
        // next one gets the default action.
        // Ordering: Release — pairs with the Acquire loads above (another
        // thread racing us calls the handler too, as concurrent deliveries
        // could have).
        prev.flags.store(0, Ordering::Release);
        // Ordering: Release, as above.
        prev.handler.store(libc::SIG_DFL, Ordering::Release);
    }
    if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it
        // has this signature; we pass the kernel's own arguments.
        let f: SigInfoHandler = unsafe { std::mem::transmute::<usize, SigInfoHandler>(handler) };
        f(sig, info, uc);
    } else {
        // SAFETY: a plain handler takes the signal number only.
        let f: extern "C" fn(libc::c_int) =
            unsafe { std::mem::transmute::<usize, extern "C" fn(libc::c_int)>(handler) };
        f(sig);
    }
}

/// Applies `sig`'s default action (for `SIGTRAP`: terminate with a core
/// dump) to this process, from the handler: `SIG_DFL`, `sig` unblocked,
/// `info` sent again to this thread, which dies of it when that system call
/// returns. If it returns after all (a tracer suppressed the signal), puts
/// our handler and the mask back and returns.
///
/// # Signal safety
/// Raw system calls only.
fn die_by_default(sig: libc::c_int, info: *mut libc::siginfo_t) {
    let dfl = KernelSigaction::new(libc::SIG_DFL, 0);
    let bit: u64 = 1 << (sig - 1);
    let mut old_mask: u64 = 0;
    // SAFETY: raw system calls with valid pointers to our own stack; the
    // signal goes to this thread only; `info` is the kernel's siginfo (or
    // null, then a plain tgkill is used).
    unsafe {
        raw::syscall4(
            libc::SYS_rt_sigaction,
            i64::from(sig),
            &dfl as *const KernelSigaction as i64,
            0,
            KernelSigaction::SIGSET_SIZE,
        );
        raw::syscall4(
            libc::SYS_rt_sigprocmask,
            i64::from(libc::SIG_UNBLOCK),
            &bit as *const u64 as i64,
            &mut old_mask as *mut u64 as i64,
            KernelSigaction::SIGSET_SIZE,
        );
        let pid = raw::syscall0(libc::SYS_getpid);
        let tid = raw::syscall0(libc::SYS_gettid);
        let sent = !info.is_null()
            && raw::check(raw::syscall4(
                libc::SYS_rt_tgsigqueueinfo,
                pid,
                tid,
                i64::from(sig),
                info as i64,
            ))
            .is_ok();
        if !sent {
            raw::syscall3(libc::SYS_tgkill, pid, tid, i64::from(sig));
        }
        // Still alive: a tracer suppressed the signal.
        raw::syscall4(
            libc::SYS_rt_sigprocmask,
            i64::from(libc::SIG_SETMASK),
            &old_mask as *const u64 as i64,
            0,
            KernelSigaction::SIGSET_SIZE,
        );
    }
    // Ordering: Acquire — pairs with the Release in `install_trap`.
    let ours = OURS.load(Ordering::Acquire);
    if ours != 0 && sig == libc::SIGTRAP {
        let _ = set_ours(ours);
    }
    // Ordering: Acquire — pairs with the Release in `install_faults`.
    let ours = OURS_FAULT.load(Ordering::Acquire);
    if let Some(i) = fault_index(sig).filter(|_| ours != 0) {
        let _ = set_fault(sig, ours, &PREV_FAULT[i]);
    }
}

/// The index of `sig` in [`FAULT_SIGNALS`].
///
/// # Signal safety
/// A loop over a constant array.
fn fault_index(sig: libc::c_int) -> Option<usize> {
    FAULT_SIGNALS.iter().position(|&s| s == sig)
}

/// Installs `handler` for every signal of [`FAULT_SIGNALS`] once,
/// remembering each previous disposition for [`chain_fault`].
///
/// Our handler inherits from the disposition it replaces what changes where
/// the host's handler runs: `SA_ONSTACK` (a stack overflow is reported on
/// the alternate stack; set over `SIG_DFL` or `SIG_IGN` too) and its
/// `sa_mask` — without `SIGTRAP`, so that a host handler may call probed
/// code. Always `SA_SIGINFO` (it reads the context and passes `siginfo`
/// on) and `SA_NODEFER` (the emulator's access may fault inside it;
/// [`chain_fault`] blocks the signal before calling a handler that did not
/// ask for `SA_NODEFER`). Normal context.
pub fn install_faults(handler: SigInfoHandler) -> Result<()> {
    // Ordering: Acquire — pairs with the Release below; serialised by the
    // caller's writer lock.
    if OURS_FAULT.load(Ordering::Acquire) != 0 {
        return Ok(());
    }
    for (i, &sig) in FAULT_SIGNALS.iter().enumerate() {
        let prev = query(sig)?;
        PREV_FAULT[i].store(&prev);
        set_fault(sig, handler as usize, &PREV_FAULT[i]).map_err(|errno| {
            Error::Signal(
                format!(
                    "rt_sigaction({sig}): {}",
                    std::io::Error::from_raw_os_error(errno)
                )
                .into(),
            )
        })?;
    }
    // Ordering: Release — pairs with the Acquire loads of `OURS_FAULT`.
    OURS_FAULT.store(handler as usize, Ordering::Release);
    Ok(())
}

/// Installs `handler` as our disposition for the fault signal `sig`, over
/// the previous one `prev` (see [`install_faults`]).
///
/// # Signal safety
/// Atomic loads and one raw system call.
fn set_fault(sig: libc::c_int, handler: usize, prev: &Prev) -> Result<(), i32> {
    // Ordering: Acquire — pairs with the Release in `Prev::store`.
    let h = prev.handler.load(Ordering::Acquire);
    let flags = prev.flags.load(Ordering::Acquire);
    let mask = prev.mask.load(Ordering::Acquire);
    let trap_bit = 1u64 << (libc::SIGTRAP - 1);
    let inherited = if h == libc::SIG_DFL || h == libc::SIG_IGN {
        libc::SA_ONSTACK
    } else {
        flags & libc::SA_ONSTACK
    };
    let act = KernelSigaction::new(handler, libc::SA_SIGINFO | libc::SA_NODEFER | inherited)
        .with_mask(mask & !trap_bit);
    // SAFETY: a valid kernel sigaction for `sig` and its sigset size.
    let rc = unsafe {
        raw::syscall4(
            libc::SYS_rt_sigaction,
            i64::from(sig),
            &act as *const KernelSigaction as i64,
            0,
            KernelSigaction::SIGSET_SIZE,
        )
    };
    raw::check(rc).map(drop)
}

/// Passes a fault signal (one of [`FAULT_SIGNALS`]) to the disposition our
/// fault handler replaced: a handler is called with `info` and `uc` (which
/// the caller may have rewound, see `crate::trap`); `SIG_DFL` (and
/// `SIG_IGN` for a fault the kernel raised) kills the process with `info`,
/// as without probert. Returns only if the process lives on.
///
/// # Signal safety
/// As [`chain`].
pub fn chain_fault(sig: libc::c_int, info: *mut libc::siginfo_t, uc: *mut c_void) {
    if let Some(i) = fault_index(sig) {
        // Ordering: Acquire — pairs with the Release in `Prev::store`.
        let flags = PREV_FAULT[i].flags.load(Ordering::Acquire);
        if flags & libc::SA_NODEFER == 0 {
            // Ours runs with SA_NODEFER (an emulated access must be able to
            // fault inside it); the host's handler runs as the kernel would
            // have run it, with `sig` blocked (restored on sigreturn).
            block(sig);
        }
        chain_to(&PREV_FAULT[i], sig, info, uc, false);
    }
}

/// Blocks `sig` in the calling thread.
///
/// # Signal safety
/// One raw system call.
pub fn block(sig: libc::c_int) {
    sigmask(libc::SIG_BLOCK, sig);
}

/// Unblocks `sig` in the calling thread.
///
/// # Signal safety
/// One raw system call.
pub fn unblock(sig: libc::c_int) {
    sigmask(libc::SIG_UNBLOCK, sig);
}

fn sigmask(how: libc::c_int, sig: libc::c_int) {
    let bit: u64 = 1 << (sig - 1);
    // SAFETY: a valid signal set on our stack; no old set.
    unsafe {
        raw::syscall4(
            libc::SYS_rt_sigprocmask,
            i64::from(how),
            &bit as *const u64 as i64,
            0,
            KernelSigaction::SIGSET_SIZE,
        );
    }
}
