//! Finding a function by name: API 0.2's `probert_symbol_addr`.
//!
//! [`symbol_addr`] takes the modules whose name matches — main program
//! first, then load order, from the same snapshot as
//! [`super::modules::function_extent`] — and looks the name up in each
//! module's table (`.dynsym` and `.symtab`, one binary search). Of several
//! symbols of one name, the one `dlsym` would return comes first: exported,
//! default version (`foo@@V`, not `foo@V`), then other globals, then locals.
//!
//! # IFUNCs
//!
//! An `STT_GNU_IFUNC` symbol's value is its resolver; the code callers reach
//! is whatever the resolver returned, and a probe on the resolver would
//! never fire after startup. So [`symbol_addr`] returns what `dlsym` does:
//! for an exported IFUNC it asks `dlsym` on a handle of that module
//! (`dlopen(path, RTLD_NOLOAD)`, which never loads anything or runs a
//! constructor; the main program's handle is `dlopen(NULL)`), and accepts
//! the answer only inside that module's executable segments. A local IFUNC
//! (only in `.symtab`: static glibc) is [`NotFound::Ifunc`]; its target is
//! in an `R_X86_64_IRELATIVE` GOT slot, which is not read here.
//!
//! # Safety
//!
//! The unsafe code calls `dlopen` with `RTLD_NOLOAD`, `dlsym` on the handle
//! it returned, and `dlclose` on that handle once.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::path::Path;

use super::extents::NamedSymbol;
use super::module_file::Kind;
use super::modules::{with_snapshot, Loaded};

/// Why [`symbol_addr`] found nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotFound {
    /// No loaded module matches the module name.
    #[error("no loaded module matches the name")]
    Module,
    /// No matching module has a function symbol of that name.
    #[error("no function symbol of that name")]
    Symbol,
    /// The symbol is an IFUNC that `dlsym` does not resolve to this module.
    #[error("the symbol is an IFUNC whose target is not known")]
    Ifunc,
}

/// The address of function `symbol` in a loaded module (API 0.2's
/// `probert_symbol_addr`).
///
/// `module` is a path (compared after resolving links), or a file name with
/// or without its version suffix (`"libc.so.6"`, `"libc.so"`, `"libc"`);
/// `None` or `""` means the main program first, then every module in load
/// order. In each module `.dynsym` is searched, then `.symtab`; of several
/// symbols of that name the one `dlsym` would return comes first (exported,
/// default version). IFUNCs resolve as `dlsym` resolves them (see the module docs).
///
/// Normal context only.
pub fn symbol_addr(module: Option<&str>, symbol: &str) -> Result<usize, NotFound> {
    let query = module.filter(|q| !q.is_empty());
    with_snapshot(|s| {
        let main = s.modules.iter().filter(|m| m.kind == Kind::Main);
        let rest = s.modules.iter().filter(|m| m.kind != Kind::Main);
        let mut matched = false;
        for m in main.chain(rest) {
            if query.is_some_and(|q| !module_name_matches(q, &m.info.path)) {
                continue;
            }
            matched = true;
            let Some(table) = m.table() else { continue };
            if let Some(sym) = table.symbols_named(symbol).first() {
                return resolve(m, symbol, sym);
            }
        }
        Err(if matched {
            NotFound::Symbol
        } else {
            NotFound::Module
        })
    })
}

