//! How a site's bytes change: the trap instruction, the jump of a fast site,
//! the order in which they are written, and what a trap site's bytes say
//! after a trap.
//!
//! # The int3-first protocol (cross-modifying code on x86)
//!
//! A one-byte store over an instruction's first byte is atomic with respect
//! to instruction fetch: another core executes the old instruction or the
//! `int3`, never a mix. A longer change (the 5-byte `jmp rel32` of a fast
//! site) is not: a core may have decoded part of the old bytes. So a site
//! switches from its trap to its jump, and back, in steps separated by a
//! core-serialising barrier on every thread ([`SwitchStep::Serialise`]):
//!
//! - trap → jump: serialise (the `int3` is seen everywhere), write the tail
//!   (bytes 1..5: the jump's rel32), serialise, write the head (the `e9`),
//!   serialise;
//! - jump → trap: write the head (`int3`), serialise, write the tail (the
//!   original bytes), serialise.
//!
//! Throughout, a thread reaching the site executes a whole old instruction,
//! the `int3`, or the whole jump.

use super::insn::Displaced;
use super::TRAP_INSN;
use crate::sigctx::SignalContext;

/// The `si_code` of a `SIGTRAP` raised by a trap instruction (`int3`):
/// `SI_KERNEL`.
pub const TRAP_SI_CODE: i32 = 0x80;

/// The length of the jump written over a fast site.
pub const JUMP_LEN: usize = 5;
/// The site bytes written alone, atomically: the first byte.
pub const HEAD: std::ops::Range<usize> = 0..1;
/// The rest of the jump, written while the head is the trap instruction.
pub const TAIL: std::ops::Range<usize> = 1..JUMP_LEN;

/// One step of switching a site between its trap and its jump. The site's
/// code writer fills in the bytes: the jump's when switching to it; the trap
/// instruction (head) and the original bytes (tail) when switching back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchStep {
    /// Write [`HEAD`] of every site switching.
    WriteHead,
    /// Write [`TAIL`] of every site switching.
    WriteTail,
    /// Make every thread of the process execute a core-serialising
    /// instruction, so no core runs a stale decoding of the bytes written.
    Serialise,
}

/// Trap → jump (see the module docs).
pub const TO_JUMP: &[SwitchStep] = &[
    SwitchStep::Serialise,
    SwitchStep::WriteTail,
    SwitchStep::Serialise,
    SwitchStep::WriteHead,
    SwitchStep::Serialise,
];

/// Jump → trap (see the module docs).
pub const TO_TRAP: &[SwitchStep] = &[
    SwitchStep::WriteHead,
    SwitchStep::Serialise,
    SwitchStep::WriteTail,
    SwitchStep::Serialise,
];

/// The bytes of `jmp rel32` at `site` to `to`; `None` if out of rel32 reach.
pub fn jump_to(site: usize, to: usize) -> Option<[u8; JUMP_LEN]> {
    let d = to as i128 - (site as i128 + JUMP_LEN as i128);
    let r = i32::try_from(d).ok()?.to_le_bytes();
    Some([0xE9, r[0], r[1], r[2], r[3]])
}

/// What a trap site's bytes say, read after a trap there found no probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrapSite {
    /// A trap instruction is still there: not probert's (it would have been
    /// found), so the trap is someone else's.
    Armed,
    /// A different trap instruction ends where ours would: someone else's
    /// trap of `len` bytes (`cd 03`, the two-byte `int 3`).
    OtherTrap {
        /// Its length in bytes.
        len: u8,
    },
    /// The trap instruction is gone: probert removed its probe between the
    /// trap and the lookup; resume at the restored instruction.
    Restored,
}

