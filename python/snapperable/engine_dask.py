"""The engine's runner for a Dask cluster: ``Snapper(items, fn, executor=client)``.

The engine's ``Driver`` does what Dask's ``client.map`` does not: it reads the
iterable lazily, keeps a bounded number of tasks in flight, sizes tasks to the work
(one item while the per-item time is unknown, then about ``target_task_seconds`` of
items) and records each result on the driver as its task completes, once (a task Dask
re-runs after losing a worker completes its future once, and the driver ignores a task
reported twice). This module only moves tasks to the cluster and back:

- ``fn`` travels as cloudpickle bytes with each task (as Dask would send it: a function
  of ``__main__`` or a notebook by value) and is unpickled once per worker process
  (``engine.run_remote``); the items of a task travel as one pickle of their cloudpickles.
- On the worker, ``run_task`` runs ``fn`` over the items, timing each there, and sends
  back one pickle of the outcomes (Dask serializes a list element by element, which costs
  a tiny item more than running it).
- The done callback (Dask runs it in a thread of its own) fetches the outcomes and hands
  them to the driver; a task the cluster could not run becomes a ``ClusterTaskError``.

``distributed`` is an optional extra: the core never imports this module unless an
``executor`` is a Dask client, and ``client_of`` recognises one without importing it.
"""

from __future__ import annotations

import pickle
import sys
import threading
import uuid
from typing import Any, Callable, Optional

from snapperable import engine
from snapperable._contract import PICKLE_PROTOCOL
from snapperable.errors import ClusterTaskError

# ``distributed`` is typed only in part (its Client and Future methods are not): the
# client and its futures are ``Any`` here, and the Snapper's ``executor=`` says Client.
# Long enough that Dask's cost per task (a few ms of scheduler and network time) stays a
# few percent; short enough that tasks even out over the workers at the end of a run,
# and that a Ctrl-C waits little for the tasks that run.
TARGET_TASK_SECONDS = 0.1
WATCH_SECONDS = 0.2  # how often a stopping run looks for tasks that lost their worker


def client_of(executor: object) -> Any:
    """The ``distributed.Client`` behind ``executor`` (itself, or that of the executor
    ``client.get_executor()`` returns), or None; a TypeError for an asynchronous client.

    A client exists only once ``distributed`` is imported, so ``sys.modules`` says
    whether there is a class to compare with, and nothing is imported here.
    """
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return None
    client: Any = None
    if isinstance(executor, distributed.Client):
        client = executor
    elif isinstance(executor, distributed.cfexecutor.ClientExecutor):
        client = executor._client
    if client is not None and client.asynchronous:
        raise TypeError(
            "executor= needs a synchronous distributed.Client: this one was made with "
            "asynchronous=True (use Client(address) and, inside an event loop, await astart())"
        )
    return client


def cluster_threads(client: Any) -> int:
    """The threads of the cluster's workers (at least 1: a cluster may be scaling up)."""
    threads: dict[str, int] = client.nthreads()
    return max(1, sum(threads.values()))


def _cloudpickle(obj: object) -> bytes:
    import cloudpickle  # type: ignore[import-untyped]  # a dependency of distributed

    pickled: bytes = cloudpickle.dumps(obj, protocol=PICKLE_PROTOCOL)
    return pickled


def pickled_fn(fn: Callable[..., Any]) -> bytes:
    """``fn`` as sent to the workers; a TypeError naming it when cloudpickle cannot."""
    return engine.picklable(
        f"fn {getattr(fn, '__qualname__', None) or type(fn).__qualname__}",
        fn,
        "the cluster's workers by cloudpickle (create clients, locks and open files inside fn)",
        _cloudpickle,
    )


