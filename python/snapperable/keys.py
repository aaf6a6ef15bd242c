"""Input keys: the canonical encoding of docs/architecture.md 4, and its pure-Python reference.

``input_key(x) = blake2b(b"K1" + canon(x), digest_size=16)``. The encoding is fixed by
exact type, so a key never depends on the process (unlike ``hash()`` of a str) nor on
insertion order (unlike the pickle of a set or a dict). The Rust core produces the very
same bytes; ``tests/test_keys.py`` pins both to the vectors here.

Known consequences, documented for users: ``1`` and ``1.0`` are different keys, as are
``[1]`` and ``(1,)``; a key of an arbitrary object is only as stable as its pickle. A
namedtuple whose pickle fails (pandas' ``itertuples()`` rows, whose class is made on
the fly) is keyed by its field names and values instead (``N``).
"""

from __future__ import annotations

import os
import pickle
import struct
from hashlib import blake2b
from typing import Callable, Sequence, cast

# PICKLE_PROTOCOL is also that of the `p` encoding, so it is part of the key format.
from snapperable._contract import KEY_SIZE, PICKLE_PROTOCOL

KEY_PREFIX = b"K1"
MAX_DEPTH = 256

_U32 = struct.Struct("<I")
_F64 = struct.Struct(">d")
_QUIET_NAN = bytes.fromhex("7ff8000000000000")
_U32_MAX = 0xFFFFFFFF

KEY_HINT = "pass key= to Snapper to choose each item's identity yourself"


def _length(n: int, what: str) -> bytes:
    if n > _U32_MAX:
        raise TypeError(f"cannot compute an input key: {what} is too large; {KEY_HINT}")
    return _U32.pack(n)


def _canon_float(x: float) -> bytes:
    if x != x:
        return b"f" + _QUIET_NAN
    return b"f" + _F64.pack(x + 0.0)  # x + 0.0 turns -0.0 into 0.0


def _canon_int(x: int) -> bytes:
    raw = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
    return b"i" + _U32.pack(len(raw)) + raw


def _canon_str(x: str) -> bytes:
    raw = x.encode("utf-8", "surrogatepass")
    return b"s" + _length(len(raw), "a str") + raw


def _canon_bytes(x: bytes | bytearray) -> bytes:
    return b"b" + _length(len(x), "a bytes value") + bytes(x)


def _canon_pickled(x: object) -> "bytes | tuple[str, ...]":
    """``p`` + the pickle of ``x``; or, for a namedtuple that cannot be pickled, its
    field names, for ``canon`` to encode it as ``N`` (there, to keep the recursion to
    one frame a level)."""
    try:
        raw = pickle.dumps(x, protocol=PICKLE_PROTOCOL)
    except Exception as exc:  # pickling may raise anything (TypeError, PicklingError, ...)
        fields = _named_tuple_fields(x)
        if fields is not None:  # pandas' itertuples() rows, a namedtuple made in a function
            return fields
        raise TypeError(
            f"cannot compute an input key for an object of type {type(x).__qualname__}: "
            f"it cannot be pickled ({exc}); {KEY_HINT}"
        ) from exc
    return b"p" + _length(len(raw), "a pickled object") + raw


def _named_tuple_fields(x: object) -> "tuple[str, ...] | None":
    """The field names of a namedtuple (a tuple subclass whose ``_fields`` name its
    items), else None."""
    if not isinstance(x, tuple):
        return None
    fields = getattr(type(x), "_fields", None)
    if type(fields) is not tuple or len(fields) != len(x) or not all(type(f) is str for f in fields):
        return None
    return fields


_SCALARS: dict[type, Callable[[object], bytes]] = {
    int: _canon_int,  # type: ignore[dict-item]
    float: _canon_float,  # type: ignore[dict-item]
    str: _canon_str,  # type: ignore[dict-item]
    bytes: _canon_bytes,  # type: ignore[dict-item]
    bytearray: _canon_bytes,  # type: ignore[dict-item]
}


