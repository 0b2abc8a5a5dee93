//! Crash-consistency simulator: `wb-sim --seeds N` runs N seeded workloads
//! with crashes, torn writes and I/O errors against the engine and a
//! reference model, and prints what was lost or corrupted (nothing, we hope).

use clap::Parser;
use writeboost_engine::mutant::Mutant;
use writeboost_sim::check::{
    DEFAULT_CORRUPTION_RATE, DEFAULT_RESTART_RATE, ModeChoice, Outcome, SimOptions, run_seed,
};

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ModeArg {
    Volatile,
    Pmem,
    Mixed,
    Any,
}

impl From<ModeArg> for ModeChoice {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Volatile => ModeChoice::Volatile,
            ModeArg::Pmem => ModeChoice::Pmem,
            ModeArg::Mixed => ModeChoice::Mixed,
            ModeArg::Any => ModeChoice::Any,
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "Deterministic crash simulator for the writeboost engine")]
struct Args {
    /// Number of seeds to run.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// First seed (seeds run from here upwards).
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    /// User operations per seed.
    #[arg(long, default_value_t = 2000)]
    ops: u64,
    /// Crashes per seed.
    #[arg(long, default_value_t = 3)]
    crashes: u32,
    /// Probability that any device command fails (the engine retries).
    #[arg(long, default_value_t = 0.002)]
    error_rate: f64,
    /// Force a tunable for every seed, e.g. `--set read_cache_threshold=0` (repeatable).
    #[arg(long = "set", value_parser = parse_kv)]
    set: Vec<(String, u64)>,
    /// Buffer mode: volatile (mode 0), pmem (mode 1), mixed (restarts in either), any (per seed).
    #[arg(long, value_enum, default_value = "any")]
    mode: ModeArg,
    /// Print each problem as it is found.
    #[arg(long, short)]
    verbose: bool,
    /// Share of crashes that also damage one durable log at rest (bit rot,
    /// a misdirected write or a lost write), from 0 to 1.
    #[arg(long, default_value_t = DEFAULT_CORRUPTION_RATE, value_parser = parse_rate)]
    corruption_rate: f64,
    /// Share of crash points that are a clean restart instead (half of them
    /// lose power part way through the shutdown), from 0 to 1.
    #[arg(long, default_value_t = DEFAULT_RESTART_RATE, value_parser = parse_rate)]
    restart_rate: f64,
    /// The ring's positions (from 2), instead of a cache of each seed's
    /// choice of 5 to 16 segments.
    #[arg(long)]
    segments: Option<u64>,
    /// Plant a bug in the engine (no-epoch-check, durable-before-flush,
    /// writeback-without-backing-flush, commit-before-drain,
    /// no-durable-frontier-check, trust-any-checkpoint, scrub-ignores-position-reuse,
    /// partial-write-over-damage, flush-retried, trust-checkpoint-counts,
    /// quarantine-not-recorded, quarantine-cleared-early, relocated-logged-clean,
    /// granted-published-in-place): the run should fail.
    #[arg(long, default_value = "none", value_parser = parse_mutant)]
    mutant: Mutant,
    /// Submitting cores that copy writes into granted slots and publish
    /// them out of order (0: none); by default each seed draws 0 to 4.
    #[arg(long)]
    cores: Option<usize>,
}

fn parse_mutant(s: &str) -> Result<Mutant, String> {
    Mutant::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = Mutant::ALL.iter().map(|m| m.name()).collect();
        format!(
            "no planted bug named '{s}'; there are: {}",
            names.join(", ")
        )
    })
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("'{s}' is not a probability from 0 to 1")),
    }
}

fn parse_kv(s: &str) -> Result<(String, u64), String> {
    let (k, v) = s.split_once('=').ok_or("expected name=value")?;
    let v: u64 = v.parse().map_err(|e| format!("{k}: {e}"))?;
    let mut t = writeboost_engine::Tunables::default();
    t.set(k, v).map_err(|e| e.to_string())?;
    Ok((k.to_string(), v))
}

fn main() {
    let a = Args::parse();
    let mut total = Outcome::default();
    let mut bad_seeds = Vec::new();
    for seed in a.first_seed..a.first_seed + a.seeds {
        let o = run_seed(&SimOptions {
            seed,
            ops: a.ops,
            crashes: a.crashes,
            error_rate: a.error_rate,
            verbose: a.verbose,
            force: a.set.clone(),
            mode: a.mode.into(),
            mutant: a.mutant,
            corruption_rate: a.corruption_rate,
            restart_rate: a.restart_rate,
            segments: a.segments,
            cores: a.cores,
        });
        if !o.clean() {
            bad_seeds.push(seed);
        }
        total.add(&o);
    }
    if !bad_seeds.is_empty() {
        eprintln!("failing seeds: {bad_seeds:?} (rerun one with --first-seed S --seeds 1 -v)");
    }
    println!(
        "ops={} logs={} partial_logs={} relocated={} admission_bypasses={} granted_writes={} granted_replaced={} returned_slots={} io_errors={} stuck={} crash_outcomes=torn:{},whole:{},newest_first:{}",
        total.ops,
        total.logs,
        total.partial_logs,
        total.relocated,
        total.admission_bypasses,
        total.granted_writes,
        total.granted_replaced,
        total.returned_slots,
        total.io_errors,
        total.stuck,
        total.crash_outcomes[0],
        total.crash_outcomes[1],
        total.crash_outcomes[2]
    );
    println!(
        "corruptions=bit_rot:{},misdirected:{},lost_write:{} corruption_detected={} \
         found_by_scrub={} damage_unused={}",
        total.corruptions[0],
        total.corruptions[1],
        total.corruptions[2],
        total.corruption_detected,
        total.found_by_scrub,
        total.damage_unused
    );
    println!(
        "clean_restarts={} checkpoints_loaded={} shutdown_crashes={} false_corruption={}",
        total.clean_restarts,
        total.checkpoints_loaded,
        total.shutdown_crashes,
        total.false_corruption
    );
    println!(
        "undrained_restarts={} open_retries={} cache_failures={} failed_flushes={} \
         quarantined_runs={} lying_checkpoints={} trusted_lies={}",
        total.undrained_restarts,
        total.open_retries,
        total.cache_failures,
        total.failed_flushes,
        total.quarantined_runs,
        total.lying_checkpoints,
        total.trusted_lies
    );
    println!(
        "wb-sim: seeds={} crashes={} acknowledged_lost={} corrupt_reads={} silent_truncations={}",
        a.seeds,
        total.crashes,
        total.acknowledged_lost,
        total.corrupt_reads,
        total.silent_truncations
    );
    if !total.clean() {
        std::process::exit(1);
    }
}
