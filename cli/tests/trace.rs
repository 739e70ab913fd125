//! `probert trace` and `probert list` on real programs: Debian's `ls`,
//! `sqlite3`, `gzip`, `python3`, and a C workload whose counts are known.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn probert() -> Command {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_probert"));
    // The copy the command carries (built from the same sources by its
    // build script), unless an agent built beside it (`cargo build -p
    // probert-agent`) is at least as new as the command: an older one is
    // from other sources (`cargo test` does not build the cdylib).
    let agent = bin.with_file_name("libprobert_agent.so");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let fresh = matches!(
        (modified(&agent), modified(&bin)),
        (Some(a), Some(b)) if a >= b
    );
    let mut c = Command::new(bin);
    if fresh {
        c.env("PROBERT_AGENT", agent);
    }
    c
}

fn tmp() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("probert-cli");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn cc(src: &str, out: &str, args: &[&str]) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tmp().join(out);
    let st = Command::new("cc")
        .args(["-O1", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root.join("include"))
        .arg(root.join(src))
        .args(args)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "cc {src}");
    out
}

fn workload() -> PathBuf {
    static W: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    W.get_or_init(|| cc("cli/tests/c/workload.c", "workload", &["-ldl"]))
        .clone()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The hits column of `func`'s row in the count table.
fn hits(report: &str, func: &str) -> Vec<u64> {
    report
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 2 && w[1] == func)
                .then(|| w[0].parse().ok())
                .flatten()
        })
        .collect()
}

fn trace(args: &[&str], prog: &[&str]) -> (Output, Output) {
    let plain = Command::new(prog[0]).args(&prog[1..]).output().unwrap();
    let traced = probert()
        .arg("trace")
        .args(args)
        .arg("--")
        .args(prog)
        .output()
        .unwrap();
    (plain, traced)
}

#[test]
fn ls_output_and_status_unchanged() {
    let (plain, traced) = trace(
        &["-p", "libc.so.6:opendir", "-p", "readdir"],
        &["ls", "-la", "/usr/bin"],
    );
    assert_eq!(plain.stdout, traced.stdout);
    assert_eq!(plain.status.code(), traced.status.code());
    let r = text(&traced.stderr);
    assert_eq!(hits(&r, "opendir"), vec![1], "{r}");
    assert!(hits(&r, "readdir")[0] > 10, "{r}");
    // A failing ls keeps its status (2) and its own error message.
    let (plain, traced) = trace(&["-p", "opendir"], &["ls", "/nonexistent-dir"]);
    assert_eq!(plain.status.code(), Some(2));
    assert_eq!(traced.status.code(), Some(2));
    assert!(text(&traced.stderr).contains(&text(&plain.stderr)));
}

#[test]
fn exact_counts_dlopen_latency_and_exit_status() {
    let w = workload();
    let w = w.to_str().unwrap();
    let (plain, traced) = trace(
        &["-p", "work", "-p", "libz.so*:crc32", "--latency"],
        &[w, "1000", "37"],
    );
    assert_eq!(plain.stdout, traced.stdout);
    assert_eq!(traced.status.code(), Some(1000 % 7));
    let r = text(&traced.stderr);
    assert_eq!(hits(&r, "work"), vec![1000], "{r}");
    // libz is loaded by dlopen after main started.
    assert_eq!(hits(&r, "crc32"), vec![37], "{r}");
    let lat = r.split("[latency]").nth(1).expect("latency table");
    let row: Vec<&str> = lat
        .lines()
        .find(|l| l.contains("work ("))
        .unwrap()
        .split_whitespace()
        .collect();
    let n: Vec<u64> = row[..5].iter().map(|v| v.parse().unwrap()).collect();
    assert_eq!(n[0], 1000, "{lat}");
    assert!(n[1] <= n[2] && n[2] <= n[3] && n[3] <= n[4], "{lat}");
}

