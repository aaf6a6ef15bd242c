"""The backend contract: the Protocols both backends implement, the row layout and the
constants of the checkpoint formats. It imports nothing of snapperable's, so every
module (the fallback ``_pure`` and its writer modules, the Rust core's imports, the
public modules) can depend on it without a cycle; ``_backend.py`` chooses the backend.

This is the only home of ``KEY_SIZE``, ``PICKLE_PROTOCOL`` and the status codes on the
Python side (the Rust core's are in ``rust/contract.rs``, exported by ``_core`` and
checked equal by ``tests/test_contract.py``).
See ``docs/architecture.md`` for how the parts fit together.
"""


from __future__ import annotations

import os
from typing import Any, Callable, Final, Iterator, Literal, NamedTuple, Optional, Protocol, Sequence, Tuple

# Bytes of one input key (BLAKE2b digest size; README "Item identity").
KEY_SIZE: Final = 16

# Status of an item row (docs/architecture.md 6.1): the integer stored in the `status` column.
STATUS_OK: Final = 0
STATUS_FAILED: Final = 1

Synchronous = Literal["full", "normal"]

# `PRAGMA application_id` of a SQLite checkpoint (0x536e6150, "SnaP"; schema.sql).
SQLITE_APPLICATION_ID: Final = 0x536E6150


# One finished item as the writer appends it (docs/architecture.md 6.1):
#   (key, version, status, input, output, error_type, error, traceback, attempts,
#    started, ended)
# The Snapper builds one per item; both SQLite stores and the pickle store save them as
# given. ``input`` and ``output`` are pickles (protocol 4); ``input`` is kept for failed
# items. A plain tuple, not a NamedTuple: it is built on the hot path, where a
# NamedTuple costs more than the rest of the bookkeeping (benches/README.md).
ItemRow = Tuple[
    bytes, int, int, Optional[bytes], Optional[bytes], Optional[str], Optional[str],
    Optional[str], int, float, float,
]
# The pickle protocol of every pickle a checkpoint stores (inputs, outputs, pickle
# frames): 4 reads on every Python 3 snapperable supports.
PICKLE_PROTOCOL: Final = 4

# Field positions, Final so that mypy types `row[ROW_KEY]` as bytes.
ROW_KEY: Final = 0
ROW_VERSION: Final = 1
ROW_STATUS: Final = 2
ROW_INPUT: Final = 3
ROW_OUTPUT: Final = 4
ROW_ATTEMPTS: Final = 8
ROW_STARTED: Final = 9
ROW_ENDED: Final = 10


class RowInfo(NamedTuple):
    """An item row as read back for metrics, reports and the reader; ``output`` (a
    pickle, or None for a failed row) only from ``rows(..., with_output=True)``."""

    seq: int
    key: bytes
    version: int
    status: int
    input: Optional[bytes]
    error_type: Optional[str]
    error: Optional[str]
    traceback: Optional[str]
    attempts: int
    started: float
    ended: float
    output: Optional[bytes] = None


class VersionRow(NamedTuple):
    """A function version known to a checkpoint.

    ``fingerprint`` is what ``versioning.fingerprint`` (or ``version=``) gave;
    ``parts`` is the JSON object of its named parts, kept to explain a change;
    ``uses`` is the id whose results this version reads and writes: its own id, or an
    older one when a change was accepted with ``on_version_change="keep"``.
    """

    id: int
    fingerprint: str
    parts: str
    uses: int
    created: float


# What `CheckpointStore.process` returns when an item raised:
# (index into positions, started, exception, raised_by_pickling, output)
ProcessStop = Tuple[int, float, BaseException, bool, Any]


class KeySet(Protocol):
    """A compact set of 16-byte input keys."""

    def __len__(self) -> int: ...

    def __contains__(self, key: object) -> bool: ...

    def __iter__(self) -> Iterator[bytes]: ...

    def add(self, key: bytes) -> None: ...

    def claim(self, keys: bytes) -> list[int]:
        """Positions ``i`` whose key ``keys[16*i:16*i+16]`` is not in the set, adding
        each such key as it goes: a key repeated within ``keys`` is claimed once."""
        ...


