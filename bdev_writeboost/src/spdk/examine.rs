//! The module's handle, and the hold that keeps an examine in progress
//! while a device it started is opening. A leaf: the module and the device
//! both use it.

use spdk_sys as sys;

unsafe extern "C" {
    /// The bdev module registered by register.c's constructor.
    pub fn wb_module() -> *mut sys::spdk_bdev_module;
}

/// Reports this module's examine_disk as done when dropped.
pub struct ExamineHold;

impl Drop for ExamineHold {
    fn drop(&mut self) {
        // SAFETY: one hold per examine_disk call, dropped once, on the app
        // thread: exactly one examine_done per examine_disk, as SPDK requires.
        unsafe { sys::spdk_bdev_module_examine_done(wb_module()) }
    }
}
