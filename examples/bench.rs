//! probert's benchmarks: what a probed call costs on each path, how it scales
//! to two threads, what the control plane costs, and how hit latency behaves
//! while another thread churns JIT code and probes.
//!
//! ```sh
//! cargo run --release --example bench              # under a minute; rewrites BENCHMARKS.md
//! cargo run --release --example bench -- --quick   # a smoke run of every row; writes nothing
//! ```
//!
//! Method. Every per-call row calls an assembly function in a time-bounded
//! loop: one discarded warm-up repetition, then repetitions of a fixed
//! duration, each giving ns per call; the table shows the median, minimum and
//! maximum over the repetitions. With two threads, each thread times its own
//! loop and a repetition's figure is the aggregate (1 / total throughput).
//! Consumers are empty handlers, so the rows show probert's own cost; hit
//! counts are checked with `probert::stats` after each row. Nothing here
//! asserts a time: only results and hit counts are checked.
#![allow(unsafe_code)]

use std::arch::global_asm;
use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use dynasmrt::{dynasm, AssemblyOffset, DynasmApi, ExecutableBuffer};
use probert::{Action, AttachReq, ConsumerId, Hit, Mode, RegionDesc, RegionId};

// The targets, in assembly so their first instruction is exactly the one
// named. Each returns `rdi + 1`.
global_asm!(
    r#"
    .pushsection .data
    .p2align 3
bench_one: .quad 1
    .popsection

    .text
    .macro BENCH_FUNC name
    .p2align 4
    .globl \name
    .type \name,@function
\name:
    .endm
    .macro BENCH_END name
    .size \name, .-\name
    .endm

    BENCH_FUNC bench_bare        // no probe: the call itself
    lea rax, [rdi + 1]
    ret
    BENCH_END bench_bare

    BENCH_FUNC bench_int3        // an inline int3: the signal floor
    int3
    lea rax, [rdi + 1]
    ret
    BENCH_END bench_int3

    BENCH_FUNC bench_push        // push rbp: emulated on the trap path
    push rbp
    lea rax, [rdi + 1]
    pop rbp
    ret
    BENCH_END bench_push

    BENCH_FUNC bench_riprel      // mov rax, [rip + x]: run out of line
    mov rax, qword ptr [rip + bench_one]
    add rax, rdi
    ret
    BENCH_END bench_riprel

    BENCH_FUNC bench_nop5        // a 5-byte NOP: a JIT's patchable site
    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00
    lea rax, [rdi + 1]
    ret
    BENCH_END bench_nop5

    BENCH_FUNC bench_mov5        // mov eax, imm32: a 5-byte instruction
    mov eax, 1
    add rax, rdi
    ret
    BENCH_END bench_mov5

    BENCH_FUNC bench_frame       // a frame, an epilogue: the return-probe target
    push rbp
    mov rbp, rsp
    lea rax, [rdi + 1]
    nop dword ptr [rax]
    pop rbp
    ret
    BENCH_END bench_frame

    BENCH_FUNC bench_latency     // push rbp: the latency target
    push rbp
    lea rax, [rdi + 1]
    pop rbp
    ret
    BENCH_END bench_latency
"#
);

extern "C" {
    fn bench_bare(x: u64) -> u64;
    fn bench_int3(x: u64) -> u64;
    fn bench_push(x: u64) -> u64;
    fn bench_riprel(x: u64) -> u64;
    fn bench_nop5(x: u64) -> u64;
    fn bench_mov5(x: u64) -> u64;
    fn bench_latency(x: u64) -> u64;
    fn bench_frame(x: u64) -> u64;
}

/// A target: a function of `rdi` returning `rdi + 1`.
type Target = unsafe extern "C" fn(u64) -> u64;

fn addr(f: Target) -> usize {
    f as usize
}

/// Calls a target.
#[inline(always)]
fn call(f: Target, x: u64) -> u64 {
    // SAFETY: every target is a leaf function of `rdi` that touches only
    // its own stack slot and `bench_one`; with a probe attached it still
    // computes the same value (the trap handler chains or dispatches).
    unsafe { f(x) }
}

/// The consumer every probed row uses: it does nothing, so the rows show
/// probert's cost. Runs in signal context on the trap path (it is trivially
/// async-signal-safe).
unsafe extern "C" fn empty(_hit: *mut Hit) -> u32 {
    Action::Continue as u32
}

