-- 1: the whole schema of the PostgreSQL store, the same tables as SQLite's migrations
-- 1-4 arrived at. Times are epoch seconds (double precision), set by the application.

CREATE TABLE jobs (
    id                TEXT PRIMARY KEY,
    kind              TEXT NOT NULL,
    status            TEXT NOT NULL,
    priority          INTEGER NOT NULL,
    payload           JSONB NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    max_attempts      INTEGER NOT NULL,
    progress          JSONB NOT NULL,
    result            JSONB,
    error             JSONB,
    owner             TEXT NOT NULL DEFAULT '',
    client            TEXT NOT NULL DEFAULT '',
    user_id           TEXT,
    client_request_id TEXT,
    callback_url      TEXT,
    created_at        DOUBLE PRECISION NOT NULL,
    updated_at        DOUBLE PRECISION NOT NULL,
    started_at        DOUBLE PRECISION,
    finished_at       DOUBLE PRECISION,
    run_after         DOUBLE PRECISION NOT NULL DEFAULT 0,
    expires_at        DOUBLE PRECISION,
    worker_id         TEXT,
    lease_expires_at  DOUBLE PRECISION,
    stalls            INTEGER NOT NULL DEFAULT 0,
    outputs           JSONB
);
CREATE INDEX jobs_claim ON jobs (priority DESC, run_after, created_at) WHERE status = 'queued';
CREATE INDEX jobs_lease ON jobs (lease_expires_at)
    WHERE status IN ('running', 'processing_artifacts');
CREATE INDEX jobs_worker ON jobs (worker_id) WHERE status IN ('running', 'processing_artifacts');
CREATE INDEX jobs_history ON jobs (owner, client, created_at DESC, id DESC);
CREATE INDEX jobs_due ON jobs (expires_at) WHERE status IN ('completed', 'failed', 'canceled');
CREATE INDEX jobs_expired ON jobs (expires_at) WHERE status = 'expired';
-- The per-caller limit counts at most MAX_ACTIVE_PER_USER entries of this index.
CREATE INDEX jobs_client_active ON jobs (client)
    WHERE status IN ('queued', 'running', 'processing_artifacts');

CREATE TABLE idempotency_keys (
    owner        TEXT NOT NULL,
    key          TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    job_id       TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    created_at   DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (owner, key)
);
CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at);
CREATE INDEX idempotency_keys_job ON idempotency_keys (job_id);

CREATE TABLE webhook_deliveries (
    id               TEXT PRIMARY KEY,
    job_id           TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    event_type       TEXT NOT NULL,
    url              TEXT NOT NULL,
    payload          TEXT,
    status           TEXT NOT NULL DEFAULT 'pending',
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  DOUBLE PRECISION NOT NULL,
    last_error       TEXT,
    last_status_code INTEGER,
    created_at       DOUBLE PRECISION NOT NULL,
    updated_at       DOUBLE PRECISION NOT NULL,
    delivered_at     DOUBLE PRECISION,
    lease_owner      TEXT
);
CREATE UNIQUE INDEX webhook_deliveries_event ON webhook_deliveries (job_id, event_type);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';

CREATE TABLE workers (
    id           TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    started_at   DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE trash (
    key             TEXT PRIMARY KEY,
    job_id          TEXT,
    created_at      DOUBLE PRECISION NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX trash_due ON trash (next_attempt_at);

-- Counts by status, as deltas appended by every change (no row that every transaction
-- must lock, so no hot spot and no deadlock between replicas); the sweep folds them
-- into one row per status.
CREATE TABLE job_count_deltas (
    status TEXT NOT NULL,
    n      BIGINT NOT NULL
);

CREATE FUNCTION longdl_jobs_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO job_count_deltas (status, n) VALUES (NEW.status, 1);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO job_count_deltas (status, n) VALUES (OLD.status, -1);
        RETURN OLD;
    ELSIF OLD.status IS DISTINCT FROM NEW.status THEN
        INSERT INTO job_count_deltas (status, n) VALUES (OLD.status, -1), (NEW.status, 1);
    END IF;
    IF NEW.status IN ('completed', 'failed', 'canceled')
       AND (TG_OP = 'INSERT' OR OLD.status NOT IN ('completed', 'failed', 'canceled', 'expired'))
    THEN
        -- The webhook delivery of a final status, queued by the statement that writes it.
        IF NEW.callback_url IS NOT NULL THEN
            INSERT INTO webhook_deliveries
                (id, job_id, event_type, url, next_attempt_at, created_at, updated_at)
            VALUES ('msg_' || replace(gen_random_uuid()::text, '-', ''), NEW.id,
                    'job.' || NEW.status, NEW.callback_url, NEW.updated_at, NEW.updated_at,
                    NEW.updated_at)
            ON CONFLICT (job_id, event_type) DO NOTHING;
        END IF;
        -- What the job wrote besides its result; a worker elsewhere may be finishing a
        -- write for a minute after a cancel, so the deletion waits that long.
        IF NEW.outputs IS NOT NULL THEN
            INSERT INTO trash (key, job_id, created_at, next_attempt_at)
            SELECT value, NEW.id, NEW.updated_at, NEW.updated_at + 60
              FROM jsonb_array_elements_text(NEW.outputs) AS value
             WHERE NEW.status <> 'completed' OR value IS DISTINCT FROM NEW.result ->> 'key'
            ON CONFLICT (key) DO NOTHING;
        END IF;
    END IF;
    IF NEW.status = 'expired' AND TG_OP = 'UPDATE' AND OLD.status <> 'expired'
       AND coalesce((NEW.result ->> 'owned')::boolean, false)
       AND NEW.result ->> 'key' IS NOT NULL
    THEN
        INSERT INTO trash (key, job_id, created_at, next_attempt_at)
        VALUES (NEW.result ->> 'key', NEW.id, NEW.updated_at, NEW.updated_at)
        ON CONFLICT (key) DO NOTHING;
    END IF;
    -- Every replica listens: long-polls, event streams and waits hear changes made
    -- anywhere, dispatchers hear new work. Lease renewals alone say nothing.
    IF TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM NEW.status
       OR OLD.progress IS DISTINCT FROM NEW.progress
       OR OLD.run_after IS DISTINCT FROM NEW.run_after
    THEN
        PERFORM pg_notify('longdl_jobs', NEW.id || ' ' || NEW.status);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER jobs_changed AFTER INSERT OR UPDATE OR DELETE ON jobs
    FOR EACH ROW EXECUTE FUNCTION longdl_jobs_changed();
