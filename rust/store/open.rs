//! Opening a checkpoint (creating the file and the schema, refusing what is not ours),
//! appending rows, and the small reads (versions, pages of rows); also what every scan
//! of the file needs from the connection (a mapping, a bound on the rows).

use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use super::checks::{check_existing, check_raw_header, has_write_ahead_log};
use super::row_checksum::{
    checksum_at, head_matches, mismatch, output_matches, read_rest, rest_matches, row_checksum,
    version_checksum, Sequence,
};
use super::scan::RowScan;
use super::schema::{
    corrupt_row, key_at, sqlite_error, unix_now, wrong_type, ItemRow, RowInfo, Synchronous,
    VersionRow, APPLICATION_ID, FORMAT_VERSION, MIN_ROW_BYTES, SCHEMA, UNCHECKED_FORMAT,
};
use crate::contract::STATUS_OK;
use crate::errors::{Error, Result};

/// Bytes of the file SQLite maps into memory during a full scan: it then reads pages
/// in place instead of copying each one out of the OS cache (a scan of a million rows
/// takes about half the time). Off otherwise, so writes never depend on a mapping.
pub(super) const SCAN_MMAP_SIZE: i64 = 1 << 30;
/// Long enough to ride out another process's commit, short enough to report a real lock.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_millis(5000);

/// Plain ok rows per multi-row INSERT: 6 parameters a row, well within SQLite's limit
/// of 32,766; beyond a few dozen rows the statement's fixed cost no longer shows.
const PLAIN_ROWS_PER_INSERT: usize = 64;

/// `INSERT` of `rows` plain ok rows, 5 values each (status 0 and 1 attempt fixed) and
/// their checksum if `checksummed` (format 2).
///
/// `OR FAIL`: a statement that writes several rows and may abort half way needs a
/// statement journal (a copy of each page it touches, to undo just that statement);
/// with FAIL nothing is undone per statement, and none is kept (~10% of a row's cost).
/// Nothing is lost by it: any failure rolls back the whole transaction (`append`).
fn plain_insert(rows: usize, checksummed: bool) -> String {
    let (column, value) = if checksummed {
        (", checksum", ", ?")
    } else {
        ("", "")
    };
    let values = format!("(?, ?, {STATUS_OK}, ?, 1, ?, ?{value})");
    format!(
        "INSERT OR FAIL INTO items (key, version, status, output, attempts, started, ended{column}) VALUES {}",
        vec![values; rows].join(", ")
    )
}

static PLAIN_INSERT_FULL: LazyLock<[String; 2]> = LazyLock::new(|| {
    [
        plain_insert(PLAIN_ROWS_PER_INSERT, false),
        plain_insert(PLAIN_ROWS_PER_INSERT, true),
    ]
});

/// An open SQLite checkpoint.
pub struct Store {
    pub(super) path: String,
    /// The path as opened (an OS path: it need not be UTF-8), for a second connection.
    pub(super) file: PathBuf,
    /// Which file `conn` opened (see [`file_identity`]): a second connection is used
    /// only while the path still names that file.
    pub(super) identity: Option<FileIdentity>,
    pub(super) conn: Connection,
    /// Format 2: rows carry checksums, written and checked. A format-1 file is read and
    /// written as format 1 (README "Checkpoint files").
    pub(super) checksummed: bool,
}

impl Store {
    /// Opens the checkpoint at `path`, creating the file (mode 0600) and the schema if
    /// they do not exist, and refusing a file that is not a snapperable checkpoint of a
    /// format this code reads.
    pub fn open(path: &Path, synchronous: Synchronous) -> Result<Self> {
        let name = path.to_string_lossy().into_owned();
        create_private_file(path).map_err(|err| Error::CannotCreate {
            path: name.clone(),
            reason: err.to_string(),
        })?;
        // Nothing is written to a file found damaged: its first bytes are checked
        // before SQLite opens it, the rest before anything is written (`prepare`).
        check_raw_header(path, &name)?;
        let checked = if has_write_ahead_log(path) {
            Some(Self::check_read_only(path, &name)?)
        } else {
            None
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| sqlite_error(&name, e))?;
        let identity = file_identity(path);
        let mut store = Store {
            path: name,
            file: path.to_path_buf(),
            identity,
            conn,
            checksummed: true,
        };
        store.prepare(synchronous, checked)?;
        Ok(store)
    }

