//! A load that streams: the outputs of a version's rows in the order asked (the keys'
//! order, or the order saved), handed over a chunk at a time while the scan goes on, as
//! long as the rows are what the caller expects (then the answer needs no table of all
//! outputs); and the scan of outputs that every load reads through.

use std::mem;
use std::sync::mpsc;

use rusqlite::types::ValueRef;
use rusqlite::Connection;

use super::key_scan::SPLIT_SCAN_ROWS;
use super::open::Store;
use super::row_checksum::{checksum_at, head_matches, mismatch, output_matches};
use super::scan::{scan_seq_range, ScanRow};
use super::schema::{corrupt_row, key_at, wrong_type};
use crate::contract::{KEY_SIZE, STATUS_OK};
use crate::errors::{Error, Result};
use crate::keys::{all_distinct, key_prefix, keys_distinct, Key, KeyMap};

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
    /// Exactly one row per key of this buffer of concatenated keys, in its order or
    /// nearly (see [`Early`]): the rows of a run that found no repeated input and
    /// retried no failure, saved in the order of its inputs or, by a concurrent run, in
    /// the order they completed.
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

impl Store {
    /// The saved outputs of `version`'s ok rows in the order `expected` gives, sent to
    /// `send` a chunk at a time while the scan goes on, as long as the rows are what
    /// `expected` says; then the answer of a load needs no table of all outputs. Returns
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
        // Keys: how many of them have had their row; DistinctKeys: rows seen.
        let mut seen = 0usize;
        let mut early = Early::default();
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
        let key_at = |keys: &[u8], index: usize| {
            let at = index.saturating_mul(KEY_SIZE);
            keys.get(at..at.saturating_add(KEY_SIZE))
                .and_then(|key| Key::try_from(key).ok())
        };
        self.scan_outputs_in_halves(version, SPLIT_SCAN_ROWS, |key, output| {
            let mut emit = |output: Option<&[u8]>| {
                if let Some(output) = output {
                    chunk.push(output);
                    if chunk.is_full() && !send(mem::take(&mut chunk)) {
                        return false;
                    }
                }
                true
            };
            let going = match expected {
                InOrder::Keys(keys) if key_at(keys, seen) == Some(key) => {
                    seen += 1;
                    let mut going = emit(output);
                    // The rows that came early for the keys now next, in their order.
                    while going && !early.is_empty() {
                        let Some(span) = key_at(keys, seen).and_then(|key| early.take(&key)) else {
                            break;
                        };
                        seen += 1;
                        going = emit(early.output(span));
                    }
                    going
                }
                // Ahead of its key's turn (or of no key asked for, or a second row of a
                // key): kept until its turn, within the window.
                InOrder::Keys(_) => early.keep(key, output),
                InOrder::DistinctKeys => {
                    prefixes.push(key_prefix(&key));
                    seen += 1;
                    emit(output)
                }
            };
            if !going {
                stopped = true;
            }
            Ok(going)
        })?;
        if stopped {
            return Ok(Streamed::NotInOrder);
        }
        if !chunk.is_empty() && !send(chunk) {
            return Ok(Streamed::NotInOrder);
        }
        let distinct = match expected {
            // Every key had its row and no row is left over: with distinct keys, each
            // key's row was its only one, so its output is its latest.
            InOrder::Keys(keys) => {
                early.is_empty()
                    && seen.checked_mul(KEY_SIZE) == Some(keys.len())
                    && keys_distinct(keys)
            }
            InOrder::DistinctKeys => all_distinct(prefixes),
        };
        Ok(if distinct {
            Streamed::Complete
        } else {
            Streamed::NotInOrder
        })
    }
}

/// The rows of a nearly ordered load that came before their key's turn (a concurrent
/// run saves rows as they complete, a few thousand at most out of place): held until
/// then, their outputs back to back in one buffer. More than [`Early::MAX_ROWS`] rows
/// or [`Early::MAX_BYTES`] bytes out of place, or two rows of one key, and the load
/// takes the general way: the window bounds the memory of a streaming load.
#[derive(Default)]
struct Early {
    /// Per key: where its output lies in `arena`, or None if its row has none.
    rows: KeyMap<Option<(usize, usize)>>,
    arena: Vec<u8>,
    /// Bytes of `arena` still held by a row (the rest were taken).
    held: usize,
}

