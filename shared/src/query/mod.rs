//! The query-embedding contract: a caller asks the warm workers of one kind for the embeddings of a
//! few texts, over the broker, and gets them back from the model that produced the stored vectors.
//!
//! Why through the workers: the system Heimdex replaces loaded a third copy of SigLIP into its API
//! process only to embed search queries. Here no caller ever loads a model: a request goes to the
//! `{prefix}.{kind}.query` queue ([`crate::topology::Topology::query_queue`]), a warm worker of that
//! kind embeds the texts on the same model thread as its tasks (batched with them) and replies to the
//! request's `reply_to` (RabbitMQ's direct reply-to) with the same `correlation_id`.
//!
//! ```text
//! request  {"v":1,"texts":["a red car"],"model":"heimdex/siglip-standin"}
//! reply    {"v":1,"status":"ok","model":"heimdex/siglip-standin","dim":768,"vectors":[[...]]}
//!          {"v":1,"status":"error","code":"bad_request","reason":"texts: 0 given, 1 to 32 allowed"}
//! ```
//!
//! [`QueryClient`] is the caller's side: it tells "no warm worker" at once, and times out.
//!
//! Requests are bounded ([`MAX_REQUEST_BYTES`], [`MAX_TEXTS`], [`MAX_TEXT_CHARS`]) so that one
//! request cannot hold a model thread for long; a request out of bounds, malformed or for another
//! model gets an error reply, before any inference, and the worker keeps serving.
//!
//! The query queue is reachable by anyone who may publish on the broker, so it is treated as
//! hostile:
//! - A worker replies only to a direct reply-to address ([`is_direct_reply_to`]). Any other
//!   `reply_to` is a queue name, and the default exchange would deliver the reply into it (a task
//!   queue, another application's queue): such a request, or one without `reply_to`, is acked
//!   unanswered and costs no inference.
//! - The queue holds at most [`QUEUE_MAX_LENGTH`] requests and [`QUEUE_MAX_BYTES`], and a caller
//!   publishing into a full queue is refused by the broker (`x-overflow: reject-publish`), which
//!   [`QueryClient`] reports as [`QueryError::Overloaded`]; a request waits at most [`QUEUE_TTL`].
//! - Queries take a bounded share of the models while tasks run (`worker.query_share`), so that a
//!   flood of queries slows tasks by at most that share.

mod client;

use serde::{Deserialize, Serialize};

pub use client::{DEFAULT_TIMEOUT, QueryClient, QueryError, REPLY_TO};

use crate::error::{Disposition, cap};

/// The version of the request and reply bodies.
pub const QUERY_VERSION: u32 = 1;
/// Most texts in one request.
pub const MAX_TEXTS: usize = 32;
/// Longest text, in characters (models truncate far earlier; this bounds tokenisation).
pub const MAX_TEXT_CHARS: usize = 2_000;
/// Largest request body; a larger one is refused before it is parsed.
pub const MAX_REQUEST_BYTES: usize = 128 * 1024;
/// Most requests waiting in a kind's query queue; a publish beyond is refused by the broker.
pub const QUEUE_MAX_LENGTH: u32 = 1_000;
/// Most bytes of requests waiting in a kind's query queue (a few hundred maximal requests).
pub const QUEUE_MAX_BYTES: u32 = 32 * 1024 * 1024;
/// Longest a request waits in the queue, whatever expiration its publisher set (the client's own
/// default timeout is [`DEFAULT_TIMEOUT`]): nobody waits longer for a query embedding.
pub const QUEUE_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether `reply_to` is a direct reply-to address (the broker rewrites a publisher's
/// [`REPLY_TO`] into `amq.rabbitmq.reply-to.<token>`), the only kind of address a worker replies to.
pub fn is_direct_reply_to(reply_to: &str) -> bool {
    reply_to.strip_prefix(REPLY_TO).is_some_and(|token| token.len() > 1 && token.starts_with('.'))
}

/// What a caller asks for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedRequest {
    pub v: u32,
    /// The texts to embed, in order; one vector each in the reply.
    pub texts: Vec<String>,
    /// The model the caller expects (the name stored beside the vectors it will compare with, e.g.
    /// `index.embed_model`); a worker serving another model answers [`RefusalCode::WrongModel`]
    /// rather than vectors from another space. `None`: whatever the worker serves (the reply names it).
    #[serde(default)]
    pub model: Option<String>,
}

