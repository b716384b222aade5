//! `/v1/verify`: the differences between the kernel's state and the agent's
//! (always 200 with the report; `clean` says whether there are any).

use axum::extract::State;
use axum::response::Response;

use super::{AppState, apply};
use crate::controller::Action;

/// `GET /v1/verify`.
pub async fn get(State(c): State<AppState>) -> Response {
    apply(&c, Action::Verify).await
}
