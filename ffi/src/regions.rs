//! `probert_region`: code a host generates at run time (JIT code).
//!
//! ELF code needs no region. A JIT registers each block of executable memory
//! before probing inside it and removes it before freeing or reusing the
//! memory. A region may carry a write callback for memory whose executable
//! view is never writable (a dual-mapped memfd): the callback is wrapped in a
//! Rust closure and handed to the runtime as the region's writer.
//!
//! # Safety
//!
//! Dereferences the `probert_region_desc` and its `name` (a NUL-terminated
//! string) the caller passes, and calls the C write callback with the
//! executable address, the bytes and the context it registered: by the C
//! contract, the callback and its context stay valid until
//! `probert_region_remove` returns.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr};

use core_rt::{RegionDesc, RegionId};
use libc::size_t;

use crate::status::probert_status::{self, *};

/// A registered region; 0 is never a valid handle. Identifiers are never
/// reused, so a removed region's handle stays stale.
pub type probert_region = u64;

/// Writes `len` code bytes from `src` at `dst`, an address in the region's
/// *executable* view (translate it to the writable view); returns 0 on
/// success. Called by probert in normal context (never from a signal handler),
/// one call at a time, while attaching and detaching.
pub type probert_write_fn = Option<
    unsafe extern "C" fn(
        dst: *mut c_void,
        src: *const c_void,
        len: size_t,
        ctx: *mut c_void,
    ) -> c_int,
>;

/// A JIT region to register.
#[repr(C)]
#[derive(Debug)]
pub struct probert_region_desc {
    /// First byte of the code; also taken as a function start, so attach
    /// checks instruction boundaries by decoding forward from it.
    pub start: *const c_void,
    /// Length in bytes (not 0).
    pub len: size_t,
    /// A name for messages; copied; may be NULL.
    pub name: *const c_char,
    /// NULL: probert writes code bytes itself (through /proc/self/mem, or a
    /// brief RWX protection change). Else called to write code bytes; returns
    /// 0 on success.
    pub write: probert_write_fn,
    /// Passed to `write`.
    pub write_ctx: *mut c_void,
}

/// The Rust writer for a C callback: the callback and its context, the
/// context kept as an integer so the closure is `Send + Sync` (the C contract
/// makes it usable from whichever thread attaches or detaches).
fn writer(
    write: unsafe extern "C" fn(*mut c_void, *const c_void, usize, *mut c_void) -> c_int,
    ctx: *mut c_void,
) -> Box<core_rt::WriteFn> {
    let ctx = ctx as usize;
    Box::new(move |dst: usize, src: &[u8]| {
        // SAFETY: the host registered `write` and `ctx` for this region and
        // keeps them valid until `probert_region_remove` returns; `src` is a
        // live slice of `len` bytes; `dst` lies inside the region.
        let rc = unsafe {
            write(
                dst as *mut c_void,
                src.as_ptr().cast(),
                src.len(),
                ctx as *mut c_void,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!("the C write callback returned {rc}"))
        }
    })
}

/// Registers `[start, start + len)` as a JIT region, so that probes can be
/// attached inside it, and writes its handle to `*out`.
///
/// The region's start is taken as a function start: attach decodes forward
/// from it and refuses addresses inside an instruction. The name is copied.
/// The desc need not outlive the call; `write` and `write_ctx` must stay
/// valid until `probert_region_remove` returns.
///
/// Errors: PROBERT_ERR_INVALID_ARGUMENT (`desc` or `out` NULL, `start` NULL,
/// `len` 0, the range wraps around, called from a handler),
/// PROBERT_ERR_REGION_OVERLAP (overlaps a registered region),
/// PROBERT_ERR_SIGNAL / PROBERT_ERR_NO_MEMORY (lazy initialisation failed).
/// On error nothing is registered and `*out` is untouched.
/// Blocks: takes the writer lock; no grace period. From a handler: no.
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_region_add(
    desc: *const probert_region_desc,
    out: *mut probert_region,
) -> probert_status {
    ffi_panic_boundary! {
        let desc = try_ref!(desc);
        let out = not_null!(out);
        not_in_handler!();
        let name = if desc.name.is_null() {
            String::from("JIT region")
        } else {
            // SAFETY: not NULL; the C contract is a NUL-terminated string.
            unsafe { CStr::from_ptr(desc.name) }.to_string_lossy().into_owned()
        };
        let id = try_rt!(core_rt::region_add(RegionDesc {
            start: desc.start as usize,
            len: desc.len,
            name,
            write: desc.write.map(|w| writer(w, desc.write_ctx)),
        }));
        // SAFETY: checked not NULL; the C contract is a writable
        // `probert_region`. Written on success only.
        unsafe { out.write(id.0) };
        PROBERT_OK
    }
}

