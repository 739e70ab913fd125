//! Children that share memory (issue 13, item 3): `posix_spawn`,
//! `posix_spawnp`, `system` and `popen` run their child with probert's
//! `SIGTRAP` handler.
//!
//! The C library's spawn runs its child with `clone(CLONE_VM | CLONE_VFORK)`
//! in the parent's memory, every signal blocked, and then resets every
//! handler to the default: a trap site the child executes on its way to
//! `execve` (`dup2`, `close`, `execve` itself, anything a file action or
//! the exec calls) kills it with `SIGTRAP`. glibc's child is internal (not
//! interposable), so probert defines those functions (and `pclose`) itself (every
//! binary or shared object linking probert defines them, as it defines the
//! signal-mask functions of [`super::masks`]) and runs a child of its own:
//! the same steps in the same order as glibc 2.36's, except that `SIGTRAP`
//! keeps probert's handler and stays unblocked until `execve` (which
//! resets the handler). Probes in the child are served on both paths, and
//! its hits count — a probe on `execve` sees every spawn. For that the
//! child calls the C library's public functions (`dup2`, `close`, `open`,
//! `execve`, …) where glibc's calls internal aliases: a wrapper another
//! library interposes on those (a sanitizer's descriptor tracking) runs in
//! the child too, and must not take locks there. The parent allocates (the
//! file actions, `posix_spawnp`'s candidates) before the child starts: the
//! functions are not async-signal-safe, as POSIX allows.
//!
//! While the child runs (it shares the parent's memory and thread
//! pointer, and the parent thread is suspended in `clone`):
//!
//! - thread scans look at it as at a thread that cannot take the scan
//!   signal, through `/proc/<pid>` ([`children_outside`]): it is not a
//!   thread of this process, so neither the scan signal nor
//!   `/proc/self/task` sees it, and it may be inside a range being switched
//!   or a stub being reused;
//! - return probes keep its frames on a shadow stack of its own
//!   ([`spawning_slot`]): mixed with its parent thread's, a `ret` in the
//!   child would take the parent's frames for deeper, abandoned ones. Its
//!   calls return as anywhere; an `execve` that succeeds is abandoned.
//!
//! # What is kept from glibc, and what is not
//!
//! The file actions are read from glibc's `posix_spawn_file_actions_t`
//! (its internal `struct __spawn_action`, 32 bytes, tags close, dup2, open,
//! chdir, fchdir, closefrom and tcsetpgrp: glibc 2.34 and later), the
//! attributes from the public `posix_spawnattr_t`. A tag or a flag not
//! known here (a later glibc's) sends the call to the C library's own
//! function, as does an architecture without [`super::raw::clone_vfork`].
//! Differences, all after `execve` invisible or documented:
//!
//! - `SIGTRAP` is never blocked in the child, nor in the mask it execs
//!   with (as with every mask set through the C library, see
//!   [`super::masks`]); its disposition after `execve` is the default even
//!   where it was ignored before probert installed its handler;
//! - `system` and `pclose` are not cancellation points: they wait for the
//!   shell with a raw `wait4` (a cancelled Rust frame cannot unwind); both
//!   run `/bin/sh -c command` as glibc 2.36 does; `popen`'s child closes
//!   the streams of earlier `popen` calls, as glibc's;
//! - probes on the C library's own definitions of these functions see only
//!   the calls that still reach them (the C library's internal ones, a
//!   `dlsym(RTLD_NEXT, …)`): the others run probert's;
//! - a program's own `vfork` is not taken over: its child inherits
//!   probert's handler and works, but neither return probes nor scans know
//!   it (the crate docs say so).
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, CStr, CString};
use std::sync::atomic::{fence, AtomicI32, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::raw;

// ---- glibc's layouts (see the module docs)

/// `struct __spawn_action`: a tag, then a union at offset 8.
const ACTION_SIZE: usize = 32;
const DO_CLOSE: i32 = 0;
const DO_DUP2: i32 = 1;
const DO_OPEN: i32 = 2;
const DO_CHDIR: i32 = 3;
const DO_FCHDIR: i32 = 4;
const DO_CLOSEFROM: i32 = 5;
const DO_TCSETPGRP: i32 = 6;

/// `posix_spawnattr_t` flags (spawn.h).
const RESETIDS: i16 = 0x01;
const SETPGROUP: i16 = 0x02;
const SETSIGDEF: i16 = 0x04;
const SETSIGMASK: i16 = 0x08;
const SETSCHEDPARAM: i16 = 0x10;
const SETSCHEDULER: i16 = 0x20;
/// `POSIX_SPAWN_USEVFORK` (ignored, as by glibc) and `POSIX_SPAWN_SETSID`.
const KNOWN_FLAGS: i16 = 0xff;
const SETSID: i16 = 0x80;

/// The guard page below a child's stack.
const GUARD: usize = 4096;
/// The exit status of a child that could not exec (POSIX).
const SPAWN_ERROR: c_int = 127;
/// glibc's internal signals (cancellation, set-id broadcast): ignored in
/// the child, as glibc's child does.
const INTERNAL: [c_int; 2] = [32, 33];
const TRAP_BIT: u64 = 1 << (libc::SIGTRAP - 1);
const INTERNAL_BITS: u64 = (1 << 31) | (1 << 32);
/// The default search path of `execvp` (`confstr(_CS_PATH)`).
const CS_PATH: &[u8] = b"/bin:/usr/bin";

/// One file action, copied out of glibc's list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Close(c_int),
    Dup2(c_int, c_int),
    Open {
        fd: c_int,
        path: *const c_char,
        oflag: c_int,
        mode: libc::mode_t,
    },
    Chdir(*const c_char),
    Fchdir(c_int),
    CloseFrom(c_int),
    Tcsetpgrp(c_int),
}

/// The attributes, from a `posix_spawnattr_t` (all zero without one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Attr {
    flags: i16,
    pgrp: libc::pid_t,
    /// `SETSIGDEF`'s signals, `SETSIGMASK`'s mask (the kernel's 64 bits).
    sigdef: u64,
    sigmask: u64,
    priority: c_int,
    policy: c_int,
}

