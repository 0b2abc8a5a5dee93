//! The checkpoint: at a clean shutdown the index and the ring are written
//! to the checkpoint region as they are in memory, then a record flagged
//! [`RECORD_FLAG_CHECKPOINT`] vouches for them. Start-up loads them instead
//! of reading a header per log, so resume after a clean shutdown reads a few
//! hundred sequential megabytes even for a cache of tens of gigabytes, with
//! no index to rebuild.
//!
//! Trust comes from the record alone: the checkpoint's header names the
//! record's sequence number and epoch and a CRC-32C of its body, and the
//! first record of the next incarnation drops the flag before anything new
//! is written. A checkpoint left by a run that crashed is never named by the
//! newest record, and one that does not match is ignored: the logs are
//! replayed as after a crash. The logs it names are not trusted either:
//! they may have been damaged while the cache was down, so the scrub checks
//! each (header and data) before anything uses it, as after a replay.
//!
//! Mode 1 keeps a partial buffer in pmem at shutdown; its blocks are left out
//! of the checkpoint, and start-up recovers them from the pool as usual.

use std::collections::BTreeMap;

use super::index::Part;
use super::startup::StartIo;
use super::{Engine, Phase, Purpose};
use crate::format::{
    CHECKPOINT_POSITION_LEN, CheckpointHeader, CheckpointLayout, CheckpointPosition,
    RECORD_FLAG_CHECKPOINT,
};
use crate::geometry::BLOCK_SIZE;
use crate::ids::{Epoch, LogId};
use crate::io::{BufAlloc, BufId, CommandKind, DataRef, Device};

/// Bytes per checkpoint read or write, and how many run at once.
const CHUNK: u64 = 4 << 20;
const QD: u32 = 4;

#[derive(Debug, Default, PartialEq, Eq)]
pub(super) enum Save {
    /// Not started.
    #[default]
    Idle,
    /// Body chunks: the next to write, those in flight, the CRC so far;
    /// `failed`: one failed, so no more are written (those in flight end).
    Body {
        next: u64,
        inflight: u32,
        crc: u32,
        failed: bool,
    },
    /// The header, then the flush that makes the checkpoint durable.
    Header,
    Flush,
    /// Durable: the shutdown record may name it.
    Durable,
    /// Not written (read-only, damage found, or a write failed).
    Skipped,
}

impl Save {
    /// No checkpoint write is in flight or still to come.
    pub fn finished(&self) -> bool {
        matches!(self, Save::Durable | Save::Skipped)
    }

    pub fn in_progress(&self) -> bool {
        !matches!(self, Save::Idle) && !self.finished()
    }
}

/// A checkpoint being loaded at start-up.
#[derive(Debug)]
pub(super) struct Load {
    header: CheckpointHeader,
    layout: CheckpointLayout,
    /// Next body offset to read, and to apply (chunks arrive out of order).
    next_read: u64,
    next_apply: u64,
    inflight: u32,
    ready: BTreeMap<u64, BufId>,
    crc: u32,
    failed: bool,
    /// The logs it names: the scrub checks their data, as after a replay
    /// from headers, since it may have been damaged while the cache was down.
    logs: Vec<LogId>,
}

/// One section of the checkpoint: where it starts, its element size, and
/// what the elements are.
#[derive(Clone, Copy)]
enum Section {
    Positions,
    Index(Part),
}

fn sections(l: &CheckpointLayout) -> [(u64, u64, u64, Section); 4] {
    // (start, end, element size, section)
    [
        (
            l.positions,
            l.positions + l.nr_segments * CHECKPOINT_POSITION_LEN,
            CHECKPOINT_POSITION_LEN,
            Section::Positions,
        ),
        (
            l.words,
            l.words + l.nr_slots * 8,
            8,
            Section::Index(Part::Words),
        ),
        (
            l.logged,
            l.logged + l.nr_slots.div_ceil(64) * 8,
            8,
            Section::Index(Part::Logged),
        ),
        (
            l.table,
            l.table + l.table_len * 4,
            4,
            Section::Index(Part::Table),
        ),
    ]
}

