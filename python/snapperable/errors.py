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


class UnpicklableOutputError(SnapperableError, TypeError):
    """The function returned a value that cannot be pickled, so it cannot be checkpointed."""


__all__ = [
    "SnapperableError",
    "CheckpointError",
    "CheckpointCorruptError",
    "CheckpointFormatError",
    "CheckpointLockedError",
    "WriterError",
    "ForkedProcessError",
    "FunctionChangedError",
    "TooManyConsecutiveErrors",
    "UnpicklableOutputError",
]
