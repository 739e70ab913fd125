//! bfjit — a Brainfuck JIT that lets tools probe the code it generates. Read
//! this if you write a VM or a JIT and want to embed probert.
//!
//! ```sh
//! cargo run --release --example bfjit        # the tour: checks its own results
//! cargo run --release --example bfjit -- FILE.bf [--probe WHERE]... [--input TEXT] [--tier 0|1]
//! ```
//!
//! `WHERE` is a source position `LINE:COL` (1-based; the probe counts how
//! often that command runs), `entry` (the compiled block's first
//! instruction: one hit per run), or `putchar` (the VM's own Rust output
//! routine).
//!
//! What a VM does so tools can probe its code — each step is marked
//! `probert:` below:
//!
//! 1. Keep a map from source positions to the machine code emitted for them
//!    ([`Block::sites`]). Tools think in source positions; probes need
//!    addresses of instruction starts.
//! 2. Register each block of machine code with `probert::region_add` once it
//!    is emitted, and `probert::region_remove` it *before* freeing or reusing
//!    the memory: that detaches the probes inside and restores the bytes
//!    ([`Block::retire`]). Emit code that decodes linearly from the region
//!    start (no data between instructions): probert checks that a probe
//!    address is an instruction start by decoding from there.
//! 3. Attach with `probert::attach(addr, handler, user_data)`. The handler
//!    runs in *signal context* on the trap path: it may only touch atomics
//!    and read or write the registers. No allocation, no locks, no
//!    `println!` ([`count_hit`]).
//! 4. When recompiling, attach the same source probes to the new block, then
//!    remove the old block's region: counts carry over, nothing is counted
//!    twice ([`Vm::install`]).
//! 5. Optional: emit a 5-byte NOP (`0f 1f 44 00 00`) where probes are likely
//!    (block entries, loop heads). It costs almost nothing to run, the trap
//!    path needs no out-of-line copy for it, and the fast path turns it into a
//!    jump to a stub instead of a trap.
//!
//! Register conventions of the generated code — published so probe handlers
//! can read the VM's state (see [`cell_of_hit`]): `rbx` = the tape head,
//! `r14` = the tape start, `r13` = the tape end, `r12` = the `Io` of the run.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::error::Error;
use std::sync::atomic::{AtomicU64, Ordering};

use dynasmrt::{dynasm, AssemblyOffset, DynasmApi, DynasmLabelApi, ExecutableBuffer};
use probert::{Action, ConsumerId, Hit, Reg, RegionDesc, RegionId};

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

// ---------------------------------------------------------------------------
// The language

/// One Brainfuck command, or a run of equal ones (tier 1 folds them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// `+` (n times) or `-` (as 256 - n): add to the cell, wrapping.
    Add(u8),
    /// `>` (n > 0) or `<` (n < 0): move the head.
    Move(i32),
    /// `.`
    Out,
    /// `,`
    In,
    /// `[`
    Open,
    /// `]`
    Close,
}

/// An operation and the source bytes it came from.
#[derive(Clone, Copy, Debug)]
struct Ins {
    op: Op,
    /// Byte offset of its first command character.
    pos: usize,
    /// One past its last command character.
    end: usize,
}

/// Parses `src` into one instruction per command character; every other
/// character is a comment.
fn parse(src: &str) -> Res<Vec<Ins>> {
    let mut out = Vec::new();
    let mut open = Vec::new();
    for (pos, c) in src.bytes().enumerate() {
        let op = match c {
            b'+' => Op::Add(1),
            b'-' => Op::Add(255),
            b'>' => Op::Move(1),
            b'<' => Op::Move(-1),
            b'.' => Op::Out,
            b',' => Op::In,
            b'[' => {
                open.push(pos);
                Op::Open
            }
            b']' => {
                open.pop()
                    .ok_or_else(|| format!("{}: `]` without `[`", line_col(src, pos)))?;
                Op::Close
            }
            _ => continue,
        };
        out.push(Ins {
            op,
            pos,
            end: pos + 1,
        });
    }
    if let Some(&pos) = open.last() {
        return Err(format!("{}: `[` without `]`", line_col(src, pos)).into());
    }
    Ok(out)
}

