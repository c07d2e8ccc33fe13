-- The SQLite store's statements, by name (longdl/store/queries.py reads this file).
--
-- Every statement here runs under a test that asks EXPLAIN QUERY PLAN and fails on a
-- full scan of a table, so none costs more as the tables grow; a `-- scan:` line names
-- the reason where a scan is fine (a table of one row per process, say).
--
-- No FOR UPDATE SKIP LOCKED here: SQLite has one writer at a time, so a claim's
-- SELECT and UPDATE see the same rows and no other process can take them in between.

-- name: get_job
SELECT * FROM jobs WHERE id = :id;

-- name: list_jobs
SELECT * FROM jobs
 WHERE owner = :owner AND client = :client
   AND (:user_id IS NULL OR user_id = :user_id)
   AND (:statuses IS NULL OR status IN (SELECT value FROM json_each(:statuses)))
 ORDER BY created_at DESC, id DESC
 LIMIT :limit;

-- name: list_jobs_before
SELECT * FROM jobs
 WHERE owner = :owner AND client = :client
   AND (created_at, id) < (:before_at, :before_id)
   AND (:user_id IS NULL OR user_id = :user_id)
   AND (:statuses IS NULL OR status IN (SELECT value FROM json_each(:statuses)))
 ORDER BY created_at DESC, id DESC
 LIMIT :limit;

-- name: count_by_status
-- scan: job_counts holds one row per status
SELECT status, n FROM job_counts;

-- name: queued_count
SELECT n FROM job_counts WHERE status = 'queued';

-- name: insert_counts
-- What an insert checks, in one statement: jobs waiting, and the caller's unfinished ones.
SELECT coalesce((SELECT n FROM job_counts WHERE status = 'queued'), 0) AS queued,
       coalesce((SELECT n FROM client_active WHERE client = :client), 0) AS active;

-- name: next_run_after
-- One seek per priority: min() over the whole claim index would walk every queued job.
SELECT min(m) FROM (
    SELECT min(run_after) AS m FROM jobs WHERE status = 'queued' AND priority = 2
    UNION ALL
    SELECT min(run_after) FROM jobs WHERE status = 'queued' AND priority = 1
    UNION ALL
    SELECT min(run_after) FROM jobs WHERE status = 'queued' AND priority = 0
);

-- name: delete_stale_key
DELETE FROM idempotency_keys WHERE owner = :owner AND key = :key AND created_at < :stale_before;

-- name: find_key
SELECT job_id, request_hash FROM idempotency_keys WHERE owner = :owner AND key = :key;

-- name: insert_job
INSERT INTO jobs (id, kind, status, priority, payload, attempts, max_attempts, progress,
                  owner, client, user_id, client_request_id, callback_url, created_at,
                  updated_at, run_after, expires_at)
VALUES (:id, :kind, 'queued', :priority, :payload, 0, :max_attempts, :progress, :owner,
        :client, :user_id, :client_request_id, :callback_url, :now, :now, :now, :expires_at);

-- name: insert_job_claimed
-- A job claimed by the transaction that inserts it (nothing else was waiting).
INSERT INTO jobs (id, kind, status, priority, payload, attempts, max_attempts, progress,
                  owner, client, user_id, client_request_id, callback_url, created_at,
                  updated_at, started_at, run_after, expires_at, worker_id, lease_expires_at)
VALUES (:id, :kind, 'running', :priority, :payload, 1, :max_attempts, :progress, :owner,
        :client, :user_id, :client_request_id, :callback_url, :now, :now, :now, :now,
        :expires_at, :worker_id, :lease_until);

-- name: insert_key
INSERT INTO idempotency_keys (owner, key, request_hash, job_id, created_at)
VALUES (:owner, :key, :request_hash, :job_id, :now);

-- name: register_worker
INSERT INTO workers (id, host, pid, started_at, heartbeat_at)
VALUES (:id, :host, :pid, :now, :now)
    ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at;

-- name: unregister_worker
DELETE FROM workers WHERE id = :id;

-- name: workers
-- scan: workers holds one row per process
SELECT id, heartbeat_at FROM workers;

-- name: forget_stale_workers
-- scan: workers holds one row per process
DELETE FROM workers WHERE heartbeat_at < :before;

-- name: beat
UPDATE workers SET heartbeat_at = :now WHERE id = :id;

