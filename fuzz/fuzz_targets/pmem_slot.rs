//! Pool header, slot header and slot entry parsing must reject any input
//! without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;
use writeboost_engine::geometry::Geometry;
use writeboost_engine::pmem::{PoolHeader, parse_entry, parse_slot_header};

fuzz_target!(|data: &[u8]| {
    let _ = PoolHeader::parse(data);
    let _ = parse_slot_header(data);
    if data.len() < 40 {
        return;
    }
    let Ok(geo) = Geometry::new(1 << 20, 4 << 20, 1 << 30) else { return };
    let id = u64::from_le_bytes(data[32..40].try_into().unwrap());
    let _ = parse_entry(&data[..32], id, &data[40..], &geo);
});
