//! Benchmarks on simulated devices.
//!
//! `wb-bench engine`: the engine alone on devices that complete every command
//! at once and store nothing, so the figures are the engine's own CPU cost
//! (including copying user data into the log buffer). One thread = one core.
//! Its `granted-randwrite` workload is the engine thread's share when the
//! submitting cores copy the data and take its checksum themselves (write
//! grants): the metadata work alone.
//!
//! `wb-bench pressure`: random writes at a queue depth over a working set,
//! on simulated devices with a slow, IOPS-limited backing device, timed in
//! simulated time: how the engine frees ring space (cleaning, writeback,
//! writes around the cache), not its CPU cost.

use std::time::Instant;

use clap::{Parser, Subcommand};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use writeboost_engine::config::BufferMode;
use writeboost_engine::{BackingIdentity, Engine, Event, HeapAlloc, Nanos, OpenParams, ReqId};
use writeboost_sim::device::SimDevice;
use writeboost_sim::harness::{Harness, Latency};
use writeboost_sim::pmem::SimPmem;

#[derive(Parser)]
#[command(about = "writeboost benchmarks on simulated devices")]
struct Args {
    #[command(subcommand)]
    what: Option<What>,
}

#[derive(Subcommand)]
enum What {
    /// Engine-only throughput: 4 KiB random writes (copied by the engine,
    /// and through write grants, copied elsewhere), 4 KiB read hits, FUA
    /// writes at QD1.
    Engine {
        /// Operations per workload.
        #[arg(long, default_value_t = 2_000_000)]
        ops: u64,
        /// Run only this workload (randwrite, granted-randwrite, read-hit, fua-qd1).
        #[arg(long)]
        only: Option<String>,
    },
    /// One writer, 4 KiB FUA writes at queue depth 1 (the volatile buffer's
    /// worst case), on simulated devices with realistic latency: mode 0 with
    /// the default barrier deadline and with 0, and mode 1.
    FuaQd1 {
        #[arg(long, default_value_t = 5000)]
        writes: u64,
        /// Cache-device write latency (µs).
        #[arg(long, default_value_t = 20)]
        ssd_write_us: u64,
        /// Cache-device flush latency (µs).
        #[arg(long, default_value_t = 50)]
        ssd_flush_us: u64,
        /// Persisting 4 KiB to pmem (µs).
        #[arg(long, default_value_t = 1.0)]
        pmem_persist_us: f64,
        /// Also run mode 1 on this pool file mapped with PMDK (created or
        /// resized to the size needed); its real store and persist time counts.
        #[arg(long)]
        pmem_file: Option<std::path::PathBuf>,
    },
    /// Random 4 KiB writes at a queue depth over a working set, with a slow
    /// backing device (latency and an IOPS limit), in simulated time.
    Pressure {
        #[arg(long, default_value_t = 256)]
        cache_mib: u64,
        #[arg(long, default_value_t = 128)]
        working_set_mib: u64,
        #[arg(long, default_value_t = 2048)]
        backing_mib: u64,
        #[arg(long, default_value_t = 32)]
        qd: u64,
        #[arg(long, default_value_t = 2_000_000)]
        writes: u64,
        #[arg(long, default_value_t = 2000)]
        backing_write_us: u64,
        #[arg(long, default_value_t = 2000)]
        backing_iops: u64,
        #[arg(long, default_value_t = 20)]
        cache_write_us: u64,
        /// Mode 1 (a simulated pmem pool) instead of mode 0.
        #[arg(long)]
        pmem: bool,
        /// Writes first over this many MiB (not measured), as a burst
        /// over a hot set leaves the cache before a larger working set.
        #[arg(long, default_value_t = 0)]
        warmup_mib: u64,
        #[arg(long, default_value_t = 0)]
        warmup_writes: u64,
        /// Tunables as NAME=VALUE.
        #[arg(long = "set", value_parser = parse_kv)]
        set: Vec<(String, u64)>,
    },
}

fn parse_kv(s: &str) -> Result<(String, u64), String> {
    let (k, v) = s.split_once('=').ok_or("expected NAME=VALUE")?;
    Ok((k.to_string(), v.parse().map_err(|e| format!("{e}"))?))
}

