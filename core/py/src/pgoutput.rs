//! The pgoutput decoder's Python face (docs/pgoutput.md): `PgOutputDecoder` and one frozen
//! class per message. A row change keeps its rows in Rust: `Matcher.match_change` matches it
//! and `to_json` encodes it without building Python objects per column.

use std::sync::{Arc, OnceLock};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use pyrt_engine::matcher::{Row, RowEvent as EngineRowEvent};
use pyrt_engine::pgoutput::{
    self as engine, Datum, DecodeError, Message, OldTuple, Relation as EngineRelation,
};

use crate::{row_to_py, RowEvent};

/// Builds `pyrt._errors.DecodeError(reason, offset)` (one home for the error types the
/// binding raises, shared with the reference decoder).
fn decode_error<'py>(py: Python<'py>, e: &DecodeError) -> PyResult<Bound<'py, PyAny>> {
    py.import("pyrt._errors")?
        .getattr("DecodeError")?
        .call1((&e.reason, e.offset))
}

fn raise(py: Python<'_>, e: &DecodeError) -> PyErr {
    match decode_error(py, e) {
        Ok(exc) => PyErr::from_value(exc),
        Err(err) => err,
    }
}

/// `B`: a transaction starts. Times are microseconds since 2000-01-01 00:00 UTC.
#[pyclass(frozen, module = "pyrt._core", name = "PgBegin", get_all)]
struct PgBegin {
    final_lsn: u64,
    commit_time: i64,
    xid: u32,
}

/// `C`: the transaction committed; acknowledge `end_lsn` once its changes are handed off.
#[pyclass(frozen, module = "pyrt._core", name = "PgCommit", get_all)]
struct PgCommit {
    flags: u8,
    commit_lsn: u64,
    end_lsn: u64,
    commit_time: i64,
}

/// `O`: the transaction came from another replication origin.
#[pyclass(frozen, module = "pyrt._core", name = "PgOrigin", get_all)]
struct PgOrigin {
    commit_lsn: u64,
    name: String,
}

/// `R`: a table's shape. `columns` are `(flags, name, type_oid, type_modifier, type_name)`;
/// flag 1 marks the replica identity key.
#[pyclass(frozen, module = "pyrt._core", name = "PgRelation")]
struct PgRelation {
    inner: Arc<EngineRelation>,
}

#[pymethods]
impl PgRelation {
    #[getter]
    fn relid(&self) -> u32 {
        self.inner.relid
    }

    #[getter]
    fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    #[getter]
    fn name(&self) -> &str {
        &self.inner.name
    }

    /// `d` default, `n` nothing, `f` full, `i` index.
    #[getter]
    fn replica_identity(&self) -> String {
        char::from(self.inner.replica_identity).to_string()
    }

    #[getter]
    fn columns<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(
            py,
            self.inner.columns.iter().map(|c| {
                (
                    c.flags,
                    &*c.name,
                    c.type_oid,
                    c.type_modifier,
                    &*c.type_name,
                )
            }),
        )
    }

    fn __repr__(&self) -> String {
        format!(
            "PgRelation({}, {:?}, {:?}, {} columns)",
            self.inner.relid,
            &*self.inner.namespace,
            &*self.inner.name,
            self.inner.columns.len()
        )
    }
}

/// `Y`: a type that is not built in.
#[pyclass(frozen, module = "pyrt._core", name = "PgType", get_all)]
struct PgType {
    type_oid: u32,
    namespace: String,
    name: String,
}

/// `T`: tables were truncated. `options`: 1 CASCADE, 2 RESTART IDENTITY.
#[pyclass(frozen, module = "pyrt._core", name = "PgTruncate")]
struct PgTruncate {
    #[pyo3(get)]
    options: u8,
    relations: Vec<Arc<EngineRelation>>,
}

#[pymethods]
impl PgTruncate {
    #[getter]
    fn relids(&self) -> Vec<u32> {
        self.relations.iter().map(|r| r.relid).collect()
    }

    /// `(schema, table)` of each truncated relation.
    #[getter]
    fn tables(&self) -> Vec<(String, String)> {
        self.relations
            .iter()
            .map(|r| (r.namespace.to_string(), r.name.to_string()))
            .collect()
    }
}

/// `M`: a message from `pg_logical_emit_message` (a non-transactional one may arrive outside
/// Begin/Commit).
#[pyclass(frozen, module = "pyrt._core", name = "PgLogicalMessage", get_all)]
struct PgLogicalMessage {
    flags: u8,
    transactional: bool,
    lsn: u64,
    prefix: String,
    content: Py<PyBytes>,
}