/// Reads glibc's file actions; `None` if one is of a kind not known here.
///
/// # Safety
/// `fa` is null or a `posix_spawn_file_actions_t` initialised by glibc.
unsafe fn read_actions(fa: *const libc::posix_spawn_file_actions_t) -> Option<Vec<Action>> {
    if fa.is_null() {
        return Some(Vec::new());
    }
    let base = fa.cast::<u8>();
    // SAFETY: the public layout: `int __allocated; int __used;
    // struct __spawn_action *__actions;`.
    let (used, list) = unsafe {
        (
            base.add(4).cast::<c_int>().read(),
            base.add(8).cast::<*const u8>().read(),
        )
    };
    let mut out = Vec::with_capacity(used.max(0) as usize);
    for i in 0..used.max(0) as usize {
        // SAFETY: `used` actions of ACTION_SIZE bytes each (see the module
        // docs); the union's fields at offsets 8.. as glibc lays them out.
        let a = unsafe {
            let p = list.add(i * ACTION_SIZE);
            let int = |off: usize| p.add(off).cast::<c_int>().read();
            let ptr = |off: usize| p.add(off).cast::<*const c_char>().read();
            match int(0) {
                DO_CLOSE => Action::Close(int(8)),
                DO_DUP2 => Action::Dup2(int(8), int(12)),
                DO_OPEN => Action::Open {
                    fd: int(8),
                    path: ptr(16),
                    oflag: int(24),
                    mode: int(28) as libc::mode_t,
                },
                DO_CHDIR => Action::Chdir(ptr(8)),
                DO_FCHDIR => Action::Fchdir(int(8)),
                DO_CLOSEFROM => Action::CloseFrom(int(8)),
                DO_TCSETPGRP => Action::Tcsetpgrp(int(8)),
                _ => return None,
            }
        };
        out.push(a);
    }
    Some(out)
}

/// Reads the attributes; `None` if a flag is not known here.
///
/// # Safety
/// `attr` is null or a `posix_spawnattr_t` initialised by glibc.
unsafe fn read_attr(attr: *const libc::posix_spawnattr_t) -> Option<Attr> {
    if attr.is_null() {
        return Some(Attr::default());
    }
    let p = attr.cast::<u8>();
    // SAFETY: the public layout of spawn.h: `short __flags; pid_t __pgrp;
    // sigset_t __sd; sigset_t __ss; struct sched_param __sp; int __policy`
    // (offsets 0, 4, 8, 136, 264, 268).
    let a = unsafe {
        Attr {
            flags: p.cast::<i16>().read(),
            pgrp: p.add(4).cast::<libc::pid_t>().read(),
            sigdef: p.add(8).cast::<u64>().read_unaligned(),
            sigmask: p.add(136).cast::<u64>().read_unaligned(),
            priority: p.add(264).cast::<c_int>().read(),
            policy: p.add(268).cast::<c_int>().read(),
        }
    };
    (a.flags & !KNOWN_FLAGS == 0).then_some(a)
}

// ---- children in flight

/// Threads whose spawn child may be running: their thread pointers, and
/// the child's pid once it has started (0 before).
pub const SLOTS: usize = 64;
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
#[allow(clippy::declare_interior_mutable_const)] // an array initialiser
const NOBODY: AtomicUsize = AtomicUsize::new(0);
static SPAWNING: [AtomicUsize; SLOTS] = [NOBODY; SLOTS];
#[allow(clippy::declare_interior_mutable_const)] // an array initialiser
const NO_PID: AtomicI32 = AtomicI32::new(0);
static CHILD_PID: [AtomicI32; SLOTS] = [NO_PID; SLOTS];

/// Whether every spawn child running now is outside what the caller
/// asks, by `outside(pid)` (a thread scan: the child shares our memory but
/// is not one of our threads, so neither the scan signal nor
/// `/proc/self/task` sees it). A child that has not said its pid yet may
/// be anywhere: `false`. Normal context.
pub fn children_outside(mut outside: impl FnMut(i32) -> bool) -> bool {
    // Ordering: SeqCst — the scan made its ranges unreachable and published
    // them, then reads this; the spawner raises it, then clones: either
    // the scan sees the child, or the child starts after the ranges were
    // unreachable (pairs with the fetch_add in `InFlight::enter`).
    fence(Ordering::SeqCst);
    if IN_FLIGHT.load(Ordering::SeqCst) == 0 {
        return true;
    }
    SPAWNING.iter().zip(&CHILD_PID).all(|(tp, pid)| {
        // Ordering: Acquire — a slot's pid is stored after its claim.
        if tp.load(Ordering::Acquire) == 0 {
            return true;
        }
        // Ordering: Relaxed — stored by the child; 0 until then.
        match pid.load(Ordering::Relaxed) {
            0 => false,
            pid => outside(pid),
        }
    })
}

/// The spawn slot of the thread with thread pointer `tp` while it is
/// suspended in a spawn (so the code running with it is its child). A
/// handler in the child that spawns again registers the same thread
/// pointer twice; the first slot is the outer child's, which is not
/// running then.
///
/// # Signal safety
/// Loads.
pub fn spawning_slot(tp: usize) -> Option<usize> {
    // Ordering: Relaxed — the child runs after the `clone` that follows
    // the parent's stores (the same memory, ordered by the system call).
    if IN_FLIGHT.load(Ordering::Relaxed) == 0 {
        return None;
    }
    SPAWNING
        .iter()
        .rposition(|s| s.load(Ordering::Relaxed) == tp)
}

/// In the child of a `fork`: the threads that were spawning are gone, and
/// so are their children (for this process).
pub fn fork_child() {
    for (slot, (tp, pid)) in SPAWNING.iter().zip(&CHILD_PID).enumerate() {
        // Ordering: Relaxed — the only thread of the new process.
        if tp.swap(0, Ordering::Relaxed) != 0 {
            crate::shadow::child_gone(slot);
        }
        pid.store(0, Ordering::Relaxed);
    }
    IN_FLIGHT.store(0, Ordering::SeqCst);
}

/// This thread's registration while its child runs.
struct InFlight(usize);

