//! API tokens: with `keel serve --api-token` (`KEEL_API_TOKEN`, one token or
//! several separated by commas, so a new one can be rolled out before the
//! old one is withdrawn), every route but the probes (`/healthz`,
//! `/readyz`) and `/openapi.json` needs `Authorization: Bearer <token>`.
//! Tokens are compared by their SHA-256 digests in constant time, and never
//! logged or echoed.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::Error;

/// Routes anyone may call: the orchestrator's probes and the API's description.
const PUBLIC: [&str; 3] = ["/healthz", "/readyz", "/openapi.json"];

/// The tokens a request may present, as digests.
#[derive(Clone)]
pub struct Tokens {
    digests: Arc<Vec<[u8; 32]>>,
}

impl Tokens {
    /// The tokens of a `--api-token` value (comma-separated; blanks around
    /// each are ignored); `None` when it names none.
    pub fn parse(value: &str) -> Result<Option<Tokens>, String> {
        let tokens: Vec<&str> = value
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        if tokens.is_empty() {
            return Ok(None);
        }
        if let Some(short) = tokens.iter().position(|t| t.len() < 16) {
            return Err(format!(
                "API token {} of {} is shorter than 16 characters: use a long random value (e.g. `openssl rand -hex 32`)",
                short + 1,
                tokens.len()
            ));
        }
        if tokens
            .iter()
            .any(|t| t.chars().any(|c| c.is_control() || c == ' '))
        {
            return Err("an API token holds a space or a control character".into());
        }
        Ok(Some(Tokens {
            digests: Arc::new(tokens.iter().map(|t| digest(t)).collect()),
        }))
    }

    /// Whether `presented` is one of the tokens.
    fn accepts(&self, presented: &str) -> bool {
        let presented = digest(presented);
        // Every digest is compared whole, whichever matches.
        self.digests
            .iter()
            .fold(false, |found, d| found | same(d, &presented))
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Constant-time equality of two digests.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `router` with every route but the public ones behind `tokens`.
pub fn require(router: Router, tokens: Tokens) -> Router {
    router.layer(middleware::from_fn_with_state(tokens, check))
}

async fn check(State(tokens): State<Tokens>, request: Request, next: Next) -> Response {
    if PUBLIC.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    match presented {
        Some(token) if tokens.accepts(token) => next.run(request).await,
        Some(_) => Error::Unauthorized("the API token is not valid".into()).into_response(),
        None => Error::Unauthorized(
            "this server needs an API token: send `Authorization: Bearer <token>` (the CLI sends KEEL_API_TOKEN)"
                .into(),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_listed_and_checked_whole() {
        assert!(Tokens::parse("").expect("empty").is_none());
        assert!(Tokens::parse(" , ").expect("blank").is_none());
        let tokens = Tokens::parse("0123456789abcdef-new, 0123456789abcdef-old")
            .expect("valid")
            .expect("two tokens");
        assert!(tokens.accepts("0123456789abcdef-new"));
        assert!(tokens.accepts("0123456789abcdef-old"));
        assert!(!tokens.accepts("0123456789abcdef-ne"));
        assert!(!tokens.accepts("0123456789abcdef-new "));
        assert!(!tokens.accepts(""));
        let short = Tokens::parse("0123456789abcdef, short")
            .err()
            .expect("refused");
        assert!(short.contains("token 2 of 2"), "{short}");
        assert!(!short.contains("short,"), "{short}");
        assert!(Tokens::parse("0123456789abcdef 0123").is_err());
    }
}
