"""The one exception hierarchy of snapperable, and the one wording of each failure.

Both backends raise these same classes: the Rust core imports them
(``pyo3::import_exception!``) and maps its error enum onto them in one place
(``rust/errors.rs``), so callers never see a backend-specific exception type.

Each failure a checkpoint can meet, whichever backend or storage meets it, is built by
one classmethod here from structured arguments (``CheckpointFormatError.newer(path,
found, supported)``): ``_pure.py``, the storages and the Rust core all call these, so
the words of a message live in this file only. What varies inside a message (SQLite's
own text, an offset in a pickle file) is an argument.
"""

from __future__ import annotations

from typing import Optional, TypeVar

from snapperable._contract import KEY_SIZE

_Checkpoint = TypeVar("_Checkpoint", bound="CheckpointError")
_Corrupt = TypeVar("_Corrupt", bound="CheckpointCorruptError")

# What every message about a damaged or foreign file ends with.
_KEPT = "snapperable never resets such a file: move it aside (or restore a backup) and run again"


class SnapperableError(Exception):
    """Base class of every error snapperable raises on its own account."""


class CheckpointError(SnapperableError, OSError):
    """A checkpoint file could not be opened, read or written."""

    @classmethod
    def failed(cls: type[_Checkpoint], path: str, detail: str) -> _Checkpoint:
        """Opening, reading or writing ``path`` failed; ``detail`` says how (for SQLite,
        its own message)."""
        return cls(f"checkpoint {path}: {detail}")

    @classmethod
    def cannot_create(cls: type[_Checkpoint], path: str, reason: str) -> _Checkpoint:
        return cls.failed(path, f"cannot create the file: {reason}")

    @classmethod
    def closed(cls: type[_Checkpoint], path: str) -> _Checkpoint:
        """The checkpoint at ``path`` was used after ``close()``."""
        return cls(f"checkpoint {path} is closed; open it again to use it")

    @classmethod
    def no_directory(cls: type[_Checkpoint], path: str, directory: str, exists: bool) -> _Checkpoint:
        """The directory ``path`` would be created in is missing (or is not a directory)."""
        what = "is not a directory" if exists else "does not exist"
        return cls.failed(path, f"cannot create it: the directory {directory} {what}")

    @classmethod
    def not_a_file(cls: type[_Checkpoint], path: str, what: str) -> _Checkpoint:
        """``path`` names a directory (``what``: "a directory") or a device, not a file."""
        return cls.failed(path, f"it is {what}, not a checkpoint file; give the path of a file")

    @classmethod
    def read_only(cls: type[_Checkpoint], path: str, why: str) -> _Checkpoint:
        """``start()`` on an existing checkpoint that cannot be written (``why``)."""
        return cls.failed(path, f"it is read-only ({why}): start() needs to write to it; reads do not")

    @classmethod
    def cannot_move(cls: type[_Checkpoint], path: str, target: str, why: str) -> _Checkpoint:
        return cls.failed(path, f"cannot move it to {target}: {why}")


class CheckpointCorruptError(CheckpointError, ValueError):
    """A checkpoint file is damaged beyond the recoverable torn tail, or is not a checkpoint.

    snapperable never deletes or resets such a file: move it aside (or restore a backup)
    and run again.
    """

    @classmethod
    def not_a_checkpoint(cls: type[_Corrupt], path: str, reason: str) -> _Corrupt:
        """``path`` is some other file: ``reason`` says what gave it away."""
        return cls(f"{path} is not a snapperable checkpoint ({reason}); {_KEPT}")

    @classmethod
    def damaged(cls: type[_Corrupt], path: str, problem: str) -> _Corrupt:
        """``path`` is a checkpoint, damaged: ``problem`` says where or how."""
        return cls(f"checkpoint {path} is damaged: {problem}; {_KEPT}")

    @classmethod
    def bad_row(cls: type[_Corrupt], path: str, seq: Optional[int], problem: str) -> _Corrupt:
        """Item row ``seq`` (None if even that is unreadable) is not what the format says."""
        return cls.damaged(path, f"item row {'?' if seq is None else seq} {problem}")

    @classmethod
    def bad_key(cls: type[_Corrupt], path: str, seq: Optional[int]) -> _Corrupt:
        return cls.bad_row(path, seq, f"has a key that is not {KEY_SIZE} bytes")

    @classmethod
    def bad_version_record(cls: type[_Corrupt], path: str, record: object) -> _Corrupt:
        """A function version's record (its fields as read) is not valid."""
        return cls.damaged(path, f"a function version record is not valid: {record!r}")

    @classmethod
    def unreadable_output(cls: type[_Corrupt], path: str, cause: BaseException) -> _Corrupt:
        """A saved output no longer unpickles (say, its class was renamed)."""
        return cls.damaged(path, f"a saved output cannot be unpickled ({type(cause).__name__}: {cause})")


class CheckpointFormatError(CheckpointCorruptError):
    """A checkpoint was written by a newer, incompatible format version."""

    @classmethod
    def newer(cls, path: str, found: int, supported: int) -> CheckpointFormatError:
        return cls(
            f"checkpoint {path} has format version {found}, newer than this snapperable reads "
            f"(up to {supported}); upgrade snapperable to resume it"
        )


