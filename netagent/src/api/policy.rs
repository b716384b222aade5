//! `/v1/slots/{n}/egress` and `/v1/slots/{n}/rate_limit`: changing an existing
//! slot's egress lists (PUT replaces both lists) and bandwidth limit (PUT sets,
//! DELETE removes). Each answers 200 with the whole slot as `GET` shows it.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use super::{ApiError, AppState, apply, parse_index};
use crate::bpf::EgressRules;
use crate::controller::Action;
use crate::slot::RateLimitSpec;

/// Example body of `PUT /v1/slots/{n}/egress`, for error messages.
const EGRESS_EXAMPLE: &str = r#"{"allow":["10.1.0.0/16"],"deny":["198.51.100.0/24"]}"#;
/// Example body of `PUT /v1/slots/{n}/rate_limit`, for error messages.
const RATE_EXAMPLE: &str = r#"{"bits_per_second":100000000,"burst_bytes":65536}"#;

/// Parses a required JSON body; `what` and `example` go into the messages.
fn parse_body<T: DeserializeOwned>(body: &[u8], what: &str, example: &str) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(format!(
            "{what} needs a JSON body, e.g. {example}"
        )));
    }
    serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => ApiError::bad_request(format!("invalid {what}: {e}; e.g. {example}")),
            _ => ApiError::bad_request(format!("request body is not valid JSON: {e}")),
        }
    })
}

/// Parses the body of `PUT /v1/slots/{n}/egress`: both lists, each optional
/// (`{}` removes every rule of the slot).
pub fn parse_egress(body: &[u8]) -> Result<EgressRules, ApiError> {
    let egress: EgressRules = parse_body(body, "egress rules", EGRESS_EXAMPLE)?;
    crate::slot::policy::validate_egress(&egress).map_err(ApiError::bad_request)?;
    Ok(egress)
}

/// Parses the body of `PUT /v1/slots/{n}/rate_limit`.
pub fn parse_rate_limit(body: &[u8]) -> Result<RateLimitSpec, ApiError> {
    let limit: RateLimitSpec = parse_body(body, "rate limit", RATE_EXAMPLE)?;
    limit.validate().map_err(ApiError::bad_request)?;
    Ok(limit)
}

/// `PUT /v1/slots/{n}/egress`: replaces the slot's allow and deny lists; 200
/// with the slot, 404 if unknown.
pub async fn put_egress(State(c): State<AppState>, Path(n): Path<String>, body: Bytes) -> Response {
    let (index, egress) = match parse_index(&n).and_then(|i| Ok((i, parse_egress(&body)?))) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    apply(&c, Action::SetEgress { index, egress }).await
}

/// `PUT /v1/slots/{n}/rate_limit`: sets the slot's bandwidth limit (a new limit
/// starts with a full burst); 200 with the slot, 404 if unknown.
pub async fn put_rate_limit(
    State(c): State<AppState>,
    Path(n): Path<String>,
    body: Bytes,
) -> Response {
    let (index, limit) = match parse_index(&n).and_then(|i| Ok((i, parse_rate_limit(&body)?))) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    apply(
        &c,
        Action::SetRateLimit {
            index,
            limit: Some(limit),
        },
    )
    .await
}

/// `DELETE /v1/slots/{n}/rate_limit`: the slot is unlimited again; 200 with the
/// slot (also when it had no limit), 404 if unknown.
pub async fn delete_rate_limit(State(c): State<AppState>, Path(n): Path<String>) -> Response {
    match parse_index(&n) {
        Ok(index) => apply(&c, Action::SetRateLimit { index, limit: None }).await,
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_bodies() {
        let e = parse_egress(br#"{"allow":["10.1.0.0/16"],"deny":["198.18.5.0/24"]}"#).unwrap();
        assert_eq!(e.allow.len(), 1);
        assert_eq!(e.deny[0].to_string(), "198.18.5.0/24");
        assert_eq!(parse_egress(b"{}").unwrap(), EgressRules::default());
        for (body, needle) in [
            (&b""[..], "needs a JSON body"),
            (b"{", "not valid JSON"),
            (br#"{"allow":"10.0.0.0/8"}"#, "invalid egress rules"),
            (br#"{"allow":["10.0.0.1/8"]}"#, "host bits set"),
            (br#"{"allow":["300.0.0.0/8"]}"#, "not IPv4"),
            (br#"{"deny":["10.0.0.0/8","10.0.0.0/8"]}"#, "appears twice"),
            (br#"{"allow":[],"extra":1}"#, "unknown field `extra`"),
        ] {
            let err = parse_egress(body).unwrap_err();
            assert_eq!(err.status, 400);
            assert!(
                err.message.contains(needle),
                "{}: {}",
                String::from_utf8_lossy(body),
                err.message
            );
        }
    }

    #[test]
    fn rate_limit_bodies() {
        let l = parse_rate_limit(br#"{"bits_per_second":20000000,"burst_bytes":65536}"#).unwrap();
        assert_eq!(l.limit().rate_bytes_per_sec, 2_500_000);
        for (body, needle) in [
            (&b""[..], "needs a JSON body"),
            (
                br#"{"bits_per_second":0,"burst_bytes":65536}"#,
                "out of range",
            ),
            (
                br#"{"bits_per_second":1000000,"burst_bytes":10}"#,
                "burst_bytes 10",
            ),
            (
                br#"{"rate_mbit":5,"burst_bytes":65536}"#,
                "unknown field `rate_mbit`",
            ),
            (
                br#"{"bits_per_second":-1,"burst_bytes":65536}"#,
                "invalid rate limit",
            ),
        ] {
            let err = parse_rate_limit(body).unwrap_err();
            assert_eq!(err.status, 400);
            assert!(
                err.message.contains(needle),
                "{}: {}",
                String::from_utf8_lossy(body),
                err.message
            );
        }
    }
}
