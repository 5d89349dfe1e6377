//! The fan-out against a fake socket whose every call follows a script: takes everything,
//! takes part, would block, is interrupted, or finds the peer gone. Unit tests for each rule,
//! then a property test that drives the fan-out as the hub does (publications, the hub's own
//! frames through the outbox, corking, writer turns, closes) and checks that every
//! connection receives exactly its frames in publish order and that the budget returns to
//! zero.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, IoSlice};
use std::sync::{Arc, Mutex, MutexGuard};

use proptest::prelude::*;

use super::*;

// -- a fake socket --------------------------------------------------------------------------

/// What one call of a fake socket does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Takes everything.
    All,
    /// Takes at most this many bytes (none: `Ok(0)`).
    Take(usize),
    WouldBlock,
    Interrupted,
    /// The peer is gone (EPIPE).
    Broken,
}

/// What a fake socket's peer received, and how the socket was called.
#[derive(Default)]
struct Wire {
    bytes: Vec<u8>,
    calls: usize,
    most_slices: usize,
    dropped: bool,
}

/// A socket whose calls follow `script`, over and over.
struct Fake {
    wire: Arc<Mutex<Wire>>,
    script: Vec<Step>,
    at: usize,
}

#[derive(Clone)]
struct Peer(Arc<Mutex<Wire>>);

impl Peer {
    fn wire(&self) -> MutexGuard<'_, Wire> {
        self.0.lock().unwrap()
    }

    /// (calls, most slices in one call): one lock, so both can be read in one expression.
    fn calls(&self) -> (usize, usize) {
        let wire = self.wire();
        (wire.calls, wire.most_slices)
    }

    fn bytes(&self) -> Vec<u8> {
        self.wire().bytes.clone()
    }

    /// The transport's writer writes `data` (trio's send_all: all of it, in the end).
    fn write(&self, data: &[u8]) {
        self.wire().bytes.extend_from_slice(data);
    }
}

fn fake(script: &[Step]) -> (Fake, Peer) {
    assert!(script.iter().any(|s| *s != Step::Interrupted));
    let wire = Arc::new(Mutex::new(Wire::default()));
    let sink = Fake {
        wire: wire.clone(),
        script: script.to_vec(),
        at: 0,
    };
    (sink, Peer(wire))
}

impl Sink for Fake {
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut wire = self.wire.lock().unwrap();
        assert!(
            !bufs.is_empty() && bufs.len() <= MAX_SLICES,
            "{} slices",
            bufs.len()
        );
        wire.calls += 1;
        wire.most_slices = wire.most_slices.max(bufs.len());
        let step = self.script[self.at % self.script.len()];
        self.at += 1;
        let room = match step {
            Step::All => usize::MAX,
            Step::Take(n) => n,
            Step::WouldBlock => return Err(ErrorKind::WouldBlock.into()),
            Step::Interrupted => return Err(ErrorKind::Interrupted.into()),
            Step::Broken => return Err(ErrorKind::BrokenPipe.into()),
        };
        let mut took = 0;
        for buf in bufs {
            let n = (room - took).min(buf.len());
            wire.bytes.extend_from_slice(&buf[..n]);
            took += n;
            if n < buf.len() {
                break;
            }
        }
        Ok(took)
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        // (Poisoned when a test failed while holding it: say it is dropped all the same.)
        let mut wire = self.wire.lock().unwrap_or_else(|e| e.into_inner());
        wire.dropped = true;
    }
}

// -- helpers --------------------------------------------------------------------------------

fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    text_frame(payload, &mut out);
    out
}

/// The payloads of the whole frames at the start of `bytes`, and the bytes after them (a
/// frame cut short).
fn parse(mut bytes: &[u8]) -> (Vec<Vec<u8>>, &[u8]) {
    let mut frames = Vec::new();
    loop {
        if bytes.len() < 2 {
            return (frames, bytes);
        }
        assert_eq!(bytes[0], 0x81, "not a final text frame");
        let (len, start) = match bytes[1] {
            126 if bytes.len() >= 4 => (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4),
            127 if bytes.len() >= 10 => {
                let len = u64::from_be_bytes(bytes[2..10].try_into().unwrap());
                (usize::try_from(len).unwrap(), 10)
            }
            126 | 127 => return (frames, bytes),
            n => (usize::from(n), 2),
        };
        if bytes.len() < start + len {
            return (frames, bytes);
        }
        frames.push(bytes[start..start + len].to_vec());
        bytes = &bytes[start + len..];
    }
}

/// Every frame in `bytes`, which holds whole frames only.
fn frames(bytes: &[u8]) -> Vec<Vec<u8>> {
    let (frames, rest) = parse(bytes);
    assert!(rest.is_empty(), "{} bytes of a frame cut short", rest.len());
    frames
}

fn payloads(texts: &[&str]) -> Vec<Vec<u8>> {
    texts.iter().map(|t| t.as_bytes().to_vec()).collect()
}

fn delivery(slow: &[u32], woken: &[u32], written: usize) -> Delivery {
    Delivery {
        slow: slow.to_vec(),
        woken: woken.to_vec(),
        written,
    }
}

/// A new handle with `sink` attached and released: frames go straight to it.
fn free_handle(fanout: &mut FanOut<Fake>, sink: Fake, limit: usize) -> u32 {
    let handle = fanout.open();
    fanout.attach(handle, sink, limit).unwrap();
    assert!(fanout.release(handle).unwrap());
    handle
}

