//! The task message: versioned JSON, one per (video, kind), `message_id` = job id.
//!
//! Parsing checks the version before the shape, so that a message from a newer producer is reported
//! as "unsupported contract version 2", not as a confusing missing-field error.
//!
//! # Versions
//!
//! `v` names the contract version ([`CONTRACT_VERSION`]). It stays the same when a change keeps every
//! body that was valid valid, with the same meaning: a new **optional** field (as `external_id` and
//! `metadata` were added to version 1). Such a field is left out of a body that does not use it
//! (`skip_serializing_if`), so a producer that does not set it sends bytes an older worker accepts.
//! A body that uses a new field is refused by a worker older than the field (unknown fields stay
//! refused): upgrade the workers before the producers that set it; a refused task waits in the
//! dead-letter queue for `heimdex dlq replay`. Anything else (a field removed, renamed, made
//! required, or read differently) is a new version, and a worker refuses every version but its own.
//!
//! Services in other languages publish against [`json_schema`], the JSON Schema generated from these
//! types; its committed copy is `deploy/contract/task.schema.json`, and `tests/tests/contract.rs`
//! fails when it is out of date (`HEIMDEX_WRITE_SCHEMA=1` in that test's environment rewrites it).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Disposition, cap};

/// The contract version this build reads and writes.
pub const CONTRACT_VERSION: u32 = 1;

/// Largest task message body accepted (bytes), checked before parsing. A task is a few hundred bytes;
/// without a bound an 80 MB body took a worker from 110 MB to 1.5 GB while serde built its tree.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Longest `external_id`, in characters (what JSON Schema's `maxLength` counts).
pub const MAX_EXTERNAL_ID_CHARS: usize = 256;

/// Largest `metadata` object, in bytes of its compact JSON.
pub const MAX_METADATA_BYTES: usize = 8 * 1024;

/// The caller's own JSON object attached to a job (stored, returned and sent back in its events).
pub type Metadata = serde_json::Map<String, serde_json::Value>;

/// What a task does; each kind has its own queue and worker binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// Speech to text and transcript embeddings (`worker-index`).
    Index,
    /// Frames, scenes, image embeddings and faces (`worker-vision`).
    Vision,
}

impl TaskKind {
    pub const ALL: [TaskKind; 2] = [TaskKind::Index, TaskKind::Vision];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Index => "index",
            TaskKind::Vision => "vision",
        }
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "index" => Ok(TaskKind::Index),
            "vision" => Ok(TaskKind::Vision),
            other => Err(format!("unknown task kind {other:?} (expected index or vision)")),
        }
    }
}

/// The language codes Whisper knows (its tokenizer's language tokens, in its order).
pub const WHISPER_LANGUAGES: [&str; 99] = [
    "en", "zh", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr", "pl", "ca", "nl", "ar", "sv", "it", "id", "hi", "fi", "vi", "he", "uk",
    "el", "ms", "cs", "ro", "da", "hu", "ta", "no", "th", "ur", "hr", "bg", "lt", "la", "mi", "ml", "cy", "sk", "te", "fa", "lv", "bn",
    "sr", "az", "sl", "kn", "et", "mk", "br", "eu", "is", "hy", "ne", "mn", "bs", "kk", "sq", "sw", "gl", "mr", "pa", "si", "km", "sn",
    "yo", "so", "af", "oc", "ka", "be", "tg", "sd", "gu", "am", "yi", "lo", "uz", "fo", "ht", "ps", "tk", "nn", "mt", "sa", "lb", "my",
    "bo", "tl", "mg", "as", "tt", "haw", "ln", "ha", "ba", "jw", "su",
];

/// Per-task options; absent fields take the worker's configured defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskOptions {
    /// Spoken language code for the index task (`en`, one of Whisper's); detected when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = WHISPER_LANGUAGES.as_slice()))]
    pub language: Option<String>,
    /// Frames per second sampled by the vision task, in (0, 60].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("exclusiveMinimum" = 0, "maximum" = 60))]
    pub frame_rate: Option<f32>,
    /// What the index task writes: the speech as spoken (`transcribe`, the default), or its English
    /// translation (`translate`, Whisper's own translate task).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<SpeechTask>,
}

