"""The reference matcher against the examples and tables of docs/matcher.md."""

from __future__ import annotations

import math

import pytest

from pyrt._errors import ChannelNameError, FilterError
from pyrt.reference.matcher import ReferenceMatcher, RowEvent, check_channel, parse_filter

# --------------------------------------------------------------------------------------------
# The filter grammar
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("a=eq.1", [("a", "eq", False, "1")]),
        (
            "status=eq.shipped,total=gt.100",
            [("status", "eq", False, "shipped"), ("total", "gt", False, "100")],
        ),
        ("a=not.eq.x", [("a", "eq", True, "x")]),
        ("A_$9=neq.1", [("A_$9", "neq", False, "1")]),
        ("$=lt.1", [("$", "lt", False, "1")]),
        ("a=lte.1,b=gte.2", [("a", "lte", False, "1"), ("b", "gte", False, "2")]),
        ("a=like.a%_*", [("a", "like", False, "a%_*")]),
        ("a=ilike.A\\%", [("a", "ilike", False, "A\\%")]),
        ("a=not.like.\\\\", [("a", "like", True, "\\\\")]),
        # Values are not trimmed, may be empty, and may hold any character but , and ".
        ("a=eq. 5 ", [("a", "eq", False, " 5 ")]),
        ("a=eq.", [("a", "eq", False, "")]),
        ("a=eq.,b=eq.", [("a", "eq", False, ""), ("b", "eq", False, "")]),
        ("a=eq.x=y.z()\\", [("a", "eq", False, "x=y.z()\\")]),
        ("a=eq.é Σ", [("a", "eq", False, "é Σ")]),
        # Quoted values hold , and " and unescape \x to x.
        ('a=eq."a,b"', [("a", "eq", False, "a,b")]),
        ('a=eq."x\\"y"', [("a", "eq", False, 'x"y')]),
        ('a=eq."\\\\"', [("a", "eq", False, "\\")]),
        ('a=eq."\\a"', [("a", "eq", False, "a")]),
        ('a=eq.""', [("a", "eq", False, "")]),
        ('a=eq."x",b=eq.y', [("a", "eq", False, "x"), ("b", "eq", False, "y")]),
        # Quoted columns.
        ('"a b"=eq.1', [("a b", "eq", False, "1")]),
        ('"x,\\"y"=eq.1', [('x,"y', "eq", False, "1")]),
        ('"a"=eq.1', [("a", "eq", False, "1")]),
        # in lists.
        ("a=in.(1,2)", [("a", "in", False, ("1", "2"))]),
        ("a=in.(1, 2)", [("a", "in", False, ("1", "2"))]),
        ("a=in.(  1  ,  2  )", [("a", "in", False, ("1", "2"))]),
        ("a=in.(a b)", [("a", "in", False, ("a b",))]),
        ("a=in.()", [("a", "in", False, ())]),
        ("a=in.( )", [("a", "in", False, ("",))]),
        ("a=in.(a,)", [("a", "in", False, ("a", ""))]),
        ("a=in.(,)", [("a", "in", False, ("", ""))]),
        ('a=in.("a,b" , "c)" ,d)', [("a", "in", False, ("a,b", "c)", "d"))]),
        ('a=in.(" x ")', [("a", "in", False, (" x ",))]),
        ('a=in.("")', [("a", "in", False, ("",))]),
        ('a=in.("\\"(")', [("a", "in", False, ('"(',))]),
        ("a=in.(\t1)", [("a", "in", False, ("\t1",))]),  # only U+0020 is skipped
        ("a=not.in.(1),b=eq.2", [("a", "in", True, ("1",)), ("b", "eq", False, "2")]),
        # is values are canonical lowercase words; unknown is null.
        ("a=is.null", [("a", "is", False, "null")]),
        ("a=is.NULL", [("a", "is", False, "null")]),
        ("a=is.unknown", [("a", "is", False, "null")]),
        ("a=is.UnKnOwN", [("a", "is", False, "null")]),
        ("a=is.True", [("a", "is", False, "true")]),
        ("a=not.is.FALSE", [("a", "is", True, "false")]),
    ],
)
def test_parse_filter(text: str, expected: list[tuple[object, ...]]) -> None:
    assert parse_filter(text) == expected


