//! The crash checker: a seeded workload against the engine and a reference
//! model, with crashes at random points, recovery, and a full read-back.

use std::collections::VecDeque;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use writeboost_engine::config::BufferMode;
use writeboost_engine::config::TUNABLE_RANGES;
use writeboost_engine::driver::UserOp;
use writeboost_engine::geometry::Geometry;
use writeboost_engine::pmem::PoolLayout;
use writeboost_engine::{BackingIdentity, IoError, Nanos, OpenError, OpenParams, ReqId, Tunables};

use crate::content::{self, SECTOR, Version};
use crate::corrupt::{self, Injected};
use crate::device::{CrashOutcome, SimDevice};
use crate::harness::{Harness, Latency};
use crate::pmem::SimPmem;
use crate::submitters::Submitters;
use writeboost_engine::mutant::Mutant;

/// Share of crashes that also damage a durable log, unless told otherwise.
pub const DEFAULT_CORRUPTION_RATE: f64 = 0.1;
pub const DEFAULT_RESTART_RATE: f64 = 0.25;
/// Simulated time within which every request must complete, with success
/// or an error: past it the run has stopped making progress.
const LIVENESS_NS: Nanos = 120_000_000_000;
/// Times an open that failed on a device error is tried again, as a user
/// would after a transient fault.
const OPEN_RETRIES: u32 = 3;

/// Options of one simulation run.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub seed: u64,
    /// User operations per seed.
    pub ops: u64,
    /// Crashes per seed (at random points).
    pub crashes: u32,
    /// Probability that a device command fails (the engine retries).
    pub error_rate: f64,
    /// Print every problem found.
    pub verbose: bool,
    /// Tunables forced over the seed's random choice (name, value).
    pub force: Vec<(String, u64)>,
    /// Which buffer modes the seed runs in.
    pub mode: ModeChoice,
    /// A bug planted in every engine of the run (none normally).
    pub mutant: Mutant,
    /// Probability that a crash also damages one durable log at rest.
    pub corruption_rate: f64,
    /// Probability that a crash point is a clean restart instead (half of
    /// those lose power part way through the shutdown).
    pub restart_rate: f64,
    /// The ring's positions (from 2), instead of a cache of the seed's
    /// choice of 5 to 16 segments.
    pub segments: Option<u64>,
    /// Submitting cores that copy writes into granted slots (0: none, every
    /// write goes to the engine whole); None draws 0 to 4 per seed.
    pub cores: Option<usize>,
}

/// Buffer modes a simulation uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ModeChoice {
    /// Mode 0 only (no pool).
    Volatile,
    /// Mode 1 only.
    Pmem,
    /// Mode 0 or 1 at random at every (re)start, with the pool always attached.
    Mixed,
    /// Each seed picks one of the above.
    #[default]
    Any,
}

/// What a run found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub ops: u64,
    pub crashes: u64,
    /// Sectors that read back older than a write acknowledged as durable.
    pub acknowledged_lost: u64,
    /// Sectors that read back as data never written there (or a mismatch while running).
    pub corrupt_reads: u64,
    /// The engine stopped making progress or failed to reopen.
    pub stuck: u64,
    /// User requests that ended in an error.
    pub io_errors: u64,
    pub partial_logs: u64,
    pub logs: u64,
    /// Blocks the cleaner copied forward, and writes that went around the
    /// cache to keep room (so a sweep shows it exercised both).
    pub relocated: u64,
    pub admission_bypasses: u64,
    /// Writes cores copied into granted slots, those placed again because
    /// a newer copy was at a later position, and the slots handed back.
    pub granted_writes: u64,
    pub granted_replaced: u64,
    pub returned_slots: u64,
    /// Publications of granted writes the engine refused (a bug).
    pub refused_publications: u64,
    /// Crashes by outcome: torn sectors, whole writes, newest first.
    pub crash_outcomes: [u64; 3],
    /// Durable logs damaged at rest, by fault (bit rot, misdirected, lost write).
    pub corruptions: [u64; 3],
    /// Damage that recovery reported as corruption (then salvaged).
    pub corruption_detected: u64,
    /// Damage that recovery took for a torn tail: it opened, dropping logs.
    pub silent_truncations: u64,
    /// Of the damage detected, what the scrub found after an open (data of
    /// a log whose header recovery trusted) rather than the open itself.
    pub found_by_scrub: u64,
    /// Damaged data that no read or writeback needed any more (a copy
    /// superseded or clean): nothing to report, nothing lost.
    pub damage_unused: u64,
    /// Clean shutdowns in the middle of a run, and how many of them the
    /// next start resumed from the checkpoint.
    pub clean_restarts: u64,
    pub checkpoints_loaded: u64,
    /// Power failures part way through a shutdown.
    pub shutdown_crashes: u64,
    /// Recoveries from undamaged images whose scrub still reported damaged
    /// data (a log replayed from its header that a crash had torn), and
    /// requests that failed as damaged where the model holds nothing damaged.
    pub false_corruption: u64,
    /// Opens that failed on a device error and were tried again.
    pub open_retries: u64,
    /// Damage found by the scrub that the run carried on with, quarantined,
    /// instead of salvaging.
    pub quarantined_runs: u64,
    /// Recoveries after which the workload went on at once, without reading
    /// the device back first (reads and writes meet the scrub).
    pub undrained_restarts: u64,
    /// Runs whose cache device failed for good part way through.
    pub cache_failures: u64,
    /// Flushes that failed (what they covered is not durable).
    pub failed_flushes: u64,
    /// Checkpoints made to lie (right CRCs, wrong contents) before a
    /// restart, and those start-up loaded anyway (it must refuse them).
    pub lying_checkpoints: u64,
    pub trusted_lies: u64,
}

