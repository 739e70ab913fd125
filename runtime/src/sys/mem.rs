//! Code writes, mappings near code, reserved memory.
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
//! have probed.
//!
//! The cached descriptor is checked before each write: it must belong to the
//! current process (a child forked without our `atfork` handler would
//! otherwise write into its parent) and still be the file we opened (a host
//! that closes every descriptor and opens a file that reuses the number must
//! not see code bytes written into that file at offset `addr`). The two checks
//! cost two system calls, against the ~900 ns of the write.
//!
//! # Safety
//!
//! This module maps, protects and writes memory with raw system calls. It
//! guarantees: it never unmaps or replaces a mapping it did not create
//! ([`map_exec_near`] uses `MAP_FIXED_NOREPLACE`, never `MAP_FIXED`); it never
//! leaves a page more permissive than it found it except when restoring the
//! protection itself fails (reported as an error); it never makes a page
//! writable without executable; it closes only descriptors it opened. Writing
//! code bytes is sound only if the caller owns the bytes it overwrites (the
//! region map's contract) — the functions here cannot check that.

#![allow(unsafe_code)]

use std::io;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};

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

/// The `PROT_*` protection of the mapping containing `addr` per
/// `/proc/self/maps`; `Ok(None)` if no mapping contains it.
fn protection_of(addr: usize) -> Result<Option<i32>, i32> {
    let mut found = None;
    for_each_mapping(|m| {
        if m.start <= addr && addr < m.end {
            found = Some(m.prot);
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    Ok(found)
}

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mapping<'a> {
    /// First address.
    pub start: usize,
    /// One past the last address.
    pub end: usize,
    /// `PROT_READ | PROT_WRITE | PROT_EXEC` as shown.
    pub prot: i32,
    /// The path or pseudo-name (`[heap]`, `[stack]`, …); empty for anonymous
    /// memory; possibly truncated for paths longer than the read buffer.
    pub name: &'a [u8],
}

/// Calls `f` for each line of `/proc/self/maps`, in address order, until it
/// breaks. Raw system calls and an 8 KiB stack buffer: no libc, no
/// allocation. `Err(errno)` if the file cannot be read.
pub(crate) fn for_each_mapping(
    mut f: impl FnMut(&Mapping<'_>) -> ControlFlow<()>,
) -> Result<(), i32> {
    let path = c"/proc/self/maps";
    let fd = raw::check_retry(|| {
        // SAFETY: `path` is NUL-terminated; openat only reads it.
        unsafe {
            raw::syscall3(
                libc::SYS_openat,
                i64::from(libc::AT_FDCWD),
                path.as_ptr() as i64,
                i64::from(libc::O_RDONLY | libc::O_CLOEXEC),
            )
        }
    })?;
    let result = read_lines(fd as i32, &mut f);
    // SAFETY: closes the descriptor opened above, used by no one else.
    unsafe { raw::syscall1(libc::SYS_close, fd) };
    result
}

/// The line loop of [`for_each_mapping`].
fn read_lines(fd: i32, f: &mut impl FnMut(&Mapping<'_>) -> ControlFlow<()>) -> Result<(), i32> {
    let mut buf = [0u8; 8192];
    let mut len = 0;
    // Discarding the tail of a line longer than `buf`.
    let mut skipping = false;
    loop {
        let free = buf.get_mut(len..).unwrap_or_default();
        let n = raw::check_retry(|| {
            // SAFETY: `free` is writable for `free.len()` bytes.
            unsafe {
                raw::syscall3(
                    libc::SYS_read,
                    i64::from(fd),
                    free.as_mut_ptr() as i64,
                    free.len() as i64,
                )
            }
        })? as usize;
        len += n;
        let mut start = 0;
        while let Some(nl) = buf[start..len].iter().position(|&b| b == b'\n') {
            let line = &buf[start..start + nl];
            start += nl + 1;
            if std::mem::take(&mut skipping) {
                continue;
            }
            if let Some(m) = parse_maps_line(line) {
                if f(&m).is_break() {
                    return Ok(());
                }
            }
        }
        buf.copy_within(start..len, 0);
        len -= start;
        let eof = n == 0;
        if len == buf.len() || (eof && len > 0) {
            // A line longer than the buffer (its name is truncated), or a
            // last line without a newline.
            if !skipping {
                if let Some(m) = parse_maps_line(&buf[..len]) {
                    if f(&m).is_break() {
                        return Ok(());
                    }
                }
            }
            skipping = true;
            len = 0;
        }
        if eof {
            return Ok(());
        }
    }
}

/// Parses `start-end perms offset dev inode [name]`.
///
/// # Signal safety
/// Pure: no allocation.
pub(crate) fn parse_maps_line(line: &[u8]) -> Option<Mapping<'_>> {
    fn hex(s: &[u8]) -> Option<usize> {
        if s.is_empty() || s.len() > 16 {
            return None;
        }
        s.iter().try_fold(0usize, |acc, &c| {
            let d = (c as char).to_digit(16)?;
            Some(acc << 4 | d as usize)
        })
    }
    let mut fields = line.splitn(6, |&b| b == b' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let (_offset, _dev, _inode) = (fields.next()?, fields.next()?, fields.next()?);
    let name = fields.next().unwrap_or_default();
    let name = &name[name.iter().position(|&b| b != b' ').unwrap_or(name.len())..];
    let dash = range.iter().position(|&b| b == b'-')?;
    let start = hex(&range[..dash])?;
    let end = hex(&range[dash + 1..])?;
    let mut prot = 0;
    for (c, bit) in perms
        .iter()
        .zip([libc::PROT_READ, libc::PROT_WRITE, libc::PROT_EXEC])
    {
        if *c != b'-' {
            prot |= bit;
        }
    }
    Some(Mapping {
        start,
        end,
        prot,
        name,
    })
}

/// How far from `near` every byte of a [`map_exec_near`] mapping may be: a
/// rel32 reaches ±2 GiB from the end of its instruction; the 1 MiB margin
/// covers the instruction and the code around `near`.
pub const NEAR_REACH: usize = (2 << 30) - (1 << 20);

/// Lowest address [`map_exec_near`] considers (above any `mmap_min_addr`).
const LOW_LIMIT: usize = 1 << 20;
/// One past the highest user address with 4-level paging; the kernel maps
/// above it only when asked to, and [`map_exec_near`] never asks.
const USER_TOP: usize = 0x7fff_ffff_f000;
/// Space left free above `[heap]` so `brk` can still grow.
const HEAP_RESERVE: usize = 64 << 20;

/// Maps `len` bytes (a multiple of the page size) readable and executable,
/// never writable, anywhere such that every byte is within ±(2 GiB − 1 MiB) of
/// `near`, using `MAP_FIXED_NOREPLACE` (never replaces a mapping).
///
/// Scans `/proc/self/maps` for gaps, closest to `near` first, leaving room
/// for `brk` above `[heap]` and for the main stack below `[stack]`. A gap
/// filled by another thread since the scan (`EEXIST`) moves on to the next
/// candidate; a kernel older than 4.17, which ignores `MAP_FIXED_NOREPLACE`
/// and treats the address as a hint, is handled by checking the address it
/// returns. `Error::NoMemory` when nothing fits. Normal context only.
pub fn map_exec_near(near: usize, len: usize) -> Result<usize> {
    let page = page_size();
    if len == 0 || len % page != 0 {
        return Err(Error::InvalidArgument(
            "map_exec_near: length must be a non-zero multiple of the page size".into(),
        ));
    }
    let window = near_window(near, page);
    let mut last_errno = 0;
    for _round in 0..4 {
        let mappings = match read_maps() {
            Ok(m) => m,
            Err(e) => {
                // Without the map, let the kernel try the hint.
                return map_hinted(near & !(page - 1), len, window).ok_or_else(|| {
                    Error::NoMemory(
                        format!(
                            "no executable memory within reach of {near:#x}: \
                             /proc/self/maps unreadable ({})",
                            io::Error::from_raw_os_error(e)
                        )
                        .into(),
                    )
                });
            }
        };
        let candidates = candidates(&mappings, near, len, window, page, stack_reserve());
        let mut raced = false;
        for r in candidates {
            match map_at(r, len, window) {
                Ok(addr) => return Ok(addr),
                Err(e) => {
                    raced |= e == libc::EEXIST;
                    last_errno = e;
                }
            }
        }
        if !raced {
            break;
        }
    }
    let why = if last_errno == 0 {
        "no free gap large enough".to_string()
    } else {
        format!("last mmap: {}", io::Error::from_raw_os_error(last_errno))
    };
    Err(Error::NoMemory(
        format!("no {len:#x}-byte executable mapping within reach of {near:#x} ({why})").into(),
    ))
}

/// `[lo, hi)`: where a mapping reachable from `near` may lie, page-aligned.
fn near_window(near: usize, page: usize) -> (usize, usize) {
    let lo = near.saturating_sub(NEAR_REACH).max(LOW_LIMIT);
    let lo = lo
        .checked_add(page - 1)
        .map_or(usize::MAX, |v| v & !(page - 1));
    let hi = near.saturating_add(NEAR_REACH).min(USER_TOP) & !(page - 1);
    (lo, hi)
}

/// A mapping, reduced to what the gap search needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
    heap: bool,
    stack: bool,
}

/// `/proc/self/maps` as [`Span`]s.
fn read_maps() -> Result<Vec<Span>, i32> {
    let mut out = Vec::new();
    for_each_mapping(|m| {
        out.push(Span {
            start: m.start,
            end: m.end,
            heap: m.name == b"[heap]",
            stack: m.name == b"[stack]",
        });
        ControlFlow::Continue(())
    })?;
    Ok(out)
}

/// Room left below `[stack]`: the stack size limit (clamped to 8 MiB–1 GiB)
/// plus the kernel's 1 MiB guard gap.
fn stack_reserve() -> usize {
    // SAFETY: `rlimit` is plain data; all-zero is valid.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `rl` is writable; getrlimit only writes it. Normal context.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_STACK, &mut rl) } == 0;
    let limit = if ok {
        usize::try_from(rl.rlim_cur).unwrap_or(usize::MAX)
    } else {
        0
    };
    limit.clamp(8 << 20, 1 << 30) + (1 << 20)
}

/// Start addresses to try, closest to `near` first: one per free gap, at the
/// end of the gap nearest `near`.
fn candidates(
    maps: &[Span],
    near: usize,
    len: usize,
    (lo, hi): (usize, usize),
    page: usize,
    stack_reserve: usize,
) -> Vec<usize> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut gap_start = 0usize;
    let mut after_heap = false;
    let spans = maps
        .iter()
        .copied()
        .filter(|m| m.start < USER_TOP)
        .map(Some)
        .chain([None]);
    for next in spans {
        let (mut gap_end, stack) = match next {
            Some(m) => (m.start, m.stack),
            None => (USER_TOP, false),
        };
        let mut start = gap_start;
        if after_heap {
            start = start.saturating_add(HEAP_RESERVE);
        }
        if stack {
            gap_end = gap_end.saturating_sub(stack_reserve);
        }
        // Clip to the window, page-aligned.
        let s = start.max(lo).checked_add(page - 1).map(|v| v & !(page - 1));
        let e = gap_end.min(hi) & !(page - 1);
        if let Some(s) = s {
            if e >= s && e - s >= len {
                let r = if e <= near {
                    e - len
                } else if s >= near {
                    s
                } else {
                    (near & !(page - 1)).clamp(s, e - len)
                };
                let distance = if r + len <= near {
                    near - (r + len)
                } else {
                    r.saturating_sub(near)
                };
                out.push((distance, r));
            }
        }
        if let Some(m) = next {
            gap_start = gap_start.max(m.end);
            after_heap = m.heap;
        }
    }
    out.sort_unstable();
    out.into_iter().map(|(_, r)| r).collect()
}

/// Maps `len` bytes R-X at exactly `r` with `MAP_FIXED_NOREPLACE`.
/// `Err(errno)` on failure, `EEXIST` if something is there. A kernel that
/// ignores the flag may return another address: kept if inside `window`,
/// else unmapped (`EEXIST`).
fn map_at(r: usize, len: usize, window: (usize, usize)) -> Result<usize, i32> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping, so
    // this can only create new memory.
    let ret = unsafe {
        raw::syscall6(
            libc::SYS_mmap,
            r as i64,
            len as i64,
            i64::from(libc::PROT_READ | libc::PROT_EXEC),
            i64::from(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE),
            -1,
            0,
        )
    };
    let got = raw::check(ret)? as usize;
    if got == r || (got >= window.0 && got.saturating_add(len) <= window.1) {
        return Ok(got);
    }
    // SAFETY: `got` is the mapping just created, referenced by no one.
    unsafe { raw::syscall2(libc::SYS_munmap, got as i64, len as i64) };
    Err(libc::EEXIST)
}

/// Without `/proc/self/maps`: a plain hint, kept only if inside `window`.
fn map_hinted(hint: usize, len: usize, window: (usize, usize)) -> Option<usize> {
    // SAFETY: no MAP_FIXED: the kernel picks free space, `hint` is advice.
    let ret = unsafe {
        raw::syscall6(
            libc::SYS_mmap,
            hint as i64,
            len as i64,
            i64::from(libc::PROT_READ | libc::PROT_EXEC),
            i64::from(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS),
            -1,
            0,
        )
    };
    let got = raw::check(ret).ok()? as usize;
    if got >= window.0 && got.saturating_add(len) <= window.1 {
        return Some(got);
    }
    // SAFETY: `got` is the mapping just created, referenced by no one.
    unsafe { raw::syscall2(libc::SYS_munmap, got as i64, len as i64) };
    None
}

/// Reserves `len` bytes of zeroed, read-write, never-unmapped memory
/// (`MAP_NORESERVE`: pages cost nothing until touched).
pub fn reserve(len: usize) -> Result<*mut u8> {
    if len == 0 {
        return Err(Error::InvalidArgument("reserve: zero length".into()));
    }
    // SAFETY: a fresh anonymous mapping at an address the kernel picks.
    let ret = unsafe {
        raw::syscall6(
            libc::SYS_mmap,
            0,
            len as i64,
            i64::from(libc::PROT_READ | libc::PROT_WRITE),
            i64::from(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
            -1,
            0,
        )
    };
    raw::check(ret).map(|a| a as *mut u8).map_err(|e| {
        Error::NoMemory(
            format!(
                "reserving {len:#x} bytes: {}",
                io::Error::from_raw_os_error(e)
            )
            .into(),
        )
    })
}

/// Cached [`page_size`]; 0 until first asked.
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(0);

/// The page size.
///
/// The first call asks `sysconf`; later calls read the cache.
pub fn page_size() -> usize {
    // Ordering: Relaxed — the value is the same whoever computes it; a
    // racing first call just computes it twice — pairs with the store below.
    match PAGE_SIZE.load(Ordering::Relaxed) {
        0 => {
            // SAFETY: sysconf has no memory-safety preconditions.
            let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            let size = usize::try_from(size)
                .ok()
                .filter(|s| s.is_power_of_two())
                .unwrap_or(4096);
            // Ordering: Relaxed — see the load above.
            PAGE_SIZE.store(size, Ordering::Relaxed);
            size
        }
        size => size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh page holding `fill`, mapped with `prot`.
    fn page_with(fill: u8, prot: i32) -> usize {
        let page = page_size();
        // SAFETY: a fresh private anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: `p` is `page` writable bytes, then reprotected.
        unsafe {
            std::ptr::write_bytes(p.cast::<u8>(), fill, page);
            assert_eq!(libc::mprotect(p, page, prot), 0);
        }
        p as usize
    }

    /// Low enough that the kernel never picks it (it allocates top-down) and
    /// no test maps it there, unlike a page we unmap, which a concurrent test
    /// may get back; below `vm.mmap_min_addr` on most systems.
    const NEVER_MAPPED: usize = 0x2000;

    fn prot_of(addr: usize) -> Option<i32> {
        protection_of(addr).expect("maps readable")
    }

    fn read(addr: usize, n: usize) -> Vec<u8> {
        // SAFETY: test callers pass readable ranges.
        unsafe { std::slice::from_raw_parts(addr as *const u8, n).to_vec() }
    }

    #[test]
    fn page_size_is_cached_power_of_two() {
        let p = page_size();
        assert!(p.is_power_of_two() && p >= 4096);
        assert_eq!(page_size(), p);
    }

    #[test]
    fn parses_maps_lines() {
        let m =
            parse_maps_line(b"55d4c0a00000-55d4c0a21000 r-xp 00001000 fd:01 1234     /usr/bin/x y")
                .expect("parses");
        assert_eq!(m.start, 0x55d4c0a00000);
        assert_eq!(m.end, 0x55d4c0a21000);
        assert_eq!(m.prot, libc::PROT_READ | libc::PROT_EXEC);
        assert_eq!(m.name, b"/usr/bin/x y");
        let m = parse_maps_line(b"7ffd1000-7ffd2000 rw-p 00000000 00:00 0 ").expect("parses");
        assert_eq!(m.prot, libc::PROT_READ | libc::PROT_WRITE);
        assert_eq!(m.name, b"");
        let m = parse_maps_line(b"1000-2000 ---p 00000000 00:00 0").expect("parses");
        assert_eq!((m.prot, m.name), (0, &b""[..]));
        assert!(parse_maps_line(b"garbage").is_none());
        assert!(parse_maps_line(b"").is_none());
    }

    #[test]
    fn maps_walk_sees_a_fresh_page() {
        let p = page_with(0, libc::PROT_READ | libc::PROT_EXEC);
        assert_eq!(prot_of(p), Some(libc::PROT_READ | libc::PROT_EXEC));
        let mut count = 0;
        for_each_mapping(|_| {
            count += 1;
            ControlFlow::Continue(())
        })
        .expect("maps");
        assert!(count > 5);
    }

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

    #[test]
    fn map_exec_near_is_reachable_and_rx() {
        let page = page_size();
        let near = map_exec_near_is_reachable_and_rx as fn() as usize;
        for _ in 0..8 {
            let r = map_exec_near(near, 4 * page).expect("map");
            assert!(r >= near.saturating_sub(NEAR_REACH), "{r:#x} below reach");
            assert!(r + 4 * page - 1 <= near + NEAR_REACH, "{r:#x} above reach");
            assert_eq!(prot_of(r), Some(libc::PROT_READ | libc::PROT_EXEC));
            assert_eq!(read(r, 4), [0, 0, 0, 0]);
        }
        assert!(map_exec_near(near, 0).is_err());
        assert!(map_exec_near(near, page + 1).is_err());
    }

    #[test]
    fn map_exec_near_never_replaces_a_mapping() {
        let page = page_size();
        let near = map_exec_near_never_replaces_a_mapping as fn() as usize;
        // Learn where the next mapping would go, put a sentinel there, and
        // present that address as the first candidate.
        let r = map_exec_near(near, page).expect("map");
        let sentinel = page_with(0x5a, libc::PROT_READ);
        let window = near_window(near, page);
        assert_eq!(map_at(sentinel, page, window), Err(libc::EEXIST));
        assert_eq!(read(sentinel, 2), [0x5a, 0x5a]);
        assert_eq!(prot_of(sentinel), Some(libc::PROT_READ));
        assert_eq!(map_at(r, page, window), Err(libc::EEXIST));
        // Fill many pages near: none overlaps the sentinel or each other.
        let mut got = vec![r];
        for _ in 0..64 {
            got.push(map_exec_near(near, page).expect("map"));
        }
        got.sort_unstable();
        got.dedup();
        assert_eq!(got.len(), 65, "a mapping was handed out twice");
        assert!(!got.contains(&sentinel));
        assert_eq!(read(sentinel, 2), [0x5a, 0x5a]);
    }

    #[test]
    fn candidates_prefer_the_closest_gap_and_respect_heap_and_stack() {
        let page = 0x1000;
        let mib = 1 << 20;
        let span = |start: usize, end: usize| Span {
            start,
            end,
            heap: false,
            stack: false,
        };
        let near = 0x5000_0000_0000;
        let window = near_window(near, page);
        let maps = [
            span(near - 100 * mib, near - 10 * mib),
            span(near - mib, near + mib),
            Span {
                heap: true,
                ..span(near + mib, near + 2 * mib)
            },
            Span {
                stack: true,
                ..span(near + 3000 * mib, near + 3001 * mib)
            },
        ];
        let c = candidates(&maps, near, page, window, page, 8 * mib);
        // Closest: just below the code, then above the heap's reserve, then
        // below the first mapping.
        assert_eq!(c[0], near - mib - page);
        assert_eq!(c[1], near + 2 * mib + HEAP_RESERVE);
        assert_eq!(c[2], near - 100 * mib - page);
        assert_eq!(c.len(), 3);
        for r in c {
            assert!(r >= window.0 && r + page <= window.1);
        }
        // A gap containing `near` starts at `near`'s page.
        let c = candidates(&[], near + 5, page, window, page, 0);
        assert_eq!(c, [near]);
    }

    #[test]
    fn reserve_is_zeroed_and_writable() {
        let p = reserve(1 << 30).expect("reserve");
        // SAFETY: `p` is 1 GiB of read-write memory.
        unsafe {
            assert_eq!(p.add(12345).read(), 0);
            p.add(12345).write(7);
            assert_eq!(p.add(12345).read(), 7);
        }
        assert!(reserve(0).is_err());
    }
}