impl Early {
    const MAX_ROWS: usize = 1 << 16;
    const MAX_BYTES: usize = 64 << 20;

    fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Keeps the row of `key` for later; false if the window is full or `key` already
    /// has a row here.
    fn keep(&mut self, key: Key, output: Option<&[u8]>) -> bool {
        let length = output.map_or(0, <[u8]>::len);
        if self.rows.len() >= Self::MAX_ROWS || self.held + length > Self::MAX_BYTES {
            return false;
        }
        if self.rows.is_empty() {
            self.arena.clear();
            self.held = 0;
        }
        // Taken rows leave their bytes behind: once they are most of the buffer, it is
        // rebuilt with only the rows still held (amortized: each byte moves at most once
        // per halving).
        if self.arena.len() > 2 * self.held + (1 << 20) {
            self.compact();
        }
        let span = output.map(|output| {
            let start = self.arena.len();
            self.arena.extend_from_slice(output);
            (start, self.arena.len())
        });
        self.held += length;
        self.rows.insert(key, span).is_none()
    }

    /// Where the output of the row kept for `key` lies (`Some(None)`: a row without
    /// one), if one is kept; read it with [`Early::output`] before the next `keep`.
    fn take(&mut self, key: &Key) -> Option<Option<(usize, usize)>> {
        let span = self.rows.remove(key)?;
        if let Some((start, end)) = span {
            self.held -= end - start;
        }
        Some(span)
    }

    fn output(&self, span: Option<(usize, usize)>) -> Option<&[u8]> {
        span.map(|(start, end)| self.arena.get(start..end).unwrap_or_default())
    }

    fn compact(&mut self) {
        let mut arena = Vec::with_capacity(self.held);
        let old = mem::take(&mut self.rows);
        let mut rows = KeyMap::with_capacity(old.len());
        for (key, span) in old.into_entries() {
            let span = span.map(|(start, end)| {
                let from = arena.len();
                arena.extend_from_slice(self.arena.get(start..end).unwrap_or_default());
                (from, arena.len())
            });
            rows.insert(key, span);
        }
        self.rows = rows;
        self.arena = arena;
    }
}