class CheckpointReader(Protocol):
    """An open checkpoint's reads. Opened for reading only (``open_sqlite_reader``, a
    pickle file opened read-only), it needs no lock and writes nothing, so it reads
    beside a running writer and on a read-only file; ``CheckpointStore`` adds writes.
    (The public ``snapperable.reader.CheckpointReader`` is built on it.)"""

    @property
    def path(self) -> str:
        """The checkpoint file's absolute path."""
        ...

    def versions(self) -> list[VersionRow]:
        """Every known function version, oldest first."""
        ...

    def key_set(self, version: Optional[int], status: int) -> KeySet:
        """Keys whose latest row for ``version`` has ``status``.

        ``version=None``: keys whose latest row, for some version, has ``status``.
        """
        ...

    def key_sets(self, version: int) -> tuple[KeySet, KeySet]:
        """``(ok, failed)``: ``key_set(version, STATUS_OK)`` and ``key_set(version,
        STATUS_FAILED)`` from one read of the checkpoint."""
        ...

    def outputs_for(self, version: int, keys: bytes) -> list[Any]:
        """Unpickled outputs of the latest ok row of each key, in the order of ``keys``.

        Keys without an ok row are left out; a key given twice gives its output twice.
        """
        ...

    def all_outputs(self, version: int) -> list[Any]:
        """Unpickled latest ok output of every key, in the order each key was first saved."""
        ...

    def rows(self, version: Optional[int], with_output: bool = False) -> Iterator[RowInfo]:
        """Every row (all versions when ``version`` is None), in the order saved,
        streamed; with its pickled output when ``with_output``."""
        ...

    def meta(self) -> dict[str, str]:
        """What the file says of itself: ``format_version``, and ``created_by`` where
        the format keeps it (SQLite's ``meta`` table)."""
        ...

    def integrity_check(self) -> Optional[str]:
        """The first damage to the file's structure (SQLite: ``PRAGMA
        integrity_check`` over every page; pickle: every frame's checksums), or None."""
        ...

    def close(self) -> None:
        """Release the file (a store first flushes and stops its writer). Idempotent."""
        ...


class CheckpointStore(CheckpointReader, Protocol):
    """An open checkpoint: the pending buffer, its writer, and reads.

    ``record`` only buffers; a background writer commits what has accumulated (group
    commit) once ``batch_size`` rows are pending, once the oldest has waited
    ``max_wait_time`` seconds, or on ``flush``. A writer failure is raised, as
    ``WriterError``, by the next ``record``, ``flush`` or ``close``; it is never dropped.
    """

    def add_version(self, fingerprint: str, parts: str, uses: Optional[int]) -> int:
        """Register a version (committed at once); ``uses=None`` means its own id."""
        ...

    def record(self, row: ItemRow) -> None: ...

    def process(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        keys: bytes,
        positions: Sequence[int],
        version: int,
    ) -> Optional[ProcessStop]:
        """The hot loop: for each ``p`` in ``positions``, in order, call ``fn(items[p])``,
        pickle the output (protocol 4) and record an ok row for key
        ``keys[16*p:16*p+16]`` (attempts 1, Unix start and end times).

        Returns None once all are recorded. At the first exception, from ``fn`` or from
        pickling its output, it stops and returns ``(index, started, exception,
        raised_by_pickling, output)``: ``index`` into ``positions`` of the item that
        raised (the ones before it are recorded), when it started, and the output
        ``fn`` returned when pickling it raised (else None). The Snapper handles
        failures (retries, skipping) and calls again with the positions after it.
        """
        ...

    def flush(self) -> None:
        """Return once every recorded row is committed (durable per the store's setting)."""
        ...

    def unsaved(self) -> int:
        """Rows recorded but not yet committed: what a crash now would lose of them.

        The concurrent engine keeps this, with the items it has taken, within its
        window (docs/architecture.md 7)."""
        ...

    def fold_wal_into_file(self) -> None:
        """Flush, then make the file hold every committed row by itself: SQLite copies
        its WAL into the database file (``wal_checkpoint(TRUNCATE)``); a pickle file
        always does. Before the file is moved, or once it was moved under the run."""
        ...


class Backend(Protocol):
    """What each backend module provides at module level."""

    BACKEND_NAME: str

    def input_key(self, obj: object) -> bytes: ...

    def input_keys(self, objs: Sequence[object]) -> bytes:
        """The keys of ``objs`` concatenated, ``KEY_SIZE`` bytes each."""
        ...

    def new_key_set(self) -> KeySet: ...

    def open_sqlite(
        self,
        path: str,
        synchronous: Synchronous,
        batch_size: int,
        max_wait_time: Optional[float],
    ) -> CheckpointStore:
        """Open (creating with mode 0600 if missing) a SQLite checkpoint at ``path``."""
        ...

    def open_sqlite_reader(self, path: str) -> Optional[CheckpointReader]:
        """Open the existing SQLite checkpoint at ``path`` for reading only. None for a
        database made but never initialized (what a creation cut short by a crash
        leaves, and what ``open_sqlite`` initializes): nothing is saved in it."""
        ...