/// Classifies the bytes at `addr`, where a trap instruction ended, after a
/// lookup found no probe there. `read(a)` loads the code byte at `a` (it is
/// mapped: the thread just executed it); `recently_removed` says whether
/// probert recently restored an instruction at `addr`, which is the only way
/// to tell `cd 03` from our removed `int3` over an instruction starting `03`.
///
/// # Signal safety
/// At most two byte reads through `read`.
#[inline]
pub fn classify_trap_site(
    _cx: SignalContext,
    addr: usize,
    recently_removed: bool,
    read: impl Fn(usize) -> u8,
) -> TrapSite {
    let byte = read(addr);
    if byte == TRAP_INSN[0] {
        return TrapSite::Armed;
    }
    // Never read across a page boundary: the page before may be unmapped.
    if !recently_removed && byte == 0x03 && addr & 0xFFF != 0 && read(addr - 1) == 0xCD {
        return TrapSite::OtherTrap { len: 2 };
    }
    TrapSite::Restored
}

/// Whether a decoded first instruction can be displaced into a fast stub on
/// its own: long enough for the jump, and either relocatable or a direct
/// branch the stub can emulate.
pub fn fast_eligible(len: u8, displaced: &Displaced) -> bool {
    use super::insn::Target;
    len as usize >= JUMP_LEN
        && matches!(
            displaced,
            Displaced::Skip
                | Displaced::OutOfLine
                | Displaced::Call(Target::Abs(_))
                | Displaced::Jmp(Target::Abs(_))
                | Displaced::Jcc { .. }
        )
}

#[cfg(test)]
#[allow(unsafe_code)] // the tests create the signal-context token
mod tests {
    use super::*;

    fn cx() -> SignalContext {
        // SAFETY: the tests call only signal-safe functions with it.
        unsafe { SignalContext::new() }
    }

    #[test]
    fn jump_golden_bytes_and_reach() {
        assert_eq!(
            jump_to(0x40_1000, 0x50_0000),
            Some([0xE9, 0xFB, 0xEF, 0x0F, 0x00])
        );
        assert_eq!(
            jump_to(0x50_0000, 0x40_1000),
            Some([0xE9, 0xFB, 0x0F, 0xF0, 0xFF])
        );
        assert_eq!(
            jump_to(0x1000, 0x1000 + 5 + i32::MAX as usize).map(|_| ()),
            Some(())
        );
        assert_eq!(jump_to(0x1000, 0x1000 + 6 + i32::MAX as usize), None);
    }

    #[test]
    fn protocols_write_the_head_alone_behind_serialisation() {
        assert_eq!(HEAD.end, TAIL.start);
        assert_eq!(TRAP_INSN.len(), HEAD.len());
        // Trap → jump: the tail only behind a serialised int3, the head last.
        assert_eq!(TO_JUMP.first(), Some(&SwitchStep::Serialise));
        assert_eq!(TO_JUMP.last(), Some(&SwitchStep::Serialise));
        let tail = TO_JUMP.iter().position(|s| *s == SwitchStep::WriteTail);
        let head = TO_JUMP.iter().position(|s| *s == SwitchStep::WriteHead);
        assert!(tail < head);
        // Jump → trap: the int3 first.
        assert_eq!(TO_TRAP[0], SwitchStep::WriteHead);
    }

    #[test]
    fn trap_sites() {
        let code = [0x90u8, 0xCD, 0x03, 0xCC, 0x03];
        let base = 0x40_1000;
        let read = |a: usize| code[a - base];
        assert_eq!(
            classify_trap_site(cx(), base + 3, false, read),
            TrapSite::Armed
        );
        assert_eq!(
            classify_trap_site(cx(), base + 2, false, read),
            TrapSite::OtherTrap { len: 2 }
        );
        // Our int3 over an instruction starting 03, just removed.
        assert_eq!(
            classify_trap_site(cx(), base + 2, true, read),
            TrapSite::Restored
        );
        assert_eq!(
            classify_trap_site(cx(), base + 4, false, read),
            TrapSite::Restored
        );
        assert_eq!(
            classify_trap_site(cx(), base, false, read),
            TrapSite::Restored
        );
    }
}
