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
//! # Plans
//!
//! When a site is prepared, the layout of its function ([`crate::layout`])
//! decides its *plan*:
//!
//! - **fast-capable**: a run of whole instructions `[jump, end)` covering the
//!   jump can be displaced (one long enough instruction, or several when the
//!   function's flow proves no branch lands inside the run and no call in it
//!   returns inside it; at an `endbr64` entry the run starts after the
//!   `endbr64`, which stays, and `jump` is the probe address plus 4). The
//!   site gets a *site stub* holding the run relocated ([`crate::xol`]): the
//!   fast path enters it, and the trap path resumes in its displaced
//!   instructions, so the run is never executed in place once armed, and
//!   the jump can replace it at any moment;
//! - **trap only**: the first instruction is emulated on the trap path, or
//!   run from an out-of-line stub.
//!
//! The trap instruction, and the jump, are written at `jump` (the *patch
//! address*, the probe's key in the index); handlers see the probe address
//! as RIP.
//!
//! # Transitions
//!
//! - **plain → trap** ([`Sites::arm`]): the trap instruction over the
//!   instruction's head ([`arch::HEAD`]); one atomic write.
//! - **trap ⇄ fast**: a fast-capable site whose consumers all accept it
//!   becomes a jump to its stub. The bytes change in the order the
//!   architecture prescribes ([`arch::TO_JUMP`], [`arch::TO_TRAP`]: the
//!   int3-first protocol of cross-modifying code), with every core
//!   serialised between steps, so no thread ever runs a torn instruction; a
//!   thread arriving mid-switch executes the trap and takes the trap path.
//!   Before the jump's tail is written over a run of several instructions, a
//!   thread scan must show no thread between them: one preempted there
//!   before the site was armed, or whose context there is saved in a signal
//!   frame, would resume in the middle of the jump (see "Why this is
//!   correct"). Serialising is
//!   `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`; without it
//!   (old kernels) every site stays on the trap path.
//! - **trap → plain** ([`Sites::disarm`]): the original bytes back, only
//!   where the code still holds the trap probert wrote.
//!
//! The writer (`crate::writer`) decides when: it owns the probe records, the
//! index and the consumer lists, and calls these transitions in the order
//! its module docs give. Writer only: everything here runs under the writer
//! lock.
//!
//! # Why this is correct
//!
//! Writing the jump changes bytes `[jump, jump + 5)`. A thread executing
//! there must see an instruction that is wholly old or wholly new. At
//! `jump` itself that is the int3-first protocol. Inside the run, a thread
//! can only be at an instruction boundary of the run: it got there by
//! executing the run in place (the instructions before it), or by a branch,
//! a return or a resumed context. The flow analysis rules out branches and
//! returns into the run; once the site is armed, no thread executes the run
//! in place (the trap resumes in the stub, the jump enters the stub). So the
//! only threads that can be inside are those that were there before the
//! site was armed — running, preempted, stopped, or with a context saved in
//! a signal frame while another handler runs — and those an earlier plan of
//! a site here still sends there: a trap handler that looked up an older
//! record (it emulates the first instruction and resumes after it), and a
//! thread still running a retired stub that continues inside the run (the
//! stub of a demoted site, of a removed probe). The first kind is gone
//! after a grace period that begins once the site is armed (a handler
//! leaves its section only after writing where it resumes); then a thread
//! scan that sees every thread outside the run and outside every retired
//! stub (at `Depth::FramesRequired`, which walks saved signal frames, and
//! fails rather than guess; a frame whose trap has not been looked up yet
//! counts at its trap instruction too, where it resumes if the probe is
//! gone) proves there are none, for good. The way back writes the trap
//! over the head first; no thread is inside the run then either.

use std::cell::RefCell;

use crate::addr_hash::AddrMap;

use crate::arch::{self, Displaced, LeadingJump, SwitchStep, MAX_INSN_LEN, TRAP_INSN};
use crate::error::{Error, Result};
use crate::grace;
use crate::layout::Layouts;
use crate::patch::{self, Patch, Skipped};
use crate::region::{Regions, Target};
use crate::slab_map::SlabMap;
use crate::sys::code::CodeRead;
use crate::sys::{code, maps, membarrier, threads};
use crate::xol::{self, Pool, Stub};
use std::sync::Arc;

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

/// How a site is served.
#[derive(Clone, Copy, Debug)]
enum Plan {
    /// Trap only: the first instruction emulated, or run from `ool`.
    Trap { ool: Option<Stub> },
    /// Trap only, resuming in a site stub of the first instruction alone: a
    /// fast-capable site demoted because a probe was wanted inside its run
    /// ([`Sites::demote`]). Its record keeps saying "out of line" — the
    /// resume address is the one field that changes, so the trap path never
    /// reads a torn record.
    Demoted { stub: Stub },
    /// Fast-capable: the run `[patch, end)` relocated in `stub`; `run` when
    /// it holds more than one instruction. `exit`: a function's exit run,
    /// ending with the `ret` the site probes — its stub
    /// ([`arch::emit_exit_stub`]) runs the instructions before the `ret`,
    /// then calls the consumers, then returns; the trap path resumes there
    /// without calling them ([`Displaced::Deferred`]).
    Fast {
        stub: Stub,
        end: usize,
        run: bool,
        exit: bool,
    },
}

impl Plan {
    /// Where the site's jump goes.
    fn jump_target(self) -> Option<usize> {
        match self {
            Plan::Fast {
                stub, exit: true, ..
            } => Some(stub.addr),
            Plan::Fast { stub, .. } => Some(arch::stub_entry(stub.addr)),
            _ => None,
        }
    }
}

/// Which parts of the jump are in the code now (fast-capable sites).
#[derive(Clone, Copy, Debug, Default)]
struct JumpState {
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

/// The consumer records of a site: nearly always one, kept inline.
#[derive(Debug, Default)]
pub(crate) struct ConsumerIds {
    /// The first, if any.
    first: Option<u32>,
    rest: Vec<u32>,
}

impl ConsumerIds {
    pub(crate) fn push(&mut self, id: u32) {
        if self.first.is_none() {
            self.first = Some(id);
        } else {
            self.rest.push(id);
        }
    }

    /// Removes `id` (every occurrence), keeping the others in order.
    pub(crate) fn remove(&mut self, id: u32) {
        self.rest.retain(|&c| c != id);
        if self.first == Some(id) {
            self.first = if self.rest.is_empty() {
                None
            } else {
                Some(self.rest.remove(0))
            };
        }
        if self.rest.is_empty() {
            self.rest = Vec::new();
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &u32> + '_ {
        self.first.iter().chain(self.rest.iter())
    }
}

/// One patched site.
pub(crate) struct Site {
    /// Its probe record (`probe::PROBES`).
    pub rec: u32,
    /// Where its trap instruction and its jump are.
    pub patch: usize,
    /// The original bytes from `patch`, written back on disarm.
    orig: [u8; MAX_INSN_LEN],
    /// How many bytes of `orig` are the original code.
    orig_len: u8,
    pub target: Arc<Target>,
    plan: Plan,
    /// The consumers attached here.
    pub consumers: ConsumerIds,
    /// Consumers that asked for the trap path ([`Mode::Trap`]).
    pub pins: u32,
    /// Consumers that asked for the fast path ([`Mode::Fast`]).
    pub fast_pins: u32,
    jump: JumpState,
    /// Why the site cannot be fast, if it cannot.
    trap_only: Option<TrapOnly>,
    /// Set when the code no longer holds what probert wrote (the host
    /// rewrote, freed or unloaded it): the site is *retired* — nothing is
    /// written there again, its stubs are retired, and it stays only so
    /// that its consumers' handles work until they are detached.
    lost: Option<Skipped>,
}

impl Site {
    fn wants_fast(&self, fast_ok: bool) -> bool {
        fast_ok
            && self.lost.is_none()
            && matches!(self.plan, Plan::Fast { .. })
            && self.pins == 0
            && !self.consumers.is_empty()
    }

