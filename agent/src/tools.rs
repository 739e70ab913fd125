//! The built-in tools — count, latency, args, drcov — written against the
//! plug-in ABI (`include/probert_tool.h`) like any other tool: they attach
//! through the host table and report through `host.print`. One exception:
//! their handlers ask whether a hit is the agent's own by calling the
//! host's functions directly, which probert's analysis of a handler can
//! follow (a call through the table's pointers could change any register,
//! and the fast path would save the vector state on every hit).
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use probert::Hit;

use crate::host::{AttachOpts, Tool, ToolCtx, ToolHost, ToolMatch};

const CONTINUE: u32 = 0;
const REMOVE: u32 = 1;
const NO_RETURN: u32 = 2;

/// What every built-in keeps per match: its name and its counters.
#[derive(Debug)]
struct Probe {
    host: *const ToolHost,
    ctx: *mut ToolCtx,
    id: u32,
    name: String,
    module: String,
    /// In the memory the command reads itself (count), or the probe's own.
    hits: &'static AtomicU64,
    seen: AtomicU64,
    limit: u64,
    covered: AtomicBool,
    block: (usize, usize, usize), // (start, len, module base)
    /// At a function's entry: its caller can be told from the stack.
    entry: bool,
}

impl Probe {
    /// Whether the hit is the agent's own (`is_agent_thread`, or for an
    /// entry `is_agent_call`): not the program's, not counted.
    ///
    /// # Signal safety
    /// The host's signal-safe entry points.
    fn agents(&self, hit: &Hit) -> bool {
        // The host's functions called directly, not through the table as a
        // plug-in does: probert's analysis of a handler follows direct
        // calls, so the fast path saves only what these change (a call
        // through a pointer may change anything: every vector register
        // saved on every hit).
        if self.entry && !hit.is_return() {
            // SAFETY: the hit's own registers.
            unsafe { crate::host::is_agent_call(hit.regs) != 0 }
        } else {
            crate::agent_thread()
        }
    }
}

#[derive(Debug)]
#[allow(clippy::vec_box)] // handlers hold pointers to the probes: they must not move
struct State {
    host: *const ToolHost,
    ctx: *mut ToolCtx,
    kind: Kind,
    arg: String,
    probes: Vec<Box<Probe>>,
    lat: Vec<Hist>,
    args: Vec<Vec<[u64; 6]>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Count,
    Latency,
    Args,
    Drcov,
}

// ---- handlers (signal context) -------------------------------------------

/// # Signal safety
/// Atomic loads and adds through the host's signal-safe entry points.
unsafe extern "C" fn count_hit(hit: *mut Hit) -> u32 {
    // SAFETY: the dispatcher's hit; user_data is a live `Probe`.
    let (p, hit) = unsafe { (&*((*hit).user_data as *const Probe), &*hit) };
    if !p.agents(hit) {
        // Ordering: Relaxed — a counter read at report time.
        p.hits.fetch_add(1, Ordering::Relaxed);
    }
    CONTINUE
}

/// # Signal safety
/// As `count_hit`, plus `now_ns` and `emit`.
unsafe extern "C" fn latency_hit(hit: *mut Hit) -> u32 {
    // SAFETY: the dispatcher's hit; user_data is a live `Probe`.
    let hit = unsafe { &mut *hit };
    // SAFETY: as above.
    let p = unsafe { &*(hit.user_data as *const Probe) };
    // SAFETY: the host table lives for the process.
    let host = unsafe { &*p.host };
    if hit.is_return() {
        let now = (host.now_ns)();
        let t0 = hit.session().map_or(now, |s| *s);
        let mut rec = [0u8; 12];
        rec[..4].copy_from_slice(&p.id.to_ne_bytes());
        rec[4..].copy_from_slice(&now.wrapping_sub(t0).to_ne_bytes());
        // SAFETY: the tool's context; 12 readable bytes.
        unsafe { (host.emit)(p.ctx, rec.as_ptr().cast(), rec.len()) };
        return CONTINUE;
    }
    if p.agents(hit) {
        return NO_RETURN;
    }
    if let Some(s) = hit.session() {
        *s = (host.now_ns)();
    }
    CONTINUE
}

