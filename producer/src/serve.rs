//! `heimdex serve`: an HTTP API over what the CLI does (enqueue, read jobs, export transcripts, the
//! fleet's status) and a status page that refreshes itself.
//!
//! The server holds no model and never waits on one: enqueueing writes the job and its message,
//! reading is SQL, and status is Redis, passive queue declares and SQL. Bad requests get a 4xx with
//! the reason as JSON (`{"error": "..."}`); a database or broker that is down, or that accepts a
//! connection and never answers, gets 503 within the request timeout, and the broker connection is
//! opened again on the next request (each request connects on its own: one hung connect blocks
//! nobody else).
//!
//! Every surface is meant for strangers ([`ServeSettings`] holds the knobs):
//! - with `serve.api_keys`, every route but `/healthz` needs `Authorization: Bearer KEY` (compared
//!   through SHA-256 digests, so that timing tells nothing); without keys only loopback addresses
//!   are bound, `force` needs `serve.allow_force`, and deleting is refused;
//! - the `Host` header must name one of `serve.allowed_hosts` (loopback names by default), so that a
//!   browser led here by DNS rebinding is refused;
//! - headers must arrive within `header_timeout_ms`, a request ends within `request_timeout_ms`
//!   (its wait for one of `max_concurrent_requests` slots included), bodies are capped at
//!   `max_body_bytes` and connections at `max_connections`;
//! - answers show media URLs without user info or query ([`heimdex_shared::remote::redact`]), and
//!   errors give a reason without database error chains, paths or the media root; a path outside
//!   the media root gets the same answer as a missing one.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /healthz`, `GET /readyz` | `ok` / `ready` (503 when the database or the broker does not answer), without a key or Host check (for orchestrators' probes) |
//! | `GET /openapi.json` | the OpenAPI 3.1 document of everything below ([`openapi`]), without a key or Host check |
//! | `GET /` | the status page (HTML; reads `/v1/status` every 2 s) |
//! | `GET /v1/status` | [`Snapshot`] as JSON |
//! | `POST /v1/videos` | enqueue: `{"uri": "talks/a.mp4", "kinds": ["index"], "force": false, "language": "en", "task": "transcribe", "external_id": "order-7", "metadata": {...}}` → 202 |
//! | `GET /v1/videos?limit=&cursor=` | `{"videos": [...], "next_cursor": ...}`: videos with their jobs, newest first |
//! | `GET /v1/jobs/{id}` | one job, with its stage timings, summary, `external_id` and `metadata` |
//! | `GET /v1/jobs?status=&kind=&external_id=&limit=&cursor=` | `{"jobs": [...], "next_cursor": ...}`: the jobs matching every filter given, newest first |
//! | `DELETE /v1/videos/{id}?force=false` | delete the video and all its rows (needs an API key; 409 while a job runs, unless `force`) → 200 with row counts |
//! | `GET /v1/videos/{id}/transcript?format=srt&words=false` | the transcript as srt, vtt, json or txt (json with each line's timed words; `words=true` times words in vtt cues) |
//! | `GET /v1/search?q=TEXT&in=segments\|frames&video=V&limit=10` | segments or frames by text (query vector from a warm worker) |
//! | `GET /v1/search?similar_to=VIDEO@SECONDS&video=V&limit=10` | frames like a stored frame |
//!
//! A search whose query vector no warm worker gives (none warm, or none in time) gets 503 at once or
//! after the query timeout (10 s); the server itself never embeds anything.
//!
//! Lists page by keyset: a page holds up to `limit` rows (default [`PAGE_DEFAULT`], at most
//! [`PAGE_MAX`]) and, when more follow, a `next_cursor` to pass as `cursor` for the next page. The
//! order is creation order, newest first, and a row's place in it never changes, so paging while
//! videos are enqueued neither repeats nor skips a row (new ones appear on the first page).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aide::axum::ApiRouter;
use aide::axum::routing::{delete_with, get_with, post_with};
use aide::generate::GenContext;
use aide::openapi::{self, OpenApi, SecurityScheme};
use aide::transform::{TransformOpenApi, TransformOperation};
use axum::Json;
use axum::Router;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use heimdex_shared::Settings;
use heimdex_shared::config::ServeSettings;
use heimdex_shared::contract::{self, Metadata, SpeechTask, TaskKind, TaskOptions};
use heimdex_shared::delete::{self as deletion, DeleteError, Deleted};
use heimdex_shared::error::Disposition;
use heimdex_shared::jobs::{self, JobFilter, JobRow, JobStatus, VideoRow};
use heimdex_shared::media::MediaError;
use heimdex_shared::query::{QueryClient, QueryError};
use heimdex_shared::remote;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::sync::{Mutex, Semaphore};
use uuid::Uuid;

use crate::search::{self, FrameHit, SearchError, SegmentHit};
use crate::status::{self, Snapshot};
use crate::transcript::{self, Format, TranscriptError};
use crate::{EnqueueRequest, Enqueued, Producer, ProducerError};

/// The status page: static HTML whose script renders `/v1/status`.
const STATUS_PAGE: &str = include_str!("status_page.html");

