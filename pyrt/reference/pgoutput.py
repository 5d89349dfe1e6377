"""The pgoutput decoder in plain Python: the oracle for the Rust decoder (docs/pgoutput.md).

``pyrt._core.PgOutputDecoder`` is what the hub uses; this module restates the same semantics
as readable code, and the differential tests require both to give the same messages, values,
JSON payloads and errors; both raise :class:`pyrt._errors.DecodeError`.

A payload is one pgoutput message of protocol version 1: the bytes after the XLogData header
of START_REPLICATION, or the ``data`` column of ``pg_logical_slot_peek_binary_changes``.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterable
from typing import Literal, TypeAlias

import attrs

from .._errors import DecodeError
from .matcher import RowEvent, Value, _read_integer, _read_number

__all__ = [
    "BUILTIN_TYPES",
    "Begin",
    "Change",
    "Commit",
    "DecodeError",
    "LogicalMessage",
    "Origin",
    "ReferenceDecoder",
    "Relation",
    "Truncate",
    "TypeInfo",
    "Unknown",
    "format_commit_time",
]


# --------------------------------------------------------------------------------------------
# Types and values
# --------------------------------------------------------------------------------------------

# How the text of a value is read (the Rust `Scalar`).
Scalar: TypeAlias = Literal[
    "bool", "int", "float", "numeric", "json", "timestamp", "timetz", "text"
]
# A scalar, or ("array", element scalar) for a one-dimensional array.
Kind: TypeAlias = Scalar | tuple[Literal["array"], Scalar]

BUILTIN_TYPES: dict[int, tuple[str, Kind]] = {
    16: ("bool", "bool"),
    17: ("bytea", "text"),
    18: ("char", "text"),
    19: ("name", "text"),
    20: ("int8", "int"),
    21: ("int2", "int"),
    23: ("int4", "int"),
    25: ("text", "text"),
    26: ("oid", "int"),
    114: ("json", "json"),
    142: ("xml", "text"),
    650: ("cidr", "text"),
    700: ("float4", "float"),
    701: ("float8", "float"),
    790: ("money", "text"),
    829: ("macaddr", "text"),
    869: ("inet", "text"),
    1042: ("bpchar", "text"),
    1043: ("varchar", "text"),
    1082: ("date", "text"),
    1083: ("time", "text"),
    1114: ("timestamp", "timestamp"),
    1184: ("timestamptz", "timestamp"),
    1186: ("interval", "text"),
    1266: ("timetz", "timetz"),
    1560: ("bit", "text"),
    1562: ("varbit", "text"),
    1700: ("numeric", "numeric"),
    2950: ("uuid", "text"),
    3614: ("tsvector", "text"),
    3802: ("jsonb", "json"),
    3904: ("int4range", "text"),
    3906: ("numrange", "text"),
    3908: ("tsrange", "text"),
    3910: ("tstzrange", "text"),
    3912: ("daterange", "text"),
    3926: ("int8range", "text"),
    199: ("_json", ("array", "json")),
    1000: ("_bool", ("array", "bool")),
    1001: ("_bytea", ("array", "text")),
    1002: ("_char", ("array", "text")),
    1003: ("_name", ("array", "text")),
    1005: ("_int2", ("array", "int")),
    1007: ("_int4", ("array", "int")),
    1009: ("_text", ("array", "text")),
    1014: ("_bpchar", ("array", "text")),
    1015: ("_varchar", ("array", "text")),
    1016: ("_int8", ("array", "int")),
    1021: ("_float4", ("array", "float")),
    1022: ("_float8", ("array", "float")),
    1028: ("_oid", ("array", "int")),
    1115: ("_timestamp", ("array", "timestamp")),
    1182: ("_date", ("array", "text")),
    1183: ("_time", ("array", "text")),
    1185: ("_timestamptz", ("array", "timestamp")),
    1231: ("_numeric", ("array", "numeric")),
    1270: ("_timetz", ("array", "timetz")),
    2951: ("_uuid", ("array", "text")),
    3807: ("_jsonb", ("array", "json")),
}
"""Built-in type OID -> (pg_type.typname, how its text is read). Other OIDs are text."""

_TIME = r"[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
_TIMESTAMP = re.compile(
    rf"([0-9]{{4,}}-[0-9]{{2}}-[0-9]{{2}}) ({_TIME})((?:[+-][0-9]{{2}}(?::[0-9]{{2}}){{0,2}})?)"
)
_TIMETZ = re.compile(rf"({_TIME})([+-][0-9]{{2}})")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_INTEGRAL = re.compile(r"([+-]?[0-9]+)(?:\.0*)?")


def _iso_offset(zone: str) -> str:
    """``+HH`` as ``+HH:00``; ``+HH:MM`` and ``+HH:MM:SS`` as they are."""
    return zone + ":00" if len(zone) == 3 else zone


def iso_timestamp(text: str) -> str:
    """``YYYY-MM-DD HH:MM:SS[.f][+HH[:MM[:SS]]]`` as ISO 8601; any other text as it is."""
    m = _TIMESTAMP.fullmatch(text)
    if m is None:
        return text
    return f"{m[1]}T{m[2]}{_iso_offset(m[3])}"


def iso_timetz(text: str) -> str:
    """``HH:MM:SS[.f]+HH`` as ``HH:MM:SS[.f]+HH:00``; any other text as it is."""
    m = _TIMETZ.fullmatch(text)
    return text if m is None else m[1] + _iso_offset(m[2])


def numeric_value(text: str) -> Value:
    """An integer when the text has no fraction (or zeros only) and fits in i64, else a float."""
    m = _INTEGRAL.fullmatch(text)
    if m is not None:
        integer = _read_integer(m[1])
        if integer is not None:
            return integer
    number = _read_number(text)
    return text if number is None else number


def match_value(kind: Kind, text: str) -> Value:
    """The matcher's value for the text of a column of this kind."""
    if isinstance(kind, tuple):
        return text  # arrays: the Postgres text form
    if kind == "bool":
        return {"t": True, "f": False}.get(text, text)
    if kind == "int":
        integer = _read_integer(text)
        return text if integer is None else integer
    if kind == "float":
        number = _read_number(text)
        return text if number is None else number
    if kind == "numeric":
        return numeric_value(text)
    if kind == "timestamp":
        return iso_timestamp(text)
    if kind == "timetz":
        return iso_timetz(text)
    return text  # json and text


