//! The fast path: jump-patched sites that reach handlers without a signal.
//! Every test patches code, so each runs in its own process (`isolated!`).
#![allow(unsafe_code)]
// Test code calls assembly targets, libc and probert's unsafe attach on
// purpose; the safety premise of every such call is the test itself.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;
mod targets;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::{bytes, count, counter};
use probert::{Action, Error, Hit, Mode, Reg};
use targets::*;

/// A handler that scribbles on every caller-saved GPR, xmm0–15 and the
/// flags, as an ordinary function may.
unsafe extern "C" fn scribble(hit: *mut Hit) -> u32 {
    unsafe {
        std::arch::asm!(
            "mov rax, -1", "mov rcx, -1", "mov rdx, -1", "mov rsi, -1", "mov rdi, -1",
            "mov r8, -1", "mov r9, -1", "mov r10, -1", "mov r11, -1",
            "pcmpeqd xmm0, xmm0", "pcmpeqd xmm1, xmm1", "pcmpeqd xmm2, xmm2",
            "pcmpeqd xmm3, xmm3", "pcmpeqd xmm4, xmm4", "pcmpeqd xmm5, xmm5",
            "pcmpeqd xmm6, xmm6", "pcmpeqd xmm7, xmm7", "pcmpeqd xmm8, xmm8",
            "pcmpeqd xmm9, xmm9", "pcmpeqd xmm10, xmm10", "pcmpeqd xmm11, xmm11",
            "pcmpeqd xmm12, xmm12", "pcmpeqd xmm13, xmm13", "pcmpeqd xmm14, xmm14",
            "pcmpeqd xmm15, xmm15", "clc",
            out("rax") _, out("rcx") _, out("rdx") _, out("rsi") _, out("rdi") _,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
            out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
            out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
        );
        // And a deep stack: the frame must not land in the red zone.
        let mut junk = [0xA5u8; 2048];
        std::hint::black_box(&mut junk);
        count(hit)
    }
}

/// The calls of the lean handlers so far.
fn lean_hits() -> u64 {
    unsafe { t_lean_hits.load(Ordering::SeqCst) }
}

/// Runs `t_clobber` (through its fast site) and checks that every register
/// the site saw reached the end as it was; `what` names the hit.
fn clobber_round(what: &str) {
    let mut out = [0u64; 33];
    unsafe { t_clobber(out.as_mut_ptr()) };
    let gpr = [0x1111, 0x2222, 0x3333, 0x4444, 0x5555, 0x6666, 0x7777];
    assert_eq!(&out[..7], &gpr, "{what}: rax..rbp");
    assert_eq!(out[7], 0, "{what}: rsp moved");
    assert_eq!(
        &out[8..15],
        &[0x8888, 0x9999, 0xaaaa, 0xbbbb, 0xcccc, 0xdddd, 0xeeee],
        "{what}: r8..r14"
    );
    for (i, x) in out[16..32].iter().enumerate() {
        assert_eq!(*x, 0x100 + i as u64, "{what}: xmm{i}");
    }
    assert_eq!(
        out[32] & 0x8D5,
        0x800 | 0x80 | 0x10 | 0x1,
        "{what}: status flags {:#x}",
        out[32]
    );
}

isolated!(every_register_survives_a_lean_fast_hit, {
    // A handler that never uses its hit and saves nothing: the trampoline's
    // lean case stores only the caller-saved registers and the flags. On a
    // new thread, whose first hit goes the general way (its slot is not yet
    // its own) and the next ones the lean way, every register survives.
    assert_eq!(probert::__fuzz::handler_classes(t_lean_scribble), "none");
    let site = addr!(t_clobber_site);
    let id = unsafe { probert::attach_ex(site, t_lean_scribble, std::ptr::null_mut(), Mode::Fast) }
        .unwrap();
    std::thread::spawn(|| {
        for i in 0..4 {
            clobber_round(&format!("hit {i}"));
        }
    })
    .join()
    .unwrap();
    assert_eq!(lean_hits(), 4);
    assert_eq!(probert::stats(id).unwrap().hits, 4);
    probert::detach(id).unwrap();
});