impl InFlight {
    fn enter() -> InFlight {
        let tp = crate::arch::thread_pointer();
        // Ordering: SeqCst — see `children_outside`.
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        loop {
            for (i, s) in SPAWNING.iter().enumerate() {
                // Ordering: Acquire — the slot's child stack, reset by the
                // last owner (pairs with the Release store in `drop`).
                if s.compare_exchange(0, tp, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return InFlight(i);
                }
            }
            // More than SLOTS threads spawning at once: wait for a slot.
            std::thread::yield_now();
        }
    }

    /// Called by the child first: says where a scan finds it.
    fn started(slot: usize) {
        // SAFETY: getpid has no arguments (in the child: the child's pid).
        let pid = unsafe { raw::syscall0(libc::SYS_getpid) } as i32;
        // Ordering: Relaxed — see `children_outside`.
        CHILD_PID[slot].store(pid, Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        crate::shadow::child_gone(self.0);
        // Ordering: Relaxed — the child is gone.
        CHILD_PID[self.0].store(0, Ordering::Relaxed);
        // Ordering: Release — the reset stack, for the next claim; SeqCst,
        // see `enter`.
        SPAWNING[self.0].store(0, Ordering::Release);
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

// ---- the child

/// What the child executes.
enum Exec<'a> {
    /// `posix_spawn`: this path.
    Path(*const c_char),
    /// `posix_spawnp` of a name without a slash: these candidates, in
    /// order, as `execvp` tries them.
    Search(&'a [CString]),
    /// `posix_spawnp` refused before any `execve` (`ENAMETOOLONG`).
    Fail(c_int),
}

/// Everything the child reads, in the parent's memory (which it shares).
struct Child<'a> {
    exec: Exec<'a>,
    argv: *const *const c_char,
    envp: *const *const c_char,
    actions: &'a [Action],
    attr: Attr,
    /// The parent's mask before the spawn blocked signals.
    old_mask: u64,
    /// The child's `errno` if it could not exec (0: it exec'd, or died).
    err: AtomicI32,
    /// Its parent's spawn slot.
    slot: usize,
}

fn errno() -> c_int {
    // SAFETY: this thread's errno slot (the child uses its parent's, as
    // glibc's does).
    unsafe { *libc::__errno_location() }
}

/// Kernel `struct sigaction` (x86_64): handler, flags, restorer, mask.
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// The child's entry on its own stack: the steps of glibc's, then `_exit`
/// with 127 if it could not exec.
///
/// # Safety
/// `arg` is the parent's [`Child`], alive while the parent is suspended.
unsafe extern "C" fn child_main(arg: *const u8) -> ! {
    // SAFETY: the caller's contract.
    let c = unsafe { &*arg.cast::<Child<'_>>() };
    InFlight::started(c.slot);
    // SAFETY: the child's own process.
    let e = unsafe { run_child(c) };
    // Ordering: Relaxed — the parent reads it after the `clone` returned,
    // which the child's exit orders.
    c.err
        .store(if e == 0 { libc::ECHILD } else { e }, Ordering::Relaxed);
    // SAFETY: ends the child.
    unsafe { libc::_exit(SPAWN_ERROR) }
}

/// The child's steps; returns the `errno` that stopped it (it returns only
/// if it could not exec).
///
/// # Safety
/// Runs in the spawn child only.
unsafe fn run_child(c: &Child<'_>) -> c_int {
    // SIGTRAP first, so that whatever the child calls may be probed.
    let trap = TRAP_BIT;
    // SAFETY: the child's own mask; a valid 8-byte set.
    unsafe {
        raw::syscall4(
            libc::SYS_rt_sigprocmask,
            i64::from(libc::SIG_UNBLOCK),
            &trap as *const u64 as i64,
            0,
            8,
        )
    };

    // No handler of the parent may run in the child (it shares its memory):
    // the default for every signal that has one, glibc's internal signals
    // ignored, SETSIGDEF's signals the default — all but SIGTRAP, which
    // keeps probert's (exec resets it).
    for sig in 1..=64 {
        if sig == libc::SIGTRAP {
            continue;
        }
        let bit = 1u64 << (sig - 1);
        let mut sa = KernelSigaction::default();
        if c.attr.flags & SETSIGDEF != 0 && c.attr.sigdef & bit != 0 {
            sa.handler = libc::SIG_DFL;
        } else if INTERNAL.contains(&sig) {
            sa.handler = libc::SIG_IGN;
        } else {
            let mut now = KernelSigaction::default();
            // SAFETY: reads the child's disposition into `now`.
            let r = unsafe {
                raw::syscall4(
                    libc::SYS_rt_sigaction,
                    i64::from(sig),
                    0,
                    &mut now as *mut _ as i64,
                    8,
                )
            };
            if r != 0 || now.handler == libc::SIG_IGN || now.handler == libc::SIG_DFL {
                continue;
            }
            sa.handler = libc::SIG_DFL;
        }
        // SAFETY: sets the child's disposition (SIGKILL/SIGSTOP refuse).
        unsafe {
            raw::syscall4(
                libc::SYS_rt_sigaction,
                i64::from(sig),
                &sa as *const _ as i64,
                0,
                8,
            )
        };
    }

    let a = &c.attr;
    let sp = libc::sched_param {
        sched_priority: a.priority,
    };
    // SAFETY: C library calls on the child's own process, with
    // the caller's arguments; the child is single-threaded and holds no
    // lock, so none of them can wait for the suspended parent.
    unsafe {
        if a.flags & (SETSCHEDPARAM | SETSCHEDULER) == SETSCHEDPARAM {
            if libc::sched_setparam(0, &sp) == -1 {
                return errno();
            }
        } else if a.flags & SETSCHEDULER != 0 && libc::sched_setscheduler(0, a.policy, &sp) == -1 {
            return errno();
        }
        if a.flags & SETSID != 0 && libc::setsid() < 0 {
            return errno();
        }
        if a.flags & SETPGROUP != 0 && libc::setpgid(0, a.pgrp) != 0 {
            return errno();
        }
        if a.flags & RESETIDS != 0 {
            // As glibc: the raw calls, for this process only (the C
            // library's would broadcast to the parent's threads).
            let uid = raw::syscall0(libc::SYS_getuid);
            let gid = raw::syscall0(libc::SYS_getgid);
            for (nr, id) in [(libc::SYS_setresuid, uid), (libc::SYS_setresgid, gid)] {
                let r = raw::syscall3(nr, -1, id, -1);
                if r < 0 {
                    return -r as c_int;
                }
            }
        }
        for &action in c.actions {
            let ok = match action {
                Action::Close(fd) => {
                    // Only descriptors out of range are errors.
                    libc::close(fd) == 0 || {
                        let mut lim: libc::rlimit = std::mem::zeroed();
                        let e = errno();
                        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
                        libc::__errno_location().write(e);
                        fd >= 0 && (fd as libc::rlim_t) < lim.rlim_cur
                    }
                }
                Action::Open {
                    fd,
                    path,
                    oflag,
                    mode,
                } => {
                    libc::close(fd);
                    let got = libc::open(path, oflag | libc::O_LARGEFILE, mode);
                    got != -1 && (got == fd || (libc::dup2(got, fd) == fd && libc::close(got) == 0))
                }
                Action::Dup2(fd, new) if fd == new => {
                    // Austin Group issue 411: clears close-on-exec.
                    let fl = libc::fcntl(fd, libc::F_GETFD);
                    fl != -1 && libc::fcntl(fd, libc::F_SETFD, fl & !libc::FD_CLOEXEC) != -1
                }
                Action::Dup2(fd, new) => libc::dup2(fd, new) == new,
                Action::Chdir(path) => libc::chdir(path) == 0,
                Action::Fchdir(fd) => libc::fchdir(fd) == 0,
                Action::CloseFrom(low) => close_from(low),
                Action::Tcsetpgrp(fd) => {
                    let pgrp = if a.flags & SETPGROUP != 0 && a.pgrp != 0 {
                        a.pgrp
                    } else {
                        libc::getpgid(0)
                    };
                    libc::tcsetpgrp(fd, pgrp) == 0
                }
            };
            if !ok {
                return errno();
            }
        }

        // The mask to exec with: SETSIGMASK's (without the C library's
        // internal signals, as its `sigprocmask` would) or the parent's.
        let mask = if a.flags & SETSIGMASK != 0 {
            a.sigmask & !INTERNAL_BITS
        } else {
            c.old_mask
        } & !TRAP_BIT;
        raw::syscall4(
            libc::SYS_rt_sigprocmask,
            i64::from(libc::SIG_SETMASK),
            &mask as *const u64 as i64,
            0,
            8,
        );

        match c.exec {
            Exec::Path(path) => {
                libc::execve(path, c.argv, c.envp);
                errno()
            }
            Exec::Search(candidates) => {
                // As execvp, without its shell fallback (glibc's
                // `__execvpex`): the first error other than "not there"
                // stops; EACCES anywhere is what is reported otherwise.
                let mut eacces = false;
                let mut last = libc::ENOENT;
                for cand in candidates {
                    libc::execve(cand.as_ptr(), c.argv, c.envp);
                    last = errno();
                    match last {
                        libc::EACCES => eacces = true,
                        libc::ENOENT
                        | libc::ESTALE
                        | libc::ENOTDIR
                        | libc::ENODEV
                        | libc::ETIMEDOUT => {}
                        e => return e,
                    }
                }
                if eacces {
                    libc::EACCES
                } else {
                    last
                }
            }
            Exec::Fail(e) => e,
        }
    }
}

/// `closefrom(low)` as glibc's spawn child does it: `close_range`, or
/// where that fails (kernels before 5.9, a seccomp filter) every descriptor
/// `/proc/self/fd` lists from `low` up, until a pass finds none. Raw system
/// calls and a stack buffer: the child allocates nothing. `false` with
/// `errno` set on failure.
///
/// # Safety
/// Runs in the spawn child only (it closes descriptors).
unsafe fn close_from(low: c_int) -> bool {
    let fail = |e: i64| {
        // SAFETY: this thread's errno slot.
        unsafe { *libc::__errno_location() = -e as c_int };
        false
    };
    // SAFETY: system calls on the child's descriptors and
    // a buffer on its stack.
    unsafe {
        if raw::syscall3(
            libc::SYS_close_range,
            i64::from(low),
            i64::from(u32::MAX),
            0,
        ) == 0
        {
            return true;
        }
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
        let dir = raw::syscall4(
            libc::SYS_openat,
            i64::from(libc::AT_FDCWD),
            c"/proc/self/fd".as_ptr() as i64,
            i64::from(flags),
            0,
        );
        if dir < 0 {
            return fail(dir);
        }
        #[repr(C, align(8))]
        struct Buf([u8; 1024]);
        let mut buf = Buf([0; 1024]);
        loop {
            let mut closed = false;
            raw::syscall3(libc::SYS_lseek, dir, 0, i64::from(libc::SEEK_SET));
            loop {
                let n = raw::syscall3(
                    libc::SYS_getdents64,
                    dir,
                    buf.0.as_mut_ptr() as i64,
                    buf.0.len() as i64,
                );
                if n < 0 {
                    raw::syscall1(libc::SYS_close, dir);
                    return fail(n);
                }
                if n == 0 {
                    break;
                }
                // linux_dirent64: ino u64, off i64, reclen u16, type u8, name.
                let mut at = 0usize;
                while at + 19 < n as usize {
                    let reclen = u16::from_ne_bytes([buf.0[at + 16], buf.0[at + 17]]) as usize;
                    let name = &buf.0[at + 19..(at + reclen).min(n as usize)];
                    let mut fd: i64 = -1;
                    for &c in name.iter().take_while(|&&c| c != 0) {
                        fd = if fd != i64::MIN && c.is_ascii_digit() && fd < i64::from(i32::MAX) {
                            fd.max(0) * 10 + i64::from(c - b'0')
                        } else {
                            i64::MIN
                        };
                    }
                    if fd >= i64::from(low) && fd != dir {
                        raw::syscall1(libc::SYS_close, fd);
                        closed = true;
                    }
                    at += reclen.max(1);
                }
            }
            if !closed {
                break;
            }
        }
        raw::syscall1(libc::SYS_close, dir);
        true
    }
}

// ---- the parent

/// The candidates `execvp` tries for `file` (no slash in it) along `path`
/// (`PATH`'s value, `None` without one: the default search path), an empty
/// entry meaning the working directory; `Err(ENAMETOOLONG)` as glibc's
/// limits.
fn search_path(file: &CStr, path: Option<&CStr>) -> Result<Vec<CString>, c_int> {
    let file = file.to_bytes();
    if file.len() > 255 {
        return Err(libc::ENAMETOOLONG);
    }
    let path = path.map_or(CS_PATH, CStr::to_bytes);
    let max = path.len().min(libc::PATH_MAX as usize - 1) + 1;
    let mut out = Vec::new();
    for dir in path.split(|&b| b == b':') {
        if dir.len() >= max {
            continue;
        }
        let mut full = Vec::with_capacity(dir.len() + 1 + file.len());
        full.extend_from_slice(dir);
        if !dir.is_empty() {
            full.push(b'/');
        }
        full.extend_from_slice(file);
        // No NUL inside: both parts come from C strings.
        out.extend(CString::new(full).ok());
    }
    Ok(out)
}

/// `PATH`, read as execvp reads it (in the caller's normal context).
fn path_variable() -> Option<&'static CStr> {
    // SAFETY: a NUL-terminated name.
    let p = unsafe { libc::getenv(c"PATH".as_ptr()) };
    // SAFETY: getenv's NUL-terminated value, left in place by the call.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) })
}

/// The C library's own `name`, for arguments this module does not know.
fn next(name: &CStr) -> usize {
    // SAFETY: a NUL-terminated name; RTLD_NEXT looks past this object.
    unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) as usize }
}

