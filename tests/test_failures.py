"""Item errors, retries, metrics, reports and run plans (on both backends and storages)."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, Callable

import pytest

from snapperable import (
    FailedItem,
    ProcessingMetric,
    Snapper,
    SnapshotStorage,
    TooManyConsecutiveErrors,
    UnpicklableOutputError,
)

class Flaky:
    """Fails on chosen items (optionally only for the first ``times`` calls of each)."""

    def __init__(self, bad: set[int], exc: type[BaseException] = ValueError, times: int = 10**9) -> None:
        self.bad = bad
        self.exc = exc
        self.times = times
        self.calls: dict[int, int] = {}

    def __call__(self, x: int) -> int:
        self.calls[x] = self.calls.get(x, 0) + 1
        if x in self.bad and self.calls[x] <= self.times:
            raise self.exc(f"bad item {x}")
        return x * 2


def snap(storage: SnapshotStorage[Any], items: Any, fn: Callable[[Any], Any], **kw: Any) -> Snapper[Any, Any]:
    return Snapper(items, fn, snapshot_storage=storage, version="v", **kw)


def test_default_error_propagates_after_saving_earlier_items(storage: SnapshotStorage[Any]) -> None:
    fn = Flaky({5})
    with pytest.raises(ValueError, match="bad item 5"):
        snap(storage, range(10), fn).start()
    assert snap(storage, range(10), fn).load() == [0, 2, 4, 6, 8]
    fn.bad.clear()
    snap(storage, range(10), fn).start()
    assert snap(storage, range(10), fn).load() == [2 * i for i in range(10)]
    assert fn.calls[4] == 1 and fn.calls[5] == 2  # only the failed item was redone


def test_skip_item_errors_records_and_continues(storage: SnapshotStorage[Any]) -> None:
    fn = Flaky({3, 7})
    snapper = snap(storage, range(10), fn, skip_item_errors=True)
    snapper.start()
    assert snapper.load() == [2 * i for i in range(10) if i not in (3, 7)]
    assert [f.item for f in snapper.failed_items] == [3, 7]
    assert all(isinstance(f, FailedItem) and isinstance(f.exception, ValueError) for f in snapper.failed_items)
    failures = [m for m in snapper.load_metrics() if not m.success]
    assert [m.item for m in failures] == [3, 7]
    assert failures[0].error_type == "builtins.ValueError"
    assert failures[0].error == "bad item 3"
    assert failures[0].traceback is not None and "bad item 3" in failures[0].traceback
    assert failures[0].attempts == 1 and failures[0].duration >= 0


def test_failed_items_not_retried_unless_asked(storage: SnapshotStorage[Any]) -> None:
    fn = Flaky({3})
    snap(storage, range(5), fn, skip_item_errors=True).start()
    again = snap(storage, range(5), fn, skip_item_errors=True)
    again.start()
    assert fn.calls[3] == 1 and again.failed_items == []
    plan = again.plan()
    assert (plan.done, plan.failed, plan.to_process) == (4, 1, 0)
    fn.bad.clear()
    retry = snap(storage, range(5), fn, skip_item_errors=True, retry_failed_items=True)
    assert retry.plan().to_process == 1
    retry.start()
    assert fn.calls[3] == 2
    assert retry.load() == [0, 2, 4, 6, 8]  # a later ok row supersedes the failure


def test_fatal_exceptions_raise_at_once(storage: SnapshotStorage[Any]) -> None:
    fn = Flaky({2}, exc=KeyError)
    with pytest.raises(KeyError):
        snap(storage, range(5), fn, skip_item_errors=True, fatal_exceptions=(KeyError,)).start()
    assert snap(storage, range(5), fn).load() == [0, 2]


def test_max_consecutive_exceptions_halts(storage: SnapshotStorage[Any]) -> None:
    fn = Flaky({1, 3, 4, 5, 6})
    with pytest.raises(TooManyConsecutiveErrors, match="3 consecutive items failed.*ValueError: bad item 5") as info:
        snap(storage, range(10), fn, skip_item_errors=True, max_consecutive_exceptions=3).start()
    assert isinstance(info.value.__cause__, ValueError)
    assert 6 not in fn.calls  # halted right after the third failure in a row
    assert snap(storage, range(10), fn).load() == [0, 4]


@pytest.fixture
def backoff_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The Snapper's retry back-off sleeps, recorded instead of slept. Other callers of
    ``time.sleep`` (the standard library's ``subprocess`` among them) still sleep."""
    sleeps: list[float] = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        if sys._getframe(1).f_globals.get("__name__") == "snapperable.snapper":
            sleeps.append(seconds)
        else:
            real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", sleep)
    return sleeps


def test_retries_with_backoff(storage: SnapshotStorage[Any], backoff_sleeps: list[float]) -> None:
    sleeps = backoff_sleeps
    fn = Flaky({2}, exc=ConnectionError, times=2)
    snapper = snap(storage, range(4), fn, retries=3, retry_on=(ConnectionError,), retry_backoff=1.0)
    snapper.start()
    assert snapper.load() == [0, 2, 4, 6]
    assert fn.calls[2] == 3
    assert len(sleeps) == 2
    assert 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0  # exponential, jittered
    attempts = {m.key: m.attempts for m in snapper.load_metrics()}
    assert sorted(attempts.values()) == [1, 1, 1, 3]


