//! Start-up: read region 0, then either format (zeroed block 0 or an explicit
//! request) or recover. Recovery reads only the logs after the recorded
//! writeback frontier, in id order, and stops at the first one that is missing,
//! torn, from another cache or from an older incarnation than its predecessor.
//! Nothing is written until every check has passed.

use std::collections::BTreeMap;

use super::pmem_buffer::AttachCheck;
use super::{Engine, Entry, OpenLog, Phase, Purpose, Slot};
use crate::error::{FormatError, OpenError};
use crate::format::{
    BackingIdentity, META_AREA_LEN, RECORD_OFFSETS, SbRecord, Superblock, verify_segment,
};
use crate::format::{Metablock, RECORD_FLAG_PMEM};
use crate::geometry::{BLOCK_SIZE, Geometry};
use crate::ids::{Epoch, LogId};
use crate::io::{BufAlloc, BufId, CommandKind, DataRef, Device, Event};
use crate::mutant::Mutant;

/// Logs read ahead during replay.
const REPLAY_QD: u64 = 4;

#[derive(Debug)]
pub(super) enum StartIo {
    Meta,
    FormatWrite,
    FormatFlush,
    Replay { id: LogId, buf: BufId },
    RecordWrite,
    RecordFlush,
}

#[derive(Debug, Default)]
pub(super) struct Startup {
    buf: Option<BufId>,
    /// Next log id to read and next to apply.
    next_issue: LogId,
    next_apply: LogId,
    inflight: u64,
    stop: bool,
    prev_epoch: Epoch,
    /// Logs read but not applied yet (they arrive out of order).
    ready: BTreeMap<LogId, BufId>,
    spare: Vec<BufId>,
    /// Record to make durable before the cache is ready.
    record: Option<SbRecord>,
}

impl<A: BufAlloc> Engine<A> {
    pub(super) fn start(&mut self) {
        self.startup = Some(Startup::default());
        if self.params.cache_size < META_AREA_LEN as u64 {
            let e = FormatError::CacheTooSmall {
                cache_size: self.params.cache_size,
                needed: 3 * self.params.segment_size,
            };
            return self.fail_open(OpenError::Geometry(e));
        }
        let buf = self.alloc_buf(META_AREA_LEN);
        self.st().buf = Some(buf);
        self.issue(
            Device::Cache,
            CommandKind::Read {
                offset: 0,
                len: META_AREA_LEN,
                dst: DataRef::Engine { buf, offset: 0 },
            },
            Purpose::Startup(StartIo::Meta),
        );
    }

    fn st(&mut self) -> &mut Startup {
        self.startup.as_mut().expect("starting")
    }

    fn fail_open(&mut self, e: OpenError) {
        self.phase = Phase::Failed;
        self.events.push_back(Event::OpenFailed(e));
        if let Some(st) = self.startup.take() {
            for b in st
                .buf
                .into_iter()
                .chain(st.ready.into_values())
                .chain(st.spare)
            {
                self.release_buf(b);
            }
        }
    }

    pub(super) fn startup_done(&mut self, io: StartIo, ok: bool) {
        if self.phase != Phase::Starting {
            return;
        }
        match io {
            StartIo::Meta if !ok => self.fail_open(OpenError::Device {
                op: "reading the superblock",
            }),
            StartIo::Meta => self.meta_read(),
            StartIo::FormatWrite | StartIo::RecordWrite if !ok => {
                self.fail_open(OpenError::Device {
                    op: "writing the superblock",
                })
            }
            StartIo::FormatWrite => {
                self.issue(
                    Device::Cache,
                    CommandKind::Flush,
                    Purpose::Startup(StartIo::FormatFlush),
                );
            }
            StartIo::RecordWrite => {
                if let Some(b) = self.records.take_buf() {
                    self.release_buf(b);
                }
                self.issue(
                    Device::Cache,
                    CommandKind::Flush,
                    Purpose::Startup(StartIo::RecordFlush),
                );
            }
            StartIo::FormatFlush | StartIo::RecordFlush if !ok => {
                self.fail_open(OpenError::Device {
                    op: "flushing the superblock",
                })
            }
            StartIo::FormatFlush | StartIo::RecordFlush => self.become_ready(),
            StartIo::Replay { id, buf } => {
                let st = self.st();
                st.inflight -= 1;
                st.ready.insert(id, buf);
                if !ok {
                    return self.fail_open(OpenError::Device { op: "reading logs" });
                }
                self.apply_ready();
            }
        }
    }

