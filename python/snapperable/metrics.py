"""What a run leaves to look at: failed items, per-item metrics, reports and run plans."""

from __future__ import annotations

import enum
import json
import pickle
import reprlib
import statistics
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any, Generic, Literal, Mapping, Optional, TypeVar

from snapperable._contract import STATUS_OK, RowInfo

T = TypeVar("T")

MAX_OUTLIERS = 10  # of each kind, the farthest from the mean first

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
SHORT_REPR_LIMIT = 120


def short_repr(item: object) -> str:
    """``repr(item)`` cut short (and bounded in work: big containers are not walked
    whole), for messages and reports that name an item."""
    try:
        text = _REPR.repr(item)
    except Exception as exc:
        return f"<{type(item).__qualname__} whose repr raised {type(exc).__name__}>"
    return text if len(text) <= SHORT_REPR_LIMIT else text[: SHORT_REPR_LIMIT - 3] + "..."


@dataclass(frozen=True)
class FailedItem(Generic[T]):
    """An item that failed in the last ``start()``, and the exception it raised last."""

    item: T
    exception: BaseException


class NotDone(enum.Enum):
    """The type of ``NOT_DONE``: one member, so that ``outcome is NOT_DONE`` narrows."""

    NOT_DONE = "NOT_DONE"

    def __repr__(self) -> str:
        return "snapperable.NOT_DONE"


# What ``Snapper.items()`` pairs with an input that has no saved row for the current
# function version: never processed, or done only by another version (stale).
NOT_DONE = NotDone.NOT_DONE


@dataclass(frozen=True)
class ItemFailure:
    """What ``Snapper.items()`` pairs with an input whose latest saved row is a failure.

    Read from the checkpoint (so it also describes failures of earlier runs): the
    exception's qualified type name, its message and traceback text, and the attempts
    the item took. ``Snapper.failed_items`` holds the live exceptions of the last
    ``start()`` instead.
    """

    error_type: str
    error: str
    traceback: Optional[str]
    attempts: int


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
    # on_version_change="raise" and the function changed: start() raises
    # FunctionChangedError instead of processing (the counts say what it would face).
    start_raises: bool = False

    @property
    def to_process(self) -> int:
        """Items ``start()`` would process (0 when it raises instead)."""
        if self.start_raises:
            return 0
        return self.new + self.stale + (self.failed if self.retry_failed_items else 0)

    def __str__(self) -> str:
        lines = [
            f"{self.total} inputs ({self.unique} unique): {self.done} done, {self.new} new, "
            f"{self.stale} stale, {self.failed} failed earlier; {self.to_process} to process"
        ]
        changes = "; ".join(self.version_changes)
        if self.start_raises:
            lines.append(
                f"  the function changed since the last run ({changes}): start() raises "
                'FunctionChangedError (on_version_change="raise")'
            )
        elif self.stale:
            lines += [f"  stale because {change}" for change in self.version_changes]
        elif self.version_changes:
            lines.append(f"  the function changed since the last run ({changes}); no saved result is stale")
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


