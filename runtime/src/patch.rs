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
//!
//! # Only what is still ours
//!
//! Every patch names the bytes it expects to find (the kernel's
//! `verify_opcode` rule): what probert wrote there, or the original code when
//! it places its own bytes. The current code is read first, without ever
//! faulting ([`code::read_code_any`]), and a patch whose bytes differ — the
//! host rewrote, freed, reprotected and refilled, or unloaded that code — is
//! skipped and reported, never written. Memory that is no longer mapped is
//! reported as gone. Bytes probert *places* over the host's code (a trap, the
//! tail of a jump) go only into memory that is mapped readable and
//! executable, unless the region allows otherwise ([`Target::any_prot`]): a
//! reserved arena's `PROT_NONE` part, or a buffer still being emitted
//! read-write, is refused cleanly.

use std::sync::Arc;

use crate::arch::MAX_INSN_LEN;
use crate::error::{Error, Result};
use crate::region::Target;
use crate::sys::code::{self, CodeRead};
use crate::sys::maps;

/// Bytes to write at one address (at most an instruction's worth), the bytes
/// expected there now, and a tag of the caller's.
#[derive(Clone)]
pub(crate) struct Patch {
    pub target: Arc<Target>,
    pub addr: usize,
    len: u8,
    bytes: [u8; MAX_INSN_LEN],
    expect: [u8; MAX_INSN_LEN],
    /// The caller's (which site the patch belongs to).
    pub tag: usize,
    /// Whether it places probert's bytes over the host's code (which needs
    /// executable memory), rather than replacing bytes probert wrote.
    places: bool,
}

/// Why a patch was not written although nothing failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Skipped {
    /// The code no longer holds the bytes expected there.
    NotOurs,
    /// The memory is no longer mapped.
    Gone,
}

/// What [`write_all`] did with each patch.
#[derive(Default)]
pub(crate) struct Written {
    /// Patches written, by tag.
    pub done: Vec<usize>,
    /// With [`write_all_undoable`]: each patch written, with the bytes it
    /// replaced (an undo patch: writing it puts them back).
    pub undo: Vec<Patch>,
    /// Patches left unwritten, by tag.
    pub skipped: Vec<(usize, Skipped)>,
    /// Patches whose write failed, by tag.
    pub failed: Vec<(usize, Error)>,
}

