"""The fault-injection campaign of ``benches/faults.py`` in a reduced, seeded form: random
byte flips and truncations of SQLite and pickle checkpoints, on every backend here.
None may be read as good data, written into, crash or hang (README "Reliability")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BACKENDS, REPO, once
from crash_child import writer_process_forced

FLIPS = 20
TRUNCATIONS = 6


@once
@pytest.mark.skipif(writer_process_forced(), reason="the same trials as the pass without it, each slower by a process")
def test_no_damaged_checkpoint_is_read_as_good_data(tmp_path: Path) -> None:
    out = tmp_path / "faults.jsonl"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benches" / "faults.py"), "--flips", str(FLIPS), "--truncations",
         str(TRUNCATIONS), "--backends", ",".join(sorted(BACKENDS)), "--seed", "2026", "--timeout", "60",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    bad = [row for row in rows if row["verdict"] not in ("detected", "harmless")]
    assert not bad, "\n".join(map(json.dumps, bad)) + "\n" + proc.stdout[-3000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(rows) == 2 * len(BACKENDS) * (FLIPS + TRUNCATIONS)
    detected = {(row["kind"], row["fault"]) for row in rows if row["verdict"] == "detected"}
    assert {("sqlite", "flip"), ("sqlite", "cut"), ("pickle", "flip")} <= detected, detected
