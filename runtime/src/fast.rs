//! The fast path's dispatcher: what a fast site's stub calls, through the
//! trampoline, with the registers saved in a [`FastFrame`].
//!
//! It runs the same dispatcher, in the same kind of read-side section, as
//! the trap path. The stub names its probe by a *tag* (record index and
//! generation), which the dispatcher checks against the record inside the
//! section: a thread that entered a stub just before its probe was removed
//! (and the record perhaps reused) calls no consumer, and simply runs the
//! displaced instruction — correct, because no consumer was attached for
//! the whole of that execution.
//!
//! # Safety
//!
//! `fast_dispatch` is called only by the trampoline, with a pointer to the
//! frame it built on its own stack; `finish` writes the resume slot on the
//! thread's own stack, below the stack pointer it will resume with.
#![allow(unsafe_code)]

use std::sync::atomic::{fence, Ordering};

use crate::arch::{FastFrame, EXIT_POP};
use crate::grace;
use crate::probe::{self, PROBES};
use crate::sigctx::SignalContext;
use crate::trap::fatal;

/// Bits of a tag holding the record index (`MAX_PROBES` is `1 << 20`).
const TAG_INDEX_BITS: u32 = 20;
const TAG_GEN_MASK: u32 = (1 << (31 - TAG_INDEX_BITS)) - 1;

/// The tag a fast stub pushes for probe record `idx` of generation `gen`:
/// a positive `i32`, so `push imm32` sign-extends it unchanged.
pub(crate) fn tag(idx: u32, gen: u32) -> u32 {
    debug_assert!(idx < 1 << TAG_INDEX_BITS);
    idx | ((gen & TAG_GEN_MASK) << TAG_INDEX_BITS)
}

/// probert's own code that runs outside read-side sections on the way into
/// or out of a stub: `fast_dispatch` and what it calls before entering and
/// after leaving its section, the SIGTRAP handler and the signal return
/// trampoline — placed in the linker section `probert_fast` so thread scans
/// can treat a thread there as on its way into or out of a stub.
pub(crate) fn code_range() -> (usize, usize) {
    extern "C" {
        static __start_probert_fast: u8;
        static __stop_probert_fast: u8;
    }
    // The linker defines both symbols around the `probert_fast` section,
    // which holds at least `fast_dispatch`; only their addresses are taken.
    (
        std::ptr::addr_of!(__start_probert_fast) as usize,
        std::ptr::addr_of!(__stop_probert_fast) as usize,
    )
}

/// Called by the trampoline for every fast hit.
///
/// # Signal safety
/// The fast path may run anywhere a probed instruction runs — inside a
/// signal handler, or on a thread holding probert's writer lock — so it
/// keeps the same rules as the trap path: no allocation, lock, formatting,
/// lazily initialised thread-local or panic.
#[link_section = "probert_fast"]
pub(crate) extern "C" fn fast_dispatch(tag: u64, frame: *mut FastFrame) {
    // SAFETY: this is a dispatcher entry point.
    let cx = unsafe { SignalContext::new() };
    // SAFETY: the trampoline passes the frame it built on this thread's
    // stack; nothing else refers to it during this call.
    let frame = unsafe { &mut *frame };
    let idx = (tag as u32 & ((1 << TAG_INDEX_BITS) - 1)) as usize;
    let gen = (tag as u32) >> TAG_INDEX_BITS;
    let section = grace::enter(cx);
    if let Some(rec) = PROBES.get(idx) {
        // Ordering: Acquire — pairs with the writer's Release store of the
        // generation before it reinitialises a record (`init_record`).
        let g1 = rec.gen.load(Ordering::Acquire) & TAG_GEN_MASK;
        // Ordering: Relaxed — validated by the generation re-check below.
        let addr = rec.addr.load(Ordering::Relaxed);
        // Ordering: Acquire — the list was built before it was published
        // (Release swap in `publish_list`).
        let list = rec.consumers.load(Ordering::Acquire);
        // Ordering: Acquire fence — if the reads above saw a reinitialised
        // record, the generation below has moved too.
        fence(Ordering::Acquire);
        let g2 = rec.gen.load(Ordering::Relaxed) & TAG_GEN_MASK;
        if g1 == gen && g2 == gen && addr != 0 {
            let rsp0 = frame.regs.get(crate::arch::Reg::Rsp);
            frame.regs.rip = addr as u64;
            probe::dispatch(cx, &section, list, addr, &mut frame.regs);
            finish(cx, frame, addr as u64, rsp0);
        }
    }
    section.exit(cx);
}

/// Points the trampoline's exit at where the handlers want the thread to go.
///
/// By default the exit slot holds the stub's `ret_point`, just below the
/// original stack pointer; a handler that wrote RIP or RSP needs another
/// target or slot. The slot is always the 8 bytes `EXIT_POP + 8` below the
/// stack pointer to resume with (`ret 136` pops it, then the rest).
///
/// # Signal safety
/// Arithmetic and one store to the thread's own stack.
#[link_section = "probert_fast"]
fn finish(_cx: SignalContext, frame: &mut FastFrame, addr: u64, rsp0: u64) {
    let (rip, rsp) = (frame.regs.rip, frame.regs.get(crate::arch::Reg::Rsp));
    if rip == addr && rsp == rsp0 {
        return;
    }
    let target = if rip == addr { frame.ret_point } else { rip };
    let slot = rsp.wrapping_sub(EXIT_POP + 8);
    // What the trampoline still reads after we return: the saved registers
    // and the exit word, and the word below the frame its `push`/`popfq` of
    // the flags uses. (The raw flags, `ret_point` and tag above are dead.)
    let base = frame as *const FastFrame as u64;
    let live = base - 8..base + std::mem::offset_of!(FastFrame, flags_raw) as u64;
    // And the dispatcher's own frames, below the trampoline's, live until it
    // returns: from a little below this function's locals up to the frame.
    let marker = 0u8;
    let own = (std::ptr::addr_of!(marker) as u64).saturating_sub(256);
    if slot.wrapping_add(8) > own.min(live.start) && slot < live.end {
        fatal(b"probert: a fast-path handler moved RSP into probert's own frames\n");
    }
    // SAFETY: the slot lies below the stack pointer the thread resumes with
    // (so it holds no live data of the interrupted code) and outside the
    // frame still to be restored (checked above); the handler chose that
    // stack pointer for the thread.
    unsafe { std::ptr::write_volatile(slot as *mut u64, target) };
    frame.exit = slot;
}

/// The dispatcher's address, for the trampoline to call.
pub(crate) fn dispatcher_address() -> usize {
    fast_dispatch as *const () as usize
}
