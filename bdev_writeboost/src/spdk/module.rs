//! The bdev module: its callbacks (init, fini, examine, config_json,
//! destruct, dump_info_json, base-bdev events), the registry of devices and
//! of creates waiting for their base bdevs, and create/delete.
//!
//! Like SPDK's passthru module: a create that names a base bdev not present
//! yet is remembered and completed by examine when it appears; both base
//! bdevs are claimed exclusively; destruct shuts the engine down, then
//! releases the claims, closes the descriptors and unregisters the
//! io_device, in that order.
//!
//! All of this runs on the app thread, which owns the registry. Each
//! device runs on a thread of its own (`placement`); the registry keeps
//! its shared part, and reaches the device itself only by messages.

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_void};
use std::ptr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::json;
use spdk_sys as sys;
use writeboost_engine::Engine;
use writeboost_engine::driver::Lifecycle;
use writeboost_engine::pmem::Pmem;
use writeboost_rpc::{BaseGeometry, CreateRequest, RpcError, code};

use super::channel::CHANNEL_FNS;
use super::completion::Done;
use super::device::{Base, Device, Hooks, Shared, now_ns, register_bdev};
use super::dma::DmaAlloc;
use super::examine::{ExamineHold, wb_module};
use super::json::write_value;
use super::log;
use super::placement::{device_thread, own_thread, pick_core, run_on};

/// Ticks at module init: the engines' time origin.
static START_TICKS: AtomicU64 = AtomicU64::new(0);
/// "The pmem pool is not DAX" is said once per process.
static WARNED_NOT_DAX: AtomicBool = AtomicBool::new(false);

/// A device, as the app thread knows it.
struct Entry {
    shared: Arc<Shared>,
    req: CreateRequest,
    cache: *mut sys::spdk_bdev,
    backing: *mut sys::spdk_bdev,
    /// The registered writeboost bdev (null until registered).
    bdev: *mut sys::spdk_bdev,
    /// Told the outcome of the create once the engine is ready (or failed).
    on_created: Option<Done>,
    /// Held while a create that examine started is opening, so that
    /// `bdev_wait_for_examine` (and a JSON config's later entries) see the bdev.
    hold: Option<Rc<ExamineHold>>,
    /// A base bdev is being removed.
    removed: bool,
}

#[derive(Default)]
struct Registry {
    devices: Vec<Entry>,
    pending: Vec<CreateRequest>,
}

thread_local! {
    // The registry, RPCs, examine and bdev events live on the app thread.
    static REGISTRY: RefCell<Registry> = RefCell::new(Registry::default());
}

/// The shared part of the device named `name`.
pub fn find(name: &str) -> Option<Arc<Shared>> {
    REGISTRY.with(|r| {
        r.borrow()
            .devices
            .iter()
            .find(|e| e.req.name == name)
            .map(|e| Arc::clone(&e.shared))
    })
}

pub fn all() -> Vec<Arc<Shared>> {
    REGISTRY.with(|r| {
        r.borrow()
            .devices
            .iter()
            .map(|e| Arc::clone(&e.shared))
            .collect()
    })
}

pub fn pending() -> Vec<CreateRequest> {
    REGISTRY.with(|r| r.borrow().pending.clone())
}

/// Runs `f` on the registry entry of the device whose shared part is `shared`.
fn with_entry<T>(shared: &Arc<Shared>, f: impl FnOnce(&mut Entry) -> T) -> Option<T> {
    REGISTRY.with(|r| {
        r.borrow_mut()
            .devices
            .iter_mut()
            .find(|e| Arc::ptr_eq(&e.shared, shared))
            .map(f)
    })
}