    fn meta_read(&mut self) {
        let buf = self.st().buf.take().expect("meta buffer");
        let meta = self.buf(buf).to_vec();
        self.release_buf(buf);
        let zeroed = meta[..BLOCK_SIZE as usize].iter().all(|&b| b == 0);
        if self.params.format || zeroed {
            return self.format();
        }
        let sb = match Superblock::parse(&meta[..BLOCK_SIZE as usize], self.params.cache_size) {
            Ok(sb) => sb,
            Err(e) => return self.fail_open(OpenError::Superblock(e)),
        };
        if sb.backing != self.params.backing {
            let hex = |u: &[u8; 16]| u.iter().map(|b| format!("{b:02x}")).collect::<String>();
            let e = OpenError::BackingMismatch {
                expected: hex(&sb.backing.uuid),
                expected_size: sb.backing.size,
                got: hex(&self.params.backing.uuid),
                got_size: self.params.backing.size,
            };
            return self.fail_open(e);
        }
        let best = RECORD_OFFSETS
            .iter()
            .filter_map(|&off| {
                let at = off as usize;
                SbRecord::parse(&meta[at..at + BLOCK_SIZE as usize], &sb.cache_uuid).ok()
            })
            .max_by_key(|r| r.seq);
        let Some(record) = best else {
            return self.fail_open(OpenError::NoRecord);
        };
        self.install_geometry(sb);
        self.records.install(record);
        self.ring.set_writeback_frontier(
            LogId(record.last_writeback_id),
            Epoch(record.last_writeback_epoch),
        );
        let st = self.st();
        st.next_issue = LogId(record.last_writeback_id).next();
        st.next_apply = LogId(record.last_writeback_id).next();
        // The first log replayed must not be older than the last one written back.
        st.prev_epoch = Epoch(record.last_writeback_epoch);
        self.issue_replay_reads();
    }

    fn install_geometry(&mut self, sb: Superblock) {
        self.geo = sb.geometry();
        self.sb = Some(sb);
        self.ring.install(self.geo);
    }

    fn format(&mut self) {
        let p = &self.params;
        let geo = match Geometry::new(p.segment_size, p.cache_size, p.backing.size) {
            Ok(g) => g,
            Err(e) => return self.fail_open(OpenError::Geometry(e)),
        };
        let backing = BackingIdentity {
            uuid: p.backing.uuid,
            size: p.backing.size,
        };
        let sb = Superblock::new(&geo, p.new_cache_uuid, backing, p.cache_size);
        // Record slot 0 is zeroed, slot 1 gets seq 1: both slots are defined.
        let record = SbRecord {
            seq: 1,
            last_writeback_id: 0,
            last_writeback_epoch: 0,
            epoch: 1,
            cache_uuid: p.new_cache_uuid,
            flags: if p.mode == crate::config::BufferMode::Persistent {
                crate::format::RECORD_FLAG_PMEM
            } else {
                0
            },
        };
        let buf = self.alloc_buf(META_AREA_LEN);
        {
            let b = self.buf_mut(buf);
            b[..BLOCK_SIZE as usize].copy_from_slice(&sb.encode());
            let at = record.offset() as usize;
            b[at..at + BLOCK_SIZE as usize].copy_from_slice(&record.encode());
        }
        self.install_geometry(sb);
        self.records.install(record);
        if let Err(e) = self.pmem_attach(true) {
            return self.fail_open(e);
        }
        self.ring.set_epoch(Epoch(record.epoch));
        self.ring.set_next_id(LogId(1));
        self.durability.reset(LogId::NONE);
        self.records.set_buf(buf);
        self.issue(
            Device::Cache,
            CommandKind::Write {
                offset: 0,
                len: META_AREA_LEN,
                src: DataRef::Engine { buf, offset: 0 },
            },
            Purpose::Startup(StartIo::FormatWrite),
        );
    }

