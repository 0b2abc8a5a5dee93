//! Log commit: sealing buffers into logs, flushing the cache device and
//! moving the durable frontier ([`Durability`](super::durability)), writing
//! superblock records ([`Records`](super::records)), the backing-device
//! flush queue, and going read-only when the cache device fails.
//!
//! A FUA write or FLUSH completes only when the frontier passes the log
//! holding its data, so recovery may stop at the first bad log without
//! losing anything acknowledged as durable.

use super::{Engine, OpenLog, Phase, Purpose};
use crate::error::IoError;
use crate::format::{Metablock, SbRecord, encode_segment_header};
use crate::geometry::BLOCK_SIZE;
use crate::ids::LogId;
use crate::io::{BufAlloc, CommandKind, DataRef, Device, ReqId};
use crate::mutant::Mutant;

/// Who waits for a backing-device flush.
#[derive(Debug, Clone, Copy)]
pub(super) enum BackingWaiter {
    Req(ReqId),
    Writeback,
    /// Clean shutdown makes bypass writes durable.
    Shutdown,
}

impl<A: BufAlloc> Engine<A> {
    /// Asks for the open buffer to be written as a log as soon as it can be.
    pub(super) fn request_seal(&mut self) {
        if let Some(o) = &mut self.open
            && !o.slots.is_empty()
        {
            o.seal_requested = true;
        }
    }

    /// A FUA/FLUSH waits for log `id`: if it is the open one, seal it at the
    /// barrier deadline (or now).
    pub(super) fn note_barrier(&mut self, id: LogId) {
        if self.open.as_ref().is_some_and(|o| o.id == id) {
            if self.tunables.barrier_deadline_ms == 0 {
                self.request_seal();
            } else {
                let d = self.now + self.tunables.barrier_deadline_ms as u64 * 1_000_000;
                self.durability.set_barrier(d);
            }
        }
    }

    pub(super) fn seal_if_due(&mut self) {
        if self.read_only {
            return;
        }
        let due = self
            .open
            .as_ref()
            .is_some_and(|o| o.seal_requested || o.slots.len() as u32 == self.geo.data_blocks);
        if !due {
            return;
        }
        let o = self.open.take().expect("open log");
        self.durability.clear_barrier();
        if o.fills_pending > 0 || o.reserved > 0 {
            self.sealing.push(o);
        } else {
            self.seal_log(o);
        }
    }

    /// Writes the header and issues the log write.
    pub(super) fn seal_log(&mut self, o: OpenLog) {
        let n = o.slots.len();
        let hl = self.geo.header_len();
        // The frontier the log claims: recovery treats a bad log at or
        // below it as corruption, never as the chain's torn end.
        let (geo, epoch, durable, uuid) = (
            self.geo,
            self.ring.epoch(),
            self.durability.frontier(),
            self.records.current().cache_uuid,
        );
        let b = self.buf_mut(o.buf);
        let (hdr, data) = b.split_at_mut(hl);
        let mbs: Vec<Metablock> = o
            .slots
            .iter()
            .zip(data.chunks(BLOCK_SIZE as usize))
            .map(|(s, d)| {
                let crc = s.crc.unwrap_or_else(|| crc32c::crc32c(d));
                if s.block == super::grant::PADDING {
                    Metablock::padding(crc)
                } else {
                    Metablock {
                        block: s.block,
                        valid: s.valid,
                        dirty: s.dirty,
                        crc,
                    }
                }
            })
            .collect();
        encode_segment_header(
            hdr,
            &geo,
            o.id.get(),
            epoch.get(),
            durable.get(),
            &uuid,
            &mbs,
        );
        self.stats.nr_logs += 1;
        if (n as u32) < self.geo.data_blocks {
            self.stats.nr_partial_flushed += 1;
        }
        self.durability.sealed(o.id);
        let offset = self.geo.segment_offset(o.id);
        self.issue(
            Device::Cache,
            CommandKind::Write {
                offset,
                len: hl + n * BLOCK_SIZE as usize,
                src: DataRef::Engine {
                    buf: o.buf,
                    offset: 0,
                },
            },
            Purpose::LogWrite { id: o.id },
        );
    }

