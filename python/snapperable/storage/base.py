"""What every snapshot storage shares: the file-holding rule and private file creation.

A storage object is a description (a path and options); ``open`` makes it an open
checkpoint: it takes the hold on the file, then asks the subclass for its
``CheckpointStore``. Only one holder per checkpoint file may exist at once, in one
process or across processes:

- within a process, a registry keyed by the file's real path: two stores on one file in
  one process would corrupt it when they are different SQLite libraries (rusqlite
  bundles its own; sqlite.org/howtocorrupt.html 2.3) and race each other otherwise;
- across processes, an exclusive POSIX record lock (``lockf``) on ``<file>.lock``,
  which holds the holder's pid. A POSIX lock belongs to the process: a child forked
  while it is held (a worker started inside ``fn``) does not inherit it, so it cannot
  keep the file held after the parent lets go, as it would an ``flock``.
  The kernel drops it when the holder dies, even by SIGKILL, so a crash never leaves a
  stale lock behind. The lock file is left in place: removing it would let two
  processes lock two different inodes of the same name.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from abc import ABC, abstractmethod
from typing import Generic, Optional, TypeVar

from snapperable._contract import CheckpointStore
from snapperable.errors import CheckpointError, CheckpointLockedError

R = TypeVar("R")

PRIVATE_FILE_MODE = 0o600

_registry_lock = threading.Lock()
_held_in_process: dict[str, int] = {}  # real path -> pid that took the hold


def create_private(path: str) -> None:
    """Create ``path`` with mode 0600 if it does not exist; an existing file is untouched."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    except OSError as exc:
        raise CheckpointError.cannot_create(path, str(exc)) from exc
    os.close(fd)


class FileHold:
    """The exclusive hold on one checkpoint file; ``release`` gives it back."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._real = os.path.realpath(path)
        self._lock_fd: Optional[int] = None
        with _registry_lock:
            holder = _held_in_process.get(self._real)
            if holder == os.getpid():
                raise CheckpointLockedError.held_in_this_process(path)
            self._lock_fd = self._lock_across_processes()
            _held_in_process[self._real] = os.getpid()

    def _lock_across_processes(self) -> int:
        lock_path = self._real + ".lock"
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        except OSError as exc:
            raise CheckpointError.failed(self.path, f"cannot create lock file {lock_path}: {exc}") from exc
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointLockedError.held_by_process(self.path, holder) from None
            raise CheckpointError.failed(self.path, f"cannot lock {lock_path}: {exc}") from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError as exc:
            os.close(fd)  # which drops the lock just taken
            raise CheckpointError.failed(self.path, f"cannot write the holder's pid to {lock_path}: {exc}") from exc
        return fd

    def release(self) -> None:
        with _registry_lock:
            if self._lock_fd is None:
                return
            if _held_in_process.get(self._real) == os.getpid():
                del _held_in_process[self._real]
            os.close(self._lock_fd)  # closing the descriptor drops the lock
            self._lock_fd = None


class SnapshotStorage(ABC, Generic[R]):
    """A place to keep a checkpoint. ``R`` is the type of the outputs it keeps."""

    path: str

    def open(self, batch_size: int, max_wait_time: Optional[float]) -> "OpenCheckpoint":
        """Take the hold on the file and open it for reading and appending."""
        hold = FileHold(self.path)
        try:
            create_private(self.path)
            store = self._open_store(batch_size, max_wait_time)
        except BaseException:
            hold.release()
            raise
        return OpenCheckpoint(store, hold)

    @abstractmethod
    def _open_store(self, batch_size: int, max_wait_time: Optional[float]) -> CheckpointStore:
        """Open the (existing, possibly empty) file as a store."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"


class OpenCheckpoint:
    """An open store together with the hold on its file; ``close`` releases both."""

    def __init__(self, store: CheckpointStore, hold: FileHold) -> None:
        self.store = store
        self.pid = os.getpid()
        self._hold = hold

    def close(self) -> None:
        try:
            self.store.close()
        finally:
            self._hold.release()
