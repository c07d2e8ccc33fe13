"""P3: trivial jobs end to end in one process (submit -> completed), longdl against Huey.

Both run ``JOBS`` jobs that do nothing, timed from the first submit to the last
completion, each in a fresh child process on a fresh SQLite file:

- longdl: the real application (``create_app``, its store, engine and default
  ``WORKER_CONCURRENCY``) with a ``noop`` job kind, started without an HTTP listener;
  jobs submitted one after another through ``engine.submit`` (each row committed before
  it returns), completions counted by a change listener. Also with 64 concurrent
  submitters, as requests arrive at a web service (for information).
- Huey: ``SqliteHuey`` storage with one thread worker, the producer enqueueing one task
  after another, completions counted with ``SIGNAL_COMPLETE``. SQLite runs with
  ``synchronous=NORMAL`` as longdl's does (Huey's default is FULL, an fsync per
  commit, which would flatter longdl), and the worker polls every millisecond (its
  default backs off to 10 s when idle).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.common import Row

JOBS = 2000


def run() -> dict[str, object]:
    count = 500 if common.quick() else JOBS
    best: dict[str, float] = {}
    with common.workdir() as tmp:
        for round_no in range(common.rounds()):
            for mode in ("huey", "longdl", "longdl_concurrent"):
                folder = tmp / f"{mode}-{round_no}"
                folder.mkdir()
                seconds = _child(mode, count, folder)
                best[mode] = max(best.get(mode, 0.0), count / seconds)
    unit = "jobs/s"
    rows = [
        Row("P3", f"{count:,} trivial jobs, submit -> completed, in-process", best["longdl"],
            unit, best["huey"], "Huey, SqliteHuey, one worker", min_ratio=1.5),
        Row("-", f"{count:,} trivial jobs, 64 concurrent submitters", best["longdl_concurrent"],
            unit, best["huey"], "Huey, SqliteHuey, one worker"),
    ]  # fmt: skip
    return {
        "jobs": f"{count:,} per run, best of {common.rounds()}",
        **{name: f"{value:,.0f} jobs/s" for name, value in best.items()},
        "rows": rows,
    }


def _child(mode: str, count: int, folder: Path) -> float:
    done = subprocess.run(
        [sys.executable, "-m", "bench.jobs_e2e", "--child", mode, str(count), str(folder)],
        cwd=common.ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return float(result["seconds"])


# --- the measured children ------------------------------------------------------------


def _huey(count: int, folder: Path) -> float:
    from huey import Huey
    from huey.signals import SIGNAL_COMPLETE
    from huey.storage import SqliteStorage

    class NormalSyncStorage(SqliteStorage):  # type: ignore[misc]
        """SqliteHuey's storage with longdl's durability: WAL, synchronous=NORMAL."""

        def _create_connection(self) -> Any:
            conn = super()._create_connection()
            conn.execute("pragma synchronous=1")
            return conn

    huey = Huey("bench", storage_class=NormalSyncStorage, filename=str(folder / "huey.db"))
    finished = threading.Event()
    completed = [0]

    @huey.task()  # type: ignore[misc]
    def noop() -> None:
        return None

    @huey.signal(SIGNAL_COMPLETE)  # type: ignore[misc]
    def on_complete(signal: str, task: Any, *args: Any) -> None:
        completed[0] += 1
        if completed[0] == count:
            finished.set()

    consumer = huey.create_consumer(
        workers=1,
        worker_type="thread",
        periodic=False,
        initial_delay=0.001,
        backoff=1.0,
        max_delay=0.001,
        check_worker_health=False,
    )
    consumer.start()
    try:
        started = time.perf_counter()
        for _ in range(count):
            noop()
        if not finished.wait(600):
            raise RuntimeError(f"huey completed {completed[0]} of {count}")
        return time.perf_counter() - started
    finally:
        consumer.stop(graceful=True)


async def _longdl(count: int, folder: Path, concurrency: int) -> float:
    from aiohttp import web

    from longdl.app import create_app
    from longdl.config import Settings
    from longdl.engine import Artifact, JobContext
    from longdl.web import keys

    async def noop(ctx: JobContext) -> Artifact:
        return Artifact(key="bench/noop", filename="noop", size_bytes=0, owned=False)

    settings = Settings(
        data_dir=folder / "data",
        log_level="WARNING",
        max_queued=10**9,
        max_active_per_user=10**9,
        sweep_interval_s=86400,
    )
    app = create_app(settings, handlers={"noop": noop})
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        engine = app[keys.ENGINE]
        finished = asyncio.Event()
        completed: set[str] = set()

        def on_change(job: Any) -> None:
            if job.kind != "noop":
                return
            if job.status.value == "completed":
                completed.add(job.id)
                if len(completed) == count:
                    finished.set()
            elif job.status.finished:
                raise RuntimeError(f"job {job.id} ended {job.status.value}: {job.error}")

        engine.hub.add_listener(on_change)
        slots = asyncio.Semaphore(concurrency)

        async def submit() -> None:
            async with slots:
                await engine.submit("noop", {})

        started = time.perf_counter()
        if concurrency == 1:
            for _ in range(count):
                await engine.submit("noop", {})
        else:
            await asyncio.gather(*(submit() for _ in range(count)))
        async with asyncio.timeout(600):
            await finished.wait()
        return time.perf_counter() - started
    finally:
        await runner.cleanup()


def _main_child(mode: str, count: int, folder: Path) -> None:
    if mode == "huey":
        seconds = _huey(count, folder)
    else:
        concurrency = 64 if mode == "longdl_concurrent" else 1
        seconds = asyncio.run(_longdl(count, folder, concurrency))
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _main_child(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    else:
        for key, value in run().items():
            print(f"{key}: {value}")
