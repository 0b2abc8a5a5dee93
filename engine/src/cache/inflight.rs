//! Device commands between the engine and the host: tokens handed out,
//! commands waiting to be polled, what each is for, and retries. A command
//! is tracked from [`InFlight::issue`] until the host's completion ends it;
//! a failure worth retrying queues the same command again, up to
//! [`MAX_RETRIES`] times. A flush is never retried: after a failed flush
//! the device may have dropped the writes it covered (as Linux drops dirty
//! pages after an fsync error), so a later success proves nothing about
//! them. Its waiters see the failure instead.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use crate::error::DeviceError;
use crate::io::{Command, CommandKind, Device, Token};

/// Times a failed command is issued again before its failure counts.
pub(super) const MAX_RETRIES: u8 = 3;

#[derive(Debug)]
struct Tracked<P> {
    cmd: Command,
    tries: u8,
    purpose: P,
}

/// What became of a completion.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Ended<P> {
    /// No such command (a stale or repeated completion): ignored.
    Unknown,
    /// It failed and was queued again.
    Retried,
    /// It is over: succeeded, or failed for good.
    Done { cmd: Command, purpose: P, ok: bool },
}

#[derive(Debug)]
pub(super) struct InFlight<P> {
    next_token: u64,
    tracked: FxHashMap<Token, Tracked<P>>,
    /// Issued (or re-issued) and not yet polled by the host.
    queue: VecDeque<Command>,
    /// The planted bug `Mutant::FlushRetried`.
    pub(super) retry_flushes: bool,
}

impl<P> Default for InFlight<P> {
    fn default() -> Self {
        Self {
            next_token: 1,
            tracked: FxHashMap::default(),
            queue: VecDeque::new(),
            retry_flushes: false,
        }
    }
}

impl<P> InFlight<P> {
    /// A new command for the host, for `purpose`.
    pub fn issue(&mut self, device: Device, kind: CommandKind, purpose: P) -> Token {
        let token = Token(self.next_token);
        self.next_token += 1;
        let cmd = Command {
            token,
            device,
            kind,
        };
        self.queue.push_back(cmd);
        let old = self.tracked.insert(
            token,
            Tracked {
                cmd,
                tries: 0,
                purpose,
            },
        );
        debug_assert!(old.is_none(), "token {token:?} issued twice");
        token
    }

    /// The next command for the host.
    pub fn poll(&mut self) -> Option<Command> {
        self.queue.pop_front()
    }

    /// The host reports the end of command `token` (one it polled; any
    /// other completion is ignored, as is a second one).
    pub fn complete(&mut self, token: Token, result: Result<(), DeviceError>) -> Ended<P> {
        let Some(mut t) = self.tracked.remove(&token) else {
            return Ended::Unknown;
        };
        let retry = result.is_err_and(DeviceError::is_retryable)
            && t.tries < MAX_RETRIES
            && (self.retry_flushes || !matches!(t.cmd.kind, CommandKind::Flush));
        if retry {
            t.tries += 1;
            self.queue.push_back(t.cmd);
            self.tracked.insert(token, t);
            return Ended::Retried;
        }
        Ended::Done {
            cmd: t.cmd,
            purpose: t.purpose,
            ok: result.is_ok(),
        }
    }

    /// Commands issued and not yet ended.
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn len(&self) -> usize {
        self.tracked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracked.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue(f: &mut InFlight<&'static str>, purpose: &'static str) -> Token {
        f.issue(Device::Cache, CommandKind::Flush, purpose)
    }

    #[test]
    fn a_failed_flush_is_reported_at_once() {
        let mut f = InFlight::default();
        let t = issue(&mut f, "flush");
        f.poll();
        match f.complete(t, Err(DeviceError::Io)) {
            Ended::Done { purpose, ok, .. } => assert_eq!((purpose, ok), ("flush", false)),
            e => panic!("a failed flush was {e:?}: its writes may be gone, a retry proves nothing"),
        }
        assert!(f.poll().is_none());
    }

    #[test]
    fn io_errors_are_retried_then_reported_and_refusals_are_not() {
        let mut f = InFlight::default();
        let t = f.issue(
            Device::Cache,
            CommandKind::Read {
                offset: 0,
                len: 512,
                dst: crate::io::DataRef::Engine {
                    buf: crate::io::BufId(0),
                    offset: 0,
                },
            },
            "read",
        );
        assert_eq!(f.poll().map(|c| c.token), Some(t));
        for _ in 0..MAX_RETRIES {
            assert_eq!(f.complete(t, Err(DeviceError::Io)), Ended::Retried);
            assert_eq!(f.poll().map(|c| c.token), Some(t), "the same command again");
        }
        match f.complete(t, Err(DeviceError::Io)) {
            Ended::Done { purpose, ok, .. } => assert_eq!((purpose, ok), ("read", false)),
            e => panic!("{e:?}"),
        }
        assert!(f.is_empty());
        let t = issue(&mut f, "write");
        f.poll();
        assert!(matches!(
            f.complete(t, Err(DeviceError::Invalid)),
            Ended::Done { ok: false, .. }
        ));
        assert!(f.poll().is_none(), "a refused command is not issued again");
    }

    #[test]
    fn tokens_are_unique_and_stale_completions_are_ignored() {
        let mut f = InFlight::default();
        let (a, b) = (issue(&mut f, "a"), issue(&mut f, "b"));
        assert_ne!(a, b);
        assert_eq!(f.len(), 2);
        assert_eq!(
            (f.poll().map(|c| c.token), f.poll().map(|c| c.token)),
            (Some(a), Some(b))
        );
        assert!(matches!(
            f.complete(b, Ok(())),
            Ended::Done { ok: true, .. }
        ));
        assert_eq!(f.complete(b, Ok(())), Ended::Unknown);
        assert_eq!(f.len(), 1);
    }
}
