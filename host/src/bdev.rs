//! Base bdevs: the named block devices writeboost devices are built on.
//!
//! - `bdev_aio_create` (`name`, `filename`, optional `block_size`, `uuid`):
//!   an existing file or block device, opened with O_DIRECT where the
//!   filesystem allows it (buffered with a warning otherwise) and locked
//!   exclusively, so two processes can never write it at once.
//! - `bdev_malloc_create` (`name`, `num_blocks`, `block_size`, optional
//!   `uuid`): RAM, as an anonymous memory file (memfd), so both I/O backends
//!   drive it exactly like a file.
//!
//! A file-backed bdev's identity (its UUID, which a cache records to refuse a
//! different backing device) comes from `uuid` if given, else from an
//! identity file `FILENAME.wb-uuid` beside a regular file (created on first
//! use), else it is random; `save_config` records it either way.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};
use writeboost_rpc::{Params, RpcError, code};

use crate::backends::DevFile;
use crate::store::{self, StoreError};

/// What a base bdev is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseKind {
    Aio {
        filename: PathBuf,
        /// The `block_size` given at creation, if any.
        block_size_override: Option<u32>,
    },
    Malloc,
}

/// One base bdev.
#[derive(Debug)]
pub struct BaseBdev {
    pub name: String,
    pub kind: BaseKind,
    pub file: Arc<DevFile>,
    pub block_size: u32,
    pub num_blocks: u64,
    pub uuid: [u8; 16],
    /// The writeboost device using it, if any.
    pub claimed_by: Option<String>,
}

impl BaseBdev {
    pub fn size(&self) -> u64 {
        self.num_blocks * self.block_size as u64
    }

    /// The method and parameters that recreate it, for `save_config`.
    pub fn config_entry(&self) -> Value {
        let uuid = store::uuid_string(&self.uuid);
        match &self.kind {
            BaseKind::Aio {
                filename,
                block_size_override,
            } => {
                let mut p = json!({
                    "name": self.name,
                    "filename": filename.to_string_lossy(),
                    "uuid": uuid,
                });
                if let Some(bs) = block_size_override {
                    p["block_size"] = json!(bs);
                }
                json!({"method": "bdev_aio_create", "params": p})
            }
            BaseKind::Malloc => json!({
                "method": "bdev_malloc_create",
                "params": {
                    "name": self.name,
                    "num_blocks": self.num_blocks,
                    "block_size": self.block_size,
                    "uuid": uuid,
                }
            }),
        }
    }

    /// One entry of `bdev_get_bdevs`, in SPDK's shape.
    pub fn info(&self) -> Value {
        let (product, driver) = match &self.kind {
            BaseKind::Aio {
                filename,
                block_size_override,
            } => (
                "AIO disk",
                json!({"aio": {
                    "filename": filename.to_string_lossy(),
                    "block_size_override": block_size_override.is_some(),
                    "readonly": false,
                    "fallocate": true,
                    "o_direct": self.file.direct,
                }}),
            ),
            BaseKind::Malloc => ("Malloc disk", json!({})),
        };
        bdev_info(BdevInfo {
            name: &self.name,
            product_name: product,
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            uuid: &self.uuid,
            claimed: self.claimed_by.is_some(),
            driver_specific: driver,
        })
    }
}

/// What `bdev_get_bdevs` reports of any bdev.
pub struct BdevInfo<'a> {
    pub name: &'a str,
    pub product_name: &'a str,
    pub block_size: u32,
    pub num_blocks: u64,
    pub uuid: &'a [u8; 16],
    pub claimed: bool,
    pub driver_specific: Value,
}

pub fn bdev_info(i: BdevInfo<'_>) -> Value {
    let mut v = json!({
        "name": i.name,
        "aliases": [],
        "product_name": i.product_name,
        "block_size": i.block_size,
        "num_blocks": i.num_blocks,
        "uuid": store::uuid_string(i.uuid),
        "assigned_rate_limits": {
            "rw_ios_per_sec": 0,
            "rw_mbytes_per_sec": 0,
            "r_mbytes_per_sec": 0,
            "w_mbytes_per_sec": 0
        },
        "claimed": i.claimed,
        "zoned": false,
        "supported_io_types": {
            "read": true,
            "write": true,
            "unmap": true,
            "flush": true,
            "reset": false,
            "write_zeroes": true,
        },
        "driver_specific": i.driver_specific,
    });
    if i.claimed {
        v["claim_type"] = json!("exclusive_write");
    }
    v
}

