//! Loaded ELF modules: the list, and the function around an address.
//!
//! # The algorithm
//!
//! A *snapshot* is the loader's module list at one moment: per module its
//! path, load bias, executable segments and GNU build-id, and a slot for
//! its [`FunctionTable`]. Every lookup first asks the loader for its
//! *generation* — glibc's and musl's `dl_iterate_phdr` report `dlpi_adds`
//! and `dlpi_subs`, the number of objects ever loaded and unloaded; the
//! walk stops after the first object — and uses the current snapshot if it
//! is at least that new. Otherwise it walks the loader's list into a new
//! snapshot, labelled with the generation seen during that walk, and
//! publishes it with a compare-and-swap (a thread that loses the race drops
//! its own and looks again). Then:
//!
//! - [`function_extent`]: binary search of the snapshot's executable
//!   segments, then of the module's table ([`super::extents`]): two binary
//!   searches, no parse, no system call beyond the generation check.
//! - [`super::symbols::symbol_addr`] walks the same snapshot by name.
//!
//! A table is built on the first lookup that needs it, from the module's
//! file once [`super::module_file`] has checked the file is the loaded
//! image, and lives as long as some snapshot lists its module.
//!
//! # Keys: never the old table for a new module
//!
//! A table is reused by a new snapshot only for a module with the same path,
//! load bias and build-id as one in the old snapshot (the main program and
//! the vDSO: same path and bias; they never change). A module unloaded and
//! another loaded at the same address differ in path or build-id; the same
//! file loaded again at the same address may share the table, which is then
//! exactly right. A module without a build-id never carries its table over:
//! it is read again after any load or unload. An unloaded module's table is
//! dropped with the last snapshot that lists it.
//!
//! # Why `seize`
//!
//! The snapshot pointer is read by every lookup, on any thread, and replaced
//! only when modules come and go. Readers enter a `seize` guard, load the
//! pointer protected, and never write a shared cache line (a `RwLock`'s
//! reader count would be one); the thread whose compare-and-swap replaced a
//! snapshot retires it, and seize frees it once no guard that could have
//! seen it is active. Normal context only: a guard's first entry on a
//! thread allocates, and nothing here is reachable from a signal handler.
//!
//! # Why this is correct
//!
//! - *Never a stale list.* `dlpi_adds` and `dlpi_subs` only grow, and any
//!   load or unload grows one of them, so a snapshot labelled with
//!   counters at least those read when the lookup began reflects the list
//!   at or after that moment. The label is read during the same walk (under
//!   the loader's lock) as the list it labels. A loader without the counters
//!   gets a fresh walk per lookup.
//! - *Never the wrong file.* See the keys above: a table is attached to a
//!   snapshot entry only if path, bias and build-id say it is that image.
//! - *Never a use after free.* Snapshots are freed only through seize, after
//!   every guard that could hold them ended; tables and [`Extent`]s hold
//!   `Arc`s, so they outlive any snapshot that listed them.
//! - *Never blocked.* There is no lock of ours: the publish is a
//!   compare-and-swap, a table slot is set by whichever racing reader
//!   finishes reading first (nobody waits for a parse). A child forked
//!   while another thread was building a snapshot or reading a file cannot
//!   deadlock here.
//!
//! Not covered: `.debug_frame`-only code, symbols only in separate debug
//! files (`.gnu_debuglink`, debuginfod), and code outside ELF modules (JIT
//! regions are named by their region instead).
//!
//! # Safety
//!
//! The unsafe code calls `dl_iterate_phdr` and `getauxval`, reads the loader's `dl_phdr_info` and program headers
//! only during the callback that hands them out (the loader's contract),
//! and dereferences snapshot pointers only while a `seize` guard protects
//! them. Module memory itself is never loaded from directly.

#![allow(unsafe_code)]

use std::ffi::{c_int, c_void, CStr};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};

use seize::{Collector, Guard};

