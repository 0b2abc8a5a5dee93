//! Checkpoint parsing (its header, ring positions, index words and table
//! entries) must reject any input without panicking, whatever geometry the
//! cache has.
#![no_main]
use libfuzzer_sys::fuzz_target;
use writeboost_engine::format::{
    CHECKPOINT_POSITION_LEN, CheckpointHeader, CheckpointPosition, RECORD_FLAG_CHECKPOINT,
    SbRecord, parse_index_word, parse_table_entry,
};
use writeboost_engine::geometry::Geometry;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    // Geometry and the naming record from the first bytes.
    let seg = 64u64 << 10 << (data[0] % 7);
    let cache = seg * (4 + data[1] as u64);
    let backing = (u16::from_le_bytes([data[2], data[3]]) as u64 + 1) * 512;
    let Ok(geo) = Geometry::new(seg, cache, backing) else {
        return;
    };
    let layout = geo.checkpoint_layout();
    let record = SbRecord {
        seq: data[4] as u64,
        last_writeback_id: data[5] as u64 % 8,
        last_writeback_epoch: 1,
        durable_id: data[5] as u64 % 8,
        epoch: data[6] as u64,
        cache_uuid: [data[7]; 16],
        flags: RECORD_FLAG_CHECKPOINT,
    };
    let body = &data[8..];
    // A header as found, and one that matches, so the parsers past it run
    // whatever the header bytes were.
    let found = CheckpointHeader::parse(body, &geo, &record).ok();
    let header = found.unwrap_or(CheckpointHeader {
        seq: record.seq,
        epoch: record.epoch,
        cache_uuid: record.cache_uuid,
        nr_segments: geo.nr_segments,
        data_blocks: geo.data_blocks,
        pool_blocks: data[2] as u32 % (geo.data_blocks + 1),
        next_id: record.last_writeback_id + 1 + data[1] as u64 % geo.nr_segments,
        last_writeback_id: record.last_writeback_id,
        index_len: 0,
        nr_dirty: 0,
        body_crc: 0,
    });
    for (i, b) in body.chunks(CHECKPOINT_POSITION_LEN as usize).enumerate() {
        let _ = CheckpointPosition::parse(b, i as u64 % geo.nr_segments, &geo, &header);
    }
    for w in body.chunks_exact(8) {
        let w = u64::from_le_bytes(w.try_into().unwrap());
        let _ = parse_index_word(w, geo.backing_blocks());
    }
    for v in body.chunks_exact(4) {
        let v = u32::from_le_bytes(v.try_into().unwrap());
        let _ = parse_table_entry(v, layout.nr_slots);
    }
});