const LIMIT: usize = 1 << 22;

// -- writing one frame ----------------------------------------------------------------------

#[test]
fn a_frame_goes_straight_to_free_sockets_and_the_others_are_handed_back() {
    let mut fanout = FanOut::default();
    let (a, peer_a) = fake(&[Step::All]);
    let (b, peer_b) = fake(&[Step::All]);
    let ha = free_handle(&mut fanout, a, LIMIT);
    let hb = fanout.open();
    fanout.attach(hb, b, LIMIT).unwrap(); // attached, but held until its writer releases it
    let hc = fanout.open(); // no socket: an SSE connection
    assert!(fanout.held(hb).unwrap());
    assert!(!fanout.release(hc).unwrap()); // not attached: never released
    assert_eq!(
        fanout.send(&[ha, hb, hc], b"hello").unwrap(),
        delivery(&[hb, hc], &[], 1)
    );
    assert_eq!(peer_a.bytes(), framed(b"hello"));
    assert_eq!(peer_b.bytes(), b"");
    let stats = fanout.stats();
    assert_eq!(
        (stats.direct_frames, stats.direct_bytes, stats.writes),
        (1, 5, 1)
    );
    assert_eq!((stats.handles, stats.attached), (3, 2));
}

#[test]
fn a_partial_write_keeps_the_rest_and_wakes_the_writer_once() {
    let mut fanout = FanOut::default();
    let (sink, peer) = fake(&[Step::Take(5), Step::All]);
    let handle = free_handle(&mut fanout, sink, LIMIT);
    let first = vec![b'x'; 300];
    assert_eq!(
        fanout.send(&[handle], &first).unwrap(),
        delivery(&[], &[handle], 1)
    );
    assert_eq!(peer.bytes(), framed(&first)[..5]);
    assert!(fanout.busy(handle).unwrap());
    assert!(!fanout.held(handle).unwrap());
    assert!(!fanout.release(handle).unwrap()); // not while bytes are pending
    let rest = framed(&first).len() - 5;
    assert_eq!(fanout.pending_bytes(handle).unwrap(), rest);
    assert_eq!(fanout.backlog_bytes(), rest);
    assert_eq!(fanout.budget().held(), rest);
    // Busy: appended, not written (the socket is not called), and nobody is woken again.
    assert_eq!(
        fanout.send(&[handle], b"next").unwrap(),
        delivery(&[], &[], 1)
    );
    assert_eq!(peer.wire().calls, 1);
    let taken = fanout.take_pending_vec(handle).unwrap();
    peer.write(&taken);
    assert_eq!(frames(&peer.bytes()), [first, b"next".to_vec()]);
    assert_eq!(fanout.backlog_bytes(), taken.len()); // the writer is writing them
    assert!(fanout.release(handle).unwrap());
    assert_eq!(fanout.backlog_bytes(), 0);
    assert_eq!(fanout.budget().held(), 0);
    let stats = fanout.stats();
    assert_eq!(
        (stats.partial_writes, stats.refused_writes, stats.writes),
        (1, 0, 1)
    );
}

#[test]
fn interrupted_calls_are_retried() {
    let mut fanout = FanOut::default();
    let (sink, peer) = fake(&[Step::Interrupted, Step::Interrupted, Step::All]);
    let handle = free_handle(&mut fanout, sink, LIMIT);
    assert_eq!(
        fanout.send(&[handle], b"once").unwrap(),
        delivery(&[], &[], 1)
    );
    assert_eq!(frames(&peer.bytes()), payloads(&["once"]));
    assert!(!fanout.busy(handle).unwrap());
    assert_eq!(fanout.stats().writes, 3);
}

#[test]
fn a_refused_frame_waits_for_the_writer_and_later_ones_queue_up_to_the_limit() {
    for refusal in [Step::WouldBlock, Step::Take(0), Step::Broken] {
        let mut fanout = FanOut::default();
        let (sink, peer) = fake(&[refusal]);
        let handle = free_handle(&mut fanout, sink, 1000);
        let sent: Vec<Vec<u8>> = (0..10u8).map(|n| vec![b'a' + n; 196]).collect(); // 200 B framed
        assert_eq!(
            fanout.send(&[handle], &sent[0]).unwrap(),
            delivery(&[], &[handle], 1)
        );
        for payload in &sent[1..5] {
            assert_eq!(
                fanout.send(&[handle], payload).unwrap(),
                delivery(&[], &[], 1)
            );
        }
        assert_eq!(fanout.pending_bytes(handle).unwrap(), 1000);
        // The sixth would pass the limit: handed back, and the connection held (the outbox
        // and its policy decide from now on).
        assert_eq!(
            fanout.send(&[handle], &sent[5]).unwrap(),
            delivery(&[handle], &[], 0)
        );
        assert!(fanout.held(handle).unwrap());
        assert_eq!(
            fanout.send(&[handle], b"later").unwrap(),
            delivery(&[handle], &[], 0)
        );
        let stats = fanout.stats();
        assert_eq!(
            (
                stats.refused_writes,
                stats.overflows,
                stats.budget_overflows
            ),
            (1, 1, 0)
        );
        assert_eq!(peer.wire().calls, 1);
        assert_eq!(frames(&fanout.take_pending_vec(handle).unwrap()), sent[..5]);
        assert!(fanout.take_pending_vec(handle).unwrap().is_empty());
        assert!(fanout.release(handle).unwrap());
        assert_eq!(fanout.budget().held(), 0);
    }
}

