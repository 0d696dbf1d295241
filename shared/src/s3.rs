//! Media in object storage: `s3://bucket/key`, read by the worker from the S3-compatible store that
//! `[s3]` configures (AWS, MinIO, Ceph, Garage, …). Enqueue only [`check`]s a URI's syntax (it
//! answers at once and reads nothing: the producer never holds the credentials' reach, nor the
//! bytes); the worker [`fetch`]es the object once, here, to a temporary file that ffprobe and ffmpeg
//! then read as local media, as [`crate::remote`] does for http(s):
//!
//! - a plain `GET` signed with SigV4 in the `Authorization` header ([`sigv4`]); nothing secret in the
//!   URL, in errors or in logs (errors name the `s3://` URI and the store's error code, never its
//!   message, which for a bad signature echoes the string that was signed);
//! - `media.remote_timeout_ms` (connect, silence), `media.remote_deadline_ms` (the whole download)
//!   and `media.max_remote_bytes` (checked against `Content-Length`, then on every chunk), as for
//!   http(s) media; no redirect is followed and no proxy from the environment is used;
//! - the endpoint is the operator's, not the message's, so it is not held to public addresses (a
//!   MinIO beside the workers on a private or loopback address is the common case); a message picks
//!   only the bucket and key, and a bucket name can only make a host name below the endpoint's
//!   (virtual-hosted style) or a path segment (path style);
//! - the store's answer decides: no such key or bucket, access denied, unknown key id, bad
//!   signature, wrong region, expired token are permanent; 5xx, `SlowDown`, 429, a store that cannot
//!   be reached or misses a deadline are retryable.

pub mod sigv4;

use std::fmt;
use std::time::Duration;

use chrono::Utc;
use url::Url;

use crate::config::{MediaSettings, S3Settings};
use crate::media::MediaError;
use crate::remote;

/// Longest object key S3 accepts (bytes of UTF-8).
const MAX_KEY_BYTES: usize = 1024;
/// Most of an error body read to find its `<Code>`.
const MAX_ERROR_BODY: usize = 16 * 1024;

/// True for `s3://` URIs.
pub fn is_s3(uri: &str) -> bool {
    uri.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("s3://"))
}

/// A bucket and a key: what an `s3://` URI names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    pub bucket: String,
    pub key: String,
}

impl fmt::Display for Object {
    /// The canonical URI, `s3://bucket/key`, which identifies the video (`videos.uri`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// Parses `s3://bucket/key`: a bucket name as S3 allows it (3–63 lowercase letters, digits, dots
/// and hyphens, starting and ending with a letter or digit, not an IP address) and a key of 1 to 1024
/// bytes, taken literally (`?` and `#` are part of it, as for the AWS CLI), without control
/// characters or `.`/`..` segments (which a URL would resolve, fetching another key).
///
/// # Errors
/// [`MediaError::RemoteRefused`] (permanent) naming what is wrong.
pub fn parse(uri: &str) -> Result<Object, MediaError> {
    let refused = |reason: &str| MediaError::RemoteRefused { uri: shown(uri), reason: reason.to_string() };
    if !is_s3(uri) {
        return Err(refused("not an s3:// URI"));
    }
    let Some((bucket, key)) = uri[5..].split_once('/') else { return Err(refused("no key: write s3://bucket/key")) };
    if !(3..=63).contains(&bucket.len())
        || !bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        || !bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !bucket.ends_with(|c: char| c.is_ascii_alphanumeric())
        || bucket.contains("..")
        || bucket.parse::<std::net::Ipv4Addr>().is_ok()
    {
        return Err(refused("not a bucket name (3-63 lowercase letters, digits, dots and hyphens)"));
    }
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(refused("the key must have 1 to 1024 bytes"));
    }
    if key.chars().any(char::is_control) {
        return Err(refused("the key has a control character"));
    }
    if key.split('/').any(|segment| segment == "." || segment == "..") {
        return Err(refused("keys with . or .. segments are not supported"));
    }
    Ok(Object { bucket: bucket.to_string(), key: key.to_string() })
}

/// The canonical form of an `s3://` URI (the scheme lowercased).
///
/// # Errors
/// As [`parse`].
pub fn canonical(uri: &str) -> Result<String, MediaError> {
    parse(uri).map(|object| object.to_string())
}