pub use super::extents::Extent;
use super::extents::FunctionTable;
#[cfg(test)]
use super::extents::Source;
use super::module_file::{self, Image, Kind};

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

/// A loaded module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleInfo {
    /// As in [`Module::path`].
    pub path: String,
    /// `dlpi_addr`: run-time address minus link-time address.
    pub bias: usize,
    /// The executable `PT_LOAD` segments, `[start, end)`, run-time.
    pub exec: Vec<(usize, usize)>,
    /// The GNU build-id of the loaded image, if it has one.
    pub build_id: Option<Vec<u8>>,
}

/// The executable segment containing `addr`, if a loaded module has one.
///
/// Normal context only.
pub fn module_containing(addr: usize) -> Option<Module> {
    with_snapshot(|s| {
        let (m, seg) = s.segment_at(addr)?;
        Some(Module {
            start: seg.0,
            end: seg.1,
            path: m.info.path.clone(),
        })
    })
}

/// The function around `addr`, which lies in a loaded module's executable
/// segment: bounds from the tightest of the FDEs and sized symbols that
/// contain it, and the symbol naming it ([`super::extents`] has the rules).
/// `None` outside modules, in code no FDE or symbol covers (PLT stubs,
/// padding), and in a module whose file could not be matched to its image.
///
/// After the first lookup in a module, two binary searches and one
/// `dl_iterate_phdr` call that stops at the first object. Normal context
/// only.
pub fn function_extent(addr: usize) -> Option<Extent> {
    with_snapshot(|s| {
        let (m, _) = s.segment_at(addr)?;
        m.table()?.extent(m.info.bias, addr)
    })
}

/// A loaded module's executable segment, `[start, end)`, with what
/// [`function_extent`] needs to answer for addresses inside it without
/// another look at the loader.
#[derive(Clone)]
pub struct SegmentLookup {
    pub start: usize,
    pub end: usize,
    table: Option<Arc<FunctionTable>>,
    bias: usize,
}

impl SegmentLookup {
    /// [`function_extent`] of `addr`, which lies in this segment, as of the
    /// look at the loader that found it.
    pub fn function_extent(&self, addr: usize) -> Option<Extent> {
        debug_assert!((self.start..self.end).contains(&addr));
        self.table.as_ref()?.extent(self.bias, addr)
    }
}

/// The executable segment holding `addr`, in one look at the loader.
pub fn segment_lookup(addr: usize) -> Option<SegmentLookup> {
    with_snapshot(|s| {
        let (m, seg) = s.segment_at(addr)?;
        Some(SegmentLookup {
            start: seg.0,
            end: seg.1,
            table: m.table(),
            bias: m.info.bias,
        })
    })
}

/// The address the dynamic linker gives `name` in the global scope (an
/// IFUNC's resolved choice), if any.
pub fn global_symbol(name: &std::ffi::CStr) -> Option<usize> {
    // SAFETY: a NUL-terminated name; RTLD_DEFAULT searches the global scope.
    let addr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) } as usize;
    (addr != 0).then_some(addr)
}

/// What identifies a loaded module's image, for caches of what was computed
/// from its code: its table (a new one for every load of a file) and its
/// load bias. Keeping the table alive keeps its identity unique.
#[derive(Clone, Debug)]
pub struct TableRef {
    table: Arc<FunctionTable>,
    bias: usize,
    exec: Vec<(usize, usize)>,
}

impl TableRef {
    /// The same image.
    pub fn same(&self, other: &TableRef) -> bool {
        Arc::ptr_eq(&self.table, &other.table) && self.bias == other.bias
    }

    /// The image's executable segments, `[start, end)`.
    pub fn exec(&self) -> &[(usize, usize)] {
        &self.exec
    }

