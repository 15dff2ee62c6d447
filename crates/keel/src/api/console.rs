//! `GET /console`: the web console, three static files (`console/`)
//! embedded in the binary and served with a strict Content-Security-Policy.
//! The page holds no data: its script calls the JSON API with the token the
//! user typed, so these routes are public like `/openapi.json`.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// Only the console's own files may load; no inline script or style, no
/// framing, no form posts.
const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
                   style-src 'self'; script-src 'self'; frame-ancestors 'none'; \
                   base-uri 'none'; form-action 'none'";

/// The page.
pub(super) const HTML: &str = include_str!("console/index.html");
/// Its script (an ES module).
pub(super) const SCRIPT: &str = include_str!("console/console.js");
/// Its style sheet.
pub(super) const STYLE: &str = include_str!("console/console.css");

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /console`.
pub(super) async fn page() -> Response {
    file("text/html; charset=utf-8", HTML)
}

/// `GET /console/console.js`.
pub(super) async fn script() -> Response {
    file("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /console/console.css`.
pub(super) async fn style() -> Response {
    file("text/css; charset=utf-8", STYLE)
}