#[test]
fn a_refused_frame_goes_to_the_outbox_when_the_budget_is_full() {
    let budget = Arc::new(Budget::new(100));
    let mut fanout = FanOut::new(budget.clone());
    let (sink, _peer) = fake(&[Step::WouldBlock]);
    let handle = free_handle(&mut fanout, sink, LIMIT);
    let big = vec![b'x'; 300];
    assert_eq!(
        fanout.send(&[handle], &big).unwrap(),
        delivery(&[handle], &[], 0)
    );
    assert!(fanout.held(handle).unwrap());
    assert!(fanout.busy(handle).unwrap()); // the socket would block: its writer takes over
    assert_eq!(fanout.pending_bytes(handle).unwrap(), 0);
    assert_eq!(budget.held(), 0);
    let stats = fanout.stats();
    assert_eq!(
        (stats.overflows, stats.budget_overflows, stats.direct_frames),
        (1, 1, 0)
    );
}

#[test]
fn half_a_frame_on_the_wire_is_kept_even_past_the_budget() {
    let budget = Arc::new(Budget::new(10));
    let mut fanout = FanOut::new(budget.clone());
    let (sink, peer) = fake(&[Step::Take(5)]);
    let handle = free_handle(&mut fanout, sink, LIMIT);
    let big = vec![b'x'; 300];
    assert_eq!(
        fanout.send(&[handle], &big).unwrap(),
        delivery(&[], &[handle], 1)
    );
    assert_eq!(budget.held(), framed(&big).len() - 5); // over the limit: the rest must follow
                                                       // Busy, and the budget has no room: the next frame goes to the outbox.
    assert_eq!(
        fanout.send(&[handle], b"y").unwrap(),
        delivery(&[handle], &[], 0)
    );
    assert_eq!(fanout.stats().budget_overflows, 1);
    peer.write(&fanout.take_pending_vec(handle).unwrap());
    assert_eq!(frames(&peer.bytes()), [big]);
    assert!(fanout.release(handle).unwrap());
    assert_eq!(budget.held(), 0);
}

// -- corking --------------------------------------------------------------------------------

#[test]
fn corked_frames_go_out_in_one_write_per_connection() {
    let mut fanout = FanOut::default();
    let (a, peer_a) = fake(&[Step::All]);
    let (b, peer_b) = fake(&[Step::All]);
    let ha = free_handle(&mut fanout, a, LIMIT);
    let hb = free_handle(&mut fanout, b, LIMIT);
    fanout.subscribe(1, ha).unwrap();
    fanout.subscribe(2, hb).unwrap();
    fanout.cork();
    for payload in ["one", "two", "three"] {
        assert_eq!(fanout.publish(&[1, 2], payload.as_bytes(), None).written, 2);
    }
    assert_eq!(fanout.publish(&[2], b"b only", None).written, 1);
    assert_eq!((peer_a.wire().calls, peer_b.wire().calls), (0, 0)); // gathered, not sent
    assert_eq!(fanout.uncork(), Vec::<u32>::new());
    assert_eq!(frames(&peer_a.bytes()), payloads(&["one", "two", "three"]));
    assert_eq!(
        frames(&peer_b.bytes()),
        payloads(&["one", "two", "three", "b only"])
    );
    // One call each, with one slice: each frame is in the arena once, adjacent ranges merged.
    assert_eq!(peer_a.calls(), (1, 1));
    assert_eq!(peer_b.calls(), (1, 1));
    assert_eq!(fanout.send(&[ha], b"four").unwrap().written, 1); // uncorked: sent at once
    assert_eq!(peer_a.wire().calls, 2);
}

#[test]
fn a_connection_held_while_corked_keeps_its_order() {
    let mut fanout = FanOut::default();
    let (sink, peer) = fake(&[Step::All]);
    let handle = free_handle(&mut fanout, sink, LIMIT);
    fanout.cork();
    assert_eq!(fanout.send(&[handle], b"gathered").unwrap().written, 1);
    fanout.hold(handle).unwrap(); // the hub queues a frame in its outbox now
    assert_eq!(
        fanout.send(&[handle], b"queued").unwrap(),
        delivery(&[handle], &[], 0)
    );
    assert_eq!(fanout.uncork(), [handle]); // its writer must run: it has the gathered bytes
    assert_eq!(peer.wire().calls, 0);
    assert_eq!(fanout.budget().held(), framed(b"gathered").len());
    assert_eq!(
        frames(&fanout.take_pending_vec(handle).unwrap()),
        payloads(&["gathered"])
    );
    assert!(fanout.release(handle).unwrap());
}

#[test]
fn a_full_socket_at_uncork_leaves_the_rest_to_the_writer() {
    let mut fanout = FanOut::default();
    let (sink, peer) = fake(&[Step::Take(4096)]);
    let handle = free_handle(&mut fanout, sink, LIMIT);
    let sent: Vec<Vec<u8>> = (0..400u32)
        .map(|n| vec![b'a' + (n % 26) as u8; 2000])
        .collect();
    fanout.cork();
    for payload in &sent {
        fanout.send(&[handle], payload).unwrap();
    }
    assert_eq!(fanout.uncork(), [handle]);
    assert!(fanout.busy(handle).unwrap());
    assert_eq!(peer.bytes().len(), 4096);
    assert_eq!(fanout.stats().partial_writes, 1);
    peer.write(&fanout.take_pending_vec(handle).unwrap());
    assert_eq!(frames(&peer.bytes()), sent);
}

