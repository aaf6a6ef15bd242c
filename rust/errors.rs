//! The one error type of the core, and the one place it becomes a Python exception.
//!
//! Domain code (keys, store, writer) returns [`Error`] and knows nothing of Python; the
//! binding layer converts with `?` through `From<Error> for PyErr`, which maps every
//! variant onto a class of `snapperable.errors` so that callers see the same exception
//! types whichever backend is active.

use std::fmt;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyType;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Not a SQLite database, damaged, or not a snapperable checkpoint. `problem` reads
    /// after the path: "is not a snapperable checkpoint".
    Corrupt { path: String, problem: String },
    /// A checkpoint written by a newer, incompatible format version.
    Format {
        path: String,
        found: i64,
        supported: i64,
    },
    /// Any other failure to open, read or write a checkpoint.
    Checkpoint { path: String, detail: String },
    /// The background writer failed; `cause` is what it failed with.
    Writer { path: String, cause: Box<Error> },
    /// The checkpoint was used after `close()`.
    Closed { path: String },
    /// The checkpoint was opened by process `owner`; this is a child forked from it,
    /// which has neither the writer thread nor a usable SQLite connection.
    Forked { path: String, owner: u32 },
    /// A caller passed a value outside what the function accepts.
    InvalidArgument(String),
    /// An input key cannot be computed for a value (too deep, too large, unpicklable).
    Key(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Corrupt { path, problem } => write!(
                f,
                "checkpoint {path} {problem}; snapperable never resets such a file: move it \
                 aside (or restore a backup) and run again"
            ),
            Error::Format {
                path,
                found,
                supported,
            } => write!(
                f,
                "checkpoint {path} has format version {found}, newer than this snapperable \
                 reads (up to {supported}); upgrade snapperable to resume it"
            ),
            Error::Checkpoint { path, detail } => write!(f, "checkpoint {path}: {detail}"),
            Error::Writer { path, cause } => write!(
                f,
                "the background writer failed to save results to {path}; nothing recorded \
                 after the failure was saved: {cause}"
            ),
            Error::Closed { path } => write!(f, "checkpoint {path} is closed"),
            Error::Forked { path, owner } => write!(
                f,
                "checkpoint {path} was opened in process {owner}; a forked child cannot use \
                 it: open a checkpoint of its own in the child"
            ),
            Error::InvalidArgument(message) | Error::Key(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Error {}

/// The class of `snapperable.errors` named `name`, or `None` if the module cannot be
/// imported (a broken installation): the caller then falls back to the builtin base.
fn snapperable_error_class<'py>(py: Python<'py>, name: &str) -> Option<Bound<'py, PyType>> {
    let module = py.import("snapperable.errors").ok()?;
    module.getattr(name).ok()?.cast_into::<PyType>().ok()
}

fn raise_as<Fallback: pyo3::PyTypeInfo>(py: Python<'_>, class: &str, message: String) -> PyErr {
    match snapperable_error_class(py, class) {
        Some(cls) => PyErr::from_type(cls, message),
        None => PyErr::new::<Fallback, _>(message),
    }
}

impl Error {
    fn into_pyerr(self, py: Python<'_>) -> PyErr {
        let message = self.to_string();
        match self {
            Error::Corrupt { .. } => {
                raise_as::<PyValueError>(py, "CheckpointCorruptError", message)
            }
            Error::Format { .. } => raise_as::<PyValueError>(py, "CheckpointFormatError", message),
            Error::Checkpoint { .. } | Error::Closed { .. } => {
                raise_as::<PyOSError>(py, "CheckpointError", message)
            }
            Error::Writer { cause, .. } => {
                // Chained, so a traceback shows the SQLite failure as the direct cause.
                let err = raise_as::<PyOSError>(py, "WriterError", message);
                err.set_cause(py, Some(cause.into_pyerr(py)));
                err
            }
            Error::Forked { .. } => raise_as::<PyRuntimeError>(py, "ForkedProcessError", message),
            Error::InvalidArgument(_) => PyValueError::new_err(message),
            Error::Key(_) => PyTypeError::new_err(message),
        }
    }
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        Python::attach(|py| err.into_pyerr(py))
    }
}
