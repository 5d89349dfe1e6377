//! The subscription matcher: which subscriptions want this event? (docs/matcher.md)

mod channel;
mod error;
mod filter;
mod rows;
mod subset;
mod value;

use std::fmt;

use ahash::AHashMap;
use slab::Slab;

pub use channel::{check_channel, MAX_CHANNEL_BYTES, SEPARATOR};
pub use error::{ChannelNameError, FilterError, PositionedError};
pub use filter::{Condition, Filter, IsValue, Operator, Test};
pub use rows::{ANY_EVENT, DELETE, INSERT, UPDATE};
pub use value::{parse_bool, parse_int, parse_number, LikePattern, Literal, Row, Value};

use channel::TrieNode;
use rows::{Group, RowSubscription};

/// The caller's name for a subscription.
pub type SubId = u64;

/// The kind of a row change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    Insert,
    Update,
    Delete,
}

impl ChangeKind {
    /// `INSERT`, `UPDATE` or `DELETE`, any case.
    pub fn parse(name: &str) -> Option<Self> {
        if name.eq_ignore_ascii_case("INSERT") {
            Some(Self::Insert)
        } else if name.eq_ignore_ascii_case("UPDATE") {
            Some(Self::Update)
        } else if name.eq_ignore_ascii_case("DELETE") {
            Some(Self::Delete)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Insert => "INSERT",
            Self::Update => "UPDATE",
            Self::Delete => "DELETE",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Self::Insert => INSERT,
            Self::Update => UPDATE,
            Self::Delete => DELETE,
        }
    }
}

/// One row change, as sources hand it to the matcher.
#[derive(Clone, Debug, PartialEq)]
pub struct RowEvent {
    pub kind: ChangeKind,
    pub schema: Box<str>,
    pub table: Box<str>,
    pub record: Option<Row>,
    pub old_record: Option<Row>,
}

impl RowEvent {
    /// The row filters are evaluated on: the new row, or the old one for a DELETE.
    pub fn filtered_row(&self) -> Option<&Row> {
        match self.kind {
            ChangeKind::Delete => self.old_record.as_ref(),
            _ => self.record.as_ref(),
        }
    }
}

/// Why a subscription could not be added.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddError {
    DuplicateId(SubId),
    Channel(ChannelNameError),
    Filter(FilterError),
}

impl fmt::Display for AddError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DuplicateId(id) => write!(f, "subscription id {id} is already in use"),
            Self::Channel(e) => e.fmt(f),
            Self::Filter(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for AddError {}

/// A stored subscription. Its id is kept in the index buckets and the slot map, where
/// matching and removal look for it.
#[derive(Debug)]
enum Subscription {
    Channel(Box<str>),
    Rows(RowSubscription),
}

/// Sizes of the matcher's structures, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MatcherStats {
    pub channel_subscriptions: usize,
    pub row_subscriptions: usize,
    pub trie_nodes: usize,
    pub row_groups: usize,
    pub scanned_row_subscriptions: usize,
}

/// Every subscription of a hub, indexed for matching.
#[derive(Debug, Default)]
pub struct Matcher {
    subs: Slab<Subscription>,
    slots: AHashMap<SubId, u32>,
    channels: TrieNode,
    /// schema -> table -> group slot; `*` is a key of its own at either level.
    group_slots: AHashMap<Box<str>, AHashMap<Box<str>, u32>>,
    groups: Slab<Group>,
    row_count: usize,
}