/// Two connections given alternate frames while corked hold 1,500 ranges of the arena each,
/// more than one call takes: the one that takes everything gets two calls (1,024 ranges,
/// then 476); the other takes the first call and refuses the second, whose frames wait for
/// its writer. Both get every frame in order.
#[test]
fn frames_gathered_apart_go_out_in_order_past_the_iovec_limit() {
    let mut fanout = FanOut::default();
    let (a, peer_a) = fake(&[Step::All]);
    let (b, peer_b) = fake(&[Step::All, Step::WouldBlock]);
    let ha = free_handle(&mut fanout, a, LIMIT);
    let hb = free_handle(&mut fanout, b, LIMIT);
    let sent: Vec<Vec<u8>> = (0..3000)
        .map(|n| format!("{n:04}").repeat(10).into())
        .collect();
    fanout.cork();
    for (n, payload) in sent.iter().enumerate() {
        assert_eq!(
            fanout
                .send(&[if n % 2 == 0 { ha } else { hb }], payload)
                .unwrap()
                .written,
            1
        );
    }
    assert_eq!(fanout.uncork(), [hb]);
    assert!(fanout.busy(hb).unwrap());
    assert!(!fanout.busy(ha).unwrap());
    assert_eq!(peer_a.calls(), (2, MAX_SLICES));
    assert_eq!(peer_b.calls(), (2, MAX_SLICES));
    let evens: Vec<Vec<u8>> = sent.iter().step_by(2).cloned().collect();
    let odds: Vec<Vec<u8>> = sent.iter().skip(1).step_by(2).cloned().collect();
    assert_eq!(frames(&peer_a.bytes()), evens);
    assert_eq!(frames(&peer_b.bytes()), odds[..MAX_SLICES]); // the first call: whole frames
    let rest = fanout.take_pending_vec(hb).unwrap();
    assert_eq!(frames(&rest), odds[MAX_SLICES..]);
    // The first call took something, so the second's refusal is a partial write, not a
    // refused one.
    let stats = fanout.stats();
    assert_eq!(
        (stats.partial_writes, stats.refused_writes, stats.writes),
        (1, 0, 4)
    );
}

#[test]
fn uncork_spreads_its_writes_over_threads() {
    let mut fanout = FanOut::default();
    assert_eq!(fanout.threads(), 1);
    assert_eq!(fanout.set_threads(0), Err(FanOutError::Threads(0)));
    assert_eq!(
        fanout.set_threads(MAX_THREADS + 1).unwrap_err().to_string(),
        "threads must be 1..64"
    );
    fanout.set_threads(4).unwrap();
    let mut peers = Vec::new();
    for n in 0..1100 {
        let (sink, peer) = fake(if n % 7 == 0 {
            &[Step::Take(3)]
        } else {
            &[Step::All]
        });
        let handle = free_handle(&mut fanout, sink, LIMIT);
        fanout.subscribe(n, handle).unwrap();
        peers.push((handle, peer));
    }
    let all: Vec<u64> = (0..1100).collect();
    let odd: Vec<u64> = (1..1100).step_by(2).collect();
    fanout.cork();
    fanout.publish(&all, b"first", None);
    fanout.publish(&odd, b"odd only", None);
    fanout.publish(&all, b"last", None);
    let mut arounds = 0;
    let mut woken = fanout.uncork_with(|write| {
        arounds += 1;
        write();
    });
    assert_eq!(arounds, 1);
    woken.sort_unstable();
    let partial: Vec<u32> = peers.iter().step_by(7).map(|(h, _)| *h).collect();
    assert_eq!(woken, partial);
    for (n, (handle, peer)) in peers.iter().enumerate() {
        let want = if n % 2 == 0 {
            payloads(&["first", "last"])
        } else {
            payloads(&["first", "odd only", "last"])
        };
        if n % 7 == 0 {
            peer.write(&fanout.take_pending_vec(*handle).unwrap());
            assert!(fanout.release(*handle).unwrap());
        }
        assert_eq!(frames(&peer.bytes()), want, "connection {n}");
        assert_eq!(peer.wire().calls, 1);
    }
    let stats = fanout.stats();
    assert_eq!((stats.writes, stats.threaded_uncorks), (1100, 1));
    assert_eq!(fanout.budget().held(), 0);
    // Fewer than 2 x 256 connections: one thread, and `around` is not called.
    fanout.cork();
    fanout.publish(&all[..500], b"few", None);
    let woken = fanout.uncork_with(|_| panic!("not threaded"));
    assert_eq!(woken.len(), (0..500).step_by(7).count()); // the sockets that take 3 bytes
    assert_eq!(fanout.stats().threaded_uncorks, 1);
}

// -- the writer's turn: take_pending, hold, release -----------------------------------------

