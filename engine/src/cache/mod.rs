//! The cache state machine.
//!
//! State lives in components that each own theirs and check their own
//! invariants where it changes:
//!
//! - [`Index`](index): block → cached copy (flat arrays sized by the cache),
//!   and the dirty count;
//! - [`Ring`](ring): log positions, ids, the epoch, the writeback frontier,
//!   read holds;
//! - [`Durability`](durability): unflushed logs, the durable frontier, its
//!   waiters and the barrier deadline;
//! - [`Records`](records): superblock records;
//! - [`InFlight`](inflight): device commands, tokens and retries;
//! - [`Writeback`](writeback): the batches in flight, their window of
//!   backing writes, the measured cost per block, and the retry;
//! - [`Cleaner`](clean): where in the ring the cleaner is, and how often
//!   each cached copy was moved;
//! - [`Admission`](admission): the blocks lately written around the cache;
//! - [`PmemBuffer`](pmem_buffer): the pmem pool, so mode 1 is one place;
//! - [`Scrub`](scrub): checks the data of logs resumed without reading it,
//!   before anything uses it, and keeps the blocks found damaged
//!   (quarantined) and the rewrites of them not durable yet.
//!
//! The stages coordinate them, each in its own file as an `impl` block of
//! [`Engine`]:
//!
//! - `startup`: format or recover (superblock, record, log headers, pool slots);
//! - `checkpoint`: the index and ring written at a clean shutdown, and loaded
//!   instead of the logs at the next start;
//! - `write`: user writes into the open buffer, fills, bypass to the backing device;
//! - `grant`: slots reserved for submitters that copy a write in themselves;
//! - `read`: user reads (buffer, cache device, backing), read caching;
//! - `commit`: sealing buffers into logs, flushes, records;
//! - `writeback`: migrating dirty blocks to the backing device;
//! - `admission`: which writes go around the cache when room is short;
//! - `clean`: freeing ring positions by copying a log's few live dirty
//!   blocks forward in the cache, when that is cheaper than writeback;
//! - `quarantine`: what a damaged block still allows (nothing of itself,
//!   everything else).
//!
//! Every public input runs [`Engine::pump`] before returning, so the engine is
//! always at a fixed point: whatever can make progress has been issued.

mod admission;
mod checkpoint;
mod clean;
mod commit;
mod durability;
mod grant;
mod index;
mod inflight;
mod pmem_buffer;
mod quarantine;
mod read;
mod records;
mod ring;
mod scrub;
mod startup;
mod write;
mod writeback;

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use crate::config::{BufferMode, OpenParams, Tunables};
use crate::error::{ConfigError, DeviceError, IoError, SubmitError};
use crate::format::Superblock;
use crate::geometry::{BLOCK_SIZE, Geometry, SECTOR_SIZE};
use crate::ids::LogId;
use crate::io::{
    BufAlloc, BufId, Command, CommandKind, DataRef, Device, Event, Nanos, ReqId, Token,
};
use crate::mutant::Mutant;
use crate::pmem::Pmem;
use crate::stats::{Op, Stats, Status};

use self::admission::Admission;
use self::clean::Cleaner;
use self::durability::Durability;
pub use self::grant::Grant;
use self::index::{CacheSlot, Cached, Dirty, Index};
use self::inflight::{Ended, InFlight};
use self::pmem_buffer::PmemBuffer;
use self::records::Records;
use self::ring::Ring;
use self::scrub::Scrub;
use self::startup::Startup;
use self::writeback::Writeback;

/// Delay before a failed writeback batch is tried again.
const WRITEBACK_RETRY_NS: Nanos = 1_000_000_000;
/// Queue depth at which the backing device counts as 100 % loaded.
const BACKING_NOMINAL_QD: u64 = 32;

/// Where the newest copy of a cached block lives: the index's [`Cached`]
/// with its slot named as a log and a slot in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    /// Log id holding the block.
    id: LogId,
    /// Data slot within that log.
    slot: u32,
    /// Sectors the cache holds for this block.
    valid: u8,
    /// Sectors not yet on the backing device.
    dirty: u8,
    /// The log's metablock marks the block dirty, so recovery would replay it.
    logged_dirty: bool,
}

/// A slot of the open log.
#[derive(Clone, Copy, Debug)]
struct Slot {
    block: u64,
    valid: u8,
    dirty: bool,
    /// Sectors still to be copied in from an older copy on the cache device.
    fill: u8,
    /// CRC-32C of the slot's data, once final: publishing to pmem computes it
    /// and sealing reuses it; `None` is computed at the seal.
    crc: Option<u32>,
}

