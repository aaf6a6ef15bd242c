"""What a run leaves to look at: failed items, per-item metrics, reports and run plans."""

from __future__ import annotations

import enum
import json
import pickle
import reprlib
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Mapping, Optional, TypeVar

from snapperable._contract import STATUS_OK, RowInfo

T = TypeVar("T")

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


SLOW_OUTLIER_FACTOR = 3.0  # a duration over p50 * this (and over p95) is an outlier
MAX_OUTLIERS = 10


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
    """One saved row: an item's processing, all its attempts included."""

    key: str  # hex of the 16-byte input key
    success: bool
    started: float  # Unix time
    ended: float
    attempts: int
    error_type: Optional[str] = None
    error: Optional[str] = None
    traceback: Optional[str] = None
    item: Any = None  # the input, kept for failed items only

    @property
    def duration(self) -> float:
        return self.ended - self.started


def metric_from_row(row: RowInfo) -> ProcessingMetric:
    item = None
    if row.input is not None:
        try:
            item = pickle.loads(row.input)
        except Exception:  # an input whose class is gone: the metric stays useful
            item = None
    return ProcessingMetric(
        key=row.key.hex(),
        success=row.status == STATUS_OK,
        started=row.started,
        ended=row.ended,
        attempts=row.attempts,
        error_type=row.error_type,
        error=row.error,
        traceback=row.traceback,
        item=item,
    )


@dataclass(frozen=True)
class RunPlan:
    """What ``start()`` would do for the current iterable and function, counted by key.

    ``stale`` items were done under another function version (``version_changes`` says
    what changed); ``failed`` ones failed earlier and are retried only with
    ``retry_failed_items=True``.
    """

    total: int  # inputs, duplicates included
    unique: int
    done: int
    new: int
    stale: int
    failed: int
    retry_failed_items: bool
    version_changes: list[str] = field(default_factory=list)
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


@dataclass(frozen=True)
class ReportScope:
    """What a report's metrics cover: the latest row of each item saved for one function
    version, over every run that used it since ``since`` (Unix time it was first used,
    None if unknown). ``positions`` maps a key (hex) to its first position in the
    current iterable, to name items whose input is not stored."""

    version: int
    since: Optional[float]
    positions: Mapping[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        since = f" since {local_time(self.since)}" if self.since is not None else ""
        return (
            f"every run of the current function version (id {self.version}){since}, the "
            "latest row of each item; items saved by other versions are not counted"
        )


def local_time(unix: float) -> str:
    """``unix`` as ISO-8601 local time with its UTC offset, to the second."""
    from datetime import datetime  # only reports need it

    return datetime.fromtimestamp(unix).astimezone().isoformat(timespec="seconds")


def _which_item(m: ProcessingMetric, scope: Optional[ReportScope]) -> dict[str, Any]:
    """How a report names an item: its input when stored, else its position in the
    current iterable, else (not in it) only its key."""
    position = scope.positions.get(m.key) if scope is not None else None
    named: dict[str, Any] = {"key": m.key, "position": position, "item": None}
    if m.item is not None:
        named["item"] = short_repr(m.item)
    return named


def _item_label(named: Mapping[str, Any]) -> str:
    if named["item"] is not None:
        return str(named["item"])
    if named["position"] is not None:
        return f"position {named['position']}"
    return f"key {named['key']} (not in the current iterable)"


def summarize(metrics: list[ProcessingMetric], scope: Optional[ReportScope] = None) -> dict[str, Any]:
    """The numbers of a report, as plain JSON-able data."""
    durations = sorted(m.duration for m in metrics)
    failures = [m for m in metrics if not m.success]
    summary: dict[str, Any] = {
        "total": len(metrics),
        "successes": len(metrics) - len(failures),
        "failures": len(failures),
        "attempts": sum(m.attempts for m in metrics),
    }
    if scope is not None:
        summary["covers"] = {"version": scope.version, "since": scope.since, "description": scope.describe()}
    if metrics:
        p50 = _percentile(durations, 0.5)
        p95 = _percentile(durations, 0.95)
        threshold = max(p95, p50 * SLOW_OUTLIER_FACTOR)
        outliers = sorted((m for m in metrics if m.duration > threshold), key=lambda m: -m.duration)
        summary["duration"] = {
            "average": sum(durations) / len(durations),
            "min": durations[0],
            "max": durations[-1],
            "p50": p50,
            "p95": p95,
        }
        first_start = min(m.started for m in metrics)
        last_end = max(m.ended for m in metrics)
        summary["time_range"] = {
            "first_start": first_start,
            "last_end": last_end,
            "first_start_local": local_time(first_start),
            "last_end_local": local_time(last_end),
        }
        summary["slow_outliers"] = [
            {**_which_item(m, scope), "duration": m.duration, "started_local": local_time(m.started)}
            for m in outliers[:MAX_OUTLIERS]
        ]
    by_type: dict[str, dict[str, Any]] = {}
    for m in failures:
        group = by_type.setdefault(
            m.error_type or "unknown",
            {"count": 0, "example": {**_which_item(m, scope), "item": repr(m.item), "error": m.error}},
        )
        group["count"] += 1
    summary["failures_by_type"] = by_type
    return summary


def render_report(
    metrics: list[ProcessingMetric], format: Literal["markdown", "json"], scope: Optional[ReportScope] = None
) -> str:
    if format not in ("markdown", "json"):
        raise ValueError(f"format must be 'markdown' or 'json', not {format!r}")
    summary = summarize(metrics, scope)
    if format == "json":
        return json.dumps(summary, indent=2, sort_keys=True)
    lines = [
        "# snapperable report",
        "",
        f"- items: {summary['total']} ({summary['successes']} succeeded, "
        f"{summary['failures']} failed; {summary['attempts']} attempts)",
    ]
    if "covers" in summary:
        lines.append(f"- covers: {summary['covers']['description']}")
    if "duration" in summary:
        d = summary["duration"]
        lines.append(
            f"- duration (s): average {d['average']:.6f}, min {d['min']:.6f}, "
            f"max {d['max']:.6f}, p50 {d['p50']:.6f}, p95 {d['p95']:.6f}"
        )
        r = summary["time_range"]
        lines.append(f"- time range: {r['first_start_local']} to {r['last_end_local']}")
        if summary["slow_outliers"]:
            lines += ["", "## Slow outliers", "", "| item | duration (s) | started |", "| --- | --- | --- |"]
            lines += [
                f"| {_cell(_item_label(o))} | {o['duration']:.6f} | {o['started_local']} |"
                for o in summary["slow_outliers"]
            ]
    if summary["failures_by_type"]:
        lines += ["", "## Failures by exception type", "", "| type | count | example |", "| --- | --- | --- |"]
        for name, group in sorted(summary["failures_by_type"].items()):
            example = group["example"]
            where = f" (position {example['position']})" if example["position"] is not None else ""
            text = f"{example['item']}{where}: {example['error']}"
            lines.append(f"| {name} | {group['count']} | {_cell(text)} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """``text`` as one markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


__all__ = [
    "FailedItem", "ItemFailure", "NOT_DONE", "NotDone", "ProcessingMetric", "ReportScope", "RunPlan",
    "local_time", "summarize", "render_report",
]