    /// Whether the site is retired, and why (see [`Site::lost`]'s field).
    pub(crate) fn lost(&self) -> Option<Skipped> {
        self.lost
    }

    /// The bytes probert's code holds at the patch address now: the head
    /// of the jump, or the trap.
    fn head_now(&self) -> Option<u8> {
        match (&self.plan, self.jump.head) {
            (Plan::Fast { stub, .. }, true) => {
                arch::jump_to(self.patch, arch::stub_entry(stub.addr)).map(|j| j[0])
            }
            _ => TRAP_INSN.first().copied(),
        }
    }

    /// The mechanism serving the site now.
    pub(crate) fn mode(&self) -> Mode {
        if self.jump.head {
            Mode::Fast
        } else {
            Mode::Trap
        }
    }

    /// Whether the site can be fast (its consumers permitting).
    pub(crate) fn fast_capable(&self) -> bool {
        self.trap_only.is_none()
    }

    /// The displaced run `[patch, end)` of a fast-capable site.
    fn run(&self) -> Option<(usize, usize)> {
        match self.plan {
            Plan::Fast { end, .. } => Some((self.patch, end)),
            Plan::Trap { .. } | Plan::Demoted { .. } => None,
        }
    }
}

/// Why a site is trap only: kept compact in a [`Site`] (the message is made
/// when a FAST request asks, [`Sites::refusal`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TrapOnly {
    /// Its function's flow proves no run here (re-derived for the message).
    Flow,
    /// No layout is known and the instruction is shorter than the jump.
    Short,
    /// Cores cannot be serialised (no `MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE`).
    NoSyncCore,
    /// Another probe, at this address, lies inside the run.
    ProbeInside(usize),
    /// Its stub could not be built.
    Stub,
}

impl TrapOnly {
    /// The message, given the flow's refusal for [`TrapOnly::Flow`].
    fn text(self, flow: Option<String>) -> String {
        match self {
            TrapOnly::Flow => flow.unwrap_or_else(|| {
                "its function's flow proves no run of whole instructions here".into()
            }),
            TrapOnly::Short => "its function's layout is unknown and its instruction is shorter \
                                than the jump"
                .into(),
            TrapOnly::NoSyncCore => {
                "fast probes need membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE), which \
                 this kernel does not offer"
                    .into()
            }
            TrapOnly::ProbeInside(x) => {
                format!(
                    "another probe, at {x:#x}, is inside the instructions its jump would displace"
                )
            }
            TrapOnly::Stub => "its stub could not be built".into(),
        }
    }
}

/// A site decoded and checked, not yet built (no stub) nor written.
pub(crate) struct PreparedSite {
    /// The probed address.
    pub probe: usize,
    /// Where the trap and the jump go.
    pub patch: usize,
    /// The original code from `patch`: the first instruction, or the whole
    /// run of a fast-capable site.
    code: Vec<u8>,
    pub len: u8,
    pub displaced: Displaced,
    pub target: Arc<Target>,
    /// The run `[patch, end)` if fast-capable.
    run: Option<usize>,
    /// Why it is trap only, if it is (the flow's refusal with it).
    trap_only: Option<(TrapOnly, Option<arch::Refusal>)>,
    /// A function's exit run: the length of the `ret` it ends with (the
    /// site probes that `ret`; `patch` starts the run).
    exit: Option<usize>,
    /// For an exit run: the plain site at the `ret`, should its stub not be
    /// built.
    fallback: Option<Box<PreparedSite>>,
}

impl PreparedSite {
    /// Why this site cannot be fast, or `None`.
    pub(crate) fn refusal(&self) -> Option<String> {
        self.trap_only
            .as_ref()
            .map(|(k, r)| k.text(r.as_ref().map(ToString::to_string)))
    }

    /// The run it would displace, if fast-capable.
    pub(crate) fn run(&self) -> Option<(usize, usize)> {
        self.run.map(|end| (self.patch, end))
    }

    /// Whether it is a function's exit run ([`Sites::prepare_exit`]).
    pub(crate) fn is_exit(&self) -> bool {
        self.exit.is_some()
    }

    /// The bytes it displaces or traps at: its run, or its first
    /// instruction.
    pub(crate) fn span(&self) -> (usize, usize) {
        self.run()
            .unwrap_or((self.patch, self.patch + usize::from(self.len)))
    }

    /// Makes it trap-only, saying why. An exit run becomes its fallback,
    /// the plain site at the `ret` (itself fast-capable only as a run of
    /// its own, which a `ret` never is).
    pub(crate) fn refuse_fast(&mut self, why: TrapOnly) {
        if let Some(plain) = self.fallback.take() {
            *self = *plain;
        }
        self.run = None;
        self.trap_only.get_or_insert((why, None));
    }
}

/// The plan a demoted site had: its stub is retired with [`Retired::retire`]
/// once nothing can send a thread there any more.
pub(crate) struct Retired(Plan);

impl Retired {
    /// Retires the stub into `pool`.
    pub(crate) fn retire(self, pool: &mut Pool) {
        self.0.retire(pool);
    }

    /// The stub's bytes, for a scan that must see every thread outside it.
    pub(crate) fn range(&self) -> Option<(usize, usize)> {
        match self.0 {
            Plan::Fast { stub, .. } | Plan::Demoted { stub } | Plan::Trap { ool: Some(stub) } => {
                Some((stub.addr, stub.addr + stub.len()))
            }
            Plan::Trap { ool: None } => None,
        }
    }
}

/// What [`Sites::prepare`] found at an address.
pub(crate) enum Prepared {
    /// A new site, decoded and checked.
    Site(PreparedSite),
    /// An instruction inside the displaced run of the fast-capable site at
    /// this probe address: that site must be demoted first
    /// ([`Sites::demote`]).
    InsideRun(usize),
}

/// Whether the flow of a function shows `addr` inside an instruction (past
/// the end of its linear decode nothing is known: not misaligned).
fn misaligned(f: &arch::FunctionFlow, addr: usize) -> bool {
    addr < f.decoded_end() && !f.is_boundary(addr)
}

/// A prepared site with its stub: what the probe record must say.
pub(crate) struct BuiltSite {
    pub prepared: PreparedSite,
    plan: Plan,
}

impl BuiltSite {
    /// Where the trap path resumes for an instruction it does not emulate.
    pub(crate) fn resume_stub(&self) -> usize {
        match self.plan {
            Plan::Trap { ool } => ool.map_or(0, |s| s.addr),
            Plan::Fast {
                stub, exit: true, ..
            } => stub.addr,
            Plan::Fast { stub, .. } | Plan::Demoted { stub } => arch::stub_resume(stub.addr),
        }
    }