    /// Whether the two images' executable segments overlap (one replaced
    /// the other at the same address).
    pub fn overlaps(&self, other: &TableRef) -> bool {
        self.exec
            .iter()
            .any(|&(a, b)| other.exec.iter().any(|&(c, d)| a < d && c < b))
    }
}

/// Every function of the module around an address, for analysing them all.
pub struct ModuleLayout {
    /// The image.
    pub table: TableRef,
    /// Its extents, in address order.
    pub extents: Vec<Extent>,
    symbol_starts: Vec<usize>,
    code_pointers: Option<Vec<usize>>,
}

impl ModuleLayout {
    /// The function symbols starting strictly inside `(start, end)`:
    /// another name for code inside a function (an alias, an entry) is a
    /// place execution may arrive at.
    pub fn symbols_inside(&self, start: usize, end: usize) -> impl Iterator<Item = usize> + '_ {
        let a = self.symbol_starts.partition_point(|&s| s <= start);
        let b = self.symbol_starts.partition_point(|&s| s < end);
        self.symbol_starts[a..b.max(a)].iter().copied()
    }

    /// Whether every code address the module's data can hold is known: a
    /// position-independent module, whose data names code only through its
    /// dynamic relocations ([`Self::code_pointers_inside`]).
    pub fn code_pointers_known(&self) -> bool {
        self.code_pointers.is_some()
    }

    /// The code addresses the module's dynamic relocations name strictly
    /// inside `(start, end)` (none if they are not known): places a jump
    /// through a pointer loaded from the module's data may arrive at.
    pub fn code_pointers_inside(
        &self,
        start: usize,
        end: usize,
    ) -> impl Iterator<Item = usize> + '_ {
        let all = self.code_pointers.as_deref().unwrap_or_default();
        let a = all.partition_point(|&s| s <= start);
        let b = all.partition_point(|&s| s < end);
        all[a..b.max(a)].iter().copied()
    }
}

/// The layout of the module whose executable segment holds `addr`; `None`
/// outside modules and for a module without a readable table.
///
/// Normal context only.
pub fn module_layout(addr: usize) -> Option<ModuleLayout> {
    with_snapshot(|s| {
        let (m, _) = s.segment_at(addr)?;
        let table = m.table()?;
        let bias = m.info.bias;
        Some(ModuleLayout {
            extents: table.extents(bias),
            symbol_starts: table.symbol_starts(bias),
            code_pointers: table.code_pointers(bias),
            table: TableRef {
                table,
                bias,
                exec: m.info.exec.clone(),
            },
        })
    })
}

/// The loader's generation, `(dlpi_adds, dlpi_subs)`: the number of
/// objects ever loaded and unloaded. Both only grow, and every `dlopen` that
/// maps an object or `dlclose` that unmaps one grows one of them, so a cache
/// of facts about module code (`crate::effects`) that remembers the
/// generation it was filled under knows it is stale when the value differs,
/// even for a module unloaded and another loaded at the same address.
/// `None` if the loader does not report them: then nothing may be kept.
///
/// One `dl_iterate_phdr` call that stops at the first object. Normal
/// context only.
pub fn generation() -> Option<(u64, u64)> {
    loader_generation()
}

/// The loaded modules, in load order (the main program first).
///
/// Normal context only.
pub fn loaded_modules() -> Vec<ModuleInfo> {
    with_snapshot(|s| s.modules.iter().map(|m| m.info.clone()).collect())
}

/// Every function symbol of `module` (`.dynsym` and `.symtab`, a symbol in
/// both once) as `(name, run-time start, size)`, in address order; empty if
/// the module is no longer loaded or has no readable table.
///
/// Normal context only.
#[allow(dead_code)] // For the tracing command's globs (API 0.2), not yet wired.
pub fn module_functions(module: &ModuleInfo) -> impl Iterator<Item = (String, usize, usize)> {
    let table = with_snapshot(|s| {
        s.modules
            .iter()
            .find(|m| {
                (&m.info.path, m.info.bias, &m.info.build_id)
                    == (&module.path, module.bias, &module.build_id)
            })
            .and_then(Loaded::table)
    });
    let bias = module.bias;
    table.into_iter().flat_map(move |t| t.functions(bias))
}

