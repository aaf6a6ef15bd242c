"""The Rust core ``snapperable._core`` alone: what only it can get wrong.

The rules of the extension's own boundary (argument and row checks, values that are
not keys), a process forked while its threads hold locks, a user's function or a
pickle that re-enters the checkpoint mid-call, and damaged files that must not make it
allocate without bound. The contract both backends share is ``test_store_contract.py``;
the Rust core against the pure-Python reference, ``test_differential.py``.
"""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

import pytest

from conftest import StoreOpener, forks_with_threads, skip_module_unless_backends
from samples import HOLD_WRITE_LOCK, ok_row, saved
from snapperable.errors import ForkedProcessError

skip_module_unless_backends("rust")
from snapperable import _core  # noqa: E402  (typed import, after the skip)


@pytest.fixture(autouse=True)
def backend() -> str:
    """Overrides the suite's two-backend fixture: these tests are of the Rust core."""
    return "rust"


# -- the extension's boundary -----------------------------------------------------------


def test_key_set_rejects_and_ignores_what_is_not_a_key() -> None:
    ks = _core.new_key_set()
    ks.add(b"k" * 16)
    assert b"k" * 16 in ks
    for other in (b"k" * 15, b"k" * 17, bytearray(b"k" * 16), "k" * 16, 7, None):
        assert other not in ks
    with pytest.raises(ValueError):
        ks.add(b"short")
    with pytest.raises(TypeError):
        ks.add("k" * 16)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ks.claim(b"x" * 17)
    assert len(ks) == 1  # nothing claimed from a bad buffer
    assert ks.claim(b"") == []
    assert not hasattr(ks, "missing")  # replaced by claim


def test_arguments_are_checked(open_store: StoreOpener) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        open_store(synchronous="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        open_store(batch_size=0)
    with pytest.raises(ValueError, match="max_wait_time"):
        open_store(max_wait_time=-1.0)
    store = open_store(synchronous="normal", max_wait_time=math.inf)
    with pytest.raises(ValueError):
        store.record((b"short", 1, 0, None, b"", None, None, None, 1, 0.0, 0.0))
    with pytest.raises(TypeError):
        store.record(("not", "a", "row"))  # type: ignore[arg-type]


def test_process_checks_its_arguments_before_any_item(open_store: StoreOpener) -> None:
    store = open_store()
    version = store.add_version("fp", "{}", None)
    calls: list[int] = []

    def fn(x: int) -> int:
        calls.append(x)
        return x

    items = [0, 1, 2]
    blob = _core.input_keys(items)
    for positions in ([0, 3], [0, -1], [0, 2**70]):
        with pytest.raises((IndexError, OverflowError)):
            store.process(fn, items, blob, positions, version)
    with pytest.raises(IndexError):
        store.process(fn, items, blob[:32], [0, 2], version)  # in range of items, not of keys
    with pytest.raises(IndexError):
        store.process(fn, items[:2], blob, [0, 2], version)
    with pytest.raises(ValueError):
        store.process(fn, items, blob[:-1], [0], version)
    with pytest.raises(TypeError):
        store.process(fn, items, blob, ["0"], version)  # type: ignore[list-item]
    assert calls == []
    assert saved(store, version) == []


# -- a fork while the core's threads hold locks ----------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@forks_with_threads
def test_forked_child_cannot_use_the_checkpoint_and_does_not_hang(open_store: StoreOpener) -> None:
    store = open_store(batch_size=1000)
    version = store.add_version("fp", "{}", None)
    store.record(ok_row(1, version, 1))
    pid = os.fork()
    if pid == 0:  # the child: every use is refused, dropping the object returns
        code = 0
        try:
            for call in (store.flush, store.close, store.versions):
                try:
                    call()
                    code = 1
                except ForkedProcessError:
                    pass
            del store
            gc.collect()
        finally:
            os._exit(code)
    assert _child_exit_code(pid) == 0
    store.flush()  # the parent's checkpoint is unaffected
    assert store.all_outputs(version) == [1]


def _child_exit_code(pid: int) -> int:
    """The exit code of forked child ``pid``; kills it and fails the test if it hangs."""
    deadline = time.monotonic() + 20
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.02)


def _close_in_child(store: Any) -> NoReturn:
    """In a forked child: closes ``store`` and exits, 0 if that raised ForkedProcessError."""
    code = 1
    try:
        store.close()
    except ForkedProcessError:
        code = 0
    finally:
        os._exit(code)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@forks_with_threads