/// Calls `f(section, first element, byte range within the chunk)` for each
/// section a chunk at `off` of `len` bytes overlaps. Sections and chunks are
/// 4 KiB aligned and every element size divides 4 KiB, so each overlap is
/// whole elements.
fn overlaps(
    l: &CheckpointLayout,
    off: u64,
    len: u64,
    mut f: impl FnMut(Section, u64, std::ops::Range<usize>),
) {
    for (start, end, size, s) in sections(l) {
        let (a, z) = (start.max(off), end.min(off + len));
        if a < z {
            f(
                s,
                (a - start) / size,
                (a - off) as usize..(z - off) as usize,
            );
        }
    }
}

impl<A: BufAlloc> Engine<A> {
    // ----- saving at shutdown ---------------------------------------------

    /// Nothing is moving any more: logs durable, writeback, requests and
    /// the scrub done. Only then does a checkpoint describe the cache.
    fn quiesced(&self) -> bool {
        self.phase == Phase::ShuttingDown
            && !self.read_only
            && (self.open.is_none() || self.pmem.acks_writes())
            && !self.open_fills_pending()
            && self.sealing.is_empty()
            && self.durability.is_settled()
            && !self.writeback.is_active()
            && self.reqs.is_empty()
            && self.backing_flush_inflight.is_none()
            && self.backing_flush_waiting.is_empty()
            && self.scrub.is_idle()
            && self.records.is_idle()
    }

    /// The record flag that names the checkpoint, once it is durable.
    pub(super) fn checkpoint_flag(&self) -> u32 {
        if self.save == Save::Durable && self.phase == Phase::ShuttingDown {
            RECORD_FLAG_CHECKPOINT
        } else {
            0
        }
    }

    pub(super) fn maybe_checkpoint(&mut self) {
        if self.save != Save::Idle || !self.quiesced() {
            return;
        }
        // Damage the scrub found must be found again by the next start.
        if self.scrub.nr_corrupt() > 0 {
            self.save = Save::Skipped;
            return;
        }
        // A partial pmem buffer is recovered from the pool, not from here.
        if let Some(o) = self.open.take() {
            for slot in 0..o.slots.len() as u32 {
                if let Some((block, _)) = self.current_at(o.id, slot) {
                    self.index.remove(block);
                }
            }
            self.open = Some(o);
        }
        self.save = Save::Body {
            next: BLOCK_SIZE,
            inflight: 0,
            crc: 0,
            failed: false,
        };
        self.checkpoint_write_more();
    }

    /// Encodes and writes body chunks in order, up to the queue depth.
    fn checkpoint_write_more(&mut self) {
        let layout = self.geo.checkpoint_layout();
        loop {
            let Save::Body {
                next,
                inflight,
                crc,
                failed,
            } = self.save
            else {
                return;
            };
            if failed || next >= layout.len {
                if inflight == 0 {
                    if failed {
                        // Without it the next start replays logs: nothing is lost.
                        self.save = Save::Skipped;
                    } else {
                        self.checkpoint_write_header(crc);
                    }
                }
                return;
            }
            if inflight >= QD {
                return;
            }
            let len = CHUNK.min(layout.len - next);
            let buf = self.alloc_buf(len as usize);
            self.encode_chunk(&layout, next, buf);
            let crc = crc32c::crc32c_append(crc, self.buf(buf));
            self.save = Save::Body {
                next: next + len,
                inflight: inflight + 1,
                crc,
                failed,
            };
            self.issue(
                Device::Cache,
                CommandKind::Write {
                    offset: self.geo.checkpoint_offset() + next,
                    len: len as usize,
                    src: DataRef::Engine { buf, offset: 0 },
                },
                Purpose::CheckpointWrite { buf },
            );
        }
    }

