//! The example configuration parses, and the environment overrides the file.

use std::path::Path;

#[test]
fn example_config_loads_and_env_wins() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/heimdex.example.toml");
    // Run in a child process so the variable never leaks into other tests of this binary.
    if std::env::var_os("HEIMDEX_CONFIG_CHILD").is_none() {
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "example_config_loads_and_env_wins", "--nocapture"])
            .env("HEIMDEX_CONFIG_CHILD", "1")
            .env("HEIMDEX__WORKER__CONCURRENCY", "7")
            .env("HEIMDEX__INDEX__EMBED_POOLING", "cls")
            .env("HEIMDEX__DATABASE__URL", "postgres://u:hunter2@db/x")
            .env("HEIMDEX__S3__ENDPOINT", "http://minio:9000")
            .env("HEIMDEX__S3__ACCESS_KEY_ID", "AKIDHUNTER3")
            .env("HEIMDEX__S3__SECRET_ACCESS_KEY", "hunter3/s3")
            .env("HEIMDEX__AMQP__URLS", "amqp://u:hunter2@node1/%2f,amqp://u:hunter2@node2/%2f")
            .status()
            .unwrap();
        assert!(status.success());
        return;
    }
    let settings = heimdex_shared::config::load(Some(&file)).unwrap();
    assert_eq!(settings.worker.concurrency, 7);
    assert_eq!(settings.worker.retry_base_ms, 2000);
    assert_eq!(settings.index.embed_pooling, heimdex_shared::config::Pooling::Cls);
    assert_eq!(settings.models.dir, Path::new("/models"));
    let brokers: Vec<&str> = settings.amqp.urls.iter().map(|u| u.expose()).collect();
    assert_eq!(brokers, ["amqp://u:hunter2@node1/%2f", "amqp://u:hunter2@node2/%2f"], "a comma-separated list of brokers");
    assert_eq!(settings.amqp.queue_type, heimdex_shared::config::QueueType::Quorum);
    assert_eq!((settings.s3.endpoint.as_str(), settings.s3.secret_access_key.expose()), ("http://minio:9000", "hunter3/s3"));
    let shown = format!("{settings:?}");
    assert!(!shown.contains("hunter2") && !shown.contains("hunter3") && !shown.contains("AKIDHUNTER3"), "secrets are redacted");
}