type SpawnFn = unsafe extern "C" fn(
    *mut libc::pid_t,
    *const c_char,
    *const libc::posix_spawn_file_actions_t,
    *const libc::posix_spawnattr_t,
    *const *mut c_char,
    *const *mut c_char,
) -> c_int;

/// Spawns `file` with probert's child; `None` to leave the call to the C
/// library (arguments or an architecture this module does not know).
///
/// # Safety
/// As `posix_spawn(3)`.
unsafe fn spawn(
    pid: *mut libc::pid_t,
    file: *const c_char,
    search: bool,
    fa: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> Option<c_int> {
    // glibc's layouts only (musl's file actions are a list of its own).
    if !cfg!(all(target_arch = "x86_64", target_env = "gnu")) || file.is_null() || argv.is_null() {
        return None;
    }
    // SAFETY: the caller's initialised objects.
    let (actions, attr) = unsafe { (read_actions(fa)?, read_attr(attr)?) };
    let mut argc = 0usize;
    // SAFETY: argv is a NULL-terminated array (the caller's contract).
    while !unsafe { *argv.add(argc) }.is_null() {
        argc += 1;
        if argc >= c_int::MAX as usize - 1 {
            return Some(libc::E2BIG);
        }
    }
    // SAFETY: the caller's NUL-terminated name.
    let name = unsafe { CStr::from_ptr(file) };
    let candidates;
    let exec = if search && name.is_empty() {
        // As execvp: no search for an empty name.
        Exec::Fail(libc::ENOENT)
    } else if !search || name.to_bytes().contains(&b'/') {
        Exec::Path(file)
    } else {
        match search_path(name, path_variable()) {
            Ok(c) => {
                candidates = c;
                Exec::Search(&candidates)
            }
            Err(e) => Exec::Fail(e),
        }
    };

    // The child's stack: room for the C library calls it makes and for
    // probert's trap handler (which runs on it), touched only as used.
    // Its lowest page is a guard: an overflow faults instead of writing
    // into the mapping below, which is the parent's.
    let size = GUARD + (256 << 10) + ((argc * 8 + 512 + 4095) & !4095);
    // SAFETY: a fresh anonymous mapping.
    let stack = unsafe {
        raw::syscall6(
            libc::SYS_mmap,
            0,
            size as i64,
            i64::from(libc::PROT_READ | libc::PROT_WRITE),
            i64::from(
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
            ),
            -1,
            0,
        )
    };
    if stack < 0 {
        return Some(-stack as c_int);
    }
    // SAFETY: the first page of the mapping just made.
    let r = unsafe {
        raw::syscall3(
            libc::SYS_mprotect,
            stack,
            GUARD as i64,
            i64::from(libc::PROT_NONE),
        )
    };
    if r < 0 {
        // SAFETY: the mapping just made.
        unsafe { raw::syscall2(libc::SYS_munmap, stack, size as i64) };
        return Some(-r as c_int);
    }
    let mut cancel = 0;
    // SAFETY: this thread's cancellation state (restored below).
    unsafe { pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &mut cancel) };
    // Every signal blocked but SIGTRAP: no handler of the parent may run in
    // the child before it has reset them.
    let all = !TRAP_BIT;
    let mut old_mask = 0u64;
    // SAFETY: this thread's mask, 8-byte sets.
    unsafe {
        raw::syscall4(
            libc::SYS_rt_sigprocmask,
            i64::from(libc::SIG_SETMASK),
            &all as *const u64 as i64,
            &mut old_mask as *mut u64 as i64,
            8,
        )
    };

    let in_flight = InFlight::enter();
    let child = Child {
        exec,
        argv: argv.cast(),
        envp: envp.cast(),
        actions: &actions,
        attr,
        old_mask,
        err: AtomicI32::new(0),
        slot: in_flight.0,
    };
    // SAFETY: the top of the fresh mapping (page-aligned); `child` lives
    // until the call returns, which is after the child exec'd or exited.
    let ret = unsafe {
        raw::clone_vfork(
            (stack as usize + size) as *mut u8,
            child_main,
            (&child as *const Child<'_>).cast(),
        )
    };
    drop(in_flight);
    let ec = if ret > 0 {
        // Ordering: Relaxed — see `child_main`.
        let e = child.err.load(Ordering::Relaxed);
        if e > 0 {
            // It could not exec: collect it (the caller never learns its
            // pid).
            let mut status = 0;
            // SAFETY: our child.
            let _ = raw::check_retry(|| unsafe {
                raw::syscall4(libc::SYS_wait4, ret, &mut status as *mut c_int as i64, 0, 0)
            });
        }
        e
    } else {
        -ret as c_int
    };
    // SAFETY: the mapping made above, no longer used.
    unsafe { raw::syscall2(libc::SYS_munmap, stack, size as i64) };
    if ec == 0 && !pid.is_null() {
        // SAFETY: the caller's out parameter.
        unsafe { *pid = ret as libc::pid_t };
    }
    // SAFETY: this thread's mask and cancellation state, as they were.
    unsafe {
        raw::syscall4(
            libc::SYS_rt_sigprocmask,
            i64::from(libc::SIG_SETMASK),
            &old_mask as *const u64 as i64,
            0,
            8,
        );
        pthread_setcancelstate(cancel, &mut cancel);
    }
    Some(ec)
}

/// `posix_spawn(3)`, with a child that serves probes (see the module docs).
///
/// # Safety
/// As `posix_spawn(3)`.
#[no_mangle]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut libc::pid_t,
    path: *const c_char,
    fa: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { spawn_or_next(c"posix_spawn", false, pid, path, fa, attr, argv, envp) }
}

