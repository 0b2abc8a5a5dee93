//! The loop every host runs around an [`Engine`], written once: it keeps the
//! user requests' memory while they are in flight, starts the device
//! commands the engine emits on a [`Target`], performs
//! [`Event::CopyToUser`] itself (so the "copy before the next call" rule is
//! kept here, not by each host), and hands the host what it must act on as
//! [`Outcome`]s.
//!
//! ```text
//! driver.submit(req, UserOp::Write { offset, fua }, user, now)?;
//! driver.pump(&mut target, now);                         // starts commands
//! while let Some(o) = driver.poll_outcome() { ... }      // completions
//! // when a command ends: driver.complete(token, result, now), then pump
//! // at driver.engine().poll_timeout(): driver.handle_timeout(now), then pump
//! ```
//!
//! The simulator, the standalone host's reactor and the SPDK device each
//! implement [`Target`] for their devices and [`UserBuf`] for their user
//! requests, and nothing else of this loop.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use crate::io::{BufAlloc, Command, CommandKind, DataRef, Event, Nanos, ReqId, Token};
use crate::{DeviceError, Engine, IoError, OpenError, SubmitError};

/// A user request's memory, held by the driver until the request completes.
pub trait UserBuf {
    /// What a write sends (for other requests, whatever they hold).
    fn bytes(&self) -> &[u8];
    /// Where a read lands.
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl UserBuf for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

/// The memory a command uses, as the driver hands it to [`Target::start`].
/// It stays where it is until the command completes: engine buffers do not
/// move, and a user request's memory is held until the request completes,
/// which the engine does only after its commands have.
pub enum CmdMem<'a> {
    /// Flushes, discards, zeroes.
    None,
    /// The bytes a write sends.
    Src(&'a [u8]),
    /// The memory a read fills.
    Dst(&'a mut [u8]),
}

/// What became of a command handed to [`Target::start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// Running; the host reports its end with [`Driver::complete`].
    InFlight,
    /// Already over (it needed no device I/O, or could not be started); the
    /// driver reports this result to the engine on this pump.
    Done(Result<(), DeviceError>),
}

/// The host's devices.
pub trait Target {
    /// Starts `cmd`, whose memory is `mem`.
    fn start(&mut self, cmd: Command, mem: CmdMem<'_>) -> Started;
}

/// A user request, as [`Driver::submit`] takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserOp {
    /// `len` bytes at `offset` into the request's memory.
    Read { offset: u64, len: u64 },
    /// The request's memory at `offset`; with `fua`, durable before it completes.
    Write { offset: u64, fua: bool },
    /// `len` bytes at `offset` read as zeroes from now on.
    WriteZeroes { offset: u64, len: u64 },
    /// `len` bytes at `offset` are no longer needed.
    Discard { offset: u64, len: u64 },
    /// Everything completed before it is durable.
    Flush,
}

/// What the host must act on.
#[derive(Debug)]
pub enum Outcome<U> {
    /// Start-up finished; user requests are accepted from now on.
    Ready,
    /// Start-up failed; nothing was written to either device.
    OpenFailed(OpenError),
    /// A user request finished; its memory is handed back (a read's data
    /// is in it).
    Completed {
        req: ReqId,
        user: U,
        result: Result<(), IoError>,
    },
    /// `shutdown` finished: the cache is clean to detach.
    ShutdownComplete,
}

/// An engine and the user requests in flight on it.
/// Where a device is in its life. The driver tracks it from what the
/// engine reports, so hosts keep no lifecycle of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// Start-up (recovery or format) is running.
    Opening,
    /// Serving user requests.
    Online,
    /// A stop was asked for: no new requests; those in flight finish.
    Draining,
    /// The engine's clean shutdown is running.
    Closing,
    /// Shut down cleanly.
    Closed,
    /// Start-up failed.
    Failed,
}

impl Lifecycle {
    /// Nothing more will happen: closed, or failed to open.
    pub fn is_over(self) -> bool {
        matches!(self, Lifecycle::Closed | Lifecycle::Failed)
    }
}