impl Outcome {
    pub fn add(&mut self, o: &Outcome) {
        self.ops += o.ops;
        self.crashes += o.crashes;
        self.acknowledged_lost += o.acknowledged_lost;
        self.corrupt_reads += o.corrupt_reads;
        self.stuck += o.stuck;
        self.io_errors += o.io_errors;
        self.partial_logs += o.partial_logs;
        self.logs += o.logs;
        self.relocated += o.relocated;
        self.admission_bypasses += o.admission_bypasses;
        self.granted_writes += o.granted_writes;
        self.granted_replaced += o.granted_replaced;
        self.returned_slots += o.returned_slots;
        self.refused_publications += o.refused_publications;
        for (a, b) in self.crash_outcomes.iter_mut().zip(o.crash_outcomes) {
            *a += b;
        }
        for (a, b) in self.corruptions.iter_mut().zip(o.corruptions) {
            *a += b;
        }
        self.corruption_detected += o.corruption_detected;
        self.silent_truncations += o.silent_truncations;
        self.found_by_scrub += o.found_by_scrub;
        self.damage_unused += o.damage_unused;
        self.clean_restarts += o.clean_restarts;
        self.checkpoints_loaded += o.checkpoints_loaded;
        self.shutdown_crashes += o.shutdown_crashes;
        self.false_corruption += o.false_corruption;
        self.open_retries += o.open_retries;
        self.quarantined_runs += o.quarantined_runs;
        self.undrained_restarts += o.undrained_restarts;
        self.cache_failures += o.cache_failures;
        self.failed_flushes += o.failed_flushes;
        self.lying_checkpoints += o.lying_checkpoints;
        self.trusted_lies += o.trusted_lies;
    }

    /// Adds an engine's counters as it ends (a crash, or the end of a seed).
    fn add_engine_stats(&mut self, st: &writeboost_engine::Stats) {
        self.partial_logs += st.nr_partial_flushed;
        self.logs += st.nr_logs;
        self.relocated += st.relocated_blocks;
        self.admission_bypasses += st.admission_bypass_writes;
        self.granted_writes += st.granted_writes;
        self.granted_replaced += st.granted_replaced;
        self.returned_slots += st.returned_slots;
    }

    pub fn clean(&self) -> bool {
        self.acknowledged_lost == 0
            && self.corrupt_reads == 0
            && self.stuck == 0
            && self.silent_truncations == 0
            && self.false_corruption == 0
            && self.trusted_lies == 0
            && self.refused_publications == 0
    }
}

const WILD: u64 = u64::MAX;
/// Marks the version of a write-zeroes (its content is zeroes, its id is unique).
const ZERO: u64 = 1 << 62;

/// Whether version `v` reads as zeroes (0 is the device's initial content).
fn is_zero(v: u64) -> bool {
    v == 0 || (v != WILD && v & ZERO != 0)
}

/// What the model knows about one sector.
#[derive(Clone, Default)]
struct Sector {
    /// Version guaranteed to survive a crash (0 = zeroes).
    durable: u64,
    /// Versions submitted since, oldest first: any may survive.
    later: Vec<u64>,
    /// Latest acknowledged version (WILD after a discard).
    cur: u64,
    /// A discard since this write id: anything written here may come back.
    wild_since: Option<u64>,
    /// Discarded and not written since: its contents are unspecified, and
    /// may change without a write (the cache and the backing device may
    /// hold different ones), so even a read-back sets no baseline.
    discarded: bool,
    /// A recovery happened and nothing has read or written the sector
    /// since: it holds `durable` or one of `later`, and the first read
    /// says which.
    unknown: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write { fua: bool },
    Zeroes,
    Discard,
    Flush,
}

struct Pending {
    op: Op,
    first: u64,
    count: u64,
    write_id: u64,
    /// Simulated time it was submitted.
    since: Nanos,
}

/// Why an open failed (None: it never answered), and the harness if the
/// engine answered, for another try over the same devices.
type OpenFailure = (Option<OpenError>, Option<Box<Harness>>);

/// Writes as (version, first sector, sector count).
type AckedWrites = Vec<(u64, u64, u64)>;

struct Run {
    opts: SimOptions,
    rng: ChaCha8Rng,
    params: OpenParams,
    lat: Latency,
    sectors: Vec<Sector>,
    /// Writes (id, first sector, count) acknowledged since the last flush was submitted.
    acked_unflushed: AckedWrites,
    /// Flushes in flight with the writes acknowledged before each was submitted.
    flushes: VecDeque<(ReqId, AckedWrites)>,
    pending: std::collections::BTreeMap<ReqId, Pending>,
    next_req: u64,
    next_write: u64,
    out: Outcome,
    mode: ModeChoice,
    /// The current incarnation runs in mode 1.
    persistent: bool,
    pool_len: u64,
    /// Blocks damaged at rest that reads may fail on (`IoError::Corrupt`).
    damaged: std::collections::BTreeSet<u64>,
    /// The current incarnation opened from an image nothing damaged at
    /// rest: its scrub must find nothing.
    undamaged: bool,
    /// Writes numbered below this were submitted before the last (re)open:
    /// only they can be what a recovery kept.
    recovery_mark: u64,
    /// Damage injected at rest that nothing needed when it was injected
    /// (the log and its blocks): a later recovery that replays the log's
    /// header may still report it.
    latent: Option<(u64, Vec<u64>)>,
    /// Submitting cores of the model, and the stream their choices come from.
    cores: usize,
    cores_rng: ChaCha8Rng,
}

