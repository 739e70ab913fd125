//! Sites: the life of one patched code location.
//!
//! A *site* is an address whose code probert changed. It goes through
//!
//! ```text
//! plain ──arm──▶ trap ──to_jump──▶ fast
//!   ▲              │  ◀──to_trap──
//!   └───disarm─────┘
//! ```
//!
//! - **plain → trap** ([`Sites::arm`]): the trap instruction over the
//!   instruction's head ([`arch::HEAD`]); one atomic write.
//! - **trap ⇄ fast**: a site whose instruction qualifies
//!   ([`arch::fast_eligible`]) and whose consumers all accept it becomes a
//!   jump to its own stub ([`crate::fast`]). The bytes change in the order
//!   the architecture prescribes ([`arch::TO_JUMP`], [`arch::TO_TRAP`]: the
//!   int3-first protocol of cross-modifying code), with every core
//!   serialised between steps, so no thread ever runs a torn instruction; a
//!   thread arriving mid-switch executes the trap and takes the trap path,
//!   which serves every site whatever its mechanism. Serialising is
//!   `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`; without it (old
//!   kernels) every site stays on the trap path.
//! - **trap → plain** ([`Sites::disarm`]): the original bytes back, only
//!   where the code still holds the trap probert wrote.
//!
//! The writer (`crate::writer`) decides when: it owns the probe records, the
//! index and the consumer lists, and calls these transitions in the order
//! its module docs give. Writer only: everything here runs under the writer
//! lock.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use crate::arch::{self, Displaced, SwitchStep, MAX_INSN_LEN, TRAP_INSN};
use crate::error::{Error, Result};
use crate::patch::{self, Patch};
use crate::probe::PROBES;
use crate::region::{RegionId, Regions, Target};
use crate::sys::{code, membarrier};
use crate::xol::Pool;

/// The mechanism that serves a probed address.
#[repr(u32)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Fast where the site allows it, else trap (the default).
    #[default]
    Auto = 0,
    /// The trap path: a trap instruction (`int3`) and a signal.
    Trap = 1,
    /// A jump to a per-site stub, no signal.
    Fast = 2,
}

impl Mode {
    /// Reads a mode that arrived as an integer (from C); `None` if invalid.
    pub fn from_raw(raw: u32) -> Option<Mode> {
        match raw {
            0 => Some(Mode::Auto),
            1 => Some(Mode::Trap),
            2 => Some(Mode::Fast),
            _ => None,
        }
    }
}

/// A site switched, or switching, to its jump: which parts of the jump are
/// in the code now.
#[derive(Clone, Copy, Debug)]
struct FastJump {
    stub: usize,
    /// [`arch::TAIL`] holds the jump's bytes.
    tail: bool,
    /// [`arch::HEAD`] holds the jump's bytes (the site is fast).
    head: bool,
}

/// The two parts of a jump, written in separate steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JumpPart {
    Head,
    Tail,
}

impl JumpPart {
    fn range(self) -> std::ops::Range<usize> {
        match self {
            JumpPart::Head => arch::HEAD,
            JumpPart::Tail => arch::TAIL,
        }
    }
}

/// One patched site.
pub(crate) struct Site {
    /// Its probe record (`probe::PROBES`).
    pub rec: u32,
    /// The original bytes of the instruction, written back on disarm.
    orig: [u8; MAX_INSN_LEN],
    len: u8,
    displaced: Displaced,
    pub target: Target,
    /// The out-of-line stub of the trap path, if the instruction needs one.
    pub stub: Option<usize>,
    /// The consumers attached here.
    pub consumers: Vec<u32>,
    /// Consumers that asked for the trap path ([`Mode::Trap`]).
    pub pins: usize,
    /// Whether the site can be a fast site.
    eligible: bool,
    /// The fast stub, while the site is (or is becoming) a jump to it.
    jump: Option<FastJump>,
}

