"""The contract's constants have one home per language: ``snapperable/_contract.py`` for
Python, ``rust/contract.rs`` for the Rust core. They must agree, or a checkpoint one
backend writes is misread by the other (key width, status codes, pickle protocol)."""

from __future__ import annotations

import pytest

from snapperable import _contract

core = pytest.importorskip("snapperable._core", reason="the Rust core is not built")


@pytest.mark.parametrize("name", ["KEY_SIZE", "STATUS_OK", "STATUS_FAILED", "PICKLE_PROTOCOL"])
def test_rust_core_constant_equals_the_contract(name: str) -> None:
    rust_value = getattr(core, name)
    python_value = getattr(_contract, name)
    assert type(rust_value) is int and rust_value == python_value, (name, rust_value, python_value)