/// A module of a snapshot.
#[derive(Debug)]
pub(super) struct Loaded {
    pub(super) info: ModuleInfo,
    pub(super) kind: Kind,
    /// The executable segments as the loader mapped them, link-time
    /// `(p_vaddr, p_memsz)`, to compare with the file's.
    exec_link: Vec<(u64, u64)>,
    /// The table, built on first use; `None` if the file could not be read
    /// or did not match the image.
    table: OnceLock<Option<Arc<FunctionTable>>>,
}

impl Loaded {
    /// The module's table, reading the file on first use.
    ///
    /// Threads racing on the first use may each read the file; the first
    /// to finish sets the slot. No thread waits for another's read, so a
    /// child forked while another thread was reading cannot hang here.
    pub(super) fn table(&self) -> Option<Arc<FunctionTable>> {
        if let Some(t) = self.table.get() {
            return t.clone();
        }
        let _ = self.table.set(module_file::load_table(&self.image()));
        self.table.get().cloned().flatten()
    }

    /// What [`module_file`] needs to find and check the file.
    fn image(&self) -> Image<'_> {
        Image {
            kind: self.kind,
            path: &self.info.path,
            bias: self.info.bias,
            exec_link: &self.exec_link,
            build_id: self.info.build_id.as_deref(),
        }
    }

    /// Whether a new snapshot may take over `old`'s table for `self`.
    fn same_image(&self, old: &Loaded) -> bool {
        fn key(m: &Loaded) -> (Kind, &str, usize, &[(u64, u64)]) {
            (m.kind, &m.info.path, m.info.bias, &m.exec_link)
        }
        key(self) == key(old)
            && (self.kind != Kind::Shared
                || (self.info.build_id.is_some() && self.info.build_id == old.info.build_id))
    }
}

/// The loader's module list at one generation.
#[derive(Debug)]
pub(super) struct Snapshot {
    /// `(dlpi_adds, dlpi_subs)` when built; `None` if the loader does not
    /// report them (then every lookup rebuilds).
    generation: Option<(u64, u64)>,
    /// In load order.
    pub(super) modules: Vec<Loaded>,
    /// Executable segments `(start, end, module index)`, sorted.
    segments: Vec<(usize, usize, usize)>,
}

impl Snapshot {
    /// The module and executable segment containing `addr`.
    fn segment_at(&self, addr: usize) -> Option<(&Loaded, (usize, usize))> {
        let i = self
            .segments
            .partition_point(|&(s, _, _)| s <= addr)
            .checked_sub(1)?;
        let (s, e, m) = self.segments[i];
        (addr < e).then(|| (&self.modules[m], (s, e)))
    }
}

/// The published snapshot.
struct Cache {
    collector: Collector,
    /// The current snapshot (a `Box`), or null before the first lookup.
    current: AtomicPtr<Snapshot>,
}

static CACHE: LazyLock<Cache> = LazyLock::new(|| Cache {
    collector: Collector::new(),
    current: AtomicPtr::new(std::ptr::null_mut()),
});

/// Runs `f` on a snapshot of the loader's current generation.
pub(super) fn with_snapshot<T>(f: impl FnOnce(&Snapshot) -> T) -> T {
    let cache = &*CACHE;
    let generation = loader_generation();
    let mut rebuilt = false;
    loop {
        let guard = cache.collector.enter();
        // Ordering: Acquire (seize strengthens it as its protocol needs)
        // sees the snapshot's contents — pairs with the AcqRel
        // compare_exchange in `publish`.
        let ptr = guard.protect(&cache.current, Ordering::Acquire);
        // SAFETY: a non-null pointer was published by `publish` from a
        // `Box` and is retired through this collector, so it stays valid
        // while `guard` is active.
        let snap = unsafe { ptr.as_ref() };
        if let Some(snap) = snap {
            // A snapshot at least as new as the loader was when this call
            // began answers as of a moment during the call.
            let current = match (snap.generation, generation) {
                (Some((adds, subs)), Some((adds0, subs0))) => adds >= adds0 && subs >= subs0,
                _ => rebuilt,
            };
            if current {
                return f(snap);
            }
        }
        let fresh = take_snapshot(snap);
        drop(guard);
        publish(ptr, fresh);
        rebuilt = true;
    }
}

