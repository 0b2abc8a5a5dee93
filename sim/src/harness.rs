//! Runs an engine against simulated devices in simulated time.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use writeboost_engine::driver::{CmdMem, Driver, Outcome, Started, Target, UserOp};
use writeboost_engine::{
    Command, CommandKind, Device, DeviceError, Engine, HeapAlloc, IoError, Nanos, OpenError,
    OpenParams, ReqId, Token,
};

use crate::device::{CrashOutcome, SimDevice};
use crate::pmem::SimPmem;
use crate::submitters::{GRANT_SLOTS, MAX_GRANTED_BLOCKS, Publication, Submitters};

/// Command latencies in nanoseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Latency {
    pub cache_read: Nanos,
    pub cache_write: Nanos,
    pub cache_flush: Nanos,
    pub backing_read: Nanos,
    pub backing_write: Nanos,
    pub backing_flush: Nanos,
    /// A pmem persist of 4 KiB (smaller ones cost proportionally, at least 1/16).
    pub pmem_persist_4k: Nanos,
    /// Each latency is drawn uniformly from [l/2, 3l/2] when set.
    pub jitter: bool,
}

struct InFlight {
    cmd: Command,
    /// Payload of a write, taken when the command started.
    data: Option<Vec<u8>>,
    flush_point: u64,
}

/// The simulated devices: commands wait in a queue ordered by their
/// simulated completion time.
struct SimTarget {
    now: Nanos,
    lat: Latency,
    cache_flush_point: u64,
    backing_flush_point: u64,
    queue: BinaryHeap<Reverse<(Nanos, u64, Token)>>,
    inflight: BTreeMap<Token, InFlight>,
    rng: ChaCha8Rng,
    seq: u64,
    /// A QoS limit on the backing device's reads and writes: each waits for
    /// its turn, one every this many ns, in arrival order (0 = no limit).
    backing_gap: Nanos,
    /// When the next backing read or write may start under that limit.
    backing_next: Nanos,
}

impl SimTarget {
    fn latency(&mut self, base: Nanos) -> Nanos {
        if self.lat.jitter && base > 1 {
            self.rng.random_range(base / 2..=base * 3 / 2)
        } else {
            base
        }
    }
}

impl Target for SimTarget {
    fn start(&mut self, cmd: Command, mem: CmdMem<'_>) -> Started {
        if std::env::var_os("WB_TRACE_CMDS").is_some() {
            eprintln!("t={} start {:?}", self.now, cmd);
        }
        let base = match (cmd.device, cmd.kind) {
            (Device::Cache, CommandKind::Read { .. }) => self.lat.cache_read,
            (Device::Cache, CommandKind::Flush) => self.lat.cache_flush,
            (Device::Cache, _) => self.lat.cache_write,
            (Device::Backing, CommandKind::Read { .. }) => self.lat.backing_read,
            (Device::Backing, CommandKind::Flush) => self.lat.backing_flush,
            (Device::Backing, _) => self.lat.backing_write,
        };
        // A write's payload is taken when it starts (the device sees it
        // then); a read's data lands when it completes.
        let data = match mem {
            CmdMem::Src(src) => Some(src.to_vec()),
            _ => None,
        };
        let flush_point = match cmd.device {
            Device::Cache => self.cache_flush_point,
            Device::Backing => self.backing_flush_point,
        };
        let mut start = self.now;
        if cmd.device == Device::Backing
            && self.backing_gap > 0
            && !matches!(cmd.kind, CommandKind::Flush)
        {
            start = start.max(self.backing_next);
            self.backing_next = start + self.backing_gap;
        }
        let at = start + self.latency(base);
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, cmd.token)));
        self.inflight.insert(
            cmd.token,
            InFlight {
                cmd,
                data,
                flush_point,
            },
        );
        Started::InFlight
    }
}

