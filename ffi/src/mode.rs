//! `probert_mode`: which mechanism serves a probed address, chosen per
//! consumer at attach (`probert_attach_opts`) and read back with
//! `probert_probe_mode`.
//!
//! # Safety
//!
//! Reads the caller's `probert_attach_opts` (only the `size` bytes it says it
//! has) and writes the caller's `probert_mode` out-parameter.
#![allow(unsafe_code)]

use std::ffi::c_void;

use core_rt::Mode;
use libc::size_t;

use crate::from_c;
use crate::status::probert_status::{self, *};

/// The mechanism serving a probed address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum probert_mode {
    /// Fast where the site allows it, else trap (the default).
    PROBERT_MODE_AUTO = 0,
    /// Keep the site on the int3 path while this consumer is attached.
    PROBERT_MODE_TRAP = 1,
    /// PROBERT_ERR_UNSUPPORTED_INSN unless the site can be fast.
    PROBERT_MODE_FAST = 2,
}

impl From<Mode> for probert_mode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Auto => probert_mode::PROBERT_MODE_AUTO,
            Mode::Trap => probert_mode::PROBERT_MODE_TRAP,
            Mode::Fast => probert_mode::PROBERT_MODE_FAST,
        }
    }
}

/// Options of `probert_attach_ex`. Set `size` to
/// `sizeof(probert_attach_opts)`: the struct may grow at the end, and `size`
/// tells probert which fields the caller knows. A larger `size` (a newer
/// header) is accepted if every byte past the fields this library knows is
/// zero.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct probert_attach_opts {
    /// `sizeof(probert_attach_opts)`.
    pub size: size_t,
    /// The mechanism (default PROBERT_MODE_AUTO).
    pub mode: from_c::probert_mode,
}

/// The largest `size` accepted (as Linux's `copy_struct_from_user`).
const MAX_OPTS_SIZE: usize = 4096;

/// Reads and validates the options `opts` points at (NULL: the defaults).
pub(crate) fn read_opts(opts: *const probert_attach_opts) -> Result<Mode, probert_status> {
    if opts.is_null() {
        return Ok(Mode::Auto);
    }
    // SAFETY: not NULL; by the C contract `opts` points at a readable
    // `probert_attach_opts` whose first field is its size.
    let size = unsafe { std::ptr::addr_of!((*opts).size).read() };
    let known = std::mem::size_of::<probert_attach_opts>();
    if !(known..=MAX_OPTS_SIZE).contains(&size) {
        return Err(PROBERT_ERR_INVALID_ARGUMENT);
    }
    // SAFETY: the caller says `size` bytes are readable at `opts`, and
    // `size >= known`.
    let tail = unsafe { std::slice::from_raw_parts(opts.cast::<u8>().add(known), size - known) };
    if tail.iter().any(|&b| b != 0) {
        return Err(PROBERT_ERR_INVALID_ARGUMENT);
    }
    // SAFETY: `size >= known`, so the field is there.
    let mode = unsafe { std::ptr::addr_of!((*opts).mode).read() };
    Mode::from_raw(mode).ok_or(PROBERT_ERR_INVALID_ARGUMENT)
}

/// Writes to `*out` the mechanism serving the probed address `addr` right now
/// (PROBERT_MODE_TRAP or PROBERT_MODE_FAST, never PROBERT_MODE_AUTO).
/// A site switches between the two as consumers that want the trap path come
/// and go.
///
/// Errors: PROBERT_ERR_NOT_FOUND (nothing is attached at `addr`),
/// PROBERT_ERR_INVALID_ARGUMENT (`addr` or `out` NULL, called from a
/// handler). On error `*out` is untouched.
/// Blocks: takes the writer lock; no grace period. From a handler: no.
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_probe_mode(
    addr: *const c_void,
    out: *mut probert_mode,
) -> probert_status {
    ffi_panic_boundary! {
        not_null!(addr);
        let out = not_null!(out);
        not_in_handler!();
        let mode = try_rt!(core_rt::probe_mode(addr as usize));
        // SAFETY: checked not NULL; the C contract is a writable
        // `probert_mode`. Written on success only.
        unsafe { out.write(mode.into()) };
        PROBERT_OK
    }
}
