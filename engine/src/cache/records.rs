//! Superblock records: the newest one known durable, the one on its way to
//! the cache device, and when the next is due.
//!
//! A record names the writeback frontier and the incarnation's epoch. It
//! counts only once the cache flush after its write has completed, so
//! [`Records::current`] never claims more than a crash would keep.

use crate::format::SbRecord;
use crate::ids::{Epoch, LogId};
use crate::io::{BufId, Nanos};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Writing(SbRecord),
    Written(SbRecord),
    Flushing(SbRecord),
}

#[derive(Debug)]
pub(super) struct Records {
    /// The newest record known durable.
    current: SbRecord,
    state: State,
    /// The encoded record of the write in flight.
    buf: Option<BufId>,
    /// A record was asked for (interval, shutdown, mode change, clean state).
    wanted: bool,
    /// When `current` became durable (or the cache opened).
    last_at: Nanos,
}

impl Records {
    pub(super) fn new(now: Nanos) -> Self {
        Self {
            current: SbRecord {
                seq: 0,
                last_writeback_id: 0,
                last_writeback_epoch: 0,
                durable_id: 0,
                epoch: 0,
                cache_uuid: [0; 16],
                flags: 0,
            },
            state: State::Idle,
            buf: None,
            wanted: false,
            last_at: now,
        }
    }

    /// Adopts the record start-up found, formatted or wrote.
    pub(super) fn install(&mut self, rec: SbRecord) {
        debug_assert!(rec.seq >= self.current.seq, "records go back in sequence");
        self.current = rec;
    }

    pub(super) fn current(&self) -> &SbRecord {
        &self.current
    }

    /// The writeback frontier the newest durable record names.
    pub(super) fn written_back(&self) -> LogId {
        LogId(self.current.last_writeback_id)
    }

    /// The epoch of the newest durable record's incarnation.
    pub(super) fn epoch(&self) -> Epoch {
        Epoch(self.current.epoch)
    }

    /// The record that says where the cache is now, one sequence number
    /// past the newest.
    pub(super) fn next(
        &self,
        last_writeback_id: LogId,
        last_writeback_epoch: Epoch,
        durable_id: LogId,
        epoch: Epoch,
        flags: u32,
    ) -> SbRecord {
        debug_assert!(last_writeback_id >= self.written_back());
        debug_assert!(durable_id >= last_writeback_id);
        SbRecord {
            seq: self.current.seq + 1,
            last_writeback_id: last_writeback_id.get(),
            last_writeback_epoch: last_writeback_epoch.get(),
            durable_id: durable_id.get(),
            epoch: epoch.get(),
            cache_uuid: self.current.cache_uuid,
            flags,
        }
    }

    /// The buffer holding an encoded record is being written.
    pub(super) fn set_buf(&mut self, buf: BufId) {
        debug_assert!(self.buf.is_none(), "two record writes in flight");
        self.buf = Some(buf);
    }

    /// The buffer of the record write that ended.
    pub(super) fn take_buf(&mut self) -> Option<BufId> {
        self.buf.take()
    }

    /// A steady-state record write was issued.
    pub(super) fn writing(&mut self, rec: SbRecord) {
        debug_assert_eq!(self.state, State::Idle);
        self.wanted = false;
        self.state = State::Writing(rec);
    }

    /// The record write ended; a failed one is forgotten. Returns whether a
    /// steady-state write was in flight (start-up's is not tracked here).
    pub(super) fn written(&mut self, ok: bool) -> bool {
        let State::Writing(r) = self.state else {
            return false;
        };
        self.state = if ok { State::Written(r) } else { State::Idle };
        true
    }

    /// A written record waits for a cache flush.
    pub(super) fn needs_flush(&self) -> bool {
        matches!(self.state, State::Written(_))
    }

    /// A cache flush is issued; it covers the written record, if any.
    pub(super) fn flush_started(&mut self) {
        if let State::Written(r) = self.state {
            self.state = State::Flushing(r);
        }
    }

    /// The cache flush completed: a record it covered is durable now.
    /// Returns whether one was.
    pub(super) fn flushed(&mut self, now: Nanos) -> bool {
        let State::Flushing(r) = self.state else {
            return false;
        };
        self.install(r);
        self.state = State::Idle;
        self.last_at = now;
        true
    }

    pub(super) fn is_idle(&self) -> bool {
        self.state == State::Idle
    }

    pub(super) fn want(&mut self) {
        self.wanted = true;
    }

    pub(super) fn is_wanted(&self) -> bool {
        self.wanted
    }

    /// The wanted record turned out to say nothing new.
    pub(super) fn unwant(&mut self) {
        self.wanted = false;
    }

    /// Start-up is done: intervals count from now.
    pub(super) fn opened(&mut self, now: Nanos) {
        self.last_at = now;
    }

    /// When a record is due for `interval_s` seconds, if the writeback
    /// frontier `last_wb` has moved past the newest one.
    pub(super) fn deadline(&self, interval_s: u32, last_wb: LogId) -> Option<Nanos> {
        (interval_s > 0
            && last_wb > self.written_back()
            && self.state == State::Idle
            && !self.wanted)
            .then(|| self.last_at + interval_s as u64 * 1_000_000_000)
    }

    #[cfg(feature = "test-hooks")]
    pub(super) fn describe(&self) -> String {
        format!("{:?}", self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_counts_only_after_its_flush() {
        let mut r = Records::new(0);
        r.install(SbRecord {
            seq: 1,
            epoch: 1,
            ..*r.current()
        });
        let next = r.next(LogId(5), Epoch(1), LogId(6), Epoch(1), 0);
        assert_eq!((next.seq, next.last_writeback_id), (2, 5));
        r.want();
        r.writing(next);
        assert!(!r.is_wanted() && !r.is_idle());
        // A flush issued before the write ended does not cover it.
        r.flush_started();
        assert!(!r.flushed(10));
        assert!(r.written(true));
        assert!(r.needs_flush());
        r.flush_started();
        assert_eq!(r.current().seq, 1);
        assert!(r.flushed(10));
        assert_eq!(*r.current(), next);
        assert!(r.is_idle());
    }

    #[test]
    fn a_failed_write_changes_nothing() {
        let mut r = Records::new(0);
        let next = r.next(LogId(3), Epoch(1), LogId(3), Epoch(1), 0);
        r.writing(next);
        assert!(r.written(false));
        assert!(r.is_idle() && !r.needs_flush());
        assert_eq!(r.current().seq, 0);
    }

    #[test]
    fn the_interval_runs_from_the_last_durable_record() {
        let mut r = Records::new(0);
        r.opened(100);
        assert_eq!(r.deadline(0, LogId(9)), None, "interval 0 is off");
        assert_eq!(r.deadline(2, LogId::NONE), None, "nothing new to record");
        assert_eq!(r.deadline(2, LogId(9)), Some(100 + 2_000_000_000));
        r.want();
        assert_eq!(r.deadline(2, LogId(9)), None, "already asked for");
    }
}
