//! The bounded share of the models that query embeddings get, so that a flood of queries neither
//! starves tasks nor grows the worker's memory.
//!
//! Queries and tasks run on the same model threads (that is the point: no second copy of a model).
//! Without a bound, every query a worker takes queues its texts before a task's next batch, and a
//! few hundred maximal requests waiting in the query queue made a 10-minute index task 2.8 times
//! slower and the worker 1.36 GB large. Two bounds:
//! - **Texts in flight:** at most [`MAX_TEXTS`] texts of queries are tokenised and queued on a model
//!   at once (one maximal request, or many small ones, which then share batches), so a task's batch
//!   waits behind at most one query's worth of work, and memory does not grow with the flood.
//! - **Time, while tasks run:** after a query's inference took `t`, the next one starts no sooner
//!   than `t * (1 - share) / share` later, so that queries take at most about `share` of the model
//!   time. An idle worker (no task in flight) answers at full speed.

use std::sync::Mutex;
use std::time::Duration;

use heimdex_shared::query::MAX_TEXTS;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Admission of query embeddings to the models.
pub struct QueryShare {
    texts: Semaphore,
    /// The pause after each unit of query time while tasks run: `(1 - share) / share`.
    pause_per_use: f64,
    /// The earliest time the next query may start while tasks run.
    next: Mutex<Instant>,
}

impl QueryShare {
    /// `share` in (0, 1] (`worker.query_share`, checked when the settings are loaded).
    pub fn new(share: f64) -> Self {
        let share = share.clamp(f64::MIN_POSITIVE, 1.0);
        Self { texts: Semaphore::new(MAX_TEXTS), pause_per_use: (1.0 - share) / share, next: Mutex::new(Instant::now()) }
    }

    /// How long the next query waits, while tasks run, after one that used the model for `spent`.
    pub fn pause_after(&self, spent: Duration) -> Duration {
        Duration::from_secs_f64(spent.as_secs_f64() * self.pause_per_use)
    }

    /// Runs `embed` for a query of `texts` texts once it is admitted; `busy` tells whether a task
    /// is in flight now.
    pub async fn run<T>(&self, texts: usize, busy: impl Fn() -> bool, embed: impl Future<Output = T>) -> T {
        let wanted = u32::try_from(texts.clamp(1, MAX_TEXTS)).unwrap_or(1);
        let _permits = self.texts.acquire_many(wanted).await.expect("semaphore never closed");
        if busy() {
            let next = *self.next.lock().expect("share lock");
            tokio::time::sleep_until(next).await;
        }
        let started = Instant::now();
        let out = embed.await;
        if busy() {
            let pause = self.pause_after(started.elapsed());
            let mut next = self.next.lock().expect("share lock");
            *next = (*next).max(Instant::now()) + pause;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn the_pause_leaves_the_tasks_the_rest_of_the_model_time() {
        assert_eq!(QueryShare::new(0.2).pause_after(Duration::from_millis(100)), Duration::from_millis(400));
        assert_eq!(QueryShare::new(0.5).pause_after(Duration::from_millis(100)), Duration::from_millis(100));
        assert_eq!(QueryShare::new(1.0).pause_after(Duration::from_millis(100)), Duration::ZERO);
    }

    #[tokio::test]
    async fn while_a_task_runs_the_next_query_waits_out_the_pause() {
        let gate = QueryShare::new(0.2);
        let started = Instant::now();
        // The query's own 20 ms start when it runs (an async block), as a real query's inference does:
        // a `sleep` made before `run` counts its 20 ms from then, and the time `run` took to admit it
        // (under load, 2.5 ms) was missing from the measured query and its pause (90.5 ms in all).
        gate.run(1, || true, async { tokio::time::sleep(Duration::from_millis(20)).await }).await;
        gate.run(1, || true, async {}).await;
        // 20 ms of query, then at least 4 x 20 ms for the task before the next query starts.
        assert!(started.elapsed() >= Duration::from_millis(100), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn at_most_one_requests_worth_of_texts_is_in_flight() {
        let gate = Arc::new(QueryShare::new(1.0));
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let half = MAX_TEXTS / 2;
        let runs = (0..8).map(|_| {
            let (gate, now, most) = (gate.clone(), now.clone(), most.clone());
            tokio::spawn(async move {
                gate.run(half, || false, async {
                    most.fetch_max(now.fetch_add(half, Ordering::SeqCst) + half, Ordering::SeqCst);
                    for _ in 0..10 {
                        tokio::task::yield_now().await;
                    }
                    now.fetch_sub(half, Ordering::SeqCst);
                })
                .await;
            })
        });
        for run in futures::future::join_all(runs).await {
            run.unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), MAX_TEXTS, "two half-size queries share the model, never three");
    }
}
