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

/// The agent library: $PROBERT_AGENT, next to this executable, or in ../lib.
fn agent() -> Result<PathBuf, String> {
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
    Err(format!(
        "the agent libprobert_agent.so is not next to {} (build it with `cargo build --release -p probert-agent`, or set PROBERT_AGENT)",
        exe.display()
    ))
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    pid: String,
    program: String,
}

enum Frame {
    Hello(String, String),
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
                let (pid, prog) = payload.split_once('\0').unwrap_or((&payload, ""));
                Frame::Hello(pid.into(), prog.into())
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
    let agent = agent()?;
    let dir = std::env::temp_dir().join(format!("probert-{}-{}", std::process::id(), nanos()));
    std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| e.to_string())?;
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
    loop {
        while let Ok((s, _)) = listener.accept() {
            let _ = s.set_nonblocking(true);
            conns.push(Conn {
                stream: s,
                buf: Vec::new(),
                pid: "?".into(),
                program: String::new(),
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
                    Frame::Hello(pid, prog) => {
                        c.pid = pid;
                        c.program = prog;
                    }
                    Frame::List(t) => {
                        let _ = std::io::stdout().write_all(t.as_bytes());
                    }
                    Frame::Error(e) => error = Some(e),
                    Frame::Report(fin, t) => {
                        reports += usize::from(fin);
                        if o.json {
                            json_reports.push(format!(
                                "{{\"program\":\"{}\",\"report\":{t}}}",
                                c.program.replace('\\', "\\\\").replace('"', "\\\"")
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
            conns.remove(i);
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
