//! `probert_consumer`: a handler attached to an instruction, and everything
//! about its life — attach (one, with options, or a batch), detach (now, or
//! without waiting plus one `probert_sync`, or a batch), statistics.
//!
//! A consumer handle is the runtime's `ConsumerId`: a slot index and a
//! generation bumped on every detach, so a stale, doubled or invented handle
//! is `PROBERT_ERR_NOT_FOUND`.
//!
//! # Safety
//!
//! - A C handler, `probert_action (*)(probert_hit *)`, is handed to the
//!   runtime as its `Handler`, `unsafe extern "C" fn(*mut Hit) -> u32`: the
//!   same calling convention and argument and return classes, a pointer to a
//!   struct of identical layout (asserted at compile time below) and a C enum
//!   read back as the `u32` it is represented by (validated by the runtime:
//!   anything but `PROBERT_REMOVE` continues).
//! - Arrays (`reqs`, `cs`, `out`) are read or written for the `n` elements
//!   the caller says they hold.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::mem::{align_of, offset_of, size_of};

use core_rt::{AttachReq, ConsumerId, Hit};
use libc::size_t;

use crate::from_c;
use crate::mode::{probert_attach_opts, read_opts};
use crate::regs::probert_regs;
use crate::status::probert_status::{self, *};

/// What a handler asks for after a hit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum probert_action {
    /// Keep the consumer attached.
    PROBERT_CONTINUE = 0,
    /// Detach this consumer: no further calls after the ones already running
    /// finish; its handle becomes stale.
    PROBERT_REMOVE = 1,
    /// From an entry handler: do not call this consumer's return handler for
    /// this invocation (elsewhere, the same as PROBERT_CONTINUE).
    PROBERT_NO_RETURN = 2,
}

/// One execution of a probed instruction, as a handler sees it.
#[repr(C)]
#[derive(Debug)]
pub struct probert_hit {
    /// The probed address.
    pub addr: usize,
    /// Registers at the probed instruction, writable (`probert_regs_set`);
    /// valid only during this handler call.
    pub regs: *mut probert_regs,
    /// As given at attach.
    pub user_data: *mut c_void,
    /// For a consumer with a return handler: 8 bytes private to this
    /// invocation of this consumer, zero at the entry hit, the same bytes at
    /// its return hit; NULL for consumers without `on_return`.
    pub session: *mut u64,
    /// 1 on a return hit (then `addr` is the function's entry and `regs` the
    /// state just after it returned), 0 on an entry or instruction hit.
    pub is_return: u32,
}

// `probert_hit` is the runtime's `Hit`, field for field.
const _: () = {
    assert!(size_of::<probert_hit>() == size_of::<Hit>());
    assert!(align_of::<probert_hit>() == align_of::<Hit>());
    assert!(offset_of!(probert_hit, addr) == offset_of!(Hit, addr));
    assert!(offset_of!(probert_hit, regs) == offset_of!(Hit, regs));
    assert!(offset_of!(probert_hit, user_data) == offset_of!(Hit, user_data));
    assert!(offset_of!(probert_hit, session) == offset_of!(Hit, session));
    assert!(offset_of!(probert_hit, is_return) == offset_of!(Hit, is_return));
};

/// Called on every hit, on whichever path serves the site. It may run in
/// signal context (the trap path, and any site while it switches mechanism),
/// so it must be async-signal-safe: atomics, probert_regs_get/set/arg,
/// write(2) — no malloc, no stdio, no locks another thread may hold, and none
/// of the probert calls documented "From a handler: no" (they return
/// PROBERT_ERR_INVALID_ARGUMENT there). It may run on several threads at
/// once. PROBERT_REG_RIP reads the probed address on every path; writes to
/// registers take effect when the hit resumes. A handler may call probed
/// code: that nested hit runs the instruction but no handler, and counts as
/// missed. Returning PROBERT_REMOVE detaches this consumer (no further calls
/// after the current ones finish; its handle becomes stale); any other value
/// continues.
pub type probert_handler =
    Option<unsafe extern "C" fn(hit: *mut probert_hit) -> from_c::probert_action>;

/// An attached consumer; 0 is never a valid handle.
pub type probert_consumer = u64;

