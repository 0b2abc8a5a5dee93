//! User writes: placing cache lines into the open buffer, or bypassing the log.

use super::{
    Dirty, Engine, Entry, OpenLog, Purpose, Slot, StalledWrite, data_ref_user, for_each_run,
};
use crate::error::{IoError, SubmitError};
use crate::geometry::{BLOCK_SIZE, FULL_MASK, SECTOR_SIZE};
use crate::ids::LogId;
use crate::io::{BufAlloc, BufId, CommandKind, DataRef, Device, Nanos, ReqId};
use crate::stats::Op;

/// Where the bytes of a write come from.
#[derive(Clone, Copy)]
pub(super) enum Src<'a> {
    Data(&'a [u8]),
    Zeros,
    /// No new bytes: the cleaner moves a block's dirty sectors forward.
    Relocation,
}

impl Src<'_> {
    fn copy_to(&self, from: usize, dst: &mut [u8]) {
        match self {
            Src::Data(d) => dst.copy_from_slice(&d[from..from + dst.len()]),
            Src::Zeros => dst.fill(0),
            Src::Relocation => debug_assert!(dst.is_empty(), "a relocation writes no bytes"),
        }
    }

    fn is_user(&self) -> bool {
        !matches!(self, Src::Relocation)
    }
}

impl<A: BufAlloc> Engine<A> {
    /// Writes `data` at byte `offset`. With `fua` the request completes only
    /// once the data is durable; without it, once it is in the buffer.
    pub fn submit_write(
        &mut self,
        req: ReqId,
        offset: u64,
        data: &[u8],
        fua: bool,
        now: Nanos,
    ) -> Result<(), SubmitError> {
        self.enter(now);
        self.op = Op::Write;
        self.check_submit(req, offset, data.len() as u64)?;
        self.stats.user_write_cmds += 1;
        self.stats.user_write_bytes += data.len() as u64;
        self.write_common(req, offset, data.len() as u64, Src::Data(data), fua);
        self.pump();
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zeroes.
    pub fn submit_write_zeroes(
        &mut self,
        req: ReqId,
        offset: u64,
        len: u64,
        now: Nanos,
    ) -> Result<(), SubmitError> {
        self.enter(now);
        self.op = Op::Write;
        self.check_submit(req, offset, len)?;
        self.stats.user_write_cmds += 1;
        self.stats.user_write_bytes += len;
        self.write_common(req, offset, len, Src::Zeros, false);
        self.pump();
        Ok(())
    }

    /// Unmaps a range: cached copies that can be dropped safely are dropped and
    /// the request is passed to the backing device. Dirty cached data inside
    /// the range is kept (and later written back): unmapped contents are
    /// unspecified, so that is allowed, and it never loses a newer write.
    pub fn submit_discard(
        &mut self,
        req: ReqId,
        offset: u64,
        len: u64,
        now: Nanos,
    ) -> Result<(), SubmitError> {
        self.enter(now);
        self.op = Op::Write;
        self.check_submit(req, offset, len)?;
        let first = offset.div_ceil(BLOCK_SIZE);
        let last = (offset + len) / BLOCK_SIZE;
        for block in first..last {
            let Some(e) = self.entry(block) else {
                continue;
            };
            if self.droppable(&e) {
                self.drop_entry(block);
            } else if e.dirty == 0 {
                // Its log still marks it dirty, so the entry stays, but it no
                // longer serves reads: they go to the backing device, as for
                // the rest of the range, and read the same after a restart.
                self.update_copy(block, e.id, e.slot, |e| e.valid = 0);
            }
        }
        self.bypass_seq += 1;
        self.backing_bypass_inflight += 1;
        let r = self.track(req);
        r.parts += 1;
        r.backing_load += 1;
        self.backing_load += 1;
        self.issue(
            Device::Backing,
            CommandKind::Discard { offset, len },
            Purpose::User { req, backing: true },
        );
        self.pump();
        Ok(())
    }

    /// Completes once every write acknowledged before it is durable.
    pub fn submit_flush(&mut self, req: ReqId, now: Nanos) -> Result<(), SubmitError> {
        self.enter(now);
        self.op = Op::Flush;
        self.check_submit(req, 0, self.params.backing_block_size as u64)?;
        self.stats.user_flush_cmds += 1;
        if self.read_only {
            self.complete_now(req, Err(IoError::ReadOnly));
            return Ok(());
        }
        if self.backing_writes_lost {
            self.complete_now(req, Err(IoError::BackingWritesLost));
            return Ok(());
        }
        // In mode 1 whatever was acknowledged is in pmem already.
        let wait_log = if self.pmem.acks_writes() {
            LogId::NONE
        } else {
            self.last_dirty_log()
        };
        let needs_backing_flush = self.backing_write_gen > self.backing_flushed_gen;
        let r = self.track(req);
        r.wait_log = wait_log;
        r.needs_backing_flush = needs_backing_flush;
        self.try_finish(req);
        self.pump();
        Ok(())
    }

    /// A write covering only part of a block carries the block's other
    /// dirty sectors into the new copy. It is refused if those sectors are
    /// damaged (a new copy under a fresh CRC would hide the damage) or
    /// their log cannot be read now: only a whole-block rewrite replaces a
    /// damaged block. Only the range's first and last blocks can be partial.
    fn check_carry(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let (first, last) = (offset / BLOCK_SIZE, (offset + len - 1) / BLOCK_SIZE);
        for block in [first, last] {
            let (mask, _, _) = Self::block_span(block, offset, len);
            if mask == FULL_MASK {
                continue;
            }
            // (Whether or not the damaged copy is still indexed: the
            // backing device's older data must not be merged in either.)
            if let Some(e) = self.scrub.quarantine_error(block)
                && !self
                    .mutant
                    .is(crate::mutant::Mutant::PartialWriteOverDamage)
            {
                return Err(e);
            }
            let Some(e) = self.entry(block) else {
                continue;
            };
            if e.dirty & !mask != 0 && self.scrub.is_unreadable(e.id) {
                return Err(IoError::CacheDevice);
            }
        }
        Ok(())
    }

    /// Highest log id that may hold acknowledged user data.
    fn last_dirty_log(&self) -> LogId {
        match &self.open {
            Some(o) if o.has_dirty => o.id,
            Some(o) => o.id - 1,
            None => self.ring.next_id() - 1,
        }
    }

    fn write_common(&mut self, req: ReqId, offset: u64, len: u64, src: Src<'_>, fua: bool) {
        if self.read_only {
            self.complete_now(req, Err(IoError::ReadOnly));
            return;
        }
        // (Only while something is quarantined or unreadable.)
        if self.scrub.refuses_anything()
            && let Err(e) = self.check_carry(offset, len)
        {
            self.complete_now(req, Err(e));
            return;
        }
        // (The cheap conditions first: most writes go to the log.)
        let wanted = self.wants_bypass(len);
        if (wanted || (self.writeback_bound() && self.cold_miss(offset, len)))
            && !self.overlaps_stalled(offset, len)
            && self.bypassable(offset, len)
        {
            if !wanted {
                self.stats.admission_bypass_writes += 1;
            }
            self.bypass(req, offset, len, src, fua);
            return;
        }
        let (placed, max_id) = self.place(offset, len, src, LogId::NONE);
        // Mode 0: FUA waits for the log. Mode 1: every write is durable once
        // its blocks are published in pmem, which may wait for fills.
        let wait_log = if fua && !self.pmem.acks_writes() {
            max_id
        } else {
            LogId::NONE
        };
        if placed == len && wait_log == LogId::NONE && !self.pmem.has_new_fills() {
            self.complete_now(req, Ok(()));
            return;
        }
        self.wait_for_fills(req);
        let r = self.track(req);
        r.wait_log = r.wait_log.max(wait_log);
        if placed < len {
            r.parts += 1;
            let data = match src {
                Src::Data(d) => Some(d[placed as usize..].to_vec()),
                Src::Zeros | Src::Relocation => None,
            };
            self.stalled.push_back(StalledWrite {
                req,
                offset: offset + placed,
                data,
                len: len - placed,
                fua,
                since: self.now,
            });
        }
        self.try_finish(req);
    }

    /// Makes `req` wait for the fills its placement started (mode 1).
    pub(super) fn wait_for_fills(&mut self, req: ReqId) {
        let n = self.pmem.wait_new_fills(req);
        if n > 0 {
            self.track(req).parts += n as u32;
        }
    }

    /// Whether a stalled write overlaps the range: a write to the same
    /// blocks must not pass it (it would land first and be overwritten).
    fn overlaps_stalled(&self, offset: u64, len: u64) -> bool {
        let (first, last) = (offset / BLOCK_SIZE, (offset + len - 1) / BLOCK_SIZE);
        self.stalled.iter().any(|s| {
            let (f, l) = (s.offset / BLOCK_SIZE, (s.offset + s.len - 1) / BLOCK_SIZE);
            f <= last && first <= l
        })
    }

    fn wants_bypass(&self, len: u64) -> bool {
        self.tunables.write_around_mode
            || (self.tunables.bypass_write_kib > 0
                && len >= self.tunables.bypass_write_kib as u64 * 1024)
            || self.cache_full()
    }

    /// No room for a new block until writeback frees a segment: writes the
    /// cache does not have to hold go to the backing device meanwhile, so a
    /// full cache is never slower than the backing device itself.
    fn cache_full(&self) -> bool {
        self.open
            .as_ref()
            .is_none_or(|o| o.slots.len() as u32 >= self.geo.data_blocks)
            && self
                .next_position_blocked_on()
                .is_some_and(|occupant| occupant > self.ring.last_wb())
    }

    /// No block in the range holds data that only the cache has, or that
    /// recovery could bring back over the new data.
    /// A quarantined block is not bypassable either: its rewrite goes
    /// through the log, which is what ends the quarantine.
    fn bypassable(&self, offset: u64, len: u64) -> bool {
        let (first, last) = (offset / BLOCK_SIZE, (offset + len - 1) / BLOCK_SIZE);
        (first..=last)
            .all(|b| self.entry(b).is_none_or(|e| self.droppable(&e)) && !self.scrub.is_corrupt(b))
    }

    fn bypass(&mut self, req: ReqId, offset: u64, len: u64, src: Src<'_>, fua: bool) {
        let (first, last) = (offset / BLOCK_SIZE, (offset + len - 1) / BLOCK_SIZE);
        for b in first..=last {
            if self.index.contains(b) {
                self.drop_entry(b);
            }
        }
        self.bypass_seq += 1;
        self.backing_bypass_inflight += 1;
        self.stats.bypass_write_bytes += len;
        self.remember_bypass(offset, len);
        // In mode 1 every acknowledged write is durable, bypass writes too.
        let durable = fua || self.pmem.acks_writes();
        let r = self.track(req);
        r.parts += 1;
        r.needs_backing_flush = durable;
        r.backing_load += 1;
        self.backing_load += 1;
        let kind = match src {
            Src::Data(_) => CommandKind::Write {
                offset,
                len: len as usize,
                src: data_ref_user(req, 0),
            },
            Src::Zeros | Src::Relocation => CommandKind::WriteZeroes { offset, len },
        };
        self.issue(Device::Backing, kind, Purpose::User { req, backing: true });
    }

    /// Places stalled writes while there is room, in arrival order.
    pub(super) fn retry_stalled(&mut self) {
        while let Some(mut s) = self.stalled.pop_front() {
            if self.read_only {
                self.part_done(s.req, Err(IoError::ReadOnly));
                continue;
            }
            // The block may have been found damaged since it stalled.
            if self.scrub.refuses_anything()
                && let Err(e) = self.check_carry(s.offset, s.len)
            {
                self.part_done(s.req, Err(e));
                continue;
            }
            let src = match &s.data {
                Some(d) => Src::Data(d),
                None => Src::Zeros,
            };
            let (placed, max_id) = self.place(s.offset, s.len, src, LogId::NONE);
            self.wait_for_fills(s.req);
            if s.fua
                && !self.pmem.acks_writes()
                && let Some(r) = self.reqs.get_mut(&s.req)
            {
                r.wait_log = r.wait_log.max(max_id);
            }
            if placed == s.len {
                self.stats.throttled_writes += 1;
                self.stats.throttled_ns += self.now - s.since;
                self.part_done(s.req, Ok(()));
                continue;
            }
            if let Some(d) = &mut s.data {
                d.drain(..placed as usize);
            }
            s.offset += placed;
            s.len -= placed;
            self.stalled.push_front(s);
            break;
        }
    }

    /// Copies as much of the write as fits into buffers. Returns the bytes
    /// placed (a prefix) and the highest log id used.
    pub(super) fn place(
        &mut self,
        offset: u64,
        len: u64,
        src: Src<'_>,
        mut max_id: LogId,
    ) -> (u64, LogId) {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let block = pos / BLOCK_SIZE;
            let (mask, b0, b1) = Self::block_span(block, offset, len);
            let from = (block * BLOCK_SIZE + b0 as u64 - offset) as usize;
            match self.place_block(block, mask, b0, b1, src, from) {
                Some(id) => max_id = max_id.max(id),
                None => break,
            }
            pos = block * BLOCK_SIZE + b1 as u64;
        }
        (pos - offset, max_id)
    }

