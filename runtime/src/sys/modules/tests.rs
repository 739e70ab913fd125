//! Tests of the module list, extents and symbol lookup: on this test binary
//! and on system libraries nobody here wrote (`dlopen`ed, never closed, so
//! tests running in parallel keep them), plus private copies for the
//! unload and replace cases.

use super::*;
use crate::sys::elf::read_elf;
use std::ffi::CString;
use std::hint::black_box;
use std::path::Path;

use crate::sys::module_file::tests::parses;

#[inline(never)]
#[no_mangle]
extern "C" fn probert_modules_test_exported(x: u64) -> u64 {
    black_box(x).wrapping_mul(3).rotate_left(7) ^ black_box(0x5555)
}

#[inline(never)]
fn private_target(x: u64) -> u64 {
    black_box(x).wrapping_add(11).rotate_right(3) ^ black_box(0xaaaa)
}

pub(crate) fn addr_of_exported() -> usize {
    black_box(probert_modules_test_exported as extern "C" fn(u64) -> u64) as usize
}

fn addr_of_private() -> usize {
    black_box(private_target as fn(u64) -> u64) as usize
}

/// `dlopen(name)`, never closed.
pub(crate) fn open(name: &str) -> *mut c_void {
    let c = CString::new(name).expect("name");
    // SAFETY: a NUL-terminated library name; the library's constructors
    // are those of a system library.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null(), "dlopen {name}");
    h
}

pub(crate) fn dlsym(handle: *mut c_void, name: &str) -> usize {
    let c = CString::new(name).expect("name");
    // SAFETY: a live handle (or RTLD_DEFAULT) and a NUL-terminated name.
    unsafe { libc::dlsym(handle, c.as_ptr()) as usize }
}

/// The loaded module whose file name is `file`.
pub(crate) fn module_named(file: &str) -> ModuleInfo {
    loaded_modules()
        .into_iter()
        .find(|m| Path::new(&m.path).file_name().and_then(|f| f.to_str()) == Some(file))
        .unwrap_or_else(|| panic!("{file} not loaded"))
}

fn main_module() -> ModuleInfo {
    loaded_modules().into_iter().next().expect("main program")
}

#[test]
fn main_program_module_contains_its_functions() {
    let f = addr_of_private();
    let m = module_containing(f).expect("module");
    assert!(m.start <= f && f < m.end);
    let exe = std::env::current_exe().expect("current_exe");
    assert_eq!(Path::new(&m.path), exe);
    let first = main_module();
    assert_eq!(Path::new(&first.path), exe);
    assert!(
        first.build_id.is_some(),
        "Debian's toolchain links with --build-id"
    );
}

#[test]
fn exported_function_extent_agrees_with_the_symbol_table() {
    let f = addr_of_exported();
    assert_eq!(probert_modules_test_exported(black_box(1)), {
        let x = 1u64;
        x.wrapping_mul(3).rotate_left(7) ^ 0x5555
    });
    let e = function_extent(f).expect("extent");
    assert_eq!(e.start, f);
    assert_eq!(e.name(), Some("probert_modules_test_exported"));
    assert_eq!(e.source, Source::Fde);
    let table = table_of(&main_module()).expect("table");
    let sym = table.symbols_named("probert_modules_test_exported");
    assert_eq!(sym.len(), 1, "{sym:?}");
    assert_eq!(e.end - e.start, sym[0].size as usize);
    assert_eq!(function_extent(f + (e.end - f) / 2), Some(e.clone()));
    assert_eq!(function_extent(e.end - 1).map(|x| x.start), Some(f));
    assert_ne!(function_extent(e.end).map(|x| x.start), Some(f));
}

#[test]
fn private_function_found_through_symtab_names() {
    let f = addr_of_private();
    let _ = private_target(black_box(2));
    let e = function_extent(f).expect("extent");
    assert_eq!(e.start, f);
    assert!(e.name().expect("name").contains("private_target"), "{e:?}");
    assert_eq!(function_extent(f + (e.end - f) / 2), Some(e.clone()));
    assert_eq!(function_extent(f), Some(e));
}

