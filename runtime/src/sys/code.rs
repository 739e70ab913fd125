//! Reading and writing code bytes.
//!
//! # Writing code
//!
//! [`write_code`] writes through one cached `/proc/self/mem` descriptor with
//! `pwrite`: the kernel writes with `FOLL_FORCE`, so the page stays
//! executable (and not writable) throughout, no VMA is split, and it works
//! under `PR_SET_MDWE`. Where procfs is missing or refuses (no mount,
//! `EACCES` under some LSM policies), it falls back to, per page, reading the
//! page's protection from `/proc/self/maps`, `mprotect` to RWX, a volatile
//! copy, and `mprotect` back. The page is never made writable without also
//! being executable: other threads may be running it.
//!
//! The whole write path uses raw system calls ([`super::raw`]) and no
//! allocation except to build an error, so it never runs libc code a user may
//! have probed — code that may be mid-switch, which the calling thread must
//! never execute (thread scans do not check the caller).
//!
//! The cached descriptor is checked before each write: it must belong to the
//! current process (a child forked without our `atfork` handler would
//! otherwise write into its parent) and still be the file we opened (a host
//! that closes every descriptor and opens a file that reuses the number must
//! not see code bytes written into that file at offset `addr`). The two checks
//! cost two system calls, against the ~900 ns of the write.
//!
//! # Reading code
//!
//! [`read_code_checked`] reads code and fails, rather than faulting, where
//! the memory is gone (a host may free or unmap its code under probes).
//!
//! # Safety
//!
//! This module protects and writes memory with raw system calls. It never
//! leaves a page more permissive than it found it except when restoring the
//! protection itself fails (reported as an error); it never makes a page
//! writable without executable; it closes only descriptors it opened. Writing
//! code bytes is sound only if the caller owns the bytes it overwrites (the
//! region map's contract) — the functions here cannot check that. Reading
//! code goes through the kernel (`process_vm_readv` or `/proc/self/mem`),
//! which fails on memory that is not mapped readable.

#![allow(unsafe_code)]

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use super::maps::{page_size, protection_of};
use super::raw;
use crate::error::{Error, Result};

/// `fd` value: `/proc/self/mem` not opened yet (or closed after `fork`).
const FD_UNOPENED: i32 = -1;
/// `fd` value: opening `/proc/self/mem` failed for good; use the fallback.
const FD_UNAVAILABLE: i32 = -2;

/// The cached `/proc/self/mem` descriptor, or [`FD_UNOPENED`] /
/// [`FD_UNAVAILABLE`]. Read and written under [`WriteLock`] except by
/// [`after_fork_child`].
static MEM_FD: AtomicI32 = AtomicI32::new(FD_UNOPENED);
/// The process that opened [`MEM_FD`].
static MEM_FD_PID: AtomicI32 = AtomicI32::new(0);
/// `st_dev` of [`MEM_FD`] when opened.
static MEM_FD_DEV: AtomicU64 = AtomicU64::new(0);
/// `st_ino` of [`MEM_FD`] when opened.
static MEM_FD_INO: AtomicU64 = AtomicU64::new(0);

/// Serializes code writes: the descriptor cache and the mprotect fallback
/// (two writers toggling one page's protection would leave it read-only under
/// the other's copy). A spin lock rather than a `Mutex` so that
/// [`after_fork_child`] can reset it: a child forked while another thread held
/// it would otherwise deadlock on its first write.
static WRITE_LOCK: AtomicBool = AtomicBool::new(false);

/// Holder of [`WRITE_LOCK`].
struct WriteLock(());

impl WriteLock {
    /// Takes the lock, yielding the CPU (raw `sched_yield`) while it is held.
    fn lock() -> Self {
        // Ordering: Acquire on success so the holder sees the descriptor
        // cache the previous holder left — pairs with `WriteLock::drop`.
        while WRITE_LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            // SAFETY: sched_yield has no arguments and no memory effects.
            unsafe { raw::syscall0(libc::SYS_sched_yield) };
        }
        WriteLock(())
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        // Ordering: Release publishes this holder's cache updates — pairs
        // with the Acquire in `WriteLock::lock`.
        WRITE_LOCK.store(false, Ordering::Release);
    }
}

