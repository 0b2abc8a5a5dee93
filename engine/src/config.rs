//! Start-up parameters and runtime tunables, with their ranges.

use crate::error::ConfigError;
use crate::format::BackingIdentity;
use crate::geometry::DEFAULT_SEGMENT_SIZE;

/// Knobs that may change while the cache runs. Names follow dm-writeboost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tunables {
    /// Background writeback runs while the backing device's observed load
    /// (outstanding user I/O on it, as a percentage of a queue depth of 32) is
    /// below this. 0 = only when the cache needs room or on `drop_caches`;
    /// 100 = always.
    pub writeback_threshold: u32,
    /// Background writeback leaves a log alone until it has been durable on
    /// the cache device this long, so blocks rewritten within that time reach
    /// the backing device once (0 = at once). Writeback for room and
    /// `drop_caches` do not wait.
    pub writeback_delay_ms: u32,
    /// Segments written back per batch (each needs one segment of memory).
    pub nr_max_batched_writeback: u32,
    /// Seconds between superblock-record updates (0 = only when space must be
    /// reclaimed and at shutdown).
    pub update_sb_record_interval: u32,
    /// Seconds after which an idle, partly filled buffer is written as a log
    /// (0 = never; FUA/FLUSH still force it).
    pub sync_data_interval: u32,
    /// Missed reads are staged into the cache unless they continue a sequential
    /// run longer than this many blocks (0 = read caching off).
    pub read_cache_threshold: u32,
    /// How long a FUA/FLUSH waits for the buffer to fill before a partial log
    /// is written (0 = at once).
    pub barrier_deadline_ms: u32,
    /// Writes bypass the cache (cached lines are kept consistent).
    pub write_around_mode: bool,
    /// Writes of at least this many KiB go straight to the backing device for
    /// blocks the cache does not hold dirty (0 = never bypass).
    pub bypass_write_kib: u32,
    /// When the ring needs room, a log whose live dirty blocks fill at most
    /// this share (%) of it is cleaned in the cache: those blocks are copied
    /// forward into the open buffer instead of being written back to the
    /// backing device (0 = never; every position is freed by writeback).
    pub clean_max_live_pct: u32,
    /// A block copied forward this many times is cold: it is written back
    /// to the backing device instead of being copied again.
    pub max_relocations: u32,
    /// Writeback writes in flight on the backing device at most, so user
    /// I/O to the backing device never queues behind a whole batch.
    pub writeback_max_inflight: u32,
    /// The cleaner runs only while writeback costs at least this many µs
    /// per block (measured; a fast backing device is cheaper to write back
    /// to than copying in the cache and wearing it). 0 = whatever it costs.
    pub clean_min_writeback_us: u32,
}

impl Default for Tunables {
    fn default() -> Self {
        Self {
            writeback_threshold: 70,
            writeback_delay_ms: 1000,
            nr_max_batched_writeback: 8,
            update_sb_record_interval: 60,
            sync_data_interval: 5,
            read_cache_threshold: 0,
            barrier_deadline_ms: 10,
            write_around_mode: false,
            bypass_write_kib: 1024,
            clean_max_live_pct: 50,
            max_relocations: 4,
            writeback_max_inflight: 16,
            clean_min_writeback_us: 20,
        }
    }
}

/// (name, min, max) of each numeric tunable.
pub const TUNABLE_RANGES: [(&str, u64, u64); 13] = [
    ("writeback_threshold", 0, 100),
    ("writeback_delay_ms", 0, 3_600_000),
    ("nr_max_batched_writeback", 1, 32),
    ("update_sb_record_interval", 0, 3600),
    ("sync_data_interval", 0, 3600),
    ("read_cache_threshold", 0, 127),
    ("barrier_deadline_ms", 0, 10_000),
    ("write_around_mode", 0, 1),
    ("bypass_write_kib", 0, 1 << 20),
    ("clean_max_live_pct", 0, 90),
    ("max_relocations", 0, 255),
    ("writeback_max_inflight", 1, 1024),
    ("clean_min_writeback_us", 0, 1_000_000),
];

impl Tunables {
    /// Sets one tunable by name, checking its range. Nothing changes on error.
    pub fn set(&mut self, name: &str, value: u64) -> Result<(), ConfigError> {
        let &(name, min, max) = TUNABLE_RANGES
            .iter()
            .find(|(n, _, _)| *n == name)
            .ok_or_else(|| ConfigError::Unknown(name.to_string()))?;
        if !(min..=max).contains(&value) {
            return Err(ConfigError::OutOfRange {
                name,
                value,
                min,
                max,
            });
        }
        let v = value as u32;
        match name {
            "writeback_threshold" => self.writeback_threshold = v,
            "writeback_delay_ms" => self.writeback_delay_ms = v,
            "nr_max_batched_writeback" => self.nr_max_batched_writeback = v,
            "update_sb_record_interval" => self.update_sb_record_interval = v,
            "sync_data_interval" => self.sync_data_interval = v,
            "read_cache_threshold" => self.read_cache_threshold = v,
            "barrier_deadline_ms" => self.barrier_deadline_ms = v,
            "write_around_mode" => self.write_around_mode = v == 1,
            "bypass_write_kib" => self.bypass_write_kib = v,
            "clean_max_live_pct" => self.clean_max_live_pct = v,
            "max_relocations" => self.max_relocations = v,
            "writeback_max_inflight" => self.writeback_max_inflight = v,
            _ => self.clean_min_writeback_us = v,
        }
        Ok(())
    }

