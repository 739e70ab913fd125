//! Reading code bytes.
//!
//! # Safety
//!
//! Callers pass addresses inside a region they resolved (a loaded module's
//! executable segment or a registered JIT region), which is mapped readable.
#![allow(unsafe_code)]

/// Reads one code byte at `addr`, which lies in a mapped, readable region.
///
/// # Signal safety
/// One volatile load.
#[inline]
pub fn read_code_byte(addr: usize) -> u8 {
    // SAFETY: see the module's safety paragraph; volatile because other
    // threads (or the kernel, via /proc/self/mem) may change code bytes.
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}

/// Reads `[start, end)` of code.
pub fn read_code(start: usize, end: usize) -> Vec<u8> {
    (start..end).map(read_code_byte).collect()
}
