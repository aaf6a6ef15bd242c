"""Running ``fn`` on a Dask cluster while the driver keeps the checkpoint.

``Snapper(items, fn, executor=client)`` with a ``distributed.Client`` comes here. Dask's
own ``client.map`` reads the whole iterable and makes one task per item (tiny items then
cost a scheduler round trip each); this module instead:

- reads the work lazily, a chunk at a time, keeping a bounded number of tasks in flight
  (twice the cluster's threads by default);
- sizes each chunk to the work: one item per task until results arrive, then as many as
  take about ``target_task_seconds`` at the per-item time measured on the workers (so a
  fast ``fn`` gets thousands of items a task, a slow one a single item), growing at most
  fourfold per step so one quick first item cannot make a huge task;
- sends ``fn`` once per task as cloudpickle bytes, unpickled once per worker process
  (``_worker_fn``), and the chunk's items as one pickle;
- brings back, per item, the pickled output or the exception with its traceback text,
  and the item's own start and end times, measured on the worker;
- hands every result to the driver's callbacks as its task completes (a done-callback
  queue), once: a task Dask re-runs after losing a worker completes its future once,
  and a chunk already handled is ignored (``_in_flight`` is keyed by chunk).

Only this driver records anything: the checkpoint stays the one source of truth.
``distributed`` is imported only when a cluster run starts (it is an optional extra),
and ``is_dask_client`` recognises a client without importing it.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import pickle
import queue
import sys
import time
import traceback
import uuid
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterator, Optional, Tuple, TypeVar

from snapperable._contract import PICKLE_PROTOCOL
from snapperable.errors import ClusterTaskError, UnpicklableInputError

if TYPE_CHECKING:
    from distributed import Client, Future

W = TypeVar("W")  # the driver's handle on an item (its key); never sent to the cluster
T = TypeVar("T")

# What a worker sends back for one item: (pickled output or None, exception or None,
# traceback text or None, started, ended). A plain tuple: tiny items make millions.
ItemOutcome = Tuple[Optional[bytes], Optional[BaseException], Optional[str], float, float]

# Called for an item that succeeded: (handle, pickled output, started, ended).
RecordOk = Callable[[W, bytes, float, float], None]
# Called for an item that failed: (handle, item, exception, traceback text, started,
# ended). Returns None once it has dealt with it (recorded it), or a delay in seconds
# after which the item is to be tried again; raises to stop the run.
OnFailure = Callable[[W, T, BaseException, str, float, float], Optional[float]]

TARGET_TASK_SECONDS = 0.1  # long enough that Dask's per-task cost (~1 ms) stays small
MAX_ITEMS_PER_TASK = 10_000  # bounds what one task (and a crash) holds
GROWTH = 4  # a chunk is at most this many times the largest one completed so far
THREADS_REFRESH_SECONDS = 2.0  # how often the cluster's size is asked again (it scales)
WAIT_SECONDS = 0.2  # the longest the driver sleeps without looking at retries due


def is_dask_client(obj: object) -> bool:
    """Whether ``obj`` is a ``distributed.Client``, without importing ``distributed``.

    A client can only exist once ``distributed`` is imported, so ``sys.modules`` says
    whether there is one to compare against.
    """
    distributed = sys.modules.get("distributed")
    return distributed is not None and isinstance(obj, distributed.Client)


def client_of(executor: object) -> "Optional[Client]":
    """The client behind ``executor``: itself, the one of ``client.get_executor()``, or None."""
    if is_dask_client(executor):
        return executor  # type: ignore[return-value]
    cfexecutor = sys.modules.get("distributed.cfexecutor")
    if cfexecutor is not None and isinstance(executor, cfexecutor.ClientExecutor):
        client: Client = executor._client
        return client
    return None


def pickled_fn(fn: Callable[..., Any]) -> bytes:
    """``fn`` as the bytes sent to the workers; a clear error if it cannot be sent."""
    import cloudpickle  # a dependency of distributed

    try:
        return cloudpickle.dumps(fn)
    except Exception as exc:
        name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        raise TypeError(
            f"fn ({name}) cannot be sent to the cluster's workers: cloudpickle cannot "
            f"pickle it ({type(exc).__name__}: {exc}). Functions that hold open files, "
            "locks, sockets or clients must create them inside fn (or per worker) instead."
        ) from exc


class ClusterRun(Generic[W, T]):
    """One run of ``fn`` over work items on the cluster behind ``client``."""

    def __init__(
        self,
        client: "Client",
        fn: Callable[[T], Any],
        *,
        target_task_seconds: float = TARGET_TASK_SECONDS,
        max_items_per_task: int = MAX_ITEMS_PER_TASK,
        tasks_in_flight: Optional[int] = None,
    ) -> None:
        if target_task_seconds <= 0 or max_items_per_task < 1:
            raise ValueError("target_task_seconds must be > 0 and max_items_per_task >= 1")
        if tasks_in_flight is not None and tasks_in_flight < 1:
            raise ValueError("tasks_in_flight must be None or >= 1")
        self.client = client
        self.fn = fn
        self.target_task_seconds = target_task_seconds
        self.max_items_per_task = max_items_per_task
        self.fixed_tasks_in_flight = tasks_in_flight
        self._fn_bytes = b""
        self._fn_token = ""
        self._run_token = uuid.uuid4().hex[:12]
        self._chunk_ids = itertools.count()
        # chunk id -> (its future, its handles and items); a chunk leaves once handled.
        self._in_flight: dict[int, tuple[Future, list[tuple[W, T]]]] = {}
        self._done: "queue.SimpleQueue[int]" = queue.SimpleQueue()
        self._retries: list[tuple[float, int, W, T]] = []  # a heap of (due, seq, handle, item)
        self._retry_seq = itertools.count()
        self._per_item: Optional[float] = None  # seconds an item takes on a worker (average)
        self._largest_done = 0  # items of the largest chunk completed so far
        self._threads = 0
        self._threads_asked = -THREADS_REFRESH_SECONDS
        self._work_left = True
        self.tasks_submitted = 0  # for tests and benchmarks: how the work was cut
        self.items_submitted = 0

    # -- the run ---------------------------------------------------------------------
    def run(self, work: Iterator[tuple[W, T]], record_ok: "RecordOk[W]", on_failure: "OnFailure[W, T]") -> None:
        """Run ``fn`` over every ``(handle, item)`` of ``work``; return once all are handled.

        A failure ``on_failure`` raises (or a task the cluster cannot run, or Ctrl-C)
        stops the run: no more work is read, the tasks in flight finish and their
        successes are recorded (their failures are not: a later run redoes them), then
        the error propagates. A second Ctrl-C while waiting for them stops at once.
        """
        self._fn_bytes = pickled_fn(self.fn)
        self._fn_token = hashlib.blake2b(self._fn_bytes, digest_size=16).hexdigest()
        try:
            self._loop(work, record_ok, on_failure)
        except BaseException:
            self._work_left = False
            self._retries.clear()
            try:
                self._drain(record_ok)
            except KeyboardInterrupt:  # the second Ctrl-C: stop waiting
                self._cancel_all()
                raise
            raise

    def _loop(self, work: Iterator[tuple[W, T]], record_ok: "RecordOk[W]", on_failure: "OnFailure[W, T]") -> None:
        while True:
            self._submit_due_retries(on_failure)
            while self._work_left and len(self._in_flight) < self._capacity():
                self._submit_from(work, on_failure)
            if not self._in_flight and not self._retries:
                if not self._work_left:
                    return
                continue  # every item of the last chunk failed to pickle: read on
            chunk_id = self._next_done()
            if chunk_id is not None:
                self._handle(chunk_id, record_ok, on_failure)

    def _drain(self, record_ok: "RecordOk[W]") -> None:
        """Wait for the tasks in flight and record what succeeded in them."""
        while self._in_flight:
            chunk_id = self._next_done()
            if chunk_id is not None:
                try:
                    self._handle(chunk_id, record_ok, None)
                except ClusterTaskError:
                    continue  # that chunk is lost; the error that stopped the run wins

    def _cancel_all(self) -> None:
        futures = [future for future, _ in self._in_flight.values()]
        self._in_flight.clear()
        if futures:
            self.client.cancel(futures)

    # -- submitting --------------------------------------------------------------------
    def _capacity(self) -> int:
        if self.fixed_tasks_in_flight is not None:
            return self.fixed_tasks_in_flight
        now = time.monotonic()
        if now - self._threads_asked >= THREADS_REFRESH_SECONDS:
            self._threads = sum(self.client.nthreads().values())
            self._threads_asked = now
        return max(2, 2 * self._threads)

    def chunk_size(self) -> int:
        """Items for the next task: about ``target_task_seconds`` of work."""
        if self._per_item is None:
            return 1
        ideal = int(self.target_task_seconds / self._per_item) if self._per_item > 0 else self.max_items_per_task
        return max(1, min(ideal, self.max_items_per_task, GROWTH * self._largest_done))

    def _submit_from(self, work: Iterator[tuple[W, T]], on_failure: "OnFailure[W, T]") -> None:
        chunk = list(itertools.islice(work, self.chunk_size()))
        if not chunk:
            self._work_left = False
            return
        self._submit(chunk, on_failure)

    def _submit(self, chunk: list[tuple[W, T]], on_failure: "OnFailure[W, T]") -> None:
        import cloudpickle  # as Dask would: classes and lambdas of __main__ travel by value

        try:
            payload = cloudpickle.dumps([item for _, item in chunk])
        except Exception:
            chunk = self._sendable(chunk, on_failure)
            if not chunk:
                return
            payload = cloudpickle.dumps([item for _, item in chunk])
        chunk_id = next(self._chunk_ids)
        future = self.client.submit(
            run_chunk,
            self._fn_token,
            self._fn_bytes,
            payload,
            key=f"snapperable-{self._run_token}-{chunk_id}",
            pure=False,
        )
        self._in_flight[chunk_id] = (future, chunk)
        future.add_done_callback(lambda _future, chunk_id=chunk_id: self._done.put(chunk_id))
        self.tasks_submitted += 1
        self.items_submitted += len(chunk)

    def _sendable(self, chunk: list[tuple[W, T]], on_failure: "OnFailure[W, T]") -> list[tuple[W, T]]:
        """The items of ``chunk`` that pickle; each other one is a failure of its own.

        A failing item is handed to ``on_failure`` as an ``UnpicklableInputError``:
        ``skip_item_errors`` records it, else the run stops (in the first chunk, before
        any task was sent).
        """
        import cloudpickle

        sendable: list[tuple[W, T]] = []
        for handle, item in chunk:
            try:
                cloudpickle.dumps(item)
            except Exception as exc:
                error = UnpicklableInputError(
                    f"an item of type {type(item).__module__}.{type(item).__qualname__} "
                    f"({_short_repr(item)}) cannot be sent to the cluster's workers: "
                    f"cloudpickle cannot pickle it ({type(exc).__name__}: {exc})"
                )
                error.__cause__ = exc
                now = time.time()
                self._after_failure(handle, item, on_failure(handle, item, error, _traceback_text(error), now, now))
                continue
            sendable.append((handle, item))
        return sendable

    def _after_failure(self, handle: W, item: T, retry_delay: Optional[float]) -> None:
        if retry_delay is not None:
            due = time.monotonic() + retry_delay
            heapq.heappush(self._retries, (due, next(self._retry_seq), handle, item))

    def _submit_due_retries(self, on_failure: "OnFailure[W, T]") -> None:
        now = time.monotonic()
        while self._retries and self._retries[0][0] <= now and len(self._in_flight) < self._capacity():
            _, _, handle, item = heapq.heappop(self._retries)
            self._submit([(handle, item)], on_failure)

    # -- completing --------------------------------------------------------------------
    def _next_done(self) -> Optional[int]:
        """The next chunk whose task completed, or None after a short wait (retries due)."""
        timeout = WAIT_SECONDS
        if self._retries:
            timeout = max(0.0, min(timeout, self._retries[0][0] - time.monotonic()))
        try:
            return self._done.get(timeout=timeout)
        except queue.Empty:
            return None

    def _handle(self, chunk_id: int, record_ok: "RecordOk[W]", on_failure: "Optional[OnFailure[W, T]]") -> None:
        """Record the results of a completed chunk; ``on_failure`` None: successes only."""
        entry = self._in_flight.get(chunk_id)
        if entry is None:
            return  # handled already (a completion seen twice)
        future, chunk = entry
        try:
            outcomes: list[ItemOutcome] = pickle.loads(future.result())
        except KeyboardInterrupt:
            self._done.put(chunk_id)  # not handled yet: wait for it again
            raise
        except BaseException as exc:
            del self._in_flight[chunk_id]
            future.release()
            raise ClusterTaskError(
                f"the cluster could not run a task of {len(chunk)} item(s) "
                f"({type(exc).__name__}: {exc}); they are not recorded, and the items "
                "recorded so far are kept: start() again resumes"
            ) from exc
        del self._in_flight[chunk_id]
        future.release()
        self._learn(outcomes)
        # One item at a time: a Ctrl-C part way through keeps what was recorded before
        # it (the rest is redone later, never recorded twice). A failure that stops the
        # run still lets the chunk's other successes be recorded first.
        stop: Optional[BaseException] = None
        for (handle, item), (output, exc, text, started, ended) in zip(chunk, outcomes):
            if output is not None:
                record_ok(handle, output, started, ended)
            elif on_failure is not None and stop is None:
                assert exc is not None and text is not None
                try:
                    self._after_failure(handle, item, on_failure(handle, item, exc, text, started, ended))
                except BaseException as raised:
                    stop = raised
        if stop is not None:
            raise stop

    def _learn(self, outcomes: list[ItemOutcome]) -> None:
        """Update the per-item time from a chunk's times on its worker."""
        if not outcomes:
            return
        per_item = max(0.0, outcomes[-1][4] - outcomes[0][3]) / len(outcomes)
        # A moving average: work whose cost drifts moves chunk sizes with it.
        self._per_item = per_item if self._per_item is None else 0.7 * self._per_item + 0.3 * per_item
        self._largest_done = max(self._largest_done, len(outcomes))


