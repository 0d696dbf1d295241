//! Remote media (`http://`, `https://`), refused unless `media.allow_http`. A remote file is
//! downloaded here, in Rust, to a temporary file that ffprobe and ffmpeg then read as local media, so
//! that every rule is enforced in one place and no URL (nor a credential in it) reaches a command line:
//!
//! - the host must be in `media.allow_hosts` when that list is set;
//! - every address the host resolves to must be public (no loopback, private, link-local, CGNAT,
//!   unique-local, multicast …) unless the host is listed; the connection is pinned to the checked
//!   address, so a second DNS answer cannot swap it;
//! - connect and read-silence timeouts (`media.remote_timeout_ms`), no redirects, TLS verified
//!   against the web PKI roots, a size cap (`media.max_remote_bytes`);
//! - URLs are shown with their user info and query string removed ([`redact`]).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::config::MediaSettings;
use crate::media::MediaError;

/// True for `http(s)://` URIs.
pub fn is_remote(uri: &str) -> bool {
    let lower = uri.get(..8).unwrap_or(uri).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// A media URI as it may be shown in logs, errors and headers: an http(s) URL loses its user info,
/// query and fragment; anything else (a local path) is shown as it is.
pub fn redact(uri: &str) -> String {
    if !is_remote(uri) {
        return uri.to_string();
    }
    let Ok(mut url) = url::Url::parse(uri) else { return "(an unparsable URL)".into() };
    let had_query = url.query().is_some();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    let mut shown = url.to_string();
    if had_query {
        shown.push_str("?…");
    }
    shown
}

/// Downloads `uri` to a temporary file (deleted when the returned path is dropped).
///
/// # Errors
/// [`MediaError::RemoteRefused`] when a rule refuses the URL or the server refuses the request
/// (permanent), [`MediaError::RemoteTooLarge`], or [`MediaError::RemoteUnavailable`] when the
/// server cannot be reached or stops answering (retryable).
pub async fn fetch(uri: &str, settings: &MediaSettings) -> Result<tempfile::TempPath, MediaError> {
    let shown = redact(uri);
    let refused = |reason: String| MediaError::RemoteRefused { uri: shown.clone(), reason };
    let unavailable = |reason: String| MediaError::RemoteUnavailable { uri: shown.clone(), reason };
    if !settings.allow_http {
        return Err(MediaError::HttpDisabled(shown));
    }
    let mut url = url::Url::parse(uri).map_err(|e| refused(format!("not a URL ({e})")))?;
    let host = url.host_str().ok_or_else(|| refused("no host".into()))?.to_string();
    let listed = settings.allow_hosts.iter().any(|h| h.eq_ignore_ascii_case(&host));
    if !settings.allow_hosts.is_empty() && !listed {
        return Err(refused(format!("host {host} is not in media.allow_hosts")));
    }
    let timeout = Duration::from_millis(settings.remote_timeout_ms.max(1));
    let port = url.port_or_known_default().unwrap_or(80);
    let addresses: Vec<SocketAddr> = tokio::time::timeout(timeout, tokio::net::lookup_host((host.as_str(), port)))
        .await
        .map_err(|_| unavailable(format!("resolving {host} timed out")))?
        .map_err(|e| unavailable(format!("cannot resolve {host}: {e}")))?
        .collect();
    let Some(&address) = addresses.first() else { return Err(unavailable(format!("{host} has no address"))) };
    if !listed && let Some(bad) = addresses.iter().find(|a| !is_public(a.ip())) {
        return Err(refused(format!(
            "{host} resolves to {}, which is not a public address (list the host in media.allow_hosts to allow it)",
            bad.ip()
        )));
    }
    let (user, password) = (url.username().to_string(), url.password().map(str::to_string));
    let _ = url.set_username("");
    let _ = url.set_password(None);
    let client = reqwest::Client::builder()
        .connect_timeout(timeout)
        .read_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .resolve(&host, address)
        .build()
        .map_err(|e| unavailable(format!("http client: {e}")))?;
    let mut request = client.get(url);
    if !user.is_empty() {
        request = request.basic_auth(user, password);
    }
    let response = request.send().await.map_err(|e| unavailable(describe(&e)))?;
    let status = response.status();
    if status.is_server_error() {
        return Err(unavailable(format!("the server answered {status}")));
    }
    if !status.is_success() {
        return Err(refused(format!("the server answered {status}")));
    }
    let limit = settings.max_remote_bytes;
    let too_large = || MediaError::RemoteTooLarge { uri: shown.clone(), limit };
    if response.content_length().is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let file = tempfile::Builder::new().prefix("heimdex-remote-").tempfile().map_err(|e| MediaError::Tool(format!("temporary file: {e}")))?;
    let (file, path) = file.into_parts();
    let mut file = tokio::fs::File::from_std(file);
    let mut body = response.bytes_stream();
    let mut received = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| unavailable(describe(&e)))?;
        received += chunk.len() as u64;
        if received > limit {
            return Err(too_large());
        }
        file.write_all(&chunk).await.map_err(|e| MediaError::Tool(format!("writing the download: {e}")))?;
    }
    file.flush().await.map_err(|e| MediaError::Tool(format!("writing the download: {e}")))?;
    if received == 0 {
        return Err(MediaError::Empty(shown));
    }
    Ok(path)
}

/// A reqwest error without the URL it carries (which may hold a query string).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "transfer failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() { kind.to_string() } else { format!("{kind}: {detail}") }
}

/// Whether `ip` is a public unicast address.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (b & 0xc0) == 64))
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public(IpAddr::V4(v4)),
            None => {
                let first = v6.segments()[0];
                !(v6.is_loopback() || v6.is_unspecified() || v6.is_multicast() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_secrets() {
        assert_eq!(redact("https://bob:hunter2@cdn.example/v/a.mp4?sig=abc#t=3"), "https://cdn.example/v/a.mp4?…");
        assert_eq!(redact("http://cdn.example/a.mp4"), "http://cdn.example/a.mp4");
        assert_eq!(redact("talks/a.mp4"), "talks/a.mp4");
    }

    #[test]
    fn only_public_addresses_pass() {
        for private in ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0", "::1", "fd00::1", "fe80::1", "::ffff:127.0.0.1"] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["1.1.1.1", "151.101.1.1", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }
}
