"""Every behaviour test runs once per available backend (docs/architecture.md 3).

The ``backend`` fixture is autouse: it swaps ``snapperable._backend.backend`` for the
module under test, which is where the library looks its backend up at call time.
``SNAPPERABLE_BACKEND`` narrows the set: ``python`` runs the fallback alone (as a user
without the extension gets), ``rust`` the core alone; unset, both run when the
extension is built. (Narrowed, the differential module skips, and with ``python`` the
Rust-only one too.) Tests that start child processes pass ``backend_env`` on, so the
child uses the same backend.

The tests are grouped by what they check: behaviour through ``Snapper`` (most modules),
the backend contract on an open store (``test_store_contract.py``, over the ``store``
and ``open_store`` fixtures below), the two backends against each other
(``test_differential.py``) and the Rust core alone (``test_rust_core.py``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Optional, Protocol

import pytest

from crash_child import force_writer_process, writer_process_forced
from snapperable import PickleSnapshotStorage, SnapshotStorage, SQLiteSnapshotStorage, _backend, _pure
from snapperable._contract import Backend, CheckpointStore, Synchronous
from snapperable.errors import WriterError

REPO = Path(__file__).resolve().parent.parent


def _importable() -> dict[str, Backend]:
    """Every backend this installation has, whatever ``SNAPPERABLE_BACKEND`` says."""
    found: dict[str, Backend] = {"python": _pure}
    try:
        from snapperable import _core
    except ImportError:
        if os.environ.get("SNAPPERABLE_BACKEND") == "rust":
            raise
    else:
        found["rust"] = _core
    return found


# open_store(with_=...) opens any of these; the tests run on BACKENDS.
INSTALLED_BACKENDS = _importable()


def _chosen() -> dict[str, Backend]:
    choice = os.environ.get("SNAPPERABLE_BACKEND", "auto")
    return {name: module for name, module in INSTALLED_BACKENDS.items() if choice in ("auto", name)}


BACKENDS = _chosen()


def skip_module_unless_backends(*names: str) -> None:
    """Skip the calling test module unless every backend ``names`` is chosen: the
    differential and Rust-only modules test nothing of a run narrowed to one backend
    (``SNAPPERABLE_BACKEND=python`` is the fallback alone, as a user without the
    extension gets it)."""
    missing = [name for name in names if name not in BACKENDS]
    if missing:
        pytest.skip(f"needs the {' and '.join(missing)} backend (SNAPPERABLE_BACKEND, or not built)",
                    allow_module_level=True)

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


class StoreOpener(Protocol):
    def __call__(
        self,
        name: str = "run.db",
        *,
        with_: Optional[str] = None,
        synchronous: Synchronous = "full",
        batch_size: int = 1,
        max_wait_time: Optional[float] = None,
    ) -> CheckpointStore: ...


@pytest.fixture
def open_store(tmp_path: Path, backend: str) -> Iterator[StoreOpener]:
    """Opens SQLite checkpoint stores in ``tmp_path`` (the backend under test's, or
    ``with_``'s) and closes whatever the test left open."""
    opened: list[CheckpointStore] = []

    def opener(
        name: str = "run.db",
        *,
        with_: Optional[str] = None,
        synchronous: Synchronous = "full",
        batch_size: int = 1,
        max_wait_time: Optional[float] = None,
    ) -> CheckpointStore:
        module = INSTALLED_BACKENDS[with_ or backend]
        store = module.open_sqlite(str(tmp_path / name), synchronous, batch_size, max_wait_time)
        opened.append(store)
        return store

    yield opener
    for store in opened:
        try:
            store.close()
        except WriterError:
            pass


@pytest.fixture
def store(open_store: StoreOpener) -> CheckpointStore:
    """A fresh SQLite checkpoint store, ``run.db`` in ``tmp_path``, once per backend."""
    return open_store()


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
