//! The checksums of the SQLite format 2 (README "Checkpoint files"): of an item row and
//! of a `versions` row. The twin of `python/snapperable/_row_checksum.py`, which
//! documents the encoding; both compute the CRC-32 of zlib (`crc32fast` here).
//!
//! An item row's checksum is a 12-byte blob of three CRC-32s: `head` over the key,
//! version, status and the two others, `out` over the output, `rest` over the input,
//! error texts, attempts and times. Each read checks what it uses, on values borrowed
//! from SQLite's row buffer: the key scan that plans a run `head`, a load `head` and
//! `out`, the row reports `head` and `rest`.

use crc32fast::Hasher;
use rusqlite::types::ValueRef;

use super::scan::ScanRow;
use super::schema::{corrupt_row, wrong_type, ItemRow};
use crate::errors::{Error, Result};
use crate::keys::Key;

/// Bytes of an item row's checksum: `head`, `out`, `rest`, each a little-endian u32.
pub(super) const CHECKSUM_SIZE: usize = 12;
pub(super) type Checksum = [u8; CHECKSUM_SIZE];

/// The CRC-32 tables of slicing-by-8: `TABLES[k][b]` is the CRC of byte `b` followed by
/// `k` zero bytes. The rows' CRCs cover a few dozen bytes each, where a table walk over
/// whole words (inlined, on values already in registers) is several times faster than
/// a call into `crc32fast`, which wins only on long inputs (its SIMD folding).
static TABLES: [[u32; 256]; 8] = crc_tables();

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut tables = [[0u32; 256]; 8];
    let mut byte = 0;
    while byte < 256 {
        let mut crc = byte as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { 0xEDB8_8320 ^ (crc >> 1) } else { crc >> 1 };
            bit += 1;
        }
        tables[0][byte] = crc;
        byte += 1;
    }
    let mut byte = 0;
    while byte < 256 {
        let mut k = 1;
        while k < 8 {
            let previous = tables[k - 1][byte];
            tables[k][byte] = (previous >> 8) ^ tables[0][(previous & 0xff) as usize];
            k += 1;
        }
        byte += 1;
    }
    tables
}

/// Inputs at least this long go to `crc32fast` (whose SIMD folding then wins).
const LONG_INPUT: usize = 128;

/// A running CRC-32 (zlib's), in its inverted working form.
#[derive(Clone, Copy)]
struct Crc(u32);

impl Crc {
    fn new() -> Self {
        Crc(!0)
    }

    /// Eight bytes, little-endian: one step of the tables.
    #[inline]
    fn word(&mut self, word: u64) {
        let t = &TABLES;
        let low = (word as u32) ^ self.0;
        let high = (word >> 32) as u32;
        let at = |value: u32, shift: u32| ((value >> shift) & 0xff) as usize;
        self.0 = t[7][at(low, 0)]
            ^ t[6][at(low, 8)]
            ^ t[5][at(low, 16)]
            ^ t[4][at(low, 24)]
            ^ t[3][at(high, 0)]
            ^ t[2][at(high, 8)]
            ^ t[1][at(high, 16)]
            ^ t[0][at(high, 24)];
    }

    #[inline]
    fn bytes(&mut self, bytes: &[u8]) {
        if bytes.len() >= LONG_INPUT {
            let mut hasher = Hasher::new_with_initial(!self.0);
            hasher.update(bytes);
            self.0 = !hasher.finalize();
            return;
        }
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut eight = [0u8; 8];
            eight.copy_from_slice(word);
            self.word(u64::from_le_bytes(eight));
        }
        for &byte in words.remainder() {
            self.0 = TABLES[0][((self.0 ^ u32::from(byte)) & 0xff) as usize] ^ (self.0 >> 8);
        }
    }

    fn finish(self) -> u32 {
        !self.0
    }
}

/// A nullable blob or text field: the byte 0, or the byte 1, a u32 length and the bytes.
#[inline]
fn field(crc: &mut Crc, value: Option<&[u8]>) {
    /// Values up to this long are joined to their head in one run of bytes (a small
    /// output: a word step and a few bytes, not two runs of single bytes).
    const SHORT: usize = 59;
    match value {
        None => crc.bytes(&[0]),
        Some(bytes) => {
            // SQLite holds at most 2^31 bytes a value, so the length fits.
            let length = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
            let mut head = [1u8; 5];
            head[1..].copy_from_slice(&length.to_le_bytes());
            if bytes.len() <= SHORT {
                let mut joined = [0u8; SHORT + 5];
                joined[..5].copy_from_slice(&head);
                joined[5..5 + bytes.len()].copy_from_slice(bytes);
                crc.bytes(&joined[..5 + bytes.len()]);
            } else {
                crc.bytes(&head);
                crc.bytes(bytes);
            }
        }
    }
}

