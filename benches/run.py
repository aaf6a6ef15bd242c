"""snapperable benchmark: one command, one machine, one table.

    python benches/run.py                 # the full run (~2-4 minutes on 2 cores)
    python benches/run.py --quick         # smaller sizes, one repeat (~30 s)
    python benches/run.py --items 100000 --dir /mnt/ssd --repeat 5

Every measurement runs in a fresh subprocess (``python benches/run.py --worker ...``) on
a fresh checkpoint under a temporary directory, so the backend is chosen at import
(``SNAPPERABLE_BACKEND=rust|python``) and no process cache helps. See benches/README.md
for what each row measures.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import pickle
import platform
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import dask_rows  # benches/dask_rows.py: the rows of Snapper(..., executor=client)

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
PROTOCOL = 4
WORKER_TIMEOUT = 900  # seconds; a worker that takes longer is reported as failed

# Goals printed next to the numbers (issue #3). The resume and memory goals are the
# Rust core's: the pure fallback has a throughput goal only.
GOAL_RUST_X_FLOOR = 2.5
GOAL_PURE_X_FLOOR = 8.0
GOAL_RESUME_1M_S = 0.35  # issue 10: with every row checksum verified
GOAL_RSS_3M_MB = 250.0
GOAL_OPEN_STATE_EXTRA_MS = 50.0  # issue #9: a 400 MB object fn reads adds < 50 ms to an open
STATE_MB = 400
OPEN_ITEMS = 1000

# Concurrency goals (issue #12): wall time over the ideal, and over the bare peer.
GOAL_IO_X_IDEAL = 1.15
GOAL_IO_X_BARE = 1.1
GOAL_ASYNC_X_IDEAL = 1.25
GOAL_ASYNC_X_BARE = 1.1
GOAL_OVERHEAD_US = 3.0
GOAL_PROCESS_SPEEDUP = 1.7
PROCESS_ROUNDS = 3  # interleaved rounds of the process pool and its peers (median reported)
GOAL_RATE_WALL_S = (3.6, 4.4)  # 4 s +- 10%
GOAL_CRASH_REDO = 2 * 32 + 1  # 2 x workers + batch_size
CPU_WORK_LOOPS = 40_000  # pure-Python loop turns of cpu_work: about 2 ms on a 2020s core


def _cpu() -> float:
    """CPU seconds of this process (all threads) and of its ended child processes (the
    pure backend's writer process, which has exited once start() returns)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def fn(x: int) -> int:
    """The trivial function every variant runs."""
    return x + 1


def cpu_work(x: int) -> int:
    """About 2 ms of pure-Python CPU work (``CPU_WORK_LOOPS`` turns)."""
    total = x
    for i in range(CPU_WORK_LOOPS):
        total = (total + i * i) % 1_000_003
    return total


def io_work(x: int) -> int:
    time.sleep(0.01)
    return x


async def async_work(x: int) -> int:
    import asyncio

    await asyncio.sleep(0.05)
    return x


class Model:
    """Stands for a model's weights: a large object held by a global that a function reads."""

    def __init__(self, size: int) -> None:
        self.weights = bytearray(size)


model = Model(0)  # the open worker puts STATE_MB in it before it times anything


def fn_with_model(x: int) -> int:
    """``fn``, reading the model: its fingerprint covers ``model`` by type only."""
    return x + 1 + 0 * len(model.weights)


# ======================================================================================
# Workers: each runs in its own process and prints one JSON object as its last line.
# ======================================================================================


def _w_plain(n: int, **_: Any) -> dict[str, Any]:
    items = list(range(n))
    t0, c0 = time.perf_counter(), _cpu()
    out = [fn(x) for x in items]
    t1, c1 = time.perf_counter(), _cpu()
    assert len(out) == n
    return {"seconds": t1 - t0, "cpu": c1 - c0, "items": n}


def _w_floor(n: int, **_: Any) -> dict[str, Any]:
    items = list(range(n))
    dumps = pickle.dumps
    t0, c0 = time.perf_counter(), _cpu()
    out = []
    append = out.append
    for x in items:
        y = fn(x)
        dumps(x, PROTOCOL)
        append(dumps(y, PROTOCOL))
    t1, c1 = time.perf_counter(), _cpu()
    assert len(out) == n
    return {"seconds": t1 - t0, "cpu": c1 - c0, "items": n}


def _w_snapper(n: int, path: str, **_: Any) -> dict[str, Any]:
    import snapperable
    from snapperable import Snapper, SQLiteSnapshotStorage

    items = list(range(n))
    t0, c0 = time.perf_counter(), _cpu()
    Snapper(items, fn, snapshot_storage=SQLiteSnapshotStorage(path)).start()
    t1, c1 = time.perf_counter(), _cpu()
    out = Snapper(items, fn, snapshot_storage=SQLiteSnapshotStorage(path)).load()
    if len(out) != n or (n and (out[0] != 1 or out[-1] != n)):
        raise AssertionError(f"load() returned {len(out)} outputs, expected {n}")
    return {"seconds": t1 - t0, "cpu": c1 - c0, "items": n, "backend": snapperable.backend}


def _w_diskcache(n: int, path: str, **_: Any) -> dict[str, Any]:
    from diskcache import Cache

    items = list(range(n))
    cache = Cache(path)
    memo = cache.memoize()(fn)
    t0, c0 = time.perf_counter(), _cpu()
    for x in items:
        memo(x)
    t1, c1 = time.perf_counter(), _cpu()
    cache.close()
    return {"seconds": t1 - t0, "cpu": c1 - c0, "items": n}


def _w_joblib(n: int, path: str, **_: Any) -> dict[str, Any]:
    from joblib import Memory

    items = list(range(n))
    memo = Memory(path, verbose=0).cache(fn)  # verbose=0 only silences its prints
    t0, c0 = time.perf_counter(), _cpu()
    for x in items:
        memo(x)
    t1, c1 = time.perf_counter(), _cpu()
    return {"seconds": t1 - t0, "cpu": c1 - c0, "items": n}


def _w_sqlite(n: int, path: str, **_: Any) -> dict[str, Any]:
    """The naive loop: one INSERT and one COMMIT per item, WAL, synchronous=FULL."""
    items = list(range(n))
    dumps = pickle.dumps
    t0, c0 = time.perf_counter(), _cpu()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE items (seq INTEGER PRIMARY KEY, input BLOB, output BLOB)")
    insert = "INSERT INTO items (input, output) VALUES (?, ?)"
    for x in items:
        y = fn(x)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(insert, (dumps(x, PROTOCOL), dumps(y, PROTOCOL)))
        conn.execute("COMMIT")
    conn.close()
    t1, c1 = time.perf_counter(), _cpu()
    return {"seconds": t1 - t0, "cpu": c1 - c0, "items": n}


def _w_resume(n: int, path: str, **_: Any) -> dict[str, Any]:
    """A finished checkpoint: a fresh Snapper, start() (nothing to do), load()."""
    import snapperable
    from snapperable import Snapper, SQLiteSnapshotStorage

    items = list(range(n))
    t0 = time.perf_counter()
    snapper = Snapper(items, fn, snapshot_storage=SQLiteSnapshotStorage(path))
    snapper.start()
    t1 = time.perf_counter()
    out = snapper.load()
    t2 = time.perf_counter()
    if len(out) != n or out[-1] != n:
        raise AssertionError(f"load() returned {len(out)} outputs, expected {n}")
    return {"seconds": t2 - t0, "start": t1 - t0, "load": t2 - t1, "backend": snapperable.backend}


def _w_generator(n: int, path: str, workers: Optional[int] = None, **_: Any) -> dict[str, Any]:
    """Peak memory of a long generator run: start() then load() length check."""
    import snapperable
    from snapperable import Snapper, SQLiteSnapshotStorage

    t0 = time.perf_counter()
    snapper = Snapper((i for i in range(n)), fn, snapshot_storage=SQLiteSnapshotStorage(path), workers=workers)
    snapper.start()
    t1 = time.perf_counter()
    start_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    count = len(snapper.load())
    t2 = time.perf_counter()
    if count != n:
        raise AssertionError(f"load() returned {count} outputs, expected {n}")
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"start": t1 - t0, "load": t2 - t1, "self_maxrss_kb": rss_kb, "start_maxrss_kb": start_rss_kb,
            "backend": snapperable.backend}


