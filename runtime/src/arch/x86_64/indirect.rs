//! Bounding an indirect `jmp`: the `switch` jump tables gcc and clang emit
//! for x86_64, recognised in the decoded function and read from memory, and
//! jumps through code pointers.
//!
//! # The patterns
//!
//! ```text
//! PIC, relative entries              absolute entries (non-PIC, or PIC
//!   cmp    idx, N                      tables that need relocations)
//!   ja     default                       cmp   idx, N
//!   lea    base, [rip + table]           ja    default
//!   movsxd t, dword [base + idx*4]       jmp   qword [table + idx*8]
//!   add    t, base                       (or mov t, [base + idx*8]; jmp t)
//!   jmp    t
//! ```
//!
//! Any registers and any unrelated instructions in between are accepted;
//! `lea t, [t + base]` is the add. The index may be copied or extended after
//! the check (`mov eax, esi`, `movzx edx, dl`, `movsxd`), or loaded after a
//! check of its memory (`cmp byte [rbx + 0x65], 8; ja; ...; movzx eax, byte
//! [rbx + 0x65]`, no store that may touch it in between); the check may be
//! a `jbe`/`jb` to the table's block, and a few flag-preserving instructions
//! may separate the `cmp` from its branch; an `and idx, M` bounds the index
//! as well. The compare may be of a copy made after the index (`mov rax,
//! r12; cmp eax, N`, sqlite3Parser). An index loaded from a *class table*
//! (`movzx eax, byte [rip-table + i]`, `i` bounded) is at most the largest
//! byte of the entries `i` can read; and an `add`/`sub` of an immediate is
//! followed, with glibc vfprintf's byte check: `lea eax, [r9 - 0x20]; cmp
//! al, 0x5a; ja; movzx eax, r9b; sub eax, 0x20; cdqe` bounds the index by
//! 0x5a (see `visit_cur`). A compare narrower than the index (`cmp al` of
//! a 64-bit `rax`) bounds nothing. A `jmp reg` whose register holds one
//! `lea` of a label on every path is a direct jump there. A base the walk cannot follow (kept in a callee-saved register
//! across a loop) is accepted when one `lea` is the only instruction of the
//! function writing that register (`pop` aside). A *pointer* jump is one whose target was loaded from memory, returned by a
//! call or received from the caller, through register copies and glibc's
//! pointer demangling (`ror r, 0x11; xor r, fs:[0x30]`): `jmp [rip + got]`,
//! `jmp [rax + 0x38]`, `mov rax, [rdi]; jmp rax`.
//!
//! # How it works
//!
//! Values are followed backwards over the control-flow graph the direct
//! branches give: the predecessors of an instruction are the one before it
//! (unless that one is a `jmp` or `ret`) and the direct branches to it. An
//! instruction with any other kind of entry (a table target, a landing pad,
//! an address taken, a symbol) has predecessors nobody knows, and ends the
//! search with no answer. A register's *reaching definitions* are the
//! writes found on every path back (a call writes the caller-saved ones); a
//! bound is the largest `N` of an unsigned `cmp idx, N` guarding every path
//! (`ja` not taken, or `jbe` taken). Every instruction whose predecessors
//! the answer depends on is returned (all of them for a base found as the
//! only `lea`), so that entry points found later (other functions) can
//! invalidate it. The caller feeds each table's targets back as
//! predecessors (their table's jump) and repeats until no new target
//! appears: a `switch` in a loop reaches its own jump again.
//!
//! # Why this is correct
//!
//! The search visits every path into the jump that the known predecessors
//! allow, and refuses when predecessors are unknown, so the definitions and
//! guards it finds hold on every execution that reaches the jump while the
//! predecessors are as recorded; loops add no path that changes the answer
//! (a register unchanged around a loop keeps the value it entered with). An
//! unsigned compare that does not branch to the default leaves
//! `0 ≤ idx ≤ N`, so the jump reads one of the `N + 1` entries read here.
//! Reading more entries than the compiler meant (a bound from `movzx` or
//! `and` looser than the real one) only adds targets: more conservative,
//! never wrong. Whether a pointer jump may land in the function is the
//! caller's policy ([`PointerJumps`](super::PointerJumps)).

use std::collections::HashSet;

use iced_x86::{
    Code, ConditionCode, FlowControl, Instruction, InstructionInfoFactory, InstructionInfoOptions,
    Mnemonic, OpAccess, OpKind, Register,
};

/// The longest table read: more entries than any real `switch` table.
const MAX_ENTRIES: u64 = 1 << 14;
/// How many instructions one question of a classification (a register's
/// definitions, a table's address or anchor, an index's bound) may
/// examine, over all paths.
const BUDGET: usize = 1024;
/// How many register copies a table base may be followed through.
const MAX_COPIES: u32 = 6;

/// What an indirect jump can reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Indirect {
    /// A jump table: its targets, absolute.
    Table(Vec<usize>),
    /// A jump through a code pointer, described.
    Pointer(&'static str),
}

/// A classified indirect jump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Classified {
    /// What it reaches.
    pub kind: Indirect,
    /// Offset ranges (first and last instruction start, inclusive) of the
    /// instructions whose predecessors the answer relies on.
    pub relied: Vec<(u32, u32)>,
}

