"""A restart of unchanged code never redoes its work; an edit of logic or a constant does.

Issue 9's cases, end to end through ``Snapper`` on both storages and both backends:
each script of ``RESTARTS`` (what reprocessed everything before) runs twice on one
checkpoint with no edit, and each of ``EDITS`` runs once, is edited, and runs again,
naming the part that changed in its log. Both in two fresh processes (a restarted
script) and twice in one process (a notebook re-running a cell, its state filled).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import pytest

from conftest import BACKENDS, STORAGES, import_file, once
from snapperable import Snapper, SnapshotStorage

FIRST, MORE = 5, 8  # items of the first run; of the second one, for a restart

# What used to redo everything on a restart: each defines `fn`, reading state.
RESTARTS: dict[str, str] = {
    "module rng": """
        import random

        rng = random.Random()

        def fn(x):
            return x + round(rng.random() * 0)
        """,
    "START = datetime.now()": """
        import datetime

        START = datetime.datetime.now()

        def fn(x):
            return (x, START.year > 2000)
        """,
    "argparse args with a timestamp default": """
        import argparse
        import time

        parser = argparse.ArgumentParser()
        parser.add_argument("--run-id", default=str(time.time()))
        parser.add_argument("--model", default="small")
        args = parser.parse_args([])

        def fn(x):
            return f"{args.model}:{x}"
        """,
    "client with a uuid4 session id": """
        import uuid

        class Client:
            def __init__(self):
                self.session_id = uuid.uuid4().hex

            def call(self, x):
                return x * 2

        client = Client()

        def fn(x):
            return client.call(x)
        """,
    "partial with a Session": """
        import functools
        import secrets

        class Session:
            def __init__(self):
                self.token = secrets.token_hex(8)

        def call(x, session):
            return x + 1

        fn = functools.partial(call, session=Session())
        """,
    "module cache memo": """
        cache = {}

        def fn(x):
            if x not in cache:
                cache[x] = x * 3
            return cache[x]
        """,
    "closure over seen and stats": """
        def make():
            seen = []
            stats = {"calls": 0}

            def counted(x):
                seen.append(x)
                stats["calls"] += 1
                return x

            return counted

        fn = make()
        """,
}

# What must still redo the work: before, the edit (old -> new text), the part it names.
EDIT_BASE = """
    import functools

    MODEL = "small"
    TEMPERATURE = 0.5
    PARAMS = {"top_k": 5}

    def clean(text):
        return text.strip()

    class Scorer:
        def __init__(self, size):
            self.size = size

        def score(self, x):
            return f"{self.size}:{x}"

    scorer = Scorer("global")

    def process(x, scale=2):
        return (clean(f" {x} "), MODEL, TEMPERATURE, PARAMS["top_k"], scale, scorer.score(x))

    def make(factor):
        def scaled(x):
            return x * factor
        return scaled

    def call(x, temperature):
        return (x, temperature)

"""
# name -> (how fn is made, the edit: old text -> new text, what the log must name)
EDITS: dict[str, tuple[str, str, str, str]] = {
    "body": ("fn = process", 'clean(f" {x} ")', 'clean(f"  {x} ")', "function body changed"),
    "helper": ("fn = process", "text.strip()", "text.strip().lower()", "helper `clean` changed"),
    "same-module class method": ("fn = process", '"{self.size}:{x}"', '"{self.size}={x}"', "class `Scorer` changed"),
    "str constant": ("fn = process", 'MODEL = "small"', 'MODEL = "large"', "global `MODEL` changed"),
    "float constant": ("fn = process", "TEMPERATURE = 0.5", "TEMPERATURE = 0.7", "global `TEMPERATURE` changed"),
    "dict constant": ("fn = process", 'PARAMS = {"top_k": 5}', 'PARAMS = {"top_k": 6}', "global `PARAMS` changed"),
    "default": ("fn = process", "scale=2", "scale=3", "default arguments changed"),
    "closure int of a factory": ("fn = make(2)", "make(2)", "make(3)", "closure value `factor` changed"),
    "partial keyword constant": (
        "fn = functools.partial(call, temperature=0.5)",
        "temperature=0.5",
        "temperature=0.7",
        "keyword argument `temperature` of the partial changed",
    ),
    "bound instance's config attribute": (
        'fn = Scorer("large").score',
        'Scorer("large")',
        'Scorer("small")',
        "attribute `size` of the bound instance changed",
    ),
}


def edit_sources(name: str) -> tuple[str, str, str]:
    """The source before and after edit ``name``, and the sentence its log must hold."""
    fn_line, old, new, sentence = EDITS[name]
    before = textwrap.dedent(EDIT_BASE) + fn_line + "\n"
    assert before.count(old) == 1, old
    return before, before.replace(old, new), sentence


def processed_since(snapper: Snapper[Any, Any], since: float) -> int:
    """Items of the current version whose latest row was made after ``since``."""
    return sum(metric.started >= since for metric in snapper.load_metrics())


# --- two fresh processes ----------------------------------------------------------------

# A child runs every case once (phase 1, or phase 2: again, or edited) on both storages,
# and prints what each run processed and logged.
CHILD = """
import importlib.util, json, logging, sys, time
from pathlib import Path
from snapperable import PickleSnapshotStorage, Snapper, SQLiteSnapshotStorage