#[test]
fn test_binary_extents_agree_with_its_sized_symbols() {
    let main = main_module();
    let (mut checked, mut agree) = (0usize, 0usize);
    let mut disagree = Vec::new();
    for (name, start, size) in module_functions(&main) {
        if size == 0 || !main.exec.iter().any(|&(s, e)| s <= start && start < e) {
            continue;
        }
        checked += 1;
        match function_extent(start) {
            Some(e) if e.start == start && e.end == start + size => agree += 1,
            other => disagree.push((name, start, size, other)),
        }
    }
    println!(
        "test binary: {agree}/{checked} sized symbols match their extent; first mismatches: {:?}",
        &disagree[..disagree.len().min(5)]
    );
    assert!(checked > 1000, "{checked}");
    // Aliases of one function with different sizes and symbols that cross
    // an FDE are the only allowed mismatches.
    assert!(agree * 100 >= checked * 99, "{agree}/{checked}");
}

#[test]
fn heap_addresses_are_in_no_module() {
    let b = Box::new([0u8; 64]);
    let p = b.as_ptr() as usize;
    assert_eq!(module_containing(p), None);
    assert_eq!(function_extent(p), None);
    let v = vec![0u8; 1 << 20];
    assert_eq!(function_extent(v.as_ptr() as usize + 4096), None);
}

/// Coverage, containment, overlap and exported-symbol checks on a
/// system library; returns the table's stats.
fn check_library(file: &str, min_share: f64) -> super::super::extents::TableStats {
    let handle = open(file);
    let m = module_named(file);
    let table = table_of(&m).expect("table");
    let stats = table.stats();
    let share = stats.covered as f64 / stats.executable as f64;
    let extents = table.extents(m.bias);
    let mut nested = 0;
    for w in extents.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if b.start < a.end {
            // Only nesting (an alternate entry inside a function), never a
            // partial overlap.
            assert!(
                b.end <= a.end || a.start == b.start,
                "{file}: {a:?} and {b:?} overlap"
            );
            nested += 1;
        }
    }
    for e in &extents {
        assert!(
            m.exec.iter().any(|&(s, x)| s <= e.start && e.end <= x),
            "{file}: {e:?} outside the executable segments"
        );
    }
    // Exported functions: the extent starts at the symbol dlsym returns.
    let (mut exported, mut at_symbol) = (0, 0);
    for (name, start, size) in module_functions(&m) {
        if size == 0 || dlsym(handle, &name) != start {
            continue;
        }
        exported += 1;
        match function_extent(start) {
            Some(e) if e.start == start => at_symbol += 1,
            other => panic!("{file}: {name} at {start:#x}: {other:?}"),
        }
    }
    // Stripped code: an FDE without any symbol is found from its middle.
    let unnamed: Vec<&Extent> = extents
        .iter()
        .filter(|e| e.source == Source::Fde && e.name().is_none())
        .collect();
    let pick = unnamed.get(unnamed.len() / 2).expect("an unnamed FDE");
    let mid = pick.start + (pick.end - pick.start) / 2;
    assert_eq!(function_extent(mid).as_ref(), Some(*pick));
    let in_symbols = module_functions(&m)
        .filter(|&(_, s, _)| s == pick.start)
        .count();
    assert_eq!(in_symbols, 0, "{pick:?} has a symbol");
    println!(
        "{file}: {:.1}% of {} executable bytes in an extent; {} functions ({} FDE, {} .dynsym, \
         {} .symtab), {} without a name, {nested} nested; {} symbols, {exported} exported \
         checked; {} landing pads; table {} bytes",
        share * 100.0,
        stats.executable,
        stats.functions,
        stats.from_fde,
        stats.from_dynsym,
        stats.from_symtab,
        unnamed.len(),
        stats.symbols,
        stats.landing_pads,
        stats.heap_bytes,
    );
    assert_eq!(at_symbol, exported);
    assert!(
        exported > 10,
        "{file}: {exported} exported functions checked"
    );
    assert!(share >= min_share, "{file}: {share}");
    stats
}

#[test]
fn libc_extents() {
    check_library("libc.so.6", 0.95);
}

#[test]
fn zlib_extents() {
    check_library("libz.so.1", 0.95);
}

#[test]
fn sqlite_extents() {
    check_library("libsqlite3.so.0", 0.95);
}

#[test]
fn lua_extents() {
    check_library("liblua5.4.so.0", 0.95);
}