/// Whisper's two tasks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SpeechTask {
    /// Text in the language spoken.
    #[default]
    Transcribe,
    /// English text, whatever the language spoken.
    Translate,
}

impl SpeechTask {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transcribe => "transcribe",
            Self::Translate => "translate",
        }
    }
}

impl std::str::FromStr for SpeechTask {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "transcribe" => Ok(Self::Transcribe),
            "translate" => Ok(Self::Translate),
            other => Err(format!("unknown task {other:?} (expected transcribe or translate)")),
        }
    }
}

impl TaskOptions {
    /// Checks what the schema says of each option: the same check at enqueue (library, CLI, API)
    /// and in the worker, so a bad option is refused before anything is written.
    ///
    /// # Errors
    /// [`ContractError::Shape`] naming the option.
    pub fn validate(&self) -> Result<(), ContractError> {
        if let Some(rate) = self.frame_rate
            && !(rate > 0.0 && rate <= 60.0)
        {
            return Err(ContractError::Shape(format!("options.frame_rate {rate} is outside (0, 60]")));
        }
        if let Some(language) = &self.language
            && !WHISPER_LANGUAGES.contains(&language.as_str())
        {
            return Err(ContractError::Shape(format!(
                "options.language {:?} is not a language code Whisper knows (such as en, de, fr, ja)",
                cap(language)
            )));
        }
        Ok(())
    }
}

/// The body of a task message (UTF-8 JSON, at most 64 KiB), published to the `heimdex` exchange with
/// the kind as routing key, `content_type` `application/json`, persistent, `message_id` = `job_id`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Heimdex task message")]
pub struct TaskMessage {
    /// Contract version; a worker refuses (dead-letters) any other.
    #[schemars(extend("const" = 1))]
    pub v: u32,
    /// The job; used when Heimdex holds no job for (video, kind) yet, else Heimdex's own job runs.
    pub job_id: Uuid,
    /// The video; used when Heimdex holds no video for `media_uri` yet, else Heimdex's own id wins.
    pub video_id: Uuid,
    /// Must match the routing key: a worker dead-letters a task of another kind.
    pub kind: TaskKind,
    /// A path under the configured media root, or an http(s) URL.
    #[schemars(regex(pattern = r"\S"))]
    pub media_uri: String,
    #[serde(default)]
    pub options: TaskOptions,
    /// When the task was enqueued (RFC 3339).
    pub enqueued_at: DateTime<Utc>,
    /// The caller's own id for this job (1 to 256 characters), stored on the job, returned by the API
    /// and the CLI, carried by the job's events, and looked up with `GET /v1/jobs?external_id=`. Not
    /// unique: Heimdex never interprets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub external_id: Option<String>,
    /// The caller's own JSON object (at most 8 KiB as compact JSON), stored and returned like
    /// `external_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-heimdex-max-bytes" = MAX_METADATA_BYTES))]
    pub metadata: Option<Metadata>,
}

/// Checks the caller's fields as the schema and the worker do: the same check at enqueue (library,
/// CLI, API) and in the worker.
///
/// # Errors
/// [`ContractError::Shape`] naming the field and its bound.
pub fn check_caller_fields(external_id: Option<&str>, metadata: Option<&Metadata>) -> Result<(), ContractError> {
    if let Some(id) = external_id {
        let chars = id.chars().count();
        if chars == 0 || chars > MAX_EXTERNAL_ID_CHARS {
            return Err(ContractError::Shape(format!("external_id has {chars} characters; it must have 1 to {MAX_EXTERNAL_ID_CHARS}")));
        }
    }
    if let Some(metadata) = metadata {
        let bytes = serde_json::to_vec(metadata).map_or(usize::MAX, |b| b.len());
        if bytes > MAX_METADATA_BYTES {
            return Err(ContractError::Shape(format!("metadata is {bytes} bytes as JSON, over the limit of {MAX_METADATA_BYTES}")));
        }
    }
    Ok(())
}

