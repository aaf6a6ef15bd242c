"""snapperable: resumable long loops with automatic checkpointing."""

from typing import TYPE_CHECKING

from snapperable._backend import BACKEND_NAME as backend
from snapperable.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointLockedError,
    CheckpointMovedError,
    ClusterTaskError,
    ForkedProcessError,
    FunctionChangedError,
    ItemKeyError,
    SnapperableError,
    TooManyConsecutiveErrors,
    UnpicklableOutputError,
    WriterError,
)
from snapperable.metrics import (
    NOT_DONE,
    FailedItem,
    ItemFailure,
    NotDone,
    ProcessingMetric,
    RunPlan,
    generate_json_report,
    generate_markdown_report,
    generate_metrics_report,
)
from snapperable.snapper import Snapper, VersionValue
from snapperable.storage.base import SnapshotStorage
from snapperable.storage.files import move_checkpoint
from snapperable.storage.pickle_storage import PickleSnapshotStorage
from snapperable.storage.sqlite_storage import SQLiteSnapshotStorage
from snapperable.verification import VerifyResult, verify

if TYPE_CHECKING:
    from snapperable.reader import CheckpointReader, ItemRecord, open_checkpoint

__version__ = "0.1.0"

# Imported on first use (PEP 562): the reader is not needed to run a loop.
_LAZY = {"open_checkpoint", "CheckpointReader", "ItemRecord"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from snapperable import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'snapperable' has no attribute {name!r}")

__all__ = [
    "Snapper",
    "VersionValue",
    "SnapshotStorage",
    "move_checkpoint",
    "SQLiteSnapshotStorage",
    "PickleSnapshotStorage",
    "FailedItem",
    "ItemFailure",
    "NOT_DONE",
    "NotDone",
    "ProcessingMetric",
    "RunPlan",
    "open_checkpoint",
    "CheckpointReader",
    "ItemRecord",
    "verify",
    "VerifyResult",
    "generate_metrics_report",
    "generate_json_report",
    "generate_markdown_report",
    "backend",
    "SnapperableError",
    "CheckpointError",
    "CheckpointCorruptError",
    "CheckpointFormatError",
    "CheckpointLockedError",
    "CheckpointMovedError",
    "WriterError",
    "ForkedProcessError",
    "FunctionChangedError",
    "TooManyConsecutiveErrors",
    "ItemKeyError",
    "UnpicklableOutputError",
    "ClusterTaskError",
    "__version__",
]
