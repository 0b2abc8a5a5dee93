//! A simulated block device with a volatile write cache.
//!
//! Reads see every completed write. A write is durable only after a flush
//! issued after it completed. A crash keeps the durable image plus, per
//! 512-byte sector, a random choice of what was still volatile or in flight.

use std::collections::BTreeMap;

use rand::Rng;

const SECTOR: usize = 512;

/// Versions of one sector as (write generation, contents), oldest first.
type Versions = Vec<(u64, Box<[u8]>)>;

pub struct SimDevice {
    /// What reads return.
    visible: Vec<u8>,
    /// What survives a crash for sure.
    durable: Vec<u8>,
    /// Sectors written but not yet flushed: every version since the last
    /// flush that covered them, with its write generation, oldest first.
    volatile: BTreeMap<u64, Versions>,
    generation: u64,
    /// When false, the device stores nothing (benchmarks of the engine alone).
    store: bool,
}

impl SimDevice {
    pub fn new(size: u64) -> Self {
        Self::from_image(vec![0; size as usize])
    }

    /// A device that accepts every command and keeps no data.
    pub fn null(size: u64) -> Self {
        let mut d = Self::from_image(Vec::new());
        d.store = false;
        d.visible = Vec::with_capacity(0);
        let _ = size;
        d
    }

    /// A device whose durable and visible contents are `image` (after a crash).
    pub fn from_image(image: Vec<u8>) -> Self {
        Self {
            visible: image.clone(),
            durable: image,
            volatile: BTreeMap::new(),
            generation: 0,
            store: true,
        }
    }

    /// Current contents (what reads return).
    pub fn image(&self) -> &[u8] {
        &self.visible
    }

    pub fn size(&self) -> u64 {
        self.visible.len() as u64
    }

    pub fn read(&self, offset: u64, dst: &mut [u8]) {
        if self.store {
            dst.copy_from_slice(&self.visible[offset as usize..offset as usize + dst.len()]);
        }
    }

    /// Applies a completed write (volatile until flushed).
    pub fn write(&mut self, offset: u64, src: &[u8]) {
        if !self.store {
            return;
        }
        self.visible[offset as usize..offset as usize + src.len()].copy_from_slice(src);
        self.generation += 1;
        for s in offset / SECTOR as u64..(offset + src.len() as u64).div_ceil(SECTOR as u64) {
            let a = s as usize * SECTOR;
            let v = self.visible[a..a + SECTOR].to_vec().into_boxed_slice();
            self.volatile
                .entry(s)
                .or_default()
                .push((self.generation, v));
        }
    }

    /// Applies only some sectors of a write (a failed or torn write).
    pub fn write_some(&mut self, offset: u64, src: &[u8], rng: &mut impl Rng) {
        for (i, chunk) in src.chunks(SECTOR).enumerate() {
            if rng.random_bool(0.5) {
                self.write(offset + (i * SECTOR) as u64, chunk);
            }
        }
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64) {
        if self.store {
            self.write(offset, &vec![0; len as usize]);
        }
    }

    /// Generation a flush issued now covers.
    pub fn flush_point(&self) -> u64 {
        self.generation
    }

    /// A flush issued at `point` completed: those writes are durable.
    pub fn flush(&mut self, point: u64) {
        self.volatile.retain(|&s, versions| {
            let covered = versions.iter().take_while(|(g, _)| *g <= point).count();
            if covered > 0 {
                let a = s as usize * SECTOR;
                self.durable[a..a + SECTOR].copy_from_slice(&versions[covered - 1].1);
                versions.drain(..covered);
            }
            !versions.is_empty()
        });
    }

    /// The image after a power loss: durable data plus a random subset of the
    /// volatile sectors and of the sectors of `in_flight` writes.
    pub fn crash(mut self, in_flight: &[(u64, Vec<u8>)], rng: &mut impl Rng) -> Vec<u8> {
        // A volatile cache may have written back any one of the versions, or none.
        for (&s, versions) in &self.volatile {
            let pick = rng.random_range(0..=versions.len());
            if pick > 0 {
                let a = s as usize * SECTOR;
                self.durable[a..a + SECTOR].copy_from_slice(&versions[pick - 1].1);
            }
        }
        for (offset, data) in in_flight {
            for (i, chunk) in data.chunks(SECTOR).enumerate() {
                if rng.random_bool(0.5) {
                    let a = *offset as usize + i * SECTOR;
                    self.durable[a..a + chunk.len()].copy_from_slice(chunk);
                }
            }
        }
        self.durable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn only_flushed_writes_survive_for_sure() {
        let mut d = SimDevice::new(8192);
        d.write(0, &[1; 512]);
        let p = d.flush_point();
        d.write(512, &[2; 512]);
        d.flush(p);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut kept_second = false;
        for _ in 0..20 {
            let mut d2 = SimDevice::from_image(d.durable.clone());
            d2.visible = d.visible.clone();
            d2.volatile = d.volatile.clone();
            let img = d2.crash(&[], &mut rng);
            assert_eq!(img[0], 1);
            kept_second |= img[512] == 2;
        }
        assert!(kept_second, "volatile data is sometimes kept");
    }
}
