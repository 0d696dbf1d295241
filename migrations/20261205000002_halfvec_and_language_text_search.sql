-- Search at a million rows (issue 24) and in the transcript's own language (issue 23).
--
-- 1. Embeddings are stored as `halfvec` (16-bit floats): half the bytes of `vector` per row and per
--    HNSW graph node, for a recall loss bench-search measures against fp32 (under 0.01 at k = 10).
--    The HNSW indexes become `embedding::halfvec(dim) halfvec_cosine_ops`; `heimdex migrate`
--    (heimdex_shared::db::ensure_vector_index) builds them again after this migration drops the old
--    ones. Writers still send `vector` text: pgvector casts vector to halfvec implicitly, and reads
--    of `embedding::text` keep the same text form. The search functions take `halfvec`, so a stored
--    embedding is a query as it is, and a `vector` argument is cast implicitly as before.
--
-- 2. The full-text side uses the segment's language: `text_search` is a stored tsvector made with
--    `heimdex_text_config(language)` (the PostgreSQL configuration of a Whisper language code, or
--    `simple` where PostgreSQL has none), indexed by GIN. Stored, so ranking reads it instead of
--    parsing every matching text again.
--
-- 3. The full-text side is bounded: at most `text_cap` matching segments are ranked, so one common
--    word cannot cost seconds; `hnsw.ef_search` is chosen from k (10·k, at least 100, at most 1000).

-- The type change and the new column rewrite the three tables: minutes at a million rows, past the
-- pool's statement_timeout. For this migration's transaction only.
SET LOCAL statement_timeout = 0;

DO $$
DECLARE
    name text;
BEGIN
    FOR name IN
        SELECT indexname FROM pg_indexes
        WHERE schemaname = current_schema() AND tablename IN ('transcript_segments', 'frames', 'scenes')
          AND indexname LIKE '%\_hnsw\_%'
    LOOP
        EXECUTE format('DROP INDEX %I', name);
    END LOOP;
END
$$;

ALTER TABLE transcript_segments ALTER COLUMN embedding TYPE halfvec USING embedding::halfvec;
ALTER TABLE frames ALTER COLUMN embedding TYPE halfvec USING embedding::halfvec;
ALTER TABLE scenes ALTER COLUMN embedding TYPE halfvec USING embedding::halfvec;

-- Whisper's language codes that PostgreSQL has a text search configuration for (stemming, stop
-- words); every other code, and none, is `simple`. Built from the configurations this server has.
DO $$
DECLARE
    cases text;
BEGIN
    SELECT string_agg(format('WHEN %L THEN %L::regconfig', l.code, l.config), ' ' ORDER BY l.code) INTO cases
    FROM (VALUES ('ar', 'arabic'), ('ca', 'catalan'), ('da', 'danish'), ('de', 'german'), ('el', 'greek'),
                 ('en', 'english'), ('es', 'spanish'), ('eu', 'basque'), ('fi', 'finnish'), ('fr', 'french'),
                 ('hi', 'hindi'), ('hu', 'hungarian'), ('hy', 'armenian'), ('id', 'indonesian'), ('it', 'italian'),
                 ('lt', 'lithuanian'), ('ne', 'nepali'), ('nl', 'dutch'), ('nn', 'norwegian'), ('no', 'norwegian'),
                 ('pt', 'portuguese'), ('ro', 'romanian'), ('ru', 'russian'), ('sr', 'serbian'), ('sv', 'swedish'),
                 ('ta', 'tamil'), ('tr', 'turkish'), ('yi', 'yiddish')) AS l(code, config)
    JOIN pg_ts_config c ON c.cfgname = l.config;
    EXECUTE format($f$
        CREATE FUNCTION heimdex_text_config(language text) RETURNS regconfig
        LANGUAGE sql IMMUTABLE PARALLEL SAFE
        RETURN CASE lower(language) %s ELSE 'simple'::regconfig END
    $f$, coalesce(cases, ''));
END
$$;

DROP INDEX transcript_segments_fts;
ALTER TABLE transcript_segments
    ADD COLUMN text_search tsvector GENERATED ALWAYS AS (to_tsvector(heimdex_text_config(language), text)) STORED;
CREATE INDEX transcript_segments_text_search ON transcript_segments USING gin (text_search);
-- The languages present, read by a skip scan (a few index probes, not a scan of the table).
CREATE INDEX transcript_segments_language ON transcript_segments (language);

-- The query's words as every language present reads them (OR of each configuration's tsquery), so an
-- English query stems as English against English segments and a German one as German.
CREATE FUNCTION heimdex_text_query(query_text text) RETURNS tsquery
LANGUAGE plpgsql STABLE
AS $fn$
DECLARE
    q tsquery := websearch_to_tsquery('simple', coalesce(query_text, ''));
    seen text[] := ARRAY[q::text];
    part tsquery;
    config regconfig;
BEGIN
    FOR config IN
        WITH RECURSIVE present(language) AS (
            (SELECT s.language FROM transcript_segments s WHERE s.language IS NOT NULL ORDER BY s.language LIMIT 1)
            UNION ALL
            SELECT (SELECT s.language FROM transcript_segments s WHERE s.language > p.language ORDER BY s.language LIMIT 1)
            FROM present p WHERE p.language IS NOT NULL
        )
        SELECT DISTINCT heimdex_text_config(language) FROM present WHERE language IS NOT NULL
    LOOP
        part := websearch_to_tsquery(config, coalesce(query_text, ''));
        IF NOT part::text = ANY (seen) THEN
            q := q || part;
            seen := seen || part::text;
        END IF;
    END LOOP;
    RETURN q;
