//! NBD listeners and connections. Each connection has a reader thread (the
//! handshake, then request parsing) and a writer thread (replies, in
//! completion order). Requests are pipelined: up to [`MAX_INFLIGHT`] requests
//! or [`MAX_INFLIGHT_BYTES`] of payload per connection are in flight.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, unbounded};

use super::proto::{self, Check, Cmd, Export, Negotiated, RequestHeader};
use crate::request::{ConnMsg, ReqKind, Request, Shared};

pub const MAX_INFLIGHT: usize = 256;
pub const MAX_INFLIGHT_BYTES: u64 = 128 << 20;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ServerCtx {
    pub shared: Arc<Shared>,
    pub export: Export,
    pub verbose: bool,
    /// Set by `stop_accepting`: the listeners end at their next wake-up.
    stopped: AtomicBool,
}

impl ServerCtx {
    pub fn new(shared: Arc<Shared>, export: Export, verbose: bool) -> Self {
        Self {
            shared,
            export,
            verbose,
            stopped: AtomicBool::new(false),
        }
    }

    /// Makes the listeners stop accepting clients; each ends once woken (by
    /// a connection, which is then dropped).
    pub fn stop_accepting(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    fn accepting(&self) -> bool {
        !self.stopped.load(Ordering::Acquire)
    }
}

/// A byte stream a client is connected through.
pub trait Conn: Read + Write + Send + Sized + 'static {
    fn try_clone_conn(&self) -> io::Result<Self>;
    fn shutdown_conn(&self);
    fn set_read_timeout_conn(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Conn for TcpStream {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_conn(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
    fn set_read_timeout_conn(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
}

impl Conn for UnixStream {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_conn(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
    fn set_read_timeout_conn(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
}

/// Accepts TCP clients until the process exits or the server is stopped.
pub fn spawn_tcp(listener: TcpListener, ctx: Arc<ServerCtx>) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("wb-nbd-tcp".into())
        .spawn(move || {
            for s in listener.incoming() {
                if !ctx.accepting() {
                    return;
                }
                match s {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                        spawn_conn(s, peer, Arc::clone(&ctx));
                    }
                    Err(e) => accept_error(e),
                }
            }
        })
}

/// Accepts unix-socket clients until the process exits or the server is stopped.
pub fn spawn_unix(listener: UnixListener, ctx: Arc<ServerCtx>) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("wb-nbd-unix".into())
        .spawn(move || {
            for s in listener.incoming() {
                if !ctx.accepting() {
                    return;
                }
                match s {
                    Ok(s) => spawn_conn(s, "unix".into(), Arc::clone(&ctx)),
                    Err(e) => accept_error(e),
                }
            }
        })
}

fn accept_error(e: io::Error) {
    eprintln!("writeboost: accept failed: {e}");
    // Out of file descriptors and similar: do not spin.
    thread::sleep(Duration::from_millis(100));
}

fn spawn_conn<C: Conn>(c: C, peer: String, ctx: Arc<ServerCtx>) {
    if ctx.shared.stopping() {
        c.shutdown_conn();
        return;
    }
    let r = thread::Builder::new()
        .name("wb-nbd-conn".into())
        .spawn(move || {
            if ctx.verbose {
                eprintln!("writeboost: connection from {peer}");
            }
            if let Err(e) = serve(c, &ctx) {
                if ctx.verbose || !matches!(e, ServeError::Io(_)) {
                    eprintln!("writeboost: connection from {peer} closed: {e}");
                }
            } else if ctx.verbose {
                eprintln!("writeboost: connection from {peer} closed");
            }
        });
    if let Err(e) = r {
        eprintln!("writeboost: cannot start a connection thread: {e}");
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Handshake(#[from] proto::HandshakeError),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("bad request magic; the client is not speaking NBD transmission")]
    BadMagic,
    #[error("write of {0} bytes exceeds the {max} byte limit", max = proto::MAX_PAYLOAD)]
    TooLarge(u32),
}

/// Reader and writer halves as one `Read + Write` for the handshake.
struct Duplex<'a, C: Conn> {
    r: &'a mut BufReader<C>,
    w: &'a mut C,
}

impl<C: Conn> Read for Duplex<'_, C> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.r.read(b)
    }
}

impl<C: Conn> Write for Duplex<'_, C> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.w.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

/// Requests and payload bytes a connection has in flight.
#[derive(Default)]
struct Budget {
    used: Mutex<(usize, u64)>,
    cv: Condvar,
}

impl Budget {
    fn acquire(&self, cost: u64) {
        let mut g = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while g.0 >= MAX_INFLIGHT || (g.1 > 0 && g.1 + cost > MAX_INFLIGHT_BYTES) {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.0 += 1;
        g.1 += cost;
    }

    /// Returns true when nothing is in flight any more.
    fn release(&self, cost: u64) -> bool {
        let mut g = self.used.lock().unwrap_or_else(|e| e.into_inner());
        g.0 -= 1;
        g.1 -= cost;
        self.cv.notify_all();
        g.0 == 0
    }

    fn idle(&self) -> bool {
        self.used.lock().unwrap_or_else(|e| e.into_inner()).0 == 0
    }
}

/// Payload bytes a request holds in memory while in flight.
pub fn cost(kind: ReqKind, len: u64) -> u64 {
    match kind {
        ReqKind::Read | ReqKind::Write => len,
        _ => 0,
    }
}

fn serve<C: Conn>(mut c: C, ctx: &ServerCtx) -> Result<(), ServeError> {
    c.set_read_timeout_conn(Some(HANDSHAKE_TIMEOUT))?;
    let mut r = BufReader::with_capacity(256 << 10, c.try_clone_conn()?);
    let outcome = proto::negotiate(
        &mut Duplex {
            r: &mut r,
            w: &mut c,
        },
        &ctx.export,
    );
    match outcome {
        Ok(Negotiated::Transmission) => {}
        Ok(Negotiated::Aborted) => {
            c.shutdown_conn();
            return Ok(());
        }
        Err(e) => {
            c.shutdown_conn();
            return Err(e.into());
        }
    }
    c.set_read_timeout_conn(None)?;

    let budget = Arc::new(Budget::default());
    let (tx, rx) = unbounded::<ConnMsg>();
    let wconn = c.try_clone_conn()?;
    let wbudget = Arc::clone(&budget);
    let writer = thread::Builder::new()
        .name("wb-nbd-reply".into())
        .spawn(move || write_replies(wconn, rx, &wbudget))?;
    let result = read_requests(&mut r, ctx, &tx, &budget);
    // Replies to requests still in flight are written before the socket closes.
    let _ = tx.send(ConnMsg::Close);
    let _ = writer.join();
    c.shutdown_conn();
    result
}

fn read_requests<R: Read>(
    r: &mut R,
    ctx: &ServerCtx,
    tx: &Sender<ConnMsg>,
    budget: &Budget,
) -> Result<(), ServeError> {
    let immediate = |handle: u64, error: u32| {
        budget.acquire(0);
        let _ = tx.send(ConnMsg::Reply {
            handle,
            error,
            data: Vec::new(),
            cost: 0,
        });
    };
    loop {
        let mut hb = [0u8; proto::REQUEST_LEN];
        match r.read_exact(&mut hb) {
            Ok(()) => {}
            // A client that just closes without NBD_CMD_DISC.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let h: RequestHeader = proto::parse_request(&hb).ok_or(ServeError::BadMagic)?;
        let (cmd, fua) = match proto::check_request(&h, &ctx.export) {
            Check::Close => return Err(ServeError::TooLarge(h.len)),
            Check::Error(e) => {
                if h.cmd == proto::CMD_WRITE {
                    // Keep the stream in sync: skip the payload (bounded by MAX_PAYLOAD).
                    io::copy(&mut r.by_ref().take(h.len as u64), &mut io::sink())?;
                }
                immediate(h.handle, e);
                continue;
            }
            Check::Ok { cmd, fua } => (cmd, fua),
        };
        let kind = match cmd {
            Cmd::Disc => return Ok(()),
            Cmd::Read => ReqKind::Read,
            Cmd::Write => ReqKind::Write,
            Cmd::Flush => ReqKind::Flush,
            Cmd::Trim => ReqKind::Trim,
            Cmd::WriteZeroes => ReqKind::WriteZeroes,
        };
        let len = h.len as u64;
        let c = cost(kind, len);
        budget.acquire(c);
        let mut data = Vec::new();
        if kind == ReqKind::Write {
            data = vec![0u8; h.len as usize];
            if let Err(e) = r.read_exact(&mut data) {
                budget.release(c);
                return Err(e.into());
            }
        }
        if len == 0 && kind != ReqKind::Flush {
            // Zero-length requests do nothing.
            budget.release(c);
            immediate(h.handle, 0);
            continue;
        }
        if ctx.shared.stopping() {
            budget.release(c);
            immediate(h.handle, proto::ESHUTDOWN);
            continue;
        }
        ctx.shared.submit(Request {
            kind,
            offset: h.offset,
            len,
            data,
            fua,
            handle: h.handle,
            reply: tx.clone(),
            cost: c,
        });
    }
}

fn write_replies<C: Conn>(c: C, rx: Receiver<ConnMsg>, budget: &Budget) {
    let mut w = BufWriter::with_capacity(256 << 10, c);
    let mut broken = false;
    let mut closing = false;
    while let Ok(msg) = rx.recv() {
        match msg {
            ConnMsg::Reply {
                handle,
                error,
                data,
                cost,
            } => {
                if !broken {
                    let ok = w
                        .write_all(&proto::simple_reply(error, handle))
                        .and_then(|()| w.write_all(&data))
                        .and_then(|()| if rx.is_empty() { w.flush() } else { Ok(()) });
                    if ok.is_err() {
                        // The client is gone: drop the remaining replies.
                        broken = true;
                        w.get_ref().shutdown_conn();
                    }
                }
                drop(data);
                let idle = budget.release(cost);
                if closing && idle {
                    break;
                }
            }
            ConnMsg::Close => {
                closing = true;
                if budget.idle() {
                    break;
                }
            }
        }
    }
    if !broken {
        let _ = w.flush();
    }
}