isolated!(a_lean_handler_that_removes_itself_is_not_called_again, {
    // The lean case hands a `Remove` to the full case with the frame
    // completed; the hits after it, before the writer reaps the consumer,
    // find it removed and leave the lean case inside the section. The
    // registers survive each of them.
    assert_eq!(probert::__fuzz::handler_classes(t_lean_remove), "none");
    // The thread's slot is its own first (a hit elsewhere), so that the
    // first hit below is the lean case's.
    let warm = unsafe {
        probert::attach_ex(
            addr!(t_nop5),
            t_lean_scribble,
            std::ptr::null_mut(),
            Mode::Fast,
        )
    }
    .unwrap();
    assert_eq!(unsafe { t_nop5(1) }, 10);
    assert_eq!(lean_hits(), 1);
    let site = addr!(t_clobber_site);
    let _id = unsafe { probert::attach_ex(site, t_lean_remove, std::ptr::null_mut(), Mode::Fast) }
        .unwrap();
    for i in 0..3 {
        clobber_round(&format!("hit {i}"));
    }
    assert_eq!(lean_hits(), 2, "called after Remove");
    probert::sync().unwrap();
    clobber_round("after the reap");
    assert_eq!(lean_hits(), 2);
    probert::detach(warm).unwrap();
});

isolated!(every_register_survives_a_fast_hit, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let site = addr!(t_clobber_site);
    let id = unsafe { probert::attach_ex(site, scribble, counter(&HITS), Mode::Fast) }.unwrap();
    assert_eq!(probert::probe_mode(site), Ok(Mode::Fast));
    for i in 0..3 {
        clobber_round(&format!("hit {i}"));
    }
    assert_eq!(HITS.load(Ordering::SeqCst), 3);
    probert::detach(id).unwrap();
});

isolated!(red_zone_survives_a_fast_hit, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let site = addr!(t_redzone_site);
    let before = bytes(site, 5);
    let id = unsafe { probert::attach_ex(site, scribble, counter(&HITS), Mode::Fast) }.unwrap();
    for i in 0..100 {
        assert_eq!(unsafe { t_redzone(i) }, i + 0x1234 + 0x5678);
    }
    assert_eq!(HITS.load(Ordering::SeqCst), 100);
    probert::detach(id).unwrap();
    assert_eq!(bytes(site, 5), before);
});

isolated!(registers_are_read_and_written_on_the_fast_path, {
    unsafe extern "C" fn h(hit: *mut Hit) -> u32 {
        let hit = unsafe { &mut *hit };
        assert_eq!(hit.regs().rip, hit.addr as u64);
        let x = hit.regs().arg(0).unwrap();
        hit.regs_mut().set(Reg::Rdi, x * 10);
        Action::Continue as u32
    }
    let id =
        unsafe { probert::attach_ex(addr!(t_nop5), h, std::ptr::null_mut(), Mode::Fast) }.unwrap();
    assert_eq!(unsafe { t_nop5(3) }, 39);
    probert::detach(id).unwrap();
    assert_eq!(unsafe { t_nop5(3) }, 12);
});

