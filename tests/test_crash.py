"""A real ``longdl serve`` under the things operators meet: another process holding the
database, a job that kills its process, kill -9 mid-bundle (local and S3), a full disk."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import IN_CI, wait_for
from s3server import ACCESS_KEY, REGION, SECRET_KEY, SeaweedServer, unique_bucket
from service import ServiceProcess

from longdl.storage.s3 import MIN_PART_SIZE_BYTES

pytestmark = pytest.mark.slow

FAST = {
    "PROGRESS_FLUSH_MS": "100",
    "RETRY_BASE_MS": "50",
    "RETRY_MAX_MS": "200",
    "SHUTDOWN_GRACE_S": "0",
    "RATE_LIMIT_MAX_REQUESTS": "100000",
}


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for proc in started:
        proc.close()


def service(
    processes: list[ServiceProcess], data_dir: Path, settings: dict[str, str], **kwargs: Any
) -> ServiceProcess:
    proc = ServiceProcess(data_dir, {**FAST, **settings}, **kwargs)
    processes.append(proc)
    return proc


async def job_status(proc: ServiceProcess, job_id: str, path: str = "/v1/download/status") -> Any:
    status, body = await proc.json("GET", f"{path}/{job_id}")
    assert 200 == status, body
    return body


async def wait_finished(proc: ServiceProcess, job_id: str, timeout_s: float = 60) -> Any:
    async def done() -> Any:
        body = await job_status(proc, job_id)
        return body if body["status"] in ("completed", "failed", "canceled") else None

    return await wait_for(done, timeout_s, interval_s=0.1)


def write_source(storage_dir: Path, file_id: int, size_bytes: int) -> None:
    path = storage_dir / "downloads" / f"{file_id}.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        for _ in range(size_bytes // (1 << 20)):
            fh.write(os.urandom(1 << 20))


def part_files(storage_dir: Path) -> list[Path]:
    return sorted(storage_dir.rglob(".*.part"))


# --- another process holding the write lock ----------------------------------------------


class HeldLock:
    """Another process's connection holding the write lock (from a thread here)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._hold, daemon=True)

    def _hold(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        self.held.set()
        self.release.wait(60)
        conn.execute("COMMIT")
        conn.close()


async def test_initiates_under_lock_pressure_are_refused_cleanly_then_served(
    processes: list[ServiceProcess], tmp_path: Path
) -> None:
    """Another process holds the write lock for 5 s under a 1.5 s request deadline:
    initiates get 503 or 504 with Retry-After, never 500; afterwards every initiate is
    202, its jobs complete, and the database passes its integrity check."""
    proc = service(
        processes,
        tmp_path / "data",
        {"REQUEST_TIMEOUT_MS": "1500", "LONG_POLL_MAX_S": "1", "SYNC_WAIT_MAX_S": "1"},
    )
    proc.run_cli("seed", "70000", "70007")
    await proc.start()
    lock = HeldLock(proc.data_dir / "longdl.sqlite3")
    lock.thread.start()
    await asyncio.to_thread(lock.held.wait, 10)
    body = {"json": {"file_ids": [70000, 70007]}}
    held_until = time.monotonic() + 5
    async with aiohttp.ClientSession() as session:

        async def initiate() -> tuple[int, str | None]:
            async with session.post(f"{proc.url}/v1/download/initiate", **body) as response:
                return response.status, response.headers.get("Retry-After")

        during = await asyncio.gather(*(initiate() for _ in range(4)))
        await asyncio.sleep(max(0.0, held_until - time.monotonic()))  # the lock's 5 s
        lock.release.set()
        lock.thread.join()
        after = [await initiate() for _ in range(20)]

    assert all(status in (503, 504) and retry for status, retry in during), during
    assert [202] * 20 == [status for status, _ in after]
    _, history = await proc.json("GET", "/v1/download/history?limit=100")
    for item in history["items"]:
        assert "completed" == (await wait_finished(proc, item["jobId"]))["status"]
    assert (200, "healthy") == ((await proc.json("GET", "/health"))[0], "healthy")
    with sqlite3.connect(proc.data_dir / "longdl.sqlite3") as conn:
        assert [("ok",)] == conn.execute("PRAGMA integrity_check").fetchall()


# --- a job that kills its process ----------------------------------------------------------


async def test_a_job_that_kills_its_process_fails_with_worker_lost(
    processes: list[ServiceProcess], tmp_path: Path
) -> None:
    """A job kind that kills the process on every run stops being run after MAX_STALLS
    restarts: it fails with WORKER_LOST, and the service then serves normally."""
    proc = service(processes, tmp_path / "data", {"MAX_STALLS": "2"}, argv=("tests/jobs_app.py",))
    proc.run_cli("seed", "70000")
    await proc.start()
    status, accepted = await proc.json("POST", "/test/jobs/poison")
    assert 202 == status, accepted
    job_id = accepted["jobId"]
    assert 1 == await proc.wait_exit()

    async def died_or_failed() -> str | None:
        if proc.exited() is not None:
            return "died"
        try:
            body = await job_status(proc, job_id)
        except aiohttp.ClientError:
            return None  # still starting
        return "failed" if body["status"] == "failed" else None

    restarts = 0
    while True:
        proc.spawn()
        restarts += 1
        if await wait_for(died_or_failed, 30, interval_s=0.05) == "failed":
            break
        assert restarts < 4, "the service keeps dying on its poison job: a crash loop"
    assert 2 == restarts  # MAX_STALLS
    body = await job_status(proc, job_id)
    assert ("failed", "WORKER_LOST", False) == (
        body["status"],
        body["error"]["code"],
        body["error"]["retryable"],
    )
    assert "died" in body["error"]["message"]
    status, accepted = await proc.json("POST", "/v1/download/initiate", json={"file_ids": [70000]})
    assert "completed" == (await wait_finished(proc, accepted["jobId"]))["status"]


# --- kill -9 mid-bundle --------------------------------------------------------------------


async def test_kill_mid_bundle_leaves_no_part_file(
    processes: list[ServiceProcess], tmp_path: Path
) -> None:
    """SIGKILL while a bundle is being written leaves a part file; the next start removes
    it, runs the job again, and exactly one bundle remains."""
    proc = service(processes, tmp_path / "data", {})
    storage_dir = proc.data_dir / "storage"
    ids = [20001, 20002, 20003, 20004]
    for file_id in ids:
        await asyncio.to_thread(write_source, storage_dir, file_id, 48 << 20)
    await proc.start()
    status, accepted = await proc.json("POST", "/v1/download/initiate", json={"file_ids": ids})
    assert 202 == status

    async def writing() -> list[Path]:
        return await asyncio.to_thread(part_files, storage_dir)

    await wait_for(writing, 30, interval_s=0.005)
    proc.kill()
    left = await asyncio.to_thread(part_files, storage_dir)
    assert 1 == len(left)

    await proc.start()
    body = await wait_finished(proc, accepted["jobId"])

    assert "completed" == body["status"]
    assert [] == await asyncio.to_thread(part_files, storage_dir)
    # Taken over once (its first run was killed): written as {job_id}.1.zip.
    assert [f"{accepted['jobId']}.1.zip"] == [p.name for p in (storage_dir / "bundles").iterdir()]


@pytest.fixture
async def s3_env(seaweed: SeaweedServer) -> AsyncIterator[tuple[dict[str, str], Any]]:
    """Settings of a fresh bucket as environment variables, and a client on it."""
    from aiobotocore.session import get_session

    bucket = unique_bucket()
    env = {key.upper(): str(value) for key, value in seaweed.settings(bucket).items()}
    async with get_session().create_client(
        "s3",
        endpoint_url=seaweed.endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    ) as client:
        await client.create_bucket(Bucket=bucket)
        yield env, client


async def test_kill_mid_upload_leaves_no_multipart_upload(
    processes: list[ServiceProcess],
    tmp_path: Path,
    s3_env: tuple[dict[str, str], Any],
) -> None:
    """SIGKILL during a bundle's multipart upload to S3 leaves an incomplete upload; once
    it is older than any attempt can run, the restarted service aborts it."""
    env, client = s3_env
    bucket = env["S3_BUCKET_NAME"]
    ids = [30001, 30002, 30003]
    for file_id in ids:
        await client.put_object(
            Bucket=bucket, Key=f"downloads/{file_id}.zip", Body=os.urandom(24 << 20)
        )
    settings = {
        **env,
        "S3_PART_SIZE_BYTES": str(MIN_PART_SIZE_BYTES),
        "JOB_TIMEOUT_S": "3",
        "LEASE_S": "1",
        "SWEEP_INTERVAL_S": "0.2",
    }
    proc = service(processes, tmp_path / "data", settings)
    await proc.start()
    status, accepted = await proc.json("POST", "/v1/download/initiate", json={"file_ids": ids})
    assert 202 == status

    async def uploads() -> list[Any]:
        return list((await client.list_multipart_uploads(Bucket=bucket)).get("Uploads", []))

    (orphan,) = await wait_for(uploads, 30, interval_s=0.01)
    proc.kill()
    await proc.start()
    await wait_finished(proc, accepted["jobId"])

    async def aborted() -> bool:
        return orphan["UploadId"] not in [u["UploadId"] for u in await uploads()]

    await wait_for(aborted, 30, interval_s=0.2)
    assert [] == await uploads()


# --- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 40 MiB tmpfs to fill up (mounting needs root: CI runs as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        message = "mounting a tmpfs needs root"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> None:
    """Write zeros into ``path`` until the disk under it is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (64 << 10, 4096, 512, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                continue  # full at this size: try smaller writes
    finally:
        os.close(fd)


async def test_a_full_disk_is_a_clear_problem_and_heals_by_itself(
    processes: list[ServiceProcess], small_disk: Path, tmp_path: Path
) -> None:
    """With DATA_DIR's disk full, initiates are refused with a clear 503 (never 500) and
    a job that cannot write waits to retry with STORAGE_FULL or DISK_FULL; once space is
    freed the service recovers on its own: new jobs are accepted and everything
    completes, with no part file left and an intact database."""
    data_dir = small_disk / "data"
    proc = service(
        processes,
        data_dir,
        {
            "MAX_ATTEMPTS": "20",
            "RETRY_BASE_MS": "200",
            "RETRY_MAX_MS": "500",
            # The jobs are still resolving when the disk fills; they bundle after.
            "DOWNLOAD_DELAY_ENABLED": "true",
            "DOWNLOAD_DELAY_MIN_MS": "1500",
            "DOWNLOAD_DELAY_MAX_MS": "1500",
        },
        log_path=tmp_path / "full-disk-service.log",
    )
    ids = [40001, 40002]
    for file_id in ids:
        await asyncio.to_thread(write_source, data_dir / "storage", file_id, 2 << 20)
    await proc.start()
    first = [
        (await proc.json("POST", "/v1/download/initiate", json={"file_ids": ids}))[1]["jobId"]
        for _ in range(2)
    ]
    filler = small_disk / "filler"
    await asyncio.to_thread(fill, filler)

    answers = [await proc.json("POST", "/v1/download/initiate", json={"file_ids": ids})]
    while answers[-1][0] == 202 and len(answers) < 20:
        answers.append(await proc.json("POST", "/v1/download/initiate", json={"file_ids": ids}))
    assert {status for status, _ in answers} <= {202, 503}, answers
    assert (503, "DISK_FULL") == (answers[-1][0], answers[-1][1]["code"]), answers[-1]

    async def storage_full() -> bool:
        body = await job_status(proc, first[0])
        # The bundle's disk (STORAGE_FULL) or the database's (DISK_FULL): one disk here.
        return (body.get("error") or {}).get("code") in ("STORAGE_FULL", "DISK_FULL")

    await wait_for(storage_full, 30, interval_s=0.1)
    await asyncio.to_thread(filler.unlink)

    status, body = await proc.json("POST", "/v1/download/initiate", json={"file_ids": ids})
    assert 202 == status, body
    accepted = [b["jobId"] for status, b in answers if status == 202]
    for job_id in [*first, *accepted, body["jobId"]]:
        assert "completed" == (await wait_finished(proc, job_id))["status"]
    assert [] == await asyncio.to_thread(part_files, data_dir / "storage")
    with sqlite3.connect(data_dir / "longdl.sqlite3") as conn:
        assert [("ok",)] == conn.execute("PRAGMA integrity_check").fetchall()
