"""The functions behind the committed checkpoints in tests/fixtures/. NEVER EDIT THIS FILE.

The checkpoints under tests/fixtures/ were made by an earlier release of snapperable
(tests/fixtures/make_fixtures.py, see tests/fixtures/MANIFEST.json) from these very
functions. tests/test_version_upgrade.py opens them with today's code and requires that
nothing is processed again: that only proves something while these functions are
exactly what made the checkpoints. Not a comment, a blank line or a name may change
(a change here, even a harmless one, would make the test prove nothing): add new
functions for new fixtures in a new module instead.
"""

from __future__ import annotations

import functools
import uuid

SUFFIX = "!"
LIMIT = 8


def plain(x: int) -> int:
    return x * 2


def _clean(text: str) -> str:
    return text.strip()[:LIMIT]


def with_helper(x: int) -> str:
    return _clean(f"  item {x}  ") + SUFFIX


class Scorer:
    def __init__(self, size: str) -> None:
        self.size = size

    def score(self, x: int) -> str:
        return f"{self.size}:{self._weight(x)}"

    def _weight(self, x: int) -> int:
        return x * len(self.size)


def scaled(x: int, factor: int = 1) -> int:
    return x * factor


scaled_by_three = functools.partial(scaled, factor=3)


class Client:
    """An API client: its session id is new in every process (state, not configuration)."""

    def __init__(self) -> None:
        self.session = uuid.uuid4().hex

    def call(self, x: int) -> str:
        return f"answer {x}"


client = Client()


def with_client(x: int) -> str:
    return client.call(x)
