"""The pure-Python backend: the standard library only (docs/architecture.md 3).

Implements the ``Backend`` contract of ``_contract.py`` with ``hashlib`` keys, a ``set``
of keys, the group-commit writer of ``_writer.py`` and ``sqlite3``, whose commits move
to a writer process (``_sqlite_writer.py``) once a run outpaces them. It reads and
writes the same files as the Rust core, so either resumes the other's checkpoint.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import sqlite3
import struct
import sys
import threading
import time
from typing import Any, Iterable, Iterator, Optional

from snapperable import _folding, _row_checksum, _sqlite_file, _sqlite_writer, keys
from snapperable._contract import (
    KEY_SIZE,
    STATUS_OK,
    KeySet,
    RowInfo,
    Synchronous,
    VersionRow,
)
from snapperable._sqlite_writer import (
    UnmarshallableRows,
    WriterProcess,
    WriterProcessError,
    commit_rows,
    configure,
    file_uri,
)
from snapperable._writer import PendingRow, WriterBackedStore
from snapperable.errors import (
    CheckpointCorruptError,
    CheckpointError,
)
from snapperable.storage.base import create_private

BACKEND_NAME = "python"

# Rows fetched per query by `rows()`, as in the Rust core (`rust/python/store.rs`).
ROWS_PAGE = 1024
ROWS_WITH_OUTPUT_PAGE = 128

log = logging.getLogger("snapperable")

input_key = keys.input_key
input_keys = keys.input_keys


class PyKeySet(set[bytes]):
    """A set of 16-byte keys. A ``set`` subclass so that ``in`` and ``add``, called once
    per item, run at C speed; the Rust core's set is compact instead."""

    __slots__ = ()

    def claim(self, keys_blob: bytes) -> list[int]:
        size = KEY_SIZE
        count, rest = divmod(len(keys_blob), size)
        if rest:
            raise ValueError(f"keys must be a multiple of {size} bytes long")
        # Split in C, then settle the usual chunks (all new, or all done) with set
        # operations: half the cost of a loop over slices (benches/README.md).
        chunk_keys = _key_splitter(count).unpack(keys_blob)
        if self.isdisjoint(chunk_keys):
            before = len(self)
            self.update(chunk_keys)
            if len(self) == before + count:
                return list(range(count))
            return _first_of_each(chunk_keys, set())  # repeats within the chunk
        if self.issuperset(chunk_keys):
            return []
        return _first_of_each(chunk_keys, self)


def _first_of_each(chunk_keys: tuple[bytes, ...], seen: set[bytes]) -> list[int]:
    """Positions of the keys not in ``seen``, each key's first; adds them to ``seen``."""
    claimed = []
    add = seen.add
    for i, key in enumerate(chunk_keys):
        if key not in seen:
            add(key)
            claimed.append(i)
    return claimed


@functools.lru_cache(maxsize=16)  # chunks are CHUNK keys long, but for the last
def _key_splitter(count: int) -> struct.Struct:
    return struct.Struct(f"{KEY_SIZE}s" * count)


def new_key_set() -> PyKeySet:
    return PyKeySet()


class _NeverInitialized(Exception):
    """The database was made but never initialized (what a creation cut short leaves):
    ``open_sqlite_reader`` reads it as empty, and ``open_sqlite`` initializes it."""