/// The buffer currently taking writes.
#[derive(Debug)]
struct OpenLog {
    id: LogId,
    buf: BufId,
    slots: Vec<Slot>,
    /// Slots waiting for a fill read.
    fills_pending: u32,
    /// Slots granted to a submitter and not yet published or returned.
    reserved: u32,
    /// Holds data a user write put there (a clean-only log needs no barrier).
    has_dirty: bool,
    seal_requested: bool,
    opened_at: Nanos,
    /// The pmem slot mirroring this buffer (mode 1).
    pslot: Option<u32>,
    /// Slots the cleaner copied in (no user waits for those).
    relocated: u32,
}

/// Log ids a read holds, kept inline for the common case.
type Holds = smallvec::SmallVec<[LogId; 2]>;

/// A user request that is not complete yet.
#[derive(Debug, Default)]
struct UserReq {
    /// Device commands (or other parts) still outstanding.
    parts: u32,
    error: Option<IoError>,
    /// The request completes only when every log up to this id is durable.
    wait_log: LogId,
    /// The request needs a backing-device flush after its parts end.
    needs_backing_flush: bool,
    /// Log ids whose positions this request reads (released on completion);
    /// inline, as a read rarely spans more than two logs.
    holds: Holds,
    /// Counts toward the backing device's observed load.
    backing_load: u32,
    /// For the latency histograms.
    op: Op,
    started: Nanos,
}

/// What an issued device command is for.
#[derive(Debug)]
enum Purpose {
    Startup(startup::StartIo),
    LogWrite {
        id: LogId,
    },
    CacheFlush,
    BackingFlush,
    RecordWrite,
    /// A user request's own read or write.
    User {
        req: ReqId,
        backing: bool,
    },
    /// Old sectors for a slot of the open log.
    Fill {
        id: LogId,
        slot: u32,
        src_id: LogId,
        buf: BufId,
    },
    /// A missed read staged into the cache.
    Stage(read::Stage),
    WbRead {
        id: LogId,
    },
    /// A writeback write, and when it was issued (for its cost).
    WbWrite {
        issued: Nanos,
    },
    /// A log read whole for the scrub.
    Scrub {
        id: LogId,
    },
    /// A piece of the shutdown checkpoint, and the flush after it.
    CheckpointWrite {
        buf: BufId,
    },
    CheckpointFlush,
}

/// A write waiting for buffer space.
#[derive(Debug)]
struct StalledWrite {
    req: ReqId,
    offset: u64,
    /// None: zeroes.
    data: Option<Vec<u8>>,
    len: u64,
    fua: bool,
    /// When it stalled (for `throttled_ns`).
    since: Nanos,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Running,
    ShuttingDown,
    Stopped,
    Failed,
}

/// The sans-IO write-back cache. See the crate documentation for the loop a
/// host runs around it.
pub struct Engine<A: BufAlloc> {
    alloc: A,
    bufs: Vec<Option<A::Buf>>,
    free_buf_slots: Vec<u32>,
    /// Buffers to free once the host has drained the events naming them.
    deferred_free: Vec<BufId>,

    params: OpenParams,
    tunables: Tunables,
    sb: Option<Superblock>,
    geo: Geometry,
    phase: Phase,
    startup: Option<Startup>,
    read_only: bool,
    now: Nanos,

    inflight: InFlight<Purpose>,
    events: VecDeque<Event>,
    reqs: FxHashMap<ReqId, UserReq>,

    index: Index,
    ring: Ring,

    open: Option<OpenLog>,
    /// Logs taken out of `open` that still wait for fill reads before sealing.
    sealing: Vec<OpenLog>,
    free_log_bufs: Vec<BufId>,
    durability: Durability,
    backing_flush_waiting: Vec<commit::BackingWaiter>,
    /// Waiters of the backing flush in flight, and the write generation it covers.
    backing_flush_inflight: Option<(Vec<commit::BackingWaiter>, u64)>,
    /// Counts completed bypass writes (and discards) on the backing device.
    backing_write_gen: u64,
    /// Generation covered by the last completed backing flush.
    backing_flushed_gen: u64,
    /// A backing flush failed while bypass writes waited for it: they may be
    /// gone, so no later flush may report success (see [`IoError::BackingWritesLost`]).
    backing_writes_lost: bool,
    stalled: VecDeque<StalledWrite>,

    records: Records,
    writeback: Writeback,
    cleaner: Cleaner,
    admission: Admission,
    scrub: Scrub,
    /// The checkpoint a clean shutdown writes.
    save: checkpoint::Save,
    backing_load: u64,
    /// Bumped whenever the backing device is written outside writeback, so a
    /// staging read that raced with it is not cached.
    bypass_seq: u64,
    backing_bypass_inflight: u32,

    /// Read caching: next block a sequential reader would ask for, and the run length.
    seq_next_block: u64,
    seq_run: u64,
    /// Reads waiting for a fill to land.
    deferred_reads: Vec<(ReqId, u64, u64)>,
    /// Scratch list of the commands a read is split into.
    read_cmds: Vec<(Command, Purpose)>,

