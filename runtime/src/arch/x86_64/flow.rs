//! Function analysis for multi-instruction fast sites: which runs of whole
//! instructions can be displaced by a 5-byte `jmp` (Linux's optimized
//! kprobes, `can_optimize()`, do the same for the kernel).
//!
//! # The analysis
//!
//! [`FunctionFlow::analyze`] decodes a function linearly (exact bounds from
//! `.eh_frame` or the host make that right for compiler output) and records
//! its *entry points*: every place execution can arrive from anywhere but the
//! instruction before it. Those are direct branch and call targets, jump
//! table targets ([`indirect`](super::indirect)), addresses the code takes
//! (`lea rX, [rip + x]`, an absolute `mov`/`push` immediate), every `endbr64`
//! past the first byte, the entries the caller gives (landing pads, symbols
//! and relocation targets inside the function), and, after
//! [`link_module`], what other functions' branches, tables and `lea`s name
//! inside it. The return address of every call is one too. An indirect `jmp`
//! that is neither a recognised jump table nor, under
//! [`PointerJumps::ToEntries`], a jump through a code pointer leaves the
//! function *unproven*; so do undecodable bytes and a target that lands
//! inside an instruction.
//!
//! [`FunctionFlow::displaceable`] picks the shortest run of whole instructions
//! from the site covering 5 bytes, and accepts it when no entry point lies
//! strictly inside it, no call but the last one is in it, every instruction
//! in it relocates ([`displace`](super::displace)), and no instruction reads
//! the bytes the jump overwrites. Runs of more than one instruction need a
//! proven function. An `endbr64` at the site stays in place: the jump goes
//! after it, and the handler still sees the site as RIP.
//!
//! # Memory
//!
//! Instruction starts and calls are bitmaps (2 bits per byte of code, 8×
//! less than a `u32` per instruction); entry points are kept once per
//! target, 8 bytes each with their source (for refusals); what few functions
//! have (unrelocatable instructions, `endbr64`s, the windows of the
//! indirect-jump analysis, targets outside the function until
//! [`link_module`] takes them) is behind one pointer. The decoded
//! instructions are dropped: a flow is about 0.7 bytes per byte of code.
//!
//! # Why this is correct
//!
//! A displaced run `[jump, end)` is replaced by a jump whose tail bytes are
//! garbage as instructions, so it is safe iff no execution arrives at an
//! interior boundary. Execution arrives at an instruction by falling through
//! from the one before, by a branch, or by a return. Direct branches are all
//! decoded. Indirect jumps are tables, whose targets are read, or pointer
//! jumps; a code pointer of position-independent code was made by a `lea`
//! (an entry point, here or through [`link_module`]), by a relocation or
//! symbol (the caller's entries), or is a return address, so under
//! `ToEntries` it lands on an entry point; under `Anywhere` the function is
//! unproven. Indirect calls and unwinding arrive at function starts, return
//! addresses and landing pads. A return address inside the run belongs to a
//! call in it that is not its last instruction, which is refused; the last
//! call returns to `end`, since the stub pushes the original return address.
//! Assumed, as the kernel does: the bounds are exact, the code that branches
//! into the function is analysed too (or its targets given), `ret` returns
//! to a return address, and the bytes given are the original code (with
//! probert's own `int3`s restored).

use std::borrow::Cow;
use std::fmt;

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind};

use super::indirect::{Indirect, Slicer};
use super::insn::{classify, decode_and_classify};
use super::{Displaced, Reg, JUMP_LEN};
use crate::arch::x86_64::insn::Target;

/// Most instructions in a run [`FunctionFlow::run_through`] checks.
const MAX_RUN: usize = 8;

/// Functions longer than this are analysed up to here only (entry sources
/// are kept as 29-bit offsets).
const MAX_LEN: usize = 1 << 28;

/// Where an entry point comes from (named in refusals).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntrySource {
    /// A direct branch or call at this address.
    Branch(usize),
    /// A jump-table entry of the indirect jump at this address.
    JumpTable(usize),
    /// The instruction at this address takes the target's address.
    AddressTaken(usize),
    /// An `endbr64` (an indirect-branch target) starts there.
    Endbr,
    /// The caller gave it (a landing pad, a symbol, a relocation target).
    Given,
    /// A branch, jump table or address taken of another function, at this
    /// address if known.
    Foreign(Option<usize>),
}

impl fmt::Display for EntrySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            EntrySource::Branch(a) => write!(f, "a branch at {a:#x}"),
            EntrySource::JumpTable(a) => write!(f, "a jump-table target of the jump at {a:#x}"),
            EntrySource::AddressTaken(a) => {
                write!(f, "an address taken by the instruction at {a:#x}")
            }
            EntrySource::Endbr => f.write_str("an endbr64 (indirect-branch target)"),
            EntrySource::Given => f.write_str("an entry the caller gave (landing pad, symbol)"),
            EntrySource::Foreign(Some(a)) => {
                write!(
                    f,
                    "a branch, table or address of another function, at {a:#x},"
                )
            }
            EntrySource::Foreign(None) => {
                f.write_str("a branch, table or address of another function")
            }
        }
    }
}

/// Why no fast site covers an address; the messages name the address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The address is outside the function analysed.
    #[error("{addr:#x} lies outside the function [{start:#x}, {end:#x})")]
    Outside {
        /// The address.
        addr: usize,
        /// The function's start.
        start: usize,
        /// The function's end.
        end: usize,
    },
    /// No instruction starts at the address.
    #[error("{addr:#x} is not an instruction boundary")]
    NotBoundary {
        /// The address.
        addr: usize,
    },
    /// Fewer than 5 bytes of whole instructions follow.
    #[error("the function ends before 5 bytes from {addr:#x}")]
    TooShort {
        /// Where the jump would go.
        addr: usize,
    },
    /// Decoding stopped there (data in code, or bounds that cut an
    /// instruction): the rest of the function is unknown.
    #[error("the bytes at {at:#x} do not decode: the function's branches are unknown")]
    Undecodable {
        /// The first undecodable byte.
        at: usize,
    },
    /// An indirect jump of the function has targets that cannot be bounded.
    #[error("the indirect jump at {at:#x} cannot be bounded: {why}")]
    UnboundedJump {
        /// The jump.
        at: usize,
        /// What was not recognised.
        why: &'static str,
    },
    /// A branch target lands inside an instruction of the linear decode.
    #[error("{by} lands at {target:#x}, inside an instruction")]
    MisalignedTarget {
        /// The target.
        target: usize,
        /// Where it comes from.
        by: EntrySource,
    },
    /// An entry point lies strictly inside the run.
    #[error("{by} lands inside the displaced range, at {target:#x}")]
    BranchInside {
        /// The entry point.
        target: usize,
        /// Where it comes from.
        by: EntrySource,
    },
    /// An entry point is where the jump after an `endbr64` would go: the
    /// probe would fire for paths that never ran the probed `endbr64`.
    #[error("{by} lands at {target:#x}, right after the probed endbr64")]
    AfterEndbr {
        /// The entry point.
        target: usize,
        /// Where it comes from.
        by: EntrySource,
    },
    /// A call that is not the run's last instruction returns inside it.
    #[error("the call at {call:#x} returns inside the displaced range")]
    CallReturnsInside {
        /// The call.
        call: usize,
    },
    /// An instruction of the run cannot be relocated.
    #[error("the instruction at {at:#x} cannot be relocated: {reason}")]
    Unrelocatable {
        /// The instruction.
        at: usize,
        /// Why.
        reason: Cow<'static, str>,
    },
    /// An instruction of the function accesses the bytes the jump overwrites.
    #[error("the instruction at {at:#x} accesses the bytes the jump would overwrite")]
    ReadsPatched {
        /// The instruction.
        at: usize,
    },
}

/// A displaceable run: the jump over `[jump, end)`, probing `probe`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Site {
    /// The probed address: the RIP handlers see.
    pub probe: usize,
    /// Where the 5-byte `jmp` is written: `probe`, or `probe + 4` after an
    /// `endbr64`.
    pub jump: usize,
    /// The end of the displaced instructions; the stub jumps back here.
    pub end: usize,
}

/// Where an indirect jump through a code pointer (not a jump table) may go:
/// the caller's statement about where the code's pointers come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointerJumps {
    /// Anywhere: such a jump leaves the function unproven. For code whose
    /// data may hold code addresses nobody lists (JIT code, non-PIE
    /// executables, whose data holds absolute addresses without
    /// relocations).
    Anywhere,
    /// Only to entry points: the caller's `entries` hold every address
    /// inside the function that data names (the module's dynamic
    /// relocations and symbols, true of position-independent code), and
    /// [`link_module`] adds those other functions' code takes. Then a loaded
    /// pointer is a function start, a return address, or one of those —
    /// unless the function takes an address of its own code, which it may
    /// offset before it jumps (a computed goto): such a function stays
    /// unproven.
    ToEntries,
}

/// One entry point, relative to the function start: 8 bytes.
#[derive(Clone, Copy, Debug)]
struct Entry {
    target: u32,
    /// The source's offset from the function start, times 8, plus the
    /// [`Kind`]; [`NO_SOURCE`] for a source unknown or out of range.
    from_kind: i32,
}

/// `Entry::from_kind >> 3` when the source is not known.
const NO_SOURCE: i32 = i32::MIN >> 3;

impl Entry {
    fn new(target: usize, from: Option<i64>, kind: Kind) -> Entry {
        let from = from
            .and_then(|f| i32::try_from(f).ok())
            .filter(|f| (NO_SOURCE + 1..=i32::MAX >> 3).contains(f))
            .unwrap_or(NO_SOURCE);
        Entry {
            target: target as u32,
            from_kind: from << 3 | kind as i32,
        }
    }

