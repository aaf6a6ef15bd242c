"""Keys of namedtuples that cannot be pickled (issue 11, item 10), such as the rows of
``pandas.DataFrame.itertuples()``, whose class is made on the fly: keyed by their field
names and values (``N``), byte for byte the same in both backends. A namedtuple that
pickles keeps its ``p`` key, so existing checkpoints keep their keys."""

from __future__ import annotations

import keyword
import pickle
import struct
from collections import namedtuple
from hashlib import blake2b
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import BACKENDS
from snapperable import Snapper, SnapshotStorage, _backend
from snapperable.keys import canon


def itertuples_like(fields: list[str], rows: list[tuple[Any, ...]]) -> list[Any]:
    """Rows as pandas' itertuples() gives them: a namedtuple class made on each call,
    named "Pandas", which pickle cannot find by name."""
    Pandas = namedtuple("Pandas", fields)  # type: ignore[misc]  # made on the fly, as pandas does
    return [Pandas(*row) for row in rows]


class Picklable(NamedTuple):
    x: int


def test_an_itertuples_row_cannot_be_pickled_but_has_a_key() -> None:
    (row,) = itertuples_like(["Index", "name", "score"], [(0, "a", 1.5)])
    with pytest.raises(Exception):
        pickle.dumps(row, protocol=4)
    expected = (
        "4e" "03000000"
        "7305000000" + b"Index".hex() + "690100000000"
        "7304000000" + b"name".hex() + "730100000061"
        "7305000000" + b"score".hex() + "663ff8000000000000"
    )
    assert canon(row).hex() == expected
    assert _backend.backend.input_key(row) == blake2b(b"K1" + bytes.fromhex(expected), digest_size=16).digest()


def test_a_picklable_namedtuple_keeps_its_pickle_key() -> None:
    value = Picklable(3)
    raw = pickle.dumps(value, protocol=4)
    assert canon(value) == b"p" + struct.pack("<I", len(raw)) + raw
    assert _backend.backend.input_key(value) == blake2b(b"K1" + canon(value), digest_size=16).digest()


def test_equal_rows_from_two_itertuples_calls_have_one_key() -> None:
    first = itertuples_like(["Index", "x"], [(0, 1), (1, 2)])
    second = itertuples_like(["Index", "x"], [(0, 1), (1, 2)])
    assert type(first[0]) is not type(second[0])
    assert _backend.backend.input_keys(first) == _backend.backend.input_keys(second)
    other_fields = itertuples_like(["Index", "y"], [(0, 1)])
    assert _backend.backend.input_key(other_fields[0]) != _backend.backend.input_key(first[0])


def test_a_namedtuple_holding_an_unpicklable_value_still_raises() -> None:
    (row,) = itertuples_like(["f"], [(lambda: 1,)])
    with pytest.raises(TypeError, match="cannot be pickled.*key="):
        _backend.backend.input_key(row)


def test_resuming_over_itertuples_rows_skips_what_is_done(storage: SnapshotStorage[Any]) -> None:
    calls: list[Any] = []

    def score(row: Any) -> float:
        calls.append(row)
        return float(row.score) * 2

    rows = [(i, f"n{i}", i / 2) for i in range(6)]
    Snapper(itertuples_like(["Index", "name", "score"], rows[:4]), score, snapshot_storage=storage, version="v").start()
    again = Snapper(itertuples_like(["Index", "name", "score"], rows), score, snapshot_storage=storage, version="v")
    again.start()
    assert len(calls) == 6  # 4, then only the 2 new ones
    assert again.load() == [i for i in range(6)]


field_names = st.lists(
    st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(lambda n: not keyword.iskeyword(n)),
    min_size=1, max_size=5, unique=True,
)
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_both_backends_key_namedtuples_alike(data: st.DataObject) -> None:
    fields = data.draw(field_names)
    row = tuple(data.draw(values) for _ in fields)
    (value,) = itertuples_like(fields, [row])
    nested = [value, {"k": value}]
    for backend in BACKENDS.values():
        assert backend.input_key(value) == blake2b(b"K1" + canon(value), digest_size=16).digest()
        assert backend.input_keys(nested) == b"".join(
            blake2b(b"K1" + canon(v), digest_size=16).digest() for v in nested
        )


def test_nesting_limit_counts_a_namedtuple_as_a_level() -> None:
    Row = namedtuple("Row", ["inner"])  # local: cannot be pickled
    value: Any = 0
    for _ in range(256):
        value = Row(value)
    _backend.backend.input_key(value)
    with pytest.raises(TypeError, match="deeper than 256"):
        _backend.backend.input_key(Row(value))
