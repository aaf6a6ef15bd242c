"""The Dask rows of ``benches/run.py``: ``Snapper(..., executor=client)`` on a local cluster.

One worker process (``python benches/run.py --worker dask ...``) starts a 2-worker
process ``LocalCluster`` on loopback (one thread each) and measures, in rounds so that a
passing disturbance hits every variant alike (median kept):

- CPU-bound: ``n_cpu`` items of about 2 ms of pure-Python work, three ways: the
  sequential Snapper (no executor, in this process), a bare ``client.map`` + ``gather``
  of the same work (no checkpoint, one task per item, as Dask users write it), and
  ``Snapper(..., executor=client)``.
- Tiny items: ``n_tiny`` ints, ``fn = x + 1``, through the cluster, every item recorded.
- Crash: a driver process (``--worker dask_driver``) runs the CPU-bound items through the
  cluster and is SIGKILLed once ``n_cpu // 2`` items have run; a resumed run then
  records the rest. "Redone" items are those whose ``fn`` ran in the killed run but
  were not recorded, compared with what the tasks in flight held (the bound).

The cluster starts once and is excluded from every time.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
RUN = HERE.parent / "run.py"

GOAL_X_SEQUENTIAL = 1.6  # Snapper on the cluster at least this much faster than sequential
GOAL_X_BARE = 1.1  # and within this factor of a bare client.map + gather
GOAL_TINY_S = 10.0  # 100,000 tiny items through the cluster
ITEM_SECONDS = 0.002  # the CPU-bound item's target duration


def spin(rounds: int, x: int) -> int:
    """Pure-Python CPU work: ``rounds`` loop turns (calibrated to about 2 ms)."""
    total = x
    for i in range(rounds):
        total = (total * 31 + i) % 1_000_003
    return total


def seconds_per_item(rounds: int) -> float:
    """The time ``spin(rounds, x)`` takes where this runs (the best of 5 batches of 20)."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for x in range(20):
            spin(rounds, x)
        best = min(best, (time.perf_counter() - started) / 20)
    return best


def calibrate() -> int:
    """Loop turns that take about ``ITEM_SECONDS`` here."""
    return max(1, int(ITEM_SECONDS / seconds_per_item(10_000) * 10_000))


def plus_one(x: int) -> int:
    return x + 1


def logged_spin(rounds: int, log: str, x: int) -> int:
    """``spin``, with each finished call and its task appended to ``log`` (one ``write``):
    the crash row counts what ran, SIGKILL or not, and how many items a task held."""
    from distributed import get_worker

    out = spin(rounds, x)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{x} {get_worker().get_current_task()}\n".encode("ascii"))
    finally:
        os.close(fd)
    return out


def _logged(log: str) -> list[tuple[int, str]]:
    """(item, task) of each finished call; a line cut by the kill is not counted."""
    if not os.path.exists(log):
        return []
    lines = Path(log).read_text().split("\n")[:-1]
    return [(int(x), task) for x, task in (line.split(" ", 1) for line in lines)]


def _recorded(path: str) -> list[bytes]:
    import sqlite3

    with sqlite3.connect(path) as db:
        return [key for (key,) in db.execute("SELECT key FROM items")]


