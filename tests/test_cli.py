"""The ``snapperable`` command: every command on real files of both backends and both
formats, a live run in another process, damaged and foreign files; export round-trips
and ``compact``. Most run ``cli.main`` in this process (under the backend fixture);
those marked so run ``python -m snapperable`` as a real subprocess."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import snapperable
from snapperable import PickleSnapshotStorage, Snapper, SQLiteSnapshotStorage, cli, export, open_checkpoint
from snapperable.storage.base import SnapshotStorage
from test_reader import Flaky, build, live_writer, v1

__all__ = ["live_writer"]  # a fixture of test_reader's, used here too

TESTS = Path(__file__).resolve().parent
PACKAGE_ROOT = Path(snapperable.__file__).resolve().parent.parent


@pytest.fixture
def made(storage: SnapshotStorage[Any]) -> SnapshotStorage[Any]:
    build(storage)
    return storage


def run(*argv: str) -> tuple[int, str, str]:
    """``snapperable ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    saved, sys.stderr = sys.stderr, err
    try:
        code = cli.main(list(argv), out=out)
    finally:
        sys.stderr = saved
    return code, out.getvalue(), err.getvalue()


def child_env(backend: str) -> dict[str, str]:
    env = dict(os.environ)
    env["SNAPPERABLE_BACKEND"] = backend
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), str(TESTS)])
    return env


def run_module(backend: str, *argv: str) -> "subprocess.CompletedProcess[str]":
    """``python -m snapperable ARGV`` as a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "snapperable", *argv],
        capture_output=True, text=True, env=child_env(backend), timeout=120,
    )


# -- info, failures, report --------------------------------------------------------------
def test_info_summarises_the_file(made: SnapshotStorage[Any], backend: str) -> None:
    done = run_module(backend, "info", made.path)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    kind = "sqlite" if isinstance(made, SQLiteSnapshotStorage) else "pickle"
    assert f"checkpoint: {made.path}" in text
    assert f"format:     {kind} {2 if kind == 'sqlite' else 1}" in text
    assert "held by:    nobody" in text
    assert "version 'v1' -> 'v2'" in text
    assert "1: 30 items (29 ok, 1 failed), 34 rows (4 superseded)" in text
    assert "2: 10 items (10 ok, 0 failed), 10 rows (0 superseded)" in text


def test_failures_filters_limits_and_tracebacks(storage: SnapshotStorage[Any]) -> None:
    def picky(x: int) -> int:
        if x % 5 == 0:
            raise KeyError(x)
        if x % 7 == 0:
            raise ValueError(f"seven {x}")
        return x

    with Snapper(range(1, 36), picky, snapshot_storage=storage, skip_item_errors=True) as s:
        s.start()
    code, out, _ = run("failures", storage.path)
    assert code == 0
    assert out.index("builtins.KeyError: 7 items") < out.index("builtins.ValueError: 4 items")
    code, out, _ = run("failures", storage.path, "--type", "ValueError", "--limit", "2", "--traceback")
    assert code == 0
    assert "KeyError" not in out and "builtins.ValueError: 4 items" in out
    assert "7: seven 7" in out and "14: seven 14" in out and "21:" not in out
    assert "... 2 more" in out and "Traceback (most recent call last)" in out
    code, out, _ = run("failures", storage.path, "--type", "OSError")
    assert (code, out) == (0, "no failed items of type OSError\n")


def test_report_markdown_and_json_for_a_version(made: SnapshotStorage[Any]) -> None:
    code, out, _ = run("report", made.path, "--format", "json", "--version", "1")
    assert code == 0
    with v1(made) as s:
        expected = json.loads(s.generate_report("json"), object_hook=without_position)
    # The Snapper's, but for positions in its iterable, which the file does not know.
    assert json.loads(out, object_hook=without_position) == expected
    assert all(item["position"] is None for item in json.loads(out)["failed_items"])
    assert json.loads(out)["failed_count"] == 1
    code, out, _ = run("report", made.path)
    assert code == 0 and out.startswith("#") and "items: 10" in out
    code, _, err = run("report", made.path, "--version", "7")
    assert code == cli.EXIT_USAGE and "no version 7" in err


def without_position(named: dict[str, Any]) -> dict[str, Any]:
    named.pop("position", None)
    return named


# -- export ------------------------------------------------------------------------------
class Point:
    """An output JSON cannot hold: exported as its repr."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __repr__(self) -> str:
        return f"Point({self.x})"


