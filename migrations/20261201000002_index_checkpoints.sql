-- Index checkpoints: each Whisper window's transcript, stored as soon as it is decoded, so that a
-- redelivered index task (its worker was killed, its time bound hit, a deploy stopped it) decodes only
-- the windows after those stored. Written under the run's token, deleted in the transaction that writes
-- the results, and cleared by a forced re-run. `config` names the settings that shaped them (model,
-- language, chunking and packing): checkpoints made under other settings are not reused.
CREATE TABLE index_checkpoints (
    video_id    uuid NOT NULL REFERENCES videos (id) ON DELETE CASCADE,
    window_index integer NOT NULL,
    offset_s    double precision NOT NULL,
    duration_s  double precision NOT NULL,
    config      text NOT NULL,
    language    integer NOT NULL,
    segments    jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (video_id, window_index)
);