/// What every handler shares: settings, a database pool and a broker connection made on demand.
struct App {
    settings: Settings,
    pool: PgPool,
    /// The broker connections; each lock is held only to read or store one, never across a connect.
    producer: Mutex<Option<Arc<Producer>>>,
    queries: Mutex<Option<Arc<QueryClient>>>,
    /// SHA-256 of each API key.
    keys: Vec<[u8; 32]>,
    /// Slots for requests in progress (`serve.max_concurrent_requests`).
    slots: Semaphore,
    /// Paths that no answer may show: the media root (as configured and resolved) and the temp folder.
    hidden_paths: Vec<String>,
}

impl App {
    fn new(settings: &Settings, pool: PgPool) -> Self {
        let root = &settings.media.root;
        let mut hidden_paths = vec![root.display().to_string(), std::env::temp_dir().display().to_string()];
        if let Ok(real) = root.canonicalize() {
            hidden_paths.push(real.display().to_string());
        }
        hidden_paths.retain(|p| p.len() > 1);
        Self {
            settings: settings.clone(),
            pool,
            producer: Mutex::new(None),
            queries: Mutex::new(None),
            keys: settings.serve.api_keys.iter().map(|k| digest(k.expose())).collect(),
            slots: Semaphore::new(settings.serve.max_concurrent_requests),
            hidden_paths,
        }
    }

    fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.settings.serve.connect_timeout_ms)
    }

    /// The broker connection, opened again after a failure dropped it. Concurrent requests during
    /// an outage each try (and time out) on their own.
    async fn producer(&self) -> Result<Arc<Producer>, ApiError> {
        if let Some(p) = self.producer.lock().await.as_ref().filter(|p| p.channel().status().connected()) {
            return Ok(p.clone());
        }
        let p = match tokio::time::timeout(self.connect_timeout(), Producer::connect(&self.settings)).await {
            Ok(Ok(p)) => Arc::new(p),
            Ok(Err(e)) => return Err(ApiError::unavailable("the broker", &e)),
            Err(_) => return Err(ApiError::unavailable("the broker", &TimedOut(self.connect_timeout()))),
        };
        let mut held = self.producer.lock().await;
        match held.as_ref().filter(|q| q.channel().status().connected()) {
            Some(other) => Ok(other.clone()),
            None => Ok(held.insert(p).clone()),
        }
    }

    /// The query client (its own broker connection, for direct reply-to), opened again after a
    /// broker failure dropped it.
    async fn queries(&self) -> Result<Arc<QueryClient>, ApiError> {
        if let Some(q) = self.queries.lock().await.as_ref() {
            return Ok(q.clone());
        }
        let q = match tokio::time::timeout(self.connect_timeout(), QueryClient::connect(&self.settings)).await {
            Ok(Ok(q)) => Arc::new(q),
            Ok(Err(e)) => return Err(ApiError::unavailable("the broker", &e)),
            Err(_) => return Err(ApiError::unavailable("the broker", &TimedOut(self.connect_timeout()))),
        };
        Ok(self.queries.lock().await.get_or_insert(q).clone())
    }

    /// `text` with every path under a [hidden](Self::hidden_paths) folder replaced by `…`.
    fn hide_paths(&self, text: &str) -> String {
        let mut out = text.to_string();
        // Longest first: the resolved root may lie inside the temp folder (tests) or the other way round.
        let mut hidden: Vec<&String> = self.hidden_paths.iter().collect();
        hidden.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for path in hidden {
            while let Some(at) = out.find(path.as_str()) {
                let end = out[at..].find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | ')')).map_or(out.len(), |n| at + n);
                out.replace_range(at..end, "…");
            }
        }
        out
    }

    /// The answer for media that was refused: a reason, and never whether a path outside the media
    /// root exists, nor where the media root or a download lies.
    fn media_error(&self, e: &MediaError) -> ApiError {
        match e {
            MediaError::NotFound(_) | MediaError::OutsideRoot { .. } => {
                ApiError(StatusCode::UNPROCESSABLE_ENTITY, "media file not found under the media root".into())
            }
            MediaError::Empty(_) => ApiError(StatusCode::UNPROCESSABLE_ENTITY, "the media file is empty".into()),
            MediaError::Unreadable { uri, reason } => {
                let reason = self.hide_paths(&reason.replace(uri.as_str(), "the media"));
                ApiError(StatusCode::UNPROCESSABLE_ENTITY, format!("ffprobe cannot read the media: {reason}"))
            }
            MediaError::Tool(_) => ApiError::unavailable("ffprobe", e),
            _ if e.disposition() == Disposition::Permanent => ApiError(StatusCode::UNPROCESSABLE_ENTITY, self.hide_paths(&e.to_string())),
            _ => ApiError(StatusCode::SERVICE_UNAVAILABLE, self.hide_paths(&e.to_string())),
        }
    }

    fn enqueue_error(&self, e: &ProducerError) -> ApiError {
        match e {
            ProducerError::Media(m) => self.media_error(m),
            ProducerError::Read { .. } => ApiError(StatusCode::UNPROCESSABLE_ENTITY, "the media file cannot be read".into()),
            ProducerError::Options(_) => bad_request(e.to_string()),
            // The jobs are stored; the workers publish their messages (see `ProducerError::Outbox`).
            ProducerError::Outbox(_) => {
                ApiError(StatusCode::ACCEPTED, "the jobs are stored; their messages are published once the broker takes them".into())
            }
            ProducerError::Database(_) => ApiError::unavailable("the database", e),
            ProducerError::Broker(_) | ProducerError::Publish(_) => ApiError::unavailable("the broker", e),
        }
    }
}

