//! Matcher tests: examples from docs/matcher.md, and properties checked against a brute-force
//! oracle that evaluates every subscription (so the indexes can only speed things up).

use proptest::prelude::*;

use super::*;

fn row(cols: &[(&str, Value)]) -> Row {
    cols.iter().map(|(n, v)| (*n, v.clone())).collect()
}

fn ev(kind: ChangeKind, schema: &str, table: &str, r: Row) -> RowEvent {
    let (record, old_record) = match kind {
        ChangeKind::Delete => (None, Some(r)),
        _ => (Some(r), None),
    };
    RowEvent {
        kind,
        schema: schema.into(),
        table: table.into(),
        record,
        old_record,
    }
}

fn matched(m: &Matcher, e: &RowEvent) -> Vec<SubId> {
    let mut out = Vec::new();
    m.match_row(e, &mut out);
    out.sort_unstable();
    out
}

fn channel(m: &Matcher, name: &str) -> Vec<SubId> {
    let mut out = Vec::new();
    m.match_channel(name, &mut out).unwrap();
    out.sort_unstable();
    out
}

#[test]
fn doc_example() {
    let mut m = Matcher::new();
    m.add_channel(1, "room:42").unwrap();
    m.add_channel(2, "room:*").unwrap();
    m.add_channel(3, "room:>").unwrap();
    m.add_rows(
        4,
        "UPDATE",
        "public",
        "orders",
        Some("status=eq.shipped,total=gt.100"),
    )
    .unwrap();
    m.add_rows(5, "*", "public", "*", None).unwrap();
    assert_eq!(channel(&m, "room:42"), [1, 2, 3]);
    let r = row(&[
        ("id", Value::Int(7)),
        ("status", Value::Text("shipped".into())),
        ("total", Value::Float(250.0)),
    ]);
    assert_eq!(
        matched(&m, &ev(ChangeKind::Update, "public", "orders", r.clone())),
        [4, 5]
    );
    assert_eq!(
        matched(&m, &ev(ChangeKind::Insert, "public", "orders", r.clone())),
        [5]
    );
    assert_eq!(
        matched(&m, &ev(ChangeKind::Update, "other", "orders", r)),
        Vec::<SubId>::new()
    );
    assert!(m.remove(4));
    assert!(!m.remove(4));
    assert_eq!(m.len(), 4);
}

#[test]
fn add_errors() {
    let mut m = Matcher::new();
    m.add_rows(1, "insert", "public", "t", Some("a=eq.1"))
        .unwrap();
    assert_eq!(m.add_channel(1, "x"), Err(AddError::DuplicateId(1)));
    let reason = |r: Result<(), AddError>| match r {
        Err(AddError::Filter(e)) => (e.reason, e.position),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        reason(m.add_rows(2, "UPSERT", "s", "t", None)),
        ("unknown event 'UPSERT'".into(), 0)
    );
    assert_eq!(
        reason(m.add_rows(2, "*", "", "t", None)),
        ("empty schema".into(), 0)
    );
    assert_eq!(
        reason(m.add_rows(2, "*", "s", "", None)),
        ("empty table".into(), 0)
    );
    assert_eq!(
        reason(m.add_rows(2, "*", "s", "t", Some("a=xx.1"))),
        ("unknown operator 'xx'".into(), 2)
    );
    assert!(matches!(
        m.add_channel(2, "a::b"),
        Err(AddError::Channel(_))
    ));
    assert_eq!(m.len(), 1);
}

