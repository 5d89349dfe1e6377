"""The WAL source against a real PostgreSQL 15: row events reach the subscribers whose
subscriptions match them, on every transport, with nothing lost or doubled across outages of
Postgres, of the replication link and of the hub, and gaps reported when the slot is lost."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import pytest
import trio
from nodekit import until
from pgserver import PostgresServer, free_port
from walkit import run_sql, running, wal_source

from pyrt.client import connect
from pyrt.node.node import Node, NodeConfig, Session
from pyrt.node.sources import SourceError, load_sources
from pyrt.plugins.wal import WalSource
from pyrt.postgres.replication import ReplicationStream
from pyrt.testing import check_source, open_auth


class Subscriber:
    """A hub session driven directly (as a transport would), collecting what it is sent."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.session: Session = node.open_session(transport="test", pings=False)
        self.frames: list[dict[str, Any]] = []
        self._ids = 0

    def collect(self) -> list[dict[str, Any]]:
        while self.session.queued:
            for frame in self.session.take(max_bytes=1 << 30):
                self.frames.append(orjson.loads(frame))
        return self.frames

    async def request(self, **command: Any) -> dict[str, Any]:
        self._ids += 1
        rid = self._ids
        await self.session.receive(orjson.dumps({**command, "id": rid}))
        reply = next(f for f in self.collect() if f.get("reply") == rid)
        return reply

    async def subscribe(self, *changes: dict[str, Any], **extra: Any) -> dict[str, Any]:
        reply = await self.request(cmd="join", changes=list(changes), **extra)
        assert "ok" in reply, reply
        ok: dict[str, Any] = reply["ok"]
        return ok

    def events(self) -> list[dict[str, Any]]:
        return [f for f in self.collect() if f.get("push") == "pub"]

    async def wait_events(self, n: int, timeout: float = 20) -> list[dict[str, Any]]:
        """Every publication so far, once there are `n`: woken by the hub's nudges."""
        with trio.fail_after(timeout):
            while len(self.events()) < n:
                await self.session.wait_changed()
        return self.events()