#[test]
fn the_writer_owns_the_socket_from_take_pending_until_release() {
    let mut fanout = FanOut::default();
    let (sink, peer) = fake(&[Step::All]);
    let handle = free_handle(&mut fanout, sink, LIMIT);
    // The writer's turn with nothing pending still takes the socket (it is about to write
    // what the outbox holds).
    assert!(fanout.take_pending_vec(handle).unwrap().is_empty());
    assert!(fanout.busy(handle).unwrap());
    assert_eq!(
        fanout.send(&[handle], b"next").unwrap(),
        delivery(&[], &[handle], 1)
    );
    assert_eq!(
        fanout.send(&[handle], b"after").unwrap(),
        delivery(&[], &[], 1)
    );
    assert_eq!(peer.wire().calls, 0);
    let taken = fanout.take_pending_vec(handle).unwrap();
    assert_eq!(frames(&taken), payloads(&["next", "after"]));
    assert_eq!(fanout.backlog_bytes(), taken.len()); // counted until the writer comes back
    assert!(fanout.take_pending_vec(handle).unwrap().is_empty());
    assert_eq!(fanout.backlog_bytes(), 0);
    assert!(fanout.release(handle).unwrap());
    assert!(!fanout.busy(handle).unwrap());
    assert_eq!(
        fanout.send(&[handle], b"free").unwrap(),
        delivery(&[], &[], 1)
    );
    assert_eq!(frames(&peer.bytes()), payloads(&["free"]));
}

#[test]
fn hold_hands_frames_back_until_release() {
    let mut fanout = FanOut::default();
    let (sink, peer) = fake(&[Step::All]);
    let handle = free_handle(&mut fanout, sink, LIMIT);
    fanout.hold(handle).unwrap(); // the transport writes a control frame itself
    assert_eq!(
        fanout.send(&[handle], b"x").unwrap(),
        delivery(&[handle], &[], 0)
    );
    assert!(fanout.release(handle).unwrap());
    assert_eq!(fanout.send(&[handle], b"y").unwrap(), delivery(&[], &[], 1));
    assert_eq!(frames(&peer.bytes()), payloads(&["y"]));
}

#[test]
fn discard_pending_keeps_what_may_be_a_frames_rest() {
    let mut fanout = FanOut::default();
    let (sink, peer) = fake(&[Step::Take(3)]);
    let handle = free_handle(&mut fanout, sink, LIMIT);
    let first = vec![b'f'; 50];
    fanout.send(&[handle], &first).unwrap();
    for payload in ["a", "b", "c"] {
        fanout.send(&[handle], payload.as_bytes()).unwrap();
    }
    let rest = framed(&first).len() - 3;
    assert_eq!(
        fanout.discard_pending(handle).unwrap(),
        3 * framed(b"a").len()
    );
    assert_eq!(fanout.budget().held(), rest);
    peer.write(&fanout.take_pending_vec(handle).unwrap());
    assert_eq!(frames(&peer.bytes()), [first]); // whole frames: a close frame can follow
    fanout.close(handle).unwrap();
    assert_eq!(fanout.budget().held(), 0);
}

// -- handles, sockets and the descriptor rule -----------------------------------------------

#[test]
fn detach_and_close_drop_the_socket_and_free_its_backlog() {
    let budget = Arc::new(Budget::new(1 << 20));
    let mut fanout = FanOut::new(budget.clone());
    let (sink, peer) = fake(&[Step::WouldBlock]);
    let handle = free_handle(&mut fanout, sink, LIMIT);
    fanout.send(&[handle], b"pending").unwrap();
    assert!(budget.held() > 0);
    fanout.detach(handle).unwrap();
    assert!(peer.wire().dropped); // the fan-out's descriptor is closed
    assert!(!fanout.attached(handle).unwrap());
    assert_eq!(
        (fanout.pending_bytes(handle).unwrap(), budget.held()),
        (0, 0)
    );
    assert!(!fanout.release(handle).unwrap()); // not attached: stays held
    assert_eq!(
        fanout.send(&[handle], b"x").unwrap(),
        delivery(&[handle], &[], 0)
    );
    // Attachable again; a second attach is refused and drops the sink it was given.
    let (sink, peer) = fake(&[Step::WouldBlock]);
    fanout.attach(handle, sink, LIMIT).unwrap();
    let (extra, extra_peer) = fake(&[Step::All]);
    assert_eq!(
        fanout.attach(handle, extra, LIMIT),
        Err(FanOutError::AlreadyAttached(handle))
    );
    assert!(extra_peer.wire().dropped);
    assert!(fanout.release(handle).unwrap());
    fanout.send(&[handle], b"pending").unwrap();
    fanout.close(handle).unwrap();
    assert!(peer.wire().dropped);
    assert_eq!((budget.held(), fanout.backlog_bytes()), (0, 0));
    assert_eq!(fanout.stats().attached, 0);
}

#[test]
fn closed_handles_are_errors_and_are_reused() {
    let mut fanout: FanOut<Fake> = FanOut::default();
    let handle = fanout.open();
    fanout.close(handle).unwrap();
    let unknown = Err(FanOutError::UnknownHandle(handle));
    assert_eq!(fanout.hold(handle), unknown);
    assert_eq!(fanout.release(handle), unknown.clone().map(|()| false));
    assert_eq!(
        fanout.take_pending_vec(handle),
        unknown.clone().map(|()| Vec::new())
    );
    assert_eq!(fanout.detach(handle), unknown);
    assert_eq!(fanout.close(handle), unknown);
    assert_eq!(fanout.subscribe(1, handle), unknown);
    assert_eq!(fanout.subscribe_rows(1, handle), unknown);
    assert_eq!(
        fanout.send(&[handle], b"x"),
        unknown.clone().map(|()| Delivery::default())
    );
    assert_eq!(
        FanOutError::UnknownHandle(handle).to_string(),
        format!("no open handle {handle}")
    );
    let (sink, peer) = fake(&[Step::All]);
    assert_eq!(
        fanout.attach(99, sink, LIMIT),
        Err(FanOutError::UnknownHandle(99))
    );
    assert!(peer.wire().dropped);
    assert_eq!(fanout.open(), handle);
    assert!(!fanout.attached(handle).unwrap());
}

