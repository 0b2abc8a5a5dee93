//! Self-describing sector contents: each written sector carries the id of the
//! write and its own address, so a read tells exactly which version it got,
//! or that it got garbage.

pub const SECTOR: usize = 512;

/// Fills `buf` (sector multiple) with write `write_id`'s data for sectors from `first_sector`.
pub fn fill(buf: &mut [u8], write_id: u64, first_sector: u64) {
    for (i, s) in buf.chunks_mut(SECTOR).enumerate() {
        let lba = first_sector + i as u64;
        s[..8].copy_from_slice(&write_id.to_le_bytes());
        s[8..16].copy_from_slice(&lba.to_le_bytes());
        let mut x = write_id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ lba.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
            | 1;
        for c in s[16..].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
    }
}

/// What a sector holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Zero,
    Write(u64),
    Garbage,
}

pub fn decode(sector: &[u8], lba: u64) -> Version {
    if sector.iter().all(|&b| b == 0) {
        return Version::Zero;
    }
    let id = u64::from_le_bytes(sector[..8].try_into().expect("8 bytes"));
    let mut expect = [0u8; SECTOR];
    fill(&mut expect, id, lba);
    if expect[..] == sector[..SECTOR] {
        Version::Write(id)
    } else {
        Version::Garbage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_round_trip_and_misplaced_data_is_garbage() {
        let mut b = vec![0u8; 1024];
        fill(&mut b, 7, 100);
        assert_eq!(decode(&b[..512], 100), Version::Write(7));
        assert_eq!(decode(&b[512..], 101), Version::Write(7));
        assert_eq!(decode(&b[512..], 100), Version::Garbage);
        assert_eq!(decode(&[0; 512], 3), Version::Zero);
        b[700] ^= 1;
        assert_eq!(decode(&b[512..], 101), Version::Garbage);
    }
}
