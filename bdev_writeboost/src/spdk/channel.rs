//! The bdev entry points that run on any thread: submit_request,
//! io_type_supported, get_io_channel, and the per-thread I/O channel with its
//! completion ring.
//!
//! A request on the device's own thread goes straight to the engine (or to
//! the inbox if the engine is busy); a request on another thread goes to the
//! inbox and the device's poller picks it up. Its completion comes back over
//! the submitting channel's `done` ring (or, on the same thread, its `local`
//! list), drained by that channel's poller: SPDK requires a bdev_io to be
//! completed on the thread that submitted it.

use std::cell::RefCell;
use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::Ordering;

use spdk_sys as sys;

use super::device::{Device, Shared, bounce};
use super::dma::DmaBuf;
use super::ring::Ring;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserKind {
    Read,
    Write,
    Flush,
    Unmap,
    WriteZeroes,
    Reset,
}

/// A user bdev_io on its way through the device.
pub struct UserIo {
    pub bdev_io: *mut sys::spdk_bdev_io,
    pub kind: UserKind,
    pub offset: u64,
    pub len: usize,
    /// Where the data is: the single iovec's buffer, or `bounce`.
    pub data: *mut u8,
    /// A contiguous copy for requests with several iovecs.
    bounce: Option<DmaBuf>,
    /// The channel it was submitted on.
    origin: *const ChannelCtx,
}

// SAFETY: a UserIo moves between SPDK threads over rings; its pointers are
// used only on the device's thread (data) or the origin thread (bdev_io
// completion), and the bdev_io stays valid until completed.
unsafe impl Send for UserIo {}

/// Per-thread channel context, placed in the memory SPDK allocates.
pub struct ChannelCtx {
    shared: *const Shared,
    thread: *mut sys::spdk_thread,
    /// Completions from the device's thread: (bdev_io, success).
    done: Ring<(usize, bool)>,
    /// Completions made on this thread, handed to SPDK from the poller: a
    /// completion inside submit_request would cost SPDK a message each, and
    /// the I/O the caller submits from its callback finds the device idle.
    local: RefCell<Vec<(*mut sys::spdk_bdev_io, bool)>>,
    poller: *mut sys::spdk_poller,
}

impl writeboost_engine::driver::UserBuf for UserIo {
    fn bytes(&self) -> &[u8] {
        if self.data.is_null() || !matches!(self.kind, UserKind::Read | UserKind::Write) {
            return &[];
        }
        // SAFETY: a read's or write's `data` points at its `len` bytes (the
        // bdev_io's single buffer, or the bounce copy this owns), valid until
        // the request completes and touched only on the device's thread.
        unsafe { std::slice::from_raw_parts(self.data, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        if self.data.is_null() || !matches!(self.kind, UserKind::Read | UserKind::Write) {
            return &mut [];
        }
        // SAFETY: as in `bytes`; `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.data, self.len) }
    }
}

impl UserIo {
    /// Completes the bdev_io, on its own thread.
    pub fn complete(mut self, success: bool) {
        // SAFETY: origin lives while it has I/O outstanding (SPDK does not
        // destroy a channel with I/O in flight); bdev_io is valid until here.
        unsafe {
            if success && self.kind == UserKind::Read && self.bounce.is_some() {
                scatter(self.bdev_io, self.data, self.len);
            }
            self.bounce = None;
            let origin = &*self.origin;
            if origin.thread == sys::spdk_get_thread() {
                origin.local.borrow_mut().push((self.bdev_io, success));
            } else {
                origin.done.push((self.bdev_io as usize, success));
            }
        }
    }
}

/// # Safety
/// `bdev_io` is an outstanding user I/O submitted on this thread.
unsafe fn complete_now(bdev_io: *mut sys::spdk_bdev_io, success: bool) {
    let status = if success {
        sys::spdk_bdev_io_status_SPDK_BDEV_IO_STATUS_SUCCESS
    } else {
        sys::spdk_bdev_io_status_SPDK_BDEV_IO_STATUS_FAILED
    };
    // SAFETY: per the contract.
    unsafe { sys::spdk_bdev_io_complete(bdev_io, status) }
}

/// Copies a contiguous buffer into a bdev_io's iovecs.
///
/// # Safety
/// `src` has `len` bytes; the iovecs are the request's own.
unsafe fn scatter(bdev_io: *mut sys::spdk_bdev_io, src: *const u8, len: usize) {
    // SAFETY: per the contract.
    unsafe {
        let mut n = 0;
        let iovs = sys::spdk_sys_bdev_io_iovs(bdev_io, &mut n);
        let mut off = 0;
        for i in 0..n.max(0) as usize {
            let v = &*iovs.add(i);
            let take = v.iov_len.min(len - off);
            ptr::copy_nonoverlapping(src.add(off), v.iov_base.cast::<u8>(), take);
            off += take;
            if off == len {
                break;
            }
        }
    }
}

/// Copies a bdev_io's iovecs into a contiguous buffer.
///
/// # Safety
/// `dst` has room for `len` bytes; the iovecs are the request's own.
unsafe fn gather(bdev_io: *mut sys::spdk_bdev_io, dst: *mut u8, len: usize) {
    // SAFETY: per the contract.
    unsafe {
        let mut n = 0;
        let iovs = sys::spdk_sys_bdev_io_iovs(bdev_io, &mut n);
        let mut off = 0;
        for i in 0..n.max(0) as usize {
            let v = &*iovs.add(i);
            let take = v.iov_len.min(len - off);
            ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), dst.add(off), take);
            off += take;
            if off == len {
                break;
            }
        }
    }
}

