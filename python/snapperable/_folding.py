"""Reading an append-only item log: later rows for a (key, version) supersede earlier ones.

The pure-Python SQLite store and the pickle store both fold their rows with these; the
Rust core does the same fold in Rust.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Callable, Iterable, Optional, Sequence

from snapperable._backend import STATUS_FAILED, STATUS_OK, KeySet, VersionRow
from snapperable.errors import CheckpointCorruptError
from snapperable.keys import KEY_SIZE

# (key, version, status) of each row, in the order saved.
KeyStatusRows = Iterable[tuple[bytes, int, int]]
# (key, status, output) of each row of one version, in the order saved.
OutputRows = Iterable[tuple[bytes, int, Optional[bytes]]]


def keys_with_status(
    rows: KeyStatusRows, status: int, new_key_set: Callable[[], KeySet]
) -> KeySet:
    """Keys whose latest row, within its version, has ``status``."""
    latest: dict[tuple[bytes, int], int] = {}
    for key, version, row_status in rows:
        latest[key, version] = row_status
    result = new_key_set()
    for (key, _), row_status in latest.items():
        if row_status == status:
            result.add(key)
    return result


def ok_and_failed(rows: KeyStatusRows, new_key_set: Callable[[], KeySet]) -> tuple[KeySet, KeySet]:
    """Keys whose latest row is ok, and keys whose latest row failed; rows of one version."""
    latest: dict[bytes, int] = {}
    for key, _, row_status in rows:
        latest[key] = row_status
    ok, failed = new_key_set(), new_key_set()
    for key, row_status in latest.items():
        if row_status == STATUS_OK:
            ok.add(key)
        elif row_status == STATUS_FAILED:
            failed.add(key)
    return ok, failed


def latest_outputs(rows: OutputRows) -> dict[bytes, Optional[bytes]]:
    """Each key, in the order first saved -> its latest ok output, or None if it failed."""
    latest: dict[bytes, Optional[bytes]] = {}
    for key, status, output in rows:
        latest[key] = output if status == STATUS_OK else None
    return latest


def version_row(fields: Sequence[object], path: str) -> VersionRow:
    """A ``versions`` row, checked: damage must not pass for a function version."""
    try:
        vid, fingerprint, parts, uses, created = fields
        decoded = json.loads(parts) if isinstance(parts, str) else None
    except ValueError:  # wrong field count, or parts that are not JSON
        decoded = None
    if not (
        isinstance(vid, int)
        and isinstance(fingerprint, str)
        and isinstance(decoded, dict)
        and isinstance(uses, int)
        and isinstance(created, (int, float))
    ):
        raise CheckpointCorruptError(f"{path}: a function version record is damaged: {fields!r}")
    return VersionRow(vid, fingerprint, str(parts), uses, float(created))


def unpickle_output(raw: bytes, path: str) -> Any:
    try:
        return pickle.loads(raw)
    except Exception as exc:
        raise CheckpointCorruptError(f"{path}: a saved output cannot be unpickled: {exc!r}") from exc


def outputs_in_key_order(rows: OutputRows, keys: bytes, path: str) -> list[Any]:
    latest = latest_outputs(rows)
    found = (latest.get(keys[i : i + KEY_SIZE]) for i in range(0, len(keys), KEY_SIZE))
    return [unpickle_output(raw, path) for raw in found if raw is not None]


def outputs_in_save_order(rows: OutputRows, path: str) -> list[Any]:
    return [unpickle_output(raw, path) for raw in latest_outputs(rows).values() if raw is not None]
