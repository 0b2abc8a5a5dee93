//! The persistent-memory write buffer (mode 1).
//!
//! The engine sees the pool as memory it can store into and persist, through
//! [`Pmem`]; the host maps a PMDK pool, the simulator models one that can
//! crash. Layout (docs/FORMAT.md): a 4 KiB pool header, then `nr_slots` slots,
//! each mirroring one segment buffer: a slot header naming the log id, one
//! 32-byte entry per data block, then the data blocks.
//!
//! Publishing a block is crash-atomic: its data and entry are persisted
//! first, then the entry's 8-byte commit word. A commit word is valid only for
//! the entry's exact contents and the slot's current log id, so a torn entry
//! or a leftover from an earlier use of the slot is ignored at recovery.

use crate::error::FormatError;
use crate::format::FORMAT_VERSION;
use crate::geometry::{BLOCK_SIZE, Geometry, SECTORS_PER_BLOCK};

/// Byte-addressable persistent memory, as the engine needs it.
#[allow(clippy::len_without_is_empty)] // a pool is never empty
pub trait Pmem {
    /// Pool size in bytes.
    fn len(&self) -> u64;
    /// Copies bytes out of the pool.
    fn read(&self, offset: u64, dst: &mut [u8]);
    /// Stores bytes into the pool; not persistent until [`Pmem::persist`].
    fn write(&mut self, offset: u64, src: &[u8]);
    /// Makes every store to `[offset, offset + len)` persistent (flush and fence).
    fn persist(&mut self, offset: u64, len: u64);
    /// Stores bytes and makes them persistent: [`Pmem::write`] then
    /// [`Pmem::persist`], which a pool may do in one pass (non-temporal
    /// stores need no cache-line flushes).
    fn write_persist(&mut self, offset: u64, src: &[u8]) {
        self.write(offset, src);
        self.persist(offset, src.len() as u64);
    }
    /// Like [`Pmem::write_persist`], but may return before the stores are
    /// persistent; they are once [`Pmem::drain`] returns. The default is
    /// the stronger `write_persist`.
    fn write_nodrain(&mut self, offset: u64, src: &[u8]) {
        self.write_persist(offset, src);
    }
    /// Waits until every store made by [`Pmem::write_nodrain`] is persistent.
    fn drain(&mut self) {}
}

pub const POOL_MAGIC: [u8; 8] = *b"WBOOSTPM";
const POOL_CRC_AT: usize = 60;
/// Bytes of a slot header: log id, epoch, checksum.
pub const SLOT_HEADER: u64 = 64;
/// Bytes of one block entry in a slot.
pub const ENTRY_SIZE: u64 = 32;

/// Placement of the slots in a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLayout {
    pub nr_slots: u32,
    pub data_blocks: u32,
    /// Bytes from a slot's start to its data blocks.
    pub data_offset: u64,
    pub slot_size: u64,
}

impl PoolLayout {
    /// Slots of a pool of `len` bytes for segments of `geo`; at least two.
    pub fn new(len: u64, geo: &Geometry) -> Result<Self, FormatError> {
        let data_blocks = geo.data_blocks;
        let data_offset =
            (SLOT_HEADER + data_blocks as u64 * ENTRY_SIZE).next_multiple_of(BLOCK_SIZE);
        let slot_size = data_offset + data_blocks as u64 * BLOCK_SIZE;
        let nr_slots = (len.saturating_sub(BLOCK_SIZE) / slot_size).min(u32::MAX as u64) as u32;
        if nr_slots < 2 {
            return Err(FormatError::PoolTooSmall {
                len,
                needed: BLOCK_SIZE + 2 * slot_size,
            });
        }
        Ok(Self {
            nr_slots,
            data_blocks,
            data_offset,
            slot_size,
        })
    }

    pub fn slot(&self, i: u32) -> u64 {
        BLOCK_SIZE + i as u64 * self.slot_size
    }

    pub fn entry(&self, i: u32, block: u32) -> u64 {
        self.slot(i) + SLOT_HEADER + block as u64 * ENTRY_SIZE
    }