/// # Signal safety
/// Atomics, register reads and `emit`.
unsafe extern "C" fn args_hit(hit: *mut Hit) -> u32 {
    // SAFETY: the dispatcher's hit; user_data is a live `Probe`.
    let hit = unsafe { &mut *hit };
    // SAFETY: as above.
    let p = unsafe { &*(hit.user_data as *const Probe) };
    // SAFETY: the host table lives for the process.
    let host = unsafe { &*p.host };
    if p.agents(hit) {
        return CONTINUE;
    }
    // Ordering: Relaxed — counts calls; the order of records is the drain's.
    p.hits.fetch_add(1, Ordering::Relaxed);
    // Ordering: Relaxed — as above.
    if p.seen.fetch_add(1, Ordering::Relaxed) < p.limit {
        let mut rec = [0u8; 52];
        rec[..4].copy_from_slice(&p.id.to_ne_bytes());
        let regs = hit.regs();
        for n in 0..6 {
            let v = regs.arg(n).unwrap_or(0);
            rec[4 + 8 * n..12 + 8 * n].copy_from_slice(&v.to_ne_bytes());
        }
        // SAFETY: the tool's context; 52 readable bytes.
        unsafe { (host.emit)(p.ctx, rec.as_ptr().cast(), rec.len()) };
    }
    CONTINUE
}

/// # Signal safety
/// One atomic store.
unsafe extern "C" fn drcov_hit(hit: *mut Hit) -> u32 {
    // SAFETY: the dispatcher's hit; user_data is a live `Probe`.
    let p = unsafe { &*((*hit).user_data as *const Probe) };
    // SAFETY: the host table lives for the process.
    if (unsafe { &*p.host }.is_agent_thread)() != 0 {
        return CONTINUE;
    }
    // Ordering: Relaxed — read at report time, after the drain thread stopped.
    p.covered.store(true, Ordering::Relaxed);
    REMOVE
}

// ---- latency histogram ----------------------------------------------------

const SUB: usize = 16;

#[derive(Debug, Clone, Default)]
struct Hist {
    n: u64,
    max: u64,
    buckets: Vec<u64>, // log-linear: 64 powers of two, SUB steps each
}

fn bucket(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let p = 63 - v.leading_zeros() as usize;
    let sub = ((v >> (p - 4)) & (SUB as u64 - 1)) as usize;
    (p - 3) * SUB + sub
}

fn bucket_high(b: usize) -> u64 {
    if b < SUB {
        return b as u64;
    }
    let p = b / SUB + 3;
    let sub = (b % SUB) as u64;
    ((SUB as u64 + sub + 1) << (p - 4)) - 1
}

impl Hist {
    fn add(&mut self, v: u64) {
        if self.buckets.is_empty() {
            self.buckets = vec![0; 62 * SUB];
        }
        self.n += 1;
        self.max = self.max.max(v);
        let b = bucket(v).min(self.buckets.len() - 1);
        self.buckets[b] += 1;
    }
    fn pct(&self, q: f64) -> u64 {
        let want = ((self.n as f64) * q).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (b, &c) in self.buckets.iter().enumerate() {
            acc += c;
            if acc >= want {
                return bucket_high(b).min(self.max);
            }
        }
        self.max
    }
    fn log2(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (b, &c) in self.buckets.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let lo = bucket_high(b).max(1).ilog2();
            let lo = 1u64 << lo;
            match out.last_mut() {
                Some(l) if l.0 == lo => l.1 += c,
                _ => out.push((lo, c)),
            }
        }
        out
    }
}

// ---- the tool functions ---------------------------------------------------

unsafe fn start(
    host: *const ToolHost,
    ctx: *mut ToolCtx,
    args: *const c_char,
    kind: Kind,
) -> *mut c_void {
    let arg = if args.is_null() {
        String::new()
    } else {
        // SAFETY: NUL-terminated.
        unsafe { CStr::from_ptr(args) }
            .to_string_lossy()
            .into_owned()
    };
    Box::into_raw(Box::new(State {
        host,
        ctx,
        kind,
        arg,
        probes: Vec::new(),
        lat: Vec::new(),
        args: Vec::new(),
    }))
    .cast()
}

