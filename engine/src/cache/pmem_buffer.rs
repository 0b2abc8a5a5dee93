//! The pmem pool as the engine uses it: in mode 1 the write buffer that
//! makes a write durable once its block is published; in mode 0 a pool an
//! earlier mode 1 run left behind, drained to the cache device once.
//!
//! Everything mode 1 does differently goes through this component: whether
//! writes are acknowledged from the pool, which RAM buffer mirrors which
//! pool slot, publishing a block, writes waiting for a fill before they can
//! be published, and reading slots back at recovery. The engine only asks.

use rustc_hash::FxHashMap;

use crate::error::OpenError;
use crate::format::RECORD_FLAG_PMEM;
use crate::geometry::{BLOCK_SIZE, Geometry};
use crate::ids::{Epoch, LogId};
use crate::io::{BufId, ReqId};
use crate::mutant::Mutant;
use crate::pmem::{
    ENTRY_SIZE, Pmem, PoolHeader, PoolLayout, SLOT_HEADER, SlotEntry, commit_word, encode_entry,
    encode_slot_header, parse_entry, parse_slot_header,
};

/// Slot `slot` of log `id`: a block waiting for a fill before it is published.
type FillKey = (LogId, u32);

pub(super) struct PmemBuffer {
    pm: Option<Box<dyn Pmem>>,
    /// Set once the pool was checked against the cache.
    layout: Option<PoolLayout>,
    /// Mode 1: writes are acknowledged once persisted in the pool.
    persistent: bool,
    /// RAM buffer of each pool slot (index = slot).
    slot_bufs: Vec<BufId>,
    /// The record keeps the pmem flag until logs up to this id are durable
    /// (draining a pool when switching to mode 0).
    drain_until: LogId,
    /// Mode 1 writes waiting for a fill before their block can be published.
    fill_waiters: FxHashMap<FillKey, Vec<ReqId>>,
    /// Fills the placement in progress started (mode 1).
    new_fills: Vec<FillKey>,
    /// A planted bug (feature `mutants`).
    mutant: Mutant,
}

/// How a pool relates to the cache it is attached to.
pub(super) struct AttachCheck {
    pub(super) cache_uuid: [u8; 16],
    /// The cache was formatted now.
    pub(super) formatted: bool,
    /// The user asked for a format (which may take over a used pool).
    pub(super) format_requested: bool,
    /// The newest record says writes may be in a pool.
    pub(super) had_pmem: bool,
}

/// A block read back from a pool slot.
pub(super) struct RecoveredBlock {
    pub(super) block: u64,
    pub(super) valid: u8,
}

impl PmemBuffer {
    pub(super) fn new(pm: Option<Box<dyn Pmem>>, persistent: bool) -> Self {
        Self {
            pm,
            layout: None,
            persistent,
            slot_bufs: Vec::new(),
            drain_until: LogId::NONE,
            fill_waiters: FxHashMap::default(),
            new_fills: Vec::new(),
            mutant: Mutant::None,
        }
    }

    #[cfg(feature = "mutants")]
    pub(super) fn plant(&mut self, m: Mutant) {
        self.mutant = m;
    }

    /// Mode 1: a write is durable once published in the pool.
    pub(super) fn acks_writes(&self) -> bool {
        self.persistent
    }

    pub(super) fn has_pool(&self) -> bool {
        self.pm.is_some()
    }

