-- Checkpoints behind the job's fence (issue 25): a forced re-queue no longer deletes another table's
-- rows; it starts a new generation of the job, and the index checkpoints are reused only by runs of
-- the generation that stored them. Checkpoints of an older generation are overwritten window by
-- window, and deleted with the rest in the transaction that writes the results.
ALTER TABLE jobs ADD COLUMN generation bigint NOT NULL DEFAULT 0;
ALTER TABLE index_checkpoints ADD COLUMN generation bigint NOT NULL DEFAULT 0;