def _timed(thunk: Callable[[], Any]) -> dict[str, Any]:
    t0, c0 = time.perf_counter(), _cpu()
    thunk()
    t1, c1 = time.perf_counter(), _cpu()
    return {"seconds": t1 - t0, "cpu": c1 - c0}


def _check_snapper(path: str, items: Any, fn: Callable[[int], int], n: int, expect: Callable[[int], int]) -> None:
    from snapperable import Snapper, SQLiteSnapshotStorage

    out = Snapper(items, fn, snapshot_storage=SQLiteSnapshotStorage(path)).load()
    if len(out) != n or (n and out[-1] != expect(n - 1)):
        raise AssertionError(f"load() returned {len(out)} outputs, expected {n}")


def _w_concurrent(n: int, path: str, work: str, workers: Optional[int], executor: Optional[str] = None,
                  rate_limit: Optional[str] = None, **_: Any) -> dict[str, Any]:
    """A concurrent snapperable run of ``work`` (io, async, tiny, cpu); wall from the
    constructor to ``start()`` returning, everything saved."""
    from snapperable import Snapper, SQLiteSnapshotStorage

    fns: dict[str, Callable[..., Any]] = {"io": io_work, "async": async_work, "tiny": fn, "cpu": cpu_work}
    expect = {"tiny": fn, "cpu": cpu_work}.get(work, lambda x: x)
    items = list(range(n))
    kwargs: dict[str, Any] = {"workers": workers}
    if executor is not None:
        kwargs["executor"] = executor
    if rate_limit is not None:
        kwargs["rate_limit"] = rate_limit
    result = _timed(lambda: Snapper(items, fns[work], snapshot_storage=SQLiteSnapshotStorage(path), **kwargs).start())
    _check_snapper(path, items, fns[work], n, expect)
    if rate_limit is not None:  # the starts as measured where each item ran
        snapper = Snapper(items, fns[work], snapshot_storage=SQLiteSnapshotStorage(path))
        starts = sorted(m.started for m in snapper.load_metrics())
        result["max_starts_per_second"] = max(
            bisect.bisect_left(starts, t + 1.0) - i for i, t in enumerate(starts))
    result["items"] = n
    return result


def _w_bare(n: int, work: str, workers: int, how: str, chunksize: int = 1, **_: Any) -> dict[str, Any]:
    """The peers with no checkpoint: ThreadPoolExecutor.map, asyncio + Semaphore,
    ProcessPoolExecutor.map (given chunksize), joblib.Parallel, a plain loop."""
    items = list(range(n))
    fns: dict[str, Callable[[int], int]] = {"io": io_work, "tiny": fn, "cpu": cpu_work}
    if how == "threads":
        from concurrent.futures import ThreadPoolExecutor

        def run() -> None:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(fns[work], items))
    elif how == "processes":
        from concurrent.futures import ProcessPoolExecutor

        from snapperable.engine import process_context

        def run() -> None:
            with ProcessPoolExecutor(workers, mp_context=process_context()) as pool:
                list(pool.map(fns[work], items, chunksize=chunksize))
    elif how == "joblib":
        from joblib import Parallel, delayed

        def run() -> None:
            Parallel(n_jobs=workers)(delayed(fns[work])(x) for x in items)
    elif how == "asyncio":
        import asyncio

        async def main() -> None:
            semaphore = asyncio.Semaphore(workers)

            async def one(x: int) -> int:
                async with semaphore:
                    return await async_work(x)

            await asyncio.gather(*(one(x) for x in items))

        def run() -> None:
            asyncio.run(main())
    elif how == "loop":
        def run() -> None:
            for x in items:
                fns[work](x)
    else:
        raise ValueError(how)
    result = _timed(run)
    result["items"] = n
    return result