/// Runs one seed: workload, crashes, recoveries, clean shutdown, checks.
pub fn run_seed(opts: &SimOptions) -> Outcome {
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let seg = [64u64 << 10, 128 << 10][rng.random_range(0..2)];
    let drawn = rng.random_range(5..=16);
    let cache_size = match opts.segments {
        None => seg * drawn,
        // The smallest cache whose ring has that many positions (beside the
        // superblock's region and the checkpoint's).
        Some(n) => (n.max(2) + 1..)
            .map(|regions| seg * regions)
            .find(|&size| {
                Geometry::new(seg, size, 1 << 20).is_ok_and(|g| g.nr_segments >= n.max(2))
            })
            .expect("a cache that large exists"),
    };
    let backing_size: u64 = [1u64 << 20, 2 << 20][rng.random_range(0..2)];
    let mut t = Tunables {
        barrier_deadline_ms: [0, 1, 10][rng.random_range(0..3)],
        read_cache_threshold: [0, 0, 4, 32][rng.random_range(0..4)],
        write_around_mode: rng.random_bool(0.1),
        bypass_write_kib: [0, 32, 64][rng.random_range(0..3)],
        writeback_threshold: [0, 50, 100][rng.random_range(0..3)],
        writeback_delay_ms: [0, 1, 20][rng.random_range(0..3)],
        nr_max_batched_writeback: rng.random_range(1..=4),
        update_sb_record_interval: [0, 1][rng.random_range(0..2)],
        sync_data_interval: [0, 1][rng.random_range(0..2)],
        ..Tunables::default()
    };
    // Cleaning, cold blocks and the writeback window, from a stream of
    // their own (the other choices stay as each seed had them).
    let mut space = ChaCha8Rng::seed_from_u64(opts.seed ^ 0xc1ea_2017);
    t.clean_max_live_pct = [0, 30, 50, 90][space.random_range(0..4)];
    t.max_relocations = [0, 1, 4][space.random_range(0..3)];
    t.writeback_max_inflight = [1, 4, 16][space.random_range(0..3)];
    t.clean_min_writeback_us = [0, 0, 20][space.random_range(0..3)];
    for (name, value) in &opts.force {
        t.set(name, *value).expect("valid forced tunable");
    }
    let mut params = OpenParams::new(
        cache_size,
        BackingIdentity {
            uuid: [9; 16],
            size: backing_size,
        },
        [0; 16],
    );
    params.segment_size = seg;
    params.nr_buffers = rng.random_range(2..=4);
    params.tunables = t;
    let mut uuid = [0u8; 16];
    rng.fill(&mut uuid);
    params.new_cache_uuid = uuid;
    // A slow cache device's reads in a third of the seeds: the scrub then
    // runs alongside the workload for longer. (Drawn from a stream of its
    // own, so the seeds' other choices stay as they were.)
    let slow_reads = ChaCha8Rng::seed_from_u64(opts.seed ^ 0x5c0b_5eed).random_bool(1.0 / 3.0);
    let lat = Latency {
        cache_read: if slow_reads { 2_000_000 } else { 20_000 },
        cache_write: 20_000,
        cache_flush: 50_000,
        backing_read: 200_000,
        backing_write: 200_000,
        backing_flush: 500_000,
        pmem_persist_4k: 1_000,
        jitter: true,
    };
    let mode = match opts.mode {
        ModeChoice::Any => {
            [ModeChoice::Volatile, ModeChoice::Pmem, ModeChoice::Mixed][rng.random_range(0..3)]
        }
        m => m,
    };
    let geo = Geometry::new(seg, cache_size, backing_size).expect("geometry");
    let slot = PoolLayout::new(u64::MAX / 2, &geo)
        .expect("layout")
        .slot_size;
    let pool_len = 4096 + slot * rng.random_range(2..=5);
    let nsec = backing_size / SECTOR as u64;
    // Submitting cores, from a stream of their own: none in a third of the
    // seeds, so the engine's own write path stays exercised alone too.
    let mut cores_rng = ChaCha8Rng::seed_from_u64(opts.seed ^ 0xc0e5_0b11);
    let cores = opts
        .cores
        .unwrap_or_else(|| [0, 0, 1, 2, 3, 4][cores_rng.random_range(0..6)]);
    let mut run = Run {
        opts: opts.clone(),
        rng,
        params,
        lat,
        sectors: vec![Sector::default(); nsec as usize],
        acked_unflushed: Vec::new(),
        flushes: VecDeque::new(),
        pending: Default::default(),
        next_req: 1,
        next_write: 1,
        out: Outcome::default(),
        mode,
        persistent: false,
        pool_len,
        damaged: Default::default(),
        undamaged: true,
        recovery_mark: 0,
        latent: None,
        cores,
        cores_rng,
    };
    if opts.verbose {
        eprintln!(
            "seed {}: mode {:?} segment {} cache {} backing {} buffers {} {:?}",
            opts.seed,
            run.mode,
            seg,
            cache_size,
            backing_size,
            run.params.nr_buffers,
            run.params.tunables
        );
    }
    run.go(cache_size, backing_size);
    run.out
}

impl Run {
    fn note(&self, msg: impl FnOnce() -> String) {
        if self.opts.verbose {
            eprintln!("seed {}: {}", self.opts.seed, msg());
        }
    }

    fn harness(
        &mut self,
        cache: SimDevice,
        backing: SimDevice,
        pool: Option<SimPmem>,
    ) -> Option<Harness> {
        let failed = match self.open(cache, backing, pool, false) {
            Ok(h) => return Some(h),
            Err((Some(OpenError::Corrupt { first_bad, .. }), Some(h)))
                if self.latent.as_ref().is_some_and(|l| l.0 == first_bad) =>
            {
                h
            }
            Err(_) => {
                self.out.stuck += 1;
                return None;
            }
        };
        // Damage injected earlier, which nothing needed then, found by a
        // recovery that replays the log's header: salvage it, and its
        // blocks may read as older contents.
        let (log, blocks) = self.latent.take().expect("latent damage");
        self.note(|| format!("recovery found the earlier damage to log {log}: salvage"));
        self.out.corruption_detected += 1;
        self.make_wild(&blocks);
        match self.open(failed.cache, failed.backing, failed.pmem, true) {
            Ok(h) => Some(h),
            Err(_) => {
                self.out.stuck += 1;
                None
            }
        }
    }

    /// Every sector of `blocks` may read as any older contents (a salvage
    /// dropped their damaged copies).
    fn make_wild(&mut self, blocks: &[u64]) {
        let nsec = self.sectors.len() as u64;
        // (They stay among the damaged: a quarantine marker written before
        // the salvage keeps them quarantined.)
        for &b in blocks {
            for s in b * 8..(b * 8 + 8).min(nsec) {
                self.sectors[s as usize].wild_since = Some(0);
            }
        }
    }

