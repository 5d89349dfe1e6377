//! The fan-out write path: a publication's WebSocket frame is built once and written by this
//! module straight to the socket of every subscriber that can take it now, without a Python
//! step per recipient.
//!
//! Hand-written because it is the one place where no library fits: it has to share the hub's
//! subscription ids (the matcher's), the hub's per-connection ordering rules and trio's
//! sockets (by file descriptor). It does no matching itself: the caller matches and hands in
//! the subscription ids a publication goes to.
//!
//! Every hub connection has a *handle* here. A connection is written directly only while it
//! is *attached* (its transport gave a socket: WebSocket) and not *held*: nothing of it is
//! queued on the Python side. A recipient that is not attached or is held is handed back
//! ("slow"); the hub then queues the frame in the connection's outbox under its
//! slow-consumer policy and the connection stays held until its trio writer has written
//! everything queued and releases it.
//!
//! When the kernel takes only part of a frame, or none of it (the socket would block), the
//! rest is kept here as the connection's *pending* bytes and its writer is "woken": it takes
//! the pending bytes and writes them (awaiting the socket as trio does). From then until it
//! releases the socket the connection is *busy*: new frames are appended to its pending
//! bytes, not sent, so a client that reads a little late costs an append per frame and one
//! write per writer turn, not a trip through the outbox per frame. Pending bytes are bounded
//! per connection (`attach`'s limit); past it, frames go to the outbox, whose policy decides
//! (disconnect, drop, conflate). So bytes reach a socket in the order the hub produced them,
//! whichever path carries them: pending bytes are always the oldest, and the writer takes
//! them before its outbox.
//!
//! While *corked* (`cork` .. `uncork`), frames for a free connection are gathered (each
//! frame copied once into an arena, each connection keeping its ranges of it) instead of
//! being sent, and `uncork` sends each connection's frames with one vectored write: a burst
//! of publications (several client publishes in one read, a batch of row changes) costs one
//! system call per connection, not one per frame. A big uncork spreads its writes over
//! threads (`set_threads`).
//!
//! The bytes waiting here (pending, and what a writer took and is writing) count against the
//! hub's [`Budget`], shared with every connection's outbox: a frame that would become
//! backlog while the budget is full is handed back to the hub instead, whose outbox applies
//! the connection's slow-consumer policy against the same budget.
//!
//! Sockets are behind the [`Sink`] trait: [`FdSink`] writes to a descriptor, the tests use a
//! fake socket. **The descriptor rule**: `attach` takes a sink by value and `detach` and
//! `close` drop it; an `FdSink` borrows the transport's descriptor number, which must stay
//! open until then (see [`FdSink`] for who keeps the rule, and why the fan-out does not
//! take a duplicate).

mod budget;
mod sink;
mod slot;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::frame::text_frame;

pub use budget::Budget;
#[cfg(unix)]
pub use sink::FdSink;
pub use sink::{Sink, MAX_SLICES};
pub use slot::Pending;
use slot::{write_all, Slot, Write, Written};

/// Connections a writer thread of `uncork` takes at least.
pub const PER_THREAD_MIN: usize = 256;

/// The most threads `uncork` writes on.
pub const MAX_THREADS: usize = 64;

/// A call the fan-out refuses (nothing changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FanOutError {
    /// The handle is not open (never opened, or closed).
    UnknownHandle(u32),
    /// `attach` to a handle with a socket already.
    AlreadyAttached(u32),
    /// `subscribe_rows` of a pair it has.
    RowSubscriptionHeld { sub_id: u64, handle: u32 },
    /// `set_threads` outside 1..=MAX_THREADS.
    Threads(usize),
}

impl fmt::Display for FanOutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FanOutError::UnknownHandle(handle) => write!(f, "no open handle {handle}"),
            FanOutError::AlreadyAttached(handle) => {
                write!(f, "handle {handle} is attached already")
            }
            FanOutError::RowSubscriptionHeld { sub_id, handle } => {
                write!(f, "handle {handle} holds row subscription {sub_id} already")
            }
            FanOutError::Threads(_) => write!(f, "threads must be 1..{MAX_THREADS}"),
        }
    }
}

