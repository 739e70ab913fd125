//! The operating system, and the only place that calls `libc`.
//!
//! IMPLEMENTATION PENDING (helper) for `raw`, `mem`, `membarrier`, `modules`,
//! `threads`; `signal` is written with the trap handler.

pub mod code;
pub mod mem;
pub mod membarrier;
pub mod modules;
pub mod raw;
pub mod signal;
pub mod threads;
