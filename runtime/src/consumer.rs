//! Consumer handles and the writer's table of consumer slots.
//!
//! A consumer is one handler attached to one probe address. Its handle,
//! [`ConsumerId`], is a slot index and a generation: the generation is bumped
//! every time the slot is detached, so a stale, doubled or invented handle is
//! [`Error::NotFound`], never a crash. The dispatcher's view of a consumer is
//! its [`ConsumerRecord`](crate::probe::ConsumerRecord) in the never-unmapped
//! arena, at the same index: its state (a handler's `Remove` flips it) and
//! its statistics.
//!
//! Writer only: everything here runs under the writer lock.

use std::any::Any;
use std::sync::atomic::Ordering;

use crate::arch::Clobbers;
use crate::error::{Error, Result};
use crate::hit::Handler;
use crate::probe::{
    consumer_tag, Entry, EntryKind, CONSUMERS, STATE_ACTIVE, STATE_DETACHED, STATE_FREE,
    STATE_REMOVED,
};
use crate::site::Mode;

/// A handle to an attached consumer; never 0. Carries a generation, so a
/// stale or doubled handle is [`Error::NotFound`], never a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerId(pub u64);

impl ConsumerId {
    fn new(idx: u32, gen: u32) -> Self {
        ConsumerId((u64::from(gen) << 32) | (u64::from(idx) + 1))
    }

    fn parts(self) -> Option<(u32, u32)> {
        let low = (self.0 & 0xFFFF_FFFF) as u32;
        let idx = low.checked_sub(1)?;
        Some((idx, (self.0 >> 32) as u32))
    }
}

/// Per-consumer statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Handler calls.
    pub hits: u64,
    /// Hits skipped because the thread was already running a handler.
    pub missed: u64,
    /// Return handler calls (consumers with a return handler).
    pub returns: u64,
    /// Invocations whose entry called the consumer and that left without
    /// returning (`longjmp`, an exception, the thread's exit), or whose
    /// return could not be followed.
    pub abandoned: u64,
}

/// One attach request.
#[derive(Clone, Copy, Debug)]
pub struct AttachReq {
    /// The instruction to probe.
    pub addr: usize,
    /// The handler (async-signal-safe; see [`Handler`]).
    pub handler: Handler,
    /// Passed back in every hit.
    pub user_data: *mut std::ffi::c_void,
}

/// A consumer that owns something to drop once it can no longer be called
/// (e.g. a boxed closure).
pub(crate) type Owner = Box<dyn Any + Send>;

/// What an attached consumer is: where, which handler, how.
pub(crate) struct Attachment {
    pub addr: usize,
    pub handler: Handler,
    pub user_data: usize,
    pub mode: Mode,
    pub owner: Option<Owner>,
    /// What the handler may change beyond the GPRs and flags.
    pub clobbers: Clobbers,
    /// What kind of consumer (see `probe::EntryKind`).
    pub kind: EntryKind,
    /// The return handler of a consumer with one.
    pub on_return: Option<Handler>,
}

#[derive(Default)]
struct ConsumerSlot {
    gen: u32,
    attachment: Option<Attachment>,
}

/// The consumer slots. Writer only.
#[derive(Default)]
pub(crate) struct Consumers {
    slots: Vec<ConsumerSlot>,
    free: Vec<u32>,
}

impl Consumers {
    /// How many more consumers can be attached.
    pub(crate) fn room(&self) -> usize {
        self.free.len() + (CONSUMERS.capacity() - self.slots.len())
    }

