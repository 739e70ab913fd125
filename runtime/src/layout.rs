//! The instruction layout of code probes go into: one [`FunctionFlow`] per
//! function, which knows every instruction boundary and which runs of whole
//! instructions a site's jump may displace.
//!
//! For ELF code, the functions are the module's extents (`.eh_frame` FDEs
//! and sized symbols), analysed all together on the first attach in the
//! module and linked ([`arch::link_module`]: a `foo.cold` part jumps back
//! into the middle of `foo`), with each function's C++ landing pads and the
//! symbols inside it as entries, and the alignment padding after it
//! ([`FunctionFlow::set_padding`]: a function shorter than the jump, or a
//! site near its end, may displace padding nothing executes). For a JIT
//! region, the functions are those
//! the host declared ([`crate::RegionDesc::functions`]), or the whole region
//! as one.
//!
//! Jumps through code pointers (tail calls through a function pointer, a
//! GOT slot or a vtable) go only to entry points
//! ([`PointerJumps::ToEntries`]) in a position-independent module: every
//! code address its data can hold is named by a dynamic relocation, and
//! those inside a function are its entries too. Elsewhere — an `ET_EXEC`
//! executable, whose data holds absolute addresses nobody lists, a module
//! whose relocations did not read, and JIT code — such a jump makes its
//! function unproven ([`PointerJumps::Anywhere`]), and only bounded jump
//! tables are followed.
//!
//! Writer only (under the writer lock). A module's layout is kept while the
//! module's table is the same (an unload and a reload at the same address
//! gives a new table, so a new layout).

use crate::arch::{self, FunctionFlow, PointerJumps};
use crate::region::RegionId;
use crate::sys::{modules, peek};

/// The flows of one module or region, sorted by start.
struct Flows {
    flows: Vec<FunctionFlow>,
}

impl Flows {
    fn at(&self, addr: usize) -> Option<&FunctionFlow> {
        let i = self.flows.partition_point(|f| f.start() <= addr);
        let f = self.flows.get(i.checked_sub(1)?)?;
        (addr < f.end()).then_some(f)
    }
}

/// A module's flows, with what identifies the module's image.
struct ModuleFlows {
    table: modules::TableRef,
    /// Its executable segments, and the loader generation at which they
    /// were last seen to be this image's.
    exec: Vec<(usize, usize)>,
    generation: Option<(u64, u64)>,
    flows: Flows,
}

/// The flows of every module and region probed so far.
#[derive(Default)]
pub(crate) struct Layouts {
    modules: Vec<ModuleFlows>,
    regions: std::collections::HashMap<RegionId, Flows>,
    /// The loader's generation as this writer operation first asked it
    /// (see [`Layouts::forget_generation`]): a batch asks for every probe.
    generation: Option<Option<(u64, u64)>>,
}

/// How much of the gap after a function is read for padding: more than
/// the 4 bytes a jump at its last byte needs past it.
const PADDING_READ: usize = 16;

/// Reads memory without faulting (jump tables may be anywhere).
fn read(addr: usize, buf: &mut [u8]) -> bool {
    peek::read_memory(addr, buf).is_ok()
}

impl Layouts {
    /// Forgets the loader generation this operation saw: called at the
    /// edges of every writer operation (modules may be loaded and unloaded
    /// between them; within one, the writer's reads of code assume not).
    pub(crate) fn forget_generation(&mut self) {
        self.generation = None;
    }

