"""What is checked of a SQLite checkpoint before anything is written to it (README
"Checkpoint files"): its first 100 bytes, then its schema. The pure-Python store and
``verify`` use these; the Rust core makes the same checks (``rust/sqlite_file.rs``).

A file found damaged is never written to: the header is read as plain bytes, before
SQLite opens the file, and the schema is read before anything is (see ``_pure``).
"""

from __future__ import annotations

import functools
import os
import sqlite3
import struct
from typing import NamedTuple, Optional

from snapperable.errors import CheckpointCorruptError, CheckpointError, CheckpointFormatError

APPLICATION_ID = 1399742800
# The format new files get, and the newest this code reads.
FORMAT_VERSION = 2
# Formats without row checksums (read and written as they are: README).
UNCHECKED_FORMATS = (1,)
HEADER_SIZE = 100
# SQLite's primary result codes (sqlite3.h; stable). ``sqlite3.SQLITE_CORRUPT`` and
# ``sqlite3.SQLITE_NOTADB`` exist only from Python 3.11 on.
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
# An extended code: a read past the end of the file, which only a damaged page number
# (or a file cut short) asks for.
_SQLITE_IOERR_SHORT_READ = 522
_MAGIC = b"SQLite format 3\x00"
# The columns format 2 added: format 1 is format 2 without them.
CHECKSUM_COLUMN = "checksum"


class SQLiteHeader(NamedTuple):
    """What the first page of a file says about it."""

    application_id: int
    user_version: int


def schema_sql() -> str:
    from importlib import resources  # only when a file is created or checked

    return resources.files("snapperable").joinpath("schema.sql").read_text(encoding="utf-8")


def read_header(path: str) -> Optional[SQLiteHeader]:
    """The header of the file at ``path``; None if the file is empty (a new checkpoint).

    Raises ``CheckpointCorruptError`` for a file that is not a SQLite database or is
    shorter than its header says (cut short) while no write-ahead log could account
    for the difference.
    """
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            head = file.read(HEADER_SIZE)
    except OSError as exc:
        raise CheckpointError.failed(path, f"cannot read the file: {exc}") from exc
    if size == 0:
        return None
    if len(head) < HEADER_SIZE:
        raise CheckpointCorruptError.damaged(path, f"the file is cut short ({size} bytes, less than a SQLite header)")
    if not head.startswith(_MAGIC):
        raise CheckpointCorruptError.not_a_checkpoint(path, "file is not a database")  # SQLite's words
    (page_size,) = struct.unpack_from(">H", head, 16)
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1) or head[21:24] != b"\x40\x20\x20":
        raise CheckpointCorruptError.damaged(path, "its SQLite header is not valid")
    change_counter, page_count = struct.unpack_from(">II", head, 24)
    (valid_for,) = struct.unpack_from(">I", head, 92)
    # The page count is meaningful only when written with the change counter it
    # matches (SQLite 3.7.0+); a WAL that holds committed pages may hold the rest.
    if page_count and change_counter == valid_for and not _has_log(path):
        if size < page_count * page_size or size % page_size:
            raise CheckpointCorruptError.damaged(
                path,
                f"the file is cut short (its header says {page_count} pages of {page_size} bytes, "
                f"the file has {size} bytes)",
            )
    (user_version,) = struct.unpack_from(">i", head, 60)
    (application_id,) = struct.unpack_from(">i", head, 68)
    return SQLiteHeader(application_id, user_version)


def never_initialized(conn: sqlite3.Connection) -> bool:
    """A database SQLite made but snapperable never initialized (no application_id, no
    tables), as ``conn`` sees it (a hot journal rolled back): a new file, or what a crash
    between its making and the first commit leaves. The store initializes it; a reader
    reads it as empty. (The Rust core's rule: ``Header::is_fresh``.)"""
    application_id = conn.execute("PRAGMA application_id").fetchone()[0]
    return application_id == 0 and conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is None


def _has_log(path: str) -> bool:
    try:
        return os.path.getsize(path + "-wal") > 0
    except OSError:
        return False


def has_write_ahead_log(path: str) -> bool:
    """Does a non-empty ``-wal`` file lie beside the checkpoint (a run that crashed)?
    Then the checks read through a read-only connection, which never writes the log
    back into the file as the last connection to close does."""
    return _has_log(path)


# (type, name, table) of each schema object, and each table's columns as
# ``PRAGMA table_xinfo`` gives them: what the structure of a checkpoint must be.
Schema = tuple[frozenset[tuple[str, str, str]], dict[str, list[tuple[object, ...]]]]


