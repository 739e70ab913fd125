//! The threads of this process, listed through one cached `/proc/self/task`
//! directory descriptor.
//!
//! A thread scan and the signal barrier must reach every thread, so a
//! listing that silently comes back short is a hazard: a scan that does not
//! know of a thread cannot see it inside a stub. Opening `/proc/self/task`
//! anew for every listing fails exactly when a host runs at its descriptor
//! limit (`EMFILE`), and such a failure used to read as "no threads". So:
//!
//! - the directory is opened once (`O_DIRECTORY | O_CLOEXEC`) and re-read
//!   with `lseek(0)` + `getdents64` (raw system calls), so a listing needs no
//!   new descriptor;
//! - before each use the cached descriptor is checked to still be ours, as
//!   `sys::code` checks its `/proc/self/mem` descriptor: opened by this
//!   process (a forked child reopens; `/proc/self` named the parent), the
//!   same file (`st_dev`/`st_ino`: a host that closes every descriptor and
//!   opens another file on the number does not get it read as a directory),
//!   and still close-on-exec (`dup2` onto the number clears the flag: the
//!   number would then share a file offset with the host's own descriptor);
//!   otherwise it is forgotten (never closed: the number is not ours) and
//!   reopened;
//! - every listing must contain the calling thread; one that does not is
//!   not this process's (or was cut short) and is refused.
//!
//! [`list_tids`] answers `None` when no complete listing can be had (no
//! procfs, or the descriptor was lost and cannot be reopened at the limit):
//! callers then say "not quiescent" and keep memory retired. The
//! descriptor stays open for the life of the process (one of the host's
//! descriptors, as `/proc/self/mem` is another); with quiescent points it is
//! never opened.
//!
//! # Safety
//!
//! Raw `openat`, `lseek`, `getdents64`, `fcntl`, `newfstatat` and `close` on
//! a descriptor this module opened (closed only while it is verified to be
//! ours), into buffers it owns. The lock's guard is kept in a static between
//! the `pthread_atfork` handlers of one `fork`, which run on one thread.
#![allow(unsafe_code)]

use std::sync::{Mutex, MutexGuard};

use super::raw;

/// The cached descriptor and who it belongs to. Normal context only; the
/// mutex also serialises listings, which share the descriptor's offset.
#[derive(Debug)]
struct Cached {
    fd: i32,
    pid: i32,
    dev: u64,
    ino: u64,
}

static TASK_DIR: Mutex<Option<Cached>> = Mutex::new(None);

/// Bytes of directory entries read per `getdents64`.
const DENTS_BUF: usize = 8192;

/// Opens the cached descriptor now if it is not open yet, so that later
/// listings work at the descriptor limit. `false` if `/proc/self/task`
/// cannot be opened. Normal context only.
pub fn open() -> bool {
    let mut cached = lock();
    verified(&mut cached).is_some()
}

/// The thread ids of this process, in no particular order, or `None` if a
/// complete listing cannot be had (see the module docs). Normal context only.
pub fn list_tids() -> Option<Vec<i32>> {
    let mut cached = lock();
    let fd = verified(&mut cached)?;
    let me = super::threads::gettid();
    let tids = read_dir(fd)?;
    if tids.contains(&me) {
        return Some(tids);
    }
    // Not our task directory after all (a pid reused in a new pid
    // namespace, a descriptor swapped under us): forget it, try once anew.
    *cached = None;
    let fd = verified(&mut cached)?;
    read_dir(fd).filter(|t| t.contains(&me))
}

/// Between the prepare and the parent/child handlers of one `fork`: the
/// lock, held by the forking thread, so no listing is half done in the
/// child.
static mut FORK_GUARD: Option<MutexGuard<'static, Option<Cached>>> = None;

/// `pthread_atfork` prepare handler (called by `threads::fork_prepare`).
pub fn fork_prepare() {
    let g = lock();
    // SAFETY: the handlers of one fork run on one thread, in order, and
    // nothing else touches FORK_GUARD.
    unsafe { *std::ptr::addr_of_mut!(FORK_GUARD) = Some(g) };
}

/// `pthread_atfork` parent handler.
pub fn fork_parent() {
    // SAFETY: see `fork_prepare`.
    drop(unsafe { (*std::ptr::addr_of_mut!(FORK_GUARD)).take() });
}

