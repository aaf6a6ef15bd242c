"""SQLite format 2 (issue 10): row checksums, the checks made before anything is written,
format-1 files, ``verify``, a pickle header cut short, the writer process's quiet exit.
Every test runs on both backends (the ``backend`` fixture)."""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest

import snapperable
from conftest import REPO, once
from snapperable import (
    CheckpointCorruptError,
    PickleSnapshotStorage,
    Snapper,
    SQLiteSnapshotStorage,
    verify,
)
from snapperable import _row_checksum, _sqlite_file

VERSION = "v1"
N = 120


def label(x: int) -> str:
    return f"item-{x:04d}"


def run(path: str, n: int = N, fn: Any = label) -> list[str]:
    with Snapper(range(n), fn, snapshot_storage=SQLiteSnapshotStorage[str](path), version=VERSION) as snapper:
        snapper.start()
        return snapper.load()


def companions_gone(path: str) -> bool:
    return not any(os.path.exists(path + suffix) and os.path.getsize(path + suffix) for suffix in ("-wal",))


@pytest.fixture
def checkpoint(tmp_path: Path) -> str:
    path = str(tmp_path / "run.db")
    assert run(path) == [label(x) for x in range(N)]
    return path


# -- the encoding both backends share --------------------------------------------------------
@once
def test_checksums_are_the_figures_the_rust_core_checks() -> None:
    # rust/store/row_checksum.rs asserts these same three values.
    plain = _row_checksum.row_checksum(bytes([7]) * 16, 3, 0, None, b"\x80\x04K\x02.", None, None, None, 1, 1.5, 2.25)
    assert plain.hex() == "3561633bae6c74eab2f2acb7"
    assert _row_checksum.plain_ok_checksum(bytes([7]) * 16, 3, 1.5, 2.25, b"\x80\x04K\x02.") == plain
    failed = _row_checksum.row_checksum(bytes([7]) * 16, 3, 1, b"in", None, "ValueError", "bad é", "Traceback", 3, 1.5, 2.25)
    assert failed.hex() == "99968d328def02d22a7e4c72"
    assert _row_checksum.version_checksum(1, "fp", "{}", 1, 0.5) == 2738404838
    # The writer's batch form: the same bytes, each row's fields then its checksum
    # (outputs of one length share a cached field head; a large one is not copied).
    rows = [
        (bytes([7]) * 16, 3, 1.5, 2.25, b"\x80\x04K\x02."),
        (bytes([8]) * 16, 4, 1.0, 3.0, b"\x80\x04K\x03."),
        (bytes([9]) * 16, 3, 2.5, 2.75, b"\x80\x04" + bytes(range(256)) * 8),
    ]
    values = _row_checksum.plain_ok_values(rows)
    assert [bytes(v) if isinstance(v, bytearray) else v for v in values[:6]] == [*rows[0], plain]
    assert [bytes(v) if isinstance(v, bytearray) else v for v in values] == [
        value for row in rows for value in (*row, _row_checksum.plain_ok_checksum(*row))
    ]


def test_both_backends_write_rows_that_check(checkpoint: str) -> None:
    conn = sqlite3.connect(checkpoint)
    rows = conn.execute(
        "SELECT key, version, status, input, output, error_type, error, traceback, attempts, started, ended,"
        " checksum FROM items"
    ).fetchall()
    versions = conn.execute("SELECT id, fingerprint, parts, uses, created, checksum FROM versions").fetchall()
    conn.close()
    assert len(rows) == N
    assert all(_row_checksum.row_checksum(*row[:11]) == row[11] for row in rows)
    assert versions and all(_row_checksum.version_checksum(*row[:5]) == row[5] for row in versions)


# -- damage inside values ------------------------------------------------------------------------
def flip_in_file(path: str, needle: bytes, change: bytes) -> None:
    data = Path(path).read_bytes()
    assert data.count(needle) >= 1, f"{needle!r} is not in the file"  # (stale copies too)
    Path(path).write_bytes(data.replace(needle, change))


def test_a_flipped_byte_in_an_output_is_corrupt_naming_the_row(checkpoint: str) -> None:
    flip_in_file(checkpoint, label(77).encode(), label(78).encode())  # the example
    before = Path(checkpoint).read_bytes()
    with pytest.raises(CheckpointCorruptError) as damaged:
        run(checkpoint)
    assert checkpoint in str(damaged.value) and "item row 78 " in str(damaged.value), damaged.value
    assert Path(checkpoint).read_bytes() == before, "a damaged file was written to"
    assert companions_gone(checkpoint)


