"""Function fingerprints (docs/architecture.md 5): what must change them, what must not,
and the words.

Each test writes real source files and imports them, so an "edit" is a second file with
the edited text, imported again.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import import_file
from snapperable import versioning
from snapperable.versioning import Fingerprint, explain_change, fingerprint, pinned

Loader = Callable[[str], ModuleType]


@pytest.fixture
def load(tmp_path: Path) -> Iterator[Loader]:
    """Import dedented source text as a module, each text from a file of its own.

    All the versions of one test share one module name, as the runs of a real program
    do (a pickled instance names its class by module); the name is fresh per test.
    Each version replaces the previous one in sys.modules, so fingerprint a version
    before loading the next if it involves classes (inspect finds their source there).
    """
    name = f"versioning_fixture_{uuid.uuid4().hex}"
    count = 0

    def load_source(source: str) -> ModuleType:
        nonlocal count
        count += 1
        path = tmp_path / f"{name}_v{count}.py"
        path.write_text(textwrap.dedent(source))
        return import_file(path, name)

    yield load_source
    sys.modules.pop(name, None)


def fp_of(load: Loader, source: str, name: str = "process") -> Fingerprint:
    fn: Callable[..., object] = getattr(load(source), name)
    return fingerprint(fn)


def changes(load: Loader, before: str, after: str, name: str = "process") -> list[str]:
    """Explanation of the edit ``before`` -> ``after``; asserts the digests agree with it."""
    old, new = fp_of(load, before, name), fp_of(load, after, name)
    explanation = explain_change(old.parts, new.parts)
    assert (old.digest != new.digest) == bool(explanation)
    return explanation


BASE = '''
import json

MODEL = "small"
LIMIT = 10


def clean(text):
    return text.strip()[:LIMIT]


def process(record, scale=2, *, sep=","):
    """Turn a record into a line."""
    return json.dumps(clean(record)) * scale + sep + MODEL
'''


CLEAN = "def clean(text):\n    return text.strip()[:LIMIT]\n"
assert CLEAN in BASE


# --- edits that must not count ----------------------------------------------------------


COSMETIC = {
    "comments": BASE.replace(
        "    return json.dumps", "    # the model is read last\n    return json.dumps"
    ),
    "docstring": BASE.replace("Turn a record into a line.", "Render a record, newline-free."),
    "no docstring": BASE.replace('    """Turn a record into a line."""\n', ""),
    "helper docstring": BASE.replace(
        "def clean(text):\n", 'def clean(text):\n    """Strip and cut."""\n'
    ),
    "blank lines": BASE.replace("\n\n", "\n\n\n\n"),
    "formatting": BASE.replace(
        "def process(record, scale=2, *, sep=\",\"):",
        "def process(\n    record,\n    scale = 2,\n    *,\n    sep = ','\n):",
    ),
    "moved down": "def unrelated():\n    return 1\n\n\n" + BASE,
    "helper moved below": BASE.replace(CLEAN, "") + "\n\n" + CLEAN,
    "unrelated global": BASE + "\nOTHER = 123\n",
}


@pytest.mark.parametrize("edit", sorted(COSMETIC))
def test_cosmetic_edits_keep_the_fingerprint(load: Loader, edit: str) -> None:
    assert fp_of(load, BASE) == fp_of(load, COSMETIC[edit])


def test_renaming_the_function_keeps_the_fingerprint(load: Loader) -> None:
    renamed = BASE.replace("def process(", "def handle(")
    assert fp_of(load, BASE) == fp_of(load, renamed, "handle")


def test_fingerprint_is_deterministic_in_process(load: Loader) -> None:
    module = load(BASE)
    assert fingerprint(module.process) == fingerprint(module.process)


# --- edits that must count, and their explanation ---------------------------------------


EDITS = {
    "body": (BASE.replace("* scale", "* scale * 2"), ["function body changed"]),
    "helper": (BASE.replace("text.strip()", "text.lower()"), ["helper `clean` changed"]),
    "global": (BASE.replace('MODEL = "small"', 'MODEL = "large"'), ["global `MODEL` changed"]),
    "global read by the helper only": (
        BASE.replace("LIMIT = 10", "LIMIT = 20"),
        ["global `LIMIT` changed"],
    ),
    "default": (
        BASE.replace("scale=2", "scale=3"),
        ["function body changed", "default arguments changed"],
    ),
    "keyword default": (
        BASE.replace('sep=","', 'sep=";"'),
        ["function body changed", "keyword-only default arguments changed"],
    ),
    "decorator": (
        BASE.replace("def clean", "@functools.lru_cache(maxsize=8)\ndef clean").replace(
            "import json", "import functools\nimport json"
        ),
        ["helper `clean` changed"],
    ),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_behaviour_edits_change_the_fingerprint(load: Loader, edit: str) -> None:
    after, expected = EDITS[edit]
    assert changes(load, BASE, after) == expected


def test_default_from_a_constant_counts_by_value(load: Loader) -> None:
    before = "N = 2\n\ndef process(x, n=N):\n    return x * n\n"
    after = before.replace("N = 2", "N = 3")
    assert changes(load, before, after) == ["default arguments changed"]


def test_new_and_dropped_globals_and_helpers_are_named(load: Loader) -> None:
    after = BASE.replace("clean(record)", "record").replace(
        "+ MODEL", "+ MODEL + SUFFIX"
    ) + '\nSUFFIX = "!"\n'
    assert changes(load, BASE, after) == [
        "function body changed",
        "global `LIMIT` no longer used",
        "global `SUFFIX` is new",
        "helper `clean` no longer used",
    ]


def test_closure_values_count(load: Loader) -> None:
    module = load(
        """
        def make(factor):
            def process(x):
                return x * factor
            return process
        """
    )
    assert fingerprint(module.make(2)) == fingerprint(module.make(2))
    old, new = fingerprint(module.make(2)), fingerprint(module.make(3))
    assert explain_change(old.parts, new.parts) == ["closure value `factor` changed"]


def test_closure_holding_a_function_counts_its_body(load: Loader) -> None:
    """A decorator's wrapper: the wrapped function is in the closure, not in the globals."""
    source = """
        import functools

        def logged(fn):
            @functools.wraps(fn)
            def wrapper(*args):
                return fn(*args)
            return wrapper

        @logged
        def process(x):
            return x + 1
        """
    old = fp_of(load, source)
    new = fp_of(load, source.replace("x + 1", "x + 2"))
    assert explain_change(old.parts, new.parts) == ["closure value `fn` changed"]


