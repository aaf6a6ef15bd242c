"""Where the per-item time of snapperable goes, per backend.

    python benches/breakdown.py                      # both backends, 100k items
    python benches/breakdown.py --backend python --items 300000 --top 25
    python benches/breakdown.py --resume-items 1000000   # also profile resume + load

For each backend, in a fresh subprocess (the backend is chosen at import):

1. a stage breakdown: each piece of ``Snapper._run``'s work timed on its own (input
   keys, ``KeySet.claim``, ``store.process`` -- the per-item loop -- into a store that
   does not commit until ``flush``, then that one big commit), next to full
   ``Snapper.start()`` runs with the defaults, with ``synchronous="normal"`` and with
   the writer's commits deferred to the end. The difference between "full run" and the
   sum of the stages is the cost of the background writer running concurrently (GIL,
   lock and futex traffic, many small commits);
2. cProfile of a default ``start()`` (main thread only; the Rust core shows up as its
   Python-visible methods);
3. with ``--strace``, the syscalls of a default run (fsync count = commits).

The stages use the backend contract of ``snapperable._contract`` directly, so they track
what ``Snapper._run`` does at the time of writing (see snapper.py); they are a guide to
where time goes, not a second benchmark.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
CHUNK = 1024


def fn(x: int) -> int:
    return x + 1


def _timed(thunk: Any) -> float:
    t0 = time.perf_counter()
    thunk()
    return time.perf_counter() - t0


def stages(n: int, root: str) -> dict[str, float]:
    """Seconds per item of each stage of the hot loop, measured apart."""
    from snapperable import Snapper, SQLiteSnapshotStorage
    from snapperable._backend import backend

    items = list(range(n))
    chunks = [items[i : i + CHUNK] for i in range(0, n, CHUNK)]
    out: dict[str, float] = {}

    keys: list[bytes] = []
    out["input keys (input_keys per chunk)"] = _timed(
        lambda: keys.extend(backend.input_keys(c) for c in chunks))

    done = backend.new_key_set()
    todo: list[list[int]] = []
    out["done-set claim (claim per chunk)"] = _timed(lambda: todo.extend(done.claim(k) for k in keys))

    # The per-item loop (fn, pickle, row, hand-over), into a store whose writer stays
    # idle until flush: the caller's side of the work alone.
    store = backend.open_sqlite(os.path.join(root, "stages.db"), "full", 10**9, None)
    version = store.add_version("bench", "{}", None)
    process = store.process

    def run_process() -> None:
        for chunk, blob, positions in zip(chunks, keys, todo):
            if process(fn, chunk, blob, positions, version) is not None:
                raise AssertionError("fn raised")

    out["store.process (fn, pickle, row, hand-over; no commit)"] = _timed(run_process)
    out["one commit of every row (flush; writer thread)"] = _timed(store.flush)
    store.close()

    def snapper(name: str, **kw: Any) -> float:
        storage = SQLiteSnapshotStorage(os.path.join(root, name), **kw.pop("storage", {}))
        return _timed(lambda: Snapper(items, fn, snapshot_storage=storage, **kw).start())

    out["= full run, defaults (batch_size=1, FULL)"] = snapper("full.db")
    out["  full run, synchronous=normal"] = snapper("normal.db", storage={"synchronous": "normal"})
    out["  full run, batch_size=1e9 (one commit at the end)"] = snapper("big.db", batch_size=10**9)
    return {k: v / n for k, v in out.items()}


def profile_start(n: int, root: str, top: int) -> str:
    from snapperable import Snapper, SQLiteSnapshotStorage

    items = list(range(n))
    storage = SQLiteSnapshotStorage(os.path.join(root, "profiled.db"))
    prof = cProfile.Profile()
    prof.enable()
    Snapper(items, fn, snapshot_storage=storage).start()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).strip_dirs().sort_stats("tottime").print_stats(top)
    return text.getvalue()


def profile_resume(n: int, root: str, top: int) -> str:
    from snapperable import Snapper, SQLiteSnapshotStorage

    items = list(range(n))
    path = os.path.join(root, "resume.db")
    Snapper(items, fn, snapshot_storage=SQLiteSnapshotStorage(path), batch_size=10**9).start()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    s = Snapper(items, fn, snapshot_storage=SQLiteSnapshotStorage(path))
    s.start()
    assert len(s.load()) == n
    prof.disable()
    wall = time.perf_counter() - t0
    text = io.StringIO()
    text.write(f"resume + load of {n:,} items: {wall:.2f} s under cProfile "
               "(the checkpoint was just written by this process, so the OS cache is warm)\n")
    pstats.Stats(prof, stream=text).strip_dirs().sort_stats("tottime").print_stats(top)
    return text.getvalue()


def child(args: argparse.Namespace) -> None:
    import snapperable

    root = tempfile.mkdtemp(prefix="snapperable-profile-", dir=args.dir)
    try:
        print(f"### backend: {snapperable.backend}, {args.items:,} items, fn(x) = x + 1\n")
        print("Stage breakdown (µs per item, each stage timed on its own):")
        for name, sec in stages(args.items, root).items():
            print(f"  {name:<55} {sec * 1e6:7.2f}")
        print()
        print("cProfile of a default Snapper.start() (main thread only), by own time:")
        print(profile_start(args.items, root, args.top))
        if args.resume_items:
            print(profile_resume(args.resume_items, root, args.top))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def strace_run(backend: str, n: int, base: str) -> str:
    if shutil.which("strace") is None:
        return "strace not installed\n"
    code = (
        "import os, sys, tempfile\n"
        "from snapperable import Snapper, SQLiteSnapshotStorage\n"
        "def fn(x): return x + 1\n"
        f"d = tempfile.mkdtemp(dir={base!r})\n"
        f"Snapper(list(range({n})), fn, snapshot_storage=SQLiteSnapshotStorage(os.path.join(d, 'c.db'))).start()\n"
    )
    env = dict(os.environ, SNAPPERABLE_BACKEND=backend)
    proc = subprocess.run(
        ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync,futex,pwrite64,pread64",
         sys.executable, "-c", code],
        capture_output=True, text=True, env=env, cwd=str(REPO))
    lines = [l for l in proc.stderr.splitlines() if not l.startswith("strace: Process")]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--backend", choices=("rust", "python", "both"), default="both")
    ap.add_argument("--resume-items", type=int, default=0, help="also profile resume + load of this many")
    ap.add_argument("--top", type=int, default=15, help="cProfile rows to show")
    ap.add_argument("--strace", action="store_true", help="also count syscalls of a default run")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    backends = ["rust", "python"] if args.backend == "both" else [args.backend]
    for backend in backends:
        env = dict(os.environ, SNAPPERABLE_BACKEND=backend)
        cmd = [sys.executable, str(HERE), "--child", "--items", str(args.items),
               "--resume-items", str(args.resume_items), "--top", str(args.top), "--dir", args.dir]
        proc = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True)
        sys.stdout.write(proc.stdout)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            print(f"### backend {backend}: failed: {lines[-1] if lines else proc.returncode}\n")
            continue
        if args.strace:
            print(f"Syscalls of a default run ({backend}, {args.items:,} items; strace slows it down):")
            sys.stdout.write(strace_run(backend, args.items, args.dir))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
