"""Input-based tracking, streaming, key=, version policies, argument checks."""

from __future__ import annotations

import logging
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import snapperable
from snapperable import (
    FunctionChangedError,
    Snapper,
    SnapshotStorage,
    SQLiteSnapshotStorage,
    _backend,
)
from snapperable._contract import PICKLE_PROTOCOL, STATUS_FAILED, STATUS_OK
from snapperable.keys import input_key

class Counter:
    """A function that counts its calls; ``version=`` keeps the count out of the fingerprint."""

    def __init__(self, fn: Callable[[Any], Any] = repr) -> None:
        self.fn = fn
        self.calls: list[Any] = []

    def __call__(self, item: Any) -> Any:
        self.calls.append(item)
        return self.fn(item)


def run(storage: SnapshotStorage[Any], items: Any, counter: Counter, **kw: Any) -> list[Any]:
    with Snapper(items, counter, snapshot_storage=storage, version="pinned", **kw) as snapper:
        snapper.start()
        return snapper.load()


def test_grow_shrink_reorder(storage: SnapshotStorage[Any]) -> None:
    counter = Counter(lambda x: x * 10)
    assert run(storage, [1, 2, 3], counter) == [10, 20, 30]
    assert run(storage, [3, 1, 2, 4, 5], counter) == [30, 10, 20, 40, 50]
    assert run(storage, [5, 2], counter) == [50, 20]
    assert counter.calls == [1, 2, 3, 4, 5]


def test_duplicates_processed_once_and_repeated_in_load(storage: SnapshotStorage[Any]) -> None:
    counter = Counter(lambda x: x + 1)
    assert run(storage, [1, 1, 2, 1, 2], counter) == [2, 2, 3, 2, 3]
    assert counter.calls == [1, 2]


def test_unhashable_and_nested_inputs(storage: SnapshotStorage[Any]) -> None:
    items: list[Any] = [
        {"id": 1, "tags": ["a", "b"]},
        [1, [2, [3]]],
        {3, 1, 2},
        {"nested": {"deep": ({"x": 1.5},)}},
        b"raw",
        None,
    ]
    counter = Counter()
    first = run(storage, items, counter)
    assert first == [repr(x) for x in items]
    # equal values built anew (a set in another order, a dict in another insertion order)
    again: list[Any] = [
        {"tags": ["a", "b"], "id": 1},
        [1, [2, [3]]],
        {2, 3, 1},
        {"nested": {"deep": ({"x": 1.5},)}},
        b"raw",
        None,
    ]
    assert run(storage, again, counter) == first
    assert len(counter.calls) == len(items)


def test_key_function_chooses_identity(storage: SnapshotStorage[Any]) -> None:
    counter = Counter(lambda rec: rec["text"].upper())
    records = [{"id": 1, "text": "a", "ts": 1}, {"id": 2, "text": "b", "ts": 2}]
    assert run(storage, records, counter, key=lambda r: r["id"]) == ["A", "B"]
    refreshed = [{"id": 1, "text": "a", "ts": 99}, {"id": 3, "text": "c", "ts": 3}]
    assert run(storage, refreshed, counter, key=lambda r: r["id"]) == ["A", "C"]
    assert [c["id"] for c in counter.calls] == [1, 2, 3]


def test_unkeyable_input_raises_type_error_suggesting_key(storage: SnapshotStorage[Any]) -> None:
    import threading

    with pytest.raises(TypeError, match="key="):
        run(storage, [threading.Lock()], Counter())
    # with key= the same input is fine
    assert run(storage, [threading.Lock()], Counter(lambda _: 1), key=lambda _: "lock") == [1]


def test_generator_is_streamed_and_load_works_after_start(storage: SnapshotStorage[Any]) -> None:
    pulled: list[int] = []

    def generate() -> Iterator[int]:
        for i in range(5000):
            pulled.append(i)
            yield i

    counter = Counter(lambda x: -x)
    with Snapper(generate(), counter, snapshot_storage=storage, version="v") as snapper:
        snapper.start()
        assert snapper.load() == [-i for i in range(5000)]
    assert len(pulled) == 5000  # consumed once, by start(); load() reused its keys


def test_load_after_a_failed_start_on_a_generator_gives_what_it_saved(storage: SnapshotStorage[Any]) -> None:
    """The generator cannot be read again: load() answers from what start() read of it."""

    def fn(x: int) -> int:
        if x == 2500:
            raise ValueError("stop here")
        return -x

    snapper = Snapper((i for i in range(5000)), fn, snapshot_storage=storage, version="v")
    with pytest.raises(ValueError, match="stop here"):
        snapper.start()
    assert snapper.load() == [-i for i in range(2500)]
    with pytest.raises(RuntimeError, match="one-shot iterator"):
        snapper.start()  # still not read twice
    assert snapper.load() == [-i for i in range(2500)]  # the keys it read are kept