def test_class_of_the_same_module_counts(load: Loader) -> None:
    before = """
        class Scaler:
            def __init__(self, k):
                self.k = k

            def apply(self, x):
                return x * self.k

        SCALER = Scaler(2)

        def process(x):
            return SCALER.apply(x)
        """
    assert changes(load, before, before.replace("x * self.k", "x + self.k")) == [
        "class `Scaler` changed"
    ]
    # an object held in a global is state: its type and class count, not its attributes
    assert changes(load, before, before.replace("Scaler(2)", "Scaler(3)")) == []


def test_dispatch_table_counts_the_functions_in_it(load: Loader) -> None:
    before = """
        def double(x):
            return x * 2

        HANDLERS = {"double": double}

        def process(x):
            return HANDLERS["double"](x)
        """
    after = before.replace("x * 2", "x * 3")
    assert changes(load, before, after) == ["global `HANDLERS` changed"]


def test_other_modules_count_by_name_only(load: Loader) -> None:
    before = """
        from os.path import join
        import json

        def process(x):
            return join(json.dumps(x))
        """
    fp = fp_of(load, before)
    assert set(fp.parts) == {"code", "imported join", "module json", "scheme"}
    after = before.replace("import json", "import pickle as json")
    assert changes(load, before, after) == ["module `json` changed"]


