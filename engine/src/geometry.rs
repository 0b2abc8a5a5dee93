//! Sizes and address arithmetic of the cache device layout.
//!
//! The cache device is cut into segment-sized regions. Region 0 holds the
//! superblock and the two superblock-record slots; regions 1..=nr_segments
//! hold logs; the regions after them hold the checkpoint a clean shutdown
//! writes (about 0.3 % of the cache). A log with id `k` always lives in
//! region `1 + (k - 1) % nr_segments`, so an id alone tells where to look
//! (recovery never searches).

use crate::error::FormatError;
use crate::format::CheckpointLayout;
use crate::ids::LogId;

/// Smallest unit of a partial write.
pub const SECTOR_SIZE: u64 = 512;
/// Cache line and metadata block size.
pub const BLOCK_SIZE: u64 = 4096;
/// Sectors per cache line; the per-block dirty/valid masks are one bit per sector.
pub const SECTORS_PER_BLOCK: u64 = BLOCK_SIZE / SECTOR_SIZE;
/// Mask with every sector of a block set.
pub const FULL_MASK: u8 = 0xff;

/// Smallest and largest segment the format allows.
pub const MIN_SEGMENT_SIZE: u64 = 64 * 1024;
pub const MAX_SEGMENT_SIZE: u64 = 4 * 1024 * 1024;
/// Default segment size: one 4 KiB header and 255 data blocks.
pub const DEFAULT_SEGMENT_SIZE: u64 = 1024 * 1024;

/// Fixed part of a segment header before the metablock array.
pub const SEGMENT_HEADER_FIXED: usize = 64;
/// Size of one metablock entry in a segment header.
pub const METABLOCK_SIZE: usize = 12;

/// Derived layout of a formatted cache device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per segment (header blocks + data blocks).
    pub segment_size: u64,
    /// 4 KiB blocks at the start of each segment that hold the header.
    pub header_blocks: u32,
    /// Data blocks per segment.
    pub data_blocks: u32,
    /// Number of log segments (region 0 is reserved for the superblock).
    pub nr_segments: u64,
    /// Size of the backing device in bytes.
    pub backing_size: u64,
}

