//! Code regions: where probes may go, and how their bytes are written.
//!
//! Two kinds of region:
//! - **modules** — ELF code (the executable, shared libraries), found on
//!   demand from the address via `dl_iterate_phdr`; never registered;
//! - **JIT regions** — code a host generates, registered with
//!   [`crate::region_add`] and removed with [`crate::region_remove`] before the
//!   memory is freed or reused.
//!
//! Regions are used by the writer only (attach, detach, restore), under the
//! writer lock: the trap path needs only the probe index, never a region.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::sys::{code, modules};

/// Writes `src` at the executable address `dst` of a JIT region whose
/// executable view is not writable (e.g. a dual-mapped memfd).
pub type WriteFn = dyn Fn(usize, &[u8]) -> std::result::Result<(), String> + Send + Sync;

/// A JIT region to register.
pub struct RegionDesc {
    /// First byte of executable code; also taken as a function start for
    /// instruction-boundary checks.
    pub start: usize,
    /// Length in bytes (> 0).
    pub len: usize,
    /// A name for messages.
    pub name: String,
    /// How to write code bytes; `None` writes through `/proc/self/mem`
    /// (falling back to a brief RWX protection change).
    pub write: Option<Box<WriteFn>>,
}

impl fmt::Debug for RegionDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionDesc")
            .field("start", &format_args!("{:#x}", self.start))
            .field("len", &self.len)
            .field("name", &self.name)
            .field("write", &self.write.as_ref().map(|_| "callback"))
            .finish()
    }
}

/// How a region is registered, beyond its [`RegionDesc`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RegionOptions {
    /// Let probes be attached where the memory is mapped readable but not
    /// executable (a buffer the host emits into read-write and makes
    /// executable later, or a copy it executes elsewhere). Off by default:
    /// attaching there fails with [`Error::Protect`] and writes nothing.
    /// Memory that is not mapped readable at all (`PROT_NONE`, unmapped) is
    /// refused either way.
    pub any_protection: bool,
}

/// The largest region [`crate::region_add`] accepts: 1 TiB. Real code arenas
/// are megabytes to a few GiB; anything near the size of the address space
/// is a caller's bug (a length in the wrong unit, a negative number cast).
pub const MAX_REGION_LEN: usize = 1 << 40;

/// A handle to a registered JIT region; never 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(pub u64);

/// Where a probe lives and how to write there: one per JIT region or module
/// segment, shared by its sites.
pub(crate) struct Target {
    /// The region's bounds: reads of code never cross them.
    pub start: usize,
    pub end: usize,
    /// The JIT region, if any.
    pub region: Option<RegionId>,
    /// The writer.
    pub write: Option<Arc<WriteFn>>,
    /// Whether probert may place its bytes in memory that is not mapped
    /// executable ([`RegionOptions::any_protection`]).
    pub any_prot: bool,
}

/// What [`Regions::resolve`] found at an address.
pub(crate) struct Resolved {
    pub target: Arc<Target>,
    /// Start of the enclosing function, when known.
    pub func_start: Option<usize>,
    /// Whether that function's symbol names probert's own code.
    pub probert_symbol: bool,
    /// The C library function it is, if probert's own signal path may call
    /// it ([`signal_path_callee`]).
    pub signal_callee: Option<&'static str>,
}

/// The C library functions compiled code may call for a copy, a fill or a
/// comparison without naming them: probert's trap and fast paths among it
/// (the compiler's choice, more so in debug builds). A probe there would
/// trap inside the handler that serves it.
const SIGNAL_PATH_CALLEES: [&str; 5] = ["memcpy", "memmove", "memset", "memcmp", "bcmp"];

/// The extents of [`SIGNAL_PATH_CALLEES`] as the dynamic linker resolved
/// them (their IFUNC choices), found once.
fn signal_path_extents() -> &'static [(usize, usize, &'static str)] {
    static EXTENTS: std::sync::OnceLock<Vec<(usize, usize, &'static str)>> =
        std::sync::OnceLock::new();
    EXTENTS.get_or_init(|| {
        SIGNAL_PATH_CALLEES
            .iter()
            .filter_map(|&name| {
                let c = std::ffi::CString::new(name).ok()?;
                let f = modules::function_extent(modules::global_symbol(&c)?)?;
                Some((f.start, f.end, name))
            })
            .collect()
    })
}

/// The function of [`SIGNAL_PATH_CALLEES`] whose code holds `addr`.
pub(crate) fn signal_path_callee(addr: usize) -> Option<&'static str> {
    signal_path_extents()
        .iter()
        .find(|&&(s, e, _)| (s..e).contains(&addr))
        .map(|&(_, _, name)| name)
}

/// Whether a symbol names probert's own code (`probert_*`, or a Rust path
/// through a `probert` crate).
fn is_probert_symbol(name: &str) -> bool {
    name.starts_with("probert_")
        || name
            .match_indices("7probert")
            .any(|(i, _)| !name[..i].ends_with(|c: char| c.is_ascii_digit()))
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("start", &format_args!("{:#x}", self.start))
            .field("end", &format_args!("{:#x}", self.end))
            .field("region", &self.region)
            .finish()
    }
}

