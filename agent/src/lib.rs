//! # The agent of the `probert` command
//!
//! `probert trace` runs the program with this library in `LD_PRELOAD`. Its
//! constructor runs before `main`: it reads its orders from the environment
//! (`PROBERT_*`), connects to the command's socket, loads the tools (the
//! built-ins of [`tools`] and `--tool` plug-ins, all through the ABI of
//! `include/probert_tool.h`), matches the specs in the loaded modules and
//! lets every tool attach. Modules loaded later are matched when `dlopen`
//! returns (this library interposes `dlopen`). Handlers queue events in
//! per-thread buffers ([`events`]); a drain thread hands them to the tools
//! and makes the `--interval` reports; the final report is made at `exit`.
//! Reports go over the socket, never to the program's descriptors 0–2.
//!
//! Frames to the command: one kind byte, a little-endian `u32` length, the
//! payload. `H` hello (`pid\0program\0shm`, the last the file of
//! [`shared`] counters in the command's directory, or empty), `R` a report, `L` list output, `E` an
//! error that ends the program before `main`.
#![allow(unsafe_code)]

mod events;
mod host;
mod resolve;
mod shared;
mod tools;

use std::collections::HashSet;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use host::{Tool, ToolCtx, ToolHost, ToolMatch};
use resolve::{Module, Spec};

// ---- agent threads ------------------------------------------------------

static AGENT_THREADS: [AtomicUsize; 4] = [const { AtomicUsize::new(0) }; 4];

/// Whether the calling thread is doing the agent's work (its hits are not
/// the program's).
///
/// # Signal safety
/// A register read and four atomic loads.
#[inline]
pub fn agent_thread() -> bool {
    let me = thread_id();
    // Ordering: Relaxed — a thread only compares its own id, stored by itself.
    AGENT_THREADS
        .iter()
        .any(|t| t.load(Ordering::Relaxed) == me)
}

/// The calling thread's identity: its thread pointer (what `pthread_self`
/// returns on x86-64 glibc and musl), read without a call, so that a
/// handler calling [`agent_thread`] stays one probert's analysis can see
/// through (a call into the C library is not).
#[inline(always)]
fn thread_id() -> usize {
    let tp: usize;
    // SAFETY: reads the thread control block's self pointer at fs:0, which
    // the C library sets for every thread; no memory is written.
    unsafe {
        std::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly, preserves_flags));
    }
    tp
}

/// Marks the calling thread as the agent's until the guard drops.
struct AgentWork(Option<usize>);

fn agent_work() -> AgentWork {
    let me = thread_id();
    if agent_thread() {
        return AgentWork(None);
    }
    for (i, t) in AGENT_THREADS.iter().enumerate() {
        // Ordering: Relaxed — see agent_thread.
        if t.compare_exchange(0, me, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            return AgentWork(Some(i));
        }
    }
    AgentWork(None)
}

/// Gives back the mark of a thread of the agent's that has exited (its
/// `pthread_t` may name a new thread now).
fn release_agent_thread(t: libc::pthread_t) {
    for slot in &AGENT_THREADS {
        // Ordering: Relaxed — see agent_thread.
        let _ = slot.compare_exchange(t as usize, 0, Ordering::Relaxed, Ordering::Relaxed);
    }
}

impl Drop for AgentWork {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            // Ordering: Relaxed — see agent_thread.
            AGENT_THREADS[i].store(0, Ordering::Relaxed);
        }
    }
}

// ---- the connection to the command --------------------------------------

static CONN: AtomicI32 = AtomicI32::new(-1);
static PENDING: AtomicI32 = AtomicI32::new(-1);

fn connect() -> i32 {
    let Some(path) = std::env::var_os("PROBERT_SOCK")
        .or_else(|| CONFIG.lock().ok()?.as_ref().map(|c| c.sock.clone().into()))
    else {
        return -1;
    };
    let Ok(s) = std::os::unix::net::UnixStream::connect(path) else {
        return -1;
    };
    std::os::fd::IntoRawFd::into_raw_fd(s)
}

fn send(kind: u8, payload: &[u8]) {
    let fd = CONN.load(Ordering::Acquire);
    if fd < 0 {
        return;
    }
    let mut buf = Vec::with_capacity(payload.len() + 5);
    buf.push(kind);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(payload);
    let mut off = 0;
    while off < buf.len() {
        // SAFETY: a valid buffer; fd is ours.
        let n = unsafe { libc::write(fd, buf[off..].as_ptr().cast(), buf.len() - off) };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        off += n as usize;
    }
}

