//! `keel events`: what the store holds for event export (the switch, the
//! outbox backlog, the relay lease), and switching export off.
//!
//! `keel serve --events` switches export on in the store, where it stays
//! (`docs/EVENTS.md`): every commit then adds to the outbox until a relay
//! publishes it. These commands work on the store directly, with no server
//! and no NATS, so an operator who stopped relaying can see the backlog and
//! stop it growing.

use std::path::PathBuf;

use anyhow::{Context, bail};
use keel_core::Millis;
use keel_core::spec::redact_url;
use keel_store::postgres::PgStore;
use keel_store::{ExportStatus, Store};
use serde_json::json;

use crate::embedded;

/// The store's name for the NATS relay's lease: one outbox, one active relay.
pub const RELAY_LEASE: &str = "nats-events";

/// The `keel events` subcommands.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Show whether export is on, the outbox backlog, and whether a relay
    /// holds the lease (and until when).
    Status {
        #[command(flatten)]
        store: StoreArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Switch export off and drop the outbox backlog: its events stay in the
    /// journal but are never exported. `keel serve --events` switches it on
    /// again.
    Off {
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Which store to use.
// No `Debug`: the database URL may hold a password.
#[derive(clap::Args)]
pub struct StoreArgs {
    /// PostgreSQL URL; without it, the embedded SQLite file --db.
    #[arg(long, env = "KEEL_DATABASE_URL")]
    database_url: Option<String>,
    /// SQLite database file (it must exist: these commands never create one).
    #[arg(long, env = "KEEL_DB", default_value = "./keel.db")]
    db: PathBuf,
}

/// Runs a `keel events` command.
pub async fn run(command: Command) -> anyhow::Result<()> {
    let (Command::Status { store: args, .. } | Command::Off { store: args }) = &command;
    if let Some(url) = &args.database_url {
        let store = PgStore::connect(url)
            .await
            .with_context(|| format!("cannot open the PostgreSQL store at {}", redact_url(url)))?;
        return run_on(store, &command, false).await;
    }
    if !args.db.is_file() {
        bail!(
            "no database file at {} (pass the file `keel serve` uses with --db or KEEL_DB, or a PostgreSQL URL with --database-url)",
            args.db.display()
        );
    }
    let embedded = embedded::open(&args.db).await?;
    let result = run_on(embedded.store.clone(), &command, true).await;
    drop(embedded);
    result
}

/// Runs the command on an open store. `sole_process`: this process holds
/// the store alone (the embedded file's lock), so no relay is running,
/// whatever the lease says (a relay that crashed left it until it expires).
async fn run_on<S: Store>(store: S, command: &Command, sole_process: bool) -> anyhow::Result<()> {
    let now = keel_engine::now();
    let mut status = store
        .export_status(RELAY_LEASE, now)
        .await
        .context("cannot read the event export status")?;
    if sole_process && let Some(relay) = &mut status.relay {
        relay.live = false;
    }
    match command {
        Command::Status { json: true, .. } => {
            outln!("{}", serde_json::to_string_pretty(&to_json(&status, now))?);
        }
        Command::Status { json: false, .. } => {
            outln!("{}", describe(&status, now).trim_end_matches('\n'));
            if growing(&status) {
                eprintln!(
                    "warning: export is on but no relay holds the lease: the outbox grows with every commit until a relay runs (`keel serve --events nats://...`) or export is switched off (`keel events off`)"
                );
            }
        }
        Command::Off { .. } => {
            let dropped = store
                .disable_export()
                .await
                .context("cannot switch event export off")?;
            if !status.enabled && dropped == 0 {
                outln!("event export was already off; the outbox is empty");
            } else {
                outln!(
                    "event export is off: dropped {} not yet published (their events stay in the journal but will not be exported)",
                    count(dropped, "outbox entry", "outbox entries")
                );
            }
            if let Some(relay) = status.relay.as_ref().filter(|r| r.live) {
                outln!(
                    "note: relay {} holds the lease: it has nothing to publish now, but switches export on again when it restarts unless its `keel serve` runs without --events",
                    relay.owner
                );
            }
        }
    }
    Ok(())
}

/// Export is on and no relay is draining the outbox.
fn growing(status: &ExportStatus) -> bool {
    status.enabled && !status.relay.as_ref().is_some_and(|r| r.live)
}

/// The status for people, one line per part.
fn describe(status: &ExportStatus, now: Millis) -> String {
    let switch = if status.enabled { "on" } else { "off" };
    let relay = match &status.relay {
        None => format!("none (the `{RELAY_LEASE}` lease was never taken)"),
        Some(r) if r.live => format!(
            "{} holds the `{RELAY_LEASE}` lease, expiring {} unless renewed",
            r.owner,
            relative(r.until, now)
        ),
        // Not live yet unexpired: the embedded file's relay, gone since.
        Some(r) if r.until > now => format!(
            "none running (last held by {}, which stopped without handing the lease back; it would expire {})",
            r.owner,
            relative(r.until, now)
        ),
        Some(r) => format!(
            "none running (last held by {}, lease expired {})",
            r.owner,
            relative(r.until, now)
        ),
    };
    let mut backlog = if status.backlog_entries == 0 {
        "empty".to_string()
    } else {
        format!(
            "{}, {}",
            count(status.backlog_entries, "entry", "entries"),
            count(status.backlog_events, "event", "events")
        )
    };
    if let Some(oldest) = status.oldest {
        backlog.push_str(&format!(", oldest committed {}", relative(oldest, now)));
    }
    format!("event export: {switch}\nrelay:        {relay}\nbacklog:      {backlog}\n")
}

/// The status for machines.
fn to_json(status: &ExportStatus, now: Millis) -> serde_json::Value {
    let relay = status.relay.as_ref().map(|r| {
        json!({
            "lease": RELAY_LEASE,
            "owner": r.owner,
            "until": r.until,
            "live": r.live,
        })
    });
    json!({
        "enabled": status.enabled,
        "backlog_entries": status.backlog_entries,
        "backlog_events": status.backlog_events,
        "oldest": status.oldest,
        "relay": relay,
        "growing": growing(status),
        "now": now,
    })
}

/// `n` and the noun for it.
fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A time seen from `now`: `in 12s`, `3m 5s ago`.
fn relative(at: Millis, now: Millis) -> String {
    if at > now {
        format!("in {}", span(at - now))
    } else {
        format!("{} ago", span(now - at))
    }
}

/// A length of time, to the unit people read it in: `850ms`, `42s`,
/// `3m 5s`, `5h 3m`, `2d 4h`.
fn span(ms: Millis) -> String {
    let s = ms / 1000;
    match s {
        ..=0 => format!("{}ms", ms.max(0)),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use keel_store::RelayHolder;

    use super::*;

    #[test]
    fn status_reads_as_sentences() {
        assert_eq!(span(850), "850ms");
        assert_eq!(span(42_000), "42s");
        assert_eq!(span(185_000), "3m 5s");
        assert_eq!(span(5 * 3_600_000 + 180_000), "5h 3m");
        assert_eq!(span(2 * 86_400_000 + 4 * 3_600_000), "2d 4h");

        let now = 1_700_000_000_000;
        let mut status = ExportStatus {
            enabled: true,
            backlog_entries: 1,
            backlog_events: 3,
            oldest: Some(now - 65_000),
            relay: None,
        };
        let text = describe(&status, now);
        assert!(text.contains("event export: on\n"), "{text}");
        assert!(text.contains("never taken"), "{text}");
        assert!(
            text.contains("1 entry, 3 events, oldest committed 1m 5s ago"),
            "{text}"
        );
        assert!(growing(&status));

        status.relay = Some(RelayHolder {
            owner: "relay-a".to_string(),
            until: now + 12_000,
            live: true,
        });
        let text = describe(&status, now);
        assert!(
            text.contains("relay-a holds the `nats-events` lease, expiring in 12s"),
            "{text}"
        );
        assert!(!growing(&status));
        assert_eq!(to_json(&status, now)["relay"]["owner"], "relay-a");
    }
}