def test_unencodable_global_counts_by_type(load: Loader) -> None:
    module = load(
        """
        import threading

        LOCK = threading.Lock()

        def process(x):
            with LOCK:
                return x
        """
    )
    first = fingerprint(module.process)
    setattr(module, "LOCK", threading.Lock())
    assert fingerprint(module.process) == first


# --- recursion --------------------------------------------------------------------------


MUTUAL = """
def even(n):
    return n == 0 or odd(n - 1)


def odd(n):
    return n != 0 and even(n - 1)
"""


def test_mutual_recursion_terminates_and_is_stable(load: Loader) -> None:
    module = load(MUTUAL)
    assert fingerprint(module.even) == fingerprint(module.even)
    assert set(fingerprint(module.even).parts) == {"code", "helper odd", "scheme"}
    assert fingerprint(module.even) != fingerprint(module.odd)
    edited = MUTUAL.replace("n != 0", "n > 0")
    assert changes(load, MUTUAL, edited, "even") == ["helper `odd` changed"]
    assert changes(load, MUTUAL, edited, "odd") == ["function body changed"]


def test_recursive_closure_terminates(load: Loader) -> None:
    module = load(
        """
        def make():
            def walk(n):
                return 0 if n == 0 else walk(n - 1)
            return walk
        """
    )
    assert fingerprint(module.make()) == fingerprint(module.make())


# --- other kinds of callables -----------------------------------------------------------


LAMBDAS = """
import functools

own_line = lambda x, k=1: x + k
nested = functools.reduce(
    lambda acc, item: acc + item,
    [1, 2],
), (lambda y: y * 2)
pair = (lambda a: a + 1, lambda b: b * 2)
twins = (lambda a: a + 1, lambda a: a * 2)
"""


def test_lambdas(load: Loader) -> None:
    module = load(LAMBDAS)
    moved = load("\n\n# moved\n" + LAMBDAS)
    for name, index in [("own_line", None), ("nested", 1), ("pair", 0), ("pair", 1)]:
        fn, fn_moved = getattr(module, name), getattr(moved, name)
        if index is not None:
            fn, fn_moved = fn[index], fn_moved[index]
        # found in the source: no bytecode part, and moving does not count
        assert "python" not in fingerprint(fn).parts, name
        assert fingerprint(fn) == fingerprint(fn_moved), name
    assert fingerprint(module.pair[0]) != fingerprint(module.pair[1])
    edited = load(LAMBDAS.replace("x + k", "x - k"))
    assert fingerprint(module.own_line) != fingerprint(edited.own_line)


def test_ambiguous_lambdas_fall_back_to_bytecode(load: Loader) -> None:
    module = load(LAMBDAS)
    first, second = fingerprint(module.twins[0]), fingerprint(module.twins[1])
    assert first.parts["python"] == "{}.{}".format(*sys.version_info[:2])
    assert first != second


def test_partial(load: Loader) -> None:
    module = load(BASE)
    base = fingerprint(functools.partial(module.process, scale=3))
    assert base == fingerprint(functools.partial(module.process, scale=3))
    other = fingerprint(functools.partial(module.process, scale=4))
    assert explain_change(base.parts, other.parts) == ["keyword argument `scale` of the partial changed"]
    positional = fingerprint(functools.partial(module.process, "x"))
    assert "positional arguments of the partial changed" in explain_change(
        base.parts, positional.parts
    )
    # what it wraps counts as the function itself does
    assert fingerprint(module.process).parts.items() <= base.parts.items()
    assert "partial keyword scale = 3" in base.covers


MODEL_CLASS = """
FACTOR = 2


class Model:
    def __init__(self, weight):
        self.weight = weight

    def predict(self, x):
        return self._scale(x) + 1

    def _scale(self, x):
        return x * self.weight * FACTOR

    def __call__(self, x):
        return self.predict(x)
"""


