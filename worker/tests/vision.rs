//! The vision pipeline against the real models of the bundle (`$HEIMDEX_MODELS_DIR` or
//! `~/.cache/heimdex/models`, built by `../shared/models/prepare`), real ffmpeg and, for persistence, a
//! real PostgreSQL with pgvector (127.0.0.1:5432, user postgres, trust auth; one database per test).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};

use heimdex_models::registry::ModelRegistry;
use heimdex_shared::Settings;
use heimdex_shared::contract::TaskKind;
use heimdex_shared::error::Disposition;
use heimdex_shared::jobs::Run;
use heimdex_worker::engine::Engine;
use heimdex_worker::media::frames::{FrameGauge, decode_still};
use heimdex_worker::metrics::Metrics;
use heimdex_worker::pipeline::{LoadContext, Persist, Pipeline, StageTimings, TaskInput};
use heimdex_worker::vision::{VisionOutput, VisionPipeline};
use sqlx::{Connection, Executor};
use uuid::Uuid;

fn models_dir() -> PathBuf {
    std::env::var_os("HEIMDEX_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/heimdex/models"))
}

fn media(rel: &str) -> String {
    models_dir().join("media").join(rel).display().to_string()
}

fn settings() -> Settings {
    let mut s = Settings::default();
    s.models.dir = models_dir();
    s
}

fn engine() -> Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::new(settings().engine, Arc::new(Metrics::new())).unwrap()).clone()
}

fn load() -> VisionPipeline {
    let settings = settings();
    let registry = ModelRegistry::open(&settings.models.dir).expect("model directory");
    let engine = engine();
    VisionPipeline::load(&LoadContext { settings: &settings, engine: &engine, models: &registry }).unwrap()
}

async fn task(path: &str) -> TaskInput {
    let probe = heimdex_shared::media::probe(path).await.unwrap();
    let run = Run { job_id: Uuid::new_v4(), video_id: Uuid::new_v4(), token: Uuid::new_v4(), attempt: 1, deaths: 0, generation: 0 };
    TaskInput { run, fenced: None, kind: TaskKind::Vision, media: path.into(), probe, options: Default::default() }
}

