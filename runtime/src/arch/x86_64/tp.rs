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

/// Where the C library's `errno` of every thread lies relative to its
/// thread pointer: `errno` is a static thread-local of the C library (glibc
/// and musl alike), so the offset is the same for every thread of the
/// process. Computed once, in normal context (it calls
/// `__errno_location`); the fast path's trampoline and the trap path read
/// and write `errno` through it without calling the C library.
pub fn errno_offset() -> i32 {
    static OFFSET: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *OFFSET.get_or_init(|| {
        // SAFETY: `__errno_location` has no preconditions.
        let at = unsafe { libc::__errno_location() } as isize;
        i32::try_from(at - thread_pointer() as isize)
            .expect("errno lies within 2 GiB of the thread pointer")
    })
}

/// The calling thread's `errno`, read through [`errno_offset`] (which must
/// have been computed before, in normal context: the writer's init does).
///
/// # Signal safety
/// One load; no libc call.
#[inline(always)]
pub fn errno_get(off: i32) -> i32 {
    let v: i32;
    // SAFETY: `fs:off` is this thread's `errno` (see `errno_offset`).
    unsafe {
        core::arch::asm!("mov {v:e}, dword ptr fs:[{off}]", off = in(reg) off as isize,
            v = out(reg) v, options(nostack, readonly, preserves_flags));
    }
    v
}

/// Sets the calling thread's `errno` through [`errno_offset`].
///
/// # Signal safety
/// One store; no libc call.
#[inline(always)]
pub fn errno_set(off: i32, v: i32) {
    // SAFETY: `fs:off` is this thread's `errno` (see `errno_offset`).
    unsafe {
        core::arch::asm!("mov dword ptr fs:[{off}], {v:e}", off = in(reg) off as isize,
            v = in(reg) v, options(nostack, preserves_flags));
    }
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

    #[test]
    fn errno_through_the_thread_pointer_is_libcs() {
        let off = super::errno_offset();
        for _ in 0..2 {
            std::thread::spawn(move || {
                // SAFETY: sets this thread's errno through libc.
                unsafe { *libc::__errno_location() = 4242 };
                assert_eq!(super::errno_get(off), 4242);
                super::errno_set(off, 77);
                // SAFETY: reads it back through libc.
                assert_eq!(unsafe { *libc::__errno_location() }, 77);
            })
            .join()
            .unwrap();
        }
    }
}
