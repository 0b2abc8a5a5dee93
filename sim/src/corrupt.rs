//! Corruption at rest: damage one log of a crashed cache image that the
//! device had made durable, as real devices do (bit rot, a write that landed
//! at the wrong offset, an acknowledged write that never reached the media).
//! The image is read with the engine's own format functions, the way
//! recovery reads it, so the damaged log is one recovery must report.

use rand::Rng;
use writeboost_engine::format::{
    CHECKPOINT_POSITION_LEN, CheckpointHeader, DURABLE_LOOKAHEAD, Metablock,
    RECORD_FLAG_CHECKPOINT, RECORD_OFFSETS, SbRecord, Superblock, encode_segment_header,
    verify_blocks, verify_segment_header,
};
use writeboost_engine::geometry::{BLOCK_SIZE, Geometry};
use writeboost_engine::ids::LogId;

/// A kind of damage to durable data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// One bit flipped in the log's header or in one of its data blocks.
    BitRot,
    /// Another position's log written over this one.
    Misdirected,
    /// The position holds what it held before the log was written: the
    /// previous lap's log, or zeroes on a first lap.
    LostWrite,
}

impl Fault {
    pub const ALL: [Fault; 3] = [Fault::BitRot, Fault::Misdirected, Fault::LostWrite];

    pub fn name(self) -> &'static str {
        match self {
            Fault::BitRot => "bit_rot",
            Fault::Misdirected => "misdirected",
            Fault::LostWrite => "lost_write",
        }
    }
}

/// What was damaged.
#[derive(Debug)]
pub struct Injected {
    pub fault: Fault,
    /// The damaged log, at or below the newest log known durable.
    pub log: u64,
    /// Its dirty blocks (backing block numbers): after a salvage they may
    /// read as any older contents.
    pub blocks: Vec<u64>,
    /// Only data blocks were damaged, not the header: recovery trusts the
    /// header of a log claimed durable, so the scrub finds this, not the open.
    pub in_data: bool,
}

/// The log chain recovery would replay from `img`, and the newest log any
/// record or intact header says was durable.
struct Chain {
    geo: Geometry,
    uuid: [u8; 16],
    logs: Vec<(u64, Vec<Metablock>)>,
    claimed: u64,
}

/// The superblock of `img` and its newest valid record, as start-up picks it.
fn superblock_and_record(img: &[u8], cache_size: u64) -> Option<(Superblock, SbRecord)> {
    let bs = BLOCK_SIZE as usize;
    let sb = Superblock::parse(img.get(..bs)?, cache_size).ok()?;
    let record = RECORD_OFFSETS
        .iter()
        .filter_map(|&off| {
            SbRecord::parse(&img[off as usize..off as usize + bs], &sb.cache_uuid).ok()
        })
        .max_by_key(|r| r.seq)?;
    Some((sb, record))
}

fn read_chain(img: &[u8], cache_size: u64) -> Option<Chain> {
    let (sb, record) = superblock_and_record(img, cache_size)?;
    let geo = sb.geometry();
    let seg = geo.segment_size as usize;
    let mut chain = Chain {
        geo,
        uuid: sb.cache_uuid,
        logs: Vec::new(),
        claimed: record.durable_id,
    };
    let mut prev_epoch = record.last_writeback_epoch;
    let mut broken = false;
    let last = record.last_writeback_id + geo.nr_segments.min(DURABLE_LOOKAHEAD);
    for id in record.last_writeback_id + 1..=last {
        let at = geo.segment_offset(LogId(id)) as usize;
        let log = &img[at..at + seg];
        let Ok((h, mbs)) = verify_segment_header(log, &geo, &sb.cache_uuid) else {
            broken = true;
            continue;
        };
        if h.id != id || h.epoch > record.epoch {
            broken = true;
            continue;
        }
        chain.claimed = chain.claimed.max(h.durable_id);
        let data_ok = verify_blocks(&log[geo.header_len()..], &mbs).is_ok();
        if !broken && data_ok && h.epoch >= prev_epoch {
            prev_epoch = h.epoch;
            chain.logs.push((id, mbs));
        } else {
            broken = true;
        }
    }
    Some(chain)
}

