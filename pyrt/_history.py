"""Per-channel history: offsets, epochs, bounds by size and age, and recovery.

Every publication gets the next offset of its channel before anyone sees it. A client remembers
the position (offset, epoch) of the last publication it saw and, when it comes back, asks for
what came after. The epoch names one unbroken run of offsets: when history is lost (the hub
restarted, the stream was dropped) the epoch changes, so an old position can never be mistaken
for a recoverable one. Recovery is all or nothing: either every missed publication is returned
(`recovered=True`) or none is (`recovered=False`, reload your state).

Sans-IO: time is passed in as `now` (seconds, any monotonic origin), epochs come from a
callable the owner passes in. Durable history is an attached `HistoryLog` (pyrt._historylog,
the IO side): every publication is written to it before `append` returns, that is before the
hub queues it for anyone, and `attach` replays it at start.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import attrs
import orjson

from ._core import PgChange, RowEvent
from .conflict import Timestamp

if TYPE_CHECKING:
    from ._historylog import HistoryLog, LogRecord


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


class ChannelStream:
    """The stream of one channel: the next offset, the epoch and the retained publications."""

    __slots__ = ("_retained", "channel", "epoch", "max_age", "max_size", "top")

    def __init__(self, channel: str, epoch: str, max_size: int, max_age: float) -> None:
        self.channel = channel
        self.epoch = epoch
        self.max_size = max_size
        self.max_age = max_age
        self.top = 0
        """Offset of the latest publication; 0 before the first."""
        self._retained: collections.deque[Publication] = collections.deque(maxlen=max_size or 1)

    @property
    def position(self) -> StreamPosition:
        return StreamPosition(self.top, self.epoch)

    def __len__(self) -> int:
        return len(self._retained)

    def __iter__(self) -> Iterator[Publication]:
        return iter(self._retained)

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
        if self.max_size > 0:
            self._retained.append(publication)  # the deque's maxlen drops the oldest
        self.trim(now)
        return publication

    def reset(self, epoch: str) -> None:
        """History was lost upstream (a source's gap): a new epoch, nothing retained."""
        self.epoch = epoch
        self._retained.clear()

    def holds(self, epoch: str, offset: int) -> bool:
        """Whether the publication at (`offset`, `epoch`) is still retained."""
        if epoch != self.epoch or not self._retained:
            return False
        return self._retained[0].offset <= offset <= self.top

    def restore(self, publication: Publication) -> None:
        """Puts back a publication read from a durable log (offsets in order; a gap in
        them means what came before it is not recoverable)."""
        if publication.epoch != self.epoch:
            self.reset(publication.epoch)
        if publication.offset != self.top + 1:
            self._retained.clear()
        self.top = publication.offset
        if self.max_size > 0:
            self._retained.append(publication)

    def restore_top(self, epoch: str, top: int) -> None:
        if epoch != self.epoch:
            self.reset(epoch)
        if top != self.top:
            self._retained.clear()
            self.top = top

    def trim(self, now: float) -> None:
        """Forgets publications older than max_age."""
        oldest_kept = now - self.max_age
        retained = self._retained
        while retained and retained[0].time < oldest_kept:
            retained.popleft()

    def recover(self, since: StreamPosition, now: float) -> Recovery:
        """Every publication after `since`, or recovered=False if history does not cover it."""
        self.trim(now)
        position = self.position
        if since.epoch != self.epoch or not 0 <= since.offset <= self.top:
            return Recovery(False, (), position)
        if since.offset == self.top:
            return Recovery(True, (), position)
        retained = self._retained
        oldest = retained[0].offset if retained else self.top + 1
        if since.offset + 1 < oldest:
            return Recovery(False, (), position)
        # Offsets in the deque are consecutive, so the missed ones are a suffix.
        missed = self.top - since.offset
        start = len(retained) - missed
        return Recovery(True, tuple(retained[i] for i in range(start, len(retained))), position)


class History:
    """The streams of every channel, created on first use."""

    def __init__(
        self, max_size: int, max_age: float, new_epoch: Callable[[], str], idle_ttl: float
    ) -> None:
        if max_size < 0 or max_age < 0 or idle_ttl < 0:
            raise ValueError("history limits must not be negative")
        self.max_size = max_size
        self.max_age = max_age
        self.idle_ttl = idle_ttl
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
            stream = ChannelStream(channel, self._new_epoch(), self.max_size, self.max_age)
            self._streams[channel] = stream
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
    ) -> Publication:
        publication = self.stream(channel, now).append(data, now, publisher, key, hlc, change)
        log = self.log
        if log is not None:
            log.append(publication, _encode_change(change))
            if log.full:
                log.start_segment(self._snapshot())
                log.compact(self._holds)
        return publication

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
                stream = ChannelStream(channel, epoch, self.max_size, self.max_age)
                self._streams[channel] = stream
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
        elif record.kind == "e":
            self._restore_top(fields["c"], fields["e"], fields["o"])
        elif record.kind == "s":
            for channel, epoch, top in fields.get("streams", ()):
                self._restore_top(channel, epoch, top)

    def _restore_top(self, channel: str, epoch: str, top: int) -> None:
        stream = self._streams.get(channel)
        if stream is None:
            stream = self._streams[channel] = ChannelStream(
                channel, epoch, self.max_size, self.max_age
            )
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

    def expire(self, now: float, in_use: Callable[[str], bool]) -> list[str]:
        """Trims every stream by age and drops streams idle for idle_ttl that nobody uses.

        A dropped stream loses its epoch: a client resuming later gets recovered=False.
        Returns the dropped channels.
        """
        dropped = []
        for channel, stream in list(self._streams.items()):
            stream.trim(now)
            if now - self._last_used[channel] >= self.idle_ttl and not in_use(channel):
                del self._streams[channel]
                del self._last_used[channel]
                dropped.append(channel)
        if self.log is not None:
            self.log.compact(self._holds)
        return dropped


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
