"""P1 in instructions: what one status poll costs a real ``longdl serve``, counted by callgrind.

Wall-clock rates on these shared 2-core machines drift by 2x between runs, so a change
worth a few percent of a poll cannot be seen in them; instruction counts can. Each
server runs under ``valgrind --tool=callgrind`` (every user-space instruction of the
process: the interpreter, aiohttp's C parts, SQLite) and answers WARM polls of a running
job over one keep-alive connection; ``callgrind_control --dump`` then zeroes its
counters, and the total of the next MANY polls over MANY is the cost of one poll, with
start-up, first requests and shutdown left out. Baselines: bare aiohttp returning the
same bytes, and the same with every header longdl sent and one pass-through middleware
(the contract's own price). The kernel's share (sends, receives) is not counted; it is
about the same for all three.

About a minute and a half: valgrind runs Python some 50 times slower and start-up is
most of each server's time, so the three servers run at once (what else the machine
runs changes how long valgrind takes, not what it counts); ``make bench`` installs
valgrind, whose package brings ``callgrind_control``, with the other tools.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench import common
from bench.common import Longdl, Row
from bench.status import FILES, _capture, _route

#: Polls before counting starts (first-request paths, caches), then polls counted.
WARM = 100
MANY = 1000


def _callgrind(out: Path) -> list[str]:
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (apt-get install valgrind)")
    # --vgdb=yes (the default, named here) is how callgrind_control reaches the process.
    return ["valgrind", "--tool=callgrind", "--vgdb=yes", f"--callgrind-out-file={out}"]


def _polls(url: str, path: str, count: int) -> None:
    """``count`` polls of ``path`` on the server at ``url``, over one connection."""
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(url).netloc, timeout=120)
    try:
        for _ in range(count):
            conn.request("GET", path)
            answer = conn.getresponse()
            answer.read()
            if answer.status != 200:
                raise RuntimeError(f"{path} answered {answer.status}")
    finally:
        conn.close()


def _dump(pid: int, out: Path, number: int, env: Mapping[str, str] | None) -> int:
    """Have callgrind write its counts so far (``out.NUMBER``) and zero them; their total.

    ``env`` is the server's: vgdb names its pipes after ``$HOST``, which longdl's has.
    """
    control = subprocess.run(["callgrind_control", "--dump", str(pid)], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    dumped = out.with_name(f"{out.name}.{number}")
    if not dumped.exists():  # callgrind_control exits 0 when it finds no such run
        raise RuntimeError(f"callgrind wrote no {dumped.name}: {control.stdout}{control.stderr}")
    found = re.search(r"^totals: (\d+)", dumped.read_text(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no callgrind total in {dumped}")
    return int(found.group(1))


def _per_poll(
    pid: int, out: Path, url: str, path: str, env: Mapping[str, str] | None = None
) -> float:
    """Instructions per poll of the server ``pid`` (run with ``env``), whose callgrind
    file is ``out``."""
    _polls(url, path, WARM)
    _dump(pid, out, 1, env)  # start-up and the first polls, left out
    _polls(url, path, MANY)
    return _dump(pid, out, 2, env) / MANY


def _longdl(tmp: Path) -> float:
    data = tmp / "longdl"
    out = tmp / "longdl.cg"
    server = Longdl(data, common.stuck_settings(), wrapper=_callgrind(out))
    server.seed(*FILES)
    try:
        server.start(timeout_s=600)
        job = server.initiate(FILES)
        server.wait_status(job, "running")
        assert server.child is not None
        return _per_poll(server.child.pid, out, server.url, job["statusUrl"], server.env)
    finally:
        server.stop()


def _bare(tmp: Path, route: dict[str, Any], middleware: bool) -> float:
    name = f"bare-{int(middleware)}"
    out = tmp / f"{name}.cg"
    child, url = common.start_canned(tmp, [route], name, middleware, _callgrind(out), timeout_s=300)
    try:
        return _per_poll(child.pid, out, url, route["path"])
    finally:
        child.stop(timeout_s=120)


def run() -> dict[str, object]:
    with common.workdir() as tmp:
        server = Longdl(tmp / "capture", common.stuck_settings())
        server.seed(*FILES)
        with server:
            job = server.initiate(FILES)
            server.wait_status(job, "running")
            answer = _capture(server, job["statusUrl"])
        path = job["statusUrl"]
        plain, full = _route(path, answer), _route(path, answer, headers=True)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            measured = [
                pool.submit(_longdl, tmp),
                pool.submit(_bare, tmp, plain, False),
                pool.submit(_bare, tmp, full, True),
            ]
            longdl, bare, contract = (future.result() for future in measured)
    unit = "instr"
    rows = [
        Row("P1", "instructions per status poll (callgrind)", longdl, unit, bare,
            "bare aiohttp, same bytes", min_ratio=0.8, lower_is_better=True),
        Row("-", "instructions per status poll (callgrind)", longdl, unit, contract,
            "bare aiohttp, same bytes, 14 headers, one middleware", lower_is_better=True),
    ]  # fmt: skip
    return {
        "polls": f"{MANY} counted after {WARM} over one keep-alive connection",
        "longdl": f"{longdl:,.0f} instructions per poll",
        "bare aiohttp": f"{bare:,.0f}",
        "bare aiohttp, same headers, one middleware": f"{contract:,.0f}",
        "rows": rows,
    }
