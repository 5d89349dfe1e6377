//! `pyrt._core`: the Python face of pyrt-engine. Thin on purpose: conversions and errors
//! here, semantics in the engine (docs/matcher.md).

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyMapping, PyString, PyTuple};

use pyrt_engine::matcher::{
    self, AddError, ChangeKind, Filter, Matcher as EngineMatcher, Row, RowEvent as EngineRowEvent,
    Test, Value,
};

mod fanout;
mod pgoutput;
use pgoutput::PgChange;

/// Builds one of the exceptions of `pyrt._errors` (one home for error types, shared with the
/// pure-Python reference implementation).
fn positioned_error(py: Python<'_>, class: &str, reason: &str, position: usize) -> PyErr {
    let made = py
        .import("pyrt._errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.call1((reason, position)));
    match made {
        Ok(exc) => PyErr::from_value(exc),
        Err(e) => e,
    }
}

fn add_error(py: Python<'_>, e: AddError) -> PyErr {
    match e {
        AddError::DuplicateId(_) => PyValueError::new_err(e.to_string()),
        AddError::Channel(c) => positioned_error(py, "ChannelNameError", &c.reason, c.position),
        AddError::Filter(f) => positioned_error(py, "FilterError", &f.reason, f.position),
    }
}

fn value_from_py(column: &str, v: &Bound<'_, PyAny>) -> PyResult<Value> {
    if v.is_none() {
        Ok(Value::Null)
    } else if let Ok(b) = v.cast::<PyBool>() {
        Ok(Value::Bool(b.is_true()))
    } else if v.is_instance_of::<PyInt>() {
        match v.extract::<i64>() {
            Ok(i) => Ok(Value::Int(i)),
            // Outside i64: a float, or OverflowError past the float range (docs/matcher.md).
            Err(_) => Ok(Value::Float(v.extract::<f64>()?)),
        }
    } else if let Ok(f) = v.cast::<PyFloat>() {
        Ok(Value::Float(f.value()))
    } else if let Ok(s) = v.cast::<PyString>() {
        Ok(Value::Text(s.to_str()?.into()))
    } else {
        Err(PyTypeError::new_err(format!(
            "column '{column}': unsupported value type {}, expected None, bool, int, float or str",
            v.get_type().name()?
        )))
    }
}

fn value_to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Int(i) => i.into_pyobject(py)?.into_any(),
        Value::Float(f) => PyFloat::new(py, *f).into_any(),
        Value::Text(s) => PyString::new(py, s).into_any(),
    })
}

fn row_from_py(record: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Row>> {
    let Some(record) = record.filter(|r| !r.is_none()) else {
        return Ok(None);
    };
    let mut row = Row::new();
    let mut put = |k: Bound<'_, PyAny>, v: Bound<'_, PyAny>| -> PyResult<()> {
        let key = k
            .cast::<PyString>()
            .map_err(|_| PyTypeError::new_err("record keys must be str"))?
            .to_str()?
            .to_owned();
        let value = value_from_py(&key, &v)?;
        row.set(&key, value);
        Ok(())
    };
    if let Ok(d) = record.cast::<PyDict>() {
        for (k, v) in d.iter() {
            put(k, v)?;
        }
    } else {
        let mapping = record
            .cast::<PyMapping>()
            .map_err(|_| PyTypeError::new_err("record must be a mapping of str to values"))?;
        for item in mapping.items()?.iter() {
            let (k, v): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item.extract()?;
            put(k, v)?;
        }
    }
    Ok(Some(row))
}

fn row_to_py<'py>(py: Python<'py>, row: &Option<Row>) -> PyResult<Option<Bound<'py, PyDict>>> {
    let Some(row) = row else { return Ok(None) };
    let d = PyDict::new(py);
    for (k, v) in row.iter() {
        d.set_item(k, value_to_py(py, v)?)?;
    }
    Ok(Some(d))
}

/// Compares two optional rows as Python dicts.
fn rows_equal(py: Python<'_>, a: &Option<Row>, b: &Option<Row>) -> PyResult<bool> {
    match (row_to_py(py, a)?, row_to_py(py, b)?) {
        (None, None) => Ok(true),
        (Some(a), Some(b)) => a.eq(b),
        _ => Ok(false),
    }
}