@pytest.mark.parametrize(
    ("text", "reason", "position"),
    [
        ("=eq.1", "expected column name", 0),
        (" a=eq.1", "expected column name", 0),
        ("é=eq.1", "expected column name", 0),
        ("a=eq.1,-b=eq.2", "expected column name", 7),
        ('"ab=eq.1', "unterminated quoted column", 0),
        ('"a\\"=eq.1', "unterminated quoted column", 0),
        ('a=eq.1,"b', "unterminated quoted column", 7),
        ('""=eq.1', "empty quoted column", 0),
        ('a=eq.1,""=eq.2', "empty quoted column", 7),
        ("a", "expected '=' after column", 1),
        ("a b=eq.1", "expected '=' after column", 1),
        ("a.eq.1", "expected '=' after column", 1),
        ('"a"x=eq.1', "expected '=' after column", 3),
        ("ab=eq.1,cé", "expected '=' after column", 9),  # columns are ASCII
        ("a=foo.1", "unknown operator 'foo'", 2),
        ("a=EQ.1", "unknown operator 'EQ'", 2),
        ("a=Eq.1", "unknown operator 'Eq'", 2),
        ("a=NOT.eq.1", "unknown operator 'NOT'", 2),
        ("a=not.match.x", "unknown operator 'match'", 6),
        ("a=imatch.x", "unknown operator 'imatch'", 2),
        ("a=fts.x", "unknown operator 'fts'", 2),
        ("a=isdistinct.x", "unknown operator 'isdistinct'", 2),
        ("a=not.not.eq.1", "unknown operator 'not'", 6),
        ("a=not", "unknown operator 'not'", 2),
        ("a=", "unknown operator ''", 2),
        ("a=.1", "unknown operator ''", 2),
        ("a=not.", "unknown operator ''", 6),
        ("a=eq", "expected '.' after operator", 4),
        ("a=eq,b=eq.1", "expected '.' after operator", 4),
        ("a=eq5", "unknown operator 'eq5'", 2),
        ("a=eq 1", "unknown operator 'eq 1'", 2),
        ("a==eq.1", "unknown operator '=eq'", 2),
        ("a=5", "unknown operator '5'", 2),
        ('a=e"q.1', "unknown operator 'e\"q'", 2),
        ("a=not.in", "expected '.' after operator", 8),
        ('a=eq.x"y', "unexpected '\"' in unquoted value", 6),
        ('a=eq.1,b=lt.2"', "unexpected '\"' in unquoted value", 13),
        ('a=eq. "x"', "unexpected '\"' in unquoted value", 6),
        ('a=eq."x"y', "expected ',' after quoted value", 8),
        ('a=eq."x" ', "expected ',' after quoted value", 8),
        ('a=eq."x""y"', "expected ',' after quoted value", 8),
        ('a=eq."x', "unterminated quoted value", 5),
        ('a=eq."x\\"', "unterminated quoted value", 5),
        ('a=eq."x\\', "unterminated quoted value", 5),
        ('a=in.("a', "unterminated quoted value", 6),
        ("a=in.1", "expected '(' after in.", 5),
        ("a=in.", "expected '(' after in.", 5),
        ("a=in. (1)", "expected '(' after in.", 5),
        ("a=in.(a(b)", "unexpected '(' in list", 7),
        ('a=in.(a"b")', "unexpected '\"' in list", 7),
        ('a=in.(a "b")', "unexpected '\"' in list", 8),
        ('a=in.("a" x)', "expected ',' or ')' in list", 10),
        ('a=in.("a""b")', "expected ',' or ')' in list", 9),
        ('a=in.("a",b,"c"d)', "expected ',' or ')' in list", 15),
        ("a=in.(", "unterminated list", 5),
        ("a=in.(a", "unterminated list", 5),
        ("a=in.(a,", "unterminated list", 5),
        ("a=in.( ", "unterminated list", 5),
        ('a=in.("a" ', "unterminated list", 5),
        ("b=eq.1,a=in.(1,2", "unterminated list", 12),
        ("a=in.(a)x", "expected ',' after list", 8),
        ("a=in.() ", "expected ',' after list", 7),
        ("a=in.(1)(2)", "expected ',' after list", 8),
        ("a=is.foo", "invalid is value 'foo', expected null, true, false or unknown", 5),
        ("a=is.", "invalid is value '', expected null, true, false or unknown", 5),
        ('a=is."null"', "invalid is value '\"null\"', expected null, true, false or unknown", 5),
        ("a=is.null ", "invalid is value 'null ', expected null, true, false or unknown", 5),
        ("a=is.t", "invalid is value 't', expected null, true, false or unknown", 5),
        ("a=not.is.nul,b", "invalid is value 'nul', expected null, true, false or unknown", 9),
        # The Kelvin sign lowercases to "k", but keywords are ASCII words.
        (
            "a=is.un\u212anown",
            "invalid is value 'un\u212anown', expected null, true, false or unknown",
            5,
        ),
        ("a=like.ab\\", "pattern ends with an escape", 7),
        ("a=ilike.\\", "pattern ends with an escape", 8),
        ("a=like.a\\\\\\", "pattern ends with an escape", 7),
        ('a=ilike."ab\\\\"', "pattern ends with an escape", 8),
        ('a=not.like."\\\\",b=eq.1', "pattern ends with an escape", 11),
        ("a=eq.1,", "empty condition", 7),
        (",", "empty condition", 0),
        (",a=eq.1", "empty condition", 0),
        ("a=eq.1,,b=eq.2", "empty condition", 7),
        # The first problem left to right wins.
        ('a=eq."x"y,=', "expected ',' after quoted value", 8),
        ('a=like.x\\"', "unexpected '\"' in unquoted value", 9),
        ('a=like."x\\\\"y', "expected ',' after quoted value", 12),
        ("a=foo.1,", "unknown operator 'foo'", 2),
    ],
)
def test_parse_filter_errors(text: str, reason: str, position: int) -> None:
    with pytest.raises(FilterError) as info:
        parse_filter(text)
    assert (info.value.reason, info.value.position) == (reason, position)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("text", ["a=like.a\\\\", "a=like.\\%", "a=eq.a\\", 'a=eq."\\\\"'])
def test_only_like_patterns_check_escapes(text: str) -> None:
    assert len(parse_filter(text)) == 1


