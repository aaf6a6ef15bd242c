"""Fault injection: damaged checkpoints must never be read as good data (issue 10).

    python benches/faults.py                        # the full campaign (README "Reliability")
    python benches/faults.py --flips 24 --truncations 8 --out /tmp/f.jsonl
    python benches/faults.py --resume --out results.jsonl    # go on after a stop

For each checkpoint format (SQLite, pickle) and backend (Rust, pure Python), a
checkpoint of 300 items is written over six runs (some items fail, some of those are
retried, some outputs span several SQLite pages). Each trial damages a fresh copy,
flipping one random byte or cutting it at a random length, then runs a new Snapper's
``start()`` + ``load()`` on it in a fresh process (forked, for each trial, from a server
that has imported snapperable, before any Snapper exists) and compares what came back,
and the file, with the undamaged checkpoint's. It counts:

- **wrong**: outputs returned without an error that differ from the saved ones;
- **dropped**: saved items missing from ``load()`` (say, turned into failures) without
  an error;
- **written**: a damaged file that was written to (a pickle file's torn tail, which
  ``start()`` cuts off and redoes by design, is the exception: what came before it
  must stay as it was);
- **crashed**: the subprocess died, or raised anything but ``CheckpointCorruptError``;
- **hung**: it took longer than ``--timeout`` seconds.

Every count must be 0; the others are *detected* (``CheckpointCorruptError``) and
*harmless* (damage in bytes no read uses: the run did exactly what the undamaged file
would). Trials are seeded and appended to ``--out`` as JSON lines as they finish, so a
campaign can stop (``--budget`` seconds) and go on (``--resume``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
ITEMS = 300
RUNS = 6
VERSION = "faults-v1"
FAILS_ALWAYS = 31  # items x % 31 == 0 fail in every run: their latest row is a failure
FAILS_EARLY = 29  # items x % 29 == 0 fail in the first two runs, and are retried in run 4
COUNTS = ("wrong", "dropped", "written", "crashed", "hung")
SUFFIX = {"sqlite": "db", "pickle": "pkl"}


def output_of(x: int) -> dict[str, Any]:
    """Outputs of several sizes: some span SQLite overflow pages."""
    return {"id": x, "label": f"item-{x:04d}", "pad": "y" * (x % 7 * 900)}


# ======================================================================================
# In a subprocess: build the checkpoint, or run one trial on a damaged copy.
# ======================================================================================
def _storage(kind: str, path: str) -> Any:
    from snapperable import PickleSnapshotStorage, SQLiteSnapshotStorage

    return SQLiteSnapshotStorage(path) if kind == "sqlite" else PickleSnapshotStorage(path)


def build(kind: str, path: str) -> None:
    from snapperable import Snapper

    for run in range(1, RUNS + 1):
        def work(x: int, run: int = run) -> dict[str, Any]:
            if x % FAILS_ALWAYS == 0 or (x % FAILS_EARLY == 0 and run <= 2):
                raise ValueError(f"item {x} fails in run {run}")
            return output_of(x)

        with Snapper(range(ITEMS * run // RUNS), work, snapshot_storage=_storage(kind, path), version=VERSION,
                     skip_item_errors=True, retry_failed_items=run == 4) as snapper:
            snapper.start()


def trial(kind: str, path: str) -> dict[str, Any]:
    """start() + load() on the checkpoint at ``path``: what came back, or the error."""
    from snapperable import CheckpointCorruptError, Snapper

    calls: list[int] = []

    def work(x: int) -> dict[str, Any]:
        calls.append(x)
        if x % FAILS_ALWAYS == 0:
            raise ValueError(f"item {x} fails")
        return output_of(x)

    try:
        with Snapper(range(ITEMS), work, snapshot_storage=_storage(kind, path), version=VERSION,
                     skip_item_errors=True) as snapper:
            snapper.start()
            outputs = snapper.load()
    except CheckpointCorruptError as exc:
        return {"outcome": "corrupt", "error": str(exc)[:300], "calls": len(calls)}
    except BaseException as exc:  # noqa: BLE001  (reported: the parent counts it)
        return {"outcome": "error", "error": f"{type(exc).__name__}: {str(exc)[:300]}", "calls": len(calls)}
    return {
        "outcome": "ok",
        "ids": [o.get("id") if isinstance(o, dict) else None for o in outputs],
        "digest": hashlib.sha256(pickle.dumps(outputs, protocol=4)).hexdigest(),
        "unknown": sum(1 for o in outputs if not (isinstance(o, dict) and o == output_of(o.get("id", -1)))),
        "calls": len(calls),
    }


def child_main(mode: str, kind: str, path: str) -> None:
    if mode == "build":
        build(kind, path)
        print(json.dumps({"built": path}))
    else:
        print(json.dumps(trial(kind, path)))


def serve(kind: str) -> None:
    """A trial server: snapperable imported once, then each trial (a path per line on
    stdin) in a process forked for it, before any Snapper exists, so that it starts as
    fresh as a new process but without the interpreter's start-up: a few times as many
    trials a second. Answers one JSON line per trial: its result, or died / hung."""
    import select
    import signal

    import snapperable  # noqa: F401  (imported once, before the forks)

    for line in sys.stdin:
        request = json.loads(line)
        path, timeout = request["path"], request["timeout"]
        read_end, write_end = os.pipe()
        err_path = path + ".stderr"
        pid = os.fork()
        if pid == 0:  # the trial
            os.close(read_end)
            err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(err, 2)
            try:
                answer = json.dumps(trial(kind, path)).encode()
                os.write(write_end, answer)
            finally:
                os._exit(0)
        os.close(write_end)
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
        stderr = Path(err_path).read_text(errors="replace") if os.path.exists(err_path) else ""
        if left <= 0:
            result: dict[str, Any] = {"outcome": "hung"}
        elif status != 0 or not chunks:
            result = {"outcome": "died", "error": f"wait status {status}: {stderr[-300:]}"}
        else:
            result = json.loads(b"".join(chunks))
            if "Traceback" in stderr:  # e.g. from a writer process
                result["stderr"] = stderr[-300:]
        print(json.dumps(result), flush=True)


class TrialServers:
    """``jobs`` trial servers (see ``serve``) of one format and backend."""

    def __init__(self, kind: str, backend: str, jobs: int) -> None:
        import queue

        self.kind, self.backend = kind, backend
        self._idle: "queue.Queue[subprocess.Popen[str]]" = queue.Queue()
        for _ in range(jobs):
            self._idle.put(self._start())

    def _start(self) -> "subprocess.Popen[str]":
        return subprocess.Popen(
            [sys.executable, str(HERE), "--serve", self.kind], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=dict(os.environ, SNAPPERABLE_BACKEND=self.backend),
        )

    def trial(self, path: str, timeout: float) -> Optional[dict[str, Any]]:
        server = self._idle.get()
        try:
            assert server.stdin is not None and server.stdout is not None
            server.stdin.write(json.dumps({"path": path, "timeout": timeout}) + "\n")
            server.stdin.flush()
            line = server.stdout.readline()
            answer: dict[str, Any] = json.loads(line) if line else {"outcome": "died", "error": "the server died"}
        except (OSError, ValueError) as exc:
            answer = {"outcome": "died", "error": f"the server failed: {exc}"}
        if answer.get("outcome") == "died" and server.poll() is not None:
            server = self._start()
        self._idle.put(server)
        return None if answer.get("outcome") == "hung" else answer

    def close(self) -> None:
        while not self._idle.empty():
            server = self._idle.get()
            if server.stdin is not None:
                server.stdin.close()
            server.wait(timeout=60)


# ======================================================================================
# The campaign.
# ======================================================================================
def spawn(mode: str, kind: str, backend: str, path: str, timeout: float) -> Optional[dict[str, Any]]:
    """Run the child; its JSON answer, or None if it hung. Raises on a crash."""
    env = dict(os.environ, SNAPPERABLE_BACKEND=backend)
    try:
        proc = subprocess.run(
            [sys.executable, str(HERE), "--child", mode, kind, path],
            env=env, capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"outcome": "died", "error": f"exit {proc.returncode}: {proc.stderr[-300:]}"}
    answer: dict[str, Any] = json.loads(lines[-1])
    if "Traceback" in proc.stderr:  # e.g. from a writer process
        answer["stderr"] = proc.stderr[-300:]
    return answer


def file_state(path: str) -> tuple[str, int]:
    """The file's digest, and the size of a write-ahead log beside it."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if os.path.exists(path) else "missing"
    wal = path + "-wal"
    return digest, os.path.getsize(wal) if os.path.exists(wal) else 0