/// Tier 1: folds runs of the same `+`, `-`, `>` or `<`. Every command of a
/// run executes exactly as often as the run, so a probe on any of them still
/// counts that command's executions.
fn fold(ins: &[Ins]) -> Vec<Ins> {
    let mut out: Vec<Ins> = Vec::new();
    let mut last_char = None;
    for i in ins {
        let c = match i.op {
            Op::Add(1) => Some('+'),
            Op::Add(_) => Some('-'),
            Op::Move(1) => Some('>'),
            Op::Move(_) => Some('<'),
            _ => None,
        };
        match (out.last_mut(), c) {
            (Some(prev), Some(c)) if last_char == Some(c) => {
                prev.op = match (prev.op, i.op) {
                    (Op::Add(a), Op::Add(b)) => Op::Add(a.wrapping_add(b)),
                    (Op::Move(a), Op::Move(b)) => Op::Move(a + b),
                    _ => unreachable!("runs hold one kind of command"),
                };
                prev.end = i.end;
            }
            _ => out.push(*i),
        }
        last_char = c;
    }
    out
}

/// `LINE:COL` (1-based) of a byte offset.
fn line_col(src: &str, pos: usize) -> String {
    let before = &src[..pos];
    let line = before.matches('\n').count() + 1;
    let col = pos - before.rfind('\n').map_or(0, |n| n + 1) + 1;
    format!("{line}:{col}")
}

/// The byte offset of `LINE:COL`.
fn offset_of(src: &str, line_col: &str) -> Option<usize> {
    let (l, c) = line_col.split_once(':')?;
    let (l, c): (usize, usize) = (l.parse().ok()?, c.parse().ok()?);
    let start: usize = src
        .split_inclusive('\n')
        .take(l.checked_sub(1)?)
        .map(str::len)
        .sum();
    let line = src[start..].lines().next()?;
    (c >= 1 && c <= line.len()).then(|| start + c - 1)
}

/// The reference interpreter: the program's output, how often each
/// instruction of `parse` ran, and the tape cell each `.` printed from.
/// The tour checks the JIT's output and every probe count against it.
fn interpret(ins: &[Ins], input: &[u8]) -> Res<(Vec<u8>, Vec<u64>, Vec<usize>)> {
    let mut jump = vec![0; ins.len()];
    let mut stack = Vec::new();
    for (i, x) in ins.iter().enumerate() {
        match x.op {
            Op::Open => stack.push(i),
            Op::Close => {
                let o = stack.pop().ok_or("unbalanced")?;
                jump[o] = i;
                jump[i] = o;
            }
            _ => {}
        }
    }
    let (mut tape, mut head, mut pc, mut inp) = (vec![0u8; TAPE], 0usize, 0, input.iter());
    let (mut out, mut counts, mut cells) = (Vec::new(), vec![0u64; ins.len()], Vec::new());
    while pc < ins.len() {
        counts[pc] += 1;
        match ins[pc].op {
            Op::Add(n) => tape[head] = tape[head].wrapping_add(n),
            Op::Move(n) => {
                head = head
                    .checked_add_signed(n as isize)
                    .filter(|&h| h < TAPE)
                    .ok_or("the head left the tape")?;
            }
            Op::Out => {
                out.push(tape[head]);
                cells.push(head);
            }
            Op::In => tape[head] = inp.next().copied().unwrap_or(0),
            // As the JIT: `[` on a zero cell skips past its `]`; `]` on a
            // non-zero cell jumps to the first instruction of the body.
            Op::Open if tape[head] == 0 => pc = jump[pc],
            Op::Close if tape[head] != 0 => pc = jump[pc],
            Op::Open | Op::Close => {}
        }
        pc += 1;
    }
    Ok((out, counts, cells))
}

// ---------------------------------------------------------------------------
// The runtime the generated code calls

/// Tape length, in cells.
const TAPE: usize = 30_000;

/// One run's input and output. Generated code passes it (in `r12`) to the
/// I/O routines.
#[derive(Debug, Default)]
struct Io {
    input: Vec<u8>,
    read: usize,
    output: Vec<u8>,
}

/// `.`: the VM's output routine, called from generated code. An ordinary
/// Rust function — tools probe it like JIT code (`--probe putchar`).
#[inline(never)]
extern "C" fn vm_putchar(io: *mut Io, byte: u64) {
    // SAFETY: generated code passes the `Io` that `Block::run` gave it,
    // which outlives the run and is not otherwise borrowed during it.
    let io = unsafe { &mut *io };
    io.output.push(byte as u8);
}

/// `,`: the VM's input routine; 0 at end of input.
#[inline(never)]
extern "C" fn vm_getchar(io: *mut Io) -> u64 {
    // SAFETY: as in `vm_putchar`.
    let io = unsafe { &mut *io };
    let b = io.input.get(io.read).copied().unwrap_or(0);
    io.read += 1;
    u64::from(b)
}

// ---------------------------------------------------------------------------
// The JIT

/// What generated code returns when the head leaves the tape.
const EXIT_TAPE_OVERFLOW: u64 = 1;

/// The 5-byte NOP a JIT leaves where probes are likely (step 5).
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

