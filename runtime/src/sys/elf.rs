//! Reading one ELF object: what the function table needs from it.
//!
//! [`read_elf`] takes any `object::ReadRef` — a `ReadCache` over a `File`
//! for files on disk, which reads with ordinary `read` calls only the parts
//! it is asked for (headers, symbol tables and their strings, `.eh_frame`,
//! `.gcc_except_table`), or a byte slice for an image copied out of memory
//! (the vDSO). Nothing is mapped, so a file truncated or replaced while we
//! read it gives an error or stale bytes, never a fault; whether the bytes
//! describe the loaded module is the caller's check ([`ElfImage::build_id`],
//! [`ElfImage::eh_frame_hdr`]).
//!
//! It collects, in link-time addresses:
//! - the `PT_LOAD` segments (the lowest one is the module's base, the
//!   executable ones are where functions may be);
//! - the GNU build-id note;
//! - every FDE of `.eh_frame` ([`super::cfi`]), found by section name, or
//!   through `PT_GNU_EH_FRAME` when the file has no section headers, with
//!   its landing pads decoded from the LSDA ([`super::lsda`]);
//! - the defined function symbols (`STT_FUNC`, `STT_GNU_IFUNC`) of
//!   `.symtab` and `.dynsym`, with binding, visibility and, for `.dynsym`,
//!   whether their version is the default one (`.gnu.version`);
//! - for a position-independent object, the addresses its dynamic
//!   relocations name ([`ElfImage::code_pointers`]).
//!
//! String tables are read whole, once, rather than a name at a time.

use object::elf;
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader, Rela, SectionHeader, Sym};
use object::read::SymbolIndex;
use object::{Endianness, Object, ReadRef};

use super::cfi::{self, FdeLsda, SectionAddrs};
use super::extents::{FdeIn, LsdaIn, SymFlags, SymbolIn};
use super::lsda;

/// A `PT_LOAD` segment, link-time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Load {
    pub vaddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
    pub exec: bool,
}

/// What [`read_elf`] found.
#[derive(Debug, Default)]
pub(crate) struct ElfImage {
    /// Lowest `PT_LOAD` address.
    pub base: u64,
    pub loads: Vec<Load>,
    pub build_id: Option<Vec<u8>>,
    /// Address and bytes of `.eh_frame_hdr`, to compare with memory when
    /// there is no build-id.
    pub eh_frame_hdr: Option<(u64, Vec<u8>)>,
    pub fdes: Vec<FdeIn>,
    /// FDEs that did not parse.
    pub fdes_skipped: usize,
    pub symbols: Vec<SymbolIn>,
    /// The addresses the dynamic relocations name: `RELATIVE` and
    /// `IRELATIVE` addends, defined symbols plus addends, the words `RELR`
    /// relocates and those lazily bound PLT slots hold in the file; and
    /// every defined dynamic symbol. In a position-independent object (`ET_DYN`: a shared
    /// library or a PIE) every absolute address its data holds is one of
    /// these, since the load address is known only at run time. `None`
    /// where that is not known: an `ET_EXEC` executable (its data holds
    /// absolute addresses with no relocation), a file without section
    /// headers, relocations of a kind not read here (`REL`, `CREL`) or that
    /// do not read.
    pub code_pointers: Option<Vec<u64>>,
}

impl ElfImage {
    /// The executable segments as `[start, end)`.
    pub fn exec(&self) -> Vec<(u64, u64)> {
        self.loads
            .iter()
            .filter(|l| l.exec)
            .map(|l| (l.vaddr, l.vaddr.saturating_add(l.memsz)))
            .collect()
    }
}

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ElfError {
    #[error("not a readable ELF file: {0}")]
    Object(#[from] object::Error),
    #[error("not an x86_64 little-endian ELF64 file")]
    Machine,
    #[error("no PT_LOAD segment")]
    NoLoad,
}

type File<'data, R> = ElfFile64<'data, Endianness, R>;

/// Reads what the function table needs from the ELF file in `data`.
pub(crate) fn read_elf<'data, R: ReadRef<'data>>(data: R) -> Result<ElfImage, ElfError> {
    let file = File::<R>::parse(data)?;
    let endian = file.endian();
    let header = file.elf_header();
    if header.e_machine(endian) != elf::EM_X86_64 || endian != Endianness::Little {
        return Err(ElfError::Machine);
    }
    let loads: Vec<Load> = file
        .elf_program_headers()
        .iter()
        .filter(|ph| ph.p_type(endian) == elf::PT_LOAD)
        .map(|ph| Load {
            vaddr: ph.p_vaddr(endian),
            memsz: ph.p_memsz(endian),
            offset: ph.p_offset(endian),
            filesz: ph.p_filesz(endian),
            exec: ph.p_flags(endian) & elf::PF_X != 0,
        })
        .collect();
    let base = loads
        .iter()
        .map(|l| l.vaddr)
        .min()
        .ok_or(ElfError::NoLoad)?;
    let mut image = ElfImage {
        base,
        build_id: file.build_id().ok().flatten().map(<[u8]>::to_vec),
        ..Default::default()
    };
    let bytes = Bytes {
        file: &file,
        data,
        loads: &loads,
    };
    image.eh_frame_hdr = bytes
        .section(b".eh_frame_hdr")
        .map(|(a, d)| (a, d.to_vec()));
    read_frames(&bytes, &mut image);
    read_symbols(&file, data, &mut image.symbols);
    image.code_pointers = read_code_pointers(&bytes);
    image.loads = loads;
    Ok(image)
}

/// Access to a file's bytes by section name or by link-time address.
struct Bytes<'a, 'data, R: ReadRef<'data>> {
    file: &'a File<'data, R>,
    data: R,
    loads: &'a [Load],
}

