//! Benchmark of search end to end: `heimdex_search_segments` and `heimdex_search_frames` called through
//! sqlx over a synthetic library of transcript segments and frames (100k each by default, 1M with
//! `--videos 10000`), p50 and p99 with and without a video filter, queries per second with
//! `--clients` concurrent clients, and recall@10 of the HNSW query (over `halfvec`) against an exact
//! fp32 scan of the same vectors.
//!
//! `cargo run -p heimdex-bench --bin bench-search -- --runs 3 --out bench-results/search.json`
//! `cargo run -p heimdex-bench --bin bench-search -- --videos 10000 --out bench-results/search-1m.json`
//!
//! It creates a scratch database on the configured PostgreSQL server, migrates it with
//! `heimdex_shared::db::migrate` (which creates the partial HNSW indexes of the configured models),
//! drops the two HNSW indexes of segments and frames, bulk-loads with binary COPY, runs ANALYZE, and
//! builds them again with `db::ensure_vector_index` (the code `migrate` runs), timing load and build
//! apart. The database is dropped at the end.
//!
//! Data: `--videos` videos, each with `--per-video` segments (sentences drawn from a word list with
//! Zipf-like frequencies, so full-text search matches) and as many frames (a scene every 10 frames).
//! Vectors are unit vectors from a mixture: `--clusters` centres, each with a local subspace of
//! `SUBSPACE` directions, plus isotropic noise, so that neighbourhoods exist as in real embeddings;
//! each video draws from a few clusters. Queries are dataset vectors with noise added, and two
//! content words of the source segment's sentence (rare and common ones, by the Zipf draw); every
//! fourth query's words are the library's most common word alone, the full-text side's worst case.
//! Latency is one client, one query after another, `--runs` passes after a warm-up pass; throughput
//! is `--clients` connections each running every search of every query. Recall compares the
//! function's top 10 (segments: the semantic list alone, with an empty text) against the exact top
//! 10 by cosine of the fp32 vectors (kept in memory as they are loaded; the database holds them as
//! halfvec), over the whole library or the one video.
//!
//! `--compare-fp32` also loads the frames' vectors as fp32 `vector` into a table of the same shape,
//! builds its HNSW index with the same settings, and times the nearest-frames statement on both
//! storages, alternating per query, at `ef_search` 100, 200 and 400: latency, recall against the exact
//! fp32 top 10, vector bytes, index size and build time side by side on the same data.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use heimdex_bench::measure::{median, ms, quantile, write_report};
use heimdex_bench::scratch::ScratchDb;
use heimdex_shared::Settings;
use heimdex_shared::db::vector_literal;
use serde_json::{Value, json};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-results/search.json")]
    out: PathBuf,
    #[arg(long, default_value_t = 1000)]
    videos: usize,
    /// Segments per video, and frames per video.
    #[arg(long, default_value_t = 100)]
    per_video: usize,
    /// Mixture centres (topics) the vectors are drawn around.
    #[arg(long, default_value_t = 300)]
    clusters: usize,
    /// Queries per pass.
    #[arg(long, default_value_t = 200)]
    queries: usize,
    /// Measured passes over the queries (after one warm-up pass); medians over passes are quoted.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Leave the scratch database on the server (its name is printed) to look at plans by hand.
    #[arg(long)]
    keep_db: bool,
    /// Concurrent clients of the throughput pass.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Also store the frames' vectors as fp32 `vector` in a table of the same shape, build its HNSW
    /// index the same way, and time the nearest-frames statement on both, alternating per query.
    #[arg(long)]
    compare_fp32: bool,
    /// TOML configuration file (database server, model names).
    #[arg(long, env = "HEIMDEX_CONFIG")]
    config: Option<PathBuf>,
}

/// Directions of each cluster's local subspace (the intrinsic dimension of a neighbourhood).
const SUBSPACE: usize = 12;
const K: usize = 10;
/// Full-text matches are counted up to this many per query (ten times the search's text cap).
const MATCHES_COUNTED: i64 = 20_000;

/// Content words, most frequent first (sampled with weight 1/rank).
const WORDS: &[&str] = &[
    "time",
    "people",
    "year",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "community",
    "name",
    "president",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "information",
    "back",
    "parent",
    "face",
    "others",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
    "education",
    "budget",
    "market",
    "weather",
    "river",
    "mountain",
    "garden",
    "kitchen",
    "engine",
    "bridge",
    "forest",
    "ocean",
    "island",
    "winter",
    "summer",
    "music",
    "camera",
    "picture",
    "dog",
    "cat",
    "horse",
    "train",
    "station",
    "letter",
    "doctor",
    "hospital",
    "election",
    "policy",
    "energy",
    "climate",
    "village",
    "church",
    "castle",
    "king",
    "queen",
    "soldier",
    "ship",
    "harbour",
    "storm",
    "rain",
    "snow",
    "fire",
    "stone",
    "gold",
    "silver",
    "bread",
    "coffee",
    "dinner",
    "breakfast",
    "window",
    "street",
    "road",
    "field",
    "farm",
    "machine",
    "computer",
    "network",
    "server",
    "database",
    "search",
    "video",
    "recording",
    "speaker",
    "audience",
    "lecture",
    "interview",
    "meeting",
    "report",
    "review",
    "quarter",
    "revenue",
    "growth",
    "inflation",
    "interest",
    "rate",
    "bank",
    "loan",
    "tax",
    "price",
    "cost",
    "value",
    "risk",
    "plan",
    "strategy",
    "product",
    "customer",
    "design",
    "language",
    "science",
    "theory",
    "experiment",
    "museum",
    "painting",
    "poem",
    "novel",
    "chapter",
    "song",
    "dance",
    "film",
    "theatre",
    "stage",
    "beach",
    "holiday",
    "journey",
    "travel",
    "bicycle",
    "tyre",
    "wheel",
    "engineer",
    "keynote",
    "distributed",
    "fellow",
    "young",
    "old",
    "happy",
    "quiet",
    "bright",
    "dark",
    "cold",
    "warm",
    "strong",
    "gentle",
    "careful",
    "sudden",
    "ancient",
    "modern",
    "distant",
    "narrow",
    "speak",
    "listen",
    "walk",
    "run",
    "build",
    "write",
    "read",
    "remember",
    "forget",
    "travel",
    "explain",
];
const STOP: &[&str] = &["the", "a", "and", "of", "to", "in", "was", "is", "that", "it", "with", "for", "on", "we"];

