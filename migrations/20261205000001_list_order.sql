-- List order: `GET /v1/videos` and `GET /v1/jobs` page through rows newest first with a cursor. The
-- order must not change under a reader's feet, so it cannot be `jobs.queued_at` (a forced re-run
-- moves it) nor a timestamp that two rows can share: each table gets an identity `seq`, assigned at
-- insert and never changed, and a page is `WHERE seq < cursor ORDER BY seq DESC LIMIT n` on an index.
-- Rows that exist already are numbered in the order they were created.
ALTER TABLE videos ADD COLUMN seq bigint;
UPDATE videos v SET seq = o.n FROM (SELECT id, row_number() OVER (ORDER BY created_at, id) AS n FROM videos) o WHERE o.id = v.id;
ALTER TABLE videos ALTER COLUMN seq SET NOT NULL, ALTER COLUMN seq ADD GENERATED ALWAYS AS IDENTITY;
SELECT setval(pg_get_serial_sequence('videos', 'seq'), coalesce(max(seq), 0) + 1, false) FROM videos;
CREATE UNIQUE INDEX videos_seq ON videos (seq);

ALTER TABLE jobs ADD COLUMN seq bigint;
UPDATE jobs j SET seq = o.n FROM (SELECT id, row_number() OVER (ORDER BY queued_at, id) AS n FROM jobs) o WHERE o.id = j.id;
ALTER TABLE jobs ALTER COLUMN seq SET NOT NULL, ALTER COLUMN seq ADD GENERATED ALWAYS AS IDENTITY;
SELECT setval(pg_get_serial_sequence('jobs', 'seq'), coalesce(max(seq), 0) + 1, false) FROM jobs;
CREATE UNIQUE INDEX jobs_seq ON jobs (seq);
-- The filters of `GET /v1/jobs` (status, external_id) walk these newest first.
DROP INDEX jobs_status;
CREATE INDEX jobs_status_seq ON jobs (status, seq);
DROP INDEX jobs_external_id;
CREATE INDEX jobs_external_id_seq ON jobs (external_id, seq) WHERE external_id IS NOT NULL;