impl Target {
    /// Writes code bytes at `addr` (within this region).
    pub(crate) fn write(&self, addr: usize, bytes: &[u8]) -> Result<()> {
        match &self.write {
            None => code::write_code(addr, bytes),
            Some(w) => w(addr, bytes).map_err(|reason| Error::Protect {
                addr,
                reason: format!("the region's write callback failed: {reason}").into(),
            }),
        }
    }
}

struct Jit {
    id: RegionId,
    end: usize,
    name: String,
    target: Arc<Target>,
    /// The functions inside, `[start, end)`, as the host declared them
    /// ([`Regions::set_functions`]); empty: the region is one function.
    functions: Vec<(usize, usize)>,
}

/// The registered JIT regions. Writer only.
#[derive(Default)]
pub(crate) struct Regions {
    by_start: BTreeMap<usize, Jit>,
    next_id: u64,
    /// The targets of module segments seen so far, by bounds.
    segments: std::cell::RefCell<std::collections::HashMap<(usize, usize), Arc<Target>>>,
    /// The module segment the last lookup of this writer operation found,
    /// with its target (see [`Regions::forget_lookups`]): a batch probes
    /// many addresses of one module in a row, and the loader need not be
    /// asked again for each.
    last: std::cell::RefCell<Option<(modules::SegmentLookup, Arc<Target>)>>,
}

impl fmt::Debug for Regions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.by_start
                    .iter()
                    .map(|(s, j)| (format!("{s:#x}..{:#x}", j.end), &j.name)),
            )
            .finish()
    }
}

