"""The read-only checkpoint reader (``snapperable.open_checkpoint``) and
``Snapper(store_inputs=True)``, on real files of both backends and both formats."""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Iterator

import pytest

import snapperable
from snapperable import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    PickleSnapshotStorage,
    Snapper,
    SQLiteSnapshotStorage,
    open_checkpoint,
)
from snapperable._contract import STATUS_OK
from snapperable.reader import detect_format, pickle_problem
from snapperable.storage.base import SnapshotStorage
from snapperable.storage.pickle_storage import encode_frame

TESTS = Path(__file__).resolve().parent
PACKAGE_ROOT = Path(snapperable.__file__).resolve().parent.parent


class Flaky:
    """Fails on the items in ``failing`` (a set it is told to clear later)."""

    def __init__(self, failing: set[int]) -> None:
        self.failing = failing

    def __call__(self, x: int) -> dict[str, int]:
        if x in self.failing:
            raise ValueError(f"item {x} is bad")
        return {"x": x, "double": 2 * x}


def triple(x: int) -> int:
    return 3 * x


def build(storage: SnapshotStorage[Any], *, store_inputs: bool = True) -> None:
    """A checkpoint of two versions: v1 over 0..29, where 3, 13, 23 fail first and
    succeed when retried (so their failed rows are superseded) and 7 keeps failing;
    then v2 over 0..9."""
    failing = {3, 7, 13, 23}
    fn = Flaky(failing)
    with Snapper(range(30), fn, snapshot_storage=storage, version="v1", skip_item_errors=True, store_inputs=store_inputs) as s:
        s.start()
    failing.difference_update({3, 13, 23})
    with Snapper(
        range(30), fn, snapshot_storage=storage, version="v1", skip_item_errors=True,
        retry_failed_items=True, store_inputs=store_inputs,
    ) as s:
        s.start()
    with Snapper(range(10), triple, snapshot_storage=storage, version="v2") as s:
        s.start()


@pytest.fixture
def made(storage: SnapshotStorage[Any]) -> SnapshotStorage[Any]:
    build(storage)
    return storage


def v1(storage: SnapshotStorage[Any]) -> Snapper[int, Any]:
    return Snapper(range(30), Flaky(set()), snapshot_storage=storage, version="v1")


def test_format_is_told_by_the_bytes_not_the_name(made: SnapshotStorage[Any], tmp_path: Path) -> None:
    renamed = tmp_path / "no-suffix.pkl.db.txt"
    os.link(made.path, renamed)
    expected = "sqlite" if isinstance(made, SQLiteSnapshotStorage) else "pickle"
    assert detect_format(str(renamed)) == expected
    with open_checkpoint(renamed) as reader:
        assert reader.format == expected
        assert reader.format_version == {"sqlite": 2, "pickle": 1}[expected]
        assert reader.file_size == os.stat(made.path).st_size
        if expected == "sqlite":
            assert reader.created_by == f"snapperable {snapperable.__version__}"
        else:
            assert reader.created_by is None  # the pickle format keeps no creator


def test_versions_log_explains_each_change(made: SnapshotStorage[Any]) -> None:
    with open_checkpoint(made.path) as reader:
        versions = reader.versions()
    assert [(v.id, v.uses) for v in versions] == [(1, 1), (2, 2)]
    assert versions[0].changes == []
    assert versions[1].changes == ["version 'v1' -> 'v2'"]
    assert versions[1].parts["version"] == "v2"


def test_counts_ok_failed_superseded_unique(made: SnapshotStorage[Any]) -> None:
    with open_checkpoint(made.path) as reader:
        first, second = reader.counts()
    assert (first.version, first.rows, first.ok, first.failed, first.superseded) == (1, 34, 29, 1, 4)
    assert first.unique_keys == 30
    assert (second.version, second.rows, second.ok, second.failed, second.superseded) == (2, 10, 10, 0, 0)