/// Writes `bytes` at `addr` in executable memory. The page stays executable
/// throughout. Tries `pwrite` on a cached `/proc/self/mem` descriptor (raw
/// syscall); falls back to mprotect RWX → copy → restore the original
/// protection (never RW). Errors are `Error::Protect`.
///
/// Normal context only (it takes a spin lock). Concurrent calls are
/// serialized. Uses no libc function and allocates only to report an error.
pub fn write_code(addr: usize, bytes: &[u8]) -> Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    if addr.checked_add(bytes.len()).is_none() || i64::try_from(addr).is_err() {
        return Err(Error::InvalidArgument(
            "code write past the end of the address space".into(),
        ));
    }
    let _lock = WriteLock::lock();
    let mut done = 0;
    let pwrite_errno = match mem_fd_locked() {
        Ok(fd) => match pwrite_all(fd, addr, bytes, &mut done) {
            Ok(()) => return Ok(()),
            Err(e @ (libc::EPERM | libc::EACCES | libc::EIO | libc::ENOENT)) => e,
            Err(e) => {
                return Err(Error::protect(
                    addr + done,
                    "pwrite to /proc/self/mem",
                    io::Error::from_raw_os_error(e),
                ))
            }
        },
        Err(e) => e,
    };
    let rest = bytes.get(done..).unwrap_or_default();
    write_mprotect_locked(addr + done, rest).map_err(|(at, what, errno)| {
        let what = format!(
            "/proc/self/mem unusable ({}), then mprotect fallback: {what}",
            io::Error::from_raw_os_error(pwrite_errno)
        );
        Error::protect(at, &what, io::Error::from_raw_os_error(errno))
    })
}

/// Closes the cached `/proc/self/mem` descriptor in a forked child (it names
/// the parent's memory); the next write reopens it. Async-signal-safe.
///
/// Call it from a `pthread_atfork` child handler. It also releases the write
/// lock, which a parent thread may have held at the moment of the fork.
///
/// # Signal safety
/// Atomics and raw system calls only: no allocation, lock or libc call.
pub fn after_fork_child() {
    // Ordering: Relaxed — the child runs one thread, this one; nothing is
    // published to another thread — pairs with nothing (`WriteLock::lock`
    // in this same thread later).
    WRITE_LOCK.store(false, Ordering::Relaxed);
    // Ordering: Relaxed — single-threaded child, as above.
    let fd = MEM_FD.swap(FD_UNOPENED, Ordering::Relaxed);
    // Close it only if it still is the file we opened: the host may have
    // closed it and reused the number.
    if fd >= 0 && fd_is_cached_file(fd) {
        // SAFETY: `fd` is our own `/proc/self/mem` descriptor (checked
        // above), forgotten by the cache before closing it.
        unsafe { raw::syscall1(libc::SYS_close, i64::from(fd)) };
    }
}

