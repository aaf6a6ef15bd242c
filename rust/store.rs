//! The SQLite checkpoint format of DESIGN 6.1: opening (and creating) a file, appending
//! rows, and the scans that plan and load a run. Pure Rust: values cross into Python only
//! in the binding layer.
//!
//! The opening procedure is the same step for step as the pure-Python backend's, so that
//! both accept, create and reject exactly the same files.

use std::mem;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::types::ValueRef;
use rusqlite::{
    params, Connection, ErrorCode, OpenFlags, OptionalExtension, Row, TransactionBehavior,
};

use crate::errors::{Error, Result};
use crate::keys::{
    all_distinct, key_prefix, keys_distinct, order_for_table, ClaimSet, Key, KeyMap, KeySet,
    KeyVersion, KeyVersionMap, KEY_SIZE,
};

/// The one schema, shared with the pure-Python backend.
const SCHEMA: &str = include_str!("../python/snapperable/schema.sql");
/// `PRAGMA application_id` of a snapperable checkpoint: "SnaP".
pub const APPLICATION_ID: i64 = 0x536e_6150;
/// `PRAGMA user_version`: the newest format this code reads and the one it writes.
pub const FORMAT_VERSION: i64 = 1;
pub const STATUS_OK: i64 = 0;
pub const STATUS_FAILED: i64 = 1;
/// Bytes of the file SQLite maps into memory during a full scan: it then reads pages
/// in place instead of copying each one out of the OS cache (a scan of a million rows
/// takes about half the time). Off otherwise, so writes never depend on a mapping.
const SCAN_MMAP_SIZE: i64 = 1 << 30;
/// Long enough to ride out another process's commit, short enough to report a real lock.
const BUSY_TIMEOUT: Duration = Duration::from_millis(5000);
/// Rows (as `row_bound` estimates them) above which [`Store::key_sets`] scans the table
/// in two halves on two threads, the second through a read-only connection of its own.
/// Below it the second connection and thread cost more than they save (1M rows: about
/// 150 ms for one scan).
const SPLIT_SCAN_ROWS: usize = 100_000;

/// Plain ok rows per multi-row INSERT: 5 parameters a row, well within SQLite's limit
/// of 32,766; beyond a few dozen rows the statement's fixed cost no longer shows.
const PLAIN_ROWS_PER_INSERT: usize = 64;

/// `INSERT` of `rows` plain ok rows, 5 values each (status 0 and 1 attempt fixed).
///
/// `OR FAIL`: a statement that writes several rows and may abort half way needs a
/// statement journal (a copy of each page it touches, to undo just that statement);
/// with FAIL nothing is undone per statement, and none is kept (~10% of a row's cost).
/// Nothing is lost by it: any failure rolls back the whole transaction (`append`).
fn plain_insert(rows: usize) -> String {
    let values = format!("(?, ?, {STATUS_OK}, ?, 1, ?, ?)");
    format!(
        "INSERT OR FAIL INTO items (key, version, status, output, attempts, started, ended) VALUES {}",
        vec![values; rows].join(", ")
    )
}

static PLAIN_INSERT_FULL: LazyLock<String> = LazyLock::new(|| plain_insert(PLAIN_ROWS_PER_INSERT));

/// One finished attempt at one item, as the writer appends it.
/// Fewer bytes than any item row takes in the file (its 16-byte key alone is more):
/// bounds how many rows a file of a given size can hold.
const MIN_ROW_BYTES: i64 = 16;

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

/// An item row read back for reports: everything but the output.
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
    /// Survives power loss (DESIGN 7's default).
    Full,
    /// Survives a crash of the process, not of the machine; faster commits.
    Normal,
}

impl ItemRow {
    /// Status ok, one attempt, no input and no error: 5 values vary, not 11.
    fn is_plain(&self) -> bool {
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

    fn pragma(self) -> &'static str {
        match self {
            Self::Full => "PRAGMA synchronous=FULL",
            Self::Normal => "PRAGMA synchronous=NORMAL",
        }
    }
}

/// The latest row of each key of one version, from one scan.
///
/// The outputs lie back to back in one buffer instead of one allocation each: a resume
/// reads a million of them at once.
pub struct LatestOutputs {
    /// Per key: the number of its first row (counting the version's rows from 0), and
    /// the index of its latest output if its latest row is ok, [`NO_OUTPUT`] if that
    /// row failed (or, as the pure-Python backend reads it, is ok without an output).
    latest: KeyMap<(u32, u32)>,
    /// Where each saved output ends in `arena`; output `i` starts where `i - 1` ends.
    ends: Vec<usize>,
    arena: Vec<u8>,
    /// How many rows were folded.
    rows: usize,
}

const NO_OUTPUT: u32 = u32::MAX;

impl LatestOutputs {
    /// Folds `rows`, `(key, row number, output index or NO_OUTPUT)` in the order saved.
    fn fold(mut rows: Vec<(Key, u32, u32)>, ends: Vec<usize>, arena: Vec<u8>) -> Self {
        let count = rows.len();
        let mut latest = KeyMap::with_capacity(count);
        order_for_table(&mut rows, |row| &row.0);
        // Consumed as it is folded: the rows are freed before any lookup is built.
        for (key, number, output) in rows {
            let first = latest.get(&key).map_or(number, |&(first, _)| first);
            latest.insert(key, (first, output));
        }
        LatestOutputs {
            latest,
            ends,
            arena,
            rows: count,
        }
    }

    /// The indexes of the latest ok outputs of `keys`, in the order of `keys`; keys
    /// without one are left out.
    pub fn indexes_for(&self, keys: impl Iterator<Item = Key>) -> Result<Vec<u32>> {
        // Looked up in table order (see `order_for_table`), each found index put back at
        // its key's position (32-bit: 20 bytes a wanted key, not 24).
        let mut wanted = Vec::with_capacity(keys.size_hint().0);
        for (position, key) in keys.enumerate() {
            let position = u32::try_from(position).map_err(|_| {
                Error::InvalidArgument("more keys than one read can look up".to_owned())
            })?;
            wanted.push((key, position));
        }
        let mut found = vec![NO_OUTPUT; wanted.len()];
        order_for_table(&mut wanted, |item| &item.0);
        for (key, position) in wanted {
            if let (Some(&(_, output)), Some(slot)) = (
                self.latest.get(&key),
                usize::try_from(position)
                    .ok()
                    .and_then(|position| found.get_mut(position)),
            ) {
                *slot = output;
            }
        }
        found.retain(|&index| index != NO_OUTPUT);
        Ok(found)
    }