fn hello() {
    // SAFETY: always safe.
    let pid = unsafe { libc::getpid() };
    let exe = std::fs::read_link("/proc/self/exe")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    send(b'H', format!("{pid}\0{exe}\0{}", shared::name()).as_bytes());
}

fn fatal(msg: &str) -> ! {
    send(b'E', msg.as_bytes());
    // SAFETY: ends the process before main; nothing of the program ran.
    unsafe { libc::_exit(127) }
}

// ---- configuration and tools --------------------------------------------

#[derive(Debug)]
struct Config {
    sock: String,
    specs: Vec<Spec>,
    list: bool,
    json: bool,
    follow: bool,
    interval: Option<f64>,
}

static CONFIG: Mutex<Option<Config>> = Mutex::new(None);
static FOLLOW: AtomicBool = AtomicBool::new(false);

/// The command's socket, once the environment no longer says it.
fn config_sock() -> Option<String> {
    CONFIG.try_lock().ok()?.as_ref().map(|c| c.sock.clone())
}

struct LoadedTool {
    tool: &'static Tool,
    state: *mut c_void,
    ctx: *mut ToolCtx,
    /// Failed attaches the tool counted but did not explain (`not_attached`).
    unexplained: usize,
}

struct Agent {
    host: Box<ToolHost>,
    tools: Vec<LoadedTool>,
    modules: HashSet<Module>,
    seen: HashSet<usize>,
    next_id: u32,
    strings: Vec<CString>,
    kept: Vec<resolve::Match>,
    unmatched: Vec<bool>,
}

// SAFETY: the raw pointers are the tools' states and contexts, used under
// the AGENT mutex only (and by handlers through their own pointers).
unsafe impl Send for Agent {}

static AGENT: Mutex<Option<Agent>> = Mutex::new(None);
static TOOL_PATHS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static ACTIVE: AtomicBool = AtomicBool::new(false);
static DISABLED: AtomicBool = AtomicBool::new(false);

fn is_tool_path(path: &str) -> bool {
    TOOL_PATHS
        .lock()
        .map(|t| t.iter().any(|p| p == path))
        .unwrap_or(false)
}

/// The full path of the module at `base` named `name` (a file name).
fn module_path(name: &str, base: usize) -> Option<String> {
    resolve::loaded_modules()
        .into_iter()
        .find(|m| m.base == base && m.file_name() == name)
        .map(|m| m.path)
}