    pub(super) fn log_written(&mut self, id: LogId, ok: bool) {
        if !ok {
            // The buffer stays attached so its data can still be read.
            self.fail_cache();
            return;
        }
        self.durability.written(id);
        if self.mutant.is(Mutant::DurableBeforeFlush) && !self.durability.flush_busy() {
            self.durability.flush_started();
            self.durability.flush_done(true);
            self.advance_frontier();
        }
        if self.pmem.acks_writes() {
            // The pmem slot is the only durable copy until the log is.
            return;
        }
        // Reads go to the device from now on; the buffer takes new writes.
        // (No CopyToUser event can name it: copies are emitted only by calls
        // that do not complete log writes, and the host drains events between calls.)
        self.release_log_buf(id);
    }

    /// Returns log `id`'s buffer (and in mode 1 its pmem slot) for reuse.
    fn release_log_buf(&mut self, id: LogId) {
        let seg = self.ring.seg_mut(id);
        if seg.id != id {
            return;
        }
        let Some(b) = seg.buf.take() else { return };
        // Buffers taken only to recover pmem slots go back to the allocator.
        let pooled = if self.pmem.acks_writes() {
            self.pmem.owns(b)
        } else {
            self.free_log_bufs.len() < self.params.nr_buffers as usize
        };
        if pooled {
            self.free_log_bufs.push(b);
        } else {
            self.release_buf(b);
        }
    }

    pub(super) fn issue_cache_flush(&mut self) {
        if self.durability.flush_busy() || self.read_only {
            return;
        }
        if !self.durability.has_written() && !self.records.needs_flush() {
            return;
        }
        self.records.flush_started();
        self.durability.flush_started();
        self.issue(Device::Cache, CommandKind::Flush, Purpose::CacheFlush);
    }

    pub(super) fn cache_flush_done(&mut self, ok: bool) {
        self.durability.flush_done(ok);
        if !ok {
            self.fail_cache();
            return;
        }
        if self.records.flushed(self.now) {
            self.stats.sb_record_writes += 1;
        }
        self.advance_frontier();
    }

    /// Moves the durable frontier up to just below the lowest log that is not durable
    /// yet, and completes the requests that waited for it.
    fn advance_frontier(&mut self) {
        let mut lowest = self.open.as_ref().map_or(self.ring.next_id(), |o| o.id);
        if let Some(id) = self.durability.lowest_unflushed() {
            lowest = lowest.min(id);
        }
        for o in &self.sealing {
            lowest = lowest.min(o.id);
        }
        let became = self.durability.advance(lowest);
        self.scrub.rewrites_durable(self.durability.frontier());
        let now = self.now;
        for id in became.clone() {
            let seg = self.ring.seg_mut(id);
            if seg.id == id {
                seg.durable_at = now;
            }
        }
        if self.pmem.acks_writes() {
            // A pool slot is the only safe copy until recovery would replay
            // its log, that is until every earlier log is durable too.
            for id in became {
                self.release_log_buf(id);
            }
        }
        if self.pmem.drained(self.durability.frontier()) {
            // The drained pool holds nothing the cache device lacks: say so.
            self.records.want();
        }
        for req in self.durability.take_ready() {
            self.try_finish(req);
        }
    }

    /// Writes the superblock record when space must be reclaimed, when the
    /// interval asks for it, or at shutdown.
    pub(super) fn maybe_write_record(&mut self) {
        // The checkpoint's header names the record that follows it: none
        // may come between.
        if !self.records.is_idle() || self.read_only || self.save.in_progress() {
            return;
        }
        // Under pressure the record goes out as soon as the frontier moves,
        // so the next position is free by the time the open buffer fills.
        let urgent = self
            .next_position_blocked_on()
            .is_some_and(|occ| occ <= self.ring.last_wb())
            || (self.ring_pressure() && self.ring.last_wb() > self.records.written_back());
        // At shutdown the record goes last (in mode 1 a partial buffer stays open in pmem).
        let at_shutdown = self.phase == Phase::ShuttingDown
            && !self.writeback.is_active()
            && (self.open.is_none() || self.pmem.acks_writes())
            && self.sealing.is_empty()
            && self.durability.lowest_unflushed().is_none()
            && self.save.finished();
        let wanted = self.records.is_wanted() && (self.phase == Phase::Running || at_shutdown);
        if !urgent && !wanted {
            return;
        }
        if !urgent
            && self.phase == Phase::Running
            && self.ring.last_wb() == self.records.written_back()
            && self.records.current().flags == self.record_flags()
        {
            self.records.unwant();
            return;
        }
        let rec = self.next_record();
        self.write_record(rec, Purpose::RecordWrite);
        self.records.writing(rec);
    }