unsafe extern "C" fn start_count(
    h: *const ToolHost,
    c: *mut ToolCtx,
    a: *const c_char,
) -> *mut c_void {
    // SAFETY: the host's arguments.
    unsafe { start(h, c, a, Kind::Count) }
}
unsafe extern "C" fn start_latency(
    h: *const ToolHost,
    c: *mut ToolCtx,
    a: *const c_char,
) -> *mut c_void {
    // SAFETY: the host's arguments.
    unsafe { start(h, c, a, Kind::Latency) }
}
unsafe extern "C" fn start_args(
    h: *const ToolHost,
    c: *mut ToolCtx,
    a: *const c_char,
) -> *mut c_void {
    // SAFETY: the host's arguments.
    unsafe { start(h, c, a, Kind::Args) }
}
unsafe extern "C" fn start_drcov(
    h: *const ToolHost,
    c: *mut ToolCtx,
    a: *const c_char,
) -> *mut c_void {
    // SAFETY: the host's arguments.
    unsafe { start(h, c, a, Kind::Drcov) }
}

/// Basic-block leaders of `[start, end)`: the entry, branch targets inside,
/// and the instruction after every branch.
fn blocks(start: usize, end: usize) -> Vec<(usize, usize)> {
    use iced_x86::{Decoder, DecoderOptions, FlowControl};
    if end <= start || end - start > 1 << 20 {
        return Vec::new();
    }
    // SAFETY: the function's extent lies in a mapped executable segment.
    let code = unsafe { std::slice::from_raw_parts(start as *const u8, end - start) };
    let mut d = Decoder::with_ip(64, code, start as u64, DecoderOptions::NONE);
    let mut insns = Vec::new();
    let mut leaders = std::collections::BTreeSet::from([start]);
    for ins in &mut d {
        if ins.is_invalid() {
            break;
        }
        let next = ins.next_ip() as usize;
        insns.push(ins.ip() as usize);
        match ins.flow_control() {
            FlowControl::Next | FlowControl::Call | FlowControl::IndirectCall => {}
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                let t = ins.near_branch_target() as usize;
                if (start..end).contains(&t) {
                    leaders.insert(t);
                }
                leaders.insert(next);
            }
            _ => {
                leaders.insert(next);
            }
        }
    }
    let set: std::collections::HashSet<usize> = insns.iter().copied().collect();
    let ls: Vec<usize> = leaders.into_iter().filter(|l| set.contains(l)).collect();
    ls.iter()
        .enumerate()
        .map(|(i, &l)| (l, ls.get(i + 1).copied().unwrap_or(end) - l))
        .collect()
}

