"""A driver process for tests/test_dask.py: a Snapper on a Dask cluster, that the parent interrupts.

    python dask_child.py ADDRESS PATH --n N --log LOG --sleep S

Connects to the scheduler at ADDRESS (the parent's cluster), or with ADDRESS ``local``
starts a 2-worker ``LocalCluster`` of its own (whose worker processes a terminal's
Ctrl-C reaches too), and runs ``range(N)`` through
``work`` on its workers, with the version pinned (``VERSION``) so that the parent resumes
the checkpoint at PATH with a Snapper of its own. ``work`` runs on the workers: it
appends each item it finished to LOG, one ``write`` a line, so the parent can count calls.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import time

from contextlib import ExitStack

from distributed import Client, LocalCluster

from snapperable import Snapper, SQLiteSnapshotStorage

VERSION = "dask-child-v1"


def logged(log: str, pause: float, x: int) -> int:
    """``x * 3 + 1``, with each call appended to ``log`` (one ``write``) as it finishes.

    Run here, this is ``__main__``'s, so it travels to the workers by value, as a
    script's or a notebook's function does; the tests import it by name.
    """
    time.sleep(pause)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{x}\n".encode("ascii"))
    finally:
        os.close(fd)
    return x * 3 + 1


def main() -> None:
    # Python installs its SIGINT handler only if SIGINT was not ignored at start-up (a
    # test run started in the background passes it on ignored): the parent's SIGINT must
    # be a Ctrl-C here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("path")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()
    with ExitStack() as stack:
        cluster: object = args.address
        if args.address == "local":
            cluster = stack.enter_context(
                LocalCluster(  # type: ignore[no-untyped-call]
                    host="127.0.0.1", dashboard_address=None, n_workers=2, threads_per_worker=1
                )
            )
        client = stack.enter_context(Client(cluster))  # type: ignore[no-untyped-call]  # distributed is typed in part
        print("connected", flush=True)
        with Snapper(
            range(args.n), functools.partial(logged, args.log, args.sleep), executor=client,
            snapshot_storage=SQLiteSnapshotStorage[int](args.path), version=VERSION,
        ) as snapper:
            snapper.start()


if __name__ == "__main__":
    main()