impl EmbedRequest {
    pub fn new(texts: Vec<String>, model: Option<String>) -> Self {
        Self { v: QUERY_VERSION, texts, model }
    }

    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a request always serialises")
    }

    /// Parses and checks a request body: size first, then JSON, version and bounds.
    ///
    /// # Errors
    /// A [`Refusal`] with [`RefusalCode::BadRequest`] saying what is wrong.
    pub fn parse(body: &[u8]) -> Result<Self, Refusal> {
        if body.len() > MAX_REQUEST_BYTES {
            return Err(Refusal::bad_request(format!("request of {} bytes, over the limit of {MAX_REQUEST_BYTES}", body.len())));
        }
        // The version first, so that a future version is refused as such and not as a bad body.
        #[derive(Deserialize)]
        struct Version {
            v: Option<u32>,
        }
        let version: Version = serde_json::from_slice(body).map_err(|e| Refusal::bad_request(format!("not a JSON request: {e}")))?;
        match version.v {
            Some(QUERY_VERSION) => {}
            Some(v) => return Err(Refusal::bad_request(format!("request version {v}: this worker speaks version {QUERY_VERSION}"))),
            None => return Err(Refusal::bad_request("request without a version (\"v\": 1)")),
        }
        let request: Self = serde_json::from_slice(body).map_err(|e| Refusal::bad_request(format!("malformed request: {e}")))?;
        request.check()?;
        Ok(request)
    }

    /// Checks the bounds (callers check before sending, workers again on receipt).
    ///
    /// # Errors
    /// A [`Refusal`] with [`RefusalCode::BadRequest`].
    pub fn check(&self) -> Result<(), Refusal> {
        if self.texts.is_empty() || self.texts.len() > MAX_TEXTS {
            return Err(Refusal::bad_request(format!("texts: {} given, 1 to {MAX_TEXTS} allowed", self.texts.len())));
        }
        for (i, text) in self.texts.iter().enumerate() {
            let chars = text.chars().count();
            if text.trim().is_empty() {
                return Err(Refusal::bad_request(format!("text {i} is empty")));
            }
            if chars > MAX_TEXT_CHARS {
                return Err(Refusal::bad_request(format!("text {i} has {chars} characters, over the limit of {MAX_TEXT_CHARS}")));
            }
        }
        Ok(())
    }
}

/// Vectors for the texts of a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Embeddings {
    /// The model's name as stored beside the vectors it produced (`embedding_model` columns).
    pub model: String,
    pub dim: usize,
    /// Unit vectors, one per text, in the request's order.
    pub vectors: Vec<Vec<f32>>,
}

/// Why a worker did not embed a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {reason}")]
pub struct Refusal {
    pub code: RefusalCode,
    pub reason: String,
}

impl Refusal {
    pub fn new(code: RefusalCode, reason: impl AsRef<str>) -> Self {
        Self { code, reason: cap(reason.as_ref()) }
    }

    pub fn bad_request(reason: impl AsRef<str>) -> Self {
        Self::new(RefusalCode::BadRequest, reason)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    /// Malformed, unknown version, or out of bounds: sending it again cannot help.
    BadRequest,
    /// The worker serves another model than the request expects (the reason names both).
    WrongModel,
    /// The model failed; another worker, or the same one later, may answer.
    Failed,
}

impl RefusalCode {
    /// The code as it is written in replies (`bad_request`).
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::BadRequest => "bad_request",
            RefusalCode::WrongModel => "wrong_model",
            RefusalCode::Failed => "failed",
        }
    }

    /// Whether asking again may help.
    pub fn disposition(self) -> Disposition {
        match self {
            RefusalCode::BadRequest | RefusalCode::WrongModel => Disposition::Permanent,
            RefusalCode::Failed => Disposition::Retryable,
        }
    }
}

impl std::fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RefusalCode::BadRequest => "bad request",
            RefusalCode::WrongModel => "wrong model",
            RefusalCode::Failed => "model failed",
        })
    }
}

