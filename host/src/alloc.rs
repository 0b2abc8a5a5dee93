//! 4096-byte aligned, zero-filled heap buffers: usable for O_DIRECT I/O and as
//! engine buffers (through [`AlignedAlloc`]).

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::ptr::NonNull;

use writeboost_engine::BufAlloc;

/// Alignment of every buffer: the largest logical block size O_DIRECT needs.
pub const ALIGN: usize = 4096;

/// An owned, zero-initialised, 4096-aligned byte buffer whose length is fixed
/// at allocation. Its memory never moves, so a pointer into it stays valid
/// while the buffer is alive (io_uring relies on that).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf uniquely owns its allocation (like Box<[u8]>); nothing
// else holds the pointer, so moving it to another thread is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`, which is Sync.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes (`len` may be 0).
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return Self {
                ptr: NonNull::<u8>::dangling(),
                len: 0,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: layout has non-zero size (len > 0) and a valid power-of-two alignment.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            handle_alloc_error(layout)
        };
        Self { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len.next_multiple_of(ALIGN), ALIGN)
            .expect("buffer length overflows a Layout")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: ptr was returned by alloc_zeroed with exactly this layout
            // (same len, hence same rounded size) and is freed only here.
            unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr points to `len` initialised (zeroed at allocation) bytes
        // owned by self for self's lifetime; for len 0 a dangling aligned
        // pointer is valid for an empty slice.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in as_ref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// Engine buffer allocator handing out [`AlignedBuf`]s.
#[derive(Clone, Copy, Debug, Default)]
pub struct AlignedAlloc;

impl BufAlloc for AlignedAlloc {
    type Buf = AlignedBuf;
    fn alloc(&mut self, len: usize) -> AlignedBuf {
        AlignedBuf::zeroed(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_writable() {
        for len in [0usize, 1, 512, 4096, 4097, 1 << 20] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(len == 0 || (b.as_ptr() as usize).is_multiple_of(ALIGN));
            assert!(b.as_ref().iter().all(|&x| x == 0));
            b.as_mut().fill(0x5a);
            assert!(b.as_ref().iter().all(|&x| x == 0x5a));
        }
    }
}