/// xorshift64*: deterministic, good enough for synthetic data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn gauss(&mut self) -> f32 {
        let (u, v) = (self.unit().max(1e-300), self.unit());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }
    fn gauss_vec(&mut self, dim: usize, scale: f32) -> Vec<f32> {
        (0..dim).map(|_| self.gauss() * scale).collect()
    }
}

fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
}

/// Mixture of clusters, each a unit centre with a local subspace.
struct Mixture {
    dim: usize,
    centres: Vec<Vec<f32>>,
    bases: Vec<Vec<Vec<f32>>>,
}

impl Mixture {
    fn new(rng: &mut Rng, clusters: usize, dim: usize) -> Self {
        let unit = |rng: &mut Rng| {
            let mut v = rng.gauss_vec(dim, 1.0);
            normalise(&mut v);
            v
        };
        let centres = (0..clusters).map(|_| unit(rng)).collect();
        let bases = (0..clusters).map(|_| (0..SUBSPACE).map(|_| unit(rng)).collect()).collect();
        Self { dim, centres, bases }
    }

    /// centre + 0.6 · (a point of the subspace, unit variance overall) + 0.2 · isotropic noise, normalised.
    fn sample(&self, rng: &mut Rng, cluster: usize) -> Vec<f32> {
        let mut v = self.centres[cluster].clone();
        let a = 0.6 / (SUBSPACE as f32).sqrt();
        for b in &self.bases[cluster] {
            let g = rng.gauss() * a;
            v.iter_mut().zip(b).for_each(|(x, y)| *x += g * y);
        }
        let e = 0.2 / (self.dim as f32).sqrt();
        v.iter_mut().for_each(|x| *x += rng.gauss() * e);
        normalise(&mut v);
        v
    }
}

/// Zipf-like sampler over `WORDS` (weight 1/rank).
struct Words(Vec<f64>);

impl Words {
    fn new() -> Self {
        let mut acc = 0.0;
        Self(
            WORDS
                .iter()
                .enumerate()
                .map(|(r, _)| {
                    acc += 1.0 / (r as f64 + 1.0);
                    acc
                })
                .collect(),
        )
    }
    fn content(&self, rng: &mut Rng) -> &'static str {
        let x = rng.unit() * self.0.last().copied().unwrap_or(1.0);
        WORDS[self.0.partition_point(|&c| c < x).min(WORDS.len() - 1)]
    }
    fn sentence(&self, rng: &mut Rng) -> String {
        let n = 8 + rng.below(9);
        let words: Vec<&str> = (0..n).map(|_| if rng.unit() < 0.35 { STOP[rng.below(STOP.len())] } else { self.content(rng) }).collect();
        format!("{}.", words.join(" "))
    }
}

/// PostgreSQL's binary COPY format, one buffer flushed as it fills.
struct Copy {
    buf: Vec<u8>,
}

impl Copy {
    fn new() -> Self {
        let mut buf = b"PGCOPY\n\xff\r\n\0".to_vec();
        buf.extend_from_slice(&[0; 8]); // flags, header extension length
        Self { buf }
    }
    fn row(&mut self, fields: i16) {
        self.buf.extend_from_slice(&fields.to_be_bytes());
    }
    fn field(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        self.buf.extend_from_slice(bytes);
    }
    fn uuid(&mut self, v: Uuid) {
        self.field(v.as_bytes());
    }
    fn int4(&mut self, v: i32) {
        self.field(&v.to_be_bytes());
    }
    fn float8(&mut self, v: f64) {
        self.field(&v.to_be_bytes());
    }
    /// The field length and header of pgvector's `vector_recv` and `halfvec_recv`: int16 dimension,
    /// int16 unused (0); `width` bytes per value follow.
    fn vector_header(&mut self, len: usize, width: usize) {
        self.buf.extend_from_slice(&((4 + width * len) as i32).to_be_bytes());
        self.buf.extend_from_slice(&(len as i16).to_be_bytes());
        self.buf.extend_from_slice(&0i16.to_be_bytes());
    }
    /// A `halfvec`: float16 values.
    fn halfvec(&mut self, v: &[f32]) {
        self.vector_header(v.len(), 2);
        v.iter().for_each(|x| self.buf.extend_from_slice(&half::f16::from_f32(*x).to_bits().to_be_bytes()));
    }
    /// A `vector`: float4 values.
    fn vector(&mut self, v: &[f32]) {
        self.vector_header(v.len(), 4);
        v.iter().for_each(|x| self.buf.extend_from_slice(&x.to_be_bytes()));
    }
    fn text(&mut self, v: &str) {
        self.field(v.as_bytes());
    }
}