unsafe extern "C" fn attach(state: *mut c_void, ms: *const ToolMatch, n: usize) -> c_int {
    // SAFETY: our own state; `n` matches from the host.
    let (st, ms) = unsafe {
        (
            &mut *state.cast::<State>(),
            std::slice::from_raw_parts(ms, n),
        )
    };
    // SAFETY: the host table lives for the process.
    let host = unsafe { &*st.host };
    let limit = st.arg.parse().unwrap_or(5);
    let mut failed = 0;
    let shared = host.size >= std::mem::size_of::<ToolHost>();
    let refuse = |m: &ToolMatch, why: &str| {
        let why = CString::new(why.replace('\0', " ")).unwrap_or_default();
        if shared {
            // SAFETY: our context, the host's match, a NUL-terminated reason.
            unsafe { (host.not_attached)(st.ctx, m, why.as_ptr()) };
        }
    };
    for m in ms {
        // SAFETY: the host's match.
        let (name, module, _) = unsafe { crate::host::match_names(m) };
        let counter = || -> &'static AtomicU64 {
            if st.kind == Kind::Count && shared {
                // SAFETY: our context and the host's match.
                let c = unsafe { (host.shared_counter)(st.ctx, m, c"hits".as_ptr()) };
                if !c.is_null() {
                    // SAFETY: an aligned, zeroed counter that lives for the
                    // process (probert_tool.h).
                    return unsafe { AtomicU64::from_ptr(c) };
                }
            }
            Box::leak(Box::new(AtomicU64::new(0)))
        };
        let mk = |id: u32, block| {
            Box::new(Probe {
                host: st.host,
                ctx: st.ctx,
                id,
                name: name.clone(),
                module: module.clone(),
                hits: counter(),
                seen: AtomicU64::new(0),
                limit,
                covered: AtomicBool::new(false),
                block,
                entry: m.is_entry != 0,
            })
        };
        let mut sites: Vec<(usize, Box<Probe>)> = Vec::new();
        match st.kind {
            Kind::Latency if m.is_entry == 0 => {
                refuse(m, "latency needs a function's entry, and this is not one");
                failed += 1;
                continue;
            }
            Kind::Drcov => {
                if m.is_entry == 0 {
                    refuse(m, "drcov covers whole functions: give the function's entry");
                    failed += 1;
                    continue;
                }
                for (b, len) in blocks(m.func_start, m.func_end) {
                    let id = (st.probes.len() + sites.len()) as u32;
                    sites.push((b, mk(id, (b, len, m.module_base))));
                }
            }
            _ => sites.push((m.addr, mk(st.probes.len() as u32, (0, 0, 0)))),
        }
        for (addr, p) in sites {
            let (handler, on_return): (probert::Handler, Option<probert::Handler>) = match st.kind {
                Kind::Count => (count_hit, None),
                Kind::Latency => (latency_hit, Some(latency_hit)),
                Kind::Args => (args_hit, None),
                Kind::Drcov => (drcov_hit, None),
            };
            let opts = AttachOpts {
                size: std::mem::size_of::<AttachOpts>(),
                mode: 0,
                on_return,
            };
            let mut c = 0u64;
            let ud = (&*p as *const Probe).cast_mut().cast::<c_void>();
            // SAFETY: a function entry or instruction the host matched; the
            // handler is async-signal-safe; `p` lives for the process.
            let s = unsafe {
                (host.attach_ex)(addr as *const c_void, Some(handler), ud, &opts, &mut c)
            };
            if s == 0 {
                st.probes.push(p);
                st.lat.push(Hist::default());
                st.args.push(Vec::new());
            } else {
                crate::shared::retire(p.hits);
                let why = if shared {
                    // SAFETY: the host's message, NUL-terminated.
                    unsafe { CStr::from_ptr((host.last_error)()) }
                        .to_string_lossy()
                        .into_owned()
                } else {
                    String::new()
                };
                let why = if why.is_empty() {
                    format!("libprobert status {s}")
                } else {
                    why
                };
                if st.kind == Kind::Drcov {
                    refuse(m, &format!("block at {addr:#x}: {why}"));
                } else {
                    refuse(m, &why);
                }
                failed += 1;
            }
        }
    }
    failed
}

unsafe extern "C" fn event(state: *mut c_void, rec: *const c_void, len: usize) {
    // SAFETY: our own state; `len` bytes from the host.
    let (st, rec) = unsafe {
        (
            &mut *state.cast::<State>(),
            std::slice::from_raw_parts(rec.cast::<u8>(), len),
        )
    };
    if len < 4 {
        return;
    }
    let id = u32::from_ne_bytes(rec[..4].try_into().unwrap_or_default()) as usize;
    let u64_at = |i: usize| u64::from_ne_bytes(rec[i..i + 8].try_into().unwrap_or_default());
    match st.kind {
        Kind::Latency if len == 12 && id < st.lat.len() => st.lat[id].add(u64_at(4)),
        Kind::Args if len == 52 && id < st.args.len() => {
            let mut a = [0u64; 6];
            for (n, v) in a.iter_mut().enumerate() {
                *v = u64_at(4 + 8 * n);
            }
            st.args[id].push(a);
        }
        _ => {}
    }
}