# --------------------------------------------------------------------------------------------
# Channel names and patterns
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["chat", "room:42", "org:acme:doc:7f3a", "é", "😀:\u200b", "a" * 255, "é" * 127 + "a", "-_.!"],
)
@pytest.mark.parametrize("pattern", [False, True])
def test_valid_channel_names(name: str, pattern: bool) -> None:
    check_channel(name, pattern)  # raises if not valid
    matcher = ReferenceMatcher()
    matcher.add_channel(1, name)
    assert matcher.match_channel(name) == [1]  # a concrete pattern matches only itself


@pytest.mark.parametrize("name", ["room:*", "room:>", "*:chat", ">", "*", "*:*:>", "a:*:b"])
def test_valid_channel_patterns(name: str) -> None:
    check_channel(name, pattern=True)  # raises if not valid
    matcher = ReferenceMatcher()
    matcher.add_channel(1, name)
    assert 1 in matcher


@pytest.mark.parametrize(
    ("name", "pattern", "reason", "position"),
    [
        ("", False, "empty channel name", 0),
        ("", True, "empty channel name", 0),
        ("a" * 256, False, "channel name longer than 255 bytes", 0),
        ("é" * 128, True, "channel name longer than 255 bytes", 0),
        ("😀" * 64, False, "channel name longer than 255 bytes", 0),
        (" " * 300, False, "channel name longer than 255 bytes", 0),  # length comes first
        (":" * 256, True, "channel name longer than 255 bytes", 0),
        (":", False, "empty segment", 0),
        (":a", False, "empty segment", 0),
        ("a:", True, "empty segment", 2),
        ("a::b", False, "empty segment", 2),
        ("ab:cd::", False, "empty segment", 6),
        ("a b", False, "invalid character U+0020", 1),
        ("a\tb", False, "invalid character U+0009", 1),
        ("\x00", False, "invalid character U+0000", 0),
        ("a:\x1f", False, "invalid character U+001F", 2),
        ("a\x7f", True, "invalid character U+007F", 1),
        ("a\x85", False, "invalid character U+0085", 1),
        ("a\xa0", False, "invalid character U+00A0", 1),
        ("é\u3000", False, "invalid character U+3000", 1),
        ("\u2028", True, "invalid character U+2028", 0),
        ("x\u2009", False, "invalid character U+2009", 1),
        ("a\n", False, "invalid character U+000A", 1),
        ("😀 ", False, "invalid character U+0020", 1),  # offsets count characters
        ("room*", True, "wildcard must be a whole segment", 4),
        ("a:b>", True, "wildcard must be a whole segment", 3),
        ("a*b", True, "wildcard must be a whole segment", 1),
        ("**", True, "wildcard must be a whole segment", 0),
        (">>", True, "wildcard must be a whole segment", 0),
        ("a>b:c", True, "wildcard must be a whole segment", 1),  # not the last-segment rule
        (">:a", True, "'>' is only allowed as the last segment", 0),
        ("a:>:b", True, "'>' is only allowed as the last segment", 2),
        (">:", True, "'>' is only allowed as the last segment", 0),
        ("room:*", False, "wildcards are only allowed in patterns", 5),
        ("room*", False, "wildcards are only allowed in patterns", 4),
        (">", False, "wildcards are only allowed in patterns", 0),
        ("a:b>c", False, "wildcards are only allowed in patterns", 3),
        # The first problem left to right wins.
        ("a::b c", False, "empty segment", 2),
        ("a b::c", False, "invalid character U+0020", 1),
        ("a*:b c", True, "wildcard must be a whole segment", 1),
        ("a\t*", True, "invalid character U+0009", 1),
        ("a:*:: ", False, "wildcards are only allowed in patterns", 2),
        (">::", True, "'>' is only allowed as the last segment", 0),
        ("*:a b:>:", True, "invalid character U+0020", 3),
    ],
)
def test_channel_errors(name: str, pattern: bool, reason: str, position: int) -> None:
    with pytest.raises(ChannelNameError) as info:
        check_channel(name, pattern)
    assert (info.value.reason, info.value.position) == (reason, position)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("pattern", "channel", "expected"),
    [
        ("room:42", "room:42", True),
        ("room:42", "room:4", False),
        ("room:42", "room:42:x", False),
        ("room:42", "room", False),
        ("room:*", "room:1", True),
        ("room:*", "room", False),
        ("room:*", "room:1:chat", False),
        ("room:>", "room:1", True),
        ("room:>", "room:1:chat", True),
        ("room:>", "room", False),
        ("room:>", "roomx:1", False),
        ("*:chat", "room:chat", True),
        ("*:chat", "chat", False),
        ("*:chat", "room:chat:x", False),
        (">", "a", True),
        (">", "a:b:c", True),
        ("*", "a", True),
        ("*", "a:b", False),
        ("*:*:>", "a:b", False),
        ("*:*:>", "a:b:c", True),
        ("a:*:c", "a:b:c", True),
        ("a:*:c", "a:b:d", False),
        ("Room", "room", False),  # names are case-sensitive
    ],
)
def test_channel_pattern_matching(pattern: str, channel: str, expected: bool) -> None:
    matcher = ReferenceMatcher()
    matcher.add_channel(7, pattern)
    assert matcher.match_channel(channel) == ([7] if expected else [])


