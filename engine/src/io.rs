//! What crosses the engine's boundary: device commands out, completions in,
//! user events out. The host owns all I/O and all user memory.

use crate::error::{IoError, OpenError};

/// Monotonic time in nanoseconds since an epoch the host chooses.
pub type Nanos = u64;

/// A user request, named by the host. Unique among requests in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReqId(pub u64);

/// A device command, named by the engine. The host hands it back on completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(pub u64);

/// An engine-owned buffer (allocated through [`BufAlloc`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BufId(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// The fast device holding logs.
    Cache,
    /// The slow device the cache sits in front of.
    Backing,
}

/// Memory a device command reads from or writes into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataRef {
    /// `engine.buffer(buf)[offset..]`.
    Engine { buf: BufId, offset: usize },
    /// Byte `offset` of the user request's own buffer (kept alive by the host
    /// until the request completes).
    User { req: ReqId, offset: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandKind {
    /// Read `len` bytes at byte `offset` of the device into `dst`.
    Read {
        offset: u64,
        len: usize,
        dst: DataRef,
    },
    /// Write `len` bytes from `src` at byte `offset`. Completion means written,
    /// not durable.
    Write {
        offset: u64,
        len: usize,
        src: DataRef,
    },
    /// Write zeroes over `len` bytes at `offset`.
    WriteZeroes { offset: u64, len: u64 },
    /// Unmap `len` bytes at `offset` (contents become unspecified).
    Discard { offset: u64, len: u64 },
    /// Make every write completed before this command was issued durable.
    Flush,
}

/// A command for the host to run; report its end with
/// [`Engine::handle_completion`](crate::Engine::handle_completion).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Command {
    pub token: Token,
    pub device: Device,
    pub kind: CommandKind,
}

/// What the engine tells the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Start-up finished; user I/O is accepted from now on.
    Ready,
    /// Start-up failed; nothing was written to either device.
    OpenFailed(OpenError),
    /// Copy `len` bytes from `engine.buffer(src)[src_offset..]` into byte
    /// `dst_offset` of request `req`'s buffer. Must be done before the next
    /// call into the engine (the source may change afterwards).
    CopyToUser {
        req: ReqId,
        dst_offset: usize,
        src: BufId,
        src_offset: usize,
        len: usize,
    },
    /// A user request finished.
    Completed {
        req: ReqId,
        result: Result<(), IoError>,
    },
    /// `shutdown` finished: the cache is clean to detach.
    ShutdownComplete,
}

/// Memory for engine buffers. A host may hand out DMA-able memory; the engine
/// only needs byte slices.
pub trait BufAlloc {
    type Buf: AsRef<[u8]> + AsMut<[u8]>;
    /// A zero-filled buffer of `len` bytes (len is a multiple of 4096).
    fn alloc(&mut self, len: usize) -> Self::Buf;
}

/// Plain heap memory, for simulation and hosts that need no DMA.
#[derive(Clone, Copy, Debug, Default)]
pub struct HeapAlloc;

impl BufAlloc for HeapAlloc {
    type Buf = Box<[u8]>;
    fn alloc(&mut self, len: usize) -> Box<[u8]> {
        vec![0u8; len].into_boxed_slice()
    }
}
