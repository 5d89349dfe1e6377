//! The index of row-change subscriptions for one `(schema, table)` group: an equality index
//! per column, a scan list, and the unfiltered subscriptions.

use ahash::AHashMap;

use super::filter::{Condition, Filter};
use super::subset::{Member, SubSet, EXACT};
use super::value::{number_key, Literal, Row, Value};

pub const INSERT: u8 = 1;
pub const UPDATE: u8 = 2;
pub const DELETE: u8 = 4;
pub const ANY_EVENT: u8 = INSERT | UPDATE | DELETE;

/// A row-change subscription, compiled.
#[derive(Debug)]
pub(crate) struct RowSubscription {
    pub(crate) events: u8,
    /// The group (schema, table) it is filed in; the group keeps the names.
    pub(crate) group: u32,
    /// The condition filed in the equality index, if any.
    pub(crate) indexed: Option<u32>,
    pub(crate) filter: Filter,
}

impl RowSubscription {
    /// How this subscription is filed in index buckets.
    pub(crate) fn member(&self, id: u64, slot: u32) -> Member {
        let exact = self.indexed.is_some() && self.filter.conditions.len() == 1;
        Member {
            slot,
            id,
            flags: self.events | if exact { EXACT } else { 0 },
        }
    }
}

impl RowSubscription {
    /// Whether `row` passes the filter, found under the indexed condition's bucket: with
    /// `exact` (the row value's key proves equality) that condition is not evaluated again.
    fn rest_matches(&self, row: &Row, exact: bool) -> bool {
        let skip = if exact { self.indexed } else { None };
        self.filter
            .conditions
            .iter()
            .enumerate()
            .all(|(i, c)| Some(i as u32) == skip || c.evaluate(row) == Some(true))
    }
}

/// One hash key a literal or a row value can be filed or looked up under.
#[derive(Clone, Copy, PartialEq)]
enum Key<'a> {
    Text(&'a str),
    Number(u64),
    Bool(bool),
}

impl<'a> Key<'a> {
    /// The one key a row value is looked up under (`None` for null: equality is unknown),
    /// and whether a hit under it means the value equals the literal ("exact").
    ///
    /// Text, booleans and floats are exact. An integer is looked up by its float value, exact
    /// only below 2**53 where that conversion is: above it, `9007199254740993` and the literal
    /// `9007199254740992` share a key but differ.
    fn of_value(value: &'a Value) -> Option<(Self, bool)> {
        match value {
            Value::Null => None,
            Value::Bool(b) => Some((Key::Bool(*b), true)),
            Value::Int(i) => Some((
                Key::Number(number_key(*i as f64)),
                i.unsigned_abs() < 1 << 53,
            )),
            Value::Float(f) => Some((Key::Number(number_key(*f)), true)),
            Value::Text(s) => Some((Key::Text(s), true)),
        }
    }

    /// Every key under which a row value equal to one of `literals` may be looked up.
    ///
    /// A superset is fine (candidates are re-checked); missing one is not. Integers are
    /// looked up by their float value, which is lossy above 2**53 but never misses: an
    /// integer equal to a literal rounds to the same float as that literal.
    fn of_literals(literals: &'a [Literal]) -> Vec<Key<'a>> {
        let mut keys = Vec::with_capacity(literals.len() * 2);
        let mut add = |k: Key<'a>| {
            if !keys.contains(&k) {
                keys.push(k);
            }
        };
        for literal in literals {
            add(Key::Text(&literal.text));
            if let Some(x) = literal.num {
                add(Key::Number(number_key(x)));
            }
            if let Some(b) = literal.boolean {
                add(Key::Bool(b));
            }
        }
        keys
    }
}

/// Equality index of one column: literal -> subscriptions.
#[derive(Default, Debug)]
struct ColumnIndex {
    text: AHashMap<Box<str>, SubSet>,
    number: AHashMap<u64, SubSet>,
    boolean: [SubSet; 2],
}

impl ColumnIndex {
    fn insert(&mut self, key: Key<'_>, member: Member) {
        match key {
            Key::Text(s) => self.text.entry(s.into()).or_default().insert(member),
            Key::Number(n) => self.number.entry(n).or_default().insert(member),
            Key::Bool(b) => self.boolean[b as usize].insert(member),
        }
    }