/// The floor's handler: an empty `SA_SIGINFO` handler. Returning resumes
/// after the `int3`.
extern "C" fn empty_sigtrap(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

// ---------------------------------------------------------------------------
// Configuration and statistics

#[derive(Clone, Copy, Debug)]
struct Cfg {
    quick: bool,
    /// Measured repetitions per row (after one warm-up).
    reps: usize,
    /// Duration of one repetition of a per-call row.
    rep: Duration,
    /// The batch sizes of the control-plane rows.
    sizes: [usize; 2],
    /// Wall time of each latency run.
    latency: Duration,
}

impl Cfg {
    fn full() -> Cfg {
        Cfg {
            quick: false,
            reps: 15,
            rep: Duration::from_millis(20),
            sizes: [1000, 10_000],
            latency: Duration::from_millis(1500),
        }
    }
    fn quick() -> Cfg {
        Cfg {
            quick: true,
            reps: 2,
            rep: Duration::from_millis(2),
            sizes: [100, 1000],
            latency: Duration::from_millis(40),
        }
    }
}

/// Median, minimum and maximum of a set of repetitions.
#[derive(Clone, Copy, Debug)]
struct Sample {
    median: f64,
    min: f64,
    max: f64,
}

impl Sample {
    fn of(mut v: Vec<f64>) -> Sample {
        assert!(!v.is_empty());
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Sample {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }
}

// ---------------------------------------------------------------------------
// Per-call measurement

/// One thread's time-bounded loop: calls `f` for `dur` in chunks of `chunk`
/// calls, checking the results. Returns (calls, elapsed).
fn timed_loop(f: Target, dur: Duration, chunk: u64) -> (u64, Duration) {
    let want = chunk * (chunk + 1) / 2; // Σ (i + 1) for i < chunk
    let mut calls = 0;
    let start = Instant::now();
    let deadline = start + dur;
    loop {
        let mut acc = 0u64;
        for i in 0..chunk {
            acc = acc.wrapping_add(call(f, black_box(i)));
        }
        assert_eq!(acc, want, "a target returned a wrong value");
        calls += chunk;
        let now = Instant::now();
        if now >= deadline {
            return (calls, now - start);
        }
    }
}

/// Ns per call of `f` on `threads` threads (aggregate), and the number of
/// calls made in all (warm-up included).
fn per_call(cfg: &Cfg, f: Target, threads: usize) -> (Sample, u64) {
    let barrier = Barrier::new(threads);
    let runs: Vec<Vec<(u64, Duration)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    // Warm-up, which also sizes the chunk to about 50 µs so
                    // reading the clock costs nothing measurable.
                    barrier.wait();
                    let (n, t) = timed_loop(f, cfg.rep, 1);
                    let est = t.as_nanos() as f64 / n as f64;
                    let chunk = (50_000.0 / est).clamp(1.0, 1_000_000.0) as u64;
                    let mut out = vec![(n, t)];
                    for _ in 0..cfg.reps {
                        barrier.wait();
                        out.push(timed_loop(f, cfg.rep, chunk));
                    }
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a bench thread panicked"))
            .collect()
    });
    let total_calls = runs.iter().flatten().map(|r| r.0).sum();
    let per_rep = (1..=cfg.reps)
        .map(|r| {
            let throughput: f64 = runs
                .iter()
                .map(|t| t[r].0 as f64 / t[r].1.as_nanos() as f64)
                .sum();
            1.0 / throughput
        })
        .collect();
    (Sample::of(per_rep), total_calls)
}

/// A measured per-call row, or why it could not run.
#[derive(Clone, Debug)]
enum Row {
    Ran { one: Sample, two: Option<Sample> },
    Unavailable(String),
}

impl Row {
    fn one(&self) -> Option<Sample> {
        match self {
            Row::Ran { one, .. } => Some(*one),
            Row::Unavailable(_) => None,
        }
    }
    fn two(&self) -> Option<Sample> {
        match self {
            Row::Ran { two, .. } => *two,
            Row::Unavailable(_) => None,
        }
    }
}

/// Attaches `consumers` empty consumers to `f` in `mode`, measures one
/// thread (and two if `scaling`), checks every consumer saw every call, and
/// detaches.
fn probed_row(cfg: &Cfg, f: Target, mode: Mode, consumers: usize, scaling: bool) -> Row {
    let mut ids: Vec<ConsumerId> = Vec::new();
    for _ in 0..consumers {
        // SAFETY: the target's address starts its first instruction and the
        // code is static; `empty` is async-signal-safe.
        match unsafe { probert::attach_ex(addr(f), empty, std::ptr::null_mut(), mode) } {
            Ok(id) => ids.push(id),
            Err(e) => {
                probert::detach_batch(&ids).expect("detach_batch");
                return Row::Unavailable(format!("{e}"));
            }
        }
    }
    let served = probert::probe_mode(addr(f)).expect("probe_mode");
    assert!(
        mode == Mode::Auto || served == mode,
        "asked for {mode:?}, got {served:?}"
    );
    let (one, mut calls) = per_call(cfg, f, 1);
    let two = scaling.then(|| {
        let (two, n) = per_call(cfg, f, 2);
        calls += n;
        two
    });
    for &id in &ids {
        let st = probert::stats(id).expect("stats");
        assert_eq!(st.hits + st.missed, calls, "a consumer missed hits");
    }
    probert::detach_batch(&ids).expect("detach_batch");
    Row::Ran { one, two }
}

/// Per-call costs of a return probe on `bench_frame`: the function
/// unprobed, then with an empty entry handler and an empty return handler
/// attached in `mode` (the exits in AUTO: an exit run where the epilogue
/// allows). Checks every call gave one entry and one return hit.
fn returns_row(cfg: &Cfg, mode: Mode) -> (Sample, Row) {
    let (bare, _) = per_call(cfg, bench_frame, 1);
    let opts = probert::AttachOptions {
        mode,
        on_return: Some(empty),
    };
    // SAFETY: a static assembly target; `empty` is async-signal-safe.
    let id =
        match unsafe { probert::attach_with(addr(bench_frame), empty, std::ptr::null_mut(), opts) }
        {
            Ok(id) => id,
            Err(e) => return (bare, Row::Unavailable(format!("{e}"))),
        };
    let (one, calls) = per_call(cfg, bench_frame, 1);
    let st = probert::stats(id).expect("stats");
    assert_eq!(st.hits + st.missed, calls, "an entry was missed");
    assert_eq!(st.returns + st.abandoned, st.hits, "a return was missed");
    probert::detach(id).expect("detach");
    (bare, Row::Ran { one, two: None })
}

// ---------------------------------------------------------------------------
// The signal floor, measured before probert::init()

/// Installs the empty `SIGTRAP` handler with probert's flags (`SA_SIGINFO`
/// for the three-argument form, `SA_NODEFER` and `SA_RESTART` as probert).
fn install_empty_sigtrap() {
    // SAFETY: a zeroed `sigaction` is a valid initial value; the handler is
    // an `extern "C"` function with the `SA_SIGINFO` signature that does
    // nothing, so it is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = empty_sigtrap as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(
            libc::sigaction(libc::SIGTRAP, &sa, std::ptr::null_mut()),
            0,
            "sigaction"
        );
    }
}

// ---------------------------------------------------------------------------
// JIT code for the control plane