/// Why an indirect jump cannot be bounded; the message completes "the
/// indirect jump at X cannot be bounded: ...".
pub(super) type Unbounded = &'static str;

/// What a compare-and-branch bounds.
#[derive(Clone, Copy, Debug)]
enum Guarded {
    Reg(Register),
    Mem(MemLoc),
}

/// The ways into an instruction.
#[derive(Clone, Copy, Debug)]
enum Pred {
    /// The instruction before it, falling through (or returning from a call).
    Fall(usize),
    /// The direct branch at this index, taken.
    Taken(usize),
}

/// All ways into an instruction, if known.
struct Preds {
    list: Vec<Pred>,
    /// The function's first instruction: the caller's values arrive too.
    from_caller: bool,
}

/// The reaching definitions of a register.
struct Defs {
    insns: Vec<usize>,
    from_caller: bool,
}

/// A guard or write seen on a path back from an index load.
enum Step {
    /// The bound on this path.
    Found(u64),
    /// The bound of the index itself (not of `cur`: no offset to add).
    Exact(u64),
    /// Nothing decided yet: keep walking.
    Continue,
    /// No bound on this path (but see `IndexState::loose`).
    Fail,
}

/// The register holding the index on a path back, and what is known of it.
#[derive(Clone, Debug)]
struct IndexState {
    cur: Register,
    /// `cmp x, N; ja` seen for an `x` other than `cur` (with the width of
    /// the compare, bytes): valid for `cur` if `mov cur, x` comes before it
    /// with `x` unchanged in between.
    pending: Vec<(Register, u64, u8)>,
    /// A bound of the index from `movzx` (255 or 65535, plus `off`), used if
    /// no tighter one is found.
    loose: Option<u64>,
    /// The index is `cur`'s value plus this (an `add`/`sub` of an immediate
    /// passed on the way back: `sub eax, 0x20; cdqe`).
    off: i64,
    /// The bytes of `cur` the index is made of: 1 or 2 once a `movzx` of
    /// its low byte or word is passed, else 8. A compare narrower than that
    /// (but 32 bits, which the compilers use for 64-bit indexes whose upper
    /// half they zeroed) bounds nothing by itself: see `narrow`.
    width: u8,
    /// Compares of fewer bytes of `cur` than the index is made of, met
    /// before (nearer the jump) the `movzx` that will show whether they
    /// cover it (`movzx eax, byte [rdx]; cmp al, 8; ja`): the bound, the
    /// bytes compared, the offset then.
    narrow: Vec<(u64, u8, i64)>,
    /// The memory the index was loaded from, once the load is passed:
    /// `cmp byte [rbx + 0x65], 8; ja` bounds `movzx eax, byte [rbx + 0x65]`.
    mem: Option<MemLoc>,
}

impl IndexState {
    fn new(cur: Register) -> IndexState {
        IndexState {
            cur,
            pending: Vec::new(),
            loose: None,
            off: 0,
            width: 8,
            narrow: Vec::new(),
            mem: None,
        }
    }

    /// The index's bound when `cur`'s value is at most `n`: `None` when the
    /// offset could make it negative (a read before the table).
    fn adjust(&self, n: u64) -> Option<u64> {
        let off = u64::try_from(self.off).ok()?;
        n.checked_add(off).filter(|&b| b < MAX_ENTRIES)
    }

    /// Whether a compare of `w` bytes of `cur` bounds the index.
    fn covers(&self, w: u8) -> bool {
        w >= self.width.min(4)
    }
}

/// A memory operand `[base + index*scale + disp]` of `size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct MemLoc {
    base: Register,
    index: Register,
    scale: u32,
    disp: u64,
    size: usize,
}

impl MemLoc {
    /// The memory operand of `i`, if it is a plain one (no segment, no RIP).
    fn of(i: &Instruction) -> Option<MemLoc> {
        let plain = |r: Register| r == Register::None || r.is_gpr();
        (i.segment_prefix() == Register::None && plain(i.memory_base()) && plain(i.memory_index()))
            .then(|| MemLoc {
                base: i.memory_base(),
                index: i.memory_index(),
                scale: i.memory_index_scale(),
                disp: i.memory_displacement64(),
                size: i.memory_size().size(),
            })
    }
}

/// The decoded function, for walking it backwards.
pub(super) struct Slicer<'a> {
    instrs: &'a [Instruction],
    start: u64,
    /// Bit per byte: an entry point starts there.
    entries: &'a [u64],
    /// Bit per byte: an entry point with a source other than a direct branch.
    opaque: &'a [u64],
    /// `(target offset, source instruction index)` of direct branches,
    /// sorted.
    sources: &'a [(u32, u32)],
    /// Reads memory (tables) without faulting; `false` if it cannot.
    read: &'a dyn Fn(usize, &mut [u8]) -> bool,
    info: InstructionInfoFactory,
    budget: usize,
    relied: Vec<usize>,
    /// [`Slicer::only_lea`] answers, per register.
    only_lea: Vec<(Register, Option<u64>)>,
}

