"""Durability: what survives SIGKILL, Ctrl-C, fork, damaged files and a failing writer.

Real parts only: real SQLite and pickle-frame files, real child processes
(``crash_child.py``), real signals. Cross-process tests pin ``crash_child.VERSION`` so
the parent reads what the child saved. Child processes get ``backend_env``, so each
test runs its children on the backend under test too. Nothing sleeps for a fixed time
to wait for something: every wait polls with a deadline.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import sqlite3
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

import snapperable
from conftest import forks_with_threads, wait_until
from crash_child import VERSION, WRITER_ERROR_EXIT, item_of, make_storage, output_of
from snapperable import (
    CheckpointCorruptError,
    CheckpointLockedError,
    ForkedProcessError,
    PickleSnapshotStorage,
    Snapper,
    SQLiteSnapshotStorage,
    WriterError,
)
from snapperable.keys import input_key
from snapperable.storage.base import SnapshotStorage

TESTS = Path(__file__).resolve().parent
PACKAGE_ROOT = Path(snapperable.__file__).resolve().parent.parent
CHILD = str(TESTS / "crash_child.py")
STORAGES = ["sqlite", "pickle"]
SUFFIX = {"sqlite": "db", "pickle": "pkl"}

# The pickle-frame layout (docs/architecture.md 6.2, pickle_storage.py), parsed here independently.
PICKLE_HEADER_SIZE = 16
PICKLE_FRAME = struct.Struct("<cQI")
PICKLE_FRAME_HEADER_SIZE = PICKLE_FRAME.size + 4


# -- helpers ------------------------------------------------------------------------------
@pytest.fixture(params=STORAGES)
def kind(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def child_env(backend_env: dict[str, str]) -> dict[str, str]:
    """``backend_env`` with the package this test imported (and ``crash_child``) importable."""
    env = dict(backend_env)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PACKAGE_ROOT), str(TESTS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return env


def checkpoint_path(tmp_path: Path, kind: str) -> str:
    return str(tmp_path / f"run.{SUFFIX[kind]}")


def pinned(storage: SnapshotStorage[int], n: int, fn: Callable[[int], int] = output_of) -> Snapper[int, int]:
    """A Snapper that reads and writes what ``crash_child`` does (same pinned version)."""
    return Snapper(range(n), fn, snapshot_storage=storage, version=VERSION)


def saved_items(kind: str, path: str, n: int) -> list[int]:
    """Items 0..n-1 whose output is saved, in order, checking each output on the way."""
    outputs = pinned(make_storage(kind, path), n).load()
    items = [item_of(o) for o in outputs]
    assert [output_of(x) for x in items] == outputs, "an output does not belong to any item"
    return items


def logged_items(log: Path) -> list[int]:
    """Items a child's ``work`` finished, in order; a line cut by SIGKILL is not counted."""
    if not log.exists():
        return []
    lines = log.read_bytes().split(b"\n")
    return [int(line) for line in lines[:-1]]


