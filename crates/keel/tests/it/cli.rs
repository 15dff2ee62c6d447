//! The CLI as a user runs it: the README's offline demo, and the remote
//! commands against a server.

use keel::mock::Mock;

use crate::support::*;

#[test]
fn an_answer_off_the_output_schema_goes_back_to_the_model() {
    let dir = TempDir::new();
    let spec = dir.0.join("structured.yaml");
    std::fs::write(
        &spec,
        r#"
name: structured
version: 1
model:
  provider: scripted
  model: demo
  script:
    - content: "The incident is severe."
    - content: "```json\n{\"severity\": \"high\", \"incident\": 2041}\n```"
output_schema:
  type: object
  required: [severity, incident]
  properties: {severity: {enum: [low, high]}, incident: {type: integer}}
"#,
    )
    .expect("write spec");
    let db = dir.db().to_string_lossy().into_owned();
    let spec = spec.to_string_lossy().into_owned();
    let (ok, out, err) = keel(&["run", &spec, "--input", "Triage", "--db", &db]);
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("not JSON"),
        "the correction is journaled: {out}"
    );
    assert!(out.contains("COMPLETED"), "{out}");
    assert!(
        out.contains(r#"{"severity": "high", "incident": 2041}"#),
        "the answer is kept without its fence: {out}"
    );
}

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

/// Runs `keel` in a blocking thread (the caller hosts servers on its runtime).
async fn keel_async(args: &[&str]) -> (bool, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        keel(&args)
    })
    .await
    .expect("join")
}

/// Asserts that `keel` failed with an error naming `naming` on its first
/// line, without a panic; `one_line`: the whole error is that line (clap's
/// usage errors add a hint line).
fn refused((ok, out, err): (bool, String, String), naming: &str, one_line: bool) {
    assert!(!ok, "succeeded: {out}{err}");
    assert!(!err.contains("panicked"), "{err}");
    let first = err.lines().next().unwrap_or_default();
    assert!(first.starts_with("error: "), "{err}");
    assert!(first.contains(naming), "`{naming}` not in: {err}");
    if one_line {
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
}

#[tokio::test]
async fn unhappy_paths_end_with_one_line_naming_the_fault() {
    let dir = TempDir::new();
    let db = dir.db().to_string_lossy().into_owned();
    let missing_folder = dir.0.join("no/such/folder/keel.db");
    let bad_yaml = dir.0.join("bad.yaml");
    std::fs::write(&bad_yaml, "name: [unclosed\n").expect("write");
    let run = "01a20000-0000-7000-8000-000000000000";

    // Nothing listens on a port just freed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let nowhere = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    refused(
        keel_async(&["status", run, "--server", &nowhere]).await,
        "cannot reach",
        true,
    );
    refused(
        keel_async(&["watch", run, "--server", &nowhere]).await,
        "cannot reach",
        true,
    );
    refused(
        keel_async(&["runs", "--server", "localhost:8080"]).await,
        "not an http(s) URL",
        true,
    );
    refused(keel_async(&["status", "a/b"]).await, "not a run id", true);
    refused(keel_async(&["watch", ".."]).await, "not a run id", true);
    refused(
        keel_async(&["dlq", "retry", "nope"]).await,
        "not a dead letter id",
        true,
    );
    refused(
        keel_async(&["run", "missing.yaml", "--input", "x", "--db", &db]).await,
        "cannot read missing.yaml",
        true,
    );
    refused(
        keel_async(&["run", &bad_yaml.to_string_lossy(), "--input", "x"]).await,
        "not valid YAML",
        true,
    );
    refused(
        keel_async(&["serve", "--workers", "0"]).await,
        "--workers",
        false,
    );
    refused(
        keel_async(&["serve", "--lease", "-5s"]).await,
        "--lease",
        false,
    );
    refused(
        keel_async(&["serve", "--db", &missing_folder.to_string_lossy()]).await,
        "does not exist",
        true,
    );
    assert!(!dir.0.join("no").exists(), "a mistyped --db made folders");
    refused(
        keel_async(&["serve", "--database-url", "mysql://db/keel"]).await,
        "postgres://",
        true,
    );
    refused(
        keel_async(&["migrate", "--database-url", "mysql://db/keel"]).await,
        "postgres://",
        true,
    );
    let nats = if cfg!(feature = "nats") {
        "invalid NATS URL"
    } else {
        "`nats` feature"
    };
    refused(
        keel_async(&["serve", "--db", &db, "--events", "http://127.0.0.1:4222"]).await,
        nats,
        true,
    );

    // With a server: its port and its file are taken, unknown ids are named.
    let server = Server::start(&dir.db(), &[]).await;
    let listen = server.url.trim_start_matches("http://").to_string();
    let other = dir.0.join("other.db").to_string_lossy().into_owned();
    refused(
        keel_async(&["serve", "--listen", &listen, "--db", &other]).await,
        "cannot listen",
        true,
    );
    refused(
        keel_async(&["serve", "--listen", "127.0.0.1:0", "--db", &db]).await,
        "in use by another keel process",
        true,
    );
    refused(
        keel_async(&["status", run, "--server", &server.url]).await,
        "not found",
        true,
    );
    refused(
        keel_async(&["approve", run, "1.0.1", "--server", &server.url]).await,
        "not found",
        true,
    );
    refused(
        keel_async(&["dlq", "retry", run, "--server", &server.url]).await,
        "not found",
        true,
    );
}

