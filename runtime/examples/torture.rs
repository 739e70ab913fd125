//! Torture: threads hammer probed functions and JIT code while other threads
//! attach, detach, batch-detach, detach without waiting, and add and remove
//! JIT regions. At the end it checks, and exits non-zero if any fails:
//!
//! - every call of a static target reached its *steady* consumer (attached
//!   before the hammering began, detached after it ended) exactly once, however
//!   many other consumers and mode switches came and went meanwhile;
//! - no handler ran after its `detach`/`detach_batch`/`sync`/`region_remove`
//!   returned (entry or return handler);
//! - return probes: each *steady* return consumer (on `tt_nop5` and
//!   `tt_sub`, attached throughout) saw every call's entry and return,
//!   `entries == returns + abandoned` with none abandoned; every churned one
//!   (attached and taken down with the others, its return handler sometimes
//!   returning `Remove`) has `returns + abandoned <= entries <= returns +
//!   abandoned + threads` (an invocation still running when its consumer
//!   goes gets no return hit); every return hit saw the right value;
//! - every probed call returned the right value;
//! - all code is byte-identical to the original, and no probe is left;
//! - multi-instruction fast sites were exercised: entry runs went fast, and
//!   probes inside a run demoted its site (static code and JIT code).
//!
//! ```text
//! cargo run --release --example torture -- --threads 4 --seconds 60 --probes 8
//! ```
#![allow(unsafe_code)]
// The targets are assembly and the handlers are C-ABI: every unsafe block
// below is a call of one of them or the attach that names them.
#![allow(clippy::undocumented_unsafe_blocks)]

use std::arch::global_asm;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use probert::{Action, AttachOptions, AttachReq, ConsumerId, Error, Hit, Mode, Reg, RegionDesc};

global_asm!(
    r#"
    .pushsection .data
    .p2align 3
tt_data: .quad 1000
    .popsection
    .text
    .p2align 4
    .globl tt_push
    .type tt_push,@function
tt_push:                      // push rbp (emulated) → rdi + 1
    push rbp
    mov rbp, rsp
    lea rax, [rdi + 1]
    pop rbp
    ret
    .size tt_push, .-tt_push
    .p2align 4
    .globl tt_riprel
    .type tt_riprel,@function
tt_riprel:                    // RIP-relative load (out of line) → rdi + 1000
    mov rax, qword ptr [rip + tt_data]
    add rax, rdi
    ret
    .size tt_riprel, .-tt_riprel
    .p2align 4
    .globl tt_nop5
    .type tt_nop5,@function
tt_nop5:                      // 5-byte NOP (fast-path site) → rdi + 2
    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00
    lea rax, [rdi + 2]
    ret
    .size tt_nop5, .-tt_nop5
    .p2align 4
    .globl tt_sub
    .type tt_sub,@function
tt_sub:                       // sub rsp (out of line) → rdi + 5
    sub rsp, 24
    mov qword ptr [rsp + 8], rdi
    mov rax, qword ptr [rsp + 8]
    add rax, 5
    add rsp, 24
    ret
    .size tt_sub, .-tt_sub
    .p2align 4
    .globl tt_run
    .type tt_run,@function
tt_run:                       // an entry run of three instructions → rdi + 7
    push rbp                  // +0
    mov rbp, rsp              // +1
    push rbx                  // +4
    lea rax, [rdi + 7]        // +5: the steady consumer, after the run
    mov rbx, rax
    pop rbx
    pop rbp
    ret
    .size tt_run, .-tt_run
"#
);

extern "C" {
    fn tt_push(x: u64) -> u64;
    fn tt_riprel(x: u64) -> u64;
    fn tt_nop5(x: u64) -> u64;
    fn tt_sub(x: u64) -> u64;
    fn tt_run(x: u64) -> u64;
}

/// `push rbp; mov rbp, rsp; lea rax, [rdi + 1]; pop rbp; ret`.
const JIT_CODE: [u8; 10] = [0x55, 0x48, 0x89, 0xE5, 0x48, 0x8D, 0x47, 0x01, 0x5D, 0xC3];
const JIT_PAGES: usize = 2;