def pickle_frame_ends(data: bytes) -> list[int]:
    """Offsets where each intact frame of a pickle checkpoint ends (header: 16 bytes)."""
    import struct

    ends, pos = [], 16
    while pos + 17 <= len(data):
        _, length, _ = struct.unpack_from("<cQI", data, pos)
        pos += 17 + length
        if pos > len(data):
            break
        ends.append(pos)
    return ends


class Combo:
    """One format and backend: its checkpoint, the undamaged answer, the trials."""

    def __init__(self, kind: str, backend: str, work: str, timeout: float, jobs: int) -> None:
        self.kind, self.backend, self.timeout = kind, backend, timeout
        self.servers = TrialServers(kind, backend, jobs)
        self.dir = os.path.join(work, f"{kind}-{backend}")
        os.makedirs(self.dir, exist_ok=True)
        self.base = os.path.join(self.dir, f"base.{SUFFIX[kind]}")
        answer = spawn("build", kind, backend, self.base, timeout * 10)
        if not answer or "built" not in answer:
            raise SystemExit(f"could not build the {kind} checkpoint with {backend}: {answer}")
        self.good = Path(self.base).read_bytes()
        control = self.run(self.good, "control")
        if control.get("outcome") != "ok" or control.get("calls") or control.get("changed"):
            raise SystemExit(f"the undamaged {kind} checkpoint does not resume cleanly with {backend}: {control}")
        self.truth = control
        self.frame_ends = pickle_frame_ends(self.good) if kind == "pickle" else []
        self._references: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def expected(self, damaged: bytes) -> dict[str, Any]:
        """What a run must return: the undamaged checkpoint's answer; for a pickle file
        whose damage reads as a torn tail, that of the file cut at its last intact
        frame (a crash there), since that tail is cut off."""
        if self.kind != "pickle":
            return self.truth
        boundary = self._intact_prefix(damaged)
        with self._lock:
            if boundary not in self._references:
                self._references[boundary] = self.run(self.good[:boundary], f"reference-{boundary}")
            return self._references[boundary]

    def run(self, data: bytes, name: str) -> dict[str, Any]:
        path = os.path.join(self.dir, f"{name}.{SUFFIX[self.kind]}")
        for stale in (path, path + "-wal", path + "-shm", path + ".lock"):
            if os.path.exists(stale):
                os.remove(stale)
        Path(path).write_bytes(data)
        before = file_state(path)
        answer = self.servers.trial(path, self.timeout)
        after = file_state(path)
        result: dict[str, Any] = answer if answer is not None else {"outcome": "hung"}
        result["changed"] = after != before and not (after[0] == before[0] and after[1] == 0)
        if result["changed"]:
            result["prefix_kept"] = self._prefix_kept(Path(path).read_bytes(), data)
        for leftover in (path, path + "-wal", path + "-shm", path + ".lock", path + ".stderr"):
            if os.path.exists(leftover):
                os.remove(leftover)
        return result

    def _prefix_kept(self, after: bytes, damaged: bytes) -> bool:
        """Pickle: were the frames before the damage kept as they were?"""
        return True if self.kind != "pickle" else after[: self._intact_prefix(damaged)] == damaged[: self._intact_prefix(damaged)]

    def _intact_prefix(self, damaged: bytes) -> int:
        first_difference = next(
            (i for i, (a, b) in enumerate(zip(self.good, damaged)) if a != b), min(len(self.good), len(damaged))
        )
        kept = [end for end in self.frame_ends if end <= first_difference]
        return kept[-1] if kept else 16

    def damage(self, fault: str, index: int, seed: int) -> tuple[bytes, dict[str, Any]]:
        rng = random.Random(f"{seed}-{self.kind}-{self.backend}-{fault}-{index}")
        data = bytearray(self.good)
        if fault == "flip":
            at = rng.randrange(len(data))
            data[at] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
            return bytes(data), {"offset": at}
        length = rng.randrange(1, len(data))
        return bytes(data[:length]), {"length": length}

    def judge(self, fault: str, where: dict[str, Any], damaged: bytes, result: dict[str, Any]) -> dict[str, Any]:
        outcome = result.get("outcome")
        truth = self.expected(damaged) if outcome == "ok" else self.truth
        verdict = "detected" if outcome == "corrupt" else "harmless"
        if outcome == "hung":
            verdict = "hung"
        elif outcome in ("died", "error") or "stderr" in result:
            verdict = "crashed"
        elif outcome == "ok" and result["digest"] != truth["digest"]:
            ids, good_ids = result["ids"], truth["ids"]
            if result["unknown"] or any(i not in good_ids for i in ids) or len(ids) >= len(good_ids):
                verdict = "wrong"
            else:
                verdict = "dropped"
        if verdict in ("detected", "harmless") and result.get("changed"):
            # A pickle file's torn tail is cut off, and redone, by design: the frames
            # before it must stay as they were.
            torn_tail = self.kind == "pickle" and outcome == "ok" and result.get("prefix_kept")
            if not torn_tail:
                verdict = "written"
        return {"kind": self.kind, "backend": self.backend, "fault": fault, **where, "verdict": verdict,
                "outcome": outcome, "error": result.get("error", result.get("stderr", ""))[:200]}


