//! A model's owner thread: it owns the session, serves a bounded request channel, and runs whatever
//! is waiting as one batch, up to `max_batch` requests or `max_wait` after the first one arrived.

use std::sync::Arc;
#[cfg(feature = "testing")]
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// The model-panic testing hook shared with [`super::Engine`].
pub(super) type Failpoint = Arc<std::sync::Mutex<Option<String>>>;

use super::InferenceError;
use crate::metrics::Metrics;

/// What a model thread does with one batch. Implementations own their `ort::Session`(s).
pub trait BatchRunner: Send + 'static {
    type Input: Send + 'static;
    type Output: Send + 'static;

    /// Runs `inputs` as one batch and returns one output per input, in order.
    ///
    /// # Errors
    /// Any inference failure; every request of the batch receives it.
    fn run(&mut self, inputs: Vec<Self::Input>) -> Result<Vec<Self::Output>, InferenceError>;
}

#[derive(Clone, Copy, Debug)]
pub struct BatchConfig {
    pub max_batch: usize,
    pub max_wait: Duration,
    pub queue_capacity: usize,
}

enum Request<R: BatchRunner> {
    /// One input, batched with whatever else is waiting.
    One { input: R::Input, reply: oneshot::Sender<Result<R::Output, InferenceError>>, span: tracing::Span },
    /// Exactly this batch, not merged with others (warm-up of a given batch shape).
    Exact { inputs: Vec<R::Input>, reply: oneshot::Sender<Result<Vec<R::Output>, InferenceError>> },
}

/// A cheap, cloneable handle to a model thread. Dropping the last handle stops the thread.
pub struct ModelHandle<R: BatchRunner> {
    name: Arc<str>,
    tx: flume::Sender<Request<R>>,
    max_batch: usize,
    sizes: BatchSizes,
}

impl<R: BatchRunner> Clone for ModelHandle<R> {
    fn clone(&self) -> Self {
        Self { name: self.name.clone(), tx: self.tx.clone(), max_batch: self.max_batch, sizes: self.sizes.clone() }
    }
}

impl<R: BatchRunner> ModelHandle<R> {
    pub(super) fn spawn(name: &str, runner: R, config: BatchConfig, metrics: Arc<Metrics>, panic_next: Failpoint) -> Self {
        let (tx, rx) = flume::bounded(config.queue_capacity);
        let sizes = BatchSizes::new(config.max_batch);
        let name: Arc<str> = Arc::from(name);
        let thread_name = format!("model-{name}");
        let (counts, model) = (sizes.clone(), name.clone());
        std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || serve(&model, runner, rx, config, &counts, &metrics, &panic_next))
            .expect("spawning a model thread");
        Self { name, tx, max_batch: config.max_batch, sizes }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Runs one input, batched with concurrent requests from any task.
    ///
    /// # Errors
    /// The model failed, or its thread is gone.
    pub async fn infer(&self, input: R::Input) -> Result<R::Output, InferenceError> {
        let (reply, rx) = oneshot::channel();
        let request = Request::One { input, reply, span: tracing::Span::current() };
        self.tx.send_async(request).await.map_err(|_| self.closed())?;
        rx.await.map_err(|_| self.closed())?
    }

    /// Runs many inputs; they are queued together and so share batches.
    ///
    /// # Errors
    /// The first failure among them.
    pub async fn infer_all(&self, inputs: Vec<R::Input>) -> Result<Vec<R::Output>, InferenceError> {
        futures::future::try_join_all(inputs.into_iter().map(|input| self.infer(input))).await
    }

    /// Runs `inputs` as exactly one batch (warm-up of a production batch shape).
    ///
    /// # Errors
    /// The model failed, or its thread is gone.
    pub async fn run_exact(&self, inputs: Vec<R::Input>) -> Result<Vec<R::Output>, InferenceError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send_async(Request::Exact { inputs, reply }).await.map_err(|_| self.closed())?;
        rx.await.map_err(|_| self.closed())?
    }

    /// Batches run so far, indexed by batch size (`testing` feature).
    #[cfg(feature = "testing")]
    pub fn batch_histogram(&self) -> Vec<u64> {
        self.sizes.0.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    fn closed(&self) -> InferenceError {
        InferenceError::Closed(self.name.to_string())
    }
}