    fn remove(&mut self, key: Key<'_>, slot: u32) {
        match key {
            Key::Text(s) => {
                if let Some(set) = self.text.get_mut(s) {
                    set.remove(slot);
                    if set.is_empty() {
                        self.text.remove(s);
                    }
                }
            }
            Key::Number(n) => {
                if let Some(set) = self.number.get_mut(&n) {
                    set.remove(slot);
                    if set.is_empty() {
                        self.number.remove(&n);
                    }
                }
            }
            Key::Bool(b) => {
                self.boolean[b as usize].remove(slot);
            }
        }
    }

    fn lookup(&self, key: Key<'_>) -> Option<&SubSet> {
        match key {
            Key::Text(s) => self.text.get(s),
            Key::Number(n) => self.number.get(&n),
            Key::Bool(b) => Some(&self.boolean[b as usize]),
        }
    }

    fn is_empty(&self) -> bool {
        self.text.is_empty() && self.number.is_empty() && self.boolean.iter().all(SubSet::is_empty)
    }
}

/// The subscriptions of one `(schema, table)` pair (either may be `*`).
#[derive(Default, Debug)]
pub(crate) struct Group {
    pub(crate) schema: Box<str>,
    pub(crate) table: Box<str>,
    unfiltered: SubSet,
    scan: SubSet,
    columns: AHashMap<Box<str>, ColumnIndex>,
}

impl Group {
    pub(crate) fn new(schema: &str, table: &str) -> Self {
        Self {
            schema: schema.into(),
            table: table.into(),
            ..Self::default()
        }
    }

    /// How many subscriptions are filed under `condition`'s literals in this group now
    /// (an upper bound: a subscription under several of them counts for each).
    pub(crate) fn crowd(&self, condition: &Condition) -> usize {
        let (Some(literals), Some(column)) = (
            condition.index_literals(),
            self.columns.get(&condition.column),
        ) else {
            return 0;
        };
        Key::of_literals(literals)
            .into_iter()
            .filter_map(|key| column.lookup(key))
            .map(SubSet::len)
            .sum()
    }

    pub(crate) fn insert(&mut self, sub: &RowSubscription, member: Member) {
        match sub.indexed {
            Some(i) => {
                let condition: &Condition = &sub.filter.conditions[i as usize];
                let literals = condition
                    .index_literals()
                    .expect("indexed conditions have literals");
                let column = self.columns.entry(condition.column.clone()).or_default();
                for key in Key::of_literals(literals) {
                    column.insert(key, member);
                }
            }
            None if sub.filter.conditions.is_empty() => self.unfiltered.insert(member),
            None => self.scan.insert(member),
        }
    }

    pub(crate) fn remove(&mut self, sub: &RowSubscription, slot: u32) {
        match sub.indexed {
            Some(i) => {
                let condition = &sub.filter.conditions[i as usize];
                let literals = condition
                    .index_literals()
                    .expect("indexed conditions have literals");
                if let Some(column) = self.columns.get_mut(&condition.column) {
                    for key in Key::of_literals(literals) {
                        column.remove(key, slot);
                    }
                    if column.is_empty() {
                        self.columns.remove(&condition.column);
                    }
                }
            }
            None if sub.filter.conditions.is_empty() => {
                self.unfiltered.remove(slot);
            }
            None => {
                self.scan.remove(slot);
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.unfiltered.is_empty() && self.scan.is_empty() && self.columns.is_empty()
    }

    /// Calls `found` with the id of every subscription of this group that wants `event` on
    /// `row`. `sub_at` is only called for candidates whose bucket cannot decide alone.
    pub(crate) fn collect<'s>(
        &self,
        event: u8,
        row: &Row,
        sub_at: impl Fn(u32) -> &'s RowSubscription,
        found: &mut impl FnMut(u64),
    ) {
        self.unfiltered.for_each(&mut |m| {
            if m.flags & event != 0 {
                found(m.id);
            }
        });
        for (column, index) in &self.columns {
            let Some((key, exact)) = row.get(column).and_then(Key::of_value) else {
                continue;
            };
            let Some(bucket) = index.lookup(key) else {
                continue;
            };
            bucket.for_each(&mut |m| {
                if m.flags & event != 0
                    && ((exact && m.flags & EXACT != 0) || sub_at(m.slot).rest_matches(row, exact))
                {
                    found(m.id);
                }
            });
        }
        self.scan.for_each(&mut |m| {
            if m.flags & event != 0 && sub_at(m.slot).filter.matches(row) {
                found(m.id);
            }
        });
    }

    pub(crate) fn scan_len(&self) -> usize {
        self.scan.len()
    }
}
