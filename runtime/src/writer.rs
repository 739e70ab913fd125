//! The writer: every control-plane operation, one at a time under the writer
//! lock, in normal context — the lock, the probe records and their index,
//! the consumer lists, and the API entry points.
//!
//! # Ordering of a probe's life (the trap path's view in brackets)
//!
//! Attach a new probe:
//! 1. decode and classify the instruction; build its stub if it runs out of
//!    line ([`Sites::prepare`]); fill its record;
//! 2. insert `addr → record` into the index [a trap at `addr` now finds it];
//! 3. write the trap ([`Sites::arm`]) [threads start trapping; the consumer
//!    list is still empty, so they only run the displaced instruction];
//! 4. publish the consumer list [handlers run];
//! 5. switch the site to its jump if its consumers allow
//!    ([`Sites::apply_modes`]).
//!
//! Remove a probe (its last consumer detached):
//! 1. unpublish the consumer (a new list without it);
//! 2. note the address as recently removed, switch a fast site back and
//!    restore the original bytes ([`Sites::disarm`]) [threads stop trapping;
//!    one that trapped before still finds the probe];
//! 3. replace its index entry by a tombstone [a late trap finds it, sees the
//!    restored instruction and re-executes it]; the tombstone goes after the
//!    next thread scan, which shows no thread still between that trap and
//!    its lookup;
//! 4. after a grace period: free the record and the old lists; stubs wait
//!    for a thread scan as well (see [`crate::xol`]).
//!
//! # Safety
//!
//! The `pthread_atfork` handlers keep a `MutexGuard` in a static between the
//! prepare and the parent/child handlers of one `fork`, which run on the same
//! thread; consumer lists are freed from raw pointers they were created from.
#![allow(unsafe_code)]

use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};

use crate::addr_hash::{AddrMap, AddrSet};
use crate::arch::Clobbers;
use crate::consumer::{AttachReq, Attachment, ConsumerId, Consumers, Owner, Stats};
use crate::effects::{self, EffectsCache};
use crate::error::{Error, Result};
use crate::grace;
use crate::hit::Handler;
use crate::map::RetiredTables;
use crate::probe::{ConsumerList, Entry, EntryKind, ProbeRecord, CONSUMERS, PROBES, REAP_PENDING};
use crate::region::{RegionDesc, RegionId, RegionOptions, Regions};
use crate::site::{BuiltSite, Mode, Prepared, PreparedSite, Sites, TrapOnly};
use crate::sys::{membarrier, threads};
use crate::trap::{self, INDEX};
use crate::xol::Pool;

/// What a grace period must pass before it is freed.
enum Deferred {
    List(*mut ConsumerList),
    Tables(#[allow(dead_code)] RetiredTables),
    /// A detached consumer's record, and its tag in the threads' hit caches
    /// (purged after this grace period).
    ConsumerRecord(u32, u64),
    /// A record whose tag was purged: free after one more grace period.
    PurgedConsumerRecord(u32),
    ProbeRecord(u32),
    Owner(#[allow(dead_code)] Owner),
}

// SAFETY: the raw list pointer is owned by the writer once unpublished.
unsafe impl Send for Deferred {}

/// Everything the writer lock protects.
#[derive(Default)]
struct WriterState {
    regions: Regions,
    pool: Pool,
    sites: Sites,
    consumers: Consumers,
    free_probes: Vec<u32>,
    next_probe: u32,
    deferred: Vec<Deferred>,
    /// Index entries of removed probes ([`trap::TOMBSTONE`]): address → the
    /// number of thread scans done when its code was restored. The first
    /// scan after that shows no thread still on its way from that trap to
    /// its lookup, and the entry goes.
    tombstones: AddrMap<usize, u64>,
    /// What handlers' code may change, memoized.
    effects: EffectsCache,
    /// Sites that would be fast but could not switch (a thread scan could
    /// not show every thread outside their instructions): tried again at
    /// the next writer operation.
    want_fast: AddrSet<usize>,
    last_retry: Option<std::time::Instant>,
    /// The exit consumers at `ret`s of functions with return probes, by
    /// `ret` address.
    exit_uses: AddrMap<usize, ExitUse>,
    /// The `ret`s each consumer with a return handler ends at, by consumer.
    return_exits: AddrMap<u32, Vec<usize>>,
    /// The loader's (loads, unloads) when module sites were last verified.
    module_generation: Option<(u64, u64)>,
    /// Why reaping consumers whose handlers returned `Remove` failed (their
    /// probe's code could not be restored): the next [`sync`] reports it.
    reap_error: Option<Error>,
}

/// probert's own consumer at one `ret`, shared by the return probes whose
/// invocations may end there.
struct ExitUse {
    /// Its consumer slot.
    idx: u32,
    /// The consumers with return handlers that need it.
    users: usize,
}

/// What one attach request asks for beyond address and handler.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Options {
    pub mode: Mode,
    /// A return handler: the address must be a function's entry.
    pub on_return: Option<Handler>,
}

/// The handler field of exit consumers (never called: the dispatcher
/// handles their kind itself).
unsafe extern "C" fn exit_marker(_: *mut crate::hit::Hit) -> u32 {
    0
}

/// How long a demotion waits for threads to leave the old copy of a run:
/// scans, and the timeout of each (a thread seen inside is asked again until
/// it leaves).
const DEMOTE_PATIENCE: (usize, std::time::Duration) = (10, std::time::Duration::from_millis(200));

/// How often control calls retry the sites that could not be made fast.
const RETRY_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

// SAFETY: everything in WriterState is touched only under the writer lock.
unsafe impl Send for WriterState {}

static STATE: Mutex<Option<WriterState>> = Mutex::new(None);

/// Tombstones at which `sync` scans threads to drop them.
const TOMBSTONE_BATCH: usize = 4096;

/// Between the prepare and the parent/child handlers of a `fork`.
static mut FORK_GUARD: Option<MutexGuard<'static, Option<WriterState>>> = None;

fn lock() -> MutexGuard<'static, Option<WriterState>> {
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
fn with_state<R>(f: impl FnOnce(&mut WriterState) -> Result<R>) -> Result<R> {
    refuse_in_handler()?;
    let mut guard = lock();
    if guard.is_none() {
        *guard = Some(init_state()?);
    }
    let st = guard
        .as_mut()
        .ok_or(Error::Internal("state vanished".into()))?;
    st.reap();
    // Code read in an earlier operation may have changed since (a host
    // rewrites its own code between calls).
    st.forget_reads();
    st.verify_modules();
    st.retry_fast(false);
    let r = f(st);
    st.retire_lost();
    st.forget_reads();
    r
}

fn init_state() -> Result<WriterState> {
    PROBES.init()?;
    CONSUMERS.init()?;
    grace::init();
    // The scan signal (or quiescent points) first: the barrier may need it.
    threads::scan_init()?;
    membarrier::init_barrier()?;
    trap::install()?;
    extern "C" fn prepare() {
        let g = lock();
        // Then the thread scan's lock (scans run under the writer lock;
        // barriers take it alone).
        threads::fork_prepare();
        // SAFETY: atfork handlers of one fork run on one thread, serialised
        // by the lock we now hold.
        unsafe { *std::ptr::addr_of_mut!(FORK_GUARD) = Some(g) };
    }
    extern "C" fn parent() {
        threads::fork_parent();
        // SAFETY: see `prepare`.
        drop(unsafe { (*std::ptr::addr_of_mut!(FORK_GUARD)).take() });
    }
    extern "C" fn child() {
        grace::reset_after_fork(crate::probe::flush_hits);
        crate::sys::code::after_fork_child();
        threads::fork_child();
        // SAFETY: see `prepare`.
        drop(unsafe { (*std::ptr::addr_of_mut!(FORK_GUARD)).take() });
    }
    // SAFETY: registering plain extern "C" functions.
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if rc != 0 {
        return Err(Error::NoMemory("pthread_atfork failed".into()));
    }
    Ok(WriterState {
        sites: Sites::new(membarrier::register_sync_core()),
        ..WriterState::default()
    })
}

/// Initialises probert (idempotent): the `SIGTRAP` handler, the
/// thread-scan signal, the arenas, fork handlers.
pub fn init() -> Result<()> {
    with_state(|_| Ok(()))
}

impl WriterState {
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