-- name: claim
UPDATE jobs
   SET status = 'running', attempts = attempts + 1, started_at = :now, updated_at = :now,
       worker_id = :worker_id, lease_expires_at = :lease_until
 WHERE id IN (SELECT id FROM jobs
               WHERE status = 'queued' AND run_after <= :now
               ORDER BY priority DESC, run_after, created_at
               LIMIT :limit)
RETURNING *;

-- name: save_progress
UPDATE jobs SET progress = :progress, updated_at = :now
 WHERE id = :id AND worker_id = :worker_id
   AND status IN ('running', 'processing_artifacts');

-- name: renew_leases
UPDATE jobs SET lease_expires_at = :lease_until
 WHERE worker_id = :worker_id AND status IN ('running', 'processing_artifacts')
RETURNING id;

-- name: drop_leases_of
-- A worker known dead (its lock is free) gives up its leases now, not LEASE_S later.
UPDATE jobs SET lease_expires_at = 0
 WHERE worker_id = :worker_id AND status IN ('running', 'processing_artifacts');

-- name: drop_webhook_leases_of
-- Deliveries a dead worker had in flight are due now, not when their lease runs out.
UPDATE webhook_deliveries SET next_attempt_at = :now, lease_owner = NULL
 WHERE status = 'pending' AND lease_owner = :worker_id;

-- name: stalled
SELECT * FROM jobs
 WHERE status IN ('running', 'processing_artifacts') AND lease_expires_at < :now
   AND worker_id IS NOT :exclude
 ORDER BY lease_expires_at
 LIMIT :limit;

-- name: requeue_stalled
-- The attempt is given back: a stall is counted instead (MAX_STALLS).
UPDATE jobs
   SET status = 'queued', worker_id = NULL, lease_expires_at = NULL, stalls = stalls + 1,
       attempts = max(attempts - 1, 0), run_after = :now, updated_at = :now,
       progress = :progress
 WHERE id = :id AND status IN ('running', 'processing_artifacts') AND lease_expires_at < :now
RETURNING *;

-- name: fail_stalled
UPDATE jobs
   SET status = 'failed', lease_expires_at = NULL, stalls = stalls + 1, error = :error,
       progress = :progress, finished_at = :now, expires_at = :expires_at, updated_at = :now
 WHERE id = :id AND status IN ('running', 'processing_artifacts') AND lease_expires_at < :now
RETURNING *;

-- name: set_status
UPDATE jobs SET status = :status, progress = :progress, updated_at = :now
 WHERE id = :id AND worker_id = :worker_id AND status IN ('running', 'processing_artifacts')
RETURNING *;

-- name: add_output
-- A row when the worker still holds the job (the key noted now or before), none if not.
UPDATE jobs
   SET outputs = CASE WHEN EXISTS (SELECT 1 FROM json_each(coalesce(jobs.outputs, '[]'))
                                    WHERE value = :key)
                      THEN outputs
                      ELSE json_insert(coalesce(outputs, '[]'), '$[#]', :key) END
 WHERE id = :id AND worker_id = :worker_id AND status IN ('running', 'processing_artifacts')
RETURNING id;

-- name: complete
UPDATE jobs
   SET status = 'completed', result = :result, error = NULL, progress = :progress,
       finished_at = :now, expires_at = :expires_at, updated_at = :now,
       lease_expires_at = NULL
 WHERE id = :id AND worker_id = :worker_id AND status IN ('running', 'processing_artifacts')
RETURNING *;

-- name: fail
UPDATE jobs
   SET status = 'failed', error = :error, progress = :progress, finished_at = :now,
       expires_at = :expires_at, updated_at = :now, lease_expires_at = NULL
 WHERE id = :id AND worker_id = :worker_id AND status IN ('running', 'processing_artifacts')
RETURNING *;

-- name: retry_later
UPDATE jobs
   SET status = 'queued', run_after = :run_after, error = :error, progress = :progress,
       updated_at = :now, worker_id = NULL, lease_expires_at = NULL
 WHERE id = :id AND worker_id = :worker_id AND status IN ('running', 'processing_artifacts')
RETURNING *;

