//! The scrub: checks the data of logs that start-up replayed from their
//! headers alone, against the per-block CRC-32C in each metablock.
//!
//! Resume reads one header per log, so its time does not grow with the dirty
//! data; the data is checked here instead, in id order, and before anything
//! uses it: a read or a fill that needs an unchecked log waits for it (and
//! moves it to the front), and writeback takes only checked logs. A dirty
//! block whose newest copy fails its checksum is quarantined (see
//! `quarantine`): it holds only itself. A clean copy that fails stops
//! serving reads; the backing device has its data.
//!
//! An entry is about a log, not a ring position: when a new log takes the
//! position over, the old log's entry goes (its blocks left the index with
//! it), so the scrub never checks one log's data against another's header
//! nor holds a position for a log that is gone. A log none of whose indexed
//! copies serves reads needs no check and is not read. The scrub runs in
//! read-only mode too (reads still need it), keeps a few reads in flight,
//! and a read that fails even after the retries is a device error, not
//! damage: the log stays unchecked, reads that need it fail with
//! `CacheDevice` meanwhile, and it is read again after a delay.

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::FxHashMap;

use super::{Engine, Purpose};
use crate::format::{MAX_QUARANTINE, Metablock, verify_segment_header};
use crate::geometry::BLOCK_SIZE;
use crate::ids::{Epoch, LogId};
use crate::io::{BufAlloc, BufId, CommandKind, DataRef, Device, Nanos};

/// Logs read at once.
const SCRUB_QD: usize = 4;
/// Delay before a log whose read failed is read again.
const SCRUB_RETRY_NS: Nanos = 1_000_000_000;

#[derive(Debug, Default)]
pub(super) struct Scrub {
    /// Logs whose data is not checked yet.
    unchecked: BTreeSet<LogId>,
    /// Unchecked logs a read or write waits for: checked first.
    wanted: BTreeSet<LogId>,
    /// Logs being read, each into its buffer.
    reading: BTreeMap<LogId, BufId>,
    /// Unchecked logs whose read failed: not read again before `retry_at`.
    failed: BTreeSet<LogId>,
    retry_at: Option<Nanos>,
    spare: Vec<BufId>,
    /// Quarantined blocks, each with the log holding its damaged copy
    /// (`NONE` when the record's list named it: that copy is written back).
    corrupt: FxHashMap<u64, LogId>,
    /// Blocks rewritten whole since they were quarantined, with the log of
    /// the new copy and of the damaged one: they stay on the record's list
    /// until the new copy is durable.
    rewrites: FxHashMap<u64, (LogId, LogId)>,
    /// Quarantined blocks whose older sectors could not be read (a device
    /// error, not damage at rest): they fail with `CacheDevice`.
    unreadable_blocks: rustc_hash::FxHashSet<u64>,
}

impl Scrub {
    /// Start-up replayed log `id` from its header.
    pub fn add(&mut self, id: LogId) {
        self.unchecked.insert(id);
    }

    /// On every read and write: after the scrub is done, a length check.
    pub fn is_unchecked(&self, id: LogId) -> bool {
        !self.unchecked.is_empty() && self.unchecked.contains(&id)
    }

    /// The last read of unchecked log `id` failed: what needs it fails
    /// until a read succeeds.
    pub fn is_unreadable(&self, id: LogId) -> bool {
        !self.failed.is_empty() && self.failed.contains(&id)
    }

    /// Some block is quarantined or some log unreadable: writes covering
    /// part of a block need a look. (One check on the write path otherwise.)
    pub fn refuses_anything(&self) -> bool {
        !self.corrupt.is_empty() || !self.failed.is_empty()
    }

    /// Something waits for log `id`: check it next.
    pub fn want(&mut self, id: LogId) {
        if self.unchecked.contains(&id) {
            self.wanted.insert(id);
        }
    }

    /// Log `id` left its ring position (a new log took it over): there is
    /// nothing of it left to check.
    pub fn forget(&mut self, id: LogId) {
        if !self.unchecked.is_empty() && !self.reading.contains_key(&id) {
            self.unchecked.remove(&id);
            self.wanted.remove(&id);
            self.failed.remove(&id);
        }
    }

    /// Logs not checked yet.
    pub fn nr_unchecked(&self) -> u64 {
        self.unchecked.len() as u64
    }

