//! `/metrics`: Prometheus text exposition (see `crate::stats::render_prometheus`).

use axum::extract::State;
use axum::response::Response;

use super::{AppState, apply};
use crate::controller::Action;

/// `GET /metrics`.
pub async fn get(State(c): State<AppState>) -> Response {
    apply(&c, Action::Metrics).await
}
