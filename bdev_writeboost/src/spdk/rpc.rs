//! The `bdev_writeboost_*` JSON-RPC handlers. Parameters are checked by
//! `writeboost-rpc`, exactly as the standalone host checks them. SPDK runs
//! the handlers on the app thread; what a device must do runs on the
//! device's own thread, and the answer comes back to the app thread.

use std::ffi::CString;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use spdk_sys as sys;
use writeboost_rpc::{
    RpcError, code, drop_quarantine_answer, parse_create, parse_drop_quarantine, parse_name,
    parse_optional_name, parse_set_options, quarantine_json, waiting_report,
};

use super::device::{Device, Shared};
use super::json::{params_to_value, write_value};
use super::module;
use super::placement::{run_on, run_on_app};
use writeboost_engine::driver::Lifecycle;

/// An RPC request waiting for its answer; answered exactly once.
pub struct Responder(*mut sys::spdk_jsonrpc_request);

// SAFETY: a Responder may travel to a device's thread and back inside a
// message, but it is answered on the app thread only (`on_device` hands
// every answer back there).
unsafe impl Send for Responder {}

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
fn device(name: &str) -> Result<Arc<Shared>, RpcError> {
    module::find(name).ok_or_else(|| RpcError::no_such_device(name))
}

/// Runs `f` on the device's thread, inside its engine, and hands its answer
/// to `answer` on the app thread.
fn on_device<T: 'static>(
    shared: Arc<Shared>,
    f: impl FnOnce(&mut Device) -> Result<T, RpcError> + 'static,
    answer: impl FnOnce(Result<T, RpcError>) + 'static,
) {
    let thread = shared.thread;
    run_on(thread, move || {
        let gone = || RpcError::new(code::ENODEV, "the device went away; it is being deleted");
        let r = match shared.device() {
            None => Err(gone()),
            Some(dev) => {
                let mut out = Err(gone());
                // SAFETY: a message on the device's own thread, never from
                // inside its engine, so the device is live and not busy.
                if unsafe { Device::enter(dev, true, |d| out = f(d)) }.is_err() {
                    out = Err(RpcError::new(code::EBUSY, "the device is busy; retry"));
                }
                out
            }
        };
        run_on_app(move || answer(r));
    });
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
    let devs = match p
        .and_then(|p| parse_optional_name("bdev_writeboost_get_stats", p.as_ref()))
        .and_then(|name| {
            let devs = match &name {
                Some(n) => vec![device(n)?],
                None => module::all(),
            };
            Ok((name, devs))
        }) {
        Ok(d) => d,
        Err(e) => return resp.error(&e),
    };
    let (name, devs) = devs;
    let waiting: Vec<Value> = module::pending()
        .into_iter()
        .filter(|p| name.as_deref().is_none_or(|n| n == p.name))
        .map(|p| waiting_report(&p))
        .collect();
    if devs.is_empty() {
        return resp.result(&Value::Array(waiting));
    }
    // Each device reports on its own thread; the answer goes once all did.
    struct Gather {
        reports: Vec<Option<Value>>,
        left: usize,
        waiting: Vec<Value>,
        resp: Option<Responder>,
    }
    let gather = Arc::new(Mutex::new(Gather {
        reports: vec![None; devs.len()],
        left: devs.len(),
        waiting,
        resp: Some(resp),
    }));
    for (i, shared) in devs.into_iter().enumerate() {
        let g = Arc::clone(&gather);
        on_device(
            shared,
            |d| Ok(d.report()),
            move |r: Result<Value, RpcError>| {
                let mut g = g.lock().unwrap_or_else(|p| p.into_inner());
                // (A device that went away meanwhile is left out.)
                g.reports[i] = r.ok();
                g.left -= 1;
                if g.left == 0 {
                    let mut out: Vec<Value> =
                        g.reports.iter_mut().filter_map(Option::take).collect();
                    out.append(&mut g.waiting);
                    if let Some(resp) = g.resp.take() {
                        resp.result(&Value::Array(out));
                    }
                }
            },
        );
    }
}