    /// Writeback, past log `after`, may take logs up to (not including)
    /// this one. Quarantined blocks stop it only when the record's list
    /// cannot hold them all: a damaged copy must then stay replayable.
    pub fn first_unusable(&self, after: LogId) -> Option<LogId> {
        let unchecked = self.unchecked.range(after.next()..).next().copied();
        let overflow = (self.corrupt.len() + self.rewrites.len() > MAX_QUARANTINE).then(|| {
            self.corrupt
                .values()
                .chain(self.rewrites.values().map(|(_, old)| old))
                .filter(|&&id| id > after)
                .min()
                .copied()
        });
        unchecked.into_iter().chain(overflow.flatten()).min()
    }

    pub fn is_corrupt(&self, block: u64) -> bool {
        !self.corrupt.is_empty() && self.corrupt.contains_key(&block)
    }

    pub fn nr_corrupt(&self) -> u64 {
        self.corrupt.len() as u64
    }

    /// `block`'s newest copy, in log `id`, is damaged (`NONE`: the record's
    /// list says so).
    pub fn quarantine(&mut self, block: u64, id: LogId) {
        self.corrupt.insert(block, id);
        self.rewrites.remove(&block);
        self.unreadable_blocks.remove(&block);
    }

    /// `block`'s older dirty sectors, in log `id`, could not be read into
    /// its new copy: quarantined as [`quarantine`](Self::quarantine) does,
    /// failing as a device error.
    pub fn quarantine_unreadable(&mut self, block: u64, id: LogId) {
        self.quarantine(block, id);
        self.unreadable_blocks.insert(block);
    }

    /// The error reads of `block`, and writes to part of it, get while it
    /// is quarantined; None if it is not.
    pub fn quarantine_error(&self, block: u64) -> Option<crate::error::IoError> {
        if !self.is_corrupt(block) {
            return None;
        }
        Some(if self.unreadable_blocks.contains(&block) {
            crate::error::IoError::CacheDevice
        } else {
            crate::error::IoError::Corrupt
        })
    }

    /// Quarantined blocks.
    pub fn quarantined(&self) -> impl Iterator<Item = u64> + '_ {
        self.corrupt.keys().copied()
    }

    /// Replay met a durable copy of `block` newer than the record's list.
    pub fn replayed(&mut self, block: u64) {
        if !self.corrupt.is_empty() {
            self.corrupt.remove(&block);
        }
    }

    /// The quarantine of `block` is dropped on request.
    pub fn drop_quarantine(&mut self, block: u64) -> bool {
        self.rewrites.remove(&block);
        self.unreadable_blocks.remove(&block);
        self.corrupt.remove(&block).is_some()
    }

    /// Every log up to `frontier` is durable: rewrites in them no longer
    /// need the record's list.
    pub fn rewrites_durable(&mut self, frontier: LogId) {
        if !self.rewrites.is_empty() {
            self.rewrites.retain(|_, (new, _)| *new > frontier);
        }
    }

    /// The record's quarantine list: quarantined blocks and rewrites not
    /// durable yet, ascending, at most what a record holds.
    pub fn record_list(&self) -> Vec<u64> {
        if self.corrupt.is_empty() && self.rewrites.is_empty() {
            return Vec::new();
        }
        let mut v: Vec<u64> = self
            .corrupt
            .keys()
            .chain(self.rewrites.keys())
            .copied()
            .collect();
        v.sort_unstable();
        v.dedup();
        v.truncate(MAX_QUARANTINE);
        v
    }

    /// A whole new copy of `block`, in log `id`, replaced the damaged
    /// one: reads are served again, and the record keeps listing the block
    /// until the new copy is durable.
    pub fn rewritten(&mut self, block: u64, id: LogId) {
        if self.corrupt.is_empty() {
            return;
        }
        if let Some(old) = self.corrupt.remove(&block) {
            self.rewrites.insert(block, (id, old));
            self.unreadable_blocks.remove(&block);
        }
    }

    pub fn is_idle(&self) -> bool {
        self.reading.is_empty()
    }

    /// When failed logs may be read again.
    pub fn retry_at(&self) -> Option<Nanos> {
        self.retry_at
    }

    pub fn retry_if_due(&mut self, now: Nanos) {
        if self.retry_at.is_some_and(|t| t <= now) {
            self.retry_at = None;
            self.failed.clear();
        }
    }

    /// The next log to read: a wanted one first, then in id order; none
    /// being read or waiting for its retry.
    fn next(&self) -> Option<LogId> {
        let free = |id: &&LogId| !self.reading.contains_key(id) && !self.failed.contains(id);
        self.wanted
            .iter()
            .find(free)
            .or_else(|| self.unchecked.iter().find(free))
            .copied()
    }

    /// Log `id` was checked (or needs no check).
    fn done(&mut self, id: LogId) {
        self.unchecked.remove(&id);
        self.wanted.remove(&id);
        self.failed.remove(&id);
    }
}