def test_forked_child_close_does_not_wait_for_a_lock_held_at_the_fork(
        tmp_path: Path, open_store: StoreOpener) -> None:
    """A parent thread inside ``close``, joining a writer stuck in a commit, holds a lock
    at the fork. That lock stays held in the child, where the thread does not exist: the
    child's ``close`` must refuse before taking any lock, not wait for it forever."""
    store = open_store(batch_size=1)
    version = store.add_version("fp", "{}", None)
    # Another process holds the write lock: the writer's commit waits in the busy timeout.
    blocker = subprocess.Popen(
        [sys.executable, "-c", HOLD_WRITE_LOCK, str(tmp_path / "run.db")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert blocker.stdout is not None and blocker.stdin is not None
    assert blocker.stdout.readline() == "locked\n"
    store.record(ok_row(1, version, 1))
    failures: list[BaseException] = []

    def close() -> None:
        try:
            store.close()
        except BaseException as exc:
            failures.append(exc)

    closer = threading.Thread(target=close)
    closer.start()
    try:
        time.sleep(0.3)  # the closer is now in close, waiting for the writer to finish
        assert closer.is_alive()
        pid = os.fork()
        if pid == 0:
            _close_in_child(store)
    finally:
        blocker.communicate("\n")  # the parent's commit, and close, go on
        closer.join()
    assert failures == []
    assert _child_exit_code(pid) == 0
    assert open_store().all_outputs(version) == [1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@forks_with_threads
def test_children_forked_while_the_writer_commits_close_without_hanging(
        open_store: StoreOpener) -> None:
    """Forks at random points of the writer's work (mid-commit with the store locked,
    or with the buffer locked) and of a recording thread's; each child's ``close``
    must refuse at once. A guard: it did not fail before ``close`` checked the fork
    first, since no lock taken before that check was held by the writer or ``record``."""
    store = open_store(batch_size=1)
    version = store.add_version("fp", "{}", None)
    stop = threading.Event()

    def record() -> None:
        i = 0
        while not stop.is_set():
            store.record(ok_row(i, version, i))
            i += 1

    recorder = threading.Thread(target=record)
    recorder.start()
    try:
        for _ in range(30):
            time.sleep(0.01)
            pid = os.fork()
            if pid == 0:
                _close_in_child(store)
            assert _child_exit_code(pid) == 0
    finally:
        stop.set()
        recorder.join()
    store.flush()


# -- re-entrance and damage must not crash or hang the process ---------------------------


def test_process_survives_fn_shrinking_the_list(open_store: StoreOpener) -> None:
    store = open_store()
    version = store.add_version("fp", "{}", None)
    items = [0, 1, 2, 3]
    blob = _core.input_keys(items)

    def fn(x: int) -> int:
        items.clear()
        return x

    with pytest.raises(IndexError):
        store.process(fn, items, blob, [0, 1], version)
    assert saved(store, version) == [0]


DAMAGED_SEQ = """
import pickle, sqlite3, sys
import snapperable._core as core
path, seq = sys.argv[1], int(sys.argv[2])
store = core.open_sqlite(path, "normal", 1, None)
version = store.add_version("fp", "{}", None)
key = core.input_keys([0])
store.record((key, version, 0, None, pickle.dumps(1, 4), None, None, None, 1, 0.0, 0.0))
store.close()
conn = sqlite3.connect(path); conn.execute("UPDATE items SET seq = ?", (seq,)); conn.commit(); conn.close()
store = core.open_sqlite(path, "normal", 1, None)
from snapperable.errors import CheckpointCorruptError
# Format 2 numbers rows 1, 2, 3, ...: a row numbered otherwise is damage, found by
# every read, and none of them sizes a table for it first.
for read in (lambda: store.key_sets(version), lambda: store.all_outputs(version),
             lambda: store.outputs_for(version, key), lambda: store.key_set(None, 0)):
    try:
        read()
    except CheckpointCorruptError as exc:
        assert "out of sequence" in str(exc), exc
    else:
        raise AssertionError("a damaged seq was read as good")
print("fine")
"""


@pytest.mark.parametrize("seq", [2**36, 2**62])
def test_a_huge_seq_is_no_reason_to_allocate(tmp_path: Path, seq: int) -> None:
    # max(seq) only sizes tables; a damaged one once asked for terabytes (abort) or
    # overflowed a capacity (a PanicException).
    proc = subprocess.run(
        [sys.executable, "-c", DAMAGED_SEQ, str(tmp_path / "run.db"), str(seq)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "fine", proc.stderr


REENTRANT_LOAD = """
import pickle, sys
import snapperable._core as core

store = None

def rebuild(value):
    store.key_set(None, 0)  # uses the checkpoint while it is being read
    return value

class Reentrant:
    def __reduce__(self):
        return (rebuild, (7,))

store = core.open_sqlite(sys.argv[1], "normal", 1, None)
version = store.add_version("fp", "{}", None)
keys = core.input_keys([0, 1])
for i, value in enumerate([Reentrant(), Reentrant()]):
    row = (keys[16 * i : 16 * i + 16], version, 0, None, pickle.dumps(value, 4), None, None, None, 1, 0.0, 0.0)
    store.record(row)
store.flush()
try:
    print(store.all_outputs(version))
except Exception as exc:
    print(type(exc).__name__)
"""


def test_an_output_that_uses_the_checkpoint_while_loading_does_not_hang(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", REENTRANT_LOAD, str(tmp_path / "run.db")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in ("[7, 7]", "CheckpointError"), proc.stdout
