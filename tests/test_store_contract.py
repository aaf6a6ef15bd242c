"""The backend contract on an open SQLite checkpoint store, once per backend.

What ``CheckpointStore`` in ``snapperable._contract`` promises, checked on the store
each backend's ``open_sqlite`` returns (the ``store`` and ``open_store`` fixtures of
``conftest.py``): reads after writes, superseding rows, the per-item ``process`` loop,
the bounded pending buffer, writer failures, damaged and foreign files. That the two
backends agree with each other byte for byte is ``test_differential.py``'s concern.
"""

from __future__ import annotations

import gc
import math
import os
import pickle
import sqlite3
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest

import snapperable
from conftest import StoreOpener
from crash_child import writer_process_forced
from samples import (
    HOLD_WRITE_LOCK,
    Color,
    Name,
    Point,
    failed_row,
    fill,
    key,
    ok_row,
    same,
    saved,
    saved_pickles,
    snapshot,
)
from snapperable import keys
from snapperable._contract import STATUS_FAILED, STATUS_OK, CheckpointStore, RowInfo, VersionRow
from snapperable._row_checksum import plain_ok_checksum, version_checksum
from snapperable.errors import CheckpointCorruptError, CheckpointError, CheckpointFormatError, WriterError


def test_round_trip(store: CheckpointStore) -> None:
    v1, v2 = fill(store)
    got = snapshot(store, v1, v2)
    assert all(isinstance(v, VersionRow) for v in store.versions())
    assert got["versions"] == [(v1, "fp-1", '{"body": "a"}', v1), (v2, "fp-2", '{"body": "b"}', v1)]
    assert got["outputs_for"] == ["one again", "one again", "two"]
    assert got["all_v1"] == ["one again", "two"]  # key 3's latest row failed
    assert got["all_v2"] == [[4]]
    assert all(isinstance(r, RowInfo) for r in got["rows"])
    assert [r.seq for r in got["rows"]] == list(range(1, 8))
    assert got["rows"][1] == RowInfo(2, key(2), v1, STATUS_FAILED, pickle.dumps(2, protocol=4),
                                     "ValueError", "bad 2", "Traceback ...", 3, 102.0, 103.0)
    assert [r.key for r in got["rows_v2"]] == [key(4)]
    assert got["ok_v1"] == sorted([key(1), key(2)])
    assert got["failed_v1"] == [key(3)]
    assert got["ok_any"] == sorted([key(1), key(2), key(4)])
    assert got["key_sets_v1"] == [got["ok_v1"], got["failed_v1"]]
    assert got["key_sets_v2"] == [[key(4)], []]


SIMPLE_VALUES: list[object] = [
    0, 1, 255, 256, 65535, 65536, -1, -255, -256, 2**31 - 1, 2**31, -2**31, -2**31 - 1,
    2**62, 2**63 - 1, 2**63, -2**63, -2**63 - 1, 2**200, -2**200,
    0.0, -0.0, 1.5, -1e300, 5e-324, math.inf, -math.inf, math.nan,
    None, True, False, "", "hi", "h\u00e9", "\U0001f600", "x" * 255, "x" * 256, "\ud800",
    b"", b"bytes", [], [1], (1, 2), {"a": 1}, Color.RED, Name("sub"), 1 + 2j,
]


@pytest.mark.parametrize("path", ["in order", "general"])
def test_loads_read_simple_outputs_exactly_as_pickle_does(store: CheckpointStore, path: str) -> None:
    """Ints, floats, None, bools and short strs are read without pickle.loads by the Rust
    core: the values must be the very ones pickle.loads gives, and everything else
    unpickled."""
    version = store.add_version("fp", "{}", None)
    for i, value in enumerate(SIMPLE_VALUES):
        store.record(ok_row(i, version, value))
    if path == "general":  # a superseding row sends the load the general way
        store.record(ok_row(0, version, 0))
    store.flush()
    keys_blob = b"".join(key(i) for i in range(len(SIMPLE_VALUES)))
    for got in (store.outputs_for(version, keys_blob), store.all_outputs(version)):
        assert len(got) == len(SIMPLE_VALUES)
        for value, read in zip(SIMPLE_VALUES, got):
            assert same(pickle.loads(pickle.dumps(value, protocol=4)), read), (value, read)