fn load_tool(spec: &str) -> Result<(&'static Tool, String), String> {
    let (name, args) = spec.split_once('=').unwrap_or((spec, ""));
    if let Some(t) = tools::builtin(name) {
        return Ok((t, args.to_owned()));
    }
    let path = std::fs::canonicalize(name).map_err(|e| format!("tool {name}: {e}"))?;
    let pathc = CString::new(path.to_string_lossy().as_bytes()).map_err(|e| e.to_string())?;
    TOOL_PATHS
        .lock()
        .map_err(|e| e.to_string())?
        .push(path.to_string_lossy().into_owned());
    // SAFETY: loading a plug-in the user named.
    let h = unsafe { real_dlopen()(pathc.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        // SAFETY: dlerror returns NULL or a NUL-terminated message.
        let e = unsafe { libc::dlerror() };
        let e = if e.is_null() {
            "dlopen failed".into()
        } else {
            // SAFETY: not NULL: dlerror's NUL-terminated message.
            unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
        };
        return Err(format!("tool {name}: {e}"));
    }
    // SAFETY: a valid handle and name.
    let entry = unsafe { libc::dlsym(h, c"probert_tool_v1".as_ptr()) };
    if entry.is_null() {
        return Err(format!(
            "tool {name}: exports no probert_tool_v1 (see include/probert_tool.h)"
        ));
    }
    // SAFETY: the ABI's entry point type.
    let entry: extern "C" fn() -> *const Tool = unsafe { std::mem::transmute(entry) };
    // SAFETY: a static description, by the ABI.
    let tool =
        unsafe { entry().as_ref() }.ok_or(format!("tool {name}: probert_tool_v1 returned NULL"))?;
    if tool.abi != host::ABI || tool.start.is_none() {
        return Err(format!(
            "tool {name}: ABI version {} (this probert speaks {})",
            tool.abi,
            host::ABI
        ));
    }
    Ok((tool, args.to_owned()))
}

fn tool_name(t: &Tool) -> String {
    // SAFETY: the tool's static name.
    if t.name.is_null() {
        "?".into()
    } else {
        // SAFETY: not NULL: the tool's static name.
        unsafe { CStr::from_ptr(t.name) }
            .to_string_lossy()
            .into_owned()
    }
}

/// Matches the specs in `modules` not seen yet and lets every tool attach.
fn attach_new(agent: &mut Agent, cfg: &Config, modules: Vec<Module>) -> Vec<resolve::Match> {
    let new: Vec<Module> = modules
        .into_iter()
        .filter(|m| !agent.modules.contains(m))
        .collect();
    if new.is_empty() {
        return Vec::new();
    }
    agent.modules.extend(new.iter().cloned());
    let (ms, seen) = resolve::resolve(&cfg.specs, &new, &mut agent.seen);
    for (u, s) in agent.unmatched.iter_mut().zip(seen) {
        *u &= !s;
    }
    if cfg.list || ms.is_empty() {
        return ms;
    }
    let mut tm = Vec::with_capacity(ms.len());
    for m in &ms {
        let spec = CString::new(cfg.specs[m.spec_index as usize].text.as_str()).unwrap_or_default();
        tm.push(ToolMatch {
            id: agent.next_id,
            spec_index: m.spec_index,
            spec: spec.as_ptr(),
            module: m.module.as_ptr(),
            symbol: m.symbol.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            addr: m.addr,
            func_start: m.func_start,
            func_end: m.func_end,
            module_base: m.module_base,
            is_entry: u32::from(m.func_start != 0 && m.addr == m.func_start),
        });
        agent.strings.push(spec);
        agent.next_id += 1;
    }
    for t in &mut agent.tools {
        if let Some(a) = t.tool.attach {
            let said = |t: &LoadedTool| {
                // SAFETY: our context, live for the process.
                unsafe { &*t.ctx }
                    .not_attached
                    .lock()
                    .map_or(0, |n| n.len())
            };
            let before = said(t);
            // SAFETY: the tool's state and `tm.len()` matches.
            let failed = unsafe { a(t.state, tm.as_ptr(), tm.len()) };
            let explained = said(t) - before;
            t.unexplained += usize::try_from(failed)
                .unwrap_or(0)
                .saturating_sub(explained);
        }
    }
    // The strings the matches point at live as long as the process.
    let ret = ms.clone();
    agent.kept.extend(ms);
    ret
}

fn init_agent() {
    let Ok(sock) = std::env::var("PROBERT_SOCK") else {
        return;
    };
    let _work = agent_work();
    host::find_agent_code();
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let cfg = Config {
        sock,
        specs: Vec::new(),
        list: var("PROBERT_MODE") == "list",
        json: var("PROBERT_JSON") == "1",
        follow: var("PROBERT_FOLLOW") == "1",
        interval: var("PROBERT_INTERVAL")
            .parse()
            .ok()
            .filter(|&s: &f64| s > 0.0),
    };
    let fd = connect();
    CONN.store(fd, Ordering::Release);
    if fd >= 0 {
        // SAFETY: our descriptor: the program's exec closes it.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    if !cfg.list {
        shared::init();
    }
    hello();
    let specs: Result<Vec<Spec>, String> = var("PROBERT_SPECS")
        .split('\x1f')
        .filter(|s| !s.is_empty())
        .map(Spec::parse)
        .collect();
    let specs = specs.unwrap_or_else(|e| fatal(&e));
    let tool_specs: Vec<String> = var("PROBERT_TOOLS")
        .split('\x1f')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if !cfg.follow {
        // The program's children run untraced: take the agent out of the
        // environment they inherit.
        let me = resolve::agent_path().unwrap_or_default();
        let pre: Vec<String> = var("LD_PRELOAD")
            .split([':', ' '])
            .filter(|p| !p.is_empty() && *p != me)
            .map(str::to_owned)
            .collect();
        if pre.is_empty() {
            std::env::remove_var("LD_PRELOAD")
        } else {
            std::env::set_var("LD_PRELOAD", pre.join(":"))
        }
        for k in [
            "PROBERT_SOCK",
            "PROBERT_SPECS",
            "PROBERT_TOOLS",
            "PROBERT_MODE",
            "PROBERT_JSON",
            "PROBERT_FOLLOW",
            "PROBERT_INTERVAL",
            "PROBERT_CWD",
        ] {
            std::env::remove_var(k);
        }
    }
    let cfg = Config { specs, ..cfg };
    let json = cfg.json;
    let mut agent = Agent {
        host: Box::new(host::host(json)),
        tools: Vec::new(),
        modules: HashSet::new(),
        seen: HashSet::new(),
        next_id: 0,
        strings: Vec::new(),
        kept: Vec::new(),
        unmatched: vec![true; cfg.specs.len()],
    };
    if !cfg.list {
        for (i, ts) in tool_specs.iter().enumerate() {
            let (tool, args) = load_tool(ts).unwrap_or_else(|e| fatal(&e));
            let ctx = Box::into_raw(Box::new(ToolCtx {
                index: i as u16,
                name: tool_name(tool),
                out: Mutex::new(String::new()),
                not_attached: Mutex::new(Vec::new()),
            }));
            let a = CString::new(args).unwrap_or_default();
            let start = tool.start.unwrap_or_else(|| fatal("tool without start"));
            // SAFETY: the ABI's start call; the host table lives for the process.
            let state = unsafe { start(&*agent.host, ctx, a.as_ptr()) };
            if state.is_null() {
                // SAFETY: our context.
                let why = unsafe { &*ctx }
                    .out
                    .lock()
                    .map(|s| s.clone())
                    .unwrap_or_default();
                fatal(&format!(
                    "tool {} refused to start: {}",
                    tool_name(tool),
                    why.trim()
                ));
            }
            agent.tools.push(LoadedTool {
                tool,
                state,
                ctx,
                unexplained: 0,
            });
        }
    }
    let modules = resolve::loaded_modules();
    let ms = attach_new(&mut agent, &cfg, modules.clone());
    if cfg.list {
        let mut o = String::new();
        for m in &ms {
            let name = m
                .symbol
                .as_ref()
                .map_or(String::new(), |s| s.to_string_lossy().into_owned());
            let module = m.module.to_string_lossy();
            let off = if m.func_start != 0 && m.addr != m.func_start {
                format!("+{:#x}", m.addr - m.func_start)
            } else {
                String::new()
            };
            let _ = writeln!(
                o,
                "{:#014x}  {}{}  {}  [{}]",
                m.addr,
                name,
                off,
                module.rsplit('/').next().unwrap_or(""),
                cfg.specs[m.spec_index as usize].text
            );
        }
        let _ = writeln!(o, "{} match(es)", ms.len());
        send(b'L', o.as_bytes());
    }
    // A spec whose module is loaded (or that names none) and that matched
    // nothing is a mistake a person can fix now.
    for (si, spec) in cfg.specs.iter().enumerate() {
        let matched = ms.iter().any(|m| m.spec_index as usize == si);
        if matched {
            continue;
        }
        let module_loaded = spec.module.as_ref().map_or(true, |mg| {
            modules.iter().any(|m| resolve::module_matches(mg, m))
        });
        if module_loaded || cfg.list {
            let close = resolve::closest(spec, &modules);
            let what = match &spec.module {
                Some(mg) if !module_loaded => format!("no loaded module matches '{mg}'"),
                _ => "no function matches".into(),
            };
            let hint = if close.is_empty() {
                String::new()
            } else {
                format!("; closest: {}", close.join(", "))
            };
            fatal(&format!("spec '{}': {what}{hint}", spec.text));
        }
    }
    if cfg.list {
        // SAFETY: list mode never runs the program.
        unsafe { libc::_exit(0) }
    }
    *AGENT.lock().unwrap_or_else(|p| p.into_inner()) = Some(agent);
    let interval = cfg.interval;
    let follow = cfg.follow;
    FOLLOW.store(follow, Ordering::Relaxed);
    *CONFIG.lock().unwrap_or_else(|p| p.into_inner()) = Some(cfg);
    start_drain(interval);
    // SAFETY: plain C function pointers registered once.
    unsafe {
        libc::atexit(at_exit);
        if follow {
            libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child));
        } else {
            libc::pthread_atfork(None, None, Some(fork_child));
        }
    }
    ACTIVE.store(true, Ordering::Release);
}

