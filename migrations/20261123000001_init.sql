-- Heimdex schema. Embeddings are untyped `vector` columns with the producing model recorded beside
-- them; each (table, model) gets a partial HNSW cosine index on `embedding::vector(dim)`, created by
-- the worker that loads that model (`heimdex_shared::db::ensure_vector_index`), so that a model of
-- another dimension (BGE-M3, 1024-d) works by configuration alone and spaces never mix.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE videos (
    id            uuid PRIMARY KEY,
    uri           text NOT NULL UNIQUE,
    content_hash  text,
    size_bytes    bigint,
    duration_s    double precision,
    width         integer,
    height        integer,
    fps           double precision,
    has_audio     boolean,
    has_video     boolean,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX videos_content_hash ON videos (content_hash);

CREATE TABLE jobs (
    id             uuid PRIMARY KEY,
    video_id       uuid NOT NULL REFERENCES videos (id) ON DELETE CASCADE,
    kind           text NOT NULL CHECK (kind IN ('index', 'vision')),
    status         text NOT NULL CHECK (status IN ('queued', 'running', 'retrying', 'succeeded', 'failed', 'dead')),
    attempts       integer NOT NULL DEFAULT 0,
    last_error     text,
    worker_id      text,
    queued_at      timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    finished_at    timestamptz,
    stage_timings  jsonb NOT NULL DEFAULT '{}'::jsonb,
    summary        jsonb,
    UNIQUE (video_id, kind)
);
CREATE INDEX jobs_status ON jobs (status);

CREATE TABLE transcript_segments (
    video_id         uuid NOT NULL REFERENCES videos (id) ON DELETE CASCADE,
    idx              integer NOT NULL,
    start_s          double precision NOT NULL,
    end_s            double precision NOT NULL,
    text             text NOT NULL,
    language         text,
    confidence       real,
    embedding        vector,
    embedding_model  text,
    PRIMARY KEY (video_id, idx),
    CHECK (end_s >= start_s)
);

CREATE TABLE scenes (
    video_id         uuid NOT NULL REFERENCES videos (id) ON DELETE CASCADE,
    idx              integer NOT NULL,
    start_s          double precision NOT NULL,
    end_s            double precision NOT NULL,
    frame_count      integer NOT NULL,
    embedding        vector,
    embedding_model  text,
    PRIMARY KEY (video_id, idx)
);

CREATE TABLE frames (
    video_id         uuid NOT NULL REFERENCES videos (id) ON DELETE CASCADE,
    idx              integer NOT NULL,
    ts_s             double precision NOT NULL,
    scene_idx        integer NOT NULL,
    embedding        vector,
    embedding_model  text,
    PRIMARY KEY (video_id, idx)
);

CREATE TABLE faces (
    video_id   uuid NOT NULL REFERENCES videos (id) ON DELETE CASCADE,
    frame_idx  integer NOT NULL,
    face_idx   integer NOT NULL,
    ts_s       double precision NOT NULL,
    x          real NOT NULL,
    y          real NOT NULL,
    w          real NOT NULL,
    h          real NOT NULL,
    -- five (x, y) landmarks in source pixels: right eye, left eye, nose, right and left mouth corner
    landmarks  real[] NOT NULL CHECK (cardinality(landmarks) = 10),
    score      real NOT NULL,
    PRIMARY KEY (video_id, frame_idx, face_idx)
);
