//! A hasher for the writer's maps keyed by addresses and small integers:
//! one multiply per key instead of SipHash's rounds. The keys come from the
//! process itself (code addresses, record indices), not from an adversary,
//! so the DoS resistance SipHash buys is not needed here.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// Fibonacci hashing of the integer written (any other input is folded in
/// 8 bytes at a time).
#[derive(Default, Clone, Copy)]
pub(crate) struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(w));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(26) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
}

/// A `HashMap` with [`AddrHasher`].
pub(crate) type AddrMap<K, V> = HashMap<K, V, BuildHasherDefault<AddrHasher>>;
/// A `HashSet` with [`AddrHasher`].
pub(crate) type AddrSet<K> = HashSet<K, BuildHasherDefault<AddrHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbouring_addresses_spread_over_the_high_bits() {
        let h = |n: usize| {
            let mut s = AddrHasher::default();
            s.write_usize(n);
            s.finish() >> 57
        };
        let buckets: AddrSet<u64> = (0..64).map(|i| h(0x7f00_0000_1000 + i)).collect();
        assert!(buckets.len() > 32, "{} distinct top bits", buckets.len());
    }
}