def test_bound_method(load: Loader) -> None:
    module = load(MODEL_CLASS)
    fp = fingerprint(module.Model(2).predict)
    assert fp == fingerprint(module.Model(2).predict)
    assert set(fp.parts) == {"code", "class Model", "attribute weight", "global FACTOR", "scheme"}
    config = fingerprint(module.Model(3).predict)
    assert explain_change(fp.parts, config.parts) == ["attribute `weight` of the bound instance changed"]
    # another method it calls is part of the class
    edited = load(MODEL_CLASS.replace("x * self.weight", "x / self.weight")).Model(2).predict
    assert explain_change(fp.parts, fingerprint(edited).parts) == ["class `Model` changed"]


def test_unpicklable_attribute_does_not_hide_the_others(load: Loader) -> None:
    module = load(MODEL_CLASS)
    first, second = module.Model(2), module.Model(2)
    first.lock = threading.Lock()
    second.lock = threading.Lock()
    assert fingerprint(first.predict) == fingerprint(second.predict)
    second.weight = 3
    assert fingerprint(first.predict) != fingerprint(second.predict)


def test_callable_object(load: Loader) -> None:
    module = load(MODEL_CLASS)
    fp = fingerprint(module.Model(2))
    assert fp == fingerprint(module.Model(2))
    assert fp != fingerprint(module.Model(2).predict)
    config = fingerprint(module.Model(5))
    assert explain_change(fp.parts, config.parts) == ["attribute `weight` of the bound instance changed"]
    edited = load(MODEL_CLASS.replace("return self.predict(x)", "return -self.predict(x)"))
    assert explain_change(fp.parts, fingerprint(edited.Model(2)).parts) == [
        "function body changed",
        "class `Model` changed",
    ]


def test_class_as_the_function(load: Loader) -> None:
    fp = fp_of(load, MODEL_CLASS, "Model")
    assert set(fp.parts) == {"class", "global FACTOR", "scheme"}
    assert changes(load, MODEL_CLASS, MODEL_CLASS.replace("FACTOR = 2", "FACTOR = 3"), "Model") == [
        "global `FACTOR` changed"
    ]


def test_builtins_by_name() -> None:
    assert fingerprint(str) == fingerprint(str)
    assert fingerprint(str) != fingerprint(int)
    assert fingerprint(len) != fingerprint(abs)
    assert set(fingerprint(len).parts) == {"callable", "scheme"}
    # a builtin method bound to a value: the value counts
    assert fingerprint(",".join) != fingerprint(";".join)


def test_lru_cache_wrapper_counts_what_it_wraps(load: Loader) -> None:
    source = "import functools\n\n@functools.lru_cache\ndef process(x):\n    return x + 1\n"
    fp = fp_of(load, source)
    assert "wrapper" in fp.parts
    assert changes(load, source, source.replace("x + 1", "x + 2")) == ["function body changed"]


def exec_function(source: str) -> Callable[..., object]:
    namespace: dict[str, Any] = {}
    exec(source, namespace)
    fn: Callable[..., object] = namespace["process"]
    return fn


def test_exec_function_uses_the_code_object() -> None:
    source = "FACTOR = 2\n\ndef process(x, k=1):\n    return x * FACTOR + k\n"
    fp = fingerprint(exec_function(source))
    assert fp.parts["python"] == "{}.{}".format(*sys.version_info[:2])
    assert fp == fingerprint(exec_function(source))
    # line numbers are not part of the code object's digest
    assert fp == fingerprint(exec_function("\n\n# moved\n" + source))
    body = fingerprint(exec_function(source.replace("x * FACTOR", "x - FACTOR")))
    assert explain_change(fp.parts, body.parts) == ["function body changed"]
    constant = fingerprint(exec_function(source.replace("FACTOR = 2", "FACTOR = 3")))
    assert explain_change(fp.parts, constant.parts) == ["global `FACTOR` changed"]


def test_not_callable_is_refused() -> None:
    with pytest.raises(TypeError, match="not callable"):
        fingerprint(42)  # type: ignore[arg-type]