impl Site {
    fn wants_fast(&self, fast_ok: bool) -> bool {
        fast_ok && self.eligible && self.pins == 0 && !self.consumers.is_empty()
    }

    /// How many bytes from the site differ from the original code.
    fn patched_len(&self) -> usize {
        if self.jump.is_some_and(|f| f.tail || f.head) {
            arch::JUMP_LEN
        } else {
            TRAP_INSN.len()
        }
    }

    /// Whether the site's instruction can be displaced by a jump.
    pub(crate) fn eligible(&self) -> bool {
        self.eligible
    }

    /// The mechanism serving the site now.
    pub(crate) fn mode(&self) -> Mode {
        if self.jump.is_some_and(|f| f.head) {
            Mode::Fast
        } else {
            Mode::Trap
        }
    }
}

/// A site decoded and checked, its stub built; nothing written yet.
pub(crate) struct PreparedSite {
    pub addr: usize,
    orig: [u8; MAX_INSN_LEN],
    pub len: u8,
    pub displaced: Displaced,
    pub target: Target,
    pub stub: Option<usize>,
}

impl PreparedSite {
    /// Whether this site could be a fast site.
    pub(crate) fn eligible(&self) -> bool {
        arch::fast_eligible(self.len, &self.displaced)
    }
}

/// Whether `addr` is probert's own code (the trap path, the writer, the
/// stubs), which must never be probed. `func_name` is the symbol of the
/// enclosing function, if known.
fn is_probert_code(pool: &Pool, addr: usize, func_name: Option<&str>) -> bool {
    let (lo, hi) = crate::fast::code_range();
    if pool.contains(addr) || (lo..hi).contains(&addr) {
        return true;
    }
    match func_name {
        Some(name) => {
            name.starts_with("probert_")
                || name
                    .match_indices("7probert")
                    .any(|(i, _)| !name[..i].ends_with(|c: char| c.is_ascii_digit()))
        }
        None => false,
    }
}

/// Every patched site, by address. Writer only.
#[derive(Default)]
pub(crate) struct Sites {
    by_addr: BTreeMap<usize, Site>,
    /// Instruction starts of JIT regions, decoded on their first attach.
    boundaries: std::collections::HashMap<RegionId, arch::Boundaries>,
    /// Whether cores can be serialised after code changes (fast sites).
    fast_ok: bool,
}

impl Sites {
    /// No sites; fast sites only if `fast_ok` (cores can be serialised).
    pub(crate) fn new(fast_ok: bool) -> Sites {
        Sites {
            fast_ok,
            ..Sites::default()
        }
    }

    /// Whether fast sites are possible on this kernel.
    pub(crate) fn fast_ok(&self) -> bool {
        self.fast_ok
    }

    pub(crate) fn get(&self, addr: usize) -> Option<&Site> {
        self.by_addr.get(&addr)
    }

    pub(crate) fn get_mut(&mut self, addr: usize) -> Option<&mut Site> {
        self.by_addr.get_mut(&addr)
    }

    pub(crate) fn contains(&self, addr: usize) -> bool {
        self.by_addr.contains_key(&addr)
    }

    pub(crate) fn len(&self) -> usize {
        self.by_addr.len()
    }

    /// The sites in `[start, end)`.
    pub(crate) fn range(&self, start: usize, end: usize) -> impl Iterator<Item = (usize, &Site)> {
        self.by_addr.range(start..end).map(|(&a, s)| (a, s))
    }

    /// Forgets a region's decoded boundaries (the region is gone).
    pub(crate) fn forget_region(&mut self, id: RegionId) {
        self.boundaries.remove(&id);
    }

    /// Reads the original code of `[start, end)`: the code as it is, with
    /// the bytes of every site replaced by the ones probert displaced.
    pub(crate) fn original_code(&self, start: usize, end: usize) -> Vec<u8> {
        let mut bytes = code::read_code(start, end);
        let from = start.saturating_sub(arch::JUMP_LEN);
        for (&a, s) in self.by_addr.range(from..end) {
            for (i, &orig) in s.orig.iter().enumerate().take(s.patched_len()) {
                if let Some(b) = (a + i).checked_sub(start).and_then(|k| bytes.get_mut(k)) {
                    *b = orig;
                }
            }
        }
        bytes
    }

