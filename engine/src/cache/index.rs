//! The block index: which cache slot holds the newest cached copy of each
//! backing block, and how many of those copies are dirty.
//!
//! Memory is what limits how large a cache one host can serve, so the index
//! is two flat arrays sized by the cache, not a map entry per block:
//!
//! - `words`, one `u64` per cache slot (position × data blocks + slot): the
//!   backing block logged there (48 bits), and while the slot is the indexed
//!   copy, its valid and dirty sector masks; plus one bit per slot saying the
//!   log's metablock marked the block dirty;
//! - `table`, an open-addressed Robin Hood hash table of `u32`s, 9/8 of the
//!   slots, keyed by backing block: each entry is `slot + 1` in its low bits
//!   and its distance from its home bucket in the rest. The distance lets a
//!   lookup skip entries of other homes without reading their block, and a
//!   removal shift the cluster back instead of leaving tombstones.
//!
//! About 12.6 bytes per cache slot in all. The index keeps its dirty count
//! itself, at every change; the ring's per-log `live_dirty` counts follow
//! the [`Dirty`] transition each change reports.

use crate::format::{
    INDEX_DIRTY_SHIFT, INDEX_VALID_SHIFT, MAX_BACKING_BLOCKS, index_slot_bits, parse_index_word,
    parse_table_entry,
};

/// A slot of the cache device: ring position × data blocks per log + slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct CacheSlot(pub u32);

/// The indexed copy of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Cached {
    pub at: CacheSlot,
    /// Sectors the cache holds for this block.
    pub valid: u8,
    /// Sectors not yet on the backing device.
    pub dirty: u8,
    /// The log's metablock marks the block dirty, so recovery would replay it.
    pub logged_dirty: bool,
}

/// The index's arrays, as a checkpoint stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Part {
    /// One u64 per cache slot.
    Words,
    /// One u64 per 64 cache slots.
    Logged,
    /// One u32 per table entry.
    Table,
}

/// How a change moved an entry in or out of the dirty blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dirty {
    /// Dirty before and after, or clean before and after.
    Same,
    /// Clean (or absent) before, dirty now.
    Became,
    /// Dirty before, clean now.
    Cleaned,
}

const BLOCK_MASK: u64 = MAX_BACKING_BLOCKS - 1;
const VALID_SHIFT: u32 = INDEX_VALID_SHIFT;
const DIRTY_SHIFT: u32 = INDEX_DIRTY_SHIFT;
const _: () = assert!(MAX_BACKING_BLOCKS.trailing_zeros() == VALID_SHIFT);

#[derive(Debug, Default)]
pub(super) struct Index {
    /// Per cache slot: block | valid << 48 | dirty << 56.
    words: Vec<u64>,
    /// Per cache slot: the metablock marks it dirty.
    logged: Vec<u64>,
    table: Vec<u32>,
    /// Low bits of a table entry hold `slot + 1`; the rest the distance.
    slot_bits: u32,
    /// Largest distance a table entry can state; a farther entry states this
    /// and its real distance is computed from its block.
    max_dist: u32,
    /// Entries in the table.
    len: u64,
    /// Entries with a dirty sector.
    nr_dirty: u64,
}

use crate::format::INDEX_RUN as RUN;

