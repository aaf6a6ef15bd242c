"""Concurrent execution: the Snapper's plan -> execute -> record, with many items at once.

The Snapper plans (keys the iterable a chunk at a time, claims what is not done) and
records; this module executes. Its parts:

- ``Driver``: the one place that decides, free of any I/O. It takes claimed items
  lazily, groups them into tasks, keeps at most ``max_tasks`` tasks in flight (so
  about 2 x workers items are taken but not saved), paces starts (``rate_limit``),
  reschedules retries for later without holding a worker, records every result with
  ``store.record`` as it arrives (completion order), and turns a stopping error or a
  Ctrl-C into "take nothing new, let what runs finish, then raise".
- Runners execute tasks: ``ThreadRunner`` (daemon threads, so that a second Ctrl-C
  can leave at once), ``ExecutorRunner`` (a ``concurrent.futures.Executor``: a
  process pool we start, or the user's, which we never shut down). Any object with
  the ``Runner`` shape plugs in (a Dask client is the next one).
- Two loops feed a driver: ``run_sync`` (the calling thread waits for completions
  on a queue) and ``run_async`` (a coroutine per item on an event loop, for
  ``async def fn``).
- ``in_thread_blocking`` / ``in_thread_async``: run a loop in a helper thread and
  forward Ctrl-C (or a cancellation) into it, for ``start()`` with an ``async def fn``
  (also inside a running loop, as in a Jupyter cell) and for ``astart()`` with a plain one.

Work crosses to a runner as ``(fn, items)``; for a runner whose work leaves the process
(``Runner.remote``) as ``(pickled fn or None, [pickled item, ...])``, pickled here so
that what cannot be pickled is named before it is sent. Either way the worker calls
``fn`` on each item, times it where it ran, and sends back one ``Outcome`` per item:
with the output pickled where it ran if that is another process, else as it is (the
driver pickles it as it records it).
"""

from __future__ import annotations

import heapq
import os
import pickle
import queue
import re
import reprlib
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from concurrent.futures import Executor, Future
from typing import (
    TYPE_CHECKING,
    Any,
    Awaitable,
    Callable,
    Iterator,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
)

from snapperable._contract import PICKLE_PROTOCOL, STATUS_OK, CheckpointStore, ItemRow
from snapperable.errors import UnpicklableOutputError

if TYPE_CHECKING:  # imported where used: a run on threads needs neither (asyncio: ~50 ms)
    import asyncio
    import multiprocessing.context

# What a worker sends back per item: (started, ended, output, exception or None), Unix
# times measured where it ran. The output is the object itself where the work runs in
# this process (the driver pickles it as it records it), its pickle (or None) from
# another process.
Outcome = Tuple[float, float, Any, Optional[BaseException]]
# A task's result: its outcomes in order, or why the whole task failed (a broken pool, a
# result that could not come back), or CANCELLED (it never started).
TaskResult = Union[list[Outcome], BaseException, str]
CANCELLED = "cancelled"
Done = Callable[[int, TaskResult], None]
# A task as sent to a runner: (fn, items, start pacer) in this process; for a remote
# runner (None, pickled items, None), the runner holding the pickled fn.
Work = Tuple[Any, list[Any], Optional[Callable[[], float]]]

MAX_BATCH = 1024  # items per task at most: a task of tiny items still bounds what a crash costs
EWMA_WEIGHT = 0.2  # weight of the newest task in the running per-item duration


# -- the failure policy and the recording, as the Snapper provides them ------------------
class Policy(Protocol):
    """What the driver asks the Snapper after an attempt failed (``Snapper._on_failure``,
    ``Snapper._check_consecutive``, ``Snapper._failure_row``), and what an ok row keeps
    of its input (``Snapper._ok_input``: its pickle with ``store_inputs=True``)."""

    def _on_failure(self, item: Any, exc: BaseException, attempts: int) -> Any: ...

    def _check_consecutive(self, count: int, last: BaseException) -> None: ...

    def _ok_input(self, item: Any) -> Optional[bytes]: ...

    def _failure_row(self, key: bytes, version: int, item: Any, failure: Any, started: float, ended: float) -> ItemRow: ...


# -- rate limits ------------------------------------------------------------------------
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_UNIT_SECONDS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}


