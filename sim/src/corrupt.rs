//! Corruption at rest: damage one log of a crashed cache image that the
//! device had made durable, as real devices do (bit rot, a write that landed
//! at the wrong offset, an acknowledged write that never reached the media).
//! The image is read with the engine's own format functions, the way
//! recovery reads it, so the damaged log is one recovery must report.

use rand::Rng;
use writeboost_engine::format::{
    DURABLE_LOOKAHEAD, Metablock, RECORD_OFFSETS, SbRecord, Superblock, encode_segment_header,
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

fn read_chain(img: &[u8], cache_size: u64) -> Option<Chain> {
    let bs = BLOCK_SIZE as usize;
    let sb = Superblock::parse(img.get(..bs)?, cache_size).ok()?;
    let record = RECORD_OFFSETS
        .iter()
        .filter_map(|&off| {
            SbRecord::parse(&img[off as usize..off as usize + bs], &sb.cache_uuid).ok()
        })
        .max_by_key(|r| r.seq)?;
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