def read_schema(conn: sqlite3.Connection) -> Schema:
    objects = frozenset(
        (str(kind), str(name), str(table))
        for kind, name, table in conn.execute("SELECT type, name, tbl_name FROM sqlite_master")
        if not str(name).startswith("sqlite_")  # SQLite's own (sqlite_stat1 after ANALYZE)
    )
    columns = {
        name: [tuple(column) for column in conn.execute(f'PRAGMA table_xinfo("{name}")')]
        for kind, name, _ in sorted(objects)
        if kind == "table" and '"' not in name
    }
    return objects, columns


@functools.lru_cache(maxsize=4)
def expected_schema(format_version: int) -> Schema:
    """The structure ``schema.sql`` gives, for format 2; without the checksum
    columns, for format 1."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(schema_sql())
        objects, columns = read_schema(conn)
    finally:
        conn.close()
    if format_version in UNCHECKED_FORMATS:
        columns = {
            table: [
                (cid, *column[1:])
                for cid, column in enumerate(column for column in found if column[1] != CHECKSUM_COLUMN)
            ]
            for table, found in columns.items()
        }
    return objects, columns


def schema_problem(conn: sqlite3.Connection, format_version: int) -> Optional[str]:
    """What is wrong with the schema of the checkpoint open on ``conn`` (None: nothing)."""
    objects, columns = read_schema(conn)
    want_objects, want_columns = expected_schema(format_version)
    if objects != want_objects:
        missing = [name for _, name, _ in sorted(want_objects - objects)]
        extra = [name for _, name, _ in sorted(objects - want_objects)]
        return (
            f"its schema is not format {format_version}'s (missing: {', '.join(missing) or 'none'}; "
            f"unexpected: {', '.join(extra) or 'none'})"
        )
    for table, want in want_columns.items():
        if columns.get(table) != want:
            return f"its schema is not format {format_version}'s (the columns of table {table} differ)"
    found = conn.execute("SELECT value FROM meta WHERE name = 'format_version'").fetchall()
    if found != [(str(format_version),)]:
        return f"its meta table does not say format_version {format_version}"
    return None


def check_existing(conn: sqlite3.Connection, header: SQLiteHeader, path: str) -> int:
    """Raise unless the (non-empty) file open on ``conn`` is a checkpoint this code
    reads, with the schema of its format; returns that format."""
    if header.application_id != APPLICATION_ID:
        raise CheckpointCorruptError.not_a_checkpoint(path, f"application_id {header.application_id}")
    if header.user_version > FORMAT_VERSION:
        raise CheckpointFormatError.newer(path, header.user_version, FORMAT_VERSION)
    if header.user_version < 1:
        raise CheckpointCorruptError.damaged(path, f"format {header.user_version} in its header")
    problem = schema_problem(conn, header.user_version)
    if problem is not None:
        raise CheckpointCorruptError.damaged(path, problem)
    return header.user_version


def mapped_error(exc: Exception, path: str) -> CheckpointError:
    """The one mapping of sqlite3 errors to snapperable's (the Rust core's is
    ``sqlite_error`` in rust/store/schema.rs); text that does not decode can only come
    from damage."""
    if isinstance(exc, UnicodeDecodeError):
        return CheckpointCorruptError.damaged(path, str(exc))
    if isinstance(exc, sqlite3.Error) and not exc.args:
        # Before Python 3.11, sqlite3 raises such a message as an error with no text
        # at all (3.11+ raises the UnicodeDecodeError above); sqlite3 never raises
        # an error without text otherwise.
        return CheckpointCorruptError.damaged(
            path, f"SQLite reported an error whose text does not decode ({type(exc).__name__})"
        )
    # ``sqlite_errorcode`` (Python 3.11+) is the extended code: its low byte is the
    # primary one. Before 3.11 there is no code, and the text below decides.
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    text = str(exc)
    if primary == _SQLITE_NOTADB or (primary is None and "not a database" in text):
        return CheckpointCorruptError.not_a_checkpoint(path, text)
    if (
        primary == _SQLITE_CORRUPT
        or code == _SQLITE_IOERR_SHORT_READ
        or "malformed" in text
        or "Could not decode to UTF-8" in text  # a damaged type byte in a record
        # Before 3.11 a read past the end of the file (a damaged page number) is
        # told from other I/O errors by nothing: both are damage to a reader.
        or (code is None and text == "disk I/O error")
    ):
        return CheckpointCorruptError.damaged(path, text)
    return CheckpointError.failed(path, text)
