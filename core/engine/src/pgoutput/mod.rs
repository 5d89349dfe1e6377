//! The pgoutput decoder: one logical replication message in, one decoded message out
//! (docs/pgoutput.md). Sans-IO: the caller reads the stream and strips the XLogData header.
//!
//! Protocol version 1. The decoder keeps the state the protocol needs: the relations and
//! types announced so far, and the transaction being streamed (its commit time is stamped on
//! every change). Row changes become the matcher's [`RowEvent`] and the Supabase-shaped JSON
//! payload directly, without going through per-column objects anywhere else.

pub mod encode;
mod reader;
mod value;

use std::fmt;
use std::sync::Arc;

use ahash::AHashMap;

use crate::matcher::{ChangeKind, Row, RowEvent, Value};
use reader::{Reader, Result};
pub use value::{
    builtin_type, format_commit_time, is_json, is_json_number, iso_timestamp, iso_timetz,
    match_value, numeric_value, parse_array, write_commit_time, write_json_string,
    write_value_json, Scalar, ValueKind, BUILTIN_TYPES,
};

/// Malformed or truncated bytes: what went wrong and at which byte offset of the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    pub reason: String,
    pub offset: usize,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at byte {})", self.reason, self.offset)
    }
}

impl std::error::Error for DecodeError {}

/// `B`: a transaction starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Begin {
    pub final_lsn: u64,
    /// Microseconds since 2000-01-01 00:00 UTC.
    pub commit_time: i64,
    pub xid: u32,
}

/// `C`: the transaction committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: u64,
    pub end_lsn: u64,
    pub commit_time: i64,
}

/// `O`: the transaction came from another replication origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub commit_lsn: u64,
    pub name: Box<str>,
}

/// One column of a relation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Bit 1: part of the replica identity key.
    pub flags: u8,
    pub name: Box<str>,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// The type's name: built in, from a Type message seen before the relation, or the OID.
    pub type_name: Box<str>,
    pub kind: ValueKind,
    /// `"name":`, escaped once for every payload.
    json_key: Box<[u8]>,
}

impl Column {
    pub fn is_key(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// `R`: a table's shape, sent before its first change in each session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub relid: u32,
    /// The schema (`pg_catalog` where the wire has an empty string).
    pub namespace: Box<str>,
    pub name: Box<str>,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
    /// `"schema":..,"table":..` and `"columns":[..]` of the payload, encoded once.
    json_names: Box<[u8]>,
    json_columns: Box<[u8]>,
}

/// `Y`: a type that is not built in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeInfo {
    pub type_oid: u32,
    pub namespace: Box<str>,
    pub name: Box<str>,
}

/// One column value of a tuple.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Datum {
    Null,
    /// An unchanged TOASTed value: Postgres did not send it.
    Unchanged,
    Text(Box<str>),
}

/// Which old tuple a change carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: the replica identity key columns (others are null on the wire).
    Key,
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full,
}

/// `I`, `U` or `D`: a row change.
#[derive(Clone, Debug, PartialEq)]
pub struct RowChange {
    pub kind: ChangeKind,
    pub relation: Arc<Relation>,
    pub old_kind: Option<OldTuple>,
    pub old: Option<Vec<Datum>>,
    pub new: Option<Vec<Datum>>,
    /// The enclosing transaction, if a Begin was decoded before this change.
    pub transaction: Option<Begin>,
}

/// `T`: tables were truncated.
#[derive(Clone, Debug, PartialEq)]
pub struct Truncate {
    /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
    pub options: u8,
    pub relations: Vec<Arc<Relation>>,
}

/// `M`: a message from `pg_logical_emit_message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Bit 1: transactional.
    pub flags: u8,
    pub lsn: u64,
    pub prefix: Box<str>,
    pub content: Box<[u8]>,
}

impl LogicalMessage {
    pub fn transactional(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// One decoded message.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Arc<Relation>),
    Type(TypeInfo),
    Change(RowChange),
    Truncate(Truncate),
    Message(LogicalMessage),
    /// A tag this decoder does not know (protocol v2 stream messages among them): skip it.
    Unknown(u8),
}

/// Decodes the messages of one replication session, in order.
#[derive(Debug, Default)]
pub struct Decoder {
    relations: AHashMap<u32, Arc<Relation>>,
    types: AHashMap<u32, TypeInfo>,
    transaction: Option<Begin>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets relations, types and the open transaction (for a new session).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    pub fn relation(&self, relid: u32) -> Option<&Arc<Relation>> {
        self.relations.get(&relid)
    }

    pub fn type_info(&self, oid: u32) -> Option<&TypeInfo> {
        self.types.get(&oid)
    }

    /// The transaction between the last Begin and its Commit.
    pub fn transaction(&self) -> Option<Begin> {
        self.transaction
    }

