"""The subscription matcher in plain Python: the oracle for the Rust matcher.

This module restates docs/matcher.md as code. The differential tests feed the same inputs to
it and to ``pyrt._core`` and require the same outputs, so it favours being obviously right
over being fast: there is no index, every subscription is evaluated against every event.
"""

from __future__ import annotations

import enum
import math
import operator
import re
import string
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple, TypeAlias

import attrs

from .._errors import ChannelNameError, FilterError

__all__ = [
    "Condition",
    "ReferenceMatcher",
    "RowEvent",
    "Value",
    "check_channel",
    "parse_filter",
]

Value: TypeAlias = bool | int | float | str | None
"""A column value of a row, after RowEvent has normalised it."""

_I64_MIN = -(2**63)
_I64_MAX = 2**63 - 1
_U64_LIMIT = 2**64

# Keywords (operators, `is` values, booleans, nan/inf, event types) are ASCII words compared
# ASCII-case-insensitively: str.lower() would also accept look-alikes such as the Kelvin sign,
# which lowercases to "k".
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_ASCII_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)


def _ascii_lower(text: str) -> str:
    return text.translate(_ASCII_LOWER)


def _ascii_upper(text: str) -> str:
    return text.translate(_ASCII_UPPER)


def _require_str(value: object, what: str, *, optional: bool = False) -> None:
    # Argument types are checked before anything else, as pyo3 converts arguments before
    # the compiled function body runs.
    if not (isinstance(value, str) or (optional and value is None)):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")


# --------------------------------------------------------------------------------------------
# Channel names and patterns
# --------------------------------------------------------------------------------------------

_CHANNEL_MAX_BYTES = 255
_WILDCARDS = ("*", ">")


def _is_invalid_channel_char(char: str) -> bool:
    return char < " " or char == "\x7f" or char.isspace()


def check_channel(name: str, pattern: bool = False) -> None:
    """Raise ChannelNameError unless *name* is a valid channel name, or pattern if *pattern*.

    The first problem left to right is reported, after the two length checks. Each problem
    sits at its own offset except at a ``>``, where "wildcard must be a whole segment" wins
    over "'>' is only allowed as the last segment"; so the reported problem is always the one
    with the lowest offset. An empty segment is reported at the offset where it would start
    (the ``:`` that follows it, or ``len(name)`` for a trailing one), so ``a::b c`` reports the
    empty segment at 2, not the space at 4.
    """
    # The exact algorithm, mirrored by the Rust side. Offsets count characters, not bytes.
    #   1. name == ""                          -> "empty channel name" at 0
    #   2. len(name.encode("utf-8")) > 255     -> "channel name longer than 255 bytes" at 0
    #   3. Split name on ":". For each segment in turn, starting at offset `start`:
    #      a. the segment is ""                -> "empty segment" at start
    #      b. for each character c of the segment in turn, at offset i:
    #         - c is "*" or ">":
    #             not pattern                  -> "wildcards are only allowed in patterns" at i
    #             len(segment) > 1             -> "wildcard must be a whole segment" at i
    #             c is ">", not last segment   -> "'>' is only allowed as the last segment" at i
    #         - c < U+0020, c == U+007F or c.isspace()
    #                                          -> "invalid character U+XXXX" at i (%04X)
    #   The first problem met is raised.
    _require_str(name, "channel name")
    if name == "":
        raise ChannelNameError("empty channel name", 0)
    if len(name.encode("utf-8")) > _CHANNEL_MAX_BYTES:
        raise ChannelNameError(f"channel name longer than {_CHANNEL_MAX_BYTES} bytes", 0)
    segments = name.split(":")
    start = 0
    for index, segment in enumerate(segments):
        if segment == "":
            raise ChannelNameError("empty segment", start)
        is_last = index == len(segments) - 1
        for offset, char in enumerate(segment, start):
            if char in _WILDCARDS:
                if not pattern:
                    raise ChannelNameError("wildcards are only allowed in patterns", offset)
                if len(segment) != 1:
                    raise ChannelNameError("wildcard must be a whole segment", offset)
                if char == ">" and not is_last:
                    raise ChannelNameError("'>' is only allowed as the last segment", offset)
            elif _is_invalid_channel_char(char):
                raise ChannelNameError(f"invalid character U+{ord(char):04X}", offset)
        start += len(segment) + 1  # the segment and the ":" after it