def rows(events: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """(type, id) of each event: the new row's id, else the old row's."""
    out = []
    for event in events:
        data = event["data"]
        row = data.get("record") or data.get("old_record") or {}
        out.append((data["type"], row.get("id")))
    return out


# -- the conformance kit -------------------------------------------------------------------


async def test_wal_source_passes_the_kit(postgres: PostgresServer, wal_db: str) -> None:
    async def produce(values: Sequence[str]) -> None:
        inserts = ";".join(f"INSERT INTO kit (body) VALUES ({postgres_literal(v)})" for v in values)
        await run_sql(postgres, wal_db, inserts)

    await check_source(
        lambda: wal_source(postgres, wal_db),
        produce,
        channel="pg:public:kit",
        value=lambda data: data["record"]["body"],
    )


def postgres_literal(text: str) -> str:
    return "E'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# -- routing and the payload ---------------------------------------------------------------


async def test_changes_reach_matching_subscribers_only(
    postgres: PostgresServer, wal_db: str
) -> None:
    source = wal_source(postgres, wal_db)
    async with running(source) as node:
        inserts, updates, deletes, every, other, anything, plain = (
            Subscriber(node) for _ in range(7)
        )
        await inserts.subscribe({"event": "INSERT", "table": "items"})
        await updates.subscribe({"event": "UPDATE", "table": "items", "filter": "n=gt.10"})
        await deletes.subscribe({"event": "delete", "schema": "public", "table": "items"})
        reply = await every.subscribe({"event": "*", "table": "items"})
        assert reply["channel"] == "pg:public:items"
        assert reply["changes"] == [
            {"event": "*", "schema": "public", "table": "items", "filter": None, "id": 4}
        ]
        await other.subscribe({"table": "other"})
        pattern = await anything.subscribe({"schema": "*", "table": "*", "event": "INSERT"})
        assert pattern["channel"] == "pg:*:*"
        await plain.request(cmd="join", channel="pg:public:items")

        await run_sql(
            postgres,
            wal_db,
            "INSERT INTO items VALUES (1, 'a', 5), (2, 'b', 20);"
            "UPDATE items SET n = 30 WHERE id = 1; UPDATE items SET n = 1 WHERE id = 2;"
            "DELETE FROM items WHERE id = 1;"
            "INSERT INTO other VALUES (7, 'x');"
            "INSERT INTO unpublished VALUES ('never');"
            "TRUNCATE items",
        )
        await until(lambda: source.events >= 7, "7 events")
        assert rows(inserts.events()) == [("INSERT", 1), ("INSERT", 2)]
        assert rows(updates.events()) == [("UPDATE", 1)]
        assert rows(deletes.events()) == [("DELETE", 1)]
        assert rows(every.events()) == [
            ("INSERT", 1),
            ("INSERT", 2),
            ("UPDATE", 1),
            ("UPDATE", 2),
            ("DELETE", 1),
            ("TRUNCATE", None),
        ]
        assert rows(other.events()) == [("INSERT", 7)]
        assert rows(anything.events()) == [("INSERT", 1), ("INSERT", 2), ("INSERT", 7)]
        # A plain join of the table's channel gets every row event.
        assert len(plain.events()) == 6

        # Offsets are the channel's; each frame names the subscriptions it matched.
        offsets = [e["offset"] for e in every.events()]
        assert offsets == list(range(1, 7))
        first = every.events()[0]
        assert 4 in first["ids"]
        assert first["channel"] == "pg:public:items"
        data = first["data"]
        assert list(data) == [
            "schema",
            "table",
            "commit_timestamp",
            "type",
            "columns",
            "record",
            "errors",
        ]
        assert data["record"] == {"id": 1, "body": "a", "n": 5}
        assert data["columns"] == [
            {"name": "id", "type": "int4"},
            {"name": "body", "type": "text"},
            {"name": "n", "type": "int4"},
        ]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", data["commit_timestamp"])
        assert data["errors"] is None
        truncate = every.events()[-1]["data"]
        assert truncate["type"] == "TRUNCATE"
        assert truncate["table"] == "items"
        assert [c["name"] for c in truncate["columns"]] == ["id", "body", "n"]
        # The same subscription from two connections is one entry with one id.
        again = Subscriber(node)
        reply = await again.subscribe({"event": "INSERT", "table": "items"})
        assert reply["changes"][0]["id"] == 1


async def test_filters_with_every_operator(postgres: PostgresServer, wal_db: str) -> None:
    filters = {
        "eq": "n=eq.5",
        "neq": "n=neq.5",
        "lt": "n=lt.5",
        "lte": "n=lte.5",
        "gt": "n=gt.5",
        "gte": "n=gte.5",
        "in": "n=in.(1,9)",
        "is_null": "nul=is.null",
        "is_true": "b=is.true",
        "like": "t=like.ab%",
        "ilike": "t=ilike.ab%",
        "not_eq": "n=not.eq.5",
        "not_in": "n=not.in.(1,9)",
        "not_like": "t=not.like.%bc",
        "not_is": "nul=not.is.null",
        "and": "n=gt.1,t=like.%c",
        "quoted": 't=eq."abc"',
    }
    expected = {
        "eq": {2},
        "neq": {1, 3},
        "lt": {1},
        "lte": {1, 2},
        "gt": {3},
        "gte": {2, 3},
        "in": {1, 3},
        "is_null": {1, 3},
        "is_true": {1},
        "like": {1},
        "ilike": {1, 2},
        "not_eq": {1, 3},
        "not_in": {2},
        "not_like": {2},
        "not_is": {2},
        "and": {3},
        "quoted": {1},
    }
    source = wal_source(postgres, wal_db)
    async with running(source) as node:
        sub = Subscriber(node)
        reply = await sub.subscribe(
            *({"event": "INSERT", "table": "ops", "filter": f} for f in filters.values())
        )
        name_of = {entry["id"]: name for entry, name in zip(reply["changes"], filters, strict=True)}
        await run_sql(
            postgres,
            wal_db,
            "INSERT INTO ops VALUES (1, 1, 'abc', true, NULL), (2, 5, 'ABd', false, 'x'),"
            " (3, 9, 'xbc', NULL, NULL)",
        )
        events = await sub.wait_events(3)
        got: dict[str, set[int]] = {name: set() for name in filters}
        for event in events:
            for sub_id in event["ids"]:
                got[name_of[sub_id]].add(event["data"]["record"]["id"])
        assert got == expected


async def test_replica_identity_default_and_full(postgres: PostgresServer, wal_db: str) -> None:
    source = wal_source(postgres, wal_db)
    async with running(source) as node:
        by_status, by_key, full = Subscriber(node), Subscriber(node), Subscriber(node)
        await by_status.subscribe({"event": "DELETE", "table": "rd", "filter": "status=eq.gone"})
        await by_key.subscribe(
            {"event": "DELETE", "table": "rd", "filter": "id=eq.1"},
            {"event": "UPDATE", "table": "rd"},
        )
        await full.subscribe(
            {"event": "DELETE", "table": "rf", "filter": "status=eq.gone"},
            {"event": "UPDATE", "table": "rf"},
        )
        await run_sql(
            postgres,
            wal_db,
            "INSERT INTO rd VALUES (1, 'new'); INSERT INTO rf VALUES (1, 'new');"
            "UPDATE rd SET status = 'gone'; UPDATE rf SET status = 'gone';"
            "DELETE FROM rd; DELETE FROM rf;",
        )
        await until(lambda: source.events >= 6, "6 events")
        # Default identity: the old row is the key only, so a filter on another column
        # cannot match a DELETE, and an UPDATE carries no old row.
        assert by_status.events() == []
        update, delete = (e["data"] for e in by_key.events())
        assert update["old_record"] == {}
        assert update["record"] == {"id": 1, "status": "gone"}
        assert delete["old_record"] == {"id": 1}
        assert "record" not in delete
        # FULL: the whole old row.
        update, delete = (e["data"] for e in full.events())
        assert update["old_record"] == {"id": 1, "status": "new"}
        assert delete["old_record"] == {"id": 1, "status": "gone"}


async def test_oversized_event_is_sent_small_with_an_error(
    postgres: PostgresServer, wal_db: str
) -> None:
    source = wal_source(postgres, wal_db, max_event_bytes=1024)
    async with running(source) as node:
        sub = Subscriber(node)
        await sub.subscribe({"table": "items"})
        await run_sql(
            postgres, wal_db, "INSERT INTO items VALUES (1, repeat('x', 5000), 3), (2, 'y', 4)"
        )
        big, small = (e["data"] for e in await sub.wait_events(2))
        assert big["errors"] == "Error 413: Payload Too Large"
        assert big["record"] == {"id": 1, "n": 3}
        assert small["errors"] is None
        assert small["record"] == {"id": 2, "body": "y", "n": 4}


async def test_bad_filter_is_refused_and_registers_nothing(
    postgres: PostgresServer, wal_db: str
) -> None:
    source = wal_source(postgres, wal_db)
    async with running(source) as node:
        sub = Subscriber(node)
        reply = await sub.request(
            cmd="join",
            changes=[{"table": "items"}, {"table": "items", "filter": "n=between.1"}],
        )
        error = reply["error"]
        assert error["code"] == 400
        assert (error["index"], error["position"]) == (1, 2)
        assert error["reason"] == "unknown operator 'between'"
        assert "changes[1].filter" in error["message"]
        # Nothing was registered: the channel can be joined now, and nothing arrives before.
        await run_sql(postgres, wal_db, "INSERT INTO items VALUES (1, 'a', 1)")
        await until(lambda: source.events >= 1, "the insert")
        assert sub.events() == []
        await sub.subscribe({"table": "items"})


async def test_a_confirmed_subscription_is_live(postgres: PostgresServer, wal_db: str) -> None:
    source = wal_source(postgres, wal_db)
    async with running(source) as node:
        for n in range(5):
            sub = Subscriber(node)
            await sub.subscribe({"event": "INSERT", "table": "items", "filter": f"id=eq.{n}"})
            # The reply is in hand: a row committed now must arrive.
            await run_sql(postgres, wal_db, f"INSERT INTO items VALUES ({n}, 'live', 0)")
            (event,) = await sub.wait_events(1)
            assert event["data"]["record"]["id"] == n


async def test_since_replays_history_filtered(postgres: PostgresServer, wal_db: str) -> None:
    source = wal_source(postgres, wal_db)
    async with running(source) as node:
        sub = Subscriber(node)
        reply = await sub.subscribe({"table": "items", "filter": "n=gt.10"})
        position = {"offset": reply["offset"], "epoch": reply["epoch"]}
        sub.session.end()
        await run_sql(
            postgres,
            wal_db,
            "INSERT INTO items SELECT g, 'r', g * 5 FROM generate_series(1, 6) g;TRUNCATE items",
        )
        await until(lambda: source.events >= 7, "7 events")
        back = Subscriber(node)
        reply = await back.subscribe({"table": "items", "filter": "n=gt.10"}, since=position)
        assert reply["recovered"] is True
        assert reply["offset"] == 7
        # Only the rows the filter passes (n = 15, 20, 25, 30), and the truncate.
        assert rows(back.events()) == [
            ("INSERT", 3),
            ("INSERT", 4),
            ("INSERT", 5),
            ("INSERT", 6),
            ("TRUNCATE", None),
        ]
        assert [e["offset"] for e in back.events()] == [3, 4, 5, 6, 7]
        assert all(e["ids"] == [reply["changes"][0]["id"]] for e in back.events())


# -- outages: Postgres, the replication link, the hub, the slot ----------------------------


async def test_postgres_restart_mid_stream_loses_nothing(
    postgres: PostgresServer, wal_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pyrt.sources.wal")
    source = wal_source(postgres, wal_db)
    async with running(source) as node:
        sub = Subscriber(node)
        await sub.subscribe({"event": "INSERT", "table": "items"})
        await run_sql(
            postgres, wal_db, "INSERT INTO items SELECT g, 'before', g FROM generate_series(1, 5) g"
        )
        await sub.wait_events(5)
        await trio.to_thread.run_sync(postgres.restart)
        # Committed while the source is (probably) still reconnecting: the slot keeps it.
        for n in range(6, 11):
            await run_sql(postgres, wal_db, f"INSERT INTO items VALUES ({n}, 'after', {n})")
        await sub.wait_events(10, timeout=30)
        # A fence: rows arrive in commit order, so a duplicate would come before it.
        await run_sql(postgres, wal_db, "INSERT INTO items VALUES (11, 'fence', 11)")
        events = await sub.wait_events(11)
        assert [id_ for _, id_ in rows(events)] == list(range(1, 12))
        assert [e["offset"] for e in events] == list(range(1, 12))
        assert source.connects >= 2
    # The restart is logged as what it is, not as a protocol error.
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "pyrt.sources.wal"]
    ended = f"wal: PostgreSQL at {postgres.host}:{postgres.port} stopped streaming slot"
    assert [
        level for level, text in logged if text.startswith(ended) and "shutting down" in text
    ] == [logging.WARNING]
    assert not [text for _, text in logged if "unexpected" in text or "protocol" in text]


async def test_commits_sent_again_by_the_slot_are_skipped(
    postgres: PostgresServer, wal_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = wal_source(postgres, wal_db, application_name="pyrt-wal-resend")
    async with running(source) as node:
        sub = Subscriber(node)
        await sub.subscribe({"table": "items"})
        # Nothing is acked: the slot will send these again after the link breaks.
        withheld: list[int] = []
        monkeypatch.setattr(ReplicationStream, "ack", lambda self, lsn: withheld.append(lsn))
        for n in range(1, 4):
            await run_sql(postgres, wal_db, f"INSERT INTO items VALUES ({n}, 'x', {n})")
        await sub.wait_events(3)
        # The pump acks after the events are out (and flushed): wait until it has tried to
        # ack the last commit, or the real ack could still confirm it once the patch is gone.
        await until(
            lambda: bool(withheld) and withheld[-1] >= source.committed_lsn > 0,
            "the pump's ack of the third commit",
        )
        monkeypatch.undo()
        await run_sql(
            postgres,
            wal_db,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_replication"
            " WHERE application_name = 'pyrt-wal-resend'",
        )
        await until(lambda: source.connects >= 2, "a reconnect")
        await until(lambda: source.skipped >= 3, "the commits sent again")
        # Row 4, committed after the link came back, is the fence: a commit sent again and
        # published twice would come before it.
        await run_sql(postgres, wal_db, "INSERT INTO items VALUES (4, 'y', 4)")
        events = await sub.wait_events(4)
        assert [id_ for _, id_ in rows(events)] == [1, 2, 3, 4]
        assert [e["offset"] for e in events] == [1, 2, 3, 4]
        assert source.skipped == 3


async def test_hub_restart_resumes_from_the_slot(postgres: PostgresServer, wal_db: str) -> None:
    first = wal_source(postgres, wal_db)
    async with running(first) as node:
        sub = Subscriber(node)
        reply = await sub.subscribe({"table": "items"})
        await run_sql(postgres, wal_db, "INSERT INTO items VALUES (1, 'a', 1), (2, 'b', 2)")
        events = await sub.wait_events(2)
        old = {"offset": events[-1]["offset"], "epoch": reply["epoch"]}
    # The hub is down: these wait in the slot.
    await run_sql(postgres, wal_db, "INSERT INTO items VALUES (3, 'c', 3); DELETE FROM items")
    second = wal_source(postgres, wal_db)
    async with running(second) as node:
        await until(lambda: second.events >= 3, "the changes made while the hub was down")
        history = node.hub.history("pg:public:items", node.now)
        data = [orjson.loads(orjson.dumps(p.data)) for p in history.publications]
        assert [(d["type"], (d.get("record") or d.get("old_record"))["id"]) for d in data] == [
            ("INSERT", 3),
            ("DELETE", 1),
            ("DELETE", 2),
            ("DELETE", 3),
        ]
        # A client resuming with the old epoch is told to reload.
        back = Subscriber(node)
        reply = await back.subscribe({"table": "items"}, since=old)
        assert reply["recovered"] is False
        assert reply["epoch"] != old["epoch"]


async def test_invalidated_slot_is_a_gap_then_a_new_slot(
    postgres: PostgresServer, wal_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = wal_source(postgres, wal_db)
    async with running(source) as node:
        sub = Subscriber(node)
        reply = await sub.subscribe({"table": "items"})
        await run_sql(postgres, wal_db, "INSERT INTO items VALUES (1, 'a', 1)")
        await sub.wait_events(1)
        monkeypatch.setattr(ReplicationStream, "ack", lambda self, lsn: None)
        await run_sql(postgres, "postgres", "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        await run_sql(postgres, "postgres", "SELECT pg_reload_conf()")
        try:
            for n in range(2, 6):  # received, never acked: the slot falls behind
                await run_sql(postgres, wal_db, f"INSERT INTO items VALUES ({n}, 'lost?', {n})")
                await run_sql(postgres, wal_db, "SELECT pg_switch_wal()")
            await sub.wait_events(5)
            monkeypatch.undo()
            await run_sql(postgres, wal_db, "CHECKPOINT")
            await until(lambda: source.invalidations >= 1, "the invalidation", timeout=30)
        finally:
            await run_sql(postgres, "postgres", "ALTER SYSTEM RESET max_slot_wal_keep_size")
            await run_sql(postgres, "postgres", "SELECT pg_reload_conf()")
        await until(lambda: source.connected, "streaming from the new slot")
        resets = [f for f in sub.collect() if f.get("push") == "reset"]
        assert len(resets) == 1
        assert resets[0]["channel"] == "pg:public:items"
        assert resets[0]["recovered"] is False
        assert resets[0]["epoch"] != reply["epoch"]
        # The subscription is still live, in the new epoch.
        await run_sql(postgres, wal_db, "INSERT INTO items VALUES (10, 'new slot', 10)")
        await until(lambda: rows(sub.events())[-1] == ("INSERT", 10), "the row after the gap")
        assert sub.events()[-1]["epoch"] == resets[0]["epoch"]
        status = await run_sql(
            postgres,
            wal_db,
            f"SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{wal_db}'",
        )
        assert status != "lost"


# -- startup errors, config, metrics ------------------------------------------------------


async def start_failure(source: WalSource) -> SourceError:
    node = Node(
        NodeConfig(auth=open_auth(), port=0, transports=()), transports=[], sources=[source]
    )
    with pytest.raises(BaseExceptionGroup) as caught:
        with trio.fail_after(30):
            await node.run()
    group = caught.value.subgroup(SourceError)
    assert group is not None
    leaves = list(_leaves(group))
    assert len(leaves) == 1
    error = leaves[0]
    assert isinstance(error, SourceError)
    return error


def _leaves(group: BaseExceptionGroup[Any]) -> Iterator[BaseException]:
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e


async def test_startup_errors_are_clear(postgres: PostgresServer, wal_db: str) -> None:
    error = await start_failure(wal_source(postgres, wal_db, password="wrong"))
    assert "sources.wal" in str(error)
    assert "password authentication failed" in str(error)
    assert "28P01" in str(error)

    port = free_port()
    error = await start_failure(
        wal_source(postgres, wal_db, port=port, startup_timeout=1.0, connect_timeout=1.0)
    )
    assert "no connection to PostgreSQL within startup_timeout (1 s)" in str(error)
    assert f"127.0.0.1:{port}" in str(error)

    error = await start_failure(wal_source(postgres, wal_db, publication="nope"))
    assert "publication 'nope' does not exist" in str(error)
    assert "pg-setup" in str(error)

    error = await start_failure(wal_source(postgres, wal_db, create_slot=False))
    assert f"replication slot '{wal_db}' does not exist" in str(error)


def test_options_and_entry_point(postgres: PostgresServer) -> None:
    (source,) = load_sources({"wal": {"port": postgres.port, "slot": "s1", "publication": "p"}})
    assert isinstance(source, WalSource)
    (named,) = load_sources({"orders": {"plugin": "wal", "slot": "s2"}})
    assert named.name == "orders"
    for options, message in [
        ({"slot": "Bad-Slot"}, "replication slot name"),
        ({"max_event_bytes": 10}, "max_event_bytes must be at least 256"),
        ({"messages_channel": "a b"}, "messages_channel"),
        ({"create_slot": "yes"}, "create_slot must be true or false"),
        ({"password": "x", "password_env": "Y"}, "not both"),
        ({"reconnect_min": 5, "reconnect_max": 1}, "reconnect_max"),
        ({"bogus": 1}, "bogus"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_sources({"wal": options})


async def test_lag_is_exposed_in_metrics(postgres: PostgresServer, wal_db: str) -> None:
    source = wal_source(postgres, wal_db)
    async with running(source, transports=["websocket"]) as node:
        await run_sql(postgres, wal_db, "INSERT INTO items VALUES (1, 'a', 1)")
        await until(lambda: source.events >= 1, "the insert")
        await until(lambda: source.lag_bytes == 0, "the lag to settle")
        stream = await trio.open_tcp_stream("127.0.0.1", node.port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            body = b""
            while chunk := await stream.receive_some():
                body += chunk
        text = body.decode()
        assert 'pyrt_source_lag_bytes{source="wal"} 0.0' in text
        match = re.search(r'pyrt_source_lag_seconds\{source="wal"\} (\S+)', text)
        assert match is not None
        assert 0 <= float(match.group(1)) < 10


# -- logical messages ----------------------------------------------------------------------


async def test_logical_messages_go_to_their_channel(postgres: PostgresServer, wal_db: str) -> None:
    source = wal_source(postgres, wal_db, messages_channel="pg:messages")
    async with running(source) as node:
        sub = Subscriber(node)
        await sub.request(cmd="join", channel="pg:messages")
        await run_sql(postgres, wal_db, "SELECT pg_logical_emit_message(true, 'app', 'in a tx')")
        await run_sql(
            postgres, wal_db, "SELECT pg_logical_emit_message(false, 'app', '\\x00ff'::bytea)"
        )
        events = await sub.wait_events(2)
        first, second = (e["data"] for e in events)
        assert first["prefix"] == "app"
        assert first["transactional"] is True
        assert first["content"] == "in a tx"
        assert second["transactional"] is False
        assert second["content"] is None
        assert second["content_hex"] == "00ff"


# -- clients over real transports ----------------------------------------------------------


@pytest.mark.parametrize("transport", ["websocket", "sse", "longpoll"])
async def test_python_client_subscribes_and_dedupes_across_reconnects(
    postgres: PostgresServer, wal_db: str, transport: str
) -> None:
    source = wal_source(postgres, wal_db)
    async with (
        running(source, transports=["websocket", "sse", "longpoll"]) as node,
        connect(f"http://127.0.0.1:{node.port}", transports=[transport]) as client,
    ):
        channel = await client.changes(
            [
                {"event": "INSERT", "table": "items", "filter": "n=gte.10"},
                {"event": "DELETE", "table": "items"},
            ]
        )
        assert channel.name == "pg:public:items"
        insert_id, delete_id = channel.subscription_ids
        await run_sql(
            postgres,
            wal_db,
            "INSERT INTO items VALUES (1, 'small', 1), (2, 'big', 20); DELETE FROM items",
        )
        got = []
        with trio.fail_after(20):
            async for message in channel:
                got.append(message)
                if len(got) == 3:
                    break
        assert [(m.data["type"], m.ids) for m in got] == [
            ("INSERT", (insert_id,)),
            ("DELETE", (delete_id,)),
            ("DELETE", (delete_id,)),
        ]
        # Disconnected: rows committed meanwhile come after the reconnect, once each.
        client.drop_connection()
        await run_sql(postgres, wal_db, "INSERT INTO items VALUES (3, 'later', 30)")
        with trio.fail_after(20):
            message = await channel.__anext__()
        assert message.data["record"]["id"] == 3
        assert channel.recovered is True
        assert message.offset == got[-1].offset + 1