#[test]
fn libstdcxx_landing_pads_lie_inside_their_functions() {
    let _h = open("libstdc++.so.6");
    let m = module_named("libstdc++.so.6");
    let table = table_of(&m).expect("table");
    let (mut with_pads, mut pads, mut unknown) = (0, 0, 0);
    for e in table.extents(m.bias) {
        match e.landing_pads() {
            Ok(p) if p.is_empty() => {}
            Ok(p) => {
                with_pads += 1;
                pads += p.len();
                for &a in &p {
                    assert!(e.start <= a && a < e.end, "{e:?}: pad {a:#x}");
                }
                // The public path gives the same pads.
                let again = function_extent(e.start).expect("extent");
                assert_eq!(again.landing_pads(), Ok(p));
            }
            Err(_) => unknown += 1,
        }
    }
    println!(
        "libstdc++: {with_pads} functions with {pads} landing pads, {unknown} unreadable LSDAs"
    );
    assert!(with_pads > 500, "{with_pads}");
    assert_eq!(unknown, 0);
}

fn loaded(path: &str, bias: usize, build_id: Option<Vec<u8>>, kind: Kind) -> Loaded {
    Loaded {
        info: ModuleInfo {
            path: path.into(),
            bias,
            exec: vec![(bias + 0x1000, bias + 0x2000)],
            build_id,
        },
        kind,
        exec_link: vec![(0x1000, 0x1000)],
        table: OnceLock::new(),
    }
}

#[test]
fn tables_carry_over_only_for_the_same_image() {
    let id = Some(vec![1, 2, 3]);
    let old = loaded("/l/libx.so", 0x7000_0000, id.clone(), Kind::Shared);
    assert!(loaded("/l/libx.so", 0x7000_0000, id.clone(), Kind::Shared).same_image(&old));
    // Another file at the same address.
    assert!(!loaded("/l/libx.so", 0x7000_0000, Some(vec![9]), Kind::Shared).same_image(&old));
    assert!(!loaded("/l/liby.so", 0x7000_0000, id.clone(), Kind::Shared).same_image(&old));
    // The same file elsewhere.
    assert!(!loaded("/l/libx.so", 0x7100_0000, id, Kind::Shared).same_image(&old));
    // Without a build-id nothing proves it is the same file.
    let old = loaded("/l/libx.so", 0x7000_0000, None, Kind::Shared);
    assert!(!loaded("/l/libx.so", 0x7000_0000, None, Kind::Shared).same_image(&old));
    // The main program never changes.
    let old = loaded("/bin/p", 0, None, Kind::Main);
    assert!(loaded("/bin/p", 0, None, Kind::Main).same_image(&old));
}

