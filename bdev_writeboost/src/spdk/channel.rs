//! The bdev entry points that run on any thread: submit_request,
//! io_type_supported, get_io_channel, and the per-thread I/O channel with its
//! completion ring.
//!
//! A request on the device's own thread goes straight to the engine (or to
//! the inbox if the engine is busy); a request on another thread goes to the
//! inbox and the device's poller picks it up. A write of whole blocks from
//! another thread is first copied into slots granted to its channel
//! (`grants`), on the submitting core. Its completion comes back over
//! the submitting channel's `done` ring (or, on the same thread, its `local`
//! list), drained by that channel's poller: SPDK requires a bdev_io to be
//! completed on the thread that submitted it.

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::Ordering;

use spdk_sys as sys;

use super::device::{ChannelFns, Device, Shared};
use super::grants::ChannelGrants;
use super::user_io::{Origin, UserKind, complete_now, from_bdev_io};

/// Per-thread channel context, placed in the memory SPDK allocates.
pub struct ChannelCtx {
    shared: *const Shared,
    origin: Origin,
    poller: *mut sys::spdk_poller,
    /// Slots this channel copies whole-block writes into.
    grants: ChannelGrants,
}

/// How the device registers its io_device: these callbacks make and
/// destroy its per-thread channels.
pub const CHANNEL_FNS: ChannelFns = ChannelFns {
    create: channel_create,
    destroy: channel_destroy,
    ctx_size: std::mem::size_of::<ChannelCtx>() as u32,
};

/// Hands a request to the device: directly when on its thread and idle,
/// through the inbox otherwise.
///
/// # Safety
/// `ch` is this thread's live channel context.
unsafe fn forward(ch: *mut ChannelCtx, bdev_io: *mut sys::spdk_bdev_io) {
    // SAFETY: per the contract; the device outlives its channels.
    unsafe {
        let Some(mut io) = from_bdev_io(&(*ch).origin, bdev_io) else {
            complete_now(bdev_io, false);
            return;
        };
        let shared = &*(*ch).shared;
        let dev = shared.dev.load(Ordering::Acquire);
        if dev.is_null() {
            // The device is gone; its channels linger until SPDK drops them.
            io.complete(false);
        } else if shared.thread == (*ch).origin.thread() && !shared.busy.load(Ordering::Acquire) {
            // Not busy on its own thread: `enter` runs the closure.
            Device::enter_or_defer(dev, true, move |d| d.start_user(io));
        } else {
            // The copy and its checksums on this core, when slots are at
            // hand: the device's thread then only indexes the write.
            if io.kind == UserKind::Write && !io.data.is_null() {
                io.published = (*ch)
                    .grants
                    .copy_in(&shared.grants, io.offset, io.data, io.len);
            }
            shared.inbox.push(io);
        }
    }
}

extern "C" fn read_buf_ready(
    ch: *mut sys::spdk_io_channel,
    bdev_io: *mut sys::spdk_bdev_io,
    success: bool,
) {
    // SAFETY: SPDK calls this on the submitting thread with its channel.
    unsafe {
        let ctx = sys::spdk_sys_io_channel_get_ctx(ch).cast::<ChannelCtx>();
        if success {
            forward(ctx, bdev_io);
        } else {
            complete_now(bdev_io, false);
        }
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_bdev_submit_request(
    ch: *mut sys::spdk_io_channel,
    bdev_io: *mut sys::spdk_bdev_io,
) {
    // SAFETY: SPDK calls this on the channel's thread with a live bdev_io.
    unsafe {
        let ctx = sys::spdk_sys_io_channel_get_ctx(ch).cast::<ChannelCtx>();
        if sys::spdk_sys_bdev_io_type(bdev_io) as u32
            == sys::spdk_bdev_io_type_SPDK_BDEV_IO_TYPE_READ
        {
            // Reads need a buffer; SPDK supplies a DMA-safe one if the caller
            // did not.
            let bs = sys::spdk_bdev_get_block_size(sys::spdk_sys_bdev_io_bdev(bdev_io)) as u64;
            let len = sys::spdk_sys_bdev_io_num_blocks(bdev_io) * bs;
            sys::spdk_bdev_io_get_buf(bdev_io, Some(read_buf_ready), len);
        } else {
            forward(ctx, bdev_io);
        }
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_bdev_io_type_supported(ctx: *mut c_void, io_type: u32) -> bool {
    // SAFETY: ctx is the device's Shared, alive while the bdev is registered.
    let shared = unsafe { &*ctx.cast::<Shared>() };
    match io_type {
        sys::spdk_bdev_io_type_SPDK_BDEV_IO_TYPE_READ
        | sys::spdk_bdev_io_type_SPDK_BDEV_IO_TYPE_WRITE
        // FLUSH is claimed always: the NVMe-oF target acknowledges a flush
        // without passing it down when the bdev does not claim it.
        | sys::spdk_bdev_io_type_SPDK_BDEV_IO_TYPE_FLUSH
        | sys::spdk_bdev_io_type_SPDK_BDEV_IO_TYPE_RESET => true,
        sys::spdk_bdev_io_type_SPDK_BDEV_IO_TYPE_UNMAP => shared.supports_unmap,
        sys::spdk_bdev_io_type_SPDK_BDEV_IO_TYPE_WRITE_ZEROES => shared.supports_write_zeroes,
        _ => false,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn wb_bdev_get_io_channel(ctx: *mut c_void) -> *mut sys::spdk_io_channel {
    // SAFETY: ctx is the registered io_device.
    unsafe { sys::spdk_get_io_channel(ctx) }
}

/// Called by SPDK on the channel's thread to fill in a new channel.
extern "C" fn channel_create(io_device: *mut c_void, ctx_buf: *mut c_void) -> i32 {
    let ctx = ctx_buf.cast::<ChannelCtx>();
    // SAFETY: ctx_buf has room for a ChannelCtx (the size given at
    // registration) and is ours until channel_destroy.
    unsafe {
        ptr::write(
            ctx,
            ChannelCtx {
                shared: io_device.cast::<Shared>(),
                origin: Origin::here(),
                poller: ptr::null_mut(),
                grants: ChannelGrants::new(),
            },
        );
        (*ctx).poller = sys::spdk_poller_register(Some(channel_poller), ctx.cast(), 0);
    }
    0
}

/// Called by SPDK on the channel's thread when the last reference is gone.
extern "C" fn channel_destroy(_io_device: *mut c_void, ctx_buf: *mut c_void) {
    let ctx = ctx_buf.cast::<ChannelCtx>();
    // SAFETY: ctx was written by channel_create and is dropped once here.
    unsafe {
        sys::spdk_poller_unregister(&mut (*ctx).poller);
        (*ctx).origin.drain();
        // The io_device (and so `shared`) outlives its channels.
        (*ctx).grants.close(&(*(*ctx).shared).grants);
        ptr::drop_in_place(ctx);
    }
}

/// Completes, on this thread, what the device's thread finished.
extern "C" fn channel_poller(arg: *mut c_void) -> i32 {
    // SAFETY: the poller lives no longer than the channel context, and the
    // io_device's shared part outlives the channel.
    let (ctx, shared) = unsafe {
        let ctx = &*arg.cast::<ChannelCtx>();
        (ctx, &*ctx.shared)
    };
    ctx.grants.poll(&shared.grants);
    if ctx.origin.drain() > 0 {
        sys::spdk_thread_poller_rc_SPDK_POLLER_BUSY as i32
    } else {
        sys::spdk_thread_poller_rc_SPDK_POLLER_IDLE as i32
    }
}