# --- across processes -------------------------------------------------------------------


CHILD = """
import importlib.util, json, sys
from snapperable.versioning import fingerprint
spec = importlib.util.spec_from_file_location(sys.argv[2], sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[sys.argv[2]] = module
spec.loader.exec_module(module)
fp = fingerprint(module.process)
print(json.dumps({"digest": fp.digest, "parts": fp.parts}))
"""


def test_stable_across_processes(tmp_path: Path) -> None:
    """str hashing (and so set order) differs per process; the fingerprint may not."""
    source = BASE + '\nTAGS = {"alpha", "beta", "gamma", "delta"}\nTABLE = {"b": 2, "a": 1}\n'
    source = source.replace("+ MODEL", "+ MODEL + str(sorted(TAGS)) + str(TABLE)")
    path = tmp_path / "stable_fixture.py"
    path.write_text(source)
    python_dir = Path(versioning.__file__).resolve().parent.parent
    results = []
    for seed in ("1", "2", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(python_dir))
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), "stable_fixture"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        results.append(json.loads(out))
    assert results[0] == results[1] == results[2]
    assert {"global TAGS", "global TABLE", "helper clean"} <= set(results[0]["parts"])


# --- pinned versions and explanations ---------------------------------------------------


def test_pinned() -> None:
    v1, v2 = pinned("v1"), pinned("v2")
    assert v1.parts == {"version": "v1"}
    assert v1 == pinned("v1") and v1 != v2
    assert len(v1.digest) == 32 and int(v1.digest, 16) >= 0
    assert explain_change(v1.parts, v2.parts) == ["version 'v1' -> 'v2'"]
    assert explain_change(v1.parts, v1.parts) == []
    auto = fingerprint(len)
    assert explain_change(auto.parts, v1.parts) == ["version pinned to 'v1'"]
    assert explain_change(v1.parts, auto.parts) == ["version 'v1' no longer pinned"]


def test_parts_are_json_and_digest_is_their_hash(load: Loader) -> None:
    fp = fp_of(load, BASE)
    assert json.loads(json.dumps(fp.parts)) == fp.parts
    assert fp.digest == versioning._digest_parts(fp.parts)
    assert len(fp.digest) == 32


def test_explain_bytecode_and_source_switch() -> None:
    source_parts = {"code": "aa"}
    bytecode_parts = {"code": "bb", "python": "3.11"}
    assert explain_change(source_parts, bytecode_parts) == [
        "function body changed",
        "source no longer found: bytecode compared instead",
    ]
    assert explain_change(bytecode_parts, {"code": "bb", "python": "3.12"}) == [
        "Python version changed (3.11 -> 3.12)"
    ]


part_names = st.sampled_from(
    ["code", "defaults", "closure x", "global MODEL", "helper clean", "module np", "odd part"]
)
part_maps = st.dictionaries(part_names, st.sampled_from(["00", "11", "22"]))


@given(part_maps, part_maps)
def test_explain_change_is_empty_exactly_when_parts_are_equal(
    old: dict[str, str], new: dict[str, str]
) -> None:
    explanation = explain_change(old, new)
    assert (explanation == []) == (old == new)
    differing = {n for n in set(old) | set(new) if old.get(n) != new.get(n)}
    assert len(explanation) == len(differing)


# --- the rule: logic and constants count, state by type only (docs/architecture.md 5) ---


STATE = """
import argparse
import datetime
import functools
import random
import threading
import uuid


class Client:
    def __init__(self):
        self.session = uuid.uuid4().hex

    def call(self, x):
        return x


class Session:
    def __init__(self):
        self.token = uuid.uuid4().hex


def call(x, session):
    return x


parser = argparse.ArgumentParser()
parser.add_argument("--run-id", default=datetime.datetime.now().isoformat())
args = parser.parse_args([])
rng = random.Random()
START = datetime.datetime.now()
client = Client()
lock = threading.Lock()
cache = {}


def process(x):
    if x not in cache:
        cache[x] = rng.random()
    with lock:
        return (x, START, args.run_id, client.call(x), cache[x])


def remember(x, memo={}):
    return memo.setdefault(x, x)


with_session = functools.partial(call, session=Session())
"""