    /// Opens an engine over these devices; `Err(None)` if it never answered.
    fn open(
        &mut self,
        mut cache: SimDevice,
        mut backing: SimDevice,
        mut pool: Option<SimPmem>,
        salvage: bool,
    ) -> Result<Harness, OpenFailure> {
        self.persistent = match self.mode {
            ModeChoice::Pmem => true,
            ModeChoice::Mixed => self.rng.random_bool(0.5),
            _ => false,
        };
        let mut tries = 0;
        loop {
            match self.open_once(cache, backing, pool, salvage) {
                // A device error at start-up changes nothing the next try
                // depends on: try again over the same devices, as a user would.
                Err((Some(OpenError::Device { .. } | OpenError::Unreadable { .. }), Some(h)))
                    if tries < OPEN_RETRIES =>
                {
                    tries += 1;
                    self.out.open_retries += 1;
                    (cache, backing, pool) = (h.cache, h.backing, h.pmem);
                }
                Err(e) => return Err(e),
                Ok(h) => {
                    self.recovery_mark = self.next_write;
                    return Ok(h);
                }
            }
        }
    }

    /// One open; on failure, the harness too if the engine answered.
    fn open_once(
        &mut self,
        cache: SimDevice,
        backing: SimDevice,
        pool: Option<SimPmem>,
        salvage: bool,
    ) -> Result<Harness, OpenFailure> {
        let mut params = self.params.clone();
        params.salvage = salvage;
        params.mode = if self.persistent {
            BufferMode::Persistent
        } else {
            BufferMode::Volatile
        };
        let pool = match self.mode {
            ModeChoice::Volatile => None,
            _ => Some(pool.unwrap_or_else(|| SimPmem::new(self.pool_len))),
        };
        let mut h = Harness::with_pool(params, cache, backing, pool, self.lat, self.rng.random());
        h.driver.engine_mut().plant(self.opts.mutant);
        if self.cores > 0 {
            // A core's copy takes up to a cache write's time: publications
            // overtake each other and the engine's own work.
            let rng = ChaCha8Rng::seed_from_u64(self.cores_rng.random());
            h.cores = Some(Submitters::new(self.cores, 40_000, rng));
        }
        let persistent = self.persistent;
        self.note(|| format!("(re)open in mode {} salvage {salvage}", persistent as u8));
        h.error_rate = self.opts.error_rate;
        if !h.wait_open() {
            self.note(|| "reopen never completed".into());
            return Err((None, None));
        }
        match h.opened.take() {
            Some(Err(e)) => {
                self.note(|| format!("reopen failed: {e}"));
                Err((Some(e), Some(Box::new(h))))
            }
            r => {
                h.opened = r;
                Ok(h)
            }
        }
    }

    fn go(&mut self, cache_size: u64, backing_size: u64) {
        let Some(mut h) = self.harness(
            SimDevice::new(cache_size),
            SimDevice::new(backing_size),
            None,
        ) else {
            return;
        };
        let mut crash_at: Vec<u64> = (0..self.opts.crashes)
            .map(|_| self.rng.random_range(1..self.opts.ops))
            .collect();
        crash_at.sort_unstable();
        let qd = self.rng.random_range(1..=8usize);
        // A tenth of the runs lose the cache device for good part way
        // through: writes fail from then on, until the next restart.
        let mut cache_dies_at = self
            .rng
            .random_bool(0.1)
            .then(|| self.rng.random_range(1..self.opts.ops));
        let mut issued = 0u64;
        loop {
            if cache_dies_at.is_some_and(|at| issued >= at) {
                cache_dies_at = None;
                self.out.cache_failures += 1;
                self.note(|| "the cache device fails for good".into());
                h.fail_cache_writes = true;
            }
            while crash_at.first().is_some_and(|&c| c <= issued) {
                crash_at.remove(0);
                // Now and then a clean restart instead, or a power failure
                // part way through one.
                let nh = if self.opts.restart_rate > 0.0
                    && self.rng.random_bool(self.opts.restart_rate)
                {
                    self.restart(h)
                } else {
                    self.crash_and_recover(h)
                };
                let Some(nh) = nh else {
                    return;
                };
                h = nh;
            }
            while self.pending.len() < qd && issued < self.opts.ops {
                if self.submit_one(&mut h) {
                    issued += 1;
                } else {
                    break;
                }
            }
            if self.pending.is_empty() && issued >= self.opts.ops {
                // A crash point in the last batch (whose requests all ended at
                // once) still comes: the loop's top runs it.
                if crash_at.is_empty() {
                    break;
                }
                continue;
            }
            if !h.step() || self.overdue(&h) {
                let status = format!("{:?} {}", h.engine().status(), h.engine().debug_state());
                self.note(|| {
                    format!(
                        "stuck with {} requests pending: {status:?}",
                        self.pending.len()
                    )
                });
                self.out.stuck += 1;
                return;
            }
            self.collect(&mut h);
        }
        self.out.ops = issued;
        // drop_caches must finish: everything but quarantined blocks is
        // written back (unless the cache device failed, which leaves the
        // open buffer's data where it is).
        let now = h.now;
        h.driver.engine_mut().drop_caches(now);
        h.drain();
        while h.engine().status().drop_caches_active && !h.engine().is_read_only() {
            if !h.step() || h.now > now + LIVENESS_NS {
                let status = format!("{:?} {}", h.engine().status(), h.engine().debug_state());
                self.note(|| format!("drop_caches never finished: {status}"));
                self.out.stuck += 1;
                return;
            }
        }
        self.out.add_engine_stats(h.engine().stats());
        // Clean shutdown: everything acknowledged must come back exactly.
        if let Some(mut h) = self.shutdown_and_reopen(h, None) {
            self.verify_all(&mut h);
            self.end_incarnation(&h);
        }
    }

    /// Whether a request has waited past [`LIVENESS_NS`].
    fn overdue(&self, h: &Harness) -> bool {
        self.pending
            .iter()
            .find(|(_, p)| h.now > p.since + LIVENESS_NS)
            .inspect(|(req, p)| {
                self.note(|| {
                    format!(
                        "request {} ({}) pending for {} s",
                        req.0,
                        op_name(p.op),
                        (h.now - p.since) / 1_000_000_000
                    )
                })
            })
            .is_some()
    }

