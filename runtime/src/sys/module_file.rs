//! The file behind a loaded module, checked against the loaded image.
//!
//! Tables come from the file on disk, read with `read` (no mapping: a file
//! truncated under us gives an error, not `SIGBUS`): `.symtab` is not in
//! memory at all, and the file's sections say exactly where `.eh_frame` and
//! `.gcc_except_table` end. The main program is read through
//! `/proc/self/exe`, which names the executed inode even if the path now
//! holds another file. For a library the path may have been replaced since
//! it was loaded (a package upgrade renames a new file over it), so a file
//! is used only if it matches the loaded image:
//!
//! - its executable `PT_LOAD` segments are those the loader mapped, and
//! - its build-id equals the one read from the loaded image's `PT_NOTE`
//!   (non-faulting, [`super::peek`]), or, if the module has none, its
//!   `.eh_frame_hdr` — which lists every FDE's start — equals the loaded
//!   image's bytes at that address.
//!
//! A library that fails the check is retried through
//! `/proc/self/map_files/<range>`, the mapped inode itself (needs
//! `CAP_SYS_ADMIN` on most kernels); failing that it gets no table, and
//! lookups in it answer `None`: refusing is safe, wrong bounds are not. The
//! vDSO has no file: its mapping *is* the image, copied out with
//! [`super::peek::read_memory`].
//!
//! Everything here is normal context and reads module memory only through
//! [`super::peek`].

use std::ops::ControlFlow;
use std::sync::Arc;

use object::read::elf::NoteIterator;

use super::elf::{read_elf, ElfImage};
use super::extents::FunctionTable;
use super::maps;
use super::peek;

/// What kind of object a module is: where its table comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The main program: `/proc/self/exe`.
    Main,
    /// The vDSO: its own mapping.
    Vdso,
    /// A shared object: its path, checked against the image.
    Shared,
}

/// What the loader says about a module, as far as finding its file needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Image<'a> {
    pub kind: Kind,
    /// The loader's name for it (see [`super::modules::Module::path`]).
    pub path: &'a str,
    pub bias: usize,
    /// The executable segments as mapped, link-time `(p_vaddr, p_memsz)`.
    pub exec_link: &'a [(u64, u64)],
    /// The build-id read from the loaded image.
    pub build_id: Option<&'a [u8]>,
}

/// The GNU build-id in the loaded `PT_NOTE` segment at link-time `vaddr`
/// (`memsz` bytes, aligned to `align`) of the module at `bias`, read
/// without faulting.
pub(crate) fn build_id_in_memory(
    bias: usize,
    vaddr: u64,
    memsz: u64,
    align: u64,
) -> Option<Vec<u8>> {
    const MAX_NOTES: u64 = 64 << 10;
    if memsz == 0 || memsz > MAX_NOTES {
        return None;
    }
    let mut buf = vec![0; memsz as usize];
    peek::read_memory(bias.wrapping_add(vaddr as usize), &mut buf).ok()?;
    let mut notes = NoteIterator::<object::elf::FileHeader64<object::Endianness>>::new(
        object::Endianness::Little,
        align.max(4),
        &buf,
    )
    .ok()?;
    while let Ok(Some(note)) = notes.next() {
        if note.name() == object::elf::ELF_NOTE_GNU
            && note.n_type(object::Endianness::Little) == object::elf::NT_GNU_BUILD_ID
        {
            return Some(note.desc().to_vec());
        }
    }
    None
}

/// Builds the table of the module `m` from its file (the vDSO: from its
/// mapping); `None` if no file matching the image could be read.
pub(crate) fn load_table(m: &Image<'_>) -> Option<Arc<FunctionTable>> {
    let image = match m.kind {
        Kind::Vdso => read_vdso(m)?,
        Kind::Main => read_file(m, "/proc/self/exe")?,
        Kind::Shared => match read_file(m, m.path) {
            Some(img) => img,
            None => read_file(m, &map_files_path(m)?)?,
        },
    };
    let table = FunctionTable::build(image.base, &image.exec(), &image.fdes, image.symbols)
        .ok()?
        .with_code_pointers(image.code_pointers.as_deref());
    Some(Arc::new(table))
}

/// Reads the file at `path` and checks it is `m`'s image.
fn read_file(m: &Image<'_>, path: &str) -> Option<ElfImage> {
    #[cfg(test)]
    tests::count_parse(m.path);
    let file = std::fs::File::open(path).ok()?;
    let cache = object::ReadCache::new(file);
    let image = read_elf(&cache).ok()?;
    matches_image(m, &image).then_some(image)
}

/// Whether the file read as `image` is what the loader mapped for `m`.
fn matches_image(m: &Image<'_>, image: &ElfImage) -> bool {
    let mut exec: Vec<(u64, u64)> = image
        .loads
        .iter()
        .filter(|l| l.exec)
        .map(|l| (l.vaddr, l.memsz))
        .collect();
    let mut loaded = m.exec_link.to_vec();
    exec.sort_unstable();
    loaded.sort_unstable();
    if exec != loaded {
        return false;
    }
    // `/proc/self/exe` is the executed inode; the vDSO image is the mapping.
    if m.kind != Kind::Shared {
        return true;
    }
    if image.build_id.as_deref() != m.build_id {
        return false;
    }
    if m.build_id.is_some() {
        return true;
    }
    // No build-id: the FDE search table must be byte-identical.
    let Some((addr, bytes)) = &image.eh_frame_hdr else {
        return image.fdes.is_empty();
    };
    let mut mem = vec![0; bytes.len()];
    peek::read_memory(m.bias.wrapping_add(*addr as usize), &mut mem).is_ok() && mem == *bytes
}

/// `/proc/self/map_files/<start>-<end>` of the mapping holding `m`'s first
/// executable segment: the mapped inode, whatever its path holds now.
fn map_files_path(m: &Image<'_>) -> Option<String> {
    let start = m
        .bias
        .wrapping_add(m.exec_link.iter().map(|&(v, _)| v).min()? as usize);
    let mut found = None;
    let _ = maps::for_each_mapping(|map| {
        if map.start <= start && start < map.end {
            found = Some(format!(
                "/proc/self/map_files/{:x}-{:x}",
                map.start, map.end
            ));
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    found
}

/// Copies the vDSO's mapping out and reads it as a file.
fn read_vdso(m: &Image<'_>) -> Option<ElfImage> {
    let start = m
        .bias
        .wrapping_add(m.exec_link.iter().map(|&(v, _)| v).min()? as usize);
    let mut range = None;
    let _ = maps::for_each_mapping(|map| {
        if map.start <= start && start < map.end {
            range = Some((map.start, map.end));
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    let (s, e) = range?;
    if e - s > 1 << 20 {
        return None;
    }
    let mut bytes = vec![0; e - s];
    peek::read_memory(s, &mut bytes).ok()?;
    let image = read_elf(&bytes[..]).ok()?;
    matches_image(m, &image).then_some(image)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// How many times each module path was read ([`super::read_file`]).
    static PARSES: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);

    pub(crate) fn count_parse(path: &str) {
        let mut p = PARSES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *p.get_or_insert_with(HashMap::new)
            .entry(path.to_string())
            .or_default() += 1;
    }

    /// How many times the module at `path` was read.
    pub(crate) fn parses(path: &str) -> usize {
        let p = PARSES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        p.as_ref().and_then(|m| m.get(path).copied()).unwrap_or(0)
    }
}
