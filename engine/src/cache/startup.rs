//! Start-up: read region 0, then either format (zeroed block 0 or an explicit
//! request) or recover. Recovery reads only the logs after the recorded
//! writeback frontier, in id order; the chain ends at the first one that is
//! missing, torn, from another cache or from an older incarnation than its
//! predecessor. Past that end it reads the next headers: if the record or any
//! later log says the bad one was durable, it is corruption, not a torn tail,
//! and opening fails (or, with `salvage`, skips it) instead of silently
//! dropping acknowledged logs. Nothing is written until every check has passed.
//!
//! Only headers are read at first. A log at or below the claimed durable
//! frontier was flushed before a later log or record said so, so it cannot
//! be torn: it is replayed from its header alone, and the scrub checks its
//! data after start-up, before anything reads it. Only the few logs past the
//! claim, which a crash may have torn, are read whole and checked now. So
//! resume reads a header per log instead of the whole cache.

use std::collections::BTreeMap;

use super::index::{CacheSlot, Cached};
use super::pmem_buffer::AttachCheck;
use super::{Engine, OpenLog, Phase, Purpose, Slot};
use crate::error::{FormatError, OpenError};
use crate::format::{
    BackingIdentity, DURABLE_LOOKAHEAD, META_AREA_LEN, RECORD_OFFSETS, SbRecord, Superblock,
    damaged_blocks, encode_segment_header, verify_blocks, verify_segment_header,
};
use crate::format::{Metablock, RECORD_FLAG_CHECKPOINT, RECORD_FLAG_PMEM};
use crate::geometry::{BLOCK_SIZE, Geometry};
use crate::ids::{Epoch, LogId};
use crate::io::{BufAlloc, BufId, CommandKind, DataRef, Device, Event};
use crate::mutant::Mutant;

/// Log headers read ahead during replay (small reads: a deep queue).
const REPLAY_QD: u64 = 128;

#[derive(Debug)]
pub(super) enum StartIo {
    Meta,
    FormatWrite,
    FormatFlush,
    /// `full`: the whole log was read, not only its header.
    Replay {
        id: LogId,
        buf: BufId,
        full: bool,
    },
    /// A chain log past the claims, read whole to check its data.
    Verify {
        id: LogId,
        buf: BufId,
    },
    /// The checkpoint a clean shutdown left: its header, then its body.
    CheckpointHeader {
        buf: BufId,
    },
    CheckpointChunk {
        off: u64,
        buf: BufId,
    },
    /// A salvage marks a skipped log's position as an empty log.
    TombstoneWrite {
        buf: BufId,
    },
    /// The superblock again, beside the new incarnation's record.
    SuperblockWrite {
        buf: BufId,
    },
    RecordWrite,
    RecordFlush,
}

/// An intact log past the chain's end (kept for a salvage).
#[derive(Debug)]
struct Later {
    epoch: Epoch,
    mbs: Vec<Metablock>,
    /// Its data was verified too (salvage reads whole logs).
    full: bool,
    /// Slots whose data does not match its CRC (a log a salvage reads
    /// whole, with its header intact): replayed but for those, which are
    /// quarantined, if a claim says the log was durable.
    damaged: Vec<u32>,
}

#[derive(Debug, Default)]
pub(super) struct Startup {
    buf: Option<BufId>,
    /// Next log id to read and next to apply.
    next_issue: LogId,
    next_apply: LogId,
    inflight: u64,
    prev_epoch: Epoch,
    /// Logs read but not applied yet (they arrive out of order), and
    /// whether each was read whole.
    ready: BTreeMap<LogId, (BufId, bool)>,
    spare: Vec<BufId>,
    /// Record to make durable before the cache is ready.
    record: Option<SbRecord>,
    /// The first log that did not continue the chain.
    broken: Option<LogId>,
    /// The newest intact log seen (reads go on a window past it).
    last_intact: LogId,
    /// The newest log the record or any intact header says was durable.
    claimed: LogId,
    /// Intact logs past the chain's end, by id.
    later: BTreeMap<LogId, Later>,
    /// The superblock and record writes of the new incarnation in flight.
    meta_writes: u32,
    /// The pool's slot for this log must hold at least this many blocks
    /// (what a mode 1 shutdown left there, as its checkpoint says).
    pub(super) expect_pool: Option<(LogId, u32)>,
    /// Logs whose read failed even after retries.
    unreadable: std::collections::BTreeSet<LogId>,
    /// Logs a salvage skipped, and tombstone writes in flight for them.
    skipped: Vec<(LogId, Epoch)>,
    /// Tombstones an earlier salvage left in the chain: written again, as
    /// its own writes may not have survived a flush that failed.
    found_tombstones: Vec<(LogId, Epoch)>,
    tombstones_pending: u32,
    /// Chain logs whose header was read and that no claim covers yet: they
    /// are replayed in order as claims pass them; those left at the end are
    /// read whole and checked.
    pending: std::collections::VecDeque<(LogId, Epoch, Vec<Metablock>)>,
    /// Pending logs are being read whole (the chain's last logs).
    verifying: bool,
    /// A checkpoint being loaded instead of the logs.
    pub(super) load: Option<super::checkpoint::Load>,
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

