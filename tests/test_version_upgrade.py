"""Upgrading snapperable never reprocesses an unchanged function (docs/architecture.md 5, issue 9).

tests/fixtures/ holds checkpoints written by an earlier release (fingerprint scheme 1,
see MANIFEST.json) from the functions of tests/fixture_functions.py, which are never
edited. Opened with today's code and the same function, each resumes with zero rework.
Each test works on a copy, so the committed files never change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import pytest

import fixture_functions
from snapperable import PickleSnapshotStorage, Snapper, SnapshotStorage, SQLiteSnapshotStorage, versioning

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MANIFEST: dict[str, Any] = json.loads((FIXTURES / "MANIFEST.json").read_text())
STORAGE_OF: dict[str, Callable[[str], SnapshotStorage[Any]]] = {
    "db": SQLiteSnapshotStorage,
    "pkl": PickleSnapshotStorage,
}


def fixture_function(name: str) -> Callable[[Any], Any]:
    fn: Callable[[Any], Any] = eval(MANIFEST["fixtures"][name]["function"], {"ff": fixture_functions})
    return fn


def test_the_fixtures_come_from_an_earlier_scheme() -> None:
    assert MANIFEST["scheme"] < versioning.SCHEME
    assert len(MANIFEST["fixtures"]) >= 4


@pytest.mark.parametrize("suffix", sorted(STORAGE_OF))
@pytest.mark.parametrize("name", sorted(MANIFEST["fixtures"]))
def test_an_earlier_release_s_checkpoint_resumes_with_no_rework(
    name: str, suffix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fixture = MANIFEST["fixtures"][name]
    committed = FIXTURES / fixture["files"][suffix]
    committed_digest = hashlib.sha256(committed.read_bytes()).hexdigest()
    copy = tmp_path / committed.name
    shutil.copyfile(committed, copy)
    items, outputs = MANIFEST["items"], fixture["outputs"]
    opened = time.time()

    with caplog.at_level(logging.INFO, logger="snapperable"):
        snapper = Snapper(items, fixture_function(name), snapshot_storage=STORAGE_OF[suffix](str(copy)))
        plan = snapper.plan()
        assert (plan.done, plan.to_process, plan.version_changes) == (len(items), 0, [])
        snapper.start()
    assert snapper.load() == outputs
    metrics = snapper.load_metrics()
    assert len(metrics) == len(items)
    assert all(metric.ended < opened for metric in metrics)  # every row is the old release's
    assert "earlier fingerprint scheme" in caplog.text
    assert [r.levelname for r in caplog.records] == ["INFO"]  # adopted, nothing to warn of

    # start() recorded the version under today's scheme: the next run finds it by digest
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="snapperable"):
        again = Snapper(items + [9], fixture_function(name), snapshot_storage=STORAGE_OF[suffix](str(copy)))
        assert again.plan().to_process == 1
        again.start()
    assert again.load()[:-1] == outputs
    assert "earlier fingerprint scheme" not in caplog.text
    assert hashlib.sha256(committed.read_bytes()).hexdigest() == committed_digest


@pytest.mark.parametrize("suffix", sorted(STORAGE_OF))
def test_an_edit_since_the_earlier_release_still_reprocesses(
    suffix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Adoption compares what both schemes cover: another size is another version."""
    fixture = MANIFEST["fixtures"]["bound_method"]
    copy = tmp_path / fixture["files"][suffix]
    shutil.copyfile(FIXTURES / fixture["files"][suffix], copy)
    with caplog.at_level(logging.INFO, logger="snapperable"):
        snapper = Snapper(
            MANIFEST["items"], fixture_functions.Scorer("small").score, snapshot_storage=STORAGE_OF[suffix](str(copy))
        )
        plan = snapper.plan()
        snapper.start()
    assert (plan.stale, plan.version_changes) == (len(MANIFEST["items"]), ["attributes of the bound instance changed"])
    assert snapper.load() == [f"small:{x * 5}" for x in MANIFEST["items"]]
    assert "earlier fingerprint scheme" not in caplog.text
    assert "attributes of the bound instance changed" in caplog.text