fn parse_uuid_param(method: &str, s: Option<String>) -> Result<Option<[u8; 16]>, RpcError> {
    match s {
        None => Ok(None),
        Some(s) => store::parse_uuid(&s).map(Some).ok_or_else(|| {
            RpcError::invalid_params(format!(
                "{method}: parameter 'uuid' must be a UUID like \
                 01234567-89ab-cdef-0123-456789abcdef, got \"{s}\""
            ))
        }),
    }
}

fn block_size_param(method: &str, bs: Option<u64>) -> Result<Option<u32>, RpcError> {
    match bs {
        None => Ok(None),
        Some(b @ (512 | 4096)) => Ok(Some(b as u32)),
        Some(b) => Err(RpcError::invalid_params(format!(
            "{method}: parameter 'block_size' is {b}; writeboost needs 512 or 4096"
        ))),
    }
}

fn store_error(method: &str, e: StoreError) -> RpcError {
    let code = match &e {
        StoreError::Open { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => code::ENOENT,
            std::io::ErrorKind::PermissionDenied => code::EPERM,
            _ => code::EIO,
        },
        StoreError::Locked { .. } => code::EBUSY,
        StoreError::BadSize { .. } => code::EINVAL,
        _ => code::EIO,
    };
    RpcError::new(code, format!("{method}: {e}"))
}

/// A checked `bdev_aio_create` request.
pub struct AioRequest {
    pub name: String,
    pub filename: PathBuf,
    pub block_size: Option<u32>,
    pub uuid: Option<[u8; 16]>,
}

/// Checks `bdev_aio_create` parameters. SPDK's rpc.py also sends
/// `readonly`, `fallocate` and `nowait`; they are accepted when false (the
/// host always writes, and discards and write-zeroes use fallocate anyway).
pub fn parse_aio(params: Option<&Value>) -> Result<AioRequest, RpcError> {
    const M: &str = "bdev_aio_create";
    let mut p = Params::new(M, params, false)?;
    let name = p.required_string("name")?;
    let filename = PathBuf::from(p.required_string("filename")?);
    let block_size = block_size_param(M, p.uint("block_size", 0, u32::MAX as u64)?)?;
    let uuid = parse_uuid_param(M, p.string("uuid")?)?;
    if p.boolean("readonly")? == Some(true) {
        return Err(RpcError::invalid_params(format!(
            "{M}: read-only aio bdevs are not supported (writeboost writes both of its devices); \
             leave 'readonly' out"
        )));
    }
    let _ = p.boolean("fallocate")?;
    if p.boolean("nowait")? == Some(true) {
        return Err(RpcError::invalid_params(format!(
            "{M}: 'nowait' is not supported here; leave it out"
        )));
    }
    p.finish()?;
    Ok(AioRequest {
        name,
        filename,
        block_size,
        uuid,
    })
}

/// Opens the file of an aio bdev.
pub fn create_aio(r: AioRequest, direct: bool) -> Result<(BaseBdev, Option<String>), RpcError> {
    const M: &str = "bdev_aio_create";
    let opened =
        store::open_device(&r.filename, "aio bdev", direct).map_err(|e| store_error(M, e))?;
    let block_size = r.block_size.unwrap_or(512);
    if opened.size % block_size as u64 != 0 {
        return Err(RpcError::new(
            code::EINVAL,
            format!(
                "{M}: {} is {} bytes, not a multiple of block_size {block_size}",
                r.filename.display(),
                opened.size
            ),
        ));
    }
    let uuid = match r.uuid {
        Some(u) => u,
        None => file_identity(&r.filename).map_err(|e| store_error(M, e))?,
    };
    Ok((
        BaseBdev {
            name: r.name,
            kind: BaseKind::Aio {
                filename: r.filename,
                block_size_override: r.block_size,
            },
            file: Arc::new(opened.file),
            block_size,
            num_blocks: opened.size / block_size as u64,
            uuid,
            claimed_by: None,
        },
        opened.warning,
    ))
}

