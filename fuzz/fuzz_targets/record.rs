//! The superblock-record parser must reject any input without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;
use writeboost_engine::format::SbRecord;

fuzz_target!(|data: &[u8]| {
    let uuid: [u8; 16] = data.get(..16).and_then(|b| b.try_into().ok()).unwrap_or([0; 16]);
    let _ = SbRecord::parse(data.get(16..).unwrap_or(&[]), &uuid);
    let _ = SbRecord::parse(data, &uuid);
});
