"""The store contract: behaviour every backend shows, as one test class to subclass.

A backend's test class derives from :class:`StoreContract` and provides the
``make_store`` fixture (a factory taking a clock); huey's ``StorageTests`` works the
same way. Times come from the injected clock, so leases and TTLs run out on command.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from longdl import exceptions
from longdl.models import Job, JobStatus, Priority, Progress
from longdl.store import WORKER_LOST, Claim, Limits, NewJob, Store, WorkerInfo

MakeStore = Callable[[Callable[[], float]], Awaitable[Store]]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def new_job(
    job_id: str | None = None,
    *,
    priority: Priority = Priority.NORMAL,
    client: str = "c",
    owner: str = "",
    callback_url: str | None = None,
    max_attempts: int = 3,
) -> NewJob:
    return NewJob(
        id=job_id or str(uuid.uuid4()),
        kind="download",
        payload={"file_ids": [70000]},
        max_attempts=max_attempts,
        priority=priority,
        owner=owner,
        client=client,
        callback_url=callback_url,
    )


class StoreContract:
    """Each backend's test class inherits these tests and supplies ``make_store``."""

    @pytest.fixture
    def clock(self) -> Clock:
        return Clock()

    @pytest.fixture
    async def store(self, make_store: MakeStore, clock: Clock) -> Store:
        return await make_store(clock)

    async def running(self, store: Store, worker: str = "w1", lease_s: float = 30) -> str:
        """Insert a job and claim it for ``worker``; return its id."""
        job_id = (await store.insert_job(new_job())).job.id
        claimed = await store.claim(worker, lease_s, 10)
        assert job_id in [job.id for job in claimed]
        return job_id

    # --- inserting and reading ---------------------------------------------------------

    async def test_inserted_job_is_queued_and_readable(self, store: Store) -> None:
        """A new job is stored queued with no attempt used, and reads back whole."""
        inserted = await store.insert_job(new_job("a"))
        job = await store.get_job("a")
        assert inserted.replayed is False
        assert job is not None
        assert (JobStatus.QUEUED, 0, {"file_ids": [70000]}) == (
            job.status,
            job.attempts,
            job.payload,
        )

    async def test_unknown_job_reads_as_none(self, store: Store) -> None:
        """Reading a job that does not exist gives None, not an error."""
        assert await store.get_job(str(uuid.uuid4())) is None

    async def test_same_key_replays_the_job_with_its_request_hash(self, store: Store) -> None:
        """A second insert with the same idempotency key returns the first job."""
        first = await store.insert_job(new_job("a"), idempotency_key="k", request_hash="h1")
        again = await store.insert_job(new_job("b"), idempotency_key="k", request_hash="h2")
        assert (False, True, "a", "h1") == (
            first.replayed,
            again.replayed,
            again.job.id,
            again.request_hash,
        )
        assert await store.get_job("b") is None

    async def test_keys_are_scoped_to_their_owner(self, store: Store) -> None:
        """The same key from another owner makes another job."""
        await store.insert_job(new_job("a", owner="alice"), idempotency_key="k")
        other = await store.insert_job(new_job("b", owner="bob"), idempotency_key="k")
        assert (False, "b") == (other.replayed, other.job.id)

    async def test_concurrent_identical_inserts_make_one_job(self, store: Store) -> None:
        """A hundred inserts racing with one key make one job, and all name it."""
        results = await asyncio.gather(
            *(
                store.insert_job(new_job(), idempotency_key="k", request_hash="h")
                for _ in range(100)
            )
        )
        assert 1 == len({r.job.id for r in results})
        assert 1 == sum(not r.replayed for r in results)
        assert 1 == (await store.count_by_status())[JobStatus.QUEUED]

    async def test_an_insert_claims_its_job_when_nothing_waits(
        self, store: Store, clock: Clock
    ) -> None:
        """With a claim and an empty queue, the new job is running, leased to the
        claimer, and handed over once committed; with a job waiting, it queues behind."""
        started: list[str] = []
        handed_over = asyncio.Event()

        def on_claimed(job: Job) -> None:
            started.append(job.id)
            handed_over.set()

        claim = Claim("w1", 30, on_claimed)
        first = await store.insert_job(new_job("first"), claim=claim)
        stored = await store.get_job("first")
        assert stored is not None
        for job in (first.job, stored):
            assert (JobStatus.RUNNING, 1, "w1") == (job.status, job.attempts, job.worker_id)
        assert clock.now + 30 == stored.lease_expires_at
        async with asyncio.timeout(5):
            await handed_over.wait()
        await store.insert_job(new_job("waiting"))
        second = await store.insert_job(new_job("second"), claim=claim)
        assert JobStatus.QUEUED is second.job.status
        assert JobStatus.QUEUED is (await store.get_job("second") or stored).status
        assert ["first"] == started
        assert 1 == (await store.count_by_status())[JobStatus.RUNNING]

    async def test_a_failed_insert_leaves_the_inserts_beside_it(self, store: Store) -> None:
        """An insert that fails (its id is taken) fails alone: the inserts written in the
        same transaction land, and its idempotency key is not kept."""
        await store.insert_job(new_job("a"))
        results = await asyncio.gather(
            store.insert_job(new_job("b")),
            store.insert_job(new_job("a"), idempotency_key="k", request_hash="h"),
            store.insert_job(new_job("c"), idempotency_key="k2"),
            return_exceptions=True,
        )
        assert isinstance(results[1], Exception)
        assert ["b", "c"] == [r.job.id for r in (results[0], results[2])]  # type: ignore[union-attr]
        assert [True, True] == [await store.get_job(i) is not None for i in ("b", "c")]
        retried = await store.insert_job(new_job("d"), idempotency_key="k", request_hash="h")
        assert (False, "d") == (retried.replayed, retried.job.id)

    async def test_inserts_the_database_refuses_fail_alone(self, store: Store) -> None:
        """Inserts holding text the database cannot store (a NUL character: PostgreSQL's
        text and jsonb refuse it) fail alone, as Unstorable: the inserts queued with them
        in one transaction land, and each caller is told the truth about its own."""
        poisoned = [
            dataclasses.replace(new_job("bad-text"), user_id="a\x00b"),
            dataclasses.replace(new_job("bad-json"), payload={"name": "a\x00b"}),
        ]
        results = await asyncio.gather(
            *(store.insert_job(new_job(f"ok{i}")) for i in range(3)),
            store.insert_job(poisoned[0]),
            *(store.insert_job(new_job(f"ok{i}")) for i in range(3, 6)),
            store.insert_job(poisoned[1]),
            return_exceptions=True,
        )
        good = results[:3] + results[4:7]
        assert [f"ok{i}" for i in range(6)] == [getattr(r, "job", r).id for r in good]
        assert [True] * 6 == [await store.get_job(f"ok{i}") is not None for i in range(6)]
        for new, result in zip(poisoned, (results[3], results[7]), strict=True):
            stored = await store.get_job(new.id)
            if isinstance(result, BaseException):
                assert isinstance(result, exceptions.Unstorable)
                assert stored is None
            else:  # a store that can hold the text keeps it as it was given
                assert stored is not None
                assert (new.user_id, new.payload) == (stored.user_id, stored.payload)

    async def test_queue_limit_refuses_the_job_beyond_it(self, store: Store) -> None:
        """With max_queued jobs waiting, the next insert is Overloaded and creates nothing."""
        limits = Limits(max_queued=2, max_active_per_client=100)
        for _ in range(2):
            await store.insert_job(new_job(), limits=limits)
        with pytest.raises(exceptions.Overloaded):
            await store.insert_job(new_job("x"), limits=limits)
        assert await store.get_job("x") is None

    async def test_per_client_limit_counts_unfinished_jobs_only(self, store: Store) -> None:
        """A client at its limit is refused; once a job finishes it may submit again."""
        limits = Limits(max_queued=100, max_active_per_client=2)
        job_id = await self.running(store)
        await store.insert_job(new_job(client="c"), limits=limits)
        with pytest.raises(exceptions.TooManyActiveJobs):
            await store.insert_job(new_job(client="c"), limits=limits)
        await store.insert_job(new_job(client="other"), limits=limits)
        await store.complete(job_id, "w1", {"key": "k"}, Progress(), ttl_s=60)
        await store.insert_job(new_job(client="c"), limits=limits)

    async def test_limits_stay_exact_through_many_changes(self, store: Store) -> None:
        """Hundreds of inserts, claims, finishes and cancels later, each limit still
        refuses exactly at its bound (PostgreSQL keeps the counts as deltas it folds)."""
        limits = Limits(max_queued=150, max_active_per_client=120)
        ids = [(await store.insert_job(new_job(), limits=limits)).job.id for _ in range(100)]
        running = [job.id for job in await store.claim("w1", 30, 40)]
        for job_id in running[:30]:
            await store.complete(job_id, "w1", {"key": job_id}, Progress(), ttl_s=60)
        for job_id in [i for i in ids if i not in running][-20:]:
            await store.cancel(job_id, 60, "canceled")
        # Unfinished: 100 - 30 - 20 = 50 of client "c"; queued: 100 - 40 - 20 = 40.
        for _ in range(70):
            await store.insert_job(new_job(), limits=limits)
        with pytest.raises(exceptions.TooManyActiveJobs):
            await store.insert_job(new_job(), limits=limits)
        for _ in range(40):  # 110 queued: 40 more from others reach the queue's bound
            await store.insert_job(new_job(client="other"), limits=limits)
        with pytest.raises(exceptions.Overloaded):
            await store.insert_job(new_job(client="third"), limits=limits)
        assert 150 == (await store.count_by_status())[JobStatus.QUEUED]

    async def test_a_replay_is_answered_even_at_the_limit(self, store: Store) -> None:
        """A replay creates nothing, so the limits do not refuse it."""
        limits = Limits(max_queued=1, max_active_per_client=1)
        first = await store.insert_job(new_job(), idempotency_key="k", limits=limits)
        again = await store.insert_job(new_job(), idempotency_key="k", limits=limits)
        assert (True, first.job.id) == (again.replayed, again.job.id)

    async def test_counts_follow_every_transition(self, store: Store, clock: Clock) -> None:
        """Kept counts match the jobs through claim, finish, cancel, expiry and purge."""
        done = await self.running(store)
        await store.complete(done, "w1", {"key": "k"}, Progress(), ttl_s=10)
        failed = await self.running(store)
        await store.fail(failed, "w1", {"code": "X"}, Progress(), ttl_s=10)
        canceled = (await store.insert_job(new_job())).job.id
        await store.cancel(canceled, ttl_s=100, message="Canceled")
        running = await self.running(store)
        await store.set_status(running, "w1", JobStatus.PROCESSING_ARTIFACTS, Progress())
        await store.insert_job(new_job())
        clock.advance(11)
        await store.expire_due(limit=100)

        counts = await store.count_by_status()
        assert {
            JobStatus.QUEUED: 1,
            JobStatus.PROCESSING_ARTIFACTS: 1,
            JobStatus.CANCELED: 1,
            JobStatus.EXPIRED: 2,
        } == {status: n for status, n in counts.items() if n}

        clock.advance(1000)
        assert 2 == await store.purge(retention_s=100, limit=100)
        assert 0 == (await store.count_by_status())[JobStatus.EXPIRED]

    # --- claiming ----------------------------------------------------------------------

    async def test_claim_takes_priority_then_age(self, store: Store, clock: Clock) -> None:
        """Claims come high priority first, then oldest first."""
        for name, priority in [("low", Priority.LOW), ("n1", Priority.NORMAL)]:
            await store.insert_job(new_job(name, priority=priority))
            clock.advance(1)
        await store.insert_job(new_job("high", priority=Priority.HIGH))
        clock.advance(1)
        await store.insert_job(new_job("n2"))
        order = [job.id for _ in range(4) for job in await store.claim("w", 30, 1)]
        assert ["high", "n1", "n2", "low"] == order

    async def test_claim_returns_the_batch_most_urgent_first(self, store: Store) -> None:
        """A claim of several jobs lists them in claim order."""
        await store.insert_job(new_job("low", priority=Priority.LOW))
        await store.insert_job(new_job("high", priority=Priority.HIGH))
        assert ["high", "low"] == [job.id for job in await store.claim("w", 30, 5)]

    async def test_claim_leases_the_job_and_uses_an_attempt(
        self, store: Store, clock: Clock
    ) -> None:
        """A claimed job is running, held by the worker until now + lease, attempt 1."""
        await store.insert_job(new_job("a"))
        (job,) = await store.claim("w1", 30, 10)
        assert (JobStatus.RUNNING, 1, "w1", clock.now + 30) == (
            job.status,
            job.attempts,
            job.worker_id,
            job.lease_expires_at,
        )
        assert [] == await store.claim("w2", 30, 10)

    async def test_retry_waits_for_its_time(self, store: Store, clock: Clock) -> None:
        """A job sent back with a delay is not claimable until the delay has passed."""
        job_id = await self.running(store)
        await store.retry_later(job_id, "w1", 5, {"code": "X"}, Progress())
        assert [] == await store.claim("w1", 30, 10)
        assert clock.now + 5 == await store.next_run_after()
        clock.advance(5)
        assert [job_id] == [job.id for job in await store.claim("w1", 30, 10)]

    async def test_next_run_after_is_none_without_queued_jobs(self, store: Store) -> None:
        """With nothing queued there is no next time."""
        await self.running(store)
        assert await store.next_run_after() is None

    # --- guarded writes ----------------------------------------------------------------

    async def test_only_the_holding_worker_finishes_a_job(self, store: Store) -> None:
        """A worker that does not hold the job cannot complete, fail or release it."""
        job_id = await self.running(store, "w1")
        assert await store.complete(job_id, "w2", {"key": "k"}, Progress(), ttl_s=60) is None
        assert await store.fail(job_id, "w2", {"code": "X"}, Progress(), ttl_s=60) is None
        assert await store.release(job_id, "w2", Progress()) is None
        job = await store.get_job(job_id)
        assert job is not None
        assert JobStatus.RUNNING == job.status

    async def test_writes_queued_together_each_get_their_own_answer(self, store: Store) -> None:
        """Completions written in one transaction, some refused (the worker does not
        hold the job), answer each caller for its own job: a refusal is None, and the
        others get their own job back."""
        mine = [await self.running(store, "w1") for _ in range(4)]
        writes = [
            store.complete(job_id, "w1" if i % 2 else "w2", {"key": job_id}, Progress(), 60)
            for i, job_id in enumerate(mine)
        ]
        results = await asyncio.gather(*writes)
        assert [None, mine[1], None, mine[3]] == [getattr(r, "id", None) for r in results]
        statuses = [getattr(await store.get_job(i), "status", None) for i in mine]
        assert [JobStatus.RUNNING, JobStatus.COMPLETED] * 2 == statuses

    async def test_completed_job_cannot_be_canceled(self, store: Store) -> None:
        """Cancel gives None for a finished job and changes nothing."""
        job_id = await self.running(store)
        await store.complete(job_id, "w1", {"key": "k"}, Progress(), ttl_s=60)
        assert await store.cancel(job_id, ttl_s=60, message="Canceled") is None
        job = await store.get_job(job_id)
        assert job is not None
        assert JobStatus.COMPLETED == job.status

    async def test_cancel_of_a_running_job_ends_its_lease(self, store: Store) -> None:
        """A canceled running job is canceled and no longer held by its worker."""
        job_id = await self.running(store)
        canceled = await store.cancel(job_id, ttl_s=60, message="Canceled")
        assert canceled is not None
        assert ("canceled", "CANCELED") == (canceled.status.value, (canceled.error or {})["code"])
        beat = await store.heartbeat("w1", 30, {})
        assert job_id not in beat.held

    async def test_release_gives_the_attempt_back_without_a_stall(self, store: Store) -> None:
        """A graceful release re-queues the job with no attempt used and no stall."""
        job_id = await self.running(store)
        released = await store.release(job_id, "w1", Progress(message="Re-queued"))
        assert released is not None
        assert (JobStatus.QUEUED, 0, 0, None) == (
            released.status,
            released.attempts,
            released.stalls,
            released.worker_id,
        )

    async def test_release_all_gives_back_every_job_a_worker_holds(self, store: Store) -> None:
        """A stopping worker's jobs all go back to the queue, others' stay."""
        mine = [await self.running(store, "w1") for _ in range(2)]
        theirs = await self.running(store, "w2")
        released = await store.release_all("w1", "Re-queued")
        assert sorted(mine) == sorted(released)
        statuses = [getattr(await store.get_job(i), "status", None) for i in [*mine, theirs]]
        assert [JobStatus.QUEUED, JobStatus.QUEUED, JobStatus.RUNNING] == statuses
        job = await store.get_job(mine[0])
        assert job is not None
        assert (0, "Re-queued") == (job.attempts, job.progress.message)

    # --- heartbeats and stalls ---------------------------------------------------------

    async def test_heartbeat_renews_leases_and_writes_progress(
        self, store: Store, clock: Clock
    ) -> None:
        """A heartbeat moves the lease forward and stores the progress it carries."""
        job_id = await self.running(store, lease_s=30)
        clock.advance(20)
        beat = await store.heartbeat("w1", 30, {job_id: Progress(percent=40, message="m")})
        job = await store.get_job(job_id)
        assert job is not None
        assert ({job_id}, clock.now + 30, 40.0, "m") == (
            set(beat.held),
            job.lease_expires_at,
            job.progress.percent,
            job.progress.message,
        )

    async def test_heartbeat_ignores_progress_of_jobs_it_does_not_hold(self, store: Store) -> None:
        """Progress from a worker that lost the job is dropped."""
        job_id = await self.running(store, "w1")
        beat = await store.heartbeat("w2", 30, {job_id: Progress(percent=90)})
        job = await store.get_job(job_id)
        assert job is not None
        assert (set(), 0.0) == (set(beat.held), job.progress.percent)

    async def test_rescue_requeues_a_stalled_job_with_its_attempt_back(
        self, store: Store, clock: Clock
    ) -> None:
        """A job whose lease ran out goes back to the queue: one stall, attempt returned."""
        job_id = await self.running(store, "w1", lease_s=30)
        clock.advance(31)
        rescued = await store.rescue_stalled(max_stalls=2, ttl_s=60)
        job = await store.get_job(job_id)
        assert job is not None
        assert ([job_id], [], JobStatus.QUEUED, 1, 0) == (
            [j.id for j in rescued.requeued],
            rescued.lost,
            job.status,
            job.stalls,
            job.attempts,
        )
        # The old worker's writes no longer land.
        assert await store.complete(job_id, "w1", {"key": "k"}, Progress(), ttl_s=60) is None

    async def test_rescue_fails_a_job_at_max_stalls(self, store: Store, clock: Clock) -> None:
        """The stall that reaches MAX_STALLS fails the job with WORKER_LOST."""
        job_id = await self.running(store, "w1", lease_s=30)
        clock.advance(31)
        await store.rescue_stalled(max_stalls=2, ttl_s=60)
        await store.claim("w2", 30, 10)
        clock.advance(31)
        rescued = await store.rescue_stalled(max_stalls=2, ttl_s=60)
        job = await store.get_job(job_id)
        assert job is not None
        assert ([job_id], JobStatus.FAILED, WORKER_LOST, False, 2) == (
            [j.id for j in rescued.lost],
            job.status,
            (job.error or {}).get("code"),
            (job.error or {}).get("retryable"),
            job.stalls,
        )

    async def test_rescue_leaves_live_leases_and_its_own_worker_alone(
        self, store: Store, clock: Clock
    ) -> None:
        """Leases not yet run out, and the rescuing worker's own, are not touched."""
        live = await self.running(store, "w1", lease_s=60)
        own = await self.running(store, "me", lease_s=10)
        clock.advance(30)
        rescued = await store.rescue_stalled(max_stalls=2, ttl_s=60, exclude_worker="me")
        assert ([], []) == (rescued.requeued, rescued.lost)
        for job_id in (live, own):
            job = await store.get_job(job_id)
            assert job is not None
            assert JobStatus.RUNNING == job.status

    async def test_registered_worker_is_live_until_unregistered(self, store: Store) -> None:
        """A worker is among the live ones from registration to unregistration."""
        await store.register_worker(WorkerInfo("wx", "host", 1))
        assert "wx" in await store.live_workers()
        await store.unregister_worker("wx")
        assert "wx" not in await store.live_workers()

    # --- expiry, outputs and the trash -------------------------------------------------

    async def finished(
        self,
        store: Store,
        result: dict[str, Any],
        outputs: Sequence[str] = (),
        ttl_s: float = 10,
    ) -> str:
        job_id = await self.running(store)
        for key in outputs:
            await store.add_output(job_id, "w1", key)
        await store.complete(job_id, "w1", result, Progress(), ttl_s=ttl_s)
        return job_id

    async def test_expiry_works_in_batches_and_trashes_owned_artifacts(
        self, store: Store, clock: Clock
    ) -> None:
        """Due jobs expire a batch at a time, oldest first; owned artifacts go to the
        trash, a passed-through source does not; jobs not due stay."""
        owned = [
            await self.finished(store, {"key": f"bundles/{i}.zip", "owned": True}) for i in range(3)
        ]
        await self.finished(store, {"key": "downloads/70000.zip", "owned": False})
        fresh = await self.finished(store, {"key": "bundles/f.zip", "owned": True}, ttl_s=1000)
        clock.advance(11)
        first = await store.expire_due(limit=2)
        rest = await store.expire_due(limit=100)
        assert (2, 2) == (len(first), len(rest))
        assert {"expired"} == {job.status.value for job in first + rest}
        trash = {item.key for item in await store.claim_trash(limit=100, lease_s=60)}
        assert {f"bundles/{i}.zip" for i in range(3)} == trash
        job = await store.get_job(fresh)
        assert job is not None
        assert JobStatus.COMPLETED == job.status
        assert owned[0] in {job.id for job in first}

    async def test_noting_an_output_says_whether_the_job_is_still_held(
        self, store: Store, clock: Clock
    ) -> None:
        """A key is noted (once, however often) while its worker holds the job; another
        worker, or a canceled job, notes nothing and hears so."""
        job_id = await self.running(store)
        assert [True, True, False] == [
            await store.add_output(job_id, "w1", "bundles/x.zip"),
            await store.add_output(job_id, "w1", "bundles/x.zip"),
            await store.add_output(job_id, "w2", "bundles/y.zip"),
        ]
        await store.cancel(job_id, ttl_s=60, message="Canceled")
        assert False is await store.add_output(job_id, "w1", "bundles/z.zip")
        clock.advance(120)
        assert ["bundles/x.zip"] == [
            item.key for item in await store.claim_trash(limit=10, lease_s=60)
        ]

    async def test_outputs_of_a_failed_job_go_to_the_trash(
        self, store: Store, clock: Clock
    ) -> None:
        """What a failed job wrote is trashed (after its grace)."""
        job_id = await self.running(store)
        await store.add_output(job_id, "w1", "bundles/x.zip")
        await store.add_output(job_id, "w1", "bundles/x.zip")
        await store.fail(job_id, "w1", {"code": "X"}, Progress(), ttl_s=60)
        clock.advance(120)
        assert ["bundles/x.zip"] == [
            item.key for item in await store.claim_trash(limit=10, lease_s=60)
        ]

    async def test_completed_job_keeps_its_result_and_trashes_other_outputs(
        self, store: Store, clock: Clock
    ) -> None:
        """On completion only the outputs that are not the result go to the trash."""
        await self.finished(
            store, {"key": "bundles/r.zip", "owned": True}, outputs=["tmp/a", "bundles/r.zip"]
        )
        clock.advance(120)
        assert ["tmp/a"] == [item.key for item in await store.claim_trash(limit=10, lease_s=60)]

    async def test_late_outputs_of_a_finished_job_go_to_the_trash_but_its_result(
        self, store: Store, clock: Clock
    ) -> None:
        """A run that wrote after its job ended puts what it wrote back in the trash, due
        now: not the job's result, not twice, and nothing while the job is unfinished
        (its end trashes its outputs)."""
        job_id = await self.finished(
            store, {"key": "bundles/r.zip", "owned": True}, outputs=["bundles/r.zip"]
        )
        late = ["bundles/r.zip", "bundles/stale.zip", "bundles/stale.zip.side"]
        assert 2 == await store.trash_late_outputs(job_id, late)
        assert 0 == await store.trash_late_outputs(job_id, late)
        due = {item.key for item in await store.claim_trash(limit=10, lease_s=60)}
        assert {"bundles/stale.zip", "bundles/stale.zip.side"} == due
        await store.trash_done(sorted(due))

        unfinished = await self.running(store)
        assert 0 == await store.trash_late_outputs(unfinished, ["bundles/u.zip"])
        assert 0 == await store.trash_late_outputs("no-such-job", ["bundles/n.zip"])
        clock.advance(120)
        assert [] == await store.claim_trash(limit=10, lease_s=60)

    async def test_trash_items_can_be_retried_and_forgotten(
        self, store: Store, clock: Clock
    ) -> None:
        """A failed deletion comes back after its delay; a done one never again."""
        job_id = await self.running(store)
        await store.add_output(job_id, "w1", "a")
        await store.add_output(job_id, "w1", "b")
        await store.cancel(job_id, ttl_s=60, message="Canceled")
        clock.advance(120)
        await store.trash_retry(["a"], delay_s=30)
        await store.trash_done(["b"])
        assert [] == await store.claim_trash(limit=10, lease_s=60)
        clock.advance(30)
        assert [("a", 1)] == [
            (i.key, i.attempts) for i in await store.claim_trash(limit=10, lease_s=60)
        ]

    async def test_purge_deletes_old_expired_jobs_with_their_deliveries(
        self, store: Store, clock: Clock
    ) -> None:
        """Rows expired longer than the retention go, with their webhook deliveries and
        idempotency keys; newer ones stay."""
        old = (
            await store.insert_job(new_job(callback_url="https://h.example/"), idempotency_key="k")
        ).job.id
        await store.cancel(old, ttl_s=1, message="Canceled")
        clock.advance(2)
        await store.expire_due(limit=10)
        clock.advance(IDEMPOTENCY_TTL)
        kept = (await store.insert_job(new_job())).job.id
        await store.cancel(kept, ttl_s=1, message="Canceled")
        clock.advance(2)
        await store.expire_due(limit=10)
        assert 1 == await store.purge(retention_s=100, limit=10)
        assert await store.get_job(old) is None
        assert [] == await store.webhook_deliveries_of(old)
        assert await store.get_job(kept) is not None
        replay = await store.insert_job(new_job("n"), idempotency_key="k")
        assert (False, "n") == (replay.replayed, replay.job.id)

    # --- webhook deliveries ------------------------------------------------------------

    async def test_final_status_queues_one_delivery(self, store: Store) -> None:
        """A job with a callback URL gets one pending delivery when it finishes."""
        job_id = (await store.insert_job(new_job(callback_url="https://h.example/"))).job.id
        await store.cancel(job_id, ttl_s=60, message="Canceled")
        (delivery,) = await store.webhook_deliveries_of(job_id)
        assert ("job.canceled", "pending", "https://h.example/") == (
            delivery.event_type,
            delivery.status,
            delivery.url,
        )

    async def test_deliveries_are_claimed_by_one_worker_at_a_time(
        self, store: Store, clock: Clock
    ) -> None:
        """A claimed delivery is not due for anyone else until its lease runs out."""
        job_id = (await store.insert_job(new_job(callback_url="https://h.example/"))).job.id
        await store.cancel(job_id, ttl_s=60, message="Canceled")
        (claimed,) = await store.claim_webhook_deliveries("w1", 10, lease_s=30)
        assert [] == await store.claim_webhook_deliveries("w2", 10, lease_s=30)
        clock.advance(31)
        (again,) = await store.claim_webhook_deliveries("w2", 10, lease_s=30)
        assert claimed.id == again.id

    async def test_recorded_attempt_schedules_the_next(self, store: Store, clock: Clock) -> None:
        """An attempt to retry later is due again at its time; a delivered one never."""
        job_id = (await store.insert_job(new_job(callback_url="https://h.example/"))).job.id
        await store.cancel(job_id, ttl_s=60, message="Canceled")
        (delivery,) = await store.claim_webhook_deliveries("w1", 10, lease_s=30)
        await store.record_webhook_attempt(
            delivery.id, "pending", attempted=True, next_attempt_at=clock.now + 5, error="503"
        )
        assert clock.now + 5 == await store.next_webhook_attempt_at()
        clock.advance(5)
        (retry,) = await store.claim_webhook_deliveries("w1", 10, lease_s=30)
        done = await store.record_webhook_attempt(retry.id, "delivered", attempted=True)
        assert done is not None
        assert ("delivered", 2) == (done.status, done.attempts)
        assert await store.next_webhook_attempt_at() is None
        assert "payload" == await store.set_webhook_payload(retry.id, "payload")
        assert "payload" == await store.set_webhook_payload(retry.id, "other")

    # --- history -----------------------------------------------------------------------

    async def test_history_pages_newest_first_per_caller(self, store: Store, clock: Clock) -> None:
        """A caller's jobs page newest first with a cursor; others' jobs never appear."""
        mine = []
        for _ in range(5):
            mine.append((await store.insert_job(new_job(client="me"))).job)
            await store.insert_job(new_job(client="someone-else"))
            clock.advance(1)
        first = await store.list_jobs(owner="", client="me", limit=3)
        last = first[-1]
        second = await store.list_jobs(
            owner="", client="me", limit=3, before=(last.created_at, last.id)
        )
        assert [job.id for job in reversed(mine)] == [job.id for job in first + second]

    async def test_history_filters_by_status(self, store: Store) -> None:
        """The status filter keeps only the jobs in those statuses."""
        running = await self.running(store)
        await store.insert_job(new_job())
        jobs = await store.list_jobs(owner="", client="c", statuses=[JobStatus.RUNNING])
        assert [running] == [job.id for job in jobs]

    # --- cancellation is an input ------------------------------------------------------

    async def test_a_cancelled_insert_runs_whole_or_not_at_all(self, store: Store) -> None:
        """Cancelling an insert after any number of loop steps leaves the job with its key
        or neither, keeps the caller's cancellation, and the store takes the next write."""
        for steps in range(12):
            job_id = f"job-{steps}"
            task = asyncio.create_task(
                store.insert_job(new_job(job_id), idempotency_key=job_id, request_hash="h")
            )
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            (outcome,) = await asyncio.gather(task, return_exceptions=True)
            # Done before the cancel took, or cancelled: never another error.
            assert not isinstance(outcome, BaseException) or isinstance(
                outcome, asyncio.CancelledError
            ), outcome
            # A started unit may still be finishing on the writer: the next write is
            # queued behind it, so it sees the outcome.
            again = await store.insert_job(new_job(), idempotency_key=job_id, request_hash="h")
            stored = await store.get_job(job_id)
            if again.replayed:
                assert (job_id, job_id) == (again.job.id, getattr(stored, "id", None)), steps
            else:
                assert stored is None, steps


IDEMPOTENCY_TTL = 24 * 3600
