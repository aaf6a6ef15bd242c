"""snapperable: resumable long loops with automatic checkpointing."""

from typing import TYPE_CHECKING

from snapperable._backend import BACKEND_NAME as backend
from snapperable.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointLockedError,
    ForkedProcessError,
    FunctionChangedError,
    SnapperableError,
    TooManyConsecutiveErrors,
    UnpicklableOutputError,
    WriterError,
)
from snapperable.metrics import (
    FailedItem,
    ProcessingMetric,
    RunPlan,
    generate_json_report,
    generate_markdown_report,
    generate_metrics_report,
)
from snapperable.snapper import Snapper, VersionValue
from snapperable.storage.base import SnapshotStorage
from snapperable.storage.pickle_storage import PickleSnapshotStorage
from snapperable.storage.sqlite_storage import SQLiteSnapshotStorage

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
    "SQLiteSnapshotStorage",
    "PickleSnapshotStorage",
    "FailedItem",
    "ProcessingMetric",
    "RunPlan",
    "open_checkpoint",
    "CheckpointReader",
    "ItemRecord",
    "generate_metrics_report",
    "generate_json_report",
    "generate_markdown_report",
    "backend",
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
    "__version__",
]
