//! The Rust API in one small program: a probe on a function of this program
//! (a closure, detached by its guard) and one on code generated at run time
//! with dynasmrt (a handler function, on a registered JIT region), with the
//! registers each hit saw. The C twin is `examples/c/quickstart.c`; a whole
//! JIT embedding probert is `runtime/examples/bfjit.rs`.
//!
//! Run: `cargo run --release --example quickstart`
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use dynasmrt::{dynasm, DynasmApi};
use probert::{Action, Hit, Reg, RegionDesc};

/// An ordinary function of this program.
#[inline(never)]
extern "C" fn collatz_steps(mut n: u64) -> u64 {
    let mut steps = 0;
    while n > 1 {
        n = if n % 2 == 0 { n / 2 } else { 3 * n + 1 };
        steps += 1;
    }
    steps
}

/// Hits, and a histogram of the first argument's bit length, filled from the
/// handler: atomics only, because handlers run in signal context.
static ENTRY_HITS: AtomicU64 = AtomicU64::new(0);
static ARG_BITS: [AtomicU64; 65] = [const { AtomicU64::new(0) }; 65];
static JIT_HITS: AtomicU64 = AtomicU64::new(0);
static JIT_LAST_RAX: AtomicU64 = AtomicU64::new(0);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    probert::init()?;
    println!(
        "probert {} — probes on live code, in process\n",
        probert::VERSION
    );

    // 1. A probe on a function of our own, through a closure. The guard
    //    detaches when dropped.
    let entry = unsafe {
        // SAFETY: `collatz_steps` is a function of this program; the closure
        // only touches atomics (async-signal-safe).
        probert::probe(collatz_steps as *const () as usize, |hit: &mut Hit| {
            let n = hit.regs().arg(0).unwrap_or(0);
            ENTRY_HITS.fetch_add(1, Ordering::Relaxed);
            ARG_BITS[64 - n.leading_zeros() as usize].fetch_add(1, Ordering::Relaxed);
            Action::Continue
        })?
    };
    let total: u64 = (1..=1000u64).map(|n| collatz_steps(n)).sum();
    println!("collatz_steps(1..=1000) = {total} steps in all");
    println!(
        "  probe at collatz_steps ({:#x}): {} hits",
        collatz_steps as *const () as usize,
        ENTRY_HITS.load(Ordering::Relaxed)
    );
    println!("  argument bit length histogram:");
    for (bits, c) in ARG_BITS.iter().enumerate() {
        let c = c.load(Ordering::Relaxed);
        if c > 0 {
            println!(
                "    {bits:>2} bits {c:>4} {}",
                "#".repeat(c.div_ceil(16) as usize)
            );
        }
    }
    let stats = entry.stats()?;
    entry.detach()?;
    println!(
        "  detached after {} hits ({} missed)\n",
        stats.hits, stats.missed
    );

    // 2. Code generated at run time: f(x) = (x + 1) * 3, emitted with dynasm.
    let mut ops = dynasmrt::x64::Assembler::new()?;
    let start = ops.offset();
    dynasm!(ops
        ; .arch x64
        ; push rbp
        ; mov rbp, rsp
        ; lea rax, [rdi + 1]
        ; imul rax, rax, 3
        ; pop rbp
        ; ret
    );
    let code = ops.finalize().map_err(|_| "finalize failed")?;
    let f: extern "C" fn(u64) -> u64 = unsafe {
        // SAFETY: the buffer holds the function emitted above.
        std::mem::transmute(code.ptr(start))
    };
    let base = code.ptr(start) as usize;
    // A JIT registers the memory it emitted, so probert may patch it...
    let region = probert::region_add(RegionDesc {
        start: base,
        len: code.len(),
        name: "demo-jit".into(),
        write: None,
    })?;
    // ...and probes its instructions: here the `imul` (offset 8), where rax
    // holds x + 1.
    unsafe extern "C" fn on_imul(hit: *mut Hit) -> u32 {
        // SAFETY: the dispatcher passes a valid hit.
        let hit = unsafe { &mut *hit };
        JIT_HITS.fetch_add(1, Ordering::Relaxed);
        JIT_LAST_RAX.store(hit.regs().get(Reg::Rax), Ordering::Relaxed);
        Action::Continue as u32
    }
    let imul = base + 8;
    // SAFETY: `imul` is an instruction boundary of the region (checked by
    // probert from the region's start); the handler touches atomics only.
    let c = unsafe { probert::attach(imul, on_imul, std::ptr::null_mut())? };
    let results: Vec<u64> = (0..5u64).map(|x| f(x)).collect();
    println!("JIT f(x) = (x + 1) * 3 at {base:#x}, {} bytes", code.len());
    println!("  f(0..5) = {results:?}");
    println!(
        "  probe at the imul ({imul:#x}): {} hits, last rax (x + 1) = {}",
        JIT_HITS.load(Ordering::Relaxed),
        JIT_LAST_RAX.load(Ordering::Relaxed)
    );
    let s = probert::stats(c)?;
    // Removing the region detaches its probes and restores the code before
    // the JIT frees or reuses the memory.
    probert::region_remove(region)?;
    println!(
        "  region removed: {} hits, code restored; f(10) = {}",
        s.hits,
        f(10)
    );
    drop(code);

    assert_eq!(results, [3, 6, 9, 12, 15]);
    assert_eq!(s.hits, 5);
    assert_eq!(stats.hits, 1000);
    Ok(())
}
