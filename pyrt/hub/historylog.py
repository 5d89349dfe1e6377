"""Durable history: an append-only, segmented log of every publication, replayed at start.

Opt-in (`[history] dir = "..."`, `NodeConfig.history_dir`); without it history lives in
memory only. With it, every publication is written to the log by `History.append` *before*
the hub queues it for anyone, so a client can never have seen a publication the log does
not hold once the write returned; after a restart the node reloads the log, channels keep
their offsets and epochs, and a client resuming with `since` gets `recovered: true`.

Durability (the fsync policy):
- Each record goes to the kernel with one `write(2)` before delivery: a killed hub process
  (SIGKILL, OOM, a crash) loses nothing that was delivered.
- Against an OS crash or power loss the log is fsynced: by a source before it acknowledges
  upstream (the WAL source fsyncs before it acks a commit's LSN, so an acked commit is on
  disk), every `fsync_interval` seconds by the node when something was written, on segment
  rotation, and at shutdown. Publications of the last `fsync_interval` that no source
  acknowledged (REST, client publishes) can be lost by a power loss; if some of them had
  been delivered, the torn or missing tail cannot be told apart from a clean end, so the node
  compares the machine's boot id: a log not closed cleanly in an earlier boot gets new epochs
  for every channel (clients are told `recovered: false` instead of seeing offsets reused).

Format. A directory of segments `<number>.log`, each starting with the 8-byte magic
`PYRTHL01`; then records, each `u32 length | u32 crc32(payload) | payload` (little endian),
the payload one JSON object (orjson). Kinds (`"k"`):
- `p`, a publication: channel, offset, epoch, wall time, data, publisher, key, hlc, the row
  change's fields for filtered replay, and a source's position (`s`: the WAL source's
  commit LSN and sequence), written with the events it belongs to;
- `e`, a stream's epoch and top offset (a new stream, a reset);
- `s`, a snapshot of every stream (channel, epoch, top), the sources' positions and the boot
  id, first in every segment, so older segments can be deleted without losing offsets.
Segments rotate at `segment_bytes`; an old segment is deleted once none of its publications
is retained any more (the same size and age bounds as memory: `history_size`,
`history_age`, `history_idle_ttl`).

Crash safety: a record whose length runs past the end of the file, whose checksum does not
match or whose payload is not a JSON object ends the segment there; in the last segment the
rest is truncated (a torn write), with a warning in the log (`pyrt.history`). Damage
anywhere gives every channel a new epoch, since which channels lost records is unknown. The
log never serves a record that fails its checksum, and a damaged log never stops the node.

Why by hand: the history is already indexed in memory; the disk only needs an append-only
journal replayed once at start, fsynced at chosen points, and trimmed by deleting whole old
files. SQLite (the obvious well-kept candidate) would add a B-tree that is never queried,
write each row twice (page and WAL frame), need DELETE plus VACUUM to give space back, and
its commit is the only durability point, so "written before delivery, fsynced before the
upstream ack" would cost an fsync per publication or a transaction held open across trio
checkpoints. LMDB/LevelDB bindings are not in the dependencies and have the same mismatch.
The format here is about 150 lines, checksummed, and tested against torn and corrupt tails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio

__all__ = ["HistoryLog", "LogRecord"]

log = logging.getLogger("pyrt.history")

MAGIC = b"PYRTHL01"
HEADER = struct.Struct("<II")
MAX_RECORD = 1 << 30
_SEGMENT = re.compile(r"^(\d{12})\.log$")


def boot_id() -> str:
    """This boot of the machine (Linux), or "" where unknown."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@attrs.define(slots=True, eq=False)
class _Segment:
    number: int
    path: Path
    channels: dict[str, tuple[str, int]] = attrs.field(factory=dict)
    """Channel -> (epoch, highest offset) of the publications in this segment."""


@attrs.frozen(slots=True)
class LogRecord:
    """One decoded record, as replayed at start."""

    kind: str
    fields: dict[str, Any]


