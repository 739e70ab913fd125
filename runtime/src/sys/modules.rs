//! Loaded ELF modules and their symbols.
//!
//! [`module_containing`] walks the loader's list with `dl_iterate_phdr` and
//! reports the executable `PT_LOAD` segment around an address.
//! [`function_containing`] names the function around an address: `dladdr`
//! (with the symbol's size from glibc's `dladdr1`) knows exported symbols; for
//! the rest it reads the module file's `.symtab` (or `.dynsym` if stripped),
//! parsed once per file and cached. Normal context only: both allocate and
//! take locks (the loader's and the cache's).
//!
//! Not covered: symbols only present in separate debug files
//! (`.gnu_debuglink`, debuginfod), and code outside any ELF module (JIT code
//! is named by its region instead).
//!
//! # Safety
//!
//! The unsafe code here calls `dl_iterate_phdr`, `dladdr` and `dladdr1` and
//! reads the structures they hand out only for the duration the loader
//! guarantees them (program headers and names during the callback; `Dl_info`
//! strings while the object stays loaded, copied out at once). Nothing here
//! writes memory it does not own.

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, OnceLock};

/// An executable segment of a loaded ELF module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// First address of the segment.
    pub start: usize,
    /// One past its last address (`p_vaddr + p_memsz`, plus the load bias).
    pub end: usize,
    /// The file: the loader's name for shared objects, the resolved
    /// `/proc/self/exe` for the main program; `linux-vdso.so.1` for the vDSO.
    pub path: String,
}

/// A function symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    /// Its first address, load bias included.
    pub start: usize,
    /// Its size in bytes; 0 when the symbol table does not say.
    pub size: usize,
    /// Its name as in the symbol table (mangled for Rust and C++).
    pub name: String,
}

/// What [`find_module`] reports.
#[derive(Debug)]
struct Found {
    module: Module,
    /// `dlpi_addr`: the load bias.
    bias: usize,
    /// The main program (empty `dlpi_name`).
    main: bool,
}

/// The executable `PT_LOAD` segment containing `addr`, via `dl_iterate_phdr`.
///
/// Normal context only.
pub fn module_containing(addr: usize) -> Option<Module> {
    find_module(addr).map(|f| f.module)
}

/// [`module_containing`], with the load bias.
fn find_module(addr: usize) -> Option<Found> {
    struct Search {
        addr: usize,
        /// `AT_PHDR`: the main program's program headers.
        main_phdr: usize,
        found: Option<Found>,
    }

    /// Called by the loader for each object, under its lock.
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: `data` is the `Search` passed to `dl_iterate_phdr` below,
        // exclusively ours for the call; `info` is valid during the callback.
        let (search, info) = unsafe { (&mut *data.cast::<Search>(), &*info) };
        let bias = info.dlpi_addr as usize;
        let phdrs: &[libc::Elf64_Phdr] = if info.dlpi_phdr.is_null() {
            &[]
        } else {
            // SAFETY: the loader guarantees `dlpi_phnum` headers at
            // `dlpi_phdr` for the duration of the callback.
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
        };
        let hit = phdrs.iter().find_map(|ph| {
            if ph.p_type != libc::PT_LOAD || ph.p_flags & libc::PF_X == 0 {
                return None;
            }
            let start = bias.wrapping_add(ph.p_vaddr as usize);
            let end = start.wrapping_add(ph.p_memsz as usize);
            (start <= search.addr && search.addr < end).then_some((start, end))
        });
        let Some((start, end)) = hit else {
            return 0;
        };
        let name = if info.dlpi_name.is_null() {
            String::new()
        } else {
            // SAFETY: a NUL-terminated string valid during the callback,
            // copied out here.
            unsafe { CStr::from_ptr(info.dlpi_name) }
                .to_string_lossy()
                .into_owned()
        };
        // glibc names the main program "", static musl "/proc/self/exe",
        // dynamic musl argv[0] or AT_EXECFN (maybe relative): recognise it
        // by its program headers instead.
        let main = name.is_empty() || info.dlpi_phdr as usize == search.main_phdr;
        search.found = Some(Found {
            main,
            module: Module {
                start,
                end,
                path: name,
            },
            bias,
        });
        1
    }

    let mut search = Search {
        addr,
        // SAFETY: getauxval only reads the auxiliary vector.
        main_phdr: unsafe { libc::getauxval(libc::AT_PHDR) } as usize,
        found: None,
    };
    // SAFETY: `visit` matches the callback type, does not unwind (no
    // panicking operation; a panic would abort at the `extern "C"`
    // boundary), and `search` outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&mut search as *mut Search).cast()) };
    let mut found = search.found?;
    if found.main {
        found.module.path = std::fs::read_link("/proc/self/exe")
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "/proc/self/exe".to_string());
    }
    Some(found)
}

