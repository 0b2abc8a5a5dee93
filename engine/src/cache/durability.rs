//! The durable frontier: which sealed logs are on their way to the cache
//! device, which flush covers them, and which requests wait for them.
//!
//! Every log up to [`Durability::frontier`] is durable. The frontier only
//! moves up, and only past logs a completed flush covered, so a FUA write or
//! FLUSH that waits for it is acknowledged only when everything before it
//! survives a crash too. Recovery may then stop at the first bad log without
//! losing anything acknowledged.

use std::collections::BTreeMap;

use crate::ids::LogId;
use crate::io::{Nanos, ReqId};

/// State of a sealed log on its way to durability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogState {
    Writing,
    Written,
    Flushing,
}

#[derive(Debug, Default)]
pub(super) struct Durability {
    /// Sealed logs not yet durable.
    unflushed: BTreeMap<LogId, LogState>,
    /// Every log up to this id is durable.
    frontier: LogId,
    /// Logs the cache flush in flight covers (`Some` while one is in flight).
    flushing: Option<Vec<LogId>>,
    /// Requests waiting for the frontier, by the log id they need.
    waiters: BTreeMap<LogId, Vec<ReqId>>,
    /// When the open log is sealed for a waiting FUA/FLUSH.
    barrier_deadline: Option<Nanos>,
}

impl Durability {
    /// Starts from a recovered (or freshly formatted) cache whose logs up to
    /// `frontier` are all durable.
    pub(super) fn reset(&mut self, frontier: LogId) {
        debug_assert!(self.unflushed.is_empty() && self.flushing.is_none());
        self.frontier = frontier;
    }

    pub(super) fn frontier(&self) -> LogId {
        self.frontier
    }

    pub(super) fn is_durable(&self, id: LogId) -> bool {
        id <= self.frontier
    }

    /// Log `id` was sealed and its write issued.
    pub(super) fn sealed(&mut self, id: LogId) {
        debug_assert!(id > self.frontier, "log {id} sealed below the frontier");
        let old = self.unflushed.insert(id, LogState::Writing);
        debug_assert!(old.is_none(), "log {id} sealed twice");
    }

    /// Log `id`'s write completed; it waits for a flush.
    pub(super) fn written(&mut self, id: LogId) {
        if let Some(st) = self.unflushed.get_mut(&id) {
            debug_assert_eq!(*st, LogState::Writing);
            *st = LogState::Written;
        }
    }

    pub(super) fn flush_busy(&self) -> bool {
        self.flushing.is_some()
    }

    /// Logs written and not yet covered by a flush.
    pub(super) fn has_written(&self) -> bool {
        self.unflushed.values().any(|s| *s == LogState::Written)
    }

    /// A cache flush is issued: it covers every log written so far.
    pub(super) fn flush_started(&mut self) {
        debug_assert!(self.flushing.is_none(), "two cache flushes in flight");
        let logs: Vec<LogId> = self
            .unflushed
            .iter_mut()
            .filter(|(_, s)| **s == LogState::Written)
            .map(|(id, s)| {
                *s = LogState::Flushing;
                *id
            })
            .collect();
        self.flushing = Some(logs);
    }

    /// The cache flush ended; on success the logs it covered are durable
    /// (the frontier moves in [`advance`](Self::advance)).
    pub(super) fn flush_done(&mut self, ok: bool) {
        let logs = self.flushing.take().unwrap_or_default();
        if ok {
            for id in logs {
                let st = self.unflushed.remove(&id);
                debug_assert_eq!(st, Some(LogState::Flushing));
            }
        }
    }

    /// Lowest sealed log that is not durable yet.
    pub(super) fn lowest_unflushed(&self) -> Option<LogId> {
        self.unflushed.first_key_value().map(|(&id, _)| id)
    }

    /// No sealed log waits for its write or flush.
    pub(super) fn is_settled(&self) -> bool {
        self.unflushed.is_empty() && self.flushing.is_none()
    }

    /// Moves the frontier to just below `lowest_pending`, the lowest log that
    /// is not durable (open, sealing or unflushed). Returns the ids that
    /// became durable.
    pub(super) fn advance(
        &mut self,
        lowest_pending: LogId,
    ) -> impl DoubleEndedIterator<Item = LogId> + Clone + use<> {
        debug_assert!(
            self.lowest_unflushed()
                .is_none_or(|id| id >= lowest_pending),
            "an unflushed log lies below the given lowest pending log"
        );
        let before = self.frontier;
        self.frontier = self.frontier.max(lowest_pending.prev());
        before.next().through(self.frontier)
    }