/// One request of `probert_attach_batch`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct probert_attach_req {
    /// The instruction to probe.
    pub addr: *const c_void,
    /// The handler (not NULL).
    pub handler: probert_handler,
    /// Passed back in every hit.
    pub user_data: *mut c_void,
}

/// Statistics of one consumer. (Programs built against the 0.1 header,
/// whose struct ended after `missed`, keep getting exactly that: see
/// `probert_consumer_get_stats`.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct probert_consumer_stats {
    /// Entry (or instruction) handler calls.
    pub hits: u64,
    /// Hits skipped because the thread was already in a handler.
    pub missed: u64,
    /// Return handler calls.
    pub returns: u64,
    /// Invocations whose entry called this consumer and that left without
    /// returning (longjmp, an exception, the thread's exit), counted as
    /// they are found (a thread's exit by the next `probert_sync`).
    pub abandoned: u64,
}

/// The statistics struct of the 0.1 ABI.
#[repr(C)]
struct StatsV1 {
    hits: u64,
    missed: u64,
}

/// The runtime's view of a C handler.
pub(crate) fn runtime_handler(
    h: unsafe extern "C" fn(*mut probert_hit) -> from_c::probert_action,
) -> core_rt::Handler {
    // SAFETY: the two function pointer types differ only in the pointee of
    // the argument, and `probert_hit` has `Hit`'s layout (asserted above); the
    // return is the same `u32` (module Safety).
    unsafe {
        std::mem::transmute::<unsafe extern "C" fn(*mut probert_hit) -> u32, core_rt::Handler>(h)
    }
}

/// Stands in for a NULL handler in a batch; never attached (see
/// `probert_attach_batch`).
unsafe extern "C" fn never_called(_hit: *mut Hit) -> u32 {
    probert_action::PROBERT_CONTINUE as u32
}

/// `n` elements at `p` as a slice; `None` if `n` elements cannot be an
/// object (the caller's claim is impossible).
///
/// # Safety
/// `p` is not NULL and points at `n` initialised elements, unaliased by
/// writes for `'a`.
unsafe fn slice<'a, T>(p: *const T, n: usize) -> Option<&'a [T]> {
    if n.checked_mul(size_of::<T>())? > isize::MAX as usize {
        return None;
    }
    // SAFETY: forwarded contract; the size fits in `isize`.
    Some(unsafe { std::slice::from_raw_parts(p, n) })
}

/// Attaches `handler` to the instruction at `addr`, with `user_data` passed
/// back in every hit, and writes the consumer's handle to `*out`. Same as
/// `probert_attach_ex(addr, handler, user_data, NULL, out)`.
///
/// `addr` must be the first byte of an instruction, in code that stays mapped
/// while the probe is attached: an ELF module's executable segment (found on
/// demand) or a registered JIT region. Where the enclosing function's start is
/// known (an ELF symbol, a JIT region's start) probert checks the boundary
/// (PROBERT_ERR_MISALIGNED); elsewhere it cannot. Several consumers may share
/// one address. The handler may be called, on any thread, from before this
/// function returns until `probert_detach` (or `probert_sync` after
/// `probert_detach_nosync`) returns.
///
/// Errors: PROBERT_ERR_INVALID_ARGUMENT (`addr`, `handler` or `out` NULL, an
/// address inside probert itself, called from a handler),
/// PROBERT_ERR_NO_REGION, PROBERT_ERR_MISALIGNED, PROBERT_ERR_UNSUPPORTED_INSN,
/// PROBERT_ERR_CONFLICT (a foreign int3 at `addr`), PROBERT_ERR_PROTECT,
/// PROBERT_ERR_NO_MEMORY, PROBERT_ERR_SIGNAL (probert's SIGTRAP handler could
/// not be installed or was replaced). On error nothing is attached and `*out`
/// is untouched.
/// Blocks: takes the writer lock and writes code; no grace period.
/// From a handler: no. Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_attach(
    addr: *const c_void,
    handler: probert_handler,
    user_data: *mut c_void,
    out: *mut probert_consumer,
) -> probert_status {
    probert_attach_ex(addr, handler, user_data, std::ptr::null(), out)
}