def spawn(env: dict[str, str], *args: str) -> "subprocess.Popen[bytes]":
    return subprocess.Popen(
        [sys.executable, CHILD, *args],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(proc: "subprocess.Popen[bytes]", timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"child did not finish in {timeout} s: {err.decode(errors='replace')}")
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def integrity(path: str, scratch: Path) -> str:
    """``PRAGMA integrity_check`` of the database and WAL a crash left, leaving them as they are.

    A read-only connection cannot be used: when the kill tore the WAL index (``-shm``),
    reading needs to rebuild it, which SQLite refuses read-only (SQLITE_READONLY_RECOVERY).
    So the check runs on copies of the database and its WAL; the index is rebuilt from the
    WAL copy, exactly as the next run will rebuild it.
    """
    scratch.mkdir(exist_ok=True)
    copy = str(scratch / "copy.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(copy + suffix):
            os.unlink(copy + suffix)
    shutil.copyfile(path, copy)
    if os.path.exists(path + "-wal"):
        shutil.copyfile(path + "-wal", copy + "-wal")
    conn = sqlite3.connect(copy)
    try:
        result: str = conn.execute("PRAGMA integrity_check").fetchone()[0]
        return result
    finally:
        conn.close()


# -- 1. SIGKILL, then resume --------------------------------------------------------------
CRASH_ITEMS = 3000
# Where each run is killed: "file" as soon as the checkpoint file exists (mid-creation:
# header, schema, first version), else once its log has grown by that many items. The
# counts are not multiples of round numbers, so a writer that waits for a fixed batch
# (10, 50, ...) instead of committing promptly is caught between two commits.
KILL_POINTS: list[tuple[str, int]] = [("file", 0), ("items", 1), ("items", 613), ("items", 237), ("items", 481)]
# Redo allowed per kill. With batch_size=1 the writer starts a commit as soon as one item
# is pending, and a commit (one small transaction, one fsync: well under a millisecond
# here) is shorter than one item (>= 2 ms of sleep). So at the moment of a kill the only
# finished-but-unsaved items are those finished while the current commit runs (about 1)
# and the one whose log line is written but which is not handed to the writer yet; 5
# leaves room for a slow fsync or a descheduled writer thread, and a writer that does not
# group-commit promptly (or loses a commit) blows through it.
REDO_PER_KILL = 5


def test_sigkill_at_many_points_then_resume_loses_only_in_flight_items(
    tmp_path: Path, kind: str, child_env: dict[str, str]
) -> None:
    path = checkpoint_path(tmp_path, kind)
    log = tmp_path / "calls.log"
    args = ["run", kind, path, "--n", str(CRASH_ITEMS), "--log", str(log), "--sleep", "0.002"]
    saved_before: list[int] = []
    redone = 0
    for how, grow in KILL_POINTS:
        already_logged = len(logged_items(log))
        proc = spawn(child_env, *args)
        if how == "file":
            wait_until(lambda: os.path.exists(path), 30, "the checkpoint file", proc)
        else:
            wait_until(lambda: len(logged_items(log)) >= already_logged + grow, 30, f"{grow} items", proc)
        proc.send_signal(signal.SIGKILL)
        assert finish(proc)[0] == -signal.SIGKILL, "the child finished before it was killed"

        if kind == "sqlite":  # the raw file the kill left, before anything reopens it
            assert integrity(path, tmp_path / "scratch") == "ok"
        this_run = logged_items(log)[already_logged:]
        saved = saved_items(kind, path, CRASH_ITEMS)
        # Items are processed and committed in order: what is saved is a prefix, and it
        # never shrinks from one run to the next.
        assert saved == list(range(len(saved)))
        assert len(saved) >= len(saved_before)
        # A resumed run processes only what was not saved before it started.
        assert not set(this_run) & set(saved_before), "a resumed run redid saved items"
        saved_set = set(saved)
        lost = [x for x in this_run if x not in saved_set]
        # Only the last items of the run (the ones in flight at the kill) may be lost.
        assert lost == this_run[len(this_run) - len(lost) :]
        assert len(lost) <= REDO_PER_KILL, f"kill lost {len(lost)} finished items: {lost}"
        redone += len(lost)
        saved_before = saved

    proc = spawn(child_env, *args)
    code, _, err = finish(proc)
    assert code == 0, err
    calls = logged_items(log)
    assert sorted(set(calls)) == list(range(CRASH_ITEMS))
    assert len(calls) - CRASH_ITEMS == redone <= REDO_PER_KILL * len(KILL_POINTS)
    assert pinned(make_storage(kind, path), CRASH_ITEMS).load() == [output_of(x) for x in range(CRASH_ITEMS)]
    if kind == "sqlite":
        assert integrity(path, tmp_path / "scratch") == "ok"


def test_a_database_whose_creation_was_cut_short_reads_as_empty_and_resumes(tmp_path: Path) -> None:
    # What a SIGKILL between SQLite's making the file and snapperable's first commit
    # leaves (the "file" kill point above meets it now and then): a database without
    # application_id or tables. start() initializes it; reads see nothing saved, rather
    # than "not a snapperable checkpoint".
    path = str(tmp_path / "run.db")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    assert os.path.getsize(path) > 0
    storage = make_storage("sqlite", path)
    assert pinned(storage, 5).load() == []
    assert pinned(storage, 5).plan().done == 0
    pinned(storage, 5).start()
    assert pinned(make_storage("sqlite", path), 5).load() == [output_of(x) for x in range(5)]


# -- 2. one holder per checkpoint ----------------------------------------------------------
def test_second_process_gets_locked_error_at_once_naming_file_and_pid(
    tmp_path: Path, kind: str, child_env: dict[str, str]
) -> None:
    path = checkpoint_path(tmp_path, kind)
    proc = spawn(child_env, "hold", kind, path)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == b"ready\n", finish(proc)[2]
        started = time.monotonic()
        with pytest.raises(CheckpointLockedError) as held:
            with pinned(make_storage(kind, path), 3) as second:
                second.start()  # only start() takes the hold
        with pytest.raises(CheckpointLockedError):  # without `with`: held per call
            pinned(make_storage(kind, path), 3).start()
        # Reads need no hold: the holder's committed rows are read beside it.
        assert pinned(make_storage(kind, path), 3).load() == [output_of(x) for x in range(3)]
        assert time.monotonic() - started < 2, "waited for the lock instead of failing"
        message = str(held.value)
        assert path in message and str(proc.pid) in message, message
    finally:
        proc.send_signal(signal.SIGKILL)
        finish(proc)
    # The kernel drops a dead holder's lock: no stale lock after a crash.
    assert saved_items(kind, path, 3) == [0, 1, 2]


def test_two_snappers_in_one_process_cannot_hold_one_file(tmp_path: Path, kind: str) -> None:
    path = checkpoint_path(tmp_path, kind)
    link = str(tmp_path / f"link.{SUFFIX[kind]}")  # another name for the same file
    os.symlink(path, link)
    with pinned(make_storage(kind, path), 5) as first:
        first.start()
        for other in (path, link):
            with pytest.raises(CheckpointLockedError) as held:
                with pinned(make_storage(kind, other), 5) as second:
                    second.start()
            assert other in str(held.value)
            with pytest.raises(CheckpointLockedError):
                pinned(make_storage(kind, other), 5).start()
            # A read needs no hold, in this process too.
            assert pinned(make_storage(kind, other), 5).load() == [output_of(x) for x in range(5)]
        assert first.load() == [output_of(x) for x in range(5)]
    with pinned(make_storage(kind, link), 6) as second:  # released on leaving `with`
        second.start()
        assert second.load() == [output_of(x) for x in range(6)]


def test_sequential_snappers_on_one_storage_object_work(tmp_path: Path, kind: str) -> None:
    # The seed's pattern: no `with`, a second Snapper while the first is still referenced.
    storage = make_storage(kind, checkpoint_path(tmp_path, kind))
    calls: list[int] = []

    def work(x: int) -> int:
        calls.append(x)
        return output_of(x)

    first = pinned(storage, 5, work)
    first.start()
    second = pinned(storage, 10, work)
    second.start()
    first.start()
    assert first.load() == [output_of(x) for x in range(5)]
    assert second.load() == [output_of(x) for x in range(10)]
    assert calls == list(range(10))


# -- 3. private files ----------------------------------------------------------------------
@pytest.fixture
def no_umask() -> Iterator[None]:
    """umask 0, so only the mode the library asks for protects a new file."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_new_checkpoint_files_are_private(tmp_path: Path, kind: str, no_umask: None) -> None:
    path = checkpoint_path(tmp_path, kind)
    companions = [path + "-wal", path + "-shm"] if kind == "sqlite" else []

    def modes() -> dict[str, int]:
        found = [p for p in [path, path + ".lock", *companions] if os.path.exists(p)]
        return {p: stat.S_IMODE(os.stat(p).st_mode) for p in found}

    with pinned(make_storage(kind, path), 5) as snapper:
        snapper.start()
        while_open = modes()
    assert {path, path + ".lock"} <= set(while_open)
    assert while_open == {p: 0o600 for p in while_open}
    after = modes()
    assert after == {p: 0o600 for p in after}


# -- 4. damaged files ------------------------------------------------------------------------
class Sweep:
    """Runs one check per damaged variant and reports every variant that fails, not the first."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.cases = 0

    def check(self, where: str, case: Callable[[], None]) -> None:
        self.cases += 1
        try:
            case()
        except Exception as exc:  # AssertionError, or an exception type that must not escape
            self.problems.append(f"{where}: {type(exc).__name__}: {str(exc)[:300]}")

    def verify(self) -> None:
        assert not self.problems, f"{len(self.problems)} of {self.cases} damaged files mishandled:\n" + "\n".join(
            self.problems
        )


def outcome(storage: SnapshotStorage[int], n: int) -> tuple[Optional[CheckpointCorruptError], list[int], list[int]]:
    """Open a damaged checkpoint: (error, items loaded before the rerun, items rerun).

    Only ``CheckpointCorruptError`` may come out; anything else fails the test as it is.
    """
    calls: list[int] = []

    def work(x: int) -> int:
        calls.append(x)
        return output_of(x)

    try:
        with pinned(storage, n, work) as snapper:
            before = [item_of(o) for o in snapper.load()]
            snapper.start()
            assert snapper.load() == [output_of(x) for x in range(n)]
    except CheckpointCorruptError as exc:
        assert storage.path in str(exc), f"the error does not name the file: {exc}"
        return exc, [], calls
    return None, before, calls


def read_pickle_frames(data: bytes) -> Iterator[tuple[int, int, str, Any]]:
    """(start, end, kind, body) of each complete frame, up to the first incomplete one."""
    pos = PICKLE_HEADER_SIZE
    while pos + PICKLE_FRAME_HEADER_SIZE <= len(data):
        _, length, _ = PICKLE_FRAME.unpack_from(data, pos)
        end = pos + PICKLE_FRAME_HEADER_SIZE + length
        if end > len(data):
            return
        kind, body = pickle.loads(data[pos + PICKLE_FRAME_HEADER_SIZE : end])
        yield pos, end, kind, body
        pos = end


def pickle_frames(data: bytes) -> list[tuple[int, int, set[int]]]:
    """(start, end, items saved in it) of each frame of an intact pickle checkpoint."""
    by_key = {input_key(x): x for x in range(1000)}
    frames = [
        (start, end, {by_key[row[0]] for row in body} if kind == "items" else set())
        for start, end, kind, body in read_pickle_frames(data)
    ]
    assert frames and frames[-1][1] == len(data)
    return frames


PICKLE_ITEMS = 30


@pytest.fixture
def pickle_checkpoint(tmp_path: Path) -> tuple[bytes, list[tuple[int, int, set[int]]]]:
    """A good pickle checkpoint of PICKLE_ITEMS items over several frames, and its frames."""
    path = str(tmp_path / "good.pkl")
    for n in range(5, PICKLE_ITEMS + 1, 5):  # one start per 5 items: at least one frame each
        pinned(PickleSnapshotStorage[int](path), n).start()
    data = Path(path).read_bytes()
    frames = pickle_frames(data)
    assert len([f for f in frames if f[2]]) >= 6
    return data, frames


def test_pickle_flipped_bytes_raise_corrupt_or_drop_only_the_last_frame(
    tmp_path: Path, pickle_checkpoint: tuple[bytes, list[tuple[int, int, set[int]]]]
) -> None:
    good, frames = pickle_checkpoint
    offsets = set(range(PICKLE_HEADER_SIZE))
    for start, end, _ in frames:  # every frame-header byte, a spread of payload bytes
        offsets |= set(range(start, start + PICKLE_FRAME_HEADER_SIZE))
        offsets |= set(range(start + PICKLE_FRAME_HEADER_SIZE, end, 7)) | {end - 1}
    path = str(tmp_path / "damaged.pkl")
    sweep = Sweep()
    for offset in sorted(offsets):
        frame = next((i for i, (s, e, _) in enumerate(frames) if s <= offset < e), None)

        def case() -> None:
            damaged = bytearray(good)
            damaged[offset] ^= 0xFF if offset % 2 else 0x01
            Path(path).write_bytes(damaged)
            error, before, rerun = outcome(PickleSnapshotStorage[int](path), PICKLE_ITEMS)
            after = Path(path).read_bytes()
            if error is not None:
                assert after == damaged, "a damaged file was modified"
                return
            # Success is allowed only for damage in the last frame, read as a torn tail.
            assert frame == len(frames) - 1, "damage before the tail went unnoticed"
            good_prefix = frames[frame][0]
            assert after[:good_prefix] == good[:good_prefix], "the good prefix changed"
            kept = set().union(*(items for _, _, items in frames[:frame]))
            assert set(before) == kept, "earlier results vanished"
            assert set(rerun) == set(range(PICKLE_ITEMS)) - kept

        where = "header" if frame is None else f"frame {frame} of {len(frames)}"
        sweep.check(f"byte {offset} ({where}) flipped", case)
    sweep.verify()


def test_pickle_truncation_anywhere_keeps_every_complete_frame(
    tmp_path: Path, pickle_checkpoint: tuple[bytes, list[tuple[int, int, set[int]]]]
) -> None:
    good, frames = pickle_checkpoint
    lengths = set(range(PICKLE_HEADER_SIZE + 2))
    for start, end, _ in frames:
        lengths |= {start + 1, start + PICKLE_FRAME_HEADER_SIZE - 1, start + PICKLE_FRAME_HEADER_SIZE}
        lengths |= set(range(start + PICKLE_FRAME_HEADER_SIZE + 1, end, 23)) | {end - 1, end}
    path = str(tmp_path / "truncated.pkl")
    sweep = Sweep()
    for length in sorted(lengths):

        def case() -> None:
            Path(path).write_bytes(good[:length])
            complete = [f for f in frames if f[1] <= length]
            kept = set().union(*(items for _, _, items in complete))
            error, before, rerun = outcome(PickleSnapshotStorage[int](path), PICKLE_ITEMS)
            if 0 < length < PICKLE_HEADER_SIZE:  # a header cut short: never a new file
                assert error is not None and "cut short" in str(error), error
                assert Path(path).read_bytes() == good[:length], "a damaged file was modified"
                return
            assert error is None, error
            assert set(before) == kept, "saved results were lost"
            assert set(rerun) == set(range(PICKLE_ITEMS)) - kept
            good_prefix = complete[-1][1] if complete else 0
            assert Path(path).read_bytes()[:good_prefix] == good[:good_prefix], "the good prefix changed"

        sweep.check(f"truncated to {length}", case)
    sweep.verify()


SQLITE_ITEMS = 400


@pytest.fixture
def sqlite_checkpoint(tmp_path: Path) -> bytes:
    """A closed, good SQLite checkpoint of SQLITE_ITEMS items (several pages)."""
    path = str(tmp_path / "good.db")
    pinned(SQLiteSnapshotStorage[int](path), SQLITE_ITEMS).start()
    assert not os.path.exists(path + "-wal") or os.path.getsize(path + "-wal") == 0, (
        "closing the checkpoint left its WAL behind"
    )
    data = Path(path).read_bytes()
    assert len(data) >= 4 * 4096
    return data


def sqlite_offsets(size: int) -> list[int]:
    offsets = set(range(0, 100, 3)) | {16, 17, 18, 19, 28, 60, 63, 68, 71}
    for page in range(0, size, 4096):
        offsets |= {page + d for d in (0, 1, 3, 5, 8, 11, 40, 500, 1500, 2500, 3500, 4000, 4095)}
    return sorted(o for o in offsets if o < size)


def check_sqlite_damage(path: str, damaged: bytes) -> None:
    for stale in (path + "-wal", path + "-shm"):
        if os.path.exists(stale):
            os.unlink(stale)
    Path(path).write_bytes(damaged)
    error, _, _ = outcome(SQLiteSnapshotStorage[int](path), SQLITE_ITEMS)
    assert os.path.exists(path), "the checkpoint was deleted"
    after = Path(path).read_bytes()
    if error is not None:
        assert after == damaged, "a damaged checkpoint was modified"
    else:  # damage SQLite does not notice (unused space, a value): the run completed
        assert len(after) >= len(damaged), "the checkpoint shrank"


def test_sqlite_flipped_bytes_raise_corrupt_or_work(tmp_path: Path, sqlite_checkpoint: bytes) -> None:
    path = str(tmp_path / "damaged.db")
    sweep = Sweep()
    for offset in sqlite_offsets(len(sqlite_checkpoint)):
        damaged = bytearray(sqlite_checkpoint)
        damaged[offset] ^= 0xFF if offset % 2 else 0x01
        sweep.check(f"byte {offset} flipped", lambda: check_sqlite_damage(path, bytes(damaged)))
    sweep.verify()


def test_sqlite_truncation_raises_corrupt_or_works(tmp_path: Path, sqlite_checkpoint: bytes) -> None:
    path = str(tmp_path / "truncated.db")
    size = len(sqlite_checkpoint)
    lengths = {1, 15, 16, 50, 99, 100, 101, 511, 512, 4095, 4097}
    lengths |= {p + d for p in range(4096, size, 4096) for d in (-1, 0, 1, 2048)}
    sweep = Sweep()
    for length in sorted(x for x in lengths if x < size):
        sweep.check(f"truncated to {length}", lambda: check_sqlite_damage(path, sqlite_checkpoint[:length]))
    sweep.verify()


def foreign_files(tmp_path: Path) -> dict[str, bytes]:
    """Files that are not checkpoints of the storage that opens them, by what they are."""
    plain = str(tmp_path / "plain.db")
    conn = sqlite3.connect(plain)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    conn.executemany("INSERT INTO notes (text) VALUES (?)", [(f"note {i}",) for i in range(50)])
    conn.commit()
    conn.close()
    lookalike = str(tmp_path / "lookalike.db")  # another application's table called items
    conn = sqlite3.connect(lookalike)
    conn.execute("CREATE TABLE items (seq INTEGER PRIMARY KEY, key BLOB)")
    conn.commit()
    conn.close()
    sqlite_checkpoint = str(tmp_path / "checkpoint.db")
    pinned(SQLiteSnapshotStorage[int](sqlite_checkpoint), 5).start()
    pickle_checkpoint = str(tmp_path / "checkpoint.pkl")
    pinned(PickleSnapshotStorage[int](pickle_checkpoint), 5).start()
    return {
        "random bytes": bytes((i * 7919 + 13) % 251 for i in range(8192)),
        "a short text": b"hi\n",
        "a text file": b"name,value\n" + b"".join(b"row %d,%d\n" % (i, i) for i in range(500)),
        "another application's SQLite db": Path(plain).read_bytes(),
        "a SQLite db with a foreign items table": Path(lookalike).read_bytes(),
        "a SQLite checkpoint": Path(sqlite_checkpoint).read_bytes(),
        "a pickle checkpoint": Path(pickle_checkpoint).read_bytes(),
    }


def test_a_file_that_is_not_a_checkpoint_raises_corrupt_and_is_left_alone(tmp_path: Path, kind: str) -> None:
    own = "a SQLite checkpoint" if kind == "sqlite" else "a pickle checkpoint"
    for what, content in foreign_files(tmp_path).items():
        if what == own:
            continue
        path = str(tmp_path / f"foreign.{SUFFIX[kind]}")
        Path(path).write_bytes(content)
        with pytest.raises(CheckpointCorruptError) as corrupt:
            pinned(make_storage(kind, path), 5).start()
        assert path in str(corrupt.value), f"{what}: {corrupt.value}"
        assert Path(path).read_bytes() == content, f"{what}: the file was modified"
        os.unlink(path)


# -- 5. Ctrl-C and exceptions from fn ---------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 1000])
def test_keyboard_interrupt_in_fn_saves_everything_before_it(
    tmp_path: Path, kind: str, child_env: dict[str, str], batch_size: int
) -> None:
    # batch_size=1000: nothing is committed before the interrupt; unwinding must flush.
    path = checkpoint_path(tmp_path, kind)
    proc = spawn(
        child_env, "run", kind, path, "--n", "100", "--raise-at", "37", "--raise-kind", "keyboard",
        "--batch-size", str(batch_size),
    )
    code, _, err = finish(proc)
    assert code == -signal.SIGINT and "KeyboardInterrupt" in err, (code, err)
    assert saved_items(kind, path, 100) == list(range(37))
    plan = pinned(make_storage(kind, path), 100).plan()
    assert (plan.done, plan.new) == (37, 63)


def test_sigint_saves_every_finished_item(tmp_path: Path, kind: str, child_env: dict[str, str]) -> None:
    path = checkpoint_path(tmp_path, kind)
    log = tmp_path / "calls.log"
    proc = spawn(
        child_env, "run", kind, path, "--n", "3000", "--log", str(log), "--sleep", "0.002",
        "--batch-size", "1000",
    )
    wait_until(lambda: len(logged_items(log)) >= 50, 30, "50 items", proc)
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)
    assert code == -signal.SIGINT and "KeyboardInterrupt" in err, (code, err)
    finished = logged_items(log)
    saved = saved_items(kind, path, 3000)
    assert saved == list(range(len(saved)))
    # The signal may land between an item's log line and its hand-over to the writer.
    assert len(finished) - 1 <= len(saved) <= len(finished)


def test_exception_from_fn_propagates_after_saving_everything_before_it(tmp_path: Path, kind: str) -> None:
    path = checkpoint_path(tmp_path, kind)

    def work(x: int) -> int:
        if x == 23:
            raise LookupError("record 23 is malformed")
        return output_of(x)

    with pytest.raises(LookupError, match="record 23 is malformed"):
        with pinned(make_storage(kind, path), 50, work) as snapper:
            snapper.start()
    assert saved_items(kind, path, 50) == list(range(23))
    with pytest.raises(LookupError):  # without `with`, at the seed's batch size
        Snapper(range(50), work, snapshot_storage=make_storage(kind, path), version=VERSION, batch_size=1000).start()
    assert saved_items(kind, path, 50) == list(range(23))


# -- 6. fork --------------------------------------------------------------------------------
FORK_OK = 0
FORK_NOT_RAISED = 10
FORK_OTHER_ERROR = 11


def run_in_fork(body: Callable[[], object], expected: type[BaseException] = ForkedProcessError) -> int:
    """Run ``body`` in a forked child; its exit code: FORK_OK if it raised ``expected``."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = FORK_NOT_RAISED
        try:
            body()
        except expected:
            code = FORK_OK
        except BaseException:
            code = FORK_OTHER_ERROR
        os._exit(code)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.005)


@forks_with_threads
def test_forked_child_cannot_use_the_parents_snapper(tmp_path: Path, kind: str) -> None:
    path = checkpoint_path(tmp_path, kind)
    with pinned(make_storage(kind, path), 20) as snapper:
        snapper.start()
        assert run_in_fork(snapper.start) == FORK_OK
        assert run_in_fork(snapper.load) == FORK_OK
        assert run_in_fork(lambda: snapper.__exit__(None, None, None)) == FORK_OK
        # A new Snapper in the child on the same file cannot start (the parent holds
        # it), but can read it: reads need no hold.
        fresh = pinned(make_storage(kind, path), 20)
        assert run_in_fork(fresh.start, CheckpointLockedError) == FORK_OK
        assert run_in_fork(fresh.load) == FORK_NOT_RAISED
        assert snapper.load() == [output_of(x) for x in range(20)]
    assert saved_items(kind, path, 20) == list(range(20))
    with pinned(make_storage(kind, path), 30) as later:
        later.start()
        assert later.load() == [output_of(x) for x in range(30)]


# -- 7. a failing writer reaches the caller -----------------------------------------------------
RENAME_ITEMS = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
conn.execute("ALTER TABLE items RENAME TO moved_away")
conn.close()
"""


@pytest.mark.parametrize("at", [10, 49])
def test_sqlite_writer_failure_raises_writer_error(tmp_path: Path, at: int) -> None:
    path = str(tmp_path / "run.db")

    def work(x: int) -> int:
        if x == at:  # from another process: one SQLite library per file per process
            subprocess.run([sys.executable, "-c", RENAME_ITEMS, path], check=True, timeout=30)
        return output_of(x)

    with pytest.raises(WriterError) as failed:
        with pinned(SQLiteSnapshotStorage[int](path), 50, work) as snapper:
            snapper.start()
    assert path in str(failed.value)


def test_writer_error_when_the_file_cannot_grow(tmp_path: Path, kind: str, child_env: dict[str, str]) -> None:
    path = checkpoint_path(tmp_path, kind)
    proc = spawn(child_env, "fsize", kind, path, "--n", "40", "--limit-at", "10")
    code, out, err = finish(proc)
    assert code == WRITER_ERROR_EXIT, (code, out, err)
    assert path in out
    saved = saved_items(kind, path, 40)  # reopens cleanly: a torn tail at most
    assert saved == list(range(len(saved))) and len(saved) >= 10


def test_short_write_never_corrupts_the_checkpoint(tmp_path: Path, kind: str, child_env: dict[str, str]) -> None:
    # The limit cuts one append short (7 bytes of it land), then is lifted: as when a
    # full disk frees up. Either the writer reports the failure, or everything it reported
    # saved reads back; never a checkpoint that later appends made unreadable.
    path = checkpoint_path(tmp_path, kind)
    proc = spawn(child_env, "fsize", kind, path, "--n", "40", "--limit-at", "10", "--extra", "7")
    code, out, err = finish(proc)
    assert code in (0, WRITER_ERROR_EXIT), (code, out, err)
    saved = saved_items(kind, path, 40)
    if code == 0:
        assert saved == list(range(40)), "start() returned but not everything was saved"
    else:
        assert saved == list(range(len(saved))) and len(saved) >= 10


# -- 8. max_wait_time -------------------------------------------------------------------------
SQLITE_POLLER = """
import sqlite3, sys, time, urllib.parse
path, want, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
start = time.monotonic()
conn = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True, timeout=1)
seen = -1
while time.monotonic() - start < limit:
    try:
        seen = conn.execute("SELECT count(*) FROM items").fetchone()[0]
    except sqlite3.OperationalError:
        pass
    if seen >= want:
        break
    time.sleep(0.01)
print(seen)
"""


def visible_items(kind: str, path: str, want: int, limit: float) -> int:
    """Items another reader sees within ``limit`` s (polling until ``want`` are there)."""
    if kind == "sqlite":  # a separate process: one SQLite library per file per process
        result = subprocess.run(
            [sys.executable, "-c", SQLITE_POLLER, path, str(want), str(limit)],
            capture_output=True, check=True, timeout=limit + 30,
        )
        return int(result.stdout)
    deadline = time.monotonic() + limit
    while True:
        data = Path(path).read_bytes()
        seen = sum(len(body) for _, _, kind, body in read_pickle_frames(data) if kind == "items")
        if seen >= want or time.monotonic() > deadline:
            return seen
        time.sleep(0.01)


def test_max_wait_time_commits_a_batch_that_is_not_full(tmp_path: Path, kind: str) -> None:
    path = checkpoint_path(tmp_path, kind)
    reached, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def work(x: int) -> int:
        if x == 5:
            reached.set()
            release.wait(10)
        return output_of(x)

    def run() -> None:
        try:
            snapper = Snapper(
                range(10), work, snapshot_storage=make_storage(kind, path), version=VERSION,
                batch_size=1000, max_wait_time=0.2,
            )
            with snapper:
                snapper.start()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        assert reached.wait(30)
        blocked_at = time.monotonic()
        seen = visible_items(kind, path, 5, 2.0)
        waited = time.monotonic() - blocked_at
        assert worker.is_alive() and not release.is_set()  # fn is still blocked on item 5
    finally:
        release.set()
        worker.join(30)
    assert not errors, errors
    assert seen == 5, f"after {waited:.1f} s a reader saw {seen} of the 5 finished items"
    assert saved_items(kind, path, 10) == list(range(10))


@forks_with_threads
def test_child_forked_inside_fn_does_not_keep_the_lock(storage: SnapshotStorage[Any]) -> None:
    """A process forked while the checkpoint is held (a worker started by fn) must not
    keep the hold alive after the Snapper releases it."""
    children: list[int] = []

    def fn(x: int) -> int:
        if x == 0:
            pid = os.fork()
            if pid == 0:  # the child outlives the with block, then leaves quietly
                time.sleep(3)
                os._exit(0)
            children.append(pid)
        return x

    with Snapper(range(3), fn, snapshot_storage=storage, version="v") as snapper:
        snapper.start()
    try:
        with Snapper(range(3), fn, snapshot_storage=storage, version="v") as again:
            assert again.load() == [0, 1, 2]
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