    /// Publishes the consumer list of the probe at `addr`, with the
    /// record's clobber classes: widened before a list that needs more is
    /// published, narrowed after (the fast path reads the classes, then the
    /// list; a dispatcher skips a consumer whose classes were not saved —
    /// see `ProbeRecord::clobbers`).
    fn publish_list(&mut self, addr: usize) -> Result<()> {
        let site = self.sites.get(addr).ok_or(Error::Internal(
            "publishing the list of a missing probe".into(),
        ))?;
        let mut entries: Vec<Entry> = site
            .consumers
            .iter()
            .filter_map(|&c| self.consumers.entry(c))
            .collect();
        // An exit consumer after the others: they see the `ret` itself.
        entries.sort_by_key(|e| e.kind == EntryKind::Exit);
        let classes = entries
            .iter()
            .fold(Clobbers::NONE, |acc, e| acc.union(e.clobbers));
        // Any list the inline case does not dispatch goes to the general
        // dispatcher, which is given the whole frame: the trampoline stores
        // it from the start.
        let classes = if ConsumerList::inline_dispatchable(&entries) {
            classes
        } else {
            classes.union(Clobbers::FRAME)
        };
        let rec = PROBES
            .get(site.rec as usize)
            .ok_or(Error::Internal("probe record out of range".into()))?;
        // Ordering: Relaxed — the writer's own value.
        let before = Clobbers(rec.clobbers.load(Ordering::Relaxed));
        // Ordering: Release — a trampoline that reads the wider classes
        // saves them before it can see the list (x86 load order; the
        // dispatcher's Acquire) — pairs with the loads in the trampoline and
        // `fast_dispatch`.
        rec.clobbers
            .store(before.union(classes).0, Ordering::Release);
        // Ordering: Release — the list and the consumer records it names are
        // initialised before a dispatcher can load it (Acquire in
        // `view_speculative` and `fast_dispatch`).
        let old = rec
            .consumers
            .swap(ConsumerList::publishable(entries), Ordering::Release);
        // Ordering: Release — after the list: a trampoline that reads the
        // narrower classes sees the list that needs no more.
        rec.clobbers.store(classes.0, Ordering::Release);
        if !old.is_null() {
            self.deferred.push(Deferred::List(old));
        }
        Ok(())
    }

    /// The classes of register state a handler may change beyond the GPRs
    /// and flags (see `arch::Clobbers`): what the fast path must save around
    /// it. From the analysis of its code ([`crate::effects`]); everything
    /// when that cannot tell.
    fn classes_of(&mut self, handler: Handler) -> Clobbers {
        // probert's own Rust code on the fast path (the general dispatcher,
        // `fast_after`) may use what the compiler may: SSE always (the
        // trampoline saves it before calling Rust), and the AVX and AVX-512
        // registers when the crate is built with those features enabled
        // (`-C target-cpu=native`): then every consumer saves them.
        const RUST: Clobbers = if cfg!(target_feature = "avx512f") {
            Clobbers::VECTOR.union(Clobbers::OPMASK)
        } else if cfg!(target_feature = "avx") {
            Clobbers::VECTOR
        } else {
            Clobbers::NONE
        };
        let c = effects::handler_clobbers(handler as usize, &mut self.effects).union(RUST);
        // Whatever saves the upper vector state saves the whole registers.
        if Clobbers::VECTOR.within(c) {
            c.union(Clobbers::SSE)
        } else {
            c
        }
    }

    /// Attaches every request or none; `opts` has one entry per request, or
    /// one for all, or none (the defaults).
    fn attach_batch(
        &mut self,
        reqs: &[AttachReq],
        opts: &[Options],
        owners: Vec<Option<Owner>>,
    ) -> std::result::Result<Vec<ConsumerId>, (usize, Error)> {
        let opt = |i: usize| match opts {
            [] => Options::default(),
            [one] => *one,
            many => many.get(i).copied().unwrap_or_default(),
        };
        // Return probes: each function's `ret`s get probert's exit consumer
        // (one per `ret`, shared), attached in the same batch.
        let mut all: Vec<AttachReq> = reqs.to_vec();
        let mut kinds: Vec<(Mode, EntryKind, Option<Handler>)> = (0..reqs.len())
            .map(|i| {
                let o = opt(i);
                let kind = if o.on_return.is_some() {
                    EntryKind::Returns
                } else {
                    EntryKind::Plain
                };
                (o.mode, kind, o.on_return)
            })
            .collect();
        let mut exits_of: Vec<Vec<usize>> = vec![Vec::new(); reqs.len()];
        // A new exit consumer's request → the first user request needing it.
        let mut new_exits: AddrMap<usize, usize> = AddrMap::default();
        let mut exit_classes: AddrMap<usize, Clobbers> = AddrMap::default();
        for (i, r) in reqs.iter().enumerate() {
            let Some(on_return) = opt(i).on_return else {
                continue;
            };
            self.sites
                .function_entry(&self.regions, r.addr)
                .map_err(|e| (i, e))?;
            let (rets, chains) = self
                .sites
                .exits(&self.regions, r.addr)
                .map_err(|e| (i, e))?;
            if chains {
                kinds[i].1 = EntryKind::Chain;
            }
            let classes = self.classes_of(on_return);
            for (ret, pop) in rets {
                exits_of[i].push(ret);
                let c = exit_classes.entry(ret).or_insert(Clobbers::NONE);
                *c = c.union(classes);
                if self.exit_uses.contains_key(&ret) || new_exits.contains_key(&ret) {
                    continue;
                }
                new_exits.insert(ret, all.len());
                all.push(AttachReq {
                    addr: ret,
                    handler: exit_marker,
                    user_data: usize::from(pop) as *mut std::ffi::c_void,
                });
                kinds.push((Mode::Auto, EntryKind::Exit, None));
            }
        }
        let mut owners = owners;
        owners.resize_with(all.len(), || None);
        let ids = self
            .attach_inner(&all, &kinds, owners, &exit_classes)
            .map_err(|(k, e)| {
                if k < reqs.len() {
                    return (k, e);
                }
                // An exit consumer: blame the first request that needed it.
                let ret = all[k].addr;
                let user = exits_of.iter().position(|x| x.contains(&ret)).unwrap_or(0);
                let e = Error::unsupported(
                    reqs[user].addr,
                    format!("its return at {ret:#x} cannot be probed: {e}"),
                );
                (user, e)
            })?;
        // Bookkeeping: every exit consumer's users; wider classes republished.
        // The handlers may already have run (the lists are published), and
        // a consumer whose handler returned `Remove` is still counted: its
        // reaping, later, is what lets its exits go.
        for (&ret, &k) in &new_exits {
            if let Some(idx) = self.consumers.slot_of(ids[k]) {
                self.exit_uses.insert(ret, ExitUse { idx, users: 0 });
            }
        }
        let mut widened = Vec::new();
        for (i, exits) in exits_of.into_iter().enumerate() {
            if exits.is_empty() && !kinds[i].1.returns() {
                continue;
            }
            let Some(idx) = self.consumers.slot_of(ids[i]) else {
                continue;
            };
            for &ret in &exits {
                if let Some(u) = self.exit_uses.get_mut(&ret) {
                    u.users += 1;
                    let c = exit_classes.get(&ret).copied().unwrap_or(Clobbers::ALL);
                    if self.consumers.widen_clobbers(u.idx, c) {
                        widened.push(ret);
                    }
                }
            }
            self.return_exits.insert(idx, exits);
        }
        for ret in widened {
            self.publish_list(ret).map_err(|e| (0, e))?;
        }
        Ok(ids[..reqs.len()].to_vec())
    }