pub struct Harness {
    pub driver: Driver<HeapAlloc, Vec<u8>>,
    target: SimTarget,
    pub cache: SimDevice,
    pub backing: SimDevice,
    /// The pmem pool the engine uses, if any (shared with the engine).
    pub pmem: Option<SimPmem>,
    pub now: Nanos,
    /// Completed user requests with their buffers (a read's data), oldest
    /// first (the caller drains it).
    pub done: Vec<(ReqId, Result<(), IoError>, Vec<u8>)>,
    pub opened: Option<Result<(), OpenError>>,
    pub shut_down: bool,
    /// Probability that a device command fails.
    pub error_rate: f64,
    /// Every write and flush on the cache device fails (a dying SSD).
    pub fail_cache_writes: bool,
    /// Cache reads overlapping these bytes fail (an unreadable spot).
    pub fail_cache_reads_in: Option<std::ops::Range<u64>>,
    /// The next flush on this device fails (and loses what it covered).
    pub fail_next_flush: Option<Device>,
    /// Deadlines handled in a row without time moving (a livelock if large).
    idle_timeouts: u32,
    /// Real time spent in an external pool's stores and persists, charged
    /// to simulated time.
    pool_clock: Option<std::rc::Rc<std::cell::Cell<u64>>>,
    /// Cores that copy writes into granted slots themselves (None: every
    /// write goes to the engine whole).
    pub cores: Option<Submitters>,
    /// Publications the engine refused (each a bug: a granted slot is
    /// always the engine's to take).
    pub refused_publications: u64,
    /// Users' buffers of the writes waiting for their core to publish them.
    copied: BTreeMap<ReqId, Vec<u8>>,
}

impl Harness {
    pub fn new(
        params: OpenParams,
        cache: SimDevice,
        backing: SimDevice,
        lat: Latency,
        seed: u64,
    ) -> Self {
        Self::with_pool(params, cache, backing, None, lat, seed)
    }

    /// An engine with a pmem pool (mode from `params.mode`).
    pub fn with_pool(
        params: OpenParams,
        cache: SimDevice,
        backing: SimDevice,
        pmem: Option<SimPmem>,
        lat: Latency,
        seed: u64,
    ) -> Self {
        let engine = match &pmem {
            Some(p) => {
                p.set_persist_cost(lat.pmem_persist_4k);
                Engine::open_with_pool(params, HeapAlloc, Box::new(p.clone()), 0)
            }
            None => Engine::open(params, HeapAlloc, 0),
        }
        .expect("valid parameters");
        // One stream of randomness for latencies and faults, drawn in
        // command order.
        let rng = ChaCha8Rng::seed_from_u64(seed);
        let mut h = Self {
            driver: Driver::new(engine),
            target: SimTarget {
                now: 0,
                lat,
                cache_flush_point: 0,
                backing_flush_point: 0,
                queue: BinaryHeap::new(),
                inflight: BTreeMap::new(),
                rng,
                seq: 0,
                backing_gap: 0,
                backing_next: 0,
            },
            cache,
            backing,
            pmem,
            now: 0,
            done: Vec::new(),
            opened: None,
            shut_down: false,
            error_rate: 0.0,
            fail_cache_writes: false,
            fail_cache_reads_in: None,
            fail_next_flush: None,
            idle_timeouts: 0,
            pool_clock: None,
            cores: None,
            refused_publications: 0,
            copied: BTreeMap::new(),
        };
        h.drain();
        h
    }

    /// An engine in the params' mode over a real pool; `clock` accumulates
    /// the nanoseconds the pool spends storing and persisting.
    pub fn with_real_pool(
        params: OpenParams,
        cache: SimDevice,
        backing: SimDevice,
        pool: Box<dyn writeboost_engine::pmem::Pmem>,
        clock: std::rc::Rc<std::cell::Cell<u64>>,
        lat: Latency,
        seed: u64,
    ) -> Self {
        // Built around a throw-away engine, then given the real one.
        let mut placeholder = params.clone();
        placeholder.mode = writeboost_engine::config::BufferMode::Volatile;
        let mut h = Self::with_pool(
            placeholder,
            SimDevice::new(0),
            SimDevice::new(0),
            None,
            lat,
            seed,
        );
        h.driver = Driver::new(
            Engine::open_with_pool(params, HeapAlloc, pool, 0).expect("valid parameters"),
        );
        h.cache = cache;
        h.backing = backing;
        h.opened = None;
        h.shut_down = false;
        h.target.queue.clear();
        h.target.inflight.clear();
        h.done.clear();
        h.pool_clock = Some(clock);
        h.drain();
        h
    }