def test_retries_exhausted_and_non_retryable(storage: SnapshotStorage[Any], backoff_sleeps: list[float]) -> None:
    fn = Flaky({1}, exc=ConnectionError)
    snapper = snap(storage, range(3), fn, retries=2, retry_on=(ConnectionError,), skip_item_errors=True)
    snapper.start()
    assert fn.calls[1] == 3
    [failure] = [m for m in snapper.load_metrics() if not m.success]
    assert failure.attempts == 3
    other = Flaky({0}, exc=ValueError)
    with pytest.raises(ValueError):
        snap(storage, [10 ** 6], lambda x: other(0), retries=5, retry_on=(ConnectionError,)).start()
    assert other.calls[0] == 1  # ValueError is not in retry_on


def test_unpicklable_output_is_an_item_failure(storage: SnapshotStorage[Any]) -> None:
    def fn(x: int) -> Any:
        return threading.Lock() if x == 2 else x

    with pytest.raises(UnpicklableOutputError, match="_thread.lock"):
        snap(storage, range(5), fn).start()
    assert snap(storage, range(5), fn).load() == [0, 1]
    skipping = snap(storage, range(5), fn, skip_item_errors=True)
    skipping.start()
    assert skipping.load() == [0, 1, 3, 4]
    assert isinstance(skipping.failed_items[0].exception, UnpicklableOutputError)


def test_metrics_saved_with_results(storage: SnapshotStorage[Any]) -> None:
    snapper = snap(storage, range(20), lambda x: x)
    snapper.start()
    metrics = snapper.load_metrics()
    assert len(metrics) == 20
    assert all(isinstance(m, ProcessingMetric) and m.success and m.attempts == 1 for m in metrics)
    assert all(m.ended >= m.started > 1.6e9 for m in metrics)
    assert [m.started for m in metrics] == sorted(m.started for m in metrics)


def test_report_markdown_and_json(storage: SnapshotStorage[Any]) -> None:
    fn = Flaky({1, 2, 8}, exc=ValueError)

    def mixed(x: int) -> int:
        if x == 8:
            raise KeyError("eight")
        return fn(x)

    snapper = snap(storage, range(10), mixed, skip_item_errors=True)
    snapper.start()
    data = json.loads(snapper.generate_report(format="json"))
    assert (data["total_items"], data["successful_items"], data["failed_count"]) == (10, 7, 3)
    assert data["failures_by_type"]["builtins.ValueError"]["count"] == 2
    assert data["failures_by_type"]["builtins.KeyError"]["example"]["input_item"] == "8"
    assert data["min_duration"] <= data["p50_duration"] <= data["p95_duration"] <= data["max_duration"]
    assert data["processing_start"] <= data["processing_end"]
    assert sorted(f["input_item"] for f in data["failed_items"]) == ["1", "2", "8"]
    text = snapper.generate_report()
    assert "10 (7 succeeded, 3 failed" in text
    assert "| builtins.ValueError | 2 |" in text and "p95" in text
    with pytest.raises(ValueError):
        snapper.generate_report(format="html")  # type: ignore[arg-type]


def test_report_slow_outliers() -> None:
    from snapperable import generate_metrics_report

    metrics = [ProcessingMetric(i, 0.0, 0.01, True, key=f"{i:032x}") for i in range(50)]
    metrics.append(ProcessingMetric("slow", 0.0, 5.0, True, key="f" * 32))
    report = generate_metrics_report(metrics)
    assert [(o["key"], o["input_item"]) for o in report["slow_outliers"]] == [("f" * 32, "'slow'")]
    assert report["fast_outliers"] == []
    assert report["p50_duration"] == pytest.approx(0.01)


def test_plan_counts_done_new_stale_failed(storage: SnapshotStorage[Any]) -> None:
    def first(x: int) -> int:
        if x == 4:
            raise ValueError("four")
        return x

    def second(x: int) -> int:
        return x + 1

    Snapper(range(5), first, snapshot_storage=storage, skip_item_errors=True).start()
    plan = Snapper([0, 1, 2, 3, 4, 5, 5], first, snapshot_storage=storage).plan()
    assert (plan.total, plan.unique, plan.done, plan.new, plan.stale, plan.failed) == (7, 6, 4, 1, 0, 1)
    assert plan.to_process == 1
    changed = Snapper([0, 1, 9], second, snapshot_storage=storage)
    plan = changed.plan()
    assert (plan.done, plan.stale, plan.new) == (0, 2, 1)
    assert plan.version_changes == ["function body changed"]
    assert "stale because function body changed" in str(plan)
    assert changed.load() == []  # planning processed nothing


def test_metrics_count_each_item_once(storage: SnapshotStorage[Any]) -> None:
    fn = Flaky({2})
    snap(storage, range(4), fn, skip_item_errors=True).start()
    fn.bad.clear()
    retried = snap(storage, range(4), fn, retry_failed_items=True)
    retried.start()
    metrics = retried.load_metrics()
    assert len(metrics) == 4 and all(m.success for m in metrics)
    assert json.loads(retried.generate_report(format="json"))["failed_count"] == 0