/// `probert_attach` with options: `opts->mode` chooses the mechanism
/// (PROBERT_MODE_AUTO, the default, also when `opts` is NULL;
/// PROBERT_MODE_TRAP keeps the site on the int3 path while this consumer is
/// attached; PROBERT_MODE_FAST fails with PROBERT_ERR_UNSUPPORTED_INSN unless
/// the site can be fast: a 5-byte NOP, or a first instruction of at least 5
/// bytes that can be displaced, on a kernel with
/// `MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE`). A fast site is a `jmp` to a
/// per-site stub: handlers run without a signal, in a few nanoseconds. Set
/// `opts->size = sizeof(probert_attach_opts)`.
///
/// Errors: those of `probert_attach`, and PROBERT_ERR_INVALID_ARGUMENT for an
/// `opts->size` smaller than this library's `probert_attach_opts` (or larger
/// with nonzero bytes past the fields it knows, or over 4096) and for an
/// `opts->mode` that is no `probert_mode`. On error nothing is attached and
/// `*out` is untouched.
/// Blocks: takes the writer lock and writes code; no grace period.
/// From a handler: no. Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_attach_ex(
    addr: *const c_void,
    handler: probert_handler,
    user_data: *mut c_void,
    opts: *const probert_attach_opts,
    out: *mut probert_consumer,
) -> probert_status {
    ffi_panic_boundary! {
        not_null!(addr);
        let Some(handler) = handler else {
            return PROBERT_ERR_INVALID_ARGUMENT;
        };
        let out = not_null!(out);
        let opts = match read_opts(opts) {
            Ok(o) => o,
            Err(s) => return s,
        };
        not_in_handler!();
        // SAFETY: the C contract of this function (documented above) is the
        // runtime's: `addr` starts an instruction in code that stays mapped,
        // and the handlers are async-signal-safe.
        let id = try_rt!(unsafe {
            core_rt::attach_with(addr as usize, runtime_handler(handler), user_data, opts)
        });
        // SAFETY: checked not NULL; the C contract is a writable
        // `probert_consumer`. Written on success only.
        unsafe { out.write(id.0) };
        PROBERT_OK
    }
}

/// Attaches `n` consumers, all or nothing, and writes their handles to
/// `out[0]` … `out[n - 1]` (in request order). Requests may share addresses
/// (several consumers on one probe). Each request is as `probert_attach`,
/// with PROBERT_MODE_AUTO.
///
/// On error nothing is attached, `out` is untouched, and `*err_index` (if
/// `err_index` is not NULL) names the first request that failed — requests
/// are checked in order — or is `n` when the failure concerns no single
/// request (`reqs` or `out` NULL, called from a handler). On success
/// `*err_index` is untouched. `n == 0` succeeds and does nothing (`reqs` and
/// `out` may then be NULL).
///
/// Errors: those of `probert_attach`, for the request named by `*err_index`.
/// Blocks: takes the writer lock and writes code (once for the batch); no
/// grace period. From a handler: no. Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_attach_batch(
    reqs: *const probert_attach_req,
    n: size_t,
    out: *mut probert_consumer,
    err_index: *mut size_t,
) -> probert_status {
    probert_attach_batch_ex(reqs, n, std::ptr::null(), out, err_index)
}