#[track_caller]
fn ffmpeg(args: &[&str]) {
    let status = Command::new("ffmpeg").args(["-nostdin", "-v", "error", "-y"]).args(args).status().unwrap();
    assert!(status.success(), "ffmpeg {args:?} failed");
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[track_caller]
fn assert_unit(v: &[f32], dim: usize) {
    assert_eq!(v.len(), dim);
    let norm = cosine(v, v).sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
}

#[tokio::test]
async fn photo_face_counts_match_the_fixture_and_boxes_lie_inside() {
    let vision = load();
    let tsv = std::fs::read_to_string(media("photos/faces.tsv")).unwrap();
    let mut checked = 0;
    for line in tsv.lines().skip(1) {
        let (file, expected) = line.split_once('\t').unwrap();
        let frame = decode_still(&media(&format!("photos/{file}")), 4096, 640).await.unwrap();
        let (w, h) = (frame.width as f32, frame.height as f32);
        let faces = vision.detect_faces(Arc::new(frame)).await.unwrap();
        assert_eq!(faces.len(), expected.parse::<usize>().unwrap(), "{file}: {faces:?}");
        for f in &faces {
            assert!(f.x >= 0.0 && f.y >= 0.0 && f.x + f.w <= w && f.y + f.h <= h && f.w > 10.0 && f.h > 10.0, "{file}: {f:?}");
            assert!(f.landmarks.chunks(2).all(|p| p[0] >= f.x && p[0] <= f.x + f.w && p[1] >= f.y && p[1] <= f.y + f.h), "{file}: {f:?}");
            assert!(f.score > 0.6);
        }
        checked += 1;
    }
    assert_eq!(checked, 4);
}

#[tokio::test]
async fn sample_video_gives_the_expected_frames_scenes_and_faces() {
    let vision = load();
    vision.warm_up().await.unwrap();
    let sample: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(media("video/sample.json")).unwrap()).unwrap();
    let input = task(&media("video/sample.mp4")).await;
    let timings = StageTimings::default();
    let out = vision.process(&input, &timings).await.unwrap();

    let duration = sample["duration_s"].as_f64().unwrap();
    assert_eq!(out.frames.len(), duration.ceil() as usize, "one frame per second at 1 fps");
    let expected = sample["scenes"].as_array().unwrap();
    assert_eq!(out.scenes.len(), expected.len(), "{:?}", out.scenes.iter().map(|s| (s.start_s, s.end_s)).collect::<Vec<_>>());
    let dim = Settings::default().vision.embed_dim;
    for (scene, want) in out.scenes.iter().zip(expected) {
        // A cut is seen at the first sampled frame after it: within one sampling period.
        let start = want["start_s"].as_f64().unwrap();
        assert!(scene.start_s >= start && scene.start_s < start + 1.0, "{scene:?} vs {want}");
        assert_unit(&scene.embedding, dim);
        let faces = out.faces.iter().filter(|f| f.frame >= scene.first_frame && f.frame < scene.first_frame + scene.frame_count).count();
        assert_eq!(faces > 0, want["has_face"].as_bool().unwrap(), "scene {}: {faces} faces", scene.index);
        if faces > 0 {
            assert_eq!(faces, scene.frame_count as usize, "one face on every frame of scene {}", scene.index);
        }
    }
    assert_eq!(out.scenes.iter().map(|s| s.frame_count as usize).sum::<usize>(), out.frames.len());
    assert_eq!(out.scenes.last().unwrap().end_s, duration);
    for f in &out.frames {
        assert_unit(&f.embedding, dim);
    }
    for f in &out.faces {
        let b = &f.face;
        assert!(b.x >= 0.0 && b.y >= 0.0 && b.x + b.w <= 1280.0 && b.y + b.h <= 720.0, "{f:?}");
    }
    // Faces are in source pixels: the fixture's faces are larger than the 640-px working frame's.
    assert!(out.faces.iter().any(|f| f.face.w > 100.0));
    assert_eq!(out.summary()["frames"], 25);
    let stages = timings.to_json();
    assert!(stages.get("decode").is_some() && stages.get("embed").is_some(), "{stages}");
    assert_eq!(vision.gauge().live(), 0, "every frame was released");
}

/// YuNet at each frame's own size (the pipeline frees the file's fixed 640×640 input: 640×384 for
/// sample.mp4's 16:9 frames) finds the faces the square input finds, frame by frame, in the same places
/// with the same scores.
#[tokio::test]
async fn faces_at_the_frames_own_size_match_the_square_input() {
    use heimdex_worker::engine::{BatchRunner, Memory};
    use heimdex_worker::media::frames::{DEFAULT_WORK_SIDE, FrameOptions, FrameStream};
    use heimdex_worker::vision::yunet::YunetRunner;
    let s = settings();
    let path = s.models.dir.join(&s.vision.face_model);
    let file = std::fs::read(&path).unwrap();
    let runner = |bytes: &[u8]| {
        let session = engine().session_from_memory("yunet", bytes, Memory::Arena).unwrap();
        YunetRunner::new(session, s.vision.face_score_threshold, s.vision.face_nms_iou).unwrap()
    };
    let mut square = runner(&file);
    let mut free = runner(&heimdex_models::shapes::free_input_dims(&file, &[2, 3]).unwrap());
    let input = task(&media("video/sample.mp4")).await;
    let options = FrameOptions { rate: Some(4.0), max_side: s.vision.max_side, work_side: DEFAULT_WORK_SIDE };
    let mut stream = FrameStream::open(&input.media, &input.probe, options, Arc::default()).unwrap();
    let (mut frames, mut faces) = (0, 0);
    while let Some(frame) = stream.next().await.unwrap() {
        assert_eq!((frame.width, frame.height), (640, 360));
        let frame = Arc::new(frame);
        let (a, b) = (square.run(vec![frame.clone()]).unwrap().remove(0), free.run(vec![frame.clone()]).unwrap().remove(0));
        // Only the padding below the frame differs, so a face near the threshold and the bottom edge
        // can tip either way (one at frame 49, a cross-fade: 0.615 in the square, under 0.6 here).
        let clear = |faces: Vec<heimdex_worker::vision::Face>| {
            faces.into_iter().filter(|f| f.score >= s.vision.face_score_threshold + 0.1).collect::<Vec<_>>()
        };
        let (a, b) = (clear(a), clear(b));
        assert_eq!(a.len(), b.len(), "frame {}: {a:?} vs {b:?}", frame.index);
        for (x, y) in a.iter().zip(&b) {
            let inter = ((x.x + x.w).min(y.x + y.w) - x.x.max(y.x)).max(0.0) * ((x.y + x.h).min(y.y + y.h) - x.y.max(y.y)).max(0.0);
            let iou = inter / (x.w * x.h + y.w * y.h - inter);
            assert!(iou > 0.95 && (x.score - y.score).abs() < 0.02, "frame {}: {x:?} vs {y:?}", frame.index);
        }
        frames += 1;
        faces += a.len();
    }
    assert_eq!((frames, faces), (100, 51));
}

