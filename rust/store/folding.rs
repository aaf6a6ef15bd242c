//! The latest output of each key of one version, folded from one scan: what a load
//! needs when it must look keys up (a run with failures, repeated inputs, or another
//! order than the one saved).

use super::open::Store;
use super::scan::ScanRow;
use super::schema::corrupt_row;
use crate::errors::{Error, Result};
use crate::keys::{order_for_table, Key, KeyMap};

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

impl Store {
    /// The latest row of each key of `version`.
    pub fn latest_outputs(&self, version: i64) -> Result<LatestOutputs> {
        let too_many =
            |row: &ScanRow<'_>| corrupt_row(&self.path, row, "is past the most rows one read can hold");
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
}