/// `posix_spawnp(3)`, with a child that serves probes (see the module
/// docs).
///
/// # Safety
/// As `posix_spawnp(3)`.
#[no_mangle]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut libc::pid_t,
    file: *const c_char,
    fa: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { spawn_or_next(c"posix_spawnp", true, pid, file, fa, attr, argv, envp) }
}

/// [`spawn`], or the C library's `name` (`posix_spawn`, or `posix_spawnp`
/// if `search`) for arguments it leaves to it.
///
/// # Safety
/// As `posix_spawn(3)`.
#[allow(clippy::too_many_arguments)]
unsafe fn spawn_or_next(
    name: &CStr,
    search: bool,
    pid: *mut libc::pid_t,
    file: *const c_char,
    fa: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    // SAFETY: the caller's contract.
    if let Some(ec) = unsafe { spawn(pid, file, search, fa, attr, argv, envp) } {
        return ec;
    }
    let f = next(name);
    if f == 0 {
        return libc::ENOSYS;
    }
    // SAFETY: the C library's function of this signature.
    let f: SpawnFn = unsafe { std::mem::transmute::<usize, SpawnFn>(f) };
    // SAFETY: the caller's arguments.
    unsafe { f(pid, file, fa, attr, argv, envp) }
}

/// `SIGINT`'s and `SIGQUIT`'s dispositions while `system` calls run
/// (ignored while any does; as glibc, restored by the last).
struct Ignoring {
    calls: usize,
    intr: libc::sigaction,
    quit: libc::sigaction,
}