    /// The checks of an existing file through a read-only connection (one left with a
    /// write-ahead log, which closing a read-write connection would write back into
    /// it); the file's format, or None for a new (empty) database.
    fn check_read_only(path: &Path, name: &str) -> Result<Option<i64>> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| sqlite_error(name, e))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| sqlite_error(name, e))?;
        let header = Header::read(&conn).map_err(|e| sqlite_error(name, e))?;
        if header.is_fresh() {
            return Ok(None);
        }
        check_existing(&conn, name, header.application_id, header.user_version).map(Some)
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub(super) fn fail(&self, err: rusqlite::Error) -> Error {
        sqlite_error(&self.path, err)
    }

    /// `checked`: the format an earlier read-only check found (`check_read_only`).
    fn prepare(&mut self, synchronous: Synchronous, checked: Option<Option<i64>>) -> Result<()> {
        self.conn
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| self.fail(e))?;
        let mut header = Header::read(&self.conn).map_err(|e| self.fail(e))?;
        if header.is_fresh() {
            header = self.initialize().map_err(|e| self.fail(e))?;
        } else if checked.flatten().is_none() {
            check_existing(
                &self.conn,
                &self.path,
                header.application_id,
                header.user_version,
            )?;
        }
        self.check_header(&header)?;
        self.checksummed = header.user_version != UNCHECKED_FORMAT;
        self.conn
            .execute_batch("PRAGMA journal_mode=WAL")
            .and_then(|()| self.conn.execute_batch(synchronous.pragma()))
            .map_err(|e| self.fail(e))
    }

    /// Opens an existing checkpoint for reading: nothing is created and no row is
    /// written (no schema, no journal mode), so it works beside a running writer (a WAL
    /// reader) and on a read-only file or directory. Opened read-write where the file
    /// allows it (SQLite falls back to read-only where not), so that, closing as the
    /// last connection, it removes the `-wal` and `-shm` it made rather than leave them
    /// behind. Where SQLite cannot set up its shared memory (a read-only directory
    /// without the `-shm` a writer leaves), the file is opened as immutable: no writer
    /// can be changing it then.
    ///
    /// The checks of [`Store::open`] come first: a damaged file is refused before it is
    /// read, and a format-1 file is read without checksums. None for a database made
    /// but never initialized (what a creation cut short leaves, and what
    /// [`Store::open`] initializes): it reads as a checkpoint with nothing saved.
    pub fn open_read_only(path: &Path) -> Result<Option<Self>> {
        let name = path.to_string_lossy().into_owned();
        if path.is_file() {
            check_raw_header(path, &name)?;
        }
        let shared = OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let attempts = [
            (OpenFlags::SQLITE_OPEN_READ_WRITE | shared, "mode=rw"),
            (
                OpenFlags::SQLITE_OPEN_READ_ONLY | shared,
                "mode=ro&immutable=1",
            ),
        ];
        let mut last_error = None;
        for (flags, query) in attempts {
            let uri = format!("{}?{query}", file_uri(&name));
            let opened = Connection::open_with_flags(&uri, flags).and_then(|conn| {
                conn.busy_timeout(BUSY_TIMEOUT)?;
                let header = Header::read(&conn)?;
                Ok((conn, header))
            });
            match opened {
                Ok((_, header)) if header.is_fresh() => return Ok(None),
                Ok((conn, header)) => {
                    let mut store = Store {
                        path: name,
                        file: path.to_path_buf(),
                        identity: file_identity(path),
                        conn,
                        checksummed: true,
                    };
                    store.check_header(&header)?;
                    let format = check_existing(
                        &store.conn,
                        &store.path,
                        header.application_id,
                        header.user_version,
                    )?;
                    store.checksummed = format != UNCHECKED_FORMAT;
                    return Ok(Some(store));
                }
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.map_or_else(
            || Error::Checkpoint {
                path: name.clone(),
                detail: "cannot open it for reading".to_owned(),
            },
            |err| sqlite_error(&name, err),
        ))
    }

    /// Refuses a file that is not a snapperable checkpoint, or of a newer format.
    fn check_header(&self, header: &Header) -> Result<()> {
        if header.application_id != APPLICATION_ID {
            return Err(Error::NotACheckpoint {
                path: self.path.clone(),
                reason: format!("application_id {}", header.application_id),
            });
        }
        if header.user_version > FORMAT_VERSION {
            return Err(Error::Format {
                path: self.path.clone(),
                found: header.user_version,
                supported: FORMAT_VERSION,
            });
        }
        Ok(())
    }

    /// Writes the schema into an empty file. The header is read again under the write
    /// lock, so a process that initialized the file first is not overwritten.
    fn initialize(&mut self) -> rusqlite::Result<Header> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let header = Header::read(&tx)?;
        if !header.is_fresh() {
            return Ok(header);
        }
        tx.execute_batch(SCHEMA)?;
        tx.execute(
            "INSERT INTO meta (name, value) VALUES ('format_version', ?1), ('created_by', ?2)",
            params![
                FORMAT_VERSION.to_string(),
                concat!("snapperable ", env!("CARGO_PKG_VERSION"))
            ],
        )?;
        let header = Header::read(&tx)?;
        tx.commit()?;
        Ok(header)
    }

    /// Every known function version, oldest first.
    pub fn versions(&self) -> Result<Vec<VersionRow>> {
        let read = || -> rusqlite::Result<Vec<(VersionRow, Option<i64>)>> {
            let mut stmt = self.conn.prepare_cached(if self.checksummed {
                "SELECT id, fingerprint, parts, uses, created, checksum FROM versions ORDER BY id"
            } else {
                "SELECT id, fingerprint, parts, uses, created, NULL FROM versions ORDER BY id"
            })?;
            let rows = stmt.query_map([], |row| {
                Ok((
                    VersionRow {
                        id: row.get(0)?,
                        fingerprint: row.get(1)?,
                        parts: row.get(2)?,
                        uses: row.get(3)?,
                        created: row.get(4)?,
                    },
                    row.get(5)?,
                ))
            })?;
            rows.collect()
        };
        let found = read().map_err(|e| self.fail(e))?;
        found
            .into_iter()
            .map(|(version, checksum)| {
                let expected = || {
                    version_checksum(
                        version.id,
                        &version.fingerprint,
                        &version.parts,
                        version.uses,
                        version.created,
                    )
                };
                match checksum {
                    Some(checksum) if checksum != expected() => Err(Error::Corrupt {
                        path: self.path.clone(),
                        problem: format!(
                            "function version {} does not match its checksum",
                            version.id
                        ),
                    }),
                    _ => Ok(version),
                }
            })
            .collect()
    }

    /// Registers a version and commits at once; `uses = None` makes it use its own id.
    pub fn add_version(
        &mut self,
        fingerprint: &str,
        parts: &str,
        uses: Option<i64>,
    ) -> Result<i64> {
        let checksummed = self.checksummed;
        let mut insert = || -> rusqlite::Result<i64> {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let id: i64 =
                tx.query_row("SELECT coalesce(max(id), 0) + 1 FROM versions", [], |row| {
                    row.get(0)
                })?;
            let (uses, created) = (uses.unwrap_or(id), unix_now());
            if checksummed {
                tx.execute(
                    "INSERT INTO versions (id, fingerprint, parts, uses, created, checksum) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        id,
                        fingerprint,
                        parts,
                        uses,
                        created,
                        version_checksum(id, fingerprint, parts, uses, created)
                    ],
                )?;
            } else {
                tx.execute(
                    "INSERT INTO versions (id, fingerprint, parts, uses, created) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![id, fingerprint, parts, uses, created],
                )?;
            }
            tx.commit()?;
            Ok(id)
        };
        insert().map_err(|e| sqlite_error(&self.path, e))
    }

    /// Appends `rows` in one `BEGIN IMMEDIATE` transaction: all of them or none, in order.
    ///
    /// Plain ok rows (the bulk of a run: status ok, one attempt, no input or error) go
    /// [`PLAIN_ROWS_PER_INSERT`] to a multi-row INSERT of their 5 varying values: one
    /// statement step per group instead of per row. Any other row is inserted on its
    /// own, with all 11 values, at its place.
    pub fn append(&mut self, rows: &[ItemRow]) -> Result<()> {
        let checksummed = self.checksummed;
        let per_row = if checksummed { 6 } else { 5 };
        let mut write = || -> rusqlite::Result<()> {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut rest = rows;
            while !rest.is_empty() {
                let plain = rest.iter().take_while(|row| row.is_plain()).count();
                let (group, after) = rest.split_at(plain);
                for group in group.chunks(PLAIN_ROWS_PER_INSERT) {
                    let sql = if group.len() == PLAIN_ROWS_PER_INSERT {
                        &PLAIN_INSERT_FULL[usize::from(checksummed)]
                    } else {
                        &plain_insert(group.len(), checksummed)
                    };
                    let mut insert = tx.prepare_cached(sql)?;
                    // Bound one by one (monomorphic, no parameter-count check per row).
                    let mut index = 0;
                    for row in group {
                        insert.raw_bind_parameter(index + 1, &row.key[..])?;
                        insert.raw_bind_parameter(index + 2, row.version)?;
                        insert.raw_bind_parameter(index + 3, &row.output)?;
                        insert.raw_bind_parameter(index + 4, row.started)?;
                        insert.raw_bind_parameter(index + 5, row.ended)?;
                        if checksummed {
                            insert.raw_bind_parameter(index + 6, &row_checksum(row)[..])?;
                        }
                        index += per_row;
                    }
                    insert.raw_execute()?;
                }
                let Some((row, after)) = after.split_first() else {
                    break;
                };
                let mut insert = tx.prepare_cached(if checksummed {
                    "INSERT INTO items (key, version, status, input, output, error_type, \
                     error, traceback, attempts, started, ended, checksum) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
                } else {
                    "INSERT INTO items (key, version, status, input, output, error_type, \
                     error, traceback, attempts, started, ended) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
                })?;
                insert.raw_bind_parameter(1, &row.key[..])?;
                insert.raw_bind_parameter(2, row.version)?;
                insert.raw_bind_parameter(3, row.status)?;
                insert.raw_bind_parameter(4, &row.input)?;
                insert.raw_bind_parameter(5, &row.output)?;
                insert.raw_bind_parameter(6, &row.error_type)?;
                insert.raw_bind_parameter(7, &row.error)?;
                insert.raw_bind_parameter(8, &row.traceback)?;
                insert.raw_bind_parameter(9, row.attempts)?;
                insert.raw_bind_parameter(10, row.started)?;
                insert.raw_bind_parameter(11, row.ended)?;
                if checksummed {
                    insert.raw_bind_parameter(12, &row_checksum(row)[..])?;
                }
                insert.raw_execute()?;
                rest = after;
            }
            tx.commit()
        };
        write().map_err(|e| sqlite_error(&self.path, e))
    }

    /// Maps the file into memory until the returned guard is dropped.
    pub(super) fn mapped_for_scan(&self) -> Result<MappedScan<'_>> {
        self.conn
            .pragma_update(None, "mmap_size", SCAN_MMAP_SIZE)
            .map_err(|e| self.fail(e))?;
        Ok(MappedScan(&self.conn))
    }

    /// An estimate of the number of item rows, found without a scan, to size the
    /// tables a scan fills: the largest `seq`, but never more rows than the file's
    /// bytes could hold (a damaged `seq` must not ask for terabytes).
    pub(super) fn row_bound(&self) -> Result<usize> {
        let (max_seq, file_bytes): (Option<i64>, i64) = self
            .conn
            .query_row(
                "SELECT (SELECT max(seq) FROM items), \
                 (SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size())",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .map_err(|e| self.fail(e))?;
        let most_rows = usize::try_from(file_bytes / MIN_ROW_BYTES).unwrap_or(0);
        let estimate = max_seq.map_or(0, |seq| usize::try_from(seq).unwrap_or(0));
        Ok(estimate.min(most_rows))
    }

    /// Up to `limit` rows with `seq > after` (of `version`, if given), in `seq` order.
    pub fn rows_after(
        &self,
        version: Option<i64>,
        after: i64,
        limit: usize,
        with_output: bool,
    ) -> Result<Vec<RowInfo>> {
        let sql_limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // `?2 IS ?2` binds the version (or NULL, as -1 never is a version, for all).
        let (wanted, any) = (version.unwrap_or(-1), i64::from(version.is_none()));
        // The output, when asked for, is column 12 (after the checksum, or a NULL).
        let mut rows = RowScan::new(
            &self.conn,
            if self.checksummed {
                // Every row, not only `version`'s: one whose version number is damaged
                // must be met (and fail its checksum), not filtered out unseen.
                c"SELECT seq, key, version, status, input, error_type, error, traceback, \
                  attempts, started, ended, checksum, CASE WHEN ?5 THEN output END \
                  FROM items WHERE seq > ?1 AND ?2 IS ?2 AND ?3 IS ?3 AND ?4 IS NOT NULL \
                  ORDER BY seq"
            } else {
                c"SELECT seq, key, version, status, input, error_type, error, traceback, \
                  attempts, started, ended, NULL, CASE WHEN ?5 THEN output END FROM items \
                  WHERE seq > ?1 AND (?3 OR version = ?2) ORDER BY seq LIMIT ?4"
            },
            &[after, wanted, any, sql_limit, i64::from(with_output)],
        )
        .map_err(|e| self.fail(e))?;
        let mut page = Vec::new();
        let mut sequence = Sequence::from(after.saturating_add(1).max(1));
        while let Some(row) = rows.next().map_err(|e| self.fail(e))? {
            let row = &row;
            let key = key_at(&self.path, row, 1)?;
            let (Some(seq), Some(row_version), Some(status)) =
                (row.integer(0), row.integer(2), row.integer(3))
            else {
                return Err(wrong_type(&self.path, row));
            };
            let rest = read_rest(&self.path, row, 4)?;
            let output = match row.value(12) {
                ValueRef::Blob(output) => Some(output),
                ValueRef::Null => None,
                _ => return Err(wrong_type(&self.path, row)),
            };
            if self.checksummed {
                sequence.check(&self.path, row)?;
                let checksum = checksum_at(&self.path, row, 11)?;
                if !head_matches(&checksum, &key, row_version, status)
                    || !rest_matches(&checksum, &rest)
                    || (with_output && !output_matches(&checksum, output))
                {
                    return Err(mismatch(&self.path, row));
                }
                if version.is_some_and(|wanted| wanted != row_version) {
                    continue;
                }
            }
            let text = |bytes: Option<&[u8]>| -> Result<Option<String>> {
                bytes
                    .map(|bytes| {
                        String::from_utf8(bytes.to_vec()).map_err(|_| {
                            corrupt_row(&self.path, row, "holds a text that is not UTF-8")
                        })
                    })
                    .transpose()
            };
            page.push(RowInfo {
                seq,
                key,
                version: row_version,
                status,
                input: rest.input.map(<[u8]>::to_vec),
                error_type: text(rest.error_type)?,
                error: text(rest.error)?,
                traceback: text(rest.traceback)?,
                attempts: rest.attempts,
                started: rest.started,
                ended: rest.ended,
                output: output.map(<[u8]>::to_vec),
            });
            if page.len() >= limit {
                break;
            }
        }
        Ok(page)
    }

    /// The `meta` table's (name, value) pairs: the format version and who created the file.
    pub fn meta(&self) -> Result<Vec<(String, String)>> {
        let read = || -> rusqlite::Result<Vec<(String, String)>> {
            let mut stmt = self
                .conn
                .prepare("SELECT name, value FROM meta ORDER BY name")?;
            let pairs = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
            pairs.collect()
        };
        read().map_err(|e| self.fail(e))
    }

    /// What `PRAGMA integrity_check` reports: `["ok"]` for a sound file, else up to
    /// `limit` problems, each one line. Reads every page; writes nothing.
    pub fn integrity_check(&self, limit: u32) -> Result<Vec<String>> {
        let read = || -> rusqlite::Result<Vec<String>> {
            let mut stmt = self
                .conn
                .prepare(&format!("PRAGMA integrity_check({})", limit.max(1)))?;
            let lines = stmt.query_map([], |row| row.get(0))?;
            lines.collect()
        };
        read().map_err(|e| self.fail(e))
    }

    /// Copies every committed row from the WAL into the database file and empties the
    /// WAL (`wal_checkpoint(TRUNCATE)`), so the file holds them by itself: SQLite does
    /// not do it on close for a file renamed while open, which would leave them in a
    /// `-wal` beside the old name.
    pub fn fold_wal_into_file(&self) -> Result<()> {
        let busy: i64 = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| row.get(0))
            .map_err(|e| self.fail(e))?;
        if busy != 0 {
            return Err(Error::Checkpoint {
                path: self.path.clone(),
                detail: "cannot copy the WAL into the file: another connection is reading it"
                    .to_owned(),
            });
        }
        Ok(())
    }

    /// Closes the connection, reporting what SQLite says (e.g. a failed WAL checkpoint).
    pub fn close(self) -> Result<()> {
        let path = self.path;
        self.conn
            .close()
            .map_err(|(_, err)| sqlite_error(&path, err))
    }
}

