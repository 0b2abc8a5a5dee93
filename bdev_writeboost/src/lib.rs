//! The writeboost SPDK bdev module: the engine as a virtual bdev layered over a
//! cache bdev and a backing bdev, configured with `bdev_writeboost_*` JSON-RPC
//! methods.
//!
//! The module is compiled with the `spdk` feature against a built SPDK (found
//! through `SPDK_DIR` or pkg-config, see `spdk-sys`). Without it this crate
//! only re-exports the engine and the RPC contract, so workspace builds need
//! no SPDK; the `surface` feature type-checks the module against SPDK's
//! declarations as committed in spdk-sys, which CI does.
//!
//! Threads: every writeboost device belongs to the SPDK thread it was created
//! on (the app thread, where SPDK runs RPCs, examine and bdev
//! register/unregister). That thread owns the engine, the base-bdev
//! descriptors and channels, and runs the device's poller. I/O channels on
//! other threads hand requests to it over a lock-free ring and get
//! completions back over a ring of their own, drained by a per-channel poller.

pub use writeboost_engine as engine;
pub use writeboost_rpc as rpc;

#[cfg(feature = "glue")]
mod spdk;