def parse_rate_limit(rate: Union[int, float, str]) -> float:
    """Seconds between two starts for ``rate_limit`` (``10``, ``"10/s"``, ``"600/min"``)."""
    if isinstance(rate, bool):
        raise TypeError("rate_limit must be a number of calls per second or a str like '600/min'")
    if isinstance(rate, (int, float)):
        per_second = float(rate)
    elif isinstance(rate, str):
        match = _RATE.match(rate)
        if match is None:
            raise ValueError(f"rate_limit {rate!r} is not like '10/s', '600/min' or '3600/h'")
        per_second = float(match.group(1)) / _UNIT_SECONDS[match.group(2)]
    else:
        raise TypeError(f"rate_limit must be a number or a str like '600/min', not {type(rate).__name__}")
    if not per_second > 0 or per_second == float("inf"):
        raise ValueError(f"rate_limit must be a finite rate above 0, not {rate!r}")
    return 1.0 / per_second


# Sends are paced this much slower than the limit: a task starts a little after it is
# sent (a process's pipe, a thread's wake-up), and where the start itself cannot be
# paced (another process), that jitter could otherwise put one start too many into a
# one-second window.
RATE_MARGIN = 1.01


class RateLimiter:
    """Tasks sent at least ``interval`` seconds apart (times ``RATE_MARGIN``), measured from
    the previous actual send: no burst at start-up, and a late send never lets the next
    ones catch up."""

    __slots__ = ("interval", "next_at")

    def __init__(self, interval: float) -> None:
        self.interval = interval * RATE_MARGIN
        self.next_at = 0.0  # monotonic time of the next allowed send

    def take(self, now: float) -> None:
        self.next_at = now + self.interval


class StartPacer:
    """Where the work runs in this process: each call's start at least ``interval`` after
    the previous one's, measured on the very clock the start is recorded with, so that
    no one-second window of recorded starts can hold more than the limit allows, however
    late a thread wakes up."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last = float("-inf")
        self.lock = threading.Lock()

    def __call__(self) -> float:
        """Wait for this call's turn; its start time (Unix)."""
        with self.lock:
            now = time.time()
            while now < self.last + self.interval:
                time.sleep(self.last + self.interval - now)
                now = time.time()
            self.last = now
            return now

    async def turn(self, lock: "asyncio.Lock") -> float:
        """``__call__`` for coroutines, which wait without holding the loop."""
        import asyncio

        async with lock:
            now = time.time()
            while now < self.last + self.interval:
                await asyncio.sleep(self.last + self.interval - now)
                now = time.time()
            self.last = now
            return now


def _pickle4(obj: object) -> bytes:
    """The pickler of what a remote task is sent and sends back, unless its runner has its own."""
    return pickle.dumps(obj, PICKLE_PROTOCOL)


# -- running one item where the work runs -------------------------------------------------
def _outcome_of(fn: Callable[[Any], Any], item: Any, pace: Optional[Callable[[], float]] = None) -> Outcome:
    started = time.time() if pace is None else pace()
    try:
        output = fn(item)
    except BaseException as exc:
        return started, time.time(), None, exc
    return started, time.time(), output, None


def run_items(fn: Callable[[Any], Any], items: Sequence[Any], pace: Optional[Callable[[], float]] = None) -> list[Outcome]:
    """A task in this process: each item's outcome, in order (each start paced by ``pace``).

    Outputs stay unpickled: the driver pickles them as it records them, in its own
    thread. Pickled here, in many threads at once, each small pickle would be carved
    from a 4 KiB buffer in that thread's malloc arena, and the holes they leave there stay
    resident after the run (benches/README.md, "peak RSS" of the concurrent rows).
    """
    return [_outcome_of(fn, item, pace) for item in items]


