//! Tests of the flow analysis and the run stubs on code nobody here wrote:
//! the system's shared libraries, split into functions by their `.eh_frame`
//! FDEs, with the landing pads of their LSDAs, and the symbols and
//! relocation targets that point inside functions as entries.
//!
//! The ELF and DWARF reading is the minimum these tests need (64-bit
//! little-endian, `.eh_frame` CIE/FDE with `z`/`R`/`P`/`L` augmentations,
//! `.gcc_except_table` call-site tables), not a parser for hostile files.
//! `coverage_of_system_libraries` (ignored: run it with `--release
//! --ignored --nocapture`; `PROBERT_FLOW_DETAIL=1` adds every unproven
//! function and why) prints the coverage table: the share of function
//! entries and of instruction boundaries with a displaceable run, under
//! both pointer policies, the refusals by reason, the analysis time and the
//! memory kept. `displaced_entries_of_a_loaded_library_run` loads libz and
//! calls stubs of its entries in place of the functions.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use super::{emit_site_stub, link_module, FunctionFlow, PointerJumps, Refusal};

/// Where the tests pretend a library is mapped when it is not (so that
/// small immediates do not look like code addresses, as at run time).
const BIAS: u64 = 0x7f12_3400_0000;

const LIBS: [&str; 4] = [
    "/lib/x86_64-linux-gnu/libc.so.6",
    "/lib/x86_64-linux-gnu/libz.so.1",
    "/lib/x86_64-linux-gnu/libsqlite3.so.0",
    "/lib/x86_64-linux-gnu/liblua5.4.so.0",
];

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// A section: address, file offset, size.
#[derive(Clone, Copy, Default)]
struct Section {
    addr: u64,
    offset: usize,
    size: usize,
    link: u32,
}

/// A loaded ELF file (addresses are link-time, unbiased).
struct Elf {
    bytes: Vec<u8>,
    /// PT_LOAD: (vaddr, file offset, file size).
    loads: Vec<(u64, usize, usize)>,
    sections: BTreeMap<String, Section>,
    all: Vec<Section>,
    /// RELATIVE and 64 relocations: where, the value stored (unbiased).
    relocs: BTreeMap<u64, u64>,
}

impl Elf {
    fn load(path: &str) -> Option<Elf> {
        let bytes = std::fs::read(path).ok()?;
        if bytes.get(..4)? != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
            return None;
        }
        let (phoff, phnum) = (u64_at(&bytes, 0x20) as usize, u16_at(&bytes, 0x38) as usize);
        let (shoff, shnum) = (u64_at(&bytes, 0x28) as usize, u16_at(&bytes, 0x3C) as usize);
        let shstrndx = u16_at(&bytes, 0x3E) as usize;
        let mut loads = Vec::new();
        for i in 0..phnum {
            let p = phoff + i * 56;
            if u32_at(&bytes, p) == 1 {
                loads.push((
                    u64_at(&bytes, p + 16),
                    u64_at(&bytes, p + 8) as usize,
                    u64_at(&bytes, p + 32) as usize,
                ));
            }
        }
        let sec = |i: usize| {
            let s = shoff + i * 64;
            Section {
                addr: u64_at(&bytes, s + 16),
                offset: u64_at(&bytes, s + 24) as usize,
                size: u64_at(&bytes, s + 32) as usize,
                link: u32_at(&bytes, s + 40),
            }
        };
        let strtab = sec(shstrndx);
        let mut sections = BTreeMap::new();
        let mut all = Vec::new();
        for i in 0..shnum {
            let name_off = strtab.offset + u32_at(&bytes, shoff + i * 64) as usize;
            let end = bytes[name_off..].iter().position(|&c| c == 0)?;
            let name = String::from_utf8_lossy(&bytes[name_off..name_off + end]).into_owned();
            sections.insert(name, sec(i));
            all.push(sec(i));
        }
        let mut elf = Elf {
            bytes,
            loads,
            sections,
            all,
            relocs: BTreeMap::new(),
        };
        elf.relocs = elf.read_relocs();
        Some(elf)
    }

    /// The file bytes of `[addr, addr + len)`, if one PT_LOAD holds them.
    fn at(&self, addr: u64, len: usize) -> Option<&[u8]> {
        self.loads.iter().find_map(|&(va, off, size)| {
            let o = addr.checked_sub(va)? as usize;
            (o + len <= size).then(|| &self.bytes[off + o..off + o + len])
        })
    }

    /// Reads `buf.len()` bytes at link-time address `addr`, relocated for a
    /// library loaded at `bias`.
    fn read(&self, addr: u64, buf: &mut [u8], bias: u64) -> bool {
        let Some(src) = self.at(addr, buf.len()) else {
            return false;
        };
        buf.copy_from_slice(src);
        let end = addr + buf.len() as u64;
        for (&at, &v) in self.relocs.range(addr.saturating_sub(7)..end) {
            let word = (v + bias).to_le_bytes();
            for (i, &b) in word.iter().enumerate() {
                let a = at + i as u64;
                if a >= addr && a < end {
                    buf[(a - addr) as usize] = b;
                }
            }
        }
        true
    }

    fn symbols(&self) -> Vec<u64> {
        let Some(&dynsym) = self.sections.get(".dynsym") else {
            return Vec::new();
        };
        (0..dynsym.size / 24)
            .map(|i| u64_at(&self.bytes, dynsym.offset + i * 24 + 8))
            .filter(|&v| v != 0)
            .collect()
    }

    fn read_relocs(&self) -> BTreeMap<u64, u64> {
        let mut out = BTreeMap::new();
        let Some(&rela) = self.sections.get(".rela.dyn") else {
            return out;
        };
        let symtab = self
            .all
            .get(rela.link as usize)
            .copied()
            .unwrap_or_default();
        for i in 0..rela.size / 24 {
            let r = rela.offset + i * 24;
            let (at, info, addend) = (
                u64_at(&self.bytes, r),
                u64_at(&self.bytes, r + 8),
                u64_at(&self.bytes, r + 16),
            );
            let value = match info & 0xFFFF_FFFF {
                8 | 37 => addend, // RELATIVE, IRELATIVE
                1 => {
                    let sym = (info >> 32) as usize;
                    let v = u64_at(&self.bytes, symtab.offset + sym * 24 + 8);
                    if v == 0 {
                        continue;
                    }
                    v.wrapping_add(addend)
                }
                _ => continue,
            };
            out.insert(at, value);
        }
        out
    }
}