    /// Takes a free slot for `attachment` and initialises its record.
    pub(crate) fn attach(&mut self, attachment: Attachment) -> Result<(ConsumerId, u32)> {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                if self.slots.len() >= CONSUMERS.capacity() {
                    return Err(Error::NoMemory("too many consumers".into()));
                }
                self.slots.push(ConsumerSlot {
                    gen: 1,
                    attachment: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let rec = CONSUMERS
            .get(idx as usize)
            .ok_or(Error::Internal("consumer record out of range".into()))?;
        let slot = &self.slots[idx as usize];
        // Ordering: Relaxed — the record is published with the consumer list
        // (Release swap in `publish_list`); no flush for its previous
        // consumer can come (see `release`).
        rec.hits.store(0, Ordering::Relaxed);
        rec.missed.store(0, Ordering::Relaxed);
        rec.returns.store(0, Ordering::Relaxed);
        rec.abandoned.store(0, Ordering::Relaxed);
        rec.gen.store(slot.gen, Ordering::Relaxed);
        rec.state.store(STATE_ACTIVE, Ordering::Relaxed);
        let slot = &mut self.slots[idx as usize];
        slot.attachment = Some(attachment);
        Ok((ConsumerId::new(idx, slot.gen), idx))
    }

    /// Validates a handle: the index of the attached consumer it names.
    pub(crate) fn lookup(&self, id: ConsumerId) -> Result<u32> {
        let (idx, gen) = id.parts().ok_or(Error::NotFound)?;
        let slot = self.slots.get(idx as usize).ok_or(Error::NotFound)?;
        if slot.gen != gen || slot.attachment.is_none() {
            return Err(Error::NotFound);
        }
        let rec = CONSUMERS.get(idx as usize).ok_or(Error::NotFound)?;
        // Ordering: Relaxed — the handler's CAS is re-read here under the
        // lock; a consumer that asked to be removed is stale.
        if rec.state.load(Ordering::Relaxed) != STATE_ACTIVE {
            return Err(Error::NotFound);
        }
        Ok(idx)
    }

    /// The slot of a consumer attached by the caller, whatever its state:
    /// [`Consumers::lookup`] without the check that its handler has not
    /// returned `Remove` (it may have, as soon as its list is published;
    /// the writer still has to finish its bookkeeping).
    pub(crate) fn slot_of(&self, id: ConsumerId) -> Option<u32> {
        let (idx, gen) = id.parts()?;
        let slot = self.slots.get(idx as usize)?;
        (slot.gen == gen && slot.attachment.is_some()).then_some(idx)
    }

    /// The address the attached consumer `idx` is attached at.
    pub(crate) fn addr_of(&self, idx: u32) -> Option<usize> {
        self.slots
            .get(idx as usize)
            .and_then(|s| s.attachment.as_ref())
            .map(|a| a.addr)
    }

    /// Detaches slot `idx`: its handle becomes stale at once, its record
    /// stops being called, and its slot is reusable after
    /// [`Consumers::release`]. Returns the attachment and the tag the
    /// threads' hit caches filed the consumer under.
    pub(crate) fn detach(&mut self, idx: u32) -> Option<(Attachment, u64)> {
        let slot = self.slots.get_mut(idx as usize)?;
        let attachment = slot.attachment.take()?;
        let tag = consumer_tag(idx, slot.gen);
        slot.gen = slot.gen.wrapping_add(1).max(1);
        if let Some(rec) = CONSUMERS.get(idx as usize) {
            // Ordering: Relaxed — dispatchers stop calling it early; the
            // guarantee comes from the grace period after unpublishing.
            rec.state.store(STATE_DETACHED, Ordering::Relaxed);
        }
        Some((attachment, tag))
    }

    /// Makes a detached slot reusable. The writer calls it after, in order:
    /// a grace period since the consumer was unpublished (no dispatcher
    /// sees its record, none can count a new hit for it), purging its tag
    /// from every thread's hit cache (`grace::purge_hit_entries`), and a
    /// second grace period (a thread that was evicting the entry during the
    /// purge has flushed it). So no late flush ever reaches the record's
    /// next consumer.
    pub(crate) fn release(&mut self, idx: u32) {
        if let Some(r) = CONSUMERS.get(idx as usize) {
            // Ordering: Relaxed — no dispatcher can see it now.
            r.state.store(STATE_FREE, Ordering::Relaxed);
        }
        self.free.push(idx);
    }

    /// The dispatcher's entry for attached slot `idx`.
    pub(crate) fn entry(&self, idx: u32) -> Option<Entry> {
        let slot = self.slots.get(idx as usize)?;
        let a = slot.attachment.as_ref()?;
        Some(Entry {
            handler: a.handler,
            user_data: a.user_data,
            record: CONSUMERS.get(idx as usize)?,
            tag: consumer_tag(idx, slot.gen),
            clobbers: a.clobbers,
            kind: a.kind,
            on_return: a.on_return,
        })
    }

    /// Widens the classes of attached slot `idx` (an exit consumer whose
    /// return handlers grew); whether they changed.
    pub(crate) fn widen_clobbers(&mut self, idx: u32, c: Clobbers) -> bool {
        match self
            .slots
            .get_mut(idx as usize)
            .and_then(|s| s.attachment.as_mut())
        {
            Some(a) if !c.within(a.clobbers) => {
                a.clobbers = a.clobbers.union(c);
                true
            }
            _ => false,
        }
    }

    /// Attached slots whose handler returned `Remove`.
    pub(crate) fn removed(&self) -> Vec<u32> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                s.attachment.is_some()
                    && CONSUMERS.get(*i).is_some_and(|r| {
                        // Ordering: Relaxed — ordered by the reap flag's
                        // Acquire (see `writer::reap`).
                        r.state.load(Ordering::Relaxed) == STATE_REMOVED
                    })
            })
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// The statistics of attached slot `idx`; `pending(tag)` adds the hits
    /// threads counted and have not yet flushed.
    pub(crate) fn stats(&self, idx: u32, pending: impl Fn(u64) -> u64) -> Result<Stats> {
        let rec = CONSUMERS.get(idx as usize).ok_or(Error::NotFound)?;
        let slot = self.slots.get(idx as usize).ok_or(Error::NotFound)?;
        let tag = consumer_tag(idx, slot.gen);
        // Ordering: Relaxed — statistics.
        Ok(Stats {
            hits: rec.hits.load(Ordering::Relaxed) + pending(tag),
            missed: rec.missed.load(Ordering::Relaxed),
            returns: rec.returns.load(Ordering::Relaxed),
            abandoned: rec.abandoned.load(Ordering::Relaxed),
        })
    }
}