# -- worker processes ---------------------------------------------------------------------
def _w_dask(n_cpu: int, n_tiny: int, repeat: int, root: str, **_: Any) -> dict[str, Any]:
    from distributed import Client, LocalCluster

    from snapperable import Snapper, SQLiteSnapshotStorage, _backend

    rounds = calibrate()
    work = functools.partial(spin, rounds)
    counter = iter(range(1_000_000))

    def fresh(name: str) -> str:
        return os.path.join(root, f"dask-{next(counter):03d}-{name}.db")

    def sequential() -> float:
        started = time.perf_counter()
        with Snapper(range(n_cpu), work, snapshot_storage=SQLiteSnapshotStorage(fresh("seq")), version="v") as s:
            s.start()
        return time.perf_counter() - started

    def bare(client: Any) -> float:
        started = time.perf_counter()
        outputs = client.gather(client.map(work, range(n_cpu), pure=False))
        assert len(outputs) == n_cpu
        return time.perf_counter() - started

    def snapper(client: Any) -> float:
        started = time.perf_counter()
        with Snapper(range(n_cpu), work, executor=client, snapshot_storage=SQLiteSnapshotStorage(fresh("dask")),
                     version="v") as s:
            s.start()
        return time.perf_counter() - started

    result: dict[str, Any] = {"backend": _backend.BACKEND_NAME, "rounds": rounds}
    with LocalCluster(host="127.0.0.1", dashboard_address=None, n_workers=2, threads_per_worker=1,
                      processes=True) as cluster, Client(cluster) as client:
        result["item_ms"] = seconds_per_item(rounds) * 1e3
        result["item_ms_on_worker"] = client.submit(seconds_per_item, rounds, pure=False).result() * 1e3
        bare(client)  # warm-up: the workers import and unpickle once
        times: dict[str, list[float]] = {"sequential": [], "bare": [], "snapper": []}
        for _ in range(repeat):
            times["sequential"].append(sequential())
            times["bare"].append(bare(client))
            times["snapper"].append(snapper(client))
        result["cpu"] = {name: statistics.median(runs) for name, runs in times.items()}
        result["cpu_runs"] = times

        path = fresh("tiny")
        started = time.perf_counter()
        with Snapper(range(n_tiny), plus_one, executor=client, snapshot_storage=SQLiteSnapshotStorage(path),
                     version="v") as s:
            s.start()
            loaded = len(s.load())
        result["tiny"] = {"seconds": time.perf_counter() - started, "loaded": loaded,
                          "rows": len(_recorded(path))}

        result["crash"] = _crash(client, cluster.scheduler_address, n_cpu, rounds, fresh("crash"), root)
    return result


