//! The probe index: address → probe record, behind a *latch* sequence counter,
//! read without locks from the `SIGTRAP` handler.
//!
//! # Why a latch
//!
//! The reader that matters runs in a signal handler and may have interrupted
//! the writer on its own thread: it can never wait for the writer. So the index
//! is kept twice (the kernel's `seqcount_latch`, as in `latch_tree` for
//! NMI-safe module lookups). The counter's low bit picks the copy readers use;
//! the writer
//!
//! 1. bumps the counter (readers move to the other copy),
//! 2. changes the idle copy,
//! 3. bumps the counter again (readers move back),
//! 4. changes the other copy.
//!
//! A reader loads the counter, reads the copy it selects, and re-checks the
//! counter; if it moved, a writer on another thread made progress and the
//! reader retries. A reader interrupting the writer on its own thread always
//! reads the copy the writer is not touching and never retries: the lookup
//! finishes in a bounded number of steps.
//!
//! # Memory
//!
//! Each copy is an open-addressed hash table (linear probing, backward-shift
//! deletion, so no tombstones). Tables are replaced only when they grow; a
//! replaced table is handed back to the caller to free after a grace period,
//! because readers — always inside a read-side section — may still be probing
//! it. Every field a reader touches is an atomic: a speculative read can see a
//! torn state, never undefined behaviour, and its result is discarded.
//!
//! # Safety
//!
//! Readers dereference the table pointers they load. A table is freed only
//! after it was unpublished and a grace period passed ([`RetiredTables`] is given to
//! the caller, who must drop it after `grace::synchronize`), and readers only
//! run inside read-side sections.
#![allow(unsafe_code)]

use crate::sigctx::SignalContext;
use crate::sync::{fence, AtomicUsize, ConstAtomicPtr, ConstAtomicU64, ConstAtomicUsize, Ordering};

/// Key of an empty bucket. Address 0 is never probed.
const EMPTY: usize = 0;
#[cfg(not(all(test, loom)))]
const MIN_CAPACITY: usize = 64;
/// Loom explores every step: keep its tables tiny.
#[cfg(all(test, loom))]
const MIN_CAPACITY: usize = 4;

#[derive(Debug)]
struct Bucket {
    key: AtomicUsize,
    value: AtomicUsize,
}

#[derive(Debug)]
struct Table {
    mask: usize,
    buckets: Box<[Bucket]>,
}

impl Table {
    fn new(capacity: usize) -> Box<Table> {
        debug_assert!(capacity.is_power_of_two());
        let buckets = (0..capacity)
            .map(|_| Bucket {
                key: AtomicUsize::new(EMPTY),
                value: AtomicUsize::new(0),
            })
            .collect();
        Box::new(Table {
            mask: capacity - 1,
            buckets,
        })
    }