def _channel_matches(pattern: Sequence[str], name: Sequence[str]) -> bool:
    """Whether the segments of a (valid) pattern match the segments of a concrete name."""
    if not pattern:
        return not name
    head = pattern[0]
    if head == ">":
        # check_channel guarantees ">" is the last segment: it takes one or more segments.
        return len(name) >= 1
    if not name:
        return False
    return (head in ("*", name[0])) and _channel_matches(pattern[1:], name[1:])


# --------------------------------------------------------------------------------------------
# The filter grammar
# --------------------------------------------------------------------------------------------


class Condition(NamedTuple):
    """One ``column=[not.]operator.value`` condition of a filter.

    ``value`` is the unescaped text for scalar operators, a tuple of unescaped items for
    ``in``, and ``"null"``, ``"true"`` or ``"false"`` for ``is``.
    """

    column: str
    operator: str
    negated: bool
    value: str | tuple[str, ...]


_COLUMN_CHARS = frozenset(string.ascii_letters + string.digits + "_$")
_OPERATORS = frozenset({"eq", "neq", "lt", "lte", "gt", "gte", "like", "ilike", "is", "in"})
_IS_VALUES = {"null": "null", "unknown": "null", "true": "true", "false": "false"}


def parse_filter(text: str) -> list[Condition]:
    """Parse a row filter into its conditions; ``""`` is the empty filter.

    Raises FilterError for the first problem left to right (docs/matcher.md has the table).
    Where the doc leaves the choice open this parser decides as follows:

    - The operator is all the text after ``=`` (and ``not.``) up to the next ``.``, ``,`` or
      the end, so the error shows all of it: ``a=eq5.1`` is "unknown operator 'eq5'" at 2,
      and "expected '.' after operator" happens only at a ``,`` or the end (``a=eq``).
    - ``not.`` is recognised only when followed by its dot: ``a=not`` is unknown operator 'not'.
    - The ``is`` value is raw text, quotes included: ``a=is."null"`` is an invalid is value.
    - A ``like``/``ilike`` pattern is checked for a trailing escape only after the whole value
      token (including the ``,`` after a closing quote) has been read.
    - An unterminated quoted ``in`` item is "unterminated quoted value" at its quote; running
      out of text anywhere else inside a list is "unterminated list" at the ``(``.
    """
    _require_str(text, "filter")
    if text == "":
        return []
    return _FilterParser(text).parse()