    fn issue_replay_reads(&mut self) {
        let (nr, last_wb, seg_len) = (
            self.geo.nr_segments,
            self.ring.last_wb(),
            self.geo.segment_size as usize,
        );
        loop {
            let st = self.st();
            if st.stop || st.inflight >= REPLAY_QD || st.next_issue - last_wb > nr {
                break;
            }
            let id = st.next_issue;
            st.next_issue = st.next_issue.next();
            st.inflight += 1;
            let buf = match st.spare.pop() {
                Some(b) => b,
                None => self.alloc_buf(seg_len),
            };
            let offset = self.geo.segment_offset(id);
            self.issue(
                Device::Cache,
                CommandKind::Read {
                    offset,
                    len: seg_len,
                    dst: DataRef::Engine { buf, offset: 0 },
                },
                Purpose::Startup(StartIo::Replay { id, buf }),
            );
        }
        let st = self.st();
        if st.inflight == 0 && (st.stop || st.next_apply == st.next_issue) {
            self.finish_replay();
        }
    }

    /// Applies read logs in id order while the chain holds.
    fn apply_ready(&mut self) {
        let uuid = self.records.current().cache_uuid;
        let max_epoch = self.records.epoch();
        loop {
            let st = self.st();
            let id = st.next_apply;
            if st.stop {
                break;
            }
            let Some(buf) = st.ready.remove(&id) else {
                break;
            };
            let prev_epoch = st.prev_epoch;
            let any_epoch = self.mutant.is(Mutant::NoEpochCheck);
            let verdict = verify_segment(self.buf(buf), &self.geo, &uuid);
            let st = self.st();
            st.spare.push(buf);
            match verdict {
                Ok((h, mbs))
                    if LogId(h.id) == id
                        && ((Epoch(h.epoch) >= prev_epoch && Epoch(h.epoch) <= max_epoch)
                            || any_epoch) =>
                {
                    st.prev_epoch = Epoch(h.epoch);
                    st.next_apply = st.next_apply.next();
                    self.replay_log(id, Epoch(h.epoch), &mbs);
                }
                _ => st.stop = true,
            }
        }
        self.issue_replay_reads();
    }

    fn replay_log(&mut self, id: LogId, epoch: Epoch, mbs: &[crate::format::Metablock]) {
        self.ring
            .replay(id, epoch, mbs.iter().map(|m| m.block).collect());
        for (slot, mb) in mbs.iter().enumerate() {
            // Clean (read-cached) blocks are not replayed: an invalidation of
            // them may not be on disk, and the backing device has their data.
            if !mb.dirty {
                continue;
            }
            if self.index.contains_key(&mb.block) {
                self.drop_entry(mb.block);
            }
            self.index.insert(
                mb.block,
                Entry {
                    id,
                    slot: slot as u32,
                    valid: mb.valid,
                    dirty: mb.valid,
                    logged_dirty: true,
                },
            );
            if mb.valid != 0 {
                self.ring.seg_mut(id).live_dirty += 1;
            }
        }
    }

    fn finish_replay(&mut self) {
        let st = self.startup.as_mut().expect("starting");
        let next = st.next_apply;
        let bufs: Vec<BufId> = st
            .ready
            .values()
            .copied()
            .chain(st.spare.drain(..))
            .collect();
        st.ready.clear();
        for b in bufs {
            self.release_buf(b);
        }
        self.ring.set_next_id(next);
        self.durability.reset(next - 1);
        if let Err(e) = self.pmem_attach(false) {
            return self.fail_open(e);
        }
        // A new incarnation: logs written from now on carry a higher epoch, so
        // stale logs after the chain end can never be mistaken for its continuation.
        self.ring.set_epoch(self.records.epoch().next());
        let rec = self.next_record();
        self.st().record = Some(rec);
        self.write_record(rec, Purpose::Startup(StartIo::RecordWrite));
    }