/// Replaces snapshot `old` by `fresh`, unless another thread replaced `old`
/// first (then `fresh` is dropped, and the caller looks again).
fn publish(old: *mut Snapshot, fresh: Snapshot) {
    let cache = &*CACHE;
    let fresh = Box::into_raw(Box::new(fresh));
    // Ordering: AcqRel — Release publishes the new snapshot's contents to
    // the protected loads in `with_snapshot`; Acquire on failure is unused
    // — pairs with `with_snapshot`'s protect.
    match cache
        .current
        .compare_exchange(old, fresh, Ordering::AcqRel, Ordering::Acquire)
    {
        Ok(_) if !old.is_null() => {
            // SAFETY: `old` came from `Box::into_raw`, is no longer
            // reachable from `current`, and only the one thread whose
            // exchange removed it retires it; readers that loaded it hold
            // guards seize waits for.
            unsafe { cache.collector.retire(old, seize::reclaim::boxed) };
        }
        Ok(_) => {}
        Err(_) => {
            // SAFETY: `fresh` was never shared.
            drop(unsafe { Box::from_raw(fresh) });
        }
    }
}

/// The `dl_phdr_info` size from which `dlpi_adds` and `dlpi_subs` are
/// filled.
const GENERATION_SIZE: usize = std::mem::offset_of!(libc::dl_phdr_info, dlpi_subs) + 8;

/// `(dlpi_adds, dlpi_subs)`, from the first object `dl_iterate_phdr`
/// reports; `None` if this libc does not fill them.
fn loader_generation() -> Option<(u64, u64)> {
    unsafe extern "C" fn first(
        info: *mut libc::dl_phdr_info,
        size: libc::size_t,
        data: *mut c_void,
    ) -> c_int {
        if size >= GENERATION_SIZE {
            // SAFETY: `info` is valid during the callback and, per `size`,
            // has the counters; `data` is the `Option` below.
            unsafe {
                let info = &*info;
                *data.cast::<Option<(u64, u64)>>() = Some((info.dlpi_adds, info.dlpi_subs));
            }
        }
        1
    }
    let mut generation: Option<(u64, u64)> = None;
    // SAFETY: `first` matches the callback type and does not unwind;
    // `generation` outlives the call.
    unsafe {
        libc::dl_iterate_phdr(
            Some(first),
            (&mut generation as *mut Option<(u64, u64)>).cast(),
        )
    };
    generation
}

/// What the loader says about one object, copied out during the callback.
struct RawModule {
    name: String,
    bias: usize,
    main: bool,
    exec_link: Vec<(u64, u64)>,
    lowest: u64,
    build_id: Option<Vec<u8>>,
}

