"""Each failure reads the same whichever backend and storage meets it.

The words are built in one place, the classmethods of ``snapperable/errors.py``, which
the pure-Python backend, the storages and the Rust core (``rust/errors.rs``) all call.
The expected messages are spelled out here in full, not rebuilt with those classmethods:
each test runs once per backend (the ``backend`` fixture) and, where both storages can
meet the failure, once per storage, so every one of them must give exactly these words.
"""

from __future__ import annotations

import os
import pickle
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import forks_with_threads
from crash_child import SHIPPED_PROCESS_MIN_ROWS, writer_process_forced
from snapperable import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointLockedError,
    ForkedProcessError,
    PickleSnapshotStorage,
    Snapper,
    SnapshotStorage,
    SQLiteSnapshotStorage,
    WriterError,
    _backend,
    _sqlite_writer,
    keys,
)
from snapperable._contract import STATUS_OK, ItemRow
from snapperable._row_checksum import row_checksum, version_checksum
from snapperable.storage.pickle_storage import encode_frame

KEPT = "snapperable never resets such a file: move it aside (or restore a backup) and run again"
SUFFIX = {"sqlite": "db", "pickle": "pkl"}


def work(x: int) -> int:
    return x * 10


@pytest.fixture(params=sorted(SUFFIX))
def kind(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def path(tmp_path: Path, kind: str) -> str:
    return str(tmp_path / f"run.{SUFFIX[kind]}")


def storage(kind: str, path: str) -> SnapshotStorage[int]:
    return SQLiteSnapshotStorage[int](path) if kind == "sqlite" else PickleSnapshotStorage[int](path)


def snapper(kind: str, path: str, n: int = 3) -> Snapper[int, int]:
    return Snapper(range(n), work, snapshot_storage=storage(kind, path), version="messages-v1")


def finished(kind: str, path: str) -> None:
    """A checkpoint of 3 items (item rows 1-3) of function version 1."""
    snapper(kind, path).start()


def message_of(call: Callable[[], object], expected: type[BaseException]) -> str:
    with pytest.raises(expected) as raised:
        call()
    assert type(raised.value) is expected, raised.value
    return str(raised.value)


def append_frame(path: str, record: tuple[str, Any]) -> None:
    with open(path, "ab") as file:
        file.write(encode_frame(record))


def item_row(key: bytes, output: bytes, version: int = 1) -> ItemRow:
    return (key, version, STATUS_OK, None, output, None, None, None, 1, 0.0, 0.0)


# -- newer format ------------------------------------------------------------------------
def test_newer_format(kind: str, path: str) -> None:
    finished(kind, path)
    newest = 2 if kind == "sqlite" else 1
    if kind == "sqlite":
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA user_version = 3")
        conn.close()
    else:
        with open(path, "r+b") as file:  # the header: magic (8 bytes), format (u32), 0
            file.seek(8)
            file.write(struct.pack("<I", 2))
    assert message_of(snapper(kind, path).start, CheckpointFormatError) == (
        f"checkpoint {path} has format version {newest + 1}, newer than this snapperable reads "
        f"(up to {newest}); upgrade snapperable to resume it"
    )


# -- not a snapperable file --------------------------------------------------------------
def test_a_text_file_is_not_a_checkpoint(kind: str, path: str) -> None:
    Path(path).write_bytes(b"name,value\n" + b"".join(b"row %d,%d\n" % (i, i) for i in range(500)))
    reason = "file is not a database" if kind == "sqlite" else "it does not start with a pickle checkpoint's header"
    assert message_of(snapper(kind, path).start, CheckpointCorruptError) == (
        f"{path} is not a snapperable checkpoint ({reason}); {KEPT}"
    )


def test_another_applications_sqlite_database_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = str(tmp_path / "notes.db")
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    conn.close()
    assert message_of(snapper("sqlite", path).start, CheckpointCorruptError) == (
        f"{path} is not a snapperable checkpoint (application_id 0); {KEPT}"
    )


# -- damaged files -----------------------------------------------------------------------
def damaged(kind: str, path: str, sql: str, record: tuple[str, Any]) -> None:
    """A finished checkpoint, then damaged: ``sql`` run on a SQLite one, ``record``
    appended (as an intact frame) to a pickle one. The SQLite rows' checksums are
    brought up to date after it (as if written so), so that the check under test, not
    the checksum, finds the damage."""
    finished(kind, path)
    if kind == "sqlite":
        with sqlite3.connect(path) as conn:
            conn.execute(sql)
            columns = "key, version, status, input, output, error_type, error, traceback, attempts, started, ended"
            for seq, *fields in conn.execute(f"SELECT seq, {columns} FROM items").fetchall():
                if isinstance(fields[0], bytes) and len(fields[0]) == 16:
                    conn.execute("UPDATE items SET checksum = ? WHERE seq = ?", (row_checksum(*fields), seq))
            for row in conn.execute("SELECT id, fingerprint, parts, uses, created FROM versions").fetchall():
                conn.execute("UPDATE versions SET checksum = ? WHERE id = ?", (version_checksum(*row), row[0]))
        conn.close()
    else:
        append_frame(path, record)


def test_an_item_row_with_a_short_key(kind: str, path: str) -> None:
    damaged(
        kind, path,
        "INSERT INTO items (key, version, status, output, attempts, started, ended, checksum)"
        " VALUES (x'0102', 1, 0, NULL, 1, 0, 0, zeroblob(12))",
        ("items", [item_row(b"\x01\x02", pickle.dumps(0))]),
    )
    assert message_of(snapper(kind, path).start, CheckpointCorruptError) == (
        f"checkpoint {path} is damaged: item row 4 has a key that is not 16 bytes; {KEPT}"
    )


def test_a_saved_output_that_does_not_unpickle(kind: str, path: str) -> None:
    damaged(
        kind, path,
        "UPDATE items SET output = CAST('not a pickle' AS BLOB) WHERE seq = 2",
        ("items", [item_row(keys.input_key(1), b"not a pickle")]),  # supersedes item 1's row
    )
    assert message_of(snapper(kind, path).load, CheckpointCorruptError) == (
        f"checkpoint {path} is damaged: a saved output cannot be unpickled "
        f"(UnpicklingError: invalid load key, 'n'.); {KEPT}"
    )


def test_a_function_version_record_that_is_not_valid(kind: str, path: str) -> None:
    record: tuple[object, ...] = (2, "fp", "{not json", 2, 0.5)
    damaged(kind, path, "UPDATE versions SET parts = '{not json' WHERE id = 1", ("version", record))
    if kind == "sqlite":  # the fields as stored, which the message shows
        with sqlite3.connect(path) as conn:
            record = conn.execute("SELECT id, fingerprint, parts, uses, created FROM versions").fetchone()
        conn.close()
    assert message_of(snapper(kind, path).start, CheckpointCorruptError) == (
        f"checkpoint {path} is damaged: a function version record is not valid: {record!r}; {KEPT}"
    )


# -- a closed checkpoint -----------------------------------------------------------------
def test_a_closed_checkpoint(kind: str, path: str) -> None:
    checkpoint = storage(kind, path).open(1, None)
    store = checkpoint.store
    version = store.add_version("fp", "{}", None)
    checkpoint.close()
    closed = f"checkpoint {path} is closed; open it again to use it"
    assert message_of(lambda: store.record(item_row(keys.input_key(1), pickle.dumps(1), version)), CheckpointError) == closed
    assert message_of(store.versions, CheckpointError) == closed
    assert message_of(lambda: store.key_sets(version), CheckpointError) == closed


# -- a checkpoint held by another Snapper ------------------------------------------------
def test_held_in_this_process(kind: str, path: str) -> None:
    with snapper(kind, path) as first:
        first.start()
        assert message_of(snapper(kind, path).start, CheckpointLockedError) == (
            f"checkpoint {path} is already held by another Snapper in this process; "
            "close it (leave its `with` block) first"
        )


HOLDER = """
import sys
from snapperable import PickleSnapshotStorage, Snapper, SQLiteSnapshotStorage
kind, path = sys.argv[1:]
storage = SQLiteSnapshotStorage(path) if kind == "sqlite" else PickleSnapshotStorage(path)
with Snapper(range(3), abs, snapshot_storage=storage, version="holder") as held:
    held.start()
    print("ready", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def holder(kind: str, path: str, backend_env: dict[str, str]) -> Iterator["subprocess.Popen[bytes]"]:
    """Another process holding the checkpoint at ``path`` until the test ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, kind, path],
        env=backend_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n", proc.communicate(timeout=30)
        yield proc
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)


