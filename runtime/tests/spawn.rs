//! Children that share memory (issue 13, item 3): `posix_spawn`,
//! `posix_spawnp`, `system` and Rust's `Command` with the functions their
//! child calls probed on the trap path — the C library's `execve`, `dup2`
//! and `close`. The child serves the probes (its hits count) and execs; the
//! C library's own spawn, called directly, shows the child it would lose.
//! Each test runs in its own process.
#![allow(unsafe_code)]
// Test code calls libc and probert's unsafe attach on purpose; the safety
// premise of every such call is the test itself.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use std::ffi::{c_char, CStr};
use std::sync::atomic::{AtomicU64, Ordering};

use common::{count, counter};
use probert::{AttachOptions, Mode};

static EXECVE: AtomicU64 = AtomicU64::new(0);
static DUP2: AtomicU64 = AtomicU64::new(0);
static CLOSE: AtomicU64 = AtomicU64::new(0);

fn libc_fn(name: &str) -> usize {
    probert::symbol_addr(Some("libc.so.6"), name).expect(name)
}

/// Probes `execve`, `dup2` and `close` on the trap path.
fn probe_the_spawn_path() -> Vec<probert::ConsumerId> {
    probert::init().unwrap();
    [("execve", &EXECVE), ("dup2", &DUP2), ("close", &CLOSE)]
        .into_iter()
        .map(|(name, hits)| {
            let addr = libc_fn(name);
            let id =
                unsafe { probert::attach_ex(addr, count, counter(hits), Mode::Trap) }.expect(name);
            assert_eq!(probert::probe_mode(addr), Ok(Mode::Trap), "{name}");
            id
        })
        .collect()
}

fn detach_all(ids: Vec<probert::ConsumerId>) {
    for id in ids {
        probert::detach(id).unwrap();
    }
}

fn wait(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    status
}

fn exited(status: i32, code: i32) {
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == code,
        "status {status:#x}: {}",
        if libc::WIFSIGNALED(status) {
            format!("killed by signal {}", libc::WTERMSIG(status))
        } else {
            format!("exit {}", libc::WEXITSTATUS(status))
        }
    );
}

type SpawnFn = unsafe extern "C" fn(
    *mut libc::pid_t,
    *const c_char,
    *const libc::posix_spawn_file_actions_t,
    *const libc::posix_spawnattr_t,
    *const *mut c_char,
    *const *mut c_char,
) -> i32;

extern "C" {
    static environ: *const *mut c_char;
}

/// Spawns `argv` from `file` through `spawn` with the file actions `add`
/// adds; the return code and the pid.
fn spawn_with(
    spawn: SpawnFn,
    file: &CStr,
    argv: &[&CStr],
    add: impl FnOnce(&mut libc::posix_spawn_file_actions_t),
) -> (i32, libc::pid_t) {
    let argv: Vec<*const c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    unsafe {
        let mut fa: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        libc::posix_spawn_file_actions_init(&mut fa);
        add(&mut fa);
        let mut pid = 0;
        let rc = spawn(
            &mut pid,
            file.as_ptr(),
            &fa,
            std::ptr::null(),
            argv.as_ptr().cast(),
            environ,
        );
        libc::posix_spawn_file_actions_destroy(&mut fa);
        (rc, pid)
    }
}

/// `sh -c script` through `spawn`, with a `dup2` and a `close` action.
fn spawn_sh(spawn: SpawnFn, file: &CStr, script: &CStr) -> (i32, libc::pid_t) {
    spawn_with(spawn, file, &[c"sh", c"-c", script], |fa| unsafe {
        libc::posix_spawn_file_actions_adddup2(fa, 2, 9);
        libc::posix_spawn_file_actions_addclose(fa, 9);
    })
}

isolated!(the_c_librarys_own_spawn_child_dies_on_a_trap_site, {
    // The hazard these tests guard against: glibc's child resets probert's
    // handler and runs `dup2`, `close` and `execve`.
    let ids = probe_the_spawn_path();
    let glibc: SpawnFn = unsafe {
        std::mem::transmute::<*mut libc::c_void, SpawnFn>(libc::dlsym(
            libc::RTLD_NEXT,
            c"posix_spawn".as_ptr(),
        ))
    };
    assert_ne!(
        glibc as usize,
        libc::posix_spawn as *const () as usize,
        "libc's, not probert's"
    );
    let (rc, pid) = spawn_sh(glibc, c"/bin/sh", c"exit 7");
    assert_eq!(rc, 0);
    let status = wait(pid);
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGTRAP,
        "status {status:#x}"
    );
    detach_all(ids);
});

