"""Scale-out on a Dask cluster: ``Snapper(items, fn, executor=client)``.

Real clusters only: a ``LocalCluster`` on loopback, once with worker processes and once
with worker threads, started once for the module; worker processes killed with
SIGKILL; a driver process (``dask_child.py``) interrupted with SIGINT. ``fn`` runs on the
workers and the checkpoint on the driver, so what the tests count is read from the
checkpoint's rows (every item recorded once) and from files the workers append to.
Skipped only where ``distributed`` is not installed (the ``test`` extra installs it).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import pytest

distributed = pytest.importorskip("distributed", reason="distributed is not installed (pip install 'snapperable[dask]')")

import snapperable  # noqa: E402
from conftest import once, wait_until  # noqa: E402
from dask_child import VERSION as CHILD_VERSION, logged  # noqa: E402
from snapperable import ClusterTaskError, Snapper, SQLiteSnapshotStorage  # noqa: E402
from snapperable.keys import input_key  # noqa: E402

TESTS = Path(__file__).resolve().parent
PACKAGE_ROOT = Path(snapperable.__file__).resolve().parent.parent
# A worker of a thread cluster serves HTTP (metrics) on 8787 or, when taken, elsewhere.
pytestmark = pytest.mark.filterwarnings("ignore:Port 8787 is already in use:UserWarning")

VERSION = "dask-v1"  # pinned: a resumed run with another function object keeps the results


# -- clusters ---------------------------------------------------------------------------------
def _cluster(processes: bool) -> Iterator[Any]:
    with distributed.LocalCluster(
        host="127.0.0.1", protocol="tcp://", dashboard_address=None, n_workers=2, threads_per_worker=1,
        processes=processes,
    ) as cluster, distributed.Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def process_client() -> Iterator[Any]:
    yield from _cluster(processes=True)


@pytest.fixture(scope="module")
def thread_client() -> Iterator[Any]:
    yield from _cluster(processes=False)


@pytest.fixture(params=["processes", "threads"])
def client(request: pytest.FixtureRequest) -> Any:
    """Each cluster in turn (each started once for the module)."""
    return request.getfixturevalue("process_client" if request.param == "processes" else "thread_client")


# -- what runs on the workers (module level: the workers import this module) ------------------
def plus_one(x: int) -> int:
    return x + 1


def where(x: int) -> tuple[int, str, int]:
    """``x + 1``, the task that ran it and the process it ran in."""
    task = distributed.get_worker().get_current_task()
    return x + 1, str(task), os.getpid()


def slow_where(x: int) -> tuple[int, str, int]:
    time.sleep(0.15)  # longer than a task should last: one item per task
    return where(x)


def fails_on_odd(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd item {x}")
    return x


class Fatal(Exception):
    pass


def fatal_at(bad: int, x: int) -> int:
    time.sleep(0.002)
    if x == bad:
        raise Fatal(f"item {x} is fatal")
    return x


def fails_first_time(marker_dir: str, x: int) -> int:
    """Raises on the first call for ``x`` (the workers share this machine's files)."""
    marker = Path(marker_dir) / str(x)
    if not marker.exists():
        marker.touch()
        raise ConnectionError(f"flaky on {x}")
    return x * 10


def kills_its_worker_at(bad: int, log: str, x: int) -> int:
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return logged(log, 0.005, x)


# -- helpers -----------------------------------------------------------------------------------
def storage(tmp_path: Path) -> SQLiteSnapshotStorage[Any]:
    return SQLiteSnapshotStorage(str(tmp_path / "run.db"))


def recorded(tmp_path: Path, items: Iterable[Any]) -> Counter[Any]:
    """How many rows the checkpoint holds for each item (any status, any version)."""
    by_key = {input_key(x): x for x in items}
    with Snapper[int, int]([], plus_one, snapshot_storage=storage(tmp_path), version=VERSION) as reader:
        store = reader._open().store
        return Counter(by_key[row.key] for row in store.rows(None))


def logged_items(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()] if log.exists() else []


def worker_pids(client: Any) -> list[int]:
    pids: dict[str, int] = client.run(os.getpid)
    return sorted(pids.values())


# -- the run ------------------------------------------------------------------------------------
def test_fn_runs_on_the_workers_and_every_item_is_recorded_once(client: Any, tmp_path: Path) -> None:
    items = list(range(3000)) + [5, 5, 7]  # duplicates run once
    with Snapper(items, where, executor=client, snapshot_storage=storage(tmp_path), version=VERSION) as snapper:
        snapper.start()
        outputs = snapper.load()
    assert [out for out, _, _ in outputs] == [x + 1 for x in items]
    assert recorded(tmp_path, items) == Counter(range(3000))
    tasks = Counter(task for _, task, _ in outputs[:3000])
    # Tiny items travel many to a task (one task per item would be 3000 tasks).
    assert len(tasks) < 300 and max(tasks.values()) > 10, tasks
    if client.cluster.processes:
        assert {pid for _, _, pid in outputs} <= set(worker_pids(client))
        assert os.getpid() not in {pid for _, _, pid in outputs}


def test_slow_items_go_one_to_a_task(client: Any, tmp_path: Path) -> None:
    with Snapper(range(6), slow_where, executor=client, snapshot_storage=storage(tmp_path), version=VERSION) as snapper:
        snapper.start()
        tasks = [task for _, task, _ in snapper.load()]
    assert len(set(tasks)) == 6


def test_the_executor_of_get_executor_runs_on_the_cluster_too(client: Any, tmp_path: Path) -> None:
    executor = client.get_executor()
    with Snapper(range(50), where, executor=executor, snapshot_storage=storage(tmp_path), version=VERSION) as snapper:
        snapper.start()
        outputs = snapper.load()
    assert [out for out, _, _ in outputs] == list(range(1, 51))
    assert all(task.startswith("snapperable-") for _, task, _ in outputs)  # our chunked tasks


def test_the_options_of_get_executor_go_with_every_task(process_client: Any, tmp_path: Path) -> None:
    client = process_client
    chosen, pid = next(iter(client.run(os.getpid).items()))
    executor = client.get_executor(workers=[chosen], allow_other_workers=False)
    with Snapper(range(300), where, executor=executor, snapshot_storage=storage(tmp_path), version=VERSION) as snapper:
        snapper.start()
        assert {ran_in for _, _, ran_in in snapper.load()} == {pid}


@once  # nothing of the backend is involved
def test_importing_snapperable_never_imports_distributed(backend_env: dict[str, str]) -> None:
    env = dict(backend_env)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    code = "import sys, snapperable; from snapperable import Snapper; print(sorted(m for m in sys.modules if m.split('.')[0] in ('distributed', 'dask', 'cloudpickle')))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_astart_runs_on_the_cluster(client: Any, tmp_path: Path) -> None:
    async def main() -> list[tuple[int, str, int]]:
        with Snapper(range(100), where, executor=client, snapshot_storage=storage(tmp_path), version=VERSION) as snapper:
            await snapper.astart()
            return snapper.load()

    assert [out for out, _, _ in asyncio.run(main())] == list(range(1, 101))
    assert recorded(tmp_path, range(100)) == Counter(range(100))


def test_an_async_fn_is_refused_with_a_client(client: Any, tmp_path: Path) -> None:
    async def coroutine_fn(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="async def fn"):
        Snapper(range(3), coroutine_fn, executor=client, snapshot_storage=storage(tmp_path))


def test_an_asynchronous_client_is_refused_clearly(process_client: Any, tmp_path: Path) -> None:
    async def make() -> None:
        async with distributed.Client(process_client.scheduler.address, asynchronous=True) as client:
            with pytest.raises(TypeError, match="needs a synchronous distributed.Client"):
                Snapper(range(3), plus_one, executor=client, snapshot_storage=storage(tmp_path))

    asyncio.run(make())


def test_the_iterable_is_read_lazily(client: Any, tmp_path: Path) -> None:
    # An endless iterable: client.map would never return. A fatal item stops the run
    # after a bounded read (at most the tasks in flight of at most 1024 items each).
    taken = itertools.count()
    endless = (next(taken) * 0 + x for x in itertools.count())
    snapper = Snapper(
        endless, functools.partial(fatal_at, 300), executor=client, snapshot_storage=storage(tmp_path),
        version=VERSION, fatal_exceptions=(Fatal,),
    )
    with pytest.raises(Fatal, match="item 300 is fatal"):
        snapper.start()
    assert 300 < next(taken) < 300 + 4 * 1024


# -- failures -----------------------------------------------------------------------------------
def test_skip_item_errors_records_each_failure_with_its_worker_traceback(client: Any, tmp_path: Path) -> None:
    with Snapper(
        range(40), fails_on_odd, executor=client, snapshot_storage=storage(tmp_path), version=VERSION,
        skip_item_errors=True,
    ) as snapper:
        snapper.start()
        assert snapper.load() == list(range(0, 40, 2))
        failures = [m for m in snapper.load_metrics() if not m.success]
    assert sorted(f.item for f in failures) == list(range(1, 40, 2))
    assert sorted(x for f in snapper.failed_items for x in [f.item]) == list(range(1, 40, 2))
    for failure in failures:
        assert failure.error_type == "builtins.ValueError" and failure.error == f"odd item {failure.item}"
        assert failure.traceback is not None and "in fails_on_odd" in failure.traceback
    assert recorded(tmp_path, range(40)) == Counter(range(40))


def test_a_failure_keeps_its_traceback_when_tblib_pickles_exceptions() -> None:
    # distributed installs tblib's reducer for every exception class that exists when it
    # is imported: the engine's, too, when the engine was imported first.
    import copyreg

    import cloudpickle  # type: ignore[import-untyped]
    import tblib.pickling_support  # type: ignore[import-untyped]

    from snapperable import engine

    copyreg.pickle(engine._WithTraceback, tblib.pickling_support.pickle_exception)
    try:
        [(_, _, _, exc)] = pickle.loads(cloudpickle.dumps(engine.run_remote(
            cloudpickle.dumps(fails_on_odd), [pickle.dumps(3)], cloudpickle.dumps
        )))
    finally:
        del copyreg.dispatch_table[engine._WithTraceback]
    assert isinstance(exc, ValueError) and "in fails_on_odd" in str(exc.__cause__)


def test_an_error_stops_the_run_after_saving_what_finished(client: Any, tmp_path: Path) -> None:
    snapper = Snapper(range(40), fails_on_odd, executor=client, snapshot_storage=storage(tmp_path), version=VERSION)
    with pytest.raises(ValueError, match="odd item"):
        snapper.start()
    saved = recorded(tmp_path, range(40))
    assert saved and all(x % 2 == 0 for x in saved) and set(saved.values()) == {1}


def test_fatal_exceptions_raise_even_when_skipping_errors(client: Any, tmp_path: Path) -> None:
    snapper = Snapper(
        range(200), functools.partial(fatal_at, 50), executor=client, snapshot_storage=storage(tmp_path),
        version=VERSION, skip_item_errors=True, fatal_exceptions=(Fatal,),
    )
    with pytest.raises(Fatal, match="item 50 is fatal"):
        snapper.start()
    saved = recorded(tmp_path, range(200))
    assert 50 not in saved and set(saved.values()) == {1}
    assert snapper.plan().done == len(saved)


def test_retries_run_again_on_the_cluster(client: Any, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    with Snapper(
        range(20), functools.partial(fails_first_time, str(markers)), executor=client,
        snapshot_storage=storage(tmp_path), version=VERSION, retries=2, retry_backoff=0.01,
    ) as snapper:
        snapper.start()
        assert snapper.load() == [x * 10 for x in range(20)]
        assert {m.attempts for m in snapper.load_metrics()} == {2}


def test_fn_that_cannot_be_sent_is_named_before_any_work(client: Any, tmp_path: Path) -> None:
    lock = threading.Lock()

    def holds_a_lock(x: int) -> int:
        with lock:
            return x

    with pytest.raises(TypeError, match=r"fn .*holds_a_lock cannot be pickled, so it cannot be sent to the cluster"):
        Snapper(range(5), holds_a_lock, executor=client, snapshot_storage=storage(tmp_path), version=VERSION).start()
    assert recorded(tmp_path, range(5)) == Counter()


def test_an_item_that_cannot_be_sent_is_named_before_any_work(client: Any, tmp_path: Path) -> None:
    items: list[Any] = [threading.Lock()] + list(range(5))
    snapper = Snapper(
        items, repr, executor=client, snapshot_storage=storage(tmp_path), version=VERSION, key=lambda x: repr(type(x))
    )
    with pytest.raises(TypeError, match=r"item <unlocked _th.* cannot be pickled, so it cannot be sent to the workers of executor=<Client"):
        snapper.start()
    with Snapper[int, int]([], plus_one, snapshot_storage=storage(tmp_path), version=VERSION) as reader:
        assert list(reader._open().store.rows(None)) == []


def test_progress_bar_counts_every_item(client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Snapper(
        range(300), plus_one, executor=client, snapshot_storage=storage(tmp_path), version=VERSION, progress=True
    ) as snapper:
        snapper.start()
    assert "300/300" in capsys.readouterr().err


# -- lost workers -------------------------------------------------------------------------------
def test_a_killed_worker_costs_only_its_tasks(process_client: Any, tmp_path: Path) -> None:
    client = process_client
    log = tmp_path / "calls.log"
    victim = worker_pids(client)[0]
    items = range(400)
    snapper = Snapper(
        items, functools.partial(logged, str(log), 0.005), executor=client, snapshot_storage=storage(tmp_path),
        version=VERSION,
    )

    killed_at: list[float] = []

    def kill_when_started() -> None:
        wait_until(lambda: len(logged_items(log)) >= 40, 30, "40 items")
        os.kill(victim, signal.SIGKILL)
        killed_at.append(time.monotonic())

    killer = threading.Thread(target=kill_when_started)
    killer.start()
    try:
        snapper.start()  # Dask runs the lost tasks again elsewhere
        finished_at = time.monotonic()
    finally:
        killer.join()
        client.wait_for_workers(2, timeout=60)  # the nanny restarts it
    assert killed_at and killed_at[0] < finished_at, "the worker was killed after the run"
    assert victim not in worker_pids(client)
    assert recorded(tmp_path, items) == Counter(items)  # once each, re-run tasks included
    assert snapper.load() == [x * 3 + 1 for x in items]


def test_a_task_that_keeps_killing_workers_fails_clearly_and_resume_redoes_only_the_rest(
    process_client: Any, tmp_path: Path
) -> None:
    client = process_client
    log = tmp_path / "calls.log"
    items = range(300)

    def set_allowed_failures(n: int, dask_scheduler: Any = None) -> int:
        old: int = dask_scheduler.allowed_failures
        dask_scheduler.allowed_failures = n
        return old

    old = client.run_on_scheduler(set_allowed_failures, 0)  # the first death fails the task
    try:
        snapper = Snapper(
            items, functools.partial(kills_its_worker_at, 150, str(log)), executor=client,
            snapshot_storage=storage(tmp_path), version=VERSION,
        )
        with pytest.raises(ClusterTaskError, match=r"a task of \d+ item\(s\) could not run on the cluster \(KilledWorker: .*start\(\) again resumes"):
            snapper.start()
    finally:
        client.run_on_scheduler(set_allowed_failures, old)
        client.wait_for_workers(2, timeout=60)
    saved = recorded(tmp_path, items)
    assert 150 not in saved and set(saved.values()) == {1}
    log.unlink()
    with Snapper(
        items, functools.partial(logged, str(log), 0.0), executor=client, snapshot_storage=storage(tmp_path),
        version=VERSION,
    ) as resumed:
        resumed.start()
        assert resumed.load() == [x * 3 + 1 for x in items]
    assert sorted(logged_items(log)) == sorted(set(items) - set(saved))  # only what was not recorded
    assert recorded(tmp_path, items) == Counter(items)


# -- Ctrl-C -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cluster", ["remote", "own"])
def test_ctrl_c_on_the_driver_saves_what_finished_and_resumes(
    process_client: Any, tmp_path: Path, backend_env: dict[str, str], cluster: str
) -> None:
    """``remote``: the driver uses this test's cluster and gets the SIGINT alone. ``own``:
    the driver starts a LocalCluster and the SIGINT goes to its process group, as a
    terminal's Ctrl-C does, so the cluster's workers die of it while the driver waits."""
    client = process_client
    path = str(tmp_path / "run.db")
    log = tmp_path / "calls.log"
    env = dict(backend_env)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), str(TESTS)] + [p for p in [env.get("PYTHONPATH")] if p])
    n = 2000
    address = client.scheduler.address if cluster == "remote" else "local"
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "dask_child.py"), address, path, "--n", str(n), "--log", str(log), "--sleep",
         "0.01"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        wait_until(lambda: len(logged_items(log)) >= 50, 60, "50 items", proc)
        if cluster == "remote":
            proc.send_signal(signal.SIGINT)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGINT and b"KeyboardInterrupt" in err, (proc.returncode, err[-2000:])
    saved = recorded(tmp_path, range(n))
    # What ran before the signal is saved, except, with its own cluster, the tasks the
    # workers were running when the signal killed them.
    assert (50 if cluster == "remote" else 1) <= len(saved) < n and set(saved.values()) == {1}
    ran_before = len(logged_items(log))
    with Snapper(
        range(n), functools.partial(logged, str(log), 0.0), executor=client,
        snapshot_storage=SQLiteSnapshotStorage[int](path), version=CHILD_VERSION,
    ) as resumed:
        resumed.start()
        assert resumed.load() == [x * 3 + 1 for x in range(n)]
    assert sorted(logged_items(log)[ran_before:]) == sorted(set(range(n)) - set(saved))
