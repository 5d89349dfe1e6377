"""pgoutput for the tests: a small encoder (protocol version 1), independent of the decoders
under test; the comparison of the Rust decoder's messages with the reference's; bytes captured
from PostgreSQL 15; and decoded row changes for the hub's tests.

Shared by the pgoutput tests (without a server, against a live one, differential) and by the
sans-IO tests of row-change subscriptions, delivery and durable history.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

from pyrt._core import PgChange, PgOutputDecoder
from pyrt.postgres import DecodeError
from pyrt.reference import pgoutput as reference

# --------------------------------------------------------------------------------------------
# A small pgoutput encoder (protocol version 1), independent of the decoders under test
# --------------------------------------------------------------------------------------------

# A column value: text, None (null) or UNCHANGED (an unchanged TOAST value).
UNCHANGED = object()


def _cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def enc_begin(final_lsn: int, commit_time: int, xid: int) -> bytes:
    return b"B" + struct.pack(">QqI", final_lsn, commit_time, xid)


def enc_commit(flags: int, commit_lsn: int, end_lsn: int, commit_time: int) -> bytes:
    return b"C" + struct.pack(">BQQq", flags, commit_lsn, end_lsn, commit_time)


def enc_origin(commit_lsn: int, name: str) -> bytes:
    return b"O" + struct.pack(">Q", commit_lsn) + _cstr(name)


def enc_relation(
    relid: int,
    namespace: str,
    name: str,
    identity: str,
    columns: Sequence[tuple[int, str, int, int]],
) -> bytes:
    out = b"R" + struct.pack(">I", relid) + _cstr(namespace) + _cstr(name)
    out += identity.encode("latin-1") + struct.pack(">h", len(columns))
    for flags, column, oid, typmod in columns:
        out += struct.pack(">B", flags) + _cstr(column) + struct.pack(">Ii", oid, typmod)
    return out


def enc_type(oid: int, namespace: str, name: str) -> bytes:
    return b"Y" + struct.pack(">I", oid) + _cstr(namespace) + _cstr(name)


def enc_tuple(kind: str, values: Sequence[object]) -> bytes:
    out = kind.encode() + struct.pack(">h", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v is UNCHANGED:
            out += b"u"
        else:
            assert isinstance(v, str)
            raw = v.encode()
            out += b"t" + struct.pack(">i", len(raw)) + raw
    return out


def enc_insert(relid: int, new: Sequence[object]) -> bytes:
    return b"I" + struct.pack(">I", relid) + enc_tuple("N", new)


def enc_update(
    relid: int, new: Sequence[object], old: tuple[str, Sequence[object]] | None = None
) -> bytes:
    out = b"U" + struct.pack(">I", relid)
    if old is not None:
        out += enc_tuple(*old)
    return out + enc_tuple("N", new)


def enc_delete(relid: int, kind: str, old: Sequence[object]) -> bytes:
    return b"D" + struct.pack(">I", relid) + enc_tuple(kind, old)


def enc_truncate(options: int, relids: Sequence[int]) -> bytes:
    return (
        b"T"
        + struct.pack(">iB", len(relids), options)
        + b"".join(struct.pack(">I", r) for r in relids)
    )


def enc_message(flags: int, lsn: int, prefix: str, content: bytes) -> bytes:
    return (
        b"M"
        + struct.pack(">BQ", flags, lsn)
        + _cstr(prefix)
        + struct.pack(">i", len(content))
        + content
    )


# --------------------------------------------------------------------------------------------
# Comparing the Rust decoder's messages with the reference's
# --------------------------------------------------------------------------------------------

FIELDS = {
    "Begin": ("final_lsn", "commit_time", "xid"),
    "Commit": ("flags", "commit_lsn", "end_lsn", "commit_time"),
    "Origin": ("commit_lsn", "name"),
    "Relation": ("relid", "namespace", "name", "replica_identity", "columns"),
    "Type": ("type_oid", "namespace", "name"),
    "Change": (
        "type", "schema", "table", "relid", "old_kind", "new_tuple", "old_tuple", "columns",
        "xid", "commit_time", "commit_lsn", "commit_timestamp",
    ),
    "Truncate": ("options", "relids", "tables"),
    "LogicalMessage": ("flags", "transactional", "lsn", "prefix", "content"),
    "Unknown": ("tag",),
}  # fmt: skip


def message_kind(message: object) -> str:
    """The message's kind, the same for both decoders' classes (PgBegin and Begin: Begin)."""
    name = type(message).__name__.removeprefix("Pg")
    return "Type" if name == "TypeInfo" else name


def same_value(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def same_row(a: dict[str, object] | None, b: dict[str, object] | None) -> bool:
    if a is None or b is None:
        return a is b
    return list(a) == list(b) and all(same_value(a[k], b[k]) for k in a)


def assert_same_message(rust: object, ref: object, limits: Sequence[int] = (0, 200)) -> None:
    """The two decoders' messages agree in every field (and in every derived view)."""
    kind = message_kind(rust)
    assert kind == message_kind(ref), (rust, ref)
    for field in FIELDS[kind]:
        a, b = getattr(rust, field), getattr(ref, field)
        assert a == b, (kind, field, a, b)
        assert type(a) is type(b), (kind, field, a, b)
    if kind == "Change":
        assert same_row(rust.record, ref.record), (rust.record, ref.record)
        assert same_row(rust.old_record, ref.old_record), (rust.old_record, ref.old_record)
        event = rust.event
        assert (event.type, event.schema, event.table) == (ref.type, ref.schema, ref.table)
        assert same_row(event.record, ref.record)
        assert rust.to_json() == ref.to_json(), (rust.to_json(), ref.to_json())
        for limit in limits:
            assert rust.to_json(limit) == ref.to_json(limit)


