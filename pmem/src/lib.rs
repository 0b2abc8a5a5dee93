//! A pmem pool file mapped through PMDK's libpmem2, as the engine's
//! [`Pmem`]: stores are plain copies into the mapping, and `persist` is
//! libpmem2's persist function (cache-line flushes and a fence on DAX
//! mappings, msync elsewhere); `write_persist` is libpmem2's memcpy function,
//! which on DAX uses non-temporal stores for all but small copies.
//!
//! libpmem2 is loaded when the first pool is opened (see [`libpmem2`]), so
//! only mode 1 needs PMDK installed; without it, opening a pool fails with
//! [`PoolError::NoPmdk`], which says what to install.
//!
//! This is the FFI edge for pmem: every `unsafe` block says why it is sound.

mod libpmem2;

use std::ffi::{CStr, c_void};
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use libpmem2::{
    Api, DrainFn, MemcpyFn, PMEM2_F_MEM_NODRAIN, PMEM2_GRANULARITY_BYTE, PMEM2_GRANULARITY_PAGE,
    PersistFn, Pmem2Config, Pmem2Map, Pmem2Source,
};
use thiserror::Error;
use writeboost_engine::pmem::Pmem;

/// Opening or mapping a pool failed.
#[derive(Debug, Error)]
pub enum PoolError {
    #[error("cannot open pmem pool {path}: {source}; check the path and that it is writable")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "pmem pool {path} is empty; create it with the size you want (e.g. fallocate -l 64M {path})"
    )]
    Empty { path: PathBuf },
    #[error("PMDK could not map pmem pool {path}: {msg}")]
    Map { path: PathBuf, msg: String },
    #[error(
        "mode 1 needs PMDK's libpmem2, which could not be loaded ({detail}); install it \
         (Debian/Ubuntu: apt-get install libpmem2) or use mode 0"
    )]
    NoPmdk { detail: String },
}