    /// How the trap path gets past the site: a fast-capable site always
    /// resumes in its stub.
    pub(crate) fn displaced(&self) -> Displaced {
        match self.plan {
            Plan::Trap { .. } => self.prepared.displaced,
            Plan::Fast { exit: true, .. } => Displaced::Deferred,
            Plan::Fast { .. } | Plan::Demoted { .. } => Displaced::OutOfLine,
        }
    }

    /// Frees its stub; it was never published.
    pub(crate) fn unbuild(self, pool: &mut Pool) -> PreparedSite {
        match self.plan {
            Plan::Trap { ool: Some(s) }
            | Plan::Fast { stub: s, .. }
            | Plan::Demoted { stub: s } => pool.free_unpublished(s),
            Plan::Trap { ool: None } => {}
        }
        self.prepared
    }

    /// Retires its stub after it may have been published (a thread may have
    /// trapped and be inside it).
    pub(crate) fn retire(self, pool: &mut Pool) {
        self.plan.retire(pool);
    }
}

impl Plan {
    /// Retires its stub, which may have been published: a stub the fast
    /// path may jump into needs the longer wait (see [`crate::xol`]).
    fn retire(self, pool: &mut Pool) {
        match self {
            Plan::Trap { ool: Some(s) } | Plan::Demoted { stub: s } => pool.retire(s, false),
            Plan::Fast { stub, .. } => pool.retire(stub, true),
            Plan::Trap { ool: None } => {}
        }
    }
}

/// Whether `addr` is probert's own code (the trap path, the writer, the
/// stubs), which must never be probed. `probert_symbol`: the enclosing
/// function's symbol is probert's.
fn is_probert_code(pool: &Pool, addr: usize, probert_symbol: bool) -> bool {
    let (lo, hi) = crate::fast::code_range();
    probert_symbol || pool.contains(addr) || (lo..hi).contains(&addr)
}

/// Code read during one writer operation, by page: a batch of probes in the
/// same functions reads each page once, not each instruction.
#[derive(Default)]
struct PageReads {
    pages: AddrMap<usize, Option<Box<[u8]>>>,
}

impl PageReads {
    /// The bytes of `[start, end)`, `None` if any of them cannot be read.
    fn read(&mut self, start: usize, end: usize) -> Option<Vec<u8>> {
        if end <= start {
            return Some(Vec::new());
        }
        let page = maps::page_size();
        // Long reads (a whole function's layout) go directly.
        if end - start > 4 * page {
            return code::read_code_checked(start, end);
        }
        let mut out = Vec::with_capacity(end - start);
        let mut at = start;
        while at < end {
            let p = at / page * page;
            let bytes = self
                .pages
                .entry(p)
                .or_insert_with(|| code::read_code_checked(p, p + page).map(Vec::into_boxed_slice))
                .as_deref();
            let Some(bytes) = bytes else {
                // Part of the page may still be readable (a region's last
                // page): read exactly what was asked.
                return code::read_code_checked(start, end);
            };
            let upto = end.min(p + page);
            out.extend_from_slice(&bytes[at - p..upto - p]);
            at = upto;
        }
        Some(out)
    }
}

/// Sites [`Sites::disarm`] kept because their write failed, with the error.
pub(crate) type Kept = Vec<(usize, Error)>;

/// Every patched site, by probed address. Writer only.
#[derive(Default)]
pub(crate) struct Sites {
    by_probe: SlabMap<Site>,
    /// Code read in the current writer operation.
    reads: RefCell<PageReads>,
    /// Instruction layouts of the functions probes went into.
    layouts: Layouts,
    /// Whether cores can be serialised after code changes (fast sites).
    fast_ok: bool,
    /// Sites retired since the writer last took them ([`Sites::retire_lost`]).
    lost_pending: Vec<usize>,
    /// Bytes that [`Sites::original_code`] reports instead of the code's
    /// (the host's new bytes under a trap kept while a probe is re-derived).
    overlay: Vec<(usize, u8)>,
    /// How long a switch to the jump waits for threads to leave a run:
    /// scans, and the timeout of each.
    patience: (usize, std::time::Duration),
}

/// What a switch waits for threads to leave a run by default: three scans of
/// 200 ms (a thread seen inside is asked again until it leaves).
const PATIENCE: (usize, std::time::Duration) = (3, std::time::Duration::from_millis(200));

/// Farthest a site's patch address lies after its probe address (after an
/// `endbr64`).
const PATCH_AFTER_PROBE: usize = 4;
/// Farthest a site's patch address lies before its probe address: an exit
/// run, which ends with the `ret` it probes, holds at most this many bytes
/// (its original bytes are kept in [`Site::orig`]).
pub(crate) const PATCH_BEFORE_PROBE: usize = MAX_INSN_LEN;

impl Sites {
    /// No sites; fast sites only if `fast_ok` (cores can be serialised).
    pub(crate) fn new(fast_ok: bool) -> Sites {
        Sites {
            fast_ok,
            patience: PATIENCE,
            ..Sites::default()
        }
    }

    pub(crate) fn get(&self, probe: usize) -> Option<&Site> {
        self.by_probe.get(&probe)
    }

    pub(crate) fn get_mut(&mut self, probe: usize) -> Option<&mut Site> {
        self.by_probe.get_mut(&probe)
    }

    pub(crate) fn contains(&self, probe: usize) -> bool {
        self.by_probe.contains_key(&probe)
    }

    pub(crate) fn len(&self) -> usize {
        self.by_probe.len()
    }

    /// The sites whose probed address is in `[start, end)`.
    pub(crate) fn range(&self, start: usize, end: usize) -> impl Iterator<Item = (usize, &Site)> {
        self.by_probe.range(start..end).map(|(&a, s)| (a, s))
    }

    /// Forgets the code read so far (at the edges of a writer operation).
    pub(crate) fn forget_reads(&mut self) {
        self.reads.get_mut().pages.clear();
        self.layouts.forget_generation();
    }

    /// Forgets a region's layout (the region is gone).
    pub(crate) fn forget_region(&mut self, id: crate::region::RegionId) {
        self.layouts.forget_region(id);
    }

    /// The site whose displaced run holds `addr` strictly after its patch
    /// address (such an address cannot take a trap while that site exists).
    pub(crate) fn run_holding(&self, addr: usize) -> Option<(usize, &Site)> {
        // Runs are at most a few instructions: look back a little.
        // An exit run lies before its probe, and holds its own start too
        // (the probe is at its end).
        let from = addr.saturating_sub(4 * MAX_INSN_LEN);
        self.by_probe
            .range(from..=addr.saturating_add(PATCH_BEFORE_PROBE))
            .rev()
            .find(|(&a, s)| {
                s.run()
                    .is_some_and(|(j, e)| (j < addr || (j == addr && a != addr)) && addr < e)
            })
            .map(|(&a, s)| (a, s))
    }

