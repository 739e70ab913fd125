//! Function extents: the compact, sorted table of one module's functions.
//!
//! A module's code is described by three sources of different quality:
//! `.eh_frame` FDEs (every compiled function, exact bounds, no names),
//! `.symtab` (all functions with names and usually sizes, but stripped from
//! distributed libraries) and `.dynsym` (exported functions only). The
//! table is built once per loaded file ([`FunctionTable::build`]) and then
//! answers "which function holds this address" with one binary search.
//!
//! # Building
//!
//! 1. *Candidates.* Every FDE and every function symbol with a size that
//!    lies inside an executable segment is a candidate range. A symbol that
//!    partially overlaps an FDE (crosses its start or end without containing
//!    it or lying inside it) contradicts the exact bounds and is dropped as a
//!    candidate (it may still name one).
//! 2. *Tightest wins.* The address space is cut at every candidate bound;
//!    each elementary piece goes to the smallest candidate containing it,
//!    ties to FDE, then `.dynsym`, then `.symtab`. So a `foo.cold` FDE is its
//!    own function, a symbol nested in a larger one (an alternate entry)
//!    wins inside itself, aliases (same bounds) collapse into one function,
//!    and a symbol covering code no FDE describes (hand-written assembly
//!    without CFI) fills that hole.
//! 3. *Naming.* A function is named by a symbol starting at its first byte,
//!    best first: same size, not an IFUNC resolver, exported with the
//!    default version, global, fewest leading underscores, shortest (so
//!    `malloc` rather than `__libc_malloc`).
//!
//! # Layout
//!
//! Everything is relative to the module's lowest `PT_LOAD` address, in
//! `u32`: a function is 16 bytes, a piece of the address map 12, a symbol 20,
//! a landing pad 4, and all names share one string blob. A module larger than
//! 4 GiB is refused ([`TableError::TooLarge`]).
//!
//! Landing pads are kept as one sorted list for the whole module, so the pads
//! of any extent are the list's slice between its bounds (two binary
//! searches; nothing stored per function, nothing to do for the common
//! function without an LSDA). FDEs whose LSDA could not be read are kept as
//! ranges: an extent overlapping one has *unknown* landing pads.

use std::fmt;
use std::sync::Arc;

/// "No symbol" in a `u32` symbol index.
const NONE: u32 = u32::MAX;

/// Where an extent's bounds came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// An `.eh_frame` FDE: exact.
    Fde,
    /// A sized `.dynsym` symbol.
    Dynsym,
    /// A sized `.symtab` symbol.
    Symtab,
}

/// The function around an address, in run-time addresses.
///
/// Holds a reference to its module's table, so [`Extent::name`] and
/// [`Extent::landing_pads`] stay answerable (and consistent with the bounds)
/// even if the module is unloaded meanwhile.
#[derive(Clone)]
pub struct Extent {
    /// First byte of the function.
    pub start: usize,
    /// One past its last byte.
    pub end: usize,
    /// Where `start` and `end` came from.
    pub source: Source,
    table: Arc<FunctionTable>,
    /// Run-time address of table offset 0.
    load: usize,
    /// The naming symbol, or [`NONE`].
    name: u32,
}

impl Extent {
    /// The symbol naming the function (mangled, as in the table), if any
    /// starts at [`Extent::start`].
    pub fn name(&self) -> Option<&str> {
        self.table.sym_name(self.name)
    }

    /// The C++/Rust landing pads inside the extent, sorted: addresses the
    /// unwinder jumps to from outside the function's straight-line flow.
    /// Empty (no allocation) for a function without an LSDA.
    ///
    /// `Err` if an FDE overlapping the extent has an LSDA that could not be
    /// read: then any address may be a landing pad.
    #[allow(dead_code)] // For the displacement analysis (DESIGN part 10), not yet written.
    pub fn landing_pads(&self) -> Result<Vec<usize>, UnknownLandingPads> {
        let lo = self.table.off_of_addr(self.load, self.start);
        let hi = self.table.off_of_addr(self.load, self.end);
        if self
            .table
            .unknown_pads
            .iter()
            .any(|&(s, e)| s < hi && lo < e)
        {
            return Err(UnknownLandingPads { start: self.start });
        }
        let a = self.table.pads.partition_point(|&p| p < lo);
        let b = self.table.pads.partition_point(|&p| p < hi);
        Ok(self.table.pads[a..b]
            .iter()
            .map(|&p| self.load + p as usize)
            .collect())
    }
}

