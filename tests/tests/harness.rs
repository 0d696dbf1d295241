//! The test harness itself: a test leaves no database or queue behind, whether it panics or ends
//! with workers still running.

use std::time::Duration;

use heimdex_shared::contract::TaskKind;
use heimdex_shared::fleet::WorkerState;
use heimdex_tests::{ADMIN_DB, TestEnv};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use sqlx::PgPool;

#[tokio::test]
async fn a_test_that_panics_removes_its_world() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let test = tokio::spawn(async move {
        let env = TestEnv::new().await;
        // A role with a grant in the test's database, as schema.rs makes one.
        let admin = PgPool::connect(ADMIN_DB).await.expect("postgres");
        sqlx::query(&format!("CREATE ROLE {} LOGIN", env.role())).execute(&admin).await.unwrap();
        admin.close().await;
        sqlx::query(&format!("GRANT SELECT ON jobs TO {}", env.role())).execute(&env.pool).await.unwrap();
        let _ = tx.send((format!("heimdex_{}", env.name), env.role(), env.topology().queue(TaskKind::Index), env.settings.clone()));
        panic!("this test fails on purpose, holding its world");
    });
    assert!(test.await.unwrap_err().is_panic(), "the test task panicked");
    let (database, role, queue, settings) = rx.await.expect("the test made its world before panicking");

    let admin = PgPool::connect(ADMIN_DB).await.expect("postgres");
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1").bind(&database).fetch_one(&admin).await.unwrap();
    assert_eq!(left, 0, "database {database} outlived its test");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname = $1").bind(&role).fetch_one(&admin).await.unwrap();
    admin.close().await;
    assert_eq!(left, 0, "role {role} outlived its test");

    let (connection, channel) = heimdex_shared::topology::connect(&settings.amqp, "heimdex-tests-harness").await.expect("rabbitmq");
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let declared = channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await;
    let _ = connection.close(0, "done".into()).await;
    assert!(declared.is_err(), "queue {queue} outlived its test");
}

/// A worker still running when its test cleans up would declare its queues again as soon as they are
/// deleted (its consumer is cancelled, it reconnects): the cleanup stops it first.
#[tokio::test]
async fn cleanup_stops_the_workers_that_would_declare_the_queues_again() {
    let env = TestEnv::new().await;
    let worker = env.spawn_worker("vision", "w-harness", &[]);
    env.wait_state(&worker, WorkerState::Warm, Duration::from_secs(120)).await;
    let (queue, settings) = (env.topology().queue(TaskKind::Vision), env.settings.clone());
    env.cleanup().await;
    assert!(worker.exited(), "the worker outlived its test's cleanup");
    let (connection, channel) = heimdex_shared::topology::connect(&settings.amqp, "heimdex-tests-harness").await.expect("rabbitmq");
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let declared = channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await;
    let _ = connection.close(0, "done".into()).await;
    assert!(declared.is_err(), "queue {queue} outlived its test");
}