    /// Runs until the engine reports ready or failed; false if it got stuck.
    pub fn wait_open(&mut self) -> bool {
        while self.opened.is_none() {
            if !self.step() {
                return false;
            }
        }
        true
    }

    /// Starts every command the engine emitted and takes its outcomes.
    pub fn drain(&mut self) {
        // Persisting to pmem takes the engine's thread this long.
        if let Some(p) = &self.pmem {
            self.now += p.take_elapsed();
        }
        if let Some(c) = &self.pool_clock {
            self.now += c.take();
        }
        self.target.now = self.now;
        self.target.cache_flush_point = self.cache.flush_point();
        self.target.backing_flush_point = self.backing.flush_point();
        loop {
            self.driver.pump(&mut self.target, self.now);
            while let Some(o) = self.driver.poll_outcome() {
                match o {
                    Outcome::Ready => self.opened = Some(Ok(())),
                    Outcome::OpenFailed(e) => self.opened = Some(Err(e)),
                    Outcome::Completed { req, user, result } => self.done.push((req, result, user)),
                    Outcome::ShutdownComplete => self.shut_down = true,
                }
            }
            if !self.hand_back(false) {
                break;
            }
        }
    }

    /// Cores hand back the slots the engine waits for (some of them, or
    /// with `all` every one). Whether any did.
    fn hand_back(&mut self, all: bool) -> bool {
        let Some(cores) = self.cores.as_mut() else {
            return false;
        };
        let wanted = self.driver.engine().grants_wanted_back();
        if wanted == writeboost_engine::LogId::NONE {
            return false;
        }
        let mut any = false;
        for core in cores.revoked(wanted, all) {
            if let Some((log, first, count)) = cores.release(core) {
                self.driver
                    .engine_mut()
                    .return_grant(log, first, count, self.now);
            }
            any = true;
        }
        any
    }