#[allow(clippy::too_many_arguments)]
fn pressure(
    cache_mib: u64,
    working_set_mib: u64,
    backing_mib: u64,
    qd: u64,
    writes: u64,
    lat: Latency,
    backing_iops: u64,
    pmem: bool,
    warmup: (u64, u64),
    set: &[(String, u64)],
) {
    let mut p = OpenParams::new(
        cache_mib << 20,
        BackingIdentity {
            uuid: [1; 16],
            size: backing_mib << 20,
        },
        [2; 16],
    );
    for (k, v) in set {
        p.tunables.set(k, *v).expect("valid tunable");
    }
    let (cache, backing) = (
        SimDevice::new(cache_mib << 20),
        SimDevice::new(backing_mib << 20),
    );
    let mut h = if pmem {
        p.mode = BufferMode::Persistent;
        let geo = writeboost_engine::geometry::Geometry::new(
            p.segment_size,
            p.cache_size,
            p.backing.size,
        )
        .expect("geometry");
        let slot = writeboost_engine::pmem::PoolLayout::new(u64::MAX / 2, &geo)
            .expect("layout")
            .slot_size;
        let pool = SimPmem::new(4096 + slot * (p.nr_buffers as u64 + 1));
        Harness::with_pool(p, cache, backing, Some(pool), lat, 1)
    } else {
        Harness::new(p, cache, backing, lat, 1)
    };
    assert!(h.wait_open(), "open");
    h.limit_backing_iops(backing_iops);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    if warmup.1 > 0 {
        qd_writes(
            &mut h,
            &mut rng,
            (warmup.0 << 20) / 4096,
            warmup.1,
            qd,
            1 << 40,
        );
    }
    h.driver.engine_mut().clear_stats();
    let start = h.now;
    let mut lats = qd_writes(
        &mut h,
        &mut rng,
        (working_set_mib << 20) / 4096,
        writes,
        qd,
        0,
    );
    let secs = (h.now - start) as f64 / 1e9;
    lats.sort_unstable();
    let pct = |q: f64| lats[((q * lats.len() as f64) as usize).min(lats.len() - 1)] as f64 / 1e6;
    let s = h.engine().stats();
    println!(
        "pressure {}: writes={writes} sim_secs={secs:.2} iops={:.0} p50_ms={:.2} p99_ms={:.2} p999_ms={:.2} max_ms={:.2} cache_wa={:.3} relocated={} writeback_blocks={} writeback_ios={} admission_bypasses={} throttled={} partial_logs={}/{}",
        if pmem { "mode1" } else { "mode0" },
        writes as f64 / secs,
        pct(0.5),
        pct(0.99),
        pct(0.999),
        pct(1.0),
        s.cache_write_amplification(),
        s.relocated_blocks,
        s.writeback_blocks,
        s.writeback_ios,
        s.admission_bypass_writes,
        s.throttled_writes,
        s.nr_partial_flushed,
        s.nr_logs,
    );
}

/// `writes` random 4 KiB writes over `blocks` blocks at queue depth `qd`,
/// request ids from `first_req`; their latencies in simulated ns.
fn qd_writes(
    h: &mut Harness,
    rng: &mut ChaCha8Rng,
    blocks: u64,
    writes: u64,
    qd: u64,
    first_req: u64,
) -> Vec<u64> {
    use writeboost_engine::driver::UserOp;
    let mut started = std::collections::HashMap::new();
    let mut lats = Vec::with_capacity(writes as usize);
    let (mut next, mut done) = (0u64, 0u64);
    while done < writes {
        while next < writes && next - done < qd {
            let off = rng.random_range(0..blocks) * 4096;
            h.driver
                .submit(
                    ReqId(first_req + next),
                    UserOp::Write {
                        offset: off,
                        fua: false,
                    },
                    vec![0x5a; 4096],
                    h.now,
                )
                .map_err(|(e, _)| e)
                .expect("submit");
            started.insert(first_req + next, h.now);
            next += 1;
        }
        h.drain();
        for (req, r, _) in std::mem::take(&mut h.done) {
            r.expect("write");
            lats.push(h.now - started.remove(&req.0).expect("started"));
            done += 1;
        }
        if next - done >= qd || next == writes {
            assert!(h.step(), "engine stuck");
        }
    }
    lats
}

