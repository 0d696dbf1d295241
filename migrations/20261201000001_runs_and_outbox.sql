-- Fenced runs: every run of a job writes a fresh run_token at its start and every later write of that
-- run requires it, so a superseded run (forced re-run, redelivery) can no longer write. `deaths` counts
-- runs that ended without recording an outcome (the worker was killed), so a video that kills its
-- worker is dead-lettered after max_attempts instead of retried forever.
ALTER TABLE jobs ADD COLUMN run_token uuid;
ALTER TABLE jobs ADD COLUMN deaths integer NOT NULL DEFAULT 0;

-- The transactional outbox: a task message is stored with its job and deleted once the broker
-- confirmed it; workers relay what a producer could not publish.
CREATE TABLE outbox (
    job_id      uuid PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    body        bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