    /// Submits a write: a write of whole blocks goes through a core's grant
    /// when the model has cores and one can be had (copied now, published
    /// by its core later); any other goes to the engine whole.
    pub fn submit_write(
        &mut self,
        req: ReqId,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> Result<(), (writeboost_engine::SubmitError, Vec<u8>)> {
        let blocks = data.len() as u32 / 4096;
        let whole = offset.is_multiple_of(4096)
            && data.len().is_multiple_of(4096)
            && (1..=MAX_GRANTED_BLOCKS).contains(&blocks);
        let now = self.now;
        let taken = match self.cores.as_mut() {
            Some(cores) if whole => {
                let core = cores.pick();
                let mut taken = cores.take(core, blocks);
                if taken.is_none() {
                    let engine = self.driver.engine_mut();
                    if let Some((log, first, count)) = cores.release(core) {
                        engine.return_grant(log, first, count, now);
                    }
                    if let Some(g) = engine.grant(GRANT_SLOTS, now) {
                        cores.hold(core, g);
                        taken = cores.take(core, blocks);
                    }
                }
                taken
            }
            _ => None,
        };
        let Some((g, first_slot)) = taken else {
            return self
                .driver
                .submit(req, UserOp::Write { offset, fua }, data, now);
        };
        // The core's copy and checksums, into slots nobody else touches.
        let at = g.offset + (first_slot - g.first_slot) as usize * 4096;
        self.driver.engine_mut().buffer_mut(g.buf)[at..at + data.len()].copy_from_slice(&data);
        let crcs = data.chunks(4096).map(crc32c::crc32c).collect();
        let cores = self.cores.as_mut().expect("cores");
        cores.queue(
            now,
            Publication {
                req,
                offset,
                log: g.log,
                first_slot,
                crcs,
                fua,
            },
        );
        self.copied.insert(req, data);
        self.drain();
        Ok(())
    }

    /// The next core's publication reaches the engine.
    fn publish_next(&mut self) {
        let Some((at, p)) = self.cores.as_mut().and_then(Submitters::pop) else {
            return;
        };
        self.now = self.now.max(at);
        let user = self.copied.remove(&p.req).expect("copied write");
        let n = p.crcs.len() as u32;
        if let Err((e, user)) = self.driver.submit_granted(
            p.req,
            p.offset,
            p.log,
            p.first_slot,
            &p.crcs,
            p.fua,
            user,
            self.now,
        ) {
            if !matches!(e, writeboost_engine::SubmitError::ShuttingDown) {
                self.refused_publications += 1;
            }
            self.driver
                .engine_mut()
                .return_grant(p.log, p.first_slot, n, self.now);
            self.done.push((p.req, Err(IoError::ReadOnly), user));
        }
        self.drain();
    }

    pub fn engine(&self) -> &Engine<HeapAlloc> {
        self.driver.engine()
    }

    /// Limits the backing device's reads and writes to `iops` per second,
    /// served in arrival order, as SPDK's `bdev_set_qos_limit` does.
    pub fn limit_backing_iops(&mut self, iops: u64) {
        self.target.backing_gap = 1_000_000_000 / iops.max(1);
    }

    /// Advances to the next completion or engine deadline. False if nothing is pending.
    /// Also false if the engine keeps asking for a deadline it does not act on.
    pub fn step(&mut self) -> bool {
        let next_io = self.target.queue.peek().map(|Reverse((t, _, _))| *t);
        let timeout = self.driver.engine().poll_timeout();
        if let Some(p) = self.cores.as_ref().and_then(Submitters::next_due)
            && next_io.is_none_or(|t| p <= t)
            && timeout.is_none_or(|d| p <= d)
        {
            self.publish_next();
            return true;
        }
        if next_io.is_none() && timeout.is_none() && self.hand_back(true) {
            // Idle cores hand their slots back once nothing else is going on.
            self.drain();
            return true;
        }
        match (next_io, timeout) {
            (None, None) => false,
            (Some(t), Some(d)) if d < t => self.timeout(d),
            (None, Some(d)) => self.timeout(d),
            (Some(t), _) => {
                let Reverse((_, _, token)) = self.target.queue.pop().expect("queued");
                self.now = self.now.max(t);
                self.complete(token);
                true
            }
        }
    }

    fn timeout(&mut self, at: Nanos) -> bool {
        if at <= self.now {
            self.idle_timeouts += 1;
            if self.idle_timeouts > 1000 {
                return false;
            }
        } else {
            self.idle_timeouts = 0;
        }
        self.now = self.now.max(at);
        self.driver.handle_timeout(self.now);
        self.drain();
        true
    }

    fn complete(&mut self, token: Token) {
        let f = self.target.inflight.remove(&token).expect("in flight");
        if std::env::var_os("WB_TRACE_CMDS").is_some() {
            eprintln!("t={} done {:?}", self.now, f.cmd.token);
        }
        let rng = &mut self.target.rng;
        let targeted = match f.cmd.kind {
            CommandKind::Read { offset, len, .. } => {
                f.cmd.device == Device::Cache
                    && self
                        .fail_cache_reads_in
                        .as_ref()
                        .is_some_and(|r| offset < r.end && r.start < offset + len as u64)
            }
            CommandKind::Flush => self
                .fail_next_flush
                .take_if(|d| *d == f.cmd.device)
                .is_some(),
            _ => false,
        };
        let fail = (self.error_rate > 0.0 && rng.random_bool(self.error_rate))
            || targeted
            || (self.fail_cache_writes
                && f.cmd.device == Device::Cache
                && !matches!(f.cmd.kind, CommandKind::Read { .. }));
        if let Ok(v) = std::env::var("WB_TRACE_BACKING_BYTE") {
            let at: u64 = v.parse().unwrap_or(0);
            let hit = match f.cmd.kind {
                CommandKind::Write { offset, len, .. } => {
                    (offset..offset + len as u64).contains(&at)
                }
                CommandKind::WriteZeroes { offset, len } | CommandKind::Discard { offset, len } => {
                    (offset..offset + len).contains(&at)
                }
                CommandKind::Flush => true,
                _ => false,
            };
            if hit && f.cmd.device == Device::Backing {
                eprintln!("t={} backing {:?} fail={fail}", self.now, f.cmd.kind);
            }
        }
        let dev = match f.cmd.device {
            Device::Cache => &mut self.cache,
            Device::Backing => &mut self.backing,
        };
        match f.cmd.kind {
            CommandKind::Write { offset, .. } => {
                let data = f.data.expect("write payload");
                if fail {
                    dev.write_some(offset, &data, rng)
                } else {
                    dev.write(offset, &data)
                }
            }
            CommandKind::WriteZeroes { offset, len } | CommandKind::Discard { offset, len }
                if !fail =>
            {
                dev.write_zeroes(offset, len)
            }
            CommandKind::Flush if !fail => dev.flush(f.flush_point),
            CommandKind::Flush => dev.fail_flush(f.flush_point),
            CommandKind::Read { offset, .. } if !fail => {
                let dst = self.driver.read_dst(&f.cmd).expect("read destination");
                dev.read(offset, dst)
            }
            _ => {}
        }
        let result = if fail { Err(DeviceError::Io) } else { Ok(()) };
        self.driver.complete(token, result, self.now);
        self.drain();
    }

    /// Device images after a power loss now, each sector torn on its own.
    pub fn crash(self, rng: &mut impl Rng) -> (Vec<u8>, Vec<u8>) {
        self.crash_as(CrashOutcome::TornSectors, rng)
    }

    /// Device images after a power loss now, as `outcome` keeps unflushed writes.
    pub fn crash_as(self, outcome: CrashOutcome, rng: &mut impl Rng) -> (Vec<u8>, Vec<u8>) {
        let mut cache_w = Vec::new();
        let mut backing_w = Vec::new();
        for f in self.target.inflight.values() {
            if let (CommandKind::Write { offset, .. }, Some(d)) = (f.cmd.kind, &f.data) {
                match f.cmd.device {
                    Device::Cache => cache_w.push((offset, d.clone())),
                    Device::Backing => backing_w.push((offset, d.clone())),
                }
            }
        }
        (
            self.cache.crash_as(outcome, &cache_w, rng),
            self.backing.crash_as(outcome, &backing_w, rng),
        )
    }

    pub fn commands_in_flight(&self) -> usize {
        self.target.inflight.len()
    }
}

impl Harness {
    /// Submits a write and runs until it completes.
    pub fn write(&mut self, req: u64, offset: u64, data: &[u8], fua: bool) -> Result<(), IoError> {
        let req = ReqId(req);
        self.driver
            .submit(req, UserOp::Write { offset, fua }, data.to_vec(), self.now)
            .map_err(|(e, _)| e)
            .expect("valid write");
        self.wait(req).0
    }

