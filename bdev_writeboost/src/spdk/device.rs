//! One writeboost device: the engine, its two base bdevs' channels and the
//! user I/O in flight, all owned by the device's own SPDK thread, placed on
//! one core (`placement`). The app thread opened the base bdevs and
//! registers the bdev; it reaches the device only through messages and the
//! `Shared` part, and the device tells it of its open and its end the same
//! way (`Hooks`).
//!
//! Every entry point (user I/O on that thread, base-bdev completions, the
//! poller, RPCs, destruct) takes the `busy` flag and then runs [`Device::run`]
//! until the engine has nothing more to say. A user completion can make the
//! bdev layer submit new I/O at once; that I/O finds `busy` set and waits on
//! the inbox ring, which `run` drains before it returns, so the engine is
//! never entered twice.

use std::ffi::{CString, c_void};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use spdk_sys as sys;
use writeboost_engine::config::BufferMode;
use writeboost_engine::driver::{CmdMem, Driver, Lifecycle, Outcome, Started, Target, UserOp};
use writeboost_engine::{Command, CommandKind, DeviceError, Engine, LogId, Nanos, ReqId};
use writeboost_rpc::{CreateRequest, RpcError, code, device_report};

use super::dma::DmaAlloc;
use super::grants::{DeviceGrants, GRANT_SLOTS, SlotGrant};
use super::io_thread::{self, IoCmd, IoShared};
use super::log;
use super::placement::{exit_this_thread, run_on, run_on_app};
use super::ring::Ring;
use super::user_io::{UserIo, UserKind};

/// How long a device whose base bdev went away waits for a clean shutdown
/// before it lets go anyway (the logs on the cache survive for a re-create).
const REMOVED_SHUTDOWN_GRACE_NS: u64 = 5_000_000_000;
/// Requests one turn of the device's poller takes from its inbox, at most:
/// those that were there when the turn began. The rest wait for the next
/// turn (the poller runs on every turn of the reactor). Only the poller
/// takes them, not every base completion: a submitter on another core
/// refills the inbox at once, one on the device's own core only once per
/// turn of the reactor, and taking what arrived meanwhile served the first
/// several times as often.
const INBOX_PER_TURN: usize = 128;
/// How often the report `bdev_get_bdevs` shows is refreshed.
const REPORT_EVERY_NS: u64 = 250_000_000;

/// What the app thread may read of a device without asking its thread.
#[derive(Default)]
pub struct Snapshot {
    /// The `bdev_writeboost_create` entry `save_config` writes (online only).
    pub config: Option<serde_json::Value>,
    /// What `bdev_get_bdevs` shows under `driver_specific`.
    pub report: serde_json::Value,
}

/// The part of a device other threads may touch.
pub struct Shared {
    /// User I/O handed over by other threads (or while the device is busy).
    pub inbox: Ring<UserIo>,
    /// Slots granted to channels, asked for and handed back.
    pub grants: DeviceGrants,
    /// Set while the owning thread is inside the engine.
    pub busy: AtomicBool,
    /// The owning thread.
    pub thread: *mut sys::spdk_thread,
    /// Dereferenced only on `thread`; null once the device is torn down
    /// (channels may outlive it until the io_device is unregistered).
    pub dev: AtomicPtr<Device>,
    /// Work that reached the device while it was busy on its own thread
    /// (SPDK may call back into the module from inside a call the engine
    /// made, e.g. an io_wait callback from `spdk_bdev_free_io`): run by the
    /// entry already under way instead of being dropped.
    pub deferred: Mutex<Vec<OnDeviceThread>>,
    /// `deferred` holds something (so a turn locks it only then).
    pub deferred_any: AtomicBool,
    pub supports_unmap: bool,
    pub supports_write_zeroes: bool,
    /// The device's lifecycle (`lifecycle_code`), for the app thread.
    pub state: AtomicU8,
    pub snapshot: Mutex<Snapshot>,
    /// The core the device's thread runs on.
    pub core: u32,
}

impl Shared {
    pub fn lifecycle(&self) -> Lifecycle {
        match self.state.load(Ordering::Acquire) {
            0 => Lifecycle::Opening,
            1 => Lifecycle::Online,
            2 => Lifecycle::Draining,
            3 => Lifecycle::Closing,
            4 => Lifecycle::Closed,
            _ => Lifecycle::Failed,
        }
    }

    /// The device, if it still exists: for messages run on its thread.
    pub fn device(&self) -> Option<*mut Device> {
        let d = self.dev.load(Ordering::Acquire);
        (!d.is_null()).then_some(d)
    }
}

fn lifecycle_code(l: Lifecycle) -> u8 {
    match l {
        Lifecycle::Opening => 0,
        Lifecycle::Online => 1,
        Lifecycle::Draining => 2,
        Lifecycle::Closing => 3,
        Lifecycle::Closed => 4,
        Lifecycle::Failed => 5,
    }
}

// SAFETY: `thread` is only compared and passed to SPDK; `dev` is dereferenced
// only on the owning thread; the rest is Sync.
unsafe impl Sync for Shared {}
// SAFETY: as above.
unsafe impl Send for Shared {}

/// Work for the device, queued and run on its own thread only.
pub struct OnDeviceThread(Box<dyn FnOnce(&mut Device)>);

// SAFETY: an `OnDeviceThread` is created, queued and run on the device's
// thread only (`Device::enter` is called there), so the raw pointers its
// closure holds never cross threads; the Mutex only satisfies `Sync`.
unsafe impl Send for OnDeviceThread {}