isolated!(posix_spawn_runs_a_child_through_trap_served_probes, {
    let ids = probe_the_spawn_path();
    let before = (DUP2.load(Ordering::SeqCst), EXECVE.load(Ordering::SeqCst));
    let (rc, pid) = spawn_sh(libc::posix_spawn, c"/bin/sh", c"exit 7");
    assert_eq!(rc, 0);
    exited(wait(pid), 7);
    // The child's calls were hits: one dup2 action, one execve.
    assert_eq!(DUP2.load(Ordering::SeqCst) - before.0, 1);
    assert_eq!(EXECVE.load(Ordering::SeqCst) - before.1, 1);
    assert!(CLOSE.load(Ordering::SeqCst) >= 1);

    // An action that fails is reported, and its child collected.
    let (rc, _) = spawn_with(libc::posix_spawn, c"/bin/true", &[c"true"], |fa| unsafe {
        libc::posix_spawn_file_actions_addopen(
            fa,
            5,
            c"/nonexistent/dir/file".as_ptr(),
            libc::O_RDONLY,
            0,
        );
    });
    assert_eq!(rc, libc::ENOENT);
    unsafe {
        assert_eq!(libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG), -1);
        assert_eq!(*libc::__errno_location(), libc::ECHILD, "no zombie left");
    }
    // A path that is not there.
    let (rc, _) = spawn_sh(libc::posix_spawn, c"/nonexistent/sh", c"exit 0");
    assert_eq!(rc, libc::ENOENT);
    detach_all(ids);
});

isolated!(posix_spawnp_searches_the_path_through_trap_served_probes, {
    let ids = probe_the_spawn_path();
    let before = EXECVE.load(Ordering::SeqCst);
    std::env::set_var("PATH", "/nonexistent:/usr/bin:/bin");
    let (rc, pid) = spawn_sh(libc::posix_spawnp, c"sh", c"exit 4");
    assert_eq!(rc, 0);
    exited(wait(pid), 4);
    // One execve per candidate tried: /nonexistent/sh, then /usr/bin/sh.
    assert_eq!(EXECVE.load(Ordering::SeqCst) - before, 2);
    let (rc, _) = spawn_sh(libc::posix_spawnp, c"no-such-program-here", c"");
    assert_eq!(rc, libc::ENOENT);
    // No search for an empty name, as execvp.
    let (rc, _) = spawn_sh(libc::posix_spawnp, c"", c"");
    assert_eq!(rc, libc::ENOENT);
    detach_all(ids);
});

isolated!(system_runs_the_shell_through_trap_served_probes, {
    let ids = probe_the_spawn_path();
    let before = EXECVE.load(Ordering::SeqCst);
    let status = unsafe { libc::system(c"exit 3".as_ptr()) };
    exited(status, 3);
    assert_eq!(EXECVE.load(Ordering::SeqCst) - before, 1);
    assert_ne!(
        unsafe { libc::system(std::ptr::null()) },
        0,
        "a shell is there"
    );
    // SIGINT is ignored while it waits, and restored after (to what the
    // test process inherited: a shell's background job starts with it
    // ignored).
    let mut was: libc::sigaction = unsafe { std::mem::zeroed() };
    unsafe { libc::sigaction(libc::SIGINT, std::ptr::null(), &mut was) };
    let out = unsafe { libc::system(c"kill -INT $PPID; exit 0".as_ptr()) };
    exited(out, 0);
    let mut now: libc::sigaction = unsafe { std::mem::zeroed() };
    unsafe { libc::sigaction(libc::SIGINT, std::ptr::null(), &mut now) };
    assert_eq!(now.sa_sigaction, was.sa_sigaction);
    detach_all(ids);
});

isolated!(rust_commands_run_through_trap_served_probes, {
    let ids = probe_the_spawn_path();
    let before = EXECVE.load(Ordering::SeqCst);
    let out = std::process::Command::new("/bin/sh")
        .args(["-c", "echo out; echo err >&2; exit 5"])
        .current_dir("/")
        .output()
        .expect("spawn");
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert!(EXECVE.load(Ordering::SeqCst) > before);
    detach_all(ids);
});

