//! Planted bugs the simulator must catch (engine feature `mutants`). A check
//! that cannot fail proves nothing: each bug breaks one data-safety rule, and
//! a bounded run must find acknowledged data lost or corrupt, or damage
//! taken for a torn tail.
//!
//! `wb-sim --mutant NAME` runs the same by hand.

use writeboost_engine::mutant::Mutant;
use writeboost_sim::check::{DEFAULT_CORRUPTION_RATE, ModeChoice, SimOptions, run_seed};

/// Runs seeds from `seeds` until one fails; the seed that did.
fn first_failing(
    mutant: Mutant,
    mode: ModeChoice,
    crashes: u32,
    seeds: std::ops::Range<u64>,
) -> Option<u64> {
    seeds.into_iter().find(|&seed| {
        !run_seed(&SimOptions {
            seed,
            ops: 2000,
            crashes,
            error_rate: 0.002,
            verbose: false,
            force: Vec::new(),
            mode,
            mutant,
            corruption_rate: DEFAULT_CORRUPTION_RATE,
        })
        .clean()
    })
}

#[test]
fn every_planted_bug_is_caught() {
    // (bug, mode, crashes per seed, seeds within which it must be caught)
    let cases = [
        // Needs a stale log right after the chain's end to survive a crash
        // while the one before it is lost: whole-write crash outcomes.
        (Mutant::NoEpochCheck, ModeChoice::Volatile, 12, 100..300),
        (
            Mutant::DurableBeforeFlush,
            ModeChoice::Volatile,
            3,
            100..120,
        ),
        (
            Mutant::WritebackWithoutBackingFlush,
            ModeChoice::Volatile,
            3,
            100..120,
        ),
        (
            Mutant::CommitBeforeDrain,
            ModeChoice::Pmem,
            3,
            900_000..900_020,
        ),
        // Seen only when a crash also damages a durable log at rest.
        (
            Mutant::NoDurableFrontierCheck,
            ModeChoice::Volatile,
            3,
            100..120,
        ),
    ];
    for (mutant, mode, crashes, seeds) in cases {
        let range = format!("{seeds:?}");
        assert!(
            first_failing(mutant, mode, crashes, seeds).is_some(),
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
