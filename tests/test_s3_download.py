"""The whole download flow against real S3 (SeaweedFS): initiate, poll, 302, presigned GET."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import signal
import time
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp.test_utils import TestClient
from conftest import AppFactory, finished, initiate, wait_for
from s3server import SeaweedServer

from longdl.engine import Artifact, JobContext
from longdl.seed import demo_content
from longdl.storage import content_disposition
from longdl.storage.s3 import ABORT_TIMEOUT_S, MIN_PART_SIZE_BYTES, S3Storage
from longdl.web import keys

#: 4 MiB, 2 MiB, 1 MiB and 512 KiB demo files: the bundle spans two 5 MiB parts.
LARGE_IDS = (70070, 70063, 70056, 70049)


async def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    """GET a presigned URL as a browser would (the query sent exactly as signed)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(yarl.URL(url, encoded=True)) as response,
    ):
        return response.status, dict(response.headers), await response.read()


async def s3_client(make_client: AppFactory, seaweed: SeaweedServer, **overrides: Any) -> Any:
    """An app configured like production: STORAGE_BACKEND=s3 pointing at SeaweedFS."""
    return await make_client(**seaweed.settings(), **overrides)


async def test_bundle_downloads_byte_identical_from_s3(
    make_client: AppFactory, seaweed: SeaweedServer
) -> None:
    """Initiate, poll, follow the 302 to S3: the ZIP holds exactly the source files."""
    client = await s3_client(
        make_client, seaweed, seed_ids=LARGE_IDS, s3_part_size_bytes=MIN_PART_SIZE_BYTES
    )
    job_id = await initiate(client, list(LARGE_IDS))
    body = await finished(client, job_id, timeout_s=60)
    assert "completed" == body["status"]

    response = await client.get(f"/v1/download/{job_id}", allow_redirects=False)
    assert 302 == response.status
    location = response.headers["Location"]
    assert location.startswith(f"{seaweed.endpoint}/")
    status, headers, data = await fetch(location)

    assert 200 == status
    assert content_disposition(body["result"]["filename"]) == headers["Content-Disposition"]
    assert body["result"]["sha256"] == hashlib.sha256(data).hexdigest()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    assert {f"{i}.zip": demo_content(i) for i in LARGE_IDS} == entries


async def test_single_file_job_redirects_to_the_source_object(
    make_client: AppFactory, seaweed: SeaweedServer
) -> None:
    """One file is served straight from its source object, no copy in bundles/."""
    client = await s3_client(make_client, seaweed)
    job_id = await initiate(client, [70007])
    await finished(client, job_id)

    response = await client.get(f"/v1/download/{job_id}", allow_redirects=False)
    status, headers, data = await fetch(response.headers["Location"])

    assert (200, demo_content(70007)) == (status, data)
    assert content_disposition("70007.zip") == headers["Content-Disposition"]
    storage: S3Storage = client.app[keys.STORAGE]  # type: ignore[assignment]
    listed = await storage.client.list_objects_v2(Bucket=storage.bucket, Prefix="bundles/")
    assert [] == listed.get("Contents", [])


async def test_result_url_json_carries_a_working_presigned_url(
    make_client: AppFactory, seaweed: SeaweedServer
) -> None:
    """``?redirect=false`` returns the presigned URL, which downloads the bundle."""
    client = await s3_client(make_client, seaweed)
    job_id = await initiate(client, [70000, 70007])
    body = await finished(client, job_id)

    link = await (await client.get(f"/v1/download/{job_id}?redirect=false")).json()
    status, _, data = await fetch(link["url"])

    assert (200, body["result"]["size"]) == (status, len(data))


Uploads = Callable[[], Awaitable[list[Any]]]


