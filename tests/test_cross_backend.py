"""A checkpoint written by one backend is resumed by the other, in a separate process,
with zero rework (docs/architecture.md 3: both backends read and write the same files)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BACKENDS, once

CHILD = """
import sys
from snapperable import Snapper, SQLiteSnapshotStorage, backend

path, count, calls_path, expect = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
assert backend == expect, (backend, expect)

def fn(item):
    with open(calls_path, "a") as calls:
        calls.write(f"{item[0]}\\n")
    return {"n": item[0], "square": item[0] ** 2, "tag": item[1]}

items = [(i, {"tag": f"t{i % 7}", "vals": [i, -i, 0.5 * i]}) for i in range(count)]
with Snapper(items, fn, snapshot_storage=SQLiteSnapshotStorage(path)) as snapper:
    snapper.start()
    results = snapper.load()
assert [r["n"] for r in results] == list(range(count)), results[:3]
"""

both_backends = pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")


def run_child(tmp_path: Path, backend_name: str, count: int) -> list[int]:
    """Run the child with ``backend_name``; return the items it processed."""
    # One calls file for all runs: fn reads its name as a global, so the name is part
    # of the function version and must not change between runs.
    calls = tmp_path / "calls.txt"
    before = len(calls.read_text().split()) if calls.exists() else 0
    script = tmp_path / "child.py"  # one file, so both runs see the same function version
    script.write_text(CHILD)
    env = dict(os.environ, SNAPPERABLE_BACKEND=backend_name)
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run.db"), str(count), str(calls), backend_name],
        env=env, check=True, timeout=120,
    )
    return [int(line) for line in calls.read_text().split()[before:]] if calls.exists() else []


@both_backends
@once  # the children choose their backends
@pytest.mark.parametrize(("first", "second"), [("rust", "python"), ("python", "rust")])
def test_resume_across_backends_with_zero_rework(tmp_path: Path, first: str, second: str) -> None:
    assert run_child(tmp_path, first, 600) == list(range(600))
    assert run_child(tmp_path, second, 1000) == list(range(600, 1000))
    assert run_child(tmp_path, first, 1000) == []
    assert run_child(tmp_path, second, 1000) == []
