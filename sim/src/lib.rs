//! Deterministic simulation of the writeboost engine: simulated devices with
//! volatile write caches and torn writes, a reference model, crash/recovery
//! checking, and the benchmarks that run on simulated devices.

pub mod check;
pub mod content;
pub mod corrupt;
pub mod device;
pub mod harness;
pub mod pmem;
pub mod submitters;