def same_outcome(rust: Any, ref: Any, payload: bytes) -> object:
    """Decode *payload* with both; the same message or the same error. Returns the message."""
    a = rust.decode_many([payload])[0]
    b = ref.decode_many([payload])[0]
    if isinstance(a, DecodeError) or isinstance(b, DecodeError):
        assert (type(a), getattr(a, "reason", None), getattr(a, "offset", None)) == (
            type(b), getattr(b, "reason", None), getattr(b, "offset", None),
        )  # fmt: skip
    else:
        assert_same_message(a, b)
    return a


def both() -> tuple[Any, reference.ReferenceDecoder]:
    return PgOutputDecoder(), reference.ReferenceDecoder()


# --------------------------------------------------------------------------------------------
# Bytes captured from PostgreSQL 15 by test_pgoutput_postgres.py (UTC, one transaction):
# the table `everything` (every type), `keyed` (primary key, EXTERNAL text column `big`),
# `nokey` (no primary key, REPLICA IDENTITY FULL).
# --------------------------------------------------------------------------------------------

CAPTURED = {
    "begin": "420000000001947570000303d0f1b38850000002d7",
    "type mood": "59000040047075626c6963006d6f6f6400",
    "relation everything": (
        "52000040097075626c69630065766572797468696e670064001b0169640000000014ffffffff0062000000"
        "0010ffffffff0069320000000015ffffffff0069340000000017ffffffff006f000000001affffffff00663400"
        "000002bcffffffff00663800000002bdffffffff006e00000006a4ffffffff006e5f62696700000006a4ffff"
        "ffff00740000000019ffffffff00766300000004130000000e006270000000041200000007006e6d00000000"
        "13ffffffff0063680000000012ffffffff006a0000000072ffffffff006a620000000edaffffffff00747300"
        "0000045affffffff007473747a00000004a0ffffffff0064000000043affffffff00746d000000043bffffff"
        "ff00746d747a00000004f2ffffffff00750000000b86ffffffff0062790000000011ffffffff006961000000"
        "03efffffffff00746100000003f1ffffffff00697600000004a2ffffffff006d0000004004ffffffff"
    ),
    "insert everything 1": (
        "49000040094e001b74000000013174000000017474000000062d3332373638740000000a32313437343833"
        "363437740000000a343239343936373239357400000003312e3574000000034e614e740000000531322e35"
        "3074000000223132333435363738393031323334353637383930313233343536373839302e303030740000"
        "002971756f74652022206261636b736c617368205c206e65776c696e650a207461620920c3a920f09f8e89"
        "740000000776617263686172740000000361622074000000046e616d6574000000017874000000247b2261"
        "223a205b312c20322e352c206e756c6c5d2c202262223a20225c7530306539227d74000000207b2261223a"
        "205b312c20322e352c206e756c6c5d2c202262223a2022c3a9227d740000001a323032342d30322d323920"
        "31323a33343a35362e3738393031327400000016323032342d30322d32392031323a33343a35362b303074"
        "0000000a323032342d30322d3239740000000a32333a35393a35392e35740000000b31323a30303a30302b"
        "3032740000002461306565626339392d396330622d346566382d626236642d366262396264333830613131"
        "74000000085c78303066663130740000000b7b312c4e554c4c2c2d337d740000001d7b22612062222c224e"
        "554c4c222c4e554c4c2c22715c2278222c22227d740000000e31206461792030323a30303a303074000000"
        "056861707079"
    ),
    "insert everything 2": (
        "49000040094e001b7400000001326e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e"
    ),
    "update everything 2 key": (
        "55000040094b001b7400000001326e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e4e001b74"
        "00000001336e6e6e6e6e74000000092d496e66696e69747974000000034e614e6e6e6e6e6e6e6e6e740000"
        "0008696e66696e6974796e6e6e6e6e6e6e6e6e6e"
    ),
    "delete everything 3": (
        "44000040094b001b7400000001336e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e"
    ),
    "relation keyed": (
        "52000040107075626c6963006b65796564006400030169640000000017ffffffff00626967000000001"
        "9ffffffff006e6f74650000000019ffffffff"
    ),
    "update keyed unchanged toast": "55000040104e000374000000013175740000000162",
    "delete keyed": "44000040104b00037400000001316e6e",
    "relation nokey": (
        "52000040177075626c6963006e6f6b657900660002016269670000000019ffffffff016e6f746500000000"
        "19ffffffff"
    ),
    "truncate": "5400000002020000401000004017",
    "message transactional": "4d01000000000194753070797274000000000568656c6c6f",
    "message": "4d00000000000194757070797274000000000200ff",
    "commit": "4300000000000194757000000000019477b0000303d0f1b38850",
}


