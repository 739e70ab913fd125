//! The writer: every control-plane operation, one at a time under the writer
//! lock, in normal context.
//!
//! # Ordering of a probe's life (the trap path's view in brackets)
//!
//! Attach a new probe:
//! 1. decode and classify the instruction; build its stub if it runs out of
//!    line; fill its record;
//! 2. insert `addr → record` into the index [a trap at `addr` now finds it];
//! 3. write `int3` [threads start trapping; the consumer list is still empty,
//!    so they only run the displaced instruction];
//! 4. publish the consumer list [handlers run].
//!
//! Remove a probe (its last consumer detached):
//! 1. unpublish the consumer (a new list without it);
//! 2. note the address as recently removed, restore the original byte
//!    [threads stop trapping; one that trapped before still finds the probe];
//! 3. remove it from the index [a late trap finds no probe, sees the restored
//!    byte and re-executes the instruction];
//! 4. after a grace period: free the record and the old lists; the stub waits
//!    for a thread scan as well (see [`crate::xol`]).
//!
//! # Fast sites
//!
//! A probe whose site qualifies ([`arch::fast_eligible`]) and has no consumer
//! that asked for the trap path is switched to a `jmp` to its own stub
//! ([`crate::fast`]). Switching between trap and fast never lets a thread run
//! a torn instruction (the `int3`-first protocol of cross-modifying code):
//!
//! - trap → fast: the site already starts with `int3`; write the jump's tail
//!   (bytes 1..5), serialise every core, write the jump's head (`e9`),
//!   serialise again;
//! - fast → trap: write `int3` over the head, serialise, restore the original
//!   tail, serialise.
//!
//! A thread that reaches the site mid-switch executes the `int3` and takes
//! the trap path, which stays valid for every probe whatever its mode.
//! "Serialise" is `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`:
//! every thread of the process executes a core-serialising instruction before
//! it returns, so no core keeps a stale decoding of the bytes being changed.
//! Without it (old kernels) every probe stays on the trap path.
//!
//! # Safety
//!
//! The `pthread_atfork` handlers keep a `MutexGuard` in a static between the
//! prepare and the parent/child handlers of one `fork`, which run on the same
//! thread; consumer lists are freed from raw pointers they were created from.
#![allow(unsafe_code)]

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};

use crate::arch::{self, Displaced, MAX_INSN_LEN, TRAP_INSN};
use crate::error::{Error, Result};
use crate::grace;
use crate::hit::Handler;
use crate::map::Retired;
use crate::patch::{self, Patch};
use crate::probe::{
    consumer_tag, hits_count, hits_word, ConsumerList, Entry, CONSUMERS, PROBES, REAP_PENDING,
    STATE_ACTIVE, STATE_DETACHED, STATE_FREE, STATE_REMOVED,
};
use crate::region::{RegionDesc, RegionId, Regions, Target};
use crate::sys::{code, membarrier, threads};
use crate::trap::{self, INDEX, RECENTLY_REMOVED};
use crate::xol::Pool;

/// A handle to an attached consumer; never 0. Carries a generation, so a
/// stale or doubled handle is [`Error::NotFound`], never a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerId(pub u64);

impl ConsumerId {
    fn new(idx: u32, gen: u32) -> Self {
        ConsumerId((u64::from(gen) << 32) | (u64::from(idx) + 1))
    }
    fn parts(self) -> Option<(u32, u32)> {
        let low = (self.0 & 0xFFFF_FFFF) as u32;
        let idx = low.checked_sub(1)?;
        Some((idx, (self.0 >> 32) as u32))
    }
}

/// Per-consumer statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Handler calls.
    pub hits: u64,
    /// Hits skipped because the thread was already running a handler.
    pub missed: u64,
}

/// One attach request.
#[derive(Clone, Copy, Debug)]
pub struct AttachReq {
    /// The instruction to probe.
    pub addr: usize,
    /// The handler (async-signal-safe; see [`Handler`]).
    pub handler: Handler,
    /// Passed back in every hit.
    pub user_data: *mut std::ffi::c_void,
}

/// The mechanism that serves a probed address.
#[repr(u32)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Fast where the site allows it, else trap (the default).
    #[default]
    Auto = 0,
    /// The `int3` path.
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

/// A consumer that owns something to drop once it can no longer be called
/// (e.g. a boxed closure).
pub(crate) type Owner = Box<dyn Any + Send>;

struct ProbeState {
    rec: u32,
    /// The original bytes of the instruction, written back on removal.
    orig: [u8; MAX_INSN_LEN],
    len: u8,
    displaced: Displaced,
    target: Target,
    /// The out-of-line stub of the trap path, if the instruction needs one.
    stub: Option<usize>,
    consumers: Vec<u32>,
    /// Consumers that asked for the trap path ([`Mode::Trap`]).
    pins: usize,
    /// Whether the site can be a fast site.
    eligible: bool,
    /// The fast stub, while the site is (or is becoming) a jump to it.
    fast: Option<FastSite>,
}

