"""The pgoutput decoders against bytes from a real PostgreSQL 15 server.

One database gets tables covering every type the decoder reads, REPLICA IDENTITY DEFAULT and
FULL, a table without a primary key and a TOASTed column left unchanged by an UPDATE; the
changes are read back with ``pg_logical_slot_peek_binary_changes`` (protocol version 1) and
checked value by value, with the Rust decoder and the reference required to agree on every
message.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from pgoutputkit import EXPECTED_RECORD, TEXT, assert_same_message, message_kind
from pgserver import PostgresServer

from pyrt.reference import pgoutput as reference

core: Any = pytest.importorskip("pyrt._core")

SCHEMA = r"""
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE TABLE everything (
    id int8 PRIMARY KEY, b bool, i2 int2, i4 int4, o oid, f4 float4, f8 float8,
    n numeric, n_big numeric, t text, vc varchar(10), bp char(3), nm name, ch "char",
    j json, jb jsonb, ts timestamp, tstz timestamptz, d date, tm time, tmtz timetz,
    u uuid, by bytea, ia int4[], ta text[], iv interval, m mood
);
CREATE TABLE keyed (id int PRIMARY KEY, big text, note text);
ALTER TABLE keyed ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE nokey (big text, note text);
ALTER TABLE nokey ALTER COLUMN big SET STORAGE EXTERNAL;
ALTER TABLE nokey REPLICA IDENTITY FULL;
CREATE PUBLICATION pub FOR ALL TABLES;
"""

BIG = "".join(f"{i:05d}" for i in range(4000))  # 20 kB: stored out of line (EXTERNAL)

CHANGES = rf"""
INSERT INTO everything VALUES (
    1, true, -32768, 2147483647, 4294967295, 1.5, 'NaN', 12.50,
    123456789012345678901234567890.000,
    E'quote " backslash \\ newline\n tab\t é 🎉', 'varchar', 'ab', 'name', 'x',
    '{{"a": [1, 2.5, null], "b": "\u00e9"}}', '{{"a": [1, 2.5, null], "b": "\u00e9"}}',
    '2024-02-29 12:34:56.789012', '2024-02-29 12:34:56+00', '2024-02-29', '23:59:59.5',
    '12:00:00+02', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\x00ff10', '{{1,NULL,-3}}',
    ARRAY['a b', 'NULL', NULL, 'q"x', ''], '1 day 02:00:00', 'happy');
