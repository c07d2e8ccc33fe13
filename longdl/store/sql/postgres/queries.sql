-- The PostgreSQL store's statements, by name (longdl/store/queries.py reads this file);
-- ``:name`` parameters become asyncpg's $1, $2, ... in order of first use.
--
-- Claims and sweeps take rows FOR UPDATE SKIP LOCKED: replicas never wait for each
-- other's rows, and none takes a row another is taking.

-- name: get_job
SELECT * FROM jobs WHERE id = :id;

-- name: list_jobs
SELECT * FROM jobs
 WHERE owner = :owner AND client = :client
   AND (:user_id::text IS NULL OR user_id = :user_id)
   AND (:statuses::jsonb IS NULL OR status IN (SELECT jsonb_array_elements_text(:statuses)))
 ORDER BY created_at DESC, id DESC
 LIMIT :limit;

-- name: list_jobs_before
SELECT * FROM jobs
 WHERE owner = :owner AND client = :client
   AND (created_at, id) < (:before_at::double precision, :before_id::text)
   AND (:user_id::text IS NULL OR user_id = :user_id)
   AND (:statuses::jsonb IS NULL OR status IN (SELECT jsonb_array_elements_text(:statuses)))
 ORDER BY created_at DESC, id DESC
 LIMIT :limit;

-- name: count_by_status
SELECT status, sum(n)::bigint AS n FROM job_count_deltas GROUP BY status;

-- name: lock_inserts
-- What folds of kept counts take first (migration 2 says why).
SELECT pg_advisory_xact_lock(7202407110);

-- name: compact_counts
WITH gone AS (DELETE FROM job_count_deltas RETURNING status, n)
INSERT INTO job_count_deltas (status, n)
SELECT status, sum(n) FROM gone GROUP BY status HAVING sum(n) <> 0;

-- name: compact_client_counts
WITH gone AS (DELETE FROM client_active_deltas RETURNING client, n)
INSERT INTO client_active_deltas (client, n)
SELECT client, sum(n) FROM gone GROUP BY client HAVING sum(n) <> 0;

-- name: next_run_after
SELECT min(run_after) FROM jobs WHERE status = 'queued';

-- name: insert_job
-- The whole insert in one round trip (migration 2 says how): the job row, NULL when a
-- limit refused it, or the job an idempotency key already names (replayed).
SELECT r.replayed, r.request_hash, r.queued, r.active, r.error_code, r.error_message,
       (r.job).*
  FROM longdl_insert_job(:id, :kind, :priority, :payload::jsonb, :max_attempts,
                         :progress::jsonb, :owner, :client, :user_id, :client_request_id,
                         :callback_url, :now, :expires_at, :key, :request_hash,
                         :stale_before, :limited, :max_queued, :max_active, :worker_id,
                         :lease_until) AS r;

-- name: register_worker
INSERT INTO workers (id, host, pid, started_at, heartbeat_at)
VALUES (:id, :host, :pid, :now, :now)
    ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at;

-- name: unregister_worker
DELETE FROM workers WHERE id = :id;

-- name: notify_webhooks_due
-- Sent at commit: the other replicas' webhook workers look for due deliveries now.
SELECT pg_notify(:channel, :payload);

-- name: workers
SELECT id, heartbeat_at FROM workers;

-- name: connected_workers
-- Each replica's connections carry its worker id as application_name; a replica that
-- died (however it died) has none left.
SELECT DISTINCT application_name FROM pg_stat_activity WHERE datname = current_database();

-- name: forget_stale_workers
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
               LIMIT :limit
               FOR UPDATE SKIP LOCKED)
RETURNING *;

-- name: save_progress
UPDATE jobs SET progress = :progress::jsonb, updated_at = :now
 WHERE id = :id AND worker_id = :worker_id
   AND status IN ('running', 'processing_artifacts');

-- name: renew_leases
UPDATE jobs SET lease_expires_at = :lease_until
 WHERE worker_id = :worker_id AND status IN ('running', 'processing_artifacts')
RETURNING id;

-- name: drop_leases_of
UPDATE jobs SET lease_expires_at = 0
 WHERE worker_id = :worker_id AND status IN ('running', 'processing_artifacts');

-- name: drop_webhook_leases_of
-- Deliveries a dead worker had in flight are due now, not when their lease runs out.
UPDATE webhook_deliveries SET next_attempt_at = :now, lease_owner = NULL
 WHERE status = 'pending' AND lease_owner = :worker_id
RETURNING id;

-- name: stalled
SELECT * FROM jobs
 WHERE status IN ('running', 'processing_artifacts') AND lease_expires_at < :now
   AND worker_id IS DISTINCT FROM :exclude::text
 ORDER BY lease_expires_at
 LIMIT :limit
 FOR UPDATE SKIP LOCKED;

-- name: requeue_stalled
UPDATE jobs
   SET status = 'queued', worker_id = NULL, lease_expires_at = NULL, stalls = stalls + 1,
       attempts = greatest(attempts - 1, 0), run_after = :now, updated_at = :now,
       progress = :progress::jsonb
 WHERE id = :id AND status IN ('running', 'processing_artifacts') AND lease_expires_at < :now
RETURNING *;

-- name: fail_stalled
UPDATE jobs
   SET status = 'failed', lease_expires_at = NULL, stalls = stalls + 1,
       error = :error::jsonb, progress = :progress::jsonb, finished_at = :now,
       expires_at = :expires_at, updated_at = :now
 WHERE id = :id AND status IN ('running', 'processing_artifacts') AND lease_expires_at < :now
RETURNING *;

-- name: set_status
UPDATE jobs SET status = :status, progress = :progress::jsonb, updated_at = :now
 WHERE id = :id AND worker_id = :worker_id AND status IN ('running', 'processing_artifacts')
