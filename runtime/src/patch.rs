//! Writing and restoring code bytes, batched per page.
//!
//! Each patch is one byte (`int3` over the first byte of an instruction, or
//! the original byte back): a one-byte store is atomic with respect to
//! instruction fetch on x86, so other threads running the code see the old
//! instruction or the trap, never a torn one. Patches to the same page of the
//! same region are merged into one write of the span they cover (the bytes in
//! between are rewritten with their current values, read under the writer
//! lock), so attaching or detaching a thousand probes costs about as many
//! writes as pages.

use crate::error::Result;
use crate::region::Target;
use crate::sys::{code, mem};

/// One byte to write.
#[derive(Clone, Debug)]
pub(crate) struct Patch {
    pub target: Target,
    pub addr: usize,
    pub byte: u8,
}

/// Writes `patches` (at distinct addresses), merged per page and region.
/// On error, returns how many patches (in the sorted order it reports back
/// through `done`) were written, so the caller can undo them.
pub(crate) fn write_all(patches: &mut [Patch], done: &mut Vec<(usize, u8)>) -> Result<()> {
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
            && patches[j].addr < first.target.end
        {
            j += 1;
        }
        let lo = first.addr;
        let hi = patches[j - 1].addr + 1;
        let mut span = code::read_code(lo, hi);
        let mut before = Vec::with_capacity(j - i);
        for p in &patches[i..j] {
            before.push((p.addr, span[p.addr - lo]));
            span[p.addr - lo] = p.byte;
        }
        first.target.write(lo, &span)?;
        done.extend(before);
        i = j;
    }
    Ok(())
}
