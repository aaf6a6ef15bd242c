//! What is checked of an existing checkpoint before anything is written to it: its first
//! 100 bytes (read as plain bytes, before SQLite opens the file), then its header
//! fields and schema. The twin of `python/snapperable/_sqlite_file.py`, step for step,
//! so that both backends refuse the same files with the same words.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use rusqlite::types::{Value, ValueRef};
use rusqlite::Connection;

use super::schema::{sqlite_error, APPLICATION_ID, FORMAT_VERSION, SCHEMA, UNCHECKED_FORMAT};
use crate::errors::{Error, Result};

const HEADER_SIZE: usize = 100;
const MAGIC: &[u8; 16] = b"SQLite format 3\0";
/// The columns format 2 added: format 1 is format 2 without them.
const CHECKSUM_COLUMN: &str = "checksum";

fn corrupt(path: &str, problem: String) -> Error {
    Error::Corrupt {
        path: path.to_owned(),
        problem,
    }
}

fn be_u32(head: &[u8], at: usize) -> u32 {
    head.get(at..at + 4)
        .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
        .map_or(0, u32::from_be_bytes)
}

/// Raises `Corrupt` for a non-empty file that is not a SQLite database, or is shorter
/// than its header says (cut short) while no write-ahead log could hold the rest.
/// An empty file passes: it is a new checkpoint.
pub(super) fn check_raw_header(file: &Path, path: &str) -> Result<()> {
    let read = || -> std::io::Result<(u64, Vec<u8>)> {
        let mut opened = std::fs::File::open(file)?;
        let size = opened.metadata()?.len();
        let mut head = Vec::with_capacity(HEADER_SIZE);
        opened
            .by_ref()
            .take(HEADER_SIZE as u64)
            .read_to_end(&mut head)?;
        Ok((size, head))
    };
    let (size, head) = read().map_err(|err| Error::Checkpoint {
        path: path.to_owned(),
        detail: format!("cannot read the file: {err}"),
    })?;
    if size == 0 {
        return Ok(());
    }
    if head.len() < HEADER_SIZE {
        return Err(corrupt(
            path,
            format!("the file is cut short ({size} bytes, less than a SQLite header)"),
        ));
    }
    if !head.starts_with(MAGIC) {
        return Err(Error::NotACheckpoint {
            path: path.to_owned(),
            reason: "file is not a database".to_owned(), // SQLite's own words
        });
    }
    let page_size = match u16::from_be_bytes([head[16], head[17]]) {
        1 => 65_536u64,
        other => u64::from(other),
    };
    if page_size < 512 || !page_size.is_power_of_two() || head[21..24] != [0x40, 0x20, 0x20] {
        return Err(corrupt(path, "its SQLite header is not valid".to_owned()));
    }
    let (change_counter, page_count, valid_for) =
        (be_u32(&head, 24), be_u32(&head, 28), be_u32(&head, 92));
    // The page count is meaningful only when written with the change counter it
    // matches (SQLite 3.7.0+); a WAL that holds committed pages may hold the rest.
    if page_count != 0 && change_counter == valid_for && !has_write_ahead_log(file) {
        let expected = u64::from(page_count) * page_size;
        if size < expected || size % page_size != 0 {
            return Err(corrupt(
                path,
                format!(
                    "the file is cut short (its header says {page_count} pages of {page_size} \
                     bytes, the file has {size} bytes)"
                ),
            ));
        }
    }
    Ok(())
}

/// Does a non-empty `-wal` file lie beside the checkpoint (a run that crashed)? Then
/// the checks read through a read-only connection, which never writes the log back
/// into the file as the last connection to close does.
pub(super) fn has_write_ahead_log(file: &Path) -> bool {
    let mut wal = PathBuf::from(file).into_os_string();
    wal.push("-wal");
    std::fs::metadata(wal).is_ok_and(|meta| meta.len() > 0)
}

/// Raises unless the file open on `conn` (not a new one) is a checkpoint this code
/// reads, with the schema of its format; returns that format.
pub(super) fn check_existing(
    conn: &Connection,
    path: &str,
    application_id: i64,
    user_version: i64,
) -> Result<i64> {
    if application_id != APPLICATION_ID {
        return Err(Error::NotACheckpoint {
            path: path.to_owned(),
            reason: format!("application_id {application_id}"),
        });
    }
    if user_version > FORMAT_VERSION {
        return Err(Error::Format {
            path: path.to_owned(),
            found: user_version,
            supported: FORMAT_VERSION,
        });
    }
    if user_version < 1 {
        return Err(corrupt(
            path,
            format!("format {user_version} in its header"),
        ));
    }
    match schema_problem(conn, user_version).map_err(|e| sqlite_error(path, e))? {
        Some(problem) => Err(corrupt(path, problem)),
        None => Ok(user_version),
    }
}

