//! The NBD server: wire protocol ([`proto`]) and connection handling ([`server`]).

pub use writeboost_nbd as proto;
pub mod server;