def test_new_file_is_private_and_says_who_made_it(tmp_path: Path, open_store: StoreOpener) -> None:
    open_store("fresh.db").close()
    path = tmp_path / "fresh.db"
    assert path.stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == 1399742800
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        meta = dict(conn.execute("SELECT name, value FROM meta"))
    conn.close()
    assert meta == {"format_version": "2", "created_by": f"snapperable {snapperable.__version__}"}


def test_rows_iterate_across_pages(open_store: StoreOpener) -> None:
    store = open_store(batch_size=500)
    version = store.add_version("fp", "{}", None)
    for i in range(2500):
        store.record(ok_row(i, version, i))
    store.flush()
    rows = store.rows(version)
    assert iter(rows) is rows
    assert [row.seq for row in rows] == list(range(1, 2501))
    assert store.all_outputs(version) == list(range(2500))


def test_unsaved_counts_recorded_rows_until_committed(open_store: StoreOpener) -> None:
    store = open_store(batch_size=10_000)  # nothing starts a commit but a flush
    version = store.add_version("fp", "{}", None)
    assert store.unsaved() == 0
    for i in range(7):
        store.record(ok_row(i, version, i))
    assert store.unsaved() == 7
    store.flush()
    assert store.unsaved() == 0
    assert len(store.key_set(version, STATUS_OK)) == 7