    /// Decodes one message. On error nothing about the decoder changes.
    pub fn decode(&mut self, payload: &[u8]) -> std::result::Result<Message, DecodeError> {
        let mut r = Reader::new(payload);
        if payload.is_empty() {
            return Err(r.error(0, "empty message"));
        }
        let tag = r.u8("message type")?;
        let message = match tag {
            b'B' => {
                let begin = Begin {
                    final_lsn: r.u64("final LSN")?,
                    commit_time: r.i64("commit timestamp")?,
                    xid: r.u32("xid")?,
                };
                r.finish()?;
                self.transaction = Some(begin);
                Message::Begin(begin)
            }
            b'C' => {
                let commit = Commit {
                    flags: r.u8("flags")?,
                    commit_lsn: r.u64("commit LSN")?,
                    end_lsn: r.u64("end LSN")?,
                    commit_time: r.i64("commit timestamp")?,
                };
                r.finish()?;
                self.transaction = None;
                Message::Commit(commit)
            }
            b'O' => {
                let origin = Origin {
                    commit_lsn: r.u64("commit LSN")?,
                    name: r.cstr("origin name")?.into(),
                };
                r.finish()?;
                Message::Origin(origin)
            }
            b'R' => {
                let relation = Arc::new(self.read_relation(&mut r)?);
                r.finish()?;
                self.relations.insert(relation.relid, relation.clone());
                Message::Relation(relation)
            }
            b'Y' => {
                let info = TypeInfo {
                    type_oid: r.u32("type id")?,
                    namespace: namespace(r.cstr("namespace")?),
                    name: r.cstr("type name")?.into(),
                };
                r.finish()?;
                self.types.insert(info.type_oid, info.clone());
                Message::Type(info)
            }
            b'I' | b'U' | b'D' => {
                let change = self.read_change(tag, &mut r)?;
                r.finish()?;
                Message::Change(change)
            }
            b'T' => {
                let count = r.count(true, "relation count")?;
                let options = r.u8("options")?;
                let mut relations = Vec::with_capacity(count.min(r.remaining() / 4));
                for _ in 0..count {
                    relations.push(self.read_relid(&mut r)?);
                }
                r.finish()?;
                Message::Truncate(Truncate { options, relations })
            }
            b'M' => {
                let flags = r.u8("flags")?;
                let lsn = r.u64("message LSN")?;
                let prefix = r.cstr("prefix")?.into();
                let len = r.count(true, "content length")?;
                let content = r.bytes(len, "content")?.into();
                r.finish()?;
                Message::Message(LogicalMessage {
                    flags,
                    lsn,
                    prefix,
                    content,
                })
            }
            other => Message::Unknown(other),
        };
        Ok(message)
    }

    fn read_relation(&self, r: &mut Reader<'_>) -> Result<Relation> {
        let relid = r.u32("relation id")?;
        let namespace = namespace(r.cstr("namespace")?);
        let name = r.cstr("relation name")?;
        let replica_identity = r.u8("replica identity")?;
        let count = r.count(false, "column count")?;
        let mut columns = Vec::with_capacity(count.min(r.remaining() / 10));
        for _ in 0..count {
            let flags = r.u8("column flags")?;
            let name: Box<str> = r.cstr("column name")?.into();
            let type_oid = r.u32("column type")?;
            let type_modifier = r.i32("column type modifier")?;
            let (type_name, kind) = match builtin_type(type_oid) {
                Some((name, kind)) => (name.into(), kind),
                None => {
                    let name = match self.types.get(&type_oid) {
                        Some(t) => t.name.clone(),
                        None => type_oid.to_string().into(),
                    };
                    (name, ValueKind::Scalar(Scalar::Text))
                }
            };
            let mut json_key = Vec::with_capacity(name.len() + 3);
            write_json_string(&mut json_key, &name);
            json_key.push(b':');
            columns.push(Column {
                flags,
                name,
                type_oid,
                type_modifier,
                type_name,
                kind,
                json_key: json_key.into(),
            });
        }
        let mut json_names = b"{\"schema\":".to_vec();
        write_json_string(&mut json_names, &namespace);
        json_names.extend_from_slice(b",\"table\":");
        write_json_string(&mut json_names, name);
        let mut json_columns = b",\"columns\":[".to_vec();
        for (i, column) in columns.iter().enumerate() {
            if i > 0 {
                json_columns.push(b',');
            }
            json_columns.extend_from_slice(b"{\"name\":");
            write_json_string(&mut json_columns, &column.name);
            json_columns.extend_from_slice(b",\"type\":");
            write_json_string(&mut json_columns, &column.type_name);
            json_columns.push(b'}');
        }
        json_columns.push(b']');
        Ok(Relation {
            relid,
            namespace,
            name: name.into(),
            replica_identity,
            columns,
            json_names: json_names.into(),
            json_columns: json_columns.into(),
        })
    }

