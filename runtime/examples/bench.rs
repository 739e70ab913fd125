//! probert's benchmarks: what a probed call costs on each path, how it scales
//! to two threads, what the control plane costs, how hit latency behaves
//! while another thread churns JIT code and probes, and how much of real
//! system libraries AUTO mode serves fast (the coverage section, last).
//!
//! ```sh
//! cargo run --release --example bench              # 1–2 minutes; rewrites BENCHMARKS.md
//! cargo run --release --example bench -- --quick   # a smoke run of every row; writes nothing
//! cargo run --release --example bench -- --coverage # only the coverage of real libraries;
//!                                                   # rewrites that section of BENCHMARKS.md
//! cargo run --release --example bench -- --coverage libz lua  # some of them; writes nothing
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

    BENCH_FUNC bench_uprobe      // bench_frame's copy, for the kernel's uprobes
    push rbp
    mov rbp, rsp
    lea rax, [rdi + 1]
    nop dword ptr [rax]
    pop rbp
    ret
    BENCH_END bench_uprobe

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
    fn bench_uprobe(x: u64) -> u64;
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

/// A kernel uprobe and uretprobe on `bench_uprobe`, each with a BPF
/// counter, through bpftrace, in this run: (the function unprobed, probed).
fn uretprobe(cfg: &Cfg) -> Result<(Sample, Sample), String> {
    use std::process::{Command, Stdio};
    if cfg.quick {
        return Err("not measured by --quick runs".into());
    }
    let exe = std::env::current_exe().map_err(|e| format!("{e}"))?;
    let exe = exe.display();
    let (bare, _) = per_call(cfg, bench_uprobe, 1);
    let script = format!(
        "uprobe:{exe}:bench_uprobe {{ @entries = count(); }} \
         uretprobe:{exe}:bench_uprobe {{ @returns = count(); }}"
    );
    if !std::path::Path::new("/sys/kernel/tracing/uprobe_events").exists() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .output();
    }
    let mut child = Command::new("bpftrace")
        .args(["-p", &std::process::id().to_string(), "-e", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("bpftrace: {e} (Debian: apt-get install bpftrace)"))?;
    // Attached once the kernel's breakpoint is in this process's copy.
    // SAFETY: the first byte of a function of this program's text.
    let first = || unsafe { std::ptr::read_volatile(addr(bench_uprobe) as *const u8) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while first() != 0xCC {
        if Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            let _ = child.kill();
            let out = child.wait_with_output().map_err(|e| format!("{e}"))?;
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(format!(
                "bpftrace did not attach: {}",
                err.lines().next().unwrap_or("(no message)")
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (probed, calls) = per_call(cfg, bench_uprobe, 1);
    // SAFETY: signalling the child this function spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().map_err(|e| format!("{e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let count = |name: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(&format!("@{name}: "))?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    if count("entries") < calls || count("returns") < calls {
        return Err(format!(
            "bpftrace counted {} entries and {} returns of {calls} calls",
            count("entries"),
            count("returns")
        ));
    }
    Ok((bare, probed))
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
    format!("{cpu}{}, {cpus} CPUs, Linux {kernel}, {rustc}", cpu_kind())
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
    /// A kernel uprobe + uretprobe (bare, probed), or why not measured.
    uretprobe: Result<(Sample, Sample), String>,
    control: Vec<CpRow>,
    /// Every instruction of SQLite attached and detached, or why not.
    scale: Result<Scale, String>,
    quiet: Latency,
    churned: Latency,
    /// Coverage of real libraries.
    coverage: Coverage,
    /// The 1-minute load average before and after the run.
    load: (String, String),
}

fn main() {
    let cfg = if std::env::args().any(|a| a == "--quick") {
        Cfg::quick()
    } else {
        Cfg::full()
    };
    if std::env::args().any(|a| a == "--coverage") {
        coverage_only(&cfg);
        return;
    }
    if std::env::args().any(|a| a == "--scale-child") {
        scale_child();
        return;
    }
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
    let uretprobe = uretprobe(cfg);
    if let Err(e) = &uretprobe {
        eprintln!("bench: kernel uretprobe not measured: {e}");
    }
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
    let scale = scale(cfg);
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

    // 5. Coverage of real libraries, last: it probes libc under everything.
    let coverage = coverage(cfg);
    eprintln!("bench: coverage done");
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
        uretprobe,
        control,
        scale,
        quiet,
        churned,
        coverage,
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
    report_scale(w, &r.scale);
    report_latency(w, cfg, r);
    let _ = writeln!(w);
    report_coverage(w, &r.coverage, &r.load);
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
#[derive(Clone, Debug)]
struct XRay {
    /// Its own bare call (the same body, not instrumented).
    bare: f64,
    patched: f64,
    /// Patched with entry and exit sleds: two handler calls per call.
    entry_exit: Option<f64>,
    /// Paired rounds: the cost XRay adds to its bare call in one run of its
    /// program, then what probert's fast path (5-byte NOP site, 1 consumer)
    /// adds to the bare call, measured right after it (ns each).
    rounds: Vec<(f64, f64)>,
}

/// Paired XRay/probert rounds: the machine's speed drifts between sections
/// of a run (other load, frequency), and XRay's figure with it.
const XRAY_ROUNDS: usize = 3;

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
    let exe = build_xray(
        clang,
        src,
        &["-fxray-instrumentation-bundle=function-entry"],
    )?;
    let entry = run_exe(&exe);
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
    let entry = entry.inspect_err(|_| {
        let _ = std::fs::remove_file(&exe);
    })?;
    // Paired rounds: XRay, then probert's NOP row and the bare call.
    let mut rounds = Vec::with_capacity(XRAY_ROUNDS);
    for _ in 0..XRAY_ROUNDS {
        let Ok(out) = run_exe(&exe) else { break };
        let (Ok(b), Ok(p)) = (row(&out, "bare"), row(&out, "patched")) else {
            break;
        };
        let (bare, _) = per_call(cfg, bench_bare, 1);
        let Some(fast) = probed_row(cfg, bench_nop5, Mode::Fast, 1, false).one() else {
            break;
        };
        rounds.push((p - b, fast.median - bare.median));
    }
    let _ = std::fs::remove_file(&exe);
    // XRay's default bundle: entry and exit sleds.
    let entry_exit = build_xray(clang, src, &[]).ok().and_then(|exe| {
        let out = run_exe(&exe);
        let _ = std::fs::remove_file(&exe);
        let out = out.ok()?;
        (row(&out, "handler_calls_per_call").ok() == Some(2.0))
            .then(|| row(&out, "patched").ok())
            .flatten()
    });
    Ok(XRay {
        bare: row(&entry, "bare")?,
        patched: row(&entry, "patched")?,
        entry_exit,
        rounds,
    })
}

/// Builds `src` with `clang` and XRay (and `flags`); returns the program's
/// path (the caller removes it).
fn build_xray(clang: &str, src: &str, flags: &[&str]) -> Result<std::path::PathBuf, String> {
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
    Ok(exe)
}

/// Runs the program at `exe` and returns its output.
fn run_exe(exe: &std::path::Path) -> Result<String, String> {
    let ran = std::process::Command::new(exe)
        .output()
        .map_err(|e| format!("running it: {e}"))?;
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
        Ok(x) => x,
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
    if !x.rounds.is_empty() {
        let mut ratios: Vec<f64> = x.rounds.iter().map(|&(xr, p)| p / xr).collect();
        ratios.sort_by(f64::total_cmp);
        let median = ratios[ratios.len() / 2];
        let each: Vec<String> = x
            .rounds
            .iter()
            .map(|&(xr, p)| format!("+{p:.1} vs +{xr:.1} ns ({:.2}×)", p / xr))
            .collect();
        let _ = writeln!(
            w,
            "| probert fast path, 5-byte NOP site, 1 consumer: paired rounds (see ²) | {} | — | {median:.2}× | ≤ XRay | {} |",
            each.join("; "),
            verdict(median <= 1.0)
        );
    }
    let _ = writeln!(
        w,
        "\n² `examples/c/xray_bench.c`, built by this program with \
         `clang -O2 -fxray-instrument -fxray-instrumentation-bundle=function-entry` \
         and run as a child process right after the fast-path rows, with this \
         program's method; its bare call was {} ns. The handler increments a \
         global, as probert's empty consumers do. \"vs XRay\" compares the cost \
         added to each one's bare call. XRay's trampoline runs only at function \
         entry and saves what the ABI leaves live there (the caller-saved \
         GPRs, xmm0–7) and RFLAGS; probert's, at any instruction, saves RFLAGS \
         and the caller-saved GPRs, and besides them only what its analysis \
         of the handler's code shows the handler may change or see (for these \
         empty handlers, nothing: the trampoline's lean case). \
         The speed of a shared guest drifts between sections of a run, and \
         the two rows above are measured minutes apart: the paired rounds run \
         XRay's program, then at once probert's NOP row and the bare call, \
         {} times, and compare what each adds in its round; the verdict there \
         is the median round's.\n",
        ns(x.bare),
        XRAY_ROUNDS
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
    match &r.uretprobe {
        Ok((b, p)) => {
            let added = p.median - b.median;
            let vs = xa.map_or("—".into(), |xa| format!("{:.2}×", added / xa));
            let _ = writeln!(
                w,
                "| kernel uprobe + uretprobe, a BPF counter each (bpftrace) | {} | +{added:.1} ns | {vs} | — |  |",
                ns(p.median)
            );
        }
        Err(e) => {
            let _ = writeln!(
                w,
                "| kernel uprobe + uretprobe (bpftrace) | — | — | — | — | {e} |"
            );
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

// ---------------------------------------------------------------------------
// Coverage of real libraries: how much of their code AUTO mode serves fast
//
// For each system library: every function entry probed at once in AUTO mode
// (a counting consumer, `attach_batch`), the share served fast and why the
// rest is not, the slowdown of a workload running that library (its results
// checked identical to unprobed, one entry's hit count checked exact); then
// every instruction boundary, probed apart (no two probes within
// `APART` bytes, so that no probe sits inside another's displaced run) and
// all at once.

/// Probes at least this far apart cannot be inside each other's displaced
/// run (a run covers at most 4 + 15 bytes from its start).
const APART: usize = 32;

/// How many requests one `attach_batch` carries.
const CHUNK: usize = 4096;

/// Hits of the coverage consumers, all of them.
static COV_HITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The coverage consumer: counts the hit. Async-signal-safe (one relaxed
/// atomic add).
unsafe extern "C" fn cov_count(_hit: *mut Hit) -> u32 {
    COV_HITS.fetch_add(1, Ordering::Relaxed);
    Action::Continue as u32
}

/// A system library and a workload that runs it.
struct CovLib {
    /// The name `dlopen` and `probert::functions` take.
    soname: &'static str,
    /// What the workload does, for the report.
    what: &'static str,
    /// The function whose entry hits are checked exact, and how many calls
    /// of it one run of the workload makes.
    counted: (&'static str, u64),
    /// Runs the workload once; a digest of its results.
    run: fn(*mut std::ffi::c_void) -> String,
}

const COV_LIBS: [CovLib; 4] = [
    CovLib {
        soname: "libc.so.6",
        what: "`qsort` of 20,000 ints ×4, then `snprintf`, `strtol`, `strlen`, `strcmp`, \
               `strstr`, `memcpy`, `memcmp` ×4,000 each",
        counted: ("qsort", LIBC_SORTS),
        run: libc_workload,
    },
    CovLib {
        soname: "libz.so.1",
        what: "`compress2` (levels 1, 6, 9) and `uncompress` of 32 KiB of text, `crc32`",
        counted: ("compress2", 3),
        run: zlib_workload,
    },
    CovLib {
        soname: "libsqlite3.so.0",
        what: "in-memory database: create, insert 2,000 rows, index, select, group, update",
        counted: ("sqlite3_open", 1),
        run: sqlite_workload,
    },
    CovLib {
        soname: "liblua5.4.so.0",
        what: "a Lua script: fill and sort a 5,000-element table, `fib(18)`, \
               `string.format` and `table.concat`",
        counted: ("luaL_newstate", 1),
        run: lua_workload,
    },
];

/// The address of `name` in the library `h`, as a function pointer `T`.
fn cov_sym<T: Copy>(h: *mut std::ffi::c_void, name: &str) -> T {
    assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<usize>());
    let c = std::ffi::CString::new(name).expect("symbol name");
    // SAFETY: a handle from dlopen and a NUL-terminated name.
    let p = unsafe { libc::dlsym(h, c.as_ptr()) };
    assert!(!p.is_null(), "no {name}");
    // SAFETY: `T` is the function-pointer type of the symbol (the callers
    // give the C prototype), of pointer size (checked above).
    unsafe { std::mem::transmute_copy(&p) }
}

/// FNV-1a over bytes, for digests.
fn fnv(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h = (*h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
}

const LIBC_SORTS: u64 = 4;

extern "C" fn cmp_u32(a: *const std::ffi::c_void, b: *const std::ffi::c_void) -> libc::c_int {
    // SAFETY: qsort passes pointers to two elements of the u32 array.
    let (a, b) = unsafe { (*(a as *const u32), *(b as *const u32)) };
    a.cmp(&b) as libc::c_int
}

/// libc called through its own entries (the bench's and std's own calls of
/// libc are probed too, meanwhile).
fn libc_workload(_: *mut std::ffi::c_void) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut v: Vec<u32> = Vec::with_capacity(20_000);
    for round in 0..LIBC_SORTS as u32 {
        v.clear();
        v.extend(
            (0..20_000u32).map(|i| i.wrapping_mul(2_654_435_761).rotate_left(round) % 100_003),
        );
        // SAFETY: a valid array of `len` u32s and a comparator of u32s.
        unsafe { libc::qsort(v.as_mut_ptr().cast(), v.len(), 4, Some(cmp_u32)) };
        fnv(&mut h, &v[0].to_le_bytes());
        fnv(&mut h, &v[v.len() - 1].to_le_bytes());
        fnv(&mut h, &v[v.len() / 2].to_le_bytes());
    }
    let mut buf = [0u8; 128];
    let mut prev = [0u8; 128];
    let needle = b"7:\0";
    for i in 0..4000i32 {
        // SAFETY: `buf` holds 128 bytes; the format takes an int, a string
        // and a double; every string below is NUL-terminated by snprintf.
        unsafe {
            let n = libc::snprintf(
                buf.as_mut_ptr().cast(),
                buf.len(),
                c"%d:%s:%.3f".as_ptr(),
                i * 37,
                c"probert".as_ptr(),
                f64::from(i) / 7.0,
            );
            let len = libc::strlen(buf.as_ptr().cast());
            assert_eq!(len, n as usize);
            let num = libc::strtol(buf.as_ptr().cast(), std::ptr::null_mut(), 10);
            let c = libc::strcmp(buf.as_ptr().cast(), prev.as_ptr().cast());
            let s = libc::strstr(buf.as_ptr().cast(), needle.as_ptr().cast());
            let m = libc::memcmp(buf.as_ptr().cast(), prev.as_ptr().cast(), len);
            libc::memcpy(
                prev.as_mut_ptr().cast(),
                buf.as_ptr().cast(),
                black_box(len + 1),
            );
            fnv(&mut h, &buf[..len]);
            fnv(&mut h, &num.to_le_bytes());
            fnv(
                &mut h,
                &[c.signum() as u8, m.signum() as u8, s.is_null() as u8],
            );
        }
    }
    format!("{h:016x}")
}

type Compress2 =
    unsafe extern "C" fn(*mut u8, *mut libc::c_ulong, *const u8, libc::c_ulong, i32) -> i32;
type Uncompress =
    unsafe extern "C" fn(*mut u8, *mut libc::c_ulong, *const u8, libc::c_ulong) -> i32;
type Crc32 = unsafe extern "C" fn(libc::c_ulong, *const u8, u32) -> libc::c_ulong;

fn zlib_workload(h: *mut std::ffi::c_void) -> String {
    let (compress2, uncompress, crc32): (Compress2, Uncompress, Crc32) = (
        cov_sym(h, "compress2"),
        cov_sym(h, "uncompress"),
        cov_sym(h, "crc32"),
    );
    let words = [
        "probe", "fast", "trap", "jump", "stub", "site", "run", "entry",
    ];
    let mut src = Vec::with_capacity(32 << 10);
    let mut x = 12345u32;
    while src.len() < 32 << 10 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        src.extend_from_slice(words[(x >> 16) as usize % words.len()].as_bytes());
        src.push(if x % 7 == 0 { b'\n' } else { b' ' });
    }
    let mut out = String::new();
    for level in [1, 6, 9] {
        let mut z = vec![0u8; src.len() + src.len() / 100 + 64];
        let mut zlen = z.len() as libc::c_ulong;
        let mut back = vec![0u8; src.len()];
        let mut blen = back.len() as libc::c_ulong;
        // SAFETY: buffers of the lengths given; zlib's prototypes.
        unsafe {
            assert_eq!(
                compress2(
                    z.as_mut_ptr(),
                    &mut zlen,
                    src.as_ptr(),
                    src.len() as _,
                    level
                ),
                0
            );
            assert_eq!(
                uncompress(back.as_mut_ptr(), &mut blen, z.as_ptr(), zlen),
                0
            );
            let crc = crc32(0, z.as_ptr(), zlen as u32);
            let _ = write!(out, "{level}:{zlen}:{crc:08x} ");
        }
        assert!(blen as usize == src.len() && back == src, "zlib round trip");
    }
    out
}

type SqlOpen = unsafe extern "C" fn(*const libc::c_char, *mut *mut std::ffi::c_void) -> i32;
type SqlRow = unsafe extern "C" fn(
    *mut std::ffi::c_void,
    i32,
    *mut *mut libc::c_char,
    *mut *mut libc::c_char,
) -> i32;
type SqlExec = unsafe extern "C" fn(
    *mut std::ffi::c_void,
    *const libc::c_char,
    Option<SqlRow>,
    *mut std::ffi::c_void,
    *mut *mut libc::c_char,
) -> i32;
type SqlClose = unsafe extern "C" fn(*mut std::ffi::c_void) -> i32;

unsafe extern "C" fn sql_row(
    out: *mut std::ffi::c_void,
    n: i32,
    vals: *mut *mut libc::c_char,
    _: *mut *mut libc::c_char,
) -> i32 {
    // SAFETY: `out` is the String `sqlite_workload` passed; `vals` holds
    // `n` column values, each NULL or NUL-terminated.
    let out = unsafe { &mut *(out as *mut String) };
    for i in 0..n as usize {
        // SAFETY: as above.
        let v = unsafe { *vals.add(i) };
        if !v.is_null() {
            // SAFETY: as above.
            out.push_str(&unsafe { std::ffi::CStr::from_ptr(v) }.to_string_lossy());
        }
        out.push('|');
    }
    out.push('\n');
    0
}

fn sqlite_workload(h: *mut std::ffi::c_void) -> String {
    let (open, exec, close): (SqlOpen, SqlExec, SqlClose) = (
        cov_sym(h, "sqlite3_open"),
        cov_sym(h, "sqlite3_exec"),
        cov_sym(h, "sqlite3_close"),
    );
    let mut db = std::ptr::null_mut();
    let sql = c"CREATE TABLE t(a INTEGER PRIMARY KEY, b TEXT, c REAL);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
         INSERT INTO t SELECT i, printf('k%d', i * 7919 % 1000), i * 0.25 FROM n;
         CREATE INDEX tb ON t(b);
         SELECT count(*), sum(a), total(c) FROM t;
         SELECT b, count(*) FROM t GROUP BY b ORDER BY count(*) DESC, b LIMIT 3;
         UPDATE t SET c = c * 2 WHERE a % 3 = 0;
         SELECT total(c), max(b) FROM t WHERE b > 'k5';";
    let mut out = String::new();
    // SAFETY: SQLite's prototypes; `sql_row` gets `out` back.
    unsafe {
        assert_eq!(open(c":memory:".as_ptr(), &mut db), 0);
        let rc = exec(
            db,
            sql.as_ptr(),
            Some(sql_row),
            &mut out as *mut String as *mut std::ffi::c_void,
            std::ptr::null_mut(),
        );
        assert_eq!(rc, 0, "sqlite3_exec");
        assert_eq!(close(db), 0);
    }
    out
}

type LuaNew = unsafe extern "C" fn() -> *mut std::ffi::c_void;
type LuaOpenLibs = unsafe extern "C" fn(*mut std::ffi::c_void);
type LuaLoad = unsafe extern "C" fn(*mut std::ffi::c_void, *const libc::c_char) -> i32;
type LuaPcallK = unsafe extern "C" fn(*mut std::ffi::c_void, i32, i32, i32, isize, usize) -> i32;
type LuaToLString =
    unsafe extern "C" fn(*mut std::ffi::c_void, i32, *mut usize) -> *const libc::c_char;
type LuaClose = unsafe extern "C" fn(*mut std::ffi::c_void);

fn lua_workload(h: *mut std::ffi::c_void) -> String {
    let (new, openlibs, load, pcallk, tolstring, close): (
        LuaNew,
        LuaOpenLibs,
        LuaLoad,
        LuaPcallK,
        LuaToLString,
        LuaClose,
    ) = (
        cov_sym(h, "luaL_newstate"),
        cov_sym(h, "luaL_openlibs"),
        cov_sym(h, "luaL_loadstring"),
        cov_sym(h, "lua_pcallk"),
        cov_sym(h, "lua_tolstring"),
        cov_sym(h, "lua_close"),
    );
    let script = c"local t = {}
        for i = 1, 5000 do t[i] = (i * 7919) % 10007 end
        table.sort(t)
        local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
        local parts = {}
        for i = 1, 1000 do parts[#parts + 1] = string.format('%d:%x', i, t[i]) end
        local s = table.concat(parts, ',')
        return string.format('%d %d %d %d ', t[1], t[#t], fib(18), #s) .. s:sub(1, 40)";
    // SAFETY: Lua 5.4's prototypes; the string is copied before `lua_close`.
    unsafe {
        let l = new();
        assert!(!l.is_null(), "luaL_newstate");
        openlibs(l);
        assert_eq!(load(l, script.as_ptr()), 0, "luaL_loadstring");
        assert_eq!(pcallk(l, 0, 1, 0, 0, 0), 0, "lua_pcall");
        let mut len = 0;
        let s = tolstring(l, -1, &mut len);
        assert!(!s.is_null(), "the script returns a string");
        let out = String::from_utf8_lossy(std::slice::from_raw_parts(s.cast(), len)).into_owned();
        close(l);
        out
    }
}

/// What one library measured.
struct CovRow {
    lib: &'static str,
    functions: usize,
    entries: Served,
    /// Every instruction boundary, probes `APART` bytes apart.
    apart: Served,
    /// Every instruction boundary at once: (fast, probed, refused).
    together: (usize, usize, usize),
    /// Min-of-N ns of the workload: unprobed, every entry probed.
    unprobed: f64,
    probed: f64,
    /// Hits the entries' consumers saw in one probed run of the workload.
    hits_per_run: u64,
    /// Of those, hits of entries served by trap (by `probert::stats`).
    trap_hits: u64,
    /// The entries served by trap hit most.
    hot: Vec<HotTrap>,
    /// Seconds spent on the two boundary passes (attach, count, detach).
    boundary_secs: f64,
}

/// An entry served by trap, hit by the workload.
struct HotTrap {
    name: String,
    /// Hits per probed run.
    hits: u64,
    /// Why it is not fast.
    why: String,
}

/// How a set of probes was served.
#[derive(Default)]
struct Served {
    /// Addresses asked for.
    asked: usize,
    /// Served fast.
    fast: usize,
    /// Why the others are not, with counts, most frequent first. A reason
    /// starting "attach: " is an attach refused outright.
    reasons: Vec<(String, usize)>,
}

impl Served {
    fn fast_pct(&self) -> f64 {
        100.0 * self.fast as f64 / self.asked.max(1) as f64
    }
}

/// A refusal message with its addresses elided, so that reasons group.
fn reason_kind(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find("0x") {
        out.push_str(&rest[..i]);
        out.push('…');
        rest = rest[i + 2..].trim_start_matches(|c: char| c.is_ascii_hexdigit());
    }
    out.push_str(rest);
    out
}

/// Every instruction boundary of `funcs`, sorted.
fn boundaries(funcs: &[probert::Function]) -> Vec<usize> {
    let mut bounds = Vec::new();
    for f in funcs {
        if let Ok(insns) = probert::instructions(f.start) {
            bounds.extend(insns.into_iter().filter(|&a| a < f.end));
        }
    }
    bounds.sort_unstable();
    bounds.dedup();
    bounds
}

/// Attaches `cov_count` at every address, `CHUNK` at a time; an address
/// the batch refuses is set aside with its reason and the rest retried.
fn cov_attach(addrs: &[usize]) -> (Vec<(usize, ConsumerId)>, Vec<String>) {
    let mut ok = Vec::with_capacity(addrs.len());
    let mut refused = Vec::new();
    for chunk in addrs.chunks(CHUNK) {
        let mut todo = chunk;
        while !todo.is_empty() {
            let reqs: Vec<AttachReq> = todo
                .iter()
                .map(|&addr| AttachReq {
                    addr,
                    handler: cov_count,
                    user_data: std::ptr::null_mut(),
                })
                .collect();
            match probert::attach_batch(&reqs) {
                Ok(ids) => {
                    ok.extend(todo.iter().copied().zip(ids));
                    todo = &[];
                }
                Err((i, e)) if i < todo.len() => {
                    refused.push(format!("attach: {}", reason_kind(&e.to_string())));
                    // The requests before `i` passed; attach them, then go on.
                    let (good, _) = cov_attach(&todo[..i]);
                    ok.extend(good);
                    todo = &todo[i + 1..];
                }
                Err((_, e)) => panic!("attach_batch: {e}"),
            }
        }
    }
    (ok, refused)
}

/// Counts the fast probes among `probes`; with `why`, groups the others'
/// reasons (a fast-capable site not fast yet says so).
fn cov_served(
    asked: usize,
    probes: &[(usize, ConsumerId)],
    refused: Vec<String>,
    why: bool,
) -> Served {
    let mut s = Served {
        asked,
        ..Served::default()
    };
    let mut reasons = std::collections::HashMap::<String, usize>::new();
    for r in refused {
        *reasons.entry(r).or_default() += 1;
    }
    for &(addr, _) in probes {
        if probert::probe_mode(addr).expect("probe_mode") == Mode::Fast {
            s.fast += 1;
        } else if why {
            let r = probert::fast_refusal(addr)
                .expect("fast_refusal")
                .map_or_else(
                    || "fast-capable, not switched yet".to_owned(),
                    |m| reason_kind(&m),
                );
            *reasons.entry(r).or_default() += 1;
        }
    }
    s.reasons = reasons.into_iter().collect();
    s.reasons
        .sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    if why {
        let others: usize = s.reasons.iter().map(|r| r.1).sum();
        assert_eq!(
            s.fast + others,
            asked,
            "every address fast or with a reason"
        );
    }
    s
}

/// Min-of-`n` wall time of one run of the workload, each run checked to
/// give `want`; stops early once `budget` is spent (at least one run).
fn cov_time(
    lib: &CovLib,
    h: *mut std::ffi::c_void,
    want: &str,
    n: usize,
    budget: Duration,
) -> (f64, u64) {
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut runs = 0;
    for _ in 0..n {
        runs += 1;
        let t = Instant::now();
        let got = (lib.run)(h);
        best = best.min(t.elapsed().as_nanos() as f64);
        assert_eq!(got, want, "{}: the workload's results changed", lib.soname);
        if start.elapsed() > budget {
            break;
        }
    }
    (best, runs)
}

/// Measures one library; `None` if it is not installed.
fn cov_lib(cfg: &Cfg, lib: &CovLib) -> Option<CovRow> {
    let name = std::ffi::CString::new(lib.soname).expect("soname");
    // SAFETY: loading a system library (its constructors run).
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        eprintln!("bench: coverage: no {} here, skipped", lib.soname);
        return None;
    }
    let (runs, budget) = if cfg.quick {
        (1, Duration::ZERO)
    } else {
        (15, Duration::from_secs(10))
    };
    let want = (lib.run)(h);
    let (unprobed, _) = cov_time(lib, h, &want, runs, budget);

    // Every function entry, at once.
    let funcs = probert::functions(lib.soname).expect("the library's functions");
    let mut entries: Vec<usize> = funcs.iter().map(|f| f.start).collect();
    entries.dedup();
    let (probes, refused) = cov_attach(&entries);
    probert::sync().expect("sync");
    let served = cov_served(entries.len(), &probes, refused, true);
    let counted = probert::symbol_addr(Some(lib.soname), lib.counted.0).expect("counted symbol");
    let counted_id = probes.iter().find(|p| p.0 == counted).map(|p| p.1);
    let before: Vec<u64> = probes
        .iter()
        .map(|p| probert::stats(p.1).expect("stats").hits)
        .collect();
    let hits0 = COV_HITS.load(Ordering::Relaxed);
    let c0 = counted_id.map(|id| probert::stats(id).expect("stats").hits);
    let (probed, probed_runs) = cov_time(lib, h, &want, runs, budget);
    let hits = COV_HITS.load(Ordering::Relaxed) - hits0;
    if let (Some(id), Some(c0)) = (counted_id, c0) {
        let got = probert::stats(id).expect("stats").hits - c0;
        assert_eq!(
            got,
            lib.counted.1 * probed_runs,
            "{}: hits at {}",
            lib.soname,
            lib.counted.0
        );
    } else {
        eprintln!(
            "bench: coverage: {} of {} not probed; its count is not checked",
            lib.counted.0, lib.soname
        );
    }
    let deltas: Vec<u64> = probes
        .iter()
        .zip(&before)
        .map(|(p, b)| probert::stats(p.1).expect("stats").hits - b)
        .collect();
    let per_consumer: u64 = deltas.iter().sum();
    assert!(per_consumer >= hits, "{}: consumers' hits", lib.soname);
    // The entries served by trap that the workload hit most: where the
    // slowdown comes from.
    let mut trapped: Vec<(u64, usize)> = probes
        .iter()
        .zip(&deltas)
        .filter(|(p, _)| probert::probe_mode(p.0).expect("probe_mode") != Mode::Fast)
        .map(|(p, &d)| (d, p.0))
        .collect();
    let trap_hits = trapped.iter().map(|t| t.0).sum::<u64>() / probed_runs;
    trapped.sort_unstable_by(|a, b| b.cmp(a));
    let hot: Vec<HotTrap> = trapped
        .iter()
        .take(3)
        .filter(|t| t.0 > 0)
        .map(|&(d, addr)| HotTrap {
            name: funcs
                .iter()
                .find(|f| f.start == addr)
                .and_then(|f| f.name.clone())
                .unwrap_or_else(|| cov_where(addr)),
            hits: d / probed_runs,
            why: probert::fast_refusal(addr)
                .expect("fast_refusal")
                .map_or_else(
                    || "fast-capable, not switched yet".to_owned(),
                    |m| reason_kind(&m),
                ),
        })
        .collect();
    assert!(hits > 0, "{}: the workload ran probed entries", lib.soname);
    let ids: Vec<ConsumerId> = probes.iter().map(|p| p.1).collect();
    probert::detach_batch(&ids).expect("detach_batch");
    assert_eq!(probert::probe_count(), 0, "every probe detached");
    // Unprobed again, so that a drift of the machine's speed (other load)
    // does not pass for probert's cost: the minimum of both sets.
    let unprobed = unprobed.min(cov_time(lib, h, &want, runs, budget).0);
    eprintln!(
        "bench: coverage: {}: {} functions, entries {:.1} % fast, workload {} → {}",
        lib.soname,
        funcs.len(),
        served.fast_pct(),
        dur(unprobed),
        dur(probed)
    );

    // Every instruction boundary: apart, then all at once. libc's are
    // those of a second copy that nothing runs (see `cov_libc_copy`).
    let t = Instant::now();
    let copy = if lib.soname == "libc.so.6" {
        Some(cov_libc_copy())
    } else {
        None
    };
    let bounds = boundaries(copy.as_ref().map_or(&funcs, |c| &c.1));
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    for &a in &bounds {
        match rounds
            .iter_mut()
            .find(|r| r.last().is_some_and(|&l| l + APART <= a))
        {
            Some(r) => r.push(a),
            None => rounds.push(vec![a]),
        }
    }
    let mut apart = Served {
        asked: bounds.len(),
        ..Served::default()
    };
    let mut why = std::collections::HashMap::<String, usize>::new();
    for round in &rounds {
        let (probes, refused) = cov_attach(round);
        probert::sync().expect("sync");
        let s = cov_served(round.len(), &probes, refused, true);
        apart.fast += s.fast;
        for (r, n) in s.reasons {
            *why.entry(r).or_default() += n;
        }
        let ids: Vec<ConsumerId> = probes.iter().map(|p| p.1).collect();
        probert::detach_batch(&ids).expect("detach_batch");
    }
    apart.reasons = why.into_iter().collect();
    apart
        .reasons
        .sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let (probes, refused) = cov_attach(&bounds);
    probert::sync().expect("sync");
    let all = cov_served(bounds.len(), &probes, Vec::new(), false);
    let together = (all.fast, probes.len(), refused.len());
    assert_eq!(
        probes.len() + refused.len(),
        bounds.len(),
        "every boundary counted"
    );
    let ids: Vec<ConsumerId> = probes.iter().map(|p| p.1).collect();
    probert::detach_batch(&ids).expect("detach_batch");
    assert_eq!(probert::probe_count(), 0, "every probe detached");
    assert_eq!((lib.run)(h), want, "{}: unprobed again", lib.soname);
    if let Some((dir, _)) = &copy {
        let _ = std::fs::remove_dir_all(dir);
    }
    let boundary_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "bench: coverage: {}: {} boundaries ({} rounds apart), {:.1} % fast apart, {:.1} % at once ({:.1} s)",
        lib.soname,
        bounds.len(),
        rounds.len(),
        apart.fast_pct(),
        100.0 * together.0 as f64 / bounds.len().max(1) as f64,
        boundary_secs
    );
    Some(CovRow {
        lib: lib.soname,
        functions: funcs.len(),
        entries: served,
        apart,
        together,
        unprobed,
        probed,
        hits_per_run: hits / probed_runs,
        trap_hits,
        hot,
        boundary_secs,
    })
}

/// An unnamed function's address as its module's offset (what `objdump`
/// shows), with the nearest dynamic symbol before it.
fn cov_where(addr: usize) -> String {
    // SAFETY: `Dl_info` is plain data (pointers and an int): all zeroes is
    // a valid value.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is ours to fill; dladdr reads the loader's tables.
    if unsafe { libc::dladdr(addr as *const std::ffi::c_void, &mut info) } == 0 {
        return format!("{addr:#x}");
    }
    let off = addr - info.dli_fbase as usize;
    if info.dli_sname.is_null() {
        return format!("+{off:#x}");
    }
    // SAFETY: dladdr gave a NUL-terminated name.
    let near = unsafe { std::ffi::CStr::from_ptr(info.dli_sname) }.to_string_lossy();
    format!(
        "+{off:#x}, after {near}+{:#x}",
        addr - info.dli_saddr as usize
    )
}

/// A second copy of libc, which nothing runs: the file copied to a
/// temporary directory and loaded with `dlopen`, `RTLD_LOCAL` (its path
/// differs, so `probert::functions` finds it by path, and the loader maps
/// it anew; lookups of this program still find the first libc). Not
/// `dlmopen` into a namespace of its own: `dl_iterate_phdr` reports only
/// its caller's namespace, so probert would not see the copy.
/// Probing every instruction of the libc in use would make the bench's own
/// allocations and probert's writer (both run libc) trap at nearly every
/// instruction for hours; the copy's code bytes, extents and relocations are
/// the same, so the analysis is. Returns its directory (to remove once the
/// probes are gone: probert reads the file) and functions.
fn cov_libc_copy() -> (std::path::PathBuf, Vec<probert::Function>) {
    // SAFETY: `Dl_info` is plain data (pointers and an int): all zeroes is
    // a valid value.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: `qsort` is a libc function; `info` is ours to fill.
    let found = unsafe { libc::dladdr(libc::qsort as *const std::ffi::c_void, &mut info) };
    assert!(found != 0 && !info.dli_fname.is_null(), "dladdr(qsort)");
    // SAFETY: dladdr gave a NUL-terminated path.
    let src = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) }
        .to_string_lossy()
        .into_owned();
    let dir = std::env::temp_dir().join(format!("probert-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let path = dir.join("libc.so.6");
    std::fs::copy(&src, &path).expect("copy libc");
    let path = path.to_string_lossy().into_owned();
    let c = std::ffi::CString::new(path.clone()).expect("path");
    // SAFETY: loads the copy, never closed (its IFUNC resolvers run;
    // nothing of this program calls into it: RTLD_LOCAL).
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null(), "dlopen of a copy of libc");
    let funcs = probert::functions(&path).expect("the copy's functions");
    (dir, funcs)
}

/// The libraries named after `--coverage` (parts of their names), if any.
fn cov_filter() -> Vec<String> {
    std::env::args()
        .skip_while(|a| a != "--coverage")
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect()
}

/// The coverage section: every library in a full run, zlib alone in a
/// quick one.
fn coverage(cfg: &Cfg) -> Coverage {
    let only = cov_filter();
    let rows = COV_LIBS
        .iter()
        .filter(|l| !cfg.quick || l.soname == "libz.so.1")
        .filter(|l| only.is_empty() || only.iter().any(|o| l.soname.contains(o.as_str())))
        .filter_map(|l| cov_lib(cfg, l))
        .collect();
    // What one trap-path hit costs in this run, to weigh the trap hits.
    let trap_ns = probed_row(cfg, bench_push, Mode::Trap, 1, false)
        .one()
        .map_or(f64::NAN, |s| s.min);
    let fast_ns = probed_row(cfg, bench_nop5, Mode::Fast, 1, false)
        .one()
        .map_or(f64::NAN, |s| s.min);
    let (bare, _) = per_call(cfg, bench_bare, 1);
    Coverage {
        rows,
        trap_ns: trap_ns - bare.min,
        fast_ns: fast_ns - bare.min,
    }
}

/// The coverage section's measurements.
struct Coverage {
    rows: Vec<CovRow>,
    /// ns per call of a function whose entry is probed on the trap path
    /// (the per-call table's "trap path, emulated `push rbp`"), less the
    /// bare call; the minimum over the repetitions, as the workloads'.
    trap_ns: f64,
    /// The same on the fast path (the "5-byte NOP site" row).
    fast_ns: f64,
}

const COV_HEADING: &str = "## Coverage of real libraries in AUTO mode";

/// The CPU's family and model numbers, and whether it is a virtual
/// machine's (the `hypervisor` flag), from `/proc/cpuinfo`: the model name
/// of a guest can be as vague as "AMD EPYC".
fn cpu_kind() -> String {
    let info = read_trimmed("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        info.lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(k))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
    };
    let (Some(family), Some(model)) = (field("cpu family"), field("model")) else {
        return String::new();
    };
    let guest = field("flags").is_some_and(|f| f.split(' ').any(|x| x == "hypervisor"));
    let hex = family
        .parse::<u32>()
        .map_or(String::new(), |f| format!(" = {f:#x}"));
    format!(
        " (CPU family {family}{hex}, model {model}{})",
        if guest { ", a virtual machine" } else { "" }
    )
}

/// The reasons, top `n`, as "count × reason; …".
fn top_reasons(s: &Served, n: usize) -> String {
    let shown: Vec<String> = s
        .reasons
        .iter()
        .take(n)
        .map(|(r, c)| format!("{c} × {}", r.replace('|', "\\|")))
        .collect();
    let rest: usize = s.reasons.iter().skip(n).map(|r| r.1).sum();
    let mut out = shown.join("; ");
    if rest > 0 {
        let _ = write!(out, "; {rest} other");
    }
    if out.is_empty() {
        out.push('—');
    }
    out
}

fn report_coverage(w: &mut String, cov: &Coverage, load: &(String, String)) {
    let rows = &cov.rows;
    let _ = writeln!(w, "{COV_HEADING}\n");
    let _ = writeln!(
        w,
        "Measured {} on {}; 1-minute load average {} before, {} after; probert `{}`.\n",
        now_utc(),
        machine(),
        load.0,
        load.1,
        revision()
    );
    let _ = writeln!(
        w,
        "| library | functions | entries fast | boundaries fast, probed apart | boundaries fast, all at once | workload unprobed | every entry probed | slowdown | goals (≥ 95 % / ≥ 70 % / ≤ 3×) |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let slow = r.probed / r.unprobed;
        let met = |b: bool| if b { "met" } else { "**not met**" };
        let _ = writeln!(
            w,
            "| `{}` | {} | {:.1} % ({} / {}) | {:.1} % ({} / {}) | {:.1} % ({} / {}) | {} | {} | {}× | {} / {} / {} |",
            r.lib,
            r.functions,
            r.entries.fast_pct(),
            r.entries.fast,
            r.entries.asked,
            r.apart.fast_pct(),
            r.apart.fast,
            r.apart.asked,
            100.0 * r.together.0 as f64 / r.apart.asked.max(1) as f64,
            r.together.0,
            r.apart.asked,
            dur(r.unprobed),
            dur(r.probed),
            ratio(slow),
            met(r.entries.fast_pct() >= 95.0),
            met(r.apart.fast_pct() >= 70.0),
            met(slow <= 3.0),
        );
    }
    let _ = writeln!(
        w,
        "\nWhy the rest is not fast (top reasons, with counts):\n"
    );
    let _ = writeln!(w, "| library | probes | not fast: reasons |");
    let _ = writeln!(w, "|---|---|---|");
    for r in rows {
        let _ = writeln!(
            w,
            "| `{}` | entries | {} |",
            r.lib,
            top_reasons(&r.entries, 4)
        );
        let _ = writeln!(
            w,
            "| `{}` | boundaries, apart | {} |",
            r.lib,
            top_reasons(&r.apart, 4)
        );
    }
    let _ = writeln!(
        w,
        "\nWorkloads (results checked identical to unprobed on every run):\n"
    );
    for (r, l) in rows
        .iter()
        .filter_map(|r| COV_LIBS.iter().find(|l| l.soname == r.lib).map(|l| (r, l)))
    {
        let hot: Vec<String> = r
            .hot
            .iter()
            .map(|h| format!("`{}` {} ({})", h.name, h.hits, h.why))
            .collect();
        let _ = writeln!(
            w,
            "- `{}`: {}. {} entry hits per probed run, {} of them on the trap path{}{}; \
             the hits at `{}` checked exact; the boundary passes took {:.1} s.",
            r.lib,
            l.what,
            r.hits_per_run,
            r.trap_hits,
            if hot.is_empty() { "" } else { ", most at " },
            hot.join(", "),
            l.counted.0,
            r.boundary_secs
        );
        let slow = r.probed / r.unprobed;
        if slow > 3.0 {
            let added = r.probed - r.unprobed;
            let traps = r.trap_hits as f64 * cov.trap_ns;
            let fast_hits = (r.hits_per_run - r.trap_hits).max(1) as f64;
            let rest = if traps > added / 2.0 {
                format!(
                    "the trap-path hits make most of it: {} added over {} trap hits is {} each \
                     at most, against {} for a trap hit on the bench's hot `push rbp` site",
                    dur(added),
                    r.trap_hits,
                    dur(added / r.trap_hits as f64),
                    dur(cov.trap_ns)
                )
            } else {
                format!(
                    "the trap-path hits, at {} each (the bench's hot `push rbp` site), take {}; \
                     the rest is {:.1} ns per fast hit, against {:.1} ns on the bench's hot \
                     5-byte NOP site",
                    dur(cov.trap_ns),
                    dur(traps),
                    (added - traps).max(0.0) / fast_hits,
                    cov.fast_ns
                )
            };
            let _ = writeln!(
                w,
                "  ≤ 3× missed by {}: it leaves {:.1} ns per entry hit ({} hits in {} unprobed); \
                 {rest}.",
                ratio(slow / 3.0),
                2.0 * r.unprobed / r.hits_per_run.max(1) as f64,
                r.hits_per_run,
                dur(r.unprobed),
            );
        }
    }
    let _ = writeln!(
        w,
        "\nMethod. Each library is loaded with `dlopen`; `probert::functions` gives \
         its functions (`.eh_frame` extents and symbols, stripped libraries \
         included). Every function entry gets an empty counting consumer in AUTO \
         mode, all at once through `attach_batch` ({CHUNK} per batch; an address a \
         batch refuses is set aside with its reason — \"attach: …\" — and the rest \
         retried); after a `sync` (which retries sites a thread was inside), \
         `probert::probe_mode` tells which are fast and `probert::fast_refusal` \
         why the others are not (addresses elided so that reasons group). The \
         workload times are the minimum of up to 15 runs (fewer when probed runs \
         are slow; unprobed, 15 before probing and 15 after detaching), each \
         run's results compared with the first unprobed run's. For \
         libc, probing every entry also probes the libc calls of the bench itself \
         and of Rust's std during the run (allocation, formatting, the clock): \
         they are part of the probed time. Instruction boundaries are every \
         address `probert::instructions` gives for those functions: \"probed \
         apart\" attaches them in rounds with no two probes within {APART} bytes \
         (so that no probe lies inside another's displaced run — each site's own \
         capability), \"all at once\" attaches every one together, where a run \
         of several instructions holds other probes and is served by trap. \
         Timings are noisy: the machine is shared with other engineers' builds \
         while the bench runs (see the load average), hence min-of-N.\n"
    );
    let _ = writeln!(
        w,
        "Reading it. A trap-path hit costs a few hundred fast hits, so a few hot \
         entries left on the trap path make most of a slowdown even where 95 % of \
         the entries are fast: the list above names them and why they are trap \
         only (an unnamed function is shown as its offset in the file, for \
         `objdump -d --start-address`). And ≤ 3× also needs the cost of a fast hit \
         in that code below the \"ns per entry hit\" it leaves: a workload that \
         enters a function every few ns cannot meet it at any per-hit cost near \
         an XRay handler call's.\n"
    );
}

/// `--coverage [LIB…]`: only this section, of the libraries whose names
/// contain a `LIB` (all without); with all of them and without `--quick`,
/// it replaces its own section in BENCHMARKS.md (the rest is kept).
fn coverage_only(cfg: &Cfg) {
    probert::init().expect("probert::init");
    let load_before = load_average();
    let cov = coverage(cfg);
    let mut md = String::new();
    report_coverage(&mut md, &cov, &(load_before, load_average()));
    print!("{md}");
    if !cfg.quick && cov_filter().is_empty() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../BENCHMARKS.md");
        let old = std::fs::read_to_string(path).unwrap_or_default();
        let new = match old.find(COV_HEADING) {
            Some(i) => {
                let after = old[i + COV_HEADING.len()..]
                    .find("\n## ")
                    .map_or(old.len(), |j| i + COV_HEADING.len() + j + 1);
                format!("{}{md}{}", &old[..i], &old[after..])
            }
            None => format!("{}\n{md}", old.trim_end()),
        };
        std::fs::write(path, new).expect("write BENCHMARKS.md");
        eprintln!("bench: wrote the coverage section of BENCHMARKS.md");
    }
}

/// The control plane at scale: every instruction boundary of SQLite.
#[derive(Clone, Copy, Debug, Default)]
struct Scale {
    probes: usize,
    /// ns per probe, the minimum over the runs.
    attach: f64,
    detach: f64,
    /// Resident memory added per probe, bytes (after attach; peak).
    rss: f64,
    peak: f64,
    runs: usize,
}

/// Runs [`scale_child`] in fresh processes (so that the resident memory it
/// adds is probert's, not what an earlier section left in the allocator)
/// and keeps the fastest run's times.
fn scale(cfg: &Cfg) -> Result<Scale, String> {
    if cfg.quick {
        return Err("not measured with --quick".into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut best: Option<Scale> = None;
    let runs = 3;
    for _ in 0..runs {
        let out = std::process::Command::new(&exe)
            .arg("--scale-child")
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "the scale run failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        let f: Vec<f64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        let [probes, attach, detach, rss, peak] = f[..] else {
            return Err(format!("the scale run printed {line:?}"));
        };
        let run = Scale {
            probes: probes as usize,
            attach,
            detach,
            rss,
            peak,
            runs,
        };
        best = Some(match best {
            None => run,
            Some(b) => Scale {
                attach: b.attach.min(run.attach),
                detach: b.detach.min(run.detach),
                rss: b.rss.min(run.rss),
                peak: b.peak.min(run.peak),
                ..b
            },
        });
    }
    let s = best.ok_or("no run")?;
    eprintln!(
        "bench: scale: {} probes: attach {:.0} ns, detach {:.0} ns, {:.0} B each",
        s.probes, s.attach, s.detach, s.rss
    );
    Ok(s)
}

/// The child of [`scale`]: attaches an empty consumer at every instruction
/// boundary of SQLite in batches of [`CHUNK`], then detaches them all
/// with one `detach_batch`; prints `probes attach-ns detach-ns rss-B
/// peak-B` (per probe) on one line.
fn scale_child() {
    let name = c"libsqlite3.so.0";
    // SAFETY: a NUL-terminated name; the library stays loaded.
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null(), "dlopen libsqlite3.so.0");
    let funcs = probert::functions("libsqlite3.so.0").expect("functions");
    let bounds = boundaries(&funcs);
    let (rss0, peak0) = (status_kib("VmRSS:"), status_kib("VmHWM:"));
    let t = Instant::now();
    let ids: Vec<ConsumerId> = cov_attach(&bounds).0.into_iter().map(|p| p.1).collect();
    let attach = t.elapsed();
    probert::sync().expect("sync");
    let (rss1, peak1) = (status_kib("VmRSS:"), status_kib("VmHWM:"));
    let t = Instant::now();
    probert::detach_batch(&ids).expect("detach_batch");
    let detach = t.elapsed();
    assert_eq!(probert::probe_count(), 0, "every probe detached");
    let n = ids.len().max(1) as f64;
    println!(
        "{} {:.1} {:.1} {:.1} {:.1}",
        ids.len(),
        attach.as_secs_f64() * 1e9 / n,
        detach.as_secs_f64() * 1e9 / n,
        rss1.saturating_sub(rss0) as f64 * 1024.0 / n,
        peak1.saturating_sub(peak0) as f64 * 1024.0 / n,
    );
}

/// A `/proc/self/status` field in KiB (0 when absent).
fn status_kib(field: &str) -> u64 {
    read_trimmed("/proc/self/status")
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn report_scale(w: &mut String, scale: &Result<Scale, String>) {
    let _ = writeln!(w, "## Control plane at scale\n");
    let s = match scale {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(w, "Not measured: {e}.\n");
            return;
        }
    };
    let _ = writeln!(
        w,
        "| every instruction of SQLite | per probe | goal | verdict |"
    );
    let _ = writeln!(w, "|---|---:|---|---|");
    let rows = [
        (
            format!("attach ({} probes, `attach_batch` of {CHUNK})", s.probes),
            dur(s.attach),
            "≤ 1 µs",
            s.attach <= 1e3,
        ),
        (
            "detach (one `detach_batch`)".to_owned(),
            dur(s.detach),
            "≤ 1 µs",
            s.detach <= 1e3,
        ),
        (
            "resident memory added, attached".to_owned(),
            format!("{:.0} B", s.rss),
            "≤ 256 B",
            s.rss <= 256.0,
        ),
        (
            "peak resident memory added".to_owned(),
            format!("{:.0} B", s.peak),
            "—",
            true,
        ),
    ];
    for (what, v, goal, ok) in rows {
        let verdict = if goal == "—" {
            String::new()
        } else {
            verdict(ok)
        };
        let _ = writeln!(w, "| {what} | {v} | {goal} | {verdict} |");
    }
    let _ = writeln!(
        w,
        "\nEach of {} runs is a fresh process (`bench --scale-child`) that loads \
         `libsqlite3.so.0`, attaches an empty consumer in AUTO mode at every \
         instruction boundary `probert::instructions` gives for its functions \
         (the few a batch refuses are left out; the requests before them go \
         again), waits a `sync`, then detaches all of them with one \
         `detach_batch`. Times are the fastest run's; the memory is the growth \
         of the process's resident set (VmRSS, VmHWM) from before the first \
         attach to after the `sync`, per probe: probe and consumer records, \
         index, stubs, the writer's tables, and the code pages probert \
         patched (copied on write).\n",
        s.runs
    );
}