/// The cached descriptor, opening `/proc/self/mem` if needed. `Err(errno)`
/// when it cannot be used. Call with [`WriteLock`] held.
fn mem_fd_locked() -> Result<i32, i32> {
    // Ordering: Relaxed — every access but `after_fork_child`'s (in a
    // single-threaded child) is under `WRITE_LOCK`, whose Acquire/Release
    // orders them — pairs with `WriteLock::lock`/`drop`.
    let fd = MEM_FD.load(Ordering::Relaxed);
    if fd == FD_UNAVAILABLE {
        return Err(libc::ENOENT);
    }
    if fd >= 0 {
        if fd_is_cached_file(fd) {
            // Ordering: Relaxed — under the lock, as above.
            if MEM_FD_PID.load(Ordering::Relaxed) == current_pid() {
                return Ok(fd);
            }
            // Forked without `after_fork_child`: ours to close, it names
            // the parent's memory.
            // SAFETY: our descriptor (checked above), forgotten below.
            unsafe { raw::syscall1(libc::SYS_close, i64::from(fd)) };
        }
        // Otherwise the number now belongs to someone else: forget it.
        // Ordering: Relaxed — under the lock, as above.
        MEM_FD.store(FD_UNOPENED, Ordering::Relaxed);
    }
    let path = c"/proc/self/mem";
    let fd = raw::check_retry(|| {
        // SAFETY: `path` is NUL-terminated; openat only reads it.
        unsafe {
            raw::syscall3(
                libc::SYS_openat,
                i64::from(libc::AT_FDCWD),
                path.as_ptr() as i64,
                i64::from(libc::O_RDWR | libc::O_CLOEXEC),
            )
        }
    });
    let fd = match fd {
        // Descriptors are small non-negative ints.
        Ok(fd) => fd as i32,
        Err(e) => {
            if matches!(
                e,
                libc::ENOENT | libc::EACCES | libc::EPERM | libc::ENOTDIR | libc::EROFS
            ) {
                // Ordering: Relaxed — under the lock, as above.
                MEM_FD.store(FD_UNAVAILABLE, Ordering::Relaxed);
            }
            return Err(e);
        }
    };
    let Some((dev, ino)) = fstat_id(fd) else {
        // SAFETY: `fd` was just opened by us and is not cached.
        unsafe { raw::syscall1(libc::SYS_close, i64::from(fd)) };
        return Err(libc::EBADF);
    };
    // Ordering: Relaxed — under the lock, as above.
    MEM_FD_DEV.store(dev, Ordering::Relaxed);
    // Ordering: Relaxed — under the lock, as above.
    MEM_FD_INO.store(ino, Ordering::Relaxed);
    // Ordering: Relaxed — under the lock, as above.
    MEM_FD_PID.store(current_pid(), Ordering::Relaxed);
    // Ordering: Relaxed — under the lock, as above.
    MEM_FD.store(fd, Ordering::Relaxed);
    Ok(fd)
}

/// Whether `fd` is still the file cached in [`MEM_FD_DEV`]/[`MEM_FD_INO`].
///
/// # Signal safety
/// Raw `newfstatat` and atomics only.
fn fd_is_cached_file(fd: i32) -> bool {
    // Ordering: Relaxed — under the lock or in a single-threaded child, see
    // `mem_fd_locked` — pairs with `WriteLock::lock`/`drop`.
    let want = (
        MEM_FD_DEV.load(Ordering::Relaxed),
        MEM_FD_INO.load(Ordering::Relaxed),
    );
    fstat_id(fd) == Some(want)
}

/// `(st_dev, st_ino)` of `fd`, by raw `newfstatat(fd, "", AT_EMPTY_PATH)`.
///
/// # Signal safety
/// Raw system call on a stack buffer only.
fn fstat_id(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: `stat` is plain data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: `empty` is NUL-terminated; `st` is writable and is the
    // kernel's `struct stat` on x86_64 (glibc and musl alike).
    let ret = unsafe {
        raw::syscall4(
            libc::SYS_newfstatat,
            i64::from(fd),
            empty.as_ptr() as i64,
            &mut st as *mut libc::stat as i64,
            i64::from(libc::AT_EMPTY_PATH),
        )
    };
    raw::check(ret).ok()?;
    // `dev_t`/`ino_t` are u64 on 64-bit Linux; the cast only widens elsewhere.
    #[allow(clippy::unnecessary_cast)]
    Some((st.st_dev as u64, st.st_ino as u64))
}

/// This process's id, by raw `getpid`.
///
/// # Signal safety
/// One raw system call.
fn current_pid() -> i32 {
    // SAFETY: getpid has no arguments and no memory effects.
    let pid = unsafe { raw::syscall0(libc::SYS_getpid) };
    // Pids fit in i32 (PID_MAX_LIMIT is 2^22).
    pid as i32
}

/// `pwrite`s all of `bytes` at offset `addr` of `fd`, looping on short writes
/// and `EINTR`. `done` counts the bytes written, also on error.
fn pwrite_all(fd: i32, addr: usize, bytes: &[u8], done: &mut usize) -> Result<(), i32> {
    while let Some(rest) = bytes.get(*done..).filter(|r| !r.is_empty()) {
        let n = raw::check_retry(|| {
            // SAFETY: `rest` is readable for `rest.len()` bytes; the offset
            // is below i64::MAX (checked by `write_code`); the caller owns the
            // code bytes it overwrites.
            unsafe {
                raw::syscall4(
                    libc::SYS_pwrite64,
                    i64::from(fd),
                    rest.as_ptr() as i64,
                    rest.len() as i64,
                    (addr + *done) as i64,
                )
            }
        })?;
        if n == 0 {
            // No progress: the kernel could not write the next page.
            return Err(libc::EIO);
        }
        *done += n as usize;
    }
    Ok(())
}