class RemoteTraceback(Exception):
    """The traceback of an exception raised in another process, as its ``__cause__``
    (as ``concurrent.futures`` does), so that a failed item's record shows where it raised."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


_worker_fn: Optional[Callable[[Any], Any]] = None  # set by init_process_worker in our pool
_last_fn: tuple[bytes, Optional[Callable[[Any], Any]]] = (b"", None)


def init_process_worker(fn_pickle: bytes) -> None:
    """Initializer of our process pool's workers: a terminal's Ctrl-C reaches the parent only
    (which waits for what runs), and ``fn`` is unpickled once, not per task."""
    global _worker_fn
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_fn = pickle.loads(fn_pickle)


def run_remote(
    fn_pickle: Optional[bytes], item_pickles: Sequence[bytes], dumps: Callable[[object], bytes] = _pickle4
) -> list[Outcome]:
    """A task in another process: ``run_items`` on unpickled inputs, with every exception
    made fit to travel back (its traceback attached; replaced if ``dumps``, the pickler
    that sends the outcomes back, cannot pickle it)."""
    global _last_fn
    if fn_pickle is None:
        fn = _worker_fn
        assert fn is not None, "run_remote without a pickled fn runs only in our own pool"
    elif _last_fn[0] == fn_pickle and _last_fn[1] is not None:
        fn = _last_fn[1]
    else:
        fn = pickle.loads(fn_pickle)
        _last_fn = (fn_pickle, fn)
    outcomes = []
    for item_pickle in item_pickles:
        started, ended, output, exc = _outcome_of(fn, pickle.loads(item_pickle))
        payload = None
        if exc is None:
            try:
                payload = pickle.dumps(output, PICKLE_PROTOCOL)
            except BaseException as error:
                exc = UnpicklableOutputError.of(output, error)
        if exc is not None:
            exc = _travelling(exc, dumps)
        outcomes.append((started, ended, payload, exc))
    return outcomes


def _travelling(exc: BaseException, dumps: Callable[[object], bytes]) -> BaseException:
    """``exc``, made to arrive with its traceback as its ``__cause__`` (a pickle drops both)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickle.loads(dumps(exc))
    except Exception:
        exc = RuntimeError(f"fn raised an exception that cannot be sent back from its process:\n{text}")
    return _WithTraceback(exc, f'\n"""\n{text}"""')


class _WithTraceback(BaseException):
    """Unpickled as the exception it carries, with the traceback text as its cause."""

    def __init__(self, exc: BaseException, text: str) -> None:
        self.exc = exc
        self.text = text
        # tblib (imported by Dask's distributed) may pickle every exception class with
        # its own reducer, which sets the unpickled exception's __cause__ to this one's.
        self.__cause__ = RemoteTraceback(text)

    def __reduce__(self) -> tuple[Callable[[BaseException, str], BaseException], tuple[BaseException, str]]:
        return _with_cause, (self.exc, self.text)


def _with_cause(exc: BaseException, text: str) -> BaseException:
    exc.__cause__ = RemoteTraceback(text)
    return exc


# -- runners ------------------------------------------------------------------------------
class Runner(Protocol):
    """Where tasks run. ``submit`` must not block; ``done(task_id, result)`` may be called
    from any thread, once per task (a second call for one task is ignored by the driver).

    - ``remote``: work leaves this process, so the engine sends pickles (and names what
      cannot be pickled) and the worker side is ``run_remote``; else ``run_items``.
    - ``target_task_seconds``: how long a task of many tiny items should last, to keep
      the per-task overhead small (the driver sizes tasks from measured item durations).
    - ``cancel_queued``: tasks not yet started are dropped; each gets ``done(id, CANCELLED)``.
    - A remote runner may have ``item_dumps``, the pickler of its items (default: pickle,
      protocol 4); the Dask runner pickles them as Dask would, with cloudpickle.
    - ``close(wait)``: release what the runner started (never a user's executor);
      ``wait=False`` (a second Ctrl-C) does not wait for running work. Only the first
      call counts: a later one returns at once.
    """

    remote: bool
    target_task_seconds: float

    def submit(self, task_id: int, work: Work, done: Done) -> None: ...

    def cancel_queued(self) -> None: ...

    def close(self, wait: bool) -> None: ...


class ThreadRunner:
    """``workers`` daemon threads taking tasks from a queue (daemon: a second Ctrl-C
    leaves at once, where ``ThreadPoolExecutor`` would join them at exit)."""

    remote = False
    target_task_seconds = 0.001

    def __init__(self, workers: int) -> None:
        self._tasks: "queue.SimpleQueue[Optional[tuple[int, Work, Done]]]" = queue.SimpleQueue()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"snapperable-worker-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        get = self._tasks.get
        while (task := get()) is not None:
            task_id, (fn, items, pace), done = task
            try:
                result: TaskResult = run_items(fn, items, pace)
            except BaseException as exc:  # run_items catches fn's errors: this is ours
                result = exc
            done(task_id, result)

    def submit(self, task_id: int, work: Work, done: Done) -> None:
        self._tasks.put((task_id, work, done))

    def cancel_queued(self) -> None:
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                return
            if task is not None:
                task[2](task[0], CANCELLED)

    def close(self, wait: bool) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._tasks.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


