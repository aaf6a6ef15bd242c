"""The ``snapperable`` command (also ``python -m snapperable``): look inside a checkpoint.

Every command but ``compact`` and ``move`` only reads (``snapperable.reader``): no
hold, no lock file, nothing written, so they work while a run holds the file. Errors are one line on
stderr naming the file, never a traceback. Exit codes (``EXIT_*``):

- 0: done (``check``: the file is sound);
- 1: the file is damaged, not a checkpoint, or of a newer format (``check``: the first
  damage is named);
- 2: the command line is wrong (argparse's own code);
- 3: the file cannot be read or written: missing, a directory, no permission;
- 4: another process holds the checkpoint (``compact`` and ``move`` refuse);
- 5: an optional dependency is missing (``export --format parquet`` needs pyarrow).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from typing import IO, Any, Callable, Optional, Sequence

from snapperable.errors import CheckpointCorruptError, CheckpointError, CheckpointLockedError

EXIT_OK = 0
EXIT_DAMAGED = 1
EXIT_USAGE = 2
EXIT_UNREADABLE = 3
EXIT_HELD = 4
EXIT_MISSING_EXTRA = 5

_EPILOG = (
    "exit codes: 0 done (check: sound), 1 damaged / not a checkpoint / newer format, "
    "2 usage, 3 cannot read or write the file, 4 held by another process (compact), "
    "5 optional dependency missing"
)


class CommandError(Exception):
    """An error the command reports as one line, with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _when(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time).astimezone().isoformat(timespec="seconds")


