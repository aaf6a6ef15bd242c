"""Reading an append-only item log: later rows for a (key, version) supersede earlier ones.

The pure-Python SQLite store and the pickle store both fold their rows with these; the
Rust core does the same fold in Rust.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from snapperable._contract import KEY_SIZE, STATUS_FAILED, STATUS_OK, KeySet, VersionRow
from snapperable.errors import CheckpointCorruptError

# (key, version, status) of each row, in the order saved.
KeyStatusRows = Iterable[tuple[bytes, int, int]]
# The stores fold the rows of one version into a dict, key -> value of its latest row
# (`dict(pairs)` does it: a later pair overwrites an earlier one, a later row
# supersedes, while the key keeps the place it was first saved at; given a sqlite3
# cursor, it runs in C). The value is the status, or the output if the row is ok else
# None.


def keys_with_status(
    rows: KeyStatusRows, status: int, new_key_set: Callable[[], KeySet]
) -> KeySet:
    """Keys whose latest row, within its version, has ``status``."""
    latest = {(key, version): row_status for key, version, row_status in rows}
    result = new_key_set()
    for (key, _), row_status in latest.items():
        if row_status == status:
            result.add(key)
    return result


def ok_and_failed(
    latest: Mapping[bytes, int], new_key_set: Callable[[], KeySet]
) -> tuple[KeySet, KeySet]:
    """Keys whose latest row is ok, and keys whose latest row failed."""
    ok, failed = new_key_set(), new_key_set()
    for key, row_status in latest.items():
        if row_status == STATUS_OK:
            ok.add(key)
        elif row_status == STATUS_FAILED:
            failed.add(key)
    return ok, failed


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
        raise CheckpointCorruptError.bad_version_record(path, fields)
    return VersionRow(vid, fingerprint, str(parts), uses, float(created))


def _unpickled(raws: Iterable[Optional[bytes]], path: str) -> list[Any]:
    """The outputs that are there (not None), unpickled; a damaged one is corruption."""
    loads = pickle.loads
    try:
        return [loads(raw) for raw in raws if raw is not None]
    except Exception as exc:
        raise CheckpointCorruptError.unreadable_output(path, exc) from exc


def outputs_in_key_order(latest: Mapping[bytes, Optional[bytes]], keys: bytes, path: str) -> list[Any]:
    found = (latest.get(keys[i : i + KEY_SIZE]) for i in range(0, len(keys), KEY_SIZE))
    return _unpickled(found, path)


def outputs_in_save_order(latest: Mapping[bytes, Optional[bytes]], path: str) -> list[Any]:
    return _unpickled(latest.values(), path)