/// Walks the loader's list; tables of modules unchanged since `old` are
/// taken over.
fn take_snapshot(old: Option<&Snapshot>) -> Snapshot {
    struct Walk {
        main_phdr: usize,
        /// The loader's generation during the walk.
        generation: Option<(u64, u64)>,
        out: Vec<RawModule>,
    }

    /// Called by the loader for each object, under its lock.
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        size: libc::size_t,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: `data` is the `Walk` passed below, ours for the call;
        // `info` is valid during the callback.
        let (walk, info) = unsafe { (&mut *data.cast::<Walk>(), &*info) };
        if walk.out.is_empty() && size >= GENERATION_SIZE {
            walk.generation = Some((info.dlpi_adds, info.dlpi_subs));
        }
        let bias = info.dlpi_addr as usize;
        let phdrs: &[libc::Elf64_Phdr] = if info.dlpi_phdr.is_null() {
            &[]
        } else {
            // SAFETY: the loader guarantees `dlpi_phnum` headers at
            // `dlpi_phdr` for the duration of the callback.
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
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
        let loads = phdrs.iter().filter(|p| p.p_type == libc::PT_LOAD);
        let lowest = loads.clone().map(|p| p.p_vaddr).min().unwrap_or(0);
        let exec_link = loads
            .filter(|p| p.p_flags & libc::PF_X != 0)
            .map(|p| (p.p_vaddr, p.p_memsz))
            .collect();
        let build_id = phdrs
            .iter()
            .filter(|p| p.p_type == libc::PT_NOTE)
            .find_map(|p| module_file::build_id_in_memory(bias, p.p_vaddr, p.p_memsz, p.p_align));
        // glibc names the main program "", static musl "/proc/self/exe",
        // dynamic musl argv[0] or AT_EXECFN (maybe relative): recognise it
        // by its program headers instead.
        let main = name.is_empty() || info.dlpi_phdr as usize == walk.main_phdr;
        walk.out.push(RawModule {
            name,
            bias,
            main,
            exec_link,
            lowest,
            build_id,
        });
        0
    }

    let mut walk = Walk {
        // SAFETY: getauxval only reads the auxiliary vector.
        main_phdr: unsafe { libc::getauxval(libc::AT_PHDR) } as usize,
        generation: None,
        out: Vec::new(),
    };
    // SAFETY: `visit` matches the callback type, does not unwind (a panic
    // would abort at the `extern "C"` boundary), and `walk` outlives the
    // call.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&mut walk as *mut Walk).cast()) };
    // SAFETY: getauxval only reads the auxiliary vector.
    let vdso = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize;

    let mut modules = Vec::with_capacity(walk.out.len());
    let mut segments = Vec::new();
    for raw in walk.out {
        let kind = if raw.main {
            Kind::Main
        } else if vdso != 0 && raw.bias.wrapping_add(raw.lowest as usize) == vdso {
            Kind::Vdso
        } else {
            Kind::Shared
        };
        let path = match kind {
            Kind::Main => std::fs::read_link("/proc/self/exe")
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "/proc/self/exe".to_string()),
            _ => raw.name,
        };
        let exec: Vec<(usize, usize)> = raw
            .exec_link
            .iter()
            .map(|&(v, len)| {
                let s = raw.bias.wrapping_add(v as usize);
                (s, s.wrapping_add(len as usize))
            })
            .collect();
        segments.extend(exec.iter().map(|&(s, e)| (s, e, modules.len())));
        let m = Loaded {
            info: ModuleInfo {
                path,
                bias: raw.bias,
                exec,
                build_id: raw.build_id,
            },
            kind,
            exec_link: raw.exec_link,
            table: OnceLock::new(),
        };
        let inherited = old
            .into_iter()
            .flat_map(|s| s.modules.iter())
            .find(|o| m.same_image(o))
            .and_then(|o| o.table.get().cloned());
        if let Some(t) = inherited {
            let _ = m.table.set(t);
        }
        modules.push(m);
    }
    segments.sort_unstable();
    Snapshot {
        generation: walk.generation,
        modules,
        segments,
    }
}

/// The table of the loaded module `info`, for tests and reports.
#[cfg(test)]
pub(crate) fn table_of(info: &ModuleInfo) -> Option<Arc<FunctionTable>> {
    with_snapshot(|s| {
        s.modules
            .iter()
            .find(|m| m.info == *info)
            .and_then(Loaded::table)
    })
}

#[cfg(test)]
pub(crate) mod tests;
