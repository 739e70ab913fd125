//! Fault maps: where an instruction in a stub came from.
//!
//! Every stub slot ends with a *fault map* naming, for each instruction of
//! the stub that may fault on behalf of a displaced instruction, the
//! displaced instruction's address and how far the stub had moved the stack
//! pointer before it (the two `mov dword`s that store a 64-bit return
//! address, and the `jmp [mem]` of a relocated `call [mem]`, run with the
//! return address already pushed). A fault handler that finds the faulting
//! program counter in the map rewinds the context to the displaced
//! instruction: the host's handler then sees the fault as if nothing were
//! probed (the kernel's uprobes abort an out-of-line step the same way).
//!
//! The map is read backwards from the slot's end:
//!
//! ```text
//! [ stub_off, orig_off, sp_adj / 8 ] × n   n   MAGIC   origin (u64, LE)
//! ```
//!
//! `stub_off` counts from the slot's start, `orig_off` from `origin` (the
//! probe's patch address). A poisoned slot (`ud2` repeated) never carries
//! [`MAGIC`], so it maps nothing.
//!
//! # Safety
//!
//! [`fault_origin`] reads the slot a thread just faulted in, which lies in
//! a stub chunk that is never unmapped.
#![allow(unsafe_code)]

use crate::error::{Error, Result};
use crate::sigctx::SignalContext;

/// One instruction of a stub that may fault for a displaced instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultPoint {
    /// Its offset in the slot.
    pub stub_off: u8,
    /// The displaced instruction's offset from the origin.
    pub orig_off: u8,
    /// Bytes the stub pushed before it (a multiple of 8).
    pub sp_adj: u8,
}

/// Marks a slot that carries a fault map (never a byte of the poison).
const MAGIC: u8 = 0xA5;
/// The fixed part: the count, the magic and the origin.
const FIXED: usize = 1 + 1 + 8;

/// The bytes a fault map of `n` points takes.
pub const fn fault_map_len(n: usize) -> usize {
    FIXED + 3 * n
}

/// `code` padded with `int3` to `slot_len` bytes, ending with the fault map
/// of `points` for a stub serving the code at `origin`.
pub fn with_fault_map(
    mut code: Vec<u8>,
    points: &[FaultPoint],
    origin: usize,
    slot_len: usize,
) -> Result<Vec<u8>> {
    let map = fault_map_len(points.len());
    if code.len() + map > slot_len || points.len() > usize::from(u8::MAX) {
        return Err(Error::unsupported(
            origin,
            format!(
                "the stub needs {} bytes with its fault map, more than a {slot_len}-byte slot",
                code.len() + map
            ),
        ));
    }
    code.resize(slot_len - map, 0xCC);
    for p in points {
        debug_assert!(p.sp_adj % 8 == 0);
        code.extend_from_slice(&[p.stub_off, p.orig_off, p.sp_adj / 8]);
    }
    code.push(points.len() as u8);
    code.push(MAGIC);
    code.extend_from_slice(&(origin as u64).to_le_bytes());
    debug_assert_eq!(code.len(), slot_len);
    Ok(code)
}

/// The displaced instruction a fault at `pc`, in the slot of `slot_len`
/// bytes at `slot`, belongs to: its address and the bytes to add to the
/// stack pointer to undo what the stub pushed. `None` if the fault map has
/// no entry for `pc`.
///
/// # Safety
/// `slot..slot + slot_len` is a stub slot (mapped and readable).
///
/// # Signal safety
/// Volatile byte loads and arithmetic; no allocation, lock or panic.
pub unsafe fn fault_origin(
    _cx: SignalContext,
    slot: usize,
    slot_len: usize,
    pc: usize,
) -> Option<(usize, u64)> {
    // SAFETY: inside the slot, per the caller's contract.
    let byte = |i: usize| unsafe { core::ptr::read_volatile((slot + i) as *const u8) };
    if slot_len < FIXED || pc < slot || pc >= slot + slot_len {
        return None;
    }
    let off = pc - slot;
    if byte(slot_len - 9) != MAGIC {
        return None;
    }
    let mut origin = 0u64;
    for i in 0..8 {
        origin |= u64::from(byte(slot_len - 8 + i)) << (8 * i);
    }
    let n = usize::from(byte(slot_len - 10));
    if fault_map_len(n) > slot_len {
        return None;
    }
    let first = slot_len - fault_map_len(n);
    (0..n).find_map(|k| {
        let e = first + 3 * k;
        (usize::from(byte(e)) == off).then(|| {
            (
                (origin as usize).wrapping_add(usize::from(byte(e + 1))),
                u64::from(byte(e + 2)) * 8,
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_round_trips_and_poison_maps_nothing() {
        let cx = {
            // SAFETY: the test calls only signal-safe functions with it.
            unsafe { SignalContext::new() }
        };
        let points = [
            FaultPoint {
                stub_off: 29,
                orig_off: 0,
                sp_adj: 0,
            },
            FaultPoint {
                stub_off: 40,
                orig_off: 3,
                sp_adj: 8,
            },
        ];
        let slot = with_fault_map(vec![0x90; 20], &points, 0x40_1000, 64).unwrap();
        assert_eq!(slot.len(), 64);
        assert_eq!(&slot[..20], &[0x90; 20]);
        let base = slot.as_ptr() as usize;
        // SAFETY: `slot` is 64 readable bytes.
        let at = |off: usize| unsafe { fault_origin(cx, base, 64, base + off) };
        assert_eq!(at(29), Some((0x40_1000, 0)));
        assert_eq!(at(40), Some((0x40_1003, 8)));
        assert_eq!(at(30), None);
        assert!(with_fault_map(vec![0x90; 50], &points, 0x40_1000, 64).is_err());
        let poison: Vec<u8> = [0x0F, 0x0B].iter().copied().cycle().take(64).collect();
        let p = poison.as_ptr() as usize;
        // SAFETY: as above.
        assert_eq!(unsafe { fault_origin(cx, p, 64, p) }, None);
    }
}
