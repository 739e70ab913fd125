//! The boundary every exported function stands behind: a panic boundary,
//! null checks, the out-parameter rule and the handler check, as macros, in
//! the style of rustls-ffi's `ffi_panic_boundary!` / `try_ref_from_ptr!`.
//!
//! An exported function is written
//!
//! ```ignore
//! #[no_mangle]
//! pub extern "C" fn probert_thing(x: *const T, out: *mut U) -> probert_status {
//!     ffi_panic_boundary! {
//!         let x = try_ref!(x);
//!         let out = not_null!(out);
//!         not_in_handler!();
//!         let value = match core_rt::thing(x) { Ok(v) => v, Err(e) => return status_of(&e) };
//!         // SAFETY: ...
//!         unsafe { out.write(value) };
//!         PROBERT_OK
//!     }
//! }
//! ```
//!
//! The macros `return` from the closure the boundary runs, with the value
//! [`Boundary::invalid`] gives for the function's return type.
//!
//! # Safety
//!
//! [`try_ref!`] dereferences a non-null pointer the caller passed; the C
//! contract (API.md, and each function's documentation) is that a non-null
//! pointer points at a valid object of its type for the duration of the call.
//! No other unsafe code lives here.
#![allow(unsafe_code)]

use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::status::probert_status;

/// What an exported function returns when it cannot do its work: after a
/// caught panic ([`Boundary::internal`]) and on invalid input such as a NULL
/// pointer ([`Boundary::invalid`]).
pub trait Boundary {
    /// The value for a caught panic.
    fn internal() -> Self;
    /// The value for invalid input (NULL, an out-of-range enum).
    fn invalid() -> Self;
}

impl Boundary for probert_status {
    fn internal() -> Self {
        probert_status::PROBERT_ERR_INTERNAL
    }
    fn invalid() -> Self {
        probert_status::PROBERT_ERR_INVALID_ARGUMENT
    }
}

/// `probert_regs_get` and `probert_regs_arg` return 0 when they cannot read.
impl Boundary for u64 {
    fn internal() -> Self {
        0
    }
    fn invalid() -> Self {
        0
    }
}

/// Static text for functions that return a string and never NULL.
impl Boundary for *const c_char {
    fn internal() -> Self {
        c"internal error (a bug in probert)".as_ptr()
    }
    fn invalid() -> Self {
        c"invalid argument".as_ptr()
    }
}

/// Runs `body`, turning a panic into [`Boundary::internal`]. The panic hook
/// has already reported the panic on stderr by then.
///
/// Not signal-safe when `body` panics (the hook formats and allocates);
/// the functions callable from handlers have bodies that cannot panic.
#[inline]
pub fn guard<T: Boundary>(body: impl FnOnce() -> T) -> T {
    // AssertUnwindSafe: after a panic the runtime's state is still consistent
    // for the next call (its lock recovers from poisoning), and the caller
    // learns of the failure through the returned value.
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|_payload| T::internal())
}

/// Runs the body behind the panic boundary ([`guard`]).
#[macro_export]
macro_rules! ffi_panic_boundary {
    ($($body:tt)*) => {
        $crate::boundary::guard(move || { $($body)* })
    };
}

/// `&T` from a `*const T` or `*mut T` argument; returns
/// [`Boundary::invalid`] if it is NULL.
#[macro_export]
macro_rules! try_ref {
    ($ptr:expr) => {{
        let ptr = $ptr;
        if ptr.is_null() {
            return $crate::boundary::Boundary::invalid();
        }
        // SAFETY: not NULL, and the C contract is that a non-NULL argument
        // points at a valid, initialised object of its type for the call.
        unsafe { &*ptr }
    }};
}

/// Checks a pointer argument that is not read as a whole (an address to
/// probe, an out-parameter): returns [`Boundary::invalid`] if it is NULL, else
/// the pointer. Out-parameters are written once, with `ptr.write`, and only
/// on success.
#[macro_export]
macro_rules! not_null {
    ($ptr:expr) => {{
        let ptr = $ptr;
        if ptr.is_null() {
            return $crate::boundary::Boundary::invalid();
        }
        ptr
    }};
}

/// Returns [`Boundary::invalid`] when called from inside a handler: the call
/// would take the writer lock, which the code the handler interrupted may
/// hold, or wait for a grace period that waits for the handler itself.
#[macro_export]
macro_rules! not_in_handler {
    () => {
        if core_rt::in_handler() {
            return $crate::boundary::Boundary::invalid();
        }
    };
}

/// The status of a runtime result, or its value.
#[macro_export]
macro_rules! try_rt {
    ($result:expr) => {
        match $result {
            Ok(v) => v,
            Err(e) => return $crate::status::probert_status::from(&e),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::probert_status::*;

    fn panics() -> probert_status {
        ffi_panic_boundary! {
            let v: Vec<u8> = Vec::new();
            // An out-of-bounds index: a panic inside an exported body.
            if v[usize::from(v.is_empty())] == 0 {
                return PROBERT_OK;
            }
            PROBERT_OK
        }
    }

    fn null_in(p: *const u64) -> probert_status {
        ffi_panic_boundary! {
            let v = try_ref!(p);
            if *v == 7 { PROBERT_OK } else { PROBERT_ERR_NOT_FOUND }
        }
    }

    #[test]
    fn a_panic_becomes_internal_never_an_unwind() {
        assert_eq!(panics(), PROBERT_ERR_INTERNAL);
        assert_eq!(guard(|| -> u64 { panic!("boom") }), 0);
        let s: *const c_char = guard(|| panic!("boom"));
        assert!(!s.is_null());
    }

    #[test]
    fn null_is_invalid_argument() {
        assert_eq!(null_in(std::ptr::null()), PROBERT_ERR_INVALID_ARGUMENT);
        assert_eq!(null_in(&7), PROBERT_OK);
        assert_eq!(null_in(&8), PROBERT_ERR_NOT_FOUND);
    }
}
