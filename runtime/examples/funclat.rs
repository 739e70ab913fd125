//! funclat: per-function call counts and latency (p50, p99, max) with a
//! log2 histogram, for every function of a library nobody here wrote —
//! the system's SQLite, loaded with `dlopen` and run on an in-memory
//! database — through return probes.
//!
//! ```sh
//! cargo run --release --example funclat            # top 12 by total time
//! cargo run --release --example funclat -- --all   # every function called
//! ```
//!
//! The handlers are async-signal-safe: the entry reads the clock (the vDSO's
//! `clock_gettime`) into the invocation's session word, the return adds the
//! elapsed time to preallocated per-function atomics (count, sum, max, 64
//! log2 buckets). No allocation, lock or formatting happens in a handler.
//! The example checks its own results: the workload's output equals the
//! unprobed run's, and every function's counts add up.
#![allow(unsafe_code)]
#![allow(clippy::undocumented_unsafe_blocks)]

use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::atomic::{AtomicU64, Ordering};

use probert::{Action, AttachOptions, Hit, Mode};

/// One probed function's counters.
struct Lat {
    calls: AtomicU64,
    returns: AtomicU64,
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
    /// Bucket `b` counts durations in `[2^(b-1), 2^b)` ns (bucket 0: 0 ns).
    buckets: [AtomicU64; 64],
}