#[test]
fn follow_fork_and_exec() {
    let w = workload();
    let w = w.to_str().unwrap();
    // Without -f only the parent is traced.
    let (_, t) = trace(&["-p", "work"], &[w, "10", "0", "5"]);
    assert_eq!(hits(&text(&t.stderr), "work"), vec![10]);
    // With -f the child of fork reports its own 5 calls.
    let (plain, t) = trace(&["-f", "-p", "work"], &[w, "10", "0", "5"]);
    assert_eq!(plain.stdout, t.stdout);
    let mut h = hits(&text(&t.stderr), "work");
    h.sort();
    assert_eq!(h, vec![5, 10], "{}", text(&t.stderr));
    // And across exec: sh runs the workload.
    let script = format!("{w} 4; {w} 6");
    let (_, t) = trace(&["-f", "-p", "workload:work"], &["sh", "-c", &script]);
    let mut h = hits(&text(&t.stderr), "work");
    h.sort();
    assert_eq!(h, vec![4, 6], "{}", text(&t.stderr));
}

#[test]
fn plugin_in_c_and_json() {
    let so = cc("examples/tools/calls.c", "calls.so", &["-shared", "-fPIC"]);
    let w = workload();
    let out = probert()
        .args(["trace", "--json", "-p", "work", "--tool"])
        .arg(&so)
        .arg("--")
        .args([w.to_str().unwrap(), "21"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let r = text(&out.stderr);
    assert!(r.starts_with("{\"reports\":[{"), "{r}");
    assert!(
        r.contains("\"count\":[{\"function\":\"work\",\"module\":\"workload\",\"hits\":21}]"),
        "{r}"
    );
    assert!(
        r.contains("\"calls\":{\"sites\":1,\"calls\":21,\"busiest\":\"work\",\"final\":1}"),
        "{r}"
    );
}

#[test]
fn sqlite3_and_gzip_and_python() {
    if Path::new("/usr/bin/sqlite3").exists() {
        let sql = "create table t(x); insert into t values(1),(2),(3); select sum(x) from t;";
        let (plain, t) = trace(
            &["-p", "libsqlite3.so*:sqlite3_prepare_v2", "--args"],
            &["sqlite3", ":memory:", sql],
        );
        assert_eq!(plain.stdout, t.stdout);
        assert_eq!(text(&t.stdout), "6\n");
        assert!(text(&t.stderr).contains("[args]"), "{}", text(&t.stderr));
    }
    let (plain, t) = trace(
        &["-p", "libc.so.6:malloc", "--latency"],
        &["gzip", "-c", "/etc/os-release"],
    );
    assert_eq!(plain.stdout, t.stdout);
    assert_eq!(t.status.code(), Some(0));
    let (plain, t) = trace(
        &["-p", "libc.so.6:getenv"],
        &["python3", "-c", "print(6*7)"],
    );
    assert_eq!(plain.stdout, t.stdout);
    assert_eq!(text(&t.stdout), "42\n");
}

#[test]
fn drcov_file() {
    let w = workload();
    let file = tmp().join("cov.drcov");
    let _ = std::fs::remove_file(&file);
    let t = probert()
        .args([
            "trace",
            "-p",
            "workload:work",
            "-p",
            "workload:main",
            "--tool",
        ])
        .arg(format!("drcov={}", file.display()))
        .arg("--")
        .args([w.to_str().unwrap(), "3"])
        .output()
        .unwrap();
    assert_eq!(t.status.code(), Some(3));
    let data = std::fs::read(&file).expect("drcov file");
    let head = String::from_utf8_lossy(&data).into_owned();
    assert!(head.starts_with("DRCOV VERSION: 2\n"), "{head}");
    let n: usize = head
        .split("BB Table: ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let table = data.len() - (data.windows(5).position(|x| x == b" bbs\n").unwrap() + 5);
    assert!(n >= 2, "{head}");
    assert_eq!(table, n * 8);
}

#[test]
fn errors_a_person_can_act_on() {
    let t = probert()
        .args(["trace", "-p", "mallok", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(t.status.code(), Some(2));
    let e = text(&t.stderr);
    assert!(e.contains("closest: malloc (libc.so.6)"), "{e}");
    let t = probert()
        .args(["trace", "-p", "x", "--", "no-such-program-here"])
        .output()
        .unwrap();
    assert_eq!(
        text(&t.stderr),
        "probert: no-such-program-here: command not found\n"
    );
    let t = probert().args(["trace", "--bogus"]).output().unwrap();
    assert_eq!(t.status.code(), Some(2));
    assert!(text(&t.stderr).contains("usage: probert trace"));
    let st = tmp().join("static");
    std::fs::write(tmp().join("s.c"), "int main(void){return 0;}\n").unwrap();
    if Command::new("cc")
        .arg("-static")
        .arg(tmp().join("s.c"))
        .arg("-o")
        .arg(&st)
        .status()
        .unwrap()
        .success()
    {
        let t = probert()
            .args(["trace", "-p", "x", "--"])
            .arg(&st)
            .output()
            .unwrap();
        assert!(
            text(&t.stderr).contains("is statically linked"),
            "{}",
            text(&t.stderr)
        );
    }
    let t = probert()
        .args(["trace", "-p", "x", "--", "/usr/bin/passwd"])
        .output()
        .unwrap();
    if Path::new("/usr/bin/passwd").exists() {
        assert!(text(&t.stderr).contains("setuid"), "{}", text(&t.stderr));
    }
}

#[test]
fn list_shows_matches_without_running() {
    let w = workload();
    let t = probert()
        .args(["list", "work", "libc.so.6:fopen"])
        .arg("--")
        .arg(&w)
        .output()
        .unwrap();
    assert_eq!(t.status.code(), Some(0));
    let o = text(&t.stdout);
    assert!(o.contains("  work  workload  [work]"), "{o}");
    assert!(o.contains("  fopen  libc.so.6  [libc.so.6:fopen]"), "{o}");
    assert!(o.ends_with("2 match(es)\n"), "{o}");
    assert!(!o.contains("sum "), "the program ran: {o}");
}

#[test]
fn failed_attaches_are_reported() {
    let w = workload();
    let w = w.to_str().unwrap();
    // crc32 of libz (dlopen'ed RTLD_NOW) ends in a tail jump through its
    // PLT to crc32_z, whose returns are its own: both tools attach (the
    // PLT stub is followed through its own GOT slot alone, not the others'
    // — one of which leads into memcpy, where no return probe can go).
    let (_, t) = trace(
        &["-p", "libz.so*:crc32", "-p", "work+1", "--latency"],
        &[w, "5", "4"],
    );
    let r = text(&t.stderr);
    assert_eq!(hits(&r, "crc32"), vec![4], "{r}");
    assert!(!r.contains("not attached: crc32"), "{r}");
    let lat = r.split("[latency]").nth(1).expect("latency table");
    let calls: Vec<u64> = lat
        .lines()
        .filter(|l| l.contains("crc32 (libz.so.1)"))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(calls, vec![4], "{lat}");
    // work+1 is inside an instruction: neither tool can attach, and each
    // says so, with the reason.
    assert!(
        r.contains("not attached: work+0x1 (workload) [count, spec 'work+1']: ")
            && r.contains("is not on an instruction boundary"),
        "{r}"
    );
    assert!(
        r.contains("not attached: work+0x1 (workload) [latency, spec 'work+1']: latency needs a function's entry"),
        "{r}"
    );
    let t = probert()
        .args([
            "trace", "--json", "-p", "work+1", "-p", "work", "--", w, "2",
        ])
        .output()
        .unwrap();
    let r = text(&t.stderr);
    assert!(
        r.contains("\"not_attached\":[{\"tool\":\"count\",\"spec\":\"work+1\",\"function\":\"work+0x1\",\"module\":\"workload\",\"reason\":\""),
        "{r}"
    );
    assert!(r.contains("\"hits\":2}"), "{r}");
}

#[test]
fn interval_reports_repeat() {
    let w = workload();
    let (plain, t) = trace(
        &["-p", "work", "--interval", "0.25"],
        &[w.to_str().unwrap(), "50", "0", "-1", "sleep:2000"],
    );
    assert_eq!(plain.stdout, t.stdout);
    assert_eq!(t.status.code(), Some(1));
    let r = text(&t.stderr);
    let heads: Vec<&str> = r
        .lines()
        .filter(|l| l.starts_with("== probert: pid "))
        .collect();
    let intervals = heads
        .iter()
        .filter(|l| l.ends_with(", interval =="))
        .count();
    assert!(intervals >= 2, "{r}");
    // The final report comes last, once; every report has the count table.
    assert_eq!(
        heads.last().map(|h| h.ends_with(", at exit ==")),
        Some(true),
        "{r}"
    );
    assert_eq!(heads.len(), intervals + 1, "{r}");
    let h = hits(&r, "work");
    assert_eq!(h.len(), heads.len(), "{r}");
    assert!(h.iter().all(|&n| n <= 50), "{r}");
    assert_eq!(h.last(), Some(&50), "{r}");
    // With --json, one document holds every report.
    let t = probert()
        .args(["trace", "--json", "-p", "work", "--interval", "0.25", "--"])
        .args([w.to_str().unwrap(), "3", "0", "-1", "sleep:1000"])
        .output()
        .unwrap();
    let r = text(&t.stderr);
    assert!(r.starts_with("{\"reports\":[{"), "{r}");
    assert!(r.matches("\"final\":false").count() >= 2, "{r}");
    assert_eq!(r.matches("\"final\":true").count(), 1, "{r}");
}

#[test]
fn output_file() {
    let w = workload();
    let file = tmp().join("report.txt");
    let _ = std::fs::remove_file(&file);
    let plain = Command::new(&w).args(["7"]).output().unwrap();
    let t = probert()
        .args(["trace", "-p", "work", "-o"])
        .arg(&file)
        .arg("--")
        .args([w.to_str().unwrap(), "7"])
        .output()
        .unwrap();
    assert_eq!(t.status.code(), Some(0));
    assert_eq!(plain.stdout, t.stdout);
    // Nothing on the terminal: the program's stderr is empty, and so is ours.
    assert_eq!(text(&t.stderr), "");
    let r = std::fs::read_to_string(&file).unwrap();
    assert!(r.starts_with("== probert: pid "), "{r}");
    assert_eq!(hits(&r, "work"), vec![7], "{r}");
    // -o with --json: the file is one JSON document.
    let t = probert()
        .args(["trace", "--json", "-p", "work", "-o"])
        .arg(&file)
        .arg("--")
        .args([w.to_str().unwrap(), "4"])
        .output()
        .unwrap();
    assert_eq!(text(&t.stderr), "");
    let r = std::fs::read_to_string(&file).unwrap();
    assert!(
        r.starts_with("{\"reports\":[") && r.ends_with("]}\n"),
        "{r}"
    );
    assert!(r.contains("\"hits\":4}"), "{r}");
}

#[test]
fn report_after_signals_and_exit_without_handlers() {
    use std::os::unix::process::ExitStatusExt;
    let w = workload();
    let w = w.to_str().unwrap();
    for (end, signal, code, why) in [
        ("kill", Some(9), None, "killed by signal 9"),
        ("segv", Some(11), None, "killed by signal 11"),
        (
            "_exit",
            None,
            Some(9),
            "exited with status 9 without running exit handlers",
        ),
    ] {
        let (plain, t) = trace(
            &["-p", "work", "-p", "libz.so*:crc32"],
            &[w, "123", "5", "-1", end],
        );
        assert_eq!(plain.stdout, t.stdout, "{end}");
        assert_eq!(plain.status.signal(), signal, "{end}");
        assert_eq!(t.status.signal(), signal, "{end}");
        assert_eq!(t.status.code(), code, "{end}");
        let r = text(&t.stderr);
        assert!(r.contains(why), "{end}: {r}");
        assert_eq!(hits(&r, "work"), vec![123], "{end}: {r}");
        assert_eq!(hits(&r, "crc32"), vec![5], "{end}: {r}");
    }
    // In JSON too; and a followed child that dies reports on its own.
    let t = probert()
        .args([
            "trace", "--json", "-f", "-p", "work", "--", w, "6", "0", "2", "kill",
        ])
        .output()
        .unwrap();
    let r = text(&t.stderr);
    assert!(
        r.contains("\"ended\":\"killed by signal 9 (Killed)\""),
        "{r}"
    );
    assert!(
        r.contains("{\"function\":\"work\",\"module\":\"workload\",\"hits\":6}"),
        "{r}"
    );
    // The child of the fork (its own 2 calls after it) exited normally.
    assert!(
        r.contains("{\"function\":\"work\",\"module\":\"workload\",\"hits\":2}"),
        "{r}"
    );
}

#[test]
fn the_command_carries_its_agent() {
    // The binary alone, as `cargo install --path cli` installs it: no
    // PROBERT_AGENT, no agent next to it.
    let alone = tmp().join("alone");
    let cache = tmp().join("cache");
    let _ = std::fs::remove_dir_all(&alone);
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(&alone).unwrap();
    let bin = alone.join("probert");
    std::fs::copy(env!("CARGO_BIN_EXE_probert"), &bin).unwrap();
    let w = workload();
    for _ in 0..2 {
        let t = Command::new(&bin)
            .env_remove("PROBERT_AGENT")
            .env("XDG_CACHE_HOME", &cache)
            .args(["trace", "-p", "work", "--"])
            .args([w.to_str().unwrap(), "11"])
            .output()
            .unwrap();
        let r = text(&t.stderr);
        assert_eq!(t.status.code(), Some(4), "{r}");
        assert_eq!(hits(&r, "work"), vec![11], "{r}");
    }
    // Written once to the cache, named by its contents.
    let cached: Vec<_> = std::fs::read_dir(cache.join("probert"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert!(cached[0].starts_with("libprobert_agent-"), "{cached:?}");
}

#[test]
fn counts_equal_an_ld_preload_interposer() {
    // Separate runs of deterministic programs: the interposer's count of
    // calls bound to readdir (cli/tests/c/count_readdir.c) against probert's
    // hits on libc's readdir.
    let so = cc(
        "cli/tests/c/count_readdir.c",
        "count_readdir.so",
        &["-shared", "-fPIC", "-ldl"],
    );
    for (i, prog) in [
        &["ls", "-la", "/usr/bin"][..],
        &["ls", "-R", "/usr/share/doc"][..],
        &["find", "/usr/include"][..],
    ]
    .iter()
    .enumerate()
    {
        let file = tmp().join(format!("count-{i}"));
        let _ = std::fs::remove_file(&file);
        let st = Command::new(prog[0])
            .args(&prog[1..])
            .env("LD_PRELOAD", &so)
            .env("COUNT_FILE", &file)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "{prog:?}");
        let want: u64 = std::fs::read_to_string(&file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(want > 10, "{prog:?}: {want}");
        let t = probert()
            .args(["trace", "-p", "libc.so.6:readdir", "--"])
            .args(*prog)
            .output()
            .unwrap();
        let r = text(&t.stderr);
        assert_eq!(hits(&r, "readdir"), vec![want], "{prog:?}: {r}");
    }
}

#[test]
fn the_agents_own_calls_are_not_counted() {
    // malloc, which the agent calls too (its runtime, at a thread's exit,
    // after the report began...): the program's calls only, as an
    // interposer counts them (cli/tests/c/count_malloc.c).
    let so = cc(
        "cli/tests/c/count_malloc.c",
        "count_malloc.so",
        &["-shared", "-fPIC", "-ldl"],
    );
    let w = workload();
    for (i, args) in [&["5"][..], &["5", "3"][..], &["40", "10"][..]]
        .iter()
        .enumerate()
    {
        let file = tmp().join(format!("malloc-{i}"));
        let _ = std::fs::remove_file(&file);
        let st = Command::new(&w)
            .args(*args)
            .env("LD_PRELOAD", &so)
            .env("COUNT_FILE", &file)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.code().is_some(), "{args:?}");
        let want: u64 = std::fs::read_to_string(&file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(want >= 1, "{args:?}: {want}");
        let t = probert()
            .args(["trace", "-p", "libc.so.6:malloc", "--"])
            .arg(&w)
            .args(*args)
            .output()
            .unwrap();
        let r = text(&t.stderr);
        assert_eq!(hits(&r, "malloc"), vec![want], "{args:?}: {r}");
    }
}
