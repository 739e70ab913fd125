//! The operating system, and the only place that calls `libc`.
//!
//! IMPLEMENTATION PENDING (helper) for `raw`, `mem`, `membarrier`, `modules`,
//! `threads`; `signal` is written with the trap handler.

pub mod cfi;
pub mod code;
pub mod elf;
pub mod extents;
pub mod lsda;
pub mod mem;
pub mod membarrier;
pub mod module_file;
pub mod modules;
pub mod peek;
pub mod raw;
pub mod signal;
pub mod symbols;
pub mod threads;
