-- 2: an insert in one round trip. It was five statements (the advisory lock, the counts,
-- the insert, and the savepoint around them): every replica's writer waited for each in
-- turn while holding the lock that all inserts take, so a cluster took about 800 jobs/s
-- however many replicas it had.
--
-- Every statement in here reads a fresh snapshot (READ COMMITTED), so the counts taken
-- after the lock see every insert committed before it. The block with an EXCEPTION clause
-- is a subtransaction, what the savepoint was: a failed insert undoes its own statements
-- and leaves the rest of its writer's batch standing; it comes back as error_code and
-- error_message.
CREATE FUNCTION longdl_insert_job(
    p_id TEXT, p_kind TEXT, p_priority INTEGER, p_payload JSONB, p_max_attempts INTEGER,
    p_progress JSONB, p_owner TEXT, p_client TEXT, p_user_id TEXT,
    p_client_request_id TEXT, p_callback_url TEXT, p_now DOUBLE PRECISION,
    p_expires_at DOUBLE PRECISION,
    -- The idempotency key (NULL: none), its request's hash, and when older keys lapse.
    p_key TEXT, p_request_hash TEXT, p_stale_before DOUBLE PRECISION,
    -- Counted up to these; with p_limited, a count at its bound refuses the insert.
    p_limited BOOLEAN, p_most_queued INTEGER, p_most_active INTEGER,
    -- Claim the job for this worker when nothing else waits (NULL: never).
    p_worker_id TEXT, p_lease_until DOUBLE PRECISION,
    OUT replayed BOOLEAN, OUT request_hash TEXT, OUT queued BIGINT, OUT active BIGINT,
    OUT error_code TEXT, OUT error_message TEXT, OUT job jobs)
LANGUAGE plpgsql AS $$
DECLARE
    kept idempotency_keys%ROWTYPE;
    claimed BOOLEAN;
BEGIN
    replayed := false;
    BEGIN
        -- Inserts of all replicas take turns (held to the end of the writer's batch), so
        -- the limits and idempotency keys they check hold exactly, across replicas.
        PERFORM pg_advisory_xact_lock(7202407110);
        IF p_key IS NOT NULL THEN
            DELETE FROM idempotency_keys
             WHERE owner = p_owner AND key = p_key AND created_at < p_stale_before;
            SELECT * INTO kept FROM idempotency_keys WHERE owner = p_owner AND key = p_key;
            IF FOUND THEN
                replayed := true;
                request_hash := kept.request_hash;
                SELECT * INTO job FROM jobs WHERE id = kept.job_id;
                RETURN;
            END IF;
        END IF;
        -- Jobs waiting and the caller's unfinished ones, each counted up to its bound (at
        -- most that many entries of an index).
        SELECT count(*) INTO queued
          FROM (SELECT 1 FROM jobs WHERE status = 'queued' LIMIT p_most_queued) AS waiting;
        SELECT count(*) INTO active
          FROM (SELECT 1 FROM jobs
                 WHERE client = p_client
                   AND status IN ('queued', 'running', 'processing_artifacts')
                 LIMIT p_most_active) AS unfinished;
        IF p_limited AND (queued >= p_most_queued OR active >= p_most_active) THEN
            RETURN;  -- job stays NULL: the caller says which limit
        END IF;
        claimed := p_worker_id IS NOT NULL AND queued = 0;
        INSERT INTO jobs (id, kind, status, priority, payload, attempts, max_attempts,
                          progress, owner, client, user_id, client_request_id, callback_url,
                          created_at, updated_at, started_at, run_after, expires_at,
                          worker_id, lease_expires_at)
        VALUES (p_id, p_kind, CASE WHEN claimed THEN 'running' ELSE 'queued' END,
                p_priority, p_payload, CASE WHEN claimed THEN 1 ELSE 0 END, p_max_attempts,
                p_progress, p_owner, p_client, p_user_id, p_client_request_id,
                p_callback_url, p_now, p_now, CASE WHEN claimed THEN p_now END, p_now,
                p_expires_at, CASE WHEN claimed THEN p_worker_id END,
                CASE WHEN claimed THEN p_lease_until END)
        RETURNING * INTO job;
        IF p_key IS NOT NULL THEN
            INSERT INTO idempotency_keys (owner, key, request_hash, job_id, created_at)
            VALUES (p_owner, p_key, p_request_hash, p_id, p_now);
        END IF;
    EXCEPTION WHEN OTHERS THEN
        error_code := SQLSTATE;
        error_message := SQLERRM;
        job := NULL;
        replayed := false;
    END;
END
$$;
