//! Encoding and parsing of every on-disk structure (documented in docs/FORMAT.md).
//!
//! Parsers never trust a field: each is range-checked against the geometry
//! before it is used, so a corrupted or hostile device yields an error, not a
//! panic or an out-of-range access.

use crate::error::FormatError;
use crate::geometry::{BLOCK_SIZE, Geometry, METABLOCK_SIZE, SECTOR_SIZE, SEGMENT_HEADER_FIXED};

pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"WBOOSTSB";
pub const RECORD_MAGIC: [u8; 8] = *b"WBOOSTRC";
pub const SEGMENT_MAGIC: [u8; 8] = *b"WBOOSTSG";
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"WBOOSTCK";
/// Format version written by this build. Newer caches are refused ("upgrade"),
/// and so are versions older than [`OLDEST_READABLE_VERSION`] (version 1 logs
/// carry no per-block checksums or durable frontier; version 2 has no
/// checkpoint region, so its ring is laid out differently): they must be
/// written back by the release that made them. Version 4 records carry the
/// quarantine list; a version 3 cache is read as it is, and its superblock is
/// rewritten as the current version when it opens, so a release that cannot
/// read the list refuses the cache from then on. Version 5 logs may hold
/// padding metablocks (slots a submitter reserved and handed back unused),
/// which version 4 releases would take for damage: a version 4 superblock
/// is rewritten as 5 at the open, and version 4 releases refuse it.
pub const FORMAT_VERSION: u32 = 5;
/// The oldest version this build reads.
pub const OLDEST_READABLE_VERSION: u32 = 3;

/// Byte offsets of the fixed structures in region 0.
pub const SUPERBLOCK_OFFSET: u64 = 0;
pub const RECORD_OFFSETS: [u64; 2] = [BLOCK_SIZE, 2 * BLOCK_SIZE];
/// Region 0 prefix read at start-up: superblock and both record slots.
pub const META_AREA_LEN: usize = 3 * BLOCK_SIZE as usize;

const SB_CRC_AT: usize = 124;
/// Where a version 3 record's CRC-32C lies (it covers the bytes before it).
const RECORD_V3_CRC_AT: usize = 80;
/// A version 4 record: the quarantine list's length, the list, and a
/// CRC-32C of everything before it in the block's last 4 bytes.
const RECORD_QUARANTINE_LEN_AT: usize = 80;
const RECORD_QUARANTINE_AT: usize = 88;
const RECORD_CRC_AT: usize = BLOCK_SIZE as usize - 4;
/// Quarantined blocks a record lists at most.
pub const MAX_QUARANTINE: usize = (RECORD_CRC_AT - RECORD_QUARANTINE_AT) / 8;
const SEG_CRC_AT: usize = 48;
const SEG_DURABLE_AT: usize = 52;
/// Largest backing block number a metablock can hold (48 bits).
/// Log headers recovery reads past the last intact log to find a claim that
/// a bad log was durable. Logs sealed before one became durable are the few
/// in flight with it, so the first log sealed after it lies within this
/// window, unless every log between them is damaged too.
pub const DURABLE_LOOKAHEAD: u64 = 256;
pub const MAX_BACKING_BLOCKS: u64 = 1 << 48;

/// Metablock flag: the block was dirty (not on the backing device) when logged.
pub const MB_FLAG_DIRTY: u8 = 1;

fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
fn get_uuid(b: &[u8], at: usize) -> [u8; 16] {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    a
}
fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

/// Versions from [`OLDEST_READABLE_VERSION`] to this build's open: a newer
/// one needs a newer build, an older one the release that wrote it.
fn check_version(found: u32) -> Result<(), FormatError> {
    match found {
        OLDEST_READABLE_VERSION..=FORMAT_VERSION => Ok(()),
        f if f > FORMAT_VERSION => Err(FormatError::NewerVersion {
            found: f,
            supported: FORMAT_VERSION,
        }),
        f => Err(FormatError::OlderVersion {
            found: f,
            supported: FORMAT_VERSION,
        }),
    }
}

/// Identity of the backing device a cache belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackingIdentity {
    /// Host-supplied UUID of the backing device.
    pub uuid: [u8; 16],
    /// Size of the backing device in bytes.
    pub size: u64,
}

/// Block 0 of the cache device: what this cache is and how it is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub segment_size: u64,
    pub header_blocks: u32,
    pub data_blocks: u32,
    pub nr_segments: u64,
    pub cache_uuid: [u8; 16],
    pub backing: BackingIdentity,
    /// Size of the cache device when it was formatted.
    pub cache_size: u64,
}

impl Superblock {
    pub fn new(
        geo: &Geometry,
        cache_uuid: [u8; 16],
        backing: BackingIdentity,
        cache_size: u64,
    ) -> Self {
        Self {
            version: FORMAT_VERSION,
            segment_size: geo.segment_size,
            header_blocks: geo.header_blocks,
            data_blocks: geo.data_blocks,
            nr_segments: geo.nr_segments,
            cache_uuid,
            backing,
            cache_size,
        }
    }

    pub fn encode(&self) -> [u8; BLOCK_SIZE as usize] {
        let mut b = [0u8; BLOCK_SIZE as usize];
        put(&mut b, 0, &SUPERBLOCK_MAGIC);
        put(&mut b, 8, &self.version.to_le_bytes());
        put(&mut b, 12, &(BLOCK_SIZE as u32).to_le_bytes());
        put(&mut b, 16, &(SECTOR_SIZE as u32).to_le_bytes());
        put(&mut b, 20, &self.header_blocks.to_le_bytes());
        put(&mut b, 24, &self.segment_size.to_le_bytes());
        put(&mut b, 32, &self.nr_segments.to_le_bytes());
        put(&mut b, 40, &self.cache_uuid);
        put(&mut b, 56, &self.backing.uuid);
        put(&mut b, 72, &self.backing.size.to_le_bytes());
        put(&mut b, 80, &self.cache_size.to_le_bytes());
        put(&mut b, 88, &self.data_blocks.to_le_bytes());
        let crc = crc32c::crc32c(&b[..SB_CRC_AT]);
        put(&mut b, SB_CRC_AT, &crc.to_le_bytes());
        b
    }

