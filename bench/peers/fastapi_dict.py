"""FastAPI with the jobs in a dict: the status route as a FastAPI user would write it.

``uvicorn fastapi_dict:app`` with ``BENCH_JOBS`` naming a JSON file ``{job_id: resource}``
(the resources longdl answered); run with one worker, uvloop, httptools, no access log.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException

JOBS: dict[str, dict[str, Any]] = json.loads(Path(os.environ["BENCH_JOBS"]).read_text())

app = FastAPI()


@app.get("/v1/download/status/{job_id}")
async def status(job_id: str) -> dict[str, Any]:
    job = JOBS.get(job_id)
    if job is None:
        raise HTTPException(404, "no such job")
    return job


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