def test_doc_channel_example() -> None:
    matcher = ReferenceMatcher()
    matcher.add_channel(1, "room:42")
    matcher.add_channel(2, "room:*")
    matcher.add_channel(3, "room:>")
    assert sorted(matcher.match_channel("room:42")) == [1, 2, 3]
    assert sorted(matcher.match_channel("room:42:chat")) == [3]
    assert matcher.match_channel("lobby") == []
    assert [sorted(r) for r in matcher.match_channels(["room:1", "room:42", "x"])] == [
        [2, 3],
        [1, 2, 3],
        [],
    ]


@pytest.mark.parametrize(
    ("channel", "reason", "position"),
    [
        ("room:*", "wildcards are only allowed in patterns", 5),
        ("", "empty channel name", 0),
        ("room:", "empty segment", 5),
        ("a b", "invalid character U+0020", 1),
    ],
)
def test_match_channel_needs_a_concrete_name(channel: str, reason: str, position: int) -> None:
    matcher = ReferenceMatcher()
    matcher.add_channel(1, ">")
    with pytest.raises(ChannelNameError) as info:
        matcher.match_channel(channel)
    assert (info.value.reason, info.value.position) == (reason, position)
    with pytest.raises(ChannelNameError):
        matcher.match_channels(["room:1", channel])


@pytest.mark.parametrize(
    ("pattern", "reason", "position"),
    [("room*", "wildcard must be a whole segment", 4), ("", "empty channel name", 0)],
)
def test_add_channel_rejects_bad_patterns(pattern: str, reason: str, position: int) -> None:
    matcher = ReferenceMatcher()
    with pytest.raises(ChannelNameError) as info:
        matcher.add_channel(1, pattern)
    assert (info.value.reason, info.value.position) == (reason, position)
    assert len(matcher) == 0
    assert 1 not in matcher


# --------------------------------------------------------------------------------------------
# Subscription ids
# --------------------------------------------------------------------------------------------


def test_add_remove_len_contains() -> None:
    matcher = ReferenceMatcher()
    assert len(matcher) == 0
    matcher.add_channel(0, "a")
    matcher.add_rows(2**64 - 1, "*", "*", "*")
    assert len(matcher) == 2
    assert 0 in matcher
    assert 2**64 - 1 in matcher
    assert 1 not in matcher
    assert matcher.remove(0) is True
    assert matcher.remove(0) is False
    assert matcher.remove(5) is False
    assert 0 not in matcher
    assert len(matcher) == 1
    assert matcher.match_channel("a") == []
    matcher.add_channel(0, "b")  # a removed id can be used again
    assert matcher.match_channel("b") == [0]


@pytest.mark.parametrize(
    ("first", "second"),
    [("channel", "channel"), ("channel", "rows"), ("rows", "channel"), ("rows", "rows")],
)
def test_duplicate_ids_are_rejected(first: str, second: str) -> None:
    matcher = ReferenceMatcher()

    def add(kind: str, channel: str) -> None:
        if kind == "channel":
            matcher.add_channel(3, channel)
        else:
            matcher.add_rows(3, "INSERT", "public", channel)

    add(first, "one")
    with pytest.raises(ValueError, match="already") as info:
        add(second, "two")
    assert type(info.value) is ValueError
    assert len(matcher) == 1
    assert matcher.match_channel("two") == []
    assert matcher.match_row(RowEvent("INSERT", "public", "two")) == []


def test_duplicate_id_is_reported_before_a_bad_filter() -> None:
    matcher = ReferenceMatcher()
    matcher.add_channel(1, "a")
    with pytest.raises(ValueError, match="already") as info:
        matcher.add_rows(1, "bogus", "", "", "=")
    assert type(info.value) is ValueError


@pytest.mark.parametrize(
    ("sub_id", "error"),
    [
        (-1, OverflowError),
        (2**64, OverflowError),
        (-(2**70), OverflowError),
        ("1", TypeError),
        (1.0, TypeError),
        (None, TypeError),
    ],
)
def test_bad_ids(sub_id: object, error: type[Exception]) -> None:
    matcher = ReferenceMatcher()
    with pytest.raises(error):
        matcher.add_channel(sub_id, "a")  # type: ignore[arg-type]
    with pytest.raises(error):
        matcher.add_rows(sub_id, "*", "*", "*")  # type: ignore[arg-type]
    with pytest.raises(error):
        matcher.remove(sub_id)  # type: ignore[arg-type]
    assert len(matcher) == 0
    assert sub_id not in matcher


# --------------------------------------------------------------------------------------------
# Row subscriptions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("bogus", "s", "t", None), "unknown event 'bogus'"),
        (("", "s", "t", None), "unknown event ''"),
        (("INSERTS", "s", "t", None), "unknown event 'INSERTS'"),
        (("\u0131nsert", "s", "t", None), "unknown event '\u0131nsert'"),  # dotless i: not ASCII
        (("**", "s", "t", None), "unknown event '**'"),
        (("bogus", "", "", "="), "unknown event 'bogus'"),
        (("*", "", "t", None), "empty schema"),
        (("*", "", "", "="), "empty schema"),
        (("*", "s", "", None), "empty table"),
        (("*", "s", "", "="), "empty table"),
    ],
)
def test_add_rows_errors(args: tuple[str, str, str, str | None], reason: str) -> None:
    matcher = ReferenceMatcher()
    with pytest.raises(FilterError) as info:
        matcher.add_rows(1, *args)
    assert (info.value.reason, info.value.position) == (reason, 0)
    assert len(matcher) == 0
    assert 1 not in matcher


