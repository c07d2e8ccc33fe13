"""Signing secrets (URL signing, webhooks): written whole, never empty or short."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import wait_for
from service import ServiceProcess

from longdl import exceptions
from longdl.storage import load_or_create_secret

pytestmark = pytest.mark.slow


def serve_once(data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``longdl serve`` expected to refuse to start: its exit, within 30 s."""
    service = ServiceProcess(data_dir, env)
    return subprocess.run(
        [sys.executable, "-m", "longdl", "serve"],
        env=service.env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("content", ["", "\n", "abcd\n", "not hex at all, but long enough!!\n"])
def test_an_empty_or_short_signing_key_file_stops_the_start(tmp_path: Path, content: str) -> None:
    """A signing.key a crash left empty (or short, or not hex) is refused with what to
    do, instead of signing URLs anyone could forge."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "signing.key").write_text(content)

    run = serve_once(data_dir)

    assert 2 == run.returncode
    assert "signing.key cannot be used" in run.stderr
    assert "delete the file" in run.stderr
    assert "Traceback" not in run.stderr


def test_an_empty_webhook_secret_file_stops_the_start(tmp_path: Path) -> None:
    """The generated webhook secret gets the same check: an empty file is refused."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "webhook-secret").write_text("")

    run = serve_once(data_dir)

    assert 2 == run.returncode
    assert "webhook-secret cannot be used: it is empty" in run.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SIGNING_SECRET", "too-short-0123456789"),
        ("WEBHOOK_SECRET", "whsec_c2hvcnQ="),
        ("WEBHOOK_SECRET", "a plain one, too short"),
    ],
)
def test_short_secrets_in_the_environment_are_refused(
    tmp_path: Path, name: str, value: str
) -> None:
    """SIGNING_SECRET needs 32 characters and WEBHOOK_SECRET a 24-byte key; the message
    names the setting and never repeats its value."""
    run = serve_once(tmp_path / "data", **{name: value})

    assert 2 == run.returncode
    assert f"\n{name}: " in run.stderr
    assert value not in run.stderr


def test_concurrent_first_starts_all_get_the_one_full_key(tmp_path: Path) -> None:
    """Sixteen starts racing to create signing.key all use the same 32-byte key, the one
    in the file; none sees it empty or fails."""
    path = tmp_path / "data" / "signing.key"
    barrier = threading.Barrier(16)
    keys: list[bytes] = []
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            keys.append(load_or_create_secret(path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert [] == errors
    assert [bytes.fromhex(path.read_text())] * 16 == keys
    assert 32 == len(keys[0])
    assert ["signing.key"] == [p.name for p in path.parent.iterdir()]


def test_a_stale_empty_key_is_not_overwritten_silently(tmp_path: Path) -> None:
    """An existing file is never replaced: an empty one raises until someone deletes it."""
    path = tmp_path / "signing.key"
    path.write_text("")
    with pytest.raises(exceptions.InvalidSecret):
        load_or_create_secret(path)
    assert "" == path.read_text()


async def test_seed_and_serve_started_together_sign_with_the_key_on_disk(tmp_path: Path) -> None:
    """``longdl seed`` and ``longdl serve`` racing at first start (three times): both
    succeed, and serve's download URLs are signed with the key left in the file."""
    for attempt in range(3):
        key, signature, message = await _race_seed_and_serve(tmp_path / f"data{attempt}")
        assert 32 == len(key)
        assert hmac.new(key, message, hashlib.sha256).hexdigest() == signature


async def _race_seed_and_serve(data_dir: Path) -> tuple[bytes, str, bytes]:
    """Start seed and serve at once; returns the key file's key, and the signature and
    signed message of a download URL serve handed out."""
    service = ServiceProcess(data_dir, {"SHUTDOWN_GRACE_S": "0"})
    seed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "longdl",
        "seed",
        "70000",
        env=service.env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await service.start()
        _, seed_err = await seed.communicate()
        assert 0 == seed.returncode, seed_err
        status, job = await service.json(
            "POST", "/v1/download/initiate", json={"file_ids": [70000]}
        )
        assert 202 == status, job

        async def download_url() -> str | None:
            _, body = await service.json("GET", f"/v1/download/status/{job['jobId']}")
            return body["downloadUrl"]  # type: ignore[no-any-return]

        query = {k: v[0] for k, v in parse_qs(urlsplit(await wait_for(download_url)).query).items()}
        key = bytes.fromhex((data_dir / "signing.key").read_text())
    finally:
        service.close()
    message = f"downloads/70000.zip\n{query['expires']}\n{query['filename']}".encode()
    return key, query["sig"], message