pub struct Driver<A: BufAlloc, U: UserBuf> {
    engine: Engine<A>,
    lifecycle: Lifecycle,
    users: FxHashMap<ReqId, U>,
    /// Commands that ended in [`Target::start`], reported on the next pump.
    ended: Vec<(Token, Result<(), DeviceError>)>,
    outcomes: VecDeque<Outcome<U>>,
}

impl<A: BufAlloc, U: UserBuf> Driver<A, U> {
    pub fn new(engine: Engine<A>) -> Self {
        Self {
            engine,
            lifecycle: Lifecycle::Opening,
            users: FxHashMap::default(),
            ended: Vec::new(),
            outcomes: VecDeque::new(),
        }
    }

    pub fn engine(&self) -> &Engine<A> {
        &self.engine
    }

    /// For everything but user requests (tunables, stats, shutdown, ...);
    /// call [`pump`](Self::pump) afterwards, as after any call.
    pub fn engine_mut(&mut self) -> &mut Engine<A> {
        &mut self.engine
    }

    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle
    }

    /// Stop taking new requests; [`close`](Self::close) once those in flight ended.
    pub fn begin_drain(&mut self) {
        if self.lifecycle == Lifecycle::Online {
            self.lifecycle = Lifecycle::Draining;
        }
    }

    /// Starts the engine's clean shutdown; the driver reports
    /// [`Outcome::ShutdownComplete`] when it is done.
    pub fn close(&mut self, now: Nanos) {
        if !self.lifecycle.is_over() {
            self.lifecycle = Lifecycle::Closing;
        }
        self.engine.shutdown(now);
    }

    /// The host gave up on the device (a start-up that stopped making
    /// progress, a base device that went away): nothing more is expected
    /// of it. A clean close stays [`Lifecycle::Closed`].
    pub fn abandon(&mut self) {
        if self.lifecycle != Lifecycle::Closed {
            self.lifecycle = Lifecycle::Failed;
        }
    }

    /// User requests in flight.
    pub fn requests_in_flight(&self) -> usize {
        self.users.len()
    }

    /// Every request still held, for a host that is tearing the device
    /// down and must fail them; the engine is not told.
    pub fn take_held(&mut self) -> Vec<(ReqId, U)> {
        self.users.drain().collect()
    }

    /// Submits user request `req` with its memory; on refusal the memory
    /// comes back with the reason.
    pub fn submit(
        &mut self,
        req: ReqId,
        op: UserOp,
        user: U,
        now: Nanos,
    ) -> Result<(), (SubmitError, U)> {
        let e = &mut self.engine;
        let accepted = match op {
            UserOp::Read { offset, len } => e.submit_read(req, offset, len, now),
            UserOp::Write { offset, fua } => e.submit_write(req, offset, user.bytes(), fua, now),
            UserOp::WriteZeroes { offset, len } => e.submit_write_zeroes(req, offset, len, now),
            UserOp::Discard { offset, len } => e.submit_discard(req, offset, len, now),
            UserOp::Flush => e.submit_flush(req, now),
        };
        self.hold(accepted, req, user)
    }

    /// Submits a write of whole blocks whose data the submitter already
    /// copied into granted slots `first_slot..` of log `log` (see
    /// [`Engine::grant`]), with `crcs` their checksums; `user` is held until
    /// it completes, as for [`submit`](Self::submit). On refusal the slots
    /// are still reserved: hand them back with [`Engine::return_grant`].
    #[allow(clippy::too_many_arguments)]
    pub fn submit_granted(
        &mut self,
        req: ReqId,
        offset: u64,
        log: crate::LogId,
        first_slot: u32,
        crcs: &[u32],
        fua: bool,
        user: U,
        now: Nanos,
    ) -> Result<(), (SubmitError, U)> {
        let accepted = self
            .engine
            .submit_granted_write(req, offset, log, first_slot, crcs, fua, now);
        self.hold(accepted, req, user)
    }

    /// Keeps `user` for an accepted request; gives it back with the refusal.
    fn hold(
        &mut self,
        accepted: Result<(), SubmitError>,
        req: ReqId,
        user: U,
    ) -> Result<(), (SubmitError, U)> {
        if let Err(e) = accepted {
            return Err((e, user));
        }
        // The engine refuses a request id already in flight, so none is replaced.
        debug_assert!(!self.users.contains_key(&req), "request {req:?} held twice");
        self.users.insert(req, user);
        Ok(())
    }

    /// A command started with [`Started::InFlight`] ended.
    pub fn complete(&mut self, token: Token, result: Result<(), DeviceError>, now: Nanos) {
        self.engine.handle_completion(token, result, now);
    }

    /// The engine's deadline (`engine().poll_timeout()`) passed.
    pub fn handle_timeout(&mut self, now: Nanos) {
        self.engine.handle_timeout(now);
    }

    /// The memory a read command fills, for hosts that copy a read's data in
    /// when it completes (before [`complete`](Self::complete)).
    pub fn read_dst(&mut self, cmd: &Command) -> Option<&mut [u8]> {
        let CommandKind::Read { len, dst, .. } = cmd.kind else {
            return None;
        };
        mem_mut(&mut self.engine, &mut self.users, dst, len)
    }

    /// Starts every command the engine has on `target` and takes every
    /// event, until the engine has nothing more. Call after every submit,
    /// completion and timeout.
    pub fn pump(&mut self, target: &mut impl Target, now: Nanos) {
        loop {
            let mut any = false;
            for (token, result) in self.ended.drain(..) {
                self.engine.handle_completion(token, result, now);
                any = true;
            }
            while let Some(cmd) = self.engine.poll_command() {
                any = true;
                let mem = match cmd.kind {
                    CommandKind::Read { len, dst, .. } => {
                        mem_mut(&mut self.engine, &mut self.users, dst, len).map(CmdMem::Dst)
                    }
                    CommandKind::Write { len, src, .. } => {
                        mem(&self.engine, &self.users, src, len).map(CmdMem::Src)
                    }
                    _ => Some(CmdMem::None),
                };
                let started = match mem {
                    Some(mem) => target.start(cmd, mem),
                    // The engine named memory nobody holds: fail the command
                    // rather than run it on the wrong bytes (again would fail
                    // the same way).
                    None => Started::Done(Err(DeviceError::Invalid)),
                };
                if let Started::Done(result) = started {
                    self.ended.push((cmd.token, result));
                }
            }
            while let Some(ev) = self.engine.poll_event() {
                any = true;
                self.event(ev);
            }
            if !any {
                break;
            }
        }
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::CopyToUser {
                req,
                dst_offset,
                src,
                src_offset,
                len,
            } => {
                if let Some(u) = self.users.get_mut(&req)
                    && let Some(dst) = u.bytes_mut().get_mut(dst_offset..dst_offset + len)
                {
                    dst.copy_from_slice(&self.engine.buffer(src)[src_offset..src_offset + len]);
                } else {
                    debug_assert!(false, "CopyToUser for {req:?} outside its memory");
                }
            }
            Event::Completed { req, result } => match self.users.remove(&req) {
                Some(user) => self
                    .outcomes
                    .push_back(Outcome::Completed { req, user, result }),
                None => debug_assert!(false, "completion of {req:?}, which is not held"),
            },
            Event::Ready => {
                self.lifecycle = Lifecycle::Online;
                self.outcomes.push_back(Outcome::Ready);
            }
            Event::OpenFailed(e) => {
                self.lifecycle = Lifecycle::Failed;
                self.outcomes.push_back(Outcome::OpenFailed(e));
            }
            Event::ShutdownComplete => {
                if self.lifecycle != Lifecycle::Failed {
                    self.lifecycle = Lifecycle::Closed;
                }
                self.outcomes.push_back(Outcome::ShutdownComplete);
            }
        }
    }

    /// The next thing the host must act on.
    pub fn poll_outcome(&mut self) -> Option<Outcome<U>> {
        self.outcomes.pop_front()
    }
}

