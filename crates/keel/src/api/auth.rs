//! API tokens: with `keel serve --api-token` (`KEEL_API_TOKEN`, one token or
//! several separated by commas, so a new one can be rolled out before the
//! old one is withdrawn), or tenants' tokens in the server configuration
//! (`tenants.<name>.api_tokens_env` / `api_tokens_file`), every route but
//! the probes (`/healthz`, `/readyz`), `/openapi.json` and the console's
//! static files (`/console`; its calls to the API send the token) needs
//! `Authorization: Bearer <token>`. A token acts as one tenant (those of
//! `--api-token` as `default`, the operator's): the handlers read it with
//! the [`Tenant`] extractor. Tokens are compared by their SHA-256 digests
//! in constant time, and never logged or echoed.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use keel_core::ids::DEFAULT_TENANT;
use sha2::{Digest, Sha256};

use super::Error;

/// Routes anyone may call: the orchestrator's probes, the API's
/// description and the console's files (they hold no data).
const PUBLIC: [&str; 6] = [
    "/healthz",
    "/readyz",
    "/openapi.json",
    "/console",
    "/console/console.js",
    "/console/console.css",
];

/// The tokens a request may present, as digests, each with its tenant.
#[derive(Clone, Default)]
pub struct Tokens {
    entries: Arc<Vec<([u8; 32], Tenant)>>,
}

impl Tokens {
    /// Adds the tokens of `value` (separated by commas or line breaks;
    /// blanks around each are ignored) acting as `tenant`. Refuses a value
    /// naming none, a short token, and a token another tenant (or this
    /// one) already has; an error never repeats a token.
    pub fn add(&mut self, tenant: &str, value: &str) -> Result<(), String> {
        let tokens: Vec<&str> = value
            .split([',', '\n'])
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        if tokens.is_empty() {
            return Err("it names no token".into());
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
        let mut entries = self.entries.as_ref().clone();
        for token in tokens {
            let digest = digest(token);
            if let Some((_, other)) = entries.iter().find(|(d, _)| *d == digest) {
                return Err(format!(
                    "an API token of tenant `{tenant}` is also one of tenant `{}`: each token acts as one tenant",
                    other.name()
                ));
            }
            entries.push((digest, Tenant(Arc::from(tenant))));
        }
        self.entries = Arc::new(entries);
        Ok(())
    }

    /// Whether no token was given (the API is then open, as `default`).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tenant `presented` acts as, if it is one of the tokens.
    fn tenant_of(&self, presented: &str) -> Option<Tenant> {
        let presented = digest(presented);
        // Every digest is compared whole, whichever matches.
        self.entries.iter().fold(None, |found, (d, tenant)| {
            let hit = same(d, &presented);
            found.or(hit.then(|| tenant.clone()))
        })
    }
}

/// The tenant a request acts as: its token's, or `default` on a server
/// without tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant(Arc<str>);

impl Tenant {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Refuses a tenant other than `default` (the operator's) a route that
    /// shows every tenant's work or the server's set-up.
    pub fn operator(&self, what: &str) -> Result<(), Error> {
        if self.name() == DEFAULT_TENANT {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "{what} is the operator's: it needs a token of the `{DEFAULT_TENANT}` tenant (--api-token)"
            )))
        }
    }
}

impl Default for Tenant {
    fn default() -> Tenant {
        Tenant(Arc::from(DEFAULT_TENANT))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Tenant, Infallible> {
        Ok(parts
            .extensions
            .get::<Tenant>()
            .cloned()
            .unwrap_or_default())
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

async fn check(State(tokens): State<Tokens>, mut request: Request, next: Next) -> Response {
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
    match presented.map(|token| tokens.tenant_of(token)) {
        Some(Some(tenant)) => {
            request.extensions_mut().insert(tenant);
            next.run(request).await
        }
        Some(None) => Error::Unauthorized("the API token is not valid".into()).into_response(),
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
        let mut tokens = Tokens::default();
        assert_eq!(
            tokens.add("default", " , ").err().as_deref(),
            Some("it names no token")
        );
        tokens
            .add(
                "default",
                "0123456789abcdef-new, 0123456789abcdef-old\n0123456789abcdef-file\r\n",
            )
            .expect("valid");
        let default = Some(Tenant::default());
        assert_eq!(tokens.tenant_of("0123456789abcdef-new"), default);
        assert_eq!(tokens.tenant_of("0123456789abcdef-old"), default);
        assert_eq!(tokens.tenant_of("0123456789abcdef-file"), default);
        assert_eq!(tokens.tenant_of("0123456789abcdef-ne"), None);
        assert_eq!(tokens.tenant_of("0123456789abcdef-new "), None);
        assert_eq!(tokens.tenant_of(""), None);
        let short = Tokens::default()
            .add("default", "0123456789abcdef, short")
            .expect_err("refused");
        assert!(short.contains("token 2 of 2"), "{short}");
        assert!(!short.contains("short,"), "{short}");
        assert!(
            Tokens::default()
                .add("default", "0123456789abcdef 0123")
                .is_err()
        );
    }

    #[test]
    fn each_token_acts_as_its_tenant() {
        let mut tokens = Tokens::default();
        assert!(tokens.is_empty());
        tokens.add("default", "operator-token-0001").expect("valid");
        tokens
            .add("acme", "acme-token-000001, acme-token-000002")
            .expect("valid");
        let acme = tokens.tenant_of("acme-token-000002").expect("acme's");
        assert_eq!(acme.name(), "acme");
        assert!(acme.operator("/metrics").is_err());
        let operator = tokens.tenant_of("operator-token-0001").expect("default's");
        assert_eq!(operator.name(), "default");
        assert!(operator.operator("/metrics").is_ok());
        // One token, one tenant; the error does not repeat it.
        let twice = tokens
            .add("globex", "acme-token-000001")
            .expect_err("refused");
        assert!(
            twice.contains("`globex`") && twice.contains("`acme`"),
            "{twice}"
        );
        assert!(!twice.contains("acme-token"), "{twice}");
        assert_eq!(
            tokens.add("globex", " , ").err().as_deref(),
            Some("it names no token")
        );
        assert_eq!(
            tokens.tenant_of("acme-token-000001").map(|t| t.0),
            Some(Arc::from("acme"))
        );
    }
}
