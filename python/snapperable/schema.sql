-- The SQLite checkpoint format, version 2 (docs/architecture.md 6.1). Both backends run this file
-- as it is (the Rust core embeds it with include_str!), so there is one schema; both
-- also check an existing file against it (format 1: the same without `checksum`).
-- application_id 0x536e6150 ("SnaP") marks the file as a snapperable checkpoint;
-- user_version is the format version.
PRAGMA application_id = 1399742800;
PRAGMA user_version = 2;
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
-- The log of function versions, one row each time a run starts with a version other
-- than the last row's (so the last row is the version used last; a fingerprint may
-- come back). `uses` is the id whose results the version reads and writes: its own
-- id, or an older one (a change accepted with policy "keep", or a return to a version).
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    parts TEXT NOT NULL,
    uses INTEGER NOT NULL,
    created REAL NOT NULL,
    checksum INTEGER NOT NULL         -- of the other columns (README, format 2)
);
-- Append-only: one row per finished item (all its attempts); a later row for the same
-- (key, version) supersedes earlier ones. Reads scan in `seq` order, so no index is
-- kept: appends stay sequential writes.
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY,
    key BLOB NOT NULL,
    version INTEGER NOT NULL,
    status INTEGER NOT NULL,          -- 0 ok, 1 failed
    -- Format 2: CRC-32s of the other columns but seq (README); right after the columns
    -- a key scan reads, so that it reads no further into the record.
    checksum BLOB NOT NULL,
    input BLOB,                       -- pickle of the input; kept for failed items
    output BLOB,                      -- pickle of the output (protocol 4); NULL if failed
    error_type TEXT,
    error TEXT,
    traceback TEXT,
    attempts INTEGER NOT NULL,
    started REAL NOT NULL,            -- Unix time
    ended REAL NOT NULL
);
