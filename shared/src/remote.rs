//! Remote media (`http://`, `https://`), refused unless `media.allow_http`. Enqueue only [`check`]s a
//! URL (it answers at once and downloads nothing); the worker [`fetch`]es it once, here, in Rust, to
//! a temporary file that ffprobe and ffmpeg then read as local media, so that every rule is enforced
//! in one place and no URL (nor a credential in it) reaches a command line:
//!
//! - the URL is parsed as a browser does ([`canonical`]): `http://2130706433/`, `http://0177.1/`
//!   and `http://0/` are the IPv4 addresses they spell, `http://[::1]/` is an IPv6 literal; the
//!   canonical form (fragment dropped) is what identifies a remote video (`videos.uri`);
//! - the host must be in `media.allow_hosts` when that list is set;
//! - every address the host is or resolves to must be public ([`is_public`]: no loopback, private,
//!   link-local, CGNAT, benchmarking, reserved, NAT64, 6to4, IPv4-compatible …) unless the host is
//!   listed; the connection is pinned to the checked address, so a second DNS answer cannot swap it,
//!   and no `HTTP(S)_PROXY` from the environment is used, so no proxy resolves the name again;
//! - a refused or unparsable address is permanent; a name that does not resolve, a server that
//!   cannot be reached or stops answering is retryable;
//! - connect and read-silence timeouts (`media.remote_timeout_ms`), an overall deadline per
//!   download (`media.remote_deadline_ms`), no redirects, TLS verified against the web PKI roots, a
//!   size cap (`media.max_remote_bytes`) checked against `Content-Length` first and on every chunk;
//! - URLs are shown with their user info and query string removed ([`redact`]).
//!
//! The worker downloads inside a task, so it runs at most `worker.concurrency` downloads at once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use url::{Host, Url};

use crate::config::MediaSettings;
use crate::media::MediaError;

/// Names resolved at once in one process (each lookup holds a blocking thread until the resolver
/// answers, whatever the timeout): an API flooded with slow names waits here instead.
const MAX_RESOLVING: usize = 32;
static RESOLVING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_RESOLVING);

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
    let Ok(mut url) = Url::parse(uri) else { return "(an unparsable URL)".into() };
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

