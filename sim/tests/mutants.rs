//! Planted bugs the simulator must catch (engine feature `mutants`). A check
//! that cannot fail proves nothing: each bug breaks one data-safety rule, and
//! a bounded run must find acknowledged data lost or corrupt, or damage
//! taken for a torn tail, or stop at one of the engine's own assertions
//! (tests run with debug assertions; a stale checkpoint loaded against a
//! newer record trips the ring's before the model sees its data).
//!
//! `wb-sim --mutant NAME` runs the same by hand.

use writeboost_engine::mutant::Mutant;
use writeboost_sim::check::{
    DEFAULT_CORRUPTION_RATE, DEFAULT_RESTART_RATE, ModeChoice, SimOptions, run_seed,
};

/// Runs seeds from `seeds` until one fails; the seed that did.
fn first_failing(
    mutant: Mutant,
    mode: ModeChoice,
    crashes: u32,
    restart_rate: f64,
    seeds: std::ops::Range<u64>,
) -> Option<u64> {
    seeds.into_iter().find(|&seed| {
        let opts = SimOptions {
            seed,
            ops: 2000,
            crashes,
            error_rate: 0.002,
            verbose: false,
            force: Vec::new(),
            mode,
            mutant,
            corruption_rate: DEFAULT_CORRUPTION_RATE,
            restart_rate,
        };
        !matches!(
            std::panic::catch_unwind(|| run_seed(&opts).clean()),
            Ok(true)
        )
    })
}

#[test]
fn every_planted_bug_is_caught() {
    let r = DEFAULT_RESTART_RATE;
    // (bug, mode, crashes per seed, share of clean restarts, seeds within
    // which it must be caught)
    let cases = [
        // Needs a stale log right after the chain's end to survive a crash
        // while the one before it is lost: whole-write crash outcomes, in
        // runs of crashes that no clean restart interrupts.
        (
            Mutant::NoEpochCheck,
            ModeChoice::Volatile,
            12,
            0.0,
            100..300,
        ),
        (
            Mutant::DurableBeforeFlush,
            ModeChoice::Volatile,
            3,
            r,
            100..120,
        ),
        (
            Mutant::WritebackWithoutBackingFlush,
            ModeChoice::Volatile,
            3,
            r,
            100..120,
        ),
        (
            Mutant::CommitBeforeDrain,
            ModeChoice::Pmem,
            3,
            r,
            900_000..900_020,
        ),
        // Seen only when a crash also damages a durable log's header at
        // rest (damaged data is the scrub's to find, whatever the claims).
        (
            Mutant::NoDurableFrontierCheck,
            ModeChoice::Volatile,
            3,
            r,
            100..140,
        ),
        // Seen when a clean restart is followed by a crash: the checkpoint
        // of the earlier shutdown is stale by then.
        (
            Mutant::TrustAnyCheckpoint,
            ModeChoice::Volatile,
            6,
            r,
            100..140,
        ),
    ];
    for (mutant, mode, crashes, restarts, seeds) in cases {
        let range = format!("{seeds:?}");
        assert!(
            first_failing(mutant, mode, crashes, restarts, seeds).is_some(),
            "planted bug {} went unnoticed over seeds {range}: the simulator no longer checks \
             the rule it breaks",
            mutant.name()
        );
    }
}

#[test]
fn no_bug_is_planted_by_default() {
    assert_eq!(Mutant::default(), Mutant::None);
    for m in Mutant::ALL {
        assert_eq!(Mutant::from_name(m.name()), Some(m));
    }
    assert_eq!(Mutant::from_name("nonsense"), None);
}