/// The two parts of a fast site's jump, written separately.
#[derive(Clone, Copy, Debug)]
enum Part {
    /// Byte 0: `int3` or `e9`.
    Head,
    /// Bytes 1..5: the original bytes or the jump's rel32.
    Tail,
}

/// A site switched, or switching, to the fast path.
#[derive(Clone, Copy, Debug)]
struct FastSite {
    stub: usize,
    /// The site's bytes 1..5 are the jump's tail.
    tail: bool,
    /// The site's byte 0 is the jump's `e9` (the site is fast).
    head: bool,
}

impl ProbeState {
    fn wants_fast(&self, fast_ok: bool) -> bool {
        fast_ok && self.eligible && self.pins == 0 && !self.consumers.is_empty()
    }

    /// How many bytes from the probe address differ from the original code.
    fn patched_len(&self) -> usize {
        if self.fast.is_some_and(|f| f.tail || f.head) {
            arch::JMP_LEN
        } else {
            1
        }
    }
}

struct Live {
    addr: usize,
    handler: Handler,
    user_data: usize,
    mode: Mode,
    owner: Option<Owner>,
}

#[derive(Default)]
struct ConsumerSlot {
    gen: u32,
    live: Option<Live>,
}

/// What a grace period must pass before it is freed.
enum Deferred {
    List(*mut ConsumerList),
    Tables(#[allow(dead_code)] Retired),
    ConsumerRecord(u32),
    ProbeRecord(u32),
    Owner(#[allow(dead_code)] Owner),
}

// SAFETY: the raw list pointer is owned by the writer once unpublished.
unsafe impl Send for Deferred {}

#[derive(Default)]
struct State {
    /// Whether cores can be serialised after code changes (fast sites).
    fast_ok: bool,
    regions: Regions,
    /// Instruction starts of JIT regions, decoded on their first attach.
    boundaries: std::collections::HashMap<RegionId, arch::Boundaries>,
    pool: Pool,
    probes: BTreeMap<usize, ProbeState>,
    consumers: Vec<ConsumerSlot>,
    free_consumers: Vec<u32>,
    free_probes: Vec<u32>,
    next_probe: u32,
    deferred: Vec<Deferred>,
}

// SAFETY: everything in State is touched only under the writer lock.
unsafe impl Send for State {}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// Between the prepare and the parent/child handlers of a `fork`.
static mut FORK_GUARD: Option<MutexGuard<'static, Option<State>>> = None;

fn lock() -> MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The writer lock must never be taken from a handler: the handler may have
/// interrupted the writer on its own thread (a probed `malloc`, a region's
/// write callback), and would wait for itself. Checked before anything
/// changes, so such a call is refused whole.
fn refuse_in_handler() -> Result<()> {
    if grace::in_section() {
        Err(Error::InvalidArgument(
            "probert's control calls cannot be made from a handler".into(),
        ))
    } else {
        Ok(())
    }
}

/// Runs `f` on the initialised state, reaping removed consumers first.
fn with_state<R>(f: impl FnOnce(&mut State) -> Result<R>) -> Result<R> {
    refuse_in_handler()?;
    let mut guard = lock();
    if guard.is_none() {
        *guard = Some(init_state()?);
    }
    let st = guard
        .as_mut()
        .ok_or(Error::Internal("state vanished".into()))?;
    st.reap();
    f(st)
}

fn init_state() -> Result<State> {
    PROBES.init()?;
    CONSUMERS.init()?;
    membarrier::init();
    threads::scan_init()?;
    trap::install()?;
    extern "C" fn prepare() {
        let g = lock();
        // SAFETY: atfork handlers of one fork run on one thread, serialised
        // by the lock we now hold.
        unsafe { *std::ptr::addr_of_mut!(FORK_GUARD) = Some(g) };
    }
    extern "C" fn parent() {
        // SAFETY: see `prepare`.
        drop(unsafe { (*std::ptr::addr_of_mut!(FORK_GUARD)).take() });
    }
    extern "C" fn child() {
        grace::reset_after_fork(crate::probe::flush_hits);
        crate::sys::mem::after_fork_child();
        // SAFETY: see `prepare`.
        drop(unsafe { (*std::ptr::addr_of_mut!(FORK_GUARD)).take() });
    }
    // SAFETY: registering plain extern "C" functions.
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if rc != 0 {
        return Err(Error::NoMemory("pthread_atfork failed".into()));
    }
    Ok(State {
        fast_ok: membarrier::register_sync_core(),
        ..State::default()
    })
}

/// Initialises probert (idempotent): the `SIGTRAP` handler, the
/// thread-scan signal, the arenas, fork handlers.
pub fn init() -> Result<()> {
    with_state(|_| Ok(()))
}

/// Whether `addr` is probert's own code (the trap path, the writer, the
/// stubs), which must never be probed. `func_name` is the symbol of the
/// enclosing function, if known.
fn is_probert_code(st: &State, addr: usize, func_name: Option<&str>) -> bool {
    let (lo, hi) = crate::fast::code_range();
    if st.pool.contains(addr) || (lo..hi).contains(&addr) {
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

/// A new probe, prepared but not yet published.
struct Prepared {
    addr: usize,
    rec: u32,
    orig: [u8; MAX_INSN_LEN],
    len: u8,
    displaced: Displaced,
    target: Target,
    stub: Option<usize>,
}

impl State {
    fn alloc_probe_record(&mut self) -> Result<u32> {
        if let Some(r) = self.free_probes.pop() {
            return Ok(r);
        }
        if self.next_probe as usize >= PROBES.capacity() {
            return Err(Error::NoMemory("too many probes".into()));
        }
        self.next_probe += 1;
        Ok(self.next_probe - 1)
    }

    fn alloc_consumer(&mut self, live: Live) -> Result<ConsumerId> {
        let idx = match self.free_consumers.pop() {
            Some(i) => i,
            None => {
                if self.consumers.len() >= CONSUMERS.capacity() {
                    return Err(Error::NoMemory("too many consumers".into()));
                }
                self.consumers.push(ConsumerSlot { gen: 1, live: None });
                (self.consumers.len() - 1) as u32
            }
        };
        let rec = CONSUMERS
            .get(idx as usize)
            .ok_or(Error::Internal("consumer record out of range".into()))?;
        let slot = &mut self.consumers[idx as usize];
        // Ordering: Relaxed — the record is published with the consumer list
        // (Release swap in `publish_list`); the generation in `hits` fences
        // off late flushes for the record's previous consumer.
        rec.gen.store(slot.gen, Ordering::Relaxed);
        rec.hits.store(hits_word(slot.gen, 0), Ordering::Relaxed);
        rec.missed.store(0, Ordering::Relaxed);
        rec.state.store(STATE_ACTIVE, Ordering::Relaxed);
        slot.live = Some(live);
        Ok(ConsumerId::new(idx, slot.gen))
    }

    /// Reads the original code of `[start, end)`, with our `int3`s replaced by
    /// the bytes they displaced.
    fn original_code(&self, start: usize, end: usize) -> Vec<u8> {
        let mut bytes = code::read_code(start, end);
        let from = start.saturating_sub(arch::JMP_LEN);
        for (&a, p) in self.probes.range(from..end) {
            for (i, &orig) in p.orig.iter().enumerate().take(p.patched_len()) {
                if let Some(b) = (a + i).checked_sub(start).and_then(|k| bytes.get_mut(k)) {
                    *b = orig;
                }
            }
        }
        bytes
    }

    /// Decodes, checks and prepares a new probe at `addr` (nothing published).
    fn prepare(&mut self, addr: usize) -> Result<Prepared> {
        let (target, func_name) = self.regions.resolve(addr)?;
        if is_probert_code(self, addr, func_name.as_deref()) {
            return Err(Error::InvalidArgument(
                format!("{addr:#x} is inside probert's own code").into(),
            ));
        }
        let end = target.end.min(addr + MAX_INSN_LEN);
        let insn = self.original_code(addr, end);
        if insn.first() == Some(&TRAP_INSN) {
            return Err(Error::Conflict { addr });
        }
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
        let decoded = arch::analyze(&insn, addr)?;
        let stub = match decoded.displaced {
            Displaced::OutOfLine => Some(self.pool.create(&insn, addr)?),
            _ => None,
        };
        let rec = match self.alloc_probe_record() {
            Ok(r) => r,
            Err(e) => {
                if let Some(s) = stub {
                    self.pool.free_unpublished(s);
                }
                return Err(e);
            }
        };
        let mut orig = [0; MAX_INSN_LEN];
        orig[..insn.len()].copy_from_slice(&insn);
        Ok(Prepared {
            addr,
            rec,
            orig,
            len: decoded.len,
            displaced: decoded.displaced,
            target,
            stub,
        })
    }

    fn unprepare(&mut self, p: Prepared) {
        if let Some(s) = p.stub {
            self.pool.free_unpublished(s);
        }
        self.free_probes.push(p.rec);
    }

    /// Publishes `ids` as the consumer list of the probe at `addr`.
    fn publish_list(&mut self, addr: usize) -> Result<()> {
        let p = self.probes.get(&addr).ok_or(Error::Internal(
            "publishing the list of a missing probe".into(),
        ))?;
        let entries = p
            .consumers
            .iter()
            .filter_map(|&c| {
                let slot = &self.consumers[c as usize];
                let live = slot.live.as_ref()?;
                Some(Entry {
                    handler: live.handler,
                    user_data: live.user_data,
                    record: CONSUMERS.get(c as usize)?,
                    tag: consumer_tag(c, slot.gen),
                })
            })
            .collect();
        let rec = PROBES
            .get(p.rec as usize)
            .ok_or(Error::Internal("probe record out of range".into()))?;
        // Ordering: Release — the list and the consumer records it names are
        // initialised before a dispatcher can load it (Acquire in
        // `view_speculative`).
        let old = rec
            .consumers
            .swap(ConsumerList::publishable(entries), Ordering::Release);
        if !old.is_null() {
            self.deferred.push(Deferred::List(old));
        }
        Ok(())
    }

    /// Attaches every request or none.
    fn attach_batch(
        &mut self,
        reqs: &[AttachReq],
        modes: &[Mode],
        owners: Vec<Option<Owner>>,
    ) -> std::result::Result<Vec<ConsumerId>, (usize, Error)> {
        let free = self.free_consumers.len() + (CONSUMERS.capacity() - self.consumers.len());
        if reqs.len() > free {
            return Err((0, Error::NoMemory("too many consumers".into())));
        }
        // 1. Prepare new probes (nothing visible yet).
        let mut prepared: Vec<Prepared> = Vec::new();
        // Address → index in `prepared`, so a large batch stays linear.
        let mut prepared_at: std::collections::HashMap<usize, usize> = Default::default();
        for (i, r) in reqs.iter().enumerate() {
            if r.addr == 0 {
                self.unprepare_all(prepared);
                return Err((i, Error::InvalidArgument("null address".into())));
            }
            if !self.probes.contains_key(&r.addr) && !prepared_at.contains_key(&r.addr) {
                match self.prepare(r.addr) {
                    Ok(p) => {
                        prepared_at.insert(r.addr, prepared.len());
                        prepared.push(p);
                    }
                    Err(e) => {
                        self.unprepare_all(prepared);
                        return Err((i, e));
                    }
                }
            }
            if modes.get(i) == Some(&Mode::Fast) {
                let eligible = match self.probes.get(&r.addr) {
                    Some(p) => p.eligible,
                    None => prepared_at
                        .get(&r.addr)
                        .map(|&k| &prepared[k])
                        .is_some_and(|p| arch::fast_eligible(p.len, &p.displaced)),
                };
                if !self.fast_ok || !eligible {
                    let why = if self.fast_ok {
                        "not a fast site: needs a 5-byte NOP or a first instruction of at least \
                         5 bytes that can be displaced"
                    } else {
                        "fast probes need membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE), \
                         which this kernel does not offer"
                    };
                    self.unprepare_all(prepared);
                    return Err((i, Error::unsupported(r.addr, why)));
                }
            }
        }
        // 2. Index them and write the traps (empty consumer lists: a thread
        //    that traps now only runs the displaced instruction).
        for p in &prepared {
            let rec = PROBES
                .get(p.rec as usize)
                .ok_or((0, Error::Internal("probe record out of range".into())))?;
            let words = p.displaced.encode();
            // Ordering: a new generation first, then a Release fence, so a
            // fast dispatcher that reads any field below also sees the new
            // generation on its check — pairs with the Acquire fence in
            // `fast_dispatch` (and x86's load order in the trampoline).
            let gen = rec.gen.load(Ordering::Relaxed).wrapping_add(1);
            rec.gen.store(gen, Ordering::Relaxed);
            std::sync::atomic::fence(Ordering::Release);
            // Ordering (all): Relaxed — published by the index insert's
            // latch bump (Release).
            rec.len.store(p.len as usize, Ordering::Relaxed);
            for (w, v) in rec.displaced.iter().zip(words) {
                w.store(v, Ordering::Relaxed);
            }
            rec.stub.store(p.stub.unwrap_or(0), Ordering::Relaxed);
            rec.consumers.store(std::ptr::null_mut(), Ordering::Relaxed);
            rec.addr.store(p.addr, Ordering::Relaxed);
            if let Some(t) = INDEX.insert(p.addr, p.rec as usize) {
                self.deferred.push(Deferred::Tables(t));
            }
        }
        let mut patches: Vec<Patch> = prepared
            .iter()
            .map(|p| Patch::byte(&p.target, p.addr, TRAP_INSN))
            .collect();
        let mut written = Vec::new();
        if let Err(e) = patch::write_all(&mut patches, &mut written) {
            // Undo: restore what was written, unindex, free.
            let _ = patch::write_all(&mut written, &mut Vec::new());
            let failed = patches
                .get(written.len())
                .map(|p| p.addr)
                .unwrap_or_default();
            let index = reqs.iter().position(|r| r.addr == failed).unwrap_or(0);
            for p in prepared {
                INDEX.remove(p.addr);
                if let Some(rec) = PROBES.get(p.rec as usize) {
                    // Ordering: Relaxed — the record is no longer indexed.
                    rec.addr.store(0, Ordering::Relaxed);
                }
                // A thread may have trapped and be inside the stub already.
                if let Some(s) = p.stub {
                    self.pool.retire(s, false);
                }
                self.deferred.push(Deferred::ProbeRecord(p.rec));
            }
            return Err((index, e));
        }
        for p in prepared {
            self.probes.insert(
                p.addr,
                ProbeState {
                    rec: p.rec,
                    orig: p.orig,
                    len: p.len,
                    displaced: p.displaced,
                    eligible: arch::fast_eligible(p.len, &p.displaced),
                    target: p.target,
                    stub: p.stub,
                    consumers: Vec::new(),
                    pins: 0,
                    fast: None,
                },
            );
        }
        // 3. Consumers, then their lists.
        let mut ids = Vec::with_capacity(reqs.len());
        let mut owners = owners.into_iter();
        for (i, r) in reqs.iter().enumerate() {
            let mode = modes.get(i).copied().unwrap_or_default();
            let live = Live {
                addr: r.addr,
                handler: r.handler,
                user_data: r.user_data as usize,
                mode,
                owner: owners.next().flatten(),
            };
            let id = self.alloc_consumer(live).map_err(|e| (ids.len(), e))?;
            let (idx, _) = id.parts().ok_or((0, Error::Internal("bad id".into())))?;
            if let Some(p) = self.probes.get_mut(&r.addr) {
                p.consumers.push(idx);
                p.pins += usize::from(mode == Mode::Trap);
            }
            ids.push(id);
        }
        let mut addrs: Vec<usize> = reqs.iter().map(|r| r.addr).collect();
        addrs.sort_unstable();
        addrs.dedup();
        for &a in &addrs {
            self.publish_list(a).map_err(|e| (0, e))?;
        }
        // 4. Sites that can be fast become fast. A failure here leaves them
        //    on the trap path, which serves every consumer just the same.
        let _ = self.apply_modes(&addrs);
        Ok(ids)
    }

    fn unprepare_all(&mut self, prepared: Vec<Prepared>) {
        for p in prepared {
            self.unprepare(p);
        }
    }

    /// Validates a handle: the live consumer it names.
    fn lookup(&self, id: ConsumerId) -> Result<u32> {
        let (idx, gen) = id.parts().ok_or(Error::NotFound)?;
        let slot = self.consumers.get(idx as usize).ok_or(Error::NotFound)?;
        if slot.gen != gen || slot.live.is_none() {
            return Err(Error::NotFound);
        }
        let rec = CONSUMERS.get(idx as usize).ok_or(Error::NotFound)?;
        // Ordering: Relaxed — the handler's CAS is re-read here under the
        // lock; a consumer that asked to be removed is stale.
        if rec.state.load(Ordering::Relaxed) != STATE_ACTIVE {
            return Err(Error::NotFound);
        }
        Ok(idx)
    }

    /// Detaches consumers (already validated), removing probes left with
    /// none. Costs no grace period; the caller synchronises.
    fn detach_nosync(&mut self, idxs: &[u32]) -> Result<()> {
        let mut touched = Vec::new();
        for &idx in idxs {
            let slot = &mut self.consumers[idx as usize];
            let Some(live) = slot.live.take() else {
                continue;
            };
            slot.gen = slot.gen.wrapping_add(1).max(1);
            if let Some(rec) = CONSUMERS.get(idx as usize) {
                // Ordering: Relaxed — dispatchers stop calling it early; the
                // guarantee comes from the grace period after unpublishing.
                rec.state.store(STATE_DETACHED, Ordering::Relaxed);
            }
            if let Some(p) = self.probes.get_mut(&live.addr) {
                p.consumers.retain(|&c| c != idx);
                p.pins -= usize::from(live.mode == Mode::Trap);
                touched.push(live.addr);
            }
            self.deferred.push(Deferred::ConsumerRecord(idx));
            if let Some(o) = live.owner {
                self.deferred.push(Deferred::Owner(o));
            }
        }
        touched.sort_unstable();
        touched.dedup();
        let (empty, busy): (Vec<usize>, Vec<usize>) = touched
            .into_iter()
            .partition(|a| self.probes.get(a).is_some_and(|p| p.consumers.is_empty()));
        for &a in &busy {
            self.publish_list(a)?;
        }
        let switched = self.apply_modes(&busy);
        self.remove_probes(&empty).and(switched)
    }

    /// Removes probes (their consumers are gone): restore, unindex, defer.
    fn remove_probes(&mut self, addrs: &[usize]) -> Result<()> {
        if addrs.is_empty() {
            return Ok(());
        }
        // Fast sites go back to the trap path first (int3 head, original tail).
        let fast: Vec<usize> = addrs
            .iter()
            .copied()
            .filter(|a| self.probes.get(a).is_some_and(|p| p.fast.is_some()))
            .collect();
        let switched = self.switch_to_trap(&fast);
        let mut patches = Vec::with_capacity(addrs.len());
        for a in addrs {
            let Some(p) = self.probes.get(a) else {
                continue;
            };
            // Ordering: Relaxed — read by the trap path inside the validated
            // window that also reads the restored byte.
            RECENTLY_REMOVED[trap::recent_slot(*a)].store(*a, Ordering::Relaxed);
            // Restore only what is still our int3: if the module was unloaded
            // and something else mapped there, leave it alone.
            if code::read_code_byte(*a) == TRAP_INSN {
                patches.push(Patch::byte(&p.target, *a, p.orig[0]));
            }
        }
        let result = patch::write_all(&mut patches, &mut Vec::new()).and(switched);
        for a in addrs {
            let Some(p) = self.probes.remove(a) else {
                continue;
            };
            INDEX.remove(*a);
            if let Some(rec) = PROBES.get(p.rec as usize) {
                // Ordering: Release — unpublishes the list; the dispatchers
                // that loaded it are covered by the grace period.
                let old = rec.consumers.swap(std::ptr::null_mut(), Ordering::Release);
                if !old.is_null() {
                    self.deferred.push(Deferred::List(old));
                }
            }
            if let Some(s) = p.stub {
                self.pool.retire(s, false);
            }
            if let Some(f) = p.fast {
                // Only if switching back failed half-way: the site's head is
                // int3 again in every case that reaches here, so the stub is
                // unreachable for new entries.
                self.pool.retire(f.stub, true);
            }
            self.deferred.push(Deferred::ProbeRecord(p.rec));
        }
        result
    }

    /// Switches each probe at `addrs` to the mechanism its consumers want.
    fn apply_modes(&mut self, addrs: &[usize]) -> Result<()> {
        let fast_ok = self.fast_ok;
        let (mut to_fast, mut to_trap) = (Vec::new(), Vec::new());
        for a in addrs {
            let Some(p) = self.probes.get(a) else {
                continue;
            };
            match (p.wants_fast(fast_ok), p.fast.is_some_and(|f| f.head)) {
                (true, false) => to_fast.push(*a),
                (false, true) => to_trap.push(*a),
                _ => {}
            }
        }
        let back = self.switch_to_trap(&to_trap);
        to_fast.retain(|a| self.prepare_fast(*a).is_ok());
        back.and(self.switch_to_fast(&to_fast))
    }

    /// Builds the fast stub of a probe (not yet reachable).
    fn prepare_fast(&mut self, addr: usize) -> Result<()> {
        let p = self
            .probes
            .get(&addr)
            .ok_or(Error::Internal("no probe to make fast".into()))?;
        if p.fast.is_some() {
            return Ok(());
        }
        let rec = PROBES
            .get(p.rec as usize)
            .ok_or(Error::Internal("probe record out of range".into()))?;
        // Ordering: Relaxed — the writer's own store.
        let tag = crate::fast::tag(p.rec, rec.gen.load(Ordering::Relaxed));
        let (orig, len, displaced) = (p.orig, p.len, p.displaced);
        let stub = self
            .pool
            .create_fast(&orig[..len as usize], addr, len, &displaced, tag)?;
        if let Some(p) = self.probes.get_mut(&addr) {
            p.fast = Some(FastSite {
                stub,
                tail: false,
                head: false,
            });
        }
        Ok(())
    }

    /// Trap → fast, for probes whose fast stub is prepared: tail, serialise,
    /// head, serialise. The head is `int3` throughout the tail write.
    fn switch_to_fast(&mut self, addrs: &[usize]) -> Result<()> {
        if addrs.is_empty() {
            return Ok(());
        }
        // The int3 of new probes must be visible to every core before any
        // other byte of the instruction changes.
        membarrier::sync_core();
        let mut tails = Vec::new();
        for a in addrs {
            let p = &self.probes[a];
            let f = p.fast.ok_or(Error::Internal("no fast stub".into()))?;
            let jmp = arch::site_jump(*a, f.stub)?;
            tails.push(Patch {
                target: p.target.clone(),
                addr: a + 1,
                bytes: jmp[1..].to_vec(),
            });
        }
        let (tails_ok, done) = self.write_fast_part(tails, Part::Tail, true);
        membarrier::sync_core();
        let heads = done
            .iter()
            .map(|d| Patch::byte(&d.target, d.addr - 1, 0xE9))
            .collect();
        let (heads_ok, _) = self.write_fast_part(heads, Part::Head, true);
        membarrier::sync_core();
        // Sites that did not make it stay on the trap path.
        let stuck: Vec<usize> = addrs
            .iter()
            .copied()
            .filter(|a| self.probes[a].fast.is_some_and(|f| !f.head))
            .collect();
        let back = self.switch_to_trap(&stuck);
        tails_ok.and(heads_ok).and(back)
    }

    /// Fast → trap: `int3` over the head, serialise, the original tail back,
    /// serialise; then the fast stub is retired.
    fn switch_to_trap(&mut self, addrs: &[usize]) -> Result<()> {
        let heads = addrs
            .iter()
            .filter_map(|a| self.probes.get(a).map(|p| (a, p)))
            .filter(|(_, p)| p.fast.is_some_and(|f| f.head))
            .map(|(a, p)| Patch::byte(&p.target, *a, TRAP_INSN))
            .collect();
        let (heads_ok, _) = self.write_fast_part(heads, Part::Head, false);
        if !addrs.is_empty() {
            membarrier::sync_core();
        }
        let tails: Vec<Patch> = addrs
            .iter()
            .filter_map(|a| self.probes.get(a).map(|p| (a, p)))
            .filter(|(_, p)| p.fast.is_some_and(|f| f.tail && !f.head))
            .map(|(a, p)| Patch {
                target: p.target.clone(),
                addr: a + 1,
                bytes: p.orig[1..arch::JMP_LEN].to_vec(),
            })
            .collect();
        let any_tail = !tails.is_empty();
        let (tails_ok, _) = self.write_fast_part(tails, Part::Tail, false);
        if any_tail {
            membarrier::sync_core();
        }
        for a in addrs {
            let Some(p) = self.probes.get_mut(a) else {
                continue;
            };
            if let Some(f) = p.fast.filter(|f| !f.head && !f.tail) {
                p.fast = None;
                self.pool.retire(f.stub, true);
            }
        }
        heads_ok.and(tails_ok)
    }

    /// Writes one part of fast sites (the head byte or the 4-byte tail) and
    /// records, for each site written, whether that part is now the jump's.
    /// Returns the write's result and the patches written (with the bytes
    /// they replaced).
    fn write_fast_part(
        &mut self,
        mut patches: Vec<Patch>,
        part: Part,
        jump: bool,
    ) -> (Result<()>, Vec<Patch>) {
        let mut done = Vec::new();
        let result = patch::write_all(&mut patches, &mut done);
        for d in &done {
            let site = match part {
                Part::Head => d.addr,
                Part::Tail => d.addr - 1,
            };
            if let Some(f) = self.probes.get_mut(&site).and_then(|p| p.fast.as_mut()) {
                match part {
                    Part::Head => f.head = jump,
                    Part::Tail => f.tail = jump,
                }
            }
        }
        (result, done)
    }

    /// The mechanism serving the probe at `addr`.
    fn mode_of(&self, addr: usize) -> Result<Mode> {
        let p = self.probes.get(&addr).ok_or(Error::NotFound)?;
        Ok(if p.fast.is_some_and(|f| f.head) {
            Mode::Fast
        } else {
            Mode::Trap
        })
    }

    /// Detaches consumers whose handler returned `Remove`.
    fn reap(&mut self) {
        // Ordering: Acquire — pairs with the Release in `dispatch`.
        if REAP_PENDING.swap(0, Ordering::Acquire) == 0 {
            return;
        }
        let removed: Vec<u32> = self
            .consumers
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                s.live.is_some()
                    && CONSUMERS.get(*i).is_some_and(|r| {
                        // Ordering: Relaxed — ordered by the flag's Acquire.
                        r.state.load(Ordering::Relaxed) == STATE_REMOVED
                    })
            })
            .map(|(i, _)| i as u32)
            .collect();
        if let Err(e) = self.detach_nosync(&removed) {
            // Nothing to report to: keep the error for the next caller.
            let _ = e;
        }
    }

    /// Frees what a grace period protected.
    fn free_deferred(&mut self, items: Vec<Deferred>) -> Vec<Owner> {
        let mut owners = Vec::new();
        for d in items {
            match d {
                Deferred::List(p) => {
                    // SAFETY: `p` came from `ConsumerList::publishable`, was
                    // unpublished, and a grace period has passed.
                    drop(unsafe { Box::from_raw(p) });
                }
                Deferred::Tables(t) => drop(t),
                Deferred::ConsumerRecord(i) => {
                    if let Some(r) = CONSUMERS.get(i as usize) {
                        // Ordering: Relaxed — no dispatcher can see it now.
                        r.state.store(STATE_FREE, Ordering::Relaxed);
                    }
                    self.free_consumers.push(i);
                }
                Deferred::ProbeRecord(i) => {
                    if let Some(r) = PROBES.get(i as usize) {
                        // Ordering: Relaxed — unindexed a grace period ago.
                        r.addr.store(0, Ordering::Relaxed);
                    }
                    self.free_probes.push(i);
                }
                Deferred::Owner(o) => owners.push(o),
            }
        }
        owners
    }
}

/// Attaches one consumer.
pub(crate) fn attach_owned(
    addr: usize,
    handler: Handler,
    user_data: *mut std::ffi::c_void,
    mode: Mode,
    owner: Option<Owner>,
) -> Result<ConsumerId> {
    let req = AttachReq {
        addr,
        handler,
        user_data,
    };
    with_state(|st| {
        ensure_handler()?;
        st.attach_batch(&[req], &[mode], vec![owner])
            .map(|ids| ids[0])
            .map_err(|(_, e)| e)
    })
}

/// Fails if a host replaced our `SIGTRAP` handler after init.
fn ensure_handler() -> Result<()> {
    if crate::sys::signal::trap_handler_installed() {
        Ok(())
    } else {
        Err(Error::Signal(
            "the SIGTRAP handler was replaced after probert installed it".into(),
        ))
    }
}

/// Attaches every request or none; on error, the index of the first request
/// that failed.
pub fn attach_batch(reqs: &[AttachReq]) -> std::result::Result<Vec<ConsumerId>, (usize, Error)> {
    refuse_in_handler().map_err(|e| (reqs.len(), e))?;
    let mut guard = lock();
    if guard.is_none() {
        *guard = Some(init_state().map_err(|e| (0, e))?);
    }
    let st = guard
        .as_mut()
        .ok_or((0, Error::Internal("state vanished".into())))?;
    st.reap();
    ensure_handler().map_err(|e| (0, e))?;
    let owners = reqs.iter().map(|_| None).collect();
    st.attach_batch(reqs, &[], owners)
}

/// Detaches without waiting: the handler may still be running (or about to
/// run) on other threads until the next [`sync`].
pub fn detach_nosync(id: ConsumerId) -> Result<()> {
    with_state(|st| {
        let idx = st.lookup(id)?;
        st.detach_nosync(&[idx])
    })
}

/// Detaches every consumer or none (all handles are validated first), then
/// waits one grace period for all of them together.
pub fn detach_batch(ids: &[ConsumerId]) -> Result<()> {
    with_state(|st| {
        let mut idxs = Vec::with_capacity(ids.len());
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        for &id in ids {
            let idx = st.lookup(id)?;
            if !seen.insert(idx) {
                return Err(Error::InvalidArgument(
                    "a handle appears twice in the batch".into(),
                ));
            }
            idxs.push(idx);
        }
        st.detach_nosync(&idxs)
    })?;
    sync()
}

/// Detaches one consumer and waits until its handler can no longer run.
pub fn detach(id: ConsumerId) -> Result<()> {
    match detach_nosync(id) {
        // A consumer whose handler returned `Remove` has a stale handle, but
        // calls that began before the removal may still be running: wait for
        // them as well, so that after `detach` returns no call of the handle's
        // consumer runs, whatever it returns.
        Err(Error::NotFound) => sync().and(Err(Error::NotFound)),
        r => r.and_then(|()| sync()),
    }
}

/// Waits one grace period: every handler call that began before `sync` has
/// returned when it returns, and everything detached before it is freed.
/// Must not be called from a handler.
pub fn sync() -> Result<()> {
    if grace::in_section() {
        return Err(Error::InvalidArgument(
            "sync (or detach) called from inside a handler would wait for itself".into(),
        ));
    }
    let (items, snap) =
        with_state(|st| Ok((std::mem::take(&mut st.deferred), st.pool.grace_snapshot())))?;
    grace::synchronize();
    let owners = {
        let mut guard = lock();
        let st = guard
            .as_mut()
            .ok_or(Error::Internal("state vanished".into()))?;
        st.pool.after_grace_period(snap);
        st.free_deferred(items)
    };
    // Dropping owners runs user code (closure destructors): outside the lock.
    drop(owners);
    Ok(())
}

/// Statistics of a consumer.
pub fn stats(id: ConsumerId) -> Result<Stats> {
    with_state(|st| {
        let idx = st.lookup(id)?;
        let rec = CONSUMERS.get(idx as usize).ok_or(Error::NotFound)?;
        let tag = consumer_tag(idx, st.consumers[idx as usize].gen);
        // Ordering: Relaxed — statistics.
        Ok(Stats {
            hits: hits_count(rec.hits.load(Ordering::Relaxed)) + grace::pending_hits(tag),
            missed: rec.missed.load(Ordering::Relaxed),
        })
    })
}

/// Registers a JIT region.
pub fn region_add(desc: RegionDesc) -> Result<RegionId> {
    with_state(|st| st.regions.add(desc))
}

/// Detaches every probe in the region (one grace period), then forgets it.
pub fn region_remove(id: RegionId) -> Result<()> {
    let had_probes = with_state(|st| {
        let (start, end) = st.regions.bounds(id).ok_or(Error::NotFound)?;
        let had_probes = st.probes.range(start..end).next().is_some();
        let idxs: Vec<u32> = st
            .probes
            .range(start..end)
            .flat_map(|(_, p)| p.consumers.iter().copied())
            .collect();
        st.detach_nosync(&idxs)?;
        // Probes whose consumers all asked for removal already have none.
        let empty: Vec<usize> = st.probes.range(start..end).map(|(&a, _)| a).collect();
        st.remove_probes(&empty)?;
        st.boundaries.remove(&id);
        st.regions.remove(id)?;
        Ok(had_probes)
    })?;
    // A region that never had probes is read by no handler: no grace period.
    if had_probes {
        sync()?;
    }
    Ok(())
}

/// The mechanism serving a probed address right now (never [`Mode::Auto`]);
/// [`Error::NotFound`] if nothing is attached there.
pub fn probe_mode(addr: usize) -> Result<Mode> {
    with_state(|st| st.mode_of(addr))
}

/// Stubs that freed probes left behind, not yet reusable: (waiting for a
/// grace period, waiting for a thread scan). For tests and diagnostics.
pub fn retired_stubs() -> (usize, usize) {
    with_state(|st| Ok(st.pool.retired_counts())).unwrap_or_default()
}

/// Number of probes (patched addresses) right now.
pub fn probe_count() -> usize {
    with_state(|st| Ok(st.probes.len())).unwrap_or_default()
}

/// Tries to make retired stubs reusable now: a thread scan, a grace period
/// and another scan (fast stubs need all three).
pub fn recycle_stubs() -> Result<()> {
    with_state(|st| st.pool.recycle())?;
    sync()?;
    with_state(|st| st.pool.recycle())
}