def test_generator_is_not_materialised(storage: SnapshotStorage[Any]) -> None:
    """The Snapper pulls items lazily: never more than a chunk ahead of processing."""
    processed = 0
    max_ahead = 0

    def generate() -> Iterator[int]:
        nonlocal max_ahead
        for i in range(10_000):
            max_ahead = max(max_ahead, i - processed)
            yield i

    def fn(x: int) -> int:
        nonlocal processed
        processed += 1
        return x

    with Snapper(generate(), fn, snapshot_storage=storage, version="v") as snapper:
        snapper.start()
    assert processed == 10_000
    assert max_ahead <= snapperable.snapper.CHUNK


def test_context_manager_flushes_with_large_batch(storage: SnapshotStorage[Any]) -> None:
    counter = Counter()
    with Snapper(range(50), counter, snapshot_storage=storage, batch_size=1000, version="v") as s:
        s.start()
    assert Snapper(range(50), counter, snapshot_storage=storage, version="v").load() == [
        repr(i) for i in range(50)
    ]


def test_load_without_start_reads_the_iterable(storage: SnapshotStorage[Any]) -> None:
    run(storage, [1, 2, 3], Counter())
    snapper = Snapper([3, 9, 1], Counter(), snapshot_storage=storage, version="pinned")
    assert snapper.load() == ["3", "1"]


def double(x: int) -> int:
    return x * 2


def triple(x: int) -> int:
    return x * 3


def test_version_policy_reprocess_logs_what_changed(
    storage: SnapshotStorage[Any], caplog: pytest.LogCaptureFixture
) -> None:
    Snapper([1, 2], double, snapshot_storage=storage).start()
    with caplog.at_level(logging.WARNING, logger="snapperable"):
        snapper = Snapper([1, 2], triple, snapshot_storage=storage)
        snapper.start()
    assert snapper.load() == [3, 6]
    assert "reprocessed" in caplog.text and "changed" in caplog.text
    # going back to the first version finds its results again: nothing to redo
    back = Snapper([1, 2], double, snapshot_storage=storage)
    assert back.plan().to_process == 0
    assert back.load() == [2, 4]


def test_version_policy_keep(storage: SnapshotStorage[Any]) -> None:
    Snapper([1, 2], double, snapshot_storage=storage).start()
    kept = Snapper([1, 2, 3], triple, snapshot_storage=storage, on_version_change="keep")
    kept.start()
    assert kept.load() == [2, 4, 9]  # old results kept, the new item made by the new fn
    # the acceptance is remembered: the next run with `triple` needs no policy
    assert Snapper([1, 2, 3], triple, snapshot_storage=storage, on_version_change="raise").load() == [2, 4, 9]


def test_version_policy_raise(storage: SnapshotStorage[Any]) -> None:
    Snapper([1], double, snapshot_storage=storage).start()
    with pytest.raises(FunctionChangedError, match="function body changed"):
        Snapper([1], triple, snapshot_storage=storage, on_version_change="raise").start()
    # nothing was registered by the refused run
    assert Snapper([1], double, snapshot_storage=storage, on_version_change="raise").load() == [2]


def test_pinned_version_ignores_edits_until_bumped(storage: SnapshotStorage[Any]) -> None:
    Snapper([1, 2], double, snapshot_storage=storage, version="v1").start()
    assert Snapper([1, 2], triple, snapshot_storage=storage, version="v1").load() == [2, 4]
    bumped = Snapper([1, 2], triple, snapshot_storage=storage, version="v2")
    bumped.start()
    assert bumped.load() == [3, 6]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"batch_size": 0}, ValueError),
        ({"batch_size": 1.5}, ValueError),
        ({"max_wait_time": -1}, ValueError),
        ({"on_version_change": "ignore"}, ValueError),
        ({"version": [3]}, TypeError),  # a list is not a constant: a tuple is
        ({"version": ("v", object())}, TypeError),
        ({"key": "id"}, TypeError),
        ({"max_consecutive_exceptions": 0}, ValueError),
        ({"retries": -1}, ValueError),
    ],
)
def test_bad_arguments_fail_early(tmp_path: Path, kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        Snapper([1], double, snapshot_storage=SQLiteSnapshotStorage(str(tmp_path / "x.db")), **kwargs)
    assert not (tmp_path / "x.db").exists()


def test_bad_positional_arguments() -> None:
    with pytest.raises(TypeError, match="iterable"):
        Snapper(5, double)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="callable"):
        Snapper([1], 5)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteSnapshotStorage("x.db", synchronous="off")  # type: ignore[arg-type]


def test_synchronous_normal_works(tmp_path: Path) -> None:
    storage: SQLiteSnapshotStorage[int] = SQLiteSnapshotStorage(str(tmp_path / "n.db"), synchronous="normal")
    snapper = Snapper(range(100), double, snapshot_storage=storage)
    snapper.start()
    assert snapper.load() == [2 * i for i in range(100)]