INSERT INTO everything (id) VALUES (2);
UPDATE everything SET i4 = 7 WHERE id = 1;
UPDATE everything SET id = 3, f8 = '-Infinity', n = 'NaN', ts = 'infinity' WHERE id = 2;
DELETE FROM everything WHERE id = 3;
INSERT INTO keyed VALUES (1, '{BIG}', 'a');
UPDATE keyed SET note = 'b';
DELETE FROM keyed;
INSERT INTO nokey VALUES ('{BIG}', 'a');
UPDATE nokey SET note = 'b';
DELETE FROM nokey;
TRUNCATE keyed, nokey RESTART IDENTITY;
SELECT pg_logical_emit_message(true, 'pyrt', 'hello');
SELECT pg_logical_emit_message(false, 'pyrt', '\x00ff'::bytea);
"""


def peek(postgres: PostgresServer, db: str, timezone: str) -> list[bytes]:
    out = postgres.sql(
        f"SET TimeZone = '{timezone}'; SELECT encode(data, 'hex') FROM "
        "pg_logical_slot_peek_binary_changes('s', NULL, NULL, 'proto_version', '1', "
        "'publication_names', 'pub', 'messages', 'true')",
        db,
    )
    return [bytes.fromhex(line) for line in out.split()]


@pytest.fixture(scope="module")
def captured(postgres: PostgresServer) -> Iterator[dict[str, list[bytes]]]:
    db = postgres.new_database("pgoutput")
    postgres.sql(SCHEMA, db)
    # Its own statement: a slot cannot be created in a transaction that has written.
    postgres.sql("SELECT pg_create_logical_replication_slot('s', 'pgoutput')", db)
    postgres.sql(CHANGES, db)
    yield {tz: peek(postgres, db, tz) for tz in ("UTC", "Asia/Kolkata")}
    postgres.sql("SELECT pg_drop_replication_slot('s')", db)


def decode_both(payloads: list[bytes]) -> list[Any]:
    """Decode with both decoders, require the same messages, return the Rust ones."""
    rust, ref = core.PgOutputDecoder(), reference.ReferenceDecoder()
    out = []
    for payload in payloads:
        a, b = rust.decode(payload), ref.decode(payload)
        assert_same_message(a, b)
        out.append(a)
    return out


def changes(messages: list[Any], table: str) -> list[Any]:
    return [m for m in messages if message_kind(m) == "Change" and m.table == table]


def test_messages_in_order(captured: dict[str, list[bytes]]) -> None:
    messages = decode_both(captured["UTC"])
    kinds = [message_kind(m) for m in messages]
    # The non-transactional message is sent at once, before the rest commits... or after,
    # depending on the order the slot reads them in: only count it.
    assert kinds.count("LogicalMessage") == 2
    assert kinds.count("Begin") == kinds.count("Commit") >= 1
    assert kinds.count("Change") == 11
    assert kinds.count("Truncate") == 1
    assert kinds.count("Type") == 1
    assert {m.name for m in messages if message_kind(m) == "Relation"} == {
        "everything",
        "keyed",
        "nokey",
    }
    begin = next(m for m in messages if message_kind(m) == "Begin")
    commit = next(m for m in messages if message_kind(m) == "Commit")
    assert commit.commit_lsn == begin.final_lsn
    assert commit.end_lsn > commit.commit_lsn
    assert commit.commit_time == begin.commit_time
    for m in changes(messages, "everything"):
        assert m.xid == begin.xid
        assert m.commit_time == begin.commit_time
        assert m.commit_lsn == begin.final_lsn


def test_relation_and_type(captured: dict[str, list[bytes]]) -> None:
    messages = decode_both(captured["UTC"])
    mood = next(m for m in messages if message_kind(m) == "Type")
    assert (mood.namespace, mood.name) == ("public", "mood")
    rel = next(m for m in messages if message_kind(m) == "Relation" and m.name == "everything")
    assert (rel.namespace, rel.replica_identity) == ("public", "d")
    assert rel.columns[0] == (1, "id", 20, -1, "int8")
    assert rel.columns[10] == (0, "vc", 1043, 14, "varchar")  # typmod: 10 + 4
    assert [c[4] for c in rel.columns] == [
        "int8", "bool", "int2", "int4", "oid", "float4", "float8", "numeric", "numeric",
        "text", "varchar", "bpchar", "name", "char", "json", "jsonb", "timestamp",
        "timestamptz", "date", "time", "timetz", "uuid", "bytea", "_int4", "_text",
        "interval", "mood",
    ]  # fmt: skip
    assert rel.columns[-1][2] == mood.type_oid
    nokey = next(m for m in messages if message_kind(m) == "Relation" and m.name == "nokey")
    assert nokey.replica_identity == "f"
    assert all(flags == 1 for flags, *_ in nokey.columns)  # FULL: every column is identity


def test_insert_values(captured: dict[str, list[bytes]]) -> None:
    insert = changes(decode_both(captured["UTC"]), "everything")[0]
    assert (insert.type, insert.schema, insert.old_kind, insert.old_record) == (
        "INSERT", "public", None, None,
    )  # fmt: skip
    record = insert.record
    assert math.isnan(record.pop("f8"))
    assert record == EXPECTED_RECORD
    assert [type(v) for v in record.values()] == [type(v) for v in EXPECTED_RECORD.values()]
    assert insert.new_tuple[12] == ("t", "name")
    payload = json.loads(insert.to_json())
    assert payload["type"] == "INSERT"
    assert "old_record" not in payload
    assert payload["errors"] is None
    assert payload["commit_timestamp"] == insert.commit_timestamp
    assert payload["commit_timestamp"].endswith("Z")
    assert payload["columns"][26] == {"name": "m", "type": "mood"}
    rec = payload["record"]
    assert rec["f8"] == "NaN"
    assert rec["j"] == rec["jb"] == {"a": [1, 2.5, None], "b": "é"}
    assert rec["ia"] == [1, None, -3]
    assert rec["ta"] == ["a b", "NULL", None, 'q"x', ""]
    assert rec["t"] == TEXT
    # numeric stays exact in the JSON text.
    assert b'"n":12.50,"n_big":123456789012345678901234567890.000,' in insert.to_json()


def test_timezone_offsets_become_iso(captured: dict[str, list[bytes]]) -> None:
    insert = changes(decode_both(captured["Asia/Kolkata"]), "everything")[0]
    assert insert.record["tstz"] == "2024-02-29T18:04:56+05:30"
    assert insert.new_tuple[17] == ("t", "2024-02-29 18:04:56+05:30")


def test_nulls_updates_and_deletes(captured: dict[str, list[bytes]]) -> None:
    _, nulls, update, key_update, delete = changes(decode_both(captured["UTC"]), "everything")
    assert nulls.record == {"id": 2, **dict.fromkeys(list(EXPECTED_RECORD)[1:]), "f8": None}
    assert json.loads(nulls.to_json())["record"]["jb"] is None
    # Default identity, key unchanged: no old tuple; the payload still has old_record {}.
    assert (update.type, update.old_kind, update.old_record) == ("UPDATE", None, None)
    assert update.record["i4"] == 7
    assert json.loads(update.to_json())["old_record"] == {}
    # Key changed: a K tuple with the old key only.
    assert key_update.old_kind == "K"
    assert key_update.old_record == {"id": 2}
    assert key_update.record["id"] == 3
    assert key_update.record["f8"] == -math.inf
    assert math.isnan(key_update.record["n"])
    assert key_update.record["ts"] == "infinity"
    rec = json.loads(key_update.to_json())["record"]
    assert (rec["f8"], rec["n"], rec["ts"]) == ("-Infinity", "NaN", "infinity")
    # Delete under default identity: the key only (the other columns are not null, just
    # not sent).
    assert (delete.type, delete.old_kind, delete.record) == ("DELETE", "K", None)
    assert delete.old_record == {"id": 3}
    assert json.loads(delete.to_json())["old_record"] == {"id": 3}
    assert delete.old_tuple[1] == ("n", None)


def test_unchanged_toast(captured: dict[str, list[bytes]]) -> None:
    messages = decode_both(captured["UTC"])
    insert, update, delete = changes(messages, "keyed")
    assert insert.record == {"id": 1, "big": BIG, "note": "a"}
    # The TOASTed value was not sent: absent, not null.
    assert update.new_tuple[1] == ("u", None)
    assert update.record == {"id": 1, "note": "b"}
    assert "big" not in json.loads(update.to_json())["record"]
    assert delete.old_record == {"id": 1}
    # REPLICA IDENTITY FULL and no primary key: the old row has it, and fills it in.
    insert, update, delete = changes(messages, "nokey")
    assert update.old_kind == "O"
    assert update.new_tuple[0] == ("u", None)
    assert update.old_record == {"big": BIG, "note": "a"}
    assert update.record == {"big": BIG, "note": "b"}
    assert delete.old_kind == "O"
    assert delete.old_record == {"big": BIG, "note": "b"}


def test_size_limit_on_real_rows(captured: dict[str, list[bytes]]) -> None:
    insert = changes(decode_both(captured["UTC"]), "keyed")[0]
    full = insert.to_json()
    assert len(full) > 20_000
    cut = json.loads(insert.to_json(max_bytes=10_000))
    assert cut["record"] == {"id": 1, "note": "a"}
    assert cut["errors"] == "Error 413: Payload Too Large"
    assert insert.to_json(max_bytes=len(full)) == full


def test_truncate_and_messages(captured: dict[str, list[bytes]]) -> None:
    messages = decode_both(captured["UTC"])
    truncate = next(m for m in messages if message_kind(m) == "Truncate")
    assert truncate.options == 2  # RESTART IDENTITY
    assert sorted(truncate.tables) == [("public", "keyed"), ("public", "nokey")]
    logical = [m for m in messages if message_kind(m) == "LogicalMessage"]
    by_kind = {m.transactional: m for m in logical}
    assert (by_kind[True].prefix, by_kind[True].content) == ("pyrt", b"hello")
    assert (by_kind[False].prefix, by_kind[False].content) == ("pyrt", b"\x00\xff")
    assert by_kind[True].lsn > 0


def test_match_changes_in_rust(captured: dict[str, list[bytes]]) -> None:
    found = changes(decode_both(captured["UTC"]), "everything")
    m = core.Matcher()
    m.add_rows(1, "*", "public", "everything", "i4=eq.7")
    m.add_rows(2, "DELETE", "public", "everything", "id=eq.3")
    m.add_rows(3, "INSERT", "public", "*", "jb=like.*2.5*,n=gt.12.4,tstz=gte.2024-02-29")
    m.add_rows(4, "*", "public", "everything", "f4=is.null")
    assert m.match_changes(found) == [[3], [4], [1], [4], [2]]
    assert [m.match_row(c.event) for c in found] == [[3], [4], [1], [4], [2]]


def test_builtin_type_names_are_postgres_own(postgres: PostgresServer) -> None:
    oids = ",".join(map(str, reference.BUILTIN_TYPES))
    rows = postgres.sql(f"SELECT oid, typname, typelem FROM pg_type WHERE oid IN ({oids})")
    server = {int(o): (name, int(elem)) for o, name, elem in (r.split("|") for r in rows.split())}
    assert {oid: name for oid, (name, _) in server.items()} == {
        oid: name for oid, (name, _) in reference.BUILTIN_TYPES.items()
    }
    for oid, (_, kind) in reference.BUILTIN_TYPES.items():
        elem = server[oid][1]
        if isinstance(kind, tuple):
            assert reference.BUILTIN_TYPES[elem][1] == kind[1], oid
        else:
            assert elem == 0 or oid in (19, 1700) or reference.BUILTIN_TYPES[oid][0] == "name"


def test_capture_fixtures_are_current(captured: dict[str, list[bytes]]) -> None:
    """test_pgoutput.py's fixture bytes came from this script: the server still sends them."""
    from pgoutputkit import CAPTURED

    # Relation ids and LSNs differ between servers; a change's tuples after the relid do not.
    live = {p[5:] for p in captured["UTC"] if p[:1] in b"IUD"}
    fixtures = [bytes.fromhex(h) for h in CAPTURED.values()]
    fixture_changes = {p[5:] for p in fixtures if p[:1] in b"IUD"}
    assert len(fixture_changes) == 6
    assert fixture_changes <= live