END
$fn$;

DROP FUNCTION heimdex_search_segments(vector, text, text, integer, uuid);
CREATE FUNCTION heimdex_search_segments(
    query_vec halfvec,
    query_text text,
    model text,
    k integer DEFAULT 10,
    video uuid DEFAULT NULL
) RETURNS TABLE (
    video_id uuid,
    uri text,
    idx integer,
    start_s double precision,
    end_s double precision,
    text text,
    score double precision,
    similarity double precision,
    semantic_rank bigint,
    text_rank bigint
)
LANGUAGE plpgsql
SET hnsw.iterative_scan = relaxed_order
SET hnsw.ef_search = 100
AS $fn$
DECLARE
    candidates integer := least(greatest(4 * k, 40), 1000);
    -- Matching segments ranked by the full-text side, at most: a common word matches a large share
    -- of a library, and ts_rank_cd reads every row it ranks.
    text_cap integer := greatest(2000, 2 * candidates);
BEGIN
    IF k IS NULL OR k < 1 OR k > 1000 THEN
        RAISE EXCEPTION 'k must be between 1 and 1000, not %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM set_config('hnsw.ef_search', least(greatest(10 * k, 100, candidates), 1000)::text, true);
    RETURN QUERY EXECUTE format($q$
        WITH semantic AS MATERIALIZED (
            SELECT s.video_id, s.idx, s.start_s, s.end_s, s.text, s.embedding::halfvec(%1$s) <=> $1 AS distance
            FROM transcript_segments s
            WHERE s.embedding_model = %2$L %3$s
            ORDER BY s.embedding::halfvec(%1$s) <=> $1
            LIMIT %4$s
        ), semantic_ranked AS (
            SELECT n.*, row_number() OVER (ORDER BY n.distance, n.video_id, n.idx) AS rank FROM semantic n
        ), matching AS MATERIALIZED (
            SELECT s.video_id, s.idx, s.start_s, s.end_s, s.text, ts_rank_cd(s.text_search, $2) AS relevance
            FROM transcript_segments s
            WHERE s.text_search @@ $2 %3$s
            LIMIT %6$s
        ), textual AS (
            SELECT m.video_id, m.idx, m.start_s, m.end_s, m.text,
                   row_number() OVER (ORDER BY m.relevance DESC, m.video_id, m.idx) AS rank
            FROM matching m
            ORDER BY rank
            LIMIT %4$s
        ), fused AS (
            SELECT coalesce(a.video_id, b.video_id) AS video_id, coalesce(a.idx, b.idx) AS idx,
                   coalesce(a.start_s, b.start_s) AS start_s, coalesce(a.end_s, b.end_s) AS end_s,
                   coalesce(a.text, b.text) AS text,
                   coalesce(1.0::float8 / (60 + a.rank), 0) + coalesce(1.0::float8 / (60 + b.rank), 0) AS score,
                   1 - a.distance AS similarity, a.rank AS semantic_rank, b.rank AS text_rank
            FROM semantic_ranked a
            FULL JOIN textual b ON a.video_id = b.video_id AND a.idx = b.idx
        )
        SELECT f.video_id, v.uri, f.idx, f.start_s, f.end_s, f.text, f.score, f.similarity, f.semantic_rank, f.text_rank
        FROM fused f
        JOIN videos v ON v.id = f.video_id
        ORDER BY f.score DESC, f.semantic_rank NULLS LAST, f.text_rank NULLS LAST
        LIMIT %5$s
    $q$,
        vector_dims(query_vec),
        model,
        CASE WHEN video IS NULL THEN '' ELSE format('AND s.video_id = %L', video) END,
        candidates,
        k,
        text_cap)
    USING query_vec, heimdex_text_query(query_text);
END
$fn$;

DROP FUNCTION heimdex_search_frames(vector, text, integer, uuid);
CREATE FUNCTION heimdex_search_frames(
    query_vec halfvec,
    model text,
    k integer DEFAULT 10,
    video uuid DEFAULT NULL
) RETURNS TABLE (
    video_id uuid,
    uri text,
    idx integer,
    ts_s double precision,
    scene_idx integer,
    scene_start_s double precision,
    scene_end_s double precision,
    score double precision
)
LANGUAGE plpgsql
SET hnsw.iterative_scan = relaxed_order
SET hnsw.ef_search = 100
AS $fn$
BEGIN
    IF k IS NULL OR k < 1 OR k > 1000 THEN
        RAISE EXCEPTION 'k must be between 1 and 1000, not %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM set_config('hnsw.ef_search', least(greatest(10 * k, 100), 1000)::text, true);
    RETURN QUERY EXECUTE format($q$
        WITH nearest AS MATERIALIZED (
            SELECT f.video_id, f.idx, f.ts_s, f.scene_idx, f.embedding::halfvec(%1$s) <=> $1 AS distance
            FROM frames f
            WHERE f.embedding_model = %2$L %3$s
            ORDER BY f.embedding::halfvec(%1$s) <=> $1
            LIMIT %4$s
        )
        SELECT n.video_id, v.uri, n.idx, n.ts_s, n.scene_idx, sc.start_s, sc.end_s, 1 - n.distance
        FROM nearest n
        JOIN videos v ON v.id = n.video_id
        LEFT JOIN scenes sc ON sc.video_id = n.video_id AND sc.idx = n.scene_idx
        ORDER BY n.distance, n.video_id, n.idx
    $q$,
        vector_dims(query_vec),
        model,
        CASE WHEN video IS NULL THEN '' ELSE format('AND f.video_id = %L', video) END,
        k)
    USING query_vec;
END
$fn$;