impl<A: BufAlloc> Engine<A> {
    /// Reads the next unchecked logs, up to the scrub's window.
    pub(super) fn maybe_scrub(&mut self) {
        // Every input pumps: once the scrub is through, one check.
        if self.scrub.unchecked.is_empty() && self.scrub.spare.is_empty() {
            return;
        }
        // Past the start of a shutdown only what a request waits for.
        if self.phase == super::Phase::Starting
            || (self.phase == super::Phase::ShuttingDown && self.scrub.wanted.is_empty())
        {
            return;
        }
        // (The planted bug reads one log at a time, as the scrub once did.)
        let qd = if self
            .mutant
            .is(crate::mutant::Mutant::ScrubIgnoresPositionReuse)
        {
            1
        } else {
            SCRUB_QD
        };
        while self.scrub.reading.len() < qd
            && let Some(id) = self.scrub.next()
        {
            if !self.needs_scrub(id) {
                self.scrub.done(id);
                continue;
            }
            let seg_len = self.geo.segment_size as usize;
            let buf = match self.scrub.spare.pop() {
                Some(b) => b,
                None => self.alloc_buf(seg_len),
            };
            self.scrub.reading.insert(id, buf);
            self.ring.hold(id);
            self.issue(
                Device::Cache,
                CommandKind::Read {
                    offset: self.geo.segment_offset(id),
                    len: seg_len,
                    dst: DataRef::Engine { buf, offset: 0 },
                },
                Purpose::Scrub { id },
            );
        }
        if self.scrub.unchecked.is_empty() && self.scrub.reading.is_empty() {
            for b in std::mem::take(&mut self.scrub.spare) {
                self.release_buf(b);
            }
        }
    }

    /// Whether log `id` still holds its position and a copy that serves
    /// reads (or waits for writeback).
    fn needs_scrub(&self, id: LogId) -> bool {
        if self
            .mutant
            .is(crate::mutant::Mutant::ScrubIgnoresPositionReuse)
        {
            return true;
        }
        let seg = self.ring.seg(id);
        seg.id == id
            && seg.buf.is_none()
            && (0..seg.nr_slots)
                .any(|slot| self.current_at(id, slot).is_some_and(|(_, e)| e.valid != 0))
    }

    /// The whole log `id` was read: check each indexed copy in it.
    pub(super) fn scrub_done(&mut self, id: LogId, ok: bool) {
        self.ring.unhold(id);
        let buf = self.scrub.reading.remove(&id).expect("scrub buffer");
        self.scrub.spare.push(buf);
        if !ok {
            // A device error, not damage: fail what needs the log for now,
            // and read it again later.
            self.stats.scrub_read_errors += 1;
            self.scrub.failed.insert(id);
            self.scrub.retry_at.get_or_insert(self.now + SCRUB_RETRY_NS);
            self.retry_deferred_reads();
            return;
        }
        let hl = self.geo.header_len();
        let uuid = self.records.current().cache_uuid;
        // The position still holds log `id` (the read held it); its header
        // must be that log's, of the epoch it was written with: a lost
        // write may leave an older incarnation's log of the same id.
        let epoch: Epoch = self.ring.seg(id).epoch;
        let mbs: Option<Vec<Metablock>> = verify_segment_header(self.buf(buf), &self.geo, &uuid)
            .ok()
            .filter(|(h, _)| LogId(h.id) == id && Epoch(h.epoch) == epoch)
            .map(|(_, mbs)| mbs);
        let nr_slots = self.ring.seg(id).nr_slots;
        let mut bad = Vec::new();
        for slot in 0..nr_slots {
            let Some((block, e)) = self.current_at(id, slot) else {
                continue;
            };
            if e.valid == 0 {
                continue;
            }
            let intact = mbs
                .as_ref()
                .and_then(|m| m.get(slot as usize))
                .is_some_and(|mb| {
                    let at = hl + slot as usize * BLOCK_SIZE as usize;
                    mb.block == block
                        && crc32c::crc32c(&self.buf(buf)[at..at + BLOCK_SIZE as usize]) == mb.crc
                });
            if !intact {
                bad.push((block, e));
            }
        }
        for (block, e) in bad {
            self.stats.corrupt_blocks_found += 1;
            if e.dirty != 0 {
                self.scrub.quarantine(block, id);
            } else if self.droppable(&e) {
                self.drop_entry(block);
            } else {
                // Its log still marks it dirty, so the entry stays (a
                // restart would bring the copy back otherwise), but it no
                // longer serves reads: the backing device has its data.
                self.update_copy(block, id, e.slot, |e| e.valid = 0);
            }
        }
        self.scrub.done(id);
        self.retry_deferred_reads();
    }
}