def test_items_are_what_load_all_returns_with_inputs(made: SnapshotStorage[Any]) -> None:
    with open_checkpoint(made.path) as reader:
        items = list(reader.items(1))
        superseded = [item for item in reader.items(1, superseded=True) if item.superseded]
        latest = list(reader.items())  # the version used last: v2
        everything = list(reader.items(all_versions=True))
    ok = [item for item in items if item.ok]
    assert [item.output() for item in ok] == v1(made).load_all()
    assert len(items) == 30 and all(not item.superseded for item in items)
    assert [item.input() for item in items] == list(range(30))  # where first saved
    assert {item.input() for item in superseded} == {3, 7, 13, 23}
    assert all(not item.ok for item in superseded)
    (failed,) = [item for item in items if not item.ok]
    assert (failed.input(), failed.status, failed.error, failed.attempts) == (7, "failed", "item 7 is bad", 1)
    assert failed.error_type == "builtins.ValueError" and "ValueError" in (failed.traceback or "")
    assert failed.output() is None
    assert [item.output() for item in latest] == [3 * x for x in range(10)]
    assert len(everything) == 40
    assert [item.version for item in everything] == [1] * 30 + [2] * 10
    assert all(len(item.key_hex) == 32 and item.ended >= item.started for item in everything)


def test_store_inputs_off_keeps_ok_rows_without_input(storage: SnapshotStorage[Any]) -> None:
    build(storage, store_inputs=False)
    with open_checkpoint(storage.path) as reader:
        items = list(reader.items(1))
    assert all(item.has_input == (not item.ok) for item in items)
    assert [item.input() for item in items if not item.ok] == [7]


def test_store_inputs_keeps_inputs_through_retries_and_unpicklable_inputs(storage: SnapshotStorage[Any]) -> None:
    calls: dict[int, int] = {}

    def once_flaky(x: Any) -> int:
        value = x if isinstance(x, int) else -1
        calls[value] = calls.get(value, 0) + 1
        if value == 2 and calls[value] == 1:
            raise ConnectionError("blip")
        return value

    items: list[Any] = [0, 1, 2, (lambda: None)]  # a lambda cannot be pickled
    with Snapper(
        items, once_flaky, snapshot_storage=storage, store_inputs=True, retries=1,
        retry_backoff=0, key=lambda x: x if isinstance(x, int) else "fn",
    ) as s:
        s.start()
        assert s.load() == [0, 1, 2, -1]
        metrics = s.load_metrics()
    assert [m.input_item for m in metrics[:3]] == [0, 1, 2]
    with open_checkpoint(storage.path) as reader:
        rows = list(reader.items())
    assert [(row.input(), row.attempts) for row in rows[:3]] == [(0, 1), (1, 1), (2, 2)]
    assert rows[3].ok and not rows[3].has_input


def test_failures_grouped_by_type(storage: SnapshotStorage[Any]) -> None:
    def picky(x: int) -> int:
        if x % 5 == 0:
            raise KeyError(x)
        if x % 7 == 0:
            raise ValueError(x)
        return x

    with Snapper(range(1, 36), picky, snapshot_storage=storage, skip_item_errors=True) as s:
        s.start()
    with open_checkpoint(storage.path) as reader:
        groups = reader.failures()
    assert list(groups) == ["builtins.KeyError", "builtins.ValueError"]  # most frequent first
    assert [item.input() for item in groups["builtins.KeyError"]] == [5, 10, 15, 20, 25, 30, 35]
    assert [item.input() for item in groups["builtins.ValueError"]] == [7, 14, 21, 28]


def test_metrics_and_report_are_the_snappers(made: SnapshotStorage[Any]) -> None:
    with v1(made) as s:
        expected = s.load_metrics()
    with open_checkpoint(made.path) as reader:
        metrics = reader.metrics(1)
        report = reader.report(1, "json")
        markdown = reader.report(1)
    assert metrics == expected
    assert json.loads(report)["failed_count"] == 1 and "covers" in json.loads(report)
    assert "failed" in markdown and markdown.startswith("#")


def test_unknown_version_is_a_clear_error(made: SnapshotStorage[Any]) -> None:
    with open_checkpoint(made.path) as reader:
        with pytest.raises(ValueError, match=r"no version 9 \(known: 1, 2\)"):
            list(reader.items(9))


def test_reading_writes_nothing_and_takes_no_lock(made: SnapshotStorage[Any]) -> None:
    lock = Path(made.path + ".lock")
    lock.unlink()
    directory = Path(made.path).parent
    before = sorted(p.name for p in directory.iterdir())
    content = Path(made.path).read_bytes()
    with open_checkpoint(made.path) as reader:
        list(reader.items(all_versions=True))
        reader.counts(), reader.metrics(), reader.report(), reader.versions(), reader.failures()
        assert reader.check() is None
        assert reader.holder() is None
        assert not lock.exists()
    assert sorted(p.name for p in directory.iterdir()) == before
    assert Path(made.path).read_bytes() == content


