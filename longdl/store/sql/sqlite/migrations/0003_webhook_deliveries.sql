-- 3: webhook deliveries. The trigger queues one when a job with a callback URL reaches
-- a final status, inside the very statement that writes that status: a process
-- that dies right after the status commit cannot lose the delivery, and every path
-- to a final status (complete, fail, cancel, any future one) is covered.
CREATE TABLE webhook_deliveries (
    id               TEXT PRIMARY KEY,
    job_id           TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    event_type       TEXT NOT NULL,
    url              TEXT NOT NULL,
    payload          TEXT,
    status           TEXT NOT NULL DEFAULT 'pending',
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL NOT NULL,
    last_error       TEXT,
    last_status_code INTEGER,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    delivered_at     REAL
);
CREATE UNIQUE INDEX webhook_deliveries_event ON webhook_deliveries (job_id, event_type);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE TRIGGER jobs_finished_webhook AFTER UPDATE OF status ON jobs
WHEN NEW.callback_url IS NOT NULL
     AND NEW.status IN ('completed', 'failed', 'canceled')
     AND OLD.status NOT IN ('completed', 'failed', 'canceled', 'expired')
BEGIN
    INSERT OR IGNORE INTO webhook_deliveries
        (id, job_id, event_type, url, next_attempt_at, created_at, updated_at)
    VALUES ('msg_' || lower(hex(randomblob(16))), NEW.id, 'job.' || NEW.status,
            NEW.callback_url, NEW.updated_at, NEW.updated_at, NEW.updated_at);
END;
