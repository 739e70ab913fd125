//! The fast path's dispatcher: what a fast site's stub calls, through the
//! trampoline, with the registers saved in a [`FastFrame`].
//!
//! It runs the same dispatcher, in the same kind of read-side section, as
//! the trap path. The stub names its probe record and its site (the patch
//! address); the dispatcher checks inside the section that the record is
//! still that site's: a thread that entered a stub just before its probe
//! was removed (and the record perhaps given to a probe elsewhere) calls no
//! consumer, and simply runs the displaced instructions — correct, because
//! no consumer was attached for the whole of that execution. (A record given
//! to a new probe at the same site is the same site: its consumers may see
//! the hit.)
//!
//! # Safety
//!
//! `fast_dispatch` and `fast_after` are called only by the trampoline, with
//! a pointer to the frame it built on its own stack and the record its stub
//! names (records live in a never-unmapped arena).
#![allow(unsafe_code)]

use std::sync::atomic::Ordering;

use crate::arch::{Clobbers, FastFrame, InlineLayout};
use crate::grace;
use crate::hit::{Action, Hit};
use crate::probe::{self, ConsumerList, ConsumerRecord, Entry, ProbeRecord};
use crate::sigctx::SignalContext;

/// probert's own code that runs outside read-side sections on the way into
/// or out of a stub: `fast_dispatch` and what it calls before entering and
/// after leaving its section, the SIGTRAP handler, the signal return
/// trampoline and the far exit — placed in the linker section
/// `probert_fast` so thread scans can treat a thread there as on its way
/// into or out of a stub.
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

/// Called by the trampoline for every fast hit its inline case does not
/// serve, with the classes of register state it saved. Returns non-zero if
/// the handlers redirected the thread (the trampoline then takes the exit
/// [`FastFrame::retarget`] prepared).
///
/// # Signal safety
/// The fast path may run anywhere a probed instruction runs — inside a
/// signal handler, or on a thread holding probert's writer lock — so it
/// keeps the same rules as the trap path: no allocation, lock, formatting,
/// lazily initialised thread-local or panic.
#[link_section = "probert_fast"]
pub(crate) extern "C" fn fast_dispatch(
    record: *const ProbeRecord,
    site: usize,
    frame: *mut FastFrame,
    saved: u32,
) -> u32 {
    // SAFETY: this is a dispatcher entry point.
    let cx = unsafe { SignalContext::new() };
    // SAFETY: the trampoline passes the frame it built on this thread's
    // stack, nothing else refers to it during this call, and the record its
    // stub names, in the never-unmapped arena.
    let (frame, rec) = unsafe { (&mut *frame, &*record) };
    let section = grace::enter(cx);
    // Ordering: Acquire — the list was built before it was published
    // (Release swap in `publish_list`).
    let list = rec.consumers.load(Ordering::Acquire);
    // Ordering: Relaxed — read after the list: a record reinitialised for a
    // probe elsewhere has another address before it gets another list
    // (the writer sets the address, then indexes and publishes).
    let (addr, report) = (
        rec.addr.load(Ordering::Relaxed),
        rec.report.load(Ordering::Relaxed),
    );
    let mut redirected = 0;
    if addr == site && addr != 0 {
        let rsp0 = frame.regs.sp();
        frame.regs.set_pc(report);
        probe::dispatch(cx, &section, list, report, &mut frame.regs, Clobbers(saved));
        if frame.regs.pc() != report || frame.regs.sp() != rsp0 {
            redirect(cx, frame, report);
            redirected = 1;
        }
    }
    section.exit(cx);
    redirected
}

/// Makes the trampoline resume where the handlers left the registers (they
/// moved RIP or RSP).
///
/// # Signal safety
/// Arithmetic and at most two stores to the thread's own stack.
#[cold]
#[inline(never)]
#[link_section = "probert_fast"]
fn redirect(cx: SignalContext, frame: &mut FastFrame, addr: usize) {
    frame.retarget(cx, addr);
}

/// What the trampoline's inline case calls when its handler returned
/// `Remove` or moved RIP or RSP, still inside the read-side section.
/// Returns non-zero if the thread was redirected, as [`fast_dispatch`].
///
/// # Signal safety
/// As `fast_dispatch`.
#[link_section = "probert_fast"]
extern "C" fn fast_after(
    frame: *mut FastFrame,
    action: u32,
    consumer: *const ConsumerRecord,
    addr: usize,
) -> u32 {
    // SAFETY: this is a dispatcher entry point.
    let cx = unsafe { SignalContext::new() };
    // SAFETY: the trampoline passes its own frame, as to `fast_dispatch`,
    // and a consumer record read from the published list inside the
    // section it is still in (records are never unmapped).
    let (frame, consumer) = unsafe { (&mut *frame, &*consumer) };
    if Action::from_raw(action) == Action::Remove {
        probe::request_removal(consumer);
    }
    if frame.regs.pc() != addr || frame.regs.sp() != frame.entry_sp() {
        redirect(cx, frame, addr);
        return 1;
    }
    0
}

/// Where the trampoline's inline case finds probert's data: the fast path
/// of `grace::enter`/`Section::exit`/`Section::count_hit` and of
/// `probe::dispatch` for one consumer, repeated in assembly, read these
/// offsets from the Rust definitions.
pub(crate) fn inline_layout() -> InlineLayout {
    use std::mem::{offset_of, size_of};
    // The assembly reads `state` and the clobber classes as 32-bit words
    // (`AtomicU32`s and `Clobbers`), the rest as 64-bit ones.
    const _: () = assert!(size_of::<Hit>() == 40);
    const _: () = assert!(size_of::<usize>() == 8);
    const _: () = assert!(size_of::<Clobbers>() == 4);
    let slots = grace::slot_layout();
    let first = offset_of!(ConsumerList, first);
    InlineLayout {
        table: slots.table,
        slot_size: slots.size,
        slot_owner: slots.owner,
        slot_seq: slots.seq,
        hits_table: slots.hits_table,
        hits_size: slots.hits_size,
        hit_ways: slots.hit_ways,
        home_mul: slots.home_mul,
        home_shift: slots.home_shift,
        probe_addr: offset_of!(ProbeRecord, addr),
        probe_report: offset_of!(ProbeRecord, report),
        probe_consumers: offset_of!(ProbeRecord, consumers),
        probe_clobbers: offset_of!(ProbeRecord, clobbers),
        list_inline: offset_of!(ConsumerList, inline),
        first_handler: first + offset_of!(Entry, handler),
        first_user_data: first + offset_of!(Entry, user_data),
        first_record: first + offset_of!(Entry, record),
        first_tag: first + offset_of!(Entry, tag),
        first_clobbers: first + offset_of!(Entry, clobbers),
        consumer_state: offset_of!(ConsumerRecord, state),
        state_active: probe::STATE_ACTIVE,
        consumers_base: probe::CONSUMERS.base_address(),
        consumers_cap: probe::CONSUMERS.capacity(),
        consumer_size: size_of::<ConsumerRecord>(),
        consumer_hits: offset_of!(ConsumerRecord, hits),
        errno_offset: crate::arch::errno_offset(),
        dispatch: fast_dispatch as *const () as usize,
        after: fast_after as *const () as usize,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_trampoline_is_emitted_for_the_real_layout() {
        let l = super::inline_layout();
        crate::arch::emit_trampoline(0x7000_0000, &l, crate::arch::CpuState::detect()).unwrap();
    }
}
