//! `pyrt._core.FanOut` and `OutboxBudget`: the Python face of `pyrt_engine::fanout`, where
//! the fan-out's state machine lives (and its documentation). Here: matching with the
//! binding's `Matcher`, descriptors from Python, conversions and errors.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use pyo3::exceptions::{PyKeyError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use pyrt_engine::fanout::{Budget, Delivery, FanOut as Engine, FanOutError, FdSink};

use crate::{positioned_error, Matcher};

fn error(e: FanOutError) -> PyErr {
    match e {
        FanOutError::UnknownHandle(_) => PyKeyError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// The bytes queued for the clients of one hub, against one limit (`[hub] outbox_total_bytes`):
/// every connection's outbox (the Python `Outbox` adds and frees what it queues) and fan-out
/// backlog (the fan-out made with it counts its own). Frozen, so both reach it without a
/// borrow.
#[pyclass(frozen, module = "pyrt._core", name = "OutboxBudget")]
pub struct OutboxBudget {
    budget: Arc<Budget>,
}

#[pymethods]
impl OutboxBudget {
    #[new]
    fn new(limit: usize) -> PyResult<Self> {
        if limit == 0 {
            return Err(PyValueError::new_err("limit must be at least 1"));
        }
        Ok(OutboxBudget {
            budget: Arc::new(Budget::new(limit)),
        })
    }

    /// The most bytes all outboxes and backlogs may hold together.
    #[getter]
    fn limit(&self) -> usize {
        self.budget.limit()
    }

    /// The bytes they hold now.
    #[getter]
    fn held(&self) -> usize {
        self.budget.held()
    }

    /// Counts `delta` more bytes as held (negative: frees them). Freeing more than is held
    /// is a ValueError (and changes nothing): the caller's accounting is wrong.
    fn add(&self, delta: isize) -> PyResult<()> {
        if delta >= 0 {
            self.budget.add(delta.unsigned_abs());
        } else if !self.budget.sub(delta.unsigned_abs()) {
            return Err(PyValueError::new_err(format!(
                "frees {} bytes, but only {} are held",
                delta.unsigned_abs(),
                self.budget.held()
            )));
        }
        Ok(())
    }
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
type PyDelivery<'py> = (Bound<'py, PyList>, Bound<'py, PyList>, usize);

fn delivery(py: Python<'_>, d: Delivery) -> PyResult<PyDelivery<'_>> {
    Ok((
        PyList::new(py, d.slow)?,
        PyList::new(py, d.woken)?,
        d.written,
    ))
}

/// The hub's direct write path (`pyrt_engine::fanout`), writing to sockets by descriptor.
#[pyclass(module = "pyrt._core", name = "FanOut")]
pub struct FanOut {
    inner: Engine<FdSink>,
}

#[pymethods]
impl FanOut {
    /// `budget`: the hub's budget for queued bytes, shared with its outboxes (default: none).
    #[new]
    #[pyo3(signature = (budget = None))]
    fn new(budget: Option<&Bound<'_, OutboxBudget>>) -> Self {
        FanOut {
            inner: Engine::new(budget.map_or_else(Arc::default, |b| b.get().budget.clone())),
        }
    }

    /// A handle for a new connection: not attached, so everything to it is handed back.
    fn open(&mut self) -> u32 {
        self.inner.open()
    }

    /// Forgets `handle` (detaching its socket); unsubscribe its subscriptions first.
    fn close(&mut self, handle: u32) -> PyResult<()> {
        self.inner.close(handle).map_err(error)
    }

    /// Lets the fan-out write to the stream socket `fd` for `handle` (which starts held:
    /// its writer releases it), keeping at most `limit` bytes pending for it (more go to the
    /// hub's outbox). The fan-out borrows `fd`: it must stay open until `detach` or `close`
    /// (docs/architecture.md, "The descriptor rule").
    #[pyo3(signature = (handle, fd, limit = 1 << 22))]
    fn attach(&mut self, handle: u32, fd: RawFd, limit: usize) -> PyResult<()> {
        if self.inner.attached(handle).map_err(error)? {
            return Err(error(FanOutError::AlreadyAttached(handle)));
        }
        let sink = if fd < 0 {
            Err(std::io::Error::from_raw_os_error(libc::EBADF))
        } else {
            // SAFETY: the hub attaches a transport's open socket and detaches it (`close`,
            // `detach`) before the socket is closed: Session.end, and the node for whatever
            // a transport left attached (docs/architecture.md, "The descriptor rule").
            unsafe { FdSink::borrow(fd) }
        };
        let sink = sink.map_err(|e| PyOSError::new_err(format!("cannot attach {fd}: {e}")))?;
        self.inner.attach(handle, sink, limit).map_err(error)
    }

    /// Stops direct writes to `handle` and closes the fan-out's descriptor of its socket
    /// (pending bytes are discarded).
    fn detach(&mut self, handle: u32) -> PyResult<()> {
        self.inner.detach(handle).map_err(error)
    }

    /// Discards the frames pending for `handle` that nothing of was written, freeing their
    /// share of the budget; returns how many bytes that freed.
    fn discard_pending(&mut self, handle: u32) -> PyResult<usize> {
        self.inner.discard_pending(handle).map_err(error)
    }

    /// Whether `handle` has a socket attached.
    fn attached(&mut self, handle: u32) -> PyResult<bool> {
        self.inner.attached(handle).map_err(error)
    }

    /// Whether frames to `handle` go through its outbox now.
    fn held(&mut self, handle: u32) -> PyResult<bool> {
        self.inner.held(handle).map_err(error)
    }

    /// Frames to `handle` go through its outbox from now on (the hub queued one there).
    fn hold(&mut self, handle: u32) -> PyResult<()> {
        self.inner.hold(handle).map_err(error)
    }

    /// Direct writes to `handle` may resume: its writer has written everything queued.
    /// Returns False (and nothing changes) when it is not attached or has pending bytes.
    fn release(&mut self, handle: u32) -> PyResult<bool> {
        self.inner.release(handle).map_err(error)
    }

    /// Whether the writer of `handle` owns its socket (frames are appended to its pending
    /// bytes until `release`).
    fn busy(&mut self, handle: u32) -> PyResult<bool> {
        self.inner.busy(handle).map_err(error)
    }

    /// Bytes pending for `handle`.
    fn pending_bytes(&mut self, handle: u32) -> PyResult<usize> {
        self.inner.pending_bytes(handle).map_err(error)
    }

    /// Bytes held for every connection: pending, and taken by writers still writing them
    /// (this fan-out's share of the budget).
    #[getter]
    fn backlog_bytes(&self) -> usize {
        self.inner.backlog_bytes()
    }

    /// The pending bytes of `handle`, oldest first, to be written before anything queued
    /// (empty if none). From now until `release`, its writer owns the socket.
    fn take_pending<'py>(&mut self, py: Python<'py>, handle: u32) -> PyResult<Bound<'py, PyBytes>> {
        self.inner
            .take_pending(handle, |pending| {
                PyBytes::new_with(py, pending.len(), |out| {
                    pending.take_into(out);
                    Ok(())
                })
            })
            .map_err(error)?
    }

    /// From now on frames to free connections are gathered, not sent, until `uncork`.
    fn cork(&mut self) {
        self.inner.cork();
    }

    /// Sends what was gathered since `cork`, one write per connection. Returns the handles
    /// whose writer must run.
    fn uncork<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        // Writes spread over threads run without the GIL (they touch no Python object).
        let woken = self.inner.uncork_with(|write| py.detach(write));
        PyList::new(py, woken)
    }

    /// Threads `uncork` spreads its socket writes over; 1: all on the calling thread.
    #[getter]
    fn get_threads(&self) -> usize {
        self.inner.threads()
    }

    #[setter]
    fn set_threads(&mut self, threads: usize) -> PyResult<()> {
        self.inner.set_threads(threads).map_err(error)
    }

    /// Channel subscription `sub_id` (of the hub's matcher) belongs to `handle`.
    fn subscribe(&mut self, sub_id: u64, handle: u32) -> PyResult<()> {
        self.inner.subscribe(sub_id, handle).map_err(error)
    }

    /// Forgets channel subscription `sub_id`; returns whether it was known.
    fn unsubscribe(&mut self, sub_id: u64) -> bool {
        self.inner.unsubscribe(sub_id)
    }

    /// `handle` holds row subscription `sub_id` (of the hub's row matcher; several
    /// connections may hold one). Once per pair: a second call is a ValueError.
    fn subscribe_rows(&mut self, sub_id: u64, handle: u32) -> PyResult<()> {
        self.inner.subscribe_rows(sub_id, handle).map_err(error)
    }

    /// `handle` no longer holds row subscription `sub_id`; returns whether it did.
    fn unsubscribe_rows(&mut self, sub_id: u64, handle: u32) -> bool {
        self.inner.unsubscribe_rows(sub_id, handle)
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
        let (slow, woken, written) = delivery(py, self.inner.publish(subs, payload, skip))?;
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
        let d = if let (Some(mut matcher), Some(channel)) = (matcher, channel) {
            let (subs, seconds) = match_channel(py, &mut matcher, channel)?;
            (self.inner.publish_rows(&ids, subs, payload), seconds)
        } else {
            (self.inner.publish_rows(&ids, &[], payload), 0.0)
        };
        let (slow, woken, written) = delivery(py, d.0)?;
        Ok((slow, woken, written, d.1))
    }

    /// Delivers `payload` (one WebSocket text frame) to each of `handles` (distinct, open);
    /// returns (slow, woken, written) as `publish` does.
    fn send<'py>(
        &mut self,
        py: Python<'py>,
        handles: Vec<u32>,
        payload: &[u8],
    ) -> PyResult<PyDelivery<'py>> {
        delivery(py, self.inner.send(&handles, payload).map_err(error)?)
    }

    /// Counters: frames and payload bytes taken directly, socket writes (system calls),
    /// partial and refused writes, frames handed back because a backlog was full
    /// (overflows), uncorks that wrote on several threads, open handles, attached
    /// sockets, channel and row subscriptions.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("direct_frames", s.direct_frames)?;
        d.set_item("writes", s.writes)?;
        d.set_item("direct_bytes", s.direct_bytes)?;
        d.set_item("partial_writes", s.partial_writes)?;
        d.set_item("refused_writes", s.refused_writes)?;
        d.set_item("overflows", s.overflows)?;
        d.set_item("budget_overflows", s.budget_overflows)?;
        d.set_item("backlog_bytes", s.backlog_bytes)?;
        d.set_item("threaded_uncorks", s.threaded_uncorks)?;
        d.set_item("row_subscriptions", s.row_subscriptions)?;
        d.set_item("handles", s.handles)?;
        d.set_item("attached", s.attached)?;
        d.set_item("subscriptions", s.subscriptions)?;
        Ok(d)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<OutboxBudget>()?;
    m.add_class::<FanOut>()
}