/// What identifies a file whatever its name: device and inode (None where unknown).
pub(super) type FileIdentity = (u64, u64);

/// What a second, read-only connection to a store's file needs to know: a scan split in
/// two halves reads the second through one (the store's own connection is not `Sync`
/// and stays on its thread).
pub(super) struct Reader<'a> {
    pub(super) path: &'a str,
    file: &'a Path,
    identity: Option<FileIdentity>,
    pub(super) checksummed: bool,
}

impl Store {
    pub(super) fn reader(&self) -> Reader<'_> {
        Reader {
            path: &self.path,
            file: &self.file,
            identity: self.identity,
            checksummed: self.checksummed,
        }
    }
}

impl Reader<'_> {
    /// A read-only connection of its own, opened as [`Store::open`] opens its one
    /// (flags, busy timeout), mapped as [`Store::mapped_for_scan`] maps it if `mapped`.
    /// None if it cannot be had, or the path no longer names the file the store
    /// opened: then the caller scans that half itself.
    pub(super) fn connect(&self, mapped: bool) -> Option<Connection> {
        let same_file = || self.identity.is_some() && file_identity(self.file) == self.identity;
        if !same_file() {
            return None;
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(self.file, flags).ok()?;
        let mut prepared = conn.busy_timeout(BUSY_TIMEOUT);
        if mapped {
            prepared =
                prepared.and_then(|()| conn.pragma_update(None, "mmap_size", SCAN_MMAP_SIZE));
        }
        // Checked again once open: the name was not moved to another file meanwhile.
        (prepared.is_ok() && same_file()).then_some(conn)
    }
}

