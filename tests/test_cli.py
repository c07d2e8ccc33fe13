"""``longdl get`` and ``longdl jobs`` as real subprocesses, against real servers."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from service import ServiceProcess, free_port
from test_client import BIG_ID, Served, big_content, bundle_members, start_served

from longdl import cli_client
from longdl import client as api
from longdl import storage as storage_backends
from longdl.config import Settings
from longdl.handlers.download import source_key
from longdl.models import JobOut
from longdl.seed import demo_content

pytestmark = pytest.mark.slow

UNKNOWN_JOB = "00000000-0000-4000-8000-000000000000"


async def _write_big_source(data_dir: Path) -> None:
    backend = storage_backends.from_settings(Settings(data_dir=data_dir))
    await backend.open()
    try:
        await backend.write_bytes(source_key(BIG_ID), big_content())
    finally:
        await backend.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One real ``longdl serve`` for the module, seeded with the demo files and a big one."""
    data_dir = tmp_path_factory.mktemp("cli") / "data"
    proc = ServiceProcess(data_dir, {"SHUTDOWN_GRACE_S": "0"})
    proc.run_cli("seed", "70000", "70007", "70014", "70021")
    asyncio.run(_write_big_source(data_dir))
    asyncio.run(proc.start())
    yield proc
    proc.close()