class _FilterParser:
    """A recursive-descent reader over the filter text; ``pos`` is the next character."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def parse(self) -> list[Condition]:
        conditions = [self._condition()]
        # Every condition stops at the "," that separates it from the next, or at the end.
        while self.pos < len(self.text):
            self.pos += 1
            conditions.append(self._condition())
        return conditions

    def _peek(self) -> str:
        """The next character, or "" at the end of the text."""
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _expect(self, char: str, reason: str) -> None:
        if self._peek() != char:
            raise FilterError(reason, self.pos)
        self.pos += 1

    def _condition(self) -> Condition:
        if self._peek() in ("", ","):
            raise FilterError("empty condition", self.pos)
        column = self._column()
        self._expect("=", "expected '=' after column")
        negated = self.text.startswith("not.", self.pos)
        if negated:
            self.pos += len("not.")
        op_start = self.pos
        while self._peek() not in ("", ".", ","):
            self.pos += 1
        op = self.text[op_start : self.pos]
        if op not in _OPERATORS:
            raise FilterError(f"unknown operator '{op}'", op_start)
        self._expect(".", "expected '.' after operator")
        value: str | tuple[str, ...]
        if op == "in":
            value = self._list()
        elif op == "is":
            value = self._is_value()
        else:
            value_start = self.pos
            value = self._scalar()
            if op in ("like", "ilike") and _like_tokens(value) is None:
                raise FilterError("pattern ends with an escape", value_start)
        return Condition(column, op, negated, value)

    def _column(self) -> str:
        start = self.pos
        if self._peek() == '"':
            column = self._quoted("column")
            if column == "":
                raise FilterError("empty quoted column", start)
            return column
        while self._peek() in _COLUMN_CHARS:
            self.pos += 1
        if self.pos == start:
            raise FilterError("expected column name", start)
        return self.text[start : self.pos]

    def _quoted(self, what: str) -> str:
        """Read a quoted string starting at the opening quote; return it unescaped."""
        start = self.pos
        self.pos += 1
        chars: list[str] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == '"':
                self.pos += 1
                return "".join(chars)
            if char == "\\":
                if self.pos + 1 == len(self.text):
                    break  # an escape with nothing to escape: the quote never closes
                char = self.text[self.pos + 1]
                self.pos += 1
            chars.append(char)
            self.pos += 1
        raise FilterError(f"unterminated quoted {what}", start)

    def _scalar(self) -> str:
        if self._peek() == '"':
            value = self._quoted("value")
            if self._peek() not in ("", ","):
                raise FilterError("expected ',' after quoted value", self.pos)
            return value
        end = self.text.find(",", self.pos)
        if end == -1:
            end = len(self.text)
        value = self.text[self.pos : end]
        if '"' in value:
            raise FilterError("unexpected '\"' in unquoted value", self.pos + value.index('"'))
        self.pos = end
        return value

    def _is_value(self) -> str:
        start = self.pos
        end = self.text.find(",", start)
        if end == -1:
            end = len(self.text)
        raw = self.text[start:end]
        canonical = _IS_VALUES.get(_ascii_lower(raw))
        if canonical is None:
            raise FilterError(
                f"invalid is value '{raw}', expected null, true, false or unknown", start
            )
        self.pos = end
        return canonical

    def _skip_spaces(self) -> None:
        while self._peek() == " ":
            self.pos += 1

    def _list(self) -> tuple[str, ...]:
        open_paren = self.pos
        self._expect("(", "expected '(' after in.")
        items: list[str] = []
        if self._peek() == ")":
            self.pos += 1
        else:
            # Every "," separates two items, so this reads one item per turn until ")".
            while True:
                self._skip_spaces()
                if self._peek() == '"':
                    items.append(self._quoted("value"))
                    self._skip_spaces()
                    if self._peek() == "":
                        raise FilterError("unterminated list", open_paren)
                    if self._peek() not in (",", ")"):
                        raise FilterError("expected ',' or ')' in list", self.pos)
                else:
                    start = self.pos
                    while self._peek() not in ("", ",", ")"):
                        if self._peek() in ("(", '"'):
                            raise FilterError(f"unexpected '{self._peek()}' in list", self.pos)
                        self.pos += 1
                    if self._peek() == "":
                        raise FilterError("unterminated list", open_paren)
                    items.append(self.text[start : self.pos].rstrip(" "))
                closing = self._peek() == ")"
                self.pos += 1
                if closing:
                    break
        if self._peek() not in ("", ","):
            raise FilterError("expected ',' after list", self.pos)
        return tuple(items)


# --------------------------------------------------------------------------------------------
# Reading literals as the row value's type, and comparing
# --------------------------------------------------------------------------------------------

# Explicit ASCII grammars: int() and float() would also take "1_0", " 1" or Arabic-Indic digits.
_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SPECIAL_NUMBERS = {
    "nan": math.nan,
    "inf": math.inf,
    "+inf": math.inf,
    "-inf": -math.inf,
    "infinity": math.inf,
    "+infinity": math.inf,
    "-infinity": -math.inf,
}
_BOOLEANS = {"true": True, "t": True, "false": False, "f": False}


def _read_integer(literal: str) -> int | None:
    if _INTEGER.fullmatch(literal) is None:
        return None
    value = int(literal)
    return value if _I64_MIN <= value <= _I64_MAX else None


def _read_number(literal: str) -> float | None:
    special = _SPECIAL_NUMBERS.get(_ascii_lower(literal))
    if special is not None:
        return special
    if _NUMBER.fullmatch(literal) is None:
        return None
    return float(literal)  # huge exponents give +-inf (or 0.0), as the doc wants


def _read_boolean(literal: str) -> bool | None:
    return _BOOLEANS.get(_ascii_lower(literal))


def _sign(difference: int) -> int:
    return (difference > 0) - (difference < 0)


def _compare_floats(a: float, b: float) -> int:
    """Postgres' float8 order: NaN equals NaN and is above every number; -0 equals 0."""
    if math.isnan(a) or math.isnan(b):
        return _sign(math.isnan(a) - math.isnan(b))
    return _sign((a > b) - (a < b))