def test_check_names_a_damaged_stored_pickle(storage: SnapshotStorage[Any]) -> None:
    with Snapper(range(5), triple, snapshot_storage=storage) as s:
        s.start()
    checkpoint = storage.open(1, None)
    try:
        key = b"k" * 16
        checkpoint.store.record((key, 1, STATUS_OK, None, b"\x80\x04garbage", None, None, None, 1, 0.0, 1.0))
        checkpoint.store.flush()
    finally:
        checkpoint.close()
    with open_checkpoint(storage.path) as reader:
        problem = reader.check()
    assert problem is not None
    assert storage.path in problem and "item row 6" in problem and "STOP" in problem


def test_pickle_problem_reads_framing_only() -> None:
    assert pickle_problem(pickle.dumps({"a": [1, 2]}, 4)) is None
    assert pickle_problem(pickle.dumps(None, 4)) is None
    assert pickle_problem(b"not a pickle") is not None
    good = pickle.dumps(list(range(100)), 4)
    assert pickle_problem(good[:-1]) is not None  # cut short: no STOP
    assert "frame" in (pickle_problem(good[:20] + b".") or "")


def test_check_finds_a_flipped_byte_in_a_pickle_frame(tmp_path: Path) -> None:
    storage = PickleSnapshotStorage[int](str(tmp_path / "run.pkl"))
    for n in (5, 10):  # two runs: two frames of items at least
        with Snapper(range(n), triple, snapshot_storage=storage) as s:
            s.start()
    data = bytearray(Path(storage.path).read_bytes())
    data[40] ^= 0xFF  # inside the first frame, far from the tail
    Path(storage.path).write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError):
        with open_checkpoint(storage.path) as reader:
            raise AssertionError(reader.check() or "no damage found")


def test_a_torn_tail_is_read_as_the_end(tmp_path: Path) -> None:
    storage = PickleSnapshotStorage[int](str(tmp_path / "run.pkl"))
    with Snapper(range(5), triple, snapshot_storage=storage) as s:
        s.start()
    torn = encode_frame(("items", []))[:-3]
    with open(storage.path, "ab") as file:
        file.write(torn)
    with open_checkpoint(storage.path) as reader:
        assert [item.output() for item in reader.items()] == [0, 3, 6, 9, 12]
        assert reader.check() is None
        assert reader.torn_tail_bytes() == len(torn)
    assert os.path.getsize(storage.path) > 16 + len(torn)  # nothing was cut off by reading


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "text", "foreign-sqlite"])
def test_not_a_checkpoint_is_refused_untouched(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "thing"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello\n" * 100)
    elif kind == "foreign-sqlite":
        with sqlite3.connect(path) as conn:  # python's sqlite3 on a file no Snapper opens
            conn.execute("CREATE TABLE t (x)")
        conn.close()
    before = sorted(p.name for p in tmp_path.iterdir())
    content = path.read_bytes() if path.is_file() else None
    expected = CheckpointError if kind in ("missing", "directory") else CheckpointCorruptError
    with pytest.raises(expected) as raised:
        open_checkpoint(path)
    assert str(path) in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if content is not None:
        assert path.read_bytes() == content


def test_an_empty_foreign_sqlite_database_gets_no_schema(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 1")  # a header, no tables, application_id 0
    conn.close()
    content = path.read_bytes()
    with pytest.raises(CheckpointCorruptError, match="not a snapperable checkpoint"):
        open_checkpoint(path)
    assert path.read_bytes() == content


def test_a_newer_format_is_only_named(tmp_path: Path) -> None:
    storage = PickleSnapshotStorage[int](str(tmp_path / "run.pkl"))
    with Snapper(range(3), triple, snapshot_storage=storage) as s:
        s.start()
    data = bytearray(Path(storage.path).read_bytes())
    data[8:12] = (99).to_bytes(4, "little")
    Path(storage.path).write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="format version 99, newer"):
        open_checkpoint(storage.path)


def test_reader_is_lazy_and_import_stays_light() -> None:
    code = (
        "import sys, snapperable\n"
        "heavy = [m for m in ('snapperable.reader', 'snapperable.cli', 'snapperable.export',"
        " 'snapperable.compact', 'pyarrow', 'csv') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from snapperable import open_checkpoint\n"
        "assert 'snapperable.reader' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_child_env())


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), str(TESTS)])
    return env


