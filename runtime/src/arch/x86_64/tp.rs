//! # Safety
//! Reads `%fs:0` with inline assembly; see [`thread_pointer`].
#![allow(unsafe_code)]

/// A value unique to the calling thread among live threads: the x86_64 TLS
/// ABI requires the word at `%fs:0` to point to the thread control block
/// itself (glibc and musl both follow it).
///
/// Unlike a Rust `thread_local!` in a `cdylib` (general-dynamic TLS, which may
/// allocate on first touch), this is one load and never allocates. A thread
/// pointer can be reused by a later thread once its owner has exited.
///
/// # Signal safety
/// One load; no allocation, lock, lazy initialisation or panic.
#[inline(always)]
pub fn thread_pointer() -> usize {
    let tp: usize;
    // SAFETY: on x86_64 Linux `%fs` is the thread pointer of every thread
    // (set up by the C library before any user code runs) and `%fs:0` holds
    // the TCB's self pointer; the load reads no Rust-visible memory.
    unsafe {
        core::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) tp,
            options(nostack, readonly, preserves_flags, pure));
    }
    tp
}

#[cfg(test)]
mod tests {
    #[test]
    fn differs_between_threads_and_is_stable() {
        let here = super::thread_pointer();
        assert_ne!(here, 0);
        assert_eq!(here, super::thread_pointer());
        let there = std::thread::spawn(super::thread_pointer).join().unwrap();
        assert_ne!(here, there);
    }
}
