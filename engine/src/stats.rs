//! Counters and status snapshots.

/// Counters since start or the last `clear_stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// dm-writeboost's 16 counters, per 4 KiB piece of a user request, indexed
    /// `[write][hit][on_buffer][full_size]` (each 0 or 1).
    pub io: [[[[u64; 2]; 2]; 2]; 2],
    /// Logs written before their buffer was full (FUA/FLUSH, sync, shutdown).
    pub nr_partial_flushed: u64,
    /// Logs written in total.
    pub nr_logs: u64,
    /// Start-ups that loaded a clean shutdown's checkpoint, and that found
    /// one named but unusable (and replayed the logs instead).
    pub checkpoints_loaded: u64,
    pub checkpoints_rejected: u64,
    /// Cached copies the scrub found damaged (corrupt at rest).
    pub corrupt_blocks_found: u64,
    pub user_write_cmds: u64,
    pub user_write_bytes: u64,
    pub user_read_cmds: u64,
    pub user_read_bytes: u64,
    pub user_flush_cmds: u64,
    pub cache_write_cmds: u64,
    pub cache_write_bytes: u64,
    pub cache_read_cmds: u64,
    pub cache_read_bytes: u64,
    pub cache_flush_cmds: u64,
    pub backing_write_cmds: u64,
    pub backing_write_bytes: u64,
    pub backing_read_cmds: u64,
    pub backing_read_bytes: u64,
    pub backing_flush_cmds: u64,
    /// User write bytes that went straight to the backing device.
    pub bypass_write_bytes: u64,
    /// Blocks staged into the cache by read caching.
    pub read_cache_staged: u64,
    /// Device commands that failed and were retried.
    pub io_retries: u64,
    /// Writeback batches that failed and will be retried.
    pub writeback_errors: u64,
    /// Backing-device flushes that failed while writes that bypassed the
    /// cache waited for them (every later FLUSH fails: see `IoError::BackingWritesLost`).
    pub backing_flush_failures: u64,
    /// Scrub reads that failed even after retries (the log is read again later).
    pub scrub_read_errors: u64,
    /// Quarantine markers carried forward into a newer log.
    pub quarantine_moves: u64,
    /// Blocks the cleaner copied forward in the cache instead of writing
    /// them back (each a cache read and a cache write).
    pub relocated_blocks: u64,
    /// Write grants: slots reserved for submitters that copy a write in on
    /// their own core, those handed back unused (logged as padding), the
    /// writes published into them, and those placed again because a newer
    /// copy of a block was already at a later position.
    pub granted_slots: u64,
    pub returned_slots: u64,
    pub granted_writes: u64,
    pub granted_replaced: u64,
    /// Blocks and backing-device writes writeback issued (their ratio is
    /// the blocks per I/O that sorting and merging reach).
    pub writeback_blocks: u64,
    pub writeback_ios: u64,
    /// Writes that went around the cache to keep room for writes that must
    /// use it (see `admission`).
    pub admission_bypass_writes: u64,
    /// Writes that waited for room, and the time they waited in all.
    pub throttled_writes: u64,
    pub throttled_ns: u64,
    /// Time from submission to completion inside the engine, per [`Op`].
    pub latency: [LatencyHistogram; 3],
    /// Superblock records written.
    pub sb_record_writes: u64,
    /// Damaged logs below the durable frontier that a salvage start-up
    /// skipped (their blocks read as older contents).
    pub salvaged_logs_skipped: u64,
}

impl Stats {
    /// Adds one 4 KiB piece to the 16 counters.
    pub(crate) fn count(&mut self, write: bool, hit: bool, on_buffer: bool, full: bool) {
        self.io[write as usize][hit as usize][on_buffer as usize][full as usize] += 1;
    }

    /// Cache-device bytes written per user byte written (SSD wear): logs,
    /// copies the cleaner made, records and their headers.
    pub fn cache_write_amplification(&self) -> f64 {
        self.cache_write_bytes as f64 / self.user_write_bytes.max(1) as f64
    }

    /// Cache-device write commands per user write command (SSD wear per I/O).
    pub fn cache_writes_per_user_write(&self) -> f64 {
        self.cache_write_cmds as f64 / self.user_write_cmds.max(1) as f64
    }
}

/// What a user request does, for its latency histogram.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Op {
    #[default]
    Read = 0,
    /// Writes, write-zeroes and discards.
    Write = 1,
    Flush = 2,
}

/// Sub-buckets per power of two: a bucket is at most 1/4 wider than its floor.
const SUB_BUCKETS: usize = 4;
const BUCKETS: usize = 64 * SUB_BUCKETS;

/// Latencies in log-linear buckets of nanoseconds (a quarter of a power of
/// two wide), so percentiles cost a fixed 2 KiB whatever the count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
        }
    }
}