impl Lat {
    fn new() -> Lat {
        Lat {
            calls: AtomicU64::new(0),
            returns: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// The upper bound of the bucket holding quantile `q` (a log2
    /// histogram's resolution).
    fn quantile(&self, q: f64) -> u64 {
        let n = self.returns.load(Ordering::Relaxed);
        let want = ((n as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, c) in self.buckets.iter().enumerate() {
            seen += c.load(Ordering::Relaxed);
            if seen >= want {
                return if b == 0 { 0 } else { (1u64 << b) - 1 };
            }
        }
        self.max_ns.load(Ordering::Relaxed)
    }
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec; clock_gettime is async-signal-safe (vDSO).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

unsafe extern "C" fn on_entry(hit: *mut Hit) -> u32 {
    let hit = unsafe { &mut *hit };
    let lat = unsafe { &*(hit.user_data as *const Lat) };
    lat.calls.fetch_add(1, Ordering::Relaxed);
    if let Some(s) = hit.session() {
        *s = now_ns();
    }
    Action::Continue as u32
}

unsafe extern "C" fn on_return(hit: *mut Hit) -> u32 {
    let end = now_ns();
    let hit = unsafe { &mut *hit };
    let lat = unsafe { &*(hit.user_data as *const Lat) };
    let start = hit.session().map_or(end, |s| *s);
    let dt = end.saturating_sub(start);
    lat.returns.fetch_add(1, Ordering::Relaxed);
    lat.sum_ns.fetch_add(dt, Ordering::Relaxed);
    lat.max_ns.fetch_max(dt, Ordering::Relaxed);
    let b = (64 - dt.leading_zeros()) as usize;
    lat.buckets[b.min(63)].fetch_add(1, Ordering::Relaxed);
    Action::Continue as u32
}

// ---- the workload: SQLite through dlopen --------------------------------

type Open = unsafe extern "C" fn(*const c_char, *mut *mut c_void) -> i32;
type RowFn = unsafe extern "C" fn(*mut c_void, i32, *mut *mut c_char, *mut *mut c_char) -> i32;
type Exec = unsafe extern "C" fn(
    *mut c_void,
    *const c_char,
    Option<RowFn>,
    *mut c_void,
    *mut *mut c_char,
) -> i32;
type Close = unsafe extern "C" fn(*mut c_void) -> i32;

fn sym<T: Copy>(h: *mut c_void, name: &str) -> T {
    let c = CString::new(name).unwrap();
    let p = unsafe { libc::dlsym(h, c.as_ptr()) };
    assert!(!p.is_null(), "no {name} in libsqlite3");
    unsafe { std::mem::transmute_copy(&p) }
}

unsafe extern "C" fn row(
    out: *mut c_void,
    n: i32,
    vals: *mut *mut c_char,
    _: *mut *mut c_char,
) -> i32 {
    let out = unsafe { &mut *(out as *mut String) };
    for i in 0..n as usize {
        let v = unsafe { *vals.add(i) };
        if !v.is_null() {
            out.push_str(&unsafe { CStr::from_ptr(v) }.to_string_lossy());
        }
        out.push('|');
    }
    out.push('\n');
    0
}

fn workload(h: *mut c_void) -> String {
    let (open, exec, close): (Open, Exec, Close) = (
        sym(h, "sqlite3_open"),
        sym(h, "sqlite3_exec"),
        sym(h, "sqlite3_close"),
    );
    let mut db = std::ptr::null_mut();
    let name = CString::new(":memory:").unwrap();
    assert_eq!(unsafe { open(name.as_ptr(), &mut db) }, 0);
    let sql = CString::new(
        "CREATE TABLE t(a INTEGER PRIMARY KEY, b TEXT, c REAL);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)
         INSERT INTO t SELECT i, printf('k%d', i * 7919 % 1000), i * 0.25 FROM n;
         CREATE INDEX tb ON t(b);
         SELECT count(*), sum(a), total(c) FROM t;
         SELECT b, count(*) FROM t GROUP BY b ORDER BY count(*) DESC, b LIMIT 3;
         UPDATE t SET c = c * 2 WHERE a % 3 = 0;
         SELECT total(c), max(b) FROM t WHERE b > 'k5';",
    )
    .unwrap();
    let mut out = String::new();
    let rc = unsafe {
        exec(
            db,
            sql.as_ptr(),
            Some(row),
            &mut out as *mut String as *mut c_void,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "sqlite3_exec");
    assert_eq!(unsafe { close(db) }, 0);
    out
}

fn histogram(lat: &Lat) -> String {
    let counts: Vec<u64> = lat
        .buckets
        .iter()
        .map(|b| b.load(Ordering::Relaxed))
        .collect();
    let top = counts.iter().copied().max().unwrap_or(0).max(1);
    let (Some(lo), Some(hi)) = (
        counts.iter().position(|&c| c > 0),
        counts.iter().rposition(|&c| c > 0),
    ) else {
        return String::new();
    };
    let mut s = String::new();
    for (b, &c) in counts.iter().enumerate().take(hi + 1).skip(lo) {
        let from = if b == 0 { 0 } else { 1u64 << (b - 1) };
        let bar = "#".repeat((c * 40).div_ceil(top) as usize);
        s.push_str(&format!("    {from:>10} ns .. | {c:>8} {bar}\n"));
    }
    s
}

fn main() {
    let all = std::env::args().any(|a| a == "--all");
    let lib = CString::new("libsqlite3.so.0").unwrap();
    let h = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        println!("funclat: no libsqlite3.so.0 on this system; nothing to do");
        return;
    }
    let want = workload(h);

    // One preallocated record per function, alive until after detach.
    let funcs = probert::functions("libsqlite3.so.0").expect("libsqlite3's functions");
    let lats: Vec<Lat> = funcs.iter().map(|_| Lat::new()).collect();
    let mut probes = Vec::new();
    for (f, lat) in funcs.iter().zip(&lats) {
        let opts = AttachOptions {
            mode: Mode::Auto,
            on_return: Some(on_return),
        };
        let ud = lat as *const Lat as *mut c_void;
        // Functions whose exits probert cannot all find are refused; skip them.
        if let Ok(id) = unsafe { probert::attach_with(f.start, on_entry, ud, opts) } {
            probes.push((id, f, lat));
        }
    }
    println!(
        "funclat: {} of {} functions of libsqlite3 probed (entry + return)",
        probes.len(),
        funcs.len()
    );

    let got = workload(h);
    assert_eq!(got, want, "the probed workload's output differs");
    probert::sync().unwrap();
    let mut abandoned = 0;
    let (mut calls, mut returns) = (0, 0);
    for (id, f, lat) in &probes {
        let s = probert::stats(*id).unwrap();
        let (c, r) = (
            lat.calls.load(Ordering::Relaxed),
            lat.returns.load(Ordering::Relaxed),
        );
        assert_eq!((s.hits, s.returns), (c, r), "{:?}", f.name);
        assert_eq!(s.hits, s.returns + s.abandoned, "{:?}: {s:?}", f.name);
        let in_buckets: u64 = lat.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum();
        assert_eq!(in_buckets, r);
        abandoned += s.abandoned;
        calls += c;
        returns += r;
    }
    let ids: Vec<_> = probes.iter().map(|p| p.0).collect();
    probert::detach_batch(&ids).unwrap();
    assert!(calls > 10_000, "the workload ran probed code");
    // Abandoned here: only the earlier links of tail calls of a function to
    // its own entry (see tests/returns.rs); SQLite does not longjmp.
    assert!(abandoned * 100 < calls, "{abandoned} abandoned of {calls}");

    let mut rows: Vec<_> = probes
        .iter()
        .filter(|p| p.2.returns.load(Ordering::Relaxed) > 0)
        .collect();
    rows.sort_by_key(|p| std::cmp::Reverse(p.2.sum_ns.load(Ordering::Relaxed)));
    println!(
        "{calls} calls, {returns} returns, {abandoned} abandoned; result identical to unprobed\n"
    );
    println!(
        "{:<36} {:>9} {:>11} {:>9} {:>9} {:>10}",
        "function", "calls", "total µs", "p50 ns", "p99 ns", "max ns"
    );
    for (_, f, lat) in rows.iter().take(if all { usize::MAX } else { 12 }) {
        let name = f.name.clone().unwrap_or_else(|| format!("{:#x}", f.start));
        println!(
            "{:<36} {:>9} {:>11} {:>9} {:>9} {:>10}",
            name,
            lat.calls.load(Ordering::Relaxed),
            lat.sum_ns.load(Ordering::Relaxed) / 1000,
            lat.quantile(0.50),
            lat.quantile(0.99),
            lat.max_ns.load(Ordering::Relaxed)
        );
    }
    // The histogram of the most called function.
    if let Some((_, f, lat)) = rows
        .iter()
        .max_by_key(|p| p.2.calls.load(Ordering::Relaxed))
    {
        println!(
            "\nlatency of {} (log2 buckets, {} calls):",
            f.name.as_deref().unwrap_or("?"),
            lat.calls.load(Ordering::Relaxed)
        );
        print!("{}", histogram(lat));
    }
    // The records outlive the probes (detached above, a grace period ago).
    drop(lats);
}
