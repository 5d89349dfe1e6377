"""Rows in Postgres keep a records channel up to date (the WAL source's `records` option): the
database is the source of truth, seen by the Python client's records() view."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from nodekit import until
from pgserver import PostgresServer
from walkit import run_sql, running, wal_source

from pyrt.client import connect
from pyrt.hub.hub import Hub, HubConfig
from pyrt.node.sources import SourceError
from pyrt.plugins.wal import WalSource

TABLES = """
CREATE TABLE todos (id int PRIMARY KEY, title text, done bool, big text);
CREATE TABLE pairs (a int, b text, n int, PRIMARY KEY (a, b));
CREATE TABLE plain (body text);
CREATE PUBLICATION pyrt FOR TABLE todos, pairs;
INSERT INTO todos VALUES (1, 'milk', false, NULL), (2, 'bread', true, NULL);
INSERT INTO pairs VALUES (1, 'x', 5);
"""


@pytest.fixture
def records_db(postgres: PostgresServer) -> Iterator[str]:
    db = postgres.new_database("rec")
    postgres.sql(TABLES, db)
    yield db
    postgres.drop_replication_slots(db)


def view(records: Any) -> dict[str, dict[str, Any]]:
    return {k: dict(v) for k, v in records.view.items()}


async def test_rows_update_records_seen_by_the_client(
    postgres: PostgresServer, records_db: str
) -> None:
    hub = Hub(HubConfig(record_policies={"todos": "lww", "pairs": "merge"}))
    source = wal_source(postgres, records_db, records={"public.todos": "todos", "pairs": "pairs"})
    async with (
        running(source, hub=hub, transports=["websocket"]) as node,
        connect(f"http://127.0.0.1:{node.port}", transports=["websocket"]) as client,
    ):
        todos = await client.records("todos")
        pairs = await client.records("pairs")
        # Rows that were there before the hub started: loaded when the source started.
        assert view(todos) == {
            "1": {"id": 1, "title": "milk", "done": False, "big": None},
            "2": {"id": 2, "title": "bread", "done": True, "big": None},
        }
        assert view(pairs) == {"1:x": {"a": 1, "b": "x", "n": 5}}

        await run_sql(
            postgres,
            records_db,
            "INSERT INTO todos VALUES (3, 'eggs', false, NULL);"
            " UPDATE todos SET title = 'oat milk' WHERE id = 1;"
            " DELETE FROM todos WHERE id = 2;"
            " UPDATE pairs SET n = 6;",
        )
        expected = {
            "1": {"id": 1, "title": "oat milk", "done": False, "big": None},
            "3": {"id": 3, "title": "eggs", "done": False, "big": None},
        }
        await until(lambda: view(todos) == expected, "the changes in the client's view")
        await until(lambda: view(pairs) == {"1:x": {"a": 1, "b": "x", "n": 6}}, "pairs")

        # A TOASTed value that an UPDATE leaves alone is not sent: the record keeps it.
        await run_sql(
            postgres,
            records_db,
            "UPDATE todos SET big = (SELECT string_agg(md5(i::text), '')"
            " FROM generate_series(1, 400) i) WHERE id = 3",
        )
        await until(lambda: len(view(todos)["3"].get("big") or "") == 12800, "the big value")
        await run_sql(postgres, records_db, "UPDATE todos SET done = true WHERE id = 3")
        await until(lambda: view(todos)["3"]["done"] is True, "done")
        assert len(view(todos)["3"]["big"]) == 12800
        assert node.hub.record("todos", "3").value["big"] == view(todos)["3"]["big"]

        # The key itself changes: the old record goes, the new one comes.
        await run_sql(postgres, records_db, "UPDATE todos SET id = 10 WHERE id = 1")
        await until(lambda: set(view(todos)) == {"3", "10"}, "the new key")
        assert view(todos)["10"]["title"] == "oat milk"

        # The row events still go to the table's channel, to row subscribers.
        history = node.hub.history("pg:public:todos", node.now).publications
        assert len(history) >= 6

        await run_sql(postgres, records_db, "TRUNCATE todos")
        await until(lambda: view(todos) == {}, "the truncate")
        assert [r.value for r in node.hub.records("todos")] == [None, None, None, None]
        # Views and the hub agree; nothing is pending.
        assert todos.pending == ()
        assert view(pairs) == {"1:x": {"a": 1, "b": "x", "n": 6}}

        # A client joining now sees the database's state too.
        async with connect(f"http://127.0.0.1:{node.port}", transports=["websocket"]) as late:
            await run_sql(postgres, records_db, "INSERT INTO todos VALUES (7, 'tea', false)")
            await until(lambda: "7" in view(todos), "the insert")
            late_todos = await late.records("todos")
            assert (
                view(late_todos)
                == view(todos)
                == {"7": {"id": 7, "title": "tea", "done": False, "big": None}}
            )


async def test_records_need_a_policy_and_a_primary_key(
    postgres: PostgresServer, records_db: str
) -> None:
    source = wal_source(postgres, records_db, records={"todos": "todos"})
    with pytest.raises(BaseExceptionGroup) as caught:
        async with running(source):
            pass
    errors = [e for e in _leaves(caught.value) if isinstance(e, SourceError)]
    assert errors
    assert "'todos' is not a records channel" in str(errors[0])
    assert "[hub.record_policies]" in str(errors[0])

    postgres.sql("ALTER PUBLICATION pyrt ADD TABLE plain", records_db)
    source = wal_source(postgres, records_db, records={"plain": "plain"})
    hub = Hub(HubConfig(record_policies={"plain": "lww"}))
    with pytest.raises(BaseExceptionGroup) as caught:
        async with running(source, hub=hub):
            pass
    errors = [e for e in _leaves(caught.value) if isinstance(e, SourceError)]
    assert "records for public.plain need a primary key" in str(errors[0])


def _leaves(group: BaseExceptionGroup[Any]) -> Iterator[BaseException]:
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            yield from _leaves(error)
        else:
            yield error


@pytest.mark.parametrize(
    ("records", "error", "message"),
    [
        ("todos", TypeError, 'records must be a table of "schema.table" = "channel"'),
        ({"todos": 5}, TypeError, 'records: expected "schema.table" = "channel"'),
        ({".todos": "t"}, ValueError, "records: '.todos' is not a table name"),
        ({"public.": "t"}, ValueError, "records: 'public.' is not a table name"),
        ({"todos": "a b"}, ValueError, "records.todos: 'a b' is not a channel"),
    ],
)
def test_records_option_errors(records: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        WalSource(records=records)