impl<'data, R: ReadRef<'data>> Bytes<'_, 'data, R> {
    fn endian(&self) -> Endianness {
        self.file.endian()
    }

    /// Address and contents of the first section named `name`.
    fn section(&self, name: &[u8]) -> Option<(u64, &'data [u8])> {
        let (endian, table) = (self.endian(), self.file.elf_section_table());
        let sh = table
            .iter()
            .find(|sh| table.section_name(endian, sh) == Ok(name))?;
        Some((sh.sh_addr(endian), sh.data(endian, self.data).ok()?))
    }

    /// The address of the first section named `name`.
    fn section_addr_by_name(&self, name: &[u8]) -> Option<u64> {
        let (endian, table) = (self.endian(), self.file.elf_section_table());
        table
            .iter()
            .find(|sh| table.section_name(endian, sh) == Ok(name))
            .map(|sh| sh.sh_addr(endian))
    }

    /// The file bytes from link-time `addr` to the end of the allocated
    /// section holding it, or, without section headers, to the end of the
    /// file-backed part of its `PT_LOAD` segment.
    fn bytes_at(&self, addr: u64) -> Option<&'data [u8]> {
        let endian = self.endian();
        let table = self.file.elf_section_table();
        if !table.is_empty() {
            let sh = table.iter().find(|sh| {
                let (a, size) = (sh.sh_addr(endian), sh.sh_size(endian));
                sh.sh_flags(endian) & u64::from(elf::SHF_ALLOC) != 0
                    && sh.sh_type(endian) != elf::SHT_NOBITS
                    && a <= addr
                    && addr < a.saturating_add(size)
            })?;
            let d = sh.data(endian, self.data).ok()?;
            return d.get(usize::try_from(addr - sh.sh_addr(endian)).ok()?..);
        }
        let l = self
            .loads
            .iter()
            .find(|l| l.vaddr <= addr && addr < l.vaddr.saturating_add(l.filesz))?;
        let off = l.offset.checked_add(addr - l.vaddr)?;
        self.data.read_bytes_at(off, l.vaddr + l.filesz - addr).ok()
    }
}

/// Fills `image.fdes` from `.eh_frame` (or `PT_GNU_EH_FRAME`), with
/// landing pads.
fn read_frames<'data, R: ReadRef<'data>>(bytes: &Bytes<'_, 'data, R>, image: &mut ElfImage) {
    let found = bytes.section(b".eh_frame").or_else(|| {
        // No section headers: .eh_frame_hdr's second field points at
        // .eh_frame, which runs to the end of its segment at most.
        let endian = bytes.endian();
        let ph = bytes
            .file
            .elf_program_headers()
            .iter()
            .find(|ph| ph.p_type(endian) == elf::PT_GNU_EH_FRAME)?;
        let hdr_addr = ph.p_vaddr(endian);
        let hdr = bytes.bytes_at(hdr_addr)?;
        let parsed = gimli::EhFrameHdr::new(hdr, gimli::LittleEndian)
            .parse(
                &gimli::BaseAddresses::default().set_eh_frame_hdr(hdr_addr),
                8,
            )
            .ok()?;
        let gimli::Pointer::Direct(at) = parsed.eh_frame_ptr() else {
            return None;
        };
        Some((at, bytes.bytes_at(at)?))
    });
    let Some((eh_frame_addr, eh_frame)) = found else {
        return;
    };
    let frames = cfi::fdes(
        eh_frame,
        SectionAddrs {
            eh_frame: eh_frame_addr,
            text: bytes.section_addr_by_name(b".text"),
            got: bytes.section_addr_by_name(b".got"),
        },
    );
    image.fdes_skipped = frames.skipped;
    image.fdes = frames
        .fdes
        .into_iter()
        .map(|f| FdeIn {
            start: f.start,
            len: f.len,
            lsda: match f.lsda {
                FdeLsda::None => LsdaIn::None,
                FdeLsda::Indirect => LsdaIn::Unknown,
                FdeLsda::At(a) => bytes
                    .bytes_at(a)
                    .and_then(|d| lsda::landing_pads(d, a, f.start).ok())
                    .map_or(LsdaIn::Unknown, LsdaIn::Pads),
            },
        })
        .collect();
}

