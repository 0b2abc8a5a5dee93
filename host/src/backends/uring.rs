//! io_uring backend: reads, writes, fdatasync and fallocate go through one
//! ring owned by the reactor thread. Buffers live in [`AlignedBuf`]s held in
//! the slot table until their completion is reaped.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::{Backend, DevFile, Devices, Done, Op, OpKind, discard, write_zeroes_slow, zero_range};

/// Largest single read/write submitted (longer ones continue after a short count).
const MAX_CHUNK: usize = 1 << 30;

struct Slot {
    op: Op,
    /// Bytes of a read/write already transferred.
    done: usize,
}

pub struct UringBackend {
    ring: IoUring,
    devs: Arc<Devices>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    backlog: VecDeque<Op>,
    /// Operations finished without the ring (fallbacks), reported at the next poll.
    ready: Vec<Done>,
    depth: usize,
    in_ring: usize,
    ext_arg: bool,
    pending_submit: bool,
}

impl UringBackend {
    /// Sets up a ring of `depth` entries. Fails where io_uring is unavailable
    /// (old kernel, seccomp, `kernel.io_uring_disabled`).
    pub fn new(devs: Arc<Devices>, depth: u32) -> io::Result<Self> {
        let ring = IoUring::builder().build(depth)?;
        // Probe that the ring really works (some sandboxes allow setup but not enter).
        ring.submit()?;
        let ext_arg = ring.params().is_feature_ext_arg();
        Ok(Self {
            ring,
            devs,
            slots: Vec::new(),
            free: Vec::new(),
            backlog: VecDeque::new(),
            ready: Vec::new(),
            depth: depth as usize,
            in_ring: 0,
            ext_arg,
            pending_submit: false,
        })
    }

    fn file(&self, op: &Op) -> &DevFile {
        self.devs.get(op.dev)
    }

    /// Builds the SQE for slot `i`, or finishes the op synchronously if the
    /// ring cannot do it on this file.
    fn entry(&mut self, i: u32) -> Option<squeue::Entry> {
        let slot = self.slots[i as usize].as_mut().expect("live slot");
        let fd = types::Fd(self.devs.get(slot.op.dev).file.as_raw_fd());
        let e = match slot.op.kind {
            OpKind::Read { offset } => {
                let len = (slot.op.buf.len() - slot.done).min(MAX_CHUNK);
                // SAFETY: done < buf.len(), so the pointer stays inside the buffer.
                let ptr = unsafe { slot.op.buf.as_mut_ptr().add(slot.done) };
                opcode::Read::new(fd, ptr, len as u32)
                    .offset(offset + slot.done as u64)
                    .build()
            }
            OpKind::Write { offset } => {
                let len = (slot.op.buf.len() - slot.done).min(MAX_CHUNK);
                // SAFETY: done < buf.len(), so the pointer stays inside the buffer.
                let ptr = unsafe { slot.op.buf.as_ptr().add(slot.done) };
                opcode::Write::new(fd, ptr, len as u32)
                    .offset(offset + slot.done as u64)
                    .build()
            }
            OpKind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            OpKind::WriteZeroes { offset, len } => {
                if !self.devs.get(slot.op.dev).zero_range_ok() {
                    return None;
                }
                opcode::Fallocate::new(fd, len)
                    .offset(offset)
                    .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                    .build()
            }
            OpKind::Discard { offset, len } => {
                if !self.devs.get(slot.op.dev).punch_ok() {
                    return None;
                }
                opcode::Fallocate::new(fd, len)
                    .offset(offset)
                    .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                    .build()
            }
        };
        Some(e.user_data(i as u64))
    }

