//! Loom models of the latch map (`map.rs`) and the grace-period algorithm
//! (`grace.rs`): every interleaving and every weak-memory outcome loom can
//! produce, checked exhaustively.
//!
//! These are *models*: copies of the two algorithms' atomic steps with the
//! same orderings, in `loom` types, not the production code compiled against
//! loom. Keep them in step with `map.rs` and `grace.rs` (each step below
//! names the function it models). Two substitutions, because loom cannot
//! express the real thing:
//!
//! - the reader's non-locked `inc` of its slot (`grace::slot_inc`) is a load
//!   and a store: it has a single writer, so that is what it is;
//! - `membarrier()` (a full barrier executed *on every running thread*) is
//!   modelled as `fence(SeqCst)` on the writer plus a `fence(SeqCst)` on the
//!   reader right after it enters: membarrier gives the reader that fence
//!   without the reader paying for it. Loom cannot model a barrier one thread
//!   forces onto another.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p probert --release --test loom`.
#![cfg(loom)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

/// The latch map reduced to one bucket per copy: a key and a value, read
/// without locks. The writer moves the entry from (1, 10) to (2, 20); a reader
/// must return a pair some state held — never a torn (1, 20) or (2, 10).
struct Latch {
    seq: AtomicU64,
    key: [AtomicUsize; 2],
    value: [AtomicUsize; 2],
}

impl Latch {
    /// `Index::latch_bump`.
    fn bump(&self) {
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq + 1, Ordering::Release);
        fence(Ordering::Release);
    }

    /// `Index::update` with `Table::insert`'s stores (value, then key).
    fn update(&self, key: usize, value: usize) {
        for _ in 0..2 {
            self.bump();
            let idle = ((self.seq.load(Ordering::Relaxed) & 1) ^ 1) as usize;
            self.value[idle].store(value, Ordering::Relaxed);
            self.key[idle].store(key, Ordering::Relaxed);
        }
    }

    /// `Index::read_speculative` with `Table::get_speculative`'s loads.
    fn read(&self) -> (usize, usize) {
        loop {
            let seq = self.seq.load(Ordering::Acquire);
            let c = (seq & 1) as usize;
            let k = self.key[c].load(Ordering::Relaxed);
            let v = self.value[c].load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == seq {
                return (k, v);
            }
            thread::yield_now();
        }
    }
}

#[test]
fn latch_readers_never_see_a_torn_entry() {
    loom::model(|| {
        let l = Arc::new(Latch {
            seq: AtomicU64::new(0),
            key: [AtomicUsize::new(1), AtomicUsize::new(1)],
            value: [AtomicUsize::new(10), AtomicUsize::new(10)],
        });
        let reader = {
            let l = l.clone();
            thread::spawn(move || {
                let first = l.read();
                let second = l.read();
                (first, second)
            })
        };
        l.update(2, 20);
        // A reader on the writer's own thread, after the update.
        assert_eq!(l.read(), (2, 20));
        let (first, second) = reader.join().unwrap();
        for got in [first, second] {
            assert!(got == (1, 10) || got == (2, 20), "torn read {got:?}");
        }
        // Reads on one thread never go back in time.
        assert!(
            !(first == (2, 20) && second == (1, 10)),
            "went back: {first:?} {second:?}"
        );
    });
}

/// Two updates in a row: a reader retries across both and still sees a
/// whole state.
#[test]
fn latch_survives_back_to_back_updates() {
    loom::model(|| {
        let l = Arc::new(Latch {
            seq: AtomicU64::new(0),
            key: [AtomicUsize::new(1), AtomicUsize::new(1)],
            value: [AtomicUsize::new(10), AtomicUsize::new(10)],
        });
        let reader = {
            let l = l.clone();
            thread::spawn(move || l.read())
        };
        l.update(2, 20);
        l.update(3, 30);
        let got = reader.join().unwrap();
        assert!(
            [(1, 10), (2, 20), (3, 30)].contains(&got),
            "torn read {got:?}"
        );
    });
}

/// The grace period. A reader enters a section, loads the published pointer,
/// and reads the object; the writer unpublishes it, waits one grace period
/// and frees it (a write to the `UnsafeCell`: loom reports a data race if the
/// reader's read is not ordered before it).
struct Grace {
    /// The reader's slot: odd inside a section.
    slot: AtomicU64,
    /// 1: the object is published; 0: unpublished.
    published: AtomicUsize,
    object: UnsafeCell<u64>,
}

impl Grace {
    /// `grace::enter_slot` (+ the reader half of membarrier, see above).
    fn enter(&self) {
        let s = self.slot.load(Ordering::Relaxed);
        assert_eq!(s & 1, 0);
        self.slot.store(s + 1, Ordering::Relaxed); // slot_inc
        fence(Ordering::SeqCst); // what membarrier does to this thread
    }

    /// `Section::exit`: the compiler fence + `inc`, an x86 (release) store.
    fn exit(&self) {
        let s = self.slot.load(Ordering::Relaxed);
        self.slot.store(s + 1, Ordering::Release);
    }

    /// `grace::synchronize` + `wait_for`.
    fn synchronize(&self) {
        fence(Ordering::SeqCst);
        fence(Ordering::SeqCst); // membarrier, the writer's half
        let seq = self.slot.load(Ordering::Acquire);
        if seq & 1 == 1 {
            while self.slot.load(Ordering::Acquire) == seq {
                thread::yield_now();
            }
        }
        fence(Ordering::SeqCst);
    }
}

#[test]
fn grace_period_orders_every_read_before_the_free() {
    loom::model(|| {
        let g = Arc::new(Grace {
            slot: AtomicU64::new(0),
            published: AtomicUsize::new(1),
            object: UnsafeCell::new(7),
        });
        let reader = {
            let g = g.clone();
            thread::spawn(move || {
                for _ in 0..2 {
                    g.enter();
                    if g.published.load(Ordering::Acquire) == 1 {
                        // SAFETY: a shared read inside a section; loom checks it.
                        let v = g.object.with(|p| unsafe { *p });
                        assert_eq!(v, 7, "read the object after it was freed");
                    }
                    g.exit();
                }
            })
        };
        // Unpublish (the writer's Relaxed pointer store under its lock) …
        g.published.store(0, Ordering::Relaxed);
        g.synchronize();
        // … and free.
        // SAFETY: the free; loom reports a race with any unordered read.
        g.object.with_mut(|p| unsafe { *p = 0 });
        reader.join().unwrap();
    });
}

/// Without the writer's barrier the model must fail: proves the test can.
#[test]
#[should_panic]
fn grace_period_without_the_barrier_is_caught() {
    loom::model(|| {
        let g = Arc::new(Grace {
            slot: AtomicU64::new(0),
            published: AtomicUsize::new(1),
            object: UnsafeCell::new(7),
        });
        let reader = {
            let g = g.clone();
            thread::spawn(move || {
                let s = g.slot.load(Ordering::Relaxed);
                g.slot.store(s + 1, Ordering::Relaxed); // no barrier at all
                if g.published.load(Ordering::Relaxed) == 1 {
                    // SAFETY: loom checks it.
                    let v = g.object.with(|p| unsafe { *p });
                    assert_eq!(v, 7);
                }
                g.exit();
            })
        };
        g.published.store(0, Ordering::Relaxed);
        let seq = g.slot.load(Ordering::Relaxed);
        if seq & 1 == 1 {
            while g.slot.load(Ordering::Relaxed) == seq {
                thread::yield_now();
            }
        }
        // SAFETY: the free; loom reports a race with any unordered read.
        g.object.with_mut(|p| unsafe { *p = 0 });
        reader.join().unwrap();
    });
}