/// Runs one binary COPY, the rows written by `fill` (which flushes through `send` every few MB).
async fn copy_in(pool: &PgPool, statement: &str, mut fill: impl FnMut(&mut Copy, usize) -> bool) -> Result<()> {
    let mut conn = pool.acquire().await?;
    let mut sink = conn.copy_in_raw(statement).await?;
    let mut copy = Copy::new();
    let mut i = 0;
    while fill(&mut copy, i) {
        i += 1;
        if copy.buf.len() > 4 << 20 {
            sink.send(std::mem::take(&mut copy.buf)).await?;
        }
    }
    copy.buf.extend_from_slice(&(-1i16).to_be_bytes());
    sink.send(copy.buf).await?;
    sink.finish().await?;
    Ok(())
}

/// One query: the perturbed vectors of a segment and a frame of video number `video` (a paraphrase
/// of the segment, a frame like the frame), and words of the segment.
struct Query {
    video: usize,
    text_q: Vec<f32>,
    frame_q: Vec<f32>,
    text_vec: String,
    frame_vec: String,
    words: String,
}

/// The videos of the library, the fp32 vectors of its segments and frames (row `i` is `idx` `i %
/// per_video` of video `i / per_video`), and the queries drawn from it.
struct Library {
    videos: Vec<Uuid>,
    per_video: usize,
    segment_vectors: Vec<f32>,
    frame_vectors: Vec<f32>,
    queries: Vec<Query>,
}

impl Library {
    /// The exact top `K` rows by cosine (the vectors are unit length: by dot product) among all rows,
    /// or those of one video.
    fn exact(&self, vectors: &[f32], q: &[f32], video: Option<usize>) -> Vec<(Uuid, i32)> {
        let dim = q.len();
        let rows = match video {
            Some(v) => v * self.per_video..(v + 1) * self.per_video,
            None => 0..vectors.len() / dim,
        };
        let mut best: Vec<(f32, usize)> = Vec::with_capacity(K + 1);
        for i in rows {
            let dot: f32 = vectors[i * dim..(i + 1) * dim].iter().zip(q).map(|(a, b)| a * b).sum();
            if best.len() < K || dot > best[K - 1].0 {
                let at = best.partition_point(|&(d, _)| d >= dot);
                best.insert(at, (dot, i));
                best.truncate(K);
            }
        }
        best.into_iter().map(|(_, i)| (self.videos[i / self.per_video], (i % self.per_video) as i32)).collect()
    }
}