    #[inline(always)]
    fn home(&self, key: usize) -> usize {
        // Code addresses share high bits and alignment; mix before masking.
        ((key as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & self.mask
    }

    /// Speculative lookup: bounded by the capacity even on a torn table.
    ///
    /// # Signal safety
    /// Atomic loads and masked indexing only.
    #[inline]
    fn get_speculative(&self, key: usize) -> Option<usize> {
        let mut i = self.home(key);
        for _ in 0..=self.mask {
            let b = &self.buckets[i & self.mask];
            // Ordering: Relaxed — validated by the latch counter re-check in
            // `Index::read_speculative`.
            let k = b.key.load(Ordering::Relaxed);
            if k == key {
                return Some(b.value.load(Ordering::Relaxed));
            }
            if k == EMPTY {
                return None;
            }
            i = i.wrapping_add(1);
        }
        None
    }

    /// Writer only. Inserts or overwrites.
    fn insert(&self, key: usize, value: usize) {
        let mut i = self.home(key);
        loop {
            let b = &self.buckets[i & self.mask];
            // Ordering: Relaxed — this copy is idle (readers are on the other
            // one); publication is by the latch counter's Release.
            let k = b.key.load(Ordering::Relaxed);
            if k == key || k == EMPTY {
                b.value.store(value, Ordering::Relaxed);
                b.key.store(key, Ordering::Relaxed);
                return;
            }
            i = i.wrapping_add(1);
        }
    }

    /// Writer only. Removes with backward-shift deletion.
    fn remove(&self, key: usize) {
        let mask = self.mask;
        let mut i = self.home(key);
        loop {
            // Ordering (all below): Relaxed — idle copy, see `insert`.
            let k = self.buckets[i & mask].key.load(Ordering::Relaxed);
            if k == EMPTY {
                return;
            }
            if k == key {
                break;
            }
            i = i.wrapping_add(1);
        }
        // Shift later members of the cluster back over the hole.
        let mut hole = i & mask;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let k = self.buckets[j].key.load(Ordering::Relaxed);
            if k == EMPTY {
                break;
            }
            let h = self.home(k);
            // Can `k` (home h, at j) move to `hole`? Only if `hole` lies
            // cyclically in [h, j).
            let movable = if hole <= j {
                h <= hole || h > j
            } else {
                h <= hole && h > j
            };
            if movable {
                let v = self.buckets[j].value.load(Ordering::Relaxed);
                self.buckets[hole].value.store(v, Ordering::Relaxed);
                self.buckets[hole].key.store(k, Ordering::Relaxed);
                hole = j;
            }
        }
        self.buckets[hole].key.store(EMPTY, Ordering::Relaxed);
    }

    fn entries(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.buckets.iter().filter_map(|b| {
            // Ordering: Relaxed — writer only, under the writer lock.
            let k = b.key.load(Ordering::Relaxed);
            (k != EMPTY).then(|| (k, b.value.load(Ordering::Relaxed)))
        })
    }
}

/// Tables unpublished by a resize; drop after a grace period.
#[derive(Debug)]
#[allow(clippy::vec_box)] // each table is unpublished by pointer, so it lives in its own box
pub(crate) struct RetiredTables(#[allow(dead_code)] Vec<Box<Table>>);

/// The latch-protected address → value index.
#[derive(Debug)]
pub(crate) struct Index {
    /// The latch counter; its low bit selects the copy readers use.
    seq: ConstAtomicU64,
    copies: [ConstAtomicPtr<Table>; 2],
    /// Writer only (under the writer lock).
    len: ConstAtomicUsize,
}

impl Index {
    /// An index with no tables yet (const, for a `static`). A loom model
    /// must touch it (e.g. insert) before it starts threads (see
    /// [`crate::sync`]).
    pub(crate) const fn new() -> Index {
        Index {
            seq: ConstAtomicU64::new(0),
            copies: [
                ConstAtomicPtr::new(std::ptr::null_mut()),
                ConstAtomicPtr::new(std::ptr::null_mut()),
            ],
            len: ConstAtomicUsize::new(0),
        }
    }

    /// Runs `f` on the value stored for `key` (or `None`) inside a validated
    /// speculative window: `f` may run several times (each run must be
    /// side-effect free), and the result of the run whose window no writer
    /// crossed is returned. Reads `f` makes are validated too, if they read
    /// state that writers change only between latch bumps.
    ///
    /// Must be called inside a read-side section (tables are freed after a
    /// grace period).
    ///
    /// # Signal safety
    /// Loads and fences only; bounded per attempt, and an attempt is repeated
    /// only when a writer on another thread completed a step.
    #[inline]
    pub(crate) fn read_speculative<R>(
        &self,
        _cx: SignalContext,
        key: usize,
        mut f: impl FnMut(Option<usize>) -> R,
    ) -> R {
        loop {
            // Ordering: Acquire — pairs with the Release of `latch_bump`: the
            // selected copy's contents as of the bump are visible.
            let seq = self.seq.load(Ordering::Acquire);
            // Ordering: Acquire — the table's buckets were initialised before
            // the pointer was published (Release in `grow`).
            let table = self.copies[(seq & 1) as usize].load(Ordering::Acquire);
            let found = if table.is_null() {
                None
            } else {
                // SAFETY: a published table is freed only after it was
                // unpublished and a grace period passed; we are inside a
                // read-side section that began before any such grace period
                // could end.
                unsafe { &*table }.get_speculative(key)
            };
            let result = f(found);
            // Ordering: Acquire fence — if any read above saw a store the
            // writer made after a bump, the counter load below sees that bump
            // — pairs with the Release fence in `latch_bump`.
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == seq {
                return result;
            }
            crate::sync::spin_loop();
        }
    }

    /// The latch step: readers move to the other copy.
    fn latch_bump(&self) {
        // Ordering: Relaxed load — the writer is the only one storing `seq`.
        let seq = self.seq.load(Ordering::Relaxed);
        // Ordering: Release — changes to the copy readers are moved *to* are
        // visible to readers that see the new value (Acquire in
        // `read_speculative`).
        self.seq.store(seq + 1, Ordering::Release);
        // Ordering: Release fence — the bump is ordered before the changes to
        // the now-idle copy that follow, so a reader that sees any of them
        // sees the bump on its re-check — pairs with the Acquire fence in
        // `read_speculative`.
        fence(Ordering::Release);
    }

    /// Applies `op` to both copies under the latch protocol. Writer only
    /// (caller holds the writer lock); touches no libc, so it never runs code
    /// a user may have probed while a copy is inconsistent.
    fn update(&self, op: impl Fn(&Table)) {
        for _ in 0..2 {
            self.latch_bump();
            // Ordering: Relaxed — only the writer stores the pointers.
            let idle = self.copies[(self.seq.load(Ordering::Relaxed) & 1 ^ 1) as usize]
                .load(Ordering::Relaxed);
            // SAFETY: the writer owns the tables; readers never write them.
            op(unsafe { &*idle });
        }
    }

    /// Number of entries. Writer only.
    pub(crate) fn len(&self) -> usize {
        // Ordering: Relaxed — writer only.
        self.len.load(Ordering::Relaxed)
    }

    /// Inserts `key → value`. Writer only. Returns tables to free after a
    /// grace period if the index grew.
    pub(crate) fn insert(&self, key: usize, value: usize) -> Option<RetiredTables> {
        debug_assert_ne!(key, EMPTY);
        let retired = self.reserve(self.len() + 1);
        self.update(|t| t.insert(key, value));
        // Ordering: Relaxed — writer only.
        self.len.fetch_add(1, Ordering::Relaxed);
        retired
    }

    /// Changes the value of `key`, which is present. Writer only.
    pub(crate) fn replace(&self, key: usize, value: usize) {
        debug_assert_ne!(key, EMPTY);
        self.update(|t| t.insert(key, value));
    }

    /// Removes `key`. Writer only.
    pub(crate) fn remove(&self, key: usize) {
        self.update(|t| t.remove(key));
        // Ordering: Relaxed — writer only.
        self.len.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether `key` is in the index. Writer only (the writer's own view:
    /// both copies agree outside its updates).
    pub(crate) fn contains(&self, key: usize) -> bool {
        // Ordering: Relaxed — only the writer stores the pointers and the
        // buckets.
        let t = self.copies[0].load(Ordering::Relaxed);
        // SAFETY: the writer owns the tables.
        !t.is_null() && unsafe { &*t }.get_speculative(key).is_some()
    }

    /// Stores every `(key, value)` of `entries` (distinct keys; inserting
    /// or overwriting) in one latch step per copy. Writer only. Returns
    /// tables to free after a grace period if the index grew.
    ///
    /// The entries are applied in the order of their home buckets, so a
    /// large batch walks each table once instead of missing the cache at
    /// every key.
    pub(crate) fn insert_all(&self, entries: &mut [(usize, usize)]) -> Option<RetiredTables> {
        if entries.is_empty() {
            return None;
        }
        debug_assert!(entries.iter().all(|&(k, _)| k != EMPTY));
        self.sort_by_home(entries, |e| e.0);
        let added = entries.iter().filter(|e| !self.contains(e.0)).count();
        let retired = self.reserve(self.len() + added);
        if retired.is_some() {
            // New tables, new homes.
            self.sort_by_home(entries, |e| e.0);
        }
        self.update(|t| {
            for &(k, v) in entries.iter() {
                t.insert(k, v);
            }
        });
        // Ordering: Relaxed — writer only.
        self.len.fetch_add(added, Ordering::Relaxed);
        retired
    }

    /// Removes every key of `keys`, each present, in one latch step per
    /// copy, in the order of their home buckets ([`Index::insert_all`]).
    /// Writer only.
    pub(crate) fn remove_all(&self, keys: &mut [usize]) {
        if keys.is_empty() {
            return;
        }
        self.sort_by_home(keys, |&k| k);
        self.update(|t| {
            for &k in keys.iter() {
                t.remove(k);
            }
        });
        // Ordering: Relaxed — writer only.
        self.len.fetch_sub(keys.len(), Ordering::Relaxed);
    }

    /// Sorts `items` by the home bucket of their key in the current tables
    /// (both copies have the same capacity). Writer only.
    fn sort_by_home<T>(&self, items: &mut [T], key: impl Fn(&T) -> usize) {
        // Ordering: Relaxed — only the writer stores the pointers.
        let t = self.copies[0].load(Ordering::Relaxed);
        if !t.is_null() && items.len() > 1 {
            // SAFETY: the writer owns the tables.
            let t = unsafe { &*t };
            items.sort_unstable_by_key(|x| t.home(key(x)));
        }
    }

    /// Makes room for `n` entries (load factor ≤ 1/2), replacing both copies
    /// if needed. Writer only.
    pub(crate) fn reserve(&self, n: usize) -> Option<RetiredTables> {
        // Ordering: Relaxed — writer only.
        let cur = self.copies[0].load(Ordering::Relaxed);
        let cap = if cur.is_null() {
            0
        } else {
            // SAFETY: the writer owns the tables.
            unsafe { &*cur }.buckets.len()
        };
        if n * 2 <= cap {
            return None;
        }
        let new_cap = (n * 2).next_power_of_two().max(MIN_CAPACITY);
        let mut old = Vec::new();
        for _ in 0..2 {
            self.latch_bump();
            let idle = (self.seq.load(Ordering::Relaxed) & 1 ^ 1) as usize;
            let table = Table::new(new_cap);
            if !cur.is_null() {
                // SAFETY: the writer owns the tables; `cur` is still live.
                for (k, v) in unsafe { &*cur }.entries() {
                    table.insert(k, v);
                }
            }
            // Ordering: Release — the buckets are initialised before readers
            // can load the pointer (Acquire in `read_speculative`).
            let prev = self.copies[idle].swap(Box::into_raw(table), Ordering::Release);
            if !prev.is_null() {
                // SAFETY: `prev` came from `Box::into_raw` and is now
                // unpublished; it is freed by the caller after a grace period.
                old.push(unsafe { Box::from_raw(prev) });
            }
        }
        // Readers end on the table filled last; both copies hold everything.
        Some(RetiredTables(old))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cx() -> SignalContext {
        // SAFETY: tests call only signal-safe functions with it.
        unsafe { SignalContext::new() }
    }

    fn lookup(ix: &Index, k: usize) -> Option<usize> {
        ix.read_speculative(cx(), k, |v| v)
    }

    #[test]
    fn insert_remove_grow_against_a_model() {
        let ix = Index::new();
        let mut model = HashMap::new();
        let mut rng = 0x1234_5678_9abc_def0u64;
        for step in 0..20_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            // Clustered keys (code addresses) exercise backward shifts.
            let key = 0x40_0000 + (rng % 512) as usize * 3;
            if rng & (1 << 40) != 0 {
                match model.entry(key) {
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(step);
                        drop(ix.insert(key, step));
                    }
                    std::collections::hash_map::Entry::Occupied(mut e) if rng & (1 << 41) != 0 => {
                        e.insert(step);
                        ix.replace(key, step);
                    }
                    std::collections::hash_map::Entry::Occupied(_) => {}
                }
            } else if model.remove(&key).is_some() {
                ix.remove(key);
            }
            if step % 97 == 0 {
                for k in (0x40_0000..0x40_0000 + 512 * 3).step_by(3) {
                    assert_eq!(lookup(&ix, k), model.get(&k).copied(), "key {k:#x}");
                }
            }
        }
        assert_eq!(ix.len(), model.len());
    }

    #[test]
    fn batches_insert_overwrite_and_remove_against_a_model() {
        let ix = Index::new();
        let mut model = HashMap::new();
        let mut rng = 0x0bad_cafe_f00d_1234u64;
        for round in 0..300usize {
            // A batch of new keys and keys already present (overwritten),
            // clustered like code addresses, growing the tables on the way.
            let mut batch = Vec::new();
            for _ in 0..(rng % 64) as usize + 1 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let key = 0x40_0000 + (rng % 4096) as usize * 5;
                if batch.iter().any(|&(k, _)| k == key) {
                    continue;
                }
                model.insert(key, round);
                batch.push((key, round));
            }
            if let Some(t) = ix.insert_all(&mut batch) {
                drop(t);
            }
            // Then remove about a third of what is there.
            let mut gone: Vec<usize> = model
                .keys()
                .copied()
                .filter(|k| (k ^ round) % 3 == 0)
                .take(20)
                .collect();
            for k in &gone {
                model.remove(k);
            }
            ix.remove_all(&mut gone);
            assert_eq!(ix.len(), model.len(), "round {round}");
            assert!(model.keys().all(|&k| ix.contains(k)));
            if round % 10 == 0 {
                for k in (0x40_0000..0x40_0000 + 4096 * 5).step_by(5) {
                    assert_eq!(lookup(&ix, k), model.get(&k).copied(), "key {k:#x}");
                }
            }
        }
    }

    #[test]
    fn reader_on_the_writers_thread_sees_the_other_copy() {
        // Simulate a signal arriving mid-update: run a lookup from inside the
        // writer's update of the idle copy.
        let ix = Index::new();
        drop(ix.insert(0x1000, 1));
        let calls = std::cell::Cell::new(0);
        ix.update(|t| {
            // The reader sees the copy not being changed, consistent, and
            // never retries (a retry would spin forever here): the old state
            // while the first copy changes, the new one while the second does.
            let expect = if calls.get() == 0 { Some(1) } else { None };
            assert_eq!(ix.read_speculative(cx(), 0x1000, |v| v), expect);
            t.remove(0x1000);
            calls.set(calls.get() + 1);
        });
        assert_eq!(calls.get(), 2);
    }
}

/// Loom models of the real index: every interleaving and weak-memory outcome
/// of `read_speculative` against `insert`/`remove`, within the preemption
/// bound of [`crate::sync::model`]. Run with
/// `RUSTFLAGS="--cfg loom" cargo test -p probert --release --lib loom`.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    fn cx() -> SignalContext {
        // SAFETY: the models call only signal-safe functions with it.
        unsafe { SignalContext::new() }
    }