    fn encode_chunk(&mut self, layout: &CheckpointLayout, off: u64, buf: BufId) {
        let mut out = std::mem::take(&mut self.bufs[buf.0 as usize]).expect("chunk buffer");
        let bytes = out.as_mut();
        bytes.fill(0);
        let excluded = self.open.as_ref().map(|o| self.geo.position(o.id));
        overlaps(layout, off, bytes.len() as u64, |s, first, range| {
            let dst = &mut bytes[range];
            match s {
                Section::Positions => {
                    for (i, d) in dst.chunks_mut(CHECKPOINT_POSITION_LEN as usize).enumerate() {
                        let pos = first + i as u64;
                        if Some(pos) == excluded {
                            continue;
                        }
                        let seg = self.ring.at(pos);
                        let p = CheckpointPosition {
                            id: seg.id.get(),
                            epoch: seg.epoch.get(),
                            nr_slots: seg.nr_slots,
                            live_dirty: seg.live_dirty,
                        };
                        d.copy_from_slice(&p.encode());
                    }
                }
                Section::Index(part) => self.index.encode(part, first as usize, dst),
            }
        });
        self.bufs[buf.0 as usize] = Some(out);
    }

    fn checkpoint_write_header(&mut self, body_crc: u32) {
        let rec = self.next_record();
        let h = CheckpointHeader {
            seq: rec.seq,
            epoch: rec.epoch,
            cache_uuid: rec.cache_uuid,
            nr_segments: self.geo.nr_segments,
            data_blocks: self.geo.data_blocks,
            pool_blocks: self
                .open
                .as_ref()
                .map_or(0, |o| self.ring.seg(o.id).pool_committed),
            // A partial pmem buffer's log is not in it: recovery takes it
            // from the pool as the next log.
            next_id: self
                .open
                .as_ref()
                .map_or(self.ring.next_id(), |o| o.id)
                .get(),
            last_writeback_id: rec.last_writeback_id,
            index_len: self.index.len(),
            nr_dirty: self.index.nr_dirty(),
            body_crc,
        };
        let buf = self.alloc_buf(BLOCK_SIZE as usize);
        self.buf_mut(buf).copy_from_slice(&h.encode());
        self.save = Save::Header;
        self.issue(
            Device::Cache,
            CommandKind::Write {
                offset: self.geo.checkpoint_offset(),
                len: BLOCK_SIZE as usize,
                src: DataRef::Engine { buf, offset: 0 },
            },
            Purpose::CheckpointWrite { buf },
        );
    }

    pub(super) fn checkpoint_written(&mut self, buf: BufId, ok: bool) {
        self.release_buf(buf);
        match self.save {
            Save::Body {
                next,
                inflight,
                crc,
                failed,
            } => {
                self.save = Save::Body {
                    next,
                    inflight: inflight - 1,
                    crc,
                    failed: failed || !ok,
                };
                self.checkpoint_write_more();
            }
            Save::Header if ok => {
                self.save = Save::Flush;
                self.issue(Device::Cache, CommandKind::Flush, Purpose::CheckpointFlush);
            }
            _ => self.save = Save::Skipped,
        }
    }

    pub(super) fn checkpoint_flushed(&mut self, ok: bool) {
        self.save = if ok { Save::Durable } else { Save::Skipped };
        if ok {
            // The shutdown record names it.
            self.records.want();
        }
    }

    // ----- loading at start-up --------------------------------------------

    /// The newest record names a checkpoint: read its header.
    pub(super) fn checkpoint_load(&mut self) {
        let buf = self.alloc_buf(BLOCK_SIZE as usize);
        self.issue(
            Device::Cache,
            CommandKind::Read {
                offset: self.geo.checkpoint_offset(),
                len: BLOCK_SIZE as usize,
                dst: DataRef::Engine { buf, offset: 0 },
            },
            Purpose::Startup(StartIo::CheckpointHeader { buf }),
        );
    }

