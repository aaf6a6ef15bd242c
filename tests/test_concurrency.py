"""Concurrent runs (issue 12): threads, ``async def``, process pools, user executors, rate limits.

Real parts: real threads, real event loops, real process pools (forkserver), real
children killed with SIGKILL or interrupted with SIGINT (``concurrency_child.py``).
Nothing asserts a duration; where an order of events is asserted, the margin is two
orders of magnitude (a retry due in >= 0.2 s against a few quick items).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import snapperable
from crash_child import VERSION, item_of, make_storage, output_of
from snapperable import Snapper, SnapshotStorage, SQLiteSnapshotStorage, TooManyConsecutiveErrors
from snapperable.engine import RATE_MARGIN, parse_rate_limit, process_context
from snapperable.snapper import CHUNK
from conftest import once, wait_until
from test_durability import child_env, finish, logged_items  # noqa: F401  (child_env: a fixture)

TESTS = Path(__file__).resolve().parent
CHILD = str(TESTS / "concurrency_child.py")
KINDS = ["thread", "async"]  # the in-process engines; the process pool has tests of its own


# -- functions the workers run (module level: a process pool imports them by name) --------
def timed(x: int) -> tuple[int, float, float]:
    """``2x`` and when this call ran, as measured inside it."""
    started = time.time()
    time.sleep(0.002)
    return x * 2, started, time.time()


async def atimed(x: int) -> tuple[int, float, float]:
    started = time.time()
    await asyncio.sleep(0.002)
    return x * 2, started, time.time()


def pid_of(x: int) -> tuple[int, int]:
    return x, os.getpid()


class Calls:
    """A function (sync or async, chosen by ``kind``) that counts its calls per item and
    raises ``exc`` for the items of ``bad`` (the first ``times`` calls of each)."""

    def __init__(self, kind: str, bad: set[int] = set(), exc: type[BaseException] = ValueError,
                 times: int = 10**9, sleep: float = 0.0) -> None:
        self.kind = kind
        self.bad = set(bad)
        self.exc = exc
        self.times = times
        self.sleep = sleep
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def _enter(self, x: int) -> None:
        with self.lock:
            self.calls.append(x)
            count = self.calls.count(x)
        if x in self.bad and count <= self.times:
            raise self.exc(f"bad item {x}")

    def sync(self, x: int) -> int:
        self._enter(x)
        if self.sleep:
            time.sleep(self.sleep)
        return x * 2

    async def asynchronous(self, x: int) -> int:
        self._enter(x)
        if self.sleep:
            await asyncio.sleep(self.sleep)
        return x * 2

    def fn(self) -> Callable[[int], Any]:
        return self.asynchronous if self.kind == "async" else self.sync


def snap(storage: SnapshotStorage[Any], items: Any, fn: Callable[[Any], Any], **kw: Any) -> Snapper[Any, Any]:
    kw.setdefault("workers", 4)
    return Snapper(items, fn, snapshot_storage=storage, version="v", **kw)


def rows_per_key(storage: SnapshotStorage[Any], n: int) -> Counter[bytes]:
    with Snapper(range(n), output_of, snapshot_storage=storage, version=VERSION)._reading() as reader:
        return Counter(row.key for row in reader.rows(None))


# -- 2. results, order, duplicates, metrics -------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_results_in_input_order_duplicates_once_metrics_per_item(storage: SnapshotStorage[Any], kind: str) -> None:
    items = [i % 40 for i in range(60)]  # 40 unique, 20 repeated
    calls = Calls(kind, sleep=0.002)
    snapper = snap(storage, items, calls.fn(), workers=8)
    snapper.start()
    assert snapper.load() == [2 * x for x in items]
    assert sorted(calls.calls) == list(range(40))  # each unique item once
    metrics = snapper.load_metrics()
    assert len(metrics) == 40 and all(m.success and m.attempts == 1 for m in metrics)


@pytest.mark.parametrize("kind", KINDS)
def test_each_metric_is_its_own_items_start_and_end(storage: SnapshotStorage[Any], kind: str) -> None:
    snapper = snap(storage, range(30), atimed if kind == "async" else timed, workers=6)
    snapper.start()
    outputs = snapper.load()
    by_key = {m.key: m for m in snapper.load_metrics()}
    from snapperable.keys import input_key

    for x, (doubled, ran_from, ran_to) in enumerate(outputs):
        metric = by_key[input_key(x).hex()]
        assert doubled == 2 * x
        assert metric.started <= ran_from <= ran_to <= metric.ended


def test_async_fn_runs_as_tasks_on_one_thread_at_most_workers_at_once(storage: SnapshotStorage[Any]) -> None:
    running = 0
    most = 0
    threads: set[int] = set()

    async def fn(x: int) -> int:
        nonlocal running, most
        threads.add(threading.get_ident())
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.005)
        running -= 1
        return x

    snapper = snap(storage, range(200), fn, workers=20)
    snapper.start()
    assert snapper.load() == list(range(200))
    assert len(threads) == 1 and threading.get_ident() not in threads  # the helper thread's loop
    assert 1 < most <= 20


def test_start_inside_a_running_loop_and_astart(storage: SnapshotStorage[Any]) -> None:
    calls = Calls("async")

    async def notebook_cell() -> list[int]:
        snap(storage, range(10), calls.asynchronous).start()  # a loop runs in this thread
        more = snap(storage, range(20), calls.asynchronous, workers=5)
        await more.astart()
        return more.load()

    assert asyncio.run(notebook_cell()) == [2 * x for x in range(20)]
    assert sorted(calls.calls) == list(range(20))


def test_astart_with_a_plain_fn_and_no_workers(storage: SnapshotStorage[Any]) -> None:
    calls = Calls("thread")
    snapper = Snapper(range(15), calls.sync, snapshot_storage=storage, version="v")

    async def main() -> None:
        await snapper.astart()

    asyncio.run(main())
    assert snapper.load() == [2 * x for x in range(15)]


def test_progress_bar_counts_every_item(storage: SnapshotStorage[Any], capsys: pytest.CaptureFixture[str]) -> None:
    snap(storage, range(10), Calls("thread").sync).start()  # 10 done before
    snapper = snap(storage, range(25), Calls("thread").sync, progress=True)
    snapper.start()
    assert "25/25" in capsys.readouterr().err


# -- 1. lazy reading, a bounded window -----------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_iterable_read_lazily_with_a_bounded_window(tmp_path: Path, kind: str) -> None:
    workers = 4
    yielded = 0
    finished = 0
    ahead: list[int] = []  # items read from the iterable but not finished, seen at each call
    lock = threading.Lock()

    def items() -> Iterator[int]:
        nonlocal yielded
        for i in range(1500):
            yielded += 1
            yield i

    def record(x: int) -> int:
        nonlocal finished
        with lock:
            ahead.append(yielded - finished)
            finished += 1
        return x

    def fn(x: int) -> int:
        time.sleep(0.0015)  # above the thread runner's task target: one item per task
        return record(x)

    async def afn(x: int) -> int:
        await asyncio.sleep(0.0015)
        return record(x)

    storage = SQLiteSnapshotStorage[int](str(tmp_path / "run.db"))
    snapper = snap(storage, items(), afn if kind == "async" else fn, workers=workers)
    snapper.start()
    assert len(snapper.load()) == 1500
    # What the chunking reads ahead (as in a sequential run) plus the engine's window.
    assert max(ahead) <= CHUNK + 2 * workers + 1


def test_tasks_shrink_as_the_end_nears(db: SQLiteSnapshotStorage[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # Guided scheduling: with the iterable's length known, each task takes at most its
    # share (1 / tasks in flight) of what is left, so the last ones are single items.
    from snapperable import engine

    tasks: list[tuple[int, int]] = []  # (items left before the task, its size)
    gather = engine.Driver._gather

    def recording(self: engine.Driver, now: float, batch: int) -> list[Any]:
        left = 3000 - self._taken
        entries = gather(self, now, batch)
        if entries:
            tasks.append((left, len(entries)))
        return entries

    monkeypatch.setattr(engine.Driver, "_gather", recording)
    snap(db, list(range(3000)), output_of, workers=2).start()
    assert sum(size for _, size in tasks) == 3000
    max_tasks = 2 * 2
    assert all(size <= -(-left // max_tasks) for left, size in tasks), tasks
    assert max(size for _, size in tasks) > 100  # tiny items: large tasks while much is left
    assert [size for _, size in tasks[-max_tasks:]] == [1] * max_tasks


# -- 4. failures -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_error_stops_taking_items_saves_the_finished_ones_then_raises(storage: SnapshotStorage[Any], kind: str) -> None:
    calls = Calls(kind, bad={7}, sleep=0.003)
    with pytest.raises(ValueError, match="bad item 7"):
        snap(storage, range(200), calls.fn()).start()
    ran = set(calls.calls) - {7}
    assert len(calls.calls) < 200  # it stopped taking items
    saved = {x // 2 for x in snap(storage, range(200), calls.fn()).load()}
    assert saved == ran  # everything that ran, and finished, was saved; not the failing one
    calls.bad.clear()
    rerun = Calls(kind)
    snap(storage, range(200), rerun.fn()).start()
    assert sorted(rerun.calls) == sorted(set(range(200)) - ran)  # only the rest


@pytest.mark.parametrize("kind", KINDS)
def test_skip_item_errors_and_retry_failed_items(storage: SnapshotStorage[Any], kind: str) -> None:
    calls = Calls(kind, bad={3, 11, 17})
    snapper = snap(storage, range(20), calls.fn(), skip_item_errors=True)
    snapper.start()
    assert snapper.load() == [2 * x for x in range(20) if x not in (3, 11, 17)]
    assert sorted(f.item for f in snapper.failed_items) == [3, 11, 17]
    failures = [m for m in snapper.load_metrics() if not m.success]
    assert sorted(m.item for m in failures) == [3, 11, 17]
    assert all(m.error_type == "builtins.ValueError" and m.traceback and "bad item" in m.traceback for m in failures)
    again = Calls(kind)
    snap(storage, range(20), again.fn(), skip_item_errors=True).start()
    assert again.calls == []  # failures are not retried by default
    snap(storage, range(20), again.fn(), retry_failed_items=True).start()
    assert sorted(again.calls) == [3, 11, 17]
    assert snap(storage, range(20), again.fn()).load() == [2 * x for x in range(20)]


@pytest.mark.parametrize("kind", KINDS)
def test_fatal_exceptions_raise_even_when_skipping(storage: SnapshotStorage[Any], kind: str) -> None:
    calls = Calls(kind, bad={5}, exc=KeyError, sleep=0.002)
    with pytest.raises(KeyError):
        snap(storage, range(100), calls.fn(), skip_item_errors=True, fatal_exceptions=(KeyError,)).start()
    assert len(calls.calls) < 100
    assert 5 * 2 not in snap(storage, range(100), calls.fn()).load()


@pytest.mark.parametrize("kind", KINDS)
def test_max_consecutive_exceptions_counts_in_completion_order(storage: SnapshotStorage[Any], kind: str) -> None:
    calls = Calls(kind, bad=set(range(10, 1000)), sleep=0.001)
    snapper = snap(storage, range(1000), calls.fn(), skip_item_errors=True, max_consecutive_exceptions=5, workers=2)
    with pytest.raises(TooManyConsecutiveErrors, match="consecutive items failed") as info:
        snapper.start()
    assert isinstance(info.value.__cause__, ValueError)
    assert len(calls.calls) < 100  # halted soon after the failures began
    assert snap(storage, range(10), calls.fn()).load() == [2 * x for x in range(10)]
    assert len([m for m in snapper.load_metrics() if not m.success]) >= 5


@pytest.mark.parametrize("kind", KINDS)
def test_retry_waits_without_holding_the_worker(storage: SnapshotStorage[Any], kind: str) -> None:
    # One worker; item 0 fails once and is due again in 0.2-0.4 s. The other items (a few
    # milliseconds in all) run in the meantime, on that same worker.
    calls = Calls(kind, bad={0}, exc=ConnectionError, times=1)
    snapper = snap(storage, range(10), calls.fn(), workers=1, retries=2, retry_on=(ConnectionError,), retry_backoff=0.4)
    snapper.start()
    assert calls.calls[0] == 0 and calls.calls[-1] == 0 and sorted(calls.calls[1:-1]) == list(range(1, 10))
    assert snapper.load() == [2 * x for x in range(10)]
    assert sorted(m.attempts for m in snapper.load_metrics()) == [1] * 9 + [2]


@pytest.mark.parametrize("kind", KINDS)
def test_unpicklable_output_is_an_item_failure(storage: SnapshotStorage[Any], kind: str) -> None:
    # The driver pickles what ran in this process as it records it: the failure is the
    # item's, the items after it are recorded, and none of them ran twice.
    calls: list[int] = []

    def fn(x: int) -> Any:
        calls.append(x)
        return threading.Lock() if x == 2 else x

    async def afn(x: int) -> Any:
        return fn(x)

    snapper = snap(storage, range(5), afn if kind == "async" else fn, skip_item_errors=True)
    snapper.start()
    assert snapper.load() == [0, 1, 3, 4]
    assert sorted(calls) == [0, 1, 2, 3, 4]
    assert [type(f.exception).__name__ for f in snapper.failed_items] == ["UnpicklableOutputError"]
    assert "lock" in str(snapper.failed_items[0].exception)


# -- rate limits ------------------------------------------------------------------------------
def test_rate_limit_forms() -> None:
    assert parse_rate_limit(10) == pytest.approx(0.1)
    assert parse_rate_limit(2.5) == pytest.approx(0.4)
    assert parse_rate_limit("10/s") == pytest.approx(0.1)
    assert parse_rate_limit("600/min") == pytest.approx(0.1)
    assert parse_rate_limit(" 3600 / h ") == pytest.approx(1.0)
    for bad in ("10", "ten/s", "10/day", "0/s"):
        with pytest.raises(ValueError):
            parse_rate_limit(bad)
    with pytest.raises(ValueError):
        parse_rate_limit(0)
    with pytest.raises(TypeError):
        parse_rate_limit(True)
    with pytest.raises(ValueError):
        Snapper(range(3), output_of, rate_limit="fast")


@pytest.mark.parametrize("kind", KINDS)
def test_rate_limit_paces_every_start_retries_included(storage: SnapshotStorage[Any], kind: str) -> None:
    calls = Calls(kind, bad={0}, exc=ConnectionError, times=1)
    snapper = snap(storage, range(8), calls.fn(), workers=4, rate_limit="40/s", retries=1,
                   retry_on=(ConnectionError,), retry_backoff=0.0)
    starts: list[float] = []
    original = calls._enter

    def enter(x: int) -> None:
        starts.append(time.monotonic())
        original(x)

    calls._enter = enter  # type: ignore[method-assign]
    snapper.start()
    assert len(starts) == 9  # 8 items and one retry, all paced
    # A pacing property, not a speed goal: 9 starts at 40/s span at least 8 intervals
    # (less what one start's hand-off to its worker may lag behind the next one's).
    assert starts[-1] - starts[0] >= 8 / 40 * RATE_MARGIN - 0.02
    # Recorded starts are paced where they happen: never two closer than 1/40 s, so no
    # one-second window can hold more than 40.
    recorded = sorted(m.started for m in snapper.load_metrics())
    assert min(b - a for a, b in zip(recorded, recorded[1:])) >= 1 / 40


# -- processes and user executors ---------------------------------------------------------------
@pytest.fixture
def db(tmp_path: Path) -> SQLiteSnapshotStorage[Any]:
    return SQLiteSnapshotStorage(str(tmp_path / "run.db"))


@once  # the pool and the driver do not depend on the backend
def test_process_pool_runs_in_other_processes_with_metrics_from_there(db: SQLiteSnapshotStorage[Any]) -> None:
    snapper = snap(db, range(40), pid_of, executor="process", workers=2)
    snapper.start()
    outputs = snapper.load()
    assert [x for x, _ in outputs] == list(range(40))
    pids = {pid for _, pid in outputs}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    timed_run = snap(SQLiteSnapshotStorage(db.path + "2"), range(10), timed, executor="process", workers=2)
    timed_run.start()
    from snapperable.keys import input_key

    by_key = {m.key: m for m in timed_run.load_metrics()}
    for x, (_, ran_from, ran_to) in enumerate(timed_run.load()):
        assert by_key[input_key(x).hex()].started <= ran_from <= ran_to <= by_key[input_key(x).hex()].ended


@once  # the pool and the driver do not depend on the backend
def test_process_pool_failures_carry_their_traceback(db: SQLiteSnapshotStorage[Any]) -> None:
    snapper = snap(db, [1, 0, 2], _reciprocal, executor="process", workers=2, skip_item_errors=True)
    snapper.start()
    assert snapper.load() == [1.0, 0.5]
    [failure] = [m for m in snapper.load_metrics() if not m.success]
    assert failure.error_type == "builtins.ZeroDivisionError" and failure.item == 0
    assert failure.traceback is not None and "_reciprocal" in failure.traceback  # raised over there
    with pytest.raises(ZeroDivisionError):
        snap(SQLiteSnapshotStorage(db.path + "2"), [0], _reciprocal, executor="process", workers=1).start()


def _reciprocal(x: int) -> float:
    return 1 / x


@once  # the pool and the driver do not depend on the backend
def test_unpicklable_fn_or_item_named_before_any_work(db: SQLiteSnapshotStorage[Any]) -> None:
    with pytest.raises(TypeError, match="fn .*lambda.* cannot be pickled"):
        snap(db, range(5), lambda x: x, executor="process").start()
    lock = threading.Lock()
    with pytest.raises(TypeError, match="item .*lock.* cannot be pickled"):
        snap(db, [lock, lock], pid_of, executor="process", key=lambda _: 1).start()
    assert snap(db, range(5), pid_of).load() == []  # nothing ran, nothing was saved


@once  # the pool and the driver do not depend on the backend
def test_a_run_that_fails_before_its_loop_stops_the_pool_it_started(tmp_path: Path) -> None:
    # The pool's workers start before the checkpoint is opened; a file that is no
    # checkpoint fails the open, and the workers are stopped, not left behind.
    import multiprocessing

    path = tmp_path / "not-a-checkpoint.db"
    path.write_bytes(b"this is not a SQLite file" * 100)
    with pytest.raises(snapperable.CheckpointCorruptError):
        snap(SQLiteSnapshotStorage(str(path)), range(5), pid_of, executor="process", workers=2).start()
    assert multiprocessing.active_children() == []


@once  # the pool and the driver do not depend on the backend
def test_users_executors_are_used_and_never_shut_down(db: SQLiteSnapshotStorage[Any]) -> None:
    with ThreadPoolExecutor(3) as threads:
        calls = Calls("thread")
        snap(db, range(30), calls.sync, executor=threads, workers=None).start()
        assert sorted(calls.calls) == list(range(30))
        assert threads.submit(lambda: 42).result() == 42  # still open
    with ProcessPoolExecutor(2, mp_context=process_context()) as processes:
        other = SQLiteSnapshotStorage[Any](db.path + "2")
        snapper = snap(other, range(20), pid_of, executor=processes)
        snapper.start()
        assert [x for x, _ in snapper.load()] == list(range(20))
        assert processes.submit(pid_of, 1).result()[1] != os.getpid()  # still open


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="workers"):
        Snapper(range(3), output_of, workers=0)
    with pytest.raises(ValueError, match="executor"):
        Snapper(range(3), output_of, executor="gpu")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="executor"):
        Snapper(range(3), output_of, executor=object())  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="async def"):
        Snapper(range(3), atimed, executor="process")


# -- 3. SIGKILL of workers=32 runs, then resume ------------------------------------------------
KILL_AT = [1, 211, 397]  # items logged since the run began, at each kill
KILL_ITEMS = 1000
KILL_WORKERS = 32
# Finished items a kill may lose: those taken but not yet saved, which the engine keeps
# within its window of 2 x workers, the writer's uncommitted rows included (it waits for
# a commit rather than take more); the margin covers the rows of the tasks that
# completed since the engine last looked.
KILL_LOSS = 2 * KILL_WORKERS + 16


def spawn(env: dict[str, str], *args: str, **kw: Any) -> "subprocess.Popen[bytes]":
    return subprocess.Popen(
        [sys.executable, CHILD, *args], env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw,
    )


def saved_set(kind: str, path: str, n: int) -> set[int]:
    outputs = Snapper(range(n), output_of, snapshot_storage=make_storage(kind, path), version=VERSION).load()
    items = [item_of(o) for o in outputs]
    assert [output_of(x) for x in items] == outputs
    return set(items)


@pytest.mark.parametrize("storage_kind", ["sqlite", "pickle"])
@pytest.mark.parametrize("executor", ["thread", "async"])
def test_sigkill_of_32_workers_loses_only_in_flight_items(
    tmp_path: Path, storage_kind: str, executor: str, child_env: dict[str, str], backend: str
) -> None:
    if executor == "async" and (backend, storage_kind) not in (("rust", "sqlite"), ("python", "pickle")):
        pytest.skip("the engine's recording does not depend on fn being async; two combinations suffice")
    path = str(tmp_path / ("run.db" if storage_kind == "sqlite" else "run.pkl"))
    log = tmp_path / "calls.log"
    args = [storage_kind, path, "--n", str(KILL_ITEMS), "--log", str(log), "--sleep", "0.01",
            "--workers", str(KILL_WORKERS), "--executor", executor]
    saved_before: set[int] = set()
    redone = 0
    for grow in KILL_AT:
        already = len(logged_items(log))
        proc = spawn(child_env, *args)
        wait_until(lambda: len(logged_items(log)) >= already + grow, 30, f"{grow} items", proc)
        proc.send_signal(signal.SIGKILL)
        assert finish(proc)[0] == -signal.SIGKILL, "the child finished before it was killed"
        this_run = logged_items(log)[already:]
        saved = saved_set(storage_kind, path, KILL_ITEMS)
        assert saved >= saved_before, "a kill lost items saved before it"
        assert not set(this_run) & saved_before, "a resumed run redid saved items"
        lost = set(this_run) - saved
        assert len(lost) <= KILL_LOSS, f"the kill lost {len(lost)} finished items"
        redone += len(lost)
        saved_before = saved
    code, _, err = finish(spawn(child_env, *args))
    assert code == 0, err
    calls = logged_items(log)
    assert sorted(set(calls)) == list(range(KILL_ITEMS))
    assert len(calls) - KILL_ITEMS == redone
    per_key = rows_per_key(make_storage(storage_kind, path), KILL_ITEMS)
    assert len(per_key) == KILL_ITEMS and set(per_key.values()) == {1}  # each item recorded once


# -- 5. Ctrl-C --------------------------------------------------------------------------------
@pytest.mark.parametrize("executor", ["thread", "async", "process"])
def test_ctrl_c_waits_for_running_items_and_saves_them(
    tmp_path: Path, executor: str, child_env: dict[str, str], backend: str
) -> None:
    if executor == "process" and backend == "python":
        pytest.skip("the process pool does not depend on the backend; run once")
    path = str(tmp_path / "run.db")
    log = tmp_path / "calls.log"
    args = ["sqlite", path, "--n", "400", "--log", str(log), "--sleep", "0.2", "--workers", "8", "--executor", executor]
    # Its own session and process group, as a terminal's foreground job: the Ctrl-C goes
    # to the whole group, process workers included (they ignore it).
    proc = spawn(child_env, *args, start_new_session=True)
    wait_until(lambda: len(logged_items(log)) >= 8, 30, "8 items", proc)
    os.killpg(proc.pid, signal.SIGINT)
    code, _, err = finish(proc)
    assert "KeyboardInterrupt" in err and code != 0, (code, err)
    logged = logged_items(log)
    saved = saved_set("sqlite", path, 400)
    assert set(logged) == saved, err  # every item that ran to the end was waited for and saved
    assert len(saved) < 400
    code, _, err = finish(spawn(child_env, *args[:-4], "--sleep", "0", "--workers", "8", "--executor", executor))
    assert code == 0, err
    assert saved_set("sqlite", path, 400) == set(range(400))
    assert len(logged_items(log)) == 400  # the resumed run did only the rest


@pytest.mark.parametrize("executor", ["thread", "async"])
def test_second_ctrl_c_stops_waiting(tmp_path: Path, executor: str, child_env: dict[str, str]) -> None:
    path = str(tmp_path / "run.db")
    log = tmp_path / "calls.log"
    quick = ["sqlite", path, "--n", "20", "--log", str(log), "--sleep", "0", "--workers", "4", "--executor", executor]
    assert finish(spawn(child_env, *quick))[0] == 0
    # Items of an hour each: a first Ctrl-C would wait for them; the second must not.
    slow = ["sqlite", path, "--n", "40", "--log", str(log), "--sleep", "3600", "--workers", "4", "--executor", executor]
    proc = spawn(child_env, *slow)
    assert proc.stderr is not None
    wait_until(lambda: os.path.exists(path + "-wal") and _holds_lock(path), 30, "the run to start", proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # not a wait for a result: leaves the first Ctrl-C time to arrive alone
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc, timeout=30)
    assert "KeyboardInterrupt" in err and code != 0, (code, err)
    assert saved_set("sqlite", path, 40) == set(range(20))  # consistent, and resumable
    assert finish(spawn(child_env, *quick[:3], "40", *quick[4:]))[0] == 0
    assert saved_set("sqlite", path, 40) == set(range(40))


def _holds_lock(path: str) -> bool:
    """Whether some process holds the checkpoint's lock (the child has started its run)."""
    import fcntl

    try:
        fd = os.open(path + ".lock", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", KINDS)
def test_cancelling_astart_waits_for_running_items_and_saves_them(tmp_path: Path, kind: str) -> None:
    storage = SQLiteSnapshotStorage[int](str(tmp_path / "run.db"))
    calls = Calls(kind, sleep=0.1)
    snapper = snap(storage, range(100), calls.fn(), workers=4)

    async def main() -> None:
        task = asyncio.ensure_future(snapper.astart())
        while len(calls.calls) < 6:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    started = set(calls.calls)
    assert len(started) < 100
    assert {x // 2 for x in snap(storage, range(100), calls.fn()).load()} == started  # all finished, all saved
