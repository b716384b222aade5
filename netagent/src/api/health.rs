//! `/healthz`: 200 while the datapath is loaded and the agent serves, else 503.

use axum::extract::State;
use axum::response::Response;

use super::{AppState, apply};
use crate::controller::Action;

/// `GET /healthz`.
pub async fn get(State(c): State<AppState>) -> Response {
    apply(&c, Action::Health).await
}