    /// Decodes and checks the instruction at `addr` and builds its
    /// out-of-line stub if it needs one. Nothing is written to the site.
    pub(crate) fn prepare(
        &mut self,
        regions: &Regions,
        pool: &mut Pool,
        addr: usize,
    ) -> Result<PreparedSite> {
        let (target, func_name) = regions.resolve(addr)?;
        if is_probert_code(pool, addr, func_name.as_deref()) {
            return Err(Error::InvalidArgument(
                format!("{addr:#x} is inside probert's own code").into(),
            ));
        }
        let end = target.end.min(addr + MAX_INSN_LEN);
        let insn = self.original_code(addr, end);
        // Boundaries first: a trap byte inside an instruction is that
        // instruction's byte (Misaligned); only at a boundary is it a
        // foreign trap (Conflict).
        match target.region {
            // A JIT region decodes from its start: once, then cached.
            Some(id) => {
                if !self.boundaries.contains_key(&id) {
                    let code = self.original_code(target.start, target.end);
                    let b = arch::Boundaries::decode(&code, target.start);
                    self.boundaries.insert(id, b);
                }
                self.boundaries[&id].check(addr)?;
            }
            None => {
                if let Some(func) = target.func_start.filter(|&f| f < addr) {
                    let bytes = self.original_code(func, end);
                    arch::check_boundary(&bytes, func, addr)?;
                }
            }
        }
        if insn.starts_with(TRAP_INSN) {
            return Err(Error::Conflict { addr });
        }
        let decoded = arch::analyze(&insn, addr)?;
        let stub = match decoded.displaced {
            Displaced::OutOfLine => Some(pool.create(&insn, addr)?),
            _ => None,
        };
        let mut orig = [0; MAX_INSN_LEN];
        orig[..insn.len()].copy_from_slice(&insn);
        Ok(PreparedSite {
            addr,
            orig,
            len: decoded.len,
            displaced: decoded.displaced,
            target,
            stub,
        })
    }

    /// Plain → trap for every prepared site: writes the trap instructions.
    /// On error, the traps written are restored (the sites stay plain) and
    /// the address of the site that failed is returned with the error.
    pub(crate) fn arm(
        &mut self,
        prepared: &[PreparedSite],
    ) -> std::result::Result<(), (usize, Error)> {
        let mut patches: Vec<Patch> = prepared
            .iter()
            .map(|p| Patch::new(&p.target, p.addr, TRAP_INSN))
            .collect();
        let mut written = Vec::new();
        if let Err(e) = patch::write_all(&mut patches, &mut written) {
            let _ = patch::write_all(&mut written, &mut Vec::new());
            let failed = patches
                .get(written.len())
                .map(|p| p.addr)
                .unwrap_or_default();
            return Err((failed, e));
        }
        Ok(())
    }

    /// Records armed sites (their trap is in the code) under probe record
    /// `rec` each.
    pub(crate) fn insert_armed(&mut self, prepared: PreparedSite, rec: u32) {
        let eligible = prepared.eligible();
        self.by_addr.insert(
            prepared.addr,
            Site {
                rec,
                orig: prepared.orig,
                len: prepared.len,
                displaced: prepared.displaced,
                eligible,
                target: prepared.target,
                stub: prepared.stub,
                consumers: Vec::new(),
                pins: 0,
                jump: None,
            },
        );
    }

