"""The pure-Python SQLite store's writer process (``snapperable._sqlite_writer``).

A run whose commits grow large hands them to a child process, so that SQLite work does
not fight the loop for the GIL. These tests force that path (every commit through the
process), start real processes, and kill them for real.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import forks_with_threads
from crash_child import SHIPPED_PROCESS_MIN_ROWS, force_writer_process
from snapperable import Snapper, SQLiteSnapshotStorage, WriterError, _pure, _sqlite_writer
from snapperable._sqlite_writer import WriterProcess


@pytest.fixture(autouse=True)
def backend() -> Iterator[str]:
    """The writer process belongs to the pure backend: these tests run on it alone."""
    from snapperable import _backend

    saved = _backend.backend
    _backend.backend = _pure
    yield "python"
    _backend.backend = saved


def wait_for_a_process(spy: "ProcessSpy") -> int:
    """The pid of the first writer process, once it has committed rows."""
    deadline = time.monotonic() + 10
    while not spy.rows_committed and time.monotonic() < deadline:
        time.sleep(0.01)
    return spy.pids()[0]


class ProcessSpy:
    """Counts, without replacing anything, what goes through ``WriterProcess``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.processes: list[WriterProcess] = []
        self.rows_sent = 0
        self.rows_committed = 0
        real_init = WriterProcess.__init__
        real_send = WriterProcess.send
        real_settle = WriterProcess.settle

        def init(process: WriterProcess, *args: Any) -> None:
            real_init(process, *args)
            self.processes.append(process)

        def send(process: WriterProcess, rows: Any) -> int:
            committed = real_send(process, rows)
            self.rows_sent += len(rows)
            self.rows_committed += committed
            return committed

        def settle(process: WriterProcess) -> int:
            committed = real_settle(process)
            self.rows_committed += committed
            return committed

        monkeypatch.setattr(WriterProcess, "__init__", init)
        monkeypatch.setattr(WriterProcess, "send", send)
        monkeypatch.setattr(WriterProcess, "settle", settle)

    def pids(self) -> list[int]:
        return [p._proc.pid for p in self.processes]


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> ProcessSpy:
    return ProcessSpy(monkeypatch)


@pytest.fixture
def forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sqlite_writer, "PROCESS_MIN_ROWS", 1)
    monkeypatch.setattr(_sqlite_writer, "PROCESS_CONNECT_WAIT", 30.0)
    force_writer_process()  # the same settings crash_child.py uses (monkeypatch restores)


def square(x: int) -> int:
    return x * x


def storage_in(tmp_path: Path) -> SQLiteSnapshotStorage[int]:
    return SQLiteSnapshotStorage[int](str(tmp_path / "run.db"))


def test_commits_go_through_the_process_and_read_back(tmp_path: Path, forced: None, spy: ProcessSpy) -> None:
    items = list(range(5000))
    snapper = Snapper(items, square, snapshot_storage=storage_in(tmp_path))
    snapper.start()
    assert len(spy.processes) == 1
    assert spy.rows_sent == spy.rows_committed == len(items)  # every row, through the process
    assert snapper.load() == [x * x for x in items]
    # Failures and retried items (full rows) go the same way, in order with plain ones.
    flaky_calls: dict[int, int] = {}

    def flaky(x: int) -> int:
        flaky_calls[x] = flaky_calls.get(x, 0) + 1
        if x % 7 == 0 and flaky_calls[x] == 1:
            raise ConnectionError(f"flaky {x}")
        if x % 11 == 0:
            raise ValueError(f"bad {x}")
        return -x

    more = Snapper(
        range(200), flaky, snapshot_storage=SQLiteSnapshotStorage[int](str(tmp_path / "more.db")),
        skip_item_errors=True, retries=1, retry_on=(ConnectionError,), retry_backoff=0.0,
    )
    more.start()
    expected = [-x for x in range(200) if x % 11]
    assert more.load() == expected
    failed = [x for x in range(200) if x % 11 == 0]
    assert sorted(f.item for f in more.failed_items) == failed
    assert len([m for m in more.load_metrics() if not m.success]) == len(failed)
    assert all(p._proc.returncode == 0 for p in spy.processes)  # each exited when closed