LIVE_CHILD = """
import sys, time
from snapperable import Snapper, SQLiteSnapshotStorage, PickleSnapshotStorage
kind, path = sys.argv[1], sys.argv[2]
storage = SQLiteSnapshotStorage(path) if kind == "sqlite" else PickleSnapshotStorage(path)
def slow(x):
    if x == 200:
        print("ready", flush=True)
        sys.stdin.read()  # holds the file, mid-run, until the parent closes stdin
    return x * 3
with Snapper(range(400), slow, snapshot_storage=storage, version="live", store_inputs=True) as s:
    s.start()
"""


@pytest.fixture
def live_writer(storage: SnapshotStorage[Any], backend_env: dict[str, str]) -> Iterator["subprocess.Popen[bytes]"]:
    """A run in another process holding ``storage`` mid-run, 200 items saved."""
    kind = "sqlite" if isinstance(storage, SQLiteSnapshotStorage) else "pickle"
    env = dict(backend_env)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), str(TESTS)])
    proc = subprocess.Popen(
        [sys.executable, "-c", LIVE_CHILD, kind, storage.path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n", proc.communicate()[1]
        yield proc
    finally:
        proc.communicate(timeout=60)


def test_reads_while_another_process_runs(storage: SnapshotStorage[Any], live_writer: "subprocess.Popen[bytes]") -> None:
    # batch_size=1: the items before the one that waits are committed, or soon are.
    deadline = time.monotonic() + 30
    while True:
        with open_checkpoint(storage.path) as reader:
            assert reader.holder() == live_writer.pid
            items = list(reader.items())
            if len(items) == 200 or time.monotonic() > deadline:
                break
        time.sleep(0.05)
    assert [item.output() for item in items] == [3 * x for x in range(200)]
    assert [item.input() for item in items] == list(range(200))
    with open_checkpoint(storage.path) as reader:
        assert reader.check() is None
        assert reader.counts()[0].ok == 200


def test_export_memory_stays_flat(tmp_path: Path) -> None:
    """20,000 outputs of 4 KiB (80 MiB) are exported with a few MiB of Python memory.

    SQLite only: a pickle file is read a frame at a time, and one frame may hold up to
    the writer's pending bound (64 MiB of outputs)."""
    from snapperable import export

    storage = SQLiteSnapshotStorage[str](str(tmp_path / "big.db"))
    blob = "x" * 4096
    with Snapper(range(20_000), lambda x: blob + str(x), snapshot_storage=storage, batch_size=1000) as s:
        s.start()
    with open_checkpoint(storage.path) as reader, open(os.devnull, "w") as sink:
        tracemalloc.start()
        try:
            count = export.write_jsonl(export.records(reader), sink)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert count == 20_000
    assert peak < 16 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_holder_in_this_process_is_this_pid(storage: SnapshotStorage[Any]) -> None:
    with Snapper(range(3), triple, snapshot_storage=storage) as s:
        s.start()
        with open_checkpoint(storage.path) as reader:
            assert reader.holder() == os.getpid()
            assert [item.output() for item in reader.items()] == [0, 3, 6]
    with open_checkpoint(storage.path) as reader:
        assert reader.holder() is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes whatever the mode bits say")
def test_reads_a_read_only_file_in_a_read_only_directory(made: SnapshotStorage[Any]) -> None:
    directory = Path(made.path).parent
    os.chmod(made.path, 0o400)
    os.chmod(directory, 0o500)
    try:
        with open_checkpoint(made.path) as reader:
            assert len(list(reader.items(1))) == 30
    finally:
        os.chmod(directory, 0o700)


def test_store_inputs_with_workers(storage: SnapshotStorage[Any]) -> None:
    with Snapper(range(40), triple, snapshot_storage=storage, store_inputs=True, workers=4) as s:
        s.start()
    with Snapper(range(40, 50), triple, snapshot_storage=storage, workers=4) as s:
        s.start()  # store_inputs off: the engine keeps no input
    with open_checkpoint(storage.path) as reader:
        items = list(reader.items())
    assert sorted(item.input() for item in items if item.has_input) == list(range(40))
    assert all(item.output() == 3 * item.input() for item in items if item.has_input)
    assert len(items) == 50