/// Where the code for one source instruction starts.
#[derive(Clone, Copy, Debug)]
struct Site {
    op: Op,
    /// The source bytes it came from.
    pos: usize,
    end: usize,
    /// Its first machine instruction.
    addr: usize,
}

/// One compiled program: machine code, registered as a probert region.
struct Block {
    name: String,
    tier: u8,
    code: ExecutableBuffer,
    /// `Some` while registered.
    region: Option<RegionId>,
    /// The block's first instruction (a 5-byte NOP).
    entry: usize,
    /// probert: step 1, the source → machine-code map.
    sites: Vec<Site>,
    /// The code as emitted, to show that probert restored it.
    pristine: Vec<u8>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} bytes at {:#x})",
            self.name,
            self.code.len(),
            self.entry
        )
    }
}

/// The signature of generated code.
type BlockFn = unsafe extern "C" fn(io: *mut Io, tape: *mut u8, tape_end: *mut u8) -> u64;

/// Compiles a program to machine code and registers it with probert.
/// Tier 0 emits one instruction per command; tier 1 folds runs.
#[inline(never)]
fn compile(name: &str, src: &str, tier: u8) -> Res<Block> {
    let parsed = parse(src)?;
    let ins = if tier == 0 { parsed } else { fold(&parsed) };
    let mut ops = dynasmrt::x64::Assembler::new()?;
    let mut sites = Vec::with_capacity(ins.len());
    let mut loops = Vec::new();

    // Entry: a probe site, then the prologue. Four pushes and `sub rsp, 8`
    // keep the stack 16-byte aligned for the calls to the I/O routines.
    ops.extend(NOP5);
    dynasm!(ops
        ; .arch x64
        ; push rbx
        ; push r12
        ; push r13
        ; push r14
        ; sub rsp, 8
        ; mov r12, rdi
        ; mov rbx, rsi
        ; mov r14, rsi
        ; mov r13, rdx
    );
    for i in &ins {
        sites.push((i.op, i.pos, i.end, ops.offset()));
        match i.op {
            Op::Add(n) => dynasm!(ops ; .arch x64 ; add BYTE [rbx], n as i8),
            Op::Move(n) if n > 0 => dynasm!(ops
                ; .arch x64
                ; add rbx, n
                ; cmp rbx, r13
                ; jae ->tape_overflow
            ),
            Op::Move(n) => dynasm!(ops
                ; .arch x64
                ; add rbx, n
                ; cmp rbx, r14
                ; jb ->tape_overflow
            ),
            Op::Out => dynasm!(ops
                ; .arch x64
                ; movzx esi, BYTE [rbx]
                ; mov rdi, r12
                ; mov rax, QWORD vm_putchar as *const () as i64
                ; call rax
            ),
            Op::In => dynasm!(ops
                ; .arch x64
                ; mov rdi, r12
                ; mov rax, QWORD vm_getchar as *const () as i64
                ; call rax
                ; mov BYTE [rbx], al
            ),
            Op::Open => {
                let (body, after) = (ops.new_dynamic_label(), ops.new_dynamic_label());
                loops.push((body, after));
                // A loop head is a likely probe site: lead with a 5-byte NOP.
                ops.extend(NOP5);
                dynasm!(ops
                    ; .arch x64
                    ; cmp BYTE [rbx], 0
                    ; jz =>after
                    ; =>body
                );
            }
            Op::Close => {
                let (body, after) = loops.pop().ok_or("unbalanced loops")?;
                dynasm!(ops
                    ; .arch x64
                    ; cmp BYTE [rbx], 0
                    ; jnz =>body
                    ; =>after
                );
            }
        }
    }
    // Exits. Everything here is code, so the block decodes linearly from its
    // start (step 2).
    dynasm!(ops
        ; .arch x64
        ; xor eax, eax
        ; ->exit:
        ; add rsp, 8
        ; pop r14
        ; pop r13
        ; pop r12
        ; pop rbx
        ; ret
        ; ->tape_overflow:
        ; mov eax, EXIT_TAPE_OVERFLOW as i32
        ; jmp ->exit
    );
    let code = ops.finalize().map_err(|_| "dynasmrt could not finalize")?;
    let base = code.ptr(AssemblyOffset(0)) as usize;
    let name = format!("bf:{name}/tier{tier}");

    // probert: step 2 — register the block as soon as it exists, before any
    // tool can ask for a probe in it. The code is written through
    // /proc/self/mem (`write: None`); a JIT whose executable view is never
    // writable would pass its own write callback instead.
    let region = probert::region_add(RegionDesc {
        start: base,
        len: code.len(),
        name: name.clone(),
        write: None,
    })?;
    Ok(Block {
        name,
        tier,
        pristine: code.to_vec(),
        code,
        region: Some(region),
        entry: base,
        sites: sites
            .into_iter()
            .map(|(op, pos, end, off)| Site {
                op,
                pos,
                end,
                addr: base + off.0,
            })
            .collect(),
    })
}

