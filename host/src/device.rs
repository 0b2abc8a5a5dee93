//! One writeboost device on its reactor, as a poller: the engine's
//! [`Driver`] over the I/O backend, user requests in, replies out, and the
//! device's lifecycle (start-up, running, draining, shutdown).

use std::collections::HashMap;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use crossbeam_channel::Sender;
use serde_json::Value;
use thiserror::Error;
use writeboost_engine::config::BufferMode;
use writeboost_engine::driver::{
    CmdMem, Driver, Lifecycle, Outcome, Started, Target, UserBuf, UserOp,
};
use writeboost_engine::pmem::Pmem;
use writeboost_engine::{
    Command, CommandKind, DeviceError, Engine, IoError, Nanos, OpenError, OpenParams, ReqId,
    SubmitError,
};
use writeboost_rpc::{CreateRequest, RpcError, SetOptionsRequest, device_report};

use crate::alloc::{AlignedAlloc, AlignedBuf};
use crate::backends::threads::ThreadBackend;
use crate::backends::uring::UringBackend;
use crate::backends::{Backend, Devices, Done, Op, OpKind};
use crate::nbd::proto;
use crate::reactor::{IoBackendKind, ReactorOpts};
use crate::request::{ConnMsg, ReqKind, Request, Shared};

/// Everything a reactor needs to open a writeboost device.
pub struct DeviceSpec {
    pub req: CreateRequest,
    pub params: OpenParams,
    pub devices: Arc<Devices>,
    pub shared: Arc<Shared>,
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
    #[error("{0}")]
    Pool(#[from] writeboost_pmem::PoolError),
}

/// Reported once the engine is ready.
pub struct ReadyInfo {
    pub backend: &'static str,
    /// Whether the pmem pool is real persistent memory (DAX), with a pool.
    pub pmem_is_dax: Option<bool>,
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

impl UserBuf for UserReq {
    fn bytes(&self) -> &[u8] {
        &self.buf
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

/// One writeboost device on its reactor: a poller.
pub struct Dev {
    pub req: CreateRequest,
    pmem_is_dax: Option<bool>,
    ready_tx: Option<Sender<Result<ReadyInfo, ReactorError>>>,
    driver: Driver<AlignedAlloc, UserReq>,
    target: HostTarget,
    shared: Arc<Shared>,
    epoch: Instant,
    next_req: u64,
    open_result: Option<Result<(), OpenError>>,
    dones: Vec<Done>,
}

/// The device's base bdevs as the driver's [`Target`]: commands go to the
/// I/O backend with aligned buffers of their own, reused from a pool.
struct HostTarget {
    backend: Box<dyn Backend>,
    /// Device commands in flight, by token.
    cmds: HashMap<u64, Command>,
    pool: HashMap<usize, Vec<AlignedBuf>>,
}

const POOL_PER_SIZE: usize = 64;
/// Requests taken from the queue per loop turn (bounds latency of completions).
const BATCH: usize = 256;

impl HostTarget {
    fn get_buf(&mut self, len: usize) -> AlignedBuf {
        self.pool
            .get_mut(&len)
            .and_then(|v| v.pop())
            .unwrap_or_else(|| AlignedBuf::zeroed(len))
    }

    fn put_buf(&mut self, b: AlignedBuf) {
        if b.is_empty() {
            return;
        }
        let v = self.pool.entry(b.len()).or_default();
        if v.len() < POOL_PER_SIZE {
            v.push(b);
        }
    }
}

impl Target for HostTarget {
    fn start(&mut self, cmd: Command, mem: CmdMem<'_>) -> Started {
        let (kind, buf) = match (cmd.kind, mem) {
            (CommandKind::Read { offset, len, .. }, _) => {
                (OpKind::Read { offset }, self.get_buf(len))
            }
            (CommandKind::Write { offset, len, .. }, CmdMem::Src(src)) => {
                let mut b = self.get_buf(len);
                b.as_mut().copy_from_slice(src);
                (OpKind::Write { offset }, b)
            }
            (CommandKind::Write { .. }, _) => return Started::Done(Err(DeviceError::Invalid)),
            (CommandKind::WriteZeroes { offset, len }, _) => {
                (OpKind::WriteZeroes { offset, len }, AlignedBuf::zeroed(0))
            }
            (CommandKind::Discard { offset, len }, _) => {
                (OpKind::Discard { offset, len }, AlignedBuf::zeroed(0))
            }
            (CommandKind::Flush, _) => (OpKind::Flush, AlignedBuf::zeroed(0)),
        };
        self.cmds.insert(cmd.token.0, cmd);
        self.backend.submit(Op {
            tag: cmd.token.0,
            dev: cmd.device,
            kind,
            buf,
        });
        Started::InFlight
    }
}

/// What the reactor's poll loop asks of a device.
impl Dev {
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Requests wait in the device's queue.
    pub(crate) fn has_queued(&self) -> bool {
        !self.shared.queue.is_empty()
    }

    /// How long until the engine's next deadline.
    pub(crate) fn next_deadline(&self) -> Option<std::time::Duration> {
        let t = self.driver.engine().poll_timeout()?;
        Some(std::time::Duration::from_nanos(
            t.saturating_sub(self.now()),
        ))
    }

    /// Device I/O is in flight, or the device is between states: the
    /// reactor must come back soon even without a wake-up.
    pub(crate) fn busy(&self) -> bool {
        self.target.backend.inflight() > 0 || self.driver.lifecycle() != Lifecycle::Online
    }

    /// Waits in the I/O backend for a completion, up to `max`.
    pub(crate) fn wait_for_io(&mut self, max: Option<std::time::Duration>) {
        self.target.backend.wait(max);
    }

    /// After a clean shutdown: what the device did.
    pub(crate) fn shutdown_summary(&self) -> Option<String> {
        if self.driver.lifecycle() != Lifecycle::Closed {
            return None;
        }
        let st = self.driver.engine().stats();
        Some(format!(
            "clean shutdown ({} user writes, {} user reads, {} logs written, {} dirty blocks \
             stay in the cache)",
            st.user_write_cmds,
            st.user_read_cmds,
            st.nr_logs,
            self.driver.engine().status().nr_dirty_blocks
        ))
    }
}

impl Dev {
    pub fn now(&self) -> Nanos {
        self.epoch.elapsed().as_nanos() as Nanos
    }

    /// Starts every command the engine has and acts on every outcome.
    fn drain(&mut self) {
        loop {
            let now = self.now();
            self.driver.pump(&mut self.target, now);
            let mut any = false;
            while let Some(o) = self.driver.poll_outcome() {
                any = true;
                self.outcome(o);
            }
            if !any {
                break;
            }
        }
    }

    fn complete_io(&mut self, d: Done) {
        let Some(cmd) = self.target.cmds.remove(&d.tag) else {
            return;
        };
        if let Err(e) = &d.result {
            eprintln!(
                "writeboost: {:?} device I/O failed ({:?}): {e}",
                cmd.device, cmd.kind
            );
        }
        if d.result.is_ok()
            && let Some(dst) = self.driver.read_dst(&cmd)
        {
            dst.copy_from_slice(&d.buf.as_ref()[..dst.len()]);
        }
        let result = d.result.map_err(|e| device_error(&e));
        self.target.put_buf(d.buf);
        let now = self.now();
        self.driver.complete(cmd.token, result, now);
        self.drain();
    }

    fn outcome(&mut self, o: Outcome<UserReq>) {
        match o {
            Outcome::Ready => self.open_result = Some(Ok(())),
            Outcome::OpenFailed(e) => self.open_result = Some(Err(e)),
            Outcome::Completed {
                user: mut r,
                result,
                ..
            } => {
                if result.is_ok() && r.then_flush {
                    r.then_flush = false;
                    let id = self.new_id();
                    let now = self.now();
                    if let Err((e, r)) = self.driver.submit(id, UserOp::Flush, r, now) {
                        reply(&r, submit_errno(&e), Vec::new());
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
            // The driver's lifecycle says it.
            Outcome::ShutdownComplete => {}
        }
    }

    fn new_id(&mut self) -> ReqId {
        self.next_req += 1;
        ReqId(self.next_req)
    }

    fn accept(&mut self, r: Request) {
        if self.driver.lifecycle() != Lifecycle::Online {
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
        let (offset, len) = (r.offset, r.len);
        let op = match r.kind {
            ReqKind::Read => {
                u.buf = vec![0u8; len as usize];
                UserOp::Read { offset, len }
            }
            ReqKind::Write => {
                u.buf = r.data;
                UserOp::Write { offset, fua: r.fua }
            }
            ReqKind::Flush => UserOp::Flush,
            ReqKind::Trim => {
                u.then_flush = r.fua;
                UserOp::Discard { offset, len }
            }
            ReqKind::WriteZeroes => {
                u.then_flush = r.fua;
                UserOp::WriteZeroes { offset, len }
            }
        };
        let res = self.driver.submit(id, op, u, now);
        if let Err((e, u)) = res {
            reply(&u, submit_errno(&e), Vec::new());
        }
        self.drain();
    }

    /// One turn: requests, completions, deadlines, start-up and shutdown.
    /// True if anything happened.
    pub(crate) fn turn(&mut self) -> bool {
        // Until the outcome of start-up is reported.
        if self.ready_tx.is_some() {
            return self.turn_starting();
        }
        let mut progress = false;
        for _ in 0..BATCH {
            let Some(r) = self.shared.queue.pop() else {
                break;
            };
            progress = true;
            self.accept(r);
        }
        let mut dones = std::mem::take(&mut self.dones);
        self.target.backend.poll(&mut dones);
        if !dones.is_empty() {
            progress = true;
        }
        for d in dones.drain(..) {
            self.complete_io(d);
        }
        self.dones = dones;
        let now = self.now();
        if self
            .driver
            .engine()
            .poll_timeout()
            .is_some_and(|t| t <= now)
        {
            self.driver.handle_timeout(now);
            self.drain();
            progress = true;
        }
        if self.driver.lifecycle() == Lifecycle::Online && self.shared.stopping() {
            self.driver.begin_drain();
            progress = true;
        }
        if self.driver.lifecycle() == Lifecycle::Draining && self.driver.requests_in_flight() == 0 {
            let now = self.now();
            self.driver.close(now);
            self.drain();
            progress = true;
        }
        progress
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

/// What the engine is told of a failed device I/O: a refusal (EINVAL,
/// EOPNOTSUPP, EBADF) is not worth retrying, anything else may be.
fn device_error(e: &std::io::Error) -> DeviceError {
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::EBADF) => DeviceError::Invalid,
        _ => DeviceError::Io,
    }
}

fn submit_errno(e: &SubmitError) -> u32 {
    match e {
        SubmitError::BadRange { .. }
        | SubmitError::DuplicateRequest(_)
        | SubmitError::NotGranted { .. } => proto::EINVAL,
        SubmitError::NotReady | SubmitError::ShuttingDown => proto::ESHUTDOWN,
    }
}

fn io_errno(e: IoError) -> u32 {
    match e {
        IoError::ReadOnly => proto::EPERM,
        IoError::CacheDevice
        | IoError::BackingDevice
        | IoError::BackingWritesLost
        | IoError::Corrupt => proto::EIO,
    }
}

fn make_backend(
    opts: &ReactorOpts,
    devices: &Arc<Devices>,
) -> Result<Box<dyn Backend>, ReactorError> {
    if opts.backend == IoBackendKind::Uring {
        // WRITEBOOST_NO_URING simulates a kernel or sandbox without io_uring.
        let ring = match std::env::var_os("WRITEBOOST_NO_URING") {
            Some(_) => Err(std::io::Error::other("disabled by WRITEBOOST_NO_URING")),
            None => UringBackend::new(Arc::clone(devices), opts.queue_depth),
        };
        match ring {
            Ok(b) => return Ok(Box::new(b)),
            Err(e) => eprintln!(
                "writeboost: warning: io_uring is unavailable ({e}); falling back to the \
                 thread backend (pass --io-backend threads to silence this)"
            ),
        }
    }
    let b = ThreadBackend::new(Arc::clone(devices), opts.io_threads, thread::current())
        .map_err(ReactorError::Threads)?;
    Ok(Box::new(b))
}

impl Dev {
    /// Starts opening a device on this (its reactor's) thread; the outcome
    /// is sent on `ready` once the engine has recovered or formatted the cache.
    pub(crate) fn open(
        spec: DeviceSpec,
        opts: &ReactorOpts,
        ready: Sender<Result<ReadyInfo, ReactorError>>,
    ) -> Result<Dev, (ReactorError, Sender<Result<ReadyInfo, ReactorError>>)> {
        let _ = spec.shared.reactor.set(thread::current());
        let backend = match make_backend(opts, &spec.devices) {
            Ok(b) => b,
            Err(e) => return Err((e, ready)),
        };
        let (engine, pmem_is_dax) = match &spec.req.pmem_path {
            Some(path) => {
                let pool = match writeboost_pmem::PmdkPool::open(std::path::Path::new(path)) {
                    Ok(p) => p,
                    Err(e) => return Err((e.into(), ready)),
                };
                let dax = pool.is_dax();
                if !dax && spec.req.mode == BufferMode::Persistent {
                    eprintln!(
                        "writeboost: {}: warning: pmem pool {path} is not DAX persistent memory: \
                         persistence falls back to msync and mode 1 loses its speed (data stays safe)",
                        spec.req.name
                    );
                }
                let pool: Box<dyn Pmem> = Box::new(pool);
                match Engine::open_with_pool(spec.params, AlignedAlloc, pool, 0) {
                    Ok(e) => (e, Some(dax)),
                    Err(e) => return Err((e.into(), ready)),
                }
            }
            None => match Engine::open(spec.params, AlignedAlloc, 0) {
                Ok(e) => (e, None),
                Err(e) => return Err((e.into(), ready)),
            },
        };
        let mut d = Dev {
            req: spec.req,
            pmem_is_dax,
            ready_tx: Some(ready),
            driver: Driver::new(engine),
            target: HostTarget {
                backend,
                cmds: HashMap::new(),
                pool: HashMap::new(),
            },
            shared: spec.shared,
            epoch: Instant::now(),
            next_req: 0,
            open_result: None,
            dones: Vec::new(),
        };
        d.drain();
        Ok(d)
    }

    /// A start-up turn: completions until the engine is ready or has failed.
    fn turn_starting(&mut self) -> bool {
        let mut dones = std::mem::take(&mut self.dones);
        self.target.backend.poll(&mut dones);
        let progress = !dones.is_empty();
        for d in dones.drain(..) {
            self.complete_io(d);
        }
        self.dones = dones;
        let outcome = match self.open_result.take() {
            Some(Ok(())) => Ok(ReadyInfo {
                backend: self.target.backend.name(),
                pmem_is_dax: self.pmem_is_dax,
            }),
            Some(Err(e)) => Err(ReactorError::Open(e)),
            None if !progress && self.target.backend.inflight() == 0 => Err(ReactorError::Stuck),
            None => return progress,
        };
        let ok = outcome.is_ok();
        if let Some(tx) = self.ready_tx.take() {
            let _ = tx.send(outcome);
        }
        if !ok {
            self.driver.abandon();
        }
        true
    }

    /// Finished: closed cleanly, or failed to open (with nothing in flight).
    pub(crate) fn finished(&self) -> bool {
        self.driver.lifecycle().is_over() && self.target.backend.inflight() == 0
    }

    /// `bdev_writeboost_get_stats` / `bdev_get_bdevs` report.
    pub fn report(&self) -> Value {
        device_report(&self.req, self.driver.engine(), self.pmem_is_dax)
    }

    /// The UUID the cache was formatted with (the writeboost bdev's UUID).
    pub fn cache_uuid(&self) -> [u8; 16] {
        self.driver.engine().status().cache_uuid
    }

    pub fn online(&self) -> bool {
        self.driver.lifecycle() == Lifecycle::Online
    }

    pub fn set_options(&mut self, req: &SetOptionsRequest) -> Result<(), RpcError> {
        let tunables = req.apply_to(self.driver.engine().tunables())?;
        let now = self.now();
        self.driver
            .engine_mut()
            .set_options(tunables, now)
            .map_err(|e| RpcError::invalid_params(format!("bdev_writeboost_set_options: {e}")))?;
        self.drain();
        Ok(())
    }

    pub fn drop_caches(&mut self) {
        let now = self.now();
        self.driver.engine_mut().drop_caches(now);
        self.drain();
    }

    pub fn clear_stats(&mut self) {
        self.driver.engine_mut().clear_stats();
    }

    /// Blocks quarantined as damaged.
    pub fn quarantined(&self) -> Vec<u64> {
        self.driver.engine().quarantined_blocks()
    }

    /// Ends `block`'s quarantine; false if it was not quarantined.
    pub fn drop_quarantine(&mut self, block: u64) -> bool {
        let now = self.now();
        let dropped = self.driver.engine_mut().drop_quarantine(block, now);
        self.drain();
        dropped
    }

    /// The create parameters that recreate the device as it is now.
    pub fn config_params(&self) -> Value {
        self.req.config_params(self.driver.engine().tunables())
    }
}
