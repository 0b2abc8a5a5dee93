//! Newtypes for the numbers the engine must not mix up: log ids and epochs
//! are both `u64` on disk, and a log id passed where an epoch (or a backing
//! block) belongs would still compile as a bare integer.

use std::fmt;
use std::ops::{Add, Sub};

/// A log's id: logs are numbered 1, 2, … in the order they are opened; 0
/// means "none" (the frontiers start there).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogId(pub u64);

impl LogId {
    /// Below every log: "no log yet".
    pub const NONE: LogId = LogId(0);

    pub fn get(self) -> u64 {
        self.0
    }

    /// The log before this one (`NONE` before the first).
    pub fn prev(self) -> LogId {
        LogId(self.0.saturating_sub(1))
    }

    pub fn next(self) -> LogId {
        LogId(self.0 + 1)
    }

    /// Ids from `self` up to and including `last`.
    pub fn through(self, last: LogId) -> impl DoubleEndedIterator<Item = LogId> + Clone {
        (self.0..=last.0).map(LogId)
    }
}

impl Add<u64> for LogId {
    type Output = LogId;
    fn add(self, n: u64) -> LogId {
        LogId(self.0 + n)
    }
}

impl Sub<u64> for LogId {
    type Output = LogId;
    fn sub(self, n: u64) -> LogId {
        LogId(self.0 - n)
    }
}

/// How many logs lie between two ids.
impl Sub<LogId> for LogId {
    type Output = u64;
    fn sub(self, other: LogId) -> u64 {
        self.0 - other.0
    }
}

impl fmt::Display for LogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An incarnation of the cache: each open writes its logs with an epoch
/// higher than any before, so a stale log past the chain's end is never
/// taken for its continuation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

impl Epoch {
    pub fn get(self) -> u64 {
        self.0
    }

    /// The next incarnation's epoch.
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_step_and_count() {
        let a = LogId(5);
        assert_eq!(a.next(), LogId(6));
        assert_eq!(a.prev(), LogId(4));
        assert_eq!(LogId::NONE.prev(), LogId::NONE);
        assert_eq!(LogId(9) - a, 4);
        assert_eq!(a + 3, LogId(8));
        assert_eq!(
            LogId(2).through(LogId(4)).collect::<Vec<_>>(),
            [LogId(2), LogId(3), LogId(4)]
        );
        assert!(LogId(3).through(LogId(2)).next().is_none());
        assert_eq!(Epoch(1).next(), Epoch(2));
    }
}
