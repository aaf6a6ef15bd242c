"""The checksums of the SQLite format 2 (README "Checkpoint files"): the one Python
definition; the Rust core's twin is ``rust/store/row_checksum.rs``.

SQLite checksums nothing, so a flipped byte inside a stored value reads back as good
data. Each item row therefore carries ``checksum``, a 12-byte blob of three CRC-32s
(``zlib.crc32``; ``crc32fast`` in Rust), all integers little-endian:

- ``out`` = CRC-32 of ``field(output)``;
- ``rest`` = CRC-32 of ``field(input) field(error_type) field(error) field(traceback)
  i64(attempts) f64(started) f64(ended)``;
- ``head`` = CRC-32 of ``key (16 bytes) i64(version) i64(status) u32(out) u32(rest)``;
- ``checksum`` = ``u32(head) u32(out) u32(rest)``,

where ``field(NULL)`` is the byte 0 and ``field(value)`` the byte 1, a u32 length and
the bytes (a blob as stored, a text as UTF-8). Three parts so that each read checks
all it uses without reading more: the key scan at ``start()`` reads key, status and
checksum and checks ``head`` (which covers ``out`` and ``rest`` as stored); a load adds
the output and checks ``out``; the row reports add the other columns and check
``rest``. A column of an unexpected type (a damaged type byte) never checks.

A ``versions`` row carries the integer CRC-32 of ``i64(id) i64(uses) f64(created)
field(fingerprint) field(parts)``.
"""

from __future__ import annotations

import struct
import zlib
from typing import Iterable, Optional, Tuple

from snapperable._contract import KEY_SIZE

_crc32 = zlib.crc32
_PRESENT = struct.Struct("<BI")  # 1, then the value's length
_NULL = b"\x00"
_COUNTS = struct.Struct("<qdd")  # attempts, started, ended
# The ``rest`` of a row without input or error: four NULL fields, then the counts.
_NULLS_AND_COUNTS = struct.Struct("<4xqdd")
_HEAD = struct.Struct(f"<{KEY_SIZE}sqqII")
CHECKSUM = struct.Struct("<III")  # head, out, rest
_VERSION_COUNTS = struct.Struct("<qqd")  # id, uses, created


class WrongType(Exception):
    """A column holds a value of a type its field never has: damage."""


def _blob(value: object, crc: int) -> int:
    if value is None:
        return _crc32(_NULL, crc)
    if type(value) is not bytes:
        raise WrongType(f"a blob column holds {type(value).__name__}")
    return _crc32(value, _crc32(_PRESENT.pack(1, len(value)), crc))


def _text(value: object, crc: int) -> int:
    if value is None:
        return _crc32(_NULL, crc)
    if type(value) is not str:
        raise WrongType(f"a text column holds {type(value).__name__}")
    encoded = value.encode("utf-8")
    return _crc32(encoded, _crc32(_PRESENT.pack(1, len(encoded)), crc))


def rest_crc(
    input: object, error_type: object, error: object, traceback: object,
    attempts: object, started: object, ended: object,
) -> int:
    """The ``rest`` CRC of a row's fields as read (raises ``WrongType``)."""
    if type(attempts) is not int or type(started) is not float or type(ended) is not float:
        raise WrongType("a count or time column holds a value of another type")
    try:
        if input is None and error_type is None and error is None and traceback is None:
            return _crc32(_NULLS_AND_COUNTS.pack(attempts, started, ended))
        crc = _text(traceback, _text(error, _text(error_type, _blob(input, 0))))
        return _crc32(_COUNTS.pack(attempts, started, ended), crc)
    except struct.error as exc:  # an integer out of range
        raise WrongType(str(exc)) from exc


def _head_crc(key: object, version: object, status: object, out: int, rest: int) -> int:
    if type(key) is not bytes or len(key) != KEY_SIZE or type(version) is not int or type(status) is not int:
        raise WrongType("a key, version or status column holds a value of another type")
    try:
        return _crc32(_HEAD.pack(key, version, status, out, rest))
    except struct.error as exc:
        raise WrongType(str(exc)) from exc


def row_checksum(
    key: bytes,
    version: int,
    status: int,
    input: Optional[bytes],
    output: Optional[bytes],
    error_type: Optional[str],
    error: Optional[str],
    traceback: Optional[str],
    attempts: int,
    started: float,
    ended: float,
) -> bytes:
    """The checksum the writer stores with a row (fields in ``ItemRow`` order)."""
    out = _blob(output, 0)
    rest = rest_crc(input, error_type, error, traceback, attempts, float(started), float(ended))
    return CHECKSUM.pack(_head_crc(key, version, status, out, rest), out, rest)


