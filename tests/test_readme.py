"""The README's commands work as written after ``make run``."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from service import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

pytestmark = pytest.mark.slow


def shell_lines() -> list[str]:
    """Every command line of the README's ``sh`` blocks (comments dropped)."""
    blocks = re.findall(r"```sh\n(.*?)```", README, flags=re.DOTALL)
    lines = []
    for block in blocks:
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            if command and not command.startswith("#"):
                lines.append(command)
    return lines


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    proc = ServiceProcess(tmp_path_factory.mktemp("readme") / "data", {"SHUTDOWN_GRACE_S": "0"})
    proc.run_cli("seed", "70000", "70007")
    asyncio.run(proc.start())
    yield proc
    proc.close()


def test_no_command_relies_on_longdl_being_on_path() -> None:
    """After make run, longdl is in .venv/bin: no README command calls it bare."""
    bare = [line for line in shell_lines() if line.split()[0] == "longdl"]
    assert [] == bare


def test_the_quick_start_get_works_as_written(service: ServiceProcess, tmp_path: Path) -> None:
    """The quick start's `.venv/bin/longdl get …` runs from the project folder's venv."""
    line = next(line for line in shell_lines() if line.startswith(".venv/bin/longdl get"))
    argv = shlex.split(line)
    argv[0] = str(ROOT / argv[0])  # as typed in the project folder; the output goes here
    result = subprocess.run(
        argv,
        cwd=tmp_path,
        env={**os.environ, "LONGDL_URL": service.url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert 0 == result.returncode, result.stderr
    assert (tmp_path / "bundle.zip").stat().st_size > 0