def test_add_rows_bad_filter_stores_nothing() -> None:
    matcher = ReferenceMatcher()
    with pytest.raises(FilterError) as info:
        matcher.add_rows(1, "*", "s", "t", "a=eq.1,")
    assert (info.value.reason, info.value.position) == ("empty condition", 7)
    assert len(matcher) == 0
    assert 1 not in matcher
    matcher.add_rows(1, "*", "s", "t", "")
    assert matcher.match_row(RowEvent("INSERT", "s", "t")) == [1]


def test_doc_row_example() -> None:
    matcher = ReferenceMatcher()
    matcher.add_rows(4, "UPDATE", "public", "orders", "status=eq.shipped,total=gt.100")
    matcher.add_rows(5, "*", "public", "*")
    event = RowEvent(
        "UPDATE",
        "public",
        "orders",
        record={"id": 7, "status": "shipped", "total": 250.0},
        old_record={"id": 7, "status": "paid", "total": 250.0},
    )
    assert sorted(matcher.match_row(event)) == [4, 5]
    assert [sorted(r) for r in matcher.match_rows([event, event])] == [[4, 5], [4, 5]]
    cheap = RowEvent("UPDATE", "public", "orders", record={"status": "shipped", "total": 100})
    assert matcher.match_row(cheap) == [5]
    assert matcher.remove(4) is True
    assert matcher.match_row(event) == [5]


@pytest.mark.parametrize(
    ("sub", "event", "expected"),
    [
        (("INSERT", "s", "t"), ("INSERT", "s", "t"), True),
        (("insert", "s", "t"), ("Insert", "s", "t"), True),
        (("INSERT", "s", "t"), ("UPDATE", "s", "t"), False),
        (("UPDATE", "s", "t"), ("update", "s", "t"), True),
        (("DELETE", "s", "t"), ("DELETE", "s", "t"), True),
        (("*", "s", "t"), ("DELETE", "s", "t"), True),
        (("*", "s", "t"), ("INSERT", "s", "u"), False),
        (("*", "s", "t"), ("INSERT", "r", "t"), False),
        (("*", "s", "t"), ("INSERT", "S", "t"), False),  # names are case-sensitive
        (("*", "*", "t"), ("INSERT", "r", "t"), True),
        (("*", "s", "*"), ("INSERT", "s", "u"), True),
        (("*", "*", "*"), ("UPDATE", "x", "y"), True),
        (("*", "*", "*"), ("UPDATE", "*", "*"), True),
        (("*", "s", "t"), ("UPDATE", "*", "*"), False),  # "*" is only a wildcard in a subscription
    ],
)
def test_event_schema_table(
    sub: tuple[str, str, str], event: tuple[str, str, str], expected: bool
) -> None:
    matcher = ReferenceMatcher()
    matcher.add_rows(9, *sub)
    assert matcher.match_row(RowEvent(*event)) == ([9] if expected else [])


def test_delete_matches_old_record_and_others_the_new_one() -> None:
    matcher = ReferenceMatcher()
    matcher.add_rows(1, "*", "s", "t", "v=eq.old")
    matcher.add_rows(2, "*", "s", "t", "v=eq.new")
    rows = {"record": {"v": "new"}, "old_record": {"v": "old"}}
    assert matcher.match_row(RowEvent("INSERT", "s", "t", **rows)) == [2]
    assert matcher.match_row(RowEvent("UPDATE", "s", "t", **rows)) == [2]
    assert matcher.match_row(RowEvent("DELETE", "s", "t", **rows)) == [1]


def test_absent_record_has_no_columns() -> None:
    matcher = ReferenceMatcher()
    matcher.add_rows(1, "*", "s", "t", "v=is.null")
    matcher.add_rows(2, "*", "s", "t", "v=not.is.null")
    matcher.add_rows(3, "*", "s", "t")
    assert matcher.match_row(RowEvent("INSERT", "s", "t", old_record={"v": None})) == [3]
    assert matcher.match_row(RowEvent("DELETE", "s", "t", record={"v": None})) == [3]
    assert sorted(matcher.match_row(RowEvent("DELETE", "s", "t", old_record={"v": None}))) == [
        1,
        3,
    ]


# --------------------------------------------------------------------------------------------
# Comparison semantics
# --------------------------------------------------------------------------------------------

_MISSING = object()


def truth(condition: str, value: object = _MISSING) -> bool | None:
    """The three-valued truth of ``c=<condition>`` on a row whose column c holds *value*.

    Read through the public API: the condition alone and its ``not.`` form both match an
    unknown nowhere, a true condition only alone, a false one only negated.
    """
    matcher = ReferenceMatcher()
    matcher.add_rows(1, "*", "s", "t", f"c={condition}")
    matcher.add_rows(2, "*", "s", "t", f"c=not.{condition}")
    record = {} if value is _MISSING else {"c": value}
    matched = sorted(matcher.match_row(RowEvent("INSERT", "s", "t", record=record)))
    assert matched != [1, 2], "a condition and its negation cannot both hold"
    return {(): None, (1,): True, (2,): False}[tuple(matched)]


