-- 2: an insert in one round trip, its limits checked from kept counts.
--
-- An insert was five statements (the savepoint, the advisory lock, the counts, the insert,
-- the release), and every replica's writer waited for each in turn while holding the lock
-- that all inserts take; the counts walked every waiting job and every unfinished job of
-- the caller, up to MAX_QUEUED and MAX_ACTIVE_PER_USER. A cluster took about 800 jobs/s
-- however many replicas it had, fewer as the queue grew.
--
-- Now the counts are sums of deltas: job_count_deltas by status (migration 1), and
-- client_active_deltas, +1 when a caller's job becomes unfinished and -1 when it stops
-- being so. An insert folds the rows it sums into one once there are more than 64
-- of them, so a sum reads a few dozen rows however long the queue is. Folds
-- (here and in the sweep's compact_counts) take the inserts' advisory lock first: one at
-- a time, and never waiting for a row while holding it against another fold.

-- Pending deltas per caller; folded as job_count_deltas are.
CREATE TABLE client_active_deltas (
    client TEXT NOT NULL,
    n      BIGINT NOT NULL
);
CREATE INDEX client_active_deltas_client ON client_active_deltas (client);
CREATE INDEX job_count_deltas_status ON job_count_deltas (status);
-- The counts walked this index; nothing reads it now.
DROP INDEX jobs_client_active;

CREATE FUNCTION longdl_client_active_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' AND OLD.status IN ('queued', 'running', 'processing_artifacts') THEN
        INSERT INTO client_active_deltas (client, n) VALUES (OLD.client, -1);
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.status IN ('queued', 'running', 'processing_artifacts') THEN
        INSERT INTO client_active_deltas (client, n) VALUES (NEW.client, 1);
    END IF;
    RETURN NULL;
END
$$;
-- Only changes into or out of the unfinished states write a delta: a claim (queued ->
-- running) or a retry (running -> queued) writes none.
CREATE TRIGGER jobs_client_active_insert AFTER INSERT ON jobs FOR EACH ROW
    WHEN (NEW.status IN ('queued', 'running', 'processing_artifacts'))
    EXECUTE FUNCTION longdl_client_active_changed();
CREATE TRIGGER jobs_client_active_update AFTER UPDATE OF status, client ON jobs FOR EACH ROW
    WHEN ((OLD.status IN ('queued', 'running', 'processing_artifacts'))
              IS DISTINCT FROM (NEW.status IN ('queued', 'running', 'processing_artifacts'))
          OR (OLD.client IS DISTINCT FROM NEW.client
              AND NEW.status IN ('queued', 'running', 'processing_artifacts')))
    EXECUTE FUNCTION longdl_client_active_changed();
CREATE TRIGGER jobs_client_active_delete AFTER DELETE ON jobs FOR EACH ROW
    WHEN (OLD.status IN ('queued', 'running', 'processing_artifacts'))
    EXECUTE FUNCTION longdl_client_active_changed();

-- The unfinished jobs there are now, counted once; no job changes until this commits.
LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE;
INSERT INTO client_active_deltas (client, n)
SELECT client, count(*) FROM jobs
 WHERE status IN ('queued', 'running', 'processing_artifacts')
 GROUP BY client;

-- The sum of a status's deltas, folding them into one row when there are many.
CREATE FUNCTION longdl_status_count(p_status TEXT) RETURNS BIGINT LANGUAGE plpgsql AS $$
DECLARE
    total BIGINT;
    kept BIGINT;
BEGIN
    SELECT coalesce(sum(n), 0), count(*) INTO total, kept
      FROM job_count_deltas WHERE status = p_status;
    IF kept > 64 THEN
        WITH gone AS (DELETE FROM job_count_deltas WHERE status = p_status RETURNING n)
        INSERT INTO job_count_deltas (status, n)
        SELECT p_status, sum(n) FROM gone HAVING sum(n) <> 0;
    END IF;
    RETURN total;
END
$$;

-- The same for a caller's unfinished jobs.
CREATE FUNCTION longdl_client_active(p_client TEXT) RETURNS BIGINT LANGUAGE plpgsql AS $$
DECLARE
    total BIGINT;
    kept BIGINT;
BEGIN
    SELECT coalesce(sum(n), 0), count(*) INTO total, kept
      FROM client_active_deltas WHERE client = p_client;
    IF kept > 64 THEN
        WITH gone AS (DELETE FROM client_active_deltas WHERE client = p_client RETURNING n)
        INSERT INTO client_active_deltas (client, n)
        SELECT p_client, sum(n) FROM gone HAVING sum(n) <> 0;
    END IF;
    RETURN total;
END
$$;

-- Every statement in the insert reads a fresh snapshot (READ COMMITTED), so the counts
-- taken after the lock see every change committed before it. The block with an EXCEPTION
-- clause is a subtransaction, what the savepoint was: a failed insert undoes its own
-- statements and leaves the rest of its writer's batch standing; it comes back as
-- error_code and error_message.
CREATE FUNCTION longdl_insert_job(
    p_id TEXT, p_kind TEXT, p_priority INTEGER, p_payload JSONB, p_max_attempts INTEGER,
    p_progress JSONB, p_owner TEXT, p_client TEXT, p_user_id TEXT,
    p_client_request_id TEXT, p_callback_url TEXT, p_now DOUBLE PRECISION,
    p_expires_at DOUBLE PRECISION,
    -- The idempotency key (NULL: none), its request's hash, and when older keys lapse.
    p_key TEXT, p_request_hash TEXT, p_stale_before DOUBLE PRECISION,
    -- With p_limited, MAX_QUEUED and MAX_ACTIVE_PER_USER: a count at its limit refuses.
    p_limited BOOLEAN, p_max_queued INTEGER, p_max_active INTEGER,
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
        -- Jobs waiting (also for the claim below) and the caller's unfinished ones.
        queued := longdl_status_count('queued');
        active := CASE WHEN p_limited THEN longdl_client_active(p_client) ELSE 0 END;
        IF p_limited AND (queued >= p_max_queued OR active >= p_max_active) THEN
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