/// `n` functions `push rbp; mov rbp, rsp; pop rbp; ret` (6 bytes each) in one
/// buffer that decodes linearly from its start, registered as a region.
/// Returns the buffer, the region and the address of every `push rbp`.
fn jit_functions(n: usize, name: &str) -> (ExecutableBuffer, RegionId, Vec<usize>) {
    let mut ops = dynasmrt::x64::Assembler::new().expect("assembler");
    let mut offsets = Vec::with_capacity(n);
    for _ in 0..n {
        offsets.push(ops.offset());
        dynasm!(ops
            ; .arch x64
            ; push rbp
            ; mov rbp, rsp
            ; pop rbp
            ; ret
        );
    }
    let buf = ops.finalize().expect("finalize");
    let base = buf.ptr(AssemblyOffset(0)) as usize;
    let region = probert::region_add(RegionDesc {
        start: base,
        len: buf.len(),
        name: name.into(),
        write: None,
    })
    .expect("region_add");
    let addrs = offsets.into_iter().map(|o| base + o.0).collect();
    (buf, region, addrs)
}

fn reqs(addrs: &[usize]) -> Vec<AttachReq> {
    addrs
        .iter()
        .map(|&addr| AttachReq {
            addr,
            handler: empty,
            user_data: std::ptr::null_mut(),
        })
        .collect()
}

fn attach_one(a: usize) -> ConsumerId {
    // SAFETY: `a` starts a `push rbp` of a registered JIT region that stays
    // mapped until after its probes are gone; `empty` is async-signal-safe.
    unsafe { probert::attach(a, empty, std::ptr::null_mut()) }.expect("attach")
}

/// Runs `op` (which returns the time of its measured part) once to warm up,
/// then repeatedly until it has `cfg.reps` repetitions spanning at least
/// 100 ms (no minimum in quick mode), or `max_reps` repetitions, or the
/// `budget` is spent — but never fewer than 3 repetitions (1 in quick mode).
fn repeat(
    cfg: &Cfg,
    budget: Duration,
    max_reps: usize,
    mut op: impl FnMut() -> Duration,
) -> Sample {
    let warm = op();
    let mut v = Vec::new();
    let start = Instant::now();
    let floor = if cfg.quick { 1 } else { 3 };
    let min = if cfg.quick {
        Duration::ZERO
    } else {
        Duration::from_millis(100)
    };
    loop {
        v.push(op().as_nanos() as f64);
        let spent = start.elapsed();
        let enough = v.len() >= cfg.reps && spent >= min;
        let over = spent + warm >= budget && v.len() >= floor;
        if enough || over || v.len() >= max_reps {
            break;
        }
    }
    Sample::of(v)
}

/// One control-plane row.
struct CpRow {
    what: String,
    /// Per repetition (total for `n` operations), ns.
    total: Sample,
    n: usize,
    vs: String,
    goal: String,
    verdict: String,
}

/// How many regions the region rows add and remove per repetition.
fn regions_per_rep(cfg: &Cfg) -> usize {
    if cfg.quick {
        50
    } else {
        1000
    }
}

fn control_plane(cfg: &Cfg) -> Vec<CpRow> {
    let big = cfg.sizes[1];
    let (buf, region, addrs) = jit_functions(big, "bench-10k");
    let budget = if cfg.quick {
        Duration::from_millis(50)
    } else {
        Duration::from_secs(3)
    };
    let mut rows = Vec::new();
    let row = |what: String, total: Sample, n: usize| CpRow {
        what,
        total,
        n,
        vs: String::new(),
        goal: "—".into(),
        verdict: String::new(),
    };

    // One probe.
    let attach1 = repeat(cfg, budget, 2000, || {
        let t = Instant::now();
        let id = attach_one(addrs[0]);
        let d = t.elapsed();
        probert::detach(id).expect("detach");
        d
    });
    let detach1 = repeat(cfg, budget, 2000, || {
        let id = attach_one(addrs[0]);
        let t = Instant::now();
        probert::detach(id).expect("detach");
        t.elapsed()
    });
    let sync = repeat(cfg, budget, 2000, || {
        let t = Instant::now();
        probert::sync().expect("sync");
        t.elapsed()
    });
    let mut r = row("attach 1 probe".into(), attach1, 1);
    r.vs = "1.00× attach(1)".into();
    rows.push(r);
    let mut r = row("detach 1 probe (with its grace period)".into(), detach1, 1);
    r.vs = "1.00× detach(1)".into();
    rows.push(r);
    let mut r = row("sync() alone".into(), sync, 1);
    r.vs = format!("{:.2}× detach(1)", sync.median / detach1.median);
    rows.push(r);

    for &n in &cfg.sizes {
        let a = &addrs[..n];
        let one_by_one = repeat(cfg, budget, cfg.reps, || {
            let t = Instant::now();
            let ids: Vec<_> = a.iter().map(|&x| attach_one(x)).collect();
            let d = t.elapsed();
            probert::detach_batch(&ids).expect("detach_batch");
            d
        });
        let batch = repeat(cfg, budget, cfg.reps, || {
            let r = reqs(a);
            let t = Instant::now();
            let ids = probert::attach_batch(&r).expect("attach_batch");
            let d = t.elapsed();
            probert::detach_batch(&ids).expect("detach_batch");
            d
        });
        let detach_one_by_one = repeat(cfg, budget, cfg.reps, || {
            let ids = probert::attach_batch(&reqs(a)).expect("attach_batch");
            let t = Instant::now();
            for id in ids {
                probert::detach(id).expect("detach");
            }
            t.elapsed()
        });
        let detach_batch = repeat(cfg, budget, cfg.reps, || {
            let ids = probert::attach_batch(&reqs(a)).expect("attach_batch");
            let t = Instant::now();
            probert::detach_batch(&ids).expect("detach_batch");
            t.elapsed()
        });
        let mut r = row(format!("attach {n} probes one by one"), one_by_one, n);
        r.vs = format!("{}× attach(1)", ratio(one_by_one.median / attach1.median));
        rows.push(r);
        let mut r = row(format!("attach_batch({n})"), batch, n);
        r.vs = format!("{}× attach(1)", ratio(batch.median / attach1.median));
        if n == 10_000 {
            r.goal = "≤ 50 ms".into();
            r.verdict = verdict(batch.median <= 50e6);
        }
        rows.push(r);
        let mut r = row(
            format!("detach {n} probes one by one"),
            detach_one_by_one,
            n,
        );
        r.vs = format!(
            "{}× detach(1)",
            ratio(detach_one_by_one.median / detach1.median)
        );
        rows.push(r);
        let mut r = row(format!("detach_batch({n})"), detach_batch, n);
        let x = detach_batch.median / detach1.median;
        r.vs = format!("{}× detach(1)", ratio(x));
        if n == 1000 {
            r.goal = "≤ 3× detach(1)".into();
            r.verdict = verdict(x <= 3.0);
        }
        rows.push(r);
    }
    assert_eq!(probert::probe_count(), 0, "every probe detached");
    probert::region_remove(region).expect("region_remove");
    drop(buf);

    // Regions: add K regions (64-byte slices of one buffer), then remove them.
    let k = regions_per_rep(cfg);
    let (slices, slices_region, _) = jit_functions(k * 64 / 6 + 1, "bench-slices");
    probert::region_remove(slices_region).expect("region_remove");
    let base = slices.ptr(AssemblyOffset(0)) as usize;
    let mut ids = Vec::with_capacity(k);
    let mut removes = Vec::new();
    let adds = repeat(cfg, budget, cfg.reps, || {
        let t = Instant::now();
        for i in 0..k {
            ids.push(
                probert::region_add(RegionDesc {
                    start: base + i * 64,
                    len: 64,
                    name: "slice".into(),
                    write: None,
                })
                .expect("region_add"),
            );
        }
        let d = t.elapsed();
        let t = Instant::now();
        for id in ids.drain(..) {
            probert::region_remove(id).expect("region_remove");
        }
        removes.push(t.elapsed().as_nanos() as f64);
        d
    });
    let removes = Sample::of(removes);
    let mut r = row(format!("region_add ({k} regions, no probes)"), adds, k);
    r.vs = format!("{:.0} /s", k as f64 / adds.median * 1e9);
    rows.push(r);
    let mut r = row(
        format!("region_remove ({k} regions, no probes)"),
        removes,
        k,
    );
    r.vs = format!("{:.0} /s", k as f64 / removes.median * 1e9);
    rows.push(r);
    drop(slices);
    rows
}

