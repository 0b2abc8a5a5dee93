//! Engine buffers in SPDK's DMA-safe memory, so the cache and backing bdevs
//! can read and write them directly.

use std::ffi::c_void;
use std::ptr::NonNull;

use spdk_sys as sys;
use writeboost_engine::BufAlloc;

/// Allocates engine buffers with `spdk_dma_zmalloc`.
pub struct DmaAlloc;

/// `len` zeroed bytes of DMA-safe memory, 4 KiB aligned.
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
}

impl DmaBuf {
    /// `None` when SPDK's memory is exhausted.
    pub fn try_new(len: usize) -> Option<Self> {
        // SAFETY: spdk_dma_zmalloc has no preconditions; a null return is handled.
        let p = unsafe { sys::spdk_dma_zmalloc(len.max(1), 4096, std::ptr::null_mut()) };
        NonNull::new(p.cast::<u8>()).map(|ptr| Self { ptr, len })
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

// SAFETY: the buffer is plain memory owned by this value alone.
unsafe impl Send for DmaBuf {}

impl AsRef<[u8]> for DmaBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr points to len initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl AsMut<[u8]> for DmaBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // SAFETY: ptr came from spdk_dma_zmalloc and is freed once.
        unsafe { sys::spdk_dma_free(self.ptr.as_ptr().cast::<c_void>()) }
    }
}

impl BufAlloc for DmaAlloc {
    type Buf = DmaBuf;
    fn alloc(&mut self, len: usize) -> DmaBuf {
        // Engine buffers are allocated once, at open; running out of DMA
        // memory then is a configuration error SPDK cannot recover from
        // (the app's -s memory size is too small).
        DmaBuf::try_new(len).unwrap_or_else(|| {
            super::log::error(&format!(
                "out of DMA memory allocating a {len}-byte engine buffer; start the target with a larger -s"
            ));
            std::process::abort()
        })
    }
}