def _compare(value: Value, literal: str) -> int | None:
    """Order *value* against *literal* read as the value's type (-1, 0, 1), or None if unknown."""
    if value is None:
        return None
    if isinstance(value, bool):  # before int: bool is a subclass of int
        boolean = _read_boolean(literal)
        return None if boolean is None else _sign(value - boolean)
    if isinstance(value, int):
        integer = _read_integer(literal)
        if integer is not None:
            return _sign(value - integer)
        number = _read_number(literal)
        return None if number is None else _compare_floats(float(value), number)
    if isinstance(value, float):
        number = _read_number(literal)
        return None if number is None else _compare_floats(value, number)
    return _sign((value > literal) - (value < literal))  # str: by code point


class _Wildcard(enum.Enum):
    ANY_RUN = "%"  # also written "*"
    ANY_ONE = "_"


_LikeToken: TypeAlias = _Wildcard | str


def _like_tokens(pattern: str) -> list[_LikeToken] | None:
    """Split a like pattern into wildcards and literal characters; None if it ends with "\\"."""
    tokens: list[_LikeToken] = []
    chars = iter(pattern)
    for char in chars:
        if char in ("%", "*"):
            tokens.append(_Wildcard.ANY_RUN)
        elif char == "_":
            tokens.append(_Wildcard.ANY_ONE)
        elif char == "\\":
            escaped = next(chars, None)
            if escaped is None:
                return None
            tokens.append(escaped)
        else:
            tokens.append(char)
    return tokens


def _like(text: str, pattern: str) -> bool:
    tokens = _like_tokens(pattern)
    assert tokens is not None, "the parser rejects patterns that end with an escape"
    # Run the pattern as an NFA: the set of positions in text the tokens so far can reach.
    positions = {0}
    for token in tokens:
        if token is _Wildcard.ANY_RUN:
            positions = set(range(min(positions), len(text) + 1)) if positions else set()
        elif token is _Wildcard.ANY_ONE:
            positions = {p + 1 for p in positions if p < len(text)}
        else:
            positions = {p + 1 for p in positions if p < len(text) and text[p] == token}
    return len(text) in positions


def _lower_each(text: str) -> str:
    # Per character, so there is no context: str.lower() would turn a final "Σ" into "ς".
    return "".join(char.lower() for char in text)