/// On the app thread: the device's open ended. With a bdev, register it.
fn opened(shared: Arc<Shared>, r: Result<*mut sys::spdk_bdev, RpcError>) {
    let Some((name, removed)) = with_entry(&shared, |e| (e.req.name.clone(), e.removed)) else {
        return;
    };
    let r = r.and_then(|bdev| {
        if removed {
            // SAFETY: the bdev is ours and was never registered.
            unsafe { super::device::free_bdev(bdev) };
            return Err(RpcError::new(
                code::ENODEV,
                format!("bdev_writeboost_create {name}: a base bdev was removed while the cache was opening"),
            ));
        }
        register_bdev(bdev).map_err(|rc| {
            RpcError::new(
                code::ENOMEM,
                format!("bdev_writeboost_create {name}: spdk_bdev_register failed (rc {rc})"),
            )
        })
    });
    let (done, hold) = with_entry(&shared, |e| {
        if let Ok(bdev) = r {
            e.bdev = bdev;
        }
        (e.on_created.take(), e.hold.take())
    })
    .unwrap_or((None, None));
    // Registered or not, the device's thread hears of it.
    let tell = match &r {
        Ok(bdev) => Ok(*bdev),
        Err(e) => Err(e.message.clone()),
    };
    let s = Arc::clone(&shared);
    run_on(shared.thread, move || {
        if let Some(dev) = s.device() {
            // SAFETY: a message on the device's thread; dev is live.
            unsafe {
                Device::enter_or_defer(dev, true, move |d| match tell {
                    Ok(bdev) => d.registered(Some(bdev), None),
                    Err(m) => d.registered(None, Some(m)),
                });
            }
        }
    });
    if let Some(done) = done {
        done(r.map(|_| serde_json::Value::String(name)));
    }
    drop(hold);
}

