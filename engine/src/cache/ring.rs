//! The ring of log positions on the cache device: which log occupies each
//! position, the next log id, this incarnation's epoch, the writeback
//! frontier, and the reads that hold a position.
//!
//! Log `id` lives at position `(id - 1) % nr_segments`. A position is reused
//! only by the log `nr_segments` ids later, and only once everything before
//! that log was written back (the frontier passed it) and no read holds it.

use crate::geometry::Geometry;
use crate::ids::{Epoch, LogId};
use crate::io::{BufId, Nanos};

/// One ring position of the cache device.
#[derive(Debug, Default)]
pub(super) struct SegMeta {
    /// Log occupying this position (`NONE` = none).
    pub(super) id: LogId,
    /// Data slots the log holds (their blocks are in the index's words).
    pub(super) nr_slots: u32,
    /// RAM copy while the log is open or being written.
    pub(super) buf: Option<BufId>,
    /// Reads of this position in flight; it cannot be reused until they end.
    pub(super) readers: u32,
    /// Slots whose index entry is dirty and points here.
    pub(super) live_dirty: u32,
    /// Epoch the log was (or will be) written with.
    pub(super) epoch: Epoch,
    /// Blocks committed in the log's pmem slot (mode 1).
    pub(super) pool_committed: u32,
    /// When the log became durable on the cache device (0 for recovered logs).
    pub(super) durable_at: Nanos,
}

#[derive(Debug)]
pub(super) struct Ring {
    segs: Vec<SegMeta>,
    /// Where each log id lives (`Geometry::position`).
    geo: Option<Geometry>,
    /// The id the next opened log gets.
    next_id: LogId,
    /// Epoch of the logs this incarnation writes.
    epoch: Epoch,
    /// Every log up to this id is written back.
    last_wb: LogId,
    /// Epoch of log `last_wb`.
    last_wb_epoch: Epoch,
}

impl Default for Ring {
    fn default() -> Self {
        Self {
            segs: Vec::new(),
            geo: None,
            next_id: LogId(1),
            epoch: Epoch(0),
            last_wb: LogId::NONE,
            last_wb_epoch: Epoch(0),
        }
    }
}

impl Ring {
    /// Empty positions for a cache of `geo.nr_segments` logs.
    pub(super) fn install(&mut self, geo: Geometry) {
        self.segs = (0..geo.nr_segments).map(|_| SegMeta::default()).collect();
        self.geo = Some(geo);
    }

    pub(super) fn nr_segments(&self) -> u64 {
        self.segs.len() as u64
    }

    fn position(&self, id: LogId) -> usize {
        debug_assert!(id > LogId::NONE, "log ids start at 1");
        self.geo.expect("ring installed").position(id) as usize
    }

    /// The position log `id` lives at (it may hold another log).
    pub(super) fn seg(&self, id: LogId) -> &SegMeta {
        &self.segs[self.position(id)]
    }

    pub(super) fn seg_mut(&mut self, id: LogId) -> &mut SegMeta {
        let pos = self.position(id);
        &mut self.segs[pos]
    }

    /// Ring position `pos`.
    pub(super) fn at(&self, pos: u64) -> &SegMeta {
        &self.segs[pos as usize]
    }

    /// A checkpoint puts log `id` back at position `pos` as it was.
    pub(super) fn restore(
        &mut self,
        pos: u64,
        id: LogId,
        epoch: Epoch,
        nr_slots: u32,
        live_dirty: u32,
    ) {
        self.segs[pos as usize] = SegMeta {
            id,
            epoch,
            nr_slots,
            live_dirty,
            ..SegMeta::default()
        };
    }

    /// Log `id`'s position, if it still holds that log.
    pub(super) fn log_mut(&mut self, id: LogId) -> Option<&mut SegMeta> {
        Some(self.seg_mut(id)).filter(|s| s.id == id)
    }

    #[cfg(feature = "test-hooks")]
    pub(super) fn iter(&self) -> impl Iterator<Item = &SegMeta> {
        self.segs.iter()
    }

    /// A read holds log `id`'s position until [`unhold`](Self::unhold).
    pub(super) fn hold(&mut self, id: LogId) {
        self.seg_mut(id).readers += 1;
    }

    /// A read of log `id` ended. Its position may have been taken over by
    /// then only if the log was not held, so a mismatch means nothing to do.
    pub(super) fn unhold(&mut self, id: LogId) {
        if let Some(s) = self.log_mut(id) {
            debug_assert!(s.readers > 0, "log {id} released more often than held");
            s.readers -= 1;
        }
    }

    pub(super) fn next_id(&self) -> LogId {
        self.next_id
    }

