//! The block index: which log and slot hold the newest cached copy of each
//! backing block, and how many of those copies are dirty. The index keeps
//! that count itself, at every change, so it cannot drift from the entries;
//! the ring's per-log `live_dirty` counts follow the [`Dirty`] transition
//! each change reports.

use crate::ids::LogId;
use rustc_hash::FxHashMap;

/// Where the newest copy of a cached block lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    /// Log id holding the block.
    pub id: LogId,
    /// Data slot within that log.
    pub slot: u32,
    /// Sectors the cache holds for this block.
    pub valid: u8,
    /// Sectors not yet on the backing device.
    pub dirty: u8,
    /// The log's metablock marks the block dirty, so recovery would replay it.
    pub logged_dirty: bool,
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

#[derive(Debug, Default)]
pub(super) struct Index {
    map: FxHashMap<u64, Entry>,
    /// Entries with a dirty sector.
    nr_dirty: u64,
}

impl Index {
    pub fn get(&self, block: &u64) -> Option<&Entry> {
        self.map.get(block)
    }

    pub fn contains_key(&self, block: &u64) -> bool {
        self.map.contains_key(block)
    }

    /// Cached blocks.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Cached blocks with a sector not yet on the backing device.
    pub fn nr_dirty(&self) -> u64 {
        self.nr_dirty
    }

    #[cfg(feature = "test-hooks")]
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Entry)> {
        self.map.iter().map(|(&b, e)| (b, e))
    }

    /// Indexes `e` for `block` in place of whatever was there, which comes
    /// back (its dirtiness already taken out of the count).
    pub fn insert(&mut self, block: u64, e: Entry) -> Option<Entry> {
        debug_assert!(
            e.dirty & !e.valid == 0,
            "block {block}: dirty sectors not valid"
        );
        let old = self.map.insert(block, e);
        if old.is_some_and(|o| o.dirty != 0) {
            self.uncount(block);
        }
        if e.dirty != 0 {
            self.nr_dirty += 1;
        }
        self.check_count();
        old
    }

    /// Takes `block` out of the index.
    pub fn remove(&mut self, block: &u64) -> Option<Entry> {
        let old = self.map.remove(block);
        if old.is_some_and(|o| o.dirty != 0) {
            self.uncount(*block);
        }
        self.check_count();
        old
    }

    /// Changes `block`'s entry if it is the copy in log `id`, slot `slot`
    /// (a newer copy elsewhere is left alone); None if it is not.
    pub fn update_copy(
        &mut self,
        block: u64,
        id: LogId,
        slot: u32,
        f: impl FnOnce(&mut Entry),
    ) -> Option<Dirty> {
        let e = self
            .map
            .get_mut(&block)
            .filter(|e| e.id == id && e.slot == slot)?;
        let was = e.dirty != 0;
        f(e);
        debug_assert!(
            (e.id, e.slot) == (id, slot),
            "block {block}: an update moved the entry"
        );
        debug_assert!(
            e.dirty & !e.valid == 0,
            "block {block}: dirty sectors not valid"
        );
        let change = match (was, e.dirty != 0) {
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

    fn uncount(&mut self, block: u64) {
        debug_assert!(self.nr_dirty > 0, "block {block}: dirty count below zero");
        self.nr_dirty -= 1;
    }

    fn check_count(&self) {
        debug_assert!(
            self.nr_dirty <= self.map.len() as u64,
            "{} dirty of {} cached blocks",
            self.nr_dirty,
            self.map.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: LogId, slot: u32, valid: u8, dirty: u8) -> Entry {
        Entry {
            id,
            slot,
            valid,
            dirty,
            logged_dirty: dirty != 0,
        }
    }

    #[test]
    fn the_dirty_count_follows_every_change() {
        let mut ix = Index::default();
        assert_eq!(ix.insert(7, entry(LogId(1), 0, 0xff, 0xff)), None);
        assert_eq!(ix.insert(8, entry(LogId(1), 1, 0xff, 0)), None);
        assert_eq!((ix.len(), ix.nr_dirty()), (2, 1));
        // Replacing a dirty copy with another dirty one: still one dirty block.
        let old = ix.insert(7, entry(LogId(2), 0, 0xff, 0x0f)).unwrap();
        assert_eq!(old.id, LogId(1));
        assert_eq!((ix.len(), ix.nr_dirty()), (2, 1));
        // Writeback of the old copy does not touch the new one.
        assert_eq!(ix.update_copy(7, LogId(1), 0, |e| e.dirty = 0), None);
        assert_eq!(ix.nr_dirty(), 1);
        // Writeback of part of the new copy, then the rest.
        assert_eq!(
            ix.update_copy(7, LogId(2), 0, |e| e.dirty &= !0x03),
            Some(Dirty::Same)
        );
        assert_eq!(
            ix.update_copy(7, LogId(2), 0, |e| e.dirty = 0),
            Some(Dirty::Cleaned)
        );
        assert_eq!(ix.nr_dirty(), 0);
        assert_eq!(
            ix.update_copy(8, LogId(1), 1, |e| e.dirty = 0x10),
            Some(Dirty::Became)
        );
        assert_eq!(ix.nr_dirty(), 1);
        assert_eq!(ix.remove(&8).map(|e| e.dirty), Some(0x10));
        assert_eq!(ix.remove(&8), None);
        assert_eq!((ix.len(), ix.nr_dirty()), (1, 0));
    }
}
