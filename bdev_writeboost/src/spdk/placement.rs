//! Where a device runs: an SPDK thread of its own, placed on one core (the
//! one `bdev_writeboost_create` names, or the next round robin over the
//! target's cores), and the messages that cross between it and the app
//! thread. A leaf: the module and the device both use it.

use std::sync::atomic::{AtomicUsize, Ordering};

use spdk_sys as sys;
use writeboost_rpc::RpcError;

/// The next core a device without `core` goes to (an index into the
/// target's cores).
static NEXT_CORE: AtomicUsize = AtomicUsize::new(0);

/// A closure run once on the thread it is sent to.
struct Msg(Box<dyn FnOnce()>);

// SAFETY: a message is made on one SPDK thread and run once on the thread
// it is sent to. What its closure captures (raw pointers to a device and
// its base bdevs, an RPC request, an `Arc<Shared>`) is used on the sending
// or the receiving thread only as the protocol of `module` and `device`
// says: a device is touched on its own thread, the registry and the base
// bdevs' descriptors on the app thread.
unsafe impl Send for Msg {}

extern "C" fn run_msg(arg: *mut std::ffi::c_void) {
    // SAFETY: arg is the Msg boxed in `run_on`, taken back once here.
    let m = unsafe { Box::from_raw(arg.cast::<Msg>()) };
    (m.0)();
}

/// Runs `f` on `thread` at its next poll. The thread must not have exited
/// (a device's thread exits only once the app thread has let go of it).
pub fn run_on(thread: *mut sys::spdk_thread, f: impl FnOnce() + 'static) {
    let m = Box::into_raw(Box::new(Msg(Box::new(f))));
    // SAFETY: thread is live (per the contract); SPDK takes the message and
    // calls run_msg with it once (it aborts rather than drop one).
    unsafe { sys::spdk_thread_send_msg(thread, Some(run_msg), m.cast()) };
}

/// The app thread: the registry, RPCs, examine and bdev registration.
pub fn app_thread() -> *mut sys::spdk_thread {
    // SAFETY: no preconditions; the app thread lives as long as the app.
    unsafe { sys::spdk_thread_get_app_thread() }
}

/// Runs `f` on the app thread.
pub fn run_on_app(f: impl FnOnce() + 'static) {
    run_on(app_thread(), f);
}

/// The target's cores, in order.
fn cores() -> Vec<u32> {
    let mut out = Vec::new();
    // SAFETY: plain getters over the environment's core list.
    unsafe {
        let mut c = sys::spdk_env_get_first_core();
        while c != u32::MAX {
            out.push(c);
            c = sys::spdk_env_get_next_core(c);
        }
    }
    out
}

/// The core for device `name`: `asked`, if the target runs on it, or the
/// next one round robin.
pub fn pick_core(name: &str, asked: Option<u32>) -> Result<u32, RpcError> {
    let cores = cores();
    if cores.is_empty() {
        return Err(RpcError::new(
            writeboost_rpc::code::EINVAL,
            "the target reports no cores",
        ));
    }
    match asked {
        Some(c) if cores.contains(&c) => Ok(c),
        Some(c) => Err(RpcError::invalid_params(format!(
            "bdev_writeboost_create {name}: core={c} is not one of the target's cores ({}); \
             pick one of them, or leave core out to place the device round robin",
            cores
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        None => Ok(cores[NEXT_CORE.fetch_add(1, Ordering::Relaxed) % cores.len()]),
    }
}

/// Whether a device gets a thread of its own: when asked for a core, or
/// when the target has more than one to spread devices over. On a
/// one-core target it runs on the thread that creates it, as a host that
/// polls only that thread while its configuration loads (fio's SPDK
/// plugin) needs.
pub fn own_thread(asked: Option<u32>) -> bool {
    asked.is_some() || cores().len() > 1
}

/// A new SPDK thread for device `name`, bound to `core`.
pub fn device_thread(name: &str, core: u32) -> Result<*mut sys::spdk_thread, RpcError> {
    let cname = std::ffi::CString::new(format!("writeboost_{name}")).unwrap_or_default();
    let mut mask = sys::spdk_cpuset::default();
    // SAFETY: mask is a valid cpuset; cname lives for the call, and SPDK
    // copies the name and the mask.
    let thread = unsafe {
        sys::spdk_cpuset_zero(&mut mask);
        sys::spdk_cpuset_set_cpu(&mut mask, core, true);
        sys::spdk_thread_create(cname.as_ptr(), &mask)
    };
    if thread.is_null() {
        return Err(RpcError::new(
            writeboost_rpc::code::ENOMEM,
            format!("bdev_writeboost_create {name}: SPDK could not create a thread on core {core}"),
        ));
    }
    Ok(thread)
}

/// Ends the calling thread (a device's, once nothing will reach it again).
pub fn exit_this_thread() {
    // SAFETY: called from a message on the device's own thread, after its
    // pollers and channels are gone and the app thread let go of it.
    unsafe { sys::spdk_thread_exit(sys::spdk_get_thread()) };
}
