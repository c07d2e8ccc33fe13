"""``make container-test``: build the Dockerfile with podman, run it, and check it as a
user would, following the README's container walk-through.

Checks, in order: the image builds; its size (printed) and that it is lean (one copy of
the source, no build leftovers); the walk-through (seed, run, first job: initiate, poll,
302, a valid ZIP); /health; a non-root user; ``podman healthcheck run`` healthy, and
unhealthy while the server is stopped (SIGSTOP); ``podman stop`` with a running job exits
0 inside podman's 10 s; a new container on the same named volume still has the jobs and
finishes the one the stop re-queued; a bind-mounted DATA_DIR the image's user cannot write
is a one-line error, and works once chowned to that uid.

No registry is reachable here, so the ``FROM`` image is a Debian base made with
mmdebstrap and imported under its name (../shared/INFRA.md). Podman keeps its storage
and config in ``$LONGDL_PODMAN_DIR`` (default /var/tmp/longdl-podman), where the base is
kept between runs; every container, volume and the test image are removed at the end.

    python tests/container_check.py     (as root; .ci/run installs podman and mmdebstrap)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "docker.io/library/python:3.11-slim"
IMAGE = "localhost/longdl:container-test"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
#: The image's user; README tells bind-mount users to give it their data folder.
IMAGE_UID = 10001
#: What docker/podman stop waits before SIGKILL.
STOP_TIMEOUT_S = 10
RUN_ID = uuid.uuid4().hex[:8]


def step(text: str) -> None:
    print(f"container-test: {text}", flush=True)


class Podman:
    """The podman CLI on its own storage and config (the three VM settings of INFRA.md)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        hard_nofile = subprocess.run(
            ["sh", "-c", "ulimit -Hn"], capture_output=True, text=True, check=True
        ).stdout.strip()
        (work / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{work}/storage"\n'
            f'runroot = "{work}/runroot"\n'
        )
        # Default rlimits exceed this VM's hard limits; crun refuses its hybrid cgroups.
        (work / "containers.conf").write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={hard_nofile}:{hard_nofile}", "nproc=32768:32768"]\n'
            "[engine]\n"
            'runtime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
        )
        self.env = {
            **os.environ,
            "CONTAINERS_STORAGE_CONF": str(work / "storage.conf"),
            "CONTAINERS_CONF": str(work / "containers.conf"),
        }
        self.containers: list[str] = []
        self.volumes: list[str] = []

    def __call__(
        self, *args: str, check: bool = True, timeout_s: float = 600
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )
        return result

    def name(self, kind: str) -> str:
        return f"longdl-ct-{RUN_ID}-{kind}"

    def cleanup(self) -> None:
        for container in self.containers:
            self("rm", "-f", "-t", "0", container, check=False)
        for volume in self.volumes:
            self("volume", "rm", "-f", volume, check=False)
        self("rmi", "-f", IMAGE, check=False)
        # This storage is ours alone: drop the layers no tag points to any more.
        self("image", "prune", "-f", check=False)


def debian_mirrors() -> tuple[str, str]:
    """The main and security mirrors this machine's apt uses (URIs: of debian.sources)."""
    uris = re.findall(r"^URIs:\s*(\S+)", SOURCES.read_text(), flags=re.MULTILINE)
    main = next(u for u in uris if "security" not in u)
    security = next((u for u in uris if "security" in u), main.rstrip("/") + "-security")
    return main, security


