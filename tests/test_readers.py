"""Reads never need the writer's lock (issue 11, item 4): load(), load_all(), items(),
plan(), metrics and reports work from another process while a run holds the checkpoint
(SQLite WAL readers; the pickle file's committed frames) and on read-only files and
directories; only start() takes the lock. Real writer processes, real read-only files."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from read_only import read_only
from snapperable import (
    CheckpointError,
    CheckpointLockedError,
    PickleSnapshotStorage,
    Snapper,
    SnapshotStorage,
    SQLiteSnapshotStorage,
)

SUFFIXES = {"sqlite": "db", "pickle": "pkl"}

WRITER = """
import sys
from snapperable import Snapper
from snapperable.storage.files import storage_for

def work(x):
    if x == 300:
        print("ready", flush=True)
        sys.stdin.read()  # holds the checkpoint, mid-run, until the test lets go
    return x * 2

with Snapper(range(1000), work, snapshot_storage=storage_for(sys.argv[1]), version="v") as s:
    s.start()
"""


def double(x: int) -> int:
    return x * 2


@pytest.fixture(params=sorted(SUFFIXES))
def path(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / f"run.{SUFFIXES[request.param]}")


def storage_at(path: str) -> SnapshotStorage[Any]:
    return SQLiteSnapshotStorage(path) if path.endswith(".db") else PickleSnapshotStorage(path)


def test_reads_beside_a_running_writer_in_another_process(path: str, backend_env: dict[str, str]) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, path], env=backend_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == b"ready\n"
        reader = Snapper(range(1000), double, snapshot_storage=storage_at(path), version="v")
        deadline = time.monotonic() + 30
        while len(reader.load()) < 300:  # the writer commits what came before item 300
            assert time.monotonic() < deadline, "the writer's rows never became readable"
            time.sleep(0.01)
        assert reader.load() == [x * 2 for x in range(300)]
        assert reader.load(missing=None)[299:301] == [598, None]
        assert reader.load_all() == [x * 2 for x in range(300)]
        pairs = reader.items()
        assert pairs[0] == (0, 0) and pairs[299] == (299, 598) and pairs[300][1] is not None
        plan = reader.plan()
        assert (plan.done, plan.new) == (300, 700)
        assert len(reader.load_metrics()) == 300
        assert json.loads(reader.generate_report(format="json"))["total_items"] == 300
        with Snapper(range(1000), double, snapshot_storage=storage_at(path), version="v") as in_block:
            assert len(in_block.load()) == 300  # entering `with` takes no lock either
            with pytest.raises(CheckpointLockedError, match=str(writer.pid)):
                in_block.start()  # only start() does
    finally:
        assert writer.stdin is not None
        writer.stdin.close()
        assert writer.wait(timeout=60) == 0
    assert Snapper(range(1000), double, snapshot_storage=storage_at(path), version="v").load() == [
        x * 2 for x in range(1000)
    ]


def test_reading_a_checkpoint_that_does_not_exist_creates_nothing(tmp_path: Path, path: str) -> None:
    s = Snapper([1, 2], double, snapshot_storage=storage_at(path))
    assert s.load() == [] and s.load(missing=0) == [0, 0] and s.plan().new == 2
    assert s.generate_report().startswith("# snapperable report")
    assert list(tmp_path.iterdir()) == []


def _reads_work(path: str, items: int) -> None:
    s = Snapper(range(items), double, snapshot_storage=storage_at(path), version="v")
    assert s.load() == [x * 2 for x in range(items)]
    assert s.load_all() == [x * 2 for x in range(items)]
    assert s.plan().done == items
    assert len(s.load_metrics()) == items and "items: 5" in s.generate_report()
    assert s.items()[0] == (0, 0)


@pytest.mark.parametrize("what", ["file", "directory"])
def test_reads_of_a_read_only_checkpoint(tmp_path: Path, path: str, what: str) -> None:
    Snapper(range(5), double, snapshot_storage=storage_at(path), version="v").start()
    before = sorted(p.name for p in tmp_path.iterdir())
    content = Path(path).read_bytes()
    with read_only(Path(path) if what == "file" else tmp_path):
        _reads_work(path, 5)
        if what == "file" or path.endswith(".db"):  # SQLite must create its -wal to write
            with pytest.raises(CheckpointError) as raised:
                Snapper(range(6), double, snapshot_storage=storage_at(path), version="v").start()
            message = str(raised.value)
            assert path in message and "read-only" in message, message
    assert Path(path).read_bytes() == content
    after = sorted(p.name for p in tmp_path.iterdir())
    assert [name for name in after if name not in before and not name.endswith(("-shm", "-wal"))] == []


def test_reads_of_a_closed_checkpoint_leave_nothing_beside_it(tmp_path: Path, path: str) -> None:
    Snapper(range(5), double, snapshot_storage=storage_at(path), version="v").start()
    before = sorted(p.name for p in tmp_path.iterdir())
    _reads_work(path, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no -wal, -shm or lock file
