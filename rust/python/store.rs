//! Python classes over the checkpoint: `KeySet`, `SqliteCheckpoint` and the iterator of
//! its rows, plus `open_sqlite`. Only conversion lives here; every SQLite call and every
//! wait runs with the GIL released (`Python::detach`), so other Python threads (and the
//! user's function) keep running while the disk works.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use pyo3::exceptions::{PyException, PyTypeError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyList, PyString, PyTuple};

use crate::checkpoint::Checkpoint;
use crate::contract::KEY_SIZE;
use crate::errors::{self, Error};
use crate::keys::{self, Key};
use crate::pickles::{read_simple, Simple};
use crate::python::imports::{
    builtin_map, json_loads, pickle_loads, row_info_class, version_row_class,
};
use crate::python::process::{self, ProcessStop};
use crate::store::{InOrder, ItemRow, LatestOutputs, OutputChunk, RowInfo, Streamed, Synchronous};
use crate::writer::{Pending, Policy};

/// Rows fetched per query while iterating `rows()`: bounds memory on huge checkpoints.
const ROWS_PAGE: usize = 1024;
/// ... and with their outputs, which may each be large.
const ROWS_WITH_OUTPUT_PAGE: usize = 128;
/// Outputs copied into Python `bytes` at a time before they are unpickled: bounds the
/// extra memory of a load while keeping the per-output overhead off the binding.
const UNPICKLE_CHUNK: usize = 4096;
/// Chunks a streaming load's scan may run ahead of the unpickling: enough to keep both
/// threads busy, at most a few MiB (`OutputChunk` sizes).
const CHUNKS_IN_FLIGHT: usize = 8;

/// A compact set of 16-byte input keys.
#[pyclass(module = "snapperable._core", name = "KeySet")]
#[derive(Default)]
pub struct PyKeySet(keys::ClaimSet);

impl PyKeySet {
    fn table(table: keys::KeySet) -> Self {
        PyKeySet(keys::ClaimSet::from(table))
    }
}

#[pymethods]
impl PyKeySet {
    fn __len__(&self) -> usize {
        self.0.len()
    }

    fn __contains__(&mut self, key: &Bound<'_, PyAny>) -> bool {
        key.cast::<PyBytes>()
            .ok()
            .and_then(|bytes| Key::try_from(bytes.as_bytes()).ok())
            .is_some_and(|key| self.0.table().contains(&key))
    }

    /// The keys, as of the call, in no particular order.
    fn __iter__(&self) -> PyKeyIterator {
        PyKeyIterator(self.0.iter().collect::<Vec<_>>().into_iter())
    }

    fn add(&mut self, key: &[u8]) -> PyResult<()> {
        self.0.table().insert(key_from(key)?);
        Ok(())
    }

    /// Positions `i` whose key `keys[16*i:16*i+16]` is not in the set, adding each
    /// such key as it goes: a key repeated within `keys` is claimed once.
    fn claim(&mut self, keys: &[u8]) -> PyResult<Vec<usize>> {
        Ok(self.0.claim(keys)?)
    }
}

/// Iterates a snapshot of a `KeySet`: 16 bytes a key, not a Python object a key.
#[pyclass(module = "snapperable._core", name = "KeyIterator")]
pub struct PyKeyIterator(std::vec::IntoIter<Key>);

#[pymethods]
impl PyKeyIterator {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.0.next().map(|key| PyBytes::new(py, &key))
    }
}

/// An empty key set.
#[pyfunction]
pub fn new_key_set() -> PyKeySet {
    PyKeySet::default()
}

fn key_from(bytes: &[u8]) -> Result<Key, Error> {
    Key::try_from(bytes).map_err(|_| {
        Error::InvalidArgument(format!("a key is {KEY_SIZE} bytes, got {}", bytes.len()))
    })
}

/// An open SQLite checkpoint: the pending buffer, its writer, and reads.
#[pyclass(module = "snapperable._core", name = "SqliteCheckpoint", frozen)]
pub struct PySqliteCheckpoint {
    #[pyo3(get)]
    path: Py<PyString>,
    inner: Checkpoint,
}

