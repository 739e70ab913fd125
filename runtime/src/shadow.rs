//! Return probes' per-thread shadow stacks: one frame per pending
//! invocation of a function with a return probe, pushed at its entry hit and
//! popped at the hit of the `ret` that ends it.
//!
//! # Pairing
//!
//! At a function's entry the stack pointer points at the return address its
//! caller pushed; the `ret` that ends that invocation executes with the
//! stack pointer at the same address, whichever function it belongs to (a
//! tail call leaves it in place). So a frame remembers that address, `sp`,
//! and the return address it holds: a `ret` hit at `sp` ends the frames
//! recorded there (several, after tail calls between probed functions),
//! innermost first. The program's stack is never touched, so unwinders,
//! `backtrace`, `__builtin_return_address` and `dlsym(RTLD_NEXT, …)` see
//! nothing.
//!
//! An invocation left by `longjmp`, an exception or a thread's exit never
//! reaches its `ret`: its frame is *abandoned*. Frames deeper in the stack
//! than a `ret` being hit, or at or below the stack pointer of a new entry,
//! are abandoned (their invocations are gone), counted in their consumer's
//! `abandoned` and dropped — within [`SAME_STACK`] bytes: a signal handler on
//! an alternate stack far away does not make the interrupted code's frames
//! look abandoned. A frame whose return address no longer matches is
//! abandoned too.
//!
//! A new entry at the same stack pointer and return address as a pending
//! frame is a tail call in progress if that frame is of another function
//! (it ends with the new one's `ret`); of the same function, it is the
//! invocation before, left by `longjmp` and entered again from the same
//! call, and abandoned — unless the function may jump to its own entry
//! (the writer found such a jump among its exits, `EntryKind::Chain`):
//! then it is a *chain* of invocations, each a tail call of the one
//! before, and each gets its return hit when the last one returns,
//! innermost first (API.md: a tail call returns when its callee returns).
//! Such a function re-entered after a `longjmp` from the same call site
//! cannot be told from a chain: the earlier invocation gets a return hit
//! then, instead of counting abandoned. The consumers of one entry hit
//! each push a frame at the same place: only the first push of a hit
//! looks for abandoned frames (the dispatcher tells it which it is). The frames of a thread that exited are counted when a
//! later [`reclaim`] (run by `sync`) finds the thread gone, or when a new
//! thread takes over its thread pointer.
//!
//! # Memory
//!
//! The stacks live in a fixed table of [`THREADS`] entries found by hashing
//! the thread pointer (linear probing; an entry is claimed with one CAS and
//! validated with the kernel thread id, since a new thread may reuse an
//! exited one's thread pointer). Each entry's frames are mapped on first use
//! by a raw `mmap` (allowed in a signal handler), [`DEPTH`] frames of
//! reserved address space, touched only as deep as the thread's pending
//! invocations go. A thread past [`DEPTH`] pending invocations, or one that
//! finds the table full, gets no return hit for the extra ones: they count
//! as abandoned at once.
//!
//! # Safety
//!
//! An entry's frames are only ever touched by its owning thread, from the
//! dispatcher (inside a read-side section, where a nested hit runs no
//! consumer, so a frame operation is never interrupted by another on the
//! same stack), and by the writer's [`reclaim`] once that thread is gone.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicUsize, Ordering};

use crate::arch;
use crate::probe::CONSUMERS;
use crate::sigctx::SignalContext;

/// Entries of the table: threads that can have return probes pending at
/// once.
pub(crate) const THREADS: usize = 4096;
/// Pending invocations per thread.
pub(crate) const DEPTH: usize = 1 << 17;
/// How far apart two stack pointers may be and still be taken for the same
/// stack (a thread's stack is 8 MiB by default; alternate signal stacks and
/// coroutine stacks are separate mappings).
const SAME_STACK: usize = 64 << 20;

