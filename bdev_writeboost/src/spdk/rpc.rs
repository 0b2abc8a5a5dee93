//! The `bdev_writeboost_*` JSON-RPC handlers. Parameters are checked by
//! `writeboost-rpc`, exactly as the standalone host checks them; SPDK runs
//! the handlers on the app thread, which owns every device.

use std::ffi::CString;

use serde_json::{Value, json};
use spdk_sys as sys;
use writeboost_rpc::{
    RpcError, code, drop_quarantine_answer, parse_create, parse_drop_quarantine, parse_name,
    parse_optional_name, parse_set_options, quarantine_json,
};

use super::device::Device;
use super::json::{params_to_value, write_value};
use super::module;
use writeboost_engine::driver::Lifecycle;

/// An RPC request waiting for its answer; answered exactly once.
pub struct Responder(*mut sys::spdk_jsonrpc_request);

impl Responder {
    pub fn result(self, v: &Value) {
        // SAFETY: the request is live until answered, which happens once
        // because `self` is consumed.
        unsafe {
            let w = sys::spdk_jsonrpc_begin_result(self.0);
            if !w.is_null() {
                write_value(w, v);
                sys::spdk_jsonrpc_end_result(self.0, w);
            }
        }
    }

    pub fn error(self, e: &RpcError) {
        let msg = CString::new(e.message.replace('\0', " ")).unwrap_or_default();
        // SAFETY: as in `result`; msg is valid for the call.
        unsafe { sys::spdk_jsonrpc_send_error_response(self.0, e.code, msg.as_ptr()) }
    }

    fn answer(self, r: Result<Value, RpcError>) {
        match r {
            Ok(v) => self.result(&v),
            Err(e) => self.error(&e),
        }
    }
}

/// # Safety
/// As for an SPDK RPC handler's arguments.
unsafe fn begin(
    request: *mut sys::spdk_jsonrpc_request,
    params: *const sys::spdk_json_val,
) -> (Responder, Result<Option<Value>, RpcError>) {
    // SAFETY: per the contract.
    let p = unsafe { params_to_value(params) }.map_err(RpcError::invalid_params);
    (Responder(request), p)
}

