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

/// Where the C library keeps the kernel thread id of every thread relative
/// to its thread pointer (glibc's `struct pthread` has it at a fixed offset
/// of the thread control block), found by looking for the calling
/// thread's id and confirming the same offset in a second thread; `None` if
/// no single offset holds it in both (another C library, or threads cannot
/// be created). Computed once, in normal context.
pub fn tid_offset() -> Option<u32> {
    static OFFSET: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *OFFSET.get_or_init(|| {
        fn candidates() -> Vec<u32> {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
            // The TCB (glibc's `struct pthread`, about 2 KiB) may end where
            // its mapping does: read it without faulting.
            let mut tcb = [0u8; 0x1000];
            let tp = thread_pointer();
            let n = (1..=tcb.len() / 256)
                .map(|k| k * 256)
                .take_while(|&n| crate::sys::peek::read_memory(tp, &mut tcb[..n]).is_ok())
                .last()
                .unwrap_or(0);
            (0..n as u32)
                .step_by(4)
                .filter(|&off| {
                    let o = off as usize;
                    u32::from_le_bytes([tcb[o], tcb[o + 1], tcb[o + 2], tcb[o + 3]]) == tid
                })
                .collect()
        }
        let here = candidates();
        let there = std::thread::Builder::new()
            .name("probert-tid".into())
            .spawn(candidates)
            .ok()?
            .join()
            .ok()?;
        let both: Vec<u32> = here.into_iter().filter(|o| there.contains(o)).collect();
        match both[..] {
            [one] => Some(one),
            _ => None,
        }
    })
}

/// The `u32` at `fs:off`.
fn read_fs_u32(off: u32) -> u32 {
    let v: u32;
    // SAFETY: `off` is where `tid_offset` found the thread id in two
    // threads' control blocks: inside every thread's, which is mapped while
    // the thread runs.
    unsafe {
        core::arch::asm!("mov {v:e}, dword ptr fs:[{off}]", off = in(reg) off as usize,
            v = out(reg) v, options(nostack, readonly, preserves_flags));
    }
    v
}

/// The calling thread's kernel thread id: read at `off` from the thread
/// pointer (see [`tid_offset`]) when known, else asked of the kernel.
///
/// # Signal safety
/// One load, or one raw system call.
#[inline]
pub fn thread_id(off: Option<u32>) -> u32 {
    match off {
        Some(off) => read_fs_u32(off),
        // SAFETY: gettid has no arguments and no memory effects.
        None => unsafe { crate::sys::raw::syscall0(libc::SYS_gettid) as u32 },
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_thread_id_is_found_beside_the_thread_pointer() {
        let off = super::tid_offset();
        // glibc keeps it there; the test machines run glibc.
        assert!(off.is_some(), "no tid offset found");
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
        assert_eq!(super::thread_id(off), tid);
        let other = std::thread::spawn(move || {
            // SAFETY: as above.
            let t = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
            (super::thread_id(off), t)
        })
        .join()
        .unwrap();
        assert_eq!(other.0, other.1);
        assert_ne!(other.1, tid);
    }

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