@pytest.mark.parametrize("choice", ["python", "auto"])
def test_backend_selection_by_environment(choice: str, backend_env: dict[str, str]) -> None:
    env = dict(backend_env, SNAPPERABLE_BACKEND=choice)
    out = subprocess.run(
        [sys.executable, "-c", "import snapperable; print(snapperable.backend)"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()
    if choice == "python":
        assert out == "python"
    else:
        assert out in ("rust", "python")


def test_unknown_backend_choice_is_an_import_error(backend_env: dict[str, str]) -> None:
    env = dict(backend_env, SNAPPERABLE_BACKEND="fortran")
    proc = subprocess.run(
        [sys.executable, "-c", "import snapperable"], env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "SNAPPERABLE_BACKEND" in proc.stderr


def test_progress_bar_counts_every_input(storage: SnapshotStorage[Any], capsys: pytest.CaptureFixture[str]) -> None:
    run(storage, range(30), Counter())
    with Snapper(range(50), Counter(), snapshot_storage=storage, version="pinned", progress=True) as snapper:
        snapper.start()
    err = capsys.readouterr().err
    assert "snapperable" in err and "50/50" in err


def test_a_generator_read_once_is_not_silently_reread(storage: SnapshotStorage[Any]) -> None:
    counter = Counter()
    planned = Snapper((i for i in range(5)), counter, snapshot_storage=storage, version="v")
    assert planned.plan().new == 5
    with pytest.raises(RuntimeError, match="one-shot iterator"):
        planned.start()  # plan() used the generator up: starting would process nothing
    assert counter.calls == []
    done = Snapper((i for i in range(5)), counter, snapshot_storage=storage, version="v")
    done.start()
    assert done.load() == ["0", "1", "2", "3", "4"]  # load() after start() reuses its keys
    with pytest.raises(RuntimeError, match="one-shot iterator"):
        done.start()
    # a re-iterable input may be started again as often as wanted (the seed does so)
    again = Snapper(range(5), counter, snapshot_storage=storage, version="v")
    again.start()
    again.start()
    assert len(counter.calls) == 5


def quadruple(x: int) -> int:
    return x * 4


def test_keep_keeps_the_version_used_last(storage: SnapshotStorage[Any]) -> None:
    Snapper([1, 2], double, snapshot_storage=storage).start()
    Snapper([1, 2], triple, snapshot_storage=storage).start()
    back = Snapper([1, 2], double, snapshot_storage=storage)
    back.start()  # back to the first version: its results are valid again
    assert back.load() == [2, 4]
    kept = Snapper([1, 2], quadruple, snapshot_storage=storage, on_version_change="keep")
    kept.start()
    assert kept.load() == [2, 4]  # the results of `double`, used last; not of `triple`


def test_reads_and_plans_record_no_version(storage: SnapshotStorage[Any]) -> None:
    Snapper([1, 2, 3], double, snapshot_storage=storage).start()
    planned = Snapper([1, 2, 3], triple, snapshot_storage=storage).plan()
    assert (planned.stale, planned.version_changes) == (3, ["function body changed"])
    assert Snapper([1, 2, 3], triple, snapshot_storage=storage).load() == []
    # plan() and load() decided nothing: a later start() may still keep the results
    kept = Snapper([1, 2, 3], triple, snapshot_storage=storage, on_version_change="keep")
    kept.start()
    assert kept.load() == [2, 4, 6]


def test_plan_reads_the_iterable_as_it_is_now(storage: SnapshotStorage[Any]) -> None:
    items = [1, 2, 3]
    snapper = Snapper(items, double, snapshot_storage=storage)
    snapper.start()
    items.append(4)
    assert (snapper.plan().done, snapper.plan().new) == (3, 1)


# -- the store's load, against a fold written out here ---------------------------------
@settings(max_examples=80, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["ok", "again", "failed"])), max_size=12),
    wanted=st.lists(st.integers(0, 6), max_size=10),
    in_order=st.booleans(),
)
def test_outputs_for_is_the_latest_ok_output_of_each_key(
    tmp_path_factory: pytest.TempPathFactory, rows: list[tuple[int, str]], wanted: list[int], in_order: bool
) -> None:
    """Whatever the rows (superseded, failed, repeated) and the keys asked for (in the
    order saved, which the pure store streams, or any other): the latest row of each
    key, if ok, in the order asked."""
    if in_order:
        wanted = [i for i, _ in rows]
    store = _backend.backend.open_sqlite(str(tmp_path_factory.mktemp("load") / "run.db"), "normal", 1, None)
    try:
        version = store.add_version("fp", "{}", None)
        for i, kind in rows:
            failed = kind == "failed"
            output = None if failed else pickle.dumps(f"{kind} {i}", PICKLE_PROTOCOL)
            store.record((input_key(i), version, STATUS_FAILED if failed else STATUS_OK, None, output,
                          None, None, None, 1, 0.0, 0.0))
        store.flush()
        latest = dict(rows)
        expected = [f"{latest[i]} {i}" for i in wanted if latest.get(i, "failed") != "failed"]
        assert store.outputs_for(version, b"".join(input_key(i) for i in wanted)) == expected
    finally:
        store.close()
