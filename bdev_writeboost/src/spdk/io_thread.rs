//! A device's base-bdev I/O on a thread of its own, on another core than
//! the device's (`bdev_writeboost_create`'s `io_core`): log writes and
//! flushes, writeback's reads and sorted writes, and the cache reads of
//! user reads are started and completed there, so whatever per-byte work
//! the base bdevs do on the submitting thread (a copy, for malloc or a
//! software accel path) leaves the device's core. The device's thread hands
//! commands over a lock-free ring and takes completions back over another.

use std::ffi::c_void;
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicPtr, Ordering};

use spdk_sys as sys;
use writeboost_engine::{Command, DeviceError, Token};

use super::device::{Base, libc_einval, start_on_base};
use super::log;
use super::placement::exit_this_thread;
use super::ring::Ring;

/// A command for the I/O thread, with the memory it uses (stays in place
/// until it completes: the driver's promise).
pub struct IoCmd {
    pub cmd: Command,
    pub data: *mut u8,
}

// SAFETY: `data` is engine or user memory the driver keeps in place until
// the command completes; only the I/O thread reads or writes it meanwhile.
unsafe impl Send for IoCmd {}

/// The base bdevs as the I/O thread opens channels to them.
struct BaseDesc(Base);

// SAFETY: the descriptors are usable from any thread to take channels; the
// channels are taken and used on the I/O thread only.
unsafe impl Send for BaseDesc {}
// SAFETY: as above; nothing of it is written after creation.
unsafe impl Sync for BaseDesc {}

/// What the device's thread and the I/O thread share.
pub struct IoShared {
    pub thread: *mut sys::spdk_thread,
    pub core: u32,
    name: String,
    bases: [BaseDesc; 2],
    /// Commands for the I/O thread.
    pub submit: Ring<IoCmd>,
    /// Their results, for the device's thread.
    pub done: Ring<(Token, Result<(), DeviceError>)>,
    /// The I/O thread's own state, once it started (touched there only).
    state: AtomicPtr<IoState>,
}

// SAFETY: `thread` is only passed to SPDK; the rest is Sync.
unsafe impl Sync for IoShared {}
// SAFETY: as above.
unsafe impl Send for IoShared {}

/// The I/O thread's channels and poller.
struct IoState {
    chans: [*mut sys::spdk_io_channel; 2],
    poller: *mut sys::spdk_poller,
}

/// A command on its way through a base bdev.
struct Ctx {
    io: *const IoShared,
    cmd: IoCmd,
    wait: sys::spdk_bdev_io_wait_entry,
}

impl IoShared {
    /// The I/O side of a device over `cache` and `backing` (copies of their
    /// descriptors, without channels), for `thread` on `core`.
    pub fn new(
        name: &str,
        thread: *mut sys::spdk_thread,
        core: u32,
        cache: &Base,
        backing: &Base,
    ) -> Arc<Self> {
        let copy = |b: &Base| {
            BaseDesc(Base {
                name: b.name.clone(),
                desc: b.desc,
                bdev: b.bdev,
                ch: ptr::null_mut(),
                size: b.size,
                block_size: b.block_size,
                supports_flush: b.supports_flush,
                supports_unmap: b.supports_unmap,
            })
        };
        Arc::new(Self {
            thread,
            core,
            name: name.to_string(),
            bases: [copy(cache), copy(backing)],
            submit: Ring::new(),
            done: Ring::new(),
            state: AtomicPtr::new(ptr::null_mut()),
        })
    }
}

/// On the I/O thread: takes channels to both base bdevs and starts polling.
pub fn start(io: Arc<IoShared>) {
    // SAFETY: on the I/O thread; the descriptors are open (the app thread
    // closes them only after `stop`).
    let chans = unsafe {
        [
            sys::spdk_bdev_get_io_channel(io.bases[0].0.desc),
            sys::spdk_bdev_get_io_channel(io.bases[1].0.desc),
        ]
    };
    if chans.iter().any(|c| c.is_null()) {
        log::error(&format!(
            "{}: no I/O channel to a base bdev on the I/O thread (core {}); its commands fail",
            io.name, io.core
        ));
    }
    let state = Box::into_raw(Box::new(IoState {
        chans,
        poller: ptr::null_mut(),
    }));
    let arg = Arc::into_raw(io);
    // SAFETY: the poller's argument is the reference made just above, given
    // back in `stop`; state is ours until then.
    unsafe {
        (*state).poller = sys::spdk_poller_register(Some(io_poller), arg.cast_mut().cast(), 0);
        (*arg).state.store(state, Ordering::Release);
    }
}