_JSON_WHITESPACE = " \t\n\r"
_JSON_ESCAPES = '"\\/bfnrt'
_HEX = frozenset("0123456789abcdefABCDEF")


def _string_end(text: str, i: int) -> int | None:
    """Where the JSON string starting at *i* ends, if one starts there."""
    if not text.startswith('"', i):
        return None
    i += 1
    while i < len(text):
        char = text[i]
        if char == '"':
            return i + 1
        if char == "\\":
            escape = text[i + 1 : i + 2]
            if escape != "" and escape in _JSON_ESCAPES:
                i += 2
            elif escape == "u" and len(text) >= i + 6 and set(text[i + 2 : i + 6]) <= _HEX:
                i += 6
            else:
                return None
        elif char < " ":
            return None
        else:
            i += 1
    return None


def is_json(text: str) -> bool:
    """Whether *text* is one JSON value (RFC 8259) with optional whitespace around it.

    Iterative (a list of open containers), so deep nesting is no problem.
    """

    def ws(i: int) -> int:
        while i < len(text) and text[i] in _JSON_WHITESPACE:
            i += 1
        return i

    def member(i: int) -> int | None:
        """After ``{`` or ``,`` in an object: a key and ``:``; where the value starts."""
        end = _string_end(text, ws(i))
        if end is None:
            return None
        i = ws(end)
        return ws(i + 1) if text.startswith(":", i) else None

    closers: list[str] = []
    i = ws(0)
    while True:
        # A value starts at i.
        char = text[i : i + 1]
        if char == "{":
            j = ws(i + 1)
            if text.startswith("}", j):
                i = j + 1
            else:
                closers.append("}")
                start = member(j)
                if start is None:
                    return False
                i = start
                continue
        elif char == "[":
            j = ws(i + 1)
            if text.startswith("]", j):
                i = j + 1
            else:
                closers.append("]")
                i = j
                continue
        elif char == '"':
            end = _string_end(text, i)
            if end is None:
                return False
            i = end
        elif text.startswith(("true", "null"), i):
            i += 4
        elif text.startswith("false", i):
            i += 5
        else:
            m = _JSON_NUMBER.match(text, i)
            if m is None:
                return False
            i = m.end()
        # A value ended at i: close containers until one continues with another value.
        while True:
            i = ws(i)
            if not closers:
                return i == len(text)
            char = text[i : i + 1]
            if char == closers[-1]:
                closers.pop()
                i += 1
            elif char == "," and closers[-1] == "]":
                i = ws(i + 1)
                break
            elif char == ",":
                start = member(i + 1)
                if start is None:
                    return False
                i = start
                break
            else:
                return False


