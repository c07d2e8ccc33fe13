"""Polling throughput of a real ``longdl serve``, as a ratio of a trivial aiohttp server.

Polling is what a long-job API serves most: every client asks "done yet?" every few
seconds. This measures, with wrk (``-t2 -c64``), the requests per second of:

- ``baseline``: a bare aiohttp app answering a small JSON object (no middleware, no
  I/O): the ceiling of any aiohttp service on this machine, measured in the same run;
- ``status_running``: the status of a running job (served from memory);
- ``status_304``: the same with ``If-None-Match`` (the cheap revalidation clients use);
- ``status_completed``: the status of a finished job (read from SQLite, URL signed);
- ``health``: ``/health`` (a storage check and a database ping).

Each longdl figure is reported with its ratio to the baseline. Absolute figures drift
between runs on these shared machines; the ratios are what to compare. Both servers run
as separate processes, one at a time, with the same wrk settings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

WRK_ARGS = ("-t2", "-c64", "-d8s")

BASELINE_APP = textwrap.dedent(
    """
    import sys
    from aiohttp import web

    async def hello(request):
        return web.json_response({"status": "running", "progress": {"percent": 42.0}})

    app = web.Application()
    app.router.add_get("/", hello)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def request_json(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    """(parsed body, headers) of one request; headers are looked up case-insensitively."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read()), response.headers


def wrk(url: str, *headers: str) -> float:
    """Requests per second wrk reached against ``url`` (non-2xx/3xx answers fail it)."""
    args = ["wrk", *WRK_ARGS]
    for header in headers:
        args += ["-H", header]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    if "Non-2xx or 3xx responses" in out:
        raise RuntimeError(f"wrk saw errors against {url}:\n{out}")
    match = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    if match is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    return float(match.group(1))


def measure_baseline() -> float:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BASELINE_APP, str(port)])
    try:
        wait_http(f"http://127.0.0.1:{port}/")
        return wrk(f"http://127.0.0.1:{port}/")
    finally:
        proc.terminate()
        proc.wait(10)


def measure_longdl(data_dir: Path) -> dict[str, float]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DATA_DIR": str(data_dir),
        "LOG_LEVEL": "WARNING",
        # Polling is the point: no limiter in the way. The running job waits "upstream"
        # for ten minutes, so it stays running (served from memory) the whole time.
        "RATE_LIMIT_MAX_REQUESTS": "100000000",
        "RATE_LIMIT_POLL_MAX_REQUESTS": "100000000",
        "DOWNLOAD_DELAY_ENABLED": "false",
    }
    subprocess.run(
        [sys.executable, "-m", "longdl", "seed", "70000", "70007"],
        env=env,
        check=True,
        capture_output=True,
    )
    proc = subprocess.Popen([sys.executable, "-m", "longdl", "serve"], env=env)
    try:
        wait_http(f"{base}/health")
        done, _ = request_json("POST", f"{base}/v1/download/initiate", {"file_ids": [70000, 70007]})
        deadline = time.monotonic() + 30
        while request_json("GET", f"{base}{done['statusUrl']}")[0]["status"] != "completed":
            if time.monotonic() > deadline:
                raise RuntimeError("the finished job did not finish")
            time.sleep(0.1)
        proc.terminate()
        proc.wait(30)
        # Restart with a slow "upstream" so a new job stays running.
        env |= {
            "DOWNLOAD_DELAY_ENABLED": "true",
            "DOWNLOAD_DELAY_MIN_MS": "600000",
            "DOWNLOAD_DELAY_MAX_MS": "600000",
        }
        proc = subprocess.Popen([sys.executable, "-m", "longdl", "serve"], env=env)
        wait_http(f"{base}/health")
        running, _ = request_json(
            "POST", f"{base}/v1/download/initiate", {"file_ids": [70000, 70007]}
        )
        status_url = f"{base}{running['statusUrl']}"
        _, headers = request_json("GET", status_url)
        return {
            "status_running": wrk(status_url),
            "status_304": wrk(status_url, f"If-None-Match: {headers.get('ETag')}"),
            "status_completed": wrk(f"{base}{done['statusUrl']}"),
            "health": wrk(f"{base}/health"),
        }
    finally:
        proc.terminate()
        proc.wait(30)


def run() -> dict[str, str]:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    with tempfile.TemporaryDirectory(prefix="longdl-bench-") as tmp:
        baseline = measure_baseline()
        figures = measure_longdl(Path(tmp) / "data")
    out = {"wrk": " ".join(WRK_ARGS), "baseline": f"{baseline:,.0f} req/s"}
    for name, value in figures.items():
        out[name] = f"{value:,.0f} req/s ({value / baseline:.2f} x baseline)"
    return out
