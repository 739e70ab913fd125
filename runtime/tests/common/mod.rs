//! Shared test support.
//!
//! Tests that patch code or install signal handlers run in their own process:
//! [`isolated!`] re-executes the test binary, filtered to that one test, and
//! fails if the child fails or dies (a crash is reported, not hidden), under
//! any test runner.
#![allow(dead_code, unsafe_code, clippy::undocumented_unsafe_blocks)]

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

const CHILD_ENV: &str = "PROBERT_TEST_CHILD";

/// Runs `body` in a fresh process running only the test `name`.
pub fn run_isolated(name: &str, body: impl FnOnce()) {
    if std::env::var_os(CHILD_ENV).as_deref() == Some(name.as_ref()) {
        body();
        return;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let out = Command::new(exe)
        .args([
            name,
            "--exact",
            "--include-ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD_ENV, name)
        .output()
        .expect("spawn the test child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "isolated test `{name}` failed: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        describe(out.status)
    );
    assert!(
        stdout.contains("1 passed"),
        "isolated test `{name}` ran no test:\n{stdout}"
    );
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(sig) => format!("killed by signal {sig}"),
        None => format!("exit status {:?}", status.code()),
    }
}

/// `isolated!(name, { body })` defines a `#[test]` that runs in its own
/// process.
#[macro_export]
macro_rules! isolated {
    ($(#[$m:meta])* $name:ident, $body:block) => {
        $(#[$m])*
        #[test]
        fn $name() {
            $crate::common::run_isolated(stringify!($name), || $body);
        }
    };
}

/// Waits for the forked child `pid` and fails unless it exited with 0.
pub fn expect_child_success(pid: libc::pid_t) {
    let mut status = 0;
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x}"
    );
}

/// A handler that counts hits in the `AtomicU64` its user data points at.
pub unsafe extern "C" fn count(hit: *mut probert::Hit) -> u32 {
    // SAFETY: tests pass a `&'static AtomicU64` as user data.
    let c = unsafe { &*((*hit).user_data as *const AtomicU64) };
    c.fetch_add(1, Ordering::Relaxed);
    probert::Action::Continue as u32
}

/// User data for [`count`].
pub fn counter(c: &'static AtomicU64) -> *mut std::ffi::c_void {
    c as *const AtomicU64 as *mut std::ffi::c_void
}

/// Reads `n` code bytes.
pub fn bytes(addr: usize, n: usize) -> Vec<u8> {
    // SAFETY: tests read their own code.
    (0..n)
        .map(|i| unsafe { std::ptr::read_volatile((addr + i) as *const u8) })
        .collect()
}

/// Whether any mapping of this process is writable and executable at once.
pub fn has_wx_mapping() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    maps.lines()
        .find(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|p| p.starts_with("rwx"))
        })
        .map(str::to_owned)
}

/// Makes system call `nr` fail with `ENOSYS` in every thread of this
/// process, as a seccomp sandbox (or an older kernel) does.
pub fn forbid_syscall(nr: libc::c_long) {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let ins = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let filter = [
        ins(LD_W_ABS, 0, 0, 4),
        ins(JEQ_K, 1, 0, 0xc000_003e), // AUDIT_ARCH_X86_64
        ins(RET_K, 0, 0, 0x7fff_0000), // allow
        ins(LD_W_ABS, 0, 0, 0),
        ins(JEQ_K, 0, 1, nr as u32),
        ins(RET_K, 0, 0, 0x0005_0000 | libc::ENOSYS as u32), // errno
        ins(RET_K, 0, 0, 0x7fff_0000),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        // SECCOMP_SET_MODE_FILTER with SECCOMP_FILTER_FLAG_TSYNC.
        assert_eq!(libc::syscall(libc::SYS_seccomp, 1, 1, &prog), 0);
    }
}