    /// Checks the pool against the cache (formatting it when it is new or a
    /// format was asked for) and returns its layout.
    pub(super) fn attach(
        &mut self,
        geo: &Geometry,
        check: AttachCheck,
    ) -> Result<PoolLayout, OpenError> {
        let pm = self.pm.as_mut().expect("attach without a pool");
        let layout = PoolLayout::new(pm.len(), geo).map_err(OpenError::Pool)?;
        let mut hdr = [0u8; 64];
        pm.read(0, &mut hdr);
        let want = PoolHeader {
            cache_uuid: check.cache_uuid,
            segment_size: geo.segment_size,
            data_blocks: geo.data_blocks,
            nr_slots: layout.nr_slots,
        };
        let reformat = match PoolHeader::parse(&hdr).map_err(OpenError::Pool)? {
            // Only an explicit format request may take over a used pool.
            _ if check.formatted && check.format_requested => true,
            None if check.formatted => true,
            // An empty pool is fine unless this cache's writes may be in one.
            None if check.had_pmem => return Err(OpenError::PoolMismatch),
            None => true,
            Some(h) if h == want => false,
            Some(_) => return Err(OpenError::PoolMismatch),
        };
        if reformat {
            // Slot headers first, so no slot of an earlier use can pass for
            // one of this cache once the header names it.
            for i in 0..layout.nr_slots {
                pm.write(layout.slot(i), &[0u8; 24]);
                pm.persist(layout.slot(i), 24);
            }
            pm.write(0, &want.encode());
            pm.persist(0, 64);
        }
        self.layout = Some(layout);
        Ok(layout)
    }

    /// Mode 1: `buf` mirrors the next pool slot.
    pub(super) fn add_slot_buf(&mut self, buf: BufId) {
        debug_assert!(self.persistent && !self.slot_bufs.contains(&buf));
        debug_assert!(
            self.layout
                .is_some_and(|l| (self.slot_bufs.len() as u32) < l.nr_slots)
        );
        self.slot_bufs.push(buf);
    }

    /// The RAM buffers mirroring pool slots.
    pub(super) fn slot_bufs(&self) -> &[BufId] {
        &self.slot_bufs
    }

    /// Whether `buf` mirrors a pool slot (it goes back to the slot's free list).
    pub(super) fn owns(&self, buf: BufId) -> bool {
        self.slot_bufs.contains(&buf)
    }

    /// Mode 1: a new log opens in the slot `buf` mirrors; the slot header is
    /// persistent before any block is published into it. Returns the slot.
    pub(super) fn open_log(&mut self, buf: BufId, id: LogId, epoch: Epoch) -> Option<u32> {
        if !self.persistent {
            return None;
        }
        let i = self.slot_bufs.iter().position(|&b| b == buf)? as u32;
        if let (Some(pool), Some(pm)) = (self.layout, self.pm.as_mut()) {
            let at = pool.slot(i);
            pm.write(at, &encode_slot_header(id.get(), epoch.get()));
            pm.persist(at, SLOT_HEADER);
        }
        Some(i)
    }

    /// Publishes a block into data slot `slot` of pool slot `pslot`, holding
    /// log `id`: data and entry persisted, then the commit word. Only a valid
    /// commit word makes a block count, so data and entry need no order
    /// between themselves. Returns the data's CRC-32C (`crc`, when known).
    pub(super) fn publish(
        &mut self,
        pslot: u32,
        slot: u32,
        id: LogId,
        entry: SlotEntry,
        data: &[u8],
        crc: Option<u32>,
    ) -> Option<u32> {
        let (pool, pm) = (self.layout?, self.pm.as_mut()?);
        // A submitter that copied the data took its checksum already.
        let crc = crc.unwrap_or_else(|| crc32c::crc32c(data));
        let entry = encode_entry(&entry, crc);
        let (d, e) = (pool.data(pslot, slot), pool.entry(pslot, slot));
        pm.write_nodrain(d, data);
        pm.write_nodrain(e, &entry);
        let commit = commit_word(id.get(), &entry).to_le_bytes();
        if self.mutant.is(Mutant::CommitBeforeDrain) {
            // The data and entry stay undrained until a later publish drains.
            pm.write_persist(e + 24, &commit);
        } else {
            pm.drain();
            pm.write_persist(e + 24, &commit);
        }
        Some(crc)
    }

    /// Mode 1: slot `slot` of log `id` waits for a fill before its block
    /// can be published; the write in progress waits with it.
    pub(super) fn note_fill(&mut self, id: LogId, slot: u32) {
        self.new_fills.push((id, slot));
    }

    /// The fills the placement in progress started are nobody's to wait for.
    pub(super) fn forget_new_fills(&mut self) {
        self.new_fills.clear();
    }

    /// Whether the placement in progress started fills.
    pub(super) fn has_new_fills(&self) -> bool {
        !self.new_fills.is_empty()
    }