/// A function that spawns, to be return-probed.
#[inline(never)]
extern "C" fn spawn_from_inside() -> i32 {
    let (rc, pid) = spawn_sh(libc::posix_spawn, c"/bin/sh", c"exit 0");
    assert_eq!(rc, 0);
    std::hint::black_box(wait(pid))
}

static RETURNS: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" fn count_return(_: *mut probert::Hit) -> u32 {
    RETURNS.fetch_add(1, Ordering::Relaxed);
    probert::Action::Continue as u32
}

isolated!(
    a_return_probed_execve_in_the_child_leaves_the_parent_s_returns_paired,
    {
        probert::init().unwrap();
        let opts = |mode| AttachOptions {
            mode,
            on_return: Some(count_return),
        };
        let execve = unsafe {
            probert::attach_with(libc_fn("execve"), count, counter(&EXECVE), opts(Mode::Trap))
        }
        .unwrap();
        let dup2 = unsafe {
            probert::attach_with(libc_fn("dup2"), count, counter(&DUP2), opts(Mode::Auto))
        }
        .unwrap();
        // On the main thread and on another (whose stack is a mapping like the
        // child's, so frames left by the child would look like its own).
        let spawns = move |from: u64| {
            for round in from..from + 20 {
                let (rc, pid) = spawn_sh(libc::posix_spawn, c"/bin/sh", c"exit 0");
                assert_eq!(rc, 0);
                exited(wait(pid), 0);
                // The child's dup2 returned, its execve did not; neither left a
                // frame on this thread's shadow stack.
                let r = RETURNS.load(Ordering::SeqCst);
                assert_eq!(unsafe { libc::dup2(2, 9) }, 9);
                unsafe { libc::close(9) };
                assert_eq!(RETURNS.load(Ordering::SeqCst), r + 1, "round {round}");
                let e = probert::stats(execve).unwrap();
                assert_eq!((e.hits, e.returns, e.abandoned), (round, 0, round));
                let d = probert::stats(dup2).unwrap();
                assert_eq!((d.hits, d.returns, d.abandoned), (2 * round, 2 * round, 0));
            }
        };
        spawns(1);
        std::thread::spawn(move || spawns(21)).join().unwrap();

        // A spawn from inside a function with a return probe (Lua's
        // `os.execute` calling `system`): its return is paired.
        static OUTER: AtomicU64 = AtomicU64::new(0);
        let outer = unsafe {
            probert::attach_with(
                spawn_from_inside as *const () as usize,
                count,
                counter(&OUTER),
                opts(Mode::Auto),
            )
        }
        .unwrap();
        for n in 1..=10u64 {
            let r = RETURNS.load(Ordering::SeqCst);
            exited(spawn_from_inside(), 0);
            // Its own return and the child's dup2's.
            assert_eq!(RETURNS.load(Ordering::SeqCst), r + 2, "spawn {n}");
            let o = probert::stats(outer).unwrap();
            assert_eq!((o.hits, o.returns, o.abandoned), (n, n, 0));
        }
        // The same on a thread whose stack lies just below a hole that the
        // child's stack then takes: the child's stack pointers are above the
        // parent's, near enough to look like the same stack.
        let region = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8 << 20,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(region, libc::MAP_FAILED);
        let region = region as usize;
        let body: Box<dyn FnOnce()> = Box::new(move || {
            // The upper half goes: the next mapping of its size lands there.
            assert_eq!(
                unsafe { libc::munmap((region + (4 << 20)) as *mut _, 4 << 20) },
                0
            );
            for n in 11..=20u64 {
                let r = RETURNS.load(Ordering::SeqCst);
                exited(spawn_from_inside(), 0);
                assert_eq!(RETURNS.load(Ordering::SeqCst), r + 2, "spawn {n}");
                let o = probert::stats(outer).unwrap();
                assert_eq!((o.hits, o.returns, o.abandoned), (n, n, 0));
            }
        });
        extern "C" fn run(arg: *mut libc::c_void) -> *mut libc::c_void {
            let body = unsafe { Box::from_raw(arg.cast::<Box<dyn FnOnce()>>()) };
            body();
            std::ptr::null_mut()
        }
        unsafe {
            let mut attr: libc::pthread_attr_t = std::mem::zeroed();
            assert_eq!(libc::pthread_attr_init(&mut attr), 0);
            assert_eq!(
                libc::pthread_attr_setstack(&mut attr, region as *mut _, 4 << 20),
                0
            );
            let mut t: libc::pthread_t = 0;
            let arg = Box::into_raw(Box::new(body)).cast();
            assert_eq!(libc::pthread_create(&mut t, &attr, run, arg), 0);
            assert_eq!(libc::pthread_join(t, std::ptr::null_mut()), 0);
        }
        probert::detach(outer).unwrap();
        probert::detach(execve).unwrap();
        probert::detach(dup2).unwrap();
    }
);