impl<'a> Slicer<'a> {
    /// A slicer over `instrs` (the whole function, in order, starting at
    /// `start`) and the entry points known so far, reading tables with
    /// `read`.
    pub fn new(
        instrs: &'a [Instruction],
        start: usize,
        entries: &'a [u64],
        opaque: &'a [u64],
        sources: &'a [(u32, u32)],
        read: &'a dyn Fn(usize, &mut [u8]) -> bool,
    ) -> Self {
        Slicer {
            instrs,
            start: start as u64,
            entries,
            opaque,
            sources,
            read,
            info: InstructionInfoFactory::new(),
            budget: 0,
            relied: Vec::new(),
            only_lea: Vec::new(),
        }
    }

    /// Classifies the indirect `jmp` at index `j`.
    pub fn classify(&mut self, j: usize) -> Result<Classified, Unbounded> {
        let read = self.read;
        self.budget = BUDGET;
        self.relied.clear();
        let jmp = self.instrs[j];
        let kind = match jmp.op0_kind() {
            OpKind::Register => self.register_jump(j, jmp.op0_register(), read)?,
            OpKind::Memory if jmp.memory_index() == Register::None => {
                Indirect::Pointer("it jumps through a pointer in memory (a tail call?)")
            }
            OpKind::Memory => self.absolute_table(j, &jmp, read)?,
            _ => return Err("an unexpected operand"),
        };
        let mut idx = std::mem::take(&mut self.relied);
        idx.sort_unstable();
        idx.dedup();
        let mut relied: Vec<(u32, u32)> = Vec::new();
        let mut prev = usize::MAX;
        for k in idx {
            let o = self.off(k) as u32;
            match relied.last_mut() {
                Some(r) if prev.wrapping_add(1) == k => r.1 = o,
                _ => relied.push((o, o)),
            }
            prev = k;
        }
        Ok(Classified { kind, relied })
    }

    /// `jmp reg`.
    fn register_jump(
        &mut self,
        j: usize,
        reg: Register,
        read: &dyn Fn(usize, &mut [u8]) -> bool,
    ) -> Result<Indirect, Unbounded> {
        let defs = self
            .reaching_defs(j, reg)
            .ok_or("its value comes from a path that is not known")?;
        if let ([d], false) = (defs.insns.as_slice(), defs.from_caller) {
            let di = self.instrs[*d];
            let addends = match (di.code(), di.op1_kind()) {
                (Code::Add_r64_rm64 | Code::Add_rm64_r64, OpKind::Register) => {
                    Some((di.op0_register(), di.op1_register()))
                }
                (Code::Lea_r64_m, _)
                    if di.memory_index_scale() == 1
                        && di.memory_displacement64() == 0
                        && di.memory_base().is_gpr()
                        && di.memory_index().is_gpr() =>
                {
                    Some((di.memory_base(), di.memory_index()))
                }
                (Code::Mov_r64_rm64, OpKind::Memory) if di.memory_index() != Register::None => {
                    return self.absolute_table(*d, &di, read)
                }
                _ => None,
            };
            if let Some((x, y)) = addends {
                return self.relative_table(*d, x, y, read);
            }
        }
        // A constant: `lea rax, [rip + label]; ...; jmp rax`, a direct jump
        // the compiler wrote as an indirect one (GNU C's `goto *ptr` where
        // every path sets `ptr` to the same label).
        self.budget = BUDGET;
        if let Some(target) = self.lea_value(j, reg, 0) {
            return Ok(Indirect::Table(vec![target as usize]));
        }
        self.pointer(j, reg, &mut HashSet::new())?;
        Ok(Indirect::Pointer(
            "it jumps through a loaded or received pointer (a tail call?)",
        ))
    }

    /// The add at `d` of `x` and `y`: one is a `movsxd` table entry, the
    /// other the table's anchor.
    fn relative_table(
        &mut self,
        d: usize,
        x: Register,
        y: Register,
        read: &dyn Fn(usize, &mut [u8]) -> bool,
    ) -> Result<Indirect, Unbounded> {
        for (entry, base) in [(x, y), (y, x)] {
            let Some(defs) = self.reaching_defs(d, entry) else {
                continue;
            };
            let ([l], false) = (defs.insns.as_slice(), defs.from_caller) else {
                continue;
            };
            let li = self.instrs[*l];
            if li.code() != Code::Movsxd_r64_rm32 || li.op1_kind() != OpKind::Memory {
                continue;
            }
            // Each question has a budget of its own: following a base kept
            // in a register across a loop may walk the whole function
            // before the only-`lea` answer, which must not starve the bound.
            self.budget = BUDGET;
            let table = self
                .table_address(*l, &li, 4)
                .ok_or("the jump table's address is not found")?;
            self.budget = BUDGET;
            let anchor = self
                .lea_value(d, base, 0)
                .ok_or("the jump table's base is not found")?;
            self.budget = BUDGET;
            let max = self
                .bound(*l, li.memory_index())
                .ok_or("the jump table's bound is not found (no cmp/ja on its index)")?;
            let targets = read_entries(read, table, max, 4, |e| {
                anchor.wrapping_add(e as u32 as i32 as i64 as u64)
            })?;
            return Ok(Indirect::Table(targets));
        }
        Err("its value is computed, not a recognised jump table")
    }