#[tokio::test]
async fn keel_run_stops_when_its_run_parks_and_serve_takes_over() {
    let dir = TempDir::new();
    let data = dir.0.join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(data.join("notes.md"), "buy milk").expect("write");
    let gated = dir.0.join("gated.yaml");
    std::fs::write(
        &gated,
        format!(
            "name: gated\nversion: 1\nmodel:\n  provider: scripted\n  model: s\n  script:\n    - tool_calls: [{{name: list_files}}]\n    - content: 'found {{{{tool_result}}}}'\ntools:\n  - {{name: list_files, builtin: list_files, root: '{}', requires_approval: true}}\n",
            data.display()
        ),
    )
    .expect("write");
    let db = dir.db().to_string_lossy().into_owned();

    // An approval nobody in this process can give: it says how, and stops.
    let started = std::time::Instant::now();
    let (ok, out, err) =
        keel_async(&["run", &gated.to_string_lossy(), "--input", "x", "--db", &db]).await;
    assert!(!ok, "{out}{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    let id = out.split_whitespace().nth(1).expect("run id").to_string();
    assert!(out.contains("AWAITING_APPROVAL"), "{out}");
    assert!(out.contains(&format!("`keel approve {id} 1.0.1`")), "{out}");
    assert!(out.contains(&format!("`keel serve --db {db}`")), "{out}");

    // A dead letter likewise (the model's key is missing).
    let keyless = dir.0.join("keyless.yaml");
    std::fs::write(
        &keyless,
        "name: keyless\nversion: 1\nmodel: {provider: openai, model: m, base_url: 'http://127.0.0.1:9/v1', api_key_env: KEEL_TEST_NO_SUCH_KEY}\n",
    )
    .expect("write");
    let (ok, out, _) = keel_async(&[
        "run",
        &keyless.to_string_lossy(),
        "--input",
        "x",
        "--db",
        &db,
    ])
    .await;
    assert!(!ok, "{out}");
    assert!(out.contains("keel dlq retry"), "{out}");

    // The commands printed work once a server has the file.
    let server = Server::start(&dir.db(), &[]).await;
    let (ok, out, err) = keel_async(&[
        "approve",
        &id,
        "1.0.1",
        "--by",
        "alice",
        "--server",
        &server.url,
    ])
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("approved 1.0.1"), "{out}");
    let (ok, out, _) = keel_async(&["watch", &id, "--server", &server.url]).await;
    assert!(ok, "{out}");
    assert!(out.contains("found notes.md"), "{out}");
    // Deciding again names the fault in one line.
    refused(
        keel_async(&["approve", &id, "1.0.1", "--server", &server.url]).await,
        "409",
        true,
    );
}