    /// Puts bytes `b0..b1` of `block` into the open buffer; None if no room.
    fn place_block(
        &mut self,
        block: u64,
        mask: u8,
        b0: usize,
        b1: usize,
        src: Src<'_>,
        from: usize,
    ) -> Option<LogId> {
        let full = mask == FULL_MASK;
        let hl = self.geo.header_len();
        let existing = self.entry(block);
        // A line already in the open buffer is updated in place (mode 0;
        // in mode 1 an in-place update could tear acknowledged data).
        if let (Some(e), Some(o)) = (existing, self.open.as_ref())
            && e.id == o.id
            && !self.pmem.acks_writes()
        {
            let (id, buf) = (o.id, o.buf);
            let at = hl + e.slot as usize * BLOCK_SIZE as usize;
            src.copy_to(from, &mut self.buf_mut(buf)[at + b0..at + b1]);
            let o = self.open.as_mut().expect("open log");
            o.has_dirty = true;
            let slot = &mut o.slots[e.slot as usize];
            slot.valid |= mask;
            slot.dirty = true;
            slot.fill &= !mask;
            slot.crc = None;
            let change = self.update_copy(block, id, e.slot, |ent| {
                ent.valid |= mask;
                ent.dirty |= mask;
                ent.logged_dirty = true;
            });
            if change == Some(Dirty::Became) {
                self.ring.seg_mut(id).live_dirty += 1;
            }
            if src.is_user() {
                self.stats.count(true, true, true, full);
            }
            return Some(id);
        }
        // Sectors to carry over that are themselves still being filled in
        // cannot be copied yet: wait for that fill (the write stalls briefly).
        if let Some(old) = existing
            && self.pending_fill(&old) & old.dirty & !mask != 0
        {
            return None;
        }
        // Sectors to carry over from a log the scrub has not checked wait
        // for it, as reads do.
        if let Some(old) = existing
            && old.dirty & !mask != 0
            && self.scrub.is_unchecked(old.id)
            && self.ring.seg(old.id).buf.is_none()
        {
            self.scrub.want(old.id);
            return None;
        }
        if !self.ensure_open_slot(!src.is_user()) {
            return None;
        }
        let o = self.open.as_ref().expect("open log");
        let (id, buf, s) = (o.id, o.buf, o.slots.len() as u32);
        // Opening a log may have reclaimed the older copy's position, and
        // the copy left the index with it (the damaged copy of a
        // quarantined block can be dirty there): no probe needed to see it.
        let existing = existing.filter(|e| self.ring.seg(e.id).id == e.id);
        if full {
            // A whole new copy, indexed below: the damaged older one no
            // longer serves reads. (Not before the slot is had: a write
            // that stalls must leave the block's reads failing.)
            if self
                .mutant
                .is(crate::mutant::Mutant::QuarantineClearedEarly)
            {
                self.scrub.drop_quarantine(block);
            } else {
                self.scrub.rewritten(block, id);
            }
        }
        let at = hl + s as usize * BLOCK_SIZE as usize;
        src.copy_to(from, &mut self.buf_mut(buf)[at + b0..at + b1]);
        let mut valid = mask;
        let mut fill = 0u8;
        let mut fill_src = None;
        if let Some(old) = existing {
            // Dirty sectors of the older copy that this write does not cover
            // must move along; clean ones are on the backing device already.
            let carry = old.dirty & !mask;
            if carry != 0 {
                valid |= carry;
                if let Some(src_buf) = self.ring.seg(old.id).buf {
                    let src_at = hl + old.slot as usize * BLOCK_SIZE as usize;
                    let mut tmp = [0u8; BLOCK_SIZE as usize];
                    tmp.copy_from_slice(&self.buf(src_buf)[src_at..src_at + BLOCK_SIZE as usize]);
                    let dst = &mut self.buf_mut(buf)[at..at + BLOCK_SIZE as usize];
                    for_each_run(carry, |s0, n| {
                        let (a, z) = (
                            s0 as usize * SECTOR_SIZE as usize,
                            (s0 + n) as usize * SECTOR_SIZE as usize,
                        );
                        dst[a..z].copy_from_slice(&tmp[a..z]);
                    });
                } else {
                    fill = carry;
                    fill_src = Some(old);
                }
            }
            // The insert below replaces the entry where it is: one probe of
            // the index, and no tombstone for it to rehash away later.
            self.unlink_dirty(&old);
            if src.is_user() {
                self.stats.count(true, true, false, full);
            }
        } else if src.is_user() {
            self.stats.count(true, false, false, full);
        }
        let o = self.open.as_mut().expect("open log");
        o.slots.push(Slot {
            block,
            valid,
            dirty: true,
            fill,
            crc: None,
        });
        o.has_dirty = true;
        let full_log = o.slots.len() as u32 == self.geo.data_blocks;
        let seg = self.ring.seg_mut(id);
        seg.nr_slots += 1;
        if valid != 0 {
            seg.live_dirty += 1;
        }
        self.index_insert(
            block,
            Entry {
                id,
                slot: s,
                valid,
                dirty: valid,
                logged_dirty: true,
            },
        );
        if self.pmem.acks_writes() {
            if fill == 0 {
                self.publish(id, s);
            } else {
                self.pmem.note_fill(id, s);
            }
        }
        if let Some(old) = fill_src {
            self.open.as_mut().expect("open log").fills_pending += 1;
            let fbuf = self.alloc_buf(BLOCK_SIZE as usize);
            self.ring.hold(old.id);
            let offset = self.geo.slot_offset(old.id, old.slot);
            self.issue(
                Device::Cache,
                CommandKind::Read {
                    offset,
                    len: BLOCK_SIZE as usize,
                    dst: DataRef::Engine {
                        buf: fbuf,
                        offset: 0,
                    },
                },
                Purpose::Fill {
                    id,
                    slot: s,
                    src_id: old.id,
                    buf: fbuf,
                },
            );
        }
        if full_log {
            self.request_seal();
        }
        Some(id)
    }