/// A connect that took longer than its bound.
#[derive(Debug, thiserror::Error)]
#[error("no answer within {0:?}")]
struct TimedOut(Duration);

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// Whether `headers` carry exactly one `Authorization: Bearer KEY` with one of `keys` (digests).
/// Every key is compared, byte by byte without an early exit, as digests: the time taken tells
/// nothing about a key.
fn authorized(keys: &[[u8; 32]], headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else { return false };
    let Some((scheme, token)) = value.to_str().ok().and_then(|v| v.trim().split_once(|c: char| c.is_ascii_whitespace())) else {
        return false;
    };
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return false;
    }
    let given = digest(token);
    let mut found = 0u8;
    for key in keys {
        let diff = key.iter().zip(&given).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        found |= u8::from(std::hint::black_box(diff) == 0);
    }
    found == 1
}

/// The host name of a `Host` value or URI authority (`name`, `name:port`, `[v6]`, `[v6]:port`),
/// lowercased, without a trailing dot; `None` when it is malformed.
fn host_name(value: &str) -> Option<String> {
    let value = value.trim();
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        (host, after.strip_prefix(':').map_or((!after.is_empty()).then_some(""), Some))
    } else {
        match value.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (value, None),
        }
    };
    if port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) || host.is_empty() {
        return None;
    }
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    (!host.is_empty() && !host.contains(['@', '/', '\\', ' '])).then_some(host)
}

/// An entry of `serve.allowed_hosts` as [`host_name`] gives names: `::1` or `[::1]`, any case, with
/// or without a trailing dot.
fn allowed_name(entry: &str) -> String {
    let entry = entry.trim();
    let entry = entry.strip_prefix('[').and_then(|e| e.strip_suffix(']')).unwrap_or(entry);
    entry.strip_suffix('.').unwrap_or(entry).to_ascii_lowercase()
}

/// Refuses a request whose `Host` (one, and the request target's authority if it has one) is not
/// an allowed name (DNS rebinding), or that lacks a valid API key when keys are set.
async fn guard(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let allowed = &app.settings.serve.allowed_hosts;
    if !allowed.iter().any(|h| h.trim() == "*") {
        let mut hosts = request.headers().get_all(header::HOST).iter();
        let name = match (hosts.next(), hosts.next()) {
            (Some(host), None) => host.to_str().ok().and_then(host_name),
            _ => None,
        };
        let Some(name) = name else {
            return ApiError(StatusCode::BAD_REQUEST, "one valid Host header is required".into()).into_response();
        };
        let target = request.uri().authority().map(|a| host_name(a.as_str()));
        let is_allowed = |n: &str| allowed.iter().any(|h| allowed_name(h) == n);
        if !is_allowed(&name) || target.is_some_and(|t| t.as_deref().is_none_or(|t| !is_allowed(t))) {
            return ApiError(StatusCode::FORBIDDEN, "this host name is not served here (serve.allowed_hosts)".into()).into_response();
        }
    }
    if !app.keys.is_empty() && !authorized(&app.keys, request.headers()) {
        let mut response = ApiError(StatusCode::UNAUTHORIZED, "an API key is required: Authorization: Bearer KEY".into()).into_response();
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return response;
    }
    next.run(request).await
}

/// Waits for a request slot, then runs the request; 503 when both together take longer than the
/// request timeout.
async fn bounded(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let limit = Duration::from_millis(app.settings.serve.request_timeout_ms);
    let run = async {
        let _slot = app.slots.acquire().await;
        next.run(request).await
    };
    match tokio::time::timeout(limit, run).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(after = ?limit, "a request timed out (serve.request_timeout_ms)");
            ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("no answer within {limit:?} (a database or broker that is slow or down)"))
                .into_response()
        }
    }
}

/// An error answer: the status and the reason.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    /// 503 for a dependency that is down; the cause goes to the log, not to the caller.
    fn unavailable(what: &str, cause: &(dyn std::error::Error + 'static)) -> Self {
        tracing::warn!(error = %remote::redact_text(&heimdex_shared::telemetry::chain(cause)), "{what} is unavailable");
        Self(StatusCode::SERVICE_UNAVAILABLE, format!("{what} is unavailable"))
    }
}

/// The body of every error answer.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ErrorBody {
    /// Why the request was refused or failed: a reason, never a database error, a path or a secret.
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Reasons may quote the caller's input: a URL in it loses its secrets here too.
        (self.0, Json(ErrorBody { error: remote::redact_text(&self.1) })).into_response()
    }
}

/// Every operation documents its errors as the default answer: any 4xx or 5xx, with an [`ErrorBody`].
impl aide::OperationOutput for ApiError {
    type Inner = ErrorBody;

    fn operation_response(ctx: &mut GenContext, operation: &mut openapi::Operation) -> Option<openapi::Response> {
        let mut response = Json::<ErrorBody>::operation_response(ctx, operation)?;
        response.description = "An error (4xx, 5xx), with its reason".into();
        Some(response)
    }