    /// The scrub of an incarnation opened from an image nothing damaged at
    /// rest must have found nothing (only logs a crash cannot have torn
    /// are replayed unchecked). Checked when the incarnation ends, since
    /// the workload may go on while the scrub runs.
    fn end_incarnation(&mut self, h: &Harness) {
        // (Quarantined blocks carried on with are found again after a crash.)
        if self.undamaged && self.damaged.is_empty() {
            self.expect_no_damage_found(h);
        }
    }

    /// After a recovery: half the time every sector is read back first
    /// (which waits for the scrub); otherwise the workload goes on at once
    /// and each sector's first read says what survived.
    fn after_recovery(&mut self, h: &mut Harness) {
        self.forget_survivors();
        self.note(|| {
            let st = h.engine().status();
            format!(
                "recovered: next log {} durable {} written back {} unchecked {}",
                st.next_segment_id, st.last_flushed_id, st.last_writeback_id, st.unchecked_logs
            )
        });
        if self.rng.random_bool(0.5) {
            self.verify_all(h);
        } else {
            self.out.undrained_restarts += 1;
        }
    }

    /// After a recovery nothing is known of what survived until a sector is
    /// read (a read-back may not reach every sector: a damaged block fails).
    fn forget_survivors(&mut self) {
        for s in &mut self.sectors {
            s.unknown = true;
        }
    }

    /// A clean restart at a crash point: the requests in flight end, then
    /// the engine shuts down, or the power fails part way through that.
    fn restart(&mut self, mut h: Harness) -> Option<Harness> {
        while !self.pending.is_empty() {
            if !h.step() || self.overdue(&h) {
                self.note(|| "requests never ended before a restart".into());
                self.out.stuck += 1;
                return None;
            }
            self.collect(&mut h);
        }
        let budget = self
            .rng
            .random_bool(0.5)
            .then(|| self.rng.random_range(0..24u32));
        self.shutdown_and_reopen(h, budget)
    }

    /// Shuts the engine down and opens a new one over its images, checking
    /// every sector. With `crash_after`, the power fails after that many
    /// steps of the shutdown if it has not completed: a half-written
    /// checkpoint, or one whose record never came, must not be trusted.
    fn shutdown_and_reopen(&mut self, mut h: Harness, crash_after: Option<u32>) -> Option<Harness> {
        h.driver.engine_mut().shutdown(h.now);
        h.drain();
        let mut steps = 0u32;
        let started = h.now;
        while !h.shut_down {
            if crash_after.is_some_and(|n| steps >= n) {
                self.out.shutdown_crashes += 1;
                return self.crash_and_recover(h);
            }
            if !h.step() || h.now > started + LIVENESS_NS {
                self.note(|| "shutdown never completed".into());
                self.out.stuck += 1;
                return None;
            }
            steps += 1;
        }
        self.end_incarnation(&h);
        let pool = h
            .pmem
            .as_ref()
            .map(|p| SimPmem::from_image(p.crash(&mut self.rng)));
        let st = h.engine().status();
        let read_only = st.read_only || st.backing_writes_lost;
        self.note(|| {
            format!(
                "shut down: read_only {} backing_writes_lost {}",
                st.read_only, st.backing_writes_lost
            )
        });
        let mut images = h.crash(&mut self.rng);
        let lie = (self.opts.corruption_rate > 0.0
            && self.rng.random_bool(self.opts.corruption_rate))
        .then(|| {
            let lie = corrupt::Lie::ALL[self.rng.random_range(0..corrupt::Lie::ALL.len())];
            corrupt::lie_in_checkpoint(&mut images.0, self.params.cache_size, lie, &mut self.rng)
        })
        .flatten();
        // After a cache-device failure nothing more could be made durable,
        // and after a failed backing flush writes that bypassed the cache
        // may be gone, so only durable writes are owed; otherwise every
        // acknowledged one.
        if !read_only {
            // (A sector not read since a recovery keeps its choices.)
            for s in &mut self.sectors {
                if s.cur != WILD && !s.unknown {
                    s.durable = s.cur;
                    s.later.clear();
                }
            }
        }
        self.acked_unflushed.clear();
        self.flushes.clear();
        let mut h = self.harness(
            SimDevice::from_image(images.0),
            SimDevice::from_image(images.1),
            pool,
        )?;
        self.out.clean_restarts += 1;
        self.out.checkpoints_loaded += h.engine().stats().checkpoints_loaded;
        if let Some(lie) = lie {
            self.out.lying_checkpoints += 1;
            if h.engine().stats().checkpoints_loaded > 0 {
                self.out.trusted_lies += 1;
                self.note(|| format!("start-up trusted a checkpoint that lied ({lie:?})"));
            }
        }
        self.undamaged = true;
        self.after_recovery(&mut h);
        Some(h)
    }

    fn overlaps(&self, first: u64, count: u64) -> bool {
        self.pending
            .values()
            .any(|p| p.op != Op::Flush && first < p.first + p.count && p.first < first + count)
    }