/// Removes a region: detaches every consumer of every probe inside it
/// (restoring the code byte for byte), waits one grace period, then forgets
/// the region. After it returns probert never reads or writes that memory
/// again, never calls its write callback, and the handles of those consumers
/// are stale. Call it before freeing or reusing the memory.
///
/// Errors: PROBERT_ERR_NOT_FOUND (unknown, stale or already removed handle,
/// including 0), PROBERT_ERR_PROTECT (restoring the code failed, e.g. the
/// write callback returned nonzero), PROBERT_ERR_INVALID_ARGUMENT (called
/// from a handler).
/// Blocks: yes, one grace period (until every handler running in the region
/// has returned). From a handler: no. Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_region_remove(region: probert_region) -> probert_status {
    ffi_panic_boundary! {
        not_in_handler!();
        core_rt::region_remove(RegionId(region)).into()
    }
}

/// `probert_region_opts.flags`: let probes be attached where the region's
/// memory is mapped readable but not executable (a buffer the host emits
/// into read-write and makes executable later, or code it executes from
/// another mapping). Without it, attaching there fails with
/// PROBERT_ERR_PROTECT and writes nothing. Memory that is not mapped
/// readable at all (PROT_NONE, unmapped) is refused either way.
pub const PROBERT_REGION_ANY_PROTECTION: u32 = 1;

/// Options of `probert_region_add_ex`; may grow at the end.
#[repr(C)]
#[derive(Debug)]
pub struct probert_region_opts {
    /// `sizeof(probert_region_opts)`: lets the struct grow. A smaller size
    /// from an older header is accepted; the fields it lacks read as zero.
    pub size: size_t,
    /// `PROBERT_REGION_*` flags; unknown bits are PROBERT_ERR_INVALID_ARGUMENT.
    pub flags: u32,
}

/// `probert_region_add` with options (`opts` may be NULL: the defaults).
///
/// What a region may be (both calls): at most 1 TiB, in user space,
/// overlapping no registered region, with something mapped in it. Parts of
/// it may be reserved (`PROT_NONE`), unmapped, or not executable yet:
/// attaching there fails with PROBERT_ERR_PROTECT and changes nothing, and
/// works once the host has committed the memory and made it executable.
///
/// Errors: as `probert_region_add`; PROBERT_ERR_INVALID_ARGUMENT also for a
/// too small `opts->size`, unknown flags, a region larger than 1 TiB or
/// outside user space, or one where nothing is mapped.
/// Blocks: takes the writer lock. From a handler: no. Thread safety: any.
#[no_mangle]
pub extern "C" fn probert_region_add_ex(
    desc: *const probert_region_desc,
    opts: *const probert_region_opts,
    out: *mut probert_region,
) -> probert_status {
    ffi_panic_boundary! {
        let desc = try_ref!(desc);
        let out = not_null!(out);
        not_in_handler!();
        let mut flags = 0u32;
        if !opts.is_null() {
            // SAFETY: not NULL; the C contract is a readable struct of at
            // least `size` bytes, and `size` comes first.
            let size = unsafe { std::ptr::addr_of!((*opts).size).read() };
            if size < std::mem::size_of::<size_t>() {
                return PROBERT_ERR_INVALID_ARGUMENT;
            }
            if size >= std::mem::offset_of!(probert_region_opts, flags) + 4 {
                // SAFETY: the caller's struct holds `flags` (by `size`).
                flags = unsafe { std::ptr::addr_of!((*opts).flags).read() };
            }
        }
        if flags & !PROBERT_REGION_ANY_PROTECTION != 0 {
            return PROBERT_ERR_INVALID_ARGUMENT;
        }
        let name = if desc.name.is_null() {
            String::from("JIT region")
        } else {
            // SAFETY: not NULL; the C contract is a NUL-terminated string.
            unsafe { CStr::from_ptr(desc.name) }.to_string_lossy().into_owned()
        };
        let id = try_rt!(core_rt::region_add_with(
            RegionDesc {
                start: desc.start as usize,
                len: desc.len,
                name,
                write: desc.write.map(|w| writer(w, desc.write_ctx)),
            },
            core_rt::RegionOptions {
                any_protection: flags & PROBERT_REGION_ANY_PROTECTION != 0,
            },
        ));
        // SAFETY: checked not NULL; written on success only.
        unsafe { out.write(id.0) };
        PROBERT_OK
    }
}