// ---- drain thread and reports -------------------------------------------

static STOP: Mutex<Option<(crossbeam_channel::Sender<()>, libc::pthread_t)>> = Mutex::new(None);

fn drain_now(agent: &mut Agent) {
    let _g = events::DRAIN.lock().unwrap_or_else(|p| p.into_inner());
    let tools = &agent.tools;
    events::drain(|tool, rec| {
        if let Some(t) = tools.get(usize::from(tool)) {
            if let Some(ev) = t.tool.event {
                // SAFETY: the tool's state; `rec` is valid for the call.
                unsafe { ev(t.state, rec.as_ptr().cast(), rec.len()) };
            }
        }
    });
}

/// What the drain thread gets: the stop channel and the interval.
type DrainArgs = (crossbeam_channel::Receiver<()>, Option<f64>);

/// The drain thread's start routine: a bare pthread that marks itself the
/// agent's before anything else runs on it (a std thread's start-up
/// allocates, and those calls would count as the program's).
extern "C" fn drain_main(arg: *mut c_void) -> *mut c_void {
    // The agent's for its whole life, its thread-local destructors included
    // (seize's gives the thread's id back, and allocates doing so): the
    // mark is released once the thread is joined (`at_exit`).
    std::mem::forget(agent_work());
    // SAFETY: the Box start_drain leaked for this thread, ours alone now.
    let args = unsafe { Box::from_raw(arg.cast::<DrainArgs>()) };
    let _ = std::panic::catch_unwind(move || drain_loop(args.0, args.1));
    std::ptr::null_mut()
}

