"""Every behaviour test runs once per available backend (DESIGN 8).

The ``backend`` fixture is autouse: it swaps ``snapperable._backend.backend`` for the
module under test, which is where the library looks its backend up at call time.
``SNAPPERABLE_BACKEND`` narrows the set: ``python`` runs the fallback alone (as a user
without the extension gets), ``rust`` the core alone; unset, both run when the
extension is built. Tests that start child processes pass ``backend_env`` on, so the
child uses the same backend.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Optional

import pytest

from crash_child import force_writer_process, writer_process_forced
from snapperable import PickleSnapshotStorage, SnapshotStorage, SQLiteSnapshotStorage, _backend, _pure

REPO = Path(__file__).resolve().parent.parent


def _available() -> dict[str, ModuleType]:
    choice = os.environ.get("SNAPPERABLE_BACKEND", "auto")
    found: dict[str, ModuleType] = {}
    if choice in ("auto", "rust"):
        try:
            from snapperable import _core
        except ImportError:
            if choice == "rust":
                raise
        else:
            found["rust"] = _core
    if choice in ("auto", "python"):
        found["python"] = _pure
    return found


BACKENDS = _available()

# For a test that does not depend on the backend (a static check, or one that starts
# child processes choosing their own): run it once, with whichever backend is here.
once = pytest.mark.parametrize("backend", sorted(BACKENDS)[:1], indirect=True)

# For a test that forks while threads run on purpose (what a fork does to a Snapper, its
# writer or its lock is what it tests): Python 3.12+ warns about every such fork.
forks_with_threads = pytest.mark.filterwarnings(
    r"ignore:This process \(pid=\d+\) is multi-threaded, use of fork\(\) may lead to deadlocks"
    r":DeprecationWarning"
)


@pytest.fixture(params=sorted(BACKENDS), autouse=True)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name: str = request.param
    monkeypatch.setattr(_backend, "backend", BACKENDS[name])
    yield name


if writer_process_forced():
    force_writer_process()


@pytest.fixture
def backend_env(backend: str) -> dict[str, str]:
    """Environment for a child process: same backend, this checkout's package."""
    env = dict(os.environ)
    env["SNAPPERABLE_BACKEND"] = backend
    return env


STORAGES: dict[str, Callable[[Path], SnapshotStorage[Any]]] = {
    "sqlite": lambda d: SQLiteSnapshotStorage(str(d / "run.db")),
    "pickle": lambda d: PickleSnapshotStorage(str(d / "run.pkl")),
}


@pytest.fixture(params=sorted(STORAGES))
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> SnapshotStorage[Any]:
    """A fresh checkpoint in ``tmp_path``, once per storage kind."""
    return STORAGES[request.param](tmp_path)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test with ``tmp_path`` as the working directory (for default paths)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


PYTHON = sys.executable


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, proc: Optional["subprocess.Popen[bytes]"] = None) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` s or if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"child exited ({proc.returncode}) before {what}: {err.decode(errors='replace')}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def import_file(path: Path, name: str) -> ModuleType:
    """Import the source file ``path`` as module ``name``, replacing any module of that name
    in sys.modules (as a new run of a script would; inspect finds classes' source there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