def test_a_status_flipped_to_failed_is_corrupt_at_start(checkpoint: str) -> None:
    conn = sqlite3.connect(checkpoint)  # the bit a flip changes, without the checksum's knowing
    conn.execute("UPDATE items SET status = 1 WHERE seq = 40")
    conn.commit()
    conn.close()
    calls: list[int] = []

    def work(x: int) -> str:
        calls.append(x)
        return label(x)

    with pytest.raises(CheckpointCorruptError, match="item row 40 does not match its checksum"):
        run(checkpoint, fn=work)
    assert calls == [], "an item was redone"


# Which read meets a changed column first: the key scan at start() checks the head
# (key, version, status and the stored checksum), a load also the output, the metrics
# also the rest; verify checks all.
COVERAGE = [
    ("key", b"\x00" * 16, "start"), ("status", 1, "start"), ("checksum", b"\x00" * 12, "start"),
    ("output", pickle.dumps("other", protocol=4), "load"),
    ("input", b"x", "load_metrics"), ("error", "oops", "load_metrics"), ("attempts", 2, "load_metrics"),
    ("started", 0.5, "load_metrics"), ("ended", 0.5, "load_metrics"), ("traceback", "tb", "load_metrics"),
]


@pytest.mark.parametrize("column, value, read", COVERAGE)
def test_every_column_is_covered(checkpoint: str, column: str, value: object, read: str) -> None:
    conn = sqlite3.connect(checkpoint)
    conn.execute(f"UPDATE items SET {column} = ? WHERE seq = 9", (value,))
    conn.commit()
    conn.close()
    snapper = Snapper(range(N), label, snapshot_storage=SQLiteSnapshotStorage[str](checkpoint), version=VERSION)
    with pytest.raises(CheckpointCorruptError, match="item row 9 "):
        getattr(snapper, read)()
    result = verify(checkpoint)
    assert not result.ok and result.seq == 9, result


# Above the Rust core's SPLIT_SCAN_ROWS (100,000): its key scan and its load read the
# table in two halves at once (the second through a connection of its own).
LARGE = 150_000