impl Store {
    /// Calls `each` with `(row, key, output)` for each row of `version` in `seq` order,
    /// until it returns false; `output` is the saved output of an ok row (None for a
    /// failed row, or an ok row without one). An output that is neither a blob nor
    /// NULL is damage.
    pub(super) fn scan_outputs(
        &self,
        version: i64,
        mapped: bool,
        each: impl FnMut(&ScanRow<'_>, Key, Option<&[u8]>) -> Result<bool>,
    ) -> Result<()> {
        let _mapped = if mapped {
            Some(self.mapped_for_scan()?)
        } else {
            None
        };
        scan_output_range(
            &self.conn,
            &self.path,
            self.checksummed,
            version,
            None,
            each,
        )
    }

    /// [`Self::scan_outputs`] without a mapping, `each` given `(key, output)`; on a
    /// table of more than `split_above` rows (a parameter only so that tests can lower
    /// it) and at most [`CheckedRows::MOST_ROWS`], in two halves at once.
    ///
    /// The scan, not the unpickling beside it, is the slow side of a load, and most of
    /// it is reading and checking rows: this thread scans the first half and hands its
    /// rows to `each` while another checks the second half through a read-only
    /// connection of its own and buffers its rows, at most [`CheckedRows::AHEAD`]
    /// batches ahead; `each` gets those once the first half is done, in order. Both
    /// halves end at one `max(seq)` read first, as the key scan's do (see
    /// `key_status_columns_split_above`): what one scan would have found. An error of
    /// the first half comes first, as in one scan; one of the second after the rows
    /// before it.
    pub(super) fn scan_outputs_in_halves(
        &self,
        version: i64,
        split_above: usize,
        mut each: impl FnMut(Key, Option<&[u8]>) -> Result<bool>,
    ) -> Result<()> {
        let bound = self.row_bound()?;
        let halves = if bound <= CheckedRows::MOST_ROWS {
            self.halves(bound, split_above)?
        } else {
            None
        };
        let Some((earlier_half, later_half)) = halves else {
            return self.scan_outputs(version, false, |_, key, output| each(key, output));
        };
        let later_half = Some(later_half);
        let reader = self.reader();
        let (going, scanned) = std::thread::scope(|scope| -> Result<(bool, bool)> {
            let (sender, batches) = mpsc::sync_channel::<CheckedRows>(CheckedRows::AHEAD);
            // Ok(false): no second connection, nothing sent; the half is scanned below.
            let later = std::thread::Builder::new()
                .name("snapperable-scan".to_owned())
                .spawn_scoped(scope, move || -> Result<bool> {
                    let Some(conn) = reader.connect(false) else {
                        return Ok(false);
                    };
                    let mut batch = CheckedRows::new();
                    let path = reader.path;
                    let scan = scan_output_range(
                        &conn,
                        path,
                        reader.checksummed,
                        version,
                        later_half,
                        |_, key, output| {
                            batch.push(key, output);
                            // A send fails once the receiver is gone: it stopped, stop too.
                            Ok(!batch.is_full()
                                || sender
                                    .send(mem::replace(&mut batch, CheckedRows::new()))
                                    .is_ok())
                        },
                    );
                    // The rows before a damaged one too: one scan would hand them over
                    // before it fails (and `each` may stop before the damage).
                    if !batch.is_empty() {
                        let _ = sender.send(batch);
                    }
                    scan.map(|()| true)
                });
            let mut going = true;
            let earlier = scan_output_range(
                &self.conn,
                &self.path,
                self.checksummed,
                version,
                Some(earlier_half),
                |_, key, output| {
                    going = each(key, output)?;
                    Ok(going)
                },
            );
            // Until the other thread ends (and drops its sender): what it buffered.
            let mut refused = None; // an error of `each`, after the thread is joined
            if earlier.is_ok() && going {
                'batches: for batch in batches.iter() {
                    for (key, output) in batch.rows() {
                        match each(key, output) {
                            Ok(true) => {}
                            Ok(false) => going = false,
                            Err(err) => refused = Some(err),
                        }
                        if !going || refused.is_some() {
                            break 'batches;
                        }
                    }
                }
            }
            drop(batches); // a thread still sending stops at its next batch
            let scanned = match later {
                Ok(handle) => handle
                    .join()
                    .unwrap_or_else(|payload| Err(Error::panicked(&self.path, "scan", &*payload))),
                Err(_) => Ok(false), // no thread: scanned below, on this one
            };
            earlier?;
            if let Some(err) = refused {
                return Err(err);
            }
            if !going {
                return Ok((false, true)); // stopped by `each`: what lies after is not read
            }
            Ok((true, scanned?))
        })?;
        if going && !scanned {
            // No second connection (or not to this file): the second half here.
            scan_output_range(
                &self.conn,
                &self.path,
                self.checksummed,
                version,
                later_half,
                |_, key, output| each(key, output),
            )?;
        }
        Ok(())
    }
}

/// Calls `each` with `(row, key, output)` for each row of `version` with `seq` in the
/// inclusive `range` (every row if None), in `seq` order, until it returns false: see
/// [`checked_output`] and [`scan_seq_range`].
fn scan_output_range(
    conn: &Connection,
    path: &str,
    checksummed: bool,
    version: i64,
    range: Option<(i64, i64)>,
    mut each: impl FnMut(&ScanRow<'_>, Key, Option<&[u8]>) -> Result<bool>,
) -> Result<()> {
    let sql = if checksummed {
        // Every row, not only `version`'s: a row whose version number is damaged must
        // be met (and fail its checksum), not filtered out unseen.
        c"SELECT seq, key, status, checksum, output, version FROM items \
          WHERE ?1 IS NOT NULL AND seq >= ?2 AND seq <= ?3 ORDER BY seq"
    } else {
        c"SELECT seq, key, status, NULL, output, version FROM items \
          WHERE version = ?1 AND seq >= ?2 AND seq <= ?3 ORDER BY seq"
    };
    scan_seq_range(
        conn,
        path,
        checksummed,
        sql,
        version,
        range,
        |row| match checked_output(path, checksummed, version, row)? {
            Some((key, output)) => each(row, key, output),
            None => Ok(true),
        },
    )
}

/// A row's key and, for an ok row that has one, its saved output.
type KeyedOutput<'r> = (Key, Option<&'r [u8]>);

