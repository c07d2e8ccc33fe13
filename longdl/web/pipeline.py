"""The one middleware every request goes through: the policy of
:mod:`longdl.web.policy`, problems of :mod:`longdl.web.problems` and timing of
:mod:`longdl.web.metrics`, outermost first::

    identify      request id; the caller's address and identity
    metrics       time what the client gets, problems included
    preflight     CORS preflights are answered here
    problems      every error below becomes problem+json
    deadline      REQUEST_TIMEOUT_MS for every request but streams (504)
    authenticate  Bearer keys where API_KEYS / METRICS_TOKEN ask for them
    rate limit    the caller's window for the request's budget (429 once spent)

One layer, not seven: each aiohttp middleware is a coroutine frame wrapped around the
next for as long as the request lasts (per held long-poll too), and most steps are a
check that needs no await (no keys, a limiter counting in memory).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from longdl.timeouts import Timeouts
from longdl.web import keys, metrics, policy, problems
from longdl.web.policy import POLICY, RATE_WINDOW

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def pipeline(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    rules = request.app[POLICY]
    policy.identify(request, rules)
    plan = rules.plan(request)
    deadlines = request.app[DEADLINES] if plan.deadline_s is not None else None
    limit_s = plan.deadline_s or 0.0
    task = request.task
    status = 500
    try:
        response: web.StreamResponse | None = policy.preflight(request, rules)
        if response is None:
            # Handled in this frame, not in one of its own: a held request keeps one less.
            if deadlines is not None:
                deadlines.enter(task, limit_s)
            try:
                await _admit(request, rules, plan)
                response = await handler(request)
            except asyncio.CancelledError:
                if deadlines is None or not deadlines.leave(task):
                    raise
                task.uncancel()  # cut at its deadline: the client gets a 504
                response = problems.from_exception(request, policy.timed_out(limit_s))
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise  # a redirect: aiohttp sends it
                response = problems.from_http_exception(request, exc)
            except Exception as exc:
                response = problems.from_exception(request, exc)
            finally:
                if deadlines is not None and deadlines.leave(task):
                    # Cut just as it finished: the answer stands, the cancel must not.
                    task.uncancel()
        status = response.status
        if not response.prepared and RATE_WINDOW in request:
            # Stamped here, where nothing needs awaiting; the prepare signal then skips it
            # (it stamps the rest: streams, and answers given before the limiter counted).
            policy.stamp(request, response)
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics.observe(request, plan.template, status, time.perf_counter() - started)


class Deadlines:
    """Cuts requests that outlive their deadline, on one timer for all of them
    (:class:`longdl.timeouts.Timeouts`): cut requests are cancelled and answered 504; a
    deadline of 30 s is kept to within a few tenths of a second."""

    def __init__(self) -> None:
        self._waiting: Timeouts[asyncio.Task[Any]] = Timeouts(self._cut)
        self._expired: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        """Requests waiting for their deadline."""
        return len(self._waiting)

    def enter(self, task: asyncio.Task[Any], limit_s: float) -> None:
        self._waiting.add(task, limit_s, task.get_loop())

    def leave(self, task: asyncio.Task[Any]) -> bool:
        """Forget the request; True when it was cut at its deadline (and is cancelled)."""
        self._waiting.discard(task)
        if task in self._expired:
            self._expired.discard(task)
            return True
        return False

    def _cut(self, task: asyncio.Task[Any]) -> None:
        self._expired.add(task)
        task.cancel()


DEADLINES = web.AppKey("deadlines", Deadlines)


async def _admit(request: web.Request, rules: policy.Policy, plan: policy.Plan) -> None:
    """Authenticate the request and count it against its budget, or raise the problem.

    Awaited before the handler, not around it: a held long-poll keeps no frame of it.
    """
    if plan.guarded:
        await policy.authenticate(request, rules)
    budget = plan.budget
    client = request[keys.CLIENT]
    if rules.limiter.shared:
        allowed, window = await rules.limiter.hit(budget, client, time.time())
    else:
        allowed, window = rules.limiter.hit_here(budget, client, time.time())
    request[RATE_WINDOW] = window
    if not allowed:
        raise policy.over_budget(window)


def install(app: web.Application) -> None:
    app[DEADLINES] = Deadlines()
