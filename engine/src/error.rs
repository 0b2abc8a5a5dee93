//! Typed errors. Each message says what is wrong and what the user can do.

use thiserror::Error;

/// A structure on the cache device is not what this build can use.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    #[error("segment size {segment_size} is invalid: use a power of two from 64 KiB to 4 MiB")]
    BadSegmentSize { segment_size: u64 },
    #[error("backing device size {backing_size} is not a positive multiple of 512 bytes")]
    BadBackingSize { backing_size: u64 },
    #[error(
        "backing device of {backing_size} bytes is larger than the {max}-byte maximum a log's \
         48-bit block numbers can address; use a smaller backing device"
    )]
    BackingTooLarge { backing_size: u64, max: u64 },
    #[error(
        "cache device of {cache_size} bytes is too small: it needs at least {needed} bytes \
         (superblock region and two segments); use a larger device or a smaller segment size"
    )]
    CacheTooSmall { cache_size: u64, needed: u64 },
    #[error(
        "cache device of {cache_size} bytes holds more 4 KiB slots than the index addresses \
         ({max_slots}); use a cache device (or partition) of at most {max_bytes} bytes"
    )]
    CacheTooLarge {
        cache_size: u64,
        max_slots: u64,
        max_bytes: u64,
    },
    #[error("the device holds no writeboost superblock")]
    NotACache,
    #[error("region holds no log of this cache")]
    NotALog,
    #[error("{what} failed its checksum or consistency check")]
    BadChecksum { what: &'static str },
    #[error("{what} is truncated")]
    Truncated { what: &'static str },
    #[error(
        "format version {found} is newer than this build supports ({supported}); \
         upgrade writeboost to open this cache"
    )]
    NewerVersion { found: u32, supported: u32 },
    #[error(
        "format version {found} is older than this build's ({supported}); write the cache \
         back with the release that formatted it (drop_caches, then detach), then reopen \
         with format=true"
    )]
    OlderVersion { found: u32, supported: u32 },
    #[error(
        "block size mismatch: the cache was formatted with {block}-byte blocks and \
         {sector}-byte sectors; this build uses 4096/512"
    )]
    BlockSizeMismatch { block: u64, sector: u64 },
    #[error(
        "the cache device shrank from {formatted} to {now} bytes since it was formatted; \
         restore the original device or reformat (discarding its contents)"
    )]
    CacheShrunk { formatted: u64, now: u64 },
    #[error("metablock {index} of a log points outside the backing device or has bad flags")]
    BadMetablock { index: u32 },
    #[error("data block {index} of a log does not match its checksum")]
    BadBlock { index: u32 },
    #[error(
        "pmem pool of {len} bytes is too small: it needs at least {needed} bytes \
         (header and two segment slots)"
    )]
    PoolTooSmall { len: u64, needed: u64 },
}