/// Checks an `s3://` URI without reading anything: object storage is configured and the URI parses.
///
/// # Errors
/// [`MediaError::S3Disabled`], or [`MediaError::RemoteRefused`] as [`parse`].
pub fn check(uri: &str, settings: &S3Settings) -> Result<Object, MediaError> {
    if !settings.enabled() {
        return Err(MediaError::S3Disabled(shown(uri)));
    }
    parse(uri)
}

/// A URI as errors show it: without control characters or user info (`s3://user:pw@…` is no valid
/// URI, but it may still hold a secret), cut short.
fn shown(uri: &str) -> String {
    let uri = match uri.get(5..).map(|rest| rest.split_once('/').unwrap_or((rest, ""))) {
        Some((authority, key)) if authority.contains('@') => {
            format!("s3://***@{}/{key}", authority.rsplit_once('@').map_or("", |(_, host)| host))
        }
        _ => uri.to_string(),
    };
    let mut cut: String = uri.chars().filter(|c| !c.is_control()).take(200).collect();
    if cut.len() < uri.len() {
        cut.push('…');
    }
    cut
}

/// The URL of `object` on the configured endpoint: `endpoint/bucket/key` (path style) or
/// `bucket.endpoint/key`, the key percent-encoded as SigV4 wants it (everything but `A-Z a-z 0-9 - _
/// . ~` and `/`), so that the path sent is the path signed.
///
/// # Errors
/// [`MediaError::RemoteRefused`] when the endpoint is not a URL (the configuration check refuses it
/// first).
pub fn object_url(settings: &S3Settings, object: &Object) -> Result<Url, MediaError> {
    let refused = |reason: String| MediaError::RemoteRefused { uri: object.to_string(), reason };
    let mut url = Url::parse(settings.endpoint.trim()).map_err(|e| refused(format!("s3.endpoint is not a URL ({e})")))?;
    let prefix = url.path().trim_end_matches('/').to_string();
    let key = encode_key(&object.key);
    if settings.path_style {
        url.set_path(&format!("{prefix}/{}/{key}", object.bucket));
    } else {
        let host = url.host_str().ok_or_else(|| refused("s3.endpoint has no host".into()))?.to_string();
        url.set_host(Some(&format!("{}.{host}", object.bucket))).map_err(|e| refused(format!("bucket host name: {e}")))?;
        url.set_path(&format!("{prefix}/{key}"));
    }
    Ok(url)
}

fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The headers that sign a `GET` of `url` (none when no credentials are configured: a public
/// bucket). Values hold secrets (the signature, a session token): they go on the request only.
pub fn signed_get_headers(settings: &S3Settings, url: &Url, now: chrono::DateTime<Utc>) -> Vec<(&'static str, String)> {
    let (key_id, secret) = (settings.access_key_id.expose(), settings.secret_access_key.expose());
    if key_id.is_empty() && secret.is_empty() {
        return Vec::new();
    }
    let host = match url.port() {
        Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_string(),
    };
    let date = sigv4::amz_date(now);
    let token = settings.session_token.expose();
    let mut headers = vec![("host", host.as_str()), ("x-amz-content-sha256", sigv4::EMPTY_SHA256), ("x-amz-date", date.as_str())];
    if !token.is_empty() {
        headers.push(("x-amz-security-token", token));
    }
    let signer = sigv4::Signer { access_key_id: key_id, secret_access_key: secret, region: settings.region.trim(), service: "s3" };
    let authorization = signer.authorization("GET", url.path(), "", &headers, sigv4::EMPTY_SHA256, now);
    let mut out: Vec<(&'static str, String)> =
        vec![("x-amz-content-sha256", sigv4::EMPTY_SHA256.to_string()), ("x-amz-date", date.clone()), ("authorization", authorization)];
    if !token.is_empty() {
        out.push(("x-amz-security-token", token.to_string()));
    }
    out
}

/// [`check`]s `uri`, then downloads the object to a temporary file (deleted when the returned path is
/// dropped), within `media.remote_deadline_ms` overall.
///
/// # Errors
/// As [`check`]; [`MediaError::RemoteRefused`] (permanent) when the store refuses the request, with
/// the reason and the store's error code; [`MediaError::RemoteTooLarge`], [`MediaError::Empty`];
/// [`MediaError::RemoteUnavailable`] (retryable) when the store answers 5xx, `SlowDown` or 429, cannot
/// be reached, stops answering or misses the deadline.
pub async fn fetch(uri: &str, settings: &S3Settings, media: &MediaSettings) -> Result<tempfile::TempPath, MediaError> {
    let deadline = Duration::from_millis(media.remote_deadline_ms.max(1));
    match tokio::time::timeout(deadline, download(uri, settings, media)).await {
        Ok(result) => result,
        Err(_) => Err(MediaError::RemoteUnavailable {
            uri: shown(uri),
            reason: format!("the download took longer than media.remote_deadline_ms ({} ms)", deadline.as_millis()),
        }),
    }
}

async fn download(uri: &str, settings: &S3Settings, media: &MediaSettings) -> Result<tempfile::TempPath, MediaError> {
    let object = check(uri, settings)?;
    let shown = object.to_string();
    let unavailable = |reason: String| MediaError::RemoteUnavailable { uri: shown.clone(), reason };
    let url = object_url(settings, &object)?;
    let timeout = Duration::from_millis(media.remote_timeout_ms.max(1));
    let client = reqwest::Client::builder()
        .connect_timeout(timeout)
        .read_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .map_err(|e| unavailable(format!("http client: {e}")))?;
    let headers = signed_get_headers(settings, &url, Utc::now());
    let mut request = client.get(url);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let response = request.send().await.map_err(|e| unavailable(format!("the object store: {}", remote::describe(&e))))?;
    let status = response.status();
    if status.is_success() {
        return remote::save(response, media.max_remote_bytes, &shown).await;
    }
    let code = error_code(response).await;
    Err(judge(status.as_u16(), code.as_deref(), &object))
}

/// The `<Code>` of an S3 error body (read up to [`MAX_ERROR_BODY`]), when it looks like one: a short
/// word, never free text from the store.
async fn error_code(mut response: reqwest::Response) -> Option<String> {
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let body = String::from_utf8_lossy(&body);
    let code = body.split_once("<Code>")?.1.split_once("</Code>")?.0.trim();
    (!code.is_empty() && code.len() <= 64 && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.')).then(|| code.to_string())
}

/// What the store's refusal means, and whether a retry could change it.
fn judge(status: u16, code: Option<&str>, object: &Object) -> MediaError {
    let answered = match code {
        Some(code) => format!("{status} {code}"),
        None => status.to_string(),
    };
    let retryable =
        status >= 500 || status == 429 || matches!(code, Some("SlowDown" | "InternalError" | "ServiceUnavailable" | "RequestTimeout"));
    if retryable {
        return MediaError::RemoteUnavailable { uri: object.to_string(), reason: format!("the object store answered {answered}") };
    }
    let bucket = &object.bucket;
    let why = match (status, code) {
        (_, Some("NoSuchKey")) => format!("bucket {bucket} has no object with this key"),
        (_, Some("NoSuchBucket")) => format!("there is no bucket {bucket} at s3.endpoint"),
        (404, _) => "not found".to_string(),
        (_, Some("InvalidAccessKeyId")) => "the object store does not know s3.access_key_id".to_string(),
        (_, Some("SignatureDoesNotMatch")) => "the request's signature does not match: check s3.secret_access_key".to_string(),
        (_, Some("ExpiredToken" | "InvalidToken" | "TokenRefreshRequired")) => "s3.session_token is expired or invalid".to_string(),
        (_, Some("RequestTimeTooSkewed")) => "the worker's clock is too far from the object store's".to_string(),
        (_, Some("AuthorizationHeaderMalformed" | "PermanentRedirect" | "IncorrectEndpoint")) | (300..=399, _) => {
            format!("bucket {bucket} is in another region or behind another endpoint: check s3.region and s3.endpoint")
        }
        (403, _) => format!(
            "access denied: s3.access_key_id may not read this object (without s3:ListBucket on {bucket}, a missing key answers this too)"
        ),
        _ => "the object store refused the request".to_string(),
    };
    MediaError::RemoteRefused { uri: object.to_string(), reason: format!("{why} ({answered})") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::error::Disposition;

    #[test]
    fn uris_name_a_bucket_and_a_literal_key() {
        let object = parse("S3://media/talks/2024/a talk?.mp4").unwrap();
        assert_eq!((object.bucket.as_str(), object.key.as_str()), ("media", "talks/2024/a talk?.mp4"));
        assert_eq!(object.to_string(), "s3://media/talks/2024/a talk?.mp4");
        assert_eq!(canonical("s3://my.bucket-1/k#1").unwrap(), "s3://my.bucket-1/k#1");
        for (bad, needle) in [
            ("s3://media", "no key"),
            ("s3://media/", "1 to 1024 bytes"),
            ("s3://Media/a.mp4", "bucket name"),
            ("s3://me/a.mp4", "bucket name"),
            ("s3://-media/a.mp4", "bucket name"),
            ("s3://me..dia/a.mp4", "bucket name"),
            ("s3://my_bucket/a.mp4", "bucket name"),
            ("s3://192.168.1.1/a.mp4", "bucket name"),
            ("s3://user:pw@media/a.mp4", "s3://***@media/a.mp4 refused: not a bucket name"),
            ("s3://media/a/../b.mp4", ". or .."),
            ("s3://media/./b.mp4", ". or .."),
            ("s3://media/a\nb.mp4", "control character"),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(matches!(err, MediaError::RemoteRefused { .. }) && err.to_string().contains(needle), "{bad:?}: {err}");
            assert_eq!(err.disposition(), Disposition::Permanent);
        }
        assert!(parse(&format!("s3://media/{}", "k".repeat(1025))).is_err());
        let off = S3Settings::default();
        let err = check("s3://media/a.mp4", &off).unwrap_err();
        assert!(matches!(err, MediaError::S3Disabled(_)) && err.to_string().contains("s3.endpoint"), "{err}");
    }

    #[test]
    fn urls_are_path_or_virtual_hosted_style() {
        let object = parse("s3://media/talks/a talk+1%.mp4").unwrap();
        let mut settings = S3Settings { endpoint: "http://127.0.0.1:9000".into(), ..S3Settings::default() };
        assert_eq!(object_url(&settings, &object).unwrap().as_str(), "http://127.0.0.1:9000/media/talks/a%20talk%2B1%25.mp4");
        settings.endpoint = "https://s3.eu-west-1.amazonaws.com/".into();
        settings.path_style = false;
        assert_eq!(object_url(&settings, &object).unwrap().as_str(), "https://media.s3.eu-west-1.amazonaws.com/talks/a%20talk%2B1%25.mp4");
        settings.endpoint = "https://store.example/prefix/".into();
        settings.path_style = true;
        assert_eq!(object_url(&settings, &object).unwrap().as_str(), "https://store.example/prefix/media/talks/a%20talk%2B1%25.mp4");
    }

    #[test]
    fn a_get_is_signed_in_headers_and_anonymous_without_credentials() {
        let mut settings = S3Settings { endpoint: "http://127.0.0.1:9000".into(), ..S3Settings::default() };
        let url = object_url(&settings, &parse("s3://media/a.mp4").unwrap()).unwrap();
        let now = Utc::now();
        assert!(signed_get_headers(&settings, &url, now).is_empty(), "anonymous");
        settings.access_key_id = Secret::new("AKIDEXAMPLE");
        settings.secret_access_key = Secret::new("hunter2hunter2");
        settings.session_token = Secret::new("tok");
        let headers = signed_get_headers(&settings, &url, now);
        let auth = &headers.iter().find(|(n, _)| *n == "authorization").unwrap().1;
        assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"), "{auth}");
        assert!(
            auth.contains("/us-east-1/s3/aws4_request,SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token,"),
            "{auth}"
        );
        assert!(!auth.contains("hunter2"), "{auth}");
        assert!(headers.iter().any(|(n, v)| *n == "x-amz-security-token" && v == "tok"));
    }

    #[test]
    fn the_store_s_answer_decides_the_disposition() {
        let object = parse("s3://media/a.mp4").unwrap();
        for (status, code, needle) in [
            (404, Some("NoSuchKey"), "has no object with this key (404 NoSuchKey)"),
            (404, Some("NoSuchBucket"), "no bucket media"),
            (403, Some("AccessDenied"), "access denied"),
            (403, Some("InvalidAccessKeyId"), "s3.access_key_id"),
            (403, Some("SignatureDoesNotMatch"), "s3.secret_access_key"),
            (400, Some("AuthorizationHeaderMalformed"), "s3.region"),
            (301, None, "another region"),
            (400, Some("InvalidArgument"), "refused the request (400 InvalidArgument)"),
        ] {
            let err = judge(status, code, &object);
            assert_eq!(err.disposition(), Disposition::Permanent, "{err}");
            assert!(err.to_string().contains(needle) && err.to_string().contains("s3://media/a.mp4"), "{err}");
        }
        for (status, code) in
            [(503, Some("SlowDown")), (500, Some("InternalError")), (502, None), (429, None), (400, Some("RequestTimeout"))]
        {
            let err = judge(status, code, &object);
            assert_eq!(err.disposition(), Disposition::Retryable, "{err}");
        }
    }
}
