//! Raw system calls through the `syscall` instruction, so the writer path
//! never calls into libc (which a user may have probed) while it must not trap.
//!
//! The functions return what the kernel returns: a non-negative result, or
//! `-errno` in `[-4095, -1]`. They never touch `errno` (there is no libc
//! wrapper to set it), so they are also safe to call from a signal handler
//! without saving and restoring `errno`. [`check`] turns the raw value into a
//! `Result`.
//!
//! # Safety
//!
//! This module executes the `syscall` instruction with exactly the registers
//! the x86_64 Linux system-call ABI defines (`rax` = number, then `rdi`,
//! `rsi`, `rdx`, `r10`, `r8`, `r9`; `rcx` and `r11` clobbered, result in
//! `rax`). It guarantees nothing about what the system call itself does: each
//! function is `unsafe` and its caller answers for the arguments (pointers
//! valid for the kernel to read or write, descriptors owned, mappings not
//! pulled from under live Rust references).
//!
//! On other architectures the functions fall back to libc's `syscall(2)`
//! (converting its `-1`/`errno` convention back to `-errno`); that path does
//! go through libc and exists only so the crate builds there.

#![allow(unsafe_code)]

/// Largest errno the kernel returns as `-errno`; `[-4095, -1]` is an error.
const MAX_ERRNO: i64 = 4095;

/// Turns a raw kernel return value into `Ok(value)` or `Err(errno)`.
///
/// # Signal safety
/// Pure arithmetic: async-signal-safe.
#[inline]
pub fn check(ret: i64) -> Result<i64, i32> {
    if (-MAX_ERRNO..0).contains(&ret) {
        // The range check makes the narrowing exact: 1..=4095 fits in i32.
        Err((-ret) as i32)
    } else {
        Ok(ret)
    }
}

/// Like [`check`], but retries `f` while it fails with `EINTR`.
///
/// # Signal safety
/// Async-signal-safe if `f` is.
#[inline]
pub fn check_retry(mut f: impl FnMut() -> i64) -> Result<i64, i32> {
    loop {
        match check(f()) {
            Err(libc::EINTR) => continue,
            other => return other,
        }
    }
}

// The whole syscall0..=6 family is the interface; not every arity has a
// caller yet.
#[allow(dead_code)]
#[cfg(target_arch = "x86_64")]
mod imp {
    use core::arch::asm;