    /// Attaches every request or none, each of the given mode and kind
    /// (`exit_classes`: the classes of the return handlers each new exit
    /// consumer serves).
    fn attach_inner(
        &mut self,
        reqs: &[AttachReq],
        kinds: &[(Mode, EntryKind, Option<Handler>)],
        owners: Vec<Option<Owner>>,
        exit_classes: &AddrMap<usize, Clobbers>,
    ) -> std::result::Result<Vec<ConsumerId>, (usize, Error)> {
        let modes: Vec<Mode> = kinds.iter().map(|k| k.0).collect();
        let modes = &modes[..];
        if reqs.len() > self.consumers.room() {
            return Err((0, Error::NoMemory("too many consumers".into())));
        }
        // 1. Prepare new sites (nothing built or visible yet).
        let mut prepared: Vec<PreparedSite> = Vec::with_capacity(reqs.len());
        // Address → index in `prepared`, so a large batch stays linear.
        let mut prepared_at: AddrMap<usize, usize> =
            AddrMap::with_capacity_and_hasher(reqs.len(), Default::default());
        // A return probe's exits, where not asked to be traps, get exit runs
        // where they can: their hits then take no signal.
        let mut all: Vec<usize> = reqs.iter().map(|r| r.addr).collect();
        all.sort_unstable();
        all.dedup();
        for (i, r) in reqs.iter().enumerate() {
            if r.addr == 0 {
                return Err((i, Error::InvalidArgument("null address".into())));
            }
            // A retired probe's consumers must be detached before the new
            // code there can be probed.
            if self.sites.get(r.addr).is_some_and(|s| s.lost().is_some()) {
                return Err((i, Error::CodeChanged { addr: r.addr }));
            }
            if !self.sites.contains(r.addr) && !prepared_at.contains_key(&r.addr) {
                let exit_run = kinds
                    .get(i)
                    .is_some_and(|k| k.1 == EntryKind::Exit && k.0 != Mode::Trap);
                let prepare = |this: &mut Self| {
                    if exit_run {
                        this.sites
                            .prepare_exit(&this.regions, &this.pool, r.addr, &all)
                    } else {
                        this.sites.prepare(&this.regions, &this.pool, r.addr)
                    }
                };
                let mut p = prepare(self);
                if let Ok(Prepared::InsideRun(holder)) = p {
                    self.demote(holder, r.addr).map_err(|e| (i, e))?;
                    p = prepare(self);
                }
                let p = match p.map_err(|e| (i, e))? {
                    Prepared::Site(p) => p,
                    Prepared::InsideRun(_) => {
                        return Err((i, Error::Internal("a demoted site kept its run".into())))
                    }
                };
                prepared_at.insert(r.addr, prepared.len());
                prepared.push(p);
            }
        }
        // Two probes never share a patch address (the index finds a site by
        // it): the jump or trap of an `endbr64` entry goes after the
        // `endbr64`, where the next instruction's own probe would go — in
        // `endbr64; ret`, the function's return.
        let mut patches: Vec<(usize, usize)> =
            prepared.iter().map(|p| (p.patch, p.probe)).collect();
        patches.sort_unstable();
        let in_batch = patches
            .windows(2)
            .find(|w| w[0].0 == w[1].0)
            .map(|w| (w[1].1, w[0].1, w[0].0));
        let existing = || {
            prepared.iter().find_map(|p| {
                self.sites
                    .range(
                        p.patch.saturating_sub(4),
                        p.patch + crate::site::PATCH_BEFORE_PROBE + 1,
                    )
                    .find(|(a, s)| *a != p.probe && s.patch == p.patch)
                    .map(|(a, _)| (p.probe, a, p.patch))
            })
        };
        if let Some((probe, other, patch)) = in_batch.or_else(existing) {
            let i = reqs.iter().position(|r| r.addr == probe).unwrap_or(0);
            return Err((
                i,
                Error::unsupported(
                    probe,
                    format!(
                        "its probe would patch {patch:#x}, as the probe at {other:#x} does (the \
                         probe of an endbr64 entry goes after the endbr64)"
                    ),
                ),
            ));
        }
        // A run a jump would displace must hold no other probe of the batch
        // (nor the patch address of an existing one): those sites are trap
        // only.
        // An exit run that meets another site of the batch becomes the
        // plain site at its `ret` (the other keeps its run).
        let mut spans: Vec<(usize, usize, usize)> = prepared
            .iter()
            .map(|p| {
                let (a, b) = p.span();
                (a, b, p.probe)
            })
            .collect();
        spans.sort_unstable();
        for p in prepared.iter_mut().filter(|p| p.is_exit()) {
            let (j, e) = p.span();
            let from = spans.partition_point(|s| s.0 + 4 * crate::site::PATCH_BEFORE_PROBE < j);
            if let Some(&(_, _, other)) = spans[from..]
                .iter()
                .take_while(|s| s.0 < e)
                .find(|s| s.2 != p.probe && s.0 < e && j < s.1)
            {
                p.refuse_fast(TrapOnly::ProbeInside(other));
            }
        }
        let probes: Vec<usize> = prepared.iter().map(|p| p.probe).collect();
        let mut sorted = probes.clone();
        sorted.sort_unstable();
        for p in &mut prepared {
            if let Some((j, e)) = p.run() {
                // (An exit run holds its own probe, at its end.)
                let a = sorted.partition_point(|&x| x <= j);
                let inside = sorted[a..]
                    .iter()
                    .take_while(|&&x| x < e)
                    .find(|&&x| x != p.probe)
                    .copied();
                let existing = self
                    .sites
                    .range(j.saturating_sub(4) + 1, e + crate::site::PATCH_BEFORE_PROBE)
                    .find(|(a, s)| *a != p.probe && s.patch > j && s.patch < e);
                if let Some(x) = inside.or(existing.map(|(a, _)| a)) {
                    p.refuse_fast(TrapOnly::ProbeInside(x));
                }
            }
        }
        for (i, r) in reqs.iter().enumerate() {
            if modes.get(i) != Some(&Mode::Fast) {
                continue;
            }
            let refusal = match self.sites.get(r.addr) {
                Some(s) if s.pins > 0 => Some("another consumer keeps it on the trap path".into()),
                Some(s) if s.fast_capable() => None,
                Some(_) => self.sites.refusal(&self.regions, r.addr),
                None => prepared_at
                    .get(&r.addr)
                    .and_then(|&k| prepared[k].refusal()),
            };
            if let Some(why) = refusal {
                let why = format!("cannot be a fast site: {why}");
                return Err((i, Error::unsupported(r.addr, why)));
            }
        }
        // 2. Records, then the stubs that name them.
        let mut recs = Vec::with_capacity(prepared.len());
        for p in &prepared {
            match self.alloc_probe_record() {
                Ok(r) => recs.push(r),
                Err(e) => {
                    let at = p.probe;
                    let index = reqs.iter().position(|r| r.addr == at).unwrap_or(0);
                    self.free_probes.extend(recs);
                    return Err((index, e));
                }
            }
        }
        let mut built: Vec<BuiltSite> = Vec::with_capacity(prepared.len());
        for (p, &rec_idx) in prepared.into_iter().zip(&recs) {
            let at = p.probe;
            let record = PROBES
                .get(rec_idx as usize)
                .map_or(0, |r| r as *const ProbeRecord as usize);
            match self.sites.build(&mut self.pool, p, record) {
                Ok(b) => built.push(b),
                Err(e) => {
                    let index = reqs.iter().position(|r| r.addr == at).unwrap_or(0);
                    for b in built {
                        b.unbuild(&mut self.pool);
                    }
                    self.free_probes.extend(recs);
                    return Err((index, e));
                }
            }
        }
        // The stubs' bytes, in as few writes as runs of adjacent slots.
        if let Err(e) = self.pool.flush() {
            for b in built {
                b.unbuild(&mut self.pool);
            }
            self.free_probes.extend(recs);
            return Err((0, e));
        }
        // A FAST request whose stub could not be built fails before anything
        // is visible.
        for (i, r) in reqs.iter().enumerate() {
            if modes.get(i) != Some(&Mode::Fast) {
                continue;
            }
            if let Some(b) = built.iter().find(|b| b.prepared.probe == r.addr) {
                if let Some(why) = b.prepared.refusal() {
                    let e = Error::unsupported(r.addr, format!("cannot be a fast site: {why}"));
                    for b in built {
                        b.unbuild(&mut self.pool);
                    }
                    self.free_probes.extend(recs);
                    return Err((i, e));
                }
            }
        }
        // 3. Fill the records, index them, write the traps (empty consumer
        //    lists: a thread that traps now only runs the displaced
        //    instructions).
        let mut entries = Vec::with_capacity(built.len());
        for (b, &rec_idx) in built.iter().zip(&recs) {
            fill_record(b, rec_idx).map_err(|e| (0, e))?;
            entries.push((b.prepared.patch, rec_idx as usize));
        }
        // (A tombstone's key is still indexed: it is overwritten.)
        if let Some(t) = INDEX.insert_all(&mut entries) {
            self.deferred.push(Deferred::Tables(t));
        }
        for &(patch, _) in &entries {
            self.tombstones.remove(&patch);
        }
        debug_assert!(
            self.pool.is_flushed(),
            "a stub is armed before it is written"
        );
        if let Err((failed, e)) = self.sites.arm(&built) {
            // Undo: the traps are restored; unindex and free after a grace
            // period (a thread may have trapped and be inside a stub).
            let index = built
                .iter()
                .position(|b| b.prepared.patch == failed)
                .and_then(|k| reqs.iter().position(|r| r.addr == built[k].prepared.probe))
                .unwrap_or(0);
            let patches: Vec<usize> = built.iter().map(|b| b.prepared.patch).collect();
            self.tombstone(&patches);
            for (b, rec_idx) in built.into_iter().zip(recs) {
                if let Some(rec) = PROBES.get(rec_idx as usize) {
                    // Ordering: Relaxed — the record is no longer indexed.
                    rec.addr.store(0, Ordering::Relaxed);
                }
                b.retire(&mut self.pool);
                self.deferred.push(Deferred::ProbeRecord(rec_idx));
            }
            return Err((index, e));
        }
        let new_sites: Vec<usize> = built.iter().map(|b| b.prepared.probe).collect();
        for (b, rec_idx) in built.into_iter().zip(recs) {
            self.sites.insert_armed(b, rec_idx);
        }
        // 4. Consumers (not yet published).
        let mut ids = Vec::with_capacity(reqs.len());
        let mut idxs = Vec::with_capacity(reqs.len());
        let mut owners = owners.into_iter();
        let mut classes: AddrMap<usize, Clobbers> = AddrMap::default();
        for (i, r) in reqs.iter().enumerate() {
            let (mode, kind, on_return) = kinds.get(i).copied().unwrap_or_default();
            let clobbers = match kind {
                EntryKind::Exit => exit_classes.get(&r.addr).copied().unwrap_or(Clobbers::ALL),
                _ => match classes.get(&(r.handler as usize)) {
                    Some(&c) => c,
                    None => {
                        let c = self.classes_of(r.handler);
                        classes.insert(r.handler as usize, c);
                        c
                    }
                },
            };
            let attachment = Attachment {
                addr: r.addr,
                handler: r.handler,
                user_data: r.user_data as usize,
                mode,
                owner: owners.next().flatten(),
                clobbers,
                kind,
                on_return,
            };
            let (id, idx) = self
                .consumers
                .attach(attachment)
                .map_err(|e| (ids.len(), e))?;
            if let Some(s) = self.sites.get_mut(r.addr) {
                s.consumers.push(idx);
                s.pins += u32::from(mode == Mode::Trap);
                s.fast_pins += u32::from(mode == Mode::Fast);
            }
            ids.push(id);
            idxs.push(idx);
        }
        let mut addrs: Vec<usize> = reqs.iter().map(|r| r.addr).collect();
        addrs.sort_unstable();
        addrs.dedup();
        // 5. Sites that can be fast become fast, before any handler can run.
        //    A FAST request whose site did not make it fails the batch;
        //    anything else stays on the trap path, which serves every
        //    consumer just the same.
        let (stuck, switched) = self.sites.apply_modes(&addrs, &self.pool.retired_ranges());
        if let Some(i) = reqs
            .iter()
            .enumerate()
            .position(|(i, r)| modes.get(i) == Some(&Mode::Fast) && stuck.contains(&r.addr))
        {
            let e = switched.err().unwrap_or_else(|| {
                Error::unsupported(reqs[i].addr, "the site could not be made fast")
            });
            // Nothing was published: detaching leaves existing sites as
            // they were and removes the new ones.
            let _ = self.detach_nosync(&idxs);
            let _ = new_sites;
            return Err((i, e));
        }
        // The others that could not switch now try again later.
        self.want_fast.extend(stuck);
        // 6. Their lists: handlers run from here — the `ret`s of return
        //    probes first, so no invocation begins that could end unseen.
        let exits: AddrSet<usize> = reqs
            .iter()
            .zip(kinds)
            .filter(|(_, k)| k.1 == EntryKind::Exit)
            .map(|(r, _)| r.addr)
            .collect();
        addrs.sort_by_key(|a| !exits.contains(a));
        for &a in &addrs {
            self.publish_list(a).map_err(|e| (0, e))?;
        }
        Ok(ids)
    }

