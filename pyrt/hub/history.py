"""Per-channel history: offsets, epochs, bounds (per channel and in bytes across channels),
and recovery.

Every publication gets the next offset of its channel before anyone sees it. A client remembers
the position (offset, epoch) of the last publication it saw and, when it comes back, asks for
what came after. The epoch names one unbroken run of offsets: when history is lost (the hub
restarted, the stream was dropped) the epoch changes, so an old position can never be mistaken
for a recoverable one. Recovery is all or nothing: either every missed publication is returned
(`recovered=True`) or none is (`recovered=False`, reload your state).

What a stream retains is bounded per channel (`max_size`, `max_age`) and, across every
channel, by a budget of bytes (`HistoryBudget`): when the streams together hold more, the
publications appended first, whichever their channels, are forgotten until they fit. Either
way a stream forgets from its oldest end, so what it retains stays one run of consecutive
offsets ending at its top, and its epoch stays: the offsets are still one unbroken run, and
a client asking for what came after a forgotten offset is told `recovered=False` because
the run no longer reaches back to it (`ChannelStream.recover`). (An epoch changes only when
offsets themselves are lost or could be reused: a restart without durable history, a
dropped stream, a source's gap.)

Sans-IO: time is passed in as `now` (seconds, any monotonic origin), epochs come from a
callable the owner passes in. Durable history is an attached `HistoryLog` (pyrt.hub.historylog,
the IO side): every publication is written to it before `append` returns, that is before the
hub queues it for anyone, and `attach` replays it at start.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import attrs
import orjson

from .._core import PgChange, RowEvent
from ..conflict import Timestamp

if TYPE_CHECKING:
    from .historylog import HistoryLog, LogRecord


@attrs.frozen(slots=True)
class StreamPosition:
    """Where a client is in a channel's stream: the last offset it saw, in which epoch."""

    offset: int
    epoch: str


@attrs.frozen(slots=True)
class Publication:
    """One message on a channel, with its place in the channel's stream."""

    channel: str
    offset: int
    epoch: str
    data: Any
    time: float
    publisher: str | None = None
    """The connection that published it, or None for the server and sources."""
    key: str | None = None
    """Conflation key: under the conflate policy only the latest per key is kept queued."""
    hlc: Timestamp | None = None
    """The hub's hybrid logical clock reading when it took the publication (pyrt.conflict)."""
    change: Any = None
    """For a row event from a database source: the change itself (a `PgChange`, kept in
    Rust), which a recovering subscriber's row filters are matched against."""

    @property
    def position(self) -> StreamPosition:
        return StreamPosition(self.offset, self.epoch)


@attrs.frozen(slots=True)
class Recovery:
    """The answer to "what did I miss since `position`?"."""

    recovered: bool
    publications: tuple[Publication, ...]
    position: StreamPosition
    """The stream's current position; with recovered=False, continue from here."""


ENTRY_BYTES = 400
"""What a retained publication counts against the history budget on top of its size: the
objects that hold it (the `Publication`, its clock reading, its place in the stream).
Measured with tracemalloc (tests/hub/test_memory_budget.py): a client's publication of
`{"text": "hi"}` holds about 580 bytes and its frame is about 150; one of `null` about 340
and 140; one of a 60 KB string its frame plus about 260. Data made of many small JSON values
holds more than its JSON (as Python objects): up to about 1.5 times what it counts."""


_Retained = tuple[Publication, int, int]
"""A retained publication, its `seq` (its place among every channel's publications: the
budget forgets the lowest first) and its `size` (what it counts against the budget,
ENTRY_BYTES included). A plain tuple: one is made for every publication."""


