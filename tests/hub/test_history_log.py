"""Durable history (pyrt.hub.historylog): a log on disk that a restarted hub replays, so offsets,
epochs and recovery continue; torn and corrupt tails are cut off and never served."""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from pgoutputkit import row_changes

from pyrt._core import RowEvent
from pyrt.conflict import Timestamp
from pyrt.hub import historylog as _historylog
from pyrt.hub.history import History, StreamPosition
from pyrt.hub.historylog import HEADER, MAGIC, HistoryLog
from pyrt.hub.hub import Connection, Hub, HubConfig

WALL = 1_700_000_000.0


def frames(conn: Connection) -> list[dict[str, Any]]:
    """What the hub queued for `conn` (these tests drive connections themselves)."""
    return [orjson.loads(f) for f in conn.outbox.pop(max_bytes=1 << 30)]


def join_all(hub: Hub, conn: Connection, rid: int = 1, **command: Any) -> list[dict[str, Any]]:
    """A join's reply and what follows it (a replay)."""
    hub.receive(conn.id, orjson.dumps({"cmd": "join", "id": rid, **command}), 0.0)
    return frames(conn)


def make(max_size: int = 100, max_age: float = 1000.0) -> History:
    counter = itertools.count(1)
    prefix = os.urandom(3).hex()
    return History(max_size, max_age, lambda: f"{prefix}-{next(counter)}", idle_ttl=3600.0)


def reopen(
    directory: Path, max_size: int = 100, max_age: float = 1000.0, now: float = 0.0, **kw: Any
) -> tuple[History, HistoryLog]:
    history = make(max_size, max_age)
    clock = {"now": now}
    log = HistoryLog(directory, wall_clock=lambda: WALL + clock["now"], **kw)
    history.attach(log, now, WALL + now)
    log.test_clock = clock  # type: ignore[attr-defined]
    return history, log


def last_segment(directory: Path) -> Path:
    return sorted(directory.glob("*.log"))[-1]


def test_a_restart_continues_offsets_epochs_and_recovery(tmp_path: Path) -> None:
    history, log = reopen(tmp_path)
    stamp = Timestamp(1_700_000_000_000, 3, "n1")
    for i in range(5):
        history.append("room", {"n": i, "s": 'é"\\'}, float(i), "c1", "k", stamp)
    history.append("other", [1, 2], 5.0)
    history.stream("empty", 5.0)  # made by a join: its epoch counts too
    reset = history.reset("other", 6.0)
    epochs = {c: history.stream(c, 6.0).epoch for c in ("room", "other", "empty")}
    log.close()

    again, _ = reopen(tmp_path, now=10.0)
    assert {c: again.stream(c, 10.0).epoch for c in epochs} == epochs
    recovery = again.recover("room", StreamPosition(2, epochs["room"]), 10.0)
    assert recovery.recovered
    assert [p.data["n"] for p in recovery.publications] == [2, 3, 4]
    first = recovery.publications[0]
    assert (first.publisher, first.key, first.hlc) == ("c1", "k", stamp)
    assert first.data["s"] == 'é"\\'
    # After the reset, the old epoch is refused and the new position is kept.
    assert again.stream("other", 10.0).position == reset
    assert again.recover("other", StreamPosition(1, "old"), 10.0).recovered is False
    assert again.recover("empty", StreamPosition(0, epochs["empty"]), 10.0).recovered
    assert again.append("room", "next", 11.0).position == StreamPosition(6, epochs["room"])


def test_ages_survive_a_restart(tmp_path: Path) -> None:
    history, log = reopen(tmp_path, max_age=100.0)
    history.append("room", "old", 0.0)
    log.test_clock["now"] = 90.0  # type: ignore[attr-defined]
    history.append("room", "new", 90.0)
    log.close()
    # 50 s later (wall clock): "old" is 140 s old, "new" 50 s.
    again, _ = reopen(tmp_path, max_age=100.0, now=140.0)
    epoch = again.stream("room", 140.0).epoch
    recovery = again.recover("room", StreamPosition(1, epoch), 140.0)
    assert [p.data for p in recovery.publications] == ["new"]
    assert again.recover("room", StreamPosition(0, epoch), 140.0).recovered is False