#[tokio::test]
async fn an_embedding_alone_equals_the_same_frame_inside_a_batch() {
    let vision = load();
    let frames = vec![
        decode_still(&media("photos/astronaut.png"), 4096, 640).await.unwrap(),
        decode_still(&media("photos/coffee.png"), 4096, 640).await.unwrap(),
        decode_still(&media("photos/chelsea.png"), 4096, 640).await.unwrap(),
        decode_still(&media("photos/camera.png"), 4096, 640).await.unwrap(),
    ];
    let batch = vision.embed_batch(&frames).await.unwrap();
    assert_eq!(batch.len(), 4);
    for (frame, in_batch) in frames.iter().zip(&batch) {
        let alone = vision.embed_frame(frame).await.unwrap();
        assert_unit(&alone, 768);
        assert!(cosine(&alone, in_batch) >= 0.999, "{}", cosine(&alone, in_batch));
    }
    assert!(cosine(&batch[0], &batch[1]) < 0.99, "different photos give different embeddings");
    let text = vision.embed_text("a photo of an astronaut").await.unwrap();
    assert_unit(&text, 768);
    assert!(cosine(&text, &vision.embed_text("a cup of coffee").await.unwrap()) < 0.999);
}

/// Pillow's bicubic (`ImagingResample`, 8-bit): a = −0.5, support 2 scaled by the downscale factor,
/// coefficients normalised then fixed-point with 22 bits, horizontal pass then vertical, each rounded
/// and clamped to 8 bits. Written from Pillow's `Resample.c`, independently of the pipeline.
fn pillow_bicubic(src: &[u8], w: usize, h: usize, ow: usize, oh: usize) -> Vec<u8> {
    const BITS: u32 = 22;
    fn filter(x: f64) -> f64 {
        let (a, x) = (-0.5, x.abs());
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * a
        } else {
            0.0
        }
    }
    fn coeffs(input: usize, output: usize) -> Vec<(usize, Vec<i64>)> {
        let scale = input as f64 / output as f64;
        let filterscale = scale.max(1.0);
        let support = 2.0 * filterscale;
        (0..output)
            .map(|xx| {
                let center = (xx as f64 + 0.5) * scale;
                let xmin = ((center - support + 0.5) as i64).max(0) as usize;
                let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize - xmin;
                let k: Vec<f64> = (0..xmax).map(|x| filter((x as f64 + xmin as f64 - center + 0.5) / filterscale)).collect();
                let sum: f64 = k.iter().sum();
                let fixed = k
                    .iter()
                    .map(|v| {
                        let v = if sum != 0.0 { v / sum } else { *v } * f64::from(1u32 << BITS);
                        (if v < 0.0 { v - 0.5 } else { v + 0.5 }).trunc() as i64
                    })
                    .collect();
                (xmin, fixed)
            })
            .collect()
    }
    let clip = |ss: i64| (ss >> BITS).clamp(0, 255) as u8;
    let (kx, ky) = (coeffs(w, ow), coeffs(h, oh));
    let mut mid = vec![0u8; ow * h * 3];
    for y in 0..h {
        for (xx, (xmin, k)) in kx.iter().enumerate() {
            for c in 0..3 {
                let ss = k.iter().enumerate().map(|(i, k)| i64::from(src[(y * w + xmin + i) * 3 + c]) * k).sum::<i64>();
                mid[(y * ow + xx) * 3 + c] = clip(ss + (1 << (BITS - 1)));
            }
        }
    }
    let mut out = vec![0u8; ow * oh * 3];
    for (yy, (ymin, k)) in ky.iter().enumerate() {
        for x in 0..ow {
            for c in 0..3 {
                let ss = k.iter().enumerate().map(|(i, k)| i64::from(mid[((ymin + i) * ow + x) * 3 + c]) * k).sum::<i64>();
                out[(yy * ow + x) * 3 + c] = clip(ss + (1 << (BITS - 1)));
            }
        }
    }
    out
}

