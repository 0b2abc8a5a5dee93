//! The data directory: device files (created sparse when missing), their
//! O_DIRECT opening, an exclusive lock, and the backing device's identity.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::alloc::AlignedBuf;
use crate::backends::DevFile;

pub struct StoreOptions {
    pub data_dir: PathBuf,
    pub cache_file: Option<PathBuf>,
    pub backing_file: Option<PathBuf>,
    pub cache_size: u64,
    pub backing_size: u64,
}

/// The default configuration's files, created if missing.
pub struct Prepared {
    pub cache_path: PathBuf,
    pub backing_path: PathBuf,
    /// The backing device's identity (kept in DATA_DIR/backing.uuid).
    pub backing_uuid: [u8; 16],
    /// Things the user should know (sizes that differ from the flags).
    pub notes: Vec<String>,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot create data directory {path}: {source}; check the path and its permissions")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot open {path}: {source}; check the path and its permissions")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot size {path} to {size} bytes: {source}; is there room on the filesystem?")]
    Resize {
        path: PathBuf,
        size: u64,
        source: io::Error,
    },
    #[error(
        "{path} is in use by another writeboost process; stop it first or use another --data-dir"
    )]
    Locked { path: PathBuf },
    #[error("{what} size {size} is not a positive multiple of 4096 bytes; pick another size")]
    BadSize { what: &'static str, size: u64 },
    #[error("cannot read or write the identity file {path}: {source}")]
    Identity { path: PathBuf, source: io::Error },
    #[error(
        "identity file {path} is corrupt; if {backing} is the right backing file, delete the \
         identity file and restart with --format (this discards the cache contents)"
    )]
    BadIdentity { path: PathBuf, backing: PathBuf },
    #[error("cannot read random bytes from /dev/urandom: {0}")]
    Random(io::Error),
}

/// 16 random bytes from the kernel.
pub fn random_uuid() -> Result<[u8; 16], StoreError> {
    let mut b = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(StoreError::Random)?;
    // RFC 4122 version 4, variant 1.
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(b)
}

pub use writeboost_rpc::uuid_string;

pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.trim().chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || !hex.is_ascii() {
        return None;
    }
    let mut u = [0u8; 16];
    for (i, b) in u.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(u)
}

fn open_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Open {
        path: path.to_owned(),
        source,
    }
}

/// Creates a sparse device file of `size` bytes if it is missing; true if it did.
fn create_if_missing(path: &Path, size: u64, what: &'static str) -> Result<bool, StoreError> {
    if path.exists() {
        return Ok(false);
    }
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(StoreError::BadSize { what, size });
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(open_err(path))?;
    f.set_len(size).map_err(|source| StoreError::Resize {
        path: path.to_owned(),
        size,
        source,
    })?;
    f.sync_all().map_err(open_err(path))?;
    Ok(true)
}

/// An opened device file: O_DIRECT where the filesystem allows it.
pub struct Opened {
    pub file: DevFile,
    pub size: u64,
    /// Set when O_DIRECT was refused and buffered I/O is used instead.
    pub warning: Option<String>,
}

/// Opens an existing device file or block device for reading and writing,
/// takes its exclusive lock and measures it.
pub fn open_device(path: &Path, what: &'static str, direct: bool) -> Result<Opened, StoreError> {
    let mut file = None;
    let mut warning = None;
    if direct {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) if probe_direct(&f) => file = Some(DevFile::new(f, true)),
            Ok(_) => {
                warning = Some(format!(
                    "warning: {} does not support O_DIRECT with 512-byte alignment (tmpfs?); \
                     using buffered I/O (flushes still make data durable)",
                    path.display()
                ))
            }
            // Missing files and permissions are reported by the plain open below.
            Err(_) => {}
        }
    }
    let file = match file {
        Some(f) => f,
        None => DevFile::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(open_err(path))?,
            false,
        ),
    };
    if direct && !file.direct && warning.is_none() {
        warning = Some(format!(
            "warning: {} cannot be opened with O_DIRECT; using buffered I/O (flushes still \
             make data durable)",
            path.display()
        ));
    }
    lock(&file.file, path)?;
    let size = (&file.file)
        .seek(SeekFrom::End(0))
        .map_err(open_err(path))?;
    if size == 0 || size % 512 != 0 {
        return Err(StoreError::BadSize { what, size });
    }
    Ok(Opened {
        file,
        size,
        warning,
    })
}

/// True if a 512-byte aligned O_DIRECT read works on this file.
fn probe_direct(f: &File) -> bool {
    let mut b = AlignedBuf::zeroed(4096);
    // SAFETY: b is a valid, 4096-aligned, writable buffer of at least 512 bytes.
    let r = unsafe { libc::pread(f.as_raw_fd(), b.as_mut_ptr().cast(), 512, 0) };
    r >= 0
}