impl Written {
    /// The first failure, if any.
    pub(crate) fn result(&self) -> Result<()> {
        match self.failed.first() {
            Some((_, e)) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Whether every patch was written.
    pub(crate) fn complete(&self) -> bool {
        self.skipped.is_empty() && self.failed.is_empty()
    }
}

impl Patch {
    /// A patch of `bytes` (at most [`MAX_INSN_LEN`]) at `addr`, where the
    /// code must hold `expect` (as long) now.
    pub(crate) fn new(
        target: &Arc<Target>,
        addr: usize,
        bytes: &[u8],
        expect: &[u8],
        tag: usize,
    ) -> Patch {
        debug_assert!(bytes.len() <= MAX_INSN_LEN && expect.len() == bytes.len());
        let len = bytes.len().min(MAX_INSN_LEN);
        let mut b = [0; MAX_INSN_LEN];
        b[..len].copy_from_slice(&bytes[..len]);
        let mut x = [0; MAX_INSN_LEN];
        let n = expect.len().min(len);
        x[..n].copy_from_slice(&expect[..n]);
        Patch {
            target: target.clone(),
            addr,
            len: len as u8,
            bytes: b,
            expect: x,
            tag,
            places: false,
        }
    }

    /// The same patch, placing probert's bytes over the host's code.
    pub(crate) fn placing(mut self) -> Patch {
        self.places = true;
        self
    }

    /// The bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The bytes expected there before the write.
    fn expected(&self) -> &[u8] {
        &self.expect[..usize::from(self.len)]
    }

    fn end(&self) -> usize {
        self.addr + usize::from(self.len)
    }
}

/// Writes `patches` (non-overlapping), merged per page and region, each only
/// where the code holds the bytes it expects (module docs). Every patch is
/// tried, whatever happens to the others; the report says what became of
/// each.
pub(crate) fn write_all(patches: &mut [Patch]) -> Written {
    write(patches, false)
}

/// [`write_all`], keeping an undo patch of each patch written
/// ([`Written::undo`]).
pub(crate) fn write_all_undoable(patches: &mut [Patch]) -> Written {
    write(patches, true)
}

fn write(patches: &mut [Patch], keep_undo: bool) -> Written {
    patches.sort_unstable_by_key(|p| p.addr);
    let mut out = Written::default();
    // Which patches that place bytes may: one pass over the mappings.
    let needs: Vec<(usize, usize)> = patches
        .iter()
        .filter(|p| p.places && !p.target.any_prot)
        .map(|p| (p.addr, p.end()))
        .collect();
    let exec = if needs.is_empty() {
        Vec::new()
    } else {
        // /proc/self/maps unreadable: the read below still refuses memory
        // that is not mapped readable.
        maps::executable_spans(&needs).unwrap_or_else(|_| vec![true; needs.len()])
    };
    let mut exec = exec.into_iter();
    let page = maps::page_size();
    let mut i = 0;
    while i < patches.len() {
        let first = &patches[i];
        let page_of = first.addr / page;
        let mut j = i + 1;
        while j < patches.len()
            && patches[j].addr / page == page_of
            && Arc::ptr_eq(&patches[j].target, &first.target)
            && patches[j].end() <= first.target.end
        {
            j += 1;
        }
        let group = &patches[i..j];
        let lo = first.addr;
        let hi = group.iter().map(Patch::end).max().unwrap_or(lo);
        let (mut span, readable) = match code::read_code_any(lo, hi) {
            CodeRead::Bytes { bytes, readable } => (bytes, readable),
            CodeRead::Unmapped => {
                out.skipped
                    .extend(group.iter().map(|p| (p.tag, Skipped::Gone)));
                for _ in group.iter().filter(|p| p.places && !p.target.any_prot) {
                    exec.next();
                }
                i = j;
                continue;
            }
            CodeRead::Unknown => {
                let e = Error::Protect {
                    addr: lo,
                    reason: "the code cannot be read".into(),
                };
                out.failed.extend(group.iter().map(|p| (p.tag, e.clone())));
                for _ in group.iter().filter(|p| p.places && !p.target.any_prot) {
                    exec.next();
                }
                i = j;
                continue;
            }
        };
        let mut accepted: Vec<usize> = Vec::with_capacity(group.len());
        for (k, p) in group.iter().enumerate() {
            let executable = if p.places && !p.target.any_prot {
                exec.next().unwrap_or(false)
            } else {
                true
            };
            let at = p.addr - lo..p.end() - lo;
            if span[at.clone()] != *p.expected() {
                out.skipped.push((p.tag, Skipped::NotOurs));
            } else if p.places && !(readable && executable) {
                out.failed.push((
                    p.tag,
                    Error::Protect {
                        addr: p.addr,
                        reason: "the memory is not mapped readable and executable (the host \
                                 has not committed it, or not made it executable yet)"
                            .into(),
                    },
                ));
            } else {
                accepted.push(k);
            }
        }
        let (Some(&a), Some(&b)) = (accepted.first(), accepted.last()) else {
            i = j;
            continue;
        };
        let from = group[a].addr;
        let to = group[a..=b].iter().map(Patch::end).max().unwrap_or(from);
        let mut undo = Vec::with_capacity(if keep_undo { accepted.len() } else { 0 });
        for &k in &accepted {
            let p = &group[k];
            let at = p.addr - lo..p.end() - lo;
            if keep_undo {
                undo.push(Patch::new(
                    &p.target,
                    p.addr,
                    &span[at.clone()],
                    p.bytes(),
                    p.tag,
                ));
            }
            span[at].copy_from_slice(p.bytes());
        }
        match first.target.write(from, &span[from - lo..to - lo]) {
            Ok(()) => {
                out.done.extend(accepted.iter().map(|&k| group[k].tag));
                out.undo.extend(undo);
            }
            Err(e) => out
                .failed
                .extend(accepted.iter().map(|&k| (group[k].tag, e.clone()))),
        }
        i = j;
    }
    out
}
