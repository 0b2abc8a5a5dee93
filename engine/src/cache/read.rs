//! User reads: from RAM buffers, the cache device and the backing device,
//! merged per sector; and read caching of missed blocks.

use super::{Engine, Entry, Phase, Purpose, Slot, for_each_run};
use crate::error::{IoError, SubmitError};
use crate::geometry::{BLOCK_SIZE, FULL_MASK, SECTOR_SIZE};
use crate::ids::LogId;
use crate::io::{BufAlloc, BufId, Command, CommandKind, DataRef, Device, Event, Nanos, ReqId};

/// A missed read whose blocks are staged into the cache on completion.
#[derive(Debug)]
pub(super) struct Stage {
    req: ReqId,
    first_block: u64,
    nblocks: u64,
    buf: BufId,
    user_offset: usize,
    /// `bypass_seq` when issued: a backing write since then may make the data stale.
    seq: u64,
}

/// Device reads being merged while a request is split.
struct Run {
    device: Device,
    dev_offset: u64,
    user_offset: usize,
    len: usize,
    /// Log whose position a cache read holds.
    hold: Option<LogId>,
}

impl<A: BufAlloc> Engine<A> {
    /// Reads `len` bytes at byte `offset` into the request's buffer (through
    /// commands with [`DataRef::User`] and [`Event::CopyToUser`]).
    pub fn submit_read(
        &mut self,
        req: ReqId,
        offset: u64,
        len: u64,
        now: Nanos,
    ) -> Result<(), SubmitError> {
        self.enter(now);
        self.op = crate::stats::Op::Read;
        self.check_submit(req, offset, len)?;
        self.stats.user_read_cmds += 1;
        self.stats.user_read_bytes += len;
        self.read_common(req, offset, len);
        self.pump();
        Ok(())
    }

    /// Sectors of an entry still waiting for a fill read (not readable yet).
    pub(super) fn pending_fill(&self, e: &Entry) -> u8 {
        self.open
            .iter()
            .chain(&self.sealing)
            .find(|o| o.id == e.id)
            .and_then(|o| o.slots.get(e.slot as usize))
            .map_or(0, |s| s.fill)
    }