    fn submit_one(&mut self, h: &mut Harness) -> bool {
        let nsec = self.sectors.len() as u64;
        // Now and then, operator actions while I/O runs.
        if self.rng.random_bool(0.005) {
            h.driver.engine_mut().drop_caches(h.now);
        }
        if self.rng.random_bool(0.005) {
            let (name, _, max) = TUNABLE_RANGES[self.rng.random_range(0..TUNABLE_RANGES.len())];
            let value = self.rng.random_range(0..=max.min(128));
            // Out-of-range values are drawn too: those are refused.
            let mut t = *h.engine().tunables();
            if t.set(name, value).is_ok() {
                let now = h.now;
                let _ = h.driver.engine_mut().set_options(t, now);
            }
        }
        h.drain();
        let roll = self.rng.random_range(0..100);
        let op = match roll {
            0..=54 => Op::Write {
                fua: self.rng.random_bool(0.2),
            },
            55..=79 => Op::Read,
            80..=89 => Op::Flush,
            90..=94 => Op::Discard,
            _ => Op::Zeroes,
        };
        let count = match self.rng.random_range(0..10) {
            0..=5 => self.rng.random_range(1..=8),
            6..=8 => 8 * self.rng.random_range(1..=16),
            _ => 8 * self.rng.random_range(16..=64),
        }
        .min(nsec);
        // Hot spots make overwrites and partial-block merges frequent, and
        // a quarantined block draws the application back to it.
        let first = if !self.damaged.is_empty() && self.rng.random_bool(0.2) {
            let b = *self
                .damaged
                .iter()
                .nth(self.rng.random_range(0..self.damaged.len()))
                .expect("a damaged block");
            (b * 8 + self.rng.random_range(0..8)).min(nsec - count)
        } else if self.rng.random_bool(0.5) {
            self.rng.random_range(0..=(nsec / 8).saturating_sub(count))
        } else {
            self.rng.random_range(0..=nsec - count)
        };
        let first = if count >= 8 && self.rng.random_bool(0.7) {
            first / 8 * 8
        } else {
            first
        };
        if op != Op::Flush && self.overlaps(first, count) {
            return false;
        }
        if let Some(t) = trace_sector()
            && op != Op::Flush
            && (first..first + count).contains(&t)
        {
            let desc = h.engine().describe_block(t / 8);
            eprintln!(
                "t={} submit req {} {:?} [{first}+{count}) wid {} | before: {desc}",
                h.now,
                self.next_req,
                op_name(op),
                self.next_write
            );
        }
        let req = ReqId(self.next_req);
        self.next_req += 1;
        let (off, len) = (first * SECTOR as u64, count * SECTOR as u64);
        let now = h.now;
        let mut write_id = 0;
        let res = match op {
            Op::Write { fua } => {
                write_id = self.next_write;
                self.next_write += 1;
                let mut data = vec![0u8; len as usize];
                content::fill(&mut data, write_id, first);
                for s in first..first + count {
                    self.sectors[s as usize].later.push(write_id);
                }
                h.submit_write(req, off, data, fua)
            }
            Op::Zeroes => {
                write_id = self.next_write;
                self.next_write += 1;
                for s in first..first + count {
                    self.sectors[s as usize].later.push(ZERO | write_id);
                }
                h.driver.submit(
                    req,
                    UserOp::WriteZeroes { offset: off, len },
                    Vec::new(),
                    now,
                )
            }
            Op::Discard => {
                for s in first..first + count {
                    let st = &mut self.sectors[s as usize];
                    st.wild_since = Some(self.next_write);
                    st.cur = WILD;
                    st.discarded = true;
                }
                h.driver
                    .submit(req, UserOp::Discard { offset: off, len }, Vec::new(), now)
            }
            Op::Read => {
                let buf = vec![0u8; len as usize];
                h.driver
                    .submit(req, UserOp::Read { offset: off, len }, buf, now)
            }
            Op::Flush => {
                self.flushes
                    .push_back((req, std::mem::take(&mut self.acked_unflushed)));
                h.driver.submit(req, UserOp::Flush, Vec::new(), now)
            }
        };
        if let Err((e, _)) = res {
            self.note(|| format!("submit refused: {e}"));
            self.out.stuck += 1;
            return false;
        }
        self.pending.insert(
            req,
            Pending {
                op,
                first,
                count,
                write_id,
                since: h.now,
            },
        );
        h.drain();
        self.collect(h);
        true
    }

    fn collect(&mut self, h: &mut Harness) {
        self.out.refused_publications += std::mem::take(&mut h.refused_publications);
        if let Err(e) = h.engine().check_invariants() {
            self.out.corrupt_reads += 1;
            if self.opts.verbose {
                eprintln!(
                    "seed {}: t={} engine invariant broken: {e}",
                    self.opts.seed, h.now
                );
            }
        }
        for (req, result, buf) in std::mem::take(&mut h.done) {
            let p = self.pending.remove(&req).expect("known request");
            if let Some(t) = trace_sector()
                && p.op != Op::Flush
                && (p.first..p.first + p.count).contains(&t)
            {
                let desc = h.engine().describe_block(t / 8);
                let st = h.engine().status();
                eprintln!(
                    "t={} done req {} {:?} {result:?} | after: {desc} | durable {} wb {} recorded {}",
                    h.now,
                    req.0,
                    op_name(p.op),
                    st.last_flushed_id,
                    st.last_writeback_id,
                    st.recorded_writeback_id
                );
            }
            if let Err(e) = result {
                self.out.io_errors += 1;
                self.note(|| format!("request {req:?} failed: {e}"));
                if e == IoError::Corrupt && !self.may_be_damaged(p.first, p.count) {
                    self.out.false_corruption += 1;
                    self.note(|| format!("request {req:?} failed as damaged, yet nothing is"));
                }
                if p.op == Op::Flush {
                    // What it covered is not durable, and no later flush
                    // can make it so.
                    self.out.failed_flushes += 1;
                    self.flushes.retain(|(r, _)| *r != req);
                    continue;
                }
                for s in p.first..p.first + p.count {
                    let st = &mut self.sectors[s as usize];
                    st.cur = WILD;
                    st.wild_since.get_or_insert(p.write_id.max(1));
                }
                continue;
            }
            match p.op {
                Op::Write { fua } => self.acked_write(p.write_id, p.first, p.count, fua),
                Op::Zeroes => {
                    self.acked_write_as(p.write_id, ZERO | p.write_id, p.first, p.count);
                    if self.persistent {
                        self.make_durable(ZERO | p.write_id, p.first, p.count);
                    }
                }
                Op::Read => self.check_read(h, p.first, &buf),
                Op::Flush => {
                    let Some(pos) = self.flushes.iter().position(|(r, _)| *r == req) else {
                        continue;
                    };
                    for (_, writes) in self.flushes.drain(..=pos).collect::<Vec<_>>() {
                        for (id, first, count) in writes {
                            self.make_durable(id, first, count);
                        }
                    }
                }
                Op::Discard => {}
            }
        }
    }

    /// Whether a block of sectors `first..first + count` was damaged at rest.
    fn may_be_damaged(&self, first: u64, count: u64) -> bool {
        (first / 8..=(first + count - 1) / 8).any(|b| self.damaged.contains(&b))
    }

    fn acked_write(&mut self, id: u64, first: u64, count: u64, fua: bool) {
        self.acked_write_as(id, id, first, count);
        // In mode 1 every acknowledged write is durable.
        if fua || self.persistent {
            self.make_durable(id, first, count);
        }
    }

