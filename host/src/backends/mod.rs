//! Devices backed by files (or block devices), and the two I/O backends that
//! run engine commands on them: io_uring (default) and a thread pool doing
//! pread/pwrite/fdatasync (for kernels or sandboxes without io_uring).

pub mod threads;
pub mod uring;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use writeboost_engine::Device;

use crate::alloc::AlignedBuf;

/// One open device file.
#[derive(Debug)]
pub struct DevFile {
    pub file: File,
    /// Opened with O_DIRECT (the page cache is bypassed).
    pub direct: bool,
    /// fallocate(ZERO_RANGE) works here; cleared after the first refusal.
    zero_range_ok: AtomicBool,
    /// fallocate(PUNCH_HOLE) works here; cleared after the first refusal.
    punch_ok: AtomicBool,
}

impl DevFile {
    pub fn new(file: File, direct: bool) -> Self {
        Self {
            file,
            direct,
            zero_range_ok: AtomicBool::new(true),
            punch_ok: AtomicBool::new(true),
        }
    }

    pub fn zero_range_ok(&self) -> bool {
        self.zero_range_ok.load(Ordering::Relaxed)
    }

    pub fn set_zero_range_ok(&self, ok: bool) {
        self.zero_range_ok.store(ok, Ordering::Relaxed)
    }

    pub fn punch_ok(&self) -> bool {
        self.punch_ok.load(Ordering::Relaxed)
    }

    pub fn set_punch_ok(&self, ok: bool) {
        self.punch_ok.store(ok, Ordering::Relaxed)
    }

    fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

/// The cache and backing device files of one writeboost device, indexed by
/// [`Device`]. The files belong to base bdevs, which share them.
#[derive(Debug)]
pub struct Devices {
    pub cache: Arc<DevFile>,
    pub backing: Arc<DevFile>,
}

impl Devices {
    pub fn get(&self, d: Device) -> &DevFile {
        match d {
            Device::Cache => &self.cache,
            Device::Backing => &self.backing,
        }
    }
}

/// What to do on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Read `buf.len()` bytes at `offset` into the op's buffer.
    Read {
        offset: u64,
    },
    /// Write the op's buffer at `offset`.
    Write {
        offset: u64,
    },
    /// fdatasync.
    Flush,
    WriteZeroes {
        offset: u64,
        len: u64,
    },
    Discard {
        offset: u64,
        len: u64,
    },
}

/// A device operation; `buf` is the data buffer of reads and writes (empty otherwise).
#[derive(Debug)]
pub struct Op {
    pub tag: u64,
    pub dev: Device,
    pub kind: OpKind,
    pub buf: AlignedBuf,
}

/// A finished operation, handing the buffer back.
#[derive(Debug)]
pub struct Done {
    pub tag: u64,
    pub result: io::Result<()>,
    pub buf: AlignedBuf,
}

/// An I/O backend: starts operations and reports their ends.
pub trait Backend {
    /// Queues an operation (it may start at once or at the next `poll`).
    fn submit(&mut self, op: Op);
    /// Starts queued operations and appends finished ones to `out`.
    fn poll(&mut self, out: &mut Vec<Done>);
    /// Operations started and not yet reported.
    fn inflight(&self) -> usize;
    /// Blocks for at most `max` until an operation may have finished or the
    /// reactor thread was unparked (`None` = until unparked).
    fn wait(&mut self, max: Option<Duration>);
    fn name(&self) -> &'static str;
}

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// pread until `buf` is full (EOF is an error: device files never shrink).
pub fn pread_full(f: &DevFile, buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: rest is a valid writable region of rest.len() bytes for the call.
        let r = unsafe {
            libc::pread(
                f.fd(),
                rest.as_mut_ptr().cast(),
                rest.len(),
                offset as libc::off_t,
            )
        };
        match cvt(r) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read")),
            Ok(n) => {
                done += n;
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// pwrite all of `buf`.
pub fn pwrite_full(f: &DevFile, buf: &[u8], mut offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        // SAFETY: rest is a valid readable region of rest.len() bytes for the call.
        let r = unsafe {
            libc::pwrite(
                f.fd(),
                rest.as_ptr().cast(),
                rest.len(),
                offset as libc::off_t,
            )
        };
        match cvt(r) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "short write")),
            Ok(n) => {
                done += n;
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn fdatasync(f: &DevFile) -> io::Result<()> {
    f.file.sync_data()
}

fn fallocate(f: &DevFile, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on an fd we own; no memory is passed.
        let r = unsafe { libc::fallocate(f.fd(), mode, offset as libc::off_t, len as libc::off_t) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// True for errors meaning "this filesystem cannot do that fallocate mode".
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::ENODEV)
    )
}

/// Zeroes a range: fallocate(ZERO_RANGE) where supported, else writes zeroes.
pub fn zero_range(f: &DevFile, offset: u64, len: u64) -> io::Result<()> {
    if f.zero_range_ok.load(Ordering::Relaxed) {
        match fallocate(
            f,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => return Ok(()),
            Err(e) if unsupported(&e) => f.zero_range_ok.store(false, Ordering::Relaxed),
            Err(e) => return Err(e),
        }
    }
    write_zeroes_slow(f, offset, len)
}

/// Writes zero-filled blocks over a range (the fallback of [`zero_range`]).
pub fn write_zeroes_slow(f: &DevFile, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = AlignedBuf::zeroed(len.min(CHUNK) as usize);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        pwrite_full(f, &zeros.as_ref()[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Discards a range by punching a hole; a no-op where that is unsupported
/// (discarded contents are unspecified).
pub fn discard(f: &DevFile, offset: u64, len: u64) -> io::Result<()> {
    if !f.punch_ok.load(Ordering::Relaxed) {
        return Ok(());
    }
    match fallocate(
        f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    ) {
        Err(e) if unsupported(&e) => {
            f.punch_ok.store(false, Ordering::Relaxed);
            Ok(())
        }
        r => r,
    }
}

/// Runs one operation synchronously (thread backend, and fallbacks).
pub fn run_sync(devs: &Devices, op: &mut Op) -> io::Result<()> {
    let f = devs.get(op.dev);
    match op.kind {
        OpKind::Read { offset } => pread_full(f, op.buf.as_mut(), offset),
        OpKind::Write { offset } => pwrite_full(f, op.buf.as_ref(), offset),
        OpKind::Flush => fdatasync(f),
        OpKind::WriteZeroes { offset, len } => zero_range(f, offset, len),
        OpKind::Discard { offset, len } => discard(f, offset, len),
    }
}