    /// Current value of every tunable, in [`TUNABLE_RANGES`] order.
    pub fn values(&self) -> [(&'static str, u64); 13] {
        [
            ("writeback_threshold", self.writeback_threshold as u64),
            ("writeback_delay_ms", self.writeback_delay_ms as u64),
            (
                "nr_max_batched_writeback",
                self.nr_max_batched_writeback as u64,
            ),
            (
                "update_sb_record_interval",
                self.update_sb_record_interval as u64,
            ),
            ("sync_data_interval", self.sync_data_interval as u64),
            ("read_cache_threshold", self.read_cache_threshold as u64),
            ("barrier_deadline_ms", self.barrier_deadline_ms as u64),
            ("write_around_mode", self.write_around_mode as u64),
            ("bypass_write_kib", self.bypass_write_kib as u64),
            ("clean_max_live_pct", self.clean_max_live_pct as u64),
            ("max_relocations", self.max_relocations as u64),
            ("writeback_max_inflight", self.writeback_max_inflight as u64),
            ("clean_min_writeback_us", self.clean_min_writeback_us as u64),
        ]
    }

    /// Checks every field (for a struct built by hand rather than through `set`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut probe = Tunables::default();
        for (name, value) in self.values() {
            probe.set(name, value)?;
        }
        Ok(())
    }
}

/// Where the segment buffer lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BufferMode {
    /// Mode 0: RAM; FUA/FLUSH wait for a (possibly partial) log on the cache device.
    #[default]
    Volatile,
    /// Mode 1: a pmem pool; writes are acknowledged once persisted there.
    Persistent,
}

/// Everything the engine needs to format or recover a cache.
#[derive(Clone, Debug)]
pub struct OpenParams {
    /// Cache device size in bytes.
    pub cache_size: u64,
    /// Logical block size of the cache device; must divide 4096.
    pub cache_block_size: u32,
    /// Identity (host-supplied UUID and size) of the backing device.
    pub backing: BackingIdentity,
    /// Logical block size of the backing device: 512 or 4096. User I/O must be
    /// aligned to it.
    pub backing_block_size: u32,
    /// Reformat even if a valid cache is present (destroys its contents).
    pub format: bool,
    /// Recover past logs found damaged below the durable frontier (their
    /// blocks fall back to older contents) instead of refusing to open.
    pub salvage: bool,
    /// UUID given to the cache if it is formatted now.
    pub new_cache_uuid: [u8; 16],
    /// Segment size used if the cache is formatted now.
    pub segment_size: u64,
    /// Number of segment-sized RAM buffers (one open, the rest in flight).
    /// With a pmem pool there is one per pool slot instead.
    pub nr_buffers: u32,
    /// Mode 0 (volatile RAM buffer) or mode 1 (pmem buffer).
    pub mode: BufferMode,
    pub tunables: Tunables,
}

impl OpenParams {
    /// Parameters with defaults for everything but the devices.
    pub fn new(cache_size: u64, backing: BackingIdentity, new_cache_uuid: [u8; 16]) -> Self {
        Self {
            cache_size,
            cache_block_size: 512,
            backing,
            backing_block_size: 512,
            format: false,
            salvage: false,
            new_cache_uuid,
            segment_size: DEFAULT_SEGMENT_SIZE,
            nr_buffers: 4,
            mode: BufferMode::Volatile,
            tunables: Tunables::default(),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.tunables.validate()?;
        if !(2..=64).contains(&self.nr_buffers) {
            return Err(ConfigError::OutOfRange {
                name: "nr_buffers",
                value: self.nr_buffers as u64,
                min: 2,
                max: 64,
            });
        }
        for (name, v) in [
            ("cache_block_size", self.cache_block_size),
            ("backing_block_size", self.backing_block_size),
        ] {
            if !(v == 512 || v == 4096) {
                return Err(ConfigError::OutOfRange {
                    name,
                    value: v as u64,
                    min: 512,
                    max: 4096,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_checks_ranges_and_names_and_changes_nothing_on_error() {
        let mut t = Tunables::default();
        t.set("writeback_threshold", 30).unwrap();
        assert_eq!(t.writeback_threshold, 30);
        let before = t;
        assert!(matches!(
            t.set("writeback_threshold", 101),
            Err(ConfigError::OutOfRange { max: 100, .. })
        ));
        assert!(matches!(
            t.set("nr_max_batched_writeback", 0),
            Err(ConfigError::OutOfRange { .. })
        ));
        assert!(matches!(
            t.set("no_such_knob", 1),
            Err(ConfigError::Unknown(_))
        ));
        assert_eq!(t, before);
        t.set("write_around_mode", 1).unwrap();
        assert!(t.write_around_mode);
        assert!(t.validate().is_ok());
    }
}