/// The key and output (of an ok row) of a row of a load's scan, checked: in a format-2
/// table its head checksum (which covers key, version, status and the stored CRCs of
/// the rest) and its output (its number is checked by `scan_seq_range`), on the values borrowed from SQLite's row
/// buffer. None for a row of another version. An output that is neither a blob nor
/// NULL is damage.
#[inline]
fn checked_output<'r>(
    path: &str,
    checksummed: bool,
    version: i64,
    row: &'r ScanRow<'_>,
) -> Result<Option<KeyedOutput<'r>>> {
    let key = key_at(path, row, 1)?;
    let status = row.integer(2).ok_or_else(|| wrong_type(path, row))?;
    let checksum = if checksummed {
        let row_version = row.integer(5).ok_or_else(|| wrong_type(path, row))?;
        let checksum = checksum_at(path, row, 3)?;
        if !head_matches(&checksum, &key, row_version, status) {
            return Err(mismatch(path, row));
        }
        if row_version != version {
            return Ok(None);
        }
        Some(checksum)
    } else {
        None
    };
    let stored = match row.value(4) {
        ValueRef::Blob(output) => Some(output),
        ValueRef::Null => None,
        _ => return Err(corrupt_row(path, row, "has an output that is not a blob")),
    };
    if checksum.is_some_and(|checksum| !output_matches(&checksum, stored)) {
        return Err(mismatch(path, row));
    }
    Ok(Some((key, if status == STATUS_OK { stored } else { None })))
}

/// Checked rows of the second half of a split load scan, buffered until the first half
/// is handed over: one buffer of records, each a key, a u64 length (`u64::MAX`: no
/// output) and the output's bytes. One buffer, not one per column: it is most of what a
/// split load holds beyond what one scan holds.
struct CheckedRows {
    records: Vec<u8>,
}

impl CheckedRows {
    /// Bytes a batch holds before it is sent (or one larger output).
    const BATCH_BYTES: usize = 256 << 10;
    /// Batches the second half may be ahead: at most 16 MiB buffered, which holds the
    /// whole second half of a 1M-row load of small outputs (24 bytes a row and the
    /// output). A larger load buffers no more; its second thread waits.
    const AHEAD: usize = 64;
    /// Rows above which a load reads the table in one scan: the second half would not
    /// fit in the buffer (at about 32 bytes a row), so its thread would wait, and the
    /// buffer would cost a larger load's peak memory, there the tighter limit, more
    /// than the split saves it in time.
    const MOST_ROWS: usize = 2 * Self::AHEAD * Self::BATCH_BYTES / 32;
    const WITHOUT: u64 = u64::MAX;

    /// Sized for a full batch at once: grown by doubling, each batch would leave the
    /// buffers it outgrew behind in this thread's heap, resident through the load.
    fn new() -> Self {
        CheckedRows {
            records: Vec::with_capacity(Self::BATCH_BYTES + 4096),
        }
    }

    fn push(&mut self, key: Key, output: Option<&[u8]>) {
        self.records.extend_from_slice(&key);
        let length = output.map_or(Self::WITHOUT, |output| output.len() as u64);
        self.records.extend_from_slice(&length.to_le_bytes());
        self.records.extend_from_slice(output.unwrap_or_default());
    }

    fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn is_full(&self) -> bool {
        self.records.len() >= Self::BATCH_BYTES
    }

