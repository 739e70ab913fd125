//! Reading this process's own memory without faulting.
//!
//! [`read_memory`] copies bytes with `process_vm_readv` on our own pid: the
//! kernel walks the page tables and returns `EFAULT` for an unmapped or
//! unreadable page instead of raising `SIGSEGV`. Where it is unavailable
//! (`ENOSYS` under some sandboxes, `EPERM` from a seccomp filter) it falls
//! back to `pread` on `/proc/self/mem`, which fails the same way. Used for
//! headers and notes of loaded modules, which another thread may `dlclose`
//! at any moment. Normal context only (the fallback opens a file).
//!
//! The `_raw` functions are one raw system call each, for the signal path:
//! the emulator's careful accesses (`arch::Access::Careful`) read and write
//! the interrupted thread's memory with them, where a fault must not be a
//! nested signal.
//!
//! # Safety
//!
//! `process_vm_readv` is given one local buffer, the caller's `&mut [u8]`,
//! and writes at most its length into it; the remote range is only read, by
//! the kernel, and may be anything.

#![allow(unsafe_code)]

use std::os::unix::fs::FileExt;

/// Copies `buf.len()` bytes from address `addr` of this process into `buf`.
/// `Err(errno)` if any of them is not mapped readable.
pub fn read_memory(addr: usize, buf: &mut [u8]) -> Result<(), i32> {
    if buf.is_empty() {
        return Ok(());
    }
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: see the module's safety paragraph: the kernel writes at most
    // `buf.len()` bytes into `buf` and only reads the remote range.
    let n = unsafe { libc::process_vm_readv(libc::gettid(), &local, 1, &remote, 1, 0) };
    if n >= 0 {
        // A short copy means the range ran into an unreadable page.
        return if n as usize == buf.len() {
            Ok(())
        } else {
            Err(libc::EFAULT)
        };
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ENOSYS | libc::EPERM) => read_proc_mem(addr, buf),
        Some(e) => Err(e),
        None => Err(libc::EIO),
    }
}

/// [`read_memory`] without libc and without the fallback: one raw
/// `process_vm_readv`. `Err(errno)` if any byte is not mapped readable or
/// the system call is unavailable.
///
/// # Signal safety
/// One raw system call; `errno` untouched.
pub fn read_memory_raw(
    _cx: crate::sigctx::SignalContext,
    addr: usize,
    buf: &mut [u8],
) -> Result<(), i32> {
    // SAFETY: as in `read_memory`: the kernel writes at most `buf.len()`
    // bytes into `buf` and only reads the remote range.
    unsafe {
        vm_copy_raw(
            libc::SYS_process_vm_readv,
            buf.as_mut_ptr(),
            buf.len(),
            addr,
        )
    }
}

/// Copies `bytes` to address `addr` of this process with one raw
/// `process_vm_writev`: `Err(errno)`, with nothing written, if the first
/// byte is not mapped writable (a range crossing into a page that is not
/// may be written in part: the caller checks such pages first).
///
/// # Signal safety
/// One raw system call; `errno` untouched.
pub fn write_memory_raw(
    _cx: crate::sigctx::SignalContext,
    addr: usize,
    bytes: &[u8],
) -> Result<(), i32> {
    // SAFETY: the kernel only reads the local buffer, `bytes`; the remote
    // range is written as a store by this thread would write it, and the
    // caller's contract (an emulated store) says it may be.
    unsafe {
        vm_copy_raw(
            libc::SYS_process_vm_writev,
            bytes.as_ptr().cast_mut(),
            bytes.len(),
            addr,
        )
    }
}

/// One raw `process_vm_readv` or `process_vm_writev` (`nr`) of `len` bytes
/// between the local buffer `local` and address `remote` of this process,
/// named by the calling thread's id (it names the process even after the
/// main thread exited, when the group leader has no memory left). A short
/// copy is `EFAULT`.
///
/// # Safety
/// `local` is valid for `len` bytes, for writing if `nr` reads.
///
/// # Signal safety
/// Two raw system calls; `errno` untouched.
unsafe fn vm_copy_raw(nr: i64, local: *mut u8, len: usize, remote: usize) -> Result<(), i32> {
    if len == 0 {
        return Ok(());
    }
    let local = libc::iovec {
        iov_base: local.cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: remote as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: gettid has no effects; the caller vouches for `local`, and
    // the kernel checks the remote range.
    let ret = unsafe {
        let tid = super::raw::syscall0(libc::SYS_gettid);
        super::raw::syscall6(
            nr,
            tid,
            &local as *const libc::iovec as i64,
            1,
            &remote as *const libc::iovec as i64,
            1,
            0,
        )
    };
    match super::raw::check(ret) {
        Ok(n) if n as usize == len => Ok(()),
        Ok(_) => Err(libc::EFAULT),
        Err(e) => Err(e),
    }
}

/// Whether anything is mapped at the page `page` (any protection): one raw
/// `mincore`, which fails with `ENOMEM` for an unmapped range and changes
/// nothing.
///
/// # Signal safety
/// One raw system call; `errno` untouched.
pub fn is_mapped_raw(_cx: crate::sigctx::SignalContext, page: usize) -> bool {
    let mut resident = 0u8;
    // SAFETY: mincore writes one byte per page of the range: one, here.
    let ret = unsafe {
        super::raw::syscall3(
            libc::SYS_mincore,
            page as i64,
            4096,
            &mut resident as *mut u8 as i64,
        )
    };
    super::raw::check(ret) != Err(libc::ENOMEM)
}

/// The fallback: `pread` on `/proc/self/mem`.
fn read_proc_mem(addr: usize, buf: &mut [u8]) -> Result<(), i32> {
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(libc::EIO);
    let f = std::fs::File::open("/proc/self/mem").map_err(errno)?;
    f.read_exact_at(buf, addr as u64).map_err(errno)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mapped_memory_and_fails_on_unmapped() {
        let src = *b"probert peek";
        let mut buf = [0u8; 12];
        read_memory(src.as_ptr() as usize, &mut buf).expect("read");
        assert_eq!(buf, src);
        // Page 0 is never mapped.
        assert_eq!(read_memory(16, &mut buf), Err(libc::EFAULT));
        assert_eq!(read_proc_mem(src.as_ptr() as usize, &mut buf), Ok(()));
        // SAFETY: the test calls only the signal-safe raw read with it.
        let cx = unsafe { crate::sigctx::SignalContext::new() };
        let mut raw = [0u8; 12];
        assert_eq!(read_memory_raw(cx, src.as_ptr() as usize, &mut raw), Ok(()));
        assert_eq!(raw, src);
        assert_eq!(read_memory_raw(cx, 16, &mut raw), Err(libc::EFAULT));
        assert!(read_proc_mem(16, &mut buf).is_err());
    }
}
