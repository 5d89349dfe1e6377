//! The pgoutput decoder, over a session of messages: raw bytes, and well-formed messages
//! (from `pgoutput::encode`) that may be damaged, so relations, types and the open
//! transaction carry from one message to the next as they do on a replication stream.
//!
//! Checked: no panic, no unbounded allocation, no hang (libFuzzer's limits); a failed decode
//! leaves the decoder as it was; every change's rows and JSON payload are produced, and the
//! payload is valid JSON (serde_json); the value functions agree with serde_json on what is
//! JSON.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pyrt_engine::pgoutput::{
    encode, format_commit_time, is_json, iso_timestamp, iso_timetz, match_value, numeric_value,
    parse_array, write_value_json, Begin, Datum, Decoder, Message, OldTuple, Relation, TypeInfo,
    ValueKind, BUILTIN_TYPES,
};

/// The first OID of the types this target announces with Type messages (not built in).
const CUSTOM_OID: u32 = 16_384;

#[derive(Arbitrary, Debug)]
enum Op {
    /// Bytes as the server might send them.
    Raw(Vec<u8>),
    /// A well-formed message, possibly damaged.
    Encoded(Encoded, Damage),
    /// A new replication session.
    Reset,
    /// A column value of some kind, decoded and written as JSON directly.
    Value(u8, String),
    /// A commit time, formatted.
    CommitTime(i64),
}