impl std::error::Error for FanOutError {}

/// What delivering one frame came to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Handed back to the hub: held or not attached (queue the frame in the outbox), or
    /// over a limit (the fan-out holds them: the outbox's policy decides).
    pub slow: Vec<u32>,
    /// Their writer must run: they have pending bytes now, and had none before.
    pub woken: Vec<u32>,
    /// Frames the fan-out took (written, gathered or pending).
    pub written: usize,
}

/// The fan-out's counters (see `FanOut::stats`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub direct_frames: u64,
    pub direct_bytes: u64,
    /// Sink calls (system calls, for an `FdSink`).
    pub writes: u64,
    pub partial_writes: u64,
    pub refused_writes: u64,
    /// Frames handed back because a backlog or the budget was full.
    pub overflows: u64,
    /// Of `overflows`, those because the budget was full (not the connection's own limit).
    pub budget_overflows: u64,
    pub backlog_bytes: usize,
    pub threaded_uncorks: u64,
    pub row_subscriptions: usize,
    pub handles: usize,
    pub attached: usize,
    pub subscriptions: usize,
}

/// The hub's direct write path; see the module documentation.
pub struct FanOut<S> {
    slots: Vec<Slot<S>>,
    free: Vec<u32>,
    /// Channel subscription id -> the handle of its connection.
    subs: HashMap<u64, u32>,
    /// Row subscription id (of the hub's row matcher) -> the handles holding it.
    rows: HashMap<u64, Vec<u32>>,
    generation: u64,
    frame: Vec<u8>,
    corked: bool,
    /// Handles given corked frames since `cork`.
    dirty: Vec<u32>,
    /// While corked: each frame gathered for some connection, once (slots keep ranges).
    arena: Vec<u8>,
    /// Where `frame` is in the arena, once it is.
    frame_in_arena: Option<(usize, usize)>,
    /// `frame` shared by the connections that keep it as pending bytes, once one does.
    frame_shared: Option<Arc<[u8]>>,
    direct_frames: u64,
    direct_bytes: u64,
    writes: u64,
    partial_writes: u64,
    refused_writes: u64,
    overflows: u64,
    budget_overflows: u64,
    /// The hub's budget for queued bytes, shared with its outboxes.
    budget: Arc<Budget>,
    /// The bytes of every slot's `backlog()` (its share of the budget).
    backlog: usize,
    threads: usize,
    threaded_uncorks: u64,
}

impl<S: Sink> Default for FanOut<S> {
    /// A fan-out with a budget of its own, without limit.
    fn default() -> Self {
        FanOut::new(Arc::default())
    }
}

/// The frame being delivered, shared: made once per frame for the connections that keep it.
fn shared(frame: &[u8], cache: &mut Option<Arc<[u8]>>) -> Arc<[u8]> {
    cache.get_or_insert_with(|| Arc::from(frame)).clone()
}

impl<S: Sink> FanOut<S> {
    /// A fan-out whose backlog counts against `budget` (shared with the hub's outboxes).
    pub fn new(budget: Arc<Budget>) -> Self {
        FanOut {
            slots: Vec::new(),
            free: Vec::new(),
            subs: HashMap::new(),
            rows: HashMap::new(),
            generation: 0,
            frame: Vec::new(),
            corked: false,
            dirty: Vec::new(),
            arena: Vec::new(),
            frame_in_arena: None,
            frame_shared: None,
            direct_frames: 0,
            direct_bytes: 0,
            writes: 0,
            partial_writes: 0,
            refused_writes: 0,
            overflows: 0,
            budget_overflows: 0,
            budget,
            backlog: 0,
            threads: 1,
            threaded_uncorks: 0,
        }
    }

    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    // -- handles and sockets ---------------------------------------------------------------

