//! `GET /openapi.json`: the API described as OpenAPI 3.1, written by hand in
//! `openapi.yaml` (kept true by the tests: every route the router has is
//! described, and every path described is routed) and served as JSON.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::Error;

/// The document's source.
pub(super) const SOURCE: &str = include_str!("openapi.yaml");

/// The document as JSON text, made once.
static DOCUMENT: LazyLock<Result<String, String>> = LazyLock::new(|| {
    let value = keel_core::yaml::parse(SOURCE)?;
    serde_json::to_string(&value).map_err(|e| e.to_string())
});

/// Serves the document.
pub(super) async fn document() -> Response {
    match &*DOCUMENT {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json.clone()).into_response(),
        Err(e) => {
            Error::Internal(format!("the OpenAPI document does not parse: {e}")).into_response()
        }
    }
}
