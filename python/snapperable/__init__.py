"""snapperable: resumable long loops with automatic checkpointing."""

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

__version__ = "0.1.0"

__all__ = [
    "Snapper",
    "VersionValue",
    "SnapshotStorage",
    "SQLiteSnapshotStorage",
    "PickleSnapshotStorage",
    "FailedItem",
    "ProcessingMetric",
    "RunPlan",
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
