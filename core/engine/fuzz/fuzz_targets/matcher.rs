//! Row filters and channel patterns, parsed from any text, and a matcher driven by any
//! sequence of subscribes, unsubscribes and matches.
//!
//! Checked: no panic, no unbounded allocation, no hang (libFuzzer's limits); error positions
//! fall inside the text; every parsed filter evaluates on any row; like patterns match as
//! an NFA over the text says they should; the matcher's indexes
//! give exactly what a brute-force check of every subscription gives (filters evaluated
//! one by one, channel patterns matched segment by segment).
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pyrt_engine::matcher::{
    check_channel, ChangeKind, Condition, Filter, LikePattern, Matcher, Row, RowEvent, SubId,
    Value, SEPARATOR,
};

/// Column names drawn from a small set most of the time, so filters and rows meet.
#[derive(Arbitrary, Debug)]
enum Name {
    Id,
    Status,
    Total,
    A,
    Other(String),
}

impl Name {
    fn as_str(&self) -> &str {
        match self {
            Name::Id => "id",
            Name::Status => "status",
            Name::Total => "total",
            Name::A => "a",
            Name::Other(s) => s,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum FValue {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl FValue {
    fn value(&self) -> Value {
        match self {
            FValue::Null => Value::Null,
            FValue::Bool(b) => Value::Bool(*b),
            FValue::Int(i) => Value::Int(*i),
            FValue::Float(f) => Value::Float(*f),
            FValue::Text(s) => Value::Text(s.as_str().into()),
        }
    }
}

fn row(columns: &[(Name, FValue)]) -> Row {
    columns
        .iter()
        .map(|(n, v)| (n.as_str(), v.value()))
        .collect()
}

#[derive(Arbitrary, Debug)]
enum Kind {
    Insert,
    Update,
    Delete,
}

impl Kind {
    fn change(&self) -> ChangeKind {
        match self {
            Kind::Insert => ChangeKind::Insert,
            Kind::Update => ChangeKind::Update,
            Kind::Delete => ChangeKind::Delete,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Parse a filter on its own and evaluate it on a row.
    Filter(String, Vec<(Name, FValue)>),
    /// Check a channel name or pattern on its own.
    Channel(String, bool),
    /// Match a like (or ilike) pattern against a text, on its own.
    Like(String, String, bool),
    AddChannel(u8, String),
    AddRows {
        id: u8,
        event: String,
        schema: String,
        table: String,
        filter: Option<String>,
    },
    Remove(u8),
    MatchChannel(String),
    MatchRow {
        kind: Kind,
        schema: String,
        table: String,
        record: Option<Vec<(Name, FValue)>>,
        old_record: Option<Vec<(Name, FValue)>>,
    },
}

/// What the matcher was told, for the brute-force answer.
enum Model {
    Channel(String),
    Rows {
        event: String,
        schema: String,
        table: String,
        filter: Filter,
    },
}

fn chars(text: &str) -> usize {
    text.chars().count()
}

/// A pattern against a valid channel name, segment by segment (docs/matcher.md).
fn pattern_matches(pattern: &str, name: &str) -> bool {
    let p: Vec<&str> = pattern.split(SEPARATOR).collect();
    let n: Vec<&str> = name.split(SEPARATOR).collect();
    for (i, segment) in p.iter().enumerate() {
        match *segment {
            ">" => return n.len() > i,
            "*" if i < n.len() => {}
            s if n.get(i) == Some(&s) => {}
            _ => return false,
        }
    }
    p.len() == n.len()
}

/// A like pattern run as an NFA over the text's characters (as `pyrt/reference/matcher.py` does),
/// both sides lowercased character by character for ilike; `None` for a trailing escape.
fn like(pattern: &str, text: &str, case_insensitive: bool) -> Option<bool> {
    let fold = |c: char| -> Vec<char> {
        if case_insensitive {
            c.to_lowercase().collect()
        } else {
            vec![c]
        }
    };
    let s: Vec<char> = text.chars().flat_map(fold).collect();
    let mut reach = vec![false; s.len() + 1];
    reach[0] = true;
    let step = |reach: &mut [bool], literal: Option<char>| {
        for p in (0..s.len()).rev() {
            reach[p + 1] = reach[p] && literal.is_none_or(|l| l == s[p]);
        }
        reach[0] = false;
    };
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '%' | '*' => {
                if let Some(first) = reach.iter().position(|r| *r) {
                    reach[first..].fill(true);
                }
            }
            '_' => step(&mut reach, None),
            c => {
                let literal = if c == '\\' { chars.next()? } else { c };
                for l in fold(literal) {
                    step(&mut reach, Some(l));
                }
            }
        }
    }
    Some(reach[s.len()])
}

fn wants(event: &str, schema: &str, table: &str, e: &RowEvent) -> bool {
    (event == "*" || ChangeKind::parse(event) == Some(e.kind))
        && (schema == "*" || schema == &*e.schema)
        && (table == "*" || table == &*e.table)
}

fuzz_target!(|ops: Vec<Op>| {
    let mut matcher = Matcher::new();
    let mut model: BTreeMap<SubId, Model> = BTreeMap::new();
    for op in ops {
        match op {
            Op::Filter(text, columns) => match Filter::parse(&text) {
                Ok(filter) => {
                    let r = row(&columns);
                    for c in filter.conditions.iter() {
                        let _ = c.evaluate(&r);
                    }
                    let matches = filter.matches(&r);
                    // A repeated condition kept once changes nothing.
                    assert_eq!(filter.clone().without_repeats().matches(&r), matches);
                    // Whatever the buckets hold, the index takes an indexable condition.
                    for crowd in [0usize, 1, 7] {
                        let bucket = |c: &Condition| crowd * (1 + c.column.len() % 3);
                        if let Some(i) = filter.index_condition(bucket) {
                            assert!(filter.conditions[i].index_literals().is_some());
                        }
                    }
                }
                Err(e) => assert!(e.position <= chars(&text), "{e} in {text:?}"),
            },
            Op::Channel(text, pattern) => {
                if let Err(e) = check_channel(&text, pattern) {
                    assert!(e.position <= chars(&text), "{e} in {text:?}");
                }
            }
            Op::Like(pattern, text, case_insensitive) => {
                let compiled = LikePattern::compile(&pattern, case_insensitive);
                let expected = like(&pattern, &text, case_insensitive);
                assert_eq!(
                    compiled.map(|p| p.matches(&text)),
                    expected,
                    "{pattern:?} {text:?}"
                );
            }
            Op::AddChannel(id, pattern) => {
                let id = SubId::from(id);
                let result = matcher.add_channel(id, &pattern);
                let expected = !model.contains_key(&id) && check_channel(&pattern, true).is_ok();
                assert_eq!(result.is_ok(), expected, "{result:?}");
                if expected {
                    model.insert(id, Model::Channel(pattern));
                }
            }
            Op::AddRows {
                id,
                event,
                schema,
                table,
                filter,
            } => {
                let id = SubId::from(id);
                let result = matcher.add_rows(id, &event, &schema, &table, filter.as_deref());
                let parsed = Filter::parse(filter.as_deref().unwrap_or(""));
                let expected = !model.contains_key(&id)
                    && (event == "*" || ChangeKind::parse(&event).is_some())
                    && !schema.is_empty()
                    && !table.is_empty()
                    && parsed.is_ok();
                assert_eq!(result.is_ok(), expected, "{result:?}");
                if let (true, Ok(filter)) = (expected, parsed) {
                    model.insert(
                        id,
                        Model::Rows {
                            event,
                            schema,
                            table,
                            filter,
                        },
                    );
                }
            }
            Op::Remove(id) => {
                let id = SubId::from(id);
                assert_eq!(matcher.remove(id), model.remove(&id).is_some());
            }
            Op::MatchChannel(name) => {
                let mut got = Vec::new();
                match matcher.match_channel(&name, &mut got) {
                    Ok(()) => {
                        got.sort_unstable();
                        let expected: Vec<SubId> = model
                            .iter()
                            .filter(|(_, m)| {
                                matches!(m, Model::Channel(p) if pattern_matches(p, &name))
                            })
                            .map(|(id, _)| *id)
                            .collect();
                        assert_eq!(got, expected, "{name:?}");
                    }
                    Err(e) => {
                        assert!(check_channel(&name, false).is_err());
                        assert!(e.position <= chars(&name));
                    }
                }
            }
            Op::MatchRow {
                kind,
                schema,
                table,
                record,
                old_record,
            } => {
                let event = RowEvent {
                    kind: kind.change(),
                    schema: schema.into(),
                    table: table.into(),
                    record: record.as_deref().map(row),
                    old_record: old_record.as_deref().map(row),
                };
                let mut got = Vec::new();
                matcher.match_row(&event, &mut got);
                got.sort_unstable();
                let empty = Row::new();
                let filtered = event.filtered_row().unwrap_or(&empty);
                let expected: Vec<SubId> = model
                    .iter()
                    .filter(|(_, m)| match m {
                        Model::Rows {
                            event: ev,
                            schema,
                            table,
                            filter,
                        } => wants(ev, schema, table, &event) && filter.matches(filtered),
                        Model::Channel(_) => false,
                    })
                    .map(|(id, _)| *id)
                    .collect();
                assert_eq!(got, expected, "{event:?}");
            }
        }
        assert_eq!(matcher.len(), model.len());
    }
    let stats = matcher.stats();
    assert_eq!(
        stats.channel_subscriptions + stats.row_subscriptions,
        model.len()
    );
});
