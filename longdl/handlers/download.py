"""The built-in ``download`` job: resolve source files, then pass one through or bundle many.

Sources live at ``downloads/{file_id}.zip`` (the original service's layout); bundles are
written to ``bundles/{job_id}.zip`` (by a run that took the job over from a stalled one,
``bundles/{job_id}.{stalls}.zip``: see :func:`bundle_key`).
"""

from __future__ import annotations

import asyncio
import random

from longdl import exceptions
from longdl.engine import Artifact, JobContext
from longdl.models import JobStatus
from longdl.storage import ZipMember

#: Share of the progress bar spent resolving files; the rest is bundling bytes.
RESOLVE_SHARE = 20.0
#: The share when a simulated upstream delay runs in the resolve phase: the delay is
#: nearly all of such a job's time, so the bar (and any time-left estimate made from it)
#: moves with the clock instead of crawling to 20 % and jumping to 100 %.
DELAYED_RESOLVE_SHARE = 95.0
#: While simulating upstream latency, progress moves at least this often.
DELAY_TICK_S = 0.25


def source_key(file_id: int) -> str:
    return f"downloads/{file_id}.zip"


def bundle_key(job_id: str, stalls: int = 0) -> str:
    """Where a run of the job writes its bundle: ``bundles/{job_id}.zip``, and for a run
    that took the job over from a stalled or dead worker (the job's ``stalls``),
    ``bundles/{job_id}.{stalls}.zip``. A stalled writer that wakes up may still rename
    its bundle into place, or undo that rename, before it hears it lost the job: under
    its own name, it cannot replace or delete the result of the run that took over."""
    return f"bundles/{job_id}.zip" if not stalls else f"bundles/{job_id}.{stalls}.zip"


def simulated_delay_s(ctx: JobContext) -> float:
    """The whole job's simulated upstream latency (zero unless enabled)."""
    settings = ctx.settings
    if not settings.download_delay_enabled:
        return 0.0
    low = min(settings.download_delay_min_ms, settings.download_delay_max_ms)
    high = max(settings.download_delay_min_ms, settings.download_delay_max_ms)
    return random.uniform(low, high) / 1000


async def run(ctx: JobContext) -> Artifact:
    """Resolve the requested files and produce the artifact to download."""
    file_ids: list[int] = list(ctx.payload["file_ids"])
    strict = bool(ctx.payload.get("strict", False))
    total = len(file_ids)
    delay_per_file_s = simulated_delay_s(ctx) / total
    share = DELAYED_RESOLVE_SHARE if delay_per_file_s else RESOLVE_SHARE

    sizes: dict[int, int] = {}
    missing: list[int] = []
    for done, file_id in enumerate(file_ids, start=1):
        if delay_per_file_s:
            await _wait_upstream(ctx, delay_per_file_s, done - 1, total, share)
        info = await ctx.storage.head(source_key(file_id))
        if info is None:
            missing.append(file_id)
        else:
            sizes[file_id] = info.size_bytes
        ctx.report(
            percent=share * done / total,
            message=f"Resolving {done}/{total} files",
            files_done=0,
            files_total=total,
        )

    if not sizes:
        raise exceptions.JobFailed(
            "FILE_NOT_FOUND", f"None of the requested files exist: {_ids(missing)}"
        )
    if strict and missing:
        raise exceptions.JobFailed("FILE_NOT_FOUND", f"Files not found: {_ids(missing)}")

    available = [file_id for file_id in file_ids if file_id in sizes]
    details = {"files": available, "missing": missing}
    if len(available) == 1:
        (file_id,) = available
        ctx.report(files_done=1, bytes_done=sizes[file_id], bytes_total=sizes[file_id])
        return Artifact(
            key=source_key(file_id),
            filename=f"{file_id}.zip",
            size_bytes=sizes[file_id],
            owned=False,
            content_type="application/zip",
            details=details,
        )
    return await _bundle(ctx, available, sizes, details, share)


async def _wait_upstream(
    ctx: JobContext, delay_s: float, done: int, total: int, share: float
) -> None:
    """Sleep out one file's simulated latency, moving progress toward its share."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    ctx.report(message=f"Resolving {done + 1}/{total} files", files_total=total)
    while (elapsed_s := loop.time() - start) < delay_s:
        ctx.report(percent=share * (done + elapsed_s / delay_s) / total)
        await asyncio.sleep(min(DELAY_TICK_S, delay_s - elapsed_s))


async def _bundle(
    ctx: JobContext,
    file_ids: list[int],
    sizes: dict[int, int],
    details: dict[str, list[int]],
    share: float,
) -> Artifact:
    await ctx.set_status(JobStatus.PROCESSING_ARTIFACTS)
    bytes_total = sum(sizes.values())
    files_total = len(file_ids)
    ctx.report(
        message=f"Bundling 0/{files_total} files",
        bytes_done=0,
        bytes_total=bytes_total,
        files_done=0,
        files_total=files_total,
    )

    def on_progress(files_done: int, bytes_done: int) -> None:
        done_share = bytes_done / bytes_total if bytes_total else 1.0
        ctx.report(
            percent=min(99.0, share + (100 - share) * done_share),
            message=f"Bundling {min(files_done + 1, files_total)}/{files_total} files",
            bytes_done=bytes_done,
            files_done=files_done,
        )

    members = [
        ZipMember(f"{file_id}.zip", source_key(file_id), sizes[file_id]) for file_id in file_ids
    ]
    key = bundle_key(ctx.job_id, ctx.job.stalls)
    try:
        written = await ctx.storage.write_zip(key, members, on_progress)
    except exceptions.ObjectNotFound as exc:
        file_id = next((i for i in file_ids if source_key(i) == str(exc)), None)
        raise exceptions.JobFailed(
            "FILE_NOT_FOUND", f"File {file_id or exc} disappeared while bundling"
        ) from exc
    return Artifact(
        key=key,
        filename=f"bundle-{ctx.job_id[:8]}.zip",
        size_bytes=written.info.size_bytes,
        owned=True,
        sha256=written.sha256,
        content_type="application/zip",
        details=details,
    )


def _ids(ids: list[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:20])
    return shown + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")
