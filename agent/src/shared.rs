//! Counters the command reads itself, for the processes that end without a
//! report: killed by a signal (`SIGKILL`, `SIGSEGV`, ...), `_exit`, or an
//! `exec` the agent does not follow. Exit handlers never run there, so the
//! agent cannot send anything; the command reads this file instead.
//!
//! The file is `shm.PID.STAMP` in the command's private directory (the one of its
//! socket), mapped `MAP_SHARED`: a handler's atomic add lands in the page
//! cache, which the command reads when the process is gone. Layout, all
//! little-endian (x86-64's order):
//!
//! - a header of [`HEADER`] bytes: the magic `b"probert1"`, then the number
//!   of records in use (`u64`), then the capacity (`u64`);
//! - [`CAPACITY`] records of [`RECORD`] bytes: the counter (`u64`), then the
//!   text `tool\0function\0module\0what\0`.
//!
//! A record is filled before the count of records covers it (Release store,
//! normal context), so a reader that sees the count sees the text.
//!
//! After `fork` the child would share its parent's pages: [`forked`] copies
//! them into the child's own file and maps that one over the same address,
//! so that the counters' addresses the handlers hold stay valid.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

/// Bytes of the header.
pub const HEADER: usize = 64;
/// Bytes of one record.
pub const RECORD: usize = 128;
/// Records in the file.
pub const CAPACITY: usize = 1 << 15;
const SIZE: usize = HEADER + RECORD * CAPACITY;
const MAGIC: &[u8; 8] = b"probert1";

static BASE: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
/// When this process image made its file (a `-f` exec keeps the pid).
static STAMP: AtomicU64 = AtomicU64::new(0);
/// Serialises [`counter`] (normal context, under the agent's lock anyway).
static USED: AtomicUsize = AtomicUsize::new(0);

/// The file's name in the command's directory ("" before [`init`]), sent in
/// the hello frame.
pub fn name() -> String {
    // Ordering: Relaxed — written by this thread (init, forked) before.
    match STAMP.load(Ordering::Relaxed) {
        0 => String::new(),
        // SAFETY: always safe.
        stamp => format!("shm.{}.{stamp}", unsafe { libc::getpid() }),
    }
}

/// A new file for this process, sized (sparse) and open.
fn create() -> Option<std::fs::File> {
    let sock = std::env::var_os("PROBERT_SOCK").or_else(|| crate::config_sock().map(Into::into))?;
    let dir = std::path::Path::new(&sock).parent()?.to_path_buf();
    // Ordering: Relaxed — only this thread reads it (name).
    STAMP.store(crate::host::now_ns().max(1), Ordering::Relaxed);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join(name()))
        .ok()?;
    f.set_len(SIZE as u64).ok()?;
    Some(f)
}

