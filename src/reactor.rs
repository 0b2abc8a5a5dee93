//! The reactor: one thread owns the engine and the I/O backend and runs a
//! polled loop. Connection threads hand it requests through a lock-free
//! queue and get replies back on per-connection channels.
//!
//! Each turn of the loop takes new requests, reaps device completions and runs
//! engine deadlines. When a turn finds nothing to do the reactor spins for
//! `spin` (lowest latency), then sleeps with growing sleeps capped at
//! `idle_sleep` while device I/O is in flight (io_uring waits in the kernel
//! for a completion, so completions end the sleep at once), and parks until
//! woken or the engine's next deadline when nothing at all is in flight, so an
//! idle host uses no CPU.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use crossbeam_queue::SegQueue;
use thiserror::Error;
use writeboost_engine::{
    Command, CommandKind, DataRef, DeviceError, Engine, Event, IoError, Nanos, OpenError,
    OpenParams, ReqId, SubmitError,
};

use crate::alloc::{AlignedAlloc, AlignedBuf};
use crate::device::threads::ThreadBackend;
use crate::device::uring::UringBackend;
use crate::device::{Backend, Devices, Done, Op, OpKind};
use crate::nbd::proto;

/// What a connection asks the reactor to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReqKind {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

/// A user request from a connection.
pub struct Request {
    pub kind: ReqKind,
    pub offset: u64,
    pub len: u64,
    /// Payload of a write (empty otherwise).
    pub data: Vec<u8>,
    pub fua: bool,
    pub handle: u64,
    pub reply: Sender<ConnMsg>,
    /// Budget the connection charged for this request (returned with the reply).
    pub cost: u64,
}

/// Messages to a connection's writer thread.
pub enum ConnMsg {
    /// A reply; `data` is the payload of a successful read.
    Reply {
        handle: u64,
        error: u32,
        data: Vec<u8>,
        cost: u64,
    },
    /// The reader is done; exit once every outstanding reply is written.
    Close,
}

/// State shared between the reactor and everybody else.
#[derive(Default)]
pub struct Shared {
    pub queue: SegQueue<Request>,
    pub reactor: OnceLock<Thread>,
    /// Graceful shutdown requested.
    pub stop: AtomicBool,
}

impl Shared {
    pub fn submit(&self, r: Request) {
        self.queue.push(r);
        self.wake();
    }

