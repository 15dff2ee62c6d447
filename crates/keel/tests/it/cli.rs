//! The CLI as a user runs it: the README's offline demo, and the remote
//! commands against a server.

use keel::mock::Mock;

use crate::support::*;

#[test]
fn the_offline_demo_runs_real_tools_and_shows_the_journal() {
    let dir = TempDir::new();
    let db = dir.db();
    let spec = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/agents/demo.yaml"
    );
    let db_arg = db.to_string_lossy().into_owned();
    let (ok, out, err) = keel(&[
        "run",
        spec,
        "--input",
        "Triage the open incident",
        "--db",
        &db_arg,
    ]);
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    // Every journaled step is shown, and the answer carries what the real tool read.
    assert!(out.contains("tool list_files started, key "), "{out}");
    assert!(out.contains("incident-2041.md runbook.md"), "{out}");
    assert!(out.contains("completed"), "{out}");
    assert!(out.contains("COMPLETED"), "{out}");
    assert!(
        out.contains("Runbook: database connection pool exhausted"),
        "{out}"
    );

    // Running again on the same database reuses the registered version.
    let (ok, out, _) = keel(&["run", spec, "--input", "again", "--db", &db_arg]);
    assert!(ok, "{out}");

    // Editing the spec without bumping its version is refused with a hint.
    let edited = dir.0.join("edited.yaml");
    let text = std::fs::read_to_string(spec)
        .expect("read demo")
        .replace("max_steps: 8", "max_steps: 9");
    std::fs::write(
        &edited,
        text.replace(
            "root: ../data/ops",
            &format!(
                "root: {}/../../examples/data/ops",
                env!("CARGO_MANIFEST_DIR")
            ),
        ),
    )
    .expect("write");
    let (ok, _, err) = keel(&[
        "run",
        &edited.to_string_lossy(),
        "--input",
        "x",
        "--db",
        &db_arg,
    ]);
    assert!(!ok);
    assert!(err.contains("bump `version`"), "{err}");

    // A broken spec names the field.
    let broken = dir.0.join("broken.yaml");
    std::fs::write(
        &broken,
        "name: x\nversion: 1\nmodel: {provider: openai, model: m, temperature: 9}\n",
    )
    .expect("write");
    let (ok, _, err) = keel(&[
        "run",
        &broken.to_string_lossy(),
        "--input",
        "x",
        "--db",
        &db_arg,
    ]);
    assert!(!ok);
    assert!(err.contains("model.temperature"), "{err}");
}

#[tokio::test]
async fn remote_commands_talk_to_a_server() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    let spec = dir.0.join("agent.yaml");
    std::fs::write(&spec, agent_yaml("remote", &mock, "tools:2", "echo", "")).expect("write");
    let url = server.url.clone();
    let spec_arg = spec.to_string_lossy().into_owned();
    let (ok, out, err) = tokio::task::spawn_blocking({
        let url = url.clone();
        move || {
            keel(&[
                "run",
                &spec_arg,
                "--input",
                "{\"ticket\": 7}",
                "--server",
                &url,
            ])
        }
    })
    .await
    .expect("join");
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("COMPLETED"), "{out}");
    let id = out.split_whitespace().nth(1).expect("run id").to_string();

    let (ok, out, _) = tokio::task::spawn_blocking({
        let url = url.clone();
        move || keel(&["runs", "--server", &url, "--status", "COMPLETED"])
    })
    .await
    .expect("join");
    assert!(ok);
    assert!(out.contains(&id), "{out}");

    let (ok, out, _) = tokio::task::spawn_blocking({
        let (url, id) = (url.clone(), id.clone());
        move || keel(&["status", &id, "--json", "--server", &url])
    })
    .await
    .expect("join");
    assert!(ok);
    let view: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(view["input"]["ticket"], 7);

    let (ok, out, _) = tokio::task::spawn_blocking({
        let (url, id) = (url.clone(), id.clone());
        move || keel(&["watch", &id, "--server", &url])
    })
    .await
    .expect("join");
    assert!(ok);
    assert!(out.contains("completed"), "{out}");

    let (ok, out, _) = tokio::task::spawn_blocking(move || keel(&["dlq", "--server", &url]))
        .await
        .expect("join");
    assert!(ok);
    assert!(out.contains("no dead letters"), "{out}");
}
