"""Tests specific to the Rust core ``snapperable._core``.

Differential: the core must produce the reference keys of ``snapperable.keys`` byte for
byte, raise the same errors, and read and write checkpoints exactly as the pure-Python
backend ``snapperable._pure`` does. Behaviour shared by both backends is tested, once
per backend, in the other test modules.
"""

from __future__ import annotations

import enum
import gc
import math
import os
import pickle
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import snapperable
from snapperable import _pure, keys
from conftest import forks_with_threads
from crash_child import writer_process_forced
from snapperable._contract import KEY_SIZE, STATUS_FAILED, STATUS_OK, ItemRow, RowInfo, VersionRow
from snapperable._row_checksum import plain_ok_checksum, version_checksum
from snapperable.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    ForkedProcessError,
    WriterError,
)

pytest.importorskip("snapperable._core")
from snapperable import _core  # noqa: E402  (typed import, after the skip)


@pytest.fixture(autouse=True)
def backend() -> str:
    """Overrides the suite's two-backend fixture: these tests name both backends."""
    return "rust"


# -- input keys -------------------------------------------------------------------------


class Color(enum.IntEnum):
    RED = 1
    GREEN = 2


class Name(str):
    pass


@dataclass(frozen=True)
class Point:
    x: int
    label: str


def _float_from_hex(text: str) -> float:
    value: float = struct.unpack(">d", bytes.fromhex(text))[0]
    return value


ODD_FLOATS = [
    0.0,
    -0.0,
    math.inf,
    -math.inf,
    math.nan,
    -math.nan,
    _float_from_hex("7ff0000000000001"),  # signalling NaN
    _float_from_hex("fff8000000000042"),  # negative NaN with a payload
    5e-324,
]

