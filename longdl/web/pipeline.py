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
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

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
    """Cuts requests that outlive their deadline, with one timer for all of them.

    ``asyncio.timeout`` schedules and cancels a timer per request (7 % of a status poll's
    time under wrk). Here a request enters the set of the tick its deadline falls in and
    leaves it when answered: a dict and a set, what requests in flight hold and no more
    (a heap kept every deadline until it passed, 30 s of them under load). A tick every
    TICK_S cuts the requests of the ticks that passed; they are cancelled and answered
    504. A deadline of 30 s is kept to within TICK_S.
    """

    TICK_S = 0.1

    def __init__(self) -> None:
        #: Request (its task) -> the tick its deadline falls in.
        self._due: dict[asyncio.Task[Any], int] = {}
        self._ticks: dict[int, set[asyncio.Task[Any]]] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        """Requests waiting for their deadline."""
        return len(self._due)

    def enter(self, task: asyncio.Task[Any], limit_s: float) -> None:
        loop = task.get_loop()
        tick = math.ceil((loop.time() + limit_s) / self.TICK_S)
        self._due[task] = tick
        tasks = self._ticks.get(tick)
        if tasks is None:
            tasks = self._ticks[tick] = set()
        tasks.add(task)
        if self._timer is None:
            self._timer = loop.call_later(self.TICK_S, self._tick, loop)

    def leave(self, task: asyncio.Task[Any]) -> bool:
        """Forget the request; True when it was cut at its deadline (and is cancelled)."""
        tick = self._due.pop(task, None)
        if tick is not None:
            tasks = self._ticks[tick]
            tasks.discard(task)
            if not tasks:
                del self._ticks[tick]
        if task in self._expired:
            self._expired.discard(task)
            return True
        return False

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time() / self.TICK_S
        # At most one tick per TICK_S of REQUEST_TIMEOUT_MS: a few hundred keys.
        for tick in [tick for tick in self._ticks if tick <= now]:
            for task in self._ticks.pop(tick):
                if self._due.get(task) == tick:  # not left, not entered again since
                    del self._due[task]
                    self._expired.add(task)
                    task.cancel()
        self._timer = loop.call_later(self.TICK_S, self._tick, loop) if self._ticks else None


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