isolated!(rip_and_rsp_writes_redirect_on_the_fast_path, {
    // Send t_nop5 to t_endbr instead (same stack).
    unsafe extern "C" fn redirect(hit: *mut Hit) -> u32 {
        let hit = unsafe { &mut *hit };
        hit.regs_mut().rip = targets::t_endbr as *const () as usize as u64;
        Action::Continue as u32
    }
    let id =
        unsafe { probert::attach_ex(addr!(t_nop5), redirect, std::ptr::null_mut(), Mode::Fast) }
            .unwrap();
    // A thread's first hit of a consumer takes the general dispatcher (it
    // fills the thread's hit cache); the next ones the trampoline's inline
    // case. Both must redirect.
    for _ in 0..3 {
        assert_eq!(unsafe { t_nop5(40) }, 42);
    }
    probert::detach(id).unwrap();
    // Emulate a `ret` from t_nop5's entry: pop the return address into RIP.
    unsafe extern "C" fn early_return(hit: *mut Hit) -> u32 {
        let hit = unsafe { &mut *hit };
        let r = hit.regs_mut();
        let rsp = r.get(Reg::Rsp);
        r.rip = unsafe { *(rsp as *const u64) };
        r.set(Reg::Rsp, rsp + 8);
        r.set(Reg::Rax, 777);
        Action::Continue as u32
    }
    let id = unsafe {
        probert::attach_ex(
            addr!(t_nop5),
            early_return,
            std::ptr::null_mut(),
            Mode::Fast,
        )
    }
    .unwrap();
    for _ in 0..3 {
        assert_eq!(unsafe { t_nop5(1) }, 777);
    }
    probert::detach(id).unwrap();
});

isolated!(recursion_and_remove_on_the_fast_path, {
    unsafe extern "C" fn recurse(_: *mut Hit) -> u32 {
        assert_eq!(unsafe { targets::t_nop5(1) }, 10);
        Action::Continue as u32
    }
    let id =
        unsafe { probert::attach_ex(addr!(t_nop5), recurse, std::ptr::null_mut(), Mode::Fast) }
            .unwrap();
    for _ in 0..4 {
        assert_eq!(unsafe { t_nop5(2) }, 11);
    }
    let s = probert::stats(id).unwrap();
    assert_eq!((s.hits, s.missed), (4, 4));
    probert::detach(id).unwrap();

    static ONCE: AtomicU64 = AtomicU64::new(0);
    unsafe extern "C" fn once(hit: *mut Hit) -> u32 {
        unsafe { count(hit) };
        Action::Remove as u32
    }
    let before = bytes(addr!(t_nop5), 5);
    let id =
        unsafe { probert::attach_ex(addr!(t_nop5), once, counter(&ONCE), Mode::Fast) }.unwrap();
    for _ in 0..5 {
        assert_eq!(unsafe { t_nop5(2) }, 11);
    }
    assert_eq!(ONCE.load(Ordering::SeqCst), 1);
    assert_eq!(probert::detach(id), Err(Error::NotFound));
    probert::sync().unwrap();
    assert_eq!(bytes(addr!(t_nop5), 5), before);

    // `Remove` from a later hit: the trampoline's inline case, not the
    // general dispatcher, sees it (see the redirect test).
    static THIRD: AtomicU64 = AtomicU64::new(0);
    unsafe extern "C" fn third(_: *mut Hit) -> u32 {
        if THIRD.fetch_add(1, Ordering::SeqCst) + 1 == 3 {
            Action::Remove as u32
        } else {
            Action::Continue as u32
        }
    }
    let id = unsafe { probert::attach_ex(addr!(t_nop5), third, std::ptr::null_mut(), Mode::Fast) }
        .unwrap();
    for _ in 0..6 {
        assert_eq!(unsafe { t_nop5(2) }, 11);
    }
    assert_eq!(THIRD.load(Ordering::SeqCst), 3);
    assert_eq!(probert::detach(id), Err(Error::NotFound));
    probert::sync().unwrap();
    assert_eq!(bytes(addr!(t_nop5), 5), before);
});