TEXT = 'quote " backslash \\ newline\n tab\t é 🎉'
"""The text column of `everything` row 1."""

# Row 1 of `everything` as the matcher sees it (f8 is NaN: checked on its own).
EXPECTED_RECORD = {
    "id": 1,
    "b": True,
    "i2": -32768,
    "i4": 2147483647,
    "o": 4294967295,
    "f4": 1.5,
    "n": 12.5,
    "n_big": 1.2345678901234568e29,
    "t": TEXT,
    "vc": "varchar",
    "bp": "ab ",
    "nm": "name",
    "ch": "x",
    "j": '{"a": [1, 2.5, null], "b": "\\u00e9"}',
    "jb": '{"a": [1, 2.5, null], "b": "é"}',
    "ts": "2024-02-29T12:34:56.789012",
    "tstz": "2024-02-29T12:34:56+00:00",
    "d": "2024-02-29",
    "tm": "23:59:59.5",
    "tmtz": "12:00:00+02:00",
    "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "by": "\\x00ff10",
    "ia": "{1,NULL,-3}",
    "ta": '{"a b","NULL",NULL,"q\\"x",""}',
    "iv": "1 day 02:00:00",
    "m": "happy",
}


# --------------------------------------------------------------------------------------------
# Row changes of a table `public.items (id int4 key, body text, n int4)`, decoded
# --------------------------------------------------------------------------------------------

INT4_OID, TEXT_OID = 23, 25
ITEMS_RELATION = enc_relation(
    16384,
    "public",
    "items",
    "d",
    [(1, "id", INT4_OID, -1), (0, "body", TEXT_OID, -1), (0, "n", INT4_OID, -1)],
)


def row_changes(*rows: tuple[int, str, int]) -> list[PgChange]:
    """An insert into `items` for each (id, body, n), decoded by the Rust decoder."""
    decoder = PgOutputDecoder()
    decoder.decode(ITEMS_RELATION)
    decoder.decode(enc_begin(100, 0, 7))
    out = []
    for row in rows:
        change = decoder.decode(enc_insert(16384, [str(row[0]), row[1], str(row[2])]))
        assert isinstance(change, PgChange)
        out.append(change)
    return out