/// Opens (creating with mode 0600 if missing) a SQLite checkpoint at `path`.
#[pyfunction]
pub fn open_sqlite(
    py: Python<'_>,
    path: Bound<'_, PyString>,
    synchronous: &str,
    batch_size: i64,
    max_wait_time: Option<f64>,
) -> PyResult<PySqliteCheckpoint> {
    let synchronous = Synchronous::parse(synchronous)?;
    let policy = Policy {
        batch_size: usize::try_from(batch_size)
            .ok()
            .filter(|&size| size >= 1)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("batch_size must be at least 1, not {batch_size}"))
            })?,
        max_wait: max_wait(max_wait_time)?,
    };
    // The OS form of the path, so a name that is not valid UTF-8 still opens.
    let os_path: PathBuf = path.extract()?;
    let inner = py.detach(|| Checkpoint::open(&os_path, synchronous, policy))?;
    Ok(PySqliteCheckpoint {
        path: path.unbind(),
        inner,
    })
}

/// Opens an existing SQLite checkpoint at `path` for reading only; writes raise. None
/// for a database never initialized (nothing saved).
#[pyfunction]
pub fn open_sqlite_reader(
    py: Python<'_>,
    path: Bound<'_, PyString>,
) -> PyResult<Option<PySqliteCheckpoint>> {
    let os_path: PathBuf = path.extract()?;
    let opened = py.detach(|| Checkpoint::open_reader(&os_path))?;
    Ok(opened.map(|inner| PySqliteCheckpoint {
        path: path.unbind(),
        inner,
    }))
}

fn max_wait(seconds: Option<f64>) -> Result<Option<Duration>, Error> {
    match seconds {
        None => Ok(None),
        Some(s) if s.is_nan() || s < 0.0 => Err(Error::InvalidArgument(format!(
            "max_wait_time must be None or a number of seconds >= 0, not {s}"
        ))),
        // Too long to represent (inf included) means no bound at all.
        Some(s) => Ok(Duration::try_from_secs_f64(s).ok()),
    }
}

