//! `heimdex serve`: an HTTP API over what the CLI does (enqueue, read jobs, export transcripts, the
//! fleet's status) and a status page that refreshes itself.
//!
//! The server holds no model and never waits on one: enqueueing writes the job and its message,
//! reading is SQL, and status is Redis, passive queue declares and SQL. Bad requests get a 4xx with
//! the reason as JSON (`{"error": "..."}`); a database or broker that is down gets 503, and the broker
//! connection is opened again on the next request.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /` | the status page (HTML; reads `/v1/status` every 2 s) |
//! | `GET /v1/status` | [`Snapshot`] as JSON |
//! | `POST /v1/videos` | enqueue: `{"uri": "talks/a.mp4", "kinds": ["index"], "force": false, "language": "en"}` → 202 |
//! | `GET /v1/jobs/{id}` | one job, with its stage timings and summary |
//! | `GET /v1/videos/{id}/transcript?format=srt` | the transcript as srt, vtt, json or txt |
//! | `GET /v1/search?q=TEXT&in=segments\|frames&video=V&limit=10` | segments or frames by text (query vector from a warm worker) |
//! | `GET /v1/search?similar_to=VIDEO@SECONDS&video=V&limit=10` | frames like a stored frame |
//!
//! A search whose query vector no warm worker gives (none warm, or none in time) gets 503 at once or
//! after the query timeout (10 s); the server itself never embeds anything.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use heimdex_shared::Settings;
use heimdex_shared::contract::{TaskKind, TaskOptions};
use heimdex_shared::error::Disposition;
use heimdex_shared::jobs;
use heimdex_shared::query::{QueryClient, QueryError};
use serde::Deserialize;
use sqlx::PgPool;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::search::{self, SearchError};
use crate::status::{self, Snapshot};
use crate::transcript::{self, Format, TranscriptError};
use crate::{EnqueueRequest, Producer, ProducerError};

/// The status page: static HTML whose script renders `/v1/status`.
const STATUS_PAGE: &str = include_str!("status_page.html");

/// What every handler shares: settings, a database pool and a broker connection made on demand.
struct App {
    settings: Settings,
    pool: PgPool,
    producer: Mutex<Option<Arc<Producer>>>,
    queries: Mutex<Option<Arc<QueryClient>>>,
}

impl App {
    /// The broker connection, opened again after a failure dropped it.
    async fn producer(&self) -> Result<Arc<Producer>, ApiError> {
        let mut held = self.producer.lock().await;
        if let Some(p) = held.as_ref().filter(|p| p.channel().status().connected()) {
            return Ok(p.clone());
        }
        let p = Arc::new(Producer::connect(&self.settings).await.map_err(ApiError::from)?);
        *held = Some(p.clone());
        Ok(p)
    }

    /// The query client (its own broker connection, for direct reply-to), opened again after a
    /// broker failure dropped it.
    async fn queries(&self) -> Result<Arc<QueryClient>, ApiError> {
        let mut held = self.queries.lock().await;
        if let Some(q) = held.as_ref() {
            return Ok(q.clone());
        }
        let q = Arc::new(QueryClient::connect(&self.settings).await.map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?);
        *held = Some(q.clone());
        Ok(q)
    }
}

/// An error answer: the status and the reason.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<ProducerError> for ApiError {
    fn from(e: ProducerError) -> Self {
        let status = match &e {
            ProducerError::Media(m) if m.disposition() == Disposition::Permanent => StatusCode::UNPROCESSABLE_ENTITY,
            ProducerError::Read { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ProducerError::Options(_) => StatusCode::BAD_REQUEST,
            // The jobs are stored; the workers publish their messages (see `ProducerError::Outbox`).
            ProducerError::Outbox(_) => StatusCode::ACCEPTED,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self(status, e.to_string())
    }
}

impl From<SearchError> for ApiError {
    fn from(e: SearchError) -> Self {
        let status = match &e {
            SearchError::NoVideo(_) | SearchError::NoFrame { .. } => StatusCode::NOT_FOUND,
            SearchError::BadFrameRef(_) => StatusCode::BAD_REQUEST,
            SearchError::Query(q) if q.disposition() == Disposition::Permanent => StatusCode::BAD_REQUEST,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self(status, heimdex_shared::telemetry::chain(&e))
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        Self(StatusCode::SERVICE_UNAVAILABLE, heimdex_shared::telemetry::chain(e.as_ref()))
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Self(StatusCode::SERVICE_UNAVAILABLE, format!("database: {e}"))
    }
}

fn bad_request(reason: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, reason.into())
}

/// The API's routes over `settings`' database and broker.
///
/// # Errors
/// The database settings are invalid.
pub fn router(settings: &Settings) -> anyhow::Result<Router> {
    let pool = heimdex_shared::db::pool(&settings.database)?;
    let app = Arc::new(App { settings: settings.clone(), pool, producer: Mutex::new(None), queries: Mutex::new(None) });
    Ok(Router::new()
        .route("/", get(|| async { Html(STATUS_PAGE) }))
        .route("/v1/status", get(status_json))
        .route("/v1/videos", post(enqueue))
        .route("/v1/jobs/{id}", get(job))
        .route("/v1/videos/{id}/transcript", get(video_transcript))
        .route("/v1/search", get(search_handler))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such route (see GET / and /v1/...)".into()) })
        .with_state(app))
}

/// Serves the API on `addr` until `shutdown` completes; `bound` is told the address really bound
/// (port 0 picks a free one).
///
/// # Errors
/// The address cannot be bound.
pub async fn serve(
    settings: &Settings,
    addr: SocketAddr,
    bound: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let router = router(settings)?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    bound(listener.local_addr()?);
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

async fn status_json(State(app): State<Arc<App>>) -> Result<Json<Snapshot>, ApiError> {
    let producer = app.producer().await?;
    let snapshot = status::snapshot(&app.settings, &app.pool, producer.channel()).await;
    if snapshot.is_err() {
        // A channel error (the broker restarted) closes the channel: the next request reconnects.
        app.producer.lock().await.take();
    }
    Ok(Json(snapshot?))
}

/// The body of `POST /v1/videos`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnqueueBody {
    uri: String,
    /// Default: every kind.
    #[serde(default)]
    kinds: Vec<TaskKind>,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    frame_rate: Option<f32>,
}

async fn enqueue(State(app): State<Arc<App>>, body: Result<Json<EnqueueBody>, JsonRejection>) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| bad_request(e.body_text()))?;
    if body.uri.trim().is_empty() {
        return Err(bad_request("uri is empty"));
    }
    if body.frame_rate.is_some_and(|r| !(r > 0.0 && r <= 60.0)) {
        return Err(bad_request("frame_rate must be in (0, 60]"));
    }
    let mut request = EnqueueRequest::all(body.uri);
    if !body.kinds.is_empty() {
        request.kinds = body.kinds;
    }
    request.force = body.force;
    request.options = TaskOptions { language: body.language, frame_rate: body.frame_rate };
    let producer = app.producer().await?;
    let enqueued = match producer.enqueue(&request).await {
        Ok(e) => e,
        Err(e) => {
            if matches!(e, ProducerError::Broker(_) | ProducerError::Publish(_)) {
                app.producer.lock().await.take();
            }
            return Err(e.into());
        }
    };
    let jobs: Vec<_> = enqueued
        .jobs
        .iter()
        .map(|j| serde_json::json!({ "kind": j.kind, "job_id": j.job_id, "published": j.published, "status": j.status }))
        .collect();
    let body = serde_json::json!({ "video_id": enqueued.video_id, "uri": enqueued.uri, "jobs": jobs });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|e| bad_request(format!("{id:?} is not a uuid: {e}")))
}