    fn read_common(&mut self, req: ReqId, offset: u64, len: u64) {
        let (first, last) = (offset / BLOCK_SIZE, (offset + len - 1) / BLOCK_SIZE);
        let mut blocked = false;
        let mut error = None;
        for b in first..=last {
            // (Quarantined whether or not its damaged copy is still indexed.)
            if let Some(e) = self.scrub.quarantine_error(b) {
                error = Some(e);
            }
            let Some(e) = self.entry(b) else {
                continue;
            };
            let (mask, _, _) = Self::block_span(b, offset, len);
            blocked |= self.pending_fill(&e) & mask != 0;
            // Data from a log the scrub has not checked waits for it, or
            // fails while the log cannot be read.
            if e.valid & mask != 0
                && self.scrub.is_unchecked(e.id)
                && self.ring.seg(e.id).buf.is_none()
            {
                if self.scrub.is_unreadable(e.id) {
                    error.get_or_insert(IoError::CacheDevice);
                } else {
                    self.scrub.want(e.id);
                    blocked = true;
                }
            }
        }
        if let Some(err) = error
            && !blocked
        {
            self.track(req).parts += 1;
            self.part_done(req, Err(err));
            return;
        }
        if blocked {
            self.track(req).parts += 1;
            self.deferred_reads.push((req, offset, len));
            return;
        }
        // Sequential detection for read caching.
        let nblocks = last - first + 1;
        self.seq_run = if first == self.seq_next_block {
            self.seq_run + nblocks
        } else {
            nblocks
        };
        self.seq_next_block = last + 1;
        let stage_ok = self.tunables.read_cache_threshold > 0
            && self.seq_run <= self.tunables.read_cache_threshold as u64
            && !self.read_only
            && self.phase == Phase::Running;

        let hl = self.geo.header_len();
        let mut run: Option<Run> = None;
        let mut stage: Option<(u64, u64, usize)> = None; // first block, count, user offset
        let mut parts = 0u32;
        let mut holds = super::Holds::new();
        let mut backing_reads = 0u32;
        // Reused between reads: one allocation less on the hottest path.
        let mut cmds = std::mem::take(&mut self.read_cmds);
        // Collected first and issued after the loop (issue needs &mut self).
        let mut flush_run = |run: &mut Option<Run>, cmds: &mut Vec<(Command, Purpose)>| {
            if let Some(r) = run.take() {
                let kind = CommandKind::Read {
                    offset: r.dev_offset,
                    len: r.len,
                    dst: DataRef::User {
                        req,
                        offset: r.user_offset,
                    },
                };
                cmds.push((
                    Command {
                        token: crate::io::Token(0),
                        device: r.device,
                        kind,
                    },
                    Purpose::User {
                        req,
                        backing: r.device == Device::Backing,
                    },
                ));
                if let Some(id) = r.hold {
                    holds.push(id);
                }
            }
        };
        let mut add = |run: &mut Option<Run>, cmds: &mut Vec<(Command, Purpose)>, next: Run| {
            if let Some(r) = run.as_mut()
                && r.device == next.device
                && r.hold == next.hold
                && r.dev_offset + r.len as u64 == next.dev_offset
                && r.user_offset + r.len == next.user_offset
            {
                r.len += next.len;
                return;
            }
            flush_run(run, cmds);
            *run = Some(next);
        };

        for block in first..=last {
            let (mask, b0, _) = Self::block_span(block, offset, len);
            let uoff = (block * BLOCK_SIZE + b0 as u64 - offset) as usize;
            let sector_user = |s0: u32| uoff + (s0 as usize * SECTOR_SIZE as usize - b0);
            let full = mask == FULL_MASK;
            match self.entry(block) {
                Some(e) => {
                    let (hit, miss) = (mask & e.valid, mask & !e.valid);
                    let ram = self.ring.seg(e.id).buf;
                    self.stats.count(false, hit != 0, ram.is_some(), full);
                    for_each_run(hit, |s0, n| {
                        let (a, l) = (
                            s0 as usize * SECTOR_SIZE as usize,
                            n as usize * SECTOR_SIZE as usize,
                        );
                        match ram {
                            Some(buf) => self.events.push_back(Event::CopyToUser {
                                req,
                                dst_offset: sector_user(s0),
                                src: buf,
                                src_offset: hl + e.slot as usize * BLOCK_SIZE as usize + a,
                                len: l,
                            }),
                            None => add(
                                &mut run,
                                &mut cmds,
                                Run {
                                    device: Device::Cache,
                                    dev_offset: self.geo.slot_offset(e.id, e.slot) + a as u64,
                                    user_offset: sector_user(s0),
                                    len: l,
                                    hold: Some(e.id),
                                },
                            ),
                        }
                    });
                    for_each_run(miss, |s0, n| {
                        add(
                            &mut run,
                            &mut cmds,
                            Run {
                                device: Device::Backing,
                                dev_offset: block * BLOCK_SIZE + s0 as u64 * SECTOR_SIZE,
                                user_offset: sector_user(s0),
                                len: n as usize * SECTOR_SIZE as usize,
                                hold: None,
                            },
                        )
                    });
                }
                None if stage_ok && full => {
                    self.stats.count(false, false, false, true);
                    stage = match stage {
                        Some((f, n, u)) if f + n == block => Some((f, n + 1, u)),
                        other => {
                            if let Some(s) = other {
                                self.issue_stage(req, s);
                                parts += 1;
                                backing_reads += 1;
                            }
                            Some((block, 1, uoff))
                        }
                    };
                }
                None => {
                    self.stats.count(false, false, false, full);
                    add(
                        &mut run,
                        &mut cmds,
                        Run {
                            device: Device::Backing,
                            dev_offset: block * BLOCK_SIZE + b0 as u64,
                            user_offset: uoff,
                            len: ((block * BLOCK_SIZE + BLOCK_SIZE).min(offset + len)
                                - (block * BLOCK_SIZE + b0 as u64))
                                as usize,
                            hold: None,
                        },
                    );
                }
            }
        }
        flush_run(&mut run, &mut cmds);
        if let Some(s) = stage {
            self.issue_stage(req, s);
            parts += 1;
            backing_reads += 1;
        }
        for (cmd, purpose) in cmds.drain(..) {
            if cmd.device == Device::Backing {
                backing_reads += 1;
            }
            self.issue(cmd.device, cmd.kind, purpose);
            parts += 1;
        }
        self.read_cmds = cmds;
        for &id in &holds {
            self.ring.hold(id);
        }
        if parts == 0 && !self.reqs.contains_key(&req) {
            self.complete_now(req, Ok(()));
            return;
        }
        let r = self.track(req);
        r.parts += parts;
        r.holds.extend(holds);
        r.backing_load += backing_reads;
        self.backing_load += backing_reads as u64;
        self.try_finish(req);
    }

