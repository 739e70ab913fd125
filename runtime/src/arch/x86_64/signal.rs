//! What installing a signal handler with the raw system call takes on
//! x86_64: the kernel's `struct sigaction` (not libc's) and a signal return
//! trampoline of our own (`SA_RESTORER` is mandatory here).
//!
//! The trampoline lives in the `probert_fast` linker section, with the
//! `SIGTRAP` handler, so that the whole way from the handler back into the
//! interrupted code (or an out-of-line stub) runs code that thread scans
//! treat as busy (see `crate::xol`).
//!
//! # Safety
//!
//! The only unsafe construct is the `global_asm!` of the trampoline: two
//! instructions that make the `rt_sigreturn` system call, never called as a
//! function (only its address is given to the kernel).
#![allow(unsafe_code)]

/// The kernel's `struct sigaction` on x86_64.
#[repr(C)]
#[derive(Debug)]
pub struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// `SA_RESTORER`: the kernel returns from the handler through `restorer`.
const SA_RESTORER: u64 = 0x0400_0000;

impl KernelSigaction {
    /// A disposition running `handler` with `flags` (`SA_*`) and an empty
    /// mask, returning through probert's restorer.
    pub fn new(handler: usize, flags: i32) -> KernelSigaction {
        KernelSigaction {
            handler,
            flags: flags as u64 | SA_RESTORER,
            restorer: restorer_address(),
            mask: 0,
        }
    }

    /// The same disposition blocking `mask` (bit `n - 1` for signal `n`)
    /// while the handler runs.
    pub fn with_mask(mut self, mask: u64) -> KernelSigaction {
        self.mask = mask;
        self
    }

    /// The size of the kernel's signal set, the last argument of
    /// `rt_sigaction`.
    pub const SIGSET_SIZE: i64 = 8;

    /// An all-zero structure for `rt_sigaction` to fill (the old action).
    pub fn zeroed() -> KernelSigaction {
        KernelSigaction {
            handler: 0,
            flags: 0,
            restorer: 0,
            mask: 0,
        }
    }

    /// The handler (or `SIG_DFL`/`SIG_IGN`).
    pub fn handler(&self) -> usize {
        self.handler
    }

    /// `sa_flags`, `SA_RESTORER` included.
    pub fn flags(&self) -> u64 {
        self.flags
    }

    /// The signal return trampoline (0 without `SA_RESTORER`).
    pub fn restorer(&self) -> usize {
        if self.flags & SA_RESTORER != 0 {
            self.restorer
        } else {
            0
        }
    }

    /// The signals blocked while the handler runs: bit `n - 1` for signal `n`.
    pub fn mask(&self) -> u64 {
        self.mask
    }
}

// The signal return trampoline, byte for byte the one glibc uses
// (`mov rax, 15; syscall`): unwinders and debuggers recognise a signal frame
// by these bytes.
std::arch::global_asm!(
    ".pushsection probert_fast,\"ax\",@progbits",
    ".p2align 4",
    ".globl __probert_sigreturn",
    ".hidden __probert_sigreturn",
    ".type __probert_sigreturn,@function",
    "__probert_sigreturn:",
    "mov rax, 15",
    "syscall",
    "ud2",
    ".size __probert_sigreturn, .-__probert_sigreturn",
    ".popsection",
);

/// The address of probert's signal return trampoline.
pub fn restorer_address() -> usize {
    extern "C" {
        // Not callable: only its address is taken.
        #[link_name = "__probert_sigreturn"]
        static PROBERT_SIGRETURN: u8;
    }
    std::ptr::addr_of!(PROBERT_SIGRETURN) as usize
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_restorer_is_glibcs_sequence() {
        let p = super::restorer_address();
        // SAFETY: reads the 9 bytes of our own trampoline's code.
        let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, 9) };
        assert_eq!(bytes, [0x48, 0xc7, 0xc0, 0x0f, 0, 0, 0, 0x0f, 0x05]);
    }
}
