//! Submitting cores that copy writes into granted slots themselves, as the
//! SPDK module's channels do: each core holds at most one grant, copies a
//! write of whole blocks into it, and publishes it after a delay of its own,
//! so publications reach the engine out of order. A crash drops the
//! publications not made yet: slots reserved and never published.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use writeboost_engine::{Grant, LogId, Nanos, ReqId};

/// The largest write a core copies in itself, in 4 KiB blocks.
pub const MAX_GRANTED_BLOCKS: u32 = 16;
/// Slots a core asks for at a time.
pub const GRANT_SLOTS: u32 = 16;

/// A write copied into its slots, waiting for its core to publish it.
pub struct Publication {
    pub req: ReqId,
    pub offset: u64,
    pub log: LogId,
    pub first_slot: u32,
    pub crcs: Vec<u32>,
    pub fua: bool,
}

pub struct Submitters {
    /// Each core's grant and the next unused slot in it.
    held: Vec<Option<(Grant, u32)>>,
    /// Publications by due time.
    due: BinaryHeap<Reverse<(Nanos, u64)>>,
    waiting: std::collections::BTreeMap<u64, Publication>,
    seq: u64,
    /// Longest delay between a copy and its publication.
    max_delay: Nanos,
    rng: ChaCha8Rng,
}

impl Submitters {
    pub fn new(cores: usize, max_delay: Nanos, rng: ChaCha8Rng) -> Self {
        Self {
            held: vec![None; cores],
            due: BinaryHeap::new(),
            waiting: Default::default(),
            seq: 0,
            max_delay,
            rng,
        }
    }

    /// A core for the next write.
    pub fn pick(&mut self) -> usize {
        self.rng.random_range(0..self.held.len())
    }

    /// `n` slots from `core`'s grant, if it holds that many.
    pub fn take(&mut self, core: usize, n: u32) -> Option<(Grant, u32)> {
        let (g, next) = self.held[core].as_mut()?;
        if g.first_slot + g.count - *next < n {
            return None;
        }
        let first = *next;
        *next += n;
        Some((*g, first))
    }

    /// What `core` holds unused, taken from it: (log, first slot, count).
    pub fn release(&mut self, core: usize) -> Option<(LogId, u32, u32)> {
        let (g, next) = self.held[core].take()?;
        let left = g.first_slot + g.count - next;
        (left > 0).then_some((g.log, next, left))
    }

    pub fn hold(&mut self, core: usize, g: Grant) {
        debug_assert!(self.held[core].is_none());
        self.held[core] = Some((g, g.first_slot));
    }

    /// Cores holding slots of log `wanted` or an older one. Each hands
    /// them back at once half of the time (a busy core uses them first);
    /// with `all`, every one does.
    pub fn revoked(&mut self, wanted: LogId, all: bool) -> Vec<usize> {
        let mut out = Vec::new();
        for core in 0..self.held.len() {
            if self.held[core].is_some_and(|(g, _)| g.log <= wanted)
                && (all || self.rng.random_bool(0.5))
            {
                out.push(core);
            }
        }
        out
    }

    /// Queues a publication after this core's copy takes its time.
    pub fn queue(&mut self, now: Nanos, p: Publication) {
        let at = now + self.rng.random_range(0..=self.max_delay);
        self.seq += 1;
        self.due.push(Reverse((at, self.seq)));
        self.waiting.insert(self.seq, p);
    }

    /// When the next publication is due.
    pub fn next_due(&self) -> Option<Nanos> {
        self.due.peek().map(|Reverse((t, _))| *t)
    }

    /// The next publication, due at the time returned.
    pub fn pop(&mut self) -> Option<(Nanos, Publication)> {
        let Reverse((at, seq)) = self.due.pop()?;
        Some((at, self.waiting.remove(&seq).expect("queued publication")))
    }

    pub fn any_held(&self) -> bool {
        self.held.iter().any(Option::is_some)
    }
}
