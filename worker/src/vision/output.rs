//! The vision task's results and how they replace earlier ones: one DELETE per table, then
//! `INSERT … SELECT … FROM UNNEST(…)` in batches of [`ROWS_PER_INSERT`] rows, on the runtime's
//! transaction. Batches keep each bound array far below PostgreSQL's 1 GB field limit whatever the
//! video's length (a 768-d vector is about 8 KB of text; four hours at 5 fps is 72,000 frames).
//!
//! Vectors travel as pgvector text literals cast with `::vector` (no pgvector type support needed in
//! sqlx); landmarks travel as `real[]` text literals, because UNNEST of a two-dimensional array would
//! flatten it.

use heimdex_shared::db::vector_literal;
use uuid::Uuid;

use super::scenes::Scene;
use super::yunet::Face;
use crate::pipeline::Persist;

/// One sampled frame.
#[derive(Clone, Debug)]
pub struct FrameRow {
    pub index: u32,
    pub ts: f64,
    pub scene: u32,
    pub embedding: Vec<f32>,
}

/// One face, in source pixels, on a sampled frame.
#[derive(Clone, Debug)]
pub struct FaceRow {
    pub frame: u32,
    pub ts: f64,
    pub face: Face,
}

/// Everything one vision task produced.
#[derive(Clone, Debug)]
pub struct VisionOutput {
    /// Name stored with every embedding (`vision.embed_model`).
    pub model: String,
    pub frames: Vec<FrameRow>,
    pub scenes: Vec<Scene>,
    pub faces: Vec<FaceRow>,
}

/// Rows per INSERT statement.
pub const ROWS_PER_INSERT: usize = 1000;

fn to_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

impl Persist for VisionOutput {
    async fn write(&self, conn: &mut sqlx::PgConnection, video_id: Uuid) -> Result<(), sqlx::Error> {
        for table in ["faces", "frames", "scenes"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE video_id = $1")).bind(video_id).execute(&mut *conn).await?;
        }

        for scenes in self.scenes.chunks(ROWS_PER_INSERT) {
            let idx: Vec<i32> = scenes.iter().map(|s| to_i32(s.index)).collect();
            let start: Vec<f64> = scenes.iter().map(|s| s.start_s).collect();
            let end: Vec<f64> = scenes.iter().map(|s| s.end_s).collect();
            let count: Vec<i32> = scenes.iter().map(|s| to_i32(s.frame_count)).collect();
            let emb: Vec<String> = scenes.iter().map(|s| vector_literal(&s.embedding)).collect();
            sqlx::query(
                "INSERT INTO scenes (video_id, idx, start_s, end_s, frame_count, embedding, embedding_model) \
             SELECT $1, u.idx, u.start_s, u.end_s, u.n, u.e::vector, $7 \
             FROM UNNEST($2::int4[], $3::float8[], $4::float8[], $5::int4[], $6::text[]) AS u(idx, start_s, end_s, n, e)",
            )
            .bind(video_id)
            .bind(&idx)
            .bind(&start)
            .bind(&end)
            .bind(&count)
            .bind(&emb)
            .bind(&self.model)
            .execute(&mut *conn)
            .await?;
        }

        for frames in self.frames.chunks(ROWS_PER_INSERT) {
            let idx: Vec<i32> = frames.iter().map(|f| to_i32(f.index)).collect();
            let ts: Vec<f64> = frames.iter().map(|f| f.ts).collect();
            let scene: Vec<i32> = frames.iter().map(|f| to_i32(f.scene)).collect();
            let emb: Vec<String> = frames.iter().map(|f| vector_literal(&f.embedding)).collect();
            sqlx::query(
                "INSERT INTO frames (video_id, idx, ts_s, scene_idx, embedding, embedding_model) \
             SELECT $1, u.idx, u.ts, u.scene, u.e::vector, $6 \
             FROM UNNEST($2::int4[], $3::float8[], $4::int4[], $5::text[]) AS u(idx, ts, scene, e)",
            )
            .bind(video_id)
            .bind(&idx)
            .bind(&ts)
            .bind(&scene)
            .bind(&emb)
            .bind(&self.model)
            .execute(&mut *conn)
            .await?;
        }

        let mut face_idx = Vec::with_capacity(self.faces.len());
        let mut per_frame = (u32::MAX, 0i32);
        for f in &self.faces {
            per_frame = if per_frame.0 == f.frame { (f.frame, per_frame.1 + 1) } else { (f.frame, 0) };
            face_idx.push(per_frame.1);
        }
        for (faces, face_idx) in self.faces.chunks(ROWS_PER_INSERT).zip(face_idx.chunks(ROWS_PER_INSERT)) {
            let frame: Vec<i32> = faces.iter().map(|f| to_i32(f.frame)).collect();
            let ts: Vec<f64> = faces.iter().map(|f| f.ts).collect();
            let col = |g: fn(&Face) -> f32| -> Vec<f32> { faces.iter().map(|f| g(&f.face)).collect() };
            let landmarks: Vec<String> = faces.iter().map(|f| heimdex_shared::db::array_literal(&f.face.landmarks)).collect();
            sqlx::query(
                "INSERT INTO faces (video_id, frame_idx, face_idx, ts_s, x, y, w, h, landmarks, score) \
             SELECT $1, u.frame, u.face, u.ts, u.x, u.y, u.w, u.h, u.l::real[], u.score \
             FROM UNNEST($2::int4[], $3::int4[], $4::float8[], $5::float4[], $6::float4[], $7::float4[], $8::float4[], \
                         $9::text[], $10::float4[]) AS u(frame, face, ts, x, y, w, h, l, score)",
            )
            .bind(video_id)
            .bind(&frame)
            .bind(face_idx)
            .bind(&ts)
            .bind(col(|f| f.x))
            .bind(col(|f| f.y))
            .bind(col(|f| f.w))
            .bind(col(|f| f.h))
            .bind(&landmarks)
            .bind(col(|f| f.score))
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    fn summary(&self) -> serde_json::Value {
        serde_json::json!({ "frames": self.frames.len(), "scenes": self.scenes.len(), "faces": self.faces.len() })
    }
}