    /// Parses and validates block 0. `cache_size` is the device's current size.
    pub fn parse(b: &[u8], cache_size: u64) -> Result<Self, FormatError> {
        if b.len() < BLOCK_SIZE as usize {
            return Err(FormatError::Truncated { what: "superblock" });
        }
        if b[..8] != SUPERBLOCK_MAGIC {
            return Err(FormatError::NotACache);
        }
        if crc32c::crc32c(&b[..SB_CRC_AT]) != get_u32(b, SB_CRC_AT) {
            return Err(FormatError::BadChecksum { what: "superblock" });
        }
        let version = get_u32(b, 8);
        check_version(version)?;
        let (block, sector) = (get_u32(b, 12) as u64, get_u32(b, 16) as u64);
        if block != BLOCK_SIZE || sector != SECTOR_SIZE {
            return Err(FormatError::BlockSizeMismatch { block, sector });
        }
        let sb = Self {
            version,
            header_blocks: get_u32(b, 20),
            segment_size: get_u64(b, 24),
            nr_segments: get_u64(b, 32),
            cache_uuid: get_uuid(b, 40),
            backing: BackingIdentity {
                uuid: get_uuid(b, 56),
                size: get_u64(b, 72),
            },
            cache_size: get_u64(b, 80),
            data_blocks: get_u32(b, 88),
        };
        // The stored geometry must be exactly what the format rules derive, so
        // no later address computation can leave the device.
        let geo = Geometry::new(sb.segment_size, sb.cache_size, sb.backing.size)?;
        if geo.header_blocks != sb.header_blocks
            || geo.data_blocks != sb.data_blocks
            || geo.nr_segments != sb.nr_segments
        {
            return Err(FormatError::BadChecksum {
                what: "superblock geometry",
            });
        }
        if sb.cache_size > cache_size {
            return Err(FormatError::CacheShrunk {
                formatted: sb.cache_size,
                now: cache_size,
            });
        }
        Ok(sb)
    }

    pub fn geometry(&self) -> Geometry {
        Geometry {
            segment_size: self.segment_size,
            header_blocks: self.header_blocks,
            data_blocks: self.data_blocks,
            nr_segments: self.nr_segments,
            backing_size: self.backing.size,
        }
    }
}

/// The superblock record: how far writeback has durably progressed.
/// Two slots are written alternately so a torn write never loses both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SbRecord {
    /// Increases with every write; the valid slot with the larger one wins.
    pub seq: u64,
    /// Every log with an id at or below this is on the backing device, durably.
    pub last_writeback_id: u64,
    /// Epoch of that log: the log after it must not be older.
    pub last_writeback_epoch: u64,
    /// Every log with an id at or below this was durable on the cache device
    /// when the record was written (the durable frontier then).
    pub durable_id: u64,
    /// Incarnation of the cache; bumped at every start before new logs are written.
    pub epoch: u64,
    pub cache_uuid: [u8; 16],
    /// [`RECORD_FLAG_PMEM`]: a pmem pool may hold acknowledged writes.
    pub flags: u32,
}

/// Record flag: the cache runs (or ran) with a pmem buffer whose slots may
/// hold acknowledged writes not yet in a durable log.
pub const RECORD_FLAG_PMEM: u32 = 1;
/// Record flag: written at a clean shutdown after the checkpoint with the
/// same sequence number and epoch was durable; start-up may load it instead
/// of replaying logs. The next incarnation's first record drops it.
pub const RECORD_FLAG_CHECKPOINT: u32 = 2;

/// The largest log id, epoch or record sequence number a structure may
/// state: a cache that wrote a log every nanosecond would reach it after a
/// century, so a larger one is damage that passed its CRC, and refusing it
/// keeps every `+ 1` the engine does on these numbers from wrapping.
pub const MAX_COUNTER: u64 = 1 << 62;

impl SbRecord {
    /// The record with an empty quarantine list.
    pub fn encode(&self) -> [u8; BLOCK_SIZE as usize] {
        self.encode_with(&[])
    }

    /// The record listing `quarantine` (ascending backing blocks, at most
    /// [`MAX_QUARANTINE`]; the caller keeps to both).
    pub fn encode_with(&self, quarantine: &[u64]) -> [u8; BLOCK_SIZE as usize] {
        debug_assert!(quarantine.len() <= MAX_QUARANTINE);
        debug_assert!(quarantine.is_sorted());
        let mut b = [0u8; BLOCK_SIZE as usize];
        put(&mut b, 0, &RECORD_MAGIC);
        put(&mut b, 8, &FORMAT_VERSION.to_le_bytes());
        put(&mut b, 16, &self.seq.to_le_bytes());
        put(&mut b, 24, &self.last_writeback_id.to_le_bytes());
        put(&mut b, 32, &self.epoch.to_le_bytes());
        put(&mut b, 40, &self.cache_uuid);
        put(&mut b, 56, &self.flags.to_le_bytes());
        put(&mut b, 64, &self.last_writeback_epoch.to_le_bytes());
        put(&mut b, 72, &self.durable_id.to_le_bytes());
        let n = quarantine.len().min(MAX_QUARANTINE);
        put(&mut b, RECORD_QUARANTINE_LEN_AT, &(n as u32).to_le_bytes());
        for (i, block) in quarantine[..n].iter().enumerate() {
            put(&mut b, RECORD_QUARANTINE_AT + 8 * i, &block.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..RECORD_CRC_AT]);
        put(&mut b, RECORD_CRC_AT, &crc.to_le_bytes());
        b
    }