/// The fallback: for each page `bytes` spans, mprotect RWX, copy, restore.
/// `Err((addr, what, errno))` names the failing step. Call with
/// [`WriteLock`] held.
fn write_mprotect_locked(addr: usize, bytes: &[u8]) -> Result<(), (usize, &'static str, i32)> {
    let page = page_size();
    let rwx = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
    let mut off = 0;
    while off < bytes.len() {
        let at = addr + off;
        let page_start = at & !(page - 1);
        let n = (page_start + page - at).min(bytes.len() - off);
        let chunk = bytes.get(off..off + n).unwrap_or_default();
        let prot = match protection_of(page_start) {
            Ok(Some(prot)) => prot,
            Ok(None) => return Err((at, "address not mapped", libc::ENOMEM)),
            // /proc/self/maps unreadable: assume ordinary code.
            Err(_) => libc::PROT_READ | libc::PROT_EXEC,
        };
        // Never make memory executable (or writable) that the host made
        // neither: a reserved `PROT_NONE` page, data.
        if prot & (libc::PROT_EXEC | libc::PROT_WRITE) == 0 {
            return Err((
                at,
                "the page is neither executable nor writable",
                libc::EACCES,
            ));
        }
        if prot & libc::PROT_WRITE == 0 {
            mprotect(page_start, page, rwx).map_err(|e| (at, "mprotect to RWX", e))?;
        }
        // SAFETY: the page is mapped and writable now; the caller owns the
        // bytes it overwrites. Volatile so the copy is neither elided nor
        // turned into a libc `memcpy` call.
        unsafe {
            let dst = at as *mut u8;
            for (i, b) in chunk.iter().enumerate() {
                dst.add(i).write_volatile(*b);
            }
        }
        if prot & libc::PROT_WRITE == 0 {
            mprotect(page_start, page, prot)
                .map_err(|e| (at, "mprotect back to the original protection", e))?;
        }
        off += n;
    }
    Ok(())
}

/// Raw `mprotect`.
fn mprotect(addr: usize, len: usize, prot: i32) -> Result<(), i32> {
    // SAFETY: changes protection only; every caller keeps the page
    // executable if it was, and restores what it found.
    let ret =
        unsafe { raw::syscall3(libc::SYS_mprotect, addr as i64, len as i64, i64::from(prot)) };
    raw::check(ret).map(drop)
}

/// Reads `[start, end)` of code without ever faulting: `None` if any of it
/// is not mapped readable (freed, unmapped, `PROT_NONE`). A raw
/// `process_vm_readv` on our own pid (the kernel walks the page tables and
/// fails instead of raising `SIGSEGV`), or, where that is unavailable (a
/// seccomp filter, `ENOSYS`), `pread` on the cached `/proc/self/mem`
/// descriptor, which fails with `EIO` on such memory just the same. No libc,
/// no allocation but the result.
///
/// Normal context only (the fallback takes the write lock).
pub fn read_code_checked(start: usize, end: usize) -> Option<Vec<u8>> {
    let len = end.checked_sub(start)?;
    let mut buf = vec![0u8; len];
    if len == 0 {
        return Some(buf);
    }
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: start as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: the kernel writes at most `len` bytes into `buf`, and only
    // reads the remote range (which may be anything).
    let ret = unsafe {
        let pid = raw::syscall0(libc::SYS_getpid);
        raw::syscall6(
            libc::SYS_process_vm_readv,
            pid,
            &local as *const libc::iovec as i64,
            1,
            &remote as *const libc::iovec as i64,
            1,
            0,
        )
    };
    match raw::check(ret) {
        Ok(n) if n as usize == len => return Some(buf),
        Ok(_) | Err(libc::EFAULT) => return None,
        Err(_) => {}
    }
    let _lock = WriteLock::lock();
    let fd = mem_fd_locked().ok()?;
    pread_mem(fd, start, &mut buf).ok()?;
    Some(buf)
}

