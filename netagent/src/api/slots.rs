//! `/v1/slots` and `/v1/slots/{n}`: create (PUT), read (GET), delete (DELETE), list.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{ApiError, AppState, apply, parse_index};
use crate::controller::Action;
use crate::slot::GuestLink;

/// The optional body of `PUT /v1/slots/{n}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSlotRequest {
    /// `"tap"` (the default) or `"veth"`.
    pub guest_link: Option<String>,
    /// With `"veth"`: the existing namespace that receives the guest end.
    pub guest_netns: Option<String>,
}

impl CreateSlotRequest {
    /// Parses a request body; an empty body means a TAP slot.
    pub fn parse(body: &[u8]) -> Result<GuestLink, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(GuestLink::Tap);
        }
        let req: CreateSlotRequest = serde_json::from_slice(body).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => ApiError::bad_request(format!(
                    "invalid slot request: {e}; the body is optional, e.g. {{\"guest_link\":\"veth\",\"guest_netns\":\"NAME\"}}"
                )),
                _ => ApiError::bad_request(format!("request body is not valid JSON: {e}")),
            }
        })?;
        req.into_guest()
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

/// `PUT /v1/slots/{n}`: 201 with the slot, 200 if it already exists identically,
/// 409 if it exists with another guest link.
pub async fn create(State(c): State<AppState>, Path(n): Path<String>, body: Bytes) -> Response {
    let index = match parse_index(&n) {
        Ok(i) => i,
        Err(e) => return e.into_response(),
    };
    let guest = match CreateSlotRequest::parse(&body) {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    apply(&c, Action::CreateSlot { index, guest }).await
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

    #[test]
    fn bodies() {
        assert_eq!(CreateSlotRequest::parse(b"").unwrap(), GuestLink::Tap);
        assert_eq!(CreateSlotRequest::parse(b" \n").unwrap(), GuestLink::Tap);
        assert_eq!(CreateSlotRequest::parse(b"{}").unwrap(), GuestLink::Tap);
        assert_eq!(
            CreateSlotRequest::parse(br#"{"guest_link":"veth","guest_netns":"g"}"#).unwrap(),
            GuestLink::Veth {
                guest_netns: "g".into()
            }
        );
        let cases: [(&[u8], &str); 7] = [
            (b"{", "not valid JSON"),
            (b"nope", "not valid JSON"),
            (br#"{"colour":"red"}"#, "unknown field `colour`"),
            (b"[]", "invalid slot request"),
            (br#"{"guest_link":"vhost"}"#, "unknown"),
            (br#"{"guest_link":"veth"}"#, "needs \"guest_netns\""),
            (br#"{"guest_netns":"x"}"#, "only valid with"),
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