#[tokio::test]
async fn siglip_input_matches_the_documented_recipe() {
    let vision = load();
    for photo in ["astronaut.png", "chelsea.png"] {
        let frame = decode_still(&media(&format!("photos/{photo}")), 4096, 640).await.unwrap();
        let got = vision.siglip_tensor(&frame).unwrap();
        let (w, h) = (frame.width as usize, frame.height as usize);
        let resized = pillow_bicubic(&frame.rgb, w, h, 224, 224);
        // HF SiglipImageProcessor: rescale 1/255, normalise mean 0.5 std 0.5, channels first.
        let plane = 224 * 224;
        let mut worst = 0.0f32;
        for i in 0..plane {
            for c in 0..3 {
                let want = (f32::from(resized[i * 3 + c]) / 255.0 - 0.5) / 0.5;
                worst = worst.max((got[c * plane + i] - want).abs());
            }
        }
        assert!(worst <= 1e-4, "{photo}: max abs difference {worst}");
        assert_eq!(got.len(), 3 * plane);
    }
}

/// Runs the pipeline on `path` with ffprobe's real probe and expects a permanent error containing `needle`.
async fn expect_permanent(path: &str, needle: &str) {
    let vision = load();
    let input = task(path).await;
    match vision.process(&input, &StageTimings::default()).await {
        Err(e) if e.disposition() == Disposition::Permanent => {
            let message = e.to_string();
            assert!(message.contains(needle), "{path}: {message:?} lacks {needle:?}");
        }
        Err(other) => panic!("{path}: expected a permanent error, got {other:?}"),
        Ok(out) => panic!("{path}: expected an error, got {:?}", out.summary()),
    }
}

#[tokio::test]
async fn audio_only_input_is_permanent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audio.m4a");
    ffmpeg(&["-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:a", "aac", path.to_str().unwrap()]);
    expect_permanent(path.to_str().unwrap(), "no video stream").await;
}

#[tokio::test]
async fn truncated_video_is_permanent() {
    expect_permanent(&media("video/truncated.mp4"), "corrupt or truncated").await;
}

#[tokio::test]
async fn corrupt_video_is_permanent() {
    // ffprobe refuses it (the runtime fails such a job before `process`); if a probe had passed,
    // decoding must still fail permanently.
    assert!(heimdex_shared::media::probe(&media("video/corrupt.mp4")).await.is_err());
    let vision = load();
    let mut input = task(&media("video/sample.mp4")).await;
    input.media = media("video/corrupt.mp4");
    let err = vision.process(&input, &StageTimings::default()).await.unwrap_err();
    assert_eq!(err.disposition(), Disposition::Permanent, "{err:?}");
    assert!(err.to_string().contains("no frames could be decoded"), "{err:?}");
}

#[tokio::test]
async fn video_with_zero_decodable_frames_is_permanent() {
    // sample.mp4's stream without its slices: ffprobe sees 1280x720 H.264, no picture decodes.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("noslices.mp4");
    ffmpeg(&["-i", &media("video/sample.mp4"), "-an", "-c:v", "copy", "-bsf:v", "filter_units=remove_types=1|5", path.to_str().unwrap()]);
    expect_permanent(path.to_str().unwrap(), "no frames could be decoded").await;
}