def test_state_counts_by_type_only(load: Loader) -> None:
    """Issue 9's "what is wrong now", as two loads (two runs) of one module.

    End to end, with closures too: tests/test_version_rule.py.
    """
    first, second = load(STATE), load(STATE)
    for name in ("process", "with_session", "remember"):
        assert fingerprint(getattr(first, name)) == fingerprint(getattr(second, name)), name
    covers = fingerprint(first.process).covers
    for name in ("args", "rng", "START", "client", "lock", "cache"):
        assert f"global {name}: type only" in covers, name
    assert "class Client" in covers
    assert "partial keyword session: type only" in fingerprint(first.with_session).covers


def test_state_filled_in_process_keeps_the_fingerprint(load: Loader) -> None:
    """A notebook re-running a cell: the memo and RNG state fn leaves do not count."""
    module = load(STATE)
    before = (fingerprint(module.process), fingerprint(module.remember))
    for x in range(5):
        module.process(x), module.remember(x)
    module.rng.seed(7)
    module.client.session = "another"
    assert (fingerprint(module.process), fingerprint(module.remember)) == before
    assert "defaults: type only" not in fingerprint(module.remember).covers
    assert "defaults = (<dict>,)" in fingerprint(module.remember).covers


class Pickled(Exception):
    pass


class NeverLookInto:
    """State that fails the test if a fingerprint pickles, compares, iterates or sizes it."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise Pickled("a fingerprint pickled a state object")

    def __eq__(self, other: object) -> bool:
        raise Pickled("a fingerprint compared a state object")

    __hash__ = object.__hash__

    def __iter__(self) -> Any:
        raise Pickled("a fingerprint iterated a state object")

    def __len__(self) -> int:
        raise Pickled("a fingerprint took the length of a state object")

    def __repr__(self) -> str:
        raise Pickled("a fingerprint took the repr of a state object")


def test_state_is_never_pickled_or_walked(load: Loader) -> None:
    module = load(
        """
        import functools

        class Holder:
            def __init__(self, thing):
                self.thing = thing
                self.name = "holder"

            def use(self, x):
                return x

        def process(x, extra=None):
            return (model, MODELS, lookup, x)

        def make(thing):
            def inner(x):
                return thing, x
            return inner
        """
    )
    bomb = NeverLookInto()
    setattr(module, "model", bomb)
    setattr(module, "MODELS", {"big": bomb, "sizes": [1, 2]})
    setattr(module, "lookup", {i: bomb for i in range(100_000)})  # lowercase: not walked
    fingerprints = [
        fingerprint(module.process),
        fingerprint(functools.partial(module.process, extra=bomb)),
        fingerprint(module.Holder(bomb).use),
        fingerprint(module.make(bomb)),
    ]
    covers = fingerprints[0].covers
    assert "global model: type only" in covers
    assert "global MODELS = {'big': <NeverLookInto>, 'sizes': [1, 2]}" in covers
    assert "attribute thing: type only" in fingerprints[2].covers
    assert "attribute name = 'holder'" in fingerprints[2].covers


CONSTANTS = """
import enum


class Size(enum.Enum):
    SMALL = 1
    LARGE = 2


MODEL = "small"
TEMPERATURE = 0.5
RETRIES = 3
SCALE = 1 + 2j
SALT = b"x"
STRICT = True
LIMIT = None
SIZE = Size.SMALL
SHAPE = (1, 2)
TAGS = frozenset({"a", "b"})
PARAMS = {"top_k": 5, "stop": ["end"], "seeds": {1, 2}}
model_name = "gpt"
point = (1, 2)
table = {"k": 1}


