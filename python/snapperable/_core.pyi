"""The Rust backend (``rust/lib.rs``): the ``Backend`` contract of ``_contract.py``.

Kept true by ``python -m mypy.stubtest snapperable._core``; mypy proves in
``_backend.py`` that this module conforms to ``Backend``.
"""

from typing import Any, Callable, Iterator, Optional, Sequence, final

from snapperable._contract import ItemRow, ProcessStop, RowInfo, Synchronous, VersionRow

__all__ = [
    "BACKEND_NAME",
    "KEY_SIZE",
    "PICKLE_PROTOCOL",
    "STATUS_FAILED",
    "STATUS_OK",
    "KeyIterator",
    "KeySet",
    "RowIterator",
    "SqliteCheckpoint",
    "input_key",
    "input_keys",
    "new_key_set",
    "open_sqlite",
    "open_sqlite_reader",
]

BACKEND_NAME: str
# The contract's constants (``rust/contract.rs``), equal to ``snapperable._contract``'s.
KEY_SIZE: int
STATUS_OK: int
STATUS_FAILED: int
PICKLE_PROTOCOL: int
# Private, for tests: pending rows at which record() and process() wait for the writer.
_MAX_PENDING_ROWS: int

def input_key(obj: object) -> bytes:
    """The 16-byte key that identifies an input across runs and processes."""

def input_keys(objs: Sequence[object]) -> bytes:
    """The keys of ``objs`` concatenated, 16 bytes each."""

def new_key_set() -> KeySet:
    """An empty key set."""

def open_sqlite(
    path: str,
    synchronous: Synchronous,
    batch_size: int,
    max_wait_time: Optional[float],
) -> SqliteCheckpoint:
    """Open (creating with mode 0600 if missing) a SQLite checkpoint at ``path``."""

def open_sqlite_reader(path: str) -> Optional[SqliteCheckpoint]:
    """Open an existing SQLite checkpoint at ``path`` for reading only; writes raise.
    None for a database never initialized (nothing saved)."""

@final
class KeySet:
    """A compact set of 16-byte input keys (about 20-40 bytes a key)."""

    def __len__(self) -> int: ...
    def __contains__(self, key: object, /) -> bool: ...
    def __iter__(self) -> KeyIterator: ...
    def add(self, key: bytes) -> None: ...
    def claim(self, keys: bytes) -> list[int]: ...

@final
class KeyIterator:
    def __iter__(self) -> KeyIterator: ...
    def __next__(self) -> bytes: ...

@final
class SqliteCheckpoint:
    """An open SQLite checkpoint: the pending buffer, its writer, and reads."""

    @property
    def path(self) -> str: ...
    def versions(self) -> list[VersionRow]: ...
    def add_version(self, fingerprint: str, parts: str, uses: Optional[int]) -> int: ...
    def key_set(self, version: Optional[int], status: int) -> KeySet: ...
    def key_sets(self, version: int) -> tuple[KeySet, KeySet]: ...
    def record(self, row: ItemRow) -> None: ...
    def process(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        keys: bytes,
        positions: Sequence[int],
        version: int,
    ) -> Optional[ProcessStop]: ...
    def flush(self) -> None: ...
    def unsaved(self) -> int: ...
    def outputs_for(self, version: int, keys: bytes) -> list[Any]: ...
    def all_outputs(self, version: int) -> list[Any]: ...
    def rows(self, version: Optional[int], with_output: bool = False) -> RowIterator: ...
    def meta(self) -> dict[str, str]: ...
    def integrity_check(self) -> Optional[str]: ...
    def fold_wal_into_file(self) -> None: ...
    def close(self) -> None: ...

@final
class RowIterator:
    def __iter__(self) -> RowIterator: ...
    def __next__(self) -> RowInfo: ...
