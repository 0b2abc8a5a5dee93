//! Write grants: slots of the open log reserved for a submitter that copies
//! a write's data into them and computes its checksum on its own core, so
//! the engine's thread keeps only the metadata work.
//!
//! ```text
//! let g = engine.grant(16, now)?;          // on the engine's thread
//! // on the submitting core: copy 4 KiB blocks into the buffer at
//! // g.offset + i × 4096 and take their CRC-32C
//! engine.submit_granted_write(req, offset, g.log, g.first_slot + i, &crcs, fua, now)?;
//! engine.return_grant(g.log, unused_first, unused_count, now);
//! ```
//!
//! Publications may come in any order, from any number of submitters. The
//! rules that keep replay right:
//! - A log is sealed only once every slot reserved in it is published or
//!   returned ([`Engine::grants_wanted_back`] names the logs that wait).
//! - A returned slot is padding: logged as an empty metablock, never
//!   indexed.
//! - Replay takes a log's slots, and the logs, in position order, and the
//!   newest position of a block wins. A publication into a slot older than
//!   the block's current copy (a grant taken before a later write of the
//!   same block was placed) would lose to that copy on replay, though it is
//!   newer. Its data is placed again at the head instead, as an ordinary
//!   write, and the granted slot becomes padding.
//! - A write is acknowledged only after its publication is indexed, so a
//!   read on any core that follows the acknowledgement finds it.
//! - A slot reserved and never published (the submitter's core stopped
//!   mid-copy) holds nothing acknowledged: in mode 0 its log is never
//!   sealed before a crash, and in mode 1 it has no committed pool entry.

use super::{Engine, Entry, OpenLog, Slot, StalledWrite};
use crate::error::{IoError, SubmitError};
use crate::geometry::{BLOCK_SIZE, FULL_MASK};
use crate::ids::LogId;
use crate::io::{BufAlloc, BufId, Nanos, ReqId};
use crate::stats::Op;

/// The block a reserved slot names until its publication.
pub(super) const RESERVED: u64 = u64::MAX;
/// The block a returned slot names: logged as padding.
pub(super) const PADDING: u64 = u64::MAX - 1;

/// Consecutive slots of the open log reserved for one submitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub log: LogId,
    /// The log's buffer; it stays in place until every slot is published or
    /// returned.
    pub buf: BufId,
    /// Byte offset of slot `first_slot`'s data in the buffer; slot
    /// `first_slot + i` is `i × 4096` bytes further.
    pub offset: usize,
    pub first_slot: u32,
    pub count: u32,
}

impl<A: BufAlloc> Engine<A> {
    /// Reserves up to `max` consecutive slots of the open log for a
    /// submitter. None when writes should take the ordinary path: the
    /// cache is not running, is read-only or under ring pressure (where
    /// admission decides per write), or has no room now.
    pub fn grant(&mut self, max: u32, now: Nanos) -> Option<Grant> {
        self.enter(now);
        let g = self.try_grant(max);
        self.pump();
        g
    }

    fn try_grant(&mut self, max: u32) -> Option<Grant> {
        if max == 0
            || self.phase != super::Phase::Running
            || self.read_only
            || self.scrub.refuses_anything()
            || self.ring_pressure()
            || !self.ensure_open_slot(false)
        {
            return None;
        }
        let data_blocks = self.geo.data_blocks;
        let hl = self.geo.header_len();
        let o = self.open.as_mut().expect("open log");
        let first = o.slots.len() as u32;
        // Near the end of a log the grants shrink: what a submitter still
        // holds when the log fills is returned as padding.
        let room = data_blocks - first;
        let count = max.min(room.div_ceil(4).max(1)).min(room);
        o.slots.extend(std::iter::repeat_n(
            Slot {
                block: RESERVED,
                valid: 0,
                dirty: false,
                fill: 0,
                crc: None,
            },
            count as usize,
        ));
        o.reserved += count;
        let (id, buf) = (o.id, o.buf);
        let full = o.slots.len() as u32 == data_blocks;
        self.ring.seg_mut(id).nr_slots += count;
        self.stats.granted_slots += count as u64;
        if full {
            self.request_seal();
        }
        Some(Grant {
            log: id,
            buf,
            offset: hl + first as usize * BLOCK_SIZE as usize,
            first_slot: first,
            count,
        })
    }

    /// The newest log whose reserved slots the engine waits for (to seal
    /// it): submitters hand back what they hold in it and every older log.
    pub fn grants_wanted_back(&self) -> LogId {
        let open = self
            .open
            .as_ref()
            .filter(|o| o.reserved > 0 && (o.seal_requested || self.phase != super::Phase::Running))
            .map(|o| o.id);
        self.sealing
            .iter()
            .filter(|o| o.reserved > 0)
            .map(|o| o.id)
            .chain(open)
            .max()
            .unwrap_or(LogId::NONE)
    }

    /// Slots reserved and neither published nor returned yet.
    pub fn reserved_slots(&self) -> u32 {
        self.open
            .iter()
            .chain(&self.sealing)
            .map(|o| o.reserved)
            .sum()
    }

    /// Slots `first_slot..first_slot + count` of log `log`, granted and not
    /// used, come back: they become padding.
    pub fn return_grant(&mut self, log: LogId, first_slot: u32, count: u32, now: Nanos) {
        self.enter(now);
        if let Some(o) = self.granted_log(log) {
            let mut n = 0;
            for s in o
                .slots
                .iter_mut()
                .skip(first_slot as usize)
                .take(count as usize)
            {
                if s.block == RESERVED {
                    s.block = PADDING;
                    n += 1;
                }
            }
            o.reserved -= n;
            self.stats.returned_slots += n as u64;
            self.seal_waiting(log);
        }
        self.pump();
    }