fn drain_loop(rx: crossbeam_channel::Receiver<()>, interval: Option<f64>) {
    let tick = crossbeam_channel::tick(Duration::from_millis(10));
    let mut next = interval.map(|s| std::time::Instant::now() + Duration::from_secs_f64(s));
    loop {
        crossbeam_channel::select! {
            recv(rx) -> _ => return,
            recv(tick) -> _ => {}
        }
        let mut g = AGENT.lock().unwrap_or_else(|p| p.into_inner());
        let Some(agent) = g.as_mut() else { continue };
        drain_now(agent);
        if let (Some(n), Some(s)) = (next, interval) {
            if std::time::Instant::now() >= n {
                make_report(agent, false);
                next = Some(n + Duration::from_secs_f64(s));
            }
        }
    }
}

fn start_drain(interval: Option<f64>) {
    let (tx, rx) = crossbeam_channel::bounded::<()>(1);
    let arg = Box::into_raw(Box::new((rx, interval))).cast::<c_void>();
    // SAFETY: zeroed is a valid pthread_t to be overwritten.
    let mut thread: libc::pthread_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer, default attributes, a start routine of
    // the right type taking ownership of `arg`.
    let rc = unsafe { libc::pthread_create(&mut thread, std::ptr::null(), drain_main, arg) };
    if rc != 0 {
        // SAFETY: the thread did not start: `arg` is still ours.
        drop(unsafe { Box::from_raw(arg.cast::<DrainArgs>()) });
        return;
    }
    *STOP.lock().unwrap_or_else(|p| p.into_inner()) = Some((tx, thread));
}