    fn read_relid(&self, r: &mut Reader<'_>) -> Result<Arc<Relation>> {
        let at = r.pos;
        let relid = r.u32("relation id")?;
        match self.relations.get(&relid) {
            Some(rel) => Ok(rel.clone()),
            None => Err(r.error(at, format!("unknown relation id {relid}"))),
        }
    }

    fn read_change(&self, tag: u8, r: &mut Reader<'_>) -> Result<RowChange> {
        let relation = self.read_relid(r)?;
        let kind = match tag {
            b'I' => ChangeKind::Insert,
            b'U' => ChangeKind::Update,
            _ => ChangeKind::Delete,
        };
        let mut old_kind = None;
        let mut old = None;
        let mut new = None;
        let at = r.pos;
        let mut tuple_kind = r.u8("tuple kind")?;
        if kind != ChangeKind::Insert && matches!(tuple_kind, b'K' | b'O') {
            old_kind = Some(if tuple_kind == b'K' {
                OldTuple::Key
            } else {
                OldTuple::Full
            });
            old = Some(read_tuple(r, &relation)?);
            if kind == ChangeKind::Update {
                let at = r.pos;
                tuple_kind = r.u8("tuple kind")?;
                if tuple_kind != b'N' {
                    return Err(r.error(at, unexpected_tuple("'N'", tuple_kind)));
                }
            }
        } else {
            let expected = match kind {
                ChangeKind::Insert => "'N'",
                ChangeKind::Update => "'K', 'O' or 'N'",
                ChangeKind::Delete => "'K' or 'O'",
            };
            if tuple_kind != b'N' || kind == ChangeKind::Delete {
                return Err(r.error(at, unexpected_tuple(expected, tuple_kind)));
            }
        }
        if kind != ChangeKind::Delete {
            new = Some(read_tuple(r, &relation)?);
        }
        Ok(RowChange {
            kind,
            relation,
            old_kind,
            old,
            new,
            transaction: self.transaction,
        })
    }
}

fn namespace(wire: &str) -> Box<str> {
    if wire.is_empty() { "pg_catalog" } else { wire }.into()
}

fn unexpected_tuple(expected: &str, got: u8) -> String {
    format!("expected tuple kind {expected}, got 0x{got:02x}")
}

fn read_tuple(r: &mut Reader<'_>, relation: &Relation) -> Result<Vec<Datum>> {
    let at = r.pos;
    let count = r.count(false, "column count")?;
    if count != relation.columns.len() {
        return Err(r.error(
            at,
            format!(
                "tuple has {count} columns, relation {}.{} has {}",
                relation.namespace,
                relation.name,
                relation.columns.len()
            ),
        ));
    }
    let mut datums = Vec::with_capacity(count);
    for _ in 0..count {
        let at = r.pos;
        datums.push(match r.u8("column kind")? {
            b'n' => Datum::Null,
            b'u' => Datum::Unchanged,
            b't' => {
                let len = r.count(true, "column value length")?;
                let at = r.pos;
                let bytes = r.bytes(len, "column value")?;
                Datum::Text(r.utf8(at, bytes, "column value")?.into())
            }
            b'b' => return Err(r.error(at, "binary tuple data is not supported")),
            other => return Err(r.error(at, format!("unknown column kind 0x{other:02x}"))),
        });
    }
    Ok(datums)
}

/// The size of a JSON value past which an oversized payload leaves it out (Supabase's rule).
pub const SMALL_FIELD_BYTES: usize = 64;

/// Why a payload lost its large fields.
pub const PAYLOAD_TOO_LARGE: &str = "Error 413: Payload Too Large";

impl RowChange {
    pub fn schema(&self) -> &str {
        &self.relation.namespace
    }

    pub fn table(&self) -> &str {
        &self.relation.name
    }

    /// The value of the new row's column `i`: an unchanged TOAST value is taken from the old
    /// tuple when that has it, else it is absent (`None`).
    fn new_datum(&self, i: usize) -> Option<&Datum> {
        let datum = &self.new.as_ref()?[i];
        if *datum != Datum::Unchanged {
            return Some(datum);
        }
        self.old_datum(i).filter(|d| matches!(d, Datum::Text(_)))
    }

    /// The value of the old row's column `i`, absent for unchanged TOAST values and for the
    /// columns a key tuple does not carry.
    fn old_datum(&self, i: usize) -> Option<&Datum> {
        let datum = &self.old.as_ref()?[i];
        let carried = match self.old_kind {
            Some(OldTuple::Key) => self.relation.columns[i].is_key(),
            _ => true,
        };
        (carried && *datum != Datum::Unchanged).then_some(datum)
    }

