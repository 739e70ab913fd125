//! Enums as they arrive from C: integers.
//!
//! C may pass any value in an enum-typed argument or field (a cast, a value
//! from a newer header, garbage), and a Rust enum holding an undeclared value
//! is undefined behaviour. So every enum that flows *from* C into probert is
//! received as a `u32` (the representation of these C enums: their values
//! are non-negative and fit in 32 bits, so C gives them `unsigned int`) and
//! validated before use: `probert_reg` by `Reg::from_index`, `probert_mode`
//! by `Mode::from_raw`, `probert_action` by the runtime (anything but
//! `PROBERT_REMOVE` continues), a status by `probert_status::from_raw`.
//!
//! The aliases carry the C names so that cbindgen, which does not see this
//! module, writes the enum types of API.md into the header
//! (`probert_regs_get(const probert_regs *regs, probert_reg reg)`), while Rust
//! compiles the same functions with integer parameters. The enums
//! themselves, for the header's definitions and for values flowing *to* C,
//! live in the module of their C object.
//!
//! cbindgen:ignore

/// `probert_status` passed to `probert_status_str`.
pub type probert_status = u32;
/// `probert_reg` passed to `probert_regs_get` / `probert_regs_set`.
pub type probert_reg = u32;
/// `probert_mode` in `probert_attach_opts`.
pub type probert_mode = u32;
/// `probert_action` returned by a C handler.
pub type probert_action = u32;