fn lock(f: &File, path: &Path) -> Result<(), StoreError> {
    // SAFETY: plain syscall on an fd we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        return Err(StoreError::Locked {
            path: path.to_owned(),
        });
    }
    Ok(())
}

fn write_identity(path: &Path, uuid: &[u8; 16]) -> Result<(), StoreError> {
    let err = |source| StoreError::Identity {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("uuid.tmp");
    let mut f = File::create(&tmp).map_err(err)?;
    writeln!(f, "{}", uuid_string(uuid)).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads an identity file written by [`write_identity`].
pub fn read_identity(path: &Path, device: &Path) -> Result<[u8; 16], StoreError> {
    let s = fs::read_to_string(path).map_err(|source| StoreError::Identity {
        path: path.to_owned(),
        source,
    })?;
    parse_uuid(&s).ok_or_else(|| StoreError::BadIdentity {
        path: path.to_owned(),
        backing: device.to_owned(),
    })
}

/// The identity kept in `id_path`, created (random) if the file is missing.
pub fn identity(id_path: &Path, device: &Path) -> Result<[u8; 16], StoreError> {
    if id_path.exists() {
        return read_identity(id_path, device);
    }
    let u = random_uuid()?;
    write_identity(id_path, &u)?;
    Ok(u)
}

/// Creates the data directory, the missing device files (sparse) and the
/// backing identity: what the embedded default configuration runs on.
pub fn prepare(o: &StoreOptions) -> Result<Prepared, StoreError> {
    fs::create_dir_all(&o.data_dir).map_err(|source| StoreError::CreateDir {
        path: o.data_dir.clone(),
        source,
    })?;
    let mut notes = Vec::new();
    let cache_path = o
        .cache_file
        .clone()
        .unwrap_or_else(|| o.data_dir.join("cache.img"));
    let backing_path = o
        .backing_file
        .clone()
        .unwrap_or_else(|| o.data_dir.join("backing.img"));
    let mut backing_created = false;
    for (path, size, what) in [
        (&cache_path, o.cache_size, "cache"),
        (&backing_path, o.backing_size, "backing"),
    ] {
        let created = create_if_missing(path, size, what)?;
        if what == "backing" {
            backing_created = created;
        }
        if !created
            && let Ok(m) = fs::metadata(path)
            && m.is_file()
            && m.len() != size
        {
            notes.push(format!(
                "{what} file {} exists with {} bytes; using that size (the size flag only \
                 applies when creating it)",
                path.display(),
                m.len()
            ));
        }
    }
    let id_path = o.data_dir.join("backing.uuid");
    let backing_uuid = if backing_created || !id_path.exists() {
        if !backing_created {
            notes.push(format!(
                "{} is missing; gave {} a new identity (a cache formatted for it before will be \
                 refused: restart with --format if that happens)",
                id_path.display(),
                backing_path.display()
            ));
        }
        let u = random_uuid()?;
        write_identity(&id_path, &u)?;
        u
    } else {
        read_identity(&id_path, &backing_path)?
    };
    Ok(Prepared {
        cache_path,
        backing_path,
        backing_uuid,
        notes,
    })
}

/// Parses sizes like `4096`, `256M`, `256MiB`, `1G`, `1GB` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size; use e.g. 4096, 256M or 1G"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        u => return Err(format!("unknown size unit '{u}'; use K, M, G or T")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("2k").unwrap(), 2048);
        assert!(parse_size("x").is_err());
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn uuids_round_trip() {
        let u = random_uuid().unwrap();
        assert_eq!(parse_uuid(&uuid_string(&u)), Some(u));
        assert_eq!(parse_uuid("nonsense"), None);
        assert_eq!(parse_uuid("zz000000000000000000000000000000"), None);
    }

    #[test]
    fn prepares_opens_and_locks() {
        let dir = tempfile::tempdir().unwrap();
        let o = StoreOptions {
            data_dir: dir.path().join("d"),
            cache_file: None,
            backing_file: None,
            cache_size: 8 << 20,
            backing_size: 16 << 20,
        };
        let p = prepare(&o).unwrap();
        let uuid = p.backing_uuid;
        let c = open_device(&p.cache_path, "cache", true).unwrap();
        assert_eq!(c.size, 8 << 20);
        assert!(matches!(
            open_device(&p.cache_path, "cache", true),
            Err(StoreError::Locked { .. })
        ));
        drop(c);
        let p = prepare(&StoreOptions {
            backing_size: 1 << 30,
            ..o
        })
        .unwrap();
        assert_eq!(p.backing_uuid, uuid);
        assert!(!p.notes.is_empty());
        let b = open_device(&p.backing_path, "backing", false).unwrap();
        assert_eq!(b.size, 16 << 20);
        assert!(matches!(
            open_device(&dir.path().join("missing"), "cache", true),
            Err(StoreError::Open { .. })
        ));
    }
}
