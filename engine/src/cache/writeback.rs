//! Writeback (migration): dirty blocks of the oldest durable logs are read
//! back, sorted by backing address, written to the backing device (dirty
//! sectors only), and made durable there. Only then does the writeback
//! frontier `last_wb` move, and a ring position is reused only once a durable
//! superblock record covers it, so recovery never misses a dirty log.
//!
//! Batches stream: while one writes, the next reads its logs (see
//! [`Writeback`]). At most `writeback_max_inflight` writes are on the
//! backing device at a time, the next issued as one ends, so user I/O to
//! the backing device queues behind a few writeback writes, never behind a
//! whole batch. Full blocks adjacent on the backing device merge into one
//! write, across logs too. Logs the cleaner will free in the cache are left
//! to it.

use super::{Dirty, Engine, Phase, Purpose, WRITEBACK_RETRY_NS, for_each_run};
use crate::geometry::{BLOCK_SIZE, FULL_MASK, SECTOR_SIZE};
use crate::ids::LogId;
use std::collections::VecDeque;

use crate::io::{BufAlloc, BufId, CommandKind, DataRef, Device, Nanos};
use crate::mutant::Mutant;

/// Dead slots between two live ones that a writeback read reads through.
const WB_READ_GAP_SLOTS: u32 = 1;

/// Batches in flight at most: one writing (or waiting for its flush) while
/// the next reads its logs, so the backing device never waits for the cache.
const MAX_BATCHES: usize = 2;

/// Full blocks merged into one backing write at most.
const MAX_MERGED_BLOCKS: usize = 64;

/// Where a batch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Its logs' live blocks are being read from the cache device.
    Reading,
    /// Read; its writes wait for the batches before it to finish writing.
    Ready,
    Writing,
    /// Written; a backing flush is queued or in flight for it.
    Flushing,
    /// Durable on the backing device (or nothing to write): it finishes
    /// once every batch before it has.
    Flushed,
}

/// One batch of logs being written back.
#[derive(Debug)]
pub(super) struct WbBatch {
    /// The logs it covers.
    first: LogId,
    last: LogId,
    stage: Stage,
    /// Buffers holding the logs that had live dirty blocks.
    bufs: Vec<(LogId, BufId)>,
    /// Buffers gathering blocks from several logs into one write.
    staging: Vec<BufId>,
    reads_pending: u32,
    /// Writes issued and not ended.
    writes_inflight: u32,
    failed: bool,
    /// (block, log id, slot, sectors written) for marking clean at the end.
    written: Vec<(u64, LogId, u32, u8)>,
    /// Writes not issued yet (backing offset, length, buffer, offset in
    /// it), in the order they go out.
    queued: VecDeque<(u64, usize, BufId, usize)>,
}

impl WbBatch {
    fn new(first: LogId, last: LogId) -> Self {
        Self {
            first,
            last,
            stage: Stage::Reading,
            bufs: Vec::new(),
            staging: Vec::new(),
            reads_pending: 0,
            writes_inflight: 0,
            failed: false,
            written: Vec::new(),
            queued: VecDeque::new(),
        }
    }

    /// Writes not ended: queued or in flight.
    fn writes_pending(&self) -> usize {
        self.queued.len() + self.writes_inflight as usize
    }

    /// No I/O of it is outstanding (a failed batch may be dropped).
    fn drained(&self) -> bool {
        self.reads_pending == 0 && self.writes_inflight == 0 && self.stage != Stage::Flushing
    }
}

/// Writeback's own state: the batches in flight (oldest first), buffers
/// kept for the next ones, the retry after a failure, and a `drop_caches`
/// request.
///
/// Batches overlap as a stream: while one writes, the next reads its logs;
/// it starts writing only once every write of the one before has ended, so
/// two copies of a block never race on the backing device. The frontier
/// moves batch by batch, in order.
#[derive(Debug, Default)]
pub(super) struct Writeback {
    batches: VecDeque<WbBatch>,
    spare_bufs: Vec<BufId>,
    retry_at: Option<Nanos>,
    /// Write back everything dirty, whatever the load.
    drop_caches: bool,
    /// How long a writeback write takes, issue to completion (a moving
    /// average; None until one ended).
    write_ns: Option<u64>,
    /// The state in which the last look for a batch found its first log
    /// blocked: looking again costs a probe per slot of every log in
    /// range, so it waits until something it depends on moved.
    blocked_at: Option<ScanStamp>,
}

