"""Item rows into SQLite for the pure-Python backend: the INSERTs, and the writer process.

``commit_rows`` is the one place that turns item rows into SQL; the pure-Python store
calls it in its writer thread, and so does the writer process.

Why a process (docs/architecture.md 8): a thread that calls ``sqlite3`` gives up the GIL
around every statement and must take it back afterwards, and while the loop runs Python
code that takes up to the interpreter's switch interval. With a fast ``fn`` the writer
thread then fell behind, the loop waited for room in the bounded buffer, and the two ran
in turn instead of side by side, missing the pure backend's throughput goal. So once a
commit holds ``PROCESS_MIN_ROWS`` rows (a loop faster than its commits; a slow ``fn``
never gets there and pays nothing), the store starts a writer process. The thread then
only marshals each batch and sends it over a socket; the process commits it on another
core, with no GIL to share, and answers once it is durable. The next batch is sent
before that answer is read (``WriterProcess.send``), so the child never waits for the
thread. (The figures, before and after, are in ``benches/README.md``.) A process that
cannot be started (no ``sys.executable``, an embedded interpreter) leaves the commits in
the thread.

``socket`` and ``subprocess`` are imported when a process is started: most runs never
start one, and they are a large part of the pure backend's import time.

The protocol, over the child's stdin (a socket) and stdout (a pipe):

- child -> parent once connected: ``R``, or ``E`` + an error (below) and it exits;
- parent -> child: frames of an 8-byte little-endian length and ``marshal.dumps(rows)``
  (rows exactly as the store recorded them; same executable, so the same marshal
  format); a zero length asks it to exit;
- child -> parent after each frame, in order: ``K`` once committed, or ``E`` + a
  4-byte length + ``marshal.dumps(message)`` after a rollback.

Ctrl-C in a terminal reaches the whole process group; the child runs in a session of
its own so that it never stops halfway, and exits at the zero frame, or when its stdin
ends (the parent died: a frame cut short is not committed).
"""

from __future__ import annotations

import marshal
import os
import select
import signal
import sqlite3
import struct
import sys
from collections import deque
from itertools import chain, groupby
from typing import Sequence

from snapperable._contract import STATUS_OK, Synchronous
from snapperable._row_checksum import plain_ok_checksum, row_checksum
from snapperable._writer import PLAIN_OK_ROW_LENGTH, PendingRow

BUSY_TIMEOUT_MS = 5000

# A commit of at least this many rows starts the writer process (see the module doc).
PROCESS_MIN_ROWS = 2048
# How long a commit waits for a started process to connect before it commits in the
# thread instead: not at all, so that the start overlaps the loop. (The tests set both
# to send every commit through the process.)
PROCESS_CONNECT_WAIT = 0.0

_ITEM_COLUMNS = (
    "key, version, status, input, output, error_type, error, traceback, attempts, started, ended"
)
# A PlainOkRow binds its 5 values (and its checksum); status and attempts are constants.
_PLAIN_OK_COLUMNS = "key, version, started, ended, output"
# Plain rows go PLAIN_ROWS_PER_INSERT to one multi-row INSERT: one statement step per
# few hundred rows instead of one per row (6 values a row stays far below SQLite's
# 32,766 bound parameters).
PLAIN_ROWS_PER_INSERT = 500


class _Inserts:
    """The INSERT statements of one checkpoint format: with the checksum column
    (format 2) or without it (format 1)."""

    def __init__(self, checksummed: bool) -> None:
        extra, mark = (", checksum", ", ?") if checksummed else ("", "")
        self.checksummed = checksummed
        self.item = f"INSERT INTO items ({_ITEM_COLUMNS}{extra}) VALUES (?,?,?,?,?,?,?,?,?,?,?{mark})"
        self.plain_head = f"INSERT INTO items ({_PLAIN_OK_COLUMNS}{extra}, status, attempts) VALUES "
        self.plain_values = f"(?, ?, ?, ?, ?{mark}, {STATUS_OK}, 1)"
        self.plain_full = self.plain(PLAIN_ROWS_PER_INSERT)

    def plain(self, rows: int) -> str:
        return self.plain_head + ", ".join([self.plain_values] * rows)


