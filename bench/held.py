"""P4: 10,000 idle event streams and 10,000 long-polls held at once by a real ``longdl serve``.

The point of longdl is that clients wait cheaply: each holds an event stream (SSE) or a
long-poll (``?wait=`` with the current ETag) instead of a worker. Holder processes
(plain asyncio sockets, so the clients cost little themselves) open the connections
on a queued job that does not change, in four waves: half the streams, all of them,
then half the long-polls, all of them. After each wave this reads the server's settled
resident memory (VmRSS) and the status latency meanwhile of the running job ahead of it
(wrk ``-t1 -c4 --latency``: four pollers going flat out; the lowest p99 of
``BENCH_ROUNDS`` runs, as other work on a shared machine only adds to it). The
baseline is the idle process, measured first in the same run; then bare aiohttp holds
the same connections, which is what each costs before any longdl code (P4's floor).

One process may hold only ``ulimit -n`` sockets: where the hard limit is below 20,000
plus a margin, it holds as many as fit, half of each kind, and scales the memory growth
linearly to 10,000 + 10,000 (the report says so).
"""

from __future__ import annotations

import asyncio
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from bench import common
from bench.common import Longdl, Plot, Row, Series

TARGET_PER_KIND = 10_000
#: File descriptors the server needs besides the held sockets (SQLite, listener, wrk...).
FD_MARGIN = 400
MB = 1e6


