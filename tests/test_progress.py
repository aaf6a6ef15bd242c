"""The progress bar (issue 11): it starts at the items already done, counts only what is
saved, shows failures, and by default ("auto") appears only on a terminal, outside CI,
for a run that lasts. Terminal runs use a real pseudo-terminal in a child process."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest

from snapperable import Snapper, SnapshotStorage, progress


def frames(err: str) -> list[str]:
    """The bar's successive renderings in captured stderr."""
    return [frame.strip() for frame in re.split(r"[\r\n]", err) if "snapperable" in frame]


def slow(x: int) -> int:
    time.sleep(0.01)
    return x


def test_a_resumed_bar_starts_at_the_done_items_and_rates_only_new_ones(
    storage: SnapshotStorage[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    Snapper(range(30), slow, snapshot_storage=storage, version="v", progress=False).start()
    with Snapper(range(50), slow, snapshot_storage=storage, version="v", progress=True) as s:
        s.start()
    shown = frames(capsys.readouterr().err)
    assert shown and "30/50" in shown[0], shown  # its first frame: the 30 done before
    assert "50/50" in shown[-1], shown
    assert all(re.search(r"\b(0|[12]?\d)/50\b", frame) is None for frame in shown), "counted from 0"
    # 20 new items that sleep 10 ms each: at most 100 item/s. Counting the 30 skipped
    # ones as progress gave rates of millions an item per second.
    rate = re.search(r"([\d.]+)(k?)item/s", shown[-1])
    assert rate is not None, shown[-1]
    assert rate.group(2) == "" and float(rate.group(1)) <= 100, shown[-1]


def test_the_bar_counts_only_what_was_saved_at_ctrl_c(
    storage: SnapshotStorage[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(x: int) -> int:
        if x == 10:
            raise KeyboardInterrupt
        return x

    with pytest.raises(KeyboardInterrupt):
        Snapper(range(50), interrupted, snapshot_storage=storage, version="v", progress=True).start()
    shown = frames(capsys.readouterr().err)
    assert "10/50" in shown[-1], shown
    assert Snapper(range(50), interrupted, snapshot_storage=storage, version="v").load() == list(range(10))


def test_the_bar_shows_failures(storage: SnapshotStorage[Any], capsys: pytest.CaptureFixture[str]) -> None:
    def some_fail(x: int) -> int:
        if x % 10 == 3:
            raise ValueError(x)
        return x

    Snapper(range(40), some_fail, snapshot_storage=storage, skip_item_errors=True, progress=True).start()
    shown = frames(capsys.readouterr().err)
    assert "40/40" in shown[-1] and "4 failed" in shown[-1], shown


def test_auto_is_silent_when_stderr_is_not_a_terminal(
    storage: SnapshotStorage[Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "AUTO_DELAY", 0.0)
    with Snapper(range(20), slow, snapshot_storage=storage) as s:  # progress="auto"
        assert s.progress == "auto"
        s.start()
    assert capsys.readouterr().err == ""


def test_progress_must_be_true_false_or_auto() -> None:
    for wrong in ("yes", 1, None):
        with pytest.raises(ValueError, match="progress must be"):
            Snapper([1], str, progress=wrong)  # type: ignore[call-overload]


CHILD = """
import sys
from snapperable import Snapper, SQLiteSnapshotStorage, progress
import time
progress.AUTO_DELAY = float(sys.argv[2])

def work(x):
    time.sleep(0.005)
    return x

Snapper(range(int(sys.argv[3])), work, snapshot_storage=SQLiteSnapshotStorage(sys.argv[1])).start()
print("tqdm imported" if "tqdm" in sys.modules else "tqdm not imported", file=sys.stderr)
"""


def run_on_a_terminal(tmp_path: Path, env: dict[str, str], delay: float, items: int) -> str:
    """What the child writes to its stderr, a pseudo-terminal."""
    leader, follower = pty.openpty()
    # A terminal's size, as a real one has (tqdm draws nothing at width 0).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "run.db"), str(delay), str(items)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower, env=env,
    )
    os.close(follower)
    output = b""
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], 60)
            if not ready:
                pytest.fail(f"the child wrote nothing for 60 s: {output!r}")
            try:
                data = os.read(leader, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            output += data
    finally:
        os.close(leader)
        assert proc.wait(timeout=60) == 0, output
    return output.decode("utf-8", "replace")


@pytest.fixture
def terminal_env(backend_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in backend_env.items() if k not in progress.CI_VARIABLES}
    env["TERM"] = "xterm"
    return env


def test_auto_draws_a_bar_on_a_terminal_once_the_run_lasts(tmp_path: Path, terminal_env: dict[str, str]) -> None:
    shown = run_on_a_terminal(tmp_path, terminal_env, delay=0.2, items=120)  # about 0.6 s of work
    assert "120/120" in shown and "tqdm imported" in shown, shown


def test_auto_stays_silent_on_a_terminal_for_a_short_run(tmp_path: Path, terminal_env: dict[str, str]) -> None:
    shown = run_on_a_terminal(tmp_path, terminal_env, delay=30.0, items=20)
    assert "snapperable" not in shown and "tqdm not imported" in shown, shown


def test_auto_stays_silent_in_ci_even_on_a_terminal(tmp_path: Path, terminal_env: dict[str, str]) -> None:
    shown = run_on_a_terminal(tmp_path, {**terminal_env, "CI": "true"}, delay=0.0, items=20)
    assert "snapperable" not in shown and "tqdm not imported" in shown, shown
