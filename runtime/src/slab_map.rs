//! An address-ordered map whose values live in a slab.
//!
//! The writer keeps one [`crate::site::Site`] per probe and asks both for
//! one address and for the sites near an address (a range). A `BTreeMap`
//! holding the sites themselves answers both, but stores them in its nodes:
//! probes attached in address order (the usual batch) leave every node half
//! full, so each site costs about twice its size, and every search walks
//! nodes of ~1.5 KB. Here the tree maps an address to a slot index (12 bytes
//! an entry, small nodes that stay in cache) and the values sit densely in
//! a `Vec`, their slots reused through a free list and compacted after a
//! large removal.

use std::collections::BTreeMap;
use std::ops::RangeBounds;

/// Free slots at which a remove may compact the slab (below that, the
/// slots are kept for reuse).
const COMPACT_AT: usize = 64;

/// Address → value, ordered by address. Writer only.
#[derive(Debug)]
pub(crate) struct SlabMap<V> {
    order: BTreeMap<usize, u32>,
    slots: Vec<Option<V>>,
    free: Vec<u32>,
}

impl<V> Default for SlabMap<V> {
    fn default() -> Self {
        SlabMap {
            order: BTreeMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<V> SlabMap<V> {
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }

    pub(crate) fn contains_key(&self, key: &usize) -> bool {
        self.order.contains_key(key)
    }

    pub(crate) fn get(&self, key: &usize) -> Option<&V> {
        let &i = self.order.get(key)?;
        self.slots[i as usize].as_ref()
    }

    pub(crate) fn get_mut(&mut self, key: &usize) -> Option<&mut V> {
        let &i = self.order.get(key)?;
        self.slots[i as usize].as_mut()
    }

    /// Inserts or replaces; returns the value replaced.
    pub(crate) fn insert(&mut self, key: usize, value: V) -> Option<V> {
        if let Some(&i) = self.order.get(&key) {
            return self.slots[i as usize].replace(value);
        }
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(value);
                i
            }
            None => {
                // At most `u32::MAX` values: far beyond the probe arena's
                // capacity, which bounds the sites.
                self.slots.push(Some(value));
                (self.slots.len() - 1) as u32
            }
        };
        self.order.insert(key, i);
        None
    }

    pub(crate) fn remove(&mut self, key: &usize) -> Option<V> {
        let i = self.order.remove(key)?;
        let v = self.slots[i as usize].take();
        self.free.push(i);
        if self.free.len() >= COMPACT_AT && self.free.len() * 4 > self.slots.len() * 3 {
            self.compact();
        }
        v
    }

    /// Moves the values into as many slots as there are values, in address
    /// order, once three slots in four are free: memory goes back after a
    /// large detach (amortised: three removes or more came before each
    /// value moved), and a detach of everything moves a third of the values
    /// in all.
    fn compact(&mut self) {
        let mut slots = Vec::with_capacity(self.order.len());
        for i in self.order.values_mut() {
            slots.push(self.slots[*i as usize].take());
            *i = (slots.len() - 1) as u32;
        }
        self.slots = slots;
        self.free = Vec::new();
    }

    /// The entries with keys in `range`, in address order.
    pub(crate) fn range(
        &self,
        range: impl RangeBounds<usize>,
    ) -> impl DoubleEndedIterator<Item = (&usize, &V)> + '_ {
        self.order
            .range(range)
            .filter_map(|(k, &i)| Some((k, self.slots[i as usize].as_ref()?)))
    }

    /// Every entry, in address order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&usize, &V)> + '_ {
        self.range(..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_an_ordered_map_and_reuses_slots() {
        let mut m = SlabMap::default();
        let mut model = BTreeMap::new();
        // A deterministic mix of inserts, replaces and removes.
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = (x % 512) as usize;
            if x % 3 == 0 {
                assert_eq!(m.remove(&key), model.remove(&key));
            } else {
                assert_eq!(m.insert(key, x), model.insert(key, x));
            }
            assert_eq!(m.len(), model.len());
            assert_eq!(m.get(&key), model.get(&key));
        }
        let lo = 100;
        let got: Vec<_> = m.range(lo..300).map(|(&k, &v)| (k, v)).collect();
        let want: Vec<_> = model.range(lo..300).map(|(&k, &v)| (k, v)).collect();
        assert_eq!(got, want);
        let back: Vec<_> = m.range(..=lo).rev().map(|(&k, _)| k).collect();
        let want: Vec<_> = model.range(..=lo).rev().map(|(&k, _)| k).collect();
        assert_eq!(back, want);
        assert!(m.slots.len() <= 512, "slots are reused");
        if let Some(v) = m.get_mut(&got[0].0) {
            *v = 7;
        }
        assert_eq!(m.get(&got[0].0), Some(&7));
        let keys: Vec<usize> = m.iter().map(|(&k, _)| k).collect();
        for k in keys {
            m.remove(&k);
        }
        assert_eq!(m.len(), 0);
        assert!(m.slots.len() < COMPACT_AT, "memory given back");
    }

    #[test]
    fn a_large_remove_gives_the_slots_back_and_keeps_the_values() {
        let mut m = SlabMap::default();
        for k in 0..10_000usize {
            m.insert(k * 8, k);
        }
        // Keep every tenth.
        for k in (0..10_000usize).filter(|k| k % 10 != 0) {
            assert_eq!(m.remove(&(k * 8)), Some(k));
        }
        assert_eq!(m.len(), 1_000);
        assert!(
            m.slots.len() < 4 * 1_000 + COMPACT_AT,
            "{} slots",
            m.slots.len()
        );
        let got: Vec<(usize, usize)> = m.iter().map(|(&k, &v)| (k, v)).collect();
        let want: Vec<(usize, usize)> = (0..10_000).step_by(10).map(|k| (k * 8, k)).collect();
        assert_eq!(got, want);
        for k in (0..10_000usize).step_by(10) {
            assert_eq!(m.get(&(k * 8)), Some(&k));
        }
    }
}