#[test]
fn delete_matches_old_row_and_typed_keys_index() {
    let mut m = Matcher::new();
    m.add_rows(1, "DELETE", "s", "t", Some("id=eq.5")).unwrap();
    m.add_rows(2, "*", "s", "t", Some("id=in.(5.0,6)")).unwrap();
    m.add_rows(3, "*", "s", "t", Some("flag=eq.t")).unwrap();
    m.add_rows(4, "*", "*", "t", Some("id=eq.05")).unwrap();
    let d = ev(
        ChangeKind::Delete,
        "s",
        "t",
        row(&[("id", Value::Int(5)), ("flag", Value::Bool(true))]),
    );
    assert_eq!(matched(&m, &d), [1, 2, 3, 4]);
    let i = ev(
        ChangeKind::Insert,
        "s",
        "t",
        row(&[("id", Value::Text("5".into()))]),
    );
    assert_eq!(
        matched(&m, &i),
        Vec::<SubId>::new(),
        "text '5' is neither '5.0', '6' nor '05'"
    );
    let i = ev(
        ChangeKind::Insert,
        "s",
        "t",
        row(&[("id", Value::Text("05".into()))]),
    );
    assert_eq!(matched(&m, &i), [4]);
    let big = ev(
        ChangeKind::Insert,
        "s",
        "t",
        row(&[("id", Value::Float(5.0))]),
    );
    assert_eq!(matched(&m, &big), [2, 4]);
}

#[test]
fn integers_beyond_2_pow_53_are_checked_not_trusted_to_the_index() {
    // 2**53 + 1 and 2**53 share a float key; the equality index must not take that as equal.
    let mut m = Matcher::new();
    m.add_rows(1, "*", "s", "t", Some("id=eq.9007199254740992"))
        .unwrap();
    m.add_rows(2, "*", "s", "t", Some("id=in.(9007199254740993)"))
        .unwrap();
    let at = |i: i64| ev(ChangeKind::Insert, "s", "t", row(&[("id", Value::Int(i))]));
    assert_eq!(matched(&m, &at(1 << 53)), [1]);
    assert_eq!(matched(&m, &at((1 << 53) + 1)), [2]);
    assert_eq!(matched(&m, &at(-(1 << 53))), Vec::<SubId>::new());
    // Floats and small integers are decided by the key alone, and correctly so.
    m.add_rows(3, "*", "s", "t", Some("id=eq.5")).unwrap();
    assert_eq!(matched(&m, &at(5)), [3]);
    let f = ev(
        ChangeKind::Insert,
        "s",
        "t",
        row(&[("id", Value::Float(5.0))]),
    );
    assert_eq!(matched(&m, &f), [3]);
}

fn indexed(m: &Matcher, id: SubId) -> Option<u32> {
    match &m.subs[m.slots[&id] as usize] {
        Subscription::Rows(r) => r.indexed,
        Subscription::Channel(_) => None,
    }
}