@pytest.mark.parametrize(
    ("condition", "value", "expected"),
    [
        # text: the literal is the text itself, ordered by code point
        ("eq.abc", "abc", True),
        ("eq.abc", "abd", False),
        ("eq.abc", "ABC", False),
        ("neq.abc", "abd", True),
        ("neq.abc", "abc", False),
        ("lt.b", "a", True),
        ("lt.a", "B", True),
        ("gt.z", "é", True),
        ("gt.\uffff", "😀", True),
        ("lte.abc", "abc", True),
        ("gte.abd", "abc", False),
        ("gt.ab", "abc", True),
        ("eq. 5", " 5", True),
        ("eq.5", " 5", False),
        ("eq.", "", True),
        ("eq.5", "5", True),
        ("eq.5.0", "5", False),
        ("eq.true", "t", False),
        ('eq."a,b"', "a,b", True),
        ('eq."x\\"y"', 'x"y', True),
        # int: an integer literal compares exactly, another number as floats
        ("eq.5", 5, True),
        ("eq.+5", 5, True),
        ("eq.005", 5, True),
        ("eq.-0", 0, True),
        ("neq.5", 5, False),
        ("lt.6", 5, True),
        ("gt.-6", -5, True),
        ("gte.5", 5, True),
        ("lte.4", 5, False),
        ("eq.5.0", 5, True),
        ("eq.5.", 5, True),
        ("eq.5e0", 5, True),
        ("eq.1e3", 1000, True),
        ("eq.5.5", 5, False),
        ("lt.5.5", 5, True),
        ("gt.4.5", 5, True),
        ("eq.9223372036854775807", 2**63 - 1, True),
        ("eq.9223372036854775806", 2**63 - 1, False),  # exact, though equal as floats
        ("lt.9223372036854775807", 2**63 - 2, True),
        ("eq.-9223372036854775808", -(2**63), True),
        ("eq.9223372036854775808", 2**63 - 1, True),  # not an i64: compared as floats
        ("eq.9007199254740993", 2**53 + 1, True),
        ("eq.9007199254740992", 2**53 + 1, False),
        ("eq.9007199254740992.0", 2**53 + 1, True),  # float(2**53 + 1) == 2**53
        ("lt.nan", 5, True),
        ("eq.nan", 5, False),
        ("gt.NaN", 5, False),
        ("lt.inf", 5, True),
        ("gt.-Infinity", 5, True),
        ("eq.1e999", 5, False),
        ("lt.1e999", 5, True),
        ("eq.abc", 5, None),
        ("eq.", 5, None),
        ("eq. 5", 5, None),
        ("eq.5 ", 5, None),
        ("eq.1_0", 10, None),
        ("eq.\u0661", 1, None),  # ARABIC-INDIC DIGIT ONE
        ("eq.\uff11", 1, None),  # FULLWIDTH DIGIT ONE
        ("eq.0x10", 16, None),
        ("eq.true", 1, None),
        ("eq.+-5", -5, None),
        ("eq.+nan", 5, None),
        # float: numbers; NaN equals NaN and sorts above everything; -0 = 0
        ("eq.1", 1.0, True),
        ("eq.1.5", 1.5, True),
        ("eq..5", 0.5, True),
        ("eq.-.5", -0.5, True),
        ("eq.5.", 5.0, True),
        ("eq.1E2", 100.0, True),
        ("eq.1e+2", 100.0, True),
        ("eq.1.5e-1", 0.15, True),
        ("eq.0.1", 0.1, True),
        ("eq.1e999", math.inf, True),
        ("eq.-1e999", -math.inf, True),
        ("eq.1e-999", 0.0, True),
        ("eq.inf", math.inf, True),
        ("eq.+INF", math.inf, True),
        ("eq.infinity", math.inf, True),
        ("eq.-Infinity", -math.inf, True),
        ("eq.nan", math.nan, True),
        ("eq.NAN", math.nan, True),
        ("neq.nan", math.nan, False),
        ("gte.nan", math.nan, True),
        ("gt.inf", math.nan, True),
        ("lt.nan", math.inf, True),
        ("gt.nan", math.inf, False),
        ("eq.inf", math.nan, False),
        ("eq.0", -0.0, True),
        ("eq.-0", 0.0, True),
        ("lt.0", -0.0, False),
        ("gt.-0.0", 0.0, False),
        ("lt.2", 1.5, True),
        ("lte.1.5", 1.5, True),
        ("lte.-0", 0.0, True),
        ("lte.-1", 0.0, False),
        ("gte.1.5", 1.5, True),
        ("gte.inf", 1e308, False),
        ("gt.9223372036854775807", 1e19, True),
        ("eq..", 1.0, None),
        ("eq.e5", 1.0, None),
        ("eq.1e", 1.0, None),
        ("eq.1e5.0", 1.0, None),
        ("eq.1.2.3", 1.0, None),
        ("eq.-nan", math.nan, None),
        ("eq.infin", math.inf, None),
        ("eq.true", 1.0, None),
        ("eq.", 1.0, None),
        ("eq.1.0 ", 1.0, None),
        ("eq.1\u0660", 10.0, None),
        # bool: true/t/false/f in any case; false < true
        ("eq.true", True, True),
        ("eq.t", True, True),
        ("eq.TRUE", True, True),
        ("eq.T", True, True),
        ("eq.F", False, True),
        ("eq.false", False, True),
        ("eq.false", True, False),
        ("neq.true", False, True),
        ("lt.true", False, True),
        ("gt.false", True, True),
        ("gt.true", True, False),
        ("lte.false", False, True),
        ("lte.false", True, False),
        ("gte.true", False, False),
        ("gte.f", True, True),
        ("eq.yes", True, None),
        ("eq.1", True, None),
        ("eq.tru", True, None),
        ("eq. true", True, None),
        # None and missing columns: unknown for comparisons
        ("eq.x", None, None),
        ("neq.x", None, None),
        ("lt.1", None, None),
        ("eq.", None, None),
        ("eq.x", _MISSING, None),
        ("eq.null", None, None),
    ],
)
def test_comparisons(condition: str, value: object, expected: bool | None) -> None:
    assert truth(condition, value) is expected


