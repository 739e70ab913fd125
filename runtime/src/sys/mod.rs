//! The operating system: the only place that calls `libc` or makes system
//! calls, and where loaded ELF files are read.
//!
//! - `raw`: system calls through the `syscall` instruction;
//! - `code`: reading and writing code bytes;
//! - `maps`: `/proc/self/maps`, mappings near code, reserved memory;
//! - `peek`: reads of our own memory that cannot fault;
//! - `membarrier`: process-wide memory and core-serialising barriers;
//! - `modules`: the loaded ELF modules and the cache of their tables;
//!   `module_file`: the file that matches a loaded image; `elf`: reading one
//!   with `object`; `cfi`: its `.eh_frame` FDEs (`gimli`); `lsda`: C++
//!   call-site tables; `extents`: the compact table of function extents;
//!   `symbols`: lookup by name;
//! - `signal`: installing the `SIGTRAP` handler, chaining to the previous
//!   disposition, hosts' handlers that chain to ours;
//! - `threads`: thread ids, the thread scan and the signal barrier;
//!   `scan_mode`: which signal scans use, or the host's quiescent points
//!   (`quiescent`) instead; `tasks`: listing the threads through a cached
//!   `/proc/self/task` descriptor; `sigframes`: contexts saved in signal
//!   frames deeper on a thread's stack; `thread_exit`: a destructor run
//!   by every exiting thread;
//! - `masks`: keeping `SIGTRAP` out of the masks a host sets; `spawn`:
//!   `posix_spawn`/`system`/`popen` children that serve probes.

pub mod cfi;
pub mod code;
pub mod elf;
pub mod extents;
pub mod lsda;
pub mod maps;
pub mod masks;
pub mod membarrier;
pub mod module_file;
pub mod modules;
pub mod peek;
pub mod quiescent;
pub mod raw;
pub mod scan_mode;
pub mod sigframes;
pub mod signal;
pub mod spawn;
pub mod symbols;
pub mod tasks;
pub mod thread_exit;
pub mod threads;