    fn issue_stage(&mut self, req: ReqId, (first_block, nblocks, user_offset): (u64, u64, usize)) {
        let len = (nblocks * BLOCK_SIZE) as usize;
        let buf = self.alloc_buf(len);
        let s = Stage {
            req,
            first_block,
            nblocks,
            buf,
            user_offset,
            seq: self.bypass_seq,
        };
        self.issue(
            Device::Backing,
            CommandKind::Read {
                offset: first_block * BLOCK_SIZE,
                len,
                dst: DataRef::Engine { buf, offset: 0 },
            },
            Purpose::Stage(s),
        );
    }

    pub(super) fn stage_done(&mut self, s: Stage, ok: bool) {
        if !ok {
            self.release_buf(s.buf);
            self.part_done(s.req, Err(IoError::BackingDevice));
            return;
        }
        let len = (s.nblocks * BLOCK_SIZE) as usize;
        self.events.push_back(Event::CopyToUser {
            req: s.req,
            dst_offset: s.user_offset,
            src: s.buf,
            src_offset: 0,
            len,
        });
        // Cache the blocks unless something wrote them meanwhile.
        if s.seq == self.bypass_seq && !self.read_only && self.phase == Phase::Running {
            let scratch = self.bufs[s.buf.0 as usize].take().expect("stage buffer");
            let hl = self.geo.header_len();
            for i in 0..s.nblocks {
                let block = s.first_block + i;
                if self.index.contains(block)
                    || !self.can_take_block()
                    || !self.ensure_open_slot(false)
                {
                    continue;
                }
                let o = self.open.as_mut().expect("open log");
                let (id, buf, slot) = (o.id, o.buf, o.slots.len() as u32);
                o.slots.push(Slot {
                    block,
                    valid: FULL_MASK,
                    dirty: false,
                    fill: 0,
                    crc: None,
                });
                let full = o.slots.len() as u32 == self.geo.data_blocks;
                let at = hl + slot as usize * BLOCK_SIZE as usize;
                let from = (i * BLOCK_SIZE) as usize;
                self.buf_mut(buf)[at..at + BLOCK_SIZE as usize]
                    .copy_from_slice(&scratch.as_ref()[from..from + BLOCK_SIZE as usize]);
                self.ring.seg_mut(id).nr_slots += 1;
                self.index_insert(
                    block,
                    Entry {
                        id,
                        slot,
                        valid: FULL_MASK,
                        dirty: 0,
                        logged_dirty: false,
                    },
                );
                self.stats.read_cache_staged += 1;
                if full {
                    self.request_seal();
                    self.seal_if_due();
                }
            }
            self.bufs[s.buf.0 as usize] = Some(scratch);
        }
        // Freed at the next input, after the host has done the copy.
        self.deferred_free.push(s.buf);
        self.part_done(s.req, Ok(()));
    }

    /// Ends a user request's own device command.
    pub(super) fn user_io_done(&mut self, req: ReqId, backing: bool, cmd: Command, ok: bool) {
        if backing && !matches!(cmd.kind, CommandKind::Read { .. }) {
            self.backing_bypass_inflight -= 1;
            if ok {
                self.backing_write_gen += 1;
            }
        }
        let err = if backing {
            IoError::BackingDevice
        } else {
            IoError::CacheDevice
        };
        self.part_done(req, if ok { Ok(()) } else { Err(err) });
    }

    /// Reads that waited for a fill try again.
    pub(super) fn retry_deferred_reads(&mut self) {
        for (req, offset, len) in std::mem::take(&mut self.deferred_reads) {
            if let Some(r) = self.reqs.get_mut(&req) {
                r.parts -= 1;
            }
            self.read_common(req, offset, len);
        }
    }
}
