"""Read a checkpoint without running anything: ``open_checkpoint(path)``.

The reader never writes to the checkpoint and never takes the writer's hold, so it
works while a run holds the file (SQLite's WAL readers; the pickle file's committed
frames). The format is told by the file's first bytes, not its name. SQLite is read
through the active backend (``_backend.backend``), never a private ``sqlite3``
connection: within one process only one SQLite library may have a file open.

What "an item" is: the latest row of a key within a version's results (later rows for
the same key supersede earlier ones, as ``load()`` reads them). Versions are the ids of
the checkpoint's versions log; a version's results are the rows of its ``uses`` id.
The reader folds the rows once (their keys, never their outputs) and then streams
them, so memory stays at a key set however many outputs the file holds.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import struct
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional, Union

from snapperable import _backend, _contract
from snapperable._contract import KEY_SIZE, SQLITE_APPLICATION_ID, STATUS_FAILED, STATUS_OK, KeySet, RowInfo
from snapperable.errors import CheckpointCorruptError, CheckpointError
from snapperable.metrics import ProcessingMetric, ReportScope, metric_from_row, render_report
from snapperable.storage.base import holder_pid
from snapperable.storage.pickle_storage import MAGIC as PICKLE_MAGIC
from snapperable.storage.pickle_storage import PickleReader, PickleSnapshotStorage
from snapperable.storage.sqlite_storage import SQLiteSnapshotStorage

Format = Literal["sqlite", "pickle"]
ReportFormat = Literal["markdown", "json"]
PathArg = Union[str, "os.PathLike[str]"]

SQLITE_MAGIC = b"SQLite format 3\x00"
# SQLite's database header (sqlite.org/fileformat.html 1.3): big-endian u32 fields.
_SQLITE_APPLICATION_ID_AT = 68
_SQLITE_HEADER_SIZE = 100

_PICKLE_PROTOCOL_MARK = b"\x80\x04"  # PROTO 4: every pickle a checkpoint stores
_PICKLE_FRAME = b"\x95"  # FRAME opcode, then a u64 length
_PICKLE_STOP = b"."


@dataclass(frozen=True)
class VersionInfo:
    """An entry of the versions log: a run started with this function version.

    ``uses`` is the id whose results it reads and writes (its own, or an earlier one:
    a change accepted with ``on_version_change="keep"``, or a return to a version).
    ``changes`` says what changed since the entry before it (empty for the first, or
    when the fingerprint is the same).
    """

    id: int
    fingerprint: str
    uses: int
    created: float  # Unix time the entry was logged
    parts: dict[str, str]
    changes: list[str]


@dataclass(frozen=True)
class VersionCounts:
    """The rows of one version's results: ``ok + failed + superseded == rows``."""

    version: int  # the id the rows carry (a ``uses`` id of the log)
    rows: int
    ok: int  # items whose latest row is ok
    failed: int  # items whose latest row failed
    superseded: int  # rows a later row of the same key replaced

    @property
    def unique_keys(self) -> int:
        return self.ok + self.failed


@dataclass(frozen=True)
class ItemRecord:
    """One stored row: an item's processing, all its attempts.

    ``pickled_input`` is kept for failed items, and for ok ones with
    ``Snapper(store_inputs=True)``; ``input()`` and ``output()`` unpickle on demand
    (they may raise if a class they need cannot be imported here).
    """

    seq: int  # order of saving, 1-based
    key: bytes
    version: int
    ok: bool
    attempts: int
    started: float  # Unix time
    ended: float
    error_type: Optional[str]
    error: Optional[str]
    traceback: Optional[str]
    pickled_input: Optional[bytes]
    pickled_output: Optional[bytes]
    superseded: bool = False

    @property
    def status(self) -> Literal["ok", "failed"]:
        return "ok" if self.ok else "failed"

    @property
    def key_hex(self) -> str:
        return self.key.hex()

    @property
    def duration(self) -> float:
        return self.ended - self.started

    @property
    def has_input(self) -> bool:
        return self.pickled_input is not None

    def input(self) -> Any:
        """The stored input, unpickled; None when none was stored."""
        return None if self.pickled_input is None else pickle.loads(self.pickled_input)

    def output(self) -> Any:
        """The output, unpickled; None for a failed item (or when read without outputs)."""
        return None if self.pickled_output is None else pickle.loads(self.pickled_output)


@dataclass
class _Fold:
    """What one pass over the rows' keys tells: the counts, and which rows are superseded."""

    last_seq: int  # rows after it arrived after the fold (a live writer): not read
    counts: dict[int, VersionCounts]
    superseded: set[int]  # seqs
    # Of each key with more than one row in its version: the seq of its first row ->
    # the seq of its latest (an item is listed where it was first saved, as load_all()
    # lists it, with what its latest row says).
    latest_of_first: dict[int, tuple[int, int]]  # first seq -> (version, latest seq)


