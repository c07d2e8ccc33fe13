"""Pydantic models of the HTTP contract, the job record and the status enum. No I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    Strict,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

MIN_FILE_ID = 10_000
MAX_FILE_ID = 100_000_000
MAX_FILES_PER_JOB = 1000


class JobStatus(enum.StrEnum):
    """Where a job is in its life."""

    #: Waiting for a worker slot (or for its retry time).
    QUEUED = "queued"
    #: A worker is resolving its files.
    RUNNING = "running"
    #: The artifact (bundle) is being written.
    PROCESSING_ARTIFACTS = "processing_artifacts"
    #: The artifact is ready to download.
    COMPLETED = "completed"
    #: Gave up; ``error`` says why.
    FAILED = "failed"
    #: Canceled by the caller.
    CANCELED = "canceled"
    #: Finished long enough ago that its artifact was deleted.
    EXPIRED = "expired"

    @property
    def finished(self) -> bool:
        """True for a status the job never leaves except to expire."""
        return self in FINISHED_STATUSES

    @property
    def active(self) -> bool:
        """True while a worker owns the job."""
        return self in (JobStatus.RUNNING, JobStatus.PROCESSING_ARTIFACTS)


FINISHED_STATUSES = frozenset(
    {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.EXPIRED}
)


class Priority(enum.IntEnum):
    """Claim order: higher first."""

    LOW = 0
    NORMAL = 1
    HIGH = 2

    @classmethod
    def from_name(cls, name: str) -> Priority:
        return cls[name.upper()]

    @property
    def label(self) -> str:
        return self.name.lower()


def utc_iso(ts: float | None) -> str | None:
    """Render an epoch timestamp as RFC 3339 UTC with milliseconds."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- the job record (what the store keeps) ---------------------------------------------


@dataclass
class Progress:
    """How far a job got; ``percent`` never goes backwards within an attempt."""

    percent: float = 0.0
    message: str = "Queued"
    files_done: int = 0
    files_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "percent": self.percent,
            "message": self.message,
            "filesDone": self.files_done,
            "filesTotal": self.files_total,
            "bytesDone": self.bytes_done,
            "bytesTotal": self.bytes_total,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        return cls(
            percent=float(data.get("percent", 0.0)),
            message=str(data.get("message", "")),
            files_done=int(data.get("filesDone", 0)),
            files_total=int(data.get("filesTotal", 0)),
            bytes_done=int(data.get("bytesDone", 0)),
            bytes_total=int(data.get("bytesTotal", 0)),
        )


@dataclass
class Job:
    """One row of the jobs table, as plain values."""

    id: str
    kind: str
    status: JobStatus
    priority: Priority
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    progress: Progress
    created_at: float
    updated_at: float
    owner: str = ""
    #: Who sent it: the API key's name, else the client address (per-caller limits).
    client: str = ""
    user_id: str | None = None
    client_request_id: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    callback_url: str | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    run_after: float = 0.0
    expires_at: float | None = None
    #: The worker (process) holding it while running, and until when.
    worker_id: str | None = None
    lease_expires_at: float | None = None
    #: Times it lost its worker while running (crash, kill, lost lease).
    stalls: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# --- requests --------------------------------------------------------------------------