@pytest.mark.parametrize(
    ("condition", "value", "expected"),
    [
        ("is.null", None, True),
        ("is.unknown", None, True),
        ("is.NULL", None, True),
        ("is.null", "", False),
        ("is.null", 0, False),
        ("is.null", math.nan, False),
        ("is.null", "null", False),
        ("is.true", True, True),
        ("is.true", False, False),
        ("is.true", 1, False),
        ("is.true", "true", False),
        ("is.true", None, False),  # never unknown for a present column
        ("is.false", False, True),
        ("is.false", 0, False),
        ("is.false", 0.0, False),
        ("is.false", None, False),
        ("is.null", _MISSING, None),  # ...but a missing column is unknown
        ("is.true", _MISSING, None),
    ],
)
def test_is(condition: str, value: object, expected: bool | None) -> None:
    assert truth(condition, value) is expected


@pytest.mark.parametrize(
    ("condition", "value", "expected"),
    [
        ("like.a%c", "abbbc", True),
        ("like.a%c", "ac", True),
        ("like.a*c", "abc", True),
        ("like.a%c", "abcd", False),
        ("like.a_c", "abc", True),
        ("like.a_c", "ac", False),
        ("like.a_c", "aébc", False),
        ("like._", "é", True),
        ("like._", "😀", True),
        ("like.%", "", True),
        ("like.*", "anything", True),
        ("like.", "", True),
        ("like.", "a", False),
        ("like.%b%b%", "abab", True),
        ("like.%b%b%", "ab", False),
        ("like.100\\%", "100%", True),
        ("like.100\\%", "1000", False),
        ("like.a\\*", "a*", True),
        ("like.a\\*", "ab", False),
        ("like.a\\_", "a_", True),
        ("like.a\\_", "ab", False),
        ("like.a\\bc", "abc", True),
        ("like.a\\\\", "a\\", True),
        ('like."a\\\\\\\\"', "a\\", True),  # quoted: "a\\\\" unescapes to the pattern a\\
        ('like."%,%"', "x,y", True),
        ("like.A%", "abc", False),
        ("like.abc", "ABC", False),
        ("like.5", 5, None),
        ("like.%", 5, None),
        ("like.%", 1.5, None),
        ("like.t%", True, None),
        ("like.%", None, None),
        ("like.%", _MISSING, None),
        ("ilike.A%", "abc", True),
        ("ilike.abc", "ABC", True),
        ("ilike.É", "é", True),
        ("ilike.é", "É", True),
        ("ilike.\u03c3%", "Σx", True),
        # Each character on its own: a final Σ lowercases to U+03C3, not ς as str.lower() says.
        ("ilike.%\u03c3", "ΑΣ", True),
        ("ilike.%ς", "ΑΣ", False),
        ("ilike.ς", "ς", True),
        ("ilike.\u03c3", "ς", False),
        # İ lowercases to two characters, i and U+0307; both sides are lowercased first.
        ("ilike.i\u0307", "İ", True),
        ("ilike.İ", "i\u0307", True),
        ("ilike.İ", "i", False),
        ("ilike._", "İ", False),
        ("ilike.__", "İ", True),
        ("ilike.\\İ", "İ", True),
        ("ilike.ß", "ß", True),
        ("ilike.ss", "ß", False),
        ("ilike.SS", "ß", False),
        ("ilike.k", "\u212a", True),  # KELVIN SIGN lowercases to k
        ("ilike.%", 5, None),
        ("ilike.a", None, None),
    ],
)
def test_like(condition: str, value: object, expected: bool | None) -> None:
    assert truth(condition, value) is expected


@pytest.mark.parametrize(
    ("condition", "value", "expected"),
    [
        ("in.(1,2)", 2, True),
        ("in.(1,2)", 3, False),
        ("in.(1, 2)", 2, True),
        ("in.(1.0,2)", 1, True),
        ("in.(1,2)", 2.0, True),
        ("in.(1,2)", "2", True),
        ("in.(1,2)", " 2", False),
        ("in.()", 1, False),
        ("in.()", "", False),
        ("in.( )", "", True),
        ("in.(a,)", "", True),
        ("in.(a,)", "a", True),
        ("in.(x,5)", 5, True),  # x is not an int: skipped
        ("in.(x)", 5, False),  # every item skipped: false, not unknown
        ("in.(x,y)", True, False),
        ('in.("a,b",c)', "a,b", True),
        ('in.("a,b",c)', "a", False),
        ('in.(" a ")', " a ", True),
        ("in.( a )", " a ", False),
        ("in.( a )", "a", True),
        ("in.(a b)", "a b", True),
        ('in.("(")', "(", True),
        ("in.(nan)", math.nan, True),
        ("in.(0)", -0.0, True),
        ("in.(true,f)", False, True),
        ("in.(yes)", True, False),
        ("in.(1)", None, None),
        ("in.()", None, None),
        ("in.(1)", _MISSING, None),
    ],
)
def test_in(condition: str, value: object, expected: bool | None) -> None:
    assert truth(condition, value) is expected


