-- 1: jobs and idempotency keys.
CREATE TABLE jobs (
    id                TEXT PRIMARY KEY,
    kind              TEXT NOT NULL,
    status            TEXT NOT NULL,
    priority          INTEGER NOT NULL,
    payload           TEXT NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    max_attempts      INTEGER NOT NULL,
    progress          TEXT NOT NULL,
    result            TEXT,
    error             TEXT,
    owner             TEXT NOT NULL DEFAULT '',
    user_id           TEXT,
    client_request_id TEXT,
    callback_url      TEXT,
    created_at        REAL NOT NULL,
    updated_at        REAL NOT NULL,
    started_at        REAL,
    finished_at       REAL,
    run_after         REAL NOT NULL DEFAULT 0,
    expires_at        REAL
);
CREATE INDEX jobs_claim ON jobs (priority DESC, run_after, created_at)
    WHERE status = 'queued';
CREATE INDEX jobs_expiry ON jobs (expires_at)
    WHERE status IN ('completed', 'failed', 'canceled', 'expired');
CREATE INDEX jobs_owner_history ON jobs (owner, created_at DESC, id DESC);
CREATE INDEX jobs_active ON jobs (owner, status)
    WHERE status IN ('queued', 'running', 'processing_artifacts');
CREATE TABLE idempotency_keys (
    owner        TEXT NOT NULL,
    key          TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    job_id       TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    created_at   REAL NOT NULL,
    PRIMARY KEY (owner, key)
);
CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at);