#[derive(Arbitrary, Debug)]
enum Damage {
    None,
    /// One byte replaced.
    Byte(u16, u8),
    /// Cut short.
    Truncate(u16),
    /// Trailing bytes.
    Append(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum FDatum {
    Null,
    Unchanged,
    Text(String),
}

#[derive(Arbitrary, Debug)]
struct FColumn {
    flags: u8,
    name: String,
    /// An index into the built-in types, else one of four announced types.
    type_choice: u8,
    type_modifier: i32,
}

#[derive(Arbitrary, Debug)]
enum Encoded {
    Begin(u64, i64, u32),
    Commit(u8, u64, u64, i64),
    Origin(u64, String),
    Relation {
        relid: u8,
        namespace: String,
        name: String,
        replica_identity: u8,
        columns: Vec<FColumn>,
    },
    Type(u8, String, String),
    Insert(u8, Vec<FDatum>),
    Update(u8, Option<(bool, Vec<FDatum>)>, Vec<FDatum>),
    Delete(u8, bool, Vec<FDatum>),
    Truncate(u8, Vec<u8>),
    Message(u8, u64, String, Vec<u8>),
}

fn type_oid(choice: u8) -> u32 {
    match BUILTIN_TYPES.get(usize::from(choice)) {
        Some((oid, _, _)) => *oid,
        None => CUSTOM_OID + u32::from(choice % 4),
    }
}

fn kind_of(choice: u8) -> ValueKind {
    BUILTIN_TYPES[usize::from(choice) % BUILTIN_TYPES.len()].2
}

fn datums(values: &[FDatum]) -> Vec<Datum> {
    values
        .iter()
        .map(|d| match d {
            FDatum::Null => Datum::Null,
            FDatum::Unchanged => Datum::Unchanged,
            FDatum::Text(t) => Datum::Text(t.as_str().into()),
        })
        .collect()
}

fn old_kind(full: bool) -> OldTuple {
    if full {
        OldTuple::Full
    } else {
        OldTuple::Key
    }
}

fn encode(message: &Encoded) -> Vec<u8> {
    match message {
        Encoded::Begin(lsn, time, xid) => encode::begin(*lsn, *time, *xid),
        Encoded::Commit(flags, lsn, end, time) => encode::commit(*flags, *lsn, *end, *time),
        Encoded::Origin(lsn, name) => encode::origin(*lsn, name),
        Encoded::Relation {
            relid,
            namespace,
            name,
            replica_identity,
            columns,
        } => {
            let specs: Vec<encode::ColumnSpec<'_>> = columns
                .iter()
                .map(|c| {
                    (
                        c.flags,
                        c.name.as_str(),
                        type_oid(c.type_choice),
                        c.type_modifier,
                    )
                })
                .collect();
            encode::relation(
                u32::from(*relid),
                namespace,
                name,
                *replica_identity,
                &specs,
            )
        }
        Encoded::Type(choice, namespace, name) => {
            encode::type_info(CUSTOM_OID + u32::from(choice % 4), namespace, name)
        }
        Encoded::Insert(relid, new) => encode::insert(u32::from(*relid), &datums(new)),
        Encoded::Update(relid, old, new) => {
            let old = old.as_ref().map(|(full, d)| (old_kind(*full), datums(d)));
            encode::update(
                u32::from(*relid),
                old.as_ref().map(|(k, d)| (*k, &d[..])),
                &datums(new),
            )
        }
        Encoded::Delete(relid, full, old) => {
            encode::delete(u32::from(*relid), old_kind(*full), &datums(old))
        }
        Encoded::Truncate(options, relids) => {
            let relids: Vec<u32> = relids.iter().map(|r| u32::from(*r)).collect();
            encode::truncate(*options, &relids)
        }
        Encoded::Message(flags, lsn, prefix, content) => {
            encode::message(*flags, *lsn, prefix, content)
        }
    }
}

fn damage(mut bytes: Vec<u8>, how: &Damage) -> Vec<u8> {
    match how {
        Damage::None => {}
        Damage::Byte(at, byte) => {
            if !bytes.is_empty() {
                let at = usize::from(*at) % bytes.len();
                bytes[at] = *byte;
            }
        }
        Damage::Truncate(at) => bytes.truncate(usize::from(*at)),
        Damage::Append(more) => bytes.extend_from_slice(more),
    }
    bytes
}

/// Whether `bytes` is one JSON text (RFC 8259 grammar; serde_json skips values without a
/// depth limit and without judging `\u` escapes, as the grammar does).
fn valid_json(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

fn check_value(kind: ValueKind, text: &str) {
    let _ = match_value(kind, text);
    let _ = numeric_value(text);
    let _ = iso_timestamp(text);
    let _ = iso_timetz(text);
    let _ = parse_array(text);
    let mut out = Vec::new();
    write_value_json(&mut out, kind, text);
    assert!(
        valid_json(&out),
        "{kind:?} {text:?} -> {:?}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(is_json(text), valid_json(text.as_bytes()), "{text:?}");
}

/// What a decode may change, read through the decoder's accessors.
type Seen = (Option<Arc<Relation>>, Option<TypeInfo>, Option<Begin>);

fn seen(decoder: &Decoder, payload: &[u8]) -> Seen {
    let id = payload
        .get(1..5)
        .map_or(0, |b| u32::from_be_bytes(b.try_into().unwrap()));
    (
        decoder.relation(id).cloned(),
        decoder.type_info(id).cloned(),
        decoder.transaction(),
    )
}

fn decode(decoder: &mut Decoder, payload: &[u8], max_bytes: usize) {
    let before = seen(decoder, payload);
    match decoder.decode(payload) {
        Err(e) => {
            assert!(e.offset <= payload.len(), "{e} in {} bytes", payload.len());
            assert_eq!(
                seen(decoder, payload),
                before,
                "a failed decode changed the decoder"
            );
        }
        Ok(Message::Change(change)) => {
            let _ = change.record();
            let _ = change.old_record();
            let _ = change.row_event();
            let _ = change.commit_timestamp();
            let full = change.to_json(None);
            assert!(valid_json(&full), "{:?}", String::from_utf8_lossy(&full));
            let small = change.to_json(Some(max_bytes));
            assert!(valid_json(&small), "{:?}", String::from_utf8_lossy(&small));
        }
        Ok(_) => {}
    }
}

fuzz_target!(|input: (u16, Vec<Op>)| {
    let (max_bytes, ops) = input;
    let mut decoder = Decoder::new();
    for op in &ops {
        match op {
            Op::Raw(bytes) => decode(&mut decoder, bytes, usize::from(max_bytes)),
            Op::Encoded(message, how) => {
                let bytes = damage(encode(message), how);
                decode(&mut decoder, &bytes, usize::from(max_bytes));
            }
            Op::Reset => decoder.reset(),
            Op::Value(choice, text) => check_value(kind_of(*choice), text),
            Op::CommitTime(micros) => {
                let _ = format_commit_time(*micros);
            }
        }
    }
});
