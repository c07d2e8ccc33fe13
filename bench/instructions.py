"""P1 in instructions: what one status poll costs a real ``longdl serve``, counted by callgrind.

Wall-clock rates on these shared 2-core machines drift by 2x between runs, so a change
worth a few percent of a poll cannot be seen in them; instruction counts can. Each
server runs under ``valgrind --tool=callgrind`` (every user-space instruction of the
process: the interpreter, aiohttp's C parts, SQLite) twice, answering FEW and then MANY
polls of a running job over one keep-alive connection; the difference of the two totals
over MANY - FEW is the cost of one poll, start-up and shutdown cancelled out. Baselines:
bare aiohttp returning the same bytes, and the same with every header longdl sent and
one pass-through middleware (the contract's own price). The kernel's share (sends,
receives) is not counted; it is about the same for all three.

About two minutes (valgrind runs Python some 50 times slower; the two servers of each
measurement run at once); ``make bench`` installs valgrind with the other tools.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import re
import shutil
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import common
from bench.common import Longdl, Row
from bench.status import FILES, _capture, _route

FEW = 100
MANY = 1100


def _callgrind(out: Path) -> list[str]:
    if shutil.which("valgrind") is None:
        raise RuntimeError("valgrind is not installed (apt-get install valgrind)")
    return ["valgrind", "--tool=callgrind", "--vgdb=no", f"--callgrind-out-file={out}"]


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


def _collected(log: Path) -> int:
    """The instructions callgrind counted, from its closing lines in the server's log."""
    found = re.search(r"Collected : (\d+)", log.read_text())
    if found is None:
        raise RuntimeError(f"no callgrind total in {log}")
    return int(found.group(1))


def _longdl(tmp: Path, count: int) -> int:
    data = tmp / f"longdl-{count}"
    server = Longdl(data, common.stuck_settings(), wrapper=_callgrind(tmp / f"{count}.cg"))
    server.seed(*FILES)
    try:
        server.start(timeout_s=600)
        job = server.initiate(FILES)
        server.wait_status(job, "running")
        _polls(server.url, job["statusUrl"], count)
    finally:
        server.stop()
    return _collected(data.parent / f"{data.name}-serve.log")


def _bare(tmp: Path, route: dict[str, Any], middleware: bool, count: int) -> int:
    name = f"bare-{int(middleware)}-{count}"
    child, url = common.start_canned(
        tmp, [route], name, middleware, _callgrind(tmp / f"{name}.cg"), timeout_s=300
    )
    try:
        _polls(url, route["path"], count)
    finally:
        child.stop(timeout_s=120)
    return _collected(tmp / f"{name}.log")


def _per_poll(measure: Callable[[int], int]) -> float:
    """The FEW and MANY servers run side by side, one per core: what else the machine
    runs changes how long valgrind takes, not what it counts."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        few, many = pool.map(measure, (FEW, MANY))
    return (many - few) / (MANY - FEW)


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
        longdl = _per_poll(lambda n: _longdl(tmp, n))
        bare = _per_poll(lambda n: _bare(tmp, plain, False, n))
        contract = _per_poll(lambda n: _bare(tmp, full, True, n))
    unit = "instr"
    rows = [
        Row("P1", "instructions per status poll (callgrind)", longdl, unit, bare,
            "bare aiohttp, same bytes", min_ratio=0.8, lower_is_better=True),
        Row("-", "instructions per status poll (callgrind)", longdl, unit, contract,
            "bare aiohttp, same bytes, 14 headers, one middleware", lower_is_better=True),
    ]  # fmt: skip
    return {
        "polls": f"{MANY} - {FEW} over one keep-alive connection",
        "longdl": f"{longdl:,.0f} instructions per poll",
        "bare aiohttp": f"{bare:,.0f}",
        "bare aiohttp, same headers, one middleware": f"{contract:,.0f}",
        "rows": rows,
    }