/// One pending invocation.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Frame {
    /// Where its return address is (the stack pointer at its entry).
    pub sp: usize,
    /// The return address there.
    pub ret: usize,
    /// The function's entry (the return hit's `addr`).
    pub func: usize,
    /// The consumer's return handler and user data.
    pub on_return: usize,
    pub user_data: usize,
    /// The invocation's session word.
    pub session: u64,
    /// The consumer's record and the generation it had.
    pub record: u32,
    pub gen: u32,
}

/// The owner field of a free entry.
const FREE: usize = 0;
/// The owner field of an entry [`reclaim`] is freeing.
const HELD: usize = usize::MAX;

struct Stack {
    /// The owner's thread pointer, or [`FREE`].
    owner: AtomicUsize,
    /// The owner's kernel thread id.
    tid: AtomicU32,
    /// Pending frames.
    len: AtomicUsize,
    /// [`DEPTH`] frames, mapped on first use (null until then).
    frames: AtomicPtr<Frame>,
}

#[allow(clippy::declare_interior_mutable_const)] // an array initialiser
const EMPTY: Stack = Stack {
    owner: AtomicUsize::new(FREE),
    tid: AtomicU32::new(0),
    len: AtomicUsize::new(0),
    frames: AtomicPtr::new(std::ptr::null_mut()),
};

static TABLE: [Stack; THREADS] = [EMPTY; THREADS];

/// The stacks of spawn children, by their parent's spawn slot: a child runs
/// with its parent's thread pointer, and its frames must neither mix with
/// the parent's (a `ret` in the child would take the parent's frames for
/// deeper ones) nor outlive its `execve`.
static CHILDREN: [Stack; crate::sys::spawn::SLOTS] = [EMPTY; crate::sys::spawn::SLOTS];

/// The spawn child of `slot` has exec'd or exited: its pending invocations
/// (an `execve` that succeeded) are abandoned. Called by the parent.
pub(crate) fn child_gone(slot: usize) {
    // The child's writes precede the return of the parent's `clone`.
    reset(&CHILDREN[slot]);
}

/// [`arch::tid_offset`], found in normal context before any return probe
/// is attached (`u32::MAX`: unknown, ask the kernel).
static TID_OFFSET: AtomicU32 = AtomicU32::new(u32::MAX);

/// Finds where threads keep their id. Normal context; before the first
/// return probe.
pub(crate) fn init() {
    // Ordering: Relaxed — read by dispatchers that run because of probes
    // attached after this (the attach's own ordering publishes it).
    TID_OFFSET.store(arch::tid_offset().unwrap_or(u32::MAX), Ordering::Relaxed);
}

fn tid() -> u32 {
    // Ordering: Relaxed — see `init`.
    let off = TID_OFFSET.load(Ordering::Relaxed);
    arch::thread_id((off != u32::MAX).then_some(off))
}

/// The calling thread's stack: a view that only its owner uses.
pub(crate) struct Mine {
    stack: &'static Stack,
    frames: *mut Frame,
}

