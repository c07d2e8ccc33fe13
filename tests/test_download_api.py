"""The core v1 routes through a real app: initiate, status, result, check, health."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from conftest import AppFactory, finished, initiate, test_settings, wait_for

from longdl.app import create_app
from longdl.models import Job, JobStatus
from longdl.seed import demo_content
from longdl.storage import LocalStorage, Storage
from longdl.testing import FlakyStorage
from longdl.web import keys


async def test_initiate_answers_202_with_the_contract(client: TestClient[Any, Any]) -> None:
    """Initiate returns 202, a queued job, Location, Retry-After and every link."""
    response = await client.post("/v1/download/initiate", json={"file_ids": [70000, 70007]})
    body = await response.json()
    assert 202 == response.status
    assert "queued" == body["status"]
    assert 2 == body["totalFileIds"]
    job_id = body["jobId"]
    uuid.UUID(job_id)
    assert f"/v1/download/status/{job_id}" == body["statusUrl"] == response.headers["Location"]
    assert f"/v1/download/{job_id}" == body["resultUrl"]
    assert f"/v1/download/{job_id}/events" == body["eventsUrl"]
    assert int(response.headers["Retry-After"]) >= 1
    assert body["nextPollInMs"] > 0
    assert body["expiresAt"].endswith("Z")
    assert response.headers["X-Request-ID"]


async def test_job_row_is_committed_before_the_202(client: TestClient[Any, Any]) -> None:
    """A fresh connection to the SQLite file sees the job as soon as the 202 arrives."""
    import sqlite3

    job_id = await initiate(client, [70000, 70007])
    path = client.app[keys.SETTINGS].database_path
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT id FROM jobs WHERE id = ?", (job_id,)).fetchall()
    assert [(job_id,)] == rows


async def test_status_walks_through_every_state_with_monotonic_progress(
    make_client: AppFactory,
) -> None:
    """A bundle job goes queued, running, processing_artifacts, completed (queued only
    when it waited: a job that finds a slot free starts in its own insert); percent
    never drops."""
    client = await make_client(
        download_delay_enabled=True, download_delay_min_ms=300, download_delay_max_ms=300
    )
    seen: list[tuple[JobStatus, float]] = []
    client.app[keys.ENGINE].hub.add_listener(
        lambda job: seen.append((job.status, job.progress.percent))
    )
    job_id = await initiate(client, list(range(70000, 70022, 7)))
    body = await finished(client, job_id)

    async def heard_completed() -> bool:
        # A poll answers "completed" from memory as soon as the handler returns; the
        # listeners hear it once the final write has landed, a loop turn or more later.
        return any(status is JobStatus.COMPLETED for status, _ in seen)

    await wait_for(heard_completed, 10)
    assert "completed" == body["status"]
    statuses = [status for status, _ in seen]
    order = [
        JobStatus.QUEUED,
        JobStatus.RUNNING,
        JobStatus.PROCESSING_ARTIFACTS,
        JobStatus.COMPLETED,
    ]
    assert list(dict.fromkeys(statuses)) in (order, order[1:])
    percents = [percent for _, percent in seen]
    assert percents == sorted(percents)
    assert 100.0 == percents[-1]
    assert len(set(percents)) > 4  # progress moved in steps, not in one jump


async def test_status_of_running_job_shows_live_progress(make_client: AppFactory) -> None:
    """While a job runs, polls show its progress message and a poll hint."""
    client = await make_client(
        download_delay_enabled=True, download_delay_min_ms=1500, download_delay_max_ms=1500
    )
    job_id = await initiate(client, [70000, 70007, 70014])

    async def running() -> dict[str, Any] | None:
        body: dict[str, Any] = await (await client.get(f"/v1/download/status/{job_id}")).json()
        return body if body["progress"]["percent"] > 0 else None

    body = await wait_for(running)
    assert "running" == body["status"]
    assert body["progress"]["message"].startswith("Resolving")
    assert 500 <= body["nextPollInMs"] <= 5000
    assert body["downloadUrl"] is None


async def test_bundle_holds_exactly_the_requested_files_byte_identical(
    client: TestClient[Any, Any],
) -> None:
    """Following the result's 302 downloads a ZIP of the available files, unchanged."""
    requested = [70014, 70000, 70007, 70000]
    job_id = await initiate(client, requested)
    body = await finished(client, job_id)
    assert "completed" == body["status"]

    response = await client.get(f"/v1/download/{job_id}", allow_redirects=False)
    assert 302 == response.status
    download = await client.get(response.headers["Location"])
    assert 200 == download.status
    data = await download.read()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert ["70014.zip", "70000.zip", "70007.zip"] == archive.namelist()
        for file_id in (70014, 70000, 70007):
            assert demo_content(file_id) == archive.read(f"{file_id}.zip")
    import hashlib

    assert hashlib.sha256(data).hexdigest() == body["result"]["sha256"]
    assert len(data) == body["result"]["size"]
    assert [70014, 70000, 70007] == body["result"]["files"]
    assert [] == body["result"]["missing"]


