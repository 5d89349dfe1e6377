"""Channel rules: who may subscribe, publish, use presence, read history or mutate records on
which channel, with claims-bound row filters and per-role columns for table channels. Sans-IO.

The rules are an ordered list (TOML `[[auth.rules]]`, docs/auth.md "Channel rules"). For a
channel name the first rule whose pattern matches it decides; for a pattern (a client joining
`chat:*`) the first rule that covers it decides, and every rule before it that overlaps it
must grant too. Templates (`{sub}`, `{claims.PATH}`) are whole segments of a rule's channel
and whole values of its row filter; they are filled from the identity at each decision, a
filter value always as a quoted value of the filter grammar, so a claim can never add a
condition.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .._core import Matcher, check_channel, parse_filter
from .._errors import ChannelNameError, FilterError
from .identity import Action, Identity
from .protocol import TABLE_CHANNEL_PREFIX, table_channel

__all__ = ["Grant", "Rules"]

MAX_RULES = 1000
"""At most this many rules."""
MAX_STRING = 1024
"""At most this many characters in any string of a rule, and entries in any of its lists."""
MAX_CLAIM_VALUE = 1024
"""A claim longer than this (as text) is not put into a row filter: the grant is refused."""

_ACTIONS = tuple(Action)
_KEYS = frozenset({"channel", "filter", "columns", *(a.value for a in _ACTIONS)})
_PATH = r"[A-Za-z0-9_$-]+(?:\.[A-Za-z0-9_$-]+)*"
_TEMPLATE = re.compile(r"\{(sub|claims\.(" + _PATH + r"))\}")
_PATH_RE = re.compile(_PATH)
_ROLE_RE = re.compile(r"[^\s]+")
_DUMMY_SEGMENT = "x"
_MARKER = "\x00pyrt-template-{}\x00"
_TEMPLATE_OPERATORS = frozenset({"eq", "neq", "lt", "lte", "gt", "gte", "in"})


@attrs.frozen(slots=True)
class Grant:
    """A decision. `reason` says why it was refused (safe to show the client), "" when allowed.
    For table channels, `row_filter` is the rule's forced filter with the identity's values
    substituted (AND it into the client's with `Rules.and_filter`), and `columns` the columns
    this identity may see (None: all of them)."""

    allowed: bool
    reason: str = ""
    row_filter: str | None = None
    columns: frozenset[str] | None = None


_MISSING = object()


def _claim(claims: Mapping[str, Any], path: str) -> object:
    """The claim at a dotted path, or `_MISSING`."""
    value: object = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _scalar_text(value: object) -> str | None:
    """A claim as text: strings as they are, numbers and booleans as their JSON text; None for
    anything else (null, lists, objects, NaN)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        try:
            return json.dumps(value, allow_nan=False)
        except ValueError:
            return None
    return None


def _template_value(identity: Identity, template: str) -> str | None:
    """The text a template (`sub` or `claims.PATH`) stands for, None when it has none."""
    if template == "sub":
        return identity.user or None
    return _scalar_text(_claim(identity.claims, template[len("claims.") :]))


def _is_segment(text: str) -> bool:
    return bool(text) and not any(
        c in ":*>" or c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in text
    )


# --------------------------------------------------------------------------------------------
# Who
# --------------------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class _Who:
    """One who form: `kind` is anyone, authenticated, anonymous, role, claim or nobody."""

    kind: str
    path: str = ""
    value: str = ""

    def admits(self, identity: Identity) -> bool:
        match self.kind:
            case "anyone":
                return True
            case "authenticated":
                return not identity.anonymous
            case "anonymous":
                return identity.anonymous
            case "role":
                return identity.role == self.value
            case "claim":
                claim = _claim(identity.claims, self.path)
                if isinstance(claim, list):
                    return any(_scalar_text(item) == self.value for item in claim)
                return _scalar_text(claim) == self.value
        return False


def _parse_who(value: object, where: str) -> tuple[_Who, ...]:
    items: list[object]
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, list | tuple):
        items = list(value)
        if not items:
            raise ValueError(f"{where}: an empty list (write 'nobody')")
        if len(items) > MAX_STRING:
            raise ValueError(f"{where}: more than {MAX_STRING} entries")
    else:
        raise ValueError(f"{where}: expected a string or a list of strings")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{where}: expected a string or a list of strings")
        if len(item) > MAX_STRING:
            raise ValueError(f"{where}: longer than {MAX_STRING} characters")
        if item in ("anyone", "authenticated", "anonymous", "nobody"):
            out.append(_Who(item))
        elif item.startswith("role:") and _ROLE_RE.fullmatch(item[5:]):
            out.append(_Who("role", value=item[5:]))
        elif item.startswith("claim:") and "=" in item:
            path, _, expected = item[6:].partition("=")
            if not _PATH_RE.fullmatch(path):
                raise ValueError(f"{where}: invalid claim path {path!r} in {item!r}")
            out.append(_Who("claim", path=path, value=expected))
        else:
            raise ValueError(
                f"{where}: unknown who {item!r} (expected anyone, authenticated, anonymous,"
                " role:NAME, claim:PATH=VALUE or nobody)"
            )
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Segment patterns: match, cover, overlap
# --------------------------------------------------------------------------------------------