/// What a blocked batch waits for: the durable frontier, the writeback
/// frontier, the batches in flight, whether writes stall or `drop_caches`
/// runs (either may seal the blocking buffer), and time (in steps of
/// [`RESCAN_NS`], for copies published to the pmem pool).
type ScanStamp = (LogId, LogId, usize, bool, bool, Nanos);

/// How long a blocked batch waits before it looks again with nothing else moved.
const RESCAN_NS: Nanos = 50_000;

impl Writeback {
    /// What writing a block back costs with a full window of writes in
    /// flight: a write's latency shared by the window (under a QoS limit
    /// the latency grows with the queue, so this is the device's rate).
    pub(super) fn ns_per_block(&self, window: u32) -> Option<u64> {
        self.write_ns.map(|ns| ns / window.max(1) as u64)
    }

    /// A writeback write took `ns`.
    fn note_write(&mut self, ns: u64) {
        self.write_ns = Some(match self.write_ns {
            None => ns,
            Some(avg) => avg - avg / 8 + ns / 8,
        });
    }

    pub(super) fn is_active(&self) -> bool {
        !self.batches.is_empty()
    }

    /// The last log of the newest batch in flight.
    pub(super) fn batch_last(&self) -> Option<LogId> {
        self.batches.back().map(|b| b.last)
    }

    pub(super) fn retry_at(&self) -> Option<Nanos> {
        self.retry_at
    }

    /// The retry delay has passed: writeback may start again.
    pub(super) fn retry_if_due(&mut self, now: Nanos) {
        if self.retry_at.is_some_and(|t| t <= now) {
            self.retry_at = None;
        }
    }

    pub(super) fn drop_caches_active(&self) -> bool {
        self.drop_caches
    }

    pub(super) fn set_drop_caches(&mut self, on: bool) {
        self.drop_caches = on;
    }

    /// A backing flush failed: writes of every batch may be gone, so none
    /// may count as written back, even if a later flush succeeds.
    pub(super) fn flush_failed(&mut self) {
        for b in &mut self.batches {
            b.failed = true;
        }
    }

    fn failing(&self) -> bool {
        self.batches.iter().any(|b| b.failed)
    }

    /// The batch covering log `id`.
    fn batch_of(&mut self, id: LogId) -> Option<&mut WbBatch> {
        self.batches
            .iter_mut()
            .find(|b| b.first <= id && id <= b.last)
    }

    /// The batch whose writes are out (at most one).
    fn writing(&mut self) -> Option<&mut WbBatch> {
        self.batches.iter_mut().find(|b| b.stage == Stage::Writing)
    }

    fn push(&mut self, batch: WbBatch) {
        debug_assert!(
            self.batches.len() < MAX_BATCHES,
            "too many writeback batches"
        );
        debug_assert!(
            self.batches
                .back()
                .is_none_or(|b| b.last.next() == batch.first),
            "writeback batches leave a gap"
        );
        self.batches.push_back(batch);
    }

    /// The oldest batch finished: its buffers are kept for the next one.
    /// Returns it with its staging buffers, which the caller frees.
    fn pop_finished(&mut self) -> WbBatch {
        let b = self.batches.pop_front().expect("writeback batch");
        self.spare_bufs.extend(b.bufs.iter().map(|&(_, buf)| buf));
        b
    }
}

impl<A: BufAlloc> Engine<A> {
    /// Whether the cache is close enough to full that writeback must run
    /// whatever the backing device's load.
    fn writeback_urgent(&self) -> bool {
        // (A position written back and waiting only for its record is the
        // record's to free, not writeback's.)
        self.ring_pressure()
            || (!self.stalled.is_empty()
                && self
                    .next_position_blocked_on()
                    .is_some_and(|occ| occ > self.ring.last_wb()))
    }