    /// Reads the original code of `[start, end)`: the code as it is, with
    /// the bytes of every site replaced by the ones probert displaced.
    /// `None` where the memory cannot be read.
    pub(crate) fn original_code(&self, start: usize, end: usize) -> Option<Vec<u8>> {
        let mut bytes = self.reads.borrow_mut().read(start, end)?;
        let from = start.saturating_sub(arch::JUMP_LEN + PATCH_AFTER_PROBE);
        let to = end.saturating_add(PATCH_BEFORE_PROBE);
        for s in self.by_probe.range(from..to).map(|(_, s)| s) {
            // Every byte probert may have changed there, whatever the
            // site's state now (a page read earlier in this operation may
            // hold an older state).
            let changed = usize::from(s.orig_len).min(arch::JUMP_LEN);
            for (i, &orig) in s.orig.iter().enumerate().take(changed) {
                if let Some(b) = (s.patch + i)
                    .checked_sub(start)
                    .and_then(|k| bytes.get_mut(k))
                {
                    *b = orig;
                }
            }
        }
        for &(at, v) in &self.overlay {
            if let Some(b) = at.checked_sub(start).and_then(|k| bytes.get_mut(k)) {
                *b = v;
            }
        }
        Some(bytes)
    }

    /// Runs `f` on the flow of the function around `addr` (in `target`),
    /// analysing it first if needed; `None` where no function is known.
    fn with_flow<R>(
        &mut self,
        regions: &Regions,
        target: &Target,
        addr: usize,
        f: impl FnOnce(&arch::FunctionFlow) -> R,
    ) -> Option<R> {
        let mut layouts = std::mem::take(&mut self.layouts);
        let r = {
            let this: &Sites = self;
            let original = |s: usize, e: usize| this.original_code(s, e);
            match target.region {
                Some(id) => layouts
                    .region_flow(
                        id,
                        regions.functions(id),
                        (target.start, target.end),
                        addr,
                        &original,
                    )
                    .map(f),
                None => layouts.module_flow(addr, &original).map(f),
            }
        };
        self.layouts = layouts;
        r
    }

    /// Why the site at `probe` cannot be fast (`None` if it can).
    pub(crate) fn refusal(&mut self, regions: &Regions, probe: usize) -> Option<String> {
        let why = self.by_probe.get(&probe)?.trap_only?;
        let flow = match why {
            TrapOnly::Flow => regions.resolve(probe).ok().and_then(|r| {
                self.with_flow(regions, &r.target, probe, |f| {
                    f.displaceable(probe).err().map(|r| r.to_string())
                })
                .flatten()
            }),
            _ => None,
        };
        Some(why.text(flow))
    }

    /// Whether `addr` is the first instruction of a function probert knows
    /// (module code with a known extent, or a JIT function); `Err` with
    /// the function's start when it lies inside one.
    pub(crate) fn function_entry(&mut self, regions: &Regions, addr: usize) -> Result<()> {
        let target = regions.resolve(addr)?.target;
        match self.with_flow(regions, &target, addr, |f| f.start()) {
            Some(start) if start == addr => Ok(()),
            Some(start) => Err(Error::Misaligned { addr, func: start }),
            None => Err(Error::unsupported(
                addr,
                "return probes need the function's extent, and none is known here",
            )),
        }
    }

    /// The `ret`s that end invocations of the function at `entry` — its
    /// own, and those of the functions it leaves for by tail jumps,
    /// transitively (`arch::function_exits`) — with each one's immediate;
    /// and whether one of those jumps goes to `entry` (its invocations may
    /// chain: see `crate::shadow`).
    pub(crate) fn exits(
        &mut self,
        regions: &Regions,
        entry: usize,
    ) -> Result<(Vec<(usize, u16)>, bool)> {
        const MOST_FUNCTIONS: usize = 512;
        let mut todo = vec![entry];
        let mut seen: Vec<usize> = Vec::new();
        let mut seen_jumps: Vec<usize> = Vec::new();
        let mut rets: Vec<usize> = Vec::new();
        let mut reenters = false;
        // Follows a jump through the code-pointer slot at `slot` to the
        // function it holds.
        let through = |slot: usize, todo: &mut Vec<usize>, reenters: &mut bool| {
            let mut word = [0u8; 8];
            if crate::sys::peek::read_memory(slot, &mut word).is_err() {
                return Err(Error::unsupported(
                    entry,
                    format!("its tail jump through {slot:#x} cannot be followed"),
                ));
            }
            // A null slot is a jump never taken (it would fault, not
            // return): the lazy-binding path of a PLT stub leaves for PLT0,
            // whose `jmp *GOT[2]` is null when the module was bound eagerly
            // (BIND_NOW, dlopen RTLD_NOW).
            match usize::from_le_bytes(word) {
                0 => {}
                target => {
                    *reenters |= target == entry;
                    todo.push(target);
                }
            }
            Ok(())
        };
        while let Some(at) = todo.pop() {
            let target = regions.resolve(at)?.target;
            let found = self.with_flow(regions, &target, at, |f| (f.start(), f.end()));
            // Code that begins with a jump out (a PLT stub) leaves at once:
            // its exits are its target's. Its "function" is not decoded —
            // for a stub, that would be the whole `.plt`, every other stub
            // too. (Fewer bytes where the mapping ends sooner: a stub's jump
            // ends at most 11 bytes in.)
            let head = self
                .original_code(at, at + 2 * MAX_INSN_LEN)
                .or_else(|| self.original_code(at, at + 16))
                .and_then(|code| arch::leading_jump(&code, at))
                .filter(|&jump| match (jump, found) {
                    // A function entered by a jump to its own loop, say.
                    (LeadingJump::To(t), Some((start, end))) => !(start..end).contains(&t),
                    // `push imm; jmp` at a function's own start is its code,
                    // not the lazy half of a PLT entry (which no function
                    // covers, or only the `.plt`'s).
                    (LeadingJump::Unbound, Some((start, _))) => start != at,
                    _ => true,
                });
            let function = match (head, found) {
                (Some(_), _) => None,
                (None, Some(f)) => Some(f),
                (None, None) => {
                    return Err(Error::unsupported(
                        entry,
                        format!(
                            "a return probe must follow the tail jump to {at:#x}, and no \
                             function is known there"
                        ),
                    ))
                }
            };
            // Stops where only the leading jump is followed are kept apart
            // from decoded functions: a function that begins with a jump out
            // may still be entered further in (by a jump back from its
            // target), and must then be decoded whole.
            let visited = seen.len() + seen_jumps.len();
            let (list, key) = match function {
                Some((start, _)) => (&mut seen, start),
                None => (&mut seen_jumps, at),
            };
            if list.contains(&key) {
                continue;
            }
            if visited >= MOST_FUNCTIONS {
                return Err(Error::unsupported(
                    entry,
                    "its tail jumps reach too many functions for a return probe",
                ));
            }
            list.push(key);
            let Some((start, end)) = function else {
                match head {
                    Some(LeadingJump::To(t)) => {
                        reenters |= t == entry;
                        todo.push(t);
                    }
                    Some(LeadingJump::Through(slot)) => through(slot, &mut todo, &mut reenters)?,
                    Some(LeadingJump::Unbound) => {
                        return Err(Error::unsupported(
                            entry,
                            format!(
                                "a return probe must follow its tail jump to {at:#x}, a PLT \
                                 entry the dynamic loader has not bound yet (lazy binding): \
                                 call the function once before attaching, or run the program \
                                 with LD_BIND_NOW=1"
                            ),
                        ));
                    }
                    None => {}
                }
                continue;
            };
            let code = self.original_code(start, end).ok_or(Error::Protect {
                addr: start,
                reason: "the code cannot be read".into(),
            })?;
            let exits = self
                .with_flow(regions, &target, start, |f| arch::function_exits(&code, f))
                .ok_or(Error::Internal("a function's flow vanished".into()))?
                .map_err(|e| {
                    Error::unsupported(
                        entry,
                        format!("a return probe cannot find every return of it: {e}"),
                    )
                })?;
            rets.extend(exits.rets);
            reenters |= exits.leaves.contains(&entry);
            todo.extend(exits.leaves);
            for slot in exits.slots {
                through(slot, &mut todo, &mut reenters)?;
            }
        }
        rets.sort_unstable();
        rets.dedup();
        let rets = rets
            .into_iter()
            .map(|r| {
                let b = self.original_code(r, r + MAX_INSN_LEN).unwrap_or_default();
                match arch::analyze(&b, r).map(|d| d.displaced) {
                    Ok(Displaced::Ret { pop }) => Ok((r, pop)),
                    _ => Err(Error::Internal(format!("{r:#x} is not a near ret").into())),
                }
            })
            .collect::<Result<_>>()?;
        Ok((rets, reenters))
    }

