"""A child process for tests/test_durability.py: a Snapper the parent kills, interrupts or starves.

    python crash_child.py run    STORAGE PATH --n N --log LOG [--sleep S] [--batch-size B]
                                 [--raise-at I --raise-kind keyboard|error]
    python crash_child.py hold   STORAGE PATH        # holds the checkpoint until stdin closes
    python crash_child.py fsize  STORAGE PATH --n N --limit-at I [--extra BYTES]

``STORAGE`` is ``sqlite`` or ``pickle``. Every run pins ``VERSION``, so the parent reads
what the child saved with a Snapper of its own (its function object is another one).
``run`` appends each item ``work`` finished to LOG, one line per item, with one
``write`` each, so the parent can count processing calls even after a SIGKILL.
``fsize`` shrinks ``RLIMIT_FSIZE`` under the writer (exit code ``WRITER_ERROR_EXIT`` when
``start`` raised ``WriterError``).
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import time
from typing import Optional

from snapperable import PickleSnapshotStorage, Snapper, SQLiteSnapshotStorage, WriterError, _sqlite_writer
from snapperable.storage.base import SnapshotStorage

VERSION = "durability-v1"
WRITER_ERROR_EXIT = 3

# Set (to 1) to send every commit of the pure-Python SQLite store through its writer
# process, which a run otherwise starts only once its commits are large (.ci/run runs
# the pure suite once so). Read here and by conftest.py, so that children do the same.
WRITER_PROCESS_ENV = "SNAPPERABLE_TEST_WRITER_PROCESS"


def writer_process_forced() -> bool:
    return os.environ.get(WRITER_PROCESS_ENV) == "1"


# The shipped setting, before force_writer_process changes it.
SHIPPED_PROCESS_MIN_ROWS = _sqlite_writer.PROCESS_MIN_ROWS


def force_writer_process() -> None:
    """Every commit of the pure SQLite store through the writer process."""
    _sqlite_writer.PROCESS_MIN_ROWS = 1
    _sqlite_writer.PROCESS_CONNECT_WAIT = 30.0


def output_of(x: int) -> int:
    """What every ``work`` returns for ``x``; injective, so outputs name their items."""
    return x * 3 + 1


def item_of(output: int) -> int:
    return (output - 1) // 3


def make_storage(kind: str, path: str) -> SnapshotStorage[int]:
    if kind == "sqlite":
        return SQLiteSnapshotStorage[int](path)
    if kind == "pickle":
        return PickleSnapshotStorage[int](path)
    raise ValueError(f"unknown storage {kind!r}")


def growing_file(kind: str, path: str) -> str:
    """The file a commit appends to: SQLite commits go to the WAL (the database file only
    grows when the WAL is checkpointed into it, on close here)."""
    return path + "-wal" if kind == "sqlite" else path


def size_of(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


if writer_process_forced():
    force_writer_process()


def run(args: argparse.Namespace) -> None:
    # The parent interrupts this run as Ctrl-C would. Python installs its SIGINT handler
    # only when SIGINT is not ignored at start-up, and a test run started in the
    # background by a non-interactive shell (`pytest &`, nohup) passes SIGINT on ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    log_fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def work(x: int) -> int:
        if x == args.raise_at:
            if args.raise_kind == "keyboard":
                raise KeyboardInterrupt
            raise ValueError(f"item {x} is malformed")
        if args.sleep:
            time.sleep(args.sleep)
        os.write(log_fd, f"{x}\n".encode("ascii"))  # logged: fn finished this item
        return output_of(x)

    snapper = Snapper(
        range(args.n),
        work,
        snapshot_storage=make_storage(args.storage, args.path),
        batch_size=args.batch_size,
        version=VERSION,
    )
    with snapper:
        snapper.start()


def hold(args: argparse.Namespace) -> None:
    with Snapper(range(3), output_of, snapshot_storage=make_storage(args.storage, args.path), version=VERSION) as s:
        s.start()
        print("ready", flush=True)
        sys.stdin.read()


def set_file_size_limit(limit: int) -> None:
    """RLIMIT_FSIZE of this process and of its children: the pure SQLite store's writer
    process, if it has started one, commits for it."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as children:
            for pid in children.read().split():
                resource.prlimit(int(pid), resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def fsize(args: argparse.Namespace) -> None:
    """Lower the file-size limit under the writer once item ``limit_at`` is reached.

    With ``--extra 0`` the next append fails outright (EFBIG). With ``--extra K`` it is
    cut short after K bytes (a short ``write``, as on a nearly full disk), and the limit
    is lifted again once that append is over (the next item flushes), so later appends
    succeed. A ``WriterError`` from that flush propagates out of ``work``, as it would
    from the Snapper's own next call.
    """
    appended = growing_file(args.storage, args.path)
    snapper: Optional[Snapper[int, int]] = None

    def flush() -> None:
        assert snapper is not None and snapper._checkpoint is not None
        snapper._checkpoint.store.flush()

    def work(x: int) -> int:
        if x == args.limit_at:
            flush()  # everything before this item is committed: the size is settled
            set_file_size_limit(size_of(appended) + args.extra)
        elif x == args.limit_at + 1 and args.extra:
            try:
                flush()  # the append of item limit_at has run into the limit (or failed)
            finally:
                set_file_size_limit(resource.RLIM_INFINITY)
        return output_of(x)

    snapper = Snapper(
        range(args.n), work, snapshot_storage=make_storage(args.storage, args.path), version=VERSION
    )
    try:
        with snapper:
            snapper.start()
    except WriterError as exc:
        print(f"writer-error {exc}", flush=True)
        sys.exit(WRITER_ERROR_EXIT)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["run", "hold", "fsize"])
    parser.add_argument("storage", choices=["sqlite", "pickle"])
    parser.add_argument("path")
    parser.add_argument("--n", type=int, default=0)
    parser.add_argument("--log", default=os.devnull)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--raise-at", type=int, default=-1)
    parser.add_argument("--raise-kind", choices=["keyboard", "error"], default="error")
    parser.add_argument("--limit-at", type=int, default=-1)
    parser.add_argument("--extra", type=int, default=0)
    args = parser.parse_args()
    {"run": run, "hold": hold, "fsize": fsize}[args.mode](args)


if __name__ == "__main__":
    main()