#[test]
fn repeated_conditions_are_kept_once() {
    let kept = |text: &str| Filter::parse(text).unwrap().without_repeats().conditions;
    let f = kept(r#"user_id=eq."42",user_id=eq.42,n=gt.1,n=gt."1",n=gte.1"#);
    let ops: Vec<_> = f.iter().map(|c| c.operator.name()).collect();
    assert_eq!(ops, ["eq", "gt", "gte"]);
    // Different tests of one column, or one test negated, are not the same condition.
    assert_eq!(kept("a=eq.1,a=not.eq.1,a=eq.2").len(), 3);
    assert_eq!(kept("a=in.(1,2),a=in.(12)").len(), 2);
    assert_eq!(kept("a=like.x*,a=ilike.x*,a=is.null,a=is.null").len(), 3);
    // Past 16 conditions they are hashed: the same answer.
    let many: Vec<String> = (0..40)
        .map(|i| format!("a{}=eq.{}", i % 20, i % 20))
        .collect();
    assert_eq!(kept(&many.join(",")).len(), 20);
    // Parsing alone keeps what was written.
    assert_eq!(Filter::parse("a=eq.1,a=eq.1").unwrap().conditions.len(), 2);
    // Kept once, the user's subscription is exact: a hit needs no re-check.
    let mut m = Matcher::new();
    m.add_rows(
        1,
        "*",
        "public",
        "t",
        Some(r#"user_id=eq."42",user_id=eq.42"#),
    )
    .unwrap();
    let e = ev(
        ChangeKind::Insert,
        "public",
        "t",
        row(&[("user_id", Value::Int(42))]),
    );
    assert_eq!(matched(&m, &e), [1]);
}

#[test]
fn the_less_crowded_condition_is_indexed() {
    // Ten users of tenant t1, each with a rule's forced tenant filter in front of its own
    // in-list.
    let mut m = Matcher::new();
    for user in 0..10u64 {
        let filter = format!("tenant_id=eq.t1,org_id=in.(o{user},p{user})");
        m.add_rows(user, "*", "public", "orders", Some(&filter))
            .unwrap();
    }
    // The first is filed under the tenant (both buckets empty: the eq); the others under
    // their own in-list, once the tenant's bucket is the fuller.
    assert_eq!(indexed(&m, 0), Some(0));
    assert!((1..10).all(|user| indexed(&m, user) == Some(1)));
    let t1 = |org: &str| {
        let r = row(&[
            ("tenant_id", Value::Text("t1".into())),
            ("org_id", Value::Text(org.into())),
        ]);
        matched(&m, &ev(ChangeKind::Insert, "public", "orders", r))
    };
    assert_eq!(t1("o7"), [7]);
    assert_eq!(t1("p0"), [0]);
    assert!(t1("x").is_empty());
    for user in 0..10 {
        assert!(m.remove(user));
    }
    assert_eq!(m.stats().row_groups, 0);
}

/// Two `eq` conditions (a tenant's and a user's), in either order, one with a third: found
/// exactly, whichever of the two each subscription was filed under.
#[test]
fn two_eq_conditions() {
    let mut m = Matcher::new();
    for user in 0..10u64 {
        // Either order of the two columns; user 9 has a third condition to re-check.
        let filter = match user {
            0..=4 => format!("tenant_id=eq.t1,user_id=eq.{user}"),
            5..=8 => format!(r#"user_id=eq."{user}",tenant_id=eq.t1"#),
            _ => format!("tenant_id=eq.t1,user_id=eq.{user},n=gt.1"),
        };
        m.add_rows(user, "*", "public", "orders", Some(&filter))
            .unwrap();
    }
    m.add_rows(
        10,
        "*",
        "public",
        "orders",
        Some("tenant_id=eq.t1,user_id=eq.9007199254740992"),
    )
    .unwrap();
    let at = |tenant: &str, user: Value, n: i64| {
        let r = row(&[
            ("tenant_id", Value::Text(tenant.into())),
            ("user_id", user),
            ("n", Value::Int(n)),
        ]);
        matched(&m, &ev(ChangeKind::Insert, "public", "orders", r))
    };
    assert_eq!(at("t1", Value::Int(3), 0), [3]);
    assert_eq!(at("t1", Value::Text("6".into()), 0), [6]);
    assert_eq!(at("t1", Value::Float(7.0), 0), [7]);
    assert!(at("t2", Value::Int(3), 0).is_empty());
    assert!(at("t1", Value::Null, 0).is_empty());
    assert!(at("t1", Value::Int(9), 0).is_empty());
    assert_eq!(at("t1", Value::Int(9), 2), [9]);
    // Past 2**53 an integer's key is not exact: re-checked, not trusted.
    assert!(at("t1", Value::Int(9_007_199_254_740_993), 0).is_empty());
    assert_eq!(at("t1", Value::Int(9_007_199_254_740_992), 0), [10]);
    for user in 0..11 {
        assert!(m.remove(user));
    }
    assert_eq!(m.stats().row_groups, 0);
}

#[test]
fn removal_frees_everything() {
    let mut m = Matcher::new();
    for i in 0..1000u64 {
        m.add_rows(
            i,
            "*",
            "s",
            &format!("t{}", i % 7),
            Some(&format!("a=eq.{i},b=gt.1")),
        )
        .unwrap();
        m.add_rows(10_000 + i, "*", "*", "t", Some("b=like.x%"))
            .unwrap();
        m.add_channel(20_000 + i, &format!("room:{}:>", i % 13))
            .unwrap();
    }
    assert!(m.stats().trie_nodes > 1);
    for i in 0..1000u64 {
        assert!(m.remove(i));
        assert!(m.remove(10_000 + i));
        assert!(m.remove(20_000 + i));
    }
    assert_eq!(
        m.stats(),
        MatcherStats {
            trie_nodes: 1,
            ..Default::default()
        }
    );
    assert!(m.groups.is_empty() && m.group_slots.is_empty());
}

// ---- properties ----

const COLUMNS: &[&str] = &["a", "b", "c"];
const TEXTS: &[&str] = &[
    "",
    "x",
    "X",
    "5",
    "05",
    "5.0",
    "t",
    "true",
    "abc",
    "a,b",
    "a\"b",
    "é",
    "nan",
    "-0",
    "9007199254740992",
    "9007199254740993",
];

fn literal_text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(TEXTS).prop_map(str::to_owned),
        (-3i64..10).prop_map(|i| i.to_string()),
        "[a-c%_*\\\\]{0,4}",
    ]
}

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Conditions rendered as text, values always quoted so any literal survives:
/// (column, negated, operator, text).
fn filter_conditions() -> impl Strategy<Value = Vec<(&'static str, bool, &'static str, String)>> {
    // `eq` three times: filters with two of them, filed under the less crowded.
    let op = prop::sample::select(
        &[
            "eq", "eq", "eq", "neq", "lt", "lte", "gt", "gte", "like", "ilike", "is", "in",
        ][..],
    );
    let cond = (
        prop::sample::select(COLUMNS),
        any::<bool>(),
        op,
        prop::collection::vec(literal_text(), 0..3),
    )
        .prop_map(|(col, not, op, lits)| {
            let value = match op {
                "in" => format!(
                    "({})",
                    lits.iter().map(|l| quote(l)).collect::<Vec<_>>().join(",")
                ),
                "is" => ["null", "TRUE", "false", "unknown"][lits.len() % 4].to_owned(),
                "like" | "ilike" => {
                    quote(&lits.first().cloned().unwrap_or_default().replace('\\', ""))
                }
                _ => quote(lits.first().map_or("", |s| s)),
            };
            let text = format!("{col}={}{op}.{value}", if not { "not." } else { "" });
            (col, not, op, text)
        });
    prop::collection::vec(cond, 0..3)
}

fn filter_text() -> impl Strategy<Value = String> {
    filter_conditions().prop_map(|c| c.into_iter().map(|x| x.3).collect::<Vec<_>>().join(","))
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-3i64..10).prop_map(Value::Int),
        prop_oneof![Just(i64::MAX), Just(i64::MIN), Just((1i64 << 53) + 1)].prop_map(Value::Int),
        prop_oneof![
            Just(f64::NAN),
            Just(-0.0),
            Just(5.0),
            Just(2.5),
            Just(f64::INFINITY)
        ]
        .prop_map(Value::Float),
        literal_text().prop_map(|s| Value::Text(s.into())),
    ]
}