/// One row change: INSERT and UPDATE are matched on `record`, DELETE on `old_record`.
#[pyclass(frozen, module = "pyrt._core", name = "RowEvent")]
struct RowEvent {
    inner: EngineRowEvent,
}

#[pymethods]
impl RowEvent {
    #[new]
    #[pyo3(signature = (r#type, schema, table, record = None, old_record = None))]
    fn new(
        r#type: &str,
        schema: &str,
        table: &str,
        record: Option<&Bound<'_, PyAny>>,
        old_record: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let kind = ChangeKind::parse(r#type).ok_or_else(|| {
            PyValueError::new_err(format!(
                "unknown event type '{type}', expected INSERT, UPDATE or DELETE",
                type = r#type
            ))
        })?;
        Ok(Self {
            inner: EngineRowEvent {
                kind,
                schema: schema.into(),
                table: table.into(),
                record: row_from_py(record)?,
                old_record: row_from_py(old_record)?,
            },
        })
    }

    #[getter]
    fn r#type(&self) -> &'static str {
        self.inner.kind.name()
    }

    #[getter]
    fn schema(&self) -> &str {
        &self.inner.schema
    }

    #[getter]
    fn table(&self) -> &str {
        &self.inner.table
    }

    #[getter]
    fn record<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        row_to_py(py, &self.inner.record)
    }

    #[getter]
    fn old_record<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        row_to_py(py, &self.inner.old_record)
    }

    /// Events are values: equal when type, schema, table and both rows are equal, the rows
    /// compared as Python dicts (so `1 == 1.0` and column order does not matter).
    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let Ok(other) = other.cast::<RowEvent>() else {
            return Ok(py.NotImplemented());
        };
        let (a, b) = (&self.inner, &other.get().inner);
        let equal = a.kind == b.kind
            && a.schema == b.schema
            && a.table == b.table
            && rows_equal(py, &a.record, &b.record)?
            && rows_equal(py, &a.old_record, &b.old_record)?;
        Ok(PyBool::new(py, equal).to_owned().into_any().unbind())
    }

    /// Hashes what identifies the change, not the rows (which hold floats and may be large).
    fn __hash__(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.inner.kind, &*self.inner.schema, &*self.inner.table).hash(&mut h);
        h.finish()
    }

    fn __repr__(&self) -> String {
        format!(
            "RowEvent({:?}, {:?}, {:?}, record={} columns, old_record={} columns)",
            self.inner.kind.name(),
            &*self.inner.schema,
            &*self.inner.table,
            self.inner.record.as_ref().map_or(0, Row::len),
            self.inner.old_record.as_ref().map_or(0, Row::len),
        )
    }
}

/// Every subscription of a hub, indexed so one event is matched in time independent of how
/// many subscriptions there are (docs/matcher.md).
#[pyclass(module = "pyrt._core", name = "Matcher")]
#[derive(Default)]
struct Matcher {
    inner: EngineMatcher,
    /// Reused between calls so matching allocates only the result list.
    scratch: Vec<u64>,
}

#[pymethods]
impl Matcher {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// Subscribes `sub_id` to channels matching `pattern`.
    fn add_channel(&mut self, py: Python<'_>, sub_id: u64, pattern: &str) -> PyResult<()> {
        self.inner
            .add_channel(sub_id, pattern)
            .map_err(|e| add_error(py, e))
    }

    /// Subscribes `sub_id` to row changes matching `event`, `schema`, `table` and `filter`.
    #[pyo3(signature = (sub_id, event, schema, table, filter = None))]
    fn add_rows(
        &mut self,
        py: Python<'_>,
        sub_id: u64,
        event: &str,
        schema: &str,
        table: &str,
        filter: Option<&str>,
    ) -> PyResult<()> {
        self.inner
            .add_rows(sub_id, event, schema, table, filter)
            .map_err(|e| add_error(py, e))
    }