#[cfg(unix)]
pub(super) fn file_identity(path: &Path) -> Option<FileIdentity> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .map(|meta| (meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
pub(super) fn file_identity(_path: &Path) -> Option<FileIdentity> {
    None
}

/// Unmaps the file when a scan ends, however it ends.
pub(super) struct MappedScan<'a>(&'a Connection);

impl Drop for MappedScan<'_> {
    fn drop(&mut self) {
        // Failing to unmap leaves only a mapping that SQLite keeps coherent anyway.
        let _ = self.0.pragma_update(None, "mmap_size", 0);
    }
}

/// What the first page of a file says about it.
struct Header {
    application_id: i64,
    user_version: i64,
    has_tables: bool,
}

impl Header {
    fn read(conn: &Connection) -> rusqlite::Result<Self> {
        let pragma = |name: &str| conn.query_row(&format!("PRAGMA {name}"), [], |row| row.get(0));
        let application_id = pragma("application_id")?;
        let user_version = pragma("user_version")?;
        let has_tables = conn
            .query_row("SELECT 1 FROM sqlite_master LIMIT 1", [], |_| Ok(()))
            .optional()?
            .is_some();
        Ok(Header {
            application_id,
            user_version,
            has_tables,
        })
    }

    /// An empty file (or an empty database): ours to initialize.
    fn is_fresh(&self) -> bool {
        self.application_id == 0 && !self.has_tables
    }
}

