//! PostgreSQL: the pool, the schema (migrations, vector indexes, the workers' rights), and helpers for
//! pgvector.

use std::fmt::Write as _;

use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::config::{DatabaseSettings, Settings};
use crate::error::{Dependency, Disposition};

/// The migrations in `migrations/`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// True when an error means the database cannot be reached (as opposed to a bad query): no
/// connection, or a server shutting down or starting (`57P01` admin shutdown, `57P02` crash
/// shutdown, `57P03` cannot connect now), which a PostgreSQL restart sends to every session.
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| matches!(c.as_ref(), "57P01" | "57P02" | "57P03")),
        _ => false,
    }
}

/// A database error's disposition: unreachable means pause (no attempt spent), anything else retry.
pub fn disposition(e: &sqlx::Error) -> Disposition {
    if is_unavailable(e) { Disposition::Unavailable(Dependency::Database) } else { Disposition::Retryable }
}

/// A lazily connecting pool: creating it never fails on a database that is down. Every connection
/// has a statement and a lock timeout, so a database that stops answering or a lock held elsewhere
/// fails a query in bounded time instead of hanging a task until the task timeout.
///
/// # Errors
/// A malformed URL.
pub fn pool(settings: &DatabaseSettings) -> Result<PgPool, sqlx::Error> {
    let options: sqlx::postgres::PgConnectOptions = settings.url.expose().parse()?;
    let options = options.options([
        ("statement_timeout", format!("{}ms", settings.statement_timeout_ms)),
        ("lock_timeout", format!("{}ms", settings.lock_timeout_ms)),
    ]);
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(std::time::Duration::from_millis(settings.acquire_timeout_ms))
        .connect_lazy_with(options))
}

/// Brings the database to the schema this build needs: the migrations (the `vector` extension and
/// the tables), the partial HNSW index of every configured embedding model, and, when
/// `database.worker_role` is set, that role's rights. Runs as the schema's owner (`heimdex migrate`);
/// workers never change the schema, they only check it ([`missing_migrations`]). Idempotent; sqlx
/// serialises concurrent runs with an advisory lock.
///
/// # Errors
/// The database is unreachable, a migration fails, or the connecting role lacks the rights.
pub async fn migrate(pool: &PgPool, settings: &Settings) -> Result<(), sqlx::Error> {
    MIGRATOR.run(pool).await.map_err(|e| sqlx::Error::Migrate(Box::new(e)))?;
    for (table, model, dim) in vector_indexes(settings) {
        ensure_vector_index(pool, &settings.database, table, model, dim).await?;
    }
    let role = settings.database.worker_role.trim();
    if !role.is_empty() {
        grant_worker_rights(pool, role).await?;
    }
    Ok(())
}

/// The (table, model, dimension) of every embedding column the configured models fill.
pub fn vector_indexes(settings: &Settings) -> [(&'static str, &str, usize); 3] {
    let (index, vision) = (&settings.index, &settings.vision);
    [
        ("transcript_segments", index.embed_model.as_str(), index.embed_dim),
        ("frames", vision.embed_model.as_str(), vision.embed_dim),
        ("scenes", vision.embed_model.as_str(), vision.embed_dim),
    ]
}

/// The rights of the role workers and producers connect as: reading and writing Heimdex's rows, and
/// reading which migrations ran. No DDL, no TRUNCATE, no writes to the migration history.
async fn grant_worker_rights(pool: &PgPool, role: &str) -> Result<(), sqlx::Error> {
    let role = format!("\"{}\"", role.replace('"', "\"\""));
    let mut tx = pool.begin().await?;
    for sql in [
        format!("GRANT USAGE ON SCHEMA public TO {role}"),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"),
        format!("REVOKE INSERT, UPDATE, DELETE ON _sqlx_migrations FROM {role}"),
        format!("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}"),
    ] {
        sqlx::query(&sql).execute(&mut *tx).await?;
    }
    tx.commit().await
}

/// Versions of the migrations this build needs that the database has not applied (all of them on an
/// empty database). A worker refuses to start unless this is empty.
///
/// # Errors
/// The database is unreachable.
pub async fn missing_migrations(pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
    let applied: Vec<i64> = match sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success").fetch_all(pool).await {
        Ok(v) => v,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Vec::new(),
        Err(e) => return Err(e),
    };
    Ok(MIGRATOR.iter().map(|m| m.version).filter(|v| !applied.contains(v)).collect())
}