def detect_format(path: str) -> Format:
    """The format of the checkpoint at ``path``, from its first bytes.

    Raises ``CheckpointError`` for a missing file, a directory or one that cannot be
    read, and ``CheckpointCorruptError`` for a file that is not a checkpoint.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError.failed(path, "no such file") from None
    except OSError as exc:
        raise CheckpointError.failed(path, f"cannot read it: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise CheckpointError.failed(path, "is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as file:
            head = file.read(_SQLITE_HEADER_SIZE)
    except OSError as exc:
        raise CheckpointError.failed(path, f"cannot read it: {exc.strerror or exc}") from None
    if not head:
        raise CheckpointCorruptError.not_a_checkpoint(path, "it is empty")
    if head.startswith(PICKLE_MAGIC):
        return "pickle"
    if head.startswith(SQLITE_MAGIC) and len(head) == _SQLITE_HEADER_SIZE:
        # Checked here, before SQLite opens it: opening an empty database would write
        # the schema into it. A checkpoint's first commit (the schema) runs before it
        # switches to WAL, so the application id is in the file itself.
        (application_id,) = struct.unpack_from(">I", head, _SQLITE_APPLICATION_ID_AT)
        if application_id != SQLITE_APPLICATION_ID:
            raise CheckpointCorruptError.not_a_checkpoint(
                path, f"a SQLite database with application_id {application_id:#x}"
            )
        return "sqlite"
    raise CheckpointCorruptError.not_a_checkpoint(path, "its first bytes are neither SQLite's nor a pickle checkpoint's")


def open_store_for_reading(path: str, format: Format) -> _contract.CheckpointReader:
    """The one place that opens a checkpoint to read it (the reader and ``compact``):
    the storage's ``open_reader``, with no hold, no lock file, nothing created or
    written (SQLite through the active backend's library, read-only where the file
    does not allow more)."""
    storage = PickleSnapshotStorage[Any](path) if format == "pickle" else SQLiteSnapshotStorage[Any](path)
    return storage.open_reader()


def pickle_problem(blob: object) -> Optional[str]:
    """What is wrong with a stored pickle's framing, or None: protocol 4, a frame length
    that fits, a STOP at the end. Never unpickles."""
    if not isinstance(blob, bytes):
        return f"is a {type(blob).__name__}, not a pickle"
    if not blob.startswith(_PICKLE_PROTOCOL_MARK):
        return "does not start as a protocol-4 pickle"
    if not blob.endswith(_PICKLE_STOP):
        return "does not end with a pickle's STOP"
    if blob[2:3] == _PICKLE_FRAME:
        if len(blob) < 11:
            return "has a cut-off frame header"
        (frame,) = struct.unpack_from("<Q", blob, 3)
        if frame > len(blob) - 11:
            return f"has a frame of {frame} bytes in {len(blob)}"
    return None


class CheckpointReader:
    """A checkpoint opened for reading: see ``open_checkpoint``. A context manager;
    ``close()`` releases the file."""

    def __init__(self, path: PathArg) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.format: Format = detect_format(self.path)
        self._store = open_store_for_reading(self.path, self.format)
        self._fold: Optional[_Fold] = None
        try:
            meta = self._store.meta()
            self.format_version = int(meta.get("format_version", "0"))
            self.created_by: Optional[str] = meta.get("created_by")
            self._log = self._store.versions()
        except BaseException:
            self._store.close()
            raise

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._store.close()

    def __repr__(self) -> str:
        return f"<CheckpointReader {self.format} {self.path!r}>"

    # -- the file ---------------------------------------------------------------------
    @property
    def file_size(self) -> int:
        """Bytes of the checkpoint file (SQLite: without its ``-wal``)."""
        return os.stat(self.path).st_size

    @property
    def wal_size(self) -> Optional[int]:
        """Bytes of a SQLite checkpoint's ``-wal`` file (rows committed, not yet moved
        into the file), or None when there is none."""
        try:
            return os.stat(self.path + "-wal").st_size if self.format == "sqlite" else None
        except FileNotFoundError:
            return None

    def holder(self) -> Optional[int]:
        """The pid of the process holding the file for a run, or None."""
        return holder_pid(self.path)

    # -- versions ---------------------------------------------------------------------
    def versions(self) -> list[VersionInfo]:
        """The versions log, oldest first, each with what changed since the one before."""
        from snapperable.versioning import explain_change

        result: list[VersionInfo] = []
        previous: Optional[dict[str, str]] = None
        for row in self._log:
            parts = json.loads(row.parts)
            changes = [] if previous is None else explain_change(previous, parts)
            result.append(VersionInfo(row.id, row.fingerprint, row.uses, row.created, parts, changes))
            previous = parts
        return result

    def results_of(self, version: Optional[int] = None) -> Optional[int]:
        """The id the rows of log entry ``version`` carry (its ``uses``); None = the
        entry used last; None back for a checkpoint with no versions yet."""
        if version is None:
            return self._log[-1].uses if self._log else None
        for row in self._log:
            if row.id == version:
                return row.uses
        known = ", ".join(str(row.id) for row in self._log) or "none"
        raise ValueError(f"checkpoint {self.path} has no version {version} (known: {known})")

    # -- counts -----------------------------------------------------------------------
    def _folded(self) -> _Fold:
        """Fold the rows once: per version, each key's rows; superseded ones found by a
        second pass over just the keys that repeat (usually none or few)."""
        if self._fold is not None:
            return self._fold
        new_key_set = _backend.backend.new_key_set
        seen: dict[int, KeySet] = {}
        repeated: dict[int, KeySet] = {}
        rows: dict[int, int] = {}
        ok_rows: dict[int, int] = {}
        last_seq = 0
        for row in self._store.rows(None):
            keys = seen.get(row.version)
            if keys is None:
                keys = seen[row.version] = new_key_set()
                repeated[row.version] = new_key_set()
                rows[row.version] = ok_rows[row.version] = 0
            if row.key in keys:
                repeated[row.version].add(row.key)
            else:
                keys.add(row.key)
            rows[row.version] += 1
            ok_rows[row.version] += row.status == STATUS_OK
            last_seq = row.seq
        superseded: set[int] = set()
        # (version, key) -> (first seq, latest seq, latest ok), for keys that repeat only
        latest: dict[tuple[int, bytes], tuple[int, int, bool]] = {}
        ok_items = dict(ok_rows)
        if any(len(keys) for keys in repeated.values()):
            for row in self._store.rows(None):
                if row.seq > last_seq:
                    break
                if row.key not in repeated[row.version]:
                    continue
                ok_items[row.version] -= row.status == STATUS_OK
                earlier = latest.get((row.version, row.key))
                if earlier is not None:
                    superseded.add(earlier[1])
                first = row.seq if earlier is None else earlier[0]
                latest[(row.version, row.key)] = (first, row.seq, row.status == STATUS_OK)
            for (version, _), (_, _, ok) in latest.items():
                ok_items[version] += ok
        counts = {}
        for version, total in rows.items():
            unique = len(seen[version])
            counts[version] = VersionCounts(
                version, total, ok_items[version], unique - ok_items[version], total - unique
            )
        latest_of_first = {first: (version, last) for (version, _), (first, last, _) in latest.items()}
        self._fold = _Fold(last_seq, counts, superseded, latest_of_first)
        return self._fold

    def counts(self) -> list[VersionCounts]:
        """Row counts of each version's results, in id order."""
        fold = self._folded()
        return [fold.counts[version] for version in sorted(fold.counts)]

    # -- items ------------------------------------------------------------------------
    def items(
        self,
        version: Optional[int] = None,
        *,
        all_versions: bool = False,
        superseded: bool = False,
        with_outputs: bool = True,
    ) -> Iterator[ItemRecord]:
        """The items of log entry ``version`` (None: the entry used last), or of every
        version with ``all_versions``, streamed.

        One record per item, its latest row, in the order ``load_all()`` lists them
        (where each item was first saved); ``superseded=True`` yields the rows that a
        later row replaced too, marked ``superseded``, where they were saved. Rows
        saved after the reader's first look (a live run) are left out, so every call
        sees the same snapshot. Memory: the latest rows of the items saved more than
        once are read ahead (usually a few retried items), the rest is streamed.
        """
        fold = self._folded()
        wanted = None if all_versions else self.results_of(version)
        if wanted is None and not all_versions:
            return
        moved = {
            latest: first
            for first, (row_version, latest) in fold.latest_of_first.items()
            if wanted is None or row_version == wanted
        }
        ahead: dict[int, RowInfo] = {}  # first seq -> the latest row of its key
        if moved:
            for row in self._store.rows(wanted, with_output=with_outputs):
                if row.seq > fold.last_seq:
                    break
                if row.seq in moved:
                    ahead[moved[row.seq]] = row
        for row in self._store.rows(wanted, with_output=with_outputs):
            if row.seq > fold.last_seq:
                return
            if row.seq in ahead:
                if superseded:
                    yield _record(row, True)
                yield _record(ahead.pop(row.seq), False)
            elif row.seq in moved:
                continue  # listed where its key was first saved
            elif row.seq in fold.superseded:
                if superseded:
                    yield _record(row, True)
            else:
                yield _record(row, False)

    def failures(self, version: Optional[int] = None) -> dict[str, list[ItemRecord]]:
        """The failed items of ``version`` (None: the one used last), grouped by
        exception type (``module.QualName``), the most frequent type first."""
        groups: dict[str, list[ItemRecord]] = {}
        for item in self.items(version, with_outputs=False):
            if not item.ok:
                groups.setdefault(item.error_type or "unknown", []).append(item)
        return dict(sorted(groups.items(), key=lambda group: -len(group[1])))

    def metrics(self, version: Optional[int] = None) -> list[ProcessingMetric]:
        """One ``ProcessingMetric`` per item of ``version``, as ``Snapper.load_metrics``
        gives them (``input_item`` is the stored input, else None)."""
        wanted = self.results_of(version)
        if wanted is None:
            return []
        return [
            metric_from_row(_row_info(item))
            for item in self.items(version, with_outputs=False)
        ]

    def report(self, version: Optional[int] = None, format: ReportFormat = "markdown") -> str:
        """The report of ``version``'s metrics, as ``Snapper.generate_report`` gives it,
        but for positions: with no iterable at hand, items are named by their stored
        input (or key) alone."""
        wanted = self.results_of(version)
        metrics = self.metrics(version)
        if wanted is None:
            return render_report(metrics, format)
        since = [row.created for row in self._log if row.uses == wanted]
        return render_report(metrics, format, ReportScope(wanted, min(since) if since else None))

    # -- checking ---------------------------------------------------------------------
    def check(self) -> Optional[str]:
        """The first damage found, or None for a sound file. Reads every page (SQLite
        ``integrity_check``) or frame (their checksums), every versions-log entry and
        every row, checking each stored pickle's framing (never unpickling a row's
        input or output). Writes nothing."""
        try:
            problem = self._store.integrity_check()
            if problem is not None:
                # SQLite's report may open with a "*** in database main ***" line.
                lines = [line for line in problem.splitlines() if line.strip() and not line.startswith("***")]
                return str(CheckpointCorruptError.damaged(self.path, "; ".join(lines) or problem.strip()))
            self._store.versions()
            for row in self._store.rows(None, with_output=True):
                problem = _row_problem(row)
                if problem is not None:
                    return str(CheckpointCorruptError.bad_row(self.path, row.seq, problem))
        except CheckpointCorruptError as exc:
            return str(exc)
        return None

    def torn_tail_bytes(self) -> int:
        """Bytes after a pickle checkpoint's last intact frame: what a crash (or a
        live writer mid-append) left, cut off by the next run. 0 for SQLite."""
        return self._store.torn_tail_bytes() if isinstance(self._store, PickleReader) else 0