def test_held_by_another_process(kind: str, path: str, holder: "subprocess.Popen[bytes]") -> None:
    assert message_of(snapper(kind, path).start, CheckpointLockedError) == (
        f"checkpoint {path} is held by another process (pid {holder.pid}); wait for it to finish or stop it"
    )


# -- the background writer failed --------------------------------------------------------
def drop_items_table(path: str) -> None:
    """Another process (another SQLite library instance, as a user's tool would be)
    drops the table under the open checkpoint."""
    drop = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('DROP TABLE items'); c.commit()"
    subprocess.run([sys.executable, "-c", drop, path], check=True)


def writer_failure_message(path: str) -> str:
    store = _backend.backend.open_sqlite(path, "full", 1, None)
    try:
        version = store.add_version("fp", "{}", None)
        drop_items_table(path)
        store.record(item_row(keys.input_key(1), pickle.dumps(1), version))
        return message_of(store.flush, WriterError)
    finally:
        with pytest.raises(WriterError):
            store.close()


def test_the_writer_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Commits in the writer thread, as a run does until they are large (the pure
    # backend's writer process is the next test).
    monkeypatch.setattr(_sqlite_writer, "PROCESS_MIN_ROWS", SHIPPED_PROCESS_MIN_ROWS)
    path = str(tmp_path / "run.db")
    assert writer_failure_message(path) == (
        f"the background writer failed to save results to {path}; nothing recorded after the "
        f"failure was saved: checkpoint {path}: no such table: items"
    )


def test_the_writer_process_failed(tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend != "python":
        pytest.skip("only the pure backend has a writer process")
    monkeypatch.setattr(_sqlite_writer, "PROCESS_MIN_ROWS", 1)
    monkeypatch.setattr(_sqlite_writer, "PROCESS_CONNECT_WAIT", 30.0)
    path = str(tmp_path / "run.db")
    assert writer_failure_message(path) == (
        f"the background writer failed to save results to {path}; nothing recorded after the "
        f"failure was saved: checkpoint {path}: no such table: items"
    )


# -- a forked child ----------------------------------------------------------------------
def in_fork(body: Callable[[], object]) -> str:
    """``str`` of the ForkedProcessError ``body`` raises in a forked child."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            body()
            os.write(write_end, b"nothing raised")
        except ForkedProcessError as exc:
            os.write(write_end, str(exc).encode())
        except BaseException as exc:
            os.write(write_end, f"{type(exc).__name__}: {exc}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + 30
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.005)
    with os.fdopen(read_end, "rb") as pipe:
        return pipe.read().decode()


def forked_message(path: str) -> str:
    return (
        f"checkpoint {path} was opened in process {os.getpid()}; a forked child cannot use it: "
        "create a new Snapper in the child, on a checkpoint of its own"
    )


@forks_with_threads
def test_a_forked_child_using_the_parents_snapper(kind: str, path: str) -> None:
    with snapper(kind, path) as parent:
        parent.start()
        assert in_fork(parent.load) == forked_message(path)


@forks_with_threads
def test_a_forked_child_using_the_rust_cores_checkpoint(tmp_path: Path, backend: str) -> None:
    if backend != "rust":
        pytest.skip("only the Rust core's store checks the process itself")
    path = str(tmp_path / "run.db")
    store = _backend.backend.open_sqlite(path, "full", 1, None)
    try:
        assert in_fork(store.versions) == forked_message(path)
    finally:
        store.close()