// -- subscriptions --------------------------------------------------------------------------

#[test]
fn a_publication_reaches_a_connection_once_and_skip_leaves_out_the_publisher() {
    let mut fanout = FanOut::default();
    let (a, peer_a) = fake(&[Step::All]);
    let (b, peer_b) = fake(&[Step::All]);
    let ha = free_handle(&mut fanout, a, LIMIT);
    let hb = free_handle(&mut fanout, b, LIMIT);
    for (sub_id, handle) in [(1, ha), (2, ha), (3, ha), (4, hb)] {
        fanout.subscribe(sub_id, handle).unwrap();
    }
    // 9: an id the fan-out does not know (a row subscription's join): skipped.
    assert_eq!(fanout.publish(&[1, 2, 3, 4, 9], b"1", None).written, 2);
    assert_eq!(fanout.publish(&[1, 2, 3, 4], b"2", Some(ha)).written, 1);
    assert!(fanout.unsubscribe(4));
    assert!(!fanout.unsubscribe(4));
    assert_eq!(fanout.publish(&[1, 4], b"3", None).written, 1);
    assert_eq!(frames(&peer_a.bytes()), payloads(&["1", "3"]));
    assert_eq!(frames(&peer_b.bytes()), payloads(&["1", "2"]));
    assert_eq!(fanout.stats().subscriptions, 3);
}

#[test]
fn row_events_reach_each_holder_once_with_plain_joins_of_the_table() {
    let mut fanout = FanOut::default();
    let (a, peer_a) = fake(&[Step::All]);
    let (b, peer_b) = fake(&[Step::All]);
    let (c, peer_c) = fake(&[Step::All]);
    let ha = free_handle(&mut fanout, a, LIMIT);
    let hb = free_handle(&mut fanout, b, LIMIT);
    let hc = free_handle(&mut fanout, c, LIMIT);
    let sse = fanout.open();
    fanout.subscribe_rows(7, ha).unwrap();
    fanout.subscribe_rows(8, ha).unwrap(); // two ids of one event: still one frame
    fanout.subscribe_rows(8, hb).unwrap();
    fanout.subscribe_rows(8, sse).unwrap();
    fanout.subscribe(100, hc).unwrap(); // a plain join of the table's channel
    fanout.subscribe(101, hb).unwrap(); // hb holds id 8 and joined plainly: once
    assert_eq!(
        fanout.subscribe_rows(8, hb).unwrap_err().to_string(),
        format!("handle {hb} holds row subscription 8 already")
    );
    assert_eq!(
        fanout.publish_rows(&[7, 8], &[100, 101], b"e1"),
        delivery(&[sse], &[], 3)
    );
    assert_eq!(fanout.publish_rows(&[7], &[], b"e2"), delivery(&[], &[], 1));
    assert_eq!(fanout.publish_rows(&[9], &[], b"e3"), delivery(&[], &[], 0));
    assert!(fanout.unsubscribe_rows(7, ha));
    assert!(!fanout.unsubscribe_rows(7, ha));
    assert!(!fanout.unsubscribe_rows(70, ha));
    assert_eq!(
        fanout.publish_rows(&[7, 8], &[100], b"e4"),
        delivery(&[sse], &[], 3)
    );
    assert_eq!(frames(&peer_a.bytes()), payloads(&["e1", "e2", "e4"]));
    assert_eq!(frames(&peer_b.bytes()), payloads(&["e1", "e4"]));
    assert_eq!(frames(&peer_c.bytes()), payloads(&["e1", "e4"]));
    assert_eq!(fanout.stats().row_subscriptions, 1);
}

// -- the fan-out driven as the hub drives it ------------------------------------------------

/// One step of the hub, its transports' writers, or the kernel.
#[derive(Debug, Clone)]
enum Op {
    /// A publication to the connections listed (a connection may be listed twice: two of
    /// its subscriptions match), except `skip` (its publisher).
    Publish {
        to: Vec<usize>,
        size: usize,
        skip: Option<usize>,
    },
    /// The hub's own frame for a connection (a reply): it holds the connection and queues
    /// the frame in its outbox (`Hub._send`).
    Queue {
        conn: usize,
        size: usize,
    },
    /// The transport writes a control frame itself (`Session.hold`).
    Hold {
        conn: usize,
    },
    /// One turn of the connection's writer (`Session.outgoing_wire`): it takes the pending
    /// bytes and the outbox's frames and writes them; with nothing to write, it releases
    /// the socket.
    WriterTurn {
        conn: usize,
    },
    /// `Hub.corked` begins, or ends.
    Cork,
    Uncork,
    /// The hub closes a slow connection over budget: it clears the outbox, discards the
    /// pending frames nothing of was written, its writer writes the rest, and the
    /// connection ends. A new connection takes its place (and, likely, its handle).
    CloseAsSlow {
        conn: usize,
    },
    /// The transport ends the connection (`Hub.disconnect`); a new one takes its place.
    Close {
        conn: usize,
    },
}

/// A hub connection in the model.
struct Conn {
    handle: u32,
    peer: Peer,
    /// The payloads the hub sent it, in order.
    expected: Vec<Vec<u8>>,
    /// Frames queued in the hub's outbox.
    outbox: VecDeque<Vec<u8>>,
}

