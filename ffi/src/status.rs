//! Status codes, their text, the library version and `probert_init`.
//!
//! Status numbers are explicit and never reused: a code that is retired stays
//! reserved. New codes go before `PROBERT_ERR_INTERNAL` with the next free
//! number.
//!
//! # Safety
//!
//! `#[no_mangle]` exports only (the functions take no pointers).
#![allow(unsafe_code)]

use std::ffi::c_char;

use core_rt::Error;

use crate::from_c;

/// The result of every probert call that returns a status.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum probert_status {
    /// Success.
    PROBERT_OK = 0,
    /// NULL where not allowed, zero length, bad enum, or a call from inside a
    /// handler that may not be made there.
    PROBERT_ERR_INVALID_ARGUMENT = 1,
    /// The address lies in no known code region.
    PROBERT_ERR_NO_REGION = 2,
    /// The new region overlaps a registered one.
    PROBERT_ERR_REGION_OVERLAP = 3,
    /// The instruction cannot be decoded or relocated (or a fast probe was
    /// asked for where the site cannot be fast).
    PROBERT_ERR_UNSUPPORTED_INSN = 4,
    /// An unknown, stale or already-detached handle.
    PROBERT_ERR_NOT_FOUND = 5,
    /// The address already holds an int3 that is not ours.
    PROBERT_ERR_CONFLICT = 6,
    /// A page protection change or code write failed (including a region's
    /// write callback returning nonzero).
    PROBERT_ERR_PROTECT = 7,
    /// An allocation, a mapping or a table ran out.
    PROBERT_ERR_NO_MEMORY = 8,
    /// The SIGTRAP handler could not be installed (or was replaced by the host
    /// after probert installed it, without `probert_sigtrap_chained`); or the
    /// thread-scan signal's: the host handles it; or no memory barrier is
    /// available (see `probert_init`).
    PROBERT_ERR_SIGNAL = 9,
    /// The address is not on an instruction boundary of its function.
    PROBERT_ERR_MISALIGNED = 10,
    /// The code under the probe no longer holds what probert wrote there:
    /// the host rewrote, freed, unmapped or unloaded it. The probe is
    /// retired: nothing is written there again, and its consumers get no
    /// more hits but stay attached (handles and statistics work) until
    /// detached, which succeeds without writing. Returned by
    /// `probert_probe_mode` for such a probe, and by `probert_code_write`.
    PROBERT_ERR_CODE_CHANGED = 11,
    /// A bug: a caught panic, an invariant broken.
    PROBERT_ERR_INTERNAL = 255,
}

use probert_status::*;

impl probert_status {
    /// Every status, for `probert_status_str` and the tests.
    pub(crate) const ALL: [probert_status; 13] = [
        PROBERT_OK,
        PROBERT_ERR_INVALID_ARGUMENT,
        PROBERT_ERR_NO_REGION,
        PROBERT_ERR_REGION_OVERLAP,
        PROBERT_ERR_UNSUPPORTED_INSN,
        PROBERT_ERR_NOT_FOUND,
        PROBERT_ERR_CONFLICT,
        PROBERT_ERR_PROTECT,
        PROBERT_ERR_NO_MEMORY,
        PROBERT_ERR_SIGNAL,
        PROBERT_ERR_MISALIGNED,
        PROBERT_ERR_CODE_CHANGED,
        PROBERT_ERR_INTERNAL,
    ];

    /// The status numbered `raw`, if there is one.
    pub fn from_raw(raw: from_c::probert_status) -> Option<probert_status> {
        Self::ALL.into_iter().find(|s| *s as u32 == raw)
    }

    /// The static text of this status.
    pub fn text(self) -> &'static std::ffi::CStr {
        match self {
            PROBERT_OK => c"success",
            PROBERT_ERR_INVALID_ARGUMENT => c"invalid argument",
            PROBERT_ERR_NO_REGION => c"address lies in no known code region",
            PROBERT_ERR_REGION_OVERLAP => c"region overlaps a registered region",
            PROBERT_ERR_UNSUPPORTED_INSN => c"instruction cannot be decoded or relocated",
            PROBERT_ERR_NOT_FOUND => c"unknown, stale or already-detached handle",
            PROBERT_ERR_CONFLICT => c"address already holds an int3 that is not probert's",
            PROBERT_ERR_PROTECT => c"page protection change or code write failed",
            PROBERT_ERR_NO_MEMORY => c"out of memory",
            PROBERT_ERR_SIGNAL => c"a signal handler could not be installed or was replaced",
            PROBERT_ERR_MISALIGNED => c"address is not on an instruction boundary",
            PROBERT_ERR_CODE_CHANGED => {
                c"the host changed or freed the code under the probe: the probe is retired"
            }
            PROBERT_ERR_INTERNAL => c"internal error (a bug in probert)",
        }
    }
}

impl From<&Error> for probert_status {
    fn from(e: &Error) -> Self {
        // Every number `status_code` gives is a status here (the tests
        // check each variant).
        probert_status::from_raw(e.status_code()).unwrap_or(PROBERT_ERR_INTERNAL)
    }
}