/// `pthread_atfork` child handler: forgets the parent's descriptor (it
/// lists the parent's threads), closing it if it is still ours; the next
/// listing reopens.
pub fn fork_child() {
    // SAFETY: see `fork_prepare`.
    let guard = unsafe { (*std::ptr::addr_of_mut!(FORK_GUARD)).take() };
    if let Some(mut cached) = guard {
        if let Some(c) = cached.take() {
            if still_same_file(&c) {
                close(c.fd);
            }
        }
    }
}

fn lock() -> MutexGuard<'static, Option<Cached>> {
    TASK_DIR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The cached descriptor, verified, (re)opening it if needed.
fn verified(cached: &mut Option<Cached>) -> Option<i32> {
    if let Some(c) = cached.as_ref() {
        if still_same_file(c) && cloexec(c.fd) {
            if c.pid == pid() {
                return Some(c.fd);
            }
            // Forked without our atfork handler: ours to close.
            close(c.fd);
        }
        // Otherwise the number now belongs to someone else: forget it.
        *cached = None;
    }
    let path = c"/proc/self/task";
    let fd = raw::check_retry(|| {
        // SAFETY: `path` is NUL-terminated; openat only reads it.
        unsafe {
            raw::syscall3(
                libc::SYS_openat,
                i64::from(libc::AT_FDCWD),
                path.as_ptr() as i64,
                i64::from(libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC),
            )
        }
    })
    .ok()? as i32;
    let Some((dev, ino)) = fstat_id(fd) else {
        close(fd);
        return None;
    };
    *cached = Some(Cached {
        fd,
        pid: pid(),
        dev,
        ino,
    });
    Some(fd)
}

/// Reads the whole directory from its start: the numeric entries.
fn read_dir(fd: i32) -> Option<Vec<i32>> {
    // SAFETY: lseek on our own directory descriptor.
    let rc = unsafe { raw::syscall3(libc::SYS_lseek, i64::from(fd), 0, i64::from(libc::SEEK_SET)) };
    raw::check(rc).ok()?;
    let mut buf = vec![0u8; DENTS_BUF];
    let mut tids = Vec::new();
    loop {
        let n = raw::check_retry(|| {
            // SAFETY: `buf` is writable for its length.
            unsafe {
                raw::syscall3(
                    libc::SYS_getdents64,
                    i64::from(fd),
                    buf.as_mut_ptr() as i64,
                    buf.len() as i64,
                )
            }
        })
        .ok()? as usize;
        if n == 0 {
            return Some(tids);
        }
        parse_dents(buf.get(..n)?, &mut tids)?;
    }
}

/// Appends the thread ids named by the `linux_dirent64` records in `buf`
/// (`d_ino: u64, d_off: i64, d_reclen: u16, d_type: u8, d_name`); `None` if
/// a record is malformed.
fn parse_dents(buf: &[u8], tids: &mut Vec<i32>) -> Option<()> {
    const NAME: usize = 19;
    let mut at = 0;
    while at < buf.len() {
        let reclen = usize::from(u16::from_ne_bytes([*buf.get(at + 16)?, *buf.get(at + 17)?]));
        if reclen < NAME + 1 {
            return None;
        }
        let rec = buf.get(at..at + reclen)?;
        let name = rec.get(NAME..)?;
        let name = &name[..name.iter().position(|&b| b == 0)?];
        if let Some(tid) = std::str::from_utf8(name)
            .ok()
            .and_then(|s| s.parse::<i32>().ok())
        {
            tids.push(tid);
        }
        at += reclen;
    }
    Some(())
}

fn still_same_file(c: &Cached) -> bool {
    fstat_id(c.fd) == Some((c.dev, c.ino))
}

/// Whether `fd` has `FD_CLOEXEC` (ours always does; `dup2` clears it).
fn cloexec(fd: i32) -> bool {
    // SAFETY: F_GETFD reads the descriptor's flags only.
    let rc = unsafe { raw::syscall2(libc::SYS_fcntl, i64::from(fd), i64::from(libc::F_GETFD)) };
    raw::check(rc).is_ok_and(|f| f & i64::from(libc::FD_CLOEXEC) != 0)
}

/// `(st_dev, st_ino)` of `fd`, by raw `newfstatat(fd, "", AT_EMPTY_PATH)`.
fn fstat_id(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: `stat` is plain data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: `empty` is NUL-terminated; `st` is writable and is the
    // kernel's `struct stat` on x86_64.
    let rc = unsafe {
        raw::syscall4(
            libc::SYS_newfstatat,
            i64::from(fd),
            empty.as_ptr() as i64,
            &mut st as *mut libc::stat as i64,
            i64::from(libc::AT_EMPTY_PATH),
        )
    };
    raw::check(rc).ok()?;
    // `dev_t`/`ino_t` are u64 on 64-bit Linux.
    #[allow(clippy::unnecessary_cast)]
    Some((st.st_dev as u64, st.st_ino as u64))
}

