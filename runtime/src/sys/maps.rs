//! The address space: `/proc/self/maps`, executable mappings near code,
//! reserved memory, the page size.
//!
//! [`for_each_mapping`] walks `/proc/self/maps` with raw system calls and a
//! stack buffer (no libc, no allocation), so the code writer's fallback can
//! use it. [`protection_of`] and [`executable_spans`], which the code writer
//! asks on every write, query the mappings they need with `PROCMAP_QUERY`
//! where the kernel has it (Linux 6.11): the kernel formats no text, and
//! the answer costs a few hundred nanoseconds instead of tens of
//! microseconds (a third of a single attach's time went to formatting and
//! parsing the whole file). [`map_exec_near`] finds room for stub chunks
//! within rel32 reach of the code they serve. [`reserve`] maps the
//! never-unmapped arenas.
//!
//! # Safety
//!
//! This module maps memory with raw system calls. It never unmaps or replaces
//! a mapping it did not create ([`map_exec_near`] uses `MAP_FIXED_NOREPLACE`,
//! never `MAP_FIXED`) and closes only descriptors it opened.

#![allow(unsafe_code)]

use std::io;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::raw;
use crate::error::{Error, Result};

/// The `PROT_*` protection of the mapping containing `addr` per
/// `/proc/self/maps`; `Ok(None)` if no mapping contains it.
pub(crate) fn protection_of(addr: usize) -> Result<Option<i32>, i32> {
    if let Some(q) = Query::open() {
        match q.mapping(addr) {
            Ok(found) => return Ok(found.map(|m| m.2)),
            Err(e) if !Query::unsupported(e) => return Err(e),
            Err(_) => {}
        }
    }
    protection_of_text(addr)
}