    /// The indexes of the latest ok output of every key, in the order of each key's
    /// first row.
    pub fn indexes_in_save_order(&self) -> Vec<u32> {
        let mut by_first_row = vec![NO_OUTPUT; self.rows];
        for &(first, output) in self.latest.values() {
            if let Some(slot) = usize::try_from(first)
                .ok()
                .and_then(|i| by_first_row.get_mut(i))
            {
                *slot = output;
            }
        }
        by_first_row.retain(|&index| index != NO_OUTPUT);
        by_first_row
    }

    /// The output at `index` (one from this value; any other gives an empty slice).
    pub fn output(&self, index: u32) -> &[u8] {
        let Ok(index) = usize::try_from(index) else {
            return &[];
        };
        let start = match index.checked_sub(1) {
            Some(before) => self.ends.get(before).copied().unwrap_or(usize::MAX),
            None => 0,
        };
        let end = self.ends.get(index).copied().unwrap_or(0);
        self.arena.get(start..end).unwrap_or_default()
    }

    /// The latest ok output of `key`, if it has one.
    pub fn get(&self, key: &Key) -> Option<&[u8]> {
        let &(_, index) = self.latest.get(key)?;
        (index != NO_OUTPUT).then(|| self.output(index))
    }
}

/// Outputs of one version copied out of a scan, back to back: what [`Store::outputs_in_order`]
/// hands over at a time.
#[derive(Debug, Default)]
pub struct OutputChunk {
    arena: Vec<u8>,
    /// Where each output ends in `arena`; output `i` starts where `i - 1` ends.
    ends: Vec<usize>,
}

impl OutputChunk {
    /// At most this many outputs, or this many bytes (or one larger output), a chunk:
    /// small enough that chunks in flight cost little memory, large enough that the
    /// hand-over per chunk does not show.
    const MAX_OUTPUTS: usize = 4096;
    const MAX_BYTES: usize = 1 << 20;

    fn push(&mut self, output: &[u8]) {
        self.arena.extend_from_slice(output);
        self.ends.push(self.arena.len());
    }

    fn is_full(&self) -> bool {
        self.ends.len() >= Self::MAX_OUTPUTS || self.arena.len() >= Self::MAX_BYTES
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The outputs, in the order saved.
    pub fn outputs(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        (0..self.ends.len()).map(|i| {
            let start = i
                .checked_sub(1)
                .map_or(Some(0), |j| self.ends.get(j).copied());
            let end = self.ends.get(i).copied();
            match (start, end) {
                (Some(start), Some(end)) => self.arena.get(start..end).unwrap_or_default(),
                _ => &[],
            }
        })
    }
}

/// Which rows [`Store::outputs_in_order`] expects.
#[derive(Debug, Clone, Copy)]
pub enum InOrder<'a> {
    /// Exactly one row per key of this buffer of concatenated keys, in its order: the
    /// rows of a run that found no failure and no repeated input.
    Keys(&'a [u8]),
    /// Rows of distinct keys.
    DistinctKeys,
}

/// What [`Store::outputs_in_order`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Streamed {
    /// The rows were as expected: the outputs sent are the answer.
    Complete,
    /// They were not (or the receiver stopped): the outputs sent must be discarded.
    NotInOrder,
}

/// Maps a SQLite failure on `path` to the error callers see: damage to the file is
/// `Corrupt`, anything else (I/O, locks, full disk) is `Checkpoint`.
pub fn sqlite_error(path: &str, err: rusqlite::Error) -> Error {
    let path = path.to_owned();
    match err.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => Error::Corrupt {
            path,
            problem: format!("is not a SQLite database or is damaged ({err})"),
        },
        _ => match err {
            rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => Error::Corrupt {
                path,
                problem: format!("holds a value of an unexpected type ({err})"),
            },
            _ => Error::Checkpoint {
                path,
                detail: format!("SQLite error: {err}"),
            },
        },
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |elapsed| elapsed.as_secs_f64())
}

/// An open SQLite checkpoint.
pub struct Store {
    path: String,
    /// The path as opened (an OS path: it need not be UTF-8), for a second connection.
    file: PathBuf,
    /// Which file `conn` opened (see [`file_identity`]): a second connection is used
    /// only while the path still names that file.
    identity: Option<FileIdentity>,
    conn: Connection,
}

impl Store {
    /// Opens the checkpoint at `path`, creating the file (mode 0600) and the schema if
    /// they do not exist, and refusing a file that is not a snapperable checkpoint of a
    /// format this code reads.
    pub fn open(path: &Path, synchronous: Synchronous) -> Result<Self> {
        let name = path.to_string_lossy().into_owned();
        create_private_file(path).map_err(|err| Error::Checkpoint {
            path: name.clone(),
            detail: format!("cannot create the file: {err}"),
        })?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| sqlite_error(&name, e))?;
        let identity = file_identity(path);
        let mut store = Store {
            path: name,
            file: path.to_path_buf(),
            identity,
            conn,
        };
        store.prepare(synchronous)?;
        Ok(store)
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    fn fail(&self, err: rusqlite::Error) -> Error {
        sqlite_error(&self.path, err)
    }

