//! The CI-sized crash simulation: a few hundred seeded workloads with crashes,
//! torn writes and I/O errors. A large run is `cargo run --release --bin
//! wb-sim -- --seeds 10000`.

use writeboost_engine::mutant::Mutant;
use writeboost_sim::check::{
    DEFAULT_CORRUPTION_RATE, DEFAULT_RESTART_RATE, Outcome, SimOptions, run_seed,
};

fn run(seeds: std::ops::Range<u64>, error_rate: f64) -> (Outcome, Vec<u64>) {
    let mut total = Outcome::default();
    let mut bad = Vec::new();
    for seed in seeds {
        let o = run_seed(&SimOptions {
            seed,
            ops: 1000,
            crashes: 3,
            error_rate,
            verbose: false,
            force: Vec::new(),
            mode: Default::default(),
            mutant: Mutant::None,
            corruption_rate: DEFAULT_CORRUPTION_RATE,
            restart_rate: DEFAULT_RESTART_RATE,
            segments: None,
            cores: None,
        });
        if !o.clean() {
            bad.push(seed);
        }
        total.add(&o);
    }
    (total, bad)
}

#[test]
fn hundreds_of_seeds_lose_and_corrupt_nothing() {
    let (total, bad) = run(0..300, 0.002);
    let damaged: u64 = total.corruptions.iter().sum();
    println!(
        "wb-sim: seeds=300 crashes={} acknowledged_lost={} corrupt_reads={} corruptions={damaged} \
         silent_truncations={}",
        total.crashes, total.acknowledged_lost, total.corrupt_reads, total.silent_truncations
    );
    assert!(
        bad.is_empty(),
        "failing seeds {bad:?}: rerun with wb-sim --first-seed S --seeds 1 -v"
    );
    assert!(total.crashes >= 600, "the run really crashed the engine");
    // A quarter of the crash points are clean restarts instead (and every
    // seed ends with one), resumed from the checkpoint; some lose power part
    // way through the shutdown.
    assert!(total.clean_restarts >= 400 && total.checkpoints_loaded > 0);
    assert!(total.shutdown_crashes > 0);
    assert!(total.partial_logs > 0 && total.logs > total.partial_logs);
    assert!(
        total.corruptions.iter().all(|&n| n > 0),
        "every fault was injected: {:?}",
        total.corruptions
    );
    assert_eq!(
        total.corruption_detected + total.damage_unused,
        damaged,
        "every damaged log reported, or its damage needed by nothing"
    );
    assert!(
        total.found_by_scrub > 0,
        "the scrub found damaged data after an open"
    );
}

#[test]
fn heavy_error_injection_loses_nothing() {
    let (total, bad) = run(1000..1050, 0.05);
    assert!(
        bad.is_empty(),
        "failing seeds {bad:?}: rerun with wb-sim --error-rate 0.05 --first-seed S --seeds 1 -v"
    );
    assert_eq!(total.acknowledged_lost + total.corrupt_reads, 0);
}

/// The stress sweep: every buffer mode, error rates from the default to 5 %
/// of commands, damage at rest at half the crashes (and lying checkpoints at
/// half the clean restarts), on the seeds' rings and on rings of two
/// positions. Nothing acknowledged may be lost or read back wrong, no run
/// may stop making progress, and no damage may be reported where none was
/// done.
#[test]
fn stress_sweep_loses_nothing_and_never_stalls() {
    use writeboost_sim::check::ModeChoice;
    let mut total = Outcome::default();
    let mut bad = Vec::new();
    let mut first = 2_000_000u64;
    for error_rate in [0.002, 0.02, 0.05] {
        for mode in [ModeChoice::Volatile, ModeChoice::Pmem, ModeChoice::Mixed] {
            for segments in [None, Some(2)] {
                for seed in first..first + 12 {
                    let o = run_seed(&SimOptions {
                        seed,
                        ops: 1000,
                        crashes: 4,
                        error_rate,
                        verbose: false,
                        force: Vec::new(),
                        mode,
                        mutant: Mutant::None,
                        corruption_rate: 0.5,
                        restart_rate: DEFAULT_RESTART_RATE,
                        segments,
                        cores: None,
                    });
                    if !o.clean() {
                        bad.push(format!(
                            "--first-seed {seed} --error-rate {error_rate} --mode {} \
                             --corruption-rate 0.5 --crashes 4 --ops 1000{}",
                            format!("{mode:?}").to_lowercase(),
                            segments.map_or(String::new(), |n| format!(" --segments {n}"))
                        ));
                    }
                    total.add(&o);
                }
                first += 12;
            }
        }
    }
    println!(
        "stress sweep: seeds=216 crashes={} acknowledged_lost={} corrupt_reads={} stuck={} \
         false_corruption={} silent_truncations={} quarantined_runs={} lying_checkpoints={} \
         failed_flushes={}",
        total.crashes,
        total.acknowledged_lost,
        total.corrupt_reads,
        total.stuck,
        total.false_corruption,
        total.silent_truncations,
        total.quarantined_runs,
        total.lying_checkpoints,
        total.failed_flushes
    );
    assert!(bad.is_empty(), "failing runs (wb-sim -v with): {bad:#?}");
    // The faults the sweep is for really happened.
    assert!(total.quarantined_runs > 0 && total.lying_checkpoints > 0);
    assert!(total.failed_flushes > 0 && total.cache_failures > 0);
    assert!(total.undrained_restarts > 0 && total.open_retries > 0);
}

/// Seeds that once lost acknowledged mode-1 writes: a log whose pool slot had
/// nothing committed (read-cache copies only, or writes waiting for a fill)
/// ended recovery's run of pool slots and hid the next log's writes.
#[test]
fn pool_slots_without_committed_blocks_hide_nothing() {
    use writeboost_sim::check::ModeChoice;
    let cases = [
        (200_724, ModeChoice::Any),
        (200_799, ModeChoice::Any),
        (202_133, ModeChoice::Any),
        (203_094, ModeChoice::Any),
        (303_282, ModeChoice::Pmem),
    ];
    for (seed, mode) in cases {
        let o = run_seed(&SimOptions {
            seed,
            ops: 2000,
            crashes: 3,
            error_rate: 0.002,
            verbose: false,
            force: Vec::new(),
            mode,
            mutant: Mutant::None,
            corruption_rate: DEFAULT_CORRUPTION_RATE,
            restart_rate: DEFAULT_RESTART_RATE,
            segments: None,
            cores: None,
        });
        assert!(
            o.clean(),
            "seed {seed} lost {} acknowledged sectors: rerun with wb-sim --first-seed {seed} --seeds 1 -v",
            o.acknowledged_lost
        );
    }
}