    /// Two keys with the same home bucket in a `MIN_CAPACITY` table: the
    /// second sits one bucket on, and removing the first shifts it back —
    /// the update a torn read would get wrong.
    fn colliding_keys() -> (usize, usize) {
        let t = Table::new(MIN_CAPACITY);
        let a = 0x1000;
        let b = (a + 1..)
            .find(|&k| t.home(k) == t.home(a))
            .expect("a colliding key");
        (a, b)
    }

    /// An index holding `a → 10, b → 20`, built before any thread starts.
    fn index_with(a: usize, b: usize) -> Arc<Index> {
        let ix = Arc::new(Index::new());
        // No reader exists yet: the first tables' `Retired` (none) can go.
        drop(ix.insert(a, 10));
        drop(ix.insert(b, 20));
        ix
    }

    /// A reader on another thread sees `b` throughout the removal of `a`
    /// (which moves `b`), and `a` either before or after it.
    #[test]
    fn loom_latch_reader_never_sees_a_torn_index() {
        crate::sync::model(|| {
            let (a, b) = colliding_keys();
            let ix = index_with(a, b);
            let reader = {
                let ix = ix.clone();
                thread::spawn(move || {
                    let got_b = ix.read_speculative(cx(), b, |v| v);
                    let got_a = ix.read_speculative(cx(), a, |v| v);
                    (got_b, got_a)
                })
            };
            ix.remove(a);
            let (got_b, got_a) = reader.join().unwrap();
            assert_eq!(got_b, Some(20), "lost a key that stayed");
            assert!(got_a == Some(10) || got_a.is_none(), "torn: {got_a:?}");
        });
    }