/// A consumer's record. Leaked: a late call must find it still there.
#[derive(Debug, Default)]
struct Rec {
    hits: AtomicU64,
    /// Set once its detach (or the sync after it) returned.
    dead: AtomicBool,
    /// Return `Remove` on the first hit (a return consumer: on the first
    /// return hit).
    remove: bool,
    removed: AtomicU8,
    /// A return consumer: return handler calls, and what its function adds
    /// to its argument.
    returns: AtomicU64,
    add: u64,
}

static LATE: AtomicU64 = AtomicU64::new(0);
/// Return hits that saw the wrong value, or no session.
static BAD_RETURNS: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" fn handler(hit: *mut Hit) -> u32 {
    // SAFETY: user data is a leaked `Rec`.
    let rec = unsafe { &*((*hit).user_data as *const Rec) };
    // Ordering: SeqCst — against the churn thread's store after detach.
    if rec.dead.load(Ordering::SeqCst) {
        LATE.fetch_add(1, Ordering::Relaxed);
    }
    rec.hits.fetch_add(1, Ordering::Relaxed);
    if rec.remove && rec.removed.swap(1, Ordering::Relaxed) == 0 {
        return Action::Remove as u32;
    }
    Action::Continue as u32
}

/// The entry handler of a return consumer: keeps the argument in the
/// invocation's session.
unsafe extern "C" fn ret_entry(hit: *mut Hit) -> u32 {
    // SAFETY: the dispatcher's hit; user data is a leaked `Rec`.
    let hit = unsafe { &mut *hit };
    let rec = unsafe { &*(hit.user_data as *const Rec) };
    // Ordering: SeqCst — against the churn thread's store after detach.
    if rec.dead.load(Ordering::SeqCst) {
        LATE.fetch_add(1, Ordering::Relaxed);
    }
    rec.hits.fetch_add(1, Ordering::Relaxed);
    let x = hit.regs().get(Reg::Rdi);
    match hit.session() {
        Some(s) => *s = x,
        None => {
            BAD_RETURNS.fetch_add(1, Ordering::Relaxed);
        }
    }
    Action::Continue as u32
}

/// The return handler: checks the value returned against the argument.
unsafe extern "C" fn ret_return(hit: *mut Hit) -> u32 {
    // SAFETY: as `ret_entry`.
    let hit = unsafe { &mut *hit };
    let rec = unsafe { &*(hit.user_data as *const Rec) };
    // Ordering: SeqCst — as in `ret_entry`.
    if rec.dead.load(Ordering::SeqCst) {
        LATE.fetch_add(1, Ordering::Relaxed);
    }
    rec.returns.fetch_add(1, Ordering::Relaxed);
    let rax = hit.regs().get(Reg::Rax);
    let ok = hit.is_return()
        && hit
            .session()
            .is_some_and(|s| s.wrapping_add(rec.add) == rax);
    if !ok {
        BAD_RETURNS.fetch_add(1, Ordering::Relaxed);
    }
    if rec.remove && rec.removed.swap(1, Ordering::Relaxed) == 0 {
        return Action::Remove as u32;
    }
    Action::Continue as u32
}

fn rec(remove: bool) -> &'static Rec {
    Box::leak(Box::new(Rec {
        remove,
        ..Rec::default()
    }))
}

fn ret_rec(remove: bool, add: u64) -> &'static Rec {
    Box::leak(Box::new(Rec {
        remove,
        add,
        ..Rec::default()
    }))
}

/// Attaches a return consumer (`r`) at function entry `f`.
fn attach_returns(f: usize, r: &'static Rec, mode: Mode) -> probert::Result<ConsumerId> {
    unsafe {
        probert::attach_with(
            f,
            ret_entry,
            ud(r),
            AttachOptions {
                mode,
                on_return: Some(ret_return),
            },
        )
    }
}

/// A churned return consumer, once taken down: its record and the
/// invocations its stats counted abandoned just before.
type Churned = (&'static Rec, u64);

fn ud(r: &'static Rec) -> *mut std::ffi::c_void {
    r as *const Rec as *mut std::ffi::c_void
}

fn read(addr: usize, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| unsafe { std::ptr::read_volatile((addr + i) as *const u8) })
        .collect()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    attaches: AtomicU64,
    detaches: AtomicU64,
    batches: AtomicU64,
    nosyncs: AtomicU64,
    regions: AtomicU64,
    cycles: AtomicU64,
    /// Attaches at a multi-instruction entry run after which it was fast.
    runs_fast: AtomicU64,
    /// Attaches inside a run after which its fast site was on the trap path.
    demotions: AtomicU64,
    /// Attaches of churned return consumers.
    return_attaches: AtomicU64,
}

