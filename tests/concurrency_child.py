"""A child process for tests/test_concurrency.py: a concurrent Snapper the parent kills or interrupts.

    python concurrency_child.py STORAGE PATH --n N --log LOG --sleep S --workers W
                                --executor thread|async|process

Every finished call of ``work`` appends its item to LOG (one ``write`` per line, so a
SIGKILL never leaves a half line that counts). Process workers read LOG and S from the
environment (``CONCURRENCY_LOG``, ``CONCURRENCY_SLEEP``), which they inherit. The version
is pinned to ``crash_child.VERSION``, so the parent reads what the child saved.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from typing import Optional

from crash_child import VERSION, make_storage, output_of
from snapperable import Snapper

LOG_ENV = "CONCURRENCY_LOG"
SLEEP_ENV = "CONCURRENCY_SLEEP"
_log_fd: Optional[int] = None


def _log(x: int) -> None:
    global _log_fd
    if _log_fd is None:
        _log_fd = os.open(os.environ[LOG_ENV], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.write(_log_fd, f"{x}\n".encode("ascii"))


def work(x: int) -> int:
    time.sleep(float(os.environ[SLEEP_ENV]))
    _log(x)
    return output_of(x)


async def awork(x: int) -> int:
    await asyncio.sleep(float(os.environ[SLEEP_ENV]))
    _log(x)
    return output_of(x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("storage", choices=["sqlite", "pickle"])
    parser.add_argument("path")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--executor", choices=["thread", "async", "process"], default="thread")
    args = parser.parse_args()
    # As crash_child.run: a background start may pass SIGINT on ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ[LOG_ENV] = args.log
    os.environ[SLEEP_ENV] = str(args.sleep)
    storage = make_storage(args.storage, args.path)
    snapper: Snapper[int, int]
    if args.executor == "async":
        snapper = Snapper(range(args.n), awork, snapshot_storage=storage, version=VERSION, workers=args.workers)
    else:
        snapper = Snapper(
            range(args.n), work, snapshot_storage=storage, version=VERSION, workers=args.workers, executor=args.executor
        )
    with snapper:
        snapper.start()


if __name__ == "__main__":
    main()
