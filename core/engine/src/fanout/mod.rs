//! The fan-out write path: a publication's WebSocket frame is built once and written by this
//! module straight to the socket of every subscriber that can take it now, without a Python
//! step per recipient.
//!
//! Hand-written because it is the one place where no library fits: it has to share the hub's
//! subscription ids (the Rust matcher), the hub's per-connection ordering rules and trio's
//! sockets (by file descriptor).
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
//! being sent, and `uncork` sends each connection's frames with one sendmsg: a burst of publications (several client publishes in one read, a batch of row
//! changes) costs one system call per connection, not one per frame.
//!
//! The bytes waiting here (pending, and what a writer took and is writing) count against the
//! hub's `OutboxBudget`, shared with every connection's outbox: a frame that would become
//! backlog while the budget is full is handed back to the hub instead, whose outbox applies
//! the connection's slow-consumer policy against the same budget.
//!
//! Sockets are borrowed by descriptor number, not duplicated (a duplicate would double the
//! descriptors a hub needs, and descriptors are what limits connection counts): the hub
//! detaches a connection (`close`) when its transport ends it, before the transport closes
//! the socket, so a number the kernel reuses is never written to by mistake.

use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use pyo3::exceptions::{PyKeyError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use pyrt_engine::frame::text_frame;

use crate::{positioned_error, Matcher};

/// Bytes waiting for a connection's writer, oldest first: shared frames (a frame for many
/// busy connections is one allocation they all point to) and owned rests. `take` copies
/// them out once, as the outbox's writer used to join its frames.
#[derive(Default)]
struct Pending {
    chunks: VecDeque<Arc<[u8]>>,
    len: usize,
}

impl Pending {
    fn push(&mut self, chunk: Arc<[u8]>) {
        self.len += chunk.len();
        self.chunks.push_back(chunk);
    }

    fn push_copy(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.push(Arc::from(bytes));
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Copies everything into `out` (exactly `len` bytes) and forgets it.
    fn take_into(&mut self, out: &mut [u8]) {
        let mut at = 0;
        for chunk in self.chunks.drain(..) {
            out[at..at + chunk.len()].copy_from_slice(&chunk);
            at += chunk.len();
        }
        self.len = 0;
    }
}

/// The bytes held for clients across one hub and their limit (see `OutboxBudget`).
struct Counter {
    limit: usize,
    held: AtomicUsize,
}

impl Default for Counter {
    fn default() -> Self {
        Counter {
            limit: usize::MAX,
            held: AtomicUsize::new(0),
        }
    }
}

impl Counter {
    fn held(&self) -> usize {
        self.held.load(Relaxed)
    }

    /// Whether `size` more bytes stay within the limit.
    fn fits(&self, size: usize) -> bool {
        self.held().saturating_add(size) <= self.limit
    }

    fn add(&self, size: usize) {
        self.held.fetch_add(size, Relaxed);
    }

    /// Frees `size` bytes; false (and nothing changes) if fewer are held.
    fn sub(&self, size: usize) -> bool {
        self.held
            .fetch_update(Relaxed, Relaxed, |held| held.checked_sub(size))
            .is_ok()
    }
}

/// The bytes queued for the clients of one hub, against one limit (`[hub] outbox_total_bytes`):
/// every connection's outbox (the Python `Outbox` adds and frees what it queues) and fan-out
/// backlog (the fan-out made with it counts its own). Frozen, so both reach it without a
/// borrow; its counter is atomic only so that a frozen class may change it.
#[pyclass(frozen, module = "pyrt._core", name = "OutboxBudget")]
pub struct OutboxBudget {
    counter: Arc<Counter>,
}

#[pymethods]
impl OutboxBudget {
    #[new]
    fn new(limit: usize) -> PyResult<Self> {
        if limit == 0 {
            return Err(PyValueError::new_err("limit must be at least 1"));
        }
        Ok(OutboxBudget {
            counter: Arc::new(Counter {
                limit,
                held: AtomicUsize::new(0),
            }),
        })
    }

    /// The most bytes all outboxes and backlogs may hold together.
    #[getter]
    fn limit(&self) -> usize {
        self.counter.limit
    }

    /// The bytes they hold now.
    #[getter]
    fn held(&self) -> usize {
        self.counter.held()
    }

    /// Counts `delta` more bytes as held (negative: frees them). Freeing more than is held
    /// is a ValueError (and changes nothing): the caller's accounting is wrong.
    fn add(&self, delta: isize) -> PyResult<()> {
        if delta >= 0 {
            self.counter.add(delta.unsigned_abs());
        } else if !self.counter.sub(delta.unsigned_abs()) {
            return Err(PyValueError::new_err(format!(
                "frees {} bytes, but only {} are held",
                delta.unsigned_abs(),
                self.counter.held()
            )));
        }
        Ok(())
    }
}

/// The frame being delivered, shared: made once per frame for the connections that keep it.
fn shared(frame: &[u8], cache: &mut Option<Arc<[u8]>>) -> Arc<[u8]> {
    cache.get_or_insert_with(|| Arc::from(frame)).clone()
}

struct Slot {
    /// The socket (borrowed from the transport), or -1 when not attached.
    fd: RawFd,
    /// Writes go through the hub's outbox (and the transport's writer) until released.
    held: bool,
    /// The transport's writer owns the socket (it is writing `pending`): new frames are
    /// appended to `pending`, up to `limit` bytes, until it releases the socket.
    busy: bool,
    /// Bytes for the socket not written yet, oldest first: the rest of a frame the kernel
    /// took only part of, frames it refused (would block), frames gathered while corked or
    /// while the writer is busy. Always written before anything queued in the outbox.
    pending: Pending,
    /// The most `pending` (and `gathered`) may hold before frames are handed back to the
    /// hub's outbox.
    limit: usize,
    /// Bytes the writer took (`take_pending`) and is writing: still held, so still counted
    /// against the budget until it comes back for more (or releases the socket).
    taken: usize,
    /// While corked: the frames gathered for this connection, as ranges of the fan-out's
    /// arena (adjacent ones merged), written with one sendmsg at `uncork`.
    gathered: Vec<(usize, usize)>,
    gathered_bytes: usize,
    /// The publication number this connection last got a frame of (dedupes patterns).
    stamp: u64,
    open: bool,
}

impl Slot {
    fn closed() -> Self {
        Slot {
            fd: -1,
            held: true,
            busy: false,
            pending: Pending::default(),
            limit: 0,
            taken: 0,
            gathered: Vec::new(),
            gathered_bytes: 0,
            stamp: 0,
            open: false,
        }
    }

    /// Bytes held here that count against the budget: pending and taken.
    fn backlog(&self) -> usize {
        self.pending.len() + self.taken
    }

    fn detach(&mut self) {
        self.fd = -1;
        self.taken = 0;
        self.pending = Pending::default();
        self.gathered = Vec::new();
        self.gathered_bytes = 0;
        self.held = true;
        self.busy = false;
    }

    /// Moves the gathered frames (oldest bytes after `pending`) into `pending`; returns how
    /// many bytes that added there.
    fn pend_gathered(&mut self, arena: &[u8]) -> usize {
        let moved = self.gathered_bytes;
        let mut rest = Vec::with_capacity(moved);
        for &(start, end) in &self.gathered {
            rest.extend_from_slice(&arena[start..end]);
        }
        self.pending.push_copy(&rest);
        self.gathered.clear();
        self.gathered_bytes = 0;
        moved
    }

    /// Writes the gathered frames with sendmsg (up to IOV_MAX ranges a call) without
    /// blocking; what the kernel does not take becomes pending bytes and the slot busy.
    fn write_gathered(&mut self, arena: &[u8], writes: &mut u64) -> Write {
        let mut ranges = std::mem::take(&mut self.gathered);
        self.gathered_bytes = 0;
        let mut outcome = Write::Done;
        let mut at = 0;
        while at < ranges.len() {
            let chunk = &ranges[at..ranges.len().min(at + 1024)];
            let iov: Vec<libc::iovec> = chunk
                .iter()
                .map(|&(start, end)| libc::iovec {
                    iov_base: arena[start..end].as_ptr() as *mut libc::c_void,
                    iov_len: end - start,
                })
                .collect();
            let total: usize = iov.iter().map(|v| v.iov_len).sum();
            // SAFETY: a zeroed msghdr is valid; iov points at live slices of `arena`, which
            // sendmsg only reads; `self.fd` is open (detached before it is closed).
            *writes += 1;
            let n = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
                msg.msg_iovlen = iov.len() as _;
                libc::sendmsg(self.fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            };
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            let n = n.max(0) as usize;
            if n == total {
                at += chunk.len();
                continue;
            }
            // The kernel took `n` bytes: the rest of this chunk and every later one wait.
            outcome = if n == 0 && at == 0 {
                Write::Refused
            } else {
                Write::Partial
            };
            let mut skip = n;
            let mut rest = Vec::new();
            for &(start, end) in &ranges[at..] {
                let len = end - start;
                if skip >= len {
                    skip -= len;
                    continue;
                }
                rest.extend_from_slice(&arena[start + skip..end]);
                skip = 0;
            }
            self.pending.push_copy(&rest);
            self.busy = true;
            break;
        }
        ranges.clear();
        self.gathered = ranges; // keeps its capacity for the next cork
        outcome
    }
}

enum Write {
    /// The whole frame is in the kernel's buffer.
    Done,
    /// Part of it is; the rest is appended to the slot's pending bytes and the slot is busy.
    Partial,
    /// Nothing was written (would block, or the socket failed); the slot is busy and the
    /// caller keeps the frame as pending bytes. A failed socket is the writer's to find.
    Refused,
}

/// Sends `frame` without blocking; see `Write`.
fn write_frame(slot: &mut Slot, frame: &[u8], writes: &mut u64) -> Write {
    loop {
        *writes += 1;
        // SAFETY: `frame` is a live slice; `slot.fd` is open (detached before it is closed),
        // and send() on a descriptor touches no memory of ours beyond the slice.
        let n = unsafe {
            libc::send(
                slot.fd,
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            let n = n as usize;
            if n == frame.len() {
                return Write::Done;
            }
            slot.busy = true;
            if n == 0 {
                return Write::Refused;
            }
            slot.pending.push_copy(&frame[n..]);
            return Write::Partial;
        }
        if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        // Would block, or broken: the trio writer takes over (and sees any error itself).
        slot.busy = true;
        return Write::Refused;
    }
}

/// The hub's direct write path; see the module documentation and `pyrt/_hub.py`.
#[pyclass(module = "pyrt._core", name = "FanOut")]
#[derive(Default)]
pub struct FanOut {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Channel subscription id -> the handle of its connection.
    subs: HashMap<u64, u32>,
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
    /// send/sendmsg calls.
    writes: u64,
    partial_writes: u64,
    refused_writes: u64,
    overflows: u64,
    /// Of `overflows`, those because the budget was full (not the connection's own limit).
    budget_overflows: u64,
    /// The hub's budget for queued bytes, shared with its outboxes.
    budget: Arc<Counter>,
    /// The bytes of every slot's `backlog()` (its share of the budget).
    backlog: usize,
    threads: usize,
    threaded_uncorks: u64,
    /// Row subscription id (of the hub's row matcher) -> the handles holding it.
    rows: HashMap<u64, Vec<u32>>,
}

impl FanOut {
    /// Frees what `handle` holds against the budget (it is being detached or closed).
    fn free_backlog(&mut self, handle: u32) -> PyResult<()> {
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
    fn deliver_once<'py>(
        &mut self,
        py: Python<'py>,
        recipients: Vec<u32>,
        payload: &[u8],
        skip: Option<u32>,
    ) -> PyResult<Delivery<'py>> {
        self.generation += 1;
        let generation = self.generation;
        self.set_frame(payload);
        let (mut slow, mut woken, mut written) = (Vec::new(), Vec::new(), 0);
        for handle in recipients {
            let slot = &mut self.slots[handle as usize];
            if slot.stamp == generation || skip == Some(handle) {
                continue;
            }
            slot.stamp = generation;
            written += usize::from(self.deliver(handle, payload.len(), &mut slow, &mut woken));
        }
        Ok((PyList::new(py, slow)?, PyList::new(py, woken)?, written))
    }

    /// Builds the frame the next deliveries write.
    fn set_frame(&mut self, payload: &[u8]) {
        text_frame(payload, &mut self.frame);
        self.frame_in_arena = None;
        self.frame_shared = None;
    }

    fn slot(&mut self, handle: u32) -> PyResult<&mut Slot> {
        match self.slots.get_mut(handle as usize) {
            Some(slot) if slot.open => Ok(slot),
            _ => Err(PyKeyError::new_err(format!("no open handle {handle}"))),
        }
    }

    /// Writes the frame in `self.frame` to `handle`, or appends it to the handle's pending
    /// bytes (corked, or its writer is busy, or the socket would block); sorts the handle
    /// into slow (the hub queues the frame) or woken (its writer must run). Returns whether
    /// the fan-out took the frame.
    fn deliver(
        &mut self,
        handle: u32,
        payload_len: usize,
        slow: &mut Vec<u32>,
        woken: &mut Vec<u32>,
    ) -> bool {
        let slot = &mut self.slots[handle as usize];
        if slot.held || slot.fd < 0 {
            slow.push(handle);
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
                slow.push(handle);
                return false;
            }
            if backlog == 0 {
                if self.corked {
                    self.dirty.push(handle);
                } else {
                    woken.push(handle); // its writer takes the pending bytes next
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
            match write_frame(slot, &self.frame, &mut self.writes) {
                Write::Done => {}
                Write::Partial => {
                    self.partial_writes += 1;
                    // Half a frame is on the wire: the rest must follow, budget or not.
                    self.backlog += slot.pending.len();
                    self.budget.add(slot.pending.len());
                    woken.push(handle);
                }
                Write::Refused => {
                    self.refused_writes += 1;
                    if !self.budget.fits(self.frame.len()) {
                        // Nothing of it was written: the outbox takes it, under the budget.
                        slot.held = true;
                        self.overflows += 1;
                        self.budget_overflows += 1;
                        slow.push(handle);
                        return false;
                    }
                    slot.pending
                        .push(shared(&self.frame, &mut self.frame_shared));
                    self.backlog += self.frame.len();
                    self.budget.add(self.frame.len());
                    woken.push(handle);
                }
            }
        }
        self.direct_frames += 1;
        self.direct_bytes += payload_len as u64;
        true
    }
}

/// Connections a writer thread of `uncork` takes at least.
const PER_THREAD_MIN: usize = 256;

/// What writing gathered frames came to (see `write_all`).
#[derive(Default)]
struct Written {
    woken: Vec<u32>,
    /// Bytes the kernel did not take, now pending.
    pended: usize,
    writes: u64,
    partial: u64,
    refused: u64,
}

impl Written {
    fn add(&mut self, other: Written) {
        self.woken.extend(other.woken);
        self.writes += other.writes;
        self.partial += other.partial;
        self.refused += other.refused;
        self.pended += other.pended;
    }
}

/// Writes each slot's gathered frames (on whichever thread `uncork` gave them to).
fn write_all(slots: &mut [(u32, &mut Slot)], arena: &[u8]) -> Written {
    let mut out = Written::default();
    for (handle, slot) in slots.iter_mut() {
        let before = slot.pending.len();
        let outcome = slot.write_gathered(arena, &mut out.writes);
        out.pended += slot.pending.len() - before;
        match outcome {
            Write::Done => {}
            Write::Partial => {
                out.partial += 1;
                out.woken.push(*handle);
            }
            Write::Refused => {
                out.refused += 1;
                out.woken.push(*handle);
            }
        }
    }
    out
}

/// The channel subscription ids `channel` matches (the matcher's scratch list) and the
/// seconds matching took.
fn match_channel<'m>(
    py: Python<'_>,
    matcher: &'m mut Matcher,
    channel: &str,
) -> PyResult<(&'m [u64], f64)> {
    let started = Instant::now();
    matcher.scratch.clear();
    matcher
        .inner
        .match_channel(channel, &mut matcher.scratch)
        .map_err(|e| positioned_error(py, "ChannelNameError", &e.reason, e.position))?;
    Ok((&matcher.scratch, started.elapsed().as_secs_f64()))
}

/// (slow handles, woken handles, frames written directly).
type Delivery<'py> = (Bound<'py, PyList>, Bound<'py, PyList>, usize);

#[pymethods]
impl FanOut {
    /// `budget`: the hub's budget for queued bytes, shared with its outboxes (default: none).
    #[new]
    #[pyo3(signature = (budget = None))]
    fn new(budget: Option<&Bound<'_, OutboxBudget>>) -> Self {
        FanOut {
            threads: 1,
            budget: budget.map_or_else(Arc::default, |b| b.get().counter.clone()),
            ..Self::default()
        }
    }

    /// A handle for a new connection: not attached, so everything to it is handed back.
    fn open(&mut self) -> u32 {
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

    /// Forgets `handle` (detaching its socket); unsubscribe its subscriptions first.
    fn close(&mut self, handle: u32) -> PyResult<()> {
        self.free_backlog(handle)?;
        let slot = self.slot(handle)?;
        slot.detach();
        *slot = Slot::closed();
        self.free.push(handle);
        Ok(())
    }

    /// Lets this module write to the socket `fd` for `handle` (which starts held: its writer
    /// releases it), keeping at most `limit` bytes pending for it (more go to the hub's
    /// outbox). The descriptor is borrowed: `detach` or `close` the handle before the
    /// socket is closed.
    #[pyo3(signature = (handle, fd, limit = 1 << 22))]
    fn attach(&mut self, handle: u32, fd: RawFd, limit: usize) -> PyResult<()> {
        let slot = self.slot(handle)?;
        if slot.fd >= 0 {
            return Err(PyValueError::new_err(format!(
                "handle {handle} is attached already"
            )));
        }
        let mut kind: libc::c_int = 0;
        let mut size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `size` bytes into `kind`, a c_int we own.
        let got = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                (&mut kind as *mut libc::c_int).cast(),
                &mut size,
            )
        };
        if got < 0 || kind != libc::SOCK_STREAM {
            let why = if got < 0 {
                std::io::Error::last_os_error().to_string()
            } else {
                "not a stream socket".to_owned()
            };
            return Err(PyOSError::new_err(format!("cannot attach {fd}: {why}")));
        }
        slot.fd = fd;
        slot.held = true;
        slot.limit = limit;
        Ok(())
    }

    /// Stops direct writes to `handle` (pending bytes are discarded). Call it (or `close`)
    /// before the transport closes the socket.
    fn detach(&mut self, handle: u32) -> PyResult<()> {
        self.free_backlog(handle)?;
        self.slot(handle)?.detach();
        Ok(())
    }

    /// Discards the frames pending for `handle` that nothing of was written (all but the
    /// first pending chunk, which may be a frame's rest), freeing their share of the budget;
    /// returns how many bytes that freed. For a connection being closed as slow: what it
    /// did receive stays a run of whole frames, and its close frame can follow.
    fn discard_pending(&mut self, handle: u32) -> PyResult<usize> {
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

    /// Whether `handle` has a socket attached.
    fn attached(&mut self, handle: u32) -> PyResult<bool> {
        Ok(self.slot(handle)?.fd >= 0)
    }

    /// Whether frames to `handle` go through its outbox now.
    fn held(&mut self, handle: u32) -> PyResult<bool> {
        Ok(self.slot(handle)?.held)
    }

    /// Frames to `handle` go through its outbox from now on (the hub queued one there).
    fn hold(&mut self, handle: u32) -> PyResult<()> {
        self.slot(handle)?.held = true;
        Ok(())
    }

    /// Direct writes to `handle` may resume: its writer has written everything queued.
    /// Returns False (and nothing changes) when it is not attached or has pending bytes.
    /// Either way, what the writer took is written: it no longer counts against the budget.
    fn release(&mut self, handle: u32) -> PyResult<bool> {
        let slot = self.slot(handle)?;
        let written = std::mem::take(&mut slot.taken);
        self.free(written);
        let slot = &mut self.slots[handle as usize];
        if slot.fd < 0 || !slot.pending.is_empty() {
            return Ok(false);
        }
        slot.held = false;
        slot.busy = false;
        Ok(true)
    }

    /// Whether the writer of `handle` owns its socket (frames are appended to its pending
    /// bytes until `release`).
    fn busy(&mut self, handle: u32) -> PyResult<bool> {
        Ok(self.slot(handle)?.busy)
    }

    /// Bytes pending for `handle`.
    fn pending_bytes(&mut self, handle: u32) -> PyResult<usize> {
        Ok(self.slot(handle)?.pending.len())
    }

    /// Bytes held for every connection: pending, and taken by writers still writing them
    /// (this fan-out's share of the budget).
    #[getter]
    fn backlog_bytes(&self) -> usize {
        self.backlog
    }

    /// The pending bytes of `handle`, oldest first, to be written before anything queued
    /// (empty if none). From now until `release`, its writer owns the socket: frames to it
    /// are appended to its pending bytes (up to its limit), not sent. The bytes count
    /// against the budget until the writer comes back (`take_pending` again, or `release`):
    /// by then it has written them.
    fn take_pending<'py>(&mut self, py: Python<'py>, handle: u32) -> PyResult<Bound<'py, PyBytes>> {
        self.slot(handle)?;
        let slot = &mut self.slots[handle as usize];
        let moved = slot.pend_gathered(&self.arena);
        let written = std::mem::replace(&mut slot.taken, slot.pending.len());
        self.backlog += moved;
        self.budget.add(moved);
        self.free(written);
        let slot = &mut self.slots[handle as usize];
        let pending = PyBytes::new_with(py, slot.pending.len(), |out| {
            slot.pending.take_into(out);
            Ok(())
        })?;
        if slot.pending.chunks.capacity() > 1024 {
            slot.pending = Pending::default(); // a past backlog's memory is not kept
        }
        if slot.fd >= 0 {
            slot.busy = true;
        }
        Ok(pending)
    }

    /// From now on frames to free connections are gathered, not sent, until `uncork`.
    fn cork(&mut self) {
        self.corked = true;
    }

    /// Sends what was gathered since `cork`, one write per connection. Returns the handles
    /// whose writer must run: written in part, would block, held or busy meanwhile (their
    /// gathered bytes are pending, to be written before anything queued).
    fn uncork<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        self.corked = false;
        let mut woken = Vec::new();
        let arena = std::mem::take(&mut self.arena);
        let mut to_write = Vec::new();
        for handle in std::mem::take(&mut self.dirty) {
            let slot = &mut self.slots[handle as usize];
            if !slot.open || slot.gathered.is_empty() {
                continue; // closed, reused, or its writer took the bytes already
            }
            if slot.held || slot.busy || slot.fd < 0 {
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
        let mut slots: Vec<(u32, &mut Slot)> = Vec::with_capacity(to_write.len());
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
            // The system calls are most of the work: spread them over threads, without the
            // GIL (only the slots and the arena are touched: no Python object).
            let size = slots.len().div_ceil(threads);
            self.threaded_uncorks += 1;
            py.detach(|| {
                std::thread::scope(|scope| {
                    let arena = &arena;
                    let workers: Vec<_> = slots
                        .chunks_mut(size)
                        .map(|chunk| scope.spawn(move || write_all(chunk, arena)))
                        .collect();
                    let mut total = Written::default();
                    for worker in workers {
                        total.add(worker.join().expect("a fan-out writer thread panicked"));
                    }
                    total
                })
            })
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
        PyList::new(py, woken)
    }

    /// Threads `uncork` spreads its socket writes over (at least PER_THREAD_MIN
    /// connections each); 1: all on the calling thread.
    #[getter]
    fn get_threads(&self) -> usize {
        self.threads
    }

    #[setter]
    fn set_threads(&mut self, threads: usize) -> PyResult<()> {
        if !(1..=64).contains(&threads) {
            return Err(PyValueError::new_err("threads must be 1..64"));
        }
        self.threads = threads;
        Ok(())
    }

    /// Channel subscription `sub_id` (of the hub's matcher) belongs to `handle`.
    fn subscribe(&mut self, sub_id: u64, handle: u32) -> PyResult<()> {
        self.slot(handle)?;
        self.subs.insert(sub_id, handle);
        Ok(())
    }

    /// Forgets channel subscription `sub_id`; returns whether it was known.
    fn unsubscribe(&mut self, sub_id: u64) -> bool {
        self.subs.remove(&sub_id).is_some()
    }

    /// `handle` holds row subscription `sub_id` (of the hub's row matcher; several
    /// connections may hold one). Once per pair: a second call is a ValueError.
    fn subscribe_rows(&mut self, sub_id: u64, handle: u32) -> PyResult<()> {
        self.slot(handle)?;
        let holders = self.rows.entry(sub_id).or_default();
        if holders.contains(&handle) {
            return Err(PyValueError::new_err(format!(
                "handle {handle} holds row subscription {sub_id} already"
            )));
        }
        holders.push(handle);
        Ok(())
    }

    /// `handle` no longer holds row subscription `sub_id`; returns whether it did.
    fn unsubscribe_rows(&mut self, sub_id: u64, handle: u32) -> bool {
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

    /// Matches `channel` with `matcher` and delivers `payload` (framed as one WebSocket text
    /// frame, built once) to every subscribed connection once, except `skip`. Returns the
    /// handles handed back to the hub (slow: queue the frame there) and the handles with
    /// pending bytes (woken: their writer must run), how many frames it wrote directly, and
    /// the seconds spent matching.
    #[pyo3(signature = (matcher, channel, payload, skip = None))]
    fn publish<'py>(
        &mut self,
        py: Python<'py>,
        mut matcher: PyRefMut<'_, Matcher>,
        channel: &str,
        payload: &[u8],
        skip: Option<u32>,
    ) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>, usize, f64)> {
        let (subs, matched) = match_channel(py, &mut matcher, channel)?;
        // (A subscription id unknown here is a row subscription's join, or not the hub's.)
        let recipients: Vec<u32> = subs
            .iter()
            .filter_map(|s| self.subs.get(s).copied())
            .collect();
        let (slow, woken, written) = self.deliver_once(py, recipients, payload, skip)?;
        Ok((slow, woken, written, matched))
    }

    /// Delivers a row event's `payload` (one WebSocket text frame, built once) to every
    /// connection holding one of the row subscriptions `ids` and, when `channel` is given,
    /// to every connection joined to that channel (matched with `matcher`), once each.
    /// Returns (slow, woken, written, seconds matching) as `publish` does; slow handles
    /// include connections without a socket (their transport's codec makes their frame).
    #[pyo3(signature = (ids, payload, matcher = None, channel = None))]
    fn publish_rows<'py>(
        &mut self,
        py: Python<'py>,
        ids: Vec<u64>,
        payload: &[u8],
        matcher: Option<PyRefMut<'_, Matcher>>,
        channel: Option<&str>,
    ) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>, usize, f64)> {
        let mut recipients = Vec::new();
        for sub_id in &ids {
            recipients.extend(self.rows.get(sub_id).into_iter().flatten().copied());
        }
        let mut matched = 0.0;
        if let (Some(mut matcher), Some(channel)) = (matcher, channel) {
            let (subs, seconds) = match_channel(py, &mut matcher, channel)?;
            recipients.extend(subs.iter().filter_map(|s| self.subs.get(s).copied()));
            matched = seconds;
        }
        let (slow, woken, written) = self.deliver_once(py, recipients, payload, None)?;
        Ok((slow, woken, written, matched))
    }

    /// Delivers `payload` (one WebSocket text frame) to each of `handles` (distinct, open);
    /// returns (slow, woken, written) as `publish` does.
    fn send<'py>(
        &mut self,
        py: Python<'py>,
        handles: Vec<u32>,
        payload: &[u8],
    ) -> PyResult<Delivery<'py>> {
        for &handle in &handles {
            self.slot(handle)?;
        }
        self.deliver_once(py, handles, payload, None)
    }

    /// Counters: frames and payload bytes taken directly, socket writes (system calls),
    /// partial and refused writes, frames handed back because a backlog was full
    /// (overflows), uncorks that wrote on several threads, open handles, attached
    /// sockets, channel and row subscriptions.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("direct_frames", self.direct_frames)?;
        d.set_item("writes", self.writes)?;
        d.set_item("direct_bytes", self.direct_bytes)?;
        d.set_item("partial_writes", self.partial_writes)?;
        d.set_item("refused_writes", self.refused_writes)?;
        d.set_item("overflows", self.overflows)?;
        d.set_item("budget_overflows", self.budget_overflows)?;
        d.set_item("backlog_bytes", self.backlog)?;
        d.set_item("threaded_uncorks", self.threaded_uncorks)?;
        d.set_item("row_subscriptions", self.rows.len())?;
        d.set_item("handles", self.slots.iter().filter(|s| s.open).count())?;
        d.set_item("attached", self.slots.iter().filter(|s| s.fd >= 0).count())?;
        d.set_item("subscriptions", self.subs.len())?;
        Ok(d)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<OutboxBudget>()?;
    m.add_class::<FanOut>()
}