class HistoryLog:
    """The durable log of one node's history, in `directory` (made if missing).

    `History.attach` replays it and from then on writes every publication to it; the node
    calls `sync_async` every `fsync_interval` and `close` at shutdown; a source that
    acknowledges upstream notes its position (`note_position`) before publishing and awaits
    `sync_async` before acknowledging.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_bytes: int = 16 * 1024 * 1024,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if segment_bytes < 4096:
            raise ValueError(f"segment_bytes must be at least 4096, not {segment_bytes}")
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self._wall_clock = wall_clock
        """Stamps publications, so that their age survives a restart."""
        self._segments: list[_Segment] = []
        self._fd: int | None = None
        self._size = 0
        self._dirty = False
        self._positions: dict[str, Any] = {}
        self._position_changed: dict[str, Any] = {}
        self.damaged = False
        """Whether opening found a torn or corrupt record (and dropped it)."""
        self.unclean_reboot = False
        """Whether the log was not closed cleanly and the machine rebooted since."""
        self.truncated_bytes = 0
        self.records_written = 0
        self.syncs = 0

    def __repr__(self) -> str:
        return f"<HistoryLog {self.directory} segments={len(self._segments)}>"

    # -- opening -------------------------------------------------------------------------

    def open(self) -> list[LogRecord]:
        """Reads every segment, truncating a torn tail; returns the records in order."""
        self.directory.mkdir(parents=True, exist_ok=True)
        numbers = sorted(
            int(m.group(1)) for p in self.directory.iterdir() if (m := _SEGMENT.match(p.name))
        )
        records: list[LogRecord] = []
        last_boot = ""
        clean = True
        for index, number in enumerate(numbers):
            segment = _Segment(number, self._path(number))
            self._segments.append(segment)
            last = index == len(numbers) - 1
            for record in self._read(segment, last=last):
                clean = record.kind == "x"  # the last record of a cleanly closed log
                if clean:
                    continue
                if record.kind == "s":
                    last_boot = record.fields.get("boot", "")
                if record.kind == "p":
                    source = record.fields.get("s")
                    if source is not None:
                        self._positions[source[0]] = source[1]
                elif record.kind == "s":
                    self._positions.update(record.fields.get("pos", {}))
                records.append(record)
        if not clean and last_boot and last_boot != boot_id():
            self.unclean_reboot = True
            log.warning(
                "history log %s: not closed cleanly before the machine rebooted; writes after"
                " the last fsync may be missing, so every channel gets a new epoch",
                self.directory,
            )
        return records

    def _path(self, number: int) -> Path:
        return self.directory / f"{number:012d}.log"

    def _read(self, segment: _Segment, *, last: bool) -> Iterator[LogRecord]:
        try:
            data = segment.path.read_bytes()
        except OSError as e:
            self.damaged = True
            log.error("history log %s: cannot read (%s); skipped", segment.path, e)
            return
        position = len(MAGIC)
        why = None
        if data[: len(MAGIC)] != MAGIC:
            why, position = "no segment header", 0
        while why is None and position < len(data):
            if len(data) - position < HEADER.size:
                why = "a record header cut short"
                break
            length, crc = HEADER.unpack_from(data, position)
            start = position + HEADER.size
            if length > MAX_RECORD or start + length > len(data):
                why = "a record cut short"
                break
            payload = data[start : start + length]
            if zlib.crc32(payload) != crc:
                why = "a checksum mismatch"
                break
            try:
                fields = orjson.loads(payload)
            except orjson.JSONDecodeError:
                fields = None
            if not isinstance(fields, dict) or not isinstance(fields.get("k"), str):
                why = "a record that is not a log record"
                break
            position = start + length
            if fields["k"] == "p":
                channel, epoch, offset = fields["c"], fields["e"], fields["o"]
                segment.channels[channel] = (epoch, offset)
            yield LogRecord(fields["k"], fields)
        if why is None:
            return
        self.damaged = True
        dropped = len(data) - position
        if last:
            self.truncated_bytes += dropped
            log.warning(
                "history log %s: %s at byte %d (a write torn by a crash?); truncated %d"
                " byte(s); every channel gets a new epoch",
                segment.path,
                why,
                position,
                dropped,
            )
            with open(segment.path, "r+b") as f:
                if position == 0:
                    f.write(MAGIC)
                    position = len(MAGIC)
                f.truncate(position)
                f.flush()
                os.fsync(f.fileno())
        else:
            log.error(
                "history log %s: %s at byte %d; the %d byte(s) after it are ignored;"
                " every channel gets a new epoch",
                segment.path,
                why,
                position,
                dropped,
            )

    # -- writing -------------------------------------------------------------------------

    def start_segment(self, snapshot: list[tuple[str, str, int]]) -> None:
        """Begins a new segment with a snapshot of every stream (channel, epoch, top)."""
        if self._fd is not None:
            os.fsync(self._fd)  # everything in the old segment is durable before we move on
            os.close(self._fd)
            self._fd = None
        number = self._segments[-1].number + 1 if self._segments else 1
        segment = _Segment(number, self._path(number))
        fd = os.open(segment.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self._fd = fd
        self._segments.append(segment)
        self._size = 0
        self._write_raw(MAGIC)
        self._write(
            {
                "k": "s",
                "streams": snapshot,
                "pos": self._positions,
                "boot": boot_id(),
                "wall": self._wall_clock(),
            }
        )
        os.fsync(fd)
        self._fsync_directory()
        self._dirty = False

    @property
    def full(self) -> bool:
        return self._size >= self.segment_bytes

    def append(self, publication: Any, change: Any) -> None:
        """Writes one publication (a `pyrt.hub.history.Publication`); `change` is its row
        change encoded for the log (or None)."""
        record: dict[str, Any] = {
            "k": "p",
            "c": publication.channel,
            "o": publication.offset,
            "e": publication.epoch,
            "w": self._wall_clock(),
            "d": publication.data,
        }
        if isinstance(publication.data, orjson.Fragment):
            record["f"] = 1
        if publication.publisher is not None:
            record["u"] = publication.publisher
        if publication.key is not None:
            record["y"] = publication.key
        if publication.hlc is not None:
            record["h"] = publication.hlc.encode()
        if change is not None:
            record["r"] = change
        if self._position_changed:
            # A source's position goes with the events it belongs to (one source at a time).
            for name, value in self._position_changed.items():
                record["s"] = [name, value]
                self._positions[name] = value
            self._position_changed.clear()
        self._write(record)
        segment = self._segments[-1]
        segment.channels[publication.channel] = (publication.epoch, publication.offset)

    def note_epoch(self, channel: str, epoch: str, top: int) -> None:
        """A stream was made or got a new epoch (a reset)."""
        self._write({"k": "e", "c": channel, "e": epoch, "o": top})

    def note_position(self, source: str, value: Any) -> None:
        """`source`'s position (JSON) after the publications it appends next: stored with
        the next publication written (a source restores it with `position`)."""
        self._position_changed = {source: value}

    def position(self, source: str) -> Any:
        """The last position `source` stored with a publication, or None."""
        return self._positions.get(source)

    def _write(self, record: dict[str, Any]) -> None:
        payload = orjson.dumps(record)
        self._write_raw(HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
        self.records_written += 1

    def _write_raw(self, data: bytes) -> None:
        fd = self._fd
        if fd is None:
            raise RuntimeError("the history log is not open for writing")
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        self._size += len(data)
        self._dirty = True

    # -- durability and space ------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        """Whether something was written since the last fsync."""
        return self._dirty

    def sync(self) -> None:
        """fsync now (blocking)."""
        if self._fd is not None and self._dirty:
            self._dirty = False
            os.fsync(self._fd)
            self.syncs += 1

    async def sync_async(self) -> None:
        """fsync in a worker thread: when it returns, everything written before the call is
        on disk. (A duplicate descriptor, so a rotation meanwhile cannot close it.)"""
        if self._fd is None or not self._dirty:
            return
        self._dirty = False
        fd = os.dup(self._fd)
        try:
            await trio.to_thread.run_sync(os.fsync, fd)
        finally:
            os.close(fd)
        self.syncs += 1

    def compact(self, retained: Callable[[str, str, int], bool]) -> int:
        """Deletes old segments none of whose publications is retained: `retained(channel,
        epoch, offset)` says whether the stream still holds that publication. Returns how
        many were deleted."""
        deleted = 0
        for segment in list(self._segments[:-1]):
            if any(retained(c, e, o) for c, (e, o) in segment.channels.items()):
                continue
            with contextlib.suppress(FileNotFoundError):
                segment.path.unlink()
            self._segments.remove(segment)
            deleted += 1
        if deleted:
            self._fsync_directory()
        return deleted

    @property
    def segments(self) -> list[Path]:
        return [s.path for s in self._segments]

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Marks a clean end, fsyncs and closes."""
        if self._fd is None:
            return
        self._write({"k": "x"})
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        self._dirty = False