    fn inferred_responses(
        ctx: &mut GenContext,
        operation: &mut openapi::Operation,
    ) -> Vec<(Option<openapi::StatusCode>, openapi::Response)> {
        Self::operation_response(ctx, operation).map(|r| vec![(None, r)]).unwrap_or_default()
    }
}

impl From<SearchError> for ApiError {
    fn from(e: SearchError) -> Self {
        match &e {
            SearchError::NoVideo(_) => Self(StatusCode::NOT_FOUND, "no video by that id, path or URL (as it was enqueued)".into()),
            SearchError::NoFrame { .. } => Self(StatusCode::NOT_FOUND, e.to_string()),
            SearchError::BadFrameRef(_) => {
                Self(StatusCode::BAD_REQUEST, "similar_to is not VIDEO@SECONDS (for example talk.mp4@12.5)".into())
            }
            SearchError::Query(q) if q.disposition() == Disposition::Permanent => Self(StatusCode::BAD_REQUEST, q.to_string()),
            SearchError::Query(QueryError::Broker(_) | QueryError::Publish(_)) => Self::unavailable("the broker", &e),
            SearchError::Query(q) => Self(StatusCode::SERVICE_UNAVAILABLE, q.to_string()),
            SearchError::Database(_) => Self::unavailable("the database", &e),
        }
    }
}

impl From<TranscriptError> for ApiError {
    fn from(e: TranscriptError) -> Self {
        match &e {
            TranscriptError::NoVideo(_) => Self(StatusCode::NOT_FOUND, "no video by that id".into()),
            TranscriptError::NotIndexed { .. } => Self(StatusCode::CONFLICT, e.to_string()),
            TranscriptError::Database(_) => Self::unavailable("the database", &e),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Self::unavailable("the database", &e)
    }
}

fn bad_request(reason: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, reason.into())
}

/// A job row as answers show it: its URL redacted, in its URI and in its last error.
fn shown(mut row: JobRow) -> JobRow {
    row.uri = remote::redact(&row.uri);
    row.last_error = row.last_error.map(|e| remote::redact_text(&e));
    row
}

/// The API's routes over `settings`' database and broker, with the key and Host checks and the
/// limits of `serve` (but the connection limits, which [`serve`] applies).
///
/// # Errors
/// The database settings are invalid.
pub fn router(settings: &Settings) -> anyhow::Result<Router> {
    let pool = heimdex_shared::db::pool(&settings.database)?;
    let app = Arc::new(App::new(settings, pool));
    let (router, document) = finish(|| {
        let api = api_routes()
            .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such route (see GET / and /openapi.json)".into()) })
            .layer(DefaultBodyLimit::max(settings.serve.max_body_bytes))
            .layer(middleware::from_fn_with_state(app.clone(), bounded))
            .layer(middleware::from_fn_with_state(app.clone(), guard));
        probe_routes().merge(api)
    });
    let document = serde_json::to_string(&document)?;
    let router = router.route("/openapi.json", get(move || async move { ([(header::CONTENT_TYPE, "application/json")], document) }));
    Ok(router.with_state(app))
}

/// The OpenAPI 3.1 document of the API: the routes below with their parameters, bodies and answers,
/// generated from the handlers' Rust types (the same ones that parse and answer requests).
/// `GET /openapi.json` serves it; its committed copy is `deploy/contract/openapi.json`.
pub fn openapi() -> OpenApi {
    finish(|| probe_routes().merge(api_routes())).1
}

/// The probes: outside the guard, as a kubelet calls them by the pod's address, without a key.
fn probe_routes() -> ApiRouter<Arc<App>> {
    ApiRouter::new()
        .api_route("/healthz", get_with(|| async { "ok" }, |o| o.summary("Liveness: `ok` while the process serves").tag("probes")))
        .api_route(
            "/readyz",
            get_with(readyz, |o| {
                o.summary("Readiness: whether the database and the broker answer")
                    .tag("probes")
                    .response_with::<200, String, _>(|r| r.description("`ready`"))
                    .response_with::<503, String, _>(|r| r.description("`not ready`: the log says which dependency failed"))
            }),
        )
}

