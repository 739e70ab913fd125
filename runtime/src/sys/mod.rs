//! The operating system: the only place that calls `libc` or makes system
//! calls.
//!
//! - `raw`: system calls through the `syscall` instruction;
//! - `code`: reading and writing code bytes;
//! - `maps`: `/proc/self/maps`, mappings near code, reserved memory;
//! - `membarrier`: process-wide memory and core-serialising barriers;
//! - `modules`: loaded ELF modules and their symbols;
//! - `signal`: installing the `SIGTRAP` handler and chaining;
//! - `threads`: thread ids and the thread scan.

pub mod code;
pub mod maps;
pub mod membarrier;
pub mod modules;
pub mod raw;
pub mod signal;
pub mod threads;