#[derive(Clone, Debug)]
enum Op {
    AddRows(u64, &'static str, &'static str, &'static str, String),
    AddChannel(u64, String),
    Remove(u64),
    MatchRow(
        ChangeKind,
        &'static str,
        &'static str,
        Vec<(&'static str, Value)>,
    ),
    MatchChannel(String),
}

fn segment() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&["a", "b", "c"][..])
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let id = 0u64..40;
    let kind =
        prop::sample::select(&[ChangeKind::Insert, ChangeKind::Update, ChangeKind::Delete][..]);
    let event = prop::sample::select(&["INSERT", "UPDATE", "DELETE", "*"][..]);
    let schema = prop::sample::select(&["s", "*"][..]);
    let table = prop::sample::select(&["t", "u", "*"][..]);
    let pattern_seg = prop::sample::select(&["a", "b", "*", ">"][..]);
    let op = prop_oneof![
        4 => (id.clone(), event, schema.clone(), table.clone(), filter_text())
            .prop_map(|(i, e, s, t, f)| Op::AddRows(i, e, s, t, f)),
        2 => (id.clone(), prop::collection::vec(pattern_seg, 1..4))
            .prop_map(|(i, segs)| Op::AddChannel(i, segs.join(":"))),
        2 => id.prop_map(Op::Remove),
        4 => (kind, schema, table, prop::collection::vec((prop::sample::select(COLUMNS), value()), 0..4))
            .prop_map(|(k, s, t, r)| Op::MatchRow(k, s, t, r)),
        2 => prop::collection::vec(segment(), 1..4).prop_map(|s| Op::MatchChannel(s.join(":"))),
    ];
    prop::collection::vec(op, 1..60)
}