/// The JSON Schema of a task message body, generated from [`TaskMessage`]: what a worker accepts
/// (the 64 KiB bound on the body is not expressible in it). Draft-07, the draft that validators in
/// most languages read by default (ajv, jsonschema, everit).
pub fn json_schema() -> serde_json::Value {
    let generator = schemars::generate::SchemaSettings::draft07().into_generator();
    let mut schema = generator.into_root_schema_for::<TaskMessage>();
    schema.insert("$id".into(), "https://heimdex.invalid/contract/task.schema.json".into());
    schema.insert("x-heimdex-contract-version".into(), CONTRACT_VERSION.into());
    schema.insert("x-heimdex-max-body-bytes".into(), MAX_MESSAGE_BYTES.into());
    schema.to_value()
}

/// Why a message body is not a task. Always permanent: redelivery cannot fix it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContractError {
    #[error("message body is {0} bytes, over the contract's limit of {MAX_MESSAGE_BYTES} bytes")]
    TooLarge(usize),
    #[error("malformed message: not JSON ({0})")]
    NotJson(String),
    #[error("malformed message: no numeric \"v\" (contract version) field")]
    NoVersion,
    #[error("unsupported contract version {0} (this worker reads version {CONTRACT_VERSION})")]
    Version(u64),
    #[error("malformed message: {0}")]
    Shape(String),
}

impl ContractError {
    /// Always permanent: redelivering the same body cannot fix it.
    pub fn disposition(&self) -> Disposition {
        Disposition::Permanent
    }
}

impl TaskMessage {
    pub fn new(job_id: Uuid, video_id: Uuid, kind: TaskKind, media_uri: String, options: TaskOptions) -> Self {
        Self { v: CONTRACT_VERSION, job_id, video_id, kind, media_uri, options, enqueued_at: Utc::now(), external_id: None, metadata: None }
    }

    /// The message of one enqueue of a job: `enqueued_at` is the enqueue's `queued_at`, by which a
    /// worker tells it from copies of earlier enqueues (see `jobs::start_run`).
    pub fn of_enqueue(queued: &crate::jobs::Queued, video_id: Uuid, kind: TaskKind, media_uri: String, options: TaskOptions) -> Self {
        Self { enqueued_at: queued.queued_at, ..Self::new(queued.job_id, video_id, kind, media_uri, options) }
    }