/// A cursor over bytes at a link-time address.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    /// The address of `b[0]`.
    base: u64,
}

impl Cursor<'_> {
    fn u8(&mut self) -> u8 {
        self.pos += 1;
        self.b[self.pos - 1]
    }
    fn uleb(&mut self) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let b = self.u8();
            v |= u64::from(b & 0x7F) << shift.min(63);
            shift += 7;
            if b & 0x80 == 0 {
                return v;
            }
        }
    }
    fn sleb(&mut self) -> i64 {
        let (mut v, mut shift) = (0i64, 0);
        loop {
            let b = self.u8();
            v |= i64::from(b & 0x7F) << shift.min(63);
            shift += 7;
            if b & 0x80 == 0 {
                if shift < 64 && b & 0x40 != 0 {
                    v |= -1 << shift;
                }
                return v;
            }
        }
    }
    fn fixed(&mut self, n: usize) -> u64 {
        let mut v = 0u64;
        for i in 0..n {
            v |= u64::from(self.u8()) << (8 * i);
        }
        v
    }
    /// A DW_EH_PE-encoded pointer (no indirection).
    fn encoded(&mut self, enc: u8) -> u64 {
        let here = self.base + self.pos as u64;
        let v = match enc & 0x0F {
            0x00 => self.fixed(8),
            0x01 => self.uleb(),
            0x02 => self.fixed(2),
            0x03 => self.fixed(4),
            0x04 => self.fixed(8),
            0x09 => self.sleb() as u64,
            0x0A => self.fixed(2) as i16 as i64 as u64,
            0x0B => self.fixed(4) as i32 as i64 as u64,
            0x0C => self.fixed(8),
            e => panic!("unsupported pointer encoding {e:#x}"),
        };
        if enc & 0x70 == 0x10 {
            v.wrapping_add(here)
        } else {
            v
        }
    }
}

/// A function from an FDE: start, length, LSDA (0 if none).
struct Fde {
    start: u64,
    len: u64,
    lsda: u64,
}