    /// The instruction starts of the function around `addr`, from its whole
    /// decode (up to where decoding stopped).
    pub(crate) fn instructions(&mut self, regions: &Regions, addr: usize) -> Result<Vec<usize>> {
        let target = regions.resolve(addr)?.target;
        self.with_flow(regions, &target, addr, |f| {
            f.boundaries()
                .take_while(|&b| b < f.decoded_end())
                .collect()
        })
        .ok_or(Error::NoRegion { addr })
    }

    /// Decodes and checks the instruction at `addr` and decides its plan.
    /// Nothing is built or written.
    pub(crate) fn prepare(
        &mut self,
        regions: &Regions,
        pool: &Pool,
        addr: usize,
    ) -> Result<Prepared> {
        let resolved = regions.resolve(addr)?;
        let (target, func_start) = (resolved.target, resolved.func_start);
        if is_probert_code(pool, addr, resolved.probert_symbol) {
            return Err(Error::InvalidArgument(
                format!("{addr:#x} is inside probert's own code").into(),
            ));
        }
        if let Some(name) = resolved.signal_callee {
            return Err(Error::InvalidArgument(
                format!(
                    "{addr:#x} is inside {name}, which probert's own handlers may call: a probe \
                     there would trap inside the handler serving it"
                )
                .into(),
            ));
        }
        // The function's layout: every instruction boundary, and which run a
        // jump may displace here.
        let flow = self.with_flow(regions, &target, addr, |f| {
            (misaligned(f, addr), f.displaceable(addr))
        });
        let (flow_run, flow_refusal) = match flow {
            Some((true, _)) => {
                return Err(Error::Misaligned {
                    addr,
                    func: func_start.unwrap_or(target.start),
                })
            }
            Some((false, Ok(site))) => (Some(site), None),
            Some((false, Err(r))) => (None, Some(r)),
            None => (None, None),
        };
        if let Some((holder, _)) = self.run_holding(addr) {
            return Ok(Prepared::InsideRun(holder));
        }
        let end = target.end.min(addr + MAX_INSN_LEN);
        let insn = self.original_code(addr, end).ok_or(Error::Protect {
            addr,
            reason: "the code cannot be read".into(),
        })?;
        if flow_run.is_none() && flow_refusal.is_none() {
            // No layout (code outside any known function): check what can be
            // checked from the function start, if known.
            if let Some(func) = func_start.filter(|&f| f < addr) {
                let bytes = self.original_code(func, end).unwrap_or_default();
                arch::check_boundary(&bytes, func, addr)?;
            }
        }
        if insn.starts_with(TRAP_INSN) {
            return Err(Error::Conflict { addr });
        }
        let decoded = arch::analyze(&insn, addr)?;
        // The run a jump displaces: the flow's; or, without a layout, one
        // instruction long enough for the jump.
        let (patch, run, trap_only) = match (flow_run, flow_refusal) {
            (Some(s), _) => (s.jump, Some(s.end), None),
            (None, Some(r)) => (addr, None, Some((TrapOnly::Flow, Some(r)))),
            (None, None) if arch::fast_eligible(decoded.len, &decoded.displaced) => {
                (addr, Some(addr + usize::from(decoded.len)), None)
            }
            (None, None) => (addr, None, Some((TrapOnly::Short, None))),
        };
        let code = match run {
            Some(e) => self.original_code(patch, e),
            None if patch == addr => Some(insn[..usize::from(decoded.len)].to_vec()),
            None => None,
        }
        .ok_or(Error::Protect {
            addr: patch,
            reason: "the code cannot be read".into(),
        })?;
        let (len, displaced) = if patch == addr {
            (decoded.len, decoded.displaced)
        } else {
            let d = arch::analyze(&code, patch)?;
            (d.len, d.displaced)
        };
        let trap_only = if self.fast_ok || run.is_none() {
            trap_only
        } else {
            Some((TrapOnly::NoSyncCore, None))
        };
        Ok(Prepared::Site(PreparedSite {
            probe: addr,
            patch,
            code,
            len,
            displaced,
            target,
            run: if self.fast_ok { run } else { None },
            trap_only,
            exit: None,
            fallback: None,
        }))
    }

    /// Prepares the site of the exit consumers at `ret`, a function's `ret`:
    /// where the function's flow allows, an *exit run* — the fewest whole
    /// instructions before the `ret`, with it, covering the jump — whose
    /// stub runs them, calls the consumers at the `ret` and returns; else
    /// the plain site at `ret` ([`Sites::prepare`]), which is also the
    /// fallback should the stub not be built. `others`: the other addresses
    /// of the batch, sorted; an exit run holds none of them, nor any byte
    /// of another site.
    pub(crate) fn prepare_exit(
        &mut self,
        regions: &Regions,
        pool: &Pool,
        ret: usize,
        others: &[usize],
    ) -> Result<Prepared> {
        let Prepared::Site(plain) = self.prepare(regions, pool, ret)? else {
            return self.prepare(regions, pool, ret);
        };
        let ret_len = usize::from(plain.len);
        let end = ret + ret_len;
        if !self.fast_ok || !matches!(plain.displaced, Displaced::Ret { .. }) {
            return Ok(Prepared::Site(plain));
        }
        let lowest = end.saturating_sub(PATCH_BEFORE_PROBE);
        let run = self.with_flow(regions, &plain.target, ret, |f| {
            // The function's last `ret` with the padding after it, where
            // there is enough: the `ret` alone is displaced.
            if let Some(site) = f.exit_into_padding(ret) {
                return Some((ret, site.end, vec![ret]));
            }
            // Else the shortest run: from the last instruction start that
            // leaves room for the jump; never the function's entry, where
            // its entry probe goes (a probe inside an exit run is refused:
            // see `demote`).
            let x = (lowest.max(f.start() + 1)..=end.checked_sub(arch::JUMP_LEN)?)
                .rev()
                .find(|&x| f.is_boundary(x))?;
            let site = f.run_through(x, end).ok()?;
            let starts: Vec<usize> = (x..end).filter(|&a| f.is_boundary(a)).collect();
            Some((site.jump, end, starts))
        });
        let Some(Some((x, run_end, starts))) = run else {
            return Ok(Prepared::Site(plain));
        };
        let batch_inside = others[others.partition_point(|&a| a < x)..]
            .iter()
            .take_while(|&&a| a < run_end)
            .any(|&a| a != ret);
        let site_inside = self
            .by_probe
            .range(
                x.saturating_sub(arch::JUMP_LEN + PATCH_AFTER_PROBE)..run_end + PATCH_BEFORE_PROBE,
            )
            .any(|(_, s)| {
                let (a, b) = s
                    .run()
                    .unwrap_or((s.patch, s.patch + usize::from(s.orig_len)));
                a < run_end && x < b.max(s.patch + 1)
            });
        // A foreign trap in the run would trap in the stub instead.
        let code = self.original_code(x, run_end).filter(|c| {
            !starts
                .iter()
                .any(|&a| c.get(a - x..).is_some_and(|b| b.starts_with(TRAP_INSN)))
        });
        let Some(code) = code.filter(|_| !batch_inside && !site_inside) else {
            return Ok(Prepared::Site(plain));
        };
        let first = arch::analyze(&code, x)?;
        Ok(Prepared::Site(PreparedSite {
            probe: ret,
            patch: x,
            code,
            len: first.len,
            displaced: first.displaced,
            target: plain.target.clone(),
            run: Some(run_end),
            trap_only: None,
            exit: Some(ret_len),
            fallback: Some(Box::new(plain)),
        }))
    }