/// Channel subscription ids of connection `conn` (two, so a publication can match twice).
fn sub_ids(conn: usize) -> [u64; 2] {
    [conn as u64, 1000 + conn as u64]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::All),
        3 => (0usize..700).prop_map(Step::Take),
        2 => Just(Step::WouldBlock),
        1 => Just(Step::Interrupted),
        1 => Just(Step::Broken),
    ]
}

fn script() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(step(), 1..8).prop_map(|mut s| {
        if s.iter().all(|s| *s == Step::Interrupted) {
            s.push(Step::All);
        }
        s
    })
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => 6usize..200,
        2 => 200usize..3000,
        1 => 65_530usize..65_540,
    ]
}

fn op(conns: usize) -> impl Strategy<Value = Op> {
    let conn = 0..conns;
    prop_oneof![
        12 => (
            prop::collection::vec(conn.clone(), 0..6),
            size(),
            prop::option::weighted(0.2, conn.clone())
        )
            .prop_map(|(to, size, skip)| Op::Publish { to, size, skip }),
        2 => (conn.clone(), size()).prop_map(|(conn, size)| Op::Queue { conn, size }),
        1 => conn.clone().prop_map(|conn| Op::Hold { conn }),
        6 => conn.clone().prop_map(|conn| Op::WriterTurn { conn }),
        2 => Just(Op::Cork),
        2 => Just(Op::Uncork),
        1 => conn.clone().prop_map(|conn| Op::CloseAsSlow { conn }),
        1 => conn.prop_map(|conn| Op::Close { conn }),
    ]
}

/// Each connection's socket (its script) and backlog limit, the budget, and the steps.
type Case = (Vec<(Vec<Step>, usize)>, usize, Vec<Op>);

fn case() -> impl Strategy<Value = Case> {
    (1usize..5).prop_flat_map(|n| {
        (
            prop::collection::vec((script(), 0usize..20_000), n),
            prop_oneof![Just(usize::MAX), 1usize..60_000],
            prop::collection::vec(op(n), 0..120),
        )
    })
}

/// `bytes` is whole frames of a prefix of `expected`, then a prefix of the next frame.
fn assert_prefix(bytes: &[u8], expected: &[Vec<u8>], conn: usize) {
    let (got, rest) = parse(bytes);
    assert!(
        got.len() <= expected.len(),
        "connection {conn} got more than it was sent"
    );
    assert_eq!(
        got,
        expected[..got.len()],
        "connection {conn}: frames out of order"
    );
    if !rest.is_empty() {
        let next = framed(&expected[got.len()]);
        assert!(
            next.starts_with(rest),
            "connection {conn}: a frame's bytes out of order"
        );
    }
}

/// The hub and its connections' writers, around a fan-out with fake sockets.
struct Hub {
    fanout: FanOut<Fake>,
    /// Each connection's socket script and backlog limit (also its successors').
    specs: Vec<(Vec<Step>, usize)>,
    conns: Vec<Conn>,
    serial: usize,
}

impl Hub {
    fn new(budget: Arc<Budget>, specs: Vec<(Vec<Step>, usize)>) -> Hub {
        let mut hub = Hub {
            fanout: FanOut::new(budget),
            conns: Vec::new(),
            specs,
            serial: 0,
        };
        for n in 0..hub.specs.len() {
            let conn = hub.open(n);
            hub.conns.push(conn);
        }
        hub
    }

    /// A new connection in place `n`, attached and released (its writer found nothing to
    /// write), subscribed to its channel subscriptions.
    fn open(&mut self, n: usize) -> Conn {
        let (script, limit) = &self.specs[n];
        let (sink, peer) = fake(script);
        let handle = free_handle(&mut self.fanout, sink, *limit);
        for sub_id in sub_ids(n) {
            self.fanout.subscribe(sub_id, handle).unwrap();
        }
        Conn {
            handle,
            peer,
            expected: Vec::new(),
            outbox: VecDeque::new(),
        }
    }

    fn payload(&mut self, size: usize) -> Vec<u8> {
        self.serial += 1;
        let mut payload = format!("{:06}", self.serial).into_bytes();
        payload.resize(size.max(6), b'.');
        payload
    }

    fn queue(&mut self, conn: usize, frame: Vec<u8>) {
        let c = &mut self.conns[conn];
        self.fanout.hold(c.handle).unwrap();
        c.outbox.push_back(frame);
    }

    /// Returns whether the writer had nothing to write (and released the socket).
    fn writer_turn(&mut self, conn: usize) -> bool {
        let c = &mut self.conns[conn];
        let data = self.fanout.take_pending_vec(c.handle).unwrap();
        let queued: Vec<u8> = c.outbox.drain(..).flatten().collect();
        if data.is_empty() && queued.is_empty() {
            assert!(self.fanout.release(c.handle).unwrap());
            return true;
        }
        c.peer.write(&data);
        c.peer.write(&queued);
        false
    }