/// A worker's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmbedReply {
    pub v: u32,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// The body of a reply: vectors or a refusal, told apart by `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Ok(Embeddings),
    Error(Refusal),
}

impl EmbedReply {
    pub fn ok(embeddings: Embeddings) -> Self {
        Self { v: QUERY_VERSION, outcome: Outcome::Ok(embeddings) }
    }

    pub fn refused(refusal: Refusal) -> Self {
        Self { v: QUERY_VERSION, outcome: Outcome::Error(refusal) }
    }

    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a reply always serialises")
    }

    /// The embeddings, or the worker's refusal.
    ///
    /// # Errors
    /// The worker refused the request.
    pub fn into_result(self) -> Result<Embeddings, Refusal> {
        match self.outcome {
            Outcome::Ok(e) => Ok(e),
            Outcome::Error(r) => Err(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bounds_are_checked() {
        let request = EmbedRequest::new(vec!["a red car".into()], Some("m".into()));
        assert_eq!(EmbedRequest::parse(&request.to_body()).unwrap(), request);
        let refused = |body: &[u8]| EmbedRequest::parse(body).unwrap_err();
        assert!(refused(b"not json").reason.contains("not a JSON request"));
        assert!(refused(br#"{"texts":["x"]}"#).reason.contains("without a version"));
        assert!(refused(br#"{"v":2,"texts":["x"]}"#).reason.contains("version 2"));
        assert!(refused(br#"{"v":1,"texts":[]}"#).reason.contains("0 given"));
        assert!(refused(br#"{"v":1,"texts":["  "]}"#).reason.contains("text 0 is empty"));
        assert!(refused(br#"{"v":1,"texts":["x"],"extra":1}"#).reason.contains("unknown field"));
        let long = EmbedRequest::new(vec!["é".repeat(MAX_TEXT_CHARS + 1)], None);
        assert!(refused(&long.to_body()).reason.contains("characters"));
        let many = EmbedRequest::new(vec!["x".into(); MAX_TEXTS + 1], None);
        assert!(refused(&many.to_body()).reason.contains("33 given"));
        assert!(refused(&vec![b' '; MAX_REQUEST_BYTES + 1]).reason.contains("over the limit"));
    }

    #[test]
    fn only_direct_reply_to_addresses_are_answered() {
        assert!(is_direct_reply_to("amq.rabbitmq.reply-to.g1h2AA5yZXBseUAxMjM0NTY3OAAAAAAAAAAAAAAAAAAA"));
        for refused in [
            "",
            "heimdex.index",
            "amq.rabbitmq.reply-to",
            "amq.rabbitmq.reply-to.",
            "amq.rabbitmq.reply-tox.a",
            "x.amq.rabbitmq.reply-to.a",
        ] {
            assert!(!is_direct_reply_to(refused), "{refused:?}");
        }
    }

    #[test]
    fn replies_are_tagged_by_status() {
        let ok = EmbedReply::ok(Embeddings { model: "m".into(), dim: 2, vectors: vec![vec![0.5, -0.25]] });
        let json: serde_json::Value = serde_json::from_slice(&ok.to_body()).unwrap();
        assert_eq!(json, serde_json::json!({"v": 1, "status": "ok", "model": "m", "dim": 2, "vectors": [[0.5, -0.25]]}));
        assert_eq!(serde_json::from_slice::<EmbedReply>(&ok.to_body()).unwrap(), ok);
        for code in [RefusalCode::BadRequest, RefusalCode::WrongModel, RefusalCode::Failed] {
            assert_eq!(serde_json::to_value(code).unwrap(), serde_json::json!(code.as_str()));
        }
        let refused = EmbedReply::refused(Refusal::bad_request("no"));
        let json: serde_json::Value = serde_json::from_slice(&refused.to_body()).unwrap();
        assert_eq!(json, serde_json::json!({"v": 1, "status": "error", "code": "bad_request", "reason": "no"}));
        assert_eq!(serde_json::from_slice::<EmbedReply>(&refused.to_body()).unwrap().into_result(), Err(Refusal::bad_request("no")));
    }
}