#[pymethods]
impl PySqliteCheckpoint {
    /// Every known function version, oldest first.
    fn versions<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let versions = py.detach(|| self.inner.with_store(|store| store.versions()))?;
        let class = version_row_class(py)?;
        versions
            .into_iter()
            .map(|v| {
                // `parts` explains a change of version later: damage there must surface
                // now, as it does in the pure backend (`_folding.version_row`).
                let parts_ok = json_loads(py)?
                    .call1((v.parts.as_str(),))
                    .is_ok_and(|parts| parts.is_instance_of::<PyDict>());
                let fields = (v.id, v.fingerprint, v.parts, v.uses, v.created).into_pyobject(py)?;
                if !parts_ok {
                    return Err(errors::bad_version_record(py, self.inner.path(), fields));
                }
                class.call1(fields)
            })
            .collect()
    }

    #[pyo3(signature = (fingerprint, parts, uses))]
    fn add_version(
        &self,
        py: Python<'_>,
        fingerprint: &str,
        parts: &str,
        uses: Option<i64>,
    ) -> PyResult<i64> {
        Ok(py.detach(|| {
            self.inner
                .with_store(|store| store.add_version(fingerprint, parts, uses))
        })?)
    }

    /// Keys whose latest row for `version` (any version if None) has `status`.
    #[pyo3(signature = (version, status))]
    fn key_set(&self, py: Python<'_>, version: Option<i64>, status: i64) -> PyResult<PyKeySet> {
        let keys = py.detach(|| {
            self.inner
                .with_store(|store| store.key_set(version, status))
        })?;
        Ok(PyKeySet::table(keys))
    }

    /// `(ok, failed)`: keys whose latest row of `version` is ok, and failed; one scan.
    fn key_sets(&self, py: Python<'_>, version: i64) -> PyResult<(PyKeySet, PyKeySet)> {
        let (ok, failed) = py.detach(|| self.inner.with_store(|store| store.key_sets(version)))?;
        Ok((PyKeySet(ok), PyKeySet::table(failed)))
    }

    /// Buffers one `ItemRow` for the writer; converted here, so no Python object is kept.
    fn record(&self, py: Python<'_>, row: &Bound<'_, PyAny>) -> PyResult<()> {
        let row = item_row(row)?;
        // No detach: this only takes the buffer's lock, which the writer never holds
        // while it commits, and the writer never needs the GIL. Only when the buffer is
        // full does the caller wait, and then without the GIL.
        if self.inner.record(row)? == Pending::Full {
            py.detach(|| self.inner.wait_for_room())?;
        }
        Ok(())
    }

    /// The hot loop: `fn(items[p])`, pickled, recorded as an ok row for each `p` in
    /// `positions`, in order; the first exception stops it and is returned as
    /// `(index, started, exception, raised_by_pickling, output)` (`_contract.py`).
    #[pyo3(signature = (r#fn, items, keys, positions, version))]
    fn process<'py>(
        &self,
        r#fn: &Bound<'py, PyAny>,
        items: &Bound<'py, PyAny>,
        keys: &[u8],
        positions: Vec<isize>,
        version: i64,
    ) -> PyResult<Option<ProcessStop<'py>>> {
        process::process(&self.inner, r#fn, items, keys, positions, version)
    }

    /// Returns once every recorded row is committed.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        Ok(py.detach(|| self.inner.flush())?)
    }

    /// Rows recorded but not yet committed.
    fn unsaved(&self) -> PyResult<u64> {
        Ok(self.inner.unsaved()?)
    }

    /// Unpickled outputs of the latest ok row of each key, in the order of `keys`.
    fn outputs_for<'py>(
        &self,
        py: Python<'py>,
        version: i64,
        keys: &[u8],
    ) -> PyResult<Bound<'py, PyList>> {
        // Checked before the scan, so bad input costs nothing.
        let wanted = keys::split_keys(keys)?;
        if let Some(outputs) = self.outputs_in_order(py, version, InOrder::Keys(keys))? {
            return Ok(outputs);
        }
        let (latest, indexes) = py.detach(|| -> Result<_, Error> {
            let latest = self
                .inner
                .with_store(|store| store.latest_outputs(version))?;
            // The lookups too run without the GIL; only the unpickling needs it.
            let indexes = latest.indexes_for(wanted)?;
            Ok((latest, indexes))
        })?;
        self.unpickle_all(py, &latest, &indexes)
    }

    /// Unpickled latest ok output of every key, in the order each key was first saved.
    fn all_outputs<'py>(&self, py: Python<'py>, version: i64) -> PyResult<Bound<'py, PyList>> {
        if let Some(outputs) = self.outputs_in_order(py, version, InOrder::DistinctKeys)? {
            return Ok(outputs);
        }
        let (latest, indexes) = py.detach(|| -> Result<_, Error> {
            let latest = self
                .inner
                .with_store(|store| store.latest_outputs(version))?;
            let indexes = latest.indexes_in_save_order();
            Ok((latest, indexes))
        })?;
        self.unpickle_all(py, &latest, &indexes)
    }

    /// Every row (of `version`, or of all versions if None) in the order saved; with
    /// its pickled output if `with_output`.
    #[pyo3(signature = (version, with_output = false))]
    fn rows(slf: Bound<'_, Self>, version: Option<i64>, with_output: bool) -> PyRowIterator {
        PyRowIterator {
            checkpoint: slf.unbind(),
            version,
            with_output,
            after: 0,
            page: VecDeque::new(),
            exhausted: false,
        }
    }

    /// The `meta` table as a dict (`format_version`, `created_by`).
    fn meta<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let pairs = py.detach(|| self.inner.with_store(|store| store.meta()))?;
        let meta = PyDict::new(py);
        for (name, value) in pairs {
            meta.set_item(name, value)?;
        }
        Ok(meta)
    }

    /// The first problem `PRAGMA integrity_check` finds, or None for a sound file.
    fn integrity_check(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let lines = py.detach(|| self.inner.with_store(|store| store.integrity_check(1)))?;
        Ok(lines.into_iter().next().filter(|line| line != "ok"))
    }

    /// Flushes, then copies every committed row from the WAL into the database file.
    fn fold_wal_into_file(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            self.inner.flush()?;
            self.inner.with_store(|store| store.fold_wal_into_file())
        })?;
        Ok(())
    }

    /// Flushes, stops the writer and releases the file. Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        Ok(py.detach(|| self.inner.close())?)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "<snapperable._core.SqliteCheckpoint {}>",
            self.path.bind(py)
        )
    }
}

