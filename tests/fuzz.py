"""schemathesis against a real ``longdl serve``: every check, the limits lifted.

``make fuzz`` runs the long campaign (``--max-examples 150 --seed 7``: over 2,000 cases);
``tests/test_schemathesis.py`` runs a short one in ``make test``. Both fail on any finding.

    python tests/fuzz.py [--max-examples N] [--seed S] [--workdir DIR] [-- ST_OPTION...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from service import ServiceProcess

#: Limits and caps lifted so generated requests reach the logic instead of a 429 or 503.
LIFTED = {
    "RATE_LIMIT_MAX_REQUESTS": "100000000",
    "RATE_LIMIT_POLL_MAX_REQUESTS": "100000000",
    "MAX_ACTIVE_PER_USER": "100000000",
    "MAX_QUEUED": "100000000",
    "SHUTDOWN_GRACE_S": "0",
    "LOG_LEVEL": "WARNING",
}


CONFIG = Path(__file__).with_name("schemathesis.toml")


def schemathesis_binary() -> str | None:
    """The ``schemathesis`` next to this Python (the [test] extra installs it), or on PATH."""
    search = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    return shutil.which("schemathesis", path=search)


def run(
    workdir: Path,
    *,
    max_examples: int,
    seed: int,
    capture: bool = True,
    extra_args: tuple[str, ...] = (),
    settings: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Serve longdl from ``workdir`` and run schemathesis with every check against it.

    ``settings`` are more environment variables for the service (``API_KEYS``, say).
    schemathesis writes its ``.schemathesis/`` folder into ``workdir`` too.
    """
    binary = schemathesis_binary()
    if binary is None:
        raise FileNotFoundError("schemathesis is not installed (the [test] extra installs it)")
    service = ServiceProcess(workdir / "data", {**LIFTED, **(settings or {})})
    service.run_cli("seed", "70000", "70007", "70014")
    asyncio.run(service.start())
    try:
        return subprocess.run(
            [
                binary,
                "--config-file",
                str(CONFIG),
                "run",
                f"{service.url}/openapi.json",
                "--checks",
                "all",
                "--max-examples",
                str(max_examples),
                "--seed",
                str(seed),
                "--no-color",
                *extra_args,
            ],
            cwd=workdir,
            capture_output=capture,
            text=True,
            timeout=600,
        )
    finally:
        service.terminate()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=150)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--workdir", type=Path, help="where the service keeps its data")
    parser.add_argument("extra", nargs="*", help="more schemathesis options (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="longdl-fuzz-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(
            workdir,
            max_examples=args.max_examples,
            seed=args.seed,
            capture=False,
            extra_args=tuple(args.extra),
        )
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