def plain_ok_checksum(key: bytes, version: int, started: float, ended: float, output: bytes) -> bytes:
    """``row_checksum`` of a plain ok row (status ok, one attempt, no input or error)."""
    out = _crc32(output, _crc32(_PRESENT.pack(1, len(output))))
    rest = _crc32(_NULLS_AND_COUNTS.pack(1, started, ended))
    return CHECKSUM.pack(_crc32(_HEAD.pack(key, version, 0, out, rest)), out, rest)


# Outputs up to this size are bound as a copy in a bytearray (see ``plain_ok_values``);
# copying a larger one would cost more than it saves.
_COPIED_OUTPUT_MAX = 1024


def plain_ok_values(rows: Iterable[Tuple[bytes, int, float, float, bytes]]) -> list[object]:
    """The fields of plain ok rows ``(key, version, started, ended, output)``, each row's
    followed by its ``plain_ok_checksum``, in one flat list: the parameters of a
    multi-row INSERT. The same bytes as ``plain_ok_checksum``, without a call and two
    tuples a row (the writer process computes these for every row it commits).

    The key, the checksum and a small output are bytearrays, not bytes: ``sqlite3``
    binds both as the same BLOB, but passes every ``bytes`` parameter through its
    adapter lookup first (a tuple, a dict lookup and two attribute lookups), which cost
    more than the copy."""
    crc32 = _crc32
    field_head = _PRESENT.pack
    rest_fields = _NULLS_AND_COUNTS.pack
    head_fields = _HEAD.pack
    checksum_into = CHECKSUM.pack_into
    checksum_size = CHECKSUM.size
    copied_max = _COPIED_OUTPUT_MAX
    # The CRC of an output's field head (1, its length), by length: a batch's outputs
    # mostly have a few lengths.
    heads: dict[int, int] = {}
    values: list[object] = []
    extend = values.extend
    for key, version, started, ended, output in rows:
        size = len(output)
        head = heads.get(size)
        if head is None:
            head = heads[size] = crc32(field_head(1, size))
        out = crc32(output, head)
        rest = crc32(rest_fields(1, started, ended))
        checksum = bytearray(checksum_size)
        checksum_into(checksum, 0, crc32(head_fields(key, version, 0, out, rest)), out, rest)
        extend((
            bytearray(key), version, started, ended, bytearray(output) if size <= copied_max else output, checksum,
        ))
    return values


_unpack_checksum = CHECKSUM.unpack
_pack_head = _HEAD.pack
_pack_field_head = _PRESENT.pack
_NULL_CRC = _crc32(_NULL)


def head_matches(checksum: object, key: object, version: object, status: object) -> bool:
    """Does ``checksum`` (as stored) check for these fields? (The key scan's test.)

    Made for every row at each ``start()`` and ``load()``: one call, no exception
    raised for a row that checks (``_head_crc``'s tests, inline)."""
    if (
        type(checksum) is not bytes or type(key) is not bytes or len(key) != KEY_SIZE
        or type(version) is not int or type(status) is not int
    ):
        return False
    try:
        head, out, rest = _unpack_checksum(checksum)
        return bool(_crc32(_pack_head(key, version, status, out, rest)) == head)
    except struct.error:  # not 12 bytes, or an integer out of range
        return False


def output_matches(checksum: bytes, output: object) -> bool:
    """Does the output check? (After ``head_matches``; ``_blob``, inline.)"""
    if type(output) is bytes:
        found = _crc32(output, _crc32(_pack_field_head(1, len(output))))
    elif output is None:
        found = _NULL_CRC
    else:
        return False
    return bool(found == _unpack_checksum(checksum)[1])


def rest_matches(
    checksum: bytes, input: object, error_type: object, error: object, traceback: object,
    attempts: object, started: object, ended: object,
) -> bool:
    """Do the fields of ``rest`` check? (After ``head_matches``.)"""
    try:
        found = rest_crc(input, error_type, error, traceback, attempts, started, ended)
    except WrongType:
        return False
    return bool(found == CHECKSUM.unpack(checksum)[2])


def version_checksum(vid: object, fingerprint: object, parts: object, uses: object, created: object) -> int:
    """The checksum of a ``versions`` row (raises ``WrongType``)."""
    if type(vid) is not int or type(uses) is not int or type(created) is not float:
        raise WrongType("a version's id, uses or created column holds a value of another type")
    try:
        crc = _crc32(_VERSION_COUNTS.pack(vid, uses, created))
    except struct.error as exc:
        raise WrongType(str(exc)) from exc
    return _text(parts, _text(fingerprint, crc))
