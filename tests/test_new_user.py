"""What a new user trips over (issue 11): positions kept by load(missing=) and items(),
storage paths, error messages, plans and reports. Every test runs on both backends and,
where a checkpoint is involved, both storages."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import pytest
from mypy import api

from conftest import once
from read_only import read_only
from snapperable import (
    NOT_DONE,
    CheckpointCorruptError,
    CheckpointError,
    FunctionChangedError,
    ItemFailure,
    ItemKeyError,
    PickleSnapshotStorage,
    Snapper,
    SnapshotStorage,
    SQLiteSnapshotStorage,
)
from snapperable.keys import input_key

USER_CODE = """
from pathlib import Path
from snapperable import NOT_DONE, ItemFailure, PickleSnapshotStorage, Snapper, SQLiteSnapshotStorage

s = Snapper(["a"], len)
reveal_type(s.load())
reveal_type(s.load(missing=None))
reveal_type(s.load(missing=-1.5))
Snapper(["a"], len, snapshot_storage=SQLiteSnapshotStorage[int](Path("run.db")))
Snapper(["a"], len, snapshot_storage=PickleSnapshotStorage[int](Path("run.pkl")))
Snapper(["a"], len, snapshot_storage=Path("run.db"))
Snapper(["a"], len, snapshot_storage="run.pkl")
for item, outcome in s.items():
    reveal_type(item)
    if isinstance(outcome, ItemFailure) or outcome is NOT_DONE:
        continue
    reveal_type(outcome)