/// Fills `buf` from `/proc/self/mem` descriptor `fd` at address `start`:
/// `Err(errno)`, or `Err(0)` where the file ends (nothing mapped there).
fn pread_mem(fd: i32, start: usize, buf: &mut [u8]) -> Result<(), i32> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let n = raw::check_retry(|| {
            // SAFETY: `rest` is writable for its length; the offset is an
            // address of ours, below i64::MAX for user space.
            unsafe {
                raw::syscall4(
                    libc::SYS_pread64,
                    i64::from(fd),
                    rest.as_mut_ptr() as i64,
                    rest.len() as i64,
                    (start + done) as i64,
                )
            }
        })?;
        if n == 0 {
            return Err(0);
        }
        done += n as usize;
    }
    Ok(())
}

/// What [`read_code_any`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum CodeRead {
    /// The bytes; `readable` unless the memory is mapped without read
    /// permission (`PROT_NONE`: read through `/proc/self/mem`, which may).
    Bytes { bytes: Vec<u8>, readable: bool },
    /// Some of it is not mapped at all (freed, unmapped, unloaded).
    Unmapped,
    /// It cannot be read for another reason (no procfs and not readable).
    Unknown,
}

/// Reads `[start, end)` without ever faulting, also where the host made the
/// memory `PROT_NONE`: [`read_code_checked`] first, then `pread` on
/// `/proc/self/mem`, whose forced access reads pages the mapping does not
/// let the process read and fails with `EIO` where nothing is mapped.
/// Used to decide whether code still holds the bytes probert wrote before
/// restoring them (a host may reprotect, free or reuse its code).
///
/// Normal context only (the fallback takes the write lock).
pub fn read_code_any(start: usize, end: usize) -> CodeRead {
    if let Some(bytes) = read_code_checked(start, end) {
        return CodeRead::Bytes {
            bytes,
            readable: true,
        };
    }
    let Some(len) = end.checked_sub(start) else {
        return CodeRead::Unknown;
    };
    let mut buf = vec![0u8; len];
    let _lock = WriteLock::lock();
    let Ok(fd) = mem_fd_locked() else {
        return CodeRead::Unknown;
    };
    match pread_mem(fd, start, &mut buf) {
        Ok(()) => {}
        Err(0 | libc::EIO) => return CodeRead::Unmapped,
        Err(_) => return CodeRead::Unknown,
    }
    CodeRead::Bytes {
        bytes: buf,
        readable: false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::maps::test_pages::*;
    use super::super::maps::{map_exec_near, page_size};
    use super::*;

    #[test]
    fn write_code_pwrite_keeps_page_rx() {
        let p = page_with(0xc3, libc::PROT_READ | libc::PROT_EXEC);
        write_code(p + 10, &[0x90, 0xcc, 0x0f, 0x0b]).expect("write");
        {
            let _lock = WriteLock::lock();
            // Ordering: Relaxed — under the lock; every write_code leaves an
            // open descriptor cached when procfs works.
            assert!(MEM_FD.load(Ordering::Relaxed) >= 0, "/proc/self/mem used");
        }
        assert_eq!(
            read(p + 8, 8),
            [0xc3, 0xc3, 0x90, 0xcc, 0x0f, 0x0b, 0xc3, 0xc3]
        );
        assert_eq!(prot_of(p), Some(libc::PROT_READ | libc::PROT_EXEC));
        write_code(p, &[]).expect("empty write");
        assert!(write_code(usize::MAX - 1, &[0, 0, 0]).is_err());
    }

    #[test]
    fn write_code_spans_two_pages() {
        let page = page_size();
        let p = map_exec_near(page_with as fn(u8, i32) -> usize as usize, 2 * page).expect("map");
        let at = p + page - 2;
        write_code(at, &[1, 2, 3, 4]).expect("write");
        assert_eq!(read(at, 4), [1, 2, 3, 4]);
        assert_eq!(prot_of(p), Some(libc::PROT_READ | libc::PROT_EXEC));
        assert_eq!(prot_of(p + page), Some(libc::PROT_READ | libc::PROT_EXEC));
    }

    #[test]
    fn fallback_restores_protection_per_page() {
        let page = page_size();
        let p = map_exec_near(page_with as fn(u8, i32) -> usize as usize, 2 * page).expect("map");
        let at = p + page - 3;
        {
            let _lock = WriteLock::lock();
            write_mprotect_locked(at, &[9, 8, 7, 6, 5]).expect("fallback write");
        }
        assert_eq!(read(at, 5), [9, 8, 7, 6, 5]);
        assert_eq!(prot_of(p), Some(libc::PROT_READ | libc::PROT_EXEC));
        assert_eq!(prot_of(p + page), Some(libc::PROT_READ | libc::PROT_EXEC));
        // A writable page is written as is and stays as it was.
        let rw = page_with(0, libc::PROT_READ | libc::PROT_WRITE);
        {
            let _lock = WriteLock::lock();
            write_mprotect_locked(rw + 1, &[1]).expect("fallback write");
        }
        assert_eq!(read(rw, 2), [0, 1]);
        assert_eq!(prot_of(rw), Some(libc::PROT_READ | libc::PROT_WRITE));
    }

    #[test]
    fn fallback_refuses_pages_neither_executable_nor_writable() {
        let none = page_with(0xc3, libc::PROT_NONE);
        let ro = page_with(0xc3, libc::PROT_READ);
        let _lock = WriteLock::lock();
        for p in [none, ro] {
            let err = write_mprotect_locked(p, &[0xcc]).expect_err("refused");
            assert_eq!(err.2, libc::EACCES);
        }
        drop(_lock);
        assert_eq!(prot_of(none), Some(libc::PROT_NONE), "left as it was");
        assert_eq!(prot_of(ro), Some(libc::PROT_READ));
        assert_eq!(read(ro, 1), [0xc3]);
    }

    #[test]
    fn read_code_any_reads_prot_none_and_reports_unmapped() {
        let p = page_with(0x90, libc::PROT_READ | libc::PROT_EXEC);
        write_code(p + 1, &[0xcc]).expect("write");
        assert!(read_code_checked(p, p + 2).is_some());
        assert_eq!(
            // SAFETY: reprotects our own test page only.
            unsafe { libc::mprotect(p as *mut _, page_size(), libc::PROT_NONE) },
            0
        );
        assert_eq!(
            read_code_checked(p, p + 2),
            None,
            "process_vm_readv refuses"
        );
        assert_eq!(
            read_code_any(p, p + 2),
            CodeRead::Bytes {
                bytes: vec![0x90, 0xcc],
                readable: false
            }
        );
        assert_eq!(
            read_code_any(NEVER_MAPPED, NEVER_MAPPED + 1),
            CodeRead::Unmapped
        );
    }

    #[test]
    fn fallback_reports_unmapped_addresses() {
        let p = NEVER_MAPPED;
        let _lock = WriteLock::lock();
        let err = write_mprotect_locked(p, &[1]).expect_err("unmapped");
        assert_eq!(err, (p, "address not mapped", libc::ENOMEM));
    }

    #[test]
    fn write_code_to_unmapped_memory_fails_with_context() {
        let p = NEVER_MAPPED;
        match write_code(p + 4, &[1]) {
            Err(Error::Protect { addr, reason }) => {
                assert_eq!(addr, p + 4);
                assert!(reason.contains("not mapped"), "{reason}");
            }
            other => panic!("expected Protect, got {other:?}"),
        }
    }

    #[test]
    fn reused_descriptor_number_is_not_written() {
        let p = page_with(0xc3, libc::PROT_READ | libc::PROT_EXEC);
        write_code(p, &[0x90]).expect("write");
        let file = std::env::temp_dir().join(format!("probert-mem-{}", std::process::id()));
        let f = std::fs::File::create(&file).expect("temp file");
        {
            let _lock = WriteLock::lock();
            // Ordering: Relaxed — under the lock.
            let fd = MEM_FD.load(Ordering::Relaxed);
            assert!(fd >= 0);
            // The host "closes" our descriptor and a file takes its number.
            let file_fd = std::os::fd::AsRawFd::as_raw_fd(&f);
            // SAFETY: atomically replaces our cached descriptor with a dup
            // of the temp file; no other descriptor is affected.
            let got = unsafe { libc::dup2(file_fd, fd) };
            assert_eq!(got, fd);
        }
        write_code(p + 1, &[0x91]).expect("write after reuse");
        assert_eq!(read(p, 3), [0x90, 0x91, 0xc3]);
        assert_eq!(std::fs::metadata(&file).expect("meta").len(), 0);
        let _ = std::fs::remove_file(&file);
    }

    /// Forks; the child (calling `after_fork_child` if `reset`) writes
    /// `0x90` over the page's first byte and reports by exit status; the
    /// parent checks its own byte is unchanged.
    fn fork_and_write_in_child(reset: bool) {
        let p = page_with(0xc3, libc::PROT_READ | libc::PROT_EXEC);
        write_code(p, &[0xc3]).expect("opens the descriptor in the parent");
        // Without `after_fork_child`, a child forked while another test
        // thread holds the write lock would spin forever: hold it across the
        // fork ourselves, so each side releases its own copy.
        let held = (!reset).then(WriteLock::lock);
        // SAFETY: the child runs only raw system calls and `write_code`'s
        // success path (no allocation; the write lock is reset by
        // `after_fork_child` or released by `held`) and leaves with
        // exit_group.
        let pid = unsafe { libc::fork() };
        drop(held);
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let mut code = 0;
            if reset {
                after_fork_child();
                // Ordering: Relaxed — single-threaded child.
                if MEM_FD.load(Ordering::Relaxed) != FD_UNOPENED {
                    code = 2;
                }
            }
            if write_code(p, &[0x90]).is_err() {
                code = 3;
            }
            // SAFETY: `p` is mapped readable in the child too.
            if unsafe { (p as *const u8).read_volatile() } != 0x90 {
                code = 4;
            }
            // SAFETY: ends the child without running any parent state.
            unsafe { raw::syscall1(libc::SYS_exit_group, code) };
            unreachable!();
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "child failed");
        assert_eq!(read(p, 1), [0xc3], "the child wrote the parent's memory");
    }

    #[test]
    fn write_code_falls_back_without_procfs() {
        let page = page_size();
        let p = map_exec_near(page_with as fn(u8, i32) -> usize as usize, 2 * page).expect("map");
        // In a child, so marking /proc/self/mem unusable affects no other
        // test; the child allocates nothing on the success path.
        // SAFETY: the child runs raw system calls and `write_code` only and
        // leaves with exit_group.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            after_fork_child();
            // Ordering: Relaxed — single-threaded child.
            MEM_FD.store(FD_UNAVAILABLE, Ordering::Relaxed);
            let at = p + page - 1;
            let rx = Ok(Some(libc::PROT_READ | libc::PROT_EXEC));
            let mut code = 0;
            if write_code(at, &[0xcc, 0x90]).is_err() {
                code = 2;
            }
            // SAFETY: both pages are mapped readable.
            if unsafe { [(at as *const u8).read(), (at as *const u8).add(1).read()] }
                != [0xcc, 0x90]
            {
                code = 3;
            }
            if protection_of(p) != rx || protection_of(p + page) != rx {
                code = 4;
            }
            // Ordering: Relaxed — single-threaded child.
            if MEM_FD.load(Ordering::Relaxed) != FD_UNAVAILABLE {
                code = 5;
            }
            // SAFETY: ends the child without running any parent state.
            unsafe { raw::syscall1(libc::SYS_exit_group, code) };
            unreachable!();
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "child failed");
        assert_eq!(read(p + page - 1, 2), [0, 0], "the parent is untouched");
    }

    #[test]
    fn fork_child_writes_its_own_memory() {
        fork_and_write_in_child(true);
    }

    #[test]
    fn fork_child_without_atfork_handler_still_writes_its_own_memory() {
        // The pid check catches the inherited descriptor.
        fork_and_write_in_child(false);
    }
}