    /// Copies `block`'s dirty sectors from its current copy into a new slot
    /// of the open buffer (a fill read when that copy is on the cache
    /// device). Returns the log it went to, or None without room. No user
    /// request waits for the fill.
    pub(super) fn relocate_block(&mut self, block: u64) -> Option<LogId> {
        let id = self.place_block(block, 0, 0, 0, Src::Relocation, 0);
        self.pmem.forget_new_fills();
        if self.mutant.is(crate::mutant::Mutant::RelocatedLoggedClean)
            && let Some(o) = self.open.as_mut()
            && let Some(s) = o.slots.last_mut()
        {
            s.dirty = false;
        }
        id
    }

    /// Whether a new block could be placed right now.
    pub(super) fn can_take_block(&self) -> bool {
        self.open
            .as_ref()
            .is_some_and(|o| (o.slots.len() as u32) < self.geo.data_blocks)
            || self.can_open_log()
    }

    /// Makes sure the open buffer has a free slot, opening a log if need
    /// be. Only the cleaner may take the ring's last free position.
    pub(super) fn ensure_open_slot(&mut self, cleaner: bool) -> bool {
        if let Some(o) = &self.open {
            if (o.slots.len() as u32) < self.geo.data_blocks {
                return true;
            }
            self.request_seal();
            self.seal_if_due();
        }
        if !self.can_open_log() || (!cleaner && self.last_position_kept_for_cleaner()) {
            return false;
        }
        self.open_log();
        true
    }