    /// A write of whole blocks whose data a submitter copied into slots
    /// `first_slot..` of log `log` (one slot per 4 KiB block, in order),
    /// with `crcs` their CRC-32C. With `fua` it completes only once durable.
    #[allow(clippy::too_many_arguments)]
    pub fn submit_granted_write(
        &mut self,
        req: ReqId,
        offset: u64,
        log: LogId,
        first_slot: u32,
        crcs: &[u32],
        fua: bool,
        now: Nanos,
    ) -> Result<(), SubmitError> {
        self.enter(now);
        self.op = Op::Write;
        let len = crcs.len() as u64 * BLOCK_SIZE;
        self.check_submit(req, offset, len)?;
        if !offset.is_multiple_of(BLOCK_SIZE) {
            return Err(SubmitError::BadRange { offset, len });
        }
        let reserved = self.granted_log(log).is_some_and(|o| {
            o.slots
                .get(first_slot as usize..first_slot as usize + crcs.len())
                .is_some_and(|s| s.iter().all(|s| s.block == RESERVED))
        });
        if !reserved {
            return Err(SubmitError::NotGranted {
                log: log.get(),
                slot: first_slot,
            });
        }
        self.stats.user_write_cmds += 1;
        self.stats.user_write_bytes += len;
        self.stats.granted_writes += 1;
        self.granted_write(req, offset, log, first_slot, crcs, fua);
        self.pump();
        Ok(())
    }

    fn granted_write(
        &mut self,
        req: ReqId,
        offset: u64,
        log: LogId,
        first_slot: u32,
        crcs: &[u32],
        fua: bool,
    ) {
        let n = crcs.len() as u32;
        if self.read_only {
            self.pad(log, first_slot, n);
            self.complete_now(req, Err(IoError::ReadOnly));
            return;
        }
        let mut max_id = LogId::NONE;
        let mut again: Vec<(u64, Vec<u8>)> = Vec::new();
        for (i, &crc) in crcs.iter().enumerate() {
            let (block, slot) = (offset / BLOCK_SIZE + i as u64, first_slot + i as u32);
            let existing = self.entry(block);
            if existing.is_some_and(|e| (e.id, e.slot) > (log, slot))
                && !self
                    .mutant
                    .is(crate::mutant::Mutant::GrantedPublishedInPlace)
            {
                // A newer position already holds the block: replay would
                // prefer it, so this data goes to the head instead.
                let buf = self.granted_log(log).expect("granted log").buf;
                let at = self.geo.header_len() + slot as usize * BLOCK_SIZE as usize;
                let data = self.buf(buf)[at..at + BLOCK_SIZE as usize].to_vec();
                again.push((block, data));
                self.pad(log, slot, 1);
                self.stats.granted_replaced += 1;
                continue;
            }
            let o = self.granted_log(log).expect("granted log");
            o.slots[slot as usize] = Slot {
                block,
                valid: FULL_MASK,
                dirty: true,
                fill: 0,
                crc: Some(crc),
            };
            o.reserved -= 1;
            o.has_dirty = true;
            self.scrub.rewritten(block, log);
            match existing {
                Some(old) => {
                    self.unlink_dirty(&old);
                    self.stats.count(true, true, false, true);
                }
                None => self.stats.count(true, false, false, true),
            }
            self.ring.seg_mut(log).live_dirty += 1;
            self.index_insert(
                block,
                Entry {
                    id: log,
                    slot,
                    valid: FULL_MASK,
                    dirty: FULL_MASK,
                    logged_dirty: true,
                },
            );
            if self.pmem.acks_writes() {
                self.publish(log, slot);
            }
            max_id = max_id.max(log);
        }
        let mut stalled = 0;
        for (block, data) in again {
            let (placed, id) = self.place(
                block * BLOCK_SIZE,
                BLOCK_SIZE,
                super::write::Src::Data(&data),
                max_id,
            );
            max_id = id;
            if placed < BLOCK_SIZE {
                stalled += 1;
                self.stalled.push_back(StalledWrite {
                    req,
                    offset: block * BLOCK_SIZE,
                    data: Some(data),
                    len: BLOCK_SIZE,
                    fua,
                    since: self.now,
                });
            }
        }
        self.seal_waiting(log);
        let wait_log = if fua && !self.pmem.acks_writes() {
            max_id
        } else {
            LogId::NONE
        };
        if stalled == 0 && wait_log == LogId::NONE && !self.pmem.has_new_fills() {
            self.complete_now(req, Ok(()));
            return;
        }
        self.wait_for_fills(req);
        let r = self.track(req);
        r.wait_log = r.wait_log.max(wait_log);
        r.parts += stalled;
        self.try_finish(req);
    }

    /// The open or sealing log `log`, while it takes publications.
    fn granted_log(&mut self, log: LogId) -> Option<&mut OpenLog> {
        self.open
            .iter_mut()
            .chain(&mut self.sealing)
            .find(|o| o.id == log)
    }

    /// Reserved slots that will hold nothing: padding.
    fn pad(&mut self, log: LogId, first_slot: u32, count: u32) {
        if let Some(o) = self.granted_log(log) {
            for s in &mut o.slots[first_slot as usize..(first_slot + count) as usize] {
                debug_assert_eq!(s.block, RESERVED);
                s.block = PADDING;
            }
            o.reserved -= count;
        }
    }

    /// Seals log `log` if it waited only for its reservations.
    fn seal_waiting(&mut self, log: LogId) {
        if self.read_only {
            return;
        }
        if let Some(i) = self
            .sealing
            .iter()
            .position(|o| o.id == log && o.fills_pending == 0 && o.reserved == 0)
        {
            let o = self.sealing.swap_remove(i);
            self.seal_log(o);
        }
    }
}