/// Runs `f` on a named, online device inside the engine, on the device's
/// thread, and answers `resp` with its result.
fn with_online(
    resp: Responder,
    name: &str,
    f: impl FnOnce(&mut Device) -> Result<Value, RpcError> + 'static,
) {
    let shared = match device(name) {
        Ok(s) => s,
        Err(e) => return resp.error(&e),
    };
    if shared.lifecycle() != Lifecycle::Online {
        return resp.error(&RpcError::new(
            code::EBUSY,
            format!("writeboost bdev '{name}' is not online (it is opening or closing); retry"),
        ));
    }
    on_device(
        shared,
        |d| {
            let r = f(d);
            // (Tunables may have changed: save_config reads the snapshot.)
            d.refresh_snapshot(false);
            r
        },
        move |r| resp.answer(r),
    );
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_rpc_set_options(
    request: *mut sys::spdk_jsonrpc_request,
    params: *const sys::spdk_json_val,
) {
    // SAFETY: SPDK passes a live request and parameter tree.
    let (resp, p) = unsafe { begin(request, params) };
    let req = match p.and_then(|p| parse_set_options(p.as_ref())) {
        Ok(r) => r,
        Err(e) => return resp.error(&e),
    };
    let name = req.name.clone();
    with_online(resp, &name, move |d| {
        let tunables = req.apply_to(d.driver.engine().tunables())?;
        let now = d.now();
        d.driver
            .engine_mut()
            .set_options(tunables, now)
            .map_err(|e| RpcError::invalid_params(format!("bdev_writeboost_set_options: {e}")))?;
        Ok(Value::Bool(true))
    });
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_rpc_drop_caches(
    request: *mut sys::spdk_jsonrpc_request,
    params: *const sys::spdk_json_val,
) {
    // SAFETY: SPDK passes a live request and parameter tree.
    let (resp, p) = unsafe { begin(request, params) };
    let req = match p.and_then(|p| parse_name("bdev_writeboost_drop_caches", p.as_ref())) {
        Ok(r) => r,
        Err(e) => return resp.error(&e),
    };
    let name = req.name.clone();
    with_online(resp, &name, move |d| {
        let now = d.now();
        d.driver.engine_mut().drop_caches(now);
        Ok(Value::Bool(true))
    });
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_rpc_get_quarantine(
    request: *mut sys::spdk_jsonrpc_request,
    params: *const sys::spdk_json_val,
) {
    // SAFETY: SPDK passes a live request and parameter tree.
    let (resp, p) = unsafe { begin(request, params) };
    let req = match p.and_then(|p| parse_name("bdev_writeboost_get_quarantine", p.as_ref())) {
        Ok(r) => r,
        Err(e) => return resp.error(&e),
    };
    let name = req.name.clone();
    with_online(resp, &name, move |d| {
        Ok(quarantine_json(&d.driver.engine().quarantined_blocks()))
    });
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_rpc_drop_quarantine(
    request: *mut sys::spdk_jsonrpc_request,
    params: *const sys::spdk_json_val,
) {
    // SAFETY: SPDK passes a live request and parameter tree.
    let (resp, p) = unsafe { begin(request, params) };
    let req = match p.and_then(|p| parse_drop_quarantine(p.as_ref())) {
        Ok(r) => r,
        Err(e) => return resp.error(&e),
    };
    let name = req.name.clone();
    with_online(resp, &name, move |d| {
        let now = d.now();
        let dropped = d.driver.engine_mut().drop_quarantine(req.block, now);
        drop_quarantine_answer(&req, dropped)
    });
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_rpc_clear_stats(
    request: *mut sys::spdk_jsonrpc_request,
    params: *const sys::spdk_json_val,
) {
    // SAFETY: SPDK passes a live request and parameter tree.
    let (resp, p) = unsafe { begin(request, params) };
    let req = match p.and_then(|p| parse_name("bdev_writeboost_clear_stats", p.as_ref())) {
        Ok(r) => r,
        Err(e) => return resp.error(&e),
    };
    let name = req.name.clone();
    with_online(resp, &name, move |d| {
        d.driver.engine_mut().clear_stats();
        Ok(Value::Bool(true))
    });
}
