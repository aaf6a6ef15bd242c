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
from snapperable.errors import CheckpointCorruptError, CheckpointError, CheckpointLockedError, WriterError

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
        raise CheckpointError(f"cannot create checkpoint {path}: {exc}") from exc
    os.close(fd)


def vet_place(path: str, is_own_format: Callable[[bytes], bool]) -> None:
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
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise CheckpointError(f"cannot create checkpoint {path}: the directory {directory} {what}")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return  # a new checkpoint
    except OSError as exc:
        raise CheckpointError(f"cannot open checkpoint {path}: {exc}") from exc
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"checkpoint {path} is a directory; give the path of a file (in it)")
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"checkpoint {path} is not a regular file")
    if not os.path.exists(os.path.realpath(path) + LOCK_SUFFIX) and info.st_size:
        try:
            with open(path, "rb") as file:
                head = file.read(FORMAT_HEAD_SIZE)
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
        if not is_own_format(head):
            raise CheckpointCorruptError(
                f"{path} is not a snapperable checkpoint of this storage's format; it is left "
                "as it is: give another path (or the storage of its format)"
            )
    if not os.access(path, os.W_OK):
        why = os.strerror(errno.EROFS) if _on_read_only_mount(path) else "no write permission, or immutable"
        raise CheckpointError(f"checkpoint {path} is read-only ({why}): start() needs to write to it")


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

    def __init__(self, path: str, is_own_format: Callable[[bytes], bool]) -> None:
        self.path = path
        self._real = os.path.realpath(path)
        self._lock_fd: Optional[int] = None
        with _registry_lock:
            holder = _held_in_process.get(self._real)
            if holder == os.getpid():
                raise CheckpointLockedError(
                    f"checkpoint {path} is already held by another Snapper in this process; "
                    "close it (leave its `with` block) first"
                )
            vet_place(path, is_own_format)
            self._lock_fd = self._lock_across_processes()
            _held_in_process[self._real] = os.getpid()

    def _lock_across_processes(self) -> int:
        lock_path = self._real + LOCK_SUFFIX
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        except OSError as exc:
            raise CheckpointError(
                f"cannot create lock file {lock_path} beside checkpoint {self.path}, which "
                f"start() needs: {exc}"
            ) from exc
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointLockedError(
                    f"checkpoint {self.path} is held by another process (pid {holder}); "
                    "wait for it to finish or stop it"
                ) from None
            raise CheckpointError(f"cannot lock {lock_path}: {exc}") from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError as exc:
            os.close(fd)  # which drops the lock just taken
            raise CheckpointError(f"cannot write the holder's pid to {lock_path}: {exc}") from exc
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
        hold = FileHold(self.path, self._is_own_format)
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
            raise CheckpointError(f"cannot open checkpoint {self.path}: {exc}") from exc
        if stat.S_ISDIR(info.st_mode):
            raise CheckpointError(f"checkpoint {self.path} is a directory; give the path of a file (in it)")
        if info.st_size == 0:
            return EmptyCheckpoint(self.path)
        return self._open_reader()

    @abstractmethod
    def _open_reader(self) -> CheckpointReader:
        """Open the existing, non-empty file for reading only."""

    @abstractmethod
    def _is_own_format(self, head: bytes) -> bool:
        """Could a file starting with ``head`` (``FORMAT_HEAD_SIZE`` bytes, or all of a
        shorter file) be, or become, a checkpoint of this storage? Checked before the
        lock file is made, so that a foreign file gets no lock file beside it."""

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

    def rows(self, version: Optional[int]) -> Iterator[RowInfo]:
        return iter(())

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
        now = "is now another file" if os.path.exists(self.store.path) else "no longer exists"
        raise WriterError(
            f"checkpoint {self.store.path} was removed or renamed while it was open (the path "
            f"{now}): every row saved so far was committed to the file that was open, "
            "which holds them all if it was moved; move it back, or start over with "
            "snapperable.move_checkpoint"
        )

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