    pub(super) fn st(&mut self) -> &mut Startup {
        self.startup.as_mut().expect("starting")
    }

    fn fail_open(&mut self, e: OpenError) {
        self.phase = Phase::Failed;
        self.events.push_back(Event::OpenFailed(e));
        if let Some(st) = self.startup.take() {
            for b in st
                .buf
                .into_iter()
                .chain(st.ready.into_values().map(|(b, _)| b))
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
            StartIo::TombstoneWrite { buf } => {
                self.release_buf(buf);
                if !ok {
                    return self.fail_open(OpenError::Device {
                        op: "marking skipped logs",
                    });
                }
                let st = self.st();
                st.tombstones_pending -= 1;
                if st.tombstones_pending == 0 {
                    self.write_start_record();
                }
            }
            StartIo::FormatWrite => {
                self.issue(
                    Device::Cache,
                    CommandKind::Flush,
                    Purpose::Startup(StartIo::FormatFlush),
                );
            }
            StartIo::SuperblockWrite { buf } if !ok => {
                self.release_buf(buf);
                self.fail_open(OpenError::Device {
                    op: "writing the superblock",
                })
            }
            StartIo::SuperblockWrite { buf } => {
                self.release_buf(buf);
                self.meta_written();
            }
            StartIo::RecordWrite => {
                if let Some(b) = self.records.take_buf() {
                    self.release_buf(b);
                }
                self.meta_written();
            }
            StartIo::FormatFlush | StartIo::RecordFlush if !ok => {
                self.fail_open(OpenError::Device {
                    op: "flushing the superblock",
                })
            }
            StartIo::FormatFlush | StartIo::RecordFlush => self.become_ready(),
            StartIo::Replay { id, buf, full } => {
                self.log_read(id, buf, full, ok);
                self.apply_ready();
            }
            StartIo::Verify { id, buf } => {
                self.log_read(id, buf, true, ok);
                self.apply_verified();
            }
            StartIo::CheckpointHeader { buf } => self.checkpoint_header_read(buf, ok),
            StartIo::CheckpointChunk { off, buf } => self.checkpoint_chunk_read(off, buf, ok),
        }
    }

    /// A read of log `id` ended: its buffer waits for the in-order pass.
    /// One that failed is noted (and its buffer cleared, so it is never
    /// taken for a log): the pass decides what it means by where it lies.
    fn log_read(&mut self, id: LogId, buf: BufId, full: bool, ok: bool) {
        if !ok {
            self.buf_mut(buf).fill(0);
            self.st().unreadable.insert(id);
        }
        let st = self.st();
        st.inflight -= 1;
        st.ready.insert(id, (buf, full));
    }