class PySQLiteReader:
    """A SQLite checkpoint through ``sqlite3``, opened for reading: nothing is created
    and no row written, so it reads beside a running writer (a WAL reader) and on a
    read-only file or directory. ``PySQLiteStore`` adds the writes."""

    path: str
    _lock: threading.Lock
    _conn: sqlite3.Connection
    _released: bool
    # Format 2 rows carry checksums (``_row_checksum``); a format-1 file is read and
    # written as format 1 (README "Checkpoint files").
    _checksummed: bool

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._released = False  # the connection is closed; set before `_mapped` reads it
        self._checksummed = True  # set by the checks of the file (``_check_existing``)
        self._conn = self._connect_read_only()

    def _connect_read_only(self) -> sqlite3.Connection:
        """Opened read-write where the file allows it (SQLite falls back to read-only
        where not), so that, closing as the last connection, it removes the ``-wal`` and
        ``-shm`` it made rather than leave them behind; no row is written. Where SQLite
        cannot set up its shared memory (a read-only directory without the ``-shm`` a
        writer leaves), the file is opened as immutable: no writer can be changing it
        then."""
        failure: Optional[Exception] = None
        header = _sqlite_file.read_header(self.path) if os.path.isfile(self.path) else None
        for query in ("mode=rw", "mode=ro&immutable=1"):
            try:
                conn = sqlite3.connect(
                    f"{file_uri(self.path)}?{query}", uri=True, isolation_level=None, check_same_thread=False
                )
            except sqlite3.Error as exc:
                failure = exc
                continue
            try:
                conn.execute(f"PRAGMA busy_timeout={_sqlite_writer.BUSY_TIMEOUT_MS}")
                app_id = conn.execute("PRAGMA application_id").fetchone()[0]
                user_version = conn.execute("PRAGMA user_version").fetchone()[0]
            except (sqlite3.Error, UnicodeDecodeError) as exc:
                conn.close()
                failure = exc
                continue
            try:
                if _sqlite_file.never_initialized(conn):
                    raise _NeverInitialized
                self._check_existing(conn, header or _sqlite_file.SQLiteHeader(app_id, user_version))
            except BaseException:
                conn.close()
                raise
            return conn
        assert failure is not None
        raise self._mapped(failure) from failure

    def _check_existing(self, conn: sqlite3.Connection, header: _sqlite_file.SQLiteHeader) -> None:
        """Raise if the (non-empty) file is not a checkpoint this code reads, or its
        schema is damaged; else note whether its rows carry checksums."""
        try:
            found = _sqlite_file.check_existing(conn, header, self.path)
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            raise self._mapped(exc) from exc
        self._checksummed = found not in _sqlite_file.UNCHECKED_FORMATS

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            self._released = True

    def _mapped(self, exc: Exception) -> CheckpointError:
        """The one mapping of sqlite3 errors to snapperable's (``_sqlite_file.mapped_error``;
        the Rust core's is ``sqlite_error`` in rust/store/schema.rs). Once the connection
        is closed, any failure is that."""
        if self._released:
            return CheckpointError.closed(self.path)
        return _sqlite_file.mapped_error(exc, self.path)

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._conn.execute(sql, args).fetchall()
            except (sqlite3.Error, UnicodeDecodeError) as exc:
                raise self._mapped(exc) from exc

    def _bad_key(self, version: Optional[int]) -> CheckpointCorruptError:
        """The error for the first item row (of ``version``, if given) whose key is not
        16 bytes of blob: looked up only once one was found."""
        ((seq,),) = self._query(
            "SELECT min(seq) FROM items"
            " WHERE NOT (typeof(key) = 'blob' AND length(key) = 16) AND (? IS NULL OR version = ?)",
            (version, version),
        )
        return CheckpointCorruptError.bad_key(self.path, seq)

    def _key(self, raw: object, version: Optional[int]) -> bytes:
        if not isinstance(raw, bytes) or len(raw) != KEY_SIZE:
            raise self._bad_key(version)
        return raw

    def _damaged_row(self, seq: Optional[int], key: object) -> CheckpointCorruptError:
        """Row ``seq``'s checksum does not check: said so, or that its key is not a key
        at all (as the Rust core reads a key before its checksum)."""
        if type(key) is not bytes or len(key) != KEY_SIZE:
            return CheckpointCorruptError.bad_key(self.path, seq)
        return CheckpointCorruptError.bad_row(self.path, seq, "does not match its checksum")

    def versions(self) -> list[VersionRow]:
        if not self._checksummed:
            found = self._query("SELECT id, fingerprint, parts, uses, created FROM versions ORDER BY id")
        else:
            found = self._query(
                "SELECT id, fingerprint, parts, uses, created, checksum FROM versions ORDER BY id"
            )
            for row in found:
                try:
                    matches = _row_checksum.version_checksum(*row[:5]) == row[5]
                except _row_checksum.WrongType:
                    matches = False
                if not matches:
                    raise CheckpointCorruptError.damaged(
                        self.path, f"function version {row[0]!r} does not match its checksum"
                    )
            found = [row[:5] for row in found]
        return [_folding.version_row(row, self.path) for row in found]

    def _checked_heads(self, rows: Iterable[Any], version: Optional[int]) -> Iterator[tuple[bytes, int, int]]:
        """``(key, version, status)`` of rows ``(seq, key, version, status, checksum)``
        (every row of the table, in order), their numbers and checksums' heads checked;
        of ``version``'s rows only, unless it is None.

        Every row, not only ``version``'s: one whose version number is damaged must be
        met (and fail its checksum), not filtered out unseen by SQL."""
        head_matches = _row_checksum.head_matches
        expected = 1
        for seq, key, row_version, status, checksum in rows:
            if seq != expected:
                raise self._out_of_sequence(seq)
            expected += 1
            if not head_matches(checksum, key, row_version, status):
                raise self._damaged_row(seq, key)
            if version is None or row_version == version:
                yield key, row_version, status

    def _out_of_sequence(self, seq: int) -> CheckpointCorruptError:
        """The rows of a format-2 table are numbered 1, 2, 3, ... with no gap (the log is
        only appended to, each new row numbered after the largest): another number is
        damage that no checksum covers (a flipped row number, rows skipped)."""
        return CheckpointCorruptError.bad_row(
            self.path, seq, f"is out of sequence (the row before it is not {seq - 1})"
        )

    def key_set(self, version: Optional[int], status: int) -> KeySet:
        checked: Iterable[tuple[Any, ...]]
        if self._checksummed:
            found = self._query("SELECT seq, key, version, status, checksum FROM items ORDER BY seq")
            checked = self._checked_heads(found, version)
        elif version is None:
            checked = self._query("SELECT key, version, status FROM items ORDER BY seq")
        else:
            checked = self._query(
                "SELECT key, version, status FROM items WHERE version = ? ORDER BY seq", (version,)
            )
        rows = ((self._key(key, version), row_version, row_status) for key, row_version, row_status in checked)
        return _folding.keys_with_status(rows, status, new_key_set)

    def _latest(self, sql: str, version: Optional[int], fold: Any) -> dict[bytes, Any]:
        """Each key of ``version``, in the order first saved -> the value ``fold`` makes
        of its latest row, from the rows of ``sql`` (with ``version`` as its parameter,
        if not None). ``dict`` folds them (in C straight from the cursor for a format-1
        file): no list of all the rows."""
        with self._lock:
            try:
                cursor = self._conn.execute(sql, () if version is None else (version,))
                latest: dict[Optional[bytes], Any] = dict(fold(cursor))
            except (sqlite3.Error, UnicodeDecodeError) as exc:
                raise self._mapped(exc) from exc
        if None in latest:
            raise self._bad_key(version)
        return latest  # type: ignore[return-value]  # None was just ruled out

    def key_sets(self, version: int) -> tuple[KeySet, KeySet]:
        if not self._checksummed:
            latest = self._latest(f"SELECT {_CHECKED_KEY}, status FROM items WHERE version = ? ORDER BY seq", version, iter)
        else:
            latest = self._latest(
                "SELECT seq, key, version, status, checksum FROM items ORDER BY seq",
                None,
                lambda rows: ((key, status) for key, _, status in self._checked_heads(rows, version)),
            )
        return _folding.ok_and_failed(latest, new_key_set)

    def _checked_outputs(self, rows: Iterable[Any], version: int) -> Iterator[tuple[bytes, Optional[bytes]]]:
        """``(key, output if ok else None)`` of ``version``'s rows among rows ``(seq, key,
        version, status, output, checksum)`` (every row, as ``_checked_heads`` reads
        them): numbers, heads, and the outputs used checked."""
        head_matches = _row_checksum.head_matches
        output_matches = _row_checksum.output_matches
        expected = 1
        for seq, key, row_version, status, output, checksum in rows:
            if seq != expected:
                raise self._out_of_sequence(seq)
            expected += 1
            if not head_matches(checksum, key, row_version, status):
                raise self._damaged_row(seq, key)
            if row_version != version:
                continue
            if not output_matches(checksum, output):
                raise self._damaged_row(seq, key)
            yield key, output if status == STATUS_OK else None

    def _latest_outputs(self, version: int) -> dict[bytes, Optional[bytes]]:
        if not self._checksummed:
            return self._latest(
                f"SELECT {_CHECKED_KEY}, CASE WHEN status = {STATUS_OK} THEN output END"
                " FROM items WHERE version = ? ORDER BY seq",
                version,
                iter,
            )
        return self._latest(
            "SELECT seq, key, version, status, output, checksum FROM items ORDER BY seq",
            None,
            lambda rows: self._checked_outputs(rows, version),
        )

    def outputs_for(self, version: int, keys_blob: bytes) -> list[Any]:
        return _folding.outputs_in_key_order(self._latest_outputs(version), keys_blob, self.path)

    def all_outputs(self, version: int) -> list[Any]:
        return _folding.outputs_in_save_order(self._latest_outputs(version), self.path)

    def rows(self, version: Optional[int], with_output: bool = False) -> Iterator[RowInfo]:
        # Page by page, as the Rust core does: a checkpoint of millions of rows (and
        # their outputs) is never held at once. Rows are append-only, so paging by
        # `seq` is consistent. With checksums every row is read and checked, not only
        # `version`'s: one whose version number is damaged must be met, not filtered out.
        page = ROWS_WITH_OUTPUT_PAGE if with_output else ROWS_PAGE
        checked = self._checksummed
        columns = f"seq, {_INFO_COLUMNS}, {'checksum' if checked else 'NULL'}, CASE WHEN ? THEN output END"
        where = "seq > ?" if checked else "seq > ? AND (? IS NULL OR version = ?)"
        sql = f"SELECT {columns} FROM items WHERE {where} ORDER BY seq LIMIT ?"
        head_matches = _row_checksum.head_matches
        rest_matches = _row_checksum.rest_matches
        output_matches = _row_checksum.output_matches
        expected = 1
        after = 0
        while True:
            args = (with_output, after, page) if checked else (with_output, after, version, version, page)
            found = self._query(sql, args)
            for *fields, checksum, output in found:
                info = RowInfo._make((*fields, output))
                if checked:
                    if info.seq != expected:
                        raise self._out_of_sequence(info.seq)
                    expected += 1
                    if not (
                        head_matches(checksum, info.key, info.version, info.status)
                        and rest_matches(checksum, *fields[4:])
                        and (not with_output or output_matches(checksum, output))
                    ):
                        raise self._damaged_row(info.seq, info.key)
                    if version is not None and info.version != version:
                        continue
                yield info
            if len(found) < page:
                return
            after = found[-1][0]

    def meta(self) -> dict[str, str]:
        return {str(name): str(value) for name, value in self._query("SELECT name, value FROM meta")}

    def integrity_check(self) -> Optional[str]:
        (first,) = self._query("PRAGMA integrity_check(1)")[0]
        return None if first == "ok" else str(first)


