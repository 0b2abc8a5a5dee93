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

use std::collections::BTreeSet;

use rustc_hash::FxHashMap;

use super::{Engine, Purpose};
use crate::format::{Metablock, verify_segment_header};
use crate::geometry::BLOCK_SIZE;
use crate::ids::LogId;
use crate::io::{BufAlloc, BufId, CommandKind, DataRef, Device};

#[derive(Debug, Default)]
pub(super) struct Scrub {
    /// Logs whose data is not checked yet.
    unchecked: BTreeSet<LogId>,
    /// Unchecked logs a read or write waits for: checked first.
    wanted: BTreeSet<LogId>,
    /// The log being read.
    reading: Option<LogId>,
    buf: Option<BufId>,
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

    /// Something waits for log `id`: check it next.
    pub fn want(&mut self, id: LogId) {
        if self.unchecked.contains(&id) {
            self.wanted.insert(id);
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
        self.reading.is_none()
    }

    /// The next log to read, if none is being read.
    fn next(&mut self) -> Option<LogId> {
        if self.reading.is_some() {
            return None;
        }
        let id = self
            .wanted
            .first()
            .or_else(|| self.unchecked.first())
            .copied()?;
        self.reading = Some(id);
        Some(id)
    }

    /// Log `id` was checked (or cannot be).
    fn done(&mut self, id: LogId) {
        self.reading = None;
        self.unchecked.remove(&id);
        self.wanted.remove(&id);
    }
}

impl<A: BufAlloc> Engine<A> {
    /// Reads the next unchecked log, if the scrub is idle.
    pub(super) fn maybe_scrub(&mut self) {
        // Past the start of a shutdown only what a request waits for.
        if self.read_only
            || self.phase == super::Phase::Starting
            || (self.phase == super::Phase::ShuttingDown && self.scrub.wanted.is_empty())
        {
            return;
        }
        let Some(id) = self.scrub.next() else {
            return;
        };
        let seg_len = self.geo.segment_size as usize;
        let buf = match self.scrub.buf.take() {
            Some(b) => b,
            None => self.alloc_buf(seg_len),
        };
        self.scrub.buf = Some(buf);
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

    /// The whole log `id` was read: check each indexed copy in it.
    pub(super) fn scrub_done(&mut self, id: LogId, ok: bool) {
        self.ring.unhold(id);
        let buf = self.scrub.buf.expect("scrub buffer");
        let hl = self.geo.header_len();
        let uuid = self.records.current().cache_uuid;
        // An unreadable log, or one whose header no longer verifies, fails
        // every block in it.
        let mbs: Option<Vec<Metablock>> = ok
            .then(|| verify_segment_header(self.buf(buf), &self.geo, &uuid).ok())
            .flatten()
            .filter(|(h, _)| LogId(h.id) == id)
            .map(|(_, mbs)| mbs);
        let nr_slots = self.ring.seg(id).nr_slots;
        let mut bad = Vec::new();
        for slot in 0..nr_slots {
            let Some((block, e)) = self.current_at(id, slot) else {
                continue;
            };
            let intact = mbs
                .as_ref()
                .and_then(|m| m.get(slot as usize))
                .is_some_and(|mb| {
                    let at = hl + slot as usize * BLOCK_SIZE as usize;
                    mb.block == block
                        && crc32c::crc32c(&self.buf(buf)[at..at + BLOCK_SIZE as usize]) == mb.crc
                });
            if !intact {
                bad.push((block, e.dirty != 0));
            }
        }
        for (block, dirty) in bad {
            self.stats.corrupt_blocks_found += 1;
            if dirty {
                self.scrub.corrupt.insert(block, id);
            } else {
                self.drop_entry(block);
            }
        }
        self.scrub.done(id);
        if self.scrub.unchecked.is_empty()
            && let Some(b) = self.scrub.buf.take()
        {
            self.release_buf(b);
        }
        self.retry_deferred_reads();
    }
}