    /// Write `id` (whose sectors hold `version`) was acknowledged.
    fn acked_write_as(&mut self, id: u64, version: u64, first: u64, count: u64) {
        for s in first..first + count {
            let st = &mut self.sectors[s as usize];
            st.cur = version;
            st.discarded = false;
            st.unknown = false;
        }
        let _ = id;
        self.acked_unflushed.push((version, first, count));
    }

    fn make_durable(&mut self, version: u64, first: u64, count: u64) {
        for s in first..first + count {
            let st = &mut self.sectors[s as usize];
            if let Some(i) = st.later.iter().position(|&v| v == version) {
                st.later.drain(..=i);
                st.durable = version;
                if st.wild_since.is_some_and(|w| version & !ZERO >= w) {
                    st.wild_since = None;
                }
            }
        }
    }

    fn check_read(&mut self, h: &Harness, first: u64, buf: &[u8]) {
        for (i, sector) in buf.chunks(SECTOR).enumerate() {
            let lba = first + i as u64;
            if self.sectors[lba as usize].unknown {
                self.settle(h, lba, sector);
                continue;
            }
            let got = content::decode(sector, lba);
            let want = self.sectors[lba as usize].cur;
            let ok = match got {
                Version::Garbage => false,
                _ if want == WILD => true,
                Version::Zero => is_zero(want),
                Version::Write(id) => id == want,
            };
            if !ok {
                self.out.corrupt_reads += 1;
                self.note(|| {
                    format!("read of sector {lba} returned {got:?}, expected version {want}")
                });
            }
        }
    }

    fn crash_and_recover(&mut self, h: Harness) -> Option<Harness> {
        self.end_incarnation(&h);
        self.out.crashes += 1;
        self.out.add_engine_stats(h.engine().stats());
        let pool = h
            .pmem
            .as_ref()
            .map(|p| SimPmem::from_image(p.crash(&mut self.rng)));
        // Each crash keeps unflushed writes its own way, chosen by the seed.
        let outcome = CrashOutcome::pick(&mut self.rng);
        // ALL lists the outcomes in declaration order.
        self.out.crash_outcomes[outcome as usize] += 1;
        let (mut cache, backing) = h.crash_as(outcome, &mut self.rng);
        self.pending.clear();
        self.acked_unflushed.clear();
        self.flushes.clear();
        let damage =
            self.opts.corruption_rate > 0.0 && self.rng.random_bool(self.opts.corruption_rate);
        let injected = if damage {
            corrupt::inject(&mut cache, self.params.cache_size, &mut self.rng)
        } else {
            None
        };
        let damaged = injected.is_some();
        let mut h = match injected {
            None => self.harness(
                SimDevice::from_image(cache),
                SimDevice::from_image(backing),
                pool,
            )?,
            Some(inj) => self.recover_damaged(inj, cache, backing, pool)?,
        };
        self.undamaged = !damaged;
        if damaged {
            self.forget_survivors();
            self.verify_all(&mut h);
        } else {
            self.after_recovery(&mut h);
        }
        Some(h)
    }

    /// After a recovery from an image nothing damaged at rest, the scrub
    /// (which the read-back waited for) must have found every replayed log
    /// whole: only logs a crash cannot have torn are replayed unchecked.
    fn expect_no_damage_found(&mut self, h: &Harness) {
        let found = h.engine().stats().corrupt_blocks_found;
        if found > 0 {
            self.out.false_corruption += 1;
            self.note(|| format!("the scrub found {found} damaged blocks no fault injected"));
        }
    }

    /// Recovery over an image with one durable log damaged must refuse to
    /// open; a salvage then opens it, and only that log's blocks may read
    /// as older contents.
    fn recover_damaged(
        &mut self,
        inj: Injected,
        cache: Vec<u8>,
        backing: Vec<u8>,
        pool: Option<SimPmem>,
    ) -> Option<Harness> {
        self.out.corruptions[inj.fault as usize] += 1;
        self.damaged.extend(inj.blocks.iter().copied());
        self.note(|| format!("{} in durable log {}", inj.fault.name(), inj.log));
        let pool_image = pool.map(|p| p.crash(&mut self.rng));
        let pool = || pool_image.clone().map(SimPmem::from_image);
        let first = self.open(
            SimDevice::from_image(cache.clone()),
            SimDevice::from_image(backing.clone()),
            pool(),
            false,
        );
        let (cache, backing, pool_image) = match first {
            // Damage to data alone, or any damage under a clean shutdown's
            // checkpoint (which replaces reading the headers), is the
            // scrub's to find.
            Ok(h) if inj.in_data || h.engine().stats().checkpoints_loaded > 0 => {
                // Its header is intact, so the log was replayed and its data
                // is checked lazily: a read waits for the scrub, and a
                // damaged copy fails instead of reading back.
                match self.scrub_after_open(h) {
                    Ok(h) => {
                        // Damage nothing needed, or damage carried on with
                        // (quarantined), stays on the device: a recovery
                        // that replays the log's header may report it.
                        self.latent = Some((inj.log, inj.blocks));
                        return Some(h);
                    }
                    Err(images) => images,
                }
            }
            Ok(h) => {
                // Opened as if the damage were a torn tail: whatever it
                // dropped is counted as lost by the read-back.
                self.out.silent_truncations += 1;
                return Some(h);
            }
            Err((Some(OpenError::Corrupt { .. }), _)) => {
                self.out.corruption_detected += 1;
                (cache, backing, pool_image)
            }
            Err(_) => {
                self.out.stuck += 1;
                return None;
            }
        };
        let pool = || pool_image.clone().map(SimPmem::from_image);
        self.make_wild(&inj.blocks);
        match self.open(
            SimDevice::from_image(cache),
            SimDevice::from_image(backing),
            pool(),
            true,
        ) {
            Ok(h) => Some(h),
            Err(_) => {
                self.out.stuck += 1;
                None
            }
        }
    }