RETURNING *;

-- name: add_output
-- A row when the worker still holds the job (the key noted now or before), none if not.
UPDATE jobs
   SET outputs = CASE WHEN coalesce(outputs, '[]'::jsonb) @> to_jsonb(ARRAY[:key::text])
                      THEN outputs
                      ELSE coalesce(outputs, '[]'::jsonb) || to_jsonb(:key::text) END
 WHERE id = :id AND worker_id = :worker_id AND status IN ('running', 'processing_artifacts')
RETURNING id;

-- name: complete
UPDATE jobs
   SET status = 'completed', result = :result::jsonb, error = NULL,
       progress = :progress::jsonb, finished_at = :now, expires_at = :expires_at,
       updated_at = :now, lease_expires_at = NULL
 WHERE id = :id AND worker_id = :worker_id AND status IN ('running', 'processing_artifacts')
RETURNING *;

-- name: fail
UPDATE jobs
   SET status = 'failed', error = :error::jsonb, progress = :progress::jsonb,
       finished_at = :now, expires_at = :expires_at, updated_at = :now,
       lease_expires_at = NULL
 WHERE id = :id AND worker_id = :worker_id AND status IN ('running', 'processing_artifacts')
RETURNING *;

-- name: retry_later
UPDATE jobs
   SET status = 'queued', run_after = :run_after, error = :error::jsonb,
       progress = :progress::jsonb, updated_at = :now, worker_id = NULL,
       lease_expires_at = NULL
 WHERE id = :id AND worker_id = :worker_id AND status IN ('running', 'processing_artifacts')
RETURNING *;

-- name: release
UPDATE jobs
   SET status = 'queued', attempts = greatest(attempts - 1, 0), run_after = :now,
       updated_at = :now, progress = :progress::jsonb, worker_id = NULL,
       lease_expires_at = NULL
 WHERE id = :id AND worker_id = :worker_id AND status IN ('running', 'processing_artifacts')
RETURNING *;

-- name: release_all
UPDATE jobs
   SET status = 'queued', attempts = greatest(attempts - 1, 0), run_after = :now,
       updated_at = :now, worker_id = NULL, lease_expires_at = NULL,
       progress = jsonb_set(jsonb_set(progress, '{message}', to_jsonb(:message::text)),
                            '{percent}', '0'::jsonb)
 WHERE worker_id = :worker_id AND status IN ('running', 'processing_artifacts')
RETURNING id;

-- name: cancel
UPDATE jobs
   SET status = 'canceled', error = :error::jsonb,
       progress = jsonb_set(progress, '{message}', to_jsonb(:message::text)),
       finished_at = :now, expires_at = :expires_at, updated_at = :now,
       lease_expires_at = NULL
 WHERE id = :id AND status IN ('queued', 'running', 'processing_artifacts')
RETURNING *;

-- name: expire_due
UPDATE jobs SET status = 'expired', updated_at = :now
 WHERE id IN (SELECT id FROM jobs
               WHERE status IN ('completed', 'failed', 'canceled') AND expires_at <= :now
               ORDER BY expires_at
               LIMIT :limit
               FOR UPDATE SKIP LOCKED)
RETURNING *;

-- name: purge_jobs
DELETE FROM jobs
 WHERE id IN (SELECT id FROM jobs
               WHERE status = 'expired' AND expires_at < :before
               ORDER BY expires_at
               LIMIT :limit
               FOR UPDATE SKIP LOCKED)
RETURNING id;

-- name: purge_keys
DELETE FROM idempotency_keys
 WHERE (owner, key) IN (SELECT owner, key FROM idempotency_keys
                         WHERE created_at < :before
                         ORDER BY created_at
                         LIMIT :limit
                         FOR UPDATE SKIP LOCKED);

-- name: claim_trash
UPDATE trash SET next_attempt_at = :lease_until
 WHERE key IN (SELECT key FROM trash
                WHERE next_attempt_at <= :now
                ORDER BY next_attempt_at
                LIMIT :limit
                FOR UPDATE SKIP LOCKED)
RETURNING key, job_id, attempts;

-- name: trash_late_outputs
INSERT INTO trash (key, job_id, created_at, next_attempt_at)
SELECT key, id, :now, :now FROM jobs, unnest(:keys::text[]) AS key
 WHERE id = :id AND status IN ('completed', 'failed', 'canceled', 'expired')
   AND key IS DISTINCT FROM result ->> 'key'
ON CONFLICT (key) DO NOTHING
RETURNING key;

-- name: trash_done
DELETE FROM trash WHERE key = ANY(:keys::text[]);

-- name: trash_retry
UPDATE trash SET attempts = attempts + 1, next_attempt_at = :next_attempt_at
 WHERE key = ANY(:keys::text[]);

-- name: claim_webhook_deliveries
UPDATE webhook_deliveries SET lease_owner = :worker_id, next_attempt_at = :lease_until
 WHERE id IN (SELECT id FROM webhook_deliveries
               WHERE status = 'pending' AND next_attempt_at <= :now
               ORDER BY next_attempt_at
               LIMIT :limit
               FOR UPDATE SKIP LOCKED)
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
       next_attempt_at = coalesce(:next_attempt_at::double precision, next_attempt_at),
       last_error = :error, last_status_code = coalesce(:status_code::integer, last_status_code),
       updated_at = :now,
       delivered_at = CASE WHEN :status = 'delivered' THEN :now::double precision END,
       lease_owner = NULL
 WHERE id = :id AND status = 'pending'
RETURNING *;

-- name: count_webhook_deliveries
SELECT status, count(*) AS n FROM webhook_deliveries GROUP BY status;