    /// The pmem pool: mode 1's write buffer, or a pool to drain.
    pmem: PmemBuffer,
    /// Logs recovered from the pool, written to the cache device once ready.
    recovered: Vec<OpenLog>,

    stats: Stats,
    /// What the request being submitted does (for its latency histogram).
    op: Op,
    wb_rate: crate::stats::WritebackRate,
    /// A planted bug (feature `mutants`), or none.
    mutant: Mutant,
}

impl<A: BufAlloc> Engine<A> {
    /// Starts opening a cache: the engine emits the reads it needs and later
    /// reports [`Event::Ready`] or [`Event::OpenFailed`]. Parameters are
    /// checked here, before any I/O.
    pub fn open(params: OpenParams, alloc: A, now: Nanos) -> Result<Self, ConfigError> {
        if params.mode == BufferMode::Persistent {
            return Err(ConfigError::PoolRequired);
        }
        Self::open_inner(params, alloc, None, now)
    }

    /// Like [`Engine::open`], with a pmem pool. In mode 1 the pool is the
    /// write buffer; in mode 0 whatever it still holds is recovered and
    /// written to the cache device, after which it is no longer used.
    pub fn open_with_pool(
        params: OpenParams,
        alloc: A,
        pool: Box<dyn Pmem>,
        now: Nanos,
    ) -> Result<Self, ConfigError> {
        Self::open_inner(params, alloc, Some(pool), now)
    }

    fn open_inner(
        params: OpenParams,
        alloc: A,
        pmem: Option<Box<dyn Pmem>>,
        now: Nanos,
    ) -> Result<Self, ConfigError> {
        params.validate()?;
        let persistent = params.mode == BufferMode::Persistent;
        let tunables = params.tunables;
        let mut e = Self {
            alloc,
            bufs: Vec::new(),
            free_buf_slots: Vec::new(),
            deferred_free: Vec::new(),
            params,
            tunables,
            sb: None,
            geo: Geometry {
                segment_size: 0,
                header_blocks: 0,
                data_blocks: 0,
                nr_segments: 0,
                backing_size: 0,
            },
            phase: Phase::Starting,
            startup: None,
            read_only: false,
            now,
            inflight: InFlight::default(),
            events: VecDeque::new(),
            reqs: FxHashMap::default(),
            index: Index::default(),
            ring: Ring::default(),
            open: None,
            sealing: Vec::new(),
            free_log_bufs: Vec::new(),
            durability: Durability::default(),
            backing_flush_waiting: Vec::new(),
            backing_flush_inflight: None,
            backing_write_gen: 0,
            backing_flushed_gen: 0,
            backing_writes_lost: false,
            stalled: VecDeque::new(),
            records: Records::new(now),
            writeback: Writeback::default(),
            cleaner: Cleaner::default(),
            admission: Admission::default(),
            scrub: Scrub::default(),
            save: checkpoint::Save::default(),
            backing_load: 0,
            bypass_seq: 0,
            backing_bypass_inflight: 0,
            seq_next_block: u64::MAX,
            seq_run: 0,
            deferred_reads: Vec::new(),
            read_cmds: Vec::new(),
            pmem: PmemBuffer::new(pmem, persistent),
            recovered: Vec::new(),
            stats: Stats::default(),
            op: Op::Read,
            wb_rate: Default::default(),
            mutant: Mutant::None,
        };
        e.start();
        Ok(e)
    }

    // ----- host interface -------------------------------------------------