fn make_report(agent: &mut Agent, fin: bool) {
    let json = agent.host.json != 0;
    let mut parts = Vec::new();
    let mut refused: Vec<(String, host::NotAttached)> = Vec::new();
    let mut unexplained: Vec<(String, usize)> = Vec::new();
    for t in &agent.tools {
        // SAFETY: our context.
        let ctx = unsafe { &*t.ctx };
        let n = ctx.not_attached.lock().unwrap_or_else(|p| p.into_inner());
        refused.extend(n.iter().map(|r| (ctx.name.clone(), r.clone())));
        if t.unexplained > 0 {
            unexplained.push((ctx.name.clone(), t.unexplained));
        }
    }
    for t in &agent.tools {
        // SAFETY: our context.
        let ctx = unsafe { &*t.ctx };
        ctx.out.lock().unwrap_or_else(|p| p.into_inner()).clear();
        if let Some(r) = t.tool.report {
            // SAFETY: the tool's state.
            unsafe { r(t.state, c_int::from(fin)) };
        }
        let text = std::mem::take(&mut *ctx.out.lock().unwrap_or_else(|p| p.into_inner()));
        parts.push((tool_name(t.tool), text));
    }
    // SAFETY: always safe.
    let pid = unsafe { libc::getpid() };
    let drops = events::drops();
    let unmatched: Vec<usize> = agent
        .unmatched
        .iter()
        .enumerate()
        .filter(|u| *u.1)
        .map(|u| u.0)
        .collect();
    let specs: Vec<String> = CONFIG
        .lock()
        .map(|c| {
            c.as_ref()
                .map(|c| unmatched.iter().map(|&i| c.specs[i].text.clone()).collect())
                .unwrap_or_default()
        })
        .unwrap_or_default();
    let mut o = String::new();
    if json {
        let not_attached: Vec<String> = refused
            .iter()
            .map(|(tool, r)| {
                format!(
                    "{{\"tool\":{},\"spec\":{},\"function\":{},\"module\":{},\"reason\":{}}}",
                    tools::json_str(tool),
                    tools::json_str(&r.spec),
                    tools::json_str(&r.function),
                    tools::json_str(&r.module),
                    tools::json_str(&r.reason)
                )
            })
            .chain(unexplained.iter().map(|(tool, n)| {
                format!(
                    "{{\"tool\":{},\"failed\":{n},\"reason\":\"not said by the tool\"}}",
                    tools::json_str(tool)
                )
            }))
            .collect();
        let _ = write!(
            o,
            "{{\"pid\":{pid},\"final\":{fin},\"dropped_events\":{drops},\"unmatched\":[{}],\"not_attached\":[{}],\"tools\":{{",
            specs
                .iter()
                .map(|s| tools::json_str(s))
                .collect::<Vec<_>>()
                .join(","),
            not_attached.join(",")
        );
        for (i, (n, t)) in parts.iter().enumerate() {
            let t = if t.trim().is_empty() {
                "null"
            } else {
                t.trim()
            };
            let _ = write!(o, "{}\"{n}\":{t}", if i > 0 { "," } else { "" });
        }
        o.push_str("}}");
    } else {
        for (n, t) in &parts {
            let _ = writeln!(o, "[{n}]");
            o.push_str(t);
            if !t.ends_with('\n') && !t.is_empty() {
                o.push('\n');
            }
        }
        if drops > 0 {
            let _ = writeln!(o, "({drops} events dropped: buffers full)");
        }
        for s in specs {
            let _ = writeln!(
                o,
                "(spec '{s}' matched nothing: its module was never loaded)"
            );
        }
        for (tool, r) in &refused {
            let _ = writeln!(
                o,
                "not attached: {} ({}) [{tool}, spec '{}']: {}",
                r.function, r.module, r.spec, r.reason
            );
        }
        for (tool, n) in &unexplained {
            let _ = writeln!(
                o,
                "not attached: {n} match(es) of tool {tool} (it did not say which)"
            );
        }
    }
    send(if fin { b'R' } else { b'I' }, o.as_bytes());
}

extern "C" fn at_exit() {
    if DISABLED.load(Ordering::Acquire) || !ACTIVE.swap(false, Ordering::AcqRel) {
        return;
    }
    let _work = agent_work();
    if let Some((tx, h)) = STOP.lock().unwrap_or_else(|p| p.into_inner()).take() {
        let _ = tx.send(());
        // SAFETY: the drain thread, joined once (taken out of STOP).
        unsafe { libc::pthread_join(h, std::ptr::null_mut()) };
        release_agent_thread(h);
    }
    let mut g = AGENT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(agent) = g.as_mut() {
        drain_now(agent);
        make_report(agent, true);
    }
}

// ---- fork and dlopen -----------------------------------------------------

/// The agent's lock, held by the forking thread from `fork_prepare` to
/// `fork_parent`/`fork_child`: the drain thread is then outside every lock
/// of the agent and its tools (it holds this one around all its work), so
/// the child, which has no drain thread, finds none of them held.
static mut FORK_AGENT: Option<std::sync::MutexGuard<'static, Option<Agent>>> = None;

