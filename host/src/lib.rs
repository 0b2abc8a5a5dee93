//! The standalone host: writeboost devices over base bdevs (files, block
//! devices, RAM) on polled reactors, served over NBD, configured by
//! SPDK-style JSON-RPC or a configuration file.
//!
//! | module | role |
//! |---|---|
//! | [`registry`] | the named base bdevs, writeboost devices and NBD servers, and the RPC methods on them |
//! | [`reactor`] | reactor threads, one per core, each running its devices as pollers |
//! | [`device`] | one writeboost device on its reactor: the engine's driver, requests in, replies out |
//! | [`request`] | requests from the front ends and the queue a device shares with them |
//! | [`backends`] | the I/O backends that run engine commands on files: io_uring and a thread pool |
//! | [`bdev`] | base bdevs (`bdev_aio_create`, `bdev_malloc_create`) |
//! | [`store`] | the data directory of the embedded default |
//! | [`nbd`] | the NBD server |
//! | [`jsonrpc`] | JSON-RPC 2.0 over a Unix socket, as SPDK serves it |
//! | [`config`] | configuration files as lists of RPC calls |
//! | [`alloc`] | aligned buffers for O_DIRECT and the engine |
//! | [`cli`] | the `writeboost` command line |

pub mod alloc;
pub mod backends;
pub mod bdev;
pub mod cli;
pub mod config;
pub mod device;
pub mod jsonrpc;
pub mod nbd;
pub mod reactor;
pub mod registry;
pub mod request;
pub mod store;

/// What the running binary was built from.
#[derive(Clone, Copy, Debug)]
pub struct Build {
    /// The package version.
    pub version: &'static str,
    /// The commit, or "unknown" outside a git checkout.
    pub git_rev: &'static str,
}