def _size(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024  # type: ignore[assignment]  # a float from here on
    raise AssertionError("unreachable")


def _open(path: str) -> Any:
    from snapperable.reader import open_checkpoint

    return open_checkpoint(path)


# -- commands ---------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace, out: IO[str]) -> int:
    with _open(args.path) as reader:
        holder = reader.holder()
        wal = reader.wal_size
        size = _size(reader.file_size) + (f" (+ {_size(wal)} in -wal)" if wal else "")
        lines = [
            f"checkpoint: {reader.path}",
            f"format:     {reader.format} {reader.format_version}"
            + (f", created by {reader.created_by}" if reader.created_by else ""),
            f"size:       {size}",
            "held by:    " + ("nobody" if holder is None else f"process {holder} (a run is using it)"),
        ]
        versions = reader.versions()
        lines.append(f"versions:   {len(versions)} (the last is the one used last)")
        for version in versions:
            uses = "" if version.uses == version.id else f", reads the results of {version.uses}"
            lines.append(f"  {version.id}: {version.fingerprint[:16]} logged {_when(version.created)}{uses}")
            for change in version.changes:
                lines.append(f"      {change}")
        counts = reader.counts()
        lines.append("items:      " + ("none" if not counts else "by the version id their rows carry"))
        for count in counts:
            lines.append(
                f"  {count.version}: {count.unique_keys} items ({count.ok} ok, {count.failed} failed), "
                f"{count.rows} rows ({count.superseded} superseded)"
            )
        tail = reader.torn_tail_bytes()
        if tail:
            lines.append(f"note:       {tail} bytes after the last complete frame (a torn write, or one in progress)")
    out.write("\n".join(lines) + "\n")
    return EXIT_OK


def cmd_failures(args: argparse.Namespace, out: IO[str]) -> int:
    with _open(args.path) as reader:
        groups = reader.failures(args.version)
    if args.type:
        wanted = args.type
        groups = {
            name: items for name, items in groups.items()
            if name == wanted or name.rsplit(".", 1)[-1] == wanted
        }
    if not groups:
        out.write("no failed items" + (f" of type {args.type}" if args.type else "") + "\n")
        return EXIT_OK
    for name, items in groups.items():
        out.write(f"{name}: {len(items)} item{'s' if len(items) != 1 else ''}\n")
        shown = items if args.limit is None else items[: args.limit]
        for item in shown:
            value = _input_text(item)
            out.write(f"  {item.key_hex}  attempts {item.attempts}  {value}{item.error or ''}\n")
            if args.traceback and item.traceback:
                for line in item.traceback.rstrip("\n").splitlines():
                    out.write(f"      {line}\n")
        if len(shown) < len(items):
            out.write(f"  ... {len(items) - len(shown)} more\n")
    return EXIT_OK


def _input_text(item: Any) -> str:
    if not item.has_input:
        return ""
    try:
        text = repr(item.input())
    except Exception as exc:
        text = f"<cannot unpickle: {type(exc).__name__}>"
    return (text if len(text) <= 60 else text[:57] + "...") + ": "


def cmd_report(args: argparse.Namespace, out: IO[str]) -> int:
    with _open(args.path) as reader:
        text = reader.report(args.version, args.format)
    out.write(text if text.endswith("\n") else text + "\n")
    return EXIT_OK


def cmd_export(args: argparse.Namespace, out: IO[str]) -> int:
    from snapperable import export

    if args.format == "parquet":
        if not args.output or args.output == "-":
            raise CommandError("export --format parquet needs -o FILE (Parquet is not a stream)", EXIT_USAGE)
        try:
            export.load_pyarrow()
        except export.MissingExtraError as exc:
            raise CommandError(str(exc), EXIT_MISSING_EXTRA) from None
    with _open(args.path) as reader:
        rows = export.records(reader, args.version, all_versions=args.all_versions)
        if args.format == "parquet":
            count = _writing(args.output, lambda: export.write_parquet(rows, args.output))
        else:
            write = export.write_jsonl if args.format == "jsonl" else export.write_csv
            if not args.output or args.output == "-":
                count = write(rows, out)
            else:
                def to_file() -> int:
                    with open(args.output, "w", encoding="utf-8", newline="") as file:
                        return write(rows, file)

                count = _writing(args.output, to_file)
    if args.output and args.output != "-":
        sys.stderr.write(f"{count} items written to {args.output}\n")
    return EXIT_OK


def _writing(path: str, write: Callable[[], int]) -> int:
    try:
        return write()
    except OSError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CommandError(f"{path}: cannot write it: {exc.strerror or exc}", EXIT_UNREADABLE) from None


def cmd_check(args: argparse.Namespace, out: IO[str]) -> int:
    """``snapperable.verify`` (every page or frame, every row's checksum), then the
    reader's check of every stored pickle's framing. ``verify`` holds the file as a run
    does; while a run holds it, the reader's check alone runs, beside the run."""
    from snapperable import verify
    from snapperable.reader import detect_format

    problem: Optional[str] = None
    tail = 0
    try:
        detect_format(args.path)  # a foreign file gets no lock file from verify's hold
        result = verify(args.path)  # before the reader opens it: one SQLite library at a time
        problem, tail = result.problem, result.torn_tail
    except CheckpointLockedError as held:
        out.write(f"note: {held}; checking beside it, without the hold\n")
    except CheckpointCorruptError as exc:
        problem = str(exc)
    if problem is None:
        try:
            with _open(args.path) as reader:
                problem = reader.check()
                tail = max(tail, reader.torn_tail_bytes())
        except CheckpointCorruptError as exc:
            problem = str(exc)
    if problem is not None:
        one_line = "; ".join(line.strip() for line in problem.splitlines() if line.strip())
        sys.stderr.write(f"damaged: {one_line}\n")
        return EXIT_DAMAGED
    out.write(f"{os.path.abspath(args.path)}: sound\n")
    if tail:
        out.write(
            f"note: {tail} bytes after the last complete frame: a torn write left by a crash "
            "(the next run cuts it off), or a frame a live run is writing\n"
        )
    return EXIT_OK


def cmd_compact(args: argparse.Namespace, out: IO[str]) -> int:
    from snapperable.compact import compact

    if (args.output is None) == (not args.in_place):
        raise CommandError("compact needs exactly one of -o OUT and --in-place", EXIT_USAGE)
    result = compact(args.path, args.output, in_place=args.in_place)
    out.write(
        f"{result.path}: {result.rows_after} rows kept of {result.rows_before}, "
        f"{_size(result.bytes_before)} -> {_size(result.bytes_after)}\n"
    )
    return EXIT_OK


def cmd_move(args: argparse.Namespace, out: IO[str]) -> int:
    from snapperable.reader import detect_format
    from snapperable.storage.files import move_checkpoint
    from snapperable.storage.pickle_storage import PickleSnapshotStorage
    from snapperable.storage.sqlite_storage import SQLiteSnapshotStorage

    # The format from the file's bytes, not its name: a SQLite checkpoint moves with
    # its -wal and -shm, whatever it is called.
    storage: Any = (
        PickleSnapshotStorage(args.path) if detect_format(args.path) == "pickle" else SQLiteSnapshotStorage(args.path)
    )
    out.write(f"{args.path} moved to {move_checkpoint(storage, args.destination)}\n")
    return EXIT_OK


# -- the parser -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snapperable",
        description="Look inside a snapperable checkpoint (SQLite or pickle, told from its bytes).",
        epilog=_EPILOG,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, run: Callable[[argparse.Namespace, IO[str]], int]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, epilog=_EPILOG)
        sub.add_argument("path", metavar="PATH", help="the checkpoint file")
        sub.set_defaults(run=run)
        return sub

    def version_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--version", type=int, metavar="ID",
            help="a version id of the versions log (default: the one used last)",
        )

    command("info", "format, size, holder, versions log and counts", cmd_info)
    failures = command("failures", "the failed items, grouped by exception type", cmd_failures)
    failures.add_argument("--type", metavar="NAME", help="only this exception type (module.Name or Name)")
    failures.add_argument("--limit", type=_positive, metavar="N", help="at most N items of each type")
    failures.add_argument("--traceback", action="store_true", help="print each item's traceback")
    version_option(failures)
    report = command("report", "the metrics report (totals, durations, outliers, failures)", cmd_report)
    report.add_argument("--format", choices=("markdown", "json"), default="markdown")
    version_option(report)
    export = command("export", "one record per item, streamed, as JSON Lines, CSV or Parquet", cmd_export)
    export.add_argument("--format", choices=("jsonl", "csv", "parquet"), required=True)
    export.add_argument("-o", "--output", metavar="OUT", help="the file to write (default: standard output)")
    which = export.add_mutually_exclusive_group()
    which.add_argument(
        "--version", type=int, metavar="ID",
        help="a version id of the versions log (default: the one used last)",
    )
    which.add_argument("--all-versions", action="store_true", help="the items of every version")
    command("check", "verify every page / frame and stored pickle; exit 1 naming the first damage", cmd_check)
    compact = command(
        "compact",
        "write a checkpoint of only the latest row of each key of each version (refused while held)",
        cmd_compact,
    )
    compact.add_argument("-o", "--output", metavar="OUT", help="the new checkpoint (must not exist)")
    compact.add_argument("--in-place", action="store_true", help="replace PATH atomically")
    move = command(
        "move",
        "move a checkpoint aside to start over (with its -wal, -shm and lock file; refused while held)",
        cmd_move,
    )
    move.add_argument("destination", metavar="DEST", help="the new path, on the same filesystem (must not exist)")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def main(argv: Optional[Sequence[str]] = None, out: Optional[IO[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); the exit code."""
    args = build_parser().parse_args(argv)
    stream = sys.stdout if out is None else out
    try:
        code: int = args.run(args, stream)
        return code
    except CommandError as exc:
        return _fail(str(exc), exc.code)
    except CheckpointLockedError as exc:
        return _fail(str(exc), EXIT_HELD)
    except CheckpointCorruptError as exc:
        return _fail(str(exc), EXIT_DAMAGED)
    except CheckpointError as exc:
        return _fail(str(exc), EXIT_UNREADABLE)
    except ValueError as exc:  # an unknown --version, and the like
        return _fail(str(exc), EXIT_USAGE)
    except BrokenPipeError:  # `snapperable export ... | head`: the reader has enough
        _silence_stdout()
        return EXIT_OK
    except OSError as exc:
        return _fail(f"{exc.filename or args.path}: {exc.strerror or exc}", EXIT_UNREADABLE)
    except KeyboardInterrupt:
        return 130


def _fail(message: str, code: int) -> int:
    one_line = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    sys.stderr.write(f"snapperable: {one_line}\n")
    return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of a closed pipe
    does not print an error after all."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