impl fmt::Debug for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extent")
            .field("start", &format_args!("{:#x}", self.start))
            .field("end", &format_args!("{:#x}", self.end))
            .field("source", &self.source)
            .field("name", &self.name())
            .finish()
    }
}

impl PartialEq for Extent {
    fn eq(&self, other: &Self) -> bool {
        (self.start, self.end, self.source, self.name())
            == (other.start, other.end, other.source, other.name())
    }
}

impl Eq for Extent {}

/// An LSDA overlapping an extent could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the exception table of the function at {start:#x} could not be read")]
pub struct UnknownLandingPads {
    /// The extent's start.
    pub start: usize,
}

/// Why a table was not built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TableError {
    /// An executable segment ends more than 4 GiB above the module's base.
    TooLarge,
}

/// What the builder is told about an FDE's LSDA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum LsdaIn {
    None,
    /// Landing pads, link-time addresses.
    Pads(Vec<u64>),
    /// There is an LSDA but it could not be read.
    Unknown,
}

/// An FDE, link-time addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FdeIn {
    pub start: u64,
    pub len: u64,
    pub lsda: LsdaIn,
}

/// Which table a symbol came from, and what kind it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SymFlags {
    pub dynsym: bool,
    pub symtab: bool,
    /// `STT_GNU_IFUNC`: the value is the resolver, not the implementation.
    pub ifunc: bool,
    /// `STB_GLOBAL`, `STB_WEAK` or `STB_GNU_UNIQUE`, with default or
    /// protected visibility.
    pub global: bool,
    /// A `.dynsym` entry whose version is hidden (`foo@VER`, not
    /// `foo@@VER`): not what `dlsym` returns.
    pub hidden_version: bool,
}

impl SymFlags {
    const DYNSYM: u8 = 1;
    const SYMTAB: u8 = 2;
    const IFUNC: u8 = 4;
    const GLOBAL: u8 = 8;
    const HIDDEN_VERSION: u8 = 16;

    fn pack(self) -> u8 {
        [
            (self.dynsym, Self::DYNSYM),
            (self.symtab, Self::SYMTAB),
            (self.ifunc, Self::IFUNC),
            (self.global, Self::GLOBAL),
            (self.hidden_version, Self::HIDDEN_VERSION),
        ]
        .iter()
        .filter(|&&(set, _)| set)
        .fold(0, |acc, &(_, bit)| acc | bit)
    }

    fn unpack(b: u8) -> SymFlags {
        SymFlags {
            dynsym: b & Self::DYNSYM != 0,
            symtab: b & Self::SYMTAB != 0,
            ifunc: b & Self::IFUNC != 0,
            global: b & Self::GLOBAL != 0,
            hidden_version: b & Self::HIDDEN_VERSION != 0,
        }
    }

    /// What `dlsym` would find: exported, default version.
    pub(crate) fn dlsym_visible(self) -> bool {
        self.dynsym && self.global && !self.hidden_version
    }
}

/// A defined function symbol, link-time address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SymbolIn {
    pub name: String,
    pub value: u64,
    pub size: u64,
    pub flags: SymFlags,
}

/// A symbol found by name ([`FunctionTable::symbols_named`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NamedSymbol {
    /// Link-time address.
    pub vaddr: u64,
    pub size: u64,
    pub flags: SymFlags,
}

/// Counts describing a table, for tests and reports.
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TableStats {
    pub functions: usize,
    pub from_fde: usize,
    pub from_dynsym: usize,
    pub from_symtab: usize,
    pub symbols: usize,
    pub landing_pads: usize,
    /// Bytes of executable segments inside some extent.
    pub covered: u64,
    /// Bytes of executable segments.
    pub executable: u64,
    /// Heap bytes held by the table.
    pub heap_bytes: usize,
}