# -- on the workers ------------------------------------------------------------------------
_worker_fns: dict[str, Callable[[Any], Any]] = {}  # fn token -> fn, in each worker process


def _worker_fn(token: str, fn_bytes: bytes) -> Callable[[Any], Any]:
    """``fn`` unpickled once per worker process and run, not once per task."""
    fn = _worker_fns.get(token)
    if fn is None:
        if len(_worker_fns) >= 8:  # a long-lived worker serves many runs: keep a few
            _worker_fns.clear()
        fn = _worker_fns[token] = pickle.loads(fn_bytes)
    return fn


def run_chunk(fn_token: str, fn_bytes: bytes, items_bytes: bytes) -> bytes:
    """Run ``fn`` over a chunk's items on a worker: the pickled list of their outcomes.

    One pickle, not the list itself: Dask serializes a list element by element.
    """
    import cloudpickle

    from snapperable.snapper import _unpicklable

    fn = _worker_fn(fn_token, fn_bytes)
    items = pickle.loads(items_bytes)
    outcomes: list[ItemOutcome] = []
    clock = time.time
    for item in items:
        started = clock()
        output: object = _NO_OUTPUT
        try:
            output = fn(item)
            outcomes.append((pickle.dumps(output, PICKLE_PROTOCOL), None, None, started, clock()))
        except BaseException as exc:
            error = exc if output is _NO_OUTPUT else _unpicklable(output, exc)
            outcomes.append((None, _sendable_exception(error), _traceback_text(error), started, clock()))
    return cloudpickle.dumps(outcomes)


_NO_OUTPUT = object()


def _traceback_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _sendable_exception(exc: BaseException) -> BaseException:
    """``exc``, or a stand-in naming it when it would not survive the trip back.

    An exception whose class takes other arguments than it passes to ``Exception``
    pickles but fails to unpickle; left as it is, it would fail its whole chunk.
    """
    import cloudpickle

    try:
        pickle.loads(cloudpickle.dumps(exc))
        return exc
    except Exception as problem:
        return RuntimeError(
            f"{type(exc).__module__}.{type(exc).__qualname__}: {exc} (the exception itself "
            f"could not be sent back from the worker: {type(problem).__name__}: {problem})"
        )


def _short_repr(obj: object, limit: int = 80) -> str:
    try:
        text = repr(obj)
    except Exception:
        return f"<{type(obj).__qualname__} object>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
