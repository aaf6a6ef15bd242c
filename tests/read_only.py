"""Making a file or directory read-only for the test process, for real."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest


@contextmanager
def read_only(target: Path) -> Iterator[None]:
    """``target`` made read-only for this process: immutable (``chattr +i``) as root,
    whom permissions do not stop; else mode 0o444 (a file) or 0o555 (a directory)."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(target)]).returncode:
            pytest.skip("running as root without a working chattr: nothing is read-only")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(target)], check=True)
        return
    mode = target.stat().st_mode
    target.chmod(0o555 if target.is_dir() else 0o444)
    try:
        yield
    finally:
        target.chmod(mode)
