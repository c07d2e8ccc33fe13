"""What every benchmark shares: ports, child processes, wrk, a real ``longdl serve``, rows.

Everything a benchmark starts goes through :class:`Child` (its own process group, its
output in a log file, stopped in ``finally`` and at interpreter exit), so an exception or
Ctrl-C leaves no server behind.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"


def quick() -> bool:
    """Set by ``python -m bench --quick`` (BENCH_QUICK=1): shorter runs, smaller sweeps."""
    return os.environ.get("BENCH_QUICK", "") == "1"


def wrk_duration_s() -> int:
    """Length of one wrk run: long enough to average out a GC pause, short enough to fit."""
    return int(os.environ.get("BENCH_WRK_S", "3" if quick() else "5"))


def rounds() -> int:
    """How many times each longdl/baseline pair is measured, alternating; the best counts."""
    return int(os.environ.get("BENCH_ROUNDS", "1" if quick() else "2"))


# --- table rows -----------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: a longdl figure, its baseline from the same run, a target.

    Args:
        key: the issue's figure number (``P1``, ``P2``...) or another short tag.
        figure: what was measured.
        value: the longdl figure.
        unit: its unit (``req/s``, ``MB/s``, ``MiB``, ``ms``).
        baseline: the baseline's figure in the same run, same unit, or None.
        baseline_name: what the baseline is.
        min_ratio: target ``value / baseline >= min_ratio``.
        max_value: target ``value <= max_value`` (for costs: memory, latency).
        lower_is_better: the ratio is ``baseline / value`` (for latencies and times).
        note: a remark printed under the table.
    """

    key: str
    figure: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    min_ratio: float | None = None
    max_value: float | None = None
    lower_is_better: bool = False
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.value or not self.baseline:
            return None
        return self.baseline / self.value if self.lower_is_better else self.value / self.baseline

    @property
    def target(self) -> str:
        parts = []
        if self.min_ratio is not None:
            parts.append(f">= {self.min_ratio:g}x")
        if self.max_value is not None:
            parts.append(f"<= {self.max_value:g} {self.unit}")
        return ", ".join(parts) or "-"

    @property
    def met(self) -> bool | None:
        if self.min_ratio is None and self.max_value is None:
            return None
        ok = True
        if self.min_ratio is not None:
            ok = ok and self.ratio is not None and self.ratio >= self.min_ratio
        if self.max_value is not None:
            ok = ok and self.value <= self.max_value
        return ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "figure": self.figure,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline,
            "baseline_name": self.baseline_name,
            "ratio": self.ratio,
            "target": self.target,
            "met": self.met,
            "note": self.note,
        }