def odd_output(x: int) -> Any:
    return [{"n": x}, (x, x), {x, -x}, Point(x), float("nan"), None, "text", {1: "int key"}][x % 8]


@pytest.fixture
def odd(storage: SnapshotStorage[Any]) -> SnapshotStorage[Any]:
    with Snapper(range(16), odd_output, snapshot_storage=storage, store_inputs=True) as s:
        s.start()
    return storage


def expected_cells(x: int) -> tuple[Any, bool]:
    value = odd_output(x)
    if x % 8 in (0, 5, 6):
        return value, False
    return repr(value), True


def test_export_jsonl_round_trip(odd: SnapshotStorage[Any], tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    code, _, err = run("export", odd.path, "--format", "jsonl", "-o", str(target))
    assert code == 0 and "16 items written" in err
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["input"] for r in records] == list(range(16))
    for record in records:
        assert (record["output"], record["output_repr"]) == expected_cells(record["input"])
        assert record["status"] == "ok" and record["input_stored"] and not record["input_repr"]
        assert len(record["key"]) == 32 and record["ended"] >= record["started"]
    assert set(records[0]) == set(export.FIELDS)


def test_export_csv_round_trip(made: SnapshotStorage[Any], tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    code, _, _ = run("export", made.path, "--format", "csv", "--version", "1", "-o", str(target))
    assert code == 0
    with open(target, newline="") as file:
        rows = list(csv.DictReader(file))
    with open_checkpoint(made.path) as reader:
        items = list(reader.items(1))
    assert [row["key"] for row in rows] == [item.key_hex for item in items]
    assert [json.loads(row["input"]) for row in rows] == list(range(30))
    ok = [row for row in rows if row["status"] == "ok"]
    assert [json.loads(row["output"]) for row in ok] == v1(made).load_all()
    (failed,) = [row for row in rows if row["status"] == "failed"]
    assert failed["output"] == "" and failed["error"] == "item 7 is bad"
    assert failed["error_type"] == "builtins.ValueError" and failed["attempts"] == "1"
    assert [float(row["started"]) for row in rows] == [item.started for item in items]


def test_export_all_versions_to_stdout(made: SnapshotStorage[Any]) -> None:
    code, out, _ = run("export", made.path, "--format", "jsonl", "--all-versions")
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["version"] for r in records] == [1] * 30 + [2] * 10
    assert [r["output"] for r in records[30:]] == [3 * x for x in range(10)]
    assert not any(r["input_stored"] for r in records[30:])  # v2 ran without store_inputs