impl PySqliteCheckpoint {
    /// The outputs of a load when the version's rows are as `expected` (see
    /// `Store::outputs_in_order`), else None, for the general way.
    ///
    /// Two threads: a Rust thread scans the checkpoint (no GIL) and hands over chunks of
    /// outputs while this one unpickles them straight into the result, so the scan and
    /// the unpickling overlap and no table or copy of all outputs is ever built. The
    /// store stays locked throughout (as in any read); the lock is never taken with
    /// the GIL held, so taking the GIL back per chunk cannot deadlock.
    ///
    /// An output that does not unpickle sends the load the general way, which raises
    /// only if it is an output the answer needs (it may have been superseded).
    fn outputs_in_order<'py>(
        &self,
        py: Python<'py>,
        version: i64,
        expected: InOrder<'_>,
    ) -> PyResult<Option<Bound<'py, PyList>>> {
        let outputs = PyList::empty(py);
        let target = outputs.clone().unbind();
        let (streamed, unpickled_all, interrupt) = py.detach(|| {
            self.inner.with_store(|store| {
                std::thread::scope(|scope| {
                    let (sender, chunks) = mpsc::sync_channel::<OutputChunk>(CHUNKS_IN_FLIGHT);
                    let scan = scope.spawn(move || {
                        store
                            .outputs_in_order(version, expected, |chunk| sender.send(chunk).is_ok())
                    });
                    let (mut unpickled_all, mut interrupt) = (true, None);
                    for chunk in chunks.iter() {
                        let unpickled =
                            Python::attach(|py| extend_unpickled(py, target.bind(py), &chunk));
                        match unpickled {
                            Ok(true) => {}
                            Ok(false) => {
                                unpickled_all = false;
                                break;
                            }
                            Err(err) => {
                                interrupt = Some(err);
                                break;
                            }
                        }
                    }
                    // Stops the scan at its next chunk, if it is still going.
                    drop(chunks);
                    let streamed = scan
                        .join()
                        .map_err(|payload| Error::panicked(self.inner.path(), "scan", &*payload))?;
                    Ok((streamed, unpickled_all, interrupt))
                })
            })
        })?;
        if let Some(interrupt) = interrupt {
            return Err(interrupt);
        }
        let complete = streamed? == Streamed::Complete && unpickled_all;
        Ok(complete.then_some(outputs))
    }

    /// The saved outputs at `indexes` as Python objects, in order. An output that no
    /// longer unpickles (say, its class was renamed) is reported as damage to the
    /// checkpoint, as the pure backend does.
    fn unpickle_all<'py>(
        &self,
        py: Python<'py>,
        latest: &LatestOutputs,
        indexes: &[u32],
    ) -> PyResult<Bound<'py, PyList>> {
        let outputs = PyList::empty(py);
        for chunk in indexes.chunks(UNPICKLE_CHUNK) {
            let pickles = chunk.iter().map(|&index| latest.output(index));
            extend_with_values(py, &outputs, pickles)
                .map_err(|err| self.unpickling_failed(py, err))?;
        }
        Ok(outputs)
    }

    fn unpickling_failed(&self, py: Python<'_>, err: PyErr) -> PyErr {
        if !err.is_instance_of::<PyException>(py) {
            return err; // Ctrl-C while unpickling is still Ctrl-C
        }
        errors::unreadable_output(py, self.inner.path(), err)
    }
}

/// Appends the values of `pickles` to `outputs`, in order: simple ones read in Rust
/// (`pickles::read_simple`), the rest through `outputs.extend(map(pickle.loads, ...))`
/// (the loop and each call of `loads` in C, no argument tuple per output).
fn extend_with_values<'a, 'py>(
    py: Python<'py>,
    outputs: &Bound<'py, PyList>,
    pickles: impl ExactSizeIterator<Item = &'a [u8]>,
) -> PyResult<()> {
    let mut pickles = pickles.peekable();
    while let Some(&pickle) = pickles.peek() {
        if let Some(value) = read_simple(pickle) {
            outputs.append(simple_value(py, value)?)?;
            pickles.next();
            continue;
        }
        // The run of outputs that need pickle.loads, up to the next simple one.
        let mut run = Vec::new();
        while let Some(&pickle) = pickles.peek() {
            if read_simple(pickle).is_some() && !run.is_empty() {
                break;
            }
            run.push(PyBytes::new(py, pickle));
            pickles.next();
        }
        let (map, loads) = (builtin_map(py)?, pickle_loads(py)?);
        outputs
            .getattr(intern!(py, "extend"))?
            .call1((map.call1((loads, PyList::new(py, run)?))?,))?;
    }
    Ok(())
}

