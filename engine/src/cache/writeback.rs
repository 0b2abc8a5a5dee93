//! Writeback (migration): dirty blocks of the oldest durable logs are read
//! back, sorted by backing address, written to the backing device (dirty
//! sectors only), and made durable there. Only then does the writeback
//! frontier `last_wb` move, and a ring position is reused only once a durable
//! superblock record covers it, so recovery never misses a dirty log.
//!
//! At most `writeback_max_inflight` writes are on the backing device at a
//! time, the next issued as one ends: user I/O to the backing device queues
//! behind a few writeback writes, never behind a whole batch. Logs the
//! cleaner will free in the cache are left to it.

use super::{Dirty, Engine, Phase, Purpose, WRITEBACK_RETRY_NS, for_each_run};
use crate::geometry::{BLOCK_SIZE, FULL_MASK, SECTOR_SIZE};
use crate::ids::LogId;
use crate::io::{BufAlloc, BufId, CommandKind, DataRef, Device, Nanos};
use crate::mutant::Mutant;

/// Dead slots between two live ones that a writeback read reads through.
const WB_READ_GAP_SLOTS: u32 = 1;

/// One batch of logs being written back.
#[derive(Debug)]
pub(super) struct WbBatch {
    /// Last log id of the batch (the batch covers `last_wb + 1 ..= last`).
    last: LogId,
    /// Buffers holding the logs that had live dirty blocks.
    bufs: Vec<(LogId, BufId)>,
    reads_pending: u32,
    writes_pending: u32,
    failed: bool,
    /// (block, log id, slot, sectors written) for marking clean at the end.
    written: Vec<(u64, LogId, u32, u8)>,
    /// Writes not issued yet (backing offset, length, buffer, offset in
    /// it), in the order they go out.
    queued: std::collections::VecDeque<(u64, usize, BufId, usize)>,
    /// Writes issued and not ended.
    writes_inflight: u32,
}

/// Writeback's own state: the batch in flight, buffers kept for the next
/// one, the retry after a failed batch, and a `drop_caches` request.
#[derive(Debug, Default)]
pub(super) struct Writeback {
    batch: Option<WbBatch>,
    spare_bufs: Vec<BufId>,
    retry_at: Option<Nanos>,
    /// Write back everything dirty, whatever the load.
    drop_caches: bool,
}

impl Writeback {
    pub(super) fn is_active(&self) -> bool {
        self.batch.is_some()
    }

    /// The last log of the batch in flight.
    pub(super) fn batch_last(&self) -> Option<LogId> {
        self.batch.as_ref().map(|b| b.last)
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

    /// A backing flush failed: the batch's writes may be gone, so it must
    /// not count as written back, even if a later flush succeeds.
    pub(super) fn flush_failed(&mut self) {
        if let Some(b) = &mut self.batch {
            b.failed = true;
        }
    }

    fn start(&mut self, batch: WbBatch) {
        debug_assert!(self.batch.is_none(), "two writeback batches");
        debug_assert!(batch.reads_pending > 0);
        self.batch = Some(batch);
    }

    /// The batch ended; its buffers are kept for the next one. A failed
    /// batch is retried after `retry_at`.
    fn end(&mut self, retry_at: Option<Nanos>) -> WbBatch {
        let b = self.batch.take().expect("writeback batch");
        self.spare_bufs.extend(b.bufs.iter().map(|&(_, buf)| buf));
        self.retry_at = retry_at;
        b
    }
}

impl<A: BufAlloc> Engine<A> {
    /// Whether the cache is close enough to full that writeback must run
    /// whatever the backing device's load.
    fn writeback_urgent(&self) -> bool {
        self.ring_pressure()
            || (!self.stalled.is_empty() && self.next_position_blocked_on().is_some())
    }

