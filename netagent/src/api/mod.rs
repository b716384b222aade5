//! The local HTTP/1.1 + JSON API (DESIGN §4). Handlers only parse a request into a
//! documented [`Action`](crate::controller::Action); the [`Controller`] applies it.
//! One file per resource: `slots`, `policy` (a slot's egress lists and rate
//! limit), `stats`, `metrics`, `health`, `verify`; `server` runs the
//! router on the Unix socket; `client` is the other end, used by the CLI and tests.
//!
//! Every error is a 4xx/5xx with `{"error": "..."}` — including the ones axum and
//! hyper produce themselves (405, 413, bad paths), which [`normalize_errors`]
//! rewrites — so a client never has to parse anything else.

pub mod client;
pub mod health;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod slots;
pub mod stats;
pub mod verify;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, put};
use serde::Serialize;

use crate::config::ApiConfig;
use crate::controller::{Action, Controller, ControllerError, Outcome};

/// Shared state of every handler.
pub type AppState = Arc<Controller>;

/// Default largest request body (`api.body_limit`; the bodies are small slot,
/// egress and rate-limit requests).
pub const BODY_LIMIT: usize = 16 * 1024;

/// One route: method and path template, as `docs/openapi.yaml` lists them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    /// Upper-case HTTP method.
    pub method: &'static str,
    /// Path template with `{n}` for the slot index.
    pub path: &'static str,
}

/// Every route of the API with its handler. The router is built from this list,
/// and the OpenAPI test compares this list with `docs/openapi.yaml`.
pub fn routes() -> Vec<(Route, MethodRouter<AppState>)> {
    let r = |method, path| Route { method, path };
    vec![
        (r("GET", "/v1/slots"), get(slots::list)),
        (r("PUT", "/v1/slots/{n}"), put(slots::create)),
        (r("GET", "/v1/slots/{n}"), get(slots::get)),
        (r("DELETE", "/v1/slots/{n}"), delete(slots::delete)),
        (r("PUT", "/v1/slots/{n}/egress"), put(policy::put_egress)),
        (
            r("PUT", "/v1/slots/{n}/rate_limit"),
            put(policy::put_rate_limit),
        ),
        (
            r("DELETE", "/v1/slots/{n}/rate_limit"),
            delete(policy::delete_rate_limit),
        ),
        (r("GET", "/v1/slots/{n}/stats"), get(stats::get)),
        (r("GET", "/metrics"), get(metrics::get)),
        (r("GET", "/healthz"), get(health::get)),
        (r("GET", "/v1/verify"), get(verify::get)),
    ]
}

/// The API router over `controller` with the default limits.
pub fn router(controller: Arc<Controller>) -> Router {
    router_with(controller, &ApiConfig::default())
}

/// The API router over `controller`: bodies above `limits.body_limit` get 413,
/// requests not answered within `limits.request_timeout` get 503.
pub fn router_with(controller: Arc<Controller>, limits: &ApiConfig) -> Router {
    let mut by_path: Vec<(&'static str, MethodRouter<AppState>)> = Vec::new();
    for (route, handler) in routes() {
        match by_path.iter_mut().find(|(p, _)| *p == route.path) {
            Some((_, existing)) => *existing = std::mem::take(existing).merge(handler),
            None => by_path.push((route.path, handler)),
        }
    }
    let mut router = Router::new();
    for (path, handler) in by_path {
        router = router.route(path, handler);
    }
    let inner = router
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limits.body_limit))
        .with_state(controller);
    // Outside the inner router, so that its responses are complete (the `Allow`
    // header of a 405 is added at the route level, after per-route layers).
    Router::new()
        .fallback_service(inner)
        .layer(middleware::from_fn_with_state(
            limits.request_timeout(),
            time_limit,
        ))
        .layer(middleware::from_fn_with_state(
            limits.body_limit,
            normalize_errors,
        ))
}