    pub(super) fn checkpoint_header_read(&mut self, buf: BufId, ok: bool) {
        let mut record = *self.records.current();
        if self.mutant.is(crate::mutant::Mutant::TrustAnyCheckpoint) && ok {
            // The planted bug: take the header's word for its record.
            let b = self.buf(buf);
            let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
            (record.seq, record.epoch, record.last_writeback_id) = (word(16), word(24), word(72));
        }
        let header = ok
            .then(|| CheckpointHeader::parse(self.buf(buf), &self.geo, &record).ok())
            .flatten();
        self.release_buf(buf);
        let Some(header) = header else {
            return self.checkpoint_rejected();
        };
        self.st().load = Some(Load {
            header,
            layout: self.geo.checkpoint_layout(),
            next_read: BLOCK_SIZE,
            next_apply: BLOCK_SIZE,
            inflight: 0,
            ready: BTreeMap::new(),
            crc: 0,
            failed: false,
            logs: Vec::new(),
        });
        self.checkpoint_read_more();
    }

    fn ckload(&mut self) -> &mut Load {
        self.st().load.as_mut().expect("loading a checkpoint")
    }

    fn checkpoint_read_more(&mut self) {
        loop {
            let l = self.ckload();
            if l.failed || l.inflight >= QD || l.next_read >= l.layout.len {
                return;
            }
            let (off, len) = (l.next_read, CHUNK.min(l.layout.len - l.next_read));
            l.next_read += len;
            l.inflight += 1;
            let buf = self.alloc_buf(len as usize);
            self.issue(
                Device::Cache,
                CommandKind::Read {
                    offset: self.geo.checkpoint_offset() + off,
                    len: len as usize,
                    dst: DataRef::Engine { buf, offset: 0 },
                },
                Purpose::Startup(StartIo::CheckpointChunk { off, buf }),
            );
        }
    }

    pub(super) fn checkpoint_chunk_read(&mut self, off: u64, buf: BufId, ok: bool) {
        let l = self.ckload();
        l.inflight -= 1;
        l.ready.insert(off, buf);
        l.failed |= !ok;
        // Chunks are applied in order, so the CRC runs over the body in order.
        while !self.ckload().failed {
            let l = self.ckload();
            let next = l.next_apply;
            let Some(buf) = l.ready.remove(&next) else {
                break;
            };
            let ok = self.apply_chunk(next, buf);
            self.release_buf(buf);
            let l = self.ckload();
            l.failed |= !ok;
            l.next_apply += CHUNK.min(l.layout.len - next);
        }
        let l = self.ckload();
        if l.inflight > 0 {
            if !l.failed {
                self.checkpoint_read_more();
            }
            return;
        }
        // A failure waits for the reads in flight before giving up.
        let done = !l.failed && l.next_apply >= l.layout.len && l.crc == l.header.body_crc;
        if done {
            self.checkpoint_loaded();
        } else {
            self.checkpoint_rejected();
        }
    }

    /// Checks and installs one chunk; false if any field is out of range.
    fn apply_chunk(&mut self, off: u64, buf: BufId) -> bool {
        let src = std::mem::take(&mut self.bufs[buf.0 as usize]).expect("chunk buffer");
        let bytes = src.as_ref();
        let l = self.ckload();
        l.crc = crc32c::crc32c_append(l.crc, bytes);
        let (layout, header) = (l.layout, l.header);
        let (geo, backing_blocks) = (self.geo, self.geo.backing_blocks());
        let mut ok = true;
        let mut logs = Vec::new();
        overlaps(&layout, off, bytes.len() as u64, |s, first, range| {
            let src = &bytes[range];
            match s {
                Section::Positions => {
                    for (i, b) in src.chunks(CHECKPOINT_POSITION_LEN as usize).enumerate() {
                        let pos = first + i as u64;
                        match CheckpointPosition::parse(b, pos, &geo, &header) {
                            Ok(p) if p.id != 0 => {
                                let id = LogId(p.id);
                                self.ring.restore(
                                    pos,
                                    id,
                                    Epoch(p.epoch),
                                    p.nr_slots,
                                    p.live_dirty,
                                );
                                if p.nr_slots > 0 {
                                    logs.push(id);
                                }
                            }
                            Ok(_) => {}
                            Err(_) => ok = false,
                        }
                    }
                }
                Section::Index(part) => {
                    ok &= self
                        .index
                        .restore(part, first as usize, src, backing_blocks);
                }
            }
        });
        self.bufs[buf.0 as usize] = Some(src);
        self.ckload().logs.extend(logs);
        ok
    }

