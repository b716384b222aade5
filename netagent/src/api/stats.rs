//! `/v1/slots/{n}/stats`: one slot's counters (see `crate::stats::SlotCounters`).

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};

use super::{AppState, apply, parse_index};
use crate::controller::Action;

/// `GET /v1/slots/{n}/stats`: the slot's counters, 404 if unknown.
pub async fn get(State(c): State<AppState>, Path(n): Path<String>) -> Response {
    match parse_index(&n) {
        Ok(index) => apply(&c, Action::SlotStats { index }).await,
        Err(e) => e.into_response(),
    }
}