    pub fn data(&self, i: u32, block: u32) -> u64 {
        self.slot(i) + self.data_offset + block as u64 * BLOCK_SIZE
    }
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The pool header: which cache the pool belongs to and its geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolHeader {
    pub cache_uuid: [u8; 16],
    pub segment_size: u64,
    pub data_blocks: u32,
    pub nr_slots: u32,
}

impl PoolHeader {
    pub fn encode(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[..8].copy_from_slice(&POOL_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[16..32].copy_from_slice(&self.cache_uuid);
        b[32..40].copy_from_slice(&self.segment_size.to_le_bytes());
        b[40..44].copy_from_slice(&self.data_blocks.to_le_bytes());
        b[44..48].copy_from_slice(&self.nr_slots.to_le_bytes());
        let crc = crc32c::crc32c(&b[..POOL_CRC_AT]);
        b[POOL_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a pool header; `Ok(None)` for a pool never formatted (all zero).
    pub fn parse(b: &[u8]) -> Result<Option<Self>, FormatError> {
        if b.len() < 64 {
            return Err(FormatError::Truncated {
                what: "pmem pool header",
            });
        }
        if b[..64].iter().all(|&x| x == 0) {
            return Ok(None);
        }
        if b[..8] != POOL_MAGIC || crc32c::crc32c(&b[..POOL_CRC_AT]) != get_u32(b, POOL_CRC_AT) {
            return Err(FormatError::BadChecksum {
                what: "pmem pool header",
            });
        }
        let version = get_u32(b, 8);
        if version > FORMAT_VERSION {
            return Err(FormatError::NewerVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let mut cache_uuid = [0u8; 16];
        cache_uuid.copy_from_slice(&b[16..32]);
        Ok(Some(Self {
            cache_uuid,
            segment_size: get_u64(b, 32),
            data_blocks: get_u32(b, 40),
            nr_slots: get_u32(b, 44),
        }))
    }
}

/// Slot header: the log the slot currently holds.
pub fn encode_slot_header(id: u64, epoch: u64) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(&id.to_le_bytes());
    b[8..16].copy_from_slice(&epoch.to_le_bytes());
    let crc = crc32c::crc32c(&b[..16]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    b
}

/// (log id, epoch) of a slot, or None for an empty or damaged header.
pub fn parse_slot_header(b: &[u8]) -> Option<(u64, u64)> {
    if b.len() < 24 || crc32c::crc32c(&b[..16]) != get_u32(b, 16) {
        return None;
    }
    let id = get_u64(b, 0);
    (id != 0).then(|| (id, get_u64(b, 8)))
}

/// One published block of a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotEntry {
    pub block: u64,
    pub valid: u8,
}

/// The 24 bytes of an entry that its commit word seals.
pub fn encode_entry(e: &SlotEntry, data_crc: u32) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(&(e.block * SECTORS_PER_BLOCK).to_le_bytes());
    b[8] = e.valid;
    b[12..16].copy_from_slice(&data_crc.to_le_bytes());
    b
}

/// The commit word for entry bytes `entry` of log `id`: never zero.
pub fn commit_word(id: u64, entry: &[u8; 24]) -> u64 {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&id.to_le_bytes()), entry) as u64;
    (id << 32) ^ crc | 1 << 63
}

/// Parses entry `raw` (32 bytes) of log `id`; None if not committed for this
/// log, torn, or out of range. `data` is the block's data for the CRC check.
pub fn parse_entry(raw: &[u8], id: u64, data: &[u8], geo: &Geometry) -> Option<SlotEntry> {
    if raw.len() < ENTRY_SIZE as usize || data.len() < BLOCK_SIZE as usize {
        return None;
    }
    let mut entry = [0u8; 24];
    entry.copy_from_slice(&raw[..24]);
    if get_u64(raw, 24) != commit_word(id, &entry) {
        return None;
    }
    let sector = get_u64(raw, 0);
    let valid = raw[8];
    let block = sector / SECTORS_PER_BLOCK;
    if !sector.is_multiple_of(SECTORS_PER_BLOCK) || block >= geo.backing_blocks() || valid == 0 {
        return None;
    }
    (crc32c::crc32c(&data[..BLOCK_SIZE as usize]) == get_u32(raw, 12))
        .then_some(SlotEntry { block, valid })
}

/// Pool memory for tests and the simulator's reference: a plain byte vector
/// where every store is persistent at once.
#[derive(Clone, Debug)]
pub struct RamPmem(pub Vec<u8>);

impl Pmem for RamPmem {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
    fn read(&self, offset: u64, dst: &mut [u8]) {
        dst.copy_from_slice(&self.0[offset as usize..offset as usize + dst.len()]);
    }
    fn write(&mut self, offset: u64, src: &[u8]) {
        self.0[offset as usize..offset as usize + src.len()].copy_from_slice(src);
    }
    fn persist(&mut self, _offset: u64, _len: u64) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::DEFAULT_SEGMENT_SIZE;

    fn geo() -> Geometry {
        Geometry::new(DEFAULT_SEGMENT_SIZE, 64 << 20, 1 << 30).unwrap()
    }

    #[test]
    fn layout_needs_two_slots() {
        let g = geo();
        let l = PoolLayout::new(8 << 20, &g).unwrap();
        assert_eq!(l.data_offset, 12288);
        assert_eq!(l.slot_size, 12288 + 255 * 4096);
        assert_eq!(l.nr_slots, 7);
        assert!(matches!(
            PoolLayout::new(1 << 20, &g),
            Err(FormatError::PoolTooSmall { .. })
        ));
    }

    #[test]
    fn header_round_trips_and_empty_pool_is_recognised() {
        let h = PoolHeader {
            cache_uuid: [3; 16],
            segment_size: 1 << 20,
            data_blocks: 255,
            nr_slots: 7,
        };
        assert_eq!(PoolHeader::parse(&h.encode()).unwrap(), Some(h));
        assert_eq!(PoolHeader::parse(&[0; 64]).unwrap(), None);
        let mut b = h.encode();
        b[20] ^= 1;
        assert!(PoolHeader::parse(&b).is_err());
    }

    #[test]
    fn entries_commit_only_for_their_log_and_data() {
        let g = geo();
        let data = vec![7u8; 4096];
        let e = SlotEntry {
            block: 12,
            valid: 0xff,
        };
        let bytes = encode_entry(&e, crc32c::crc32c(&data));
        let mut raw = [0u8; 32];
        raw[..24].copy_from_slice(&bytes);
        raw[24..].copy_from_slice(&commit_word(5, &bytes).to_le_bytes());
        assert_eq!(parse_entry(&raw, 5, &data, &g), Some(e));
        assert_eq!(
            parse_entry(&raw, 6, &data, &g),
            None,
            "leftover of an older log"
        );
        let mut torn = data.clone();
        torn[100] = 0;
        assert_eq!(
            parse_entry(&raw, 5, &torn, &g),
            None,
            "data not fully persisted"
        );
        raw[8] = 0x0f;
        assert_eq!(
            parse_entry(&raw, 5, &data, &g),
            None,
            "entry changed after commit"
        );
        assert_eq!(parse_slot_header(&encode_slot_header(9, 2)), Some((9, 2)));
        assert_eq!(parse_slot_header(&[0; 24]), None);
    }
}