/// Appends the defined function symbols of `.symtab` and `.dynsym`.
fn read_symbols<'data, R: ReadRef<'data>>(file: &File<'data, R>, data: R, out: &mut Vec<SymbolIn>) {
    let endian = file.endian();
    let sections = file.elf_section_table();
    let versions = sections.versions(endian, data).ok().flatten();
    for (table, dynsym) in [
        (file.elf_symbol_table(), false),
        (file.elf_dynamic_symbol_table(), true),
    ] {
        if table.is_empty() {
            continue;
        }
        // One read for the whole string table.
        let Some(strings) = sections
            .section(table.string_section())
            .ok()
            .and_then(|sh| sh.data(endian, data).ok())
        else {
            continue;
        };
        for (index, sym) in table.enumerate() {
            let kind = sym.st_type();
            if kind != elf::STT_FUNC && kind != elf::STT_GNU_IFUNC {
                continue;
            }
            let shndx = sym.st_shndx(endian);
            if shndx == elf::SHN_UNDEF || shndx == elf::SHN_ABS {
                continue;
            }
            let Some(name) = c_name(strings, sym.st_name(endian)) else {
                continue;
            };
            let bind = sym.st_bind();
            let visible = matches!(sym.st_visibility(), elf::STV_DEFAULT | elf::STV_PROTECTED);
            let global =
                visible && matches!(bind, elf::STB_GLOBAL | elf::STB_WEAK | elf::STB_GNU_UNIQUE);
            let hidden_version = dynsym
                && versions
                    .as_ref()
                    .is_some_and(|v| v.version_index(endian, SymbolIndex(index.0)).is_hidden());
            out.push(SymbolIn {
                name: String::from_utf8_lossy(name).into_owned(),
                value: sym.st_value(endian),
                size: sym.st_size(endian),
                flags: SymFlags {
                    dynsym,
                    symtab: !dynsym,
                    ifunc: kind == elf::STT_GNU_IFUNC,
                    global,
                    hidden_version,
                },
            });
        }
    }
}

/// [`ElfImage::code_pointers`]: every address the dynamic relocations of a
/// position-independent object name, the words its lazily bound PLT slots
/// hold in the file, and its defined dynamic symbols (unsorted, link-time).
fn read_code_pointers<'data, R: ReadRef<'data>>(bytes: &Bytes<'_, 'data, R>) -> Option<Vec<u64>> {
    let (file, data, endian) = (bytes.file, bytes.data, bytes.endian());
    let sections = file.elf_section_table();
    if file.elf_header().e_type(endian) != elf::ET_DYN || sections.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    // Every defined dynamic symbol in code, of any type: another module may
    // take its address (a `NOTYPE` label of assembly code, say).
    let dynsym = file.elf_dynamic_symbol_table();
    out.extend(
        dynsym
            .iter()
            .filter(|s| s.st_shndx(endian) != elf::SHN_UNDEF && s.st_shndx(endian) != elf::SHN_ABS)
            .map(|s| s.st_value(endian)),
    );
    // The dynamic relocations (allocated sections: `--emit-relocs` leaves
    // the static ones, whose addends are not addresses, in others).
    for sh in sections
        .iter()
        .filter(|sh| sh.sh_flags(endian) & u64::from(elf::SHF_ALLOC) != 0)
    {
        match sh.sh_type(endian) {
            elf::SHT_RELA => {
                let (relas, link) = sh.rela(endian, data).ok()??;
                let symbols = sections.symbol_table_by_index(endian, data, link).ok();
                for r in relas {
                    // Thread-local offsets and module ids are not addresses.
                    if matches!(
                        r.r_type(endian, false),
                        elf::R_X86_64_NONE
                            | elf::R_X86_64_COPY
                            | elf::R_X86_64_DTPMOD64
                            | elf::R_X86_64_DTPOFF64
                            | elf::R_X86_64_TPOFF64
                            | elf::R_X86_64_TLSDESC
                    ) {
                        continue;
                    }
                    if r.r_type(endian, false) == elf::R_X86_64_JUMP_SLOT {
                        // With lazy binding the slot holds its value from
                        // the file (its PLT entry's second half) until the
                        // first call resolves it.
                        if let Some(w) = bytes.bytes_at(r.r_offset(endian)).and_then(|b| b.get(..8))
                        {
                            out.push(u64::from_le_bytes(w.try_into().ok()?));
                        }
                    }
                    let addend = r.r_addend(endian) as u64;
                    let value = match r.symbol(endian, false) {
                        None => addend,
                        Some(i) => {
                            let sym = symbols.as_ref()?.symbol(i).ok()?;
                            if sym.st_shndx(endian) == elf::SHN_UNDEF {
                                continue;
                            }
                            sym.st_value(endian).wrapping_add(addend)
                        }
                    };
                    out.push(value);
                }
            }
            elf::SHT_RELR => {
                for at in sh.relr(endian, data).ok()?? {
                    // The addend is the word at the relocated place.
                    let word = bytes.bytes_at(at)?.get(..8)?;
                    out.push(u64::from_le_bytes(word.try_into().ok()?));
                }
            }
            elf::SHT_REL | elf::SHT_CREL => return None,
            _ => {}
        }
    }
    Some(out)
}

