//! `probert`, the command: runs a program with probert's agent preloaded,
//! relays the reports the agent sends over a socket to the terminal or
//! `-o FILE` (the command's standard error by default: the program's
//! standard output stays the program's alone), and exits with the program's status.
#![allow(unsafe_code)]

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const USAGE: &str = "usage: probert trace [-p SPEC]... [--latency] [--args] [--json] [-o FILE]
                     [--interval SECS] [-f] [--tool NAME|PATH.so[=ARGS]]... -- PROGRAM [ARGS...]
       probert list [SPEC]... -- PROGRAM [ARGS...]

SPEC is [MODULE:]SYMBOL-GLOB[+OFFSET] or an address (0x...), e.g. malloc,
'libc.so.6:str*', 'libsqlite3.so*:sqlite3_*', main+0x10.
Built-in tools: count (always on), latency, args[=N], drcov[=FILE].";

#[derive(Debug, Default)]
struct Opts {
    list: bool,
    specs: Vec<String>,
    tools: Vec<String>,
    json: bool,
    out: Option<PathBuf>,
    interval: Option<f64>,
    follow: bool,
    program: Vec<OsString>,
}

fn usage(msg: &str) -> ! {
    if !msg.is_empty() {
        eprintln!("probert: {msg}");
    }
    eprintln!("{USAGE}");
    std::process::exit(2)
}

fn parse(args: Vec<OsString>) -> Opts {
    let mut o = Opts::default();
    let mut it = args.into_iter();
    match it.next().as_ref().and_then(|s| s.to_str()) {
        Some("trace") => {}
        Some("list") => o.list = true,
        Some("-h") | Some("--help") => {
            println!("{USAGE}");
            std::process::exit(0)
        }
        Some(c) => usage(&format!("unknown command '{c}'")),
        None => usage(""),
    }
    let mut tools = vec!["count".to_owned()];
    while let Some(a) = it.next() {
        let s = a.to_string_lossy().into_owned();
        let mut value = |name: &str| -> String {
            it.next()
                .map(|v| v.to_string_lossy().into_owned())
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        match s.as_str() {
            "--" => {
                o.program = it.by_ref().collect();
                break;
            }
            "-p" | "--probe" if !o.list => o.specs.push(value("-p")),
            "--latency" if !o.list => tools.push("latency".into()),
            "--args" if !o.list => tools.push("args".into()),
            "--json" if !o.list => o.json = true,
            "-f" | "--follow" if !o.list => o.follow = true,
            "-o" | "--output" if !o.list => o.out = Some(value("-o").into()),
            "--tool" if !o.list => tools.push(value("--tool")),
            "--interval" if !o.list => {
                let v = value("--interval");
                o.interval = Some(
                    v.parse()
                        .ok()
                        .filter(|s: &f64| *s > 0.0)
                        .unwrap_or_else(|| usage(&format!("bad --interval '{v}': seconds > 0"))),
                );
            }
            _ if o.list && !s.starts_with('-') => o.specs.push(s),
            _ => usage(&format!("unknown option '{s}'")),
        }
    }
    if o.program.is_empty() {
        usage("no program: put it after --");
    }
    if o.specs.is_empty() {
        usage("no spec: give at least one -p SPEC");
    }
    for t in &mut tools {
        let (name, args) = t.split_once('=').unwrap_or((t, ""));
        if name.ends_with(".so") || name.contains('/') {
            let p =
                std::fs::canonicalize(name).unwrap_or_else(|e| usage(&format!("tool {name}: {e}")));
            *t = format!("{}={args}", p.display());
        } else if !["count", "latency", "args", "drcov"].contains(&name) {
            usage(&format!(
                "unknown tool '{name}' (built-ins: count, latency, args, drcov; or PATH.so)"
            ));
        }
    }
    o.tools = tools;
    o
}

/// The program's file, as execvp would find it.
fn find_program(p: &OsString) -> Option<PathBuf> {
    let p = Path::new(p);
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(p))
                .find(|f| f.is_file())
        })
        .unwrap_or(None)
}