def test_small_runs_never_start_a_process(tmp_path: Path, spy: ProcessSpy, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the shipped threshold, commits of a few rows stay in the thread."""
    monkeypatch.setattr(_sqlite_writer, "PROCESS_MIN_ROWS", SHIPPED_PROCESS_MIN_ROWS)
    assert SHIPPED_PROCESS_MIN_ROWS > 100
    snapper = Snapper(range(100), square, snapshot_storage=storage_in(tmp_path))
    snapper.start()
    assert spy.processes == []
    assert snapper.load() == [x * x for x in range(100)]


@pytest.mark.parametrize("executable", ["/nonexistent/python", "/bin/false"])
def test_a_process_that_cannot_start_leaves_commits_in_the_thread(
    tmp_path: Path, forced: None, monkeypatch: pytest.MonkeyPatch, executable: str
) -> None:
    """No such executable (OSError at once), or one that exits without connecting."""
    monkeypatch.setattr(sys, "executable", executable)
    snapper = Snapper(range(3000), square, snapshot_storage=storage_in(tmp_path))
    snapper.start()
    assert snapper.load() == [x * x for x in range(3000)]


def test_a_killed_process_fails_the_run_and_a_rerun_loses_nothing(
    tmp_path: Path, forced: None, spy: ProcessSpy
) -> None:
    calls: list[int] = []  # closure values: the version is pinned below
    killed: list[int] = []

    def work(x: int) -> int:
        calls.append(x)
        if x == 1500 and not killed:  # in the first run only
            killed.append(wait_for_a_process(spy))
            os.kill(killed[0], signal.SIGKILL)
            time.sleep(0.2)  # let it die before the next commit reaches it
        return x * x

    storage = storage_in(tmp_path)
    with pytest.raises(WriterError, match="writer process ended unexpectedly"):
        Snapper(range(3000), work, snapshot_storage=storage, version="v1").start()
    done_before = len(Snapper(range(3000), work, snapshot_storage=storage, version="v1").load())
    assert 0 < done_before < 3000
    calls.clear()
    rerun = Snapper(range(3000), work, snapshot_storage=storage, version="v1")
    rerun.start()
    assert rerun.load() == [x * x for x in range(3000)]
    assert len(calls) == 3000 - done_before  # only what was not saved is done again


def test_the_process_is_out_of_reach_of_the_terminals_ctrl_c(tmp_path: Path, forced: None, spy: ProcessSpy) -> None:
    """A terminal's Ctrl-C goes to its foreground process group; the writer must not stop
    halfway through a commit, so it runs in a session of its own."""
    seen: list[tuple[int, int]] = []

    def work(x: int) -> int:
        if x == 10:
            pid = wait_for_a_process(spy)
            seen.append((os.getsid(pid), os.getpgid(pid)))
        return x

    Snapper(range(20), work, snapshot_storage=storage_in(tmp_path)).start()
    [(sid, pgid)] = seen
    assert sid != os.getsid(0) and pgid != os.getpgid(0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@forks_with_threads
def test_a_child_forked_by_fn_does_not_hold_up_close(tmp_path: Path, forced: None) -> None:
    """A worker forked inside fn inherits the pipe to the writer process; closing must not
    wait for that worker to exit (the process is told to stop, not left to see EOF)."""
    children: list[int] = []

    def work(x: int) -> int:
        if x == 5:
            pid = os.fork()
            if pid == 0:  # the worker: outlives the run by far, then leaves without cleanup
                time.sleep(20)
                os._exit(0)
            children.append(pid)
        return x

    started = time.monotonic()
    snapper = Snapper(range(3000), work, snapshot_storage=storage_in(tmp_path))
    try:
        snapper.start()
        elapsed = time.monotonic() - started
        assert snapper.load() == list(range(3000))
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert elapsed < 15, f"start() waited {elapsed:.1f} s for the forked worker"


def test_a_process_that_never_answers_is_not_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spy: ProcessSpy
) -> None:
    """A ``sys.executable`` that is not Python (an embedding application) may neither
    connect nor exit: commits stay in the thread, and close does not wait for it."""
    silent = tmp_path / "silent"
    silent.write_text("#!/bin/sh\nexec sleep 60\n")
    silent.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(silent))
    monkeypatch.setattr(_sqlite_writer, "PROCESS_MIN_ROWS", 1)  # started at once ...
    monkeypatch.setattr(_sqlite_writer, "PROCESS_CONNECT_WAIT", 0.0)  # ... never waited for
    started = time.monotonic()
    snapper = Snapper(range(3000), square, snapshot_storage=storage_in(tmp_path))
    snapper.start()
    assert time.monotonic() - started < 20
    assert len(spy.processes) == 1 and spy.rows_sent == 0
    assert spy.processes[0]._proc.returncode is not None  # killed and reaped
    assert snapper.load() == [x * x for x in range(3000)]


def test_works_with_file_descriptors_past_1024(tmp_path: Path, forced: None, spy: ProcessSpy) -> None:
    """A server may hold thousands of files; the pipe's descriptor is then past what
    ``select`` can watch."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit on open files ({hard}) is below 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        snapper = Snapper(range(3000), square, snapshot_storage=storage_in(tmp_path))
        snapper.start()
        assert spy.rows_committed == 3000
        assert min(p._from_child for p in spy.processes) > 1024
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert snapper.load() == [x * x for x in range(3000)]


class Label(str):
    """A str subclass: what a library's exception may return from __str__."""


class LabelledError(Exception):
    def __str__(self) -> str:
        return Label("labelled failure")


def test_rows_marshal_cannot_carry_are_committed_in_the_thread(tmp_path: Path, forced: None, spy: ProcessSpy) -> None:
    """A failure message of a str subclass (marshal refuses those) is saved all the same."""

    def work(x: int) -> int:
        if x % 500 == 7:
            raise LabelledError()
        return x

    snapper = Snapper(range(3000), work, snapshot_storage=storage_in(tmp_path), skip_item_errors=True)
    snapper.start()
    assert spy.rows_committed > 0
    assert snapper.load() == [x for x in range(3000) if x % 500 != 7]
    failed = [m for m in snapper.load_metrics() if not m.success]
    assert len(failed) == 6 and all(m.error == "labelled failure" for m in failed)


@pytest.mark.parametrize("why", ["frozen application", "no select.poll"])
def test_no_process_where_it_cannot_run(
    tmp_path: Path, forced: None, spy: ProcessSpy, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    import select

    if why == "frozen application":  # sys.executable is the application itself
        monkeypatch.setattr(sys, "frozen", True, raising=False)
    else:
        monkeypatch.delattr(select, "poll")
    snapper = Snapper(range(3000), square, snapshot_storage=storage_in(tmp_path))
    snapper.start()
    assert spy.processes == []
    assert snapper.load() == [x * x for x in range(3000)]


_SIGPIPE_DEFAULT = """
import os, signal, sys, time
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as a CLI that restores it, or an embedder
sys.path.insert(0, sys.argv[2])
from crash_child import force_writer_process
force_writer_process()
from snapperable import Snapper, SQLiteSnapshotStorage, WriterError, _sqlite_writer
started = []
real_init = _sqlite_writer.WriterProcess.__init__
def init(self, *args):
    real_init(self, *args)
    started.append(self)
_sqlite_writer.WriterProcess.__init__ = init
def work(x):
    if x == 1500:
        deadline = time.time() + 10
        while not (started and started[0]._ready) and time.time() < deadline:
            time.sleep(0.01)  # until the writer thread has it connected
        os.kill(started[0]._proc.pid, signal.SIGKILL)
        time.sleep(0.2)
    return x
try:
    Snapper(range(3000), work, snapshot_storage=SQLiteSnapshotStorage(sys.argv[1])).start()
except WriterError as exc:
    print("writer-error", exc)
"""


def test_a_dead_process_is_an_error_not_a_sigpipe(tmp_path: Path) -> None:
    """With SIGPIPE at its default action, writing to a dead writer process must not
    kill the user's process."""
    proc = subprocess.run(
        [sys.executable, "-c", _SIGPIPE_DEFAULT, str(tmp_path / "run.db"), str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, SNAPPERABLE_BACKEND="python"),
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "writer-error" in proc.stdout and "ended unexpectedly" in proc.stdout, proc.stdout