/// A private copy of a system library, under a unique name and with its
/// `DT_SONAME` changed (same length), so a `dlopen` of the real library by
/// name in a parallel test does not find the copy.
fn private_copy(lib: &str, tag: &str) -> String {
    let dir = std::env::temp_dir().join(format!("probert-modules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join(format!("lib{tag}.so"));
    let mut bytes = std::fs::read(format!("/lib/x86_64-linux-gnu/{lib}")).expect("read");
    let mut soname = lib.as_bytes().to_vec();
    soname.push(0);
    let mut renamed = soname.clone();
    renamed[3] = b'Q';
    let mut i = 0;
    while let Some(at) = bytes[i..].windows(soname.len()).position(|w| w == soname) {
        bytes[i + at..i + at + soname.len()].copy_from_slice(&renamed);
        i += at + soname.len();
    }
    assert!(i > 0, "{lib} names itself");
    std::fs::write(&path, bytes).expect("write");
    path.to_str().expect("utf-8").to_string()
}

fn dlopen_path(path: &str) -> *mut c_void {
    let c = CString::new(path).expect("path");
    // SAFETY: a NUL-terminated path of a copy of a system library.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null(), "dlopen {path}");
    h
}

#[test]
fn a_module_is_parsed_once_and_again_after_reload() {
    let path = private_copy("libz.so.1", "zcached");
    let h = dlopen_path(&path);
    let f = dlsym(h, "zlibVersion");
    let g = dlsym(h, "deflate");
    assert_eq!(function_extent(f).map(|e| e.start), Some(f));
    assert_eq!(function_extent(g).map(|e| e.start), Some(g));
    assert_eq!(parses(&path), 1, "two lookups, one parse");
    // Other modules coming and going keep the table.
    let other = dlopen_path(&private_copy("libz.so.1", "zother"));
    assert_eq!(function_extent(f + 1).map(|e| e.start), Some(f));
    assert_eq!(parses(&path), 1);
    // SAFETY: closes handles this test opened; nothing else uses them.
    unsafe {
        libc::dlclose(other);
        libc::dlclose(h);
    }
    if loaded_modules().iter().any(|m| m.path == path) {
        println!("glibc kept {path} loaded; reload case not exercised");
        return;
    }
    assert_eq!(function_extent(f), None, "unloaded");
    let h = dlopen_path(&path);
    let f2 = dlsym(h, "zlibVersion");
    assert_eq!(function_extent(f2).map(|e| e.start), Some(f2));
    assert_eq!(parses(&path), 2, "a reloaded module gets a fresh table");
}

#[test]
fn a_library_replaced_on_disk_never_gives_wrong_bounds() {
    let path = private_copy("libz.so.1", "zreplaced");
    let h = dlopen_path(&path);
    let f = dlsym(h, "zlibVersion");
    assert!(loaded_modules().iter().any(|m| m.path == path));
    // A package upgrade renames a new build over the path: the same layout
    // (so only the build-id tells them apart), another build-id.
    let other = private_copy("libz.so.1", "zreplaced-new");
    let mut bytes = std::fs::read(&other).expect("read");
    let id = read_elf(&bytes[..])
        .expect("elf")
        .build_id
        .expect("build-id");
    let at = bytes
        .windows(id.len())
        .position(|w| w == id)
        .expect("build-id bytes");
    bytes[at] ^= 0xff;
    std::fs::write(&other, &bytes).expect("write");
    std::fs::rename(&other, &path).expect("rename");
    let e = function_extent(f);
    if let Some(e) = &e {
        // Read through /proc/self/map_files: the right image.
        assert_eq!(e.start, f);
        assert_eq!(e.name(), Some("zlibVersion"));
    }
    println!(
        "replaced file: {}",
        if e.is_some() {
            "read through /proc/self/map_files"
        } else {
            "refused"
        }
    );
    // The path was read and refused, then the mapped inode was tried.
    assert_eq!(parses(&path), 2);
}

/// Cost of `function_extent` after warm-up, over 250k addresses spread
/// over libc's extents. A benchmark, not a test: run with `--ignored
/// --nocapture`.
#[test]
#[ignore]
fn extent_lookup_cost() {
    let _h = open("libc.so.6");
    let m = module_named("libc.so.6");
    let table = table_of(&m).expect("table");
    let extents = table.extents(m.bias);
    let addrs: Vec<usize> = (0..250_000)
        .map(|i| {
            let e = &extents[(i * 7919) % extents.len()];
            e.start + (i % (e.end - e.start))
        })
        .collect();
    for &a in addrs.iter().take(1000) {
        black_box(function_extent(a));
    }
    let t = std::time::Instant::now();
    let mut found = 0;
    for &a in &addrs {
        found += usize::from(black_box(function_extent(a)).is_some());
    }
    let ns = t.elapsed().as_nanos() as f64 / addrs.len() as f64;
    println!(
        "function_extent: {ns:.0} ns per lookup over {} addresses ({found} found)",
        addrs.len()
    );
    let t = std::time::Instant::now();
    for _ in 0..100_000 {
        black_box(loader_generation());
    }
    let gen_ns = t.elapsed().as_nanos() as f64 / 100_000.0;
    println!("  of which the loader generation check: {gen_ns:.0} ns");
    for lib in [
        "libc.so.6",
        "libz.so.1",
        "libsqlite3.so.0",
        "liblua5.4.so.0",
        "libstdc++.so.6",
    ] {
        let _h = open(lib);
        let s = table_of(&module_named(lib)).expect("table").stats();
        let t = std::time::Instant::now();
        let file = std::fs::File::open(module_named(lib).path).expect("open");
        let image = read_elf(&object::ReadCache::new(file)).expect("read");
        let table = FunctionTable::build(image.base, &image.exec(), &image.fdes, image.symbols);
        let parse_us = t.elapsed().as_micros();
        assert!(table.is_ok());
        println!("  {lib}: first read {parse_us} us");
        println!(
            "  {lib}: table {} bytes for {} functions, {} symbols",
            s.heap_bytes, s.functions, s.symbols
        );
    }
}
