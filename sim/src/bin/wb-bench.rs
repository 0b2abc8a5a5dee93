//! Benchmarks on simulated devices.
//!
//! `wb-bench engine`: the engine alone on devices that complete every command
//! at once and store nothing, so the figures are the engine's own CPU cost
//! (including copying user data into the log buffer). One thread = one core.

use std::time::Instant;

use clap::{Parser, Subcommand};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use writeboost_engine::{BackingIdentity, Engine, Event, HeapAlloc, Nanos, OpenParams, ReqId};

#[derive(Parser)]
#[command(about = "writeboost benchmarks on simulated devices")]
struct Args {
    #[command(subcommand)]
    what: Option<What>,
}

#[derive(Subcommand)]
enum What {
    /// Engine-only throughput: 4 KiB random writes, 4 KiB read hits, FUA writes at QD1.
    Engine {
        /// Operations per workload.
        #[arg(long, default_value_t = 2_000_000)]
        ops: u64,
        /// Run only this workload (randwrite, read-hit, fua-qd1).
        #[arg(long)]
        only: Option<String>,
    },
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
    if run("read-hit") {
        read_hit(&mut b, &offsets, ops, &mut rng);
    }
    if run("fua-qd1") {
        fua_qd1(ops / 10, &data, &mut rng);
    }
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

fn fua_qd1(n: u64, data: &[u8], rng: &mut ChaCha8Rng) {
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
    }
}