-- name: release
UPDATE jobs
   SET status = 'queued', attempts = max(attempts - 1, 0), run_after = :now,
       updated_at = :now, progress = :progress, worker_id = NULL, lease_expires_at = NULL
 WHERE id = :id AND worker_id = :worker_id AND status IN ('running', 'processing_artifacts')
RETURNING *;

-- name: release_all
UPDATE jobs
   SET status = 'queued', attempts = max(attempts - 1, 0), run_after = :now,
       updated_at = :now, worker_id = NULL, lease_expires_at = NULL,
       progress = json_set(progress, '$.message', :message, '$.percent', 0.0)
 WHERE worker_id = :worker_id AND status IN ('running', 'processing_artifacts')
RETURNING id;

-- name: cancel
UPDATE jobs
   SET status = 'canceled', error = :error, progress = json_set(progress, '$.message', :message),
       finished_at = :now, expires_at = :expires_at, updated_at = :now,
       lease_expires_at = NULL
 WHERE id = :id
   AND (status = 'queued' OR status = 'running' OR status = 'processing_artifacts')
RETURNING *;

-- name: expire_due
-- The status test repeats jobs_due's WHERE clause (migration 5) so the index serves it.
UPDATE jobs SET status = 'expired', updated_at = :now
 WHERE id IN (SELECT id FROM jobs
               WHERE (status = 'completed' OR status = 'failed' OR status = 'canceled')
                 AND expires_at <= :now
               ORDER BY expires_at
               LIMIT :limit)
RETURNING *;

-- name: purge_jobs
DELETE FROM jobs
 WHERE id IN (SELECT id FROM jobs
               WHERE status = 'expired' AND expires_at < :before
               ORDER BY expires_at
               LIMIT :limit)
RETURNING id;

-- name: purge_keys
DELETE FROM idempotency_keys
 WHERE rowid IN (SELECT rowid FROM idempotency_keys
                  WHERE created_at < :before
                  ORDER BY created_at
                  LIMIT :limit);

-- name: claim_trash
UPDATE trash SET next_attempt_at = :lease_until
 WHERE key IN (SELECT key FROM trash
                WHERE next_attempt_at <= :now
                ORDER BY next_attempt_at
                LIMIT :limit)
RETURNING key, job_id, attempts;

-- name: trash_late_output
INSERT OR IGNORE INTO trash (key, job_id, created_at, next_attempt_at)
SELECT :key, id, :now, :now FROM jobs
 WHERE id = :id
   AND (status = 'completed' OR status = 'failed' OR status = 'canceled'
        OR status = 'expired')
   AND :key IS NOT json_extract(result, '$.key')
RETURNING key;

-- name: trash_done
DELETE FROM trash WHERE key = :key;

-- name: trash_retry
UPDATE trash SET attempts = attempts + 1, next_attempt_at = :next_attempt_at WHERE key = :key;

-- name: claim_webhook_deliveries
-- The lease is next_attempt_at itself: until it passes, no one else finds the delivery due.
UPDATE webhook_deliveries SET lease_owner = :worker_id, next_attempt_at = :lease_until
 WHERE id IN (SELECT id FROM webhook_deliveries
               WHERE status = 'pending' AND next_attempt_at <= :now
               ORDER BY next_attempt_at
               LIMIT :limit)
RETURNING *;

-- name: next_webhook_attempt_at
SELECT next_attempt_at FROM webhook_deliveries
 WHERE status = 'pending'
 ORDER BY next_attempt_at
 LIMIT 1;

-- name: webhook_deliveries_of
SELECT * FROM webhook_deliveries WHERE job_id = :job_id ORDER BY created_at, id;

-- name: set_webhook_payload
UPDATE webhook_deliveries SET payload = coalesce(payload, :payload) WHERE id = :id
RETURNING payload;

-- name: record_webhook_attempt
UPDATE webhook_deliveries
   SET status = :status, attempts = attempts + :attempted,
       next_attempt_at = coalesce(:next_attempt_at, next_attempt_at), last_error = :error,
       last_status_code = coalesce(:status_code, last_status_code), updated_at = :now,
       delivered_at = CASE WHEN :status = 'delivered' THEN :now END, lease_owner = NULL
 WHERE id = :id AND status = 'pending'
RETURNING *;

-- name: count_webhook_deliveries
-- scan: tests and tools only, never on a request or in a loop
SELECT status, count(*) AS n FROM webhook_deliveries GROUP BY status;