def campaign(args: argparse.Namespace) -> dict[tuple[str, str, str], dict[str, int]]:
    done: set[tuple[str, str, str, int]] = set()
    if args.resume and os.path.exists(args.out):
        for line in Path(args.out).read_text().splitlines():
            row = json.loads(line)
            done.add((row["kind"], row["backend"], row["fault"], row["index"]))
    elif os.path.exists(args.out):
        os.remove(args.out)
    work = tempfile.mkdtemp(prefix="snapperable-faults-")
    deadline = time.monotonic() + args.budget if args.budget else None
    try:
        for kind in args.formats:
            for backend in args.backends:
                combo = Combo(kind, backend, work, args.timeout, args.jobs)
                todo = [(fault, i) for fault, count in (("flip", args.flips), ("cut", args.truncations))
                        for i in range(count) if (kind, backend, fault, i) not in done]

                def one(task: tuple[str, int], combo: Combo = combo) -> dict[str, Any]:
                    fault, index = task
                    data, where = combo.damage(fault, index, args.seed)
                    row = combo.judge(fault, where, data, combo.run(data, f"trial-{fault}-{index}"))
                    row["index"] = index
                    return row

                try:
                    with ThreadPoolExecutor(args.jobs) as pool, open(args.out, "a") as out:
                        for row in pool.map(one, todo):
                            out.write(json.dumps(row) + "\n")
                            out.flush()
                            if deadline is not None and time.monotonic() > deadline:
                                pool.shutdown(cancel_futures=True)
                                print(f"time budget spent: stopped in {kind}/{backend}; go on with --resume")
                                return summarize(args.out)
                finally:
                    combo.servers.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summarize(args.out)


