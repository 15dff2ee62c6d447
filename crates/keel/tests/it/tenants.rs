//! Tenants: each configured tenant's API tokens act as it, and a tenant
//! sees and touches only its own agents, runs, events, approvals, dead
//! letters, usage and external-worker queues; another tenant's run is not
//! found, whatever the route. `/metrics` and `/v1/providers` are the
//! operator's (`--api-token`, the `default` tenant).

use std::time::Duration;

use keel::mock::Mock;
use serde_json::{Value, json};

use crate::support::*;

const OPERATOR: &str = "operator-token-0123456789abcdef";
const ACME: &str = "acme-token-0123456789abcdef0123";
const GLOBEX: &str = "globex-token-0123456789abcdef01";

/// A spec of agent `helper` answering `answer`, with an external `images`
/// tool and an approval-gated HTTP tool on the mock model `model`.
fn helper(mock: &Mock, model: &str, answer: &str) -> String {
    format!(
        r#"
name: helper
version: 1
description: "{answer}'s helper"
model: {{provider: openai, model: "{model}", base_url: "{llm}", timeout: 10s}}
system: Answer {answer}.
tools:
  - name: resize
    description: Resizes an image (an external worker does it).
    parameters: {{type: object, properties: {{n: {{type: integer}}}}, required: [n]}}
    worker: images
retry: {{max_attempts: 1}}
"#,
        llm = mock.llm_url(),
    )
}

