//! Quarantine: a dirty block whose cached copy was found damaged holds
//! only itself.
//!
//! Its reads fail with `IoError::Corrupt`, and so does a write covering
//! only part of it, until a whole-block rewrite replaces it. Writeback skips
//! it and goes on with the rest of its log, so the ring keeps turning. The
//! superblock record lists quarantined blocks (up to
//! [`MAX_QUARANTINE`](crate::format::MAX_QUARANTINE)): the record that moves
//! the writeback frontier past the damaged copy's log lists the block, so a
//! restart finds the quarantine there once the copy is no longer replayed,
//! and a copy of the block in a log replayed after the record ends it. A
//! rewrite stays listed until its log is durable, so a crash that loses it
//! brings the quarantine back, never the backing device's older data. Past
//! the list's capacity, writeback stops before the damaged copies' logs, as
//! it must to keep them replayable.

use super::Engine;
use crate::io::BufAlloc;

impl<A: BufAlloc> Engine<A> {
    /// Blocks quarantined now, ascending.
    pub fn quarantined_blocks(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.scrub.quarantined().collect();
        v.sort_unstable();
        v
    }

    /// Ends `block`'s quarantine on the operator's word: its damaged copy
    /// is forgotten and reads return the backing device's contents, which
    /// may be older than what was acknowledged. False if it was not
    /// quarantined. Recorded with the next superblock record; a crash
    /// before that, while the damaged copy is still replayed, finds it again.
    pub fn drop_quarantine(&mut self, block: u64, now: crate::io::Nanos) -> bool {
        self.enter(now);
        if !self.scrub.drop_quarantine(block) {
            return false;
        }
        // The damaged copy must never reach the backing device.
        self.drop_entry(block);
        self.records.want();
        self.pump();
        true
    }

    /// Every dirty block left is quarantined (`drop_caches` is then done:
    /// what is left cannot be written back).
    pub(super) fn only_quarantine_dirty(&self) -> bool {
        let quarantined_dirty = self
            .scrub
            .quarantined()
            .filter(|&b| self.entry(b).is_some_and(|e| e.dirty != 0))
            .count() as u64;
        self.index.nr_dirty() == quarantined_dirty
            && self.open.as_ref().is_none_or(|o| !o.has_dirty)
    }
}
