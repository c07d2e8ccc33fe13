"""A longdl service with job kinds for tests, run as its own process (``ServiceProcess``
with ``argv=("tests/jobs_app.py",)``); ``POST /test/jobs/{kind}`` queues one.

- ``poison``: kills its process on every run, as an out-of-memory bundle would.
"""

from __future__ import annotations

import os

from aiohttp import web

from longdl.app import create_app
from longdl.cli import run
from longdl.config import Settings
from longdl.engine import Artifact, JobContext
from longdl.web import routes


async def poison(ctx: JobContext) -> Artifact:
    """Die the hard way: no exception, no cleanup, no final write."""
    os._exit(1)


async def submit(request: web.Request) -> web.Response:
    job, replayed = await routes.submit_job(request, request.match_info["kind"], {})
    return routes.accepted(job, replayed)


def main() -> None:
    settings = Settings()
    app = create_app(settings, handlers={"poison": poison})
    app.router.add_post("/test/jobs/{kind}", submit)
    run(app, settings)


if __name__ == "__main__":
    main()