/// A one-line reason the agent cannot be injected into `file`, if any.
fn check_program(file: &Path, shown: &str) -> Result<(), String> {
    let meta = std::fs::metadata(file).map_err(|e| format!("{shown}: {e}"))?;
    let mode = meta.permissions().mode();
    if mode & 0o111 == 0 {
        return Err(format!("{shown}: not executable"));
    }
    if mode & 0o6000 != 0 {
        return Err(format!(
            "{shown} is setuid/setgid: the dynamic loader ignores LD_PRELOAD for it, so probert cannot trace it (copy it without the bit, or run it as its owner without the bit)"
        ));
    }
    let data = std::fs::read(file).map_err(|e| format!("{shown}: {e}"))?;
    if data.starts_with(b"#!") {
        return Ok(()); // a script: its interpreter is traced
    }
    use object::read::elf::{FileHeader, ProgramHeader};
    use object::Endianness;
    let hdr = object::elf::FileHeader64::<Endianness>::parse(&*data)
        .map_err(|_| format!("{shown}: not an x86-64 ELF program"))?;
    let e = hdr
        .endian()
        .map_err(|_| format!("{shown}: not an ELF program"))?;
    let phdrs = hdr
        .program_headers(e, &*data)
        .map_err(|_| format!("{shown}: bad ELF program headers"))?;
    if !phdrs.iter().any(|p| p.p_type(e) == object::elf::PT_INTERP) {
        return Err(format!(
            "{shown} is statically linked: there is no dynamic loader to preload probert's agent into it"
        ));
    }
    Ok(())
}

/// The agent this binary carries (cli/build.rs); empty when built without.
static EMBEDDED_AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libprobert_agent.so"));

/// The embedded agent as a file: in the user's cache directory (named by its
/// contents, written once, atomically), else in this run's private `dir`.
fn embedded_agent(dir: &Path) -> Option<PathBuf> {
    if EMBEDDED_AGENT.is_empty() {
        return None;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a
    for &b in EMBEDDED_AGENT {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let name = format!("libprobert_agent-{}-{h:016x}.so", env!("CARGO_PKG_VERSION"));
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|c| Path::new(c).is_absolute())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .map(|c| c.join("probert"));
    let write = |d: &Path| -> Option<PathBuf> {
        let f = d.join(&name);
        let fresh = std::fs::metadata(&f).is_ok_and(|m| m.len() == EMBEDDED_AGENT.len() as u64);
        if fresh {
            return Some(f);
        }
        std::fs::create_dir_all(d).ok()?;
        let tmp = d.join(format!(".{name}.{}", std::process::id()));
        std::fs::write(&tmp, EMBEDDED_AGENT).ok()?;
        std::fs::rename(&tmp, &f)
            .map_err(|_| std::fs::remove_file(&tmp))
            .ok()?;
        Some(f)
    };
    cache.as_deref().and_then(write).or_else(|| write(dir))
}

/// The agent library: $PROBERT_AGENT, next to this executable, in ../lib,
/// or the one this binary carries.
fn agent(run_dir: &Path) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("PROBERT_AGENT") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    for cand in [
        dir.join("libprobert_agent.so"),
        dir.join("../lib/probert/libprobert_agent.so"),
        dir.join("../lib/libprobert_agent.so"),
    ] {
        if cand.is_file() {
            return std::fs::canonicalize(cand).map_err(|e| e.to_string());
        }
    }
    if let Some(p) = embedded_agent(run_dir) {
        return Ok(p);
    }
    Err(format!(
        "the agent libprobert_agent.so is not next to {} and this build carries none (build it with `cargo build --release -p probert-agent`, or set PROBERT_AGENT)",
        exe.display()
    ))
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    pid: String,
    program: String,
    /// The file of the agent's shared counters in our directory, if any.
    shm: String,
    /// Whether the final report came.
    reported: bool,
}

/// A process whose connection closed without its final report.
struct Orphan {
    pid: String,
    program: String,
    shm: PathBuf,
}

enum Frame {
    Hello(String, String, String),
    Report(bool, String),
    List(String),
    Error(String),
}

fn frames(c: &mut Conn) -> Vec<Frame> {
    let mut out = Vec::new();
    while c.buf.len() >= 5 {
        let len = u32::from_le_bytes([c.buf[1], c.buf[2], c.buf[3], c.buf[4]]) as usize;
        if c.buf.len() < 5 + len {
            break;
        }
        let kind = c.buf[0];
        let payload = String::from_utf8_lossy(&c.buf[5..5 + len]).into_owned();
        c.buf.drain(..5 + len);
        out.push(match kind {
            b'H' => {
                let mut f = payload.split('\0').map(str::to_owned);
                let pid = f.next().unwrap_or_default();
                let prog = f.next().unwrap_or_default();
                Frame::Hello(pid, prog, f.next().unwrap_or_default())
            }
            b'R' => Frame::Report(true, payload),
            b'I' => Frame::Report(false, payload),
            b'L' => Frame::List(payload),
            _ => Frame::Error(payload),
        });
    }
    out
}

