//! A user bdev_io on its way through a writeboost device, and the
//! completion side of the I/O channel it came from. A leaf: the channel
//! (which makes these) and the device (which runs them) both use it.

use std::cell::RefCell;
use std::ptr;

use spdk_sys as sys;

use super::dma::DmaBuf;
use super::grants::Published;
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
    /// A write its channel copied into granted slots already.
    pub published: Option<Published>,
    /// Where it completes: the channel it was submitted on.
    origin: *const Origin,
}

// SAFETY: a UserIo moves between SPDK threads over rings; its pointers are
// used only on the device's thread (data) or the origin thread (bdev_io
// completion), and the bdev_io stays valid until completed.
unsafe impl Send for UserIo {}

/// The completion side of an I/O channel: where a request submitted on it
/// is completed, on the channel's own thread.
pub struct Origin {
    thread: *mut sys::spdk_thread,
    /// Completions from the device's thread: (bdev_io, success).
    done: Ring<(usize, bool)>,
    /// Completions made on this thread, handed to SPDK from the poller: a
    /// completion inside submit_request would cost SPDK a message each, and
    /// the I/O the caller submits from its callback finds the device idle.
    local: RefCell<Vec<(*mut sys::spdk_bdev_io, bool)>>,
}

impl Origin {
    /// The completion side of a channel on the calling thread.
    pub fn here() -> Self {
        Self {
            // SAFETY: no preconditions.
            thread: unsafe { sys::spdk_get_thread() },
            done: Ring::new(),
            local: RefCell::new(Vec::new()),
        }
    }

    pub fn thread(&self) -> *mut sys::spdk_thread {
        self.thread
    }

    /// Completes what finished for this channel; returns how many.
    pub fn drain(&self) -> usize {
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
pub unsafe fn complete_now(bdev_io: *mut sys::spdk_bdev_io, success: bool) {
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
/// `bdev_io` is a live user I/O of a writeboost bdev, submitted on the
/// channel whose completion side `origin` is.
pub unsafe fn from_bdev_io(
    origin: *const Origin,
    bdev_io: *mut sys::spdk_bdev_io,
) -> Option<UserIo> {
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
            published: None,
            origin,
        };
        if matches!(kind, UserKind::Read | UserKind::Write) {
            let mut n = 0;
            let iovs = sys::spdk_sys_bdev_io_iovs(bdev_io, &mut n);
            if n == 1 && (*iovs).iov_len >= len {
                io.data = (*iovs).iov_base.cast();
            } else {
                let mut b = DmaBuf::try_new(len)?;
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