/// A base bdev held open and claimed.
pub struct Base {
    pub name: String,
    pub desc: *mut sys::spdk_bdev_desc,
    pub bdev: *mut sys::spdk_bdev,
    pub ch: *mut sys::spdk_io_channel,
    pub size: u64,
    pub block_size: u32,
    pub supports_flush: bool,
    pub supports_unmap: bool,
}

/// A device command handed to a base bdev.
struct CmdCtx {
    dev: *mut Device,
    cmd: Command,
    /// The memory it reads into or writes from (null for the others),
    /// kept for a resubmission after -ENOMEM.
    data: *mut u8,
    wait: sys::spdk_bdev_io_wait_entry,
}

/// The base bdevs as the driver's [`Target`], borrowed from the device for
/// one pump or one resubmission.
struct Bases<'a> {
    dev: *mut Device,
    name: &'a str,
    cache: &'a Base,
    backing: &'a Base,
    /// Commands on the base bdevs.
    inflight: &'a mut usize,
    /// Commands waiting for a base bdev_io to become free.
    waiting: &'a mut usize,
    /// The I/O thread that starts the commands, if the device has one.
    io: Option<&'a IoShared>,
}

/// The io_device callbacks that make and destroy a device's channels.
pub struct ChannelFns {
    pub create: unsafe extern "C" fn(*mut c_void, *mut c_void) -> i32,
    pub destroy: unsafe extern "C" fn(*mut c_void, *mut c_void),
    pub ctx_size: u32,
}

/// What the layer that creates a device gives it: how to make channels,
/// and whom to tell, on the app thread, of the open's outcome (the bdev to
/// register, or why not) and of the device's end.
pub struct Hooks {
    pub channel_fns: ChannelFns,
    pub on_open: fn(Arc<Shared>, Result<*mut sys::spdk_bdev, RpcError>),
    /// The device is gone (the registry lets go of it); nothing more
    /// reaches its thread after this.
    pub on_gone: fn(&Arc<Shared>),
}

/// What a device leaves for the app thread once its own thread let go of
/// everything: the base bdevs to release and close (opened there), the
/// io_device to unregister, the bdev whose destruct is done, and the
/// thread to end.
struct Gone {
    shared: Arc<Shared>,
    bases: [(*mut sys::spdk_bdev_desc, *mut sys::spdk_bdev); 2],
    io_device: bool,
    destructed: Option<*mut sys::spdk_bdev>,
    on_gone: fn(&Arc<Shared>),
}

pub struct Device {
    pub shared: *mut Shared,
    /// Keeps `shared` alive while the device is.
    shared_ref: Arc<Shared>,
    pub req: CreateRequest,
    pub driver: Driver<DmaAlloc, UserIo>,
    pub cache: Base,
    pub backing: Base,
    /// The registered bdev (null until the engine is ready).
    pub bdev: *mut sys::spdk_bdev,
    pub io_device_registered: bool,
    poller: *mut sys::spdk_poller,
    next_req: u64,
    /// Resets waiting for the device's I/O in flight to drain.
    resets: Vec<UserIo>,
    /// Commands waiting for a base bdev_io to become free.
    waiting: usize,
    /// Commands on the base bdevs.
    inflight: usize,
    /// The thread its base-bdev commands run on, if not its own.
    io: Option<Arc<IoShared>>,
    /// Makes the io_device's channels.
    channel_fns: ChannelFns,
    on_open: fn(Arc<Shared>, Result<*mut sys::spdk_bdev, RpcError>),
    on_gone: fn(&Arc<Shared>),
    /// The open's outcome went to the app thread.
    told_open: bool,
    pub pmem_is_dax: Option<bool>,
    /// A base bdev was hot-removed.
    pub removed_at: Option<Nanos>,
    /// Nanoseconds per tick, as a 32.32 fixed-point multiplier.
    ns_per_tick: u128,
    start_ticks: u64,
    /// The time of the current turn (read once per entry: reading the tick
    /// counter, and converting it, for every request is measurable).
    now_at: Nanos,
    report_at: Nanos,
    /// Requests this entry may still take from the inbox (the poller's).
    inbox_budget: usize,
}

unsafe extern "C" {
    fn wb_bdev_new(
        name: *const std::ffi::c_char,
        blocklen: u32,
        blockcnt: u64,
        write_cache: bool,
        uuid: *const sys::spdk_uuid,
        ctxt: *mut c_void,
    ) -> *mut sys::spdk_bdev;
    fn wb_bdev_free(bdev: *mut sys::spdk_bdev);
}

/// Registers a bdev `Device::on_ready` made, on the app thread (where SPDK
/// registers bdevs); frees it if SPDK refuses, with SPDK's code.
pub fn register_bdev(bdev: *mut sys::spdk_bdev) -> Result<*mut sys::spdk_bdev, i32> {
    // SAFETY: bdev was made by wb_bdev_new and is not registered yet; this
    // is the app thread.
    let rc = unsafe { sys::spdk_bdev_register(bdev) };
    if rc != 0 {
        // SAFETY: SPDK refused it, so nothing refers to it.
        unsafe { wb_bdev_free(bdev) };
        return Err(rc);
    }
    Ok(bdev)
}