fn run(o: Opts) -> Result<u8, String> {
    let shown = o.program[0].to_string_lossy().into_owned();
    let file = find_program(&o.program[0]).ok_or(format!("{shown}: command not found"))?;
    check_program(&file, &shown)?;
    let dir = std::env::temp_dir().join(format!("probert-{}-{}", std::process::id(), nanos()));
    std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| e.to_string())?;
    let agent = agent(&dir).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&dir);
    })?;
    let sock = dir.join("sock");
    let listener = UnixListener::bind(&sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    let preload = match std::env::var("LD_PRELOAD") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", agent.display()),
        _ => agent.display().to_string(),
    };
    let mut cmd = Command::new(&o.program[0]);
    cmd.args(&o.program[1..])
        .env("LD_PRELOAD", preload)
        .env("PROBERT_SOCK", &sock)
        .env("PROBERT_SPECS", o.specs.join("\x1f"))
        .env("PROBERT_TOOLS", o.tools.join("\x1f"))
        .env("PROBERT_MODE", if o.list { "list" } else { "trace" })
        .env("PROBERT_JSON", if o.json { "1" } else { "0" })
        .env("PROBERT_FOLLOW", if o.follow { "1" } else { "0" })
        .env("PROBERT_CWD", std::env::current_dir().unwrap_or_default());
    if let Some(i) = o.interval {
        cmd.env("PROBERT_INTERVAL", i.to_string());
    }
    let mut child = cmd.spawn().map_err(|e| format!("{shown}: {e}"))?;
    // The terminal's ^C and ^\ are the program's to handle; the command
    // waits for it.
    // SAFETY: setting dispositions of this process, after the spawn.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut out: Box<dyn Write> = match &o.out {
        Some(p) => Box::new(std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => Box::new(std::io::stderr()),
    };
    let mut conns: Vec<Conn> = Vec::new();
    let mut status = None;
    let mut error = None;
    let mut json_reports: Vec<String> = Vec::new();
    let mut reports = 0usize;
    let mut orphans: Vec<Orphan> = Vec::new();
    loop {
        while let Ok((s, _)) = listener.accept() {
            let _ = s.set_nonblocking(true);
            conns.push(Conn {
                stream: s,
                buf: Vec::new(),
                pid: "?".into(),
                program: String::new(),
                shm: String::new(),
                reported: false,
            });
        }
        let mut pfds: Vec<libc::pollfd> = vec![libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&listener),
            events: libc::POLLIN,
            revents: 0,
        }];
        pfds.extend(conns.iter().map(|c| libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&c.stream),
            events: libc::POLLIN,
            revents: 0,
        }));
        if status.is_none() {
            if let Ok(Some(s)) = child.try_wait() {
                status = Some(s);
                continue; // one more sweep of the listener and the connections
            }
        } else if conns.is_empty() {
            break;
        }
        // SAFETY: a valid array of pollfds; a short timeout to notice the exit.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 20) };
        let mut closed = Vec::new();
        for (i, c) in conns.iter_mut().enumerate() {
            let mut b = [0u8; 65536];
            loop {
                match c.stream.read(&mut b) {
                    Ok(0) => {
                        closed.push(i);
                        break;
                    }
                    Ok(n) => c.buf.extend_from_slice(&b[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        closed.push(i);
                        break;
                    }
                }
            }
            for f in frames(c) {
                match f {
                    Frame::Hello(pid, prog, shm) => {
                        c.pid = pid;
                        c.program = prog;
                        c.shm = shm;
                    }
                    Frame::List(t) => {
                        let _ = std::io::stdout().write_all(t.as_bytes());
                    }
                    Frame::Error(e) => error = Some(e),
                    Frame::Report(fin, t) => {
                        reports += usize::from(fin);
                        c.reported |= fin;
                        if o.json {
                            json_reports.push(format!(
                                "{{\"program\":{},\"report\":{t}}}",
                                json_str(&c.program)
                            ));
                        } else {
                            let what = if fin { "at exit" } else { "interval" };
                            let _ = writeln!(
                                out,
                                "== probert: pid {} ({}), {what} ==",
                                c.pid,
                                c.program.rsplit('/').next().unwrap_or("")
                            );
                            let _ = out.write_all(t.as_bytes());
                        }
                    }
                }
            }
        }
        for i in closed.into_iter().rev() {
            let c = conns.remove(i);
            // A name of our own directory's files only.
            let name_ok = c.shm.starts_with("shm.") && !c.shm.contains('/');
            if !c.reported && name_ok && !o.list {
                orphans.push(Orphan {
                    pid: c.pid,
                    program: c.program,
                    shm: dir.join(&c.shm),
                });
            }
        }
    }
    // Processes that ended without a report (a signal, _exit, an exec not
    // followed): what their shared counters say.
    let main_pid = child.id().to_string();
    for orphan in &orphans {
        let why = match status {
            Some(s) if orphan.pid == main_pid => match s.signal() {
                Some(sig) => format!("killed by signal {sig} ({})", signal_name(sig)),
                None => format!(
                    "exited with status {} without running exit handlers (_exit, or an exec)",
                    s.code().unwrap_or(0)
                ),
            },
            _ => "ended without running exit handlers (a signal, _exit, or an exec)".into(),
        };
        let Some(recs) = shared_counters(&orphan.shm) else {
            continue;
        };
        reports += 1;
        let name = orphan.program.rsplit('/').next().unwrap_or("");
        if o.json {
            json_reports.push(format!(
                "{{\"program\":{},\"report\":{}}}",
                json_str(&orphan.program),
                orphan_json(&orphan.pid, &why, &recs)
            ));
        } else {
            let _ = writeln!(
                out,
                "== probert: pid {} ({name}), {why}: its shared counters ==",
                orphan.pid
            );
            let _ = out.write_all(orphan_text(&recs).as_bytes());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if o.json {
        let _ = writeln!(out, "{{\"reports\":[{}]}}", json_reports.join(","));
    }
    let _ = out.flush();
    if let Some(e) = error {
        return Err(e);
    }
    let status = status.ok_or("lost the program")?;
    if let Some(sig) = status.signal() {
        if reports == 0 && !o.list {
            eprintln!("probert: {shown} was killed by signal {sig}: no report");
        }
        // SAFETY: dying the way the program died.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        return Ok(128 + sig as u8);
    }
    Ok(status.code().unwrap_or(1) as u8)
}

/// One counter of an agent's shared file: tool, function, module, what, value.
type Counter = (String, String, String, String, u64);

/// The counters of an agent's shared file (see agent/src/shared.rs for the
/// layout), or None when it is missing or not one.
fn shared_counters(path: &Path) -> Option<Vec<Counter>> {
    const HEADER: usize = 64;
    const RECORD: usize = 128;
    let data = std::fs::read(path).ok()?;
    if data.len() < HEADER || &data[..8] != b"probert1" {
        return None;
    }
    let word = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap_or_default());
    let used = (word(8) as usize).min((data.len() - HEADER) / RECORD);
    let mut out = Vec::with_capacity(used);
    for i in 0..used {
        let at = HEADER + RECORD * i;
        let mut text = data[at + 8..at + RECORD]
            .split(|&b| b == 0)
            .map(|t| String::from_utf8_lossy(t).into_owned());
        let mut next = || text.next().unwrap_or_default();
        let (tool, function, module, what) = (next(), next(), next(), next());
        if !tool.is_empty() {
            out.push((tool, function, module, what, word(at)));
        }
    }
    Some(out)
}

