-- 4: leases, workers, kept counts, outputs and the trash.
--
-- A claimed job records the worker (process) holding it and until when; a live worker
-- renews its leases, and any process re-queues a job whose lease ran out (a stall).
ALTER TABLE jobs ADD COLUMN worker_id TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires_at REAL;
ALTER TABLE jobs ADD COLUMN stalls INTEGER NOT NULL DEFAULT 0;
-- Keys the job wrote (noted before each write); what is not its result is trashed when
-- the job finishes, so a crash, cancel or failure cannot leave an object behind.
ALTER TABLE jobs ADD COLUMN outputs TEXT;
-- Jobs a previous version left running have no lease: the first sweep takes them.
UPDATE jobs SET lease_expires_at = 0 WHERE status IN ('running', 'processing_artifacts');
CREATE INDEX jobs_lease ON jobs (lease_expires_at)
    WHERE status IN ('running', 'processing_artifacts');
CREATE INDEX jobs_worker ON jobs (worker_id)
    WHERE status IN ('running', 'processing_artifacts');

-- History is per caller: the owner (API key name, or '' when open) and the client that
-- sent the job (the key name, or the address).
UPDATE jobs SET client = owner WHERE client = '' AND owner != '';
DROP INDEX jobs_owner_history;
CREATE INDEX jobs_history ON jobs (owner, client, created_at DESC, id DESC);

CREATE TABLE workers (
    id           TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL
);

-- Kept counts, so the limits checked by every initiate and /metrics cost the same with
-- 20 or 200,000 rows in the table. Triggers keep them exact in every statement.
CREATE TABLE job_counts (
    status TEXT PRIMARY KEY,
    n      INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO job_counts (status, n) SELECT status, count(*) FROM jobs GROUP BY status;
CREATE TABLE client_active (
    client TEXT PRIMARY KEY,
    n      INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO client_active (client, n)
    SELECT client, count(*) FROM jobs
     WHERE status IN ('queued', 'running', 'processing_artifacts') GROUP BY client;

CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs
BEGIN
    INSERT INTO job_counts (status, n) VALUES (NEW.status, 1)
        ON CONFLICT (status) DO UPDATE SET n = n + 1;
    INSERT INTO client_active (client, n)
        SELECT NEW.client, 1 WHERE NEW.status IN ('queued', 'running', 'processing_artifacts')
        ON CONFLICT (client) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER jobs_count_update AFTER UPDATE OF status ON jobs
WHEN OLD.status IS NOT NEW.status
BEGIN
    UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
    INSERT INTO job_counts (status, n) VALUES (NEW.status, 1)
        ON CONFLICT (status) DO UPDATE SET n = n + 1;
    UPDATE client_active SET n = n - 1
     WHERE client = OLD.client
       AND OLD.status IN ('queued', 'running', 'processing_artifacts')
       AND NEW.status NOT IN ('queued', 'running', 'processing_artifacts');
    DELETE FROM client_active WHERE client = OLD.client AND n <= 0;
END;
CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs
BEGIN
    UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
    UPDATE client_active SET n = n - 1
     WHERE client = OLD.client AND OLD.status IN ('queued', 'running', 'processing_artifacts');
    DELETE FROM client_active WHERE client = OLD.client AND n <= 0;
END;

-- Objects to delete from storage, written in the statement that makes them garbage.
CREATE TABLE trash (
    key             TEXT PRIMARY KEY,
    job_id          TEXT,
    created_at      REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL
);
CREATE INDEX trash_due ON trash (next_attempt_at);
-- An expired job's own artifact (never a source object it passed through).
CREATE TRIGGER jobs_expired_trash AFTER UPDATE OF status ON jobs
WHEN NEW.status = 'expired' AND OLD.status IS NOT 'expired'
     AND json_extract(NEW.result, '$.owned') = 1
     AND json_extract(NEW.result, '$.key') IS NOT NULL
BEGIN
    INSERT OR IGNORE INTO trash (key, job_id, created_at, next_attempt_at)
    VALUES (json_extract(NEW.result, '$.key'), NEW.id, NEW.updated_at, NEW.updated_at);
END;
-- What a finished job wrote besides its result. A worker in another process may still be
-- finishing a write for a minute after a cancel; the deletion waits that long.
CREATE TRIGGER jobs_finished_outputs_trash AFTER UPDATE OF status ON jobs
WHEN NEW.status IN ('completed', 'failed', 'canceled')
     AND OLD.status NOT IN ('completed', 'failed', 'canceled', 'expired')
     AND NEW.outputs IS NOT NULL
BEGIN
    INSERT OR IGNORE INTO trash (key, job_id, created_at, next_attempt_at)
    SELECT value, NEW.id, NEW.updated_at, NEW.updated_at + 60
      FROM json_each(NEW.outputs)
     WHERE NEW.status != 'completed' OR value IS NOT json_extract(NEW.result, '$.key');
END;

-- Webhook deliveries are leased to the worker sending them: next_attempt_at moves to the
-- lease's end, so a sender that dies is replaced once its lease runs out.
ALTER TABLE webhook_deliveries ADD COLUMN lease_owner TEXT;
CREATE INDEX jobs_expired ON jobs (expires_at) WHERE status = 'expired';
-- The partial indexes a query can use must repeat its WHERE clause: SQLite does not see
-- that status IN (a, b, c) implies status IN (a, b, c, d).
DROP INDEX jobs_expiry;
CREATE INDEX jobs_due ON jobs (expires_at) WHERE status IN ('completed', 'failed', 'canceled');
-- Per-client counts are kept in client_active now.
DROP INDEX jobs_client_active;
-- Purging a job deletes its idempotency keys (ON DELETE CASCADE): by index, not a scan.
CREATE INDEX idempotency_keys_job ON idempotency_keys (job_id);