/// Frees a bdev `Device::on_ready` made and nobody registered.
///
/// # Safety
/// `bdev` came from `on_ready` and was never registered.
pub unsafe fn free_bdev(bdev: *mut sys::spdk_bdev) {
    // SAFETY: per the contract.
    unsafe { wb_bdev_free(bdev) }
}

/// Nanoseconds on SPDK's tick counter.
pub fn now_ns(hz: u64, start: u64) -> Nanos {
    // SAFETY: spdk_get_ticks has no preconditions.
    let t = unsafe { sys::spdk_get_ticks() }.saturating_sub(start);
    ((t as u128 * ns_per_tick(hz)) >> 32) as u64
}

/// Nanoseconds per tick as a 32.32 fixed-point multiplier (no division per reading).
fn ns_per_tick(hz: u64) -> u128 {
    (1_000_000_000u128 << 32) / hz.max(1) as u128
}

impl Device {
    /// Wraps an engine that has started opening, for `thread` (on `core`).
    /// Called on the app thread; the device starts on its own thread with
    /// [`Device::start`]. Returns the device and its shared part.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        req: CreateRequest,
        engine: Engine<DmaAlloc>,
        cache: Base,
        backing: Base,
        hooks: Hooks,
        pmem_is_dax: Option<bool>,
        start_ticks: u64,
        thread: *mut sys::spdk_thread,
        core: u32,
        io: Option<(*mut sys::spdk_thread, u32)>,
    ) -> (*mut Device, Arc<Shared>) {
        // SAFETY: a plain getter without preconditions.
        let hz = unsafe { sys::spdk_get_ticks_hz() };
        let shared = Arc::new(Shared {
            inbox: Ring::new(),
            grants: DeviceGrants::new(),
            busy: AtomicBool::new(false),
            thread,
            dev: AtomicPtr::new(ptr::null_mut()),
            deferred: Mutex::new(Vec::new()),
            deferred_any: AtomicBool::new(false),
            supports_unmap: backing.supports_unmap,
            supports_write_zeroes: true,
            state: AtomicU8::new(lifecycle_code(Lifecycle::Opening)),
            snapshot: Mutex::new(Snapshot::default()),
            core,
        });
        let io = io.map(|(t, c)| IoShared::new(&req.name, t, c, &cache, &backing));
        let dev = Box::into_raw(Box::new(Device {
            io,
            shared: Arc::as_ptr(&shared).cast_mut(),
            shared_ref: Arc::clone(&shared),
            req,
            driver: Driver::new(engine),
            cache,
            backing,
            bdev: ptr::null_mut(),
            io_device_registered: false,
            poller: ptr::null_mut(),
            next_req: 1,
            resets: Vec::new(),
            waiting: 0,
            inflight: 0,
            channel_fns: hooks.channel_fns,
            on_open: hooks.on_open,
            on_gone: hooks.on_gone,
            told_open: false,
            pmem_is_dax,
            removed_at: None,
            ns_per_tick: ns_per_tick(hz),
            start_ticks,
            now_at: 0,
            report_at: 0,
            inbox_budget: 0,
        }));
        shared.dev.store(dev, Ordering::Release);
        (dev, shared)
    }

    /// On the device's thread: takes channels to both base bdevs, registers
    /// the poller and runs the engine's open.
    ///
    /// # Safety
    /// `dev` is a live device and the caller is on its thread.
    pub unsafe fn start(dev: *mut Device) {
        // SAFETY: per the contract; the poller is unregistered in `teardown`
        // before `dev` is freed.
        unsafe {
            let d = &mut *dev;
            // Base commands start here, or on the I/O thread with its own
            // channels.
            match &d.io {
                Some(io) => {
                    let io = Arc::clone(io);
                    run_on(io.thread, move || io_thread::start(io));
                }
                None => {
                    for base in [&mut d.cache, &mut d.backing] {
                        base.ch = sys::spdk_bdev_get_io_channel(base.desc);
                    }
                }
            }
            let name = CString::new(format!("writeboost_{}", d.req.name)).unwrap_or_default();
            d.poller = sys::spdk_poller_register_named(
                Some(device_poller),
                dev.cast::<c_void>(),
                0,
                name.as_ptr(),
            );
            let no_channel = [&d.cache, &d.backing]
                .into_iter()
                .find(|b| d.io.is_none() && b.ch.is_null())
                .map(|b| b.name.clone());
            Device::enter_or_defer(dev, true, move |d| {
                if let Some(b) = no_channel {
                    d.fail_open(&format!("no I/O channel for bdev '{b}'"));
                }
            });
        }
    }

    /// The time of this turn.
    pub fn now(&self) -> Nanos {
        self.now_at
    }

    pub fn refresh_now(&mut self) {
        // The tick count SPDK read when this thread's poll began: free, where
        // reading the counter again costs a serialising instruction per entry,
        // and no staler than one poll, far finer than any deadline.
        // SAFETY: the device's thread is a live SPDK thread.
        let t = unsafe { sys::spdk_thread_get_last_tsc(self.shared().thread) }
            .saturating_sub(self.start_ticks);
        // Never backwards: the engine was opened on a fresh reading.
        self.now_at = self
            .now_at
            .max(((t as u128 * self.ns_per_tick) >> 32) as u64);
    }

    fn shared(&self) -> &Shared {
        &self.shared_ref
    }

    /// Runs `f` and then the engine, unless the device is already busy on
    /// this thread: then `f` comes back unrun. With `may_finish`, a device
    /// that is done is torn down afterwards.
    ///
    /// # Safety
    /// `dev` must be a live device and the caller on its thread.
    pub unsafe fn enter<F: FnOnce(&mut Device)>(
        dev: *mut Device,
        may_finish: bool,
        f: F,
    ) -> Result<(), F> {
        // SAFETY: per the contract; the busy flag ensures no other &mut
        // exists (every entry point comes through here).
        unsafe {
            let shared = &*(*dev).shared;
            if shared.busy.swap(true, Ordering::Acquire) {
                return Err(f);
            }
            {
                let d = &mut *dev;
                d.refresh_now();
                f(d);
                d.run();
                shared
                    .state
                    .store(lifecycle_code(d.driver.lifecycle()), Ordering::Release);
            }
            shared.busy.store(false, Ordering::Release);
            if may_finish {
                maybe_finish(dev);
            }
        }
        Ok(())
    }

    /// Like [`Device::enter`], but if the device is busy on this thread
    /// (SPDK called back into the module from inside a call the engine
    /// made, e.g. an io_wait callback from `spdk_bdev_free_io`), `f` is
    /// queued for the entry under way, which runs it before it returns:
    /// a completion or a close is never dropped.
    ///
    /// # Safety
    /// As [`Device::enter`].
    pub unsafe fn enter_or_defer(
        dev: *mut Device,
        may_finish: bool,
        f: impl FnOnce(&mut Device) + 'static,
    ) {
        // SAFETY: per the contract.
        unsafe {
            if let Err(f) = Self::enter(dev, may_finish, f) {
                let shared = &*(*dev).shared;
                shared
                    .deferred
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(OnDeviceThread(Box::new(f)));
                shared.deferred_any.store(true, Ordering::Release);
            }
        }
    }

    /// Feeds the engine until it has no commands, events or queued work left.
    fn run(&mut self) {
        loop {
            let mut did = false;
            if self.shared().deferred_any.swap(false, Ordering::AcqRel) {
                let deferred = std::mem::take(
                    &mut *self
                        .shared()
                        .deferred
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()),
                );
                for work in deferred {
                    (work.0)(self);
                    did = true;
                }
            }
            while self.inbox_budget > 0
                && let Some(io) = self.shared().inbox.pop()
            {
                self.start_user(io);
                self.inbox_budget -= 1;
                did = true;
            }
            did |= self.serve_grants();
            let now = self.now();
            if let Some(io) = &self.io {
                while let Some((token, r)) = io.done.pop() {
                    self.inflight -= 1;
                    self.driver.complete(token, r, now);
                    did = true;
                }
            }
            let (driver, mut bases) = self.split();
            driver.pump(&mut bases, now);
            while let Some(o) = self.driver.poll_outcome() {
                self.on_outcome(o);
                did = true;
            }
            if !self.resets.is_empty() && self.driver.requests_in_flight() == 0 {
                for r in std::mem::take(&mut self.resets) {
                    r.complete(true);
                }
                did = true;
            }
            if !did {
                break;
            }
        }
        // What the poller's turn did not take waits for its next turn.
        self.inbox_budget = 0;
    }

    /// Takes the slots channels hand back, grants slots to channels that
    /// asked, and tells them which logs the engine waits for. Whether
    /// anything was done.
    fn serve_grants(&mut self) -> bool {
        // SAFETY: shared outlives the device (the device holds a reference);
        // only its Sync parts are used.
        let grants = unsafe { &(*self.shared).grants };
        let now = self.now();
        let mut did = false;
        while let Some((log, first, count)) = grants.returns.pop() {
            self.driver
                .engine_mut()
                .return_grant(LogId(log), first, count, now);
            did = true;
        }
        let online = self.driver.lifecycle() == Lifecycle::Online;
        while let Some(asker) = grants.requests.pop() {
            let g = if online && asker.has_room() {
                self.grant(now)
            } else {
                None
            };
            if let Some(back) = asker.give(g) {
                self.driver.engine_mut().return_grant(
                    LogId(back.log),
                    back.first_slot,
                    back.count,
                    now,
                );
            }
            did = true;
        }
        // Stored only when it changes: every channel's poller reads it.
        let wanted = self.driver.engine().grants_wanted_back().get();
        if grants.wanted_back.load(Ordering::Relaxed) != wanted {
            grants.wanted_back.store(wanted, Ordering::Release);
        }
        did
    }

    /// Slots of the open log for a channel, with where their data goes.
    fn grant(&mut self, now: Nanos) -> Option<SlotGrant> {
        let engine = self.driver.engine_mut();
        let g = engine.grant(GRANT_SLOTS, now)?;
        let Some(buf) = engine.buffer_handle(g.buf) else {
            engine.return_grant(g.log, g.first_slot, g.count, now);
            return None;
        };
        // SAFETY: g.offset and the granted slots lie within the buffer
        // (the engine's geometry); no slice is formed over it here.
        let base = unsafe { buf.as_mut_ptr().add(g.offset) };
        Some(SlotGrant {
            log: g.log.get(),
            base,
            first_slot: g.first_slot,
            count: g.count,
        })
    }

    /// The driver, and the base bdevs as its target, borrowed side by side.
    fn split(&mut self) -> (&mut Driver<DmaAlloc, UserIo>, Bases<'_>) {
        let dev: *mut Device = self;
        let bases = Bases {
            dev,
            name: &self.req.name,
            cache: &self.cache,
            backing: &self.backing,
            inflight: &mut self.inflight,
            waiting: &mut self.waiting,
            io: self.io.as_deref(),
        };
        (&mut self.driver, bases)
    }

    /// Takes a user request: checks it and hands it to the engine.
    pub fn start_user(&mut self, io: UserIo) {
        if self.driver.lifecycle() != Lifecycle::Online {
            if let Some(p) = io.published {
                let now = self.now();
                self.driver
                    .engine_mut()
                    .return_grant(LogId(p.log), p.first_slot, p.nr, now);
            }
            io.complete(false);
            return;
        }
        let now = self.now();
        if io.kind == UserKind::Reset {
            self.resets.push(io);
            return;
        }
        let req = ReqId(self.next_req);
        self.next_req += 1;
        let (offset, len) = (io.offset, io.len as u64);
        let op = match io.kind {
            UserKind::Read => UserOp::Read { offset, len },
            UserKind::Write => UserOp::Write { offset, fua: false },
            UserKind::Flush => UserOp::Flush,
            UserKind::Unmap => UserOp::Discard { offset, len },
            UserKind::WriteZeroes => UserOp::WriteZeroes { offset, len },
            UserKind::Reset => unreachable!("handled above"),
        };
        let refused = match io.published {
            Some(p) => self
                .driver
                .submit_granted(
                    req,
                    offset,
                    LogId(p.log),
                    p.first_slot,
                    &p.crcs[..p.nr as usize],
                    false,
                    io,
                    now,
                )
                .err()
                .inspect(|_| {
                    // The slots are still reserved: they come back.
                    self.driver
                        .engine_mut()
                        .return_grant(LogId(p.log), p.first_slot, p.nr, now);
                }),
            None => self.driver.submit(req, op, io, now).err(),
        };
        if let Some((e, io)) = refused {
            log::error(&format!("{}: request refused: {e}", self.req.name));
            io.complete(false);
        }
    }

    fn on_outcome(&mut self, o: Outcome<UserIo>) {
        match o {
            Outcome::Completed { user, result, .. } => {
                if let Err(e) = result {
                    log::error(&format!("{}: I/O failed: {e}", self.req.name));
                }
                user.complete(result.is_ok());
            }
            Outcome::Ready => self.on_ready(),
            Outcome::OpenFailed(e) => {
                let msg = format!(
                    "bdev_writeboost_create {}: {e}; nothing on {} or {} was changed",
                    self.req.name, self.req.cache_bdev, self.req.backing_bdev
                );
                log::error(&msg);
                self.tell_open(Err(RpcError::new(code::EINVAL, msg)));
            }
            Outcome::ShutdownComplete => {
                log::notice(&format!(
                    "{}: shut down cleanly; the cache holds its data for the next create",
                    self.req.name
                ));
            }
        }
    }

    /// The engine recovered the cache: register the io_device and make the
    /// bdev, which the app thread registers (SPDK registers bdevs there).
    fn on_ready(&mut self) {
        let status = self.driver.engine().status();
        let uuid = sys::spdk_uuid {
            u: sys::spdk_uuid__bindgen_ty_1 {
                raw: status.cache_uuid,
            },
        };
        let name = CString::new(self.req.name.clone()).unwrap_or_default();
        // The io_device holds a reference to the shared part, given back
        // in `io_device_gone`.
        let io_device = Arc::into_raw(Arc::clone(&self.shared_ref)).cast_mut();
        // SAFETY: name and uuid are valid for the call; the bdev keeps its
        // own copy of the name; io_device lives until it is unregistered,
        // after the bdev.
        let bdev = unsafe {
            let ioname = CString::new(format!("writeboost_{}", self.req.name)).unwrap_or_default();
            sys::spdk_io_device_register(
                io_device.cast(),
                Some(self.channel_fns.create),
                Some(self.channel_fns.destroy),
                self.channel_fns.ctx_size,
                ioname.as_ptr(),
            );
            self.io_device_registered = true;
            wb_bdev_new(
                name.as_ptr(),
                self.backing.block_size,
                self.backing.size / self.backing.block_size as u64,
                self.req.mode == BufferMode::Volatile,
                &uuid,
                io_device.cast(),
            )
        };
        if bdev.is_null() {
            self.fail_open("out of memory");
            return;
        }
        log::notice(&format!(
            "{}: online over cache {} and backing {} (mode {}, {} dirty blocks recovered), \
             on core {}{}",
            self.req.name,
            self.req.cache_bdev,
            self.req.backing_bdev,
            if self.req.mode == BufferMode::Persistent {
                1
            } else {
                0
            },
            status.nr_dirty_blocks,
            self.shared().core,
            self.io.as_ref().map_or(String::new(), |io| format!(
                ", base I/O on core {}",
                io.core
            ))
        ));
        self.refresh_snapshot(true);
        self.tell_open(Ok(bdev));
    }

    /// The app thread registered the bdev (or could not: then it is freed).
    pub fn registered(&mut self, bdev: Option<*mut sys::spdk_bdev>, why: Option<String>) {
        match bdev {
            Some(b) => self.bdev = b,
            None => {
                let msg = format!(
                    "bdev_writeboost_create {}: {}",
                    self.req.name,
                    why.unwrap_or_default()
                );
                log::error(&msg);
                let now = self.now();
                self.driver.close(now);
                self.driver.abandon();
            }
        }
    }

    /// Tells the app thread the open's outcome, once.
    fn tell_open(&mut self, r: Result<*mut sys::spdk_bdev, RpcError>) {
        if std::mem::replace(&mut self.told_open, true) {
            return;
        }
        let (hook, shared) = (self.on_open, Arc::clone(&self.shared_ref));
        run_on_app(move || hook(shared, r));
    }

    fn fail_open(&mut self, why: &str) {
        let msg = format!("bdev_writeboost_create {}: {why}", self.req.name);
        log::error(&msg);
        self.tell_open(Err(RpcError::new(code::ENOMEM, msg)));
        let now = self.now();
        self.driver.close(now);
        self.driver.abandon();
    }

    /// A base bdev is going away (the app thread unregisters the bdev if
    /// it is online): a shutdown that cannot finish is given up on after
    /// a grace period; an open is given up on at once.
    pub fn base_removed(&mut self) {
        self.removed_at = Some(self.now());
        if self.driver.lifecycle() == Lifecycle::Opening {
            self.tell_open(Err(RpcError::new(
                code::ENODEV,
                "a base bdev was removed while the cache was opening",
            )));
            self.driver.abandon();
        }
    }

    /// Refreshes what the app thread reads without asking: the save_config
    /// entry and, with `report` (or when it is due), the report.
    pub fn refresh_snapshot(&mut self, report: bool) {
        let now = self.now();
        let report = report || now.saturating_sub(self.report_at) >= REPORT_EVERY_NS;
        let online = matches!(
            self.driver.lifecycle(),
            Lifecycle::Online | Lifecycle::Opening
        );
        let config = online.then(|| self.req.config_params(self.driver.engine().tunables()));
        let value = report.then(|| self.report());
        if report {
            self.report_at = now;
        }
        let mut snap = self
            .shared()
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        snap.config = config;
        if let Some(v) = value {
            snap.report = v;
        }
    }

    /// Poller turn: engine deadlines, a stuck shutdown after hot remove, and
    /// the report the app thread shows.
    fn tick(&mut self) {
        let now = self.now();
        if now.saturating_sub(self.report_at) >= REPORT_EVERY_NS {
            self.refresh_snapshot(true);
        }
        if let Some(t) = self.driver.engine().poll_timeout()
            && t <= now
        {
            self.driver.handle_timeout(now);
        }
        if self.driver.lifecycle() == Lifecycle::Closing
            && let Some(at) = self.removed_at
            && now.saturating_sub(at) > REMOVED_SHUTDOWN_GRACE_NS
        {
            log::warn(&format!(
                "{}: a base bdev is gone and the shutdown did not finish; letting go \
                 (the cache keeps its logs: re-create the device to recover them)",
                self.req.name
            ));
            self.driver.abandon();
        }
    }

    /// Everything `bdev_writeboost_get_stats` reports.
    pub fn report(&self) -> serde_json::Value {
        let mut v = device_report(&self.req, self.driver.engine(), self.pmem_is_dax);
        match self.driver.lifecycle() {
            Lifecycle::Opening => v["state"] = "opening".into(),
            Lifecycle::Draining | Lifecycle::Closing => v["state"] = "closing".into(),
            _ => {}
        }
        v
    }

    /// Starts the clean shutdown that destruct waits for.
    pub fn begin_close(&mut self) {
        let now = self.now();
        self.driver.close(now);
    }
}

