"""Channel rules (pyrt.hub.rules), sans-IO: who forms, first-match order, templates, pattern
cover/overlap against brute force, claims-bound row filters against the real Rust matcher."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrt._core import Matcher, RowEvent
from pyrt.hub.identity import ANONYMOUS, Action, Identity
from pyrt.hub.rules import MAX_CLAIM_VALUE, Grant, Rules, covers, overlaps

SUB = Action.SUBSCRIBE
PUB = Action.PUBLISH


def user(sub: str = "u1", **claims: Any) -> Identity:
    return Identity(user=sub, claims={"sub": sub, **claims}, anonymous=False)


def rules(*tables: Mapping[str, Any]) -> Rules:
    return Rules.from_config(list(tables))


# --------------------------------------------------------------------------------------------
# Who
# --------------------------------------------------------------------------------------------


def test_every_who_form() -> None:
    alice = user("alice", role="staff", org={"id": "acme"}, groups=["ops", "dev", 7])
    bob = user("bob", role="customer", org={"id": 42}, groups="ops")
    cases: dict[str, list[Identity]] = {
        "anyone": [ANONYMOUS, alice, bob],
        "authenticated": [alice, bob],
        "anonymous": [ANONYMOUS],
        "nobody": [],
        "role:staff": [alice],
        "role:customer": [bob],
        "claim:org.id=acme": [alice],
        "claim:org.id=42": [bob],  # numbers compare as their JSON text
        "claim:groups=ops": [alice, bob],  # a list claim contains it; a string equals it
        "claim:groups=7": [alice],
        "claim:groups=op": [],
        "claim:sub=bob": [bob],
        "claim:missing.path=x": [],
    }
    for who, admitted in cases.items():
        r = rules({"channel": "room:>", "subscribe": who})
        for identity in (ANONYMOUS, alice, bob):
            grant = r.decide(identity, SUB, "room:1")
            assert grant.allowed == (identity in admitted), (who, identity.user)
            assert grant.reason == ("" if grant.allowed else "not allowed to subscribe on 'room:1'")


def test_a_list_of_who_is_any_of_them() -> None:
    r = rules({"channel": "room:>", "subscribe": ["anonymous", "role:staff"]})
    assert r.decide(ANONYMOUS, SUB, "room:1").allowed
    assert r.decide(user(role="staff"), SUB, "room:1").allowed
    assert not r.decide(user(role="customer"), SUB, "room:1").allowed
    assert not r.decide(user(), SUB, "room:1").allowed


def test_a_role_must_be_a_string_claim() -> None:
    r = rules({"channel": "room:>", "subscribe": "role:1"})
    assert not r.decide(user(role=1), SUB, "room:1").allowed
    assert r.decide(user(role="1"), SUB, "room:1").allowed


def test_defaults_per_action() -> None:
    r = rules({"channel": "room:>", "subscribe": "authenticated"})
    u = user()
    assert r.decide(u, SUB, "room:1").allowed
    assert r.decide(u, Action.PRESENCE, "room:1").allowed
    assert r.decide(u, Action.HISTORY, "room:1").allowed
    assert not r.decide(u, PUB, "room:1").allowed
    assert not r.decide(u, Action.MUTATE, "room:1").allowed
    r = rules({"channel": "room:>", "publish": "authenticated", "history": "anyone"})
    assert not r.decide(u, SUB, "room:1").allowed  # subscribe defaults to nobody
    assert not r.decide(u, Action.PRESENCE, "room:1").allowed
    assert r.decide(u, PUB, "room:1").allowed
    assert r.decide(ANONYMOUS, Action.HISTORY, "room:1").allowed


def test_allows_anonymous() -> None:
    assert not Rules.open_default().allows_anonymous
    assert not rules({"channel": ">", "subscribe": ["authenticated", "role:anon"]}).allows_anonymous
    assert rules({"channel": "a", "subscribe": "nobody", "history": "anyone"}).allows_anonymous
    assert rules({"channel": "a", "mutate": ["role:x", "anonymous"]}).allows_anonymous
    assert not rules().allows_anonymous


# --------------------------------------------------------------------------------------------
# Order and defaults
# --------------------------------------------------------------------------------------------


def test_the_first_matching_rule_decides() -> None:
    r = rules(
        {"channel": "chat:secret", "subscribe": "role:admin"},
        {"channel": "chat:>", "subscribe": "authenticated", "publish": "authenticated"},
        {"channel": ">", "subscribe": "anyone"},
    )
    u = user()
    assert not r.decide(u, SUB, "chat:secret").allowed  # not the later, wider rules
    assert r.decide(user(role="admin"), SUB, "chat:secret").allowed
    assert r.decide(u, SUB, "chat:lobby").allowed
    assert r.decide(u, PUB, "chat:lobby").allowed
    assert not r.decide(ANONYMOUS, SUB, "chat:lobby").allowed
    assert r.decide(ANONYMOUS, SUB, "news").allowed
    assert not r.decide(u, PUB, "news").allowed
    assert r.decide(u, SUB, "chat:secret:x").allowed  # 'chat:secret' is one name only


def test_no_rule_refuses() -> None:
    r = rules({"channel": "chat:>", "subscribe": "anyone"})
    assert r.decide(user(), SUB, "news") == Grant(False, "no rule allows subscribe on 'news'")
    assert r.decide(user(), PUB, "chat") == Grant(False, "no rule allows publish on 'chat'")
    assert not rules().decide(user(), SUB, "x").allowed


def test_an_invalid_channel_is_refused() -> None:
    r = rules({"channel": ">", "subscribe": "anyone"})
    assert r.decide(user(), SUB, "a::b") == Grant(False, "invalid channel: empty segment")
    assert not r.decide(user(), SUB, "").allowed
    assert not r.decide(user(), SUB, "a b").allowed


def test_open_default() -> None:
    r = Rules.open_default()
    u = user()
    for action in Action:
        assert r.decide(u, action, "chat:1") == Grant(True)
        assert not r.decide(ANONYMOUS, action, "chat:1").allowed
        assert not r.decide(u, action, "pg:public:orders").allowed
    assert r.decide(u, SUB, "chat:*").allowed
    assert not r.decide(u, SUB, ">").allowed  # it would include the table channels
    assert not r.decide(u, SUB, "*:public:orders").allowed
    assert not r.decide(u, SUB, "*:x").allowed  # it would include pg:x, under pg:>
    assert r.decide(u, SUB, "chat:>").allowed
    assert not r.row_grant(u, "public", "orders").allowed
    assert not r.row_grant(u, "*", "*").allowed


# --------------------------------------------------------------------------------------------
# Templates in channels
# --------------------------------------------------------------------------------------------


def test_user_limited_channels() -> None:
    r = rules(
        {"channel": "user:{sub}:>", "subscribe": "authenticated", "publish": "authenticated"},
        {"channel": "org:{claims.org.id}:*", "subscribe": "authenticated"},
        {"channel": ">", "subscribe": "role:admin"},
    )
    alice = user("alice", org={"id": "acme"})
    bob = user("bob", org={"id": 7})
    assert r.decide(alice, SUB, "user:alice:inbox").allowed
    assert r.decide(alice, PUB, "user:alice:inbox").allowed
    assert not r.decide(alice, SUB, "user:bob:inbox").allowed
    assert r.decide(bob, SUB, "user:bob:inbox").allowed
    assert not r.decide(alice, SUB, "user:alice").allowed  # '>' needs one more segment
    assert r.decide(alice, SUB, "org:acme:doc").allowed
    assert not r.decide(alice, SUB, "org:7:doc").allowed
    assert r.decide(bob, SUB, "org:7:doc").allowed  # a number claim is its JSON text
    assert not r.decide(ANONYMOUS, SUB, "user::x").allowed
    # The admin rule is reached when the template rules do not match.
    assert r.decide(user("carol", role="admin"), SUB, "user:alice:inbox").allowed


@pytest.mark.parametrize(
    "identity",
    [
        ANONYMOUS,  # empty user
        user("a:b"),
        user("*"),
        user(">"),
        user("a b"),
        user("a\tb"),
        user("a\x00b"),
        user("a\x7fb"),
        user("x" * 300),  # the name would be longer than 255 bytes
        user("ok", tenant=None),
        user("ok", tenant=["a"]),
        user("ok", tenant={"a": 1}),
        user("ok", tenant=float("nan")),
        user("ok"),  # missing claim
    ],
)
def test_a_template_without_a_valid_segment_does_not_match(identity: Identity) -> None:
    r = rules(
        {"channel": "user:{sub}", "subscribe": "anyone"},
        {"channel": "t:{claims.tenant}", "subscribe": "anyone"},
        {"channel": ">", "subscribe": "nobody", "publish": "anyone"},
    )
    for name in ("user:a", "t:a", "t:ok", "t:null", "t:NaN"):
        grant = r.decide(identity, SUB, name)
        assert grant == Grant(False, f"not allowed to subscribe on {name!r}")  # the last rule
    assert r.decide(identity, PUB, "user:x").allowed


_VALUES = st.one_of(
    st.sampled_from(["a", "b", "", "*", ">", "a:b", "a b", "x" * 260, 1]), st.none()
)


@settings(max_examples=300)
@given(
    st.lists(st.sampled_from(["a", "b", "*", "{sub}", "{claims.t}"]), min_size=1, max_size=3),
    st.booleans(),
    _VALUES,
    _VALUES,
    st.lists(st.sampled_from(["a", "b", "1", "x" * 260]), min_size=1, max_size=4),
)
def test_a_templated_rule_matches_names_as_its_filled_pattern(
    body: list[str], tail: bool, sub: object, tenant: object, name: list[str]
) -> None:
    """The name path (filling templates lazily) agrees with filling the whole pattern and
    matching it with the real matcher."""
    channel = ":".join([*body, ">"] if tail else body)
    r = rules({"channel": channel, "subscribe": "anyone"})
    claims = {} if tenant is None else {"t": tenant}
    identity = Identity(user=sub if isinstance(sub, str) else "", claims=claims)
    rule = r._rules[0]
    filled = rule.pattern_for(identity)
    joined = ":".join(name)
    if len(joined.encode()) > 255:  # not a channel name
        assert r.decide(identity, SUB, joined).reason.startswith("invalid channel")
        return
    m = Matcher()
    if filled is not None:
        m.add_channel(1, ":".join(filled))
    expected = m.match_channel(joined) == [1]
    assert rule.matches_name(identity, name) == expected
    assert r.decide(identity, SUB, joined).allowed == expected


def test_template_segments_in_patterns() -> None:
    r = rules({"channel": "user:{sub}:>", "subscribe": "authenticated"})
    assert r.decide(user("alice"), SUB, "user:alice:*").allowed
    assert r.decide(user("alice"), SUB, "user:alice:>").allowed
    assert not r.decide(user("alice"), SUB, "user:*:inbox").allowed
    assert not r.decide(user("alice"), SUB, "user:>").allowed


# --------------------------------------------------------------------------------------------
# Patterns: cover and overlap, exact
# --------------------------------------------------------------------------------------------

_LITERALS = ("a", "b")
_FRESH = "z"  # a literal neither pattern uses: stands for every other segment


@st.composite
def patterns(draw: st.DrawFn, max_size: int = 3) -> tuple[str, ...]:
    body = draw(st.lists(st.sampled_from([*_LITERALS, "*"]), min_size=0, max_size=max_size))
    if draw(st.booleans()) or not body:
        body.append(">")
    return tuple(body)


def _names(longest: int) -> list[tuple[str, ...]]:
    return [
        name
        for n in range(1, longest + 1)
        for name in itertools.product([*_LITERALS, _FRESH], repeat=n)
    ]


def _real_matches(pattern: Sequence[str], names: list[tuple[str, ...]]) -> set[tuple[str, ...]]:
    m = Matcher()
    m.add_channel(1, ":".join(pattern))
    return {
        n for n, ids in zip(names, m.match_channels(":".join(n) for n in names), strict=True) if ids
    }


@settings(max_examples=500)
@given(patterns(), patterns())
def test_cover_and_overlap_against_brute_force(a: tuple[str, ...], b: tuple[str, ...]) -> None:
    # Names one segment longer than both patterns are enough to tell '>' from a fixed length.
    names = _names(max(len(a), len(b)) + 1)
    in_a, in_b = _real_matches(a, names), _real_matches(b, names)
    assert covers(a, b) == (in_b <= in_a)
    assert covers(b, a) == (in_a <= in_b)
    assert overlaps(a, b) == bool(in_a & in_b) == overlaps(b, a)


def test_cover_and_overlap_examples() -> None:
    def c(rule: str, pattern: str) -> bool:
        return covers(rule.split(":"), pattern.split(":"))

    def o(x: str, y: str) -> bool:
        return overlaps(x.split(":"), y.split(":"))

    assert c(">", "a:*")
    assert c("a:>", "a:*:>")
    assert c("a:*", "a:b")
    assert c("*:*", "*:b")
    assert not c("a:*", "a:>")
    assert not c("a:b", "a:*")
    assert not c("a:>", "a")
    assert not c("*", ">")
    assert o("a:>", "*:b")
    assert o(">", "a")
    assert o("a:*:c", "*:b:>")
    assert o("*", ">")
    assert not o("a:*", "a:b:c")
    assert not o("a:>", "a")
    assert not o("a:b", "*:c")


_RULE_WHO = st.sampled_from(["anyone", "nobody", "authenticated"])


@st.composite
def rule_lists(draw: st.DrawFn) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for pattern in draw(st.lists(patterns(), max_size=4)):
        rule: dict[str, Any] = {"channel": ":".join(pattern), "subscribe": draw(_RULE_WHO)}
        out.append(rule)
    return out


@settings(max_examples=300)
@given(rule_lists(), patterns())
def test_a_granted_pattern_grants_every_name_it_matches(
    tables: list[dict[str, Any]], pattern: tuple[str, ...]
) -> None:
    """Soundness: a pattern is allowed only if every name in it is; and when one rule covers it
    and every rule is a plain grant, it is allowed."""
    r = Rules.from_config(tables)
    u = user()
    names = _names(len(pattern) + max((len(t["channel"].split(":")) for t in tables), default=0))
    in_pattern = _real_matches(pattern, names)
    grant = r.decide(u, SUB, ":".join(pattern))
    if grant.allowed:
        assert grant == Grant(True)
        for name in in_pattern:
            assert r.decide(u, SUB, ":".join(name)) == Grant(True), name
    granting = all(t["subscribe"] != "nobody" for t in tables)
    if granting and any(covers(t["channel"].split(":"), pattern) for t in tables):
        assert grant.allowed


def test_patterns_only_for_subscribe() -> None:
    r = rules({"channel": ">", **{a.value: "anyone" for a in Action}})
    assert r.decide(user(), SUB, "a:*").allowed
    for action in (PUB, Action.PRESENCE, Action.HISTORY, Action.MUTATE):
        grant = r.decide(user(), action, "a:*")
        assert grant == Grant(False, f"{action.value} needs a channel name, not a pattern")


def test_a_pattern_needs_every_earlier_overlapping_rule() -> None:
    r = rules(
        {"channel": "chat:secret", "subscribe": "role:admin"},
        {"channel": "chat:>", "subscribe": "authenticated"},
    )
    assert not r.decide(user(), SUB, "chat:*").allowed  # would include chat:secret
    assert r.decide(user(role="admin"), SUB, "chat:*").allowed
    assert r.decide(user(), SUB, "chat:lobby:*").allowed  # does not overlap chat:secret
    assert not r.decide(user(), SUB, ">").allowed  # nothing covers it


def test_a_pattern_over_a_restricted_rule_is_refused() -> None:
    r = rules(
        {"channel": "pg:public:orders", "subscribe": "anyone", "filter": "a=eq.1"},
        {"channel": "pg:public:users", "subscribe": "anyone", "columns": {"*": ["id"]}},
        {"channel": ">", "subscribe": "anyone"},
    )
    refused = "join table channels by name"
    for pattern in ("pg:public:*", "pg:>", ">", "*:*:orders", "pg:*:users"):
        grant = r.decide(user(), SUB, pattern)
        assert not grant.allowed, pattern
        assert grant.reason.endswith(refused), pattern
    assert r.decide(user(), SUB, "pg:other:*").allowed  # overlaps neither
    assert not r.row_grant(user(), "public", "*").allowed
    assert r.row_grant(user(), "other", "*") == Grant(True)
    assert r.decide(user(), SUB, "pg:public:orders") == Grant(True, "", "a=eq.1", None)


# --------------------------------------------------------------------------------------------
# Forced row filters, with the real matcher
# --------------------------------------------------------------------------------------------


def _matches(row_filter: str | None, record: dict[str, Any]) -> bool:
    m = Matcher()
    m.add_rows(1, "*", "public", "orders", row_filter)
    return m.match_row(RowEvent("INSERT", "public", "orders", record=record)) == [1]


_ORDERS = {
    "channel": "pg:public:orders",
    "subscribe": "authenticated",
    "filter": "owner_id=eq.{sub}",
}


def test_a_forced_filter_binds_the_user() -> None:
    r = rules(_ORDERS)
    grant = r.row_grant(user("42"), "public", "orders")
    assert grant == Grant(True, "", 'owner_id=eq."42"', None)
    assert r.decide(user("42"), SUB, "pg:public:orders") == grant
    f = grant.row_filter
    # A quoted literal takes the row value's type: it matches an integer, float or text id.
    assert _matches(f, {"owner_id": 42})
    assert _matches(f, {"owner_id": "42"})
    assert _matches(f, {"owner_id": 42.0})
    assert not _matches(f, {"owner_id": 43})
    assert not _matches(f, {"owner_id": None})
    assert not _matches(f, {"id": 42})


@pytest.mark.parametrize("claim", [42, "42"])
def test_a_number_claim_matches_an_integer_column(claim: object) -> None:
    r = rules(
        {
            "channel": "pg:public:orders",
            "subscribe": "authenticated",
            "filter": "tenant_id=eq.{claims.tenant},owner_id=in.({sub},0)",
        }
    )
    grant = r.row_grant(user("7", tenant=claim), "public", "orders")
    assert grant.row_filter == 'tenant_id=eq."42",owner_id=in.("7",0)'
    assert _matches(grant.row_filter, {"tenant_id": 42, "owner_id": 7})
    assert _matches(grant.row_filter, {"tenant_id": 42, "owner_id": 0})
    assert not _matches(grant.row_filter, {"tenant_id": 41, "owner_id": 7})
    assert not _matches(grant.row_filter, {"tenant_id": 42, "owner_id": 8})


def test_boolean_and_float_claims() -> None:
    r = rules(
        {
            "channel": "pg:public:orders",
            "subscribe": "anyone",
            "filter": "vip=eq.{claims.vip},score=gte.{claims.score}",
        }
    )
    grant = r.row_grant(user(vip=True, score=1.5), "public", "orders")
    assert grant.row_filter == 'vip=eq."true",score=gte."1.5"'
    assert _matches(grant.row_filter, {"vip": True, "score": 2})
    assert not _matches(grant.row_filter, {"vip": False, "score": 2})
    assert not _matches(grant.row_filter, {"vip": True, "score": 1.25})


@pytest.mark.parametrize(
    ("identity", "reason"),
    [
        (ANONYMOUS, "row filter needs a claim: sub claim missing"),
        (user("u", tenant=None), "row filter needs a claim: tenant claim missing"),
        (user("u"), "row filter needs a claim: tenant claim missing"),
        (user("u", tenant=["a"]), "row filter needs a claim: tenant claim missing"),
        (
            user("u", tenant="t" * (MAX_CLAIM_VALUE + 1)),
            "row filter needs a claim: tenant claim too long",
        ),
    ],
)
def test_a_missing_claim_refuses(identity: Identity, reason: str) -> None:
    r = rules(
        {
            "channel": "pg:public:orders",
            "subscribe": "anyone",
            "filter": "owner_id=eq.{sub},tenant_id=eq.{claims.tenant}",
        }
    )
    assert r.row_grant(identity, "public", "orders") == Grant(False, reason)


HOSTILE = [
    "x,owner_id=neq.0",
    'x",owner_id=neq."0',
    "\\",
    '\\"',
    'a\\",b=eq.1,c=eq."',
    "(1,2)",
    ")",
    "%",
    "*",
    "",
    " ",
    "null",
    "x" * MAX_CLAIM_VALUE,
    "é☃𝄞",
    "\x00\x01\n",
    "'; drop table orders; --",
]


@given(st.one_of(st.sampled_from(HOSTILE), st.text(max_size=64)))
def test_a_hostile_claim_is_one_value(claim: str) -> None:
    """Whatever the claim, the forced filter is the one condition it was written as: it
    matches exactly the rows whose column equals the claim, through the real matcher."""
    r = rules(
        {
            "channel": "pg:public:orders",
            "subscribe": "anyone",
            "filter": "owner_id=eq.{claims.owner},kind=in.({claims.owner},fixed)",
        }
    )
    grant = r.row_grant(user(owner=claim), "public", "orders")
    assert grant.allowed
    assert grant.row_filter is not None
    assert _matches(grant.row_filter, {"owner_id": claim, "kind": claim})
    assert _matches(grant.row_filter, {"owner_id": claim, "kind": "fixed"})
    assert not _matches(grant.row_filter, {"owner_id": claim + "x", "kind": claim})
    assert not _matches(grant.row_filter, {"owner_id": claim, "kind": claim + "x"})
    for other in ("0", "1", "x,owner_id=neq.0"):
        if claim != other:
            assert not _matches(grant.row_filter, {"owner_id": other, "kind": "fixed"})


def test_and_filter_puts_the_forced_filter_first() -> None:
    assert Rules.and_filter('owner_id=eq."7"', "status=eq.x") == 'owner_id=eq."7",status=eq.x'
    assert Rules.and_filter('owner_id=eq."7"', None) == 'owner_id=eq."7"'
    assert Rules.and_filter('owner_id=eq."7"', "") == 'owner_id=eq."7"'
    assert Rules.and_filter(None, "status=eq.x") == "status=eq.x"
    assert Rules.and_filter(None, None) is None
    assert Rules.and_filter("", "") is None


def test_the_forced_eq_keeps_the_hash_index() -> None:
    r = rules(_ORDERS)
    m = Matcher()
    for i in range(100):
        forced = r.row_grant(user(str(i)), "public", "orders").row_filter
        m.add_rows(i, "*", "public", "orders", Rules.and_filter(forced, "total=gt.10"))
    assert m.stats()["scanned_row_subscriptions"] == 0
    ev = RowEvent("UPDATE", "public", "orders", record={"owner_id": 7, "total": 11})
    assert m.match_row(ev) == [7]
    ev = RowEvent("UPDATE", "public", "orders", record={"owner_id": 7, "total": 9})
    assert m.match_row(ev) == []


def test_a_filter_without_templates_is_kept_as_written() -> None:
    r = rules({"channel": "pg:public:*", "subscribe": "anyone", "filter": "published=is.true"})
    assert r.row_grant(ANONYMOUS, "public", "posts") == Grant(True, "", "published=is.true")
    r = rules({"channel": "pg:public:*", "subscribe": "anyone", "filter": ""})
    assert r.row_grant(ANONYMOUS, "public", "posts") == Grant(True)


# --------------------------------------------------------------------------------------------
# Columns
# --------------------------------------------------------------------------------------------


def test_columns_by_role() -> None:
    r = rules(
        {
            "channel": "pg:public:orders",
            "subscribe": "anyone",
            "columns": {"customer": ["id", "status", "total"], "*": ["id"]},
        },
        {
            "channel": "pg:public:users",
            "subscribe": "anyone",
            "columns": {"customer": ["id", "name"]},
        },
    )
    cols = r.row_grant(user(role="customer"), "public", "orders").columns
    assert cols == frozenset({"id", "status", "total"})
    assert r.row_grant(user(role="staff"), "public", "orders").columns == frozenset({"id"})
    assert r.row_grant(ANONYMOUS, "public", "orders").columns == frozenset({"id"})
    assert r.row_grant(user(role="customer"), "public", "users").columns == {"id", "name"}
    assert r.row_grant(user(role="staff"), "public", "users").columns is None  # all
    assert r.row_grant(ANONYMOUS, "public", "users").columns is None


def test_the_first_granting_rule_gives_the_columns() -> None:
    r = rules(
        {
            "channel": "pg:public:orders",
            "subscribe": "role:customer",
            "filter": "owner_id=eq.{sub}",
            "columns": {"*": ["id", "status"]},
        },
    )
    grant = r.row_grant(user("5", role="customer"), "public", "orders")
    assert grant == Grant(True, "", 'owner_id=eq."5"', frozenset({"id", "status"}))
    assert not r.row_grant(user("5", role="service_role"), "public", "orders").allowed


# --------------------------------------------------------------------------------------------
# Load errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ([{"channel": "a", "subscribe": "everyone"}], r"auth\.rules\[0\]\.subscribe: unknown who"),
        ([{"channel": "a"}, {"channel": "b", "publish": "role:"}], r"rules\[1\]\.publish: unknown"),
        ([{"channel": "a", "history": []}], r"rules\[0\]\.history: an empty list"),
        ([{"channel": "a", "presence": 3}], r"rules\[0\]\.presence: expected a string"),
        ([{"channel": "a", "mutate": ["anyone", 3]}], r"rules\[0\]\.mutate: expected a string"),
        ([{"channel": "a", "subscribe": "claim:=x"}], r"rules\[0\]\.subscribe: invalid claim"),
        ([{"channel": "a", "subscribe": "claim:a..b=x"}], r"invalid claim path"),
        ([{"channel": "a", "subscribe": "claim:a"}], r"unknown who"),
        ([{"subscribe": "anyone"}], r"auth\.rules\[0\]\.channel: missing"),
        ([{"channel": "a", "subscribe": "anyone", "push": 1}], r"rules\[0\]\.push: unknown key"),
        (["a"], r"auth\.rules\[0\]: expected a table"),
        ([{"channel": 1}], r"rules\[0\]\.channel: expected a string"),
        ([{"channel": "a::b"}], r"rules\[0\]\.channel: empty segment \(at position 2\)"),
        ([{"channel": "a:>:b"}], r"'>' is only allowed as the last segment"),
        ([{"channel": "a*"}], r"wildcard must be a whole segment"),
        ([{"channel": "user:x{sub}"}], r"rules\[0\]\.channel: 'x\{sub\}': a template is a whole"),
        ([{"channel": "user:{claims.}"}], r"a template is a whole segment"),
        ([{"channel": "user:{nope}"}], r"a template is a whole segment"),
        ([{"channel": "a" * 1025}], r"rules\[0\]\.channel: longer than 1024"),
        ([{"channel": "a" * 300}], r"longer than 255 bytes"),
        ([{"channel": "chat:>", "filter": "a=eq.1"}], r"rules\[0\]\.filter: only for table"),
        ([{"channel": "chat:>", "columns": {}}], r"rules\[0\]\.columns: only for table"),
        ([{"channel": "pg:a:b", "filter": "a=eq.1,"}], r"rules\[0\]\.filter: empty condition"),
        ([{"channel": "pg:a:b", "filter": "a=zz.1"}], r"unknown operator 'zz'"),
        ([{"channel": "pg:a:b", "filter": 5}], r"rules\[0\]\.filter: expected a string"),
        ([{"channel": "pg:a:b", "filter": "a=eq.x{sub}"}], r"unexpected '\"' in unquoted"),
        ([{"channel": "pg:a:b", "filter": 'a=eq."{sub}"'}], r"after quoted value \(a template"),
        ([{"channel": "pg:a:b", "filter": "{sub}=eq.1"}], r"rules\[0\]\.filter: "),
        ([{"channel": "pg:a:b", "filter": "a=like.{sub}"}], r"not like"),
        ([{"channel": "pg:a:b", "filter": "a=is.{sub}"}], r"rules\[0\]\.filter: "),
        ([{"channel": "pg:a:b", "filter": "a=eq.{sub x}"}], r"invalid template"),
        ([{"channel": "pg:a:b", "filter": "a=eq.\x00"}], r"contains NUL"),
        ([{"channel": "pg:a:b", "filter": "a=eq." + "1" * 1024}], r"longer than 1024"),
        ([{"channel": "pg:a:b", "columns": ["id"]}], r"rules\[0\]\.columns: expected a table"),
        ([{"channel": "pg:a:b", "columns": {"x": "id"}}], r"columns\.x: expected a list"),
        ([{"channel": "pg:a:b", "columns": {"x": [""]}}], r"columns\.x: invalid column name ''"),
        ([{"channel": "pg:a:b", "columns": {"x": ["a" * 64]}}], r"invalid column name"),
        ([{"channel": "pg:a:b", "columns": {"x": ["a\nb"]}}], r"invalid column name"),
        ([{"channel": "pg:a:b", "columns": {"": ["a"]}}], r"invalid role"),
        ([{"channel": "a", "subscribe": "anyone"}] * 1001, r"more than 1000 rules"),
        ([{"channel": "a", "subscribe": ["anyone"] * 1025}], r"more than 1024 entries"),
    ],
)
def test_load_errors(tables: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Rules.from_config(tables)


@pytest.mark.parametrize("tables", ["chat", {"channel": "a"}, 3, b"x"])
def test_the_rules_are_a_list(tables: Any) -> None:
    with pytest.raises(ValueError, match=r"auth\.rules: expected a list of tables"):
        Rules.from_config(tables)


def test_valid_shapes_load() -> None:
    r = rules(
        {"channel": "chat:>", "subscribe": "authenticated"},
        {"channel": "user:{sub}:>", "subscribe": "authenticated"},
        {"channel": "t:{claims.org.tenant-id}", "subscribe": ["role:a", "claim:x.y=a=b"]},
        {
            "channel": "pg:public:orders",
            "subscribe": ["role:customer", "role:staff"],
            "filter": 'owner_id=eq.{sub},t=in.({claims.t}, "x"),s=like.a%',
            "columns": {"customer": ["id", "status", "total"], "*": ["id", "Name With Space"]},
        },
        {"channel": "pg:public:orders", "subscribe": "role:service_role"},
    )
    assert len(r) == 5
    ident = user("1", t="z", x={"y": "a=b"}, org={"tenant-id": "q"})
    assert r.decide(ident, SUB, "t:q").allowed  # the claim VALUE runs to the end: 'a=b'
    grant = r.row_grant(user("1", role="staff", t="z"), "public", "orders")
    assert grant.row_filter == 'owner_id=eq."1",t=in.("z", "x"),s=like.a%'
    assert grant.columns == frozenset({"id", "Name With Space"})
