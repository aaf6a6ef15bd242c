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


def client_of(executor: object) -> Any:
    """The ``distributed.Client`` behind ``executor`` (itself, or that of the executor
    ``client.get_executor()`` returns), or None.

    A client exists only once ``distributed`` is imported, so ``sys.modules`` says
    whether there is a class to compare with, and nothing is imported here.
    """
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return None
    if isinstance(executor, distributed.Client):
        return executor
    if isinstance(executor, distributed.cfexecutor.ClientExecutor):
        return executor._client
    return None


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

    def submit(self, task_id: int, work: tuple[Any, list[Any]], done: engine.Done) -> None:
        _, item_pickles = work
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
        size = len(item_pickles)
        future.add_done_callback(lambda finished: self._finished(task_id, size, finished, done))

    def _finished(self, task_id: int, size: int, future: Any, done: engine.Done) -> None:
        with self._lock:
            self._futures.pop(task_id, None)
            ours = task_id in self._cancelled
            self._cancelled.discard(task_id)
        result: engine.TaskResult
        if future.cancelled():
            result = engine.CANCELLED if ours else ClusterTaskError(
                f"a task of {size} item(s) was cancelled on the cluster (was the client "
                "closed?); they are not recorded, the items recorded so far are kept, and "
                "start() again resumes"
            )
        else:
            try:
                result = pickle.loads(future.result())
            except BaseException as exc:
                error = ClusterTaskError(
                    f"the cluster could not run a task of {size} item(s) ({type(exc).__name__}: "
                    f"{exc}); they are not recorded, the items recorded so far are kept, and "
                    "start() again resumes"
                )
                error.__cause__ = exc
                result = error
        future.release()  # now, not when the callback thread lets go of it
        done(task_id, result)

    def cancel_queued(self) -> None:
        """Cancel the tasks the scheduler has not given to a worker yet.

        A task that starts between the question and the cancel is lost, not recorded
        (a later run does it): never recorded twice.
        """
        with self._lock:
            waiting = {future.key: (task_id, future) for task_id, future in self._futures.items()}
        if not waiting:
            return
        try:
            processing: dict[str, list[str]] = self._client.processing()
        except Exception:  # a scheduler that cannot tell: let every task finish
            return
        for keys in processing.values():
            for key in keys:
                waiting.pop(key, None)
        queued = [(task_id, future) for task_id, future in waiting.values() if not future.done()]
        with self._lock:
            self._cancelled.update(task_id for task_id, _ in queued)
        if queued:
            self._client.cancel([future for _, future in queued])

    def close(self, wait: bool) -> None:
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