    /// The quarantine list of a record block [`SbRecord::parse`] accepted
    /// (empty for version 3, which has none).
    pub fn parse_quarantine(b: &[u8]) -> Vec<u64> {
        if get_u32(b, 8) < 4 {
            return Vec::new();
        }
        let n = (get_u32(b, RECORD_QUARANTINE_LEN_AT) as usize).min(MAX_QUARANTINE);
        (0..n)
            .map(|i| get_u64(b, RECORD_QUARANTINE_AT + 8 * i))
            .collect()
    }

    pub fn parse(b: &[u8], cache_uuid: &[u8; 16]) -> Result<Self, FormatError> {
        if b.len() < BLOCK_SIZE as usize {
            return Err(FormatError::Truncated {
                what: "superblock record",
            });
        }
        // The version says where the CRC lies; a damaged version field
        // fails it wherever it is looked for.
        let version = get_u32(b, 8);
        let crc_at = if version <= 3 {
            RECORD_V3_CRC_AT
        } else {
            RECORD_CRC_AT
        };
        if b[..8] != RECORD_MAGIC || crc32c::crc32c(&b[..crc_at]) != get_u32(b, crc_at) {
            return Err(FormatError::BadChecksum {
                what: "superblock record",
            });
        }
        check_version(version)?;
        if version >= 4 {
            // The list: within bounds, ascending, each a 48-bit block.
            let n = get_u32(b, RECORD_QUARANTINE_LEN_AT) as usize;
            let list = (0..n.min(MAX_QUARANTINE)).map(|i| get_u64(b, RECORD_QUARANTINE_AT + 8 * i));
            let mut prev = None;
            let ordered = list.into_iter().all(|blk| {
                let ok = blk < MAX_BACKING_BLOCKS && prev.is_none_or(|p| p < blk);
                prev = Some(blk);
                ok
            });
            if n > MAX_QUARANTINE || get_u32(b, RECORD_QUARANTINE_LEN_AT + 4) != 0 || !ordered {
                return Err(FormatError::BadChecksum {
                    what: "superblock record quarantine list",
                });
            }
        }
        let r = Self {
            seq: get_u64(b, 16),
            last_writeback_id: get_u64(b, 24),
            epoch: get_u64(b, 32),
            cache_uuid: get_uuid(b, 40),
            flags: get_u32(b, 56),
            last_writeback_epoch: get_u64(b, 64),
            durable_id: get_u64(b, 72),
        };
        if &r.cache_uuid != cache_uuid
            || r.flags & !(RECORD_FLAG_PMEM | RECORD_FLAG_CHECKPOINT) != 0
            || r.durable_id < r.last_writeback_id
            || [r.seq, r.durable_id, r.epoch, r.last_writeback_epoch]
                .iter()
                .any(|&n| n > MAX_COUNTER)
        {
            return Err(FormatError::BadChecksum {
                what: "superblock record (other cache)",
            });
        }
        Ok(r)
    }

    /// Slot this record goes to.
    pub fn offset(&self) -> u64 {
        RECORD_OFFSETS[(self.seq % 2) as usize]
    }
}

/// One data block's description in a segment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metablock {
    /// Backing device block number (4 KiB units).
    pub block: u64,
    /// Sectors of the block that the log holds.
    pub valid: u8,
    /// The block was dirty when logged (recovery replays only dirty blocks).
    pub dirty: bool,
    /// CRC-32C of the block's 4 KiB in the log.
    pub crc: u32,
}

impl Metablock {
    /// A slot reserved for a submitter and handed back unused: block 0, no
    /// sectors, no flags. Its data is part of nothing.
    pub fn padding(crc: u32) -> Self {
        Self {
            block: 0,
            valid: 0,
            dirty: false,
            crc,
        }
    }

    pub fn is_padding(&self) -> bool {
        self.valid == 0
    }
}

/// Parsed fixed part of a segment header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub id: u64,
    pub epoch: u64,
    pub nr_valid: u32,
    /// Every log with an id at or below this was durable when this one was
    /// sealed: a bad log at or below it is corruption, not a torn tail.
    pub durable_id: u64,
    pub checksum: u32,
}

/// Writes a segment header into `hdr` (the first `geo.header_len()` bytes of
/// a segment buffer). Each metablock carries its block's CRC-32C, and the
/// header's checksum covers the header, so it covers the data through them.
pub fn encode_segment_header(
    hdr: &mut [u8],
    geo: &Geometry,
    id: u64,
    epoch: u64,
    durable_id: u64,
    cache_uuid: &[u8; 16],
    blocks: &[Metablock],
) {
    hdr.fill(0);
    put(hdr, 0, &SEGMENT_MAGIC);
    put(hdr, 8, &(FORMAT_VERSION as u16).to_le_bytes());
    put(hdr, 10, &(geo.header_blocks as u16).to_le_bytes());
    put(hdr, 12, &(blocks.len() as u16).to_le_bytes());
    put(hdr, 16, &id.to_le_bytes());
    put(hdr, 24, &epoch.to_le_bytes());
    put(hdr, 32, cache_uuid);
    put(hdr, SEG_DURABLE_AT, &durable_id.to_le_bytes());
    for (i, mb) in blocks.iter().enumerate() {
        let at = SEGMENT_HEADER_FIXED + i * METABLOCK_SIZE;
        debug_assert!(mb.block < MAX_BACKING_BLOCKS);
        put(hdr, at, &mb.block.to_le_bytes()[..6]);
        hdr[at + 6] = mb.valid;
        hdr[at + 7] = if mb.dirty { MB_FLAG_DIRTY } else { 0 };
        put(hdr, at + 8, &mb.crc.to_le_bytes());
    }
    let crc = crc32c::crc32c(&hdr[..geo.header_len()]);
    put(hdr, SEG_CRC_AT, &crc.to_le_bytes());
}