def _w_crash_child(n: int, path: str, log: str, workers: int, **_: Any) -> dict[str, Any]:
    """The I/O run the crash row kills: logs every call as it starts, one write per line
    (so an item killed halfway counts as redone when the resumed run starts it again)."""
    from snapperable import Snapper, SQLiteSnapshotStorage

    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def logged(x: int) -> int:
        os.write(log_fd, f"{x}\n".encode())
        time.sleep(0.01)
        return x

    Snapper(range(n), logged, snapshot_storage=SQLiteSnapshotStorage(path), workers=workers, version="crash").start()
    return {}


def _w_open(n: int, path: str, big: bool, **_: Any) -> dict[str, Any]:
    """Open a finished checkpoint of ``fn`` or ``fn_with_model``: start() processes nothing."""
    global model
    import snapperable
    from snapperable import Snapper, SQLiteSnapshotStorage

    if big:
        model = Model(STATE_MB << 20)
    target = fn_with_model if big else fn
    items = list(range(n))
    t0 = time.perf_counter()
    snapper = Snapper(items, target, snapshot_storage=SQLiteSnapshotStorage(path))
    snapper.start()
    t1 = time.perf_counter()
    return {"seconds": t1 - t0, "done": snapper.plan().done, "backend": snapperable.backend}


def _w_baseline(**_: Any) -> dict[str, Any]:
    """Memory of the interpreter with snapperable imported, before any work."""
    import resource

    import snapperable

    return {"self_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "backend": snapperable.backend}


WORKERS: dict[str, Callable[..., dict[str, Any]]] = {
    "plain": _w_plain,
    "floor": _w_floor,
    "snapper": _w_snapper,
    "diskcache": _w_diskcache,
    "joblib": _w_joblib,
    "sqlite": _w_sqlite,
    "resume": _w_resume,
    "generator": _w_generator,
    "open": _w_open,
    "baseline": _w_baseline,
    "concurrent": _w_concurrent,
    "bare": _w_bare,
    "crash_child": _w_crash_child,
}
WORKERS.update(dask_rows.WORKERS)


def worker_main(name: str, args_json: str) -> None:
    result = WORKERS[name](**json.loads(args_json))
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()


# ======================================================================================
# The parent: runs workers, collects numbers, prints the table.
# ======================================================================================


class WorkerFailed(Exception):
    pass


def run_worker(name: str, backend: Optional[str] = None, **kwargs: Any) -> dict[str, Any]:
    """Run one worker in a fresh interpreter; its result plus the child's ru_maxrss (KB)."""
    env = dict(os.environ)
    env.pop("SNAPPERABLE_BACKEND", None)
    if backend is not None:
        env["SNAPPERABLE_BACKEND"] = backend
    cmd = [sys.executable, str(HERE), "--worker", name, json.dumps(kwargs)]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=str(REPO))
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this very child
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    if proc.returncode < 0:
        import signal

        raise WorkerFailed(f"killed by {signal.Signals(-proc.returncode).name}")
    if proc.returncode != 0:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        raise WorkerFailed(lines[-1] if lines else f"exit status {proc.returncode}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    result["child_maxrss_kb"] = usage.ru_maxrss
    return result


def rust_available() -> tuple[bool, str]:
    env = dict(os.environ, SNAPPERABLE_BACKEND="rust")
    proc = subprocess.run(
        [sys.executable, "-c", "import snapperable._core"],
        capture_output=True, text=True, env=env, cwd=str(REPO),
    )
    if proc.returncode == 0:
        return True, ""
    lines = proc.stderr.strip().splitlines()
    return False, lines[-1] if lines else "import failed"


# -- the machine -----------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gb() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.0f} GB RAM"
    except OSError:
        pass
    return "RAM unknown"


def _filesystem(path: str) -> str:
    """Type and device of the mount holding ``path`` (fsync cost depends on it)."""
    best = ("", "?", "?")
    try:
        real = os.path.realpath(path)
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, fstype, dev)
    except OSError:
        pass
    return f"{best[1]} on {best[2]}"


def _rust_sqlite_version() -> str:
    """The SQLite bundled into the Rust core (rusqlite `bundled`), from Cargo.lock."""
    try:
        lock = (REPO / "Cargo.lock").read_text()
        m = re.search(r'name = "libsqlite3-sys"\nversion = "([^"]+)"', lock)
        if not m:
            return "?"
        ver = m.group(1)
        cargo_home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
        for header in cargo_home.glob(f"registry/src/*/libsqlite3-sys-{ver}/sqlite3/sqlite3.h"):
            hm = re.search(r'#define SQLITE_VERSION\s+"([^"]+)"', header.read_text(errors="replace"))
            if hm:
                return hm.group(1)
        return f"libsqlite3-sys {ver}"
    except OSError:
        return "?"


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=str(REPO)).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=str(REPO)).stdout.strip()
        return sha + (" + uncommitted changes" if dirty else "") if sha else "?"
    except OSError:
        return "?"


def machine_lines(bench_dir: str) -> list[str]:
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return [
        f"Machine: {_cpu_model()}, {cores} cores ({usable} usable), {_mem_gb()}, "
        f"{platform.system()} {platform.release()}",
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"SQLite {sqlite3.sqlite_version} (sqlite3 module) / {_rust_sqlite_version()} (Rust core, bundled)",
        f"Checkpoints in {bench_dir} ({_filesystem(bench_dir)}); snapperable at commit {_git_commit()}",
    ]


