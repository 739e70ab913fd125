//! Finding code to probe: functions by name, every function of a module,
//! and the instructions of a function — what probert itself knows of the
//! process's code (symbols, `.eh_frame` extents, its whole-function decode).
//!
//! Normal context only: everything here reads files or the writer's
//! layouts.

use crate::error::{Error, Result};
use crate::sys::{modules, symbols};

/// A function of a loaded module: its extent (from its FDE in `.eh_frame`,
/// or its symbol's size) and the symbol naming it, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    /// Its first byte (run-time address).
    pub start: usize,
    /// One past its last byte.
    pub end: usize,
    /// The symbol at `start`, as in the symbol table (mangled).
    pub name: Option<String>,
}

/// The address of function `symbol` in a loaded module: the C ABI's
/// `probert_symbol_addr`.
///
/// `module` is a path (compared after resolving links) or a file name with
/// or without its version suffix (`"libc.so.6"`, `"libc.so"`, `"libc"`);
/// `None` or `""` searches the main program first, then every module in
/// load order. `.dynsym` is searched before `.symtab`; an IFUNC resolves as
/// `dlsym` resolves it. [`Error::NotFound`] when there is no such module or
/// symbol.
pub fn symbol_addr(module: Option<&str>, symbol: &str) -> Result<usize> {
    symbols::symbol_addr(module, symbol).map_err(|_| Error::NotFound)
}

/// Every function of the loaded module `module` (named as for
/// [`symbol_addr`]; the first match in load order), in address order.
/// Stripped libraries included: their `.eh_frame` gives every function's
/// bounds. [`Error::NotFound`] if no loaded module matches.
pub fn functions(module: &str) -> Result<Vec<Function>> {
    let m = modules::loaded_modules()
        .into_iter()
        .find(|m| symbols::module_name_matches(module, &m.path))
        .ok_or(Error::NotFound)?;
    let Some(&(exec, _)) = m.exec.first() else {
        return Ok(Vec::new());
    };
    let layout = modules::module_layout(exec).ok_or(Error::NotFound)?;
    Ok(layout
        .extents
        .iter()
        .map(|e| Function {
            start: e.start,
            end: e.end,
            name: e.name().map(str::to_owned),
        })
        .collect())
}