/// The routes behind the guard, each with what its documentation says beyond its types.
fn api_routes() -> ApiRouter<Arc<App>> {
    ApiRouter::new()
        .route("/", get(|| async { Html(STATUS_PAGE) }))
        .api_route(
            "/v1/status",
            get_with(status_json, |o| keyed(o, "The fleet at a glance: live workers, queue depths, job counts, recent jobs and failures")),
        )
        .api_route(
            "/v1/videos",
            post_with(enqueue, |o| {
                keyed(o, "Enqueue a video for one or more kinds of work (index, vision)")
                    .description(
                        "Checks the media (a path under the media root, an http(s) URL when allowed, or s3://bucket/key), \
                         writes the video and its jobs, and publishes one task per kind. `force` re-runs jobs that are \
                         queued, running or done (it needs an API key or `serve.allow_force`).",
                    )
                    .response_with::<202, Json<Enqueued>, _>(|r| r.description("The jobs are stored and their tasks published"))
                    .with(|mut o| {
                        // A body axum refuses is answered as every other error (`ErrorBody`), not
                        // with the plain text aide infers for `Json`'s rejections.
                        if let Some(responses) = o.inner_mut().responses.as_mut() {
                            responses.responses.retain(|code, _| *code == openapi::StatusCode::Code(202));
                        }
                        o
                    })
            })
            .get_with(list_videos, |o| keyed(o, "Videos with their jobs, newest first, a page at a time")),
        )
        .api_route(
            "/v1/videos/{id}",
            delete_with(delete_video, |o| {
                keyed(o, "Delete a video and all its rows in one transaction")
                    .description("Needs an API key. 409 while one of its jobs runs, unless `force` (which supersedes the run first).")
            }),
        )
        .api_route(
            "/v1/videos/{id}/transcript",
            get_with(video_transcript, |o| {
                keyed(o, "A video's transcript")
                    .response_with::<200, String, _>(|r| r.description("The transcript as SubRip, WebVTT, JSON (segments) or plain text"))
            }),
        )
        .api_route("/v1/jobs", get_with(list_jobs, |o| keyed(o, "Jobs matching every filter given, newest first, a page at a time")))
        .api_route("/v1/jobs/{id}", get_with(job, |o| keyed(o, "One job: status, attempts, last error, stage timings, summary")))
        .api_route(
            "/v1/search",
            get_with(search_handler, |o| {
                keyed(o, "Search transcript segments or frames by text, or frames like a stored frame").description(
                    "Give `q` (with `in`) or `similar_to`. The query vector comes from a warm worker of the kind; \
                     503 when none answers within the query timeout.",
                )
            }),
        )
}

/// An operation behind the API key (when `serve.api_keys` is set).
fn keyed<'a>(operation: TransformOperation<'a>, summary: &str) -> TransformOperation<'a> {
    operation.summary(summary).tag("api").security_requirement("apiKey")
}

/// The router and the document of the routes `routes` builds.
fn finish(routes: impl FnOnce() -> ApiRouter<Arc<App>>) -> (Router<Arc<App>>, OpenApi) {
    // aide generates each route's documentation as the route is added, into a per-thread context
    // that merging into the document resets to its defaults (schemas under `#/components/schemas`,
    // inferred responses); only the error handler must be set again before the routes are built.
    aide::generate::on_error(|e| tracing::error!(error = %e, "the OpenAPI document is incomplete"));
    let mut document = OpenApi::default();
    let router = routes().finish_api_with(&mut document, describe);
    (router, document)
}

fn describe(api: TransformOpenApi<'_>) -> TransformOpenApi<'_> {
    api.title("Heimdex API")
        .version(env!("CARGO_PKG_VERSION"))
        .description(
            "Enqueue videos, follow their jobs, read transcripts, search, delete. Errors are JSON \
             (`{\"error\": \"...\"}`). Lists page by keyset: pass a page's `next_cursor` as `cursor`.",
        )
        .security_scheme(
            "apiKey",
            SecurityScheme::Http {
                scheme: "bearer".into(),
                bearer_format: None,
                description: Some("One of `serve.api_keys`; required by every operation but the probes when keys are set".into()),
                extensions: Default::default(),
            },
        )
}

/// `/readyz`: 200 when the database and the broker answer, each within `serve.connect_timeout_ms`,
/// else 503 (a load balancer or Kubernetes then sends requests elsewhere). The answer names no
/// dependency; the log says which failed.
async fn readyz(State(app): State<Arc<App>>) -> Response {
    let database = tokio::time::timeout(app.connect_timeout(), sqlx::query("SELECT 1").execute(&app.pool)).await;
    let unready = match database {
        Err(_) => Some(format!("the database did not answer within {:?}", app.connect_timeout())),
        Ok(Err(e)) => Some(format!("the database: {e}")),
        Ok(Ok(_)) => app.producer().await.err().map(|e| e.1),
    };
    match unready {
        None => (StatusCode::OK, "ready").into_response(),
        Some(reason) => {
            tracing::warn!(reason, "not ready");
            (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
        }
    }
}

/// Why `heimdex serve` did not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The settings forbid this (a non-loopback address without API keys); nothing was bound.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Setup(#[from] anyhow::Error),
}

/// Serves the API on `addr` until `shutdown` completes; `bound` is told the address really bound
/// (port 0 picks a free one). In-flight requests get up to the request timeout to finish.
///
/// # Errors
/// [`ServeError::Refused`] for a non-loopback address without `serve.api_keys`; the address cannot
/// be bound.
pub async fn serve(
    settings: &Settings,
    addr: SocketAddr,
    bound: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let limits: &ServeSettings = &settings.serve;
    if limits.api_keys.is_empty() && !addr.ip().is_loopback() {
        return Err(ServeError::Refused(format!(
            "refusing to listen on {addr} without serve.api_keys: set a key, or listen on a loopback address (127.0.0.1, [::1])"
        )));
    }
    let router = router(settings)?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    bound(listener.local_addr()?);
    let header_timeout = Duration::from_millis(limits.header_timeout_ms);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let (closing, closed) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let mut closed = closed.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = closed.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended");
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = closing.send(true);
    let grace = Duration::from_millis(limits.request_timeout_ms);
    let _ = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    Ok(())
}

async fn status_json(State(app): State<Arc<App>>) -> Result<Json<Snapshot>, ApiError> {
    let producer = app.producer().await?;
    let snapshot = match status::snapshot(&app.settings, &app.pool, producer.channel()).await {
        Ok(s) => s,
        Err(e) => {
            // A channel error (the broker restarted) closes the channel: the next request reconnects.
            app.producer.lock().await.take();
            return Err(ApiError::unavailable("the database or the broker", e.as_ref()));
        }
    };
    let mut snapshot = snapshot;
    if let Some(e) = snapshot.workers_error.take() {
        tracing::warn!(error = %remote::redact_text(&e), "live worker state is unavailable");
        snapshot.workers_error = Some("live worker state is unavailable (Redis)".into());
    }
    snapshot.recent = snapshot.recent.into_iter().map(shown).collect();
    snapshot.failures = snapshot.failures.into_iter().map(shown).collect();
    Ok(Json(snapshot))
}

/// The body of `POST /v1/videos`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct EnqueueBody {
    /// A path (absolute, or relative to the media root), an http(s) URL (when `media.allow_http`), or
    /// `s3://bucket/key`.
    uri: String,
    /// The kinds of work; default: every kind.
    #[serde(default)]
    kinds: Vec<TaskKind>,
    /// Re-run jobs that are queued, running or done.
    #[serde(default)]
    force: bool,
    /// The spoken language (ISO 639-1), instead of detecting it (index).
    #[serde(default)]
    language: Option<String>,
    /// Frames per second to embed, in (0, 60] (vision).
    #[serde(default)]
    frame_rate: Option<f32>,
    /// `translate` for English text whatever the language spoken; default `transcribe` (index).
    #[serde(default)]
    task: Option<SpeechTask>,
    /// Your own id for the jobs (1 to 256 characters), returned and sent back in their events.
    #[serde(default)]
    external_id: Option<String>,
    /// Your own JSON object (at most 8 KiB), stored and returned like `external_id`.
    #[serde(default)]
    metadata: Option<Metadata>,
}