    /// A buffer is free and the next ring position holds nothing the cache
    /// still needs (written back, recorded durably, nobody reading it).
    pub(super) fn can_open_log(&self) -> bool {
        if self.open.is_some()
            || self.free_log_bufs.is_empty()
            || self.phase != super::Phase::Running
            || self.previous_log_uncommitted()
        {
            return false;
        }
        let Some(occupant) = self.ring.next_occupant() else {
            return true;
        };
        let seg = self.ring.seg(occupant);
        occupant <= self.records.written_back() && seg.readers == 0 && seg.buf.is_none()
    }

    /// Mode 1: recovery takes the pool's slots as a run of consecutive logs
    /// and stops at a slot with nothing committed. A log that is not durable
    /// yet and has nothing committed in its slot (its blocks are read-cache
    /// copies, which are not published, or writes still waiting for a fill)
    /// would hide every later log's acknowledged writes, so the next log
    /// opens only once it has a committed block or is durable.
    fn previous_log_uncommitted(&self) -> bool {
        if !self.pmem.acks_writes() || self.ring.next_id() <= LogId(1) {
            return false;
        }
        let prev = self.ring.next_id() - 1;
        let seg = self.ring.seg(prev);
        !self.durability.is_durable(prev) && seg.id == prev && seg.pool_committed == 0
    }