    /// A handle for a new connection: not attached, so everything to it is handed back.
    pub fn open(&mut self) -> u32 {
        let slot = Slot {
            open: true,
            ..Slot::closed()
        };
        if let Some(handle) = self.free.pop() {
            self.slots[handle as usize] = slot;
            handle
        } else {
            self.slots.push(slot);
            (self.slots.len() - 1) as u32
        }
    }

    /// Forgets `handle`, dropping its socket; unsubscribe its subscriptions first.
    pub fn close(&mut self, handle: u32) -> Result<(), FanOutError> {
        self.free_backlog(handle)?;
        *self.slot(handle)? = Slot::closed();
        self.free.push(handle);
        Ok(())
    }

    /// Lets the fan-out write to `sink` for `handle` (which starts held: its writer releases
    /// it), keeping at most `limit` bytes pending for it (more go to the hub's outbox). The
    /// fan-out owns the sink from now on and drops it at `detach` or `close` (on an error,
    /// at once).
    pub fn attach(&mut self, handle: u32, sink: S, limit: usize) -> Result<(), FanOutError> {
        let slot = self.slot(handle)?;
        if slot.sink.is_some() {
            return Err(FanOutError::AlreadyAttached(handle));
        }
        slot.sink = Some(sink);
        slot.held = true;
        slot.limit = limit;
        Ok(())
    }

    /// Stops direct writes to `handle` and drops its socket (pending bytes are discarded).
    pub fn detach(&mut self, handle: u32) -> Result<(), FanOutError> {
        self.free_backlog(handle)?;
        self.slot(handle)?.detach();
        Ok(())
    }

    /// Whether `handle` has a socket attached.
    pub fn attached(&mut self, handle: u32) -> Result<bool, FanOutError> {
        Ok(self.slot(handle)?.sink.is_some())
    }

    // -- who writes: the fan-out, or the connection's writer --------------------------------

    /// Whether frames to `handle` go through its outbox now.
    pub fn held(&mut self, handle: u32) -> Result<bool, FanOutError> {
        Ok(self.slot(handle)?.held)
    }

    /// Frames to `handle` go through its outbox from now on (the hub queued one there, or
    /// the transport writes to the socket itself).
    pub fn hold(&mut self, handle: u32) -> Result<(), FanOutError> {
        self.slot(handle)?.held = true;
        Ok(())
    }

    /// Direct writes to `handle` may resume: its writer has written everything queued.
    /// Returns false (and nothing changes) when it is not attached or has pending bytes.
    /// Either way, what the writer took is written: it no longer counts against the budget.
    pub fn release(&mut self, handle: u32) -> Result<bool, FanOutError> {
        let written = std::mem::take(&mut self.slot(handle)?.taken);
        self.free(written);
        let slot = &mut self.slots[handle as usize];
        if slot.sink.is_none() || !slot.pending.is_empty() {
            return Ok(false);
        }
        slot.held = false;
        slot.busy = false;
        Ok(true)
    }

    /// Whether the writer of `handle` owns its socket (frames are appended to its pending
    /// bytes until `release`).
    pub fn busy(&mut self, handle: u32) -> Result<bool, FanOutError> {
        Ok(self.slot(handle)?.busy)
    }

    /// Bytes pending for `handle`.
    pub fn pending_bytes(&mut self, handle: u32) -> Result<usize, FanOutError> {
        Ok(self.slot(handle)?.pending.len())
    }

    /// Bytes held for every connection: pending, and taken by writers still writing them
    /// (this fan-out's share of the budget).
    pub fn backlog_bytes(&self) -> usize {
        self.backlog
    }