impl LatencyHistogram {
    fn bucket(ns: u64) -> usize {
        if ns < SUB_BUCKETS as u64 {
            return ns as usize;
        }
        let log = 63 - ns.leading_zeros() as usize; // ≥ 2
        let sub = ((ns >> (log - 2)) & 3) as usize;
        ((log - 1) * SUB_BUCKETS + sub).min(BUCKETS - 1)
    }

    /// The largest latency bucket `b` holds.
    fn ceiling(b: usize) -> u64 {
        if b < SUB_BUCKETS {
            return b as u64;
        }
        let (log, sub) = (b / SUB_BUCKETS + 1, (b % SUB_BUCKETS) as u64);
        let top = ((4 + sub + 1) as u128) << (log - 2);
        (top - 1).min(u64::MAX as u128) as u64
    }

    pub(crate) fn record(&mut self, ns: u64) {
        self.counts[Self::bucket(ns)] += 1;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The latency `q` (0..=1) of the requests completed at or under, as
    /// its bucket's ceiling (0 with none recorded).
    pub fn percentile(&self, q: f64) -> u64 {
        let n = self.count();
        if n == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::ceiling(b);
            }
        }
        Self::ceiling(BUCKETS - 1)
    }
}

/// The writeback rate over the last whole second or more.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct WritebackRate {
    since: crate::io::Nanos,
    /// (blocks, I/Os) counted when the window opened.
    at_start: (u64, u64),
    /// Blocks and I/Os per second in the last window.
    pub(crate) per_s: (u64, u64),
}

impl WritebackRate {
    /// Closes the window once a second has passed.
    pub(crate) fn tick(&mut self, now: crate::io::Nanos, stats: &Stats) {
        let elapsed = now.saturating_sub(self.since);
        if elapsed < 1_000_000_000 {
            return;
        }
        let now_counts = (stats.writeback_blocks, stats.writeback_ios);
        let rate =
            |a: u64, b: u64| (a.saturating_sub(b) as u128 * 1_000_000_000 / elapsed as u128) as u64;
        self.per_s = (
            rate(now_counts.0, self.at_start.0),
            rate(now_counts.1, self.at_start.1),
        );
        self.since = now;
        self.at_start = now_counts;
    }
}

/// Where the cache is and what it holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Id the next log will get (dm-writeboost's cursor is its ring position).
    pub next_segment_id: u64,
    pub cursor: u64,
    pub nr_segments: u64,
    pub segment_size: u64,
    pub data_blocks_per_segment: u32,
    /// Id of the open (filling) log, if any.
    pub current_id: u64,
    /// Every log up to this id is durable on the cache device.
    pub last_flushed_id: u64,
    /// Every log up to this id is written back (in memory).
    pub last_writeback_id: u64,
    /// Same, as recorded durably in the superblock record.
    pub recorded_writeback_id: u64,
    pub nr_dirty_blocks: u64,
    /// Dirty blocks as a share of the cache's data blocks (%).
    pub dirty_pct: u32,
    pub nr_cached_blocks: u64,
    /// Writeback over the last second: blocks and backing-device writes per second.
    pub writeback_blocks_per_s: u64,
    pub writeback_ios_per_s: u64,
    /// Bytes the block index allocates (sized by the cache; pages become
    /// resident as slots are used).
    pub index_bytes: u64,
    /// Logs replayed from their headers whose data the scrub has not checked yet.
    pub unchecked_logs: u64,
    /// Dirty blocks whose cached copy failed its checksum: reads of them
    /// fail and writeback stops before them until they are rewritten whole
    /// or the cache is reopened with salvage.
    pub corrupt_blocks: u64,
    pub nr_free_buffers: u32,
    pub stalled_writes: u32,
    pub read_only: bool,
    /// A backing flush failed while writes that bypassed the cache waited
    /// for it: every FLUSH fails from then on (`IoError::BackingWritesLost`).
    pub backing_writes_lost: bool,
    pub drop_caches_active: bool,
    /// A writeback batch is in flight.
    pub writeback_active: bool,
    pub epoch: u64,
    pub cache_uuid: [u8; 16],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_a_quarter_wide() {
        let mut last = 0;
        for ns in (0..100_000u64).chain([1 << 40, u64::MAX]) {
            let b = LatencyHistogram::bucket(ns);
            assert!(b >= last, "bucket of {ns} went back");
            assert!(LatencyHistogram::ceiling(b) >= ns, "{ns} above its ceiling");
            if ns >= 4 {
                assert!(
                    LatencyHistogram::ceiling(b) <= ns.saturating_add(ns / 4),
                    "{ns} in a wide bucket"
                );
            }
            last = b;
        }
    }

    #[test]
    fn percentiles_pick_the_rank() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.percentile(0.99), 0);
        for _ in 0..99 {
            h.record(1_000);
        }
        h.record(1_000_000);
        assert!((1_000..1_250).contains(&h.percentile(0.5)));
        assert!((1_000..1_250).contains(&h.percentile(0.99)));
        assert!((1_000_000..1_250_000).contains(&h.percentile(0.999)));
        assert_eq!(h.count(), 100);
    }
}
