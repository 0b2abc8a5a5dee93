//! The superblock-record parser must reject any input without panicking,
//! and the quarantine list of a record it accepts must be in order.
#![no_main]
use libfuzzer_sys::fuzz_target;
use writeboost_engine::format::{MAX_QUARANTINE, SbRecord};

fuzz_target!(|data: &[u8]| {
    let uuid: [u8; 16] = data.get(..16).and_then(|b| b.try_into().ok()).unwrap_or([0; 16]);
    let _ = SbRecord::parse(data.get(16..).unwrap_or(&[]), &uuid);
    let _ = SbRecord::parse(data, &uuid);
    // The same bytes as a version 4 record whose checksum matches, so the
    // fields and the list behind it are reached.
    let mut b = [0u8; 4096];
    let n = data.len().min(4092);
    b[..n].copy_from_slice(&data[..n]);
    b[..8].copy_from_slice(b"WBOOSTRC");
    b[8..12].copy_from_slice(&4u32.to_le_bytes());
    let crc = crc32c::crc32c(&b[..4092]);
    b[4092..].copy_from_slice(&crc.to_le_bytes());
    let own: [u8; 16] = b[40..56].try_into().expect("16 bytes");
    if SbRecord::parse(&b, &own).is_ok() {
        let list = SbRecord::parse_quarantine(&b);
        assert!(list.len() <= MAX_QUARANTINE && list.windows(2).all(|w| w[0] < w[1]));
    }
});
