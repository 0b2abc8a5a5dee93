//! A simulated block device with a volatile write cache.
//!
//! Reads see every completed write. A write is durable only after a flush
//! issued after it completed. A crash keeps the durable image plus some of
//! what was still volatile or in flight, chosen by a [`CrashOutcome`]: per
//! 512-byte sector, or whole writes in any order.

use std::collections::BTreeMap;

use rand::Rng;

const SECTOR: usize = 512;

/// What a power loss keeps of the writes a device had not made durable.
/// Real devices produce each: a volatile cache may write back sectors one by
/// one, or whole writes in whatever order it holds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CrashOutcome {
    /// Each 512-byte sector keeps any one of its unflushed versions, or none;
    /// each sector of a write in flight lands or not.
    TornSectors,
    /// Each unflushed or in-flight write survives whole or vanishes, each on
    /// its own: a later write may survive an earlier one that is lost.
    WholeWrites,
    /// The writes after a random point survive whole and every earlier one
    /// is lost: a cache that wrote back newest first.
    NewestFirst,
}

impl CrashOutcome {
    pub const ALL: [CrashOutcome; 3] = [
        CrashOutcome::TornSectors,
        CrashOutcome::WholeWrites,
        CrashOutcome::NewestFirst,
    ];

    /// One outcome, chosen by the seed's randomness.
    pub fn pick(rng: &mut impl Rng) -> Self {
        Self::ALL[rng.random_range(0..Self::ALL.len())]
    }
}

pub struct SimDevice {
    /// What reads return.
    visible: Vec<u8>,
    /// What survives a crash for sure.
    durable: Vec<u8>,
    /// Writes not yet covered by a flush, as (generation, offset, data),
    /// oldest first. A sector's unflushed versions are those of the writes
    /// covering it, in this order.
    unflushed: Vec<(u64, u64, Box<[u8]>)>,
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
            unflushed: Vec::new(),
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
        debug_assert!(
            offset.is_multiple_of(SECTOR as u64) && src.len().is_multiple_of(SECTOR),
            "device writes are whole sectors"
        );
        self.generation += 1;
        self.unflushed
            .push((self.generation, offset, src.to_vec().into_boxed_slice()));
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
        let durable = &mut self.durable;
        self.unflushed.retain(|(g, offset, data)| {
            if *g > point {
                return true;
            }
            let a = *offset as usize;
            durable[a..a + data.len()].copy_from_slice(data);
            false
        });
    }

    /// A flush issued at `point` failed: the device dropped the writes it
    /// covered from its volatile cache without storing them (as Linux drops
    /// dirty pages after an fsync error). Reads still return them until a
    /// crash; no later flush makes them durable.
    pub fn fail_flush(&mut self, point: u64) {
        self.unflushed.retain(|(g, _, _)| *g > point);
    }

    /// The image after a power loss with per-sector tearing
    /// ([`CrashOutcome::TornSectors`]).
    pub fn crash(self, in_flight: &[(u64, Vec<u8>)], rng: &mut impl Rng) -> Vec<u8> {
        self.crash_as(CrashOutcome::TornSectors, in_flight, rng)
    }

    /// The image after a power loss: durable data plus what `outcome`
    /// keeps of the unflushed writes and of the `in_flight` ones.
    pub fn crash_as(
        mut self,
        outcome: CrashOutcome,
        in_flight: &[(u64, Vec<u8>)],
        rng: &mut impl Rng,
    ) -> Vec<u8> {
        match outcome {
            CrashOutcome::TornSectors => {
                // A volatile cache may have written back any one of a
                // sector's unflushed versions, or none.
                let mut versions: BTreeMap<usize, Vec<&[u8]>> = BTreeMap::new();
                for (_, offset, data) in &self.unflushed {
                    for (i, v) in data.chunks(SECTOR).enumerate() {
                        versions
                            .entry(*offset as usize / SECTOR + i)
                            .or_default()
                            .push(v);
                    }
                }
                for (s, versions) in versions {
                    let pick = rng.random_range(0..=versions.len());
                    if pick > 0 {
                        let a = s * SECTOR;
                        self.durable[a..a + SECTOR].copy_from_slice(versions[pick - 1]);
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
            }
            CrashOutcome::WholeWrites | CrashOutcome::NewestFirst => {
                // Oldest first, the writes in flight last (they are the newest).
                let writes: Vec<(u64, &[u8])> = self
                    .unflushed
                    .iter()
                    .map(|(_, o, d)| (*o, &d[..]))
                    .chain(in_flight.iter().map(|(o, d)| (*o, &d[..])))
                    .collect();
                let cut = rng.random_range(0..=writes.len());
                let mut image = std::mem::take(&mut self.durable);
                for (i, (offset, data)) in writes.into_iter().enumerate() {
                    let keep = match outcome {
                        CrashOutcome::NewestFirst => i >= cut,
                        _ => rng.random_bool(0.5),
                    };
                    if keep {
                        let a = offset as usize;
                        image[a..a + data.len()].copy_from_slice(data);
                    }
                }
                return image;
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
            d2.unflushed = d.unflushed.clone();
            let img = d2.crash(&[], &mut rng);
            assert_eq!(img[0], 1);
            kept_second |= img[512] == 2;
        }
        assert!(kept_second, "volatile data is sometimes kept");
    }

    #[test]
    fn a_failed_flush_loses_what_it_covered_for_good() {
        let mut d = SimDevice::new(4096);
        d.write(0, &[1; 512]);
        d.fail_flush(d.flush_point());
        d.write(512, &[2; 512]);
        // A later flush succeeds, yet the first write is not among what it stores.
        d.flush(d.flush_point());
        assert_eq!(d.image()[0], 1, "reads still see it");
        let img = d.crash(&[], &mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
        assert_eq!((img[0], img[512]), (0, 2));
    }

    /// Two unflushed writes, then a crash: which combinations each outcome produces.
    fn outcomes(outcome: CrashOutcome) -> std::collections::HashSet<(u8, u8)> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        (0..200)
            .map(|_| {
                let mut d = SimDevice::new(4096);
                d.write(0, &[1; 1024]);
                d.write(2048, &[2; 1024]);
                let img = d.crash_as(outcome, &[], &mut rng);
                // Whole writes never tear.
                assert!(
                    img[..1024].iter().all(|&b| b == img[0]),
                    "{outcome:?} tore a write"
                );
                (img[0], img[2048])
            })
            .collect()
    }

    #[test]
    fn whole_writes_survive_in_any_order() {
        let all: std::collections::HashSet<(u8, u8)> =
            [(0, 0), (1, 0), (0, 2), (1, 2)].into_iter().collect();
        assert_eq!(outcomes(CrashOutcome::WholeWrites), all);
        // Newest first: the later write may survive alone, the earlier never does.
        let newest: std::collections::HashSet<(u8, u8)> =
            [(0, 0), (0, 2), (1, 2)].into_iter().collect();
        assert_eq!(outcomes(CrashOutcome::NewestFirst), newest);
    }

    #[test]
    fn a_flushed_write_survives_every_outcome() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for outcome in CrashOutcome::ALL {
            let mut d = SimDevice::new(4096);
            d.write(0, &[5; 512]);
            let p = d.flush_point();
            d.flush(p);
            d.write(512, &[6; 512]);
            let img = d.crash_as(outcome, &[(1024, vec![7; 512])], &mut rng);
            assert_eq!(img[0], 5, "{outcome:?}");
        }
    }
}