def _crash(client: Any, address: str, n: int, rounds: int, path: str, root: str) -> dict[str, Any]:
    """SIGKILL a driver mid-run, resume here; what was redone against what was in flight."""
    from snapperable import Snapper, SQLiteSnapshotStorage
    from snapperable.engine_dask import cluster_threads
    from snapperable.keys import input_key

    log = os.path.join(root, "dask-crash.log")
    args = json.dumps({"address": address, "n": n, "rounds": rounds, "path": path, "log": log})
    env = dict(os.environ)
    driver = subprocess.Popen([sys.executable, str(RUN), "--worker", "dask_driver", args], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(_logged(log)) < n // 2:
        if driver.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the driver ended before the kill: {driver.communicate()[1][-500:]!r}")
        time.sleep(0.005)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(0.5)  # the tasks that ran on when their driver died finish and log
    before = _logged(log)
    ran = {x for x, _ in before}
    largest_task = max(Counter(task for _, task in before).values())
    recorded_keys = set(_recorded(path))
    keys = {input_key(x): x for x in range(n)}
    recorded = {keys[key] for key in recorded_keys}
    redone = ran - recorded
    with Snapper(range(n), functools.partial(logged_spin, rounds, log), executor=client,
                 snapshot_storage=SQLiteSnapshotStorage(path), version="crash") as s:
        s.start()
        complete = len(s.load()) == n
    rows = _recorded(path)
    tasks_in_flight = 2 * cluster_threads(client)
    return {"ran_before_kill": len(ran), "recorded_before_kill": len(recorded), "redone": len(redone),
            "tasks_in_flight": tasks_in_flight, "largest_task": largest_task,
            "items_in_flight_bound": tasks_in_flight * largest_task,
            "complete": complete, "rows": len(rows), "unique_rows": len(set(rows))}


def _w_dask_driver(address: str, n: int, rounds: int, path: str, log: str, **_: Any) -> dict[str, Any]:
    from distributed import Client

    from snapperable import Snapper, SQLiteSnapshotStorage

    with Client(address) as client:
        with Snapper(range(n), functools.partial(logged_spin, rounds, log), executor=client,
                     snapshot_storage=SQLiteSnapshotStorage(path), version="crash") as s:
            s.start()
    return {}


WORKERS = {"dask": _w_dask, "dask_driver": _w_dask_driver}


# -- the parent's side ---------------------------------------------------------------------
def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("distributed") is not None


def report_lines(res: dict[str, Any], n_cpu: int, n_tiny: int, repeat: int) -> list[str]:
    cpu = res["cpu"]
    vs_seq = cpu["sequential"] / cpu["snapper"]
    vs_bare = cpu["snapper"] / cpu["bare"]
    ok = lambda good: "ok" if good else "MISSED"  # noqa: E731
    tiny, crash = res["tiny"], res["crash"]
    return [
        f"Dask: a 2-worker process LocalCluster on loopback (1 thread each), backend {res['backend']}; "
        f"median of {repeat} rounds:",
        f"  CPU-bound, {n_cpu:,} items of ~2 ms pure Python ({res['item_ms']:.2f} ms an item here, "
        f"{res['item_ms_on_worker']:.2f} ms on a worker):",
        f"    sequential Snapper (no executor)            {cpu['sequential']:6.2f} s",
        f"    bare client.map + gather (no checkpoint)     {cpu['bare']:6.2f} s",
        f"    Snapper(executor=client)                     {cpu['snapper']:6.2f} s   "
        f"{vs_seq:.2f}x faster than sequential (goal >= {GOAL_X_SEQUENTIAL}x {ok(vs_seq >= GOAL_X_SEQUENTIAL)}), "
        f"{vs_bare:.2f}x bare (goal <= {GOAL_X_BARE}x {ok(vs_bare <= GOAL_X_BARE)})",
        f"  Tiny items, {n_tiny:,} ints, fn = x + 1, through the cluster: {tiny['seconds']:.2f} s, "
        f"{tiny['rows']:,} rows, load() {tiny['loaded']:,} (goal < {GOAL_TINY_S:.0f} s, all recorded "
        f"{ok(tiny['seconds'] < GOAL_TINY_S and tiny['rows'] == tiny['loaded'] == n_tiny)})",
        f"  Crash: driver SIGKILLed after {crash['ran_before_kill']} items ran ({crash['recorded_before_kill']} "
        f"recorded); redone on resume {crash['redone']} items, bound: {crash['tasks_in_flight']} tasks in "
        f"flight x {crash['largest_task']} items (the largest task before the kill) = "
        f"{crash['items_in_flight_bound']} ({ok(crash['redone'] <= crash['items_in_flight_bound'])}); "
        f"after resume {crash['unique_rows']:,} items, {crash['rows']:,} rows "
        f"({ok(crash['complete'] and crash['rows'] == crash['unique_rows'] == n_cpu)})",
    ]


def measure(run_worker: Any, root: str, quick: bool) -> dict[str, Any]:
    """The Dask rows, from one worker process (``run_worker`` is run.py's)."""
    sizes = {"n_cpu": 500, "n_tiny": 20_000, "repeat": 1} if quick else {"n_cpu": 2000, "n_tiny": 100_000, "repeat": 3}
    res: dict[str, Any] = run_worker("dask", **sizes, root=root)
    res["sizes"] = sizes
    return res


def print_rows(res: dict[str, Any]) -> None:
    sizes = res["sizes"]
    print()
    print("\n".join(report_lines(res, sizes["n_cpu"], sizes["n_tiny"], sizes["repeat"])))


def main() -> int:
    """``python benches/dask_rows.py [--quick]``: these rows alone, as run.py prints them."""
    import tempfile

    sys.path.insert(0, str(HERE.parent))
    import run  # benches/run.py: its worker runner and machine lines

    quick = "--quick" in sys.argv[1:]
    root = tempfile.mkdtemp(prefix="snapperable-bench-dask-")
    print("\n".join(run.machine_lines(root)))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    try:
        print_rows(measure(run.run_worker, root, quick))
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    print(f"Dask rows: {time.perf_counter() - started:.0f} s; 1-minute load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