/// Status and JSON body of a request.
async fn call(request: reqwest::RequestBuilder) -> (u16, Value) {
    let r = request.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn tenants_see_and_touch_only_their_own_work() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let tokens_file = dir.0.join("globex-tokens");
    std::fs::write(&tokens_file, format!("{GLOBEX}\n")).expect("tokens file");
    let config = dir.config(&format!(
            "tenants:\n  acme: {{api_tokens_env: KEEL_TEST_ACME_TOKENS, private_network: true}}\n  globex: {{api_tokens_file: '{}', private_network: true}}\n",
            tokens_file.display()
        ),
    );
    let server = Server::start_with_env(
        &dir.db(),
        &["--config", config.as_str()],
        &[
            ("KEEL_API_TOKEN", OPERATOR),
            ("KEEL_TEST_ACME_TOKENS", ACME),
        ],
    )
    .await;
    let (acme, globex, operator) = (
        client_with_token(ACME),
        client_with_token(GLOBEX),
        client_with_token(OPERATOR),
    );

    // The same agent name, registered by each tenant: two agents.
    register(&acme, &server, &helper(&mock, "tools:1", "acme")).await;
    register(&globex, &server, &helper(&mock, "tools:1", "globex")).await;
    for (http, answer) in [(&acme, "acme"), (&globex, "globex")] {
        let agents = get_json(http, &server.url("/v1/agents")).await;
        let agents = agents["agents"].as_array().cloned().unwrap_or_default();
        assert_eq!(agents.len(), 1, "{agents:?}");
        assert_eq!(agents[0]["description"], format!("{answer}'s helper"));
    }
    assert_eq!(
        get_json(&operator, &server.url("/v1/agents")).await["agents"],
        json!([])
    );

    // The same Idempotency-Key in two tenants: two runs.
    let body = json!({"agent": "helper", "input": "go"});
    let key = [("Idempotency-Key", "same-key")];
    let acme_run = submit_with(&acme, server.url("/v1/runs"), &body, &key).await;
    let globex_run = submit_with(&globex, server.url("/v1/runs"), &body, &key).await;
    assert_ne!(acme_run, globex_run);
    let again = submit_with(&acme, server.url("/v1/runs"), &body, &key).await;
    assert_eq!(again, acme_run);

    // Each tenant's workers lease only its calls: globex's worker gets
    // globex's, never acme's.
    let lease = |http: &reqwest::Client| {
        http.post(server.url("/v1/worker/tasks/lease"))
            .json(&json!({"queue": "images", "wait": "10s"}))
    };
    let (status, globex_task) = call(lease(&globex)).await;
    assert_eq!(status, 200, "{globex_task}");
    assert_eq!(globex_task["run_id"], globex_run.as_str());
    let (status, nothing) = call(
        globex
            .post(server.url("/v1/worker/tasks/lease"))
            .json(&json!({"queue": "images", "wait": "300ms"})),
    )
    .await;
    assert_eq!(status, 204, "{nothing}");
    let (status, acme_task) = call(lease(&acme)).await;
    assert_eq!(status, 200, "{acme_task}");
    assert_eq!(acme_task["run_id"], acme_run.as_str());
    // A lease is its tenant's: another tenant cannot settle it.
    let task_url = |task: &Value, what: &str| {
        server.url(&format!(
            "/v1/worker/tasks/{}/{what}",
            task["task_id"].as_str().unwrap_or("")
        ))
    };
    let settle = |task: &Value| json!({"lease_token": task["lease_token"], "output": "done"});
    let token = &acme_task["lease_token"];
    for (what, body) in [
        ("heartbeat", json!({"lease_token": token})),
        ("complete", settle(&acme_task)),
        ("fail", json!({"lease_token": token, "error": "x"})),
    ] {
        let (status, body) = call(globex.post(task_url(&acme_task, what)).json(&body)).await;
        assert_eq!(status, 409, "{what}: {body}");
    }

    // Another tenant's run is not found, whatever the route.
    let run_url = |run: &str, rest: &str| server.url(&format!("/v1/runs/{run}{rest}"));
    let foreign = [
        globex.get(run_url(&acme_run, "")),
        globex.get(run_url(&acme_run, "/events")),
        globex
            .post(run_url(&acme_run, "/cancel"))
            .json(&json!({"reason": "not yours"})),
        globex
            .post(run_url(&acme_run, "/approvals/a1"))
            .json(&json!({"decision": "approve"})),
        globex.delete(run_url(&acme_run, "")),
        operator.get(run_url(&acme_run, "")),
    ];
    for request in foreign {
        let (status, body) = call(request).await;
        assert_eq!(status, 404, "{body}");
        assert!(!body.to_string().contains("acme"), "{body}");
    }
    let listed = get_json(&globex, &server.url("/v1/runs")).await;
    let ids: Vec<&str> = listed["runs"]
        .as_array()
        .map(|runs| runs.iter().filter_map(|r| r["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, [globex_run.as_str()]);

    // Both finish with their own agent, untouched by the other tenant.
    for (http, task) in [(&acme, &acme_task), (&globex, &globex_task)] {
        let (status, body) = call(http.post(task_url(task, "complete")).json(&settle(task))).await;
        assert_eq!(status, 200, "{body}");
    }
    for (http, run) in [(&acme, &acme_run), (&globex, &globex_run)] {
        let view = wait_terminal(http, &server, run, Duration::from_secs(20)).await;
        assert_eq!(view["status"], "COMPLETED", "{view}");
    }

    // A dead letter is its tenant's: listed and re-driven by it only.
    register(
        &acme,
        &server,
        &helper(&mock, "refuse:401", "acme-2").replace("version: 1", "version: 2"),
    )
    .await;
    let doomed = submit(&acme, &server, "helper", "fail").await;
    wait_for(&acme, &server, &doomed, "a dead letter", |r| {
        !r["dead_letter"].is_null()
    })
    .await;
    let letters = get_json(&acme, &server.url("/v1/dlq")).await["dead_letters"].clone();
    assert_eq!(letters[0]["run_id"], doomed.as_str(), "{letters}");
    assert_eq!(
        get_json(&globex, &server.url("/v1/dlq")).await["dead_letters"],
        json!([])
    );
    let letter = letters[0]["id"].as_str().unwrap_or_default();
    let (status, body) = call(globex.post(server.url(&format!("/v1/dlq/{letter}/retry")))).await;
    assert_eq!(status, 404, "{body}");

    // Usage counts a tenant's runs only.
    let usage = get_json(&globex, &server.url("/v1/usage")).await;
    assert_eq!(usage["runs"], 1, "{usage}");
    let usage = get_json(&acme, &server.url("/v1/usage")).await;
    assert_eq!(usage["runs"], 2, "{usage}");

    // The server's view is the operator's.
    for path in ["/metrics", "/v1/providers"] {
        let (status, body) = call(acme.get(server.url(path))).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(body["error"]["code"], "forbidden", "{body}");
        let r = operator.get(server.url(path)).send().await.expect("get");
        assert_eq!(r.status(), 200, "{path}");
    }
    // Where the operator tells the tenants' runs apart.
    let metrics = operator
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for tenant in ["acme", "globex"] {
        let submitted = format!(
            "keel_runs_submitted_total{{tenant=\"{tenant}\",agent=\"helper\",origin=\"request\"}}"
        );
        assert!(metrics.contains(&submitted), "{submitted}: {metrics}");
    }
    // And no tenant token is refused or leaked: a wrong one is 401.
    let (status, _) =
        call(client_with_token("not-a-token-0123456789abcdef").get(server.url("/v1/runs"))).await;
    assert_eq!(status, 401);
}

/// A tenant whose tokens cannot be read, or a token two tenants share,
/// stops the server at start, before it opens its store, with the source
/// named, never the token.
#[tokio::test]
async fn tenant_tokens_are_checked_at_start() {
    let dir = TempDir::new();
    let config = dir.config(
        "tenants:\n  acme: {api_tokens_env: KEEL_TEST_ACME_TOKENS}\n  globex: {api_tokens_env: KEEL_TEST_GLOBEX_TOKENS}\n",
    );
    let db = dir.db();
    let db = db.to_str().expect("utf-8");
    let serve = [
        "serve",
        "--db",
        db,
        "--config",
        &config,
        "--listen",
        "127.0.0.1:0",
    ];
    let (ok, _, err) = keel_with_env(&serve, &[("KEEL_TEST_ACME_TOKENS", ACME)]);
    assert!(!ok);
    assert!(
        err.contains("tenant `globex`") && err.contains("KEEL_TEST_GLOBEX_TOKENS"),
        "{err}"
    );
    let (ok, _, err) = keel_with_env(
        &serve,
        &[
            ("KEEL_TEST_ACME_TOKENS", ACME),
            ("KEEL_TEST_GLOBEX_TOKENS", ACME),
        ],
    );
    assert!(!ok);
    assert!(err.contains("each token acts as one tenant"), "{err}");
    assert!(!err.contains(ACME), "{err}");
    // Checked before the store is opened: no database file was made.
    assert!(!dir.db().exists());
}

/// A tenant's agents may not name the server's secrets, read its files or
/// use providers beyond its policy: registration answers 422 naming the
/// field, and a run of a version registered under a looser policy is
/// dead-lettered, not run, once the policy tightened.
#[tokio::test]
async fn a_tenants_policy_holds_at_registration_and_at_run_time() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let policy = |secrets: &str| {
        dir.config(&format!(
            "providers:\n  eu: {{kind: openai, base_url: '{llm}'}}\n\
             tenants:\n  acme: {{api_tokens_env: KEEL_TEST_ACME_TOKENS, secrets: [{secrets}], providers: [eu], private_network: true}}\n",
            llm = mock.llm_url()
        ))
    };
    let config = policy("KEEL_TEST_SEARCH_KEY");
    let db = dir.db();
    let args = ["--config", config.as_str()];
    let env = [
        ("KEEL_TEST_ACME_TOKENS", ACME),
        ("KEEL_TEST_SEARCH_KEY", "search-key-0123"),
        ("KEEL_WEBHOOK_SECRET", "webhook-secret-0123456"),
    ];
    let server = Server::start_with_env(&db, &args, &env).await;
    let acme = client_with_token(ACME);
    let spec = |model: &str, tool: &str| {
        format!(
            "name: searcher\nversion: 1\nmodel: {model}\ntools:\n  - {{name: search, description: d, parameters: {{type: object}}, {tool}}}\n"
        )
    };
    let echo = mock.tool_url("echo");
    let register_as = |yaml: String| {
        acme.post(server.url("/v1/agents"))
            .header("content-type", "application/yaml")
            .body(yaml)
    };
    for (yaml, field) in [
        (
            spec(
                "{provider: eu, model: 'tools:1', api_key_env: KEEL_WEBHOOK_SECRET}",
                &format!("http: {{url: '{echo}'}}"),
            ),
            "model.api_key_env",
        ),
        (
            spec(
                "{provider: eu, model: 'tools:1'}",
                &format!(
                    "http: {{url: '{echo}', headers: {{X-Token: '${{KEEL_TEST_ACME_TOKENS}}'}}}}"
                ),
            ),
            "tools[0].http.headers.X-Token",
        ),
        (
            spec(
                "{provider: openai, model: 'tools:1'}",
                &format!("http: {{url: '{echo}'}}"),
            ),
            "model.provider",
        ),
        (
            spec(
                "{provider: eu, model: 'tools:1'}",
                "builtin: read_file, root: /etc",
            ),
            "tools[0].builtin",
        ),
    ] {
        let (status, body) = call(register_as(yaml)).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["error"]["fields"][0]["field"], field, "{body}");
        assert!(!body.to_string().contains("webhook-secret"), "{body}");
    }
    // Within the policy: registered, and it runs with the secret it names.
    let allowed = spec(
        "{provider: eu, model: 'tools:1'}",
        &format!("http: {{url: '{echo}?key=${{KEEL_TEST_SEARCH_KEY}}'}}, idempotent: true"),
    );
    let (status, body) = call(register_as(allowed)).await;
    assert_eq!(status, 201, "{body}");
    let run = submit(&acme, &server, "searcher", "go").await;
    let view = wait_terminal(&acme, &server, &run, Duration::from_secs(20)).await;
    assert_eq!(view["status"], "COMPLETED", "{view}");

    // The operator withdraws the secret: the registered version no longer runs.
    drop(server);
    policy("");
    let server = Server::start_with_env(&db, &args, &env).await;
    let run = submit(&acme, &server, "searcher", "again").await;
    let view = wait_for(&acme, &server, &run, "a dead letter", |r| {
        !r["dead_letter"].is_null()
    })
    .await;
    let error = view["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("tenant's policy") && error.contains("KEEL_TEST_SEARCH_KEY"),
        "{view}"
    );
    assert_eq!(view["steps"], json!([]), "nothing ran: {view}");
}

/// A tenant's callbacks are signed with its own secret, never the
/// server's; a tenant without one gets them unsigned.
#[tokio::test]
async fn callbacks_are_signed_with_the_tenants_own_secret() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let config = dir.config(
        "tenants:\n  acme: {api_tokens_env: KEEL_TEST_ACME_TOKENS, webhook_secret_env: KEEL_TEST_ACME_HOOKS, private_network: true}\n  globex: {api_tokens_env: KEEL_TEST_GLOBEX_TOKENS, private_network: true}\n",
    );
    const SERVER_SECRET: &str = "server-webhook-secret-0123";
    const ACME_SECRET: &str = "acme-webhook-secret-0123";
    let server = Server::start_with_env(
        &dir.db(),
        &["--config", config.as_str()],
        &[
            ("KEEL_TEST_ACME_TOKENS", ACME),
            ("KEEL_TEST_GLOBEX_TOKENS", GLOBEX),
            ("KEEL_TEST_ACME_HOOKS", ACME_SECRET),
            ("KEEL_WEBHOOK_SECRET", SERVER_SECRET),
        ],
    )
    .await;
    let done = "name: done\nversion: 1\nmodel: {provider: scripted, model: s, script: [{content: finished}]}\n";
    for (token, name) in [(ACME, "acme"), (GLOBEX, "globex")] {
        let http = client_with_token(token);
        register(&http, &server, done).await;
        let body = json!({"agent": "done", "input": "go", "callback_url": mock.hook_url(name)});
        submit_with(&http, server.url("/v1/runs"), &body, &[]).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let hooks = loop {
        let hooks = mock.counters.hooks();
        if hooks.len() >= 2 {
            break hooks;
        }
        assert!(std::time::Instant::now() < deadline, "{hooks:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for hook in &hooks {
        assert_eq!(hook.event.as_deref(), Some("run.completed"), "{hook:?}");
        match hook.name.as_str() {
            "acme" => {
                let signature = hook.signature.clone().expect("signed");
                let t: i64 = signature
                    .strip_prefix("t=")
                    .and_then(|rest| rest.split(',').next())
                    .and_then(|t| t.parse().ok())
                    .expect("a timestamp");
                let with = |secret: &str| {
                    keel_engine::webhook::signature(secret.as_bytes(), t, hook.body.as_bytes())
                };
                assert_eq!(signature, with(ACME_SECRET));
                assert_ne!(signature, with(SERVER_SECRET));
            }
            "globex" => assert_eq!(hook.signature, None, "{hook:?}"),
            other => panic!("unexpected hook {other}"),
        }
    }
}

/// A tenant's calls reach public addresses only unless its policy says
/// `private_network: true`: an HTTP tool on loopback is an error the model
/// reads and the tool server never sees, and a callback to loopback is
/// not delivered; the operator's runs reach it as before.
#[tokio::test]
async fn a_tenants_calls_reach_public_addresses_only() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    // The model's endpoint is the operator's (configured): reached as such.
    let config = dir.config(&format!(
            "providers:\n  openai: {{kind: openai, base_url: '{}'}}\ntenants:\n  acme: {{api_tokens_env: KEEL_TEST_ACME_TOKENS}}\n",
            mock.llm_url()
        ),
    );
    let server = Server::start_with_env(
        &dir.db(),
        &["--config", config.as_str()],
        &[
            ("KEEL_TEST_ACME_TOKENS", ACME),
            ("KEEL_API_TOKEN", OPERATOR),
        ],
    )
    .await;
    let yaml = agent_yaml("prober", &mock, "tools:1", "echo", "");
    let (acme, operator) = (client_with_token(ACME), client_with_token(OPERATOR));
    let mut runs = Vec::new();
    for http in [&acme, &operator] {
        register(http, &server, &yaml).await;
        let body =
            json!({"agent": "prober", "input": "go", "callback_url": mock.hook_url("probe")});
        runs.push(submit_with(http, server.url("/v1/runs"), &body, &[]).await);
    }
    let tenant_run = wait_terminal(&acme, &server, &runs[0], Duration::from_secs(20)).await;
    let call = &tenant_run["steps"][0]["tool_calls"][0];
    assert_eq!(call["is_error"], true, "{tenant_run}");
    let result = call["result"].as_str().unwrap_or_default();
    assert!(result.contains("not a public address"), "{result}");
    let operator_run = wait_terminal(&operator, &server, &runs[1], Duration::from_secs(20)).await;
    assert_eq!(
        operator_run["steps"][0]["tool_calls"][0]["is_error"], false,
        "{operator_run}"
    );
    // Only the operator's call reached the tool server, and its callback.
    assert_eq!(
        mock.counters
            .tool_requests
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hooks = mock.counters.hooks();
    assert_eq!(hooks.len(), 1, "{hooks:?}");
    assert!(hooks[0].body.contains(&runs[1]), "{hooks:?}");

    // A model at an endpoint the tenant's spec chose follows the same rule.
    let own = yaml
        .replace(&mock.llm_url(), "http://10.0.0.1:9/v1")
        .replace("prober", "own-model");
    register(&acme, &server, &own).await;
    let run = submit(&acme, &server, "own-model", "go").await;
    let view = wait_for(&acme, &server, &run, "a dead letter", |r| {
        !r["dead_letter"].is_null()
    })
    .await;
    let error = view["error"].as_str().unwrap_or_default();
    assert!(error.contains("10.0.0.1 is not a public address"), "{view}");
}
