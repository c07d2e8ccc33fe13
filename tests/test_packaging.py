"""pyproject.toml builds with the oldest setuptools it declares."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_the_declared_setuptools_minimum_builds_the_wheel(tmp_path: Path) -> None:
    """With exactly the lowest setuptools build-system.requires allows, the wheel builds
    and carries the MIT license expression (PEP 639)."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    (setuptools,) = [r for r in requires if r.startswith("setuptools")]
    minimum = re.fullmatch(r"setuptools>=([0-9.]+)", setuptools)
    assert minimum is not None, setuptools
    source = tmp_path / "src"  # a copy: an in-tree build would leave build/ in the project
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copy(ROOT / "README.md", source)
    shutil.copytree(
        ROOT / "longdl", source / "longdl", ignore=shutil.ignore_patterns("__pycache__")
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "-q"]
    # ~= keeps the release series: X.0.* is the oldest the >= allows, bug-fix releases in.
    subprocess.run([*pip, "install", f"setuptools~={minimum.group(1)}.0"], check=True)

    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "out"), "."],
        cwd=source,
        capture_output=True,
        text=True,
    )

    assert 0 == built.returncode, built.stderr[-3000:]
    (wheel,) = (tmp_path / "out").glob("longdl-*.whl")
    metadata = (
        zipfile.ZipFile(wheel)
        .read(next(name for name in zipfile.ZipFile(wheel).namelist() if name.endswith("METADATA")))
        .decode()
    )
    assert "License-Expression: MIT" in metadata