impl Geometry {
    /// Computes the layout for a cache of `cache_size` bytes in front of a
    /// backing device of `backing_size` bytes.
    pub fn new(segment_size: u64, cache_size: u64, backing_size: u64) -> Result<Self, FormatError> {
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&segment_size)
            || !segment_size.is_power_of_two()
        {
            return Err(FormatError::BadSegmentSize { segment_size });
        }
        if backing_size == 0 || !backing_size.is_multiple_of(SECTOR_SIZE) {
            return Err(FormatError::BadBackingSize { backing_size });
        }
        let max = crate::format::MAX_BACKING_BLOCKS * BLOCK_SIZE;
        if backing_size > max {
            return Err(FormatError::BackingTooLarge { backing_size, max });
        }
        let (header_blocks, data_blocks) = Self::split(segment_size);
        let regions = cache_size / segment_size;
        // The checkpoint's regions, sized for every region holding a log
        // (a little more than the logs left over need).
        let checkpoint = CheckpointLayout::new(regions.saturating_sub(1), data_blocks)
            .len
            .div_ceil(segment_size);
        // One region for the superblock, the checkpoint and at least two for
        // logs: one open, one being written back.
        if regions < 3 + checkpoint {
            return Err(FormatError::CacheTooSmall {
                cache_size,
                needed: (3 + checkpoint.max(1)) * segment_size,
            });
        }
        let nr_segments = regions - 1 - checkpoint;
        // The index names a cache slot with a u32 (and 0 for none).
        let max_slots = u32::MAX as u64 - 1;
        if nr_segments * data_blocks as u64 > max_slots {
            return Err(FormatError::CacheTooLarge {
                cache_size,
                max_slots,
                max_bytes: (max_slots / data_blocks as u64 + 1) * segment_size,
            });
        }
        Ok(Self {
            segment_size,
            header_blocks,
            data_blocks,
            nr_segments,
            backing_size,
        })
    }

    /// Smallest header that holds a metablock for every remaining block.
    fn split(segment_size: u64) -> (u32, u32) {
        let total = (segment_size / BLOCK_SIZE) as u32;
        let mut header = 1u32;
        while SEGMENT_HEADER_FIXED + (total - header) as usize * METABLOCK_SIZE
            > header as usize * BLOCK_SIZE as usize
        {
            header += 1;
        }
        (header, total - header)
    }

    /// Bytes in a segment header.
    pub fn header_len(&self) -> usize {
        self.header_blocks as usize * BLOCK_SIZE as usize
    }

    /// Byte offset on the cache device of the segment holding log `id` (ids start at 1).
    pub fn segment_offset(&self, id: LogId) -> u64 {
        (1 + self.position(id)) * self.segment_size
    }

    /// Ring position (0-based) of log `id`.
    pub fn position(&self, id: LogId) -> u64 {
        (id.get() - 1) % self.nr_segments
    }

    /// Byte offset on the cache device of data slot `slot` of log `id`.
    pub fn slot_offset(&self, id: LogId, slot: u32) -> u64 {
        self.segment_offset(id) + self.header_len() as u64 + slot as u64 * BLOCK_SIZE
    }

    /// Where the checkpoint's sections lie.
    pub fn checkpoint_layout(&self) -> CheckpointLayout {
        CheckpointLayout::new(self.nr_segments, self.data_blocks)
    }

    /// Byte offset on the cache device of the checkpoint region.
    pub fn checkpoint_offset(&self) -> u64 {
        (1 + self.nr_segments) * self.segment_size
    }

    /// Number of 4 KiB blocks on the backing device (a trailing partial block counts).
    pub fn backing_blocks(&self) -> u64 {
        self.backing_size.div_ceil(BLOCK_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_segment_has_one_header_block_and_255_data_blocks() {
        let g = Geometry::new(DEFAULT_SEGMENT_SIZE, 64 << 20, 1 << 30).unwrap();
        assert_eq!((g.header_blocks, g.data_blocks), (1, 255));
        // Region 0, 62 logs, and one region for the checkpoint.
        assert_eq!(g.nr_segments, 62);
        assert!(g.checkpoint_offset() + g.checkpoint_layout().len <= 64 << 20);
    }

    #[test]
    fn largest_segment_needs_a_larger_header() {
        let g = Geometry::new(MAX_SEGMENT_SIZE, 64 << 20, 1 << 30).unwrap();
        assert_eq!((g.header_blocks, g.data_blocks), (4, 1020));
        let g = Geometry::new(MIN_SEGMENT_SIZE, 64 << 20, 1 << 30).unwrap();
        assert_eq!((g.header_blocks, g.data_blocks), (1, 15));
    }

    #[test]
    fn rejects_tiny_caches_and_odd_segments() {
        assert!(matches!(
            Geometry::new(DEFAULT_SEGMENT_SIZE, 3 << 20, 1 << 30),
            Err(FormatError::CacheTooSmall { .. })
        ));
        assert!(Geometry::new(3 << 16, 64 << 20, 1 << 30).is_err());
        assert!(Geometry::new(32 << 10, 64 << 20, 1 << 30).is_err());
        assert!(Geometry::new(DEFAULT_SEGMENT_SIZE, 64 << 20, 1000).is_err());
    }

    #[test]
    fn rejects_caches_with_more_slots_than_the_index_addresses() {
        let e = Geometry::new(DEFAULT_SEGMENT_SIZE, 20 << 40, 1 << 40).unwrap_err();
        let FormatError::CacheTooLarge { max_bytes, .. } = e else {
            panic!("{e:?}");
        };
        assert!(Geometry::new(DEFAULT_SEGMENT_SIZE, max_bytes, 1 << 40).is_ok());
        // A 4 TiB cache fits.
        assert!(Geometry::new(DEFAULT_SEGMENT_SIZE, 4 << 40, 1 << 40).is_ok());
    }

    #[test]
    fn ids_map_onto_a_ring_after_the_superblock_region() {
        let g = Geometry::new(DEFAULT_SEGMENT_SIZE, 5 << 20, 1 << 30).unwrap();
        assert_eq!(g.nr_segments, 3);
        assert_eq!(g.segment_offset(LogId(1)), 1 << 20);
        assert_eq!(g.segment_offset(LogId(3)), 3 << 20);
        assert_eq!(g.segment_offset(LogId(4)), 1 << 20);
        assert_eq!(g.checkpoint_offset(), 4 << 20);
        assert_eq!(g.slot_offset(LogId(1), 2), (1 << 20) + 4096 + 2 * 4096);
    }
}