    /// Makes room for a probe at `inside`, an instruction inside the run
    /// the fast-capable site at `probe` displaces: that site goes on with
    /// its first instruction alone ([`Sites::demote`]). Its consumers keep
    /// being called throughout (on the trap path while it switches); a FAST
    /// consumer there refuses, unless that instruction is long enough for a
    /// jump by itself.
    ///
    /// On return no thread runs the old copy of the run any more, so the
    /// instruction at `inside`, once armed, misses no execution: the trap
    /// handler that chose the old copy leaves its read-side section only
    /// after writing the address (a grace period covers it), and a thread
    /// scan then sees every thread out of that copy and out of the code
    /// that leads into it.
    fn demote(&mut self, probe: usize, inside: usize) -> Result<()> {
        let site = self
            .sites
            .get(probe)
            .ok_or(Error::Internal("demoting a missing site".into()))?;
        let rec_idx = site.rec;
        let rec = PROBES
            .get(rec_idx as usize)
            .ok_or(Error::Internal("probe record out of range".into()))?;
        let (resume, old) = self.sites.demote(
            &mut self.pool,
            probe,
            rec as *const ProbeRecord as usize,
            inside,
        )?;
        // Ordering: Release — the new stub was written before a trap handler
        // may resume in it (pairs with the validated load in
        // `view_speculative`; the stub's bytes are written by the kernel
        // before `write_code` returned).
        rec.stub.store(resume, Ordering::Release);
        let range = old.range();
        old.retire(&mut self.pool);
        grace::synchronize();
        if let Some(range) = range {
            let mut ranges = vec![range, crate::fast::code_range()];
            ranges.extend(self.pool.trampolines());
            // Patient: threads on their way through the trampolines for
            // other sites look the same as one bound for the old copy, and
            // on a loaded machine each is asked again only when it runs.
            let (tries, timeout) = DEMOTE_PATIENCE;
            if !crate::xol::quiet_within(&ranges, threads::Depth::Frames, tries, timeout)? {
                return Err(Error::unsupported(
                    inside,
                    format!(
                        "a thread stays inside the displaced copy of the instructions of the \
                         probe at {probe:#x}"
                    ),
                ));
            }
        }
        // The first instruction alone may be fast again.
        let (_, switched) = self
            .sites
            .apply_modes(&[probe], &self.pool.retired_ranges());
        switched
    }