class HistoryBudget:
    """The bytes every channel's stream retains together, and what forgets the oldest when
    they are more than `max_bytes` (None: no bound).

    Publications are numbered as they are appended (`seq`), across channels. A heap holds
    each stream that retains something once, keyed by the number of its oldest publication
    or, if that was forgotten since (by the stream's own bounds), a lower number: a key only
    ever lags behind. Evicting takes the lowest key; a lagging one is fixed and pushed back.
    So the globally oldest publication is found in O(log channels) amortised, without a scan.
    """

    __slots__ = ("_heap", "bytes", "evicted", "max_bytes", "retained", "seq")

    def __init__(self, max_bytes: int | None) -> None:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        """What every stream retains, counted as each `_Retained` says."""
        self.retained = 0
        """How many publications every stream retains."""
        self.evicted = 0
        """Publications forgotten because the budget was full (not by a stream's own bounds)."""
        self.seq = 0
        """The number of the latest publication appended to any stream."""
        self._heap: list[tuple[int, ChannelStream]] = []

    def queue(self, stream: ChannelStream, seq: int) -> None:
        """`stream` retains something again; `seq` numbers its oldest publication."""
        heapq.heappush(self._heap, (seq, stream))

    def rebuild(self, streams: Iterable[ChannelStream]) -> None:
        """Rebuilds the heap from `streams`, every stream there is (dropped ones are left
        out, so the heap holds only live streams)."""
        heap = []
        for stream in streams:
            stream.queued = bool(stream)
            if stream.queued:
                heap.append((stream.oldest_seq, stream))
        heapq.heapify(heap)
        self._heap = heap

    @property
    def over(self) -> bool:
        """Whether the streams hold more than `max_bytes`."""
        return self.max_bytes is not None and self.bytes > self.max_bytes

    def enforce(self) -> int:
        """Forgets the oldest publications, across streams, until the rest fit; returns how
        many it forgot."""
        max_bytes = self.max_bytes
        if max_bytes is None or self.bytes <= max_bytes:
            return 0
        heap = self._heap
        evicted = 0
        while self.bytes > max_bytes and heap:
            seq, stream = heap[0]
            if not stream:
                heapq.heappop(heap)
                stream.queued = False
                continue
            oldest = stream.oldest_seq
            if oldest != seq:  # the stream forgot its oldest by its own bounds meanwhile
                heapq.heapreplace(heap, (oldest, stream))
                continue
            stream.evict_oldest()
            evicted += 1
            if stream:
                heapq.heapreplace(heap, (stream.oldest_seq, stream))
            else:
                heapq.heappop(heap)
                stream.queued = False
        self.evicted += evicted
        return evicted


