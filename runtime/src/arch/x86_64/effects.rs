//! What a handler's machine code may change besides the general-purpose
//! registers, by class, so that the fast path saves exactly that.
//!
//! The trampoline always saves and restores the 16 general-purpose
//! registers and the flags (the handler sees them all). Everything else —
//! vector registers, opmasks, the x87 stack, MXCSR, `errno` — it saves only
//! for the classes the probe's handlers may change: a handler that counts
//! hits with one atomic add needs none of it, and saving all of it would
//! cost four times an XRay handler call on this kind of machine.

/// Classes of register state beyond the general-purpose registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Clobbers(pub u32);

impl Clobbers {
    /// Nothing beyond the general-purpose registers and the flags.
    pub const NONE: Clobbers = Clobbers(0);
    /// The low 128 bits of xmm0–15, and MXCSR (legacy SSE instructions).
    pub const SSE: Clobbers = Clobbers(1 << 0);
    /// The upper bits of ymm/zmm0–15 and all of zmm16–31 (any VEX or EVEX
    /// instruction that writes a vector register, `vzeroupper`).
    pub const VECTOR: Clobbers = Clobbers(1 << 1);
    /// The AVX-512 opmask registers k0–7.
    pub const OPMASK: Clobbers = Clobbers(1 << 2);
    /// The x87 stack and control/status words (and MMX, which aliases it).
    pub const X87: Clobbers = Clobbers(1 << 3);
    /// The C library's `errno` of the thread.
    pub const ERRNO: Clobbers = Clobbers(1 << 4);
    /// Everything: what an unknown handler may change.
    pub const ALL: Clobbers = Clobbers(0x1F);

    /// The union.
    pub const fn union(self, other: Clobbers) -> Clobbers {
        Clobbers(self.0 | other.0)
    }

    /// Whether every class of `self` is in `other`.
    pub const fn within(self, other: Clobbers) -> bool {
        self.0 & !other.0 == 0
    }
}