static SYSTEM: Mutex<Option<Ignoring>> = Mutex::new(None);

extern "C" {
    static environ: *const *mut c_char;
    // Not in the `libc` crate.
    fn pthread_setcancelstate(state: c_int, old: *mut c_int) -> c_int;
}
/// glibc's `PTHREAD_CANCEL_DISABLE`.
const PTHREAD_CANCEL_DISABLE: c_int = 1;

/// `system(3)`: `/bin/sh -c command` spawned with probert's child (see the
/// module docs).
///
/// # Safety
/// As `system(3)`.
#[no_mangle]
pub unsafe extern "C" fn system(command: *const c_char) -> c_int {
    if command.is_null() {
        // Whether a shell is there.
        // SAFETY: a NUL-terminated command.
        return c_int::from(unsafe { system(c"exit 0".as_ptr()) } == 0);
    }
    let ign = libc::sigaction {
        sa_sigaction: libc::SIG_IGN,
        // SAFETY: an empty mask is all zeros.
        sa_mask: unsafe { std::mem::zeroed() },
        sa_flags: 0,
        sa_restorer: None,
    };
    let (intr, quit) = {
        let mut g = SYSTEM.lock().unwrap_or_else(|e| e.into_inner());
        let state = g.get_or_insert_with(|| Ignoring {
            calls: 0,
            // SAFETY: all-zero sigactions, overwritten below.
            intr: unsafe { std::mem::zeroed() },
            // SAFETY: as above.
            quit: unsafe { std::mem::zeroed() },
        });
        if state.calls == 0 {
            // SAFETY: valid sigactions (through probert's `sigaction`).
            unsafe {
                libc::sigaction(libc::SIGINT, &ign, &mut state.intr);
                libc::sigaction(libc::SIGQUIT, &ign, &mut state.quit);
            }
        }
        state.calls += 1;
        (state.intr.sa_sigaction, state.quit.sa_sigaction)
    };
    let mut omask: libc::sigset_t;
    // SAFETY: signal sets on the stack, this thread's mask.
    let mut attr: libc::posix_spawnattr_t = unsafe {
        omask = std::mem::zeroed();
        let mut chld: libc::sigset_t = std::mem::zeroed();
        libc::sigaddset(&mut chld, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &chld, &mut omask);
        let mut reset: libc::sigset_t = std::mem::zeroed();
        if intr != libc::SIG_IGN {
            libc::sigaddset(&mut reset, libc::SIGINT);
        }
        if quit != libc::SIG_IGN {
            libc::sigaddset(&mut reset, libc::SIGQUIT);
        }
        let mut attr = std::mem::zeroed();
        libc::posix_spawnattr_init(&mut attr);
        libc::posix_spawnattr_setsigmask(&mut attr, &omask);
        libc::posix_spawnattr_setsigdefault(&mut attr, &reset);
        libc::posix_spawnattr_setflags(&mut attr, (SETSIGDEF | SETSIGMASK) as _);
        attr
    };
    let argv = [c"sh".as_ptr(), c"-c".as_ptr(), command, std::ptr::null()];
    let mut pid = 0;
    // SAFETY: a valid attribute object, argument vector and environment.
    let ret = unsafe {
        posix_spawn(
            &mut pid,
            c"/bin/sh".as_ptr(),
            std::ptr::null(),
            &attr,
            argv.as_ptr().cast(),
            environ,
        )
    };
    // SAFETY: initialised above.
    unsafe { libc::posix_spawnattr_destroy(&mut attr) };
    let status = if ret == 0 {
        let mut status = 0;
        // SAFETY: our child; the raw call is not a cancellation point.
        match raw::check_retry(|| unsafe {
            raw::syscall4(
                libc::SYS_wait4,
                i64::from(pid),
                &mut status as *mut c_int as i64,
                0,
                0,
            )
        }) {
            Ok(_) => status,
            Err(_) => -1,
        }
    } else {
        // The shell could not be run.
        127 << 8
    };
    {
        let mut g = SYSTEM.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = g.as_mut() {
            state.calls -= 1;
            if state.calls == 0 {
                // SAFETY: the dispositions saved above.
                unsafe {
                    libc::sigaction(libc::SIGINT, &state.intr, std::ptr::null_mut());
                    libc::sigaction(libc::SIGQUIT, &state.quit, std::ptr::null_mut());
                }
            }
        }
    }
    // This thread's mask, whatever other calls still run (glibc's BZ 30163).
    // SAFETY: the mask saved above.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &omask, std::ptr::null_mut()) };
    status
}