_INSERTS = {checksummed: _Inserts(checksummed) for checksummed in (False, True)}


def file_uri(path: str) -> str:
    """``path`` as a SQLite ``file:`` URI: every byte but unreserved ones and ``/``
    escaped, so that ``?``, ``#`` and ``%`` in a name stay part of it (as the Rust core)."""
    safe = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/-._~")
    return "file:" + "".join(chr(b) if b in safe else f"%{b:02X}" for b in path.encode("utf-8", "surrogateescape"))


def configure(conn: sqlite3.Connection, synchronous: Synchronous) -> None:
    """The settings of every connection that writes items (the file is in WAL mode)."""
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")


def commit_rows(conn: sqlite3.Connection, rows: Sequence[PendingRow], checksummed: bool) -> None:
    """Insert ``rows``, in order, in one ``BEGIN IMMEDIATE`` transaction; with their
    checksums if ``checksummed`` (a format-2 file)."""
    inserts = _INSERTS[checksummed]
    conn.execute("BEGIN IMMEDIATE")
    try:
        for length, run in groupby(rows, len):
            if length == PLAIN_OK_ROW_LENGTH:
                _insert_plain(conn, list(run), inserts)
            elif checksummed:
                conn.executemany(inserts.item, ((*row, row_checksum(*row)) for row in run))
            else:
                conn.executemany(inserts.item, run)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _insert_plain(conn: sqlite3.Connection, rows: Sequence[PendingRow], inserts: _Inserts) -> None:
    if inserts.checksummed:
        rows = [(*row, plain_ok_checksum(*row)) for row in rows]
    step = PLAIN_ROWS_PER_INSERT
    full = len(rows) - len(rows) % step
    if full:
        conn.executemany(
            inserts.plain_full,
            (tuple(chain.from_iterable(rows[i : i + step])) for i in range(0, full, step)),
        )
    if full < len(rows):
        rest = rows[full:]
        conn.execute(inserts.plain(len(rest)), tuple(chain.from_iterable(rest)))


# -- the parent's side ------------------------------------------------------------------
_LENGTH = struct.Struct("<Q")
_ERROR_LENGTH = struct.Struct("<I")


class WriterProcessError(Exception):
    """The writer process could not connect, failed a commit (rolled back) or ended."""


class UnmarshallableRows(Exception):
    """A batch ``marshal`` cannot carry (a value of a ``str`` subclass, say); nothing of
    it was sent."""