isolated!(mode_follows_the_consumers, {
    static A: AtomicU64 = AtomicU64::new(0);
    static B: AtomicU64 = AtomicU64::new(0);
    let site = addr!(t_riprel_mov);
    let before = bytes(site, 8);
    let a = unsafe { probert::attach(site, count, counter(&A)) }.unwrap();
    assert_eq!(probert::probe_mode(site), Ok(Mode::Fast));
    unsafe { t_riprel_mov(1) };
    // A consumer that wants the trap path pins the site there...
    let b = unsafe { probert::attach_ex(site, count, counter(&B), Mode::Trap) }.unwrap();
    assert_eq!(probert::probe_mode(site), Ok(Mode::Trap));
    assert_eq!(bytes(site, 1), [0xCC]);
    assert_eq!(
        &bytes(site, 8)[1..],
        &before[1..],
        "the tail is original on the trap path"
    );
    unsafe { t_riprel_mov(1) };
    // ...until it leaves.
    probert::detach(b).unwrap();
    assert_eq!(probert::probe_mode(site), Ok(Mode::Fast));
    unsafe { t_riprel_mov(1) };
    assert_eq!((A.load(Ordering::SeqCst), B.load(Ordering::SeqCst)), (3, 1));
    probert::detach(a).unwrap();
    assert_eq!(probert::probe_mode(site), Err(Error::NotFound));
    assert_eq!(bytes(site, 8), before);
});

isolated!(fast_probes_work_in_a_forked_child, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let id = unsafe { probert::attach(addr!(t_nop5), count, counter(&HITS)) }.unwrap();
    assert_eq!(probert::probe_mode(addr!(t_nop5)), Ok(Mode::Fast));
    unsafe { t_nop5(1) };
    match unsafe { libc::fork() } {
        0 => {
            unsafe { t_nop5(1) };
            let ok = HITS.load(Ordering::SeqCst) == 2
                && probert::stats(id).map(|s| s.hits) == Ok(2)
                && probert::detach(id).is_ok()
                && bytes(addr!(t_nop5), 1) != [0xE9];
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        pid => common::expect_child_success(pid),
    }
    assert_eq!(
        bytes(addr!(t_nop5), 1),
        [0xE9],
        "the child's detach wrote its own memory"
    );
    unsafe { t_nop5(1) };
    assert_eq!(probert::stats(id).unwrap().hits, 2);
    probert::detach(id).unwrap();
});

isolated!(
    torture_hammer_while_attach_detach_and_mode_switches_churn,
    {
        // Hammer threads call four fast-capable sites for a fixed time while a
        // churn thread attaches and detaches consumers in every mode (switching
        // the sites between trap and fast) and recycles stubs (poisoned with ud2
        // when freed, so a stub reused too early crashes the test).
        const RUN: std::time::Duration = std::time::Duration::from_secs(2);
        static STEADY_NOP: AtomicU64 = AtomicU64::new(0);
        static STEADY_MOV: AtomicU64 = AtomicU64::new(0);
        static CHURN: AtomicU64 = AtomicU64::new(0);
        static STOP: AtomicBool = AtomicBool::new(false);
        let sites = [
            addr!(t_nop5),
            addr!(t_riprel_mov),
            addr!(t_jmp),
            addr!(t_call),
        ];
        let before: Vec<Vec<u8>> = sites.iter().map(|&s| bytes(s, 8)).collect();
        let a = unsafe { probert::attach(sites[0], count, counter(&STEADY_NOP)) }.unwrap();
        let b = unsafe { probert::attach(sites[1], count, counter(&STEADY_MOV)) }.unwrap();
        let deadline = std::time::Instant::now() + RUN;
        let hammers: Vec<_> = (0..3)
            .map(|t| {
                std::thread::spawn(move || {
                    let mut calls = 0u64;
                    while std::time::Instant::now() < deadline {
                        for i in calls..calls + 1000 {
                            assert_eq!(unsafe { t_nop5(i) }, i + 9);
                            assert_eq!(unsafe { t_riprel_mov(i) }, i + 1000);
                            assert_eq!(unsafe { t_jmp(i) }, i + 3);
                            if t == 0 {
                                assert_eq!(unsafe { t_call() }, addr!(t_call) as u64 + 5);
                            }
                        }
                        calls += 1000;
                    }
                    calls
                })
            })
            .collect();
        let churn = std::thread::spawn(move || {
            let mut cycles = 0u64;
            while !STOP.load(Ordering::SeqCst) {
                let mode = [Mode::Auto, Mode::Trap, Mode::Fast][cycles as usize % 3];
                let ids: Vec<_> = sites
                    .iter()
                    .map(|&s| {
                        unsafe { probert::attach_ex(s, count, counter(&CHURN), mode) }.unwrap()
                    })
                    .collect();
                probert::detach_nosync(ids[0]).unwrap();
                probert::detach_batch(&ids[1..3]).unwrap();
                probert::detach(ids[3]).unwrap();
                cycles += 1;
            }
            cycles
        });
        let calls: u64 = hammers.into_iter().map(|h| h.join().unwrap()).sum();
        STOP.store(true, Ordering::SeqCst);
        let cycles = churn.join().unwrap();
        assert!(cycles > 3, "churn made progress: {cycles}");
        assert_eq!(
            STEADY_NOP.load(Ordering::SeqCst),
            calls,
            "exactly once per call"
        );
        assert_eq!(STEADY_MOV.load(Ordering::SeqCst), calls);
        assert_eq!(probert::stats(a).unwrap().hits, calls);
        assert_eq!(probert::stats(b).unwrap().hits, calls);
        probert::detach_batch(&[a, b]).unwrap();
        for (s, orig) in sites.iter().zip(&before) {
            assert_eq!(&bytes(*s, 8), orig, "restored byte for byte at {s:#x}");
        }
        eprintln!(
        "calls per site: {calls}, churn cycles: {cycles}, churn hits: {}, retired stubs left: {:?}",
        CHURN.load(Ordering::SeqCst),
        probert::retired_stubs()
    );
    }
);