#[tokio::test]
async fn one_pixel_video_is_permanent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one.mkv");
    ffmpeg(&["-f", "lavfi", "-i", "color=c=red:s=2x2:r=1", "-t", "1", "-vf", "scale=1:1", "-c:v", "ffv1", path.to_str().unwrap()]);
    expect_permanent(path.to_str().unwrap(), "1x1: too small").await;
}

#[tokio::test]
async fn eight_k_video_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("8k.mp4");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=7680x4320:rate=1",
        "-t",
        "1",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        path.to_str().unwrap(),
    ]);
    expect_permanent(path.to_str().unwrap(), "7680x4320: larger than the accepted maximum side").await;
}

#[tokio::test]
async fn a_ten_minute_video_streams_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.mp4");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=320x240:rate=5",
        "-t",
        "600",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        path.to_str().unwrap(),
    ]);
    let vision = load();
    let input = task(path.to_str().unwrap()).await;
    let gauge = Arc::new(FrameGauge::default());
    let out = vision.process_with_gauge(&input, &StageTimings::default(), gauge.clone()).await.unwrap();
    assert_eq!(out.frames.len(), 600);
    let bound = vision.frames_in_flight();
    assert!(gauge.peak() <= bound, "peak {} frames in memory, bound {bound}", gauge.peak());
    assert!(gauge.peak() >= 2, "frames were processed concurrently");
    assert_eq!(gauge.live(), 0);
}

#[tokio::test]
async fn the_task_frame_rate_overrides_the_configured_one() {
    let vision = load();
    let mut input = task(&media("video/sample.mp4")).await;
    input.options.frame_rate = Some(0.5);
    let out = vision.process(&input, &StageTimings::default()).await.unwrap();
    assert_eq!(out.frames.iter().map(|f| f.ts).collect::<Vec<_>>(), (0..13).map(|i| f64::from(i) * 2.0).collect::<Vec<_>>());
    input.options.frame_rate = Some(0.0);
    let err = vision.process(&input, &StageTimings::default()).await.unwrap_err();
    assert_eq!(err.disposition(), Disposition::Permanent, "{err:?}");
    assert!(err.to_string().contains("invalid frame rate"), "{err:?}");
}

#[tokio::test]
async fn concurrent_tasks_share_one_frame_budget() {
    let vision = load();
    let mut input = task(&media("video/sample.mp4")).await;
    // 10 fps: 2.5 decoded frames per analysed one, so the models, not ffmpeg (one thread per task),
    // are the bottleneck and frames wait in the budget; at 1 fps decoding can be the slower side and
    // no task ever holds more than a few frames.
    input.options.frame_rate = Some(10.0);
    let timings: Vec<StageTimings> = (0..3).map(|_| StageTimings::default()).collect();
    let runs = timings.iter().map(|t| vision.process(&input, t));
    for out in futures::future::join_all(runs).await {
        assert_eq!(out.unwrap().frames.len(), 250);
    }
    let (peak, budget) = (vision.gauge().peak(), vision.frame_budget());
    assert!(peak <= budget, "peak {peak} frames alive across tasks, budget {budget}");
    assert!(peak > vision.frames_in_flight(), "tasks ran concurrently (peak {peak})");
    assert_eq!(vision.gauge().live(), 0);
}

/// A fresh, migrated database that is dropped by [`TestDb::drop_now`].
struct TestDb {
    name: String,
    pool: sqlx::PgPool,
}

