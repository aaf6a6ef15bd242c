//! The checksums of the SQLite format 2 (README "Checkpoint files"): of an item row and
//! of a `versions` row. The twin of `python/snapperable/_row_checksum.py`, which
//! documents the encoding; both compute the CRC-32 of zlib (`crc32fast` here).
//!
//! An item row's checksum is two CRC-32s in one 64-bit integer: `body` over the output,
//! input, error texts, attempts and times, and `head` over the key, version, status and
//! `body`. The key scan that plans a run reads key, status and checksum only, and
//! checks `head`; a load and the row reports read the rest too and check both.

use crc32fast::Hasher;
use rusqlite::types::ValueRef;
use rusqlite::Row;

use super::schema::{corrupt_row, sqlite_error, ItemRow};
use crate::contract::KEY_SIZE;
use crate::errors::{Error, Result};
use crate::keys::Key;

/// A nullable blob or text field: the byte 0, or the byte 1, a u32 length and the bytes.
fn field(hasher: &mut Hasher, value: Option<&[u8]>) {
    match value {
        None => hasher.update(&[0]),
        Some(bytes) => {
            // SQLite holds at most 2^31 bytes a value, so the length fits.
            let length = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
            let mut head = [1u8; 5];
            head[1..].copy_from_slice(&length.to_le_bytes());
            hasher.update(&head);
            hasher.update(bytes);
        }
    }
}

/// The fields of an item row that `body` covers, borrowed as read.
#[derive(Debug, Clone, Copy)]
pub(super) struct Body<'a> {
    pub output: Option<&'a [u8]>,
    pub input: Option<&'a [u8]>,
    pub error_type: Option<&'a [u8]>,
    pub error: Option<&'a [u8]>,
    pub traceback: Option<&'a [u8]>,
    pub attempts: i64,
    pub started: f64,
    pub ended: f64,
}

impl Body<'_> {
    pub(super) fn crc(&self) -> u32 {
        let mut hasher = Hasher::new();
        field(&mut hasher, self.output);
        field(&mut hasher, self.input);
        field(&mut hasher, self.error_type);
        field(&mut hasher, self.error);
        field(&mut hasher, self.traceback);
        let mut counts = [0u8; 24];
        counts[..8].copy_from_slice(&self.attempts.to_le_bytes());
        counts[8..16].copy_from_slice(&self.started.to_le_bytes());
        counts[16..].copy_from_slice(&self.ended.to_le_bytes());
        hasher.update(&counts);
        hasher.finalize()
    }
}

/// `head`: the CRC-32 of key, version, status and `body`, hashed as one 40-byte block.
pub(super) fn head_crc(key: &Key, version: i64, status: i64, body: u32) -> u32 {
    let mut block = [0u8; KEY_SIZE + 20];
    block[..KEY_SIZE].copy_from_slice(key);
    block[KEY_SIZE..KEY_SIZE + 8].copy_from_slice(&version.to_le_bytes());
    block[KEY_SIZE + 8..KEY_SIZE + 16].copy_from_slice(&status.to_le_bytes());
    block[KEY_SIZE + 16..].copy_from_slice(&body.to_le_bytes());
    crc32fast::hash(&block)
}

/// The stored value: the bits of `head, body` as a signed 64-bit integer.
fn combine(head: u32, body: u32) -> i64 {
    i64::from_le_bytes(((u64::from(head) << 32) | u64::from(body)).to_le_bytes())
}

fn body_of(checksum: i64) -> u32 {
    // The low 32 bits, by definition of `combine`.
    u32::try_from(u64::from_le_bytes(checksum.to_le_bytes()) & u64::from(u32::MAX)).unwrap_or(0)
}

fn head_of(checksum: i64) -> u32 {
    u32::try_from(u64::from_le_bytes(checksum.to_le_bytes()) >> 32).unwrap_or(0)
}

/// The checksum the writer stores with `row`.
pub(super) fn row_checksum(row: &ItemRow) -> i64 {
    let body = Body {
        output: row.output.as_deref(),
        input: row.input.as_deref(),
        error_type: row.error_type.as_deref().map(str::as_bytes),
        error: row.error.as_deref().map(str::as_bytes),
        traceback: row.traceback.as_deref().map(str::as_bytes),
        attempts: row.attempts,
        started: row.started,
        ended: row.ended,
    }
    .crc();
    combine(head_crc(&row.key, row.version, row.status, body), body)
}

/// Does the stored `checksum` check for these fields? (The key scan's test.)
pub(super) fn head_matches(checksum: i64, key: &Key, version: i64, status: i64) -> bool {
    head_crc(key, version, status, body_of(checksum)) == head_of(checksum)
}

/// Does the stored `checksum` check for every field of the row?
pub(super) fn row_matches(
    checksum: i64,
    key: &Key,
    version: i64,
    status: i64,
    body: &Body<'_>,
) -> bool {
    head_matches(checksum, key, version, status) && body.crc() == body_of(checksum)
}

/// The checksum of a `versions` row: the CRC-32 of `i64 id, i64 uses, f64 created,
/// field(fingerprint), field(parts)`.
pub(super) fn version_checksum(
    id: i64,
    fingerprint: &str,
    parts: &str,
    uses: i64,
    created: f64,
) -> i64 {
    let mut hasher = Hasher::new();
    hasher.update(&id.to_le_bytes());
    hasher.update(&uses.to_le_bytes());
    hasher.update(&created.to_le_bytes());
    field(&mut hasher, Some(fingerprint.as_bytes()));
    field(&mut hasher, Some(parts.as_bytes()));
    i64::from(hasher.finalize())
}

