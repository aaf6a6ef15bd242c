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
from importlib import resources
from typing import Any, Iterator, Optional

from snapperable import _folding, _sqlite_writer, keys
from snapperable._contract import (
    KEY_SIZE,
    SQLITE_APPLICATION_ID,
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
    CheckpointFormatError,
)

# SQLite's primary result codes (sqlite3.h; stable). ``sqlite3.SQLITE_CORRUPT`` and
# ``sqlite3.SQLITE_NOTADB`` exist only from Python 3.11 on.
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26

BACKEND_NAME = "python"

APPLICATION_ID = SQLITE_APPLICATION_ID
FORMAT_VERSION = 1

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


def _schema() -> str:
    return resources.files("snapperable").joinpath("schema.sql").read_text(encoding="utf-8")


class PySQLiteReader:
    """A SQLite checkpoint through ``sqlite3``, opened for reading: nothing is created
    and no row written, so it reads beside a running writer (a WAL reader) and on a
    read-only file or directory. ``PySQLiteStore`` adds the writes."""

    path: str
    _lock: threading.Lock
    _conn: sqlite3.Connection
    _released: bool

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._released = False  # the connection is closed; set before `_mapped` reads it
        self._conn = self._connect_read_only()

    def _connect_read_only(self) -> sqlite3.Connection:
        """Opened read-write where the file allows it (SQLite falls back to read-only
        where not), so that, closing as the last connection, it removes the ``-wal`` and
        ``-shm`` it made rather than leave them behind; no row is written. Where SQLite
        cannot set up its shared memory (a read-only directory without the ``-shm`` a
        writer leaves), the file is opened as immutable: no writer can be changing it
        then."""
        failure: Optional[Exception] = None
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
                self._check_header(app_id, user_version)
            except BaseException:
                conn.close()
                raise
            return conn
        assert failure is not None
        raise self._mapped(failure) from failure

    def _check_header(self, app_id: int, user_version: int) -> None:
        if app_id != APPLICATION_ID:
            raise CheckpointCorruptError.not_a_checkpoint(self.path, f"application_id {app_id}")
        if user_version > FORMAT_VERSION:
            raise CheckpointFormatError.newer(self.path, user_version, FORMAT_VERSION)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            self._released = True

    def _mapped(self, exc: Exception) -> CheckpointError:
        """The one mapping of sqlite3 errors to snapperable's (the Rust core's is
        ``sqlite_error`` in rust/store/schema.rs); text that does not decode can only
        come from damage. Once the connection is closed, any failure is that."""
        if self._released:
            return CheckpointError.closed(self.path)
        if isinstance(exc, UnicodeDecodeError):
            return CheckpointCorruptError.damaged(self.path, str(exc))
        if isinstance(exc, sqlite3.Error) and not exc.args:
            # Before Python 3.11, sqlite3 raises such a message as an error with no text
            # at all (3.11+ raises the UnicodeDecodeError above); sqlite3 never raises
            # an error without text otherwise.
            return CheckpointCorruptError.damaged(
                self.path, f"SQLite reported an error whose text does not decode ({type(exc).__name__})"
            )
        # ``sqlite_errorcode`` (Python 3.11+) is the extended code: its low byte is the
        # primary one. Before 3.11 there is no code, and the text below decides.
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        text = str(exc)
        if primary == _SQLITE_NOTADB or (primary is None and "not a database" in text):
            return CheckpointCorruptError.not_a_checkpoint(self.path, text)
        if (
            primary == _SQLITE_CORRUPT
            or "malformed" in text
            or "Could not decode to UTF-8" in text  # a damaged type byte in a record
        ):
            return CheckpointCorruptError.damaged(self.path, text)
        return CheckpointError.failed(self.path, text)

    # -- reads --------------------------------------------------------------------------
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

    def versions(self) -> list[VersionRow]:
        return [
            _folding.version_row(row, self.path)
            for row in self._query(
                "SELECT id, fingerprint, parts, uses, created FROM versions ORDER BY id"
            )
        ]

    def key_set(self, version: Optional[int], status: int) -> KeySet:
        if version is None:
            found = self._query("SELECT key, version, status FROM items ORDER BY seq")
        else:
            found = self._query(
                "SELECT key, version, status FROM items WHERE version = ? ORDER BY seq",
                (version,),
            )
        rows = ((self._key(key, version), row_version, row_status) for key, row_version, row_status in found)
        return _folding.keys_with_status(rows, status, new_key_set)

    def _latest(self, value_sql: str, version: int) -> dict[bytes, Any]:
        """Each key of ``version``, in the order first saved -> ``value_sql`` of its latest
        row. Folded in C by ``dict`` straight from the cursor: no list of all the rows.

        A key that is not 16 bytes of blob reads as None: damage, raised here.
        """
        with self._lock:
            try:
                latest: dict[Optional[bytes], Any] = dict(
                    self._conn.execute(
                        "SELECT CASE WHEN typeof(key) = 'blob' AND length(key) = 16 THEN key END,"
                        f" {value_sql} FROM items WHERE version = ? ORDER BY seq",
                        (version,),
                    )
                )
            except (sqlite3.Error, UnicodeDecodeError) as exc:
                raise self._mapped(exc) from exc
        if None in latest:
            raise self._bad_key(version)
        return latest  # type: ignore[return-value]  # None was just ruled out

    def key_sets(self, version: int) -> tuple[KeySet, KeySet]:
        return _folding.ok_and_failed(self._latest("status", version), new_key_set)

    def _latest_outputs(self, version: int) -> dict[bytes, Optional[bytes]]:
        return self._latest(f"CASE WHEN status = {STATUS_OK} THEN output END", version)

    def outputs_for(self, version: int, keys_blob: bytes) -> list[Any]:
        return _folding.outputs_in_key_order(self._latest_outputs(version), keys_blob, self.path)

    def all_outputs(self, version: int) -> list[Any]:
        return _folding.outputs_in_save_order(self._latest_outputs(version), self.path)

    def rows(self, version: Optional[int]) -> Iterator[RowInfo]:
        columns = (
            "seq, key, version, status, input, error_type, error, traceback,"
            " attempts, started, ended"
        )
        if version is None:
            found = self._query(f"SELECT {columns} FROM items ORDER BY seq")
        else:
            found = self._query(
                f"SELECT {columns} FROM items WHERE version = ? ORDER BY seq", (version,)
            )
        return (RowInfo(*row) for row in found)

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
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._mapped(exc) from exc
        try:
            configure(conn, synchronous)
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            user_version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if app_id == 0 and tables == 0:
                # One transaction: a crash leaves either no schema or all of it.
                conn.executescript(f"BEGIN IMMEDIATE; {_schema()};")
                conn.executemany(
                    "INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)",
                    [("format_version", str(FORMAT_VERSION)), ("created_by", _created_by())],
                )
                conn.execute("COMMIT")
            else:
                self._check_header(app_id, user_version)
            conn.execute("PRAGMA journal_mode=WAL")
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            conn.close()
            raise self._mapped(exc) from exc
        except BaseException:
            conn.close()
            raise
        return conn

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
                commit_rows(self._conn, rows)
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
                self._process = WriterProcess(self.path, self._synchronous, self._identity)
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
                cur = conn.execute(
                    "INSERT INTO versions (fingerprint, parts, uses, created)"
                    " VALUES (?, ?, coalesce(?, -1), (julianday('now') - 2440587.5) * 86400.0)",
                    (fingerprint, parts, uses),
                )
                vid = cur.lastrowid
                assert vid is not None
                if uses is None:
                    conn.execute("UPDATE versions SET uses = id WHERE id = ?", (vid,))
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise self._mapped(exc) from exc
            return vid

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


def open_sqlite_reader(path: str) -> PySQLiteReader:
    return PySQLiteReader(path)


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