class ChannelStream:
    """The stream of one channel: the next offset, the epoch and the retained publications.

    `budget` is shared by every stream of a `History` (None: a budget of its own, unbounded).
    """

    __slots__ = (
        "_budget",
        "_retained",
        "channel",
        "epoch",
        "max_age",
        "max_size",
        "queued",
        "top",
    )

    def __init__(
        self,
        channel: str,
        epoch: str,
        max_size: int,
        max_age: float,
        budget: HistoryBudget | None = None,
    ) -> None:
        self.channel = channel
        self.epoch = epoch
        self.max_size = max_size
        self.max_age = max_age
        self.top = 0
        """Offset of the latest publication; 0 before the first."""
        self._retained: collections.deque[_Retained] = collections.deque()
        self._budget = budget if budget is not None else HistoryBudget(None)
        self.queued = False
        """Whether the budget's heap holds this stream."""

    @property
    def position(self) -> StreamPosition:
        return StreamPosition(self.top, self.epoch)

    def __len__(self) -> int:
        return len(self._retained)

    def __iter__(self) -> Iterator[Publication]:
        return (entry[0] for entry in self._retained)

    @property
    def oldest_seq(self) -> int:
        """The budget's number of the oldest retained publication (retaining one)."""
        return self._retained[0][1]

    def append(
        self,
        data: Any,
        now: float,
        publisher: str | None = None,
        key: str | None = None,
        hlc: Timestamp | None = None,
        change: Any = None,
    ) -> Publication:
        self.top += 1
        publication = Publication(
            self.channel, self.top, self.epoch, data, now, publisher, key, hlc, change
        )
        self._retain(publication)
        self.trim(now)
        return publication

    def _retain(self, publication: Publication) -> None:
        """Keeps `publication` (the newest), counting ENTRY_BYTES until `charge` says more."""
        if self.max_size <= 0:
            return
        retained, budget = self._retained, self._budget
        if len(retained) >= self.max_size:
            budget.bytes -= retained.popleft()[2]
        else:
            budget.retained += 1
        seq = budget.seq = budget.seq + 1
        retained.append((publication, seq, ENTRY_BYTES))
        budget.bytes += ENTRY_BYTES
        if not self.queued:
            self.queued = True
            budget.queue(self, seq)

    def charge(self, publication: Publication, size: int) -> None:
        """`publication`, the newest, counts `size` bytes (plus ENTRY_BYTES) against the
        budget; then the budget forgets the oldest publications if it is over."""
        retained, budget = self._retained, self._budget
        if retained:
            newest, seq, counted = retained[-1]
            if newest is publication:
                retained[-1] = (publication, seq, counted + size)
                budget.bytes += size
        if budget.over:
            budget.enforce()

    def evict_oldest(self) -> None:
        """Forgets the oldest retained publication (the budget's or the stream's bounds)."""
        self._budget.bytes -= self._retained.popleft()[2]
        self._budget.retained -= 1

    def clear(self) -> None:
        """Forgets every retained publication."""
        self._budget.bytes -= sum(entry[2] for entry in self._retained)
        self._budget.retained -= len(self._retained)
        self._retained.clear()

    def reset(self, epoch: str) -> None:
        """History was lost upstream (a source's gap): a new epoch, nothing retained."""
        self.epoch = epoch
        self.clear()

    def holds(self, epoch: str, offset: int) -> bool:
        """Whether the publication at (`offset`, `epoch`) is still retained."""
        if epoch != self.epoch or not self._retained:
            return False
        return self._retained[0][0].offset <= offset <= self.top

    def restore(self, publication: Publication) -> None:
        """Puts back a publication read from a durable log (offsets in order; a gap in
        them means what came before it is not recoverable)."""
        if publication.epoch != self.epoch:
            self.reset(publication.epoch)
        if publication.offset != self.top + 1:
            self.clear()
        self.top = publication.offset
        self._retain(publication)

    def accept(self, publication: Publication) -> bool:
        """Takes a publication whose offset and epoch were assigned elsewhere: False if the
        stream has it already (same epoch, offset not above the top). One of another epoch,
        or past the top + 1, starts the stream afresh: a client resuming from before it is
        told recovered=False, never handed a gap."""
        if publication.epoch == self.epoch and publication.offset <= self.top:
            return False
        self.restore(publication)
        return True

    def restore_top(self, epoch: str, top: int) -> None:
        if epoch != self.epoch:
            self.reset(epoch)
        if top != self.top:
            self.clear()
            self.top = top

    def trim(self, now: float) -> None:
        """Forgets publications older than max_age."""
        oldest_kept = now - self.max_age
        retained = self._retained
        while retained and retained[0][0].time < oldest_kept:
            self.evict_oldest()

    def recover(self, since: StreamPosition, now: float) -> Recovery:
        """Every publication after `since`, or recovered=False if history does not cover it."""
        self.trim(now)
        position = self.position
        if since.epoch != self.epoch or not 0 <= since.offset <= self.top:
            return Recovery(False, (), position)
        if since.offset == self.top:
            return Recovery(True, (), position)
        retained = self._retained
        oldest = retained[0][0].offset if retained else self.top + 1
        if since.offset + 1 < oldest:
            return Recovery(False, (), position)
        # Offsets in the deque are consecutive, so the missed ones are a suffix.
        missed = self.top - since.offset
        start = len(retained) - missed
        publications = tuple(retained[i][0] for i in range(start, len(retained)))
        return Recovery(True, publications, position)