def test_segments_rotate_and_old_ones_are_deleted(tmp_path: Path) -> None:
    history, log = reopen(tmp_path, max_size=5, max_age=1e6, segment_bytes=4096)
    for i in range(2000):
        history.append(f"ch:{i % 3}", {"i": i, "pad": "x" * 40}, float(i))
        if i == 10:
            log.note_position("wal", [123, 4, 0])
    assert log.segments[0].name != "000000000001.log"  # the first ones are gone
    assert 2 <= len(log.segments) <= 4
    log.close()
    again, again_log = reopen(tmp_path, max_size=5, max_age=1e6, segment_bytes=4096, now=2000.0)
    # The position written long ago (its segment deleted) came along in the snapshots.
    assert again_log.position("wal") == [123, 4, 0]
    stream = again.stream("ch:1", 2000.0)
    assert stream.top == 667
    assert [p.data["i"] for p in stream] == [1987, 1990, 1993, 1996, 1999]
    recovery = again.recover("ch:1", StreamPosition(664, stream.epoch), 2000.0)
    assert recovery.recovered
    assert len(recovery.publications) == 3


def _crash(log: HistoryLog) -> None:
    """The process dies: no clean close (the kernel keeps what was written)."""
    assert log._fd is not None
    os.close(log._fd)
    log._fd = None


@pytest.mark.parametrize(
    "damage",
    ["half a header", "half a record", "flipped byte", "not json", "zeros"],
)
def test_a_torn_or_corrupt_tail_is_cut_off_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    history, log = reopen(tmp_path)
    for i in range(10):
        history.append("room", {"i": i}, float(i))
    epoch = history.stream("room", 10.0).epoch
    _crash(log)
    path = last_segment(tmp_path)
    good = path.read_bytes()
    payload = orjson.dumps({"k": "p", "c": "room", "o": 11, "e": epoch, "w": WALL, "d": "torn"})
    record = HEADER.pack(len(payload), 0) + payload
    if damage == "half a header":
        tail = record[:5]
    elif damage == "half a record":
        tail = HEADER.pack(len(payload), 0) + payload[:10]
    elif damage == "zeros":
        tail = b"\0" * 300  # a file extended but never written (metadata before data)
    else:
        import zlib

        body = b"[1, 2]" if damage == "not json" else payload
        record = HEADER.pack(len(body), zlib.crc32(body)) + body
        if damage == "flipped byte":
            record = record[:20] + bytes([record[20] ^ 0x40]) + record[21:]
        tail = record
    path.write_bytes(good + tail)

    with caplog.at_level(logging.WARNING, logger="pyrt.history"):
        again, again_log = reopen(tmp_path, now=20.0)
    assert again_log.damaged
    # The bad tail was cut off; then the segment was deleted, since under the new epochs
    # nothing in it is recoverable any more.
    assert not path.exists()
    assert again_log.truncated_bytes == len(tail)
    assert any(
        "truncated" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records
    )
    stream = again.stream("room", 20.0)
    # Nothing of the torn record is served; offsets continue after the last good one, in a
    # new epoch (the torn record might have been delivered: its offset must not mean two
    # different things in one epoch).
    assert stream.top == 10
    assert stream.epoch != epoch
    assert all(p.data != "torn" for p in stream)
    assert again.recover("room", StreamPosition(5, epoch), 20.0).recovered is False
    again.append("room", "after", 21.0)
    again_log.close()
    # And the repaired log reads cleanly.
    third, third_log = reopen(tmp_path, now=30.0)
    assert not third_log.damaged
    assert third.stream("room", 30.0).top == 11


