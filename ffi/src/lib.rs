//! # libprobert — the C ABI of probert
//!
//! This crate builds `libprobert.so` and `libprobert.a` and, through cbindgen,
//! `include/probert.h`. It wraps the Rust API of the runtime crate (imported
//! as `core_rt`) and adds nothing to the engine: every exported function
//! checks its arguments, calls the runtime, and turns the result into a
//! [`probert_status`](status::probert_status).
//!
//! # The boundary
//!
//! What holds for every exported function (see [`boundary`]):
//!
//! - **No unwinding.** Every body runs behind a panic boundary: a panic
//!   becomes `PROBERT_ERR_INTERNAL` (or a documented neutral value for the few
//!   functions that do not return a status), never an unwind into C.
//! - **Null checks.** A NULL pointer where one is not allowed is
//!   `PROBERT_ERR_INVALID_ARGUMENT`, checked before anything else happens.
//! - **Enums from C are integers.** `probert_reg`, `probert_action`,
//!   `probert_mode` and a status passed to `probert_status_str` arrive as
//!   `u32` ([`from_c`]) and are validated: an out-of-range value in a Rust
//!   enum would be undefined behaviour. The header still declares them with
//!   their enum types.
//! - **Out-parameters are written only on success.** On error the caller's
//!   memory is untouched (`probert_attach_batch`'s `err_index`, which exists to
//!   report an error, is the one exception, and it is written only on error).
//! - **Handles carry generations.** `probert_consumer` is an index and a
//!   generation, `probert_region` an identifier never reused: a stale,
//!   doubled or invented handle is `PROBERT_ERR_NOT_FOUND`, never a crash.
//! - **Not from a handler.** Functions that take the writer lock or wait for
//!   a grace period refuse to run on a thread that is inside a handler
//!   (`PROBERT_ERR_INVALID_ARGUMENT`): waiting there would wait for itself,
//!   and the lock may be held by the code the handler interrupted.
//!
//! # Modules
//!
//! One module per C object: [`status`] (status codes, version, init),
//! [`regions`], [`regs`], [`consumers`] (handlers, hits, attach, detach,
//! sync, statistics), [`mode`] (the mechanism serving a site), [`names`]
//! (finding code by name), [`host`] (the
//! host's signals and threads: the scan signal, quiescent points, a chaining
//! SIGTRAP handler).
#![deny(unsafe_code)]
#![warn(missing_docs)]
// The exported names are the C names of API.md.
#![allow(non_camel_case_types)]
// The exported functions take raw pointers from C, where every call is
// unsafe and each function's documentation states what its pointers must
// be; they are `pub` only to be exported and are not a Rust API. Marking
// them `unsafe` would say nothing to a C caller (as in rustls-ffi).
#![allow(clippy::not_unsafe_ptr_arg_deref)]

// In the order of the header (cbindgen follows it): the library, regions,
// registers, consumers, modes.
#[macro_use]
pub mod boundary;
pub mod consumers;
pub mod from_c;
pub mod host;
pub mod mode;
pub mod names;
pub mod regions;
pub mod regs;
pub mod status;

pub use core_rt::VERSION;