    /// The fills the placement started; `req` waits for each of them.
    pub(super) fn wait_new_fills(&mut self, req: ReqId) -> usize {
        let fills = std::mem::take(&mut self.new_fills);
        for &f in &fills {
            self.fill_waiters.entry(f).or_default().push(req);
        }
        fills.len()
    }

    /// The fill of slot `slot` of log `id` landed: the writes that waited.
    pub(super) fn fill_landed(&mut self, id: LogId, slot: u32) -> Vec<ReqId> {
        self.fill_waiters.remove(&(id, slot)).unwrap_or_default()
    }

    /// The record must keep the pmem flag while the pool may hold data the
    /// cache device lacks (mode 1, or draining until `drain_until`).
    pub(super) fn record_flag(&self, frontier: LogId) -> u32 {
        if self.persistent || frontier < self.drain_until {
            RECORD_FLAG_PMEM
        } else {
            0
        }
    }

    /// Whether log `id`'s acknowledged blocks have a persistent copy in the
    /// pool (mode 1, or a log recovered from it).
    pub(super) fn may_hold(&self, id: LogId) -> bool {
        self.persistent || id <= self.drain_until
    }

    /// Mode 0 after mode 1: the pool holds nothing the cache device lacks
    /// once logs up to `frontier` are durable. Returns true the first time.
    pub(super) fn drained(&mut self, frontier: LogId) -> bool {
        if self.drain_until > LogId::NONE && !self.persistent && frontier >= self.drain_until {
            self.drain_until = LogId::NONE;
            return true;
        }
        false
    }

    /// Pool slots holding logs newer than `durable`, as (id, pool slot), in
    /// id order. An id can appear twice: a slot left empty by a crash keeps
    /// its header, and the next incarnation reuses the id in another slot;
    /// the newest epoch comes first, as it is the real one.
    pub(super) fn slots_after(&self, durable: LogId) -> Vec<(LogId, u32)> {
        let (Some(pool), Some(pm)) = (self.layout, self.pm.as_ref()) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for i in 0..pool.nr_slots {
            let mut h = [0u8; 24];
            pm.read(pool.slot(i), &mut h);
            if let Some((id, epoch)) = parse_slot_header(&h)
                && id > durable.get()
            {
                found.push((id, std::cmp::Reverse(epoch), i));
            }
        }
        found.sort_unstable();
        found.into_iter().map(|(id, _, i)| (LogId(id), i)).collect()
    }

    /// Calls `f` with each committed block of pool slot `pslot` (holding log
    /// `id`) and its data, in slot order.
    pub(super) fn read_slot(
        &self,
        pslot: u32,
        id: LogId,
        geo: &Geometry,
        mut f: impl FnMut(RecoveredBlock, &[u8]),
    ) {
        let (Some(pool), Some(pm)) = (self.layout, self.pm.as_ref()) else {
            return;
        };
        let mut data = vec![0u8; BLOCK_SIZE as usize];
        let mut raw = [0u8; ENTRY_SIZE as usize];
        for s in 0..pool.data_blocks {
            pm.read(pool.entry(pslot, s), &mut raw);
            if raw[24..] == [0u8; 8] {
                continue;
            }
            pm.read(pool.data(pslot, s), &mut data);
            if let Some(e) = parse_entry(&raw, id.get(), &data, geo) {
                f(
                    RecoveredBlock {
                        block: e.block,
                        valid: e.valid,
                    },
                    &data,
                );
            }
        }
    }

    /// Clears a slot that holds nothing acknowledged, so a later recovery
    /// can never take it for a continuation of new logs.
    pub(super) fn clear_slot(&mut self, pslot: u32) {
        if let (Some(pool), Some(pm)) = (self.layout, self.pm.as_mut()) {
            pm.write(pool.slot(pslot), &[0u8; 24]);
            pm.persist(pool.slot(pslot), 24);
        }
    }

