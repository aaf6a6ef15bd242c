"""The Rust core against the pure-Python reference, byte for byte.

Each test gives both backends (or the Rust core and the reference it mirrors:
``snapperable.keys``, ``pickle``) the same input, mostly drawn by hypothesis, and
requires the same answer: the same keys, the same errors, the same rows and outputs
read back, files each can resume. What each backend must do on its own is
``test_store_contract.py`` and ``test_keys.py``; Rust-only concerns are
``test_rust_core.py``.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
import threading
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import INSTALLED_BACKENDS, StoreOpener, skip_module_unless_backends
from samples import Color, ExplodingReduce, Name, Point, failed_row, fill, key, ok_row, same, saved_pickles, snapshot
from snapperable import keys
from snapperable._contract import KEY_SIZE, STATUS_FAILED, STATUS_OK, CheckpointStore, ItemRow
from snapperable.errors import CheckpointCorruptError

skip_module_unless_backends("rust", "python")
from snapperable import _core  # noqa: E402  (typed import, after the skip)


@pytest.fixture(autouse=True)
def backend() -> str:
    """Overrides the suite's two-backend fixture: these tests name both backends."""
    return "rust"


# -- input keys -------------------------------------------------------------------------


def _float_from_hex(text: str) -> float:
    value: float = struct.unpack(">d", bytes.fromhex(text))[0]
    return value