def run() -> dict[str, object]:
    limit = common.raise_fd_limit()
    per_kind = min(TARGET_PER_KIND, (limit - FD_MARGIN) // 2)
    waves = [
        ("sse", per_kind // 2),
        ("sse", per_kind - per_kind // 2),
        ("poll", per_kind // 2),
        ("poll", per_kind - per_kind // 2),
    ]
    settings = {
        **common.stuck_settings(),
        # Held for the whole run: no deadline, no stream or long-poll ends by itself.
        "REQUEST_TIMEOUT_MS": "0",
        "LONG_POLL_MAX_S": "3600",
        "SSE_MAX_S": "3600",
        # Above the 20,000 held plus wrk's: the default (1,000) refuses the rest with 503.
        "MAX_CONNECTIONS": "25000",
    }
    held = 0
    p50, p99, rss = Series("p50"), Series("p99"), Series("server RSS")
    holders: list[common.Child] = []
    with common.workdir() as tmp:
        server = Longdl(tmp / "data", settings)
        server.seed(70000, 70007)
        try:
            server.start()
            running = server.initiate((70000, 70007))
            server.wait_status(running, "running")
            # Held on a job waiting behind it: nothing about it changes. (A running job
            # wakes its waiters on every progress report, changed or not.)
            job = server.initiate((70000, 70007))
            status_url = server.url + running["statusUrl"]
            etag = server.status(job).headers["etag"]

            def sample() -> tuple[float, float]:
                memory = common.settled_rss_kib(server.pid) * 1024 / MB
                runs = [
                    common.wrk(status_url, threads=1, connections=4, latency=True)
                    for _ in range(common.rounds())
                ]
                result = min(runs, key=lambda r: r.p99_ms or 0.0)
                assert result.p50_ms is not None and result.p99_ms is not None
                p50.add(held, result.p50_ms)
                p99.add(held, result.p99_ms)
                rss.add(held, memory)
                return memory, result.p99_ms

            idle_mb, idle_p99 = sample()
            after_streams_mb = idle_mb
            for index, (kind, count) in enumerate(waves):
                holder = _start_holder(tmp, index, server.port, job, etag, kind, count)
                holders.append(holder)
                _expect(holder, "ready", timeout_s=300)
                held += count
                memory, latency = sample()
                if kind == "sse":
                    after_streams_mb = memory
            all_mb, all_p99 = memory, latency
            early = sum(int(_expect(h, "early", send="check\n").split()[1]) for h in holders)
            if early:
                raise RuntimeError(f"{early} long-polls were answered while nothing changed")
            body = server.status(job).body.decode()
        finally:
            for holder in holders:
                holder.stop(timeout_s=10)
            holders.clear()
            server.stop()
        bare = _bare_cost_kib(tmp, job, body, per_kind)

    per_stream_kib = (after_streams_mb - idle_mb) * MB / 1024 / per_kind
    per_poll_kib = (all_mb - after_streams_mb) * MB / 1024 / per_kind
    scaled = per_kind < TARGET_PER_KIND
    total_mb = idle_mb + (all_mb - idle_mb) * TARGET_PER_KIND / per_kind
    how = (
        f" (measured {per_kind:,} + {per_kind:,}: ulimit -n is {limit:,}; growth scaled "
        f"linearly from {all_mb:.0f} MB)"
        if scaled
        else ""
    )
    label = f"{TARGET_PER_KIND:,} SSE + {TARGET_PER_KIND:,} long-polls held"
    floor_mb = idle_mb + (bare["sse"] + bare["poll"]) * 1024 * TARGET_PER_KIND / MB
    rows = [
        Row("P4", f"RSS with {label}{how}", total_mb, "MB", idle_mb, "idle process",
            max_value=250),
        Row("P4", f"status p99 latency with {per_kind:,} + {per_kind:,} held (wrk -c4)",
            all_p99, "ms", idle_p99, "none held", max_value=25, lower_is_better=True),
        Row("-", "memory per held event stream", per_stream_kib, "KiB", bare["sse"],
            "bare aiohttp holding the same stream", lower_is_better=True),
        Row("-", "memory per held long-poll", per_poll_kib, "KiB", bare["poll"],
            "bare aiohttp holding the same request", lower_is_better=True),
        Row("-", f"RSS of longdl's idle process plus {label} at bare aiohttp's cost "
            "(P4's floor on aiohttp)", floor_mb, "MB"),
    ]  # fmt: skip
    plots = [
        Plot(
            "latency-vs-held",
            "Status latency of a running job against connections held (wrk -t1 -c4)",
            "connections held (event streams first, then long-polls)",
            "latency (ms)",
            [p50, p99],
        ),
        Plot(
            "rss-vs-held",
            "Server memory against connections held",
            "connections held (event streams first, then long-polls)",
            "RSS (MB)",
            [rss],
        ),
    ]
    return {
        "held": f"{per_kind:,} event streams, then {per_kind:,} long-polls (ulimit -n {limit:,})",
        "idle RSS": f"{idle_mb:.1f} MB",
        "with all held": f"{all_mb:.1f} MB",
        "per event stream": f"{per_stream_kib:.1f} KiB",
        "per long-poll": f"{per_poll_kib:.1f} KiB",
        "status p99 idle / all held": f"{idle_p99:.2f} / {all_p99:.2f} ms",
        "bare aiohttp per event stream / long-poll": f"{bare['sse']:.1f} / {bare['poll']:.1f} KiB",
        "rows": rows,
        "plots": plots,
    }


def _bare_cost_kib(tmp: Path, job: dict[str, Any], body: str, count: int) -> dict[str, float]:
    """Memory per held connection of bare aiohttp holding the same requests (the same
    holders, ``count`` of each kind, the job's body as its answer and snapshot): the
    part of each held connection that is aiohttp's and asyncio's, not longdl's."""
    routes = [
        {"path": job["eventsUrl"], "body": body, "hold": "stream"},
        {"path": job["statusUrl"], "body": body, "hold": "poll"},
    ]
    child, url = common.start_canned(tmp, routes, name="aiohttp-held")
    port = int(url.rsplit(":", 1)[1])
    holders: list[common.Child] = []
    cost: dict[str, float] = {}
    try:
        before = common.settled_rss_kib(child.pid)
        for index, kind in enumerate(("sse", "poll")):
            holder = _start_holder(tmp, 10 + index, port, job, "", kind, count)
            holders.append(holder)
            _expect(holder, "ready", timeout_s=300)
            after = common.settled_rss_kib(child.pid)
            cost[kind] = (after - before) / count
            before = after
    finally:
        for holder in holders:
            holder.stop(timeout_s=10)
        child.stop(timeout_s=10)
    return cost


def _start_holder(
    tmp: Path, index: int, port: int, job: dict[str, Any], etag: str, kind: str, count: int
) -> common.Child:
    path = job["eventsUrl"] if kind == "sse" else job["statusUrl"] + "?wait=3600"
    return common.Child(
        [sys.executable, "-m", "bench.held", "--hold", kind, str(count), str(port), path, etag],
        tmp / f"holder-{index}.log",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def _expect(holder: common.Child, word: str, send: str = "", timeout_s: float = 60.0) -> str:
    """Send ``send`` to a holder and read its next line, which must start with ``word``."""
    stdin: IO[bytes] | None = holder.proc.stdin
    stdout: IO[bytes] | None = holder.proc.stdout
    assert stdin is not None and stdout is not None
    if send:
        stdin.write(send.encode())
        stdin.flush()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stdout], [], [], 1.0)
        if ready:
            line = stdout.readline().decode()
            if not line.startswith(word):
                raise RuntimeError(f"holder said {line!r}:\n{holder.log_tail()}")
            return line
        if not holder.alive():
            break
    raise RuntimeError(f"holder did not say {word!r}:\n{holder.log_tail()}")


# --- the holder child -----------------------------------------------------------------


async def _hold(kind: str, count: int, port: int, path: str, etag: str) -> None:
    """Open ``count`` connections of ``kind``; report, then hold them until told."""
    writers: list[asyncio.StreamWriter] = []
    watchers: list[asyncio.Task[None]] = []
    early = [0]
    slots = asyncio.Semaphore(100)  # the server's listen backlog is 128
    headers = "Accept: text/event-stream\r\n" if kind == "sse" else f"If-None-Match: {etag}\r\n"
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode()

    async def watch(reader: asyncio.StreamReader) -> None:
        if await reader.read(1):
            early[0] += 1

    async def open_one() -> None:
        async with slots:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            await writer.drain()
            writers.append(writer)
            if kind == "sse":
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(head.decode(errors="replace"))
                seen = b""
                # The snapshot event is complete once a blank line follows it.
                while b"snapshot" not in seen or b"\n\n" not in seen[seen.index(b"snapshot") :]:
                    chunk = await reader.read(65536)
                    if not chunk:
                        raise RuntimeError("event stream closed before its snapshot")
                    seen += chunk
            else:
                watchers.append(asyncio.create_task(watch(reader)))

    await asyncio.gather(*(open_one() for _ in range(count)))
    print(f"ready {len(writers)}", flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        if line.strip() == "check":
            print(f"early {early[0]}", flush=True)
    for task in watchers:
        task.cancel()
    for writer in writers:
        writer.close()


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--hold":
        common.raise_fd_limit()
        kind, count, port, path, etag = sys.argv[2:]
        asyncio.run(_hold(kind, int(count), int(port), path, etag))
    else:
        for key, value in run().items():
            print(f"{key}: {value}")