    /// Builds a prepared site's stub for probe record `record`: the site
    /// stub of a fast-capable site (if it cannot be built, the site is trap
    /// only), or the out-of-line stub its first instruction needs.
    pub(crate) fn build(
        &mut self,
        pool: &mut Pool,
        mut p: PreparedSite,
        record: usize,
    ) -> Result<BuiltSite> {
        if let (Some(end), Some(ret_len)) = (p.run, p.exit) {
            // The instructions up to the `ret`'s end (padding after it, where
            // the jump took some, is not run).
            let upto = (p.probe + ret_len - p.patch).min(p.code.len());
            match pool.create_exit(&p.code[..upto], p.patch, ret_len, record) {
                Ok(stub) => {
                    return Ok(BuiltSite {
                        prepared: p,
                        plan: Plan::Fast {
                            stub,
                            end,
                            run: true,
                            exit: true,
                        },
                    });
                }
                // The plain site at the `ret` instead.
                Err(_) => match p.fallback.take() {
                    Some(plain) => return self.build(pool, *plain, record),
                    None => return Err(Error::Internal("an exit site without a fallback".into())),
                },
            }
        }
        if let Some(end) = p.run {
            match pool.create_site(&p.code, p.patch, record) {
                Ok(stub) => {
                    let run = end - p.patch > usize::from(p.len);
                    return Ok(BuiltSite {
                        prepared: p,
                        plan: Plan::Fast {
                            stub,
                            end,
                            run,
                            exit: false,
                        },
                    });
                }
                Err(_) => p.refuse_fast(TrapOnly::Stub),
            }
        }
        let ool = match p.displaced {
            Displaced::OutOfLine => {
                let one = &p.code[..usize::from(p.len).min(p.code.len())];
                Some(pool.create(one, p.patch)?)
            }
            _ => None,
        };
        Ok(BuiltSite {
            prepared: p,
            plan: Plan::Trap { ool },
        })
    }

    /// Plain → trap for every built site: writes the trap instructions.
    /// On error, the traps written are restored (the sites stay plain) and
    /// the patch address of the site that failed is returned with the
    /// error.
    pub(crate) fn arm(&mut self, built: &[BuiltSite]) -> std::result::Result<(), (usize, Error)> {
        let mut patches: Vec<Patch> = built
            .iter()
            .map(|b| {
                let p = &b.prepared;
                let head = &p.code[arch::HEAD.start..arch::HEAD.end.min(p.code.len())];
                Patch::new(&p.target, p.patch, TRAP_INSN, head, p.patch).placing()
            })
            .collect();
        let written = patch::write_all_undoable(&mut patches);
        if written.complete() {
            return Ok(());
        }
        // All or nothing: the traps written go again.
        let _ = patch::write_all(&mut written.undo.clone());
        let (failed, e) = match (written.failed.first(), written.skipped.first()) {
            (Some((at, e)), _) => (*at, e.clone()),
            (None, Some(&(at, why))) => (
                at,
                Error::Protect {
                    addr: at,
                    reason: match why {
                        Skipped::Gone => "the code is no longer mapped".into(),
                        Skipped::NotOurs => "the code changed while the probe was attached".into(),
                    },
                },
            ),
            (None, None) => (
                0,
                Error::Internal("an incomplete write without a cause".into()),
            ),
        };
        Err((failed, e))
    }

    /// The probes whose displaced bytes overlap `[start, end)`.
    pub(crate) fn affected(&self, start: usize, end: usize) -> Vec<usize> {
        let from = start.saturating_sub(MAX_INSN_LEN + PATCH_AFTER_PROBE);
        self.by_probe
            .range(from..end)
            .filter(|(_, s)| {
                let len = usize::from(s.orig_len).max(1);
                s.lost.is_none() && s.patch < end && start < s.patch + len
            })
            .map(|(&a, _)| a)
            .collect()
    }

    /// Switches fast sites back to their trap ([`arch::TO_TRAP`]).
    pub(crate) fn switch_back(&mut self, probes: &[usize]) -> Result<()> {
        self.switch_to_trap(probes)
    }

    /// The patch address and original head byte of a site.
    pub(crate) fn head_of(&self, probe: usize) -> Option<(usize, u8)> {
        self.by_probe.get(&probe).map(|s| (s.patch, s.orig[0]))
    }

    /// Takes a site out, to re-derive it ([`Sites::insert_rederived`]) or put
    /// it back ([`Sites::put_back`]).
    pub(crate) fn take(&mut self, probe: usize) -> Option<Site> {
        self.by_probe.remove(&probe)
    }

    /// Puts back a site [`Sites::take`] took.
    pub(crate) fn put_back(&mut self, site: Site, probe: usize) {
        self.by_probe.insert(probe, site);
    }

    /// Sets the bytes [`Sites::original_code`] reports at some addresses
    /// (empty: none).
    pub(crate) fn set_overlay(&mut self, overlay: Vec<(usize, u8)>) {
        self.overlay = overlay;
        self.forget_reads();
    }

    /// Records a re-derived site under record `rec`, with `old`'s consumers;
    /// `old`'s stubs are retired into `pool`. Returns `old`'s record.
    pub(crate) fn insert_rederived(
        &mut self,
        b: BuiltSite,
        rec: u32,
        old: Site,
        pool: &mut Pool,
    ) -> u32 {
        let probe = b.prepared.probe;
        self.insert_armed(b, rec);
        if let Some(s) = self.by_probe.get_mut(&probe) {
            s.consumers = old.consumers;
            s.pins = old.pins;
            s.fast_pins = old.fast_pins;
        }
        old.plan.retire(pool);
        old.rec
    }

    /// Marks the site at `probe` retired: its code is no longer probert's.
    pub(crate) fn retire(&mut self, probe: usize) {
        self.lose(probe, Skipped::NotOurs);
    }

    /// Records an armed site (its trap is in the code) under probe record
    /// `rec`.
    pub(crate) fn insert_armed(&mut self, b: BuiltSite, rec: u32) {
        let p = b.prepared;
        let mut orig = [0; MAX_INSN_LEN];
        let n = p.code.len().min(MAX_INSN_LEN);
        orig[..n].copy_from_slice(&p.code[..n]);
        self.by_probe.insert(
            p.probe,
            Site {
                rec,
                patch: p.patch,
                orig,
                orig_len: n as u8,
                target: p.target,
                plan: b.plan,
                consumers: ConsumerIds::default(),
                pins: 0,
                fast_pins: 0,
                jump: JumpState::default(),
                trap_only: p.trap_only.map(|(k, _)| k),
                lost: None,
            },
        );
    }