fn fdes(elf: &Elf) -> Vec<Fde> {
    let s = elf.sections[".eh_frame"];
    let b = &elf.bytes[s.offset..s.offset + s.size];
    let mut cies: BTreeMap<usize, (u8, u8)> = BTreeMap::new();
    let mut out = Vec::new();
    let mut p = 0;
    while p + 4 <= b.len() {
        let mut len = u32_at(b, p) as usize;
        let mut body = p + 4;
        if len == 0 {
            break;
        }
        if len == 0xFFFF_FFFF {
            len = u64_at(b, p + 4) as usize;
            body = p + 12;
        }
        let id = u32_at(b, body) as usize;
        let next = body + len;
        let mut c = Cursor {
            b,
            pos: body + 4,
            base: s.addr,
        };
        if id == 0 {
            let version = c.u8();
            let aug_start = c.pos;
            while c.u8() != 0 {}
            let aug = b[aug_start..c.pos - 1].to_vec();
            if aug.windows(2).any(|w| w == b"eh") {
                c.pos += 8;
            }
            c.uleb();
            c.sleb();
            if version == 1 {
                c.u8();
            } else {
                c.uleb();
            }
            let (mut fde_enc, mut lsda_enc) = (0u8, 0xFFu8);
            if aug.first() == Some(&b'z') {
                c.uleb();
                for &ch in &aug[1..] {
                    match ch {
                        b'R' => fde_enc = c.u8(),
                        b'L' => lsda_enc = c.u8(),
                        b'P' => {
                            let e = c.u8();
                            c.encoded(e & 0x7F);
                        }
                        _ => {}
                    }
                }
            }
            cies.insert(p, (fde_enc, lsda_enc));
        } else {
            let cie = body - id;
            let (fde_enc, lsda_enc) = cies[&cie];
            let start = c.encoded(fde_enc);
            let len = c.encoded(fde_enc & 0x0F);
            let mut lsda = 0;
            c.uleb();
            if lsda_enc != 0xFF {
                lsda = c.encoded(lsda_enc);
            }
            if len > 0 {
                out.push(Fde { start, len, lsda });
            }
        }
        p = next;
    }
    out.sort_by_key(|f| f.start);
    out
}

/// The landing pads of the LSDA at `lsda` for the function at `start`.
fn landing_pads(elf: &Elf, start: u64, lsda: u64) -> Vec<u64> {
    let Some(sec) = elf
        .all
        .iter()
        .find(|s| s.addr <= lsda && lsda < s.addr + s.size as u64)
    else {
        return Vec::new();
    };
    let b = &elf.bytes[sec.offset..sec.offset + sec.size];
    let mut c = Cursor {
        b,
        pos: (lsda - sec.addr) as usize,
        base: sec.addr,
    };
    let lp_enc = c.u8();
    let lp_start = if lp_enc != 0xFF {
        c.encoded(lp_enc)
    } else {
        start
    };
    if c.u8() != 0xFF {
        c.uleb();
    }
    let cs_enc = c.u8();
    let cs_len = c.uleb() as usize;
    let end = c.pos + cs_len;
    let mut pads = Vec::new();
    while c.pos < end {
        c.encoded(cs_enc);
        c.encoded(cs_enc);
        let lp = c.encoded(cs_enc);
        c.uleb();
        if lp != 0 {
            pads.push(lp_start + lp);
        }
    }
    pads
}

/// A library split into analysed functions.
struct Analysed {
    elf: Elf,
    /// Where the library is (taken to be) loaded.
    bias: u64,
    flows: Vec<FunctionFlow>,
    /// Seconds spent in `analyze` and `link_module`.
    seconds: f64,
    code_bytes: usize,
}

fn analyse(path: &str, pointers: PointerJumps, bias: u64) -> Option<Analysed> {
    let elf = Elf::load(path)?;
    let fdes = fdes(&elf);
    // Addresses data and symbols name: entries wherever they land inside.
    let mut named: Vec<u64> = elf.symbols();
    named.extend(elf.relocs.values().copied());
    named.sort_unstable();
    let read = |addr: usize, buf: &mut [u8]| {
        (addr as u64)
            .checked_sub(bias)
            .is_some_and(|a| elf.read(a, buf, bias))
    };
    let t = Instant::now();
    let mut flows = Vec::with_capacity(fdes.len());
    let mut code_bytes = 0;
    for f in &fdes {
        let Some(code) = elf.at(f.start, f.len as usize) else {
            continue;
        };
        code_bytes += code.len();
        let lo = named.partition_point(|&a| a <= f.start);
        let hi = named.partition_point(|&a| a < f.start + f.len);
        let mut entries: Vec<usize> = named[lo..hi].iter().map(|&a| (a + bias) as usize).collect();
        if f.lsda != 0 {
            entries.extend(
                landing_pads(&elf, f.start, f.lsda)
                    .into_iter()
                    .map(|a| (a + bias) as usize),
            );
        }
        flows.push(FunctionFlow::analyze(
            code,
            (f.start + bias) as usize,
            &entries,
            &read,
            pointers,
        ));
    }
    link_module(&mut flows);
    let seconds = t.elapsed().as_secs_f64();
    Some(Analysed {
        elf,
        bias,
        flows,
        seconds,
        code_bytes,
    })
}