    /// Trap → plain for sites whose consumers are gone (after switching fast
    /// ones back): the original bytes back where the code still holds our
    /// trap. The caller has tombstoned their index entries first (see
    /// `trap::TOMBSTONE`). The sites are forgotten; their stubs are retired
    /// into `pool`.
    /// Returns the removed sites' records, and the first write error.
    pub(crate) fn disarm(&mut self, pool: &mut Pool, addrs: &[usize]) -> (Vec<u32>, Result<()>) {
        let fast: Vec<usize> = addrs
            .iter()
            .copied()
            .filter(|a| self.by_addr.get(a).is_some_and(|s| s.jump.is_some()))
            .collect();
        let switched = self.switch_to_trap(pool, &fast);
        let mut patches = Vec::with_capacity(addrs.len());
        for a in addrs {
            let Some(s) = self.by_addr.get(a) else {
                continue;
            };
            // Restore only what is still our trap: if the module was unloaded
            // and something else mapped there, leave it alone.
            if code::read_code(*a, *a + TRAP_INSN.len()) == TRAP_INSN {
                patches.push(Patch::new(&s.target, *a, &s.orig[arch::HEAD]));
            }
        }
        let result = patch::write_all(&mut patches, &mut Vec::new()).and(switched);
        let mut recs = Vec::with_capacity(addrs.len());
        for a in addrs {
            let Some(s) = self.by_addr.remove(a) else {
                continue;
            };
            if let Some(stub) = s.stub {
                pool.retire(stub, false);
            }
            if let Some(f) = s.jump {
                // Only if switching back failed half-way: the site's head is
                // the trap again in every case that reaches here, so the
                // stub is unreachable for new entries.
                pool.retire(f.stub, true);
            }
            recs.push(s.rec);
        }
        (recs, result)
    }

    /// Switches each site at `addrs` to the mechanism its consumers want.
    pub(crate) fn apply_modes(&mut self, pool: &mut Pool, addrs: &[usize]) -> Result<()> {
        let fast_ok = self.fast_ok;
        let (mut to_fast, mut to_trap) = (Vec::new(), Vec::new());
        for a in addrs {
            let Some(s) = self.by_addr.get(a) else {
                continue;
            };
            match (s.wants_fast(fast_ok), s.jump.is_some_and(|f| f.head)) {
                (true, false) => to_fast.push(*a),
                (false, true) => to_trap.push(*a),
                _ => {}
            }
        }
        let back = self.switch_to_trap(pool, &to_trap);
        to_fast.retain(|a| self.prepare_jump(pool, *a).is_ok());
        back.and(self.switch_to_jump(pool, &to_fast))
    }

    /// Builds the fast stub of a site (not yet reachable).
    fn prepare_jump(&mut self, pool: &mut Pool, addr: usize) -> Result<()> {
        let s = self
            .by_addr
            .get(&addr)
            .ok_or(Error::Internal("no site to make fast".into()))?;
        if s.jump.is_some() {
            return Ok(());
        }
        let rec = PROBES
            .get(s.rec as usize)
            .ok_or(Error::Internal("probe record out of range".into()))?;
        // Ordering: Relaxed — the writer's own store.
        let tag = crate::fast::tag(s.rec, rec.gen.load(Ordering::Relaxed));
        let (orig, len, displaced) = (s.orig, s.len, s.displaced);
        let stub = pool.create_fast(&orig[..len as usize], addr, len, &displaced, tag)?;
        if let Some(s) = self.by_addr.get_mut(&addr) {
            s.jump = Some(FastJump {
                stub,
                tail: false,
                head: false,
            });
        }
        Ok(())
    }

    /// Trap → fast, for sites whose fast stub is prepared, in the steps of
    /// [`arch::TO_JUMP`]. A site whose write fails at some step goes no
    /// further, and is switched back.
    fn switch_to_jump(&mut self, pool: &mut Pool, addrs: &[usize]) -> Result<()> {
        let mut result = self.run_steps(arch::TO_JUMP, addrs, true);
        // Sites that did not make it stay on the trap path.
        let stuck: Vec<usize> = addrs
            .iter()
            .copied()
            .filter(|a| self.by_addr[a].jump.is_some_and(|f| !f.head))
            .collect();
        result = result.and(self.switch_to_trap(pool, &stuck));
        result
    }