struct FuaResult {
    median_ns: u64,
    p99_ns: u64,
    cache_writes_per_io: f64,
    cache_bytes_per_user_byte: f64,
    partial_logs: u64,
    logs: u64,
}

fn fua_run(pmem: bool, barrier_ms: u32, writes: u64, lat: Latency) -> FuaResult {
    fua_run_on(pmem, barrier_ms, writes, lat, None)
}

const POOL_LEN: u64 = 4096 + 4 * (12288 + 255 * 4096);

fn fua_run_on(
    pmem: bool,
    barrier_ms: u32,
    writes: u64,
    lat: Latency,
    file: Option<&std::path::Path>,
) -> FuaResult {
    const MIB: u64 = 1 << 20;
    let (cache, backing) = (256 * MIB, 1024 * MIB);
    let mut p = OpenParams::new(
        cache,
        BackingIdentity {
            uuid: [1; 16],
            size: backing,
        },
        [2; 16],
    );
    p.tunables.barrier_deadline_ms = barrier_ms;
    p.mode = if pmem {
        BufferMode::Persistent
    } else {
        BufferMode::Volatile
    };
    let mut h = match file {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(path)
                .expect("pool file");
            // A fresh pool every run: the benchmark formats its cache.
            f.set_len(0).expect("truncate pool");
            f.set_len(POOL_LEN).expect("size pool");
            let pool = writeboost_pmem::PmdkPool::open(path).expect("map pool");
            if !pool.is_dax() {
                eprintln!(
                    "fua-qd1: {} is not on a DAX filesystem: persistence relies on msync",
                    path.display()
                );
            }
            let clock = std::rc::Rc::new(std::cell::Cell::new(0));
            let timed = writeboost_sim::pmem::TimedPmem {
                inner: pool,
                clock: clock.clone(),
            };
            Harness::with_real_pool(
                p,
                SimDevice::new(cache),
                SimDevice::new(backing),
                Box::new(timed),
                clock,
                lat,
                1,
            )
        }
        None => {
            let pool = pmem.then(|| SimPmem::new(POOL_LEN));
            Harness::with_pool(
                p,
                SimDevice::new(cache),
                SimDevice::new(backing),
                pool,
                lat,
                1,
            )
        }
    };
    assert!(
        h.wait_open() && h.opened == Some(Ok(())),
        "open failed: {:?}",
        h.opened
    );
    h.driver.engine_mut().clear_stats();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let data = vec![0xa5u8; 4096];
    let mut lats = Vec::with_capacity(writes as usize);
    for i in 0..writes {
        let off = rng.random_range(0..backing / 4096) * 4096;
        let t0 = h.now;
        h.write(i + 1, off, &data, true).expect("write");
        lats.push(h.now - t0);
    }
    lats.sort_unstable();
    let s = h.engine().stats();
    FuaResult {
        median_ns: lats[lats.len() / 2],
        p99_ns: lats[lats.len() * 99 / 100],
        cache_writes_per_io: s.cache_write_cmds as f64 / writes as f64,
        cache_bytes_per_user_byte: s.cache_write_bytes as f64 / (writes * 4096) as f64,
        partial_logs: s.nr_partial_flushed,
        logs: s.nr_logs,
    }
}

