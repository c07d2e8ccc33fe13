-- 5: no list of three or more constants after IN where every write tests it.
--
-- SQLite (3.40) builds a temporary b-tree for `x IN (a, b, c)` each time a statement
-- evaluates it (about 5 us), unless the list has at most two values; an insert and the
-- completion of a job evaluated nine such lists, in triggers and a partial index. The
-- same tests written as `x = a OR x = b OR x = c` are compared in place. Behaviour is
-- unchanged: status is never NULL.
DROP TRIGGER jobs_finished_webhook;
CREATE TRIGGER jobs_finished_webhook AFTER UPDATE OF status ON jobs
WHEN NEW.callback_url IS NOT NULL
     AND (NEW.status = 'completed' OR NEW.status = 'failed' OR NEW.status = 'canceled')
     AND NOT (OLD.status = 'completed' OR OLD.status = 'failed' OR OLD.status = 'canceled'
              OR OLD.status = 'expired')
BEGIN
    INSERT OR IGNORE INTO webhook_deliveries
        (id, job_id, event_type, url, next_attempt_at, created_at, updated_at)
    VALUES ('msg_' || lower(hex(randomblob(16))), NEW.id, 'job.' || NEW.status,
            NEW.callback_url, NEW.updated_at, NEW.updated_at, NEW.updated_at);
END;

DROP TRIGGER jobs_count_insert;
CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs
BEGIN
    INSERT INTO job_counts (status, n) VALUES (NEW.status, 1)
        ON CONFLICT (status) DO UPDATE SET n = n + 1;
    INSERT INTO client_active (client, n)
        SELECT NEW.client, 1
         WHERE NEW.status = 'queued' OR NEW.status = 'running'
               OR NEW.status = 'processing_artifacts'
        ON CONFLICT (client) DO UPDATE SET n = n + 1;
END;

DROP TRIGGER jobs_count_update;
CREATE TRIGGER jobs_count_update AFTER UPDATE OF status ON jobs
WHEN OLD.status IS NOT NEW.status
BEGIN
    UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
    INSERT INTO job_counts (status, n) VALUES (NEW.status, 1)
        ON CONFLICT (status) DO UPDATE SET n = n + 1;
    UPDATE client_active SET n = n - 1
     WHERE client = OLD.client
       AND (OLD.status = 'queued' OR OLD.status = 'running'
            OR OLD.status = 'processing_artifacts')
       AND NOT (NEW.status = 'queued' OR NEW.status = 'running'
                OR NEW.status = 'processing_artifacts');
    DELETE FROM client_active WHERE client = OLD.client AND n <= 0;
END;

DROP TRIGGER jobs_count_delete;
CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs
BEGIN
    UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
    UPDATE client_active SET n = n - 1
     WHERE client = OLD.client
       AND (OLD.status = 'queued' OR OLD.status = 'running'
            OR OLD.status = 'processing_artifacts');
    DELETE FROM client_active WHERE client = OLD.client AND n <= 0;
END;

DROP TRIGGER jobs_finished_outputs_trash;
CREATE TRIGGER jobs_finished_outputs_trash AFTER UPDATE OF status ON jobs
WHEN NEW.outputs IS NOT NULL
     AND (NEW.status = 'completed' OR NEW.status = 'failed' OR NEW.status = 'canceled')
     AND NOT (OLD.status = 'completed' OR OLD.status = 'failed' OR OLD.status = 'canceled'
              OR OLD.status = 'expired')
BEGIN
    INSERT OR IGNORE INTO trash (key, job_id, created_at, next_attempt_at)
    SELECT value, NEW.id, NEW.updated_at, NEW.updated_at + 60
      FROM json_each(NEW.outputs)
     WHERE NEW.status != 'completed' OR value IS NOT json_extract(NEW.result, '$.key');
END;

-- expire_due repeats this WHERE clause word for word, or SQLite would not use the index.
DROP INDEX jobs_due;
CREATE INDEX jobs_due ON jobs (expires_at)
    WHERE status = 'completed' OR status = 'failed' OR status = 'canceled';