/// The oracle: every live subscription, checked one by one.
#[derive(Default)]
struct BruteForce {
    rows: Vec<(u64, u8, String, String, Filter)>,
    channels: Vec<(u64, String)>,
}

fn pattern_matches(pattern: &[&str], name: &[&str]) -> bool {
    match (pattern.split_first(), name.split_first()) {
        (Some((&">", _)), Some(_)) => true,
        (Some((p, pr)), Some((n, nr))) => (*p == "*" || p == n) && pattern_matches(pr, nr),
        (None, None) => true,
        _ => false,
    }
}

impl BruteForce {
    fn match_row(&self, e: &RowEvent) -> Vec<u64> {
        let r = e.filtered_row().cloned().unwrap_or_default();
        let mut out: Vec<u64> = self
            .rows
            .iter()
            .filter(|(_, ev, s, t, f)| {
                ev & e.kind.bit() != 0
                    && (s == "*" || **s == *e.schema)
                    && (t == "*" || **t == *e.table)
                    && f.matches(&r)
            })
            .map(|x| x.0)
            .collect();
        out.sort_unstable();
        out
    }

    fn match_channel(&self, name: &str) -> Vec<u64> {
        let n: Vec<&str> = name.split(':').collect();
        let mut out: Vec<u64> = self
            .channels
            .iter()
            .filter(|(_, p)| pattern_matches(&p.split(':').collect::<Vec<_>>(), &n))
            .map(|x| x.0)
            .collect();
        out.sort_unstable();
        out
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn index_agrees_with_brute_force(ops in ops()) {
        let mut m = Matcher::new();
        let mut oracle = BruteForce::default();
        for op in ops {
            match op {
                Op::AddRows(id, e, s, t, f) => {
                    let added = m.add_rows(id, e, s, t, Some(&f));
                    let dup = oracle.rows.iter().any(|x| x.0 == id) || oracle.channels.iter().any(|x| x.0 == id);
                    prop_assert_eq!(added.is_err(), dup, "{:?}", added);
                    if !dup {
                        let bits = ChangeKind::parse(e).map_or(ANY_EVENT, ChangeKind::bit);
                        oracle.rows.push((id, bits, s.into(), t.into(), Filter::parse(&f).unwrap()));
                    }
                }
                Op::AddChannel(id, p) => {
                    let valid = check_channel(&p, true).is_ok();
                    let dup = oracle.rows.iter().any(|x| x.0 == id) || oracle.channels.iter().any(|x| x.0 == id);
                    let added = m.add_channel(id, &p);
                    prop_assert_eq!(added.is_ok(), valid && !dup);
                    if added.is_ok() {
                        oracle.channels.push((id, p));
                    }
                }
                Op::Remove(id) => {
                    let before = oracle.rows.len() + oracle.channels.len();
                    oracle.rows.retain(|x| x.0 != id);
                    oracle.channels.retain(|x| x.0 != id);
                    let present = before != oracle.rows.len() + oracle.channels.len();
                    prop_assert_eq!(m.remove(id), present);
                }
                Op::MatchRow(k, s, t, cols) => {
                    let e = ev(k, s, t, row(&cols));
                    prop_assert_eq!(matched(&m, &e), oracle.match_row(&e));
                }
                Op::MatchChannel(name) => {
                    prop_assert_eq!(channel(&m, &name), oracle.match_channel(&name));
                }
            }
            prop_assert_eq!(m.len(), oracle.rows.len() + oracle.channels.len());
        }
    }

    #[test]
    fn rendered_filters_parse(conds in filter_conditions()) {
        let text = conds.iter().map(|x| x.3.as_str()).collect::<Vec<_>>().join(",");
        let f = Filter::parse(&text);
        prop_assert!(f.is_ok(), "{}: {:?}", text, f);
        let parsed: Vec<_> = f.unwrap().conditions.iter()
            .map(|c| (c.column.to_string(), c.negated, c.operator.name())).collect();
        let expected: Vec<_> = conds.iter().map(|x| (x.0.to_string(), x.1, x.2)).collect();
        prop_assert_eq!(parsed, expected);
    }

    #[test]
    fn parser_never_panics(text in "\\PC{0,40}") {
        let _ = Filter::parse(&text);
        let _ = check_channel(&text, true);
    }

    #[test]
    fn parser_never_panics_near_grammar(text in "[a-c=.,\"\\\\() notieqlkusfr%*_]{0,30}") {
        if let Err(e) = Filter::parse(&text) {
            prop_assert!(e.position <= text.chars().count());
        }
    }
}

/// Literals and row values from a tiny domain, so that equality indexes hit often.
const LITERALS: &[&str] = &["0", "1", "1.0", "x", r#""1""#];

fn tiny_value(i: usize) -> Value {
    match i {
        0 => Value::Int(0),
        1 => Value::Int(1),
        2 => Value::Float(1.0),
        3 => Value::Text("x".into()),
        4 => Value::Text("1".into()),
        _ => Value::Null,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Filters of two `eq` conditions (filed under the less crowded), some with a third
    /// condition, over rows whose values often equal the literals: the matcher finds
    /// exactly what evaluating every filter finds, and removing them all leaves nothing.
    #[test]
    fn pair_index_agrees_with_brute_force(
        subs in prop::collection::vec(
            (
                0..3usize, 0..5usize, 0..3usize, 0..5usize,
                prop::option::of((0..3usize, 0..3usize, 0..5usize)),
            ),
            1..24,
        ),
        rows in prop::collection::vec(prop::collection::vec(0..6usize, 3), 1..16),
    ) {
        let mut m = Matcher::new();
        let mut filters = Vec::new();
        for (id, (ca, va, cb, vb, third)) in subs.iter().enumerate() {
            let mut text = format!(
                "{}=eq.{},{}=eq.{}", COLUMNS[*ca], LITERALS[*va], COLUMNS[*cb], LITERALS[*vb]
            );
            if let Some((cc, op, vc)) = third {
                let op = ["eq", "neq", "gt"][*op];
                text += &format!(",{}={op}.{}", COLUMNS[*cc], LITERALS[*vc]);
            }
            m.add_rows(id as SubId, "*", "public", "t", Some(&text)).unwrap();
            filters.push(Filter::parse(&text).unwrap());
        }
        for values in &rows {
            let r: Row = COLUMNS.iter().zip(values).map(|(c, v)| (*c, tiny_value(*v))).collect();
            let expected: Vec<SubId> = (0..filters.len() as SubId)
                .filter(|&id| filters[id as usize].matches(&r))
                .collect();
            prop_assert_eq!(matched(&m, &ev(ChangeKind::Insert, "public", "t", r)), expected);
        }
        for id in 0..filters.len() as SubId {
            prop_assert!(m.remove(id));
        }
        prop_assert_eq!(m.stats().row_groups, 0);
    }
}