impl TestDb {
    async fn create() -> Self {
        let name = format!("heimdex_vision_{}", Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/postgres").await.unwrap();
        admin.execute(format!("CREATE DATABASE {name}").as_str()).await.unwrap();
        let pool = sqlx::PgPool::connect(&format!("postgres://postgres@127.0.0.1:5432/{name}")).await.unwrap();
        heimdex_shared::db::migrate(&pool, &heimdex_shared::Settings::default()).await.unwrap();
        Self { name, pool }
    }

    async fn drop_now(self) {
        self.pool.close().await;
        let mut admin = sqlx::PgConnection::connect("postgres://postgres@127.0.0.1:5432/postgres").await.unwrap();
        admin.execute(format!("DROP DATABASE {} WITH (FORCE)", self.name).as_str()).await.unwrap();
    }
}

async fn write(pool: &sqlx::PgPool, out: &VisionOutput, video: Uuid) {
    let mut tx = pool.begin().await.unwrap();
    out.write(&mut tx, video).await.unwrap();
    tx.commit().await.unwrap();
}

async fn count(pool: &sqlx::PgPool, table: &str, video: Uuid) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE video_id = $1")).bind(video).fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn writing_twice_leaves_one_set_of_rows() {
    let db = TestDb::create().await;
    let vision = load();
    let input = task(&media("video/sample.mp4")).await;
    let out = vision.process(&input, &StageTimings::default()).await.unwrap();
    let video = input.run.video_id;
    sqlx::query("INSERT INTO videos (id, uri) VALUES ($1, $2)").bind(video).bind(&input.media).execute(&db.pool).await.unwrap();
    write(&db.pool, &out, video).await;
    write(&db.pool, &out, video).await;
    assert_eq!(count(&db.pool, "frames", video).await, out.frames.len() as i64);
    assert_eq!(count(&db.pool, "scenes", video).await, out.scenes.len() as i64);
    assert_eq!(count(&db.pool, "faces", video).await, out.faces.len() as i64);
    assert!(!out.faces.is_empty());
    // Vectors round-trip, the model is recorded, and nearest-neighbour search finds a frame itself.
    let (model, dims): (String, i32) =
        sqlx::query_as("SELECT embedding_model, vector_dims(embedding) FROM frames WHERE video_id = $1 AND idx = 3")
            .bind(video)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((model.as_str(), dims), (Settings::default().vision.embed_model.as_str(), 768));
    let query = heimdex_shared::db::vector_literal(&out.frames[20].embedding);
    let nearest: i32 = sqlx::query_scalar("SELECT idx FROM frames WHERE video_id = $1 ORDER BY embedding <=> $2::vector, idx LIMIT 1")
        .bind(video)
        .bind(&query)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let scene_of = |i: usize| out.frames[i].scene;
    assert_eq!(scene_of(nearest as usize), scene_of(20));
    let landmarks: Vec<f32> = sqlx::query_scalar("SELECT landmarks FROM faces WHERE video_id = $1 ORDER BY frame_idx, face_idx LIMIT 1")
        .bind(video)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(landmarks, out.faces[0].face.landmarks.to_vec());
    db.drop_now().await;
}

#[tokio::test]
async fn every_model_has_one_name_and_a_timed_warm_up() {
    let vision = load();
    let reports = vision.warm_up().await.unwrap();
    let mut models: Vec<String> = vision.models().into_iter().map(|m| m.name).collect();
    let mut warmed: Vec<String> = reports.iter().map(|r| r.model.clone()).collect();
    models.sort();
    warmed.sort();
    assert_eq!(models, warmed, "models() and the warm-up reports name different models");
    for r in &reports {
        assert!(!r.duration.is_zero(), "{} warmed up in no time", r.model);
    }
}

/// Moves `udta` (where MP4 keeps cover art) before the tracks in `moov`, so that ffmpeg lists the
/// cover as stream 0, ahead of the real video: a valid file that some taggers write.
fn cover_art_first(path: &std::path::Path) {
    let mut data = std::fs::read(path).unwrap();
    let boxes = |d: &[u8], start: usize, end: usize| {
        let mut out = Vec::new();
        let mut i = start;
        while i < end {
            let size = u32::from_be_bytes(d[i..i + 4].try_into().unwrap()) as usize;
            out.push((d[i + 4..i + 8].to_vec(), i, size));
            i += size;
        }
        out
    };
    let (_, moov, moov_size) = boxes(&data, 0, data.len()).into_iter().find(|b| b.0 == b"moov").expect("moov");
    let kids = boxes(&data, moov + 8, moov + moov_size);
    let rank = |t: &[u8]| match t {
        b"mvhd" => 0,
        b"udta" => 1,
        _ => 2,
    };
    let mut order = kids.clone();
    order.sort_by_key(|k| rank(&k.0));
    let body: Vec<u8> = order.iter().flat_map(|(_, i, s)| data[*i..*i + *s].to_vec()).collect();
    data.splice(moov + 8..moov + moov_size, body);
    std::fs::write(path, data).unwrap();
}

