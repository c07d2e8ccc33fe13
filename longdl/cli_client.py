"""Client commands of the CLI: ``longdl get`` and ``longdl jobs ls|show|cancel``.

Exit codes (documented in ``longdl get --help`` and the README):

====  ==========================================================================
0     done
1     the job failed, was canceled or expired, or the server refused the request
2     usage error: bad arguments, or the server rejected the input as invalid
3     no such job
4     the server could not be reached
130   interrupted (Ctrl-C); ``longdl get`` keeps the ``.part`` file to resume
====  ==========================================================================
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from longdl import client as api
from longdl.models import JobOut, JobStatus

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNREACHABLE = 4
EXIT_INTERRUPTED = 130

DEFAULT_SERVER = "http://localhost:3000"
#: Dead jobs (failed, canceled, expired) a re-run of ``get`` walks past to reach a live one.
MAX_REINITIATES = 10

EXIT_CODES_HELP = """exit codes:
  0    done
  1    the job failed, was canceled or expired, or the server refused the request
  2    usage error (bad arguments, or the server rejected the input as invalid)
  3    no such job
  4    the server could not be reached
  130  interrupted (Ctrl-C); get keeps the .part file: run the same command to resume
"""

COMMANDS = ("get", "jobs")


# --- argument parsing ------------------------------------------------------------------


def _byte_count(text: str) -> int:
    """``500K``, ``2M``, ``1G`` or a plain number of bytes."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    raw = text.strip().upper().removesuffix("B")
    factor = units.get(raw[-1:], 1)
    digits = raw[:-1] if raw[-1:] in units else raw
    try:
        value = float(digits)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected a byte count like 500K or 2M: {text!r}"
        ) from exc
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than zero")
    return int(value * factor)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a whole number: {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("server")
    group.add_argument(
        "--server",
        default=os.environ.get("LONGDL_URL") or DEFAULT_SERVER,
        help=f"service URL (env LONGDL_URL, default {DEFAULT_SERVER})",
    )
    group.add_argument(
        "--api-key",
        default=os.environ.get("LONGDL_API_KEY"),
        help="API key sent as a Bearer token (env LONGDL_API_KEY)",
    )
    group.add_argument(
        "--retries",
        type=int,
        default=api.DEFAULT_RETRIES,
        help="retries of a request after a network error (default %(default)s)",
    )
    return common


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``get`` and ``jobs`` to the CLI's subcommands."""
    common = _connection_options()
    raw = argparse.RawDescriptionHelpFormatter

    get = commands.add_parser(
        "get",
        parents=[common],
        help="download files: start a job, follow it, download the result (resumable)",
        description="Start a download job, show its progress, then download the result "
        "with resume. Running the same command again after an interruption reuses the "
        "same job and resumes the .part file.",
        epilog=EXIT_CODES_HELP,
        formatter_class=raw,
    )
    get.add_argument("file_ids", nargs="+", type=int, metavar="FILE_ID", help="files to fetch")
    get.add_argument(
        "-o",
        "--output",
        type=Path,
        help="file to write, or a folder for the result's own name (default: current folder)",
    )
    get.add_argument("--strict", action="store_true", help="fail when any file is missing")
    get.add_argument("--no-wait", action="store_true", help="start the job, print its id and exit")
    get.add_argument("--priority", choices=("low", "normal", "high"), default="normal")
    get.add_argument("--user", dest="user_id", help="userId to file the job under")
    get.add_argument(
        "--limit-rate",
        type=_byte_count,
        metavar="BYTES",
        help="throttle the transfer to BYTES per second (500K, 2M)",
    )
    get.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    get.set_defaults(client_command=cmd_get)

    jobs = commands.add_parser(
        "jobs", help="list, show and cancel jobs", epilog=EXIT_CODES_HELP, formatter_class=raw
    )
    actions = jobs.add_subparsers(dest="jobs_command", required=True)
    ls = actions.add_parser("ls", parents=[common], help="recent jobs, newest first")
    ls.add_argument(
        "--status",
        action="append",
        choices=[status.value for status in JobStatus],
        help="only jobs in this status (repeatable)",
    )
    ls.add_argument("--user", dest="user_id", help="only this userId's jobs")
    ls.add_argument("--limit", type=_positive_int, default=20, help="page size (max 100)")
    ls.add_argument("--cursor", help="nextCursor of the previous page")
    ls.add_argument("--json", action="store_true", help="print the page as JSON")
    ls.set_defaults(client_command=cmd_jobs_ls)
    for name, summary, command in (
        ("show", "one job in full", cmd_jobs_show),
        ("cancel", "cancel a queued or running job", cmd_jobs_cancel),
    ):
        action = actions.add_parser(name, parents=[common], help=summary)
        action.add_argument("job_id", metavar="JOB_ID")
        action.add_argument("--json", action="store_true", help="print the job as JSON")
        action.set_defaults(client_command=command)


# --- running a command -----------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run a client command; map every expected failure to a message and an exit code."""
    command: Callable[[api.LongdlClient, argparse.Namespace], Awaitable[int]]
    command = args.client_command
    try:
        client = api.LongdlClient(args.server, args.api_key, retries=max(0, args.retries))
    except ValueError as exc:
        return _fail(EXIT_USAGE, f"--server: {exc}")

    async def main() -> int:
        async with client:
            return await command(client, args)

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        hint = "; run the same command again to resume" if args.command == "get" else ""
        return _fail(EXIT_INTERRUPTED, f"interrupted{hint}")
    except AmbiguousJobId as exc:
        return _fail(EXIT_USAGE, str(exc))
    except api.JobFailedError as exc:
        return _fail(EXIT_FAILED, f"job failed: {exc.code}: {exc.message}")
    except api.NotFoundError as exc:
        return _fail(EXIT_NOT_FOUND, exc.describe())
    except api.InvalidRequestError as exc:
        return _fail(EXIT_USAGE, exc.describe())
    except api.ApiError as exc:
        return _fail(EXIT_FAILED, f"server refused (HTTP {exc.status}): {exc.describe()}")
    except api.ConnectionError as exc:
        return _fail(EXIT_UNREACHABLE, str(exc))
    except api.ClientError as exc:
        return _fail(EXIT_FAILED, str(exc))
    except OSError as exc:  # writing the output file
        return _fail(EXIT_FAILED, str(exc))


def _fail(code: int, message: str) -> int:
    print(f"longdl: {message}", file=sys.stderr)
    return code


# --- get -------------------------------------------------------------------------------


def idempotency_key(args: argparse.Namespace, salt: str = "") -> str:
    """The same key for the same command in the same place, so a re-run finds its job."""
    output = args.output.resolve() if args.output is not None else Path.cwd()
    identity = json.dumps(
        {
            "ids": list(dict.fromkeys(args.file_ids)),
            "strict": args.strict,
            "priority": args.priority,
            "user": args.user_id,
            "output": str(output),
            "salt": salt,
        },
        sort_keys=True,
    )
    return "longdl-get-" + hashlib.sha256(identity.encode()).hexdigest()[:40]


async def _start(client: api.LongdlClient, args: argparse.Namespace) -> api.Initiated:
    """Initiate, or find the job an earlier run started; a dead one is replaced by a new job."""
    salt = ""
    for _ in range(MAX_REINITIATES):
        job = await client.initiate(
            args.file_ids,
            strict=args.strict,
            priority=args.priority,
            user_id=args.user_id,
            idempotency_key=idempotency_key(args, salt),
        )
        if not job.replayed:
            return job
        current = await client.status(job.jobId)
        if current.status not in (JobStatus.FAILED, JobStatus.CANCELED, JobStatus.EXPIRED):
            return job
        # An earlier run's job is dead: chain to a new key that later runs derive too.
        salt = job.jobId
    return job


async def cmd_get(client: api.LongdlClient, args: argparse.Namespace) -> int:
    job = await _start(client, args)
    if args.no_wait:
        print(job.jobId)
        return EXIT_OK
    display = ProgressDisplay(sys.stderr, enabled=not args.quiet)
    if job.replayed:
        display.note(f"resuming job {job.jobId}")
    try:
        path = await client.download(
            job.jobId,
            args.output if args.output is not None else Path.cwd(),
            on_progress=display.transfer,
            on_job_progress=display.job,
            max_rate_bytes_s=args.limit_rate,
        )
    finally:
        display.close()
    print(path)
    return EXIT_OK


# --- jobs ------------------------------------------------------------------------------


async def cmd_jobs_ls(client: api.LongdlClient, args: argparse.Namespace) -> int:
    page = await client.history(
        user_id=args.user_id, status=args.status, limit=args.limit, cursor=args.cursor
    )
    if args.json:
        data = {
            "items": [item.model_dump(mode="json") for item in page.items],
            "nextCursor": page.next_cursor,
        }
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(jobs_table(page.items))
    if page.next_cursor is not None:
        print(f"more: --cursor {page.next_cursor}", file=sys.stderr)
    return EXIT_OK


class AmbiguousJobId(ValueError):
    """A short job id that starts more than one of the caller's jobs."""


async def resolve_job_id(client: api.LongdlClient, text: str) -> str:
    """The full id of the job ``text`` names: a whole id, or a unique prefix of one of the
    caller's jobs (the 8 characters ``longdl get`` shows).

    Raises:
        AmbiguousJobId: several jobs start with ``text``.
        api.NotFoundError: none does.
    """
    text = text.strip().lower()
    if len(text) == 36:
        with contextlib.suppress(ValueError):
            return str(uuid.UUID(text))
    matches: list[str] = []
    cursor: str | None = None
    while True:
        page = await client.history(limit=100, cursor=cursor)
        matches.extend(job.jobId for job in page.items if job.jobId.startswith(text))
        if len(matches) > 1:
            shown = ", ".join(matches[:5])
            raise AmbiguousJobId(f"{text} starts several jobs ({shown}); give more of the id")
        cursor = page.next_cursor
        if cursor is None:
            break
    if not matches:
        raise api.NotFoundError(
            404, "Not Found", f"No job of yours starts with {text}", code="JOB_NOT_FOUND"
        )
    return matches[0]


async def cmd_jobs_show(client: api.LongdlClient, args: argparse.Namespace) -> int:
    job_id = await resolve_job_id(client, args.job_id)
    _print_job(client, await client.status(job_id), args.json)
    return EXIT_OK


async def cmd_jobs_cancel(client: api.LongdlClient, args: argparse.Namespace) -> int:
    job_id = await resolve_job_id(client, args.job_id)
    _print_job(client, await client.cancel(job_id), args.json)
    return EXIT_OK


def _print_job(client: api.LongdlClient, job: JobOut, as_json: bool) -> None:
    if as_json:
        print(job.model_dump_json(indent=2))
        return
    rows: list[tuple[str, Any]] = [
        ("job", job.jobId),
        ("status", job.status.value),
        ("progress", f"{job.progress.percent:g}% {job.progress.message}"),
        ("files", " ".join(str(i) for i in job.fileIds)),
        ("priority", job.priority),
        ("user", job.userId or "-"),
        ("attempts", f"{job.attempts}/{job.maxAttempts}"),
        ("queued", job.timestamps.queuedAt),
        ("finished", job.timestamps.finishedAt or "-"),
        ("elapsed", f"{job.elapsedSeconds:g} s"),
    ]
    if job.error is not None:
        rows.append(("error", f"{job.error.code}: {job.error.message}"))
    if job.result is not None:
        rows.append(("result", f"{job.result.filename} ({format_bytes(job.result.size)})"))
        if job.result.missing:
            rows.append(("missing", " ".join(str(i) for i in job.result.missing)))
    if job.downloadUrl:
        rows.append(("url", str(client.url_for(job.downloadUrl))))
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name.ljust(width)}  {value}" for name, value in rows))


