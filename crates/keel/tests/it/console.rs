//! The web console: its three files are served (also without a token, with
//! a strict Content-Security-Policy) while the API behind them still needs
//! the token, and its script's `Client` drives a live server: the Node test
//! `tests/console/console.test.mjs` run against real runs (parked on
//! approvals, completed, dead-lettered).

use std::path::PathBuf;
use std::process::Command;

use keel::mock::Mock;

use crate::support::*;

const TOKEN: &str = "console-token-0123456789abcdef";

const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
                   style-src 'self'; script-src 'self'; frame-ancestors 'none'; \
                   base-uri 'none'; form-action 'none'";

#[tokio::test]
async fn the_console_is_served_without_a_token_and_the_api_still_needs_one() {
    let dir = TempDir::new();
    let server = Server::start_with_env(&dir.db(), &[], &[("KEEL_API_TOKEN", TOKEN)]).await;
    let http = reqwest::Client::new();
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/api/console");
    for (path, file, content_type) in [
        ("/console", "index.html", "text/html; charset=utf-8"),
        (
            "/console/console.js",
            "console.js",
            "text/javascript; charset=utf-8",
        ),
        (
            "/console/console.css",
            "console.css",
            "text/css; charset=utf-8",
        ),
    ] {
        let r = http.get(server.url(path)).send().await.expect("get");
        assert_eq!(r.status(), 200, "{path}");
        let header = |name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(header("content-type"), content_type, "{path}");
        assert_eq!(header("content-security-policy"), CSP, "{path}");
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(header("cache-control"), "no-cache", "{path}");
        let body = r.text().await.expect("body");
        let on_disk = std::fs::read_to_string(source.join(file)).expect("the file");
        assert_eq!(body, on_disk, "{path} is the file embedded");
    }
    let page = http.get(server.url("/console")).send().await.expect("get");
    let page = page.text().await.expect("page");
    // The policy allows no inline script: the page only loads its module.
    assert!(
        page.contains(r#"<script type="module" src="/console/console.js"></script>"#),
        "{page}"
    );
    assert_eq!(page.matches("<script").count(), 1, "{page}");

    // The API behind it still needs the token; with it, it answers.
    let r = http.get(server.url("/v1/runs")).send().await.expect("get");
    assert_eq!(r.status(), 401);
    let r = client_with_token(TOKEN)
        .get(server.url("/v1/runs"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    // Only those three paths are public.
    let r = http
        .get(server.url("/console/other.js"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 401);
}

/// `node` on the PATH (or the system's), if there is one.
fn node() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("node"))
        .chain([PathBuf::from("/usr/bin/node")])
        .find(|candidate| candidate.is_file())
}

#[tokio::test]
async fn the_console_script_drives_a_live_server() {
    let Some(node) = node() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "node is needed to test the console's script in CI"
        );
        eprintln!("note: no `node` found: the console's script is not tested");
        return;
    };
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start_with_env(&dir.db(), &[], &[("KEEL_API_TOKEN", TOKEN)]).await;
    let http = client_with_token(TOKEN);
    let gated = agent_yaml(
        "gate",
        &mock,
        "tools:1",
        "echo",
        "    requires_approval: true\napprovals: {}",
    );
    register(&http, &server, &gated).await;
    register(
        &http,
        &server,
        &agent_yaml("plain", &mock, "tools:1", "echo", ""),
    )
    .await;
    let doomed = agent_yaml(
        "doomed",
        &mock,
        "refuse:401",
        "echo",
        "retry: {max_attempts: 1}",
    );
    register(&http, &server, &doomed).await;
    for n in 0..4 {
        let id = submit(&http, &server, "gate", &format!("pay bill {n}")).await;
        wait_for(&http, &server, &id, "parking", |r| {
            r["status"] == "AWAITING_APPROVAL"
        })
        .await;
    }
    for n in 0..2 {
        let id = submit(&http, &server, "plain", &format!("job {n}")).await;
        wait_for(&http, &server, &id, "completion", |r| {
            r["status"] == "COMPLETED"
        })
        .await;
    }
    let id = submit(&http, &server, "doomed", "fail").await;
    wait_for(&http, &server, &id, "a dead letter", |r| {
        !r["dead_letter"].is_null()
    })
    .await;

    let test = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/console/console.test.mjs");
    let url = server.url.clone();
    // The mock LLM runs on this test's runtime: node is waited for off it.
    let out = tokio::task::spawn_blocking(move || {
        Command::new(node)
            .arg("--test")
            .arg("--test-timeout=60000")
            .arg(test)
            .env("KEEL_URL", url)
            .env("KEEL_TOKEN", TOKEN)
            .output()
    })
    .await
    .expect("join")
    .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the console's Node test failed:\n{stdout}\n{stderr}\nserver log: {}",
        std::fs::read_to_string(&server.log).unwrap_or_default()
    );
    // Every test ran: none was skipped for want of the server.
    assert!(
        stdout.contains("# skipped 0") && stdout.contains("# fail 0"),
        "{stdout}"
    );
}