class PySQLiteStore(WriterBackedStore, PySQLiteReader):
    """A SQLite checkpoint through ``sqlite3``: one connection shared, under a lock, by
    the caller's reads and the writer thread's commits."""

    def __init__(
        self,
        path: str,
        synchronous: Synchronous,
        batch_size: int,
        max_wait_time: Optional[float],
    ) -> None:
        self.path = path
        self._synchronous = synchronous
        self._lock = threading.Lock()
        self._released = False  # the connection is closed; set before `_mapped` reads it
        self._checksummed = True  # set by ``_connect``: False for a format-1 file
        self._conn = self._connect(synchronous)
        info = os.stat(path)
        self._identity = (info.st_dev, info.st_ino)  # of the file just opened
        # The writer process (``_sqlite_writer``), started by the writer thread once a
        # commit is large; None before that, or for good once it could not be started.
        self._process: Optional[WriterProcess] = None
        self._process_failed = False
        self._start_writer(path, batch_size, max_wait_time)

    # -- opening ------------------------------------------------------------------------
    def _connect(self, synchronous: Synchronous) -> sqlite3.Connection:
        """The connection to the checkpoint, once what can be checked cheaply has been:
        nothing is written to a file found damaged (see ``_sqlite_file``)."""
        create_private(self.path)
        header = _sqlite_file.read_header(self.path)
        checked = False
        if header is not None and _sqlite_file.has_write_ahead_log(self.path):
            reader = self._open_connection(read_only=True)
            try:
                self._check_existing(reader, header)
            finally:
                reader.close()
            checked = True
        conn = self._open_connection(read_only=False)
        try:
            configure(conn, synchronous)
            if header is None or _sqlite_file.never_initialized(conn):
                # One transaction: a crash leaves either no schema or all of it.
                conn.executescript(f"BEGIN IMMEDIATE; {_sqlite_file.schema_sql()};")
                conn.executemany(
                    "INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)",
                    [("format_version", str(_sqlite_file.FORMAT_VERSION)), ("created_by", _created_by())],
                )
                conn.execute("COMMIT")
            elif not checked:
                self._check_existing(conn, header)
            conn.execute("PRAGMA journal_mode=WAL")
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            conn.close()
            raise self._mapped(exc) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_connection(self, *, read_only: bool) -> sqlite3.Connection:
        try:
            if read_only:
                return sqlite3.connect(
                    f"{file_uri(self.path)}?mode=ro", uri=True, isolation_level=None,
                    check_same_thread=False,
                )
            return sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._mapped(exc) from exc

    # -- writes -------------------------------------------------------------------------
    def _commit(self, rows: list[PendingRow]) -> Optional[int]:
        process = self._connected_process(len(rows))
        if process is not None:
            try:
                try:
                    return process.send(rows)  # pipelined: see GroupCommitWriter
                except UnmarshallableRows:
                    # Rare (a failure message of a str subclass): after what is in
                    # flight, this batch is committed here, in order.
                    durable = process.settle()
                    self._commit_here(rows)
                    return durable + len(rows)
            except WriterProcessError as exc:
                raise self._writer_process_error(exc) from exc
        self._commit_here(rows)
        return None

    def _writer_process_error(self, exc: WriterProcessError) -> CheckpointError:
        """A failure of the writer process, as a commit in the thread reports it (its
        text is SQLite's message, see ``_sqlite_writer._send_error``)."""
        return CheckpointError.failed(self.path, str(exc))

    def _commit_here(self, rows: list[PendingRow]) -> None:
        """Commit ``rows`` in this (the writer) thread, on the shared connection."""
        with self._lock:
            try:
                commit_rows(self._conn, rows, self._checksummed)
            except (sqlite3.Error, UnicodeDecodeError) as exc:
                raise self._mapped(exc) from exc

    def _settle(self) -> int:
        if self._process is None:
            return 0
        try:
            return self._process.settle()
        except WriterProcessError as exc:
            raise self._writer_process_error(exc) from exc

    def _connected_process(self, batch_rows: int) -> Optional[WriterProcess]:
        """The writer process if it is connected; starts it for a large batch. Until it
        has connected, commits go on in the thread, so its start costs the loop nothing."""
        if self._process is None:
            if self._process_failed or batch_rows < _sqlite_writer.PROCESS_MIN_ROWS or not _can_start_process():
                return None
            try:
                self._process = WriterProcess(self.path, self._synchronous, self._identity, self._checksummed)
            except OSError as exc:
                self._no_process(exc)
                return None
        try:
            return self._process if self._process.ready(_sqlite_writer.PROCESS_CONNECT_WAIT) else None
        except Exception as exc:  # not connected, nothing sent: the thread commits
            self._no_process(exc)
            return None

    def _no_process(self, why: Exception) -> None:
        log.debug("%s: no writer process, committing in a thread: %s", self.path, why)
        if self._process is not None:
            self._process.close()
        self._process = None
        self._process_failed = True

    def add_version(self, fingerprint: str, parts: str, uses: Optional[int]) -> int:
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                vid = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM versions").fetchone()[0]
                row = (vid, fingerprint, parts, vid if uses is None else uses, time.time())
                if self._checksummed:
                    conn.execute(
                        "INSERT INTO versions (id, fingerprint, parts, uses, created, checksum)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (*row, _row_checksum.version_checksum(*row)),
                    )
                else:
                    conn.execute(
                        "INSERT INTO versions (id, fingerprint, parts, uses, created) VALUES (?, ?, ?, ?, ?)",
                        row,
                    )
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise self._mapped(exc) from exc
            return int(vid)

    def fold_wal_into_file(self) -> None:
        self.flush()
        busy = self._query("PRAGMA wal_checkpoint(TRUNCATE)")[0][0]
        if busy:
            raise CheckpointError.failed(self.path, "cannot copy the WAL into the file: another connection is reading it")

    def _release(self) -> None:
        try:
            if self._process is not None:
                self._process.close()
        finally:
            with self._lock:
                self._conn.close()
                self._released = True


# The columns of a RowInfo after its seq, in its order.
_INFO_COLUMNS = "key, version, status, input, error_type, error, traceback, attempts, started, ended"
# A format-1 row's key, or None if it is not 16 bytes of blob (damage, raised by ``_latest``).
_CHECKED_KEY = f"CASE WHEN typeof(key) = 'blob' AND length(key) = {KEY_SIZE} THEN key END"


def open_sqlite_reader(path: str) -> Optional[PySQLiteReader]:
    try:
        return PySQLiteReader(path)
    except _NeverInitialized:
        return None


def _can_start_process() -> bool:
    """Is ``sys.executable`` a Python to run the writer process with? Not in a frozen
    application (PyInstaller and the like: it is the application itself), nor where
    ``select.poll`` is missing."""
    return bool(sys.executable) and not getattr(sys, "frozen", False) and hasattr(select, "poll")


def _created_by() -> str:
    from snapperable import __version__

    return f"snapperable {__version__}"


def open_sqlite(
    path: str,
    synchronous: Synchronous,
    batch_size: int,
    max_wait_time: Optional[float],
) -> PySQLiteStore:
    return PySQLiteStore(path, synchronous, batch_size, max_wait_time)