    /// The record that says where the cache is now: the writeback frontier
    /// and this incarnation's epoch, one sequence number past the last.
    pub(super) fn next_record(&self) -> SbRecord {
        self.records.next(
            self.ring.last_wb(),
            self.ring.last_wb_epoch(),
            self.durability.frontier(),
            self.ring.epoch(),
            self.record_flags(),
        )
    }

    /// Issues the write of a record into its slot.
    pub(super) fn write_record(&mut self, rec: SbRecord, purpose: Purpose) {
        let buf = self.alloc_buf(BLOCK_SIZE as usize);
        let list = if self.mutant.is(Mutant::QuarantineNotRecorded) {
            Vec::new()
        } else {
            self.scrub.record_list()
        };
        self.buf_mut(buf).copy_from_slice(&rec.encode_with(&list));
        self.records.set_buf(buf);
        self.issue(
            Device::Cache,
            CommandKind::Write {
                offset: rec.offset(),
                len: BLOCK_SIZE as usize,
                src: DataRef::Engine { buf, offset: 0 },
            },
            purpose,
        );
    }

    pub(super) fn record_written(&mut self, ok: bool) {
        if let Some(b) = self.records.take_buf() {
            self.release_buf(b);
        }
        if self.records.written(ok) && !ok {
            self.fail_cache();
        }
    }

    pub(super) fn issue_backing_flush(&mut self) {
        if self.backing_flush_inflight.is_some() || self.backing_flush_waiting.is_empty() {
            return;
        }
        self.backing_flush_inflight = Some((
            std::mem::take(&mut self.backing_flush_waiting),
            self.backing_write_gen,
        ));
        self.issue(Device::Backing, CommandKind::Flush, Purpose::BackingFlush);
    }

    pub(super) fn backing_flush_done(&mut self, ok: bool) {
        let (waiters, gen_) = self.backing_flush_inflight.take().unwrap_or_default();
        if !ok {
            // It may have dropped writeback writes that completed before it
            // started, whichever flush the batch waits for.
            self.writeback.flush_failed();
        }
        if ok {
            self.backing_flushed_gen = self.backing_flushed_gen.max(gen_);
        } else if gen_ > self.backing_flushed_gen {
            // Bypass writes it covered may be gone; writeback's own writes
            // are rewritten from the cache by its retry. Requests queued
            // for the next flush were submitted after those writes ended,
            // so no flush can vouch for what they cover either.
            self.backing_writes_lost = true;
            self.stats.backing_flush_failures += 1;
            let mut queued = Vec::new();
            self.backing_flush_waiting.retain(|w| match *w {
                BackingWaiter::Req(req) => {
                    queued.push(req);
                    false
                }
                _ => true,
            });
            for req in queued {
                self.part_done(req, Err(IoError::BackingWritesLost));
            }
        }
        for w in waiters {
            match w {
                BackingWaiter::Req(req) => self.part_done(
                    req,
                    if ok {
                        Ok(())
                    } else {
                        Err(IoError::BackingDevice)
                    },
                ),
                BackingWaiter::Writeback => self.wb_flushed(ok),
                BackingWaiter::Shutdown => {}
            }
        }
    }

    /// The cache device failed a write or flush even after retries. Policy:
    /// go read-only. Requests waiting for durability fail, writes are refused,
    /// reads keep working (the failed buffers stay in memory), and writeback
    /// keeps draining the logs that are already durable.
    pub(super) fn fail_cache(&mut self) {
        if self.read_only {
            return;
        }
        self.read_only = true;
        for req in self.durability.take_all_waiters() {
            self.try_finish(req);
        }
        self.fail_stalled(IoError::ReadOnly);
    }
}
