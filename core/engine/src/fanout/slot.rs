//! One connection's state in the fan-out, and writing to its sink.

use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice};
use std::sync::Arc;

use super::sink::{Sink, MAX_SLICES};

/// Bytes waiting for a connection's writer, oldest first: shared frames (a frame for many
/// busy connections is one allocation they all point to) and owned rests. The writer takes
/// them all at once (`FanOut::take_pending`): `len` bytes, copied out by `take_into`.
#[derive(Default)]
pub struct Pending {
    pub(super) chunks: VecDeque<Arc<[u8]>>,
    pub(super) len: usize,
}

impl Pending {
    pub(super) fn push(&mut self, chunk: Arc<[u8]>) {
        self.len += chunk.len();
        self.chunks.push_back(chunk);
    }

    pub(super) fn push_copy(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.push(Arc::from(bytes));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Copies everything into `out`, which must be exactly `len()` bytes, and forgets it.
    pub fn take_into(&mut self, out: &mut [u8]) {
        assert_eq!(
            out.len(),
            self.len,
            "take_into needs room for exactly len() bytes"
        );
        let mut at = 0;
        for chunk in self.chunks.drain(..) {
            out[at..at + chunk.len()].copy_from_slice(&chunk);
            at += chunk.len();
        }
        self.len = 0;
    }

    /// Everything, as one vector, forgotten here.
    pub fn take(&mut self) -> Vec<u8> {
        let mut out = vec![0; self.len];
        self.take_into(&mut out);
        out
    }
}

pub(super) struct Slot<S> {
    /// The socket (see `FdSink` for the descriptor rule), or None when not attached.
    pub sink: Option<S>,
    /// Writes go through the hub's outbox (and the transport's writer) until released.
    pub held: bool,
    /// The transport's writer owns the socket (it is writing `pending`): new frames are
    /// appended to `pending`, up to `limit` bytes, until it releases the socket.
    pub busy: bool,
    /// Bytes for the socket not written yet, oldest first: the rest of a frame the kernel
    /// took only part of, frames it refused (would block), frames gathered while corked or
    /// while the writer is busy. Always written before anything queued in the outbox.
    pub pending: Pending,
    /// The most `pending` (and `gathered`) may hold before frames are handed back to the
    /// hub's outbox.
    pub limit: usize,
    /// Bytes the writer took (`take_pending`) and is writing: still held, so still counted
    /// against the budget until it comes back for more (or releases the socket).
    pub taken: usize,
    /// While corked: the frames gathered for this connection, as ranges of the fan-out's
    /// arena (adjacent ones merged), written with one call at `uncork`.
    pub gathered: Vec<(usize, usize)>,
    pub gathered_bytes: usize,
    /// The publication number this connection last got a frame of (dedupes patterns).
    pub stamp: u64,
    pub open: bool,
}

impl<S> Slot<S> {
    pub fn closed() -> Self {
        Slot {
            sink: None,
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
    pub fn backlog(&self) -> usize {
        self.pending.len() + self.taken
    }

    /// Drops the sink (closing the fan-out's descriptor) and everything waiting for it.
    pub fn detach(&mut self) {
        self.sink = None;
        self.taken = 0;
        self.pending = Pending::default();
        self.gathered = Vec::new();
        self.gathered_bytes = 0;
        self.held = true;
        self.busy = false;
    }

    /// Moves the gathered frames (oldest bytes after `pending`) into `pending`; returns how
    /// many bytes that added there.
    pub fn pend_gathered(&mut self, arena: &[u8]) -> usize {
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
}

pub(super) enum Write {
    /// The whole frame is in the kernel's buffer.
    Done,
    /// Part of it is; the rest is appended to the slot's pending bytes and the slot is busy.
    Partial,
    /// Nothing was written (would block, or the socket failed); the slot is busy and the
    /// caller keeps the frame as pending bytes. A failed socket is the writer's to find.
    Refused,
}

/// Bytes a sink took of `total` (none on an error: see `Sink`), or None when interrupted.
fn taken(result: std::io::Result<usize>, total: usize) -> Option<usize> {
    match result {
        Ok(n) => Some(n.min(total)),
        Err(e) if e.kind() == ErrorKind::Interrupted => None,
        Err(_) => Some(0),
    }
}

impl<S: Sink> Slot<S> {
    /// Sends `frame` without blocking; see `Write`. The slot is attached and not busy, so
    /// nothing is pending: whatever is pending afterwards is the frame's.
    pub fn write_frame(&mut self, frame: &[u8], writes: &mut u64) -> Write {
        let sink = self.sink.as_mut().expect("only attached slots are written");
        let n = loop {
            *writes += 1;
            if let Some(n) = taken(sink.write_vectored(&[IoSlice::new(frame)]), frame.len()) {
                break n;
            }
        };
        if n == frame.len() {
            return Write::Done;
        }
        self.busy = true;
        if n == 0 {
            return Write::Refused;
        }
        self.pending.push_copy(&frame[n..]);
        Write::Partial
    }

    /// Writes the gathered frames (up to `MAX_SLICES` ranges a call) without blocking; what
    /// the sink does not take becomes pending bytes and the slot busy.
    pub fn write_gathered(&mut self, arena: &[u8], writes: &mut u64) -> Write {
        let sink = self.sink.as_mut().expect("only attached slots are written");
        let mut ranges = std::mem::take(&mut self.gathered);
        self.gathered_bytes = 0;
        let mut outcome = Write::Done;
        let mut bufs = Vec::with_capacity(ranges.len().min(MAX_SLICES));
        let mut at = 0;
        while at < ranges.len() {
            let chunk = &ranges[at..ranges.len().min(at + MAX_SLICES)];
            bufs.clear();
            bufs.extend(
                chunk
                    .iter()
                    .map(|&(start, end)| IoSlice::new(&arena[start..end])),
            );
            let total: usize = chunk.iter().map(|&(start, end)| end - start).sum();
            *writes += 1;
            let Some(n) = taken(sink.write_vectored(&bufs), total) else {
                continue;
            };
            if n == total {
                at += chunk.len();
                continue;
            }
            // The sink took `n` bytes: the rest of this chunk and every later one wait.
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

/// What writing gathered frames came to (see `write_all`).
#[derive(Default)]
pub(super) struct Written {
    pub woken: Vec<u32>,
    /// Bytes the sinks did not take, now pending.
    pub pended: usize,
    pub writes: u64,
    pub partial: u64,
    pub refused: u64,
}

impl Written {
    pub fn add(&mut self, other: Written) {
        self.woken.extend(other.woken);
        self.writes += other.writes;
        self.partial += other.partial;
        self.refused += other.refused;
        self.pended += other.pended;
    }
}

/// Writes each slot's gathered frames (on whichever thread `uncork` gave them to).
pub(super) fn write_all<S: Sink>(slots: &mut [(u32, &mut Slot<S>)], arena: &[u8]) -> Written {
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