    /// The whole checkpoint matched its CRC: the cache is as it was, if
    /// what it says holds together.
    fn checkpoint_loaded(&mut self) {
        let l = self.st().load.take().expect("loading a checkpoint");
        let checked = if self.mutant.is(crate::mutant::Mutant::TrustCheckpointCounts) {
            Ok(Vec::new())
        } else {
            self.check_loaded(&l.header)
        };
        let clean = match checked {
            Ok(clean) => clean,
            // What it says does not hold together: replay the logs.
            Err(_) => return self.checkpoint_rejected(),
        };
        self.index
            .restore_counts(l.header.index_len, l.header.nr_dirty);
        // Clean copies are not kept across a restart, as replay keeps none:
        // the backing device may have changed while the cache was detached.
        // One whose log still marks it dirty stays indexed (a crash would
        // bring it back otherwise) but serves no reads.
        for (block, c) in clean {
            let e = self.entry_of(c);
            if self.droppable(&e) {
                self.drop_entry(block);
            } else {
                self.update_copy(block, e.id, e.slot, |e| e.valid = 0);
            }
        }
        for id in l.logs {
            self.scrub.add(id);
        }
        self.stats.checkpoints_loaded += 1;
        if l.header.pool_blocks > 0 {
            self.st().expect_pool = Some((LogId(l.header.next_id), l.header.pool_blocks));
        }
        self.finish_replay(LogId(l.header.next_id));
    }

    /// Cross-checks a loaded checkpoint: the index table against its words
    /// and counts, each indexed copy against the position it names, and
    /// each position's dirty count against the copies. Returns the clean
    /// copies (block, copy).
    fn check_loaded(
        &self,
        header: &CheckpointHeader,
    ) -> Result<Vec<(u64, super::index::Cached)>, &'static str> {
        let db = self.geo.data_blocks;
        let mut live = vec![0u32; self.geo.nr_segments as usize];
        let mut clean = Vec::new();
        let mut misplaced = false;
        self.index
            .verify_restored(header.index_len, header.nr_dirty, |block, c| {
                let (pos, slot) = ((c.at.0 / db) as u64, c.at.0 % db);
                let seg = self.ring.at(pos);
                if seg.id == LogId::NONE || slot >= seg.nr_slots {
                    misplaced = true;
                } else if c.dirty != 0 {
                    live[pos as usize] += 1;
                } else {
                    clean.push((block, c));
                }
            })?;
        if misplaced {
            return Err("an index entry in a slot no log holds");
        }
        if (0..self.geo.nr_segments).any(|p| self.ring.at(p).live_dirty != live[p as usize]) {
            return Err("a log's dirty count that does not match the index");
        }
        Ok(clean)
    }

    /// The checkpoint cannot be used: forget what was loaded and replay
    /// the logs, as after a crash.
    fn checkpoint_rejected(&mut self) {
        if let Some(l) = self.st().load.take() {
            for b in l.ready.into_values() {
                self.release_buf(b);
            }
        }
        self.stats.checkpoints_rejected += 1;
        self.reset_for_replay();
    }
}