/// A function: a range and the symbol naming it.
#[derive(Clone, Copy, Debug)]
struct Func {
    start: u32,
    len: u32,
    name: u32,
    source: Source,
}

/// A piece of the address map: `[start, end)` belongs to `funcs[func]`.
#[derive(Clone, Copy, Debug)]
struct Piece {
    start: u32,
    end: u32,
    func: u32,
}

/// A symbol: range, name in the blob, packed [`SymFlags`].
#[derive(Clone, Copy, Debug)]
struct Sym {
    start: u32,
    size: u32,
    name_off: u32,
    name_len: u32,
    flags: u8,
}

/// One module's functions and symbols, relative to `base`.
#[derive(Debug)]
pub(crate) struct FunctionTable {
    /// Link-time address of offset 0: the lowest `PT_LOAD` address.
    base: u64,
    /// Sorted, disjoint.
    pieces: Box<[Piece]>,
    funcs: Box<[Func]>,
    /// Sorted by `(start, size, name)`.
    syms: Box<[Sym]>,
    /// Indices into `syms`, sorted by name.
    by_name: Box<[u32]>,
    names: Box<str>,
    /// Every landing pad of the module, sorted.
    pads: Box<[u32]>,
    /// FDE ranges with an unreadable LSDA, sorted.
    unknown_pads: Box<[(u32, u32)]>,
    /// The addresses inside executable segments that the module's data
    /// names ([`super::elf::ElfImage::code_pointers`]), sorted; `None` if
    /// not known.
    code_pointers: Option<Box<[u32]>>,
    /// Executable segments, offsets.
    exec: Box<[(u32, u32)]>,
    /// Executable bytes, for [`TableStats`].
    #[cfg(test)]
    executable: u64,
}

/// A candidate range of the build.
#[derive(Clone, Copy, Debug)]
struct Cand {
    start: u32,
    end: u32,
    source: Source,
}

impl FunctionTable {
    /// Builds the table from a file's facts; `base` is the lowest `PT_LOAD`
    /// address and `exec` the executable segments, link-time.
    pub(crate) fn build(
        base: u64,
        exec: &[(u64, u64)],
        fdes: &[FdeIn],
        symbols: Vec<SymbolIn>,
    ) -> Result<FunctionTable, TableError> {
        let off = |v: u64| v.checked_sub(base).and_then(|o| u32::try_from(o).ok());
        let mut exec_off = Vec::with_capacity(exec.len());
        for &(s, e) in exec {
            let (s, e) = (
                off(s).ok_or(TableError::TooLarge)?,
                off(e).ok_or(TableError::TooLarge)?,
            );
            exec_off.push((s, e));
        }
        exec_off.sort_unstable();
        let in_exec = |s: u32, e: u32| exec_off.iter().any(|&(a, b)| a <= s && e <= b && s < e);
        let range = |v: u64, len: u64| {
            let s = off(v)?;
            let e = off(v.checked_add(len)?)?;
            in_exec(s, e).then_some((s, e))
        };

        // FDE candidates, pads, unknown-pad ranges.
        let mut fde_ranges: Vec<(u32, u32)> = Vec::with_capacity(fdes.len());
        let mut pads = Vec::new();
        let mut unknown_pads = Vec::new();
        for f in fdes {
            let Some((s, e)) = range(f.start, f.len) else {
                continue;
            };
            fde_ranges.push((s, e));
            match &f.lsda {
                LsdaIn::None => {}
                LsdaIn::Pads(p) => pads.extend(p.iter().filter_map(|&a| off(a))),
                LsdaIn::Unknown => unknown_pads.push((s, e)),
            }
        }
        fde_ranges.sort_unstable();
        fde_ranges.dedup();
        pads.sort_unstable();
        pads.dedup();
        unknown_pads.sort_unstable();

        let (syms, names) = Self::symbols(symbols, off);
        let mut cands: Vec<Cand> = fde_ranges
            .iter()
            .map(|&(start, end)| Cand {
                start,
                end,
                source: Source::Fde,
            })
            .collect();
        for s in &syms {
            let end = s.start.saturating_add(s.size);
            if s.size == 0 || !in_exec(s.start, end) || !laminar(&fde_ranges, s.start, end) {
                continue;
            }
            let flags = SymFlags::unpack(s.flags);
            let source = if flags.dynsym {
                Source::Dynsym
            } else {
                Source::Symtab
            };
            cands.push(Cand {
                start: s.start,
                end,
                source,
            });
        }
        let (pieces, chosen) = tightest(cands);

        let mut funcs = Vec::with_capacity(chosen.len());
        for c in &chosen {
            let name = best_name(&syms, &names, c.start, c.end - c.start);
            funcs.push(Func {
                start: c.start,
                len: c.end - c.start,
                name,
                source: c.source,
            });
        }
        let mut by_name: Vec<u32> = (0..syms.len() as u32).collect();
        by_name.sort_by(|&a, &b| {
            sym_str(&names, &syms[a as usize]).cmp(sym_str(&names, &syms[b as usize]))
        });
        Ok(FunctionTable {
            base,
            pieces: pieces.into(),
            funcs: funcs.into(),
            syms: syms.into(),
            by_name: by_name.into(),
            names: names.into(),
            pads: pads.into(),
            unknown_pads: unknown_pads.into(),
            code_pointers: None,
            #[cfg(test)]
            executable: exec_off.iter().map(|&(s, e)| u64::from(e - s)).sum(),
            exec: exec_off.into(),
        })
    }

