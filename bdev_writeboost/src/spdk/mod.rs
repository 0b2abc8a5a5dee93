//! SPDK glue: the FFI edge of the module. Every `unsafe` block says why it
//! is sound; the engine itself stays safe Rust.

mod channel;
mod completion;
mod device;
mod dma;
mod examine;
mod json;
mod log;
mod module;
mod ring;
mod rpc;
mod user_io;