/// Bytes of anonymous memory that is readable and executable: probert's
/// stub chunks (nothing else in a test process maps such memory; adjacent
/// chunks merge into one line of the maps file, so count bytes).
fn exec_anon_bytes() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != 5 || !f[1].starts_with("r-x") {
                return None;
            }
            let (a, b) = f[0].split_once('-')?;
            Some(usize::from_str_radix(b, 16).ok()? - usize::from_str_radix(a, 16).ok()?)
        })
        .sum()
}

isolated!(fast_stubs_are_recycled_without_recycle_stubs, {
    // Thousands of attach/detach cycles of a fast probe, as a user makes
    // them (no `recycle_stubs`): the pool settles on a few chunks instead of
    // mapping one per thousand cycles, and what waits for reuse stays
    // bounded.
    static HITS: AtomicU64 = AtomicU64::new(0);
    let site = addr!(t_nop5);
    let id = unsafe { probert::attach_ex(site, count, counter(&HITS), Mode::Fast) }.unwrap();
    probert::detach(id).unwrap();
    let before = exec_anon_bytes();
    const CYCLES: u64 = 8_000; // a chunk holds under 1,000 stubs
    for i in 0..CYCLES {
        let id = unsafe { probert::attach_ex(site, count, counter(&HITS), Mode::Fast) }.unwrap();
        assert_eq!(unsafe { t_nop5(i) }, i + 9);
        probert::detach(id).unwrap();
    }
    assert_eq!(HITS.load(Ordering::SeqCst), CYCLES);
    let after = exec_anon_bytes();
    let (grace, scan) = probert::retired_stubs();
    assert!(
        after <= before + 2 * 64 * 1024,
        "stub memory grew from {before} to {after} bytes over {CYCLES} cycles"
    );
    assert!(
        grace + scan < 3_000,
        "retired stubs pile up: ({grace}, {scan})"
    );
});