    /// The table, knowing which link-time addresses the module's data names
    /// (those inside its executable segments are kept), or that this is
    /// not known (`None`).
    pub(crate) fn with_code_pointers(mut self, pointers: Option<&[u64]>) -> FunctionTable {
        self.code_pointers = pointers.map(|all| {
            let mut v: Vec<u32> = all
                .iter()
                .filter_map(|&a| u32::try_from(a.checked_sub(self.base)?).ok())
                .filter(|&o| self.exec.iter().any(|&(s, e)| s <= o && o < e))
                .collect();
            v.sort_unstable();
            v.dedup();
            v.into()
        });
        self
    }

    /// The run-time addresses inside executable code that the module's
    /// data names, sorted, for a module at `bias`; `None` if not known.
    pub(crate) fn code_pointers(&self, bias: usize) -> Option<Vec<usize>> {
        let load = bias.wrapping_add(self.base as usize);
        let v = self.code_pointers.as_ref()?;
        Some(v.iter().map(|&o| load + o as usize).collect())
    }

    /// Deduplicates symbols on `(value, name)` (a symbol in both tables is
    /// one symbol, flags merged), drops those outside the 4 GiB window, and
    /// lays the names into one blob.
    fn symbols(mut input: Vec<SymbolIn>, off: impl Fn(u64) -> Option<u32>) -> (Vec<Sym>, String) {
        input.sort_by(|a, b| (a.value, &a.name, a.size).cmp(&(b.value, &b.name, b.size)));
        let mut syms: Vec<Sym> = Vec::with_capacity(input.len());
        let mut names = String::new();
        let mut last: Option<(u64, usize)> = None;
        for s in input {
            let Some(start) = off(s.value) else { continue };
            let size = u32::try_from(s.size).unwrap_or(u32::MAX);
            if let Some((v, i)) = last {
                let prev = &mut syms[i];
                if v == s.value && sym_str(&names, prev) == s.name {
                    let (a, b) = (SymFlags::unpack(prev.flags), s.flags);
                    prev.size = prev.size.max(size);
                    prev.flags = SymFlags {
                        dynsym: a.dynsym || b.dynsym,
                        symtab: a.symtab || b.symtab,
                        ifunc: a.ifunc || b.ifunc,
                        global: a.global || b.global,
                        hidden_version: (a.hidden_version || !a.dynsym)
                            && (b.hidden_version || !b.dynsym)
                            && (a.dynsym || b.dynsym),
                    }
                    .pack();
                    continue;
                }
            }
            let (Ok(name_off), Ok(name_len)) =
                (u32::try_from(names.len()), u32::try_from(s.name.len()))
            else {
                continue;
            };
            names.push_str(&s.name);
            last = Some((s.value, syms.len()));
            syms.push(Sym {
                start,
                size,
                name_off,
                name_len,
                flags: s.flags.pack(),
            });
        }
        syms.sort_by(|a, b| {
            (a.start, a.size, sym_str(&names, a)).cmp(&(b.start, b.size, sym_str(&names, b)))
        });
        (syms, names)
    }

