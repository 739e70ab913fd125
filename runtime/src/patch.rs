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

use std::sync::Arc;

use crate::arch::MAX_INSN_LEN;
use crate::error::Result;
use crate::region::Target;
use crate::sys::{code, maps};

/// Bytes to write at one address (at most an instruction's worth), with a
/// tag of the caller's.
#[derive(Clone)]
pub(crate) struct Patch {
    pub target: Arc<Target>,
    pub addr: usize,
    len: u8,
    bytes: [u8; MAX_INSN_LEN],
    /// The caller's (which site the patch belongs to).
    pub tag: usize,
}

impl Patch {
    /// A patch of `bytes` (at most [`MAX_INSN_LEN`]) at `addr`.
    pub(crate) fn new(target: &Arc<Target>, addr: usize, bytes: &[u8]) -> Patch {
        Patch::tagged(target, addr, bytes, 0)
    }

    /// [`Patch::new`], tagged.
    pub(crate) fn tagged(target: &Arc<Target>, addr: usize, bytes: &[u8], tag: usize) -> Patch {
        debug_assert!(bytes.len() <= MAX_INSN_LEN);
        let len = bytes.len().min(MAX_INSN_LEN);
        let mut b = [0; MAX_INSN_LEN];
        b[..len].copy_from_slice(&bytes[..len]);
        Patch {
            target: target.clone(),
            addr,
            len: len as u8,
            bytes: b,
            tag,
        }
    }

    /// The bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// Writes `patches` (non-overlapping), merged per page and region. Each patch
/// fully written is recorded in `done` with the bytes it replaced (and its
/// tag), so a caller can undo them after an error.
pub(crate) fn write_all(patches: &mut [Patch], done: &mut Vec<Patch>) -> Result<()> {
    patches.sort_unstable_by_key(|p| p.addr);
    let page = maps::page_size();
    let mut span = Vec::new();
    let mut i = 0;
    while i < patches.len() {
        let first = &patches[i];
        let page_of = first.addr / page;
        let mut j = i + 1;
        while j < patches.len()
            && patches[j].addr / page == page_of
            && Arc::ptr_eq(&patches[j].target, &first.target)
            && patches[j].addr + usize::from(patches[j].len) <= first.target.end
        {
            j += 1;
        }
        let lo = first.addr;
        let hi = patches[i..j]
            .iter()
            .map(|p| p.addr + usize::from(p.len))
            .max()
            .unwrap_or(lo);
        span.clear();
        span.extend_from_slice(&code::read_code_checked(lo, hi).ok_or(
            crate::error::Error::Protect {
                addr: lo,
                reason: "the code is no longer mapped readable".into(),
            },
        )?);
        let before = done.len();
        for p in &patches[i..j] {
            let at = p.addr - lo..p.addr - lo + usize::from(p.len);
            done.push(Patch::tagged(&p.target, p.addr, &span[at.clone()], p.tag));
            span[at].copy_from_slice(p.bytes());
        }
        if let Err(e) = first.target.write(lo, &span) {
            done.truncate(before);
            return Err(e);
        }
        i = j;
    }
    Ok(())
}