    fn kind(&self) -> Kind {
        Kind::ALL[(self.from_kind & 7) as usize]
    }

    /// The source, relative to the function start.
    fn from(&self) -> Option<i64> {
        let f = self.from_kind >> 3;
        (f != NO_SOURCE).then_some(i64::from(f))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Branch = 0,
    JumpTable = 1,
    AddressTaken = 2,
    Endbr = 3,
    Given = 4,
    Foreign = 5,
}

impl Kind {
    /// Indexed by the discriminant (the last two repeat `Given`: unused).
    const ALL: [Kind; 8] = [
        Kind::Branch,
        Kind::JumpTable,
        Kind::AddressTaken,
        Kind::Endbr,
        Kind::Given,
        Kind::Foreign,
        Kind::Given,
        Kind::Given,
    ];
}

/// What the analysis of one function proved; see the module docs.
#[derive(Clone, Debug)]
pub struct FunctionFlow {
    start: usize,
    len: u32,
    /// The end of the last whole instruction decoded.
    decoded: u32,
    /// Word `2w`, bit `b`: an instruction starts at offset `64w + b`; word
    /// `2w + 1`: that instruction is a near call.
    bits: Box<[u64]>,
    /// Sorted by target, one per target.
    entries: Box<[Entry]>,
    /// What most functions do not have.
    rare: Option<Box<Rare>>,
    /// Whether the last instruction ends at the function's end and never
    /// falls through it (`ret`, `jmp`): then alignment padding after the
    /// function is never executed.
    last_stops: bool,
    /// The ends, from the function's end, of the first padding
    /// instructions after it ([`set_padding`](Self::set_padding)), 0 past
    /// the last: where a run at the function's end may stop.
    pad_ends: [u8; 4],
}

/// The parts of a [`FunctionFlow`] most functions leave empty, kept behind
/// one pointer.
#[derive(Clone, Debug, Default)]
struct Rare {
    /// Instructions that cannot be relocated, sorted, with the reason.
    unrelocatable: Box<[(u32, Cow<'static, str>)]>,
    /// `(offset, accessed start, accessed end)` of instructions accessing
    /// the function's own bytes through a RIP-relative operand.
    reads: Box<[(u32, u32, u32)]>,
    /// `endbr64` offsets.
    endbr: Box<[u32]>,
    /// Where the indirect-jump analysis relied on knowing every way in:
    /// `(first, last)` instruction offsets, inclusive.
    windows: Box<[(u32, u32)]>,
    /// Why runs of several instructions are refused everywhere, if they are.
    unproven: Option<Refusal>,
    /// `(target, source)` of branches, table entries and addresses taken
    /// that leave the function, until taken.
    foreign: Vec<(usize, usize)>,
    /// Offsets of the indirect jumps through code pointers (not tables),
    /// sorted: they may leave the function.
    pointer_jumps: Box<[u32]>,
}

impl Rare {
    fn is_empty(&self) -> bool {
        self.unrelocatable.is_empty()
            && self.reads.is_empty()
            && self.endbr.is_empty()
            && self.windows.is_empty()
            && self.unproven.is_none()
            && self.foreign.is_empty()
            && self.pointer_jumps.is_empty()
    }
}

impl FunctionFlow {
    /// Analyses the function whose original bytes are `code`, mapped at
    /// `start` (exact bounds). `entries` are addresses execution may arrive
    /// at that the code does not show: landing pads, symbols and relocation
    /// targets inside the function (others are ignored). `read` reads memory
    /// (jump tables, often in `.rodata`) without faulting, `false` if it
    /// cannot. `pointers` says where jumps through code pointers may go.
    pub fn analyze(
        code: &[u8],
        start: usize,
        entries: &[usize],
        read: &dyn Fn(usize, &mut [u8]) -> bool,
        pointers: PointerJumps,
    ) -> FunctionFlow {
        let code = &code[..code.len().min(MAX_LEN)];
        let len = code.len();
        let words = len.div_ceil(64);
        let mut bits = vec![0u64; 2 * words];
        let mut instrs = Vec::with_capacity(len / 4 + 1);
        let mut decoder = Decoder::with_ip(64, code, start as u64, DecoderOptions::NONE);
        let mut undecodable = None;
        let mut decoded = 0;
        let mut last_stops = false;
        while decoder.can_decode() {
            let i = decoder.decode();
            if i.is_invalid() {
                undecodable = Some(decoded);
                break;
            }
            decoded += i.len();
            last_stops = matches!(
                i.flow_control(),
                FlowControl::Return
                    | FlowControl::UnconditionalBranch
                    | FlowControl::IndirectBranch
            );
            instrs.push(i);
        }

        let mut b = Builder {
            start,
            len,
            entries: Vec::new(),
            unrelocatable: Vec::new(),
            reads: Vec::new(),
            endbr: Vec::new(),
            foreign: Vec::new(),
        };
        let mut indirect = Vec::new();
        for (k, i) in instrs.iter().enumerate() {
            let off = (i.ip() as usize) - start;
            bits[off / 64 * 2] |= 1 << (off % 64);
            if i.mnemonic() == Mnemonic::Call {
                bits[off / 64 * 2 + 1] |= 1 << (off % 64);
            }
            b.scan(i, off, &code[off..off + i.len()]);
            if i.flow_control() == FlowControl::IndirectBranch {
                indirect.push(k);
            }
        }
        for &e in entries {
            b.entry(e, 0, Kind::Given);
        }

        let mut unproven = undecodable.map(|at| Refusal::Undecodable { at: start + at });
        let (mut windows, mut pointer_jumps) = (Vec::new(), Vec::new());
        if !indirect.is_empty() {
            let r = resolve_indirect(&instrs, start, &mut b, &indirect, read, pointers);
            b.foreign.extend(r.outside);
            windows = r.windows;
            unproven = unproven.or(r.unproven);
            pointer_jumps = r.pointers;
        }

        let mut entries = b.entries;
        entries.sort_by_key(|e| e.target);
        entries.dedup_by_key(|e| e.target);
        let rare = Rare {
            unrelocatable: b.unrelocatable.into(),
            reads: b.reads.into(),
            endbr: b.endbr.into(),
            windows: windows.into(),
            unproven,
            foreign: b.foreign,
            pointer_jumps: pointer_jumps.into(),
        };
        let mut flow = FunctionFlow {
            start,
            len: len as u32,
            decoded: decoded as u32,
            bits: bits.into(),
            entries: entries.into(),
            rare: (!rare.is_empty()).then(|| Box::new(rare)),
            last_stops: last_stops && decoded == len,
            pad_ends: [0; 4],
        };
        flow.check_entries(&[]);
        flow
    }

    /// How many bytes after the function's end are padding a run may use.
    fn padding_len(&self) -> usize {
        self.pad_ends
            .iter()
            .map(|&e| usize::from(e))
            .max()
            .unwrap_or(0)
    }

    /// Gives the bytes between the function's end and the next function
    /// (the caller found nothing there: no symbol, no FDE). Where they
    /// begin with padding — `nop`s of any length, `int3` — and the
    /// function's last instruction never falls through, a site near the
    /// end may displace its last instructions with those padding
    /// instructions: the jump then overwrites padding nothing executes
    /// (a 4-byte `mov eax, [rdi - 8]; ret` is probed fast).
    pub fn set_padding(&mut self, bytes: &[u8]) {
        if !self.last_stops {
            return;
        }
        let end = self.end() as u64;
        let mut decoder = Decoder::with_ip(64, bytes, end, DecoderOptions::NONE);
        let (mut n, mut at) = (0, 0usize);
        while n < self.pad_ends.len() && at < JUMP_LEN - 1 && decoder.can_decode() {
            let i = decoder.decode();
            if i.is_invalid() || !matches!(i.mnemonic(), Mnemonic::Nop | Mnemonic::Int3) {
                break;
            }
            at += i.len();
            match u8::try_from(at) {
                Ok(e) => self.pad_ends[n] = e,
                Err(_) => break,
            }
            n += 1;
        }
    }

    /// The function's first byte.
    pub fn start(&self) -> usize {
        self.start
    }

    /// The end of the function (exclusive).
    pub fn end(&self) -> usize {
        self.start + self.len as usize
    }

    /// The end of the last whole instruction decoded: [`end`](Self::end)
    /// unless decoding stopped early.
    pub fn decoded_end(&self) -> usize {
        self.start + self.decoded as usize
    }

    /// Whether an instruction of the linear decode starts at `addr` (`false`
    /// past [`decoded_end`](Self::decoded_end), where nothing is known).
    pub fn is_boundary(&self, addr: usize) -> bool {
        addr.checked_sub(self.start)
            .is_some_and(|o| o < self.decoded as usize && self.starts_at(o))
    }

    /// Every instruction start, ascending.
    pub fn boundaries(&self) -> impl Iterator<Item = usize> + '_ {
        let start = self.start;
        self.bits
            .iter()
            .step_by(2)
            .enumerate()
            .flat_map(move |(w, &bits)| {
                (0..64)
                    .filter(move |b| (bits >> b) & 1 == 1)
                    .map(move |b| start + w * 64 + b)
            })
    }

    /// Why no run of several instructions is displaceable anywhere in the
    /// function, if that is so.
    pub fn unproven(&self) -> Option<&Refusal> {
        self.rare.as_ref()?.unproven.as_ref()
    }

    /// Whether the indirect jump at `addr` is one through a code pointer (a
    /// tail call through a function pointer, say), which may leave the
    /// function, rather than a bounded jump table.
    pub fn jumps_through_pointer(&self, addr: usize) -> bool {
        let (Some(r), Some(o)) = (&self.rare, addr.checked_sub(self.start)) else {
            return false;
        };
        u32::try_from(o).is_ok_and(|o| r.pointer_jumps.binary_search(&o).is_ok())
    }

    /// [`displaceable`](Self::displaceable) at the function's entry. When it
    /// starts with `endbr64`, the jump goes after it.
    pub fn site_for_entry(&self) -> Result<Site, Refusal> {
        self.displaceable(self.start)
    }

    /// The shortest run of whole instructions from `site` covering the
    /// 5-byte jump that can be displaced, or why there is none. A site that
    /// is an `endbr64` keeps it: the run starts after it.
    pub fn displaceable(&self, site: usize) -> Result<Site, Refusal> {
        let outside = || Refusal::Outside {
            addr: site,
            start: self.start,
            end: self.end(),
        };
        let off = site.checked_sub(self.start).ok_or_else(outside)?;
        if off >= self.len as usize {
            return Err(outside());
        }
        if !self.is_boundary(site) {
            return match self.unproven() {
                Some(u @ Refusal::Undecodable { at }) if site >= *at => Err(u.clone()),
                _ => Err(Refusal::NotBoundary { addr: site }),
            };
        }
        let endbr = self.rare.as_ref().map_or(&[][..], |r| &r.endbr);
        let jump = if endbr.binary_search(&(off as u32)).is_ok() {
            let jump = off + 4;
            if let Some(e) = self.entry_at(jump) {
                return Err(Refusal::AfterEndbr {
                    target: self.start + jump,
                    by: self.source(e),
                });
            }
            jump
        } else {
            off
        };

        // The run: instruction starts `jump = b[0] < b[1] < ... < end`.
        let decoded = self.decoded as usize;
        if jump + JUMP_LEN > decoded {
            // Into the padding after the function, if there is enough.
            let Some(pad) = self.padding_reaching(jump + JUMP_LEN) else {
                return Err(match self.unproven() {
                    Some(u @ Refusal::Undecodable { .. }) => u.clone(),
                    _ => Refusal::TooShort {
                        addr: self.start + jump,
                    },
                });
            };
            let mut insns = [0usize; JUMP_LEN];
            let mut n = 0;
            let mut at = jump;
            while at < decoded {
                insns[n] = at;
                n += 1;
                at = self.next_boundary(at);
            }
            return self.check_run(site, jump, &insns[..n], decoded + pad);
        }
        let mut insns = [0usize; JUMP_LEN];
        let mut n = 0;
        let mut end = jump;
        while end < jump + JUMP_LEN {
            insns[n] = end;
            n += 1;
            end = self.next_boundary(end);
        }
        self.check_run(site, jump, &insns[..n], end)
    }

    /// The run of whole instructions `[site, end)` — at least the 5 bytes of
    /// the jump, possibly more — if it can be displaced, or why not: the
    /// checks of [`displaceable`](Self::displaceable) for a run that must
    /// end at `end` (a function's exit run, which ends with its `ret`).
    pub fn run_through(&self, site: usize, end: usize) -> Result<Site, Refusal> {
        let off = site.checked_sub(self.start).ok_or(Refusal::Outside {
            addr: site,
            start: self.start,
            end: self.end(),
        })?;
        let stop = end.saturating_sub(self.start);
        if !self.is_boundary(site) || stop > self.decoded as usize {
            return Err(Refusal::NotBoundary { addr: site });
        }
        if stop < off + JUMP_LEN {
            return Err(Refusal::TooShort { addr: site });
        }
        let mut insns = [0usize; MAX_RUN];
        let mut n = 0;
        let mut at = off;
        while at < stop {
            if n == MAX_RUN {
                return Err(Refusal::TooShort { addr: site });
            }
            insns[n] = at;
            n += 1;
            at = self.next_boundary(at);
        }
        if at != stop {
            return Err(Refusal::NotBoundary { addr: end });
        }
        self.check_run(site, off, &insns[..n], stop)
    }

    /// The run of the function's last instruction, the `ret` at `ret` (the
    /// function ends at its end), with the padding after the function
    /// that completes the jump — or `None`. A `ret` too short for the jump
    /// then needs no instruction before it: nothing is relocated, and the
    /// instructions before it stay free for other probes (a function's
    /// entry run among them, in a small function).
    pub fn exit_into_padding(&self, ret: usize) -> Option<Site> {
        let off = ret.checked_sub(self.start)?;
        let decoded = self.decoded as usize;
        if !self.is_boundary(ret) || self.next_boundary(off) != decoded {
            return None;
        }
        let pad = self.padding_reaching(off + JUMP_LEN)?;
        self.check_run(ret, off, &[off], decoded + pad).ok()
    }

    /// The fewest bytes of the padding after the function, in whole
    /// padding instructions, that reach offset `end` — only in a proven,
    /// wholly decoded function, where nothing jumps into the padding.
    fn padding_reaching(&self, end: usize) -> Option<usize> {
        let decoded = self.decoded as usize;
        if self.unproven().is_some() || decoded != self.len as usize {
            return None;
        }
        self.pad_ends
            .iter()
            .map(|&e| usize::from(e))
            .take_while(|&e| e > 0)
            .find(|&e| decoded + e >= end)
    }

    /// The checks of a run: instruction starts `insns` (offsets), from
    /// `jump` to `end`.
    fn check_run(
        &self,
        site: usize,
        jump: usize,
        insns: &[usize],
        end: usize,
    ) -> Result<Site, Refusal> {
        let n = insns.len();
        if n > 1 {
            if let Some(u) = self.unproven() {
                return Err(u.clone());
            }
        }
        for w in insns[..n].windows(2) {
            if self.calls_at(w[0]) {
                return Err(Refusal::CallReturnsInside {
                    call: self.start + w[0],
                });
            }
            if let Some(e) = self.entry_at(w[1]) {
                return Err(Refusal::BranchInside {
                    target: self.start + w[1],
                    by: self.source(e),
                });
            }
        }
        let Some(rare) = self.rare.as_deref() else {
            return Ok(Site {
                probe: site,
                jump: self.start + jump,
                end: self.start + end,
            });
        };
        for &o in &insns[..n] {
            if let Ok(k) = rare
                .unrelocatable
                .binary_search_by_key(&(o as u32), |u| u.0)
            {
                return Err(Refusal::Unrelocatable {
                    at: self.start + o,
                    reason: rare.unrelocatable[k].1.clone(),
                });
            }
        }
        let patched = (jump as u32, (jump + JUMP_LEN) as u32);
        if let Some(r) = rare
            .reads
            .iter()
            .find(|r| r.1 < patched.1 && r.2 > patched.0)
        {
            return Err(Refusal::ReadsPatched {
                at: self.start + r.0 as usize,
            });
        }
        Ok(Site {
            probe: site,
            jump: self.start + jump,
            end: self.start + end,
        })
    }

    /// Adds entry points the analysis could not see (more landing pads,
    /// symbols, relocation targets; a JIT's own knowledge).
    pub fn add_entries(&mut self, targets: &[usize]) {
        let list: Vec<_> = targets.iter().map(|&t| (t, None)).collect();
        self.add(&list, Kind::Given);
    }

    /// The `(target, source)` pairs of direct branches, calls, jump-table
    /// entries and `lea`s of this function that leave it, taken (the flow
    /// keeps none). [`link_module`] takes them for a whole module.
    pub fn take_foreign(&mut self) -> Vec<(usize, usize)> {
        let Some(rare) = self.rare.as_mut() else {
            return Vec::new();
        };
        let foreign = std::mem::take(&mut rare.foreign);
        if rare.is_empty() {
            self.rare = None;
        }
        foreign
    }

    /// Heap bytes held by the flow, for accounting.
    pub fn heap_bytes(&self) -> usize {
        let (bits, entries, rare) = self.heap_parts();
        bits + entries + rare
    }

    /// `(bitmaps, entry points, the rest)` of [`heap_bytes`](Self::heap_bytes).
    pub(super) fn heap_parts(&self) -> (usize, usize, usize) {
        use std::mem::{size_of, size_of_val};
        let rare = self.rare.as_deref().map_or(0, |r| {
            size_of::<Rare>()
                + size_of_val(&*r.unrelocatable)
                + size_of_val(&*r.reads)
                + size_of_val(&*r.endbr)
                + size_of_val(&*r.windows)
                + size_of_val(&*r.pointer_jumps)
                + r.foreign.capacity() * size_of::<(usize, usize)>()
        });
        (size_of_val(&*self.bits), size_of_val(&*self.entries), rare)
    }

    /// Adds entries from outside the analysis and re-checks what depends on
    /// them.
    fn add(&mut self, list: &[(usize, Option<usize>)], kind: Kind) {
        let mut entries = self.entries.to_vec();
        let old = entries.len();
        let mut new = Vec::new();
        for &(t, from) in list {
            let Some(target) = t.checked_sub(self.start).filter(|&o| o < self.len as usize) else {
                continue;
            };
            let from = from.and_then(|f| i64::try_from(f as i128 - self.start as i128).ok());
            entries.push(Entry::new(target, from, kind));
            new.push(target as u32);
        }
        if entries.len() == old {
            return;
        }
        entries.sort_by_key(|e| e.target);
        entries.dedup_by_key(|e| e.target);
        self.entries = entries.into();
        self.check_entries(&new);
    }

    /// Marks the function unproven if an entry lands inside an instruction,
    /// or one of `unseen` (entries the indirect-jump analysis did not know)
    /// where that analysis relied on knowing every way in.
    fn check_entries(&mut self, unseen: &[u32]) {
        if self.unproven().is_some() {
            return;
        }
        let misaligned = self.entries.iter().find(|e| {
            let t = e.target as usize;
            t < self.decoded as usize && !self.starts_at(t)
        });
        if let Some(e) = misaligned {
            let r = Refusal::MisalignedTarget {
                target: self.start + e.target as usize,
                by: self.source(e),
            };
            self.rare.get_or_insert_with(Default::default).unproven = Some(r);
            return;
        }
        let windows = self.rare.as_ref().map_or(&[][..], |r| &r.windows);
        for &t in unseen {
            if let Some(w) = windows.iter().find(|w| w.0 <= t && t <= w.1) {
                let by = self.entry_at(t as usize).map(|e| self.source(e));
                let r = Refusal::UnboundedJump {
                    at: self.start + w.1 as usize,
                    why: match by {
                        Some(EntrySource::JumpTable(_)) => {
                            "a jump-table target lands where its analysis assumed no branch"
                        }
                        _ => "another function branches where its analysis assumed no branch",
                    },
                };
                self.rare.get_or_insert_with(Default::default).unproven = Some(r);
                return;
            }
        }
    }

    /// The instruction start after the one at `off`, or the decoded end.
    fn next_boundary(&self, off: usize) -> usize {
        let decoded = self.decoded as usize;
        let mut i = off + 1;
        while i < decoded {
            let w = self.bits[i / 64 * 2] >> (i % 64);
            if w != 0 {
                return (i + w.trailing_zeros() as usize).min(decoded);
            }
            i = (i / 64 + 1) * 64;
        }
        decoded
    }

    fn entry_at(&self, off: usize) -> Option<&Entry> {
        let k = self
            .entries
            .binary_search_by_key(&(off as u32), |e| e.target)
            .ok()?;
        Some(&self.entries[k])
    }

    fn source(&self, e: &Entry) -> EntrySource {
        let from = e
            .from()
            .map(|f| (self.start as i64).wrapping_add(f) as usize);
        let at = from.unwrap_or(0);
        match e.kind() {
            Kind::Branch => EntrySource::Branch(at),
            Kind::JumpTable => EntrySource::JumpTable(at),
            Kind::AddressTaken => EntrySource::AddressTaken(at),
            Kind::Endbr => EntrySource::Endbr,
            Kind::Given => EntrySource::Given,
            Kind::Foreign => EntrySource::Foreign(from),
        }
    }

    fn starts_at(&self, off: usize) -> bool {
        self.bits
            .get(off / 64 * 2)
            .is_some_and(|w| (w >> (off % 64)) & 1 == 1)
    }

    fn calls_at(&self, off: usize) -> bool {
        self.bits
            .get(off / 64 * 2 + 1)
            .is_some_and(|w| (w >> (off % 64)) & 1 == 1)
    }
}

/// Makes every branch, jump-table or `lea` target one function of a module
/// has strictly inside another function an entry point of that one (gcc's
/// `foo.cold` jumps back into `foo`; hand-written code jumps between its
/// entries), and takes the padding after a function from runs where one
/// lands there. Takes every flow's foreign targets. Call it once every function
/// of the module is analysed, before asking for runs.
pub fn link_module(flows: &mut [FunctionFlow]) {
    let mut order: Vec<usize> = (0..flows.len()).collect();
    order.sort_by_key(|&i| flows[i].start);
    let mut found: Vec<(usize, usize, usize)> = Vec::new();
    for i in 0..flows.len() {
        for (target, from) in flows[i].take_foreign() {
            let p = order.partition_point(|&j| flows[j].start <= target);
            let Some(&j) = p.checked_sub(1).and_then(|p| order.get(p)) else {
                continue;
            };
            let f = &mut flows[j];
            if target != f.start && target < f.end() {
                found.push((j, target, from));
            } else if target >= f.end() && target < f.end() + f.padding_len() {
                // Something arrives in the padding after `f`: not padding.
                f.pad_ends = [0; 4];
            }
        }
    }
    found.sort_unstable();
    for group in found.chunk_by(|a, b| a.0 == b.0) {
        let list: Vec<_> = group.iter().map(|&(_, t, f)| (t, Some(f))).collect();
        flows[group[0].0].add(&list, Kind::Foreign);
    }
}

/// What [`resolve_indirect`] found.
struct Resolution {
    /// `(target, jump)` of table targets outside the function.
    outside: Vec<(usize, usize)>,
    /// Where the analysis relied on knowing every way in.
    windows: Vec<(u32, u32)>,
    /// Why the function is unproven, if it is.
    unproven: Option<Refusal>,
    /// The jumps classified as through code pointers.
    pointers: Vec<u32>,
}

/// The most rounds of indirect-jump analysis: each round knows the tables
/// the one before found (a switch in a loop reaches its own jump again).
const MAX_ROUNDS: usize = 4;

/// Classifies the indirect jumps `indirect` (instruction indices) until the
/// tables found are the tables known: adds their targets inside the function
/// to `b`, and returns those outside it, the windows the analysis relied on
/// and why the function is unproven, if it is.
fn resolve_indirect(
    instrs: &[Instruction],
    start: usize,
    b: &mut Builder,
    indirect: &[usize],
    read: &dyn Fn(usize, &mut [u8]) -> bool,
    pointers: PointerJumps,
) -> Resolution {
    let words = b.len.div_ceil(64);
    // A function that takes the address of its own code and jumps through a
    // pointer may jump to that address plus an offset (GNU C's `goto
    // *(&&base + offset[i])`, the computed goto for position-independent
    // code, whose offsets need no relocation): its pointers are not only
    // entry points.
    let takes_own = b.entries.iter().any(|e| e.kind() == Kind::AddressTaken);
    for _ in 0..MAX_ROUNDS {
        let (mut known, mut opaque) = (vec![0u64; words], vec![0u64; words]);
        let mut sources = Vec::new();
        for e in &b.entries {
            set(&mut known, e.target as usize);
            if let (Kind::Branch | Kind::JumpTable, Some(f)) = (e.kind(), e.from()) {
                let from = (f + start as i64) as u64;
                if let Ok(k) = instrs.binary_search_by_key(&from, |i| i.ip()) {
                    sources.push((e.target, k as u32));
                    continue;
                }
            }
            set(&mut opaque, e.target as usize);
        }
        sources.sort_unstable();
        sources.dedup();
        let mut slicer = Slicer::new(instrs, start, &known, &opaque, &sources, read);
        let (mut outside, mut windows, mut unproven) = (Vec::new(), Vec::new(), None);
        let (mut new, mut through_pointers) = (Vec::new(), Vec::new());
        for &k in indirect {
            let at = instrs[k].ip() as usize;
            match slicer.classify(k) {
                Ok(c) => {
                    windows.extend(c.relied);
                    match c.kind {
                        Indirect::Table(targets) => {
                            for t in targets {
                                match b.inside(t) {
                                    Some(o) => {
                                        let src = (o as u32, k as u32);
                                        if sources.binary_search(&src).is_err() {
                                            new.push((t, at));
                                        }
                                    }
                                    None => outside.push((t, at)),
                                }
                            }
                        }
                        Indirect::Pointer(why) => {
                            through_pointers.push((at - start) as u32);
                            if pointers == PointerJumps::Anywhere {
                                unproven.get_or_insert(Refusal::UnboundedJump { at, why });
                            } else if takes_own {
                                unproven.get_or_insert(Refusal::UnboundedJump {
                                    at,
                                    why: "it jumps through a pointer, and the function takes \
                                          addresses of its own code (a computed goto?)",
                                });
                            }
                        }
                    }
                }
                Err(why) => {
                    unproven.get_or_insert(Refusal::UnboundedJump { at, why });
                }
            }
        }
        if new.is_empty() {
            return Resolution {
                outside,
                windows,
                unproven,
                pointers: through_pointers,
            };
        }
        new.sort_unstable();
        new.dedup();
        for (t, at) in new {
            b.entry(t, at, Kind::JumpTable);
        }
    }
    let at = instrs[indirect[0]].ip() as usize;
    let why = "its jump tables keep adding targets its analysis walks through";
    Resolution {
        outside: Vec::new(),
        windows: Vec::new(),
        unproven: Some(Refusal::UnboundedJump { at, why }),
        pointers: Vec::new(),
    }
}

/// Collects what [`FunctionFlow::analyze`] learns per instruction.
struct Builder {
    start: usize,
    len: usize,
    entries: Vec<Entry>,
    unrelocatable: Vec<(u32, Cow<'static, str>)>,
    reads: Vec<(u32, u32, u32)>,
    endbr: Vec<u32>,
    foreign: Vec<(usize, usize)>,
}

impl Builder {
    /// Records the targets, taken addresses and relocatability of `i`, at
    /// offset `off`, whose bytes are `bytes`.
    fn scan(&mut self, i: &Instruction, off: usize, bytes: &[u8]) {
        let at = self.start + off;
        match i.flow_control() {
            FlowControl::UnconditionalBranch
            | FlowControl::ConditionalBranch
            | FlowControl::Call
            | FlowControl::XbeginXabortXend
                if matches!(
                    i.op0_kind(),
                    OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
                ) =>
            {
                self.target(i.near_branch_target() as usize, at, Kind::Branch);
            }
            _ => {}
        }
        if i.is_ip_rel_memory_operand() && i.mnemonic() != Mnemonic::Nop {
            let a = i.ip_rel_memory_address() as usize;
            if self.inside(a).is_none() && i.mnemonic() == Mnemonic::Lea {
                // Another function's code, perhaps: `link_module` decides.
                self.foreign.push((a, at));
            }
            if let Some(o) = self.inside(a) {
                if i.mnemonic() == Mnemonic::Lea {
                    self.entry(a, at, Kind::AddressTaken);
                } else {
                    let size = i.memory_size().size().max(1);
                    self.reads
                        .push((off as u32, o as u32, (o + size).min(self.len) as u32));
                }
            }
        }
        if matches!(i.mnemonic(), Mnemonic::Mov | Mnemonic::Push) {
            for n in 0..i.op_count() {
                if matches!(
                    i.op_kind(n),
                    OpKind::Immediate32 | OpKind::Immediate32to64 | OpKind::Immediate64
                ) {
                    let a = i.immediate(n) as usize;
                    if self.inside(a).is_some() {
                        self.entry(a, at, Kind::AddressTaken);
                    } else {
                        self.foreign.push((a, at));
                    }
                }
            }
        }
        if i.mnemonic() == Mnemonic::Endbr64 {
            self.endbr.push(off as u32);
            if off > 0 {
                self.entry(at, at, Kind::Endbr);
            }
        }
        // Branches decode again (Intel and AMD disagree on some); the rest
        // only needs classifying.
        let class = if i.flow_control() == FlowControl::Next {
            classify(i, at)
        } else {
            decode_and_classify(bytes, at).map(|(_, d)| d)
        };
        match class {
            Err(crate::Error::UnsupportedInstruction { reason, .. }) => {
                self.unrelocatable.push((off as u32, reason));
            }
            Err(e) => self.unrelocatable.push((off as u32, e.to_string().into())),
            Ok(Displaced::Call(Target::Reg(Reg::Rsp))) => self.unrelocatable.push((
                off as u32,
                "call rsp: its target moves with the pushed return address".into(),
            )),
            Ok(_) => {}
        }
    }

