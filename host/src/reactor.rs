//! Reactors: one thread per core of the core list, each running pollers.
//! Every writeboost device's engine is owned by one reactor (assigned round
//! robin) and driven there as a poller: one turn takes new user requests,
//! reaps device completions and runs the engine's deadlines, which is where
//! its stages (buffer, log commit, writeback) advance. NBD connection threads
//! hand requests to a device over a lock-free queue; the RPC server hands a
//! reactor work (open, statistics, options) over another.
//!
//! When a turn of every poller finds nothing to do the reactor spins for
//! `spin` (lowest latency), then sleeps with growing sleeps capped at
//! `idle_sleep` while device I/O is in flight (with a single device on the
//! reactor, io_uring waits in the kernel for a completion, so completions end
//! the sleep at once), and parks until woken or the next engine deadline when
//! nothing at all is in flight, so an idle host uses no CPU.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use crossbeam_queue::SegQueue;

use crate::device::{Dev, DeviceSpec, ReactorError, ReadyInfo};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IoBackendKind {
    /// io_uring, falling back to threads (with a warning) where unavailable.
    Uring,
    /// A pool of threads doing pread/pwrite/fdatasync.
    Threads,
}

/// How every reactor runs its devices.
#[derive(Clone, Debug)]
pub struct ReactorOpts {
    pub backend: IoBackendKind,
    pub queue_depth: u32,
    pub io_threads: usize,
    pub spin: Duration,
    pub idle_sleep: Duration,
}

/// Work sent to a reactor thread.
pub type Work = Box<dyn FnOnce(&mut Reactor) + Send>;

/// A reactor thread: its pollers (devices) and its work queue.
pub struct Reactor {
    opts: ReactorOpts,
    devs: Vec<Dev>,
    work: Arc<SegQueue<Work>>,
    exit: Arc<AtomicBool>,
}

impl Reactor {
    /// The device named `name`, if this reactor owns it.
    pub fn dev(&mut self, name: &str) -> Option<&mut Dev> {
        self.devs.iter_mut().find(|d| d.req.name == name)
    }

    /// Opens a device here; `ready` gets the outcome later.
    pub fn open(&mut self, spec: DeviceSpec, ready: Sender<Result<ReadyInfo, ReactorError>>) {
        let shared = Arc::clone(&spec.shared);
        match Dev::open(spec, &self.opts, ready) {
            Ok(d) => self.devs.push(d),
            Err((e, ready)) => {
                shared.close();
                let _ = ready.send(Err(e));
            }
        }
    }

    fn run(&mut self) {
        let mut idle_since: Option<Instant> = None;
        let mut sleep = Duration::from_micros(1);
        loop {
            let mut progress = false;
            while let Some(w) = self.work.pop() {
                w(self);
                progress = true;
            }
            for d in &mut self.devs {
                progress |= d.turn();
            }
            let mut i = 0;
            while i < self.devs.len() {
                if !self.devs[i].finished() {
                    i += 1;
                    continue;
                }
                let d = self.devs.remove(i);
                if let Some(summary) = d.shutdown_summary() {
                    eprintln!("writeboost: {}: {summary}", d.req.name);
                }
                // The engine, its pool mapping and its files go before anyone is told.
                let shared = Arc::clone(d.shared());
                drop(d);
                shared.close();
                progress = true;
            }
            if self.exit.load(Ordering::Acquire) && self.devs.is_empty() && self.work.is_empty() {
                return;
            }
            if progress {
                idle_since = None;
                sleep = Duration::from_micros(1);
                continue;
            }
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() < self.opts.spin {
                std::hint::spin_loop();
                continue;
            }
            if !self.work.is_empty() || self.devs.iter().any(|d| d.has_queued()) {
                continue;
            }
            let deadline = self.devs.iter().filter_map(|d| d.next_deadline()).min();
            let busy = self.devs.iter().any(|d| d.busy());
            let max = if busy {
                let d = deadline.map_or(sleep, |t| t.min(sleep));
                sleep = (sleep * 2).min(self.opts.idle_sleep);
                Some(d)
            } else {
                deadline
            };
            if let [d] = self.devs.as_mut_slice() {
                // io_uring waits in the kernel for a completion, up to `max`.
                d.wait_for_io(max);
            } else {
                match max {
                    Some(t) => thread::park_timeout(t),
                    None => thread::park(),
                }
            }
        }
    }
}

impl Drop for Reactor {
    /// Devices still here when the thread ends (only if it panicked) are
    /// reported closed, so nobody waits for them forever; their caches
    /// recover from their logs at the next start.
    fn drop(&mut self) {
        for d in self.devs.drain(..) {
            let shared = Arc::clone(d.shared());
            drop(d);
            shared.close();
        }
    }
}

/// A running reactor thread, as the rest of the host sees it.
pub struct ReactorHandle {
    pub core: Option<usize>,
    thread: Thread,
    work: Arc<SegQueue<Work>>,
    exit: Arc<AtomicBool>,
    join: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl ReactorHandle {
    /// Starts a reactor thread, pinned to `core` if given and allowed.
    pub fn spawn(index: usize, core: Option<usize>, opts: ReactorOpts) -> std::io::Result<Self> {
        let work: Arc<SegQueue<Work>> = Arc::new(SegQueue::new());
        let exit = Arc::new(AtomicBool::new(false));
        let (w, x) = (Arc::clone(&work), Arc::clone(&exit));
        let join = thread::Builder::new()
            .name(format!("wb-reactor-{index}"))
            .spawn(move || {
                if let Some(c) = core
                    && let Err(e) = pin_to_core(c)
                {
                    eprintln!(
                        "writeboost: warning: cannot pin reactor {index} to core {c} ({e}); it \
                         runs unpinned"
                    );
                }
                let mut r = Reactor {
                    opts,
                    devs: Vec::new(),
                    work: w,
                    exit: x,
                };
                r.run();
            })?;
        Ok(Self {
            core,
            thread: join.thread().clone(),
            work,
            exit,
            join: std::sync::Mutex::new(Some(join)),
        })
    }

    /// Runs `f` on the reactor thread.
    pub fn send(&self, f: impl FnOnce(&mut Reactor) + Send + 'static) {
        self.work.push(Box::new(f));
        self.thread.unpark();
    }

    /// Runs `f` on the reactor thread and waits for its answer.
    pub fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Reactor) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(move |r| {
            let _ = tx.send(f(r));
        });
        rx.recv().ok()
    }

    /// Lets the thread end once its devices are closed, and waits for it.
    pub fn stop(&self) {
        self.exit.store(true, Ordering::Release);
        self.thread.unpark();
        let join = self.join.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(j) = join
            && j.join().is_err()
        {
            eprintln!(
                "writeboost: a reactor thread panicked; its caches recover from their logs at the \
                 next start"
            );
        }
    }
}

/// Pins the calling thread to one CPU.
fn pin_to_core(core: usize) -> std::io::Result<()> {
    if core >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::other("core number out of range"));
    }
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write within it
    // (core < CPU_SETSIZE), and sched_setaffinity reads it for the call.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
