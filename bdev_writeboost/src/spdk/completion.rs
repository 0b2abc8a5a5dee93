//! How the RPC layer hears the outcome of a create or delete: a callback,
//! called once, as `vbdev_passthru_rpc.c` passes its completion to the module.

use serde_json::Value;
use writeboost_rpc::RpcError;

/// Told once, with the result to answer (a name or `true`) or the error.
pub type Done = Box<dyn FnOnce(Result<Value, RpcError>)>;