"""


@once  # a static check
def test_types_a_user_sees(tmp_path: Path) -> None:
    source = tmp_path / "user_code.py"
    source.write_text(USER_CODE)
    stdout, _, status = api.run(["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(source)])
    revealed = [line.split("Revealed type is ")[1] for line in stdout.replace("builtins.", "").splitlines() if "Revealed" in line]
    assert revealed == [
        '"list[int]"',
        '"list[int | None]"',
        '"list[int | float]"',
        '"str"',
        '"int"',
    ], stdout
    assert "error" not in stdout.replace("Revealed", ""), stdout


def _fails_on_odd(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd {x}")
    return x * 10


# -- item 3: load(missing=...) and items() keep positions --------------------------------
def test_load_missing_keeps_positions(storage: SnapshotStorage[Any]) -> None:
    with Snapper([0, 1, 2, 3, 4], _fails_on_odd, snapshot_storage=storage, skip_item_errors=True) as s:
        s.start()
    inputs = [0, 1, 2, 3, 4, 5, 2]  # 5 never processed; 2 repeated
    with Snapper(inputs, _fails_on_odd, snapshot_storage=storage) as s:
        assert s.load() == [0, 20, 40, 20]  # the seed's load(): shorter than the inputs
        padded: list[Optional[int]] = s.load(missing=None)
        assert padded == [0, None, 20, None, 40, None, 20]
        assert s.load(missing="?") == [0, "?", 20, "?", 40, "?", 20]
        assert [x for x, y in zip(inputs, padded) if y is not None] == [0, 2, 4, 2]


def test_load_missing_before_any_run(storage: SnapshotStorage[Any]) -> None:
    with Snapper([1, 2], _fails_on_odd, snapshot_storage=storage) as s:
        assert s.load(missing=0) == [0, 0]
        assert s.load() == []


def test_load_missing_after_start_on_a_generator(storage: SnapshotStorage[Any]) -> None:
    with Snapper((x for x in range(5)), _fails_on_odd, snapshot_storage=storage, skip_item_errors=True) as s:
        s.start()
        assert s.load(missing=-1) == [0, -1, 20, -1, 40]


def test_items_pairs_inputs_with_outputs_failures_and_not_done(storage: SnapshotStorage[Any]) -> None:
    with Snapper([0, 1, 2], _fails_on_odd, snapshot_storage=storage, skip_item_errors=True) as s:
        s.start()
    with Snapper([2, 1, 9, 0], _fails_on_odd, snapshot_storage=storage) as s:
        pairs = s.items()
    assert [x for x, _ in pairs] == [2, 1, 9, 0]
    assert pairs[0] == (2, 20) and pairs[3] == (0, 0)
    assert pairs[2] == (9, NOT_DONE)
    failure = pairs[1][1]
    assert isinstance(failure, ItemFailure)
    assert failure.error_type == "builtins.ValueError"
    assert failure.error == "odd 1"
    assert failure.attempts == 1
    assert failure.traceback is not None and "ValueError: odd 1" in failure.traceback


def test_items_after_a_retry_shows_the_output(storage: SnapshotStorage[Any]) -> None:
    with Snapper([1], _fails_on_odd, snapshot_storage=storage, skip_item_errors=True, version="v") as s:
        s.start()
        assert isinstance(s.items()[0][1], ItemFailure)
    with Snapper([1], lambda x: x, snapshot_storage=storage, retry_failed_items=True, version="v") as s:
        s.start()
        assert s.items() == [(1, 1)]


def test_items_of_a_stale_item_is_not_done(storage: SnapshotStorage[Any]) -> None:
    with Snapper([4], _fails_on_odd, snapshot_storage=storage, version="v1") as s:
        s.start()
    with Snapper([4], _fails_on_odd, snapshot_storage=storage, version="v2") as s:
        assert s.items() == [(4, NOT_DONE)]


def test_items_on_a_consumed_generator_raises(storage: SnapshotStorage[Any]) -> None:
    with Snapper((x for x in range(3)), _fails_on_odd, snapshot_storage=storage, skip_item_errors=True) as s:
        s.start()
        with pytest.raises(RuntimeError, match="one-shot"):
            s.items()
        assert s.load(missing=None) == [0, None, 20]


def test_items_on_a_fresh_generator_keeps_its_keys_for_load(storage: SnapshotStorage[Any]) -> None:
    with Snapper([0, 2], _fails_on_odd, snapshot_storage=storage) as s:
        s.start()
    with Snapper((x for x in [2, 5, 0]), _fails_on_odd, snapshot_storage=storage) as s:
        assert s.items() == [(2, 20), (5, NOT_DONE), (0, 0)]
        assert s.load(missing=None) == [20, None, 0]


# -- item 5: a path as snapshot_storage; os.PathLike paths -----------------------------------
@pytest.mark.parametrize(
    "name, kind",
    [("run.db", "SQLiteSnapshotStorage"), ("run.sqlite", "SQLiteSnapshotStorage"), ("run", "SQLiteSnapshotStorage"),
     ("run.pkl", "PickleSnapshotStorage"), ("run.PICKLE", "PickleSnapshotStorage")],
)
@pytest.mark.parametrize("as_path", [False, True])
def test_snapshot_storage_given_as_a_path(tmp_path: Path, name: str, kind: str, as_path: bool) -> None:
    where = tmp_path / name
    given: Any = where if as_path else str(where)
    with Snapper([1, 2], lambda x: x + 1, snapshot_storage=given) as s:
        assert type(s.snapshot_storage).__name__ == kind
        assert s.snapshot_storage.path == str(where)
        s.start()
        assert s.load() == [2, 3]
    opened: SnapshotStorage[Any] = SQLiteSnapshotStorage(where) if kind == "SQLiteSnapshotStorage" else PickleSnapshotStorage(where)
    with Snapper([1, 2], lambda x: x + 1, snapshot_storage=opened) as again:  # the same file, resumed
        assert again.plan().done == 2


def test_snapshot_storage_of_another_type_is_refused_at_construction() -> None:
    with pytest.raises(TypeError, match="snapshot_storage must be a SnapshotStorage"):
        Snapper([1], str, snapshot_storage=3)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="snapshot_storage must be"):
        Snapper([1], str, snapshot_storage=b"run.db")  # type: ignore[call-overload]


# -- item 6: what a bad path reports, and no stray lock files -------------------------------
SUFFIXES = {"sqlite": "db", "pickle": "pkl"}


def storage_at(kind: str, path: Path) -> SnapshotStorage[Any]:
    return SQLiteSnapshotStorage(path) if kind == "sqlite" else PickleSnapshotStorage(path)


@pytest.fixture(params=sorted(SUFFIXES))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_missing_directory_is_named(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "no" / "such" / f"run.{SUFFIXES[kind]}"
    with pytest.raises(CheckpointError) as raised:
        Snapper([1], str, snapshot_storage=storage_at(kind, path)).start()
    message = str(raised.value)
    assert f"the directory {tmp_path / 'no' / 'such'} does not exist" in message, message
    assert ".lock" not in message
    assert not (tmp_path / "no").exists()


def test_a_directory_given_as_checkpoint_is_refused_without_a_lock_file(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        Snapper([1], str, snapshot_storage=storage_at(kind, folder)).start()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


FOREIGN = {
    "a text file": b"name,value\nrow 1,1\n",
    "random bytes": bytes((i * 7919 + 13) % 251 for i in range(4096)),
}


def _sqlite_db_of_another_application(path: Path) -> bytes:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    conn.commit()
    conn.close()
    content = path.read_bytes()
    path.unlink()
    return content


@pytest.mark.parametrize("what", [*FOREIGN, "another application's SQLite db", "the other storage's checkpoint"])
def test_a_foreign_file_is_refused_without_a_lock_file(tmp_path: Path, kind: str, what: str) -> None:
    path = tmp_path / f"data.{SUFFIXES[kind]}"
    if what == "another application's SQLite db":
        content = _sqlite_db_of_another_application(tmp_path / "other.db")
    elif what == "the other storage's checkpoint":
        other_kind = "pickle" if kind == "sqlite" else "sqlite"
        other = tmp_path / f"other.{SUFFIXES[other_kind]}"
        Snapper([1], str, snapshot_storage=storage_at(other_kind, other)).start()
        content = other.read_bytes()
        for leftover in tmp_path.glob("other.*"):
            leftover.unlink()
    else:
        content = FOREIGN[what]
    path.write_bytes(content)
    with pytest.raises(CheckpointCorruptError) as raised:
        Snapper([1], str, snapshot_storage=storage_at(kind, path)).start()
    assert str(path) in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "a stray file was left"
    assert path.read_bytes() == content


def test_an_empty_sqlite_database_becomes_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()  # a SQLite file with no tables (or a 0-byte one)
    with Snapper([1, 2], str, snapshot_storage=SQLiteSnapshotStorage(path)) as s:
        s.start()
        assert s.load() == ["1", "2"]


def test_start_on_a_read_only_file_says_read_only_not_cannot_create(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"run.{SUFFIXES[kind]}"
    Snapper([1], str, snapshot_storage=storage_at(kind, path), version="v").start()
    with read_only(path):
        with pytest.raises(CheckpointError) as raised:
            Snapper([1, 2], str, snapshot_storage=storage_at(kind, path), version="v").start()
    message = str(raised.value)
    assert "read-only" in message and str(path) in message, message
    assert "cannot create" not in message, message


# -- item 7: key= failures name the item, and are item failures under skip_item_errors -------
RECORDS = [{"id": "a"}, {"id": "b"}, {"name": "no id here", "text": "x" * 500}, {"id": "d"}]


def by_id(record: dict[str, str]) -> str:
    return record["id"]


def test_a_raising_key_names_position_and_item(storage: SnapshotStorage[Any]) -> None:
    with pytest.raises(ItemKeyError) as raised:
        Snapper(RECORDS, len, snapshot_storage=storage, key=by_id).start()
    message = str(raised.value)
    assert "key= raised KeyError: 'id'" in message, message
    assert "position 2" in message and "no id here" in message, message
    assert len(message) < 300, "the repr was not cut short"
    assert isinstance(raised.value.__cause__, KeyError)
    assert isinstance(raised.value, TypeError)  # as an unkeyable input always was
    with Snapper(RECORDS[:2], len, snapshot_storage=storage, key=by_id) as s:
        assert s.load() == [1, 1]  # what came before it was saved


def test_a_raising_key_is_an_item_failure_under_skip_item_errors(storage: SnapshotStorage[Any]) -> None:
    calls: list[dict[str, str]] = []

    def size(record: dict[str, str]) -> int:
        calls.append(record)
        return len(record)

    with Snapper(RECORDS, size, snapshot_storage=storage, key=by_id, skip_item_errors=True, version="v") as s:
        s.start()
        assert [f.item for f in s.failed_items] == [RECORDS[2]]
        assert isinstance(s.failed_items[0].exception, ItemKeyError)
        assert s.load() == [1, 1, 1]
        assert s.load(missing=None) == [1, 1, None, 1]
        outcome = s.items()[2][1]
        assert isinstance(outcome, ItemFailure) and outcome.error_type == "snapperable.errors.ItemKeyError"
        assert outcome.attempts == 0  # fn never ran for it
    assert RECORDS[2] not in calls
    report = Snapper(RECORDS, size, snapshot_storage=storage, key=by_id, skip_item_errors=True, version="v").generate_report()
    assert "ItemKeyError" in report
    # Failed earlier: not tried again (its key is derived from its value), as any failure.
    rerun = Snapper(RECORDS, size, snapshot_storage=storage, key=by_id, skip_item_errors=True, version="v")
    assert rerun.plan().failed == 1
    rerun.start()
    assert rerun.failed_items == [] and len(calls) == 3


@pytest.mark.parametrize("with_key", [True, False])
def test_an_unkeyable_value_names_position_and_item(storage: SnapshotStorage[Any], with_key: bool) -> None:
    items: list[Any] = [1, 2, (lambda: None), 4]
    key = (lambda x: x) if with_key else None
    with pytest.raises(ItemKeyError) as raised:
        Snapper(items, str, snapshot_storage=storage, key=key).start()
    message = str(raised.value)
    assert "position 2" in message and "<function" in message, message
    if with_key:
        assert "key= returned a function that cannot be keyed" in message, message
        assert "pass key=" not in message, message
    else:
        assert "pass key=" in message, message
    with Snapper(items, str, snapshot_storage=storage, key=key, skip_item_errors=True) as s:
        s.start()
        assert len(s.failed_items) == 1 and s.failed_items[0].item is items[2]
        assert s.load(missing=None) == ["1", "2", None, "4"]


def test_an_interrupt_in_key_is_not_an_item_failure(storage: SnapshotStorage[Any]) -> None:
    def interrupted(x: int) -> int:
        if x == 2:
            raise KeyboardInterrupt
        return x

    with pytest.raises(KeyboardInterrupt):
        Snapper([1, 2, 3], str, snapshot_storage=storage, key=interrupted, skip_item_errors=True).start()


class _SlowKeyScan:
    """A store whose key scan takes long: start() keys its list ahead meanwhile."""

    def __init__(self, store: Any, scanned: list[float]) -> None:
        self._store = store
        self._scanned = scanned

    def key_sets(self, version: int) -> Any:
        time.sleep(0.3)
        found = self._store.key_sets(version)
        self._scanned.append(time.monotonic())
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_key_error_met_while_keying_ahead_comes_after_the_items_before_it(
    storage: SnapshotStorage[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    scanned: list[float] = []
    opened = type(storage)._open_store
    monkeypatch.setattr(type(storage), "_open_store", lambda self, *a: _SlowKeyScan(opened(self, *a), scanned))
    keyed_at: list[float] = []

    def key(x: int) -> int:
        if x == 2500:
            keyed_at.append(time.monotonic())
            raise ValueError("no key for 2500")
        return x

    with pytest.raises(ItemKeyError, match="position 2500"):
        Snapper(list(range(3000)), str, snapshot_storage=storage, key=key).start()
    assert keyed_at[0] < scanned[0], "the list was not keyed while the scan ran"
    monkeypatch.undo()
    assert Snapper(list(range(2500)), str, snapshot_storage=storage, key=key).load() == [str(x) for x in range(2500)]


# -- item 9: plan() previews under on_version_change="raise"; its text agrees with its counts --
def double(x: int) -> int:
    return x * 2


def triple(x: int) -> int:
    return x * 3


def test_plan_previews_a_change_that_start_would_refuse(storage: SnapshotStorage[Any]) -> None:
    Snapper([1, 2], double, snapshot_storage=storage).start()
    refusing = Snapper([1, 2, 3], triple, snapshot_storage=storage, on_version_change="raise")
    plan = refusing.plan()
    assert (plan.done, plan.stale, plan.new) == (0, 2, 1)
    assert plan.start_raises and plan.to_process == 0
    assert plan.version_changes and "function body changed" in plan.version_changes[0]
    text = str(plan)
    assert "start() raises FunctionChangedError" in text and "function body changed" in text, text
    with pytest.raises(FunctionChangedError):
        refusing.start()
    with pytest.raises(FunctionChangedError):
        refusing.load()
    with Snapper([1, 2, 3], triple, snapshot_storage=storage, on_version_change="raise") as entered:
        assert entered.plan().start_raises  # entering the block does not raise either
    assert Snapper([1, 2], double, snapshot_storage=storage, on_version_change="raise").load() == [2, 4]


def test_plan_text_after_keep_and_after_a_revert_says_nothing_is_stale(storage: SnapshotStorage[Any]) -> None:
    Snapper([1, 2], double, snapshot_storage=storage).start()
    kept = Snapper([1, 2], triple, snapshot_storage=storage, on_version_change="keep")
    plan = kept.plan()
    assert plan.stale == 0 and plan.version_changes
    text = str(plan)
    assert "0 stale" in text and "stale because" not in text, text
    assert "no saved result is stale" in text and "function body changed" in text, text
    kept.start()
    Snapper([1, 2], double, snapshot_storage=storage, on_version_change="reprocess").start()
    Snapper([1, 2], triple, snapshot_storage=storage).start()  # the kept version again
    reverted = Snapper([1, 2], double, snapshot_storage=storage).plan()  # back to double
    assert reverted.stale == 0 and reverted.version_changes
    assert "stale because" not in str(reverted) and "no saved result is stale" in str(reverted)


def test_plan_text_names_the_change_when_items_are_stale(storage: SnapshotStorage[Any]) -> None:
    Snapper([1, 2], double, snapshot_storage=storage).start()
    plan = Snapper([1, 2], triple, snapshot_storage=storage).plan()
    assert plan.stale == 2 and plan.to_process == 2 and not plan.start_raises
    assert "stale because function body changed" in str(plan)


# -- item 12: reports name items by input or position, in local ISO-8601 time, with scope ------
def _slow_on(slow: set[int]) -> Any:
    def work(x: int) -> int:
        if x in slow:
            time.sleep(0.05)
        if x == 13:
            raise ValueError("thirteen")
        return x

    return work


def test_report_names_outliers_by_input_or_position_and_times_in_local_iso(storage: SnapshotStorage[Any]) -> None:
    with Snapper(range(40), _slow_on({7}), snapshot_storage=storage, skip_item_errors=True, version="v") as s:
        s.start()
        by_input = s.generate_report()
    assert "| 7 |" in by_input, by_input  # a re-iterable iterable: the input itself
    generated = (x for x in range(40))
    with Snapper(generated, _slow_on({7}), snapshot_storage=storage, skip_item_errors=True, version="v") as s:
        s.start()  # nothing left to do, but it keeps the generator's keys
        data = json.loads(s.generate_report(format="json"))
        text = s.generate_report()
    outlier = data["slow_outliers"][0]  # the slowest
    assert outlier["position"] == 7 and outlier["key"] == input_key(7).hex()
    assert "| position 7 |" in text, text
    assert "| key " not in text  # no bare hex keys for items it can name
    started = datetime.fromisoformat(data["processing_start"])
    assert started.utcoffset() is not None  # local time, offset included
    assert re.search(r"- time range: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?[+-]\d\d:\d\d to ", text), text
    failure = data["failures_by_type"]["builtins.ValueError"]["example"]
    assert failure["input_item"] == "13" and failure["position"] == 13
    assert "13 (position 13): thirteen" in text, text


def test_report_totals_say_which_runs_they_cover(storage: SnapshotStorage[Any]) -> None:
    Snapper([1, 2], double, snapshot_storage=storage).start()
    Snapper([1, 2, 3], double, snapshot_storage=storage).start()  # a second run, same version
    Snapper([1, 2], triple, snapshot_storage=storage).start()  # another version
    with Snapper([1, 2, 3], double, snapshot_storage=storage) as s:
        data = json.loads(s.generate_report(format="json"))
        text = s.generate_report()
    assert data["total_items"] == 3  # both runs of `double`, not the run of `triple`
    covers = data["covers"]
    assert covers["version"] == 1 and covers["since"] <= time.time()
    assert "- covers: every run of the current function version (id 1) since 20" in text, text
    assert "other versions are not counted" in text


def test_report_names_an_item_no_longer_in_the_iterable_by_key(storage: SnapshotStorage[Any]) -> None:
    Snapper(list(range(12)) + [29], _slow_on({29}), snapshot_storage=storage, version="v").start()
    with Snapper([1, 2], _slow_on({29}), snapshot_storage=storage, version="v") as s:
        text = s.generate_report()
    assert f"key {input_key(29).hex()} (not in the current iterable)" in text, text