impl Matcher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.subs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    pub fn contains(&self, id: SubId) -> bool {
        self.slots.contains_key(&id)
    }

    fn store(&mut self, id: SubId, sub: Subscription) -> u32 {
        let slot = self.subs.insert(sub);
        let slot = u32::try_from(slot).expect("fewer than 2**32 subscriptions");
        self.slots.insert(id, slot);
        slot
    }

    /// Subscribes `id` to channels matching `pattern`.
    pub fn add_channel(&mut self, id: SubId, pattern: &str) -> Result<(), AddError> {
        if self.contains(id) {
            return Err(AddError::DuplicateId(id));
        }
        check_channel(pattern, true).map_err(AddError::Channel)?;
        let slot = self.store(id, Subscription::Channel(pattern.into()));
        self.channels
            .insert(pattern, subset::Member { slot, flags: 0, id });
        Ok(())
    }

    /// Subscribes `id` to row changes. `event` is INSERT, UPDATE, DELETE or `*`; `schema` and
    /// `table` are names or `*`; `filter` follows docs/matcher.md.
    pub fn add_rows(
        &mut self,
        id: SubId,
        event: &str,
        schema: &str,
        table: &str,
        filter: Option<&str>,
    ) -> Result<(), AddError> {
        if self.contains(id) {
            return Err(AddError::DuplicateId(id));
        }
        let fail = |reason: String| {
            AddError::Filter(FilterError {
                reason,
                position: 0,
            })
        };
        let events = match ChangeKind::parse(event) {
            Some(kind) => kind.bit(),
            None if event == "*" => ANY_EVENT,
            None => return Err(fail(format!("unknown event '{event}'"))),
        };
        if schema.is_empty() {
            return Err(fail("empty schema".into()));
        }
        if table.is_empty() {
            return Err(fail("empty table".into()));
        }
        let filter = Filter::parse(filter.unwrap_or(""))
            .map_err(AddError::Filter)?
            .without_repeats();
        let tables = self.group_slots.entry(schema.into()).or_default();
        let group = match tables.get(table) {
            Some(g) => *g,
            None => {
                let g = self.groups.insert(Group::new(schema, table)) as u32;
                tables.insert(table.into(), g);
                g
            }
        };
        let filed = &self.groups[group as usize];
        let indexed = filter.index_condition(|c| filed.crowd(c)).map(|i| i as u32);
        let sub = RowSubscription {
            events,
            group,
            indexed,
            filter,
        };
        let slot = u32::try_from(self.subs.vacant_key()).expect("fewer than 2**32 subscriptions");
        self.groups[group as usize].insert(&sub, sub.member(id, slot));
        let stored = self.store(id, Subscription::Rows(sub));
        debug_assert_eq!(stored, slot);
        self.row_count += 1;
        Ok(())
    }

    /// Removes `id`, freeing every index entry it held. Returns whether it was present.
    pub fn remove(&mut self, id: SubId) -> bool {
        let Some(slot) = self.slots.remove(&id) else {
            return false;
        };
        match &self.subs.remove(slot as usize) {
            Subscription::Channel(pattern) => self.channels.remove(pattern, slot),
            Subscription::Rows(rows) => {
                self.row_count -= 1;
                let group = &mut self.groups[rows.group as usize];
                group.remove(rows, slot);
                if group.is_empty() {
                    let group = self.groups.remove(rows.group as usize);
                    if let Some(tables) = self.group_slots.get_mut(&group.schema) {
                        tables.remove(&group.table);
                        if tables.is_empty() {
                            self.group_slots.remove(&group.schema);
                        }
                    }
                }
            }
        }
        if self.subs.is_empty() {
            // Let go of the slab's and map's capacity once everything is gone.
            self.subs = Slab::new();
            self.slots = AHashMap::default();
        }
        true
    }

    /// Appends to `out` the ids of channel subscriptions matching the concrete name `channel`.
    pub fn match_channel(
        &self,
        channel: &str,
        out: &mut Vec<SubId>,
    ) -> Result<(), ChannelNameError> {
        check_channel(channel, false)?;
        let segments: Vec<&str> = channel.split(SEPARATOR).collect();
        self.channels.collect(&segments, &mut |m| out.push(m.id));
        Ok(())
    }

    /// Appends to `out` the ids of row subscriptions that want `event`.
    pub fn match_row(&self, event: &RowEvent, out: &mut Vec<SubId>) {
        static EMPTY: Row = Row::EMPTY;
        let row = event.filtered_row().unwrap_or(&EMPTY);
        let bit = event.kind.bit();
        let sub_at = |slot: u32| match &self.subs[slot as usize] {
            Subscription::Rows(r) => r,
            Subscription::Channel(_) => unreachable!("row groups hold row subscriptions"),
        };
        let mut found = |id: SubId| out.push(id);
        for schema in wildcard_keys(&event.schema) {
            let Some(tables) = self.group_slots.get(schema) else {
                continue;
            };
            for table in wildcard_keys(&event.table) {
                if let Some(g) = tables.get(table) {
                    self.groups[*g as usize].collect(bit, row, sub_at, &mut found);
                }
            }
        }
    }

    pub fn stats(&self) -> MatcherStats {
        MatcherStats {
            channel_subscriptions: self.subs.len() - self.row_count,
            row_subscriptions: self.row_count,
            trie_nodes: self.channels.node_count(),
            row_groups: self.groups.len(),
            scanned_row_subscriptions: self.groups.iter().map(|(_, g)| g.scan_len()).sum(),
        }
    }
}

/// The exact name and `*`, once each (a table may really be called `*`).
fn wildcard_keys(name: &str) -> impl Iterator<Item = &str> {
    std::iter::once(name).chain((name != "*").then_some("*"))
}

#[cfg(test)]
mod tests;