/// `path` as a SQLite `file:` URI: every byte but unreserved ones and `/` escaped, so
/// that `?`, `#` and `%` in a name stay part of it.
fn file_uri(path: &str) -> String {
    let mut uri = String::from("file:");
    for byte in path.bytes() {
        if byte.is_ascii_alphanumeric() || b"/-._~".contains(&byte) {
            uri.push(char::from(byte));
        } else {
            uri.push_str(&format!("%{byte:02X}"));
        }
    }
    uri
}

/// Creates `path` with mode 0600 if it does not exist; never truncates an existing file.
fn create_private_file(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Key;
    use crate::store::tests::{row, TempDir};

    #[test]
    fn non_database_file_is_corrupt_and_untouched() {
        let dir = TempDir::new();
        let path = dir.file("notes.db");
        let text = b"these are my notes, not a database; please keep them safe\n".repeat(20);
        std::fs::write(&path, &text).unwrap();
        match Store::open(&path, Synchronous::Full) {
            Err(Error::NotACheckpoint { path: named, .. }) => {
                assert_eq!(named, path.to_string_lossy())
            }
            Err(other) => panic!("expected NotACheckpoint, got {other}"),
            Ok(_) => panic!("expected NotACheckpoint, got a store"),
        }
        assert_eq!(std::fs::read(&path).unwrap(), text);
    }

    #[test]
    fn foreign_database_and_newer_format_are_refused() {
        let dir = TempDir::new();
        let foreign = dir.file("other.db");
        Connection::open(&foreign)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let err = Store::open(&foreign, Synchronous::Full).err().unwrap();
        assert!(
            matches!(&err, Error::NotACheckpoint { reason, .. } if reason == "application_id 0"),
            "{err}"
        );

        let newer = dir.file("newer.db");
        Store::open(&newer, Synchronous::Full)
            .unwrap()
            .close()
            .unwrap();
        Connection::open(&newer)
            .unwrap()
            .execute_batch("PRAGMA user_version = 3")
            .unwrap();
        assert!(matches!(
            Store::open(&newer, Synchronous::Full),
            Err(Error::Format { found: 3, .. })
        ));
    }

    #[test]
    fn a_reader_sees_a_writers_commits_creates_nothing_and_refuses_what_is_not_ours() {
        let dir = TempDir::new();
        let path = dir.file("run.db");
        assert!(Store::open_read_only(&path).is_err());
        assert!(!path.exists(), "a reader created the file");
        let mut writer = Store::open(&path, Synchronous::Normal).unwrap();
        let v1 = writer.add_version("fp1", "{}", None).unwrap();
        writer.append(&[row(1, v1, 0, Some(b"out"))]).unwrap();
        let reader = Store::open_read_only(&path).unwrap().unwrap();
        assert_eq!(reader.versions().unwrap().len(), 1);
        writer.append(&[row(2, v1, 0, Some(b"two"))]).unwrap();
        assert_eq!(reader.rows_after(Some(v1), 0, 10, false).unwrap().len(), 2);
        reader.close().unwrap();
        writer.close().unwrap();

        let foreign = dir.file("other.db");
        Connection::open(&foreign)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        assert!(matches!(
            Store::open_read_only(&foreign),
            Err(Error::NotACheckpoint { .. })
        ));

        // Made but never initialized (a creation cut short): nothing saved in it.
        let made = dir.file("made.db");
        Connection::open(&made)
            .unwrap()
            .execute_batch("PRAGMA journal_mode=WAL")
            .unwrap();
        assert!(std::fs::metadata(&made).unwrap().len() > 0);
        assert!(matches!(Store::open_read_only(&made), Ok(None)));
    }

    #[test]
    fn append_keeps_the_order_of_plain_rows_in_groups_and_others_between() {
        let dir = TempDir::new();
        let mut store = Store::open(&dir.file("run.db"), Synchronous::Normal).unwrap();
        let v1 = store.add_version("fp1", "{}", None).unwrap();
        let mut rows: Vec<ItemRow> = Vec::new();
        for i in 0..300u32 {
            let mut row = match i % 97 {
                13 => row(0, v1, 1, None), // failed: inserted on its own, in place
                _ => row(0, v1, 0, Some(&i.to_le_bytes())),
            };
            if i % 89 == 5 {
                row.attempts = 2; // ok but not plain
            }
            row.key[..4].copy_from_slice(&i.to_le_bytes());
            row.started = f64::from(i);
            rows.push(row);
        }
        store.append(&rows).unwrap();
        let read = store.rows_after(Some(v1), 0, 1000, false).unwrap();
        let expected: Vec<(Key, i64, i64, f64)> = rows
            .iter()
            .map(|r| (r.key, r.status, r.attempts, r.started))
            .collect();
        let got: Vec<(Key, i64, i64, f64)> = read
            .iter()
            .map(|r| (r.key, r.status, r.attempts, r.started))
            .collect();
        assert_eq!(got, expected);
        let latest = store.latest_outputs(v1).unwrap();
        assert_eq!(latest.get(&rows[64].key), Some(&64u32.to_le_bytes()[..]));
    }
}