def covers(rule: Sequence[str], pattern: Sequence[str]) -> bool:
    """Whether every channel name `pattern` matches is matched by `rule` (both as segments;
    `*` one segment, `>` one or more trailing ones)."""
    for i, segment in enumerate(rule):
        if segment == ">":
            return len(pattern) > i
        if i >= len(pattern):
            return False
        theirs = pattern[i]
        if theirs == ">":
            return False  # any number of segments, which no rule without '>' here takes
        if segment != "*" and segment != theirs:  # a literal covers only itself
            return False
    return len(rule) == len(pattern)


def overlaps(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether some channel name is matched by both patterns."""
    for i in range(max(len(a), len(b))):
        if i >= len(a) or i >= len(b):
            return False  # one has ended: it takes no more segments, the other needs one
        x, y = a[i], b[i]
        if x == ">" or y == ">":
            return True  # the other's rest matches some name of one or more segments
        if x != "*" and y != "*" and x != y:
            return False
    return True


# --------------------------------------------------------------------------------------------
# A rule
# --------------------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class _Rule:
    segments: tuple[str, ...]
    """The channel pattern's segments; a template segment is kept as `{sub}`/`{claims.P}`."""
    templates: tuple[str | None, ...] | None
    """Per segment, its template (`sub`, `claims.P`) or None; None when it has none."""
    who: Mapping[Action, tuple[_Who, ...]]
    filter_parts: tuple[str, ...] | None
    """The filter split around its templates: literal, template, literal, ... (odd: names)."""
    columns: Mapping[str, frozenset[str]] | None
    wild: tuple[str, ...] = attrs.field(init=False)
    """The channel pattern with `*` for each template: it matches every name it can, filled."""

    @wild.default
    def _wild(self) -> tuple[str, ...]:
        if self.templates is None:
            return self.segments
        pairs = zip(self.segments, self.templates, strict=True)
        return tuple(segment if t is None else "*" for segment, t in pairs)

    @property
    def restricted(self) -> bool:
        return self.filter_parts is not None or self.columns is not None

    def pattern_for(self, identity: Identity) -> tuple[str, ...] | None:
        """The channel pattern with the identity's values in its templates; None when one has
        no valid value (the rule does not apply to this identity)."""
        if self.templates is None:
            return self.segments
        out = list(self.segments)
        for i, template in enumerate(self.templates):
            if template is None:
                continue
            value = _template_value(identity, template)
            if value is None or not _is_segment(value):
                return None
            out[i] = value
        try:
            check_channel(":".join(out), pattern=True)
        except ChannelNameError:
            return None  # too long
        return tuple(out)

    def matches_name(self, identity: Identity, name: Sequence[str]) -> bool:
        """Whether the rule, filled from the identity, matches a channel name's segments."""
        templates = self.templates
        for i, segment in enumerate(self.segments):
            if segment == ">":
                return len(name) > i
            if i >= len(name):
                return False
            template = None if templates is None else templates[i]
            if template is not None:
                # Equal to a segment of a valid name: a valid segment, and the filled pattern
                # is no longer than the name.
                if _template_value(identity, template) != name[i]:
                    return False
            elif segment != "*" and segment != name[i]:
                return False
        return len(self.segments) == len(name)

    def grants(self, identity: Identity, action: Action) -> bool:
        return any(who.admits(identity) for who in self.who[action])

    def grant(self, identity: Identity) -> Grant:
        """The grant of an allowed action: the filter and columns for this identity."""
        row_filter = None
        if self.filter_parts is not None:
            parts = list(self.filter_parts)
            for i in range(1, len(parts), 2):
                value = _template_value(identity, parts[i])
                name = "sub" if parts[i] == "sub" else parts[i][len("claims.") :]
                if value is None:
                    return Grant(False, f"row filter needs a claim: {name} claim missing")
                if len(value) > MAX_CLAIM_VALUE:
                    return Grant(False, f"row filter needs a claim: {name} claim too long")
                parts[i] = _quote(value)
            row_filter = "".join(parts) or None
        columns = None
        if self.columns is not None:
            role = identity.role
            if role is not None and role in self.columns:
                columns = self.columns[role]
            else:
                columns = self.columns.get("*")
        return Grant(True, "", row_filter, columns)


def _quote(value: str) -> str:
    """A value as a quoted value of the filter grammar."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parse_channel(
    value: object, where: str
) -> tuple[tuple[str, ...], tuple[str | None, ...] | None]:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string")
    if len(value) > MAX_STRING:
        raise ValueError(f"{where}: longer than {MAX_STRING} characters")
    segments = tuple(value.split(":"))
    templates: list[str | None] = []
    dummy = []
    for segment in segments:
        match = _TEMPLATE.fullmatch(segment)
        templates.append(match.group(1) if match else None)
        if match:
            dummy.append(_DUMMY_SEGMENT)
        elif "{" in segment or "}" in segment:
            raise ValueError(
                f"{where}: {segment!r}: a template is a whole segment, {{sub}} or"
                " {claims.PATH} (braces are not allowed elsewhere)"
            )
        else:
            dummy.append(segment)
    try:
        check_channel(":".join(dummy), pattern=True)
    except ChannelNameError as e:
        raise ValueError(f"{where}: {e.reason} (at position {e.position})") from None
    return segments, tuple(templates) if any(templates) else None


def _parse_filter(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string")
    if len(value) > MAX_STRING:
        raise ValueError(f"{where}: longer than {MAX_STRING} characters")
    if "\x00" in value:
        raise ValueError(f"{where}: contains NUL")
    parts: list[str] = []
    last = 0
    for match in _TEMPLATE.finditer(value):
        parts += [value[last : match.start()], match.group(1)]
        last = match.end()
    parts.append(value[last:])
    markers = [_MARKER.format(i) for i in range(len(parts) // 2)]
    dummy = "".join(part if i % 2 == 0 else _quote(markers[i // 2]) for i, part in enumerate(parts))
    try:
        Matcher().add_rows(0, "*", "s", "t", dummy)
        conditions = parse_filter(dummy)
    except FilterError as e:
        if not markers:
            raise ValueError(f"{where}: {e.reason} (at position {e.position})") from None
        raise ValueError(
            f"{where}: {e.reason} (a template, {{sub}} or {{claims.PATH}}, stands for one"
            " whole quoted value)"
        ) from None
    seen = []
    for column, operator, _negated, literal in conditions:
        values = literal if isinstance(literal, tuple) else (literal,)
        if "\x00" in column:
            raise ValueError(f"{where}: a template is a value, not a column")
        for text in values:
            if "\x00" not in text:
                continue
            if text not in markers:
                raise ValueError(
                    f"{where}: a template must be a whole value (not inside a quoted value)"
                )
            if operator not in _TEMPLATE_OPERATORS:
                raise ValueError(
                    f"{where}: a template can be the value of eq, neq, lt, lte, gt, gte or in,"
                    f" not {operator}"
                )
            seen.append(text)
    if sorted(seen) != sorted(markers):
        raise ValueError(f"{where}: a template must be a whole value")
    for i in range(0, len(parts), 2):
        if "{" in parts[i] and re.search(r"\{(sub|claims\.)", parts[i]):
            raise ValueError(f"{where}: invalid template in {value!r}")
    return tuple(parts)


def _is_column(name: object) -> bool:
    return (
        isinstance(name, str)
        and 0 < len(name.encode()) <= 63
        and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)
    )


def _parse_columns(value: object, where: str) -> Mapping[str, frozenset[str]]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a table of role = [columns]")
    if len(value) > MAX_STRING:
        raise ValueError(f"{where}: more than {MAX_STRING} roles")
    out = {}
    for role, names in value.items():
        if not isinstance(role, str) or not role or len(role) > MAX_STRING:
            raise ValueError(f"{where}: invalid role {role!r}")
        if not isinstance(names, list | tuple) or len(names) > MAX_STRING:
            raise ValueError(f"{where}.{role}: expected a list of column names")
        for name in names:
            if not _is_column(name):
                raise ValueError(
                    f"{where}.{role}: invalid column name {name!r} (1 to 63 bytes, no"
                    " control characters)"
                )
        out[role] = frozenset(names)
    return out


def _parse_rule(index: int, table: object) -> _Rule:
    where = f"auth.rules[{index}]"
    if not isinstance(table, Mapping):
        raise ValueError(f"{where}: expected a table")
    unknown = sorted(str(k) for k in table if k not in _KEYS)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key (expected {', '.join(sorted(_KEYS))})")
    if "channel" not in table:
        raise ValueError(f"{where}.channel: missing")
    segments, templates = _parse_channel(table["channel"], f"{where}.channel")
    nobody = (_Who("nobody"),)
    who: dict[Action, tuple[_Who, ...]] = {}
    for action in _ACTIONS:
        key = action.value
        if key in table:
            who[action] = _parse_who(table[key], f"{where}.{key}")
    subscribe = who.setdefault(Action.SUBSCRIBE, nobody)
    who.setdefault(Action.PRESENCE, subscribe)
    who.setdefault(Action.HISTORY, subscribe)
    who.setdefault(Action.PUBLISH, nobody)
    who.setdefault(Action.MUTATE, nobody)
    filter_parts: tuple[str, ...] | None = None
    columns: Mapping[str, frozenset[str]] | None = None
    if ("filter" in table or "columns" in table) and segments[0] != TABLE_CHANNEL_PREFIX:
        key = "filter" if "filter" in table else "columns"
        raise ValueError(f"{where}.{key}: only for table channels ({TABLE_CHANNEL_PREFIX}:<s>:<t>)")
    if "filter" in table:
        filter_parts = _parse_filter(table["filter"], f"{where}.filter")
    if "columns" in table:
        columns = _parse_columns(table["columns"], f"{where}.columns")
    return _Rule(segments, templates, who, filter_parts, columns)


# --------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------


class Rules:
    """An ordered list of channel rules (docs/auth.md "Channel rules")."""

    __slots__ = ("_rules",)

    def __init__(self, rules: Sequence[_Rule]) -> None:
        self._rules = tuple(rules)

    @classmethod
    def from_config(cls, tables: Sequence[Mapping[str, Any]]) -> Rules:
        """The rules of `[[auth.rules]]` tables, in order. ValueError names the first bad one:
        `auth.rules[3].filter: ...`."""
        if isinstance(tables, str | bytes | Mapping) or not isinstance(tables, Sequence):
            raise ValueError("auth.rules: expected a list of tables")
        if len(tables) > MAX_RULES:
            raise ValueError(f"auth.rules: more than {MAX_RULES} rules")
        return cls([_parse_rule(i, table) for i, table in enumerate(tables)])

    @classmethod
    def open_default(cls) -> Rules:
        """The rules used when `[auth]` has none: every authenticated identity may do
        everything on every channel, except table channels (`pg:>`), which need a rule."""
        return cls.from_config(
            [
                {"channel": f"{TABLE_CHANNEL_PREFIX}:>", "subscribe": "nobody"},
                {
                    "channel": ">",
                    **{action.value: "authenticated" for action in _ACTIONS},
                },
            ]
        )

    @property
    def allows_anonymous(self) -> bool:
        """Whether some rule grants something to anyone or to anonymous connections."""
        return any(
            who.kind in ("anyone", "anonymous")
            for rule in self._rules
            for whos in rule.who.values()
            for who in whos
        )

    def __len__(self) -> int:
        return len(self._rules)

    def decide(self, identity: Identity, action: Action, channel: str) -> Grant:
        """Whether `identity` may do `action` on `channel` (a name, or for SUBSCRIBE a
        pattern), with the row filter and columns that come with it."""
        try:
            check_channel(channel, pattern=True)
        except ChannelNameError as e:
            return Grant(False, f"invalid channel: {e.reason}")
        segments = channel.split(":")
        if any(s in ("*", ">") for s in segments):
            return self._decide_pattern(identity, action, channel, segments)
        for rule in self._rules:
            if not rule.matches_name(identity, segments):
                continue
            if not rule.grants(identity, action):
                return Grant(False, f"not allowed to {action.value} on {channel!r}")
            return rule.grant(identity)
        return Grant(False, f"no rule allows {action.value} on {channel!r}")

    def _decide_pattern(
        self, identity: Identity, action: Action, channel: str, segments: list[str]
    ) -> Grant:
        if action is not Action.SUBSCRIBE:
            return Grant(False, f"{action.value} needs a channel name, not a pattern")
        for rule in self._rules:
            if not overlaps(rule.wild, segments):
                continue  # nor does it when filled
            pattern = rule.pattern_for(identity)
            if pattern is None or not overlaps(pattern, segments):
                continue
            if rule.restricted:
                return Grant(
                    False, f"{channel!r} includes table channels: join table channels by name"
                )
            if not rule.grants(identity, action):
                return Grant(False, f"not allowed to {action.value} on {channel!r}")
            if covers(pattern, segments):
                return Grant(True)
        return Grant(False, f"no rule allows {action.value} on {channel!r}")

    def row_grant(self, identity: Identity, schema: str, table: str) -> Grant:
        """Whether `identity` may receive row changes of `schema.table` (`*` for any): the
        SUBSCRIBE decision on its table channel, `pg:<schema>:<table>`."""
        return self.decide(identity, Action.SUBSCRIBE, table_channel(schema, table))

    @staticmethod
    def and_filter(forced: str | None, client: str | None) -> str | None:
        """The forced filter AND the client's, the forced one first (on a tie the matcher
        indexes the first `eq`; docs/matcher.md, "How it is indexed")."""
        parts = [f for f in (forced, client) if f]
        return ",".join(parts) or None
