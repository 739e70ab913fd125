//! Writing and restoring code bytes, batched per page.
//!
//! What makes each write safe for threads running the code is the caller's
//! (see `crate::site`): a trap instruction is written atomically over an
//! instruction's head, and longer patches (the tail of a fast site's jump)
//! only behind a trap at the site's head.
//!
//! Patches to the same page of the same region are merged into one write of
//! the span they cover (the bytes in between are rewritten with their current
//! values, read under the writer lock), so attaching or detaching a thousand
//! probes costs about as many writes as pages.

use crate::error::Result;
use crate::region::Target;
use crate::sys::{code, maps};

/// Bytes to write at one address.
#[derive(Clone, Debug)]
pub(crate) struct Patch {
    pub target: Target,
    pub addr: usize,
    pub bytes: Vec<u8>,
}

impl Patch {
    /// A patch of `bytes` at `addr`.
    pub(crate) fn new(target: &Target, addr: usize, bytes: &[u8]) -> Patch {
        Patch {
            target: target.clone(),
            addr,
            bytes: bytes.to_vec(),
        }
    }
}

/// Writes `patches` (non-overlapping), merged per page and region. Each patch
/// fully written is recorded in `done` with the bytes it replaced, so a
/// caller can undo them after an error.
pub(crate) fn write_all(patches: &mut [Patch], done: &mut Vec<Patch>) -> Result<()> {
    patches.sort_by_key(|p| p.addr);
    let page = maps::page_size();
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
        let mut span = code::read_code_checked(lo, hi).ok_or(crate::error::Error::Protect {
            addr: lo,
            reason: "the code is no longer mapped readable".into(),
        })?;
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