isolated!(spawns_while_another_thread_attaches_and_detaches, {
    // Thread scans wait for a child in flight: it shares our memory but is
    // not one of our threads.
    probert::init().unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) || n < 20 {
                for name in ["dup2", "close", "execve"] {
                    for mode in [Mode::Auto, Mode::Trap] {
                        if let Ok(id) = unsafe {
                            probert::attach_ex(libc_fn(name), count, counter(&CLOSE), mode)
                        } {
                            probert::detach(id).unwrap();
                        }
                    }
                }
                n += 1;
            }
        });
        for _ in 0..100 {
            let (rc, pid) = spawn_sh(libc::posix_spawn, c"/bin/sh", c"exit 0");
            assert_eq!(rc, 0);
            exited(wait(pid), 0);
        }
        stop.store(true, Ordering::SeqCst);
    });
});

isolated!(a_vfork_child_runs_trap_served_probes, {
    // A program's own vfork: its child inherits probert's handler.
    let ids = probe_the_spawn_path();
    let before = EXECVE.load(Ordering::SeqCst);
    let argv = [
        c"sh".as_ptr(),
        c"-c".as_ptr(),
        c"exit 6".as_ptr(),
        std::ptr::null(),
    ];
    #[allow(deprecated)]
    let pid = unsafe { libc::vfork() };
    if pid == 0 {
        unsafe {
            libc::execve(c"/bin/sh".as_ptr(), argv.as_ptr(), environ.cast());
            libc::_exit(127);
        }
    }
    assert!(pid > 0);
    exited(wait(pid), 6);
    assert_eq!(EXECVE.load(Ordering::SeqCst) - before, 1);
    detach_all(ids);
});

isolated!(popen_reads_and_writes_through_trap_served_probes, {
    use std::io::Read;
    let ids = probe_the_spawn_path();
    let before = EXECVE.load(Ordering::SeqCst);
    unsafe {
        let r = libc::popen(c"echo out; exit 2".as_ptr(), c"r".as_ptr());
        assert!(!r.is_null());
        let mut buf = [0u8; 16];
        let n = libc::fread(buf.as_mut_ptr().cast(), 1, buf.len(), r);
        assert_eq!(&buf[..n], b"out\n");
        exited(libc::pclose(r), 2);

        // A writer.
        let path = std::env::temp_dir().join(format!("probert-popen-{}", std::process::id()));
        let cmd = std::ffi::CString::new(format!("cat > {}", path.display())).unwrap();
        let w = libc::popen(cmd.as_ptr(), c"w".as_ptr());
        assert!(!w.is_null());
        assert_eq!(
            libc::fcntl(libc::fileno(w), libc::F_GETFD) & libc::FD_CLOEXEC,
            0
        );
        assert!(libc::fputs(c"written\n".as_ptr(), w) >= 0);
        exited(libc::pclose(w), 0);
        let mut got = String::new();
        std::fs::File::open(&path)
            .unwrap()
            .read_to_string(&mut got)
            .unwrap();
        assert_eq!(got, "written\n");
        std::fs::remove_file(&path).unwrap();

        // A later shell does not inherit an earlier stream (POSIX), even one
        // without close-on-exec: the earlier `cat` would never see the end
        // of its input otherwise.
        let held = libc::popen(c"cat".as_ptr(), c"w".as_ptr());
        assert!(!held.is_null());
        let fd = libc::fileno(held);
        let probe = std::ffi::CString::new(format!(
            "[ -e /proc/$$/fd/{fd} ] && echo inherited || echo closed"
        ))
        .unwrap();
        let r = libc::popen(probe.as_ptr(), c"re".as_ptr());
        assert!(!r.is_null());
        assert_eq!(
            libc::fcntl(libc::fileno(r), libc::F_GETFD) & libc::FD_CLOEXEC,
            libc::FD_CLOEXEC
        );
        let n = libc::fread(buf.as_mut_ptr().cast(), 1, buf.len(), r);
        assert_eq!(&buf[..n], b"closed\n");
        exited(libc::pclose(r), 0);
        exited(libc::pclose(held), 0);

        // Bad modes.
        for mode in [c"", c"rw", c"x", c"re+"] {
            *libc::__errno_location() = 0;
            assert!(libc::popen(c"true".as_ptr(), mode.as_ptr()).is_null());
            assert_eq!(*libc::__errno_location(), libc::EINVAL, "{mode:?}");
        }
    }
    // One execve per shell.
    assert_eq!(EXECVE.load(Ordering::SeqCst) - before, 4);
    detach_all(ids);
});