impl Block {
    /// Runs the program on a fresh tape.
    fn run(&self, input: &[u8]) -> Res<Vec<u8>> {
        let mut io = Io {
            input: input.to_vec(),
            ..Io::default()
        };
        let mut tape = vec![0u8; TAPE];
        let range = tape.as_mut_ptr_range();
        // SAFETY: the entry point of code emitted by `compile` with the
        // `BlockFn` signature; the buffer lives as long as `self`.
        let f: BlockFn =
            unsafe { std::mem::transmute::<*const u8, BlockFn>(self.code.ptr(AssemblyOffset(0))) };
        // SAFETY: the generated code reads and writes only the tape between
        // `range.start` and `range.end` (it checks every move) and `io`
        // through the I/O routines.
        let status = unsafe { f(&mut io, range.start, range.end) };
        if status == EXIT_TAPE_OVERFLOW {
            return Err("the head left the tape".into());
        }
        Ok(io.output)
    }

    /// The sites a tool's request names: the site whose source range holds
    /// the position, or the block entry.
    fn addrs(&self, at: &Where) -> Vec<usize> {
        match at {
            Where::Pos(p) => self
                .sites
                .iter()
                .filter(|s| s.pos <= *p && *p < s.end)
                .map(|s| s.addr)
                .collect(),
            Where::Entry => vec![self.entry],
            Where::EveryOut => self
                .sites
                .iter()
                .filter(|s| s.op == Op::Out)
                .map(|s| s.addr)
                .collect(),
        }
    }

    /// Unregisters the block, checks that probert restored every byte, and
    /// frees the code.
    fn retire(mut self) -> Res<()> {
        // probert: step 2 — remove the region *before* the memory goes away.
        // This detaches every probe inside (their handles become stale) and
        // writes the original bytes back; after it returns probert never
        // touches the memory again.
        if let Some(r) = self.region.take() {
            probert::region_remove(r)?;
        }
        if self.code[..] != self.pristine[..] {
            return Err(format!("{}: code not restored", self.name).into());
        }
        Ok(()) // `self.code` is unmapped here.
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // A block dropped without `retire` (an error path) still leaves
        // probert first.
        if let Some(r) = self.region.take() {
            let _ = probert::region_remove(r);
        }
    }
}

// ---------------------------------------------------------------------------
// Probes, in the VM's terms

/// Where a tool asked for a probe.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Where {
    /// A source byte offset.
    Pos(usize),
    /// The block entry.
    Entry,
    /// Every `.` (for the tape-cell histogram).
    EveryOut,
}

/// What a probe records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Record {
    /// How often the site runs.
    Count,
    /// Also a histogram of the tape cell under the head.
    Cells,
}

/// Counters a handler updates. Lives in a `Box` so its address — the
/// probe's user data — stays put, and outlives every attach of it.
#[derive(Debug)]
struct Counters {
    hits: AtomicU64,
    /// Hits per tape cell under the head (the last one also counts every
    /// cell past it), for [`Record::Cells`].
    cells: [AtomicU64; 16],
}

/// A probe a tool asked for in source terms. It survives recompilation: the
/// VM re-attaches it to each new block of the program.
#[derive(Debug)]
struct SourceProbe {
    label: String,
    at: Where,
    record: Record,
    counters: Box<Counters>,
    /// The addresses and consumers on the current block. (They are not
    /// detached one by one: retiring the block detaches them all.)
    attached: Vec<(usize, ConsumerId)>,
}

/// probert: step 3 — the handler of every source probe. It runs inside the
/// `SIGTRAP` handler (trap path) or a stub (fast path), on whichever thread
/// ran the code, so: atomics only. No allocation, no lock, no `println!`,
/// no panic.
unsafe extern "C" fn count_hit(hit: *mut Hit) -> u32 {
    // SAFETY: probert passes a valid hit; the user data is the `Counters`
    // the VM attached with, kept alive until the probe is detached.
    let c = unsafe { &*((*hit).user_data as *const Counters) };
    c.hits.fetch_add(1, Ordering::Relaxed);
    Action::Continue as u32
}