async fn enqueue(
    State(app): State<Arc<App>>,
    body: Result<Json<EnqueueBody>, JsonRejection>,
) -> Result<(StatusCode, Json<Enqueued>), ApiError> {
    let Json(body) = body.map_err(|e| {
        let status = if e.status() == StatusCode::PAYLOAD_TOO_LARGE { e.status() } else { StatusCode::BAD_REQUEST };
        ApiError(status, e.body_text())
    })?;
    if body.uri.trim().is_empty() {
        return Err(bad_request("uri is empty"));
    }
    if body.frame_rate.is_some_and(|r| !(r > 0.0 && r <= 60.0)) {
        return Err(bad_request("frame_rate must be in (0, 60]"));
    }
    let serve = &app.settings.serve;
    if body.force && serve.api_keys.is_empty() && !serve.allow_force {
        return Err(ApiError(StatusCode::FORBIDDEN, "force needs an API key (serve.api_keys) or serve.allow_force".into()));
    }
    let mut request = EnqueueRequest::all(body.uri);
    if !body.kinds.is_empty() {
        request.kinds = body.kinds;
    }
    request.force = body.force;
    request.options = TaskOptions { language: body.language, frame_rate: body.frame_rate, task: body.task };
    request.external_id = body.external_id;
    request.metadata = body.metadata;
    request.validate().map_err(|e| bad_request(e.to_string()))?;
    let producer = app.producer().await?;
    let enqueued = match producer.enqueue(&request).await {
        Ok(e) => e,
        Err(e) => {
            if matches!(e, ProducerError::Broker(_) | ProducerError::Publish(_)) {
                app.producer.lock().await.take();
            }
            return Err(app.enqueue_error(&e));
        }
    };
    let mut enqueued = enqueued;
    enqueued.uri = remote::redact(&enqueued.uri);
    Ok((StatusCode::ACCEPTED, Json(enqueued)))
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| bad_request("the id is not a uuid"))
}

/// The `{id}` of a path.
#[derive(Debug, Deserialize, JsonSchema)]
struct IdPath {
    #[schemars(with = "Uuid")]
    id: String,
}

async fn job(State(app): State<Arc<App>>, Path(IdPath { id }): Path<IdPath>) -> Result<Json<JobRow>, ApiError> {
    let id = parse_id(&id)?;
    let row = jobs::jobs_by_id(&app.pool, &[id]).await?.into_iter().next();
    row.map(|r| Json(shown(r))).ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no job {id}")))
}

/// Default rows of a list page.
pub const PAGE_DEFAULT: u32 = 50;
/// Most rows of a list page.
pub const PAGE_MAX: u32 = 500;

/// Where a list page starts: the `seq` of the last row of the page before, as an opaque string.
fn page_start(cursor: Option<&str>, limit: Option<u32>) -> Result<(Option<i64>, i64), ApiError> {
    let limit = limit.unwrap_or(PAGE_DEFAULT);
    if !(1..=PAGE_MAX).contains(&limit) {
        return Err(bad_request(format!("limit must be in 1..={PAGE_MAX}")));
    }
    let before = match cursor {
        None => None,
        Some(c) => Some(c.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| bad_request("cursor is not one this API gave"))?),
    };
    Ok((before, i64::from(limit)))
}