impl Regions {
    /// Registers a JIT region: `[start, start + len)` must lie in user
    /// space, be at most [`MAX_REGION_LEN`] long and overlap at least one
    /// mapping (any protection: a reserved arena may be `PROT_NONE` but for
    /// the pages committed so far, and may have unmapped holes).
    pub(crate) fn add(&mut self, desc: RegionDesc, opts: RegionOptions) -> Result<RegionId> {
        if desc.start == 0 || desc.len == 0 {
            return Err(Error::InvalidArgument(
                "a region needs a start and a length".into(),
            ));
        }
        if desc.len > MAX_REGION_LEN {
            return Err(Error::InvalidArgument(
                format!(
                    "a region of {:#x} bytes is larger than the {MAX_REGION_LEN:#x} allowed",
                    desc.len
                )
                .into(),
            ));
        }
        // x86_64 user space ends below 2^47 (2^56 with 5-level paging).
        if desc.start.saturating_add(desc.len) > 1 << 56 {
            return Err(Error::InvalidArgument(
                "a region must lie in user space".into(),
            ));
        }
        let mut mapped = false;
        let seen = crate::sys::maps::for_each_mapping(|m| {
            if m.start < desc.start + desc.len && desc.start < m.end {
                mapped = true;
                std::ops::ControlFlow::Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        });
        // Without /proc/self/maps nothing can be checked: accept.
        if seen.is_ok() && !mapped {
            return Err(Error::InvalidArgument(
                format!(
                    "nothing is mapped in [{:#x}, {:#x})",
                    desc.start,
                    desc.start + desc.len
                )
                .into(),
            ));
        }
        let end = desc
            .start
            .checked_add(desc.len)
            .ok_or(Error::InvalidArgument(
                "region wraps around the address space".into(),
            ))?;
        let overlap = |s: usize, e: usize| s < end && desc.start < e;
        let before = self.by_start.range(..end).next_back();
        if let Some((&s, j)) = before {
            if overlap(s, j.end) {
                return Err(Error::RegionOverlap {
                    start: desc.start,
                    end,
                    other_start: s,
                    other_end: j.end,
                });
            }
        }
        self.next_id += 1;
        let id = RegionId(self.next_id);
        self.by_start.insert(
            desc.start,
            Jit {
                id,
                end,
                name: desc.name,
                target: Arc::new(Target {
                    start: desc.start,
                    end,
                    region: Some(id),
                    write: desc.write.map(Arc::from),
                    any_prot: opts.any_protection,
                }),
                functions: Vec::new(),
            },
        );
        Ok(id)
    }

    /// The bounds of a registered region.
    pub(crate) fn bounds(&self, id: RegionId) -> Option<(usize, usize)> {
        self.by_start
            .iter()
            .find(|(_, j)| j.id == id)
            .map(|(&s, j)| (s, j.end))
    }

    /// The functions the host declared inside region `id`.
    pub(crate) fn functions(&self, id: RegionId) -> &[(usize, usize)] {
        self.by_start
            .values()
            .find(|j| j.id == id)
            .map_or(&[], |j| &j.functions)
    }

    /// Declares the functions inside region `id` (their bounds: where
    /// instruction boundaries are decoded from, and what a site's run may
    /// not leave). Each must lie inside the region; none may overlap.
    pub(crate) fn set_functions(
        &mut self,
        id: RegionId,
        functions: &[(usize, usize)],
    ) -> Result<()> {
        let (&start, j) = self
            .by_start
            .iter_mut()
            .find(|(_, j)| j.id == id)
            .ok_or(Error::NotFound)?;
        let mut f: Vec<(usize, usize)> = functions.to_vec();
        f.sort_unstable();
        for (i, &(s, e)) in f.iter().enumerate() {
            if s >= e || s < start || e > j.end {
                return Err(Error::InvalidArgument(
                    format!("function [{s:#x}, {e:#x}) is empty or outside its region").into(),
                ));
            }
            if i > 0 && f[i - 1].1 > s {
                return Err(Error::InvalidArgument(
                    format!("functions overlap at {s:#x}").into(),
                ));
            }
        }
        j.functions = f;
        Ok(())
    }

    /// Forgets a region (its probes must be gone).
    pub(crate) fn remove(&mut self, id: RegionId) -> Result<()> {
        let (start, _) = self.bounds(id).ok_or(Error::NotFound)?;
        self.by_start.remove(&start);
        Ok(())
    }

    /// The region holding `addr`: a registered JIT region, else the loaded
    /// module's executable segment; and, in module code, the enclosing
    /// function's start and whether its symbol is probert's.
    pub(crate) fn resolve(&self, addr: usize) -> Result<Resolved> {
        if let Some((&start, j)) = self.by_start.range(..=addr).next_back() {
            if addr < j.end {
                return Ok(Resolved {
                    target: j.target.clone(),
                    func_start: Some(start),
                    probert_symbol: false,
                    signal_callee: None,
                });
            }
        }
        let cached = self
            .last
            .borrow()
            .as_ref()
            .filter(|(seg, _)| (seg.start..seg.end).contains(&addr))
            .cloned();
        let (seg, target) = match cached {
            Some(c) => c,
            None => {
                let seg = modules::segment_lookup(addr).ok_or(Error::NoRegion { addr })?;
                let target = self
                    .segments
                    .borrow_mut()
                    .entry((seg.start, seg.end))
                    .or_insert_with(|| {
                        Arc::new(Target {
                            start: seg.start,
                            end: seg.end,
                            region: None,
                            write: None,
                            any_prot: false,
                        })
                    })
                    .clone();
                *self.last.borrow_mut() = Some((seg.clone(), target.clone()));
                (seg, target)
            }
        };
        let func = seg.function_extent(addr);
        Ok(Resolved {
            target,
            func_start: func.as_ref().map(|f| f.start),
            probert_symbol: func
                .as_ref()
                .and_then(|f| f.name())
                .is_some_and(is_probert_symbol),
            signal_callee: signal_path_callee(addr),
        })
    }

    /// Forgets the module segment remembered by the last lookup: called
    /// at the edges of every writer operation, as modules may be loaded and
    /// unloaded between them (within one, the writer's reads of code
    /// assume they are not).
    pub(crate) fn forget_lookups(&self) {
        self.last.borrow_mut().take();
    }
}

#[cfg(test)]
#[allow(unsafe_code)] // `global_asm!`
mod tests {
    use super::*;

    // A function with an alternate entry nested in it: sized symbols only
    // (no CFI), the inner one inside the outer one.
    std::arch::global_asm!(
        ".pushsection .text.region_test_nested,\"ax\",@progbits",
        ".p2align 4",
        ".globl region_test_outer",
        ".hidden region_test_outer",
        ".type region_test_outer, @function",
        "region_test_outer:",
        "nop",
        "nop",
        "nop",
        "nop",
        ".globl region_test_inner",
        ".hidden region_test_inner",
        ".type region_test_inner, @function",
        "region_test_inner:",
        "nop",
        "nop",
        "ret",
        ".size region_test_inner, 3",
        "ret",
        ".size region_test_outer, 8",
        ".popsection",
    );

    extern "C" {
        fn region_test_outer();
        fn region_test_inner();
    }

    #[test]
    fn a_function_nested_in_another_resolves_to_itself_after_the_outer_one() {
        // Within one writer operation lookups reuse what the loader said of
        // a module; an alternate entry nested in a larger function must
        // still resolve to its own start, whatever was resolved before it.
        let (outer, inner) = (
            region_test_outer as *const () as usize,
            region_test_inner as *const () as usize,
        );
        let regions = Regions::default();
        let fresh = regions.resolve(inner).unwrap().func_start;
        assert_eq!(fresh, Some(inner));
        regions.forget_lookups();
        assert_eq!(regions.resolve(outer).unwrap().func_start, Some(outer));
        assert_eq!(regions.resolve(inner + 1).unwrap().func_start, fresh);
        assert_eq!(regions.resolve(outer + 7).unwrap().func_start, Some(outer));
    }
}