/// Answers 503 when the request (reading its body included) is not done within
/// `limit`. Slot changes run on their own task (see `controller`), so one that
/// has started still completes.
async fn time_limit(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(%method, %path, ?limit, "request not answered in time");
            ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: format!(
                    "{method} {path} was not answered within {} s (api.request_timeout); a slot change that started still completes: check GET /v1/slots",
                    limit.as_secs()
                ),
            }
            .into_response()
        }
    }
}

/// An API error: a status and a message for `{"error": ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong and what to do.
    pub message: String,
}

impl ApiError {
    /// 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(
            self.status,
            &ErrorBody {
                error: &self.message,
            },
        )
    }
}

impl From<ControllerError> for ApiError {
    fn from(e: ControllerError) -> ApiError {
        let status = match e {
            ControllerError::Index(_)
            | ControllerError::AboveMaxSlots { .. }
            | ControllerError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ControllerError::NotFound(_) => StatusCode::NOT_FOUND,
            ControllerError::Conflict(_) => StatusCode::CONFLICT,
            ControllerError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ControllerError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            message: e.to_string(),
        }
    }
}

/// A JSON response with `status`.
pub fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "application/json")],
            format!("{{\"error\":\"cannot encode the response: {e}\"}}"),
        )
            .into_response(),
    }
}

/// Parses the `{n}` of a path into a slot index. Range checks are the
/// controller's; this only rejects what is not an integer at all.
pub fn parse_index(raw: &str) -> Result<i64, ApiError> {
    let digits = raw.strip_prefix('-').unwrap_or(raw);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::bad_request(format!(
            "slot index {raw:?} is not an integer: use an integer from 1 to 32767"
        )));
    }
    raw.parse::<i64>().map_err(|_| {
        ApiError::bad_request(format!(
            "slot index {raw} is out of range: use an integer from 1 to 32767"
        ))
    })
}

/// Applies `action` and turns the outcome into a response.
pub async fn apply(controller: &Controller, action: Action) -> Response {
    match controller.apply(action).await {
        Ok(outcome) => outcome_response(outcome),
        Err(e) => {
            if matches!(e, ControllerError::Failed(_)) {
                tracing::error!(error = %e, "request failed");
            }
            ApiError::from(e).into_response()
        }
    }
}

fn outcome_response(outcome: Outcome) -> Response {
    match outcome {
        Outcome::Slot { slot, created } => json_response(
            if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            &slot,
        ),
        Outcome::Deleted => StatusCode::NO_CONTENT.into_response(),
        Outcome::Slots(slots) => json_response(StatusCode::OK, &slots),
        Outcome::Stats(stats) => json_response(StatusCode::OK, &stats),
        Outcome::Metrics(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, crate::stats::PROMETHEUS_CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Outcome::Verify(report) => json_response(StatusCode::OK, &report),
        Outcome::Health { health, healthy } => json_response(
            if healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            &health,
        ),
    }
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!(
            "no such route: {method} {}; the API is /v1/slots, /v1/slots/{{n}}, /v1/slots/{{n}}/stats, /v1/slots/{{n}}/egress, /v1/slots/{{n}}/rate_limit, /v1/verify, /metrics and /healthz (see docs/openapi.yaml)",
            uri.path()
        ),
    }
}