/// Damages one durable log of `img` with a fault chosen by `rng`; `None`
/// when no log is both in the chain and claimed durable.
pub fn inject(img: &mut [u8], cache_size: u64, rng: &mut impl Rng) -> Option<Injected> {
    let chain = read_chain(img, cache_size)?;
    let candidates: Vec<&(u64, Vec<Metablock>)> = chain
        .logs
        .iter()
        .filter(|(id, _)| *id <= chain.claimed)
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let (id, mbs) = candidates[rng.random_range(0..candidates.len())];
    let (geo, id) = (chain.geo, *id);
    let seg = geo.segment_size as usize;
    let at = geo.segment_offset(LogId(id)) as usize;
    let fault = Fault::ALL[rng.random_range(0..Fault::ALL.len())];
    let mut in_data = false;
    match fault {
        Fault::BitRot => {
            // Only bytes a checksum covers: the header and the used blocks.
            let span = geo.header_len() + mbs.len() * BLOCK_SIZE as usize;
            let off = rng.random_range(0..span);
            img[at + off] ^= 1 << rng.random_range(0..8);
            in_data = off >= geo.header_len();
        }
        Fault::Misdirected => {
            // Any other position of the ring.
            let other = id + rng.random_range(1..geo.nr_segments);
            let from = geo.segment_offset(LogId(other)) as usize;
            img.copy_within(from..from + seg, at);
        }
        Fault::LostWrite if id > geo.nr_segments => {
            // The previous lap's log at this position, intact in itself.
            let old = id - geo.nr_segments;
            let (h, _) = verify_segment_header(&img[at..at + seg], &geo, &chain.uuid).ok()?;
            encode_segment_header(
                &mut img[at..at + geo.header_len()],
                &geo,
                old,
                h.epoch,
                h.durable_id.min(old - 1),
                &chain.uuid,
                mbs,
            );
        }
        Fault::LostWrite => img[at..at + seg].fill(0),
    }
    Some(Injected {
        fault,
        log: id,
        blocks: mbs.iter().filter(|m| m.dirty).map(|m| m.block).collect(),
        in_data,
    })
}

/// A lie a checkpoint can tell that its CRC does not catch: the writer got
/// it wrong, not the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lie {
    /// A ring position's dirty count off by one (trusted, writeback would
    /// skip a dirty block or wait for one that is not there).
    LiveDirty,
    /// The header's count of dirty blocks off by one.
    DirtyCount,
    /// The header's count of cached blocks off by one.
    IndexLen,
    /// An entry of the index's hash table gone (its block forgotten).
    TableEntry,
}

impl Lie {
    pub const ALL: [Lie; 4] = [
        Lie::LiveDirty,
        Lie::DirtyCount,
        Lie::IndexLen,
        Lie::TableEntry,
    ];
}

/// Makes the checkpoint of a cleanly shut down image tell `lie`, then makes
/// its CRCs match again. `None` if the newest record names no checkpoint,
/// or there is nothing of that kind to lie about.
pub fn lie_in_checkpoint(
    img: &mut [u8],
    cache_size: u64,
    lie: Lie,
    rng: &mut impl Rng,
) -> Option<Lie> {
    let bs = BLOCK_SIZE as usize;
    let (sb, record) = superblock_and_record(img, cache_size)?;
    if record.flags & RECORD_FLAG_CHECKPOINT == 0 {
        return None;
    }
    let geo = sb.geometry();
    let (at, layout) = (geo.checkpoint_offset() as usize, geo.checkpoint_layout());
    let mut header = CheckpointHeader::parse(&img[at..at + bs], &geo, &record).ok()?;
    let body = at + bs..at + layout.len as usize;
    match lie {
        Lie::LiveDirty => {
            let pos_len = CHECKPOINT_POSITION_LEN as usize;
            let first = at + layout.positions as usize;
            let live: Vec<usize> = (0..layout.nr_segments as usize)
                .map(|p| first + p * pos_len)
                .filter(|&o| get_u64(img, o) != 0)
                .collect();
            let o = *live.get(rng.random_range(0..live.len().max(1)))?;
            // live_dirty is the u32 at byte 20 of a position.
            let v = get_u32(img, o + 20);
            let v = if v > 0 { v - 1 } else { 1 };
            img[o + 20..o + 24].copy_from_slice(&v.to_le_bytes());
        }
        Lie::DirtyCount => header.nr_dirty = header.nr_dirty.checked_sub(1).unwrap_or(1),
        Lie::IndexLen => header.index_len += 1,
        Lie::TableEntry => {
            let first = at + layout.table as usize;
            let used: Vec<usize> = (0..layout.table_len as usize)
                .map(|i| first + i * 4)
                .filter(|&o| get_u32(img, o) != 0)
                .collect();
            let o = *used.get(rng.random_range(0..used.len().max(1)))?;
            img[o..o + 4].fill(0);
        }
    }
    header.body_crc = crc32c::crc32c(&img[body]);
    img[at..at + bs].copy_from_slice(&header.encode());
    Some(lie)
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