fn close(fd: i32) {
    // SAFETY: called only on a descriptor verified to be the one we opened.
    unsafe { raw::syscall1(libc::SYS_close, i64::from(fd)) };
}

fn pid() -> i32 {
    // SAFETY: getpid has no arguments and no memory effects.
    let pid = unsafe { raw::syscall0(libc::SYS_getpid) };
    // Pids fit in i32 (PID_MAX_LIMIT is 2^22).
    pid as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_this_thread_and_a_new_one() {
        let me = super::super::threads::gettid();
        let tids = list_tids().expect("procfs");
        assert!(tids.contains(&me));
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            tx.send(super::super::threads::gettid()).expect("send");
            let _ = done_rx.recv();
        });
        let tid = rx.recv().expect("tid");
        assert!(list_tids().expect("procfs").contains(&tid));
        drop(done_tx);
        t.join().expect("join");
    }

    #[test]
    fn parses_dirents() {
        let mut buf = Vec::new();
        for name in [".", "..", "123", "4567"] {
            let reclen = (19 + name.len() + 1).next_multiple_of(8);
            let mut rec = vec![0u8; reclen];
            rec[16..18].copy_from_slice(&(reclen as u16).to_ne_bytes());
            rec[19..19 + name.len()].copy_from_slice(name.as_bytes());
            buf.extend(rec);
        }
        let mut tids = Vec::new();
        assert_eq!(parse_dents(&buf, &mut tids), Some(()));
        assert_eq!(tids, [123, 4567]);
        let mut short = buf.clone();
        short[16] = 3;
        assert_eq!(parse_dents(&short, &mut Vec::new()), None);
    }

    fn survives_the_descriptor_limit_and_a_closed_descriptor_body() {
        assert!(open());
        // Every descriptor used: the cached one still lists.
        let filled = crate::sys::threads::test_support::fill_descriptors();
        let me = super::super::threads::gettid();
        assert!(list_tids().expect("listing at the limit").contains(&me));
        // The host closes it (e.g. closefrom) and the number is taken by
        // another file: never read as our directory, and at the limit it
        // cannot be reopened, so there is no listing at all.
        let fd = lock().as_ref().expect("cached").fd;
        close(fd);
        // SAFETY: opens /dev/null onto the freed number.
        let other = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
        assert_eq!(other, fd);
        assert_eq!(list_tids(), None, "no listing, rather than an empty one");
        drop(filled);
        // With room again it reopens.
        assert!(list_tids().expect("reopened").contains(&me));
        // A dup2 onto the cached number (FD_CLOEXEC cleared) is not ours.
        let fd = lock().as_ref().expect("cached").fd;
        // SAFETY: replaces our cached descriptor by a copy of /dev/null's.
        assert_eq!(unsafe { libc::dup2(other, fd) }, fd);
        assert!(list_tids().expect("reopened").contains(&me));
        assert_ne!(lock().as_ref().expect("cached").fd, fd);
    }

    #[test]
    fn survives_the_descriptor_limit_and_a_closed_descriptor() {
        crate::sys::threads::in_own_process(
            "sys::tasks::tests::survives_the_descriptor_limit_and_a_closed_descriptor",
            survives_the_descriptor_limit_and_a_closed_descriptor_body,
        );
    }

    fn a_forked_child_lists_its_own_threads_body() {
        let parent = list_tids().expect("procfs");
        let _t = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_secs(2)));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(list_tids().expect("procfs").len() > parent.len());
        // SAFETY: the child only lists and exits.
        match unsafe { libc::fork() } {
            0 => {
                // No atfork handler ran (none is registered in this test):
                // the pid check alone makes the child reopen.
                let ok = list_tids() == Some(vec![super::super::threads::gettid()]);
                // SAFETY: exits the forked child without running Rust's
                // atexit machinery.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) };
            }
            pid => {
                let mut status = 0;
                // SAFETY: waits for our own child.
                assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
                assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
            }
        }
    }

    #[test]
    fn a_forked_child_lists_its_own_threads() {
        crate::sys::threads::in_own_process(
            "sys::tasks::tests::a_forked_child_lists_its_own_threads",
            a_forked_child_lists_its_own_threads_body,
        );
    }
}
