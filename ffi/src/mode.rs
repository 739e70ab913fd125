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

/// Options of `probert_attach_ex` and `probert_attach_batch_ex`. Set `size`
/// to `sizeof(probert_attach_opts)`: the struct may grow at the end, and
/// `size` tells probert which fields the caller knows. The size of an older
/// header's struct (16 bytes, 0.1) is always accepted: the fields it does
/// not reach read as zero. A larger one (a newer header) is accepted if
/// every byte past the fields this library knows is zero.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct probert_attach_opts {
    /// `sizeof(probert_attach_opts)`.
    pub size: size_t,
    /// The mechanism (default PROBERT_MODE_AUTO).
    pub mode: from_c::probert_mode,
    /// If not NULL, `addr` must be a function's entry
    /// (PROBERT_ERR_MISALIGNED otherwise), and `on_return` is called once
    /// for every normal return of every invocation whose entry hit called
    /// this consumer, with `hit->is_return = 1`, `hit->addr` the function's
    /// entry, `hit->session` the invocation's session word, and `regs` the
    /// state just after the return: RIP the return address in the caller,
    /// RSP the caller's stack pointer, RAX/RDX (and xmm0/xmm1) the value
    /// returned; writes take effect, so a return handler may change the
    /// value the caller receives. A tail call out of the function returns
    /// when the callee returns. probert finds the function's returns in its
    /// machine code (its `ret`s and those of the functions it tail-calls,
    /// followed); where it cannot find them all (an indirect jump that may
    /// go anywhere) the attach fails with PROBERT_ERR_UNSUPPORTED_INSN
    /// saying why. The program cannot tell a return is pending: its stack
    /// is not touched (unwinders, `backtrace()`,
    /// `__builtin_return_address` and `dlsym(RTLD_NEXT, ...)` see the real
    /// return addresses). An invocation left by `longjmp`, a C++ exception,
    /// `pthread_exit` or cancellation gets no return hit and counts in
    /// `abandoned`.
    pub on_return: crate::consumers::probert_handler,
}

/// `sizeof(probert_attach_opts)` in older headers (0.1: `size` and
/// `mode`), always accepted; a size that cuts a field is not.
const OLDER_SIZES: [usize; 1] = [16];

/// The largest `size` accepted (as Linux's `copy_struct_from_user`).
const MAX_OPTS_SIZE: usize = 4096;

/// Reads and validates the options `opts` points at (NULL: the defaults).
pub(crate) fn read_opts(
    opts: *const probert_attach_opts,
) -> Result<core_rt::AttachOptions, probert_status> {
    if opts.is_null() {
        return Ok(core_rt::AttachOptions::default());
    }
    // SAFETY: not NULL; by the C contract `opts` points at a readable
    // `probert_attach_opts` whose first field is its size.
    let size = unsafe { std::ptr::addr_of!((*opts).size).read() };
    let known = std::mem::size_of::<probert_attach_opts>();
    if !(OLDER_SIZES.contains(&size) || (known..=MAX_OPTS_SIZE).contains(&size)) {
        return Err(PROBERT_ERR_INVALID_ARGUMENT);
    }
    // What the caller gave, zero-extended to the struct this library knows.
    let mut copy = [0u8; std::mem::size_of::<probert_attach_opts>()];
    let have = size.min(known);
    // SAFETY: the caller says `size` bytes are readable at `opts`; `have`
    // is at most that and at most the copy's size.
    unsafe { std::ptr::copy_nonoverlapping(opts.cast::<u8>(), copy.as_mut_ptr(), have) };
    if size > known {
        // SAFETY: the caller says `size` bytes are readable at `opts`.
        let tail =
            unsafe { std::slice::from_raw_parts(opts.cast::<u8>().add(known), size - known) };
        if tail.iter().any(|&b| b != 0) {
            return Err(PROBERT_ERR_INVALID_ARGUMENT);
        }
    }
    // SAFETY: `copy` holds a `probert_attach_opts`: every field is an
    // integer or an optional function pointer (all-zero is None), and the
    // bytes the caller did not give are zero.
    let o: probert_attach_opts = unsafe { std::ptr::read_unaligned(copy.as_ptr().cast()) };
    let mode = Mode::from_raw(o.mode).ok_or(PROBERT_ERR_INVALID_ARGUMENT)?;
    Ok(core_rt::AttachOptions {
        mode,
        on_return: o.on_return.map(crate::consumers::runtime_handler),
    })
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