    /// Trap → plain for sites whose consumers are gone (after switching fast
    /// ones back): the original bytes back where the code still holds our
    /// trap (see [`crate::patch`]). Sites whose code the host changed or
    /// freed are not written and go just the same; a site whose write
    /// *failed* (a callback, the kernel) stays, armed as it was or on its
    /// trap, and is returned with the error. The caller tombstones the
    /// removed sites' index entries (see `trap::TOMBSTONE`). The removed
    /// sites are forgotten; their stubs are retired into `pool`. Returns the
    /// removed sites' records and patch addresses, and the sites kept.
    pub(crate) fn disarm(
        &mut self,
        pool: &mut Pool,
        probes: &[usize],
    ) -> (Vec<(u32, usize)>, Kept) {
        let fast: Vec<usize> = probes
            .iter()
            .copied()
            .filter(|a| {
                self.by_probe
                    .get(a)
                    .is_some_and(|s| s.lost.is_none() && (s.jump.head || s.jump.tail))
            })
            .collect();
        let switched = self.switch_to_trap(&fast);
        let mut kept: Vec<(usize, Error)> = Vec::new();
        let mut patches = Vec::with_capacity(probes.len());
        for &a in probes {
            let Some(s) = self.by_probe.get(&a) else {
                continue;
            };
            if s.lost.is_some() {
                continue;
            }
            if s.jump.head || s.jump.tail {
                // Its switch back failed: it stays as it is.
                let e = switched.clone().err().unwrap_or(Error::Protect {
                    addr: s.patch,
                    reason: "the jump could not be switched back".into(),
                });
                kept.push((a, e));
                continue;
            }
            patches.push(Patch::new(
                &s.target,
                s.patch,
                &s.orig[arch::HEAD],
                TRAP_INSN,
                a,
            ));
        }
        let written = patch::write_all(&mut patches);
        for (a, why) in &written.skipped {
            if let Some(s) = self.by_probe.get_mut(a) {
                s.lost = Some(*why);
            }
        }
        kept.extend(written.failed);
        let mut removed = Vec::with_capacity(probes.len());
        for a in probes {
            if kept.iter().any(|(k, _)| k == a) {
                continue;
            }
            let Some(s) = self.by_probe.remove(a) else {
                continue;
            };
            s.plan.retire(pool);
            removed.push((s.rec, s.patch));
        }
        self.lost_pending.retain(|a| !probes.contains(a));
        (removed, kept)
    }

    /// Takes the sites found retired since the last call (their code changed
    /// or is gone), retiring their stubs into `pool`: returns their patch
    /// addresses, whose index entries the caller tombstones.
    pub(crate) fn retire_lost(&mut self, pool: &mut Pool) -> Vec<usize> {
        let mut out = Vec::new();
        for a in std::mem::take(&mut self.lost_pending) {
            let Some(s) = self.by_probe.get_mut(&a) else {
                continue;
            };
            let plan = std::mem::replace(&mut s.plan, Plan::Trap { ool: None });
            plan.retire(pool);
            s.jump = JumpState::default();
            out.push(s.patch);
        }
        out
    }

    /// Marks the site at `probe` retired (its code is `why`).
    fn lose(&mut self, probe: usize, why: Skipped) {
        if let Some(s) = self.by_probe.get_mut(&probe) {
            if s.lost.is_none() {
                s.lost = Some(why);
                self.lost_pending.push(probe);
            }
        }
    }

    /// Checks that the code of every site in module code (or, with `all`,
    /// every site) still holds what probert wrote there, and retires those
    /// where it does not: a module unloaded (the memory is gone) or unloaded
    /// and another loaded at the same address (the code is not ours). Reads
    /// only, never faulting.
    pub(crate) fn verify(&mut self, all: bool) {
        let mut lost = Vec::new();
        for (&a, s) in self.by_probe.iter() {
            if s.lost.is_some() || (!all && s.target.region.is_some()) {
                continue;
            }
            let Some(head) = s.head_now() else {
                continue;
            };
            match code::read_code_any(s.patch, s.patch + 1) {
                CodeRead::Bytes { bytes, .. } if bytes == [head] => {}
                CodeRead::Bytes { .. } => lost.push((a, Skipped::NotOurs)),
                CodeRead::Unmapped => lost.push((a, Skipped::Gone)),
                CodeRead::Unknown => {}
            }
        }
        for (a, why) in lost {
            self.lose(a, why);
        }
    }

    /// Retires, without reading or writing anything, every site in
    /// `[start, end)`: the host says that memory is gone.
    pub(crate) fn forget_range(&mut self, start: usize, end: usize) {
        let gone: Vec<usize> = self.range(start, end).map(|(a, _)| a).collect();
        for a in gone {
            self.lose(a, Skipped::Gone);
        }
    }

    /// [`Sites::apply_modes`], waiting at most one scan of `timeout` for
    /// threads to leave runs (for retries, which must not hold up the call
    /// that makes them).
    pub(crate) fn apply_modes_briefly(
        &mut self,
        probes: &[usize],
        retired: &[(usize, usize)],
        timeout: std::time::Duration,
    ) -> Vec<usize> {
        let saved = std::mem::replace(&mut self.patience, (1, timeout));
        let (stuck, _) = self.apply_modes(probes, retired);
        self.patience = saved;
        stuck
    }

    /// Switches each site at `probes` to the mechanism its consumers want.
    /// Returns the sites that wanted to be fast and are not (their write or
    /// the scan of their run failed), with the first error. `retired`: the
    /// bytes of the stubs retired and not yet reusable, which a thread may
    /// still be running (see "Why this is correct").
    pub(crate) fn apply_modes(
        &mut self,
        probes: &[usize],
        retired: &[(usize, usize)],
    ) -> (Vec<usize>, Result<()>) {
        let fast_ok = self.fast_ok;
        let (mut to_fast, mut to_trap) = (Vec::new(), Vec::new());
        for a in probes {
            let Some(s) = self.by_probe.get(a) else {
                continue;
            };
            match (s.wants_fast(fast_ok), s.jump.head) {
                (true, false) => to_fast.push(*a),
                (false, true) => to_trap.push(*a),
                _ => {}
            }
        }
        let back = self.switch_to_trap(&to_trap);
        let fast = self.switch_to_jump(&to_fast, retired);
        let stuck = to_fast
            .iter()
            .copied()
            .filter(|a| self.by_probe.get(a).is_some_and(|s| !s.jump.head))
            .collect();
        (stuck, back.and(fast))
    }

