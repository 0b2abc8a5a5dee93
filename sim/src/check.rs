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
use writeboost_engine::{BackingIdentity, OpenError, OpenParams, ReqId, Tunables};

use crate::content::{self, SECTOR, Version};
use crate::corrupt::{self, Injected};
use crate::device::{CrashOutcome, SimDevice};
use crate::harness::{Harness, Latency};
use crate::pmem::SimPmem;
use writeboost_engine::mutant::Mutant;

/// Share of crashes that also damage a durable log, unless told otherwise.
pub const DEFAULT_CORRUPTION_RATE: f64 = 0.1;
pub const DEFAULT_RESTART_RATE: f64 = 0.25;

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
    /// data: a log replayed from its header that a crash had torn.
    pub false_corruption: u64,
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
    }

    pub fn clean(&self) -> bool {
        self.acknowledged_lost == 0
            && self.corrupt_reads == 0
            && self.stuck == 0
            && self.silent_truncations == 0
            && self.false_corruption == 0
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
}

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
}

/// Runs one seed: workload, crashes, recoveries, clean shutdown, checks.
pub fn run_seed(opts: &SimOptions) -> Outcome {
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let seg = [64u64 << 10, 128 << 10][rng.random_range(0..2)];
    let cache_size = seg * rng.random_range(5..=16);
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
    };
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
    let lat = Latency {
        cache_read: 20_000,
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
        match self.open(cache, backing, pool, false) {
            Ok(h) => Some(h),
            Err(_) => {
                self.out.stuck += 1;
                None
            }
        }
    }

    /// Opens an engine over these devices; `Err(None)` if it never answered.
    fn open(
        &mut self,
        cache: SimDevice,
        backing: SimDevice,
        pool: Option<SimPmem>,
        salvage: bool,
    ) -> Result<Harness, Option<OpenError>> {
        self.persistent = match self.mode {
            ModeChoice::Pmem => true,
            ModeChoice::Mixed => self.rng.random_bool(0.5),
            _ => false,
        };
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
        let persistent = self.persistent;
        self.note(|| format!("(re)open in mode {}", persistent as u8));
        h.error_rate = self.opts.error_rate;
        if !h.wait_open() {
            self.note(|| "reopen never completed".into());
            return Err(None);
        }
        match h.opened.take() {
            Some(Err(e)) => {
                self.note(|| format!("reopen failed: {e}"));
                Err(Some(e))
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
        let mut issued = 0u64;
        loop {
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
            if !h.step() {
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
        let st = h.engine().stats().clone();
        self.out.partial_logs += st.nr_partial_flushed;
        self.out.logs += st.nr_logs;
        // Clean shutdown: everything acknowledged must come back exactly.
        self.shutdown_and_reopen(h, None);
    }

    /// A clean restart at a crash point: the requests in flight end, then
    /// the engine shuts down, or the power fails part way through that.
    fn restart(&mut self, mut h: Harness) -> Option<Harness> {
        while !self.pending.is_empty() {
            if !h.step() {
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
        while !h.shut_down {
            if crash_after.is_some_and(|n| steps >= n) {
                self.out.shutdown_crashes += 1;
                return self.crash_and_recover(h);
            }
            if !h.step() {
                self.note(|| "shutdown never completed".into());
                self.out.stuck += 1;
                return None;
            }
            steps += 1;
        }
        let pool = h
            .pmem
            .as_ref()
            .map(|p| SimPmem::from_image(p.crash(&mut self.rng)));
        let read_only = h.engine().is_read_only();
        let images = h.crash(&mut self.rng);
        // After a cache-device failure nothing more could be made durable,
        // so only durable writes are owed; otherwise every acknowledged one.
        if !read_only {
            for s in &mut self.sectors {
                if s.cur != WILD {
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
        self.verify_all(&mut h);
        self.expect_no_damage_found(&h);
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
        // Hot spots make overwrites and partial-block merges frequent.
        let first = if self.rng.random_bool(0.5) {
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
                h.driver
                    .submit(req, UserOp::Write { offset: off, fua }, data, now)
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
            },
        );
        h.drain();
        self.collect(h);
        true
    }

    fn collect(&mut self, h: &mut Harness) {
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
                Op::Read => self.check_read(p.first, &buf),
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

    fn check_read(&mut self, first: u64, buf: &[u8]) {
        for (i, sector) in buf.chunks(SECTOR).enumerate() {
            let lba = first + i as u64;
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
        self.out.crashes += 1;
        self.out.partial_logs += h.engine().stats().nr_partial_flushed;
        self.out.logs += h.engine().stats().nr_logs;
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
        self.verify_all(&mut h);
        if !damaged {
            self.expect_no_damage_found(&h);
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
                    Ok(h) => return Some(h),
                    Err(images) => images,
                }
            }
            Ok(h) => {
                // Opened as if the damage were a torn tail: whatever it
                // dropped is counted as lost by the read-back.
                self.out.silent_truncations += 1;
                return Some(h);
            }
            Err(Some(OpenError::Corrupt { .. })) => {
                self.out.corruption_detected += 1;
                (cache, backing, pool_image)
            }
            Err(_) => {
                self.out.stuck += 1;
                return None;
            }
        };
        let pool = || pool_image.clone().map(SimPmem::from_image);
        let nsec = self.sectors.len() as u64;
        for b in inj.blocks {
            for s in b * 8..(b * 8 + 8).min(nsec) {
                self.sectors[s as usize].wild_since = Some(0);
            }
        }
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
        self.verify_all(&mut h);
        let corrupt = h.engine().status().corrupt_blocks;
        if corrupt == 0 {
            self.out.damage_unused += 1;
            return Ok(h);
        }
        self.out.corruption_detected += 1;
        self.out.found_by_scrub += 1;
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
        let chunk = 128u64;
        for first in (0..nsec).step_by(chunk as usize) {
            let req = ReqId(self.next_req);
            self.next_req += 1;
            let count = chunk.min(nsec - first);
            let buf = vec![0u8; (count * SECTOR as u64) as usize];
            let op = UserOp::Read {
                offset: first * SECTOR as u64,
                len: count * SECTOR as u64,
            };
            if h.driver.submit(req, op, buf, h.now).is_err() {
                self.out.stuck += 1;
                return;
            }
            h.drain();
            while h.done.is_empty() {
                if !h.step() {
                    self.note(|| "verification read never completed".into());
                    self.out.stuck += 1;
                    return;
                }
            }
            let (_, result, buf) = h.done.remove(0);
            if result.is_err() {
                self.out.io_errors += 1;
                continue;
            }
            for (i, sector) in buf.chunks(SECTOR).enumerate() {
                let lba = first + i as u64;
                let got = content::decode(sector, lba);
                let st = &mut self.sectors[lba as usize];
                let version = match got {
                    Version::Garbage => {
                        self.out.corrupt_reads += 1;
                        let id = u64::from_le_bytes(sector[..8].try_into().expect("8"));
                        let at = u64::from_le_bytes(sector[8..16].try_into().expect("8"));
                        let where_ = h.engine().describe_block(lba / 8);
                        let msg = format!(
                            "sector {lba} is garbage after recovery (header says write {id} lba {at}); {where_}"
                        );
                        if self.opts.verbose {
                            eprintln!("seed {}: {msg}", self.opts.seed);
                        }
                        continue;
                    }
                    Version::Zero => None,
                    Version::Write(id) => Some(id),
                };
                let matches = |v: u64| match version {
                    None => is_zero(v),
                    Some(id) => v == id,
                };
                let allowed = matches(st.durable)
                    || st.later.iter().any(|&v| matches(v))
                    || st.wild_since.is_some();
                let v = version.unwrap_or(0);
                if !allowed {
                    let older =
                        v < st.durable & !ZERO || (version.is_none() && !is_zero(st.durable));
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
                st.later.clear();
                if !st.discarded {
                    st.cur = v;
                    st.wild_since = None;
                }
            }
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
