//! Architecture-specific code. Everything that knows about instruction
//! encodings, register layouts or the trap instruction lives below here, behind
//! the small interface re-exported from this module; the generic core never
//! looks at an opcode. aarch64 (`brk #0`) would be added beside `x86_64`.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::*;

#[cfg(not(target_arch = "x86_64"))]
compile_error!("probert supports x86_64 only for now");