/// On the I/O thread, once the device has no command in flight: lets go of
/// the channels and the poller, then ends the thread after `then` (which
/// hands the rest of the teardown to the app thread).
pub fn stop(io: &IoShared, then: impl FnOnce()) {
    let state = io.state.swap(ptr::null_mut(), Ordering::AcqRel);
    if !state.is_null() {
        // SAFETY: state was made in `start` on this thread and is freed once
        // here; the poller's reference to `io` is given back with it.
        unsafe {
            let mut s = Box::from_raw(state);
            sys::spdk_poller_unregister(&mut s.poller);
            for ch in s.chans {
                if !ch.is_null() {
                    sys::spdk_put_io_channel(ch);
                }
            }
            drop(Arc::from_raw(io as *const IoShared));
        }
    }
    then();
    exit_this_thread();
}

extern "C" fn io_poller(arg: *mut c_void) -> i32 {
    // SAFETY: arg is the reference `start` made; the poller is unregistered
    // (in `stop`) before it is given back.
    let io = unsafe { &*arg.cast::<IoShared>() };
    let state = io.state.load(Ordering::Acquire);
    let mut n = 0;
    while let Some(cmd) = io.submit.pop() {
        n += 1;
        let token = cmd.cmd.token;
        let ctx = Box::into_raw(Box::new(Ctx {
            io,
            cmd,
            wait: sys::spdk_bdev_io_wait_entry::default(),
        }));
        // SAFETY: ctx is fresh and taken back once (here on failure, or by
        // the completion or the io_wait callback); state is live.
        if let Some(r) = unsafe { submit(io, state, ctx) } {
            io.done.push((token, r));
        }
    }
    if n > 0 {
        sys::spdk_thread_poller_rc_SPDK_POLLER_BUSY as i32
    } else {
        sys::spdk_thread_poller_rc_SPDK_POLLER_IDLE as i32
    }
}

/// Starts `ctx`'s command; Some(result) if it is over already.
///
/// # Safety
/// `ctx` is a live Ctx owned by this call; `state` is the I/O thread's.
unsafe fn submit(
    io: &IoShared,
    state: *mut IoState,
    ctx: *mut Ctx,
) -> Option<Result<(), DeviceError>> {
    // SAFETY: per the contract.
    unsafe {
        let cmd = (*ctx).cmd.cmd;
        let i = match cmd.device {
            writeboost_engine::Device::Cache => 0,
            writeboost_engine::Device::Backing => 1,
        };
        let base = &io.bases[i].0;
        let ch = (*state).chans[i];
        let rc = if ch.is_null() {
            -libc_einval()
        } else {
            match start_on_base(base, ch, &cmd, (*ctx).cmd.data, Some(io_done), ctx.cast()) {
                Some(rc) => rc,
                None => {
                    drop(Box::from_raw(ctx));
                    return Some(Ok(()));
                }
            }
        };
        if rc == 0 {
            return None;
        }
        if rc == -12 {
            // -ENOMEM: no bdev_io free now; SPDK calls back when one is.
            (*ctx).wait.bdev = base.bdev;
            (*ctx).wait.cb_fn = Some(io_resubmit);
            (*ctx).wait.cb_arg = ctx.cast();
            if sys::spdk_bdev_queue_io_wait(base.bdev, ch, &mut (*ctx).wait) == 0 {
                return None;
            }
        } else {
            log::error(&format!(
                "{}: could not start a {:?} command on the {} bdev (rc {rc})",
                io.name,
                cmd.kind,
                if i == 0 { "cache" } else { "backing" }
            ));
        }
        drop(Box::from_raw(ctx));
        // A refused command fails the same way again; anything else may not.
        Some(Err(if rc == -libc_einval() {
            DeviceError::Invalid
        } else {
            DeviceError::Io
        }))
    }
}

/// A base bdev finished a command, on the I/O thread.
extern "C" fn io_done(bdev_io: *mut sys::spdk_bdev_io, success: bool, arg: *mut c_void) {
    // SAFETY: arg is the Ctx given at submission, taken back once here;
    // bdev_io is ours to free; `io` outlives its commands (the device stops
    // the I/O thread only with none in flight).
    unsafe {
        sys::spdk_bdev_free_io(bdev_io);
        let ctx = Box::from_raw(arg.cast::<Ctx>());
        let r = if success {
            Ok(())
        } else {
            Err(DeviceError::Io)
        };
        (*ctx.io).done.push((ctx.cmd.cmd.token, r));
    }
}

/// A bdev_io became free for a command that got -ENOMEM.
extern "C" fn io_resubmit(arg: *mut c_void) {
    let ctx = arg.cast::<Ctx>();
    // SAFETY: ctx is the live Ctx queued in `submit`; this runs on the I/O
    // thread, where its state lives.
    unsafe {
        let io = &*(*ctx).io;
        let token = (*ctx).cmd.cmd.token;
        let state = io.state.load(Ordering::Acquire);
        if let Some(r) = submit(io, state, ctx) {
            io.done.push((token, r));
        }
    }
}