root, phase = Path(sys.argv[1]), sys.argv[2]
messages = []

class Collect(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())

logger = logging.getLogger("snapperable")
logger.setLevel(logging.INFO)
logger.addHandler(Collect())
results = {}
for case in sorted(p.name for p in root.iterdir() if p.is_dir()):
    spec = importlib.util.spec_from_file_location("case_module", root / case / f"v{phase}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["case_module"] = module
    spec.loader.exec_module(module)
    items = list(range(int((root / case / "items").read_text().split()[int(phase) - 1])))
    for kind, make in (("sqlite", SQLiteSnapshotStorage), ("pickle", PickleSnapshotStorage)):
        del messages[:]
        since = time.time()
        snapper = Snapper(items, module.fn, snapshot_storage=make(str(root / case / f"run.{kind}")))
        snapper.start()
        done = sum(m.started >= since for m in snapper.load_metrics())
        results[f"{case}/{kind}"] = {"processed": done, "log": list(messages), "outputs": snapper.load()}
print(json.dumps(results))
"""


def write_cases(root: Path) -> None:
    """Each case as a directory: v1.py, v2.py (the same text for a restart) and items."""
    cases: dict[str, tuple[str, str, tuple[int, int]]] = {}
    for name, source in RESTARTS.items():
        text = textwrap.dedent(source)
        cases[f"restart {name}"] = (text, text, (FIRST, MORE))
    for name in EDITS:
        before, after, _ = edit_sources(name)
        cases[f"edit {name}"] = (before, after, (FIRST, FIRST))
    for case, (before, after, counts) in cases.items():
        directory = root / case
        directory.mkdir()
        (directory / "v1.py").write_text(before)
        (directory / "v2.py").write_text(after)
        (directory / "items").write_text(f"{counts[0]} {counts[1]}")


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def two_processes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    """Every case run by two fresh processes in turn (one backend): what each reported."""
    root = tmp_path_factory.mktemp(f"cases-{request.param}")
    write_cases(root)
    env = dict(os.environ, SNAPPERABLE_BACKEND=request.param)
    runs = []
    for phase in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(root), phase], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr
        runs.append(json.loads(out.stdout))
    yield runs


@once  # the children choose their backend (the fixture's parameter)
@pytest.mark.parametrize("kind", sorted(STORAGES))
@pytest.mark.parametrize("name", sorted(RESTARTS))
def test_a_restart_in_a_fresh_process_redoes_nothing(
    two_processes: list[dict[str, Any]], name: str, kind: str
) -> None:
    first, second = (run[f"restart {name}/{kind}"] for run in two_processes)
    assert first["processed"] == FIRST
    assert second["processed"] == MORE - FIRST  # the new items only
    assert second["log"] == []  # no "function changed" warning
    assert second["outputs"][:FIRST] == first["outputs"]


@once
@pytest.mark.parametrize("kind", sorted(STORAGES))
@pytest.mark.parametrize("name", sorted(EDITS))
def test_an_edit_in_a_fresh_process_redoes_everything_and_says_why(
    two_processes: list[dict[str, Any]], name: str, kind: str
) -> None:
    first, second = (run[f"edit {name}/{kind}"] for run in two_processes)
    sentence = edit_sources(name)[2]
    assert first["processed"] == FIRST
    assert second["processed"] == FIRST
    assert len(second["log"]) == 1
    assert sentence in second["log"][0] and "reprocessed" in second["log"][0]


# --- one process ------------------------------------------------------------------------


@pytest.fixture
def case_loader(tmp_path: Path) -> Iterator[Callable[[str, str], ModuleType]]:
    """Import a case's source as a module, each version from a file of its own."""
    name = f"version_rule_case_{os.getpid()}_{time.monotonic_ns()}"

    def load(source: str, version: str) -> ModuleType:
        path = tmp_path / f"{name}_{version}.py"
        path.write_text(source)
        return import_file(path, name)

    yield load
    sys.modules.pop(name, None)


@pytest.mark.parametrize("name", sorted(RESTARTS))
def test_a_re_run_in_the_same_process_redoes_nothing(
    name: str, storage: SnapshotStorage[Any], case_loader: Callable[[str, str], ModuleType],
    caplog: pytest.LogCaptureFixture,
) -> None:
    module = case_loader(textwrap.dedent(RESTARTS[name]), "v1")
    first = Snapper(list(range(FIRST)), module.fn, snapshot_storage=storage)
    first.start()
    # the cell is run again: fn's state (memo, accumulators, RNG) is what the first run left
    since = time.time()
    with caplog.at_level(logging.INFO, logger="snapperable"):
        again = Snapper(list(range(MORE)), module.fn, snapshot_storage=storage)
        assert again.plan().version_changes == []
        again.start()
    assert processed_since(again, since) == MORE - FIRST
    assert caplog.records == []
    assert again.load()[:FIRST] == first.load()


@pytest.mark.parametrize("name", sorted(EDITS))
def test_an_edit_in_the_same_process_redoes_everything_and_says_why(
    name: str, storage: SnapshotStorage[Any], case_loader: Callable[[str, str], ModuleType],
    caplog: pytest.LogCaptureFixture,
) -> None:
    before, after, sentence = edit_sources(name)
    Snapper(list(range(FIRST)), case_loader(before, "v1").fn, snapshot_storage=storage).start()
    edited = case_loader(after, "v2")
    since = time.time()
    with caplog.at_level(logging.WARNING, logger="snapperable"):
        snapper = Snapper(list(range(FIRST)), edited.fn, snapshot_storage=storage)
        plan = snapper.plan()
        snapper.start()
    assert sentence in plan.version_changes
    assert processed_since(snapper, since) == FIRST
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    assert sentence in caplog.text and "reprocessed" in caplog.text


def test_plan_says_what_the_version_covers(
    storage: SnapshotStorage[Any], case_loader: Callable[[str, str], ModuleType]
) -> None:
    module = case_loader(textwrap.dedent(RESTARTS["client with a uuid4 session id"]), "v1")
    covers = Snapper([1], module.fn, snapshot_storage=storage).plan().version_covers
    assert covers == ["code", "class Client", "global client: type only", "module uuid: by name"]
    closure = case_loader(textwrap.dedent(RESTARTS["closure over seen and stats"]), "v2")
    assert Snapper([1], closure.fn, snapshot_storage=storage).plan().version_covers == [
        "code", "closure seen: type only", "closure stats: type only"
    ]
    pinned = Snapper([1], module.fn, snapshot_storage=storage, version=("v2", "gpt-4o")).plan()
    assert pinned.version_covers == ["version = ('v2', 'gpt-4o')"]


def test_version_takes_any_constant(storage: SnapshotStorage[Any]) -> None:
    """Configuration that lives in an object is said with version=(..., its value)."""

    class Llm:
        def __init__(self, model_name: str) -> None:
            self.model_name = model_name

    def answer(x: int) -> str:
        return f"{x}"

    llm = Llm("gpt-4o")
    Snapper([1, 2], answer, snapshot_storage=storage, version=("v2", llm.model_name)).start()
    same = Snapper([1, 2], answer, snapshot_storage=storage, version=("v2", llm.model_name))
    assert same.plan().to_process == 0
    plan = Snapper([1, 2], answer, snapshot_storage=storage, version=("v2", Llm("gpt-5").model_name)).plan()
    assert plan.to_process == 2
    assert plan.version_changes == ["version ('v2', 'gpt-4o') -> ('v2', 'gpt-5')"]
