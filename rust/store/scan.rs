//! The full scans of the items table, stepped through SQLite's C API directly: each
//! column read by index as one borrowed value (`sqlite3_column_value`, then its type and
//! bytes), where rusqlite's `Row::get_ref` makes four calls a column, each of them
//! re-checking the statement. A scan reads five or six columns of every row of a file
//! of millions, so this is most of what a resume costs besides SQLite's own stepping.
//!
//! The values are SQLite's "unprotected" ones: safe to read as long as no other thread
//! uses the connection meanwhile, which holds for every connection of a store (each is
//! used by one thread at a time, `SQLITE_OPEN_NO_MUTEX`).

use std::ffi::{c_int, CStr};
use std::marker::PhantomData;
use std::ptr::NonNull;

use rusqlite::ffi;
use rusqlite::types::ValueRef;
use rusqlite::Connection;

use super::row_checksum::Sequence;
use super::schema::sqlite_error;
use crate::errors::Result;

/// Hands each row of `sql` to `each`, in `seq` order, until it returns false. `sql`
/// reads the items table with `seq` as its first column, and binds `?1` to `version`
/// and `?2`, `?3` to the inclusive `seq` range (every row if `range` is None). In a
/// format-2 table (`checksummed`) each row's number is checked before `each` sees it
/// (see `Sequence`), and a range scanned to its end must have met every row of it.
pub(super) fn scan_seq_range(
    conn: &Connection,
    path: &str,
    checksummed: bool,
    sql: &CStr,
    version: i64,
    range: Option<(i64, i64)>,
    mut each: impl FnMut(&ScanRow<'_>) -> Result<bool>,
) -> Result<()> {
    let fail = |e| sqlite_error(path, e);
    // A format-2 table's rows are numbered from 1 (see `Sequence`).
    let (first, last) = range.unwrap_or((if checksummed { 1 } else { i64::MIN }, i64::MAX));
    let mut found = RowScan::new(conn, sql, &[version, first, last]).map_err(fail)?;
    let mut sequence = Sequence::from(first);
    while let Some(row) = found.next().map_err(fail)? {
        if checksummed {
            sequence.check(path, &row)?;
        }
        if !each(&row)? {
            return Ok(());
        }
    }
    if checksummed && range.is_some() {
        sequence.finish(path, last)?;
    }
    Ok(())
}

/// A prepared query over one connection, finalized when dropped; its rows are read one
/// at a time ([`RowScan::next`]), each borrowed until the next.
pub(super) struct RowScan<'conn> {
    stmt: NonNull<ffi::sqlite3_stmt>,
    db: *mut ffi::sqlite3,
    conn: PhantomData<&'conn Connection>,
}

/// One row of a [`RowScan`]: its values borrow SQLite's buffers until the scan steps on.
pub(super) struct ScanRow<'scan> {
    stmt: NonNull<ffi::sqlite3_stmt>,
    scan: PhantomData<&'scan mut ()>,
}

impl<'conn> RowScan<'conn> {
    /// Prepares `sql` on `conn` and binds `params` to `?1`, `?2`, ... in order.
    pub(super) fn new(conn: &'conn Connection, sql: &CStr, params: &[i64]) -> rusqlite::Result<Self> {
        // SAFETY: the handle outlives the statement (the borrow of `conn`), and the
        // statement is finalized on drop, before the connection can be closed.
        let db = unsafe { conn.handle() };
        let mut raw = std::ptr::null_mut();
        // SAFETY: `sql` is NUL-terminated; `raw` receives the statement or NULL.
        let rc = unsafe {
            ffi::sqlite3_prepare_v2(db, sql.as_ptr(), -1, &mut raw, std::ptr::null_mut())
        };
        if rc != ffi::SQLITE_OK {
            if let Some(stmt) = NonNull::new(raw) {
                // SAFETY: a statement prepared on failure is still ours to finalize.
                unsafe { ffi::sqlite3_finalize(stmt.as_ptr()) };
            }
            return Err(failure(db, rc));
        }
        let Some(stmt) = NonNull::new(raw) else {
            // Only for SQL without a statement (blank); never one of ours.
            return Err(failure(db, ffi::SQLITE_MISUSE));
        };
        let scan = RowScan {
            stmt,
            db,
            conn: PhantomData,
        };
        for (index, &value) in (1..).zip(params) {
            // SAFETY: a live statement; an index out of range is reported, not UB.
            let rc = unsafe { ffi::sqlite3_bind_int64(scan.stmt.as_ptr(), index, value) };
            if rc != ffi::SQLITE_OK {
                return Err(failure(db, rc));
            }
        }
        Ok(scan)
    }