    pub(super) fn maybe_writeback(&mut self) {
        loop {
            // Where the next batch starts: after the newest in flight.
            let base = self.writeback.batch_last().unwrap_or(self.ring.last_wb());
            if self.writeback.batches.len() >= MAX_BATCHES
                || self.phase != Phase::Running
                || self.writeback.retry_at.is_some()
                || self.writeback.failing()
                || self.durability.frontier() <= base
            {
                return;
            }
            let needed = self.writeback.drop_caches || self.writeback_urgent();
            if !needed && !self.background_writeback_allowed() {
                return;
            }
            let stamp = (
                self.durability.frontier(),
                self.ring.last_wb(),
                self.writeback.batches.len(),
                self.stalled.is_empty(),
                self.writeback.drop_caches,
                self.now / RESCAN_NS,
            );
            if self.writeback.blocked_at == Some(stamp) {
                return;
            }
            // While the ring is under pressure over a slow backing device, one
            // log per batch: a position frees after one log's writes, not a
            // whole batch's, so room comes steadily (sorting across logs
            // matters little to a device that is not a disk).
            let slow = self.ring_pressure() && self.writeback_slow();
            let logs = if self.stalled.is_empty() && !slow {
                self.tunables.nr_max_batched_writeback as u64
            } else {
                1
            };
            let mut limit = (base + logs).min(self.durability.frontier());
            // Only logs whose data the scrub has checked and found whole.
            if let Some(first) = self.scrub.first_unusable(base) {
                limit = limit.min(first.prev()).max(base);
            }
            // Logs the cleaner can free in the cache stay with it: the one at
            // the frontier if it claims it now, later ones if they are cheap
            // (it gets to them as the frontier does). Background writeback
            // too: a batch holds the frontier for as long as the backing
            // device takes, and the cleaner would free those logs sooner.
            if self.cleaning_on() {
                let front = self.ring.last_wb().next();
                if let Some(first) = base.next().through(limit).find(|&id| {
                    if id == front {
                        self.cleaner_claims(id)
                    } else {
                        self.cleaning_enabled() && self.cheap_to_clean(id)
                    }
                }) {
                    limit = first.prev();
                }
            }
            if limit == base {
                return;
            }
            if !needed {
                // Background writeback takes only logs past their delay.
                while limit > base && !self.past_writeback_delay(limit) {
                    limit = limit.prev();
                }
                if limit == base {
                    return;
                }
            }
            // The batch stops before a log holding a block whose newest copy
            // is not durable yet: if that copy were lost in a crash, this log
            // would be the durable copy, so it must stay replayable.
            let blocked = base
                .next()
                .through(limit)
                .find_map(|id| self.superseded_by_volatile(id).map(|b| (id, b)));
            let last = blocked.map_or(limit, |(id, _)| id.prev());
            // (Not when the copies are the cleaner's and no write waits for
            // room: the buffer fills soon, and a partial log costs a random
            // write on the cache device.)
            if let Some((_, blocker)) = blocked
                && last == base
                && self.open.as_ref().is_some_and(|o| {
                    o.id == blocker
                        && (o.relocated == 0
                            || !self.stalled.is_empty()
                            || self.writeback.drop_caches)
                })
            {
                // Make the blocking buffer durable (mode 0); in mode 1 the
                // block is waiting for a fill and will be published.
                self.request_seal();
                self.seal_if_due();
            }
            if last == base {
                self.writeback.blocked_at = Some(stamp);
                return;
            }
            self.writeback.blocked_at = None;
            let batch = self.read_batch(base.next(), last);
            if batch.reads_pending == 0 && self.writeback.batches.is_empty() {
                // Nothing live was dirty: the logs are superseded or clean.
                self.ring.written_back(last);
                continue;
            }
            self.writeback.push(batch);
            self.wb_progress();
        }
    }