    /// The function holding link-time address `vaddr`.
    fn lookup(&self, vaddr: u64) -> Option<&Func> {
        let off = u32::try_from(vaddr.checked_sub(self.base)?).ok()?;
        let i = self
            .pieces
            .partition_point(|p| p.start <= off)
            .checked_sub(1)?;
        let p = self.pieces[i];
        (off < p.end).then(|| &self.funcs[p.func as usize])
    }

    /// The extent around run-time `addr`, for a module whose link-time
    /// address `v` is at run-time address `v + bias`.
    pub(crate) fn extent(self: &Arc<Self>, bias: usize, addr: usize) -> Option<Extent> {
        let f = *self.lookup(addr.wrapping_sub(bias) as u64)?;
        let load = bias.wrapping_add(self.base as usize);
        Some(Extent {
            start: load + f.start as usize,
            end: load + f.start as usize + f.len as usize,
            source: f.source,
            table: self.clone(),
            load,
            name: f.name,
        })
    }

    /// `addr`'s offset from `load`, clamped into `u32` (for range queries).
    fn off_of_addr(&self, load: usize, addr: usize) -> u32 {
        u32::try_from(addr.saturating_sub(load)).unwrap_or(u32::MAX)
    }

    fn sym_name(&self, i: u32) -> Option<&str> {
        self.syms.get(i as usize).map(|s| sym_str(&self.names, s))
    }

    /// Every symbol named `name`, the one `dlsym` would pick first (exported,
    /// default version), then other globals, then locals.
    pub(crate) fn symbols_named(&self, name: &str) -> Vec<NamedSymbol> {
        let by_name = &self.by_name;
        let key = |i: &u32| sym_str(&self.names, &self.syms[*i as usize]);
        let a = by_name.partition_point(|i| key(i) < name);
        let b = a + by_name[a..].partition_point(|i| key(i) == name);
        let mut found: Vec<NamedSymbol> = by_name[a..b]
            .iter()
            .map(|&i| {
                let s = &self.syms[i as usize];
                NamedSymbol {
                    vaddr: self.base + u64::from(s.start),
                    size: u64::from(s.size),
                    flags: SymFlags::unpack(s.flags),
                }
            })
            .collect();
        found.sort_by_key(|s| (!s.flags.dlsym_visible(), !s.flags.global, s.vaddr));
        found
    }