    /// Parses and validates a message body.
    ///
    /// # Errors
    /// [`ContractError`] for anything but a well-formed version-1 task.
    pub fn parse(body: &[u8]) -> Result<Self, ContractError> {
        if body.len() > MAX_MESSAGE_BYTES {
            return Err(ContractError::TooLarge(body.len()));
        }
        // Error texts are capped: serde repeats offending input (an unknown field's name) verbatim.
        let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| ContractError::NotJson(cap(&e.to_string())))?;
        match value.get("v").and_then(serde_json::Value::as_u64) {
            None => return Err(ContractError::NoVersion),
            Some(v) if v != u64::from(CONTRACT_VERSION) => return Err(ContractError::Version(v)),
            Some(_) => {}
        }
        let msg: TaskMessage = serde_json::from_value(value).map_err(|e| ContractError::Shape(cap(&e.to_string())))?;
        if msg.media_uri.trim().is_empty() {
            return Err(ContractError::Shape("media_uri is empty".into()));
        }
        msg.options.validate()?;
        check_caller_fields(msg.external_id.as_deref(), msg.metadata.as_ref())?;
        Ok(msg)
    }

    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a TaskMessage always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TaskMessage {
        TaskMessage::new(Uuid::new_v4(), Uuid::new_v4(), TaskKind::Vision, "/m/a.mp4".into(), TaskOptions::default())
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(TaskMessage::parse(&m.to_body()).unwrap(), m);
    }

    #[test]
    fn version_is_checked_first() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["v"] = 2.into();
        v["extra"] = true.into();
        let err = TaskMessage::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(err, ContractError::Version(2));
        assert!(err.to_string().contains("unsupported contract version 2"));
    }

    #[test]
    fn malformed_bodies_are_named() {
        assert!(matches!(TaskMessage::parse(b"{not json"), Err(ContractError::NotJson(_))));
        assert_eq!(TaskMessage::parse(b"{}"), Err(ContractError::NoVersion));
        let err = TaskMessage::parse(br#"{"v":1,"kind":"audio"}"#).unwrap_err();
        assert!(matches!(err, ContractError::Shape(_)), "{err}");
    }

    #[test]
    fn options_are_checked() {
        let with = |language: &str, frame_rate: Option<f32>| TaskOptions { language: Some(language.into()), frame_rate, task: None };
        assert_eq!(with("de", Some(2.0)).validate(), Ok(()));
        assert!(with("xx", None).validate().unwrap_err().to_string().contains("options.language \"xx\""));
        assert!(with("en", Some(0.0)).validate().unwrap_err().to_string().contains("frame_rate"));
        let mut m = sample();
        m.options = with("english", None);
        assert!(matches!(TaskMessage::parse(&m.to_body()), Err(ContractError::Shape(_))));
    }

    #[test]
    fn the_speech_task_is_transcribe_or_translate() {
        let mut m = sample();
        m.options.task = Some(SpeechTask::Translate);
        let body = m.to_body();
        assert!(String::from_utf8_lossy(&body).contains(r#""task":"translate""#));
        assert_eq!(TaskMessage::parse(&body).unwrap().options.task, Some(SpeechTask::Translate));
        let bad = String::from_utf8_lossy(&body).replace(r#""task":"translate""#, r#""task":"summarise""#);
        assert!(matches!(TaskMessage::parse(bad.as_bytes()), Err(ContractError::Shape(_))));
        assert!(!String::from_utf8_lossy(&sample().to_body()).contains("task\""), "absent, it is left out of the body");
    }

    #[test]
    fn caller_fields_are_optional_and_bounded() {
        let old = sample().to_body();
        assert!(!String::from_utf8_lossy(&old).contains("external_id"), "absent fields are left out of the body");
        assert_eq!(TaskMessage::parse(&old).unwrap().external_id, None);
        let mut m = sample();
        m.external_id = Some("é".repeat(MAX_EXTERNAL_ID_CHARS));
        m.metadata = Some(serde_json::json!({ "order": 7, "tags": ["a"] }).as_object().unwrap().clone());
        assert_eq!(TaskMessage::parse(&m.to_body()).unwrap(), m);
        m.external_id = Some("x".repeat(MAX_EXTERNAL_ID_CHARS + 1));
        assert!(TaskMessage::parse(&m.to_body()).unwrap_err().to_string().contains("external_id has 257 characters"));
        m.external_id = Some(String::new());
        assert!(matches!(TaskMessage::parse(&m.to_body()), Err(ContractError::Shape(_))));
        m.external_id = None;
        m.metadata = Some(serde_json::json!({ "blob": "x".repeat(MAX_METADATA_BYTES) }).as_object().unwrap().clone());
        assert!(TaskMessage::parse(&m.to_body()).unwrap_err().to_string().contains("metadata is 8203 bytes"));
        let mut v = serde_json::to_value(sample()).unwrap();
        v["metadata"] = serde_json::json!([1, 2]);
        assert!(matches!(TaskMessage::parse(&serde_json::to_vec(&v).unwrap()), Err(ContractError::Shape(_))), "an array is not an object");
    }

    #[test]
    fn oversized_bodies_and_huge_field_names_give_bounded_errors() {
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert_eq!(TaskMessage::parse(&big), Err(ContractError::TooLarge(MAX_MESSAGE_BYTES + 1)));
        let mut v = serde_json::to_value(sample()).unwrap();
        v["x".repeat(60_000)] = 1.into();
        let err = TaskMessage::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err().to_string();
        assert!(err.len() <= crate::error::MAX_REASON_BYTES + 40, "{} bytes", err.len());
        assert!(err.contains("unknown field"), "{err}");
    }
}
