//! Least privilege: `heimdex migrate`, run as the schema's owner, owns the schema; workers and
//! producers run as a role that can read and write rows and nothing else, and never change the schema.

use std::time::Duration;

use heimdex_shared::fleet::WorkerState;
use heimdex_tests::TestEnv;
use sqlx::PgPool;

const ADMIN_DB: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The SQLSTATE of a statement that must fail.
async fn refused(pool: &PgPool, sql: &str) -> String {
    match sqlx::query(sql).execute(pool).await {
        Ok(_) => panic!("{sql} succeeded as the worker role"),
        Err(sqlx::Error::Database(e)) => e.code().map(|c| c.to_string()).unwrap_or_default(),
        Err(e) => panic!("{sql}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_and_producers_run_as_a_role_that_cannot_change_the_schema() {
    let env = TestEnv::new().await;
    env.add_media("video/sample.mp4", "sample.mp4");
    let role = env.role();
    let admin = PgPool::connect(ADMIN_DB).await.unwrap();
    sqlx::query(&format!("CREATE ROLE {role} LOGIN")).execute(&admin).await.unwrap();
    let url = env.settings.database.url.expose().replace("postgres://postgres@", &format!("postgres://{role}@"));

    // Without the grants the role cannot even read the schema: the worker says what to do.
    let mut early = env.spawn_worker("vision", "no-grants", &[("HEIMDEX__DATABASE__URL", &url)]);
    assert_eq!(early.wait_exit(Duration::from_secs(60)).await, Some(1), "{}", early.log());
    assert!(early.log().contains("checking the schema"), "{}", early.log());

    let (code, out, err) = env.cli_with(&[("HEIMDEX__DATABASE__WORKER_ROLE", &role)], &["migrate"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&role), "{out}");

    let worker = env.spawn_worker("vision", "least-privilege", &[("HEIMDEX__DATABASE__URL", &url)]);
    env.wait_state(&worker, WorkerState::Warm, Duration::from_secs(180)).await;
    let as_role = [("HEIMDEX__DATABASE__URL", url.as_str())];
    let (code, out, err) = env.cli_with(&as_role, &["enqueue", "sample.mp4", "--kind", "vision", "--wait", "--timeout", "300"]).await;
    assert_eq!(code, 0, "{out}{err}\n{}", worker.log());
    let frames: i64 = sqlx::query_scalar("SELECT count(*) FROM frames").fetch_one(&env.pool).await.unwrap();
    assert!(frames > 0, "{out}");

    let pool = PgPool::connect(&url).await.unwrap();
    for sql in [
        "CREATE TABLE intruder (a int)",
        "CREATE INDEX intruder ON frames (ts_s)",
        "ALTER TABLE jobs ADD COLUMN intruder int",
        "TRUNCATE frames",
        "DELETE FROM _sqlx_migrations",
    ] {
        assert_eq!(refused(&pool, sql).await, "42501", "{sql}");
    }
    pool.close().await;
    drop(worker);
    env.cleanup().await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname = $1").bind(&role).fetch_one(&admin).await.unwrap();
    assert_eq!(left, 0, "the cleanup removes the test's role");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_refuses_to_start_on_a_database_without_the_schema() {
    let env = TestEnv::new().await;
    let admin = PgPool::connect(ADMIN_DB).await.unwrap();
    let empty = format!("heimdex_{}_empty", env.name);
    sqlx::query(&format!("CREATE DATABASE {empty}")).execute(&admin).await.unwrap();
    let url = format!("postgres://postgres@127.0.0.1:5432/{empty}");
    let mut worker = env.spawn_worker("vision", "unmigrated", &[("HEIMDEX__DATABASE__URL", &url)]);
    assert_eq!(worker.wait_exit(Duration::from_secs(60)).await, Some(1), "{}", worker.log());
    assert!(worker.log().contains("run `heimdex migrate`"), "{}", worker.log());
    // ... and changed nothing there.
    let tables: i64 = {
        let pool = PgPool::connect(&url).await.unwrap();
        let n = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetch_one(&pool).await.unwrap();
        pool.close().await;
        n
    };
    assert_eq!(tables, 0);
    sqlx::query(&format!("DROP DATABASE {empty} WITH (FORCE)")).execute(&admin).await.unwrap();
    env.cleanup().await;
}