/// The NUL-terminated string at `off` of a string table.
fn c_name(strings: &[u8], off: u32) -> Option<&[u8]> {
    let s = strings.get(usize::try_from(off).ok()?..)?;
    let end = s.iter().position(|&b| b == 0)?;
    (end > 0).then(|| &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_elf_and_foreign_files_are_refused() {
        assert!(matches!(
            read_elf(&b"#!/bin/sh\necho\n"[..]),
            Err(ElfError::Object(_))
        ));
        assert!(matches!(read_elf(&[0u8; 16][..]), Err(ElfError::Object(_))));
    }

    #[inline(never)]
    extern "C" fn pointed_at_by_data() -> u32 {
        7
    }

    /// A code pointer in data: a `RELATIVE` relocation in this PIE.
    #[used]
    static CODE_POINTER: extern "C" fn() -> u32 = pointed_at_by_data;

    #[test]
    fn a_pie_names_the_code_its_data_points_at_and_a_fixed_executable_does_not() {
        assert_eq!(std::hint::black_box(&CODE_POINTER)(), 7);
        let f = std::fs::File::open("/proc/self/exe").expect("open");
        let img = read_elf(&object::ReadCache::new(f)).expect("read");
        let sym = img
            .symbols
            .iter()
            .find(|s| s.name.contains("pointed_at_by_data"))
            .expect("the symbol");
        let pointers = img.code_pointers.expect("a PIE's relocations read");
        assert!(pointers.contains(&sym.value), "{:#x}", sym.value);

        // A non-PIE executable holds absolute addresses nobody lists.
        let dir = std::env::temp_dir().join(format!("probert-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let (c, exe) = (dir.join("fixed.c"), dir.join("fixed"));
        std::fs::write(&c, "int main(void) { return 0; }\n").expect("write");
        match std::process::Command::new("cc")
            .args(["-O2", "-no-pie", "-fno-pie", "-o"])
            .arg(&exe)
            .arg(&c)
            .status()
        {
            Ok(s) => {
                assert!(s.success(), "cc: {s}");
                let f = std::fs::File::open(&exe).expect("open");
                let img = read_elf(&object::ReadCache::new(f)).expect("read");
                assert!(img.code_pointers.is_none());
            }
            Err(e) => println!("no C compiler ({e}): ET_EXEC not tested"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    // Never inlined into the harness's closure: its own symbol is checked.
    #[inline(never)]
    fn the_test_binary_reads_with_symbols_fdes_and_build_id() {
        let f = std::fs::File::open("/proc/self/exe").expect("open");
        let cache = object::ReadCache::new(f);
        let img = read_elf(&cache).expect("read");
        assert!(img.loads.iter().any(|l| l.exec));
        assert!(img.fdes.len() > 1000, "{} FDEs", img.fdes.len());
        assert_eq!(img.fdes_skipped, 0);
        assert!(img
            .symbols
            .iter()
            .any(|s| s.name.contains("the_test_binary_reads_with_symbols")));
        // Rust functions with drop glue have landing pads.
        assert!(img
            .fdes
            .iter()
            .any(|f| matches!(&f.lsda, LsdaIn::Pads(p) if !p.is_empty())));
        assert!(img.eh_frame_hdr.is_some());
    }

    #[test]
    fn c_names_stop_at_nul_and_refuse_empty_or_unterminated() {
        assert_eq!(c_name(b"\0foo\0bar", 1), Some(&b"foo"[..]));
        assert_eq!(c_name(b"\0foo\0bar", 0), None);
        assert_eq!(c_name(b"\0foo\0bar", 5), None);
        assert_eq!(c_name(b"\0foo\0bar", 99), None);
    }
}