def _record(row: RowInfo, superseded: bool) -> ItemRecord:
    return ItemRecord(
        row.seq, row.key, row.version, row.status == STATUS_OK, row.attempts, row.started,
        row.ended, row.error_type, row.error, row.traceback, row.input, row.output, superseded,
    )


def _row_info(item: ItemRecord) -> RowInfo:
    return RowInfo(
        item.seq, item.key, item.version, STATUS_OK if item.ok else STATUS_FAILED,
        item.pickled_input, item.error_type, item.error, item.traceback, item.attempts,
        item.started, item.ended,
    )


def _row_problem(row: RowInfo) -> Optional[str]:
    if not isinstance(row.key, bytes) or len(row.key) != KEY_SIZE:
        return f"has a key that is not {KEY_SIZE} bytes"
    if row.status not in (STATUS_OK, STATUS_FAILED):
        return f"has status {row.status!r}"
    if row.status == STATUS_OK:
        problem = pickle_problem(row.output)
        if problem is not None:
            return f"has an output that {problem}"
    elif row.output is not None:
        return "is failed but has an output"
    if row.input is not None:
        problem = pickle_problem(row.input)
        if problem is not None:
            return f"has an input that {problem}"
    return None


def open_checkpoint(path: PathArg) -> CheckpointReader:
    """Open the checkpoint at ``path`` (SQLite or pickle, told from its first bytes)
    for reading: never written to, no hold taken, so it works while a run holds it.

    Raises ``CheckpointError`` for a missing file or a directory,
    ``CheckpointCorruptError`` for a file that is not a checkpoint or is damaged, and
    ``CheckpointFormatError`` for a newer format than this snapperable reads.
    """
    return CheckpointReader(path)


__all__ = [
    "CheckpointReader",
    "ItemRecord",
    "VersionCounts",
    "VersionInfo",
    "detect_format",
    "open_checkpoint",
]
