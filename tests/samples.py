"""Values and item rows shared by the store tests (contract, differential, Rust core).

The fixtures that open stores are in ``conftest.py``; this module holds what the tests
build and compare: sample value types, item rows, and what a store reads back.
"""

from __future__ import annotations

import enum
import pickle
import sqlite3
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapperable import keys
from snapperable._contract import STATUS_FAILED, STATUS_OK, CheckpointStore, ItemRow


class Color(enum.IntEnum):
    RED = 1
    GREEN = 2


class Name(str):
    pass


@dataclass(frozen=True)
class Point:
    x: int
    label: str


class ExplodingReduce:
    """Raises ``exc`` when pickled."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> Any:
        raise self.exc


def key(i: int) -> bytes:
    return keys.input_key(i)


def ok_row(i: int, version: int, output: object) -> ItemRow:
    return (key(i), version, STATUS_OK, None, pickle.dumps(output, protocol=4),
            None, None, None, 1, 100.0 + i, 101.0 + i)


def failed_row(i: int, version: int) -> ItemRow:
    return (key(i), version, STATUS_FAILED, pickle.dumps(i, protocol=4), None,
            "ValueError", f"bad {i}", "Traceback ...", 3, 100.0 + i, 101.0 + i)


def saved(store: CheckpointStore, version: int) -> list[Any]:
    """Every output of ``version``, once all recorded rows are committed."""
    store.flush()
    return list(store.all_outputs(version))


def saved_pickles(path: Path, version: int) -> list[bytes]:
    """The output pickles of ``version`` as the file holds them, read with sqlite3."""
    conn = sqlite3.connect(str(path))
    try:
        return [row[0] for row in conn.execute("SELECT output FROM items WHERE version = ? ORDER BY seq",
                                               (version,))]
    finally:
        conn.close()


def fill(store: CheckpointStore) -> tuple[int, int]:
    """Two versions with superseding rows; returns the version ids."""
    v1 = store.add_version("fp-1", '{"body": "a"}', None)
    v2 = store.add_version("fp-2", '{"body": "b"}', v1)
    for row in [
        ok_row(1, v1, "one"),
        failed_row(2, v1),
        ok_row(3, v1, {"three": 3}),
        ok_row(2, v1, "two"),  # supersedes the failure
        failed_row(3, v1),  # supersedes the success
        ok_row(4, v2, [4]),
        ok_row(1, v1, "one again"),  # a later output replaces the first
    ]:
        store.record(row)
    store.flush()
    return v1, v2


def snapshot(store: CheckpointStore, v1: int, v2: int) -> dict[str, Any]:
    """Everything a store reads back after ``fill``, in comparable form."""
    wanted = key(3) + key(1) + key(9) + key(1) + key(2)
    return {
        "versions": [(v.id, v.fingerprint, v.parts, v.uses) for v in store.versions()],
        "outputs_for": store.outputs_for(v1, wanted),
        "all_v1": store.all_outputs(v1),
        "all_v2": store.all_outputs(v2),
        "rows": list(store.rows(None)),
        "rows_v2": list(store.rows(v2)),
        "ok_v1": sorted(store.key_set(v1, STATUS_OK)),
        "failed_v1": sorted(store.key_set(v1, STATUS_FAILED)),
        "ok_any": sorted(store.key_set(None, STATUS_OK)),
        "key_sets_v1": [sorted(keys) for keys in store.key_sets(v1)],
        "key_sets_v2": [sorted(keys) for keys in store.key_sets(v2)],
    }


def same(a: object, b: object) -> bool:
    """Equal, of the same type, and the same float bits (nan, -0.0)."""
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    return type(a) is type(b) and a == b


# Run as a child process with the checkpoint's path: holds SQLite's write lock (so a
# writer's commit waits in the busy timeout) until a line arrives on its stdin. Another
# process, not a thread: POSIX locks do not exclude connections of one process that use
# two copies of SQLite (the Rust core bundles its own).
HOLD_WRITE_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""