# -- measurement -----------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, root: str) -> None:
        self.args = args
        self.root = root
        self.counter = 0

    def fresh(self, name: str) -> str:
        """A path for a fresh checkpoint (or cache directory) that does not exist yet."""
        self.counter += 1
        return os.path.join(self.root, f"{self.counter:03d}-{name}")

    def progress(self, msg: str) -> None:
        if not self.args.silent:
            print(f"  .. {msg}", file=sys.stderr, flush=True)

    def round_robin(self, specs: list[tuple[str, str, Optional[str]]], n: int,
                    repeat: int) -> dict[str, tuple[Optional[dict[str, Any]], str]]:
        """Each (key, worker, backend) ``repeat`` times, in rounds (A B C D, A B C D, ...),
        so a passing disturbance hits every row alike; the median run of each is kept."""
        runs: dict[str, list[dict[str, Any]]] = {key: [] for key, _, _ in specs}
        failed: dict[str, str] = {}
        for r in range(repeat):
            for key, name, backend in specs:
                if key in failed:
                    continue
                self.progress(f"{key} ({r + 1}/{repeat})")
                kwargs: dict[str, Any] = {"n": n}
                if name == "snapper":
                    kwargs["path"] = self.fresh(f"{key}.db")
                try:
                    runs[key].append(run_worker(name, backend, **kwargs))
                except WorkerFailed as exc:
                    self.progress(f"{key} failed: {exc}")
                    failed[key] = f"n/a (failed: {str(exc)[:70]})"
        out: dict[str, tuple[Optional[dict[str, Any]], str]] = {}
        for key, _, _ in specs:
            if key in failed:
                out[key] = (None, failed[key])
                continue
            out[key] = (summarize(runs[key], n), "")
        return out