    /// Logs up to `id` were recovered from the pool: it keeps the pmem flag
    /// until they are durable on the cache device.
    pub(super) fn recovered_up_to(&mut self, id: LogId) {
        self.drain_until = id;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pmem::RamPmem;

    fn geo() -> Geometry {
        Geometry::new(64 * 1024, 64 * 64 * 1024, 1 << 30).expect("geometry")
    }

    fn attached() -> (PmemBuffer, PoolLayout) {
        let g = geo();
        let len = PoolLayout::new(u64::MAX, &g).expect("layout").slot_size * 2 + BLOCK_SIZE;
        let mut p = PmemBuffer::new(Some(Box::new(RamPmem(vec![0; len as usize]))), true);
        let layout = p
            .attach(
                &g,
                AttachCheck {
                    cache_uuid: [7; 16],
                    formatted: true,
                    format_requested: false,
                    had_pmem: true,
                },
            )
            .expect("attach");
        p.add_slot_buf(BufId(10));
        p.add_slot_buf(BufId(11));
        (p, layout)
    }

    #[test]
    fn a_published_block_reads_back_from_its_slot() {
        let (mut p, layout) = attached();
        assert_eq!(layout.nr_slots, 2);
        let i = p.open_log(BufId(11), LogId(5), Epoch(2)).expect("slot");
        assert_eq!(i, 1);
        let data = vec![0xabu8; BLOCK_SIZE as usize];
        let entry = SlotEntry {
            block: 42,
            valid: 0xff,
        };
        let crc = p
            .publish(i, 0, LogId(5), entry, &data, None)
            .expect("published");
        assert_eq!(crc, crc32c::crc32c(&data));
        assert_eq!(p.slots_after(LogId(4)), vec![(LogId(5), 1)]);
        assert!(p.slots_after(LogId(5)).is_empty());
        let mut got = Vec::new();
        p.read_slot(i, LogId(5), &geo(), |b, d| {
            got.push((b.block, b.valid, d[0]))
        });
        assert_eq!(got, vec![(42, 0xff, 0xab)]);
        // The commit word is bound to the log id: another log sees nothing.
        let mut other = Vec::new();
        p.read_slot(i, LogId(6), &geo(), |b, _| other.push(b.block));
        assert!(other.is_empty());
        p.clear_slot(i);
        assert!(p.slots_after(LogId::NONE).is_empty());
    }

    #[test]
    fn an_id_in_two_slots_lists_its_newest_epoch_first() {
        let (mut p, _) = attached();
        // A crash left slot 0 naming log 5 of epoch 2 with nothing committed;
        // the next incarnation opened log 5 again in slot 1, epoch 3.
        p.open_log(BufId(10), LogId(5), Epoch(2));
        p.open_log(BufId(11), LogId(5), Epoch(3));
        assert_eq!(p.slots_after(LogId(4)), vec![(LogId(5), 1), (LogId(5), 0)]);
    }

    #[test]
    fn a_pool_of_another_cache_is_refused() {
        let (mut p, _) = attached();
        let r = p.attach(
            &geo(),
            AttachCheck {
                cache_uuid: [8; 16],
                formatted: false,
                format_requested: false,
                had_pmem: true,
            },
        );
        assert!(matches!(r, Err(OpenError::PoolMismatch)));
    }

    #[test]
    fn fills_hold_their_writes_until_they_land() {
        let (mut p, _) = attached();
        p.note_fill(LogId(3), 0);
        p.note_fill(LogId(3), 1);
        assert!(p.has_new_fills());
        assert_eq!(p.wait_new_fills(ReqId(9)), 2);
        assert!(!p.has_new_fills());
        assert_eq!(p.fill_landed(LogId(3), 1), vec![ReqId(9)]);
        assert!(p.fill_landed(LogId(3), 1).is_empty());
    }

    #[test]
    fn a_drained_pool_drops_the_record_flag_once() {
        let mut p = PmemBuffer::new(None, false);
        p.recovered_up_to(LogId(7));
        assert!(p.may_hold(LogId(7)) && !p.may_hold(LogId(8)));
        assert_eq!(p.record_flag(LogId(6)), RECORD_FLAG_PMEM);
        assert!(!p.drained(LogId(6)));
        assert!(p.drained(LogId(7)));
        assert!(!p.drained(LogId(9)));
        assert_eq!(p.record_flag(LogId(9)), 0);
    }
}
