//! `snapperable._core`: the Rust backend of snapperable (docs/architecture.md, the
//! backend contract).
//!
//! It provides, at module level, what the `Backend` Protocol of `snapperable/_contract.py`
//! names: input keys, key sets and SQLite checkpoints with a group-committing writer.
//! This file only registers; the domain logic (`contract`, `keys`, `pickles`, `store/`,
//! `writer`, `checkpoint`) is pure Rust, `python/` is the thin binding layer over it,
//! and `errors` the one place where the core's errors become Python's.

pub mod checkpoint;
pub mod contract;
pub mod errors;
pub mod keys;
pub mod pickles;
pub mod store;
pub mod writer;

mod python;

use pyo3::prelude::*;

use python::{keys as py_keys, store as py_store};

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("BACKEND_NAME", "rust")?;
    // The contract's constants, checked equal to `snapperable._contract`'s by tests.
    m.add("KEY_SIZE", contract::KEY_SIZE)?;
    m.add("STATUS_OK", contract::STATUS_OK)?;
    m.add("STATUS_FAILED", contract::STATUS_FAILED)?;
    m.add("PICKLE_PROTOCOL", contract::PICKLE_PROTOCOL)?;
    // Private, for tests: the bound on pending rows (`writer::Limits::DEFAULT`); set
    // without `add`, which would list it in `__all__`.
    m.setattr("_MAX_PENDING_ROWS", writer::Limits::DEFAULT.rows)?;
    m.add_function(wrap_pyfunction!(py_keys::input_key, m)?)?;
    m.add_function(wrap_pyfunction!(py_keys::input_keys, m)?)?;
    m.add_function(wrap_pyfunction!(py_store::new_key_set, m)?)?;
    m.add_function(wrap_pyfunction!(py_store::open_sqlite, m)?)?;
    m.add_function(wrap_pyfunction!(py_store::open_sqlite_reader, m)?)?;
    m.add_class::<py_store::PyKeySet>()?;
    m.add_class::<py_store::PyKeyIterator>()?;
    m.add_class::<py_store::PySqliteCheckpoint>()?;
    m.add_class::<py_store::PyRowIterator>()?;
    Ok(())
}