/// The function symbol containing `addr`: `dladdr` first, then the module
/// file's `.symtab`.
///
/// A `dladdr` symbol of unknown size (musl has no `dladdr1`; some symbols
/// have no size) is only taken if the file's table finds nothing and `addr`
/// is its first byte: `dladdr` returns the nearest preceding exported symbol,
/// which may be another function entirely. Normal context only.
pub fn function_containing(addr: usize) -> Option<Symbol> {
    let sizeless = match dladdr_symbol(addr) {
        Some(sym) if sym.size > 0 && addr < sym.start.saturating_add(sym.size) => return Some(sym),
        Some(sym) if sym.size == 0 && sym.start == addr => Some(sym),
        _ => None,
    };
    symtab_symbol(addr).or(sizeless)
}

/// `RTLD_DL_SYMENT` for `dladdr1`: return the `ElfW(Sym)` of the symbol.
#[cfg(target_env = "gnu")]
const RTLD_DL_SYMENT: c_int = 1;

/// What `dladdr` knows about `addr`: exported symbols only.
fn dladdr_symbol(addr: usize) -> Option<Symbol> {
    // SAFETY: `Dl_info` is plain data; all-zero is valid.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    #[cfg(target_env = "gnu")]
    let (ok, size) = {
        let mut sym: *const libc::Elf64_Sym = std::ptr::null();
        // SAFETY: `info` and `sym` are writable; with RTLD_DL_SYMENT glibc
        // stores a pointer to the symbol's entry in the loaded .dynsym.
        let ok = unsafe {
            libc::dladdr1(
                addr as *const c_void,
                &mut info,
                (&mut sym as *mut *const libc::Elf64_Sym).cast(),
                RTLD_DL_SYMENT,
            )
        } != 0;
        let size = if ok && !sym.is_null() {
            // SAFETY: `sym` points into the mapped .dynsym of an object that
            // stays loaded (the caller's contract for `addr`).
            unsafe { (*sym).st_size as usize }
        } else {
            0
        };
        (ok, size)
    };
    #[cfg(not(target_env = "gnu"))]
    let (ok, size) = {
        // SAFETY: `info` is writable.
        let ok = unsafe { libc::dladdr(addr as *const c_void, &mut info) } != 0;
        (ok, 0)
    };
    if !ok || info.dli_saddr.is_null() || info.dli_sname.is_null() {
        return None;
    }
    let name = c_str(info.dli_sname)?;
    Some(Symbol {
        start: info.dli_saddr as usize,
        size,
        name,
    })
}