    /// Demotes the fast-capable site at `probe`, because a probe is wanted
    /// at an instruction inside its run: switches it to its trap (the run's
    /// original bytes back, see [`TO_TRAP`](arch::TO_TRAP)), and builds a
    /// site stub of its first instruction alone for its record at `record`.
    /// From then on the trap path resumes there (and the fast path enters
    /// there if that instruction is long enough for the jump alone), so the
    /// rest of the run executes in place and may be probed. A site with a
    /// FAST consumer is demoted only if it stays fast. Returns the new
    /// resume address for the record and the plan it replaces, whose stub
    /// the caller retires once the record says the new address.
    ///
    /// The caller must then wait until no thread can still be in the old
    /// stub's copy of the run (a grace period, then a thread scan).
    pub(crate) fn demote(
        &mut self,
        pool: &mut Pool,
        probe: usize,
        record: usize,
        inside: usize,
    ) -> Result<(usize, Retired)> {
        let Some(s) = self.by_probe.get(&probe) else {
            return Err(Error::Internal("demoting a missing site".into()));
        };
        match s.plan {
            Plan::Fast {
                run: true,
                exit: false,
                ..
            } => {}
            Plan::Fast { exit: true, .. } => {
                return Err(Error::unsupported(
                    probe,
                    format!(
                        "a return probe's exit at {probe:#x} displaces the instructions before \
                         it; detach the return probe first"
                    ),
                ))
            }
            _ => return Err(Error::Internal("demoting a site without a run".into())),
        }
        let first = usize::from(arch::analyze(&s.orig, s.patch)?.len);
        if s.fast_pins > 0 && first < arch::JUMP_LEN {
            return Err(Error::unsupported(
                s.patch,
                format!(
                    "a FAST probe at {probe:#x} displaces the instructions here: {}",
                    TrapOnly::ProbeInside(inside).text(None)
                ),
            ));
        }
        if s.jump.head || s.jump.tail {
            self.switch_to_trap(&[probe])?;
        }
        let s = self
            .by_probe
            .get_mut(&probe)
            .ok_or(Error::Internal("the demoted site vanished".into()))?;
        if s.jump.head || s.jump.tail {
            return Err(Error::Internal("a demoted site kept its jump".into()));
        }
        let stub = pool.create_site(&s.orig[..first], s.patch, record)?;
        if let Err(e) = pool.flush() {
            // Still the old plan, on the trap path: a valid state.
            pool.free_unpublished(stub);
            return Err(e);
        }
        let old = std::mem::replace(
            &mut s.plan,
            if first >= arch::JUMP_LEN {
                Plan::Fast {
                    stub,
                    end: s.patch + first,
                    run: false,
                    exit: false,
                }
            } else {
                Plan::Demoted { stub }
            },
        );
        if first < arch::JUMP_LEN {
            s.trap_only = Some(TrapOnly::ProbeInside(inside));
        }
        Ok((arch::stub_resume(stub.addr), Retired(old)))
    }

    /// Trap → fast, in the steps of [`arch::TO_JUMP`]; a site whose write
    /// fails at some step goes no further, and is switched back. Before the
    /// tail of a run of several instructions is written, a thread scan must
    /// show no thread inside the run nor in a `retired` stub, after a grace
    /// period (module docs).
    fn switch_to_jump(&mut self, probes: &[usize], retired: &[(usize, usize)]) -> Result<()> {
        if probes.is_empty() {
            return Ok(());
        }
        let mut runs: Vec<(usize, usize)> = probes
            .iter()
            .filter_map(|a| self.by_probe.get(a))
            .filter_map(|s| match s.plan {
                Plan::Fast { end, run: true, .. } => Some((s.patch + 1, end)),
                _ => None,
            })
            .collect();
        let mut go: Vec<usize> = probes.to_vec();
        let mut scan_err = Ok(());
        if !runs.is_empty() {
            // The int3s armed before are visible everywhere first: then no
            // thread can enter a run any more.
            membarrier::sync_core();
            // Trap handlers that chose an older plan of these sites are done
            // with it (a handler that blocks must not hold this call: then
            // the sites stay traps, and are retried); threads it sent into a
            // stub are seen by the scan.
            let (tries, timeout) = self.patience;
            let graced = grace::synchronize_until(std::time::Instant::now() + timeout);
            runs.extend_from_slice(retired);
            let quiet = if graced {
                xol::quiet_within(&runs, threads::Depth::FramesRequired, tries, timeout)
            } else {
                Ok(false)
            };
            match quiet {
                Ok(true) => {}
                r => {
                    // A thread may be inside a run: those sites stay traps.
                    go.retain(|a| {
                        !self
                            .by_probe
                            .get(a)
                            .is_some_and(|s| matches!(s.plan, Plan::Fast { run: true, .. }))
                    });
                    scan_err = r.and(Err(Error::unsupported(
                        probes[0],
                        "a thread is (or may be) inside the instructions the jump would replace",
                    )));
                }
            }
        }
        let result = self.run_steps(arch::TO_JUMP, &go, true);
        // Sites that did not make it stay on the trap path.
        let stuck: Vec<usize> = go
            .iter()
            .copied()
            .filter(|a| {
                self.by_probe
                    .get(a)
                    .is_some_and(|s| s.jump.tail && !s.jump.head)
            })
            .collect();
        result.and(self.switch_to_trap(&stuck)).and(scan_err)
    }

    /// Fast → trap, in the steps of [`arch::TO_TRAP`].
    fn switch_to_trap(&mut self, probes: &[usize]) -> Result<()> {
        self.run_steps(arch::TO_TRAP, probes, false)
    }

    /// Runs a switching protocol over `probes`: towards the jump
    /// (`to_jump`) or back. A serialising step runs only if a write came
    /// before it (the traps armed earlier count as one).
    fn run_steps(&mut self, steps: &[SwitchStep], probes: &[usize], to_jump: bool) -> Result<()> {
        let mut result = Ok(());
        let mut live: Vec<usize> = probes.to_vec();
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
                    self.by_probe.get(a).is_some_and(|s| match part {
                        JumpPart::Head => s.jump.head,
                        JumpPart::Tail => s.jump.tail,
                    })
                });
            }
        }
        result
    }

    /// The bytes `part` of the site at `probe` takes in this direction, if
    /// it needs a write: the jump's towards the jump; back, the trap
    /// instruction (head) or the original bytes (tail, once the head is no
    /// longer the jump's).
    fn part_patch(&self, probe: usize, part: JumpPart, to_jump: bool) -> Option<Patch> {
        let s = self.by_probe.get(&probe)?;
        if s.lost.is_some() {
            return None;
        }
        let target = s.plan.jump_target()?;
        let range = part.range();
        let f = s.jump;
        let j = arch::jump_to(s.patch, target)?;
        let jump = &j[range.clone()];
        let orig = &s.orig[range.clone()];
        let at = s.patch + range.start;
        // What the code holds now, and what goes there.
        let (bytes, expect, places): (&[u8], &[u8], bool) = match (to_jump, part) {
            (true, JumpPart::Head) if !f.head => (jump, TRAP_INSN, false),
            (true, JumpPart::Tail) if !f.tail => (jump, orig, true),
            (false, JumpPart::Head) if f.head => (TRAP_INSN, jump, false),
            (false, JumpPart::Tail) if f.tail && !f.head => (orig, jump, false),
            _ => return None,
        };
        let p = Patch::new(&s.target, at, bytes, expect, probe);
        Some(if places { p.placing() } else { p })
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
        let written = patch::write_all(&mut patches);
        for &(a, why) in &written.skipped {
            self.lose(a, why);
        }
        let result = written.result();
        let done = written.done;
        for tag in &done {
            if let Some(s) = self.by_probe.get_mut(tag) {
                match part {
                    JumpPart::Head => s.jump.head = jump,
                    JumpPart::Tail => s.jump.tail = jump,
                }
            }
        }
        (result, done.len())
    }
}