def fmt(value: float | None, unit: str = "") -> str:
    """A figure for the table: thousands separated, a sensible number of decimals."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:,.1f}"
    else:
        text = f"{value:,.2f}"
    return f"{text} {unit}".strip()


@dataclass
class Series:
    """Points for one line of a plot (x, y), with its label."""

    label: str
    xs: list[float] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)

    def add(self, x: float, y: float) -> None:
        self.xs.append(x)
        self.ys.append(y)


@dataclass
class Plot:
    """A PNG the report draws: how a cost grows with work."""

    name: str
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    log_x: bool = False


# --- ports and child processes --------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_CHILDREN: set[Child] = set()


def _stop_all_children() -> None:
    for child in list(_CHILDREN):
        child.stop(timeout_s=5)


atexit.register(_stop_all_children)


class Child:
    """A child process in its own process group, its output in ``log_path``.

    Stopping signals the whole group (SIGTERM, then SIGKILL after ``timeout_s``), so
    whatever it started goes too (uvicorn's worker, py-spy's target).
    """

    def __init__(
        self,
        args: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = None,
    ) -> None:
        self.args = list(args)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            self.args,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=stdin,
            stdout=stdout if stdout is not None else self._log,
            stderr=self._log,
            start_new_session=True,
        )
        _CHILDREN.add(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout_s: float = 20.0, sig: signal.Signals = signal.SIGTERM) -> int | None:
        """Stop the group and reap the child; returns its exit code."""
        if self.alive():
            self.signal_group(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.proc.wait(10)
        # Anything left in the group (a grandchild) goes too.
        self.signal_group(signal.SIGKILL)
        self._log.close()
        _CHILDREN.discard(self)
        return self.proc.returncode

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_http(url: str, child: Child | None = None, timeout_s: float = 30.0) -> None:
    """Block until ``url`` answers 2xx (or raise with the child's log)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.args[:4]} exited early:\n{child.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if 200 <= response.status < 300:
                    return
        except (OSError, urllib.error.HTTPError):
            pass
        if time.monotonic() > deadline:
            tail = child.log_tail() if child is not None else ""
            raise RuntimeError(f"{url} did not answer within {timeout_s} s\n{tail}")
        time.sleep(0.05)  # the interval of a deadline loop


def _lower(items: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in items}


@dataclass
class Answer:
    """A response: its status, body and headers (names in lower case)."""

    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    method: str,
    url: str,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> Answer:
    """One request with urllib; any status is returned, not raised."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return Answer(response.status, response.read(), _lower(response.headers.items()))
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, exc.read(), _lower(exc.headers.items()))


# --- wrk ------------------------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    requests: int
    errors: int
    command: str


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}

#: Every distinct wrk command line run, for the report (URLs and ports masked).
WRK_COMMANDS: set[str] = set()


def _ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def wrk(
    url: str,
    *,
    threads: int = 2,
    connections: int = 64,
    duration_s: int | None = None,
    headers: Sequence[str] = (),
    script: Path | None = None,
    latency: bool = False,
    allow_errors: bool = False,
) -> WrkResult:
    """Run wrk against ``url``; non-2xx/3xx answers fail it unless ``allow_errors``."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (make bench installs it: apt-get install wrk)")
    duration_s = duration_s or wrk_duration_s()
    # A generous timeout: a slow configuration (P7) answers late, not never.
    args = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--timeout", "10s"]
    for header in headers:
        args += ["-H", header]
    if script is not None:
        args += ["-s", str(script)]
    if latency:
        args.append("--latency")
    shown = " ".join(
        f"'{a.split(':')[0]}: <etag>'"
        if a.startswith("If-None-Match")
        else (f"{Path(a).name}" if a.startswith("/") else a)
        for a in args
    )
    WRK_COMMANDS.add(f"{shown} http://127.0.0.1:PORT{urllib.parse.urlsplit(url).path}")
    done = subprocess.run([*args, url], capture_output=True, text=True, timeout=duration_s + 60)
    out = done.stdout
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed against {url}:\n{out}\n{done.stderr}")
    errors = 0
    if match := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        errors += int(match.group(1))
        if not allow_errors:
            raise RuntimeError(f"wrk saw error answers from {url}:\n{out}")
    if match := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    ):
        errors += sum(int(g) for g in match.groups())
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rps is None or total is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    p50 = p99 = None
    if latency:
        p50 = _ms(re.search(r"\n\s+50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
        p99 = _ms(re.search(r"\n\s+99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    return WrkResult(float(rps.group(1)), p50, p99, int(total.group(1)), errors, shown)


def post_script(tmp: Path, path: str, body: Any, name: str = "post.lua") -> Path:
    """A wrk Lua script sending ``POST path`` with a JSON body on every request."""
    script = tmp / name
    payload = json.dumps(body, separators=(",", ":"))
    script.write_text(
        f'wrk.method = "POST"\n'
        f"wrk.path = {json.dumps(path)}\n"
        f"wrk.body = {json.dumps(payload)}\n"
        f'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return script


# --- memory ---------------------------------------------------------------------------


def proc_status_kib(pid: int, field_name: str) -> int:
    """A ``/proc/PID/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/{pid}/status")


def settled_rss_kib(pid: int, timeout_s: float = 20.0, step_s: float = 0.5) -> int:
    """VmRSS once it stopped moving (requests still being accepted grow it)."""
    deadline = time.monotonic() + timeout_s
    last = proc_status_kib(pid, "VmRSS")
    while time.monotonic() < deadline:
        time.sleep(step_s)
        now = proc_status_kib(pid, "VmRSS")
        if abs(now - last) < 128:
            return now
        last = now
    return last


def reset_peak_rss(pid: int) -> None:
    """Make the kernel's peak RSS (VmHWM) of ``pid`` equal its current RSS (proc(5))."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


# --- a real longdl serve --------------------------------------------------------------

#: A running job that never moves: its "upstream" takes 11 days, so its progress stays
#: the same (one ETag) for the whole run and it holds its worker slot.
STUCK_DELAY_MS = "1000000000"

#: Limits lifted for load: no rate limiter, no queue caps, no sweeps or expiry mid-run.
LOAD_SETTINGS = {
    "LOG_LEVEL": "WARNING",
    "RATE_LIMIT_MAX_REQUESTS": "1000000000",
    "RATE_LIMIT_POLL_MAX_REQUESTS": "1000000000",
    "MAX_QUEUED": "1000000000",
    "MAX_ACTIVE_PER_USER": "1000000000",
    "SHUTDOWN_GRACE_S": "0",
    "SWEEP_INTERVAL_S": "86400",
    "JOB_TTL_S": str(30 * 86400),
    "JOB_TIMEOUT_S": "10000000",
    "DOWNLOAD_DELAY_ENABLED": "false",
}


def stuck_settings(workers: int = 1) -> dict[str, str]:
    """Settings under which the first job runs "forever" and later ones wait behind it."""
    return {
        "WORKER_CONCURRENCY": str(workers),
        "DOWNLOAD_DELAY_ENABLED": "true",
        "DOWNLOAD_DELAY_MIN_MS": STUCK_DELAY_MS,
        "DOWNLOAD_DELAY_MAX_MS": STUCK_DELAY_MS,
    }


class Longdl:
    """``python -m longdl serve`` on a free port with its own DATA_DIR and load settings.

    Args:
        data_dir: DATA_DIR, kept across restarts.
        settings: more environment variables (they win over :data:`LOAD_SETTINGS`).
        wrapper: a command to run it under (``["py-spy", "record", ..., "--"]``).
    """

    def __init__(
        self,
        data_dir: Path,
        settings: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "DATA_DIR": str(data_dir),
            "PYTHONUNBUFFERED": "1",
            **LOAD_SETTINGS,
            **(settings or {}),
        }
        self.wrapper = list(wrapper)
        self.child: Child | None = None

    def seed(self, *file_ids: int) -> None:
        """``longdl seed`` the demo files into its storage."""
        subprocess.run(
            [sys.executable, "-m", "longdl", "seed", *map(str, file_ids)],
            env=self.env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self, timeout_s: float = 60.0) -> Longdl:
        self.child = Child(
            [*self.wrapper, sys.executable, "-m", "longdl", "serve"],
            self.data_dir.parent / f"{self.data_dir.name}-serve.log",
            env=self.env,
        )
        wait_http(f"{self.url}/health", self.child, timeout_s)
        return self

    @property
    def pid(self) -> int:
        """The server's pid (under a wrapper, the wrapper's only child)."""
        assert self.child is not None
        if not self.wrapper:
            return self.child.pid
        children = Path(f"/proc/{self.child.pid}/task/{self.child.pid}/children").read_text()
        return int(children.split()[0])

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(timeout_s=30)
            self.child = None

    def __enter__(self) -> Longdl:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def initiate(self, file_ids: Sequence[int]) -> dict[str, Any]:
        answer = http("POST", f"{self.url}/v1/download/initiate", {"file_ids": list(file_ids)})
        if answer.status != 202:
            raise RuntimeError(f"initiate answered {answer.status}: {answer.body[:500]!r}")
        job: dict[str, Any] = answer.json()
        return job

    def status(self, job: Mapping[str, Any]) -> Answer:
        return http("GET", self.url + job["statusUrl"])

    def wait_status(
        self, job: Mapping[str, Any], wanted: str, timeout_s: float = 120.0
    ) -> dict[str, Any]:
        """Poll the job until its status is ``wanted``; fail on another final status."""
        deadline = time.monotonic() + timeout_s
        while True:
            current: dict[str, Any] = self.status(job).json()
            if current["status"] == wanted:
                return current
            if current["status"] in ("completed", "failed", "canceled", "expired"):
                raise RuntimeError(f"job ended {current['status']}: {current.get('error')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"job not {wanted} within {timeout_s} s: {current}")
            time.sleep(0.05)  # the interval of a deadline loop


def job_seconds(job: dict[str, object]) -> float | None:
    """Queued to finished, from the job's own timestamps (None if it lacks them)."""
    stamps = job.get("timestamps")
    if not isinstance(stamps, dict) or not stamps.get("finishedAt"):
        return None
    queued = datetime.fromisoformat(str(stamps["queuedAt"]))
    finished = datetime.fromisoformat(str(stamps["finishedAt"]))
    return (finished - queued).total_seconds() or None


def database_path(data_dir: Path) -> Path:
    """Where longdl keeps its SQLite file for this DATA_DIR (asked of its settings)."""
    from longdl.config import Settings

    return Settings(data_dir=data_dir).database_path


def settings_field(name: str) -> bool:
    """Whether this longdl has the setting ``name`` (e.g. ``db_synchronous``)."""
    from longdl.config import Settings

    return name in Settings.model_fields


def clone_jobs(db: Path, template_id: str, count: int, status: str) -> None:
    """Insert ``count`` copies of one job row, each with a fresh id, in ``status``.

    Copying a row the service wrote itself (whatever its columns are today) keeps the
    seeded rows as real as rows made through the API, at sqlite speed. The service must
    be stopped; it recomputes whatever it keeps in memory when it starts.
    """
    con = sqlite3.connect(db)
    try:
        columns = [row[1] for row in con.execute("PRAGMA table_info(jobs)")]
        if not columns:
            raise RuntimeError(f"no jobs table in {db}")
        uuid_sql = (
            "lower(hex(randomblob(4))) || '-' || lower(hex(randomblob(2))) || '-4' || "
            "substr(lower(hex(randomblob(2))), 2) || '-a' || substr(lower(hex(randomblob(2))), 2)"
            " || '-' || lower(hex(randomblob(6)))"
        )
        overrides = {
            "id": uuid_sql,
            "status": "?",
            # Spread over the past day, so the history index is not one long run of ties.
            "created_at": "t.created_at - n.i * 0.5",
            "updated_at": "t.updated_at - n.i * 0.5",
        }
        if status == "queued":
            for name in ("result", "error", "started_at", "finished_at"):
                overrides[name] = "NULL"
            overrides["attempts"] = "0"
            overrides["run_after"] = "0"
        exprs = ", ".join(overrides.get(c, f"t.{c}") for c in columns)
        with con:
            con.execute(
                f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
                f"INSERT INTO jobs ({', '.join(columns)}) "
                f"SELECT {exprs} FROM n, jobs AS t WHERE t.id = ?",
                (count, status, template_id),
            )
    finally:
        con.close()


def count_jobs(db: Path) -> dict[str, int]:
    con = sqlite3.connect(db)
    try:
        return dict(con.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())
    finally:
        con.close()


@contextlib.contextmanager
def workdir(prefix: str = "longdl-bench-") -> Iterator[Path]:
    """A temporary folder, removed afterwards (BENCH_KEEP=1 keeps it, for logs)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if os.environ.get("BENCH_KEEP") == "1":
            print(f"   (kept {path})", flush=True)
        else:
            shutil.rmtree(path, ignore_errors=True)


def best_of(runs: Sequence[float], lower_is_better: bool = False) -> float:
    """The best of several runs: noise on a shared machine only ever makes things slower."""
    return min(runs) if lower_is_better else max(runs)


# --- baselines ------------------------------------------------------------------------


def start_canned(
    tmp: Path,
    routes: list[dict[str, Any]],
    name: str = "aiohttp",
    middleware: bool = False,
    wrapper: Sequence[str] = (),
    timeout_s: float = 30.0,
) -> tuple[Child, str]:
    """Bare aiohttp (``peers/aiohttp_canned.py``) answering ``routes``, with one pass-through
    middleware if asked, under ``wrapper`` if given (its log is ``tmp/NAME.log``); returns
    it and its URL."""
    port = free_port()
    spec = tmp / f"{name}-spec.json"
    spec.write_text(json.dumps({"routes": routes, "middleware": middleware}))
    child = Child(
        [*wrapper, sys.executable, str(PEERS / "aiohttp_canned.py"), str(port), str(spec)],
        tmp / f"{name}.log",
    )
    _wait_port(port, child, timeout_s)
    return child, f"http://127.0.0.1:{port}"


def start_uvicorn(tmp: Path, module: str, env: Mapping[str, str]) -> tuple[Child, str]:
    """``uvicorn peers.MODULE:app`` as its users run it: one worker, uvloop, httptools."""
    port = free_port()
    child = Child(
        [
            sys.executable,
            "-m",
            "uvicorn",
            f"{module}:app",
            "--app-dir",
            str(PEERS),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        tmp / f"{module}.log",
        env={**os.environ, **env},
    )
    _wait_port(port, child)
    return child, f"http://127.0.0.1:{port}"


def start_redis(tmp: Path) -> tuple[Child, int]:
    """Debian's redis-server in the foreground, AOF fsynced every second, in ``tmp``."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed (make bench installs it)")
    port = free_port()
    folder = tmp / "redis"
    folder.mkdir(exist_ok=True)
    child = Child(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            str(folder),
        ],
        tmp / "redis.log",
    )
    _wait_port(port, child)
    return child, port


def _wait_port(port: int, child: Child, timeout_s: float = 30.0) -> None:
    """Block until something accepts TCP connections on ``port``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not child.alive():
            raise RuntimeError(f"{child.args[:4]} exited early:\n{child.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port}:\n{child.log_tail()}") from None
            time.sleep(0.05)  # the interval of a deadline loop