class ExecutorRunner:
    """Tasks as futures of a ``concurrent.futures.Executor``.

    ``owned``: the executor is ours (our process pool), shut down on close; a user's is
    never shut down. ``remote`` unless the executor runs work in this process (a
    ``ThreadPoolExecutor``).
    """

    def __init__(self, executor: Executor, *, remote: bool, owned: bool, fn_pickle: Optional[bytes]) -> None:
        self._executor = executor
        self.remote = remote
        self.target_task_seconds = 0.05 if remote else 0.001
        self._owned = owned
        self._fn_pickle = fn_pickle  # None: the pool's initializer has fn already
        self._futures: dict[int, "Future[list[Outcome]]"] = {}
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, task_id: int, work: Work, done: Done) -> None:
        fn, items, pace = work
        if self.remote:
            future = self._executor.submit(run_remote, self._fn_pickle, items)
        else:
            future = self._executor.submit(run_items, fn, items, pace)
        with self._lock:
            self._futures[task_id] = future

        def finished(f: "Future[list[Outcome]]") -> None:
            with self._lock:
                self._futures.pop(task_id, None)
            if f.cancelled():
                done(task_id, CANCELLED)
                return
            exc = f.exception()
            done(task_id, exc if exc is not None else f.result())

        future.add_done_callback(finished)

    def cancel_queued(self) -> None:
        with self._lock:
            futures = list(self._futures.values())
        for future in futures:
            future.cancel()  # only succeeds for what has not started

    def close(self, wait: bool) -> None:
        if not self._owned or self._closed:
            return
        self._closed = True
        if not wait:
            # Ours, and abandoned: stop the workers rather than wait for their items.
            processes = getattr(self._executor, "_processes", None) or {}
            for process in list(processes.values()):
                process.terminate()
        self._executor.shutdown(wait=wait, cancel_futures=True)


def process_context() -> multiprocessing.context.BaseContext:
    """A start method safe with threads running (ours, the writer's): never plain fork."""
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def picklable(what: str, obj: object, hint: str, dumps: Callable[[object], bytes] = _pickle4) -> bytes:
    """``obj`` pickled (by ``dumps``), or a TypeError naming ``what`` could not be."""
    try:
        return dumps(obj)
    except Exception as exc:
        raise TypeError(f"{what} cannot be pickled, so it cannot be sent to {hint}: {exc}") from exc


def pickled_fn(fn: Callable[[Any], Any], where: str) -> bytes:
    """``fn`` pickled for ``where``, or a TypeError naming it."""
    name = getattr(fn, "__qualname__", None)
    what = f"fn {getattr(fn, '__module__', '?')}.{name}" if name else f"fn {reprlib.repr(fn)}"
    return picklable(what, fn, f"{where} (a function defined at module level can be)")


def process_runner(fn: Callable[[Any], Any], workers: int) -> ExecutorRunner:
    fn_pickle = pickled_fn(fn, 'executor="process" workers')
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(
        workers, mp_context=process_context(), initializer=init_process_worker, initargs=(fn_pickle,)
    )
    # The pool starts a process only when a task is submitted: start them all now (with a
    # call that does nothing), so that they boot and unpickle fn while the run opens its
    # checkpoint, rather than after. From a thread: the first submit waits for the fork
    # server to start, which this thread need not wait for.
    threading.Thread(target=_start_processes, args=(pool, workers), name="snapperable-pool-start", daemon=True).start()
    return ExecutorRunner(pool, remote=True, owned=True, fn_pickle=None)


def _start_processes(pool: Executor, workers: int) -> None:
    try:
        for _ in range(workers):
            pool.submit(os.getpid)
    except RuntimeError:  # the run ended (and shut the pool down) first
        pass


# -- the driver -----------------------------------------------------------------------------
class _Entry:
    """An item taken from the iterable and not yet recorded (or dropped)."""

    __slots__ = ("item", "key", "pickled", "attempts", "started")

    def __init__(self, item: Any, key: bytes, pickled: Optional[bytes]) -> None:
        self.item = item
        self.key = key
        self.pickled = pickled  # for a remote runner
        self.attempts = 0
        self.started = 0.0  # of the first attempt


