//! SPDK glue: the FFI edge of the module. Every `unsafe` block says why it
//! is sound; the engine itself stays safe Rust.

mod channel;
mod device;
mod dma;
mod json;
mod log;
mod module;
mod ring;
mod rpc;
