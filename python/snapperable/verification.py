"""``snapperable.verify(path)``: read every row and frame of a checkpoint and report the
first damage (README "Checking a checkpoint").

It returns a ``VerifyResult`` rather than raise for damage, so that a caller (a script,
the ``snapperable check`` command to come) can report on many files; it raises only
when the file cannot be examined at all (missing, unreadable, held by a run). The file
is held, as a run holds it, while it is read, and nothing is written to it: a SQLite
file is read through a read-only connection (``immutable`` when no write-ahead log lies
beside it, so that not even one is created).
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from typing import Literal, Optional

from snapperable import _folding, _row_checksum, _sqlite_file
from snapperable._contract import KEY_SIZE, STATUS_FAILED, STATUS_OK
from snapperable.errors import CheckpointCorruptError, CheckpointError
from snapperable.storage.base import FileHold
from snapperable.storage.pickle_storage import MAGIC, PickleReader

Kind = Literal["sqlite", "pickle", "empty", "unknown"]

_SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass(frozen=True)
class VerifyResult:
    """What ``verify`` found.

    ``problem`` is the first damage found (None: none), in the words a run would raise
    it with; ``seq`` the item row it is in (SQLite), when it is in one. ``rows`` counts
    the item rows read, ``versions`` the function versions. ``checksummed`` says whether
    the format has row checksums (SQLite format 2) or frame checksums (pickle): format-1
    SQLite rows have none, so damage to their values cannot be found. ``torn_tail`` is
    the size of a pickle file's torn last frame (a crash mid-append), which the next run
    cuts off: not damage.
    """

    path: str
    kind: Kind
    format_version: Optional[int]
    rows: int
    versions: int
    checksummed: bool
    problem: Optional[str] = None
    seq: Optional[int] = None
    torn_tail: int = 0

    @property
    def ok(self) -> bool:
        """No damage found."""
        return self.problem is None


def verify(path: str) -> VerifyResult:
    """Check the checkpoint at ``path`` (SQLite or pickle, told apart by its content).

    Raises ``CheckpointError`` if the file cannot be read, and ``CheckpointLockedError``
    if a run holds it.
    """
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise CheckpointError.failed(path, "cannot verify it: no such file")
    hold = FileHold(path, lambda head: None)  # any file: what it is, verify reports
    try:
        try:
            with open(path, "rb") as file:
                start = file.read(len(_SQLITE_MAGIC))
        except OSError as exc:
            raise CheckpointError.failed(path, f"cannot read the file: {exc}") from exc
        if not start:
            return VerifyResult(path, "empty", None, 0, 0, False)
        if start.startswith(_SQLITE_MAGIC[: len(start)]) and len(start) == len(_SQLITE_MAGIC):
            return _verify_sqlite(path)
        if start.startswith(MAGIC[: len(start)]):
            return _verify_pickle(path)
        problem = str(CheckpointCorruptError.not_a_checkpoint(path, "it is neither a SQLite nor a pickle checkpoint"))
        return VerifyResult(path, "unknown", None, 0, 0, False, problem)
    finally:
        hold.release()


# -- SQLite ------------------------------------------------------------------------------
class _Found(Exception):
    """The first damage: ``(problem, seq)``."""

    def __init__(self, problem: str, seq: Optional[int] = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.seq = seq


def _verify_sqlite(path: str) -> VerifyResult:
    counts = {"rows": 0, "versions": 0}
    format_version: Optional[int] = None
    checksummed = False
    try:
        header = _sqlite_file.read_header(path)
        if header is None:  # not reached: the magic was read
            return VerifyResult(path, "empty", None, 0, 0, False)
        format_version = header.user_version
        checksummed = format_version not in _sqlite_file.UNCHECKED_FORMATS
        mode = "ro" if _sqlite_file.has_write_ahead_log(path) else "ro&immutable=1"
        from urllib.parse import quote

        conn = sqlite3.connect(f"file:{quote(path)}?mode={mode}", uri=True)
        try:
            _sqlite_file.check_existing(conn, header, path)
            _check_sqlite(conn, path, checksummed, counts)
        finally:
            conn.close()
    except _Found as found:
        return VerifyResult(
            path, "sqlite", format_version, counts["rows"], counts["versions"], checksummed,
            found.problem, found.seq,
        )
    except CheckpointCorruptError as exc:
        return VerifyResult(
            path, "sqlite", format_version, counts["rows"], counts["versions"], checksummed, str(exc)
        )
    except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
        error = _sqlite_file.mapped_error(exc, path)
        if not isinstance(error, CheckpointCorruptError):
            raise error from exc
        return VerifyResult(
            path, "sqlite", format_version, counts["rows"], counts["versions"], checksummed, str(error)
        )
    return VerifyResult(path, "sqlite", format_version, counts["rows"], counts["versions"], checksummed)


def _check_sqlite(conn: sqlite3.Connection, path: str, checksummed: bool, counts: dict[str, int]) -> None:
    report = [row[0] for row in conn.execute("PRAGMA integrity_check(1)")]
    if report != ["ok"]:
        raise _Found(str(CheckpointCorruptError.damaged(path, f"SQLite's integrity check failed: {'; '.join(map(str, report))}")))
    checksum = ", checksum" if checksummed else ""
    for row in conn.execute(f"SELECT id, fingerprint, parts, uses, created{checksum} FROM versions ORDER BY id"):
        counts["versions"] += 1
        _folding.version_row(row[:5], path)  # raises CheckpointCorruptError
        if checksummed:
            try:
                matches = _row_checksum.version_checksum(*row[:5]) == row[5]
            except _row_checksum.WrongType:
                matches = False
            if not matches:
                raise _Found(str(CheckpointCorruptError.damaged(path, f"function version {row[0]!r} does not match its checksum")))
    columns = "key, version, status, input, output, error_type, error, traceback, attempts, started, ended"
    for seq, *fields in conn.execute(f"SELECT seq, {columns}{checksum} FROM items ORDER BY seq"):
        counts["rows"] += 1
        if checksummed and seq != counts["rows"]:  # numbered 1, 2, 3, ... (see _pure)
            raise _Found(str(CheckpointCorruptError.bad_row(path, seq, "is out of sequence")), seq)
        key, version, status, pickled_input, output = fields[:5]
        if checksummed:
            stored = fields[11]
            rest = (pickled_input, *fields[5:11])
            if not (
                _row_checksum.head_matches(stored, key, version, status)
                and _row_checksum.output_matches(stored, output)
                and _row_checksum.rest_matches(stored, *rest)
            ):
                raise _Found(str(CheckpointCorruptError.bad_row(path, seq, "does not match its checksum")), seq)
        if type(key) is not bytes or len(key) != KEY_SIZE:
            raise _Found(str(CheckpointCorruptError.bad_key(path, seq)), seq)
        if status not in (STATUS_OK, STATUS_FAILED):
            raise _Found(str(CheckpointCorruptError.bad_row(path, seq, f"has status {status!r}")), seq)
        for what, value in (("output", output), ("input", pickled_input)):
            problem = _pickle_problem(value)
            if problem is not None:
                raise _Found(
                    str(CheckpointCorruptError.bad_row(path, seq, f"has an {what} that is not a pickle ({problem})")), seq
                )


def _pickle_problem(value: object) -> Optional[str]:
    """Why ``value`` (a stored pickle or None) is not a whole pickle; it is parsed,
    never loaded, so a crafted one runs nothing."""
    if value is None:
        return None
    if type(value) is not bytes:
        return f"a {type(value).__name__}"
    import pickletools  # only here: a check reads what a run never parses

    try:
        ends = [position for opcode, _, position in pickletools.genops(value) if opcode.name == "STOP"]
    except Exception as exc:  # genops raises ValueError and others on a broken stream
        return str(exc)
    if not ends or ends[-1] != len(value) - 1:
        return "bytes after its end"
    return None


# -- pickle ------------------------------------------------------------------------------
def _verify_pickle(path: str) -> VerifyResult:
    rows = versions = 0
    version = _pickle_version(path)
    try:
        reader = PickleReader(path)  # checks the header; reads up to a torn tail
    except CheckpointCorruptError as exc:
        return VerifyResult(path, "pickle", version, 0, 0, True, str(exc))
    try:
        for kind, body in reader._records():
            if kind == "version":
                versions += 1
                _folding.version_row(body, path)
            elif kind != "items":
                raise CheckpointCorruptError.damaged(path, f"a frame holds an unknown record {kind!r}")
        for _ in reader._item_rows():  # their shape, as a run reads them
            rows += 1
        torn = os.path.getsize(path) - reader._tail_start
    except CheckpointCorruptError as exc:
        return VerifyResult(path, "pickle", version, rows, versions, True, str(exc))
    finally:
        reader.close()
    return VerifyResult(path, "pickle", version, rows, versions, True, torn_tail=max(torn, 0))


def _pickle_version(path: str) -> Optional[int]:
    with open(path, "rb") as file:
        head = file.read(12)
    return int.from_bytes(head[8:12], "little") if len(head) == 12 else None


__all__ = ["VerifyResult", "verify"]
