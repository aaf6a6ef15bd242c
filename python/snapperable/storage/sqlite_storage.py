"""The default storage: a SQLite checkpoint (format in docs/architecture.md 6.1 and the README)."""

from __future__ import annotations

import os
from typing import Optional, TypeVar, Union

from snapperable import _backend
from snapperable._contract import SQLITE_APPLICATION_ID, CheckpointReader, CheckpointStore, Synchronous
from snapperable.errors import CheckpointError
from snapperable.storage.base import EmptyCheckpoint, SnapshotStorage

R = TypeVar("R")

DEFAULT_DB_PATH = "snapper_checkpoint.db"
SQLITE_MAGIC = b"SQLite format 3\0"
_LEAF_TABLE_PAGE = 0x0D  # b-tree page type of a first page that lists no table


class SQLiteSnapshotStorage(SnapshotStorage[R]):
    """Checkpoints in a SQLite database, written in WAL mode by a group-commit writer.

    ``synchronous="full"`` (the default) makes every saved item survive a power loss;
    ``"normal"`` is faster and still survives a crash of the process, but a power loss
    may take back the last commits.
    """

    def __init__(
        self, db_path: Union[str, "os.PathLike[str]"] = DEFAULT_DB_PATH, *, synchronous: Synchronous = "full"
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        self.db_path = os.fspath(db_path)
        self.path = os.path.abspath(self.db_path)
        self.synchronous: Synchronous = synchronous

    def _foreign_format(self, head: bytes) -> Optional[str]:
        """Ours: a SQLite file with snapperable's application_id, or one with no tables
        yet (which becomes a checkpoint), or whose newer pages wait in its ``-wal``.
        The reasons are the ones the stores give on opening such a file."""
        if not head.startswith(SQLITE_MAGIC) or len(head) < 105:
            return "file is not a database"  # SQLite's own words
        application_id = int.from_bytes(head[68:72], "big")
        if application_id == SQLITE_APPLICATION_ID:
            return None
        no_tables = head[100] == _LEAF_TABLE_PAGE and head[103:105] == b"\0\0"
        if application_id == 0 and (no_tables or os.path.exists(self.path + "-wal")):
            return None
        return f"application_id {application_id}"

    def _open_reader(self) -> CheckpointReader:
        reader = _backend.backend.open_sqlite_reader(self.path)
        return reader if reader is not None else EmptyCheckpoint(self.path)

    def _open_store(self, batch_size: int, max_wait_time: Optional[float]) -> CheckpointStore:
        directory = os.path.dirname(self.path)
        if not os.access(directory, os.W_OK):
            raise CheckpointError.read_only(
                self.path, f"its directory {directory} is, and SQLite keeps its -wal and -shm there"
            )
        return _backend.backend.open_sqlite(self.path, self.synchronous, batch_size, max_wait_time)
