//! SPDK glue: the FFI edge of the module. Every `unsafe` block says why it
//! is sound; the engine itself stays safe Rust.
//!
//! Layered as SPDK's passthru module, each layer calling only down:
//!
//! - `rpc`: the `bdev_writeboost_*` handlers; they call `module`'s
//!   create/delete with a completion callback and answer from it;
//! - `module`: the bdev module's callbacks and the registry that owns the
//!   devices; it gives each device its channel callbacks and the hooks that
//!   tell it of the device's open and end;
//! - `channel` (per-thread I/O channels, submit_request) over `device` (the
//!   engine's driver, base bdevs, registration); `grants`: the slots a
//!   channel copies whole-block writes into on its own core; `io_thread`:
//!   a device's base-bdev commands on another core (`io_core`);
//! - leaves: `user_io` (a user I/O and where it completes), `placement`
//!   (each device's thread and core, and the messages between threads),
//!   `examine`, `completion`, `dma`, `ring`, `json`, `log`.

mod channel;
mod completion;
mod device;
mod dma;
mod examine;
mod grants;
mod io_thread;
mod json;
mod log;
mod module;
mod placement;
mod ring;
mod rpc;
mod user_io;