    /// The next position is the last free one and the cleaner may need it:
    /// when the ring is full, the log at the frontier can only be freed by
    /// copying its few live blocks forward, which needs a log to copy into.
    /// Without this, user writes take that position and the log waits for
    /// writeback at the backing device's speed. (Writes wait for the
    /// cleaner instead: a few cache writes.)
    fn last_position_kept_for_cleaner(&self) -> bool {
        if !self.ring_pressure() || !self.cleaner_claims(self.ring.last_wb().next()) {
            return false;
        }
        let after = self.ring.next_id().next();
        let nr = self.ring.nr_segments();
        if after.get() <= nr {
            return false;
        }
        let occupant = after - nr;
        self.ring.seg(after).id == occupant && occupant > self.records.written_back()
    }

    /// Whether the position the next log needs waits for writeback or a record.
    pub(super) fn next_position_blocked_on(&self) -> Option<LogId> {
        self.ring
            .next_occupant()
            .filter(|&occ| occ > self.records.written_back())
    }

    fn open_log(&mut self) {
        let buf = self.free_log_bufs.pop().expect("free log buffer");
        // Reclaim the position: the old log is written back, so whatever of
        // it is still indexed can go (clean copies, and the damaged copies
        // of quarantined blocks, which the record lists). Dropped while the
        // position still names the old log, whose dirty count they leave.
        let next = self.ring.next_id();
        let old = self.ring.seg(next);
        let (old_id, old_slots) = (old.id, old.nr_slots);
        if old_id != LogId::NONE {
            if !self
                .mutant
                .is(crate::mutant::Mutant::ScrubIgnoresPositionReuse)
            {
                self.scrub.forget(old_id);
            }
            for slot in 0..old_slots {
                if let Some((block, _)) = self.current_at(old_id, slot) {
                    self.drop_entry(block);
                }
            }
        }
        let (id, _, _) = self.ring.open_next(buf);
        let first = self.cache_slot(id, 0).0;
        self.cleaner.reset(first, self.geo.data_blocks);
        // Mode 1: the buffer's pool slot now holds this log.
        let pslot = self.pmem.open_log(buf, id, self.ring.epoch());
        self.open = Some(OpenLog {
            id,
            buf,
            slots: Vec::with_capacity(self.geo.data_blocks as usize),
            fills_pending: 0,
            reserved: 0,
            has_dirty: false,
            seal_requested: false,
            opened_at: self.now,
            pslot,
            relocated: 0,
        });
    }

