//! A scratch database for one benchmark run: created on the configured PostgreSQL server, migrated as
//! `heimdex migrate` would (tables, search functions, vector indexes), dropped at the end.

use anyhow::{Context, Result};
use heimdex_shared::Settings;
use heimdex_shared::config::Secret;
use sqlx::Connection;

pub struct ScratchDb {
    /// The server's `postgres` database, from which the scratch one is created and dropped.
    admin: String,
    name: String,
    /// The caller's settings with `database.url` pointing at the scratch database.
    pub settings: Settings,
}

impl ScratchDb {
    /// Creates `heimdex_bench_{label}_{random}` and migrates it.
    ///
    /// # Errors
    /// The server is unreachable or refuses the database.
    pub async fn create(settings: &Settings, label: &str) -> Result<Self> {
        let mut url = url::Url::parse(settings.database.url.expose()).context("database.url")?;
        let name = format!("heimdex_bench_{label}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        url.set_path("/postgres");
        let admin = url.to_string();
        url.set_path(&format!("/{name}"));
        let mut conn = sqlx::PgConnection::connect(&admin).await.with_context(|| format!("connecting to {admin}"))?;
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await?;
        conn.close().await?;
        let mut scratch = settings.clone();
        scratch.database.url = Secret::new(url.to_string());
        let db = Self { admin, name, settings: scratch };
        let pool = heimdex_shared::db::pool(&db.settings.database)?;
        heimdex_shared::db::migrate(&pool, &db.settings).await.context("migrate")?;
        pool.close().await;
        Ok(db)
    }

    /// The scratch database's URL.
    pub fn url(&self) -> &str {
        self.settings.database.url.expose()
    }

    /// Drops the database (best effort: a failure leaves it for `DROP DATABASE` by hand).
    pub async fn drop_it(&self) {
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin).await {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).execute(&mut conn).await;
        }
    }
}
