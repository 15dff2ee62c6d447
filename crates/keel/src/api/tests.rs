//! Router tests without a socket: no input may panic the server, and every
//! refusal is a JSON error with the right status.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use proptest::prelude::*;
use tower::ServiceExt;

use super::router;
use crate::service::Service;

async fn app() -> (axum::Router, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!("keel-api-test-{}.db", uuid::Uuid::now_v7()));
    let store = keel_store::sqlite::SqliteStore::open(&path)
        .await
        .expect("open store");
    (router(Service::new(store)), path)
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Vec<u8>,
) -> (StatusCode, serde_json::Value) {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json)
}

fn remove(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(std::path::PathBuf::from(p));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn arbitrary_requests_get_json_errors_never_panics(
        body in prop::collection::vec(any::<u8>(), 0..300),
        json_body in prop::option::of(prop::collection::hash_map("[a-z]{1,8}", any::<i32>().prop_map(|n| n.to_string()), 0..4)),
        segment in "[a-zA-Z0-9%._~-]{0,40}",
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let (app, path) = app().await;
            let body = match &json_body {
                Some(map) => serde_json::to_vec(map).expect("json"),
                None => body.clone(),
            };
            let targets = [
                ("POST", "/v1/runs".to_string()),
                ("POST", "/v1/agents".to_string()),
                ("POST", format!("/v1/runs/{segment}/cancel")),
                ("POST", format!("/v1/dlq/{segment}/retry")),
                ("GET", format!("/v1/runs/{segment}")),
                ("GET", format!("/v1/agents/{segment}")),
                ("GET", format!("/v1/runs?status={segment}&limit={segment}")),
                ("GET", format!("/v1/approvals?cursor={segment}&limit={segment}")),
                ("GET", format!("/v1/agents/{segment}/usage")),
                ("GET", format!("/v1/usage?since=x{segment}")),
                ("POST", format!("/v1/runs/{segment}/approvals/{segment}")),
                ("POST", "/v1/worker/tasks/lease".to_string()),
                ("POST", format!("/v1/worker/tasks/{segment}/heartbeat")),
                ("POST", format!("/v1/worker/tasks/{segment}/complete")),
                ("POST", format!("/v1/worker/tasks/{segment}/fail")),
            ];
            for (method, uri) in targets {
                let (status, json) = call(&app, method, &uri, body.clone()).await;
                // Nothing here is valid, so nothing may succeed or fail inside.
                assert!(status.is_client_error(), "{method} {uri} -> {status}: {json}");
                assert!(json["error"]["message"].is_string(), "{method} {uri}: not a JSON error: {json}");
            }
            remove(&path);
        });
    }
}

