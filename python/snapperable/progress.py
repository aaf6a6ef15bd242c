"""The progress bar of a ``start()``: the one place that decides whether a bar is drawn
and what it counts (a tqdm bar, drawn from the first chunk read, so that it starts at
the items already done). Every loop that processes items (the sequential one in
``snapper.py``, a concurrent engine) reports to one ``Progress``:

- ``already_done(n)``: ``n`` items of the iterable were done before this run (or are
  repeats of an item of this run); they move the bar's starting point (tqdm's
  ``initial``), never its rate, so a resumed run shows a true rate and ETA;
- ``saved(n, failed=0)``: ``n`` items were handed to the checkpoint's writer in this
  run, ``failed`` of them as failures (shown in the bar's postfix). An item that raised
  and propagates (Ctrl-C, an error without ``skip_item_errors``) is not counted;
- ``batch(todo)``: how many items the loop may process before it reports again, so a
  bar stays live without a call per item when items are fast;
- ``close()``.

``progress="auto"`` (the default) draws a bar only on a terminal (stderr), not in CI,
and only once a run has lasted ``AUTO_DELAY`` seconds: short runs, logs, pipes and CI
stay silent, and tqdm is not even imported for them. ``True`` draws one at once (a
notebook widget in Jupyter, through ``tqdm.auto``), ``False`` never.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from typing import TYPE_CHECKING, Literal, NoReturn, Optional, Union

if TYPE_CHECKING:
    from tqdm import tqdm

ProgressSetting = Union[bool, Literal["auto"]]

# Seconds a run must last before "auto" draws a bar: "more than a few seconds of work".
AUTO_DELAY = 2.0
# A batch is sized to take about this long, from the rate so far, so that the bar (or
# the decision to draw one) is at most this late, while fast items still go to the
# backend's loop many at a time.
BATCH_SECONDS = 0.1
# Environment variables set by CI services (GitHub Actions, GitLab, Travis, Jenkins,
# Buildkite, ...): some give the job a terminal, but its log is no place for a bar.
CI_VARIABLES = ("CI", "BUILD_NUMBER", "TEAMCITY_VERSION", "TF_BUILD")


def check_setting(progress: object) -> ProgressSetting:
    """``progress`` if valid; raises for ``True`` without tqdm, which it needs."""
    if progress not in (True, False, "auto") or not isinstance(progress, (bool, str)):
        raise ValueError(f'progress must be True, False or "auto", not {progress!r}')
    if progress is True and importlib.util.find_spec("tqdm") is None:
        raise ImportError("progress=True draws a tqdm bar: pip install tqdm")
    return progress


def _auto_allowed() -> bool:
    """Would "auto" draw a bar here at all: stderr a terminal, not CI, tqdm installed?"""
    stream = sys.stderr
    try:
        on_terminal = stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        on_terminal = False
    return (
        on_terminal
        and os.environ.get("TERM") != "dumb"
        and not any(os.environ.get(name) for name in CI_VARIABLES)
        and importlib.util.find_spec("tqdm") is not None
    )


class Progress:
    """What one ``start()`` shows of its progress; see the module docstring."""

    def __init__(self, setting: ProgressSetting, total: Optional[int]) -> None:
        self._total = total
        self._started = time.monotonic()
        self._initial = 0  # items done before this run, seen so far
        self._saved = 0
        self._failed = 0
        self._bar: "Optional[tqdm[NoReturn]]" = None
        # Drawing is still to be decided ("auto" before AUTO_DELAY) or is on.
        self._live = setting is True or (setting == "auto" and _auto_allowed())
        self._draw_at = self._started if setting is True else self._started + AUTO_DELAY
        self._batch_started = self._started
        self._batch_items = 0
        self._rate = 0.0  # items per second over the last batch

    def already_done(self, count: int) -> None:
        self._initial += count
        bar = self._bar
        if bar is None:
            if self._live and time.monotonic() >= self._draw_at:
                self._show()  # drawn from the first chunk on: initial includes it
        elif count:
            # Moved as tqdm's `initial` is, outside `update`, so the rate and ETA count
            # only items saved in this run (`update` would feed them to its rate).
            bar.initial += count
            bar.n += count
            bar.last_print_n += count
            bar.refresh()

    def saved(self, count: int, failed: int = 0) -> None:
        self._failed += failed
        if self._live:
            bar = self._bar
            if bar is None and time.monotonic() >= self._draw_at:
                bar = self._show()  # from the items saved before these
            if bar is not None:
                if failed:
                    bar.set_postfix_str(f"{self._failed} failed", refresh=False)
                bar.update(count)
        self._saved += count

    def batch(self, todo: int) -> int:
        """How many of the ``todo`` items to process before the next report."""
        if not self._live:
            return todo
        now = time.monotonic()
        elapsed = now - self._batch_started
        if self._batch_items and elapsed > 0:
            self._rate = self._batch_items / elapsed
        self._batch_started = now
        size = max(1, min(todo, int(self._rate * BATCH_SECONDS)))
        self._batch_items = size
        return size

    def _show(self) -> "tqdm[NoReturn]":
        from tqdm.auto import tqdm  # imported only to draw: it is slow to import

        bar = tqdm(total=self._total, initial=self._initial + self._saved, desc="snapperable", unit="item")
        if self._failed:
            bar.set_postfix_str(f"{self._failed} failed")
        self._bar = bar
        return bar

    def close(self) -> None:
        self._live = False
        if self._bar is not None:
            self._bar.close()
            self._bar = None
