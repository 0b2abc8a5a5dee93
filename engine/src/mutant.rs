//! Planted bugs (feature `mutants`, for tests only). Each breaks one
//! data-safety rule on purpose; the simulator must catch every one within a
//! bounded run, which shows it really checks that rule. Without the feature
//! none can be switched on and every check compiles to `false`.

/// One planted bug, or none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mutant {
    #[default]
    None,
    /// Recovery replays a log whatever its epoch, so a stale log after the
    /// chain's end passes for its continuation.
    NoEpochCheck,
    /// A log counts as durable once its write completed, before any flush.
    DurableBeforeFlush,
    /// Writeback marks blocks clean (and moves the frontier) without
    /// flushing the backing device first.
    WritebackWithoutBackingFlush,
    /// Mode 1 stores a block's commit word before its data and entry are
    /// drained to the pool (they are drained only by a later publish).
    CommitBeforeDrain,
    /// Recovery takes a damaged log below the durable frontier for a torn
    /// tail and silently drops the acknowledged logs after it.
    NoDurableFrontierCheck,
    /// Start-up loads whatever checkpoint the region holds, without the
    /// newest record naming it (its sequence number and epoch).
    TrustAnyCheckpoint,
    /// The scrub keeps its list of logs when their ring positions are
    /// taken over, and reads every log whether anything needs it or not.
    ScrubIgnoresPositionReuse,
    /// A write covering part of a damaged block carries the damaged
    /// sectors into a new copy under a fresh checksum.
    PartialWriteOverDamage,
    /// A failed flush is retried, and a later success counts the writes it
    /// covered durable.
    FlushRetried,
    /// A loaded checkpoint's counts and table are taken on trust.
    TrustCheckpointCounts,
    /// Superblock records leave their quarantine list empty.
    QuarantineNotRecorded,
    /// A whole-block rewrite ends the quarantine at once, before the new
    /// copy is durable.
    QuarantineClearedEarly,
    /// The cleaner's copy of a block is logged clean, so once the old log's
    /// position is reused a crash loses the block.
    RelocatedLoggedClean,
    /// A publication into a granted slot older than the block's current
    /// copy is indexed there, so replay prefers the older data.
    GrantedPublishedInPlace,
}

impl Mutant {
    /// Every planted bug.
    pub const ALL: [Mutant; 14] = [
        Mutant::NoEpochCheck,
        Mutant::DurableBeforeFlush,
        Mutant::WritebackWithoutBackingFlush,
        Mutant::CommitBeforeDrain,
        Mutant::NoDurableFrontierCheck,
        Mutant::TrustAnyCheckpoint,
        Mutant::ScrubIgnoresPositionReuse,
        Mutant::PartialWriteOverDamage,
        Mutant::FlushRetried,
        Mutant::TrustCheckpointCounts,
        Mutant::QuarantineNotRecorded,
        Mutant::QuarantineClearedEarly,
        Mutant::RelocatedLoggedClean,
        Mutant::GrantedPublishedInPlace,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mutant::None => "none",
            Mutant::NoEpochCheck => "no-epoch-check",
            Mutant::DurableBeforeFlush => "durable-before-flush",
            Mutant::WritebackWithoutBackingFlush => "writeback-without-backing-flush",
            Mutant::CommitBeforeDrain => "commit-before-drain",
            Mutant::NoDurableFrontierCheck => "no-durable-frontier-check",
            Mutant::TrustAnyCheckpoint => "trust-any-checkpoint",
            Mutant::ScrubIgnoresPositionReuse => "scrub-ignores-position-reuse",
            Mutant::PartialWriteOverDamage => "partial-write-over-damage",
            Mutant::FlushRetried => "flush-retried",
            Mutant::TrustCheckpointCounts => "trust-checkpoint-counts",
            Mutant::QuarantineNotRecorded => "quarantine-not-recorded",
            Mutant::QuarantineClearedEarly => "quarantine-cleared-early",
            Mutant::RelocatedLoggedClean => "relocated-logged-clean",
            Mutant::GrantedPublishedInPlace => "granted-published-in-place",
        }
    }

    pub fn from_name(name: &str) -> Option<Mutant> {
        std::iter::once(Mutant::None)
            .chain(Mutant::ALL)
            .find(|m| m.name() == name)
    }

    /// Whether `self` is planted and is `m` (always false without the feature).
    pub(crate) fn is(self, m: Mutant) -> bool {
        cfg!(feature = "mutants") && self == m
    }
}
