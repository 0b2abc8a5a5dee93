//! PMDK's libpmem2, loaded with dlopen the first time a pool is opened, so
//! that a host that never opens a pool (mode 0) runs without PMDK installed.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

#[repr(C)]
pub struct Pmem2Config {
    _opaque: [u8; 0],
}
#[repr(C)]
pub struct Pmem2Source {
    _opaque: [u8; 0],
}
#[repr(C)]
pub struct Pmem2Map {
    _opaque: [u8; 0],
}

/// `enum pmem2_granularity`.
pub const PMEM2_GRANULARITY_BYTE: c_int = 0;
pub const PMEM2_GRANULARITY_PAGE: c_int = 2;
/// `PMEM2_F_MEM_NODRAIN`: the memcpy function flushes but does not drain.
pub const PMEM2_F_MEM_NODRAIN: u32 = 1;

pub type PersistFn = unsafe extern "C" fn(ptr: *const c_void, size: usize);
/// `pmem2_drain_fn`: waits for earlier flushes and non-temporal stores.
pub type DrainFn = unsafe extern "C" fn();
/// `pmem2_memcpy_fn`: copies and, with flags 0, makes the copy persistent.
pub type MemcpyFn = unsafe extern "C" fn(
    dest: *mut c_void,
    src: *const c_void,
    len: usize,
    flags: u32,
) -> *mut c_void;

/// The sonames tried, newest first: Debian's runtime package `libpmem2`
/// ships `libpmem2.so.1`; `libpmem2.so` is the development symlink.
const SONAMES: [&str; 2] = ["libpmem2.so.1", "libpmem2.so"];

/// The libpmem2 functions this crate calls, as signatures of PMDK 1.x/2.x.
pub struct Api {
    pub config_new: unsafe extern "C" fn(cfg: *mut *mut Pmem2Config) -> c_int,
    pub config_delete: unsafe extern "C" fn(cfg: *mut *mut Pmem2Config) -> c_int,
    pub config_set_required_store_granularity:
        unsafe extern "C" fn(cfg: *mut Pmem2Config, g: c_int) -> c_int,
    pub source_from_fd: unsafe extern "C" fn(src: *mut *mut Pmem2Source, fd: c_int) -> c_int,
    pub source_delete: unsafe extern "C" fn(src: *mut *mut Pmem2Source) -> c_int,
    pub map_new: unsafe extern "C" fn(
        map: *mut *mut Pmem2Map,
        cfg: *const Pmem2Config,
        src: *const Pmem2Source,
    ) -> c_int,
    pub map_delete: unsafe extern "C" fn(map: *mut *mut Pmem2Map) -> c_int,
    pub map_get_address: unsafe extern "C" fn(map: *mut Pmem2Map) -> *mut c_void,
    pub map_get_size: unsafe extern "C" fn(map: *mut Pmem2Map) -> usize,
    pub map_get_store_granularity: unsafe extern "C" fn(map: *mut Pmem2Map) -> c_int,
    pub get_persist_fn: unsafe extern "C" fn(map: *mut Pmem2Map) -> Option<PersistFn>,
    pub get_memcpy_fn: unsafe extern "C" fn(map: *mut Pmem2Map) -> Option<MemcpyFn>,
    pub get_drain_fn: unsafe extern "C" fn(map: *mut Pmem2Map) -> Option<DrainFn>,
    pub errormsg: unsafe extern "C" fn() -> *const c_char,
    /// Keeps the library mapped for the life of the process: the function
    /// pointers above point into it.
    _lib: libloading::Library,
}

/// libpmem2, loaded on first use; the error says what was tried.
pub fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Api, String> {
    let mut errors = Vec::new();
    for name in SONAMES {
        // SAFETY: loading libpmem2 runs its initialisers, which only set up
        // PMDK's own state (logging, CPU feature detection); no other code
        // here depends on what they do.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => return resolve(lib).map_err(|e| format!("{name}: {e}")),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(errors.join("; "))
}

fn resolve(lib: libloading::Library) -> Result<Api, libloading::Error> {
    // SAFETY: each symbol is looked up by its libpmem2 name and given the
    // signature that PMDK's libpmem2.h declares for it; the pointers are
    // copied out and stay valid because `Api` keeps the library loaded.
    unsafe {
        Ok(Api {
            config_new: *lib.get(b"pmem2_config_new\0")?,
            config_delete: *lib.get(b"pmem2_config_delete\0")?,
            config_set_required_store_granularity: *lib
                .get(b"pmem2_config_set_required_store_granularity\0")?,
            source_from_fd: *lib.get(b"pmem2_source_from_fd\0")?,
            source_delete: *lib.get(b"pmem2_source_delete\0")?,
            map_new: *lib.get(b"pmem2_map_new\0")?,
            map_delete: *lib.get(b"pmem2_map_delete\0")?,
            map_get_address: *lib.get(b"pmem2_map_get_address\0")?,
            map_get_size: *lib.get(b"pmem2_map_get_size\0")?,
            map_get_store_granularity: *lib.get(b"pmem2_map_get_store_granularity\0")?,
            get_persist_fn: *lib.get(b"pmem2_get_persist_fn\0")?,
            get_memcpy_fn: *lib.get(b"pmem2_get_memcpy_fn\0")?,
            get_drain_fn: *lib.get(b"pmem2_get_drain_fn\0")?,
            errormsg: *lib.get(b"pmem2_errormsg\0")?,
            _lib: lib,
        })
    }
}
