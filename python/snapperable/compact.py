"""Compact a checkpoint: ``snapperable compact``, the one command that writes one.

The new checkpoint holds the versions log and only the latest row of each key of each
version: what ``load()``, ``load_all()`` and the metrics read is the same, the rows
that later rows replaced are gone. It is written through the same storage classes as a
run (so it is a file of the current format, with the same backend's SQLite library),
to a new file; ``in_place`` then renames it over the original, atomically.

The original is held (the writer's hold) throughout, so a run cannot start meanwhile,
and compaction is refused while one holds it. Version log entries keep their ids and
what they cover; their ``created`` times become the compaction's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from snapperable.errors import CheckpointError
from snapperable.reader import CheckpointReader, detect_format
from snapperable.storage.base import FileHold, SnapshotStorage
from snapperable.storage.pickle_storage import PickleSnapshotStorage
from snapperable.storage.sqlite_storage import SQLiteSnapshotStorage

# Rows pending before the writer commits: a compaction is one long append.
_BATCH_ROWS = 4096


@dataclass(frozen=True)
class CompactResult:
    """What a compaction did: rows and bytes before and after, and where it wrote."""

    path: str  # the compacted checkpoint (the original's path, in place)
    rows_before: int
    rows_after: int
    bytes_before: int
    bytes_after: int


def compact(source: str, out: Optional[str] = None, *, in_place: bool = False) -> CompactResult:
    """Write a compacted copy of ``source`` to ``out``, or over ``source`` with
    ``in_place``. ``out`` must not exist. Raises ``CheckpointLockedError`` if another
    Snapper holds ``source``; ``source`` is left as it was on any failure."""
    source = os.path.abspath(source)
    if (out is None) == (not in_place):
        raise ValueError("give exactly one of out= and in_place=True")
    format = detect_format(source)
    if in_place:
        directory, name = os.path.split(source)
        target = os.path.join(directory, f".{name}.compact-{os.getpid()}")
    else:
        assert out is not None
        target = os.path.abspath(out)
        if os.path.realpath(target) == os.path.realpath(source):
            raise ValueError(f"{source}: to compact a file into itself, use in_place=True")
    if os.path.lexists(target):
        raise CheckpointError.failed(target, "already exists; compact writes a new file")
    hold = FileHold(source, _storage(format, source)._foreign_format)
    try:
        bytes_before = os.stat(source).st_size
        try:
            with CheckpointReader(source) as reader:
                counts = reader.counts()
                _copy_latest_rows(reader, _storage(format, target))
            rows_before = sum(count.rows for count in counts)
            with CheckpointReader(target) as written:
                rows_after = sum(count.rows for count in written.counts())
            expected = sum(count.unique_keys for count in counts)
            if rows_after != expected:  # never put a short copy in the original's place
                raise CheckpointError.failed(
                    target, f"the compacted copy holds {rows_after} rows, not {expected}; left as it was"
                )
            if in_place:
                _replace(target, source, format)
        except BaseException:
            # Only what this call made (target did not exist): never the original.
            for made in (target, target + "-wal", target + "-shm"):
                _remove_quietly(made)
            raise
        finally:
            _remove_quietly(target + ".lock")  # the hold on the copy, taken while writing it
    finally:
        hold.release()
    done = source if in_place else target
    return CompactResult(done, rows_before, rows_after, bytes_before, os.stat(done).st_size)


def _storage(format: str, path: str) -> "SnapshotStorage[object]":
    if format == "pickle":
        return PickleSnapshotStorage(path)
    return SQLiteSnapshotStorage(path)


def _copy_latest_rows(reader: CheckpointReader, storage: "SnapshotStorage[object]") -> None:
    checkpoint = storage.open(_BATCH_ROWS, None)
    try:
        store = checkpoint.store
        for version in reader.versions():
            uses = None if version.uses == version.id else version.uses
            new_id = store.add_version(version.fingerprint, json.dumps(version.parts, sort_keys=True), uses)
            if new_id != version.id:
                raise CheckpointError.failed(
                    reader.path,
                    f"its versions log is not numbered 1, 2, ... (version {version.id} became "
                    f"{new_id}); not compacted",
                )
        for item in reader.items(all_versions=True):
            store.record(
                (
                    item.key, item.version, 0 if item.ok else 1, item.pickled_input,
                    item.pickled_output, item.error_type, item.error, item.traceback,
                    item.attempts, item.started, item.ended,
                )
            )
        store.flush()
    finally:
        checkpoint.close()


def _replace(target: str, source: str, format: str) -> None:
    """Rename ``target`` over ``source``, durably, once nothing of either is left in a
    ``-wal`` file (the old one's would otherwise be replayed into the new file)."""
    if format == "sqlite":
        for wal in (source + "-wal", target + "-wal"):
            if os.path.exists(wal) and os.stat(wal).st_size > 0:
                raise CheckpointError.failed(
                    source, f"another process has it open ({wal} is in use); close it and compact again"
                )
        _remove_quietly(target + "-wal")
        _remove_quietly(target + "-shm")
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(target, source)
    if format == "sqlite":
        _remove_quietly(source + "-shm")  # the old file's index; SQLite rebuilds it
        _remove_quietly(source + "-wal")
    directory = os.open(os.path.dirname(source), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