/// Builds the UserIo of a bdev_io; `None` if a bounce buffer was needed and
/// none could be had.
///
/// # Safety
/// `bdev_io` is a live user I/O of a writeboost bdev, submitted on `ch`.
unsafe fn user_io(ch: *mut ChannelCtx, bdev_io: *mut sys::spdk_bdev_io) -> Option<UserIo> {
    // SAFETY: per the contract.
    unsafe {
        let ty = sys::spdk_sys_bdev_io_type(bdev_io) as u32;
        let bdev = sys::spdk_sys_bdev_io_bdev(bdev_io);
        let bs = sys::spdk_bdev_get_block_size(bdev) as u64;
        let offset = sys::spdk_sys_bdev_io_offset_blocks(bdev_io) * bs;
        let len = (sys::spdk_sys_bdev_io_num_blocks(bdev_io) * bs) as usize;
        let kind = match ty {
            sys::spdk_bdev_io_type_SPDK_BDEV_IO_TYPE_READ => UserKind::Read,
            sys::spdk_bdev_io_type_SPDK_BDEV_IO_TYPE_WRITE => UserKind::Write,
            sys::spdk_bdev_io_type_SPDK_BDEV_IO_TYPE_FLUSH => UserKind::Flush,
            sys::spdk_bdev_io_type_SPDK_BDEV_IO_TYPE_UNMAP => UserKind::Unmap,
            sys::spdk_bdev_io_type_SPDK_BDEV_IO_TYPE_WRITE_ZEROES => UserKind::WriteZeroes,
            sys::spdk_bdev_io_type_SPDK_BDEV_IO_TYPE_RESET => UserKind::Reset,
            _ => return None,
        };
        let mut io = UserIo {
            bdev_io,
            kind,
            offset,
            len,
            data: ptr::null_mut(),
            bounce: None,
            origin: ch,
        };
        if matches!(kind, UserKind::Read | UserKind::Write) {
            let mut n = 0;
            let iovs = sys::spdk_sys_bdev_io_iovs(bdev_io, &mut n);
            if n == 1 && (*iovs).iov_len >= len {
                io.data = (*iovs).iov_base.cast();
            } else {
                let mut b = bounce(len)?;
                if kind == UserKind::Write {
                    gather(bdev_io, b.as_mut_ptr(), len);
                }
                io.data = b.as_mut_ptr();
                io.bounce = Some(b);
            }
        }
        Some(io)
    }
}

/// Hands a request to the device: directly when on its thread and idle,
/// through the inbox otherwise.
///
/// # Safety
/// `ch` is this thread's live channel context.
unsafe fn forward(ch: *mut ChannelCtx, bdev_io: *mut sys::spdk_bdev_io) {
    // SAFETY: per the contract; the device outlives its channels.
    unsafe {
        let Some(io) = user_io(ch, bdev_io) else {
            complete_now(bdev_io, false);
            return;
        };
        let shared = &*(*ch).shared;
        if shared.thread == (*ch).thread && !shared.busy.load(Ordering::Acquire) {
            // Not busy on its own thread: `enter` runs the closure.
            Device::enter(shared.dev, true, |d| d.start_user(io));
        } else {
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
pub extern "C" fn channel_create(io_device: *mut c_void, ctx_buf: *mut c_void) -> i32 {
    let ctx = ctx_buf.cast::<ChannelCtx>();
    // SAFETY: ctx_buf has room for a ChannelCtx (the size given at
    // registration) and is ours until channel_destroy.
    unsafe {
        ptr::write(
            ctx,
            ChannelCtx {
                shared: io_device.cast::<Shared>(),
                thread: sys::spdk_get_thread(),
                done: Ring::new(),
                local: RefCell::new(Vec::new()),
                poller: ptr::null_mut(),
            },
        );
        (*ctx).poller = sys::spdk_poller_register(Some(channel_poller), ctx.cast(), 0);
    }
    0
}

/// Called by SPDK on the channel's thread when the last reference is gone.
pub extern "C" fn channel_destroy(_io_device: *mut c_void, ctx_buf: *mut c_void) {
    let ctx = ctx_buf.cast::<ChannelCtx>();
    // SAFETY: ctx was written by channel_create and is dropped once here.
    unsafe {
        sys::spdk_poller_unregister(&mut (*ctx).poller);
        (*ctx).drain();
        ptr::drop_in_place(ctx);
    }
}

impl ChannelCtx {
    /// Completes what finished for this channel; returns how many.
    fn drain(&self) -> usize {
        let mut n = 0;
        while let Some((io, ok)) = self.done.pop() {
            // SAFETY: io was submitted on this thread and is still outstanding.
            unsafe { complete_now(io as *mut sys::spdk_bdev_io, ok) };
            n += 1;
        }
        // Taken first: the completion callbacks may submit (and finish) more.
        let local = std::mem::take(&mut *self.local.borrow_mut());
        for &(io, ok) in &local {
            // SAFETY: as above.
            unsafe { complete_now(io, ok) };
        }
        n + local.len()
    }
}

/// Completes, on this thread, what the device's thread finished.
extern "C" fn channel_poller(arg: *mut c_void) -> i32 {
    // SAFETY: the poller lives no longer than the channel context.
    let ctx = unsafe { &*arg.cast::<ChannelCtx>() };
    if ctx.drain() > 0 {
        sys::spdk_thread_poller_rc_SPDK_POLLER_BUSY as i32
    } else {
        sys::spdk_thread_poller_rc_SPDK_POLLER_IDLE as i32
    }
}
