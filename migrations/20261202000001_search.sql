-- Search, as SQL functions that users call directly (`heimdex search` calls them too). A caller brings
-- the query vector (from a warm worker over the broker, see heimdex_shared::query, or from anywhere
-- else that uses the same model) and the model's name as stored in `embedding_model`.
--
-- Each vector search is an ORDER BY on `embedding::vector(dim) <=> query` under
-- `embedding_model = <model>`, which is exactly the expression and predicate of the partial HNSW index
-- that `heimdex migrate` creates per (table, model, dim) (heimdex_shared::db::ensure_vector_index).
-- The dimension is a type modifier and the model a partial-index predicate, so neither can be a plan
-- parameter: the statement is built with format() (%s for integers, %L for literals, never
-- concatenated text) and run with EXECUTE, planned with the actual model and dimension.
--
-- Filters (a video) make an HNSW scan return fewer rows than asked for; `hnsw.iterative_scan =
-- relaxed_order` lets it keep scanning until the LIMIT is met, and the outer ORDER BY puts the
-- relaxed results back in exact order. `hnsw.ef_search` is raised to the number of candidates
-- wanted. Both are set for the function's duration only (SET clauses), never for the session.

-- Full-text side of the segment search (English stemming and stop words).
CREATE INDEX transcript_segments_fts ON transcript_segments USING gin (to_tsvector('english', text));

-- Transcript segments by meaning and by words, fused by reciprocal rank fusion (k = 60): each of the
-- two lists (the 4k nearest by cosine, the 4k best by ts_rank_cd, at least 40 each) gives a segment
-- 1 / (60 + its rank), and the sum orders the hits. `similarity` (1 - cosine distance) and the two
-- ranks are returned for inspection; a NULL rank means the segment was not in that list.
CREATE FUNCTION heimdex_search_segments(
    query_vec vector,
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
SET hnsw.ef_search = 40
AS $fn$
DECLARE
    candidates integer := least(greatest(4 * k, 40), 1000);
BEGIN
    IF k IS NULL OR k < 1 OR k > 1000 THEN
        RAISE EXCEPTION 'k must be between 1 and 1000, not %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM set_config('hnsw.ef_search', candidates::text, true);
    RETURN QUERY EXECUTE format($q$
        WITH semantic AS MATERIALIZED (
            SELECT s.video_id, s.idx, s.start_s, s.end_s, s.text, s.embedding::vector(%1$s) <=> $1 AS distance
            FROM transcript_segments s
            WHERE s.embedding_model = %2$L %3$s
            ORDER BY s.embedding::vector(%1$s) <=> $1
            LIMIT %4$s
        ), semantic_ranked AS (
            SELECT n.*, row_number() OVER (ORDER BY n.distance, n.video_id, n.idx) AS rank FROM semantic n
        ), textual AS (
            SELECT s.video_id, s.idx, s.start_s, s.end_s, s.text,
                   row_number() OVER (ORDER BY ts_rank_cd(to_tsvector('english', s.text), q) DESC, s.video_id, s.idx) AS rank
            FROM transcript_segments s, websearch_to_tsquery('english', $2) q
            WHERE to_tsvector('english', s.text) @@ q %3$s
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
        k)
    USING query_vec, coalesce(query_text, '');
END
$fn$;

-- Frames nearest a query vector (a text through the SigLIP text tower, or any image embedding of the
-- same model), with the time range of each frame's scene. `score` is the cosine similarity.
CREATE FUNCTION heimdex_search_frames(
    query_vec vector,
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
SET hnsw.ef_search = 40
AS $fn$
BEGIN
    IF k IS NULL OR k < 1 OR k > 1000 THEN
        RAISE EXCEPTION 'k must be between 1 and 1000, not %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM set_config('hnsw.ef_search', greatest(k, 40)::text, true);
    RETURN QUERY EXECUTE format($q$
        WITH nearest AS MATERIALIZED (
            SELECT f.video_id, f.idx, f.ts_s, f.scene_idx, f.embedding::vector(%1$s) <=> $1 AS distance
            FROM frames f
            WHERE f.embedding_model = %2$L %3$s
            ORDER BY f.embedding::vector(%1$s) <=> $1
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

-- Frames like the frame of `of_video` nearest `at_s` seconds (its stored embedding: no model runs).
-- That frame itself comes first, then the others by similarity.
CREATE FUNCTION heimdex_similar_frames(
    of_video uuid,
    at_s double precision,
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
AS $fn$
DECLARE
    source_idx integer;
    source_vec vector;
BEGIN
    SELECT f.idx, f.embedding INTO source_idx, source_vec
    FROM frames f
    WHERE f.video_id = of_video AND f.embedding_model = model AND f.embedding IS NOT NULL
    ORDER BY abs(f.ts_s - at_s), f.idx
    LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'video % has no frame embedded with %', of_video, model USING ERRCODE = 'no_data_found';
    END IF;
    -- The source frame is put first by hand: in a still scene many frames tie with it at score 1,
    -- and the index may return any k of them.
    RETURN QUERY
        SELECT f.video_id, v.uri, f.idx, f.ts_s, f.scene_idx, sc.start_s, sc.end_s, 1.0::double precision
        FROM frames f
        JOIN videos v ON v.id = f.video_id
        LEFT JOIN scenes sc ON sc.video_id = f.video_id AND sc.idx = f.scene_idx
        WHERE f.video_id = of_video AND f.idx = source_idx AND f.embedding_model = model
          AND (video IS NULL OR video = of_video);
    RETURN QUERY
        SELECT h.* FROM heimdex_search_frames(source_vec, model, least(k + 1, 1000), video) h
        WHERE NOT (h.video_id = of_video AND h.idx = source_idx)
        ORDER BY h.score DESC, h.video_id, h.idx
        LIMIT k - (CASE WHEN video IS NULL OR video = of_video THEN 1 ELSE 0 END);
END
$fn$;
