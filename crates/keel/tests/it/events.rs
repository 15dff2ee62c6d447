//! `keel events status` and `keel events off` as an operator runs them: on
//! an embedded file whose export was left on with no relay running, and on
//! PostgreSQL with a relay holding the lease.

use keel::events::RELAY_LEASE;
use keel_store::Store;
use keel_store::postgres::PgStore;
use keel_store::sqlite::SqliteStore;
use serde_json::Value;

use crate::support::*;

fn status_json(args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.extend(["--json"]);
    let (ok, out, err) = keel(&args);
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[test]
fn events_off_stops_an_unattended_outbox_from_growing() {
    let dir = TempDir::new();
    let db = dir.db();
    let db_arg = db.to_string_lossy().into_owned();

    // Export switched on by a relay that is gone (its lease looks live: a
    // crash leaves it until it expires), then runs commit with no relay.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let store = SqliteStore::open(&db).await.expect("open");
        store.enable_export().await.expect("enable export");
        let now = keel_engine::now();
        let held = store
            .relay_lease(RELAY_LEASE, "crashed-relay", now + 60_000, now)
            .await
            .expect("lease");
        assert!(held);
    });
    drop(runtime);
    let spec = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/agents/demo.yaml"
    );
    let (ok, out, err) = keel(&["run", spec, "--input", "Triage", "--db", &db_arg]);
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");

    // The backlog, and a warning: the embedded file is this process's
    // alone, so no relay runs whatever the lease row says.
    let (ok, out, err) = keel(&["events", "status", "--db", &db_arg]);
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("event export: on\n"), "{out}");
    assert!(
        out.contains("none running (last held by crashed-relay, which stopped"),
        "{out}"
    );
    assert!(out.contains(" events, oldest committed "), "{out}");
    assert!(
        err.contains("warning: export is on but no relay holds the lease")
            && err.contains("`keel events off`"),
        "{err}"
    );
    let status = status_json(&["events", "status", "--db", &db_arg]);
    let entries = status["backlog_entries"].as_u64().expect("entries");
    assert!(entries >= 2, "a run commits several times: {status}");
    let events = status["backlog_events"].as_u64().expect("events");
    assert!(events >= entries, "{status}");
    let (oldest, now) = (status["oldest"].as_i64(), status["now"].as_i64());
    assert!(oldest.is_some() && oldest <= now, "{status}");
    assert_eq!(status["relay"]["owner"], "crashed-relay");
    assert_eq!(status["relay"]["live"], false);
    assert_eq!(status["enabled"], true);
    assert_eq!(status["growing"], true);

    // Off: the backlog is dropped and nothing is added any more.
    let (ok, out, err) = keel(&["events", "off", "--db", &db_arg]);
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains(&format!(
            "event export is off: dropped {entries} outbox entries"
        )),
        "{out}"
    );
    let (ok, out, _) = keel(&["run", spec, "--input", "Again", "--db", &db_arg]);
    assert!(ok, "{out}");
    let (ok, out, err) = keel(&["events", "status", "--db", &db_arg]);
    assert!(ok, "{err}");
    assert!(out.contains("event export: off\n"), "{out}");
    assert!(out.contains("backlog:      empty\n"), "{out}");
    assert!(!err.contains("warning"), "{err}");
    let status = status_json(&["events", "status", "--db", &db_arg]);
    assert_eq!(status["growing"], false);
    let (ok, out, _) = keel(&["events", "off", "--db", &db_arg]);
    assert!(ok);
    assert!(out.contains("already off"), "{out}");

    // A mistyped path is an error naming it, not a new empty database.
    let missing = dir.0.join("missing.db");
    let missing_arg = missing.to_string_lossy().into_owned();
    for command in ["status", "off"] {
        let (ok, _, err) = keel(&["events", command, "--db", &missing_arg]);
        assert!(!ok);
        assert!(
            err.contains(&format!("no database file at {missing_arg}")),
            "{err}"
        );
    }
    assert!(!missing.exists());
}

#[tokio::test]
async fn events_status_shows_the_relay_holding_the_lease() {
    let Some(pg) = PgDb::create().await else {
        return;
    };
    let store = PgStore::connect(&pg.url).await.expect("connect");
    store.enable_export().await.expect("enable export");
    let now = keel_engine::now();
    let held = store
        .relay_lease(RELAY_LEASE, "relay-a", now + 60_000, now)
        .await
        .expect("lease");
    assert!(held);
    drop(store);

    let url = pg.url.clone();
    let (status, off) = tokio::task::spawn_blocking(move || {
        let status = keel(&["events", "status", "--database-url", &url]);
        let off = keel(&["events", "off", "--database-url", &url]);
        (status, off)
    })
    .await
    .expect("join");
    let (ok, out, err) = status;
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("event export: on\n"), "{out}");
    assert!(
        out.contains("relay-a holds the `nats-events` lease, expiring in "),
        "{out}"
    );
    assert!(out.contains("backlog:      empty\n"), "{out}");
    assert!(!err.contains("warning"), "a relay drains the outbox: {err}");
    let (ok, out, err) = off;
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("dropped 0 outbox entries"), "{out}");
    assert!(out.contains("note: relay relay-a holds the lease"), "{out}");
}