@dataclass(frozen=True)
class ReportScope:
    """What a ``Snapper``'s report covers: the latest row of each item saved for one
    function version, over every run that used it since ``since`` (Unix time it was
    first used, None if unknown). ``positions`` maps a key (hex) to its first position
    in the current iterable, to name items whose input is not known."""

    version: int
    since: Optional[float]
    positions: Mapping[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        since = f" since {local_iso(self.since)}" if self.since is not None else ""
        return (
            f"every run of the current function version (id {self.version}){since}, the "
            "latest row of each item; items saved by other versions are not counted"
        )


def _named(m: ProcessingMetric, scope: Optional[ReportScope]) -> dict[str, Any]:
    """How a report names an item: its input, and (with a scope) its position in the
    current iterable; upstream's reports, without one, have no ``position``."""
    named: dict[str, Any] = {"input_item": repr(m.input_item), "key": m.key}
    if scope is not None:
        named["position"] = scope.positions.get(m.key)
    return named


def _item_label(named: Mapping[str, Any]) -> str:
    """An item in a Markdown report: its input where known, else its position, else its key."""
    if named["input_item"] != repr(None) or (named.get("position") is None and not named["key"]):
        return str(named["input_item"])
    if named.get("position") is not None:
        return f"position {named['position']}"
    return f"key {named['key']} (not in the current iterable)"


def _outlier(m: ProcessingMetric, scope: Optional[ReportScope]) -> dict[str, Any]:
    return {**_named(m, scope), "duration": m.duration}


def generate_metrics_report(metrics: list[ProcessingMetric], scope: Optional[ReportScope] = None) -> dict[str, Any]:
    """The numbers of a report, as plain JSON-able data.

    The keys are upstream snapperable's (``total_items``, ``successful_items``,
    ``failed_count``, ``avg_duration``, ``min_duration``, ``max_duration``,
    ``processing_start`` / ``processing_end`` as ISO-8601 local times,
    ``total_elapsed``, ``slow_outliers`` / ``fast_outliers`` beyond two standard
    deviations of the mean, ``failed_items``), plus this library's ``attempts``,
    ``p50_duration``, ``p95_duration`` and ``failures_by_type``; with a ``scope``
    (``Snapper.generate_report``), ``covers`` (what the totals count) and each named
    item's ``position`` in the current iterable.
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
            {**_named(m, scope), "error_type": m.error_type, "error_message": m.error_message}
            for m in failures
        ],
    }
    if scope is not None:
        report["covers"] = {"version": scope.version, "since": scope.since, "description": scope.describe()}
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
            report["slow_outliers"] = [_outlier(m, scope) for m in slow[:MAX_OUTLIERS]]
            report["fast_outliers"] = [_outlier(m, scope) for m in fast[:MAX_OUTLIERS]]
    by_type: dict[str, dict[str, Any]] = {}
    for m in failures:
        group = by_type.setdefault(
            m.error_type or "unknown",
            {"count": 0, "example": {**_named(m, scope), "error_message": m.error_message}},
        )
        group["count"] += 1
    report["failures_by_type"] = by_type
    return report


def generate_json_report(metrics: list[ProcessingMetric], scope: Optional[ReportScope] = None) -> str:
    """``generate_metrics_report`` as indented JSON."""
    return json.dumps(generate_metrics_report(metrics, scope), indent=2, sort_keys=True)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def generate_markdown_report(metrics: list[ProcessingMetric], scope: Optional[ReportScope] = None) -> str:
    """``generate_metrics_report`` as a Markdown page."""
    report = generate_metrics_report(metrics, scope)
    lines = [
        "# snapperable report",
        "",
        f"- items: {report['total_items']} ({report['successful_items']} succeeded, "
        f"{report['failed_count']} failed; {report['attempts']} attempts)",
    ]
    if "covers" in report:
        lines.append(f"- covers: {report['covers']['description']}")
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
            lines += [f"| {_cell(_item_label(o))} | {o['duration']:.6f} |" for o in report[name]]
    if report["failures_by_type"]:
        lines += ["", "## Failures by exception type", "", "| type | count | example |", "| --- | --- | --- |"]
        for name, group in sorted(report["failures_by_type"].items()):
            example = group["example"]
            where = f" (position {example['position']})" if example.get("position") is not None else ""
            text = f"{_item_label(example)}{where}: {example['error_message']}"
            lines.append(f"| {name} | {group['count']} | {_cell(text)} |")
    return "\n".join(lines) + "\n"


def render_report(
    metrics: list[ProcessingMetric], format: Literal["markdown", "json"], scope: Optional[ReportScope] = None
) -> str:
    """The report in ``format``: what ``Snapper.generate_report`` returns."""
    if format == "json":
        return generate_json_report(metrics, scope)
    if format == "markdown":
        return generate_markdown_report(metrics, scope)
    raise ValueError(f"format must be 'markdown' or 'json', not {format!r}")


__all__ = [
    "FailedItem",
    "ItemFailure",
    "NOT_DONE",
    "NotDone",
    "ProcessingMetric",
    "ReportScope",
    "RunPlan",
    "generate_metrics_report",
    "generate_json_report",
    "generate_markdown_report",
    "render_report",
]