    /// `req` completes once log `id` is durable.
    pub(super) fn wait(&mut self, id: LogId, req: ReqId) {
        debug_assert!(id > self.frontier, "waiting for a durable log");
        self.waiters.entry(id).or_default().push(req);
    }

    /// Requests whose log is durable now.
    pub(super) fn take_ready(&mut self) -> Vec<ReqId> {
        let later = self.waiters.split_off(&self.frontier.next());
        let ready = std::mem::replace(&mut self.waiters, later);
        ready.into_values().flatten().collect()
    }

    /// Every waiting request (the cache device failed: they will not be durable).
    pub(super) fn take_all_waiters(&mut self) -> Vec<ReqId> {
        self.barrier_deadline = None;
        std::mem::take(&mut self.waiters)
            .into_values()
            .flatten()
            .collect()
    }

    pub(super) fn barrier_deadline(&self) -> Option<Nanos> {
        self.barrier_deadline
    }

    /// Seal the open log no later than `at`.
    pub(super) fn set_barrier(&mut self, at: Nanos) {
        self.barrier_deadline = Some(self.barrier_deadline.map_or(at, |x| x.min(at)));
    }

    /// Whether the barrier deadline has come; it is cleared if so.
    pub(super) fn take_barrier_due(&mut self, now: Nanos) -> bool {
        let due = self.barrier_deadline.is_some_and(|d| d <= now);
        if due {
            self.barrier_deadline = None;
        }
        due
    }

    /// The open log was sealed: no barrier is pending.
    pub(super) fn clear_barrier(&mut self) {
        self.barrier_deadline = None;
    }

    #[cfg(feature = "test-hooks")]
    pub(super) fn describe(&self) -> String {
        format!(
            "unflushed {:?} waiters {:?}",
            self.unflushed,
            self.waiters
                .iter()
                .map(|(id, r)| (*id, r.len()))
                .collect::<Vec<_>>()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontier_moves_only_past_flushed_logs() {
        let mut d = Durability::default();
        d.reset(LogId(4));
        d.sealed(LogId(5));
        d.sealed(LogId(6));
        d.written(LogId(6));
        d.flush_started();
        d.flush_done(true);
        // Log 5 is still being written: nothing moves.
        assert!(d.advance(d.lowest_unflushed().unwrap()).next().is_none());
        assert_eq!(d.frontier(), LogId(4));
        d.written(LogId(5));
        assert!(d.has_written());
        d.flush_started();
        d.flush_done(true);
        assert!(d.is_settled());
        assert!(d.advance(LogId(7)).eq(LogId(5).through(LogId(6))));
        assert!(d.is_durable(LogId(6)) && !d.is_durable(LogId(7)));
    }

    #[test]
    fn a_failed_flush_leaves_its_logs_unflushed() {
        let mut d = Durability::default();
        d.sealed(LogId(1));
        d.written(LogId(1));
        d.flush_started();
        assert!(d.flush_busy());
        d.flush_done(false);
        assert!(!d.flush_busy());
        assert_eq!(d.lowest_unflushed(), Some(LogId(1)));
        assert!(d.advance(LogId(1)).next().is_none());
    }

    #[test]
    fn waiters_wake_in_order_of_the_log_they_need() {
        let mut d = Durability::default();
        d.wait(LogId(2), ReqId(20));
        d.wait(LogId(1), ReqId(10));
        d.wait(LogId(3), ReqId(30));
        assert!(d.advance(LogId(3)).eq(LogId(1).through(LogId(2))));
        assert_eq!(d.take_ready(), vec![ReqId(10), ReqId(20)]);
        assert_eq!(d.take_all_waiters(), vec![ReqId(30)]);
    }

    #[test]
    fn the_earliest_barrier_wins() {
        let mut d = Durability::default();
        d.set_barrier(10);
        d.set_barrier(5);
        d.set_barrier(7);
        assert!(!d.take_barrier_due(4));
        assert!(d.take_barrier_due(5));
        assert_eq!(d.barrier_deadline(), None);
    }
}
