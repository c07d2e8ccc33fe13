"""A real ``longdl serve`` process for tests: start, wait healthy, kill, restart."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import aiohttp


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """``python -m longdl serve`` on a free loopback port with its own DATA_DIR.

    Every start appends to one log file, so a test can read what all runs logged.

    Args:
        data_dir: the service's DATA_DIR (kept across restarts).
        settings: extra settings as environment variables (``{"WORKER_CONCURRENCY": "2"}``).
        argv: what the Python interpreter runs (another app, e.g. ``tests/jobs_app.py``).
        log_path: where every start's output goes (next to DATA_DIR by default).
    """

    def __init__(
        self,
        data_dir: Path,
        settings: dict[str, str] | None = None,
        argv: tuple[str, ...] = ("-m", "longdl", "serve"),
        log_path: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.argv = argv
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or data_dir.parent / f"{data_dir.name}-service.log"
        self.env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "DATA_DIR": str(data_dir),
            "PYTHONUNBUFFERED": "1",
            **(settings or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def run_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run another longdl command with the same settings (e.g. ``seed``)."""
        return subprocess.run(
            [sys.executable, "-m", "longdl", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )

    def spawn(self) -> None:
        """Start the process without waiting for it."""
        self.proc = self._spawn()

    async def wait_exit(self, timeout_s: float = 30.0) -> int:
        """Wait for the process to end by itself; its exit code."""
        assert self.proc is not None
        code = await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout_s)
        self.exited()
        return code

    def exited(self) -> int | None:
        """The exit code if the process ended by itself (and forget it), else None."""
        code = None if self.proc is None else self.proc.poll()
        if code is not None:
            if self._log is not None:
                self._log.close()
            self.proc = None
        return code

    async def start(self, timeout_s: float = 20.0) -> None:
        """Start the service and wait until /health answers 200."""
        self.proc = self._spawn()
        await self.wait_healthy(timeout_s)

    async def wait_healthy(self, timeout_s: float = 20.0) -> None:
        """Wait until the running process answers /health with 200."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"longdl serve exited early:\n{self.log()}")
                try:
                    async with session.get(f"{self.url}/health") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"longdl serve not healthy in {timeout_s} s:\n{self.log()}"
                    )
                await asyncio.sleep(0.05)

    def _spawn(self) -> subprocess.Popen[bytes]:
        self._log = self.log_path.open("ab")
        return subprocess.Popen(
            [sys.executable, *self.argv],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        self._stop(signal.SIGKILL)

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait for the exit code (a graceful shutdown)."""
        return self._stop(signal.SIGTERM, timeout_s)

    def _stop(self, sig: signal.Signals, timeout_s: float = 10.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout_s)
        if self._log is not None:
            self._log.close()
        self.proc = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        """Kill the process if a test left it running."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    async def json(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """One request; returns (status, parsed JSON body)."""
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, self.url + path, **kwargs) as response,
        ):
            return response.status, await response.json(content_type=None)
