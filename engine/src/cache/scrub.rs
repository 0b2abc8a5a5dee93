//! The scrub: checks the data of logs that start-up replayed from their
//! headers alone, against the per-block CRC-32C in each metablock.
//!
//! Resume reads one header per log, so its time does not grow with the dirty
//! data; the data is checked here instead, one log at a time in id order,
//! and before anything uses it: a read or a fill that needs an unchecked log
//! waits for it (and moves it to the front), and writeback takes only
//! checked logs. A block whose newest copy fails its checksum is corrupt:
//! reads of it fail, writeback stops before its log (so restart finds the
//! damage again) and the status says to reopen with `salvage`. A clean copy
//! that fails is dropped; the backing device has its data.

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::FxHashMap;

use super::{Engine, Purpose};
use crate::format::{Metablock, verify_segment_header};
use crate::geometry::BLOCK_SIZE;
use crate::ids::{Epoch, LogId};
use crate::io::{BufAlloc, BufId, CommandKind, DataRef, Device, Nanos};

/// Logs read at once.
const SCRUB_QD: usize = 4;
/// Delay before a log whose read failed is read again.
pub(super) const SCRUB_RETRY_NS: Nanos = 1_000_000_000;

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
    /// Blocks whose newest copy failed its checksum, and the log holding it.
    corrupt: FxHashMap<u64, LogId>,
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
    /// this one.
    pub fn first_unusable(&self, after: LogId) -> Option<LogId> {
        let unchecked = self.unchecked.range(after.next()..).next().copied();
        let corrupt = self.corrupt.values().min().copied();
        unchecked.into_iter().chain(corrupt).min()
    }

    pub fn is_corrupt(&self, block: u64) -> bool {
        !self.corrupt.is_empty() && self.corrupt.contains_key(&block)
    }

    pub fn nr_corrupt(&self) -> u64 {
        self.corrupt.len() as u64
    }

    /// A whole new copy of `block` replaced the corrupt one.
    pub fn rewritten(&mut self, block: u64) {
        if !self.corrupt.is_empty() {
            self.corrupt.remove(&block);
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
        if self.reading.len() >= SCRUB_QD {
            return None;
        }
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
        // Past the start of a shutdown only what a request waits for.
        if self.phase == super::Phase::Starting
            || (self.phase == super::Phase::ShuttingDown && self.scrub.wanted.is_empty())
        {
            return;
        }
        while let Some(id) = self.scrub.next() {
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
                self.scrub.corrupt.insert(block, id);
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
