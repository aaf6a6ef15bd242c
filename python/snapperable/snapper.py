"""Snapper: plan (what is done, what is left) -> execute -> record.

A Snapper runs ``fn`` over an iterable and hands every finished item to the open
checkpoint's writer. What counts as done is decided per function version: items are
identified by their input key (``keys.py``, or the user's ``key=``), and results are
valid for the version of ``fn`` that made them (``versioning.py``).

A Snapper holds its checkpoint file from ``__enter__`` to ``__exit__``; used without
``with``, it holds it only for the length of each call (``start``, ``load``, ...). The
seed's own examples rely on the latter: they create a second Snapper on the same
storage while the first one is still referenced.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pickle
import random
import time
import traceback
from contextlib import contextmanager
from enum import Enum
from itertools import islice
from typing import (
    Callable,
    Generic,
    Iterable,
    Iterator,
    Literal,
    Optional,
    TYPE_CHECKING,
    NoReturn,
    Sized,
    TypeVar,
    Union,
)

from snapperable import _backend
from snapperable._contract import KEY_SIZE, PICKLE_PROTOCOL, STATUS_FAILED, STATUS_OK, CheckpointStore, ItemRow, KeySet
from snapperable.errors import (
    ForkedProcessError,
    FunctionChangedError,
    TooManyConsecutiveErrors,
    UnpicklableOutputError,
)
from snapperable.metrics import FailedItem, ProcessingMetric, RunPlan, metric_from_row, render_report
from snapperable.storage.base import OpenCheckpoint, SnapshotStorage
from snapperable.storage.sqlite_storage import SQLiteSnapshotStorage

if TYPE_CHECKING:
    from tqdm import tqdm

    from snapperable import versioning

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("snapperable")

VersionPolicy = Literal["reprocess", "keep", "raise"]
# What version= pins: a str or any constant (docs/architecture.md 5), e.g. ("v2", llm.model_name).
# None only inside a tuple: version=None means "not pinned".
VersionValue = Union[
    None, bool, int, float, complex, str, bytes, Enum,
    tuple["VersionValue", ...], frozenset["VersionValue"],
]
VERSION_POLICIES = ("reprocess", "keep", "raise")
UNREGISTERED = -1  # the id of a version start() has yet to record: no rows have it
CHUNK = 1024  # inputs keyed and checked against the done set per backend call


class Snapper(Generic[T, R]):
    """Run ``fn`` over ``iterable``, checkpointing every result; resume where it stopped.

    Keyword arguments:

    - ``snapshot_storage``: where the checkpoint lives (default
      ``SQLiteSnapshotStorage()``, i.e. ``snapper_checkpoint.db`` in the working directory).
    - ``batch_size``: pending items that start a commit (default 1). Commits group
      whatever accumulated meanwhile, so 1 is both the safest and fast.
    - ``max_wait_time``: seconds an item may stay pending before a commit (default None).
    - ``key``: a function giving each item's identity (default: the item itself).
    - ``version``: pin the function version by hand, a str or any constant (say
      ``("v2", llm.model_name)`` where configuration lives in an object); replaces
      the fingerprint.
    - ``on_version_change``: ``"reprocess"`` (default) redoes items made by an older
      version, ``"keep"`` accepts the old results as valid for the new function,
      ``"raise"`` raises ``FunctionChangedError``.
    - ``skip_item_errors``: record a failing item (type, message, traceback, attempts,
      duration) and go on, instead of raising after saving what was done.
    - ``fatal_exceptions``: exception types re-raised at once even when skipping errors.
    - ``max_consecutive_exceptions``: halt with ``TooManyConsecutiveErrors`` after this
      many failures in a row.
    - ``retry_failed_items``: retry items that failed in an earlier run (default False).
    - ``retries``, ``retry_on``, ``retry_backoff``, ``retry_max_backoff``: retry an item
      whose ``fn`` raised one of ``retry_on`` up to ``retries`` more times, sleeping an
      exponentially growing, jittered delay (``retry_backoff * 2**n``, at most
      ``retry_max_backoff`` seconds, times a random factor in [0.5, 1]).
    - ``progress``: draw a tqdm progress bar during ``start`` (needs ``tqdm``).
    """

    def __init__(
        self,
        iterable: Iterable[T],
        fn: Callable[[T], R],
        *,
        snapshot_storage: Optional[SnapshotStorage[R]] = None,
        batch_size: int = 1,
        max_wait_time: Optional[float] = None,
        key: Optional[Callable[[T], object]] = None,
        version: Optional[VersionValue] = None,
        on_version_change: VersionPolicy = "reprocess",
        skip_item_errors: bool = False,
        fatal_exceptions: tuple[type[BaseException], ...] = (),
        max_consecutive_exceptions: Optional[int] = None,
        retry_failed_items: bool = False,
        retries: int = 0,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        retry_backoff: float = 1.0,
        retry_max_backoff: float = 60.0,
        progress: bool = False,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if key is not None and not callable(key):
            raise TypeError(f"key must be callable, not {type(key).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, not {batch_size!r}")
        if max_wait_time is not None and not max_wait_time > 0:
            raise ValueError(f"max_wait_time must be None or > 0 seconds, not {max_wait_time!r}")
        if on_version_change not in VERSION_POLICIES:
            raise ValueError(
                f"on_version_change must be one of {', '.join(VERSION_POLICIES)}, "
                f"not {on_version_change!r}"
            )
        if version is not None and not isinstance(version, str):
            from snapperable import versioning  # only here: a str needs no check

            versioning.pinned(version)  # raises TypeError for what is not a constant
        if max_consecutive_exceptions is not None and max_consecutive_exceptions < 1:
            raise ValueError("max_consecutive_exceptions must be None or >= 1")
        if retries < 0 or retry_backoff < 0 or retry_max_backoff < 0:
            raise ValueError("retries, retry_backoff and retry_max_backoff must be >= 0")
        try:
            iter(iterable)
        except TypeError:
            raise TypeError(f"iterable must be iterable, not {type(iterable).__name__}") from None
        self.iterable = iterable
        self.fn = fn
        self.snapshot_storage: SnapshotStorage[R] = (
            snapshot_storage if snapshot_storage is not None else SQLiteSnapshotStorage()
        )
        self.batch_size = batch_size
        self.max_wait_time = max_wait_time
        self.key = key
        self.version = version
        self.on_version_change: VersionPolicy = on_version_change
        self.skip_item_errors = skip_item_errors
        self.fatal_exceptions = fatal_exceptions
        self.max_consecutive_exceptions = max_consecutive_exceptions
        self.retry_failed_items = retry_failed_items
        self.retries = retries
        self.retry_on = retry_on
        self.retry_backoff = retry_backoff
        self.retry_max_backoff = retry_max_backoff
        if progress and importlib.util.find_spec("tqdm") is None:
            raise ImportError("progress=True draws a tqdm bar: pip install tqdm")
        self.progress = progress
        self.failed_items: list[FailedItem[T]] = []
        self._checkpoint: Optional[OpenCheckpoint] = None
        self._in_with = False
        self._version_id: Optional[int] = None  # the id whose results are read (and written)
        # What start() must record in the versions log (add_version's arguments), the
        # warning to log when it does, and what changed since the version used last.
        self._registration: Optional[tuple[str, str, Optional[int]]] = None
        self._change_log = ""
        self._adoption_log = ""  # logged (INFO) when start() records an adopted version
        self._changes: list[str] = []
        self._fingerprint: "Optional[versioning.Fingerprint]" = None
        # Keys of the iterable in order, one bytes per chunk (16 bytes an input), kept by
        # start() for load(); chunks, not one buffer, so that keeping them never needs
        # a second copy of them all while start() runs.
        self._key_chunks: Optional[list[bytes]] = None
        self._one_shot_read = False

    # -- holding the checkpoint ---------------------------------------------------------
    def __enter__(self) -> "Snapper[T, R]":
        if self._in_with:
            raise RuntimeError("this Snapper is already in a `with` block")
        self._open()
        self._in_with = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._in_with = False
        self._close()

    def _open(self) -> OpenCheckpoint:
        if self._checkpoint is None:
            checkpoint = self.snapshot_storage.open(self.batch_size, self.max_wait_time)
            try:
                self._resolve_version(checkpoint)
            except BaseException:
                checkpoint.close()
                raise
            self._checkpoint = checkpoint
        elif self._checkpoint.pid != os.getpid():
            raise ForkedProcessError.opened_in(self.snapshot_storage.path, self._checkpoint.pid)
        return self._checkpoint

    def _close(self) -> None:
        checkpoint, self._checkpoint = self._checkpoint, None
        if checkpoint is None:
            return
        if checkpoint.pid != os.getpid():
            # The writer thread and the file hold belong to the parent: leave them be.
            raise ForkedProcessError.opened_in(self.snapshot_storage.path, checkpoint.pid)
        checkpoint.close()

    @contextmanager
    def _session(self) -> Iterator[OpenCheckpoint]:
        """The open checkpoint for one call; opened and closed around it outside ``with``."""
        checkpoint = self._open()
        try:
            yield checkpoint
        finally:
            if not self._in_with:
                self._close()

    # -- versions -----------------------------------------------------------------------
    def _current_fingerprint(self) -> "versioning.Fingerprint":
        # Imported when first needed: ast and inspect are a fifth of the import time.
        from snapperable import versioning

        if self._fingerprint is None:
            self._fingerprint = (
                versioning.pinned(self.version)
                if self.version is not None
                else versioning.fingerprint(self.fn)
            )
        return self._fingerprint

    def _resolve_version(self, checkpoint: OpenCheckpoint) -> None:
        """Decide which version's results this Snapper reads and writes (docs/architecture.md 5).

        Nothing is written here: ``plan()`` and the loads only read. What ``start()``
        must record about it (a new version, an accepted change, a return to an older
        version) waits in ``_registration`` until ``start()`` runs.

        The versions table is a log: its last row is the version used last. A change is
        explained against that one, and ``on_version_change="keep"`` keeps its results.
        A version recorded under an earlier fingerprint scheme whose parts match on what
        both schemes cover is this one: its results are adopted (upgrades never redo work).
        """
        store = checkpoint.store
        current = self._current_fingerprint()
        parts = json.dumps(current.parts, sort_keys=True)
        known = store.versions()
        last = known[-1] if known else None
        self._changes = []
        self._registration = None
        self._change_log = self._adoption_log = ""
        if last is not None and last.fingerprint != current.digest:
            self._changes = current.changes_since(json.loads(last.parts))
        same = [row for row in known if row.fingerprint == current.digest]
        if same:  # a version seen before: its results are valid again
            self._version_id = same[-1].uses
            if same[-1] is not last:  # a return to it: log it as the one used last
                self._registration = (current.digest, parts, same[-1].uses)
            return
        adopted = [row for row in known if current.adopts(json.loads(row.parts))]
        if adopted:  # recorded by an earlier snapperable, whose fingerprints covered more
            row = adopted[-1]
            self._version_id = row.uses
            self._registration = (current.digest, parts, row.uses)
            self._adoption_log = (
                f"the results of version {row.id}, recorded under an earlier fingerprint "
                "scheme, are this function's: what both schemes cover is unchanged"
            )
            return
        if last is None:
            self._version_id = UNREGISTERED
            self._registration = (current.digest, parts, None)
            return
        what = "; ".join(self._changes) or "fingerprint changed"
        if self.on_version_change == "raise":
            raise FunctionChangedError(
                f"the function changed since checkpoint {store.path} was last run ({what}); "
                'pass on_version_change="reprocess" to redo its items or "keep" to keep them'
            )
        if self.on_version_change == "keep":
            self._version_id = last.uses
            self._registration = (current.digest, parts, last.uses)
            self._change_log = f"function changed ({what}); keeping earlier results"
        else:
            self._version_id = UNREGISTERED
            self._registration = (current.digest, parts, None)
            self._change_log = f"function changed ({what}); its items will be reprocessed"

    def _register_version(self, store: CheckpointStore) -> int:
        """Record what ``_resolve_version`` decided; the version id to run with."""
        if self._registration is not None:
            fingerprint, parts, uses = self._registration
            if self._change_log:
                log.warning("%s: %s", store.path, self._change_log)
            if self._adoption_log:
                log.info("%s: %s", store.path, self._adoption_log)
            new_id = store.add_version(fingerprint, parts, uses)
            self._version_id = new_id if uses is None else uses
            self._registration = None
            self._change_log = ""
            self._adoption_log = ""
        assert self._version_id is not None and self._version_id != UNREGISTERED
        return self._version_id

    # -- keys ---------------------------------------------------------------------------
    def _keys_of(self, items: list[T]) -> bytes:
        key = self.key
        if key is None:
            return _backend.backend.input_keys(items)
        return _backend.backend.input_keys([key(item) for item in items])

    def _current_keys(self) -> bytes:
        """Keys of the current iterable in order; from the last complete ``start`` if any."""
        if self._key_chunks is None:
            self._key_chunks = [self._keys_of(chunk) for chunk in self._chunks()]
        if len(self._key_chunks) != 1:
            # Kept joined from now on: one copy of the keys, not the chunks plus a join
            # per load (3M inputs: 48 MB less while load() builds its result).
            self._key_chunks = [b"".join(self._key_chunks)]
        return self._key_chunks[0]

    def _chunks(self) -> Iterator[list[T]]:
        """The iterable, ``CHUNK`` items at a time: read lazily, never all at once."""
        iterator = iter(self.iterable)
        if iterator is self.iterable:  # a generator or other one-shot iterator
            if self._one_shot_read:
                raise RuntimeError(
                    "this Snapper's iterable is a one-shot iterator (a generator?) that an "
                    "earlier start(), plan() or load() already read; create the Snapper "
                    "with a fresh iterator, or pass a list"
                )
            self._one_shot_read = True
        while chunk := list(islice(iterator, CHUNK)):
            yield chunk

    # -- running ------------------------------------------------------------------------
    def start(self) -> None:
        """Process every item not yet done; return once every result is saved.

        An exception from ``fn`` (unless ``skip_item_errors``), Ctrl-C included, propagates
        only after everything processed before it is saved.
        """
        self.failed_items = []
        with self._session() as checkpoint:
            store = checkpoint.store
            version = self._register_version(store)
            skip, failed = store.key_sets(version)
            if not self.retry_failed_items:
                for key in failed:
                    skip.add(key)
            bar = self._progress_bar() if self.progress else None
            key_chunks: list[bytes] = []
            try:
                self._run(store, version, skip, bar, key_chunks)
                self._key_chunks = key_chunks
            except BaseException:
                # A one-shot iterator cannot be read again: a later load() returns the
                # saved outputs of what this run read of it, rather than raising.
                if self._one_shot_read and key_chunks:
                    self._key_chunks = key_chunks
                raise
            finally:
                store.flush()
                if bar is not None:
                    bar.close()

    def _progress_bar(self) -> "tqdm[NoReturn]":
        from tqdm.auto import tqdm  # imported only when asked for: it is slow to import

        total = len(self.iterable) if isinstance(self.iterable, Sized) else None
        return tqdm(total=total, desc="snapperable", unit="item")

    def _run(
        self,
        store: CheckpointStore,
        version: int,
        skip: KeySet,
        bar: "Optional[tqdm[NoReturn]]",
        key_chunks: list[bytes],
    ) -> None:
        """The loop: key a chunk, claim what is not done, have the store process it.

        ``store.process`` runs the per-item loop (in Rust with the Rust core) and stops
        at an item that raised; the failure is handled here, and processing goes on
        after it. Appends the keys of every chunk read, in order, to ``key_chunks``,
        for ``load``.
        """
        fn = self.fn
        consecutive_failures = 0
        for chunk in self._chunks():
            keys = self._keys_of(chunk)
            key_chunks.append(keys)
            todo = skip.claim(keys)  # duplicates within the chunk are claimed once
            if bar is not None:
                bar.update(len(chunk) - len(todo))  # done before, or duplicates
            while todo:
                # With a bar, one item per call so that it moves as items finish.
                batch = todo if bar is None else todo[:1]
                stop = store.process(fn, chunk, keys, batch, version)
                finished = len(batch) if stop is None else stop[0]
                if finished:
                    consecutive_failures = 0
                if bar is not None:
                    bar.update(finished + (stop is not None))
                if stop is None:
                    todo = todo[len(batch) :]
                    continue
                index, started, exc, raised_by_pickling, output = stop
                position = batch[index]
                todo = todo[index + 1 :]
                if raised_by_pickling:
                    exc = _unpicklable(output, exc)
                key = keys[position * KEY_SIZE : (position + 1) * KEY_SIZE]
                item = chunk[position]
                outcome = self._recover(item, exc)
                if isinstance(outcome, _Failed):
                    store.record(self._failure_row(key, version, item, outcome, started, time.time()))
                    consecutive_failures += 1
                    self._check_consecutive(consecutive_failures, outcome.exception)
                    continue
                payload, attempts = outcome
                ok_row = (key, version, STATUS_OK, None, payload, None, None, None, attempts, started, time.time())
                store.record(ok_row)
                consecutive_failures = 0

    def _recover(self, item: T, exc: BaseException) -> "tuple[bytes, int] | _Failed":
        """After ``fn(item)`` raised ``exc``: retry it, record it, or let ``exc`` propagate.

        Returns the pickled output and attempt count of a retry that succeeded, or the
        failure to record (``skip_item_errors``); raises what must propagate.
        """
        attempts = 1
        while True:
            if not isinstance(exc, Exception) or isinstance(exc, self.fatal_exceptions):
                raise exc  # Ctrl-C, SystemExit and fatal_exceptions stop the run at once
            retryable = isinstance(exc, self.retry_on) and not isinstance(exc, UnpicklableOutputError)
            if not (retryable and attempts <= self.retries):
                break
            delay = min(self.retry_max_backoff, self.retry_backoff * 2 ** (attempts - 1))
            log.info("retrying %r after %s: %s (attempt %d)", item, type(exc).__name__, exc, attempts + 1)
            time.sleep(delay * random.uniform(0.5, 1.0))
            attempts += 1
            output: object = _NO_OUTPUT
            try:
                output = self.fn(item)
                return pickle.dumps(output, PICKLE_PROTOCOL), attempts
            except BaseException as again:
                exc = again if output is _NO_OUTPUT else _unpicklable(output, again)
        if not self.skip_item_errors:
            raise exc
        self.failed_items.append(FailedItem(item, exc))
        return _Failed(exc, attempts)

    def _failure_row(
        self, key: bytes, version: int, item: T, failure: "_Failed", started: float, ended: float
    ) -> ItemRow:
        exc = failure.exception
        try:
            pickled_input: Optional[bytes] = pickle.dumps(item, PICKLE_PROTOCOL)
        except Exception:  # the failure is still recorded, without its input
            pickled_input = None
        return (
            key,
            version,
            STATUS_FAILED,
            pickled_input,
            None,
            f"{type(exc).__module__}.{type(exc).__qualname__}",
            str.__str__(str(exc)),  # an exact str, whatever type the exception's __str__ returns
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            failure.attempts,
            started,
            ended,
        )

    def _check_consecutive(self, count: int, last: BaseException) -> None:
        limit = self.max_consecutive_exceptions
        if limit is not None and count >= limit:
            raise TooManyConsecutiveErrors(
                f"{count} consecutive items failed; halting. The last raised "
                f"{type(last).__name__}: {last}"
            ) from last

    # -- reading ------------------------------------------------------------------------
    def load(self) -> list[R]:
        """Outputs for the current iterable, in its order, duplicates repeated.

        Items never processed, or failed, are left out. After ``start`` the keys it saw
        are reused, so this works when the iterable was a one-shot generator.
        """
        with self._session() as checkpoint:
            version = self._version_id
            assert version is not None
            return checkpoint.store.outputs_for(version, self._current_keys())

    def load_all(self) -> list[R]:
        """Every output saved for the current function version, in the order first saved."""
        with self._session() as checkpoint:
            version = self._version_id
            assert version is not None
            return checkpoint.store.all_outputs(version)

    def load_metrics(self) -> list[ProcessingMetric]:
        """One metric per item of the current function version, in the order first saved.

        An item's metric is its latest row: a failure that a later run retried
        successfully is superseded, as its output would be.
        """
        with self._session() as checkpoint:
            version = self._version_id
            assert version is not None
            latest = {row.key: row for row in checkpoint.store.rows(version)}
            inputs = self._items_by_key({key for key, row in latest.items() if row.input is None})
            return [metric_from_row(row, inputs.get(row.key)) for row in latest.values()]

    def _items_by_key(self, wanted: set[bytes]) -> dict[bytes, T]:
        """The first item of the current iterable for each key in ``wanted``.

        Only the checkpoint's failed rows keep their input, so this is how a metric
        names the item it is about. A one-shot iterator is never read for it (it
        would be used up): its metrics keep ``input_item=None`` unless stored.
        """
        found: dict[bytes, T] = {}
        if not wanted or iter(self.iterable) is self.iterable:
            return found
        for chunk in self._chunks():
            keys = self._keys_of(chunk)
            for position, item in enumerate(chunk):
                key = keys[position * KEY_SIZE : (position + 1) * KEY_SIZE]
                if key in wanted and key not in found:
                    found[key] = item
            if len(found) == len(wanted):
                break
        return found

    def generate_report(self, format: Literal["markdown", "json"] = "markdown") -> str:
        """A summary of the saved metrics: totals, durations, outliers, failures by type."""
        return render_report(self.load_metrics(), format)

    def plan(self) -> RunPlan:
        """What ``start`` would do now, without processing anything.

        Reads the whole iterable, as it is now (a generator is consumed, though its
        keys are kept for a later ``load``).
        """
        with self._session() as checkpoint:
            store = checkpoint.store
            version = self._version_id
            assert version is not None
            if iter(self.iterable) is not self.iterable:
                self._key_chunks = None  # re-read: items may have been added since start()
            keys = self._current_keys()
            done, failed = store.key_sets(version)
            done_elsewhere = store.key_set(None, STATUS_OK)
            counts = {"done": 0, "failed": 0, "stale": 0, "new": 0}
            seen = _backend.backend.new_key_set()
            for i in range(0, len(keys), KEY_SIZE):
                key = keys[i : i + KEY_SIZE]
                if key in seen:
                    continue
                seen.add(key)
                if key in done:
                    counts["done"] += 1
                elif key in failed:
                    counts["failed"] += 1
                elif key in done_elsewhere:
                    counts["stale"] += 1
                else:
                    counts["new"] += 1
            return RunPlan(
                total=len(keys) // KEY_SIZE,
                unique=len(seen),
                done=counts["done"],
                new=counts["new"],
                stale=counts["stale"],
                failed=counts["failed"],
                retry_failed_items=self.retry_failed_items,
                version_changes=list(self._changes),
                version_covers=list(self._current_fingerprint().covers),
            )


class _Failed:
    """An item's last exception and how many attempts it took, to be recorded."""

    __slots__ = ("exception", "attempts")

    def __init__(self, exception: BaseException, attempts: int) -> None:
        self.exception = exception
        self.attempts = attempts


_NO_OUTPUT = object()  # marks "fn raised" apart from "pickling the output raised"


def _unpicklable(output: object, exc: BaseException) -> BaseException:
    """The item failure for an output that cannot be pickled."""
    if not isinstance(exc, Exception):
        return exc  # Ctrl-C while pickling is still Ctrl-C
    error = UnpicklableOutputError(
        f"fn returned a {type(output).__module__}.{type(output).__qualname__}, which cannot "
        f"be pickled, so it cannot be checkpointed: {exc}"
    )
    error.__cause__ = exc
    return error