impl From<core_rt::Result<()>> for probert_status {
    fn from(r: core_rt::Result<()>) -> Self {
        match r {
            Ok(()) => PROBERT_OK,
            Err(e) => probert_status::from(&e),
        }
    }
}

/// Returns static, NUL-terminated English text for the status `s`: a short
/// description of what went wrong ("success" for `PROBERT_OK`).
///
/// Total over every integer: a value that is no `probert_status` (e.g. a
/// number from a newer header) gets "unknown status code". Never returns NULL;
/// the text must not be freed or modified.
///
/// Errors: none. Blocks: no. From a handler: yes (async-signal-safe).
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_status_str(s: from_c::probert_status) -> *const c_char {
    ffi_panic_boundary! {
        match probert_status::from_raw(s) {
            Some(s) => s.text().as_ptr(),
            None => c"unknown status code".as_ptr(),
        }
    }
}

/// Returns the version of libprobert as static, NUL-terminated text, e.g.
/// "0.2.0". Never returns NULL.
///
/// Errors: none. Blocks: no. From a handler: yes (async-signal-safe).
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_version() -> *const c_char {
    ffi_panic_boundary! {
        VERSION_C.as_ptr().cast()
    }
}

/// The version, NUL-terminated (the runtime's version: one workspace version).
const VERSION_C: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

/// Initialises probert: installs the SIGTRAP handler (a SIGTRAP that is not
/// a probe's then does what the disposition it replaced would have done),
/// the thread-scan signal's handler (`SIGRTMAX - 1`, or the one chosen with
/// `probert_set_scan_signal` or `PROBERT_SCAN_SIGNAL`; none with
/// `probert_use_quiescent_points`), chooses the memory barrier of grace
/// periods (`membarrier(2)`, else signals or quiescent points) and installs
/// the fork handlers. Idempotent; every other call initialises lazily, so
/// calling it is optional — call it early to learn of failures early, and
/// before the host installs SIGTRAP handlers of its own (which must then
/// chain to probert's: `probert_sigtrap_chained`).
///
/// Errors: PROBERT_ERR_SIGNAL (the signal handlers could not be installed,
/// the scan signal has a handler of the host's, or no real memory barrier is
/// available: no `membarrier(2)` and neither the scan signal with
/// `/proc/self/task` nor quiescent points), PROBERT_ERR_NO_MEMORY,
/// PROBERT_ERR_INVALID_ARGUMENT (called from a handler; `PROBERT_SCAN_SIGNAL`
/// names no real-time signal).
/// Blocks: takes the writer lock (briefly); no grace period.
/// From a handler: no. Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_init() -> probert_status {
    ffi_panic_boundary! {
        not_in_handler!();
        core_rt::init().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_api_md() {
        let expect = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 255];
        for (s, n) in probert_status::ALL.iter().zip(expect) {
            assert_eq!(*s as u32, n);
            assert_eq!(probert_status::from_raw(n), Some(*s));
        }
        for n in [12, 13, 254, 256, u32::MAX] {
            assert_eq!(probert_status::from_raw(n), None);
        }
    }

    #[test]
    fn every_error_has_its_status() {
        use std::borrow::Cow;
        let errors = [
            (
                Error::InvalidArgument(Cow::Borrowed("")),
                PROBERT_ERR_INVALID_ARGUMENT,
            ),
            (Error::NoRegion { addr: 0 }, PROBERT_ERR_NO_REGION),
            (
                Error::RegionOverlap {
                    start: 0,
                    end: 1,
                    other_start: 0,
                    other_end: 1,
                },
                PROBERT_ERR_REGION_OVERLAP,
            ),
            (
                Error::UnsupportedInstruction {
                    addr: 0,
                    reason: Cow::Borrowed(""),
                },
                PROBERT_ERR_UNSUPPORTED_INSN,
            ),
            (Error::NotFound, PROBERT_ERR_NOT_FOUND),
            (Error::Conflict { addr: 0 }, PROBERT_ERR_CONFLICT),
            (
                Error::Protect {
                    addr: 0,
                    reason: Cow::Borrowed(""),
                },
                PROBERT_ERR_PROTECT,
            ),
            (Error::NoMemory(Cow::Borrowed("")), PROBERT_ERR_NO_MEMORY),
            (Error::Signal(Cow::Borrowed("")), PROBERT_ERR_SIGNAL),
            (
                Error::Misaligned { addr: 1, func: 0 },
                PROBERT_ERR_MISALIGNED,
            ),
            (Error::CodeChanged { addr: 0 }, PROBERT_ERR_CODE_CHANGED),
            (Error::Internal(Cow::Borrowed("")), PROBERT_ERR_INTERNAL),
        ];
        for (e, s) in errors {
            assert_eq!(probert_status::from(&e), s, "{e:?}");
        }
    }

    #[test]
    fn version_matches_runtime() {
        assert_eq!(&VERSION_C[..VERSION_C.len() - 1], core_rt::VERSION);
    }
}