// ---------------------------------------------------------------------------
// Hit latency under churn

struct Latency {
    mean: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    samples: usize,
    churn_cycles: u64,
}

/// One churn cycle: JIT 16 functions, register them, attach a probe to each
/// (one batch), call each, then free them — detaching in a batch first on
/// even cycles, letting `region_remove` detach on odd ones.
fn churn_cycle(cycle: u64) {
    let mut ops = dynasmrt::x64::Assembler::new().expect("assembler");
    let mut offsets = Vec::with_capacity(16);
    for _ in 0..16 {
        offsets.push(ops.offset());
        dynasm!(ops
            ; .arch x64
            ; push rbp
            ; mov rbp, rsp
            ; lea rax, [rdi + 1]
            ; pop rbp
            ; ret
        );
    }
    let buf = ops.finalize().expect("finalize");
    let base = buf.ptr(AssemblyOffset(0)) as usize;
    let region = probert::region_add(RegionDesc {
        start: base,
        len: buf.len(),
        name: "churn".into(),
        write: None,
    })
    .expect("region_add");
    let addrs: Vec<usize> = offsets.iter().map(|o| base + o.0).collect();
    let ids = probert::attach_batch(&reqs(&addrs)).expect("attach_batch");
    for &a in &addrs {
        // SAFETY: `a` is one of the functions emitted above, in `buf`, which
        // is alive; each is `extern "C" fn(u64) -> u64`.
        let f: extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute::<usize, _>(a) };
        assert_eq!(f(cycle), cycle + 1);
    }
    if cycle % 2 == 0 {
        probert::detach_batch(&ids).expect("detach_batch");
    }
    probert::region_remove(region).expect("region_remove");
    drop(buf);
}

fn latency(cfg: &Cfg, churn: bool) -> Latency {
    let stop = AtomicBool::new(false);
    let cap = (cfg.latency.as_nanos() / 500) as usize;
    let mut lat: Vec<u32> = Vec::with_capacity(cap);
    let cycles = std::thread::scope(|s| {
        let churner = churn.then(|| {
            s.spawn(|| {
                let mut cycles = 0;
                // Ordering: Relaxed — a stop flag; the join orders the rest.
                while !stop.load(Ordering::Relaxed) {
                    churn_cycle(cycles);
                    cycles += 1;
                }
                cycles
            })
        });
        // Warm-up, then per-call latency until the deadline.
        for i in 0..1000 {
            black_box(call(bench_latency, i));
        }
        let end = Instant::now() + cfg.latency;
        let mut i = 0u64;
        while lat.len() < cap {
            let t = Instant::now();
            let r = call(bench_latency, black_box(i));
            let d = t.elapsed();
            assert_eq!(r, i + 1);
            lat.push(d.as_nanos().min(u32::MAX as u128) as u32);
            i += 1;
            if t >= end {
                break;
            }
        }
        // Ordering: Relaxed — see the loop above.
        stop.store(true, Ordering::Relaxed);
        churner.map_or(0, |c| c.join().expect("the churn thread panicked"))
    });
    lat.sort_unstable();
    let q = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize] as f64;
    Latency {
        mean: lat.iter().map(|&x| f64::from(x)).sum::<f64>() / lat.len() as f64,
        p50: q(0.50),
        p99: q(0.99),
        p999: q(0.999),
        max: q(1.0),
        samples: lat.len(),
        churn_cycles: cycles,
    }
}

