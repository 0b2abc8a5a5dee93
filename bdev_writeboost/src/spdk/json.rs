//! Between SPDK's JSON (parsed `spdk_json_val` trees, `spdk_json_write_ctx`
//! writers) and serde_json values, so the RPC contract in `writeboost-rpc`
//! is shared with the standalone host unchanged.

use std::ffi::c_void;

use serde_json::Value;
use spdk_sys as sys;

extern "C" fn collect(ctx: *mut c_void, data: *const c_void, size: usize) -> i32 {
    // SAFETY: ctx is the Vec passed to spdk_json_write_begin below; data has
    // size bytes.
    unsafe {
        let out = &mut *ctx.cast::<Vec<u8>>();
        out.extend_from_slice(std::slice::from_raw_parts(data.cast::<u8>(), size));
    }
    0
}

/// The parameters of an RPC as a serde_json value (`None` when absent).
///
/// # Safety
/// `params` is null or a parsed value tree SPDK handed to an RPC handler.
pub unsafe fn params_to_value(params: *const sys::spdk_json_val) -> Result<Option<Value>, String> {
    if params.is_null() {
        return Ok(None);
    }
    let mut out: Vec<u8> = Vec::new();
    // SAFETY: per the contract; `out` outlives the writer, which is ended
    // before this returns.
    unsafe {
        let w = sys::spdk_json_write_begin(Some(collect), (&mut out as *mut Vec<u8>).cast(), 0);
        if w.is_null() {
            return Err("out of memory".into());
        }
        let rc = sys::spdk_json_write_val(w, params);
        let end = sys::spdk_json_write_end(w);
        if rc != 0 || end != 0 {
            return Err("could not re-encode the parameters".into());
        }
    }
    serde_json::from_slice(&out)
        .map(Some)
        .map_err(|e| format!("parameters are not valid JSON: {e}"))
}

/// Writes a serde_json value as the next value of `w`.
///
/// # Safety
/// `w` is a live writer positioned where a value may go.
pub unsafe fn write_value(w: *mut sys::spdk_json_write_ctx, v: &Value) -> i32 {
    let text = v.to_string();
    // SAFETY: per the contract; text is valid for the call.
    unsafe { sys::spdk_json_write_val_raw(w, text.as_ptr().cast(), text.len()) }
}