/// Parses and checks a segment header: it belongs to this cache, its
/// checksum matches and every field is within the geometry. Returns the
/// header and its metablocks; the data blocks are checked against them by
/// [`verify_blocks`].
pub fn verify_segment_header(
    hdr: &[u8],
    geo: &Geometry,
    cache_uuid: &[u8; 16],
) -> Result<(SegmentHeader, Vec<Metablock>), FormatError> {
    let hl = geo.header_len();
    if hdr.len() < hl {
        return Err(FormatError::Truncated {
            what: "segment header",
        });
    }
    if hdr[..8] != SEGMENT_MAGIC || &get_uuid(hdr, 32) != cache_uuid {
        return Err(FormatError::NotALog);
    }
    let checksum = get_u32(hdr, SEG_CRC_AT);
    let mut crc = crc32c::crc32c(&hdr[..SEG_CRC_AT]);
    crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc = crc32c::crc32c_append(crc, &hdr[SEG_CRC_AT + 4..hl]);
    if crc != checksum {
        return Err(FormatError::BadChecksum { what: "log header" });
    }
    check_version(get_u16(hdr, 8) as u32)?;
    let nr_valid = get_u16(hdr, 12) as u32;
    // An empty log (nr_valid 0) is a salvage's tombstone.
    if get_u16(hdr, 10) as u32 != geo.header_blocks || nr_valid > geo.data_blocks {
        return Err(FormatError::BadChecksum {
            what: "segment header fields",
        });
    }
    let h = SegmentHeader {
        id: get_u64(hdr, 16),
        epoch: get_u64(hdr, 24),
        nr_valid,
        durable_id: get_u64(hdr, SEG_DURABLE_AT),
        checksum,
    };
    if h.durable_id >= h.id || h.id > MAX_COUNTER || h.epoch > MAX_COUNTER {
        // A log is sealed before it can be durable.
        return Err(FormatError::BadChecksum {
            what: "segment header durable frontier",
        });
    }
    let blocks = parse_metablocks(hdr, geo, nr_valid)?;
    Ok((h, blocks))
}

/// Checks each data block of a log (`data` starts with the first one)
/// against its metablock's CRC-32C; returns the index of the first mismatch.
pub fn verify_blocks(data: &[u8], blocks: &[Metablock]) -> Result<(), FormatError> {
    if data.len() < blocks.len() * BLOCK_SIZE as usize {
        return Err(FormatError::Truncated {
            what: "segment data",
        });
    }
    for (i, (mb, d)) in blocks
        .iter()
        .zip(data.chunks(BLOCK_SIZE as usize))
        .enumerate()
    {
        if crc32c::crc32c(d) != mb.crc {
            return Err(FormatError::BadBlock { index: i as u32 });
        }
    }
    Ok(())
}

/// The data blocks of a log (`data` starts with the first one) that do not
/// match their metablock's CRC-32C (all of them past the end of `data`).
pub fn damaged_blocks(data: &[u8], blocks: &[Metablock]) -> Vec<u32> {
    (0..blocks.len())
        .filter(|&i| {
            let at = i * BLOCK_SIZE as usize;
            data.get(at..at + BLOCK_SIZE as usize)
                .is_none_or(|d| crc32c::crc32c(d) != blocks[i].crc)
        })
        .map(|i| i as u32)
        .collect()
}

/// Verifies a whole log (`seg` starts with the header and holds at least the
/// valid data blocks) and returns its header and metablocks.
pub fn verify_segment(
    seg: &[u8],
    geo: &Geometry,
    cache_uuid: &[u8; 16],
) -> Result<(SegmentHeader, Vec<Metablock>), FormatError> {
    let (h, blocks) = verify_segment_header(seg, geo, cache_uuid)?;
    verify_blocks(&seg[geo.header_len()..], &blocks)?;
    Ok((h, blocks))
}

/// The first `nr` metablocks of a segment header, each range-checked (the
/// header's checksum is not verified here).
pub fn parse_metablocks(
    seg: &[u8],
    geo: &Geometry,
    nr: u32,
) -> Result<Vec<Metablock>, FormatError> {
    if nr > geo.data_blocks || seg.len() < geo.header_len() {
        return Err(FormatError::Truncated {
            what: "segment header",
        });
    }
    let mut blocks = Vec::with_capacity(nr as usize);
    for i in 0..nr as usize {
        let at = SEGMENT_HEADER_FIXED + i * METABLOCK_SIZE;
        let mut b = [0u8; 8];
        b[..6].copy_from_slice(&seg[at..at + 6]);
        let block = u64::from_le_bytes(b);
        let (valid, flags) = (seg[at + 6], seg[at + 7]);
        // (Padding is block 0 with no sectors and no flags.)
        let padding = valid == 0 && block == 0 && flags == 0;
        if block >= geo.backing_blocks() || (valid == 0 && !padding) || flags & !MB_FLAG_DIRTY != 0
        {
            return Err(FormatError::BadMetablock { index: i as u32 });
        }
        blocks.push(Metablock {
            block,
            valid,
            dirty: flags & MB_FLAG_DIRTY != 0,
            crc: get_u32(seg, at + 8),
        });
    }
    Ok(blocks)
}

// ----- checkpoint ---------------------------------------------------------