/// Looks up a device by name (ENODEV if none).
fn device(name: &str) -> Result<*mut Device, RpcError> {
    module::find(name).ok_or_else(|| RpcError::no_such_device(name))
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_rpc_create(
    request: *mut sys::spdk_jsonrpc_request,
    params: *const sys::spdk_json_val,
) {
    // SAFETY: SPDK passes a live request and parameter tree.
    let (resp, p) = unsafe { begin(request, params) };
    let req = match p.and_then(|p| parse_create(p.as_ref())) {
        Ok(r) => r,
        Err(e) => return resp.error(&e),
    };
    // The answer comes once the engine has recovered the cache (or at once
    // if a base bdev is still missing and the create waits for it).
    module::create(req, Some(Box::new(move |r| resp.answer(r))));
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_rpc_delete(
    request: *mut sys::spdk_jsonrpc_request,
    params: *const sys::spdk_json_val,
) {
    // SAFETY: SPDK passes a live request and parameter tree.
    let (resp, p) = unsafe { begin(request, params) };
    let name = match p.and_then(|p| parse_name("bdev_writeboost_delete", p.as_ref())) {
        Ok(n) => n.name,
        Err(e) => return resp.error(&e),
    };
    module::delete(&name, Box::new(move |r| resp.answer(r)));
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_rpc_get_stats(
    request: *mut sys::spdk_jsonrpc_request,
    params: *const sys::spdk_json_val,
) {
    // SAFETY: SPDK passes a live request and parameter tree.
    let (resp, p) = unsafe { begin(request, params) };
    let r = p
        .and_then(|p| parse_optional_name("bdev_writeboost_get_stats", p.as_ref()))
        .and_then(|name| {
            let devs = match &name {
                Some(n) => vec![device(n)?],
                None => module::all(),
            };
            let mut out = Vec::new();
            for d in devs {
                // SAFETY: registry devices are live and owned by this thread.
                out.push(unsafe { (*d).report() });
            }
            for p in module::pending() {
                if name.as_deref().is_none_or(|n| n == p.name) {
                    out.push(json!({
                        "name": p.name,
                        "backing_bdev": p.backing_bdev,
                        "cache_bdev": p.cache_bdev,
                        "state": "waiting_for_base_bdevs",
                    }));
                }
            }
            Ok(Value::Array(out))
        });
    resp.answer(r);
}

/// Runs `f` on a named, online device inside the engine.
fn with_online(
    name: &str,
    f: impl FnOnce(&mut Device) -> Result<Value, RpcError>,
) -> Result<Value, RpcError> {
    let dev = device(name)?;
    let mut out = Err(RpcError::new(code::EBUSY, "the device is busy; retry"));
    // SAFETY: registry devices are live and owned by this (the app) thread.
    unsafe {
        if (*dev).driver.lifecycle() != Lifecycle::Online {
            return Err(RpcError::new(
                code::EBUSY,
                format!("writeboost bdev '{name}' is not online (it is opening or closing); retry"),
            ));
        }
        // (Busy: an RPC runs on the app thread, so only if SPDK called it
        // from inside the engine; the answer says to retry.)
        let _ = Device::enter(dev, true, |d| out = f(d));
    }
    out
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_rpc_set_options(
    request: *mut sys::spdk_jsonrpc_request,
    params: *const sys::spdk_json_val,
) {
    // SAFETY: SPDK passes a live request and parameter tree.
    let (resp, p) = unsafe { begin(request, params) };
    let r = p
        .and_then(|p| parse_set_options(p.as_ref()))
        .and_then(|req| {
            with_online(&req.name, |d| {
                let tunables = req.apply_to(d.driver.engine().tunables())?;
                let now = d.now();
                d.driver
                    .engine_mut()
                    .set_options(tunables, now)
                    .map_err(|e| {
                        RpcError::invalid_params(format!("bdev_writeboost_set_options: {e}"))
                    })?;
                Ok(Value::Bool(true))
            })
        });
    resp.answer(r);
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_rpc_drop_caches(
    request: *mut sys::spdk_jsonrpc_request,
    params: *const sys::spdk_json_val,
) {
    // SAFETY: SPDK passes a live request and parameter tree.
    let (resp, p) = unsafe { begin(request, params) };
    let r = p
        .and_then(|p| parse_name("bdev_writeboost_drop_caches", p.as_ref()))
        .and_then(|req| {
            with_online(&req.name, |d| {
                let now = d.now();
                d.driver.engine_mut().drop_caches(now);
                Ok(Value::Bool(true))
            })
        });
    resp.answer(r);
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_rpc_get_quarantine(
    request: *mut sys::spdk_jsonrpc_request,
    params: *const sys::spdk_json_val,
) {
    // SAFETY: SPDK passes a live request and parameter tree.
    let (resp, p) = unsafe { begin(request, params) };
    let r = p
        .and_then(|p| parse_name("bdev_writeboost_get_quarantine", p.as_ref()))
        .and_then(|req| {
            with_online(&req.name, |d| {
                Ok(quarantine_json(&d.driver.engine().quarantined_blocks()))
            })
        });
    resp.answer(r);
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_rpc_drop_quarantine(
    request: *mut sys::spdk_jsonrpc_request,
    params: *const sys::spdk_json_val,
) {
    // SAFETY: SPDK passes a live request and parameter tree.
    let (resp, p) = unsafe { begin(request, params) };
    let r = p
        .and_then(|p| parse_drop_quarantine(p.as_ref()))
        .and_then(|req| {
            with_online(&req.name, |d| {
                let now = d.now();
                let dropped = d.driver.engine_mut().drop_quarantine(req.block, now);
                drop_quarantine_answer(&req, dropped)
            })
        });
    resp.answer(r);
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_rpc_clear_stats(
    request: *mut sys::spdk_jsonrpc_request,
    params: *const sys::spdk_json_val,
) {
    // SAFETY: SPDK passes a live request and parameter tree.
    let (resp, p) = unsafe { begin(request, params) };
    let r = p
        .and_then(|p| parse_name("bdev_writeboost_clear_stats", p.as_ref()))
        .and_then(|req| {
            with_online(&req.name, |d| {
                d.driver.engine_mut().clear_stats();
                Ok(Value::Bool(true))
            })
        });
    resp.answer(r);
}