def test_records_from_many_threads_are_all_saved(store: CheckpointStore) -> None:
    version = store.add_version("fp", "{}", None)

    def work(start: int) -> None:
        for i in range(start, start + 300):
            store.record(ok_row(i, version, i))

    threads = [threading.Thread(target=work, args=(n * 1000,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.flush()
    assert len(store.key_set(version, STATUS_OK)) == 1200


def test_max_wait_time_commits_without_flush(open_store: StoreOpener) -> None:
    store = open_store(batch_size=10_000, max_wait_time=0.05)
    version = store.add_version("fp", "{}", None)
    store.record(ok_row(1, version, 1))
    deadline = time.monotonic() + 10
    while len(store.key_set(version, STATUS_OK)) == 0:
        assert time.monotonic() < deadline, "the row was never committed"
        time.sleep(0.01)


def _drop_items_table(path: Path) -> None:
    """Another process (so another SQLite library instance, as a user's tool would be)
    drops the table under the open checkpoint."""
    drop = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('DROP TABLE items'); c.commit()"
    subprocess.run([sys.executable, "-c", drop, str(path)], check=True)


def test_writer_failure_is_raised_as_writer_error(tmp_path: Path, store: CheckpointStore) -> None:
    version = store.add_version("fp", "{}", None)
    _drop_items_table(tmp_path / "run.db")
    store.record(ok_row(1, version, 1))
    with pytest.raises(WriterError) as info:
        store.flush()
    assert str(tmp_path / "run.db") in str(info.value)
    assert "no such table" in str(info.value)
    assert isinstance(info.value.__cause__, CheckpointError)
    with pytest.raises(WriterError):
        store.record(ok_row(2, version, 2))  # nothing after a failure can be saved
    with pytest.raises(WriterError):
        store.close()
    store.close()  # idempotent


def test_non_database_file_is_corrupt_and_kept(tmp_path: Path, open_store: StoreOpener) -> None:
    path = tmp_path / "notes.db"
    text = b"not a database, but precious\n" * 100
    path.write_bytes(text)
    with pytest.raises(CheckpointCorruptError) as info:
        open_store("notes.db")
    assert str(path) in str(info.value)
    assert path.read_bytes() == text


def test_foreign_database_and_newer_format_are_refused(tmp_path: Path, open_store: StoreOpener) -> None:
    with sqlite3.connect(tmp_path / "other.db") as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(CheckpointCorruptError, match="is not a snapperable checkpoint"):
        open_store("other.db")

    open_store("newer.db").close()
    conn = sqlite3.connect(tmp_path / "newer.db")
    conn.execute("PRAGMA user_version = 3")
    conn.close()
    with pytest.raises(CheckpointFormatError, match="newer.db"):
        open_store("newer.db")


def test_damaged_rows_are_corrupt(tmp_path: Path, open_store: StoreOpener) -> None:
    open_store("bad.db").close()
    conn = sqlite3.connect(tmp_path / "bad.db")
    # Written so (its checksum matches), not damaged on disk: still not an output.
    conn.execute("INSERT INTO items (key, version, status, output, attempts, started, ended, checksum)"
                 " VALUES (?, 1, 0, ?, 1, 0, 0, ?)",
                 (key(1), b"not a pickle", plain_ok_checksum(key(1), 1, 0.0, 0.0, b"not a pickle")))
    conn.commit()
    conn.close()
    store = open_store("bad.db")
    with pytest.raises(CheckpointCorruptError, match="unpickled"):
        store.all_outputs(1)
    store.close()

    conn = sqlite3.connect(tmp_path / "bad.db")
    conn.execute("INSERT INTO items (key, version, status, attempts, started, ended, checksum)"
                 " VALUES (x'00', 1, 0, 1, 0, 0, 0)")
    conn.commit()
    conn.close()
    with pytest.raises(CheckpointCorruptError, match="16 bytes"):
        open_store("bad.db").key_set(None, STATUS_OK)


def test_damaged_version_record_is_corrupt(tmp_path: Path, open_store: StoreOpener) -> None:
    open_store("v.db").close()
    conn = sqlite3.connect(tmp_path / "v.db")
    # A record whose checksum matches (written so, not damaged on disk) but whose parts
    # are not JSON: still no version.
    record = (1, "fp", "{not json", 1, 0.0)
    conn.execute(
        "INSERT INTO versions (id, fingerprint, parts, uses, created, checksum) VALUES (?, ?, ?, ?, ?, ?)",
        (*record, version_checksum(*record)),
    )
    conn.commit()
    conn.close()
    with pytest.raises(CheckpointCorruptError, match="v.db"):
        open_store("v.db").versions()


def test_closed_store_refuses_work(store: CheckpointStore) -> None:
    store.close()
    store.close()
    with pytest.raises(CheckpointError, match="closed"):
        store.versions()
    with pytest.raises(CheckpointError, match="closed"):
        store.record(ok_row(1, 1, 1))


def test_path_is_the_given_str(tmp_path: Path, store: CheckpointStore) -> None:
    assert store.path == str(tmp_path / "run.db")
    assert os.path.exists(store.path)


# -- process: the per-item hot loop ------------------------------------------------------


def _plus_one(x: int) -> int:
    return x + 1


def test_process_records_rows_in_order(store: CheckpointStore) -> None:
    version = store.add_version("fp", "{}", None)
    items = [10, 11, 12, 13, 14]
    blob = keys.input_keys(items)
    before = time.time()
    assert store.process(_plus_one, items, blob, [4, 0, 2], version) is None
    after = time.time()
    assert store.process(_plus_one, items, blob, [], version) is None
    store.flush()
    rows = list(store.rows(version))
    assert [r.key for r in rows] == [key(14), key(10), key(12)]
    for r in rows:
        assert (r.version, r.status, r.input, r.error_type, r.error, r.traceback, r.attempts) == (
            version, STATUS_OK, None, None, None, None, 1)
        assert before <= r.started <= r.ended <= after
    assert [r.started for r in rows] == sorted(r.started for r in rows)
    assert saved(store, version) == [15, 11, 13]
    assert store.outputs_for(version, blob) == [11, 13, 15]


def test_process_reads_any_sequence(store: CheckpointStore) -> None:
    version = store.add_version("fp", "{}", None)
    blob = keys.input_keys(list(range(6)))
    assert store.process(_plus_one, (0, 1, 2), blob, (2,), version) is None
    assert store.process(_plus_one, range(6), blob, range(3, 5), version) is None
    store.flush()
    assert saved(store, version) == [3, 4, 5]


def test_process_stops_at_an_exception_from_fn(store: CheckpointStore) -> None:
    version = store.add_version("fp", "{}", None)
    raised: list[BaseException] = []

    def fn(x: int) -> int:
        if x == 3:
            raised.append(ValueError(f"bad {x}"))
            raise raised[-1]
        return x * 10

    items = list(range(6))
    blob = keys.input_keys(items)
    before = time.time()
    stop = store.process(fn, items, blob, [0, 1, 3, 4, 5], version)
    after = time.time()
    assert stop is not None
    index, started, exc, by_pickling, output = stop
    assert (index, by_pickling, output) == (2, False, None)
    assert exc is raised[0]
    assert exc.__traceback__ is not None  # the user's frame, for the failure report
    assert before <= started <= after
    # The items before it are recorded, nothing for it or after it.
    assert saved(store, version) == [0, 10]
    # The Snapper goes on after it.
    assert store.process(fn, items, blob, [4, 5], version) is None
    assert saved(store, version) == [0, 10, 40, 50]


def test_process_stops_at_an_unpicklable_output(store: CheckpointStore) -> None:
    version = store.add_version("fp", "{}", None)
    unpicklable = threading.Lock()
    items = [1, 2, 3]
    blob = keys.input_keys(items)
    stop = store.process(lambda x: unpicklable if x == 2 else x, items, blob, [0, 1, 2], version)
    assert stop is not None
    index, _, exc, by_pickling, output = stop
    assert (index, by_pickling) == (1, True)
    assert output is unpicklable
    assert isinstance(exc, TypeError)
    assert saved(store, version) == [1]


def test_process_returns_base_exceptions_too(store: CheckpointStore) -> None:
    version = store.add_version("fp", "{}", None)

    def fn(x: int) -> int:
        raise KeyboardInterrupt

    stop = store.process(fn, [1], key(1), [0], version)
    assert stop is not None and isinstance(stop[2], KeyboardInterrupt)


def test_process_raises_writer_failure_and_closed(tmp_path: Path, open_store: StoreOpener) -> None:
    store = open_store()
    version = store.add_version("fp", "{}", None)
    _drop_items_table(tmp_path / "run.db")
    calls: list[int] = []

    def fn(x: int) -> int:
        calls.append(x)
        return x

    blob = keys.input_keys([0, 1])
    assert store.process(fn, [0, 1], blob, [0], version) is None
    with pytest.raises(WriterError):
        store.flush()
    with pytest.raises(WriterError):
        store.process(fn, [0, 1], blob, [1], version)
    assert calls == [0]  # no call for a row that could not be saved
    with pytest.raises(WriterError):
        store.close()
    other = open_store("other.db")
    other.close()
    with pytest.raises(CheckpointError, match="closed"):
        other.process(fn, [0, 1], blob, [1], version)
    assert calls == [0]


def test_process_keeps_rows_visible_to_the_writer(tmp_path: Path, open_store: StoreOpener) -> None:
    """batch_size=1: each row is committed while the next item runs, not held back."""
    store = open_store(synchronous="normal")
    version = store.add_version("fp", "{}", None)
    reader = sqlite3.connect(str(tmp_path / "run.db"))

    def fn(x: int) -> int:
        deadline = time.monotonic() + 10
        while reader.execute("SELECT count(*) FROM items").fetchone()[0] < x:
            assert time.monotonic() < deadline, f"row {x - 1} not committed while item {x} runs"
            time.sleep(0.001)
        return x

    items = list(range(5))
    try:
        assert store.process(fn, items, keys.input_keys(items), items, version) is None
    finally:
        reader.close()
    assert saved(store, version) == items


def _settled(counter: list[int]) -> int:
    """``counter[0]`` once it has not moved for 0.2 s."""
    last = counter[0]
    while True:
        time.sleep(0.2)
        if counter[0] == last:
            return last
        last = counter[0]


@pytest.mark.parametrize("via", ["record", "process"])
def test_a_lagging_writer_bounds_the_pending_rows(
    tmp_path: Path, open_store: StoreOpener, backend: str, via: str
) -> None:
    """A writer stuck on the disk (here: another connection holds the write lock, so
    its commit waits in the busy timeout) makes the caller wait once the pending buffer
    is full, without the GIL: memory and what a crash can lose stay bounded."""
    if backend == "rust":
        from snapperable import _core

        limit = _core._MAX_PENDING_ROWS
    else:
        from snapperable import _writer

        limit = _writer.MAX_PENDING_ROWS
    assert limit == 16_384
    store = open_store(synchronous="normal")
    version = store.add_version("fp", "{}", None)
    # The writer takes at most one buffer before its commit blocks, and one more fills.
    # (The pure store's writer process pipelines: one buffer may be committing and the
    # next on its way to it.)
    taken = 2 if backend == "python" and writer_process_forced() else 1
    n = (taken + 1) * limit + 500
    done = [0]
    errors: list[BaseException] = []

    def fn(x: int) -> int:
        done[0] += 1
        return x

    def work() -> None:
        try:
            if via == "record":
                for i in range(n):
                    store.record((blob[16 * i : 16 * i + 16], version, STATUS_OK, None, b"\x80\x04K\x00.",
                                  None, None, None, 1, 0.0, 0.0))
                    done[0] += 1
            else:
                assert store.process(fn, items, blob, items, version) is None
        except BaseException as exc:
            errors.append(exc)

    items = list(range(n))
    blob = keys.input_keys(items)
    blocker = subprocess.Popen(
        [sys.executable, "-c", HOLD_WRITE_LOCK, str(tmp_path / "run.db")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert blocker.stdout is not None and blocker.stdin is not None
    assert blocker.stdout.readline() == "locked\n"
    worker = threading.Thread(target=work)
    try:
        worker.start()
        # This thread keeps running: the caller waits with the GIL released.
        stuck = _settled(done)
        assert limit - 1 <= stuck <= (taken + 1) * limit, stuck
        assert worker.is_alive(), errors
    finally:
        blocker.communicate("commit\n")
        worker.join()
    assert errors == []
    store.flush()
    assert len(store.key_set(version, STATUS_OK)) == n


_DUMPED_VALUES: list[object] = SIMPLE_VALUES + [
    2**64, -2**64, 2**64 - 1, -2**64 + 1, -2**31 + 1, -2**15, -129, 127, 128, 4.0, 1e-310,
    False, Color.GREEN, True, "long " * 100,
]


def test_process_pickles_simple_outputs_to_the_bytes_pickle_gives(tmp_path: Path, store: CheckpointStore) -> None:
    """Byte for byte what pickle.dumps(output, 4) gives, so that files do not depend on
    the backend (the Rust core pickles ints, floats, None and bools itself)."""
    version = store.add_version("fp", "{}", None)
    items = list(range(len(_DUMPED_VALUES)))
    assert store.process(_DUMPED_VALUES.__getitem__, items, keys.input_keys(items), items, version) is None
    store.flush()
    expected = [pickle.dumps(value, protocol=4) for value in _DUMPED_VALUES]
    assert saved_pickles(tmp_path / "run.db", version) == expected


def test_process_keeps_no_python_objects(store: CheckpointStore) -> None:
    version = store.add_version("fp", "{}", None)

    class Box:
        def __init__(self, x: int) -> None:
            self.x = x

    items = [Box(i) for i in range(50)]
    refs_before = [sys.getrefcount(item) for item in items]
    outputs: list[Any] = []

    def fn(box: Box) -> Any:
        out = Point(box.x, "o")
        outputs.append(weakref.ref(out))
        return out

    blob = keys.input_keys(list(range(50)))
    assert store.process(fn, items, blob, list(range(50)), version) is None
    stop = store.process(lambda box: threading.Lock(), items, blob, [0], version)
    assert stop is not None
    del stop
    gc.collect()
    assert [sys.getrefcount(item) for item in items] == refs_before
    assert all(ref() is None for ref in outputs)