/// One word of a transcript segment, with its times: the shape of each element of
/// `transcript_segments.words` (a JSON array; NULL without word timestamps), as `worker-index` writes
/// it and the transcript exports and search read it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Word {
    pub text: String,
    /// Seconds on the recording's clock.
    pub start_s: f64,
    pub end_s: f64,
    /// Mean probability of the word's tokens.
    pub probability: f32,
}

/// pgvector's text form of a vector: `[0.1,0.2,...]`; bind it as text and cast with `::vector`.
pub fn vector_literal(values: &[f32]) -> String {
    float_list(values, '[', ']')
}

/// PostgreSQL's text form of a `real[]`: `{0.1,0.2,...}`; bind it as text and cast with `::real[]`
/// (inside UNNEST of a `text[]`, where arrays of arrays cannot be bound directly).
pub fn array_literal(values: &[f32]) -> String {
    float_list(values, '{', '}')
}

fn float_list(values: &[f32], open: char, close: char) -> String {
    let mut out = String::with_capacity(values.len() * 10 + 2);
    out.push(open);
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{v}");
    }
    out.push(close);
    out
}

/// The name of the partial HNSW index of `table` for one model and dimension (PostgreSQL keeps 63
/// characters of a name).
pub fn vector_index_name(table: &str, model: &str, dim: usize) -> String {
    let slug: String = model.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
    format!("{table}_hnsw_{slug}_{dim}").chars().take(63).collect()
}

/// Creates, if missing, the partial HNSW cosine index of `table.embedding` for one model, so that a
/// model of any dimension is indexed by configuration alone. Vectors are indexed as `halfvec(dim)`
/// (16-bit floats: half the graph's bytes; bench-search measures the recall against fp32), with
/// `database.hnsw_m` links per node and `database.hnsw_ef_construction` (256 rather than pgvector's
/// 64: on clustered vectors a thinner graph leaves a query's cluster unreachable from where the
/// search lands often enough to cost recall: 0.92 at k = 10 with 64 at 100k frames, 0.96 with 128 at
/// 1M (bench-search); each doubling about doubles the build time). An index that exists is kept as
/// it is: a changed `m` or `ef_construction` applies to indexes built after it (drop one to rebuild
/// it).
///
/// The build gets `database.index_build_memory_mb` of `maintenance_work_mem` (a graph that outgrows
/// it is built many times slower) and `database.index_build_workers` parallel workers, and no
/// statement timeout: at a million rows it takes minutes, and only `heimdex migrate` builds.
///
/// # Errors
/// The database is unreachable, or `table` has no `embedding`/`embedding_model` columns.
pub async fn ensure_vector_index(
    pool: &PgPool,
    settings: &DatabaseSettings,
    table: &str,
    model: &str,
    dim: usize,
) -> Result<(), sqlx::Error> {
    let name = vector_index_name(table, model, dim);
    let model_sql = model.replace('\'', "''");
    let sql = format!(
        "CREATE INDEX IF NOT EXISTS \"{name}\" ON {table} USING hnsw ((embedding::halfvec({dim})) halfvec_cosine_ops) \
         WITH (m = {m}, ef_construction = {ef}) WHERE embedding_model = '{model_sql}'",
        m = settings.hnsw_m,
        ef = settings.hnsw_ef_construction,
    );
    // Concurrent workers would race on the catalog; one lock per index name serialises them.
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))").bind(&name).execute(&mut *tx).await?;
    for (setting, value) in [
        ("maintenance_work_mem", format!("{}MB", settings.index_build_memory_mb)),
        ("max_parallel_maintenance_workers", settings.index_build_workers.to_string()),
        ("statement_timeout", "0".to_string()),
    ] {
        sqlx::query("SELECT set_config($1, $2, true)").bind(setting).bind(value).execute(&mut *tx).await?;
    }
    sqlx::query(&sql).execute(&mut *tx).await?;
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_literals() {
        assert_eq!(vector_literal(&[1.0, -0.5, 0.25]), "[1,-0.5,0.25]");
        assert_eq!(vector_literal(&[]), "[]");
        assert_eq!(array_literal(&[1.0, 2.5]), "{1,2.5}");
    }
}