isolated!(a_stale_stub_calls_no_consumer_of_its_records_next_probe, {
    // A thread that entered a fast stub and was preempted before its
    // dispatcher's section finds, when it runs again, the stub's probe
    // removed and its record given to a probe at another site. It must run
    // the displaced instructions and no consumer: the record is not the
    // stub's site's any more (the dispatcher checks the site address, not
    // a few bits of a generation). Entering the retired stub by hand stands
    // for the preempted thread: the stub is retired, not reused (the pool
    // recycles only when a chunk is full).
    static FIRST: AtomicU64 = AtomicU64::new(0);
    static OTHER: AtomicU64 = AtomicU64::new(0);
    let site = addr!(t_nop5);
    let id = unsafe { probert::attach_ex(site, count, counter(&FIRST), Mode::Fast) }.unwrap();
    let jump = bytes(site, 5);
    assert_eq!(jump[0], 0xE9, "a fast site");
    let rel = i32::from_le_bytes([jump[1], jump[2], jump[3], jump[4]]);
    let entry = (site as i64 + 5 + i64::from(rel)) as usize;
    let stub: unsafe extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute(entry) };
    // The stub works as the site does while its probe is attached...
    assert_eq!(unsafe { stub(1) }, 10);
    assert_eq!(FIRST.load(Ordering::SeqCst), 1);
    probert::detach(id).unwrap();
    // ...and its record goes to the next probe (the free list is LIFO),
    // at another site. The trampoline's inline case serves a thread whose
    // hit cache already holds the consumer: hit it once first, so both the
    // inline case and the general dispatcher are checked below.
    let other =
        unsafe { probert::attach_ex(addr!(t_jmp), count, counter(&OTHER), Mode::Fast) }.unwrap();
    assert_eq!(unsafe { t_jmp(1) }, 4);
    assert_eq!(OTHER.load(Ordering::SeqCst), 1);
    for i in 0..3 {
        assert_eq!(unsafe { stub(i) }, i + 9, "the displaced instructions ran");
    }
    assert_eq!(
        OTHER.load(Ordering::SeqCst),
        1,
        "a stale stub called another site's consumer"
    );
    assert_eq!(FIRST.load(Ordering::SeqCst), 1);
    probert::detach(other).unwrap();
});

/// `n` functions `nop5; lea rax, [rdi + 1]; ret` (5-byte NOP sites, fast
/// without a proof), 16 bytes apart in one page registered as a region.
fn nop5_functions(n: usize) -> Vec<usize> {
    const F: [u8; 10] = [0x0F, 0x1F, 0x44, 0x00, 0x00, 0x48, 0x8D, 0x47, 0x01, 0xC3];
    let len = (n * 16).next_multiple_of(4096);
    let mut page = region::alloc(len, region::Protection::READ_WRITE).expect("alloc");
    let p = page.as_mut_ptr::<u8>();
    unsafe {
        std::ptr::write_bytes(p, 0xCC, len);
        for i in 0..n {
            std::ptr::copy_nonoverlapping(F.as_ptr(), p.add(16 * i), F.len());
        }
        region::protect(p, len, region::Protection::READ_EXECUTE).expect("protect");
    }
    std::mem::forget(page);
    probert::region_add(probert::RegionDesc {
        start: p as usize,
        len,
        name: "nop5 functions".into(),
        write: None,
    })
    .expect("region_add");
    (0..n).map(|i| p as usize + 16 * i).collect()
}

fn call_at(addr: usize, x: u64) -> u64 {
    let f: extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute(addr) };
    f(x)
}