class CheckpointLockedError(CheckpointError):
    """Another Snapper, in this process or another one, holds the checkpoint file."""

    @classmethod
    def held_in_this_process(cls, path: str) -> CheckpointLockedError:
        return cls(
            f"checkpoint {path} is already held by another Snapper in this process; "
            "close it (leave its `with` block) first"
        )

    @classmethod
    def held_by_process(cls, path: str, holder: str) -> CheckpointLockedError:
        """``holder``: the pid the lock file names (``"unknown"`` if it names none)."""
        return cls(f"checkpoint {path} is held by another process (pid {holder}); wait for it to finish or stop it")


class WriterError(CheckpointError):
    """The background writer failed to save results; nothing after the failure was saved."""

    @classmethod
    def stopped_by(cls, path: str, cause: BaseException) -> WriterError:
        """The writer of ``path`` failed with ``cause`` (which the caller chains)."""
        return cls(
            f"the background writer failed to save results to {path}; nothing recorded after "
            f"the failure was saved: {cause}"
        )


class CheckpointMovedError(WriterError):
    """The checkpoint file was removed or renamed while a run wrote to it."""

    @classmethod
    def under_run(cls, path: str, still_there: bool) -> CheckpointMovedError:
        now = "is now another file" if still_there else "no longer exists"
        return cls(
            f"checkpoint {path} was removed or renamed while it was open (the path {now}): "
            "every row saved so far was committed to the file that was open, which holds "
            "them all if it was moved; move it back, or start over with "
            "snapperable.move_checkpoint"
        )


class ForkedProcessError(SnapperableError, RuntimeError):
    """A Snapper (or its open checkpoint) was used in a child process forked after it opened."""

    @classmethod
    def opened_in(cls, path: str, owner: int) -> ForkedProcessError:
        """The checkpoint at ``path`` was opened by process ``owner``, not this child."""
        return cls(
            f"checkpoint {path} was opened in process {owner}; a forked child cannot use it: "
            "create a new Snapper in the child, on a checkpoint of its own"
        )


class FunctionChangedError(SnapperableError, RuntimeError):
    """The function version changed and the policy is ``on_version_change="raise"``."""


class TooManyConsecutiveErrors(SnapperableError, RuntimeError):
    """``max_consecutive_exceptions`` consecutive items failed; the run was halted."""


class ItemKeyError(SnapperableError, TypeError):
    """An item's identity cannot be computed: ``key=`` raised for it, or its key value
    (the item itself, without ``key=``) cannot be encoded. Names the item's position
    and a shortened repr; under ``skip_item_errors=True`` the item is recorded as failed."""

    def __init__(self, message: str, position: Optional[int] = None) -> None:
        super().__init__(message)
        self.position = position  # of the item in the iterable

    @classmethod
    def key_raised(cls, position: int, item: str, exc: BaseException) -> ItemKeyError:
        """``key=`` raised ``exc`` for the item at ``position`` (``item``: its short repr)."""
        return cls(f"key= raised {type(exc).__name__}: {exc} for the item at position {position}: {item}", position)

    @classmethod
    def unkeyable(cls, position: int, item: str, reason: str) -> ItemKeyError:
        """The item at ``position`` (no ``key=``) cannot be keyed; ``reason`` suggests ``key=``."""
        return cls(f"cannot compute the key of the item at position {position}: {item}: {reason}", position)

    @classmethod
    def unkeyable_key(cls, position: int, item: str, value_type: str, reason: str) -> ItemKeyError:
        """``key=`` returned a value of ``value_type`` that cannot be keyed."""
        return cls(
            f"key= returned a {value_type} that cannot be keyed for the item at position "
            f"{position}: {item}: {reason}; make key= return a str, int, bytes, or a tuple of them",
            position,
        )


class UnpicklableOutputError(SnapperableError, TypeError):
    """The function returned a value that cannot be pickled, so it cannot be checkpointed."""

    @classmethod
    def of(cls, output: object, exc: BaseException) -> BaseException:
        """The item failure for an ``output`` whose pickling raised ``exc`` (chained);
        ``exc`` itself when it is no ``Exception``: Ctrl-C while pickling is still Ctrl-C."""
        if not isinstance(exc, Exception):
            return exc
        error = cls(
            f"fn returned a {type(output).__module__}.{type(output).__qualname__}, which cannot "
            f"be pickled, so it cannot be checkpointed: {exc}"
        )
        error.__cause__ = exc
        return error


class ClusterTaskError(SnapperableError, RuntimeError):
    """The cluster could not run a task (its workers died running it, or it was lost).

    Its items are not recorded; everything recorded before stays, and ``start()``
    again resumes.
    """


__all__ = [
    "SnapperableError",
    "CheckpointError",
    "CheckpointCorruptError",
    "CheckpointFormatError",
    "CheckpointLockedError",
    "WriterError",
    "CheckpointMovedError",
    "ForkedProcessError",
    "FunctionChangedError",
    "TooManyConsecutiveErrors",
    "ItemKeyError",
    "UnpicklableOutputError",
    "ClusterTaskError",
]