/// Like [`count_hit`], and reads the VM's registers: `rbx - r14` is the tape
/// cell under the head (the register conventions in the crate docs).
unsafe extern "C" fn cell_of_hit(hit: *mut Hit) -> u32 {
    // SAFETY: as in `count_hit`.
    let (hit, c) = unsafe { (&*hit, &*((*hit).user_data as *const Counters)) };
    c.hits.fetch_add(1, Ordering::Relaxed);
    let cell = hit
        .regs()
        .get(Reg::Rbx)
        .wrapping_sub(hit.regs().get(Reg::R14)) as usize;
    c.cells[cell.min(c.cells.len() - 1)].fetch_add(1, Ordering::Relaxed);
    Action::Continue as u32
}

/// The VM: the current block of each program and the probes tools asked for.
#[derive(Debug, Default)]
struct Vm {
    blocks: BTreeMap<String, Block>,
    probes: BTreeMap<String, Vec<SourceProbe>>,
}

impl Vm {
    /// Adds a probe on `program` and attaches it to its current block.
    fn probe(&mut self, program: &str, label: &str, at: Where, record: Record) -> Res<()> {
        let mut p = SourceProbe {
            label: label.into(),
            at,
            record,
            counters: Box::new(Counters {
                hits: AtomicU64::new(0),
                cells: [const { AtomicU64::new(0) }; 16],
            }),
            attached: Vec::new(),
        };
        let block = self.blocks.get(program).ok_or("no such program")?;
        p.attached = attach_to(block, &p)?;
        self.probes.entry(program.into()).or_default().push(p);
        Ok(())
    }

    /// Makes `block` the program's code. If an older block exists, the
    /// program's probes move to the new one first and the old one is then
    /// retired (step 4). A thread must not be running the old block: this
    /// VM only recompiles between runs. (probert's `region_remove` makes
    /// *probert* done with the memory; your threads are your business.)
    fn install(&mut self, program: &str, block: Block) -> Res<()> {
        for p in self.probes.get_mut(program).into_iter().flatten() {
            p.attached = attach_to(&block, p)?;
        }
        if let Some(old) = self.blocks.insert(program.into(), block) {
            old.retire()?;
        }
        Ok(())
    }

    fn block(&self, program: &str) -> Res<&Block> {
        Ok(self.blocks.get(program).ok_or("no such program")?)
    }

    /// Retires every block; their probes go with them.
    fn shutdown(&mut self) -> Res<()> {
        for (_, b) in std::mem::take(&mut self.blocks) {
            b.retire()?;
        }
        // Every consumer is detached and a grace period has passed (inside
        // `region_remove`): the counters may be freed now.
        self.probes.clear();
        Ok(())
    }
}

/// Attaches a source probe to every address it names in `block`.
fn attach_to(block: &Block, p: &SourceProbe) -> Res<Vec<(usize, ConsumerId)>> {
    let handler = match p.record {
        Record::Count => count_hit,
        Record::Cells => cell_of_hit,
    };
    let user_data = &*p.counters as *const Counters as *mut std::ffi::c_void;
    let addrs = block.addrs(&p.at);
    if addrs.is_empty() {
        return Err(format!("{}: no command there", p.label).into());
    }
    let mut attached = Vec::with_capacity(addrs.len());
    for a in addrs {
        // SAFETY: `a` starts an instruction of a registered block (from its
        // site map), and the block stays mapped until its region is removed,
        // which detaches this probe. The handlers touch atomics only, and
        // `user_data` lives in `p`, which outlives the attachment.
        // `attach` picks the mechanism (`Mode::Auto`): the fast path where
        // the site allows it (our 5-byte NOPs), else the trap path.
        attached.push((a, unsafe { probert::attach(a, handler, user_data) }?));
    }
    Ok(attached)
}

// ---------------------------------------------------------------------------
// Probes on the VM's own Rust code

/// Bytes the program printed, seen by a probe on `vm_putchar` (its second
/// argument): filled in signal context, so atomics.
static PUTCHAR_BYTES: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];
static COMPILES: AtomicU64 = AtomicU64::new(0);

/// probert: a probe on an ordinary Rust function of the VM, with a closure
/// (the guard detaches when dropped). The closure runs in signal context.
fn probe_putchar() -> Res<probert::Probe> {
    // SAFETY: `vm_putchar` is a function of this program (never inlined, so
    // its address is its code); the closure touches atomics only.
    let p = unsafe {
        probert::probe(vm_putchar as *const () as usize, |hit: &mut Hit| {
            let byte = hit.regs().arg(1).unwrap_or(0) as u8;
            PUTCHAR_BYTES[byte as usize].fetch_add(1, Ordering::Relaxed);
            Action::Continue
        })
    }?;
    Ok(p)
}

unsafe extern "C" fn count_compiles(_hit: *mut Hit) -> u32 {
    COMPILES.fetch_add(1, Ordering::Relaxed);
    Action::Continue as u32
}