    pub(super) fn maybe_writeback(&mut self) {
        while self.writeback.batch.is_none()
            && self.phase == Phase::Running
            && self.writeback.retry_at.is_none()
            && self.durability.frontier() > self.ring.last_wb()
        {
            let needed = self.writeback.drop_caches || self.writeback_urgent();
            if !needed && !self.background_writeback_allowed() {
                return;
            }
            let mut limit = (self.ring.last_wb() + self.tunables.nr_max_batched_writeback as u64)
                .min(self.durability.frontier());
            // Only logs whose data the scrub has checked and found whole.
            if let Some(first) = self.scrub.first_unusable(self.ring.last_wb()) {
                limit = limit.min(first.prev()).max(self.ring.last_wb());
            }
            // Logs the cleaner can free in the cache stay with it: the one at
            // the frontier if it claims it now, later ones if they are cheap
            // (it gets to them as the frontier does).
            if needed && !self.writeback.drop_caches {
                let front = self.ring.last_wb().next();
                if let Some(first) = front.through(limit).find(|&id| {
                    if id == front {
                        self.cleaner_claims(id)
                    } else {
                        self.cleaning_enabled() && self.cheap_to_clean(id)
                    }
                }) {
                    limit = first.prev();
                }
            }
            if limit == self.ring.last_wb() {
                return;
            }
            if !needed {
                // Background writeback takes only logs past their delay.
                while limit > self.ring.last_wb() && !self.past_writeback_delay(limit) {
                    limit = limit.prev();
                }
                if limit == self.ring.last_wb() {
                    return;
                }
            }
            // The batch stops before a log holding a block whose newest copy
            // is not durable yet: if that copy were lost in a crash, this log
            // would be the durable copy, so it must stay replayable.
            let blocked = self
                .ring
                .last_wb()
                .next()
                .through(limit)
                .find_map(|id| self.superseded_by_volatile(id).map(|b| (id, b)));
            let last = blocked.map_or(limit, |(id, _)| id.prev());
            // (Not when the copies are the cleaner's and no write waits for
            // room: the buffer fills soon, and a partial log costs a random
            // write on the cache device.)
            if let Some((_, blocker)) = blocked
                && last == self.ring.last_wb()
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
            if last == self.ring.last_wb() {
                return;
            }
            let mut batch = WbBatch {
                last,
                bufs: Vec::new(),
                reads_pending: 0,
                writes_pending: 0,
                failed: false,
                written: Vec::new(),
                queued: Default::default(),
                writes_inflight: 0,
            };
            // The copies to write are fixed now: each block's newest copy, if
            // it lies in the batch. A write arriving during the batch may
            // supersede one with a copy that is not durable yet; the batch's
            // copy is then the durable one and must still reach the backing device.
            for id in self.ring.last_wb().next().through(last) {
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
                // Nothing live was dirty: the logs are superseded or clean.
                self.ring.written_back(last);
                continue;
            }
            self.writeback.start(batch);
        }
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
            || self.writeback.batch.is_some()
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
        let Some(b) = self.writeback.batch.as_mut() else {
            return;
        };
        b.reads_pending -= 1;
        b.failed |= !ok;
        if b.reads_pending == 0 {
            self.wb_write_phase();
        }
    }

