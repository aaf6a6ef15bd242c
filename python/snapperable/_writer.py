"""The pure-Python pending buffer and group-commit writer thread (docs/architecture.md 7).

Used by the pure-Python SQLite store and by the pickle store; the Rust core has its own
(``rust/writer.rs``) with the same behaviour. Items are handed over with ``record``, or
by the per-item loop ``ItemRowWriter.process``, which only append to a queue; a
background thread commits whatever has accumulated in one transaction, so a slow
commit (an fsync) groups every item that finished meanwhile and the per-item cost stays
small even at ``batch_size=1``.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections import deque
from operator import itemgetter
from typing import Any, Callable, Generic, Optional, Sequence, Tuple, TypeVar, Union

from snapperable._contract import KEY_SIZE, PICKLE_PROTOCOL, ROW_OUTPUT, STATUS_OK, ItemRow, ProcessStop
from snapperable.errors import CheckpointError, WriterError


# At most this many rows wait for the writer; `record` blocks beyond it. A writer that
# lags (a slow disk, big outputs, or, in pure Python, a writer that must share the GIL
# with the loop) would otherwise let the buffer grow without bound: memory, and the
# work a crash can lose, both grow with it. (Besides the pending rows, the writer holds
# the batch it commits, and with a pipelined commit one more on its way.)
MAX_PENDING_ROWS = 16_384
# ... and at most this many bytes of pickled output (as in the Rust core), since large
# outputs would make even 16,384 rows gigabytes.
MAX_PENDING_BYTES = 64 << 20

Row = TypeVar("Row")

# `ItemRowWriter.process` brings the writer's byte count up to date at least this often.
_UNCOUNTED_BYTES = 1 << 20

# What ``process`` records for nearly every item, a plain success (ok at the first
# attempt, no input or error kept): (key, version, started, ended, output). Smaller and
# quicker to build than an ItemRow, it is already the parameter order of the SQLite
# store's insert; its output sits at ROW_OUTPUT as in an ItemRow. A pending row is
# either; its length tells which.
PlainOkRow = Tuple[bytes, int, float, float, bytes]
PendingRow = Union[ItemRow, PlainOkRow]
PLAIN_OK_ROW_LENGTH = 5


def item_row(row: PendingRow) -> ItemRow:
    """``row`` as an ItemRow."""
    if len(row) != PLAIN_OK_ROW_LENGTH:
        return row  # type: ignore[return-value]  # the other shape
    key, version, started, ended, output = row  # type: ignore[misc]
    return (key, version, STATUS_OK, None, output, None, None, None, 1, started, ended)


class GroupCommitWriter(Generic[Row]):
    """Commits recorded rows in the background, grouping what accumulates.

    A commit starts once ``batch_size`` rows are pending, once the oldest pending row
    has waited ``max_wait_time`` seconds, or when ``flush``/``close`` asks. A failed
    commit stops the writer; its exception is raised, as ``WriterError``, by every later
    ``record``, ``flush`` and ``close``.

    ``commit(batch)`` returns None once the batch is durable. A pipelined commit (the
    SQLite store's writer process) may instead only send the batch on and return how
    many rows of earlier batches became durable meanwhile, so that the next batch is
    on its way while one is being committed; ``settle()`` then waits for everything
    sent and returns how many rows became durable. The writer settles before it waits
    for more rows, so ``flush`` and ``close`` still mean durable.
    """

    def __init__(
        self,
        commit: Callable[[list[Row]], Optional[int]],
        *,
        settle: Callable[[], int] = lambda: 0,
        batch_size: int,
        max_wait_time: Optional[float],
        name: str,
        max_pending: int = MAX_PENDING_ROWS,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        size_of: Callable[[list[Row]], int] = len,
    ) -> None:
        self._commit = commit
        self._settle = settle
        self._max_pending = max_pending
        self._max_pending_bytes = max_pending_bytes
        # Bytes given to record() minus bytes the writer took: each counter has one
        # writer thread, so neither needs the lock. `size_of` measures a taken batch.
        self._recorded_bytes = 0
        self._taken_bytes = 0
        self._size_of = size_of
        self._batch_size = batch_size
        self._max_wait_time = max_wait_time
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        # The hand-over: `record` appends without taking the lock (deque.append and
        # popleft are atomic), so the per-item cost is an append and a flag test.
        self._pending: deque[Row] = deque()
        # Monotonic time the oldest pending row arrived, or earlier: set for a first
        # pending row, and by the writer when it takes a batch (rows the loop appends
        # while a commit runs are not timed one by one, and none of them came earlier).
        self._oldest_pending_at = 0.0
        self._taken = 0  # rows the writer has taken from `_pending`; under the lock
        self._committed = 0  # rows committed so far; written by the writer only
        self._flush_wanted = 0  # a flush waits for `_committed` to reach this
        self._writer_idle = False  # set, under the lock, before the writer checks for work
        self._closing = False
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name=f"snapperable-writer {name}", daemon=True)
        self._thread.start()

    def record(self, row: Row, size: int = 0) -> None:
        """Hand ``row`` (of ``size`` bytes, as ``size_of`` counts them) to the writer."""
        if self._error is not None or self._closing:
            self._refuse()
        self._pending.append(row)
        self._recorded_bytes += size
        self._after_recording()

    def _after_recording(self) -> None:
        """Raise the writer's failure, time the oldest pending row, wake an idle writer,
        or wait for room: whatever rows just appended call for."""
        if self._error is not None:
            self._raise_error()
        waiting = len(self._pending)
        if waiting == 1 and self._max_wait_time is not None:
            self._oldest_pending_at = time.monotonic()  # it is the oldest pending
        # No lost wake-up: the writer sets `_writer_idle` before it looks at `_pending`,
        # so either it sees these rows, or this test sees it idle and wakes it (to
        # commit, or to arm its max_wait_time timer).
        if self._writer_idle and (waiting >= self._batch_size or self._max_wait_time is not None):
            with self._cond:
                self._cond.notify()
        if waiting >= self._max_pending or self._pending_bytes() >= self._max_pending_bytes:
            self._wait_for_room()

    def _refuse(self) -> None:
        if self._error is not None:
            self._raise_error()
        raise CheckpointError.closed(self._name)

    def _pending_bytes(self) -> int:
        return self._recorded_bytes - self._taken_bytes

    def _wait_for_room(self) -> None:
        """Block until the writer has taken the pending rows (it commits a full buffer
        whatever ``batch_size`` says)."""
        with self._cond:
            self._cond.notify_all()
            while self._error is None and (
                len(self._pending) >= self._max_pending
                or (self._pending and self._pending_bytes() >= self._max_pending_bytes)
            ):
                self._cond.wait()
            if self._error is not None:
                self._raise_error()

    def flush(self) -> None:
        """Return once every row recorded so far is committed."""
        with self._cond:
            target = self._taken + len(self._pending)
            self._flush_wanted = max(self._flush_wanted, target)
            self._cond.notify_all()
            while self._committed < target and self._error is None:
                self._cond.wait()
            if self._error is not None:
                self._raise_error()

    def unsaved(self) -> int:
        """Rows recorded but not yet committed (read without the lock: a snapshot)."""
        return self._taken + len(self._pending) - self._committed

    def close(self) -> None:
        """Flush, then stop the thread. Idempotent; raises a writer failure if there was one."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()
        with self._cond:
            if self._error is not None:
                self._raise_error()

    @property
    def stopped(self) -> bool:
        """Has the writer thread ended (so nothing can still be writing)?"""
        return not self._thread.is_alive()

    def _raise_error(self) -> None:
        assert self._error is not None
        raise WriterError.stopped_by(self._name, self._error) from self._error

    def _ready(self) -> bool:
        """Is there a commit to start now? Called with the lock held."""
        if not self._pending:
            return False
        if (
            self._closing
            or len(self._pending) >= min(self._batch_size, self._max_pending)
            or self._pending_bytes() >= self._max_pending_bytes
            or self._flush_wanted > self._committed
        ):
            return True
        wait = self._max_wait_time
        return wait is not None and time.monotonic() - self._oldest_pending_at >= wait

    def _run(self) -> None:
        pending = self._pending
        unsettled = 0  # rows a pipelined commit has sent on, not yet durable
        while True:
            with self._cond:
                self._writer_idle = True
                while not unsettled and not self._ready():
                    if self._closing and not pending:
                        return
                    timeout = None
                    if pending and self._max_wait_time is not None:
                        timeout = self._oldest_pending_at + self._max_wait_time - time.monotonic()
                    self._cond.wait(timeout)
                self._writer_idle = False
                batch = [pending.popleft() for _ in range(len(pending))] if self._ready() else []
                self._taken += len(batch)
                if batch and self._max_wait_time is not None:
                    self._oldest_pending_at = time.monotonic()  # see __init__
                self._taken_bytes += self._size_of(batch)
                self._cond.notify_all()  # a caller waiting for room may go on
            try:
                if batch:
                    durable = self._commit(batch)
                    if durable is None:
                        durable = len(batch)
                    else:
                        unsettled += len(batch) - durable
                else:  # nothing to start: wait for what was sent
                    durable = self._settle()
                    unsettled -= durable
            except BaseException as exc:  # report anything; the caller decides
                with self._cond:
                    self._error = exc
                    self._writer_idle = True  # so that the loop's one test sees it
                    self._cond.notify_all()
                return
            with self._cond:
                self._committed += durable
                self._cond.notify_all()


class ItemRowWriter(GroupCommitWriter[PendingRow]):
    """The writer of the pure stores' item rows, with the per-item loop that feeds it.

    ``process`` is its one appending method besides ``record``: the hot loop of
    ``CheckpointStore.process``. It is a method of the writer because of how it feeds
    the buffer. Each row costs an append and one test: the loop appends to ``_pending``
    itself and brings the byte count up to date in bulk, and the rest of ``record``'s
    work (raising the writer's failure, timing the oldest row, waking the writer,
    waiting for room) runs only when the writer is idle, the buffer is full, or many
    bytes went uncounted. A writer that fails or stops sets ``_writer_idle`` too, so
    that the one test notices everything. (An appending method that takes rows from
    the store, over a generator or one call per row, costs the loop more:
    ``benches/README.md``.)

    Rows are not counted by the loop: ``flush`` counts the deque itself, so a Ctrl-C at
    any point can neither make it wait for rows that do not exist nor skip one that
    does. (Bytes only bound memory; a Ctrl-C may leave them off by one chunk, and
    ``_wait_for_room`` never waits on an empty deque.)
    """

    def process(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        keys: bytes,
        positions: Sequence[int],
        version: int,
    ) -> Optional[ProcessStop]:
        """``CheckpointStore.process`` (see ``_contract``): a plain ok row for each item.

        Refuses before the first item, so that nothing is computed for rows that could
        not be saved.
        """
        if self._error is not None or self._closing:
            self._refuse()
        pending = self._pending
        append = pending.append
        max_rows = self._max_pending
        now = time.time
        dumps = pickle.dumps
        protocol = PICKLE_PROTOCOL
        key_size = KEY_SIZE
        size = 0  # bytes appended, not yet in _recorded_bytes
        try:
            for index, position in enumerate(positions):
                started = now()
                try:
                    output = fn(items[position])
                except BaseException as exc:
                    return index, started, exc, False, None
                try:
                    payload = dumps(output, protocol)
                except BaseException as exc:
                    return index, started, exc, True, output
                at = position * key_size
                append((keys[at : at + key_size], version, started, now(), payload))
                size += len(payload)
                if self._writer_idle or len(pending) >= max_rows or size >= _UNCOUNTED_BYTES:
                    counted, size = size, 0
                    self._recorded_bytes += counted
                    self._after_recording()
        finally:
            self._recorded_bytes += size
        return None


class WriterBackedStore:
    """The write half of the pure-Python stores (SQLite and pickle).

    Rows go through an ``ItemRowWriter`` to the subclass's ``_commit``; ``close``
    stops the writer, then ``_release`` lets go of the file.
    """

    flush: Callable[[], None]  # bound straight to the writer's
    unsaved: Callable[[], int]  # likewise

    def _start_writer(self, path: str, batch_size: int, max_wait_time: Optional[float]) -> None:
        self._writer = ItemRowWriter(
            self._commit,
            settle=self._settle,
            batch_size=batch_size,
            max_wait_time=max_wait_time,
            name=path,
            size_of=_output_bytes,
        )
        self.flush = self._writer.flush
        self.unsaved = self._writer.unsaved
        self._closed = False

    def record(self, row: ItemRow) -> None:
        self._writer.record(row, len(row[ROW_OUTPUT] or b""))

    def process(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        keys: bytes,
        positions: Sequence[int],
        version: int,
    ) -> Optional[ProcessStop]:
        """The per-item hot loop of the pure-Python backend (contract in ``_contract``)."""
        return self._writer.process(fn, items, keys, positions, version)

    def _commit(self, rows: list[PendingRow]) -> Optional[int]:
        """Commit ``rows`` (see ``GroupCommitWriter`` for a pipelined commit's return)."""
        raise NotImplementedError

    def _settle(self) -> int:
        """Wait for rows a pipelined ``_commit`` sent on; how many became durable."""
        return 0

    def _release(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush, stop the writer and release the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.close()
        finally:
            # A Ctrl-C can interrupt the wait for the writer; the file then stays open
            # for the (daemon) writer to finish its commit, rather than closing under it.
            if self._writer.stopped:
                self._release()


_OUTPUT = itemgetter(ROW_OUTPUT)


def _output_bytes(rows: list[PendingRow]) -> int:
    """What ``process`` counts of a row's size: its pickled output."""
    try:  # in C: the writer thread holds the GIL meanwhile, and the loop waits for it
        return sum(map(len, map(_OUTPUT, rows)))
    except TypeError:  # a failed item's row, which has no output
        return sum(len(row[ROW_OUTPUT] or b"") for row in rows)