texts = st.text(
    alphabet=st.one_of(
        st.characters(),
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),  # lone surrogates
    )
)
hashable_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**300), max_value=2**300),
    st.floats(),
    st.sampled_from(ODD_FLOATS),
    texts,
    st.binary(),
    st.sampled_from(list(Color)),
    texts.map(Name),
    st.builds(Point, st.integers(), st.text()),
)
hashables = st.recursive(
    hashable_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4).map(tuple), st.frozensets(inner, max_size=4)),
    max_leaves=8,
)
values = st.recursive(
    st.one_of(hashables, st.binary().map(bytearray)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.lists(inner, max_size=5).map(tuple),
        st.dictionaries(hashables, inner, max_size=5),
        st.sets(hashables, max_size=5),
        st.frozensets(hashables, max_size=5),
    ),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(values)
def test_input_key_matches_reference(value: object) -> None:
    assert _core.input_key(value) == keys.input_key(value)


@settings(max_examples=100, deadline=None)
@given(st.lists(values, max_size=8))
def test_input_keys_match_reference(items: list[object]) -> None:
    expected = b"".join(keys.input_key(x) for x in items)
    assert _core.input_keys(items) == expected
    assert _core.input_keys(tuple(items)) == expected
    assert len(expected) == KEY_SIZE * len(items)


@pytest.mark.parametrize(
    "value",
    [
        2**63 - 1,
        2**63,
        -(2**63),
        -(2**63) - 1,
        -(2**64),
        10**400,
        -(10**400),
        {math.nan: 2, float("nan"): 1},  # equal key encodings: the values decide the order
        {1: "int", True: "bool"},  # one key: 1 == True
        "\ud800\udc00",  # a surrogate pair left unpaired in a str
        (Color.RED, Name("x"), Point(1, "p"), bytearray(b"\x00")),
    ],
    ids=repr,
)
def test_edge_values_match_reference(value: object) -> None:
    assert _core.input_key(value) == keys.input_key(value)


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _raised(fn: Callable[[object], bytes], value: object) -> BaseException:
    with pytest.raises(BaseException) as info:
        fn(value)
    return info.value


def _assert_same_error(value: object) -> BaseException:
    expected = _raised(keys.input_key, value)
    got = _raised(_core.input_key, value)
    assert type(got) is type(expected)
    assert str(got) == str(expected)
    return got


def test_nesting_limit_is_the_reference_one() -> None:
    assert _core.input_key(_nested(256)) == keys.input_key(_nested(256))
    err = _assert_same_error(_nested(257))
    assert isinstance(err, TypeError) and "key=" in str(err)
    # also below a dict and a tuple, and for an empty innermost container
    _assert_same_error({"deep": (_nested(256),)})


class _ExplodingReduce:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> Any:
        raise self.exc


@pytest.mark.parametrize(
    "make",
    [
        lambda: lambda: None,
        lambda: [1, threading.Lock()],
        lambda: {"k": (threading.Lock(),)},
        lambda: {frozenset({1}), Point(1, "a")} | {_ExplodingReduce(ValueError("nope"))},
        # the first problem met wins, in the reference's visiting order
        lambda: [threading.Lock(), _nested(300)],
        lambda: [_nested(300), threading.Lock()],
    ],
)
def test_unpicklable_values_raise_the_reference_error(make: Callable[[], object]) -> None:
    value = make()  # one object for both calls: messages can include its address
    err = _assert_same_error(value)
    assert isinstance(err, TypeError)
    if "pickled" in str(err):
        assert err.__cause__ is not None
        assert "pass key= to Snapper" in str(err)


def test_base_exceptions_from_pickling_pass_through() -> None:
    with pytest.raises(KeyboardInterrupt):
        _core.input_key([_ExplodingReduce(KeyboardInterrupt())])


# -- KeySet -----------------------------------------------------------------------------

key_lists = st.lists(st.binary(min_size=16, max_size=16), max_size=40)


# A small pool, so that queries repeat keys, within themselves and with the set.
pooled_key_lists = st.lists(st.sampled_from([bytes([b]) * 16 for b in range(8)]), max_size=40)


@settings(max_examples=100, deadline=None)
@given(key_lists, key_lists, pooled_key_lists, pooled_key_lists)
def test_key_set_agrees_with_pure(
    added: list[bytes], queried: list[bytes], pooled_added: list[bytes], pooled_queried: list[bytes]
) -> None:
    for add, query in ((added, queried), (pooled_added, pooled_queried)):
        rust, pure = _core.new_key_set(), _pure.new_key_set()
        for key in add:
            rust.add(key)
            pure.add(key)
        assert len(rust) == len(pure) == len(set(add))
        assert sorted(rust) == sorted(pure)
        assert [key in rust for key in query] == [key in pure for key in query]
        blob = b"".join(query)
        claimed = rust.claim(blob)
        assert claimed == pure.claim(blob)
        # The first position of each key not in the set before, in order.
        expected, seen = [], set(add)
        for i, key in enumerate(query):
            if key not in seen:
                seen.add(key)
                expected.append(i)
        assert claimed == expected
        assert sorted(rust) == sorted(pure) == sorted(seen)
        assert rust.claim(blob) == pure.claim(blob) == []


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


# -- SQLite checkpoints -----------------------------------------------------------------

Opener = Callable[..., Any]
OPENERS: dict[str, Opener] = {"rust": _core.open_sqlite, "python": _pure.open_sqlite}


def _key(i: int) -> bytes:
    return keys.input_key(i)


def _ok(i: int, version: int, output: object) -> ItemRow:
    return (_key(i), version, STATUS_OK, None, pickle.dumps(output, protocol=4),
            None, None, None, 1, 100.0 + i, 101.0 + i)


def _failed(i: int, version: int) -> ItemRow:
    return (_key(i), version, STATUS_FAILED, pickle.dumps(i, protocol=4), None,
            "ValueError", f"bad {i}", "Traceback ...", 3, 100.0 + i, 101.0 + i)


@pytest.fixture
def open_store(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Opens checkpoints under tmp_path and closes whatever a test left open."""
    opened: list[Any] = []

    def opener(name: str = "run.db", *, with_: str = "rust", synchronous: str = "full",
               batch_size: int = 1, max_wait_time: float | None = None) -> Any:
        store = OPENERS[with_](str(tmp_path / name), synchronous, batch_size, max_wait_time)
        opened.append(store)
        return store

    yield opener
    for store in opened:
        try:
            store.close()
        except WriterError:
            pass


def _fill(store: Any) -> tuple[int, int]:
    """Two versions with superseding rows; returns the version ids."""
    v1 = store.add_version("fp-1", '{"body": "a"}', None)
    v2 = store.add_version("fp-2", '{"body": "b"}', v1)
    for row in [
        _ok(1, v1, "one"),
        _failed(2, v1),
        _ok(3, v1, {"three": 3}),
        _ok(2, v1, "two"),  # supersedes the failure
        _failed(3, v1),  # supersedes the success
        _ok(4, v2, [4]),
        _ok(1, v1, "one again"),  # a later output replaces the first
    ]:
        store.record(row)
    store.flush()
    return v1, v2


def _snapshot(store: Any, v1: int, v2: int) -> dict[str, Any]:
    """Everything a store reads back, in comparable form."""
    wanted = _key(3) + _key(1) + _key(9) + _key(1) + _key(2)
    return {
        "versions": [(v.id, v.fingerprint, v.parts, v.uses) for v in store.versions()],
        "outputs_for": store.outputs_for(v1, wanted),
        "all_v1": store.all_outputs(v1),
        "all_v2": store.all_outputs(v2),
        "rows": list(store.rows(None)),
        "rows_v2": list(store.rows(v2)),
        "ok_v1": sorted(store.key_set(v1, STATUS_OK)),
        "failed_v1": sorted(store.key_set(v1, STATUS_FAILED)),
        "ok_any": sorted(store.key_set(None, STATUS_OK)),
        "key_sets_v1": [sorted(keys) for keys in store.key_sets(v1)],
        "key_sets_v2": [sorted(keys) for keys in store.key_sets(v2)],
    }


def test_round_trip(open_store: Callable[..., Any]) -> None:
    store = open_store()
    v1, v2 = _fill(store)
    got = _snapshot(store, v1, v2)
    assert all(isinstance(v, VersionRow) for v in store.versions())
    assert got["versions"] == [(v1, "fp-1", '{"body": "a"}', v1), (v2, "fp-2", '{"body": "b"}', v1)]
    assert got["outputs_for"] == ["one again", "one again", "two"]
    assert got["all_v1"] == ["one again", "two"]  # key 3's latest row failed
    assert got["all_v2"] == [[4]]
    assert all(isinstance(r, RowInfo) for r in got["rows"])
    assert [r.seq for r in got["rows"]] == list(range(1, 8))
    assert got["rows"][1] == RowInfo(2, _key(2), v1, STATUS_FAILED, pickle.dumps(2, protocol=4),
                                     "ValueError", "bad 2", "Traceback ...", 3, 102.0, 103.0)
    assert [r.key for r in got["rows_v2"]] == [_key(4)]
    assert got["ok_v1"] == sorted([_key(1), _key(2)])
    assert got["failed_v1"] == [_key(3)]
    assert got["ok_any"] == sorted([_key(1), _key(2), _key(4)])
    assert got["key_sets_v1"] == [got["ok_v1"], got["failed_v1"]]
    assert got["key_sets_v2"] == [[_key(4)], []]


def test_agrees_with_pure_backend_and_reads_its_files(open_store: Callable[..., Any]) -> None:
    snapshots = {}
    for name in ("rust", "python"):
        store = open_store(f"{name}.db", with_=name)
        snapshots[name] = _snapshot(store, *_fill(store))
        store.close()
    assert snapshots["rust"] == snapshots["python"]
    # each backend resumes the other's file
    for writer, reader in (("rust", "python"), ("python", "rust")):
        store = open_store(f"{writer}.db", with_=reader)
        assert _snapshot(store, 1, 2) == snapshots[writer]
        store.close()


# -- loads: the in-order fast path and the general one ------------------------------------
# A load streams the outputs while it checks the rows are one per wanted key, in order,
# with no key twice; anything else (a later row superseding an earlier one, repeated,
# reordered or missing keys) must give exactly what the pure backend gives.

_BAD_PICKLE = b"\x80\x04not a pickle"


def _row(i: int, version: int, kind: str) -> ItemRow:
    if kind == "ok":
        return _ok(i, version, f"out {i}")
    if kind == "again":
        return _ok(i, version, f"again {i}")
    if kind == "none":  # ok without an output: read as no output, as the pure backend does
        return (_key(i), version, STATUS_OK, None, None, None, None, None, 1, 0.0, 0.0)
    if kind == "bad":
        return (_key(i), version, STATUS_OK, None, _BAD_PICKLE, None, None, None, 1, 0.0, 0.0)
    assert kind == "failed"
    return _failed(i, version)


def _load_both(
    open_store: Callable[..., Any], rows: list[tuple[int, str]], wanted: list[int], other: bool = False
) -> dict[str, Any]:
    """outputs_for(wanted) and all_outputs from each backend, or the error each raised."""
    got: dict[str, Any] = {}
    blob = b"".join(_key(i) for i in wanted)
    for name in ("rust", "python"):
        store = open_store(f"{name}-{len(got)}-{os.urandom(4).hex()}.db", with_=name)
        version = store.add_version("fp", "{}", None)
        v2 = store.add_version("fp2", "{}", None)
        for i, kind in rows:
            store.record(_row(i, version, kind))
            if other:  # rows of another version in between: not part of this one
                store.record(_row(i, v2, "again"))
        store.flush()
        for what in ("for", "all"):
            try:
                got[f"{name} {what}"] = (
                    store.outputs_for(version, blob) if what == "for" else store.all_outputs(version)
                )
            except CheckpointCorruptError:
                got[f"{name} {what}"] = "corrupt"
        store.close()
    return got


LOAD_CASES: dict[str, tuple[list[tuple[int, str]], list[int]]] = {
    "in order": ([(1, "ok"), (2, "ok"), (3, "ok")], [1, 2, 3]),
    "in order, a failed row": ([(1, "ok"), (2, "failed"), (3, "ok")], [1, 2, 3]),
    "in order, an ok row without output": ([(1, "ok"), (2, "none"), (3, "ok")], [1, 2, 3]),
    "superseded by a later row": ([(1, "ok"), (2, "ok"), (3, "ok"), (1, "again")], [1, 2, 3]),
    "superseded, keys repeated alike": ([(1, "ok"), (1, "again")], [1, 1]),
    "success superseded by failure": ([(1, "ok"), (2, "ok"), (1, "failed")], [1, 2]),
    "failure superseded by success": ([(1, "failed"), (2, "ok"), (1, "ok")], [1, 2]),
    "repeated keys": ([(1, "ok"), (2, "ok")], [1, 2, 1, 1]),
    "reordered keys": ([(1, "ok"), (2, "ok"), (3, "ok")], [3, 1, 2]),
    "missing keys": ([(1, "ok"), (2, "ok")], [1, 9, 2, 8]),
    "fewer keys than rows": ([(1, "ok"), (2, "ok"), (3, "ok")], [1, 2]),
    "no keys": ([(1, "ok")], []),
    "no rows": ([], [1, 2]),
    "nothing": ([], []),
    "bad pickle superseded": ([(1, "bad"), (2, "ok"), (1, "ok")], [1, 2]),
    "bad pickle latest": ([(1, "ok"), (2, "bad")], [1, 2]),
    "bad pickle not wanted": ([(1, "ok"), (2, "bad")], [1]),
}


@pytest.mark.parametrize("other", [False, True], ids=["one version", "versions interleaved"])
@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_loads_agree_with_pure(open_store: Callable[..., Any], case: str, other: bool) -> None:
    rows, wanted = LOAD_CASES[case]
    got = _load_both(open_store, rows, wanted, other)
    assert got["rust for"] == got["python for"]
    assert got["rust all"] == got["python all"]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(0, 6), st.sampled_from(["ok", "again", "failed", "none"])),
                  max_size=12),
    wanted=st.lists(st.integers(0, 7), max_size=10),
    in_order=st.booleans(),
)
def test_loads_agree_with_pure_on_any_rows(
    tmp_path_factory: pytest.TempPathFactory,
    rows: list[tuple[int, str]],
    wanted: list[int],
    in_order: bool,
) -> None:
    if in_order:  # the keys of the rows as saved: the shape the fast path looks for
        wanted = [i for i, _ in rows]
    directory = tmp_path_factory.mktemp("loads")
    got: dict[str, Any] = {}
    blob = b"".join(_key(i) for i in wanted)
    for name in ("rust", "python"):
        store = OPENERS[name](str(directory / f"{name}.db"), "normal", 1, None)
        version = store.add_version("fp", "{}", None)
        for i, kind in rows:
            store.record(_row(i, version, kind))
        store.flush()
        got[name] = (store.outputs_for(version, blob), store.all_outputs(version))
        store.close()
    assert got["rust"] == got["python"]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 40),
    swaps=st.lists(st.tuples(st.integers(0, 39), st.integers(1, 6)), max_size=12),
    kinds=st.lists(st.tuples(st.integers(0, 39), st.sampled_from(["failed", "none", "again"])), max_size=3),
    extra=st.lists(st.tuples(st.integers(0, 41), st.sampled_from(["ok", "again", "failed"])), max_size=2),
)
def test_loads_agree_with_pure_on_nearly_ordered_rows(
    tmp_path_factory: pytest.TempPathFactory,
    n: int,
    swaps: list[tuple[int, int]],
    kinds: list[tuple[int, str]],
    extra: list[tuple[int, str]],
) -> None:
    """Rows saved as a concurrent run saves them (completion order: each a few places
    from its input's), some failed or without output, maybe a superseding row or one of
    a key not asked for: the keys asked for in input order, as load() asks."""
    order = list(range(n))
    for at, distance in swaps:  # each swap moves a row a few places
        if at + distance < n:
            order[at], order[at + distance] = order[at + distance], order[at]
    kind_of = dict(kinds)
    rows = [(i, kind_of.get(i, "ok")) for i in order] + extra
    directory = tmp_path_factory.mktemp("nearly")
    blob = b"".join(_key(i) for i in range(n))
    got: dict[str, Any] = {}
    for name in ("rust", "python"):
        store = OPENERS[name](str(directory / f"{name}.db"), "normal", 1, None)
        version = store.add_version("fp", "{}", None)
        for i, kind in rows:
            store.record(_row(i, version, kind))
        store.flush()
        got[name] = store.outputs_for(version, blob)
        store.close()
    assert got["rust"] == got["python"]
    latest = {i: kind for i, kind in rows}
    expected = [f"{'again' if latest[i] == 'again' else 'out'} {i}" for i in range(n) if latest[i] in ("ok", "again")]
    assert got["rust"] == expected


@pytest.mark.parametrize("late", ["none", "superseding row", "repeated key", "bad pickle"])
def test_long_loads_agree_with_pure(open_store: Callable[..., Any], late: str) -> None:
    """Many chunks of outputs: a reason to leave the fast path found only at the end."""
    n = 20_000
    rows = [(i, "ok") for i in range(n)]
    wanted = list(range(n))
    if late == "superseding row":
        rows.append((5, "again"))
    elif late == "repeated key":
        rows.append((5, "again"))
        wanted.append(5)
    elif late == "bad pickle":
        rows[n - 10] = (n - 10, "bad")
        rows.append((n - 10, "ok"))
    got = _load_both(open_store, rows, wanted)
    assert got["rust for"] == got["python for"]
    assert got["rust all"] == got["python all"]
    if late == "none":
        assert got["rust for"] == [f"out {i}" for i in range(n)]


@pytest.mark.parametrize("shape", ["finished", "with a retried failure"])
def test_key_sets_of_a_finished_run_claim_as_pure_does(open_store: Callable[..., Any], shape: str) -> None:
    """A finished run's ok keys come back as the list the scan found (claims in that
    order need no table): every use must still answer as the pure backend's set."""
    results = {}
    for name in ("rust", "python"):
        store = open_store(f"{name}.db", with_=name)
        version = store.add_version("fp", "{}", None)
        for i in range(3000):
            store.record(_ok(i, version, i))
        if shape != "finished":
            store.record(_failed(3000, version))
            store.record(_ok(3000, version, 3000))
        store.flush()
        ok, failed = store.key_sets(version)
        seen: list[Any] = [len(ok), len(failed)]
        blob = b"".join(_key(i) for i in range(3010))
        for start, end in [(0, 1024), (1024, 2048), (2048, 3010), (5, 7)]:
            seen.append(ok.claim(blob[16 * start : 16 * end]))
            seen.append(len(ok))
        seen.append(_key(3005) in ok)
        ok2, _ = store.key_sets(version)
        seen.append(sorted(ok2) == sorted(_key(i) for i in range(3000 + (shape != "finished"))))
        seen.append(_key(17) in ok2)
        ok2.add(_key(5000))
        seen.append(len(ok2))
        results[name] = seen
    assert results["rust"] == results["python"]


def test_key_sets_of_a_large_checkpoint_agree_with_pure(open_store: Callable[..., Any]) -> None:
    """Past 100,000 rows the core scans the table in two halves of `seq` on two threads
    (rust/store.rs SPLIT_SCAN_ROWS): failures, superseding rows and another version's
    rows on both sides of the middle must give exactly the key sets of one scan."""
    n = 120_000
    blob = _core.input_keys(list(range(n + 1)))
    key = [blob[16 * i : 16 * i + 16] for i in range(n + 1)]
    output = pickle.dumps("out", protocol=4)
    results = {}
    for name in ("rust", "python"):
        store = open_store(f"{name}.db", with_=name, batch_size=10_000)
        v1 = store.add_version("fp", "{}", None)
        v2 = store.add_version("fp2", "{}", None)
        for i in range(n):
            status = STATUS_FAILED if i % 1000 == 7 else STATUS_OK
            store.record((key[i], v1, status, None, output if status == STATUS_OK else None,
                          None, None, None, 1, 0.0, 0.0))
            if i % 3 == 0:  # another version's rows, interleaved
                store.record((key[i], v2, STATUS_OK, None, output, None, None, None, 1, 0.0, 0.0))
            if i % 5000 == 11:  # supersedes a key saved in the other half
                store.record((key[n - i], v1, STATUS_FAILED, None, None, None, None, None, 1, 0.0, 0.0))
            if i % 5000 == 13 and i > 100:  # a failure retried, across the middle too
                store.record((key[i - 100 if i < n // 2 else i - n // 2], v1, STATUS_OK, None, output,
                              None, None, None, 2, 0.0, 0.0))
        store.flush()
        results[name] = [[sorted(keys) for keys in store.key_sets(v)] for v in (v1, v2, v2 + 1)]
    assert results["rust"] == results["python"]
    ok, failed = results["rust"][0]
    assert len(ok) + len(failed) == n and len(failed) > 100


_SIMPLE_VALUES: list[object] = [
    0, 1, 255, 256, 65535, 65536, -1, -255, -256, 2**31 - 1, 2**31, -2**31, -2**31 - 1,
    2**62, 2**63 - 1, 2**63, -2**63, -2**63 - 1, 2**200, -2**200,
    0.0, -0.0, 1.5, -1e300, 5e-324, math.inf, -math.inf, math.nan,
    None, True, False, "", "hi", "h\u00e9", "\U0001f600", "x" * 255, "x" * 256, "\ud800",
    b"", b"bytes", [], [1], (1, 2), {"a": 1}, Color.RED, Name("sub"), 1 + 2j,
]


def _same(a: object, b: object) -> bool:
    """Equal, of the same type, and the same float bits (nan, -0.0)."""
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("path", ["in order", "general"])
def test_loads_read_simple_outputs_exactly_as_pickle_does(open_store: Callable[..., Any], path: str) -> None:
    """Ints, floats, None, bools and short strs are read without pickle.loads: the
    values must be the very ones pickle.loads gives, and everything else unpickled."""
    store = open_store()
    version = store.add_version("fp", "{}", None)
    for i, value in enumerate(_SIMPLE_VALUES):
        store.record(_ok(i, version, value))
    if path == "general":  # a superseding row sends the load the general way
        store.record(_ok(0, version, 0))
    store.flush()
    keys_blob = b"".join(_key(i) for i in range(len(_SIMPLE_VALUES)))
    for got in (store.outputs_for(version, keys_blob), store.all_outputs(version)):
        assert len(got) == len(_SIMPLE_VALUES)
        for value, read in zip(_SIMPLE_VALUES, got):
            assert _same(pickle.loads(pickle.dumps(value, protocol=4)), read), (value, read)


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.one_of(st.integers(), st.floats(), st.text(max_size=300), st.none(),
                                  st.booleans(), st.binary(max_size=5)), max_size=30))
def test_loads_read_any_scalars_as_pickle_does(
    tmp_path_factory: pytest.TempPathFactory, values: list[object]
) -> None:
    store = _core.open_sqlite(str(tmp_path_factory.mktemp("scalars") / "run.db"), "normal", 1, None)
    version = store.add_version("fp", "{}", None)
    for i, value in enumerate(values):
        store.record(_ok(i, version, value))
    store.flush()
    got = store.outputs_for(version, b"".join(_key(i) for i in range(len(values))))
    store.close()
    assert len(got) == len(values)
    assert all(_same(value, read) for value, read in zip(values, got))


def test_new_file_is_private_and_says_who_made_it(tmp_path: Path, open_store: Callable[..., Any]) -> None:
    open_store("fresh.db").close()
    path = tmp_path / "fresh.db"
    assert path.stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == 1399742800
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        meta = dict(conn.execute("SELECT name, value FROM meta"))
    conn.close()
    assert meta == {"format_version": "2", "created_by": f"snapperable {snapperable.__version__}"}


def test_rows_iterate_across_pages(open_store: Callable[..., Any]) -> None:
    store = open_store(batch_size=500)
    version = store.add_version("fp", "{}", None)
    for i in range(2500):
        store.record(_ok(i, version, i))
    store.flush()
    rows = store.rows(version)
    assert iter(rows) is rows
    assert [row.seq for row in rows] == list(range(1, 2501))
    assert store.all_outputs(version) == list(range(2500))


def test_records_from_many_threads_are_all_saved(open_store: Callable[..., Any]) -> None:
    store = open_store()
    version = store.add_version("fp", "{}", None)

    def work(start: int) -> None:
        for i in range(start, start + 300):
            store.record(_ok(i, version, i))

    threads = [threading.Thread(target=work, args=(n * 1000,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.flush()
    assert len(store.key_set(version, STATUS_OK)) == 1200


def test_max_wait_time_commits_without_flush(open_store: Callable[..., Any]) -> None:
    store = open_store(batch_size=10_000, max_wait_time=0.05)
    version = store.add_version("fp", "{}", None)
    store.record(_ok(1, version, 1))
    deadline = time.monotonic() + 10
    while len(store.key_set(version, STATUS_OK)) == 0:
        assert time.monotonic() < deadline, "the row was never committed"
        time.sleep(0.01)


def test_writer_failure_is_raised_as_writer_error(tmp_path: Path, open_store: Callable[..., Any]) -> None:
    store = open_store()
    version = store.add_version("fp", "{}", None)
    # Another process (so another SQLite library instance, as a user's tool would be)
    # drops the table under the open checkpoint.
    drop = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('DROP TABLE items'); c.commit()"
    subprocess.run([sys.executable, "-c", drop, str(tmp_path / "run.db")], check=True)
    store.record(_ok(1, version, 1))
    with pytest.raises(WriterError) as info:
        store.flush()
    assert str(tmp_path / "run.db") in str(info.value)
    assert "no such table" in str(info.value)
    assert isinstance(info.value.__cause__, CheckpointError)
    with pytest.raises(WriterError):
        store.record(_ok(2, version, 2))  # nothing after a failure can be saved
    with pytest.raises(WriterError):
        store.close()
    store.close()  # idempotent


def test_non_database_file_is_corrupt_and_kept(tmp_path: Path, open_store: Callable[..., Any]) -> None:
    path = tmp_path / "notes.db"
    text = b"not a database, but precious\n" * 100
    path.write_bytes(text)
    with pytest.raises(CheckpointCorruptError) as info:
        open_store("notes.db")
    assert str(path) in str(info.value)
    assert path.read_bytes() == text


def test_foreign_database_and_newer_format_are_refused(tmp_path: Path, open_store: Callable[..., Any]) -> None:
    with sqlite3.connect(tmp_path / "other.db") as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(CheckpointCorruptError, match="is not a snapperable checkpoint"):
        open_store("other.db")

    open_store("newer.db").close()
    conn = sqlite3.connect(tmp_path / "newer.db")
    conn.execute("PRAGMA user_version = 3")
    conn.close()
    with pytest.raises(CheckpointFormatError, match="newer.db"):
        open_store("newer.db")


def test_damaged_rows_are_corrupt(tmp_path: Path, open_store: Callable[..., Any]) -> None:
    open_store("bad.db").close()
    conn = sqlite3.connect(tmp_path / "bad.db")
    # Written so (its checksum matches), not damaged on disk: still not an output.
    conn.execute("INSERT INTO items (key, version, status, output, attempts, started, ended, checksum)"
                 " VALUES (?, 1, 0, ?, 1, 0, 0, ?)",
                 (_key(1), b"not a pickle", plain_ok_checksum(_key(1), 1, 0.0, 0.0, b"not a pickle")))
    conn.commit()
    conn.close()
    store = open_store("bad.db")
    with pytest.raises(CheckpointCorruptError, match="unpickled"):
        store.all_outputs(1)
    store.close()

    conn = sqlite3.connect(tmp_path / "bad.db")
    conn.execute("INSERT INTO items (key, version, status, attempts, started, ended, checksum)"
                 " VALUES (x'00', 1, 0, 1, 0, 0, 0)")
    conn.commit()
    conn.close()
    with pytest.raises(CheckpointCorruptError, match="16 bytes"):
        open_store("bad.db").key_set(None, STATUS_OK)


@pytest.mark.parametrize("with_", sorted(OPENERS))
def test_damaged_version_record_is_corrupt(tmp_path: Path, open_store: Callable[..., Any], with_: str) -> None:
    open_store("v.db", with_=with_).close()
    conn = sqlite3.connect(tmp_path / "v.db")
    # A record whose checksum matches (written so, not damaged on disk) but whose parts
    # are not JSON: still no version.
    record = (1, "fp", "{not json", 1, 0.0)
    conn.execute(
        "INSERT INTO versions (id, fingerprint, parts, uses, created, checksum) VALUES (?, ?, ?, ?, ?, ?)",
        (*record, version_checksum(*record)),
    )
    conn.commit()
    conn.close()
    with pytest.raises(CheckpointCorruptError, match="v.db"):
        open_store("v.db", with_=with_).versions()


def test_arguments_are_checked(open_store: Callable[..., Any]) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        open_store(synchronous="fast")
    with pytest.raises(ValueError, match="batch_size"):
        open_store(batch_size=0)
    with pytest.raises(ValueError, match="max_wait_time"):
        open_store(max_wait_time=-1.0)
    store = open_store(synchronous="normal", max_wait_time=math.inf)
    with pytest.raises(ValueError):
        store.record((b"short", 1, 0, None, b"", None, None, None, 1, 0.0, 0.0))
    with pytest.raises(TypeError):
        store.record(("not", "a", "row"))


def test_closed_store_refuses_work(open_store: Callable[..., Any]) -> None:
    store = open_store()
    store.close()
    store.close()
    with pytest.raises(CheckpointError, match="closed"):
        store.versions()
    with pytest.raises(CheckpointError, match="closed"):
        store.record(_ok(1, 1, 1))


def test_path_is_the_given_str(tmp_path: Path, open_store: Callable[..., Any]) -> None:
    store = open_store()
    assert store.path == str(tmp_path / "run.db")
    assert os.path.exists(store.path)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@forks_with_threads
def test_forked_child_cannot_use_the_checkpoint_and_does_not_hang(open_store: Callable[..., Any]) -> None:
    store = open_store(batch_size=1000)
    version = store.add_version("fp", "{}", None)
    store.record(_ok(1, version, 1))
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
        tmp_path: Path, open_store: Callable[..., Any]) -> None:
    """A parent thread inside ``close``, joining a writer stuck in a commit, holds a lock
    at the fork. That lock stays held in the child, where the thread does not exist: the
    child's ``close`` must refuse before taking any lock, not wait for it forever."""
    store = open_store(batch_size=1)
    version = store.add_version("fp", "{}", None)
    # Another process holds the write lock: the writer's commit waits in the busy timeout.
    blocker = subprocess.Popen(
        [sys.executable, "-c", _HOLD_WRITE_LOCK, str(tmp_path / "run.db")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert blocker.stdout is not None and blocker.stdin is not None
    assert blocker.stdout.readline() == "locked\n"
    store.record(_ok(1, version, 1))
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
        open_store: Callable[..., Any]) -> None:
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
            store.record(_ok(i, version, i))
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


# -- process: the per-item hot loop ------------------------------------------------------


def _plus_one(x: int) -> int:
    return x + 1


def _saved(store: Any, version: int) -> list[Any]:
    store.flush()
    return list(store.all_outputs(version))


def _item_rows(store: Any, version: int) -> list[tuple[Any, ...]]:
    """Rows of ``version`` without seq and times, which differ between runs."""
    store.flush()
    return [(r.key, r.version, r.status, r.input, r.error_type, r.error, r.traceback, r.attempts)
            for r in store.rows(version)]


@pytest.mark.parametrize("with_", ["rust", "python"])
def test_process_records_rows_in_order(open_store: Callable[..., Any], with_: str) -> None:
    store = open_store(with_=with_)
    version = store.add_version("fp", "{}", None)
    items = [10, 11, 12, 13, 14]
    blob = _core.input_keys(items)
    before = time.time()
    assert store.process(_plus_one, items, blob, [4, 0, 2], version) is None
    after = time.time()
    assert store.process(_plus_one, items, blob, [], version) is None
    store.flush()
    rows = list(store.rows(version))
    assert [r.key for r in rows] == [_key(14), _key(10), _key(12)]
    for r in rows:
        assert (r.version, r.status, r.input, r.error_type, r.error, r.traceback, r.attempts) == (
            version, STATUS_OK, None, None, None, None, 1)
        assert before <= r.started <= r.ended <= after
    assert [r.started for r in rows] == sorted(r.started for r in rows)
    assert _saved(store, version) == [15, 11, 13]
    assert store.outputs_for(version, blob) == [11, 13, 15]


def test_process_matches_pure_backend(open_store: Callable[..., Any]) -> None:
    items: list[Any] = [None, "a", ("t", 1), {"d": [1.5]}, Point(1, "p"), 2**70, b"raw"]
    blob = _core.input_keys(items)
    positions = [6, 1, 0, 3, 5, 2, 4]
    results = {}
    for with_ in ("rust", "python"):
        store = open_store(f"{with_}.db", with_=with_)
        version = store.add_version("fp", "{}", None)
        assert store.process(repr, items, blob, positions, version) is None
        results[with_] = (_item_rows(store, version), store.all_outputs(version))
    assert results["rust"] == results["python"]
    assert results["rust"][1] == [repr(items[p]) for p in positions]


def test_process_reads_any_sequence(open_store: Callable[..., Any]) -> None:
    store = open_store()
    version = store.add_version("fp", "{}", None)
    blob = _core.input_keys(list(range(6)))
    assert store.process(_plus_one, (0, 1, 2), blob, (2,), version) is None
    assert store.process(_plus_one, range(6), blob, range(3, 5), version) is None
    store.flush()
    assert _saved(store, version) == [3, 4, 5]


@pytest.mark.parametrize("with_", ["rust", "python"])
def test_process_stops_at_an_exception_from_fn(open_store: Callable[..., Any], with_: str) -> None:
    store = open_store(with_=with_)
    version = store.add_version("fp", "{}", None)
    raised: list[BaseException] = []

    def fn(x: int) -> int:
        if x == 3:
            raised.append(ValueError(f"bad {x}"))
            raise raised[-1]
        return x * 10

    items = list(range(6))
    blob = _core.input_keys(items)
    before = time.time()
    stop = store.process(fn, items, blob, [0, 1, 3, 4, 5], version)
    after = time.time()
    assert stop is not None
    index, started, exc, by_pickling, output = stop
    assert (index, by_pickling, output) == (2, False, None)
    assert exc is raised[0]
    assert exc.__traceback__ is not None  # the user's frame, for the failure report
    assert before <= started <= after
    # The items before it are recorded, nothing for it or after it.
    assert _saved(store, version) == [0, 10]
    # The Snapper goes on after it.
    assert store.process(fn, items, blob, [4, 5], version) is None
    assert _saved(store, version) == [0, 10, 40, 50]


@pytest.mark.parametrize("with_", ["rust", "python"])
def test_process_stops_at_an_unpicklable_output(open_store: Callable[..., Any], with_: str) -> None:
    store = open_store(with_=with_)
    version = store.add_version("fp", "{}", None)
    unpicklable = threading.Lock()
    items = [1, 2, 3]
    blob = _core.input_keys(items)
    stop = store.process(lambda x: unpicklable if x == 2 else x, items, blob, [0, 1, 2], version)
    assert stop is not None
    index, _, exc, by_pickling, output = stop
    assert (index, by_pickling) == (1, True)
    assert output is unpicklable
    assert isinstance(exc, TypeError)
    assert _saved(store, version) == [1]


def test_process_returns_base_exceptions_too(open_store: Callable[..., Any]) -> None:
    store = open_store()
    version = store.add_version("fp", "{}", None)

    def fn(x: int) -> int:
        raise KeyboardInterrupt

    stop = store.process(fn, [1], _key(1), [0], version)
    assert stop is not None and isinstance(stop[2], KeyboardInterrupt)


def test_process_checks_its_arguments_before_any_item(open_store: Callable[..., Any]) -> None:
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
        store.process(fn, items, blob, ["0"], version)
    assert calls == []
    assert _saved(store, version) == []


def test_process_raises_writer_failure_and_closed(tmp_path: Path, open_store: Callable[..., Any]) -> None:
    store = open_store()
    version = store.add_version("fp", "{}", None)
    drop = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('DROP TABLE items'); c.commit()"
    subprocess.run([sys.executable, "-c", drop, str(tmp_path / "run.db")], check=True)
    calls: list[int] = []

    def fn(x: int) -> int:
        calls.append(x)
        return x

    blob = _core.input_keys([0, 1])
    assert store.process(fn, [0, 1], blob, [0], version) is None
    with pytest.raises(WriterError):
        store.flush()
    with pytest.raises(WriterError):
        store.process(fn, [0, 1], blob, [1], version)
    assert calls == [0]  # no call for a row that could not be saved
    with pytest.raises(WriterError):
        store.close()
    other = open_store("other.db")
    other.close()
    with pytest.raises(CheckpointError, match="closed"):
        other.process(fn, [0, 1], blob, [1], version)
    assert calls == [0]


def test_process_keeps_rows_visible_to_the_writer(tmp_path: Path, open_store: Callable[..., Any]) -> None:
    """batch_size=1: each row is committed while the next item runs, not held back."""
    store = open_store(synchronous="normal")
    version = store.add_version("fp", "{}", None)
    reader = sqlite3.connect(str(tmp_path / "run.db"))

    def fn(x: int) -> int:
        deadline = time.monotonic() + 10
        while reader.execute("SELECT count(*) FROM items").fetchone()[0] < x:
            assert time.monotonic() < deadline, f"row {x - 1} not committed while item {x} runs"
            time.sleep(0.001)
        return x

    items = list(range(5))
    try:
        assert store.process(fn, items, _core.input_keys(items), items, version) is None
    finally:
        reader.close()
    assert _saved(store, version) == items


_HOLD_WRITE_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""


def _settled(counter: list[int]) -> int:
    """``counter[0]`` once it has not moved for 0.2 s."""
    last = counter[0]
    while True:
        time.sleep(0.2)
        if counter[0] == last:
            return last
        last = counter[0]


@pytest.mark.parametrize("with_", ["rust", "python"])
@pytest.mark.parametrize("via", ["record", "process"])
def test_a_lagging_writer_bounds_the_pending_rows(
    tmp_path: Path, open_store: Callable[..., Any], with_: str, via: str
) -> None:
    """A writer stuck on the disk (here: another connection holds the write lock, so
    its commit waits in the busy timeout) makes the caller wait once the pending buffer
    is full, without the GIL: memory and what a crash can lose stay bounded."""
    from snapperable import _writer

    limit = _core._MAX_PENDING_ROWS if with_ == "rust" else _writer.MAX_PENDING_ROWS
    assert limit == 16_384
    store = open_store(with_=with_, synchronous="normal")
    version = store.add_version("fp", "{}", None)
    # The writer takes at most one buffer before its commit blocks, and one more fills.
    # (The pure store's writer process pipelines: one buffer may be committing and the
    # next on its way to it.)
    taken = 2 if with_ == "python" and writer_process_forced() else 1
    n = (taken + 1) * limit + 500
    done = [0]
    errors: list[BaseException] = []

    def fn(x: int) -> int:
        done[0] += 1
        return x

    def work() -> None:
        try:
            if via == "record":
                for i in range(n):
                    store.record((blob[16 * i : 16 * i + 16], version, STATUS_OK, None, b"\x80\x04K\x00.",
                                  None, None, None, 1, 0.0, 0.0))
                    done[0] += 1
            else:
                assert store.process(fn, items, blob, items, version) is None
        except BaseException as exc:
            errors.append(exc)

    items = list(range(n))
    blob = _core.input_keys(items)
    # In another process: POSIX locks do not exclude connections of one process that
    # use two copies of SQLite (the Rust core bundles its own).
    blocker = subprocess.Popen(
        [sys.executable, "-c", _HOLD_WRITE_LOCK, str(tmp_path / "run.db")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert blocker.stdout is not None and blocker.stdin is not None
    assert blocker.stdout.readline() == "locked\n"
    worker = threading.Thread(target=work)
    try:
        worker.start()
        # This thread keeps running: the caller waits with the GIL released.
        stuck = _settled(done)
        assert limit - 1 <= stuck <= (taken + 1) * limit, stuck
        assert worker.is_alive(), errors
    finally:
        blocker.communicate("commit\n")
        worker.join()
    assert errors == []
    store.flush()
    assert len(store.key_set(version, STATUS_OK)) == n


def _saved_pickles(path: Path, version: int) -> list[bytes]:
    conn = sqlite3.connect(str(path))
    try:
        return [row[0] for row in conn.execute("SELECT output FROM items WHERE version = ? ORDER BY seq",
                                               (version,))]
    finally:
        conn.close()


_DUMPED_VALUES: list[object] = _SIMPLE_VALUES + [
    2**64, -2**64, 2**64 - 1, -2**64 + 1, -2**31 + 1, -2**15, -129, 127, 128, 4.0, 1e-310,
    False, Color.GREEN, True, "long " * 100,
]


def test_process_pickles_simple_outputs_to_the_bytes_pickle_gives(tmp_path: Path, open_store: Callable[..., Any]) -> None:
    """process() pickles ints, floats, None and bools itself: byte for byte what
    pickle.dumps(output, 4) gives, so files do not depend on the backend."""
    store = open_store()
    version = store.add_version("fp", "{}", None)
    items = list(range(len(_DUMPED_VALUES)))
    assert store.process(_DUMPED_VALUES.__getitem__, items, _core.input_keys(items), items, version) is None
    store.flush()
    expected = [pickle.dumps(value, protocol=4) for value in _DUMPED_VALUES]
    assert _saved_pickles(tmp_path / "run.db", version) == expected


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.one_of(st.integers(), st.floats(), st.none(), st.booleans()), max_size=40))
def test_process_pickles_any_scalar_as_pickle_does(
    tmp_path_factory: pytest.TempPathFactory, values: list[object]
) -> None:
    path = tmp_path_factory.mktemp("dumps") / "run.db"
    store = _core.open_sqlite(str(path), "normal", 1, None)
    version = store.add_version("fp", "{}", None)
    items = list(range(len(values)))
    assert store.process(values.__getitem__, items, _core.input_keys(items), items, version) is None
    store.close()
    assert _saved_pickles(path, version) == [pickle.dumps(value, protocol=4) for value in values]


def test_process_keeps_no_python_objects(open_store: Callable[..., Any]) -> None:
    store = open_store()
    version = store.add_version("fp", "{}", None)

    class Box:
        def __init__(self, x: int) -> None:
            self.x = x

    items = [Box(i) for i in range(50)]
    refs_before = [sys.getrefcount(item) for item in items]
    outputs: list[Any] = []

    def fn(box: Box) -> Any:
        out = Point(box.x, "o")
        outputs.append(weakref.ref(out))
        return out

    assert store.process(fn, items, _core.input_keys(list(range(50))), list(range(50)), version) is None
    stop = store.process(lambda box: threading.Lock(), items, _core.input_keys(list(range(50))), [0], version)
    assert stop is not None
    del stop
    gc.collect()
    assert [sys.getrefcount(item) for item in items] == refs_before
    assert all(ref() is None for ref in outputs)


def test_process_survives_fn_shrinking_the_list(open_store: Callable[..., Any]) -> None:
    store = open_store()
    version = store.add_version("fp", "{}", None)
    items = [0, 1, 2, 3]
    blob = _core.input_keys(items)

    def fn(x: int) -> int:
        items.clear()
        return x

    with pytest.raises(IndexError):
        store.process(fn, items, blob, [0, 1], version)
    assert _saved(store, version) == [0]


# -- found in review: damage and re-entrance must not crash or hang the process -------
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