def summarize(runs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """The median run (by time) of a row, with the spread and its CPU use."""
    per_item = sorted(res["seconds"] / res["items"] for res in runs)
    median = sorted(runs, key=lambda res: res["seconds"])[len(runs) // 2]
    return {"items": median["items"], "us": statistics.median(per_item) * 1e6,
            "min": per_item[0] * 1e6, "max": per_item[-1] * 1e6, "repeat": len(runs),
            "cpu_per_wall": median["cpu"] / median["seconds"]}


def fmt_us(us: float) -> str:
    return f"{us:.2f}" if us < 100 else f"{us:.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=None, help="items per loop (default 300000; --quick 30000)")
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke test")
    ap.add_argument("--dir", default=None, help="where temporary checkpoints go (default /tmp)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="fresh runs per main row, median reported (default 5; --quick 1)")
    ap.add_argument("--resume-items", type=int, default=None, help="size of the resume checkpoint (default 1000000)")
    ap.add_argument("--rss-items", type=int, default=None, help="size of the generator run (default 3000000)")
    ap.add_argument("--peer-seconds", type=float, default=None,
                    help="rough time budget per slow peer; its sample is sized from a probe (default 5)")
    ap.add_argument("--skip-peers", action="store_true", help="skip diskcache, joblib and naive sqlite3")
    ap.add_argument("--skip-dask", action="store_true", help="skip the Dask cluster rows (benches/dask_rows.py)")
    ap.add_argument("--skip-concurrency", action="store_true", help="skip the concurrent-run rows")
    ap.add_argument("--only-concurrency", action="store_true", help="only the concurrent-run rows")
    ap.add_argument("--json", default=None, help="also write every number to this JSON file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary checkpoints")
    ap.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--worker", nargs=2, metavar=("NAME", "ARGS"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        worker_main(*args.worker)
        return 0

    quick = args.quick
    n = args.items or (30_000 if quick else 300_000)
    repeat = args.repeat or (1 if quick else 5)
    n_resume = args.resume_items or (100_000 if quick else 1_000_000)
    n_rss = args.rss_items or (300_000 if quick else 3_000_000)
    peer_seconds = args.peer_seconds or (1.5 if quick else 5.0)

    base = args.dir or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    root = tempfile.mkdtemp(prefix="snapperable-bench-", dir=base)
    bench = Bench(args, root)
    report: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M %Z"), "items": n, "repeat": repeat}
    t_start = time.perf_counter()

    lines = machine_lines(root)
    report["machine"] = lines
    print("\n".join(lines))
    load_before = os.getloadavg()[0]
    report["loadavg_before"] = load_before
    if load_before > 0.5:
        print(f"WARNING: load average {load_before:.2f} before the run: other work is running, "
              "numbers will be noisy")
    print(f"Measured {report['when']}; one run of `python benches/run.py"
          f"{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`")
    sys.stdout.flush()

    if args.only_concurrency:
        concurrency = measure_concurrency(bench, quick)
        shutil.rmtree(root, ignore_errors=True)
        print_concurrency(concurrency)
        print(f"Total time {time.perf_counter() - t_start:.0f} s; 1-minute load average: "
              f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after.")
        if args.json:
            Path(args.json).write_text(json.dumps(dict(report, concurrency=concurrency), indent=2))
        return 0

    has_rust, why_not = rust_available()
    na_rust = "n/a (extension not built)"
    if not has_rust:
        bench.progress(f"Rust core not importable: {why_not}")

    rows: list[tuple[str, str, Optional[dict[str, Any]], str]] = []  # label, key, result/None, note

    def attempt(label: str, thunk: Callable[[], dict[str, Any]]) -> tuple[Optional[dict[str, Any]], str]:
        try:
            return thunk(), ""
        except WorkerFailed as exc:
            bench.progress(f"{label} failed: {exc}")
            return None, f"n/a (failed: {str(exc)[:70]})"

    try:
        # --- per-item cost: the main rows in rounds -------------------------------------
        specs: list[tuple[str, str, Optional[str]]] = [("plain", "plain", None), ("floor", "floor", None)]
        if has_rust:
            specs.append(("rust", "snapper", "rust"))
        specs.append(("python", "snapper", "python"))
        main_rows = bench.round_robin(specs, n, repeat)
        labels = {"plain": "plain loop `[fn(x) for x in items]`",
                  "floor": "floor: fn + pickle input and output",
                  "rust": "snapperable, Rust core",
                  "python": "snapperable, pure Python"}
        for key, label in labels.items():
            res, note = main_rows.get(key, (None, na_rust))
            rows.append((label, key, res, note))

        if not args.skip_peers:
            for label, name in (("diskcache `Cache(dir).memoize()`", "diskcache"),
                                ("joblib `Memory(dir).cache`", "joblib"),
                                ("naive sqlite3: INSERT + COMMIT per item", "sqlite")):
                res, note = attempt(name, lambda name=name: measure_peer(bench, name, n, peer_seconds))
                rows.append((label, name, res, note))

        # --- fixed cost of a run: an empty iterable (open, schema, fingerprint, close) ------
        fixed: dict[str, Any] = {}
        for backend in ("rust", "python"):
            if backend == "rust" and not has_rust:
                continue
            try:
                bench.progress(f"fixed cost, {backend}")
                fixed[backend] = statistics.median(
                    run_worker("snapper", backend, n=0, path=bench.fresh("empty.db"))["seconds"]
                    for _ in range(repeat))
            except WorkerFailed:
                pass
        report["fixed_cost_s"] = fixed

        # --- resume + load of a finished checkpoint ---------------------------------------
        resume = measure_resume(bench, n_resume, repeat, has_rust)
        # --- peak memory of a long generator run ------------------------------------------
        memory = measure_memory(bench, n_rss, has_rust)
        # --- opening a checkpoint whose fn reads a large object ---------------------------
        opening = measure_open_with_state(bench, repeat, has_rust)
        # --- concurrent runs (issue #12) -------------------------------------------------
        concurrency = {} if args.skip_concurrency else measure_concurrency(bench, quick)
        # --- on a Dask cluster (benches/dask_rows.py) ----------------------------------------
        dask_res: Optional[dict[str, Any]] = None
        if not args.skip_dask and dask_rows.available():
            dask_res, _ = attempt("dask", lambda: dask_rows.measure(run_worker, root, quick))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    elapsed = time.perf_counter() - t_start
    report["loadavg_after"] = os.getloadavg()[0]
    print_report(rows, fixed, resume, memory, n, n_resume, n_rss, repeat, elapsed, quick)
    print_open_with_state(opening, repeat)
    if dask_res is not None:
        dask_rows.print_rows(dask_res)
        report["dask"] = dask_res
    if concurrency:
        print_concurrency(concurrency)
    print()
    print(f"Total benchmark time {elapsed:.0f} s." + ("  (--quick: sizes below the goals' sizes)" if quick else ""))
    print(f"1-minute load average: {load_before:.2f} before, {report['loadavg_after']:.2f} after "
          f"(the benchmark itself keeps about 1-1.5 cores busy).")

    if args.json:
        report["rows"] = [{"label": l, "key": k, "result": r, "note": s} for l, k, r, s in rows]
        report["resume"] = resume
        report["memory"] = memory
        report["open_with_state"] = opening
        report["concurrency"] = concurrency
        report["elapsed_s"] = elapsed
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def measure_concurrency(bench: Bench, quick: bool) -> dict[str, Any]:
    """The concurrent-run rows: snapperable beside the bare peers, each in a fresh process."""
    scale = 10 if quick else 1
    out: dict[str, Any] = {}

    def row(key: str, name: str, backend: Optional[str] = "rust", **kwargs: Any) -> None:
        bench.progress(f"concurrency: {key}")
        if name == "concurrent":
            kwargs["path"] = bench.fresh(f"{key}.db")
        try:
            out[key] = run_worker(name, backend, **kwargs)
        except WorkerFailed as exc:
            out[key] = {"note": f"n/a (failed: {str(exc)[:70]})"}

    n_io, n_async, n_tiny, n_cpu, n_rate = 4000 // scale, 20_000 // scale, 300_000 // scale, 2000 // scale, 200
    row("io", "concurrent", n=n_io, work="io", workers=32)
    row("io_bare", "bare", n=n_io, work="io", workers=32, how="threads")
    row("async", "concurrent", n=n_async, work="async", workers=1000)
    row("async_bare", "bare", n=n_async, work="async", workers=1000, how="asyncio")
    row("tiny", "concurrent", n=n_tiny, work="tiny", workers=8)
    row("tiny_bare", "bare", n=n_tiny, work="tiny", workers=8, how="threads")
    row("cpu_sequential", "concurrent", n=n_cpu, work="cpu", workers=None)
    row("cpu_loop", "bare", n=n_cpu, work="cpu", workers=1, how="loop")
    # The process pool and its peers differ by a few percent, the size of this machine's
    # noise between two runs: they run in interleaved rounds, and each row is the
    # median of its rounds.
    pool_rows: dict[str, dict[str, Any]] = {
        "cpu": dict(name="concurrent", n=n_cpu, work="cpu", workers=2, executor="process"),
        **{f"cpu_pool_{c}": dict(name="bare", n=n_cpu, work="cpu", workers=2, how="processes", chunksize=c)
           for c in (1, 10, 50)},
        "cpu_joblib": dict(name="bare", n=n_cpu, work="cpu", workers=2, how="joblib"),
    }
    rounds: dict[str, list[dict[str, Any]]] = {key: [] for key in pool_rows}
    for _ in range(1 if quick else PROCESS_ROUNDS):
        for key, kwargs in pool_rows.items():
            row(key, **kwargs)
            rounds[key].append(out[key])
    for key, results in rounds.items():
        timed = [r for r in results if "seconds" in r]
        if timed:
            out[key] = dict(timed[0], seconds=statistics.median(r["seconds"] for r in timed), rounds=len(timed))
    row("rate", "concurrent", n=n_rate // (4 if quick else 1), work="tiny", workers=16, rate_limit="50/s")
    out["crash"] = measure_crash(bench, kills=3 if quick else 10, n=n_io, workers=32)
    if not quick:
        bench.progress("concurrency: 3M generator, workers=32")
        try:
            res = run_worker("generator", "rust", n=3_000_000, path=bench.fresh("gen-workers.db"), workers=32)
            out["generator"] = {"peak_mb": res["child_maxrss_kb"] / 1024, "start_mb": res["start_maxrss_kb"] / 1024,
                                "start": res["start"], "load": res["load"]}
        except WorkerFailed as exc:
            out["generator"] = {"note": f"n/a (failed: {str(exc)[:70]})"}
    return out


def measure_crash(bench: Bench, kills: int, n: int, workers: int) -> dict[str, Any]:
    """SIGKILL of the workers=32 I/O run ``kills`` times at spread-out points, then a run
    to the end: items started more than once, per kill."""
    import signal

    path, log = bench.fresh("crash.db"), bench.fresh("crash.log")
    cmd = [sys.executable, str(HERE), "--worker", "crash_child", json.dumps({"n": n, "path": path, "log": log, "workers": workers})]
    env = dict(os.environ, SNAPPERABLE_BACKEND="rust")

    def calls() -> int:
        try:
            return Path(log).read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    for k in range(kills):
        bench.progress(f"concurrency: crash {k + 1}/{kills}")
        before = calls()
        proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        grow = 50 + (k * 97) % 251  # kill points spread over the run
        deadline = time.monotonic() + 60
        while calls() < before + grow and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run(cmd, env=env, cwd=str(REPO), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = Path(log).read_bytes().split(b"\n")[:-1]
    unique = len(set(lines))
    if unique != n:
        return {"note": f"n/a (the final run left {n - unique} items undone)"}
    return {"kills": kills, "redone": len(lines) - n, "per_kill": (len(lines) - n) / kills}


def print_concurrency(c: dict[str, Any]) -> None:
    def wall(key: str) -> Optional[float]:
        res = c.get(key, {})
        return res.get("seconds")

    def cell(key: str) -> str:
        res = c.get(key, {})
        return f"{res['seconds']:.2f} s" if "seconds" in res else res.get("note", "n/a")

    def verdict(value: Optional[float], goal: float, below: bool = True) -> str:
        if value is None:
            return ""
        return "ok" if (value <= goal if below else value >= goal) else "MISS"

    print()
    print("Concurrent runs (Rust core, SQLite defaults; one run per row, fresh process each):")
    header = f"{'row':<58} {'wall':>9}   {'goal':<34}"
    print(header)
    print("-" * len(header))
    def against_ideal(key: str, what: str, seconds_each: float, workers: int, bare: str,
                      goals: tuple[float, float]) -> None:
        mine, theirs = wall(key), wall(f"{key}_bare")
        n_items = c.get(key, {}).get("items", 0)
        ideal = n_items * seconds_each / workers
        verdicts = (f"{mine / ideal:.2f}x ideal {verdict(mine / ideal, goals[0])}, "
                    f"{mine / theirs:.2f}x bare {verdict(mine / theirs, goals[1])}" if mine and theirs else "")
        label = f"{what}: {n_items:,} items, workers={workers}"
        print(f"{label:<58} {cell(key):>9}   {verdicts}")
        print(f"{'  ' + bare + ', no checkpoint':<58} {cell(key + '_bare'):>9}   (ideal {ideal:.2f} s)")

    against_ideal("io", "I/O threads, sleep 10 ms", 0.01, 32, "bare ThreadPoolExecutor(32).map",
                  (GOAL_IO_X_IDEAL, GOAL_IO_X_BARE))
    against_ideal("async", "async def, asyncio.sleep(0.05)", 0.05, 1000,
                  "bare asyncio.gather + Semaphore(1000)", (GOAL_ASYNC_X_IDEAL, GOAL_ASYNC_X_BARE))
    t, t_bare = wall("tiny"), wall("tiny_bare")
    n_tiny = c.get("tiny", {}).get("items", 300000)
    if t and t_bare:
        us, us_bare = t / n_tiny * 1e6, t_bare / n_tiny * 1e6
        print(f"{f'engine overhead: {n_tiny:,} ints, x + 1, workers=8 threads':<58} {cell('tiny'):>9}   "
              f"{us:.2f} µs/item {verdict(us, GOAL_OVERHEAD_US)}, below bare {verdict(us, us_bare)}")
        print(f"{'  bare ThreadPoolExecutor(8).map, no checkpoint':<58} {cell('tiny_bare'):>9}   {us_bare:.2f} µs/item")
    cpu, seq = wall("cpu"), wall("cpu_sequential")
    n_cpu = c.get("cpu", {}).get("items", 2000)
    pools = {k: wall(k) for k in ("cpu_pool_1", "cpu_pool_10", "cpu_pool_50")}
    best_pool = min((v for v in pools.values() if v), default=None)
    job = wall("cpu_joblib")
    if cpu and seq:
        peers = [v for v in (best_pool, job) if v]
        print(f"{f'processes: {n_cpu:,} x ~2 ms CPU, executor=process, workers=2':<58} {cell('cpu'):>9}   "
              f"{seq / cpu:.2f}x sequential {verdict(seq / cpu, GOAL_PROCESS_SPEEDUP, below=False)}, "
              f"vs best peer {cpu / min(peers):.2f}x {verdict(cpu, min(peers) * 1.0) if peers else ''}")
    print(f"{'  snapperable sequential (no workers)':<58} {cell('cpu_sequential'):>9}")
    print(f"{'  plain loop, no checkpoint':<58} {cell('cpu_loop'):>9}")
    for k in pools:
        label = f"  bare ProcessPoolExecutor(2).map, chunksize={k.rsplit('_', 1)[1]}"
        print(f"{label:<58} {cell(k):>9}")
    print(f"{'  joblib.Parallel(n_jobs=2)':<58} {cell('cpu_joblib'):>9}")
    rounds = c.get("cpu", {}).get("rounds")
    if rounds and rounds > 1:
        print(f"  (the process pool and its peers: median of {rounds} interleaved rounds)")
    r = c.get("rate", {})
    if "seconds" in r:
        low, high = GOAL_RATE_WALL_S if r["items"] == 200 else (0.0, float("inf"))
        ok = "ok" if low <= r["seconds"] <= high else "MISS"
        peak = r["max_starts_per_second"]
        label = f"rate limit: {r['items']} items, rate_limit=50/s, workers=16"
        print(f"{label:<58} "
              f"{r['seconds']:>7.2f} s   4 s +-10% {ok}; most starts in 1 s: {peak} {'ok' if peak <= 50 else 'MISS'}")
    crash = c.get("crash", {})
    if "per_kill" in crash:
        label = f"crash: SIGKILL of the I/O run x {crash['kills']}, then resume"
        print(f"{label:<58} "
              f"{crash['per_kill']:>5.1f}/kill  redone items per kill <= {GOAL_CRASH_REDO} "
              f"{verdict(crash['per_kill'], GOAL_CRASH_REDO)}")
    elif crash:
        print(f"{'crash':<58} {crash.get('note')}")
    gen = c.get("generator")
    if gen and "peak_mb" in gen:
        print(f"{'peak RSS, 3,000,000-item generator, workers=32 threads':<58} {gen['peak_mb']:>6.0f} MB   "
              f"<= {GOAL_RSS_3M_MB:g} MB {verdict(gen['peak_mb'], GOAL_RSS_3M_MB)} "
              f"({gen['start_mb']:.0f} MB at the end of start(); start {gen['start']:.1f} s, load {gen['load']:.1f} s)")


def measure_peer(bench: Bench, name: str, n: int, budget_s: float) -> dict[str, Any]:
    """A slow peer on a sample sized to roughly ``budget_s`` seconds (all n if it fits)."""
    probe_n = min(n, 500)
    bench.progress(f"{name} probe ({probe_n} items)")
    probe = run_worker(name, n=probe_n, path=bench.fresh(name + "-probe"))
    per_item = probe["seconds"] / probe_n
    sample = n if per_item * n <= budget_s else max(probe_n, int(budget_s / per_item) // 1000 * 1000)
    bench.progress(f"{name} ({sample} items)")
    res = run_worker(name, n=sample, path=bench.fresh(name))
    return summarize([res], sample)


def measure_resume(bench: Bench, n: int, repeat: int, has_rust: bool) -> dict[str, Any]:
    """A finished n-item checkpoint, resumed + loaded in fresh processes per backend."""
    path = bench.fresh("resume.db")
    made_by = None
    for backend in (["rust"] if has_rust else []) + ["python"]:
        bench.progress(f"writing the {n}-item checkpoint ({backend})")
        try:
            run_worker("snapper", backend, n=n, path=path)
            made_by = backend
            break
        except WorkerFailed as exc:
            bench.progress(f"writing with {backend} failed: {exc}")
            for suffix in ("", "-wal", "-shm", ".lock"):
                try:
                    os.remove(path + suffix)
                except FileNotFoundError:
                    pass
    out: dict[str, Any] = {"items": n, "made_by": made_by}
    if made_by is None:
        out["error"] = "could not write the checkpoint"
        return out
    rows_before = _row_count(path)
    for backend in ("rust", "python"):
        if backend == "rust" and not has_rust:
            out[backend] = {"note": "n/a (extension not built)"}
            continue
        runs = []
        try:
            for r in range(repeat):
                bench.progress(f"resume + load, {backend} ({r + 1}/{repeat})")
                runs.append(run_worker("resume", backend, n=n, path=path))
        except WorkerFailed as exc:
            out[backend] = {"note": f"n/a (failed: {str(exc)[:70]})"}
            continue
        best = sorted(runs, key=lambda res: res["seconds"])[len(runs) // 2]  # the median run
        out[backend] = {"seconds": best["seconds"], "start": best["start"], "load": best["load"],
                        "min": min(res["seconds"] for res in runs),
                        "max": max(res["seconds"] for res in runs)}
    rows_after = _row_count(path)
    if rows_after != rows_before:
        out["warning"] = f"resume wrote rows ({rows_before} -> {rows_after}): it reprocessed items"
    return out


def _row_count(path: str) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM items").fetchone()[0])
    finally:
        conn.close()


def measure_memory(bench: Bench, n: int, has_rust: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"items": n}
    for backend in ("rust", "python"):
        if backend == "rust" and not has_rust:
            out[backend] = {"note": "n/a (extension not built)"}
            continue
        try:
            bench.progress(f"baseline memory, {backend}")
            base = run_worker("baseline", backend)
            bench.progress(f"{n}-item generator run, {backend}")
            res = run_worker("generator", backend, n=n, path=bench.fresh(f"gen-{backend}.db"))
        except WorkerFailed as exc:
            out[backend] = {"note": f"n/a (failed: {str(exc)[:70]})"}
            continue
        out[backend] = {"peak_mb": res["child_maxrss_kb"] / 1024, "baseline_mb": base["child_maxrss_kb"] / 1024,
                        "start": res["start"], "load": res["load"]}
    return out


def measure_open_with_state(bench: Bench, repeat: int, has_rust: bool) -> dict[str, Any]:
    """Fresh processes opening a finished checkpoint of fn, and of fn reading a big object."""
    backend = "rust" if has_rust else "python"
    out: dict[str, Any] = {"backend": backend, "items": OPEN_ITEMS, "state_mb": STATE_MB}
    for big in (False, True):
        label = "big" if big else "none"
        path = bench.fresh(f"open-{label}.db")
        try:
            bench.progress(f"open with {'a ' + str(STATE_MB) + ' MB' if big else 'no'} object, {backend}")
            run_worker("open", backend, n=OPEN_ITEMS, path=path, big=big)  # writes the checkpoint
            runs = [run_worker("open", backend, n=OPEN_ITEMS, path=path, big=big) for _ in range(repeat)]
        except WorkerFailed as exc:
            out[label] = {"note": f"n/a (failed: {str(exc)[:70]})"}
            continue
        if any(res["done"] != OPEN_ITEMS for res in runs):
            out["warning"] = f"an open with {label} object did not find every item done: it reprocessed"
        out[label] = {"seconds": statistics.median(res["seconds"] for res in runs),
                      "peak_mb": max(res["child_maxrss_kb"] for res in runs) / 1024}
    return out


# -- printing --------------------------------------------------------------------------


def print_report(rows: list[tuple[str, str, Optional[dict[str, Any]], str]], fixed: dict[str, float],
                 resume: dict[str, Any], memory: dict[str, Any], n: int, n_resume: int, n_rss: int,
                 repeat: int, elapsed: float, quick: bool) -> None:
    floor = next((r for _, k, r, _ in rows if k == "floor"), None)
    floor_us = floor["us"] if floor else None
    goals = {"rust": GOAL_RUST_X_FLOOR, "python": GOAL_PURE_X_FLOOR}

    print()
    print(f"Per item over {n:,} ints, fn(x) = x + 1; snapperable with defaults (batch_size=1, "
          f"synchronous=FULL); median of {repeat} fresh process{'es' if repeat > 1 else ''} per row, "
          f"peers once:")
    header = (f"{'variant':<42} {'items':>9} {'µs/item':>9} {'× floor':>8}   {'goal':<12} "
              f"{'runs µs':<11} {'cpu/wall':>8}")
    print(header)
    print("-" * len(header))
    for label, key, res, note in rows:
        if res is None:
            print(f"{label:<42} {'':>9} {note}")
            continue
        ratio = res["us"] / floor_us if floor_us else float("nan")
        goal = goals.get(key)
        goal_s = ""
        if goal is not None:
            goal_s = f"<= {goal:g}x " + ("ok" if ratio <= goal else "MISS")
        spread = f"{fmt_us(res['min'])}-{fmt_us(res['max'])}" if res["repeat"] > 1 else ""
        items = f"{res['items']:,}"
        if res["items"] < n:
            items += "*"
        ratio_s = f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.0f}x"
        print(f"{label:<42} {items:>9} {fmt_us(res['us']):>9} {ratio_s:>8}   {goal_s:<12} "
              f"{spread:<11} {res['cpu_per_wall']:>8.2f}")
    if any(res is not None and res["items"] < n for _, _, res, _ in rows):
        print("* measured on the first N items only (too slow for all); per-item µs is comparable.")
    print("cpu/wall: CPU time of the process (all its threads, and the pure backend's writer process) over wall time of\n"
          "the median run; below 1.0 on a single-threaded row means it was not running all the time (another process\n"
          "took the core).")
    if fixed:
        print("snapperable rows include a run's fixed cost (open, schema, fingerprint, close; "
              "an empty run takes " + ", ".join(f"{v * 1000:.0f} ms {k}" for k, v in fixed.items()) + ").")

    print()
    full = n_resume == 1_000_000
    print(f"Resume + load of a finished {n_resume:,}-item checkpoint (written by {resume.get('made_by')}), "
          f"fresh process, median of {repeat}: fresh Snapper -> start() (processes nothing) -> load():")
    if "error" in resume:
        print(f"  {resume['error']}")
    for backend, label in (("rust", "Rust core"), ("python", "pure Python")):
        r = resume.get(backend, {})
        if "seconds" not in r:
            print(f"  {label:<12} {r.get('note', 'n/a')}")
            continue
        goal = ""
        if backend == "rust":
            goal = (f"   goal <= {GOAL_RESUME_1M_S:g} s " + ("ok" if r["seconds"] <= GOAL_RESUME_1M_S else "MISS")
                    if full else f"   (goal <= {GOAL_RESUME_1M_S:g} s is for 1M items)")
        print(f"  {label:<12} {r['seconds']:6.2f} s  (start {r['start']:.2f} s + load {r['load']:.2f} s; "
              f"runs {r['min']:.2f}-{r['max']:.2f} s){goal}")
    if "warning" in resume:
        print(f"  WARNING: {resume['warning']}")

    print()
    full = n_rss == 3_000_000
    print(f"Peak RSS (ru_maxrss of the child) of a {n_rss:,}-item generator run, start() then len(load()):")
    for backend, label in (("rust", "Rust core"), ("python", "pure Python")):
        r = memory.get(backend, {})
        if "peak_mb" not in r:
            print(f"  {label:<12} {r.get('note', 'n/a')}")
            continue
        if backend != "rust":  # the goal is the compact key set's (issue #3, item 2)
            goal = "   (no goal: a Python set of 3M keys alone takes about 300 MB)" if full else ""
        else:
            goal = (f"   goal <= {GOAL_RSS_3M_MB:g} MB " + ("ok" if r["peak_mb"] <= GOAL_RSS_3M_MB else "MISS")
                    if full else f"   (goal <= {GOAL_RSS_3M_MB:g} MB is for 3M items)")
        print(f"  {label:<12} {r['peak_mb']:6.0f} MB  (interpreter + import {r['baseline_mb']:.0f} MB; "
              f"start {r['start']:.1f} s, load {r['load']:.1f} s){goal}")


def print_open_with_state(opening: dict[str, Any], repeat: int) -> None:
    print()
    print(f"Opening a finished {opening['items']:,}-item checkpoint ({opening['backend']}), fresh process, median "
          f"of {repeat}: Snapper(...) -> start() (processes nothing), with fn reading no large object, and one\n"
          f"reading a {opening['state_mb']} MB object (state: its fingerprint counts its type only):")
    none, big = opening.get("none", {}), opening.get("big", {})
    for label, r in (("fn reads no large object", none), (f"fn reads a {opening['state_mb']} MB object", big)):
        if "seconds" not in r:
            print(f"  {label:<28} {r.get('note', 'n/a')}")
            continue
        extra = ""
        if r is big and "seconds" in none:
            more_ms = (big["seconds"] - none["seconds"]) * 1000
            extra = (f"   {more_ms:+.1f} ms; goal < +{GOAL_OPEN_STATE_EXTRA_MS:g} ms "
                     + ("ok" if more_ms < GOAL_OPEN_STATE_EXTRA_MS else "MISS"))
        print(f"  {label:<28} {r['seconds'] * 1000:7.1f} ms  (peak RSS {r['peak_mb']:.0f} MB){extra}")
    if "warning" in opening:
        print(f"  WARNING: {opening['warning']}")


if __name__ == "__main__":
    sys.exit(main())