// ---------------------------------------------------------------------------
// Reporting

fn verdict(met: bool) -> String {
    if met { "met" } else { "**not met**" }.into()
}

/// A duration in ns, in a readable unit.
fn dur(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.1} ns")
    } else if ns < 1e6 {
        format!("{:.2} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

/// A ratio, with fewer decimals as it grows.
fn ratio(x: f64) -> String {
    if x < 10.0 {
        format!("{x:.2}")
    } else if x < 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

fn ns(x: f64) -> String {
    if x < 100.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.0}")
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The machine: CPU model, CPUs, kernel, rustc.
fn machine() -> String {
    let cpu = read_trimmed("/proc/cpuinfo")
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_else(|| "?".into());
    let rustc = std::process::Command::new(std::env::var("RUSTC").unwrap_or("rustc".into()))
        .arg("-V")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "rustc ?".into());
    format!("{cpu}, {cpus} CPUs, Linux {kernel}, {rustc}")
}

/// The 1-minute load average, from `/proc/loadavg`.
fn load_average() -> String {
    read_trimmed("/proc/loadavg")
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// The probert revision measured: `git describe --always --dirty`.
fn revision() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// Today's date and time, UTC.
fn now_utc() -> String {
    // SAFETY: `time(NULL)` and `gmtime_r` into a zeroed `tm` we own.
    unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::gmtime_r(&t, &mut tm);
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02} UTC",
            tm.tm_year + 1900,
            tm.tm_mon + 1,
            tm.tm_mday,
            tm.tm_hour,
            tm.tm_min
        )
    }
}

const COMMAND: &str = "cargo run --release --example bench";

/// Everything one run measured.
struct Results {
    bare: Sample,
    bare2: Sample,
    floor: Sample,
    floor2: Sample,
    chained: Sample,
    /// Emulated ×1, ×8 consumers; out of line ×1, ×8.
    trap: [Row; 4],
    /// NOP site ×1, ×8 consumers; `mov eax, imm32` site ×1, ×8.
    fast: [Row; 4],
    /// LLVM XRay, or why it was not measured.
    xray: Result<XRay, String>,
    /// `bench_frame` unprobed, and with a return probe: fast entry, trap
    /// entry (the exits fast where they can, in both).
    returns: (Sample, Row, Row),
    control: Vec<CpRow>,
    quiet: Latency,
    churned: Latency,
    /// The 1-minute load average before and after the run.
    load: (String, String),
}

fn main() {
    let cfg = if std::env::args().any(|a| a == "--quick") {
        Cfg::quick()
    } else {
        Cfg::full()
    };
    let wall = Instant::now();
    eprintln!("bench: measuring (quick: {}) …", cfg.quick);
    let load_before = load_average();
    let mut results = measure(&cfg);
    results.load = (load_before, load_average());
    let md = report(&cfg, &results);
    print!("{md}");
    if cfg.quick {
        eprintln!(
            "bench: quick run done in {:.1} s (BENCHMARKS.md not written)",
            wall.elapsed().as_secs_f64()
        );
    } else {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../BENCHMARKS.md");
        std::fs::write(path, &md).expect("write BENCHMARKS.md");
        eprintln!(
            "bench: done in {:.1} s; wrote BENCHMARKS.md",
            wall.elapsed().as_secs_f64()
        );
    }
}

fn measure(cfg: &Cfg) -> Results {
    // 1. Before probert exists: the bare call and the signal floor.
    let (bare, _) = per_call(cfg, bench_bare, 1);
    let (bare2, _) = per_call(cfg, bench_bare, 2);
    install_empty_sigtrap();
    let (floor, _) = per_call(cfg, bench_int3, 1);
    let (floor2, _) = per_call(cfg, bench_int3, 2);
    eprintln!(
        "bench: bare {:.2} ns, signal floor {:.0} ns",
        bare.median, floor.median
    );

    // 2. probert, which keeps the empty handler as the one it chains to.
    probert::init().expect("probert::init");
    let (chained, _) = per_call(cfg, bench_int3, 1);
    let trap = [
        probed_row(cfg, bench_push, Mode::Trap, 1, true),
        probed_row(cfg, bench_push, Mode::Trap, 8, false),
        probed_row(cfg, bench_riprel, Mode::Trap, 1, true),
        probed_row(cfg, bench_riprel, Mode::Trap, 8, false),
    ];
    eprintln!("bench: trap path done");
    let fast = [
        probed_row(cfg, bench_nop5, Mode::Fast, 1, true),
        probed_row(cfg, bench_nop5, Mode::Fast, 8, false),
        probed_row(cfg, bench_mov5, Mode::Fast, 1, true),
        probed_row(cfg, bench_mov5, Mode::Fast, 8, false),
    ];
    for (row, what) in fast.iter().zip(["NOP ×1", "NOP ×8", "mov ×1", "mov ×8"]) {
        if let Row::Unavailable(e) = row {
            eprintln!("bench: fast path {what}: {e}");
        }
    }
    eprintln!("bench: fast path done");
    let (frame_bare, fast_returns) = returns_row(cfg, Mode::Auto);
    let (_, trap_returns) = returns_row(cfg, Mode::Trap);
    eprintln!("bench: return probes done");
    let xray = xray(cfg);
    match &xray {
        Ok(x) => eprintln!(
            "bench: LLVM XRay {:.2} ns (its bare call {:.2} ns)",
            x.patched, x.bare
        ),
        Err(e) => eprintln!("bench: LLVM XRay not measured: {e}"),
    }

    // 3. The control plane.
    let control = control_plane(cfg);
    eprintln!("bench: control plane done");

    // 4. Latency, quiet then under churn, with one trap-path consumer.
    // SAFETY: a static assembly target; `empty` is async-signal-safe.
    let lat_id =
        unsafe { probert::attach_ex(addr(bench_latency), empty, std::ptr::null_mut(), Mode::Trap) }
            .expect("attach");
    let quiet = latency(cfg, false);
    let churned = latency(cfg, true);
    probert::detach(lat_id).expect("detach");
    eprintln!("bench: latency done");
    Results {
        bare,
        bare2,
        floor,
        floor2,
        chained,
        trap,
        fast,
        xray,
        returns: (frame_bare, fast_returns, trap_returns),
        control,
        quiet,
        churned,
        load: Default::default(),
    }
}