pub(crate) fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn drcov_file(st: &State) -> Vec<u8> {
    let mut mods: Vec<(String, usize, usize)> = Vec::new();
    let mut bbs: Vec<(u32, u16, u16)> = Vec::new();
    for p in &st.probes {
        // Ordering: Relaxed — see drcov_hit.
        if !p.covered.load(Ordering::Relaxed) {
            continue;
        }
        let (start, len, base) = p.block;
        let mi = match mods.iter().position(|m| m.0 == p.module && m.1 == base) {
            Some(i) => i,
            None => {
                mods.push((p.module.clone(), base, 0));
                mods.len() - 1
            }
        };
        mods[mi].2 = mods[mi].2.max(start + len);
        bbs.push(((start - base) as u32, len.min(0xffff) as u16, mi as u16));
    }
    let mut out = String::from("DRCOV VERSION: 2\nDRCOV FLAVOR: probert\n");
    let _ = writeln!(out, "Module Table: version 2, count {}", mods.len());
    out.push_str("Columns: id, base, end, entry, checksum, timestamp, path\n");
    for (i, (path, base, end)) in mods.iter().enumerate() {
        let full = crate::module_path(path, *base).unwrap_or_else(|| path.clone());
        let _ = writeln!(out, "{i}, {base:#x}, {end:#x}, 0x0, 0x0, 0x0, {full}");
    }
    let _ = writeln!(out, "BB Table: {} bbs", bbs.len());
    let mut bytes = out.into_bytes();
    for (off, size, id) in bbs {
        bytes.extend_from_slice(&off.to_le_bytes());
        bytes.extend_from_slice(&size.to_le_bytes());
        bytes.extend_from_slice(&id.to_le_bytes());
    }
    bytes
}

unsafe extern "C" fn report(state: *mut c_void, fin: c_int) {
    // SAFETY: our own state.
    let st = unsafe { &mut *state.cast::<State>() };
    // SAFETY: the host table lives for the process.
    let host = unsafe { &*st.host };
    let json = host.json != 0;
    let mut o = String::new();
    match st.kind {
        Kind::Count => {
            let mut rows: Vec<&Probe> = st.probes.iter().map(|p| &**p).collect();
            // Ordering: Relaxed — counters.
            rows.sort_by_key(|p| std::cmp::Reverse(p.hits.load(Ordering::Relaxed)));
            if json {
                o.push('[');
                for (i, p) in rows.iter().enumerate() {
                    let _ = write!(
                        o,
                        "{}{{\"function\":{},\"module\":{},\"hits\":{}}}",
                        if i > 0 { "," } else { "" },
                        json_str(&p.name),
                        json_str(&p.module),
                        p.hits.load(Ordering::Relaxed)
                    );
                }
                o.push(']');
            } else {
                let _ = writeln!(o, "{:>12}  {:<40} MODULE", "HITS", "FUNCTION");
                for p in rows {
                    let _ = writeln!(
                        o,
                        "{:>12}  {:<40} {}",
                        p.hits.load(Ordering::Relaxed),
                        p.name,
                        p.module
                    );
                }
            }
        }
        Kind::Latency => {
            if json {
                o.push('[');
            } else {
                let _ = writeln!(
                    o,
                    "{:>10} {:>10} {:>10} {:>10} {:>10}  FUNCTION (ns)",
                    "CALLS", "P50", "P90", "P99", "MAX"
                );
            }
            let mut first = true;
            for (p, h) in st.probes.iter().zip(&st.lat) {
                if json {
                    let hist: Vec<String> = h
                        .log2()
                        .iter()
                        .map(|(lo, c)| format!("[{lo},{c}]"))
                        .collect();
                    let _ = write!(
                        o,
                        "{}{{\"function\":{},\"module\":{},\"calls\":{},\"p50\":{},\"p90\":{},\"p99\":{},\"max\":{},\"log2\":[{}]}}",
                        if first { "" } else { "," },
                        json_str(&p.name),
                        json_str(&p.module),
                        h.n,
                        h.pct(0.5),
                        h.pct(0.9),
                        h.pct(0.99),
                        h.max,
                        hist.join(",")
                    );
                    first = false;
                    continue;
                }
                let _ = writeln!(
                    o,
                    "{:>10} {:>10} {:>10} {:>10} {:>10}  {} ({})",
                    h.n,
                    h.pct(0.5),
                    h.pct(0.9),
                    h.pct(0.99),
                    h.max,
                    p.name,
                    p.module
                );
                let log = h.log2();
                let most = log.iter().map(|l| l.1).max().unwrap_or(1);
                for (lo, c) in log {
                    let bar = "@".repeat(((c * 40).div_ceil(most)) as usize);
                    let _ = writeln!(o, "    [{lo:>10}, {:>10}) {c:>10} |{bar}", lo * 2);
                }
            }
            if json {
                o.push(']');
            }
        }
        Kind::Args => {
            if json {
                o.push('[');
            }
            let mut first = true;
            for (p, calls) in st.probes.iter().zip(&st.args) {
                if calls.is_empty() {
                    continue;
                }
                for a in calls {
                    let hex: Vec<String> = a.iter().map(|v| format!("{v:#x}")).collect();
                    if json {
                        let _ = write!(
                            o,
                            "{}{{\"function\":{},\"args\":[{}]}}",
                            if first { "" } else { "," },
                            json_str(&p.name),
                            a.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
                        );
                        first = false;
                    } else {
                        let _ = writeln!(o, "{}({})", p.name, hex.join(", "));
                    }
                }
            }
            if json {
                o.push(']');
            }
        }
        Kind::Drcov => {
            let file = if st.arg.is_empty() {
                // SAFETY: getpid is always safe.
                format!("drcov.{}.log", unsafe { libc::getpid() })
            } else {
                st.arg.clone()
            };
            // Ordering: Relaxed — see drcov_hit.
            let covered = st
                .probes
                .iter()
                .filter(|p| p.covered.load(Ordering::Relaxed))
                .count();
            let mut written = false;
            if fin != 0 {
                let data = drcov_file(st);
                let path = CString::new(file.as_str()).unwrap_or_default();
                // SAFETY: valid pointers and length.
                written = unsafe {
                    (host.write_file)(st.ctx, path.as_ptr(), data.as_ptr().cast(), data.len())
                } == 0;
            }
            if json {
                let _ = write!(
                    o,
                    "{{\"blocks\":{},\"covered\":{},\"file\":{}}}",
                    st.probes.len(),
                    covered,
                    if written {
                        json_str(&file)
                    } else {
                        "null".into()
                    }
                );
            } else {
                let _ = writeln!(o, "{covered} of {} basic blocks covered", st.probes.len());
                if written {
                    let _ = writeln!(o, "drcov file: {file}");
                }
            }
        }
    }
    let c = CString::new(o).unwrap_or_default();
    // SAFETY: our context; a NUL-terminated string.
    unsafe { (host.print)(st.ctx, c.as_ptr()) };
}

