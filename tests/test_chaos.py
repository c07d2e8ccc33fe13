"""Chaos: a real ``longdl serve`` on real SQLite, killed with SIGKILL at random moments
while 250 bundle jobs run and wait, restarted each time. Nothing may be lost, done
twice, left behind or run beyond its attempts, and every webhook arrives."""

from __future__ import annotations

import asyncio
import os
import random
import re
import sqlite3
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Receiver, bundles_by_job, wait_for
from service import ServiceProcess

pytestmark = pytest.mark.slow

JOBS = 250
CONCURRENCY = 50
KILLS = 5
SOURCES = {file_id: (2 << 20) + file_id for file_id in range(50001, 50007)}
#: Change with CHAOS_SEED to try other kill moments; the seed is in every failure.
SEED = int(os.environ.get("CHAOS_SEED", "8"))


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[ServiceProcess]:
    service = ServiceProcess(
        tmp_path / "data",
        {
            "WORKER_CONCURRENCY": str(CONCURRENCY),
            "MAX_STALLS": "10",
            "MAX_ATTEMPTS": "3",
            "DOWNLOAD_DELAY_ENABLED": "true",
            # Long enough that the work outlasts the five kills and restarts (at most
            # about 3 s each) even on a fast machine: 5 rounds of 1-3 s, plus what each
            # kill throws away.
            "DOWNLOAD_DELAY_MIN_MS": "1000",
            "DOWNLOAD_DELAY_MAX_MS": "3000",
            "PROGRESS_FLUSH_MS": "200",
            "SHUTDOWN_GRACE_S": "0",
            "WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
            "WEBHOOK_RETRY_BASE_MS": "100",
            "WEBHOOK_RETRY_MAX_MS": "500",
            "RATE_LIMIT_MAX_REQUESTS": "100000",
            "RATE_LIMIT_POLL_MAX_REQUESTS": "100000",
            "MAX_ACTIVE_PER_USER": "1000",
        },
    )
    downloads = service.data_dir / "storage" / "downloads"
    downloads.mkdir(parents=True)
    for file_id, size in SOURCES.items():
        (downloads / f"{file_id}.zip").write_bytes(random.Random(file_id).randbytes(size))
    yield service
    service.close()


def files_of(index: int) -> list[int]:
    ids = sorted(SOURCES)
    return [ids[index % 6], ids[(index + 1) % 6], ids[(index + 3) % 6]]


def rows(data_dir: Path) -> dict[str, tuple[str, int, int]]:
    with sqlite3.connect(data_dir / "longdl.sqlite3") as conn:
        return {
            job_id: (status, attempts, max_attempts)
            for job_id, status, attempts, max_attempts in conn.execute(
                "SELECT id, status, attempts, max_attempts FROM jobs"
            )
        }


async def test_kill_9_five_times_loses_nothing(
    proc: ServiceProcess, receiver: tuple[Receiver, str]
) -> None:
    """250 bundle jobs (50 running, 200 waiting), SIGKILL at 5 random moments with a
    restart each time: 250/250 complete, none twice, one valid bundle each, no
    part file, every webhook delivered with one webhook-id per job, no job beyond its
    attempts."""
    recorder, hook_url = receiver
    rand = random.Random(SEED)
    # Submit with no workers, so that no job finishes before the first kill's clock
    # starts, however slowly the 250 requests go.
    proc.env["WORKER_CONCURRENCY"] = "0"
    await proc.start()
    job_files: dict[str, list[int]] = {}
    for index in range(JOBS):
        status, body = await proc.json(
            "POST",
            "/v1/download/initiate",
            json={"file_ids": files_of(index), "callbackUrl": hook_url},
            headers={"Idempotency-Key": f"chaos-{index}"},
        )
        assert 202 == status, body
        job_files[body["jobId"]] = files_of(index)
    assert 0 == proc.terminate()
    proc.env["WORKER_CONCURRENCY"] = str(CONCURRENCY)
    await proc.start()

    for kill in range(KILLS):
        # Let it run a random while, at least until this start has claimed work.
        async def claimed() -> bool:
            return any(
                s in ("running", "processing_artifacts") for s, *_ in rows(proc.data_dir).values()
            )

        try:
            await wait_for(claimed, 30)
        except AssertionError as exc:
            states = Counter(s for s, *_ in rows(proc.data_dir).values())
            raise AssertionError(
                f"seed {SEED}: nothing running 30 s before kill {kill + 1}; jobs {dict(states)}; "
                f"the service's log ends:\n{proc.log()[-4000:]}"
            ) from exc
        await asyncio.sleep(rand.uniform(0.2, 1.5))  # the random moment of the kill
        proc.kill()
        await proc.start()

    async def all_finished() -> bool:
        states = rows(proc.data_dir)
        return len(states) == JOBS and all(
            s in ("completed", "failed") for s, *_ in states.values()
        )

    await wait_for(all_finished, 180, interval_s=0.25)

    async def all_delivered() -> bool:
        return {job for _, job in recorder.deliveries} >= set(job_files)

    await wait_for(all_delivered, 60, interval_s=0.1)
    states = rows(proc.data_dir)
    storage = proc.data_dir / "storage"
    with sqlite3.connect(proc.data_dir / "longdl.sqlite3") as conn:
        trashed = [key for (key,) in conn.execute("SELECT key FROM trash")]
    bundles = bundles_by_job((p.name for p in (storage / "bundles").iterdir()), trashed)
    completions = Counter(re.findall(r"job\.completed job_id=(\S+)", proc.log()))
    ids_per_job: dict[str, set[str]] = defaultdict(set)
    for webhook_id, job_id in recorder.deliveries:
        ids_per_job[job_id].add(webhook_id)

    context = f"seed {SEED}"
    assert {"completed": JOBS} == dict(Counter(s for s, *_ in states.values())), context
    assert sorted(job_files) == sorted(bundles), context
    assert [] == sorted(storage.rglob(".*.part")), context
    # A kill may land between a completion's commit and its log line: never two, though.
    assert {1} == set(completions.values()) and set(completions) <= set(job_files), context
    assert all(attempts <= most for _, attempts, most in states.values()), context
    assert set(job_files) == set(ids_per_job), context
    assert {1} == {len(ids) for ids in ids_per_job.values()}, context
    sample = rand.sample(sorted(job_files), 20)
    for job_id in job_files:
        with zipfile.ZipFile(storage / "bundles" / bundles[job_id]) as archive:
            sizes = [info.file_size for info in archive.infolist()]
            assert [SOURCES[f] for f in job_files[job_id]] == sizes, (context, job_id)
            if job_id in sample:
                assert archive.testzip() is None, (context, job_id)
