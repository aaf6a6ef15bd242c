"""Build the pure-Python wheel: ``snapperable-<version>-py3-none-any.whl``.

    python packaging/pure_wheel.py [--out DIR]        # default DIR: dist/

The main build (``pip install .``, maturin) always compiles the Rust core. A release
also ships this wheel, built from the same ``python/snapperable`` sources without
``_core``: pip takes a platform wheel where one fits and this one elsewhere, and
``snapperable`` then runs on its pure-Python backend (``snapperable.backend ==
"python"``), with the same files, API and guarantees.

It writes a throwaway setuptools project (the package, ``py.typed``, ``schema.sql``,
metadata from ``pyproject.toml``) and has ``pip wheel`` build it. Needs Python 3.11+
(``tomllib``) to run; the wheel itself is for every Python the project supports.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "python" / "snapperable"
# Built by maturin, or describing what maturin builds: not part of a pure wheel.
LEFT_OUT = ("_core.*.so", "_core.so", "_core.*.pyd", "_core.pyi", "__pycache__")


def project_toml(meta: dict[str, object]) -> str:
    """The throwaway project's pyproject.toml: the real metadata, setuptools to build."""

    def toml_list(values: list[str]) -> str:
        return "[" + ", ".join(f'"{v}"' for v in values) + "]"

    extras = meta.get("optional-dependencies", {})
    scripts = meta.get("scripts", {})
    assert isinstance(extras, dict) and isinstance(scripts, dict)
    lines = [
        "[build-system]",
        'requires = ["setuptools>=61"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        f'name = "{meta["name"]}"',
        f'version = "{meta["version"]}"',
        f'description = "{meta["description"]}"',
        'readme = "README.md"',
        'license = { text = "MIT" }',
        f'requires-python = "{meta["requires-python"]}"',
        f"dependencies = {toml_list(list(meta.get('dependencies', [])))}",
        "",
        "[project.optional-dependencies]",
        *(f"{name} = {toml_list(deps)}" for name, deps in extras.items()),
        "",
        "[project.scripts]",
        *(f'{name} = "{target}"' for name, target in scripts.items()),
        "",
        "[tool.setuptools]",
        'packages = ["snapperable", "snapperable.storage"]',
        "",
        "[tool.setuptools.package-data]",
        'snapperable = ["py.typed", "schema.sql"]',
        "",
    ]
    return "\n".join(lines)


def build(out: Path) -> Path:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="snapperable-pure-") as tmp:
        project = Path(tmp)
        shutil.copytree(PACKAGE, project / "snapperable", ignore=shutil.ignore_patterns(*LEFT_OUT))
        shutil.copy(REPO / "README.md", project / "README.md")
        (project / "pyproject.toml").write_text(project_toml(meta), encoding="utf-8")
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(project)],
            check=True,
        )
    wheel = out / f"snapperable-{meta['version']}-py3-none-any.whl"
    if not wheel.exists():
        raise SystemExit(f"pip wheel did not produce {wheel}")
    return wheel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="where the wheel goes (default: dist/)")
    print(build(parser.parse_args().out))


if __name__ == "__main__":
    main()