def summarize(out: str) -> dict[tuple[str, str, str], dict[str, int]]:
    table: dict[tuple[str, str, str], dict[str, int]] = {}
    for line in Path(out).read_text().splitlines():
        row = json.loads(line)
        counts = table.setdefault((row["kind"], row["backend"], row["fault"]), {})
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
    return table


def print_table(table: dict[tuple[str, str, str], dict[str, int]]) -> None:
    header = ["format", "backend", "fault", "trials", "detected", "harmless", *COUNTS]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for (kind, backend, fault), counts in sorted(table.items()):
        cells = [kind, backend, "byte flip" if fault == "flip" else "truncation", str(sum(counts.values())),
                 str(counts.get("detected", 0)), str(counts.get("harmless", 0)), *(str(counts.get(c, 0)) for c in COUNTS)]
        print("| " + " | ".join(cells) + " |")


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child_main(*sys.argv[2:])
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(sys.argv[2])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flips", type=int, default=1000, help="byte flips per format and backend (1000)")
    ap.add_argument("--truncations", type=int, default=200, help="truncations per format and backend (200)")
    ap.add_argument("--formats", type=lambda s: s.split(","), default=["sqlite", "pickle"])
    ap.add_argument("--backends", type=lambda s: s.split(","), default=["rust", "python"])
    ap.add_argument("--seed", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2, help="trials at once (2)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before a trial counts as hung (60)")
    ap.add_argument("--budget", type=float, default=None, help="stop after this many seconds (resume later)")
    ap.add_argument("--out", default="faults.jsonl", help="trial results, one JSON line each")
    ap.add_argument("--resume", action="store_true", help="keep --out and skip the trials it holds")
    args = ap.parse_args()
    started = time.monotonic()
    table = campaign(args)
    print_table(table)
    failures = sum(counts.get(c, 0) for counts in table.values() for c in COUNTS)
    print(f"{sum(sum(c.values()) for c in table.values())} trials in {time.monotonic() - started:.0f} s; "
          f"{failures} wrong, dropped, written, crashed or hung")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