#[tokio::test]
async fn cover_art_listed_first_is_neither_decoded_nor_a_way_past_max_side() {
    let dir = tempfile::tempdir().unwrap();
    let cover = dir.path().join("cover.png");
    // A cover far larger than max_side allows, that the probe skips (it is not video).
    ffmpeg(&["-f", "lavfi", "-i", "color=c=red:s=5000x5000", "-frames:v", "1", cover.to_str().unwrap()]);
    let tagged = dir.path().join("tagged.mp4");
    let sample = media("video/sample.mp4");
    ffmpeg(&[
        "-i",
        &sample,
        "-i",
        cover.to_str().unwrap(),
        "-map",
        "0:v",
        "-map",
        "0:a",
        "-map",
        "1",
        "-c:v:0",
        "copy",
        "-c:a",
        "copy",
        "-c:v:1",
        "png",
        "-disposition:v:1",
        "attached_pic",
        "-movflags",
        "+faststart",
        tagged.to_str().unwrap(),
    ]);
    cover_art_first(&tagged);
    let input = task(tagged.to_str().unwrap()).await;
    assert_eq!(input.probe.video_stream, Some(1), "the cover is stream 0, the video stream 1: {:?}", input.probe);
    assert_eq!((input.probe.width, input.probe.height), (Some(1280), Some(720)));

    let vision = load();
    let out = vision.process(&input, &StageTimings::default()).await.unwrap();
    let plain = vision.process(&task(&sample).await, &StageTimings::default()).await.unwrap();
    assert_eq!(out.frames.len(), plain.frames.len(), "every frame of the video, not the one picture of the cover");
    assert_eq!(out.faces.len(), plain.faces.len(), "the video's faces (the red cover has none)");
}

/// `vision.embed_int8` (the default): the image tower's encoder MatMuls run in int8, and its
/// embeddings of the bundle's real frames (sample.mp4 at 1 fps and the four photos) stay within
/// int8 error of the file's own fp32 run on the same tensors: the targets bench-vision holds SigLIP
/// base to (mean cosine ≥ 0.995, each ≥ 0.99). Not exactly fp32's, or nothing was rewritten.
#[tokio::test]
async fn the_int8_image_tower_embeds_real_frames_as_fp32_does() {
    use heimdex_worker::media::frames::{DEFAULT_WORK_SIDE, FrameOptions, FrameStream};

    let s = settings();
    assert!(s.vision.embed_int8, "int8 is the default");
    let vision = load();
    let input = task(&media("video/sample.mp4")).await;
    let options = FrameOptions { rate: Some(1.0), max_side: s.vision.max_side, work_side: DEFAULT_WORK_SIDE };
    let mut stream = FrameStream::open(&input.media, &input.probe, options, Arc::default()).unwrap();
    let mut frames = Vec::new();
    while let Some(frame) = stream.next().await.unwrap() {
        frames.push(frame);
    }
    for photo in ["astronaut", "camera", "coffee", "chelsea"] {
        frames.push(decode_still(&media(&format!("photos/{photo}.png")), 4096, DEFAULT_WORK_SIDE).await.unwrap());
    }
    assert!(frames.len() >= 25, "{} frames", frames.len());
    for frame in &frames {
        assert_unit(&vision.embed_frame(frame).await.unwrap(), 768);
    }
    let cosines = vision.cosines_to_fp32(&engine(), &frames).await.unwrap();
    let mean = cosines.iter().sum::<f32>() / cosines.len() as f32;
    let min = cosines.iter().copied().fold(f32::INFINITY, f32::min);
    assert!(mean >= 0.995 && min >= 0.99, "cosine to fp32: mean {mean}, min {min}: {cosines:?}");
    assert!(cosines.iter().any(|&c| c < 0.999_999), "exactly fp32's, so not computed in int8: {cosines:?}");
}