/// Opening (formatting or recovering) a cache failed. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OpenError {
    #[error("invalid parameters: {0}")]
    Params(#[from] ConfigError),
    #[error("cache device geometry: {0}")]
    Geometry(FormatError),
    #[error(
        "the cache superblock is unusable ({0}); if this device may be discarded, \
         reopen with format=true to reformat it"
    )]
    Superblock(FormatError),
    #[error(
        "this cache belongs to another backing device (expected uuid {expected}, size {expected_size}; \
         got uuid {got}, size {got_size}); attach the right backing device, or reformat with \
         format=true to discard the cache"
    )]
    BackingMismatch {
        expected: String,
        expected_size: u64,
        got: String,
        got_size: u64,
    },
    #[error(
        "both superblock records are unreadable; without one, logs already written back \
         cannot be told from dirty ones, so nothing was replayed or written. Restore the \
         cache device's first 12 KiB from a copy, or reopen with format=true to discard the cache"
    )]
    NoRecord,
    #[error(
        "log {first_bad} on the cache device is damaged or missing, yet log {claimed} or a \
         later record says it was durable: the device lost or corrupted acknowledged data. \
         Nothing was replayed or written. Copy the cache device for analysis, then reopen with \
         salvage=true to keep every intact log (blocks of the damaged ones read as their older \
         contents), or with format=true to discard the cache"
    )]
    Corrupt { first_bad: u64, claimed: u64 },
    #[error(
        "log {log} on the cache device could not be read, even after retries; nothing was \
         replayed or written. Check the device and retry; if it stays unreadable, reopen with \
         salvage=true to skip that log (its blocks read as their older contents), or with \
         format=true to discard the cache"
    )]
    Unreadable { log: u64 },
    #[error("the cache device failed during start-up ({op}); check the device and retry")]
    Device { op: &'static str },
    #[error("pmem pool: {0}")]
    Pool(FormatError),
    #[error(
        "the pmem pool belongs to another cache (or to an earlier format of this one); \
         give the pool of this cache, or reopen with format=true to reformat both"
    )]
    PoolMismatch,
    #[error(
        "the pmem pool does not hold the {blocks} acknowledged writes of log {log} that the \
         cache was shut down with: it is an older copy, or another pool of this cache. Nothing \
         was replayed or written. Give the pool file this cache last ran with, or reopen with \
         format=true to discard the cache"
    )]
    PoolStale { log: u64, blocks: u32 },
    #[error(
        "this cache was last run with a pmem buffer (mode 1) that may hold acknowledged \
         writes; open it in mode 1, or give the pmem pool so its contents are drained first"
    )]
    PoolRequired,
}

/// A tunable or parameter is out of range.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("{name}={value} is out of range; allowed: {min}..={max}")]
    OutOfRange {
        name: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("unknown tunable '{0}'")]
    Unknown(String),
    #[error("mode 1 (pmem buffer) needs a pmem pool: give pmem_path")]
    PoolRequired,
}

/// A user request was refused before it started.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SubmitError {
    #[error(
        "request at byte {offset} of length {len} is not within the device or not aligned \
         to 512-byte sectors"
    )]
    BadRange { offset: u64, len: u64 },
    #[error("the cache is still starting; wait for it to be ready")]
    NotReady,
    #[error("the cache is shutting down")]
    ShuttingDown,
    #[error("request id {0} is already in flight")]
    DuplicateRequest(u64),
    #[error(
        "slot {slot} of log {log} is not reserved for a submitter (never granted, already \
         published or returned); send the write without a grant"
    )]
    NotGranted { log: u64, slot: u32 },
}

/// Why a user request completed unsuccessfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum IoError {
    #[error("the cache device failed; the cache is read-only now: drain it and replace the device")]
    CacheDevice,
    #[error("the backing device failed this request")]
    BackingDevice,
    #[error("the cache is read-only after a cache device failure; writes are refused")]
    ReadOnly,
    #[error(
        "the backing device failed a flush, so writes that went straight to it since the last \
         successful flush may be lost and no later flush can vouch for them; check the backing \
         device, rewrite that data, then restart the cache"
    )]
    BackingWritesLost,
    #[error(
        "the cached copy of this block failed its checksum (damaged at rest) and is quarantined: \
         reads of it and writes to part of it fail until the whole block is rewritten \
         (bdev_writeboost_get_quarantine lists such blocks)"
    )]
    Corrupt,
}

/// Why a device command failed, as far as the host can tell. The engine
/// retries what may succeed next time and gives up at once on the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DeviceError {
    /// The device failed the I/O (EIO, a lost connection, a timeout, no
    /// memory to start it): worth retrying.
    #[error("device I/O error")]
    Io,
    /// The device refused the command itself (EINVAL, out of range, not
    /// supported): the same command fails the same way again.
    #[error("the device refused the command as invalid")]
    Invalid,
}

impl DeviceError {
    /// Whether the same command may succeed if it is issued again.
    pub fn is_retryable(self) -> bool {
        self == DeviceError::Io
    }
}