/// [`protection_of`] from the text of `/proc/self/maps`.
fn protection_of_text(addr: usize) -> Result<Option<i32>, i32> {
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

/// For each span `[start, end)` (sorted by start or not), whether every
/// byte of it lies in mappings with `PROT_EXEC`: one pass over
/// `/proc/self/maps`. `Err(errno)` if the file cannot be read.
pub(crate) fn executable_spans(spans: &[(usize, usize)]) -> Result<Vec<bool>, i32> {
    if let Some(q) = Query::open() {
        match q.executable_spans(spans) {
            Ok(v) => return Ok(v),
            Err(e) if !Query::unsupported(e) => return Err(e),
            Err(_) => {}
        }
    }
    executable_spans_text(spans)
}

/// [`executable_spans`] from the text of `/proc/self/maps`.
fn executable_spans_text(spans: &[(usize, usize)]) -> Result<Vec<bool>, i32> {
    // How far each span is covered by executable mappings so far (the
    // mappings come in address order).
    let mut covered: Vec<usize> = spans.iter().map(|&(s, _)| s).collect();
    for_each_mapping(|m| {
        for (c, &(_, e)) in covered.iter_mut().zip(spans) {
            if *c < e && m.start <= *c && *c < m.end && m.prot & libc::PROT_EXEC != 0 {
                *c = m.end.min(e);
            }
        }
        ControlFlow::Continue(())
    })?;
    Ok(covered
        .iter()
        .zip(spans)
        .map(|(&c, &(_, e))| c >= e)
        .collect())
}

/// `struct procmap_query` (`linux/fs.h`, Linux 6.11).
#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

const _: () = assert!(std::mem::size_of::<ProcmapQuery>() == 104);
/// `_IOWR('f', 17, struct procmap_query)`.
const PROCMAP_QUERY: u64 = 0xC068_6611;
/// `vma_flags` bits.
const QUERY_READABLE: u64 = 0x01;
const QUERY_WRITABLE: u64 = 0x02;
const QUERY_EXECUTABLE: u64 = 0x04;

/// Whether `PROCMAP_QUERY` works here: unknown, yes, no. A hint: either
/// way of asking gives the same answer, so every access is Relaxed.
static QUERY_STATE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(QUERY_UNKNOWN);
const QUERY_UNKNOWN: u8 = 0;
const QUERY_YES: u8 = 1;
const QUERY_NO: u8 = 2;

/// An open `/proc/self/maps` to query mappings by address
/// (`PROCMAP_QUERY`); closed on drop.
struct Query {
    fd: i32,
}

impl Query {
    /// `None` where the kernel is known not to have the query, or the file
    /// cannot be opened (the text walk then reports why).
    fn open() -> Option<Query> {
        // Ordering: Relaxed — a hint (see `QUERY_STATE`).
        if QUERY_STATE.load(Ordering::Relaxed) == QUERY_NO {
            return None;
        }
        open_maps().ok().map(|fd| Query { fd })
    }

    /// Whether `errno` says the query is not there (older kernels); the
    /// callers fall back to the text. Remembered unless a query has worked
    /// before (then it was this call's, and only this call falls back).
    fn unsupported(errno: i32) -> bool {
        let no = matches!(errno, libc::ENOTTY | libc::EINVAL | libc::EOPNOTSUPP);
        if no {
            // Ordering: Relaxed — a hint (see `QUERY_STATE`).
            let _ = QUERY_STATE.compare_exchange(
                QUERY_UNKNOWN,
                QUERY_NO,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        no
    }

    /// The mapping containing `addr`: `(start, end, PROT_*)`; `Ok(None)`
    /// if none does.
    fn mapping(&self, addr: usize) -> Result<Option<(usize, usize, i32)>, i32> {
        let mut q = ProcmapQuery {
            size: std::mem::size_of::<ProcmapQuery>() as u64,
            query_addr: addr as u64,
            ..ProcmapQuery::default()
        };
        let r = raw::check_retry(|| {
            // SAFETY: `q` is a `struct procmap_query` the kernel reads and
            // writes for its `size` bytes; no name or build id is asked for.
            unsafe {
                raw::syscall3(
                    libc::SYS_ioctl,
                    i64::from(self.fd),
                    PROCMAP_QUERY as i64,
                    std::ptr::addr_of_mut!(q) as i64,
                )
            }
        });
        match r {
            Ok(_) => {
                // Ordering: Relaxed — a hint (see `QUERY_STATE`).
                QUERY_STATE.store(QUERY_YES, Ordering::Relaxed);
                let f = q.vma_flags;
                let prot = [
                    (QUERY_READABLE, libc::PROT_READ),
                    (QUERY_WRITABLE, libc::PROT_WRITE),
                    (QUERY_EXECUTABLE, libc::PROT_EXEC),
                ]
                .iter()
                .filter(|(bit, _)| f & bit != 0)
                .fold(0, |p, (_, prot)| p | prot);
                Ok(Some((q.vma_start as usize, q.vma_end as usize, prot)))
            }
            Err(libc::ENOENT) => {
                // Ordering: Relaxed — a hint (see `QUERY_STATE`).
                QUERY_STATE.store(QUERY_YES, Ordering::Relaxed);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// [`executable_spans`] by queries: each span's mappings in turn, one
    /// query per mapping while the spans stay in it (a batch's patches
    /// mostly lie in a few).
    fn executable_spans(&self, spans: &[(usize, usize)]) -> Result<Vec<bool>, i32> {
        let mut out = Vec::with_capacity(spans.len());
        let mut last: Option<(usize, usize, i32)> = None;
        for &(start, end) in spans {
            let mut at = start;
            while at < end {
                let m = match last {
                    Some(m) if m.0 <= at && at < m.1 => Some(m),
                    _ => self.mapping(at)?,
                };
                last = m.or(last);
                match m {
                    Some((_, e, prot)) if prot & libc::PROT_EXEC != 0 && e > at => at = e,
                    _ => break,
                }
            }
            out.push(at >= end);
        }
        Ok(out)
    }
}

impl Drop for Query {
    fn drop(&mut self) {
        // SAFETY: closes the descriptor `open` opened, used by no one else.
        unsafe { raw::syscall1(libc::SYS_close, i64::from(self.fd)) };
    }
}

/// Opens `/proc/self/maps` (raw `openat`).
fn open_maps() -> Result<i32, i32> {
    let path = c"/proc/self/maps";
    raw::check_retry(|| {
        // SAFETY: `path` is NUL-terminated; openat only reads it.
        unsafe {
            raw::syscall3(
                libc::SYS_openat,
                i64::from(libc::AT_FDCWD),
                path.as_ptr() as i64,
                i64::from(libc::O_RDONLY | libc::O_CLOEXEC),
            )
        }
    })
    .map(|fd| fd as i32)
}

/// Whether this kernel answers `PROCMAP_QUERY` (asks once if not known).
#[cfg(test)]
pub(crate) fn query_supported() -> bool {
    if QUERY_STATE.load(Ordering::Relaxed) == QUERY_UNKNOWN {
        if let Some(q) = Query::open() {
            if let Err(e) = q.mapping(page_size()) {
                Query::unsupported(e);
            }
        }
    }
    QUERY_STATE.load(Ordering::Relaxed) == QUERY_YES
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
pub(crate) fn for_each_mapping(f: impl FnMut(&Mapping<'_>) -> ControlFlow<()>) -> Result<(), i32> {
    let mut buf = [0u8; 8192];
    for_each_mapping_in(&mut buf, f)
}

/// The end of the mapping that contains `addr`, read from `/proc/self/maps`
/// with a small stack buffer (a line longer than it loses its name, which is
/// not needed here). `None` if no mapping contains it or the file cannot be
/// read.
///
/// # Signal safety
/// Raw system calls and a 512-byte stack buffer: no libc, no allocation.
pub(crate) fn mapping_end(_cx: crate::sigctx::SignalContext, addr: usize) -> Option<usize> {
    let mut buf = [0u8; 512];
    let mut end = None;
    for_each_mapping_in(&mut buf, |m| {
        if m.start <= addr && addr < m.end {
            end = Some(m.end);
            ControlFlow::Break(())
        } else if m.start > addr {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .ok()?;
    end
}

/// [`for_each_mapping`] with the caller's buffer.
///
/// # Signal safety
/// Raw system calls only: no libc, no allocation (if `f` allocates nothing).
fn for_each_mapping_in(
    buf: &mut [u8],
    mut f: impl FnMut(&Mapping<'_>) -> ControlFlow<()>,
) -> Result<(), i32> {
    let fd = open_maps()?;
    let result = read_lines(fd, buf, &mut f);
    // SAFETY: closes the descriptor opened above, used by no one else.
    unsafe { raw::syscall1(libc::SYS_close, i64::from(fd)) };
    result
}

/// The line loop of [`for_each_mapping`].
fn read_lines(
    fd: i32,
    buf: &mut [u8],
    f: &mut impl FnMut(&Mapping<'_>) -> ControlFlow<()>,
) -> Result<(), i32> {
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

/// Pages for the tests of this module and of `code`.
#[cfg(test)]
pub(crate) mod test_pages {
    use super::*;

    /// A fresh page holding `fill`, mapped with `prot`.
    pub(crate) fn page_with(fill: u8, prot: i32) -> usize {
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
    pub(crate) const NEVER_MAPPED: usize = 0x2000;

    #[test]
    fn executable_spans_need_every_byte_executable() {
        let page = page_size();
        let rx = page_with(0, libc::PROT_READ | libc::PROT_EXEC);
        let rw = page_with(0, libc::PROT_READ | libc::PROT_WRITE);
        let got = executable_spans(&[
            (rx, rx + 16),
            (rw, rw + 1),
            (rx + page - 1, rx + page + 1),
            (NEVER_MAPPED, NEVER_MAPPED + 1),
        ])
        .expect("maps");
        // The third span runs past the page unless the next one happens to
        // be executable too.
        let next_exec = prot_of(rx + page).is_some_and(|p| p & libc::PROT_EXEC != 0);
        assert_eq!(got, [true, false, next_exec, false]);
    }

    pub(crate) fn prot_of(addr: usize) -> Option<i32> {
        protection_of(addr).expect("maps readable")
    }

    pub(crate) fn read(addr: usize, n: usize) -> Vec<u8> {
        // SAFETY: test callers pass readable ranges.
        unsafe { std::slice::from_raw_parts(addr as *const u8, n).to_vec() }
    }
}

#[cfg(test)]
mod tests {
    use super::test_pages::*;
    use super::*;

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

    /// The kernel's release as (major, minor).
    fn kernel_release() -> (u32, u32) {
        // SAFETY: `utsname` is plain bytes; all zeroes is a valid value.
        let mut u: libc::utsname = unsafe { std::mem::zeroed() };
        // SAFETY: `u` is writable.
        assert_eq!(unsafe { libc::uname(&mut u) }, 0);
        // SAFETY: uname NUL-terminates the release.
        let r = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
        let mut it = r
            .to_str()
            .unwrap_or("")
            .split(|c: char| !c.is_ascii_digit());
        let mut num = || it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        (num(), num())
    }

    #[test]
    fn queries_answer_as_the_text_does() {
        // Linux 6.11 answers `PROCMAP_QUERY`; an older kernel takes the text
        // walk, which this compares against.
        if kernel_release() >= (6, 11) {
            assert!(query_supported(), "PROCMAP_QUERY on Linux 6.11 or later");
        } else if !query_supported() {
            eprintln!("skipped: this kernel has no PROCMAP_QUERY (Linux < 6.11)");
            return;
        }
        let rx = page_with(0, libc::PROT_READ | libc::PROT_EXEC);
        let rw = page_with(0, libc::PROT_READ | libc::PROT_WRITE);
        let lines = || {
            let mut lines = Vec::new();
            for_each_mapping(|m| {
                lines.push((m.start, m.end, m.prot));
                ControlFlow::Continue(())
            })
            .expect("maps");
            lines
        };
        let q = Query::open().expect("query");
        // Other tests of this process map and unmap meanwhile: the lines
        // compared are those the text shows the same before and after.
        let before = lines();
        let answers: Vec<_> = before
            .iter()
            .map(|&(start, end, _)| {
                [start, start + (end - start) / 2, end - 1].map(|a| (a, q.mapping(a)))
            })
            .collect();
        let after = lines();
        let mut compared = 0;
        for (&(start, end, prot), answers) in before.iter().zip(&answers) {
            if start >= 0x7fff_ffff_f000 || !after.contains(&(start, end, prot)) {
                continue; // [vsyscall] (not a VMA the query sees), or changed
            }
            for (a, got) in answers {
                assert_eq!(*got, Ok(Some((start, end, prot))), "the mapping at {a:#x}");
            }
            compared += 1;
        }
        assert!(compared > 5, "only {compared} mappings compared");
        assert!(before.iter().any(|l| l.0 <= rx && rx < l.1));
        assert_eq!(q.mapping(test_pages::NEVER_MAPPED).expect("query"), None);
        let spans = [
            (rx, rx + 16),
            (rx + 8, rx + 9),
            (rw, rw + 1),
            (NEVER_MAPPED, NEVER_MAPPED + 1),
        ];
        let text = executable_spans_text(&spans).expect("maps");
        assert_eq!(text[..3], [true, true, false]);
        assert_eq!(q.executable_spans(&spans), Ok(text));
        assert_eq!(
            protection_of_text(rw),
            q.mapping(rw).map(|m| m.map(|m| m.2))
        );
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
