//! Function bounds from call-frame information (`.eh_frame`).
//!
//! Every function a C, C++ or Rust compiler emits for x86_64 Linux gets a
//! frame description entry (FDE) in `.eh_frame` — stripping removes
//! `.symtab`, never `.eh_frame`, because unwinding needs it — and each FDE
//! states the exact `[initial_location, initial_location + address_range)`
//! of the code it describes. Split functions get one FDE per part (`foo` and
//! `foo.cold`), which is what a probe wants: each part is entered and left
//! on its own. The FDE may also point at the function's LSDA (its exception
//! table, see [`super::lsda`]).
//!
//! [`fdes`] walks the section entry by entry with `gimli` (each CIE parsed
//! once and cached by offset) rather than through `.eh_frame_hdr`'s search
//! table: the walk also sees FDEs a linker left out of the table, and gives
//! the lengths the table does not hold. An LSDA pointer whose encoded value
//! is 0 means "none", as libgcc reads it. An entry that does not parse is
//! counted and skipped; a broken length field ends the walk (nothing after
//! it can be found) and is counted too.

use std::collections::HashMap;

use gimli::{BaseAddresses, CieOrFde, EhFrame, LittleEndian, UnwindSection};

/// One FDE, in link-time addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fde {
    /// `initial_location`.
    pub start: u64,
    /// `address_range`, in bytes.
    pub len: u64,
    /// Where the LSDA is, if the FDE names one.
    pub lsda: FdeLsda,
}

/// What an FDE says about its LSDA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FdeLsda {
    /// No LSDA: no landing pads.
    None,
    /// The LSDA's link-time address.
    At(u64),
    /// An indirect pointer (`DW_EH_PE_indirect`) to the LSDA, which would
    /// need relocated data to follow: the landing pads are unknown.
    Indirect,
}

/// The FDEs of an `.eh_frame` section, and how many entries were skipped.
#[derive(Debug, Default)]
pub(crate) struct Frames {
    pub fdes: Vec<Fde>,
    /// Entries that did not parse (an unknown augmentation, a CIE offset
    /// pointing nowhere, a truncated walk).
    pub skipped: usize,
}

/// Addresses `.eh_frame` pointers may be relative to (`DW_EH_PE_pcrel`,
/// `textrel`, `datarel`), link-time.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SectionAddrs {
    pub eh_frame: u64,
    pub text: Option<u64>,
    pub got: Option<u64>,
}

/// The FDEs of `data`, an x86_64 `.eh_frame` section (little-endian, 8-byte
/// addresses) at the link-time addresses `addrs`.
pub(crate) fn fdes(data: &[u8], addrs: SectionAddrs) -> Frames {
    let mut section = EhFrame::new(data, LittleEndian);
    section.set_address_size(8);
    let mut bases = BaseAddresses::default().set_eh_frame(addrs.eh_frame);
    if let Some(t) = addrs.text {
        bases = bases.set_text(t);
    }
    if let Some(g) = addrs.got {
        bases = bases.set_got(g);
    }
    let eh_frame = addrs.eh_frame..addrs.eh_frame.saturating_add(data.len() as u64);
    let mut frames = Frames::default();
    let mut cies = HashMap::new();
    let mut entries = section.entries(&bases);
    loop {
        let partial = match entries.next() {
            Ok(None) => break,
            Ok(Some(CieOrFde::Cie(_))) => continue,
            Ok(Some(CieOrFde::Fde(partial))) => partial,
            Err(_) => {
                // The walk cannot resynchronise after a bad entry.
                frames.skipped += 1;
                break;
            }
        };
        let fde = partial.parse(|section, bases, offset| {
            cies.entry(offset)
                .or_insert_with(|| section.cie_from_offset(bases, offset))
                .clone()
        });
        let Ok(fde) = fde else {
            frames.skipped += 1;
            continue;
        };
        let lsda = match fde.lsda() {
            None => FdeLsda::None,
            // libgcc reads an encoded value of 0 as "no LSDA" whatever the
            // encoding; gimli has already added the base, so a pcrel 0 is
            // the address of the field itself, inside this section.
            Some(gimli::Pointer::Direct(a)) if a == 0 || eh_frame.contains(&a) => FdeLsda::None,
            Some(gimli::Pointer::Direct(a)) => FdeLsda::At(a),
            Some(gimli::Pointer::Indirect(_)) => FdeLsda::Indirect,
        };
        frames.fdes.push(Fde {
            start: fde.initial_address(),
            len: fde.len(),
            lsda,
        });
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CIE with augmentation "zLR" (LSDA and FDE pointers pcrel|sdata4)
    /// followed by `fdes`, each `(start, len, lsda)` as absolute addresses,
    /// then the zero terminator; the section is at address `at`.
    fn section(at: u64, fdes: &[(u64, u32, Option<u64>)]) -> Vec<u8> {
        let mut v = Vec::new();
        // CIE: length, id 0, version 1, "zLR\0", code align 1, data align
        // -8, return register 16, augmentation length 2, L=0x1b, R=0x1b,
        // then padding to a multiple of 4.
        let body = [
            0, 0, 0, 0, 1, b'z', b'L', b'R', 0, 1, 0x78, 16, 2, 0x1b, 0x1b, 0, 0, 0, 0, 0,
        ];
        v.extend_from_slice(&(body.len() as u32).to_le_bytes());
        v.extend_from_slice(&body);
        for &(start, len, lsda) in fdes {
            let fde_at = v.len();
            let mut b = Vec::new();
            // CIE pointer: from this field back to the CIE at offset 0.
            b.extend_from_slice(&((fde_at + 4) as u32).to_le_bytes());
            let pc_field = at + fde_at as u64 + 8;
            b.extend_from_slice(&(start.wrapping_sub(pc_field) as i32).to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
            b.push(4);
            let lsda_field = at + fde_at as u64 + 17;
            let rel = lsda.map_or(0, |l| l.wrapping_sub(lsda_field) as i32);
            b.extend_from_slice(&rel.to_le_bytes());
            while (b.len() + 4) % 8 != 0 {
                b.push(0);
            }
            v.extend_from_slice(&(b.len() as u32).to_le_bytes());
            v.extend_from_slice(&b);
        }
        v.extend_from_slice(&[0, 0, 0, 0]);
        v
    }

    #[test]
    fn fdes_give_bounds_and_lsda_pointers() {
        let at = 0x20_0000;
        let data = section(at, &[(0x1000, 0x40, None), (0x1040, 0x10, Some(0x30_0000))]);
        let f = fdes(
            &data,
            SectionAddrs {
                eh_frame: at,
                ..Default::default()
            },
        );
        assert_eq!(f.skipped, 0);
        // The first FDE's LSDA field holds 0: "none", as libgcc reads it.
        assert_eq!(f.fdes.len(), 2);
        assert_eq!(
            f.fdes[0],
            Fde {
                start: 0x1000,
                len: 0x40,
                lsda: FdeLsda::None
            }
        );
        assert_eq!(
            f.fdes[1],
            Fde {
                start: 0x1040,
                len: 0x10,
                lsda: FdeLsda::At(0x30_0000)
            }
        );
    }

    #[test]
    fn a_broken_entry_ends_the_walk_and_is_counted() {
        let at = 0x1000;
        let mut data = section(at, &[(0x10, 4, None)]);
        // Point the FDE's CIE pointer at garbage.
        let fde = 24;
        data[fde + 4..fde + 8].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
        let f = fdes(
            &data,
            SectionAddrs {
                eh_frame: at,
                ..Default::default()
            },
        );
        assert!(f.fdes.is_empty());
        assert_eq!(f.skipped, 1);
    }
}