    /// Hands the pending bytes of `handle` (oldest first, to be written before anything
    /// queued; none if none) to `out`, which takes them (`Pending::take_into` or `take`).
    /// From now until `release`, its writer owns the socket: frames to it are appended to
    /// its pending bytes (up to its limit), not sent. The bytes count against the budget
    /// until the writer comes back (`take_pending` again, or `release`): by then it has
    /// written them.
    pub fn take_pending<T>(
        &mut self,
        handle: u32,
        out: impl FnOnce(&mut Pending) -> T,
    ) -> Result<T, FanOutError> {
        self.slot(handle)?;
        let slot = &mut self.slots[handle as usize];
        let moved = slot.pend_gathered(&self.arena);
        let written = std::mem::take(&mut slot.taken);
        self.backlog += moved;
        self.budget.add(moved);
        self.free(written);
        let slot = &mut self.slots[handle as usize];
        let before = slot.pending.len();
        let made = out(&mut slot.pending);
        // (What `out` left, if anything, is still pending, not taken.)
        slot.taken = before - slot.pending.len();
        if slot.pending.is_empty() && slot.pending.chunks.capacity() > 1024 {
            slot.pending = Pending::default(); // a past backlog's memory is not kept
        }
        if slot.sink.is_some() {
            slot.busy = true;
        }
        Ok(made)
    }

    /// `take_pending`, as one vector.
    pub fn take_pending_vec(&mut self, handle: u32) -> Result<Vec<u8>, FanOutError> {
        self.take_pending(handle, Pending::take)
    }

    /// Discards the frames pending for `handle` that nothing of was written (all but the
    /// first pending chunk, which may be a frame's rest), freeing their share of the budget;
    /// returns how many bytes that freed. For a connection being closed as slow: what it
    /// did receive stays a run of whole frames, and its close frame can follow.
    pub fn discard_pending(&mut self, handle: u32) -> Result<usize, FanOutError> {
        let slot = self.slot(handle)?;
        let mut freed = 0;
        while slot.pending.chunks.len() > 1 {
            let chunk = slot.pending.chunks.pop_back().expect("more than one chunk");
            slot.pending.len -= chunk.len();
            freed += chunk.len();
        }
        // Gathered frames (while corked) are not written yet either; none of them counts.
        slot.gathered.clear();
        slot.gathered_bytes = 0;
        self.free(freed);
        Ok(freed)
    }

    // -- corking ---------------------------------------------------------------------------

    /// From now on frames to free connections are gathered, not sent, until `uncork`.
    pub fn cork(&mut self) {
        self.corked = true;
    }

    pub fn corked(&self) -> bool {
        self.corked
    }

    /// Sends what was gathered since `cork`, one write per connection. Returns the handles
    /// whose writer must run: written in part, would block, held or busy meanwhile (their
    /// gathered bytes are pending, to be written before anything queued).
    pub fn uncork(&mut self) -> Vec<u32> {
        self.uncork_with(|write| write())
    }

