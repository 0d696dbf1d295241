-- The caller's own ids: a service that enqueues names a job with its own id (`external_id`, not unique:
-- Heimdex never interprets it) and may attach its own JSON object (`metadata`); both come from the
-- task message of the latest enqueue and go back out through the API, the CLI and the job's events.
-- Their bounds (256 characters, 8 KiB) are checked where a message is parsed (shared/src/contract.rs).
ALTER TABLE jobs ADD COLUMN external_id text CHECK (char_length(external_id) BETWEEN 1 AND 256);
ALTER TABLE jobs ADD COLUMN metadata jsonb CHECK (jsonb_typeof(metadata) = 'object');
CREATE INDEX jobs_external_id ON jobs (external_id) WHERE external_id IS NOT NULL;

-- Job events: every move of a job into a final state (succeeded, failed, dead) writes one event into
-- `event_outbox`, in the transaction that moves it, whichever code moves it (the trigger below).
-- The workers' event relay publishes each row to the `{prefix}.events` topic exchange with routing
-- key `{kind}.{status}` and deletes it (shared/src/events.rs): an event is never lost and never sent
-- for a state that was rolled back; it may be sent twice (at least once), `event_id` tells copies apart.
CREATE TABLE event_outbox (
    seq          bigserial PRIMARY KEY,
    event_id     uuid NOT NULL UNIQUE,
    job_id       uuid NOT NULL,
    routing_key  text NOT NULL,
    body         jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- The event body is the contract of deploy/contract/event.schema.json (shared/src/events.rs, JobEvent;
-- tests/tests/events.rs checks that the two agree). `pg_notify('heimdex_jobs', ...)` tells SQL
-- users (LISTEN heimdex_jobs) and the relays at commit; its payload is small (a NOTIFY payload is
-- capped at 8000 bytes and metadata may be 8 KiB): the ids, kind, status and external_id.
CREATE FUNCTION heimdex_job_ended() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    event_id uuid := gen_random_uuid();
    finished timestamptz := COALESCE(NEW.finished_at, now());
BEGIN
    INSERT INTO event_outbox (event_id, job_id, routing_key, body) VALUES (
        event_id, NEW.id, NEW.kind || '.' || NEW.status,
        jsonb_build_object(
            'v', 1,
            'event_id', event_id,
            'job_id', NEW.id,
            'video_id', NEW.video_id,
            'kind', NEW.kind,
            'status', NEW.status,
            'reason', NEW.last_error,
            'summary', NEW.summary,
            'attempts', NEW.attempts,
            'finished_at', to_char(finished AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
            'external_id', NEW.external_id,
            'metadata', NEW.metadata));
    PERFORM pg_notify('heimdex_jobs', jsonb_build_object(
        'event_id', event_id, 'job_id', NEW.id, 'video_id', NEW.video_id, 'kind', NEW.kind,
        'status', NEW.status, 'external_id', NEW.external_id)::text);
    RETURN NULL;
END
$$;

-- Jobs are created `queued`, so an update is the only way into a final state; a write that leaves
-- the status as it was is no transition and sends nothing.
CREATE TRIGGER jobs_ended AFTER UPDATE OF status ON jobs FOR EACH ROW
    WHEN (NEW.status IN ('succeeded', 'failed', 'dead') AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION heimdex_job_ended();
