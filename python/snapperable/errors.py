"""The one exception hierarchy of snapperable.

Both backends raise these same classes: the Rust core imports this module and maps its
error enum onto it in one place (`rust/errors.rs`), so callers never see a backend-specific
exception type.
"""

from __future__ import annotations


class SnapperableError(Exception):
    """Base class of every error snapperable raises on its own account."""


class CheckpointError(SnapperableError, OSError):
    """A checkpoint file could not be opened, read or written."""


class CheckpointCorruptError(CheckpointError, ValueError):
    """A checkpoint file is damaged beyond the recoverable torn tail, or is not a checkpoint.

    snapperable never deletes or resets such a file: move it aside (or restore a backup)
    and run again.
    """


class CheckpointFormatError(CheckpointCorruptError):
    """A checkpoint was written by a newer, incompatible format version."""


class CheckpointLockedError(CheckpointError):
    """Another Snapper, in this process or another one, holds the checkpoint file."""


class WriterError(CheckpointError):
    """The background writer failed to save results; nothing after the failure was saved."""


class ForkedProcessError(SnapperableError, RuntimeError):
    """A Snapper (or its open checkpoint) was used in a child process forked after it opened."""


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