fn report(cfg: &Cfg, r: &Results) -> String {
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "Generated by `{COMMAND}` on {} — do not edit by hand: rerun the command.\n",
        now_utc()
    );
    let _ = writeln!(
        w,
        "Machine: {}; 1-minute load average {} before the run, {} after (other \
         processes compete for the CPUs when it approaches their number).\n",
        machine(),
        r.load.0,
        r.load.1
    );
    let _ = writeln!(w, "probert revision: `{}`.\n", revision());
    let _ = writeln!(
        w,
        "Each per-call figure is ns per call over a time-bounded loop: one warm-up \
         repetition, then {} repetitions of {} ms; median, min and max over the \
         repetitions. Probed rows use empty consumers (so they show probert's own \
         cost) and check that every consumer saw every call. Ratios are measured \
         side by side in this run. Nothing in the test suite asserts a time.\n",
        cfg.reps,
        cfg.rep.as_millis()
    );
    report_hits(w, r);
    report_xray(w, r);
    report_returns(w, r);
    report_scaling(w, r);
    report_control(w, cfg, &r.control);
    report_latency(w, cfg, r);
    md
}

/// One row of the per-call table.
fn hit_line(w: &mut String, what: &str, s: Sample, vs: &str, goal: &str, verdict: &str) {
    let _ = writeln!(
        w,
        "| {what} | {} | {} | {} | {vs} | {goal} | {verdict} |",
        ns(s.median),
        ns(s.min),
        ns(s.max)
    );
}

fn na_line(w: &mut String, what: &str, goal: &str) {
    let _ = writeln!(
        w,
        "| {what} | n/a (fast path unavailable) | | | | {goal} | n/a |"
    );
}

fn report_hits(w: &mut String, r: &Results) {
    let (bare, floor) = (r.bare, r.floor);
    let _ = writeln!(w, "## A probed call, one thread\n");
    let _ = writeln!(
        w,
        "| benchmark | median ns | min ns | max ns | vs baseline | goal | verdict |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|---:|---|---|");
    hit_line(w, "bare call, no probe", bare, "1.00× bare", "—", "");
    hit_line(
        w,
        "signal floor: inline `int3` + empty `SA_SIGINFO` handler¹",
        floor,
        &format!("{:.0}× bare", floor.median / bare.median),
        "—",
        "",
    );
    hit_line(
        w,
        "foreign `int3` chained by probert to that handler",
        r.chained,
        &format!("{:.2}× floor", r.chained.median / floor.median),
        "—",
        "",
    );
    let trap = [
        "trap path, emulated `push rbp`, 1 consumer",
        "trap path, emulated `push rbp`, 8 consumers",
        "trap path, out-of-line `mov rax, [rip+x]`, 1 consumer",
        "trap path, out-of-line `mov rax, [rip+x]`, 8 consumers",
    ];
    for (what, row) in trap.into_iter().zip(&r.trap) {
        match row.one() {
            Some(s) => {
                let ratio = s.median / floor.median;
                let vs = format!("{ratio:.2}× floor");
                hit_line(w, what, s, &vs, "≤ 1.10× floor", &verdict(ratio <= 1.10));
            }
            None => na_line(w, what, "≤ 1.10× floor"),
        }
    }
    let fast = [
        "fast path, 5-byte NOP site, 1 consumer",
        "fast path, 5-byte NOP site, 8 consumers",
        "fast path, `mov eax, imm32` site, 1 consumer",
        "fast path, `mov eax, imm32` site, 8 consumers",
    ];
    for (what, row) in fast.into_iter().zip(&r.fast) {
        match row.one() {
            Some(s) => {
                let added = s.median - bare.median;
                let vs = format!("{:.1}× bare (+{added:.1} ns)", s.median / bare.median);
                hit_line(w, what, s, &vs, "≤ 5 ns/hit", &verdict(added <= 5.0));
            }
            None => na_line(w, what, "≤ 5 ns/hit"),
        }
    }
    let _ = writeln!(
        w,
        "\n¹ The floor is measured in this process *before* `probert::init()`, with \
         probert's flags (`SA_SIGINFO | SA_NODEFER | SA_RESTART`): the kernel's \
         trap → signal frame → handler → `rt_sigreturn` round trip, which every \
         `int3`-based probe pays. The same handler then stays installed as the one \
         probert chains foreign traps to (the third row). Fast-path ns/hit is the \
         median minus the bare call's. The ≤ 5 ns goal was set on a ~5 GHz AMD \
         Zen 5, where an LLVM XRay handler call costs ~4.5 ns; the next table \
         measures XRay beside probert on this machine.\n"
    );
}

/// LLVM XRay's patched function-entry sled with a counting handler, as
/// `examples/c/xray_bench.c` measures it (the method of this program).
#[derive(Clone, Copy, Debug)]
struct XRay {
    /// Its own bare call (the same body, not instrumented).
    bare: f64,
    patched: f64,
    /// Patched with entry and exit sleds: two handler calls per call.
    entry_exit: Option<f64>,
}