/// Takes and clears the putchar histogram.
fn take_putchar_histogram() -> Vec<(u8, u64)> {
    (0..=255u8)
        .filter_map(|b| {
            let n = PUTCHAR_BYTES[b as usize].swap(0, Ordering::Relaxed);
            (n > 0).then_some((b, n))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Reports

fn bar(n: u64, max: u64, width: u64) -> String {
    "█".repeat((n * width).div_ceil(max.max(1)) as usize)
}

fn show_byte(b: u8) -> String {
    match b {
        b'\n' => "\\n".into(),
        b' ' => "' '".into(),
        0x21..=0x7e => (b as char).to_string(),
        _ => format!("{b:#04x}"),
    }
}

fn print_histogram(title: &str, rows: &[(String, u64)]) {
    let max = rows.iter().map(|r| r.1).max().unwrap_or(0);
    println!("  {title}");
    for (k, n) in rows {
        println!("    {k:>4} {n:>5} {}", bar(*n, max, 40));
    }
}

/// A probe's source context: its line (without the comment, at most 60
/// characters around the position) and a caret under the position.
fn context(src: &str, pos: usize) -> [String; 2] {
    let start = src[..pos].rfind('\n').map_or(0, |n| n + 1);
    let line: Vec<char> = src[start..].lines().next().unwrap_or("").chars().collect();
    let col = src[start..pos].chars().count();
    let code_end = line
        .iter()
        .rposition(|c| "+-<>[].,".contains(*c))
        .map_or(0, |i| i + 1)
        .max(col + 1);
    let lo = col.saturating_sub(30);
    let hi = (lo + 60).min(code_end);
    let number = src[..pos].matches('\n').count() + 1;
    let dots = if lo > 0 { "…" } else { "" };
    [
        format!(
            "{number:>4} | {dots}{}",
            line[lo..hi].iter().collect::<String>()
        ),
        format!("     | {dots}{:>w$}^", "", w = col - lo),
    ]
}

fn print_counts(vm: &Vm, program: &str, src: &str) {
    let probes = vm
        .probes
        .get(program)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let max = probes
        .iter()
        .map(|p| p.counters.hits.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0);
    for p in probes {
        let n = p.counters.hits.load(Ordering::Relaxed);
        // How probert serves the probe's (first) site right now.
        let mode = match p.attached.first().map(|a| probert::probe_mode(a.0)) {
            Some(Ok(probert::Mode::Fast)) => "fast",
            Some(Ok(_)) => "trap",
            _ => "-",
        };
        println!("    {:<34} {mode:<4} {n:>6} {}", p.label, bar(n, max, 30));
        if let Where::Pos(pos) = p.at {
            for l in context(src, pos) {
                println!("      {l}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The tour

const HELLO: &str = "++++++++[>++++[>++>+++>+++>+<<<<-]>+>+>->>+[<]<-]>>.>---.+++++++..+++.>>.<-.<.+++.------.--------.>>+.>++.\n";

/// Rows of stars, one to ten. Comments avoid the eight command characters.
const TRIANGLE: &str = "\
++++++++++                   c0 is 10 rows
>>>>> ++++++ [<+++++++>-]    c4 is 42 which is a star
++++++++++ <<<<<             c5 is 10 which is a newline
[                            for each row
  >+                         c1 grows by one
  [>+>+<<-] >>[<<+>>-]       c2 is a copy of c1 using c3
  <[>>.<<-]                  print c2 stars
  >>>.                       print a newline
  <<<<<-                     one row fewer
]
";

/// The position of the `nth` occurrence of `needle` on 1-based `line`.
fn find(src: &str, line: usize, needle: &str) -> Res<usize> {
    let start: usize = src.split_inclusive('\n').take(line - 1).map(str::len).sum();
    let text = src[start..].lines().next().ok_or("no such line")?;
    Ok(start + text.find(needle).ok_or("no such text")?)
}

fn check(what: &str, ok: bool) -> Res<()> {
    if ok {
        println!("  ok: {what}");
        Ok(())
    } else {
        Err(format!("check failed: {what}").into())
    }
}

fn tour() -> Res<()> {
    println!(
        "bfjit — a Brainfuck JIT probed with probert {}\n",
        probert::VERSION
    );
    probert::init()?;
    let mut vm = Vm::default();

    // 1. Probes on the VM's own Rust functions.
    println!("1. probes on the VM's own Rust code: `vm_putchar` (closure) and `compile`");
    let putchar_first = read_bytes(vm_putchar as *const () as usize, 1);
    let putchar = probe_putchar()?;
    // SAFETY: `compile` is a never-inlined function of this program; the
    // handler touches one atomic.
    let compiles = unsafe {
        probert::attach(
            compile as *const () as usize,
            count_compiles,
            std::ptr::null_mut(),
        )
    }?;

    // 2. hello: a probe on every `.` reads the tape head from the registers.
    println!("\n2. hello.bf, tier 0; a probe on every `.` reads the tape cell from rbx - r14");
    vm.install("hello", compile("hello", HELLO, 0)?)?;
    vm.probe("hello", "every `.`", Where::EveryOut, Record::Cells)?;
    let out = vm.block("hello")?.run(b"")?;
    print!("  output: {}", String::from_utf8_lossy(&out));
    let (want, _, cells) = interpret(&parse(HELLO)?, b"")?;
    let p = &vm.probes["hello"][0];
    let hist: Vec<(String, u64)> = (0..16)
        .map(|c| (format!("c{c}"), p.counters.cells[c].load(Ordering::Relaxed)))
        .filter(|r| r.1 > 0)
        .collect();
    print_histogram("tape cell each `.` printed from:", &hist);
    let bytes: Vec<(String, u64)> = take_putchar_histogram()
        .into_iter()
        .map(|(b, n)| (show_byte(b), n))
        .collect();
    print_histogram("bytes seen by the `vm_putchar` probe:", &bytes);
    check(
        "output is \"Hello World!\\n\"",
        out == b"Hello World!\n" && out == want,
    )?;
    let mut want_cells = [0u64; 16];
    for c in cells {
        want_cells[c.min(15)] += 1;
    }
    check(
        "cell histogram matches the interpreter",
        (0..16).all(|c| p.counters.cells[c].load(Ordering::Relaxed) == want_cells[c]),
    )?;
    check(
        "putchar probe saw every byte",
        bytes.iter().map(|r| r.1).sum::<u64>() == 13,
    )?;

    // 3. triangle: probes by source position, kept across a recompilation.
    println!(
        "\n3. triangle.bf: probes by source position; runs at tier 0, recompiles, runs at tier 1"
    );
    vm.install("triangle", compile("triangle", TRIANGLE, 0)?)?;
    let probes = [
        ("block entry", Where::Entry),
        (
            "row loop body `>` 5:3",
            Where::Pos(find(TRIANGLE, 5, ">+")?),
        ),
        ("star loop `[` 7:4", Where::Pos(find(TRIANGLE, 7, "[")?)),
        ("star `.` 7:7", Where::Pos(find(TRIANGLE, 7, ".")?)),
        ("newline `.` 8:6", Where::Pos(find(TRIANGLE, 8, ".")?)),
        ("third `+` 1:3 (folded at tier 1)", Where::Pos(2)),
    ];
    for (label, at) in probes.iter().cloned() {
        vm.probe("triangle", label, at, Record::Count)?;
    }
    let t0 = vm.block("triangle")?;
    println!(
        "  {t0:?}: {} source probes ({} probed addresses in the process)",
        probes.len(),
        probert::probe_count()
    );
    let want = interpret(&parse(TRIANGLE)?, b"")?.0;
    let outs = (0..3)
        .map(|_| vm.block("triangle")?.run(b""))
        .collect::<Res<Vec<_>>>()?;
    check("tier 0 output, 3 runs", outs.iter().all(|o| *o == want))?;
    print_counts(&vm, "triangle", TRIANGLE);

    // Tier up while the probes are live: compile, move the probes, retire the
    // old block (its region is removed, its code restored, then freed).
    let t1 = compile("triangle", TRIANGLE, 1)?;
    let (old_len, new_len) = (vm.block("triangle")?.code.len(), t1.code.len());
    vm.install("triangle", t1)?;
    println!(
        "  recompiled: tier 0 ({old_len} bytes) retired and freed; {:?} now live, tier {}",
        vm.block("triangle")?,
        vm.block("triangle")?.tier
    );
    // Two threads run the new block at once: every hit on every thread counts.
    let t1 = vm.block("triangle")?;
    let outs: Vec<Vec<u8>> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..2)
            .map(|_| s.spawn(|| (0..3).map(|_| t1.run(b"")).collect::<Res<Vec<_>>>()))
            .collect();
        runs.into_iter()
            .map(|r| r.join().expect("a run panicked"))
            .collect::<Res<Vec<Vec<Vec<u8>>>>>()
    })
    .map(|v| v.into_iter().flatten().collect())
    .map_err(|e| e.to_string())?;
    let (want, counts, _) = interpret(&parse(TRIANGLE)?, b"")?;
    print!(
        "  output (each run):\n{}",
        indent(&String::from_utf8_lossy(&want))
    );
    check(
        "tier 1 output on 2 threads × 3 runs",
        outs.len() == 6 && outs.iter().all(|o| *o == want),
    )?;
    println!("  counts after 3 runs at tier 0 and 6 at tier 1 ({new_len} bytes):");
    print_counts(&vm, "triangle", TRIANGLE);
    let parsed = parse(TRIANGLE)?;
    for p in &vm.probes["triangle"] {
        let per_run = match p.at {
            Where::Pos(pos) => parsed
                .iter()
                .position(|i| i.pos == pos)
                .map_or(0, |i| counts[i]),
            _ => 1,
        };
        check(
            &format!("{} = 9 runs × {per_run}", p.label),
            p.counters.hits.load(Ordering::Relaxed) == 9 * per_run,
        )?;
    }
    let bytes: Vec<(String, u64)> = take_putchar_histogram()
        .into_iter()
        .map(|(b, n)| (show_byte(b), n))
        .collect();
    print_histogram("bytes seen by the `vm_putchar` probe:", &bytes);
    check(
        "putchar probe: 9 × 55 stars and 9 × 10 newlines",
        bytes == [("\\n".into(), 90), ("*".into(), 495)],
    )?;

    // 4. A clean exit.
    println!("\n4. shutdown");
    let c = probert::stats(compiles)?;
    check("`compile` probe counted 3 compilations", c.hits == 3)?;
    probert::detach(compiles)?;
    let s = putchar.stats()?;
    putchar.detach()?;
    check(
        "`vm_putchar` probe: 13 + 585 hits, none missed",
        s.hits == 598 && s.missed == 0,
    )?;
    check(
        "`vm_putchar` restored",
        read_bytes(vm_putchar as *const () as usize, 1) == putchar_first,
    )?;
    vm.shutdown()?;
    check(
        "every block retired with its code restored; no probe left",
        probert::probe_count() == 0,
    )?;
    println!("\nbfjit: all checks passed");
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

/// Reads `n` bytes of this program's code.
fn read_bytes(addr: usize, n: usize) -> Vec<u8> {
    // SAFETY: `addr` is a function of this program: mapped, readable.
    (0..n)
        .map(|i| unsafe { std::ptr::read_volatile((addr + i) as *const u8) })
        .collect()
}

// ---------------------------------------------------------------------------
// Running a file

fn run_file(args: &[String]) -> Res<()> {
    let mut path = None;
    let (mut wheres, mut input, mut tier) = (Vec::new(), Vec::new(), 1u8);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--probe" => wheres.push(it.next().ok_or("--probe needs WHERE")?.clone()),
            "--input" => input = it.next().ok_or("--input needs TEXT")?.as_bytes().to_vec(),
            "--tier" => tier = it.next().ok_or("--tier needs 0 or 1")?.parse()?,
            "-h" | "--help" => {
                println!("usage: bfjit [FILE.bf [--probe LINE:COL|entry|putchar]... [--input TEXT] [--tier 0|1]]");
                return Ok(());
            }
            _ if path.is_none() => path = Some(a.clone()),
            _ => return Err(format!("unexpected argument {a:?}").into()),
        }
    }
    let path = path.ok_or("no file")?;
    let src = std::fs::read_to_string(&path)?;
    probert::init()?;
    let mut vm = Vm::default();
    let mut putchar = None;
    vm.install(&path, compile(&path, &src, tier.min(1))?)?;
    for w in &wheres {
        match w.as_str() {
            "putchar" => putchar = Some(probe_putchar()?),
            "entry" => vm.probe(&path, "block entry", Where::Entry, Record::Count)?,
            lc => {
                let pos =
                    offset_of(&src, lc).ok_or_else(|| format!("{lc}: not a LINE:COL of {path}"))?;
                vm.probe(
                    &path,
                    &format!("{lc} `{}`", &src[pos..=pos]),
                    Where::Pos(pos),
                    Record::Count,
                )?;
            }
        }
    }
    let out = vm.block(&path)?.run(&input)?;
    print!("{}", String::from_utf8_lossy(&out));
    if !out.ends_with(b"\n") {
        println!();
    }
    if !wheres.is_empty() {
        println!("\nprobes on {:?}:", vm.block(&path)?);
        print_counts(&vm, &path, &src);
    }
    if let Some(p) = putchar {
        let bytes: Vec<(String, u64)> = take_putchar_histogram()
            .into_iter()
            .map(|(b, n)| (show_byte(b), n))
            .collect();
        print_histogram("bytes seen by the `vm_putchar` probe:", &bytes);
        p.detach()?;
    }
    vm.shutdown()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = if args.is_empty() {
        tour()
    } else {
        run_file(&args)
    };
    if let Err(e) = r {
        eprintln!("bfjit: {e}");
        std::process::exit(1);
    }
}
