"""The one place that chooses a backend, once, at import.

Two implementations of the contract in ``_contract.py`` exist: the Rust extension
``snapperable._core`` and the standard-library fallback ``snapperable._pure``.
``SNAPPERABLE_BACKEND`` picks one:

- ``rust``: the extension is required; its ImportError propagates;
- ``python``: the fallback, even where the extension is installed;
- unset or ``auto``: the extension if it imports, else the fallback.

Public modules import the backend from here, never ``_core`` or ``_pure`` directly.
"""

from __future__ import annotations

import os

from snapperable._contract import Backend


def _select() -> Backend:
    choice = os.environ.get("SNAPPERABLE_BACKEND", "auto").strip().lower()
    if choice not in ("auto", "rust", "python"):
        raise ImportError(
            f"SNAPPERABLE_BACKEND={choice!r} is not one of 'auto', 'rust', 'python'"
        )
    if choice == "python":
        from snapperable import _pure

        return _pure  # mypy checks here that the module conforms to Backend
    try:
        from snapperable import _core
    except ImportError:
        if choice == "rust":
            raise
        from snapperable import _pure

        return _pure
    return _core


backend: Backend = _select()
BACKEND_NAME: str = backend.BACKEND_NAME