def canon(x: object, depth: int = 0) -> bytes:
    """The canonical bytes of ``x`` (docs/architecture.md 4), without the ``K1`` prefix.

    ``depth`` is how many containers enclose ``x``; a container deeper than
    ``MAX_DEPTH`` levels raises ``TypeError``.
    """
    t = type(x)
    scalar = _SCALARS.get(t)
    if scalar is not None:
        return scalar(x)
    if x is None:
        return b"n"
    if t is bool:
        return b"T" if x else b"F"
    if t is tuple or t is list or t is dict or t is set or t is frozenset:
        depth += 1
        if depth > MAX_DEPTH:
            raise TypeError(
                f"cannot compute an input key: nesting is deeper than {MAX_DEPTH} levels; "
                f"{KEY_HINT}"
            )
        if t is tuple or t is list:
            sequence = cast("tuple[object, ...] | list[object]", x)
            head = (b"t" if t is tuple else b"l") + _length(len(sequence), "a sequence")
            return head + b"".join([canon(item, depth) for item in sequence])
        if t is dict:
            mapping = cast("dict[object, object]", x)
            pairs = sorted((canon(k, depth), canon(v, depth)) for k, v in mapping.items())
            return b"d" + _length(len(pairs), "a dict") + b"".join(k + v for k, v in pairs)
        members = sorted(canon(item, depth) for item in cast("set[object]", x))
        return b"S" + _length(len(members), "a set") + b"".join(members)
    pickled = _canon_pickled(x)
    if type(pickled) is bytes:
        return pickled
    # A namedtuple that cannot be pickled: ``N`` + u32 count + ``canon(name) +
    # canon(value)`` for each field, in order.
    fields = cast("tuple[str, ...]", pickled)
    depth += 1
    if depth > MAX_DEPTH:
        raise TypeError(
            f"cannot compute an input key: nesting is deeper than {MAX_DEPTH} levels; {KEY_HINT}"
        )
    parts = [b"N" + _length(len(fields), "a named tuple")]
    for name, value in zip(fields, cast("tuple[object, ...]", x)):
        parts.append(_canon_str(name))
        parts.append(canon(value, depth))
    return b"".join(parts)


# A hasher that has already taken the prefix: copying it is cheaper than setting up a
# new one (benches/README.md), and keys are computed once per input.
_PREFIXED = blake2b(KEY_PREFIX, digest_size=KEY_SIZE)


def input_key(x: object) -> bytes:
    """The 16-byte key that identifies an input across runs and processes."""
    hasher = _PREFIXED.copy()
    # Scalars, the common inputs, skip canon's container dispatch.
    scalar = _SCALARS.get(type(x))
    hasher.update(scalar(x) if scalar is not None else canon(x))
    return hasher.digest()


# canon(x) of an int is _INT_HEADS[n] + its n bytes, for n below 33 (any int of up
# to 255 bits): the head is looked up rather than packed per item.
_INT_HEADS = [b"i" + _U32.pack(n) for n in range(33)]


def input_keys(items: Sequence[object]) -> bytes:
    """The keys of ``items``, concatenated (``KEY_SIZE`` bytes each).

    The same bytes as joining ``input_key`` of each item; the pure backend's per-item
    cost, so ints and strs (the usual inputs) are encoded inline rather than by a call
    per item (benches/README.md). ``tests/test_keys.py`` holds it to ``canon``.
    """
    new_hasher = _PREFIXED.copy
    int_heads = _INT_HEADS
    digests: list[bytes] = []
    append = digests.append
    for x in items:
        hasher = new_hasher()
        if type(x) is int:
            n = (x.bit_length() + 8) >> 3
            hasher.update(
                int_heads[n] + x.to_bytes(n, "little", signed=True)
                if n < 33
                else _canon_int(x)
            )
        elif type(x) is str:
            hasher.update(_canon_str(x))
        else:
            hasher.update(canon(x))
        append(hasher.digest())
    return b"".join(digests)


_SUBSTITUTE_PREFIX = b"KX"  # not K1: a substitute key is never the key of any input


def substitute_key(item: object) -> bytes:
    """The key an item whose own key cannot be computed is recorded under as failed
    (``skip_item_errors``). Derived from the item's value where that encodes (a ``key=``
    that raised for it), so that a later run finds the failure; else random, matching
    nothing, so such an item is tried again on each run."""
    try:
        body = canon(item)
    except TypeError:
        return os.urandom(KEY_SIZE)
    return blake2b(_SUBSTITUTE_PREFIX + body, digest_size=KEY_SIZE).digest()
