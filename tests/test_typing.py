"""The public API is precisely typed for users' mypy --strict runs."""

from __future__ import annotations

from pathlib import Path

from mypy import api

from conftest import once

USER_CODE = '''
from snapperable import Snapper, SQLiteSnapshotStorage, PickleSnapshotStorage, FailedItem

def parse(line: str) -> dict[str, int]:
    return {"n": len(line)}

reveal_type(Snapper(range(3), str).load())
reveal_type(Snapper(["a"], parse, snapshot_storage=SQLiteSnapshotStorage[dict[str, int]]("x.db")).load_all())
reveal_type(Snapper(["a"], parse).failed_items)
storage: PickleSnapshotStorage[int] = PickleSnapshotStorage("x.pkl")
Snapper(["a"], parse, snapshot_storage=storage)
'''


@once  # a static check
def test_reveal_types_for_users(tmp_path: Path) -> None:
    source = tmp_path / "user_code.py"
    source.write_text(USER_CODE)
    stdout, _, _ = api.run(["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(source)])
    lines = stdout.replace("builtins.", "").splitlines()  # older mypy spells out builtins.
    assert 'Revealed type is "list[str]"' in lines[0]
    assert 'Revealed type is "list[dict[str, int]]"' in lines[1]
    assert 'Revealed type is "list[snapperable.metrics.FailedItem[str]]"' in lines[2]
    # a storage typed for int outputs does not fit a function returning dicts
    assert 'Argument 2 to "Snapper" has incompatible type' in lines[3], stdout


VERSION_CODE = '''
import enum
from snapperable import Snapper, VersionValue

class Size(enum.Enum):
    LARGE = 1

class Llm:
    model_name: str = "gpt-4o"

def parse(line: str) -> int:
    return len(line)

llm = Llm()
Snapper(["a"], parse, version="v2")
Snapper(["a"], parse, version=("v2", llm.model_name, 0.5, None, Size.LARGE))
Snapper(["a"], parse, version=frozenset({"a", "b"}))
pinned: VersionValue = ("v3", (1, 2))
Snapper(["a"], parse, version=pinned)
Snapper(["a"], parse, version=["v2"])
'''


@once  # a static check
def test_version_takes_constants_for_users(tmp_path: Path) -> None:
    source = tmp_path / "user_code.py"
    source.write_text(VERSION_CODE)
    stdout, _, _ = api.run(["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(source)])
    errors = [line for line in stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, stdout  # the list, on the last line
    # Snapper's __init__ is overloaded (a plain fn, an async def fn): mypy then names no
    # argument of a call that fits neither, but lists the variants, version= in them.
    assert "user_code.py:20:" in errors[0], stdout
    assert '"version"' in errors[0] or ("[call-overload]" in errors[0] and "version: bool | int" in stdout), stdout