def ensure_base(podman: Podman) -> None:
    """Import a Debian bookworm base (python3 3.11) as python:3.11-slim, unless present."""
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        step(f"base image {BASE_IMAGE} already imported")
        return
    main, security = debian_mirrors()
    tar = podman.work / "base.tar"
    started = time.monotonic()
    subprocess.run(
        [
            "mmdebstrap",
            "--mode=root",
            "--variant=minbase",
            "--format=tar",
            "--include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates,passwd",
            '--customize-hook=rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
            "bookworm",
            str(tar),
            f"deb {main} bookworm main",
            f"deb {main} bookworm-updates main",
            f"deb {security} bookworm-security main",
        ],
        check=True,
        capture_output=True,
        timeout=900,
    )
    podman(
        "import",
        "--change",
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--change",
        "ENV LANG=C.UTF-8",
        "--change",
        'CMD ["python3"]',
        str(tar),
        BASE_IMAGE,
    )
    tar.unlink()
    step(f"base image {BASE_IMAGE} made with mmdebstrap in {time.monotonic() - started:.0f} s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(probe: Callable[[], T | None], what: str, timeout_s: float = 60.0) -> T:
    """Poll ``probe`` until it returns something truthy, failing after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.2)  # the polling interval of a deadline loop


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


OPENER = urllib.request.build_opener(NoRedirect)


def http(method: str, url: str, body: object | None = None) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with OPENER.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


class Service:
    """One container of the image, published on a loopback port."""

    def __init__(self, podman: Podman, name: str, volume: str, *env: str) -> None:
        self.podman = podman
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        podman.containers.append(name)
        options = [f"--env={item}" for item in env]
        podman(
            "run", "-d", "--name", name, "-p", f"127.0.0.1:{self.port}:3000",
            "-v", f"{volume}:/data", *options, IMAGE,
        )  # fmt: skip
        wait_for(self.healthy, f"{name} /health")

    def healthy(self) -> bool:
        try:
            return http("GET", self.url + "/health")[0] == 200
        except OSError:
            return False

    def initiate(self, file_ids: list[int]) -> str:
        status, _, body = http("POST", self.url + "/v1/download/initiate", {"file_ids": file_ids})
        assert status == 202, (status, body)
        return str(json.loads(body)["jobId"])

    def job(self, job_id: str) -> dict[str, Any]:
        status, _, body = http("GET", f"{self.url}/v1/download/status/{job_id}")
        assert status == 200, (status, body)
        return dict(json.loads(body))

    def wait_status(self, job_id: str, statuses: set[str], timeout_s: float = 60) -> None:
        wait_for(
            lambda: self.job(job_id)["status"] in statuses,
            f"job {job_id} reaching {statuses}",
            timeout_s,
        )

    def download(self, job_id: str) -> bytes:
        status, headers, _ = http("GET", f"{self.url}/v1/download/{job_id}")
        assert status == 302, status
        location = headers["Location"]
        url = location if location.startswith("http") else self.url + location
        status, _, data = http("GET", url)
        assert status == 200, status
        return data

    def logs(self) -> str:
        result = self.podman("logs", self.name, check=False)
        return result.stdout + result.stderr


def check_bundle(data: bytes, file_ids: list[int]) -> None:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        assert sorted(archive.namelist()) == sorted(f"{i}.zip" for i in file_ids)


def run_checks(podman: Podman) -> None:
    started = time.monotonic()
    ensure_base(podman)
    podman(
        "build", "--format", "docker", "--pull=never",
        "-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro", "-t", IMAGE, str(ROOT),
        timeout_s=900,
    )  # fmt: skip
    step(f"built {IMAGE} in {time.monotonic() - started:.0f} s")

    size_bytes = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    step(f"image size: {size_bytes / 1e6:.0f} MB")
    inventory = podman(
        "run", "--rm", "--user", "0", "--entrypoint", "sh", IMAGE, "-c",
        "find / -xdev \\( -name engine.py -path '*longdl*' \\) -o "
        "\\( -name 'longdl*.egg-info' \\) -o \\( -type d -name build -path '*longdl*' \\) "
        "-o \\( -type d \\( -path /app -o -path /src -o -path /wheels \\) \\)",
    ).stdout.split()  # fmt: skip
    engines = [path for path in inventory if path.endswith("engine.py")]
    assert len(engines) == 1 and "site-packages" in engines[0], inventory
    assert [] == [path for path in inventory if not path.endswith("engine.py")], inventory
    step("lean: one copy of the source (site-packages), no build/, no *.egg-info")

    # The README's walk-through, as written: a volume, the demo files, the service.
    volume = podman.name("data")
    podman.volumes.append(volume)
    podman("volume", "create", volume)
    seeded = podman("run", "--rm", "-v", f"{volume}:/data", IMAGE, "longdl", "seed")
    assert "seeded" in seeded.stdout, seeded.stdout
    first = Service(podman, podman.name("first"), volume)
    step("/health is 200")
    assert str(IMAGE_UID) == podman("exec", first.name, "id", "-u").stdout.strip()
    user = podman("inspect", "--format", "{{.Config.User}}", first.name).stdout.strip()
    assert user.split(":")[0] == str(IMAGE_UID), user
    step(f"runs as uid {IMAGE_UID}, not root")

    finished = first.initiate([70000, 70007])
    first.wait_status(finished, {"completed"})
    check_bundle(first.download(finished), [70000, 70007])
    assert http("GET", first.url + "/docs")[0] == 200
    step("first job: initiate, poll, 302, a valid ZIP")

    assert 0 == podman("healthcheck", "run", first.name, check=False).returncode
    pid = podman("inspect", "--format", "{{.State.Pid}}", first.name).stdout.strip()
    os.kill(int(pid), 19)  # SIGSTOP: the server is there but does not answer
    try:
        stopped = podman("healthcheck", "run", first.name, check=False)
    finally:
        os.kill(int(pid), 18)  # SIGCONT
    assert stopped.returncode != 0 and "unhealthy" in stopped.stdout + stopped.stderr, stopped
    step("podman healthcheck run: healthy, then unhealthy with the server stopped")
    assert 0 == podman("stop", first.name).returncode
    podman("rm", first.name)

    # podman stop with a job running: exit 0 inside the 10 s, the job re-queued.
    slow = Service(
        podman, podman.name("slow"), volume,
        "DOWNLOAD_DELAY_ENABLED=true", "DOWNLOAD_DELAY_MIN_MS=60000",
        "DOWNLOAD_DELAY_MAX_MS=60000",
    )  # fmt: skip
    requeued = slow.initiate([70014, 70021])
    slow.wait_status(requeued, {"running"})
    stop_started = time.monotonic()
    podman("stop", "-t", str(STOP_TIMEOUT_S), slow.name, timeout_s=60)
    stop_s = time.monotonic() - stop_started
    exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", slow.name).stdout.strip()
    assert exit_code == "0", (exit_code, slow.logs()[-3000:])
    assert stop_s < STOP_TIMEOUT_S, stop_s
    assert f"job.requeued job_id={requeued}" in slow.logs()
    step(f"podman stop with a running job: exit 0 in {stop_s:.1f} s, job re-queued")
    podman("rm", slow.name)

    # A new container on the same volume: the old job is there, the re-queued one finishes.
    again = Service(podman, podman.name("again"), volume)
    assert "completed" == again.job(finished)["status"]
    check_bundle(again.download(finished), [70000, 70007])
    again.wait_status(requeued, {"completed"})
    check_bundle(again.download(requeued), [70014, 70021])
    step("a new container on the same volume keeps the jobs and finishes the re-queued one")
    podman("stop", again.name)

    # A bind mount the image's user cannot write: a clear error, then the documented fix.
    with tempfile.TemporaryDirectory(prefix="longdl-bind-") as bind:
        os.chmod(bind, 0o755)  # owned by root, as a folder made on the host usually is
        refused = podman("run", "--rm", "-v", f"{bind}:/data", IMAGE, check=False, timeout_s=60)
        output = refused.stdout + refused.stderr
        assert refused.returncode == 2, (refused.returncode, output)
        assert "DATA_DIR /data is not writable" in output and "Traceback" not in output, output
        os.chown(bind, IMAGE_UID, IMAGE_UID)
        podman("run", "--rm", "-v", f"{bind}:/data", IMAGE, "longdl", "seed", "70000")
        assert (Path(bind) / "storage" / "downloads" / "70000.zip").exists()
    step(f"bind mount: a clear error when not writable, fine once owned by uid {IMAGE_UID}")
    step(f"all checks passed in {time.monotonic() - started:.0f} s")


@contextlib.contextmanager
def podman_session() -> Iterator[Podman]:
    podman = Podman(Path(os.environ.get("LONGDL_PODMAN_DIR", "/var/tmp/longdl-podman")))
    try:
        yield podman
    finally:
        podman.cleanup()


def main() -> int:
    for tool in ("podman", "mmdebstrap"):
        if shutil.which(tool) is None:
            print(f"container-test: {tool} is not installed (.ci/run installs it)")
            return 1
    with podman_session() as podman:
        run_checks(podman)
    return 0


if __name__ == "__main__":
    sys.exit(main())