/// Records what an attach at `site` did to a multi-instruction run: `entry`
/// is the run's site (a probe inside its run demotes it), `was_fast` its
/// mode before the attach.
fn note_run(c: &Counters, site: usize, entry: usize, was_fast: bool) {
    let fast = probert::probe_mode(entry) == Ok(Mode::Fast);
    if site == entry && fast {
        c.runs_fast.fetch_add(1, Ordering::Relaxed);
    } else if site != entry && was_fast && !fast {
        c.demotions.fetch_add(1, Ordering::Relaxed);
    }
}

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} wants a number"))
        })
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads = arg(&args, "--threads", 4).max(1) as usize;
    let seconds = arg(&args, "--seconds", 10);
    let probes = arg(&args, "--probes", 8).max(1) as usize;

    // Each function, what it adds, and where its steady consumer goes: the
    // entry, or (tt_run) the instruction after the entry's run, so that the
    // churn creates, demotes and removes the entry's site over and over.
    let funcs: [(usize, u64, usize); 5] = [
        (tt_push as *const () as usize, 1, 0),
        (tt_riprel as *const () as usize, 1000, 0),
        (tt_nop5 as *const () as usize, 2, 0),
        (tt_sub as *const () as usize, 5, 0),
        (tt_run as *const () as usize, 7, 5),
    ];
    // Sites: instruction starts in the static targets. Entries whose run
    // spans several instructions (tt_push, tt_sub, tt_run), and an
    // instruction inside each of those runs (a probe there demotes the
    // entry's site).
    let sites: Vec<usize> = vec![
        funcs[0].0,
        funcs[0].0 + 1,
        funcs[1].0,
        funcs[2].0,
        funcs[3].0,
        funcs[3].0 + 4,
        funcs[4].0,
        funcs[4].0 + 1,
        funcs[4].0 + 4,
    ];
    // The multi-instruction entry runs among the sites, with the offsets of
    // the sites inside them.
    let runs: [(usize, &[usize]); 3] = [
        (funcs[0].0, &[1]),
        (funcs[3].0, &[4]),
        (funcs[4].0, &[1, 4]),
    ];
    let pages: Vec<usize> = (0..JIT_PAGES)
        .map(|_| {
            // Mapped for the whole run: the allocation is never dropped.
            let mut page = region::alloc(4096, region::Protection::READ_WRITE).expect("alloc");
            let m = page.as_mut_ptr::<u8>();
            unsafe {
                std::ptr::copy_nonoverlapping(JIT_CODE.as_ptr(), m, JIT_CODE.len());
                region::protect(m, 4096, region::Protection::READ_EXECUTE).expect("protect");
            }
            std::mem::forget(page);
            m as usize
        })
        .collect();
    let originals: Vec<(usize, Vec<u8>)> = funcs
        .iter()
        .map(|&(f, _, _)| (f, read(f, 24)))
        .chain(pages.iter().map(|&p| (p, read(p, 64))))
        .collect();

    // The steady consumers: one per function, attached throughout.
    let steady: Vec<(&'static Rec, ConsumerId)> = funcs
        .iter()
        .map(|&(f, _, at)| {
            let r = rec(false);
            let id = unsafe { probert::attach(f + at, handler, ud(r)) }.expect("steady attach");
            (r, id)
        })
        .collect();

    // The steady return consumers: on tt_nop5 and tt_sub, attached
    // throughout (not on every function: each return probe's `ret` may be
    // a trap site, and the entry consumers' churn should go on fast).
    let steady_returns: Vec<(usize, &'static Rec, ConsumerId)> = [2usize, 3]
        .iter()
        .map(|&i| {
            let r = ret_rec(false, funcs[i].1);
            let id = attach_returns(funcs[i].0, r, Mode::Auto).expect("steady return attach");
            (i, r, id)
        })
        .collect();
    let churned: Mutex<Vec<Churned>> = Mutex::new(Vec::new());

    // A JIT page's region, and the consumers in it (their handles die with it).
    let regions: Vec<RwLock<Option<probert::RegionId>>> =
        (0..JIT_PAGES).map(|_| RwLock::new(None)).collect();
    let jit_recs: Vec<Mutex<Vec<&'static Rec>>> =
        (0..JIT_PAGES).map(|_| Mutex::new(Vec::new())).collect();

    let c = Counters::default();
    let calls_per_func: Vec<AtomicU64> = funcs.iter().map(|_| AtomicU64::new(0)).collect();
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(seconds);

    std::thread::scope(|s| {
        for t in 0..threads {
            let (funcs, pages, c, calls_per_func, stop) =
                (&funcs, &pages, &c, &calls_per_func, &stop);
            s.spawn(move || {
                let mut x = t as u64;
                while !stop.load(Ordering::Relaxed) {
                    for (i, &(f, add, _)) in funcs.iter().enumerate() {
                        let f: extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute(f) };
                        assert_eq!(f(x), x + add, "a probed function computed wrong");
                        calls_per_func[i].fetch_add(1, Ordering::Relaxed);
                    }
                    for &p in pages {
                        let f: extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute(p) };
                        assert_eq!(f(x), x + 1, "probed JIT code computed wrong");
                    }
                    c.calls
                        .fetch_add(funcs.len() as u64 + pages.len() as u64, Ordering::Relaxed);
                    x = x.wrapping_add(1) & 0xffff;
                }
            });
        }
        // Churn: attach `probes` consumers, then take them all down one of
        // three ways.
        for t in 0..2u64 {
            let (sites, runs, c, stop, regions, pages, jit_recs, funcs, churned) = (
                &sites, &runs, &c, &stop, &regions, &pages, &jit_recs, &funcs, &churned,
            );
            s.spawn(move || {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t + 1));
                while !stop.load(Ordering::Relaxed) {
                    let mut live: Vec<(&'static Rec, ConsumerId)> = Vec::new();
                    // Return consumers, now and then, at a function's entry.
                    if rng.below(2) == 0 {
                        let (f, add, _) = funcs[rng.below(funcs.len())];
                        let r = ret_rec(rng.below(4) == 0, add);
                        let mode = [Mode::Auto, Mode::Trap, Mode::Fast][rng.below(3)];
                        match attach_returns(f, r, mode) {
                            Ok(id) => live.push((r, id)),
                            Err(Error::UnsupportedInstruction { .. }) if mode == Mode::Fast => {}
                            Err(e) => panic!("return attach at {f:#x} ({mode:?}): {e}"),
                        }
                        c.return_attaches.fetch_add(1, Ordering::Relaxed);
                    }
                    for _ in 0..probes {
                        let r = rec(rng.below(8) == 0);
                        let site = sites[rng.below(sites.len())];
                        let mode = [Mode::Auto, Mode::Trap, Mode::Fast][rng.below(3)];
                        let entry = runs
                            .iter()
                            .find(|(e, inner)| site == *e || inner.iter().any(|&o| site == e + o))
                            .map(|&(e, _)| e);
                        let was_fast =
                            entry.is_some_and(|e| probert::probe_mode(e) == Ok(Mode::Fast));
                        match unsafe { probert::attach_ex(site, handler, ud(r), mode) } {
                            Ok(id) => {
                                live.push((r, id));
                                if let Some(e) = entry {
                                    note_run(c, site, e, was_fast);
                                }
                            }
                            Err(Error::UnsupportedInstruction { .. }) if mode == Mode::Fast => {}
                            // A FAST consumer at the entry keeps its run: a
                            // probe inside it is refused, in any mode.
                            Err(Error::UnsupportedInstruction { reason, .. })
                                if entry.is_some_and(|e| e != site)
                                    && reason.contains("a FAST probe at") => {}
                            // Inside a return probe's exit run: refused
                            // until the return probe goes.
                            Err(Error::UnsupportedInstruction { reason, .. })
                                if reason.contains("detach the return probe first") => {}
                            Err(e) => panic!("attach at {site:#x} ({mode:?}): {e}"),
                        }
                        c.attaches.fetch_add(1, Ordering::Relaxed);
                    }
                    // Into a JIT page, if its region is there.
                    let p = rng.below(JIT_PAGES);
                    {
                        let reg = regions[p].read().unwrap();
                        if reg.is_some() {
                            let r = rec(false);
                            // The entry alone (a run of three instructions,
                            // fast), the two inside its run (demoting it if
                            // it is there), or all three at once (none
                            // fast: each run holds another probe).
                            let offsets: &[usize] =
                                [&[0usize][..], &[1, 4], &[0, 1, 4]][rng.below(3)];
                            let was_fast = probert::probe_mode(pages[p]) == Ok(Mode::Fast);
                            let reqs: Vec<AttachReq> = offsets
                                .iter()
                                .map(|&off| AttachReq {
                                    addr: pages[p] + off,
                                    handler,
                                    user_data: ud(r),
                                })
                                .collect();
                            let ids = probert::attach_batch(&reqs).expect("attach_batch in JIT");
                            if offsets.len() < 3 {
                                note_run(c, pages[p] + offsets[0], pages[p], was_fast);
                            }
                            jit_recs[p].lock().unwrap().push(r);
                            if rng.below(2) == 0 {
                                probert::detach_batch(&ids).expect("detach_batch in JIT");
                                r.dead.store(true, Ordering::SeqCst);
                            }
                        }
                    }
                    // Consumers that returned Remove have stale handles.
                    let ok = |r: probert::Result<()>, rec: &Rec| match r {
                        Ok(()) => {}
                        Err(Error::NotFound) if rec.remove => {}
                        Err(e) => panic!("detach: {e}"),
                    };
                    // The return consumers' abandoned invocations, while
                    // their stats are there.
                    for &(r, id) in &live {
                        if r.add != 0 {
                            let abandoned = probert::stats(id).map_or(0, |s| s.abandoned);
                            churned.lock().unwrap().push((r, abandoned));
                        }
                    }
                    match rng.below(3) {
                        0 => {
                            for (r, id) in live {
                                ok(probert::detach(id), r);
                                r.dead.store(true, Ordering::SeqCst);
                                c.detaches.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        1 => {
                            let ids: Vec<ConsumerId> = live
                                .iter()
                                .filter(|(r, _)| r.removed.load(Ordering::Relaxed) == 0)
                                .map(|&(_, id)| id)
                                .collect();
                            // A Remove may land between the filter and the
                            // batch: then the batch refuses, and we fall back.
                            if probert::detach_batch(&ids).is_err() {
                                for &(r, id) in &live {
                                    ok(probert::detach(id), r);
                                }
                            }
                            probert::sync().expect("sync");
                            for (r, _) in live {
                                r.dead.store(true, Ordering::SeqCst);
                            }
                            c.batches.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            for &(r, id) in &live {
                                ok(probert::detach_nosync(id), r);
                                c.nosyncs.fetch_add(1, Ordering::Relaxed);
                            }
                            probert::sync().expect("sync");
                            for (r, _) in live {
                                r.dead.store(true, Ordering::SeqCst);
                            }
                        }
                    }
                    c.cycles.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Regions come and go.
        {
            let (regions, pages, jit_recs, c, stop) = (&regions, &pages, &jit_recs, &c, &stop);
            s.spawn(move || {
                let mut rng = Rng(42);
                while !stop.load(Ordering::Relaxed) {
                    let p = rng.below(JIT_PAGES);
                    let mut reg = regions[p].write().unwrap();
                    match reg.take() {
                        None => {
                            *reg = Some(
                                probert::region_add(RegionDesc {
                                    start: pages[p],
                                    len: 4096,
                                    name: format!("torture-{p}"),
                                    write: None,
                                })
                                .expect("region_add"),
                            );
                        }
                        Some(id) => {
                            probert::region_remove(id).expect("region_remove");
                            for r in jit_recs[p].lock().unwrap().drain(..) {
                                r.dead.store(true, Ordering::SeqCst);
                            }
                            assert_eq!(read(pages[p], 64), read_orig(p), "JIT page not restored");
                        }
                    }
                    drop(reg);
                    c.regions.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
        }
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
    });

    for (p, reg) in regions.iter().enumerate() {
        if let Some(id) = reg.write().unwrap().take() {
            probert::region_remove(id).expect("region_remove");
            for r in jit_recs[p].lock().unwrap().drain(..) {
                r.dead.store(true, Ordering::SeqCst);
            }
        }
    }
    // Nothing runs probed code now: the steady return consumers' stats are
    // exact.
    let mut failures = Vec::new();
    let mut steady_returns_hits = 0;
    for &(i, r, id) in &steady_returns {
        let s = probert::stats(id).expect("steady return stats");
        let (e, n) = (
            r.hits.load(Ordering::SeqCst),
            r.returns.load(Ordering::SeqCst),
        );
        let calls = calls_per_func[i].load(Ordering::SeqCst);
        steady_returns_hits += e;
        if (e, n, s.hits, s.returns, s.abandoned) != (calls, calls, calls, calls, 0) {
            failures.push(format!(
                "the steady return consumer of function {i}: {calls} calls, it saw {e} entries and {n} \
                 returns, stats {s:?}"
            ));
        }
    }
    let ids: Vec<ConsumerId> = steady
        .iter()
        .map(|&(_, id)| id)
        .chain(steady_returns.iter().map(|&(_, _, id)| id))
        .collect();
    probert::detach_batch(&ids).expect("steady detach");
    for &(_, r, _) in &steady_returns {
        r.dead.store(true, Ordering::SeqCst);
    }
    let mut hits = 0;
    for (i, (r, _)) in steady.iter().enumerate() {
        let (h, n) = (
            r.hits.load(Ordering::SeqCst),
            calls_per_func[i].load(Ordering::SeqCst),
        );
        hits += h;
        if h != n {
            failures.push(format!("function {i}: {n} calls, steady consumer saw {h}"));
        }
    }
    let (mut churned_entries, mut churned_returns, mut churned_abandoned) = (0, 0, 0);
    let churned = churned.into_inner().unwrap();
    for &(r, abandoned) in &churned {
        let (e, n) = (
            r.hits.load(Ordering::SeqCst),
            r.returns.load(Ordering::SeqCst),
        );
        churned_entries += e;
        churned_returns += n;
        churned_abandoned += abandoned;
        if n + abandoned > e || e > n + abandoned + threads as u64 {
            failures.push(format!(
                "a churned return consumer: {e} entries, {n} returns, {abandoned} abandoned"
            ));
        }
    }
    if churned_returns == 0 {
        failures.push("no churned return consumer saw a return".into());
    }
    let bad = BAD_RETURNS.load(Ordering::SeqCst);
    if bad != 0 {
        failures.push(format!(
            "{bad} return hits with a wrong value or no session"
        ));
    }
    // Return probes: what the checks above counted.
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let return_summary = format!(
        "return probes: steady entries {steady_returns_hits} (exact), churned {} \
         consumers of {} attaches: {churned_entries} entries, {churned_returns} returns, \
         {churned_abandoned} abandoned",
        churned.len(),
        l(&c.return_attaches),
    );
    let late = LATE.load(Ordering::SeqCst);
    if late != 0 {
        failures.push(format!("{late} handler calls after detach returned"));
    }
    if l(&c.runs_fast) == 0 {
        failures.push("no multi-instruction entry run went fast".into());
    }
    if l(&c.demotions) == 0 {
        failures.push("no probe inside a run demoted its site".into());
    }
    if probert::probe_count() != 0 {
        failures.push(format!("{} probes left", probert::probe_count()));
    }
    for (addr, orig) in &originals {
        if &read(*addr, orig.len()) != orig {
            failures.push(format!("code at {addr:#x} not restored"));
        }
    }
    println!(
        "torture: {threads} hammer threads, {seconds} s, {probes} probes per cycle\n  \
         calls {}, steady hits {hits} (exact: {})\n  \
         churn cycles {}: attaches {}, detaches {}, batch detaches {}, nosync detaches {}, \
         region add/remove {}\n  \
         multi-instruction runs: fast after {} attaches at their entry, demoted by {} \
         inside them\n  \
         {return_summary}\n  \
         checks: {} of {}",
        l(&c.calls),
        failures.iter().all(|f| !f.starts_with("function")),
        l(&c.cycles),
        l(&c.attaches),
        l(&c.detaches),
        l(&c.batches),
        l(&c.nosyncs),
        l(&c.regions),
        l(&c.runs_fast),
        l(&c.demotions),
        CHECKS + steady.len() + steady_returns.len()
            - failures
                .len()
                .min(CHECKS + steady.len() + steady_returns.len()),
        CHECKS + steady.len() + steady_returns.len(),
    );
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("FAILED: {f}");
        }
        std::process::exit(1);
    }
}

/// The checks besides one per steady consumer (the module docs list them).
const CHECKS: usize = 10;

fn read_orig(_page: usize) -> Vec<u8> {
    let mut v = JIT_CODE.to_vec();
    v.resize(64, 0);
    v
}
