//! The CLI's client for a running `keel serve`: JSON calls and an SSE
//! follower that reconnects with `Last-Event-ID`.

use std::time::Duration;

use anyhow::{Context, bail};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use keel_core::event::Recorded;
use reqwest::Url;
use serde_json::Value;

/// A client of one server.
pub struct Client {
    /// The server's URL, as given (for messages).
    name: String,
    base: Url,
    http: reqwest::Client,
}

impl Client {
    /// A client for `base` (e.g. `http://127.0.0.1:8080`, or a path under
    /// which a proxy serves the API); refused unless it is an http(s) URL.
    pub fn new(base: &str) -> anyhow::Result<Client> {
        let url = Url::parse(base)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
        let Some(base_url) = url else {
            bail!("the server URL `{base}` is not an http(s) URL like http://127.0.0.1:8080");
        };
        // The server's KEEL_API_TOKEN may list several tokens (a rollout):
        // the first is the current one.
        let mut headers = reqwest::header::HeaderMap::new();
        if let Ok(tokens) = std::env::var("KEEL_API_TOKEN")
            && let Some(token) = tokens.split(',').map(str::trim).find(|t| !t.is_empty())
        {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| {
                    anyhow::anyhow!("KEEL_API_TOKEN holds a character no HTTP header may carry")
                })?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .context("cannot set up the HTTP client")?;
        Ok(Client {
            name: base.trim_end_matches('/').to_string(),
            base: base_url,
            http,
        })
    }

    /// The URL of the API path `segments` (each percent-encoded, so an id
    /// can never name another route) with the `query` pairs.
    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> anyhow::Result<Url> {
        if let Some(bad) = segments.iter().find(|s| matches!(**s, "" | "." | "..")) {
            bail!("`{bad}` is not an id");
        }
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
    }

    async fn check(&self, response: reqwest::Response) -> anyhow::Result<Value> {
        let status = response.status();
        let text = response.text().await.context("reading the response")?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let message = body["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| body.to_string());
            let mut detail = String::new();
            if let Some(fields) = body["error"]["fields"].as_array() {
                for f in fields {
                    detail.push_str(&format!(
                        "\n  {}: {}",
                        f["field"].as_str().unwrap_or("?"),
                        f["message"].as_str().unwrap_or("?")
                    ));
                }
            }
            bail!("server answered {status}: {message}{detail}");
        }
        Ok(body)
    }

    /// GET the JSON document at `path` (its segments) with `query`.
    pub async fn get(&self, path: &[&str], query: &[(&str, &str)]) -> anyhow::Result<Value> {
        let response = self
            .http
            .get(self.url(path, query)?)
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.name))?;
        self.check(response).await
    }

    /// POST a JSON body to `path` (its segments).
    pub async fn post(&self, path: &[&str], body: &Value) -> anyhow::Result<Value> {
        let response = self
            .http
            .post(self.url(path, &[])?)
            .json(body)
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.name))?;
        self.check(response).await
    }

    /// POST an agent spec (YAML or JSON text).
    pub async fn put_agent(&self, text: String) -> anyhow::Result<Value> {
        let response = self
            .http
            .post(self.url(&["v1", "agents"], &[])?)
            .header("content-type", "application/yaml")
            .body(text)
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.name))?;
        self.check(response).await
    }

    /// Follows a run's events until its terminal event, reconnecting with
    /// `Last-Event-ID` when the connection drops.
    pub async fn follow(
        &self,
        run_id: &str,
        mut on_event: impl FnMut(&Recorded),
    ) -> anyhow::Result<()> {
        let events = self.url(&["v1", "runs", run_id, "events"], &[])?;
        let mut last: i64 = 0;
        let mut failures = 0;
        // Only a server that answered once is waited for when it goes away.
        let mut connected = false;
        loop {
            let request = self
                .http
                .get(events.clone())
                .header("accept", "text/event-stream")
                .header("last-event-id", last.to_string());
            let response = match request.send().await {
                Ok(r) if r.status().is_success() => r,
                Ok(r) => return self.check(r).await.map(|_| ()),
                Err(e) if !connected => {
                    return Err(e).with_context(|| format!("cannot reach {}", self.name));
                }
                Err(e) => {
                    failures += 1;
                    if failures > 30 {
                        bail!("lost the server at {}: {e}", self.name);
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            connected = true;
            let mut stream = response.bytes_stream().eventsource();
            while let Some(item) = stream.next().await {
                let Ok(event) = item else { break };
                if event.event == "error" {
                    bail!("server: {}", event.data);
                }
                // Streamed answer text: the journal's `llm_completed` holds it whole.
                if matches!(event.event.as_str(), "llm_delta" | "llm_retry") {
                    continue;
                }
                let recorded: Recorded = serde_json::from_str(&event.data)
                    .with_context(|| format!("unreadable event from server: {}", event.data))?;
                last = recorded.seq;
                failures = 0;
                on_event(&recorded);
                if recorded.event.is_terminal() {
                    return Ok(());
                }
            }
            // The stream ended: either the run was already over, or the connection dropped.
            let run = match self.get(&["v1", "runs", run_id], &[]).await {
                Ok(run) => run,
                // The server went away (a restart): wait for it as for a failed connect.
                Err(e) if e.downcast_ref::<reqwest::Error>().is_some() && failures < 30 => {
                    failures += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let done = matches!(
                run["status"].as_str(),
                Some("COMPLETED" | "FAILED" | "CANCELLED")
            );
            if done && run["last_seq"].as_i64().unwrap_or(0) <= last {
                return Ok(());
            }
        }
    }
}
