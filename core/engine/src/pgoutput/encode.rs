//! Writing pgoutput messages (protocol version 1): the inverse of the decoder, for tests and
//! benchmarks. Postgres is the real encoder; nothing on the hub's path uses this.

use super::{Datum, OldTuple};

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

pub fn begin(final_lsn: u64, commit_time: i64, xid: u32) -> Vec<u8> {
    let mut out = vec![b'B'];
    out.extend_from_slice(&final_lsn.to_be_bytes());
    out.extend_from_slice(&commit_time.to_be_bytes());
    out.extend_from_slice(&xid.to_be_bytes());
    out
}

pub fn commit(flags: u8, commit_lsn: u64, end_lsn: u64, commit_time: i64) -> Vec<u8> {
    let mut out = vec![b'C', flags];
    out.extend_from_slice(&commit_lsn.to_be_bytes());
    out.extend_from_slice(&end_lsn.to_be_bytes());
    out.extend_from_slice(&commit_time.to_be_bytes());
    out
}

pub fn origin(commit_lsn: u64, name: &str) -> Vec<u8> {
    let mut out = vec![b'O'];
    out.extend_from_slice(&commit_lsn.to_be_bytes());
    cstr(&mut out, name);
    out
}

/// A column of a Relation message: (flags, name, type oid, type modifier).
pub type ColumnSpec<'a> = (u8, &'a str, u32, i32);

pub fn relation(
    relid: u32,
    namespace: &str,
    name: &str,
    replica_identity: u8,
    columns: &[ColumnSpec<'_>],
) -> Vec<u8> {
    let mut out = vec![b'R'];
    out.extend_from_slice(&relid.to_be_bytes());
    cstr(&mut out, namespace);
    cstr(&mut out, name);
    out.push(replica_identity);
    out.extend_from_slice(&(columns.len() as i16).to_be_bytes());
    for (flags, name, oid, typmod) in columns {
        out.push(*flags);
        cstr(&mut out, name);
        out.extend_from_slice(&oid.to_be_bytes());
        out.extend_from_slice(&typmod.to_be_bytes());
    }
    out
}

pub fn type_info(oid: u32, namespace: &str, name: &str) -> Vec<u8> {
    let mut out = vec![b'Y'];
    out.extend_from_slice(&oid.to_be_bytes());
    cstr(&mut out, namespace);
    cstr(&mut out, name);
    out
}

fn tuple(out: &mut Vec<u8>, kind: u8, datums: &[Datum]) {
    out.push(kind);
    out.extend_from_slice(&(datums.len() as i16).to_be_bytes());
    for d in datums {
        match d {
            Datum::Null => out.push(b'n'),
            Datum::Unchanged => out.push(b'u'),
            Datum::Text(t) => {
                out.push(b't');
                out.extend_from_slice(&(t.len() as i32).to_be_bytes());
                out.extend_from_slice(t.as_bytes());
            }
        }
    }
}

pub fn insert(relid: u32, new: &[Datum]) -> Vec<u8> {
    let mut out = vec![b'I'];
    out.extend_from_slice(&relid.to_be_bytes());
    tuple(&mut out, b'N', new);
    out
}

fn old_tag(kind: OldTuple) -> u8 {
    match kind {
        OldTuple::Key => b'K',
        OldTuple::Full => b'O',
    }
}

pub fn update(relid: u32, old: Option<(OldTuple, &[Datum])>, new: &[Datum]) -> Vec<u8> {
    let mut out = vec![b'U'];
    out.extend_from_slice(&relid.to_be_bytes());
    if let Some((kind, datums)) = old {
        tuple(&mut out, old_tag(kind), datums);
    }
    tuple(&mut out, b'N', new);
    out
}

pub fn delete(relid: u32, kind: OldTuple, old: &[Datum]) -> Vec<u8> {
    let mut out = vec![b'D'];
    out.extend_from_slice(&relid.to_be_bytes());
    tuple(&mut out, old_tag(kind), old);
    out
}

pub fn truncate(options: u8, relids: &[u32]) -> Vec<u8> {
    let mut out = vec![b'T'];
    out.extend_from_slice(&(relids.len() as i32).to_be_bytes());
    out.push(options);
    for relid in relids {
        out.extend_from_slice(&relid.to_be_bytes());
    }
    out
}

pub fn message(flags: u8, lsn: u64, prefix: &str, content: &[u8]) -> Vec<u8> {
    let mut out = vec![b'M', flags];
    out.extend_from_slice(&lsn.to_be_bytes());
    cstr(&mut out, prefix);
    out.extend_from_slice(&(content.len() as i32).to_be_bytes());
    out.extend_from_slice(content);
    out
}