class Driver:
    """Decides what to start and records what finished; no waiting, no threads of its own.

    ``claims`` yields the items to process as ``(item, key)``, lazily. Tasks of up to
    ``batch`` items go out while fewer than ``max_tasks`` are in flight; ``batch`` grows
    from 1 while items turn out shorter than ``target_task_seconds``. Items waiting for
    a retry are not in the window, but at most as many as it holds may wait: beyond
    that, new items wait for retries to fall due. ``commit_slack``: how many tasks' rows the
    writer may have yet to commit beyond the window before no more items are taken
    (see ``backlogged``). ``expected``: how many items the iterable holds, if known:
    as the end nears, a task takes at most its share of what is left (guided
    scheduling), so that the workers finish together rather than one waiting for the
    others' last large tasks.
    """

    def __init__(
        self,
        policy: Policy,
        store: CheckpointStore,
        version: int,
        fn: Callable[[Any], Any],
        claims: Iterator[tuple[Any, bytes]],
        *,
        max_tasks: int,
        remote: bool,
        target_task_seconds: float,
        batching: bool,
        limiter: Optional[RateLimiter],
        progress: Optional[Callable[[int, int], None]],  # (rows saved, of which failed)
        pickle_hint: str = "",
        dumps: Optional[Callable[[object], bytes]] = None,
        commit_slack: int = 0,
        expected: Optional[int] = None,
    ) -> None:
        self._policy = policy
        self._store = store
        self._version = version
        self._fn = fn
        self._claims: Optional[Iterator[tuple[Any, bytes]]] = claims
        self._max_tasks = max_tasks
        self._commit_slack = commit_slack
        self._expected = expected
        self._taken = 0  # items taken from claims (done ones are skipped before: at most expected)
        self._remote = remote
        self._target = target_task_seconds
        self._batching = batching and limiter is None
        self._limiter = limiter
        # Starts in this process are paced where they happen as well (remote ones cannot be).
        self.pacer = None if limiter is None or remote else StartPacer(limiter.interval)
        self._progress = progress
        self._pickle_hint = pickle_hint
        self._dumps = dumps or _pickle4  # the pickler of items for a remote runner
        self._tasks: dict[int, list[_Entry]] = {}
        self._next_task = 0
        self._retries: list[tuple[float, int, _Entry]] = []  # (due, tie-break, entry), a heap
        self._alive = 0  # entries taken and neither recorded nor dropped
        self._per_item = 0.0  # running mean of an item's duration, seconds
        self._consecutive = 0
        self.stopping: Optional[BaseException] = None

    # -- what to start -----------------------------------------------------------------
    def _batch(self) -> int:
        if not self._batching or self._per_item <= 0.0:
            return 1
        batch = max(1, min(MAX_BATCH, int(self._target / self._per_item)))
        if self._expected is not None:  # at most a share of what may be left
            left = self._expected - self._taken
            batch = min(batch, max(1, -(-left // self._max_tasks)))
        return batch

    def ready(self, now: float) -> list[tuple[int, Work]]:
        """Tasks to start now, as ``(task_id, work)``."""
        out: list[tuple[int, Work]] = []
        if self.stopping is not None:
            return out
        limiter = self._limiter
        try:
            while len(self._tasks) < self._max_tasks:
                if limiter is not None and now < limiter.next_at:
                    break
                entries = self._gather(now, self._batch())
                if not entries:
                    break
                if limiter is not None:
                    limiter.take(now)
                task_id = self._next_task
                self._next_task += 1
                self._tasks[task_id] = entries
                if self._remote:
                    out.append((task_id, (None, [e.pickled for e in entries], None)))
                else:
                    out.append((task_id, (self._fn, [e.item for e in entries], self.pacer)))
        except BaseException as exc:  # reading the iterable or keying raised; or a pickle
            self.stop(exc)
        return out

    def backlogged(self) -> bool:
        """Do rows the writer has yet to commit fill the window (and its ``commit_slack``)?
        Items taken but not yet saved stay within it, those rows included, so that a
        crash loses about a window of items however slow the commits: the loop then
        calls ``wait_for_commit`` (off an event loop's thread) before it asks ``ready``
        for more."""
        if self._claims is None or self.stopping is not None:
            return False
        batch = self._batch()
        window = self._max_tasks * batch
        taken = self._alive - len(self._retries)
        return taken < window and window + self._commit_slack * batch <= taken + self._store.unsaved()

    def wait_for_commit(self) -> None:
        """Return once every recorded row is committed (the GIL is released meanwhile;
        running tasks go on); a writer failure stops the run."""
        try:
            self._store.flush()
        except BaseException as exc:
            self.stop(exc)

    def _gather(self, now: float, batch: int) -> list[_Entry]:
        entries: list[_Entry] = []
        retries = self._retries
        while retries and retries[0][0] <= now and len(entries) < batch:
            entries.append(heapq.heappop(retries)[2])
        # Items that wait for a retry do not hold up new ones, up to as many again as run.
        window = self._max_tasks * batch
        waiting = len(retries)
        while len(entries) < batch and self._claims is not None and self._alive - waiting < window and waiting <= window:
            claim = next(self._claims, None)
            if claim is None:
                self._claims = None
                break
            item, key = claim
            pickled = None
            if self._remote:
                pickled = picklable(f"item {reprlib.repr(item)}", item, self._pickle_hint, self._dumps)
            entries.append(_Entry(item, key, pickled))
            self._alive += 1
            self._taken += 1
        return entries

    def wakeup(self, now: float) -> Optional[float]:
        """Seconds until ``ready`` may have something to start without a completion first
        (a retry falls due, the rate limit allows a start), or None."""
        if self.stopping is not None:
            return None
        times = []
        if self._retries:
            times.append(self._retries[0][0])
        if self._limiter is not None and len(self._tasks) < self._max_tasks and (self._retries or self._claims is not None):
            times.append(self._limiter.next_at)
        return max(0.0, min(times) - now) if times else None

    @property
    def finished(self) -> bool:
        """Nothing runs and nothing more will: every item taken is recorded or dropped."""
        if self._tasks:
            return False
        return self.stopping is not None or (self._claims is None and not self._retries)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    # -- what finished -----------------------------------------------------------------
    def failed_unrun(self, error: BaseException) -> None:
        """An item failed before it could run (its key raised) and is recorded as failed:
        a failure in a row all the same."""
        self._consecutive += 1
        self._policy._check_consecutive(self._consecutive, error)

    def stop(self, exc: BaseException) -> None:
        """Take nothing new; drop what waits for a retry (a resumed run redoes it)."""
        if self.stopping is None:
            self.stopping = exc
        self._alive -= len(self._retries)
        self._retries.clear()

    def complete(self, task_id: int, result: TaskResult) -> None:
        """Record a finished task's items (once: a task reported twice is ignored)."""
        entries = self._tasks.pop(task_id, None)
        if entries is None:
            return
        if not isinstance(result, list):  # the task as a whole failed or never started
            self._alive -= len(entries)
            if isinstance(result, BaseException):
                self.stop(result)
            return
        if self._batching:
            spent = sum(ended - started for started, ended, _, _ in result) / len(result)
            self._per_item = spent if self._per_item == 0.0 else (
                self._per_item + EWMA_WEIGHT * (spent - self._per_item))
        in_process = not self._remote  # outputs to pickle here (see run_items)
        saved = 0  # ok rows recorded, reported to the progress bar once per task
        for entry, (started, ended, payload, error) in zip(entries, result):
            if in_process and error is None:
                try:
                    payload = pickle.dumps(payload, PICKLE_PROTOCOL)
                except BaseException as exc:
                    payload, error = None, UnpicklableOutputError.of(payload, exc)
            try:
                saved += self._finish(entry, started, ended, payload, error)
            except BaseException as exc:  # the policy says stop, or the writer failed
                self.stop(exc)
        if saved and self._progress is not None:
            self._progress(saved, 0)

    def _finish(self, entry: _Entry, started: float, ended: float, payload: Optional[bytes],
                error: Optional[BaseException]) -> bool:
        """Record one item's outcome; True if it was an ok row (not yet reported to progress)."""
        entry.attempts += 1
        if entry.attempts == 1:
            entry.started = started
        if error is None:
            self._alive -= 1
            self._store.record(
                (
                    entry.key, self._version, STATUS_OK, self._policy._ok_input(entry.item), payload,
                    None, None, None, entry.attempts, entry.started, ended,
                )
            )
            self._consecutive = 0
            return True
        if self.stopping is not None:
            self._alive -= 1  # not recorded: a resumed run tries it again
            return False
        try:
            decision = self._policy._on_failure(entry.item, error, entry.attempts)
        except BaseException:
            self._alive -= 1
            raise
        if isinstance(decision, float):  # retry it after this delay, on the next free worker
            heapq.heappush(self._retries, (time.monotonic() + decision, id(entry), entry))
            return False
        self._alive -= 1
        self._store.record(self._policy._failure_row(entry.key, self._version, entry.item, decision, entry.started, ended))
        self._consecutive += 1
        if self._progress is not None:
            self._progress(1, 1)
        self._policy._check_consecutive(self._consecutive, error)
        return False


# -- the loops --------------------------------------------------------------------------------
# Put on a sync loop's completion queue to interrupt it as a Ctrl-C would (from another
# thread, or from the SIGINT handler of ``first_ctrl_c_calls``).
INTERRUPT = "interrupt"
# The longest a loop blocks without looking up: a signal the kernel hands to another
# thread than the main one does not wake the main thread's wait.
POLL_SECONDS = 0.25


@contextmanager
def first_ctrl_c_calls(first: Callable[[], None]) -> Iterator[None]:
    """While in the main thread with Python's own SIGINT handler: a first Ctrl-C calls
    ``first`` instead of raising ``KeyboardInterrupt`` wherever the code happens to be
    (half-way through handing a task over, where the task would be lost and waited
    for forever); a second one raises ``KeyboardInterrupt`` as usual. Elsewhere (another
    thread, a handler of the application's) this changes nothing."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    presses = 0

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal presses
        presses += 1
        if presses > 1:
            raise KeyboardInterrupt
        first()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_sync(driver: Driver, runner: Runner, inbox: "Optional[queue.SimpleQueue[Any]]" = None) -> None:
    """Drive ``runner`` from this thread until every item is recorded; raise what stopped it.

    Ctrl-C (KeyboardInterrupt here, or ``INTERRUPT`` put on ``inbox``): the first stops
    taking items, cancels the queued tasks and waits for the running ones, recording
    them; a second stops waiting at once.
    """
    results: "queue.SimpleQueue[Any]" = inbox if inbox is not None else queue.SimpleQueue()
    put = results.put

    def done(task_id: int, result: TaskResult) -> None:
        put((task_id, result))

    abandoned = False
    try:
        with first_ctrl_c_calls(lambda: put(INTERRUPT)):
            _drive(driver, runner, results, done)
    except KeyboardInterrupt:
        abandoned = True
        raise
    finally:
        runner.close(wait=not abandoned)
    if driver.stopping is not None:
        raise driver.stopping


def _drive(driver: Driver, runner: Runner, results: "queue.SimpleQueue[Any]", done: Done) -> None:
    """``run_sync``'s loop; returns once the driver is finished, raises a second Ctrl-C."""
    interrupted = False
    cancelled = False
    while True:
        try:
            if driver.backlogged():
                driver.wait_for_commit()
            now = time.monotonic()
            for task_id, work in driver.ready(now):
                runner.submit(task_id, work, done)
            if driver.stopping is not None and not cancelled:
                cancelled = True
                runner.cancel_queued()
            if driver.finished:
                return
            wait = driver.wakeup(now)
            message = results.get(timeout=POLL_SECONDS if wait is None else min(wait, POLL_SECONDS))
            while True:  # and whatever else finished meanwhile, before starting more
                if message == INTERRUPT:
                    raise KeyboardInterrupt
                driver.complete(*message)
                try:
                    message = results.get_nowait()
                except queue.Empty:
                    break
        except queue.Empty:
            continue
        except KeyboardInterrupt as exc:
            # A second Ctrl-C (the first may have reached the driver while it read the
            # iterable, and stopped it there): stop waiting at once.
            if interrupted or isinstance(driver.stopping, KeyboardInterrupt):
                raise
            interrupted = True
            driver.stop(exc)


async def run_async(driver: Driver, fn: Callable[[Any], Awaitable[Any]]) -> None:
    """Drive an ``async def fn`` on the running loop: a task per item, at most ``max_tasks``
    at once, each recording its own result as it completes. A cancellation of this
    coroutine is a Ctrl-C: the first stops taking items and waits for the running ones
    (recording them), a second stops waiting at once (cancelling them)."""
    import asyncio

    loop = asyncio.get_running_loop()
    running: dict[int, "asyncio.Task[None]"] = {}
    all_done: "asyncio.Future[None]" = loop.create_future()
    timer: list[Optional[asyncio.TimerHandle]] = [None]

    pacer = driver.pacer
    turns = asyncio.Lock() if pacer is not None else None
    committing = [False]  # a wait_for_commit runs in a thread: pump again when it ends

    def committed(_: object) -> None:
        committing[0] = False
        pump()

    async def attempt(task_id: int, item: Any) -> None:
        started = time.time() if pacer is None or turns is None else await pacer.turn(turns)
        try:
            output = await fn(item)
        except asyncio.CancelledError:
            if task_id not in running:  # cancelled by us: abandoned, not a result
                raise
            outcome: Outcome = (started, time.time(), None, asyncio.CancelledError())
        except BaseException as exc:
            outcome = (started, time.time(), None, exc)
        else:
            outcome = (started, time.time(), output, None)
        running.pop(task_id, None)
        driver.complete(task_id, [outcome])
        pump()

    def pump() -> None:
        if committing[0]:
            return
        if driver.backlogged():  # never block the loop on a commit: the tasks run on it
            committing[0] = True
            loop.run_in_executor(None, driver.wait_for_commit).add_done_callback(committed)
            return
        now = time.monotonic()
        for task_id, (_, items, _) in driver.ready(now):
            running[task_id] = loop.create_task(attempt(task_id, items[0]))
        if driver.finished:
            if not all_done.done():
                all_done.set_result(None)
            return
        delay = driver.wakeup(now)
        if timer[0] is not None:
            timer[0].cancel()
            timer[0] = None
        if delay is not None:
            timer[0] = loop.call_later(delay, pump)

    pump()
    cancelled = KeyboardInterrupt()  # what stops the driver when this coroutine is cancelled
    interrupted = False
    while True:
        try:
            await asyncio.shield(all_done)
            break
        except asyncio.CancelledError:
            if interrupted:  # a second one: cancel what runs, wait no more
                tasks = list(running.values())
                running.clear()
                for task in tasks:
                    task.cancel()
                raise
            interrupted = True
            driver.stop(cancelled)
            pump()
    if timer[0] is not None:
        timer[0].cancel()
    if driver.stopping is cancelled:
        raise asyncio.CancelledError
    if driver.stopping is not None:
        raise driver.stopping


# -- a loop in a helper thread ------------------------------------------------------------------
class Background:
    """``body`` in a daemon thread; ``interrupt(abandon)`` is forwarded to it on Ctrl-C
    (``wait_blocking``) or on cancellation (``wait_async``)."""

    def __init__(self, body: Callable[[], None], interrupt: Callable[[bool], None]) -> None:
        self._interrupt = interrupt
        self._error: Optional[BaseException] = None
        self._finished = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

        def run() -> None:
            try:
                body()
            except BaseException as exc:
                self._error = exc
            finally:
                with self._lock:
                    self._finished.set()
                    callbacks = list(self._callbacks)
                for callback in callbacks:
                    callback()

        self._thread = threading.Thread(target=run, name="snapperable-loop", daemon=True)
        self._thread.start()

    def _result(self) -> None:
        if self._error is not None:
            raise self._error

    def wait_blocking(self) -> None:
        interrupted = False

        def first() -> None:
            nonlocal interrupted
            interrupted = True
            self._interrupt(False)

        with first_ctrl_c_calls(first):
            while True:
                try:
                    while not self._finished.wait(POLL_SECONDS):  # timed: Ctrl-C gets through
                        pass
                    break
                except KeyboardInterrupt:
                    self._interrupt(interrupted)
                    if interrupted:
                        raise  # a second Ctrl-C: stop waiting at once
                    interrupted = True
        self._result()

    async def wait_async(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        finished: "asyncio.Future[None]" = loop.create_future()

        def settle() -> None:
            if not finished.done():
                finished.set_result(None)

        def wake() -> None:
            loop.call_soon_threadsafe(settle)

        with self._lock:
            if self._finished.is_set():
                finished.set_result(None)
            else:
                self._callbacks.append(wake)
        interrupted = False
        while True:
            try:
                await asyncio.shield(finished)
                break
            except asyncio.CancelledError:
                self._interrupt(interrupted)
                if interrupted:
                    raise
                interrupted = True
        if interrupted and isinstance(self._error, KeyboardInterrupt):
            raise asyncio.CancelledError  # the interrupt was this coroutine's cancellation
        self._result()


def async_in_thread(make_driver: Callable[[], Driver], fn: Callable[[Any], Awaitable[Any]]) -> Background:
    """``run_async`` on a new event loop in a helper thread (usable whether or not this
    thread runs a loop already, as in a Jupyter cell)."""
    ready = threading.Event()
    state: dict[str, Any] = {}

    def body() -> None:
        import asyncio

        loop = asyncio.new_event_loop()
        try:
            main = loop.create_task(_driven(make_driver, fn))
            state["loop"], state["main"] = loop, main
            ready.set()
            loop.run_until_complete(main)
        finally:
            ready.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def interrupt(abandon: bool) -> None:
        ready.wait()
        loop, main = state.get("loop"), state.get("main")
        if loop is not None and main is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(main.cancel)
            except RuntimeError:  # the loop closed meanwhile: nothing left to interrupt
                pass

    return Background(body, interrupt)


async def _driven(make_driver: Callable[[], Driver], fn: Callable[[Any], Awaitable[Any]]) -> None:
    import asyncio

    try:
        await run_async(make_driver(), fn)
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None  # interrupted from the waiting thread


def sync_in_thread(driver: Driver, runner: Runner) -> Background:
    """``run_sync`` in a helper thread, interrupted through its queue (for ``astart()``)."""
    inbox: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
    return Background(lambda: run_sync(driver, runner, inbox), lambda abandon: inbox.put(INTERRUPT))