    /// The rows, in the order scanned.
    fn rows(&self) -> impl Iterator<Item = (Key, Option<&[u8]>)> + '_ {
        let mut rest = &self.records[..];
        std::iter::from_fn(move || {
            let (key, after) = rest.split_first_chunk::<KEY_SIZE>()?;
            let (length, after) = after.split_first_chunk::<8>()?;
            let length = u64::from_le_bytes(*length);
            if length == Self::WITHOUT {
                rest = after;
                return Some((*key, None));
            }
            let length = usize::try_from(length).ok()?;
            let (output, after) = after.split_at_checked(length)?;
            rest = after;
            Some((*key, Some(output)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::STATUS_FAILED;
    use crate::store::tests::{keys_of, row, rows_across_the_middle, split_table, TempDir};
    use crate::store::{ItemRow, Synchronous};

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

        // Fewer keys, other keys: not in order.
        let fewer = &keys[..keys.len() - KEY_SIZE];
        assert_eq!(
            streamed(&store, v1, InOrder::Keys(fewer)).1,
            Streamed::NotInOrder
        );
        // Another order, close to the one saved: streamed, in the order asked.
        let mut swapped = keys.clone();
        swapped[..2 * KEY_SIZE].rotate_left(KEY_SIZE);
        let (sent, found) = streamed(&store, v1, InOrder::Keys(&swapped));
        assert_eq!(found, Streamed::Complete);
        assert_eq!(
            (&sent[0][..], &sent[1][..], sent.len()),
            (&1u32.to_le_bytes()[..], &0u32.to_le_bytes()[..], 9_999)
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
    fn outputs_in_order_stream_rows_out_of_place_within_the_window() {
        let dir = TempDir::new();
        let mut store = Store::open(&dir.file("run.db"), Synchronous::Normal).unwrap();
        let v1 = store.add_version("fp1", "{}", None).unwrap();
        let n = 20_000u32;
        let keyed = |i: u32, status: i64| {
            let output = i.to_le_bytes();
            let mut row = row(0, v1, status, (status == 0).then_some(&output[..]));
            row.key[..4].copy_from_slice(&i.to_le_bytes());
            row
        };
        // Completion order: each block of 64 reversed, one row 5,000 places late, and a
        // failed row out of place.
        let mut order: Vec<u32> = (0..n).collect();
        for block in order.chunks_mut(64) {
            block.reverse();
        }
        let late = order.remove(100);
        order.insert(5_100, late);
        let rows: Vec<ItemRow> = order
            .iter()
            .map(|&i| keyed(i, if i == 300 { STATUS_FAILED } else { 0 }))
            .collect();
        store.append(&rows).unwrap();
        let keys: Vec<u8> = (0..n).flat_map(|i| keyed(i, 0).key).collect();
        let (sent, found) = streamed(&store, v1, InOrder::Keys(&keys));
        assert_eq!(found, Streamed::Complete);
        let expected: Vec<Vec<u8>> = (0..n)
            .filter(|&i| i != 300)
            .map(|i| i.to_le_bytes().to_vec())
            .collect();
        assert_eq!(sent, expected);

        // A later row of a key already loaded, or a key without a row: the general way.
        store.append(&[keyed(7, 0)]).unwrap();
        assert_eq!(
            streamed(&store, v1, InOrder::Keys(&keys)).1,
            Streamed::NotInOrder
        );
        let mut more = keys.clone();
        more.extend_from_slice(&keyed(n + 1, 0).key);
        more.extend_from_slice(&keyed(n + 2, 0).key);
        assert_eq!(
            streamed(&store, v1, InOrder::Keys(&more)).1,
            Streamed::NotInOrder
        );
    }

    #[test]
    fn outputs_in_order_give_up_beyond_the_window() {
        let dir = TempDir::new();
        let mut store = Store::open(&dir.file("run.db"), Synchronous::Normal).unwrap();
        let v1 = store.add_version("fp1", "{}", None).unwrap();
        let n = u32::try_from(Early::MAX_ROWS).unwrap() + 10;
        let keyed = |i: u32| {
            let mut row = row(0, v1, 0, Some(b"x"));
            row.key[..4].copy_from_slice(&i.to_le_bytes());
            row
        };
        // The first key's row saved last: every other row waits for it.
        let rows: Vec<ItemRow> = (1..n).chain([0]).map(keyed).collect();
        store.append(&rows).unwrap();
        let keys: Vec<u8> = (0..n).flat_map(|i| keyed(i).key).collect();
        assert_eq!(
            streamed(&store, v1, InOrder::Keys(&keys)).1,
            Streamed::NotInOrder
        );
        // Within the window, the same shape streams.
        let few = 1_000u32;
        let dir = TempDir::new();
        let mut store = Store::open(&dir.file("run.db"), Synchronous::Normal).unwrap();
        let v1 = store.add_version("fp1", "{}", None).unwrap();
        let rows: Vec<ItemRow> = (1..few).chain([0]).map(keyed).collect();
        store.append(&rows).unwrap();
        let keys: Vec<u8> = (0..few).flat_map(|i| keyed(i).key).collect();
        let (sent, found) = streamed(&store, v1, InOrder::Keys(&keys));
        assert_eq!((sent.len(), found), (1_000, Streamed::Complete));
    }

    /// `(key, output)` of what `scan_outputs_in_halves` hands over, until `stop_after`
    /// rows (then `each` says stop); or its error.
    fn halves(
        store: &Store,
        version: i64,
        split_above: usize,
        stop_after: usize,
    ) -> Result<Vec<(Key, Option<Vec<u8>>)>> {
        let mut seen = Vec::new();
        store.scan_outputs_in_halves(version, split_above, |key, output| {
            seen.push((key, output.map(<[u8]>::to_vec)));
            Ok(seen.len() < stop_after)
        })?;
        Ok(seen)
    }

    #[test]
    fn halves_hand_over_exactly_what_one_scan_does() {
        let dir = TempDir::new();
        let (path, store, v1, v2) = split_table(&dir);
        for version in [v1, v2, 99] {
            let single = halves(&store, version, usize::MAX, usize::MAX).unwrap();
            assert_eq!(
                halves(&store, version, 0, usize::MAX).unwrap(),
                single,
                "version {version}"
            );
        }
        let single = halves(&store, v1, usize::MAX, usize::MAX).unwrap();
        assert!(single.len() > 4000 && single.iter().any(|(_, output)| output.is_none()));

        // The name moved to another file: the second half is read through the store's
        // own connection instead, with the same result.
        std::fs::rename(&path, dir.file("moved.db")).unwrap();
        Store::open(&path, Synchronous::Normal)
            .unwrap()
            .close()
            .unwrap();
        assert_eq!(halves(&store, v1, 0, usize::MAX).unwrap(), single);
    }

    #[test]
    fn halves_stop_where_each_says_and_read_nothing_after() {
        let dir = TempDir::new();
        let mut store = Store::open(&dir.file("run.db"), Synchronous::Normal).unwrap();
        let v1 = store.add_version("fp1", "{}", None).unwrap();
        store.append(&rows_across_the_middle(v1, v1 + 1)).unwrap();
        let all = halves(&store, v1, usize::MAX, usize::MAX).unwrap();
        // Damage near the end, after both stopping points: never met.
        store
            .conn
            .execute_batch(
                "UPDATE items SET output = x'00' WHERE seq = (SELECT max(seq) - 1 FROM items)",
            )
            .unwrap();
        for stop_after in [10, all.len() - 50] {
            let seen = halves(&store, v1, 0, stop_after).unwrap();
            assert_eq!(seen, all[..stop_after], "stopped after {stop_after}");
        }
    }

    #[test]
    fn halves_report_damage_in_either_half_as_one_scan_does() {
        for damage in [
            "UPDATE items SET output = x'00' WHERE seq = (SELECT min(seq) + 3 FROM items)",
            "UPDATE items SET output = x'00' WHERE seq = (SELECT max(seq) - 3 FROM items)",
            "UPDATE items SET key = x'0102' WHERE seq = (SELECT max(seq) - 3 FROM items)",
        ] {
            let dir = TempDir::new();
            let mut store = Store::open(&dir.file("run.db"), Synchronous::Normal).unwrap();
            let v1 = store.add_version("fp1", "{}", None).unwrap();
            store.append(&rows_across_the_middle(v1, v1 + 1)).unwrap();
            store.conn.execute_batch(damage).unwrap();
            let single = halves(&store, v1, usize::MAX, usize::MAX);
            assert!(single.is_err(), "{damage}");
            assert_eq!(
                halves(&store, v1, 0, usize::MAX).err(),
                single.err(),
                "{damage}"
            );
        }
        // A row missing just before the split: the first half ends short of it.
        let dir = TempDir::new();
        let mut store = Store::open(&dir.file("run.db"), Synchronous::Normal).unwrap();
        let v1 = store.add_version("fp1", "{}", None).unwrap();
        store.append(&rows_across_the_middle(v1, v1 + 1)).unwrap();
        let (_, split, _) = store.split_point().unwrap().unwrap();
        store
            .conn
            .execute(&format!("DELETE FROM items WHERE seq = {split}"), [])
            .unwrap();
        assert!(halves(&store, v1, usize::MAX, usize::MAX).is_err());
        assert!(matches!(
            halves(&store, v1, 0, usize::MAX),
            Err(Error::Corrupt { .. })
        ));
    }
}
