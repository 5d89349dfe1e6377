//! The index of row-change subscriptions for one `(schema, table)` group: an equality index
//! per column, a scan list, and the unfiltered subscriptions.

use ahash::AHashMap;

use super::filter::{Condition, Filter};
use super::subset::SubSet;
use super::value::{number_key, Literal, Row, Value};

pub const INSERT: u8 = 1;
pub const UPDATE: u8 = 2;
pub const DELETE: u8 = 4;
pub const ANY_EVENT: u8 = INSERT | UPDATE | DELETE;

/// A row-change subscription, compiled.
#[derive(Debug)]
pub(crate) struct RowSubscription {
    pub(crate) events: u8,
    pub(crate) schema: Box<str>,
    pub(crate) table: Box<str>,
    pub(crate) filter: Filter,
    /// The condition filed in the equality index, if any.
    pub(crate) indexed: Option<usize>,
}

impl RowSubscription {
    pub(crate) fn wants(&self, event: u8, row: &Row) -> bool {
        self.events & event != 0 && self.filter.matches(row)
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
    /// The one key a row value is looked up under (`None` for null: equality is unknown).
    fn of_value(value: &'a Value) -> Option<Self> {
        match value {
            Value::Null => None,
            Value::Bool(b) => Some(Key::Bool(*b)),
            Value::Int(i) => Some(Key::Number(number_key(*i as f64))),
            Value::Float(f) => Some(Key::Number(number_key(*f))),
            Value::Text(s) => Some(Key::Text(s)),
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
    fn insert(&mut self, key: Key<'_>, slot: u32) {
        match key {
            Key::Text(s) => self.text.entry(s.into()).or_default().insert(slot),
            Key::Number(n) => self.number.entry(n).or_default().insert(slot),
            Key::Bool(b) => self.boolean[b as usize].insert(slot),
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
        self.text.is_empty()
            && self.number.is_empty()
            && self.boolean.iter().all(SubSet::is_empty)
    }
}

/// The subscriptions of one `(schema, table)` pair (either may be `*`).
#[derive(Default, Debug)]
pub(crate) struct Group {
    unfiltered: SubSet,
    scan: SubSet,
    columns: AHashMap<Box<str>, ColumnIndex>,
}

impl Group {
    pub(crate) fn insert(&mut self, sub: &RowSubscription, slot: u32) {
        match sub.indexed {
            Some(i) => {
                let condition: &Condition = &sub.filter.conditions[i];
                let literals = condition.index_literals().expect("indexed conditions have literals");
                let column = self.columns.entry(condition.column.clone()).or_default();
                for key in Key::of_literals(literals) {
                    column.insert(key, slot);
                }
            }
            None if sub.filter.conditions.is_empty() => self.unfiltered.insert(slot),
            None => self.scan.insert(slot),
        }
    }

    pub(crate) fn remove(&mut self, sub: &RowSubscription, slot: u32) {
        match sub.indexed {
            Some(i) => {
                let condition = &sub.filter.conditions[i];
                let literals = condition.index_literals().expect("indexed conditions have literals");
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

    /// Calls `found` with every slot of this group that wants `event` on `row`.
    pub(crate) fn collect<'s>(
        &self,
        event: u8,
        row: &Row,
        sub_at: impl Fn(u32) -> &'s RowSubscription,
        found: &mut impl FnMut(u32),
    ) {
        self.unfiltered.for_each(&mut |slot| {
            if sub_at(slot).events & event != 0 {
                found(slot);
            }
        });
        let mut check = |slot: u32| {
            if sub_at(slot).wants(event, row) {
                found(slot);
            }
        };
        for (column, index) in &self.columns {
            let bucket = row.get(column).and_then(Key::of_value).and_then(|k| index.lookup(k));
            if let Some(bucket) = bucket {
                bucket.for_each(&mut check);
            }
        }
        self.scan.for_each(&mut check);
    }

    pub(crate) fn scan_len(&self) -> usize {
        self.scan.len()
    }
}