    /// System call `nr` without arguments. Returns the raw kernel value
    /// (`-errno` on error).
    ///
    /// # Safety
    /// The system call must be sound to make: see the module docs.
    ///
    /// # Signal safety
    /// A single `syscall` instruction: async-signal-safe, `errno` untouched.
    #[inline]
    pub unsafe fn syscall0(nr: i64) -> i64 {
        let ret: i64;
        // SAFETY: the register assignment is the kernel's ABI; the caller
        // vouches for the call itself. `asm!` assumes memory is clobbered
        // unless told otherwise, and the kernel may write through pointers.
        unsafe {
            asm!("syscall", inlateout("rax") nr => ret,
                 lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        ret
    }

    /// System call `nr` with one argument. See [`syscall0`].
    ///
    /// # Safety
    /// The system call must be sound to make: see the module docs.
    ///
    /// # Signal safety
    /// A single `syscall` instruction: async-signal-safe, `errno` untouched.
    #[inline]
    pub unsafe fn syscall1(nr: i64, a1: i64) -> i64 {
        let ret: i64;
        // SAFETY: as in `syscall0`.
        unsafe {
            asm!("syscall", inlateout("rax") nr => ret, in("rdi") a1,
                 lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        ret
    }

    /// System call `nr` with two arguments. See [`syscall0`].
    ///
    /// # Safety
    /// The system call must be sound to make: see the module docs.
    ///
    /// # Signal safety
    /// A single `syscall` instruction: async-signal-safe, `errno` untouched.
    #[inline]
    pub unsafe fn syscall2(nr: i64, a1: i64, a2: i64) -> i64 {
        let ret: i64;
        // SAFETY: as in `syscall0`.
        unsafe {
            asm!("syscall", inlateout("rax") nr => ret, in("rdi") a1, in("rsi") a2,
                 lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        ret
    }

    /// System call `nr` with three arguments. See [`syscall0`].
    ///
    /// # Safety
    /// The system call must be sound to make: see the module docs.
    ///
    /// # Signal safety
    /// A single `syscall` instruction: async-signal-safe, `errno` untouched.
    #[inline]
    pub unsafe fn syscall3(nr: i64, a1: i64, a2: i64, a3: i64) -> i64 {
        let ret: i64;
        // SAFETY: as in `syscall0`.
        unsafe {
            asm!("syscall", inlateout("rax") nr => ret, in("rdi") a1, in("rsi") a2,
                 in("rdx") a3, lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        ret
    }

    /// System call `nr` with four arguments. See [`syscall0`].
    ///
    /// # Safety
    /// The system call must be sound to make: see the module docs.
    ///
    /// # Signal safety
    /// A single `syscall` instruction: async-signal-safe, `errno` untouched.
    #[inline]
    pub unsafe fn syscall4(nr: i64, a1: i64, a2: i64, a3: i64, a4: i64) -> i64 {
        let ret: i64;
        // SAFETY: as in `syscall0`. The fourth argument goes in r10, not rcx
        // (the `syscall` instruction overwrites rcx with the return address).
        unsafe {
            asm!("syscall", inlateout("rax") nr => ret, in("rdi") a1, in("rsi") a2,
                 in("rdx") a3, in("r10") a4, lateout("rcx") _, lateout("r11") _,
                 options(nostack));
        }
        ret
    }

    /// System call `nr` with five arguments. See [`syscall0`].
    ///
    /// # Safety
    /// The system call must be sound to make: see the module docs.
    ///
    /// # Signal safety
    /// A single `syscall` instruction: async-signal-safe, `errno` untouched.
    #[inline]
    pub unsafe fn syscall5(nr: i64, a1: i64, a2: i64, a3: i64, a4: i64, a5: i64) -> i64 {
        let ret: i64;
        // SAFETY: as in `syscall4`.
        unsafe {
            asm!("syscall", inlateout("rax") nr => ret, in("rdi") a1, in("rsi") a2,
                 in("rdx") a3, in("r10") a4, in("r8") a5, lateout("rcx") _,
                 lateout("r11") _, options(nostack));
        }
        ret
    }

    /// System call `nr` with six arguments. See [`syscall0`].
    ///
    /// # Safety
    /// The system call must be sound to make: see the module docs.
    ///
    /// # Signal safety
    /// A single `syscall` instruction: async-signal-safe, `errno` untouched.
    #[inline]
    pub unsafe fn syscall6(nr: i64, a1: i64, a2: i64, a3: i64, a4: i64, a5: i64, a6: i64) -> i64 {
        let ret: i64;
        // SAFETY: as in `syscall4`.
        unsafe {
            asm!("syscall", inlateout("rax") nr => ret, in("rdi") a1, in("rsi") a2,
                 in("rdx") a3, in("r10") a4, in("r8") a5, in("r9") a6,
                 lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        ret
    }

    /// `clone(CLONE_VM | CLONE_VFORK | SIGCHLD)` onto `stack_top`, the child
    /// calling `child(arg)` there (it must never return: it ends with
    /// `execve` or `_exit`). Returns the child's pid to the parent once the
    /// child has exec'd or exited, or `-errno`.
    ///
    /// # Safety
    /// `stack_top` is the 16-byte-aligned end of a writable mapping large
    /// enough for `child`, which shares the caller's memory while the caller
    /// is suspended (see `sys::spawn`).
    pub unsafe fn clone_vfork(
        stack_top: *mut u8,
        child: unsafe extern "C" fn(*const u8) -> !,
        arg: *const u8,
    ) -> i64 {
        let ret: i64;
        let flags = i64::from(libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD);
        // SAFETY: the kernel's clone ABI (flags, stack, parent_tid, child_tid,
        // tls); the child starts with the caller's registers but rax = 0 and
        // rsp = `stack_top`, so it finds `child` and `arg` in r12/r13 (kept
        // by the syscall), clears the frame pointer (the end of its stack)
        // and enters `child` as a call would, with a null return address
        // (rsp ≡ 8 mod 16). It never comes back
        // into this block; the parent continues at `2:` with the pid.
        unsafe {
            asm!(
                "syscall",
                "test rax, rax",
                "jnz 2f",
                "xor ebp, ebp",
                "mov rdi, r13",
                // A null return address ends an unwinder's walk here.
                "push 0",
                "jmp r12",
                "2:",
                inlateout("rax") libc::SYS_clone => ret,
                in("rdi") flags,
                in("rsi") stack_top,
                in("rdx") 0i64,
                in("r10") 0i64,
                in("r8") 0i64,
                in("r12") child,
                in("r13") arg,
                lateout("rcx") _,
                lateout("r11") _,
            );
        }
        ret
    }
}

#[allow(dead_code)]
#[cfg(not(target_arch = "x86_64"))]
mod imp {
    //! Portable fallback through libc's `syscall(2)`. It calls libc (so a
    //! probe on `syscall` would trap the writer) and reads `errno`; it exists
    //! so the crate builds on other architectures until they get their own
    //! `asm!` block.

    /// Converts libc's `-1`/`errno` convention to the kernel's `-errno`.
    fn raw(ret: libc::c_long) -> i64 {
        if ret == -1 {
            // SAFETY: `__errno_location` returns this thread's errno slot.
            -i64::from(unsafe { *libc::__errno_location() })
        } else {
            ret
        }
    }

    /// See the x86_64 version.
    ///
    /// # Safety
    /// The system call must be sound to make: see the module docs.
    pub unsafe fn syscall0(nr: i64) -> i64 {
        // SAFETY: the caller vouches for the call.
        raw(unsafe { libc::syscall(nr) })
    }
    /// See the x86_64 version.
    ///
    /// # Safety
    /// The system call must be sound to make: see the module docs.
    pub unsafe fn syscall1(nr: i64, a1: i64) -> i64 {
        // SAFETY: the caller vouches for the call.
        raw(unsafe { libc::syscall(nr, a1) })
    }
    /// See the x86_64 version.
    ///
    /// # Safety
    /// The system call must be sound to make: see the module docs.
    pub unsafe fn syscall2(nr: i64, a1: i64, a2: i64) -> i64 {
        // SAFETY: the caller vouches for the call.
        raw(unsafe { libc::syscall(nr, a1, a2) })
    }
    /// See the x86_64 version.
    ///
    /// # Safety
    /// The system call must be sound to make: see the module docs.
    pub unsafe fn syscall3(nr: i64, a1: i64, a2: i64, a3: i64) -> i64 {
        // SAFETY: the caller vouches for the call.
        raw(unsafe { libc::syscall(nr, a1, a2, a3) })
    }
    /// See the x86_64 version.
    ///
    /// # Safety
    /// The system call must be sound to make: see the module docs.
    pub unsafe fn syscall4(nr: i64, a1: i64, a2: i64, a3: i64, a4: i64) -> i64 {
        // SAFETY: the caller vouches for the call.
        raw(unsafe { libc::syscall(nr, a1, a2, a3, a4) })
    }
    /// See the x86_64 version.
    ///
    /// # Safety
    /// The system call must be sound to make: see the module docs.
    pub unsafe fn syscall5(nr: i64, a1: i64, a2: i64, a3: i64, a4: i64, a5: i64) -> i64 {
        // SAFETY: the caller vouches for the call.
        raw(unsafe { libc::syscall(nr, a1, a2, a3, a4, a5) })
    }
    /// See the x86_64 version.
    ///
    /// # Safety
    /// The system call must be sound to make: see the module docs.
    pub unsafe fn syscall6(nr: i64, a1: i64, a2: i64, a3: i64, a4: i64, a5: i64, a6: i64) -> i64 {
        // SAFETY: the caller vouches for the call.
        raw(unsafe { libc::syscall(nr, a1, a2, a3, a4, a5, a6) })
    }

    /// Not available here: the caller falls back to the C library's spawn.
    ///
    /// # Safety
    /// None needed: it does nothing.
    pub unsafe fn clone_vfork(
        _stack_top: *mut u8,
        _child: unsafe extern "C" fn(*const u8) -> !,
        _arg: *const u8,
    ) -> i64 {
        -i64::from(libc::ENOSYS)
    }
}

#[allow(unused_imports)] // see `imp`: not every arity has a caller yet
pub use imp::{clone_vfork, syscall0, syscall1, syscall2, syscall3, syscall4, syscall5, syscall6};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getpid_matches_libc() {
        // SAFETY: getpid has no arguments and no side effects.
        let pid = unsafe { syscall0(libc::SYS_getpid) };
        assert_eq!(pid, i64::from(std::process::id()));
    }

    #[test]
    fn errors_are_negative_errno() {
        // SAFETY: closing a descriptor that cannot be open has no effect.
        let ret = unsafe { syscall1(libc::SYS_close, -1) };
        assert_eq!(ret, -i64::from(libc::EBADF));
        assert_eq!(check(ret), Err(libc::EBADF));
        assert_eq!(check(0), Ok(0));
        assert_eq!(check(-4096), Ok(-4096), "below -4095 is a value");
        // A high address as returned by mmap is a value, not an error.
        assert_eq!(check(0x7fff_0000_0000), Ok(0x7fff_0000_0000));
    }

    #[test]
    fn six_arguments_reach_the_kernel() {
        // mmap takes six arguments: a wrong register for any of them fails.
        // SAFETY: a fresh anonymous mapping, unmapped below.
        let addr = unsafe {
            syscall6(
                libc::SYS_mmap,
                0,
                4096,
                i64::from(libc::PROT_READ | libc::PROT_WRITE),
                i64::from(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS),
                -1,
                0,
            )
        };
        let addr = check(addr).expect("mmap");
        // SAFETY: the page was just mapped read-write.
        unsafe {
            let p = addr as *mut u8;
            p.write_volatile(7);
            assert_eq!(p.read_volatile(), 7);
        }
        // SAFETY: unmaps the page mapped above; nothing refers to it.
        let ret = unsafe { syscall2(libc::SYS_munmap, addr, 4096) };
        assert_eq!(check(ret), Ok(0));
        // pwrite64 (four arguments, the fourth in r10) to a pipe fails with
        // ESPIPE only if the offset argument reached the kernel at all.
        let mut fds = [0i32; 2];
        // SAFETY: `fds` has room for two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let byte = 1u8;
        // SAFETY: `byte` is readable for one byte; fds[1] is our pipe.
        let ret = unsafe {
            syscall4(
                libc::SYS_pwrite64,
                i64::from(fds[1]),
                &byte as *const u8 as i64,
                1,
                0,
            )
        };
        assert_eq!(check(ret), Err(libc::ESPIPE));
        // SAFETY: closes the pipe opened above.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }

    #[test]
    fn retry_stops_on_success_or_other_errors() {
        let mut calls = 0;
        let r = check_retry(|| {
            calls += 1;
            if calls < 3 {
                -i64::from(libc::EINTR)
            } else {
                5
            }
        });
        assert_eq!((r, calls), (Ok(5), 3));
        assert_eq!(check_retry(|| -i64::from(libc::EBADF)), Err(libc::EBADF));
    }
}