    fn become_ready(&mut self) {
        if let Some(b) = self.records.take_buf() {
            self.release_buf(b);
        }
        if let Some(rec) = self.startup.take().and_then(|st| st.record) {
            self.records.install(rec);
        }
        if self.pmem.acks_writes() {
            let busy: Vec<BufId> = self.recovered.iter().map(|o| o.buf).collect();
            self.free_log_bufs = self
                .pmem
                .slot_bufs()
                .iter()
                .copied()
                .filter(|b| !busy.contains(b))
                .collect();
        } else {
            let seg_len = self.geo.segment_size as usize;
            for _ in 0..self.params.nr_buffers {
                let b = self.alloc_buf(seg_len);
                self.free_log_bufs.push(b);
            }
        }
        self.records.opened(self.now);
        self.phase = Phase::Running;
        // What the pool held goes to the cache device as logs (ids continue
        // right after the last durable log).
        for o in std::mem::take(&mut self.recovered) {
            self.seal_log(o);
        }
        self.events.push_back(Event::Ready);
    }

    /// Checks the pmem pool against this cache and recovers its slots.
    /// `formatted`: the cache was formatted now, so the pool is too.
    fn pmem_attach(&mut self, formatted: bool) -> Result<(), OpenError> {
        let had_pmem = self.records.current().flags & RECORD_FLAG_PMEM != 0;
        if !self.pmem.has_pool() {
            if !formatted && had_pmem {
                return Err(OpenError::PoolRequired);
            }
            return Ok(());
        }
        let check = AttachCheck {
            cache_uuid: self.records.current().cache_uuid,
            formatted,
            format_requested: self.params.format,
            had_pmem,
        };
        let layout = self.pmem.attach(&self.geo, check)?;
        if self.pmem.acks_writes() {
            let seg_len = self.geo.segment_size as usize;
            for _ in 0..layout.nr_slots.min(self.params.nr_buffers) {
                let b = self.alloc_buf(seg_len);
                self.pmem.add_slot_buf(b);
            }
        }
        self.recover_slots();
        Ok(())
    }

    /// Turns the pool slots holding logs newer than the last durable one
    /// into logs again, with every committed block, in id order.
    fn recover_slots(&mut self) {
        let durable = self.ring.next_id() - 1;
        let mut stale = Vec::new();
        let (hl, seg_len) = (self.geo.header_len(), self.geo.segment_size as usize);
        let mut done = false;
        for (id, i) in self.pmem.slots_after(durable) {
            // Logs are opened in id order with their slot header persisted
            // first, so only a run continuing the durable logs is genuine.
            if done || id != self.ring.next_id() {
                stale.push(i);
                continue;
            }
            let buf = match self.pmem.slot_bufs().get(i as usize) {
                Some(&b) => b,
                None => self.alloc_buf(seg_len),
            };
            let mut slots = Vec::new();
            let dst = self.bufs[buf.0 as usize]
                .as_mut()
                .expect("slot buffer")
                .as_mut();
            self.pmem.read_slot(i, id, &self.geo, |e, data| {
                let at = hl + slots.len() * BLOCK_SIZE as usize;
                dst[at..at + BLOCK_SIZE as usize].copy_from_slice(data);
                slots.push(Slot {
                    block: e.block,
                    valid: e.valid,
                    dirty: true,
                    fill: 0,
                    crc: None,
                });
            });
            if slots.is_empty() {
                // The open buffer, with nothing acknowledged in it yet.
                if !self.pmem.owns(buf) {
                    self.release_buf(buf);
                }
                stale.push(i);
                done = true;
                continue;
            }
            let mbs: Vec<Metablock> = slots
                .iter()
                .map(|s| Metablock {
                    block: s.block,
                    valid: s.valid,
                    dirty: true,
                })
                .collect();
            // Written again as a log of the new incarnation.
            self.replay_log(id, self.records.epoch().next(), &mbs);
            self.ring.seg_mut(id).buf = Some(buf);
            self.ring.seg_mut(id).pool_committed = slots.len() as u32;
            self.recovered.push(OpenLog {
                id,
                buf,
                slots,
                fills_pending: 0,
                has_dirty: true,
                seal_requested: true,
                opened_at: self.now,
                pslot: Some(i),
            });
            self.ring.set_next_id(id + 1);
        }
        // Slots not recovered hold nothing acknowledged (a later slot cannot
        // hold acknowledged data without every earlier one). Clear them, so a
        // later recovery can never take them for a continuation of new logs.
        for i in stale {
            self.pmem.clear_slot(i);
        }
        if !self.recovered.is_empty() {
            self.pmem.recovered_up_to(self.ring.next_id() - 1);
        }
    }
}