/// `probert_attach_batch` with the same options for every request (as
/// `probert_attach_ex`'s; NULL: the defaults). All or nothing, as
/// `probert_attach_batch`; an error in `opts` itself is reported with
/// `*err_index = n`.
///
/// Errors: those of `probert_attach_ex`, for the request named by
/// `*err_index`.
/// Blocks: takes the writer lock and writes code (once for the batch); no
/// grace period. From a handler: no. Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_attach_batch_ex(
    reqs: *const probert_attach_req,
    n: size_t,
    opts: *const probert_attach_opts,
    out: *mut probert_consumer,
    err_index: *mut size_t,
) -> probert_status {
    ffi_panic_boundary! {
        let fail = |index: usize, status: probert_status| {
            if !err_index.is_null() {
                // SAFETY: not NULL; the C contract is a writable `size_t`.
                unsafe { err_index.write(index) };
            }
            status
        };
        if n == 0 {
            return PROBERT_OK;
        }
        if reqs.is_null() || out.is_null() || core_rt::in_handler() {
            return fail(n, PROBERT_ERR_INVALID_ARGUMENT);
        }
        let opts = match read_opts(opts) {
            Ok(o) => o,
            Err(s) => return fail(n, s),
        };
        // SAFETY: not NULL; the C contract is `n` requests at `reqs`.
        let Some(reqs) = (unsafe { slice(reqs, n) }) else {
            return fail(n, PROBERT_ERR_INVALID_ARGUMENT);
        };
        // A NULL handler becomes a request for address 0 with a stand-in
        // handler: the runtime refuses address 0 when it reaches that request,
        // in order, so `err_index` names the first request that failed, NULL
        // handler or not, and the stand-in is never attached.
        let rt: Vec<AttachReq> = reqs
            .iter()
            .map(|r| match r.handler {
                Some(h) => AttachReq {
                    addr: r.addr as usize,
                    handler: runtime_handler(h),
                    user_data: r.user_data,
                },
                None => AttachReq {
                    addr: 0,
                    handler: never_called,
                    user_data: std::ptr::null_mut(),
                },
            })
            .collect();
        match core_rt::attach_batch_with(&rt, opts) {
            Ok(ids) if ids.len() == n => {
                for (i, id) in ids.iter().enumerate() {
                    // SAFETY: not NULL; the C contract is room for `n`
                    // handles at `out`, and `i < n`.
                    unsafe { out.add(i).write(id.0) };
                }
                PROBERT_OK
            }
            Ok(ids) => {
                // The runtime attached a different number of consumers:
                // report the bug, after detaching them (all or nothing).
                let _ = core_rt::detach_batch(&ids);
                fail(n, PROBERT_ERR_INTERNAL)
            }
            Err((index, e)) => fail(index.min(n), probert_status::from(&e)),
        }
    }
}

/// Detaches consumer `c` and waits until its handler can no longer run: after
/// it returns the handler is never called again for `c` and its user data may
/// be freed. Detaching the last consumer of an address restores the code
/// byte for byte. Same as `probert_detach_nosync(c)` then `probert_sync()`.
///
/// Errors: PROBERT_ERR_NOT_FOUND (unknown, stale, already detached — also by
/// a handler returning PROBERT_REMOVE or by `probert_region_remove` — or 0),
/// PROBERT_ERR_PROTECT (restoring the code failed),
/// PROBERT_ERR_INVALID_ARGUMENT (called from a handler: it would wait for
/// itself).
/// Blocks: yes, one grace period (until every running call of the handler
/// has returned), also when it returns PROBERT_ERR_NOT_FOUND: calls that
/// began before a PROBERT_REMOVE may still be running. From a handler: no.
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_detach(c: probert_consumer) -> probert_status {
    ffi_panic_boundary! {
        not_in_handler!();
        core_rt::detach(ConsumerId(c)).into()
    }
}

/// Detaches `n` consumers and waits one grace period for all of them
/// together (not one each): after it returns none of their handlers is
/// called again. All or nothing on handle validity: if any handle is unknown,
/// stale or 0 (PROBERT_ERR_NOT_FOUND) or appears twice in `cs`
/// (PROBERT_ERR_INVALID_ARGUMENT), nothing is detached. `n == 0` only waits
/// for a grace period (`cs` may then be NULL).
///
/// Errors: PROBERT_ERR_NOT_FOUND, PROBERT_ERR_INVALID_ARGUMENT (`cs` NULL
/// with `n > 0`, a handle twice, called from a handler), PROBERT_ERR_PROTECT
/// (restoring code failed).
/// Blocks: yes, one grace period. From a handler: no.
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_detach_batch(cs: *const probert_consumer, n: size_t) -> probert_status {
    ffi_panic_boundary! {
        not_in_handler!();
        let ids: Vec<ConsumerId> = if n == 0 {
            Vec::new()
        } else {
            not_null!(cs);
            // SAFETY: not NULL; the C contract is `n` handles at `cs`.
            let Some(cs) = (unsafe { slice(cs, n) }) else {
                return PROBERT_ERR_INVALID_ARGUMENT;
            };
            cs.iter().map(|&c| ConsumerId(c)).collect()
        };
        core_rt::detach_batch(&ids).into()
    }
}

