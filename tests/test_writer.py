"""The pure-Python group-commit writer (``_writer.GroupCommitWriter``, ``ItemRowWriter``) on its own."""

from __future__ import annotations

import pickle
import threading
import time
from typing import Generic, TypeVar

import pytest

from snapperable import keys
from snapperable._contract import ROW_OUTPUT
from snapperable._writer import GroupCommitWriter, ItemRowWriter, PendingRow
from snapperable.errors import CheckpointError, WriterError

Row = TypeVar("Row")


class SlowSink(Generic[Row]):
    """A commit function that takes its time, as an fsync does, and keeps the batches."""

    def __init__(self, delay: float = 0.0, fail_at: Row | None = None) -> None:
        self.delay = delay
        self.fail_at = fail_at
        self.batches: list[list[Row]] = []
        self.lock = threading.Lock()

    def __call__(self, rows: list[Row]) -> None:
        time.sleep(self.delay)
        if self.fail_at is not None and self.fail_at in rows:
            raise OSError(28, "No space left on device")
        with self.lock:
            self.batches.append(rows)

    @property
    def rows(self) -> list[Row]:
        return [row for batch in self.batches for row in batch]


def test_group_commit_keeps_order_and_groups_what_accumulates() -> None:
    sink: SlowSink[int] = SlowSink(delay=0.01)
    writer: GroupCommitWriter[int] = GroupCommitWriter(sink, batch_size=1, max_wait_time=None, name="t")
    for i in range(2000):
        writer.record(i)
    writer.flush()
    assert sink.rows == list(range(2000))
    assert len(sink.batches) < 200  # rows that arrived during a commit went in the next one
    writer.close()


def test_pending_rows_are_bounded() -> None:
    sink: SlowSink[int] = SlowSink(delay=0.005)
    writer: GroupCommitWriter[int] = GroupCommitWriter(
        sink, batch_size=10**9, max_wait_time=None, name="t", max_pending=50
    )
    for i in range(1000):
        writer.record(i)
    writer.close()
    assert sink.rows == list(range(1000))
    assert max(len(batch) for batch in sink.batches) <= 50  # whatever batch_size says


def test_batch_size_holds_rows_until_flush() -> None:
    sink: SlowSink[int] = SlowSink()
    writer: GroupCommitWriter[int] = GroupCommitWriter(sink, batch_size=100, max_wait_time=None, name="t")
    for i in range(99):
        writer.record(i)
    time.sleep(0.1)
    assert sink.rows == []
    writer.record(99)
    deadline = time.monotonic() + 5
    while not sink.rows and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sink.rows == list(range(100))
    writer.close()


def test_max_wait_time_commits_a_partial_batch() -> None:
    sink: SlowSink[int] = SlowSink()
    writer: GroupCommitWriter[int] = GroupCommitWriter(sink, batch_size=100, max_wait_time=0.05, name="t")
    writer.record(1)
    deadline = time.monotonic() + 5
    while not sink.rows and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sink.rows == [1]
    writer.close()


def test_failure_is_raised_on_every_later_call() -> None:
    sink: SlowSink[int] = SlowSink(fail_at=3)
    writer: GroupCommitWriter[int] = GroupCommitWriter(sink, batch_size=1, max_wait_time=None, name="ckpt")
    for i in range(3):
        writer.record(i)
    writer.flush()
    writer.record(3)
    with pytest.raises(WriterError, match="ckpt.*No space left") as info:
        writer.flush()
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(WriterError):
        writer.record(4)
    with pytest.raises(WriterError):
        writer.close()
    assert sink.rows == [0, 1, 2]


def test_pending_bytes_are_bounded() -> None:
    sink: SlowSink[int] = SlowSink(delay=0.005)
    writer: GroupCommitWriter[int] = GroupCommitWriter(
        sink, batch_size=10**9, max_wait_time=None, name="t",
        max_pending_bytes=1000, size_of=lambda rows: 100 * len(rows),
    )
    for i in range(300):
        writer.record(i, 100)  # ten rows fill the byte budget
    writer.close()
    assert sink.rows == list(range(300))
    assert max(len(batch) for batch in sink.batches) <= 10


def test_flush_waits_for_every_row_in_the_queue_however_it_got_there() -> None:
    """The per-item loop appends to the queue and counts only bytes; a Ctrl-C between
    an append and any bookkeeping must neither make flush wait for rows that do not
    exist nor return before one that does is committed."""
    sink: SlowSink[int] = SlowSink(delay=0.01)
    writer: GroupCommitWriter[int] = GroupCommitWriter(sink, batch_size=1, max_wait_time=None, name="t")
    writer.record(0)
    writer._pending.extend([1, 2, 3])  # appended as ItemRowWriter.process does, nothing counted
    writer.flush()
    assert sink.rows == [0, 1, 2, 3]
    writer._recorded_bytes += 10**12  # a byte count off by far more than the bound ...
    writer.record(4)  # ... makes record wait for room only while rows are pending
    writer.close()
    assert sink.rows == [0, 1, 2, 3, 4]


def test_process_feeds_the_writer_in_order_within_its_bounds_and_refuses_when_closed() -> None:
    sink: SlowSink[PendingRow] = SlowSink(delay=0.005)
    writer = ItemRowWriter(sink, batch_size=10**9, max_wait_time=None, name="t", max_pending=50)
    items = list(range(1000))
    assert writer.process(lambda x: 2 * x, items, keys.input_keys(items), items, 7) is None
    writer.flush()
    assert [pickle.loads(row[ROW_OUTPUT] or b"") for row in sink.rows] == [2 * x for x in items]
    assert max(len(batch) for batch in sink.batches) <= 50  # whatever batch_size says
    writer.close()
    calls: list[int] = []
    with pytest.raises(CheckpointError, match="closed"):
        writer.process(calls.append, [1], keys.input_keys([1]), [0], 7)
    assert calls == []  # nothing computed for a row that could not be saved