    /// The run-time start of every function symbol, sorted, for a module
    /// at `bias`.
    pub(crate) fn symbol_starts(&self, bias: usize) -> Vec<usize> {
        let load = bias.wrapping_add(self.base as usize);
        let mut v: Vec<usize> = self.syms.iter().map(|s| load + s.start as usize).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Every function symbol as `(name, run-time start, size)`, in address
    /// order; a symbol in both tables appears once.
    pub(crate) fn functions(
        self: Arc<Self>,
        bias: usize,
    ) -> impl Iterator<Item = (String, usize, usize)> {
        let load = bias.wrapping_add(self.base as usize);
        (0..self.syms.len()).map(move |i| {
            let s = &self.syms[i];
            (
                sym_str(&self.names, s).to_string(),
                load + s.start as usize,
                s.size as usize,
            )
        })
    }

    /// Counts for tests and reports.
    #[cfg(test)]
    pub(crate) fn stats(&self) -> TableStats {
        let by = |src| self.funcs.iter().filter(|f| f.source == src).count();
        TableStats {
            functions: self.funcs.len(),
            from_fde: by(Source::Fde),
            from_dynsym: by(Source::Dynsym),
            from_symtab: by(Source::Symtab),
            symbols: self.syms.len(),
            landing_pads: self.pads.len(),
            covered: self.pieces.iter().map(|p| u64::from(p.end - p.start)).sum(),
            executable: self.executable,
            heap_bytes: std::mem::size_of_val(&*self.pieces)
                + std::mem::size_of_val(&*self.funcs)
                + std::mem::size_of_val(&*self.syms)
                + std::mem::size_of_val(&*self.by_name)
                + self.names.len()
                + std::mem::size_of_val(&*self.pads)
                + std::mem::size_of_val(&*self.unknown_pads)
                + self
                    .code_pointers
                    .as_ref()
                    .map_or(0, |v| std::mem::size_of_val(&**v)),
        }
    }

    /// Every extent of the table, in address order, for a module at `bias`.
    pub(crate) fn extents(self: &Arc<Self>, bias: usize) -> Vec<Extent> {
        let load = bias.wrapping_add(self.base as usize);
        let mut v: Vec<Extent> = Vec::new();
        for p in self.pieces.iter() {
            let f = self.funcs[p.func as usize];
            let e = Extent {
                start: load + f.start as usize,
                end: load + (f.start + f.len) as usize,
                source: f.source,
                table: self.clone(),
                load,
                name: f.name,
            };
            if v.last()
                .map_or(true, |l| (l.start, l.end) != (e.start, e.end))
            {
                v.push(e);
            }
        }
        v
    }
}

fn sym_str<'a>(names: &'a str, s: &Sym) -> &'a str {
    let a = s.name_off as usize;
    names.get(a..a + s.name_len as usize).unwrap_or_default()
}

/// Whether `[s, e)` nests with every FDE range (inside it, around it, or
/// apart). `fdes` is sorted by start; FDEs nest at most shallowly, so the
/// scan back for ranges starting before `s` is bounded.
fn laminar(fdes: &[(u32, u32)], s: u32, e: u32) -> bool {
    let first_after = fdes.partition_point(|&(fs, _)| fs <= s);
    let past = fdes.partition_point(|&(fs, _)| fs < e);
    // FDEs starting inside (s, e) must end by e.
    if fdes[first_after..past.max(first_after)]
        .iter()
        .any(|&(_, fe)| fe > e)
    {
        return false;
    }
    // FDEs starting before s and reaching past it must reach e.
    !fdes[..first_after]
        .iter()
        .rev()
        .take(16)
        .any(|&(fs, fe)| fs < s && fe > s && fe < e)
}

/// Cuts the candidates' union at every bound and gives each piece to its
/// tightest candidate (ties: FDE, `.dynsym`, `.symtab`). Returns the pieces
/// (adjacent pieces of one candidate merged; `func` indexes the second
/// result) and the candidates that won some piece.
fn tightest(mut cands: Vec<Cand>) -> (Vec<Piece>, Vec<Cand>) {
    cands.sort_by_key(|c| (c.start, std::cmp::Reverse(c.end), c.source));
    cands.dedup_by_key(|c| (c.start, c.end));
    let mut points: Vec<u32> = cands.iter().flat_map(|c| [c.start, c.end]).collect();
    points.sort_unstable();
    points.dedup();
    let mut pieces: Vec<Piece> = Vec::with_capacity(cands.len());
    let mut chosen: Vec<Cand> = Vec::with_capacity(cands.len());
    // The function each candidate became, once it won a piece: a candidate
    // may win again after a nested one interrupted it.
    let mut func_of: Vec<u32> = vec![NONE; cands.len()];
    let mut active: Vec<usize> = Vec::new();
    let mut next = 0;
    for w in points.windows(2) {
        let (a, b) = (w[0], w[1]);
        active.retain(|&i| cands[i].end > a);
        while next < cands.len() && cands[next].start <= a {
            active.push(next);
            next += 1;
        }
        let Some(&best) = active
            .iter()
            .min_by_key(|&&i| (cands[i].end - cands[i].start, cands[i].source))
        else {
            continue;
        };
        if func_of[best] == NONE {
            func_of[best] = chosen.len() as u32;
            chosen.push(cands[best]);
        }
        let func = func_of[best];
        match pieces.last_mut() {
            Some(p) if p.func == func && p.end == a => p.end = b,
            _ => pieces.push(Piece {
                start: a,
                end: b,
                func,
            }),
        }
    }
    (pieces, chosen)
}