    fn wb_write_phase(&mut self) {
        let mut b = self.writeback.batch.take().expect("writeback batch");
        if b.failed {
            self.writeback.batch = Some(b);
            self.wb_abort();
            return;
        }
        let mut items: Vec<(u64, u8, BufId, u32)> = b
            .written
            .iter()
            .map(|&(block, id, slot, mask)| {
                let buf = b
                    .bufs
                    .iter()
                    .find(|(i, _)| *i == id)
                    .expect("log read for the batch")
                    .1;
                (block, mask, buf, slot)
            })
            .collect();
        items.sort_unstable_by_key(|i| i.0);
        // Merge full blocks that are contiguous on the backing device and in memory.
        let mut cmds: Vec<(u64, usize, BufId, usize)> = Vec::new(); // backing offset, len, buf, buf offset
        for &(block, mask, buf, slot) in &items {
            let boff = slot as usize * BLOCK_SIZE as usize;
            if mask == FULL_MASK {
                if let Some(last) = cmds.last_mut()
                    && last.2 == buf
                    && last.0 + last.1 as u64 == block * BLOCK_SIZE
                    && last.3 + last.1 == boff
                    && last.1.is_multiple_of(BLOCK_SIZE as usize)
                {
                    last.1 += BLOCK_SIZE as usize;
                    continue;
                }
                cmds.push((block * BLOCK_SIZE, BLOCK_SIZE as usize, buf, boff));
            } else {
                for_each_run(mask, |s0, n| {
                    let a = s0 as usize * SECTOR_SIZE as usize;
                    cmds.push((
                        block * BLOCK_SIZE + a as u64,
                        n as usize * SECTOR_SIZE as usize,
                        buf,
                        boff + a,
                    ));
                });
            }
        }
        b.writes_pending = cmds.len() as u32;
        self.stats.writeback_blocks += b.written.len() as u64;
        self.stats.writeback_ios += cmds.len() as u64;
        b.queued = cmds.into();
        self.writeback.batch = Some(b);
        self.issue_wb_writes();
        if self
            .writeback
            .batch
            .as_ref()
            .is_some_and(|b| b.writes_pending == 0)
        {
            self.wb_finish();
        }
    }

    /// Issues queued writeback writes up to the window.
    fn issue_wb_writes(&mut self) {
        let window = self.tunables.writeback_max_inflight.max(1);
        while let Some(b) = self.writeback.batch.as_mut()
            && b.writes_inflight < window
            && let Some((offset, len, buf, boff)) = b.queued.pop_front()
        {
            b.writes_inflight += 1;
            self.issue(
                Device::Backing,
                CommandKind::Write {
                    offset,
                    len,
                    src: DataRef::Engine { buf, offset: boff },
                },
                Purpose::WbWrite,
            );
        }
    }

    pub(super) fn wb_write_done(&mut self, ok: bool) {
        let Some(b) = self.writeback.batch.as_mut() else {
            return;
        };
        b.writes_pending -= 1;
        b.writes_inflight -= 1;
        b.failed |= !ok;
        if b.failed {
            // The batch is retried whole: what is queued need not go out.
            b.writes_pending -= b.queued.len() as u32;
            b.queued.clear();
        } else {
            self.issue_wb_writes();
        }
        let Some(b) = self.writeback.batch.as_mut() else {
            return;
        };
        if b.writes_pending == 0 {
            if b.failed {
                self.wb_abort();
            } else if self.mutant.is(Mutant::WritebackWithoutBackingFlush) {
                self.wb_finish();
            } else {
                self.backing_flush_waiting
                    .push(super::commit::BackingWaiter::Writeback);
            }
        }
    }

    pub(super) fn wb_flushed(&mut self, ok: bool) {
        if ok && !self.writeback.batch.as_ref().is_some_and(|b| b.failed) {
            self.wb_finish()
        } else {
            self.wb_abort()
        }
    }

    /// The batch is durable on the backing device: its blocks are clean.
    fn wb_finish(&mut self) {
        let b = self.writeback.end(None);
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

    /// The batch failed after retries: leave everything dirty and try later.
    fn wb_abort(&mut self) {
        self.writeback.end(Some(self.now + WRITEBACK_RETRY_NS));
        self.stats.writeback_errors += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ended_batch_keeps_its_buffers_and_a_failed_one_waits() {
        let mut w = Writeback::default();
        w.start(WbBatch {
            last: LogId(3),
            bufs: vec![(LogId(2), BufId(5)), (LogId(3), BufId(6))],
            reads_pending: 2,
            writes_pending: 0,
            failed: false,
            written: Vec::new(),
            queued: Default::default(),
            writes_inflight: 0,
        });
        assert!(w.is_active());
        let b = w.end(Some(100));
        assert_eq!(b.last, LogId(3));
        assert!(!w.is_active());
        assert_eq!(w.spare_bufs, vec![BufId(5), BufId(6)]);
        w.retry_if_due(99);
        assert_eq!(w.retry_at(), Some(100));
        w.retry_if_due(100);
        assert_eq!(w.retry_at(), None);
    }
}
