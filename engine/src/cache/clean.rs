//! In-cache cleaning: when the ring needs positions and the oldest logs hold
//! few live dirty blocks, those blocks are copied forward into the open
//! buffer (a fill from their old slot) instead of being written back to the
//! backing device. The position then frees at cache speed: writeback's
//! frontier passes a log once nothing in it is live and dirty, and only once
//! the copies made of it are durable (see `superseded_by_volatile`), so a
//! crash at any point replays either the old copy or the newer one.
//!
//! Cost decides: a log is cleaned only while its live dirty share is at most
//! `clean_max_live_pct` (copying a fuller log costs more cache writes than it
//! frees), and a block copied `max_relocations` times is cold and goes home
//! to the backing device with ordinary writeback.

use super::{Engine, Phase};
use crate::ids::LogId;
use crate::io::BufAlloc;

/// The cleaner's own state: where it is in the ring, and how often each
/// cached copy was moved.
#[derive(Debug, Default)]
pub(super) struct Cleaner {
    /// Logs below this were cleaned as far as they can be.
    cursor: LogId,
    /// Per cache slot: how many times the copy in it was copied forward.
    moves: Vec<u8>,
}

impl Cleaner {
    /// Sized for `slots` cache slots, none moved.
    pub(super) fn install(&mut self, slots: usize) {
        self.moves = vec![0; slots];
    }

    /// A new log takes the position of slots `first..first + n`: none moved.
    pub(super) fn reset(&mut self, first: u32, n: u32) {
        let end = (first as usize + n as usize).min(self.moves.len());
        if let Some(m) = self.moves.get_mut(first as usize..end) {
            m.fill(0);
        }
    }

    fn moved(&self, slot: u32) -> u8 {
        self.moves.get(slot as usize).copied().unwrap_or(u8::MAX)
    }

    fn set_moved(&mut self, slot: u32, n: u8) {
        if let Some(m) = self.moves.get_mut(slot as usize) {
            *m = n;
        }
    }
}

impl<A: BufAlloc> Engine<A> {
    /// Whether the ring is close enough to full that positions must be
    /// freed now (by cleaning or writeback) rather than in the background.
    pub(super) fn ring_pressure(&self) -> bool {
        self.ring.in_use() + self.ring_reserve() >= self.geo.nr_segments
    }

    /// Free positions below which the ring is under pressure.
    fn ring_reserve(&self) -> u64 {
        (self.params.nr_buffers as u64).max(self.geo.nr_segments / 16)
    }

    /// Whether the cleaner should work: it starts a reserve before the ring
    /// is under pressure, so the positions it frees are there by the time
    /// writes need them and it rarely finds the ring without room to copy
    /// into (then writeback would have to free the log at the backing
    /// device's speed).
    fn clean_pressure(&self) -> bool {
        self.ring.in_use() + 2 * self.ring_reserve() >= self.geo.nr_segments
    }

    /// How many logs past the writeback frontier the cleaner works ahead:
    /// as many as buffers can be in flight. Further ahead it would copy
    /// blocks that a later write would still have made dead (a wider
    /// window measured a higher write amplification and more stalls in
    /// `wb-bench pressure`).
    fn clean_window(&self) -> u64 {
        (self.params.nr_buffers as u64).max(2)
    }

    /// Cleaning is allowed at all (it runs only under pressure): it is on,
    /// and writeback has been measured to cost at least
    /// `clean_min_writeback_us` per block. Until a batch has been measured
    /// writeback frees the ring, which measures it.
    pub(super) fn cleaning_enabled(&self) -> bool {
        self.tunables.clean_max_live_pct > 0
            && !self.writeback.drop_caches_active()
            && self.writeback_slow()
    }

    /// Writeback has been measured to cost at least
    /// `clean_min_writeback_us` per block (or that is 0).
    pub(super) fn writeback_slow(&self) -> bool {
        let min_ns = self.tunables.clean_min_writeback_us as u64 * 1000;
        min_ns == 0
            || self
                .writeback
                .ns_per_block(self.tunables.writeback_max_inflight)
                .is_some_and(|ns| ns >= min_ns)
    }