/// What became of a command handed to a base bdev.
enum Submitted {
    /// On the base bdev (or queued for a free bdev_io): `base_io_done`
    /// reports it.
    InFlight,
    /// Over already; the caller reports this result.
    Done(Result<(), DeviceError>),
}

impl Target for Bases<'_> {
    fn start(&mut self, cmd: Command, mem: CmdMem<'_>) -> Started {
        // SPDK takes `void *` for writes too and only reads through it.
        let data = match mem {
            CmdMem::Src(src) => src.as_ptr().cast_mut(),
            CmdMem::Dst(dst) => dst.as_mut_ptr(),
            CmdMem::None => ptr::null_mut(),
        };
        if let Some(io) = self.io {
            io.submit.push(IoCmd { cmd, data });
            *self.inflight += 1;
            return Started::InFlight;
        }
        let ctx = Box::into_raw(Box::new(CmdCtx {
            dev: self.dev,
            cmd,
            data,
            wait: sys::spdk_bdev_io_wait_entry::default(),
        }));
        // SAFETY: ctx is a fresh Box pointer that the completion (or the
        // io_wait callback, or submit_cmd on a failure) takes back once; the
        // memory stays put until the command completes (CmdMem's promise).
        match unsafe { submit_cmd(self, ctx) } {
            Submitted::InFlight => Started::InFlight,
            Submitted::Done(r) => Started::Done(r),
        }
    }
}

