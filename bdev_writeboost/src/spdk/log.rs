//! SPDK's log, one preformatted line at a time.

use std::ffi::CString;

use spdk_sys as sys;

fn log(level: sys::spdk_log_level, msg: &str) {
    let line = CString::new(format!("writeboost: {msg}").replace('\0', " ")).unwrap_or_default();
    // SAFETY: line is a valid NUL-terminated string for the call's duration.
    unsafe { sys::spdk_sys_log(level, line.as_ptr()) }
}

pub fn notice(msg: &str) {
    log(sys::spdk_log_level_SPDK_LOG_NOTICE, msg);
}

pub fn warn(msg: &str) {
    log(sys::spdk_log_level_SPDK_LOG_WARN, msg);
}

pub fn error(msg: &str) {
    log(sys::spdk_log_level_SPDK_LOG_ERROR, msg);
}