/// A stream of [`popen`]'s and the shell behind it.
struct Piped {
    file: usize,
    fd: c_int,
    pid: libc::pid_t,
}

/// The streams [`popen`] opened and [`pclose`] has not closed.
static PIPED: Mutex<Vec<Piped>> = Mutex::new(Vec::new());

fn set_errno(e: c_int) {
    // SAFETY: this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// `popen(3)`: `/bin/sh -c command` spawned with probert's child (see the
/// module docs), with its standard output (`"r"`) or input (`"w"`) a pipe
/// to the stream returned; `"e"` makes the stream's descriptor
/// close-on-exec.
///
/// # Safety
/// As `popen(3)`.
#[no_mangle]
pub unsafe extern "C" fn popen(command: *const c_char, mode: *const c_char) -> *mut libc::FILE {
    if command.is_null() || mode.is_null() {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    // SAFETY: the caller's NUL-terminated mode.
    let m = unsafe { CStr::from_ptr(mode) }.to_bytes();
    let (mut read, mut write, mut cloexec) = (false, false, false);
    for &c in m {
        match c {
            b'r' => read = true,
            b'w' => write = true,
            b'e' => cloexec = true,
            _ => {
                set_errno(libc::EINVAL);
                return std::ptr::null_mut();
            }
        }
    }
    if read == write {
        set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    let mut fds = [0; 2];
    // SAFETY: a two-descriptor array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return std::ptr::null_mut();
    }
    let (ours, theirs, std_fd) = if read {
        (fds[0], fds[1], 1)
    } else {
        (fds[1], fds[0], 0)
    };
    let close_both = || {
        // SAFETY: the pipe's descriptors, ours to close.
        unsafe {
            libc::close(ours);
            libc::close(theirs);
        }
    };
    let mut piped = PIPED.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: an all-zero object, initialised by glibc below.
    let mut fa: libc::posix_spawn_file_actions_t = unsafe { std::mem::zeroed() };
    // SAFETY: glibc initialises the local object.
    unsafe { libc::posix_spawn_file_actions_init(&mut fa) };
    // POSIX: streams of earlier popen calls are closed in the child.
    for p in piped.iter().filter(|p| p.fd != std_fd) {
        // SAFETY: as above.
        unsafe { libc::posix_spawn_file_actions_addclose(&mut fa, p.fd) };
    }
    // dup2 onto the standard descriptor clears close-on-exec, also when the
    // pipe end already is that descriptor.
    // SAFETY: as above.
    unsafe { libc::posix_spawn_file_actions_adddup2(&mut fa, theirs, std_fd) };
    let argv = [c"sh".as_ptr(), c"-c".as_ptr(), command, std::ptr::null()];
    let mut pid = 0;
    // SAFETY: valid actions, argument vector and environment.
    let ret = unsafe {
        posix_spawn(
            &mut pid,
            c"/bin/sh".as_ptr(),
            &fa,
            std::ptr::null(),
            argv.as_ptr().cast(),
            environ,
        )
    };
    // SAFETY: initialised above.
    unsafe { libc::posix_spawn_file_actions_destroy(&mut fa) };
    if ret != 0 {
        close_both();
        set_errno(ret);
        return std::ptr::null_mut();
    }
    // SAFETY: the child's end, no longer ours; our end, ours.
    let file = unsafe {
        libc::close(theirs);
        if !cloexec {
            libc::fcntl(ours, libc::F_SETFD, 0);
        }
        libc::fdopen(ours, if read { c"r".as_ptr() } else { c"w".as_ptr() })
    };
    if file.is_null() {
        let e = errno();
        // SAFETY: our end, and the child we spawned (it sees end of file).
        unsafe {
            libc::close(ours);
            let mut status = 0;
            let _ = raw::check_retry(|| {
                raw::syscall4(
                    libc::SYS_wait4,
                    i64::from(pid),
                    &mut status as *mut c_int as i64,
                    0,
                    0,
                )
            });
        }
        set_errno(e);
        return std::ptr::null_mut();
    }
    piped.push(Piped {
        file: file as usize,
        fd: ours,
        pid,
    });
    file
}

/// `pclose(3)`: closes a stream of [`popen`]'s and waits for its shell; a
/// stream of the C library's `popen` goes to its `pclose`.
///
/// # Safety
/// As `pclose(3)`.
#[no_mangle]
pub unsafe extern "C" fn pclose(file: *mut libc::FILE) -> c_int {
    let found = {
        let mut piped = PIPED.lock().unwrap_or_else(|e| e.into_inner());
        let at = piped.iter().position(|p| p.file == file as usize);
        at.map(|i| piped.swap_remove(i))
    };
    let Some(p) = found else {
        let f = next(c"pclose");
        if f == 0 {
            set_errno(libc::ENOSYS);
            return -1;
        }
        type PcloseFn = unsafe extern "C" fn(*mut libc::FILE) -> c_int;
        // SAFETY: the C library's `pclose`, with the caller's stream.
        return unsafe { std::mem::transmute::<usize, PcloseFn>(f)(file) };
    };
    // SAFETY: the caller's stream, ours.
    unsafe { libc::fclose(file) };
    let mut status = 0;
    // SAFETY: our child; the raw call is not a cancellation point.
    match raw::check_retry(|| unsafe {
        raw::syscall4(
            libc::SYS_wait4,
            i64::from(p.pid),
            &mut status as *mut c_int as i64,
            0,
            0,
        )
    }) {
        Ok(_) => status,
        Err(e) => {
            set_errno(e);
            -1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_file_actions_read_back_as_added() {
        // SAFETY: glibc's own functions on a local object.
        unsafe {
            let mut fa: libc::posix_spawn_file_actions_t = std::mem::zeroed();
            libc::posix_spawn_file_actions_init(&mut fa);
            libc::posix_spawn_file_actions_addclose(&mut fa, 3);
            libc::posix_spawn_file_actions_adddup2(&mut fa, 1, 2);
            libc::posix_spawn_file_actions_addopen(
                &mut fa,
                5,
                c"/x".as_ptr(),
                libc::O_WRONLY,
                0o640,
            );
            libc::posix_spawn_file_actions_addchdir_np(&mut fa, c"/tmp".as_ptr());
            libc::posix_spawn_file_actions_addfchdir_np(&mut fa, 7);
            libc::posix_spawn_file_actions_addclosefrom_np(&mut fa, 9);
            libc::posix_spawn_file_actions_addtcsetpgrp_np(&mut fa, 10);
            let got = read_actions(&fa).expect("every kind known");
            assert_eq!(got.len(), 7);
            assert_eq!(got[0], Action::Close(3));
            assert_eq!(got[1], Action::Dup2(1, 2));
            match got[2] {
                Action::Open {
                    fd,
                    path,
                    oflag,
                    mode,
                } => {
                    assert_eq!((fd, oflag, mode), (5, libc::O_WRONLY, 0o640));
                    assert_eq!(CStr::from_ptr(path), c"/x");
                }
                other => panic!("{other:?}"),
            }
            match got[3] {
                Action::Chdir(p) => assert_eq!(CStr::from_ptr(p), c"/tmp"),
                other => panic!("{other:?}"),
            }
            assert_eq!(
                &got[4..],
                &[
                    Action::Fchdir(7),
                    Action::CloseFrom(9),
                    Action::Tcsetpgrp(10)
                ]
            );
            libc::posix_spawn_file_actions_destroy(&mut fa);
            assert_eq!(read_actions(std::ptr::null()), Some(Vec::new()));
        }
    }

    #[test]
    fn glibc_attributes_read_back_as_set() {
        // SAFETY: glibc's own functions on local objects.
        unsafe {
            let mut at: libc::posix_spawnattr_t = std::mem::zeroed();
            libc::posix_spawnattr_init(&mut at);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigaddset(&mut set, libc::SIGUSR1);
            libc::posix_spawnattr_setsigdefault(&mut at, &set);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            libc::posix_spawnattr_setsigmask(&mut at, &set);
            libc::posix_spawnattr_setpgroup(&mut at, 77);
            libc::posix_spawnattr_setschedpolicy(&mut at, libc::SCHED_FIFO);
            libc::posix_spawnattr_setschedparam(&mut at, &libc::sched_param { sched_priority: 3 });
            libc::posix_spawnattr_setflags(&mut at, (SETPGROUP | SETSIGDEF | SETSID) as _);
            let a = read_attr(&at).expect("known flags");
            assert_eq!(a.flags, SETPGROUP | SETSIGDEF | SETSID);
            assert_eq!(a.pgrp, 77);
            assert_eq!(a.sigdef, 1 << (libc::SIGUSR1 - 1));
            assert_eq!(
                a.sigmask,
                (1 << (libc::SIGUSR1 - 1)) | (1 << (libc::SIGUSR2 - 1))
            );
            assert_eq!((a.policy, a.priority), (libc::SCHED_FIFO, 3));
            // A flag of a later C library goes to the C library.
            at_flags(&mut at, 0x100);
            assert_eq!(read_attr(&at), None);
            assert_eq!(read_attr(std::ptr::null()), Some(Attr::default()));
        }
    }

    /// Sets raw flags (glibc's setter refuses unknown ones).
    unsafe fn at_flags(at: &mut libc::posix_spawnattr_t, flags: i16) {
        // SAFETY: the flags field at offset 0.
        unsafe {
            (at as *mut libc::posix_spawnattr_t)
                .cast::<i16>()
                .write(flags)
        };
    }

    #[test]
    fn unknown_action_kinds_go_to_the_c_library() {
        // SAFETY: a glibc object whose one action's tag is
        // changed to one glibc does not have yet.
        unsafe {
            let mut fa: libc::posix_spawn_file_actions_t = std::mem::zeroed();
            libc::posix_spawn_file_actions_init(&mut fa);
            libc::posix_spawn_file_actions_addclose(&mut fa, 3);
            let list = (&fa as *const libc::posix_spawn_file_actions_t)
                .cast::<u8>()
                .add(8)
                .cast::<*mut c_int>()
                .read();
            list.write(99);
            assert_eq!(read_actions(&fa), None);
            list.write(DO_CLOSE);
            libc::posix_spawn_file_actions_destroy(&mut fa);
        }
    }

    #[test]
    fn the_search_path_is_execvps() {
        let got = |path: Option<&CStr>, file: &CStr| {
            search_path(file, path).map(|v| {
                v.into_iter()
                    .map(|c| c.into_string().unwrap())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            got(Some(c"/a:/b/c"), c"sh"),
            Ok(vec!["/a/sh".into(), "/b/c/sh".into()])
        );
        assert_eq!(
            got(Some(c"/a::"), c"sh"),
            Ok(vec!["/a/sh".into(), "sh".into(), "sh".into()])
        );
        assert_eq!(
            got(None, c"ls"),
            Ok(vec!["/bin/ls".into(), "/usr/bin/ls".into()])
        );
        let long = CString::new(vec![b'x'; 256]).unwrap();
        assert_eq!(got(Some(c"/a"), &long), Err(libc::ENAMETOOLONG));
    }
}