def test_a_corrupt_record_in_an_older_segment_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    history, log = reopen(tmp_path, max_size=10_000, segment_bytes=4096)
    for i in range(200):
        history.append("room", {"i": i, "pad": "y" * 30}, float(i))
    epoch = history.stream("room", 200.0).epoch
    log.close()
    first = sorted(tmp_path.glob("*.log"))[0]
    data = bytearray(first.read_bytes())
    data[len(MAGIC) + 200] ^= 0xFF
    first.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="pyrt.history"):
        again, again_log = reopen(tmp_path, max_size=10_000, now=300.0)
    assert again_log.damaged
    assert any("ignored" in r.getMessage() for r in caplog.records)
    stream = again.stream("room", 300.0)
    assert stream.top == 200
    assert stream.epoch != epoch
    assert list(stream) == []  # which channels lost what is unknown: nothing is served
    assert again.append("room", "next", 301.0).offset == 201


def test_an_unclean_end_before_a_reboot_gets_new_epochs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    history, log = reopen(tmp_path)
    history.append("room", "a", 0.0)
    epoch = history.stream("room", 0.0).epoch
    _crash(log)
    # Killed, same boot: the kernel had everything, nothing changes.
    again, again_log = reopen(tmp_path)
    assert not again_log.unclean_reboot
    assert again.stream("room", 0.0).epoch == epoch
    _crash(again_log)
    monkeypatch.setattr(_historylog, "boot_id", lambda: "another-boot")
    third, third_log = reopen(tmp_path)
    assert third_log.unclean_reboot
    assert third.stream("room", 0.0).epoch != epoch
    assert third.stream("room", 0.0).top == 1


def test_row_events_replay_filtered_after_a_restart(tmp_path: Path) -> None:
    config = HubConfig(history_size=100)
    hub = Hub(config)
    log = HistoryLog(tmp_path)
    hub.attach_history_log(log, 0.0, WALL)
    for change in row_changes((1, "a", 5), (2, "b", 50), (3, "c", 500)):
        hub.publish_change(change, 1.0)
    hub.publish_truncate("public", "items", 1.0)
    epoch = hub.history_position("pg:public:items", 1.0).epoch
    log.close()

    again = Hub(config)
    again_log = HistoryLog(tmp_path)
    again.attach_history_log(again_log, 5.0, WALL + 5)
    kept = again.history("pg:public:items", 5.0).publications
    assert isinstance(kept[0].change, RowEvent)
    conn = again.open(5.0)
    replies = join_all(
        again,
        conn,
        changes=[{"event": "*", "table": "items", "filter": "n=gte.10"}],
        since={"offset": 0, "epoch": epoch},
    )
    assert replies[0]["ok"]["recovered"] is True
    assert [
        (f["data"]["type"], (f["data"].get("record") or {}).get("id")) for f in replies[1:]
    ] == [("INSERT", 2), ("INSERT", 3), ("TRUNCATE", None)]
    assert frames(conn) == []


def test_history_section_of_the_config_file(tmp_path: Path) -> None:
    from pyrt.node.config import ConfigError, node_config

    path = tmp_path / "pyrt.toml"
    path.write_text(f'[history]\ndir = "{tmp_path / "h"}"\nfsync_interval = 2\n')
    config = node_config(path)
    assert (config.history_dir, config.history_fsync_interval) == (str(tmp_path / "h"), 2.0)
    assert node_config().history_dir is None  # the default: history in memory
    for text, message in [
        ("[history]\ndri = 'x'", "history.dri: unknown setting"),
        ("[history]\ndir = 5", "history.dir: expected str, got 5"),
        ("[history]\ndir = ''", "history.dir: must not be empty"),
        ("[history]\nfsync_interval = 0", "history.fsync_interval: must be positive"),
        ("[history]\nsegment_bytes = 10", "history.segment_bytes: must be at least 4096"),
        ("[history]\nsegment_bytes = true", "history.segment_bytes: expected int"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            node_config(path)