def test_export_parquet_round_trip(odd: SnapshotStorage[Any], tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    target = tmp_path / "out.parquet"
    code, _, err = run("export", odd.path, "--format", "parquet", "-o", str(target))
    assert code == 0, err
    table = pq.read_table(target).to_pylist()
    assert [json.loads(row["input"]) for row in table] == list(range(16))
    for row in table:
        x = json.loads(row["input"])
        value, is_repr = expected_cells(x)
        assert row["output_repr"] is is_repr
        assert (row["output"] if is_repr else json.loads(row["output"])) == value
    with open_checkpoint(odd.path) as reader:
        assert [row["key"] for row in table] == [item.key_hex for item in reader.items()]


def test_export_parquet_without_pyarrow_says_what_to_install(odd: SnapshotStorage[Any], tmp_path: Path, backend: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "pyarrow.py").write_text("raise ImportError('pyarrow is not installed (test)')\n")
    env = child_env(backend)
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), env["PYTHONPATH"]])
    done = subprocess.run(
        [sys.executable, "-m", "snapperable", "export", odd.path, "--format", "parquet", "-o", str(tmp_path / "x.parquet")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == cli.EXIT_MISSING_EXTRA
    assert done.stderr == "snapperable: Parquet export needs pyarrow: pip install 'snapperable[parquet]'\n"
    assert not (tmp_path / "x.parquet").exists()


def test_export_of_an_output_whose_class_is_gone(storage: SnapshotStorage[Any], backend: str, tmp_path: Path) -> None:
    """The CLI's process cannot import the class (it lives in this test module, which
    the child does not have on its path): the output is a flagged note, not a crash."""
    with Snapper(range(2), Point, snapshot_storage=storage) as s:
        s.start()
    env = child_env(backend)
    env["PYTHONPATH"] = str(PACKAGE_ROOT)  # not tests/: `test_cli` cannot be imported
    done = subprocess.run(
        [sys.executable, "-m", "snapperable", "export", storage.path, "--format", "jsonl"],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert all(r["output_repr"] and r["output"].startswith("<cannot unpickle: ModuleNotFoundError") for r in records)


# -- check -------------------------------------------------------------------------------
def test_check_sound_files(made: SnapshotStorage[Any], backend: str) -> None:
    content = Path(made.path).read_bytes()
    done = run_module(backend, "check", made.path)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{made.path}: sound\n", "")
    assert Path(made.path).read_bytes() == content


def test_check_damaged_sqlite_page(tmp_path: Path, backend: str) -> None:
    storage = SQLiteSnapshotStorage[str](str(tmp_path / "run.db"))
    with Snapper(range(400), lambda x: f"value {x} " * 20, snapshot_storage=storage) as s:
        s.start()
    data = bytearray(Path(storage.path).read_bytes())
    page = 4096
    assert len(data) > 8 * page
    data[3 * page + 8 : 3 * page + 40] = b"\xff" * 32  # a b-tree page header and cells
    Path(storage.path).write_bytes(bytes(data))
    damaged = bytes(data)
    done = run_module(backend, "check", storage.path)
    assert done.returncode == cli.EXIT_DAMAGED, done
    assert done.stderr.startswith("damaged: ") and storage.path in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert Path(storage.path).read_bytes() == damaged


def test_check_flipped_pickle_frame(tmp_path: Path) -> None:
    storage = PickleSnapshotStorage[int](str(tmp_path / "run.pkl"))
    for n in (5, 10):
        with Snapper(range(n), lambda x: x, snapshot_storage=storage) as s:
            s.start()
    data = bytearray(Path(storage.path).read_bytes())
    data[40] ^= 0x01
    Path(storage.path).write_bytes(bytes(data))
    code, _, err = run("check", storage.path)
    assert code == cli.EXIT_DAMAGED
    assert "checksum mismatch in the frame at offset 16" in err or "damaged frame header" in err


@pytest.mark.parametrize("kind", ["missing", "directory", "text", "foreign-sqlite", "empty"])
def test_errors_are_one_line_naming_the_file(tmp_path: Path, kind: str, backend: str) -> None:
    path = tmp_path / "thing.db"
    if kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign-sqlite":
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE t (x)")
        conn.close()
    expected = cli.EXIT_UNREADABLE if kind in ("missing", "directory") else cli.EXIT_DAMAGED
    for command in (["info"], ["check"], ["report"], ["failures"], ["export", "--format", "jsonl"]):
        code, out, err = run(*command[:1], str(path), *command[1:])
        assert code == expected, (command, err)
        assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err, err
    done = run_module(backend, "info", str(path))
    assert done.returncode == expected and done.stderr.count("\n") == 1 and str(path) in done.stderr
    assert not Path(str(path) + ".lock").exists()


def test_a_newer_format_is_named_not_read(made: SnapshotStorage[Any], backend: str) -> None:
    data = bytearray(Path(made.path).read_bytes())
    if isinstance(made, SQLiteSnapshotStorage):
        data[60:64] = (99).to_bytes(4, "big")  # the header's user_version: the format
    else:
        data[8:12] = (99).to_bytes(4, "little")
    Path(made.path).write_bytes(bytes(data))
    done = run_module(backend, "info", made.path)
    assert done.returncode == cli.EXIT_DAMAGED
    assert "99" in done.stderr and "newer than this snapperable" in done.stderr
    assert made.path in done.stderr and done.stderr.count("\n") == 1
    assert Path(made.path).read_bytes() == bytes(data)


def test_export_to_a_missing_directory_is_one_line(made: SnapshotStorage[Any], tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "out.csv"
    code, _, err = run("export", made.path, "--format", "csv", "-o", str(target))
    assert code == cli.EXIT_UNREADABLE
    assert err == f"snapperable: {target}: cannot write it: No such file or directory\n"


def test_every_command_has_help(backend: str) -> None:
    done = run_module(backend, "--help")
    assert done.returncode == 0 and "exit codes" in done.stdout
    for command in ("info", "failures", "report", "export", "check", "compact"):
        done = run_module(backend, command, "--help")
        assert done.returncode == 0 and f"snapperable {command}" in done.stdout, done.stderr
    assert run_module(backend, "export", "x").returncode == cli.EXIT_USAGE  # --format is required


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "snapperable"
    if not script.exists():
        pytest.skip("the console script is not installed in this environment")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "compact" in done.stdout


# -- a live run in another process ---------------------------------------------------------
def test_commands_while_another_process_runs(storage: SnapshotStorage[Any], live_writer: "subprocess.Popen[bytes]", backend: str, tmp_path: Path) -> None:
    done = run_module(backend, "info", storage.path)
    assert done.returncode == 0, done.stderr
    assert f"held by:    process {live_writer.pid}" in done.stdout
    done = run_module(backend, "export", storage.path, "--format", "jsonl")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["output"] for r in records] == [3 * r["input"] for r in records]
    assert [r["input"] for r in records] == list(range(len(records))) and len(records) <= 200
    assert run_module(backend, "check", storage.path).returncode == 0
    done = run_module(backend, "compact", storage.path, "-o", str(tmp_path / "c"))
    assert done.returncode == cli.EXIT_HELD
    assert str(live_writer.pid) in done.stderr and done.stderr.count("\n") == 1
    assert not (tmp_path / "c").exists()
    done = run_module(backend, "compact", storage.path, "--in-place")
    assert done.returncode == cli.EXIT_HELD


# -- compact -------------------------------------------------------------------------------
def loads_of(storage: SnapshotStorage[Any]) -> dict[str, Any]:
    """What a Snapper reads of each version of ``build``'s checkpoint."""
    result: dict[str, Any] = {}
    for version, fn, items in (("v1", Flaky(set()), range(30)), ("v2", lambda x: 3 * x, range(10))):
        with Snapper(list(items), fn, snapshot_storage=storage, version=version) as s:
            result[version] = (s.load(), s.load_all(), [(m.key, m.success, m.attempts) for m in s.load_metrics()])
    return result


def test_compact_to_a_new_file_keeps_every_load(made: SnapshotStorage[Any], tmp_path: Path) -> None:
    before = loads_of(made)
    original = Path(made.path).read_bytes()
    target = tmp_path / ("compact" + Path(made.path).suffix)
    code, out, err = run("compact", made.path, "-o", str(target))
    assert code == 0, err
    assert "40 rows kept of 44" in out
    assert Path(made.path).read_bytes() == original
    compacted: SnapshotStorage[Any] = (
        SQLiteSnapshotStorage(str(target)) if isinstance(made, SQLiteSnapshotStorage) else PickleSnapshotStorage(str(target))
    )
    # v2 is the version used last: loads of v1 first would log a return to it.
    assert loads_of(compacted) == before
    with open_checkpoint(target) as reader:
        assert [c.superseded for c in reader.counts()] == [0, 0]
        assert [v.changes for v in reader.versions()] == [[], ["version 'v1' -> 'v2'"]]
    assert run("compact", made.path, "-o", str(target))[0] == cli.EXIT_UNREADABLE  # exists


def test_compact_in_place(made: SnapshotStorage[Any]) -> None:
    before = loads_of(made)
    code, out, err = run("compact", made.path, "--in-place")
    assert code == 0, err
    assert loads_of(made) == before
    with open_checkpoint(made.path) as reader:
        assert sum(c.rows for c in reader.counts()) == 40
        assert reader.check() is None
    leftovers = sorted(p.name for p in Path(made.path).parent.iterdir() if ".compact-" in p.name)
    assert leftovers == []
    with Snapper(range(40), Flaky(set()), snapshot_storage=made, version="v1", retry_failed_items=True) as s:
        s.start()  # the compacted file takes new work
        assert len(s.load()) == 40


def test_compact_needs_one_target(made: SnapshotStorage[Any]) -> None:
    assert run("compact", made.path)[0] == cli.EXIT_USAGE
    assert run("compact", made.path, "-o", "x", "--in-place")[0] == cli.EXIT_USAGE


def test_compact_refused_while_held_here_and_failing_leaves_the_original(made: SnapshotStorage[Any], tmp_path: Path) -> None:
    with Snapper(range(3), Flaky(set()), snapshot_storage=made, version="v2") as s:
        s.start()  # holds the file from here to the end of the block
        code, _, err = run("compact", made.path, "--in-place")
        assert code == cli.EXIT_HELD and "held" in err
    original = Path(made.path).read_bytes()
    code, _, err = run("compact", made.path, "-o", str(tmp_path / "no" / "dir" / "out"))
    assert code == cli.EXIT_UNREADABLE and err.count("\n") == 1, err
    assert Path(made.path).read_bytes() == original
    assert not (tmp_path / "no").exists()


def test_move_sets_a_checkpoint_aside_with_its_files_and_refuses_while_held(
    made: SnapshotStorage[Any], tmp_path: Path
) -> None:
    before = loads_of(made)
    # A name that says nothing of the format: the command tells it from the bytes.
    target = tmp_path / "aside" / "old-run"
    target.parent.mkdir()
    with Snapper(range(3), Flaky(set()), snapshot_storage=made, version="v2") as s:
        s.start()  # holds the file to the end of the block
        code, _, err = run("move", made.path, str(target))
        assert code == cli.EXIT_HELD and "held" in err and err.count("\n") == 1, err
    assert not target.exists()
    code, out, err = run("move", made.path, str(target))
    assert code == 0, err
    assert out == f"{made.path} moved to {target}\n"
    assert not Path(made.path).exists() and not Path(made.path + ".lock").exists()
    assert not Path(made.path + "-wal").exists()
    moved: SnapshotStorage[Any] = (
        SQLiteSnapshotStorage(str(target)) if isinstance(made, SQLiteSnapshotStorage) else PickleSnapshotStorage(str(target))
    )
    assert loads_of(moved) == before
    code, _, err = run("move", str(target), str(target))
    assert code == cli.EXIT_UNREADABLE and "exists" in err
    code, _, err = run("move", made.path, str(tmp_path / "x"))
    assert code == cli.EXIT_UNREADABLE and made.path in err


def test_a_file_made_by_one_backend_is_read_by_the_other(made: SnapshotStorage[Any], backend: str) -> None:
    from conftest import BACKENDS

    others = [name for name in BACKENDS if name != backend]
    if not others:
        pytest.skip("one backend here")
    mine = run_module(backend, "export", made.path, "--format", "jsonl", "--all-versions")
    theirs = run_module(others[0], "export", made.path, "--format", "jsonl", "--all-versions")
    assert mine.returncode == theirs.returncode == 0, (mine.stderr, theirs.stderr)
    assert mine.stdout == theirs.stdout and len(mine.stdout.splitlines()) == 40
    assert run_module(others[0], "check", made.path).returncode == 0


def test_check_finds_a_flipped_byte_inside_a_stored_value(tmp_path: Path, backend: str) -> None:
    """SQLite checksums nothing; the rows' own checksums (format 2) find it."""
    storage = SQLiteSnapshotStorage[str](str(tmp_path / "run.db"))
    with Snapper(range(50), lambda x: f"marker-{x:04d}", snapshot_storage=storage) as s:
        s.start()
    data = Path(storage.path).read_bytes()
    assert b"marker-0042" in data
    # Every copy (a page split leaves stale ones in free space): the live cell among them.
    Path(storage.path).write_bytes(data.replace(b"marker-0042", b"marker-0043"))
    done = run_module(backend, "check", storage.path)
    assert done.returncode == cli.EXIT_DAMAGED, done
    assert "item row 43" in done.stderr and storage.path in done.stderr, done.stderr
