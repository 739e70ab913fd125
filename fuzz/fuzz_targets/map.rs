//! Model-based fuzzing of the probe index (the latch map).
//!
//! The input is a script of insertions and removals of clustered keys (code
//! addresses collide in the hash, so removals exercise backward shifts and
//! growth replaces the tables). One writer applies it to the real index and
//! to a `BTreeMap` model; after every step every key must match the model. A
//! second thread meanwhile runs speculative lookups, as the trap handler does:
//! each must return what the model held at some point during the lookup (the
//! writer's step counters bound the window), never a value no state had.
#![no_main]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use libfuzzer_sys::fuzz_target;
use probert::__fuzz::LatchIndex;

const KEYS: usize = 96;
const MAX_OPS: usize = 512;

/// One index for all inputs (each input starts and ends empty), so growth
/// happens once and no table leaks per input.
static INDEX: LatchIndex = LatchIndex::new();

fn key(k: usize) -> usize {
    // Code addresses: one region, odd spacing; 0 is never a key.
    0x7f00_0040_0000 + k * 3
}

/// `(key index, Some(value) to insert | None to remove)`, already filtered to
/// what the runtime does: insert absent keys, remove present ones.
fn script(data: &[u8]) -> Vec<(usize, Option<usize>)> {
    let mut present = BTreeMap::new();
    let mut ops = Vec::new();
    for (i, pair) in data.chunks_exact(2).take(MAX_OPS).enumerate() {
        let k = usize::from(pair[1]) % KEYS;
        let insert = pair[0] & 1 == 0;
        if insert && !present.contains_key(&k) {
            present.insert(k, i + 1);
            ops.push((k, Some(i + 1)));
        } else if !insert && present.remove(&k).is_some() {
            ops.push((k, None));
        }
    }
    ops
}

/// The value of key `k` after the first `n` ops.
fn model_at(ops: &[(usize, Option<usize>)], k: usize, n: usize) -> Option<usize> {
    ops[..n]
        .iter()
        .rev()
        .find(|(key, _)| *key == k)
        .and_then(|(_, v)| *v)
}

fuzz_target!(|data: &[u8]| {
    let ops = script(data);
    // Steps begun and steps completed by the writer.
    let started = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let mut model = BTreeMap::new();
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut checks = 0u64;
            let mut k = 0;
            // At least one pass even if the writer is already done.
            while !stop.load(Ordering::Acquire) || checks < KEYS as u64 {
                k = (k + 7) % KEYS;
                // Ordering: Acquire — the steps counted are complete.
                let lo = done.load(Ordering::Acquire);
                let got = INDEX.lookup(key(k));
                // Ordering: Acquire — no step after `hi` had begun.
                let hi = started.load(Ordering::Acquire);
                assert!(
                    (lo..=hi).any(|n| model_at(&ops, k, n) == got),
                    "lookup of key {k} returned {got:?}, which no state between \
                     step {lo} and step {hi} held"
                );
                checks += 1;
            }
            checks
        });
        for (i, &(k, v)) in ops.iter().enumerate() {
            // Ordering: Release — pairs with the reader's Acquire loads.
            started.store(i + 1, Ordering::Release);
            match v {
                Some(v) => {
                    INDEX.insert(key(k), v);
                    model.insert(k, v);
                }
                None => {
                    INDEX.remove(key(k));
                    model.remove(&k);
                }
            }
            done.store(i + 1, Ordering::Release);
            if i % 64 == 0 {
                for k in 0..KEYS {
                    assert_eq!(INDEX.lookup(key(k)), model.get(&k).copied(), "key {k}");
                }
            }
        }
        stop.store(true, Ordering::Release);
        assert!(reader.join().expect("the reader panicked") >= KEYS as u64);
    });
    for k in 0..KEYS {
        assert_eq!(INDEX.lookup(key(k)), model.get(&k).copied(), "key {k}");
    }
    assert_eq!(INDEX.len(), model.len());
    // Leave the index empty for the next input.
    for k in model.keys() {
        INDEX.remove(key(*k));
    }
    assert!(INDEX.is_empty());
    for k in 0..KEYS {
        assert_eq!(INDEX.lookup(key(k)), None);
    }
    INDEX.collect();
});