    fn prepare(&mut self, synchronous: Synchronous) -> Result<()> {
        self.conn
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| self.fail(e))?;
        let mut header = Header::read(&self.conn).map_err(|e| self.fail(e))?;
        if header.is_fresh() {
            header = self.initialize().map_err(|e| self.fail(e))?;
        }
        if header.application_id != APPLICATION_ID {
            return Err(Error::Corrupt {
                path: self.path.clone(),
                problem: format!(
                    "is not a snapperable checkpoint (application_id {})",
                    header.application_id
                ),
            });
        }
        if header.user_version > FORMAT_VERSION {
            return Err(Error::Format {
                path: self.path.clone(),
                found: header.user_version,
                supported: FORMAT_VERSION,
            });
        }
        self.conn
            .execute_batch("PRAGMA journal_mode=WAL")
            .and_then(|()| self.conn.execute_batch(synchronous.pragma()))
            .map_err(|e| self.fail(e))
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
        let read = || -> rusqlite::Result<Vec<VersionRow>> {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id, fingerprint, parts, uses, created FROM versions ORDER BY id",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok(VersionRow {
                    id: row.get(0)?,
                    fingerprint: row.get(1)?,
                    parts: row.get(2)?,
                    uses: row.get(3)?,
                    created: row.get(4)?,
                })
            })?;
            rows.collect()
        };
        read().map_err(|e| self.fail(e))
    }

    /// Registers a version and commits at once; `uses = None` makes it use its own id.
    pub fn add_version(
        &mut self,
        fingerprint: &str,
        parts: &str,
        uses: Option<i64>,
    ) -> Result<i64> {
        let mut insert = || -> rusqlite::Result<i64> {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "INSERT INTO versions (fingerprint, parts, uses, created) VALUES (?1, ?2, ?3, ?4)",
                params![fingerprint, parts, uses.unwrap_or(0), unix_now()],
            )?;
            let id = tx.last_insert_rowid();
            if uses.is_none() {
                tx.execute("UPDATE versions SET uses = id WHERE id = ?1", [id])?;
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
                        &*PLAIN_INSERT_FULL
                    } else {
                        &plain_insert(group.len())
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
                        index += 5;
                    }
                    insert.raw_execute()?;
                }
                let Some((row, after)) = after.split_first() else {
                    break;
                };
                let mut insert = tx.prepare_cached(
                    "INSERT INTO items (key, version, status, input, output, error_type, \
                     error, traceback, attempts, started, ended) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )?;
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
                insert.raw_execute()?;
                rest = after;
            }
            tx.commit()
        };
        write().map_err(|e| sqlite_error(&self.path, e))
    }

    /// Keys whose latest row for `version` (for any version if `None`) has `status`.
    pub fn key_set(&self, version: Option<i64>, status: i64) -> Result<KeySet> {
        let Some(version) = version else {
            return self.key_set_any_version(status);
        };
        let rows = self.key_status_rows(version)?;
        let reserve = if status == STATUS_OK { rows.len() } else { 0 };
        let mut keys = KeySet::with_capacity(reserve);
        // A later row of a key overrides an earlier one: each row puts its key in or out.
        for (key, row_status) in rows {
            if row_status == status {
                keys.insert(key);
            } else {
                keys.remove(&key);
            }
        }
        Ok(keys)
    }

    /// The keys whose latest row of `version` is ok, and those whose latest row failed:
    /// what a run skips, from one scan.
    ///
    /// When every row is ok and no key repeats (a run that finished without failures),
    /// the ok keys are handed over as the list the scan found, in the order saved: the
    /// run that resumes claims them in that very order, by comparing bytes, and no
    /// table of them is built unless a claim asks for something else.
    pub fn key_sets(&self, version: i64) -> Result<(ClaimSet, KeySet)> {
        let (keys, statuses) = self.key_status_columns(version)?;
        if statuses.iter().all(|&status| status == STATUS_OK) && keys_distinct(&keys) {
            return Ok((ClaimSet::listed(keys)?, KeySet::new()));
        }
        let rows = key_status_rows(&keys, statuses);
        drop(keys);
        // Almost every key of a finished run is ok: size that set for all rows at once.
        let mut ok = KeySet::with_capacity(rows.len());
        let mut failed = KeySet::new();
        for (key, status) in rows {
            if status == STATUS_OK {
                ok.insert(key);
                if !failed.is_empty() {
                    failed.remove(&key);
                }
            } else {
                ok.remove(&key);
                if status == STATUS_FAILED {
                    failed.insert(key);
                } else {
                    failed.remove(&key);
                }
            }
        }
        Ok((ClaimSet::from(ok), failed))
    }

    /// Keys whose latest row, within some version, has `status`.
    fn key_set_any_version(&self, status: i64) -> Result<KeySet> {
        let mut latest: KeyVersionMap<i64> = KeyVersionMap::default();
        latest.reserve(self.row_bound()?);
        let _mapped = self.mapped_for_scan()?;
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, key, version, status FROM items ORDER BY seq")
            .map_err(|e| self.fail(e))?;
        let mut rows = stmt.query([]).map_err(|e| self.fail(e))?;
        while let Some(row) = rows.next().map_err(|e| self.fail(e))? {
            let key = self.key_at(row, 1)?;
            let row_version: i64 = row.get(2).map_err(|e| self.fail(e))?;
            let row_status: i64 = row.get(3).map_err(|e| self.fail(e))?;
            latest.insert(KeyVersion(key, row_version), row_status);
        }
        Ok(latest
            .into_iter()
            .filter(|&(_, row_status)| row_status == status)
            .map(|(KeyVersion(key, _), _)| key)
            .collect())
    }

    /// `(key, status)` of each row of `version`, in table order (see `order_for_table`);
    /// the rows of one key stay in the order saved.
    fn key_status_rows(&self, version: i64) -> Result<Vec<(Key, i64)>> {
        let (keys, statuses) = self.key_status_columns(version)?;
        Ok(key_status_rows(&keys, statuses))
    }

    /// The keys (concatenated) and statuses of the rows of `version`, in the order saved.
    fn key_status_columns(&self, version: i64) -> Result<(Vec<u8>, Vec<i64>)> {
        self.key_status_columns_split_above(version, SPLIT_SCAN_ROWS)
    }

    /// [`Self::key_status_columns`], in two halves at once when the table holds more
    /// than `split_above` rows (a parameter only so that tests can lower it).
    ///
    /// No index on `key` by design (appends stay sequential), so this is a scan; the
    /// rows of `version` are spread over the whole table, so it is split by `seq`. Both
    /// halves end at one `max(seq)` read first: the table is an append-only log, so rows
    /// appended meanwhile come after it in both, and the halves, one after the other,
    /// are exactly what one scan would have found.
    fn key_status_columns_split_above(
        &self,
        version: i64,
        split_above: usize,
    ) -> Result<(Vec<u8>, Vec<i64>)> {
        let bound = self.row_bound()?;
        let mut keys = Vec::with_capacity(bound.saturating_mul(KEY_SIZE));
        let mut statuses = Vec::with_capacity(bound);
        let _mapped = self.mapped_for_scan()?;
        let split = if bound > split_above {
            self.split_point()?
        } else {
            None
        };
        let Some((first, split, last)) = split else {
            scan_key_status(
                &self.conn,
                &self.path,
                version,
                None,
                &mut keys,
                &mut statuses,
            )?;
            return Ok((keys, statuses));
        };
        // The connection stays on this thread (it is not `Sync`): the other one gets
        // only what it needs to open its own.
        let reader = Reader {
            path: &self.path,
            file: &self.file,
            identity: self.identity,
        };
        let second = std::thread::scope(|scope| {
            let later = std::thread::Builder::new()
                .name("snapperable-scan".to_owned())
                .spawn_scoped(scope, || reader.scan(version, (split + 1, last), bound));
            let earlier = scan_key_status(
                &self.conn,
                &self.path,
                version,
                Some((first, split)),
                &mut keys,
                &mut statuses,
            );
            let later = match later {
                Ok(handle) => handle.join().unwrap_or_else(|_| {
                    Err(Error::Checkpoint {
                        path: self.path.clone(),
                        detail: "a scan thread panicked".to_owned(),
                    })
                }),
                Err(_) => Ok(None), // no thread: scanned below, on this one
            };
            // The first half's error first: the one a single scan would have met first.
            earlier.and(later)
        })?;
        match second {
            Some((more_keys, more_statuses)) => {
                keys.extend_from_slice(&more_keys);
                statuses.extend_from_slice(&more_statuses);
            }
            // No second connection (or not to this file): the second half here, after
            // the first.
            None => scan_key_status(
                &self.conn,
                &self.path,
                version,
                Some((split + 1, last)),
                &mut keys,
                &mut statuses,
            )?,
        }
        Ok((keys, statuses))
    }

    /// `(first, split, last)` to scan as `first..=split` and `split + 1..=last`, or
    /// None if the table cannot be split so. Not when `max(seq)` is `i64::MAX`: SQLite
    /// then gives new rows random free numbers, and the log is no longer append-only.
    fn split_point(&self) -> Result<Option<(i64, i64, i64)>> {
        let (first, last): (Option<i64>, Option<i64>) = self
            .conn
            .query_row(
                "SELECT (SELECT min(seq) FROM items), (SELECT max(seq) FROM items)",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .map_err(|e| self.fail(e))?;
        let (Some(first), Some(last)) = (first, last) else {
            return Ok(None);
        };
        if last == i64::MAX || first >= last {
            return Ok(None);
        }
        // first <= split < last, without overflow for any pair of i64.
        let split =
            i64::try_from((i128::from(first) + i128::from(last)).div_euclid(2)).unwrap_or(first);
        Ok(Some((first, split, last)))
    }

    /// Maps the file into memory until the returned guard is dropped.
    fn mapped_for_scan(&self) -> Result<MappedScan<'_>> {
        self.conn
            .pragma_update(None, "mmap_size", SCAN_MMAP_SIZE)
            .map_err(|e| self.fail(e))?;
        Ok(MappedScan(&self.conn))
    }

    /// An estimate of the number of item rows, found without a scan, to size the
    /// tables a scan fills: the largest `seq`, but never more rows than the file's
    /// bytes could hold (a damaged `seq` must not ask for terabytes).
    fn row_bound(&self) -> Result<usize> {
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

    /// The latest row of each key of `version`.
    pub fn latest_outputs(&self, version: i64) -> Result<LatestOutputs> {
        let too_many =
            |row: &Row<'_>| self.corrupt_row(row, "is past the most rows one read can hold");
        let bound = self.row_bound()?;
        let (mut rows, mut ends, mut arena) = (
            Vec::with_capacity(bound),
            Vec::with_capacity(bound),
            Vec::new(),
        );
        self.scan_outputs(version, true, |row, key, output| {
            let index = match output {
                Some(output) => {
                    let index = u32::try_from(ends.len())
                        .ok()
                        .filter(|&index| index != NO_OUTPUT)
                        .ok_or_else(|| too_many(row))?;
                    arena.extend_from_slice(output);
                    ends.push(arena.len());
                    index
                }
                None => NO_OUTPUT,
            };
            let number = u32::try_from(rows.len()).map_err(|_| too_many(row))?;
            rows.push((key, number, index));
            Ok(true)
        })?;
        Ok(LatestOutputs::fold(rows, ends, arena))
    }

    /// The saved outputs of `version`'s ok rows in the order saved, sent to `send` a
    /// chunk at a time while the scan goes on, as long as the rows are what `expected`
    /// says; then the answer of a load needs no lookup (and no table) at all. Returns
    /// [`Streamed::NotInOrder`] as soon as they are not, or when `send` returns false.
    ///
    /// Distinct keys are checked by their first eight bytes (keys are digests): a false
    /// alarm, about one in 2^64 / n^2, only costs the slower way.
    pub fn outputs_in_order(
        &self,
        version: i64,
        expected: InOrder<'_>,
        mut send: impl FnMut(OutputChunk) -> bool,
    ) -> Result<Streamed> {
        let mut chunk = OutputChunk::default();
        let mut stopped = false;
        let mut seen = 0usize;
        let mut prefixes: Vec<u64> = Vec::new();
        match expected {
            // Fewer rows in the file than keys (say, repeated inputs, processed once):
            // known without a scan.
            InOrder::Keys(keys) if self.row_bound()? < keys.len() / KEY_SIZE => {
                return Ok(Streamed::NotInOrder)
            }
            InOrder::Keys(_) => {}
            InOrder::DistinctKeys => prefixes.reserve(self.row_bound()?),
        }
        // Not mapped: a mapping makes the whole file resident in this process (a 3M-row
        // checkpoint: +200 MB of RSS), and here the scan is not the slow side anyway
        // (it runs beside the unpickling); read through SQLite's small page cache it
        // was even faster (1M rows: 0.21 s against 0.28 s for the whole load).
        self.scan_outputs(version, false, |_, key, output| {
            match expected {
                InOrder::Keys(keys) => {
                    let at = seen.saturating_mul(KEY_SIZE);
                    if keys.get(at..at.saturating_add(KEY_SIZE)) != Some(&key[..]) {
                        stopped = true;
                        return Ok(false);
                    }
                }
                InOrder::DistinctKeys => prefixes.push(key_prefix(&key)),
            }
            seen += 1;
            if let Some(output) = output {
                chunk.push(output);
                if chunk.is_full() && !send(mem::take(&mut chunk)) {
                    stopped = true;
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        if stopped {
            return Ok(Streamed::NotInOrder);
        }
        if !chunk.is_empty() && !send(chunk) {
            return Ok(Streamed::NotInOrder);
        }
        let distinct = match expected {
            InOrder::Keys(keys) => {
                seen.checked_mul(KEY_SIZE) == Some(keys.len()) && keys_distinct(keys)
            }
            InOrder::DistinctKeys => all_distinct(prefixes),
        };
        Ok(if distinct {
            Streamed::Complete
        } else {
            Streamed::NotInOrder
        })
    }

    /// Calls `each` with `(row, key, output)` for each row of `version` in `seq` order,
    /// until it returns false; `output` is the saved output of an ok row (None for a
    /// failed row, or an ok row without one). An output that is neither a blob nor
    /// NULL is damage.
    fn scan_outputs(
        &self,
        version: i64,
        mapped: bool,
        mut each: impl FnMut(&Row<'_>, Key, Option<&[u8]>) -> Result<bool>,
    ) -> Result<()> {
        let _mapped = if mapped {
            Some(self.mapped_for_scan()?)
        } else {
            None
        };
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, key, status, output FROM items WHERE version = ?1 ORDER BY seq",
            )
            .map_err(|e| self.fail(e))?;
        let mut found = stmt.query([version]).map_err(|e| self.fail(e))?;
        while let Some(row) = found.next().map_err(|e| self.fail(e))? {
            let key = self.key_at(row, 1)?;
            let status: i64 = row.get(2).map_err(|e| self.fail(e))?;
            // Borrowed from SQLite's row buffer: the caller copies it once, if at all.
            let output = if status == STATUS_OK {
                match row.get_ref(3).map_err(|e| self.fail(e))? {
                    ValueRef::Blob(output) => Some(output),
                    ValueRef::Null => None,
                    _ => return Err(self.corrupt_row(row, "has an output that is not a blob")),
                }
            } else {
                None
            };
            if !each(row, key, output)? {
                break;
            }
        }
        Ok(())
    }

    /// Up to `limit` rows with `seq > after` (of `version`, if given), in `seq` order.
    pub fn rows_after(
        &self,
        version: Option<i64>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<RowInfo>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, key, version, status, input, error_type, error, traceback, \
                 attempts, started, ended FROM items \
                 WHERE seq > ?1 AND (?2 IS NULL OR version = ?2) ORDER BY seq LIMIT ?3",
            )
            .map_err(|e| self.fail(e))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut rows = stmt
            .query(params![after, version, limit])
            .map_err(|e| self.fail(e))?;
        let mut page = Vec::new();
        while let Some(row) = rows.next().map_err(|e| self.fail(e))? {
            let key = self.key_at(row, 1)?;
            let info = (|| -> rusqlite::Result<RowInfo> {
                Ok(RowInfo {
                    seq: row.get(0)?,
                    key,
                    version: row.get(2)?,
                    status: row.get(3)?,
                    input: row.get(4)?,
                    error_type: row.get(5)?,
                    error: row.get(6)?,
                    traceback: row.get(7)?,
                    attempts: row.get(8)?,
                    started: row.get(9)?,
                    ended: row.get(10)?,
                })
            })()
            .map_err(|e| self.fail(e))?;
            page.push(info);
        }
        Ok(page)
    }

    /// Closes the connection, reporting what SQLite says (e.g. a failed WAL checkpoint).
    pub fn close(self) -> Result<()> {
        let path = self.path;
        self.conn
            .close()
            .map_err(|(_, err)| sqlite_error(&path, err))
    }

    /// The key in column `index` of `row`; a key that is not a 16-byte blob means the
    /// file was damaged or written by something else.
    fn key_at(&self, row: &Row<'_>, index: usize) -> Result<Key> {
        key_at(&self.path, row, index)
    }

    fn corrupt_row(&self, row: &Row<'_>, problem: &str) -> Error {
        corrupt_row(&self.path, row, problem)
    }
}

/// The key in column `index` of `row`, read from the checkpoint at `path` (see
/// [`Store::key_at`]).
fn key_at(path: &str, row: &Row<'_>, index: usize) -> Result<Key> {
    let value = row.get_ref(index).map_err(|e| sqlite_error(path, e))?;
    value
        .as_blob()
        .ok()
        .and_then(|blob| Key::try_from(blob).ok())
        .ok_or_else(|| {
            corrupt_row(
                path,
                row,
                &format!("has a key that is not {KEY_SIZE} bytes"),
            )
        })
}

fn corrupt_row(path: &str, row: &Row<'_>, problem: &str) -> Error {
    let seq = row
        .get::<_, i64>(0)
        .map_or_else(|_| "?".to_owned(), |seq| seq.to_string());
    Error::Corrupt {
        path: path.to_owned(),
        problem: format!("is damaged: item row {seq} {problem}"),
    }
}

/// Appends the keys and statuses of the rows of `version` (those with `seq` in the
/// inclusive `range`, if given) to `keys` and `statuses`, in `seq` order.
fn scan_key_status(
    conn: &Connection,
    path: &str,
    version: i64,
    range: Option<(i64, i64)>,
    keys: &mut Vec<u8>,
    statuses: &mut Vec<i64>,
) -> Result<()> {
    let fail = |e| sqlite_error(path, e);
    let (mut stmt, (first, last)) = match range {
        None => (
            conn.prepare_cached(
                "SELECT seq, key, status FROM items WHERE version = ?1 ORDER BY seq",
            )
            .map_err(fail)?,
            (None, None),
        ),
        Some((first, last)) => (
            conn.prepare_cached(
                "SELECT seq, key, status FROM items \
                 WHERE seq >= ?2 AND seq <= ?3 AND version = ?1 ORDER BY seq",
            )
            .map_err(fail)?,
            (Some(first), Some(last)),
        ),
    };
    let mut found = match (first, last) {
        (Some(first), Some(last)) => stmt.query(params![version, first, last]),
        _ => stmt.query([version]),
    }
    .map_err(fail)?;
    while let Some(row) = found.next().map_err(fail)? {
        let key = key_at(path, row, 1)?;
        let status: i64 = row.get(2).map_err(fail)?;
        keys.extend_from_slice(&key);
        statuses.push(status);
    }
    Ok(())
}

/// What a second, read-only connection to a store's file needs to know.
struct Reader<'a> {
    path: &'a str,
    file: &'a Path,
    identity: Option<FileIdentity>,
}

impl Reader<'_> {
    /// The keys and statuses of the rows of `version` in the inclusive `range`, read
    /// through a read-only connection of their own, opened as [`Store::open`] opens
    /// its one (flags, busy timeout; mapped like [`Store::mapped_for_scan`]). None if
    /// that connection cannot be had, or the path no longer names the file the store
    /// opened: then the caller scans the range itself.
    fn scan(
        &self,
        version: i64,
        range: (i64, i64),
        bound: usize,
    ) -> Result<Option<(Vec<u8>, Vec<i64>)>> {
        let same_file = || self.identity.is_some() && file_identity(self.file) == self.identity;
        if !same_file() {
            return Ok(None);
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let Ok(conn) = Connection::open_with_flags(self.file, flags) else {
            return Ok(None);
        };
        let prepared = conn
            .busy_timeout(BUSY_TIMEOUT)
            .and_then(|()| conn.pragma_update(None, "mmap_size", SCAN_MMAP_SIZE));
        // Checked again once open: the name was not moved to another file meanwhile.
        if prepared.is_err() || !same_file() {
            return Ok(None);
        }
        // About half the rows; the first half's buffers are sized for all of them.
        let rows = bound / 2 + 1;
        let mut keys = Vec::with_capacity(rows.saturating_mul(KEY_SIZE));
        let mut statuses = Vec::with_capacity(rows);
        scan_key_status(
            &conn,
            self.path,
            version,
            Some(range),
            &mut keys,
            &mut statuses,
        )?;
        // Closed (and unmapped) here: a read-only connection has nothing to report.
        drop(conn);
        Ok(Some((keys, statuses)))
    }
}

/// What identifies a file whatever its name: device and inode (None where unknown).
type FileIdentity = (u64, u64);

#[cfg(unix)]
fn file_identity(path: &Path) -> Option<FileIdentity> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .map(|meta| (meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn file_identity(_path: &Path) -> Option<FileIdentity> {
    None
}

/// `(key, status)` pairs of concatenated keys and their statuses, in table order (see
/// `order_for_table`); the rows of one key stay in the order saved.
fn key_status_rows(keys: &[u8], statuses: Vec<i64>) -> Vec<(Key, i64)> {
    let mut rows: Vec<(Key, i64)> = keys
        .chunks_exact(KEY_SIZE)
        .map(|chunk| {
            let mut key = [0u8; KEY_SIZE];
            key.copy_from_slice(chunk);
            key
        })
        .zip(statuses)
        .collect();
    order_for_table(&mut rows, |row| &row.0);
    rows
}

/// Unmaps the file when a scan ends, however it ends.
struct MappedScan<'a>(&'a Connection);

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
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new() -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("snapperable-test-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }

        pub(crate) fn file(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub(crate) fn row(key: u8, version: i64, status: i64, output: Option<&[u8]>) -> ItemRow {
        ItemRow {
            key: [key; KEY_SIZE],
            version,
            status,
            input: None,
            output: output.map(<[u8]>::to_vec),
            error_type: (status != STATUS_OK).then(|| "ValueError".to_owned()),
            error: None,
            traceback: None,
            attempts: 1,
            started: 1.0,
            ended: 2.0,
        }
    }

    #[test]
    fn round_trip_with_superseding_rows() {
        let dir = TempDir::new();
        let path = dir.file("run.db");
        let mut store = Store::open(&path, Synchronous::Full).unwrap();
        let v1 = store.add_version("fp1", "{}", None).unwrap();
        let v2 = store.add_version("fp2", "{}", Some(v1)).unwrap();
        let versions = store.versions().unwrap();
        assert_eq!((versions[0].id, versions[0].uses), (v1, v1));
        assert_eq!((versions[1].id, versions[1].uses), (v2, v1));

        store
            .append(&[
                row(1, v1, 0, Some(b"one")),
                row(2, v1, 1, None),
                row(3, v1, 0, Some(b"three")),
                row(2, v1, 0, Some(b"two")), // supersedes the failure
                row(3, v1, 1, None),         // supersedes the success
                row(1, v2, 1, None),
            ])
            .unwrap();
        store.close().unwrap();

        let store = Store::open(&path, Synchronous::Normal).unwrap();
        let ok = store.key_set(Some(v1), 0).unwrap();
        assert!(ok.contains(&[1; 16]) && ok.contains(&[2; 16]) && !ok.contains(&[3; 16]));
        let failed_anywhere = store.key_set(None, 1).unwrap();
        assert_eq!(failed_anywhere.len(), 2); // key 3 in v1, key 1 in v2

        let (mut ok, failed) = store.key_sets(v1).unwrap();
        assert_eq!((ok.len(), failed.len()), (2, 1));
        let ok = ok.table();
        assert!(ok.contains(&[1; 16]) && ok.contains(&[2; 16]) && failed.contains(&[3; 16]));

        let latest = store.latest_outputs(v1).unwrap();
        let in_save_order: Vec<&[u8]> = latest
            .indexes_in_save_order()
            .into_iter()
            .map(|index| latest.output(index))
            .collect();
        assert_eq!(in_save_order, vec![&b"one"[..], &b"two"[..]]);
        let mut wanted = vec![3u8; 16];
        wanted.extend_from_slice(&[2; 16]);
        wanted.extend_from_slice(&[1; 16]);
        wanted.extend_from_slice(&[2; 16]);
        let keys = crate::keys::split_keys(&wanted).unwrap();
        let for_keys: Vec<&[u8]> = latest
            .indexes_for(keys)
            .unwrap()
            .into_iter()
            .map(|index| latest.output(index))
            .collect();
        assert_eq!(for_keys, vec![&b"two"[..], &b"one"[..], &b"two"[..]]);
        assert_eq!(latest.get(&[2; 16]), Some(&b"two"[..]));
        assert_eq!(latest.get(&[3; 16]), None);

        let all = store.rows_after(None, 0, 100).unwrap();
        assert_eq!(all.len(), 6);
        let page = store.rows_after(Some(v1), all[1].seq, 2).unwrap();
        assert_eq!(
            page.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![all[2].seq, all[3].seq]
        );
    }

    #[test]
    fn non_database_file_is_corrupt_and_untouched() {
        let dir = TempDir::new();
        let path = dir.file("notes.db");
        let text = b"these are my notes, not a database; please keep them safe\n".repeat(20);
        std::fs::write(&path, &text).unwrap();
        match Store::open(&path, Synchronous::Full) {
            Err(Error::Corrupt { path: named, .. }) => assert_eq!(named, path.to_string_lossy()),
            Err(other) => panic!("expected Corrupt, got {other}"),
            Ok(_) => panic!("expected Corrupt, got a store"),
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
            err.to_string().contains("is not a snapperable checkpoint"),
            "{err}"
        );

        let newer = dir.file("newer.db");
        Store::open(&newer, Synchronous::Full)
            .unwrap()
            .close()
            .unwrap();
        Connection::open(&newer)
            .unwrap()
            .execute_batch("PRAGMA user_version = 2")
            .unwrap();
        assert!(matches!(
            Store::open(&newer, Synchronous::Full),
            Err(Error::Format { found: 2, .. })
        ));
    }

    #[test]
    fn short_key_in_file_is_corrupt() {
        let dir = TempDir::new();
        let path = dir.file("run.db");
        Store::open(&path, Synchronous::Full)
            .unwrap()
            .close()
            .unwrap();
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "INSERT INTO items (key, version, status, attempts, started, ended) \
                 VALUES (x'0102', 1, 0, 1, 0, 0)",
            )
            .unwrap();
        let store = Store::open(&path, Synchronous::Full).unwrap();
        assert!(matches!(store.key_set(None, 0), Err(Error::Corrupt { .. })));
    }

    /// The outputs `outputs_in_order` sends, and what it found.
    fn streamed(store: &Store, version: i64, expected: InOrder<'_>) -> (Vec<Vec<u8>>, Streamed) {
        let mut sent = Vec::new();
        let found = store
            .outputs_in_order(version, expected, |chunk| {
                sent.extend(chunk.outputs().map(<[u8]>::to_vec));
                true
            })
            .unwrap();
        (sent, found)
    }

    fn keys_of(bytes: &[u8]) -> Vec<u8> {
        bytes.iter().flat_map(|&byte| [byte; KEY_SIZE]).collect()
    }

    #[test]
    fn outputs_in_order_stream_only_rows_one_per_key_in_order() {
        let dir = TempDir::new();
        let mut store = Store::open(&dir.file("run.db"), Synchronous::Normal).unwrap();
        let v1 = store.add_version("fp1", "{}", None).unwrap();
        let v2 = store.add_version("fp2", "{}", None).unwrap();
        let mut rows: Vec<ItemRow> = (0..10_000u32)
            .map(|i| {
                let mut row = row(0, v1, 0, Some(&i.to_le_bytes()));
                row.key[..4].copy_from_slice(&i.to_le_bytes());
                row
            })
            .collect();
        rows[7].status = STATUS_FAILED;
        rows[7].output = None;
        rows.insert(3, row(9, v2, 0, Some(b"other version")));
        store.append(&rows).unwrap();
        rows.remove(3);
        let keys: Vec<u8> = rows.iter().flat_map(|row| row.key).collect();

        let (sent, found) = streamed(&store, v1, InOrder::Keys(&keys));
        assert_eq!(found, Streamed::Complete);
        assert_eq!(sent.len(), 9_999); // the failed row has no output
        assert_eq!(sent[7], 8u32.to_le_bytes());
        let (sent, found) = streamed(&store, v1, InOrder::DistinctKeys);
        assert_eq!((sent.len(), found), (9_999, Streamed::Complete));

        // Fewer keys, other keys, another order: not in order.
        let fewer = &keys[..keys.len() - KEY_SIZE];
        assert_eq!(
            streamed(&store, v1, InOrder::Keys(fewer)).1,
            Streamed::NotInOrder
        );
        let mut swapped = keys.clone();
        swapped[..2 * KEY_SIZE].rotate_left(KEY_SIZE);
        assert_eq!(
            streamed(&store, v1, InOrder::Keys(&swapped)).1,
            Streamed::NotInOrder
        );
        // A receiver that stops makes it stop.
        let stopped = store.outputs_in_order(v1, InOrder::DistinctKeys, |_| false);
        assert_eq!(stopped.unwrap(), Streamed::NotInOrder);

        // A later row of the same key: with its key repeated in the wanted keys the rows
        // match one to one, and only the repeat tells.
        store
            .append(&[row(0, v2, 0, Some(b"a")), row(0, v2, 0, Some(b"b"))])
            .unwrap();
        let twice = keys_of(&[0, 0]);
        assert_eq!(
            streamed(&store, v2, InOrder::Keys(&twice)).1,
            Streamed::NotInOrder
        );
        assert_eq!(
            streamed(&store, v2, InOrder::DistinctKeys).1,
            Streamed::NotInOrder
        );
        // More keys than rows in the whole file: known before the scan.
        let many = vec![0u8; KEY_SIZE * 20_000];
        assert_eq!(
            streamed(&store, v2, InOrder::Keys(&many)),
            (vec![], Streamed::NotInOrder)
        );
    }

    #[test]
    fn key_sets_of_a_finished_run_claim_in_order() {
        let dir = TempDir::new();
        let mut store = Store::open(&dir.file("run.db"), Synchronous::Normal).unwrap();
        let v1 = store.add_version("fp1", "{}", None).unwrap();
        let rows: Vec<ItemRow> = (1..=5).map(|k| row(k, v1, 0, Some(&[k]))).collect();
        store.append(&rows).unwrap();
        let (mut ok, failed) = store.key_sets(v1).unwrap();
        assert_eq!((ok.len(), failed.len()), (5, 0));
        assert_eq!(ok.claim(&keys_of(&[1, 2, 3])).unwrap(), Vec::<usize>::new());
        assert_eq!(ok.claim(&keys_of(&[4, 5, 6, 1])).unwrap(), vec![2]);
        assert_eq!(ok.len(), 6);

        // A failure, then a retry that succeeded: the general fold, same answers.
        store
            .append(&[row(6, v1, 1, None), row(6, v1, 0, Some(b"6"))])
            .unwrap();
        let (mut ok, failed) = store.key_sets(v1).unwrap();
        assert_eq!((ok.len(), failed.len()), (6, 0));
        assert_eq!(ok.claim(&keys_of(&[7, 6, 1])).unwrap(), vec![0]);
    }

    /// Rows of `v1` and `v2` interleaved, with failures and superseding rows on both
    /// sides of the middle `seq` (where a split scan divides the table).
    fn rows_across_the_middle(v1: i64, v2: i64) -> Vec<ItemRow> {
        let keyed = |i: u32, version: i64, status: i64| {
            let mut row = row(0, version, status, (status == 0).then_some(&b"out"[..]));
            row.key[..4].copy_from_slice(&i.to_le_bytes());
            row
        };
        let mut rows = Vec::new();
        for i in 0..4000u32 {
            let status = i64::from(i % 13 == 5); // some failed
            rows.push(keyed(i, v1, status));
            if i % 3 == 0 {
                rows.push(keyed(i, v2, 0)); // another version, interleaved
            }
            if i % 101 == 7 {
                rows.push(keyed(4000 - i, v1, 1 - status)); // supersedes a later key
            }
            if i % 97 == 3 && i > 10 {
                rows.push(keyed(i - 10, v1, 1)); // supersedes an earlier key
            }
        }
        rows
    }

    #[test]
    fn split_scan_finds_exactly_what_one_scan_finds() {
        let dir = TempDir::new();
        let path = dir.file("run.db");
        let mut store = Store::open(&path, Synchronous::Normal).unwrap();
        let v1 = store.add_version("fp1", "{}", None).unwrap();
        let v2 = store.add_version("fp2", "{}", None).unwrap();
        store.append(&rows_across_the_middle(v1, v2)).unwrap();
        let (first, split, last) = store.split_point().unwrap().unwrap();
        assert!(first < split && split < last);
        for version in [v1, v2, 99] {
            let single = store
                .key_status_columns_split_above(version, usize::MAX)
                .unwrap();
            let split = store.key_status_columns_split_above(version, 0).unwrap();
            assert_eq!(split, single, "version {version}");
        }
        let single = store
            .key_status_columns_split_above(v1, usize::MAX)
            .unwrap();
        assert!(single.1.contains(&STATUS_FAILED) && single.1.len() > 4000);

        // The name moved to another file: the second half is read through the store's
        // own connection instead, with the same result.
        let moved = dir.file("moved.db");
        std::fs::rename(&path, &moved).unwrap();
        Store::open(&path, Synchronous::Normal)
            .unwrap()
            .close()
            .unwrap();
        assert_eq!(store.key_status_columns_split_above(v1, 0).unwrap(), single);
        let (ok, failed) = store.key_sets(v1).unwrap();
        assert!(ok.len() > 3000 && !failed.is_empty());
    }

    #[test]
    fn split_scan_reports_damage_in_either_half_as_one_scan_does() {
        for damaged_seq in [
            "(SELECT min(seq) + 3 FROM items)",
            "(SELECT max(seq) - 3 FROM items)",
        ] {
            let dir = TempDir::new();
            let path = dir.file("run.db");
            let mut store = Store::open(&path, Synchronous::Normal).unwrap();
            let v1 = store.add_version("fp1", "{}", None).unwrap();
            store.append(&rows_across_the_middle(v1, v1 + 1)).unwrap();
            store
                .conn
                .execute_batch(&format!(
                    "UPDATE items SET key = x'0102' WHERE seq = {damaged_seq}"
                ))
                .unwrap();
            let single = store.key_status_columns_split_above(v1, usize::MAX);
            let split = store.key_status_columns_split_above(v1, 0);
            assert!(
                matches!(single, Err(Error::Corrupt { .. })),
                "{damaged_seq}"
            );
            assert_eq!(split.err(), single.err(), "{damaged_seq}");
        }
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
        let read = store.rows_after(Some(v1), 0, 1000).unwrap();
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
