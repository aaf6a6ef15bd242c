"""Input keys (docs/architecture.md 4): test vectors for every row of the table, on both backends.

The expected canonical bytes are written out by hand here, not computed by the code
under test, so an encoding change cannot pass unnoticed.
"""

from __future__ import annotations

import math
import pickle
import struct
import threading
from hashlib import blake2b

import pytest
from hypothesis import given
from hypothesis import strategies as st

from samples import Color, ExplodingReduce, Name
from snapperable import _backend, keys
from snapperable.keys import canon


def key_of(canonical_hex: str) -> bytes:
    return blake2b(b"K1" + bytes.fromhex(canonical_hex), digest_size=16).digest()


def float_from_hex(text: str) -> float:
    value: float = struct.unpack(">d", bytes.fromhex(text))[0]
    return value


VECTORS: list[tuple[object, str]] = [
    (None, "6e"),
    (True, "54"),
    (False, "46"),
    (0, "69" "01000000" "00"),
    (1, "69" "01000000" "01"),
    (-1, "69" "01000000" "ff"),
    (127, "69" "01000000" "7f"),
    (128, "69" "02000000" "8000"),
    (-128, "69" "02000000" "80ff"),
    (255, "69" "02000000" "ff00"),
    (2**64, "69" "09000000" "000000000000000001"),
    (1.5, "66" "3ff8000000000000"),
    (-0.0, "66" "0000000000000000"),
    (0.0, "66" "0000000000000000"),
    (float("nan"), "66" "7ff8000000000000"),
    (float("-inf"), "66" "fff0000000000000"),
    (math.inf, "66" "7ff0000000000000"),
    (-math.nan, "66" "7ff8000000000000"),
    (float_from_hex("7ff0000000000001"), "66" "7ff8000000000000"),  # a signalling NaN
    (float_from_hex("fff8000000000042"), "66" "7ff8000000000000"),  # a negative NaN with a payload
    (5e-324, "66" "0000000000000001"),  # the smallest subnormal
    ("", "73" "00000000"),
    ("hé", "73" "03000000" "68c3a9"),
    ("\ud800", "73" "03000000" "eda080"),  # a lone surrogate, kept by surrogatepass
    (b"ab", "62" "02000000" "6162"),
    (bytearray(b"ab"), "62" "02000000" "6162"),
    ((), "74" "00000000"),
    ((1, "a"), "74" "02000000" "69010000000173" "0100000061"),
    ([None], "6c" "01000000" "6e"),
    ({"b": 1, "a": None}, "64" "02000000" "7301000000" "61" "6e" "7301000000" "62" "690100000001"),
    ({2, 1}, "53" "02000000" "690100000001" "690100000002"),
    (frozenset({2, 1}), "53" "02000000" "690100000001" "690100000002"),
]


@pytest.mark.parametrize(("value", "canonical_hex"), VECTORS, ids=[repr(v) for v, _ in VECTORS])
def test_key_vectors(value: object, canonical_hex: str) -> None:
    expected = canonical_hex.replace(" ", "")
    assert canon(value).hex() == expected
    assert _backend.backend.input_key(value) == key_of(expected)


def test_dict_with_mixed_key_types_sorts_by_canonical_bytes() -> None:
    # "i..." (0x69) sorts before "s..." (0x73) whatever the insertion order
    assert canon({"x": 1, 5: 2}) == canon({5: 2, "x": 1})
    assert canon({"x": 1, 5: 2}).hex().startswith("6402000000" + "690100000005")


@pytest.mark.parametrize(
    "value", [Color.RED, Name("x"), [Color.RED]], ids=["intenum", "str-subclass", "nested"]
)
def test_subclasses_fall_back_to_pickle(value: object) -> None:
    raw = canon(value)
    if isinstance(value, list):
        raw = raw[5:]  # inside the list header
    assert raw[:1] == b"p"
    if not isinstance(value, list):
        assert raw[5:] == pickle.dumps(value, protocol=4)
    assert _backend.backend.input_key(value) == blake2b(b"K1" + canon(value), digest_size=16).digest()


def test_known_consequences_are_distinct_keys() -> None:
    key = _backend.backend.input_key
    assert key(1) != key(1.0)
    assert key([1]) != key((1,))
    assert key(True) != key(1)
    assert key({1, 2}) == key({2, 1})


def test_input_keys_concatenates() -> None:
    items: list[object] = [1, "a", None, (1, 2)]
    assert _backend.backend.input_keys(items) == b"".join(_backend.backend.input_key(x) for x in items)
    assert _backend.backend.input_keys([]) == b""


@given(
    st.lists(
        st.one_of(
            st.integers(),
            st.integers(min_value=-(2**300), max_value=2**300),  # past the inline int heads
            st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0xDFFF)),  # surrogates too
            st.booleans(),
            st.sampled_from([Color.RED, Name("a"), 1.0, None]),  # subclasses are not int/str
            st.lists(st.integers(), max_size=3),
        ),
        max_size=20,
    )
)
def test_input_keys_fast_path_equals_the_reference_encoding(items: list[object]) -> None:
    """The pure ``input_keys`` encodes ints and strs inline; it must stay ``canon``."""
    expected = b"".join(key_of(canon(x).hex()) for x in items)
    assert keys.input_keys(items) == expected
    assert _backend.backend.input_keys(items) == expected


any_keys = st.lists(st.binary(min_size=16, max_size=16), max_size=40)
# A small pool, so that claims repeat keys, within themselves and with the set.
pooled_keys = st.lists(st.sampled_from([bytes([b]) * 16 for b in range(8)]), max_size=40)


@given(st.one_of(st.tuples(any_keys, any_keys), st.tuples(pooled_keys, pooled_keys)))
def test_key_set_is_a_set_and_claims_the_first_position_of_each_new_key(
    added_and_queried: tuple[list[bytes], list[bytes]],
) -> None:
    added, queried = added_and_queried
    key_set = _backend.backend.new_key_set()
    for key in added:
        key_set.add(key)
    assert len(key_set) == len(set(added))
    assert sorted(key_set) == sorted(set(added))
    assert [key in key_set for key in queried] == [key in added for key in queried]
    expected, seen = [], set(added)
    for i, key in enumerate(queried):
        if key not in seen:
            seen.add(key)
            expected.append(i)
    blob = b"".join(queried)
    assert key_set.claim(blob) == expected
    assert sorted(key_set) == sorted(seen)
    assert key_set.claim(blob) == []
    with pytest.raises(ValueError):
        key_set.claim(b"x" * 17)


def nested(depth: int) -> object:
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_limit() -> None:
    _backend.backend.input_key(nested(256))
    with pytest.raises(TypeError, match="deeper than 256.*key="):
        _backend.backend.input_key(nested(257))


def test_base_exceptions_from_pickling_pass_through() -> None:
    with pytest.raises(KeyboardInterrupt):
        _backend.backend.input_key([ExplodingReduce(KeyboardInterrupt())])


@pytest.mark.parametrize("value", [lambda: 1, threading.Lock(), [threading.Lock()]], ids=["lambda", "lock", "in-list"])
def test_unpicklable_input_suggests_key(value: object) -> None:
    with pytest.raises(TypeError, match="cannot be pickled.*key="):
        _backend.backend.input_key(value)