fn fua_qd1(
    writes: u64,
    ssd_write_us: u64,
    ssd_flush_us: u64,
    pmem_persist_us: f64,
    file: Option<&std::path::Path>,
) {
    let lat = Latency {
        cache_read: 20_000,
        cache_write: ssd_write_us * 1000,
        cache_flush: ssd_flush_us * 1000,
        backing_read: 2_000_000,
        backing_write: 2_000_000,
        backing_flush: 5_000_000,
        pmem_persist_4k: (pmem_persist_us * 1000.0) as u64,
        jitter: false,
    };
    let mut runs = vec![
        ("volatile(barrier=10ms)", fua_run(false, 10, writes, lat)),
        ("volatile(barrier=0)", fua_run(false, 0, writes, lat)),
        ("pmem", fua_run(true, 10, writes, lat)),
    ];
    if let Some(f) = file {
        runs.push((
            "pmem(pmdk file)",
            fua_run_on(true, 10, writes, lat, Some(f)),
        ));
    }
    for (name, r) in &runs {
        println!(
            "fua-qd1 {name}: median_us={:.1} p99_us={:.1} cache_writes_per_io={:.4} cache_bytes_per_user_byte={:.3} partial_logs={}/{}",
            r.median_ns as f64 / 1000.0,
            r.p99_ns as f64 / 1000.0,
            r.cache_writes_per_io,
            r.cache_bytes_per_user_byte,
            r.partial_logs,
            r.logs
        );
    }
    // The volatile figures are those of barrier_deadline_ms=0, the faster of the two.
    let (v, p) = (&runs[1].1, &runs[2].1);
    println!(
        "fua-qd1: volatile_cache_writes_per_io={:.4} pmem_cache_writes_per_io={:.4} pmem_latency_ratio={:.4}",
        v.cache_writes_per_io,
        p.cache_writes_per_io,
        p.median_ns as f64 / v.median_ns as f64
    );
}

/// An engine on devices that finish every command immediately.
struct Bench {
    e: Engine<HeapAlloc>,
    now: Nanos,
    done: u64,
}

impl Bench {
    fn new(cache_size: u64, backing_size: u64) -> Self {
        let params = OpenParams::new(
            cache_size,
            BackingIdentity {
                uuid: [1; 16],
                size: backing_size,
            },
            [2; 16],
        );
        let e = Engine::open(params, HeapAlloc, 0).expect("parameters");
        let mut b = Self { e, now: 0, done: 0 };
        b.run_ready();
        assert!(b.e.is_ready(), "engine did not open");
        b
    }

    /// Completes commands until none is left (null devices: reads return the
    /// buffer as it is, writes store nothing).
    fn run_ready(&mut self) {
        loop {
            let mut any = false;
            while let Some(cmd) = self.e.poll_command() {
                any = true;
                self.e.handle_completion(cmd.token, Ok(()), self.now);
            }
            while let Some(ev) = self.e.poll_event() {
                if let Event::Completed { result, .. } = ev {
                    result.expect("request failed");
                    self.done += 1;
                }
            }
            if !any {
                return;
            }
        }
    }

    /// Lets time pass to the engine's next deadline (barrier, sync interval).
    fn run_timeouts(&mut self) {
        if let Some(t) = self.e.poll_timeout() {
            self.now = self.now.max(t);
            self.e.handle_timeout(self.now);
            self.run_ready();
        }
    }
}

fn report(name: &str, ops: u64, secs: f64, b: &Bench) {
    let s = b.e.stats();
    println!(
        "engine {name}: ops={ops} secs={secs:.3} ops_per_sec={:.0} cache_writes_per_io={:.4} partial_logs={}",
        ops as f64 / secs,
        s.cache_write_cmds as f64 / s.user_write_cmds.max(1) as f64,
        s.nr_partial_flushed
    );
}

fn engine(ops: u64, only: Option<&str>) {
    let run = |w: &str| only.is_none_or(|o| o == w);
    const BLOCKS: u64 = 1 << 20; // 4 GiB of backing address space
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let data = vec![0x5au8; 4096];

    // 4 KiB random writes; the cache (8 GiB) never fills, so this is the write path alone.
    let mut b = Bench::new(8 << 30, 64 << 30);
    let offsets: Vec<u64> = (0..ops)
        .map(|_| rng.random_range(0..BLOCKS) * 4096)
        .collect();
    b.e.clear_stats();
    let t = Instant::now();
    for (i, &off) in offsets.iter().enumerate() {
        b.e.submit_write(ReqId(i as u64), off, &data, false, b.now)
            .expect("submit");
        b.run_ready();
    }
    if run("randwrite") {
        report("4k-randwrite", ops, t.elapsed().as_secs_f64(), &b);
    }
    if run("granted-randwrite") {
        granted_randwrite(&offsets, &data);
    }
    if run("read-hit") {
        read_hit(&mut b, &offsets, ops, &mut rng);
    }
    if run("fua-qd1") {
        engine_fua_qd1(ops / 10, &data, &mut rng);
    }
}

