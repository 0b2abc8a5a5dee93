//! # writeboost-rpc
//!
//! The `bdev_writeboost_*` JSON-RPC methods as one contract: parameter
//! checking with messages that say what is wrong, SPDK's error codes, and the
//! result shapes. The SPDK bdev module and the standalone host both serve
//! these methods through this crate, so the two cannot drift apart.
//!
//! Conventions follow SPDK: snake_case parameters, `-32602` ("invalid
//! parameters") for malformed input, a negative errno for refusals such as
//! "no such bdev" (`-19`, ENODEV) or "already exists" (`-17`, EEXIST).

#![forbid(unsafe_code)]

mod params;
mod report;

pub use params::{
    BaseGeometry, BlockRequest, CreateRequest, NameRequest, Params, SetOptionsRequest,
    drop_quarantine_answer, mode_number, parse_create, parse_drop_quarantine, parse_name,
    parse_optional_name, parse_set_options, quarantine_json,
};
pub use report::{
    DeviceReport, device_report, io_counters_json, report_json, status_json, tunables_json,
    uuid_string, waiting_report,
};

use std::fmt;

/// JSON-RPC 2.0 and errno codes used in error responses.
pub mod code {
    pub const PARSE_ERROR: i32 = -32700;
    pub const INVALID_REQUEST: i32 = -32600;
    pub const METHOD_NOT_FOUND: i32 = -32601;
    pub const INVALID_PARAMS: i32 = -32602;
    pub const INTERNAL_ERROR: i32 = -32603;
    /// Negative errno values, as SPDK's bdev RPCs return them.
    pub const EPERM: i32 = -1;
    pub const ENOENT: i32 = -2;
    pub const EIO: i32 = -5;
    pub const ENOMEM: i32 = -12;
    pub const EBUSY: i32 = -16;
    pub const EEXIST: i32 = -17;
    pub const ENODEV: i32 = -19;
    pub const EINVAL: i32 = -22;
    pub const ENOSPC: i32 = -28;
    pub const EROFS: i32 = -30;
}

/// The methods this crate describes, in the order `rpc_get_methods` lists them.
pub const METHODS: [&str; 8] = [
    "bdev_writeboost_create",
    "bdev_writeboost_delete",
    "bdev_writeboost_get_stats",
    "bdev_writeboost_set_options",
    "bdev_writeboost_drop_caches",
    "bdev_writeboost_clear_stats",
    "bdev_writeboost_get_quarantine",
    "bdev_writeboost_drop_quarantine",
];

/// A JSON-RPC error: code and a message that tells the user what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: i32,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// Malformed or out-of-range parameters (`-32602`).
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(code::INVALID_PARAMS, message)
    }

    /// "No writeboost bdev named X" (`-19`, ENODEV).
    pub fn no_such_device(name: &str) -> Self {
        Self::new(
            code::ENODEV,
            format!("no writeboost bdev named '{name}': bdev_writeboost_get_stats lists them"),
        )
    }

    /// The `error` member of a JSON-RPC response.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code, "message": self.message })
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.message, self.code)
    }
}

impl std::error::Error for RpcError {}
