//! Landing pads from a GCC-format LSDA (`.gcc_except_table`).
//!
//! An FDE whose CIE has a personality routine may point at a
//! *language-specific data area*. GCC and clang (C++, C with
//! `-fexceptions`) and rustc all emit the format that `__gxx_personality_v0`,
//! `__gcc_personality_v0` and `rust_eh_personality` read:
//!
//! ```text
//! u8        LPStart encoding      (DW_EH_PE_omit: LPStart = the FDE's start)
//! [enc]     LPStart
//! u8        TType encoding
//! [uleb128] TType offset          (only if the encoding is not omit)
//! u8        call-site encoding
//! uleb128   call-site table length
//! records:  start [enc], length [enc], landing pad [enc], action uleb128
//! ```
//!
//! A landing pad is `LPStart + pad` for every record whose `pad` is non-zero
//! (zero means "no cleanup, keep unwinding"). The unwinder transfers control
//! there from outside the function's straight-line flow, which is why a
//! later analysis needs them. The action and type tables say *which*
//! exceptions are caught, not *where* control lands, so they are skipped.
//!
//! Pure parsing of a byte slice: anything malformed or in an encoding we do
//! not read (indirect, data- or text-relative) is an [`LsdaError`], never a
//! guess, so a caller can treat the function as "landing pads unknown".

/// `DW_EH_PE_omit`: the field is absent.
const DW_EH_PE_OMIT: u8 = 0xff;
/// Application bits of a pointer encoding: absolute.
const DW_EH_PE_ABSPTR: u8 = 0x00;
/// Application bits: relative to the address of the encoded field.
const DW_EH_PE_PCREL: u8 = 0x10;

/// Why an LSDA could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LsdaError {
    /// The data ends inside a field or record.
    Truncated,
    /// A value format or application this reader does not handle.
    Encoding(u8),
    /// An address computation left the 64-bit address space.
    Overflow,
}

/// A little cursor over the LSDA bytes, remembering the link-time address of
/// its first byte for `DW_EH_PE_pcrel`.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    addr: u64,
}

impl Cursor<'_> {
    fn u8(&mut self) -> Result<u8, LsdaError> {
        let b = *self.bytes.get(self.pos).ok_or(LsdaError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], LsdaError> {
        let end = self.pos.checked_add(N).ok_or(LsdaError::Truncated)?;
        let b = self.bytes.get(self.pos..end).ok_or(LsdaError::Truncated)?;
        self.pos = end;
        b.try_into().map_err(|_| LsdaError::Truncated)
    }

    fn uleb128(&mut self) -> Result<u64, LsdaError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(LsdaError::Overflow)
    }

    fn sleb128(&mut self) -> Result<i64, LsdaError> {
        let mut value = 0i64;
        let mut shift = 0;
        loop {
            let b = self.u8()?;
            if shift >= 64 {
                return Err(LsdaError::Overflow);
            }
            value |= i64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                if shift < 64 && b & 0x40 != 0 {
                    value |= -1i64 << shift;
                }
                return Ok(value);
            }
        }
    }

    /// Reads a value in pointer encoding `enc` (not omit).
    fn encoded(&mut self, enc: u8) -> Result<u64, LsdaError> {
        let field_addr = self.addr.wrapping_add(self.pos as u64);
        let raw = match enc & 0x0f {
            0x00 => u64::from_le_bytes(self.fixed()?),
            0x01 => self.uleb128()?,
            0x02 => u64::from(u16::from_le_bytes(self.fixed()?)),
            0x03 => u64::from(u32::from_le_bytes(self.fixed()?)),
            0x04 => u64::from_le_bytes(self.fixed()?),
            0x09 => self.sleb128()? as u64,
            0x0a => i64::from(i16::from_le_bytes(self.fixed()?)) as u64,
            0x0b => i64::from(i32::from_le_bytes(self.fixed()?)) as u64,
            0x0c => u64::from_le_bytes(self.fixed()?),
            _ => return Err(LsdaError::Encoding(enc)),
        };
        match enc & 0xf0 {
            DW_EH_PE_ABSPTR => Ok(raw),
            DW_EH_PE_PCREL => Ok(field_addr.wrapping_add(raw)),
            _ => Err(LsdaError::Encoding(enc)),
        }
    }
}