/// A page of `rows` fetched with one row beyond `limit`: the rows to show and the cursor of the next
/// page, if there is one.
fn page<T>(mut rows: Vec<T>, limit: i64, seq: impl Fn(&T) -> i64) -> (Vec<T>, Option<String>) {
    let more = rows.len() as i64 > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next = if more { rows.last().map(|r| seq(r).to_string()) } else { None };
    (rows, next)
}

/// The query of `GET /v1/jobs`: every filter given must match.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct JobsQuery {
    status: Option<JobStatus>,
    kind: Option<TaskKind>,
    /// The caller's id given at enqueue.
    external_id: Option<String>,
    /// Rows per page (default 50, at most 500).
    #[schemars(range(min = 1, max = 500))]
    limit: Option<u32>,
    /// The `next_cursor` of the page before.
    cursor: Option<String>,
}

/// A page of jobs.
#[derive(Debug, Serialize, JsonSchema)]
struct JobsPage {
    jobs: Vec<JobRow>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

async fn list_jobs(State(app): State<Arc<App>>, query: Result<Query<JobsQuery>, QueryRejection>) -> Result<Json<JobsPage>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError(e.status(), e.body_text()))?;
    if let Some(external_id) = &query.external_id {
        contract::check_caller_fields(Some(external_id), None).map_err(|e| bad_request(e.to_string()))?;
    }
    let (before, limit) = page_start(query.cursor.as_deref(), query.limit)?;
    let filter = JobFilter { status: query.status, kind: query.kind, external_id: query.external_id };
    let rows = jobs::list_jobs(&app.pool, &filter, before, limit + 1).await?;
    let (rows, next_cursor) = page(rows, limit, |r| r.seq);
    Ok(Json(JobsPage { jobs: rows.into_iter().map(shown).collect(), next_cursor }))
}

/// The query of `GET /v1/videos`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct VideosQuery {
    /// Rows per page (default 50, at most 500).
    #[schemars(range(min = 1, max = 500))]
    limit: Option<u32>,
    /// The `next_cursor` of the page before.
    cursor: Option<String>,
}

/// A page of videos.
#[derive(Debug, Serialize, JsonSchema)]
struct VideosPage {
    videos: Vec<VideoRow>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

async fn list_videos(State(app): State<Arc<App>>, query: Result<Query<VideosQuery>, QueryRejection>) -> Result<Json<VideosPage>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError(e.status(), e.body_text()))?;
    let (before, limit) = page_start(query.cursor.as_deref(), query.limit)?;
    let rows = jobs::list_videos(&app.pool, before, limit + 1).await?;
    let (mut rows, next_cursor) = page(rows, limit, |r| r.seq);
    rows.iter_mut().for_each(|v| v.uri = remote::redact(&v.uri));
    Ok(Json(VideosPage { videos: rows, next_cursor }))
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    /// Supersede a running job first instead of refusing.
    #[serde(default)]
    force: bool,
}

