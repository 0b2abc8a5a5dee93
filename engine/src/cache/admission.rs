//! Admission: which writes the cache takes when room is short.
//!
//! A write whose blocks the cache holds dirty must go through the log (a
//! write around it would be undone by replaying the older copy). Any other
//! write may go straight to the backing device. When the ring is under
//! pressure and the next position can only be freed by writeback (the log
//! at the frontier is too full of live blocks to clean), room is kept for
//! the writes that need it: a write to blocks not cached goes around the
//! cache, unless one of its blocks was written around recently, which makes
//! it warm enough to be worth a slot. So a working set larger than the cache
//! costs what the backing device alone costs, while a hot set still moves
//! in, and its reads hit.

use super::Engine;
use crate::geometry::BLOCK_SIZE;
use crate::io::BufAlloc;

/// Blocks written around the cache lately, as a direct-mapped table of
/// fingerprints (a colliding block overwrites an older one: forgetting is
/// harmless, it only delays admission).
#[derive(Debug, Default)]
pub(super) struct Admission {
    ghosts: Vec<u32>,
}

impl Admission {
    /// Half an entry per cache slot (2 to 4 bytes of memory per slot):
    /// enough to remember the last half-cache of writes around it.
    pub(super) fn install(&mut self, cache_blocks: u64) {
        let n = (cache_blocks / 2).clamp(1024, 1 << 26).next_power_of_two();
        self.ghosts = vec![0; n as usize];
    }

    fn slot_and_print(&self, block: u64) -> Option<(usize, u32)> {
        if self.ghosts.is_empty() {
            return None;
        }
        let h = block.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let slot = (h >> 32) as usize & (self.ghosts.len() - 1);
        Some((slot, (h as u32) | 1))
    }

    /// Whether `block` was written around since its entry was last taken.
    pub(super) fn seen(&self, block: u64) -> bool {
        self.slot_and_print(block)
            .is_some_and(|(s, fp)| self.ghosts[s] == fp)
    }

    /// `block` was written around the cache.
    pub(super) fn remember(&mut self, block: u64) {
        if let Some((s, fp)) = self.slot_and_print(block) {
            self.ghosts[s] = fp;
        }
    }
}

impl<A: BufAlloc> Engine<A> {
    /// Whether the next ring position can only come from writeback: the
    /// ring is under pressure and the log at the frontier is not one the
    /// cleaner will free.
    pub(super) fn writeback_bound(&self) -> bool {
        if !self.ring_pressure() {
            return false;
        }
        let id = self.ring.last_wb().next();
        let seg = self.ring.seg(id);
        id < self.ring.next_id() && seg.id == id && seg.live_dirty > 0 && !self.cheap_to_clean(id)
    }

    /// A write to `[offset, offset+len)` that goes around the cache to keep
    /// room for writes that must use it: none of its blocks is cached (a
    /// cached clean copy may as well be refreshed in place) and none was
    /// written around lately.
    pub(super) fn cold_miss(&self, offset: u64, len: u64) -> bool {
        let (first, last) = (offset / BLOCK_SIZE, (offset + len - 1) / BLOCK_SIZE);
        (first..=last).all(|b| !self.index.contains(b) && !self.admission.seen(b))
    }

    /// Notes the blocks of a write that went around the cache.
    pub(super) fn remember_bypass(&mut self, offset: u64, len: u64) {
        let (first, last) = (offset / BLOCK_SIZE, (offset + len - 1) / BLOCK_SIZE);
        // (A long write is sequential, not a working set: its head is enough.)
        for b in first..=last.min(first + 7) {
            self.admission.remember(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_is_seen_once_remembered_and_forgotten_when_its_entry_is_taken() {
        let mut a = Admission::default();
        assert!(!a.seen(5), "an empty table sees nothing");
        a.install(1024);
        assert!(!a.seen(5));
        a.remember(5);
        assert!(a.seen(5));
        assert!(!a.seen(6));
        // Find a block sharing 5's entry: remembering it forgets 5.
        let (s5, _) = a.slot_and_print(5).unwrap();
        let other = (6..1_000_000u64)
            .find(|&b| a.slot_and_print(b).unwrap().0 == s5)
            .unwrap();
        a.remember(other);
        assert!(a.seen(other) && !a.seen(5));
    }
}