/// Serves requests until every handle is dropped. A panic of the runner is contained here: the
/// batch's requests get [`InferenceError::Panicked`], and since a session that panicked mid-run
/// cannot be trusted, the runner is dropped and every later request gets [`InferenceError::Closed`]
/// at once (the runtime takes the worker out of service for a restart). The thread keeps answering
/// rather than exiting, so that no request queued meanwhile waits for a reply forever.
fn serve<R: BatchRunner>(
    model: &str,
    mut runner: R,
    rx: flume::Receiver<Request<R>>,
    config: BatchConfig,
    sizes: &BatchSizes,
    metrics: &Metrics,
    panic_next: &Failpoint,
) {
    let mut pending: Option<Request<R>> = None;
    loop {
        let first = match pending.take() {
            Some(request) => request,
            None => match rx.recv() {
                Ok(request) => request,
                Err(flume::RecvError::Disconnected) => return,
            },
        };
        let (first_input, first_reply, span) = match first {
            Request::Exact { inputs, reply } => {
                let n = inputs.len();
                let started = Instant::now();
                let result = run_contained(model, &mut runner, inputs, || false);
                record(model, n, started.elapsed(), sizes, metrics);
                let stop = matches!(result, Err(InferenceError::Panicked { .. }));
                let _ = reply.send(result);
                if stop {
                    return refuse_all(model, runner, &rx);
                }
                continue;
            }
            Request::One { input, reply, span } => (input, reply, span),
        };
        let mut inputs = vec![first_input];
        let mut replies = vec![first_reply];
        let deadline = Instant::now() + config.max_wait;
        while inputs.len() < config.max_batch {
            match rx.recv_deadline(deadline) {
                Ok(Request::One { input, reply, .. }) => {
                    inputs.push(input);
                    replies.push(reply);
                }
                // An exact batch is never merged; it runs next.
                Ok(exact @ Request::Exact { .. }) => {
                    pending = Some(exact);
                    break;
                }
                Err(_) => break,
            }
        }
        let n = inputs.len();
        let started = Instant::now();
        let armed = || {
            let mut armed = panic_next.lock().expect("failpoint lock");
            armed.take_if(|m| m == model).is_some()
        };
        let result = span.in_scope(|| run_contained(model, &mut runner, inputs, armed));
        record(model, n, started.elapsed(), sizes, metrics);
        let failure = match result {
            Ok(outputs) if outputs.len() == n => {
                for (reply, output) in replies.into_iter().zip(outputs) {
                    let _ = reply.send(Ok(output));
                }
                continue;
            }
            Ok(outputs) => {
                InferenceError::Model { model: model.into(), message: format!("returned {} outputs for a batch of {n}", outputs.len()) }
            }
            Err(e) => e,
        };
        tracing::warn!(model, batch = n, error = %failure, "batch failed");
        let stop = matches!(failure, InferenceError::Panicked { .. });
        for reply in replies {
            let _ = reply.send(Err(match &failure {
                InferenceError::Panicked { model, message } => InferenceError::Panicked { model: model.clone(), message: message.clone() },
                other => InferenceError::Model { model: model.into(), message: other.to_string() },
            }));
        }
        if stop {
            tracing::error!(model, "model stopped after a panic: every later request is refused");
            return refuse_all(model, runner, &rx);
        }
    }
}

/// Drops the runner and answers every request with [`InferenceError::Closed`] until every handle is gone.
fn refuse_all<R: BatchRunner>(model: &str, runner: R, rx: &flume::Receiver<Request<R>>) {
    drop(runner);
    let closed = || InferenceError::Closed(model.to_string());
    while let Ok(request) = rx.recv() {
        match request {
            Request::One { reply, .. } => drop(reply.send(Err(closed()))),
            Request::Exact { reply, .. } => drop(reply.send(Err(closed()))),
        }
    }
}

/// Runs one batch, turning a panic of the runner into [`InferenceError::Panicked`].
fn run_contained<R: BatchRunner>(
    model: &str,
    runner: &mut R,
    inputs: Vec<R::Input>,
    failpoint: impl FnOnce() -> bool,
) -> Result<Vec<R::Output>, InferenceError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(!failpoint(), "failpoint model_panic: simulated bug in the {model} runner");
        runner.run(inputs)
    }))
    .unwrap_or_else(|panic| Err(InferenceError::Panicked { model: model.into(), message: crate::panic_message(&*panic) }))
}