    pub(super) fn cleaning_on(&self) -> bool {
        self.cleaning_enabled()
            && self.phase == Phase::Running
            && !self.read_only
            && self.clean_pressure()
    }

    /// Whether log `id`'s live dirty share is small enough to copy forward.
    pub(super) fn cheap_to_clean(&self, id: LogId) -> bool {
        let seg = self.ring.seg(id);
        seg.id == id
            && seg.live_dirty > 0
            && seg.live_dirty as u64 * 100
                <= self.tunables.clean_max_live_pct as u64 * self.geo.data_blocks as u64
    }

    /// Whether the cleaner will free log `id`'s position, so writeback
    /// should leave it alone: it is under pressure, will have room to copy
    /// into, and the log is in its window, cheap, and not in a writeback
    /// batch already.
    pub(super) fn cleaner_claims(&self, id: LogId) -> bool {
        self.cleaning_on()
            && id >= self.cleaner.cursor
            && self.writeback.batch_last().is_none_or(|last| id > last)
            && id.get() <= self.ring.last_wb().get() + self.clean_window()
            && self.cheap_to_clean(id)
            && self.room_coming()
    }

    /// Whether the open buffer has room, or will without writeback: the
    /// next position is free, or written back and waiting only for its
    /// record (buffers come back as log writes end). Otherwise the next
    /// position is the frontier's own log or one behind it, which cannot
    /// free before the frontier does: writeback must take the log, so the
    /// ring never waits on a cleaner that cannot move.
    fn room_coming(&self) -> bool {
        self.can_take_block()
            || self
                .ring
                .next_occupant()
                .is_none_or(|occ| occ <= self.ring.last_wb())
    }

    /// Copies live dirty blocks of the oldest cheap logs forward while the
    /// ring is under pressure and the open buffer has room.
    pub(super) fn maybe_clean(&mut self) {
        if !self.cleaning_on() {
            return;
        }
        let mut id = self.cleaner.cursor.max(self.ring.last_wb().next()).max(
            self.writeback
                .batch_last()
                .map_or(LogId::NONE, |l| l.next()),
        );
        let mut end = self
            .durability
            .frontier()
            .min(LogId(self.ring.last_wb().get() + self.clean_window()));
        // Only data the scrub has checked is copied (a copy gets a fresh CRC).
        if let Some(first) = self.scrub.first_unusable(self.ring.last_wb()) {
            end = end.min(first.prev());
        }
        while id <= end {
            if self.cheap_to_clean(id) && !self.clean_log(id) {
                // No room: the rest waits for the open buffer to be sealed.
                break;
            }
            id = id.next();
        }
        self.cleaner.cursor = id;
    }

    /// Copies forward every live dirty block of log `id` that is not cold.
    /// Returns false if it ran out of room before the end.
    fn clean_log(&mut self, id: LogId) -> bool {
        let max = self.tunables.max_relocations.min(u8::MAX as u32) as u8;
        let nr_slots = self.ring.seg(id).nr_slots;
        for slot in 0..nr_slots {
            let Some((block, e)) = self.current_at(id, slot) else {
                continue;
            };
            let from = self.cache_slot(id, slot).0;
            let moved = self.cleaner.moved(from);
            if e.dirty == 0 || self.scrub.is_corrupt(block) || moved >= max {
                continue;
            }
            if !self.can_take_block() {
                return false;
            }
            if self.relocate_block(block).is_none() {
                return false;
            }
            let Some(new) = self.entry(block) else {
                continue;
            };
            let to = self.cache_slot(new.id, new.slot).0;
            self.cleaner.set_moved(to, moved + 1);
            if let Some(o) = self.open.as_mut().filter(|o| o.id == new.id) {
                o.relocated += 1;
            }
            self.stats.relocated_blocks += 1;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_reset_per_position_and_ignore_slots_out_of_range() {
        let mut c = Cleaner::default();
        c.install(8);
        c.set_moved(5, 3);
        assert_eq!(c.moved(5), 3);
        c.reset(4, 4);
        assert_eq!(c.moved(5), 0);
        c.set_moved(99, 1);
        assert_eq!(c.moved(99), u8::MAX);
        c.reset(6, 10);
        assert_eq!(c.moved(7), 0);
    }
}
