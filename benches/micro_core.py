"""Micro-benchmarks of the Rust core (``snapperable._core``) behind the two perf goals.

    python benches/micro_core.py                 # all of it (~1 min)
    python benches/micro_core.py --items 300000 --resume-items 1000000 --repeat 3

Prints, best of ``--repeat``:

- floor: per item, ``fn(x)`` + ``pickle.dumps`` of input and output (protocol 4);
- ``record()``: 300k rows into a default store (batch_size=1, synchronous=full), then
  ``flush()``; and into an idle writer (batch_size=1e9), i.e. the cost of record alone;
- ``process()``: the Rust hot loop (fn, pickle, timestamps, push) over 300k ints, into
  a default store and into an idle writer, then ``flush()`` (the writer's commit rate);
- ``key_set`` (ok and failed), ``key_sets``, ``outputs_for`` and ``all_outputs`` on a
  finished 1M-row checkpoint (page cache warm);
- end-to-end, each in a fresh subprocess: default ``Snapper.start()`` over 300k ints
  (goal a: <= 2.5x floor), and reopening the finished 1M checkpoint: ``start()`` +
  ``load()`` (goal b: <= 0.5 s).
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
PROTOCOL = 4


def fn(x: int) -> int:
    return x + 1


def best(repeat: int, thunk: Callable[[], Any]) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        thunk()
        times.append(time.perf_counter() - t0)
    return min(times)


def floor(n: int, repeat: int) -> float:
    items = list(range(n))
    dumps = pickle.dumps

    def run() -> None:
        for x in items:
            dumps(x, PROTOCOL)
            dumps(fn(x), PROTOCOL)

    return best(repeat, run) / n


def record_bench(n: int, root: str, batch_size: int, repeat: int) -> tuple[float, float]:
    """(seconds per record() call, seconds of the final flush)."""
    from snapperable import _core

    rows_payload = [pickle.dumps(x + 1, PROTOCOL) for x in range(n)]
    keys = _core.input_keys(list(range(n)))
    rec_times, flush_times = [], []
    for r in range(repeat):
        path = os.path.join(root, f"record-{batch_size}-{r}.db")
        store = _core.open_sqlite(path, "full", batch_size, None)
        vid = store.add_version("bench", "{}", None)
        record = store.record
        t0 = time.perf_counter()
        for i in range(n):
            record((keys[i * 16 : i * 16 + 16], vid, 0, None, rows_payload[i], None, None, None, 1, 1.0, 2.0))
        t1 = time.perf_counter()
        store.flush()
        t2 = time.perf_counter()
        store.close()
        rec_times.append((t1 - t0) / n)
        flush_times.append(t2 - t1)
    return min(rec_times), min(flush_times)


def process_bench(n: int, root: str, batch_size: int, repeat: int) -> tuple[float, float]:
    """(seconds per item in process(), seconds of the final flush)."""
    from snapperable import _core

    items = list(range(n))
    keys = _core.input_keys(items)
    positions = list(range(n))
    loop_times, flush_times = [], []
    for r in range(repeat):
        path = os.path.join(root, f"process-{batch_size}-{r}.db")
        store = _core.open_sqlite(path, "full", batch_size, None)
        vid = store.add_version("bench", "{}", None)
        t0 = time.perf_counter()
        assert store.process(fn, items, keys, positions, vid) is None
        t1 = time.perf_counter()
        store.flush()
        t2 = time.perf_counter()
        store.close()
        loop_times.append((t1 - t0) / n)
        flush_times.append(t2 - t1)
    return min(loop_times), min(flush_times)


def make_finished(n: int, path: str) -> None:
    """A finished checkpoint of ``n`` items made by ``Snapper`` (so versions match)."""
    from snapperable import Snapper, SQLiteSnapshotStorage

    storage = SQLiteSnapshotStorage(path, synchronous="normal")
    Snapper(range(n), fn, snapshot_storage=storage, batch_size=10**9).start()


def reads_bench(n: int, path: str, repeat: int) -> dict[str, float]:
    from snapperable import _core

    store = _core.open_sqlite(path, "full", 1, None)
    vid = store.versions()[-1].uses
    keys = b"".join(_core.input_keys(list(range(i, min(i + 1024, n)))) for i in range(0, n, 1024))
    out = {
        "key_set(v, OK)": best(repeat, lambda: store.key_set(vid, 0)),
        "key_set(v, FAILED)": best(repeat, lambda: store.key_set(vid, 1)),
    }
    if hasattr(store, "key_sets"):
        out["key_sets(v)"] = best(repeat, lambda: store.key_sets(vid))
    out["outputs_for(v, all keys)"] = best(repeat, lambda: store.outputs_for(vid, keys))
    out["all_outputs(v)"] = best(repeat, lambda: store.all_outputs(vid))
    store.close()
    return out


START_CODE = """
import sys, time
from snapperable import Snapper, SQLiteSnapshotStorage
def fn(x): return x + 1
path, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
items = list(range(n))
t0 = time.perf_counter()
s = Snapper(items, fn, snapshot_storage=SQLiteSnapshotStorage(path))
s.start()
if mode == "resume":
    out = s.load()
    assert len(out) == n, len(out)
