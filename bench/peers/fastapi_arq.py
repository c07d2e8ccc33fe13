"""FastAPI + arq + Redis: the stack longdl's users would otherwise pick for long jobs.

``uvicorn fastapi_arq:app`` with ``BENCH_REDIS_PORT``; initiate validates the body and
enqueues one arq job per request (no worker runs: only taking jobs is measured), status
asks arq for the job's state in Redis. Redis runs with ``--appendonly yes
--appendfsync everysec``: what arq's users run for jobs that must survive a restart.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.jobs import Job
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

POOL: dict[str, ArqRedis] = {}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    port = int(os.environ["BENCH_REDIS_PORT"])
    POOL["redis"] = await create_pool(RedisSettings(host="127.0.0.1", port=port))
    yield
    await POOL["redis"].aclose()


app = FastAPI(lifespan=lifespan)


class InitiateRequest(BaseModel):
    file_ids: list[int] = Field(min_length=1, max_length=1000)


@app.post("/v1/download/initiate", status_code=202)
async def initiate(body: InitiateRequest) -> dict[str, Any]:
    job = await POOL["redis"].enqueue_job("download", body.file_ids)
    if job is None:
        raise HTTPException(409, "duplicate job")
    return {
        "jobId": job.job_id,
        "status": "queued",
        "totalFileIds": len(body.file_ids),
        "statusUrl": f"/v1/download/status/{job.job_id}",
    }


@app.get("/v1/download/status/{job_id}")
async def status(job_id: str) -> dict[str, Any]:
    state = await Job(job_id, POOL["redis"]).status()
    return {"jobId": job_id, "status": state.value}
