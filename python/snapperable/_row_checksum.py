"""The checksum of a SQLite item row (format 2; README "Checkpoint files"): the one
Python definition, the Rust core's twin is ``rust/row_checksum.rs``.

SQLite checksums nothing, so a flipped byte inside a stored value reads back as good
data. Each row therefore carries ``checksum``, a 64-bit integer of two CRC-32s
(``zlib.crc32``; ``crc32fast`` in Rust), all integers little-endian:

- ``body`` = CRC-32 of ``field(output) field(input) field(error_type) field(error)
  field(traceback) i64(attempts) f64(started) f64(ended)``, where ``field(NULL)`` is the
  byte 0 and ``field(value)`` is the byte 1, a u32 length and the bytes (a blob as
  stored, a text as UTF-8);
- ``head`` = CRC-32 of ``key (16 bytes) i64(version) i64(status) u32(body)``;
- ``checksum`` = ``head * 2**32 + body``, stored as the signed 64-bit integer of those
  bits.

Two parts so that each read checks what it uses without reading the rest: the key
scan at ``start()`` reads key, status and checksum and checks ``head`` (which covers
``body`` as stored); a load and the row reports read the other columns too and check
both. A column of an unexpected type (a damaged type byte) never checks.
"""

from __future__ import annotations

import struct
import zlib
from typing import Optional

from snapperable._contract import KEY_SIZE

_crc32 = zlib.crc32
_PRESENT = struct.Struct("<BI")  # 1, then the value's length
_NULL = b"\x00"
_COUNTS = struct.Struct("<qdd")  # attempts, started, ended
# A plain ok row's body after its output: four NULL fields, then the counts.
_NULLS_AND_COUNTS = struct.Struct("<4xqdd")
_HEAD = struct.Struct(f"<{KEY_SIZE}sqqI")
_LOW = 0xFFFFFFFF
_SIGN = 1 << 63
_WRAP = 1 << 64


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


def body_crc(
    output: object,
    input: object,
    error_type: object,
    error: object,
    traceback: object,
    attempts: object,
    started: object,
    ended: object,
) -> int:
    """The ``body`` CRC of a row's fields as read (raises ``WrongType``)."""
    crc = _blob(output, 0)
    if input is None and error_type is None and error is None and traceback is None:
        return _counts(_NULLS_AND_COUNTS, attempts, started, ended, crc)
    crc = _blob(input, crc)
    crc = _text(error_type, crc)
    crc = _text(error, crc)
    crc = _text(traceback, crc)
    return _counts(_COUNTS, attempts, started, ended, crc)


def _counts(layout: struct.Struct, attempts: object, started: object, ended: object, crc: int) -> int:
    if type(attempts) is not int or type(started) is not float or type(ended) is not float:
        raise WrongType("a count or time column holds a value of another type")
    return _crc32(layout.pack(attempts, started, ended), crc)


def head_crc(key: object, version: object, status: object, body: int) -> int:
    """The ``head`` CRC (raises ``WrongType``)."""
    if type(key) is not bytes or len(key) != KEY_SIZE or type(version) is not int or type(status) is not int:
        raise WrongType("a key, version or status column holds a value of another type")
    try:
        return _crc32(_HEAD.pack(key, version, status, body))
    except struct.error as exc:  # an integer out of range
        raise WrongType(str(exc)) from exc


def combine(head: int, body: int) -> int:
    """The stored value: the bits of ``head, body`` as a signed 64-bit integer."""
    value = head << 32 | body
    return value - _WRAP if value & _SIGN else value


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
) -> int:
    """The checksum the writer stores with a row (fields in ``ItemRow`` order)."""
    body = body_crc(output, input, error_type, error, traceback, attempts, float(started), float(ended))
    return combine(head_crc(key, version, status, body), body)


def plain_ok_checksum(key: bytes, version: int, started: float, ended: float, output: bytes) -> int:
    """``row_checksum`` of a plain ok row (status ok, one attempt, no input or error)."""
    body = _crc32(_NULLS_AND_COUNTS.pack(1, started, ended), _blob(output, 0))
    return combine(_crc32(_HEAD.pack(key, version, 0, body)), body)


def head_matches(checksum: object, key: object, version: object, status: object) -> bool:
    """Does ``checksum`` (as stored) check for these fields? (The key scan's test.)"""
    if type(checksum) is not int:
        return False
    try:
        return head_crc(key, version, status, checksum & _LOW) == (checksum >> 32) & _LOW
    except WrongType:
        return False


def row_matches(
    checksum: object,
    key: object,
    version: object,
    status: object,
    input: object,
    output: object,
    error_type: object,
    error: object,
    traceback: object,
    attempts: object,
    started: object,
    ended: object,
) -> bool:
    """Does ``checksum`` check for every field of the row?"""
    if not head_matches(checksum, key, version, status):
        return False
    try:
        body = body_crc(output, input, error_type, error, traceback, attempts, started, ended)
    except WrongType:
        return False
    return body == checksum & _LOW  # type: ignore[operator]  # an int: head_matches said so


_VERSION_COUNTS = struct.Struct("<qqd")  # id, uses, created


def version_checksum(vid: object, fingerprint: object, parts: object, uses: object, created: object) -> int:
    """The checksum of a ``versions`` row: CRC-32 of ``i64(id) i64(uses) f64(created)
    field(fingerprint) field(parts)`` (raises ``WrongType``)."""
    if type(vid) is not int or type(uses) is not int or type(created) is not float:
        raise WrongType("a version's id, uses or created column holds a value of another type")
    try:
        crc = _crc32(_VERSION_COUNTS.pack(vid, uses, created))
    except struct.error as exc:
        raise WrongType(str(exc)) from exc
    return _text(parts, _text(fingerprint, crc))