isolated!(hit_counts_stay_exact_when_consumers_share_hit_cache_ways, {
    // Real code sends its hits to thousands of consumers in turn, more than
    // a thread's hit cache has ways: the trampoline's inline case takes a
    // way over and flushes the count it held into its consumer's record.
    // Here half as many fast sites again as there are ways, one consumer
    // each (so at least half the ways are shared, whatever indices the
    // consumers get), are called in turn by two threads; then half the
    // consumers are replaced (their records go to the new ones) and the
    // calls go on. Every consumer's statistics must equal its handler's
    // count, and no count may reach a record's next consumer.
    const N: usize = probert::__fuzz::HIT_WAYS * 3 / 2;
    static CALLS: [AtomicU64; 2 * N] = [const { AtomicU64::new(0) }; 2 * N];
    let sites = nop5_functions(N);
    let attach = |i: usize| {
        let id = unsafe { probert::attach_ex(sites[i % N], count, counter(&CALLS[i]), Mode::Fast) }
            .unwrap();
        assert_eq!(probert::probe_mode(sites[i % N]), Ok(Mode::Fast));
        id
    };
    let rounds = |n: u64| {
        let sites = sites.clone();
        let run = move || {
            for r in 0..n {
                for &s in &sites {
                    assert_eq!(call_at(s, r), r + 1);
                }
            }
        };
        let other = std::thread::spawn(run.clone());
        run();
        other.join().unwrap();
    };
    let mut ids: Vec<_> = (0..N).map(attach).collect();
    rounds(1000);
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            CALLS[i].load(Ordering::SeqCst),
            2000,
            "consumer {i}'s handler"
        );
        assert_eq!(
            probert::stats(*id).unwrap().hits,
            2000,
            "consumer {i}'s statistics"
        );
    }
    for (i, id) in ids.iter_mut().enumerate().take(N / 2) {
        probert::detach(*id).unwrap();
        *id = attach(N + i);
    }
    rounds(500);
    for (i, id) in ids.iter().enumerate() {
        let (calls, want) = if i < N / 2 {
            (CALLS[N + i].load(Ordering::SeqCst), 1000)
        } else {
            (CALLS[i].load(Ordering::SeqCst), 3000)
        };
        assert_eq!(calls, want, "site {i}'s handler");
        assert_eq!(
            probert::stats(*id).unwrap().hits,
            want,
            "site {i}'s statistics"
        );
    }
    for id in ids {
        probert::detach(id).unwrap();
    }
});

isolated!(hit_counts_stay_exact_while_signals_interrupt_the_stubs, {
    // The fast path keeps its frame, and what it needs after the handler,
    // on the interrupted code's stack, where a signal frame may land
    // wherever the stack pointer does not cover it. Here one thread calls
    // two fast sites in turn while another interrupts it with signals as
    // fast as it can, whose handler dirties a deep stack: no hit may be
    // lost, go to the other site's consumer, or crash.
    static CALLS: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];
    static SIGNALS: AtomicU64 = AtomicU64::new(0);
    static TID: AtomicU64 = AtomicU64::new(0);
    static DONE: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_usr1(_: i32) {
        let mut junk = [0x5Au8; 4096];
        std::hint::black_box(&mut junk);
        SIGNALS.fetch_add(1, Ordering::Relaxed);
    }
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr1 as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    let sites = nop5_functions(2);
    let ids: Vec<_> = (0..2)
        .map(|i| {
            let id = unsafe { probert::attach_ex(sites[i], count, counter(&CALLS[i]), Mode::Fast) }
                .unwrap();
            assert_eq!(probert::probe_mode(sites[i]), Ok(Mode::Fast));
            id
        })
        .collect();
    const CALLS_EACH: u64 = 2_000_000;
    let caller = {
        let sites = sites.clone();
        std::thread::spawn(move || {
            TID.store(unsafe { libc::gettid() } as u64, Ordering::SeqCst);
            for r in 0..CALLS_EACH {
                assert_eq!(call_at(sites[0], r), r + 1);
                assert_eq!(call_at(sites[1], r), r + 1);
            }
            DONE.store(true, Ordering::SeqCst);
        })
    };
    while TID.load(Ordering::SeqCst) == 0 {
        std::hint::spin_loop();
    }
    let mut sent = 0u64;
    while !DONE.load(Ordering::SeqCst) {
        let tid = TID.load(Ordering::SeqCst) as i64;
        let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR1) };
        if rc == 0 {
            sent += 1;
        }
    }
    caller.join().unwrap();
    assert!(
        SIGNALS.load(Ordering::SeqCst) > 1000,
        "only {} of {sent} signals arrived",
        SIGNALS.load(Ordering::SeqCst)
    );
    for (i, id) in ids.into_iter().enumerate() {
        assert_eq!(
            CALLS[i].load(Ordering::SeqCst),
            CALLS_EACH,
            "site {i}'s handler"
        );
        assert_eq!(
            probert::stats(id).unwrap().hits,
            CALLS_EACH,
            "site {i}'s statistics"
        );
        probert::detach(id).unwrap();
    }
});
