//! Segment header, metablock and whole-log parsing must reject any input
//! without panicking, whatever geometry the cache has.
#![no_main]
use libfuzzer_sys::fuzz_target;
use writeboost_engine::format::{
    parse_metablocks, verify_blocks, verify_segment, verify_segment_header,
};
use writeboost_engine::geometry::Geometry;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    // Geometry from the first bytes, within what the format allows.
    let seg = 64u64 << 10 << (data[0] % 7);
    let backing = (u16::from_le_bytes([data[1], data[2]]) as u64 + 1) * 512;
    let Ok(geo) = Geometry::new(seg, seg * 4, backing) else { return };
    let uuid = [data[3]; 16];
    let body = &data[4..];
    let _ = verify_segment_header(body, &geo, &uuid);
    if let Ok(mbs) = parse_metablocks(body, &geo, data[0] as u32) {
        let _ = verify_blocks(body, &mbs);
    }
    let _ = verify_segment(body, &geo, &uuid);
});