    /// Start-up found the chain's end: the next log continues after it.
    pub(super) fn set_next_id(&mut self, id: LogId) {
        debug_assert!(
            id > self.last_wb,
            "next log {id} at or below the writeback frontier"
        );
        self.next_id = id;
    }

    /// The log that held the next log's position and still does, if any.
    pub(super) fn next_occupant(&self) -> Option<LogId> {
        let nr = self.nr_segments();
        if self.next_id.get() <= nr {
            return None;
        }
        let occupant = self.next_id - nr;
        (self.seg(self.next_id).id == occupant).then_some(occupant)
    }

    /// Takes the next position for a new log with `buf` as its RAM copy.
    /// Returns the new id, the old occupant and how many slots it held (the
    /// caller drops their index entries).
    pub(super) fn open_next(&mut self, buf: BufId) -> (LogId, LogId, u32) {
        let id = self.next_id;
        debug_assert!(
            self.next_occupant().is_none_or(|occ| occ <= self.last_wb),
            "log {id} would overwrite a log not written back"
        );
        self.next_id = self.next_id.next();
        let epoch = self.epoch;
        let seg = self.seg_mut(id);
        debug_assert_eq!(seg.readers, 0, "a read holds the reused position");
        let old = std::mem::replace(
            seg,
            SegMeta {
                id,
                epoch,
                buf: Some(buf),
                ..SegMeta::default()
            },
        );
        (id, old.id, old.nr_slots)
    }

    /// Start-up replays log `id`, holding `nr_slots` blocks, written with `epoch`.
    pub(super) fn replay(&mut self, id: LogId, epoch: Epoch, nr_slots: u32) {
        *self.seg_mut(id) = SegMeta {
            id,
            epoch,
            nr_slots,
            ..SegMeta::default()
        };
    }

    pub(super) fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub(super) fn set_epoch(&mut self, epoch: Epoch) {
        debug_assert!(epoch >= self.epoch, "epochs go back");
        self.epoch = epoch;
    }

    /// Every log up to this id is written back.
    pub(super) fn last_wb(&self) -> LogId {
        self.last_wb
    }

    pub(super) fn last_wb_epoch(&self) -> Epoch {
        self.last_wb_epoch
    }

    /// Start-up read the writeback frontier from the superblock record.
    pub(super) fn set_writeback_frontier(&mut self, id: LogId, epoch: Epoch) {
        self.last_wb = id;
        self.last_wb_epoch = epoch;
    }

    /// Every log up to `last` is written back now.
    pub(super) fn written_back(&mut self, last: LogId) {
        debug_assert!(last > self.last_wb && last < self.next_id);
        self.last_wb = last;
        self.last_wb_epoch = self.seg(last).epoch;
    }

    /// Logs written and not yet written back (open one included).
    pub(super) fn in_use(&self) -> u64 {
        self.next_id.prev() - self.last_wb
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(nr: u64) -> Ring {
        let mut r = Ring::default();
        r.install(Geometry {
            segment_size: 1 << 20,
            header_blocks: 1,
            data_blocks: 255,
            nr_segments: nr,
            backing_size: 1 << 30,
        });
        r.set_epoch(Epoch(3));
        r
    }

    #[test]
    fn positions_wrap_and_are_reused_after_writeback() {
        let mut r = ring(2);
        assert_eq!(r.open_next(BufId(0)).0, LogId(1));
        assert_eq!(r.open_next(BufId(1)).0, LogId(2));
        assert_eq!(r.next_occupant(), Some(LogId(1)));
        r.written_back(LogId(1));
        assert_eq!(r.last_wb_epoch(), Epoch(3));
        let (id, old, _) = r.open_next(BufId(2));
        assert_eq!((id, old), (LogId(3), LogId(1)));
        assert_eq!(r.seg(LogId(3)).id, LogId(3));
        assert_eq!(r.in_use(), 2);
    }

    #[test]
    fn holds_end_only_on_the_log_they_hold() {
        let mut r = ring(1);
        r.open_next(BufId(0));
        r.hold(LogId(1));
        r.unhold(LogId(1));
        r.written_back(LogId(1));
        r.open_next(BufId(1));
        // Log 1's position belongs to log 2 now: releasing log 1 changes nothing.
        r.seg_mut(LogId(2)).readers = 1;
        r.unhold(LogId(1));
        assert_eq!(r.seg(LogId(2)).readers, 1);
    }

    #[test]
    #[should_panic(expected = "not written back")]
    #[cfg(debug_assertions)]
    fn reusing_a_position_before_writeback_is_caught() {
        let mut r = ring(1);
        r.open_next(BufId(0));
        r.open_next(BufId(1));
    }
}