    /// `uncork`, where the writes spread over several threads run inside `around` (which
    /// must call `write`, once): the binding lets other Python threads run meanwhile. Not
    /// called when everything is written on the calling thread.
    pub fn uncork_with(&mut self, around: impl FnOnce(&mut (dyn FnMut() + Send))) -> Vec<u32> {
        self.corked = false;
        let mut woken = Vec::new();
        let arena = std::mem::take(&mut self.arena);
        let mut to_write = Vec::new();
        for handle in std::mem::take(&mut self.dirty) {
            let slot = &mut self.slots[handle as usize];
            if !slot.open || slot.gathered.is_empty() {
                continue; // closed, reused, or its writer took the bytes already
            }
            if slot.held || slot.busy || slot.sink.is_none() {
                let moved = slot.pend_gathered(&arena);
                self.backlog += moved;
                self.budget.add(moved);
                woken.push(handle);
                continue;
            }
            to_write.push(handle);
        }
        // (A handle closed and opened again while corked can be listed twice.)
        to_write.sort_unstable();
        to_write.dedup();
        let threads = self.threads.min(to_write.len() / PER_THREAD_MIN).max(1);
        let mut slots: Vec<(u32, &mut Slot<S>)> = Vec::with_capacity(to_write.len());
        let mut wanted = to_write.iter().peekable();
        for (handle, slot) in self.slots.iter_mut().enumerate() {
            if wanted.peek() == Some(&&(handle as u32)) {
                wanted.next();
                slots.push((handle as u32, slot));
            }
        }
        let outcome = if threads == 1 {
            write_all(&mut slots, &arena)
        } else {
            // The system calls are most of the work: spread them over threads (only the
            // slots and the arena are touched).
            self.threaded_uncorks += 1;
            let size = slots.len().div_ceil(threads);
            let mut total = Written::default();
            around(&mut || {
                std::thread::scope(|scope| {
                    let arena = &arena;
                    let workers: Vec<_> = slots
                        .chunks_mut(size)
                        .map(|chunk| scope.spawn(move || write_all(chunk, arena)))
                        .collect();
                    for worker in workers {
                        total.add(worker.join().expect("a fan-out writer thread panicked"));
                    }
                });
            });
            total
        };
        woken.extend(outcome.woken);
        self.backlog += outcome.pended;
        self.budget.add(outcome.pended);
        self.writes += outcome.writes;
        self.partial_writes += outcome.partial;
        self.refused_writes += outcome.refused;
        self.arena = arena;
        self.arena.clear(); // keeps its capacity
        self.frame_in_arena = None;
        woken
    }

    /// Threads `uncork` spreads its socket writes over (at least PER_THREAD_MIN
    /// connections each); 1: all on the calling thread.
    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn set_threads(&mut self, threads: usize) -> Result<(), FanOutError> {
        if !(1..=MAX_THREADS).contains(&threads) {
            return Err(FanOutError::Threads(threads));
        }
        self.threads = threads;
        Ok(())
    }

    // -- subscriptions ---------------------------------------------------------------------

    /// Channel subscription `sub_id` (of the hub's matcher) belongs to `handle`.
    pub fn subscribe(&mut self, sub_id: u64, handle: u32) -> Result<(), FanOutError> {
        self.slot(handle)?;
        self.subs.insert(sub_id, handle);
        Ok(())
    }

    /// Forgets channel subscription `sub_id`; returns whether it was known.
    pub fn unsubscribe(&mut self, sub_id: u64) -> bool {
        self.subs.remove(&sub_id).is_some()
    }

    /// `handle` holds row subscription `sub_id` (of the hub's row matcher; several
    /// connections may hold one). Once per pair.
    pub fn subscribe_rows(&mut self, sub_id: u64, handle: u32) -> Result<(), FanOutError> {
        self.slot(handle)?;
        let holders = self.rows.entry(sub_id).or_default();
        if holders.contains(&handle) {
            return Err(FanOutError::RowSubscriptionHeld { sub_id, handle });
        }
        holders.push(handle);
        Ok(())
    }

    /// `handle` no longer holds row subscription `sub_id`; returns whether it did.
    pub fn unsubscribe_rows(&mut self, sub_id: u64, handle: u32) -> bool {
        let Some(holders) = self.rows.get_mut(&sub_id) else {
            return false;
        };
        let Some(at) = holders.iter().position(|&h| h == handle) else {
            return false;
        };
        holders.swap_remove(at);
        if holders.is_empty() {
            self.rows.remove(&sub_id);
        }
        true
    }

    // -- delivery --------------------------------------------------------------------------

    /// Delivers `payload` (framed as one WebSocket text frame, built once) to the connection
    /// of every channel subscription in `subs` (the ids the hub's matcher matched; ids
    /// unknown here are skipped: a row subscription's join, or not the hub's) once, except
    /// `skip`.
    pub fn publish(&mut self, subs: &[u64], payload: &[u8], skip: Option<u32>) -> Delivery {
        let recipients: Vec<u32> = subs
            .iter()
            .filter_map(|s| self.subs.get(s).copied())
            .collect();
        self.deliver_once(recipients, payload, skip)
    }