fn mem<'a, A: BufAlloc, U: UserBuf>(
    engine: &'a Engine<A>,
    users: &'a FxHashMap<ReqId, U>,
    r: DataRef,
    len: usize,
) -> Option<&'a [u8]> {
    match r {
        DataRef::Engine { buf, offset } => engine.buffer(buf).get(offset..offset + len),
        DataRef::User { req, offset } => users.get(&req)?.bytes().get(offset..offset + len),
    }
}

fn mem_mut<'a, A: BufAlloc, U: UserBuf>(
    engine: &'a mut Engine<A>,
    users: &'a mut FxHashMap<ReqId, U>,
    r: DataRef,
    len: usize,
) -> Option<&'a mut [u8]> {
    match r {
        DataRef::Engine { buf, offset } => engine.buffer_mut(buf).get_mut(offset..offset + len),
        DataRef::User { req, offset } => users
            .get_mut(&req)?
            .bytes_mut()
            .get_mut(offset..offset + len),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{Device, HeapAlloc};
    use crate::{BackingIdentity, OpenParams};

    const MIB: u64 = 1 << 20;

    /// Devices in RAM that do every command at once, in `start`.
    struct MemTarget {
        cache: Vec<u8>,
        backing: Vec<u8>,
        /// Fail every write to the cache device, this way.
        fail_cache_writes: Option<DeviceError>,
    }

    impl Target for MemTarget {
        fn start(&mut self, cmd: Command, mem: CmdMem<'_>) -> Started {
            let dev = match cmd.device {
                Device::Cache => &mut self.cache,
                Device::Backing => &mut self.backing,
            };
            match (cmd.kind, mem) {
                (CommandKind::Write { offset, .. }, CmdMem::Src(src)) => {
                    if let Some(e) = self.fail_cache_writes
                        && cmd.device == Device::Cache
                    {
                        return Started::Done(Err(e));
                    }
                    dev[offset as usize..offset as usize + src.len()].copy_from_slice(src);
                }
                (CommandKind::Read { offset, .. }, CmdMem::Dst(dst)) => {
                    let n = dst.len();
                    dst.copy_from_slice(&dev[offset as usize..offset as usize + n]);
                }
                (CommandKind::WriteZeroes { offset, len }, CmdMem::None) => {
                    dev[offset as usize..(offset + len) as usize].fill(0);
                }
                (CommandKind::Flush | CommandKind::Discard { .. }, CmdMem::None) => {}
                (kind, _) => panic!("{kind:?} with the wrong memory"),
            }
            Started::Done(Ok(()))
        }
    }

    fn open() -> (Driver<HeapAlloc, Vec<u8>>, MemTarget) {
        let backing = BackingIdentity {
            uuid: [7; 16],
            size: 64 * MIB,
        };
        let mut params = OpenParams::new(16 * MIB, backing, [9; 16]);
        params.format = true;
        let mut d = Driver::new(Engine::open(params, HeapAlloc, 0).unwrap());
        let mut t = MemTarget {
            cache: vec![0; 16 * MIB as usize],
            backing: vec![0; 64 * MIB as usize],
            fail_cache_writes: None,
        };
        d.pump(&mut t, 0);
        assert!(matches!(d.poll_outcome(), Some(Outcome::Ready)));
        assert_eq!(d.lifecycle(), Lifecycle::Online);
        (d, t)
    }

    fn read(offset: u64, len: u64) -> UserOp {
        UserOp::Read { offset, len }
    }

    fn write(offset: u64, fua: bool) -> UserOp {
        UserOp::Write { offset, fua }
    }

    /// Pumps until request `req` completes; its result and memory.
    fn finish(
        d: &mut Driver<HeapAlloc, Vec<u8>>,
        t: &mut MemTarget,
        req: u64,
    ) -> (Result<(), IoError>, Vec<u8>) {
        let mut now = 0;
        for _ in 0..1000 {
            d.pump(t, now);
            if let Some(o) = d.poll_outcome() {
                match o {
                    Outcome::Completed {
                        req: r,
                        user,
                        result,
                    } if r == ReqId(req) => {
                        return (result, user);
                    }
                    o => panic!("unexpected {o:?}"),
                }
            }
            // Nothing waits on a device here, only on the engine's deadlines.
            now = d
                .engine()
                .poll_timeout()
                .unwrap_or(now + 1_000_000)
                .max(now);
            d.handle_timeout(now);
        }
        panic!("request {req} never completed");
    }

    #[test]
    fn data_written_through_the_driver_reads_back_from_buffer_cache_and_backing() {
        let (mut d, mut t) = open();
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        d.submit(ReqId(1), write(4096, true), data.clone(), 0)
            .unwrap();
        assert_eq!(finish(&mut d, &mut t, 1).0, Ok(()));
        // The FUA write is in a log on the cache device by now.
        assert!(t.cache.iter().any(|&b| b != 0));
        d.submit(ReqId(2), read(4096, 8192), vec![0; 8192], 0)
            .unwrap();
        let (r, got) = finish(&mut d, &mut t, 2);
        assert_eq!((r, got), (Ok(()), data.clone()));
        // Never written: read from the backing device into the user's memory.
        t.backing[32 * MIB as usize..32 * MIB as usize + 4096].fill(0x5a);
        d.submit(ReqId(3), read(32 * MIB, 4096), vec![0; 4096], 0)
            .unwrap();
        let (r, got) = finish(&mut d, &mut t, 3);
        assert_eq!(r, Ok(()));
        assert!(got.iter().all(|&b| b == 0x5a));
        assert_eq!(d.requests_in_flight(), 0);
    }

    #[test]
    fn a_refused_request_gives_its_memory_back() {
        let (mut d, _t) = open();
        let (e, user) = d
            .submit(ReqId(1), write(100, false), vec![1; 512], 0)
            .unwrap_err();
        assert!(matches!(e, SubmitError::BadRange { .. }), "{e}");
        assert_eq!(user, vec![1; 512]);
        assert_eq!(d.requests_in_flight(), 0);
    }

    #[test]
    fn commands_that_fail_in_start_reach_the_engine_as_failures() {
        for (e, retries) in [(DeviceError::Io, 3), (DeviceError::Invalid, 0)] {
            let (mut d, mut t) = open();
            t.fail_cache_writes = Some(e);
            d.submit(ReqId(1), write(0, true), vec![3; 4096], 0)
                .unwrap();
            let (r, _) = finish(&mut d, &mut t, 1);
            assert!(r.is_err(), "a FUA write whose log cannot be written fails");
            assert!(d.engine().is_read_only());
            // An I/O error is retried; a refused command is not.
            assert_eq!(d.engine().stats().io_retries, retries, "{e:?}");
        }
    }

    #[test]
    fn the_lifecycle_follows_the_engine_and_the_host() {
        let (mut d, mut t) = open();
        assert_eq!(d.lifecycle(), Lifecycle::Online);
        d.begin_drain();
        assert_eq!(d.lifecycle(), Lifecycle::Draining);
        d.close(0);
        assert_eq!(d.lifecycle(), Lifecycle::Closing);
        for now in 0..1000 {
            d.pump(&mut t, now);
            if let Some(o) = d.poll_outcome() {
                assert!(matches!(o, Outcome::ShutdownComplete), "{o:?}");
                break;
            }
            d.handle_timeout(now);
        }
        assert_eq!(d.lifecycle(), Lifecycle::Closed);
        // Giving up after a clean close changes nothing.
        d.abandon();
        assert!(d.lifecycle().is_over());
        assert_eq!(d.lifecycle(), Lifecycle::Closed);
    }
}