/// Blocks of one aligned run share consecutive home buckets, so a
/// sequential write or a replayed log finds its next block's bucket in the
/// cache line it already holds. Longer runs cluster the table: with runs of
/// 16, entries of a sequentially filled table sat 25 buckets from home on
/// average, against 6 with runs of 4.
pub const INDEX_RUN: u64 = 4;

/// Entries of the block index's hash table for a cache of `nr_slots` slots:
/// 9/8 of the slots, in whole runs.
pub const fn index_table_len(nr_slots: u64) -> u64 {
    (nr_slots + nr_slots / 8 + 1).next_multiple_of(INDEX_RUN)
}

/// Bits of a hash-table entry that name a cache slot (as `slot + 1`); the
/// bits above state the entry's distance from its home bucket.
pub const fn index_slot_bits(nr_slots: u64) -> u32 {
    let n = if nr_slots == 0 { 1 } else { nr_slots };
    64 - n.leading_zeros()
}

/// Bit layout of an index word: the backing block in the low 48 bits, then
/// the valid and the dirty sector masks.
pub const INDEX_VALID_SHIFT: u32 = 48;
pub const INDEX_DIRTY_SHIFT: u32 = 56;

/// Checks an index word from a checkpoint: its block lies on the backing
/// device and its dirty sectors are valid ones.
pub fn parse_index_word(w: u64, backing_blocks: u64) -> Result<u64, FormatError> {
    let (valid, dirty) = (
        (w >> INDEX_VALID_SHIFT) as u8,
        (w >> INDEX_DIRTY_SHIFT) as u8,
    );
    if w & (MAX_BACKING_BLOCKS - 1) >= backing_blocks || dirty & !valid != 0 {
        return Err(FormatError::BadChecksum {
            what: "checkpoint index word",
        });
    }
    Ok(w)
}

/// Checks a hash-table entry from a checkpoint: empty, or naming a cache
/// slot that exists.
pub fn parse_table_entry(v: u32, nr_slots: u64) -> Result<u32, FormatError> {
    let mask = ((1u64 << index_slot_bits(nr_slots)) - 1) as u32;
    if v != 0 && !(1..=nr_slots).contains(&((v & mask) as u64)) {
        return Err(FormatError::BadChecksum {
            what: "checkpoint table entry",
        });
    }
    Ok(v)
}

/// Bytes of one ring position in a checkpoint.
pub const CHECKPOINT_POSITION_LEN: u64 = 32;
const CK_CRC_AT: usize = 108;

/// Where each section of a checkpoint lies, in bytes from its start. Each
/// section starts on a 4 KiB boundary and its elements divide 4 KiB, so a
/// 4 KiB-aligned piece of a checkpoint holds whole elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointLayout {
    pub nr_segments: u64,
    pub nr_slots: u64,
    pub table_len: u64,
    /// Ring positions: `nr_segments` × 32 bytes.
    pub positions: u64,
    /// Index words: one u64 per cache slot.
    pub words: u64,
    /// Logged-dirty bits: one u64 per 64 cache slots.
    pub logged: u64,
    /// The index's hash table: `table_len` × u32.
    pub table: u64,
    /// Bytes in all, header included.
    pub len: u64,
}

impl CheckpointLayout {
    pub fn new(nr_segments: u64, data_blocks: u32) -> Self {
        let b = BLOCK_SIZE;
        let nr_slots = nr_segments * data_blocks as u64;
        let table_len = index_table_len(nr_slots);
        let positions = b;
        let words = positions + (nr_segments * CHECKPOINT_POSITION_LEN).next_multiple_of(b);
        let logged = words + (nr_slots * 8).next_multiple_of(b);
        let table = logged + (nr_slots.div_ceil(64) * 8).next_multiple_of(b);
        let len = table + (table_len * 4).next_multiple_of(b);
        Self {
            nr_segments,
            nr_slots,
            table_len,
            positions,
            words,
            logged,
            table,
            len,
        }
    }
}

/// Block 0 of the checkpoint region: which record it belongs to and what
/// the rest holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointHeader {
    /// Sequence number and epoch of the shutdown record that vouches for it.
    pub seq: u64,
    pub epoch: u64,
    pub cache_uuid: [u8; 16],
    pub nr_segments: u64,
    pub data_blocks: u32,
    /// The next log id: every log before it was durable.
    pub next_id: u64,
    /// Blocks committed in the pmem pool's slot for log `next_id` at the
    /// shutdown (mode 1's partial buffer; 0: none). A start-up that finds
    /// fewer there was given a stale pool and refuses to open.
    pub pool_blocks: u32,
    pub last_writeback_id: u64,
    /// Cached and dirty blocks in the index.
    pub index_len: u64,
    pub nr_dirty: u64,
    /// CRC-32C of every byte after the header block.
    pub body_crc: u32,
}