    /// Removes `sub_id`; returns whether it was present.
    fn remove(&mut self, sub_id: u64) -> bool {
        self.inner.remove(sub_id)
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __contains__(&self, sub_id: &Bound<'_, PyAny>) -> bool {
        sub_id
            .extract::<u64>()
            .is_ok_and(|id| self.inner.contains(id))
    }

    /// Ids of channel subscriptions matching the concrete channel name.
    fn match_channel<'py>(
        &mut self,
        py: Python<'py>,
        channel: &str,
    ) -> PyResult<Bound<'py, PyList>> {
        self.scratch.clear();
        self.inner
            .match_channel(channel, &mut self.scratch)
            .map_err(|e| positioned_error(py, "ChannelNameError", &e.reason, e.position))?;
        PyList::new(py, &self.scratch)
    }

    /// `match_channel` for each name.
    fn match_channels<'py>(
        &mut self,
        py: Python<'py>,
        channels: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for channel in channels.try_iter()? {
            let channel = channel?;
            let name = channel
                .cast::<PyString>()
                .map_err(|_| PyTypeError::new_err("channel names must be str"))?;
            out.append(self.match_channel(py, name.to_str()?)?)?;
        }
        Ok(out)
    }

    /// Ids of row subscriptions that want `event`.
    fn match_row<'py>(
        &mut self,
        py: Python<'py>,
        event: &Bound<'py, RowEvent>,
    ) -> PyResult<Bound<'py, PyList>> {
        self.scratch.clear();
        self.inner.match_row(&event.get().inner, &mut self.scratch);
        PyList::new(py, &self.scratch)
    }

    /// Ids of row subscriptions that want a decoded pgoutput change (matched in Rust, no
    /// Python values built).
    fn match_change<'py>(
        &mut self,
        py: Python<'py>,
        change: &Bound<'py, PgChange>,
    ) -> PyResult<Bound<'py, PyList>> {
        self.scratch.clear();
        self.inner
            .match_row(change.get().row_event(), &mut self.scratch);
        PyList::new(py, &self.scratch)
    }

    /// `match_change` for each change: one list of ids per change.
    fn match_changes<'py>(
        &mut self,
        py: Python<'py>,
        changes: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for change in changes.try_iter()? {
            let change = change?;
            out.append(self.match_change(py, change.cast::<PgChange>()?)?)?;
        }
        Ok(out)
    }

    /// `match_row` for each event: one list of ids per event.
    fn match_rows<'py>(
        &mut self,
        py: Python<'py>,
        events: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for event in events.try_iter()? {
            let event = event?;
            let event = event.cast::<RowEvent>()?;
            out.append(self.match_row(py, event)?)?;
        }
        Ok(out)
    }

    /// Sizes of the internal structures: subscriptions by kind, trie nodes, row groups and
    /// how many row subscriptions have to be scanned (no indexable condition).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("channel_subscriptions", s.channel_subscriptions)?;
        d.set_item("row_subscriptions", s.row_subscriptions)?;
        d.set_item("trie_nodes", s.trie_nodes)?;
        d.set_item("row_groups", s.row_groups)?;
        d.set_item("scanned_row_subscriptions", s.scanned_row_subscriptions)?;
        Ok(d)
    }
}

/// Parses a row filter into `(column, operator, negated, value)` tuples; raises FilterError.
#[pyfunction]
fn parse_filter<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyList>> {
    let filter = Filter::parse(text)
        .map_err(|e| positioned_error(py, "FilterError", &e.reason, e.position))?;
    let out = PyList::empty(py);
    for c in filter.conditions.iter() {
        let value: Bound<'py, PyAny> = match &c.test {
            Test::Compare(_, literal) => PyString::new(py, &literal.text).into_any(),
            Test::Like(_, text) => PyString::new(py, text).into_any(),
            Test::Is(what) => PyString::new(py, what.name()).into_any(),
            Test::In(items) => {
                PyTuple::new(py, items.iter().map(|l| PyString::new(py, &l.text)))?.into_any()
            }
        };
        out.append((&*c.column, c.operator.name(), c.negated, value))?;
    }
    Ok(out)
}

/// Checks a channel name (or, with `pattern=True`, a pattern); raises ChannelNameError.
#[pyfunction]
#[pyo3(signature = (name, pattern = false))]
fn check_channel(py: Python<'_>, name: &str, pattern: bool) -> PyResult<()> {
    matcher::check_channel(name, pattern)
        .map_err(|e| positioned_error(py, "ChannelNameError", &e.reason, e.position))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Matcher>()?;
    m.add_class::<RowEvent>()?;
    m.add_function(wrap_pyfunction!(parse_filter, m)?)?;
    m.add_function(wrap_pyfunction!(check_channel, m)?)?;
    pgoutput::register(m)?;
    fanout::register(m)?;
    Ok(())
}