fn pmdk_error(api: &Api) -> String {
    // SAFETY: pmem2_errormsg returns a pointer to a NUL-terminated
    // thread-local buffer that stays valid until the next libpmem2 call here.
    unsafe {
        let p = (api.errormsg)();
        if p.is_null() {
            "unknown error".into()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

/// A mapped pool.
pub struct PmdkPool {
    api: &'static Api,
    map: *mut Pmem2Map,
    base: *mut u8,
    len: u64,
    persist_fn: PersistFn,
    memcpy_fn: MemcpyFn,
    drain_fn: DrainFn,
    dax: bool,
    _file: std::fs::File,
}

impl PmdkPool {
    /// Maps an existing pool file (or devdax device).
    pub fn open(path: &Path) -> Result<Self, PoolError> {
        let api = libpmem2::api().map_err(|detail| PoolError::NoPmdk { detail })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| PoolError::Open {
                path: path.into(),
                source,
            })?;
        if file.metadata().map(|m| m.len()).unwrap_or(0) == 0 && !path.starts_with("/dev") {
            return Err(PoolError::Empty { path: path.into() });
        }
        let map_err = |msg: String| PoolError::Map {
            path: path.into(),
            msg,
        };
        let mut cfg: *mut Pmem2Config = std::ptr::null_mut();
        let mut src: *mut Pmem2Source = std::ptr::null_mut();
        let mut map: *mut Pmem2Map = std::ptr::null_mut();
        // SAFETY: each call gets valid out-pointers; cfg and src are deleted
        // on every path once the mapping exists or failed, and the file
        // descriptor outlives the mapping (kept in `_file`).
        unsafe {
            if (api.config_new)(&mut cfg) != 0 {
                return Err(map_err(pmdk_error(api)));
            }
            // Accept page granularity so regular files work (persist is then msync).
            let mut rc = (api.config_set_required_store_granularity)(cfg, PMEM2_GRANULARITY_PAGE);
            if rc == 0 {
                rc = (api.source_from_fd)(&mut src, file.as_raw_fd());
            }
            if rc == 0 {
                rc = (api.map_new)(&mut map, cfg, src);
            }
            let msg = if rc != 0 { Some(pmdk_error(api)) } else { None };
            if !src.is_null() {
                (api.source_delete)(&mut src);
            }
            (api.config_delete)(&mut cfg);
            if let Some(msg) = msg {
                return Err(map_err(msg));
            }
            let persist_fn =
                (api.get_persist_fn)(map).ok_or_else(|| map_err("no persist function".into()))?;
            let memcpy_fn =
                (api.get_memcpy_fn)(map).ok_or_else(|| map_err("no memcpy function".into()))?;
            let drain_fn =
                (api.get_drain_fn)(map).ok_or_else(|| map_err("no drain function".into()))?;
            Ok(Self {
                base: (api.map_get_address)(map) as *mut u8,
                len: (api.map_get_size)(map) as u64,
                persist_fn,
                memcpy_fn,
                drain_fn,
                dax: (api.map_get_store_granularity)(map) != PMEM2_GRANULARITY_PAGE,
                api,
                map,
                _file: file,
            })
        }
    }

    /// Whether stores become persistent by CPU cache flushes (DAX); if not,
    /// persistence relies on msync and is slow.
    pub fn is_dax(&self) -> bool {
        self.dax
    }

    /// Byte granularity (the platform flushes caches on power loss).
    pub fn byte_granular(&self) -> bool {
        // SAFETY: `map` is a live mapping owned by self.
        unsafe { (self.api.map_get_store_granularity)(self.map) == PMEM2_GRANULARITY_BYTE }
    }

    /// Copies `src` into the pool with libpmem2's memcpy function and `flags`.
    fn persisting_copy(&mut self, offset: u64, src: &[u8], flags: u32) {
        self.check(offset, src.len());
        // SAFETY: the range is inside the live mapping (checked above), `src`
        // is a distinct Rust buffer, `&mut self` makes this the only access,
        // and the memcpy function comes from this mapping.
        unsafe {
            (self.memcpy_fn)(
                self.base.add(offset as usize).cast::<c_void>(),
                src.as_ptr().cast::<c_void>(),
                src.len(),
                flags,
            );
        }
    }

    fn check(&self, offset: u64, len: usize) {
        assert!(
            offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= self.len),
            "pmem access out of range"
        );
    }
}

impl Pmem for PmdkPool {
    fn len(&self) -> u64 {
        self.len
    }

    fn read(&self, offset: u64, dst: &mut [u8]) {
        self.check(offset, dst.len());
        // SAFETY: the range is inside the live mapping (checked above) and
        // `dst` is a distinct Rust buffer, so the regions do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.add(offset as usize),
                dst.as_mut_ptr(),
                dst.len(),
            )
        }
    }

    fn write(&mut self, offset: u64, src: &[u8]) {
        self.check(offset, src.len());
        // SAFETY: as in `read`; `&mut self` makes this the only access.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.add(offset as usize), src.len())
        }
    }

    fn write_persist(&mut self, offset: u64, src: &[u8]) {
        // Flags 0: returns once the copy is persistent.
        self.persisting_copy(offset, src, 0);
    }

    fn write_nodrain(&mut self, offset: u64, src: &[u8]) {
        // Flushed; persistent at the next drain.
        self.persisting_copy(offset, src, PMEM2_F_MEM_NODRAIN);
    }

    fn drain(&mut self) {
        // SAFETY: the drain function comes from this mapping and takes no arguments.
        unsafe { (self.drain_fn)() }
    }

    fn persist(&mut self, offset: u64, len: u64) {
        self.check(offset, len as usize);
        // SAFETY: the range is inside the live mapping; the persist function
        // comes from this mapping.
        unsafe {
            (self.persist_fn)(
                self.base.add(offset as usize) as *const c_void,
                len as usize,
            )
        }
    }
}

impl Drop for PmdkPool {
    fn drop(&mut self) {
        // SAFETY: `map` came from pmem2_map_new and is deleted once.
        unsafe {
            (self.api.map_delete)(&mut self.map);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_file_maps_and_keeps_what_was_persisted() {
        let dir = std::env::temp_dir().join(format!("wb-pmem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pool");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        {
            let mut p = PmdkPool::open(&path).unwrap();
            assert_eq!(p.len(), 1 << 20);
            p.write(4096, b"writeboost");
            p.persist(4096, 10);
            // Large enough for non-temporal stores where the mapping is DAX.
            let block: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
            p.write_persist(8192, &block);
            p.write_nodrain(12288, &block[..64]);
            p.write_nodrain(12352, b"entry");
            p.drain();
        }
        let p = PmdkPool::open(&path).unwrap();
        let mut b = [0u8; 10];
        p.read(4096, &mut b);
        assert_eq!(&b, b"writeboost");
        let mut block = vec![0u8; 4096];
        p.read(8192, &mut block);
        assert!(
            block
                .iter()
                .enumerate()
                .all(|(i, &v)| v == (i as u32 * 7) as u8)
        );
        let mut tail = [0u8; 69];
        p.read(12288, &mut tail);
        assert_eq!(&tail[..64], &block[..64]);
        assert_eq!(&tail[64..], b"entry");
        assert!(matches!(
            PmdkPool::open(&dir.join("missing")),
            Err(PoolError::Open { .. })
        ));
        std::fs::File::create(dir.join("empty")).unwrap();
        let e = PmdkPool::open(&dir.join("empty")).err().unwrap();
        assert!(e.to_string().contains("fallocate"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
