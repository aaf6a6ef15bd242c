"""Snapper: plan (what is done, what is left) -> execute -> record.

A Snapper runs ``fn`` over an iterable and hands every finished item to the open
checkpoint's writer. What counts as done is decided per function version: items are
identified by their input key (``keys.py``, or the user's ``key=``), and results are
valid for the version of ``fn`` that made them (``versioning.py``).

Only ``start()`` takes the hold on the checkpoint file (its lock); inside a ``with``
block the hold is kept from the first ``start()`` to ``__exit__``, else it is released
when ``start()`` returns. Every read (``load``, ``plan``, metrics, reports) works
without it: on the held store when this Snapper holds the file, else on a reader
opened for the call (``SnapshotStorage.open_reader``), so a notebook can read a
checkpoint that a running script holds, and a read-only file can be read. The seed's
own examples create a second Snapper on the same storage while the first one is still
referenced.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import random
import threading
import time
import traceback
from contextlib import contextmanager
from enum import Enum
from itertools import islice
from typing import (
    Any,
    Awaitable,
    Callable,
    Generic,
    Iterable,
    Iterator,
    Literal,
    Optional,
    TYPE_CHECKING,
    Sequence,
    Sized,
    TypeVar,
    Union,
    overload,
)

from snapperable import _backend
from snapperable._contract import (
    KEY_SIZE,
    PICKLE_PROTOCOL,
    STATUS_FAILED,
    STATUS_OK,
    CheckpointReader,
    CheckpointStore,
    ItemRow,
    KeySet,
    ProcessStop,
)
from snapperable.errors import (
    CheckpointError,
    ForkedProcessError,
    FunctionChangedError,
    ItemKeyError,
    TooManyConsecutiveErrors,
    UnpicklableOutputError,
)
from snapperable.keys import KEY_HINT, substitute_key
from snapperable.metrics import (
    MAX_OUTLIERS,
    NOT_DONE,
    FailedItem,
    ItemFailure,
    NotDone,
    ProcessingMetric,
    ReportScope,
    RunPlan,
    metric_from_row,
    render_report,
    short_repr,
)
from snapperable.progress import Progress, ProgressSetting, check_setting
from snapperable.storage.base import OpenCheckpoint, SnapshotStorage
from snapperable.storage.files import storage_for

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from distributed import Client

    from snapperable import engine, versioning

T = TypeVar("T")
R = TypeVar("R")
M = TypeVar("M")  # the placeholder of load(missing=...)

log = logging.getLogger("snapperable")

VersionPolicy = Literal["reprocess", "keep", "raise"]
ExecutorChoice = Union[Literal["thread", "process"], "Executor", "Client"]
RateLimit = Union[int, float, str]
# What version= pins: a str or any constant (docs/architecture.md 5), e.g. ("v2", llm.model_name).
# None only inside a tuple: version=None means "not pinned".
VersionValue = Union[
    None, bool, int, float, complex, str, bytes, Enum,
    tuple["VersionValue", ...], frozenset["VersionValue"],
]
VERSION_POLICIES = ("reprocess", "keep", "raise")
UNREGISTERED = -1  # the id of a version start() has yet to record: no rows have it
CHUNK = 1024  # inputs keyed and checked against the done set per backend call
# Chunks keyed while the file's key scan runs, at most (see _key_sets_while_keying): 16 MiB
# of keys, which start() keeps anyway.
READ_AHEAD_CHUNKS = 1024
_NO_PLACEHOLDER: Any = object()  # load() without missing=: leave out what has no output


class Snapper(Generic[T, R]):
    """Run ``fn`` over ``iterable``, checkpointing every result; resume where it stopped.

    Keyword arguments:

    - ``snapshot_storage``: where the checkpoint lives (default
      ``SQLiteSnapshotStorage()``, i.e. ``snapper_checkpoint.db`` in the working directory):
      a storage, or a path (``str`` or ``os.PathLike``): a pickle file if it ends in
      ``.pkl`` or ``.pickle``, else SQLite.
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
    - ``progress``: a tqdm bar during ``start``: ``"auto"`` (default) on a terminal once
      a run lasts a few seconds, never in CI, logs or pipes; ``True`` always, ``False``
      never (``progress.py``).
    - ``workers``: run up to this many items at once (default: one at a time, in the
      calling thread). A plain ``fn`` runs on threads, an ``async def fn`` as tasks on
      an event loop.
    - ``executor``: ``"thread"`` (default), ``"process"`` (a pool of ``workers``
      processes; ``fn`` and the items must be picklable), or a
      ``concurrent.futures.Executor`` of yours (never shut down by the Snapper), or a
      Dask ``distributed.Client`` (``fn`` runs on its cluster's workers, in tasks sized
      to the work; the checkpoint stays here).
    - ``rate_limit``: at most this many calls started per second (``10``, ``"10/s"``,
      ``"600/min"``), over all workers, retries included.
    - ``store_inputs``: keep each ok item's pickled input too (failed items always keep
      theirs), so that the checkpoint alone pairs inputs with outputs
      (``open_checkpoint``, ``snapperable export``). Off by default: it costs a pickle
      of every input and a larger file.
    """

    # An ``async def fn`` returning R makes a Snapper of R, not of its coroutines.
    @overload
    def __init__(
        self,
        iterable: Iterable[T],
        fn: Callable[[T], Awaitable[R]],
        *,
        snapshot_storage: Union[SnapshotStorage[R], str, "os.PathLike[str]", None] = None,
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
        progress: ProgressSetting = "auto",
        workers: Optional[int] = None,
        executor: Optional[ExecutorChoice] = None,
        rate_limit: Optional[RateLimit] = None,
        store_inputs: bool = False,
    ) -> None: ...

    @overload
    def __init__(
        self,
        iterable: Iterable[T],
        fn: Callable[[T], R],
        *,
        snapshot_storage: Union[SnapshotStorage[R], str, "os.PathLike[str]", None] = None,
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
        progress: ProgressSetting = "auto",
        workers: Optional[int] = None,
        executor: Optional[ExecutorChoice] = None,
        rate_limit: Optional[RateLimit] = None,
        store_inputs: bool = False,
    ) -> None: ...

    def __init__(
        self,
        iterable: Iterable[T],
        fn: "Callable[[T], R] | Callable[[T], Awaitable[R]]",
        *,
        snapshot_storage: Union[SnapshotStorage[R], str, "os.PathLike[str]", None] = None,
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
        progress: ProgressSetting = "auto",
        workers: Optional[int] = None,
        executor: Optional[ExecutorChoice] = None,
        rate_limit: Optional[RateLimit] = None,
        store_inputs: bool = False,
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
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be None or a whole number >= 1, not {workers!r}")
        if executor is not None and not isinstance(executor, str):
            from concurrent.futures import Executor

            from snapperable.engine_dask import client_of

            if client_of(executor) is None and not isinstance(executor, Executor):
                raise TypeError(
                    'executor must be "thread", "process", a concurrent.futures.Executor or a '
                    f"distributed.Client, not {type(executor).__name__}"
                )
        elif executor not in (None, "thread", "process"):
            raise ValueError(
                'executor must be "thread", "process", a concurrent.futures.Executor or a '
                f"distributed.Client, not {executor!r}"
            )
        self._is_async = _is_async(fn)
        if self._is_async and executor not in (None, "thread"):
            raise ValueError("an async def fn runs as tasks on an event loop; executor= is for plain functions")
        self._start_interval: Optional[float] = None
        if rate_limit is not None:
            from snapperable.engine import parse_rate_limit

            self._start_interval = parse_rate_limit(rate_limit)
        self.iterable = iterable
        self.fn: Callable[[T], Any] = fn
        self.workers = workers
        self.executor = executor
        self.rate_limit = rate_limit
        self.snapshot_storage: SnapshotStorage[R] = storage_for(snapshot_storage)
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
        self.progress: ProgressSetting = check_setting(progress)
        self.store_inputs = store_inputs
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
        self._version_conflict: Optional[str] = None  # on_version_change="raise" refused a change
        self._fingerprint: "Optional[versioning.Fingerprint]" = None
        # Keys of the iterable in order (16 bytes an input), kept by start() for load():
        # one bytearray that start() appends each chunk's keys to, made bytes on first
        # use. One buffer grows in place (a large one by remapping its pages), where
        # many small ones, joined later, left holes in the heap that stayed resident
        # through the load (benches/README.md, the concurrent run's peak RSS).
        self._keys: Union[None, bytes, bytearray] = None
        self._one_shot_read = False

    # -- holding the checkpoint ---------------------------------------------------------
    def __enter__(self) -> "Snapper[T, R]":
        if self._in_with:
            raise RuntimeError("this Snapper is already in a `with` block")
        self._in_with = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._in_with = False
        self._close()

    def _open(self) -> OpenCheckpoint:
        """The held checkpoint: the hold taken (and the file opened for writing) if not yet."""
        if self._checkpoint is None:
            checkpoint = self.snapshot_storage.open(self.batch_size, self.max_wait_time)
            try:
                self._resolve_version(checkpoint.store)
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
    def _holding(self) -> Iterator[OpenCheckpoint]:
        """The held checkpoint for ``start()``; released after it outside ``with``."""
        checkpoint = self._open()
        try:
            yield checkpoint
        finally:
            if not self._in_with:
                self._close()

    @contextmanager
    def _reading(self) -> Iterator[CheckpointReader]:
        """What a read reads: the held store if this Snapper holds the file, else a
        reader of its own for the call, which needs no lock."""
        if self._checkpoint is not None:
            yield self._open().store
            return
        reader = self.snapshot_storage.open_reader()
        try:
            self._resolve_version(reader)
            yield reader
        finally:
            reader.close()

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

    def _resolve_version(self, store: CheckpointReader) -> None:
        """Decide which version's results this Snapper reads and writes (docs/architecture.md 5).

        Nothing is written here: ``plan()`` and the loads only read. What ``start()``
        must record about it (a new version, an accepted change, a return to an older
        version) waits in ``_registration`` until ``start()`` runs.

        The versions table is a log: its last row is the version used last. A change is
        explained against that one, and ``on_version_change="keep"`` keeps its results.
        A version recorded under an earlier fingerprint scheme whose parts match on what
        both schemes cover is this one: its results are adopted (upgrades never redo work).
        """
        current = self._current_fingerprint()
        parts = json.dumps(current.parts, sort_keys=True)
        known = store.versions()
        last = known[-1] if known else None
        self._changes = []
        self._registration = None
        self._version_conflict = None
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
            # Raised by start() and the loads; plan() previews what changed instead.
            self._version_id = UNREGISTERED
            self._version_conflict = (
                f"the function changed since checkpoint {store.path} was last run ({what}); "
                'pass on_version_change="reprocess" to redo its items or "keep" to keep them'
            )
        elif self.on_version_change == "keep":
            self._version_id = last.uses
            self._registration = (current.digest, parts, last.uses)
            self._change_log = f"function changed ({what}); keeping earlier results"
        else:
            self._version_id = UNREGISTERED
            self._registration = (current.digest, parts, None)
            self._change_log = f"function changed ({what}); its items will be reprocessed"

    def _usable_version(self) -> int:
        """The version id whose results are read; raises the policy's refusal of a
        changed function (``on_version_change="raise"``)."""
        if self._version_conflict is not None:
            raise FunctionChangedError(self._version_conflict)
        assert self._version_id is not None
        return self._version_id

    def _register_version(self, store: CheckpointStore) -> int:
        """Record what ``_resolve_version`` decided; the version id to run with."""
        self._usable_version()
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
    def _keyed_chunks(self, *, run: bool = False) -> Iterator["_KeyedChunk[T]"]:
        """``(chunk, keys, unkeyable)`` for each chunk of the iterable: see ``_keys_of``.

        ``run``: an item whose key raises ``ItemKeyError`` ends the chunks after the
        items before it, as an exception from ``fn`` would, so that those are processed
        and saved first.
        """
        offset = 0
        for chunk in self._chunks():
            try:
                keys, unkeyable = self._keys_of(chunk, offset)
            except ItemKeyError as error:
                head = chunk[: (error.position or offset) - offset]
                if run and head:
                    yield (head, *self._keys_of(head, offset))
                raise
            yield chunk, keys, unkeyable
            offset += len(chunk)

    def _keys_of(self, items: list[T], offset: int) -> tuple[bytes, dict[int, ItemKeyError]]:
        """The keys of ``items`` (at ``offset`` in the iterable), and the items among them
        whose key cannot be computed, by index into ``items``.

        Such an item raises ``ItemKeyError``, naming its position, unless
        ``skip_item_errors``: then it stands in the keys under ``keys.substitute_key``,
        so that positions stay aligned, and ``start()`` records it as failed.
        """
        key = self.key
        unkeyable: dict[int, ItemKeyError] = {}
        values: list[object]
        if key is None:
            values = items  # type: ignore[assignment]  # read only
        else:
            values = []
            for index, item in enumerate(items):
                try:
                    values.append(key(item))
                except Exception as exc:
                    error = ItemKeyError.key_raised(offset + index, short_repr(item), exc)
                    error.__cause__ = exc
                    if not self.skip_item_errors or isinstance(exc, self.fatal_exceptions):
                        raise error from exc
                    unkeyable[index] = error
                    values.append(None)  # a stand-in; the item gets a substitute key below
        if not unkeyable:
            try:
                return _backend.backend.input_keys(values), unkeyable
            except TypeError:  # a value that cannot be keyed: found one at a time below
                pass
        parts = []
        for index, value in enumerate(values):
            if index not in unkeyable:
                try:
                    parts.append(_backend.backend.input_key(value))
                    continue
                except TypeError as exc:
                    error = self._unkeyable_value(value, items[index], offset + index, exc)
                    if not self.skip_item_errors:
                        raise error from exc
                    unkeyable[index] = error
            parts.append(substitute_key(items[index]))
        return b"".join(parts), unkeyable

    def _unkeyable_value(self, value: object, item: T, position: int, exc: TypeError) -> ItemKeyError:
        if self.key is None:
            error = ItemKeyError.unkeyable(position, short_repr(item), str(exc))
        else:
            reason = str(exc).removesuffix(f"; {KEY_HINT}")
            error = ItemKeyError.unkeyable_key(position, short_repr(item), type(value).__qualname__, reason)
        error.__cause__ = exc
        return error

    def _current_keys(self) -> bytes:
        """Keys of the current iterable in order; from the last complete ``start`` if any."""
        if self._keys is None:
            self._keys = b"".join(keys for _, keys, _ in self._keyed_chunks())
        elif isinstance(self._keys, bytearray):
            self._keys = bytes(self._keys)  # and the buffer is freed: one copy is kept
        return self._keys

    def _chunks(self) -> Iterator[list[T]]:
        """The iterable, ``CHUNK`` items at a time: read lazily, never all at once."""
        iterator = iter(self.iterable)
        if iterator is self.iterable:  # a generator or other one-shot iterator
            if self._one_shot_read:
                raise RuntimeError(
                    "this Snapper's iterable is a one-shot iterator (a generator?) that an "
                    "earlier start(), plan(), load() or items() already read; create the Snapper "
                    "with a fresh iterator, or pass a list"
                )
            self._one_shot_read = True
        while chunk := list(islice(iterator, CHUNK)):
            yield chunk

    # -- running ------------------------------------------------------------------------
    def start(self) -> None:
        """Process every item not yet done; return once every result is saved.

        An exception from ``fn`` (unless ``skip_item_errors``), Ctrl-C included, propagates
        only after everything processed before it is saved. With ``workers``, items run
        concurrently and each is saved as it completes; an ``async def fn`` runs on an
        event loop of its own in a helper thread (so this works inside a running loop).
        """
        if not self._concurrent:
            with self._running() as run:
                self._run(*run)
            return
        from snapperable import engine

        if self._is_async:
            with self._running() as run:
                fn = self.fn
                engine.async_in_thread(lambda: self._driver(run, None), fn).wait_blocking()
            return
        with self._runner_started() as runner, self._running() as run:
            engine.run_sync(self._driver(run, runner), runner)

    async def astart(self) -> None:
        """``start()`` for code inside an event loop: ``await snapper.astart()``.

        An ``async def fn`` runs on the caller's loop; a plain one on worker threads (one
        unless ``workers`` says more), with this coroutine waiting for them. Cancelling it
        is a Ctrl-C: the first cancellation stops taking items and waits for the running
        ones (saving them), a second stops waiting.
        """
        from snapperable import engine

        if self._is_async:
            with self._running() as run:
                await engine.run_async(self._driver(run, None), self.fn)
            return
        with self._runner_started() as runner, self._running() as run:
            await engine.sync_in_thread(self._driver(run, runner), runner).wait_async()

    @property
    def _one_shot(self) -> bool:
        """Is the iterable a one-shot iterator (a generator, say), which one read uses up?"""
        return iter(self.iterable) is self.iterable

    @property
    def _concurrent(self) -> bool:
        """Whether ``start`` needs the engine; else the sequential loop, as it always was."""
        return self._is_async or self.workers is not None or self.executor is not None or self._start_interval is not None

    @contextmanager
    def _running(self) -> Iterator["_Run"]:
        """A run's plan and its end: what ``_run`` and the engine need, then a flush."""
        self.failed_items = []
        with self._holding() as checkpoint:
            store = checkpoint.store
            version = self._register_version(store)
            skip, failed, keyed = self._key_sets_while_keying(store, version)
            if not self.retry_failed_items:
                for key in failed:
                    skip.add(key)
            total = len(self.iterable) if isinstance(self.iterable, Sized) else None
            progress = Progress(self.progress, total)
            keys = bytearray()
            try:
                yield checkpoint, version, skip, progress, keys, keyed
                self._keys = keys
            except BaseException:
                # A one-shot iterator cannot be read again: a later load() returns the
                # saved outputs of what this run read of it, rather than raising.
                if self._one_shot_read and keys:
                    self._keys = keys
                raise
            finally:
                try:
                    store.flush()
                finally:
                    progress.close()
            checkpoint.verify_in_place()  # all saved: to the file the path still names?

    def _key_sets_while_keying(
        self, store: CheckpointStore, version: int
    ) -> tuple[KeySet, KeySet, Iterator["_KeyedChunk[T]"]]:
        """``store.key_sets(version)``, and the run's keyed chunks (``_keyed_chunks``): the
        first ones, up to ``READ_AHEAD_CHUNKS``, keyed while the scan runs.

        The scan of the file runs in a helper thread (the Rust core's releases the GIL)
        while this one keys the iterable's first chunks, which the run does next anyway:
        on a resume the two take about as long. Only for an iterable that can be read
        again (a list, say): a one-shot iterator is read no further ahead than before.
        What reading ahead raised (a key that cannot be computed, say) is raised after
        the chunks before it, where a run without reading ahead would raise it.
        """
        keyed = self._keyed_chunks(run=True)
        if self._one_shot:
            return (*store.key_sets(version), keyed)
        found: list[Union[tuple[KeySet, KeySet], BaseException]] = []

        def scan() -> None:
            try:
                found.append(store.key_sets(version))
            except BaseException as exc:  # raised below, in this thread
                found.append(exc)

        thread = threading.Thread(target=scan, name="snapperable-key-scan", daemon=True)
        thread.start()
        ahead: list[_KeyedChunk[T]] = []
        error: Optional[Exception] = None
        try:
            while thread.is_alive() and len(ahead) < READ_AHEAD_CHUNKS:
                try:
                    ahead.append(next(keyed))
                except StopIteration:
                    break
                except Exception as exc:
                    error = exc
                    break
        finally:
            thread.join()  # the store is not closed under a scan (say, on Ctrl-C)
        result = found[0]
        if isinstance(result, BaseException):
            raise result
        return (*result, _chained(ahead, error, keyed))

    def _worker_count(self) -> int:
        if self.workers is not None:
            return self.workers
        if self.executor == "process":
            return os.cpu_count() or 1
        if self.executor == "thread":
            return min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default
        if self.executor is not None:
            from snapperable.engine_dask import client_of, cluster_threads

            client = client_of(self.executor)
            if client is not None:
                return cluster_threads(client)
            return getattr(self.executor, "_max_workers", None) or os.cpu_count() or 1
        return 1

    @contextmanager
    def _runner_started(self) -> Iterator["engine.Runner"]:
        """The runner, made before the checkpoint is opened: a process pool's workers
        start (and import what ``fn`` needs) while this process opens and scans it. The
        engine's loop closes it; if the run fails before the loop starts, this does."""
        runner = self._runner()
        try:
            yield runner
        except BaseException:
            runner.close(wait=True)  # a second close (the loop closed it) does nothing
            raise

    def _runner(self) -> "engine.Runner":
        """Where a plain ``fn``'s tasks run (``executor=``)."""
        from concurrent.futures import Executor, ThreadPoolExecutor

        from snapperable import engine

        workers = self._worker_count()
        executor = self.executor
        if executor is None or executor == "thread":
            return engine.ThreadRunner(workers)
        if executor == "process":
            return engine.process_runner(self.fn, workers)
        assert not isinstance(executor, str)
        from snapperable import engine_dask

        client = engine_dask.client_of(executor)
        if client is not None:
            # A client's executor passes its submit options (resources=, workers=, ...) on.
            return engine_dask.DaskRunner(client, self.fn, getattr(executor, "_kwargs", None))
        assert isinstance(executor, Executor)
        if isinstance(executor, ThreadPoolExecutor):
            return engine.ExecutorRunner(executor, remote=False, owned=False, fn_pickle=None)
        where = f"the workers of {type(executor).__name__}"
        fn_pickle = engine.pickled_fn(self.fn, where)
        return engine.ExecutorRunner(executor, remote=True, owned=False, fn_pickle=fn_pickle)

    def _driver(self, run: "_Run", runner: "Optional[engine.Runner]") -> "engine.Driver":
        """The engine's driver over what ``run`` claims; ``runner=None``: an ``async def fn``."""
        from snapperable import engine

        checkpoint, version, skip, progress, keys_read, keyed = run
        workers = self._worker_count()
        drivers: list[engine.Driver] = []  # the one below, for failures found while keying
        claims = (
            (chunk[p], keys[p * KEY_SIZE : (p + 1) * KEY_SIZE])
            for chunk, keys, todo in self._claimed(
                checkpoint, version, skip, progress, keys_read, keyed, lambda error: drivers[0].failed_unrun(error)
            )
            for p in todo
        )
        limiter = None if self._start_interval is None else engine.RateLimiter(self._start_interval)
        # In flight: a task per worker plus one queued each, so no worker waits for the
        # driver, and one more task's rows may wait for their commit; with a rate limit
        # or on an event loop, one each (a task starts when sent), and as many again may
        # wait for their commit. Either way about 2 x workers tasks are taken but not
        # saved, and a commit does not hold up the next start.
        queued = runner is not None and limiter is None
        driver = engine.Driver(
            self,
            checkpoint.store,
            version,
            self.fn,
            claims,
            max_tasks=2 * workers if queued else workers,
            remote=runner is not None and runner.remote,
            target_task_seconds=0.0 if runner is None else runner.target_task_seconds,
            batching=runner is not None,
            limiter=limiter,
            progress=progress.saved,
            pickle_hint=f"the workers of executor={self.executor!r}",
            dumps=getattr(runner, "item_dumps", None),
            commit_slack=1 if queued else workers,
            expected=len(self.iterable) if isinstance(self.iterable, Sized) else None,
        )
        drivers.append(driver)
        return driver

    def _claimed(
        self,
        checkpoint: OpenCheckpoint,
        version: int,
        skip: KeySet,
        progress: Progress,
        keys_read: bytearray,
        keyed: Iterator["_KeyedChunk[T]"],
        unkeyable_failed: Callable[[BaseException], None],
    ) -> Iterator[tuple[list[T], bytes, list[int]]]:
        """Per chunk of ``keyed`` (the iterable's, see ``_key_sets_while_keying``): the
        chunk, its keys, and the positions in it to process (claimed: added to ``skip``).
        Appends each chunk's keys to ``keys_read``.
        Items whose key raised (``skip_item_errors``) are recorded as failed here, each
        then reported to ``unkeyable_failed``, which counts it as a failure in a row."""
        store = checkpoint.store
        for chunk, keys, unkeyable in keyed:
            checkpoint.verify_in_place()  # a stat per chunk: stop soon after an rm or mv
            keys_read += keys
            todo = skip.claim(keys)  # duplicates within the chunk are claimed once
            progress.already_done(len(chunk) - len(todo))  # done before, or duplicates
            if unkeyable:  # skip_item_errors: recorded as failed, if claimed (not failed before)
                claimed = set(todo)
                todo = [position for position in todo if position not in unkeyable]
                for position, error in unkeyable.items():
                    if position in claimed:
                        key = keys[position * KEY_SIZE : (position + 1) * KEY_SIZE]
                        self.failed_items.append(FailedItem(chunk[position], error))
                        now = time.time()
                        store.record(self._failure_row(key, version, chunk[position], _Failed(error, 0), now, now))
                        progress.saved(1, failed=1)
                        unkeyable_failed(error)
            yield chunk, keys, todo

    def _run(
        self,
        checkpoint: OpenCheckpoint,
        version: int,
        skip: KeySet,
        progress: Progress,
        keys_read: bytearray,
        keyed: Iterator["_KeyedChunk[T]"],
    ) -> None:
        """The loop: key a chunk, claim what is not done, have the store process it.

        ``store.process`` runs the per-item loop (in Rust with the Rust core) and stops
        at an item that raised; the failure is handled here, and processing goes on
        after it. Appends the keys of every chunk read, in order, to ``keys_read``,
        for ``load``.
        """
        fn = self.fn
        store = checkpoint.store
        # store_inputs=True runs the per-item loop here, in Python, on both backends, so
        # that the backends' loops (Rust's in particular) stay as they are: they record
        # no input, and the default costs nothing more.
        process: Callable[[Callable[[T], R], list[T], bytes, list[int], int], Optional[ProcessStop]] = (
            functools.partial(_process_storing_inputs, store) if self.store_inputs else store.process
        )
        consecutive_failures = 0

        def unkeyable_failed(error: BaseException) -> None:
            nonlocal consecutive_failures
            consecutive_failures += 1
            self._check_consecutive(consecutive_failures, error)

        for chunk, keys, todo in self._claimed(checkpoint, version, skip, progress, keys_read, keyed, unkeyable_failed):
            while todo:
                # A live bar gets batches it can follow; else the whole chunk at once.
                size = progress.batch(len(todo))
                batch = todo if size >= len(todo) else todo[:size]
                stop = process(fn, chunk, keys, batch, version)
                finished = len(batch) if stop is None else stop[0]
                if finished:
                    consecutive_failures = 0
                    progress.saved(finished)  # the item that raised counts once recorded
                if stop is None:
                    todo = todo[len(batch) :]
                    continue
                index, started, exc, raised_by_pickling, output = stop
                position = batch[index]
                todo = todo[index + 1 :]
                if raised_by_pickling:
                    exc = UnpicklableOutputError.of(output, exc)
                key = keys[position * KEY_SIZE : (position + 1) * KEY_SIZE]
                item = chunk[position]
                outcome = self._recover(item, exc)
                if isinstance(outcome, _Failed):
                    store.record(self._failure_row(key, version, item, outcome, started, time.time()))
                    progress.saved(1, failed=1)
                    consecutive_failures += 1
                    self._check_consecutive(consecutive_failures, outcome.exception)
                    continue
                payload, attempts = outcome
                ok_row = (key, version, STATUS_OK, self._ok_input(item), payload, None, None, None, attempts, started, time.time())
                store.record(ok_row)
                progress.saved(1)
                consecutive_failures = 0

    def _recover(self, item: T, exc: BaseException) -> "tuple[bytes, int] | _Failed":
        """After ``fn(item)`` raised ``exc``: retry it, record it, or let ``exc`` propagate.

        Returns the pickled output and attempt count of a retry that succeeded, or the
        failure to record (``skip_item_errors``); raises what must propagate.
        """
        attempts = 1
        while True:
            decision = self._on_failure(item, exc, attempts)
            if isinstance(decision, _Failed):
                return decision
            time.sleep(decision)
            attempts += 1
            output: object = _NO_OUTPUT
            try:
                output = self.fn(item)
                return pickle.dumps(output, PICKLE_PROTOCOL), attempts
            except BaseException as again:
                exc = again if output is _NO_OUTPUT else UnpicklableOutputError.of(output, again)

    def _on_failure(self, item: T, exc: BaseException, attempts: int) -> "float | _Failed":
        """After attempt ``attempts`` of ``fn(item)`` raised ``exc``: the delay before the
        next attempt, or the failure to record (``skip_item_errors``); raises what must
        propagate. The one failure policy, of the sequential loop and of the engine."""
        if not isinstance(exc, Exception) or isinstance(exc, self.fatal_exceptions):
            raise exc  # Ctrl-C, SystemExit and fatal_exceptions stop the run at once
        retryable = isinstance(exc, self.retry_on) and not isinstance(exc, UnpicklableOutputError)
        if retryable and attempts <= self.retries:
            delay = min(self.retry_max_backoff, self.retry_backoff * 2 ** (attempts - 1))
            log.info("retrying %r after %s: %s (attempt %d)", item, type(exc).__name__, exc, attempts + 1)
            return float(delay * random.uniform(0.5, 1.0))
        if not self.skip_item_errors:
            raise exc
        self.failed_items.append(FailedItem(item, exc))
        return _Failed(exc, attempts)

    def _ok_input(self, item: T) -> Optional[bytes]:
        """The input an ok row keeps: its pickle with ``store_inputs``, else none."""
        return _pickled_or_none(item) if self.store_inputs else None

    def _failure_row(
        self, key: bytes, version: int, item: T, failure: "_Failed", started: float, ended: float
    ) -> ItemRow:
        exc = failure.exception
        return (
            key,
            version,
            STATUS_FAILED,
            _pickled_or_none(item),
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
    @overload
    def load(self) -> list[R]: ...

    @overload
    def load(self, *, missing: M) -> list[Union[R, M]]: ...

    def load(self, *, missing: object = _NO_PLACEHOLDER) -> list[Any]:
        """Outputs for the current iterable, in its order, duplicates repeated.

        Items never processed, or failed, are left out, so the result is shorter than
        the iterable when anything is missing: do not ``zip`` it with the inputs. With
        ``missing=`` (any value, ``None`` included) such an item gives that placeholder
        instead, so position ``i`` of the result belongs to input ``i``; ``items()``
        pairs each input with its output or failure.

        After ``start`` the keys it saw are reused, so this works when the iterable was
        a one-shot generator.
        """
        with self._reading() as store:
            version = self._usable_version()
            keys = self._current_keys()
            if missing is _NO_PLACEHOLDER:
                return store.outputs_for(version, keys)
            outcomes, _ = _outcomes_in_place(store, version, keys, missing)
            return outcomes

    def items(self) -> list[tuple[T, Union[R, ItemFailure, NotDone]]]:
        """``(input, outcome)`` for every item of the current iterable, in its order.

        The outcome is the saved output of the current function version; an
        ``ItemFailure`` (type, message, traceback, attempts) if the item's latest row
        is a failure; or ``NOT_DONE`` if it has no row of this version (never
        processed, or done only by another version). Reads the iterable, for its
        inputs: a one-shot iterator that ``start()`` has already read cannot be read
        again (``RuntimeError``); pass a list, or a fresh generator to a new Snapper.
        """
        with self._reading() as store:
            version = self._usable_version()
            inputs: list[T] = []
            key_chunks: list[bytes] = []
            for chunk, chunk_keys, _ in self._keyed_chunks():
                inputs += chunk
                key_chunks.append(chunk_keys)
            keys = b"".join(key_chunks)
            if self._one_shot_read:
                self._keys = keys  # for a later load(): it cannot read them again
            outcomes, failed = _outcomes_in_place(store, version, keys, NOT_DONE)
            if failed:
                failures = {
                    row.key: ItemFailure(row.error_type or "unknown", row.error or "", row.traceback, row.attempts)
                    for row in store.rows(version)
                    if row.status == STATUS_FAILED and row.key in failed
                }
                for index, outcome in enumerate(outcomes):
                    if outcome is NOT_DONE:
                        outcomes[index] = failures.get(keys[index * KEY_SIZE : (index + 1) * KEY_SIZE], NOT_DONE)
            return list(zip(inputs, outcomes))

    def load_all(self) -> list[R]:
        """Every output saved for the current function version, in the order first saved."""
        with self._reading() as store:
            version = self._usable_version()
            return store.all_outputs(version)

    def load_metrics(self) -> list[ProcessingMetric]:
        """One metric per item of the current function version, in the order first saved.

        An item's metric is its latest row: a failure that a later run retried
        successfully is superseded, as its output would be.
        """
        with self._reading() as store:
            return self._metrics(store, self._usable_version())

    def _metrics(self, store: CheckpointReader, version: int) -> list[ProcessingMetric]:
        latest = {row.key: row for row in store.rows(version)}
        inputs = self._items_by_key({key for key, row in latest.items() if row.input is None})
        return [metric_from_row(row, inputs.get(row.key)) for row in latest.values()]

    def _items_by_key(self, wanted: set[bytes]) -> dict[bytes, T]:
        """The first item of the current iterable for each key in ``wanted``.

        Only the checkpoint's failed rows keep their input, so this is how a metric
        names the item it is about. A one-shot iterator is never read for it (it
        would be used up): its metrics keep ``input_item=None`` unless stored.
        """
        found: dict[bytes, T] = {}
        if not wanted or self._one_shot:
            return found
        for chunk, keys, _ in self._keyed_chunks():
            for position, item in enumerate(chunk):
                key = keys[position * KEY_SIZE : (position + 1) * KEY_SIZE]
                if key in wanted and key not in found:
                    found[key] = item
            if len(found) == len(wanted):
                break
        return found

    def generate_report(self, format: Literal["markdown", "json"] = "markdown") -> str:
        """A summary of the saved metrics: totals (and which runs they cover), durations,
        slow outliers and failures by type, each item named by its input when stored,
        else by its position in the current iterable (read as ``load()`` reads it)."""
        with self._reading() as store:
            version = self._usable_version()
            metrics = self._metrics(store, version)
            since = [row.created for row in store.versions() if row.uses == version]
            scope = ReportScope(version, min(since) if since else None, self._positions_of(metrics))
        return render_report(metrics, format, scope)

    def _positions_of(self, metrics: list[ProcessingMetric]) -> dict[str, int]:
        """The first position in the current iterable of the items a report names (the
        failed ones, the slowest and the fastest), by key hex; none if the iterable cannot be read
        (a one-shot iterator is read only by ``start()``, whose keys are kept)."""
        by_duration = sorted(metrics, key=lambda m: m.duration)
        extremes = by_duration[:MAX_OUTLIERS] + by_duration[-MAX_OUTLIERS:]  # fast and slow outliers
        wanted = {m.key for m in extremes} | {m.key for m in metrics if not m.success}
        if self._one_shot and self._keys is None:
            return {}
        try:
            keys = self._current_keys()
        except (RuntimeError, ItemKeyError):  # a one-shot iterator read before, say
            return {}
        positions: dict[str, int] = {}
        for position in range(len(keys) // KEY_SIZE):
            key = keys[position * KEY_SIZE : (position + 1) * KEY_SIZE].hex()
            if key in wanted:
                positions.setdefault(key, position)
                if len(positions) == len(wanted):
                    break
        return positions

    def plan(self) -> RunPlan:
        """What ``start`` would do now, without processing anything.

        Reads the whole iterable, as it is now (a generator is consumed, though its
        keys are kept for a later ``load``).
        """
        with self._reading() as store:
            version = self._version_id
            assert version is not None
            if not self._one_shot:
                self._keys = None  # re-read: items may have been added since start()
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
                start_raises=self._version_conflict is not None,
            )


# What a run's plan hands to the sequential loop or to the engine (``_running``).
_Run = tuple[OpenCheckpoint, int, KeySet, Progress, bytearray, Iterator["_KeyedChunk[Any]"]]
# A chunk of the iterable, its keys, and the items among it whose key cannot be computed
# (``Snapper._keys_of``).
_KeyedChunk = tuple[list[T], bytes, dict[int, ItemKeyError]]


def _chained(ahead: list[_KeyedChunk[T]], error: Optional[Exception], rest: Iterator[_KeyedChunk[T]]) -> Iterator[_KeyedChunk[T]]:
    """The chunks keyed ahead, then what reading ahead raised, if anything, or the rest."""
    yield from ahead
    if error is not None:
        raise error
    yield from rest


class _Failed:
    """An item's last exception and how many attempts it took, to be recorded."""

    __slots__ = ("exception", "attempts")

    def __init__(self, exception: BaseException, attempts: int) -> None:
        self.exception = exception
        self.attempts = attempts


_NO_OUTPUT = object()  # marks "fn raised" apart from "pickling the output raised"


def _pickled_or_none(item: object) -> Optional[bytes]:
    """The pickle of an input to keep in its row; None if it cannot be pickled (the
    row is still recorded, without its input)."""
    try:
        return pickle.dumps(item, PICKLE_PROTOCOL)
    except Exception:
        return None


def _process_storing_inputs(
    store: CheckpointStore,
    fn: Callable[[T], R],
    items: Sequence[T],
    keys: bytes,
    positions: Sequence[int],
    version: int,
) -> Optional[ProcessStop]:
    """``store.process`` (same contract, ``_contract.CheckpointStore``) for
    ``store_inputs=True``: each ok row keeps its pickled input."""
    for index, position in enumerate(positions):
        item = items[position]
        started = time.time()
        try:
            output = fn(item)
        except BaseException as exc:
            return index, started, exc, False, None
        try:
            payload = pickle.dumps(output, PICKLE_PROTOCOL)
        except BaseException as exc:
            return index, started, exc, True, output
        key = keys[position * KEY_SIZE : (position + 1) * KEY_SIZE]
        store.record(
            (key, version, STATUS_OK, _pickled_or_none(item), payload, None, None, None, 1, started, time.time())
        )
    return None


def _outcomes_in_place(
    store: CheckpointReader, version: int, keys: bytes, missing: object
) -> tuple[list[Any], KeySet]:
    """The output of each key of ``keys``, in place, ``missing`` where it has none; and
    the keys whose latest row of ``version`` failed.

    Two reads (the key sets, then the outputs): a run in another process may commit
    between them, which only adds rows, and a key that was ok stays ok within its
    version (``start()`` skips it), so every output asked for is there.
    """
    ok, failed = store.key_sets(version)
    count = len(keys) // KEY_SIZE
    found = [i for i in range(count) if keys[i * KEY_SIZE : (i + 1) * KEY_SIZE] in ok]
    outputs = store.outputs_for(version, b"".join(keys[i * KEY_SIZE : (i + 1) * KEY_SIZE] for i in found))
    if len(outputs) != len(found):
        raise CheckpointError(
            f"checkpoint {store.path} changed while it was read ({len(found)} outputs "
            f"expected, {len(outputs)} found); read it again"
        )
    outcomes: list[Any] = [missing] * count
    for index, output in zip(found, outputs):
        outcomes[index] = output
    return outcomes, failed



def _is_async(fn: object) -> bool:
    """``async def`` functions, partials of them and objects with an ``async def __call__``."""
    import inspect

    call = getattr(fn, "__call__", None)
    return inspect.iscoroutinefunction(fn) or (call is not None and inspect.iscoroutinefunction(call))