def _integral_float_to_int(value: object) -> object:
    """``70000.0`` is the integer JSON Schema says it is; ``70000.5`` stays a float (refused)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: A source file id. JSON numbers with no fraction (``70000.0``) count, as JSON Schema's
#: ``integer`` says; strings and booleans do not.
FileId = Annotated[
    int,
    Strict(),
    Field(ge=MIN_FILE_ID, le=MAX_FILE_ID),
    BeforeValidator(_integral_float_to_int),
]


#: Text a client names things with: anything but NUL, which PostgreSQL's text cannot hold
#: (refused here, so both stores answer the same).
NO_NUL = r"^[^\x00]*$"


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CheckRequest(_Request):
    """Body of ``POST /v1/download/check``."""

    file_id: FileId


def _field_error(field: str, message: str, data: object) -> ValidationError:
    """A validation error about ``field`` (a model validator's own errors have no field)."""
    return ValidationError.from_exception_data(
        "request",
        [InitErrorDetails(type=PydanticCustomError("missing", message), loc=(field,), input=data)],
    )


#: What initiate's schema says about the two id fields, exactly as the server reads them:
#: one of them, not null, and not both.
ONE_OF_FILE_IDS: list[JsonValue] = [
    {"required": ["file_ids"], "properties": {"file_ids": {"type": "array"}}},
    {"required": ["file_id"], "properties": {"file_id": {"type": "integer"}}},
]


class InitiateRequest(_Request):
    """Body of ``POST /v1/download/initiate``: ``file_ids`` or a single ``file_id``."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"oneOf": ONE_OF_FILE_IDS})

    file_ids: list[FileId] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_FILES_PER_JOB,
        description="Files to bundle; duplicates are removed keeping order.",
    )
    file_id: FileId | None = Field(default=None, description="A single file, instead of file_ids.")
    clientRequestId: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        pattern=NO_NUL,
        description="Idempotency key chosen by the client.",
    )
    userId: str | None = Field(default=None, min_length=1, max_length=200, pattern=NO_NUL)
    priority: Literal["low", "normal", "high"] = "normal"
    callbackUrl: AnyHttpUrl | None = Field(
        default=None, description="Receives a signed POST when the job finishes."
    )
    strict: Annotated[bool, Strict()] = Field(
        default=False, description="Fail the job when any file is missing."
    )

    @model_validator(mode="before")
    @classmethod
    def _one_of_ids(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data  # pydantic refuses it as "not an object"
        given = [name for name in ("file_ids", "file_id") if data.get(name) is not None]
        if not given:
            raise _field_error("file_ids", "Send file_ids (a list of ids) or file_id", data)
        if len(given) == 2:
            raise _field_error("file_id", "Send file_ids or file_id, not both", data)
        return data

    def unique_file_ids(self) -> list[int]:
        """The requested ids, duplicates removed, first occurrence kept."""
        ids = self.file_ids if self.file_ids is not None else [self.file_id]
        return list(dict.fromkeys(i for i in ids if i is not None))


class StartRequest(_Request):
    """Body of ``POST /v1/download/start``, the original synchronous endpoint."""

    file_id: FileId


# --- responses -------------------------------------------------------------------------


class ProgressOut(BaseModel):
    percent: float = Field(ge=0, le=100)
    message: str
    filesDone: int
    filesTotal: int
    bytesDone: int
    bytesTotal: int


class ErrorOut(BaseModel):
    code: str
    message: str
    retryable: bool


class ResultOut(BaseModel):
    url: str | None = Field(description="Signed at read time; never stored.")
    expiresAt: str | None
    filename: str
    size: int
    sha256: str | None = Field(description="Of the bundle; null for a single passed-through file.")
    files: list[int]
    missing: list[int]
    details: dict[str, Any] = Field(
        default_factory=dict, description="What the job's handler reports about its result."
    )


class TimestampsOut(BaseModel):
    queuedAt: str
    startedAt: str | None
    updatedAt: str
    finishedAt: str | None


class LinksOut(BaseModel):
    self: str
    result: str
    events: str
    cancel: str


class JobOut(BaseModel):
    """The job resource."""

    jobId: str
    status: JobStatus
    fileIds: list[int]
    totalFileIds: int
    progress: ProgressOut
    attempts: int
    maxAttempts: int
    priority: Literal["low", "normal", "high"]
    userId: str | None
    clientRequestId: str | None
    timestamps: TimestampsOut
    elapsedSeconds: float
    downloadUrl: str | None = Field(
        description=(
            "Signed now, once completed. Local storage: relative (/files/...), so it "
            "resolves against the URL the client used, through any proxy; absolute on "
            "PUBLIC_URL when that is set. S3: the presigned URL (absolute)."
        )
    )
    result: ResultOut | None
    error: ErrorOut | None
    expiresAt: str | None
    nextPollInMs: int | None
    links: LinksOut


class InitiateOut(BaseModel):
    """The 202 answer to initiate."""

    jobId: str
    status: JobStatus
    totalFileIds: int
    statusUrl: str
    resultUrl: str
    eventsUrl: str
    nextPollInMs: int
    expiresAt: str | None


class CheckOut(BaseModel):
    file_id: int
    available: bool
    s3Key: str | None
    size: int | None


class HealthOut(BaseModel):
    status: Literal["healthy", "unhealthy"]
    checks: dict[str, Literal["ok", "error"]]


class ResultLinkOut(BaseModel):
    """``GET /v1/download/{jobId}?redirect=false``."""

    url: str
    expiresAt: str
    filename: str
    size: int


class ProblemFieldError(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """RFC 9457 problem details; ``code`` is a stable name to branch on."""

    type: str = "about:blank"
    title: str
    status: int
    code: str
    detail: str | None = None
    requestId: str | None = None
    errors: list[ProblemFieldError] | None = None


class RootOut(BaseModel):
    name: str
    version: str
    links: dict[str, str]


class HistoryQuery(BaseModel):
    """Query of ``GET /v1/download/history``."""

    model_config = ConfigDict(extra="forbid")

    userId: str | None = Field(default=None, min_length=1, max_length=200, pattern=NO_NUL)
    status: list[JobStatus] = Field(default_factory=list, description="Repeat or comma-separate.")
    limit: int = Field(default=20, ge=1, le=100)
    cursor: str | None = Field(default=None, max_length=400)


class HistoryOut(BaseModel):
    """A page of the caller's jobs, newest first."""

    items: list[JobOut]
    nextCursor: str | None = Field(
        description="Pass as ?cursor= for the next page; null at the end."
    )


class StartOut(BaseModel):
    """The original synchronous answer of ``POST /v1/download/start``."""

    file_id: int
    status: Literal["completed", "failed"]
    downloadUrl: str | None = Field(
        description=(
            "Signed URL when completed; always absolute, as the original service answered: "
            "on PUBLIC_URL when set, else on the scheme and Host of this request."
        )
    )
    size: int | None = Field(description="Size of the download in bytes.")
    processingTimeMs: int
    message: str


class StartAcceptedOut(InitiateOut):
    """``POST /v1/download/start`` for callers that must not wait: poll instead."""

    file_id: int
    pollingEndpoint: str = Field(description="Poll this URL (the status URL).")
    message: str
