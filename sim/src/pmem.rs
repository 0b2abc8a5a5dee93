//! Simulated persistent memory with crash semantics: a store is persistent
//! only once a persist covering it has run; at a crash every 8-byte word
//! stored since is independently kept or lost.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;

use rand::Rng;
use writeboost_engine::pmem::Pmem;

const WORD: u64 = 8;

struct State {
    visible: Vec<u8>,
    durable: Vec<u8>,
    /// Words stored but not yet persisted.
    dirty: BTreeSet<u64>,
    /// Ranges stored with `write_nodrain`: persistent only at the next drain.
    undrained: Vec<(u64, u64)>,
    /// Simulated time spent persisting, not yet taken by the harness.
    elapsed_ns: u64,
    /// Cost model: a persist of 4 KiB takes this long (scaled by length,
    /// at least 1/16 of it).
    persist_4k_ns: u64,
}

/// A handle on a simulated pool; clones share it, so the simulator can crash
/// the pool the engine is using.
#[derive(Clone)]
pub struct SimPmem(Rc<RefCell<State>>);

impl SimPmem {
    pub fn new(len: u64) -> Self {
        Self::from_image(vec![0; len as usize])
    }

    /// A pool whose contents (visible and persistent) are `image`.
    pub fn from_image(image: Vec<u8>) -> Self {
        Self(Rc::new(RefCell::new(State {
            visible: image.clone(),
            durable: image,
            dirty: BTreeSet::new(),
            undrained: Vec::new(),
            elapsed_ns: 0,
            persist_4k_ns: 0,
        })))
    }

    pub fn set_persist_cost(&self, per_4k_ns: u64) {
        self.0.borrow_mut().persist_4k_ns = per_4k_ns;
    }

    /// Time spent in persists since the last call.
    pub fn take_elapsed(&self) -> u64 {
        std::mem::take(&mut self.0.borrow_mut().elapsed_ns)
    }

    /// The pool after a power loss now.
    pub fn crash(&self, rng: &mut impl Rng) -> Vec<u8> {
        let st = self.0.borrow();
        let mut img = st.durable.clone();
        for &w in &st.dirty {
            if rng.random_bool(0.5) {
                let a = (w * WORD) as usize;
                img[a..a + WORD as usize].copy_from_slice(&st.visible[a..a + WORD as usize]);
            }
        }
        img
    }
}

impl Pmem for SimPmem {
    fn len(&self) -> u64 {
        self.0.borrow().visible.len() as u64
    }

    fn read(&self, offset: u64, dst: &mut [u8]) {
        let st = self.0.borrow();
        dst.copy_from_slice(&st.visible[offset as usize..offset as usize + dst.len()]);
    }

    fn write(&mut self, offset: u64, src: &[u8]) {
        let mut st = self.0.borrow_mut();
        st.visible[offset as usize..offset as usize + src.len()].copy_from_slice(src);
        for w in offset / WORD..(offset + src.len() as u64).div_ceil(WORD) {
            st.dirty.insert(w);
        }
    }

    fn persist(&mut self, offset: u64, len: u64) {
        let mut st = self.0.borrow_mut();
        let words: Vec<u64> = st
            .dirty
            .range(offset / WORD..(offset + len).div_ceil(WORD))
            .copied()
            .collect();
        for w in words {
            st.dirty.remove(&w);
            let a = (w * WORD) as usize;
            let v: [u8; 8] = st.visible[a..a + 8].try_into().expect("word");
            st.durable[a..a + 8].copy_from_slice(&v);
        }
        let cost = (st.persist_4k_ns * len / 4096).max(st.persist_4k_ns / 16);
        st.elapsed_ns += cost;
    }

    /// Until the drain, the stores are as unpersisted as plain writes: a
    /// crash keeps any subset of their words.
    fn write_nodrain(&mut self, offset: u64, src: &[u8]) {
        self.write(offset, src);
        self.0
            .borrow_mut()
            .undrained
            .push((offset, src.len() as u64));
    }

    fn drain(&mut self) {
        let ranges = std::mem::take(&mut self.0.borrow_mut().undrained);
        for (offset, len) in ranges {
            self.persist(offset, len);
        }
    }
}

/// Wraps a real pool and measures the wall time of its stores and persists.
pub struct TimedPmem<P> {
    pub inner: P,
    pub clock: Rc<std::cell::Cell<u64>>,
}

impl<P: Pmem> TimedPmem<P> {
    fn timed<R>(&mut self, f: impl FnOnce(&mut P) -> R) -> R {
        let t = std::time::Instant::now();
        let r = f(&mut self.inner);
        self.clock
            .set(self.clock.get() + t.elapsed().as_nanos() as u64);
        r
    }
}

impl<P: Pmem> Pmem for TimedPmem<P> {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read(&self, offset: u64, dst: &mut [u8]) {
        self.inner.read(offset, dst)
    }
    fn write(&mut self, offset: u64, src: &[u8]) {
        self.timed(|p| p.write(offset, src))
    }
    fn persist(&mut self, offset: u64, len: u64) {
        self.timed(|p| p.persist(offset, len))
    }
    fn write_persist(&mut self, offset: u64, src: &[u8]) {
        self.timed(|p| p.write_persist(offset, src))
    }
    fn write_nodrain(&mut self, offset: u64, src: &[u8]) {
        self.timed(|p| p.write_nodrain(offset, src))
    }
    fn drain(&mut self) {
        self.timed(|p| p.drain())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn unpersisted_words_may_be_lost_persisted_ones_never() {
        let mut p = SimPmem::new(64);
        p.write(0, &[1; 16]);
        p.persist(0, 8);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let (mut kept, mut lost) = (false, false);
        for _ in 0..40 {
            let img = p.crash(&mut rng);
            assert_eq!(&img[..8], &[1; 8]);
            kept |= img[8] == 1;
            lost |= img[8] == 0;
        }
        assert!(kept && lost);
    }

    #[test]
    fn undrained_stores_may_be_lost_until_the_drain() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (mut kept, mut lost) = (false, false);
        for _ in 0..40 {
            let mut p = SimPmem::new(64);
            p.write_nodrain(0, &[1; 8]);
            let img = p.crash(&mut rng);
            kept |= img[0] == 1;
            lost |= img[0] == 0;
        }
        assert!(kept && lost);
        let mut p = SimPmem::new(64);
        p.write_nodrain(0, &[1; 8]);
        p.write_nodrain(8, &[2; 8]);
        p.drain();
        for _ in 0..10 {
            let img = p.crash(&mut rng);
            assert_eq!(&img[..16], &[[1; 8], [2; 8]].concat()[..]);
        }
    }
}