/// The landing pads (link-time addresses, sorted, deduplicated) of the LSDA
/// whose bytes start at `bytes[0]`, at link-time address `lsda_addr`, for
/// the FDE starting at `func_start`. `bytes` may run past the LSDA's end.
pub(crate) fn landing_pads(
    bytes: &[u8],
    lsda_addr: u64,
    func_start: u64,
) -> Result<Vec<u64>, LsdaError> {
    let mut c = Cursor {
        bytes,
        pos: 0,
        addr: lsda_addr,
    };
    let lpstart_enc = c.u8()?;
    let lpstart = if lpstart_enc == DW_EH_PE_OMIT {
        func_start
    } else {
        c.encoded(lpstart_enc)?
    };
    let ttype_enc = c.u8()?;
    if ttype_enc != DW_EH_PE_OMIT {
        c.uleb128()?;
    }
    let cs_enc = c.u8()?;
    let cs_len = usize::try_from(c.uleb128()?).map_err(|_| LsdaError::Overflow)?;
    let end = c.pos.checked_add(cs_len).ok_or(LsdaError::Overflow)?;
    if end > bytes.len() {
        return Err(LsdaError::Truncated);
    }
    let mut pads = Vec::new();
    while c.pos < end {
        let _start = c.encoded(cs_enc)?;
        let _len = c.encoded(cs_enc)?;
        let pad = c.encoded(cs_enc)?;
        let _action = c.uleb128()?;
        if pad != 0 {
            pads.push(lpstart.checked_add(pad).ok_or(LsdaError::Overflow)?);
        }
    }
    if c.pos != end {
        return Err(LsdaError::Truncated);
    }
    pads.sort_unstable();
    pads.dedup();
    Ok(pads)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header with omitted LPStart and TType, uleb128 call sites.
    fn lsda(records: &[(u8, u8, u8, u8)]) -> Vec<u8> {
        let mut v = vec![0xff, 0xff, 0x01, (records.len() * 4) as u8];
        for &(s, l, p, a) in records {
            v.extend_from_slice(&[s, l, p, a]);
        }
        v
    }

    #[test]
    fn pads_are_lpstart_plus_offset_and_zero_means_none() {
        let b = lsda(&[
            (0x04, 0x05, 0x30, 0x00),
            (0x10, 0x05, 0x00, 0x00),
            (0x20, 0x05, 0x30, 0x01),
        ]);
        assert_eq!(landing_pads(&b, 0x9000, 0x1000), Ok(vec![0x1030]));
    }

    #[test]
    fn udata4_call_sites_with_ttype_and_explicit_lpstart() {
        // LPStart udata4 = 0x2000, TType udata4 with offset 0x10,
        // call sites udata4.
        let mut b = vec![0x03, 0x00, 0x20, 0x00, 0x00, 0x9b, 0x10, 0x03, 26];
        for (s, l, p) in [(0u32, 8u32, 0x40u32), (8, 8, 0x48)] {
            b.extend_from_slice(&s.to_le_bytes());
            b.extend_from_slice(&l.to_le_bytes());
            b.extend_from_slice(&p.to_le_bytes());
            b.push(0);
        }
        // The call-site length says 26 bytes: exactly two records.
        assert_eq!(landing_pads(&b, 0, 0x1000), Ok(vec![0x2040, 0x2048]));
        // Trailing bytes (the action table) are not call sites.
        b.extend_from_slice(&[1, 0, 0x7d, 0]);
        assert_eq!(landing_pads(&b, 0, 0x1000), Ok(vec![0x2040, 0x2048]));
    }

    #[test]
    fn pcrel_lpstart_is_relative_to_the_field() {
        // LPStart pcrel|sdata4 = -0x10 from the field at lsda + 1.
        let mut b = vec![0x1b];
        b.extend_from_slice(&(-0x10i32).to_le_bytes());
        b.extend_from_slice(&[0xff, 0x01, 4, 0, 4, 8, 0]);
        assert_eq!(landing_pads(&b, 0x5000, 0), Ok(vec![0x5000 + 1 - 0x10 + 8]));
    }

    #[test]
    fn malformed_data_is_an_error_not_a_guess() {
        assert_eq!(landing_pads(&[], 0, 0), Err(LsdaError::Truncated));
        // Call-site table longer than the data.
        assert_eq!(
            landing_pads(&[0xff, 0xff, 0x01, 8, 0, 1], 0, 0),
            Err(LsdaError::Truncated)
        );
        // A record cut by the table's end.
        assert_eq!(
            landing_pads(&[0xff, 0xff, 0x01, 3, 0, 1, 2, 0], 0, 0),
            Err(LsdaError::Truncated)
        );
        // Data-relative call sites are not read.
        assert_eq!(landing_pads(&[0xff, 0xff, 0x33, 0], 0, 0), Ok(vec![]));
        assert_eq!(
            landing_pads(&[0xff, 0xff, 0x33, 4, 0, 0, 0, 0], 0, 0),
            Err(LsdaError::Encoding(0x33))
        );
        // An indirect LPStart is not chased.
        assert_eq!(
            landing_pads(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0], 0, 0),
            Err(LsdaError::Encoding(0x80))
        );
    }
}