    /// Fast → trap, in the steps of [`arch::TO_TRAP`]; then the fast stubs
    /// of the sites fully back are retired.
    fn switch_to_trap(&mut self, pool: &mut Pool, addrs: &[usize]) -> Result<()> {
        let result = self.run_steps(arch::TO_TRAP, addrs, false);
        for a in addrs {
            let Some(s) = self.by_addr.get_mut(a) else {
                continue;
            };
            if let Some(f) = s.jump.filter(|f| !f.head && !f.tail) {
                s.jump = None;
                pool.retire(f.stub, true);
            }
        }
        result
    }

    /// Runs a switching protocol over `addrs`: towards the jump (`to_jump`)
    /// or back. A serialising step runs only if a write came before it (the
    /// traps armed earlier count as one).
    fn run_steps(&mut self, steps: &[SwitchStep], addrs: &[usize], to_jump: bool) -> Result<()> {
        let mut result = Ok(());
        let mut live: Vec<usize> = addrs.to_vec();
        let mut dirty = !live.is_empty();
        for step in steps {
            let part = match step {
                SwitchStep::Serialise => {
                    if dirty {
                        membarrier::sync_core();
                        dirty = false;
                    }
                    continue;
                }
                SwitchStep::WriteHead => JumpPart::Head,
                SwitchStep::WriteTail => JumpPart::Tail,
            };
            let patches: Vec<Patch> = live
                .iter()
                .filter_map(|&a| self.part_patch(a, part, to_jump))
                .collect();
            let (r, done) = self.write_part(patches, part, to_jump);
            dirty |= done > 0;
            result = result.and(r);
            if to_jump {
                // Only sites whose part is now the jump's go on.
                live.retain(|a| {
                    self.by_addr
                        .get(a)
                        .and_then(|s| s.jump)
                        .is_some_and(|f| match part {
                            JumpPart::Head => f.head,
                            JumpPart::Tail => f.tail,
                        })
                });
            }
        }
        result
    }

    /// The bytes `part` of the site at `addr` takes in this direction, if it
    /// needs a write: the jump's towards the jump; back, the trap
    /// instruction (head) or the original bytes (tail, once the head is no
    /// longer the jump's).
    fn part_patch(&self, addr: usize, part: JumpPart, to_jump: bool) -> Option<Patch> {
        let s = self.by_addr.get(&addr)?;
        let f = s.jump?;
        let range = part.range();
        let bytes: Vec<u8> = match (to_jump, part) {
            (true, JumpPart::Head) if !f.head => arch::jump_to(addr, f.stub)?[range].to_vec(),
            (true, JumpPart::Tail) if !f.tail => arch::jump_to(addr, f.stub)?[range].to_vec(),
            (false, JumpPart::Head) if f.head => TRAP_INSN.to_vec(),
            (false, JumpPart::Tail) if f.tail && !f.head => s.orig[range].to_vec(),
            _ => return None,
        };
        Some(Patch::new(&s.target, addr + part.range().start, &bytes))
    }

    /// Writes one part of sites and records, for each site written, whether
    /// that part is now the jump's. Returns the write's result and how many
    /// sites were written.
    fn write_part(
        &mut self,
        mut patches: Vec<Patch>,
        part: JumpPart,
        jump: bool,
    ) -> (Result<()>, usize) {
        let mut done = Vec::new();
        let result = patch::write_all(&mut patches, &mut done);
        for d in &done {
            let site = d.addr - part.range().start;
            if let Some(f) = self.by_addr.get_mut(&site).and_then(|s| s.jump.as_mut()) {
                match part {
                    JumpPart::Head => f.head = jump,
                    JumpPart::Tail => f.tail = jump,
                }
            }
        }
        (result, done.len())
    }
}