/// Starts `ctx`'s command on its base bdev.
///
/// # Safety
/// `ctx` is a live CmdCtx owned by this call, whose `data` is valid for the
/// command until it completes; the caller is on the device's thread.
unsafe fn submit_cmd(b: &mut Bases<'_>, ctx: *mut CmdCtx) -> Submitted {
    // SAFETY: per the contract.
    let (cmd, data) = unsafe { ((*ctx).cmd, (*ctx).data) };
    let base = match cmd.device {
        writeboost_engine::Device::Cache => b.cache,
        writeboost_engine::Device::Backing => b.backing,
    };
    let arg = ctx.cast::<c_void>();
    let ch = base.ch;
    // SAFETY: base is open and ch is its channel on this thread; data is
    // valid for the command (per the contract).
    let Some(rc) = (unsafe { start_on_base(base, ch, &cmd, data, Some(base_io_done), arg) }) else {
        // SAFETY: nothing was started with ctx.
        unsafe { drop(Box::from_raw(ctx)) };
        return Submitted::Done(Ok(()));
    };
    if rc == 0 {
        *b.inflight += 1;
        return Submitted::InFlight;
    }
    if rc == -12 {
        // -ENOMEM: no bdev_io free now; SPDK calls back when one is.
        // SAFETY: ctx lives until the callback resubmits it.
        unsafe {
            (*ctx).wait.bdev = base.bdev;
            (*ctx).wait.cb_fn = Some(resubmit_cmd);
            (*ctx).wait.cb_arg = arg;
            if sys::spdk_bdev_queue_io_wait(base.bdev, ch, &mut (*ctx).wait) == 0 {
                *b.waiting += 1;
                return Submitted::InFlight;
            }
        }
    } else {
        log::error(&format!(
            "{}: could not start a {:?} command on the {} bdev (rc {rc})",
            b.name,
            cmd.kind,
            match cmd.device {
                writeboost_engine::Device::Cache => "cache",
                writeboost_engine::Device::Backing => "backing",
            }
        ));
    }
    // SAFETY: nothing else refers to ctx after a failed submission.
    unsafe { drop(Box::from_raw(ctx)) };
    // A refused command fails the same way again; anything else may not.
    Submitted::Done(Err(if rc == -libc_einval() {
        DeviceError::Invalid
    } else {
        DeviceError::Io
    }))
}

