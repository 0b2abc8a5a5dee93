//! The writeboost SPDK bdev module: the engine as a virtual bdev layered over a
//! cache bdev and a backing bdev, configured with `bdev_writeboost_*` JSON-RPC
//! methods. The module is compiled with the `spdk` feature against an
//! installed SPDK; without it this crate only re-exports the engine, so
//! workspace builds need no SPDK.

pub use writeboost_engine as engine;