/// Detaches consumer `c` without waiting: its handler may still be running,
/// or about to run, on other threads until the next `probert_sync` returns;
/// free its user data only after that. Detach many consumers this way, then
/// call `probert_sync` once: one grace period in total.
///
/// Errors: PROBERT_ERR_NOT_FOUND (unknown, stale, already detached, 0),
/// PROBERT_ERR_PROTECT (restoring the code failed),
/// PROBERT_ERR_INVALID_ARGUMENT (called from a handler).
/// Blocks: takes the writer lock and writes code; no grace period.
/// From a handler: no. Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_detach_nosync(c: probert_consumer) -> probert_status {
    ffi_panic_boundary! {
        not_in_handler!();
        core_rt::detach_nosync(ConsumerId(c)).into()
    }
}

/// Waits one grace period: every handler call that began before
/// `probert_sync` has returned when it returns, so the user data of every
/// consumer detached before the call may be freed. Also frees what earlier
/// detaches left for later.
///
/// Errors: PROBERT_ERR_INVALID_ARGUMENT (called from a handler: it would wait
/// for itself).
/// Blocks: yes, one grace period. From a handler: no.
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_sync() -> probert_status {
    ffi_panic_boundary! {
        not_in_handler!();
        core_rt::sync().into()
    }
}

/// Writes the statistics of consumer `c` to `*out`: handler calls so far,
/// hits skipped because the thread was already running a handler (missed),
/// and for a consumer with a return handler its return calls and abandoned
/// invocations. The counts are read without stopping the handlers.
///
/// The header makes `probert_consumer_get_stats(c, out)` a macro for
/// `probert_consumer_get_stats_sized(c, out, sizeof(probert_consumer_stats))`, so a program
/// fills the struct of the header it was built with. This function itself
/// is what programs built against the 0.1 header call: it writes the 0.1
/// struct (`hits` and `missed`, 16 bytes) — as does a call through its
/// address.
///
/// Errors: PROBERT_ERR_NOT_FOUND (unknown, stale, already detached, 0),
/// PROBERT_ERR_INVALID_ARGUMENT (`out` NULL, called from a handler). On error
/// `*out` is untouched.
/// Blocks: takes the writer lock; no grace period. From a handler: no.
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_consumer_get_stats(
    c: probert_consumer,
    out: *mut probert_consumer_stats,
) -> probert_status {
    probert_consumer_get_stats_sized(c, out, size_of::<StatsV1>())
}

/// Writes the first `size` bytes (at most `sizeof(probert_consumer_stats)`)
/// of consumer `c`'s statistics (see `probert_consumer_get_stats`) to
/// `*out`: a caller passes the size of the struct it knows.
///
/// Errors: those of `probert_consumer_get_stats`, and
/// PROBERT_ERR_INVALID_ARGUMENT for a `size` of 0 or not a multiple of 8
/// (a whole number of counters). A larger struct than this library's is
/// accepted: only the counters it knows are written.
/// Blocks: takes the writer lock; no grace period. From a handler: no.
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_consumer_get_stats_sized(
    c: probert_consumer,
    out: *mut probert_consumer_stats,
    size: size_t,
) -> probert_status {
    ffi_panic_boundary! {
        let out = not_null!(out);
        if size == 0 || size % 8 != 0 {
            return PROBERT_ERR_INVALID_ARGUMENT;
        }
        not_in_handler!();
        let s = try_rt!(core_rt::stats(ConsumerId(c)));
        let all = probert_consumer_stats {
            hits: s.hits,
            missed: s.missed,
            returns: s.returns,
            abandoned: s.abandoned,
        };
        let n = size.min(size_of::<probert_consumer_stats>());
        // SAFETY: checked not NULL; the C contract is `size` writable bytes
        // at `out`, and `n` is at most that and at most the struct's size.
        // Written on success only.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&all as *const probert_consumer_stats).cast::<u8>(),
                out.cast::<u8>(),
                n,
            )
        };
        PROBERT_OK
    }
}
