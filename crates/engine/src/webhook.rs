//! Webhook notifications: a JSON body POSTed to a URL, signed with
//! HMAC-SHA256 when the server has a secret.
//!
//! Delivery is durable because it is a task (`notify`): a failed POST is
//! retried with backoff by the queue, a crash hands the task to another
//! worker, and the last failure dead-letters it. So a receiver may get a
//! notification more than once: `Keel-Delivery` (the task id) is the same
//! for every attempt of one notification.
//!
//! Headers: `Content-Type: application/json`, `Keel-Event` (the body's
//! `type`), `Keel-Delivery`, and with a secret
//! `Keel-Signature: t=<epoch ms>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`:
//! the receiver recomputes it over the raw body and refuses old timestamps.
//! The secret is the run's tenant's: the server's (`--webhook-secret`) for
//! `default`, the tenant's own (`tenants.<name>.webhook_secret_env`) for
//! another, so no tenant holds a secret that verifies another's calls.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use keel_core::ids::DEFAULT_TENANT;
use keel_core::run::State;
use keel_core::spec::redact_url;
use keel_core::{Agent, Millis};

use crate::net::{Clients, Egress};
use serde_json::{Value, json};
use sha2::Sha256;

/// Longest a receiver may take to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Attempts of one notification before it is dead-lettered.
pub const MAX_ATTEMPTS: u32 = 8;

/// Delay before attempt `attempt + 1` of a failed notification: 1 s, doubling, at most 5 min.
pub fn backoff(attempt: u32) -> Duration {
    let secs = 1u64 << attempt.saturating_sub(1).min(9);
    Duration::from_secs(secs.min(300))
}

/// Sends signed webhook notifications.
#[derive(Clone)]
pub struct Webhooks {
    clients: Clients,
    /// Signing secrets by tenant (`default`: the server's).
    secrets: Arc<HashMap<String, Arc<[u8]>>>,
}

impl Webhooks {
    /// Notifications over `http`, signed with `secret` (the server's, for
    /// the `default` tenant) and each other tenant's own of `tenants`,
    /// when given.
    pub fn new(
        clients: Clients,
        secret: Option<&str>,
        tenants: &HashMap<String, String>,
    ) -> Webhooks {
        let server = secret.map(|s| (DEFAULT_TENANT.to_string(), s.to_string()));
        let secrets = tenants
            .iter()
            .filter(|(tenant, _)| tenant.as_str() != DEFAULT_TENANT)
            .map(|(tenant, s)| (tenant.clone(), s.clone()))
            .chain(server)
            .filter(|(_, s)| !s.is_empty())
            .map(|(tenant, s)| (tenant, Arc::from(s.as_bytes())))
            .collect();
        Webhooks {
            clients,
            secrets: Arc::new(secrets),
        }
    }

    /// POSTs `body` about a run of `tenant` to `url`, signed with the
    /// tenant's secret; an error says why it was not delivered (a non-2xx
    /// answer, a timeout, a refused connection), showing `url` without
    /// credentials or query values.
    pub async fn deliver(
        &self,
        tenant: &str,
        egress: Egress,
        url: &str,
        body: &Value,
        delivery: &str,
        now: Millis,
    ) -> Result<(), String> {
        let bytes = serde_json::to_vec(body).map_err(|e| format!("cannot encode: {e}"))?;
        let kind = body["type"].as_str().unwrap_or("notification").to_string();
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| format!("`{}` is not a URL: {e}", redact_url(url)))?;
        let client = self
            .clients
            .to(egress, &parsed)
            .map_err(|e| format!("POST {} refused: {e}", redact_url(url)))?;
        let mut request = client
            .post(parsed)
            .timeout(TIMEOUT)
            .header("content-type", "application/json")
            .header("keel-event", kind)
            .header("keel-delivery", delivery);
        if let Some(secret) = self.secrets.get(tenant) {
            request = request.header("keel-signature", signature(secret, now, &bytes));
        }
        let response = request
            .body(bytes)
            .send()
            .await
            .map_err(|e| format!("POST {} failed: {}", redact_url(url), e.without_url()))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("POST {} answered {status}", redact_url(url)))
        }
    }
}

/// The `Keel-Signature` header of `body` sent at `now`.
pub fn signature(secret: &[u8], now: Millis, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(now.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={now},v1={hex}")
}

/// Where and what to notify about a run's pending approvals of the
/// current step: `approvals.escalate_to` (else `notify`) once one of them
/// is escalated, `approvals.notify` otherwise; `None` when nothing is
/// pending or no URL is configured.
pub fn approvals(state: &State, agent: &Agent, now: Millis) -> Option<(String, Value)> {
    let pending: Vec<_> = state.pending_approvals().collect();
    if pending.is_empty() {
        return None;
    }
    let policy = &agent.spec.approvals;
    let escalated = pending.iter().any(|a| a.escalated);
    let url = if escalated {
        policy.escalate_to.clone().or_else(|| policy.notify.clone())
    } else {
        policy.notify.clone()
    }?;
    let run_id = state.run_id;
    let approvals: Vec<Value> = pending
        .iter()
        .map(|a| {
            json!({
                "id": a.id,
                "step": a.step,
                "call_index": a.call_index,
                "tool": a.tool,
                "arguments": a.arguments,
                "attempt": a.attempt,
                "reason": a.reason,
                "requested_at": a.requested_at,
                "deadline": a.deadline,
                "escalated": a.escalated,
                "decide": format!("/v1/runs/{run_id}/approvals/{}", a.id),
            })
        })
        .collect();
    let kind = if escalated {
        "approval.escalated"
    } else {
        "approval.requested"
    };
    let body = json!({
        "type": kind,
        "run_id": run_id.to_string(),
        "tenant": state.tenant,
        "agent": state.agent,
        "version": state.version,
        "status": state.status.as_str(),
        "step": state.steps,
        "approvals": approvals,
        "sent_at": now,
    });
    Some((url, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_time_and_body() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let header = signature(b"Jefe", 0, b"what do ya want for nothing?");
        // The signed text is "0." + body, so recompute the reference the same way.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"0.what do ya want for nothing?");
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(header, format!("t=0,v1={hex}"));
        // And the MAC itself is the standard one.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let digest = mac.finalize().into_bytes();
        assert_eq!(
            digest
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(8), Duration::from_secs(128));
        assert_eq!(backoff(30), Duration::from_secs(300));
    }
}