/// A message tag this decoder does not know (protocol v2 stream messages among them).
#[pyclass(frozen, module = "pyrt._core", name = "PgUnknown", get_all)]
struct PgUnknown {
    tag: u8,
}

/// `I`, `U` or `D`: a row change, kept in Rust.
#[pyclass(frozen, module = "pyrt._core", name = "PgChange")]
pub(crate) struct PgChange {
    inner: engine::RowChange,
    event: OnceLock<EngineRowEvent>,
}

impl PgChange {
    /// The matcher's event, built on first use.
    pub(crate) fn row_event(&self) -> &EngineRowEvent {
        self.event.get_or_init(|| self.inner.row_event())
    }
}

fn tuple_to_py<'py>(
    py: Python<'py>,
    datums: Option<&Vec<Datum>>,
) -> PyResult<Option<Bound<'py, PyList>>> {
    let Some(datums) = datums else {
        return Ok(None);
    };
    let items = datums.iter().map(|d| match d {
        Datum::Null => ("n", None),
        Datum::Unchanged => ("u", None),
        Datum::Text(t) => ("t", Some(&**t)),
    });
    PyList::new(py, items).map(Some)
}

fn row_dict<'py>(py: Python<'py>, row: &Option<Row>) -> PyResult<Option<Bound<'py, PyDict>>> {
    row_to_py(py, row)
}

#[pymethods]
impl PgChange {
    /// `INSERT`, `UPDATE` or `DELETE`.
    #[getter]
    fn r#type(&self) -> &'static str {
        self.inner.kind.name()
    }

    #[getter]
    fn schema(&self) -> &str {
        self.inner.schema()
    }

    #[getter]
    fn table(&self) -> &str {
        self.inner.table()
    }

    #[getter]
    fn relid(&self) -> u32 {
        self.inner.relation.relid
    }

    /// The new row as the matcher sees it (None for a DELETE).
    #[getter]
    fn record<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        row_dict(py, &self.row_event().record)
    }

    /// The old row (key or full) as the matcher sees it, None when not sent.
    #[getter]
    fn old_record<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        row_dict(py, &self.row_event().old_record)
    }

    /// The change as a `RowEvent` (a copy; `Matcher.match_change` needs none).
    #[getter]
    fn event(&self) -> RowEvent {
        RowEvent {
            inner: self.row_event().clone(),
        }
    }

    /// `K` (replica identity key), `O` (full old row) or None.
    #[getter]
    fn old_kind(&self) -> Option<&'static str> {
        self.inner.old_kind.map(|k| match k {
            OldTuple::Key => "K",
            OldTuple::Full => "O",
        })
    }

    /// The new tuple as sent: `(kind, text)` per column, kind `t` text, `n` null, `u`
    /// unchanged TOAST.
    #[getter]
    fn new_tuple<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyList>>> {
        tuple_to_py(py, self.inner.new.as_ref())
    }

    #[getter]
    fn old_tuple<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyList>>> {
        tuple_to_py(py, self.inner.old.as_ref())
    }

    /// `(name, type name)` of each column of the relation.
    #[getter]
    fn columns<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(
            py,
            self.inner
                .relation
                .columns
                .iter()
                .map(|c| (&*c.name, &*c.type_name)),
        )
    }

    /// The enclosing transaction's xid, commit time and final LSN (None outside one).
    #[getter]
    fn xid(&self) -> Option<u32> {
        self.inner.transaction.map(|t| t.xid)
    }

    #[getter]
    fn commit_time(&self) -> Option<i64> {
        self.inner.transaction.map(|t| t.commit_time)
    }

    #[getter]
    fn commit_lsn(&self) -> Option<u64> {
        self.inner.transaction.map(|t| t.final_lsn)
    }

    /// The commit time as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
    #[getter]
    fn commit_timestamp(&self) -> Option<String> {
        self.inner.commit_timestamp()
    }

    /// The Supabase `postgres_changes` payload, encoded once. Over `max_bytes`, values longer
    /// than 64 bytes of JSON are left out and `errors` says `Error 413: Payload Too Large`.
    #[pyo3(signature = (max_bytes = None))]
    fn to_json<'py>(&self, py: Python<'py>, max_bytes: Option<usize>) -> Bound<'py, PyBytes> {
        // Releasing the GIL costs more than encoding a usual row: only for large ones.
        let text: usize = [&self.inner.new, &self.inner.old]
            .into_iter()
            .flatten()
            .flatten()
            .map(|d| match d {
                Datum::Text(t) => t.len(),
                _ => 0,
            })
            .sum();
        let json = if text > 64 * 1024 {
            py.detach(|| self.inner.to_json(max_bytes))
        } else {
            self.inner.to_json(max_bytes)
        };
        PyBytes::new(py, &json)
    }

    fn __repr__(&self) -> String {
        format!(
            "PgChange({:?}, {:?}, {:?})",
            self.inner.kind.name(),
            self.inner.schema(),
            self.inner.table()
        )
    }
}