    /// The offset of `addr` if it lies in the function.
    fn inside(&self, addr: usize) -> Option<usize> {
        addr.checked_sub(self.start).filter(|&o| o < self.len)
    }

    /// An entry point at `target` if it lies in the function.
    fn entry(&mut self, target: usize, from: usize, kind: Kind) {
        if let Some(o) = self.inside(target) {
            let from = (from as i64).wrapping_sub(self.start as i64);
            self.entries.push(Entry::new(o, Some(from), kind));
        }
    }

    /// A branch target: an entry point, or a foreign target.
    fn target(&mut self, target: usize, from: usize, kind: Kind) {
        if self.inside(target).is_some() {
            self.entry(target, from, kind);
        } else {
            self.foreign.push((target, from));
        }
    }
}

/// Sets bit `i`.
fn set(bits: &mut [u64], i: usize) {
    bits[i / 64] |= 1 << (i % 64);
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: usize = 0x40_1000;
    /// Where the tests' jump tables live.
    const T: usize = 0x60_0000;

    fn no_memory(_: usize, _: &mut [u8]) -> bool {
        false
    }

    fn flow(code: &[u8]) -> FunctionFlow {
        FunctionFlow::analyze(code, A, &[], &no_memory, PointerJumps::Anywhere)
    }

    /// `code` analysed with `table` mapped at `T`.
    fn flow_with_table(code: &[u8], table: &[u8], pointers: PointerJumps) -> FunctionFlow {
        let read = |addr: usize, buf: &mut [u8]| {
            let Some(o) = addr.checked_sub(T) else {
                return false;
            };
            match table.get(o..o + buf.len()) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        };
        FunctionFlow::analyze(code, A, &[], &read, pointers)
    }

    fn site(probe: usize, jump: usize, end: usize) -> Result<Site, Refusal> {
        Ok(Site {
            probe: A + probe,
            jump: A + jump,
            end: A + end,
        })
    }

    fn rel32(from_end: usize, to: usize) -> [u8; 4] {
        ((to as i64 - from_end as i64) as i32).to_le_bytes()
    }

    /// push rbp; mov rbp, rsp; sub rsp, 16; mov eax, 1; leave; ret
    const PROLOGUE: [u8; 15] = [
        0x55, 0x48, 0x89, 0xE5, 0x48, 0x83, 0xEC, 0x10, 0xB8, 0x01, 0, 0, 0, 0xC9, 0xC3,
    ];

    #[test]
    fn an_entry_prologue_is_displaced_whole() {
        let f = flow(&PROLOGUE);
        assert_eq!(f.unproven(), None);
        assert_eq!(f.site_for_entry(), site(0, 0, 8));
        assert_eq!(f.displaceable(A + 1), site(1, 1, 8));
        assert_eq!(f.displaceable(A + 8), site(8, 8, 13));
        // leave; ret: two bytes, then the function ends.
        assert_eq!(
            f.displaceable(A + 13),
            Err(Refusal::TooShort { addr: A + 13 })
        );
        assert_eq!(
            f.displaceable(A + 2),
            Err(Refusal::NotBoundary { addr: A + 2 })
        );
        assert!(matches!(
            f.displaceable(A + 15),
            Err(Refusal::Outside { .. })
        ));
        assert!(matches!(
            f.displaceable(A - 1),
            Err(Refusal::Outside { .. })
        ));
        let b: Vec<usize> = f.boundaries().map(|a| a - A).collect();
        assert_eq!(b, [0, 1, 4, 8, 13, 14]);
        assert!(f.is_boundary(A + 4) && !f.is_boundary(A + 5) && !f.is_boundary(A + 15));
    }

    #[test]
    fn a_branch_into_the_run_refuses_it() {
        // 0: push rbp; 1: mov rbp, rsp; 4: dec edi; 6: jnz 4; 8: pop rbp; 9: ret
        let code = [0x55, 0x48, 0x89, 0xE5, 0xFF, 0xCF, 0x75, 0xFC, 0x5D, 0xC3];
        let f = flow(&code);
        assert_eq!(
            f.site_for_entry(),
            Err(Refusal::BranchInside {
                target: A + 4,
                by: EntrySource::Branch(A + 6),
            })
        );
        let msg = f.site_for_entry().unwrap_err().to_string();
        assert!(
            msg.contains("a branch at 0x401006") && msg.contains("0x401004"),
            "{msg}"
        );
        // From the branch target itself: dec edi; jnz (back to its own
        // start: fine, the jump there re-enters the stub); pop rbp.
        assert_eq!(f.displaceable(A + 4), site(4, 4, 9));
    }

    #[test]
    fn only_the_last_call_of_a_run_may_return() {
        // 0: xor edi, edi; 2: call f; 7: mov eax, 1; c: ret
        let mut code = vec![0x31, 0xFF, 0xE8];
        code.extend_from_slice(&rel32(A + 7, 0x50_0000));
        code.extend_from_slice(&[0xB8, 1, 0, 0, 0, 0xC3]);
        let f = flow(&code);
        assert_eq!(f.site_for_entry(), site(0, 0, 7));
        // 0: push rbx; 1: call rax; 3: pop rbx; 4: mov eax, 1; 9: ret
        let f = flow(&[0x53, 0xFF, 0xD0, 0x5B, 0xB8, 1, 0, 0, 0, 0xC3]);
        assert_eq!(
            f.site_for_entry(),
            Err(Refusal::CallReturnsInside { call: A + 1 })
        );
        assert_eq!(f.displaceable(A + 3), site(3, 3, 9));
    }

    #[test]
    fn endbr64_stays_and_the_jump_goes_after_it() {
        let mut code = vec![0xF3, 0x0F, 0x1E, 0xFA];
        code.extend_from_slice(&PROLOGUE);
        let f = flow(&code);
        assert_eq!(f.site_for_entry(), site(0, 4, 12));
        // A branch to right after the endbr64 would skip the probed one.
        // 0: endbr64; 4: push rbp; 5: dec edi; 7: jnz 4; 9: pop rbp; a: ret
        let code = [
            0xF3, 0x0F, 0x1E, 0xFA, 0x55, 0xFF, 0xCF, 0x75, 0xFB, 0x5D, 0xC3,
        ];
        assert_eq!(
            flow(&code).site_for_entry(),
            Err(Refusal::AfterEndbr {
                target: A + 4,
                by: EntrySource::Branch(A + 7),
            })
        );
        // An endbr64 inside a function is an entry point (indirect target).
        let mut code = PROLOGUE[..8].to_vec();
        code.extend_from_slice(&[0xF3, 0x0F, 0x1E, 0xFA, 0xC3]);
        let f = flow(&code);
        assert_eq!(
            f.displaceable(A + 4),
            Err(Refusal::BranchInside {
                target: A + 8,
                by: EntrySource::Endbr,
            })
        );
    }

    #[test]
    fn a_single_long_instruction_needs_no_proof() {
        // 0: mov eax, 1; 5: jmp rax (through a computed value); 7: nop...
        // 0: lea rax, [rdi + 8]; 4: mov ecx, 7; 9: jmp rax
        let code = [0x48, 0x8D, 0x47, 0x08, 0xB9, 7, 0, 0, 0, 0xFF, 0xE0];
        let f = flow(&code);
        assert!(matches!(
            f.unproven(),
            Some(Refusal::UnboundedJump { at, .. }) if *at == A + 9
        ));
        assert_eq!(f.site_for_entry(), Err(f.unproven().unwrap().clone()));
        assert_eq!(f.displaceable(A + 4), site(4, 4, 9));
    }

    #[test]
    fn undecodable_bytes_leave_the_function_unproven() {
        // 0: mov ecx, 7; 5: push rbx; 6: (invalid in 64-bit mode) push es
        let code = [0xB9, 7, 0, 0, 0, 0x53, 0x06, 0x90, 0x90, 0x90, 0x90];
        let f = flow(&code);
        assert_eq!(f.unproven(), Some(&Refusal::Undecodable { at: A + 6 }));
        assert_eq!(f.decoded_end(), A + 6);
        assert_eq!(f.site_for_entry(), site(0, 0, 5));
        assert_eq!(
            f.displaceable(A + 5),
            Err(Refusal::Undecodable { at: A + 6 })
        );
        assert_eq!(
            f.displaceable(A + 8),
            Err(Refusal::Undecodable { at: A + 6 })
        );
        assert!(!f.is_boundary(A + 7));
    }

    #[test]
    fn unrelocatable_instructions_and_reads_of_the_jump_bytes() {
        // 0: push rbx; 1: int3; 2: pop rbx; ...
        let f = flow(&[0x53, 0xCC, 0x5B, 0x90, 0x90, 0x90, 0xC3]);
        assert!(matches!(
            f.site_for_entry(),
            Err(Refusal::Unrelocatable { at, .. }) if at == A + 1
        ));
        // 0: push rbx; 1: xor eax, eax; 3: nop; 4: mov al, [rip - 8] (reads
        // byte 2, which the jump at 0 overwrites); a: nop; b: pop rbx; c: ret
        let code = [
            0x53, 0x31, 0xC0, 0x90, 0x8A, 0x05, 0xF8, 0xFF, 0xFF, 0xFF, 0x90, 0x5B, 0xC3,
        ];
        let f = flow(&code);
        assert_eq!(f.unproven(), None);
        assert_eq!(f.site_for_entry(), Err(Refusal::ReadsPatched { at: A + 4 }));
        assert_eq!(
            f.displaceable(A + 1),
            Err(Refusal::ReadsPatched { at: A + 4 })
        );
        assert_eq!(f.displaceable(A + 3), site(3, 3, 10));
        assert_eq!(f.displaceable(A + 4), site(4, 4, 10));
    }

    #[test]
    fn given_entries_and_taken_addresses_are_entry_points() {
        let read = &no_memory;
        let f = FunctionFlow::analyze(&PROLOGUE, A, &[A + 4], read, PointerJumps::Anywhere);
        assert_eq!(
            f.site_for_entry(),
            Err(Refusal::BranchInside {
                target: A + 4,
                by: EntrySource::Given,
            })
        );
        // 0: lea rax, [rip + 2] (= 9); 7: push rbp; 8: push rbx; 9: pop rbx;
        // a: pop rbp; b: mov eax, 1; 10: ret
        let code = [
            0x48, 0x8D, 0x05, 0x02, 0, 0, 0, 0x55, 0x53, 0x5B, 0x5D, 0xB8, 1, 0, 0, 0, 0xC3,
        ];
        let f = flow(&code);
        assert_eq!(
            f.displaceable(A + 7),
            Err(Refusal::BranchInside {
                target: A + 9,
                by: EntrySource::AddressTaken(A),
            })
        );
        assert_eq!(f.displaceable(A + 9), site(9, 9, 16));
        let mut f = flow(&PROLOGUE);
        f.add_entries(&[A + 1, A + 0x1000]);
        assert!(matches!(
            f.site_for_entry(),
            Err(Refusal::BranchInside { target, by: EntrySource::Given }) if target == A + 1
        ));
    }

    #[test]
    fn a_branch_into_an_instruction_leaves_the_function_unproven() {
        // 0: cmp dword [rdi], 0; 3: je 6 (into the lock cmpxchg, past lock);
        // 5: lock cmpxchg [rdi], ecx; 9: mov eax, 1; e: ret
        let code = [
            0x83, 0x3F, 0x00, 0x74, 0x01, 0xF0, 0x0F, 0xB1, 0x0F, 0xB8, 1, 0, 0, 0, 0xC3,
        ];
        let f = flow(&code);
        assert_eq!(
            f.unproven(),
            Some(&Refusal::MisalignedTarget {
                target: A + 6,
                by: EntrySource::Branch(A + 3),
            })
        );
        assert_eq!(f.displaceable(A + 9), site(9, 9, 14));
    }

    /// A PIC `switch` on edi with three cases:
    ///
    /// ```text
    ///  0: cmp edi, 2
    ///  3: ja 33
    ///  5: lea rdx, [rip + T]
    ///  c: movsxd rax, dword [rdx + rdi*4]
    /// 10: add rax, rdx
    /// 13: jmp rax
    /// 15: mov eax, 10; ret        (case 0)
    /// 1b: mov eax, 11; ret        (case 1)
    /// 21: mov eax, 12; ret        (case 2)
    /// 27: nop x12
    /// 33: xor eax, eax; ret       (default)
    /// ```
    fn switch() -> (Vec<u8>, Vec<u8>) {
        let mut code = vec![0x83, 0xFF, 0x02, 0x77, 0x2E, 0x48, 0x8D, 0x15];
        code.extend_from_slice(&rel32(A + 0xC, T));
        code.extend_from_slice(&[0x48, 0x63, 0x04, 0xBA, 0x48, 0x01, 0xD0, 0xFF, 0xE0]);
        for v in [10, 11, 12] {
            code.extend_from_slice(&[0xB8, v, 0, 0, 0, 0xC3]);
        }
        code.extend_from_slice(&[0x90; 12]);
        code.extend_from_slice(&[0x31, 0xC0, 0xC3]);
        let mut table = Vec::new();
        for case in [0x15usize, 0x1B, 0x21] {
            table.extend_from_slice(&((A + case) as i64 - T as i64).to_le_bytes()[..4]);
        }
        (code, table)
    }

    #[test]
    fn jump_table_targets_are_entry_points() {
        let (code, table) = switch();
        let f = flow_with_table(&code, &table, PointerJumps::Anywhere);
        assert_eq!(f.unproven(), None);
        // The run from the last nops covers the default's first byte only.
        assert_eq!(f.displaceable(A + 0x2E), site(0x2E, 0x2E, 0x33));
        // mov eax, 10 (5 bytes) alone: fine; ret + case 1: not.
        assert_eq!(f.displaceable(A + 0x15), site(0x15, 0x15, 0x1A));
        assert_eq!(
            f.displaceable(A + 0x1A),
            Err(Refusal::BranchInside {
                target: A + 0x1B,
                by: EntrySource::JumpTable(A + 0x13),
            })
        );
        // A table that cannot be read, or that has no bound, is not a table.
        let f = flow(&code);
        assert!(matches!(
            f.unproven(),
            Some(Refusal::UnboundedJump { why, .. }) if why.contains("cannot be read")
        ));
        let mut unbounded = code.clone();
        unbounded[3..5].copy_from_slice(&[0x90, 0x90]);
        let f = flow_with_table(&unbounded, &table, PointerJumps::ToEntries);
        assert!(matches!(
            f.unproven(),
            Some(Refusal::UnboundedJump { why, .. }) if why.contains("bound")
        ));
    }

    #[test]
    fn a_later_entry_between_the_bound_check_and_the_jump_unproves() {
        let (code, table) = switch();
        let mut f = flow_with_table(&code, &table, PointerJumps::Anywhere);
        f.add_entries(&[A + 0x33]);
        assert_eq!(f.unproven(), None, "the default is outside the window");
        f.add_entries(&[A + 0x0C]);
        assert!(matches!(
            f.unproven(),
            Some(Refusal::UnboundedJump { at, .. }) if *at == A + 0x13
        ));
    }

    #[test]
    fn table_bounds_through_copies_memory_and_jbe() {
        let (mut code, _) = switch();
        // `cmp byte [rsi], 2; ja; movzx edi, byte [rsi]`, with a store to
        // other bytes between: 0: cmp byte [rsi], 2 (80 3e 02); 3: ja.
        // Replace `cmp edi, 2` by it and put `movzx edi, byte [rsi]` (0f b6
        // 3e) where the lea was, moving the lea after.
        let mut m = vec![0x80, 0x3E, 0x02, 0x77, 0x31];
        m.extend_from_slice(&[0xC6, 0x46, 0x01, 0x07]); // mov byte [rsi + 1], 7
        m.extend_from_slice(&[0x0F, 0xB6, 0x3E]); // movzx edi, byte [rsi]
        m.extend_from_slice(&[0x48, 0x8D, 0x15]);
        m.extend_from_slice(&rel32(A + 0x13, T));
        m.extend_from_slice(&[0x48, 0x63, 0x04, 0xBA, 0x48, 0x01, 0xD0, 0xFF, 0xE0]);
        let shift = m.len() - 0x15;
        let mut table2 = Vec::new();
        for case in [0x15usize, 0x1B, 0x21] {
            let t = (A + case + shift) as i64 - T as i64;
            table2.extend_from_slice(&t.to_le_bytes()[..4]);
        }
        m.extend_from_slice(&code[0x15..]);
        let f = flow_with_table(&m, &table2, PointerJumps::Anywhere);
        assert_eq!(f.unproven(), None);
        assert_eq!(
            f.displaceable(A + 0x1A + shift),
            Err(Refusal::BranchInside {
                target: A + 0x1B + shift,
                by: EntrySource::JumpTable(A + 0x13 + shift),
            })
        );
        // A store through another register may change the byte: unbounded.
        let mut aliased = m.clone();
        aliased[6] = 0x47; // mov byte [rdi + 1], 7
        let f = flow_with_table(&aliased, &table2, PointerJumps::ToEntries);
        assert!(f.unproven().is_some());

        // The check as `cmp edi, 2; jbe table; jmp default`, the table's
        // block entered only from the jbe: 0: cmp edi, 2; 3: jbe 7; 5: jmp
        // 33 (short, to the default); 7: lea ...
        code.splice(3..5, [0x76, 0x02, 0xEB, 0x2E]);
        let mut table3 = Vec::new();
        for case in [0x15usize, 0x1B, 0x21] {
            table3.extend_from_slice(&((A + case + 2) as i64 - T as i64).to_le_bytes()[..4]);
        }
        code[10..14].copy_from_slice(&rel32(A + 0xE, T));
        let f = flow_with_table(&code, &table3, PointerJumps::Anywhere);
        assert_eq!(f.unproven(), None);
        assert_eq!(
            f.displaceable(A + 0x1C),
            Err(Refusal::BranchInside {
                target: A + 0x1D,
                by: EntrySource::JumpTable(A + 0x15),
            })
        );
    }

    /// `lea reg, [rip + T]` (7 bytes) assembled at `a`'s current offset.
    // dynasm's dynamic registers (`Rq(n)`) expand to an `.into()` of the number.
    #[allow(clippy::useless_conversion)]
    fn lea_t(a: &mut dynasmrt::VecAssembler<dynasmrt::x64::X64Relocation>, reg: u8) {
        lea_at(a, reg, T);
    }

    /// `lea reg, [rip + to]` (7 bytes) assembled at `a`'s current offset.
    #[allow(clippy::useless_conversion)]
    fn lea_at(a: &mut dynasmrt::VecAssembler<dynasmrt::x64::X64Relocation>, reg: u8, to: usize) {
        use dynasmrt::{dynasm, DynasmApi};
        let disp = to as i64 - (A + a.offset().0 + 7) as i64;
        dynasm!(a ; .arch x64 ; lea Rq(reg), [rip + disp as i32]);
    }

    /// A three-way switch on `edi` whose index reaches the jump through
    /// `setup`, with `between` instructions between the table's `lea` and
    /// the switch; returns the code and its table (targets: the cases).
    fn switch_with(
        setup: &dyn Fn(&mut dynasmrt::VecAssembler<dynasmrt::x64::X64Relocation>),
        between: usize,
    ) -> (Vec<u8>, Vec<u8>, [usize; 3]) {
        use dynasmrt::{dynasm, DynasmApi, DynasmLabelApi};
        let mut a = dynasmrt::VecAssembler::<dynasmrt::x64::X64Relocation>::new(A);
        lea_t(&mut a, 15);
        for _ in 0..between {
            dynasm!(a ; .arch x64 ; add esi, 1);
        }
        setup(&mut a);
        dynasm!(a
            ; .arch x64
            ; ja >default
            ; movsxd rax, DWORD [r15 + r12 * 4]
            ; add rax, r15
            ; jmp rax
        );
        let mut cases = [0; 3];
        for (i, c) in cases.iter_mut().enumerate() {
            *c = A + a.offset().0;
            dynasm!(a ; .arch x64 ; mov eax, i as i32 ; ret);
        }
        dynasm!(a ; .arch x64 ; default: ; xor eax, eax ; ret);
        let code = a.finalize().unwrap();
        let table = cases
            .iter()
            .flat_map(|&c| ((c as i64 - T as i64) as i32).to_le_bytes())
            .collect();
        (code, table, cases)
    }

    #[test]
    fn table_bounds_through_a_copy_compared_and_a_base_kept_across_a_loop() {
        use dynasmrt::{dynasm, DynasmApi};
        // sqlite3Parser: the index is copied (`mov rax, r12`) and the copy
        // compared (`cmp eax, 2; ja`).
        let copied = |a: &mut dynasmrt::VecAssembler<dynasmrt::x64::X64Relocation>| {
            dynasm!(a ; .arch x64 ; mov r12d, edi ; mov rax, r12 ; cmp eax, 2);
        };
        let (code, table, cases) = switch_with(&copied, 0);
        let f = flow_with_table(&code, &table, PointerJumps::Anywhere);
        assert_eq!(f.unproven(), None);
        assert!(matches!(
            f.displaceable(cases[1] - 1),
            Err(Refusal::BranchInside { target, by: EntrySource::JumpTable(_) }) if target == cases[1]
        ));
        // The copy's compare says nothing once the copy is overwritten.
        let clobbered = |a: &mut dynasmrt::VecAssembler<dynasmrt::x64::X64Relocation>| {
            dynasm!(a ; .arch x64 ; mov r12d, edi ; mov rax, r12 ; mov eax, esi ; cmp eax, 2);
        };
        let (code, table, _) = switch_with(&clobbered, 0);
        let f = flow_with_table(&code, &table, PointerJumps::ToEntries);
        assert!(matches!(
            f.unproven(),
            Some(Refusal::UnboundedJump { why, .. }) if why.contains("bound")
        ));
        // sqlite3VdbeSerialGet: `movzx eax, byte [rdx]; cmp al, 2; ja` —
        // the byte compare covers the index the movzx made; not one of a
        // word's low byte.
        let byte = |a: &mut dynasmrt::VecAssembler<dynasmrt::x64::X64Relocation>| {
            dynasm!(a ; .arch x64 ; movzx r12d, BYTE [rdx] ; cmp r12b, 2);
        };
        let (code, table, _) = switch_with(&byte, 0);
        assert_eq!(
            flow_with_table(&code, &table, PointerJumps::ToEntries).unproven(),
            None
        );
        let word = |a: &mut dynasmrt::VecAssembler<dynasmrt::x64::X64Relocation>| {
            dynasm!(a ; .arch x64 ; movzx r12d, WORD [rdx] ; cmp r12b, 2);
        };
        let (code, table, _) = switch_with(&word, 0);
        assert!(flow_with_table(&code, &table, PointerJumps::ToEntries)
            .unproven()
            .is_some());
        // sqlite3_str_vappendf: the table's base is set once, far before
        // the switch: finding it walks the whole function, and the bound
        // still has a budget of its own.
        let direct = |a: &mut dynasmrt::VecAssembler<dynasmrt::x64::X64Relocation>| {
            dynasm!(a ; .arch x64 ; mov r12d, edi ; cmp r12d, 2);
        };
        let (code, table, _) = switch_with(&direct, 1500);
        let f = flow_with_table(&code, &table, PointerJumps::Anywhere);
        assert_eq!(f.unproven(), None);
    }

    /// glibc's vfprintf dispatch: `c = r9b` is checked as `(c - 0x20) mod
    /// 256 <= 2` on a copy, then `table[class[c - 0x20]]` jumps, `class`
    /// (bytes at `T + 0x100`) naming one of three cases. The arguments
    /// break one link of the proof or another: the compare's offset, the
    /// index's, and the largest class.
    fn class_switch(
        lea_disp: i32,
        sub: i32,
        in_low_byte: bool,
        class_max: u8,
    ) -> (FunctionFlow, usize) {
        use dynasmrt::{dynasm, DynasmApi, DynasmLabelApi};
        let mut a = dynasmrt::VecAssembler::<dynasmrt::x64::X64Relocation>::new(A);
        dynasm!(a
            ; .arch x64
            ; movzx r9d, WORD [rdi]
            ; lea eax, [r9 + lea_disp]
            ; cmp al, 2
            ; ja >default
        );
        if in_low_byte {
            dynasm!(a ; .arch x64 ; movzx eax, r9b ; sub eax, sub);
        } else {
            // The index is the low byte of the difference: not `v + d`.
            dynasm!(a ; .arch x64 ; mov eax, r9d ; sub eax, sub ; movzx eax, al);
        }
        lea_t(&mut a, 7); // rdi = T: the jump table
        lea_at(&mut a, 6, T + 0x100); // rsi: the class table
        dynasm!(a ; .arch x64 ; cdqe);
        dynasm!(a
            ; .arch x64
            ; movzx eax, BYTE [rsi + rax]
            ; movsxd rax, DWORD [rdi + rax * 4]
            ; add rax, rdi
            ; jmp rax
        );
        let mut cases = [0; 3];
        for (i, c) in cases.iter_mut().enumerate() {
            *c = A + a.offset().0;
            dynasm!(a ; .arch x64 ; mov eax, i as i32 ; ret);
        }
        dynasm!(a ; .arch x64 ; default: ; xor eax, eax ; ret);
        let code = a.finalize().unwrap();
        let mut table = vec![0u8; 0x103];
        for (i, c) in cases.iter().enumerate() {
            table[4 * i..4 * i + 4].copy_from_slice(&((*c as i64 - T as i64) as i32).to_le_bytes());
        }
        // After the three entries, one into the first case's `mov`: a
        // table read too far lands inside an instruction.
        let inside = (cases[0] + 1) as i64 - T as i64;
        table[12..16].copy_from_slice(&(inside as i32).to_le_bytes());
        table[0x100..].copy_from_slice(&[class_max, 0, 1]);
        (
            flow_with_table(&code, &table, PointerJumps::ToEntries),
            cases[0],
        )
    }

    #[test]
    fn class_tables_and_a_byte_compared_through_an_offset_bound_the_index() {
        let (f, case0) = class_switch(-0x20, 0x20, true, 2);
        assert_eq!(f.unproven(), None);
        assert!(f.displaceable(case0).is_ok(), "{:?}", f.displaceable(case0));
        let (f, _) = class_switch(-0x20, 0x20, true, 3);
        assert!(
            matches!(f.unproven(), Some(r) if r.to_string().contains("inside an instruction")),
            "a class naming a 4th entry: {:?}",
            f.unproven()
        );
        for (d, sub, low, max) in [
            (-0x21, 0x20, true, 2), // the compare's offset is not the index's
            (-0x20, 0x1F, true, 2),
            (-0x20, 0x20, false, 2), // movzx after the sub
            (0x20, -0x20, true, 2),  // a positive offset: v + d may pass 255
        ] {
            let (f, _) = class_switch(d, sub, low, max);
            assert!(f.unproven().is_some(), "{d} {sub} {low} {max}");
        }
    }

    #[test]
    fn a_jump_through_a_register_set_to_one_label_is_a_direct_jump() {
        use dynasmrt::{dynasm, DynasmApi, DynasmLabelApi};
        // glibc's vfprintf: `lea rax, [rip + label]; ...; jmp rax`.
        let mut a = dynasmrt::VecAssembler::<dynasmrt::x64::X64Relocation>::new(A);
        dynasm!(a
            ; .arch x64
            ; lea rax, [>label]
            ; test edi, edi
            ; jmp rax
            ; nop
            ; label:
            ; mov eax, 1
            ; ret
        );
        let code = a.finalize().unwrap();
        let f = flow(&code);
        assert_eq!(f.unproven(), None);
        let label = A + code.len() - 6;
        assert!(matches!(
            f.displaceable(label - 1),
            Err(Refusal::BranchInside { target, .. }) if target == label
        ));
        assert!(f.displaceable(label).is_ok());
        // Two labels on two paths: not one target, a pointer.
        let mut a = dynasmrt::VecAssembler::<dynasmrt::x64::X64Relocation>::new(A);
        dynasm!(a
            ; .arch x64
            ; lea rax, [>one]
            ; test edi, edi
            ; jz >go
            ; lea rax, [>two]
            ; go:
            ; jmp rax
            ; one:
            ; mov eax, 1
            ; ret
            ; two:
            ; xor eax, eax
            ; ret
        );
        let code = a.finalize().unwrap();
        assert!(flow(&code).unproven().is_some());
    }

    #[test]
    fn absolute_tables_and_pointer_jumps() {
        // 0: cmp edi, 1; 3: ja 1b; 5: jmp [rdi*8 + T]; c: nop x3;
        // f: mov eax, 1; 14: ret; 15: mov eax, 2; 1a: ret; 1b: xor eax, eax; ret
        let mut code = vec![0x83, 0xFF, 0x01, 0x77, 0x16, 0xFF, 0x24, 0xFD];
        code.extend_from_slice(&(T as u32).to_le_bytes());
        code.extend_from_slice(&[0x90; 3]);
        code.extend_from_slice(&[0xB8, 1, 0, 0, 0, 0xC3, 0xB8, 2, 0, 0, 0, 0xC3]);
        code.extend_from_slice(&[0x31, 0xC0, 0xC3]);
        let mut table = Vec::new();
        for case in [0x0Fusize, 0x15] {
            table.extend_from_slice(&((A + case) as u64).to_le_bytes());
        }
        let f = flow_with_table(&code, &table, PointerJumps::Anywhere);
        assert_eq!(f.unproven(), None);
        assert_eq!(
            f.displaceable(A + 0x14),
            Err(Refusal::BranchInside {
                target: A + 0x15,
                by: EntrySource::JumpTable(A + 5),
            })
        );

        // 0: push rbx; 1: mov rax, [rdi + 8]; 5: pop rbx; 6: jmp rax
        let code = [0x53, 0x48, 0x8B, 0x47, 0x08, 0x5B, 0xFF, 0xE0];
        let f = flow(&code);
        assert!(matches!(
            f.unproven(),
            Some(Refusal::UnboundedJump { why, .. }) if why.contains("pointer")
        ));
        let f = FunctionFlow::analyze(&code, A, &[], &no_memory, PointerJumps::ToEntries);
        assert_eq!(f.unproven(), None);
        assert_eq!(f.site_for_entry(), site(0, 0, 5));
        // jmp [rip + got] and glibc's demangled pointers are pointers too.
        // 0: mov rax, [rdi]; 3: ror rax, 0x11; 7: xor rax, fs:[0x30]; 10: jmp rax
        let code = [
            0x48, 0x8B, 0x07, 0x48, 0xC1, 0xC8, 0x11, 0x64, 0x48, 0x33, 0x04, 0x25, 0x30, 0, 0, 0,
            0xFF, 0xE0,
        ];
        let f = FunctionFlow::analyze(&code, A, &[], &no_memory, PointerJumps::ToEntries);
        assert_eq!(f.unproven(), None);
        // ...but not an offset added to one.
        // 0: mov rax, [rdi]; 3: add rax, rsi; 6: jmp rax
        let code = [0x48, 0x8B, 0x07, 0x48, 0x01, 0xF0, 0xFF, 0xE0];
        let f = FunctionFlow::analyze(&code, A, &[], &no_memory, PointerJumps::ToEntries);
        assert!(matches!(
            f.unproven(),
            Some(Refusal::UnboundedJump { why, .. }) if why.contains("computed")
        ));
    }

    #[test]
    fn link_module_adds_other_functions_branches() {
        // f at A: the prologue. g at A + 0x100: jmp A + 4 (into f's run).
        let g_at = A + 0x100;
        let mut g = vec![0xE9];
        g.extend_from_slice(&rel32(g_at + 5, A + 4));
        let read = &no_memory;
        let mut flows = [
            FunctionFlow::analyze(&g, g_at, &[], read, PointerJumps::Anywhere),
            FunctionFlow::analyze(&PROLOGUE, A, &[], read, PointerJumps::Anywhere),
        ];
        assert_eq!(flows[1].site_for_entry(), site(0, 0, 8));
        assert_eq!(flows[0].take_foreign(), [(A + 4, g_at)]);
        let g = FunctionFlow::analyze(&g, g_at, &[], read, PointerJumps::Anywhere);
        flows[0] = g;
        link_module(&mut flows);
        assert_eq!(
            flows[1].site_for_entry(),
            Err(Refusal::BranchInside {
                target: A + 4,
                by: EntrySource::Foreign(Some(g_at)),
            })
        );
        assert!(flows[0].take_foreign().is_empty());
        assert!(flows[0].heap_bytes() < 64, "{}", flows[0].heap_bytes());
    }

    #[test]
    fn a_short_function_displaces_the_padding_after_it() {
        // mov eax, [rdi - 8]; ret — then what gcc aligns the next function
        // with: a 10-byte nop, or int3s.
        const SHORT: [u8; 4] = [0x8B, 0x47, 0xF8, 0xC3];
        const NOP10: [u8; 10] = [0x66, 0x2E, 0x0F, 0x1F, 0x84, 0, 0, 0, 0, 0];
        let read = &no_memory;
        let flow = || FunctionFlow::analyze(&SHORT, A, &[], read, PointerJumps::ToEntries);
        let too_short = Err(Refusal::TooShort { addr: A });
        assert_eq!(flow().site_for_entry(), too_short, "no padding given");
        let mut f = flow();
        f.set_padding(&NOP10);
        assert_eq!(f.site_for_entry(), site(0, 0, 14), "the whole nop");
        assert_eq!(f.end(), A + 4, "the function is as long as it was");
        assert!(!f.is_boundary(A + 4));
        let mut f = flow();
        f.set_padding(&[0xCC; 12]);
        assert_eq!(f.site_for_entry(), site(0, 0, 5), "one int3");
        // At the `ret`: four padding bytes.
        assert_eq!(f.displaceable(A + 3), site(3, 3, 8));
        // Code, not padding, after the function.
        let mut f = flow();
        f.set_padding(&[0x55, 0x48, 0x89, 0xE5]);
        assert_eq!(f.site_for_entry(), too_short);
        // Too little of it before the next function: enough for the entry,
        // not for the `ret`.
        let mut f = flow();
        f.set_padding(&[0x90]);
        assert_eq!(f.site_for_entry(), site(0, 0, 5));
        assert_eq!(
            f.displaceable(A + 3),
            Err(Refusal::TooShort { addr: A + 3 })
        );
        // A last instruction that falls through: the padding may run.
        let falls = [0x8B, 0x47, 0xF8, 0x90];
        let mut f = FunctionFlow::analyze(&falls, A, &[], read, PointerJumps::ToEntries);
        f.set_padding(&NOP10);
        assert_eq!(f.site_for_entry(), too_short);
        // A branch of another function into the padding.
        let g_at = A + 0x100;
        let mut g = vec![0xE9];
        g.extend_from_slice(&rel32(g_at + 5, A + 6));
        let mut f = flow();
        f.set_padding(&NOP10);
        let mut flows = [
            f,
            FunctionFlow::analyze(&g, g_at, &[], read, PointerJumps::ToEntries),
        ];
        link_module(&mut flows);
        assert_eq!(flows[0].site_for_entry(), too_short);
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut code = vec![0u8; 300];
        for _ in 0..300 {
            for b in &mut code {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let read = |_: usize, buf: &mut [u8]| {
                buf.fill(0x11);
                true
            };
            let len = (x % 300) as usize;
            let f =
                FunctionFlow::analyze(&code[..len], A, &[A + 3], &read, PointerJumps::ToEntries);
            for b in f.boundaries().collect::<Vec<_>>() {
                if let Ok(s) = f.displaceable(b) {
                    assert!(s.end >= s.jump + JUMP_LEN && s.end <= f.decoded_end());
                    assert!(
                        f.is_boundary(s.jump) && (s.end == f.decoded_end() || f.is_boundary(s.end))
                    );
                }
            }
        }
    }
}