    /// A key's value changes (remove, insert again): a reader sees the old
    /// value, none, or the new one, and never goes back in time.
    #[test]
    fn loom_latch_reader_sees_before_or_after() {
        crate::sync::model(|| {
            let (a, b) = colliding_keys();
            let ix = index_with(a, b);
            let reader = {
                let ix = ix.clone();
                thread::spawn(move || {
                    let first = ix.read_speculative(cx(), a, |v| v);
                    let second = ix.read_speculative(cx(), a, |v| v);
                    (first, second)
                })
            };
            ix.remove(a);
            drop(ix.insert(a, 11));
            let (first, second) = reader.join().unwrap();
            let order = |v: Option<usize>| match v {
                Some(10) => 0,
                None => 1,
                Some(11) => 2,
                torn => panic!("torn read {torn:?}"),
            };
            assert!(order(first) <= order(second), "{first:?} then {second:?}");
        });
    }

    /// A reader on the writer's own thread (a signal arriving mid-update,
    /// modelled by a lookup inside the update) reads the copy not being
    /// changed and never retries, while another thread reads too.
    #[test]
    fn loom_latch_reader_inside_the_update_never_retries() {
        crate::sync::model(|| {
            let (a, b) = colliding_keys();
            let ix = index_with(a, b);
            let reader = {
                let ix = ix.clone();
                thread::spawn(move || ix.read_speculative(cx(), b, |v| v))
            };
            let step = std::cell::Cell::new(0);
            ix.update(|t| {
                let mut runs = 0;
                let got = ix.read_speculative(cx(), a, |v| {
                    runs += 1;
                    v
                });
                assert_eq!(runs, 1, "the writer's own reader retried");
                // The old state while the first copy changes, the new one
                // while the second does.
                let expect = if step.get() == 0 { Some(10) } else { None };
                assert_eq!(got, expect);
                t.remove(a);
                step.set(step.get() + 1);
            });
            assert_eq!(reader.join().unwrap(), Some(20));
        });
    }
}
