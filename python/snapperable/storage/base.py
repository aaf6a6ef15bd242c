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
import stat
import threading
from abc import ABC, abstractmethod
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

from snapperable import _backend
from snapperable._contract import CheckpointReader, CheckpointStore, KeySet, RowInfo, VersionRow
from snapperable.errors import CheckpointCorruptError, CheckpointError, CheckpointLockedError, CheckpointMovedError

R = TypeVar("R")

PRIVATE_FILE_MODE = 0o600
LOCK_SUFFIX = ".lock"
# Bytes of a file's start that tell a storage whether it is of its format (the SQLite
# header and the b-tree header of its first page).
FORMAT_HEAD_SIZE = 108

_registry_lock = threading.Lock()
_held_in_process: dict[str, int] = {}  # real path -> pid that took the hold


def create_private(path: str) -> None:
    """Create ``path`` with mode 0600 if it does not exist; an existing file is not opened."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    except FileExistsError:
        return
    except OSError as exc:
        raise CheckpointError.cannot_create(path, str(exc)) from exc
    os.close(fd)


def vet_place(path: str, foreign_format: Callable[[bytes], Optional[str]]) -> None:
    """Refuse, before any lock file is made beside it, a path that cannot be a checkpoint.

    A missing directory is named as such (not as the lock file that could not be
    created); a directory, a device or a file of another format is refused; so is an
    existing file this process cannot write (read-only, immutable, on a read-only
    mount). A file whose lock file exists was a checkpoint before: its format is left
    to the store to check, so that this never opens (and closes) a descriptor on a file
    another thread of this process may have open in SQLite, which would drop SQLite's
    POSIX locks on it (sqlite.org/howtocorrupt.html 2.2).
    """
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise CheckpointError.no_directory(path, directory, os.path.exists(directory))
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return  # a new checkpoint
    except OSError as exc:
        raise CheckpointError.failed(path, str(exc)) from exc
    _refuse_other_than_a_file(path, info)
    if not os.path.exists(os.path.realpath(path) + LOCK_SUFFIX) and info.st_size:
        try:
            with open(path, "rb") as file:
                head = file.read(FORMAT_HEAD_SIZE)
        except OSError as exc:
            raise CheckpointError.failed(path, f"cannot read it: {exc}") from exc
        reason = foreign_format(head)
        if reason is not None:
            raise CheckpointCorruptError.not_a_checkpoint(path, reason)
    if not os.access(path, os.W_OK):
        why = os.strerror(errno.EROFS) if _on_read_only_mount(path) else "no write permission, or immutable"
        raise CheckpointError.read_only(path, why)


def _refuse_other_than_a_file(path: str, info: os.stat_result) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError.not_a_file(path, "a directory")
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError.not_a_file(path, "not a regular file (a device or a pipe?)")


def fsync_directory(path: str) -> None:
    """Make the directory entry of the file ``path`` durable (a new or moved file)."""
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _on_read_only_mount(path: str) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


class FileHold:
    """The exclusive hold on one checkpoint file; ``release`` gives it back."""

    def __init__(self, path: str, foreign_format: Callable[[bytes], Optional[str]]) -> None:
        self.path = path
        self._real = os.path.realpath(path)
        self._lock_fd: Optional[int] = None
        with _registry_lock:
            holder = _held_in_process.get(self._real)
            if holder == os.getpid():
                raise CheckpointLockedError.held_in_this_process(path)
            vet_place(path, foreign_format)
            self._lock_fd = self._lock_across_processes()
            _held_in_process[self._real] = os.getpid()

    def _lock_across_processes(self) -> int:
        lock_path = self._real + LOCK_SUFFIX
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        except OSError as exc:
            raise CheckpointError.failed(
                self.path, f"cannot create lock file {lock_path}, which start() needs: {exc}"
            ) from exc
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
        hold = FileHold(self.path, self._foreign_format)
        try:
            create_private(self.path)
            store = self._open_store(batch_size, max_wait_time)
        except BaseException:
            hold.release()
            raise
        return OpenCheckpoint(store, hold)

    def open_reader(self) -> CheckpointReader:
        """Open the checkpoint for reading only: no hold, no lock file, nothing created
        or written, so it works while a run in another process holds the file and on a
        read-only file or directory. A checkpoint that does not exist yet (or an empty
        file) reads as empty."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return EmptyCheckpoint(self.path)
        except OSError as exc:
            raise CheckpointError.failed(self.path, str(exc)) from exc
        _refuse_other_than_a_file(self.path, info)
        if info.st_size == 0:
            return EmptyCheckpoint(self.path)
        return self._open_reader()

    @abstractmethod
    def _open_reader(self) -> CheckpointReader:
        """Open the existing, non-empty file for reading only."""

    @abstractmethod
    def _foreign_format(self, head: bytes) -> Optional[str]:
        """Why a file starting with ``head`` (``FORMAT_HEAD_SIZE`` bytes, or all of a
        shorter file) cannot be, or become, a checkpoint of this storage; None if it
        can. Checked before the lock file is made, so that a foreign file gets no lock
        file beside it."""

    @abstractmethod
    def _open_store(self, batch_size: int, max_wait_time: Optional[float]) -> CheckpointStore:
        """Open the (existing, possibly empty) file as a store."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"


class EmptyCheckpoint:
    """The reads of a checkpoint that does not exist yet: reading creates nothing."""

    def __init__(self, path: str) -> None:
        self.path = path

    def versions(self) -> list[VersionRow]:
        return []

    def key_set(self, version: Optional[int], status: int) -> KeySet:
        return _backend.backend.new_key_set()

    def key_sets(self, version: int) -> tuple[KeySet, KeySet]:
        return _backend.backend.new_key_set(), _backend.backend.new_key_set()

    def outputs_for(self, version: int, keys: bytes) -> list[Any]:
        return []

    def all_outputs(self, version: int) -> list[Any]:
        return []

    def rows(self, version: Optional[int], with_output: bool = False) -> Iterator[RowInfo]:
        return iter(())

    def meta(self) -> dict[str, str]:
        return {}

    def integrity_check(self) -> Optional[str]:
        return None

    def close(self) -> None:
        pass


class OpenCheckpoint:
    """An open store together with the hold on its file; ``close`` releases both.

    It also notices the file being removed or renamed under it (``rm``, ``mv``): the
    store keeps writing to the file it opened, which the path no longer names, so a
    later run would start again from nothing. ``verify_in_place`` compares the file the
    store opened (device and inode) with the one the path names now.
    """

    def __init__(self, store: CheckpointStore, hold: FileHold) -> None:
        self.store = store
        self.pid = os.getpid()
        self._hold = hold
        self._identity = _identity_of(store.path)
        self._move_reported = False

    def verify_in_place(self) -> None:
        """Raise ``WriterError`` if the path no longer names the file the store opened,
        after committing every recorded row to that file and making it hold them by
        itself (a SQLite WAL copied into it), so that a moved file is complete."""
        if self._move_reported or self._identity is None or _identity_of(self.store.path) == self._identity:
            return
        self._move_reported = True  # once: close() after start() raised must not repeat it
        self.store.fold_wal_into_file()
        raise CheckpointMovedError.under_run(self.store.path, os.path.exists(self.store.path))

    def close(self) -> None:
        try:
            try:
                self.verify_in_place()
            finally:
                self.store.close()
        finally:
            self._hold.release()


def _identity_of(path: str) -> Optional[tuple[int, int]]:
    """(device, inode) of the file ``path`` names, None if none."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def holder_pid(path: str) -> Optional[int]:
    """The pid of the process holding the checkpoint at ``path`` (this process's, if a
    Snapper here holds it), or None when it is free.

    Only looks: the lock file is opened read-only (never created) and tested with
    ``F_TEST``, which takes no lock. A holder's pid is what it wrote into the lock
    file; 0 if it cannot be read.
    """
    real = os.path.realpath(path)
    with _registry_lock:
        if _held_in_process.get(real) == os.getpid():
            return os.getpid()
    try:
        fd = os.open(real + ".lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: never held (or not by this version's Snapper)
    try:
        try:
            os.lockf(fd, os.F_TEST, 0)
            return None
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise CheckpointError.failed(path, f"cannot test its lock file: {exc}") from exc
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else 0
    finally:
        os.close(fd)