/// `out`: the CRC-32 of the output field.
#[inline]
pub(super) fn out_crc(output: Option<&[u8]>) -> u32 {
    let mut crc = Crc::new();
    field(&mut crc, output);
    crc.finish()
}

/// The fields of an item row that `rest` covers, borrowed as read.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rest<'a> {
    pub input: Option<&'a [u8]>,
    pub error_type: Option<&'a [u8]>,
    pub error: Option<&'a [u8]>,
    pub traceback: Option<&'a [u8]>,
    pub attempts: i64,
    pub started: f64,
    pub ended: f64,
}

impl Rest<'_> {
    pub(super) fn crc(&self) -> u32 {
        let mut crc = Crc::new();
        field(&mut crc, self.input);
        field(&mut crc, self.error_type);
        field(&mut crc, self.error);
        field(&mut crc, self.traceback);
        crc.word(self.attempts as u64);
        crc.word(self.started.to_bits());
        crc.word(self.ended.to_bits());
        crc.finish()
    }
}

/// `head`: the CRC-32 of key, version, status, `out` and `rest`, as one 40-byte block,
/// fed as the five little-endian words it is made of (no buffer).
#[inline]
fn head_crc(key: &Key, version: i64, status: i64, out: u32, rest: u32) -> u32 {
    let (mut first, mut second) = ([0u8; 8], [0u8; 8]);
    first.copy_from_slice(&key[..8]);
    second.copy_from_slice(&key[8..]);
    let mut crc = Crc::new();
    crc.word(u64::from_le_bytes(first));
    crc.word(u64::from_le_bytes(second));
    crc.word(version as u64);
    crc.word(status as u64);
    crc.word(u64::from(out) | (u64::from(rest) << 32));
    crc.finish()
}

/// The `index`th u32 of a checksum (0 `head`, 1 `out`, 2 `rest`).
fn part(checksum: &Checksum, index: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&checksum[index * 4..index * 4 + 4]);
    u32::from_le_bytes(bytes)
}

/// The checksum the writer stores with `row`.
pub(super) fn row_checksum(row: &ItemRow) -> Checksum {
    let out = out_crc(row.output.as_deref());
    let rest = Rest {
        input: row.input.as_deref(),
        error_type: row.error_type.as_deref().map(str::as_bytes),
        error: row.error.as_deref().map(str::as_bytes),
        traceback: row.traceback.as_deref().map(str::as_bytes),
        attempts: row.attempts,
        started: row.started,
        ended: row.ended,
    }
    .crc();
    let head = head_crc(&row.key, row.version, row.status, out, rest);
    let mut checksum = [0u8; CHECKSUM_SIZE];
    checksum[..4].copy_from_slice(&head.to_le_bytes());
    checksum[4..8].copy_from_slice(&out.to_le_bytes());
    checksum[8..].copy_from_slice(&rest.to_le_bytes());
    checksum
}

/// Does the stored `checksum` check for these fields? (The key scan's test.)
pub(super) fn head_matches(checksum: &Checksum, key: &Key, version: i64, status: i64) -> bool {
    head_crc(key, version, status, part(checksum, 1), part(checksum, 2)) == part(checksum, 0)
}

/// Does the output check (after [`head_matches`])?
pub(super) fn output_matches(checksum: &Checksum, output: Option<&[u8]>) -> bool {
    out_crc(output) == part(checksum, 1)
}

/// Do the fields of `rest` check (after [`head_matches`])?
pub(super) fn rest_matches(checksum: &Checksum, rest: &Rest<'_>) -> bool {
    rest.crc() == part(checksum, 2)
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
    let mut crc = Crc::new();
    crc.word(id as u64);
    crc.word(uses as u64);
    crc.word(created.to_bits());
    field(&mut crc, Some(fingerprint.as_bytes()));
    field(&mut crc, Some(parts.as_bytes()));
    i64::from(crc.finish())
}

/// The [`Rest`] of `row` from column `first` on (input, error_type, error, traceback,
/// attempts, started, ended), borrowed from SQLite's row buffer. A value of another
/// type than the schema's is damage.
pub(super) fn read_rest<'row>(
    path: &str,
    row: &'row ScanRow<'_>,
    first: usize,
) -> Result<Rest<'row>> {
    let value = |offset: usize| Ok(row.value(first + offset));
    let wrong = || wrong_type(path, row);
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
    Ok(Rest {
        input: bytes(0, false)?,
        error_type: bytes(1, true)?,
        error: bytes(2, true)?,
        traceback: bytes(3, true)?,
        attempts: integer(4)?,
        started: real(5)?,
        ended: real(6)?,
    })
}