/// `probert_region_remove` for memory the host has already freed, unmapped
/// or reused: probert reads and writes none of it (and never calls its
/// write callback again) — the probes inside are retired as they are, their
/// consumers detached, their stubs recycled — waits one grace period, and
/// forgets the region.
///
/// (`probert_region_remove` itself also works after the memory is gone: it
/// restores only code that still holds probert's bytes and skips memory
/// that is not mapped. This call is for memory that may already hold other
/// code, and costs no reads.)
///
/// Errors: PROBERT_ERR_NOT_FOUND (unknown or stale handle),
/// PROBERT_ERR_INVALID_ARGUMENT (from a handler).
/// Blocks: one grace period. From a handler: no. Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_region_remove_gone(region: probert_region) -> probert_status {
    ffi_panic_boundary! {
        not_in_handler!();
        core_rt::region_remove_gone(RegionId(region)).into()
    }
}

/// Writes `len` bytes from `src` at `addr`, inside a registered JIT region,
/// keeping the probes there coherent: the host's way to patch code under
/// probes (inline caches, trace linking, deoptimisation, OSR).
///
/// Each probe whose instruction the write changes keeps its int3 while the
/// rest of the new bytes land behind it, cores are serialised, and the probe
/// is re-derived from the new code (a thread reaching it runs the old or
/// the new instruction, never a mix; its consumers are called throughout),
/// or retired when the new code cannot be probed there (no longer an
/// instruction boundary, an instruction probert cannot displace): then the
/// new bytes are in place without the int3, and `probert_probe_mode` says
/// PROBERT_ERR_CODE_CHANGED until its consumers are detached. `*retired`
/// (if not NULL) is set to the number of probes retired. Bytes no probe
/// covers are written as the host's own write would write them.
///
/// Code the host writes behind probert's back is found at probert's next
/// write there: nothing is written over it and the probe is retired.
///
/// Errors: PROBERT_ERR_INVALID_ARGUMENT (`src` NULL, `len` 0, a range that
/// leaves its region, from a handler), PROBERT_ERR_NO_REGION (not in a JIT
/// region), PROBERT_ERR_PROTECT (the write failed; the probes are as they
/// were). Blocks: writer lock, a few core serialisations. From a handler: no.
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_code_write(
    addr: *const c_void,
    src: *const c_void,
    len: size_t,
    retired: *mut size_t,
) -> probert_status {
    ffi_panic_boundary! {
        if src.is_null() || len == 0 {
            return PROBERT_ERR_INVALID_ARGUMENT;
        }
        not_in_handler!();
        // SAFETY: not NULL; the C contract is `len` readable bytes.
        let bytes = unsafe { std::slice::from_raw_parts(src.cast::<u8>(), len) };
        let report = try_rt!(core_rt::code_write(addr as usize, bytes));
        let n = report
            .iter()
            .filter(|r| matches!(r, core_rt::Rewritten::Retired { .. }))
            .count();
        if !retired.is_null() {
            // SAFETY: not NULL; the C contract is a writable `size_t`.
            unsafe { retired.write(n) };
        }
        PROBERT_OK
    }
}