fn message_to_py(py: Python<'_>, message: Message) -> PyResult<Py<PyAny>> {
    Ok(match message {
        Message::Begin(b) => Py::new(
            py,
            PgBegin {
                final_lsn: b.final_lsn,
                commit_time: b.commit_time,
                xid: b.xid,
            },
        )?
        .into_any(),
        Message::Commit(c) => Py::new(
            py,
            PgCommit {
                flags: c.flags,
                commit_lsn: c.commit_lsn,
                end_lsn: c.end_lsn,
                commit_time: c.commit_time,
            },
        )?
        .into_any(),
        Message::Origin(o) => Py::new(
            py,
            PgOrigin {
                commit_lsn: o.commit_lsn,
                name: o.name.into(),
            },
        )?
        .into_any(),
        Message::Relation(r) => Py::new(py, PgRelation { inner: r })?.into_any(),
        Message::Type(t) => Py::new(
            py,
            PgType {
                type_oid: t.type_oid,
                namespace: t.namespace.into(),
                name: t.name.into(),
            },
        )?
        .into_any(),
        Message::Change(c) => Py::new(
            py,
            PgChange {
                inner: c,
                event: OnceLock::new(),
            },
        )?
        .into_any(),
        Message::Truncate(t) => Py::new(
            py,
            PgTruncate {
                options: t.options,
                relations: t.relations,
            },
        )?
        .into_any(),
        Message::Message(m) => Py::new(
            py,
            PgLogicalMessage {
                flags: m.flags,
                transactional: m.transactional(),
                lsn: m.lsn,
                prefix: m.prefix.into(),
                content: PyBytes::new(py, &m.content).unbind(),
            },
        )?
        .into_any(),
        Message::Unknown(tag) => Py::new(py, PgUnknown { tag })?.into_any(),
    })
}

/// Decodes the pgoutput messages (protocol version 1) of one replication session, in order:
/// each payload is what follows the XLogData header.
#[pyclass(module = "pyrt._core", name = "PgOutputDecoder")]
#[derive(Default)]
pub(crate) struct PgOutputDecoder {
    inner: engine::Decoder,
}

#[pymethods]
impl PgOutputDecoder {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// Decodes one message; raises `pyrt._errors.DecodeError` (nothing changes then).
    fn decode(&mut self, py: Python<'_>, payload: &[u8]) -> PyResult<Py<PyAny>> {
        match self.inner.decode(payload) {
            Ok(m) => message_to_py(py, m),
            Err(e) => Err(raise(py, &e)),
        }
    }

    /// `decode` for each payload; a payload that fails gives its `DecodeError` in its place
    /// (not raised), so one bad message does not hide the others.
    fn decode_many<'py>(
        &mut self,
        py: Python<'py>,
        payloads: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for payload in payloads.try_iter()? {
            let payload = payload?;
            let bytes = payload.cast::<PyBytes>()?;
            match self.inner.decode(bytes.as_bytes()) {
                Ok(m) => out.append(message_to_py(py, m)?)?,
                Err(e) => out.append(decode_error(py, &e)?)?,
            }
        }
        Ok(out)
    }

    /// The relation last announced under `relid`.
    fn relation(&self, relid: u32) -> Option<PgRelation> {
        self.inner
            .relation(relid)
            .map(|r| PgRelation { inner: r.clone() })
    }

    /// Forgets relations, types and the open transaction (start of a new session).
    fn reset(&mut self) {
        self.inner.reset();
    }
}

/// Microseconds since 2000-01-01 00:00 UTC (a commit time) as `YYYY-MM-DDTHH:MM:SS.mmmZ`,
/// truncated to milliseconds: the form of `PgChange.commit_timestamp`.
#[pyfunction]
fn format_commit_time(micros: i64) -> String {
    engine::format_commit_time(micros)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(format_commit_time, m)?)?;
    m.add_class::<PgOutputDecoder>()?;
    m.add_class::<PgBegin>()?;
    m.add_class::<PgCommit>()?;
    m.add_class::<PgOrigin>()?;
    m.add_class::<PgRelation>()?;
    m.add_class::<PgType>()?;
    m.add_class::<PgChange>()?;
    m.add_class::<PgTruncate>()?;
    m.add_class::<PgLogicalMessage>()?;
    m.add_class::<PgUnknown>()?;
    Ok(())
}