fn map(f: &std::fs::File, at: *mut u8) -> Option<*mut u8> {
    let flags = libc::MAP_SHARED | if at.is_null() { 0 } else { libc::MAP_FIXED };
    // SAFETY: maps the whole file; with MAP_FIXED, `at` is our own earlier
    // mapping of the same size, replaced in one call.
    let p = unsafe {
        libc::mmap(
            at.cast(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            std::os::fd::AsRawFd::as_raw_fd(f),
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p.cast())
}

/// Creates and maps this process's file (normal context, before `main`).
pub fn init() {
    let Some(f) = create() else { return };
    let Some(p) = map(&f, std::ptr::null_mut()) else {
        // Ordering: Relaxed — only this thread reads it (name).
        STAMP.store(0, Ordering::Relaxed);
        return;
    };
    // SAFETY: the new mapping, SIZE bytes, ours alone so far.
    unsafe {
        std::ptr::copy_nonoverlapping(MAGIC.as_ptr(), p, 8);
        p.add(16).cast::<u64>().write(CAPACITY as u64);
    }
    // Ordering: Release — the header is written; pairs with the Acquire
    // load in `counter`.
    BASE.store(p, Ordering::Release);
}

fn used_slot(base: *mut u8) -> &'static AtomicU64 {
    // SAFETY: the header's second word, 8-byte aligned in a live mapping
    // that is never unmapped (only replaced in place by `forked`).
    unsafe { &*base.add(8).cast::<AtomicU64>() }
}

/// A zeroed counter labelled `tool`, `function`, `module`, `what`, or None
/// when the file is missing or full. Normal context.
pub fn counter(tool: &str, function: &str, module: &str, what: &str) -> Option<&'static AtomicU64> {
    // Ordering: Acquire — pairs with the Release store in `init`.
    let base = BASE.load(Ordering::Acquire);
    if base.is_null() {
        return None;
    }
    // Ordering: Relaxed — callers hold the agent's lock; this only hands
    // out distinct indices.
    let i = USED.fetch_add(1, Ordering::Relaxed);
    if i >= CAPACITY {
        return None;
    }
    // SAFETY: record `i` lies inside the mapping.
    let rec = unsafe { base.add(HEADER + RECORD * i) };
    let mut text = Vec::with_capacity(RECORD - 8);
    for part in [tool, function, module, what] {
        let room = (RECORD - 8 - 1).saturating_sub(text.len() + 1);
        let b = part.as_bytes();
        text.extend_from_slice(&b[..b.len().min(room)]);
        text.push(0);
    }
    text.truncate(RECORD - 8);
    // SAFETY: the record's text, inside the mapping; nobody reads it yet.
    unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), rec.add(8), text.len()) };
    // Ordering: Release — the record's text is written before the count
    // covers it; the command reads the file after the process is gone.
    used_slot(base).store(i as u64 + 1, Ordering::Release);
    // SAFETY: the record's first word: 8-byte aligned (HEADER and RECORD
    // are multiples of 8, the mapping page-aligned), zero, live forever.
    Some(unsafe { &*rec.cast::<AtomicU64>() })
}

/// Private zeroed memory in place of the mapping at `base`: the hits of a
/// child nobody follows are nobody's (and never the parent's).
fn privatize(base: *mut u8) {
    // SAFETY: replaces our own mapping of SIZE bytes in place.
    unsafe {
        libc::mmap(
            base.cast(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    // Ordering: Relaxed — the child has one thread.
    STAMP.store(0, Ordering::Relaxed);
    USED.store(CAPACITY, Ordering::Relaxed);
}

/// In the child of a fork (one thread): its own file, with the parent's
/// contents, mapped where the parent's was; or, when the child is not
/// followed (or that fails), private memory there.
pub fn forked(follow: bool) {
    // Ordering: Relaxed — the child has one thread.
    let base = BASE.load(Ordering::Relaxed);
    if base.is_null() {
        return;
    }
    let Some(f) = follow.then(create).flatten() else {
        return privatize(base);
    };
    // Ordering: Relaxed — the child has one thread.
    let used = (used_slot(base).load(Ordering::Relaxed) as usize).min(CAPACITY);
    // SAFETY: the mapping's first bytes, header and records in use.
    let bytes = unsafe { std::slice::from_raw_parts(base, HEADER + RECORD * used) };
    let copied = std::io::Write::write_all(&mut &f, bytes).is_ok();
    if !copied || map(&f, base).is_none() {
        privatize(base);
    }
}

/// Takes back a counter of [`counter`] that will never count (its attach
/// failed): the command skips records whose tool is empty. Normal context.
pub fn retire(c: &AtomicU64) {
    // The record's text follows its counter.
    let text = c.as_ptr().cast::<u8>().wrapping_add(8);
    // Ordering: Acquire — pairs with the Release store in `init`.
    let base = BASE.load(Ordering::Acquire);
    let inside = !base.is_null()
        && (base as usize + HEADER..base as usize + HEADER + RECORD * CAPACITY)
            .contains(&(text as usize));
    if inside {
        // SAFETY: the text of a record of the mapping, written by `counter`.
        unsafe { text.write(0) };
    }
}