fn record(model: &str, n: usize, elapsed: Duration, sizes: &BatchSizes, metrics: &Metrics) {
    sizes.count(n);
    metrics.observe_batch(model, n, elapsed);
}

/// Batches run, by size (index = batch size), for tests and benchmarks to see how requests were
/// batched exactly (`/metrics` has the production histogram, in coarser buckets). It counts only with
/// the `testing` feature; without it, it is empty and costs nothing.
#[derive(Clone)]
struct BatchSizes(#[cfg(feature = "testing")] Arc<Vec<AtomicU64>>);

impl BatchSizes {
    #[cfg_attr(not(feature = "testing"), allow(unused_variables))]
    fn new(max_batch: usize) -> Self {
        Self(
            #[cfg(feature = "testing")]
            Arc::new((0..=max_batch).map(|_| AtomicU64::new(0)).collect()),
        )
    }

    #[cfg_attr(not(feature = "testing"), allow(unused_variables))]
    fn count(&self, n: usize) {
        #[cfg(feature = "testing")]
        if let Some(slot) = self.0.get(n) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Doubles its inputs and remembers the batch sizes it saw.
    struct Doubler(Arc<std::sync::Mutex<Vec<usize>>>);

    impl BatchRunner for Doubler {
        type Input = u32;
        type Output = u32;
        fn run(&mut self, inputs: Vec<u32>) -> Result<Vec<u32>, InferenceError> {
            self.0.lock().unwrap().push(inputs.len());
            std::thread::sleep(Duration::from_millis(2));
            Ok(inputs.into_iter().map(|x| x * 2).collect())
        }
    }

    fn handle(max_batch: usize, max_wait_ms: u64) -> (ModelHandle<Doubler>, Arc<std::sync::Mutex<Vec<usize>>>) {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let config = BatchConfig { max_batch, max_wait: Duration::from_millis(max_wait_ms), queue_capacity: 64 };
        (ModelHandle::spawn("doubler", Doubler(seen.clone()), config, Arc::new(Metrics::new()), Failpoint::default()), seen)
    }

    #[tokio::test]
    async fn concurrent_requests_share_batches_in_order() {
        let (model, seen) = handle(8, 50);
        let out = model.infer_all((0..20).collect()).await.unwrap();
        assert_eq!(out, (0..20).map(|x| x * 2).collect::<Vec<_>>());
        let sizes = seen.lock().unwrap().clone();
        assert!(sizes.iter().all(|&n| n <= 8), "{sizes:?}");
        assert!(sizes.len() < 20, "requests were not batched: {sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 20);
    }

    /// Panics on an input of 13, as a runner with a bug would.
    struct Fragile;

    impl BatchRunner for Fragile {
        type Input = u32;
        type Output = u32;
        fn run(&mut self, inputs: Vec<u32>) -> Result<Vec<u32>, InferenceError> {
            assert!(!inputs.contains(&13), "unlucky input");
            Ok(inputs)
        }
    }

    #[tokio::test]
    async fn a_panicking_runner_is_contained_and_its_thread_reports_closed_afterwards() {
        let config = BatchConfig { max_batch: 4, max_wait: Duration::from_millis(1), queue_capacity: 8 };
        let model = ModelHandle::spawn("fragile", Fragile, config, Arc::new(Metrics::new()), Failpoint::default());
        assert_eq!(model.infer(1).await.unwrap(), 1);
        let err = model.infer(13).await.unwrap_err();
        assert!(matches!(&err, InferenceError::Panicked { message, .. } if message.contains("unlucky input")), "{err:?}");
        let err = model.infer(2).await.unwrap_err();
        assert!(matches!(err, InferenceError::Closed(_)), "{err:?}");
    }

    #[tokio::test]
    async fn exact_batches_are_not_merged() {
        let (model, seen) = handle(8, 1);
        assert_eq!(model.run_exact(vec![1, 2, 3]).await.unwrap(), vec![2, 4, 6]);
        assert_eq!(*seen.lock().unwrap(), vec![3]);
    }
}