class DaskRunner:
    """Tasks as futures on the cluster of a ``distributed.Client`` (the user's: never closed).

    ``submit_options`` go to each ``client.submit`` (those of a ``client.get_executor(...)``:
    ``resources``, ``workers``, ``retries``, ...).
    """

    remote = True
    target_task_seconds = TARGET_TASK_SECONDS
    item_dumps = staticmethod(_cloudpickle)  # items as Dask would send them

    def __init__(self, client: Any, fn: Callable[..., Any], submit_options: Optional[dict[str, Any]] = None) -> None:
        self._client = client
        self._fn_pickle = pickled_fn(fn)
        self._options = dict(submit_options or {})
        self._prefix = f"snapperable-{uuid.uuid4().hex[:12]}"
        self._lock = threading.Lock()
        self._futures: dict[int, Any] = {}  # task id -> its distributed.Future
        self._cancelled: set[int] = set()  # tasks we cancelled: reported as never started
        self._watch: Optional[threading.Thread] = None  # cancels unstarted tasks once stopping
        self._closed = threading.Event()

    def submit(self, task_id: int, work: engine.Work, done: engine.Done) -> None:
        _, item_pickles, _ = work  # remote: no pacer (a rate limit paces the sends)
        future = self._client.submit(
            run_task,
            self._fn_pickle,
            pickle.dumps(item_pickles, PICKLE_PROTOCOL),
            key=f"{self._prefix}-{task_id}",
            pure=False,
            **self._options,
        )
        with self._lock:
            self._futures[task_id] = future
        self._client.loop.add_callback(self._collect, task_id, len(item_pickles), future, done)

    async def _collect(self, task_id: int, size: int, future: Any, done: engine.Done) -> None:
        """On the client's event loop: wait for the task and fetch its outcomes.

        Waiting there, not in a thread: a result whose worker died before it was fetched
        is computed again elsewhere, and meanwhile nothing else waits behind it (Dask's
        done callbacks share one thread). ``distributed.cfexecutor`` waits the same way.
        """
        result: engine.TaskResult
        try:
            result = pickle.loads(await future._result())
        except BaseException as exc:
            with self._lock:
                ours = task_id in self._cancelled
            if future.cancelled() and ours:
                result = engine.CANCELLED
            else:
                why = "was cancelled on the cluster (was the client closed?)" if future.cancelled() else (
                    f"could not run on the cluster ({type(exc).__name__}: {exc})")
                error = ClusterTaskError(
                    f"a task of {size} item(s) {why}; they are not recorded, the items recorded "
                    "so far are kept, and start() again resumes"
                )
                error.__cause__ = exc
                result = error
        with self._lock:
            self._futures.pop(task_id, None)
            self._cancelled.discard(task_id)
        future.release()
        done(task_id, result)

    def cancel_queued(self) -> None:
        """Cancel the tasks no worker runs, now and until the running ones have finished.

        Until then, because a task whose worker dies while the driver waits would wait
        for a new worker: a terminal's Ctrl-C reaches the worker processes of a
        ``LocalCluster`` started by the same script too, and they die of it.
        """
        if self._watch is None:
            self._watch = threading.Thread(target=self._cancel_unstarted_while_waiting, name="snapperable-dask-stop",
                                           daemon=True)
            self._watch.start()

    def _cancel_unstarted_while_waiting(self) -> None:
        while not self._closed.is_set():
            with self._lock:
                if not self._futures:
                    return
            self._cancel_unstarted()
            self._closed.wait(WATCH_SECONDS)

    def _cancel_unstarted(self) -> None:
        """Cancel the tasks the scheduler has not given to a worker.

        A task that starts between the question and the cancel is lost, not recorded
        (a later run does it): never recorded twice.
        """
        with self._lock:
            waiting = {future.key: (task_id, future) for task_id, future in self._futures.items()}
        try:
            processing: dict[str, list[str]] = self._client.processing()
        except Exception:  # a scheduler that cannot tell (or is gone): wait as it is
            return
        for keys in processing.values():
            for key in keys:
                waiting.pop(key, None)
        unstarted = [(task_id, future) for task_id, future in waiting.values() if not future.done()]
        with self._lock:
            self._cancelled.update(task_id for task_id, _ in unstarted)
        if unstarted:
            self._client.cancel([future for _, future in unstarted])

    def close(self, wait: bool) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if wait:
            return  # every task has reported: there is nothing of ours left on the cluster
        with self._lock:  # abandoned (a second Ctrl-C): the cluster stops running our tasks
            futures = list(self._futures.values())
            self._cancelled.update(self._futures)
        if futures:
            self._client.cancel(futures)


def run_task(fn_pickle: bytes, items_pickle: bytes) -> bytes:
    """On a worker: one task's outcomes, as one pickle (see the module docstring)."""
    outcomes = engine.run_remote(fn_pickle, pickle.loads(items_pickle), _cloudpickle)
    return _cloudpickle(outcomes)