extern "C" fn fork_prepare() {
    PENDING.store(connect(), Ordering::Release);
    let g = AGENT.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: the fork handlers of one fork run on one thread, in order;
    // nothing else touches FORK_AGENT.
    unsafe { *std::ptr::addr_of_mut!(FORK_AGENT) = Some(g) };
}

extern "C" fn fork_parent() {
    // SAFETY: as in fork_prepare; dropping the guard unlocks.
    drop(unsafe { (*std::ptr::addr_of_mut!(FORK_AGENT)).take() });
    let fd = PENDING.swap(-1, Ordering::AcqRel);
    if fd >= 0 {
        // SAFETY: the descriptor made in fork_prepare, for the child only.
        unsafe { libc::close(fd) };
    }
}

extern "C" fn fork_child() {
    // SAFETY: as in fork_prepare (the child goes on on the forking thread).
    let held = unsafe { (*std::ptr::addr_of_mut!(FORK_AGENT)).take() };
    // Ordering: Relaxed — written before any fork, by init_agent.
    shared::forked(FOLLOW.load(Ordering::Relaxed));
    let old = CONN.swap(PENDING.swap(-1, Ordering::AcqRel), Ordering::AcqRel);
    if old >= 0 {
        // SAFETY: the parent's connection; the child has its own or none.
        unsafe { libc::close(old) };
    }
    if CONN.load(Ordering::Acquire) < 0 {
        DISABLED.store(true, Ordering::Release);
        return;
    }
    let fd = CONN.load(Ordering::Acquire);
    // SAFETY: our descriptor.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // The forking thread's locks: no other thread exists in the child.
    events::forget_all();
    hello();
    if let Some(mut g) = held.or_else(|| AGENT.try_lock().ok()) {
        if let Some(agent) = g.as_mut() {
            for t in &agent.tools {
                if let Some(f) = t.tool.forked {
                    // SAFETY: the tool's state.
                    unsafe { f(t.state) };
                }
            }
        }
    }
    for t in &AGENT_THREADS {
        // Ordering: Relaxed — the child has one thread.
        t.store(0, Ordering::Relaxed);
    }
    let interval = CONFIG
        .try_lock()
        .ok()
        .and_then(|c| c.as_ref().and_then(|c| c.interval));
    // The parent's channel to its drain thread: forgotten, not dropped —
    // dropping disconnects it, which takes a lock that thread may have held
    // at the fork (it has no thread here to release it).
    if let Ok(mut stop) = STOP.try_lock() {
        std::mem::forget(stop.take());
    }
    start_drain(interval);
}

type DlopenFn = unsafe extern "C" fn(*const c_char, c_int) -> *mut c_void;
static REAL_DLOPEN: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

fn real_dlopen() -> DlopenFn {
    let mut p = REAL_DLOPEN.load(Ordering::Acquire);
    if p.is_null() {
        // SAFETY: looks up the next definition of dlopen (libc's).
        p = unsafe { libc::dlsym(libc::RTLD_NEXT, c"dlopen".as_ptr()) };
        REAL_DLOPEN.store(p, Ordering::Release);
    }
    // SAFETY: dlopen's type.
    unsafe { std::mem::transmute::<*mut c_void, DlopenFn>(p) }
}

/// The program's `dlopen`: libc's, then the specs are matched in the
/// modules it loaded and the tools attach there, before it returns.
///
/// # Safety
/// As `dlopen(3)`.
#[no_mangle]
pub unsafe extern "C" fn dlopen(file: *const c_char, flags: c_int) -> *mut c_void {
    // SAFETY: the caller's arguments, passed on.
    let h = unsafe { real_dlopen()(file, flags) };
    if !h.is_null() && ACTIVE.load(Ordering::Acquire) && !agent_thread() {
        let _work = agent_work();
        let _ = std::panic::catch_unwind(|| {
            let cfg = CONFIG.lock().unwrap_or_else(|p| p.into_inner());
            let mut g = AGENT.lock().unwrap_or_else(|p| p.into_inner());
            if let (Some(cfg), Some(agent)) = (cfg.as_ref(), g.as_mut()) {
                attach_new(agent, cfg, resolve::loaded_modules());
            }
        });
    }
    h
}

extern "C" fn constructor() {
    if std::panic::catch_unwind(init_agent).is_err() {
        fatal("internal error in the agent");
    }
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = constructor;