/// Copies a C string out.
fn c_str(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` is a NUL-terminated string from the loader, valid while the
    // object stays loaded; copied at once.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// The function around `addr` per the module file's symbol table.
fn symtab_symbol(addr: usize) -> Option<Symbol> {
    let found = find_module(addr)?;
    let table = table_for(&found)?;
    // ET_EXEC values are absolute; ET_DYN (PIE, shared objects) values are
    // relative to the load bias.
    let bias = if table.relocatable { found.bias } else { 0 };
    let (start, size, name) = table.lookup(addr.wrapping_sub(bias))?;
    Some(Symbol {
        start: start.wrapping_add(bias),
        size,
        name: name.to_string(),
    })
}

/// Parsed symbol tables by path. An unreadable or symbol-less file caches
/// an empty table, so it is read once.
static TABLES: OnceLock<Mutex<HashMap<String, Arc<SymbolTable>>>> = OnceLock::new();

/// The cached table for `found`'s file, parsing it on first use.
fn table_for(found: &Found) -> Option<Arc<SymbolTable>> {
    let tables = TABLES.get_or_init(|| Mutex::new(HashMap::new()));
    let key = &found.module.path;
    if let Some(t) = tables
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(key)
    {
        return Some(t.clone());
    }
    // Parse outside the lock: files can be large. Two racing parsers just
    // parse twice. The main program is read through /proc/self/exe, which
    // still works if the file was replaced or deleted since it started.
    let file = if found.main {
        "/proc/self/exe"
    } else {
        key.as_str()
    };
    let table = Arc::new(
        File::open(file)
            .ok()
            .and_then(|f| SymbolTable::parse(&f))
            .unwrap_or_default(),
    );
    let cached = tables
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .entry(key.clone())
        .or_insert(table)
        .clone();
    Some(cached)
}

/// An ELF file's function symbols, sorted by address.
#[derive(Debug, Default)]
struct SymbolTable {
    /// `e_type == ET_DYN`: values are relative to the load bias.
    relocatable: bool,
    /// `(st_value, st_size, name offset in strtab)`, sorted.
    funcs: Vec<(usize, usize, usize)>,
    /// The string table the names point into.
    strtab: Vec<u8>,
}

/// ELF constants (from `elf.h`), spelled out to stay independent of which
/// of them a libc binding exports.
mod elf {
    pub const ELFCLASS64: u8 = 2;
    pub const ELFDATA2LSB: u8 = 1;
    pub const ET_EXEC: u16 = 2;
    pub const ET_DYN: u16 = 3;
    pub const SHT_SYMTAB: u32 = 2;
    pub const SHT_DYNSYM: u32 = 11;
    pub const STT_FUNC: u8 = 2;
    pub const STT_GNU_IFUNC: u8 = 10;
    pub const SHN_UNDEF: u16 = 0;
    pub const SHDR_SIZE: usize = 64;
    pub const SYM_SIZE: usize = 24;
}

/// Little-endian field readers over a byte slice; `None` when out of range.
fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?)).ok()
}

/// Reads `len` bytes at `off` of `f`.
fn read_at(f: &File, off: usize, len: usize) -> Option<Vec<u8>> {
    // A corrupt header must not make us allocate gigabytes.
    const MAX: usize = 1 << 30;
    if len > MAX {
        return None;
    }
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, u64::try_from(off).ok()?).ok()?;
    Some(buf)
}

impl SymbolTable {
    /// Parses the `.symtab` of an ELF64 little-endian file, or its `.dynsym`
    /// if it has none. `None` if it is not such a file.
    fn parse(f: &File) -> Option<SymbolTable> {
        let eh = read_at(f, 0, 64)?;
        if eh.get(..4)? != b"\x7fELF"
            || *eh.get(4)? != elf::ELFCLASS64
            || *eh.get(5)? != elf::ELFDATA2LSB
        {
            return None;
        }
        let relocatable = match u16_at(&eh, 16)? {
            elf::ET_DYN => true,
            elf::ET_EXEC => false,
            _ => return None,
        };
        let shoff = u64_at(&eh, 40)?;
        let shentsize = usize::from(u16_at(&eh, 58)?);
        if shoff == 0 || shentsize < elf::SHDR_SIZE {
            return None;
        }
        let mut shnum = usize::from(u16_at(&eh, 60)?);
        if shnum == 0 {
            // Extended numbering: the count is in section 0's sh_size.
            shnum = u64_at(&read_at(f, shoff, elf::SHDR_SIZE)?, 32)?;
        }
        let shdrs = read_at(f, shoff, shnum.checked_mul(shentsize)?)?;
        let section = |i: usize| shdrs.get(i * shentsize..i * shentsize + elf::SHDR_SIZE);
        let find =
            |ty: u32| (0..shnum).find(|&i| section(i).and_then(|s| u32_at(s, 4)) == Some(ty));
        let symtab = section(find(elf::SHT_SYMTAB).or_else(|| find(elf::SHT_DYNSYM))?)?;
        let (sym_off, sym_size) = (u64_at(symtab, 24)?, u64_at(symtab, 32)?);
        let strtab = section(usize::try_from(u32_at(symtab, 40)?).ok()?)?;
        let (str_off, str_size) = (u64_at(strtab, 24)?, u64_at(strtab, 32)?);
        let syms = read_at(f, sym_off, sym_size)?;
        let strtab = read_at(f, str_off, str_size)?;
        let mut funcs: Vec<(usize, usize, usize)> = syms
            .chunks_exact(elf::SYM_SIZE)
            .filter_map(|s| {
                let kind = s.get(4)? & 0xf;
                let shndx = u16_at(s, 6)?;
                let (value, size) = (u64_at(s, 8)?, u64_at(s, 16)?);
                let func = kind == elf::STT_FUNC || kind == elf::STT_GNU_IFUNC;
                (func && shndx != elf::SHN_UNDEF && size > 0).then_some((
                    value,
                    size,
                    usize::try_from(u32_at(s, 0)?).ok()?,
                ))
            })
            .collect();
        funcs.sort_unstable();
        Some(SymbolTable {
            relocatable,
            funcs,
            strtab,
        })
    }

    /// `(start, size, name)` of the function containing file address `a`.
    fn lookup(&self, a: usize) -> Option<(usize, usize, &str)> {
        let after = self.funcs.partition_point(|&(v, _, _)| v <= a);
        // Nested or overlapping entries (local labels typed FUNC, aliases of
        // different sizes) are rare: look back a few for one that contains.
        self.funcs[..after]
            .iter()
            .rev()
            .take(16)
            .find(|&&(v, size, _)| a < v.saturating_add(size))
            .and_then(|&(v, size, name)| Some((v, size, self.name(name)?)))
    }

    /// The NUL-terminated name at `off` in the string table.
    fn name(&self, off: usize) -> Option<&str> {
        let bytes = self.strtab.get(off..)?;
        let end = bytes.iter().position(|&b| b == 0)?;
        std::str::from_utf8(bytes.get(..end)?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hint::black_box;

    #[inline(never)]
    #[no_mangle]
    extern "C" fn probert_modules_test_exported(x: u64) -> u64 {
        black_box(x).wrapping_mul(3).rotate_left(7) ^ black_box(0x5555)
    }

    #[inline(never)]
    fn private_target(x: u64) -> u64 {
        black_box(x).wrapping_add(11).rotate_right(3) ^ black_box(0xaaaa)
    }

    fn addr_of_exported() -> usize {
        black_box(probert_modules_test_exported as extern "C" fn(u64) -> u64) as usize
    }

    fn addr_of_private() -> usize {
        black_box(private_target as fn(u64) -> u64) as usize
    }

    #[test]
    fn main_program_module_contains_its_functions() {
        let f = addr_of_private();
        let m = module_containing(f).expect("module");
        assert!(m.start <= f && f < m.end);
        let exe = std::env::current_exe().expect("current_exe");
        assert_eq!(std::path::Path::new(&m.path), exe);
    }

    #[test]
    fn libc_module_contains_getpid() {
        let f = black_box(libc::getpid as unsafe extern "C" fn() -> libc::pid_t) as usize;
        let m = module_containing(f).expect("module");
        assert!(m.start <= f && f < m.end);
        // Static musl links libc into the program itself.
        let exe = std::env::current_exe().expect("current_exe");
        assert!(
            m.path.contains("libc") || std::path::Path::new(&m.path) == exe,
            "{}",
            m.path
        );
    }

    #[test]
    fn exported_function_found_with_its_start() {
        let f = addr_of_exported();
        assert_eq!(probert_modules_test_exported(black_box(1)), {
            let x = 1u64;
            x.wrapping_mul(3).rotate_left(7) ^ 0x5555
        });
        let s = function_containing(f).expect("symbol");
        assert_eq!(s.start, f);
        assert_eq!(s.name, "probert_modules_test_exported");
        assert!(s.size > 0);
        let mid = function_containing(f + s.size / 2).expect("middle");
        assert_eq!(mid, s);
        let last = function_containing(f + s.size - 1).expect("last byte");
        assert_eq!(last.start, f);
    }

    #[test]
    fn private_function_found_through_symtab() {
        let f = addr_of_private();
        let _ = private_target(black_box(2));
        let s = function_containing(f).expect("symbol");
        assert_eq!(s.start, f);
        assert!(s.name.contains("private_target"), "{}", s.name);
        assert!(s.size > 0);
        assert_eq!(
            function_containing(f + s.size / 2).expect("middle").start,
            f
        );
        // Cached: the second lookup answers the same.
        assert_eq!(function_containing(f), Some(s));
    }

    #[test]
    fn libc_getpid_found_via_dladdr() {
        let f = black_box(libc::getpid as unsafe extern "C" fn() -> libc::pid_t) as usize;
        // A static program (musl's default) has no dynamic symbols to ask.
        if cfg!(target_env = "gnu") {
            let s = dladdr_symbol(f).expect("dladdr");
            assert_eq!(s.start, f);
            assert!(s.name.contains("getpid"), "{}", s.name);
            assert!(s.size > 0, "dladdr1 gives the size");
        }
        let via_api = function_containing(f).expect("symbol");
        assert_eq!(via_api.start, f);
        assert!(via_api.name.contains("getpid"), "{}", via_api.name);
    }

    #[test]
    fn heap_addresses_are_in_no_module() {
        let b = Box::new([0u8; 64]);
        let p = b.as_ptr() as usize;
        assert_eq!(module_containing(p), None);
        assert_eq!(function_containing(p), None);
        let v = vec![0u8; 1 << 20];
        assert_eq!(function_containing(v.as_ptr() as usize + 4096), None);
    }

    #[test]
    fn parser_rejects_non_elf_and_looks_up_tables() {
        let path = std::env::temp_dir().join(format!("probert-notelf-{}", std::process::id()));
        std::fs::write(&path, b"#!/bin/sh\necho not elf\n").expect("write");
        assert!(SymbolTable::parse(&File::open(&path).expect("open")).is_none());
        let _ = std::fs::remove_file(&path);
        let t = SymbolTable {
            relocatable: true,
            funcs: vec![(0x100, 0x40, 1), (0x120, 0x8, 3), (0x200, 0x10, 5)],
            strtab: b"\0a\0b\0c\0".to_vec(),
        };
        assert_eq!(t.lookup(0x100), Some((0x100, 0x40, "a")));
        assert_eq!(t.lookup(0x124), Some((0x120, 0x8, "b")));
        // Past the nested entry, still in the outer one.
        assert_eq!(t.lookup(0x130), Some((0x100, 0x40, "a")));
        assert_eq!(t.lookup(0x140), None);
        assert_eq!(t.lookup(0x20f), Some((0x200, 0x10, "c")));
        assert_eq!(t.lookup(0xff), None);
    }
}