class History:
    """The streams of every channel, created on first use.

    `max_bytes` bounds what all of them retain together (None: no bound). A retained
    publication counts ENTRY_BYTES plus its size: what its appender says with `charge` (the
    hub: its `pub` frame's), or else `measure(publication)` (by default its data as JSON,
    plus its channel name), which is also how publications replayed from a log are counted.
    """

    def __init__(
        self,
        max_size: int,
        max_age: float,
        new_epoch: Callable[[], str],
        idle_ttl: float,
        *,
        max_bytes: int | None = None,
        measure: Callable[[Publication], int] | None = None,
    ) -> None:
        if max_size < 0 or max_age < 0 or idle_ttl < 0:
            raise ValueError("history limits must not be negative")
        self.max_size = max_size
        self.max_age = max_age
        self.idle_ttl = idle_ttl
        self.budget = HistoryBudget(max_bytes)
        self.measure = measure or _json_size
        self._new_epoch = new_epoch
        self._streams: dict[str, ChannelStream] = {}
        self._last_used: dict[str, float] = {}
        self.log: HistoryLog | None = None
        """The durable log every publication is written to (`attach`), or None."""

    def __contains__(self, channel: str) -> bool:
        return channel in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def stream(self, channel: str, now: float) -> ChannelStream:
        """The channel's stream, made (with a fresh epoch) if it does not exist."""
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._new_stream(channel, self._new_epoch())
            if self.log is not None:
                self.log.note_epoch(channel, stream.epoch, 0)
        self._last_used[channel] = now
        return stream

    def append(
        self,
        channel: str,
        data: Any,
        now: float,
        publisher: str | None = None,
        key: str | None = None,
        hlc: Timestamp | None = None,
        change: Any = None,
        *,
        size: int | None = None,
    ) -> Publication:
        """Appends a publication to the channel's stream (and to the log, if any).

        It counts against the budget as `size` bytes, or, if None, as `measure` says; a caller
        that learns its size only later passes 0 and calls `charge`.
        """
        stream = self.stream(channel, now)
        publication = stream.append(data, now, publisher, key, hlc, change)
        self._logged(stream, publication, size)
        return publication

    def accept(
        self, publication: Publication, now: float, *, size: int | None = None
    ) -> Publication | None:
        """Takes a publication whose offset and epoch were assigned elsewhere (another node)
        into its channel's stream, stamped `now` (its age counts from here); returns it, or
        None if the stream has it already. See `ChannelStream.accept`; `size` as `append`."""
        channel = publication.channel
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._new_stream(channel, publication.epoch)
        self._last_used[channel] = now
        publication = attrs.evolve(publication, time=now)
        if not stream.accept(publication):
            return None
        stream.trim(now)
        self._logged(stream, publication, size)
        return publication

    def _logged(self, stream: ChannelStream, publication: Publication, size: int | None) -> None:
        """Writes a new publication to the log, if any, and counts it against the budget."""
        log = self.log
        if log is not None:
            log.append(publication, _encode_change(publication.change))
            if log.full:
                log.start_segment(self._snapshot())
                log.compact(self._holds)
        if size is None:
            size = self.measure(publication)
        if size:
            stream.charge(publication, size)
        elif self.budget.over:  # ENTRY_BYTES alone took it over
            self.budget.enforce()

    def charge(self, publication: Publication, size: int) -> None:
        """`publication`, just appended with `size=0`, counts `size` more bytes; the oldest
        publications are forgotten if the budget is over."""
        self._streams[publication.channel].charge(publication, size)

    def _new_stream(self, channel: str, epoch: str) -> ChannelStream:
        stream = ChannelStream(channel, epoch, self.max_size, self.max_age, self.budget)
        self._streams[channel] = stream
        return stream

    def reset(self, channel: str, now: float) -> StreamPosition:
        """Gives the channel's stream a new epoch and forgets what it retained, so a client
        resuming from before gets recovered=False. Returns the new position."""
        stream = self.stream(channel, now)
        stream.reset(self._new_epoch())
        if self.log is not None:
            self.log.note_epoch(channel, stream.epoch, stream.top)
        return stream.position

    # -- durable history -------------------------------------------------------------------

    def attach(self, log: HistoryLog, now: float, wall: float) -> None:
        """Replays `log` (opened here) into the streams, then writes every publication to it.

        `now` is the owner's monotonic time and `wall` the wall clock at the same moment
        (publications keep their age across the restart). A log found damaged (a torn or
        corrupt record, or not closed before a reboot) gives every channel a new epoch:
        which channels lost records is unknown, so no old position is trusted.
        """
        if self.log is not None:
            raise RuntimeError("a durable log is attached already")
        records = log.open()
        for record in records:
            self._replay(record, now, wall)
        if log.damaged or log.unclean_reboot:
            for stream in self._streams.values():
                stream.reset(self._new_epoch())
        for channel, stream in self._streams.items():
            stream.trim(now)
            self._last_used[channel] = now
        log.start_segment(self._snapshot())
        log.compact(self._holds)
        self.log = log

    def _replay(self, record: LogRecord, now: float, wall: float) -> None:
        fields = record.fields
        if record.kind == "p":
            channel, epoch = fields["c"], fields["e"]
            stream = self._streams.get(channel)
            if stream is None:
                stream = self._new_stream(channel, epoch)
            data = fields["d"]
            if fields.get("f"):
                data = orjson.Fragment(orjson.dumps(data))
            hlc = fields.get("h")
            publication = Publication(
                channel,
                fields["o"],
                epoch,
                data,
                now - max(0.0, wall - fields["w"]),
                fields.get("u"),
                fields.get("y"),
                Timestamp.decode(hlc) if hlc is not None else None,
                _decode_change(fields.get("r")),
            )
            stream.restore(publication)
            stream.charge(publication, self.measure(publication))
        elif record.kind == "e":
            self._restore_top(fields["c"], fields["e"], fields["o"])
        elif record.kind == "s":
            for channel, epoch, top in fields.get("streams", ()):
                self._restore_top(channel, epoch, top)

    def _restore_top(self, channel: str, epoch: str, top: int) -> None:
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._new_stream(channel, epoch)
        stream.restore_top(epoch, top)

    def _snapshot(self) -> list[tuple[str, str, int]]:
        return [(c, s.epoch, s.top) for c, s in self._streams.items()]

    def _holds(self, channel: str, epoch: str, offset: int) -> bool:
        stream = self._streams.get(channel)
        return stream is not None and stream.holds(epoch, offset)

    def channels(self) -> list[str]:
        return list(self._streams)

    def recover(self, channel: str, since: StreamPosition, now: float) -> Recovery:
        return self.stream(channel, now).recover(since, now)

    def retained(self, channel: str, now: float) -> Recovery:
        """Every retained publication of the channel; `recovered` says whether they reach
        back to its first publication."""
        stream = self.stream(channel, now)
        stream.trim(now)
        retained = tuple(stream)
        complete = stream.top == 0 or (bool(retained) and retained[0].offset == 1)
        return Recovery(complete, retained, stream.position)

    def expire(self, now: float, in_use: Callable[[str], bool]) -> list[str]:
        """Trims every stream by age and drops streams idle for idle_ttl that nobody uses.

        A dropped stream loses its epoch: a client resuming later gets recovered=False.
        Returns the dropped channels.
        """
        dropped = []
        for channel, stream in list(self._streams.items()):
            stream.trim(now)
            if now - self._last_used[channel] >= self.idle_ttl and not in_use(channel):
                stream.clear()
                del self._streams[channel]
                del self._last_used[channel]
                dropped.append(channel)
        if dropped:
            self.budget.rebuild(self._streams.values())
        if self.log is not None:
            self.log.compact(self._holds)
        return dropped


def _json_size(publication: Publication) -> int:
    """A publication's data as JSON, plus its channel name, in bytes."""
    return len(orjson.dumps(publication.data)) + len(publication.channel)


def _encode_change(change: Any) -> Any:
    """A publication's row change as the durable log keeps it: the fields a recovering
    subscriber's row filters are matched against."""
    if change is None:
        return None
    if isinstance(change, tuple):  # (TRUNCATE, schema, table)
        return list(change)
    if isinstance(change, PgChange):
        event = change.event
        return ["ROW", event.type, event.schema, event.table, event.record, event.old_record]
    return None


def _decode_change(value: Any) -> Any:
    if not value:
        return None
    if value[0] == "ROW":
        return RowEvent(value[1], value[2], value[3], value[4], value[5])
    return tuple(value)