/// `text` with every URL in it as [`redact`] shows it (http and https) or with its password
/// masked (other schemes): for reasons that quote a URL, and for stored errors.
pub fn redact_text(text: &str) -> String {
    if !text.contains("://") {
        return text.to_string();
    }
    let delimiter = |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`' | '(' | ')' | '[' | ']' | '{' | '}');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let start = rest[..at].rfind(delimiter).map_or(0, |i| i + rest[i..].chars().next().map_or(1, char::len_utf8));
        let end = rest[at..].find(delimiter).map_or(rest.len(), |n| at + n);
        out.push_str(&rest[..start]);
        let url = &rest[start..end];
        if is_remote(url) {
            out.push_str(&redact(url));
        } else {
            out.push_str(&crate::config::redact_url(url));
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The canonical form of an http(s) URL, as a browser would send it (host lowercased, IPv4 numbers
/// in any notation written as dotted quads, default port and fragment dropped). This string
/// identifies a remote video: enqueuing the same canonical URL again is the same video.
///
/// # Errors
/// [`MediaError::RemoteRefused`] (permanent) when the URL does not parse, is not http(s) or has no
/// host.
pub fn canonical(uri: &str) -> Result<String, MediaError> {
    parse(uri).map(|url| url.to_string())
}

fn parse(uri: &str) -> Result<Url, MediaError> {
    let refused = |reason: &str| MediaError::RemoteRefused { uri: redact(uri), reason: reason.to_string() };
    let mut url = Url::parse(uri).map_err(|e| refused(&format!("not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(refused("not an http(s) URL"));
    }
    if url.host().is_none() {
        return Err(refused("no host"));
    }
    url.set_fragment(None);
    Ok(url)
}

/// A URL that passed [`check`]: its canonical form and the address the download must connect to.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The canonical URL ([`canonical`]).
    pub url: String,
    /// The checked address the connection is pinned to.
    pub address: SocketAddr,
}

/// Checks a URL without downloading it: http(s), allowed, and every address of its host public
/// (a name is resolved, bounded by `media.remote_timeout_ms`).
///
/// # Errors
/// [`MediaError::HttpDisabled`], [`MediaError::RemoteRefused`] (permanent: a rule refuses the URL or
/// an address), or [`MediaError::RemoteUnavailable`] (retryable: the name does not resolve now).
pub async fn check(uri: &str, settings: &MediaSettings) -> Result<Checked, MediaError> {
    let shown = redact(uri);
    if !settings.allow_http {
        return Err(MediaError::HttpDisabled(shown));
    }
    let url = parse(uri)?;
    let refused = |reason: String| MediaError::RemoteRefused { uri: shown.clone(), reason };
    let unavailable = |reason: String| MediaError::RemoteUnavailable { uri: shown.clone(), reason };
    let host = url.host().ok_or_else(|| refused("no host".into()))?.to_owned();
    let shown_host = bare(&host.to_string()).to_string();
    let listed = settings.allow_hosts.iter().any(|h| bare(h).eq_ignore_ascii_case(&shown_host));
    if !settings.allow_hosts.is_empty() && !listed {
        return Err(refused(format!("host {shown_host} is not in media.allow_hosts")));
    }
    let port = url.port_or_known_default().unwrap_or(80);
    let addresses: Vec<SocketAddr> = match &host {
        Host::Ipv4(ip) => vec![SocketAddr::new(IpAddr::V4(*ip), port)],
        Host::Ipv6(ip) => vec![SocketAddr::new(IpAddr::V6(*ip), port)],
        Host::Domain(name) => {
            let timeout = Duration::from_millis(settings.remote_timeout_ms.max(1));
            let lookup = async {
                // getaddrinfo runs on a blocking thread that a timeout cannot stop: bound how many.
                let _permit = RESOLVING.acquire().await;
                tokio::net::lookup_host((name.as_str(), port)).await
            };
            tokio::time::timeout(timeout, lookup)
                .await
                .map_err(|_| unavailable(format!("resolving {name} timed out")))?
                .map_err(|e| unavailable(format!("cannot resolve {name}: {e}")))?
                .collect()
        }
    };
    let Some(&address) = addresses.first() else { return Err(unavailable(format!("{shown_host} has no address"))) };
    if !listed && let Some(bad) = addresses.iter().find(|a| !is_public(a.ip())) {
        let what = match &host {
            Host::Domain(name) => format!("{name} resolves to {}, which", bad.ip()),
            _ => bad.ip().to_string(),
        };
        return Err(refused(format!("{what} is not a public address (list the host in media.allow_hosts to allow it)")));
    }
    Ok(Checked { url: url.to_string(), address })
}

/// A host as written in a URL or in `media.allow_hosts`, without IPv6 brackets.
fn bare(host: &str) -> &str {
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

/// [`check`]s `uri`, then downloads it to a temporary file (deleted when the returned path is
/// dropped), within `media.remote_deadline_ms` overall.
///
/// # Errors
/// As [`check`]; [`MediaError::RemoteRefused`] when the server refuses the request or redirects
/// (permanent), [`MediaError::RemoteTooLarge`], [`MediaError::Empty`], or
/// [`MediaError::RemoteUnavailable`] when the server cannot be reached, stops answering or misses
/// the deadline (retryable).
pub async fn fetch(uri: &str, settings: &MediaSettings) -> Result<tempfile::TempPath, MediaError> {
    let deadline = Duration::from_millis(settings.remote_deadline_ms.max(1));
    match tokio::time::timeout(deadline, download(uri, settings)).await {
        Ok(result) => result,
        Err(_) => Err(MediaError::RemoteUnavailable {
            uri: redact(uri),
            reason: format!("the download took longer than media.remote_deadline_ms ({} ms)", deadline.as_millis()),
        }),
    }
}

async fn download(uri: &str, settings: &MediaSettings) -> Result<tempfile::TempPath, MediaError> {
    let Checked { url, address } = check(uri, settings).await?;
    let shown = redact(uri);
    let refused = |reason: String| MediaError::RemoteRefused { uri: shown.clone(), reason };
    let unavailable = |reason: String| MediaError::RemoteUnavailable { uri: shown.clone(), reason };
    let mut url = Url::parse(&url).map_err(|e| refused(format!("not a URL ({e})")))?;
    let (user, password) = (url.username().to_string(), url.password().map(str::to_string));
    let _ = url.set_username("");
    let _ = url.set_password(None);
    let timeout = Duration::from_millis(settings.remote_timeout_ms.max(1));
    let mut client =
        reqwest::Client::builder().connect_timeout(timeout).read_timeout(timeout).redirect(reqwest::redirect::Policy::none()).no_proxy();
    if let Some(Host::Domain(name)) = url.host() {
        client = client.resolve(name, address);
    }
    let client = client.build().map_err(|e| unavailable(format!("http client: {e}")))?;
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
    save(response, settings.max_remote_bytes, &shown).await
}

/// Writes the body of a successful `response` to a temporary file (deleted when the returned path is
/// dropped), refusing more than `limit` bytes: `Content-Length` is checked first, then every chunk.
/// `shown` names the media in errors.
///
/// # Errors
/// [`MediaError::RemoteTooLarge`], [`MediaError::Empty`], [`MediaError::RemoteUnavailable`] when the
/// transfer breaks off, or [`MediaError::Tool`] when the temporary file cannot be written.
pub(crate) async fn save(response: reqwest::Response, limit: u64, shown: &str) -> Result<tempfile::TempPath, MediaError> {
    let too_large = || MediaError::RemoteTooLarge { uri: shown.to_string(), limit };
    if response.content_length().is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let file =
        tempfile::Builder::new().prefix("heimdex-remote-").tempfile().map_err(|e| MediaError::Tool(format!("temporary file: {e}")))?;
    let (file, path) = file.into_parts();
    let mut file = tokio::fs::File::from_std(file);
    let mut body = response.bytes_stream();
    let mut received = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| MediaError::RemoteUnavailable { uri: shown.to_string(), reason: describe(&e) })?;
        received += chunk.len() as u64;
        if received > limit {
            return Err(too_large());
        }
        file.write_all(&chunk).await.map_err(|e| MediaError::Tool(format!("writing the download: {e}")))?;
    }
    file.flush().await.map_err(|e| MediaError::Tool(format!("writing the download: {e}")))?;
    if received == 0 {
        return Err(MediaError::Empty(shown.to_string()));
    }
    Ok(path)
}

/// A reqwest error without the URL it carries (which may hold a query string).
pub(crate) fn describe(e: &reqwest::Error) -> String {
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

/// Whether `ip` is a public unicast address: IPv4 outside every special-purpose range (RFC 6890 and
/// its updates), IPv6 in global unicast `2000::/3` outside Teredo and the other IETF assignments
/// (`2001::/23`), documentation (`2001:db8::/32`, `3fff::/20`) and 6to4 (`2002::/16`, which embeds
/// an IPv4 address a relay would reach). Everything else is refused: NAT64 `64:ff9b::/96` and
/// `64:ff9b:1::/48`, IPv4-compatible `::a.b.c.d`, discard-only, unique-local, link-local, multicast.
/// An IPv4-mapped `::ffff:a.b.c.d` is judged as the IPv4 address it is.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

/// IPv4 special-purpose ranges, as (network, prefix length).
const REFUSED_V4: [(Ipv4Addr, u32); 15] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8),       // "this network", incl. 0.0.0.0
    (Ipv4Addr::new(10, 0, 0, 0), 8),      // private
    (Ipv4Addr::new(100, 64, 0, 0), 10),   // CGNAT
    (Ipv4Addr::new(127, 0, 0, 0), 8),     // loopback
    (Ipv4Addr::new(169, 254, 0, 0), 16),  // link-local (cloud metadata)
    (Ipv4Addr::new(172, 16, 0, 0), 12),   // private
    (Ipv4Addr::new(192, 0, 0, 0), 24),    // IETF protocol assignments
    (Ipv4Addr::new(192, 0, 2, 0), 24),    // documentation
    (Ipv4Addr::new(192, 88, 99, 0), 24),  // 6to4 relay anycast
    (Ipv4Addr::new(192, 168, 0, 0), 16),  // private
    (Ipv4Addr::new(198, 18, 0, 0), 15),   // benchmarking
    (Ipv4Addr::new(198, 51, 100, 0), 24), // documentation
    (Ipv4Addr::new(203, 0, 113, 0), 24),  // documentation
    (Ipv4Addr::new(224, 0, 0, 0), 4),     // multicast
    (Ipv4Addr::new(240, 0, 0, 0), 4),     // reserved, incl. broadcast
];

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let bits = u32::from(ip);
    !REFUSED_V4.iter().any(|&(net, len)| bits >> (32 - len) == u32::from(net) >> (32 - len))
}

/// IPv6 ranges inside `2000::/3` that are not public, as (network, prefix length).
const REFUSED_V6: [(Ipv6Addr, u32); 4] = [
    (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 23), // IETF assignments, Teredo, benchmarking, ORCHID
    (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32), // documentation
    (Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16), // 6to4
    (Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20), // documentation
];

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let bits = u128::from(ip);
    let within = |net: Ipv6Addr, len: u32| bits >> (128 - len) == u128::from(net) >> (128 - len);
    within(Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 0), 3) && !REFUSED_V6.iter().any(|&(net, len)| within(net, len))
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
        let refused = [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "198.18.0.1",
            "198.19.255.254",
            "240.0.0.1",
            "255.255.255.255",
            "192.0.0.1",
            "192.0.0.170",
            "192.0.2.1",
            "192.88.99.1",
            "203.0.113.9",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "::1.1.1.1",
            "64:ff9b::7f00:1",
            "64:ff9b::101:101",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2002:101:101::1",
            "2001::1",
            "2001:0:4136:e378::1",
            "2001:db8::1",
            "3fff::1",
            "100::1",
            "fec0::1",
            "5f00::1",
        ];
        for ip in refused {
            assert!(!is_public(ip.parse().unwrap()), "{ip} must be refused");
        }
        for ip in ["1.1.1.1", "151.101.1.1", "198.20.0.1", "223.255.255.1", "2606:4700::1111", "2a00:1450:4001::1", "::ffff:1.1.1.1"] {
            assert!(is_public(ip.parse().unwrap()), "{ip} is public");
        }
    }

    #[test]
    fn urls_are_canonical_and_every_ipv4_notation_is_its_address() {
        assert_eq!(canonical("HTTP://CDN.Example:80/a/../v.mp4#t=3").unwrap(), "http://cdn.example/v.mp4");
        assert_eq!(canonical("http://2130706433/v.mp4").unwrap(), "http://127.0.0.1/v.mp4");
        assert_eq!(canonical("http://0177.0.0.1/v.mp4").unwrap(), "http://127.0.0.1/v.mp4");
        assert_eq!(canonical("http://0x7f.1/v.mp4").unwrap(), "http://127.0.0.1/v.mp4");
        assert_eq!(canonical("http://0/v.mp4").unwrap(), "http://0.0.0.0/v.mp4");
        assert_eq!(canonical("http://[2001:DB8::1]/a.mp4").unwrap(), "http://[2001:db8::1]/a.mp4");
        for bad in ["http://[::1/a.mp4", "http://256.256.256.256/", "ftp://cdn.example/a.mp4"] {
            let err = canonical(bad).unwrap_err();
            assert!(matches!(err, MediaError::RemoteRefused { .. }), "{bad}: {err}");
            assert_eq!(err.disposition(), crate::error::Disposition::Permanent, "{bad}");
        }
    }

    #[test]
    fn urls_in_text_lose_their_secrets() {
        assert_eq!(
            redact_text("ffprobe cannot read https://bob:pw@cdn.example/a.mp4?sig=1: 403 (\"http://u:p@h/x?y\")"),
            "ffprobe cannot read https://cdn.example/a.mp4?… 403 (\"http://h/x?…\")"
        );
        assert_eq!(redact_text("broker amqp://guest:pw@10.0.0.1:5672/%2f down"), "broker amqp://guest:***@10.0.0.1:5672/%2f down");
        assert_eq!(redact_text("no url here"), "no url here");
    }
}