/// The best symbol to name the function `[start, start + len)`, or [`NONE`].
fn best_name(syms: &[Sym], names: &str, start: u32, len: u32) -> u32 {
    let a = syms.partition_point(|s| s.start < start);
    let b = a + syms[a..].partition_point(|s| s.start == start);
    (a..b)
        .min_by_key(|&i| {
            let s = &syms[i];
            let f = SymFlags::unpack(s.flags);
            let name = sym_str(names, s);
            (
                s.size != len,
                f.ifunc,
                !f.dlsym_visible(),
                !f.global,
                name.bytes().take_while(|&c| c == b'_').count(),
                name.len(),
                name,
            )
        })
        .map_or(NONE, |i| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sym(name: &str, value: u64, size: u64, dynsym: bool) -> SymbolIn {
        SymbolIn {
            name: name.into(),
            value,
            size,
            flags: SymFlags {
                dynsym,
                symtab: !dynsym,
                global: true,
                ..Default::default()
            },
        }
    }

    fn fde(start: u64, len: u64) -> FdeIn {
        FdeIn {
            start,
            len,
            lsda: LsdaIn::None,
        }
    }

    fn bounds(
        t: &Arc<FunctionTable>,
        addr: usize,
    ) -> Option<(usize, usize, Source, Option<String>)> {
        t.extent(0, addr)
            .map(|e| (e.start, e.end, e.source, e.name().map(String::from)))
    }

    #[test]
    fn fdes_give_bounds_symbols_give_names() {
        let t = Arc::new(
            FunctionTable::build(
                0x0,
                &[(0x1000, 0x2000)],
                &[fde(0x1000, 0x40), fde(0x1040, 0x20), fde(0x1800, 0x10)],
                vec![
                    sym("__libc_foo", 0x1000, 0x40, true),
                    sym("foo", 0x1000, 0x40, true),
                    sym("foo_local", 0x1000, 0x40, false),
                    // A sizeless symbol still names the FDE starting there.
                    sym("bar", 0x1040, 0, true),
                    // Covers code no FDE describes.
                    sym("asm_no_cfi", 0x1100, 0x30, false),
                ],
            )
            .expect("build"),
        );
        assert_eq!(
            bounds(&t, 0x1000),
            Some((0x1000, 0x1040, Source::Fde, Some("foo".into())))
        );
        assert_eq!(
            bounds(&t, 0x103f),
            Some((0x1000, 0x1040, Source::Fde, Some("foo".into())))
        );
        assert_eq!(
            bounds(&t, 0x1050),
            Some((0x1040, 0x1060, Source::Fde, Some("bar".into())))
        );
        assert_eq!(bounds(&t, 0x1060), None);
        assert_eq!(
            bounds(&t, 0x1110),
            Some((0x1100, 0x1130, Source::Symtab, Some("asm_no_cfi".into())))
        );
        assert_eq!(
            bounds(&t, 0x1805),
            Some((0x1800, 0x1810, Source::Fde, None))
        );
        assert_eq!(bounds(&t, 0xfff), None);
        assert_eq!(bounds(&t, 0x3000), None);
        let s = t.stats();
        assert_eq!((s.functions, s.from_fde, s.from_symtab), (4, 3, 1));
        assert_eq!(s.covered, 0x40 + 0x20 + 0x10 + 0x30);
    }

    #[test]
    fn tightest_consistent_candidate_wins() {
        let t = Arc::new(
            FunctionTable::build(
                0,
                &[(0, 0x10000)],
                &[fde(0x100, 0x100), fde(0x400, 0x80)],
                vec![
                    // An alternate entry nested in the FDE: wins inside itself.
                    sym("inner", 0x180, 0x20, false),
                    // Crosses the FDE's end: contradicts it, not a candidate.
                    sym("crossing", 0x1f0, 0x40, true),
                    // Around an FDE: the FDE wins inside, the symbol around.
                    sym("outer", 0x380, 0x180, false),
                ],
            )
            .expect("build"),
        );
        assert_eq!(bounds(&t, 0x150).map(|b| (b.0, b.1)), Some((0x100, 0x200)));
        assert_eq!(
            bounds(&t, 0x185).map(|b| (b.0, b.1, b.2)),
            Some((0x180, 0x1a0, Source::Symtab))
        );
        // After the nested symbol, the FDE again.
        assert_eq!(bounds(&t, 0x1a0).map(|b| (b.0, b.1)), Some((0x100, 0x200)));
        assert_eq!(bounds(&t, 0x210), None);
        assert_eq!(bounds(&t, 0x390).map(|b| (b.0, b.1)), Some((0x380, 0x500)));
        assert_eq!(
            bounds(&t, 0x400).map(|b| (b.0, b.1, b.2)),
            Some((0x400, 0x480, Source::Fde))
        );
        assert_eq!(bounds(&t, 0x490).map(|b| (b.0, b.1)), Some((0x380, 0x500)));
        // Three functions: the FDE (won twice, around `inner`), `inner`,
        // `outer`, and the second FDE.
        assert_eq!(t.stats().functions, 4);
    }

    #[test]
    fn landing_pads_are_those_inside_the_extent() {
        let t = Arc::new(
            FunctionTable::build(
                0x40_0000,
                &[(0x40_1000, 0x40_2000)],
                &[
                    FdeIn {
                        start: 0x40_1000,
                        len: 0x100,
                        lsda: LsdaIn::Pads(vec![0x40_1080, 0x40_1040]),
                    },
                    fde(0x40_1100, 0x100),
                    FdeIn {
                        start: 0x40_1200,
                        len: 0x10,
                        lsda: LsdaIn::Unknown,
                    },
                ],
                vec![],
            )
            .expect("build"),
        );
        let bias = 0x1000_0000;
        let e = t.extent(bias, bias + 0x40_1010).expect("extent");
        assert_eq!(e.start, bias + 0x40_1000);
        assert_eq!(
            e.landing_pads(),
            Ok(vec![bias + 0x40_1040, bias + 0x40_1080])
        );
        let e = t.extent(bias, bias + 0x40_1100).expect("extent");
        assert_eq!(e.landing_pads(), Ok(vec![]));
        let e = t.extent(bias, bias + 0x40_1200).expect("extent");
        assert!(e.landing_pads().is_err());
    }

    #[test]
    fn symbols_by_name_prefer_what_dlsym_returns() {
        let mut old = sym("memcpy", 0x1100, 0x10, true);
        old.flags.hidden_version = true;
        let mut local = sym("memcpy", 0x1200, 0x10, false);
        local.flags.global = false;
        let t = FunctionTable::build(
            0,
            &[(0x1000, 0x2000)],
            &[],
            vec![
                old,
                local,
                sym("memcpy", 0x1300, 0x10, true),
                sym("memcpy", 0x1300, 0x10, false),
            ],
        )
        .expect("build");
        let found = t.symbols_named("memcpy");
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!(found[0].vaddr, 0x1300);
        assert!(found[0].flags.dynsym && found[0].flags.symtab);
        assert!(t.symbols_named("memcp").is_empty());
        assert!(t.symbols_named("memcpyx").is_empty());
        let t = Arc::new(t);
        let all: Vec<_> = t.clone().functions(0x10).collect();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0], ("memcpy".to_string(), 0x1110, 0x10));
    }

    #[test]
    fn modules_past_4_gib_are_refused() {
        assert_eq!(
            FunctionTable::build(0, &[(0x1000, 0x1_0000_1000)], &[], vec![]).err(),
            Some(TableError::TooLarge)
        );
    }
}
