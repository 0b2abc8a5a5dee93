//! The NBD server: wire protocol ([`proto`]) and connection handling ([`server`]).

pub mod proto;
pub mod server;