    /// The next row, None at the end.
    pub(super) fn next(&mut self) -> rusqlite::Result<Option<ScanRow<'_>>> {
        // SAFETY: a live statement, stepped by this thread only.
        match unsafe { ffi::sqlite3_step(self.stmt.as_ptr()) } {
            ffi::SQLITE_ROW => Ok(Some(ScanRow {
                stmt: self.stmt,
                scan: PhantomData,
            })),
            ffi::SQLITE_DONE => Ok(None),
            rc => Err(failure(self.db, rc)),
        }
    }
}

impl Drop for RowScan<'_> {
    fn drop(&mut self) {
        // SAFETY: finalized once, here; its result repeats a step's error, reported then.
        unsafe { ffi::sqlite3_finalize(self.stmt.as_ptr()) };
    }
}

impl ScanRow<'_> {
    /// The value of column `index`, borrowed; an index past the columns reads as NULL.
    pub(super) fn value(&self, index: usize) -> ValueRef<'_> {
        let stmt = self.stmt.as_ptr();
        let index = c_int::try_from(index).unwrap_or(c_int::MAX);
        // SAFETY: the statement holds a row (this value exists only between a step that
        // returned one and the next); each pointer read stays valid until that next
        // step, which needs `&mut RowScan` and so cannot happen while `self` is borrowed.
        // The blob and text pointers are asked for before their lengths, as SQLite
        // requires, and only of values of that type, so no conversion moves them.
        unsafe {
            let value = ffi::sqlite3_column_value(stmt, index);
            match ffi::sqlite3_value_type(value) {
                ffi::SQLITE_INTEGER => ValueRef::Integer(ffi::sqlite3_value_int64(value)),
                ffi::SQLITE_FLOAT => ValueRef::Real(ffi::sqlite3_value_double(value)),
                ffi::SQLITE_TEXT => {
                    let text = ffi::sqlite3_value_text(value);
                    ValueRef::Text(borrowed(text, ffi::sqlite3_value_bytes(value)))
                }
                ffi::SQLITE_BLOB => {
                    let blob = ffi::sqlite3_value_blob(value).cast::<u8>();
                    ValueRef::Blob(borrowed(blob, ffi::sqlite3_value_bytes(value)))
                }
                _ => ValueRef::Null,
            }
        }
    }

    /// Column `index` as an integer, None if it holds another type.
    pub(super) fn integer(&self, index: usize) -> Option<i64> {
        match self.value(index) {
            ValueRef::Integer(number) => Some(number),
            _ => None,
        }
    }
}

/// `length` bytes at `data` as a slice (empty for NULL, which SQLite returns for an
/// empty value, or for a failed allocation, which then reads as empty).
///
/// # Safety
/// `data` must point to `length` readable bytes for the returned lifetime.
unsafe fn borrowed<'a>(data: *const u8, length: c_int) -> &'a [u8] {
    match usize::try_from(length) {
        Ok(length) if length > 0 && !data.is_null() => {
            // SAFETY: as the caller guarantees.
            unsafe { std::slice::from_raw_parts(data, length) }
        }
        _ => &[],
    }
}

/// The error of result code `rc` on `db`, with SQLite's message when it is about `rc`.
fn failure(db: *mut ffi::sqlite3, rc: c_int) -> rusqlite::Error {
    // SAFETY: `db` is a live connection; its messages are NUL-terminated and are copied
    // out before anything else can change them.
    let message = unsafe {
        let text = if ffi::sqlite3_extended_errcode(db) == rc || ffi::sqlite3_errcode(db) == rc {
            ffi::sqlite3_errmsg(db)
        } else {
            ffi::sqlite3_errstr(rc)
        };
        (!text.is_null()).then(|| CStr::from_ptr(text).to_string_lossy().into_owned())
    };
    rusqlite::Error::SqliteFailure(ffi::Error::new(rc), message)
}