/// Logs every request (debug level) and rewrites every error response that is
/// not already JSON (axum's 405, 413 and extractor rejections) into
/// `{"error": "..."}`, keeping status and headers such as `Allow`.
pub async fn normalize_errors(
    State(body_limit): State<usize>,
    req: Request,
    next: Next,
) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let started = std::time::Instant::now();
    let response = next.run(req).await;
    let status = response.status();
    tracing::debug!(%method, %path, status = status.as_u16(), elapsed = ?started.elapsed(), "request");
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let detail = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let detail = String::from_utf8_lossy(&detail).trim().to_string();
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = parts
                .headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .replace(',', ", ");
            format!("method {method} is not allowed on {path}; allowed: {allowed}")
        }
        StatusCode::PAYLOAD_TOO_LARGE => {
            format!("request body too large: at most {body_limit} bytes are accepted")
        }
        _ if !detail.is_empty() => format!("{detail} ({method} {path})"),
        _ => format!(
            "{} ({method} {path})",
            status.canonical_reason().unwrap_or("error")
        ),
    };
    let body = serde_json::to_vec(&ErrorBody { error: &message }).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;
    use crate::controller::fake::FakeBackend;

    fn app() -> Router {
        let backend = FakeBackend::new();
        let plan = backend.plan();
        router(Arc::new(Controller::new(backend, plan, 32768)))
    }

    async fn call(
        app: &Router,
        method: &str,
        path: &str,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let value = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&bytes).into())
            })
        };
        (status, value)
    }

    /// `(method, path)` pairs listed in docs/openapi.yaml: paths are the keys at
    /// two spaces under `paths:`, methods the keys at four spaces under a path.
    fn openapi_routes() -> BTreeSet<(String, String)> {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml"))
                .unwrap();
        let mut routes = BTreeSet::new();
        let mut in_paths = false;
        let mut path = None;
        for line in text.lines() {
            if !line.starts_with(' ') && !line.is_empty() {
                in_paths = line.trim_end() == "paths:";
                continue;
            }
            if !in_paths {
                continue;
            }
            if let Some(p) = line.strip_prefix("  /") {
                path = Some(format!("/{}", p.trim_end().trim_end_matches(':')));
            } else if let Some(m) = line.strip_prefix("    ")
                && !m.starts_with(' ')
                && let Some(m) = m.trim_end().strip_suffix(':')
                && ["get", "put", "post", "delete", "patch", "head", "options"].contains(&m)
            {
                routes.insert((m.to_uppercase(), path.clone().expect("method before path")));
            }
        }
        routes
    }

    #[test]
    fn openapi_lists_exactly_the_router_routes() {
        let ours: BTreeSet<(String, String)> = routes()
            .into_iter()
            .map(|(r, _)| (r.method.to_string(), r.path.to_string()))
            .collect();
        let documented = openapi_routes();
        let undocumented: Vec<_> = ours.difference(&documented).collect();
        let missing: Vec<_> = documented.difference(&ours).collect();
        assert!(
            undocumented.is_empty(),
            "routes missing from docs/openapi.yaml: {undocumented:?}"
        );
        assert!(
            missing.is_empty(),
            "docs/openapi.yaml lists routes the router lacks: {missing:?}"
        );
    }

    #[tokio::test]
    async fn the_router_serves_exactly_the_listed_routes() {
        let app = app();
        let listed: BTreeSet<(String, String)> = routes()
            .into_iter()
            .map(|(r, _)| (r.method.to_string(), r.path.to_string()))
            .collect();
        let paths: BTreeSet<String> = listed.iter().map(|(_, p)| p.clone()).collect();
        for path in paths {
            let concrete = path.replace("{n}", "1");
            for method in ["GET", "PUT", "POST", "DELETE", "PATCH"] {
                let (status, body) = call(&app, method, &concrete, "").await;
                let served = listed.contains(&(method.to_string(), path.clone()));
                let no_route = body["error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("no such route"));
                assert!(!no_route, "{method} {path}: {body}");
                if served {
                    assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
                } else {
                    assert_eq!(
                        status,
                        StatusCode::METHOD_NOT_ALLOWED,
                        "{method} {path}: {body}"
                    );
                    assert!(
                        body["error"].as_str().unwrap().contains("allowed"),
                        "{body}"
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn slot_lifecycle_statuses() {
        let app = app();
        let (status, body) = call(&app, "PUT", "/v1/slots/3", "").await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(body["host_ip"], "10.11.0.3");
        assert_eq!(body["guest_link"], "tap");
        let (status, again) = call(&app, "PUT", "/v1/slots/3", "{}").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(again, body);
        let veth = r#"{"guest_link":"veth","guest_netns":"g"}"#;
        let (status, body) = call(&app, "PUT", "/v1/slots/3", veth).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        let (status, body) = call(&app, "GET", "/v1/slots", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.as_array().unwrap().len(), 1);
        let (status, body) = call(&app, "GET", "/v1/slots/3/stats", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["from_guest"]["packets"], 3);
        let (status, body) = call(&app, "DELETE", "/v1/slots/3", "").await;
        assert_eq!(
            (status, body),
            (StatusCode::NO_CONTENT, serde_json::Value::Null)
        );
        for (method, path) in [
            ("GET", "/v1/slots/3"),
            ("DELETE", "/v1/slots/3"),
            ("GET", "/v1/slots/3/stats"),
        ] {
            let (status, body) = call(&app, method, path, "").await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
            assert!(
                body["error"]
                    .as_str()
                    .unwrap()
                    .starts_with("slot 3 does not exist"),
                "{body}"
            );
        }
    }

    #[tokio::test]
    async fn policy_at_create_and_through_the_sub_routes() {
        let app = app();
        let body = r#"{"guest_mac":"02:00:00:00:00:0a","egress":{"allow":["10.1.0.0/16"]},"rate_limit":{"bits_per_second":20000000,"burst_bytes":65536}}"#;
        let (status, slot) = call(&app, "PUT", "/v1/slots/4", body).await;
        assert_eq!(status, StatusCode::CREATED, "{slot}");
        assert_eq!(slot["guest_mac"], "02:00:00:00:00:0a");
        assert_eq!(
            slot["egress"],
            serde_json::json!({"allow": ["10.1.0.0/16"], "deny": []})
        );
        assert_eq!(slot["rate_limit"]["bits_per_second"], 20_000_000);
        // The same again, or naming less: 200, unchanged.
        for again in [body, "", r#"{"guest_mac":"02:00:00:00:00:0a"}"#] {
            let (status, got) = call(&app, "PUT", "/v1/slots/4", again).await;
            assert_eq!((status, &got), (StatusCode::OK, &slot), "{again}");
        }
        // Naming something else: 409 pointing at the sub-route.
        for (other, needle) in [
            (r#"{"egress":{}}"#, "PUT /v1/slots/4/egress"),
            (
                r#"{"rate_limit":{"bits_per_second":8000,"burst_bytes":2000}}"#,
                "PUT /v1/slots/4/rate_limit",
            ),
            (r#"{"guest_mac":"02:00:00:00:00:0b"}"#, "delete the slot"),
        ] {
            let (status, got) = call(&app, "PUT", "/v1/slots/4", other).await;
            assert_eq!(status, StatusCode::CONFLICT, "{other}: {got}");
            assert!(got["error"].as_str().unwrap().contains(needle), "{got}");
        }
        let (status, got) = call(
            &app,
            "PUT",
            "/v1/slots/4/egress",
            r#"{"deny":["198.18.7.0/24"]}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{got}");
        assert_eq!(
            got["egress"],
            serde_json::json!({"allow": [], "deny": ["198.18.7.0/24"]})
        );
        let (status, got) = call(&app, "DELETE", "/v1/slots/4/rate_limit", "").await;
        assert_eq!(status, StatusCode::OK, "{got}");
        assert_eq!(got["rate_limit"], serde_json::Value::Null);
        let (status, got) = call(
            &app,
            "PUT",
            "/v1/slots/4/rate_limit",
            r#"{"bits_per_second":1000000,"burst_bytes":4000}"#,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{got}");
        assert_eq!(got["rate_limit"]["burst_bytes"], 4000);
        let (_, shown) = call(&app, "GET", "/v1/slots/4", "").await;
        assert_eq!(shown, got);
        // Unknown slot, bad bodies.
        for (method, path, body, want) in [
            ("PUT", "/v1/slots/9/egress", "{}", StatusCode::NOT_FOUND),
            (
                "DELETE",
                "/v1/slots/9/rate_limit",
                "",
                StatusCode::NOT_FOUND,
            ),
            ("PUT", "/v1/slots/4/egress", "", StatusCode::BAD_REQUEST),
            (
                "PUT",
                "/v1/slots/4/egress",
                r#"{"allow":["10.0.0.1/8"]}"#,
                StatusCode::BAD_REQUEST,
            ),
            (
                "PUT",
                "/v1/slots/4/rate_limit",
                r#"{"bits_per_second":0,"burst_bytes":65536}"#,
                StatusCode::BAD_REQUEST,
            ),
            ("PUT", "/v1/slots/0/egress", "{}", StatusCode::BAD_REQUEST),
        ] {
            let (status, got) = call(&app, method, path, body).await;
            assert_eq!(status, want, "{method} {path} {body}: {got}");
        }
        // Nothing of the bad requests stuck.
        let (_, shown) = call(&app, "GET", "/v1/slots/4", "").await;
        assert_eq!(shown, got);
    }

    #[tokio::test]
    async fn every_bad_request_is_a_json_4xx() {
        let app = app();
        let big = format!("{{\"guest_netns\":\"{}\"}}", "x".repeat(BODY_LIMIT));
        let cases: Vec<(&str, &str, &str, StatusCode, &str)> = vec![
            (
                "PUT",
                "/v1/slots/0",
                "",
                StatusCode::BAD_REQUEST,
                "out of range",
            ),
            (
                "PUT",
                "/v1/slots/32768",
                "",
                StatusCode::BAD_REQUEST,
                "out of range",
            ),
            (
                "PUT",
                "/v1/slots/-1",
                "",
                StatusCode::BAD_REQUEST,
                "out of range",
            ),
            (
                "GET",
                "/v1/slots/abc",
                "",
                StatusCode::BAD_REQUEST,
                "not an integer",
            ),
            (
                "DELETE",
                "/v1/slots/1.5",
                "",
                StatusCode::BAD_REQUEST,
                "not an integer",
            ),
            (
                "GET",
                "/v1/slots/99999999999999999999999",
                "",
                StatusCode::BAD_REQUEST,
                "out of range",
            ),
            ("GET", "/v1/slots/%FF", "", StatusCode::BAD_REQUEST, ""),
            (
                "PUT",
                "/v1/slots/1",
                "{not json",
                StatusCode::BAD_REQUEST,
                "not valid JSON",
            ),
            (
                "PUT",
                "/v1/slots/1",
                r#"{"guest":"tap"}"#,
                StatusCode::BAD_REQUEST,
                "unknown field `guest`",
            ),
            (
                "PUT",
                "/v1/slots/1",
                &big,
                StatusCode::PAYLOAD_TOO_LARGE,
                "too large",
            ),
            (
                "POST",
                "/v1/slots",
                "",
                StatusCode::METHOD_NOT_ALLOWED,
                "allowed: GET",
            ),
            (
                "PATCH",
                "/v1/slots/1",
                "",
                StatusCode::METHOD_NOT_ALLOWED,
                "not allowed",
            ),
            (
                "DELETE",
                "/metrics",
                "",
                StatusCode::METHOD_NOT_ALLOWED,
                "not allowed",
            ),
            (
                "GET",
                "/v2/slots",
                "",
                StatusCode::NOT_FOUND,
                "no such route",
            ),
            (
                "GET",
                "/v1/slots/1/stats/x",
                "",
                StatusCode::NOT_FOUND,
                "no such route",
            ),
        ];
        for (method, path, body, want, needle) in cases {
            let (status, got) = call(&app, method, path, body).await;
            assert_eq!(status, want, "{method} {path}: {got}");
            let msg = got["error"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path}: no error field in {got}"));
            assert!(msg.contains(needle), "{method} {path}: {msg}");
        }
        // Nothing was created by any of them.
        let (_, list) = call(&app, "GET", "/v1/slots", "").await;
        assert_eq!(list, serde_json::json!([]));
    }

    #[tokio::test]
    async fn metrics_and_health() {
        let app = app();
        call(&app, "PUT", "/v1/slots/9", "").await;
        let req = Request::builder()
            .uri("/metrics")
            .body(Body::empty())
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(
            resp.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        let text = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8(text.to_vec()).unwrap();
        assert!(
            text.contains("netagent_slot_packets_total{slot=\"9\",direction=\"from_guest\"} 3"),
            "{text}"
        );
        assert!(text.contains("netagent_slots 1"));
        let (status, body) = call(&app, "GET", "/healthz", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "ok");
        assert_eq!(body["slots"], 1);
    }
}