    /// A fill read for slot `slot` of log `id` ended.
    pub(super) fn fill_done(&mut self, id: LogId, slot: u32, src_id: LogId, fbuf: BufId, ok: bool) {
        self.ring.unhold(src_id);
        let hl = self.geo.header_len();
        let in_open = self.open.as_ref().is_some_and(|o| o.id == id);
        let log = if in_open {
            self.open.as_mut()
        } else {
            self.sealing.iter_mut().find(|o| o.id == id)
        }
        .expect("fill for a log that is not open or sealing");
        let s = &mut log.slots[slot as usize];
        let (fill, block, buf) = (s.fill, s.block, log.buf);
        s.fill = 0;
        s.crc = None;
        log.fills_pending -= 1;
        if !ok {
            // The older copy is unreadable: the cache device is failing.
            s.valid &= !fill;
            let change = self.update_copy(block, id, slot, |e| {
                e.valid &= !fill;
                e.dirty &= !fill;
            });
            if change == Some(Dirty::Cleaned) {
                self.ring.seg_mut(id).live_dirty -= 1;
            }
            // Its dirty sectors are gone from this copy: quarantined, so
            // they read as an error, never as the backing device's older
            // data, until the block is rewritten whole.
            if fill != 0 {
                self.scrub.quarantine_unreadable(block, src_id);
            }
        }
        if ok && fill != 0 {
            let mut tmp = [0u8; BLOCK_SIZE as usize];
            tmp.copy_from_slice(&self.buf(fbuf)[..BLOCK_SIZE as usize]);
            let at = hl + slot as usize * BLOCK_SIZE as usize;
            let dst = &mut self.buf_mut(buf)[at..at + BLOCK_SIZE as usize];
            super::for_each_run(fill, |s0, n| {
                let (a, z) = (
                    s0 as usize * SECTOR_SIZE as usize,
                    (s0 + n) as usize * SECTOR_SIZE as usize,
                );
                dst[a..z].copy_from_slice(&tmp[a..z]);
            });
        }
        self.release_buf(fbuf);
        if self.pmem.acks_writes() {
            self.publish(id, slot);
            for req in self.pmem.fill_landed(id, slot) {
                self.part_done(req, Ok(()));
            }
        }
        if !ok {
            self.fail_cache();
        }
        // Read-only, the log is never written: it stays among the sealing
        // ones, so the durable frontier never passes it (that would count
        // its writes durable and let its buffer go).
        if !in_open
            && !self.read_only
            && let Some(i) = self
                .sealing
                .iter()
                .position(|o| o.id == id && o.fills_pending == 0 && o.reserved == 0)
        {
            let o = self.sealing.swap_remove(i);
            self.seal_log(o);
        }
        self.retry_deferred_reads();
    }

    /// Publishes slot `slot` of log `id` in its pmem slot (mode 1).
    pub(super) fn publish(&mut self, id: LogId, slot: u32) {
        // One lookup, borrowed mutably beside the buffers and the pool
        // (disjoint fields): the slot keeps the checksum computed here.
        let Some(log) = self
            .open
            .iter_mut()
            .chain(&mut self.sealing)
            .find(|o| o.id == id)
        else {
            return;
        };
        let Some(i) = log.pslot else {
            return;
        };
        let s = &mut log.slots[slot as usize];
        let at = self.geo.header_len() + slot as usize * BLOCK_SIZE as usize;
        let data = &self.bufs[log.buf.0 as usize]
            .as_ref()
            .expect("log buffer")
            .as_ref()[at..at + BLOCK_SIZE as usize];
        let entry = crate::pmem::SlotEntry {
            block: s.block,
            valid: s.valid,
        };
        let Some(crc) = self.pmem.publish(i, slot, id, entry, data, s.crc) else {
            return;
        };
        // The data is final once published: the seal reuses its checksum.
        s.crc = Some(crc);
        if let Some(seg) = self.ring.log_mut(id) {
            seg.pool_committed += 1;
        }
    }
}