def process(x):
    return (MODEL, TEMPERATURE, RETRIES, SCALE, SALT, STRICT, LIMIT, SIZE, SHAPE, TAGS, PARAMS,
            model_name, point, table, x)
"""

CONSTANT_EDITS = {
    "MODEL": ('MODEL = "small"', 'MODEL = "large"'),
    "TEMPERATURE": ("TEMPERATURE = 0.5", "TEMPERATURE = 0.7"),
    "RETRIES": ("RETRIES = 3", "RETRIES = 4"),
    "SCALE": ("SCALE = 1 + 2j", "SCALE = 1 + 3j"),
    "SALT": ('SALT = b"x"', 'SALT = b"y"'),
    "STRICT": ("STRICT = True", "STRICT = False"),
    "LIMIT": ("LIMIT = None", "LIMIT = 0"),
    "SIZE": ("SIZE = Size.SMALL", "SIZE = Size.LARGE"),
    "SHAPE": ("SHAPE = (1, 2)", "SHAPE = (1, 3)"),
    "TAGS": ('TAGS = frozenset({"a", "b"})', 'TAGS = frozenset({"a", "c"})'),
    "PARAMS": ('"top_k": 5', '"top_k": 6'),
    "PARAMS nested": ('"stop": ["end"]', '"stop": ["end", "."]'),
    "PARAMS set": ('"seeds": {1, 2}', '"seeds": {1, 3}'),
    "model_name": ('model_name = "gpt"', 'model_name = "claude"'),
    "point": ("point = (1, 2)", "point = (2, 2)"),
}


@pytest.mark.parametrize("edit", sorted(CONSTANT_EDITS))
def test_constants_count_by_value(load: Loader, edit: str) -> None:
    before, after = CONSTANT_EDITS[edit]
    assert before in CONSTANTS
    name = edit.split()[0]
    assert changes(load, CONSTANTS, CONSTANTS.replace(before, after)) == [f"global `{name}` changed"]


def test_lowercase_container_counts_by_type(load: Loader) -> None:
    assert changes(load, CONSTANTS, CONSTANTS.replace('table = {"k": 1}', 'table = {"k": 2}')) == []
    covers = fp_of(load, CONSTANTS).covers
    assert "global table: type only" in covers
    assert "global PARAMS = {'top_k': 5, 'stop': ['end'], 'seeds': {1, 2}}" in covers
    assert "global SIZE = <Size.SMALL: 1>" in covers and "global point = (1, 2)" in covers


def test_covers_lists_every_part_and_how(load: Loader) -> None:
    assert fp_of(load, BASE).covers == (
        "code",
        "defaults = (2,)",
        "kwdefaults: sep = ','",
        "global LIMIT = 10",
        "global MODEL = 'small'",
        "helper clean",
        "module json: by name",
    )
    long = fp_of(load, BASE.replace('MODEL = "small"', 'MODEL = "' + "m" * 500 + '"'))
    line = next(c for c in long.covers if c.startswith("global MODEL"))
    assert len(line) < 110 and line.endswith("...")


def test_bound_instance_attributes(load: Loader) -> None:
    source = """
        import uuid

        class Scorer:
            def __init__(self, size):
                self.size = size
                self.cache = {}
                self.client = object()

            def score(self, x):
                return self.cache.setdefault(x, len(self.size) * x)
        """
    module = load(source)
    large = module.Scorer("large")
    fp = fingerprint(large.score)
    assert fp == fingerprint(module.Scorer("large").score)
    large.score(3)  # fills the cache
    assert fingerprint(large.score) == fp
    assert explain_change(fp.parts, fingerprint(module.Scorer("small").score).parts) == [
        "attribute `size` of the bound instance changed"
    ]
    assert {"attribute size = 'large'", "attribute cache: type only", "attribute client: type only"} <= set(
        fp.covers
    )


def test_slots_instance_counts_its_constant_slots(load: Loader) -> None:
    module = load(
        """
        class Scorer:
            __slots__ = ("size",)

            def __init__(self, size):
                self.size = size

            def __call__(self, x):
                return x
        """
    )
    fp = fingerprint(module.Scorer("large"))
    assert "attribute size = 'large'" in fp.covers
    assert fp != fingerprint(module.Scorer("small"))


def test_same_module_object_in_a_closure_counts_its_class_code(load: Loader) -> None:
    source = """
        class Scorer:
            def score(self, x):
                return x * 2

        def make():
            scorer = Scorer()
            def process(x):
                return scorer.score(x)
            return process
        """
    old = fingerprint(load(source).make())
    new = fingerprint(load(source.replace("x * 2", "x * 3")).make())
    assert explain_change(old.parts, new.parts) == ["closure value `scorer` changed"]
    assert "closure scorer: type only" in old.covers


def test_pinned_constants() -> None:
    v2 = pinned(("v2", "gpt-4o"))
    assert v2 == pinned(("v2", "gpt-4o")) and v2 != pinned(("v2", "gpt-5"))
    assert v2.covers == ("version = ('v2', 'gpt-4o')",)
    assert explain_change(v2.parts, pinned(("v2", "gpt-5")).parts) == [
        "version ('v2', 'gpt-4o') -> ('v2', 'gpt-5')"
    ]
    assert pinned(2) != pinned("2")
    assert explain_change(pinned("2").parts, pinned(2).parts) == ["version '2' -> 2"]
    assert pinned(frozenset({"b", "a", "c"})).parts["version"] == "frozenset({'a', 'b', 'c'})"
    assert pinned(("v1",)).parts["version"] == "('v1',)"
    # a str keeps the parts (so the digest) that earlier releases stored for it
    assert pinned("v3").parts == {"version": "v3"}
    for bad in ([1], {"a": 1}, ("v", object()), None):
        with pytest.raises(TypeError, match="constant"):
            pinned(bad)


# --- schemes ----------------------------------------------------------------------------


def scheme1_parts(fp: Fingerprint, state: str = "00" * 16) -> dict[str, str]:
    """The parts scheme 1 stored for ``fp``'s function (any digest for a state part)."""
    return {name: digest or state for name, digest in fp.earlier[1].items()}