    fn push(&mut self, i: u32) {
        let Some(entry) = self.entry(i) else {
            let slot = self.take(i);
            self.finish_sync(slot.op);
            return;
        };
        loop {
            // SAFETY: the entry points into a buffer owned by slot `i`, which
            // stays in the slot table (its heap memory never moves) until this
            // entry's completion is reaped in `reap`.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                break;
            }
            // Submission queue full: hand what is queued to the kernel.
            if let Err(e) = self.ring.submit()
                && e.raw_os_error() != Some(libc::EBUSY)
                && e.kind() != io::ErrorKind::Interrupted
            {
                let slot = self.take(i);
                self.ready.push(Done {
                    tag: slot.op.tag,
                    result: Err(e),
                    buf: slot.op.buf,
                });
                return;
            }
        }
        self.pending_submit = true;
    }

    fn take(&mut self, i: u32) -> Slot {
        let s = self.slots[i as usize].take().expect("live slot");
        self.free.push(i);
        self.in_ring -= 1;
        s
    }

    /// Runs an op the ring cannot do here (fallocate modes the filesystem refuses).
    fn finish_sync(&mut self, mut op: Op) {
        let f = self.file(&op);
        let result = match op.kind {
            OpKind::WriteZeroes { offset, len } => zero_range(f, offset, len),
            OpKind::Discard { offset, len } => discard(f, offset, len),
            _ => super::run_sync(&self.devs, &mut op),
        };
        self.ready.push(Done {
            tag: op.tag,
            result,
            buf: op.buf,
        });
    }

    fn start(&mut self, op: Op) {
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        self.slots[i as usize] = Some(Slot { op, done: 0 });
        self.in_ring += 1;
        self.push(i);
    }

    fn reap(&mut self, out: &mut Vec<Done>) {
        let cqes: Vec<cqueue::Entry> = self.ring.completion().collect();
        for cqe in cqes {
            let i = cqe.user_data() as u32;
            let res = cqe.result();
            let slot = self.slots[i as usize]
                .as_mut()
                .expect("completion of live slot");
            if res < 0 {
                let errno = -res;
                if errno == libc::EINTR || errno == libc::EAGAIN {
                    self.push(i);
                    continue;
                }
                let slot = self.take(i);
                let unsupported = matches!(
                    errno,
                    libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS | libc::ENODEV
                );
                match slot.op.kind {
                    OpKind::WriteZeroes { offset, len } if unsupported => {
                        let f = self.file(&slot.op);
                        f.set_zero_range_ok(false);
                        let result = write_zeroes_slow(f, offset, len);
                        out.push(Done {
                            tag: slot.op.tag,
                            result,
                            buf: slot.op.buf,
                        });
                    }
                    OpKind::Discard { .. } if unsupported => {
                        self.file(&slot.op).set_punch_ok(false);
                        out.push(Done {
                            tag: slot.op.tag,
                            result: Ok(()),
                            buf: slot.op.buf,
                        });
                    }
                    _ => out.push(Done {
                        tag: slot.op.tag,
                        result: Err(io::Error::from_raw_os_error(errno)),
                        buf: slot.op.buf,
                    }),
                }
                continue;
            }
            if let OpKind::Read { .. } | OpKind::Write { .. } = slot.op.kind {
                if res == 0 {
                    let slot = self.take(i);
                    out.push(Done {
                        tag: slot.op.tag,
                        result: Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "device returned a short transfer",
                        )),
                        buf: slot.op.buf,
                    });
                    continue;
                }
                slot.done += res as usize;
                if slot.done < slot.op.buf.len() {
                    self.push(i);
                    continue;
                }
            }
            let slot = self.take(i);
            out.push(Done {
                tag: slot.op.tag,
                result: Ok(()),
                buf: slot.op.buf,
            });
        }
    }

    fn submit_pending(&mut self) {
        if self.pending_submit {
            // On failure (completion queue busy, interrupted) retry at the next poll.
            if self.ring.submit().is_ok() {
                self.pending_submit = false;
            }
        }
    }
}

impl Backend for UringBackend {
    fn submit(&mut self, op: Op) {
        if self.in_ring < self.depth {
            self.start(op);
        } else {
            self.backlog.push_back(op);
        }
    }

    fn poll(&mut self, out: &mut Vec<Done>) {
        out.append(&mut self.ready);
        self.submit_pending();
        self.reap(out);
        while self.in_ring < self.depth
            && let Some(op) = self.backlog.pop_front()
        {
            self.start(op);
        }
        out.append(&mut self.ready);
        self.submit_pending();
    }

    fn inflight(&self) -> usize {
        self.in_ring + self.backlog.len() + self.ready.len()
    }

    fn wait(&mut self, max: Option<Duration>) {
        if !self.ready.is_empty() || !self.ring.completion().is_empty() {
            return;
        }
        if self.in_ring == 0 || !self.ext_arg {
            match max {
                Some(d) => std::thread::park_timeout(d),
                None => std::thread::park(),
            }
            return;
        }
        let d = max.unwrap_or(Duration::from_millis(1));
        let ts = types::Timespec::new()
            .sec(d.as_secs())
            .nsec(d.subsec_nanos());
        let args = types::SubmitArgs::new().timespec(&ts);
        // ETIME (timeout) and EINTR are expected; real errors surface at the next submit.
        if self.ring.submitter().submit_with_args(1, &args).is_ok() {
            self.pending_submit = false;
        }
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}