async def test_single_file_is_passed_through_without_a_copy(client: TestClient[Any, Any]) -> None:
    """One available file: the download is the source object itself, nothing new in bundles/."""
    job_id = await initiate(client, [70007])
    body = await finished(client, job_id)
    assert "70007.zip" == body["result"]["filename"]
    download = await client.get(body["downloadUrl"])
    assert demo_content(70007) == await download.read()
    assert "70007.zip" in download.headers["Content-Disposition"]
    bundles = client.app[keys.SETTINGS].storage_dir / "bundles"
    assert not bundles.exists() or [] == list(bundles.iterdir())


async def test_missing_files_are_listed_and_the_rest_bundled(client: TestClient[Any, Any]) -> None:
    """Some files missing: the job completes and result.missing names them."""
    job_id = await initiate(client, [70000, 99999, 70007])
    body = await finished(client, job_id)
    assert "completed" == body["status"]
    assert [70000, 70007] == body["result"]["files"]
    assert [99999] == body["result"]["missing"]


async def test_all_files_missing_fails_with_file_not_found(client: TestClient[Any, Any]) -> None:
    """No requested file exists: FILE_NOT_FOUND, not retried, and the result route says 409."""
    job_id = await initiate(client, [99991, 99992])
    body = await finished(client, job_id)
    assert "failed" == body["status"]
    assert {"code": "FILE_NOT_FOUND", "retryable": False} == {
        k: body["error"][k] for k in ("code", "retryable")
    }
    assert 1 == body["attempts"]
    response = await client.get(f"/v1/download/{job_id}")
    problem = await response.json()
    assert 409 == response.status
    assert "application/problem+json" == response.content_type
    assert "FILE_NOT_FOUND" == problem["code"]


async def test_strict_fails_when_any_file_is_missing(client: TestClient[Any, Any]) -> None:
    """With strict: true one missing file fails the whole job."""
    job_id = await initiate(client, [70000, 99999], strict=True)
    body = await finished(client, job_id)
    assert "failed" == body["status"]
    assert "FILE_NOT_FOUND" == body["error"]["code"]
    assert "99999" in body["error"]["message"]


async def test_result_of_unfinished_job_is_202_with_retry_after(make_client: AppFactory) -> None:
    """Polling the result URL of a running job answers 202 and the job resource."""
    client = await make_client(
        download_delay_enabled=True, download_delay_min_ms=2000, download_delay_max_ms=2000
    )
    job_id = await initiate(client, [70000])
    response = await client.get(f"/v1/download/{job_id}")
    assert 202 == response.status
    assert response.headers["Retry-After"]
    assert job_id == (await response.json())["jobId"]


async def test_result_without_redirect_returns_the_signed_url(client: TestClient[Any, Any]) -> None:
    """?redirect=false answers 200 with url, expiresAt, filename and size."""
    job_id = await initiate(client, [70000, 70007])
    await finished(client, job_id)
    response = await client.get(f"/v1/download/{job_id}?redirect=false")
    body = await response.json()
    assert 200 == response.status
    assert body["filename"].endswith(".zip")
    assert body["expiresAt"].endswith("Z")
    assert 200 == (await client.get(body["url"])).status


@pytest.mark.parametrize("path", ["/v1/download/status/{id}", "/v1/download/{id}"])
async def test_unknown_job_is_404_problem(client: TestClient[Any, Any], path: str) -> None:
    """An unknown (or malformed) job id is a 404 problem on every job route."""
    for job_id in (str(uuid.uuid4()), "not-a-uuid"):
        response = await client.get(path.format(id=job_id))
        assert 404 == response.status
        assert "application/problem+json" == response.content_type
        assert response.headers["X-Request-ID"] == (await response.json())["requestId"]


async def test_check_reports_availability_and_size(client: TestClient[Any, Any]) -> None:
    """check says whether the source object exists, its key and size."""
    present = await (await client.post("/v1/download/check", json={"file_id": 70000})).json()
    absent = await (await client.post("/v1/download/check", json={"file_id": 99999})).json()
    assert {
        "file_id": 70000,
        "available": True,
        "s3Key": "downloads/70000.zip",
        "size": len(demo_content(70000)),
    } == present
    assert {"file_id": 99999, "available": False, "s3Key": None, "size": None} == absent


@pytest.mark.parametrize(
    ("method", "path", "headers", "body"),
    [
        ("POST", "/v1/download/initiate", {}, {"file_ids": "70000"}),
        ("POST", "/v1/download/initiate", {"Idempotency-Key": "k" * 201}, {"file_ids": [7]}),
        ("GET", f"/v1/download/status/{uuid.uuid4()}?wait=soon", {}, None),
        ("GET", "/v1/download/history?userId=u&cursor=page-2", {}, None),
        ("GET", f"/v1/download/{uuid.uuid4()}/events", {"Last-Event-ID": "x"}, None),
    ],
)
async def test_every_invalid_request_is_the_same_kind_of_problem(
    client: TestClient[Any, Any],
    method: str,
    path: str,
    headers: dict[str, str],
    body: dict[str, Any] | None,
) -> None:
    """A body, header or query parameter that breaks the API's rules is one kind of
    problem, whichever rule: 400, title "Invalid request", code VALIDATION_ERROR."""
    response = await client.request(method, path, headers=headers, json=body)

    problem = await response.json()
    assert (400, "Invalid request", "VALIDATION_ERROR") == (
        response.status,
        problem["title"],
        problem["code"],
    ), problem