    /// `jmp [table + idx*8]` / `mov t, [table + idx*8]` at index `at`.
    fn absolute_table(
        &mut self,
        at: usize,
        m: &Instruction,
        read: &dyn Fn(usize, &mut [u8]) -> bool,
    ) -> Result<Indirect, Unbounded> {
        let unbounded = Indirect::Pointer("it jumps through a table of code pointers, not bounded");
        let Some(table) = self.table_address(at, m, 8) else {
            return Ok(unbounded);
        };
        self.budget = BUDGET;
        let Some(max) = self.bound(at, m.memory_index()) else {
            return Ok(unbounded);
        };
        Ok(Indirect::Table(read_entries(read, table, max, 8, |e| e)?))
    }

    /// Whether `reg` at `at` holds a code pointer on every path: loaded,
    /// returned by a call (rax, or rdx of a pair) or received from the
    /// caller, through copies and glibc's demangling.
    fn pointer(
        &mut self,
        at: usize,
        reg: Register,
        seen: &mut HashSet<(usize, Register)>,
    ) -> Result<(), Unbounded> {
        let reg = gpr64(reg).ok_or("an unexpected register")?;
        // A copy seen before adds nothing: its other definitions are being
        // checked already.
        if !seen.insert((at, reg)) {
            return Ok(());
        }
        let defs = self
            .reaching_defs(at, reg)
            .ok_or("its value comes from a path that is not known")?;
        for d in defs.insns {
            let i = self.instrs[d];
            let ok = match (i.mnemonic(), i.op1_kind()) {
                (Mnemonic::Call, _) => matches!(reg, Register::RAX | Register::RDX),
                (Mnemonic::Mov, OpKind::Memory) | (Mnemonic::Pop, _) => {
                    i.op0_register().size() == 8
                }
                (Mnemonic::Mov, OpKind::Register) if i.op0_register().size() == 8 => {
                    self.pointer(d, i.op1_register(), seen)?;
                    true
                }
                (Mnemonic::Ror | Mnemonic::Rol, OpKind::Immediate8)
                | (Mnemonic::Xor, OpKind::Memory)
                    if i.op0_kind() == OpKind::Register
                        && i.op0_register() == reg
                        && (i.op1_kind() != OpKind::Memory
                            || matches!(i.segment_prefix(), Register::FS | Register::GS)) =>
                {
                    self.pointer(d, reg, seen)?;
                    true
                }
                _ => false,
            };
            if !ok {
                return Err("its value is computed, not a recognised jump table");
            }
        }
        Ok(())
    }

    /// The address of entry 0 of the table `[base + idx*scale + disp]` used
    /// by instruction `at`: `disp` with no base, or a `lea` value plus `disp`.
    fn table_address(&mut self, at: usize, m: &Instruction, scale: u32) -> Option<u64> {
        if m.memory_index_scale() != scale
            || !m.memory_index().is_gpr()
            || m.segment_prefix() != Register::None
        {
            return None;
        }
        let disp = m.memory_displacement64();
        match m.memory_base() {
            Register::None => Some(disp),
            b if b.is_gpr() => Some(self.lea_value(at, b, 0)?.wrapping_add(disp)),
            _ => None,
        }
    }

    /// The address a `lea reg, [rip + x]` put in `reg` for instruction `at`,
    /// the same on every path (through register copies); or, failing that,
    /// that of the only `lea` writing `reg` in the function.
    fn lea_value(&mut self, at: usize, reg: Register, depth: u32) -> Option<u64> {
        if depth > MAX_COPIES {
            return None;
        }
        let mut value = None;
        let mark = self.relied.len();
        let defs = self.reaching_defs(at, reg).filter(|d| !d.from_caller);
        let Some(defs) = defs else {
            // Nothing the walk saw is relied on, but the whole function is:
            // a path from elsewhere could bring another value.
            self.relied.truncate(mark);
            let v = self.only_lea(reg);
            if v.is_some() {
                self.relied.extend(0..self.instrs.len());
            }
            return v;
        };
        for d in defs.insns {
            let di = self.instrs[d];
            let v = match di.code() {
                Code::Lea_r64_m if di.memory_base() == Register::RIP => di.ip_rel_memory_address(),
                Code::Mov_r64_rm64 | Code::Mov_rm64_r64 if di.op1_kind() == OpKind::Register => {
                    self.lea_value(d, di.op1_register(), depth + 1)?
                }
                _ => return None,
            };
            if value.is_some_and(|x| x != v) {
                return None;
            }
            value = Some(v);
        }
        value
    }

    /// The value of `reg` if the function's only writes of it (other than
    /// `pop`, which restores the caller's value on the way out) are one and
    /// the same `lea reg, [rip + x]`.
    fn only_lea(&mut self, reg: Register) -> Option<u64> {
        let reg = gpr64(reg)?;
        if let Some(&(_, v)) = self.only_lea.iter().find(|c| c.0 == reg) {
            return v;
        }
        let v = self.only_lea_scan(reg);
        self.only_lea.push((reg, v));
        v
    }

