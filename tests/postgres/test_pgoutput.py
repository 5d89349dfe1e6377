"""The pgoutput decoder without a server: captured bytes and the binding's behaviour (the
encoder, the Rust/reference comparison and the captured bytes are in pgoutputkit.py).

test_pgoutput_postgres.py checks bytes from a live server; test_pgoutput_differential.py
checks the Rust decoder against the reference on generated messages.
"""

from __future__ import annotations

import datetime
import json
import math
from typing import Any

import pytest
from pgoutputkit import (
    CAPTURED,
    EXPECTED_RECORD,
    assert_same_message,
    both,
    enc_begin,
    enc_insert,
    enc_relation,
    enc_update,
    message_kind,
)

from pyrt.postgres import DecodeError

core: Any = pytest.importorskip("pyrt._core")


def decode_captured() -> dict[str, Any]:
    """Every fixture through both decoders, in capture order; the Rust messages by name."""
    rust, ref = both()
    out = {}
    for name, hex_bytes in CAPTURED.items():
        payload = bytes.fromhex(hex_bytes)
        a, b = rust.decode(payload), ref.decode(payload)
        assert_same_message(a, b)
        out[name] = a
    return out


def test_captured_transaction() -> None:
    m = decode_captured()
    begin, commit = m["begin"], m["commit"]
    assert (begin.final_lsn, begin.xid) == (0x1947570, 727)
    assert (commit.flags, commit.commit_lsn, commit.end_lsn) == (0, 0x1947570, 0x19477B0)
    assert commit.commit_time == begin.commit_time == 0x0303D0F1B38850
    insert = m["insert everything 1"]
    assert (insert.xid, insert.commit_lsn, insert.commit_time) == (727, 0x1947570, 0x0303D0F1B38850)
    at = datetime.datetime(2000, 1, 1) + datetime.timedelta(microseconds=begin.commit_time)
    assert insert.commit_timestamp == at.isoformat(timespec="milliseconds") + "Z"
    assert insert.commit_timestamp == "2026-11-22T00:01:13.287Z"
    assert m["type mood"].name == "mood"
    assert [message_kind(x) for x in m.values()].count("Change") == 6


def test_captured_values() -> None:
    m = decode_captured()
    record = m["insert everything 1"].record
    assert math.isnan(record.pop("f8"))
    assert record == EXPECTED_RECORD
    assert [type(v) for v in record.values()] == [type(v) for v in EXPECTED_RECORD.values()]
    payload = json.loads(m["insert everything 1"].to_json())
    assert payload["record"]["jb"] == {"a": [1, 2.5, None], "b": "é"}
    assert payload["record"]["ta"] == ["a b", "NULL", None, 'q"x', ""]
    assert payload["record"]["tmtz"] == "12:00:00+02:00"
    assert payload["columns"][-1] == {"name": "m", "type": "mood"}
    key_update = m["update everything 2 key"]
    assert key_update.old_record == {"id": 2}
    assert key_update.record["f8"] == -math.inf
    assert json.loads(key_update.to_json())["record"]["n"] == "NaN"
    assert m["delete everything 3"].old_record == {"id": 3}


def test_captured_unchanged_toast_and_truncate() -> None:
    m = decode_captured()
    update = m["update keyed unchanged toast"]
    assert update.new_tuple == [("t", "1"), ("u", None), ("t", "b")]
    assert update.record == {"id": 1, "note": "b"}
    assert json.loads(update.to_json())["record"] == {"id": 1, "note": "b"}
    assert m["truncate"].tables == [("public", "keyed"), ("public", "nokey")]
    assert m["truncate"].options == 2
    assert (m["message transactional"].transactional, m["message"].transactional) == (True, False)
    assert m["message transactional"].content == b"hello"


def test_decode_errors_are_values_with_reason_and_offset() -> None:
    rust = core.PgOutputDecoder()
    delete = bytes.fromhex(CAPTURED["delete keyed"])
    with pytest.raises(DecodeError) as e:
        rust.decode(delete)
    assert (e.value.reason, e.value.offset) == ("unknown relation id 16400", 1)
    assert isinstance(e.value, ValueError)
    rust.decode(bytes.fromhex(CAPTURED["relation keyed"]))
    with pytest.raises(DecodeError) as e:
        rust.decode(delete[:-1])
    assert (e.value.reason, e.value.offset) == ("unexpected end of message reading column kind", 15)
    with pytest.raises(TypeError):
        rust.decode("not bytes")