def _apply(op: str, value: Value, literal: str | tuple[str, ...]) -> bool | None:
    """Evaluate one non-negated condition on a present column: True, False or None (unknown)."""
    if op == "is":
        if literal == "null":
            return value is None
        if literal == "true":
            return value is True
        return value is False  # an int 0 or a string "false" is not false here
    if value is None:
        return None
    if op == "in":
        assert isinstance(literal, tuple)
        # Items that do not read as the value's type compare as None and are skipped.
        return any(_compare(value, item) == 0 for item in literal)
    assert isinstance(literal, str)
    if op in ("like", "ilike"):
        if not isinstance(value, str):
            return None
        if op == "ilike":
            return _like(_lower_each(value), _lower_each(literal))
        return _like(value, literal)
    order = _compare(value, literal)
    if order is None:
        return None
    return {
        "eq": order == 0,
        "neq": order != 0,
        "lt": order < 0,
        "lte": order <= 0,
        "gt": order > 0,
        "gte": order >= 0,
    }[op]


def _evaluate(condition: Condition, row: Mapping[str, Value]) -> bool | None:
    """Three-valued result of *condition* on *row*; None is SQL's unknown."""
    if condition.column not in row:
        return None  # for every operator, `is` included
    result = _apply(condition.operator, row[condition.column], condition.value)
    if result is None or not condition.negated:
        return result
    return not result


# --------------------------------------------------------------------------------------------
# Row events
# --------------------------------------------------------------------------------------------

_EVENT_TYPES = ("INSERT", "UPDATE", "DELETE")


def _row_value(value: object) -> Value:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        number = operator.index(value)
        # Postgres bigint is the widest integer; anything wider is read as a float, and
        # float() raises OverflowError beyond the float range.
        return number if _I64_MIN <= number <= _I64_MAX else float(number)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    raise TypeError(f"row values must be None, bool, int, float or str, not {type(value).__name__}")


def _row(values: Mapping[str, object] | None) -> Mapping[str, Value] | None:
    if values is None:
        return None
    if not isinstance(values, Mapping):
        raise TypeError(f"a record must be a mapping, not {type(values).__name__}")
    row: dict[str, Value] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise TypeError(f"record keys must be str, not {type(key).__name__}")
        row[key] = _row_value(value)
    return MappingProxyType(row)


@attrs.frozen(slots=True, init=False)
class RowEvent:
    """A change to one row: INSERT and UPDATE are matched on ``record``, DELETE on ``old_record``.

    ``type`` is stored uppercase; values are stored normalised (integers outside the signed
    64-bit range become floats). Raises TypeError for arguments that are not str, then
    ValueError for an unknown type, then TypeError or OverflowError for a bad record.
    """

    type: str
    schema: str
    table: str
    # Rows take no part in the hash: they are mappings, and equal events still hash equal.
    record: Mapping[str, Value] | None = attrs.field(hash=False)
    old_record: Mapping[str, Value] | None = attrs.field(hash=False)

    def __init__(
        self,
        type: str,
        schema: str,
        table: str,
        record: Mapping[str, object] | None = None,
        old_record: Mapping[str, object] | None = None,
    ) -> None:
        _require_str(type, "event type")
        _require_str(schema, "schema")
        _require_str(table, "table")
        canonical = _ascii_upper(type)
        if canonical not in _EVENT_TYPES:
            raise ValueError(f"event type must be INSERT, UPDATE or DELETE, not {type!r}")
        self.__attrs_init__(canonical, schema, table, _row(record), _row(old_record))

    @property
    def row(self) -> Mapping[str, Value]:
        """The row the filters see; an absent record has no columns."""
        row = self.old_record if self.type == "DELETE" else self.record
        return {} if row is None else row


# --------------------------------------------------------------------------------------------
# The matcher
# --------------------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class _ChannelSubscription:
    segments: tuple[str, ...]

    def matches(self, channel: Sequence[str]) -> bool:
        return _channel_matches(self.segments, channel)


@attrs.frozen(slots=True)
class _RowSubscription:
    event: str  # "INSERT", "UPDATE", "DELETE" or "*"
    schema: str  # a name or "*"
    table: str  # a name or "*"
    conditions: tuple[Condition, ...]

    def matches(self, event: RowEvent) -> bool:
        row = event.row
        return (
            self.event in ("*", event.type)
            and self.schema in ("*", event.schema)
            and self.table in ("*", event.table)
            # Unknown (None) excludes just as False does.
            and all(_evaluate(condition, row) is True for condition in self.conditions)
        )