/// Spreads runs of block numbers over the table (Stafford's mix 13).
fn hash(block: u64) -> u64 {
    let mut x = block;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Index {
    /// Empty arrays for a cache of `nr_slots` slots (fewer than 2^32 - 1:
    /// the geometry guarantees it). Pages are touched only as slots are used.
    pub fn install(&mut self, nr_slots: u64) {
        debug_assert!(nr_slots < u32::MAX as u64);
        let nr_slots = nr_slots.max(1);
        self.slot_bits = index_slot_bits(nr_slots);
        self.max_dist = if self.slot_bits >= 32 {
            0
        } else {
            (1u32 << (32 - self.slot_bits)) - 1
        };
        self.words = vec![0; nr_slots as usize];
        self.logged = vec![0; nr_slots.div_ceil(64) as usize];
        self.table = vec![0; crate::format::index_table_len(nr_slots) as usize];
        self.len = 0;
        self.nr_dirty = 0;
    }

    /// Cached blocks.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Cached blocks with a sector not yet on the backing device.
    pub fn nr_dirty(&self) -> u64 {
        self.nr_dirty
    }

    /// Bytes the index holds, allocated (resident only as pages are touched).
    pub fn bytes(&self) -> u64 {
        (self.words.len() * 8 + self.logged.len() * 8 + self.table.len() * 4) as u64
    }

    /// The backing block last logged at `at`, whether or not it is indexed there.
    pub fn block_at(&self, at: CacheSlot) -> u64 {
        self.words[at.0 as usize] & BLOCK_MASK
    }

    /// Notes the block a log holds at `at` without indexing it (a recovered
    /// clean block, still needed to find the log's live copies).
    pub fn log_block(&mut self, at: CacheSlot, block: u64) {
        debug_assert!(block < MAX_BACKING_BLOCKS);
        self.words[at.0 as usize] = block;
        self.set_logged(at, false);
    }

    pub fn get(&self, block: u64) -> Option<Cached> {
        let i = self.find(block)?;
        Some(self.copy_at(self.slot_of(self.table[i])))
    }

    pub fn contains(&self, block: u64) -> bool {
        self.find(block).is_some()
    }

    /// Whether `at` holds the indexed copy of the block logged there.
    pub fn is_current(&self, at: CacheSlot) -> Option<Cached> {
        self.get(self.block_at(at)).filter(|c| c.at == at)
    }

    /// Indexes `c` for `block` in place of whatever was there, which comes
    /// back (its dirtiness already taken out of the count).
    pub fn insert(&mut self, block: u64, c: Cached) -> Option<Cached> {
        debug_assert!(
            c.dirty & !c.valid == 0,
            "block {block}: dirty sectors not valid"
        );
        let old = match self.probe(block) {
            Ok(i) => {
                let old = self.copy_at(self.slot_of(self.table[i]));
                let d = self.dist_at(i);
                self.table[i] = self.entry(c.at, d);
                Some(old)
            }
            Err((i, d)) => {
                self.place(i, d, c.at);
                self.len += 1;
                None
            }
        };
        self.store(block, c);
        if old.is_some_and(|o| o.dirty != 0) {
            self.uncount(block);
        }
        if c.dirty != 0 {
            self.nr_dirty += 1;
        }
        self.check_count();
        old
    }

    /// Takes `block` out of the index.
    pub fn remove(&mut self, block: u64) -> Option<Cached> {
        let mut i = self.find(block)?;
        let old = self.copy_at(self.slot_of(self.table[i]));
        // Backward shift: each following entry away from home moves one closer.
        let cap = self.table.len();
        loop {
            let next = if i + 1 == cap { 0 } else { i + 1 };
            let d = if self.table[next] == 0 {
                0
            } else {
                self.dist_at(next)
            };
            if d == 0 {
                self.table[i] = 0;
                break;
            }
            self.table[i] = self.entry(self.slot_of(self.table[next]), d - 1);
            i = next;
        }
        self.len -= 1;
        if old.dirty != 0 {
            self.uncount(block);
        }
        self.check_count();
        Some(old)
    }

    /// Changes `block`'s copy if it is the one at `at` (a newer copy
    /// elsewhere is left alone); None if it is not.
    pub fn update_at(
        &mut self,
        block: u64,
        at: CacheSlot,
        f: impl FnOnce(&mut Cached),
    ) -> Option<Dirty> {
        let mut c = self.get(block).filter(|c| c.at == at)?;
        let was = c.dirty != 0;
        f(&mut c);
        debug_assert!(c.at == at, "block {block}: an update moved the entry");
        debug_assert!(
            c.dirty & !c.valid == 0,
            "block {block}: dirty sectors not valid"
        );
        self.store(block, c);
        let change = match (was, c.dirty != 0) {
            (false, true) => Dirty::Became,
            (true, false) => Dirty::Cleaned,
            _ => Dirty::Same,
        };
        match change {
            Dirty::Became => self.nr_dirty += 1,
            Dirty::Cleaned => self.uncount(block),
            Dirty::Same => {}
        }
        self.check_count();
        Some(change)
    }

    /// Loads the home buckets of `blocks` ahead of inserting them: the loads
    /// are independent, so the memory system serves them in parallel
    /// instead of one cache miss at a time inside each probe.
    pub fn warm(&self, blocks: impl Iterator<Item = u64>) {
        if self.table.is_empty() {
            return;
        }
        let (mut sum, mut last_run) = (0u32, u64::MAX);
        for b in blocks {
            // Blocks of one run share a cache line of buckets.
            if b / RUN != last_run {
                last_run = b / RUN;
                sum = sum.wrapping_add(self.table[self.home(b)]);
            }
        }
        std::hint::black_box(sum);
    }

    /// Every indexed block and its copy, in table order.
    #[cfg(feature = "test-hooks")]
    pub fn iter(&self) -> impl Iterator<Item = (u64, Cached)> + '_ {
        self.table.iter().filter(|&&v| v != 0).map(|&v| {
            let at = self.slot_of(v);
            (self.block_at(at), self.copy_at(at))
        })
    }

    /// Writes elements `first..` of `part` into `dst` as little-endian bytes.
    pub fn encode(&self, part: Part, first: usize, dst: &mut [u8]) {
        match part {
            Part::Words | Part::Logged => {
                let src = if part == Part::Words {
                    &self.words
                } else {
                    &self.logged
                };
                for (d, w) in dst.chunks_mut(8).zip(&src[first..]) {
                    d.copy_from_slice(&w.to_le_bytes());
                }
            }
            Part::Table => {
                for (d, v) in dst.chunks_mut(4).zip(&self.table[first..]) {
                    d.copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    }

    /// Sets elements `first..` of `part` from `src`, checking each: a word's
    /// block within the backing device and dirty sectors valid, a table
    /// entry naming a slot that exists. False (changing nothing further) at
    /// the first that is not. Runs of zeroes are skipped, so pages of
    /// unused slots are never touched.
    pub fn restore(&mut self, part: Part, first: usize, src: &[u8], backing_blocks: u64) -> bool {
        let nr_slots = self.words.len() as u64;
        let size = if part == Part::Table { 4 } else { 8 };
        if first + src.len() / size > self.len_of(part) {
            return false;
        }
        for (page, bytes) in src.chunks(4096).enumerate() {
            if bytes.iter().all(|&b| b == 0) {
                continue;
            }
            let at = first + page * 4096 / size;
            for (i, e) in bytes.chunks(size).enumerate() {
                match part {
                    Part::Words | Part::Logged => {
                        let w = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                        if part == Part::Words {
                            let Ok(w) = parse_index_word(w, backing_blocks) else {
                                return false;
                            };
                            self.words[at + i] = w;
                        } else {
                            self.logged[at + i] = w;
                        }
                    }
                    Part::Table => {
                        let v = u32::from_le_bytes(e.try_into().expect("4 bytes"));
                        let Ok(v) = parse_table_entry(v, nr_slots) else {
                            return false;
                        };
                        self.table[at + i] = v;
                    }
                }
            }
        }
        true
    }

    fn len_of(&self, part: Part) -> usize {
        match part {
            Part::Words => self.words.len(),
            Part::Logged => self.logged.len(),
            Part::Table => self.table.len(),
        }
    }

    /// Checks a restored table against the words it names and the counts
    /// a checkpoint recorded, calling `f` with each entry: every entry must
    /// be found by its own probe (so none is duplicated, misplaced or out of
    /// reach), a bucket must stay empty (so a probe for an absent block
    /// ends, and a placement finds room), and the counts must match. A CRC
    /// only proves the bytes are those written, not that the writer was right.
    pub fn verify_restored(
        &self,
        len: u64,
        nr_dirty: u64,
        mut f: impl FnMut(u64, Cached),
    ) -> Result<(), &'static str> {
        // First, as a probe of a full table would never end.
        let n = self.table.iter().filter(|&&v| v != 0).count() as u64;
        if n >= self.table.len() as u64 {
            return Err("a full index table");
        }
        let mut dirty = 0u64;
        for (i, &v) in self.table.iter().enumerate() {
            if v == 0 {
                continue;
            }
            let at = self.slot_of(v);
            let block = self.block_at(at);
            if self.find(block) != Some(i) {
                return Err("an index entry its own probe does not find");
            }
            let c = self.copy_at(at);
            if c.dirty & !c.valid != 0 {
                return Err("an index entry with dirty sectors not valid");
            }
            dirty += (c.dirty != 0) as u64;
            f(block, c);
        }
        if n != len || dirty != nr_dirty {
            return Err("index counts that do not match its entries");
        }
        Ok(())
    }

    /// The counts a checkpoint recorded with the arrays it restored.
    pub fn restore_counts(&mut self, len: u64, nr_dirty: u64) {
        self.len = len;
        self.nr_dirty = nr_dirty;
        self.check_count();
    }

    // ----- table ----------------------------------------------------------

    fn home(&self, block: u64) -> usize {
        let runs = self.table.len() as u64 / RUN;
        let run = ((hash(block / RUN) as u128 * runs as u128) >> 64) as u64;
        (run * RUN + block % RUN) as usize
    }

    fn slot_of(&self, v: u32) -> CacheSlot {
        CacheSlot((v & ((1u64 << self.slot_bits) - 1) as u32) - 1)
    }

    fn entry(&self, at: CacheSlot, dist: u32) -> u32 {
        let d = dist.min(self.max_dist);
        // With no distance bits (2^31 slots or more) the shift would overflow.
        let high = if self.slot_bits >= 32 {
            0
        } else {
            d << self.slot_bits
        };
        high | (at.0 + 1)
    }

    /// Distance of the entry at table index `i` from its home bucket.
    fn dist_at(&self, i: usize) -> u32 {
        let v = self.table[i];
        let stated = if self.slot_bits >= 32 {
            0
        } else {
            v >> self.slot_bits
        };
        if stated < self.max_dist {
            return stated;
        }
        let home = self.home(self.block_at(self.slot_of(v)));
        ((i + self.table.len() - home) % self.table.len()) as u32
    }

    fn find(&self, block: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        self.probe(block).ok()
    }

    /// The table index holding `block`, or where probing for it stopped:
    /// the index and distance at which it would be placed.
    fn probe(&self, block: u64) -> Result<usize, (usize, u32)> {
        let cap = self.table.len();
        let mut i = self.home(block);
        let mut d = 0u32;
        loop {
            let v = self.table[i];
            if v == 0 {
                return Err((i, d));
            }
            // An entry stating less than our distance sits nearer its home
            // than we would: Robin Hood placement puts no match past it.
            let stated = if self.slot_bits >= 32 {
                self.max_dist
            } else {
                v >> self.slot_bits
            };
            let di = if stated < self.max_dist || d >= self.max_dist {
                self.dist_at(i)
            } else {
                stated
            };
            if di < d {
                return Err((i, d));
            }
            if di == d && self.block_at(self.slot_of(v)) == block {
                return Ok(i);
            }
            i = if i + 1 == cap { 0 } else { i + 1 };
            d += 1;
        }
    }

    /// Places a block known to be absent at index `i`, distance `d`, where
    /// its probe stopped, displacing entries nearer their home than it is.
    fn place(&mut self, mut i: usize, mut d: u32, at: CacheSlot) {
        debug_assert!(self.len < self.table.len() as u64, "index table full");
        let cap = self.table.len();
        let mut at = at;
        // Words are stored after placement; the inserted block's distance is
        // tracked here, so nothing reads its word before then.
        loop {
            if self.table[i] == 0 {
                self.table[i] = self.entry(at, d);
                return;
            }
            let di = self.dist_at(i);
            if di < d {
                let v = self.table[i];
                self.table[i] = self.entry(at, d);
                at = self.slot_of(v);
                d = di;
            }
            i = if i + 1 == cap { 0 } else { i + 1 };
            d += 1;
        }
    }

    // ----- per-slot words -------------------------------------------------

    fn copy_at(&self, at: CacheSlot) -> Cached {
        let w = self.words[at.0 as usize];
        Cached {
            at,
            valid: (w >> VALID_SHIFT) as u8,
            dirty: (w >> DIRTY_SHIFT) as u8,
            logged_dirty: self.logged[at.0 as usize / 64] >> (at.0 % 64) & 1 != 0,
        }
    }

    fn store(&mut self, block: u64, c: Cached) {
        debug_assert!(block < MAX_BACKING_BLOCKS);
        self.words[c.at.0 as usize] =
            block | (c.valid as u64) << VALID_SHIFT | (c.dirty as u64) << DIRTY_SHIFT;
        self.set_logged(c.at, c.logged_dirty);
    }

    fn set_logged(&mut self, at: CacheSlot, on: bool) {
        let (w, bit) = (at.0 as usize / 64, 1u64 << (at.0 % 64));
        if on {
            self.logged[w] |= bit;
        } else {
            self.logged[w] &= !bit;
        }
    }

    fn uncount(&mut self, block: u64) {
        debug_assert!(self.nr_dirty > 0, "block {block}: dirty count below zero");
        self.nr_dirty -= 1;
    }

    fn check_count(&self) {
        debug_assert!(
            self.nr_dirty <= self.len,
            "{} dirty of {} cached blocks",
            self.nr_dirty,
            self.len
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn copy(at: u32, valid: u8, dirty: u8) -> Cached {
        Cached {
            at: CacheSlot(at),
            valid,
            dirty,
            logged_dirty: dirty != 0,
        }
    }

    fn index(nr_slots: u64) -> Index {
        let mut ix = Index::default();
        ix.install(nr_slots);
        ix
    }

    #[test]
    fn the_dirty_count_follows_every_change() {
        let mut ix = index(16);
        assert_eq!(ix.insert(7, copy(0, 0xff, 0xff)), None);
        assert_eq!(ix.insert(8, copy(1, 0xff, 0)), None);
        assert_eq!((ix.len(), ix.nr_dirty()), (2, 1));
        // Replacing a dirty copy with another dirty one: still one dirty block.
        let old = ix.insert(7, copy(5, 0xff, 0x0f)).unwrap();
        assert_eq!(old.at, CacheSlot(0));
        assert_eq!((ix.len(), ix.nr_dirty()), (2, 1));
        // Writeback of the old copy does not touch the new one.
        assert_eq!(ix.update_at(7, CacheSlot(0), |e| e.dirty = 0), None);
        assert_eq!(ix.nr_dirty(), 1);
        // Writeback of part of the new copy, then the rest.
        assert_eq!(
            ix.update_at(7, CacheSlot(5), |e| e.dirty &= !0x03),
            Some(Dirty::Same)
        );
        assert_eq!(
            ix.update_at(7, CacheSlot(5), |e| e.dirty = 0),
            Some(Dirty::Cleaned)
        );
        assert_eq!(ix.nr_dirty(), 0);
        assert_eq!(
            ix.update_at(8, CacheSlot(1), |e| e.dirty = 0x10),
            Some(Dirty::Became)
        );
        assert_eq!(ix.nr_dirty(), 1);
        assert_eq!(ix.remove(8).map(|e| e.dirty), Some(0x10));
        assert_eq!(ix.remove(8), None);
        assert_eq!((ix.len(), ix.nr_dirty()), (1, 0));
        // The old slot still names the block logged there.
        assert_eq!(ix.block_at(CacheSlot(0)), 7);
        assert_eq!(ix.is_current(CacheSlot(0)), None);
        assert_eq!(ix.is_current(CacheSlot(5)).map(|c| c.dirty), Some(0));
    }

    /// Random inserts, moves and removals at full load agree with a map, for
    /// a table whose entries state their distance and ones that state at most
    /// 1 or nothing (as in caches of 2^30 slots and more), whose distances
    /// are computed from the block.
    #[test]
    fn agrees_with_a_map_under_churn() {
        for max_dist in [None, Some(1), Some(0)] {
            let mut ix = index(1000);
            if let Some(m) = max_dist {
                ix.max_dist = m;
            }
            let used = 1000u32;
            // A seeded sequence (the index's own mixer over a counter).
            let mut n = max_dist.unwrap_or(9) as u64;
            let mut next = |below: u64| {
                n += 1;
                hash(n) % below
            };
            let mut model: HashMap<u64, u32> = HashMap::new();
            let mut owner: HashMap<u32, u64> = HashMap::new();
            for step in 0..40_000 {
                let block = next(3000) * 977 + (step % 3);
                let at = next(used as u64) as u32;
                if next(10) < 3 {
                    assert_eq!(ix.remove(block).map(|c| c.at.0), model.remove(&block));
                    if let Some(at) = model.get(&block) {
                        owner.remove(at);
                    }
                    continue;
                }
                // A slot holds one indexed block: evict whoever has it.
                if let Some(b) = owner.remove(&at) {
                    model.remove(&b);
                    ix.remove(b);
                }
                if let Some(old) = model.insert(block, at) {
                    owner.remove(&old);
                }
                owner.insert(at, block);
                ix.insert(block, copy(at, 0xff, (step % 2) as u8));
                assert_eq!(ix.len(), model.len() as u64);
            }
            for (&b, &at) in &model {
                assert_eq!(ix.get(b).map(|c| c.at.0), Some(at), "block {b}");
            }
            assert_eq!(ix.get(5), model.get(&5).map(|&a| ix.copy_at(CacheSlot(a))));
        }
    }
}