/// Deletes a video and its rows (see `heimdex_shared::delete`). Only callers with an API key may: a
/// server without keys refuses every delete.
async fn delete_video(
    State(app): State<Arc<App>>,
    Path(IdPath { id }): Path<IdPath>,
    query: Result<Query<DeleteQuery>, QueryRejection>,
) -> Result<Json<Deleted>, ApiError> {
    if app.keys.is_empty() {
        return Err(ApiError(StatusCode::FORBIDDEN, "deleting needs an API key (serve.api_keys)".into()));
    }
    let Query(query) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let id = parse_id(&id)?;
    match deletion::delete_video(&app.pool, id, query.force).await {
        Ok(mut deleted) => {
            deleted.uri = remote::redact(&deleted.uri);
            Ok(Json(deleted))
        }
        Err(DeleteError::NoVideo(_) | DeleteError::NotExpired(_)) => Err(ApiError(StatusCode::NOT_FOUND, format!("no video {id}"))),
        Err(e @ DeleteError::Running { .. }) => Err(ApiError(StatusCode::CONFLICT, format!("{e}; nothing was deleted (?force=true)"))),
        Err(DeleteError::Database(e)) => Err(e.into()),
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
struct TranscriptQuery {
    /// srt, vtt, json (default) or txt. The JSON carries each line's words with their times, where
    /// the video was indexed with word timestamps.
    format: Option<String>,
    /// With `format=vtt`: time each word inside its cue (WebVTT cue timestamps).
    words: Option<bool>,
}

async fn video_transcript(
    State(app): State<Arc<App>>,
    Path(IdPath { id }): Path<IdPath>,
    query: Result<Query<TranscriptQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError(e.status(), e.body_text()))?;
    let id = parse_id(&id)?;
    let name = query.format.as_deref().unwrap_or("json");
    let format: Format = clap::ValueEnum::from_str(name, true).map_err(|_| bad_request("format: use srt, vtt, json or txt"))?;
    let words = query.words.unwrap_or(false);
    if words && format != Format::Vtt {
        return Err(bad_request("words: times words in WebVTT cues, use it with format=vtt"));
    }
    let t = transcript::load(&app.pool, &app.settings, &id.to_string()).await?;
    let content_type = match format {
        Format::Srt => "application/x-subrip; charset=utf-8",
        Format::Vtt => "text/vtt; charset=utf-8",
        Format::Json => "application/json",
        Format::Txt => "text/plain; charset=utf-8",
    };
    Ok(([(header::CONTENT_TYPE, content_type)], transcript::render(&t, format, words)).into_response())
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SearchQuery {
    /// The text to search for.
    q: Option<String>,
    /// What `q` searches: segments (default) or frames.
    #[serde(rename = "in")]
    target: Option<String>,
    /// `VIDEO@SECONDS` (a video id, path or URL as enqueued): frames like that stored frame.
    similar_to: Option<String>,
    /// Only hits in this video (id, path or URL as enqueued).
    video: Option<String>,
    /// Hits to return, 1 to 1000 (default 10).
    #[schemars(range(min = 1, max = 1000))]
    limit: Option<u32>,
}

/// The answer of `GET /v1/search`.
#[derive(Debug, Serialize, JsonSchema)]
struct SearchAnswer {
    /// What was searched: segments or frames.
    #[serde(rename = "in")]
    target: String,
    /// The embedding model of the vectors compared.
    model: String,
    /// The text searched for (`q`).
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<String>,
    /// The frame searched from (`similar_to`).
    #[serde(skip_serializing_if = "Option::is_none")]
    similar_to: Option<FrameSource>,
    hits: Hits,
}

#[derive(Debug, Serialize, JsonSchema)]
#[serde(untagged)]
enum Hits {
    Segments(Vec<SegmentHit>),
    Frames(Vec<FrameHit>),
}

/// The stored frame a `similar_to` search starts from.
#[derive(Debug, Serialize, JsonSchema)]
struct FrameSource {
    video_id: Uuid,
    uri: String,
    at_s: f64,
}

async fn search_handler(
    State(app): State<Arc<App>>,
    query: Result<Query<SearchQuery>, QueryRejection>,
) -> Result<Json<SearchAnswer>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError(e.status(), e.body_text()))?;
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
        let mut hits = search::similar_frames(pool, settings, of, at_s, limit, video).await?;
        hits.iter_mut().for_each(|h| h.uri = remote::redact(&h.uri));
        return Ok(Json(SearchAnswer {
            target: "frames".into(),
            model: settings.vision.embed_model.clone(),
            query: None,
            similar_to: Some(FrameSource { video_id: of, uri: remote::redact(&uri), at_s }),
            hits: Hits::Frames(hits),
        }));
    }
    let text = query
        .q
        .as_deref()
        .map(str::trim)
        .filter(|q| !q.is_empty())
        .ok_or_else(|| bad_request("q (the text to search for) or similar_to is required"))?;
    let target = query.target.as_deref().unwrap_or("segments");
    if !["segments", "frames"].contains(&target) {
        return Err(bad_request("in: use segments or frames"));
    }
    let queries = app.queries().await?;
    let result = if target == "segments" {
        search::segments(pool, &queries, settings, text, limit, video).await.map(|mut hits| {
            hits.iter_mut().for_each(|h| h.uri = remote::redact(&h.uri));
            (settings.index.embed_model.clone(), Hits::Segments(hits))
        })
    } else {
        search::frames(pool, &queries, settings, text, limit, video).await.map(|mut hits| {
            hits.iter_mut().for_each(|h| h.uri = remote::redact(&h.uri));
            (settings.vision.embed_model.clone(), Hits::Frames(hits))
        })
    };
    if let Err(SearchError::Query(QueryError::Broker(_) | QueryError::Closed)) = &result {
        app.queries.lock().await.take();
    }
    let (model, hits) = result?;
    Ok(Json(SearchAnswer { target: target.into(), model, query: Some(text.into()), similar_to: None, hits }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_read_like_a_browser_sends_them() {
        for (value, name) in [
            ("localhost", Some("localhost")),
            ("LOCALHOST:8080", Some("localhost")),
            ("localhost.:80", Some("localhost")),
            ("[::1]", Some("::1")),
            ("[::1]:8080", Some("::1")),
            ("127.0.0.1:1", Some("127.0.0.1")),
            ("::1", None),
            ("[::1]x", None),
            ("localhost:", None),
            ("localhost:80:80", None),
            ("a@localhost", None),
            ("", None),
            (":80", None),
        ] {
            assert_eq!(host_name(value).as_deref(), name, "{value:?}");
        }
        assert_eq!(allowed_name("[::1]"), "::1");
        assert_eq!(allowed_name(" Heimdex.Internal. "), "heimdex.internal");
    }

    #[test]
    fn keys_match_exactly_with_a_bearer_scheme_in_any_case() {
        let keys = [digest("k3y-0123456789abcdef"), digest("other-0123456789abcdef")];
        let headers = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::AUTHORIZATION, v.parse().unwrap());
            }
            h
        };
        assert!(authorized(&keys, &headers(&["Bearer k3y-0123456789abcdef"])));
        assert!(authorized(&keys, &headers(&["bearer\tother-0123456789abcdef "])));
        for refused in [
            &["Bearer k3y-0123456789abcde"][..],
            &["Basic k3y-0123456789abcdef"],
            &["k3y-0123456789abcdef"],
            &["Bearer"],
            &[],
            &["Bearer x", "Bearer k3y-0123456789abcdef"],
        ] {
            assert!(!authorized(&keys, &headers(refused)), "{refused:?}");
        }
    }
}