    pub fn wake(&self) {
        if let Some(t) = self.reactor.get() {
            t.unpark();
        }
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IoBackendKind {
    /// io_uring, falling back to threads (with a warning) where unavailable.
    Uring,
    /// A pool of threads doing pread/pwrite/fdatasync.
    Threads,
}

pub struct ReactorConfig {
    pub params: OpenParams,
    pub devices: Arc<Devices>,
    pub backend: IoBackendKind,
    pub queue_depth: u32,
    pub io_threads: usize,
    pub spin: Duration,
    pub idle_sleep: Duration,
}

#[derive(Debug, Error)]
pub enum ReactorError {
    #[error("invalid engine parameters: {0}")]
    Config(#[from] writeboost_engine::ConfigError),
    #[error("could not open the cache: {0}")]
    Open(#[from] OpenError),
    #[error("could not start I/O threads: {0}")]
    Threads(std::io::Error),
    #[error("the engine stopped making progress during start-up (no I/O in flight); this is a bug")]
    Stuck,
}

/// Reported to the main thread once the engine is ready.
pub struct ReadyInfo {
    pub backend: &'static str,
}

struct UserReq {
    kind: ReqKind,
    handle: u64,
    reply: Sender<ConnMsg>,
    cost: u64,
    /// Read destination or write payload (the engine may refer to it).
    buf: Vec<u8>,
    /// Run a flush after this request succeeds (FUA on trim/write-zeroes).
    then_flush: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Starting,
    Running,
    /// Stop requested: waiting for user requests in flight.
    Draining,
    /// engine.shutdown called; waiting for ShutdownComplete.
    ShuttingDown,
    Done,
}

struct Host {
    engine: Engine<AlignedAlloc>,
    backend: Box<dyn Backend>,
    shared: Arc<Shared>,
    epoch: Instant,
    reqs: HashMap<ReqId, UserReq>,
    /// Device commands in flight, by token.
    cmds: HashMap<u64, Command>,
    next_req: u64,
    phase: Phase,
    open_result: Option<Result<(), OpenError>>,
    pool: HashMap<usize, Vec<AlignedBuf>>,
    dones: Vec<Done>,
}

const POOL_PER_SIZE: usize = 64;
/// Requests taken from the queue per loop turn (bounds latency of completions).
const BATCH: usize = 256;

impl Host {
    fn now(&self) -> Nanos {
        self.epoch.elapsed().as_nanos() as Nanos
    }

    fn get_buf(&mut self, len: usize) -> AlignedBuf {
        self.pool
            .get_mut(&len)
            .and_then(|v| v.pop())
            .unwrap_or_else(|| AlignedBuf::zeroed(len))
    }

    fn put_buf(&mut self, b: AlignedBuf) {
        if b.len() == 0 {
            return;
        }
        let v = self.pool.entry(b.len()).or_default();
        if v.len() < POOL_PER_SIZE {
            v.push(b);
        }
    }

    /// Starts every command and delivers every event the engine has.
    fn drain(&mut self) {
        loop {
            let mut any = false;
            while let Some(cmd) = self.engine.poll_command() {
                any = true;
                self.start(cmd);
            }
            while let Some(ev) = self.engine.poll_event() {
                any = true;
                self.event(ev);
            }
            if !any {
                break;
            }
        }
    }

    fn start(&mut self, cmd: Command) {
        let (kind, buf) = match cmd.kind {
            CommandKind::Read { offset, len, .. } => (OpKind::Read { offset }, self.get_buf(len)),
            CommandKind::Write { offset, len, src } => {
                let mut b = self.get_buf(len);
                let data: &[u8] = match src {
                    DataRef::Engine { buf, offset } => {
                        &self.engine.buffer(buf)[offset..offset + len]
                    }
                    DataRef::User { req, offset } => match self.reqs.get(&req) {
                        Some(r) => &r.buf[offset..offset + len],
                        None => &[],
                    },
                };
                if data.len() == len {
                    b.as_mut().copy_from_slice(data);
                } else {
                    // The engine named a request it no longer tracks: fail the command.
                    eprintln!("writeboost: internal error: write source missing for {cmd:?}");
                    self.put_buf(b);
                    let now = self.now();
                    self.engine
                        .handle_completion(cmd.token, Err(DeviceError), now);
                    return;
                }
                (OpKind::Write { offset }, b)
            }
            CommandKind::WriteZeroes { offset, len } => {
                (OpKind::WriteZeroes { offset, len }, AlignedBuf::zeroed(0))
            }
            CommandKind::Discard { offset, len } => {
                (OpKind::Discard { offset, len }, AlignedBuf::zeroed(0))
            }
            CommandKind::Flush => (OpKind::Flush, AlignedBuf::zeroed(0)),
        };
        self.cmds.insert(cmd.token.0, cmd);
        self.backend.submit(Op {
            tag: cmd.token.0,
            dev: cmd.device,
            kind,
            buf,
        });
    }

    fn complete_io(&mut self, d: Done) {
        let Some(cmd) = self.cmds.remove(&d.tag) else {
            return;
        };
        if let Err(e) = &d.result {
            eprintln!(
                "writeboost: {:?} device I/O failed ({:?}): {e}",
                cmd.device, cmd.kind
            );
        }
        if d.result.is_ok()
            && let CommandKind::Read { len, dst, .. } = cmd.kind
        {
            let src = &d.buf.as_ref()[..len];
            match dst {
                DataRef::Engine { buf, offset } => {
                    self.engine.buffer_mut(buf)[offset..offset + len].copy_from_slice(src)
                }
                DataRef::User { req, offset } => {
                    if let Some(r) = self.reqs.get_mut(&req) {
                        r.buf[offset..offset + len].copy_from_slice(src);
                    }
                }
            }
        }
        let result = d.result.map_err(|_| DeviceError);
        self.put_buf(d.buf);
        let now = self.now();
        self.engine.handle_completion(cmd.token, result, now);
        self.drain();
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Ready => self.open_result = Some(Ok(())),
            Event::OpenFailed(e) => self.open_result = Some(Err(e)),
            Event::CopyToUser {
                req,
                dst_offset,
                src,
                src_offset,
                len,
            } => {
                if let Some(r) = self.reqs.get_mut(&req) {
                    r.buf[dst_offset..dst_offset + len]
                        .copy_from_slice(&self.engine.buffer(src)[src_offset..src_offset + len]);
                }
            }
            Event::Completed { req, result } => {
                let Some(mut r) = self.reqs.remove(&req) else {
                    return;
                };
                if result.is_ok() && r.then_flush {
                    r.then_flush = false;
                    let id = self.new_id();
                    let now = self.now();
                    match self.engine.submit_flush(id, now) {
                        Ok(()) => {
                            self.reqs.insert(id, r);
                        }
                        Err(e) => reply(&r, submit_errno(&e), Vec::new()),
                    }
                    return;
                }
                match result {
                    Ok(()) => {
                        let data = if r.kind == ReqKind::Read {
                            std::mem::take(&mut r.buf)
                        } else {
                            Vec::new()
                        };
                        reply(&r, 0, data);
                    }
                    Err(e) => reply(&r, io_errno(e), Vec::new()),
                }
            }
            Event::ShutdownComplete => self.phase = Phase::Done,
        }
    }

    fn new_id(&mut self) -> ReqId {
        self.next_req += 1;
        ReqId(self.next_req)
    }

    fn accept(&mut self, r: Request) {
        if self.phase != Phase::Running {
            let _ = r.reply.send(ConnMsg::Reply {
                handle: r.handle,
                error: proto::ESHUTDOWN,
                data: Vec::new(),
                cost: r.cost,
            });
            return;
        }
        let id = self.new_id();
        let now = self.now();
        let mut u = UserReq {
            kind: r.kind,
            handle: r.handle,
            reply: r.reply,
            cost: r.cost,
            buf: Vec::new(),
            then_flush: false,
        };
        let res = match r.kind {
            ReqKind::Read => {
                u.buf = vec![0u8; r.len as usize];
                self.engine.submit_read(id, r.offset, r.len, now)
            }
            ReqKind::Write => {
                let res = self.engine.submit_write(id, r.offset, &r.data, r.fua, now);
                u.buf = r.data;
                res
            }
            ReqKind::Flush => self.engine.submit_flush(id, now),
            ReqKind::Trim => {
                u.then_flush = r.fua;
                self.engine.submit_discard(id, r.offset, r.len, now)
            }
            ReqKind::WriteZeroes => {
                u.then_flush = r.fua;
                self.engine.submit_write_zeroes(id, r.offset, r.len, now)
            }
        };
        match res {
            Ok(()) => {
                self.reqs.insert(id, u);
            }
            Err(e) => reply(&u, submit_errno(&e), Vec::new()),
        }
        self.drain();
    }

    /// One turn: requests, completions, deadlines, shutdown. True if anything happened.
    fn turn(&mut self) -> bool {
        let mut progress = false;
        if self.phase != Phase::Starting {
            for _ in 0..BATCH {
                let Some(r) = self.shared.queue.pop() else {
                    break;
                };
                progress = true;
                self.accept(r);
            }
        }
        let mut dones = std::mem::take(&mut self.dones);
        self.backend.poll(&mut dones);
        if !dones.is_empty() {
            progress = true;
        }
        for d in dones.drain(..) {
            self.complete_io(d);
        }
        self.dones = dones;
        let now = self.now();
        if self.engine.poll_timeout().is_some_and(|t| t <= now) {
            self.engine.handle_timeout(now);
            self.drain();
            progress = true;
        }
        if self.phase == Phase::Running && self.shared.stopping() {
            self.phase = Phase::Draining;
            progress = true;
        }
        if self.phase == Phase::Draining && self.reqs.is_empty() {
            self.phase = Phase::ShuttingDown;
            let now = self.now();
            self.engine.shutdown(now);
            self.drain();
            progress = true;
        }
        progress
    }

    /// Runs turns until `until` holds, backing off when idle.
    fn run_until(&mut self, spin: Duration, idle_sleep: Duration, until: impl Fn(&Self) -> bool) {
        let mut idle_since: Option<Instant> = None;
        let mut sleep = Duration::from_micros(1);
        while !until(self) {
            if self.turn() {
                idle_since = None;
                sleep = Duration::from_micros(1);
                continue;
            }
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() < spin {
                std::hint::spin_loop();
                continue;
            }
            if !self.shared.queue.is_empty() {
                continue;
            }
            let deadline = self
                .engine
                .poll_timeout()
                .map(|t| Duration::from_nanos(t.saturating_sub(self.now())));
            if self.backend.inflight() == 0 && self.phase != Phase::Draining {
                // Fully idle: sleep until woken or the engine's next deadline.
                self.backend.wait(deadline);
            } else {
                let d = deadline.map_or(sleep, |t| t.min(sleep));
                self.backend.wait(Some(d));
                sleep = (sleep * 2).min(idle_sleep);
            }
        }
    }
}

fn reply(r: &UserReq, error: u32, data: Vec<u8>) {
    // The connection may be gone; its replies are dropped then.
    let _ = r.reply.send(ConnMsg::Reply {
        handle: r.handle,
        error,
        data,
        cost: r.cost,
    });
}

fn submit_errno(e: &SubmitError) -> u32 {
    match e {
        SubmitError::BadRange { .. } | SubmitError::DuplicateRequest(_) => proto::EINVAL,
        SubmitError::NotReady | SubmitError::ShuttingDown => proto::ESHUTDOWN,
    }
}

fn io_errno(e: IoError) -> u32 {
    match e {
        IoError::ReadOnly => proto::EPERM,
        IoError::CacheDevice | IoError::BackingDevice => proto::EIO,
    }
}

fn make_backend(cfg: &ReactorConfig, shared: &Shared) -> Result<Box<dyn Backend>, ReactorError> {
    if cfg.backend == IoBackendKind::Uring {
        // WRITEBOOST_NO_URING simulates a kernel or sandbox without io_uring.
        let ring = match std::env::var_os("WRITEBOOST_NO_URING") {
            Some(_) => Err(std::io::Error::other("disabled by WRITEBOOST_NO_URING")),
            None => UringBackend::new(Arc::clone(&cfg.devices), cfg.queue_depth),
        };
        match ring {
            Ok(b) => return Ok(Box::new(b)),
            Err(e) => eprintln!(
                "writeboost: warning: io_uring is unavailable ({e}); falling back to the \
                 thread backend (pass --io-backend threads to silence this)"
            ),
        }
    }
    let reactor = shared
        .reactor
        .get()
        .cloned()
        .unwrap_or_else(thread::current);
    let b = ThreadBackend::new(Arc::clone(&cfg.devices), cfg.io_threads, reactor)
        .map_err(ReactorError::Threads)?;
    Ok(Box::new(b))
}

fn open_host(cfg: &ReactorConfig, shared: &Arc<Shared>) -> Result<Host, ReactorError> {
    let backend = make_backend(cfg, shared)?;
    let engine = Engine::open(cfg.params.clone(), AlignedAlloc, 0)?;
    let mut h = Host {
        engine,
        backend,
        shared: Arc::clone(shared),
        epoch: Instant::now(),
        reqs: HashMap::new(),
        cmds: HashMap::new(),
        next_req: 0,
        phase: Phase::Starting,
        open_result: None,
        pool: HashMap::new(),
        dones: Vec::new(),
    };
    h.drain();
    while h.open_result.is_none() {
        if !h.turn() {
            if h.backend.inflight() == 0 && h.open_result.is_none() {
                return Err(ReactorError::Stuck);
            }
            h.backend.wait(Some(Duration::from_millis(1)));
        }
    }
    match h.open_result.take() {
        Some(Err(e)) => Err(e.into()),
        _ => Ok(h),
    }
}

/// Runs the reactor on the current thread: opens the engine, reports the
/// outcome through `ready`, serves until a stop is requested, then shuts the
/// engine down cleanly (every log durable, superblock record written).
pub fn run(
    cfg: ReactorConfig,
    shared: Arc<Shared>,
    ready: impl FnOnce(Result<ReadyInfo, ReactorError>),
) {
    let _ = shared.reactor.set(thread::current());
    let mut h = match open_host(&cfg, &shared) {
        Ok(h) => h,
        Err(e) => return ready(Err(e)),
    };
    ready(Ok(ReadyInfo {
        backend: h.backend.name(),
    }));
    h.phase = Phase::Running;
    h.run_until(cfg.spin, cfg.idle_sleep, |h| {
        h.phase == Phase::Done && h.backend.inflight() == 0
    });
    let st = h.engine.stats();
    eprintln!(
        "writeboost: clean shutdown ({} user writes, {} user reads, {} logs written, {} dirty blocks stay in the cache)",
        st.user_write_cmds,
        st.user_read_cmds,
        st.nr_logs,
        h.engine.status().nr_dirty_blocks
    );
}