async def job_mid_upload(
    make_client: AppFactory, seaweed: SeaweedServer
) -> tuple[TestClient[Any, Any], str, Uploads]:
    """An app on SeaweedFS running a job whose upload has begun (one part sent) and then
    stalls until canceled: the client, the job's id, and what lists the bucket's
    multipart uploads."""

    async def stalling_upload(ctx: JobContext) -> Artifact:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"x" * MIN_PART_SIZE_BYTES  # one full part: the upload has begun
            await asyncio.Event().wait()  # then the producer stalls until canceled
            yield b""

        key = f"bundles/{ctx.job_id}.zip"
        info = await ctx.storage.write(key, chunks())
        return Artifact(key=key, filename="x.zip", size_bytes=info.size_bytes)

    client: TestClient[Any, Any] = await make_client(
        **seaweed.settings(),
        s3_part_size_bytes=MIN_PART_SIZE_BYTES,
        handlers={"stall": stalling_upload},
        seed_ids=(),
    )
    storage: S3Storage = client.app[keys.STORAGE]  # type: ignore[assignment]
    job_id = (await client.app[keys.ENGINE].submit("stall", {})).job.id

    async def uploads() -> list[Any]:
        listed = await storage.client.list_multipart_uploads(Bucket=storage.bucket)
        return list(listed.get("Uploads", []))

    await wait_for(uploads, timeout_s=30)
    return client, job_id, uploads


async def test_canceling_a_job_mid_upload_leaves_no_parts(
    make_client: AppFactory, seaweed: SeaweedServer
) -> None:
    """Canceling a job while its artifact is half uploaded aborts the multipart upload."""
    client, job_id, uploads = await job_mid_upload(make_client, seaweed)

    response = await client.post(f"/v1/download/cancel/{job_id}")

    assert (200, "canceled") == (response.status, (await response.json())["status"])
    assert [] == await uploads()
    storage: S3Storage = client.app[keys.STORAGE]  # type: ignore[assignment]
    listed = await storage.client.list_objects_v2(Bucket=storage.bucket)
    assert [] == listed.get("Contents", [])


@contextlib.contextmanager
def hanging(seaweed: SeaweedServer) -> Iterator[None]:
    """SeaweedFS paused (SIGSTOP): the kernel still accepts connections, nothing answers,
    as an S3 that hangs."""
    assert seaweed.process is not None
    seaweed.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        seaweed.process.send_signal(signal.SIGCONT)


async def test_a_cancel_mid_upload_does_not_wait_out_a_hanging_s3(
    make_client: AppFactory, seaweed: SeaweedServer, caplog: pytest.LogCaptureFixture
) -> None:
    """S3 hangs while a job's upload is half done, and the job is canceled: the cancel
    answers within seconds, not once the upload's abort has used up the client's two
    read timeouts (2 x S3_READ_TIMEOUT_S, 60 s: the cancel got a 504 after 30 s). An
    abort not answered in time is logged, and the upload left for the orphan scan."""
    client, job_id, _uploads = await job_mid_upload(make_client, seaweed)

    with hanging(seaweed):
        asked = time.monotonic()
        response = await client.post(f"/v1/download/cancel/{job_id}")
        took_s = time.monotonic() - asked

    assert (200, "canceled") == (response.status, (await response.json())["status"])
    assert took_s < ABORT_TIMEOUT_S + 3
    assert any("could not abort multipart upload" in r.getMessage() for r in caplog.records)


async def test_redirect_keeps_a_non_ascii_filename_signed(
    make_client: AppFactory, seaweed: SeaweedServer
) -> None:
    """A custom job's artifact named "résumé 1.zip" downloads under that name via the 302."""

    async def report(ctx: JobContext) -> Artifact:
        key = f"bundles/{ctx.job_id}.zip"
        info = await ctx.storage.write_bytes(key, b"report bytes", "application/zip")
        return Artifact(key=key, filename="résumé 1.zip", size_bytes=info.size_bytes)

    client = await make_client(**seaweed.settings(), handlers={"report": report}, seed_ids=())
    inserted = await client.app[keys.ENGINE].submit("report", {})
    await finished(client, inserted.job.id)

    response = await client.get(f"/v1/download/{inserted.job.id}", allow_redirects=False)
    location = response.headers["Location"]
    status, headers, data = await fetch(location)

    assert (200, b"report bytes") == (status, data)
    assert content_disposition("résumé 1.zip") == headers["Content-Disposition"]
    # The URL arrives exactly as signed: botocore's percent-escapes are not normalised.
    assert "UTF-8%27%27r%25C3%25A9sum%25C3%25A9" in location