    /// Ends connection `conn` (what it received is a prefix of what it was sent) and opens
    /// a new one in its place.
    fn close(&mut self, conn: usize) {
        for sub_id in sub_ids(conn) {
            self.fanout.unsubscribe(sub_id);
        }
        self.fanout.close(self.conns[conn].handle).unwrap();
        let new = self.open(conn);
        let old = std::mem::replace(&mut self.conns[conn], new);
        assert!(old.peer.wire().dropped, "closing drops the socket");
        assert_prefix(&old.peer.bytes(), &old.expected, conn);
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Publish { ref to, size, skip } => {
                let payload = self.payload(size);
                let mut subs = Vec::new();
                let mut recipients = Vec::new();
                for (n, &conn) in to.iter().enumerate() {
                    subs.push(sub_ids(conn)[n % 2]);
                    if skip != Some(conn) && !recipients.contains(&conn) {
                        recipients.push(conn);
                    }
                }
                let skip = skip.map(|conn| self.conns[conn].handle);
                let d = self.fanout.publish(&subs, &payload, skip);
                assert_eq!(d.written + d.slow.len(), recipients.len());
                for handle in d.woken.iter() {
                    assert!(!d.slow.contains(handle));
                }
                for &conn in &recipients {
                    self.conns[conn].expected.push(payload.clone());
                    if d.slow.contains(&self.conns[conn].handle) {
                        self.queue(conn, framed(&payload));
                    }
                }
            }
            Op::Queue { conn, size } => {
                let payload = self.payload(size);
                self.conns[conn].expected.push(payload.clone());
                self.queue(conn, framed(&payload));
            }
            Op::Hold { conn } => self.fanout.hold(self.conns[conn].handle).unwrap(),
            Op::WriterTurn { conn } => {
                self.writer_turn(conn);
            }
            Op::Cork => self.fanout.cork(),
            Op::Uncork => {
                if self.fanout.corked() {
                    for handle in self.fanout.uncork() {
                        assert!(self.conns.iter().any(|c| c.handle == handle));
                    }
                }
            }
            Op::CloseAsSlow { conn } => {
                let c = &mut self.conns[conn];
                c.outbox.clear();
                self.fanout.discard_pending(c.handle).unwrap();
                let rest = self.fanout.take_pending_vec(c.handle).unwrap();
                c.peer.write(&rest);
                let bytes = c.peer.bytes();
                let (got, cut) = parse(&bytes);
                assert!(cut.is_empty(), "connection {conn}: closed mid-frame");
                assert_eq!(got, c.expected[..got.len()]);
                self.close(conn);
            }
            Op::Close { conn } => self.close(conn),
        }
    }

    fn check(&self) {
        self.fanout.check_accounting();
        assert_eq!(self.fanout.budget().held(), self.fanout.backlog_bytes());
        for (n, c) in self.conns.iter().enumerate() {
            assert_prefix(&c.peer.bytes(), &c.expected, n);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever the sockets do (take all, take part, would block, are interrupted, break)
    /// and whatever order the hub's steps come in, every connection receives exactly the
    /// frames sent to it, in order, through whichever path (direct, gathered, pending,
    /// outbox); the budget holds exactly the fan-out's backlog at every step, and nothing
    /// once everything is written or closed.
    #[test]
    fn every_connection_gets_its_frames_in_order((specs, limit, ops) in case()) {
        let budget = Arc::new(Budget::new(limit));
        let mut hub = Hub::new(budget.clone(), specs);
        for op in &ops {
            hub.apply(op);
            hub.check();
        }
        // The end of the burst: every writer runs until it has nothing to write.
        hub.apply(&Op::Uncork);
        for n in 0..hub.conns.len() {
            let mut turns = 0;
            while !hub.writer_turn(n) {
                turns += 1;
                prop_assert!(turns < 3, "a writer that never runs out of bytes");
            }
        }
        hub.check();
        prop_assert_eq!(budget.held(), 0);
        for (n, c) in hub.conns.iter().enumerate() {
            prop_assert_eq!(frames(&c.peer.bytes()), c.expected.clone(), "connection {}", n);
        }
        for handle in hub.conns.iter().map(|c| c.handle).collect::<Vec<_>>() {
            hub.fanout.close(handle).unwrap();
        }
        let stats = hub.fanout.stats();
        prop_assert_eq!((stats.handles, stats.attached, stats.backlog_bytes), (0, 0, 0));
        prop_assert_eq!(budget.held(), 0);
        prop_assert!(hub.conns.iter().all(|c| c.peer.wire().dropped));
    }

    /// More ranges gathered for one connection than one call takes, whatever its socket
    /// does with each call: the frames arrive whole and in order.
    #[test]
    fn frames_gathered_past_the_iovec_limit_arrive_in_order(
        script in script(),
        count in (MAX_SLICES + 1)..(3 * MAX_SLICES),
    ) {
        let mut fanout = FanOut::default();
        let (sink, peer) = fake(&script);
        let (other, _) = fake(&[Step::All]);
        let handle = free_handle(&mut fanout, sink, usize::MAX);
        let other = free_handle(&mut fanout, other, usize::MAX);
        let sent: Vec<Vec<u8>> = (0..count).map(|n| format!("{n}").into_bytes()).collect();
        fanout.cork();
        for payload in &sent {
            fanout.send(&[handle], payload).unwrap();
            fanout.send(&[other], b"-").unwrap(); // so that no two ranges are adjacent
        }
        let woken = fanout.uncork();
        prop_assert!(peer.wire().most_slices <= MAX_SLICES);
        if woken.contains(&handle) {
            peer.write(&fanout.take_pending_vec(handle).unwrap());
            prop_assert!(fanout.release(handle).unwrap());
        } else {
            prop_assert!(!fanout.busy(handle).unwrap());
        }
        prop_assert_eq!(frames(&peer.bytes()), sent);
        prop_assert_eq!(fanout.budget().held(), 0);
    }
}
