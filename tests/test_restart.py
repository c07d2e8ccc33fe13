"""Jobs survive a real ``longdl serve`` process being killed or stopped mid-job."""

from __future__ import annotations

import asyncio
import io
import re
import sqlite3
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import wait_for
from service import ServiceProcess

from longdl.seed import demo_content

pytestmark = pytest.mark.slow

#: Each job spends this long "talking to upstream", so it is mid-flight when killed.
DELAY_MS = "2500"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ServiceProcess]:
    proc = ServiceProcess(
        tmp_path / "data",
        {
            "WORKER_CONCURRENCY": "2",
            "DOWNLOAD_DELAY_ENABLED": "true",
            "DOWNLOAD_DELAY_MIN_MS": DELAY_MS,
            "DOWNLOAD_DELAY_MAX_MS": DELAY_MS,
            "PROGRESS_FLUSH_MS": "100",
            "SHUTDOWN_GRACE_S": "0",
        },
    )
    proc.run_cli("seed", "70000", "70007", "70014", "70021")
    yield proc
    proc.close()


async def initiate(service: ServiceProcess, file_ids: list[int]) -> str:
    status, body = await service.json("POST", "/v1/download/initiate", json={"file_ids": file_ids})
    assert 202 == status, body
    return str(body["jobId"])


async def job(service: ServiceProcess, job_id: str) -> dict[str, Any]:
    status, body = await service.json("GET", f"/v1/download/status/{job_id}")
    assert 200 == status, body
    return dict(body)


async def wait_status(
    service: ServiceProcess, job_id: str, statuses: set[str], timeout_s: float = 30.0
) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        body = await job(service, job_id)
        return body if body["status"] in statuses else None

    return await wait_for(probe, timeout_s, interval_s=0.1)


def rows(data_dir: Path) -> dict[str, tuple[str, int]]:
    """status and attempts of every job, straight from the SQLite file."""
    with sqlite3.connect(data_dir / "longdl.sqlite3") as db:
        return {
            job_id: (status, attempts)
            for job_id, status, attempts in db.execute("SELECT id, status, attempts FROM jobs")
        }


async def download(service: ServiceProcess, job_id: str) -> bytes:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{service.url}/v1/download/{job_id}") as response,
    ):
        assert 200 == response.status
        return await response.read()


async def test_sigkill_mid_job_loses_nothing_and_runs_nothing_twice(
    service: ServiceProcess,
) -> None:
    """Kill -9 with jobs running and queued: after a restart every job completes exactly once."""
    await service.start()
    done_before = await initiate(service, [70000, 70007])
    before = await wait_status(service, done_before, {"completed"})
    in_flight = [await initiate(service, ids) for ids in ([70000, 70014], [70007], [70021, 70000])]
    for job_id in in_flight[:2]:  # two slots: these two are running, the third waits
        await wait_status(service, job_id, {"running", "processing_artifacts"})

    service.kill()
    left = rows(service.data_dir)
    assert "completed" == left[done_before][0]
    assert {"running", "queued"} == {left[job_id][0] for job_id in in_flight}

    await service.start()
    after = [await wait_status(service, job_id, {"completed"}) for job_id in in_flight]

    completions = Counter(re.findall(r"job\.completed job_id=(\S+)", service.log()))
    assert {job_id: 1 for job_id in [done_before, *in_flight]} == dict(completions)
    assert (
        before["timestamps"]["finishedAt"]
        == (await job(service, done_before))["timestamps"]["finishedAt"]
    )
    assert [1, 1, 1] == [body["attempts"] for body in after]  # the kill used no attempt
    archive = zipfile.ZipFile(io.BytesIO(await download(service, in_flight[2])))
    assert demo_content(70021) == archive.read("70021.zip")
    assert demo_content(70000) == archive.read("70000.zip")


async def test_sigterm_requeues_running_jobs_which_finish_after_restart(
    service: ServiceProcess,
) -> None:
    """A graceful stop exits 0 and re-queues the running job; the next process finishes it."""
    await service.start()
    job_id = await initiate(service, [70000, 70007])
    await wait_status(service, job_id, {"running"})

    assert 0 == service.terminate()
    assert ("queued", 0) == rows(service.data_dir)[job_id]

    await service.start()
    body = await wait_status(service, job_id, {"completed"})
    assert 1 == body["attempts"]


async def test_sigterm_with_the_default_grace_exits_within_a_container_stop(
    tmp_path: Path,
) -> None:
    """With SHUTDOWN_GRACE_S at its default, SIGTERM mid-job exits 0 well inside the 10 s
    docker/podman stop waits before SIGKILL, and the job goes back to the queue."""
    service = ServiceProcess(
        tmp_path / "data",
        {
            "DOWNLOAD_DELAY_ENABLED": "true",
            "DOWNLOAD_DELAY_MIN_MS": "60000",
            "DOWNLOAD_DELAY_MAX_MS": "60000",
        },
    )
    service.env.pop("SHUTDOWN_GRACE_S", None)
    service.run_cli("seed", "70000")
    await service.start()
    try:
        job_id = await initiate(service, [70000])
        await wait_status(service, job_id, {"running"})
        # An open event stream must not add a wait of its own to the job's grace.
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{service.url}/v1/download/{job_id}/events") as stream,
        ):
            while b"event: snapshot" not in await stream.content.readline():
                pass
            started = time.monotonic()
            code = await asyncio.to_thread(service.terminate, 9.5)
            elapsed_s = time.monotonic() - started
    finally:
        service.close()

    assert 0 == code
    assert elapsed_s < 9.5
    assert ("queued", 0) == rows(service.data_dir)[job_id]