fn simple_value<'py>(py: Python<'py>, value: Simple<'_>) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Simple::Int(int) => int.into_pyobject(py)?.into_any(),
        Simple::Float(float) => PyFloat::new(py, float).into_any(),
        Simple::None => py.None().into_bound(py),
        Simple::Bool(flag) => PyBool::new(py, flag).to_owned().into_any(),
        Simple::Str(text) => PyString::new(py, text).into_any(),
    })
}

/// [`extend_with_values`] of a chunk. Ok(false) if an output did not unpickle (an
/// `Exception`); anything else (Ctrl-C) is raised.
fn extend_unpickled(
    py: Python<'_>,
    outputs: &Bound<'_, PyList>,
    chunk: &OutputChunk,
) -> PyResult<bool> {
    match extend_with_values(py, outputs, chunk.outputs()) {
        Ok(()) => Ok(true),
        Err(err) if err.is_instance_of::<PyException>(py) => Ok(false),
        Err(err) => Err(err),
    }
}

/// The 11 fields of an `ItemRow` as Rust values.
///
/// Runs once per item: fields are read as borrowed references (no reference-count
/// traffic) and only the blobs and texts are copied, since the writer thread that saves
/// them runs without the GIL.
fn item_row(row: &Bound<'_, PyAny>) -> PyResult<ItemRow> {
    let fields = row
        .cast::<PyTuple>()
        .map_err(|_| PyTypeError::new_err("record() takes an ItemRow"))?;
    if fields.len() != 11 {
        return Err(PyTypeError::new_err(format!(
            "record() takes an ItemRow of 11 fields, got {}",
            fields.len()
        )));
    }
    let field = |i: usize| fields.get_borrowed_item(i);
    let blob = |i: usize| -> PyResult<Option<Vec<u8>>> {
        let value = field(i)?;
        if value.is_none() {
            return Ok(None);
        }
        Ok(Some(value.cast::<PyBytes>()?.as_bytes().to_vec()))
    };
    let text = |i: usize| -> PyResult<Option<String>> {
        let value = field(i)?;
        if value.is_none() {
            return Ok(None);
        }
        value.extract()
    };
    Ok(ItemRow {
        key: key_from(field(0)?.cast::<PyBytes>()?.as_bytes())?,
        version: field(1)?.extract()?,
        status: field(2)?.extract()?,
        input: blob(3)?,
        output: blob(4)?,
        error_type: text(5)?,
        error: text(6)?,
        traceback: text(7)?,
        attempts: field(8)?.extract()?,
        started: field(9)?.extract()?,
        ended: field(10)?.extract()?,
    })
}

/// Iterates a checkpoint's rows page by page, so a checkpoint of millions of rows is
/// never held in memory at once. Rows are append-only, so paging by `seq` is consistent.
#[pyclass(module = "snapperable._core", name = "RowIterator")]
pub struct PyRowIterator {
    checkpoint: Py<PySqliteCheckpoint>,
    version: Option<i64>,
    with_output: bool,
    /// The `seq` of the last row fetched.
    after: i64,
    page: VecDeque<RowInfo>,
    exhausted: bool,
}

#[pymethods]
impl PyRowIterator {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        if self.page.is_empty() && !self.exhausted {
            let checkpoint = self.checkpoint.get();
            let (version, after, with_output) = (self.version, self.after, self.with_output);
            let limit = if with_output { ROWS_WITH_OUTPUT_PAGE } else { ROWS_PAGE };
            let page = py.detach(|| {
                checkpoint
                    .inner
                    .with_store(|store| store.rows_after(version, after, limit, with_output))
            })?;
            self.exhausted = page.len() < limit;
            if let Some(last) = page.last() {
                self.after = last.seq;
            }
            self.page = page.into();
        }
        let Some(row) = self.page.pop_front() else {
            return Ok(None);
        };
        let fields = (
            row.seq,
            PyBytes::new(py, &row.key),
            row.version,
            row.status,
            row.input.map(|input| PyBytes::new(py, &input)),
            row.error_type,
            row.error,
            row.traceback,
            row.attempts,
            row.started,
            row.ended,
            row.output.map(|output| PyBytes::new(py, &output)),
        );
        row_info_class(py)?.call1(fields).map(Some)
    }
}