# Floats hypothesis seldom draws (test_keys.py pins the encoding of these and of the
# usual odd ones: 0.0, -0.0, infinities, NaN).
ODD_FLOATS = [
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


@pytest.mark.parametrize(
    "make",
    [
        lambda: lambda: None,
        lambda: [1, threading.Lock()],
        lambda: {"k": (threading.Lock(),)},
        lambda: {frozenset({1}), Point(1, "a")} | {ExplodingReduce(ValueError("nope"))},
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


# -- SQLite checkpoints: what each backend reads back -----------------------------------


def test_agrees_with_pure_backend_and_reads_its_files(open_store: StoreOpener) -> None:
    snapshots = {}
    for name in ("rust", "python"):
        store = open_store(f"{name}.db", with_=name)
        snapshots[name] = snapshot(store, *fill(store))
        store.close()
    assert snapshots["rust"] == snapshots["python"]
    # each backend resumes the other's file
    for writer, reader in (("rust", "python"), ("python", "rust")):
        store = open_store(f"{writer}.db", with_=reader)
        assert snapshot(store, 1, 2) == snapshots[writer]
        store.close()


# -- loads: the in-order fast path and the general one ------------------------------------
# A load streams the outputs while it checks the rows are one per wanted key, in order
# or nearly (a window of rows out of place, as a concurrent run saves them), with no key
# twice; anything else (a later row superseding an earlier one, repeated,
# reordered or missing keys) must give exactly what the pure backend gives.

_BAD_PICKLE = b"\x80\x04not a pickle"


def _row(i: int, version: int, kind: str) -> ItemRow:
    if kind == "ok":
        return ok_row(i, version, f"out {i}")
    if kind == "again":
        return ok_row(i, version, f"again {i}")
    if kind == "none":  # ok without an output: read as no output, as the pure backend does
        return (key(i), version, STATUS_OK, None, None, None, None, None, 1, 0.0, 0.0)
    if kind == "bad":
        return (key(i), version, STATUS_OK, None, _BAD_PICKLE, None, None, None, 1, 0.0, 0.0)
    assert kind == "failed"
    return failed_row(i, version)


def _load_both(
    open_store: StoreOpener, rows: list[tuple[int, str]], wanted: list[int], other: bool = False
) -> dict[str, Any]:
    """outputs_for(wanted) and all_outputs from each backend, or the error each raised."""
    got: dict[str, Any] = {}
    blob = b"".join(key(i) for i in wanted)
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
    "nearly in order": ([(2, "ok"), (1, "ok"), (3, "ok"), (5, "failed"), (4, "ok")], [1, 2, 3, 4, 5]),
    "nearly in order, then superseded": ([(2, "ok"), (1, "ok"), (3, "ok"), (2, "again")], [1, 2, 3]),
    "nearly in order, a second early row": ([(2, "ok"), (2, "again"), (1, "ok")], [1, 2]),
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
def test_loads_agree_with_pure(open_store: StoreOpener, case: str, other: bool) -> None:
    rows, wanted = LOAD_CASES[case]
    got = _load_both(open_store, rows, wanted, other)
    assert got["rust for"] == got["python for"]
    assert got["rust all"] == got["python all"]


def _loaded_by_each(directory: Any, rows: list[tuple[int, str]], wanted: list[int]) -> dict[str, Any]:
    """``(outputs_for(wanted), all_outputs())`` of each backend's store of ``rows``."""
    got: dict[str, Any] = {}
    blob = b"".join(key(i) for i in wanted)
    for name in ("rust", "python"):
        store = INSTALLED_BACKENDS[name].open_sqlite(str(directory / f"{name}.db"), "normal", 1, None)
        version = store.add_version("fp", "{}", None)
        for i, kind in rows:
            store.record(_row(i, version, kind))
        store.flush()
        got[name] = (store.outputs_for(version, blob), store.all_outputs(version))
        store.close()
    return got


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
    got = _loaded_by_each(tmp_path_factory.mktemp("loads"), rows, wanted)
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
    got = _loaded_by_each(tmp_path_factory.mktemp("nearly"), rows, list(range(n)))
    assert got["rust"] == got["python"]
    latest = dict(rows)
    expected = [f"{'again' if latest[i] == 'again' else 'out'} {i}" for i in range(n) if latest[i] in ("ok", "again")]
    assert got["rust"][0] == expected


@pytest.mark.parametrize("late", ["none", "superseding row", "repeated key", "bad pickle"])
def test_long_loads_agree_with_pure(open_store: StoreOpener, late: str) -> None:
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


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.one_of(st.integers(), st.floats(), st.text(max_size=300), st.none(),
                                  st.booleans(), st.binary(max_size=5)), max_size=30))
def test_loads_read_any_scalars_as_pickle_does(
    tmp_path_factory: pytest.TempPathFactory, values: list[object]
) -> None:
    store = _core.open_sqlite(str(tmp_path_factory.mktemp("scalars") / "run.db"), "normal", 1, None)
    version = store.add_version("fp", "{}", None)
    for i, value in enumerate(values):
        store.record(ok_row(i, version, value))
    store.flush()
    got = store.outputs_for(version, b"".join(key(i) for i in range(len(values))))
    store.close()
    assert len(got) == len(values)
    assert all(same(value, read) for value, read in zip(values, got))


# -- key sets read from a checkpoint ------------------------------------------------------


@pytest.mark.parametrize("shape", ["finished", "with a retried failure"])
def test_key_sets_of_a_finished_run_claim_as_pure_does(open_store: StoreOpener, shape: str) -> None:
    """A finished run's ok keys come back as the list the scan found (claims in that
    order need no table): every use must still answer as the pure backend's set."""
    results = {}
    for name in ("rust", "python"):
        store = open_store(f"{name}.db", with_=name)
        version = store.add_version("fp", "{}", None)
        for i in range(3000):
            store.record(ok_row(i, version, i))
        if shape != "finished":
            store.record(failed_row(3000, version))
            store.record(ok_row(3000, version, 3000))
        store.flush()
        ok, failed = store.key_sets(version)
        seen: list[Any] = [len(ok), len(failed)]
        blob = b"".join(key(i) for i in range(3010))
        for start, end in [(0, 1024), (1024, 2048), (2048, 3010), (5, 7)]:
            seen.append(ok.claim(blob[16 * start : 16 * end]))
            seen.append(len(ok))
        seen.append(key(3005) in ok)
        ok2, _ = store.key_sets(version)
        seen.append(sorted(ok2) == sorted(key(i) for i in range(3000 + (shape != "finished"))))
        seen.append(key(17) in ok2)
        ok2.add(key(5000))
        seen.append(len(ok2))
        results[name] = seen
    assert results["rust"] == results["python"]


def test_key_sets_of_a_large_checkpoint_agree_with_pure(open_store: StoreOpener) -> None:
    """Past 100,000 rows the core scans the table in two halves of `seq` on two threads
    (SPLIT_SCAN_ROWS in rust/store/key_scan.rs): failures, superseding rows and another version's
    rows on both sides of the middle must give exactly the key sets of one scan."""
    n = 120_000
    blob = _core.input_keys(list(range(n + 1)))
    keys_ = [blob[16 * i : 16 * i + 16] for i in range(n + 1)]
    output = pickle.dumps("out", protocol=4)
    results = {}
    for name in ("rust", "python"):
        store = open_store(f"{name}.db", with_=name, batch_size=10_000)
        v1 = store.add_version("fp", "{}", None)
        v2 = store.add_version("fp2", "{}", None)
        for i in range(n):
            status = STATUS_FAILED if i % 1000 == 7 else STATUS_OK
            store.record((keys_[i], v1, status, None, output if status == STATUS_OK else None,
                          None, None, None, 1, 0.0, 0.0))
            if i % 3 == 0:  # another version's rows, interleaved
                store.record((keys_[i], v2, STATUS_OK, None, output, None, None, None, 1, 0.0, 0.0))
            if i % 5000 == 11:  # supersedes a key saved in the other half
                store.record((keys_[n - i], v1, STATUS_FAILED, None, None, None, None, None, 1, 0.0, 0.0))
            if i % 5000 == 13 and i > 100:  # a failure retried, across the middle too
                store.record((keys_[i - 100 if i < n // 2 else i - n // 2], v1, STATUS_OK, None, output,
                              None, None, None, 2, 0.0, 0.0))
        store.flush()
        results[name] = [[sorted(keys) for keys in store.key_sets(v)] for v in (v1, v2, v2 + 1)]
    assert results["rust"] == results["python"]
    ok, failed = results["rust"][0]
    assert len(ok) + len(failed) == n and len(failed) > 100


# -- process: the per-item hot loop ------------------------------------------------------


def _item_rows(store: CheckpointStore, version: int) -> list[tuple[Any, ...]]:
    """Rows of ``version`` without seq and times, which differ between runs."""
    store.flush()
    return [(r.key, r.version, r.status, r.input, r.error_type, r.error, r.traceback, r.attempts)
            for r in store.rows(version)]


def test_process_matches_pure_backend(open_store: StoreOpener) -> None:
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
    assert saved_pickles(path, version) == [pickle.dumps(value, protocol=4) for value in values]
