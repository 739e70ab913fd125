//! Attach/detach churn: RSS and executable stub memory after many
//! attach/detach cycles of one fast probe, then of one trap probe, as a
//! user makes them (no `recycle_stubs`). Prints a row every tenth of the
//! run; memory that keeps growing is a leak.
//!
//! ```text
//! cargo run --release --example churn -- [cycles per mode, default 1000000]
//! ```
#![allow(unsafe_code)]
// The targets are assembly; every unsafe block is a call of one of them or
// the attach that names them.
#![allow(clippy::undocumented_unsafe_blocks)]

use std::arch::global_asm;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use probert::{Action, Hit, Mode};

global_asm!(
    r#"
    .text
    .p2align 4
    .globl churn_nop5
    .type churn_nop5,@function
churn_nop5:                   // a 5-byte NOP site (fast) → rdi + 9
    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00
    lea rax, [rdi + 9]
    ret
    .size churn_nop5, .-churn_nop5
    .p2align 4
    .globl churn_lea
    .type churn_lea,@function
churn_lea:                    // lea runs out of line on the trap path → rdi + 1
    lea rax, [rdi + 1]
    ret
    .size churn_lea, .-churn_lea
"#
);

extern "C" {
    fn churn_nop5(x: u64) -> u64;
    fn churn_lea(x: u64) -> u64;
}

static HITS: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" fn count(_: *mut Hit) -> u32 {
    HITS.fetch_add(1, Ordering::Relaxed);
    Action::Continue as u32
}

/// Resident set size, KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Anonymous executable mappings (probert's stub chunks): (bytes, lines).
fn exec_anon() -> (usize, usize) {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let spans: Vec<usize> = maps
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != 5 || !f[1].starts_with("r-x") {
                return None;
            }
            let (a, b) = f[0].split_once('-')?;
            Some(usize::from_str_radix(b, 16).ok()? - usize::from_str_radix(a, 16).ok()?)
        })
        .collect();
    (spans.iter().sum(), spans.len())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into())
}

fn churn(
    name: &str,
    site: usize,
    mode: Mode,
    call: unsafe extern "C" fn(u64) -> u64,
    k: u64,
    cycles: u64,
) {
    // One cycle first: probert's own start-up is not the churn's.
    let id =
        unsafe { probert::attach_ex(site, count, std::ptr::null_mut(), mode) }.expect("attach");
    probert::detach(id).expect("detach");
    let (rss0, (exec0, _)) = (rss_kib(), exec_anon());
    println!(
        "{name}: start: RSS {rss0} KiB, executable anonymous {} KiB",
        exec0 / 1024
    );
    println!(
        "{:>10} {:>10} {:>12} {:>8} {:>14} {:>8}",
        "cycles", "RSS KiB", "exec KiB", "maps", "retired stubs", "s"
    );
    let t0 = Instant::now();
    let before = HITS.load(Ordering::Relaxed);
    for i in 1..=cycles {
        let id =
            unsafe { probert::attach_ex(site, count, std::ptr::null_mut(), mode) }.expect("attach");
        assert_eq!(unsafe { call(i) }, i + k);
        probert::detach(id).expect("detach");
        if i % (cycles / 10).max(1) == 0 {
            let (exec, lines) = exec_anon();
            let (g, s) = probert::retired_stubs();
            println!(
                "{i:>10} {:>10} {:>12} {lines:>8} {:>14} {:>8.1}",
                rss_kib(),
                exec / 1024,
                format!("{g}+{s}"),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    assert_eq!(
        HITS.load(Ordering::Relaxed) - before,
        cycles,
        "one hit per cycle"
    );
    assert_eq!(probert::probe_count(), 0);
}

fn main() {
    let cycles: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("cycles: a number"))
        .unwrap_or(1_000_000);
    println!(
        "CPU: {}; {cycles} cycles per mode, no recycle_stubs",
        cpu_model()
    );
    churn(
        "fast",
        churn_nop5 as *const () as usize,
        Mode::Fast,
        churn_nop5,
        9,
        cycles,
    );
    churn(
        "trap",
        churn_lea as *const () as usize,
        Mode::Trap,
        churn_lea,
        1,
        cycles,
    );
}
