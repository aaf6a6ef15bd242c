"""Upstream snapperable's documented public API (its later README), as that README shows it.

The examples of its "Error Handling", "Processing Metrics" and "Standalone Report
Functions" sections run here with their exact imports, on both backends and storages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from snapperable import (
    ProcessingMetric,
    Snapper,
    SnapshotStorage,
    TooManyConsecutiveErrors,
    generate_json_report,
    generate_markdown_report,
    generate_metrics_report,
)
from snapperable.storage.sqlite_storage import SQLiteSnapshotStorage

UPSTREAM_REPORT_KEYS = {
    "total_items", "successful_items", "failed_count", "avg_duration", "min_duration",
    "max_duration", "processing_start", "processing_end", "total_elapsed", "slow_outliers",
    "fast_outliers", "failed_items",
}


def process_item(item: int) -> int:
    if item == 3:
        raise ValueError("bad item")
    return item * 2


def test_error_handling_example(storage: SnapshotStorage[Any]) -> None:
    snapper = Snapper(
        range(10),
        process_item,
        snapshot_storage=storage,
        skip_item_errors=True,
        fatal_exceptions=(KeyboardInterrupt,),
        max_consecutive_exceptions=5,
    )
    snapper.start()
    lines = [f"Item {failed.item} failed: {failed.exception}" for failed in snapper.failed_items]
    assert lines == ["Item 3 failed: bad item"]
    assert snapper.load() == [i * 2 for i in range(10) if i != 3]


def test_too_many_consecutive_errors_is_a_runtime_error_saying_consecutive(
    storage: SnapshotStorage[Any],
) -> None:
    def always(item: int) -> int:
        raise ValueError(f"down {item}")

    snapper = Snapper(range(10), always, snapshot_storage=storage, skip_item_errors=True,
                      max_consecutive_exceptions=4)
    with pytest.raises(RuntimeError, match="4 consecutive") as info:
        snapper.start()
    assert isinstance(info.value, TooManyConsecutiveErrors)


def test_loading_metrics_example(tmp_path: Path) -> None:
    # The README's paths, relative to a working directory of the test's own.
    storage: SQLiteSnapshotStorage[Any] = SQLiteSnapshotStorage(str(tmp_path / "checkpoint.db"))
    snapper = Snapper(range(100), process_item, snapshot_storage=storage, skip_item_errors=True)
    snapper.start()
    metrics = snapper.load_metrics()
    lines = [f"Item {m.input_item}: {m.duration:.3f}s, success={m.success}" for m in metrics]
    assert len(lines) == 100
    # input_item is filled for successes too (no input is stored for them: it is found
    # in the current iterable by key), in the order the items were saved.
    assert [m.input_item for m in metrics] == list(range(100))
    assert [m.success for m in metrics] == [i != 3 for i in range(100)]
    assert metrics[3].error_message == "bad item" and metrics[0].error_message is None
    assert all(m.end_time >= m.start_time > 1.6e9 for m in metrics)


def test_metrics_of_a_consumed_generator_keep_stored_inputs_only(storage: SnapshotStorage[Any]) -> None:
    snapper = Snapper((i for i in range(6)), process_item, snapshot_storage=storage,
                      skip_item_errors=True)
    snapper.start()
    metrics = snapper.load_metrics()
    # A one-shot iterator is never read again for metrics; the failed item's input is
    # stored with its row, so it is known.
    assert [m.input_item for m in metrics] == [None, None, None, 3, None, None]


def test_generate_report_example(storage: SnapshotStorage[Any]) -> None:
    snapper = Snapper(range(20), process_item, snapshot_storage=storage, skip_item_errors=True)
    snapper.start()
    markdown = snapper.generate_report()
    assert "20 (19 succeeded, 1 failed" in markdown and "builtins.ValueError" in markdown
    data = json.loads(snapper.generate_report(format="json"))
    assert UPSTREAM_REPORT_KEYS <= set(data)
    assert data["avg_duration"] >= 0
    assert (data["total_items"], data["successful_items"], data["failed_count"]) == (20, 19, 1)
    assert data["failed_items"][0]["input_item"] == "3"
    assert data["failed_items"][0]["error_message"] == "bad item"


def test_standalone_report_functions() -> None:
    metrics = [
        ProcessingMetric(input_item=i, start_time=100.0, end_time=100.0 + 0.01 * (1 + i % 3),
                         success=i != 7, error_message=None if i != 7 else "boom")
        for i in range(40)
    ]
    metrics.append(ProcessingMetric(input_item=99, start_time=1.0, end_time=2.5, success=True,
                                    error_message=None))
    report = generate_metrics_report(metrics)
    assert UPSTREAM_REPORT_KEYS <= set(report)
    assert (report["total_items"], report["successful_items"], report["failed_count"]) == (41, 40, 1)
    assert report["max_duration"] == pytest.approx(1.5)
    assert report["total_elapsed"] == pytest.approx(100.03 - 1.0)
    assert [o["input_item"] for o in report["slow_outliers"]] == ["99"]
    assert report["failed_items"] == [
        {"input_item": "7", "key": "", "error_type": None, "error_message": "boom"}
    ]
    assert report["processing_start"].startswith("1970-01-01") or report["processing_start"].startswith("1969-12-31")
    assert json.loads(generate_json_report(metrics)) == json.loads(json.dumps(report))
    markdown = generate_markdown_report(metrics)
    assert "41 (40 succeeded, 1 failed" in markdown and "| 99 | 1.500000 |" in markdown
    assert generate_metrics_report([])["avg_duration"] is None


def test_processing_metric_upstream_names_and_round_trip() -> None:
    metric = ProcessingMetric(input_item=99, start_time=1.0, end_time=2.5, success=True,
                              error_message=None)
    assert (metric.input_item, metric.start_time, metric.end_time, metric.error_message) == (99, 1.0, 2.5, None)
    assert metric.duration == 1.5
    assert (metric.item, metric.started, metric.ended, metric.error) == (99, 1.0, 2.5, None)
    assert ProcessingMetric.from_dict(metric.to_dict()) == metric
    upstream_dict = {"input_item": 1, "start_time": 0.0, "end_time": 1.0, "success": False,
                     "error_message": "x", "from_a_later_version": True}
    assert ProcessingMetric.from_dict(upstream_dict).error_message == "x"
    odd = ProcessingMetric(input_item={1, 2}, start_time=0.0, end_time=1.0, success=True)
    assert odd.to_dict()["input_item"] == repr({1, 2})  # not JSON: given as its repr
    json.dumps(odd.to_dict())