def longdl(
    service: ServiceProcess | None, *args: str, cwd: Path
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m longdl ARGS`` against ``service`` (via LONGDL_URL) and wait."""
    env = {**os.environ, "LONGDL_URL": service.url if service else "http://127.0.0.1:1"}
    return subprocess.run(
        [sys.executable, "-m", "longdl", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def longdl_async(url: str, *args: str, cwd: Path) -> tuple[int, str, str]:
    """Run the CLI without blocking the loop (for servers living in the test's loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "longdl",
        *args,
        cwd=cwd,
        env={**os.environ, "LONGDL_URL": url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# --- get -------------------------------------------------------------------------------


def test_get_writes_the_bundle_byte_identical(service: ServiceProcess, tmp_path: Path) -> None:
    """``longdl get`` against a real server writes a ZIP of exactly the source files."""
    result = longdl(service, "get", "70000", "70007", "-o", "bundle.zip", cwd=tmp_path)

    assert 0 == result.returncode, result.stderr
    assert "bundle.zip" == result.stdout.strip()
    data = (tmp_path / "bundle.zip").read_bytes()
    assert {f"{i}.zip": demo_content(i) for i in (70000, 70007)} == bundle_members(data)
    assert [tmp_path / "bundle.zip"] == list(tmp_path.iterdir())
    # Not a terminal: progress comes as plain lines, ending with the whole transfer.
    last = result.stderr.strip().splitlines()[-1]
    assert "\r" not in result.stderr
    assert last.startswith("download") and "100.0%" in last


def test_get_resumes_after_ctrl_c(service: ServiceProcess, tmp_path: Path) -> None:
    """Ctrl-C mid-transfer exits 130 keeping the .part; the same command then finishes it."""
    target = tmp_path / "big.zip"
    part = api.part_path(target)
    env = {**os.environ, "LONGDL_URL": service.url}
    command = [sys.executable, "-m", "longdl", "get", str(BIG_ID), "-o", "big.zip"]
    # Run as under `nohup make test &`, where SIGINT is ignored and children inherit that:
    # the child must get the default handler back, as a terminal's Ctrl-C would find it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(
            [*command, "--limit-rate", "1M"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        deadline = time.monotonic() + 30
        while not (part.exists() and part.stat().st_size > 0):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no .part appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()

    assert 130 == proc.returncode, stderr
    assert "interrupted; run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    kept_bytes = part.stat().st_size
    assert 0 < kept_bytes < len(big_content())
    assert not target.exists()

    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert 0 == rerun.returncode, rerun.stderr
    assert big_content() == target.read_bytes()
    assert "resuming job" in rerun.stderr
    assert "resuming download at" in rerun.stderr
    assert not part.exists()


async def test_get_completes_a_partial_file_with_a_range_request(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """A .part left by an earlier run is finished with a Range request the server answers 206."""
    served: Served = await start_served(aiohttp_server, tmp_path / "data")
    work = tmp_path / "work"
    work.mkdir()
    api.part_path(work / "big.zip").write_bytes(big_content()[:3_000_000])

    code, _, err = await longdl_async(served.url, "get", str(BIG_ID), "-o", "big.zip", cwd=work)

    assert 0 == code, err
    assert big_content() == (work / "big.zip").read_bytes()
    assert [(206, "bytes=3000000-")] == served.file_answers()


def test_running_get_again_reuses_the_same_job(service: ServiceProcess, tmp_path: Path) -> None:
    """The same command in the same place finds its job again; another output makes a new one."""
    first = longdl(service, "get", "70014", "70021", "-o", "a.zip", "--no-wait", cwd=tmp_path)
    again = longdl(service, "get", "70014", "70021", "-o", "a.zip", "--no-wait", cwd=tmp_path)
    other = longdl(service, "get", "70014", "70021", "-o", "b.zip", "--no-wait", cwd=tmp_path)

    assert [0, 0, 0] == [first.returncode, again.returncode, other.returncode]
    uuid.UUID(first.stdout.strip())
    assert first.stdout == again.stdout
    assert first.stdout != other.stdout


def test_invalid_id_exits_2_with_the_servers_message(
    service: ServiceProcess, tmp_path: Path
) -> None:
    """An out-of-range id is refused by the server; its field message is shown, exit 2."""
    result = longdl(service, "get", "5", cwd=tmp_path)
    assert 2 == result.returncode
    assert (
        "longdl: The request is invalid: file_ids.0: Input should be greater than or equal "
        "to 10000\n" == result.stderr
    )


def test_failed_job_exits_1_with_its_reason(service: ServiceProcess, tmp_path: Path) -> None:
    """A job whose files do not exist fails: exit 1 with the job's code and message."""
    result = longdl(service, "get", "12345", "-q", cwd=tmp_path)
    assert 1 == result.returncode
    expected = "longdl: job failed: FILE_NOT_FOUND: None of the requested files exist: 12345\n"
    assert expected == result.stderr
    assert [] == list(tmp_path.iterdir())


def test_unreachable_server_exits_4(tmp_path: Path) -> None:
    """Nothing listening at --server: a one-line error and exit 4."""
    url = f"http://127.0.0.1:{free_port()}"
    result = longdl(None, "get", "70000", "--server", url, "--retries", "1", cwd=tmp_path)
    assert 4 == result.returncode
    assert result.stderr.startswith(f"longdl: cannot reach {url}")
    assert 1 == len(result.stderr.splitlines())


@pytest.mark.parametrize(
    "args",
    [("get",), ("get", "seventy"), ("get", "70000", "--server", "localhost:3000"), ("jobs",)],
)
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    """Missing or malformed arguments exit 2 before anything is sent."""
    result = longdl(None, *args, cwd=tmp_path)
    assert 2 == result.returncode
    assert "Traceback" not in result.stderr


async def test_api_key_is_sent_and_a_missing_one_is_explained(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """With API_KEYS set, --api-key gets the file; without it the server's reason shows."""
    served = await start_served(aiohttp_server, tmp_path / "data", api_keys=["alice:s3cret"])

    refused = await longdl_async(served.url, "get", "70000", "-o", "a.zip", cwd=tmp_path)
    allowed = await longdl_async(
        served.url, "get", "70000", "-o", "a.zip", "--api-key", "s3cret", cwd=tmp_path
    )

    assert 1 == refused[0]
    assert (
        "longdl: server refused (HTTP 401): Send your API key as Authorization: Bearer <key>\n"
        == refused[2]
    )
    assert 0 == allowed[0], allowed[2]
    assert demo_content(70000) == (tmp_path / "a.zip").read_bytes()


# --- jobs ------------------------------------------------------------------------------


def test_jobs_ls_lists_a_users_jobs_newest_first(service: ServiceProcess, tmp_path: Path) -> None:
    """jobs ls shows the user's jobs newest first, as a table or JSON, filtered by status."""
    user = f"u-{uuid.uuid4().hex[:8]}"
    ids = [
        longdl(service, "get", i, "--user", user, "--no-wait", cwd=tmp_path).stdout.strip()
        for i in ("70000", "70007")
    ]

    table = longdl(service, "jobs", "ls", "--user", user, cwd=tmp_path)
    listed = longdl(service, "jobs", "ls", "--user", user, "--json", cwd=tmp_path)
    failed = longdl(service, "jobs", "ls", "--user", user, "--status", "failed", cwd=tmp_path)

    assert [0, 0, 0] == [table.returncode, listed.returncode, failed.returncode]
    rows = table.stdout.strip().splitlines()
    assert "JOB ID" == rows[0][:6]
    assert ids[::-1] == [row.split()[0] for row in rows[1:]]
    assert ids[::-1] == [item["jobId"] for item in json.loads(listed.stdout)["items"]]
    assert "no jobs\n" == failed.stdout


def test_jobs_show_prints_the_job(service: ServiceProcess, tmp_path: Path) -> None:
    """jobs show prints the job resource (JSON with --json)."""
    job_id = longdl(service, "get", "70000", "--no-wait", cwd=tmp_path).stdout.strip()
    shown = longdl(service, "jobs", "show", job_id, "--json", cwd=tmp_path)
    assert 0 == shown.returncode, shown.stderr
    assert job_id == JobOut.model_validate_json(shown.stdout).jobId


def test_jobs_show_takes_the_short_id_get_prints(service: ServiceProcess, tmp_path: Path) -> None:
    """The 8 characters the progress line shows (``job 257d5e1c``) are enough for jobs show."""
    job_id = longdl(service, "get", "70007", "--no-wait", cwd=tmp_path).stdout.strip()
    shown = longdl(service, "jobs", "show", job_id[:8], "--json", cwd=tmp_path)
    assert 0 == shown.returncode, shown.stderr
    assert job_id == JobOut.model_validate_json(shown.stdout).jobId


def test_a_prefix_of_several_jobs_is_a_usage_error(service: ServiceProcess, tmp_path: Path) -> None:
    """A prefix two jobs share exits 2 naming them, rather than picking one."""

    async def initiate_17() -> list[str]:  # 17 ids over 16 first hex digits: two share one
        answers = [
            await service.json("POST", "/v1/download/initiate", json={"file_ids": [70000]})
            for _ in range(17)
        ]
        return [str(body["jobId"]) for _, body in answers]

    ids = asyncio.run(initiate_17())
    shared = next(c for c in "0123456789abcdef" if sum(i.startswith(c) for i in ids) > 1)

    result = longdl(service, "jobs", "show", shared, cwd=tmp_path)

    assert 2 == result.returncode
    assert f"{shared} starts several jobs" in result.stderr


def test_jobs_cancel_takes_a_prefix(service: ServiceProcess, tmp_path: Path) -> None:
    """jobs cancel resolves a prefix too: here to a finished job, which it cannot cancel."""
    job_id = longdl(service, "get", "70014", "-o", "c.zip", "--no-wait", cwd=tmp_path).stdout
    longdl(service, "get", "70014", "-o", "c.zip", cwd=tmp_path)  # the same job, finished
    result = longdl(service, "jobs", "cancel", job_id.strip()[:8], cwd=tmp_path)
    assert 1 == result.returncode
    assert "The job is already completed" in result.stderr


def test_a_prefix_of_no_job_exits_3(service: ServiceProcess, tmp_path: Path) -> None:
    """A prefix no job of the caller starts with is "no such job" (exit 3)."""
    result = longdl(service, "jobs", "show", "zzzzzzzz", cwd=tmp_path)
    assert 3 == result.returncode
    assert "No job of yours starts with zzzzzzzz" in result.stderr


@pytest.mark.parametrize("action", ["show", "cancel"])
def test_unknown_job_exits_3(service: ServiceProcess, tmp_path: Path, action: str) -> None:
    """jobs show/cancel of a job that does not exist exit 3 with the server's message."""
    result = longdl(service, "jobs", action, UNKNOWN_JOB, cwd=tmp_path)
    assert 3 == result.returncode
    assert "longdl: No such job\n" == result.stderr


async def test_jobs_cancel_cancels_a_running_job(aiohttp_server: Any, tmp_path: Path) -> None:
    """jobs cancel stops a running job; canceling it again is refused with exit 1."""
    served = await start_served(
        aiohttp_server,
        tmp_path / "data",
        download_delay_enabled=True,
        download_delay_min_ms=10_000,
        download_delay_max_ms=10_000,
    )
    async with api.LongdlClient(served.url) as client:
        job = await client.initiate([70000])

    first = await longdl_async(served.url, "jobs", "cancel", job.jobId, "--json", cwd=tmp_path)
    second = await longdl_async(served.url, "jobs", "cancel", job.jobId, cwd=tmp_path)

    assert 0 == first[0], first[2]
    assert "canceled" == JobOut.model_validate_json(first[1]).status
    assert 1 == second[0]
    assert "longdl: server refused (HTTP 409): The job is already canceled\n" == second[2]


# --- progress display ------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_redraws_one_line_on_a_terminal() -> None:
    """On a terminal the transfer is redrawn in place with \\r and ends with a newline."""
    stream = io.StringIO()
    clock = FakeClock()
    display = cli_client.ProgressDisplay(stream, tty=True, clock=clock)
    for done in (0, 512, 1024):
        clock.now += 1
        display.transfer(api.Transfer(done, 1024))
    display.close()

    text = stream.getvalue()
    assert 3 == text.count("\r")
    assert text.endswith("100.0% 1.0 KiB/1.0 KiB 512 B/s ETA 0s\n")


def test_progress_prints_periodic_lines_otherwise() -> None:
    """Off a terminal, lines come on a status change, every interval and at the end only."""
    stream = io.StringIO()
    clock = FakeClock()
    display = cli_client.ProgressDisplay(stream, tty=False, interval_s=2.0, clock=clock)
    for step in range(11):  # 0.5 s apart: 5 s of transfer
        clock.now = step * 0.5
        display.transfer(api.Transfer(step * 100, 1000))
    display.close()

    lines = stream.getvalue().splitlines()
    assert ["0.0%", "40.0%", "80.0%", "100.0%"] == [line.split()[2] for line in lines]


def test_serve_says_so_when_data_dir_is_not_writable(tmp_path: Path) -> None:
    """A DATA_DIR that cannot be written is one line naming it and the uid, no traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = subprocess.run(
        [sys.executable, "-m", "longdl", "serve"],
        env={**os.environ, "DATA_DIR": str(blocker / "data"), "PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert 2 == result.returncode
    assert f"DATA_DIR {blocker / 'data'} is not writable" in result.stderr
    assert f"uid {os.getuid()}" in result.stderr
    assert "Traceback" not in result.stderr