#[tokio::test]
async fn refusals_name_what_is_wrong() {
    let (app, path) = app().await;
    let (status, json) = call(&app, "POST", "/v1/runs", br#"{"agent": "a"}"#.to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("input"),
        "{json}"
    );
    let (status, json) = call(
        &app,
        "POST",
        "/v1/runs",
        br#"{"agent": "a", "input": "x", "colour": 1}"#.to_vec(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("colour"),
        "{json}"
    );
    for priority in ["10", "-1", "1.5", "10.0", "\"high\"", "[]"] {
        let body = format!(r#"{{"agent": "a", "input": "x", "priority": {priority}}}"#);
        let (status, json) = call(&app, "POST", "/v1/runs", body.into_bytes()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{priority}: {json}");
        let message = json["error"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains("`priority` must be an integer from 0 (lowest) to 9 (highest)"),
            "{priority}: {json}"
        );
    }
    // 8.0 is the integer 8 in JSON: it gets past the priority check (and
    // fails on the unknown agent instead).
    let body = br#"{"agent": "a", "input": "x", "priority": 8.0}"#.to_vec();
    let (status, json) = call(&app, "POST", "/v1/runs", body).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{json}");
    assert!(!json.to_string().contains("priority"), "{json}");
    let (status, json) = call(&app, "POST", "/v1/agents", b"name: [unclosed".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("YAML"),
        "{json}"
    );
    let (status, json) = call(
        &app,
        "POST",
        "/v1/agents",
        b"name: a\nversion: 1\n".to_vec(),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("model"),
        "{json}"
    );
    let (status, _) = call(&app, "GET", "/nope", Vec::new()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, json) = call(&app, "GET", "/healthz", Vec::new()).await;
    assert_eq!(
        (status, json["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    remove(&path);
}

#[tokio::test]
async fn usage_of_nothing_and_of_unknown_agents() {
    let (app, path) = app().await;
    let (status, json) = call(&app, "GET", "/v1/usage", Vec::new()).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(
        json,
        serde_json::json!({
            "runs": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "agents": []
        })
    );
    let (status, json) = call(&app, "GET", "/v1/agents/ghost/usage", Vec::new()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{json}");
    assert_eq!(
        json["error"]["message"].as_str(),
        Some("agent `ghost` not found")
    );
    for uri in ["/v1/usage?since=yesterday", "/v1/usage?until=1"] {
        let (status, json) = call(&app, "GET", uri, Vec::new()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {json}");
        let message = json["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains("since"), "{uri}: {json}");
    }
    remove(&path);
}

/// The routes `router` declares, read from its source: `(path, methods)`.
fn declared_routes() -> Vec<(String, Vec<String>)> {
    let source = include_str!("mod.rs");
    let start = source.find("pub fn router").expect("router");
    let end = start + source[start..].find("\n}\n").expect("router's end");
    let mut routes = Vec::new();
    let mut rest = &source[start..end];
    while let Some(at) = rest.find(".route(") {
        rest = &rest[at + ".route(".len()..];
        let open = rest.find('"').expect("a path");
        let close = open + 1 + rest[open + 1..].find('"').expect("path's end");
        let path = rest[open + 1..close].to_string();
        // The handlers: up to the next route (or the fallback).
        let until = rest[close..]
            .find(".route(")
            .or_else(|| rest[close..].find(".fallback("))
            .map_or(rest.len(), |n| close + n);
        let methods = ["get", "post", "put", "delete", "patch"]
            .iter()
            .filter(|m| {
                let text = &rest[close..until];
                text.contains(&format!(" {m}(")) || text.contains(&format!(".{m}("))
            })
            .map(|m| m.to_uppercase())
            .collect();
        routes.push((path, methods));
    }
    routes
}

/// The operations the OpenAPI document describes: `(path, methods)`.
fn documented_routes() -> Vec<(String, Vec<String>)> {
    let doc = keel_core::yaml::parse(super::openapi::SOURCE).expect("openapi.yaml parses");
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    paths
        .iter()
        .map(|(path, item)| {
            let mut methods: Vec<String> = item
                .as_object()
                .expect("path item")
                .keys()
                .filter(|k| ["get", "post", "put", "delete", "patch"].contains(&k.as_str()))
                .map(|k| k.to_uppercase())
                .collect();
            methods.sort();
            (path.clone(), methods)
        })
        .collect()
}

#[test]
fn the_openapi_document_describes_every_route_and_only_those() {
    let mut declared = declared_routes();
    for (_, methods) in &mut declared {
        methods.sort();
    }
    declared.sort();
    let mut documented = documented_routes();
    documented.sort();
    assert!(
        declared.len() > 15,
        "routes read from the source: {declared:?}"
    );
    assert_eq!(declared, documented);
}

#[tokio::test]
async fn every_documented_operation_is_served_and_other_methods_are_refused() {
    let (app, path) = app().await;
    let served = app.clone().oneshot(
        Request::builder()
            .uri("/openapi.json")
            .body(Body::empty())
            .expect("request"),
    );
    let response = served.await.expect("infallible");
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    let served: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
    let source = keel_core::yaml::parse(super::openapi::SOURCE).expect("parses");
    assert_eq!(served, source);

    for (template, methods) in documented_routes() {
        let uri = template
            .replace("{id}", &uuid::Uuid::now_v7().to_string())
            .replace("{name}", "probe")
            .replace("{approval_id}", "1.0.1");
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            let (status, body) = call(&app, method, &uri, Vec::new()).await;
            if methods.iter().any(|m| m == method) {
                assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
                let message = body["error"]["message"].as_str().unwrap_or_default();
                assert_ne!(message, "no such route", "{method} {uri}");
            } else {
                assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {uri}: {body}"
                );
            }
        }
    }
    remove(&path);
}

#[tokio::test]
async fn only_the_api_router_serves_the_console() {
    let (app, path) = app().await;
    let store = keel_store::sqlite::SqliteStore::open(&path)
        .await
        .expect("open store");
    let workers_only = super::health_router(Service::new(store));
    for uri in ["/console", "/console/console.js", "/console/console.css"] {
        let (status, _) = call(&app, "GET", uri, Vec::new()).await;
        assert_eq!(status, StatusCode::OK, "{uri}");
        let (status, body) = call(&workers_only, "GET", uri, Vec::new()).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}: {body}");
    }
    remove(&path);
}