    /// Fixes the copies batch `first..=last` writes and issues their reads.
    /// The copies are each block's newest, if it lies in the batch. A write
    /// arriving during the batch may supersede one with a copy that is not
    /// durable yet; the batch's copy is then the durable one and must still
    /// reach the backing device.
    fn read_batch(&mut self, first: LogId, last: LogId) -> WbBatch {
        let mut batch = WbBatch::new(first, last);
        for id in first.through(last) {
            let seg = self.ring.seg(id);
            if seg.id != id || seg.live_dirty == 0 {
                continue;
            }
            let before = batch.written.len();
            for slot in 0..seg.nr_slots {
                if let Some((block, e)) = self.current_at(id, slot)
                    && e.dirty != 0
                    && !self.scrub.is_corrupt(block)
                {
                    batch.written.push((block, id, slot, e.dirty));
                }
            }
            if batch.written.len() == before {
                continue;
            }
            // Only the live slots are read, in runs (a gap of one dead
            // slot is read through: cheaper than another command). A log
            // whose blocks were mostly rewritten costs little to drain.
            let mut runs: Vec<(u32, u32)> = Vec::new(); // first slot, count
            for &(_, _, slot, _) in &batch.written[before..] {
                match runs.last_mut() {
                    Some((first, n)) if slot <= *first + *n + WB_READ_GAP_SLOTS => {
                        *n = slot - *first + 1;
                    }
                    _ => runs.push((slot, 1)),
                }
            }
            let buf = match self.writeback.spare_bufs.pop() {
                Some(b) => b,
                None => self.alloc_buf(self.geo.segment_size as usize),
            };
            for (first, n) in runs {
                self.ring.hold(id);
                self.issue(
                    Device::Cache,
                    CommandKind::Read {
                        offset: self.geo.slot_offset(id, first),
                        len: n as usize * BLOCK_SIZE as usize,
                        dst: DataRef::Engine {
                            buf,
                            offset: first as usize * BLOCK_SIZE as usize,
                        },
                    },
                    Purpose::WbRead { id },
                );
                batch.reads_pending += 1;
            }
            batch.bufs.push((id, buf));
        }
        if batch.reads_pending == 0 {
            // Nothing to write: it finishes when its turn comes.
            batch.stage = Stage::Flushed;
        }
        batch
    }

    /// Whether the backing device is idle enough for background writeback
    /// and the oldest log waiting for it is past its delay.
    fn background_writeback_allowed(&self) -> bool {
        self.tunables.writeback_threshold > 0
            && self.backing_load_pct() < self.tunables.writeback_threshold as u64
            && self.past_writeback_delay(self.ring.last_wb() + 1)
    }

    /// When durable log `id` has waited `writeback_delay_ms`.
    fn writeback_due_at(&self, id: LogId) -> Nanos {
        self.ring.seg(id).durable_at + self.tunables.writeback_delay_ms as u64 * 1_000_000
    }

    fn past_writeback_delay(&self, id: LogId) -> bool {
        self.writeback_due_at(id) <= self.now
    }

    /// When the oldest log waiting for background writeback passes its delay,
    /// if that is still ahead (the host wakes the engine then).
    pub(super) fn writeback_delay_deadline(&self) -> Option<Nanos> {
        if self.phase != Phase::Running
            || self.writeback.is_active()
            || self.durability.frontier() <= self.ring.last_wb()
            || self.tunables.writeback_threshold == 0
        {
            return None;
        }
        let at = self.writeback_due_at(self.ring.last_wb() + 1);
        (at > self.now).then_some(at)
    }

    /// A log (id) holding the newest copy of a block that log `id` also
    /// holds, where that newest copy is not durable yet.
    fn superseded_by_volatile(&self, id: LogId) -> Option<LogId> {
        let seg = self.ring.seg(id);
        if seg.id != id {
            return None;
        }
        (0..seg.nr_slots).find_map(|slot| {
            let e = self.entry(self.slot_block(id, slot))?;
            ((e.id, e.slot) != (id, slot) && e.dirty != 0 && !self.copy_durable(&e)).then_some(e.id)
        })
    }

    /// Whether the copy an index entry names survives a crash: its log is
    /// durable, or it is published in the pmem pool.
    fn copy_durable(&self, e: &super::Entry) -> bool {
        self.durability.is_durable(e.id) || (self.pmem.may_hold(e.id) && self.pending_fill(e) == 0)
    }

    pub(super) fn wb_read_done(&mut self, id: LogId, ok: bool) {
        self.ring.unhold(id);
        let Some(b) = self.writeback.batch_of(id) else {
            return;
        };
        b.reads_pending -= 1;
        b.failed |= !ok;
        if b.reads_pending == 0 && b.stage == Stage::Reading {
            b.stage = Stage::Ready;
        }
        self.wb_progress();
    }

    pub(super) fn wb_write_done(&mut self, issued: Nanos, ok: bool) {
        if ok {
            self.writeback.note_write(self.now.saturating_sub(issued));
        }
        let Some(b) = self.writeback.writing() else {
            return;
        };
        b.writes_inflight -= 1;
        b.failed |= !ok;
        self.wb_progress();
    }

