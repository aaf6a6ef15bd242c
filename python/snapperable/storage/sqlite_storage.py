"""The default storage: a SQLite checkpoint (format in docs/architecture.md 6.1 and the README)."""

from __future__ import annotations

import os
from typing import Optional, TypeVar

from snapperable import _backend
from snapperable._contract import CheckpointStore, Synchronous
from snapperable.storage.base import SnapshotStorage

R = TypeVar("R")

DEFAULT_DB_PATH = "snapper_checkpoint.db"


class SQLiteSnapshotStorage(SnapshotStorage[R]):
    """Checkpoints in a SQLite database, written in WAL mode by a group-commit writer.

    ``synchronous="full"`` (the default) makes every saved item survive a power loss;
    ``"normal"`` is faster and still survives a crash of the process, but a power loss
    may take back the last commits.
    """

    def __init__(self, db_path: str = DEFAULT_DB_PATH, *, synchronous: Synchronous = "full") -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        self.db_path = db_path
        self.path = os.path.abspath(db_path)
        self.synchronous: Synchronous = synchronous

    def _open_store(self, batch_size: int, max_wait_time: Optional[float]) -> CheckpointStore:
        return _backend.backend.open_sqlite(self.path, self.synchronous, batch_size, max_wait_time)
