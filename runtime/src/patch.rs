//! Writing and restoring code bytes, batched per page.
//!
//! A one-byte patch (`int3` over the first byte of an instruction, or the
//! original byte back) is atomic with respect to instruction fetch on x86:
//! other threads see the old instruction or the trap, never a mix. Longer
//! patches (the tail of a fast site's jump) are only ever written behind an
//! `int3` at the site's first byte, so no thread decodes them half-written
//! (see `runtime` for the protocol).
//!
//! Patches to the same page of the same region are merged into one write of
//! the span they cover (the bytes in between are rewritten with their current
//! values, read under the writer lock), so attaching or detaching a thousand
//! probes costs about as many writes as pages.

use crate::error::Result;
use crate::region::Target;
use crate::sys::{code, mem};

/// Bytes to write at one address.
#[derive(Clone, Debug)]
pub(crate) struct Patch {
    pub target: Target,
    pub addr: usize,
    pub bytes: Vec<u8>,
}

impl Patch {
    /// A one-byte patch.
    pub(crate) fn byte(target: &Target, addr: usize, byte: u8) -> Patch {
        Patch {
            target: target.clone(),
            addr,
            bytes: vec![byte],
        }
    }
}

/// Writes `patches` (non-overlapping), merged per page and region. Each patch
/// fully written is recorded in `done` with the bytes it replaced, so a
/// caller can undo them after an error.
pub(crate) fn write_all(patches: &mut [Patch], done: &mut Vec<Patch>) -> Result<()> {
    patches.sort_by_key(|p| p.addr);
    let page = mem::page_size();
    let mut i = 0;
    while i < patches.len() {
        let first = &patches[i];
        let page_of = first.addr / page;
        let mut j = i + 1;
        while j < patches.len()
            && patches[j].addr / page == page_of
            && patches[j].target.region == first.target.region
            && patches[j].addr + patches[j].bytes.len() <= first.target.end
        {
            j += 1;
        }
        let lo = first.addr;
        let hi = patches[i..j]
            .iter()
            .map(|p| p.addr + p.bytes.len())
            .max()
            .unwrap_or(lo);
        let mut span = code::read_code(lo, hi);
        let mut before = Vec::with_capacity(j - i);
        for p in &patches[i..j] {
            let at = p.addr - lo..p.addr - lo + p.bytes.len();
            before.push(Patch {
                target: p.target.clone(),
                addr: p.addr,
                bytes: span[at.clone()].to_vec(),
            });
            span[at].copy_from_slice(&p.bytes);
        }
        first.target.write(lo, &span)?;
        done.extend(before);
        i = j;
    }
    Ok(())
}
