//! The register frame every handler sees, on every path.
//!
//! The trap path copies the interrupted thread's saved context into a
//! [`Regs`] on the handler's stack and copies it back before returning (see
//! `context`); the fast path's trampoline saves the registers straight into
//! the same layout. One layout means one dispatcher and one C view
//! (`probert_regs`).

/// A general-purpose register, RIP or RFLAGS, numbered as `probert_reg` in
/// the C ABI.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Reg {
    Rax = 0,
    Rbx,
    Rcx,
    Rdx,
    Rsi,
    Rdi,
    Rbp,
    Rsp,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
    Rip,
    Rflags,
}

impl Reg {
    /// Every register, in `probert_reg` order.
    pub const ALL: [Reg; 18] = [
        Reg::Rax,
        Reg::Rbx,
        Reg::Rcx,
        Reg::Rdx,
        Reg::Rsi,
        Reg::Rdi,
        Reg::Rbp,
        Reg::Rsp,
        Reg::R8,
        Reg::R9,
        Reg::R10,
        Reg::R11,
        Reg::R12,
        Reg::R13,
        Reg::R14,
        Reg::R15,
        Reg::Rip,
        Reg::Rflags,
    ];

    /// The register numbered `n` in `probert_reg` order, if there is one.
    /// Enums that arrive from C are read as integers and validated here.
    pub const fn from_index(n: u32) -> Option<Reg> {
        if (n as usize) < Self::ALL.len() {
            Some(Self::ALL[n as usize])
        } else {
            None
        }
    }

    /// The SysV integer argument registers, in order.
    pub const ARGS: [Reg; 6] = [Reg::Rdi, Reg::Rsi, Reg::Rdx, Reg::Rcx, Reg::R8, Reg::R9];
}

/// The registers of the thread that hit a probe, writable.
///
/// `rip` reads the probed address; writes to any field take effect when the
/// hit resumes (a write to `rip` redirects the thread and skips the displaced
/// instruction).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    /// rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8 … r15, in [`Reg`] order.
    pub gpr: [u64; 16],
    /// The instruction pointer.
    pub rip: u64,
    /// The flags register.
    pub rflags: u64,
}

impl Regs {
    /// Reads a register.
    ///
    /// # Signal safety
    /// A bounded array read; no allocation, lock or panic.
    #[inline]
    pub fn get(&self, reg: Reg) -> u64 {
        match reg {
            Reg::Rip => self.rip,
            Reg::Rflags => self.rflags,
            r => self.gpr[r as usize & 15],
        }
    }

    /// Writes a register.
    ///
    /// # Signal safety
    /// A bounded array write; no allocation, lock or panic.
    #[inline]
    pub fn set(&mut self, reg: Reg, value: u64) {
        match reg {
            Reg::Rip => self.rip = value,
            Reg::Rflags => self.rflags = value,
            r => self.gpr[r as usize & 15] = value,
        }
    }

    /// The program counter: the probed address while handlers run.
    ///
    /// # Signal safety
    /// A field read.
    #[inline(always)]
    pub fn pc(&self) -> usize {
        self.rip as usize
    }

    /// Sets the program counter the thread resumes at.
    ///
    /// # Signal safety
    /// A field write.
    #[inline(always)]
    pub fn set_pc(&mut self, pc: usize) {
        self.rip = pc as u64;
    }

    /// The stack pointer.
    ///
    /// # Signal safety
    /// A field read.
    #[inline(always)]
    pub fn sp(&self) -> usize {
        self.gpr[Reg::Rsp as usize] as usize
    }

    /// The SysV integer argument `n` (0..=5) at a function's first
    /// instruction; `None` past the sixth (those live on the stack).
    ///
    /// # Signal safety
    /// As [`Regs::get`].
    #[inline]
    pub fn arg(&self, n: usize) -> Option<u64> {
        Reg::ARGS.get(n).map(|&r| self.get(r))
    }
}

/// The RFLAGS bits a handler may change: CF, PF, AF, ZF, SF, DF, OF.
pub const USER_FLAGS: u64 = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x400 | 0x800;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reg_numbers_match_the_c_abi() {
        assert_eq!(Reg::from_index(0), Some(Reg::Rax));
        assert_eq!(Reg::from_index(7), Some(Reg::Rsp));
        assert_eq!(Reg::from_index(16), Some(Reg::Rip));
        assert_eq!(Reg::from_index(17), Some(Reg::Rflags));
        assert_eq!(Reg::from_index(18), None);
        assert_eq!(Reg::from_index(u32::MAX), None);
        for (i, r) in Reg::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }

    #[test]
    fn get_set_and_args() {
        let mut r = Regs::default();
        for (i, reg) in Reg::ALL.iter().enumerate() {
            r.set(*reg, 100 + i as u64);
        }
        assert_eq!(r.get(Reg::Rdi), 105);
        assert_eq!(r.arg(0), Some(105));
        assert_eq!(r.arg(3), Some(102));
        assert_eq!(r.arg(5), Some(109));
        assert_eq!(r.arg(6), None);
        assert_eq!(r.rip, 116);
        assert_eq!(r.rflags, 117);
    }
}