#[tokio::test]
async fn an_interrupted_keel_run_says_so_and_a_second_interrupt_stops_it() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let spec = dir.0.join("slow.yaml");
    // A streamed answer of 200 words, one every 100 ms: 20 s in flight.
    std::fs::write(
        &spec,
        format!(
            "name: slow\nversion: 1\nmodel: {{provider: openai, model: 'long:200:100', base_url: '{}', stream: true}}\n",
            mock.llm_url()
        ),
    )
    .expect("write");
    let outcome = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(["run", &spec.to_string_lossy(), "--input", "x", "--db"])
            .arg(dir.db())
            .env("KEEL_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keel run");
        let interrupt = |pid: u32| {
            let sent = Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status()
                .expect("kill");
            assert!(sent.success());
        };
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut seen = Vec::new();
        for line in lines.by_ref() {
            let line = line.expect("line");
            let submitted = line.contains("submitted");
            seen.push(line);
            if submitted {
                break;
            }
        }
        // Let the LLM call start, then interrupt twice.
        std::thread::sleep(std::time::Duration::from_millis(500));
        interrupt(child.id());
        for line in lines.by_ref() {
            let line = line.expect("line");
            let said = line.starts_with("interrupted:");
            seen.push(line);
            if said {
                break;
            }
        }
        let second = std::time::Instant::now();
        interrupt(child.id());
        let status = child.wait().expect("wait");
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
            .expect("stderr");
        (status, second.elapsed(), seen, err)
    })
    .await
    .expect("join");
    let (status, stopped_in, seen, err) = outcome;
    assert!(!status.success(), "{seen:?}");
    assert!(
        stopped_in < std::time::Duration::from_secs(3),
        "{stopped_in:?}"
    );
    let said = seen.last().cloned().unwrap_or_default();
    assert!(said.contains("interrupt again to stop now"), "{seen:?}");
    assert!(said.contains("keel serve --db"), "{said}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let dir = TempDir::new();
    let db = dir.db().to_string_lossy().into_owned();
    let (ok, _, err) = keel(&["migrate", "--db", &db]);
    assert!(ok, "{err}");
    // A reader that is gone before anything is written, as `| head -0`.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["events", "status", "--db", &db])
        .env("KEEL_LOG", "warn")
        .stdout(writer)
        .output()
        .expect("run keel");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// The figure after `label` on the line that starts with it in `keel
/// bench`'s report: its first number.
fn bench_figure(out: &str, label: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` line in:\n{out}"));
    line[label.len()..]
        .split_whitespace()
        .find_map(|word| word.trim_end_matches(',').parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no figure on `{line}`"))
}

/// The benchmark as documented, with tiny figures: it completes every run
/// and prints throughput, CPU per step, latency percentiles and peak RSS.
#[tokio::test]
async fn keel_bench_runs_and_prints_its_figures() {
    let dir = TempDir::new();
    let db = dir.0.join("bench.db").to_string_lossy().into_owned();
    let started = std::time::Instant::now();
    let (ok, out, err) = keel_async(&["bench", "--runs", "20", "--steps", "2", "--db", &db]).await;
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "{out}"
    );
    assert!(out.contains("runs completed      20 / 20"), "{out}");
    assert_eq!(bench_figure(&out, "steps "), 40.0, "{out}");
    let throughput = out
        .lines()
        .find(|l| l.starts_with("throughput") && l.ends_with("steps/s"));
    assert!(throughput.is_some(), "no steps/s line:\n{out}");
    assert!(bench_figure(&out, "throughput") > 0.0, "{out}");
    let cpu = out
        .lines()
        .find(|l| l.starts_with("cpu "))
        .unwrap_or_default();
    assert!(cpu.contains("ms per step"), "{out}");
    assert!(bench_figure(&out, "cpu ") > 0.0, "{out}");
    let latency = out
        .lines()
        .find(|l| l.starts_with("step latency"))
        .unwrap_or_default();
    assert!(
        latency.contains("p50 ") && latency.contains("p99 "),
        "{out}"
    );
    let rss = out
        .lines()
        .find(|l| l.starts_with("peak rss"))
        .unwrap_or_default();
    assert!(rss.ends_with(" MB"), "{out}");
    assert!(bench_figure(&out, "peak rss") > 1.0, "{out}");

    refused(
        keel_async(&["bench", "--runs", "0", "--db", &db]).await,
        "--runs and --steps must be at least 1",
        true,
    );
}