class WriterProcess:
    """A child process that commits batches of rows to one checkpoint file.

    Used by one thread at a time (the store's writer thread). The constructor returns
    at once; ``ready`` tells, waiting no longer than asked, whether the child has
    connected.
    """

    def __init__(self, path: str, synchronous: Synchronous, identity: tuple[int, int], checksummed: bool) -> None:
        """``identity``: (device, inode) of the file the parent opened; the child commits
        only to that file, not to another one the path names by then (the checkpoint
        moved or removed before the child connected: see ``serve``). ``checksummed``:
        the file is of format 2, whose rows carry checksums."""
        import socket
        import subprocess

        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        # -I: the child imports only this package and the standard library, whatever
        # PYTHONPATH and the user's site say. The pure backend is all it needs.
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); "
            "from snapperable._sqlite_writer import serve; serve(*sys.argv[2:])"
        )
        # Frames go over a socket, not a pipe: sent with MSG_NOSIGNAL, a child that died
        # is an error here, never a SIGPIPE that kills a process whose SIGPIPE is at its
        # default action (a CLI that restored it, an embedding application). Unbuffered
        # both ways: a child this process forks inherits them, and a buffer holding
        # half a frame would be written out when that child exits.
        self._to_child, child_end = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable, "-I", "-c", code, package_parent, path, synchronous, "%d:%d" % identity,
                    str(int(checksummed)),
                ],
                stdin=child_end.fileno(),
                stdout=subprocess.PIPE,
                bufsize=0,
                env=dict(os.environ, SNAPPERABLE_BACKEND="python"),
                start_new_session=True,  # out of reach of the terminal's Ctrl-C
            )
        except BaseException:
            self._to_child.close()
            raise
        finally:
            child_end.close()
        assert self._proc.stdout is not None
        self._answers = self._proc.stdout
        self._from_child = self._answers.fileno()
        self._owner = os.getpid()  # a forked copy of this object must not write
        # Linux: a send to a closed socket fails with EPIPE instead of raising SIGPIPE.
        self._no_sigpipe = getattr(socket, "MSG_NOSIGNAL", 0)
        self._ready = False
        self._in_flight: deque[int] = deque()  # row counts of batches sent, not answered

    def ready(self, wait: float) -> bool:
        """Has the child connected (waiting up to ``wait`` seconds)? Raises
        ``WriterProcessError`` if it could not."""
        if not self._ready and self._answer_waiting(wait):
            self._connect()
        return self._ready

    def _connect(self) -> None:
        """Read the child's first answer (waiting for it): connected, or raise."""
        self._answer()
        self._ready = True

    def _answer_waiting(self, wait: float) -> bool:
        """Is there something to read (or the end of the pipe) within ``wait`` seconds?
        ``poll``, not ``select``: a process may hold file descriptors past 1024."""
        poller = select.poll()
        poller.register(self._from_child, select.POLLIN)
        return bool(poller.poll(wait * 1000))

    def send(self, rows: list[PendingRow]) -> int:
        """Send ``rows`` to be committed, keeping one batch in flight: returns the number
        of rows of the batch before, once that one is committed (0 if there was none).
        The child commits a batch while the next is on its way, so it never waits for
        this thread to take the GIL back."""
        if not self._ready:
            self._connect()
        try:
            frame = marshal.dumps(rows)
        except ValueError as exc:  # nothing sent: the caller commits these itself
            raise UnmarshallableRows(str(exc)) from exc
        try:
            self._send_all(_LENGTH.pack(len(frame)))
            self._send_all(frame)
        except OSError as exc:  # the child is gone
            raise self._ended(f"({exc})") from exc
        self._in_flight.append(len(rows))
        return self._answers_until(1)

    def settle(self) -> int:
        """Wait until every batch sent is committed; the number of rows they held."""
        return self._answers_until(0)

    def _answers_until(self, in_flight: int) -> int:
        """Read answers until ``in_flight`` batches are left unanswered; the number of
        rows the answered ones held."""
        committed = 0
        while len(self._in_flight) > in_flight:
            self._answer()
            committed += self._in_flight.popleft()
        return committed

    def _answer(self) -> None:
        """Read one answer: return on ``R``/``K``, raise on ``E`` or the end of the pipe."""
        kind = _read_exact(self._from_child, 1)
        if kind in (b"K", b"R"):
            return
        if kind == b"E":
            head = _read_exact(self._from_child, _ERROR_LENGTH.size)
            if len(head) == _ERROR_LENGTH.size:
                body = _read_exact(self._from_child, _ERROR_LENGTH.unpack(head)[0])
                try:
                    message = marshal.loads(body)
                except (EOFError, ValueError, TypeError):  # cut short: the child died
                    pass
                else:
                    raise WriterProcessError(f"{message}")
        raise self._ended("")

    def _send_all(self, data: bytes) -> None:
        if os.getpid() != self._owner:
            raise WriterProcessError("the writer process belongs to the parent of this forked process")
        view = memoryview(data)
        while view:
            view = view[self._to_child.send(view, self._no_sigpipe) :]

    def _ended(self, detail: str) -> WriterProcessError:
        import subprocess

        try:
            status = f"exit status {self._proc.wait(timeout=1)}"
        except subprocess.TimeoutExpired:
            status = "it stopped answering"
        return WriterProcessError(f"the writer process ended unexpectedly ({status}) {detail}".rstrip())

    def close(self) -> None:
        """Ask the child to exit and wait for it: it has nothing pending by then. One
        that never connected (a ``sys.executable`` that is not Python) is killed."""
        import subprocess

        if os.getpid() != self._owner:
            return  # a forked copy: the parent's child is not this process's to stop
        if not self._ready:
            self._proc.kill()
        try:
            if self._proc.poll() is None:
                self._send_all(_LENGTH.pack(0))
        except (OSError, WriterProcessError):
            pass  # already gone
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # only a hung disk could do it: do not hang too
            self._proc.kill()
            self._proc.wait()
        finally:
            self._to_child.close()
            self._answers.close()