/// The identity of a file without a given UUID (see the module documentation).
fn file_identity(path: &Path) -> Result<[u8; 16], StoreError> {
    if std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        let mut id = path.as_os_str().to_owned();
        id.push(".wb-uuid");
        let id = PathBuf::from(id);
        match store::identity(&id, path) {
            Ok(u) => return Ok(u),
            // An unwritable directory: fall back to a random identity.
            Err(StoreError::Identity { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    store::random_uuid()
}

/// A checked `bdev_malloc_create` request.
pub struct MallocRequest {
    /// `None`: the first free MallocN.
    pub name: Option<String>,
    pub num_blocks: u64,
    pub block_size: u32,
    pub uuid: Option<[u8; 16]>,
}

/// Checks `bdev_malloc_create` parameters (SPDK's names; rpc.py turns its
/// size in MiB into `num_blocks`).
pub fn parse_malloc(params: Option<&Value>) -> Result<MallocRequest, RpcError> {
    const M: &str = "bdev_malloc_create";
    let mut p = Params::new(M, params, false)?;
    // Without a name the bdev is called MallocN, as in SPDK.
    let name = p.string("name")?;
    let num_blocks = p.uint("num_blocks", 1, 1 << 40)?.ok_or_else(|| {
        RpcError::invalid_params(format!("{M}: parameter 'num_blocks' is required"))
    })?;
    let block_size =
        block_size_param(M, p.uint("block_size", 0, u32::MAX as u64)?)?.ok_or_else(|| {
            RpcError::invalid_params(format!("{M}: parameter 'block_size' is required"))
        })?;
    let uuid = parse_uuid_param(M, p.string("uuid")?)?;
    // rpc.py sends these as false/absent; anything else asks for metadata or
    // protection information, which writeboost does not use.
    for flag in ["md_interleave", "dif_is_head_of_md"] {
        if p.boolean(flag)? == Some(true) {
            return Err(RpcError::invalid_params(format!(
                "{M}: '{flag}' is not supported (no metadata); leave it out"
            )));
        }
    }
    for (n, ok) in [
        ("md_size", 0..=0),
        ("dif_type", 0..=0),
        ("dif_pi_format", 0..=0),
        ("physical_block_size", 0..=65536),
        ("optimal_io_boundary", 0..=u32::MAX as u64),
    ] {
        let _ = p.uint(n, *ok.start(), *ok.end())?;
    }
    let _ = p.int("numa_id", -1, i32::MAX as i64)?;
    p.finish()?;
    Ok(MallocRequest {
        name,
        num_blocks,
        block_size,
        uuid,
    })
}

/// The machine's memory in bytes (MemTotal), if it can be read.
fn total_ram() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Allocates a malloc bdev as a memory file of its size (pages are
/// allocated as they are written).
pub fn create_malloc(r: MallocRequest, name: String) -> Result<BaseBdev, RpcError> {
    const M: &str = "bdev_malloc_create";
    let size = r
        .num_blocks
        .checked_mul(r.block_size as u64)
        .ok_or_else(|| RpcError::invalid_params(format!("{M}: num_blocks is too large")))?;
    if let Some(ram) = total_ram()
        && size > ram
    {
        return Err(RpcError::new(
            code::ENOMEM,
            format!(
                "{M}: {size} bytes is more than this machine's memory ({ram} bytes); give fewer \
                 num_blocks"
            ),
        ));
    }
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns
    // a new descriptor (owned by the File below) or -1.
    let fd = unsafe { libc::memfd_create(c"writeboost-malloc".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(RpcError::new(
            code::ENOMEM,
            format!(
                "{M}: memfd_create failed: {}",
                std::io::Error::last_os_error()
            ),
        ));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|e| {
        RpcError::new(
            code::ENOMEM,
            format!("{M}: cannot size the memory of {name} to {size} bytes: {e}"),
        )
    })?;
    let uuid = match r.uuid {
        Some(u) => u,
        None => store::random_uuid().map_err(|e| store_error(M, e))?,
    };
    Ok(BaseBdev {
        name,
        kind: BaseKind::Malloc,
        file: Arc::new(DevFile::new(file, false)),
        block_size: r.block_size,
        num_blocks: r.num_blocks,
        uuid,
        claimed_by: None,
    })
}