def parse_array(text: str) -> list[str | None] | None:
    """The elements of a one-dimensional array in Postgres' text form (None for NULL), or
    None for anything else (several dimensions, explicit bounds, malformed text)."""
    if not text.startswith("{"):
        return None
    rest = text[1:]
    if rest == "}":
        return []
    elements: list[str | None] = []
    while True:
        if rest.startswith('"'):
            element: list[str] = []
            i = 1
            while True:
                if i >= len(rest):
                    return None
                char = rest[i]
                if char == "\\":
                    if i + 1 >= len(rest):
                        return None
                    element.append(rest[i + 1])
                    i += 2
                elif char == '"':
                    break
                else:
                    element.append(char)
                    i += 1
            elements.append("".join(element))
            rest = rest[i + 1 :]
        else:
            m = re.search("[,}]", rest)
            if m is None:
                return None
            item = rest[: m.start()]
            if item == "" or any(c in item for c in '{"\\'):
                return None
            elements.append(None if item.lower() == "null" and item.isascii() else item)
            rest = rest[m.start() :]
        if rest.startswith(","):
            rest = rest[1:]
        elif rest == "}":
            return elements
        else:
            return None


def json_string(text: str) -> str:
    """*text* as a JSON string, escaped as ``json.dumps(text, ensure_ascii=False)`` does."""
    out = ['"']
    for char in text:
        if char == '"':
            out.append('\\"')
        elif char == "\\":
            out.append("\\\\")
        elif char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif char == "\t":
            out.append("\\t")
        elif char == "\b":
            out.append("\\b")
        elif char == "\f":
            out.append("\\f")
        elif char < " ":
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def scalar_json(scalar: Scalar, text: str) -> str:
    """JSON for the text of a scalar value: literals when the text is one, else a string."""
    if scalar == "bool" and text in ("t", "f"):
        return "true" if text == "t" else "false"
    if scalar in ("int", "float", "numeric") and _JSON_NUMBER.fullmatch(text):
        return text
    if scalar == "json" and is_json(text):
        return text
    if scalar == "timestamp":
        return json_string(iso_timestamp(text))
    if scalar == "timetz":
        return json_string(iso_timetz(text))
    return json_string(text)


def value_json(kind: Kind, text: str) -> str:
    """JSON for the text of a column value; one-dimensional arrays become JSON arrays."""
    if not isinstance(kind, tuple):
        return scalar_json(kind, text)
    elements = parse_array(text)
    if elements is None:
        return json_string(text)
    items = ["null" if e is None else scalar_json(kind[1], e) for e in elements]
    return "[" + ",".join(items) + "]"


def format_commit_time(micros: int) -> str:
    """Microseconds since 2000-01-01 UTC as ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (truncated)."""
    days, in_day = divmod(micros, 86_400_000_000)
    # Howard Hinnant's civil_from_days, from 1970-01-01 (10957 days before 2000-01-01); it
    # covers every year a 64-bit timestamp can reach, which datetime does not.
    z = days + 10_957 + 719_468
    era, doe = divmod(z, 146_097)
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (month <= 2)
    ms = in_day // 1000
    return (
        f"{year:04d}-{month:02d}-{day:02d}T{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:"
        f"{ms // 1000 % 60:02d}.{ms % 1000:03d}Z"
    )


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------

# One column value as sent: ("t", text), ("n", None) null, ("u", None) unchanged TOAST.
Datum: TypeAlias = tuple[str, str | None]
# A column of a relation: (flags, name, type oid, type modifier, type name).
ColumnInfo: TypeAlias = tuple[int, str, int, int, str]

SMALL_FIELD_BYTES = 64
PAYLOAD_TOO_LARGE = "Error 413: Payload Too Large"


@attrs.frozen(slots=True)
class Begin:
    final_lsn: int
    commit_time: int  # microseconds since 2000-01-01 00:00 UTC
    xid: int