/// Builds `examples/c/xray_bench.c` with clang and runs it, in this run.
fn xray(cfg: &Cfg) -> Result<XRay, String> {
    use std::process::Command;
    if cfg.quick {
        return Err("not measured by --quick runs".into());
    }
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/c/xray_bench.c");
    let clang = ["clang-14", "clang"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .ok_or("no clang (Debian: apt-get install clang-14 libclang-rt-14-dev)")?;
    let entry = run_xray(
        clang,
        src,
        &["-fxray-instrumentation-bundle=function-entry"],
    )?;
    let row = |out: &str, name: &str| {
        out.lines()
            .filter_map(|l| l.strip_prefix("xray "))
            .find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .ok_or(format!("its output has no `{name}` row"))
    };
    // XRay's default bundle: entry and exit sleds.
    let entry_exit = run_xray(clang, src, &[]).ok().and_then(|out| {
        (row(&out, "handler_calls_per_call").ok() == Some(2.0))
            .then(|| row(&out, "patched").ok())
            .flatten()
    });
    Ok(XRay {
        bare: row(&entry, "bare")?,
        patched: row(&entry, "patched")?,
        entry_exit,
    })
}

/// Builds `src` with `clang` and XRay (and `flags`), runs it, and returns
/// its output.
fn run_xray(clang: &str, src: &str, flags: &[&str]) -> Result<String, String> {
    use std::process::Command;
    let exe = std::env::temp_dir().join(format!("probert-xray-bench-{}", std::process::id()));
    let built = Command::new(clang)
        .args(["-std=c11", "-O2", "-fxray-instrument", "-fxray-modes=none"])
        .args(flags)
        .arg(src)
        .arg("-o")
        .arg(&exe)
        .output()
        .map_err(|e| format!("{clang}: {e}"))?;
    if !built.status.success() {
        let err = String::from_utf8_lossy(&built.stderr);
        let first = err.lines().next().unwrap_or("").to_owned();
        return Err(format!(
            "{clang} could not build it (XRay runtime missing?): {first}"
        ));
    }
    let ran = Command::new(&exe).output();
    let _ = std::fs::remove_file(&exe);
    let ran = ran.map_err(|e| format!("running it: {e}"))?;
    if !ran.status.success() {
        return Err(format!(
            "it failed: {}",
            String::from_utf8_lossy(&ran.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&ran.stdout).into_owned())
}

fn report_xray(w: &mut String, r: &Results) {
    let _ = writeln!(
        w,
        "## Fast path vs LLVM XRay, same run
"
    );
    let x = match &r.xray {
        Ok(x) => *x,
        Err(e) => {
            let _ = writeln!(w, "LLVM XRay not measured: {e}.\n");
            return;
        }
    };
    let _ = writeln!(
        w,
        "| per call | median ns | added to its bare call | vs XRay | goal | verdict |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|---|---|");
    let xa = x.patched - x.bare;
    let _ = writeln!(
        w,
        "| LLVM XRay, patched function-entry sled, counting handler² | {} | +{xa:.1} ns | 1.00× | — |  |",
        ns(x.patched)
    );
    let rows = [
        ("probert fast path, 5-byte NOP site, 1 consumer", &r.fast[0]),
        (
            "probert fast path, `mov eax, imm32` site, 1 consumer",
            &r.fast[2],
        ),
    ];
    for (what, row) in rows {
        if let Some(s) = row.one() {
            let added = s.median - r.bare.median;
            let _ = writeln!(
                w,
                "| {what} | {} | +{added:.1} ns | {:.2}× | ≤ XRay | {} |",
                ns(s.median),
                added / xa,
                verdict(added <= xa)
            );
        }
    }
    let _ = writeln!(
        w,
        "\n² `examples/c/xray_bench.c`, built by this program with \
         `clang -O2 -fxray-instrument -fxray-instrumentation-bundle=function-entry` \
         and run as a child process right after the fast-path rows, with this \
         program's method; its bare call was {} ns. The handler increments a \
         global, as probert's empty consumers do. \"vs XRay\" compares the cost \
         added to each one's bare call. XRay's trampoline runs only at function \
         entry and saves what the ABI leaves live there (no rbx, xmm8–15); \
         probert's saves every GPR, RFLAGS and xmm0–15, at any instruction.\n",
        ns(x.bare)
    );
}

fn report_returns(w: &mut String, r: &Results) {
    let _ = writeln!(w, "## Return probes vs LLVM XRay entry + exit, same run\n");
    let (bare, fast, trap) = &r.returns;
    let _ = writeln!(
        w,
        "| per call, entry + return | median ns | added to its bare call | vs XRay | goal | verdict |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|---|---|");
    let xa = match &r.xray {
        Ok(XRay {
            bare: xb,
            entry_exit: Some(ee),
            ..
        }) => {
            let xa = ee - xb;
            let _ = writeln!(
                w,
                "| LLVM XRay, patched entry and exit sleds, counting handler³ | {} | +{xa:.1} ns | 1.00× | — |  |",
                ns(*ee)
            );
            Some(xa)
        }
        _ => None,
    };
    for (what, row, goal) in [
        (
            "probert, fast entry and fast exit, empty handlers",
            fast,
            true,
        ),
        (
            "probert, trap entry and fast exit, empty handlers",
            trap,
            false,
        ),
    ] {
        match row {
            Row::Ran { one, .. } => {
                let added = one.median - bare.median;
                let (vs, g, v) = match xa {
                    Some(xa) if goal => (
                        format!("{:.2}×", added / xa),
                        "≤ XRay",
                        verdict(added <= xa),
                    ),
                    Some(xa) => (format!("{:.2}×", added / xa), "—", String::new()),
                    None => ("—".into(), "—", String::new()),
                };
                let _ = writeln!(
                    w,
                    "| {what} | {} | +{added:.1} ns | {vs} | {g} | {v} |",
                    ns(one.median)
                );
            }
            Row::Unavailable(e) => {
                let _ = writeln!(w, "| {what} | — | — | — | — | {e} |");
            }
        }
    }
    let _ = writeln!(
        w,
        "\n³ `examples/c/xray_bench.c` built with XRay's default bundle (an entry \
         and an exit sled, two handler calls per call). probert's target is \
         `push rbp; mov rbp, rsp; lea rax, [rdi + 1]; nop4; pop rbp; ret`, its bare \
         call {}: the entry's three instructions and the exit's last three are \
         each displaced into a stub (the exit's calls the consumers at the `ret`, \
         then returns), and the return handler runs with the state after the \
         `ret`.\n",
        ns(bare.median)
    );
}

fn report_scaling(w: &mut String, r: &Results) {
    let _ = writeln!(w, "## Throughput, 1 vs 2 threads (1 consumer)\n");
    let _ = writeln!(
        w,
        "| mode | 1 thread ns/call | 2 threads ns/call, aggregate (min–max) | speedup | goal | verdict |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|---|---|");
    let line = |w: &mut String, what: &str, one: Sample, two: Sample, goal: Option<f64>| {
        let sp = one.median / two.median;
        let (g, v) = match goal {
            Some(g) => (format!("≥ {g:.1}×"), verdict(sp >= g)),
            None => ("—".into(), String::new()),
        };
        let _ = writeln!(
            w,
            "| {what} | {} | {} ({}–{}) | {sp:.2}× | {g} | {v} |",
            ns(one.median),
            ns(two.median),
            ns(two.min),
            ns(two.max)
        );
    };
    line(w, "bare call", r.bare, r.bare2, None);
    line(w, "signal floor", r.floor, r.floor2, None);
    for (what, row, goal) in [
        ("trap path, emulated", &r.trap[0], None),
        ("trap path, out of line", &r.trap[2], None),
        ("fast path, 5-byte NOP", &r.fast[0], Some(1.9)),
        ("fast path, `mov eax, imm32`", &r.fast[2], Some(1.9)),
    ] {
        match (row.one(), row.two()) {
            (Some(one), Some(two)) => line(w, what, one, two, goal),
            _ => {
                let _ = writeln!(
                    w,
                    "| {what} | n/a | n/a (fast path unavailable) | — | ≥ 1.9× | n/a |"
                );
            }
        }
    }
    let _ = writeln!(
        w,
        "\nThe machine has {} CPUs. Two threads call the same probed function; a \
         speedup below 2× on the bare call or the signal floor is the machine's \
         (other load, shared cores), on probert's rows beyond that it is \
         probert's shared cache lines.",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let bare_speedup = r.bare.median / r.bare2.median;
    if bare_speedup < 1.8 {
        let _ = writeln!(
            w,
            "\n**In this run the bare call itself scaled only {bare_speedup:.2}×: the \
             two threads did not have two CPUs to themselves, so the speedups above \
             say little. Rerun on an idle machine.**"
        );
    }
    let _ = writeln!(w);
}

fn report_control(w: &mut String, cfg: &Cfg, rows: &[CpRow]) {
    let _ = writeln!(w, "## Control plane\n");
    let _ = writeln!(
        w,
        "| operation | median | min | max | per probe/region | vs baseline | goal | verdict |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---|---|");
    for r in rows {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.what,
            dur(r.total.median),
            dur(r.total.min),
            dur(r.total.max),
            dur(r.total.median / r.n as f64),
            r.vs,
            r.goal,
            r.verdict
        );
    }
    let _ = writeln!(
        w,
        "\nProbes are on the `push rbp` of functions `push rbp; mov rbp, rsp; pop \
         rbp; ret` (6 bytes each), {} of them in one JIT region registered with \
         `region_add`. \"One by one\" is `attach` or `detach` in a loop (each \
         `detach` waits its own grace period: it includes `sync`). Median, min \
         and max are over repetitions of the whole operation. The region rows \
         time {k} `region_add`s, then {k} `region_remove`s, of 64-byte regions \
         without probes.\n",
        cfg.sizes[1],
        k = regions_per_rep(cfg),
    );
}

fn report_latency(w: &mut String, cfg: &Cfg, r: &Results) {
    let (quiet, churned) = (&r.quiet, &r.churned);
    let _ = writeln!(w, "## Trap-path hit latency under churn\n");
    let _ = writeln!(
        w,
        "| scenario | mean ns | p50 ns | p99 ns | p99.9 ns | max ns | calls | p50 / p99 vs quiet |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|---:|");
    let _ = writeln!(
        w,
        "| quiet: one thread calls a probed `push rbp` | {} | {} | {} | {} | {} | {} | 1.00× / 1.00× |",
        ns(quiet.mean),
        ns(quiet.p50),
        ns(quiet.p99),
        ns(quiet.p999),
        ns(quiet.max),
        quiet.samples
    );
    let rate = churned.churn_cycles as f64 / cfg.latency.as_secs_f64();
    let _ = writeln!(
        w,
        "| churn: another thread cycles JIT regions and probes ({rate:.0} cycles/s) | {} | {} | {} | {} | {} | {} | {:.2}× / {:.2}× |",
        ns(churned.mean),
        ns(churned.p50),
        ns(churned.p99),
        ns(churned.p999),
        ns(churned.max),
        churned.samples,
        churned.p50 / quiet.p50,
        churned.p99 / quiet.p99
    );
    let _ = writeln!(
        w,
        "\nEach call is timed with `Instant::now()` on both sides (reading the clock \
         costs about {} ns here). A churn cycle JITs 16 functions with dynasmrt, \
         registers them, attaches a probe to each with `attach_batch`, calls each, \
         then detaches with `detach_batch` (even cycles) or lets `region_remove` \
         detach (odd cycles), and frees the code. The tail under churn includes \
         the interrupts churn sends to the measuring CPU: TLB-shootdown IPIs when \
         the JIT re-protects or unmaps code, and the `membarrier` of each grace \
         period.",
        ns(clock_cost())
    );
}

/// The cost of one `Instant::now()`, ns.
fn clock_cost() -> f64 {
    let n = 100_000;
    let t = Instant::now();
    for _ in 0..n {
        black_box(Instant::now());
    }
    t.elapsed().as_nanos() as f64 / n as f64
}
