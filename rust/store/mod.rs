//! The SQLite checkpoint format (docs/architecture.md 6.1): opening (and creating) a
//! file, appending rows, and the scans that plan and load a run. Pure Rust: values cross
//! into Python only in the binding layer (`python/store.rs`).
//!
//! The opening procedure is the same step for step as the pure-Python backend's, so that
//! both accept, create and reject exactly the same files.
//!
//! One file per concern: `schema` (the format's constants and row types, and how a
//! stored row is read), `checks` (what is checked of a file before anything is written
//! to it), `row_checksum` (the format-2 checksums), `open` (opening a file, appending,
//! small reads), `scan` (the
//! full scans' rows, read through SQLite's C API), `key_scan` (the key sets that plan a
//! run, scanned on two threads when large), `folding` (the latest output of each key,
//! for a load that must look keys up) and `streaming` (a load that streams outputs in
//! the order asked, as long as the rows come in that order or nearly).

mod checks;
mod folding;
mod key_scan;
mod open;
mod row_checksum;
mod scan;
mod schema;
mod streaming;

pub use folding::LatestOutputs;
pub use open::Store;
pub use schema::{
    sqlite_error, unix_now, ItemRow, RowInfo, Synchronous, VersionRow, APPLICATION_ID,
    FORMAT_VERSION, UNCHECKED_FORMAT,
};
pub use streaming::{InOrder, OutputChunk, Streamed};

#[cfg(test)]
pub(crate) mod tests;
