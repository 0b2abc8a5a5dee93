//! The superblock parser must reject any input without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;
use writeboost_engine::format::Superblock;

fuzz_target!(|data: &[u8]| {
    let size = data.get(..8).map_or(1 << 30, |b| u64::from_le_bytes(b.try_into().unwrap()));
    let _ = Superblock::parse(data, size);
});
