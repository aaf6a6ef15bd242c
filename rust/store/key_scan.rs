//! The key sets that plan a run: which keys of a version are done, which failed. The
//! rows of one version are spread over the whole table (no index on `key`, so appends
//! stay sequential): a large table is scanned in two halves on two threads, the second
//! through a read-only connection of its own (`Reader`).

use rusqlite::Connection;

use super::open::{Reader, Store};
use super::row_checksum::{checksum_at, head_matches, mismatch, Sequence};
use super::scan::{scan_seq_range, RowScan};
use super::schema::{key_at, wrong_type};
use crate::contract::{KEY_SIZE, STATUS_FAILED, STATUS_OK};
use crate::errors::{Error, Result};
use crate::keys::{
    keys_distinct, order_for_table, ClaimSet, Key, KeySet, KeyVersion, KeyVersionMap,
};

/// Rows (as `row_bound` estimates them) above which [`Store::key_sets`] scans the table
/// in two halves on two threads, the second through a read-only connection of its own.
/// Below it the second connection and thread cost more than they save (1M rows: about
/// 150 ms for one scan).
pub(super) const SPLIT_SCAN_ROWS: usize = 100_000;

/// An inclusive range of `seq`.
pub(super) type SeqRange = (i64, i64);

impl Store {
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
        let mut rows = RowScan::new(
            &self.conn,
            if self.checksummed {
                c"SELECT seq, key, version, status, checksum FROM items ORDER BY seq"
            } else {
                c"SELECT seq, key, version, status FROM items ORDER BY seq"
            },
            &[],
        )
        .map_err(|e| self.fail(e))?;
        let mut sequence = Sequence::from(1);
        while let Some(row) = rows.next().map_err(|e| self.fail(e))? {
            let row = &row;
            if self.checksummed {
                sequence.check(&self.path, row)?;
            }
            let key = key_at(&self.path, row, 1)?;
            let (Some(row_version), Some(row_status)) = (row.integer(2), row.integer(3)) else {
                return Err(wrong_type(&self.path, row));
            };
            if self.checksummed
                && !head_matches(
                    &checksum_at(&self.path, row, 4)?,
                    &key,
                    row_version,
                    row_status,
                )
            {
                return Err(mismatch(&self.path, row));
            }
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
    pub(super) fn key_status_columns_split_above(
        &self,
        version: i64,
        split_above: usize,
    ) -> Result<(Vec<u8>, Vec<i64>)> {
        let bound = self.row_bound()?;
        let mut keys = Vec::with_capacity(bound.saturating_mul(KEY_SIZE));
        let mut statuses = Vec::with_capacity(bound);
        let _mapped = self.mapped_for_scan()?;
        let Some((earlier_half, later_half)) = self.halves(bound, split_above)? else {
            scan_key_status(
                &self.conn,
                &self.path,
                self.checksummed,
                version,
                None,
                &mut keys,
                &mut statuses,
            )?;
            return Ok((keys, statuses));
        };
        let reader = self.reader();
        let second = std::thread::scope(|scope| {
            let later = std::thread::Builder::new()
                .name("snapperable-scan".to_owned())
                .spawn_scoped(scope, || scan_with(&reader, version, later_half, bound));
            let earlier = scan_key_status(
                &self.conn,
                &self.path,
                self.checksummed,
                version,
                Some(earlier_half),
                &mut keys,
                &mut statuses,
            );
            let later = match later {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|payload| Err(Error::panicked(&self.path, "scan", &*payload))),
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
                self.checksummed,
                version,
                Some(later_half),
                &mut keys,
                &mut statuses,
            )?,
        }
        Ok((keys, statuses))
    }

    /// The two inclusive `seq` ranges a scan split in halves reads, one after the other,
    /// or None for a table of at most `split_above` rows (by `bound`, its
    /// [`Store::row_bound`]) or one that cannot be split (see [`Store::split_point`]).
    pub(super) fn halves(
        &self,
        bound: usize,
        split_above: usize,
    ) -> Result<Option<(SeqRange, SeqRange)>> {
        if bound <= split_above {
            return Ok(None);
        }
        let Some((first, split, last)) = self.split_point()? else {
            return Ok(None);
        };
        // A format-2 table's rows are numbered from 1 (see `Sequence`): scanned from
        // there, a damaged first number is a gap, not a row left out.
        let first = if self.checksummed { 1 } else { first };
        Ok(Some(((first, split), (split + 1, last))))
    }

    /// `(first, split, last)` to scan as `first..=split` and `split + 1..=last`, or
    /// None if the table cannot be split so. Not when `max(seq)` is `i64::MAX`: SQLite
    /// then gives new rows random free numbers, and the log is no longer append-only.
    pub(super) fn split_point(&self) -> Result<Option<(i64, i64, i64)>> {
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
}

/// Appends the keys and statuses of the rows of `version` (those with `seq` in the
/// inclusive `range`, if given) to `keys` and `statuses`, in `seq` order. If
/// `checksummed` (format 2), every row is read and checked, in this thread, on values
/// borrowed from SQLite's buffer: its number, and its checksum's head (which covers key,
/// version, status and the stored CRCs of the rest). Every row, not only `version`'s:
/// one whose version number is damaged must be met and fail, not filtered out unseen.
fn scan_key_status(
    conn: &Connection,
    path: &str,
    checksummed: bool,
    version: i64,
    range: Option<(i64, i64)>,
    keys: &mut Vec<u8>,
    statuses: &mut Vec<i64>,
) -> Result<()> {
    let sql = if checksummed {
        c"SELECT seq, key, status, checksum, version FROM items \
          WHERE ?1 IS NOT NULL AND seq >= ?2 AND seq <= ?3 ORDER BY seq"
    } else {
        c"SELECT seq, key, status, NULL, version FROM items \
          WHERE version = ?1 AND seq >= ?2 AND seq <= ?3 ORDER BY seq"
    };
    scan_seq_range(conn, path, checksummed, sql, version, range, |row| {
        let key = key_at(path, row, 1)?;
        let (Some(status), Some(row_version)) = (row.integer(2), row.integer(4)) else {
            return Err(wrong_type(path, row));
        };
        if checksummed && !head_matches(&checksum_at(path, row, 3)?, &key, row_version, status) {
            return Err(mismatch(path, row));
        }
        if row_version == version {
            keys.extend_from_slice(&key);
            statuses.push(status);
        }
        Ok(true)
    })
}

/// The keys and statuses of the rows of `version` in the inclusive `range`, read through
/// a read-only connection of their own (mapped, as the store's own is for a key scan).
/// None if that connection cannot be had (see [`Reader::connect`]): then the caller
/// scans the range itself.
fn scan_with(
    reader: &Reader<'_>,
    version: i64,
    range: (i64, i64),
    bound: usize,
) -> Result<Option<(Vec<u8>, Vec<i64>)>> {
    let Some(conn) = reader.connect(true) else {
        return Ok(None);
    };
    // About half the rows; the first half's buffers are sized for all of them.
    let rows = bound / 2 + 1;
    let mut keys = Vec::with_capacity(rows.saturating_mul(KEY_SIZE));
    let mut statuses = Vec::with_capacity(rows);
    scan_key_status(
        &conn,
        reader.path,
        reader.checksummed,
        version,
        Some(range),
        &mut keys,
        &mut statuses,
    )?;
    // Closed (and unmapped) here: a read-only connection has nothing to report.
    drop(conn);
    Ok(Some((keys, statuses)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{keys_of, row, rows_across_the_middle, split_table, TempDir};
    use crate::store::{ItemRow, Synchronous};

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
                "INSERT INTO items (key, version, status, attempts, started, ended, checksum) \
                 VALUES (x'0102', 1, 0, 1, 0, 0, 0)",
            )
            .unwrap();
        let store = Store::open(&path, Synchronous::Full).unwrap();
        assert!(matches!(
            store.key_set(None, 0),
            Err(Error::BadKey { seq: Some(1), .. })
        ));
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

    #[test]
    fn split_scan_finds_exactly_what_one_scan_finds() {
        let dir = TempDir::new();
        let (path, store, v1, v2) = split_table(&dir);
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
            assert!(matches!(single, Err(Error::BadKey { .. })), "{damaged_seq}");
            assert_eq!(split.err(), single.err(), "{damaged_seq}");
        }
    }
}
