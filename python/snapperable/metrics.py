"""What a run leaves to look at: failed items, per-item metrics, reports and run plans."""

from __future__ import annotations

import json
import pickle
import statistics
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any, Generic, Literal, Mapping, Optional, TypeVar

from snapperable._contract import STATUS_OK, RowInfo

T = TypeVar("T")

MAX_OUTLIERS = 10  # of each kind, the farthest from the mean first


@dataclass(frozen=True)
class FailedItem(Generic[T]):
    """An item that failed in the last ``start()``, and the exception it raised last."""

    item: T
    exception: BaseException


@dataclass(frozen=True)
class ProcessingMetric:
    """One saved row: an item's processing, all its attempts included.

    Built and read with upstream snapperable's names (``input_item``, ``start_time``,
    ``end_time``, ``success``, ``error_message``, ``duration``, ``to_dict`` /
    ``from_dict``), plus this library's richer fields (``key``, ``attempts``,
    ``error_type``, ``traceback``). ``started``, ``ended``, ``error`` and ``item`` read
    the same values under this library's earlier names.
    """

    input_item: Any  # the input: as stored, else found in the current iterable by key
    start_time: float  # Unix time of the first attempt's start
    end_time: float  # Unix time of the last attempt's end
    success: bool
    error_message: Optional[str] = None
    key: str = ""  # hex of the 16-byte input key ("" in a metric built by hand)
    attempts: int = 1
    error_type: Optional[str] = None  # "module.QualName" of the exception
    traceback: Optional[str] = None

    @property
    def duration(self) -> float:
        """Seconds from the first attempt's start to the last attempt's end."""
        return self.end_time - self.start_time

    # This library's earlier names for the same values.
    @property
    def started(self) -> float:
        return self.start_time

    @property
    def ended(self) -> float:
        return self.end_time

    @property
    def error(self) -> Optional[str]:
        return self.error_message

    @property
    def item(self) -> Any:
        return self.input_item

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict: an input JSON cannot hold is given as its ``repr``."""
        data = asdict(self)
        data["input_item"] = _json_or_repr(self.input_item)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ProcessingMetric":
        """The metric ``to_dict`` gave (or upstream's five-key dict); unknown keys are ignored."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def _json_or_repr(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return repr(value)


def metric_from_row(row: RowInfo, input_item: Any = None) -> ProcessingMetric:
    """The metric of a stored row; ``input_item`` stands in when no input was stored."""
    if row.input is not None:
        try:
            input_item = pickle.loads(row.input)
        except Exception:  # an input whose class is gone: the metric stays useful
            pass
    return ProcessingMetric(
        input_item,
        row.started,
        row.ended,
        row.status == STATUS_OK,
        row.error,
        key=row.key.hex(),
        attempts=row.attempts,
        error_type=row.error_type,
        traceback=row.traceback,
    )


@dataclass(frozen=True)
class RunPlan:
    """What ``start()`` would do for the current iterable and function, counted by key.

    ``stale`` items were done under another function version (``version_changes`` says
    what changed, ``version_covers`` what the current version counts); ``failed`` ones
    failed earlier and are retried only with ``retry_failed_items=True``.
    """

    total: int  # inputs, duplicates included
    unique: int
    done: int
    new: int
    stale: int
    failed: int
    retry_failed_items: bool
    version_changes: list[str] = field(default_factory=list)
    # What the current function version covers, and how: "code", "helper clean",
    # "global MODEL = 'large'", "global client: type only" (docs/architecture.md 5).
    version_covers: list[str] = field(default_factory=list)

    @property
    def to_process(self) -> int:
        return self.new + self.stale + (self.failed if self.retry_failed_items else 0)

    def __str__(self) -> str:
        lines = [
            f"{self.total} inputs ({self.unique} unique): {self.done} done, {self.new} new, "
            f"{self.stale} stale, {self.failed} failed earlier; {self.to_process} to process"
        ]
        lines += [f"  stale because {change}" for change in self.version_changes]
        return "\n".join(lines)


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile of an ascending list (as numpy's default)."""
    position = (len(sorted_values) - 1) * q
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def local_iso(unix_time: float) -> str:
    """ISO-8601 local time with its UTC offset: readable, and exact across zones."""
    return datetime.fromtimestamp(unix_time).astimezone().isoformat(timespec="milliseconds")


def _outlier(m: ProcessingMetric) -> dict[str, Any]:
    return {"input_item": repr(m.input_item), "key": m.key, "duration": m.duration}


def generate_metrics_report(metrics: list[ProcessingMetric]) -> dict[str, Any]:
    """The numbers of a report, as plain JSON-able data.

    The keys are upstream snapperable's (``total_items``, ``successful_items``,
    ``failed_count``, ``avg_duration``, ``min_duration``, ``max_duration``,
    ``processing_start`` / ``processing_end`` as ISO-8601 local times,
    ``total_elapsed``, ``slow_outliers`` / ``fast_outliers`` beyond two standard
    deviations of the mean, ``failed_items``), plus this library's ``attempts``,
    ``p50_duration``, ``p95_duration`` and ``failures_by_type``.
    """
    durations = sorted(m.duration for m in metrics)
    failures = [m for m in metrics if not m.success]
    report: dict[str, Any] = {
        "total_items": len(metrics),
        "successful_items": len(metrics) - len(failures),
        "failed_count": len(failures),
        "attempts": sum(m.attempts for m in metrics),
        "avg_duration": None,
        "min_duration": None,
        "max_duration": None,
        "p50_duration": None,
        "p95_duration": None,
        "processing_start": None,
        "processing_end": None,
        "total_elapsed": None,
        "slow_outliers": [],
        "fast_outliers": [],
        "failed_items": [
            {"input_item": repr(m.input_item), "key": m.key, "error_type": m.error_type,
             "error_message": m.error_message}
            for m in failures
        ],
    }
    if metrics:
        mean = sum(durations) / len(durations)
        first_start = min(m.start_time for m in metrics)
        last_end = max(m.end_time for m in metrics)
        report.update(
            avg_duration=mean,
            min_duration=durations[0],
            max_duration=durations[-1],
            p50_duration=_percentile(durations, 0.5),
            p95_duration=_percentile(durations, 0.95),
            processing_start=local_iso(first_start),
            processing_end=local_iso(last_end),
            total_elapsed=last_end - first_start,
        )
        if len(durations) >= 2:
            spread = 2 * statistics.stdev(durations)
            by_duration = sorted(metrics, key=lambda m: m.duration)
            slow = [m for m in reversed(by_duration) if m.duration > mean + spread]
            fast = [m for m in by_duration if m.duration < mean - spread]
            report["slow_outliers"] = [_outlier(m) for m in slow[:MAX_OUTLIERS]]
            report["fast_outliers"] = [_outlier(m) for m in fast[:MAX_OUTLIERS]]
    by_type: dict[str, dict[str, Any]] = {}
    for m in failures:
        group = by_type.setdefault(
            m.error_type or "unknown",
            {"count": 0, "example": {"input_item": repr(m.input_item), "key": m.key,
                                     "error_message": m.error_message}},
        )
        group["count"] += 1
    report["failures_by_type"] = by_type
    return report


def generate_json_report(metrics: list[ProcessingMetric]) -> str:
    """``generate_metrics_report`` as indented JSON."""
    return json.dumps(generate_metrics_report(metrics), indent=2, sort_keys=True)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def generate_markdown_report(metrics: list[ProcessingMetric]) -> str:
    """``generate_metrics_report`` as a Markdown page."""
    report = generate_metrics_report(metrics)
    lines = [
        "# snapperable report",
        "",
        f"- items: {report['total_items']} ({report['successful_items']} succeeded, "
        f"{report['failed_count']} failed; {report['attempts']} attempts)",
    ]
    if metrics:
        lines.append(
            f"- duration (s): average {report['avg_duration']:.6f}, min {report['min_duration']:.6f}, "
            f"max {report['max_duration']:.6f}, p50 {report['p50_duration']:.6f}, "
            f"p95 {report['p95_duration']:.6f}"
        )
        lines.append(
            f"- time range: {report['processing_start']} to {report['processing_end']} "
            f"({report['total_elapsed']:.3f} s elapsed)"
        )
    for name, title in (("slow_outliers", "Slow outliers (> mean + 2σ)"),
                        ("fast_outliers", "Fast outliers (< mean - 2σ)")):
        if report[name]:
            lines += ["", f"## {title}", "", "| input | duration (s) |", "| --- | --- |"]
            lines += [f"| {_cell(o['input_item'])} | {o['duration']:.6f} |" for o in report[name]]
    if report["failures_by_type"]:
        lines += ["", "## Failures by exception type", "", "| type | count | example |", "| --- | --- | --- |"]
        for name, group in sorted(report["failures_by_type"].items()):
            example = group["example"]
            lines.append(f"| {name} | {group['count']} | {_cell(example['input_item'])}: {_cell(example['error_message'])} |")
    return "\n".join(lines) + "\n"


def render_report(metrics: list[ProcessingMetric], format: Literal["markdown", "json"]) -> str:
    """The report in ``format``: what ``Snapper.generate_report`` returns."""
    if format == "json":
        return generate_json_report(metrics)
    if format == "markdown":
        return generate_markdown_report(metrics)
    raise ValueError(f"format must be 'markdown' or 'json', not {format!r}")


__all__ = [
    "FailedItem",
    "ProcessingMetric",
    "RunPlan",
    "generate_metrics_report",
    "generate_json_report",
    "generate_markdown_report",
    "render_report",
]