/// Whether `query` names the module at `path` (see [`symbol_addr`]).
pub(crate) fn module_name_matches(query: &str, path: &str) -> bool {
    if query.contains('/') {
        if query == path {
            return true;
        }
        return match (std::fs::canonicalize(query), std::fs::canonicalize(path)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
    }
    let file = Path::new(path)
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or(path);
    if query == file {
        return true;
    }
    // `stem.so[.N]*`: the query may stop after the stem, after ".so", or
    // after any version component.
    let Some(so) = file
        .match_indices(".so")
        .map(|(i, _)| i)
        .find(|&i| matches!(file.as_bytes().get(i + 3), None | Some(b'.')))
    else {
        return false;
    };
    let (stem, suffix) = file.split_at(so);
    match query.strip_prefix(stem) {
        Some("") => !stem.is_empty(),
        Some(rest) => {
            rest.starts_with(".so")
                && suffix.starts_with(rest)
                && matches!(suffix.as_bytes().get(rest.len()), None | Some(b'.'))
        }
        None => false,
    }
}

/// The run-time address of `sym` of module `m`, as `dlsym` would give.
fn resolve(m: &Loaded, name: &str, sym: &NamedSymbol) -> Result<usize, NotFound> {
    let addr = (sym.vaddr as usize).wrapping_add(m.info.bias);
    if !sym.flags.ifunc {
        return Ok(addr);
    }
    if !sym.flags.dlsym_visible() || m.kind == Kind::Vdso {
        return Err(NotFound::Ifunc);
    }
    let target = dlsym_in(m, name).ok_or(NotFound::Ifunc)?;
    let inside = m.info.exec.iter().any(|&(s, e)| s <= target && target < e);
    inside.then_some(target).ok_or(NotFound::Ifunc)
}

/// `dlsym(dlopen(module, RTLD_NOLOAD), name)`: the address the loader
/// resolves `name` to, searching `module` first (IFUNCs resolved).
fn dlsym_in(m: &Loaded, name: &str) -> Option<usize> {
    let name = CString::new(name).ok()?;
    let path = match m.kind {
        Kind::Main => None,
        _ => Some(CString::new(m.info.path.as_str()).ok()?),
    };
    let path_ptr = path.as_ref().map_or(std::ptr::null(), |p| p.as_ptr());
    // SAFETY: `path_ptr` is NULL (the main program) or a NUL-terminated
    // path; RTLD_NOLOAD never loads, so no constructor runs.
    let handle = unsafe { libc::dlopen(path_ptr, libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        return None;
    }
    // SAFETY: `handle` is a live handle from dlopen; `name` is
    // NUL-terminated.
    let addr = unsafe { libc::dlsym(handle, name.as_ptr()) } as usize;
    // SAFETY: drops the reference taken by the dlopen above.
    unsafe { libc::dlclose(handle) };
    (addr != 0).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::modules::tests::{addr_of_exported, dlsym, module_named, open};
    use crate::sys::modules::{function_extent, loaded_modules, table_of};

    #[test]
    fn symbol_addr_finds_what_dlsym_finds() {
        let want = dlsym(libc::RTLD_DEFAULT, "malloc");
        assert_ne!(want, 0);
        assert_eq!(symbol_addr(Some("libc.so.6"), "malloc"), Ok(want));
        assert_eq!(symbol_addr(Some("libc.so"), "malloc"), Ok(want));
        assert_eq!(symbol_addr(Some("libc"), "malloc"), Ok(want));
        assert_eq!(symbol_addr(None, "malloc"), Ok(want));
        assert_eq!(symbol_addr(Some(""), "malloc"), Ok(want));
        let libc_path = module_named("libc.so.6").path;
        assert_eq!(symbol_addr(Some(&libc_path), "malloc"), Ok(want));
        let real = std::fs::canonicalize(&libc_path).expect("canonicalize");
        assert_eq!(symbol_addr(real.to_str(), "malloc"), Ok(want));
        assert_eq!(
            symbol_addr(Some("libc.so.6"), "no_such_function_here"),
            Err(NotFound::Symbol)
        );
        assert_eq!(
            symbol_addr(None, "no_such_function_here"),
            Err(NotFound::Symbol)
        );
        assert_eq!(
            symbol_addr(Some("libnothing"), "malloc"),
            Err(NotFound::Module)
        );
        assert_eq!(
            symbol_addr(Some("/nonexistent/libc.so.6"), "malloc"),
            Err(NotFound::Module)
        );
        // In the main program, by its file name.
        let exe = std::env::current_exe().expect("exe");
        let exe_name = exe.file_name().and_then(|f| f.to_str()).expect("name");
        assert_eq!(
            symbol_addr(Some(exe_name), "probert_modules_test_exported"),
            Ok(addr_of_exported())
        );
        assert_eq!(
            symbol_addr(None, "probert_modules_test_exported"),
            Ok(addr_of_exported())
        );
    }

    #[test]
    fn symbol_addr_resolves_ifuncs_like_dlsym() {
        let handle = open("libc.so.6");
        for name in ["memcpy", "strlen", "memset"] {
            let want = dlsym(handle, name);
            let got = symbol_addr(Some("libc.so.6"), name).expect(name);
            assert_eq!(got, want, "{name}");
            // The table's own value is the resolver, elsewhere.
            let table = table_of(&module_named("libc.so.6")).expect("table");
            let sym = table.symbols_named(name)[0];
            assert!(sym.flags.ifunc, "{name} is an IFUNC in glibc");
            assert_ne!(sym.vaddr as usize + module_named("libc.so.6").bias, got);
            // The target is a function with an extent.
            assert_eq!(function_extent(got).map(|e| e.start), Some(got), "{name}");
        }
    }

    #[test]
    fn vdso_is_read_from_memory() {
        let Some(m) = loaded_modules()
            .into_iter()
            .find(|m| m.path.contains("vdso"))
        else {
            return;
        };
        let addr = symbol_addr(Some(&m.path), "__vdso_clock_gettime").expect("vdso symbol");
        let e = function_extent(addr).expect("extent");
        assert_eq!(e.start, addr);
        assert!(
            e.name().is_some_and(|n| n.contains("clock_gettime")),
            "{e:?}"
        );
    }

    #[test]
    fn module_names_match_with_and_without_versions() {
        let p = "/lib/x86_64-linux-gnu/libc.so.6";
        for q in ["libc.so.6", "libc.so", "libc"] {
            assert!(module_name_matches(q, p), "{q}");
        }
        for q in ["libc.so.", "libc.s", "lib", "libc.so.60", "c", "libcrypto"] {
            assert!(!module_name_matches(q, p), "{q}");
        }
        assert!(!module_name_matches("libc", "/usr/lib/libcrypto.so.3"));
        assert!(module_name_matches("liblua5.4", "/usr/lib/liblua5.4.so.0"));
        assert!(module_name_matches(
            "libstdc++.so.6.0",
            "/x/libstdc++.so.6.0.30"
        ));
        assert!(!module_name_matches(
            "libstdc++.so.6.0.3",
            "/x/libstdc++.so.6.0.30"
        ));
        assert!(module_name_matches("prog", "/usr/bin/prog"));
        assert!(!module_name_matches("prog", "/usr/bin/program"));
    }
}
