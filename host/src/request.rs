//! Requests from the front ends (NBD connections) to a writeboost device,
//! and the state a device shares with them: its lock-free request queue,
//! the reactor thread to wake, and its stop and closed flags.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::Thread;

use crossbeam_channel::{Receiver, Sender};
use crossbeam_queue::SegQueue;

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

/// One writeboost device's state shared between its reactor and everybody else.
pub struct Shared {
    pub queue: SegQueue<Request>,
    pub reactor: OnceLock<Thread>,
    /// Graceful shutdown requested: new requests are refused, requests in
    /// flight finish, then the engine shuts down cleanly.
    pub stop: AtomicBool,
    /// The engine is gone; whatever is queued now is refused.
    pub(crate) closed: AtomicBool,
    /// Told when the device has closed (cleanly or not).
    done_tx: Sender<()>,
    done_rx: Receiver<()>,
}

impl Default for Shared {
    fn default() -> Self {
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        Self {
            queue: SegQueue::new(),
            reactor: OnceLock::new(),
            stop: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            done_tx,
            done_rx,
        }
    }
}

impl Shared {
    pub fn submit(&self, r: Request) {
        self.queue.push(r);
        self.wake();
        if self.closed.load(Ordering::Acquire) {
            self.refuse_queued();
        }
    }

    fn refuse_queued(&self) {
        while let Some(r) = self.queue.pop() {
            let _ = r.reply.send(ConnMsg::Reply {
                handle: r.handle,
                error: proto::ESHUTDOWN,
                data: Vec::new(),
                cost: r.cost,
            });
        }
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.refuse_queued();
        let _ = self.done_tx.try_send(());
    }

    /// Asks for a graceful shutdown and waits until the device has closed.
    pub fn shut_down(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake();
        if !self.closed.load(Ordering::Acquire) {
            let _ = self.done_rx.recv();
            // Let other waiters through too.
            let _ = self.done_tx.try_send(());
        }
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