/// `value` owned; a text that is not UTF-8 (damage) with its bad bytes replaced, where
/// `Value`'s own conversion would panic.
fn owned(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Text(text) => Value::Text(String::from_utf8_lossy(text).into_owned()),
        other => Value::from(other),
    }
}

/// `(type, name, table)` of each schema object, and each table's columns as `PRAGMA
/// table_xinfo` gives them: what the structure of a checkpoint must be.
struct Schema {
    objects: BTreeSet<(String, String, String)>,
    columns: BTreeMap<String, Vec<Vec<Value>>>,
}

fn read_schema(conn: &Connection) -> rusqlite::Result<Schema> {
    let mut objects = BTreeSet::new();
    let mut stmt = conn.prepare("SELECT type, name, tbl_name FROM sqlite_master")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let text = |index: usize| -> rusqlite::Result<String> {
            Ok(match row.get_ref(index)? {
                ValueRef::Text(text) => String::from_utf8_lossy(text).into_owned(),
                other => format!("{other:?}"),
            })
        };
        let name = text(1)?;
        // SQLite's own (sqlite_stat1 after ANALYZE).
        if !name.starts_with("sqlite_") {
            objects.insert((text(0)?, name, text(2)?));
        }
    }
    let mut columns = BTreeMap::new();
    for (kind, name, _) in &objects {
        if kind != "table" || name.contains('"') {
            continue;
        }
        let mut stmt = conn.prepare(&format!("PRAGMA table_xinfo(\"{name}\")"))?;
        let count = stmt.column_count();
        let found = stmt
            .query_map([], |row| {
                (0..count).map(|i| row.get_ref(i).map(owned)).collect()
            })?
            .collect::<rusqlite::Result<Vec<Vec<Value>>>>()?;
        columns.insert(name.clone(), found);
    }
    Ok(Schema { objects, columns })
}

/// The structure the schema gives, for format 2; without the checksum columns, for
/// format 1.
fn expected_schema(format: i64) -> rusqlite::Result<Schema> {
    let conn = Connection::open_in_memory()?;
    conn.execute_batch(SCHEMA)?;
    let mut schema = read_schema(&conn)?;
    if format == UNCHECKED_FORMAT {
        for found in schema.columns.values_mut() {
            found.retain(|column| column.get(1) != Some(&Value::Text(CHECKSUM_COLUMN.to_owned())));
            // Numbered as format 1 numbers them: without the gap.
            for (cid, column) in (0i64..).zip(found.iter_mut()) {
                if let Some(number) = column.first_mut() {
                    *number = Value::Integer(cid);
                }
            }
        }
    }
    Ok(schema)
}

fn schema_problem(conn: &Connection, format: i64) -> rusqlite::Result<Option<String>> {
    let found = read_schema(conn)?;
    let want = expected_schema(format)?;
    if found.objects != want.objects {
        let names = |of: &BTreeSet<(String, String, String)>,
                     not_in: &BTreeSet<(String, String, String)>| {
            let listed: Vec<&str> = of
                .difference(not_in)
                .map(|(_, name, _)| name.as_str())
                .collect();
            if listed.is_empty() {
                "none".to_owned()
            } else {
                listed.join(", ")
            }
        };
        return Ok(Some(format!(
            "its schema is not format {format}'s (missing: {}; unexpected: {})",
            names(&want.objects, &found.objects),
            names(&found.objects, &want.objects)
        )));
    }
    for (table, columns) in &want.columns {
        if found.columns.get(table) != Some(columns) {
            return Ok(Some(format!(
                "its schema is not format {format}'s (the columns of table {table} differ)"
            )));
        }
    }
    let stored: Vec<Value> = conn
        .prepare("SELECT value FROM meta WHERE name = 'format_version'")?
        .query_map([], |row| row.get_ref(0).map(owned))?
        .collect::<rusqlite::Result<_>>()?;
    if stored != [Value::Text(format.to_string())] {
        return Ok(Some(format!(
            "its meta table does not say format_version {format}"
        )));
    }
    Ok(None)
}
