//! Reading the outbox, as both backends do: their query returns one row per
//! event of each entry (the entry's run and events joined to it), in entry
//! then seq order, and [`entries`] groups the rows into [`OutboxEntry`]s.
//! Their status query returns one [`StatusRow`].

use keel_core::{Millis, Recorded, RunId, Seq};

use crate::{Error, ExportStatus, OutboxEntry, RelayHolder, Result, RunRef};

/// One event of an outbox entry, or an entry whose run or events are
/// missing (`None`s, from the query's outer joins).
#[derive(sqlx::FromRow)]
pub(crate) struct Row {
    id: i64,
    first_seq: Seq,
    last_seq: Seq,
    run_id: String,
    tenant: Option<String>,
    agent: Option<String>,
    version: Option<String>,
    seq: Option<Seq>,
    at: Option<Millis>,
    data: Option<String>,
}

/// Groups rows into entries, checking that each has every event it names.
pub(crate) fn entries(rows: Vec<Row>) -> Result<Vec<OutboxEntry>> {
    let mut entries: Vec<OutboxEntry> = Vec::new();
    // The seqs each entry names.
    let mut spans = Vec::new();
    for row in rows {
        if entries.last().is_none_or(|entry| entry.id != row.id) {
            entries.push(entry(&row)?);
            spans.push((row.first_seq, row.last_seq));
        }
        let (Some(seq), Some(at), Some(data)) = (row.seq, row.at, row.data) else {
            continue;
        };
        let event = serde_json::from_str(&data).map_err(|e| {
            Error::Corrupt(format!(
                "event {seq} of run {} is not valid: {e}",
                row.run_id
            ))
        })?;
        let last = entries.len() - 1;
        entries[last].events.push(Recorded { seq, at, event });
    }
    for (entry, (first, last)) in entries.iter().zip(spans) {
        let seqs = entry.events.iter().map(|e| e.seq);
        if !seqs.eq(first..=last) {
            return Err(Error::Corrupt(format!(
                "outbox entry {} names events {first}..={last} of run {}, which are not all stored",
                entry.id, entry.run.id
            )));
        }
    }
    Ok(entries)
}

/// A new entry, without its events yet.
fn entry(row: &Row) -> Result<OutboxEntry> {
    let id: RunId = row.run_id.parse().map_err(|_| {
        Error::Corrupt(format!(
            "run id `{}` of outbox entry {} is not a UUID",
            row.run_id, row.id
        ))
    })?;
    let (Some(tenant), Some(agent), Some(version)) = (&row.tenant, &row.agent, &row.version) else {
        return Err(Error::Corrupt(format!(
            "outbox entry {} names run {id}, which is not stored",
            row.id
        )));
    };
    Ok(OutboxEntry {
        id: row.id,
        run: RunRef {
            id,
            tenant: tenant.clone(),
            agent: agent.clone(),
            version: version.clone(),
        },
        events: Vec::new(),
    })
}

/// The export switch, the backlog and a relay lease, in one row; the lease
/// columns are `None` when the lease was never taken.
#[derive(sqlx::FromRow)]
pub(crate) struct StatusRow {
    enabled: bool,
    entries: i64,
    events: i64,
    oldest: Option<Millis>,
    owner: Option<String>,
    until: Option<Millis>,
}

impl StatusRow {
    /// The status as of `now` (which decides whether the lease is live).
    pub(crate) fn status(self, now: Millis) -> Result<ExportStatus> {
        let count = |n: i64, what: &str| {
            u64::try_from(n)
                .map_err(|_| Error::Corrupt(format!("outbox {what} count {n} is negative")))
        };
        let relay = match (self.owner, self.until) {
            (Some(owner), Some(until)) => Some(RelayHolder {
                owner,
                until,
                live: until > now,
            }),
            _ => None,
        };
        Ok(ExportStatus {
            enabled: self.enabled,
            backlog_entries: count(self.entries, "entry")?,
            backlog_events: count(self.events, "event")?,
            oldest: self.oldest,
            relay,
        })
    }
}