def test_a_table_read_in_halves_loads_all_and_finds_damage_in_either_half(tmp_path: Path) -> None:
    path = str(tmp_path / "large.db")
    expected = [label(x) for x in range(LARGE)]
    assert run(path, LARGE) == expected
    assert run(path, LARGE) == expected  # resumed: the key scan and the load, both in halves
    snapper = Snapper(range(LARGE), label, snapshot_storage=SQLiteSnapshotStorage[str](path), version=VERSION)
    assert snapper.load_all() == expected
    for seq in (LARGE // 4, LARGE - 10):
        damaged = str(tmp_path / f"damaged-{seq}.db")
        shutil.copy(path, damaged)
        conn = sqlite3.connect(damaged)
        conn.execute("UPDATE items SET output = ? WHERE seq = ?", (pickle.dumps("other", protocol=4), seq))
        conn.commit()
        conn.close()
        reader = Snapper(range(LARGE), label, snapshot_storage=SQLiteSnapshotStorage[str](damaged), version=VERSION)
        with pytest.raises(CheckpointCorruptError, match=f"item row {seq} "):
            reader.load()


def test_a_damaged_function_version_is_corrupt(checkpoint: str) -> None:
    conn = sqlite3.connect(checkpoint)
    conn.execute("UPDATE versions SET fingerprint = 'x' || fingerprint")
    conn.commit()
    conn.close()
    with pytest.raises(CheckpointCorruptError, match="function version 1 does not match its checksum"):
        run(checkpoint)


# -- what is checked before anything is written -------------------------------------------------
def assert_refused_untouched(path: str, match: str) -> None:
    before = Path(path).read_bytes()
    with pytest.raises(CheckpointCorruptError, match=match) as refused:
        run(path)
    assert path in str(refused.value)
    assert Path(path).read_bytes() == before, "a damaged file was written to"
    assert companions_gone(path), "a write-ahead log was left beside it"


def test_a_file_cut_short_is_refused_before_sqlite_extends_it(checkpoint: str) -> None:
    data = Path(checkpoint).read_bytes()
    page_size = struct.unpack(">H", data[16:18])[0]
    assert len(data) >= 3 * page_size
    Path(checkpoint).write_bytes(data[: len(data) - page_size])  # a whole page off the end
    assert_refused_untouched(checkpoint, "is cut short")
    Path(checkpoint).write_bytes(data[:50])  # not even a header: not a database at all
    assert_refused_untouched(checkpoint, "is cut short|is not a snapperable checkpoint")


@pytest.mark.parametrize("damage, match", [
    ("ALTER TABLE items RENAME COLUMN output TO outpux", "its schema is not format 2"),  # not "no such column"
    ("UPDATE meta SET value = '3' WHERE name = 'format_version'", "its meta table does not say"),
])
def test_a_damaged_schema_or_meta_is_corrupt(checkpoint: str, damage: str, match: str) -> None:
    conn = sqlite3.connect(checkpoint)
    conn.execute(damage)
    conn.commit()
    conn.close()
    assert_refused_untouched(checkpoint, match)


def test_a_damaged_file_left_with_a_write_ahead_log_is_not_written_to(tmp_path: Path, backend_env: dict[str, str]) -> None:
    # A run killed with its log not yet written back: then the schema is damaged. The
    # checks read through a connection that cannot write the log back into the file.
    path = str(tmp_path / "run.db")
    run(path)
    code = (
        "import os, sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "conn.execute('PRAGMA wal_autocheckpoint=0')\n"
        "conn.execute(\"INSERT INTO meta VALUES ('note', 'in the log only')\")\n"
        "os._exit(0)\n"  # no close: the log stays
    )
    subprocess.run([sys.executable, "-c", code, path], check=True, env=backend_env)
    assert os.path.getsize(path + "-wal") > 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    assert conn.execute("SELECT count(*) FROM meta").fetchone()[0] == 3
    conn.close()
    conn = sqlite3.connect(path)  # damage the file itself (not the log)
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.close()
    data = bytearray(Path(path).read_bytes())
    at = data.find(b"CREATE TABLE items")
    data[at + 7 : at + 12] = b"TABLX"
    Path(path).write_bytes(bytes(data))
    wal_before = Path(path + "-wal").read_bytes()
    with pytest.raises(CheckpointCorruptError):
        run(path)
    assert Path(path).read_bytes() == bytes(data), "the log was written back into a damaged file"
    assert Path(path + "-wal").read_bytes() == wal_before


# -- format 1 -----------------------------------------------------------------------------------
def format_1_schema() -> str:
    lines = [line for line in _sqlite_file.schema_sql().splitlines() if "checksum" not in line]
    text = "\n".join(lines).replace("PRAGMA user_version = 2;", "PRAGMA user_version = 1;")
    return text.replace("ended REAL NOT NULL,\n", "ended REAL NOT NULL\n").replace(
        "created REAL NOT NULL,\n", "created REAL NOT NULL\n"
    )


def make_format_1(path: str, n: int) -> None:
    """A checkpoint as the previous release wrote it (format 1, no checksums)."""
    model = path + ".model.db"  # the version record a run of VERSION writes
    run(model, 0)
    conn = sqlite3.connect(model)
    fingerprint, parts = conn.execute("SELECT fingerprint, parts FROM versions").fetchone()
    conn.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(format_1_schema())
    conn.execute("INSERT INTO meta VALUES ('format_version', '1'), ('created_by', 'snapperable 0.0.9')")
    conn.execute(
        "INSERT INTO versions (fingerprint, parts, uses, created) VALUES (?, ?, 1, 0.0)", (fingerprint, parts)
    )
    from snapperable.keys import input_key

    conn.executemany(
        "INSERT INTO items (key, version, status, output, attempts, started, ended) VALUES (?, 1, 0, ?, 1, 0, 0)",
        [(input_key(x), pickle.dumps(label(x), protocol=4)) for x in range(n)],
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()


def test_a_format_1_file_keeps_working_and_stays_format_1(tmp_path: Path) -> None:
    path = str(tmp_path / "old.db")
    make_format_1(path, 50)
    calls: list[int] = []

    def work(x: int) -> str:
        calls.append(x)
        return label(x)

    assert run(path, 80, work) == [label(x) for x in range(80)]
    assert calls == list(range(50, 80))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert "checksum" not in {row[1] for row in conn.execute("PRAGMA table_info(items)")}
    assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == 80
    conn.close()
    result = verify(path)
    assert result.ok and result.format_version == 1 and not result.checksummed and result.rows == 80, result


def test_new_files_are_format_2(checkpoint: str) -> None:
    conn = sqlite3.connect(checkpoint)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    conn.close()


# -- verify -------------------------------------------------------------------------------------
def test_verify_reports_a_good_checkpoint_and_the_first_damage(checkpoint: str, tmp_path: Path) -> None:
    good = verify(checkpoint)
    assert good.ok and good.kind == "sqlite" and good.rows == N and good.versions == 1 and good.checksummed
    before = Path(checkpoint).read_bytes()
    flip_in_file(checkpoint, label(30).encode(), label(31).encode())
    damaged = verify(checkpoint)
    assert not damaged.ok and damaged.seq == 31 and checkpoint in (damaged.problem or ""), damaged
    assert Path(checkpoint).read_bytes() != before
    assert not os.path.exists(checkpoint + "-wal"), "verify left a write-ahead log"

    pickled = str(tmp_path / "run.pkl")
    with Snapper(range(10), label, snapshot_storage=PickleSnapshotStorage[str](pickled)) as snapper:
        snapper.start()
    assert verify(pickled).ok and verify(pickled).rows == 10
    data = Path(pickled).read_bytes()
    Path(pickled).write_bytes(data + b"F\x01")  # a torn tail: not damage
    torn = verify(pickled)
    assert torn.ok and torn.torn_tail == 2, torn
    at = data.index(label(3).encode())
    Path(pickled).write_bytes(data[:at] + b"X" + data[at + 1 :])
    assert not verify(pickled).ok or verify(pickled).torn_tail > 0

    empty = str(tmp_path / "empty.db")
    Path(empty).write_bytes(b"")
    assert verify(empty).ok and verify(empty).kind == "empty"
    other = str(tmp_path / "notes.txt")
    Path(other).write_bytes(b"not a checkpoint\n")
    assert not verify(other).ok and verify(other).kind == "unknown"


def test_verify_refuses_a_file_a_run_holds(checkpoint: str) -> None:
    with Snapper(range(N), label, snapshot_storage=SQLiteSnapshotStorage[str](checkpoint), version=VERSION) as snapper:
        snapper.start()
        with pytest.raises(snapperable.CheckpointLockedError):
            verify(checkpoint)


# -- the pickle header, the writer process -------------------------------------------------------
@pytest.mark.parametrize("length", [1, 4, 6, 15])
def test_a_pickle_header_cut_short_is_corrupt(tmp_path: Path, length: int) -> None:
    path = str(tmp_path / "run.pkl")
    with Snapper(range(5), label, snapshot_storage=PickleSnapshotStorage[str](path)) as snapper:
        snapper.start()
    Path(path).write_bytes(Path(path).read_bytes()[:length])
    with pytest.raises(CheckpointCorruptError, match="cut short"):
        with Snapper(range(5), label, snapshot_storage=PickleSnapshotStorage[str](path)) as snapper:
            snapper.start()
    assert len(Path(path).read_bytes()) == length


@once
def test_the_writer_process_exits_quietly_when_its_parent_is_gone(tmp_path: Path) -> None:
    path = str(tmp_path / "run.db")
    run(path, 3)
    parent_end, child_end = socket.socketpair()
    code = "import sys; sys.path.insert(0, sys.argv[1]); from snapperable._sqlite_writer import serve; serve(*sys.argv[2:])"
    child = subprocess.Popen(
        [sys.executable, "-I", "-c", code, str(REPO / "python"), path, "normal",
         f"{os.stat(path).st_dev}:{os.stat(path).st_ino}", "1"],
        stdin=child_end.fileno(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    child_end.close()
    assert child.stdout is not None and child.stdout.read(1) == b"R"
    child.stdout.close()  # the parent's end of the answers is gone, as when it dies
    import marshal

    frame = marshal.dumps([(b"k" * 16, 1, 0.0, 1.0, pickle.dumps("late", protocol=4))])
    parent_end.sendall(struct.pack("<Q", len(frame)) + frame)  # its answer goes nowhere
    parent_end.close()
    _, stderr = child.communicate(timeout=30)
    assert child.returncode == 0 and stderr == b"", stderr.decode(errors="replace")