    /// Delivers a row event's `payload` (one WebSocket text frame, built once) to every
    /// connection holding one of the row subscriptions `ids`, and to the connection of
    /// every channel subscription in `channel_subs` (plain joins of the table's channel),
    /// once each. Slow handles include connections without a socket (their transport's
    /// codec makes their frame).
    pub fn publish_rows(&mut self, ids: &[u64], channel_subs: &[u64], payload: &[u8]) -> Delivery {
        let mut recipients = Vec::new();
        for sub_id in ids {
            recipients.extend(self.rows.get(sub_id).into_iter().flatten().copied());
        }
        recipients.extend(
            channel_subs
                .iter()
                .filter_map(|s| self.subs.get(s).copied()),
        );
        self.deliver_once(recipients, payload, None)
    }

    /// Delivers `payload` (one WebSocket text frame) to each of `handles` (distinct, open).
    pub fn send(&mut self, handles: &[u32], payload: &[u8]) -> Result<Delivery, FanOutError> {
        for &handle in handles {
            self.slot(handle)?;
        }
        Ok(self.deliver_once(handles.to_vec(), payload, None))
    }

    /// Counters: frames and payload bytes taken directly, sink writes, partial and refused
    /// writes, frames handed back because a backlog was full (overflows), uncorks that
    /// wrote on several threads, open handles, attached sockets, channel and row
    /// subscriptions.
    pub fn stats(&self) -> Stats {
        Stats {
            direct_frames: self.direct_frames,
            direct_bytes: self.direct_bytes,
            writes: self.writes,
            partial_writes: self.partial_writes,
            refused_writes: self.refused_writes,
            overflows: self.overflows,
            budget_overflows: self.budget_overflows,
            backlog_bytes: self.backlog,
            threaded_uncorks: self.threaded_uncorks,
            row_subscriptions: self.rows.len(),
            handles: self.slots.iter().filter(|s| s.open).count(),
            attached: self.slots.iter().filter(|s| s.sink.is_some()).count(),
            subscriptions: self.subs.len(),
        }
    }

    // -- inside ----------------------------------------------------------------------------

    fn slot(&mut self, handle: u32) -> Result<&mut Slot<S>, FanOutError> {
        match self.slots.get_mut(handle as usize) {
            Some(slot) if slot.open => Ok(slot),
            _ => Err(FanOutError::UnknownHandle(handle)),
        }
    }

    /// Frees what `handle` holds against the budget (it is being detached or closed).
    fn free_backlog(&mut self, handle: u32) -> Result<(), FanOutError> {
        let held = self.slot(handle)?.backlog();
        self.free(held);
        Ok(())
    }

    /// `size` bytes of the backlog are gone (written or discarded).
    fn free(&mut self, size: usize) {
        self.backlog -= size;
        let freed = self.budget.sub(size);
        debug_assert!(freed, "the fan-out frees bytes the budget does not hold");
    }

    /// Delivers `payload` (framed once) to each of `recipients` once (a handle listed twice
    /// gets it once), except `skip`.
    fn deliver_once(
        &mut self,
        recipients: Vec<u32>,
        payload: &[u8],
        skip: Option<u32>,
    ) -> Delivery {
        self.generation += 1;
        let generation = self.generation;
        self.set_frame(payload);
        let mut delivery = Delivery::default();
        for handle in recipients {
            let slot = &mut self.slots[handle as usize];
            if slot.stamp == generation || skip == Some(handle) {
                continue;
            }
            slot.stamp = generation;
            delivery.written += usize::from(self.deliver(handle, payload.len(), &mut delivery));
        }
        delivery
    }

    /// Builds the frame the next deliveries write.
    fn set_frame(&mut self, payload: &[u8]) {
        text_frame(payload, &mut self.frame);
        self.frame_in_arena = None;
        self.frame_shared = None;
    }

