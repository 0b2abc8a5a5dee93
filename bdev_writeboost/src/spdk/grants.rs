//! Write grants on the submitting core: a channel holds slots of the open
//! log that the engine reserved for it, copies a write of whole blocks
//! into them and takes their CRC-32C on its own core, then publishes the
//! write through the device's inbox. The engine's thread only indexes it.
//!
//! The channel asks for slots ahead of need (a request on a lock-free
//! ring), so a write rarely waits for a round trip; when none are at hand
//! it sends the write whole, as before. The engine names the newest log
//! whose reserved slots it waits for (to seal it): a channel that holds
//! slots of that log or an older one and is idle hands them back.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crossbeam_queue::ArrayQueue;

use super::ring::Ring;

/// The largest write copied in on the submitting core, in 4 KiB blocks.
pub const MAX_GRANTED_BLOCKS: usize = 16;
/// Slots a channel asks for at a time.
pub const GRANT_SLOTS: u32 = 32;
const BLOCK: usize = 4096;

/// Slots of log `log` reserved for one channel: slot `first_slot + i` is
/// `i × 4096` bytes past `base`, in the log's DMA buffer.
#[derive(Clone, Copy, Debug)]
pub struct SlotGrant {
    pub log: u64,
    pub base: *mut u8,
    pub first_slot: u32,
    pub count: u32,
}

// SAFETY: `base` points into an engine buffer that stays in place until
// every slot of the grant is published or handed back (the engine seals
// the log only then); only the channel holding the grant writes there.
unsafe impl Send for SlotGrant {}

/// What a write carries once its data is in granted slots.
#[derive(Clone, Copy, Debug)]
pub struct Published {
    pub log: u64,
    pub first_slot: u32,
    pub nr: u32,
    pub crcs: [u32; MAX_GRANTED_BLOCKS],
}

/// The part of a channel's grants the device's thread touches.
pub struct GrantBox {
    /// Grants the device's thread made for this channel.
    pub ready: ArrayQueue<SlotGrant>,
    /// A request is on the device's ring already.
    asked: AtomicBool,
}

/// A device's side of the grants, in its `Shared`.
pub struct DeviceGrants {
    /// Channels that want slots.
    pub requests: Ring<Arc<GrantBox>>,
    /// Slots handed back: (log, first slot, count).
    pub returns: Ring<(u64, u32, u32)>,
    /// The newest log whose reserved slots the engine waits for (0: none).
    pub wanted_back: AtomicU64,
}

impl DeviceGrants {
    pub fn new() -> Self {
        Self {
            requests: Ring::new(),
            returns: Ring::new(),
            wanted_back: AtomicU64::new(0),
        }
    }
}

/// A channel's grants, on its own thread.
pub struct ChannelGrants {
    shared: Arc<GrantBox>,
    /// The grant in use and its next unused slot.
    held: Cell<Option<(SlotGrant, u32)>>,
    /// A write used the held grant since the last poll.
    used: Cell<bool>,
}

impl ChannelGrants {
    pub fn new() -> Self {
        Self {
            shared: Arc::new(GrantBox {
                ready: ArrayQueue::new(2),
                asked: AtomicBool::new(false),
            }),
            held: Cell::new(None),
            used: Cell::new(false),
        }
    }

    fn ask(&self, dev: &DeviceGrants) {
        if !self.shared.asked.swap(true, Ordering::AcqRel) {
            dev.requests.push(self.shared.clone());
        }
    }

    /// Hands back what is left of the held grant.
    fn give_back(&self, dev: &DeviceGrants) {
        if let Some((g, next)) = self.held.take() {
            let left = g.first_slot + g.count - next;
            if left > 0 {
                dev.returns.push((g.log, next, left));
            }
        }
    }

    /// Copies a write of `len` bytes at `offset`, from `data`, into granted
    /// slots, with its checksums; None (nothing copied) when it is not
    /// whole blocks or no slots are at hand.
    ///
    /// # Safety
    /// `data` points to `len` readable bytes.
    pub unsafe fn copy_in(
        &self,
        dev: &DeviceGrants,
        offset: u64,
        data: *const u8,
        len: usize,
    ) -> Option<Published> {
        let nr = len / BLOCK;
        if !offset.is_multiple_of(BLOCK as u64)
            || !len.is_multiple_of(BLOCK)
            || nr == 0
            || nr > MAX_GRANTED_BLOCKS
        {
            return None;
        }
        let (g, first) = loop {
            match self.held.get() {
                Some((g, next)) if g.first_slot + g.count - next >= nr as u32 => {
                    break (g, next);
                }
                _ => {
                    self.give_back(dev);
                    match self.shared.ready.pop() {
                        Some(g) => self.held.set(Some((g, g.first_slot))),
                        None => {
                            self.ask(dev);
                            return None;
                        }
                    }
                }
            }
        };
        self.held.set(Some((g, first + nr as u32)));
        self.used.set(true);
        // Ask for the next grant before this one runs out.
        if self.shared.ready.is_empty() {
            self.ask(dev);
        }
        let mut p = Published {
            log: g.log,
            first_slot: first,
            nr: nr as u32,
            crcs: [0; MAX_GRANTED_BLOCKS],
        };
        // SAFETY: the slots first..first + nr are this channel's alone
        // (reserved for it, not published yet); the buffer stays in place
        // until they are published or handed back; `data` has `len` bytes.
        unsafe {
            let dst = g.base.add((first - g.first_slot) as usize * BLOCK);
            std::ptr::copy_nonoverlapping(data, dst, len);
            for (i, crc) in p.crcs.iter_mut().take(nr).enumerate() {
                *crc = crc32c::crc32c(std::slice::from_raw_parts(dst.add(i * BLOCK), BLOCK));
            }
        }
        Some(p)
    }

    /// Poller turn: an idle channel hands back slots the engine waits for.
    pub fn poll(&self, dev: &DeviceGrants) {
        let used = self.used.replace(false);
        let wanted = dev.wanted_back.load(Ordering::Acquire);
        if wanted == 0 {
            return;
        }
        if !used && self.held.get().is_some_and(|(g, _)| g.log <= wanted) {
            self.give_back(dev);
        }
        // Grants made but not taken up yet are of no use for that log either.
        while let Some(g) = self.shared.ready.pop() {
            if g.log <= wanted {
                dev.returns.push((g.log, g.first_slot, g.count));
            } else {
                // (At most two are queued: the newer one goes back in.)
                let _ = self.shared.ready.push(g);
                break;
            }
        }
    }

    /// The channel goes away: everything it holds goes back.
    pub fn close(&self, dev: &DeviceGrants) {
        self.give_back(dev);
        while let Some(g) = self.shared.ready.pop() {
            dev.returns.push((g.log, g.first_slot, g.count));
        }
    }
}

impl GrantBox {
    /// On the device's thread: a grant for the channel that asked.
    pub fn give(&self, g: Option<SlotGrant>) -> Option<SlotGrant> {
        self.asked.store(false, Ordering::Release);
        let g = g?;
        self.ready.push(g).err()
    }

    /// Whether the channel can take another grant.
    pub fn has_room(&self) -> bool {
        !self.ready.is_full()
    }
}
