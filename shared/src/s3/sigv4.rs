//! AWS Signature Version 4 for requests without a body, in the `Authorization` header: what every
//! S3-compatible store checks. Written out here (HMAC-SHA256 over a canonical request, ~50 lines)
//! instead of pulling in an SDK; checked against AWS's published example and, in
//! `tests/tests/s3.rs`, by a real S3 server that verifies signatures.
//!
//! The signature goes in a header, never in the URL (a presigned URL would carry it into any log or
//! error that shows the URL).

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// SHA-256 of an empty body, the payload hash of a GET.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Who signs, and for which region and service.
pub struct Signer<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub region: &'a str,
    pub service: &'a str,
}

impl Signer<'_> {
    /// The `Authorization` header of a request. `path` is the request's path exactly as sent
    /// (already percent-encoded; S3 does not encode it twice), `query` its canonical query string
    /// (empty here), `headers` every signed header as (lowercase name, value) including `host` and
    /// `x-amz-date` (which must be `now`), `payload_hash` the hex SHA-256 of the body.
    pub fn authorization(
        &self,
        method: &str,
        path: &str,
        query: &str,
        headers: &[(&str, &str)],
        payload_hash: &str,
        now: DateTime<Utc>,
    ) -> String {
        let mut headers: Vec<(&str, &str)> = headers.to_vec();
        headers.sort_unstable_by_key(|(name, _)| *name);
        let canonical_headers: String = headers.iter().map(|(name, value)| format!("{name}:{}\n", value.trim())).collect();
        let signed_headers = headers.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(";");
        let canonical_request = format!("{method}\n{path}\n{query}\n{canonical_headers}\n{signed_headers}\n{payload_hash}");
        let day = now.format("%Y%m%d").to_string();
        let scope = format!("{day}/{}/{}/aws4_request", self.region, self.service);
        let string_to_sign =
            format!("AWS4-HMAC-SHA256\n{}\n{scope}\n{}", now.format("%Y%m%dT%H%M%SZ"), hex::encode(Sha256::digest(canonical_request)));
        let key = [day.as_str(), self.region, self.service, "aws4_request"]
            .iter()
            .fold(format!("AWS4{}", self.secret_access_key).into_bytes(), |key, part| hmac(&key, part.as_bytes()));
        let signature = hex::encode(hmac(&key, string_to_sign.as_bytes()));
        format!("AWS4-HMAC-SHA256 Credential={}/{scope},SignedHeaders={signed_headers},Signature={signature}", self.access_key_id)
    }
}

/// The `x-amz-date` value of `now`.
pub fn amz_date(now: DateTime<Utc>) -> String {
    now.format("%Y%m%dT%H%M%SZ").to_string()
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's worked example "GET Object" (Amazon S3 API reference, Signature Version 4, header
    /// authentication): the example credentials, bucket and date, and the signature AWS publishes.
    #[test]
    fn signs_aws_published_get_object_example() {
        let signer = Signer {
            access_key_id: "AKIAIOSFODNN7EXAMPLE",
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            region: "us-east-1",
            service: "s3",
        };
        let now = DateTime::parse_from_rfc3339("2013-05-24T00:00:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(amz_date(now), "20130524T000000Z");
        let headers = [
            ("host", "examplebucket.s3.amazonaws.com"),
            ("range", "bytes=0-9"),
            ("x-amz-content-sha256", EMPTY_SHA256),
            ("x-amz-date", "20130524T000000Z"),
        ];
        assert_eq!(
            signer.authorization("GET", "/test.txt", "", &headers, EMPTY_SHA256, now),
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,\
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,\
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }
}