@pytest.mark.parametrize(
    "condition",
    ["eq.1", "neq.1", "lt.1", "lte.1", "gt.1", "gte.1", "like.%", "ilike.%", "in.(1)", "in.()"],
)
@pytest.mark.parametrize("value", [None, _MISSING])
def test_null_and_missing_are_unknown(condition: str, value: object) -> None:
    assert truth(condition, value) is None


def test_not_leaves_unknown_unknown() -> None:
    matcher = ReferenceMatcher()
    matcher.add_rows(1, "*", "s", "t", "status=not.eq.x")
    assert matcher.match_row(RowEvent("INSERT", "s", "t", record={"status": "y"})) == [1]
    assert matcher.match_row(RowEvent("INSERT", "s", "t", record={"status": "x"})) == []
    assert matcher.match_row(RowEvent("INSERT", "s", "t", record={"status": None})) == []
    assert matcher.match_row(RowEvent("INSERT", "s", "t", record={})) == []


def test_conditions_are_anded() -> None:
    matcher = ReferenceMatcher()
    matcher.add_rows(1, "*", "s", "t", "a=eq.1,b=eq.2")
    matcher.add_rows(2, "*", "s", "t", "a=eq.1,a=eq.2")
    assert matcher.match_row(RowEvent("INSERT", "s", "t", record={"a": 1, "b": 2})) == [1]
    assert matcher.match_row(RowEvent("INSERT", "s", "t", record={"a": 1, "b": 3})) == []
    assert matcher.match_row(RowEvent("INSERT", "s", "t", record={"a": 1})) == []


def test_quoted_column_names() -> None:
    matcher = ReferenceMatcher()
    matcher.add_rows(1, "*", "s", "t", '"odd, \\"col\\""=eq.1')
    assert matcher.match_row(RowEvent("INSERT", "s", "t", record={'odd, "col"': 1})) == [1]
    assert matcher.match_row(RowEvent("INSERT", "s", "t", record={"odd": 1})) == []


# --------------------------------------------------------------------------------------------
# Row events
# --------------------------------------------------------------------------------------------


def test_row_event_normalises() -> None:
    source = {"i": 1, "big": 2**63, "small": -(2**63), "f": 1.5, "s": "x", "b": True, "n": None}
    event = RowEvent("update", "s", "t", record=source)
    assert event.type == "UPDATE"
    assert event.record == {
        "i": 1,
        "big": float(2**63),
        "small": -(2**63),
        "f": 1.5,
        "s": "x",
        "b": True,
        "n": None,
    }
    assert event.record is not None
    assert type(event.record["big"]) is float
    assert type(event.record["small"]) is int
    assert type(event.record["b"]) is bool
    assert event.old_record is None
    source["i"] = 2  # the event keeps its own copy
    assert event.record["i"] == 1
    assert RowEvent("Delete", "s", "t").type == "DELETE"
    assert RowEvent("insert", "s", "t") == RowEvent("INSERT", "s", "t")
    assert hash(RowEvent("insert", "s", "t", record={"a": 1})) == hash(
        RowEvent("INSERT", "s", "t", record={"a": 1})
    )


def test_row_event_is_frozen() -> None:
    event = RowEvent("INSERT", "s", "t", record={"a": 1})
    with pytest.raises(AttributeError):
        event.type = "DELETE"  # type: ignore[misc]
    with pytest.raises(TypeError):
        event.record["a"] = 2  # type: ignore[index]


@pytest.mark.parametrize("event_type", ["", "*", "UPSERT", "\u0131nsert", "INSERT ", "truncate"])
def test_row_event_bad_type(event_type: str) -> None:
    with pytest.raises(ValueError, match="INSERT, UPDATE or DELETE"):
        RowEvent(event_type, "s", "t")


@pytest.mark.parametrize("value", [b"x", [1], (1,), {"a": 1}, object(), 1j])
def test_row_event_bad_value(value: object) -> None:
    with pytest.raises(TypeError):
        RowEvent("INSERT", "s", "t", record={"a": value})
    with pytest.raises(TypeError):
        RowEvent("INSERT", "s", "t", old_record={"a": value})


def test_row_event_bad_key() -> None:
    with pytest.raises(TypeError):
        RowEvent("INSERT", "s", "t", record={1: 1})  # type: ignore[dict-item]


def test_row_event_int_beyond_float_range() -> None:
    with pytest.raises(OverflowError):
        RowEvent("INSERT", "s", "t", record={"a": 10**400})


def test_big_int_values_match_as_floats() -> None:
    matcher = ReferenceMatcher()
    matcher.add_rows(1, "*", "s", "t", "a=eq.9223372036854775808")
    matcher.add_rows(2, "*", "s", "t", "a=eq.1e19")
    matcher.add_rows(3, "*", "s", "t", "a=like.%")
    assert matcher.match_row(RowEvent("INSERT", "s", "t", record={"a": 2**63})) == [1]
    assert matcher.match_row(RowEvent("INSERT", "s", "t", record={"a": 10**19})) == [2]
