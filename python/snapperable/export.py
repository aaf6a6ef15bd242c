"""Export a checkpoint's items as JSON Lines, CSV or Parquet: ``snapperable export``.

One record per item (``CheckpointReader.items``), written as it is read, so memory
stays flat however many items there are (Parquet: a row group of ``PARQUET_BATCH``
items at a time). The fields are ``FIELDS``: inputs and outputs as JSON values (text
in CSV and Parquet cells); one that JSON cannot hold as it is (a tuple, a set, an
object, a dict with non-str keys, NaN) is written as its ``repr`` with its ``*_repr``
flag set, and one that cannot be unpickled here (its class is not importable) as a
``<cannot unpickle: ...>`` note, flagged too.
"""

from __future__ import annotations

import csv
import importlib
import json
from typing import IO, Any, Callable, Iterable, Iterator, Literal, Optional

from snapperable.reader import CheckpointReader, ItemRecord

ExportFormat = Literal["jsonl", "csv", "parquet"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("jsonl", "csv", "parquet")

FIELDS = (
    "key",  # hex of the 16-byte input key
    "version",  # the version id the row carries
    "seq",  # order of saving
    "status",  # "ok" or "failed"
    "attempts",
    "started",  # Unix time of the first attempt's start
    "ended",  # Unix time of the last attempt's end
    "error_type",
    "error",
    "traceback",
    "input_stored",  # was the input kept (failed items; store_inputs=True)
    "input",
    "input_repr",  # True: `input` is a repr (or a note), not the value as JSON
    "output",
    "output_repr",
)
PARQUET_BATCH = 10_000


class MissingExtraError(ImportError):
    """An optional dependency an export format needs is not installed."""


_SCALARS = (str, int, bool, type(None))  # exact types JSON always holds as they are


def _as_json(value: Any) -> tuple[Any, bool]:
    """``(value, False)`` if JSON holds it exactly (it reads back equal), else
    ``(repr(value), True)``."""
    if type(value) in _SCALARS:
        return value, False
    try:
        if json.loads(json.dumps(value, allow_nan=False)) == value:
            return value, False
    except Exception:  # not JSON, or an __eq__ that raises (an array's)
        pass
    return repr(value), True


def _unpickled(load: Callable[[], Any]) -> tuple[Any, bool]:
    try:
        value = load()
    except Exception as exc:
        return f"<cannot unpickle: {type(exc).__name__}: {exc}>", True
    return _as_json(value)


def record(item: ItemRecord) -> dict[str, Any]:
    """The export record of one item: ``FIELDS`` -> JSON-compatible values."""
    input_value, input_repr = _unpickled(item.input) if item.has_input else (None, False)
    output_value, output_repr = _unpickled(item.output) if item.ok else (None, False)
    return {
        "key": item.key_hex,
        "version": item.version,
        "seq": item.seq,
        "status": item.status,
        "attempts": item.attempts,
        "started": item.started,
        "ended": item.ended,
        "error_type": item.error_type,
        "error": item.error,
        "traceback": item.traceback,
        "input_stored": item.has_input,
        "input": input_value,
        "input_repr": input_repr,
        "output": output_value,
        "output_repr": output_repr,
    }


def records(
    reader: CheckpointReader, version: Optional[int] = None, *, all_versions: bool = False
) -> Iterator[dict[str, Any]]:
    """The export records of ``reader``'s items, streamed."""
    return map(record, reader.items(version, all_versions=all_versions))


def _cell(value: Any, is_repr: bool) -> Optional[str]:
    """An input or output as one text cell: JSON text, the repr as it is, or None."""
    if is_repr:
        return str(value)
    return json.dumps(value)


def _flat(row: dict[str, Any], present: bool, name: str) -> Optional[str]:
    return _cell(row[name], row[f"{name}_repr"]) if present else None


def write_jsonl(rows: Iterable[dict[str, Any]], out: IO[str]) -> int:
    count = 0
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False))
        out.write("\n")
        count += 1
    return count


def write_csv(rows: Iterable[dict[str, Any]], out: IO[str]) -> int:
    """A header row, then one row per item; ``input`` / ``output`` cells hold JSON text
    (or the repr, when flagged), empty when there is none."""
    writer = csv.writer(out)
    writer.writerow(FIELDS)
    count = 0
    for row in rows:
        cells = dict(row)
        cells["input"] = _flat(row, row["input_stored"], "input")
        cells["output"] = _flat(row, row["status"] == "ok", "output")
        writer.writerow(["" if cells[name] is None else cells[name] for name in FIELDS])
        count += 1
    return count


def load_pyarrow() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``, or a clear ``MissingExtraError``."""
    try:
        return importlib.import_module("pyarrow"), importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise MissingExtraError(
            "Parquet export needs pyarrow: pip install 'snapperable[parquet]'"
        ) from None


def write_parquet(rows: Iterable[dict[str, Any]], out_path: str) -> int:
    """Parquet at ``out_path``, a row group per ``PARQUET_BATCH`` items; ``input`` and
    ``output`` are JSON text (or the repr, when flagged), as in CSV."""
    pa, pq = load_pyarrow()
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("version", pa.int64()),
            ("seq", pa.int64()),
            ("status", pa.string()),
            ("attempts", pa.int64()),
            ("started", pa.float64()),
            ("ended", pa.float64()),
            ("error_type", pa.string()),
            ("error", pa.string()),
            ("traceback", pa.string()),
            ("input_stored", pa.bool_()),
            ("input", pa.string()),
            ("input_repr", pa.bool_()),
            ("output", pa.string()),
            ("output_repr", pa.bool_()),
        ]
    )
    count = 0
    with pq.ParquetWriter(out_path, schema) as writer:
        batch: dict[str, list[Any]] = {name: [] for name in FIELDS}

        def write_batch() -> None:
            writer.write_table(pa.table(batch, schema=schema))
            for column in batch.values():
                column.clear()

        for row in rows:
            for name in FIELDS:
                batch[name].append(row[name])
            batch["input"][-1] = _flat(row, row["input_stored"], "input")
            batch["output"][-1] = _flat(row, row["status"] == "ok", "output")
            count += 1
            if count % PARQUET_BATCH == 0:
                write_batch()
        if count % PARQUET_BATCH or count == 0:
            write_batch()
    return count


__all__ = [
    "EXPORT_FORMATS",
    "FIELDS",
    "MissingExtraError",
    "record",
    "records",
    "write_csv",
    "write_jsonl",
    "write_parquet",
]