    /// Reads and runs until done.
    pub fn read(&mut self, req: u64, offset: u64, len: usize) -> Result<Vec<u8>, IoError> {
        let req = ReqId(req);
        self.driver
            .submit(
                req,
                UserOp::Read {
                    offset,
                    len: len as u64,
                },
                vec![0; len],
                self.now,
            )
            .map_err(|(e, _)| e)
            .expect("valid read");
        let (result, buf) = self.wait(req);
        result.map(|()| buf)
    }

    pub fn flush(&mut self, req: u64) -> Result<(), IoError> {
        let req = ReqId(req);
        self.driver
            .submit(req, UserOp::Flush, Vec::new(), self.now)
            .map_err(|(e, _)| e)
            .expect("valid flush");
        self.wait(req).0
    }

    /// Runs until request `req` completes (panics if the engine gets stuck);
    /// its result and buffer.
    pub fn wait(&mut self, req: ReqId) -> (Result<(), IoError>, Vec<u8>) {
        self.drain();
        loop {
            if let Some(i) = self.done.iter().position(|(r, _, _)| *r == req) {
                let (_, result, buf) = self.done.remove(i);
                return (result, buf);
            }
            assert!(self.step(), "engine stuck waiting for {req:?}");
        }
    }

    /// Runs until no command is in flight and no deadline is within `horizon` ns.
    pub fn settle(&mut self, horizon: Nanos) {
        self.drain();
        let end = self.now + horizon;
        while self.commands_in_flight() > 0
            || self
                .driver
                .engine()
                .poll_timeout()
                .is_some_and(|t| t <= end)
        {
            if !self.step() {
                break;
            }
        }
    }
}