    /// After an open over damaged data: reads everything back (each read
    /// of an unchecked log waits for the scrub; a damaged copy must fail,
    /// never read back). If the scrub reported corrupt blocks, the engine
    /// is crashed and its images come back for a salvage; if it found
    /// nothing, the damage was in a copy nothing needs.
    #[allow(clippy::type_complexity)]
    fn scrub_after_open(
        &mut self,
        mut h: Harness,
    ) -> Result<Harness, (Vec<u8>, Vec<u8>, Option<Vec<u8>>)> {
        self.forget_survivors();
        self.verify_all(&mut h);
        let corrupt = h.engine().status().corrupt_blocks;
        if corrupt == 0 {
            self.out.damage_unused += 1;
            return Ok(h);
        }
        self.out.corruption_detected += 1;
        self.out.found_by_scrub += 1;
        if self.rng.random_bool(0.5) {
            // The damaged blocks are quarantined: the workload goes on with
            // them (their reads fail until they are rewritten whole).
            self.out.quarantined_runs += 1;
            self.note(|| format!("the scrub found {corrupt} corrupt blocks: carry on"));
            return Ok(h);
        }
        self.note(|| format!("the scrub found {corrupt} corrupt blocks: salvage"));
        let pool = h.pmem.as_ref().map(|p| p.crash(&mut self.rng));
        let outcome = CrashOutcome::pick(&mut self.rng);
        let (cache, backing) = h.crash_as(outcome, &mut self.rng);
        self.pending.clear();
        self.acked_unflushed.clear();
        self.flushes.clear();
        Err((cache, backing, pool))
    }

    /// Reads the whole device through the engine and checks every sector
    /// against what may have survived; the result becomes the new baseline.
    fn verify_all(&mut self, h: &mut Harness) {
        let nsec = self.sectors.len() as u64;
        for first in (0..nsec).step_by(128) {
            if !self.verify_range(h, first, 128.min(nsec - first)) {
                return;
            }
        }
    }

    /// Reads sectors `first..first + count` back and settles each; false
    /// if the engine stopped answering.
    fn verify_range(&mut self, h: &mut Harness, first: u64, count: u64) -> bool {
        let req = ReqId(self.next_req);
        self.next_req += 1;
        let buf = vec![0u8; (count * SECTOR as u64) as usize];
        let op = UserOp::Read {
            offset: first * SECTOR as u64,
            len: count * SECTOR as u64,
        };
        if h.driver.submit(req, op, buf, h.now).is_err() {
            self.out.stuck += 1;
            return false;
        }
        h.drain();
        let since = h.now;
        while h.done.is_empty() {
            if !h.step() || h.now > since + LIVENESS_NS {
                self.note(|| "verification read never completed".into());
                self.out.stuck += 1;
                return false;
            }
        }
        let (_, result, buf) = h.done.remove(0);
        match result {
            Ok(()) => {
                for (i, sector) in buf.chunks(SECTOR).enumerate() {
                    self.settle(h, first + i as u64, sector);
                }
                true
            }
            Err(e) => {
                self.out.io_errors += 1;
                if e == IoError::Corrupt && !self.may_be_damaged(first, count) {
                    self.out.false_corruption += 1;
                    self.note(|| format!("read-back of {first}+{count} failed as damaged"));
                }
                if count > 8 && e == IoError::Corrupt {
                    // A quarantined block fails the whole read: the rest is
                    // read block by block.
                    for b in (first..first + count).step_by(8) {
                        if !self.verify_range(h, b, 8.min(first + count - b)) {
                            return false;
                        }
                    }
                }
                true
            }
        }
    }

    /// Checks sector `lba`, read back after a recovery, against what may
    /// have survived; the result becomes its new baseline.
    fn settle(&mut self, h: &Harness, lba: u64, sector: &[u8]) {
        let got = content::decode(sector, lba);
        let st = &mut self.sectors[lba as usize];
        let version = match got {
            Version::Garbage => {
                self.out.corrupt_reads += 1;
                if self.opts.verbose {
                    let id = u64::from_le_bytes(sector[..8].try_into().expect("8"));
                    let at = u64::from_le_bytes(sector[8..16].try_into().expect("8"));
                    eprintln!(
                        "seed {}: sector {lba} is garbage after recovery (header says write {id} \
                         lba {at}); {}",
                        self.opts.seed,
                        h.engine().describe_block(lba / 8)
                    );
                }
                return;
            }
            Version::Zero => None,
            Version::Write(id) => Some(id),
        };
        let matches = |v: u64| match version {
            None => is_zero(v),
            Some(id) => v == id,
        };
        // What the recovery kept: the durable version or one submitted
        // before it. A version submitted since (by a write that failed, or
        // is not acknowledged yet) may be read too, but is not durable.
        let mark = self.recovery_mark;
        let kept = matches(st.durable) || st.later.iter().any(|&v| v & !ZERO < mark && matches(v));
        let since = st.later.iter().any(|&v| v & !ZERO >= mark && matches(v));
        let allowed = kept || since || st.wild_since.is_some();
        let v = version.unwrap_or(0);
        if since {
            // A version written since may be what was read (zeroes of a
            // failed write-zeroes and recovered zeroes look alike): still
            // unknown what the recovery kept.
            if !st.discarded {
                st.cur = v;
            }
            return;
        }
        if !allowed {
            let older = v < st.durable & !ZERO || (version.is_none() && !is_zero(st.durable));
            if older {
                self.out.acknowledged_lost += 1;
            } else {
                self.out.corrupt_reads += 1;
            }
            if self.opts.verbose {
                eprintln!(
                    "seed {}: sector {lba} read version {v}, durable {} later {:?} ({})",
                    self.opts.seed,
                    st.durable,
                    st.later,
                    h.engine().describe_block(lba / 8)
                );
            }
        }
        st.durable = v;
        st.later.retain(|&w| w & !ZERO >= mark);
        st.unknown = false;
        if !st.discarded {
            st.cur = v;
            st.wild_since = None;
        }
    }
}

fn trace_sector() -> Option<u64> {
    std::env::var("WB_TRACE_SECTOR")
        .ok()
        .and_then(|v| v.parse().ok())
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Read => "read",
        Op::Write { fua: true } => "write+fua",
        Op::Write { fua: false } => "write",
        Op::Zeroes => "zeroes",
        Op::Discard => "discard",
        Op::Flush => "flush",
    }
}