def test_earlier_scheme_is_compared_on_what_both_cover(load: Loader) -> None:
    module = load(STATE)
    fp = fingerprint(module.process)
    assert fp.parts["scheme"] == str(versioning.SCHEME) == "2"
    old = scheme1_parts(fp)
    assert old["global rng"] == "00" * 16  # a state part: not compared
    assert fp.adopts(old) and fp.changes_since(old) == []
    body = dict(old, code="11" * 16)
    assert not fp.adopts(body) and fp.changes_since(body) == ["function body changed"]
    gone = {name: digest for name, digest in old.items() if name != "global START"}
    assert fp.changes_since(gone) == []  # state parts are ignored, present or not
    extra = dict(old, **{"helper gone": "22" * 16})
    assert fp.changes_since(extra) == ["helper `gone` no longer used"]
    assert not fp.adopts(dict(old, scheme="2"))  # the same scheme compares by digest
    assert not fp.adopts({"version": "v1"})
    future = dict(old, scheme="9")
    assert not fp.adopts(future) and "scheme 9" in fp.changes_since(future)[0]


def test_earlier_scheme_of_a_bound_method_and_a_partial(load: Loader) -> None:
    module = load(MODEL_CLASS)
    fp = fingerprint(module.Model(2).predict)
    assert fp.earlier[1]["attribute weight"] is None and fp.earlier[1]["instance"]
    other = fingerprint(module.Model(3).predict)
    assert not fp.adopts(scheme1_parts(other))
    assert fp.changes_since(scheme1_parts(other)) == ["attributes of the bound instance changed"]
    base = load(BASE)
    partial = fingerprint(functools.partial(base.process, scale=3))
    assert partial.earlier[1]["partial keywords"]
    assert not partial.adopts(scheme1_parts(fingerprint(functools.partial(base.process, scale=4))))