    /// Writes the frame in `self.frame` to `handle`, or appends it to the handle's pending
    /// bytes (corked, or its writer is busy, or the socket would block); sorts the handle
    /// into slow (the hub queues the frame) or woken (its writer must run). Returns whether
    /// the fan-out took the frame.
    fn deliver(&mut self, handle: u32, payload_len: usize, out: &mut Delivery) -> bool {
        let slot = &mut self.slots[handle as usize];
        if slot.held || slot.sink.is_none() {
            out.slow.push(handle);
            return false;
        }
        if self.corked || slot.busy {
            let backlog = slot.pending.len() + slot.gathered_bytes;
            let full = backlog > 0 && backlog + self.frame.len() > slot.limit;
            // A busy connection's frame becomes backlog at once, so the budget must have
            // room for it. (A corked one's is gathered, counted once written or pending.)
            let over = !full && slot.busy && !self.budget.fits(self.frame.len());
            if full || over {
                // The backlog (or the budget) is full: the hub's outbox and its
                // slow-consumer policy take over (it holds the connection as it queues the
                // frame).
                slot.held = true;
                self.overflows += 1;
                self.budget_overflows += u64::from(over);
                out.slow.push(handle);
                return false;
            }
            if backlog == 0 {
                if self.corked {
                    self.dirty.push(handle);
                } else {
                    out.woken.push(handle); // its writer takes the pending bytes next
                }
            }
            if slot.busy {
                slot.pending
                    .push(shared(&self.frame, &mut self.frame_shared));
                self.backlog += self.frame.len();
                self.budget.add(self.frame.len());
            } else {
                // Corked: the frame goes into the arena once, the slot keeps its range.
                let (start, end) = *self.frame_in_arena.get_or_insert_with(|| {
                    let start = self.arena.len();
                    self.arena.extend_from_slice(&self.frame);
                    (start, self.arena.len())
                });
                match slot.gathered.last_mut() {
                    Some(last) if last.1 == start => last.1 = end,
                    _ => slot.gathered.push((start, end)),
                }
                slot.gathered_bytes += end - start;
            }
        } else {
            // Not busy: nothing is pending, so whatever is pending after the write is new.
            match slot.write_frame(&self.frame, &mut self.writes) {
                Write::Done => {}
                Write::Partial => {
                    self.partial_writes += 1;
                    // Half a frame is on the wire: the rest must follow, budget or not.
                    self.backlog += slot.pending.len();
                    self.budget.add(slot.pending.len());
                    out.woken.push(handle);
                }
                Write::Refused => {
                    self.refused_writes += 1;
                    if !self.budget.fits(self.frame.len()) {
                        // Nothing of it was written: the outbox takes it, under the budget.
                        slot.held = true;
                        self.overflows += 1;
                        self.budget_overflows += 1;
                        out.slow.push(handle);
                        return false;
                    }
                    slot.pending
                        .push(shared(&self.frame, &mut self.frame_shared));
                    self.backlog += self.frame.len();
                    self.budget.add(self.frame.len());
                    out.woken.push(handle);
                }
            }
        }
        self.direct_frames += 1;
        self.direct_bytes += payload_len as u64;
        true
    }

    /// Checks the accounting: the backlog is the sum of the slots' (pending and taken), and
    /// nothing is pending or gathered for a closed handle.
    #[cfg(test)]
    fn check_accounting(&self) {
        let sum: usize = self.slots.iter().map(Slot::backlog).sum();
        assert_eq!(self.backlog, sum, "backlog is the sum of the slots'");
        for slot in self.slots.iter().filter(|s| !s.open) {
            assert!(slot.sink.is_none() && slot.backlog() == 0 && slot.gathered.is_empty());
        }
        for slot in &self.slots {
            assert_eq!(
                slot.gathered_bytes,
                slot.gathered.iter().map(|(s, e)| e - s).sum::<usize>()
            );
            if !self.corked {
                assert!(slot.gathered.is_empty(), "gathered only while corked");
            }
        }
    }
}
