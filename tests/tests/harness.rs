//! The test harness itself: a test that panics leaves no database or queue behind.

use heimdex_shared::contract::TaskKind;
use heimdex_tests::{ADMIN_DB, TestEnv};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use sqlx::PgPool;

#[tokio::test]
async fn a_test_that_panics_removes_its_world() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let test = tokio::spawn(async move {
        let env = TestEnv::new().await;
        let _ = tx.send((format!("heimdex_{}", env.name), env.topology().queue(TaskKind::Index), env.settings.clone()));
        panic!("this test fails on purpose, holding its world");
    });
    assert!(test.await.unwrap_err().is_panic(), "the test task panicked");
    let (database, queue, settings) = rx.await.expect("the test made its world before panicking");

    let admin = PgPool::connect(ADMIN_DB).await.expect("postgres");
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1").bind(&database).fetch_one(&admin).await.unwrap();
    admin.close().await;
    assert_eq!(left, 0, "database {database} outlived its test");

    let (connection, channel) = heimdex_shared::topology::connect(&settings.amqp, "heimdex-tests-harness").await.expect("rabbitmq");
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let declared = channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await;
    let _ = connection.close(0, "done".into()).await;
    assert!(declared.is_err(), "queue {queue} outlived its test");
}
