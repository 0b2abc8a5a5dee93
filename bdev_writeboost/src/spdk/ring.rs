//! The lock-free ring requests and completions cross SPDK threads on: a
//! preallocated bounded queue, so the steady state allocates nothing, with an
//! unbounded overflow for bursts beyond it (nothing is ever refused).

use crossbeam_queue::{ArrayQueue, SegQueue};

/// Slots of the bounded part: more than the I/O a channel usually has in flight.
const RING_SLOTS: usize = 1024;

pub struct Ring<T> {
    fast: ArrayQueue<T>,
    overflow: SegQueue<T>,
}

impl<T> Ring<T> {
    pub fn new() -> Self {
        Self {
            fast: ArrayQueue::new(RING_SLOTS),
            overflow: SegQueue::new(),
        }
    }

    pub fn push(&self, v: T) {
        if let Err(v) = self.fast.push(v) {
            self.overflow.push(v);
        }
    }

    /// Any queued item; a consumer that pops until `None` sees every item
    /// pushed before it started.
    pub fn pop(&self) -> Option<T> {
        self.fast.pop().or_else(|| self.overflow.pop())
    }

    pub fn len(&self) -> usize {
        self.fast.len() + self.overflow.len()
    }
}
