//! The format's constants, the row types, and how a stored row is read back: a value
//! that is not what the schema says is damage to the file, reported as such.

use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::ErrorCode;

use super::scan::ScanRow;

use rusqlite::types::ValueRef;

use crate::contract::STATUS_OK;
use crate::errors::{Error, Result};
use crate::keys::Key;

/// The one schema, shared with the pure-Python backend.
pub(super) const SCHEMA: &str = include_str!("../../python/snapperable/schema.sql");
/// `PRAGMA application_id` of a snapperable checkpoint: "SnaP".
pub const APPLICATION_ID: i64 = 0x536e_6150;
/// `PRAGMA user_version`: the newest format this code reads and the one it writes.
pub const FORMAT_VERSION: i64 = 2;
/// The format without row checksums, read and written as it is (README).
pub const UNCHECKED_FORMAT: i64 = 1;
/// Fewer bytes than any item row takes in the file (its 16-byte key alone is more):
/// bounds how many rows a file of a given size can hold.
pub(super) const MIN_ROW_BYTES: i64 = 16;

/// One finished attempt at one item, as the writer appends it.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemRow {
    pub key: Key,
    pub version: i64,
    pub status: i64,
    pub input: Option<Vec<u8>>,
    pub output: Option<Vec<u8>>,
    pub error_type: Option<String>,
    pub error: Option<String>,
    pub traceback: Option<String>,
    pub attempts: i64,
    pub started: f64,
    pub ended: f64,
}

/// An item row read back for reports and the reader; `output` only when asked for
/// (metrics and reports never need it, and outputs are most of a file's bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct RowInfo {
    pub seq: i64,
    pub key: Key,
    pub version: i64,
    pub status: i64,
    pub input: Option<Vec<u8>>,
    pub error_type: Option<String>,
    pub error: Option<String>,
    pub traceback: Option<String>,
    pub attempts: i64,
    pub started: f64,
    pub ended: f64,
    pub output: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VersionRow {
    pub id: i64,
    pub fingerprint: String,
    pub parts: String,
    pub uses: i64,
    pub created: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// Survives power loss (the default; docs/architecture.md 7).
    Full,
    /// Survives a crash of the process, not of the machine; faster commits.
    Normal,
}

impl ItemRow {
    /// Status ok, one attempt, no input and no error: 5 values vary, not 11.
    pub(super) fn is_plain(&self) -> bool {
        self.status == STATUS_OK
            && self.attempts == 1
            && self.input.is_none()
            && self.error_type.is_none()
            && self.error.is_none()
            && self.traceback.is_none()
    }
}

impl Synchronous {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "full" => Ok(Self::Full),
            "normal" => Ok(Self::Normal),
            other => Err(Error::InvalidArgument(format!(
                "synchronous must be 'full' or 'normal', not {other:?}"
            ))),
        }
    }

    pub(super) fn pragma(self) -> &'static str {
        match self {
            Self::Full => "PRAGMA synchronous=FULL",
            Self::Normal => "PRAGMA synchronous=NORMAL",
        }
    }
}

/// Maps a SQLite failure on `path` to the error callers see, as the pure backend's
/// `_mapped` does: a file SQLite does not recognise is `NotACheckpoint`, damage to one
/// is `Corrupt`, anything else (I/O, locks, full disk) is `Checkpoint`; each with
/// SQLite's own message.
pub fn sqlite_error(path: &str, err: rusqlite::Error) -> Error {
    let path = path.to_owned();
    // A read past the end of the file, which only a damaged page number (or a file cut
    // short) asks for.
    let short_read = err
        .sqlite_error()
        .is_some_and(|e| e.extended_code == rusqlite::ffi::SQLITE_IOERR_SHORT_READ);
    match err.sqlite_error_code() {
        _ if short_read => Error::Corrupt {
            path,
            problem: err.to_string(),
        },
        Some(ErrorCode::NotADatabase) => Error::NotACheckpoint {
            path,
            reason: err.to_string(),
        },
        Some(ErrorCode::DatabaseCorrupt) => Error::Corrupt {
            path,
            problem: err.to_string(),
        },
        _ => match err {
            rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => Error::Corrupt {
                path,
                problem: format!("a value of an unexpected type ({err})"),
            },
            _ => Error::Checkpoint {
                path,
                detail: err.to_string(),
            },
        },
    }
}

/// The key in column `index` of `row`, read from the checkpoint at `path`; a key that
/// is not a 16-byte blob means the file was damaged or written by something else.
#[inline]
pub(super) fn key_at(path: &str, row: &ScanRow<'_>, index: usize) -> Result<Key> {
    match row.value(index) {
        ValueRef::Blob(blob) => Key::try_from(blob).ok(),
        _ => None,
    }
        .ok_or_else(|| Error::BadKey {
            path: path.to_owned(),
            seq: row_seq(row),
        })
}

/// Damage found in the item row `row` (its `seq` in column 0) of the checkpoint at `path`.
pub(super) fn corrupt_row(path: &str, row: &ScanRow<'_>, problem: &str) -> Error {
    Error::BadRow {
        path: path.to_owned(),
        seq: row_seq(row),
        problem: problem.to_owned(),
    }
}

/// A row with a value of another type than its column's (say, a version that is not an
/// integer): damage.
#[cold]
pub(super) fn wrong_type(path: &str, row: &ScanRow<'_>) -> Error {
    corrupt_row(path, row, "holds a value of another type than its column's")
}

/// The `seq` of `row` (column 0), None if even that is unreadable.
fn row_seq(row: &ScanRow<'_>) -> Option<i64> {
    row.integer(0)
}

/// Now, in Unix seconds, as `time.time()` gives it: the time of the rows' `started` and
/// `ended` and of a version's `created`.
pub fn unix_now() -> f64 {
    unix_seconds(SystemTime::now())
}

/// `time` in Unix seconds; negative before 1970 (a clock set back that far still gives
/// times in order, not all 0).
fn unix_seconds(time: SystemTime) -> f64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(since) => since.as_secs_f64(),
        Err(before) => -before.duration().as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn unix_seconds_are_signed_around_1970() {
        let at = |offset: f64| {
            let delta = Duration::from_secs_f64(offset.abs());
            let time = if offset < 0.0 {
                UNIX_EPOCH - delta
            } else {
                UNIX_EPOCH + delta
            };
            unix_seconds(time)
        };
        assert_eq!(at(0.0), 0.0);
        assert_eq!(at(1.5), 1.5);
        assert_eq!(at(-1.5), -1.5);
        assert_eq!(at(-86_400.0 * 365.0), -86_400.0 * 365.0);
        assert!(at(-2.0) < at(-1.0) && at(-1.0) < at(0.0));
        assert!(unix_now() > 1.6e9);
    }
}
