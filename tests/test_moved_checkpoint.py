"""A checkpoint removed or renamed while a run writes to it (issue 11, items 1 and 2):
the run stops with ``WriterError`` naming the file, every row it saved is in the file
that was open (complete by itself once moved, its WAL copied in), and
``move_checkpoint`` is the safe way to start over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

import snapperable
from snapperable import (
    CheckpointLockedError,
    PickleSnapshotStorage,
    Snapper,
    SnapshotStorage,
    SQLiteSnapshotStorage,
    WriterError,
)

ITEMS = 3000


def storage_like(storage: SnapshotStorage[Any], path: str) -> SnapshotStorage[Any]:
    """A storage of ``storage``'s kind at ``path``."""
    if isinstance(storage, SQLiteSnapshotStorage):
        return SQLiteSnapshotStorage(path)
    return PickleSnapshotStorage(path)


def work_that(action: Callable[[], None], at: int, calls: list[int]) -> Callable[[int], int]:
    def work(x: int) -> int:
        if x == at:
            action()
        calls.append(x)
        return x * 2

    return work


@pytest.mark.parametrize("with_block", [False, True])
def test_a_checkpoint_renamed_mid_run_raises_and_the_moved_file_has_every_row(
    storage: SnapshotStorage[Any], tmp_path: Path, with_block: bool
) -> None:
    moved = str(tmp_path / f"moved{Path(storage.path).suffix}")
    calls: list[int] = []
    work = work_that(lambda: os.rename(storage.path, moved), 50, calls)
    snapper = Snapper(range(ITEMS), work, snapshot_storage=storage, version="v")
    with pytest.raises(WriterError) as raised:
        if with_block:
            with snapper:
                snapper.start()
        else:
            snapper.start()
    message = str(raised.value)
    assert storage.path in message and "removed or renamed" in message, message
    assert 50 < len(calls) < ITEMS, "the run went on to the end, or stopped before the move"
    with Snapper(range(ITEMS), work, snapshot_storage=storage_like(storage, moved), version="v") as again:
        assert again.load() == [x * 2 for x in calls]  # all of them, none left behind in a -wal


def test_a_checkpoint_removed_mid_run_raises_naming_it(storage: SnapshotStorage[Any]) -> None:
    calls: list[int] = []
    work = work_that(lambda: os.remove(storage.path), 50, calls)
    with pytest.raises(WriterError, match="removed or renamed") as raised:
        Snapper(range(ITEMS), work, snapshot_storage=storage, version="v").start()
    assert storage.path in str(raised.value) and "no longer exists" in str(raised.value)
    assert len(calls) < ITEMS


def test_a_checkpoint_renamed_after_the_last_item_is_reported_by_start(storage: SnapshotStorage[Any], tmp_path: Path) -> None:
    moved = str(tmp_path / f"moved{Path(storage.path).suffix}")
    calls: list[int] = []
    work = work_that(lambda: os.rename(storage.path, moved), 9, calls)
    with pytest.raises(WriterError):
        Snapper(range(10), work, snapshot_storage=storage, version="v").start()
    assert Snapper(range(10), work, snapshot_storage=storage_like(storage, moved), version="v").load() == [
        x * 2 for x in range(10)
    ]
