-- 2: who sent the job (API key name, else client address), for per-caller limits even
-- when the service is open and every job has the same owner.
ALTER TABLE jobs ADD COLUMN client TEXT NOT NULL DEFAULT '';
DROP INDEX jobs_active;
CREATE INDEX jobs_client_active ON jobs (client)
    WHERE status IN ('queued', 'running', 'processing_artifacts');
