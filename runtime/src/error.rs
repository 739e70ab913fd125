//! One error type for the whole crate. Every variant maps to exactly one C
//! status code (see `probert-ffi`), and carries the context a user needs to
//! act on it: the address, the region, the reason.

use std::borrow::Cow;

/// Everything that can go wrong in a probert call.
///
/// Errors are produced in normal context only; the trap path never builds one.
/// Deliberately exhaustive: each variant is one C status code
/// ([`Error::status_code`], a `match` with no wildcard arm).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A null pointer, zero length, out-of-range enum or similar misuse.
    #[error("invalid argument: {0}")]
    InvalidArgument(Cow<'static, str>),
    /// The address lies in no registered JIT region and no loaded ELF module.
    #[error("address {addr:#x} lies in no known code region")]
    NoRegion {
        /// The address.
        addr: usize,
    },
    /// A new region would overlap a registered one.
    #[error("region [{start:#x}, {end:#x}) overlaps registered region [{other_start:#x}, {other_end:#x})")]
    RegionOverlap {
        /// Start of the new region.
        start: usize,
        /// End (exclusive) of the new region.
        end: usize,
        /// Start of the registered region it overlaps.
        other_start: usize,
        /// End (exclusive) of the registered region it overlaps.
        other_end: usize,
    },
    /// The instruction at the address cannot be decoded, emulated or relocated.
    #[error("unsupported instruction at {addr:#x}: {reason}")]
    UnsupportedInstruction {
        /// The probe address.
        addr: usize,
        /// Why it cannot be probed.
        reason: Cow<'static, str>,
    },
    /// An unknown, stale, doubled or already-detached handle.
    #[error("unknown, stale or already-detached handle")]
    NotFound,
    /// The address already holds an `int3` that probert did not write.
    #[error("address {addr:#x} already holds an int3 that is not ours")]
    Conflict {
        /// The address.
        addr: usize,
    },
    /// Writing code bytes or changing page protection failed.
    #[error("code write at {addr:#x} failed: {reason}")]
    Protect {
        /// The address written.
        addr: usize,
        /// What failed.
        reason: Cow<'static, str>,
    },
    /// An allocation or mapping failed.
    #[error("out of memory: {0}")]
    NoMemory(Cow<'static, str>),
    /// A signal handler (the `SIGTRAP` one, the thread scan's) could not be
    /// installed or was replaced by the host, or nothing can stand in for
    /// what probert needs of signals (a memory barrier without `membarrier`).
    #[error("signal handling: {0}")]
    Signal(Cow<'static, str>),
    /// The address is not on an instruction boundary of its function.
    #[error("{addr:#x} is not on an instruction boundary of the function at {func:#x}")]
    Misaligned {
        /// The address.
        addr: usize,
        /// Start of the enclosing function.
        func: usize,
    },
    /// The code under a probe no longer holds what probert wrote there: the
    /// host rewrote, freed, unmapped or unloaded it. The probe is retired:
    /// nothing is written there again, its consumers get no more hits and
    /// stay attached (their handles and statistics work) until detached,
    /// which then succeeds without writing.
    #[error(
        "the code at {addr:#x} was changed, freed or unloaded by the host: its probe is retired"
    )]
    CodeChanged {
        /// The probe address.
        addr: usize,
    },
    /// A bug in probert: a caught panic or a broken invariant.
    #[error("internal error: {0}")]
    Internal(Cow<'static, str>),
}

impl Error {
    /// The error's number in the C ABI (`probert_status` in `probert.h`,
    /// where numbers are never reused), for embedders that report errors
    /// in that numbering: probert's C library and its command's agent.
    pub fn status_code(&self) -> u32 {
        match self {
            Error::InvalidArgument(_) => 1,
            Error::NoRegion { .. } => 2,
            Error::RegionOverlap { .. } => 3,
            Error::UnsupportedInstruction { .. } => 4,
            Error::NotFound => 5,
            Error::Conflict { .. } => 6,
            Error::Protect { .. } => 7,
            Error::NoMemory(_) => 8,
            Error::Signal(_) => 9,
            Error::Misaligned { .. } => 10,
            Error::CodeChanged { .. } => 11,
            Error::Internal(_) => 255,
        }
    }

    /// An [`Error::UnsupportedInstruction`] at `addr`.
    pub(crate) fn unsupported(addr: usize, reason: impl Into<Cow<'static, str>>) -> Self {
        Error::UnsupportedInstruction {
            addr,
            reason: reason.into(),
        }
    }

    /// An [`Error::Protect`] at `addr` from an OS error.
    pub(crate) fn protect(addr: usize, what: &str, err: std::io::Error) -> Self {
        Error::Protect {
            addr,
            reason: format!("{what}: {err}").into(),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
