"""``GET /metrics`` in the Prometheus text format, from a registry owned by the app.

- ``longdl_jobs{status}``: jobs in the store by status (read at scrape time);
- ``longdl_queue_depth``: queued jobs; ``longdl_jobs_running``: attempts running now;
- ``longdl_waiting_requests``: long-polls and event streams held here, waiting for a
  change (read at scrape time);
- ``longdl_job_duration_seconds{kind,status}``: first start to final status;
- ``longdl_job_queue_wait_seconds{kind}``: creation to first start;
- ``longdl_http_request_duration_seconds{method,route,status}``: by route template, so
  ids in URLs cannot blow up the label count;
- ``longdl_webhook_deliveries_total{outcome}``: from the webhook worker, when present;
- ``longdl_replica_info{replica,store}``: which replica answers (also the
  ``Longdl-Replica`` header of every response); ``longdl_db_pool_connections{state}``:
  the PostgreSQL pool (size, idle, max).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from longdl.models import Job, JobStatus
from longdl.web import keys
from longdl.web.openapi import Resp, doc, problem

#: Observations that wait for a scrape at most, per histogram and label values.
OBSERVE_BATCH = 1000
#: Buckets for jobs: seconds to many minutes.
JOB_BUCKETS_S = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The app's metrics and their registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = Gauge(
            "longdl_jobs", "Jobs in the store by status", ["status"], registry=self.registry
        )
        self.queue_depth = Gauge(
            "longdl_queue_depth", "Jobs waiting for a worker slot", registry=self.registry
        )
        self.running = Gauge(
            "longdl_jobs_running", "Job attempts running now", registry=self.registry
        )
        self.waiting = Gauge(
            "longdl_waiting_requests",
            "Long-polls and event streams held by this replica, waiting for a job change",
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "longdl_job_duration_seconds",
            "Time from a job's first start to its final status",
            ["kind", "status"],
            buckets=JOB_BUCKETS_S,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "longdl_job_queue_wait_seconds",
            "Time from a job's creation to its first start",
            ["kind"],
            buckets=JOB_BUCKETS_S,
            registry=self.registry,
        )
        self.replica = Gauge(
            "longdl_replica_info",
            "The replica (worker id) these metrics come from, and its store",
            ["replica", "store"],
            registry=self.registry,
        )
        self.db_pool = Gauge(
            "longdl_db_pool_connections",
            "PostgreSQL pool connections of this replica: open, idle, most allowed",
            ["state"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "longdl_http_request_duration_seconds",
            "HTTP request latency by route template",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http = Observations(self.http_duration)
        self._job_durations = Observations(self.job_duration)
        self._queue_waits = Observations(self.queue_wait)
        # The listener sees every change of a running job; these got their wait observed.
        self._started: set[str] = set()

    def flush(self) -> None:
        """Put every waiting observation into its histogram (before a scrape)."""
        for observations in (self.http, self._job_durations, self._queue_waits):
            observations.flush()

    def on_job_change(self, job: Job) -> None:
        """Engine change listener: observe a job's queue wait and its duration."""
        if job.status is JobStatus.RUNNING and job.attempts == 1 and job.started_at:
            if job.id not in self._started:
                self._started.add(job.id)
                wait_s = max(0.0, job.started_at - job.created_at)
                self._queue_waits.add((job.kind,), wait_s)
        elif job.status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED):
            self._started.discard(job.id)
            began = job.started_at or job.created_at
            end = job.finished_at or job.updated_at
            self._job_durations.add((job.kind, job.status.value), max(0.0, end - began))


class Observations:
    """Observations of one labelled histogram waiting for the next scrape, or until
    OBSERVE_BATCH of one label set wait: prometheus_client looks the child up and takes a
    lock per observation, a list takes an append."""

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        #: Values not yet in their histogram child, by label values (any type: str()'d).
        self.pending: dict[tuple[Any, ...], list[float]] = {}
        self._children: dict[tuple[Any, ...], Any] = {}

    def add(self, labels: tuple[Any, ...], value: float) -> None:
        waiting = self.pending.get(labels)
        if waiting is None:
            waiting = self.pending[labels] = []
        waiting.append(value)
        if len(waiting) >= OBSERVE_BATCH:
            self.flush()

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for labels, values in pending.items():
            child = self._children.get(labels)
            if child is None:
                child = self._children[labels] = self.histogram.labels(*map(str, labels))
            for value in values:
                child.observe(value)


class WebhookCollector(Collector):
    """Delivery counters read from the webhook worker's stats at scrape time."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    def collect(self) -> Iterator[CounterMetricFamily]:
        from longdl import webhooks

        worker = self.app.get(webhooks.WORKER)
        if worker is None:
            return
        family = CounterMetricFamily(
            "longdl_webhook_deliveries", "Webhook delivery attempts by outcome", labels=["outcome"]
        )
        for outcome, count in dataclasses.asdict(worker.stats).items():
            family.add_metric([outcome], count)
        yield family


METRICS = web.AppKey("metrics", Metrics)


def observe(request: web.Request, template: str | None, status: int, seconds: float) -> None:
    """Time one request to the route ``template`` (None: no route matched); ``status`` is
    the one the client got (problems included).

    The duration waits in a list and reaches its histogram at the next scrape (see
    :class:`Observations`, inlined here: every request passes).
    """
    http = request.app[METRICS].http
    key = (request.method, template or "unmatched", status)
    waiting = http.pending.get(key)
    if waiting is None:
        waiting = http.pending[key] = []
    waiting.append(seconds)
    if len(waiting) >= OBSERVE_BATCH:
        http.flush()


routes = web.RouteTableDef()


@routes.get("/metrics")
@doc(
    "Prometheus metrics",
    tag="service",
    v1=False,
    responses={
        200: Resp("Prometheus text format", media="text/plain", schema={"type": "string"}),
        401: problem(
            "API_KEYS or METRICS_TOKEN is set and the Bearer token is missing or wrong",
            "WWW-Authenticate",
        ),
        429: problem(
            "Rate limit exceeded, or too many wrong tokens from this address", "Retry-After"
        ),
    },
)
async def metrics(request: web.Request) -> web.Response:
    app_metrics = request.app[METRICS]
    app_metrics.flush()
    counts = await request.app[keys.STORE].count_by_status()
    for status, count in counts.items():
        app_metrics.jobs.labels(status.value).set(count)
    app_metrics.queue_depth.set(counts[JobStatus.QUEUED])
    app_metrics.running.set(request.app[keys.ENGINE].running_count)
    app_metrics.waiting.set(request.app[keys.ENGINE].hub.watching)
    store = request.app[keys.STORE]
    app_metrics.replica.labels(request.app[keys.WORKER_ID], store.name).set(1)
    pool_stats = getattr(store, "pool_stats", None)
    if pool_stats is not None:
        for state, count in pool_stats().items():
            app_metrics.db_pool.labels(state).set(count)
    return web.Response(
        body=generate_latest(app_metrics.registry),
        headers={"Content-Type": PROMETHEUS_TEXT, "Cache-Control": "no-store"},
    )


def install(app: web.Application) -> None:
    """Create the app's metrics; the engine listener is attached once the engine exists."""
    app_metrics = Metrics()
    app[METRICS] = app_metrics
    app_metrics.registry.register(WebhookCollector(app))
    app.router.add_routes(routes)
