//! Thread-pool backend: worker threads run pread/pwrite/fdatasync/fallocate
//! and hand completions back to the reactor, waking it with `unpark`.

use std::sync::Arc;
use std::thread::{self, JoinHandle, Thread};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, unbounded};

use super::{Backend, Devices, Done, Op, run_sync};

pub struct ThreadBackend {
    to_workers: Option<Sender<Op>>,
    from_workers: Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
    inflight: usize,
}

impl ThreadBackend {
    /// Starts `nr_threads` workers; completions unpark `reactor`.
    pub fn new(devs: Arc<Devices>, nr_threads: usize, reactor: Thread) -> std::io::Result<Self> {
        let (to_workers, jobs) = unbounded::<Op>();
        let (done_tx, from_workers) = unbounded::<Done>();
        let mut workers = Vec::new();
        for i in 0..nr_threads.max(1) {
            let jobs = jobs.clone();
            let done_tx = done_tx.clone();
            let devs = Arc::clone(&devs);
            let reactor = reactor.clone();
            workers.push(
                thread::Builder::new()
                    .name(format!("wb-io-{i}"))
                    .spawn(move || {
                        while let Ok(mut op) = jobs.recv() {
                            let result = run_sync(&devs, &mut op);
                            let done = Done {
                                tag: op.tag,
                                result,
                                buf: op.buf,
                            };
                            if done_tx.send(done).is_err() {
                                return;
                            }
                            reactor.unpark();
                        }
                    })?,
            );
        }
        Ok(Self {
            to_workers: Some(to_workers),
            from_workers,
            workers,
            inflight: 0,
        })
    }
}

impl Backend for ThreadBackend {
    fn submit(&mut self, op: Op) {
        self.inflight += 1;
        if let Some(tx) = &self.to_workers {
            // Workers only stop when this sender is dropped, so send cannot fail.
            let _ = tx.send(op);
        }
    }

    fn poll(&mut self, out: &mut Vec<Done>) {
        while let Ok(d) = self.from_workers.try_recv() {
            self.inflight -= 1;
            out.push(d);
        }
    }

    fn inflight(&self) -> usize {
        self.inflight
    }

    fn wait(&mut self, max: Option<Duration>) {
        if !self.from_workers.is_empty() {
            return;
        }
        match max {
            Some(d) => thread::park_timeout(d),
            None => thread::park(),
        }
    }

    fn name(&self) -> &'static str {
        "threads"
    }
}

impl Drop for ThreadBackend {
    fn drop(&mut self) {
        self.to_workers = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