    /// The flow of the function of module code around `addr`; `original`
    /// reads code with probert's own patches undone (`None` where it cannot
    /// be read). `None` outside any known function.
    pub(crate) fn module_flow(
        &mut self,
        addr: usize,
        original: &dyn Fn(usize, usize) -> Option<Vec<u8>>,
    ) -> Option<&FunctionFlow> {
        // The common case, one loader call: nothing was loaded or unloaded
        // since this module's flows were last confirmed.
        let generation = *self.generation.get_or_insert_with(modules::generation);
        if let Some(i) = self.modules.iter().position(|m| {
            generation.is_some()
                && m.generation == generation
                && m.exec.iter().any(|&(a, b)| (a..b).contains(&addr))
        }) {
            return self.modules[i].flows.at(addr);
        }
        let module = modules::module_layout(addr)?;
        let at = match self
            .modules
            .iter()
            .position(|m| m.table.same(&module.table))
        {
            Some(i) => {
                self.modules[i].generation = generation;
                i
            }
            None => {
                // A module reloaded where another was: its old flows go.
                self.modules.retain(|m| !m.table.overlaps(&module.table));
                let pointers = if module.code_pointers_known() {
                    PointerJumps::ToEntries
                } else {
                    PointerJumps::Anywhere
                };
                let extents = &module.extents;
                let exec = module.table.exec();
                let mut flows: Vec<FunctionFlow> = extents
                    .iter()
                    .enumerate()
                    .filter_map(|(i, e)| {
                        let code = original(e.start, e.end)?;
                        let mut entries = e.landing_pads().ok()?;
                        entries.extend(module.symbols_inside(e.start, e.end));
                        entries.extend(module.code_pointers_inside(e.start, e.end));
                        let mut flow =
                            FunctionFlow::analyze(&code, e.start, &entries, &read, pointers);
                        // The gap to the next function, if no code pointer
                        // names a place in it: alignment padding, perhaps.
                        let next = extents.get(i + 1).map_or(e.end, |n| n.start);
                        let segment_end = exec
                            .iter()
                            .find(|&&(s, end)| s <= e.start && e.end <= end)
                            .map_or(e.end, |&(_, end)| end);
                        let gap = next.min(e.end + PADDING_READ).min(segment_end);
                        if gap > e.end
                            && module.code_pointers_inside(e.end - 1, gap).next().is_none()
                        {
                            if let Some(pad) = original(e.end, gap) {
                                flow.set_padding(&pad);
                            }
                        }
                        Some(flow)
                    })
                    .collect();
                flows.sort_by_key(|f| f.start());
                arch::link_module(&mut flows);
                self.modules.push(ModuleFlows {
                    exec: module.table.exec().to_vec(),
                    generation,
                    table: module.table,
                    flows: Flows { flows },
                });
                self.modules.len() - 1
            }
        };
        self.modules[at].flows.at(addr)
    }

    /// The flow of the function of JIT region `id` (bounds `functions`,
    /// or the region `[start, end)` as one) around `addr`.
    pub(crate) fn region_flow(
        &mut self,
        id: RegionId,
        functions: &[(usize, usize)],
        (start, end): (usize, usize),
        addr: usize,
        original: &dyn Fn(usize, usize) -> Option<Vec<u8>>,
    ) -> Option<&FunctionFlow> {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.regions.entry(id) {
            let bounds: Vec<(usize, usize)> = if functions.is_empty() {
                vec![(start, end)]
            } else {
                functions.to_vec()
            };
            let mut flows: Vec<FunctionFlow> = bounds
                .iter()
                .filter_map(|&(s, e)| {
                    let code = original(s, e)?;
                    Some(FunctionFlow::analyze(
                        &code,
                        s,
                        &[],
                        &read,
                        PointerJumps::Anywhere,
                    ))
                })
                .collect();
            flows.sort_by_key(|f| f.start());
            arch::link_module(&mut flows);
            slot.insert(Flows { flows });
        }
        self.regions.get(&id)?.at(addr)
    }

    /// Forgets a region's flows (the region is gone, or its code changed).
    pub(crate) fn forget_region(&mut self, id: RegionId) {
        self.regions.remove(&id);
    }

    /// Bytes of heap the flows hold (for the memory figures).
    #[allow(dead_code)]
    pub(crate) fn heap_bytes(&self) -> usize {
        let of = |f: &Flows| f.flows.iter().map(FunctionFlow::heap_bytes).sum::<usize>();
        self.modules.iter().map(|m| of(&m.flows)).sum::<usize>()
            + self.regions.values().map(of).sum::<usize>()
    }
}