print(time.perf_counter() - t0)
"""


def fresh(path: str, n: int, mode: str) -> float:
    env = dict(os.environ, SNAPPERABLE_BACKEND="rust")
    proc = subprocess.run(
        [sys.executable, "-c", START_CODE, path, str(n), mode],
        capture_output=True, text=True, env=env, cwd=str(REPO), check=True,
    )
    return float(proc.stdout.strip())


def _core_store_class() -> type:
    from snapperable import _core

    return _core.SqliteCheckpoint


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=300_000)
    ap.add_argument("--resume-items", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--no-resume", action="store_true", help="skip the 1M-row reads and goal b")
    args = ap.parse_args()
    os.environ["SNAPPERABLE_BACKEND"] = "rust"
    n, m, rep = args.items, args.resume_items, args.repeat
    root = tempfile.mkdtemp(prefix="snapperable-micro-", dir=args.dir)
    try:
        fl = floor(n, rep)
        print(f"floor (fn + 2x pickle.dumps)                    {fl * 1e6:7.3f} us/item")
        per, fl_s = record_bench(n, root, 1, rep)
        print(f"record() default store (batch 1, full)          {per * 1e6:7.3f} us/call, flush {fl_s * 1e3:.0f} ms")
        per, fl_s = record_bench(n, root, 10**9, rep)
        print(f"record() idle writer (batch 1e9)                {per * 1e6:7.3f} us/call, flush {fl_s * 1e3:.0f} ms")
        if hasattr(_core_store_class(), "process"):
            per, fl_s = process_bench(n, root, 1, rep)
            print(f"process() default store (batch 1, full)         {per * 1e6:7.3f} us/item, flush {fl_s * 1e3:.0f} ms")
            per, fl_s = process_bench(n, root, 10**9, rep)
            print(f"process() idle writer (batch 1e9)               {per * 1e6:7.3f} us/item, flush {fl_s * 1e3:.0f} ms")

        e2e = []
        for r in range(rep):
            e2e.append(fresh(os.path.join(root, f"e2e-{r}.db"), n, "start"))
        t = min(e2e)
        print(f"goal a: fresh start() {n:,} default             {t / n * 1e6:7.3f} us/item = {t / n / fl:.2f}x floor (target <= 2.5x)")

        if args.no_resume:
            return 0
        big = os.path.join(root, "finished.db")
        make_finished(m, big)
        for name, sec in reads_bench(m, big, rep).items():
            print(f"{name:<28} on {m:,} rows     {sec:7.3f} s")
        res = min(fresh(big, m, "resume") for _ in range(rep))
        print(f"goal b: fresh resume start()+load() {m:,}   {res:7.3f} s (target <= 0.5 s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
