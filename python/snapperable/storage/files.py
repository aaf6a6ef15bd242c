"""Checkpoints by path: the storage a path names, and moving a checkpoint aside safely.

A SQLite checkpoint is more than its file: committed rows may still be in its ``-wal``
(SQLite copies them into the file only now and then, and not at all after a crash), and
its ``-shm`` and the ``.lock`` beside it go with it. ``mv run.db old.db`` moves the file
alone, leaving rows behind, and does so even while a run writes to it.
``move_checkpoint`` takes the hold first (refusing a checkpoint in use), copies the WAL
into the file, and moves the file with everything beside it.
"""

from __future__ import annotations

import errno
import os
from typing import TypeVar, Union

from snapperable.errors import CheckpointError
from snapperable.storage.base import LOCK_SUFFIX, FileHold, SnapshotStorage, fsync_directory
from snapperable.storage.pickle_storage import PickleSnapshotStorage
from snapperable.storage.sqlite_storage import SQLiteSnapshotStorage

R = TypeVar("R")

PathOrStorage = Union[SnapshotStorage[R], str, "os.PathLike[str]"]
PICKLE_SUFFIXES = (".pkl", ".pickle")
# What SQLite keeps beside a database file (WAL mode), moved with it.
SQLITE_COMPANIONS = ("-wal", "-shm")


def storage_for(given: "PathOrStorage[R] | None") -> SnapshotStorage[R]:
    """The storage ``given`` names: itself, the default (None), or one for a path: a
    pickle file if it ends in ``.pkl`` or ``.pickle``, else SQLite."""
    if given is None:
        return SQLiteSnapshotStorage()
    if isinstance(given, SnapshotStorage):
        return given
    if isinstance(given, (str, os.PathLike)):
        path = os.fspath(given)
        if isinstance(path, str):
            if path.lower().endswith(PICKLE_SUFFIXES):
                return PickleSnapshotStorage(path)
            return SQLiteSnapshotStorage(path)
    raise TypeError(
        "snapshot_storage must be a SnapshotStorage (SQLiteSnapshotStorage(path), "
        f"PickleSnapshotStorage(path)) or a str or os.PathLike path, not {type(given).__name__}"
    )


def move_checkpoint(checkpoint: "PathOrStorage[object]", destination: "Union[str, os.PathLike[str]]") -> str:
    """Move a checkpoint to ``destination`` (same filesystem), to start over at its old
    path; returns the new absolute path.

    Refuses (``CheckpointLockedError``) a checkpoint that a Snapper holds, in this
    process or another; refuses a destination that exists. A SQLite checkpoint's WAL is
    copied into the file first, and the file moves with its ``-wal``, ``-shm`` and lock
    file, so the moved checkpoint holds every saved row and resumes as it was.
    """
    storage = storage_for(checkpoint)
    source = os.path.realpath(storage.path)  # a symlink's target moves, not the link
    target = os.path.abspath(os.fspath(destination))
    if not os.path.isfile(source):
        raise CheckpointError.cannot_move(source, target, "no such file")
    companions = SQLITE_COMPANIONS if isinstance(storage, SQLiteSnapshotStorage) else ()
    for suffix in ("", *companions, LOCK_SUFFIX):
        if os.path.lexists(target + suffix):
            raise CheckpointError.cannot_move(source, target, f"{target + suffix} exists")
    hold = FileHold(source, storage._foreign_format)  # raises if a Snapper holds it
    try:
        store = storage._open_store(1, None)
        try:
            store.fold_wal_into_file()
        finally:
            store.close()
        try:
            os.rename(source, target)
        except OSError as exc:
            why = "it is on another filesystem; move it within its own" if exc.errno == errno.EXDEV else str(exc)
            raise CheckpointError.cannot_move(source, target, why) from exc
        # The WAL is empty now and SQLite removed both on close, unless another reader
        # had the file open: whatever is left goes along, and so does the lock file,
        # whose lock (held here) moves with it.
        for suffix in (*companions, LOCK_SUFFIX):
            if os.path.lexists(source + suffix):
                os.rename(source + suffix, target + suffix)
        fsync_directory(target)
        if os.path.dirname(target) != os.path.dirname(source):
            fsync_directory(source)
    finally:
        hold.release()
    return target
