//! Events out of handlers: one ring buffer per thread, written by that
//! thread's handlers (signal context) and read by the drain thread.
//!
//! A thread finds its buffer by hashing `pthread_self()` into a fixed table
//! and claiming a free slot with one compare-and-swap; no allocation, no
//! lock, no thread-local. One producer per slot: a thread runs one handler
//! at a time (probert skips a hit on a thread already in a handler, as
//! `missed`). One consumer: the drain thread, or the exiting thread after
//! it stopped the drain thread (both under [`DRAIN`]).
//!
//! A record is a 4-byte header (length, tool index) and its bytes, padded
//! to 4; positions grow forever and wrap modulo the ring's size.
#![allow(unsafe_code)]

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crossbeam_utils::CachePadded;

/// The longest record a tool may emit.
pub const MAX_RECORD: usize = 256;
const SLOTS: usize = 128;
const RING: usize = 1 << 16;
const PROBE: usize = 16;

struct Slot {
    owner: AtomicUsize,
    head: AtomicUsize,
    tail: AtomicUsize,
    buf: UnsafeCell<[u8; RING]>,
}

// SAFETY: `buf` bytes in [tail, head) are only read by the consumer, bytes
// outside only written by the slot's one producer (see the module docs).
unsafe impl Sync for Slot {}

static TABLE: [CachePadded<Slot>; SLOTS] = [const {
    CachePadded::new(Slot {
        owner: AtomicUsize::new(0),
        head: AtomicUsize::new(0),
        tail: AtomicUsize::new(0),
        buf: UnsafeCell::new([0; RING]),
    })
}; SLOTS];

static DROPS: AtomicU64 = AtomicU64::new(0);
/// Serialises consumers (normal context only).
pub static DRAIN: Mutex<()> = Mutex::new(());

/// Counts a record that could not be queued.
///
/// # Signal safety
/// One atomic add.
pub fn count_drop() {
    // Ordering: Relaxed — a statistic read at report time.
    DROPS.fetch_add(1, Ordering::Relaxed);
}

/// Records dropped so far.
pub fn drops() -> u64 {
    // Ordering: Relaxed — a statistic.
    DROPS.load(Ordering::Relaxed)
}

/// # Signal safety
/// Atomic loads and one compare-and-swap; no allocation, lock or panic.
fn my_slot() -> Option<&'static Slot> {
    // SAFETY: pthread_self reads the thread pointer; always safe.
    let me = unsafe { libc::pthread_self() } as usize;
    let h = (me >> 12).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    for i in 0..PROBE {
        let slot = &TABLE[(h + i) % SLOTS];
        // Ordering: Acquire — pairs with the claim below (another thread's
        // claim is only compared, never relied on).
        let owner = slot.owner.load(Ordering::Acquire);
        if owner == me {
            return Some(slot);
        }
        if owner == 0
            && slot
                .owner
                // Ordering: AcqRel — the claim; pairs with the load above.
                .compare_exchange(0, me, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            return Some(slot);
        }
    }
    None
}

/// Queues `rec` for tool `tool`: 0, or -1 when dropped.
///
/// # Signal safety
/// Byte copies and atomics on the calling thread's slot; no allocation,
/// lock or panic (indices are reduced modulo the ring's size).
pub fn emit(tool: u16, rec: &[u8]) -> i32 {
    let Some(slot) = my_slot() else {
        count_drop();
        return -1;
    };
    let need = 4 + ((rec.len() + 3) & !3);
    // Ordering: Relaxed — only this thread writes `head`.
    let head = slot.head.load(Ordering::Relaxed);
    // Ordering: Acquire — pairs with the Release store of `tail` in
    // `drain`: the consumer is done with the bytes before they are reused.
    let tail = slot.tail.load(Ordering::Acquire);
    if RING - head.wrapping_sub(tail) < need {
        count_drop();
        return -1;
    }
    let buf = slot.buf.get().cast::<u8>();
    let hdr = [
        rec.len() as u8,
        (rec.len() >> 8) as u8,
        tool as u8,
        (tool >> 8) as u8,
    ];
    for (i, &b) in hdr.iter().chain(rec.iter()).enumerate() {
        // SAFETY: the index is reduced modulo RING; these bytes are outside
        // [tail, head), which only this producer writes.
        unsafe { buf.add(head.wrapping_add(i) % RING).write_volatile(b) };
    }
    // Ordering: Release — publishes the record; pairs with the Acquire load
    // of `head` in `drain`.
    slot.head.store(head.wrapping_add(need), Ordering::Release);
    0
}

/// Hands every queued record to `f(tool, bytes)`. Normal context; the
/// caller holds [`DRAIN`].
pub fn drain(mut f: impl FnMut(u16, &[u8])) {
    let mut rec = [0u8; MAX_RECORD];
    for slot in TABLE.iter() {
        // Ordering: Relaxed — a slot never claimed has nothing queued.
        if slot.owner.load(Ordering::Relaxed) == 0 {
            continue;
        }
        // Ordering: Acquire — pairs with the Release store in `emit`.
        let head = slot.head.load(Ordering::Acquire);
        // Ordering: Relaxed — only the consumer writes `tail`.
        let mut tail = slot.tail.load(Ordering::Relaxed);
        let buf = slot.buf.get().cast::<u8>().cast_const();
        while tail != head {
            // SAFETY: [tail, head) was published by the producer.
            let byte = |i: usize| unsafe { buf.add(tail.wrapping_add(i) % RING).read_volatile() };
            let len = usize::from(byte(0)) | usize::from(byte(1)) << 8;
            let tool = u16::from(byte(2)) | u16::from(byte(3)) << 8;
            let len = len.min(MAX_RECORD);
            for (i, r) in rec[..len].iter_mut().enumerate() {
                *r = byte(4 + i);
            }
            tail = tail.wrapping_add(4 + ((len + 3) & !3));
            f(tool, &rec[..len]);
        }
        // Ordering: Release — the bytes are consumed; pairs with the
        // Acquire load of `tail` in `emit`.
        slot.tail.store(tail, Ordering::Release);
    }
}

/// In the child of a fork: the parent's queued records are the parent's.
pub fn forget_all() {
    for slot in TABLE.iter() {
        // Ordering: Relaxed — the child has one thread.
        let head = slot.head.load(Ordering::Relaxed);
        slot.tail.store(head, Ordering::Relaxed);
    }
}