    fn only_lea_scan(&mut self, reg: Register) -> Option<u64> {
        let mut value = None;
        for k in 0..self.instrs.len() {
            let i = self.instrs[k];
            if i.mnemonic() == Mnemonic::Pop || !self.writes(&i, reg) {
                continue;
            }
            if i.code() != Code::Lea_r64_m || i.memory_base() != Register::RIP {
                return None;
            }
            let v = i.ip_rel_memory_address();
            if value.is_some_and(|x| x != v) {
                return None;
            }
            value = Some(v);
        }
        value
    }

    /// The instructions that may have written `reg` last before `at`, on
    /// every path into it (`None` if a path is not known).
    fn reaching_defs(&mut self, at: usize, reg: Register) -> Option<Defs> {
        let reg = gpr64(reg)?;
        let mut defs = Defs {
            insns: Vec::new(),
            from_caller: false,
        };
        let mut seen = HashSet::new();
        let mut work = vec![at];
        while let Some(k) = work.pop() {
            let preds = self.preds(k)?;
            defs.from_caller |= preds.from_caller;
            for p in preds.list {
                let (Pred::Fall(i) | Pred::Taken(i)) = p;
                if self.defines_on(p, reg) {
                    defs.insns.push(i);
                } else if seen.insert(i) {
                    work.push(i);
                }
            }
        }
        defs.insns.sort_unstable();
        defs.insns.dedup();
        Some(defs)
    }

    /// The largest value the index register `idx` can hold at instruction
    /// `at`, from unsigned compares guarding every path (or a `movzx` or
    /// `and` on it).
    fn bound(&mut self, at: usize, idx: Register) -> Option<u64> {
        let st = IndexState::new(gpr64(idx)?);
        let mut visiting = HashSet::new();
        self.bound_into(at, st, &mut visiting).ok().flatten()
    }

    /// The bound of `st.cur` on entry to `k`, over every path into it;
    /// `Ok(None)` when every path loops back to a question being answered.
    fn bound_into(
        &mut self,
        mut k: usize,
        mut st: IndexState,
        visiting: &mut HashSet<(usize, Register, Option<MemLoc>, i64, u8)>,
    ) -> Result<Option<u64>, ()> {
        loop {
            // A loop that changes the offset asks a new question each
            // time round (until the budget ends it): only an unchanged
            // index keeps the value it entered the loop with.
            if visiting.contains(&(k, st.cur, st.mem, st.off, st.width)) {
                return Ok(None);
            }
            let Some(preds) = self.preds(k).filter(|p| !p.from_caller) else {
                return st.loose.map(Some).ok_or(());
            };
            if let [Pred::Fall(p)] = preds.list[..] {
                match self.visit(p, false, &mut st) {
                    Step::Found(n) | Step::Exact(n) => return Ok(Some(n)),
                    Step::Fail => return st.loose.map(Some).ok_or(()),
                    Step::Continue => k = p,
                }
                continue;
            }
            visiting.insert((k, st.cur, st.mem, st.off, st.width));
            let mut best: Option<u64> = None;
            for pred in preds.list {
                let (i, taken) = match pred {
                    Pred::Fall(i) => (i, false),
                    Pred::Taken(i) => (i, true),
                };
                let mut s = st.clone();
                let r = match self.visit(i, taken, &mut s) {
                    Step::Found(n) | Step::Exact(n) => Some(n),
                    Step::Fail => Some(s.loose.ok_or(())?),
                    Step::Continue => self.bound_into(i, s, visiting)?,
                };
                best = best.max(r);
            }
            visiting.remove(&(k, st.cur, st.mem, st.off, st.width));
            return Ok(best);
        }
    }

    /// Instruction `i` on a path back to the index load, `taken` if it is a
    /// branch taken on that path: `Found` is the index's bound.
    fn visit(&mut self, i: usize, taken: bool, st: &mut IndexState) -> Step {
        match self.visit_cur(i, taken, st) {
            Step::Found(n) => st.adjust(n).map_or(Step::Fail, Step::Found),
            Step::Exact(n) => Step::Found(n),
            step => step,
        }
    }