/// Tools in the order of their first counter, each with its counters.
fn by_tool(recs: &[Counter]) -> Vec<(&str, Vec<&Counter>)> {
    let mut tools: Vec<(&str, Vec<&Counter>)> = Vec::new();
    for r in recs {
        match tools.iter_mut().find(|t| t.0 == r.0) {
            Some(t) => t.1.push(r),
            None => tools.push((&r.0, vec![r])),
        }
    }
    for t in &mut tools {
        t.1.sort_by_key(|r| std::cmp::Reverse(r.4));
    }
    tools
}

/// The table of the count tool's text report, for shared counters.
fn orphan_text(recs: &[Counter]) -> String {
    let mut o = String::new();
    for (tool, rows) in by_tool(recs) {
        let what = rows.first().map_or("", |r| r.3.as_str()).to_uppercase();
        o.push_str(&format!(
            "[{tool}]\n{what:>12}  {:<40} MODULE\n",
            "FUNCTION"
        ));
        for r in rows {
            o.push_str(&format!("{:>12}  {:<40} {}\n", r.4, r.1, r.2));
        }
    }
    o
}

fn orphan_json(pid: &str, why: &str, recs: &[Counter]) -> String {
    let tools: Vec<String> = by_tool(recs)
        .into_iter()
        .map(|(tool, rows)| {
            let rows: Vec<String> = rows
                .iter()
                .map(|r| {
                    format!(
                        "{{\"function\":{},\"module\":{},{}:{}}}",
                        json_str(&r.1),
                        json_str(&r.2),
                        json_str(&r.3),
                        r.4
                    )
                })
                .collect();
            format!("{}:[{}]", json_str(tool), rows.join(","))
        })
        .collect();
    format!(
        "{{\"pid\":{},\"final\":true,\"ended\":{},\"from\":\"shared counters\",\"tools\":{{{}}}}}",
        pid.parse::<u64>().unwrap_or(0),
        json_str(why),
        tools.join(",")
    )
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn signal_name(sig: i32) -> String {
    // SAFETY: strsignal returns NULL or a NUL-terminated string; copied at once.
    let p = unsafe { libc::strsignal(sig) };
    if p.is_null() {
        return format!("signal {sig}");
    }
    // SAFETY: not NULL: NUL-terminated.
    unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned()
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let o = parse(std::env::args_os().skip(1).collect());
    match run(o) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("probert: {e}");
            ExitCode::from(2)
        }
    }
}
