//! The query queue as a stranger who may publish on the broker meets it, against a real warm
//! `worker-index`: a request without a direct reply-to address (naming a queue of ours, the task
//! queue, or nothing) is acked unanswered and costs no inference, a request for another model is
//! refused before any inference, and a full query queue refuses the caller at once instead of
//! letting it wait for its timeout. (The flood's cost to tasks is measured by `bench-query --flood`.)

use std::time::{Duration, Instant};

use heimdex_shared::contract::TaskKind;
use heimdex_shared::error::Disposition;
use heimdex_shared::fleet::WorkerState;
use heimdex_shared::query::{EmbedRequest, QUEUE_MAX_LENGTH, QueryClient, QueryError, RefusalCode};
use heimdex_shared::topology;
use heimdex_tests::{TestEnv, http_get};
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

const WARM: Duration = Duration::from_secs(180);
/// How soon a full queue must be told: far below the query timeout (10 s).
const AT_ONCE: Duration = Duration::from_secs(3);

/// The value of the sample `series` (a whole name with its labels) in `/metrics`, 0 when absent.
async fn metric(addr: &str, series: &str) -> f64 {
    let (code, text) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200, "{text}");
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_without_a_direct_reply_to_or_for_another_model_costs_no_inference() {
    let env = TestEnv::new().await;
    let mut worker = env.spawn_worker("index", "hostile-q", &[]);
    let status = env.wait_state(&worker, WorkerState::Warm, WARM).await;
    let queue = env.topology().query_queue(TaskKind::Index);
    env.wait_for("the worker consuming its query queue", WARM, || async { (env.queue(&queue).await.1 == 1).then_some(()) }).await;
    let addr = status.health_addr.clone();
    let batches = r#"heimdex_inference_batch_size_count{model="text-embed"}"#;
    let before = metric(&addr, batches).await;
    assert!(before >= 1.0, "the warm-up ran batches: {before}");

    // A queue of ours that a reply must never reach, and the task queue itself.
    let trap = format!("{}.trap", env.topology().prefix);
    env.channel.queue_declare(trap.as_str().into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    let body = EmbedRequest::new(vec!["a red car".into()], None).to_body();
    let task_queue = env.topology().queue(TaskKind::Index);
    // (A bare `amq.rabbitmq.reply-to` without its consumer is refused by the broker itself.)
    for reply_to in [Some(trap.as_str()), Some(task_queue.as_str()), None] {
        let mut properties = BasicProperties::default().with_correlation_id("hostile".into());
        if let Some(to) = reply_to {
            properties = properties.with_reply_to(to.into());
        }
        topology::publish_confirmed(&env.channel, "", &queue, &body, properties).await.unwrap();
    }
    let unanswerable = r#"heimdex_queries_total{kind="index",outcome="unanswerable"}"#;
    env.wait_for("3 queries counted unanswerable", Duration::from_secs(60), || async {
        (metric(&addr, unanswerable).await == 3.0).then_some(())
    })
    .await;

    let client = QueryClient::connect(&env.settings).await.unwrap();
    let asked = client.embed(TaskKind::Index, Some("another/model"), vec!["a red car".into()]).await;
    match asked {
        Err(QueryError::Refused { refusal, .. }) => {
            assert_eq!(refusal.code, RefusalCode::WrongModel, "{refusal}");
            assert!(refusal.reason.contains("another/model"), "{refusal}");
        }
        other => panic!("expected a wrong-model refusal, got {other:?}"),
    }
    assert_eq!(metric(&addr, r#"heimdex_queries_total{kind="index",outcome="wrong_model"}"#).await, 1.0);
    assert_eq!(metric(&addr, batches).await, before, "no inference for a query that is not answered or is refused");
    assert_eq!(env.queue(&trap).await.0, 0, "nothing was published into a queue named by reply_to");
    assert_eq!(env.queue(&env.topology().dlq(TaskKind::Index)).await.0, 0, "no reply landed in the task queue");
    assert_eq!(metric(&addr, r#"heimdex_tasks_total{kind="index",outcome="dead"}"#).await, 0.0);

    // The worker still answers a proper query, and that one is inferred.
    let model = env.settings.index.embed_model.clone();
    let embedded = client.embed(TaskKind::Index, Some(&model), vec!["a red car".into()]).await.unwrap();
    assert_eq!((embedded.vectors.len(), embedded.dim), (1, 384));
    assert!(metric(&addr, batches).await > before);
    assert_eq!(metric(&addr, r#"heimdex_queries_total{kind="index",outcome="answered"}"#).await, 1.0);
    assert!(worker.child.try_wait().unwrap().is_none(), "the worker still runs:\n{}", worker.log());

    worker.signal("TERM");
    worker.wait_exit(Duration::from_secs(60)).await;
    env.channel.queue_delete(trap.as_str().into(), lapin::options::QueueDeleteOptions::default()).await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_query_queue_refuses_the_caller_at_once() {
    let env = TestEnv::new().await;
    let topology = env.topology();
    let queue = topology.declare_query_queue(&env.channel, TaskKind::Index).await.unwrap();
    // A consumer that takes one query and never answers: a stuck worker, as the caller sees it.
    let (_connection, stuck) = topology::connect(&env.settings.amqp, "stuck-query-consumer").await.unwrap();
    stuck.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let _consumer = stuck
        .basic_consume(queue.name().as_str().into(), "stuck".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let body = EmbedRequest::new(vec!["x".into()], None).to_body();
    let properties = BasicProperties::default;
    // One delivered to the stuck consumer (unacked messages do not count), then the queue's limit.
    for _ in 0..=QUEUE_MAX_LENGTH {
        topology::publish_confirmed(&env.channel, "", queue.name().as_str(), &body, properties()).await.unwrap();
    }
    assert_eq!(env.queue(queue.name().as_str()).await, (QUEUE_MAX_LENGTH, 1));
    let refused = topology::publish_confirmed(&env.channel, "", queue.name().as_str(), &body, properties()).await;
    assert!(matches!(refused, Err(topology::PublishError::Nacked)), "{refused:?}");

    let client = QueryClient::connect(&env.settings).await.unwrap();
    let asked = Instant::now();
    let err = client.embed(TaskKind::Index, None, vec!["a red car".into()]).await.unwrap_err();
    assert!(asked.elapsed() < AT_ONCE, "told after {:?}", asked.elapsed());
    assert!(matches!(err, QueryError::Overloaded { .. }), "{err:?}");
    assert_eq!(err.disposition(), Disposition::Retryable);
    assert!(err.to_string().contains("overloaded"), "{err}");
    let asked = Instant::now();
    let (code, _, stderr) = env.cli(&["search", "a red car"]).await;
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("overloaded with queries"), "{stderr}");
    assert!(asked.elapsed() < AT_ONCE + Duration::from_secs(2), "told after {:?}", asked.elapsed());
    env.cleanup().await;
}