    /// Detaches consumers (already validated), removing probes left with
    /// none. Costs no grace period; the caller synchronises.
    fn detach_nosync(&mut self, idxs: &[u32]) -> Result<()> {
        // The sites this detach leaves without consumers are restored first:
        // one whose write fails keeps its consumers, attached and called, and
        // its code as it was (the caller gets the error and may try again).
        // In address order: the sites are then visited in the order they
        // are stored (a hash order would miss the cache at every site).
        let mut leaving: Vec<usize> = idxs
            .iter()
            .filter_map(|&i| self.consumers.addr_of(i))
            .collect();
        leaving.sort_unstable();
        let emptied: Vec<usize> = leaving
            .chunk_by(|a, b| a == b)
            .filter(|run| {
                self.sites
                    .get(run[0])
                    .is_some_and(|s| s.consumers.iter().count() <= run.len())
            })
            .map(|run| run[0])
            .collect();
        let (removed, kept) = self.sites.disarm(&mut self.pool, &emptied);
        self.finish_removed(removed);
        let kept_error = kept.first().map(|(_, e)| e.clone());
        let idxs: Vec<u32> = idxs
            .iter()
            .copied()
            .filter(|&i| {
                !self
                    .consumers
                    .addr_of(i)
                    .is_some_and(|a| kept.iter().any(|(k, _)| *k == a))
            })
            .collect();
        let mut touched = Vec::new();
        let mut queue: Vec<u32> = idxs;
        while let Some(idx) = queue.pop() {
            // A consumer with a return handler: the exit consumers only it
            // still needs go too.
            for ret in self.return_exits.remove(&idx).unwrap_or_default() {
                if let Some(u) = self.exit_uses.get_mut(&ret) {
                    u.users = u.users.saturating_sub(1);
                    if u.users == 0 {
                        queue.push(u.idx);
                        self.exit_uses.remove(&ret);
                    }
                }
            }
            let Some((a, tag)) = self.consumers.detach(idx) else {
                continue;
            };
            if let Some(s) = self.sites.get_mut(a.addr) {
                s.consumers.remove(idx);
                s.pins -= u32::from(a.mode == Mode::Trap);
                s.fast_pins -= u32::from(a.mode == Mode::Fast);
                touched.push(a.addr);
            }
            self.deferred.push(Deferred::ConsumerRecord(idx, tag));
            if let Some(o) = a.owner {
                self.deferred.push(Deferred::Owner(o));
            }
        }
        touched.sort_unstable();
        touched.dedup();
        let (empty, busy): (Vec<usize>, Vec<usize>) = touched
            .into_iter()
            .partition(|&a| self.sites.get(a).is_some_and(|s| s.consumers.is_empty()));
        for &a in &busy {
            self.publish_list(a)?;
        }
        // A detach only ever lets a site become fast (a TRAP pin left). If
        // it cannot (a thread scan sees a thread in its run, a write fails)
        // it stays on the trap path, which serves its consumers the same:
        // the detach itself is done, and must not report failure (its
        // caller would skip the grace period `detach` waits for).
        let (stuck, _) = self.sites.apply_modes(&busy, &self.pool.retired_ranges());
        self.want_fast.extend(stuck);
        let r = self.remove_probes(&empty);
        match kept_error {
            Some(e) => Err(e),
            None => r,
        }
    }

    /// Tries again to switch the sites that could not be made fast: with
    /// one short scan at most every [`RETRY_EVERY`], or (`now`) with the
    /// usual patience.
    fn retry_fast(&mut self, now: bool) {
        if self.want_fast.is_empty()
            || (!now && self.last_retry.is_some_and(|t| t.elapsed() < RETRY_EVERY))
        {
            return;
        }
        self.last_retry = Some(std::time::Instant::now());
        let sites: Vec<usize> = self.want_fast.drain().collect();
        // `sync` may wait; other calls try once, briefly.
        let retired = self.pool.retired_ranges();
        let stuck = if now {
            self.sites.apply_modes(&sites, &retired).0
        } else {
            self.sites
                .apply_modes_briefly(&sites, &retired, std::time::Duration::from_millis(2))
        };
        self.want_fast.extend(stuck);
    }

