//! The one error type of the core, and the one place it becomes a Python exception.
//!
//! Domain code (keys, store, writer) returns [`Error`] and knows nothing of Python; the
//! binding layer converts with `?` through `From<Error> for PyErr`, which maps every
//! variant onto a class of `snapperable.errors` (imported with `import_exception!`, as
//! pyca/cryptography does), so callers see the same exception types whichever backend
//! is active.
//!
//! The words of each message are not here: each variant carries the facts of its
//! failure, and the classmethod of `snapperable/errors.py` that the pure-Python backend
//! calls for the same failure builds the message from them (`CheckpointFormatError.newer`
//! for [`Error::Format`], ...). So a failure reads the same from either backend.

use std::any::Any;
use std::fmt;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use pyo3::PyTypeInfo;

pub type Result<T, E = Error> = std::result::Result<T, E>;

mod classes {
    pyo3::import_exception!(snapperable.errors, CheckpointError);
    pyo3::import_exception!(snapperable.errors, CheckpointCorruptError);
    pyo3::import_exception!(snapperable.errors, CheckpointFormatError);
    pyo3::import_exception!(snapperable.errors, WriterError);
    pyo3::import_exception!(snapperable.errors, ForkedProcessError);
}
use classes::{
    CheckpointCorruptError, CheckpointError, CheckpointFormatError, ForkedProcessError, WriterError,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The file is not a snapperable checkpoint; `reason` says what gave it away
    /// ("application_id 0", or SQLite's "file is not a database").
    NotACheckpoint { path: String, reason: String },
    /// A checkpoint, damaged; `problem` says how (SQLite's message, or what was found).
    Corrupt { path: String, problem: String },
    /// Item row `seq` (None if even that is unreadable) is not what the format says.
    BadRow {
        path: String,
        seq: Option<i64>,
        problem: String,
    },
    /// Item row `seq` has a key that is not a 16-byte blob.
    BadKey { path: String, seq: Option<i64> },
    /// A checkpoint written by a newer, incompatible format version.
    Format {
        path: String,
        found: i64,
        supported: i64,
    },
    /// The file could not be created.
    CannotCreate { path: String, reason: String },
    /// Any other failure to open, read or write a checkpoint (for SQLite: its message).
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

impl Error {
    /// A lock poisoned by a panic while it was held: never a user's input or file, but
    /// if it happens it must surface as an error, not as a second panic.
    pub fn poisoned(path: &str) -> Self {
        Error::Checkpoint {
            path: path.to_owned(),
            detail: "internal state was left inconsistent by an earlier panic".to_owned(),
        }
    }

    /// A panic of one of the core's threads (`thread` names it): a bug, never a user's
    /// input or file, reported with the panic's message.
    pub fn panicked(path: &str, thread: &str, payload: &(dyn Any + Send)) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("no message");
        Error::Checkpoint {
            path: path.to_owned(),
            detail: format!("internal error: the {thread} thread panicked ({message})"),
        }
    }
}

/// For Rust callers and tests only: the message a user sees is built by
/// `snapperable.errors` (see [`Error::into_pyerr`]), except for the two variants that
/// are plain `ValueError`/`TypeError` messages.
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument(message) | Error::Key(message) => f.write_str(message),
            other => fmt::Debug::fmt(other, f),
        }
    }
}

impl std::error::Error for Error {}

/// The exception `Class.builder(*args)` returns: a class of `snapperable.errors` and
/// one of its message-building classmethods. If the call itself fails (a broken
/// installation), that failure is what is raised.
fn built<'py, Class: PyTypeInfo>(
    py: Python<'py>,
    builder: &str,
    args: impl pyo3::call::PyCallArgs<'py>,
) -> PyErr {
    match Class::type_object(py).call_method1(builder, args) {
        Ok(exception) => PyErr::from_value(exception),
        Err(failed) => failed,
    }
}

impl Error {
    fn into_pyerr(self, py: Python<'_>) -> PyErr {
        type Corrupt = CheckpointCorruptError;
        match self {
            Error::NotACheckpoint { path, reason } => {
                built::<Corrupt>(py, "not_a_checkpoint", (path, reason))
            }
            Error::Corrupt { path, problem } => built::<Corrupt>(py, "damaged", (path, problem)),
            Error::BadRow { path, seq, problem } => {
                built::<Corrupt>(py, "bad_row", (path, seq, problem))
            }
            Error::BadKey { path, seq } => built::<Corrupt>(py, "bad_key", (path, seq)),
            Error::Format {
                path,
                found,
                supported,
            } => built::<CheckpointFormatError>(py, "newer", (path, found, supported)),
            Error::CannotCreate { path, reason } => {
                built::<CheckpointError>(py, "cannot_create", (path, reason))
            }
            Error::Checkpoint { path, detail } => {
                built::<CheckpointError>(py, "failed", (path, detail))
            }
            Error::Closed { path } => built::<CheckpointError>(py, "closed", (path,)),
            Error::Writer { path, cause } => {
                // Chained, so a traceback shows the SQLite failure as the direct cause.
                let cause = cause.into_pyerr(py);
                let err = built::<WriterError>(py, "stopped_by", (path, cause.value(py)));
                err.set_cause(py, Some(cause));
                err
            }
            Error::Forked { path, owner } => {
                built::<ForkedProcessError>(py, "opened_in", (path, owner))
            }
            Error::InvalidArgument(message) => PyValueError::new_err(message),
            Error::Key(message) => PyTypeError::new_err(message),
        }
    }
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        Python::attach(|py| err.into_pyerr(py))
    }
}

/// A saved output of the checkpoint at `path` that does not unpickle (`cause`, chained):
/// damage to the checkpoint, as the pure backend reports it.
pub fn unreadable_output(py: Python<'_>, path: &str, cause: PyErr) -> PyErr {
    let err = built::<CheckpointCorruptError>(py, "unreadable_output", (path, cause.value(py)));
    err.set_cause(py, Some(cause));
    err
}

/// A function version's record (`record`, its fields as read) that is not valid.
pub fn bad_version_record(py: Python<'_>, path: &str, record: Bound<'_, PyTuple>) -> PyErr {
    built::<CheckpointCorruptError>(py, "bad_version_record", (path, record))
}