    fn row<'a>(&'a self, datum: impl Fn(usize) -> Option<&'a Datum>) -> Row {
        let columns = &self.relation.columns;
        let mut row = Row::with_capacity(columns.len());
        for (i, column) in columns.iter().enumerate() {
            let value = match datum(i) {
                None => continue,
                Some(Datum::Null) => Value::Null,
                Some(Datum::Text(text)) => match_value(column.kind, text),
                Some(Datum::Unchanged) => unreachable!("unchanged values are left out"),
            };
            row.set(&column.name, value);
        }
        row
    }

    /// The new row as the matcher sees it (INSERT and UPDATE).
    pub fn record(&self) -> Option<Row> {
        self.new.as_ref()?;
        Some(self.row(|i| self.new_datum(i)))
    }

    /// The old row as the matcher sees it: the key or the full old row, when sent.
    pub fn old_record(&self) -> Option<Row> {
        self.old.as_ref()?;
        Some(self.row(|i| self.old_datum(i)))
    }

    /// The change as the matcher takes it.
    pub fn row_event(&self) -> RowEvent {
        RowEvent {
            kind: self.kind,
            schema: self.schema().into(),
            table: self.table().into(),
            record: self.record(),
            old_record: self.old_record(),
        }
    }

    /// The commit time as `YYYY-MM-DDTHH:MM:SS.mmmZ`, if the change is in a transaction.
    pub fn commit_timestamp(&self) -> Option<String> {
        self.transaction.map(|t| format_commit_time(t.commit_time))
    }

    /// The Supabase `postgres_changes` payload (docs/pgoutput.md, "JSON payload"). Over
    /// `max_bytes`, record and old_record keep only values of at most [`SMALL_FIELD_BYTES`]
    /// and `errors` says so; the result may still exceed `max_bytes` then.
    pub fn to_json(&self, max_bytes: Option<usize>) -> Vec<u8> {
        let full = self.write_json(None);
        match max_bytes {
            Some(limit) if full.len() > limit => {
                self.write_json(Some((SMALL_FIELD_BYTES, PAYLOAD_TOO_LARGE)))
            }
            _ => full,
        }
    }

    fn write_json(&self, small: Option<(usize, &str)>) -> Vec<u8> {
        let rel = &self.relation;
        let text_len = |t: &Option<Vec<Datum>>| {
            t.iter()
                .flatten()
                .map(|d| match d {
                    Datum::Text(t) => t.len() + 8,
                    _ => 5,
                })
                .sum::<usize>()
        };
        let keys: usize = rel.columns.iter().map(|c| c.json_key.len()).sum();
        let estimate = rel.json_names.len()
            + rel.json_columns.len()
            + 2 * keys
            + text_len(&self.new)
            + text_len(&self.old)
            + 128;
        let mut out = Vec::with_capacity(estimate);
        out.extend_from_slice(&rel.json_names);
        out.extend_from_slice(b",\"commit_timestamp\":");
        match self.transaction {
            Some(t) => {
                out.push(b'"');
                write_commit_time(&mut out, t.commit_time);
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"type\":\"");
        out.extend_from_slice(self.kind.name().as_bytes());
        out.push(b'"');
        out.extend_from_slice(&rel.json_columns);
        let limit = small.map(|(n, _)| n);
        if self.kind != ChangeKind::Delete {
            out.extend_from_slice(b",\"record\":");
            self.write_row(&mut out, limit, |i| self.new_datum(i));
        }
        if self.kind != ChangeKind::Insert {
            out.extend_from_slice(b",\"old_record\":");
            self.write_row(&mut out, limit, |i| self.old_datum(i));
        }
        out.extend_from_slice(b",\"errors\":");
        match small {
            Some((_, why)) => write_json_string(&mut out, why),
            None => out.extend_from_slice(b"null"),
        }
        out.push(b'}');
        out
    }

    fn write_row<'a>(
        &'a self,
        out: &mut Vec<u8>,
        limit: Option<usize>,
        datum: impl Fn(usize) -> Option<&'a Datum>,
    ) {
        out.push(b'{');
        let mut first = true;
        for (i, column) in self.relation.columns.iter().enumerate() {
            let Some(datum) = datum(i) else { continue };
            let member = out.len();
            if !first {
                out.push(b',');
            }
            out.extend_from_slice(&column.json_key);
            let value = out.len();
            match datum {
                Datum::Null => out.extend_from_slice(b"null"),
                Datum::Text(text) => write_value_json(out, column.kind, text),
                Datum::Unchanged => unreachable!("unchanged values are left out"),
            }
            if limit.is_some_and(|n| out.len() - value > n) {
                out.truncate(member);
                continue;
            }
            first = false;
        }
        out.push(b'}');
    }
}

#[cfg(test)]
mod tests;