    /// [`Slicer::visit`], where `Found` bounds `cur`'s value (its low
    /// `width` bytes).
    fn visit_cur(&mut self, i: usize, taken: bool, st: &mut IndexState) -> Step {
        let ins = self.instrs[i];
        match ins.flow_control() {
            FlowControl::ConditionalBranch => {
                if let Some((g, n, w)) = self.guard(i, taken) {
                    match (g, st.mem) {
                        (Guarded::Mem(m), Some(loc)) if m == loc => return Step::Found(n),
                        (Guarded::Reg(x), None) if x == st.cur && st.covers(w) => {
                            return Step::Found(n)
                        }
                        (Guarded::Reg(x), None) if x == st.cur => st.narrow.push((n, w, st.off)),
                        (Guarded::Reg(x), None) if x != st.cur => st.pending.push((x, n, w)),
                        _ => {}
                    }
                }
            }
            // A direct jump or a jump table's jump, taken: no write.
            FlowControl::UnconditionalBranch | FlowControl::IndirectBranch => {}
            _ if taken => return Step::Fail,
            _ => {}
        }
        if let Some(loc) = st.mem {
            return self.visit_for_memory(i, &ins, loc);
        }
        // `mov x, cur` (64-bit) then `cmp x, N; ja`: x is cur's copy, and
        // neither changed until the compare (a write of x would have dropped
        // the pending bound, one of cur would have been met before).
        if matches!(ins.code(), Code::Mov_r64_rm64 | Code::Mov_rm64_r64)
            && ins.op1_kind() == OpKind::Register
            && gpr64(ins.op1_register()) == Some(st.cur)
        {
            let x = gpr64(ins.op0_register());
            let covers = |w| st.covers(w);
            if let Some(&(_, n, _)) = st
                .pending
                .iter()
                .find(|&&(p, _, w)| Some(p) == x && covers(w))
            {
                return Step::Found(n);
            }
        }
        // glibc's vfprintf: `lea eax, [r9 - 0x20]; cmp al, 0x5a; ja default;
        // movzx eax, r9b; sub eax, 0x20` — the compare is of a byte, `x`,
        // computed from cur's low byte `v` by the same offset `d` the index
        // adds: `(v + d) mod 256 <= n` and the index is `v + d` (exact:
        // `v` is zero-extended). With `n - 256 < d <= 0`, the `v` that give
        // a negative index have `(v + d) mod 256 >= 256 + d > n`: none pass
        // the compare, so the index is within `0..=n`.
        if st.width == 1 && ins.code() == Code::Lea_r32_m {
            let (base, x) = (gpr64(ins.memory_base()), gpr64(ins.op0_register()));
            let d = ins.memory_displacement64() as i64 as i32 as i64;
            let pending = st.pending.iter().find(|&&(p, _, w)| Some(p) == x && w == 1);
            if let (Some(&(_, n, _)), true) = (pending, base == Some(st.cur)) {
                if ins.memory_index() == Register::None
                    && d == st.off
                    && d <= 0
                    && d > n as i64 - 256
                {
                    return Step::Exact(n);
                }
            }
        }
        st.pending.retain(|&(x, _, _)| !self.writes(&ins, x));
        if !self.defines(i, st.cur) {
            return Step::Continue;
        }
        let copy = |st: &mut IndexState, src: Register| {
            let Some(src) = gpr64(src) else {
                return Step::Fail;
            };
            st.cur = src;
            st.narrow.clear();
            let covers = |w| st.covers(w);
            match st.pending.iter().find(|&&(x, _, w)| x == src && covers(w)) {
                Some(&(_, n, _)) => Step::Found(n),
                None => Step::Continue,
            }
        };
        match (ins.mnemonic(), ins.op1_kind()) {
            (Mnemonic::Mov | Mnemonic::Movsxd | Mnemonic::Movsx | Mnemonic::Movzx, k)
                if ins.op0_kind() == OpKind::Register =>
            {
                if ins.mnemonic() == Mnemonic::Movzx {
                    let byte = ins.memory_size().size() == 1
                        || (k == OpKind::Register && ins.op1_register().size() == 1);
                    let (bits, width) = if byte { (0xFF, 1) } else { (0xFFFF, 2) };
                    // The index's bytes are now the `movzx`'s: a compare of
                    // at least those, at this offset, bounds it.
                    let narrow = st
                        .narrow
                        .iter()
                        .filter(|&&(_, w, off)| w >= width && off == st.off)
                        .map(|&(n, _, _)| n)
                        .min();
                    if let Some(n) = narrow {
                        return Step::Found(n);
                    }
                    if let Some(b) = st.adjust(bits) {
                        st.loose = Some(st.loose.map_or(b, |l| l.min(b)));
                    }
                    st.width = st.width.min(width);
                    // A class table: `movzx eax, byte [table + i]` with
                    // `i` bounded reads one of the bytes `table[0..=i]`.
                    if k == OpKind::Memory {
                        if let Some(max) = self.class_table(i, &ins) {
                            return Step::Found(max);
                        }
                    }
                }
                match k {
                    OpKind::Register => copy(st, ins.op1_register()),
                    OpKind::Memory => match MemLoc::of(&ins) {
                        Some(loc) => {
                            st.mem = Some(loc);
                            st.pending.clear();
                            Step::Continue
                        }
                        None => Step::Fail,
                    },
                    _ => Step::Fail,
                }
            }
            // `cdqe`: the index is eax's value, which the bound will show
            // non-negative (as for `movsxd`).
            (Mnemonic::Cdqe, _) => Step::Continue,
            // `sub eax, 0x20`: the index is the value before it, minus 0x20.
            // (Not once a `movzx` of cur's low byte is passed: the index
            // is then the low byte of the difference.)
            (Mnemonic::Add | Mnemonic::Sub, k)
                if is_immediate(k)
                    && ins.op0_kind() == OpKind::Register
                    && ins.op0_register().size() >= 4
                    && st.width >= 4 =>
            {
                let imm = ins.immediate(1) as i64;
                let d = if ins.mnemonic() == Mnemonic::Add {
                    imm
                } else {
                    -imm
                };
                match st.off.checked_add(d) {
                    Some(off) if off.abs() < MAX_ENTRIES as i64 => {
                        st.off = off;
                        st.narrow.clear();
                        Step::Continue
                    }
                    _ => Step::Fail,
                }
            }
            (Mnemonic::And, k)
                if is_immediate(k)
                    && ins.op0_kind() == OpKind::Register
                    && st.covers(ins.op0_register().size() as u8) =>
            {
                let m = ins.immediate(1) & size_mask(ins.op0_register());
                if m < MAX_ENTRIES {
                    Step::Found(m)
                } else {
                    Step::Fail
                }
            }
            _ => Step::Fail,
        }
    }