/// On the app thread: the device is gone; nothing more reaches its thread.
fn forget(shared: &Arc<Shared>) {
    let entry = REGISTRY.with(|r| {
        let mut r = r.borrow_mut();
        let i = r
            .devices
            .iter()
            .position(|e| Arc::ptr_eq(&e.shared, shared))?;
        Some(r.devices.swap_remove(i))
    });
    if let Some(mut e) = entry
        && let Some(done) = e.on_created.take()
    {
        done(Err(RpcError::new(
            code::EIO,
            format!(
                "bdev_writeboost_create {}: the device stopped while opening",
                e.req.name
            ),
        )));
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_module_init() -> i32 {
    // SAFETY: no preconditions.
    START_TICKS.store(unsafe { sys::spdk_get_ticks() }, Ordering::Relaxed);
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_module_fini() {
    REGISTRY.with(|r| r.borrow_mut().pending.clear());
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_get_ctx_size() -> i32 {
    // Requests are tracked in the device, not in the bdev_io.
    0
}

/// A new bdev may complete a create that waits for its base bdevs. The
/// examine stays in progress until that device is registered (or failed),
/// so `bdev_wait_for_examine`, and the entries of a JSON config after it,
/// see the writeboost bdev. (examine_disk, unlike examine_config, may finish
/// after it returns; it runs for bdevs nobody claimed at examine_config.)
#[unsafe(no_mangle)]
pub extern "C" fn wb_examine_disk(_bdev: *mut sys::spdk_bdev) {
    let ready: Vec<CreateRequest> = REGISTRY.with(|r| {
        let mut r = r.borrow_mut();
        let (now, later): (Vec<_>, Vec<_>) = r
            .pending
            .drain(..)
            .partition(|p| exists(&p.backing_bdev) && exists(&p.cache_bdev));
        r.pending = later;
        now
    });
    // Examine is done once every device started here is registered (or
    // failed): the last clone of the hold reports it.
    let hold = Rc::new(ExamineHold);
    for req in ready {
        log::notice(&format!(
            "{}: base bdevs {} and {} are present; creating",
            req.name, req.cache_bdev, req.backing_bdev
        ));
        start(req, None, Some(Rc::clone(&hold)));
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_config_json(w: *mut sys::spdk_json_write_ctx) -> i32 {
    let mut entries = Vec::new();
    for shared in all() {
        if shared.lifecycle() == Lifecycle::Online {
            let snap = shared.snapshot.lock().unwrap_or_else(|p| p.into_inner());
            entries.extend(snap.config.clone());
        }
    }
    for p in pending() {
        entries.push(p.config_params(&p.tunables));
    }
    for params in entries {
        let v = json!({"method": "bdev_writeboost_create", "params": params});
        // SAFETY: SPDK positions w inside the bdev subsystem's config array.
        unsafe { write_value(w, &v) };
    }
    0
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_bdev_destruct(ctx: *mut c_void) -> i32 {
    let shared = shared_of(ctx);
    let s = Arc::clone(&shared);
    // The device's thread shuts the engine down; destruct_done comes once
    // it let go of everything (`device::release`), after this returns.
    run_on(shared.thread, move || {
        if let Some(dev) = s.device() {
            // SAFETY: a message on the device's thread; dev is live.
            unsafe { Device::enter_or_defer(dev, false, |d| d.begin_close()) };
        }
    });
    1
}

/// The device's shared part from the io_device pointer SPDK hands back (a
/// reference `Device::on_ready` made), as a reference of our own.
fn shared_of(ctx: *mut c_void) -> Arc<Shared> {
    let p = ctx.cast::<Shared>().cast_const();
    // SAFETY: ctx is the io_device reference, alive while the bdev is
    // registered; the count is raised before a reference is made from it.
    unsafe {
        Arc::increment_strong_count(p);
        Arc::from_raw(p)
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_bdev_dump_info_json(
    ctx: *mut c_void,
    w: *mut sys::spdk_json_write_ctx,
) -> i32 {
    let shared = shared_of(ctx);
    // (As of the device's last refresh, at most a quarter of a second ago:
    // bdev_writeboost_get_stats asks the device itself.)
    let v = shared
        .snapshot
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .report
        .clone();
    // SAFETY: SPDK positions w inside the bdev's driver_specific object.
    unsafe {
        let key = c"writeboost";
        sys::spdk_json_write_name(w, key.as_ptr());
        write_value(w, &v)
    }
}

fn exists(name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: c is a valid C string.
    unsafe { !sys::spdk_bdev_get_by_name(c.as_ptr()).is_null() }
}

/// `bdev_writeboost_create`: start now, or wait for the base bdevs.
pub fn create(req: CreateRequest, done: Option<Done>) {
    let taken = find(&req.name).is_some()
        || REGISTRY.with(|r| r.borrow().pending.iter().any(|p| p.name == req.name))
        || exists(&req.name);
    if taken {
        if let Some(done) = done {
            done(Err(RpcError::new(
                code::EEXIST,
                format!(
                    "a bdev named '{}' already exists; pick another name",
                    req.name
                ),
            )));
        }
        return;
    }
    let missing: Vec<&str> = [&req.cache_bdev, &req.backing_bdev]
        .into_iter()
        .filter(|n| !exists(n))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() && !req.wait_for_bdevs {
        if let Some(done) = done {
            done(Err(RpcError::new(
                code::ENODEV,
                format!(
                    "bdev_writeboost_create {}: no bdev named {}; create it first, or pass \
                     wait_for_bdevs=true to create {} when it appears",
                    req.name,
                    missing.join(" or "),
                    req.name
                ),
            )));
        }
        return;
    }
    if !missing.is_empty() {
        log::notice(&format!(
            "{}: waiting for bdev {} to appear",
            req.name,
            missing.join(" and ")
        ));
        let name = req.name.clone();
        REGISTRY.with(|r| r.borrow_mut().pending.push(req));
        if let Some(done) = done {
            done(Ok(serde_json::Value::String(name)));
        }
        return;
    }
    start(req, done, None);
}

/// Opens and claims both base bdevs, opens the engine and starts the
/// device on a thread of its own.
fn start(req: CreateRequest, done: Option<Done>, hold: Option<Rc<ExamineHold>>) {
    let placed = pick_core(&req.name, req.core)
        .and_then(|core| {
            // Base I/O on a thread of its own only on another core.
            let io_core = match req.io_core {
                Some(c) => Some(pick_core(&req.name, Some(c))?).filter(|&c| c != core),
                None => None,
            };
            Ok((core, io_core, try_start(&req)?))
        })
        .and_then(|(core, io_core, started)| {
            let own = if own_thread(req.core) {
                device_thread(&req.name, core)
            } else {
                // SAFETY: a plain getter; this is an SPDK thread.
                Ok(unsafe { sys::spdk_get_thread() })
            };
            let threads = own.and_then(|t| match io_core {
                Some(c) => Ok((t, Some((device_thread(&format!("{}_io", req.name), c)?, c)))),
                None => Ok((t, None)),
            });
            match threads {
                Ok((t, io)) => Ok((core, t, io, started)),
                Err(e) => {
                    let (_, cache, backing, _) = started;
                    close_base(cache);
                    close_base(backing);
                    Err(e)
                }
            }
        });
    match placed {
        Ok((core, thread, io, (engine, cache, backing, dax))) => {
            let start_ticks = START_TICKS.load(Ordering::Relaxed);
            let hooks = Hooks {
                channel_fns: CHANNEL_FNS,
                on_open: opened,
                on_gone: forget,
            };
            let (cache_bdev, backing_bdev) = (cache.bdev, backing.bdev);
            let (dev, shared) = Device::new(
                req.clone(),
                engine,
                cache,
                backing,
                hooks,
                dax,
                start_ticks,
                thread,
                core,
                io,
            );
            REGISTRY.with(|r| {
                r.borrow_mut().devices.push(Entry {
                    shared,
                    req,
                    cache: cache_bdev,
                    backing: backing_bdev,
                    bdev: ptr::null_mut(),
                    on_created: done,
                    hold,
                    removed: false,
                })
            });
            // SAFETY: dev is live; the message runs on its thread.
            run_on(thread, move || unsafe { Device::start(dev) });
        }
        Err(e) => {
            log::error(&e.message);
            if let Some(done) = done {
                done(Err(e));
            }
        }
    }
}

type Started = (Engine<DmaAlloc>, Base, Base, Option<bool>);

fn try_start(req: &CreateRequest) -> Result<Started, RpcError> {
    let cache = open_base(&req.cache_bdev, "cache")?;
    let backing = match open_base(&req.backing_bdev, "backing") {
        Ok(b) => b,
        Err(e) => {
            close_base(cache);
            return Err(e);
        }
    };
    match build_engine(req, &cache, &backing) {
        Ok((engine, dax)) => Ok((engine, cache, backing, dax)),
        Err(e) => {
            close_base(cache);
            close_base(backing);
            Err(e)
        }
    }
}

fn build_engine(
    req: &CreateRequest,
    cache: &Base,
    backing: &Base,
) -> Result<(Engine<DmaAlloc>, Option<bool>), RpcError> {
    for (b, role) in [(cache, "cache"), (backing, "backing")] {
        if b.block_size != 512 && b.block_size != 4096 {
            return Err(RpcError::new(
                code::EINVAL,
                format!(
                    "{role} bdev '{}' has {}-byte blocks; writeboost needs 512 or 4096",
                    b.name, b.block_size
                ),
            ));
        }
    }
    // SAFETY: backing.bdev is open; the uuid is copied out at once.
    let backing_uuid = unsafe { (*sys::spdk_bdev_get_uuid(backing.bdev)).u.raw };
    let mut new_uuid = sys::spdk_uuid::default();
    // SAFETY: new_uuid is a valid out-parameter.
    unsafe { sys::spdk_uuid_generate(&mut new_uuid) };
    let geometry = |b: &Base| BaseGeometry {
        size: b.size,
        block_size: b.block_size,
    };
    // SAFETY: the union is 16 plain bytes.
    let new_uuid = unsafe { new_uuid.u.raw };
    let params = req.open_params(geometry(cache), geometry(backing), backing_uuid, new_uuid);
    let now = now_ns(
        // SAFETY: no preconditions.
        unsafe { sys::spdk_get_ticks_hz() },
        START_TICKS.load(Ordering::Relaxed),
    );
    let bad = |e: writeboost_engine::ConfigError| {
        RpcError::invalid_params(format!("bdev_writeboost_create {}: {e}", req.name))
    };
    match &req.pmem_path {
        Some(path) => {
            let pool =
                writeboost_pmem::PmdkPool::open(std::path::Path::new(path)).map_err(|e| {
                    RpcError::new(
                        code::EINVAL,
                        format!("bdev_writeboost_create {}: {e}", req.name),
                    )
                })?;
            let dax = pool.is_dax();
            if !dax && !WARNED_NOT_DAX.swap(true, Ordering::Relaxed) {
                log::warn(&format!(
                    "pmem pool {path} is not DAX persistent memory: persistence falls back to \
                     msync and mode 1 loses its speed (data stays safe)"
                ));
            }
            let pool: Box<dyn Pmem> = Box::new(pool);
            let engine = Engine::open_with_pool(params, DmaAlloc, pool, now).map_err(bad)?;
            Ok((engine, Some(dax)))
        }
        None => {
            let engine = Engine::open(params, DmaAlloc, now).map_err(bad)?;
            Ok((engine, None))
        }
    }
}

/// "In use", naming the writeboost device that uses it when it is one of ours.
fn claimed_error(role: &str, name: &str, holder: &str) -> RpcError {
    let user = REGISTRY.with(|r| {
        r.borrow().devices.iter().find_map(|e| {
            (e.req.cache_bdev == name || e.req.backing_bdev == name).then(|| e.req.name.clone())
        })
    });
    let by = match user {
        Some(dev) => format!("writeboost device '{dev}'"),
        None => format!("the {holder} module"),
    };
    RpcError::new(
        code::EBUSY,
        format!("{role} bdev '{name}' is already claimed by {by}; delete whatever uses it first"),
    )
}

/// Opens a base bdev for writing and claims it, on this (the app) thread;
/// the device takes its channel on its own thread.
fn open_base(name: &str, role: &str) -> Result<Base, RpcError> {
    let cname = CString::new(name)
        .map_err(|_| RpcError::invalid_params(format!("{role} bdev name contains a NUL byte")))?;
    // A claimed bdev cannot be opened for writing: say who holds it.
    // SAFETY: cname is valid; the bdev (if any) is only read.
    let holder = unsafe {
        let bdev = sys::spdk_bdev_get_by_name(cname.as_ptr());
        let h = if bdev.is_null() {
            ptr::null()
        } else {
            sys::spdk_sys_bdev_claim_module_name(bdev)
        };
        (!h.is_null()).then(|| CStr::from_ptr(h).to_string_lossy().into_owned())
    };
    if let Some(holder) = holder {
        return Err(claimed_error(role, name, &holder));
    }
    let mut desc: *mut sys::spdk_bdev_desc = ptr::null_mut();
    // SAFETY: cname is valid; desc is an out-parameter.
    let rc = unsafe {
        sys::spdk_bdev_open_ext(
            cname.as_ptr(),
            true,
            Some(base_event),
            ptr::null_mut(),
            &mut desc,
        )
    };
    if rc != 0 {
        return Err(RpcError::new(
            rc,
            format!(
                "cannot open {role} bdev '{name}' for writing (rc {rc}); check that it exists and is not read-only"
            ),
        ));
    }
    // SAFETY: desc is open; the calls below only read the bdev or claim it.
    unsafe {
        let bdev = sys::spdk_bdev_desc_get_bdev(desc);
        let holder = sys::spdk_sys_bdev_claim_module_name(bdev);
        if !holder.is_null() {
            let holder = CStr::from_ptr(holder).to_string_lossy().into_owned();
            sys::spdk_bdev_close(desc);
            return Err(claimed_error(role, name, &holder));
        }
        let rc = sys::spdk_bdev_module_claim_bdev(bdev, desc, wb_module());
        if rc != 0 {
            sys::spdk_bdev_close(desc);
            return Err(RpcError::new(
                code::EBUSY,
                format!("cannot claim {role} bdev '{name}' (rc {rc}); another module uses it"),
            ));
        }
        let block_size = sys::spdk_bdev_get_block_size(bdev);
        Ok(Base {
            name: name.to_string(),
            desc,
            bdev,
            ch: ptr::null_mut(),
            size: sys::spdk_bdev_get_num_blocks(bdev) * block_size as u64,
            block_size,
            supports_flush: sys::spdk_bdev_io_type_supported(
                bdev,
                sys::spdk_bdev_io_type_SPDK_BDEV_IO_TYPE_FLUSH,
            ),
            supports_unmap: sys::spdk_bdev_io_type_supported(
                bdev,
                sys::spdk_bdev_io_type_SPDK_BDEV_IO_TYPE_UNMAP,
            ),
        })
    }
}

fn close_base(b: Base) {
    // SAFETY: b was opened and claimed by open_base on this thread.
    unsafe {
        sys::spdk_bdev_module_release_bdev(b.bdev);
        sys::spdk_bdev_close(b.desc);
    }
}

/// `bdev_writeboost_delete`: `done` is told once the bdev is unregistered
/// (or at once, if it cannot be).
pub fn delete(name: &str, done: Done) {
    let was_pending = REGISTRY.with(|r| {
        let mut r = r.borrow_mut();
        let before = r.pending.len();
        r.pending.retain(|p| p.name != name);
        before != r.pending.len()
    });
    if was_pending {
        return done(Ok(serde_json::Value::Bool(true)));
    }
    let Some(shared) = find(name) else {
        return done(Err(RpcError::no_such_device(name)));
    };
    let registered = with_entry(&shared, |e| !e.bdev.is_null()).unwrap_or(false);
    if shared.lifecycle() != Lifecycle::Online || !registered {
        return done(Err(RpcError::new(
            code::EBUSY,
            format!("writeboost bdev '{name}' is still opening or already closing; retry"),
        )));
    }
    let cname = CString::new(name).unwrap_or_default();
    let arg = Box::into_raw(Box::new(done));
    // SAFETY: cname is valid; arg is taken back once by unregistered, or
    // here if SPDK refuses at once.
    unsafe {
        let rc = sys::spdk_bdev_unregister_by_name(
            cname.as_ptr(),
            wb_module(),
            Some(unregistered),
            arg.cast(),
        );
        if rc != 0 {
            let done = Box::from_raw(arg);
            done(Err(RpcError::new(
                rc,
                format!("cannot unregister '{name}' (rc {rc})"),
            )));
        }
    }
}

/// SPDK unregistered a bdev that `delete` asked for.
extern "C" fn unregistered(arg: *mut c_void, rc: i32) {
    // SAFETY: arg is the callback boxed in delete, taken back once.
    let done = unsafe { Box::from_raw(arg.cast::<Done>()) };
    if rc == 0 {
        done(Ok(serde_json::Value::Bool(true)));
    } else {
        done(Err(RpcError::new(
            rc,
            format!("could not unregister the bdev (rc {rc})"),
        )));
    }
}

/// A base bdev is going away: unregister the writeboost bdev on top.
extern "C" fn base_event(ty: u32, bdev: *mut sys::spdk_bdev, _ctx: *mut c_void) {
    if ty != sys::spdk_bdev_event_type_SPDK_BDEV_EVENT_REMOVE {
        return;
    }
    let hit: Vec<(Arc<Shared>, *mut sys::spdk_bdev)> = REGISTRY.with(|r| {
        let mut r = r.borrow_mut();
        r.devices
            .iter_mut()
            .filter(|e| e.cache == bdev || e.backing == bdev)
            .map(|e| {
                log::warn(&format!(
                    "{}: base bdev {} is being removed; detaching",
                    e.req.name,
                    if e.cache == bdev {
                        &e.req.cache_bdev
                    } else {
                        &e.req.backing_bdev
                    }
                ));
                e.removed = true;
                (Arc::clone(&e.shared), e.bdev)
            })
            .collect()
    });
    for (shared, wb) in hit {
        if !wb.is_null() && shared.lifecycle() == Lifecycle::Online {
            // SAFETY: wb is registered; this is the app thread.
            unsafe { sys::spdk_bdev_unregister(wb, None, ptr::null_mut()) };
        }
        let s = Arc::clone(&shared);
        run_on(shared.thread, move || {
            if let Some(dev) = s.device() {
                // SAFETY: a message on the device's thread; dev is live.
                unsafe { Device::enter_or_defer(dev, true, |d| d.base_removed()) };
            }
        });
    }
}