/// The same writes through write grants: the submitting cores' copies and
/// checksums are not done here (one checksum, taken once, stands for all),
/// so this is the engine thread's own work per write.
fn granted_randwrite(offsets: &[u64], data: &[u8]) {
    let mut b = Bench::new(8 << 30, 64 << 30);
    let crc = crc32c::crc32c(data);
    b.e.clear_stats();
    let t = Instant::now();
    let mut held: Option<(writeboost_engine::Grant, u32)> = None;
    for (i, &off) in offsets.iter().enumerate() {
        let (g, slot) = match held {
            Some((g, next)) if next < g.first_slot + g.count => (g, next),
            _ => {
                let g = b.e.grant(32, b.now).expect("a grant");
                (g, g.first_slot)
            }
        };
        held = Some((g, slot + 1));
        b.e.submit_granted_write(ReqId(i as u64), off, g.log, slot, &[crc], false, b.now)
            .expect("submit");
        b.run_ready();
    }
    report(
        "granted-randwrite",
        offsets.len() as u64,
        t.elapsed().as_secs_f64(),
        &b,
    );
}

fn read_hit(b: &mut Bench, offsets: &[u64], ops: u64, rng: &mut ChaCha8Rng) {
    const BLOCKS: u64 = 1 << 20;

    // 4 KiB reads of cached blocks (most on the cache device, some in RAM).
    let n = ops.min(BLOCKS);
    let t = Instant::now();
    b.e.clear_stats();
    for i in 0..n {
        let off = offsets[rng.random_range(0..offsets.len())];
        b.e.submit_read(ReqId(ops + i), off, 4096, b.now)
            .expect("submit");
        b.run_ready();
    }
    let s = b.e.stats();
    let hits: u64 = s.io[0][1].iter().flatten().sum();
    report("4k-read-hit", n, t.elapsed().as_secs_f64(), b);
    println!(
        "engine 4k-read-hit: hit_ratio={:.3}",
        hits as f64 / n as f64
    );
}

fn engine_fua_qd1(n: u64, data: &[u8], rng: &mut ChaCha8Rng) {
    const BLOCKS: u64 = 1 << 20;
    // FUA writes at queue depth 1 with the default barrier deadline: the
    // volatile-buffer worst case (every write becomes a partial log).
    let mut b = Bench::new(8 << 30, 64 << 30);
    b.e.clear_stats();
    let t = Instant::now();
    for i in 0..n {
        let before = b.done;
        b.e.submit_write(
            ReqId(i),
            rng.random_range(0..BLOCKS) * 4096,
            data,
            true,
            b.now,
        )
        .expect("submit");
        b.run_ready();
        while b.done == before {
            b.run_timeouts();
        }
    }
    report("fua-qd1", n, t.elapsed().as_secs_f64(), &b);
}

fn main() {
    match Args::parse().what.unwrap_or(What::Engine {
        ops: 2_000_000,
        only: None,
    }) {
        What::Engine { ops, only } => engine(ops, only.as_deref()),
        What::FuaQd1 {
            writes,
            ssd_write_us,
            ssd_flush_us,
            pmem_persist_us,
            pmem_file,
        } => fua_qd1(
            writes,
            ssd_write_us,
            ssd_flush_us,
            pmem_persist_us,
            pmem_file.as_deref(),
        ),
        What::Pressure {
            cache_mib,
            working_set_mib,
            backing_mib,
            qd,
            writes,
            backing_write_us,
            backing_iops,
            cache_write_us,
            pmem,
            warmup_mib,
            warmup_writes,
            set,
        } => pressure(
            cache_mib,
            working_set_mib,
            backing_mib,
            qd,
            writes,
            Latency {
                cache_read: 10_000,
                cache_write: cache_write_us * 1000,
                cache_flush: 20_000,
                backing_read: 2 * backing_write_us * 1000,
                backing_write: backing_write_us * 1000,
                backing_flush: 1_000,
                pmem_persist_4k: 1_000,
                jitter: false,
            },
            backing_iops,
            pmem,
            (warmup_mib, warmup_writes),
            &set,
        ),
    }
}