/// `s` with every biased address in it shown as the link-time address.
fn unbias(s: &str) -> String {
    s.split(' ')
        .map(|w| {
            let t = w.trim_end_matches([',', ':']);
            match t.strip_prefix("0x").map(|h| u64::from_str_radix(h, 16)) {
                Some(Ok(v)) if v >= BIAS => w.replace(t, &format!("{:#x}", v - BIAS)),
                _ => w.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A refusal's class, for the table.
fn class(r: &Refusal) -> String {
    match r {
        Refusal::UnboundedJump { why, .. } => format!("indirect jump: {why}"),
        Refusal::Unrelocatable { reason, .. } => {
            format!(
                "unrelocatable: {}",
                reason.split(':').next().unwrap_or(reason)
            )
        }
        Refusal::BranchInside { by, .. } | Refusal::AfterEndbr { by, .. } => {
            let what = match by {
                super::EntrySource::Branch(_) => "branch",
                super::EntrySource::JumpTable(_) => "jump-table target",
                super::EntrySource::AddressTaken(_) => "address taken",
                super::EntrySource::Endbr => "endbr64",
                super::EntrySource::Given => "landing pad/symbol/relocation",
                super::EntrySource::Foreign(_) => "other function's branch/table/address",
            };
            let d = format!("{r:?}");
            let name = d.split(' ').next().unwrap_or("");
            format!("{name}: {what}")
        }
        _ => format!("{r:?}")
            .split([' ', '{'])
            .next()
            .unwrap_or("")
            .to_owned(),
    }
}

/// The run stub for `site` must emit for a stub 1 GiB away, and every
/// boundary of the run must be a boundary of the flow.
fn check_site(a: &Analysed, flow: &FunctionFlow, s: &super::Site) -> Result<(), String> {
    assert!(s.end >= s.jump + 5 && flow.is_boundary(s.jump), "{s:x?}");
    let code = a
        .elf
        .at(s.jump as u64 - a.bias, s.end - s.jump)
        .expect("run bytes");
    let stub = s.jump + (1 << 30);
    // A small slot, else a large one, as the pool tries them.
    emit_site_stub(code, s.jump, stub, 64, stub + 0x1000, 0x1000)
        .or_else(|_| emit_site_stub(code, s.jump, stub, 128, stub + 0x1000, 0x1000))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[derive(Default)]
struct Tally {
    total: usize,
    ok: usize,
    emit_failed: usize,
    reasons: BTreeMap<String, usize>,
}

impl Tally {
    fn add(&mut self, a: &Analysed, flow: &FunctionFlow, r: Result<super::Site, Refusal>) {
        self.total += 1;
        match r {
            Ok(s) => match check_site(a, flow, &s) {
                Ok(()) => self.ok += 1,
                Err(e) => {
                    self.emit_failed += 1;
                    *self.reasons.entry(format!("stub: {e}")).or_default() += 1;
                }
            },
            Err(r) => *self.reasons.entry(class(&r)).or_default() += 1,
        }
    }

    fn report(&self, what: &str, out: &mut String) {
        let pct = |n: usize| 100.0 * n as f64 / self.total.max(1) as f64;
        let _ = writeln!(
            out,
            "  {what}: {} of {} ({:.1} %)",
            self.ok,
            self.total,
            pct(self.ok)
        );
        let mut v: Vec<_> = self.reasons.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1));
        for (r, n) in v {
            let _ = writeln!(out, "    {:>7} {:5.2} %  {r}", n, pct(*n));
        }
    }
}

fn measure(path: &str, pointers: PointerJumps, out: &mut String) {
    let Some(a) = analyse(path, pointers, BIAS) else {
        let _ = writeln!(out, "{path}: not readable, skipped");
        return;
    };
    let (mut entries, mut bounds) = (Tally::default(), Tally::default());
    // Today's rule: a first instruction of 5 bytes or more (`fast_eligible`).
    let single = |addr: usize| {
        let code = a.elf.at(addr as u64 - a.bias, 15).unwrap_or(&[]);
        super::analyze(code, addr).is_ok_and(|d| super::fast_eligible(d.len, &d.displaced))
    };
    let (mut single_entries, mut single_bounds) = (0, 0);
    let mut unproven = 0;
    let mut heap = 0;
    let mut parts = (0, 0, 0);
    for flow in &a.flows {
        entries.add(&a, flow, flow.site_for_entry());
        single_entries += usize::from(single(flow.start()));
        for b in flow.boundaries() {
            bounds.add(&a, flow, flow.displaceable(b));
            single_bounds += usize::from(single(b));
        }
        if let Some(u) = flow.unproven() {
            unproven += 1;
            if std::env::var_os("PROBERT_FLOW_DETAIL").is_some() {
                let _ = writeln!(
                    out,
                    "    unproven {path} {:#x}: {}",
                    flow.start() as u64 - BIAS,
                    unbias(&u.to_string())
                );
            }
        }
        heap += flow.heap_bytes() + std::mem::size_of::<FunctionFlow>();
        let p = flow.heap_parts();
        parts = (parts.0 + p.0, parts.1 + p.1, parts.2 + p.2);
    }
    let n = a.flows.len().max(1);
    let _ = writeln!(
        out,
        "{path} ({pointers:?}): {} functions, {} KiB of code, {unproven} unproven; analysis {:.1} ms \
         ({:.1} µs per function), {} bytes per function ({:.2} per code byte)",
        a.flows.len(),
        a.code_bytes / 1024,
        a.seconds * 1e3,
        a.seconds * 1e6 / n as f64,
        heap / n,
        heap as f64 / a.code_bytes.max(1) as f64
    );
    let _ = writeln!(
        out,
        "  per function: {} bytes of struct, {} of bitmaps, {} of entry points, {} other",
        std::mem::size_of::<FunctionFlow>(),
        parts.0 / n,
        parts.1 / n,
        parts.2 / n
    );
    let _ = writeln!(
        out,
        "  single-instruction sites (today's rule): {:.1} % of entries, {:.1} % of boundaries",
        100.0 * single_entries as f64 / entries.total.max(1) as f64,
        100.0 * single_bounds as f64 / bounds.total.max(1) as f64
    );
    entries.report("function entries", out);
    bounds.report("instruction boundaries", out);
}

#[test]
#[ignore = "prints the coverage table; run with --release --ignored --nocapture"]
fn coverage_of_system_libraries() {
    let mut out = String::new();
    for pointers in [PointerJumps::ToEntries, PointerJumps::Anywhere] {
        for lib in LIBS {
            measure(lib, pointers, &mut out);
        }
    }
    println!("{out}");
}

#[test]
fn sites_in_a_system_library_are_sound() {
    // libz is small enough for a debug build; skipped where it is missing.
    let Some(a) = analyse(LIBS[1], PointerJumps::ToEntries, BIAS) else {
        return;
    };
    assert!(a.flows.len() > 50);
    let mut ok = 0;
    for flow in &a.flows {
        let code = a
            .elf
            .at(flow.start() as u64 - a.bias, flow.end() - flow.start())
            .unwrap();
        // An independent linear decode of the same bytes.
        let mut starts = std::collections::HashSet::new();
        let mut d = iced_x86::Decoder::with_ip(
            64,
            code,
            flow.start() as u64,
            iced_x86::DecoderOptions::NONE,
        );
        while d.can_decode() {
            let i = d.decode();
            if i.is_invalid() {
                break;
            }
            starts.insert(i.ip() as usize);
        }
        for addr in flow.start()..flow.end() {
            assert_eq!(
                flow.is_boundary(addr),
                starts.contains(&addr) && addr < flow.decoded_end(),
                "{addr:#x}"
            );
        }
        for s in flow.boundaries() {
            if let Ok(site) = flow.displaceable(s) {
                check_site(&a, flow, &site).unwrap();
                ok += 1;
            }
        }
    }
    assert!(ok > 1000, "{ok}");
}

/// The entries of libz, loaded in this process, displaced into stubs near
/// it: calling a stub instead of the function must give the same result.
#[test]
// dlopen, dlsym, mmap and calls into generated code; each unsafe block says
// why it is sound.
#[allow(unsafe_code)]
fn displaced_entries_of_a_loaded_library_run() {
    use std::ffi::{c_char, c_ulong, c_void, CString};

    let path = CString::new(LIBS[1]).unwrap();
    // SAFETY: loading a system library whose initialisers are harmless; it
    // stays loaded (no dlclose) for the calls below.
    let lib = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if lib.is_null() {
        return;
    }
    let sym = |name: &str| {
        let n = CString::new(name).unwrap();
        // SAFETY: `lib` is a live handle; the name is NUL-terminated.
        unsafe { libc::dlsym(lib, n.as_ptr()) as usize }
    };
    let adler = sym("adler32");
    // SAFETY: `dladdr` fills `info` for an address of a loaded object.
    let base = unsafe {
        let mut info: libc::Dl_info = core::mem::zeroed();
        assert_ne!(libc::dladdr(adler as *const c_void, &mut info), 0);
        info.dli_fbase as u64
    };
    let a = analyse(LIBS[1], PointerJumps::ToEntries, base).unwrap();

    // A page for the stubs within rel32 reach of the library.
    const SIZE: usize = 1 << 16;
    // SAFETY: a fresh private anonymous mapping (the address is a hint).
    let page = unsafe {
        libc::mmap(
            (base as usize - (64 << 20)) as *mut c_void,
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(page, libc::MAP_FAILED);
    let page = page as usize;
    if (page as i64 - base as i64).unsigned_abs() > 1 << 30 {
        return;
    }

    let names = [
        "adler32",
        "adler32_z",
        "adler32_combine",
        "crc32",
        "crc32_z",
        "crc32_combine",
        "compressBound",
        "deflateBound",
        "zlibVersion",
        "zlibCompileFlags",
        "zError",
        "get_crc_table",
        "compress2",
        "uncompress",
    ];
    let mut stubs = std::collections::HashMap::new();
    let mut bytes = vec![0xCCu8; SIZE];
    let mut next = 0;
    for name in names {
        let f = sym(name);
        let Some(flow) = a.flows.iter().find(|fl| fl.start() == f) else {
            continue;
        };
        let Ok(site) = flow.site_for_entry() else {
            continue;
        };
        let code = a
            .elf
            .at(site.jump as u64 - base, site.end - site.jump)
            .unwrap();
        let b = emit_displaced_for_test(code, site.jump, page + next);
        bytes[next..next + b.len()].copy_from_slice(&b);
        // `site.probe..site.jump` (an endbr64) stays in place: entering at
        // the stub skips only that no-op.
        stubs.insert(name, page + next);
        next += 64;
    }
    // SAFETY: the page is ours; after the copy it holds only the stubs and
    // `int3` padding, and becomes read+exec.
    unsafe {
        core::ptr::copy_nonoverlapping(bytes.as_ptr(), page as *mut u8, SIZE);
        assert_eq!(
            libc::mprotect(page as *mut c_void, SIZE, libc::PROT_READ | libc::PROT_EXEC),
            0
        );
    }
    assert!(stubs.len() >= 10, "{:?}", stubs.keys());

    let data: Vec<u8> = (0..4000u32).map(|i| (i * 7 + i / 13) as u8).collect();
    type Checksum = extern "C" fn(c_ulong, *const u8, u32) -> c_ulong;
    type Combine = extern "C" fn(c_ulong, c_ulong, i64) -> c_ulong;
    type Bound = extern "C" fn(c_ulong) -> c_ulong;
    type StreamBound = extern "C" fn(*mut c_void, c_ulong) -> c_ulong;
    type Get = extern "C" fn() -> *const c_char;
    type Flags = extern "C" fn() -> c_ulong;
    type ZError = extern "C" fn(i32) -> *const c_char;
    type Compress = extern "C" fn(*mut u8, *mut c_ulong, *const u8, c_ulong, i32) -> i32;
    type Uncompress = extern "C" fn(*mut u8, *mut c_ulong, *const u8, c_ulong) -> i32;
    /// The function `name` and its stub, as `F`.
    ///
    /// # Safety
    /// `F` must be the C signature of the libz function `name`.
    unsafe fn both<F: Copy>(
        sym: &dyn Fn(&str) -> usize,
        stubs: &std::collections::HashMap<&str, usize>,
        name: &str,
    ) -> Option<(F, F)> {
        assert_eq!(core::mem::size_of::<F>(), core::mem::size_of::<usize>());
        let (f, s) = (sym(name), *stubs.get(name)?);
        // SAFETY: `f` is the libz function `name` and `s` a stub that runs
        // its first instructions and jumps back into it, so both have the
        // signature `F` (the caller's promise), a function pointer type.
        unsafe {
            Some((
                core::mem::transmute_copy::<usize, F>(&f),
                core::mem::transmute_copy::<usize, F>(&s),
            ))
        }
    }
    let mut ran = 0;
    for name in ["adler32", "adler32_z", "crc32", "crc32_z"] {
        // SAFETY: these four have the signature of `Checksum`.
        if let Some((f, s)) = unsafe { both::<Checksum>(&sym, &stubs, name) } {
            assert_eq!(
                s(1, data.as_ptr(), 4000),
                f(1, data.as_ptr(), 4000),
                "{name}"
            );
            ran += 1;
        }
    }
    for name in ["adler32_combine", "crc32_combine"] {
        // SAFETY: both have the signature of `Combine`.
        if let Some((f, s)) = unsafe { both::<Combine>(&sym, &stubs, name) } {
            assert_eq!(s(0x1234, 0x5678, 999), f(0x1234, 0x5678, 999), "{name}");
            ran += 1;
        }
    }
    // SAFETY: compressBound(uLong) -> uLong.
    if let Some((f, s)) = unsafe { both::<Bound>(&sym, &stubs, "compressBound") } {
        assert_eq!(s(12345), f(12345));
        ran += 1;
    }
    // SAFETY: deflateBound(z_streamp, uLong) -> uLong; NULL is allowed.
    if let Some((f, s)) = unsafe { both::<StreamBound>(&sym, &stubs, "deflateBound") } {
        assert_eq!(s(core::ptr::null_mut(), 777), f(core::ptr::null_mut(), 777));
        ran += 1;
    }
    for name in ["zlibVersion", "get_crc_table"] {
        // SAFETY: both take nothing and return a pointer.
        if let Some((f, s)) = unsafe { both::<Get>(&sym, &stubs, name) } {
            assert_eq!(s(), f(), "{name}");
            ran += 1;
        }
    }
    // SAFETY: zlibCompileFlags(void) -> uLong.
    if let Some((f, s)) = unsafe { both::<Flags>(&sym, &stubs, "zlibCompileFlags") } {
        assert_eq!(s(), f());
        ran += 1;
    }
    // SAFETY: zError(int) -> const char *.
    if let Some((f, s)) = unsafe { both::<ZError>(&sym, &stubs, "zError") } {
        for e in -6..=2 {
            assert_eq!(s(e), f(e));
        }
        ran += 1;
    }
    let mut packed = vec![0u8; 8000];
    let mut packed_len: c_ulong = 8000;
    // SAFETY: compress2(Bytef *, uLongf *, const Bytef *, uLong, int) -> int.
    if let Some((f, s)) = unsafe { both::<Compress>(&sym, &stubs, "compress2") } {
        let mut other = vec![0u8; 8000];
        let mut other_len: c_ulong = 8000;
        assert_eq!(
            s(packed.as_mut_ptr(), &mut packed_len, data.as_ptr(), 4000, 6),
            0
        );
        assert_eq!(
            f(other.as_mut_ptr(), &mut other_len, data.as_ptr(), 4000, 6),
            0
        );
        assert_eq!(packed[..packed_len as usize], other[..other_len as usize]);
        ran += 1;
    }
    // SAFETY: uncompress(Bytef *, uLongf *, const Bytef *, uLong) -> int.
    if let Some((f, s)) = unsafe { both::<Uncompress>(&sym, &stubs, "uncompress") } {
        if packed_len < 8000 {
            for g in [f, s] {
                let mut out = vec![0u8; 4000];
                let mut out_len: c_ulong = 4000;
                assert_eq!(
                    g(out.as_mut_ptr(), &mut out_len, packed.as_ptr(), packed_len),
                    0
                );
                assert_eq!(out, data);
            }
            ran += 1;
        }
    }
    // SAFETY: the mapping made above; nothing runs from it any more.
    unsafe { libc::munmap(page as *mut c_void, SIZE) };
    assert!(ran >= 10, "{ran}");
}

/// [`super::emit_displaced`], with a 64-byte limit.
fn emit_displaced_for_test(code: &[u8], addr: usize, at: usize) -> Vec<u8> {
    super::displace::emit_displaced(code, addr, at, 64).unwrap()
}
