"""A real nginx reverse proxy with a short read timeout, as INFRA.md runs it."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from service import free_port

CONFIG = """
worker_processes 1; error_log stderr warn; pid nginx.pid;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path tmp/client_body; proxy_temp_path tmp/proxy;
  fastcgi_temp_path tmp/fastcgi; uwsgi_temp_path tmp/uwsgi; scgi_temp_path tmp/scgi;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://127.0.0.1:{upstream_port}; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_read_timeout {timeout_s}s; proxy_send_timeout {timeout_s}s;
      proxy_connect_timeout {timeout_s}s;
    }}
  }}
}}
"""


class Nginx:
    """nginx in front of ``upstream_port``, killing requests held over ``timeout_s``."""

    def __init__(self, binary: str, prefix: Path, upstream_port: int, timeout_s: int) -> None:
        self.binary = binary
        self.prefix = prefix
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        (prefix / "nginx.conf").write_text(
            CONFIG.format(port=self.port, upstream_port=upstream_port, timeout_s=timeout_s)
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "-e",
                "stderr",
                "-p",
                f"{self.prefix}/",
                "-c",
                "nginx.conf",
                "-g",
                "daemon off;",
            ],
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                stderr = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"nginx exited: {stderr}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("nginx did not listen in time") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
