"""P1, P1b, P1c: polling a real ``longdl serve`` with wrk, against bare aiohttp and FastAPI.

Polling is what a long-job API serves most: every client asks "done yet?" every few
seconds. With wrk (``-t2 -c64``) this measures the requests per second of:

- the status of a running job (served from memory) — P1 against a bare aiohttp app
  returning the very bytes longdl answered, P1b against FastAPI returning the same
  resource from a dict (one uvicorn worker, uvloop, httptools, no access log);
- P1c: the same with ``If-None-Match`` (a 304 revalidation; the baseline compares the
  ETag too), and the status of a completed job (read from the store, URL signed);
- ``/health`` against the bare app, and a job's status in FastAPI + arq + Redis (the
  stack users would pick instead), for information;
- the contract's own price, for information: bare aiohttp sending the running job's
  bytes with every header longdl sent (request id, security and rate-limit headers...)
  through one pass-through middleware, against the bare app and against longdl.

Every server runs at once as its own process; the measurements alternate between them,
``BENCH_ROUNDS`` times, and the best of each counts (noise only slows things down).
"""

from __future__ import annotations

import json
from typing import Any

from bench import common
from bench.common import Longdl, Row

FILES = (70000, 70007)


def _capture(server: Longdl, path: str) -> common.Answer:
    answer = common.http("GET", server.url + path)
    if answer.status != 200:
        raise RuntimeError(f"{path} answered {answer.status}")
    return answer


#: Headers aiohttp writes itself (or that describe the body it is given).
OWN_HEADERS = frozenset(
    {"date", "server", "content-length", "content-type", "transfer-encoding", "connection"}
)


def _route(
    path: str, answer: common.Answer, etag: bool = False, headers: bool = False
) -> dict[str, Any]:
    route: dict[str, Any] = {
        "path": path,
        "body": answer.body.decode(),
        "content_type": answer.headers.get("content-type", "application/json").split(";")[0],
    }
    if etag:
        route["etag"] = answer.headers["etag"]
    if headers:  # every header longdl sent, as it sent them
        route["headers"] = {k: v for k, v in answer.headers.items() if k not in OWN_HEADERS}
    return route


def run() -> dict[str, object]:
    with common.workdir() as tmp:
        data = tmp / "data"
        server = Longdl(data)
        server.seed(*FILES)
        with server:
            done = server.initiate(FILES)
            server.wait_status(done, "completed")
        # Restarted with a stuck "upstream": a new job stays running with one ETag.
        server = Longdl(data, common.stuck_settings())
        children: list[common.Child] = []
        try:
            server.start()
            running = server.initiate(FILES)
            server.wait_status(running, "running")
            run_path, done_path = running["statusUrl"], done["statusUrl"]
            run_answer = _capture(server, run_path)
            done_answer = _capture(server, done_path)
            health_answer = _capture(server, "/health")
            etag = run_answer.headers["etag"]
            if (
                common.http("GET", server.url + run_path, headers={"If-None-Match": etag}).status
                != 304
            ):
                raise RuntimeError("longdl did not answer 304 to its own ETag")

            aio, aio_url = common.start_canned(
                tmp,
                [
                    _route(run_path, run_answer, etag=True),
                    _route(done_path, done_answer),
                    _route("/health", health_answer),
                ],
            )
            children.append(aio)
            # The contract's own price: the same headers too, through one middleware.
            dressed_route = _route(run_path, run_answer, headers=True)
            dressed, dressed_url = common.start_canned(
                tmp, [dressed_route], "aiohttp-dressed", middleware=True
            )
            children.append(dressed)
            jobs = tmp / "jobs.json"
            jobs.write_text(
                json.dumps({running["jobId"]: run_answer.json(), done["jobId"]: done_answer.json()})
            )
            fastapi, fastapi_url = common.start_uvicorn(
                tmp, "fastapi_dict", {"BENCH_JOBS": str(jobs)}
            )
            children.append(fastapi)
            redis, redis_port = common.start_redis(tmp)
            children.append(redis)
            arq, arq_url = common.start_uvicorn(
                tmp, "fastapi_arq", {"BENCH_REDIS_PORT": str(redis_port)}
            )
            children.append(arq)
            arq_job = common.http(
                "POST", arq_url + "/v1/download/initiate", {"file_ids": list(FILES)}
            )
            arq_path = arq_job.json()["statusUrl"]

            inm = f"If-None-Match: {etag}"
            plan: dict[str, tuple[str, tuple[str, ...]]] = {
                "running": (server.url + run_path, ()),
                "running_aiohttp": (aio_url + run_path, ()),
                "running_fastapi": (fastapi_url + run_path, ()),
                "running_aiohttp_dressed": (dressed_url + run_path, ()),
                "304": (server.url + run_path, (inm,)),
                "304_aiohttp": (aio_url + run_path, (inm,)),
                "completed": (server.url + done_path, ()),
                "completed_aiohttp": (aio_url + done_path, ()),
                "health": (server.url + "/health", ()),
                "health_aiohttp": (aio_url + "/health", ()),
                "arq_status": (arq_url + arq_path, ()),
            }
            best: dict[str, float] = {}
            for _ in range(common.rounds()):
                for name, (url, headers) in plan.items():
                    rps = common.wrk(url, headers=headers).rps
                    best[name] = max(best.get(name, 0.0), rps)
            if (
                common.http("GET", server.url + run_path, headers={"If-None-Match": etag}).status
                != 304
            ):
                raise RuntimeError("the running job's ETag changed during the run")
        finally:
            for child in reversed(children):
                child.stop()
            server.stop()

    rps = "req/s"
    aio_name, fastapi_name = "bare aiohttp, same bytes", "FastAPI + dict (uvicorn, uvloop)"
    rows = [
        Row("P1", "status of a running job", best["running"], rps, best["running_aiohttp"],
            aio_name, min_ratio=0.8),
        Row("-", "status of a running job", best["running"], rps,
            best["running_aiohttp_dressed"],
            f"bare aiohttp, same bytes, {len(dressed_route['headers'])} headers, one middleware"),
        Row("-", "bare aiohttp: same bytes and headers, one middleware",
            best["running_aiohttp_dressed"], rps, best["running_aiohttp"], aio_name),
        Row("P1b", "status of a running job", best["running"], rps, best["running_fastapi"],
            fastapi_name, min_ratio=1.0),
        Row("P1c", "304 revalidation (If-None-Match)", best["304"], rps, best["304_aiohttp"],
            "bare aiohttp, same ETag check", min_ratio=0.9),
        Row("P1c", "status of a completed job", best["completed"], rps,
            best["completed_aiohttp"], aio_name, min_ratio=0.6),
        Row("-", "/health", best["health"], rps, best["health_aiohttp"], aio_name),
        Row("-", "status of a running job", best["running"], rps, best["arq_status"],
            "FastAPI + arq + Redis, job status"),
    ]  # fmt: skip
    return {
        "wrk": f"-t2 -c64 -d{common.wrk_duration_s()}s, best of {common.rounds()}",
        "response bytes (running, completed)": f"{len(run_answer.body)}, {len(done_answer.body)}",
        **{name: f"{value:,.0f} req/s" for name, value in best.items()},
        "rows": rows,
    }


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key}: {value}")
