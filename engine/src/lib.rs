//! # writeboost-engine
//!
//! A log-structured write-back block cache as a sans-IO state machine: no
//! threads, no clock, no I/O of its own. A host feeds it user requests, device
//! completions and the time, and runs the device commands it emits:
//!
//! ```text
//! loop {
//!     engine.submit_write(req, offset, data, fua, now)?;   // or read/flush/...
//!     while let Some(cmd) = engine.poll_command() { host.start(cmd) }
//!     while let Some(ev) = engine.poll_event()   { host.deliver(ev) }  // before the next call
//!     // when a command ends:  engine.handle_completion(token, result, now)
//!     // at engine.poll_timeout(): engine.handle_timeout(now)
//! }
//! ```
//!
//! The same engine runs under the SPDK bdev module, the standalone host and
//! the deterministic simulator, each through [`driver::Driver`], which runs
//! that loop once for all of them.

#![forbid(unsafe_code)]

mod cache;
pub mod config;
pub mod driver;
pub mod error;
pub mod format;
pub mod geometry;
pub mod ids;
pub mod io;
pub mod mutant;
pub mod pmem;
pub mod stats;

pub use cache::{Engine, Grant};
pub use config::{OpenParams, Tunables};
pub use error::{ConfigError, DeviceError, FormatError, IoError, OpenError, SubmitError};
pub use format::BackingIdentity;
pub use ids::{Epoch, LogId};
pub use io::{
    BufAlloc, BufId, Command, CommandKind, DataRef, Device, Event, HeapAlloc, Nanos, ReqId, Token,
};
pub use stats::{Stats, Status};
