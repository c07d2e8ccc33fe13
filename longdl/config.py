"""Settings, read from environment variables and overridable by CLI flags.

Names follow the original Delineate service where it had them (``PORT``, ``S3_*``,
``CORS_ORIGINS``, ``RATE_LIMIT_*``, ``REQUEST_TIMEOUT_MS``, ``DOWNLOAD_DELAY_*``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from longdl import exceptions


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> list[Network]:
    """TRUSTED_PROXIES entries (addresses or CIDR blocks) as networks.

    Raises:
        ValueError: an entry is neither.
    """
    return [ipaddress.ip_network(entry, strict=False) for entry in entries]


def parse_api_keys(entries: Iterable[str]) -> dict[str, str]:
    """API_KEYS entries ``name:key`` as ``{key: name}``.

    Raises:
        ValueError: an entry lacks its name or key.
    """
    by_key: dict[str, str] = {}
    for entry in entries:
        name, sep, key = entry.partition(":")
        if not sep or not name.strip() or not key.strip():
            raise ValueError("API_KEYS entries look like name:key")
        by_key[key.strip()] = name.strip()
    return by_key


#: Shortest SIGNING_SECRET accepted: an HMAC key anyone could guess forges every URL.
MIN_SIGNING_SECRET_CHARS = 32
#: Shortest webhook key (bytes) accepted; Standard Webhooks asks for 24 to 64.
MIN_WEBHOOK_SECRET_BYTES = 24
#: Prefix of a serialized Standard Webhooks symmetric secret.
WEBHOOK_SECRET_PREFIX = "whsec_"


def webhook_key_bytes(secret: str) -> bytes:
    """The HMAC key of a webhook secret: ``whsec_<base64>`` decoded, else its UTF-8 bytes.

    Raises:
        ValueError: ``whsec_`` is not followed by base64.
    """
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        return secret.encode()
    encoded = secret[len(WEBHOOK_SECRET_PREFIX) :]
    try:
        return base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error as exc:
        raise ValueError("a whsec_ webhook secret must be base64 after its prefix") from exc


def check_signing_secret(secret: str) -> None:
    """Raise ``ValueError`` unless ``secret`` is long enough to sign URLs with."""
    if len(secret) < MIN_SIGNING_SECRET_CHARS:
        raise ValueError(
            f"the URL-signing secret is {len(secret)} characters; "
            f"at least {MIN_SIGNING_SECRET_CHARS} are needed"
        )


def check_webhook_secret(secret: str) -> None:
    """Raise ``ValueError`` unless ``secret`` makes a webhook key of at least 24 bytes."""
    size = len(webhook_key_bytes(secret))
    if size < MIN_WEBHOOK_SECRET_BYTES:
        raise ValueError(
            f"the webhook secret is {size} bytes; at least {MIN_WEBHOOK_SECRET_BYTES} are needed"
        )


def load_or_create_secret_file(
    path: Path, generate: Callable[[], str], check: Callable[[str], None]
) -> str:
    """The secret kept in ``path`` (stripped), or a new one from ``generate`` written
    there the first time, readable by this user only (mode 0600).

    The file appears whole or not at all: the secret is written to a temporary file,
    flushed to disk, then linked into place, which fails if another process (a
    ``longdl seed`` and a ``longdl serve`` starting together) got there first; both then
    use the first one's secret. A file already there is used only if ``check`` accepts
    it: an empty or short key would let anyone forge signatures.

    Raises:
        exceptions.InvalidSecret: the file holds a secret ``check`` refuses, with what to do.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _checked_secret(path, path.read_text().strip(), check)
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, (generate() + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        # link, not rename: it never replaces a secret another process already uses.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return _checked_secret(path, path.read_text().strip(), check)


def _checked_secret(path: Path, secret: str, check: Callable[[str], None]) -> str:
    try:
        if not secret:
            # What a start before atomic writes could leave when it died mid-write.
            raise ValueError("it is empty")
        check(secret)
    except ValueError as exc:
        raise exceptions.InvalidSecret(
            f"{path} cannot be used: {exc}. Nothing was signed with it that should be "
            "trusted: delete the file to have a new secret generated at the next start "
            "(links and webhooks signed before are then refused), or set the secret in "
            "the environment"
        ) from exc
    return secret


#: Settings whose presence selects S3 when STORAGE_BACKEND is unset: each names an S3
#: location or its credentials (region and path style only tune it).
S3_SELECTORS = ("s3_endpoint", "s3_bucket_name", "s3_access_key_id", "s3_secret_access_key")


def _check_s3(settings: Settings) -> None:
    """Refuse an S3 configuration that cannot work, naming the variable to fix.

    Raises:
        ValueError: the message starts with the variable's name.
    """
    key_id, secret = settings.s3_access_key_id, settings.s3_secret_access_key
    if bool(key_id) != bool(secret):
        given, missing = (
            ("S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY")
            if key_id
            else ("S3_SECRET_ACCESS_KEY", "S3_ACCESS_KEY_ID")
        )
        raise ValueError(f"{missing} is required when {given} is set (or unset both)")
    for name in ("s3_endpoint", "s3_public_endpoint"):
        url = getattr(settings, name)
        if url is not None and not (
            url.startswith(("http://", "https://")) and len(url.split("://", 1)[1]) > 0
        ):
            raise ValueError(f"{name.upper()} must be an http:// or https:// URL, got {url!r}")
    bucket = settings.s3_bucket_name
    if not 3 <= len(bucket) <= 63 or not all(c.isalnum() or c in ".-" for c in bucket):
        raise ValueError(
            f"S3_BUCKET_NAME must be a bucket name (3-63 letters, digits, '.' or '-'), "
            f"got {bucket!r}"
        )


def describe_error(exc: ValidationError) -> str:
    """A settings error as lines ``NAME: message`` a person can act on."""
    lines = []
    for error in exc.errors(include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        names = [str(part).upper() for part in error["loc"] if isinstance(part, str)]
        lines.append(f"{'.'.join(names)}: {message}" if names else message)
    return "\n".join(lines)


def _fsync_dir(folder: Path) -> None:
    """Make a new directory entry durable (a crash right after keeps the file)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Settings(BaseSettings):
    """Every knob of the service; the defaults run it with zero configuration."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    _storage_chosen_by: str = PrivateAttr(default="the default")

    #: Interface to listen on.
    host: str = "0.0.0.0"
    #: TCP port to listen on.
    port: int = Field(default=3000, ge=0, le=65535)
    #: Folder holding the SQLite database, the signing secret and local storage.
    data_dir: Path = Path("./longdl-data")
    #: PostgreSQL for several replicas sharing one queue (``postgresql://user:pw@host/db``,
    #: or ``postgresql://user@/db?host=/run/postgresql``); unset: SQLite in DATA_DIR.
    database_url: str | None = None
    #: Most PostgreSQL connections one replica opens (plus one that listens).
    db_pool_size: int = Field(default=10, ge=1, le=200)
    #: Absolute base URL clients reach the service at, for links; derived from the request if unset.
    public_url: str | None = None
    #: Log level name.
    log_level: str = "INFO"

    #: Which storage backend keeps source files and bundles. Unset: s3 when any of the
    #: original service's S3_ENDPOINT, S3_BUCKET_NAME, S3_ACCESS_KEY_ID or
    #: S3_SECRET_ACCESS_KEY is set, else local. Set, it wins.
    storage_backend: Literal["local", "s3"] = "local"
    #: Folder of the local storage backend (DATA_DIR/storage when unset); replicas share
    #: local storage by mounting one folder here on each.
    local_storage_dir: Path | None = None
    #: HMAC secret for local signed URLs (32 characters at least); generated once into
    #: DATA_DIR when unset.
    signing_secret: str | None = None
    #: Lifetime of a signed download URL.
    signed_url_ttl_s: int = Field(default=900, ge=1, le=7 * 24 * 3600)

    #: S3 endpoint URL (MinIO, SeaweedFS, ...); AWS when unset.
    s3_endpoint: str | None = None
    #: S3 region.
    s3_region: str = "us-east-1"
    #: S3 access key id.
    s3_access_key_id: str | None = None
    #: S3 secret access key.
    s3_secret_access_key: str | None = None
    #: S3 bucket holding downloads/ and bundles/.
    s3_bucket_name: str = "downloads"
    #: Path-style addressing (needed by most self-hosted S3 servers).
    s3_force_path_style: bool = True
    #: Endpoint that browsers reach storage by, used to sign URLs; S3_ENDPOINT when unset.
    s3_public_endpoint: str | None = None
    #: Create the bucket at start-up when it is missing.
    s3_create_bucket: bool = True
    #: Multipart upload part size for bundles (S3 minimum is 5 MiB).
    s3_part_size_bytes: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024)
    #: TCP connect timeout of one S3 request.
    s3_connect_timeout_s: float = Field(default=5.0, gt=0)
    #: Idle read timeout of one S3 request.
    s3_read_timeout_s: float = Field(default=30.0, gt=0)

    #: Job handlers run at once (a job's slot frees when its handler returns, before its
    #: final write lands); 0: this process only serves the API (other replicas run jobs).
    worker_concurrency: int = Field(default=4, ge=0, le=256)
    #: Attempts per job before it fails for good.
    max_attempts: int = Field(default=3, ge=1, le=20)
    #: First retry delay ceiling; doubles each attempt (full jitter).
    retry_base_ms: int = Field(default=1000, ge=0)
    #: Retry delay ceiling.
    retry_max_ms: int = Field(default=30_000, ge=0)
    #: Time limit of one job attempt.
    job_timeout_s: float = Field(default=900.0, gt=0)
    #: How long a finished job and its artifact are kept.
    job_ttl_s: int = Field(default=3600, ge=1)
    #: How long an expired job's row is kept after expiry.
    job_retention_s: int = Field(default=7 * 24 * 3600, ge=0)
    #: How often the TTL sweeper runs.
    sweep_interval_s: float = Field(default=30.0, gt=0)
    #: Progress is written to SQLite at most this often.
    progress_flush_ms: int = Field(default=1000, ge=10)
    #: Seconds running jobs (and open requests) get to finish on SIGTERM before the jobs are
    #: re-queued. Below the 10 s docker/podman stop waits before SIGKILL; raise both together.
    shutdown_grace_s: float = Field(default=7.0, ge=0)
    #: How long a claimed job stays this process's without a heartbeat; a job whose
    #: lease runs out (its process died) is re-queued by any live process.
    lease_s: float = Field(default=30.0, ge=1)
    #: Times a job may lose its process (crash, kill, lost lease) before it fails with
    #: WORKER_LOST instead of running again: a job that kills its process cannot loop.
    max_stalls: int = Field(default=2, ge=1, le=100)

    #: SQLite durability: ``normal`` survives a process crash, ``full`` also a power cut
    #: (one fsync per commit; concurrent writes share it).
    db_synchronous: Literal["normal", "full"] = "normal"
    #: How long a write waits for another process holding the database's write lock
    #: before the request gets 503 (SQLite; at most half of REQUEST_TIMEOUT_MS).
    db_busy_timeout_ms: int = Field(default=5000, ge=0)

    #: Simulate upstream latency while resolving files (as in the original service).
    download_delay_enabled: bool = False
    #: Lower bound of the simulated latency per job.
    download_delay_min_ms: int = Field(default=10_000, ge=0)
    #: Upper bound of the simulated latency per job.
    download_delay_max_ms: int = Field(default=200_000, ge=0)

    #: Upper bound of a long-poll (`?wait=`), under every proxy's timeout.
    long_poll_max_s: float = Field(default=25.0, ge=0)
    #: Upper bound of `Prefer: wait=N` and of the synchronous start endpoint.
    sync_wait_max_s: float = Field(default=25.0, ge=0)
    #: Origin hosts allowed the synchronous mode.
    sync_origins: CsvList = Field(default_factory=lambda: ["localhost", "127.0.0.1", "::1"])
    #: Longest a non-streaming request may take before a 504 problem (ms; 0: no limit).
    #: The original service's name; long-polls and synchronous waits must stay under it.
    request_timeout_ms: int = Field(default=30_000, ge=0)

    #: Largest accepted request body.
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    #: Waiting jobs above which initiate answers 503.
    max_queued: int = Field(default=10_000, ge=1)
    #: Unfinished jobs one caller may have.
    max_active_per_user: int = Field(default=100, ge=1)
    #: Open connections at once; one more is answered 503 and closed. Each needs a file
    #: descriptor: keep it under the process's open-files limit (``ulimit -n``).
    max_connections: int = Field(default=1000, ge=1)
    #: A connection that has not sent a complete request within this long (a new one, or
    #: an idle keep-alive one) is closed, so slow clients cannot hold connections. A proxy
    #: in front should close its idle upstream connections sooner.
    http_keepalive_s: float = Field(default=15.0, gt=0)

    #: Rate limit window (ms), as in the original service.
    rate_limit_window_ms: int = Field(default=60_000, ge=1)
    #: Requests per window per caller.
    rate_limit_max_requests: int = Field(default=100, ge=1)
    #: Requests per window per caller on polling routes.
    rate_limit_poll_max_requests: int = Field(default=1200, ge=1)
    #: Shared rate-limit counters (a ``limits`` storage URI such as
    #: ``async+redis://redis:6379``, with ``pip install 'longdl[redis]'``); unset: each
    #: replica counts in its own memory.
    rate_limit_storage_uri: str | None = None
    #: Proxies whose X-Forwarded-For is trusted.
    trusted_proxies: CsvList = Field(default_factory=list)
    #: Allowed CORS origins ("*" for any).
    cors_origins: CsvList = Field(default_factory=lambda: ["*"])
    #: API keys as name:key pairs; when set, /v1 requires a Bearer key.
    api_keys: CsvList = Field(default_factory=list)
    #: Wrong API keys (or metrics tokens) per window per address, then 429 until it resets.
    rate_limit_auth_failures: int = Field(default=10, ge=1)
    #: Bearer token for /metrics (API keys work there too); when set, /metrics needs one.
    metrics_token: str | None = None

    #: Secret signing webhook deliveries (Standard Webhooks; a key of 24 bytes at least).
    webhook_secret: str | None = None
    #: Private or loopback hosts webhooks may still target.
    webhook_allow_hosts: CsvList = Field(default_factory=list)
    #: Delivery attempts of one webhook before it is marked failed.
    webhook_max_attempts: int = Field(default=8, ge=1, le=100)
    #: Time limit of one delivery attempt (connect, send, response).
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    #: First retry delay ceiling of a webhook; doubles each attempt (full jitter).
    webhook_retry_base_ms: int = Field(default=10_000, ge=0)
    #: Webhook retry delay ceiling.
    webhook_retry_max_ms: int = Field(default=3_600_000, ge=0)
    #: A delivery still failing this long after its job finished is given up.
    webhook_max_age_s: float = Field(default=24 * 3600, gt=0)
    #: Deliveries in flight at once.
    webhook_concurrency: int = Field(default=8, ge=1, le=256)

    #: Longest quiet gap in an event stream before a heartbeat comment (proxies drop idle streams).
    sse_heartbeat_s: float = Field(default=15.0, gt=0, le=15)
    #: Lifetime of one event stream; the client reconnects with Last-Event-ID (under proxy limits).
    sse_max_s: float = Field(default=50.0, gt=0)

    _split = field_validator(
        "sync_origins",
        "trusted_proxies",
        "cors_origins",
        "api_keys",
        "webhook_allow_hosts",
        mode="before",
    )(_split_csv)

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("DATABASE_URL must be a postgresql:// URL")
        return value or None

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        parse_networks(value)
        return value

    @field_validator("api_keys")
    @classmethod
    def _valid_api_keys(cls, value: list[str]) -> list[str]:
        parse_api_keys(value)
        return value

    # An empty variable (``SIGNING_SECRET=`` in a compose file) means unset: generated.
    @field_validator("signing_secret", "webhook_secret", "metrics_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("signing_secret")
    @classmethod
    def _long_signing_secret(cls, value: str | None) -> str | None:
        if value is not None:
            check_signing_secret(value)
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _long_webhook_secret(cls, value: str | None) -> str | None:
        if value is not None:
            check_webhook_secret(value)
        return value

    @model_validator(mode="after")
    def _waits_fit_the_request_timeout(self) -> Settings:
        limit_s = self.request_timeout_ms / 1000
        if limit_s:
            for name in ("long_poll_max_s", "sync_wait_max_s"):
                if getattr(self, name) >= limit_s:
                    raise ValueError(
                        f"{name.upper()} must be below REQUEST_TIMEOUT_MS ({limit_s:g} s), "
                        "or waiting requests would be cut off"
                    )
        return self

    @model_validator(mode="after")
    def _storage_from_the_s3_variables(self) -> Settings:
        s3_named = [name.upper() for name in S3_SELECTORS if name in self.model_fields_set]
        if "storage_backend" in self.model_fields_set:
            self._storage_chosen_by = "STORAGE_BACKEND"
        elif s3_named:
            self.storage_backend = "s3"
            self._storage_chosen_by = ", ".join(s3_named)
        if self.storage_backend == "s3":
            _check_s3(self)
        return self

    @property
    def storage_chosen_by(self) -> str:
        """What chose the storage backend: STORAGE_BACKEND, the S3_* variables, or the default."""
        return self._storage_chosen_by

    @property
    def ignored_s3_variables(self) -> list[str]:
        """S3_* variables that are set while STORAGE_BACKEND=local says not to use them."""
        if self.storage_backend != "local":
            return []
        return [name.upper() for name in S3_SELECTORS if name in self.model_fields_set]

    def storage_summary(self) -> str:
        """Which storage and where, for the start-up log."""
        if self.storage_backend == "s3":
            where = (
                f"bucket={self.s3_bucket_name} endpoint={self.s3_endpoint or 'AWS'} "
                f"region={self.s3_region}"
            )
        else:
            where = f"folder={self.storage_dir.resolve()}"
        return f"storage={self.storage_backend} {where} (chosen by {self.storage_chosen_by})"

    @property
    def database_path(self) -> Path:
        """SQLite file of the job store."""
        return self.data_dir / "longdl.sqlite3"

    @property
    def storage_dir(self) -> Path:
        """Root folder of the local storage backend."""
        return self.local_storage_dir or self.data_dir / "storage"

    @property
    def retry_base_s(self) -> float:
        return self.retry_base_ms / 1000

    @property
    def retry_max_s(self) -> float:
        return self.retry_max_ms / 1000


def check_replica_secrets(settings: Settings) -> None:
    """Refuse PostgreSQL without shared secrets: replicas behind one load balancer must
    sign URLs and webhooks with the same keys, or a link minted by one is refused by
    another and receivers see two signing keys.

    A DATA_DIR that already holds the key passes (one replica, or a shared volume).

    Raises:
        ValueError: with what to set, and why.
    """
    if not settings.database_url:
        return
    for variable, filename in (
        ("SIGNING_SECRET", "signing.key"),
        ("WEBHOOK_SECRET", "webhook-secret"),
    ):
        if getattr(settings, variable.lower()) or (settings.data_dir / filename).exists():
            continue
        raise ValueError(
            f"{variable} is not set: with DATABASE_URL several replicas share one queue, and "
            f"each would make up its own key in its DATA_DIR ({filename}), so URLs signed "
            f"by one replica would be refused by the others. Set the same {variable} on "
            "every replica."
        )