def test_decode_many_keeps_errors_in_place() -> None:
    rust, ref = both()
    payloads = [bytes.fromhex(CAPTURED[n]) for n in ("begin", "delete keyed", "relation keyed")]
    payloads.append(payloads[1])
    for decoder in (rust, ref):
        out = decoder.decode_many(payloads)
        assert [message_kind(x) for x in out] == ["Begin", "DecodeError", "Relation", "Change"]
        assert out[1].offset == 1


def test_relation_cache_and_reset() -> None:
    rust, _ = both()
    assert rust.relation(16400) is None
    rust.decode(bytes.fromhex(CAPTURED["relation keyed"]))
    assert rust.relation(16400).name == "keyed"
    # A new Relation for the same id replaces the old one.
    rust.decode(enc_relation(16400, "public", "renamed", "f", [(1, "id", 23, -1)]))
    change = rust.decode(enc_insert(16400, ["5"]))
    assert (change.table, change.record) == ("renamed", {"id": 5})
    rust.reset()
    assert rust.relation(16400) is None
    with pytest.raises(DecodeError, match="unknown relation id"):
        rust.decode(enc_insert(16400, ["5"]))


def test_unknown_and_stream_messages_are_returned_not_raised() -> None:
    rust, ref = both()
    for payload in (b"S\x00\x00\x00\x01\x01", b"E", b"c" + bytes(20), b"\xff"):
        a, b = rust.decode(payload), ref.decode(payload)
        assert message_kind(a) == message_kind(b) == "Unknown"
        assert a.tag == b.tag == payload[0]


def test_changes_match_in_rust_and_encode_once() -> None:
    rust = core.PgOutputDecoder()
    rust.decode(enc_begin(1, 0, 5))
    rust.decode(
        enc_relation(7, "public", "orders", "d", [(1, "id", 20, -1), (0, "total", 1700, -1)])
    )
    big = rust.decode(enc_insert(7, ["1", "2500.00"]))
    small = rust.decode(enc_insert(7, ["2", "5"]))
    m = core.Matcher()
    m.add_rows(1, "INSERT", "public", "orders", "total=gt.100")
    m.add_rows(2, "*", "*", "*", "id=eq.2")
    assert m.match_change(big) == [1]
    assert m.match_changes([big, small]) == [[1], [2]]
    assert isinstance(big.event, core.RowEvent)
    assert big.event == core.RowEvent("INSERT", "public", "orders", {"id": 1, "total": 2500})
    assert big.to_json() == (
        b'{"schema":"public","table":"orders","commit_timestamp":"2000-01-01T00:00:00.000Z",'
        b'"type":"INSERT","columns":[{"name":"id","type":"int8"},{"name":"total",'
        b'"type":"numeric"}],"record":{"id":1,"total":2500.00},"errors":null}'
    )
    with pytest.raises(TypeError):
        m.match_change(core.RowEvent("INSERT", "public", "orders"))


def test_size_limit_keeps_small_fields_and_says_why() -> None:
    rust, ref = both()
    for d in (rust, ref):
        d.decode(enc_relation(1, "s", "t", "d", [(1, "id", 23, -1), (0, "body", 25, -1)]))
        change = d.decode(enc_update(1, ["1", "x" * 62], ("K", ["1", None])))
        full = change.to_json()
        assert change.to_json(len(full)) == full
        cut = json.loads(change.to_json(len(full) - 1))
        # "x" * 62 is 64 bytes of JSON with its quotes: kept.
        assert cut["record"] == {"id": 1, "body": "x" * 62}
        assert cut["old_record"] == {"id": 1}
        assert cut["errors"] == "Error 413: Payload Too Large"
        change = d.decode(enc_update(1, ["1", "x" * 63]))
        cut = json.loads(change.to_json(10))
        assert cut["record"] == {"id": 1}
        assert cut["old_record"] == {}


def test_messages_are_frozen() -> None:
    rust = core.PgOutputDecoder()
    begin = rust.decode(enc_begin(1, 2, 3))
    with pytest.raises(AttributeError):
        begin.xid = 4
    assert "PgChange" in repr(
        (rust.decode(enc_relation(1, "s", "t", "d", [])), rust.decode(enc_insert(1, [])))[1]
    )
