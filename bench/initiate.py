"""P2, P7 and issue 8's figures: durable initiates per second on a real ``longdl serve``.

wrk POSTs ``{"file_ids":[70000,70007]}`` (a Lua script) with ``-t2 -c64``; each request
creates a job whose row is committed before its 202. The service runs one worker,
held by a job whose "upstream" never answers, so the new jobs wait in the queue and
only taking them is measured (as for the arq baseline, where no worker runs).

- P2: against bare aiohttp reading the body and answering longdl's 202 bytes, and
  FastAPI + arq + Redis (``--appendonly yes --appendfsync everysec``) enqueueing one arq
  job per request.
- P7: with 100,000 finished jobs in the table, against the same on an empty table.
- Issue 8: with 0 and with 20,000 waiting jobs, each with ``DB_SYNCHRONOUS=normal`` and
  ``full`` side by side.
- The plot: initiate rate against rows in the table (finished and waiting).

Rows are seeded by copying a job the service wrote itself, with sqlite3, while it is
stopped (:func:`bench.common.clone_jobs`); each measurement starts on a fresh copy, so
the jobs one run adds do not count in the next. After each run the rows are counted:
every 202 wrk saw must have its row.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bench import common
from bench.common import Longdl, Plot, Row, Series

FILES = (70000, 70007)
BODY = {"file_ids": list(FILES)}
PATH = "/v1/download/initiate"


def run() -> dict[str, object]:
    quick = common.quick()
    sync_supported = common.settings_field("db_synchronous")
    with common.workdir() as tmp:
        script = common.post_script(tmp, PATH, BODY)
        template = tmp / "template"
        server = Longdl(template)
        server.seed(*FILES)
        with server:
            first = server.initiate(FILES)
            server.wait_status(first, "completed")
            accepted = common.http("POST", server.url + PATH, BODY)
            server.wait_status(accepted.json(), "completed")
        template_id = first["jobId"]
        db_name = common.database_path(template).relative_to(template)

        def variant(name: str, finished: int = 0, waiting: int = 0) -> Path:
            folder = tmp / f"seeded-{name}"
            shutil.copytree(template, folder)
            db = folder / db_name
            if finished:
                common.clone_jobs(db, template_id, finished, "completed")
            if waiting:
                common.clone_jobs(db, template_id, waiting, "queued")
            return folder

        def measure(seeded: Path, sync: str = "normal") -> float:
            data = tmp / "run"
            shutil.rmtree(data, ignore_errors=True)
            shutil.copytree(seeded, data)
            before = sum(common.count_jobs(data / db_name).values())
            settings = {**common.stuck_settings(), "DB_SYNCHRONOUS": sync}
            with Longdl(data, settings) as live:
                result = common.wrk(live.url + PATH, script=script)
            added = sum(common.count_jobs(data / db_name).values()) - before
            if added < result.requests - result.errors:
                raise RuntimeError(f"{result.requests} answers but only {added} rows")
            return result.rps

        empty = variant("empty")
        configs: dict[str, tuple[Path, str]] = {"empty": (empty, "normal")}
        if not quick:
            waiting_20k = variant("w20k", waiting=20_000)
            configs |= {
                "finished_100000": (variant("f100k", finished=100_000), "normal"),
                "empty_full": (empty, "full"),
                "waiting_20000": (waiting_20k, "normal"),
                "waiting_20000_full": (waiting_20k, "full"),
            }

        children: list[common.Child] = []
        best: dict[str, float] = {}
        try:
            aio, aio_url = common.start_canned(
                tmp,
                [{"method": "POST", "path": PATH, "status": 202, "body": accepted.body.decode()}],
            )
            children.append(aio)
            redis, redis_port = common.start_redis(tmp)
            children.append(redis)
            arq, arq_url = common.start_uvicorn(
                tmp, "fastapi_arq", {"BENCH_REDIS_PORT": str(redis_port)}
            )
            children.append(arq)
            for _ in range(common.rounds()):
                best["aiohttp"] = max(
                    best.get("aiohttp", 0.0), common.wrk(aio_url + PATH, script=script).rps
                )
                best["arq"] = max(
                    best.get("arq", 0.0), common.wrk(arq_url + PATH, script=script).rps
                )
                for name, (seeded, sync) in configs.items():
                    best[name] = max(best.get(name, 0.0), measure(seeded, sync))
        finally:
            for child in reversed(children):
                child.stop()

        finished = Series("finished jobs in the table")
        waiting = Series("waiting jobs in the table")
        finished.add(0, best["empty"])
        waiting.add(0, best["empty"])
        if not quick:
            for count in (25_000, 50_000):
                finished.add(count, measure(variant(f"f{count}", finished=count)))
            finished.add(100_000, best["finished_100000"])
            waiting.add(10_000, measure(variant("w10k", waiting=10_000)))
            waiting.add(20_000, best["waiting_20000"])

    rps = "req/s"
    sync_note = (
        ""
        if sync_supported
        else "DB_SYNCHRONOUS is not a longdl setting yet: the normal and full rows measure "
        "the same store (passed as an env var, ignored)."
    )
    rows = [
        Row("P2", "durable initiate", best["empty"], rps, best["aiohttp"],
            "bare aiohttp POST, same 202 bytes", min_ratio=0.5),
        Row("P2", "durable initiate", best["empty"], rps, best["arq"],
            "FastAPI + arq + Redis (AOF everysec)", min_ratio=1.0),
    ]  # fmt: skip
    if not quick:
        rows += [
            Row("P7", "initiate, 100,000 finished jobs in the table", best["finished_100000"],
                rps, best["empty"], "initiate, empty table", min_ratio=0.8),
            Row("I8", "initiate, 20,000 waiting, DB_SYNCHRONOUS=normal", best["waiting_20000"],
                rps, best["empty"], "0 waiting, normal", min_ratio=0.8, note=sync_note),
            Row("I8", "initiate, 20,000 waiting, DB_SYNCHRONOUS=full",
                best["waiting_20000_full"], rps, best["empty_full"], "0 waiting, full",
                min_ratio=0.8, note=sync_note),
            Row("I8", "initiate, 0 waiting, DB_SYNCHRONOUS=full", best["empty_full"], rps,
                best["empty"], "0 waiting, normal", note=sync_note),
        ]  # fmt: skip
    figures: dict[str, object] = {name: f"{value:,.0f} req/s" for name, value in best.items()}
    if sync_note:
        figures["note"] = sync_note
    plot = Plot(
        "initiate-vs-rows",
        "Durable initiate rate against rows already in the table",
        "rows in the jobs table",
        "initiates per second (wrk -t2 -c64)",
        [finished, waiting],
    )
    return {
        "wrk": f"-t2 -c64 -d{common.wrk_duration_s()}s -s post.lua, best of {common.rounds()}",
        **figures,
        "rows": rows,
        "plots": [plot],
    }


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key}: {value}")