async fn job(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<jobs::JobRow>, ApiError> {
    let id = parse_id(&id)?;
    let row = jobs::jobs_by_id(&app.pool, &[id]).await?.into_iter().next();
    row.map(Json).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no job {id}")))
}

#[derive(Debug, Deserialize)]
struct TranscriptQuery {
    format: Option<String>,
}

async fn video_transcript(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(query): Query<TranscriptQuery>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let name = query.format.as_deref().unwrap_or("json");
    let format: Format = clap::ValueEnum::from_str(name, true).map_err(|_| bad_request(format!("format {name:?}: use srt, vtt, json or txt")))?;
    let t = transcript::load(&app.pool, &app.settings, &id.to_string()).await.map_err(|e| match e {
        TranscriptError::NoVideo(_) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
        TranscriptError::NotIndexed { .. } => ApiError(StatusCode::CONFLICT, e.to_string()),
        TranscriptError::Database(e) => e.into(),
    })?;
    let content_type = match format {
        Format::Srt => "application/x-subrip; charset=utf-8",
        Format::Vtt => "text/vtt; charset=utf-8",
        Format::Json => "application/json",
        Format::Txt => "text/plain; charset=utf-8",
    };
    Ok(([(header::CONTENT_TYPE, content_type)], transcript::render(&t, format)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchQuery {
    q: Option<String>,
    #[serde(rename = "in")]
    target: Option<String>,
    similar_to: Option<String>,
    video: Option<String>,
    limit: Option<u32>,
}

async fn search_handler(State(app): State<Arc<App>>, query: Result<Query<SearchQuery>, QueryRejection>) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(query) = query.map_err(|e| bad_request(e.body_text()))?;
    let limit = query.limit.unwrap_or(10);
    if !(1..=1000).contains(&limit) {
        return Err(bad_request("limit must be in 1..=1000"));
    }
    let (pool, settings) = (&app.pool, &app.settings);
    let video = match &query.video {
        Some(v) => Some(search::resolve_video(pool, settings, v).await?.0),
        None => None,
    };
    if let Some(frame) = &query.similar_to {
        if query.q.is_some() {
            return Err(bad_request("give q or similar_to, not both"));
        }
        let (of, at_s) = search::parse_frame_ref(frame)?;
        let (of, uri) = search::resolve_video(pool, settings, of).await?;
        let hits = search::similar_frames(pool, settings, of, at_s, limit, video).await?;
        let source = serde_json::json!({ "video_id": of, "uri": uri, "at_s": at_s });
        return Ok(Json(serde_json::json!({ "in": "frames", "model": settings.vision.embed_model, "similar_to": source, "hits": hits })));
    }
    let text = query.q.as_deref().map(str::trim).filter(|q| !q.is_empty()).ok_or_else(|| bad_request("q (the text to search for) or similar_to is required"))?;
    let queries = app.queries().await?;
    let result = match query.target.as_deref().unwrap_or("segments") {
        "segments" => search::segments(pool, &queries, settings, text, limit, video)
            .await
            .map(|hits| serde_json::json!({ "in": "segments", "model": settings.index.embed_model, "query": text, "hits": hits })),
        "frames" => search::frames(pool, &queries, settings, text, limit, video)
            .await
            .map(|hits| serde_json::json!({ "in": "frames", "model": settings.vision.embed_model, "query": text, "hits": hits })),
        other => return Err(bad_request(format!("in={other:?}: use segments or frames"))),
    };
    if let Err(SearchError::Query(QueryError::Broker(_) | QueryError::Closed)) = &result {
        app.queries.lock().await.take();
    }
    Ok(Json(result?))
}