impl CheckpointHeader {
    pub fn encode(&self) -> [u8; BLOCK_SIZE as usize] {
        let mut b = [0u8; BLOCK_SIZE as usize];
        put(&mut b, 0, &CHECKPOINT_MAGIC);
        put(&mut b, 8, &FORMAT_VERSION.to_le_bytes());
        put(&mut b, 16, &self.seq.to_le_bytes());
        put(&mut b, 24, &self.epoch.to_le_bytes());
        put(&mut b, 32, &self.cache_uuid);
        put(&mut b, 48, &self.nr_segments.to_le_bytes());
        put(&mut b, 56, &self.data_blocks.to_le_bytes());
        put(&mut b, 60, &self.pool_blocks.to_le_bytes());
        put(&mut b, 64, &self.next_id.to_le_bytes());
        put(&mut b, 72, &self.last_writeback_id.to_le_bytes());
        put(&mut b, 80, &self.index_len.to_le_bytes());
        put(&mut b, 88, &self.nr_dirty.to_le_bytes());
        put(&mut b, 96, &self.body_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..CK_CRC_AT]);
        put(&mut b, CK_CRC_AT, &crc.to_le_bytes());
        b
    }

    /// Parses and checks a checkpoint header against the geometry and the
    /// record that names it; the body is checked by its CRC as it is read.
    pub fn parse(b: &[u8], geo: &Geometry, record: &SbRecord) -> Result<Self, FormatError> {
        if b.len() < BLOCK_SIZE as usize {
            return Err(FormatError::Truncated {
                what: "checkpoint header",
            });
        }
        if b[..8] != CHECKPOINT_MAGIC || crc32c::crc32c(&b[..CK_CRC_AT]) != get_u32(b, CK_CRC_AT) {
            return Err(FormatError::BadChecksum {
                what: "checkpoint header",
            });
        }
        check_version(get_u32(b, 8))?;
        let h = Self {
            seq: get_u64(b, 16),
            epoch: get_u64(b, 24),
            cache_uuid: get_uuid(b, 32),
            nr_segments: get_u64(b, 48),
            data_blocks: get_u32(b, 56),
            pool_blocks: get_u32(b, 60),
            next_id: get_u64(b, 64),
            last_writeback_id: get_u64(b, 72),
            index_len: get_u64(b, 80),
            nr_dirty: get_u64(b, 88),
            body_crc: get_u32(b, 96),
        };
        // A checkpoint counts only for the record written right after it.
        let nr_slots = geo.nr_segments * geo.data_blocks as u64;
        if h.seq != record.seq
            || h.epoch != record.epoch
            || h.cache_uuid != record.cache_uuid
            || h.last_writeback_id != record.last_writeback_id
            || h.nr_segments != geo.nr_segments
            || h.data_blocks != geo.data_blocks
            || h.next_id <= h.last_writeback_id
            || h.next_id - 1 - h.last_writeback_id > geo.nr_segments
            || h.index_len > nr_slots
            || h.nr_dirty > h.index_len
            || h.pool_blocks > geo.data_blocks
        {
            return Err(FormatError::BadChecksum {
                what: "checkpoint header (another record or geometry)",
            });
        }
        Ok(h)
    }
}

/// One ring position in a checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckpointPosition {
    /// The log there, 0 for none.
    pub id: u64,
    pub epoch: u64,
    /// Data slots it holds, and how many of them are the dirty indexed copy.
    pub nr_slots: u32,
    pub live_dirty: u32,
}

impl CheckpointPosition {
    pub fn encode(&self) -> [u8; CHECKPOINT_POSITION_LEN as usize] {
        let mut b = [0u8; CHECKPOINT_POSITION_LEN as usize];
        put(&mut b, 0, &self.id.to_le_bytes());
        put(&mut b, 8, &self.epoch.to_le_bytes());
        put(&mut b, 16, &self.nr_slots.to_le_bytes());
        put(&mut b, 20, &self.live_dirty.to_le_bytes());
        b
    }