    /// Next device command to run, if any.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.inflight.poll()
    }

    /// Next event for the host, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Engine::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        if self.phase != Phase::Running && self.phase != Phase::ShuttingDown {
            return None;
        }
        // Only deadlines whose handler can act now: a deadline left in the
        // past with nothing to do would spin the host.
        [
            self.durability.barrier_deadline(),
            self.sync_deadline(),
            self.record_deadline(),
            self.writeback.retry_at(),
            self.writeback_delay_deadline(),
            self.scrub.retry_at(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// When the open buffer is written as a log for `sync_data_interval`.
    fn sync_deadline(&self) -> Option<Nanos> {
        let o = self.open.as_ref()?;
        (self.tunables.sync_data_interval > 0
            && !o.slots.is_empty()
            && !o.seal_requested
            && !self.read_only
            // In mode 1 the open buffer is persistent already.
            && !self.pmem.acks_writes())
        .then(|| o.opened_at + self.tunables.sync_data_interval as u64 * 1_000_000_000)
    }

    /// When the superblock record is next due under `update_sb_record_interval`.
    fn record_deadline(&self) -> Option<Nanos> {
        if self.read_only {
            return None;
        }
        self.records
            .deadline(self.tunables.update_sb_record_interval, self.ring.last_wb())
    }

    /// Tells the engine the time has come (or passed) for a deadline.
    pub fn handle_timeout(&mut self, now: Nanos) {
        self.enter(now);
        if self.durability.take_barrier_due(now) {
            self.request_seal();
        }
        if self.sync_deadline().is_some_and(|d| d <= now) {
            self.request_seal();
        }
        if self.record_deadline().is_some_and(|d| d <= now) {
            self.records.want();
        }
        self.writeback.retry_if_due(now);
        self.scrub.retry_if_due(now);
        self.pump();
    }

    /// Reports the end of a device command.
    pub fn handle_completion(&mut self, token: Token, result: Result<(), DeviceError>, now: Nanos) {
        self.enter(now);
        let (cmd, purpose, ok) = match self.inflight.complete(token, result) {
            Ended::Unknown => return,
            Ended::Retried => {
                self.stats.io_retries += 1;
                return;
            }
            Ended::Done { cmd, purpose, ok } => (cmd, purpose, ok),
        };
        match purpose {
            Purpose::Startup(io) => self.startup_done(io, ok),
            Purpose::LogWrite { id } => self.log_written(id, ok),
            Purpose::CacheFlush => self.cache_flush_done(ok),
            Purpose::BackingFlush => self.backing_flush_done(ok),
            Purpose::RecordWrite => self.record_written(ok),
            Purpose::User { req, backing } => self.user_io_done(req, backing, cmd, ok),
            Purpose::Fill {
                id,
                slot,
                src_id,
                buf,
            } => self.fill_done(id, slot, src_id, buf, ok),
            Purpose::Stage(s) => self.stage_done(s, ok),
            Purpose::WbRead { id } => self.wb_read_done(id, ok),
            Purpose::WbWrite { issued } => self.wb_write_done(issued, ok),
            Purpose::Scrub { id } => self.scrub_done(id, ok),
            Purpose::CheckpointWrite { buf } => self.checkpoint_written(buf, ok),
            Purpose::CheckpointFlush => self.checkpoint_flushed(ok),
        }
        self.pump();
    }

    /// Bytes of an engine buffer, for the host to read from or DMA into.
    pub fn buffer(&self, id: BufId) -> &[u8] {
        self.bufs[id.0 as usize]
            .as_ref()
            .map(|b| b.as_ref())
            .unwrap_or(&[])
    }

    /// Mutable bytes of an engine buffer (the destination of a device read).
    pub fn buffer_mut(&mut self, id: BufId) -> &mut [u8] {
        match self.bufs[id.0 as usize].as_mut() {
            Some(b) => b.as_mut(),
            None => &mut [],
        }
    }

    /// The host's handle on an engine buffer (for example to find its DMA address).
    pub fn buffer_handle(&mut self, id: BufId) -> Option<&mut A::Buf> {
        self.bufs.get_mut(id.0 as usize).and_then(|b| b.as_mut())
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn clear_stats(&mut self) {
        self.stats = Stats::default();
    }

    pub fn tunables(&self) -> &Tunables {
        &self.tunables
    }

    /// Geometry of the open cache (zeroes until start-up has read the superblock).
    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Running
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Replaces the tunables at runtime (start from [`tunables`](Self::tunables)
    /// and change fields); refused, changing nothing, if any is out of range.
    pub fn set_options(&mut self, tunables: Tunables, now: Nanos) -> Result<(), ConfigError> {
        tunables.validate()?;
        self.enter(now);
        self.tunables = tunables;
        self.pump();
        Ok(())
    }

    /// Starts writing back every dirty block; progress shows as a falling
    /// dirty count. Stops by itself when nothing is dirty.
    pub fn drop_caches(&mut self, now: Nanos) {
        self.enter(now);
        if self.phase == Phase::Running {
            self.writeback.set_drop_caches(true);
            self.request_seal();
        }
        self.pump();
    }

    /// Clean shutdown: no new I/O; the open buffer becomes a log, every log is
    /// made durable and the superblock record written. Ends with
    /// [`Event::ShutdownComplete`].
    pub fn shutdown(&mut self, now: Nanos) {
        self.enter(now);
        match self.phase {
            Phase::Running => {
                self.phase = Phase::ShuttingDown;
                self.fail_stalled(IoError::ReadOnly);
                // In mode 1 a partial buffer stays in pmem: no partial log.
                if !self.pmem.acks_writes() {
                    self.request_seal();
                }
                self.records.want();
                // Bypass writes were acknowledged before they were durable.
                self.backing_flush_waiting
                    .push(commit::BackingWaiter::Shutdown);
            }
            Phase::Starting | Phase::Failed => {
                self.phase = Phase::Stopped;
                self.events.push_back(Event::ShutdownComplete);
            }
            _ => {}
        }
        self.pump();
    }

    pub fn status(&self) -> Status {
        Status {
            next_segment_id: self.ring.next_id().get(),
            cursor: if self.geo.nr_segments > 0 {
                self.geo.position(self.ring.next_id())
            } else {
                0
            },
            nr_segments: self.geo.nr_segments,
            segment_size: self.geo.segment_size,
            data_blocks_per_segment: self.geo.data_blocks,
            current_id: self.open.as_ref().map_or(0, |o| o.id.get()),
            last_flushed_id: self.durability.frontier().get(),
            last_writeback_id: self.ring.last_wb().get(),
            recorded_writeback_id: self.records.current().last_writeback_id,
            nr_dirty_blocks: self.index.nr_dirty(),
            dirty_pct: (self.index.nr_dirty() * 100
                / (self.geo.nr_segments * self.geo.data_blocks as u64).max(1))
                as u32,
            writeback_blocks_per_s: self.wb_rate.per_s.0,
            writeback_ios_per_s: self.wb_rate.per_s.1,
            nr_cached_blocks: self.index.len(),
            index_bytes: self.index.bytes(),
            unchecked_logs: self.scrub.nr_unchecked(),
            corrupt_blocks: self.scrub.nr_corrupt(),
            nr_free_buffers: self.free_log_bufs.len() as u32,
            stalled_writes: self.stalled.len() as u32,
            read_only: self.read_only,
            backing_writes_lost: self.backing_writes_lost,
            drop_caches_active: self.writeback.drop_caches_active(),
            writeback_active: self.writeback.is_active(),
            epoch: self.ring.epoch().get(),
            cache_uuid: self.records.current().cache_uuid,
        }
    }

    /// Checks the engine's internal bookkeeping (for the simulator and tests):
    /// the index, the per-segment metadata and the dirty counts agree.
    #[cfg(feature = "test-hooks")]
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.phase != Phase::Running {
            return Ok(());
        }
        let mut dirty = 0u64;
        let mut live = vec![0u32; self.ring.nr_segments() as usize];
        for (block, c) in self.index.iter() {
            let e = self.entry_of(c);
            let pos = self.geo.position(e.id) as usize;
            let seg = self.ring.seg(e.id);
            if e.id == LogId::NONE || self.cache_slot(e.id, e.slot) != c.at {
                return Err(format!(
                    "block {block}: slot {:?} is at no log's position",
                    c.at
                ));
            }
            if e.slot >= seg.nr_slots {
                return Err(format!(
                    "block {block}: slot {} of log {} holds only {}",
                    e.slot, e.id, seg.nr_slots
                ));
            }
            if self.index.get(block) != Some(c) {
                return Err(format!("block {block}: the table does not find it"));
            }
            if e.dirty & !e.valid != 0 {
                return Err(format!("block {block}: dirty sectors not valid"));
            }
            if e.dirty != 0 {
                dirty += 1;
                live[pos] += 1;
            }
        }
        if dirty != self.index.nr_dirty() {
            return Err(format!(
                "nr_dirty {} but {dirty} dirty entries",
                self.index.nr_dirty()
            ));
        }
        for (pos, seg) in self.ring.iter().enumerate() {
            if seg.live_dirty != live[pos] {
                let blocks: Vec<(u64, u8, bool)> = self
                    .index
                    .iter()
                    .filter(|(_, c)| {
                        (c.at.0 / self.geo.data_blocks) as usize == pos && c.dirty != 0
                    })
                    .map(|(b, c)| (b, c.dirty, self.scrub.is_corrupt(b)))
                    .collect();
                return Err(format!(
                    "log {} live_dirty {} but {} dirty entries {blocks:?}",
                    seg.id, seg.live_dirty, live[pos]
                ));
            }
        }
        Ok(())
    }

    /// Plants a bug on purpose (see [`Mutant`]); for tests that show the
    /// simulator catches it. Call right after opening.
    #[cfg(feature = "mutants")]
    pub fn plant(&mut self, m: Mutant) {
        self.mutant = m;
        self.pmem.plant(m);
        self.inflight.retry_flushes = m == Mutant::FlushRetried;
    }

    /// Internal queues, for diagnosing a stalled engine.
    #[cfg(feature = "test-hooks")]
    pub fn debug_state(&self) -> String {
        format!(
            "sealing {:?} {} deferred_reads {:?} reqs {:?} stalled {} record {:?} backing_flush {:?}/{} inflight {}",
            self.sealing
                .iter()
                .map(|o| (o.id, o.fills_pending, o.slots.len()))
                .collect::<Vec<_>>(),
            self.durability.describe(),
            self.deferred_reads,
            self.reqs
                .iter()
                .map(|(r, u)| (r.0, u.parts, u.wait_log, u.needs_backing_flush))
                .collect::<Vec<_>>(),
            self.stalled.len(),
            self.records.describe(),
            self.backing_flush_inflight.as_ref().map(|f| f.0.len()),
            self.backing_flush_waiting.len(),
            self.inflight.len(),
        )
    }

    /// Where the cache holds `block` (for diagnostics).
    #[cfg(feature = "test-hooks")]
    pub fn describe_block(&self, block: u64) -> String {
        match self.entry(block) {
            None => "not cached".into(),
            Some(e) => format!(
                "log {} slot {} valid {:08b} dirty {:08b} logged_dirty {} in_ram {}",
                e.id,
                e.slot,
                e.valid,
                e.dirty,
                e.logged_dirty,
                self.ring.seg(e.id).buf.is_some()
            ),
        }
    }

    // ----- shared plumbing ------------------------------------------------

    /// Common prologue of every input: time, and buffers the host is done with.
    fn enter(&mut self, now: Nanos) {
        self.now = self.now.max(now);
        self.wb_rate.tick(self.now, &self.stats);
        for id in std::mem::take(&mut self.deferred_free) {
            self.release_buf(id);
        }
    }

    fn check_submit(&self, req: ReqId, offset: u64, len: u64) -> Result<(), SubmitError> {
        match self.phase {
            Phase::Running => {}
            Phase::Starting => return Err(SubmitError::NotReady),
            _ => return Err(SubmitError::ShuttingDown),
        }
        let align = self.params.backing_block_size as u64;
        if len == 0
            || !offset.is_multiple_of(align)
            || !len.is_multiple_of(align)
            || offset
                .checked_add(len)
                .is_none_or(|end| end > self.geo.backing_size)
        {
            return Err(SubmitError::BadRange { offset, len });
        }
        if self.reqs.contains_key(&req) {
            return Err(SubmitError::DuplicateRequest(req.0));
        }
        Ok(())
    }

    fn alloc_buf(&mut self, len: usize) -> BufId {
        let b = self.alloc.alloc(len);
        match self.free_buf_slots.pop() {
            Some(i) => {
                self.bufs[i as usize] = Some(b);
                BufId(i)
            }
            None => {
                self.bufs.push(Some(b));
                BufId(self.bufs.len() as u32 - 1)
            }
        }
    }

    fn release_buf(&mut self, id: BufId) {
        self.bufs[id.0 as usize] = None;
        self.free_buf_slots.push(id.0);
    }

    fn buf_mut(&mut self, id: BufId) -> &mut [u8] {
        self.bufs[id.0 as usize]
            .as_mut()
            .expect("live engine buffer")
            .as_mut()
    }

    fn buf(&self, id: BufId) -> &[u8] {
        self.bufs[id.0 as usize]
            .as_ref()
            .expect("live engine buffer")
            .as_ref()
    }

    fn issue(&mut self, device: Device, kind: CommandKind, purpose: Purpose) -> Token {
        match (device, &kind) {
            (Device::Cache, CommandKind::Write { len, .. }) => {
                self.stats.cache_write_cmds += 1;
                self.stats.cache_write_bytes += *len as u64;
            }
            (Device::Cache, CommandKind::Read { len, .. }) => {
                self.stats.cache_read_cmds += 1;
                self.stats.cache_read_bytes += *len as u64;
            }
            (Device::Cache, CommandKind::Flush) => self.stats.cache_flush_cmds += 1,
            (Device::Backing, CommandKind::Write { len, .. }) => {
                self.stats.backing_write_cmds += 1;
                self.stats.backing_write_bytes += *len as u64;
            }
            (Device::Backing, CommandKind::WriteZeroes { len, .. }) => {
                self.stats.backing_write_cmds += 1;
                self.stats.backing_write_bytes += *len;
            }
            (Device::Backing, CommandKind::Read { len, .. }) => {
                self.stats.backing_read_cmds += 1;
                self.stats.backing_read_bytes += *len as u64;
            }
            (Device::Backing, CommandKind::Flush) => self.stats.backing_flush_cmds += 1,
            _ => {}
        }
        self.inflight.issue(device, kind, purpose)
    }

    /// Registers a user request that will complete asynchronously.
    fn track(&mut self, req: ReqId) -> &mut UserReq {
        let (op, started) = (self.op, self.now);
        self.reqs.entry(req).or_insert_with(|| UserReq {
            op,
            started,
            ..UserReq::default()
        })
    }

    /// One part of a user request ended.
    fn part_done(&mut self, req: ReqId, result: Result<(), IoError>) {
        if let Some(r) = self.reqs.get_mut(&req) {
            r.parts = r.parts.saturating_sub(1);
            if let Err(e) = result {
                r.error.get_or_insert(e);
            }
        }
        self.try_finish(req);
    }

    /// Completes a request whose parts have all ended, once what it waits for
    /// (backing flush, durable logs) is done.
    fn try_finish(&mut self, req: ReqId) {
        let Some(r) = self.reqs.get_mut(&req) else {
            return;
        };
        if r.parts > 0 {
            return;
        }
        if r.error.is_none() {
            if r.needs_backing_flush && self.backing_writes_lost {
                r.error = Some(IoError::BackingWritesLost);
            } else if r.needs_backing_flush {
                r.needs_backing_flush = false;
                r.parts += 1;
                self.backing_flush_waiting
                    .push(commit::BackingWaiter::Req(req));
                return;
            }
            if !self.durability.is_durable(r.wait_log) {
                if self.read_only {
                    r.error = Some(IoError::CacheDevice);
                } else {
                    let id = r.wait_log;
                    self.durability.wait(id, req);
                    self.note_barrier(id);
                    return;
                }
            }
        }
        let r = self.reqs.remove(&req).expect("request present");
        self.stats.latency[r.op as usize].record(self.now - r.started);
        for id in r.holds {
            self.ring.unhold(id);
        }
        self.backing_load -= r.backing_load as u64;
        self.events.push_back(Event::Completed {
            req,
            result: r.error.map_or(Ok(()), Err),
        });
    }

    fn complete_now(&mut self, req: ReqId, result: Result<(), IoError>) {
        self.stats.latency[self.op as usize].record(0);
        self.events.push_back(Event::Completed { req, result });
    }

    /// Backing device load as a percentage, as the engine sees it.
    fn backing_load_pct(&self) -> u64 {
        (self.backing_load * 100 / BACKING_NOMINAL_QD).min(100)
    }

    /// Whether a cached block's entry may be dropped without a log record:
    /// its data is on the backing device and recovery would not bring it back.
    fn droppable(&self, e: &Entry) -> bool {
        e.dirty == 0 && (!e.logged_dirty || e.id <= self.records.written_back())
    }

    // ----- the index in log terms ----------------------------------------

    /// The cache slot of slot `slot` of log `id`.
    fn cache_slot(&self, id: LogId, slot: u32) -> CacheSlot {
        CacheSlot((self.geo.position(id) * self.geo.data_blocks as u64) as u32 + slot)
    }

    /// An indexed copy, named by the log occupying its position.
    fn entry_of(&self, c: Cached) -> Entry {
        let db = self.geo.data_blocks;
        Entry {
            id: self.ring.at((c.at.0 / db) as u64).id,
            slot: c.at.0 % db,
            valid: c.valid,
            dirty: c.dirty,
            logged_dirty: c.logged_dirty,
        }
    }

    /// Where the newest copy of `block` lives, if it is cached.
    fn entry(&self, block: u64) -> Option<Entry> {
        self.index.get(block).map(|c| self.entry_of(c))
    }

    /// The backing block logged in slot `slot` of log `id`.
    fn slot_block(&self, id: LogId, slot: u32) -> u64 {
        self.index.block_at(self.cache_slot(id, slot))
    }

    /// The copy in slot `slot` of log `id`, if it is the indexed one.
    fn current_at(&self, id: LogId, slot: u32) -> Option<(u64, Entry)> {
        let at = self.cache_slot(id, slot);
        let c = self.index.is_current(at)?;
        Some((self.index.block_at(at), self.entry_of(c)))
    }

    /// Indexes `e` for `block`, returning the copy it replaces.
    fn index_insert(&mut self, block: u64, e: Entry) -> Option<Entry> {
        let c = Cached {
            at: self.cache_slot(e.id, e.slot),
            valid: e.valid,
            dirty: e.dirty,
            logged_dirty: e.logged_dirty,
        };
        self.index.insert(block, c).map(|c| self.entry_of(c))
    }

    /// Changes `block`'s entry if it is the copy in log `id`, slot `slot`
    /// (a newer copy elsewhere is left alone); None if it is not.
    fn update_copy(
        &mut self,
        block: u64,
        id: LogId,
        slot: u32,
        f: impl FnOnce(&mut Entry),
    ) -> Option<Dirty> {
        if self.ring.seg(id).id != id {
            return None;
        }
        let at = self.cache_slot(id, slot);
        let mut e = Entry {
            id,
            slot,
            valid: 0,
            dirty: 0,
            logged_dirty: false,
        };
        self.index.update_at(block, at, |c| {
            (e.valid, e.dirty, e.logged_dirty) = (c.valid, c.dirty, c.logged_dirty);
            f(&mut e);
            debug_assert!((e.id, e.slot) == (id, slot), "an update moved the entry");
            (c.valid, c.dirty, c.logged_dirty) = (e.valid, e.dirty, e.logged_dirty);
        })
    }

    /// Removes `block` from the index (caller checked it is droppable or superseded).
    fn drop_entry(&mut self, block: u64) {
        if let Some(c) = self.index.remove(block) {
            let e = self.entry_of(c);
            self.unlink_dirty(&e);
        }
    }

    /// A dirty entry left the index: its log holds one dirty block less.
    fn unlink_dirty(&mut self, e: &Entry) {
        if e.dirty != 0 {
            self.ring.seg_mut(e.id).live_dirty -= 1;
        }
    }

    /// Moves the engine forward as far as it can without new input.
    fn pump(&mut self) {
        if matches!(self.phase, Phase::Running | Phase::ShuttingDown) {
            // Cleaning first: it frees more room than it takes, so stalled
            // writes find some sooner.
            self.maybe_clean();
            self.retry_stalled();
            self.seal_if_due();
            self.issue_cache_flush();
            self.issue_backing_flush();
            self.maybe_scrub();
            self.maybe_writeback();
            self.maybe_checkpoint();
            self.maybe_write_record();
            if self.writeback.drop_caches_active() && self.only_quarantine_dirty() {
                // Record the clean state so a restart replays nothing.
                self.writeback.set_drop_caches(false);
                self.records.want();
                self.maybe_write_record();
            }
            self.check_shutdown_done();
        }
    }

    /// Flags for the next superblock record.
    fn record_flags(&self) -> u32 {
        self.pmem.record_flag(self.durability.frontier()) | self.checkpoint_flag()
    }

    /// Whether the engine runs in mode 1.
    pub fn is_persistent(&self) -> bool {
        self.pmem.acks_writes()
    }

    fn check_shutdown_done(&mut self) {
        if self.phase != Phase::ShuttingDown {
            return;
        }
        // After a cache-device failure nothing more can be made durable:
        // finish once in-flight work has ended.
        if self.read_only {
            if self.reqs.is_empty() && !self.writeback.is_active() && self.inflight.is_empty() {
                self.phase = Phase::Stopped;
                self.events.push_back(Event::ShutdownComplete);
            }
            return;
        }
        if (self.open.is_some() && !self.pmem.acks_writes())
            || self.open_fills_pending()
            || self.reserved_slots() > 0
            || !self.sealing.is_empty()
            || !self.durability.is_settled()
            || self.writeback.is_active()
            || !self.scrub.is_idle()
            || !self.save.finished()
            || !self.records.is_idle()
            || self.records.is_wanted()
            || !self.reqs.is_empty()
            || self.backing_flush_inflight.is_some()
            || !self.backing_flush_waiting.is_empty()
        {
            return;
        }
        self.phase = Phase::Stopped;
        self.events.push_back(Event::ShutdownComplete);
    }

    /// The open buffer waits for fill reads. In mode 1 it stays open over a
    /// shutdown, in the pool, so those must land (and be published) first:
    /// the cleaner's copies have no request waiting for them.
    fn open_fills_pending(&self) -> bool {
        self.open.as_ref().is_some_and(|o| o.fills_pending > 0)
    }

    fn fail_stalled(&mut self, err: IoError) {
        for s in std::mem::take(&mut self.stalled) {
            self.part_done(s.req, Err(err));
        }
    }

    /// Sector range of `block` covered by `[offset, offset+len)`, as a mask and
    /// the byte range inside the block.
    fn block_span(block: u64, offset: u64, len: u64) -> (u8, usize, usize) {
        let start = (block * BLOCK_SIZE).max(offset);
        let end = ((block + 1) * BLOCK_SIZE).min(offset + len);
        let (s0, s1) = (
            (start % BLOCK_SIZE) / SECTOR_SIZE,
            (end - block * BLOCK_SIZE).div_ceil(SECTOR_SIZE),
        );
        let mask = (((1u16 << s1) - 1) & !((1u16 << s0) - 1)) as u8;
        (
            (mask),
            (start - block * BLOCK_SIZE) as usize,
            (end - block * BLOCK_SIZE) as usize,
        )
    }
}

/// Calls `f(first_sector, count)` for each run of set bits in `mask`.
fn for_each_run(mask: u8, mut f: impl FnMut(u32, u32)) {
    let mut m = mask as u32;
    while m != 0 {
        let start = m.trailing_zeros();
        let len = (m >> start).trailing_ones();
        f(start, len);
        m &= !(((1u32 << len) - 1) << start);
    }
}

fn data_ref_user(req: ReqId, offset: usize) -> DataRef {
    DataRef::User { req, offset }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_span_masks() {
        type E = Engine<crate::io::HeapAlloc>;
        assert_eq!(E::block_span(0, 0, 4096), (0xff, 0, 4096));
        assert_eq!(E::block_span(1, 4096 + 512, 1024), (0b0000_0110, 512, 1536));
        assert_eq!(E::block_span(0, 3584, 4096), (0x80, 3584, 4096));
        assert_eq!(E::block_span(1, 3584, 4096), (0x7f, 0, 3584));
    }

    #[test]
    fn runs_of_bits() {
        let mut v = Vec::new();
        for_each_run(0b1011_0110, |s, l| v.push((s, l)));
        assert_eq!(v, vec![(1, 2), (4, 2), (7, 1)]);
    }
}