    /// The backing flush a batch waited for ended (batches enter
    /// `Flushing` in order and their flushes end in order).
    pub(super) fn wb_flushed(&mut self, ok: bool) {
        if let Some(b) = self
            .writeback
            .batches
            .iter_mut()
            .find(|b| b.stage == Stage::Flushing)
        {
            b.stage = Stage::Flushed;
            b.failed |= !ok;
        }
        self.wb_progress();
    }

    /// Moves the stream on: drains and drops everything after a failure,
    /// finishes durable batches in order, and lets the first batch not yet
    /// written write (once the one before it has no write out).
    fn wb_progress(&mut self) {
        if self.writeback.failing() {
            // The batches are retried whole: nothing more goes out.
            for b in &mut self.writeback.batches {
                b.queued.clear();
                if b.stage == Stage::Writing && b.writes_pending() == 0 {
                    b.stage = Stage::Flushed;
                }
            }
            if self.writeback.batches.iter().all(WbBatch::drained) {
                self.wb_abort();
            }
            return;
        }
        loop {
            while self
                .writeback
                .batches
                .front()
                .is_some_and(|b| b.stage == Stage::Flushed)
            {
                self.wb_finish();
            }
            let Some(i) = self
                .writeback
                .batches
                .iter()
                .position(|b| !matches!(b.stage, Stage::Flushing | Stage::Flushed))
            else {
                return;
            };
            match self.writeback.batches[i].stage {
                Stage::Ready => self.wb_start_writes(i),
                Stage::Writing => self.issue_wb_writes(i),
                _ => return,
            }
            let b = &mut self.writeback.batches[i];
            if b.stage != Stage::Writing || b.writes_pending() > 0 {
                return;
            }
            // Every write ended: make them durable, then the next may write.
            if self.mutant.is(Mutant::WritebackWithoutBackingFlush) {
                b.stage = Stage::Flushed;
            } else {
                b.stage = Stage::Flushing;
                self.backing_flush_waiting
                    .push(super::commit::BackingWaiter::Writeback);
            }
        }
    }

    /// Sorts batch `i`'s blocks by backing address and queues its writes:
    /// dirty sectors only, full blocks contiguous on the backing device
    /// merged into one write (gathered into a staging buffer when they come
    /// from different logs).
    fn wb_start_writes(&mut self, i: usize) {
        let b = &self.writeback.batches[i];
        let mut items: Vec<(u64, u8, BufId, u32)> = b
            .written
            .iter()
            .map(|&(block, id, slot, mask)| {
                let buf = b
                    .bufs
                    .iter()
                    .find(|(l, _)| *l == id)
                    .expect("log read for the batch")
                    .1;
                (block, mask, buf, slot)
            })
            .collect();
        items.sort_unstable_by_key(|i| i.0);
        let nr_blocks = items.len() as u64;
        let mut cmds: VecDeque<(u64, usize, BufId, usize)> = VecDeque::new();
        let mut staging = Vec::new();
        let mut at = 0;
        while at < items.len() {
            let (block, mask, buf, slot) = items[at];
            let boff = slot as usize * BLOCK_SIZE as usize;
            if mask != FULL_MASK {
                for_each_run(mask, |s0, n| {
                    let a = s0 as usize * SECTOR_SIZE as usize;
                    cmds.push_back((
                        block * BLOCK_SIZE + a as u64,
                        n as usize * SECTOR_SIZE as usize,
                        buf,
                        boff + a,
                    ));
                });
                at += 1;
                continue;
            }
            // The run of full blocks contiguous on the backing device.
            let mut end = at + 1;
            while end < items.len()
                && end - at < MAX_MERGED_BLOCKS
                && items[end].1 == FULL_MASK
                && items[end].0 == block + (end - at) as u64
            {
                end += 1;
            }
            let run = &items[at..end];
            let len = run.len() * BLOCK_SIZE as usize;
            let in_place = run
                .iter()
                .enumerate()
                .all(|(k, it)| it.2 == buf && it.3 == slot + k as u32);
            if in_place {
                cmds.push_back((block * BLOCK_SIZE, len, buf, boff));
            } else {
                let sbuf = self.alloc_buf(len);
                for (k, &(_, _, src, s)) in run.iter().enumerate() {
                    let from = s as usize * BLOCK_SIZE as usize;
                    let mut tmp = [0u8; BLOCK_SIZE as usize];
                    tmp.copy_from_slice(&self.buf(src)[from..from + BLOCK_SIZE as usize]);
                    let to = k * BLOCK_SIZE as usize;
                    self.buf_mut(sbuf)[to..to + BLOCK_SIZE as usize].copy_from_slice(&tmp);
                }
                staging.push(sbuf);
                cmds.push_back((block * BLOCK_SIZE, len, sbuf, 0));
            }
            at = end;
        }
        self.stats.writeback_blocks += nr_blocks;
        self.stats.writeback_ios += cmds.len() as u64;
        let b = &mut self.writeback.batches[i];
        b.queued = cmds;
        b.staging = staging;
        b.stage = Stage::Writing;
        self.issue_wb_writes(i);
    }