/// The checksum column at `index` of `row`: 12 bytes of blob, or damage.
#[inline]
pub(super) fn checksum_at(path: &str, row: &ScanRow<'_>, index: usize) -> Result<Checksum> {
    match row.value(index) {
        ValueRef::Blob(bytes) => Checksum::try_from(bytes).map_err(|_| malformed(path, row)),
        _ => Err(malformed(path, row)),
    }
}

#[cold]
fn malformed(path: &str, row: &ScanRow<'_>) -> Error {
    corrupt_row(
        path,
        row,
        &format!("has a checksum that is not {CHECKSUM_SIZE} bytes"),
    )
}

/// The rows of a format-2 table are numbered 1, 2, 3, ... with no gap: the log is only
/// ever appended to, and SQLite gives each new row the number after the largest. A
/// scan that meets another number has met damage that no row's checksum covers (a
/// flipped row number, a page of rows skipped or repeated).
pub(super) struct Sequence {
    next: i64,
}

impl Sequence {
    /// A scan whose first row is `first`.
    pub(super) fn from(first: i64) -> Self {
        Sequence { next: first }
    }

    /// Checks the `seq` (column 0) of the next row the scan met.
    #[inline]
    pub(super) fn check(&mut self, path: &str, row: &ScanRow<'_>) -> Result<()> {
        let seq = row.integer(0);
        if seq != Some(self.next) {
            let seq = seq.unwrap_or(i64::MIN);
            return Err(corrupt_row(
                path,
                row,
                &format!(
                    "is out of sequence (the row before it is not {})",
                    seq.wrapping_sub(1)
                ),
            ));
        }
        self.next = self.next.saturating_add(1);
        Ok(())
    }

    /// Checks that a scan of rows up to `last` met all of them.
    pub(super) fn finish(&self, path: &str, last: i64) -> Result<()> {
        if self.next <= last {
            return Err(Error::Corrupt {
                path: path.to_owned(),
                problem: format!("item rows {} to {last} are missing", self.next),
            });
        }
        Ok(())
    }
}

/// The error of a row whose checksum does not check.
#[cold]
pub(super) fn mismatch(path: &str, row: &ScanRow<'_>) -> Error {
    corrupt_row(path, row, "does not match its checksum")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::KEY_SIZE;

    /// Values `python/snapperable/_row_checksum.py` computes for the same rows
    /// (`tests/test_checksums.py` checks the same figures from Python).
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
        assert_eq!(hex(&row_checksum(&row)), "3561633bae6c74eab2f2acb7");
        let failed = ItemRow {
            status: 1,
            input: Some(b"in".to_vec()),
            output: None,
            error_type: Some("ValueError".to_owned()),
            error: Some("bad \u{e9}".to_owned()),
            traceback: Some("Traceback".to_owned()),
            attempts: 3,
            ..row
        };
        assert_eq!(hex(&row_checksum(&failed)), "99968d328def02d22a7e4c72");
        assert_eq!(version_checksum(1, "fp", "{}", 1, 0.5), 2_738_404_838);
    }

    #[test]
    fn the_tables_compute_zlibs_crc_at_every_length_and_split() {
        let data: Vec<u8> = (0..400u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for length in 0..data.len() {
            let input = &data[..length];
            let mut crc = Crc::new();
            crc.bytes(input);
            assert_eq!(crc.finish(), crc32fast::hash(input), "length {length}");
            let (front, back) = input.split_at(length / 3);
            let mut split = Crc::new();
            split.bytes(front);
            split.bytes(back);
            assert_eq!(split.finish(), crc32fast::hash(input), "length {length}, split");
            let mut as_field = Crc::new();
            field(&mut as_field, Some(input));
            let mut expected = vec![1u8];
            expected.extend_from_slice(&(length as u32).to_le_bytes());
            expected.extend_from_slice(input);
            assert_eq!(as_field.finish(), crc32fast::hash(&expected), "field {length}");
        }
        let mut words = Crc::new();
        words.word(u64::from_le_bytes([1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(words.finish(), crc32fast::hash(&[1, 2, 3, 4, 5, 6, 7, 8]));
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    #[test]
    fn every_field_counts_and_each_part_checks_its_own() {
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
        assert!(head_matches(&sum, &base.key, 1, 0));
        assert!(!head_matches(&sum, &base.key, 1, 1));
        assert!(output_matches(&sum, Some(&[1, 2, 3])));
        assert!(!output_matches(&sum, Some(&[1, 2, 3, 4])));
        let mut flipped = sum;
        flipped[5] ^= 1; // a stored `out` that no longer matches: the head says so
        assert!(!head_matches(&flipped, &base.key, 1, 0));
    }
}
