//! Finding code by name: `probert_symbol_addr`, the address of a function
//! of a loaded module (the runtime's `symbol_addr`).
//!
//! # Safety
//!
//! `module` and `symbol` are read as NUL-terminated C strings; `out` is
//! written once, on success.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_void, CStr};

use crate::status::probert_status::{self, *};

/// The address of function `symbol` in a loaded module, in `*out`.
///
/// `module` is a path or a file name, with or without its version suffix
/// (`"libc.so.6"`, `"libc.so"`, `"libc"`); NULL or `""` searches the main
/// program first, then every module in load order. `.dynsym` is searched
/// before `.symtab`; an IFUNC resolves as `dlsym` resolves it.
///
/// Errors: `PROBERT_ERR_INVALID_ARGUMENT` (`symbol` or `out` NULL, `symbol`
/// empty or not UTF-8), `PROBERT_ERR_NOT_FOUND` (no such module or symbol).
/// Blocks: reads the module's file. From a handler: no.
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn probert_symbol_addr(
    module: *const c_char,
    symbol: *const c_char,
    out: *mut *const c_void,
) -> probert_status {
    ffi_panic_boundary! {
        let symbol = not_null!(symbol);
        let out = not_null!(out);
        not_in_handler!();
        // SAFETY: not NULL; the C contract is a NUL-terminated string.
        let Ok(symbol) = unsafe { CStr::from_ptr(symbol) }.to_str() else {
            return PROBERT_ERR_INVALID_ARGUMENT;
        };
        if symbol.is_empty() {
            return PROBERT_ERR_INVALID_ARGUMENT;
        }
        let module = if module.is_null() {
            None
        } else {
            // SAFETY: not NULL; the C contract is a NUL-terminated string.
            match unsafe { CStr::from_ptr(module) }.to_str() {
                Ok(m) => Some(m),
                Err(_) => return PROBERT_ERR_NOT_FOUND,
            }
        };
        let addr = try_rt!(core_rt::symbol_addr(module, symbol));
        // SAFETY: not NULL, and the caller's to write; written once.
        unsafe { out.write(addr as *const c_void) };
        PROBERT_OK
    }
}