unsafe extern "C" fn forked(state: *mut c_void) {
    // SAFETY: our own state.
    let st = unsafe { &mut *state.cast::<State>() };
    for p in &st.probes {
        // Ordering: Relaxed — the child has one thread.
        p.hits.store(0, Ordering::Relaxed);
        p.covered.store(false, Ordering::Relaxed);
    }
    for h in &mut st.lat {
        *h = Hist::default();
    }
    for a in &mut st.args {
        a.clear();
    }
}

macro_rules! builtin {
    ($name:ident, $text:expr, $start:ident) => {
        pub static $name: Tool = Tool {
            abi: crate::host::ABI,
            name: $text.as_ptr(),
            start: Some($start),
            attach: Some(attach),
            event: Some(event),
            report: Some(report),
            forked: Some(forked),
        };
    };
}
builtin!(COUNT, c"count", start_count);
builtin!(LATENCY, c"latency", start_latency);
builtin!(ARGS, c"args", start_args);
builtin!(DRCOV, c"drcov", start_drcov);

/// A built-in tool by name.
pub fn builtin(name: &str) -> Option<&'static Tool> {
    match name {
        "count" => Some(&COUNT),
        "latency" => Some(&LATENCY),
        "args" => Some(&ARGS),
        "drcov" => Some(&DRCOV),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram() {
        let mut h = Hist::default();
        for v in 1..=1000u64 {
            h.add(v);
        }
        assert_eq!(h.n, 1000);
        assert_eq!(h.max, 1000);
        let p50 = h.pct(0.5);
        assert!((500..=532).contains(&p50), "{p50}");
        assert_eq!(h.log2().iter().map(|l| l.1).sum::<u64>(), 1000);
        assert_eq!(h.log2()[0], (1, 1));
        for v in [0u64, 1, 15, 16, 17, 1000, 1 << 40] {
            assert!(bucket_high(bucket(v)) >= v, "{v}");
        }
    }
}