@attrs.frozen(slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int


@attrs.frozen(slots=True)
class Origin:
    commit_lsn: int
    name: str


@attrs.frozen(slots=True)
class Relation:
    relid: int
    namespace: str
    name: str
    replica_identity: str
    columns: list[ColumnInfo]
    kinds: tuple[Kind, ...] = attrs.field(repr=False)


@attrs.frozen(slots=True)
class TypeInfo:
    type_oid: int
    namespace: str
    name: str


@attrs.frozen(slots=True)
class Truncate:
    options: int
    relations: tuple[Relation, ...]

    @property
    def relids(self) -> list[int]:
        return [r.relid for r in self.relations]

    @property
    def tables(self) -> list[tuple[str, str]]:
        return [(r.namespace, r.name) for r in self.relations]


@attrs.frozen(slots=True)
class LogicalMessage:
    flags: int
    lsn: int
    prefix: str
    content: bytes

    @property
    def transactional(self) -> bool:
        return bool(self.flags & 1)


@attrs.frozen(slots=True)
class Unknown:
    tag: int


@attrs.frozen(slots=True)
class Change:
    """A row change: INSERT, UPDATE or DELETE of one row of ``relation``."""

    type: str
    relation: Relation
    old_kind: str | None  # "K" (key columns), "O" (full old row) or None
    old_tuple: list[Datum] | None
    new_tuple: list[Datum] | None
    transaction: Begin | None

    @property
    def schema(self) -> str:
        return self.relation.namespace

    @property
    def table(self) -> str:
        return self.relation.name

    @property
    def relid(self) -> int:
        return self.relation.relid

    @property
    def columns(self) -> list[tuple[str, str]]:
        return [(c[1], c[4]) for c in self.relation.columns]

    @property
    def xid(self) -> int | None:
        return None if self.transaction is None else self.transaction.xid

    @property
    def commit_time(self) -> int | None:
        return None if self.transaction is None else self.transaction.commit_time

    @property
    def commit_lsn(self) -> int | None:
        return None if self.transaction is None else self.transaction.final_lsn

    @property
    def commit_timestamp(self) -> str | None:
        t = self.commit_time
        return None if t is None else format_commit_time(t)

    def _old_text(self, i: int) -> Datum | None:
        """Old column *i*, or None when absent: unchanged TOAST, or not in a key tuple."""
        if self.old_tuple is None:
            return None
        datum = self.old_tuple[i]
        carried = self.old_kind != "K" or bool(self.relation.columns[i][0] & 1)
        return datum if carried and datum[0] != "u" else None

    def _new_text(self, i: int) -> Datum | None:
        """New column *i*; an unchanged TOAST value comes from the old tuple when it has one."""
        if self.new_tuple is None:
            return None
        datum = self.new_tuple[i]
        if datum[0] != "u":
            return datum
        old = self._old_text(i)
        return old if old is not None and old[0] == "t" else None

    def _row(self, datum: Callable[[int], Datum | None]) -> dict[str, Value]:
        row: dict[str, Value] = {}
        for i, column in enumerate(self.relation.columns):
            d = datum(i)
            if d is not None:
                row[column[1]] = None if d[1] is None else match_value(self.relation.kinds[i], d[1])
        return row

    @property
    def record(self) -> dict[str, Value] | None:
        """The new row as the matcher sees it (None for a DELETE)."""
        return None if self.new_tuple is None else self._row(self._new_text)

    @property
    def old_record(self) -> dict[str, Value] | None:
        """The old row (key columns or full) as the matcher sees it; None when not sent."""
        return None if self.old_tuple is None else self._row(self._old_text)

    @property
    def event(self) -> RowEvent:
        return RowEvent(self.type, self.schema, self.table, self.record, self.old_record)

    def _row_json(self, datum: Callable[[int], Datum | None], limit: int | None) -> str:
        members = []
        for i, column in enumerate(self.relation.columns):
            d = datum(i)
            if d is None:
                continue
            value = "null" if d[1] is None else value_json(self.relation.kinds[i], d[1])
            if limit is not None and len(value.encode()) > limit:
                continue
            members.append(f"{json_string(column[1])}:{value}")
        return "{" + ",".join(members) + "}"

    def _json(self, limit: int | None, errors: str | None) -> bytes:
        ts = self.commit_timestamp
        columns = ",".join(
            f'{{"name":{json_string(name)},"type":{json_string(type_name)}}}'
            for name, type_name in self.columns
        )
        parts = [
            f'{{"schema":{json_string(self.schema)}',
            f'"table":{json_string(self.table)}',
            f'"commit_timestamp":{"null" if ts is None else json_string(ts)}',
            f'"type":"{self.type}"',
            f'"columns":[{columns}]',
        ]
        if self.type != "DELETE":
            parts.append(f'"record":{self._row_json(self._new_text, limit)}')
        if self.type != "INSERT":
            parts.append(f'"old_record":{self._row_json(self._old_text, limit)}')
        parts.append(f'"errors":{"null" if errors is None else json_string(errors)}}}')
        return ",".join(parts).encode()

    def to_json(self, max_bytes: int | None = None) -> bytes:
        """The Supabase ``postgres_changes`` payload. Over *max_bytes*, only values of at most
        64 bytes of JSON are kept and ``errors`` says ``Error 413: Payload Too Large``."""
        full = self._json(None, None)
        if max_bytes is None or len(full) <= max_bytes:
            return full
        return self._json(SMALL_FIELD_BYTES, PAYLOAD_TOO_LARGE)


Message: TypeAlias = (
    Begin | Commit | Origin | Relation | TypeInfo | Change | Truncate | LogicalMessage | Unknown
)


# --------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------


class _Reader:
    """Reads the fields of one message; every failure says what and at which offset."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if len(self.data) - self.pos < n:
            raise DecodeError(f"unexpected end of message reading {what}", self.pos)
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str, what: str) -> int:
        value: int = struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]
        return value

    def u8(self, what: str) -> int:
        return self.unpack(">B", what)

    def i16(self, what: str) -> int:
        return self.unpack(">h", what)

    def i32(self, what: str) -> int:
        return self.unpack(">i", what)

    def u32(self, what: str) -> int:
        return self.unpack(">I", what)

    def i64(self, what: str) -> int:
        return self.unpack(">q", what)

    def u64(self, what: str) -> int:
        return self.unpack(">Q", what)

    def count(self, wide: bool, what: str) -> int:
        at = self.pos
        n = self.i32(what) if wide else self.i16(what)
        if n < 0:
            raise DecodeError(f"negative {what} {n}", at)
        return n

    @staticmethod
    def utf8(at: int, raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError(f"invalid UTF-8 in {what}", at) from None

    def cstr(self, what: str) -> str:
        at = self.pos
        end = self.data.find(b"\0", at)
        if end < 0:
            raise DecodeError(f"unterminated string reading {what}", at)
        self.pos = end + 1
        return self.utf8(at, self.data[at:end], what)

    def finish(self) -> None:
        left = len(self.data) - self.pos
        if left:
            raise DecodeError(f"{left} unexpected trailing bytes", self.pos)


def _namespace(wire: str) -> str:
    return wire or "pg_catalog"  # pgoutput writes pg_catalog as the empty string


class ReferenceDecoder:
    """Decodes the messages of one replication session, in order (the Rust decoder's oracle).

    State: relations (relid -> Relation), types (oid -> TypeInfo) and the open transaction.
    A message that fails to decode changes none of it.
    """

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}
        self.types: dict[int, TypeInfo] = {}
        self.transaction: Begin | None = None

    def reset(self) -> None:
        """Forget relations, types and the open transaction (a new session)."""
        self.relations.clear()
        self.types.clear()
        self.transaction = None

    def relation(self, relid: int) -> Relation | None:
        return self.relations.get(relid)

    def decode_many(self, payloads: Iterable[bytes]) -> list[Message | DecodeError]:
        """decode() for each payload, with a failure's DecodeError in its place."""
        out: list[Message | DecodeError] = []
        for payload in payloads:
            try:
                out.append(self.decode(payload))
            except DecodeError as error:
                out.append(error)
        return out

    def decode(self, payload: bytes) -> Message:
        """Decode one message, or raise DecodeError."""
        r = _Reader(bytes(payload))
        if not payload:
            raise DecodeError("empty message", 0)
        tag = r.u8("message type")
        message: Message
        if tag == ord("B"):
            message = Begin(r.u64("final LSN"), r.i64("commit timestamp"), r.u32("xid"))
            r.finish()
            self.transaction = message
        elif tag == ord("C"):
            message = Commit(
                r.u8("flags"), r.u64("commit LSN"), r.u64("end LSN"), r.i64("commit timestamp")
            )
            r.finish()
            self.transaction = None
        elif tag == ord("O"):
            message = Origin(r.u64("commit LSN"), r.cstr("origin name"))
            r.finish()
        elif tag == ord("R"):
            message = self._relation(r)
            r.finish()
            self.relations[message.relid] = message
        elif tag == ord("Y"):
            message = TypeInfo(
                r.u32("type id"), _namespace(r.cstr("namespace")), r.cstr("type name")
            )
            r.finish()
            self.types[message.type_oid] = message
        elif tag in b"IUD":
            message = self._change(chr(tag), r)
            r.finish()
        elif tag == ord("T"):
            count = r.count(True, "relation count")
            options = r.u8("options")
            relations = tuple(self._relid(r) for _ in range(count))
            r.finish()
            message = Truncate(options, relations)
        elif tag == ord("M"):
            flags = r.u8("flags")
            lsn = r.u64("message LSN")
            prefix = r.cstr("prefix")
            content = r.take(r.count(True, "content length"), "content")
            r.finish()
            message = LogicalMessage(flags, lsn, prefix, content)
        else:
            message = Unknown(tag)
        return message

    def _relation(self, r: _Reader) -> Relation:
        relid = r.u32("relation id")
        namespace = _namespace(r.cstr("namespace"))
        name = r.cstr("relation name")
        identity = chr(r.u8("replica identity"))
        columns: list[ColumnInfo] = []
        kinds: list[Kind] = []
        for _ in range(r.count(False, "column count")):
            flags = r.u8("column flags")
            column = r.cstr("column name")
            oid = r.u32("column type")
            typmod = r.i32("column type modifier")
            if oid in BUILTIN_TYPES:
                type_name, kind = BUILTIN_TYPES[oid]
            else:
                known = self.types.get(oid)
                type_name, kind = (str(oid) if known is None else known.name), "text"
            columns.append((flags, column, oid, typmod, type_name))
            kinds.append(kind)
        return Relation(relid, namespace, name, identity, columns, tuple(kinds))

    def _relid(self, r: _Reader) -> Relation:
        at = r.pos
        relid = r.u32("relation id")
        relation = self.relations.get(relid)
        if relation is None:
            raise DecodeError(f"unknown relation id {relid}", at)
        return relation

    def _change(self, tag: str, r: _Reader) -> Change:
        relation = self._relid(r)
        kind = {"I": "INSERT", "U": "UPDATE", "D": "DELETE"}[tag]
        old_kind = old = new = None
        at = r.pos
        tuple_kind = chr(r.u8("tuple kind"))
        if kind != "INSERT" and tuple_kind in "KO":
            old_kind = tuple_kind
            old = self._tuple(r, relation)
            if kind == "UPDATE":
                at = r.pos
                tuple_kind = chr(r.u8("tuple kind"))
                if tuple_kind != "N":
                    raise DecodeError(_unexpected_tuple("'N'", tuple_kind), at)
        else:
            expected = {"INSERT": "'N'", "UPDATE": "'K', 'O' or 'N'", "DELETE": "'K' or 'O'"}
            if tuple_kind != "N" or kind == "DELETE":
                raise DecodeError(_unexpected_tuple(expected[kind], tuple_kind), at)
        if kind != "DELETE":
            new = self._tuple(r, relation)
        return Change(kind, relation, old_kind, old, new, self.transaction)

    @staticmethod
    def _tuple(r: _Reader, relation: Relation) -> list[Datum]:
        at = r.pos
        count = r.count(False, "column count")
        if count != len(relation.columns):
            raise DecodeError(
                f"tuple has {count} columns, relation {relation.namespace}.{relation.name} "
                f"has {len(relation.columns)}",
                at,
            )
        datums: list[Datum] = []
        for _ in range(count):
            at = r.pos
            kind = chr(r.u8("column kind"))
            if kind in "nu":
                datums.append((kind, None))
            elif kind == "t":
                length = r.count(True, "column value length")
                start = r.pos
                datums.append(("t", r.utf8(start, r.take(length, "column value"), "column value")))
            elif kind == "b":
                raise DecodeError("binary tuple data is not supported", at)
            else:
                raise DecodeError(f"unknown column kind 0x{ord(kind):02x}", at)
        return datums


def _unexpected_tuple(expected: str, got: str) -> str:
    return f"expected tuple kind {expected}, got 0x{ord(got):02x}"