    /// Removes probes (their consumers are gone): restore, unindex, defer.
    /// A probe whose code could not be written stays, armed and without
    /// consumers; the first such error is returned.
    fn remove_probes(&mut self, addrs: &[usize]) -> Result<()> {
        if addrs.is_empty() {
            return Ok(());
        }
        let (removed, kept) = self.sites.disarm(&mut self.pool, addrs);
        self.finish_removed(removed);
        match kept.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// The index entries and records of probes [`Sites::disarm`] removed:
    /// tombstoned, unpublished, deferred.
    fn finish_removed(&mut self, removed: Vec<(u32, usize)>) {
        let patches: Vec<usize> = removed.iter().map(|&(_, patch)| patch).collect();
        self.tombstone(&patches);
        for (rec_idx, _) in removed {
            if let Some(rec) = PROBES.get(rec_idx as usize) {
                // Ordering: Release — unpublishes the list; the dispatchers
                // that loaded it are covered by the grace period.
                let old = rec.consumers.swap(std::ptr::null_mut(), Ordering::Release);
                if !old.is_null() {
                    self.deferred.push(Deferred::List(old));
                }
            }
            self.deferred.push(Deferred::ProbeRecord(rec_idx));
        }
    }

    /// Tombstones the index entries of sites found retired (their code
    /// changed or is gone) and retires their stubs.
    fn retire_lost(&mut self) {
        let patches = self.sites.retire_lost(&mut self.pool);
        self.tombstone(&patches);
    }

    /// After the loader loaded or unloaded a module: retires the probes in
    /// module code whose code is gone or no longer ours (a module unloaded,
    /// perhaps another loaded at its address), so nothing is ever written
    /// there again. One `dl_iterate_phdr` call when nothing changed.
    fn verify_modules(&mut self) {
        let now = crate::sys::modules::generation();
        if now.is_some() && now == self.module_generation {
            return;
        }
        self.module_generation = now;
        self.sites.verify(false);
        self.retire_lost();
    }

    /// Forgets what this writer operation read of code and modules (at its
    /// edges: the host may change both between operations).
    fn forget_reads(&mut self) {
        self.sites.forget_reads();
        self.regions.forget_lookups();
    }

    /// Replaces the index entries of probes whose code is restored by
    /// tombstones ([`trap::TOMBSTONE`]), in one latch step per copy of the
    /// index: a trap that happened before the restore and looks up only now
    /// re-executes the instruction.
    fn tombstone(&mut self, addrs: &[usize]) {
        let scans = self.pool.scans();
        let mut entries: Vec<(usize, usize)> =
            addrs.iter().map(|&a| (a, trap::TOMBSTONE)).collect();
        // Nearly always overwrites (the probe's entry), but a retired site's
        // tombstone may have expired before its consumers are detached.
        if let Some(t) = INDEX.insert_all(&mut entries) {
            self.deferred.push(Deferred::Tables(t));
        }
        for &a in addrs {
            self.tombstones.insert(a, scans);
        }
    }

    /// Drops the tombstones that a thread scan has made unneeded; scans for
    /// them if there are many (a scan costs one signal per thread).
    fn expire_tombstones(&mut self) {
        if self.tombstones.len() >= TOMBSTONE_BATCH {
            // A failed scan leaves them for the next one.
            let _ = self.pool.scan();
        }
        let scans = self.pool.scans();
        let before = self.tombstones.len();
        let mut expired = Vec::new();
        self.tombstones.retain(|&addr, &mut at| {
            let keep = at >= scans;
            if !keep {
                expired.push(addr);
            }
            keep
        });
        INDEX.remove_all(&mut expired);
        if self.tombstones.len() < before / 4 {
            self.tombstones.shrink_to_fit();
        }
    }

    /// Detaches consumers whose handler returned `Remove`.
    fn reap(&mut self) {
        // Ordering: Acquire — pairs with the Release in `request_removal`.
        if REAP_PENDING.swap(0, Ordering::Acquire) == 0 {
            return;
        }
        let removed = self.consumers.removed();
        if let Err(e) = self.detach_nosync(&removed) {
            // No caller asked for this: the next `sync` reports it. Consumers
            // still marked removed are tried again by the next control call.
            if !self.consumers.removed().is_empty() {
                // Ordering: Relaxed — the writer's own flag, re-read under
                // the lock.
                REAP_PENDING.store(1, Ordering::Relaxed);
            }
            self.reap_error.get_or_insert(e);
        }
    }

    /// Frees what a grace period protected.
    fn free_deferred(&mut self, items: Vec<Deferred>) -> Vec<Owner> {
        let mut owners = Vec::new();
        // Detached consumers' tags leave the hit caches now; their records
        // wait one more grace period (see `Consumers::release`).
        let tags: AddrSet<u64> = items
            .iter()
            .filter_map(|d| match d {
                Deferred::ConsumerRecord(_, tag) => Some(*tag),
                _ => None,
            })
            .collect();
        if !tags.is_empty() {
            grace::purge_hit_entries(&tags);
        }
        for d in items {
            match d {
                Deferred::List(p) => {
                    // SAFETY: `p` came from `ConsumerList::publishable`, was
                    // unpublished, and a grace period has passed.
                    drop(unsafe { Box::from_raw(p) });
                }
                Deferred::Tables(t) => drop(t),
                Deferred::ConsumerRecord(i, _) => {
                    self.deferred.push(Deferred::PurgedConsumerRecord(i));
                }
                Deferred::PurgedConsumerRecord(i) => self.consumers.release(i),
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

/// Fills probe record `rec_idx` for the built site `b`, before it is
/// indexed.
fn fill_record(b: &BuiltSite, rec_idx: u32) -> Result<()> {
    let rec = PROBES
        .get(rec_idx as usize)
        .ok_or(Error::Internal("probe record out of range".into()))?;
    let p = &b.prepared;
    let words = b.displaced().encode();
    // Ordering (all): Relaxed — published by the index update's latch bump
    // (Release); a fast stub naming this record checks
    // `addr`, which is set last (`fast_dispatch`).
    rec.report.store(p.probe, Ordering::Relaxed);
    rec.len.store(u32::from(p.len), Ordering::Relaxed);
    for (w, v) in rec.displaced.iter().zip(words) {
        w.store(v, Ordering::Relaxed);
    }
    rec.stub.store(b.resume_stub(), Ordering::Relaxed);
    rec.consumers.store(std::ptr::null_mut(), Ordering::Relaxed);
    rec.clobbers.store(0, Ordering::Relaxed);
    // Ordering: Release — the fields above before the address.
    rec.addr.store(p.patch, Ordering::Release);
    Ok(())
}

/// What [`code_write`] did with a probe whose instruction the write changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rewritten {
    /// The probe now serves the new instruction: its consumers are called
    /// as before.
    Rederived {
        /// The probe address.
        probe: usize,
    },
    /// The new code cannot be probed there (not an instruction boundary
    /// any more, an instruction probert cannot displace, an `int3` of the
    /// host's): the new bytes are in place and the probe is retired
    /// ([`Error::CodeChanged`]); its consumers stay attached until detached.
    Retired {
        /// The probe address.
        probe: usize,
    },
}

/// Writes `bytes` at `addr`, inside a registered JIT region, keeping the
/// probes there coherent: the host's way to patch code under probes (inline
/// caches, trace linking, deoptimisation and OSR patches).
///
/// Each probe whose displaced instruction the write changes keeps its trap
/// throughout: the rest of the new bytes are written behind it, cores are
/// serialised, and the probe is re-derived from the new code — a thread
/// that reaches it runs either the old instruction (until the call has
/// switched it) or the new one, never a mix — or retired if the new code
/// cannot be probed there. The returned list says which, probe by probe.
/// Bytes that no probe covers are written as the host's own write would
/// write them: the host keeps the rules it follows without probert (a
/// range no thread executes, or one instruction replaced by an aligned
/// atomic-sized write).
///
/// Code the host writes *behind* probert's back (not through this call) is
/// found at the next write probert makes there: nothing is written over
/// it, and the probe is retired ([`Error::CodeChanged`]).
///
/// Errors: [`Error::NoRegion`] outside JIT regions, [`Error::InvalidArgument`]
/// for an empty write or one that leaves its region, [`Error::Protect`] if
/// the write (or the switch of a fast probe back to its trap) fails — then
/// the probes are as they were.
pub fn code_write(addr: usize, bytes: &[u8]) -> Result<Vec<Rewritten>> {
    with_state(|st| st.code_write(addr, bytes))
}

impl WriterState {
    fn code_write(&mut self, addr: usize, bytes: &[u8]) -> Result<Vec<Rewritten>> {
        if bytes.is_empty() {
            return Err(Error::InvalidArgument("an empty code write".into()));
        }
        let end = addr.checked_add(bytes.len()).ok_or(Error::InvalidArgument(
            "a code write past the address space".into(),
        ))?;
        let target = self.regions.resolve(addr)?.target;
        let Some(region) = target.region else {
            return Err(Error::NoRegion { addr });
        };
        if end > target.end {
            return Err(Error::InvalidArgument(
                "a code write must stay inside its region".into(),
            ));
        }
        let affected = self.sites.affected(addr, end);
        // Only the trap stays ours while the instruction changes.
        self.sites.switch_back(&affected)?;
        let mut out = bytes.to_vec();
        let mut heads = Vec::with_capacity(affected.len());
        for &probe in &affected {
            let Some((patch, orig)) = self.sites.head_of(probe) else {
                continue;
            };
            let new = match patch.checked_sub(addr).filter(|&k| k < bytes.len()) {
                Some(k) => {
                    out[k] = crate::arch::TRAP_INSN[0];
                    bytes[k]
                }
                None => orig,
            };
            heads.push((probe, patch, new));
        }
        target.write(addr, &out)?;
        membarrier::sync_core();
        self.sites.forget_region(region);
        let mut report = Vec::with_capacity(heads.len());
        let mut rederived = Vec::new();
        for (probe, patch, new) in heads {
            if self.rederive(probe, patch, new).is_ok() {
                rederived.push(probe);
                report.push(Rewritten::Rederived { probe });
            } else {
                report.push(Rewritten::Retired { probe });
            }
        }
        self.sites.set_overlay(Vec::new());
        let (stuck, _) = self
            .sites
            .apply_modes(&rederived, &self.pool.retired_ranges());
        self.want_fast.extend(stuck);
        Ok(report)
    }

    /// Re-derives the probe at `probe` (its trap at `patch`, the host's new
    /// head byte `new` under it) from the new code: a new record, indexed in
    /// the old one's place, with the same consumers. If the new code cannot
    /// be probed, writes `new` over the trap and retires the probe.
    fn rederive(&mut self, probe: usize, patch: usize, new: u8) -> Result<()> {
        let Some(old) = self.sites.take(probe) else {
            return Err(Error::NotFound);
        };
        self.sites.set_overlay(vec![(patch, new)]);
        let built = match self.sites.prepare(&self.regions, &self.pool, probe) {
            Ok(Prepared::Site(p)) if p.patch == patch => match self.alloc_probe_record() {
                Ok(rec) => {
                    let record = PROBES
                        .get(rec as usize)
                        .map_or(0, |r| r as *const ProbeRecord as usize);
                    match self.sites.build(&mut self.pool, p, record) {
                        Ok(b) if self.pool.flush().is_ok() => Some((b, rec)),
                        Ok(b) => {
                            b.unbuild(&mut self.pool);
                            self.free_probes.push(rec);
                            None
                        }
                        Err(_) => {
                            self.free_probes.push(rec);
                            None
                        }
                    }
                }
                Err(_) => None,
            },
            _ => None,
        };
        let Some((b, rec)) = built else {
            // Cannot be probed: the host's byte goes over the trap.
            self.sites.put_back(old, probe);
            if let Some(site) = self.sites.get(probe) {
                let mut p = [crate::patch::Patch::new(
                    &site.target,
                    patch,
                    &[new],
                    crate::arch::TRAP_INSN,
                    probe,
                )];
                let _ = crate::patch::write_all(&mut p);
            }
            self.sites.retire(probe);
            return Err(Error::CodeChanged { addr: probe });
        };
        fill_record(&b, rec)?;
        // Its list first: no thread may find the new record without it.
        let old_rec = self.sites.insert_rederived(b, rec, old, &mut self.pool);
        self.publish_list(probe)?;
        // Ordering: the latch's (Release) — traps from here find the new
        // record, filled and with its list — pairs with `lookup_speculative`.
        INDEX.replace(patch, rec as usize);
        if let Some(r) = PROBES.get(old_rec as usize) {
            // The old list stays published: a thread still on its way
            // through the old record (it trapped, or entered the old stub,
            // before the index changed) calls the same consumers. It goes
            // with the record, a grace period from now.
            // Ordering: Acquire — the writer's own earlier store; pairs
            // with the Release in `publish_list`.
            let l = r.consumers.load(Ordering::Acquire);
            if !l.is_null() {
                self.deferred.push(Deferred::List(l));
            }
        }
        self.deferred.push(Deferred::ProbeRecord(old_rec));
        Ok(())
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
        st.attach_batch(
            &[req],
            &[Options {
                mode,
                on_return: None,
            }],
            vec![owner],
        )
        .map(|ids| ids[0])
        .map_err(|(_, e)| e)
    })
}

/// Fails if a host replaced our `SIGTRAP` handler after init (and did not
/// declare its own to chain to ours: [`declare_chained_sigtrap_handler`]).
fn ensure_handler() -> Result<()> {
    if crate::sys::signal::trap_handler_installed() {
        Ok(())
    } else {
        Err(Error::Signal(
            "the SIGTRAP handler was replaced after probert installed it (a handler that \
             chains to probert's must be declared with declare_chained_sigtrap_handler)"
                .into(),
        ))
    }
}

/// Declares that the `SIGTRAP` handler the host installed after probert
/// chains to probert's: for every `SIGTRAP` it does not handle itself it
/// calls the `sigaction` it replaced (probert's) with the kernel's three
/// arguments, unchanged, and returns normally afterwards. Until then, a
/// handler installed after probert makes every attach fail with
/// [`Error::Signal`] (probes attached before deliver their hits to the
/// host's handler; detaching them still restores the code).
///
/// Through a declared handler probes work as they do directly, a `SIGTRAP`
/// neither handles goes to the disposition that preceded probert, and stub
/// memory is not reused while a thread is on its way back through the
/// host's handler: thread scans recognise its signal frame. The handler
/// must be installed with `SA_SIGINFO` and `SA_NODEFER` and must not block
/// `SIGTRAP` in its mask (a consumer calling probed code would trap with
/// `SIGTRAP` blocked, which the kernel punishes with death):
/// [`Error::Signal`] otherwise, and when no handler is installed. `Ok` with
/// nothing to declare when the handler installed is probert's own.
/// Initialises probert if needed; not from a handler.
pub fn declare_chained_sigtrap_handler() -> Result<()> {
    with_state(|_| crate::sys::signal::declare_chained_handler())
}

/// Attaches every request or none; on error, the index of the first request
/// that failed.
pub fn attach_batch(reqs: &[AttachReq]) -> std::result::Result<Vec<ConsumerId>, (usize, Error)> {
    attach_batch_with(reqs, &[], Vec::new())
}

/// [`attach_batch`] with options (one per request, or one for all) and
/// owners (dropped after detach).
pub(crate) fn attach_batch_with(
    reqs: &[AttachReq],
    opts: &[Options],
    owners: Vec<Option<Owner>>,
) -> std::result::Result<Vec<ConsumerId>, (usize, Error)> {
    refuse_in_handler().map_err(|e| (reqs.len(), e))?;
    let mut guard = lock();
    if guard.is_none() {
        *guard = Some(init_state().map_err(|e| (0, e))?);
    }
    let st = guard
        .as_mut()
        .ok_or((0, Error::Internal("state vanished".into())))?;
    st.reap();
    st.forget_reads();
    st.verify_modules();
    st.retry_fast(false);
    ensure_handler().map_err(|e| (0, e))?;
    if opts.iter().any(|o| o.on_return.is_some()) {
        crate::shadow::init();
    }
    let r = st.attach_batch(reqs, opts, owners);
    st.retire_lost();
    st.forget_reads();
    r
}

/// Detaches without waiting: the handler may still be running (or about to
/// run) on other threads until the next [`sync`].
pub fn detach_nosync(id: ConsumerId) -> Result<()> {
    with_state(|st| {
        let idx = st.consumers.lookup(id)?;
        st.detach_nosync(&[idx])
    })
}

/// Detaches every consumer or none (all handles are validated first), then
/// waits one grace period for all of them together — also when a handle is
/// stale (all or nothing: nothing is detached, but a handle a handler's
/// `Remove` made stale may still have calls running, which the caller may
/// be about to free the user data of; see [`detach`]).
pub fn detach_batch(ids: &[ConsumerId]) -> Result<()> {
    let validated = with_state(|st| {
        let mut idxs = Vec::with_capacity(ids.len());
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        for &id in ids {
            let idx = st.consumers.lookup(id)?;
            if !seen.insert(idx) {
                return Err(Error::InvalidArgument(
                    "a handle appears twice in the batch".into(),
                ));
            }
            idxs.push(idx);
        }
        st.detach_nosync(&idxs)
    });
    // Also after a failed write: the consumers of other sites are detached,
    // and their handlers must be done when this returns.
    let synced = grace_period();
    validated.and(synced)
}

/// Detaches one consumer and waits until its handler can no longer run.
pub fn detach(id: ConsumerId) -> Result<()> {
    // A consumer whose handler returned `Remove` has a stale handle, but
    // calls that began before the removal may still be running: wait for
    // them as well (and after a failed write, which leaves the consumer
    // attached), so that after `detach` returns no call of a consumer it
    // detached runs, whatever it returns.
    let r = detach_nosync(id);
    let synced = grace_period();
    r.and(synced)
}

/// Waits one grace period: every handler call that began before `sync` has
/// returned when it returns, and everything detached before it is freed.
/// It also retries, once, the switch of sites that would be fast but could
/// not switch while a thread was inside their instructions (every control
/// call does that too, at most every 20 ms). Must not be called from a
/// handler.
///
/// It also reports a failure to detach consumers whose handlers returned
/// `Remove` (which control calls do on the side, and retry while it fails):
/// the last error that kept their probe's code from being restored. [`detach`] and
/// [`detach_batch`] wait the same grace period but report only their own
/// errors.
pub fn sync() -> Result<()> {
    grace_period()?;
    let reaped = lock().as_mut().and_then(|st| st.reap_error.take());
    reaped.map_or(Ok(()), Err)
}

/// [`sync`] without the report of removed consumers.
fn grace_period() -> Result<()> {
    if grace::in_section() {
        return Err(Error::InvalidArgument(
            "sync (or detach) called from inside a handler would wait for itself".into(),
        ));
    }
    let (items, snap) = with_state(|st| {
        st.retry_fast(true);
        crate::shadow::reclaim();
        Ok((std::mem::take(&mut st.deferred), st.pool.grace_snapshot()))
    })?;
    grace::synchronize();
    let owners = {
        let mut guard = lock();
        let st = guard
            .as_mut()
            .ok_or(Error::Internal("state vanished".into()))?;
        st.pool.after_grace_period(snap);
        st.expire_tombstones();
        st.free_deferred(items)
    };
    // Dropping owners runs user code (closure destructors): outside the lock.
    drop(owners);
    Ok(())
}

/// The instruction starts of the function around `addr`, ascending: module
/// code whose function probert knows the extent of (any ELF code with
/// `.eh_frame`, or a sized symbol), or a function of a registered JIT region
/// (the whole region unless the host declared its functions,
/// [`region_functions`]). Each is an address `attach` accepts as an
/// instruction boundary (attaching may still refuse it for other reasons).
/// [`Error::NoRegion`] where no function is known.
pub fn instructions(addr: usize) -> Result<Vec<usize>> {
    with_state(|st| st.sites.instructions(&st.regions, addr))
}

/// Statistics of a consumer.
pub fn stats(id: ConsumerId) -> Result<Stats> {
    with_state(|st| {
        let idx = st.consumers.lookup(id)?;
        st.consumers.stats(idx, grace::pending_hits)
    })
}

/// Registers a JIT region: [`region_add_with`] with the default options.
///
/// What it accepts: a range in user space of at most
/// [`MAX_REGION_LEN`](crate::MAX_REGION_LEN) bytes, overlapping no
/// registered region, in which something is mapped. Parts of it may be
/// reserved `PROT_NONE`, unmapped, or not executable yet: attaching there
/// fails with [`Error::Protect`] and changes nothing, and works once the host
/// has made that memory executable.
pub fn region_add(desc: RegionDesc) -> Result<RegionId> {
    region_add_with(desc, RegionOptions::default())
}

/// [`region_add`] with [`RegionOptions`].
pub fn region_add_with(desc: RegionDesc, opts: RegionOptions) -> Result<RegionId> {
    with_state(|st| st.regions.add(desc, opts))
}

/// Declares the functions inside a JIT region, as `(start, len)`: probert
/// then decodes instruction boundaries from each function's start (instead
/// of the region's) and lets a fast site displace several instructions only
/// within one function. Applies to probes attached afterwards.
pub fn region_functions(id: RegionId, functions: &[(usize, usize)]) -> Result<()> {
    let bounds: Vec<(usize, usize)> = functions
        .iter()
        .map(|&(s, len)| (s, s.saturating_add(len)))
        .collect();
    with_state(|st| {
        st.regions.set_functions(id, &bounds)?;
        st.sites.forget_region(id);
        Ok(())
    })
}

/// Detaches every probe in the region (one grace period), then forgets it.
///
/// Works also after the host freed, unmapped or reused the memory: the code
/// is restored only where it still holds what probert wrote (see
/// [`Error::CodeChanged`]); nothing is read or written that is not mapped.
/// If restoring fails (a write callback returns an error), the region and
/// the probes that could not be restored stay, their consumers attached;
/// the others are detached, and the error is returned.
pub fn region_remove(id: RegionId) -> Result<()> {
    remove_region(id, false)
}

/// [`region_remove`] for memory the host has already freed or unmapped (or
/// will reuse without telling): probert reads and writes none of it — its
/// probes are retired as they are, their stubs recycled — then forgets the
/// region.
pub fn region_remove_gone(id: RegionId) -> Result<()> {
    remove_region(id, true)
}

fn remove_region(id: RegionId, gone: bool) -> Result<()> {
    let (had_probes, result) = with_state(|st| {
        let (start, end) = st.regions.bounds(id).ok_or(Error::NotFound)?;
        if gone {
            st.sites.forget_range(start, end);
            st.retire_lost();
        }
        let had_probes = st.sites.range(start, end).next().is_some();
        let idxs: Vec<u32> = st
            .sites
            .range(start, end)
            .flat_map(|(_, s)| s.consumers.iter().copied())
            .collect();
        let detached = st.detach_nosync(&idxs);
        // Probes whose consumers all asked for removal already have none.
        let empty: Vec<usize> = st
            .sites
            .range(start, end)
            .filter(|(_, s)| s.consumers.is_empty())
            .map(|(a, _)| a)
            .collect();
        let result = detached.and(st.remove_probes(&empty));
        if result.is_ok() {
            st.sites.forget_region(id);
            st.regions.remove(id)?;
        }
        Ok((had_probes, result))
    })?;
    // A region that never had probes is read by no handler: no grace period.
    if had_probes {
        grace_period()?;
    }
    result
}

/// The mechanism serving a probed address right now (never [`Mode::Auto`]);
/// [`Error::NotFound`] if nothing is attached there.
pub fn probe_mode(addr: usize) -> Result<Mode> {
    with_state(|st| match st.sites.get(addr) {
        None => Err(Error::NotFound),
        Some(s) if s.lost().is_some() => Err(Error::CodeChanged { addr }),
        Some(s) => Ok(s.mode()),
    })
}

/// Why the probe at `addr` cannot be served by the fast path: the reason a
/// [`Mode::Fast`] attach there would be refused for (its function's flow, an
/// instruction that does not relocate, another probe inside the
/// instructions its jump would displace, …). `Ok(None)` when the site is
/// fast-capable — fast now ([`probe_mode`]), or trap only because a
/// [`Mode::Trap`] consumer pins it or a thread was inside its instructions
/// at the switch (retried later). [`Error::NotFound`] if nothing is
/// attached there. For diagnostics and coverage reports: a refusal on the
/// flow re-derives its message, which can take a whole-function decode.
pub fn fast_refusal(addr: usize) -> Result<Option<String>> {
    with_state(|st| {
        if st.sites.get(addr).is_none() {
            return Err(Error::NotFound);
        }
        Ok(st.sites.refusal(&st.regions, addr))
    })
}

/// Stubs that freed probes left behind, not yet reusable: (waiting for a
/// grace period, waiting for a thread scan). For tests and diagnostics.
pub fn retired_stubs() -> (usize, usize) {
    with_state(|st| Ok(st.pool.retired_counts())).unwrap_or_default()
}

/// Number of probes (patched addresses) right now.
pub fn probe_count() -> usize {
    with_state(|st| Ok(st.sites.len())).unwrap_or_default()
}

/// Tries to make retired stubs reusable now: a thread scan, a grace period
/// and another scan (fast stubs need all three).
pub fn recycle_stubs() -> Result<()> {
    with_state(|st| st.pool.recycle())?;
    grace_period()?;
    with_state(|st| {
        st.pool.recycle()?;
        st.expire_tombstones();
        Ok(())
    })
}