def jobs_table(jobs: Sequence[JobOut]) -> str:
    """A plain text table of jobs, one per line."""
    header = ("JOB ID", "STATUS", "PROGRESS", "FILES", "QUEUED AT", "MESSAGE")
    rows = [
        (
            job.jobId,
            job.status.value,
            f"{job.progress.percent:.0f}%",
            str(job.totalFileIds),
            job.timestamps.queuedAt,
            (job.error.message if job.error else job.progress.message)[:60],
        )
        for job in jobs
    ]
    if not rows:
        return "no jobs"
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


# --- progress display ------------------------------------------------------------------


def format_bytes(count: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def bar(fraction: float, width: int = 24) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


class ProgressDisplay:
    """The job's progress, then the transfer's, on stderr.

    On a terminal one line is redrawn in place (``\\r``) at most ten times a second;
    otherwise (a log, a pipe) a line is printed when the status changes and every few
    seconds, so logs stay readable.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        enabled: bool = True,
        tty: bool | None = None,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = stream.isatty() if tty is None else tty
        self.interval_s = interval_s if interval_s is not None else (0.1 if self.tty else 2.0)
        self.clock = clock
        self._last_draw = -1e9
        self._last_key: object = None
        self._drawn_width = 0
        self._transfer_started: float | None = None
        self._transfer_start_bytes = 0

    def note(self, text: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        if self.enabled:
            self._clear()
            print(f"longdl: {text}", file=self.stream, flush=True)

    def job(self, job: JobOut) -> None:
        percent = job.progress.percent
        text = (
            f"job {job.jobId[:8]} {bar(percent / 100)} {percent:5.1f}% "
            f"{job.status.value}: {job.progress.message}"
        )
        self._show(text, key=("job", job.status), final=job.status.finished)

    def transfer(self, transfer: api.Transfer) -> None:
        now = self.clock()
        if self._transfer_started is None:
            self._transfer_started = now
            self._transfer_start_bytes = transfer.bytes_done
            if transfer.resumed_from_bytes:
                self.note(f"resuming download at {format_bytes(transfer.resumed_from_bytes)}")
        total = transfer.bytes_total
        fraction = transfer.bytes_done / total if total else 1.0
        elapsed_s = now - self._transfer_started
        rate = (transfer.bytes_done - self._transfer_start_bytes) / elapsed_s if elapsed_s else 0
        text = (
            f"download {bar(fraction)} {fraction * 100:5.1f}% "
            f"{format_bytes(transfer.bytes_done)}/{format_bytes(total)}"
        )
        if rate > 0:
            eta_s = (total - transfer.bytes_done) / rate
            text += f" {format_bytes(rate)}/s ETA {format_duration(eta_s)}"
        self._show(text, key="transfer", final=transfer.bytes_done >= total)

    def close(self) -> None:
        """End the redrawn line so what follows starts on a fresh one."""
        if self.enabled and self.tty and self._drawn_width:
            print(file=self.stream, flush=True)
            self._drawn_width = 0

    def _show(self, text: str, *, key: object, final: bool) -> None:
        if not self.enabled:
            return
        now = self.clock()
        changed = key != self._last_key
        if not (changed or final or now - self._last_draw >= self.interval_s):
            return
        self._last_key = key
        self._last_draw = now
        if self.tty:
            columns = shutil.get_terminal_size((100, 20)).columns - 1
            text = text[:columns]
            if changed and self._drawn_width and key == "transfer":
                print(file=self.stream)  # keep the job's last line, start the transfer's
                self._drawn_width = 0
            self.stream.write("\r" + text.ljust(self._drawn_width))
            self.stream.flush()
            self._drawn_width = len(text)
        else:
            print(text, file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.tty and self._drawn_width:
            self.stream.write("\r" + " " * self._drawn_width + "\r")
            self._drawn_width = 0