    /// Log `id` could not be read. Past the chain's end it is one more log
    /// that claims nothing, as a torn one. In the chain it may hold
    /// acknowledged data: the open fails, unless a salvage ends the chain
    /// there (skipping it if a claim covers it). True if the open goes on.
    fn unreadable_log(&mut self, id: LogId) -> bool {
        let salvage = self.params.salvage;
        let st = self.st();
        if st.broken.is_none() && !salvage {
            self.fail_open(OpenError::Unreadable { log: id.get() });
            return false;
        }
        st.broken.get_or_insert(id);
        true
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
                let b = &meta[off as usize..off as usize + BLOCK_SIZE as usize];
                SbRecord::parse(b, &sb.cache_uuid).ok().map(|r| (r, b))
            })
            .max_by_key(|(r, _)| r.seq);
        let Some((record, record_block)) = best else {
            return self.fail_open(OpenError::NoRecord);
        };
        // Quarantined blocks whose damaged copies are written back; copies
        // replayed from the logs after the record end a quarantine.
        for block in SbRecord::parse_quarantine(record_block) {
            self.scrub.quarantine(block, LogId::NONE);
        }
        self.install_geometry(sb);
        self.records.install(record);
        self.ring.set_writeback_frontier(
            LogId(record.last_writeback_id),
            Epoch(record.last_writeback_epoch),
        );
        // A clean shutdown's checkpoint, unless a salvage wants every log checked.
        let any = self.mutant.is(Mutant::TrustAnyCheckpoint);
        if (record.flags & RECORD_FLAG_CHECKPOINT != 0 || any) && !self.params.salvage {
            return self.checkpoint_load();
        }
        self.replay_logs();
    }

    /// Recovery from the logs, starting after the recorded writeback frontier.
    fn replay_logs(&mut self) {
        let record = *self.records.current();
        let st = self.st();
        st.next_issue = LogId(record.last_writeback_id).next();
        st.next_apply = LogId(record.last_writeback_id).next();
        st.last_intact = LogId(record.last_writeback_id);
        st.claimed = LogId(record.durable_id);
        // The first log replayed must not be older than the last one written back.
        st.prev_epoch = Epoch(record.last_writeback_epoch);
        self.issue_replay_reads();
    }

    /// A checkpoint was partly loaded and then refused: start over from the
    /// logs with an empty ring and index.
    pub(super) fn reset_for_replay(&mut self) {
        let sb = self.sb.expect("superblock read");
        self.install_geometry(sb);
        let record = *self.records.current();
        self.ring.set_writeback_frontier(
            LogId(record.last_writeback_id),
            Epoch(record.last_writeback_epoch),
        );
        self.replay_logs();
    }

    fn install_geometry(&mut self, sb: Superblock) {
        self.geo = sb.geometry();
        self.sb = Some(sb);
        self.ring.install(self.geo);
        self.index
            .install(self.geo.nr_segments * self.geo.data_blocks as u64);
        let cache_blocks = self.geo.nr_segments * self.geo.data_blocks as u64;
        self.cleaner.install(cache_blocks as usize);
        self.admission.install(cache_blocks);
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
            durable_id: 0,
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
        let (nr, last_wb, seg_len, hl) = (
            self.geo.nr_segments,
            self.ring.last_wb(),
            self.geo.segment_size as usize,
            self.geo.header_len(),
        );
        let salvage = self.params.salvage;
        loop {
            let st = self.st();
            let past_window =
                st.broken.is_some() && st.next_issue > st.last_intact + DURABLE_LOOKAHEAD.min(nr);
            if st.inflight >= REPLAY_QD || st.next_issue - last_wb > nr || past_window {
                break;
            }
            let id = st.next_issue;
            // Headers only (the claims, and the logs they cover), unless a
            // salvage may apply the logs: it checks every log whole.
            let full = salvage;
            st.next_issue = st.next_issue.next();
            st.inflight += 1;
            let len = if full { seg_len } else { hl };
            let buf = self.replay_buf(len);
            let offset = self.geo.segment_offset(id);
            self.issue(
                Device::Cache,
                CommandKind::Read {
                    offset,
                    len,
                    dst: DataRef::Engine { buf, offset: 0 },
                },
                Purpose::Startup(StartIo::Replay { id, buf, full }),
            );
        }
        let st = self.st();
        if st.inflight == 0 && st.next_apply == st.next_issue {
            self.end_of_logs();
        }
    }

    /// A buffer of at least `len` bytes for a replay read: a spare one if
    /// it is large enough (header reads need only a header's worth).
    fn replay_buf(&mut self, len: usize) -> BufId {
        match self.st().spare.pop() {
            Some(b) if self.buf(b).len() >= len => b,
            Some(b) => {
                self.release_buf(b);
                self.alloc_buf(len)
            }
            None => self.alloc_buf(len),
        }
    }

    /// Takes the read logs in id order: while the chain holds each is
    /// replayed; past its end each intact one is kept with its claim.
    fn apply_ready(&mut self) {
        let uuid = self.records.current().cache_uuid;
        let max_epoch = self.records.epoch();
        loop {
            let st = self.st();
            let id = st.next_apply;
            let Some((buf, full)) = st.ready.remove(&id) else {
                break;
            };
            if st.unreadable.contains(&id) {
                st.spare.push(buf);
                st.next_apply = st.next_apply.next();
                if !self.unreadable_log(id) {
                    return;
                }
                continue;
            }
            let any_epoch = self.mutant.is(Mutant::NoEpochCheck);
            let hl = self.geo.header_len();
            let b = self.buf(buf);
            // A log of this cache at its place, from an incarnation that has
            // been recorded: its header's claim holds even if its data was torn
            // (the claim was made when it was sealed).
            let header = verify_segment_header(b, &self.geo, &uuid)
                .ok()
                .filter(|(h, _)| LogId(h.id) == id && (Epoch(h.epoch) <= max_epoch || any_epoch));
            let intact = header.map(|(h, mbs)| {
                let damaged = if full {
                    damaged_blocks(&b[hl..], &mbs)
                } else {
                    Vec::new()
                };
                (h, mbs, damaged)
            });
            let st = self.st();
            st.spare.push(buf);
            st.next_apply = st.next_apply.next();
            let Some((h, mbs, damaged)) = intact else {
                st.broken.get_or_insert(id);
                continue;
            };
            st.last_intact = id;
            st.claimed = st.claimed.max(LogId(h.durable_id));
            let epoch = Epoch(h.epoch);
            if !damaged.is_empty() {
                st.broken.get_or_insert(id);
                let l = Later {
                    epoch,
                    mbs,
                    full,
                    damaged,
                };
                st.later.insert(id, l);
                continue;
            }
            if st.broken.is_none() && (epoch >= st.prev_epoch || any_epoch) {
                st.prev_epoch = epoch;
                if full {
                    self.replay_log(id, epoch, &mbs, true);
                } else {
                    st.pending.push_back((id, epoch, mbs));
                }
            } else {
                st.broken.get_or_insert(id);
                let l = Later {
                    epoch,
                    mbs,
                    full,
                    damaged: Vec::new(),
                };
                st.later.insert(id, l);
            }
            self.replay_claimed();
        }
        self.issue_replay_reads();
    }

    /// Replays, from their headers, the pending logs a claim now covers.
    fn replay_claimed(&mut self) {
        loop {
            let st = self.st();
            let claimed = st.claimed;
            if st.pending.front().is_none_or(|p| p.0 > claimed) {
                return;
            }
            let (id, epoch, mbs) = st.pending.pop_front().expect("pending log");
            self.replay_log(id, epoch, &mbs, false);
        }
    }

    /// Reads whole the chain logs no claim covers: a crash may have torn them.
    fn verify_pending(&mut self) {
        let seg_len = self.geo.segment_size as usize;
        let ids: Vec<LogId> = self.st().pending.iter().map(|p| p.0).collect();
        self.st().verifying = true;
        for id in ids {
            let buf = self.replay_buf(seg_len);
            self.st().inflight += 1;
            let offset = self.geo.segment_offset(id);
            self.issue(
                Device::Cache,
                CommandKind::Read {
                    offset,
                    len: seg_len,
                    dst: DataRef::Engine { buf, offset: 0 },
                },
                Purpose::Startup(StartIo::Verify { id, buf }),
            );
        }
    }

    /// Takes the whole reads of pending logs in id order: each whose data
    /// matches its header is replayed; the first that does not ends the chain.
    fn apply_verified(&mut self) {
        let hl = self.geo.header_len();
        loop {
            let st = self.st();
            let Some(&(id, ..)) = st.pending.front() else {
                break;
            };
            let Some((buf, _)) = st.ready.remove(&id) else {
                break;
            };
            let (id, epoch, mbs) = st.pending.pop_front().expect("pending log");
            st.spare.push(buf);
            let unreadable = st.unreadable.contains(&id);
            if unreadable && !self.unreadable_log(id) {
                return;
            }
            let data_ok = !unreadable && verify_blocks(&self.buf(buf)[hl..], &mbs).is_ok();
            if !data_ok {
                let st = self.st();
                st.broken = Some(st.broken.map_or(id, |b| b.min(id)));
                // The chain ends here: the logs after it are not replayed.
                for (rest, ..) in std::mem::take(&mut st.pending) {
                    if let Some((b, _)) = st.ready.remove(&rest) {
                        st.spare.push(b);
                    }
                }
                break;
            }
            self.replay_log(id, epoch, &mbs, true);
        }
        if self.st().inflight == 0 {
            self.end_of_logs();
        }
    }

    /// Every log worth reading was read: decide where the chain ends.
    fn end_of_logs(&mut self) {
        if !self.st().verifying && !self.st().pending.is_empty() {
            return self.verify_pending();
        }
        let salvage = self.params.salvage;
        let ignore_claims = self.mutant.is(Mutant::NoDurableFrontierCheck);
        let st = self.st();
        let end = match st.broken {
            Some(bad) if bad <= st.claimed && !ignore_claims => {
                if !salvage {
                    let e = OpenError::Corrupt {
                        first_bad: bad.get(),
                        claimed: st.claimed.get(),
                    };
                    return self.fail_open(e);
                }
                self.salvage_from(bad)
            }
            Some(bad) => bad,
            None => st.next_apply,
        };
        self.finish_replay(end);
    }

    /// Replays the intact logs past a damaged one, skipping every damaged
    /// log up to the claimed frontier; returns the new chain end.
    fn salvage_from(&mut self, bad: LogId) -> LogId {
        let st = self.st();
        let claimed = st.claimed;
        let mut prev_epoch = st.prev_epoch;
        let mut later = std::mem::take(&mut st.later);
        let mut id = bad;
        loop {
            match later.remove(&id) {
                // A log with damaged blocks is replayed only if a claim says
                // it was durable (otherwise it may be a torn tail): one
                // damaged block holds only itself.
                Some(l)
                    if l.full
                        && l.epoch >= prev_epoch
                        && (l.damaged.is_empty() || id <= claimed) =>
                {
                    prev_epoch = l.epoch;
                    self.replay_log(id, l.epoch, &l.mbs, true);
                    for &slot in &l.damaged {
                        let mb = l.mbs[slot as usize];
                        if !mb.dirty {
                            continue;
                        }
                        if self.current_at(id, slot).is_some() {
                            self.drop_entry(mb.block);
                        }
                        self.scrub.quarantine(mb.block, id);
                        self.stats.corrupt_blocks_found += 1;
                    }
                }
                _ if id <= claimed => {
                    // An empty log of the previous one's epoch keeps the
                    // chain's epochs in order.
                    self.st().skipped.push((id, prev_epoch));
                    self.ring.replay(id, prev_epoch, 0);
                }
                _ => return id,
            }
            id = id.next();
        }
    }

    /// `verified`: the log's data was checked against its header; if not,
    /// the scrub checks it before anything reads it.
    fn replay_log(&mut self, id: LogId, epoch: Epoch, mbs: &[Metablock], verified: bool) {
        self.ring.replay(id, epoch, mbs.len() as u32);
        if mbs.is_empty() {
            self.st().found_tombstones.push((id, epoch));
        }
        if !verified && !mbs.is_empty() {
            self.scrub.add(id);
        }
        // The hot loop of a resume: the log's first cache slot is computed
        // once, and its dirty count kept here until the end.
        let first = self.cache_slot(id, 0);
        let mut live = 0u32;
        self.index
            .warm(mbs.iter().filter(|m| m.dirty).map(|m| m.block));
        for (slot, mb) in mbs.iter().enumerate() {
            let at = CacheSlot(first.0 + slot as u32);
            self.index.log_block(at, mb.block);
            // Clean (read-cached) blocks are not replayed: an invalidation of
            // them may not be on disk, and the backing device has their data.
            if !mb.dirty {
                continue;
            }
            // A later copy replaces the entry where it is: one probe.
            let c = Cached {
                at,
                valid: mb.valid,
                dirty: mb.valid,
                logged_dirty: true,
            };
            if let Some(old) = self.index.insert(mb.block, c)
                && old.dirty != 0
            {
                // Mode 1 may log a block twice in one log.
                match self.entry_of(old).id {
                    same if same == id => live -= 1,
                    other => self.ring.seg_mut(other).live_dirty -= 1,
                }
            }
            if mb.valid != 0 {
                live += 1;
            }
            // A durable copy newer than the record's quarantine list ends
            // the block's quarantine (if this copy is damaged too, the
            // scrub finds it again).
            self.scrub.replayed(mb.block);
        }
        self.ring.seg_mut(id).live_dirty += live;
    }

    pub(super) fn finish_replay(&mut self, next: LogId) {
        let st = self.startup.as_mut().expect("starting");
        let bufs: Vec<BufId> = st
            .ready
            .values()
            .map(|&(b, _)| b)
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
        if let Some((log, blocks)) = self.st().expect_pool
            && !self
                .recovered
                .iter()
                .any(|o| o.id == log && o.slots.len() as u32 >= blocks)
        {
            return self.fail_open(OpenError::PoolStale {
                log: log.get(),
                blocks,
            });
        }
        // A new incarnation: logs written from now on carry a higher epoch, so
        // stale logs after the chain end can never be mistaken for its continuation.
        self.ring.set_epoch(self.records.epoch().next());
        let mut skipped = std::mem::take(&mut self.st().skipped);
        self.stats.salvaged_logs_skipped += skipped.len() as u64;
        // Each skipped position becomes an empty log, so the next start
        // finds the chain whole instead of the same damage again. Those a
        // salvage marked before are marked again: the open that wrote them
        // may have failed at its flush, and a device may drop what a failed
        // flush covered while still returning it to reads.
        skipped.append(&mut self.st().found_tombstones);
        if skipped.is_empty() {
            return self.write_start_record();
        }
        self.st().tombstones_pending = skipped.len() as u32;
        let (geo, uuid, hl) = (
            self.geo,
            self.records.current().cache_uuid,
            self.geo.header_len(),
        );
        for (id, epoch) in skipped {
            let buf = self.alloc_buf(hl);
            encode_segment_header(
                self.buf_mut(buf),
                &geo,
                id.get(),
                epoch.get(),
                id.prev().get(),
                &uuid,
                &[],
            );
            self.issue(
                Device::Cache,
                CommandKind::Write {
                    offset: geo.segment_offset(id),
                    len: hl,
                    src: DataRef::Engine { buf, offset: 0 },
                },
                Purpose::Startup(StartIo::TombstoneWrite { buf }),
            );
        }
    }

    /// The record of the new incarnation; the cache is ready once it is
    /// durable. The superblock is written again beside it: had an earlier
    /// open's flush failed, the device may have dropped the superblock it
    /// still returned to reads, and a crash would then leave a device that
    /// looks blank and gets formatted.
    fn write_start_record(&mut self) {
        let rec = self.next_record();
        self.st().record = Some(rec);
        self.st().meta_writes = 2;
        // (A version 3 superblock becomes version 4: logs from now on may
        // carry quarantine markers, which a version 3 release cannot read.)
        let mut sb = self.sb.expect("superblock read");
        sb.version = crate::format::FORMAT_VERSION;
        self.sb = Some(sb);
        let sb = sb.encode();
        let buf = self.alloc_buf(BLOCK_SIZE as usize);
        self.buf_mut(buf).copy_from_slice(&sb);
        self.issue(
            Device::Cache,
            CommandKind::Write {
                offset: 0,
                len: BLOCK_SIZE as usize,
                src: DataRef::Engine { buf, offset: 0 },
            },
            Purpose::Startup(StartIo::SuperblockWrite { buf }),
        );
        self.write_record(rec, Purpose::Startup(StartIo::RecordWrite));
    }

    /// One of the new incarnation's superblock and record writes ended:
    /// after both, the flush that makes them durable.
    fn meta_written(&mut self) {
        let st = self.st();
        st.meta_writes -= 1;
        if st.meta_writes == 0 {
            self.issue(
                Device::Cache,
                CommandKind::Flush,
                Purpose::Startup(StartIo::RecordFlush),
            );
        }
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
                    // Not needed to replay; the seal computes it.
                    crc: 0,
                })
                .collect();
            // Written again as a log of the new incarnation.
            self.replay_log(id, self.records.epoch().next(), &mbs, true);
            self.ring.seg_mut(id).buf = Some(buf);
            self.ring.seg_mut(id).pool_committed = slots.len() as u32;
            self.recovered.push(OpenLog {
                id,
                buf,
                slots,
                fills_pending: 0,
                reserved: 0,
                has_dirty: true,
                seal_requested: true,
                opened_at: self.now,
                pslot: Some(i),
                relocated: 0,
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