/// The [`Body`] of `row` from column `first` on (input, output, error_type, error,
/// traceback, attempts, started, ended) and the checksum column after them, borrowed
/// from SQLite's row buffer. A value of another type than the schema's is damage.
pub(super) fn read_body<'row>(
    path: &str,
    row: &'row Row<'_>,
    first: usize,
) -> Result<(Body<'row>, i64)> {
    let value = |offset: usize| {
        row.get_ref(first + offset)
            .map_err(|e| sqlite_error(path, e))
    };
    let wrong = || corrupt_row(path, row, "holds a value of another type than its column's");
    let bytes = |offset: usize, text: bool| -> Result<Option<&'row [u8]>> {
        match value(offset)? {
            ValueRef::Null => Ok(None),
            ValueRef::Blob(bytes) if !text => Ok(Some(bytes)),
            ValueRef::Text(bytes) if text => Ok(Some(bytes)),
            _ => Err(wrong()),
        }
    };
    let integer = |offset: usize| match value(offset)? {
        ValueRef::Integer(number) => Ok(number),
        _ => Err(wrong()),
    };
    let real = |offset: usize| match value(offset)? {
        ValueRef::Real(number) => Ok(number),
        _ => Err(wrong()),
    };
    let body = Body {
        input: bytes(0, false)?,
        output: bytes(1, false)?,
        error_type: bytes(2, true)?,
        error: bytes(3, true)?,
        traceback: bytes(4, true)?,
        attempts: integer(5)?,
        started: real(6)?,
        ended: real(7)?,
    };
    Ok((body, integer(8)?))
}

/// The checksum column at `index` of `row`: an integer, or damage.
pub(super) fn checksum_at(path: &str, row: &Row<'_>, index: usize) -> Result<i64> {
    match row.get_ref(index).map_err(|e| sqlite_error(path, e))? {
        ValueRef::Integer(checksum) => Ok(checksum),
        _ => Err(corrupt_row(
            path,
            row,
            "has a checksum that is not an integer",
        )),
    }
}

/// The error of a row whose checksum does not check.
pub(super) fn mismatch(path: &str, row: &Row<'_>) -> Error {
    corrupt_row(path, row, "does not match its checksum")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values `python/snapperable/_row_checksum.py` computes for the same rows (see
    /// tests/test_checksums.py, which checks the same figures from Python).
    #[test]
    fn checksums_match_the_python_definition() {
        let row = ItemRow {
            key: [7; KEY_SIZE],
            version: 3,
            status: 0,
            input: None,
            output: Some(b"\x80\x04K\x02.".to_vec()),
            error_type: None,
            error: None,
            traceback: None,
            attempts: 1,
            started: 1.5,
            ended: 2.25,
        };
        assert_eq!(row_checksum(&row), KNOWN_PLAIN);
        let failed = ItemRow {
            status: 1,
            input: Some(b"in".to_vec()),
            output: None,
            error_type: Some("ValueError".to_owned()),
            error: Some("bad é".to_owned()),
            traceback: Some("Traceback".to_owned()),
            attempts: 3,
            ..row
        };
        assert_eq!(row_checksum(&failed), KNOWN_FAILED);
        assert_eq!(version_checksum(1, "fp", "{}", 1, 0.5), KNOWN_VERSION);
    }

    pub(crate) const KNOWN_PLAIN: i64 = -8_354_648_555_805_593_076;
    pub(crate) const KNOWN_FAILED: i64 = 6_024_402_229_352_911_639;
    pub(crate) const KNOWN_VERSION: i64 = 2_738_404_838;

    #[test]
    fn every_field_counts() {
        let base = ItemRow {
            key: [1; KEY_SIZE],
            version: 1,
            status: 0,
            input: None,
            output: Some(vec![1, 2, 3]),
            error_type: None,
            error: None,
            traceback: None,
            attempts: 1,
            started: 1.0,
            ended: 2.0,
        };
        let sum = row_checksum(&base);
        let variants = [
            ItemRow {
                key: [2; KEY_SIZE],
                ..base.clone()
            },
            ItemRow {
                version: 2,
                ..base.clone()
            },
            ItemRow {
                status: 1,
                ..base.clone()
            },
            ItemRow {
                input: Some(vec![]),
                ..base.clone()
            },
            ItemRow {
                output: Some(vec![1, 2, 4]),
                ..base.clone()
            },
            ItemRow {
                output: None,
                ..base.clone()
            },
            ItemRow {
                error_type: Some(String::new()),
                ..base.clone()
            },
            ItemRow {
                error: Some("x".to_owned()),
                ..base.clone()
            },
            ItemRow {
                traceback: Some("x".to_owned()),
                ..base.clone()
            },
            ItemRow {
                attempts: 2,
                ..base.clone()
            },
            ItemRow {
                started: 1.5,
                ..base.clone()
            },
            ItemRow {
                ended: 2.5,
                ..base.clone()
            },
        ];
        for variant in variants {
            assert_ne!(row_checksum(&variant), sum, "{variant:?}");
        }
        assert!(head_matches(sum, &base.key, 1, 0));
        assert!(!head_matches(sum, &base.key, 1, 1));
    }
}