/// Starts `cmd` on `base` through its channel `ch`, completing to `cb`
/// with `arg`: SPDK's return code (0: on its way; -ENOMEM: no bdev_io free
/// now), or None when there is nothing to do (unmap is advisory, and a
/// device without flush has no volatile cache to flush).
///
/// # Safety
/// `ch` is a channel of `base.desc` on this thread; `data` is valid for the
/// command until it completes.
pub unsafe fn start_on_base(
    base: &Base,
    ch: *mut sys::spdk_io_channel,
    cmd: &Command,
    data: *mut u8,
    cb: sys::spdk_bdev_io_completion_cb,
    arg: *mut c_void,
) -> Option<i32> {
    let desc = base.desc;
    // SAFETY: per the contract.
    unsafe {
        Some(match cmd.kind {
            CommandKind::Read { offset, len, .. } if !data.is_null() => {
                sys::spdk_bdev_read(desc, ch, data.cast(), offset, len as u64, cb, arg)
            }
            CommandKind::Write { offset, len, .. } if !data.is_null() => {
                sys::spdk_bdev_write(desc, ch, data.cast(), offset, len as u64, cb, arg)
            }
            CommandKind::Read { .. } | CommandKind::Write { .. } => -libc_einval(),
            CommandKind::WriteZeroes { offset, len } => {
                sys::spdk_bdev_write_zeroes(desc, ch, offset, len, cb, arg)
            }
            CommandKind::Discard { offset, len } if base.supports_unmap => {
                sys::spdk_bdev_unmap(desc, ch, offset, len, cb, arg)
            }
            CommandKind::Flush if base.supports_flush => {
                sys::spdk_bdev_flush(desc, ch, 0, base.size, cb, arg)
            }
            CommandKind::Discard { .. } | CommandKind::Flush => return None,
        })
    }
}