/// Counts a frame's invocation as abandoned.
///
/// # Signal safety
/// One atomic add.
fn abandon(f: &Frame) {
    if let Some(r) = CONSUMERS.get(f.record as usize) {
        // Ordering: Relaxed — a statistic.
        if r.gen.load(Ordering::Relaxed) == f.gen {
            r.abandoned.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Maps a thread's frames.
///
/// # Signal safety
/// One raw `mmap`.
fn map_frames() -> *mut Frame {
    let len = DEPTH * std::mem::size_of::<Frame>();
    // SAFETY: an anonymous private mapping at an address the kernel picks;
    // no memory of ours is affected.
    let p = unsafe {
        crate::sys::raw::syscall6(
            libc::SYS_mmap,
            0,
            len as i64,
            i64::from(libc::PROT_READ | libc::PROT_WRITE),
            i64::from(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
            -1,
            0,
        )
    };
    if p < 0 {
        std::ptr::null_mut()
    } else {
        p as usize as *mut Frame
    }
}

/// The calling thread's stack, claimed if it has none and `claim`; `None`
/// when it has none (and may not or cannot claim one). A spawn child
/// (`sys::spawn`) gets its own.
///
/// # Signal safety
/// Loads, at most one CAS per probed entry, and on a thread's first use a
/// raw `mmap`.
pub(crate) fn mine(_cx: SignalContext, claim: bool) -> Option<Mine> {
    let tp = arch::thread_pointer();
    if let Some(slot) = crate::sys::spawn::spawning_slot(tp) {
        // A spawn child, running with its suspended parent's thread
        // pointer: it gets a stack of its own (see `child_gone`).
        return mapped(&CHILDREN[slot]);
    }
    let home = tp.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - THREADS.trailing_zeros());
    for k in 0..THREADS {
        let s = &TABLE[(home + k) % THREADS];
        // Ordering: Acquire — a stack claimed by this thread earlier, or
        // reclaimed by the writer (its frames, tid and len reset before it
        // was freed — pairs with the Release in `reclaim`).
        let owner = s.owner.load(Ordering::Acquire);
        if owner == tp {
            let me = tid();
            // Ordering: Relaxed — the owner's own field, or a dead owner's.
            let was = s.tid.load(Ordering::Relaxed);
            if was != me {
                // A thread that exited had this thread pointer. Take the
                // entry over (the tid decides against a concurrent
                // `reclaim`); its frames are abandoned.
                // Ordering: Acquire — the dead owner's frames.
                if s.tid
                    .compare_exchange(was, me, Ordering::Acquire, Ordering::Relaxed)
                    .is_err()
                {
                    continue;
                }
                reset(s);
            }
            return mapped(s);
        }
        if owner == FREE {
            if !claim {
                return None;
            }
            // Ordering: Acquire on success, as above.
            if s.owner
                .compare_exchange(FREE, tp, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                // Ordering: Relaxed — only the owner uses them from now.
                s.tid.store(tid(), Ordering::Relaxed);
                s.len.store(0, Ordering::Relaxed);
                return mapped(s);
            }
        }
    }
    None
}

fn mapped(s: &'static Stack) -> Option<Mine> {
    // Ordering: Relaxed — set by this thread, or kept from an earlier owner
    // (published by the owner CAS/Acquire).
    let mut frames = s.frames.load(Ordering::Relaxed);
    if frames.is_null() {
        frames = map_frames();
        if frames.is_null() {
            return None;
        }
        // Ordering: Relaxed — as above.
        s.frames.store(frames, Ordering::Relaxed);
    }
    Some(Mine { stack: s, frames })
}

/// Drops every frame of `s` as abandoned.
fn reset(s: &Stack) {
    // Ordering: Relaxed — the owner's fields (see the module's Safety).
    let len = s.len.swap(0, Ordering::Relaxed);
    let frames = s.frames.load(Ordering::Relaxed);
    for i in 0..len {
        // SAFETY: frames `0..len` were written by pushes.
        abandon(unsafe { &*frames.add(i) });
    }
}

impl Mine {
    fn len(&self) -> usize {
        // Ordering: Relaxed — the owner's own field.
        self.stack.len.load(Ordering::Relaxed)
    }

    fn set_len(&self, n: usize) {
        // Ordering: Relaxed — the owner's own field.
        self.stack.len.store(n, Ordering::Relaxed);
    }

    fn top(&mut self) -> Option<&mut Frame> {
        let n = self.len();
        // SAFETY: frames `0..len` are initialised and only the owner (this
        // thread, not re-entered: see the module docs) touches them.
        (n > 0).then(|| unsafe { &mut *self.frames.add(n - 1) })
    }

    /// A new entry at stack pointer `f.sp`: drops the frames it shows
    /// abandoned (if it is the `first` push of its entry hit: the others
    /// are of the same invocation, and the frames above them are the
    /// hit's), then pushes `f`. `chains`: the function may jump to its own
    /// entry (see the module docs). Returns its session word, or `None` if
    /// the stack is full (the invocation is counted abandoned).
    pub(crate) fn push(&mut self, f: Frame, first: bool, chains: bool) -> Option<&mut u64> {
        while let Some(t) = self.top().filter(|_| first) {
            // A pending frame below a new entry's return address is an
            // invocation that is over. One at the same address with the
            // same return address, of another function, is a tail call in
            // progress: it ends with the new one's `ret` (`pop_returning`).
            // Of the same function, it is taken for an invocation left by
            // `longjmp` and entered again from the same call — unless the
            // function chains.
            let tail_call = t.sp == f.sp && t.ret == f.ret && (t.func != f.func || chains);
            if t.sp <= f.sp && f.sp - t.sp < SAME_STACK && !tail_call {
                abandon(t);
                self.set_len(self.len() - 1);
            } else {
                break;
            }
        }
        let n = self.len();
        if n >= DEPTH {
            abandon(&f);
            return None;
        }
        // SAFETY: `n < DEPTH`, inside the mapping; only the owner writes.
        let slot = unsafe { &mut *self.frames.add(n) };
        *slot = f;
        self.set_len(n + 1);
        Some(&mut slot.session)
    }

    /// Undoes the last [`Mine::push`] (its entry handler declined the return).
    pub(crate) fn pop_last(&mut self) {
        let n = self.len();
        if n > 0 {
            self.set_len(n - 1);
        }
    }

    /// A `ret` executing with its return address at `sp` (holding `ret`):
    /// pops the next frame that it ends (innermost first; call again for
    /// the others), after dropping the deeper, abandoned ones. `None` when
    /// it ends no more.
    pub(crate) fn pop_returning(&mut self, sp: usize, ret: usize) -> Option<Frame> {
        while let Some(t) = self.top() {
            let deeper = t.sp < sp && sp - t.sp < SAME_STACK;
            if deeper || (t.sp == sp && t.ret != ret) {
                abandon(t);
                self.set_len(self.len() - 1);
            } else if t.sp == sp {
                let f = *t;
                self.set_len(self.len() - 1);
                return Some(f);
            } else {
                break;
            }
        }
        None
    }
}

/// Counts the frames of threads that exited as abandoned and frees their
/// entries (the mappings stay, for the next thread). Normal context; the
/// writer calls it from `sync`.
pub(crate) fn reclaim() {
    let pid = std::process::id() as i64;
    for s in &TABLE {
        // Ordering: Acquire — the owner's frames, as left at its exit.
        let owner = s.owner.load(Ordering::Acquire);
        if owner == FREE {
            continue;
        }
        // Ordering: Relaxed — set by the owner when it claimed the entry.
        let tid = s.tid.load(Ordering::Relaxed);
        // Gone: the thread's own id word no longer holds its id (the kernel
        // clears it at exit, before `pthread_join` returns; a new thread
        // there has another), or the kernel knows no such thread.
        // Ordering: Relaxed — see `init`.
        let off = TID_OFFSET.load(Ordering::Relaxed);
        let mut word = [0u8; 4];
        let cleared = off != u32::MAX
            && crate::sys::peek::read_memory(owner.wrapping_add(off as usize), &mut word).is_ok()
            && u32::from_ne_bytes(word) != tid;
        // SAFETY: signal 0 only checks that the thread exists.
        let alive = unsafe { crate::sys::raw::syscall3(libc::SYS_tgkill, pid, i64::from(tid), 0) };
        if !cleared && alive != -i64::from(libc::ESRCH) {
            continue;
        }
        // The owner is gone. A new thread with the same thread pointer may
        // be taking the entry over (`mine`, when the tid differs): hide the
        // entry from new lookups, then let the tid decide.
        if s.owner
            .compare_exchange(owner, HELD, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            continue;
        }
        // Ordering: Acquire — the dead owner's frames.
        if s.tid
            .compare_exchange(tid, 0, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            // The new thread won: the entry is its own.
            // Ordering: Relaxed — back to what it was.
            s.owner.store(owner, Ordering::Relaxed);
            continue;
        }
        reset(s);
        // Ordering: Release — the reset before the entry is free again
        // (pairs with the Acquire in `mine`).
        s.owner.store(FREE, Ordering::Release);
    }
}