def _read_exact(fd: int, size: int) -> bytes:
    """``size`` bytes, or fewer if the pipe ends first."""
    parts = []
    while size:
        part = os.read(fd, size)
        if not part:
            break
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


# -- the child's side -------------------------------------------------------------------
def serve(path: str, synchronous: str, identity: str, checksummed: str) -> None:
    """The writer process's main loop (see the module doc for the protocol).

    It opens the file without creating it (``mode=rw``) and checks it is the parent's
    (``identity``, device:inode), so that a checkpoint moved or removed before it
    connected is neither recreated empty nor written in the parent's place; the parent
    then commits in its thread, to the file it has open.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        _serve(path, synchronous, identity, checksummed == "1")
    except OSError:
        # The parent died (its ends of the socket and the pipe are gone) while this
        # process answered or read: nothing to tell anyone, and no traceback for the
        # terminal it shares. A commit in progress was rolled back or completed.
        pass


def _serve(path: str, synchronous: str, identity: str, checksummed: bool) -> None:
    # Answers go straight to the pipe (os.write, no buffer): an answer to a parent that
    # died fails here, where it is caught, never in a flush at interpreter exit.
    stdin = sys.stdin.buffer
    try:
        conn = sqlite3.connect(f"{file_uri(path)}?mode=rw", uri=True, isolation_level=None)
        configure(conn, "full" if synchronous == "full" else "normal")
        conn.execute("PRAGMA application_id").fetchone()  # opens the file
        info = os.stat(path)
        if f"{info.st_dev}:{info.st_ino}" != identity:
            conn.close()
            raise sqlite3.OperationalError(f"{path} is no longer the file the checkpoint opened")
    except (sqlite3.Error, OSError) as exc:
        _send_error(exc)
        return
    try:
        _write_all(b"R")
        while True:
            head = stdin.read(_LENGTH.size)
            if len(head) < _LENGTH.size:
                break  # the parent died
            (length,) = _LENGTH.unpack(head)
            if length == 0:
                break
            frame = stdin.read(length)
            if len(frame) < length:
                break  # the parent died while sending: nothing of this frame is saved
            try:
                commit_rows(conn, marshal.loads(frame), checksummed)
            except Exception as exc:
                # Stops at the first failure, as the Rust writer does: nothing sent after
                # it is committed, so what is saved stays in the order processed.
                _send_error(exc)
                break
            _write_all(b"K")
    finally:
        conn.close()


def _write_all(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(_ANSWERS_FD, view) :]


_ANSWERS_FD = 1  # the child's stdout: the pipe the parent reads answers from


def _send_error(exc: Exception) -> None:
    # SQLite's own message, as a commit in the parent's thread reports it; any other
    # failure (none is expected) with its class.
    text = str(exc) if isinstance(exc, sqlite3.Error) else f"{type(exc).__name__}: {exc}"
    body = marshal.dumps(text)
    _write_all(b"E" + _ERROR_LENGTH.pack(len(body)) + body)