pub fn libc_einval() -> i32 {
    22
}

/// The device's poller.
extern "C" fn device_poller(arg: *mut c_void) -> i32 {
    let dev = arg.cast::<Device>();
    // SAFETY: the poller is unregistered before the device is freed and runs
    // on the device's thread.
    unsafe {
        let waiting = (*(*dev).shared).inbox.len();
        let before = waiting + (*dev).io.as_ref().map_or(0, |io| io.done.len());
        Device::enter_or_defer(dev, true, move |d| {
            // What is there now: what a submitter on another core sends
            // while this turn runs waits for the next, as the submitter on
            // this core must.
            d.inbox_budget = INBOX_PER_TURN.min(waiting);
            d.tick();
        });
        if before > 0 {
            sys::spdk_thread_poller_rc_SPDK_POLLER_BUSY as i32
        } else {
            sys::spdk_thread_poller_rc_SPDK_POLLER_IDLE as i32
        }
    }
}

/// A base bdev finished a command.
extern "C" fn base_io_done(bdev_io: *mut sys::spdk_bdev_io, success: bool, arg: *mut c_void) {
    // SAFETY: arg is the CmdCtx Box given at submission, taken back once
    // here; bdev_io is ours to free; this runs on the device's thread.
    unsafe {
        sys::spdk_bdev_free_io(bdev_io);
        let ctx = Box::from_raw(arg.cast::<CmdCtx>());
        let dev = ctx.dev;
        let token = ctx.cmd.token;
        drop(ctx);
        Device::enter_or_defer(dev, true, move |d| {
            d.inflight -= 1;
            let now = d.now();
            d.driver.complete(
                token,
                if success {
                    Ok(())
                } else {
                    Err(DeviceError::Io)
                },
                now,
            );
        });
    }
}