isolated!(closefrom_without_close_range_closes_through_proc_self_fd, {
    common::forbid_syscall(libc::SYS_close_range);
    let ids = probe_the_spawn_path();
    for fd in [40, 41, 300] {
        assert_eq!(unsafe { libc::dup2(2, fd) }, fd);
    }
    let script = c"[ -e /proc/$$/fd/40 ] || exit 1; [ -e /proc/$$/fd/41 ] && exit 2; [ -e /proc/$$/fd/300 ] && exit 3; exit 0";
    let (rc, pid) = spawn_with(
        libc::posix_spawn,
        c"/bin/sh",
        &[c"sh", c"-c", script],
        |fa| unsafe {
            libc::posix_spawn_file_actions_addclosefrom_np(fa, 41);
        },
    );
    assert_eq!(rc, 0);
    exited(wait(pid), 0);
    detach_all(ids);
});

std::arch::global_asm!(
    ".text",
    ".p2align 4",
    ".globl sp_two",
    ".type sp_two,@function",
    "sp_two:",
    "push rbp",
    "mov rbp, rsp",
    "lea rax, [rdi + 2]",
    "pop rbp",
    "ret",
    ".size sp_two, .-sp_two",
);

extern "C" {
    fn sp_two(x: u64) -> u64;
}

/// A child blocked in a file action (opening a FIFO nobody writes yet),
/// while fast multi-instruction sites come and go: their thread scans see
/// the child through procfs and finish.
fn fast_probes_while_a_child_blocks(check: impl Fn()) {
    let fifo = std::env::temp_dir().join(format!("probert-fifo-{}", std::process::id()));
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let spawner = {
        let path = path.clone();
        std::thread::spawn(move || {
            let (rc, pid) = spawn_with(libc::posix_spawn, c"/bin/true", &[c"true"], |fa| unsafe {
                libc::posix_spawn_file_actions_addopen(fa, 0, path.as_ptr(), libc::O_RDONLY, 0);
            });
            assert_eq!(rc, 0);
            pid
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    check();
    // Let the child go: a writer opens the FIFO.
    let w = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY) };
    assert!(w >= 0);
    let pid = spawner.join().unwrap();
    unsafe { libc::close(w) };
    exited(wait(pid), 0);
    std::fs::remove_file(&fifo).unwrap();
}

fn fast_site_comes_and_goes() {
    static HITS: AtomicU64 = AtomicU64::new(0);
    for _ in 0..3 {
        let id = unsafe {
            probert::attach_ex(
                sp_two as *const () as usize,
                count,
                counter(&HITS),
                Mode::Fast,
            )
        }
        .expect("a fast site (its scan finished)");
        assert_eq!(unsafe { sp_two(1) }, 3);
        probert::detach(id).expect("detach (its scan finished)");
    }
    assert_eq!(HITS.load(Ordering::SeqCst), 3);
}

isolated!(scans_finish_while_a_spawn_child_blocks, {
    probert::init().unwrap();
    fast_probes_while_a_child_blocks(fast_site_comes_and_goes);
});

isolated!(fast_sites_work_in_a_fork_taken_during_a_spawn, {
    probert::init().unwrap();
    fast_probes_while_a_child_blocks(|| {
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // The spawning thread is not here: nothing to wait for.
            let ok = std::panic::catch_unwind(fast_site_comes_and_goes).is_ok();
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        exited(wait(pid), 0);
    });
});