    /// The largest value `movzx r, byte/word [table + i*size]` at `at` can
    /// load: `table` a constant (`lea`), `i` bounded, the entries readable.
    fn class_table(&mut self, at: usize, m: &Instruction) -> Option<u64> {
        let size = m.memory_size().size();
        if !matches!(size, 1 | 2) {
            return None;
        }
        let table = self.table_address(at, m, size as u32)?;
        let max = self.bound(at, m.memory_index())?;
        let mut bytes = vec![0u8; (max as usize + 1) * size];
        if !(self.read)(table as usize, &mut bytes) {
            return None;
        }
        bytes
            .chunks_exact(size)
            .map(|c| c.iter().rev().fold(0u64, |v, &b| v << 8 | u64::from(b)))
            .max()
    }

    /// Instruction `ins` (at `i`) on a path back from the load of the index
    /// from `loc`: it must not change `loc`'s registers or possibly `loc`.
    fn visit_for_memory(&mut self, i: usize, ins: &Instruction, loc: MemLoc) -> Step {
        let call = matches!(
            ins.flow_control(),
            FlowControl::Call | FlowControl::IndirectCall
        );
        if call
            || (loc.base != Register::None && self.defines(i, loc.base))
            || (loc.index != Register::None && self.defines(i, loc.index))
        {
            return Step::Fail;
        }
        let info = self.info.info(ins);
        let clobbers = info.used_memory().iter().any(|m| {
            let write = matches!(
                m.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            );
            // Only a write through the same registers to other bytes is
            // known not to touch `loc`.
            let disjoint = m.base() == loc.base
                && m.index() == loc.index
                && (m.index() == Register::None || m.scale() == loc.scale)
                && !matches!(m.segment(), Register::FS | Register::GS)
                && {
                    let (a, b) = (m.displacement() as i64, loc.disp as i64);
                    let (sa, sb) = (m.memory_size().size() as i64, loc.size as i64);
                    sa > 0 && (a.wrapping_add(sa) <= b || b.wrapping_add(sb) <= a)
                };
            write && !disjoint
        });
        if clobbers {
            Step::Fail
        } else {
            Step::Continue
        }
    }

    /// If the conditional branch at `k` is an unsigned compare-and-branch
    /// (`cmp x, imm` before it on every path, with nothing in between that
    /// changes the flags or `x`) that bounds `x` on the way it leaves
    /// (`taken` or not): what is compared, and the bound.
    fn guard(&mut self, k: usize, taken: bool) -> Option<(Guarded, u64, u8)> {
        let jcc = self.instrs[k];
        if !jcc.is_jcc_short_or_near() {
            return None;
        }
        // The compare: at most a few flag-preserving instructions back.
        let mut c = k;
        let cmp = loop {
            if c == 0 || k - c > 4 || bit(self.entries, self.off(c)) {
                return None;
            }
            c -= 1;
            let i = self.instrs[c];
            if i.mnemonic() == Mnemonic::Cmp {
                break i;
            }
            if i.flow_control() != FlowControl::Next || i.rflags_modified() != 0 {
                return None;
            }
        };
        if !is_immediate(cmp.op1_kind()) {
            return None;
        }
        let (what, mask) = match cmp.op0_kind() {
            // ah..bh compare bits 8..15: not a bound of the register.
            OpKind::Register
                if matches!(
                    cmp.op0_register(),
                    Register::AH | Register::BH | Register::CH | Register::DH
                ) =>
            {
                return None
            }
            OpKind::Register => (
                Guarded::Reg(gpr64(cmp.op0_register())?),
                size_mask(cmp.op0_register()),
            ),
            OpKind::Memory => {
                let loc = MemLoc::of(&cmp)?;
                let mask = match loc.size {
                    1 => 0xFF,
                    2 => 0xFFFF,
                    4 => 0xFFFF_FFFF,
                    _ => u64::MAX,
                };
                (Guarded::Mem(loc), mask)
            }
            _ => return None,
        };
        // What the compare saw must still be there at the branch.
        for between in c + 1..k {
            let unchanged = match what {
                Guarded::Reg(r) => !self.defines(between, r),
                Guarded::Mem(loc) => {
                    let i = self.instrs[between];
                    matches!(self.visit_for_memory(between, &i, loc), Step::Continue)
                }
            };
            if !unchanged {
                return None;
            }
        }
        let n = cmp.immediate(1) & mask;
        let max = match (jcc.condition_code(), taken) {
            (ConditionCode::a, false) | (ConditionCode::be, true) => n,
            (ConditionCode::ae, false) | (ConditionCode::b, true) => n.checked_sub(1)?,
            _ => return None,
        };
        if max >= MAX_ENTRIES {
            return None;
        }
        // The bound relies on `c + 1 ..= k` being entered only from `c`.
        self.relied.extend(c + 1..=k);
        let width = match what {
            Guarded::Reg(_) => cmp.op0_register().size(),
            Guarded::Mem(loc) => loc.size,
        };
        Some((what, max, width as u8))
    }

