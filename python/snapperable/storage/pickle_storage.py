"""A checkpoint in one append-only file of checksummed pickle frames (docs/architecture.md 6.2).

Layout, all integers little-endian:

- header, 16 bytes: ``b"\\x89SNAPPKL"``, u32 format version (1), u32 zero;
- then one frame per commit: ``b"F"``, u64 payload length, u32 CRC-32 of the payload,
  u32 CRC-32 of the preceding 13 header bytes, then the payload: a pickle (protocol 4)
  of ``("items", [row tuple, ...])`` or ``("version", version tuple)``.

Each commit appends one frame and fsyncs; the file is never rewritten whole. A crash
mid-append leaves a torn last frame: an incomplete header, a frame running past the end
of the file, a zero-filled tail, or a last frame whose payload checksum fails. That
tail is cut off on open (with a warning in the log): the items in it were never
reported saved. Damage anywhere else raises ``CheckpointCorruptError``; the header
checksum is what keeps a flipped length byte from passing as a torn tail.
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import threading
import time
import zlib
from typing import Any, Iterator, Optional, TypeVar, Union

from snapperable import _backend, _folding
from snapperable._contract import (
    KEY_SIZE,
    PICKLE_PROTOCOL,
    STATUS_OK,
    ROW_KEY,
    ROW_OUTPUT,
    ROW_STATUS,
    ROW_VERSION,
    CheckpointReader,
    CheckpointStore,
    ItemRow,
    KeySet,
    RowInfo,
    VersionRow,
)
from snapperable._writer import PendingRow, WriterBackedStore, item_row
from snapperable.errors import CheckpointCorruptError, CheckpointError, CheckpointFormatError
from snapperable.storage.base import SnapshotStorage, fsync_directory

R = TypeVar("R")

log = logging.getLogger("snapperable")

DEFAULT_FILE_PATH = "snapper_checkpoint.pkl"
MAGIC = b"\x89SNAPPKL"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sII")
_FRAME = struct.Struct("<cQI")  # marker, payload length, payload CRC-32
_FRAME_CHECK = struct.Struct("<I")  # CRC-32 of the _FRAME bytes
FRAME_HEADER_SIZE = _FRAME.size + _FRAME_CHECK.size
_ROW_FIELDS = 11
_EMPTY_HEADER = _HEADER.pack(MAGIC, FORMAT_VERSION, 0)
NOT_OUR_HEADER = "it does not start with a pickle checkpoint's header"


def encode_frame(record: tuple[str, Any]) -> bytes:
    payload = pickle.dumps(record, protocol=PICKLE_PROTOCOL)
    head = _FRAME.pack(b"F", len(payload), zlib.crc32(payload))
    return head + _FRAME_CHECK.pack(zlib.crc32(head)) + payload


class PickleSnapshotStorage(SnapshotStorage[R]):
    """Checkpoints in a file of appended pickle frames; simple, for smaller datasets.

    Every read scans the file, so prefer ``SQLiteSnapshotStorage`` for large runs.
    """

    def __init__(self, file_path: Union[str, "os.PathLike[str]"] = DEFAULT_FILE_PATH) -> None:
        self.file_path = os.fspath(file_path)
        self.path = os.path.abspath(self.file_path)

    def _foreign_format(self, head: bytes) -> Optional[str]:
        if head[: len(MAGIC)] == MAGIC[: len(head)]:  # a torn header too
            return None
        return NOT_OUR_HEADER

    def _open_reader(self) -> CheckpointReader:
        return PickleReader(self.path)

    def _open_store(self, batch_size: int, max_wait_time: Optional[float]) -> CheckpointStore:
        return PickleStore(self.path, batch_size, max_wait_time)


class PickleReader:
    """A pickle-frame file opened for reading only: it needs no lock and writes nothing,
    so it reads the committed frames beside a running writer, and a read-only file.
    A frame still being appended at the end reads as not there yet."""

    path: str
    _fd: int
    # A truncated last frame: one being appended (a reader beside a writer), or damage
    # (the store, which cut any torn tail off when it opened).
    _tail_may_be_in_flight = True
    _tail_start = _HEADER.size

    def __init__(self, path: str) -> None:
        self.path = path
        self._released = False  # the descriptor is closed (and its number free for reuse)
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise CheckpointError.failed(path, f"cannot open it for reading: {exc}") from exc
        try:
            header = os.pread(self._fd, _HEADER.size, 0)
            if header:  # else a new file, its header not yet written
                self._check_header(header)
        except BaseException:
            os.close(self._fd)
            raise

    def close(self) -> None:
        if not self._released:
            self._released = True
            os.close(self._fd)

    def _corrupt(self, problem: str) -> CheckpointCorruptError:
        return CheckpointCorruptError.damaged(self.path, problem)

    def _check_header(self, header: bytes) -> None:
        """Refuse a file that is not a pickle checkpoint, or of a newer format, or whose
        header is cut short: the header is one write of 16 bytes, so no crash leaves
        part of it, and a file that short was cut by something else (it may have held
        frames). Only an empty file is a new checkpoint."""
        if len(header) < _HEADER.size and MAGIC.startswith(header[: len(MAGIC)]):
            raise self._corrupt(f"its header is cut short ({len(header)} bytes of {_HEADER.size})")
        magic, version, reserved = (
            _HEADER.unpack(header) if len(header) == _HEADER.size else (b"", 0, 0)
        )
        if magic != MAGIC:
            raise CheckpointCorruptError.not_a_checkpoint(self.path, NOT_OUR_HEADER)
        if version < 1 or reserved != 0:
            raise self._corrupt("its header is damaged")
        if version > FORMAT_VERSION:
            raise CheckpointFormatError.newer(self.path, version, FORMAT_VERSION)

    def _frames(self, size: int, *, stop_at_torn_tail: bool) -> Iterator[tuple[int, bytes]]:
        """(offset, payload) of each intact frame; sets ``_tail_start`` where they end."""
        pos = _HEADER.size
        self._tail_start = pos
        while pos < size:
            head = os.pread(self._fd, FRAME_HEADER_SIZE, pos)
            if len(head) < FRAME_HEADER_SIZE:
                self._torn(pos, stop_at_torn_tail)
                return
            marker, length, payload_crc = _FRAME.unpack_from(head)
            (head_crc,) = _FRAME_CHECK.unpack_from(head, _FRAME.size)
            if marker != b"F" or head_crc != zlib.crc32(head[: _FRAME.size]):
                if self._is_zero_tail(pos, size):  # space allocated, never written
                    self._torn(pos, stop_at_torn_tail)
                    return
                raise self._corrupt(f"damaged frame header at offset {pos}")
            end = pos + FRAME_HEADER_SIZE + length
            if end > size:
                self._torn(pos, stop_at_torn_tail)
                return
            payload = os.pread(self._fd, length, pos + FRAME_HEADER_SIZE)
            if zlib.crc32(payload) != payload_crc:
                if end == size:
                    self._torn(pos, stop_at_torn_tail)
                    return
                raise self._corrupt(f"checksum mismatch in the frame at offset {pos}")
            yield pos, payload
            pos = end
            self._tail_start = pos

    def _torn(self, pos: int, allowed: bool) -> None:
        if not allowed:
            raise self._corrupt(f"truncated frame at offset {pos}")

    def _is_zero_tail(self, pos: int, size: int) -> bool:
        chunk = 1 << 16
        while pos < size:
            if os.pread(self._fd, min(chunk, size - pos), pos).strip(b"\0"):
                return False
            pos += chunk
        return True

    def _records(self) -> Iterator[tuple[str, Any]]:
        if self._released:
            raise CheckpointError.closed(self.path)
        size = os.fstat(self._fd).st_size
        for pos, payload in self._frames(size, stop_at_torn_tail=self._tail_may_be_in_flight):
            try:
                record = pickle.loads(payload)
                kind, body = record
            except Exception as exc:
                raise self._corrupt(f"the frame at offset {pos} cannot be read: {exc!r}") from exc
            yield kind, body

    # -- reads --------------------------------------------------------------------------
    def versions(self) -> list[VersionRow]:
        return [
            _folding.version_row(body, self.path)
            for kind, body in self._records()
            if kind == "version"
        ]

    def _item_rows(self) -> Iterator[tuple[int, ItemRow]]:
        seq = 0
        for kind, body in self._records():
            if kind != "items":
                continue
            for row in body:
                seq += 1
                if len(row) != _ROW_FIELDS:
                    raise CheckpointCorruptError.bad_row(self.path, seq, f"does not have {_ROW_FIELDS} fields")
                if not isinstance(row[ROW_KEY], bytes) or len(row[ROW_KEY]) != KEY_SIZE:
                    raise CheckpointCorruptError.bad_key(self.path, seq)
                yield seq, row

    def key_set(self, version: Optional[int], status: int) -> KeySet:
        rows = (
            (row[ROW_KEY], row[ROW_VERSION], row[ROW_STATUS])
            for _, row in self._item_rows()
            if version is None or row[ROW_VERSION] == version
        )
        return _folding.keys_with_status(rows, status, _backend.backend.new_key_set)

    def key_sets(self, version: int) -> tuple[KeySet, KeySet]:
        latest = {
            row[ROW_KEY]: row[ROW_STATUS]
            for _, row in self._item_rows()
            if row[ROW_VERSION] == version
        }
        return _folding.ok_and_failed(latest, _backend.backend.new_key_set)

    def _latest_outputs(self, version: int) -> dict[bytes, Optional[bytes]]:
        return {
            row[ROW_KEY]: row[ROW_OUTPUT] if row[ROW_STATUS] == STATUS_OK else None
            for _, row in self._item_rows()
            if row[ROW_VERSION] == version
        }

    def outputs_for(self, version: int, keys: bytes) -> list[Any]:
        return _folding.outputs_in_key_order(self._latest_outputs(version), keys, self.path)

    def all_outputs(self, version: int) -> list[Any]:
        return _folding.outputs_in_save_order(self._latest_outputs(version), self.path)

    def rows(self, version: Optional[int], with_output: bool = False) -> Iterator[RowInfo]:
        for seq, row in self._item_rows():
            if version is None or row[ROW_VERSION] == version:
                key, version_id, status, pickled_input, output, error_type, error, tb, attempts, started, ended = row
                yield RowInfo(
                    seq, key, version_id, status, pickled_input, error_type, error, tb,
                    attempts, started, ended, output if with_output else None,
                )

    def meta(self) -> dict[str, str]:
        """The format version, from the header (the format keeps no creator)."""
        header = os.pread(self._fd, _HEADER.size, 0)
        version = _HEADER.unpack(header)[1] if len(header) == _HEADER.size else FORMAT_VERSION
        return {"format_version": str(version)}

    def integrity_check(self) -> Optional[str]:
        """Every frame's checksums, to the end of the file (a reader: of the committed
        frames, see ``_tail_may_be_in_flight``); the first damage, or None."""
        try:
            for _ in self._frames(os.fstat(self._fd).st_size, stop_at_torn_tail=self._tail_may_be_in_flight):
                pass
        except CheckpointCorruptError as exc:
            return str(exc)
        return None

    def torn_tail_bytes(self) -> int:
        """Bytes after the last intact frame, as of the last full read: what a crash
        (or a live writer mid-append) left, cut off by the next run."""
        return max(0, os.fstat(self._fd).st_size - self._tail_start)

class PickleStore(WriterBackedStore, PickleReader):
    """The ``CheckpointStore`` of a pickle-frame file."""

    _tail_may_be_in_flight = False

    def __init__(self, path: str, batch_size: int, max_wait_time: Optional[float]) -> None:
        self.path = path
        self._write_lock = threading.Lock()  # frames from the writer and add_version
        self._torn_append: Optional[OSError] = None
        self._released = False
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        try:
            self._prepare()
        except BaseException:
            os.close(self._fd)
            raise
        self._start_writer(path, batch_size, max_wait_time)

    # -- opening ------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Write the header of a new file, check an old one, cut off a torn tail."""
        size = os.fstat(self._fd).st_size
        header = os.pread(self._fd, _HEADER.size, 0)
        if not header:  # a new file (only an empty one is: see ``_check_header``)
            os.write(self._fd, _EMPTY_HEADER)
            os.fsync(self._fd)
            fsync_directory(self.path)
            return
        self._check_header(header)
        end = self._end_of_good_frames(size)
        if end < size:
            log.warning(
                "%s: dropped a torn last frame (%d bytes) left by an interrupted write",
                self.path,
                size - end,
            )
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)

    def _end_of_good_frames(self, size: int) -> int:
        """Offset just past the last intact frame; raises on damage before the tail."""
        for _ in self._frames(size, stop_at_torn_tail=True):
            pass
        return self._tail_start

    # -- writes -------------------------------------------------------------------------
    def _append(self, frame: bytes) -> None:
        """Append one frame and fsync it, or leave the file as it was.

        A failed append (a full disk, a file size limit) may leave part of the frame on
        disk; it is cut off at once, since a later frame appended after it would turn a
        torn tail into damage in the middle of the file.
        """
        with self._write_lock:
            if self._torn_append is not None:
                raise CheckpointError.failed(self.path, f"an earlier failed write could not be undone: {self._torn_append}")
            end = os.fstat(self._fd).st_size
            try:
                view = memoryview(frame)
                while view:
                    view = view[os.write(self._fd, view) :]
                os.fsync(self._fd)
            except BaseException as exc:
                try:
                    os.ftruncate(self._fd, end)
                except OSError as undo:
                    self._torn_append = undo  # the next open cuts the torn tail
                raise exc

    def _commit(self, rows: list[PendingRow]) -> None:  # durable on return
        self._append(encode_frame(("items", list(map(item_row, rows)))))

    def add_version(self, fingerprint: str, parts: str, uses: Optional[int]) -> int:
        self.flush()
        known = self.versions()
        vid = known[-1].id + 1 if known else 1
        row = VersionRow(vid, fingerprint, parts, vid if uses is None else uses, time.time())
        try:
            self._append(encode_frame(("version", tuple(row))))
        except OSError as exc:
            raise CheckpointError.failed(self.path, f"cannot save a function version: {exc}") from exc
        return vid

    def fold_wal_into_file(self) -> None:
        self.flush()  # every frame is in the file, fsynced, once committed

    def _release(self) -> None:
        self._released = True
        os.close(self._fd)
