//! `/v1/slots` and `/v1/slots/{n}`: create (PUT), read (GET), delete (DELETE), list.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{ApiError, AppState, apply, parse_index};
use crate::bpf::EgressRules;
use crate::controller::Action;
use crate::slot::{GuestLink, GuestMac, PolicyRequest, RateLimitSpec};

/// The optional body of `PUT /v1/slots/{n}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSlotRequest {
    /// `"tap"` (the default) or `"veth"`.
    pub guest_link: Option<String>,
    /// With `"veth"`: the existing namespace that receives the guest end.
    pub guest_netns: Option<String>,
    /// The only source MAC the guest may use.
    pub guest_mac: Option<GuestMac>,
    /// The slot's egress allow/deny lists.
    pub egress: Option<EgressRules>,
    /// The slot's bandwidth limit.
    pub rate_limit: Option<RateLimitSpec>,
}

impl CreateSlotRequest {
    /// Parses a request body into the guest link and the security settings; an
    /// empty body means a TAP slot with none.
    pub fn parse(body: &[u8]) -> Result<(GuestLink, PolicyRequest), ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok((GuestLink::Tap, PolicyRequest::default()));
        }
        let req: CreateSlotRequest = serde_json::from_slice(body).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => ApiError::bad_request(format!(
                    "invalid slot request: {e}; the body is optional, e.g. {{\"guest_link\":\"veth\",\"guest_netns\":\"NAME\",\"guest_mac\":\"02:00:00:00:00:01\",\"egress\":{{\"allow\":[\"10.1.0.0/16\"],\"deny\":[]}},\"rate_limit\":{{\"bits_per_second\":100000000,\"burst_bytes\":65536}}}}"
                )),
                _ => ApiError::bad_request(format!("request body is not valid JSON: {e}")),
            }
        })?;
        let policy = PolicyRequest {
            guest_mac: req.guest_mac,
            egress: req.egress.clone(),
            rate_limit: req.rate_limit,
        };
        policy.validate().map_err(ApiError::bad_request)?;
        Ok((req.into_guest()?, policy))
    }

    fn into_guest(self) -> Result<GuestLink, ApiError> {
        match (self.guest_link.as_deref(), self.guest_netns) {
            (None | Some("tap"), None) => Ok(GuestLink::Tap),
            (None | Some("tap"), Some(_)) => Err(ApiError::bad_request(
                "guest_netns is only valid with \"guest_link\":\"veth\"",
            )),
            (Some("veth"), Some(guest_netns)) => Ok(GuestLink::Veth { guest_netns }),
            (Some("veth"), None) => Err(ApiError::bad_request(
                "\"guest_link\":\"veth\" needs \"guest_netns\": the name of an existing namespace",
            )),
            (Some(other), _) => Err(ApiError::bad_request(format!(
                "guest_link {other:?} is unknown: use \"tap\" (default) or \"veth\""
            ))),
        }
    }
}

/// `PUT /v1/slots/{n}`: 201 with the slot, 200 if it already exists identically
/// (guest link, and each security setting the body gives), 409 if it exists
/// with another guest link or other settings (the message names the sub-route
/// that changes them).
pub async fn create(State(c): State<AppState>, Path(n): Path<String>, body: Bytes) -> Response {
    let index = match parse_index(&n) {
        Ok(i) => i,
        Err(e) => return e.into_response(),
    };
    let (guest, policy) = match CreateSlotRequest::parse(&body) {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    apply(
        &c,
        Action::CreateSlot {
            index,
            guest,
            policy,
        },
    )
    .await
}

/// `GET /v1/slots/{n}`: the slot, 404 if unknown.
pub async fn get(State(c): State<AppState>, Path(n): Path<String>) -> Response {
    match parse_index(&n) {
        Ok(index) => apply(&c, Action::GetSlot { index }).await,
        Err(e) => e.into_response(),
    }
}

/// `DELETE /v1/slots/{n}`: 204, 404 if unknown.
pub async fn delete(State(c): State<AppState>, Path(n): Path<String>) -> Response {
    match parse_index(&n) {
        Ok(index) => apply(&c, Action::DeleteSlot { index }).await,
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/slots`: every slot, sorted by index.
pub async fn list(State(c): State<AppState>) -> Response {
    apply(&c, Action::ListSlots).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(body: &[u8]) -> GuestLink {
        CreateSlotRequest::parse(body).unwrap().0
    }

    #[test]
    fn bodies() {
        assert_eq!(guest(b""), GuestLink::Tap);
        assert_eq!(guest(b" \n"), GuestLink::Tap);
        assert_eq!(guest(b"{}"), GuestLink::Tap);
        assert_eq!(
            CreateSlotRequest::parse(b"{}").unwrap().1,
            PolicyRequest::default()
        );
        assert_eq!(
            guest(br#"{"guest_link":"veth","guest_netns":"g"}"#),
            GuestLink::Veth {
                guest_netns: "g".into()
            }
        );
        let (_, policy) = CreateSlotRequest::parse(
            br#"{"guest_mac":"02:00:00:00:00:09","egress":{"allow":["10.1.0.0/16"]},"rate_limit":{"bits_per_second":8000000,"burst_bytes":65536}}"#,
        )
        .unwrap();
        assert_eq!(policy.guest_mac.unwrap().0, [2, 0, 0, 0, 0, 9]);
        let egress = policy.egress.unwrap();
        assert_eq!(egress.allow[0].to_string(), "10.1.0.0/16");
        assert!(egress.deny.is_empty());
        assert_eq!(policy.rate_limit.unwrap().bits_per_second, 8_000_000);
        let cases: [(&[u8], &str); 16] = [
            (b"{", "not valid JSON"),
            (b"nope", "not valid JSON"),
            (br#"{"colour":"red"}"#, "unknown field `colour`"),
            (b"[]", "invalid slot request"),
            (br#"{"guest_link":"vhost"}"#, "unknown"),
            (br#"{"guest_link":"veth"}"#, "needs \"guest_netns\""),
            (br#"{"guest_netns":"x"}"#, "only valid with"),
            (br#"{"guest_mac":"ff:ff:ff:ff:ff:ff"}"#, "must be unicast"),
            (br#"{"guest_mac":"02:00:00:00:00"}"#, "not a MAC address"),
            (br#"{"egress":{"allow":["10.0.0.0/33"]}}"#, "prefix length"),
            (br#"{"egress":{"allow":["10.1.2.3/8"]}}"#, "host bits set"),
            (br#"{"egress":{"allow":["10.0.0.0"]}}"#, "not a CIDR"),
            (br#"{"egress":{"permit":[]}}"#, "unknown field `permit`"),
            (
                br#"{"egress":{"allow":["1.0.0.0/8"],"deny":["1.0.0.0/8"]}}"#,
                "both allow and deny",
            ),
            (
                br#"{"rate_limit":{"bits_per_second":0,"burst_bytes":65536}}"#,
                "bits_per_second 0 is out of range",
            ),
            (
                br#"{"rate_limit":{"bits_per_second":1000000}}"#,
                "missing field `burst_bytes`",
            ),
        ];
        for (body, needle) in cases {
            let err = CreateSlotRequest::parse(body).unwrap_err();
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