/// Loads videos, scenes, segments and frames; returns the videos and the queries (drawn as it goes).
async fn load(pool: &PgPool, settings: &Settings, args: &Args) -> Result<Library> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (text_model, text_dim) = (settings.index.embed_model.clone(), settings.index.embed_dim);
    let (vision_model, vision_dim) = (settings.vision.embed_model.clone(), settings.vision.embed_dim);
    let text_mix = Mixture::new(&mut rng, args.clusters, text_dim);
    let vision_mix = Mixture::new(&mut rng, args.clusters, vision_dim);
    let words = Words::new();
    let videos: Vec<Uuid> = (0..args.videos).map(|_| Uuid::from_u64_pair(rng.next(), rng.next())).collect();
    // Each video is about a few topics.
    let topics: Vec<[usize; 3]> = (0..args.videos).map(|_| [0; 3].map(|_| rng.below(args.clusters))).collect();
    let per = args.per_video;
    let mut sources: HashMap<usize, usize> = HashMap::new(); // row number -> query number
    let mut qrng = Rng(0xD1B5_4A32_D192_ED03);
    while sources.len() < args.queries {
        let row = qrng.below(args.videos * per);
        let n = sources.len();
        sources.entry(row).or_insert(n);
    }
    let mut queries: Vec<Option<Query>> = (0..args.queries).map(|_| None).collect();
    let perturb = |rng: &mut Rng, v: &[f32]| {
        let e = 0.15 / (v.len() as f32).sqrt();
        let mut q: Vec<f32> = v.iter().map(|x| x + rng.gauss() * e).collect();
        normalise(&mut q);
        q
    };
    let mut segment_vectors = Vec::with_capacity(args.videos * per * text_dim);
    let mut frame_vectors = Vec::with_capacity(args.videos * per * vision_dim);

    copy_in(pool, "COPY videos (id, uri, duration_s) FROM STDIN (FORMAT binary)", |c, i| {
        let Some(id) = videos.get(i) else { return false };
        c.row(3);
        c.uuid(*id);
        c.text(&format!("bench://library/video-{i:05}.mp4"));
        c.float8(per as f64 * 4.0);
        true
    })
    .await?;

    let scenes = per.div_ceil(10);
    copy_in(pool, "COPY scenes (video_id, idx, start_s, end_s, frame_count) FROM STDIN (FORMAT binary)", |c, i| {
        if i >= args.videos * scenes {
            return false;
        }
        let (v, s) = (i / scenes, i % scenes);
        c.row(5);
        c.uuid(videos[v]);
        c.int4(s as i32);
        c.float8(s as f64 * 20.0);
        c.float8(((s + 1) * 20) as f64);
        c.int4(10);
        true
    })
    .await?;

    let mut segment_words: HashMap<usize, String> = HashMap::new();
    copy_in(
        pool,
        "COPY transcript_segments (video_id, idx, start_s, end_s, text, language, confidence, embedding, embedding_model) \
         FROM STDIN (FORMAT binary)",
        |c, i| {
            if i >= args.videos * per {
                return false;
            }
            let (v, s) = (i / per, i % per);
            let topic = topics[v][rng.below(3)];
            let vec = text_mix.sample(&mut rng, topic);
            let text = words.sentence(&mut rng);
            if let Some(&q) = sources.get(&i) {
                let content: Vec<&str> = text.trim_end_matches('.').split(' ').filter(|w| !STOP.contains(w)).collect();
                let pick = if q % 4 == 3 {
                    WORDS[0].to_string()
                } else {
                    [content.first(), content.last()].map(|w| w.copied().unwrap_or(WORDS[0])).join(" ")
                };
                segment_words.insert(q, pick);
                let text_q = perturb(&mut qrng, &vec);
                queries[q] = Some(Query {
                    video: v,
                    text_vec: vector_literal(&text_q),
                    text_q,
                    frame_q: Vec::new(),
                    frame_vec: String::new(),
                    words: String::new(),
                });
            }
            c.row(9);
            c.uuid(videos[v]);
            c.int4(s as i32);
            c.float8(s as f64 * 4.0);
            c.float8(s as f64 * 4.0 + 3.8);
            c.text(&text);
            c.text("en");
            c.field(&0.9f32.to_be_bytes());
            c.halfvec(&vec);
            c.text(&text_model);
            segment_vectors.extend_from_slice(&vec);
            true
        },
    )
    .await?;

    copy_in(pool, "COPY frames (video_id, idx, ts_s, scene_idx, embedding, embedding_model) FROM STDIN (FORMAT binary)", |c, i| {
        if i >= args.videos * per {
            return false;
        }
        let (v, f) = (i / per, i % per);
        let topic = topics[v][rng.below(3)];
        let vec = vision_mix.sample(&mut rng, topic);
        if let Some(&q) = sources.get(&i)
            && let Some(query) = queries[q].as_mut()
        {
            query.frame_q = perturb(&mut qrng, &vec);
            query.frame_vec = vector_literal(&query.frame_q);
        }
        c.row(6);
        c.uuid(videos[v]);
        c.int4(f as i32);
        c.float8(f as f64 * 2.0);
        c.int4((f / 10) as i32);
        c.halfvec(&vec);
        c.text(&vision_model);
        frame_vectors.extend_from_slice(&vec);
        true
    })
    .await?;

    let queries = queries
        .into_iter()
        .enumerate()
        .map(|(q, query)| {
            let mut query = query.context("a query without its source row")?;
            query.words = segment_words.remove(&q).unwrap_or_default();
            Ok(query)
        })
        .collect::<Result<_>>()?;
    Ok(Library { videos, per_video: per, segment_vectors, frame_vectors, queries })
}

/// The four searches measured per query.
#[derive(Clone, Copy)]
enum Search {
    Segments,
    SegmentsInVideo,
    Frames,
    FramesInVideo,
}

const SEARCHES: [Search; 4] = [Search::Segments, Search::SegmentsInVideo, Search::Frames, Search::FramesInVideo];

impl Search {
    fn name(self) -> &'static str {
        match self {
            Self::Segments => "segments",
            Self::SegmentsInVideo => "segments, one video",
            Self::Frames => "frames",
            Self::FramesInVideo => "frames, one video",
        }
    }

    /// The video number a search filters on.
    fn video(self, q: &Query) -> Option<usize> {
        matches!(self, Self::SegmentsInVideo | Self::FramesInVideo).then_some(q.video)
    }

    /// The exact top `K` of the query by its fp32 vectors.
    fn exact(self, library: &Library, q: &Query) -> Vec<(Uuid, i32)> {
        match self {
            Self::Segments | Self::SegmentsInVideo => library.exact(&library.segment_vectors, &q.text_q, self.video(q)),
            Self::Frames | Self::FramesInVideo => library.exact(&library.frame_vectors, &q.frame_q, self.video(q)),
        }
    }

    /// Runs the search as `heimdex_search_*` through sqlx; `text` overrides the query's words (recall
    /// uses an empty text, leaving the semantic list alone). Returns (video, idx) of the hits in order.
    async fn run<'c, E>(self, db: E, settings: &Settings, library: &Library, q: &Query, text: Option<&str>) -> Result<Vec<(Uuid, i32)>>
    where
        E: sqlx::PgExecutor<'c>,
    {
        let video = self.video(q).map(|v| library.videos[v]);
        let rows = match self {
            Self::Segments | Self::SegmentsInVideo => {
                sqlx::query("SELECT * FROM heimdex_search_segments($1::vector, $2, $3, $4, $5)")
                    .bind(&q.text_vec)
                    .bind(text.unwrap_or(&q.words))
                    .bind(&settings.index.embed_model)
                    .bind(K as i32)
                    .bind(video)
                    .fetch_all(db)
                    .await?
            }
            Self::Frames | Self::FramesInVideo => {
                sqlx::query("SELECT * FROM heimdex_search_frames($1::vector, $2, $3, $4)")
                    .bind(&q.frame_vec)
                    .bind(&settings.vision.embed_model)
                    .bind(K as i32)
                    .bind(video)
                    .fetch_all(db)
                    .await?
            }
        };
        rows.iter().map(|r| Ok((r.try_get("video_id")?, r.try_get("idx")?))).collect()
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

/// The plan of each statement a search function runs, told by auto_explain (the functions build their
/// statements with EXECUTE, so a plain EXPLAIN shows only the function scan). Only the scan lines.
fn plan(url: &str, call: &str) -> Result<Vec<String>> {
    let script = format!(
        "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;
         SET auto_explain.log_level = notice; SET client_min_messages = notice; {call};"
    );
    let out = std::process::Command::new("psql")
        .args([url, "-q", "-v", "ON_ERROR_STOP=1", "-o", "/dev/null", "-c", &script])
        .output()
        .context("psql")?;
    anyhow::ensure!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr));
    let keep = ["Limit", "CTE ", "Scan", "Order By", "Index Cond", "Sort Key"];
    Ok(String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| keep.iter().any(|k| l.contains(k)) && !l.contains("Query Text"))
        .map(|l| if l.len() > 140 { format!("{}…", &l[..l.char_indices().nth(140).map_or(l.len(), |(i, _)| i)]) } else { l.to_string() })
        .collect())
}