def _subscription_id(sub_id: int) -> int:
    """Read an id the way pyo3 reads a u64: TypeError for non-integers, else OverflowError."""
    value = operator.index(sub_id)
    if not 0 <= value < _U64_LIMIT:
        raise OverflowError(f"subscription id {value} is outside 0 .. 2**64-1")
    return value


class ReferenceMatcher:
    """Channel and row subscriptions, matched by evaluating every one of them."""

    def __init__(self) -> None:
        self._subscriptions: dict[int, _ChannelSubscription | _RowSubscription] = {}

    def __len__(self) -> int:
        return len(self._subscriptions)

    def __contains__(self, sub_id: object) -> bool:
        # Like `in` on a dict: something that cannot be an id is simply not present.
        return isinstance(sub_id, int) and sub_id in self._subscriptions

    def _check_new(self, sub_id: int) -> None:
        if sub_id in self._subscriptions:
            raise ValueError(f"subscription id {sub_id} is already present")

    def add_channel(self, sub_id: int, pattern: str) -> None:
        """Subscribe *sub_id* to the channels *pattern* matches.

        Checks, in order: the argument types (TypeError, OverflowError for the id), a
        duplicate id (ValueError), then the pattern (ChannelNameError).
        """
        sub_id = _subscription_id(sub_id)
        _require_str(pattern, "pattern")
        self._check_new(sub_id)
        check_channel(pattern, pattern=True)
        self._subscriptions[sub_id] = _ChannelSubscription(tuple(pattern.split(":")))

    def add_rows(
        self, sub_id: int, event: str, schema: str, table: str, filter: str | None = None
    ) -> None:
        """Subscribe *sub_id* to row changes; ``"*"`` is any event, schema or table.

        Checks, in order: the argument types, a duplicate id, then event, schema, table and
        filter (FilterError); nothing is stored if any check fails.
        """
        sub_id = _subscription_id(sub_id)
        _require_str(event, "event")
        _require_str(schema, "schema")
        _require_str(table, "table")
        _require_str(filter, "filter", optional=True)
        self._check_new(sub_id)
        canonical_event = _ascii_upper(event)
        if canonical_event not in (*_EVENT_TYPES, "*"):
            raise FilterError(f"unknown event '{event}'", 0)
        if schema == "":
            raise FilterError("empty schema", 0)
        if table == "":
            raise FilterError("empty table", 0)
        conditions = tuple(parse_filter(filter or ""))
        self._subscriptions[sub_id] = _RowSubscription(canonical_event, schema, table, conditions)

    def remove(self, sub_id: int) -> bool:
        """Forget *sub_id*; return whether it was present."""
        return self._subscriptions.pop(_subscription_id(sub_id), None) is not None

    def match_channel(self, channel: str) -> list[int]:
        """The ids subscribed to *channel*, a concrete name (ChannelNameError otherwise)."""
        check_channel(channel)
        segments = channel.split(":")
        return [
            sub_id
            for sub_id, subscription in self._subscriptions.items()
            if isinstance(subscription, _ChannelSubscription) and subscription.matches(segments)
        ]

    def match_channels(self, channels: Sequence[str]) -> list[list[int]]:
        """match_channel for each channel."""
        return [self.match_channel(channel) for channel in channels]

    def match_row(self, event: RowEvent) -> list[int]:
        """The ids whose row subscription wants *event*."""
        return [
            sub_id
            for sub_id, subscription in self._subscriptions.items()
            if isinstance(subscription, _RowSubscription) and subscription.matches(event)
        ]

    def match_rows(self, events: Sequence[RowEvent]) -> list[list[int]]:
        """match_row for each event."""
        return [self.match_row(event) for event in events]