    /// Every way into instruction `k`; `None` if some are unknown or the
    /// budget is spent.
    fn preds(&mut self, k: usize) -> Option<Preds> {
        self.budget = self.budget.checked_sub(1)?;
        self.relied.push(k);
        let mut list = Vec::new();
        if k > 0 && falls_through(&self.instrs[k - 1]) {
            list.push(Pred::Fall(k - 1));
        }
        let off = self.off(k);
        if bit(self.entries, off) {
            if bit(self.opaque, off) {
                return None;
            }
            let lo = self.sources.partition_point(|s| (s.0 as usize) < off);
            for s in &self.sources[lo..] {
                if s.0 as usize != off {
                    break;
                }
                list.push(Pred::Taken(s.1 as usize));
            }
        }
        Some(Preds {
            list,
            from_caller: k == 0,
        })
    }

    fn off(&self, k: usize) -> usize {
        (self.instrs[k].ip() - self.start) as usize
    }

    /// Whether instruction `i` may leave a new value in `reg` when it falls
    /// through (a call, in every caller-saved register; `syscall`, in rax,
    /// rcx and r11).
    fn defines(&mut self, i: usize, reg: Register) -> bool {
        let ins = self.instrs[i];
        let clobbered = match ins.mnemonic() {
            Mnemonic::Call => is_caller_saved(reg),
            Mnemonic::Syscall => matches!(reg, Register::RAX | Register::RCX | Register::R11),
            _ => false,
        };
        clobbered || self.writes(&ins, reg)
    }

    /// [`defines`](Self::defines) on the edge `p` (a call taken to a local
    /// target has not run its callee yet).
    fn defines_on(&mut self, p: Pred, reg: Register) -> bool {
        match p {
            Pred::Fall(i) => self.defines(i, reg),
            Pred::Taken(i) => {
                let ins = self.instrs[i];
                self.writes(&ins, reg)
            }
        }
    }

    /// Whether `i` may write any part of the 64-bit register `reg`.
    fn writes(&mut self, i: &Instruction, reg: Register) -> bool {
        let info = self
            .info
            .info_options(i, InstructionInfoOptions::NO_MEMORY_USAGE);
        info.used_registers().iter().any(|u| {
            u.register().full_register() == reg
                && matches!(
                    u.access(),
                    OpAccess::Write
                        | OpAccess::CondWrite
                        | OpAccess::ReadWrite
                        | OpAccess::ReadCondWrite
                )
        })
    }
}

/// Reads `max + 1` entries of `size` bytes at `table` and maps each with
/// `target`.
fn read_entries(
    read: &dyn Fn(usize, &mut [u8]) -> bool,
    table: u64,
    max: u64,
    size: usize,
    target: impl Fn(u64) -> u64,
) -> Result<Vec<usize>, Unbounded> {
    let mut bytes = vec![0u8; (max as usize + 1) * size];
    if !read(table as usize, &mut bytes) {
        return Err("its jump table cannot be read");
    }
    Ok(bytes
        .chunks_exact(size)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..size].copy_from_slice(c);
            target(u64::from_le_bytes(w)) as usize
        })
        .collect())
}

/// Whether execution continues with the next instruction after `i` (calls
/// return there).
fn falls_through(i: &Instruction) -> bool {
    matches!(
        i.flow_control(),
        FlowControl::Next
            | FlowControl::ConditionalBranch
            | FlowControl::Call
            | FlowControl::IndirectCall
            | FlowControl::XbeginXabortXend
    )
}

/// Whether bit `i` of a bitmap is set.
pub(super) fn bit(bits: &[u64], i: usize) -> bool {
    bits.get(i / 64).is_some_and(|w| (w >> (i % 64)) & 1 == 1)
}

/// The 64-bit general-purpose register `r` is part of.
fn gpr64(r: Register) -> Option<Register> {
    if r.is_gpr() {
        Some(r.full_register())
    } else {
        None
    }
}

/// The registers a call may clobber (SysV).
fn is_caller_saved(r: Register) -> bool {
    matches!(
        r,
        Register::RAX
            | Register::RCX
            | Register::RDX
            | Register::RSI
            | Register::RDI
            | Register::R8
            | Register::R9
            | Register::R10
            | Register::R11
    )
}

fn is_immediate(k: OpKind) -> bool {
    matches!(
        k,
        OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}

/// The mask of a register's width (an immediate compared with `eax` is a
/// 32-bit value even when the encoding sign-extends an imm8).
fn size_mask(r: Register) -> u64 {
    match r.size() {
        1 => 0xFF,
        2 => 0xFFFF,
        4 => 0xFFFF_FFFF,
        _ => u64::MAX,
    }
}