/// Share of the exact top `K` among `hits`.
fn share_found(hits: &[(Uuid, i32)], exact: &[(Uuid, i32)]) -> f64 {
    hits.iter().filter(|h| exact.contains(h)).count() as f64 / exact.len().max(1) as f64
}

/// Recall@10 over the queries: mean, minimum, and the number of queries under one half.
fn recall_summary(recalls: &[f64]) -> (f64, f64, usize) {
    let mean = recalls.iter().sum::<f64>() / recalls.len().max(1) as f64;
    let min = recalls.iter().copied().fold(f64::INFINITY, f64::min);
    (mean, min, recalls.iter().filter(|&&r| r < 0.5).count())
}

/// fp32 against halfvec on the same frames: the nearest-frames statement of `heimdex_search_frames`
/// (its HNSW stage, before the joins) on `frames` (halfvec) and on `frames_fp32` (the same rows as
/// `vector`, its index built with the same `m`, `ef_construction` and build settings), alternating per
/// query in one session, at `ef_search` 100, 200 and 400 (the functions' for k = 10), with recall
/// against the exact fp32 top 10 (`exact`, per query).
async fn compare_fp32(db: &ScratchDb, library: &Library, exact: &[&[(Uuid, i32)]], halfvec_build_s: f64, runs: usize) -> Result<Value> {
    let scratch = &db.settings;
    let (model, dim, per) = (&scratch.vision.embed_model, scratch.vision.embed_dim, library.per_video);
    let options: PgConnectOptions = db.url().parse()?;
    let pool = PgPoolOptions::new().max_connections(1).connect_with(options.options([("statement_timeout", "0")])).await?;
    sqlx::query(
        "CREATE TABLE frames_fp32 (video_id uuid NOT NULL, idx integer NOT NULL, embedding vector NOT NULL, \
         embedding_model text NOT NULL, PRIMARY KEY (video_id, idx))",
    )
    .execute(&pool)
    .await?;
    copy_in(&pool, "COPY frames_fp32 (video_id, idx, embedding, embedding_model) FROM STDIN (FORMAT binary)", |c, i| {
        let Some(v) = library.frame_vectors.get(i * dim..(i + 1) * dim) else { return false };
        c.row(4);
        c.uuid(library.videos[i / per]);
        c.int4((i % per) as i32);
        c.vector(v);
        c.text(model);
        true
    })
    .await?;
    sqlx::query(&format!("SET maintenance_work_mem = '{}MB'", scratch.database.index_build_memory_mb)).execute(&pool).await?;
    sqlx::query(&format!("SET max_parallel_maintenance_workers = {}", scratch.database.index_build_workers)).execute(&pool).await?;
    let started = Instant::now();
    sqlx::query(&format!(
        "CREATE INDEX frames_fp32_hnsw ON frames_fp32 USING hnsw ((embedding::vector({dim})) vector_cosine_ops) \
         WITH (m = {}, ef_construction = {}) WHERE embedding_model = '{}'",
        scratch.database.hnsw_m,
        scratch.database.hnsw_ef_construction,
        model.replace('\'', "''")
    ))
    .execute(&pool)
    .await?;
    let fp32_build_s = started.elapsed().as_secs_f64();
    sqlx::query("ANALYZE frames_fp32").execute(&pool).await?;
    sqlx::query("SET hnsw.iterative_scan = relaxed_order").execute(&pool).await?;

    let halfvec_index = heimdex_shared::db::vector_index_name("frames", model, dim);
    let storages = [("fp32", "frames_fp32", "vector", "frames_fp32_hnsw"), ("halfvec", "frames", "halfvec", halfvec_index.as_str())];
    let statement = |table: &str, ty: &str| {
        format!(
            "SELECT video_id, idx FROM {table} WHERE embedding_model = $2 ORDER BY embedding::{ty}({dim}) <=> $1::{ty}({dim}) LIMIT {K}"
        )
    };
    let nearest = |s: usize, q: &Query| {
        let (_, table, ty, _) = storages[s];
        let (sql, vec, pool) = (statement(table, ty), q.frame_vec.clone(), &pool);
        async move {
            let t = Instant::now();
            let rows: Vec<(Uuid, i32)> = sqlx::query_as(&sql).bind(vec).bind(model).fetch_all(pool).await?;
            anyhow::Ok((ms(t), rows))
        }
    };
    let mut plans = Vec::new();
    for (s, (_, table, ty, _)) in storages.iter().enumerate() {
        let explain: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {}", statement(table, ty)))
            .bind(&library.queries[0].frame_vec)
            .bind(model)
            .fetch_all(&pool)
            .await?;
        anyhow::ensure!(explain.iter().any(|l| l.contains("Index Scan")), "{} does not use its HNSW index: {explain:?}", storages[s].0);
        plans.push(explain);
    }
    let mut sizes = Vec::new();
    for (_, table, _, index) in storages {
        let (bytes, index_bytes): (f64, i64) =
            sqlx::query_as(&format!("SELECT (SELECT avg(pg_column_size(embedding))::float8 FROM {table}), pg_relation_size($1::regclass)"))
                .bind(format!("\"{index}\""))
                .fetch_one(&pool)
                .await?;
        sizes.push((bytes, index_bytes));
    }
    let mut rows = Vec::new();
    println!(
        "fp32 against halfvec, the same {} frames, the nearest-frames statement alone, alternating per query \
         (heimdex_search_frames uses ef_search 400 for k = 10):",
        library.frame_vectors.len() / dim
    );
    println!(
        "{:<9} {:>9} {:>9} {:>9} {:>10} {:>11} {:>13} {:>10} {:>9}",
        "storage", "ef_search", "p50 ms", "p99 ms", "recall@10", "min recall", "vector bytes", "index MB", "build s"
    );
    for ef in [100, 200, 400] {
        sqlx::query(&format!("SET hnsw.ef_search = {ef}")).execute(&pool).await?;
        let mut recall = [Vec::new(), Vec::new()];
        let mut times = [Vec::new(), Vec::new()];
        for pass in 0..=runs {
            let mut pass_times = [Vec::new(), Vec::new()];
            for (i, q) in library.queries.iter().enumerate() {
                let order = if (i + pass) % 2 == 0 { [0, 1] } else { [1, 0] };
                for s in order {
                    let (t, hits) = nearest(s, q).await?;
                    pass_times[s].push(t);
                    if pass == 0 {
                        recall[s].push(share_found(&hits, exact[i]));
                    }
                }
            }
            // Pass 0 is the warm-up.
            for (s, mut t) in pass_times.into_iter().enumerate().filter(|_| pass > 0) {
                t.sort_by(f64::total_cmp);
                times[s].push((quantile(&t, 0.5), quantile(&t, 0.99)));
            }
        }
        for (s, (name, ..)) in storages.iter().enumerate() {
            let p50 = median(times[s].iter().map(|t| t.0).collect());
            let p99 = median(times[s].iter().map(|t| t.1).collect());
            let (r, min, below_half) = recall_summary(&recall[s]);
            let (bytes, index_bytes) = sizes[s];
            let build_s = if s == 0 { fp32_build_s } else { halfvec_build_s };
            println!(
                "{name:<9} {ef:>9} {p50:>9.2} {p99:>9.2} {r:>10.3} {min:>11.2} {bytes:>13.0} {:>10.1} {build_s:>9.1}",
                index_bytes as f64 / 1e6
            );
            rows.push(json!({
                "storage": name, "ef_search": ef, "p50_ms": p50, "p99_ms": p99, "recall_at_10": r, "recall_min": min,
                "queries_recall_below_half": below_half,
                "vector_bytes": bytes, "index_bytes": index_bytes, "build_s": build_s, "plan": plans[s],
            }));
        }
    }
    pool.close().await;
    Ok(json!(rows))
}