async def test_health_and_root(client: TestClient[Any, Any]) -> None:
    """/health reports both checks ok; / names the service and its links."""
    health = await client.get("/health")
    assert 200 == health.status
    assert {
        "status": "healthy",
        "checks": {"storage": "ok", "database": "ok"},
    } == await health.json()
    root = await (await client.get("/")).json()
    assert "longdl" == root["name"]
    assert "/docs" == root["links"]["docs"]


class GatedStorage(FlakyStorage):
    """A real local storage whose health check waits for the test to open the gate."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner, failures=0, methods=())
        self.gate = asyncio.Event()

    async def check(self) -> None:
        self._maybe_fail("check")  # counts the call
        await self.gate.wait()
        await self.inner.check()


async def test_health_requests_arriving_together_share_one_round_of_checks(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """Twenty /health requests arriving while a check runs wait for that check and get
    its answer: one storage check, not twenty. A request after they are answered gets
    a check of its own."""
    storage = GatedStorage(LocalStorage(tmp_path / "storage", b"k" * 32))
    app = create_app(test_settings(tmp_path / "data"), storage=storage)
    arrived = [0]

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        arrived[0] += request.path == "/health"
        return await handler(request)  # type: ignore[no-any-return]

    app.middlewares.append(count)
    client = await aiohttp_client(app)
    requests = [asyncio.ensure_future(client.get("/health")) for _ in range(20)]

    async def all_waiting() -> bool:
        return arrived[0] == 20

    await wait_for(all_waiting)
    storage.gate.set()
    responses = await asyncio.gather(*requests)

    assert [200] * 20 == [response.status for response in responses]
    assert 1 == storage.calls["check"]
    assert "healthy" == (await (await client.get("/health")).json())["status"]
    assert 2 == storage.calls["check"]


async def test_health_is_503_when_storage_is_gone(client: TestClient[Any, Any]) -> None:
    """Removing the storage folder makes /health unhealthy with storage: error."""
    import shutil

    shutil.rmtree(client.app[keys.SETTINGS].storage_dir)
    response = await client.get("/health")
    assert 503 == response.status
    assert {"storage": "error", "database": "ok"} == (await response.json())["checks"]


async def test_request_id_is_echoed(client: TestClient[Any, Any]) -> None:
    """A sane incoming X-Request-ID comes back; an unsafe one is replaced."""
    echoed = await client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert "abc-123" == echoed.headers["X-Request-ID"]
    replaced = await client.get("/health", headers={"X-Request-ID": "bad id\twith spaces"})
    uuid.UUID(replaced.headers["X-Request-ID"])


_ = Job  # re-exported for type hints in listeners


async def test_signing_key_is_private_and_survives_a_restart(
    make_client: AppFactory, tmp_path: Any
) -> None:
    """The generated URL-signing key is mode 0600 and reused, so a link handed out before
    a restart still downloads after it."""
    import stat

    data_dir = tmp_path / "keep"
    first = await make_client(data_dir=data_dir)
    job_id = await initiate(first, [70000, 70007])
    url = (await finished(first, job_id))["downloadUrl"]
    key_file = data_dir / "signing.key"
    assert 0o600 == stat.S_IMODE(key_file.stat().st_mode)
    await first.close()

    second = await make_client(data_dir=data_dir)
    response = await second.get(url)
    assert 200 == response.status
    assert zipfile.is_zipfile(io.BytesIO(await response.read()))


async def test_progress_with_the_demo_delay_moves_with_the_clock(make_client: AppFactory) -> None:
    """With DOWNLOAD_DELAY on, percent grows with elapsed time over the whole job (no crawl
    to 20 % then a jump to 100 %), so a time-left estimate made from it holds."""
    client = await make_client(
        download_delay_enabled=True, download_delay_min_ms=1600, download_delay_max_ms=1600
    )
    samples: list[tuple[float, float, str]] = []
    client.app[keys.ENGINE].hub.add_listener(
        lambda job: samples.append((time.monotonic(), job.progress.percent, job.status.value))
    )
    job_id = await initiate(client, [70000, 70007])
    assert "completed" == (await finished(client, job_id))["status"]

    started = next(t for t, _, status in samples if status == "running")
    ended = next(t for t, _, status in samples if status == "completed")
    for fraction in (0.25, 0.5, 0.75):
        at = started + fraction * (ended - started)
        percent = max(p for t, p, _ in samples if t <= at)
        assert abs(100 * fraction - percent) < 20, (fraction, percent)