    /// How many writeback writes may be in flight now: the full window while
    /// writes wait for room (or `drop_caches` runs), else what user I/O on
    /// the backing device leaves of it, down to a quarter, so foreground
    /// reads always find the device's queue short.
    fn wb_window(&self) -> u32 {
        let max = self.tunables.writeback_max_inflight.max(1);
        if !self.stalled.is_empty() || self.writeback.drop_caches {
            return max;
        }
        let user = self.backing_load.min(u32::MAX as u64) as u32;
        max.saturating_sub(user).max(max.div_ceil(4))
    }

    /// Issues batch `i`'s queued writes up to the window.
    fn issue_wb_writes(&mut self, i: usize) {
        let window = self.wb_window();
        loop {
            let b = &mut self.writeback.batches[i];
            if b.writes_inflight >= window {
                return;
            }
            let Some((offset, len, buf, boff)) = b.queued.pop_front() else {
                return;
            };
            b.writes_inflight += 1;
            self.issue(
                Device::Backing,
                CommandKind::Write {
                    offset,
                    len,
                    src: DataRef::Engine { buf, offset: boff },
                },
                Purpose::WbWrite { issued: self.now },
            );
        }
    }

    /// The oldest batch is durable on the backing device: its blocks are
    /// clean and the frontier passes it.
    fn wb_finish(&mut self) {
        let b = self.writeback.pop_finished();
        for buf in b.staging {
            self.release_buf(buf);
        }
        for &(block, id, slot, mask) in &b.written {
            let change = self.update_copy(block, id, slot, |e| e.dirty &= !mask);
            if change == Some(Dirty::Cleaned) {
                self.ring.seg_mut(id).live_dirty -= 1;
            }
        }
        if b.last > self.ring.last_wb() {
            self.ring.written_back(b.last);
        }
    }

    /// A batch failed after retries: every batch is dropped with nothing
    /// marked clean, and writeback tries again later.
    fn wb_abort(&mut self) {
        while self.writeback.is_active() {
            let b = self.writeback.pop_finished();
            for buf in b.staging {
                self.release_buf(buf);
            }
        }
        self.writeback.retry_at = Some(self.now + WRITEBACK_RETRY_NS);
        self.stats.writeback_errors += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_stream_in_order_and_keep_their_buffers() {
        let mut w = Writeback::default();
        let mut b = WbBatch::new(LogId(1), LogId(3));
        b.bufs = vec![(LogId(2), BufId(5)), (LogId(3), BufId(6))];
        w.push(b);
        w.push(WbBatch::new(LogId(4), LogId(4)));
        assert!(w.is_active());
        assert_eq!(w.batch_last(), Some(LogId(4)));
        assert_eq!(w.batch_of(LogId(2)).map(|b| b.first), Some(LogId(1)));
        assert_eq!(w.batch_of(LogId(4)).map(|b| b.first), Some(LogId(4)));
        assert!(w.batch_of(LogId(5)).is_none());
        w.flush_failed();
        assert!(w.failing());
        let done = w.pop_finished();
        assert_eq!(done.last, LogId(3));
        assert_eq!(w.spare_bufs, vec![BufId(5), BufId(6)]);
        w.retry_at = Some(100);
        w.retry_if_due(99);
        assert_eq!(w.retry_at(), Some(100));
        w.retry_if_due(100);
        assert_eq!(w.retry_at(), None);
    }

    #[test]
    #[should_panic(expected = "gap")]
    #[cfg(debug_assertions)]
    fn a_batch_that_skips_logs_is_caught() {
        let mut w = Writeback::default();
        w.push(WbBatch::new(LogId(1), LogId(3)));
        w.push(WbBatch::new(LogId(5), LogId(6)));
    }
}