    /// Parses the entry for ring position `pos`: its log must live there,
    /// before `h.next_id`, and its counts fit the geometry.
    pub fn parse(
        b: &[u8],
        pos: u64,
        geo: &Geometry,
        h: &CheckpointHeader,
    ) -> Result<Self, FormatError> {
        if b.len() < CHECKPOINT_POSITION_LEN as usize {
            return Err(FormatError::Truncated {
                what: "checkpoint position",
            });
        }
        let p = Self {
            id: get_u64(b, 0),
            epoch: get_u64(b, 8),
            nr_slots: get_u32(b, 16),
            live_dirty: get_u32(b, 20),
        };
        let placed = p.id == 0 || (p.id < h.next_id && (p.id - 1) % geo.nr_segments == pos);
        if !placed
            || p.epoch > h.epoch
            || p.nr_slots > geo.data_blocks
            || p.live_dirty > p.nr_slots
            || get_u64(b, 24) != 0
        {
            return Err(FormatError::BadChecksum {
                what: "checkpoint position",
            });
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::DEFAULT_SEGMENT_SIZE;

    fn geo() -> Geometry {
        Geometry::new(DEFAULT_SEGMENT_SIZE, 16 << 20, 1 << 30).unwrap()
    }
    const UUID: [u8; 16] = [7; 16];

    fn superblock(g: &Geometry) -> Superblock {
        let backing = BackingIdentity {
            uuid: [1; 16],
            size: 1 << 30,
        };
        Superblock::new(g, UUID, backing, 16 << 20)
    }

    #[test]
    fn superblock_round_trips_and_detects_damage() {
        let g = geo();
        let sb = superblock(&g);
        let mut b = sb.encode();
        assert_eq!(Superblock::parse(&b, 16 << 20).unwrap(), sb);
        assert!(matches!(
            Superblock::parse(&b, 8 << 20),
            Err(FormatError::CacheShrunk { .. })
        ));
        b[30] ^= 1;
        assert!(matches!(
            Superblock::parse(&b, 16 << 20),
            Err(FormatError::BadChecksum { .. })
        ));
        assert!(matches!(
            Superblock::parse(&[0; 4096], 16 << 20),
            Err(FormatError::NotACache)
        ));
    }

    #[test]
    fn newer_version_is_reported_as_such() {
        let g = geo();
        let sb = superblock(&g);
        let mut b = sb.encode();
        b[8] = 9;
        let crc = crc32c::crc32c(&b[..SB_CRC_AT]);
        b[SB_CRC_AT..SB_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            Superblock::parse(&b, 16 << 20),
            Err(FormatError::NewerVersion { found: 9, .. })
        ));
    }

    #[test]
    fn record_round_trips_and_rejects_other_caches() {
        let r = SbRecord {
            flags: RECORD_FLAG_PMEM,
            ..record()
        };
        let b = r.encode();
        assert_eq!(SbRecord::parse(&b, &UUID).unwrap(), r);
        assert!(SbRecord::parse(&b, &[0; 16]).is_err());
        assert_eq!(r.offset(), RECORD_OFFSETS[1]);
    }

    #[test]
    fn a_record_near_the_end_of_the_counters_is_refused() {
        // Its CRC is valid, yet the next log id or epoch would wrap.
        let ok = record();
        for r in [
            SbRecord {
                last_writeback_id: u64::MAX - 1,
                durable_id: u64::MAX,
                ..ok
            },
            SbRecord {
                epoch: u64::MAX,
                ..ok
            },
            SbRecord {
                last_writeback_epoch: MAX_COUNTER + 1,
                ..ok
            },
            SbRecord {
                seq: u64::MAX,
                ..ok
            },
        ] {
            assert!(SbRecord::parse(&r.encode(), &UUID).is_err(), "{r:?}");
        }
        let g = geo();
        let mut hdr = vec![0u8; g.header_len()];
        encode_segment_header(&mut hdr, &g, u64::MAX, 1, 0, &UUID, &[]);
        assert!(verify_segment_header(&hdr, &g, &UUID).is_err());
        encode_segment_header(&mut hdr, &g, 7, u64::MAX, 0, &UUID, &[]);
        assert!(verify_segment_header(&hdr, &g, &UUID).is_err());
    }

    fn metablocks(data: &[u8], spec: &[(u64, u8, bool)]) -> Vec<Metablock> {
        spec.iter()
            .zip(data.chunks(BLOCK_SIZE as usize))
            .map(|(&(block, valid, dirty), d)| Metablock {
                block,
                valid,
                dirty,
                crc: crc32c::crc32c(d),
            })
            .collect()
    }

    #[test]
    fn segment_round_trips_and_any_torn_byte_is_caught() {
        let g = geo();
        let mut seg = vec![0u8; g.segment_size as usize];
        let hl = g.header_len();
        for (i, x) in seg[hl..hl + 2 * 4096].iter_mut().enumerate() {
            *x = (i % 251) as u8;
        }
        let mbs = metablocks(&seg[hl..], &[(10, 0xff, true), (3, 0x0f, false)]);
        encode_segment_header(&mut seg[..hl], &g, 42, 3, 40, &UUID, &mbs);
        let (h, got) = verify_segment(&seg, &g, &UUID).unwrap();
        assert_eq!((h.id, h.epoch, h.nr_valid, h.durable_id), (42, 3, 2, 40));
        assert_eq!(got, mbs);
        for at in [0, 20, 55, 70, 4000, hl + 5, hl + 8191] {
            let mut torn = seg.clone();
            torn[at] ^= 0x40;
            assert!(
                verify_segment(&torn, &g, &UUID).is_err(),
                "flip at {at} undetected"
            );
        }
        // A data block that does not match its metablock leaves the header good.
        let mut rotted = seg.clone();
        rotted[hl + 4096 + 7] ^= 1;
        assert!(verify_segment_header(&rotted, &g, &UUID).is_ok());
        assert_eq!(
            verify_segment(&rotted, &g, &UUID),
            Err(FormatError::BadBlock { index: 1 })
        );
        // Bytes past the valid data are not part of the log.
        seg[hl + 3 * 4096] ^= 1;
        assert!(verify_segment(&seg, &g, &UUID).is_ok());
    }

    #[test]
    fn a_log_cannot_claim_itself_durable() {
        let g = geo();
        let mut seg = vec![0u8; g.segment_size as usize];
        let hl = g.header_len();
        let mbs = metablocks(&seg[hl..], &[(1, 0xff, true)]);
        encode_segment_header(&mut seg[..hl], &g, 7, 1, 7, &UUID, &mbs);
        assert!(verify_segment(&seg, &g, &UUID).is_err());
    }

    #[test]
    fn older_and_newer_versions_are_refused_with_what_to_do() {
        let g = geo();
        let sb = superblock(&g);
        let with_version = |v: u32| {
            let mut b = sb.encode();
            b[8..12].copy_from_slice(&v.to_le_bytes());
            let crc = crc32c::crc32c(&b[..SB_CRC_AT]);
            b[SB_CRC_AT..SB_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
            Superblock::parse(&b, 16 << 20)
        };
        for (v, older) in [(1u32, true), (2, true), (6, false)] {
            let e = with_version(v).unwrap_err();
            assert_eq!(
                matches!(e, FormatError::OlderVersion { found, .. } if found == v),
                older
            );
            assert_eq!(
                matches!(e, FormatError::NewerVersion { found: 6, .. }),
                !older
            );
        }
        // Version 3 differs only in its records, which are read as they
        // are; version 4 only in having no padding.
        assert!(with_version(3).is_ok());
        assert!(with_version(4).is_ok());
    }

    fn record() -> SbRecord {
        SbRecord {
            seq: 5,
            last_writeback_id: 3,
            last_writeback_epoch: 1,
            durable_id: 4,
            epoch: 2,
            cache_uuid: UUID,
            flags: 0,
        }
    }

    #[test]
    fn a_record_carries_its_quarantine_list() {
        let r = record();
        let list: Vec<u64> = (0..MAX_QUARANTINE as u64).map(|i| i * 3 + 1).collect();
        let b = r.encode_with(&list);
        assert_eq!(SbRecord::parse(&b, &UUID), Ok(r));
        assert_eq!(SbRecord::parse_quarantine(&b), list);
        assert!(SbRecord::parse_quarantine(&r.encode()).is_empty());
        // Out of order, repeated, too long or beyond 48 bits: refused even
        // with a matching CRC.
        let resealed = |mut b: [u8; 4096], at: usize, v: u64| {
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            let crc = crc32c::crc32c(&b[..RECORD_CRC_AT]);
            b[RECORD_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
            b
        };
        let two = r.encode_with(&[5, 9]);
        for (at, v) in [
            (RECORD_QUARANTINE_AT + 8, 5),
            (RECORD_QUARANTINE_AT + 8, 4),
            (RECORD_QUARANTINE_AT + 8, MAX_BACKING_BLOCKS),
            (RECORD_QUARANTINE_LEN_AT, MAX_QUARANTINE as u64 + 1),
        ] {
            assert!(
                SbRecord::parse(&resealed(two, at, v), &UUID).is_err(),
                "{at} {v}"
            );
        }
    }

    #[test]
    fn a_version_3_record_is_read_with_no_quarantine() {
        // Version 3: the fields as now, and the CRC-32C at byte 80.
        let r = record();
        let mut b = r.encode();
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        b[80..].fill(0);
        let crc = crc32c::crc32c(&b[..80]);
        b[80..84].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(SbRecord::parse(&b, &UUID), Ok(r));
        assert!(SbRecord::parse_quarantine(&b).is_empty());
    }

    #[test]
    fn out_of_range_metablock_is_rejected_even_with_a_good_checksum() {
        let g = Geometry::new(DEFAULT_SEGMENT_SIZE, 16 << 20, 1 << 20).unwrap();
        let mut seg = vec![0u8; g.segment_size as usize];
        let hl = g.header_len();
        let mbs = metablocks(&seg[hl..], &[(1 << 40, 0xff, true)]);
        encode_segment_header(&mut seg[..hl], &g, 1, 1, 0, &UUID, &mbs);
        assert!(matches!(
            verify_segment(&seg, &g, &UUID),
            Err(FormatError::BadMetablock { index: 0 })
        ));
    }

    fn checkpoint_header(g: &Geometry) -> (CheckpointHeader, SbRecord) {
        let rec = SbRecord {
            seq: 9,
            last_writeback_id: 3,
            last_writeback_epoch: 2,
            durable_id: 5,
            epoch: 4,
            cache_uuid: UUID,
            flags: RECORD_FLAG_CHECKPOINT,
        };
        let h = CheckpointHeader {
            seq: 9,
            epoch: 4,
            cache_uuid: UUID,
            nr_segments: g.nr_segments,
            data_blocks: g.data_blocks,
            pool_blocks: 2,
            next_id: 6,
            last_writeback_id: 3,
            index_len: 10,
            nr_dirty: 4,
            body_crc: 77,
        };
        (h, rec)
    }

    #[test]
    fn a_checkpoint_header_round_trips_for_its_record_only() {
        let g = geo();
        let (h, rec) = checkpoint_header(&g);
        let b = h.encode();
        assert_eq!(CheckpointHeader::parse(&b, &g, &rec), Ok(h));
        // The next incarnation's record, another cache's, damage: refused.
        let later = SbRecord { seq: 10, ..rec };
        assert!(CheckpointHeader::parse(&b, &g, &later).is_err());
        let other = SbRecord {
            cache_uuid: [8; 16],
            ..rec
        };
        assert!(CheckpointHeader::parse(&b, &g, &other).is_err());
        let mut bad = b;
        bad[70] ^= 1;
        assert!(CheckpointHeader::parse(&bad, &g, &rec).is_err());
        // Fields out of range, with a good checksum.
        for wrong in [
            CheckpointHeader {
                next_id: 3 + g.nr_segments + 2,
                ..h
            },
            CheckpointHeader { nr_dirty: 11, ..h },
            CheckpointHeader {
                nr_segments: g.nr_segments + 1,
                ..h
            },
        ] {
            assert!(CheckpointHeader::parse(&wrong.encode(), &g, &rec).is_err());
        }
        assert!(CheckpointHeader::parse(&b[..100], &g, &rec).is_err());
    }

    #[test]
    fn checkpoint_positions_and_index_entries_are_range_checked() {
        let g = geo();
        let (h, _) = checkpoint_header(&g);
        let p = CheckpointPosition {
            id: 5,
            epoch: 4,
            nr_slots: 200,
            live_dirty: 10,
        };
        assert_eq!(CheckpointPosition::parse(&p.encode(), 4, &g, &h), Ok(p));
        for wrong in [
            // Not at its position, not yet written, from a later epoch.
            (p, 3),
            (CheckpointPosition { id: 6, ..p }, 5),
            (CheckpointPosition { epoch: 5, ..p }, 4),
            (
                CheckpointPosition {
                    nr_slots: g.data_blocks + 1,
                    ..p
                },
                4,
            ),
            (
                CheckpointPosition {
                    live_dirty: 201,
                    ..p
                },
                4,
            ),
        ] {
            assert!(CheckpointPosition::parse(&wrong.0.encode(), wrong.1, &g, &h).is_err());
        }
        let mut reserved = p.encode();
        reserved[30] = 1;
        assert!(CheckpointPosition::parse(&reserved, 4, &g, &h).is_err());
        let blocks = g.backing_blocks();
        assert!(parse_index_word((blocks - 1) | (0xff << INDEX_VALID_SHIFT), blocks).is_ok());
        assert!(parse_index_word(blocks, blocks).is_err());
        assert!(parse_index_word(0x01 << INDEX_DIRTY_SHIFT, blocks).is_err());
        let slots = g.nr_segments * g.data_blocks as u64;
        assert!(parse_table_entry(0, slots).is_ok());
        assert!(parse_table_entry(slots as u32 | (3 << index_slot_bits(slots)), slots).is_ok());
        assert!(parse_table_entry(slots as u32 + 1, slots).is_err());
        assert!(parse_table_entry(1 << index_slot_bits(slots), slots).is_err());
    }
}