async fn bench(db: &ScratchDb, args: &Args) -> Result<Value> {
    let load_before = loadavg();
    let scratch = &db.settings;
    let pool = heimdex_shared::db::pool(&scratch.database)?;
    // Loading a 100k-row HNSW index row by row is much slower than building it once over the rows.
    let hnsw: Vec<String> = sqlx::query_scalar(
        "SELECT indexname FROM pg_indexes WHERE tablename IN ('transcript_segments', 'frames') AND indexname LIKE '%\\_hnsw\\_%'",
    )
    .fetch_all(&pool)
    .await?;
    anyhow::ensure!(hnsw.len() == 2, "migrate made {hnsw:?}, expected one HNSW index on segments and one on frames");
    for name in &hnsw {
        sqlx::query(&format!("DROP INDEX \"{name}\"")).execute(&pool).await?;
    }
    let options: PgConnectOptions = db.url().parse()?;
    let loader = PgPoolOptions::new().max_connections(1).connect_with(options.options([("statement_timeout", "0")])).await?;

    let started = Instant::now();
    let library = load(&loader, scratch, args).await?;
    let load_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    sqlx::query("ANALYZE").execute(&loader).await?;
    let analyze_s = started.elapsed().as_secs_f64();
    let mut builds = Vec::new();
    for (table, model, dim) in heimdex_shared::db::vector_indexes(scratch).into_iter().filter(|(t, ..)| *t != "scenes") {
        let started = Instant::now();
        heimdex_shared::db::ensure_vector_index(&loader, &scratch.database, table, model, dim).await?;
        builds.push((table, started.elapsed().as_secs_f64()));
    }
    sqlx::query("ANALYZE").execute(&loader).await?;
    let sizes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT c.relname::text, pg_total_relation_size(c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND (c.relname IN ('transcript_segments', 'frames', 'transcript_segments_text_search') \
         OR c.relname LIKE '%\\_hnsw\\_%') ORDER BY 1",
    )
    .fetch_all(&loader)
    .await?;
    let counts: (i64, i64, String, String) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM transcript_segments), (SELECT count(*) FROM frames), \
         current_setting('shared_buffers'), (SELECT extversion FROM pg_extension WHERE extname = 'vector')",
    )
    .fetch_one(&loader)
    .await?;
    let vector_bytes: (f64, f64) = sqlx::query_as(
        "SELECT (SELECT avg(pg_column_size(embedding))::float8 FROM transcript_segments), \
         (SELECT avg(pg_column_size(embedding))::float8 FROM frames)",
    )
    .fetch_one(&loader)
    .await?;
    loader.close().await;
    eprintln!(
        "loaded {} segments and {} frames in {load_s:.1} s (ANALYZE {analyze_s:.1} s); HNSW builds: {builds:?}; load average {}",
        counts.0,
        counts.1,
        loadavg()
    );

    let one = |table: &str, model: &str| {
        format!("(SELECT embedding FROM {table} WHERE embedding_model = '{model}' ORDER BY video_id, idx LIMIT 1)")
    };
    let plans = json!({
        "segments": plan(db.url(), &format!(
            "SELECT count(*) FROM heimdex_search_segments({}, 'budget review', '{}', 10)",
            one("transcript_segments", &scratch.index.embed_model), scratch.index.embed_model))?,
        "frames": plan(db.url(), &format!(
            "SELECT count(*) FROM heimdex_search_frames({}, '{}', 10)",
            one("frames", &scratch.vision.embed_model), scratch.vision.embed_model))?,
        "frames_one_video": plan(db.url(), &format!(
            "SELECT count(*) FROM heimdex_search_frames({}, '{}', 10, '{}')",
            one("frames", &scratch.vision.embed_model), scratch.vision.embed_model, library.videos[0]))?,
    });
    for (name, lines) in plans.as_object().into_iter().flatten() {
        println!("plan, {name}:");
        for l in lines.as_array().into_iter().flatten() {
            println!("  {}", l.as_str().unwrap_or_default());
        }
    }

    // One client: a single connection, as `heimdex search` has.
    let client = PgPoolOptions::new().max_connections(1).connect_with(db.url().parse::<PgConnectOptions>()?).await?;
    for q in &library.queries {
        for s in SEARCHES {
            s.run(&client, scratch, &library, q, None).await?;
        }
    }
    let mut passes: Vec<Vec<Vec<f64>>> = Vec::new(); // pass -> search -> sorted ms
    for _ in 0..args.runs {
        let mut times = vec![Vec::with_capacity(library.queries.len()); SEARCHES.len()];
        for q in &library.queries {
            for (s, search) in SEARCHES.iter().enumerate() {
                let t = Instant::now();
                let hits = search.run(&client, scratch, &library, q, None).await?;
                times[s].push(ms(t));
                anyhow::ensure!(hits.len() == K, "{} returned {} hits", search.name(), hits.len());
            }
        }
        times.iter_mut().for_each(|t| t.sort_by(f64::total_cmp));
        passes.push(times);
    }

    // Throughput: `--clients` connections, each running every search of every query (starting at
    // different queries), all at once.
    let shared = PgPoolOptions::new().max_connections(args.clients as u32).connect_with(db.url().parse::<PgConnectOptions>()?).await?;
    let started = Instant::now();
    let done: Vec<usize> = futures::future::try_join_all((0..args.clients).map(|c| {
        let (shared, library) = (&shared, &library);
        async move {
            let n = library.queries.len();
            let mut conn = shared.acquire().await?;
            for i in 0..n {
                let q = &library.queries[(i + c * n / args.clients) % n];
                for s in SEARCHES {
                    s.run(&mut *conn, scratch, library, q, None).await?;
                }
            }
            anyhow::Ok(n * SEARCHES.len())
        }
    }))
    .await?;
    let qps = done.iter().sum::<usize>() as f64 / started.elapsed().as_secs_f64();
    shared.close().await;

    // Recall@10 against the exact fp32 top 10, computed here once from the vectors as loaded.
    let exact: Vec<Vec<Vec<(Uuid, i32)>>> =
        library.queries.iter().map(|q| SEARCHES.iter().map(|s| s.exact(&library, q)).collect()).collect();
    let mut recall = vec![Vec::with_capacity(library.queries.len()); SEARCHES.len()];
    let mut conn = client.acquire().await?;
    // How many segments the full-text side matches (it ranks at most its cap of them), counted up to
    // MATCHES_COUNTED: a common word matches most of a million rows, and counting them all costs ~15 s.
    let mut text_matches = Vec::with_capacity(library.queries.len());
    for (i, q) in library.queries.iter().enumerate() {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM transcript_segments WHERE text_search @@ heimdex_text_query($1) LIMIT $2) m",
        )
        .bind(&q.words)
        .bind(MATCHES_COUNTED)
        .fetch_one(&mut *conn)
        .await?;
        text_matches.push(n as f64);
        for (s, search) in SEARCHES.iter().enumerate() {
            let approx = search.run(&mut *conn, scratch, &library, q, Some("")).await?;
            recall[s].push(share_found(&approx, &exact[i][s]));
        }
    }
    drop(conn);
    client.close().await;
    pool.close().await;
    let fp32 = if args.compare_fp32 {
        let frames_build_s = builds.iter().find(|(t, _)| *t == "frames").map_or(0.0, |b| b.1);
        let frames = SEARCHES.iter().position(|s| matches!(s, Search::Frames)).expect("frames are searched");
        let frames_exact: Vec<&[(Uuid, i32)]> = exact.iter().map(|e| e[frames].as_slice()).collect();
        compare_fp32(db, &library, &frames_exact, frames_build_s, args.runs).await?
    } else {
        Value::Null
    };

    println!(
        "search end to end through sqlx: {} segments ({}), {} frames ({}), {} videos, halfvec; {} queries × {} passes, one client",
        counts.0,
        scratch.index.embed_model,
        counts.1,
        scratch.vision.embed_model,
        args.videos,
        library.queries.len(),
        args.runs
    );
    println!("{:<22} {:>9} {:>9} {:>9} {:>10} {:>10}", "search", "p50 ms", "p99 ms", "max ms", "recall@10", "min recall");
    let mut rows = Vec::new();
    for (s, search) in SEARCHES.iter().enumerate() {
        let per_pass = |f: &dyn Fn(&[f64]) -> f64| passes.iter().map(|p| f(&p[s])).collect::<Vec<f64>>();
        let (p50s, p99s, maxes) = (per_pass(&|t| quantile(t, 0.5)), per_pass(&|t| quantile(t, 0.99)), per_pass(&|t| quantile(t, 1.0)));
        let (r, min, below_half) = recall_summary(&recall[s]);
        println!(
            "{:<22} {:>9.2} {:>9.2} {:>9.2} {:>10.3} {:>10.2}",
            search.name(),
            median(p50s.clone()),
            median(p99s.clone()),
            median(maxes.clone()),
            r,
            min
        );
        rows.push(json!({
            "search": search.name(),
            "p50_ms": median(p50s.clone()), "p99_ms": median(p99s.clone()), "max_ms": median(maxes),
            "p50_ms_per_pass": p50s, "p99_ms_per_pass": p99s,
            "recall_at_10": r, "recall_min": min,
            "queries_recall_below_half": below_half,
        }));
    }
    println!("{} clients, every search of every query: {qps:.1} searches/s", args.clients);
    let matches_max = text_matches.iter().copied().fold(0.0, f64::max);
    let matches_p50 = median(text_matches.clone());
    println!("full-text matches per segment query (counted up to {MATCHES_COUNTED}): median {matches_p50:.0}, max {matches_max:.0}");
    println!(
        "vector bytes per row (pg_column_size): segments {:.0}, frames {:.0}; sizes: {}",
        vector_bytes.0,
        vector_bytes.1,
        sizes.iter().map(|(k, v)| format!("{k} {:.1} MB", *v as f64 / 1e6)).collect::<Vec<_>>().join(", ")
    );
    let build: serde_json::Map<String, Value> = builds.iter().map(|(t, s)| (t.to_string(), json!(s))).collect();
    println!(
        "load (binary COPY, text index in place) {load_s:.1} s, ANALYZE {analyze_s:.1} s, HNSW build {} \
         (m {}, ef_construction {}, index_build_memory_mb {}, index_build_workers {}); load average {load_before} before, {} after; cpu {}",
        builds.iter().map(|(t, s)| format!("{t} {s:.1} s")).collect::<Vec<_>>().join(", "),
        scratch.database.hnsw_m,
        scratch.database.hnsw_ef_construction,
        scratch.database.index_build_memory_mb,
        scratch.database.index_build_workers,
        loadavg(),
        heimdex_bench::measure::isa_flags()
    );
    Ok(json!({
        "segments": counts.0, "frames": counts.1, "videos": args.videos, "clusters": args.clusters, "subspace": SUBSPACE,
        "text_model": scratch.index.embed_model, "vision_model": scratch.vision.embed_model, "storage": "halfvec",
        "queries": library.queries.len(), "passes": args.runs, "k": K, "clients": args.clients, "searches_per_s": qps,
        "load_s": load_s, "analyze_s": analyze_s, "hnsw_build_s": build,
        "index_build_memory_mb": scratch.database.index_build_memory_mb, "index_build_workers": scratch.database.index_build_workers,
        "hnsw_m": scratch.database.hnsw_m, "hnsw_ef_construction": scratch.database.hnsw_ef_construction,
        "sizes_bytes": sizes.into_iter().map(|(k, v)| (k, json!(v))).collect::<serde_json::Map<String, Value>>(),
        "vector_bytes_per_segment": vector_bytes.0, "vector_bytes_per_frame": vector_bytes.1,
        "shared_buffers": counts.2, "pgvector": counts.3,
        "cores": std::thread::available_parallelism().map_or(1, usize::from),
        "isa": heimdex_bench::measure::isa_flags(),
        "loadavg_before": load_before, "loadavg_after": loadavg(),
        "text_matches_p50": matches_p50, "text_matches_max": matches_max, "text_matches_counted_up_to": MATCHES_COUNTED,
        "plans": plans,
        "searches": rows,
        "fp32_vs_halfvec": fp32,
    }))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let settings = heimdex_shared::config::load(args.config.as_deref())?;
    let db = ScratchDb::create(&settings, "search").await?;
    let result = bench(&db, &args).await;
    if args.keep_db {
        eprintln!("kept the scratch database: {}", db.url());
    } else {
        db.drop_it().await;
    }
    let report = result?;
    write_report(&args.out, &report)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