/// A bdev_io became free for a command that got -ENOMEM.
extern "C" fn resubmit_cmd(arg: *mut c_void) {
    let ctx = arg.cast::<CmdCtx>();
    // SAFETY: ctx is the live CmdCtx queued in submit_cmd; this runs on the
    // device's thread.
    unsafe {
        let dev = (*ctx).dev;
        let token = (*ctx).cmd.token;
        Device::enter_or_defer(dev, true, move |d| {
            d.waiting -= 1;
            let (_, mut bases) = d.split();
            if let Submitted::Done(r) = submit_cmd(&mut bases, ctx) {
                let now = d.now();
                d.driver.complete(token, r, now);
            }
        });
    }
}

/// Tears down a device that is done once no base command is in flight.
///
/// # Safety
/// `dev` is live, on its thread, and not busy.
unsafe fn maybe_finish(dev: *mut Device) {
    // SAFETY: per the contract.
    unsafe {
        let d = &*dev;
        if !d.driver.lifecycle().is_over() || d.inflight > 0 || d.waiting > 0 {
            return;
        }
        teardown(dev);
    }
}

/// On the device's thread: fails what still waits, lets go of the poller
/// and the base channels, frees the device, and hands the rest to the app
/// thread (`release`).
///
/// # Safety
/// `dev` is live, on its thread, not busy, and not used afterwards.
unsafe fn teardown(dev: *mut Device) {
    // SAFETY: per the contract.
    unsafe {
        let d = &mut *dev;
        // Anything still waiting fails: the device is going away.
        for (_, io) in d.driver.take_held() {
            io.complete(false);
        }
        for io in d.resets.drain(..) {
            io.complete(false);
        }
        while let Some(io) = d.shared().inbox.pop() {
            io.complete(false);
        }
        if !d.poller.is_null() {
            sys::spdk_poller_unregister(&mut d.poller);
        }
        for base in [&mut d.cache, &mut d.backing] {
            if !base.ch.is_null() {
                sys::spdk_put_io_channel(base.ch);
                base.ch = ptr::null_mut();
            }
        }
        let lifecycle = d.driver.lifecycle();
        let gone = Gone {
            shared: Arc::clone(&d.shared_ref),
            bases: [
                (d.cache.desc, d.cache.bdev),
                (d.backing.desc, d.backing.bdev),
            ],
            io_device: d.io_device_registered,
            destructed: (!d.bdev.is_null()).then_some(d.bdev),
            on_gone: d.on_gone,
        };
        let shared = &gone.shared;
        // Channels still open, and messages still on their way, find no
        // device from now on.
        shared.dev.store(ptr::null_mut(), Ordering::Release);
        shared
            .deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        shared
            .state
            .store(lifecycle_code(lifecycle), Ordering::Release);
        let io = d.io.take();
        drop(Box::from_raw(dev));
        match io {
            // The I/O thread lets go of its channels first, then ends.
            Some(io) => run_on(io.thread, move || {
                io_thread::stop(&io, move || run_on_app(move || release(gone)))
            }),
            None => run_on_app(move || release(gone)),
        }
    }
}

/// On the app thread: the registry forgets the device; its base bdevs are
/// released and closed (they were opened here), its io_device unregistered,
/// SPDK told its destruct is done; then its thread ends.
fn release(g: Gone) {
    (g.on_gone)(&g.shared);
    // SAFETY: the descriptors were opened and the bdevs claimed on this
    // thread; the io_device pointer is the reference `on_ready` gave SPDK;
    // the bdev (if any) is registered and being destructed. The bdev struct
    // is freed after SPDK is told destruct is done; SPDK does not touch it
    // past its unregister callback, which runs from within
    // spdk_bdev_destruct_done.
    unsafe {
        for (desc, bdev) in g.bases {
            sys::spdk_bdev_module_release_bdev(bdev);
            sys::spdk_bdev_close(desc);
        }
        if g.io_device {
            sys::spdk_io_device_unregister(
                Arc::as_ptr(&g.shared).cast_mut().cast(),
                Some(io_device_gone),
            );
        }
        if let Some(bdev) = g.destructed {
            sys::spdk_bdev_destruct_done(bdev, 0);
            defer_free(BdevToFree(bdev));
        }
    }
    // The registry let go, so nothing more is sent to the thread (unless
    // the device ran on the thread that created it).
    if g.shared.thread != super::placement::app_thread() {
        run_on(g.shared.thread, exit_this_thread);
    }
}

/// The last channel is gone: drop the io_device's reference to the shared part.
extern "C" fn io_device_gone(io_device: *mut c_void) {
    // SAFETY: io_device is the reference `on_ready` made with Arc::into_raw;
    // SPDK calls this once, after every channel was destroyed.
    unsafe { drop(Arc::from_raw(io_device.cast::<Shared>().cast_const())) }
}

struct BdevToFree(*mut sys::spdk_bdev);

/// Frees the bdev struct on a later turn of the thread, after SPDK's
/// unregister path has finished with it.
fn defer_free(b: BdevToFree) {
    extern "C" fn free_bdev(arg: *mut c_void) {
        // SAFETY: arg is the bdev allocated by wb_bdev_new, freed once here.
        unsafe { wb_bdev_free(arg.cast()) }
    }
    // SAFETY: the current thread is an SPDK thread; free_bdev runs on it.
    unsafe {
        let rc = sys::spdk_thread_send_msg(sys::spdk_get_thread(), Some(free_bdev), b.0.cast());
        if rc != 0 {
            // Keeping a few hundred bytes beats freeing memory SPDK may read.
            log::warn("could not defer freeing a bdev; it is leaked");
        }
    }
}
