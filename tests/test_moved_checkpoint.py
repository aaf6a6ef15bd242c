"""A checkpoint removed or renamed while a run writes to it (issue 11, items 1 and 2):
the run stops with ``WriterError`` naming the file, every row it saved is in the file
that was open (complete by itself once moved, its WAL copied in), and
``move_checkpoint`` is the safe way to start over."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

import snapperable
from snapperable import (
    CheckpointError,
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


# -- item 2: move_checkpoint, the one safe way to start over ------------------------------------
HOLD_AND_DIE = """
import sys, time
from snapperable import Snapper
from snapperable.storage.files import storage_for

def work(x):
    if x == 500:
        print("saved", flush=True)
        time.sleep(600)
    return x * 2

Snapper(range(1000), work, snapshot_storage=storage_for(sys.argv[1]), version="v").start()
"""


def saved_rows(path: str) -> int:
    """Rows committed to a SQLite checkpoint, read without writing (or checkpointing) it."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM items").fetchone()[0])
    finally:
        conn.close()


def test_move_checkpoint_refuses_a_held_one_and_moves_rows_left_in_the_wal(
    tmp_path: Path, backend_env: dict[str, str]
) -> None:
    path = str(tmp_path / "scores.db")
    child = subprocess.Popen([sys.executable, "-c", HOLD_AND_DIE, path], env=backend_env, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"saved\n"
        deadline = time.monotonic() + 30
        while saved_rows(path) < 500:  # the writer commits what came before item 500
            assert time.monotonic() < deadline, "the child's rows were never committed"
            time.sleep(0.01)
        with pytest.raises(CheckpointLockedError, match=str(child.pid)):
            snapperable.move_checkpoint(path, tmp_path / "aside.db")
        assert os.path.exists(path) and not os.path.exists(tmp_path / "aside.db")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert os.path.getsize(path + "-wal") > 0, "the rows should still be in the WAL"
    moved = snapperable.move_checkpoint(path, tmp_path / "aside.db")
    assert moved == str(tmp_path / "aside.db")
    assert sorted(os.listdir(tmp_path)) == ["aside.db", "aside.db.lock"]  # nothing left behind
    with Snapper(range(1000), lambda x: x * 2, snapshot_storage=moved, version="v") as s:
        assert s.load() == [x * 2 for x in range(500)]
    with Snapper(range(3), lambda x: x * 2, snapshot_storage=path, version="v") as fresh:
        assert fresh.plan().new == 3  # a fresh start at the old path


def test_move_checkpoint_refuses_a_checkpoint_held_in_this_process_and_an_existing_target(
    storage: SnapshotStorage[Any], tmp_path: Path
) -> None:
    suffix = Path(storage.path).suffix
    with Snapper(range(5), lambda x: x, snapshot_storage=storage, version="v") as s:
        s.start()
        with pytest.raises(CheckpointLockedError):
            snapperable.move_checkpoint(storage, tmp_path / f"aside{suffix}")
    (tmp_path / f"taken{suffix}").write_bytes(b"mine")
    with pytest.raises(CheckpointError, match="exists"):
        snapperable.move_checkpoint(storage, tmp_path / f"taken{suffix}")
    assert (tmp_path / f"taken{suffix}").read_bytes() == b"mine"
    moved = snapperable.move_checkpoint(storage, tmp_path / f"aside{suffix}")
    assert not os.path.exists(storage.path)
    assert Snapper(range(5), lambda x: x, snapshot_storage=storage_like(storage, moved), version="v").load() == list(range(5))


def test_the_example_fresh_moves_the_checkpoint_with_its_wal(tmp_path: Path, backend_env: dict[str, str]) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "review_scores.py"
    workdir = tmp_path / "run"
    workdir.mkdir()
    reviews = [{"id": f"r{i}", "stars": 1 + i % 5, "text": "great box"} for i in range(20)]
    (workdir / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviews))  # a small dataset
    storage: SQLiteSnapshotStorage[Any] = SQLiteSnapshotStorage(workdir / "scores.db")
    Snapper(range(10), lambda x: x, snapshot_storage=storage, version="v").start()
    done = subprocess.run(
        [sys.executable, str(example), "--dir", str(workdir), "--fresh"],
        env=backend_env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "moved the old checkpoint to" in done.stdout
    (aside,) = [p for p in workdir.iterdir() if p.name.startswith("scores.") and p.name.endswith(".db") and p.name != "scores.db"]
    assert Snapper(range(10), lambda x: x, snapshot_storage=SQLiteSnapshotStorage(aside), version="v").load() == list(range(10))
