//! The per-task frame loop: read a frame, hand it to a spawned analysis (resize, then both models), and
//! consume the results in frame order.
//!
//! Each frame's analysis is a spawned task, not a future polled by the loop: the loop spends its time
//! waiting for the decoder or for a place in the shared frame budget, and a future that is only polled
//! by a loop that is waiting elsewhere makes no progress (with a shared budget that is a deadlock:
//! every permit held by frames nobody polls). Spawned, each frame runs to completion on its own and
//! gives its permit back. Results arrive in completion order and are put back in frame order through
//! a reorder buffer that, like the frames, never holds more than the task's window.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::preprocess;
use super::siglip::ImageRunner;
use super::yunet::{Face, YunetRunner};
use crate::engine::ModelHandle;
use crate::error::TaskError;
use crate::media::frames::{Frame, FrameStream};

/// What one frame yields once both models have seen it.
#[derive(Debug)]
pub struct Analysed {
    pub index: u32,
    pub ts: f64,
    pub thumbnail: Vec<f32>,
    pub embedding: Vec<f32>,
    pub faces: Vec<Face>,
    pub preprocess: Duration,
    pub embed: Duration,
    pub detect: Duration,
}

/// Everything a frame's analysis needs, cheap to clone into a spawned task.
#[derive(Clone)]
pub struct FrameWorker {
    pub image: ModelHandle<ImageRunner>,
    pub faces: ModelHandle<YunetRunner>,
    /// Resize jobs at once (one per core), so the blocking pool never grows past the cores.
    pub resizers: Arc<Semaphore>,
    pub image_size: u32,
}

impl FrameWorker {
    /// Resizes a frame on the blocking pool, then runs both models on it concurrently. `_permit` is
    /// the frame's place in the shared budget, released with the frame.
    pub(super) async fn analyse(self, frame: Frame, _permit: OwnedSemaphorePermit) -> Result<Analysed, TaskError> {
        let frame = Arc::new(frame);
        let (index, ts, size) = (frame.index, frame.ts, self.image_size);
        let started = Instant::now();
        let resizer = self.resizers.acquire().await.map_err(|e| TaskError::retryable(e.to_string()))?;
        let for_resize = frame.clone();
        let resized = tokio::task::spawn_blocking(move || {
            let f = &for_resize;
            Ok::<_, preprocess::ResizeError>((
                preprocess::siglip_pixels(&f.rgb, f.width, f.height, size)?,
                preprocess::grey_thumbnail(&f.rgb, f.width, f.height)?,
            ))
        })
        .await
        .map_err(|e| TaskError::retryable(format!("resize thread failed: {e}")))?;
        drop(resizer);
        let (pixels, thumbnail) = resized.map_err(|e| TaskError::retryable(e.to_string()))?;
        let preprocess = started.elapsed();
        let ((embedding, embed), (faces, detect)) = futures::join!(timed(self.image.infer(pixels)), timed(self.faces.infer(frame)));
        Ok(Analysed { index, ts, thumbnail, embedding: embedding?, faces: faces?, preprocess, embed, detect })
    }
}

/// Awaits `fut` and measures how long it took.
async fn timed<T>(fut: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let out = fut.await;
    (out, started.elapsed())
}

/// Streams every frame of `stream` through `worker`, at most `window` frames of this task alive at
/// once, each holding a permit of `budget`; calls `consume` with the results in frame order and
/// returns the time spent waiting for the decoder.
///
/// # Errors
/// The first decoding or analysis error; the other frames' tasks are aborted.
pub async fn run(
    stream: &mut FrameStream,
    worker: &FrameWorker,
    window: usize,
    budget: &Arc<Semaphore>,
    mut consume: impl FnMut(Analysed),
) -> Result<Duration, TaskError> {
    let mut tasks = JoinSet::new();
    let mut reorder: BTreeMap<u32, Analysed> = BTreeMap::new();
    let (mut next_index, mut outstanding, mut exhausted) = (0u32, 0usize, false);
    let mut decode = Duration::ZERO;
    loop {
        if !exhausted && outstanding < window.max(1) {
            let permit = budget.clone().acquire_owned().await.map_err(|e| TaskError::retryable(e.to_string()))?;
            let started = Instant::now();
            let next = stream.next().await;
            decode += started.elapsed();
            match next? {
                Some(frame) => {
                    tasks.spawn(worker.clone().analyse(frame, permit));
                    outstanding += 1;
                    continue;
                }
                None => exhausted = true,
            }
        }
        if outstanding == 0 {
            return Ok(decode);
        }
        // The earliest unconsumed frame is still running (finished ones were drained below).
        let Some(joined) = tasks.join_next().await else {
            return Err(TaskError::retryable("frame analysis tasks vanished"));
        };
        let analysed = joined.map_err(|e| TaskError::retryable(format!("frame analysis failed: {e}")))??;
        reorder.insert(analysed.index, analysed);
        while let Some(a) = reorder.remove(&next_index) {
            consume(a);
            next_index += 1;
            outstanding -= 1;
        }
    }
}
