//! Hearing what other processes commit: each store keeps one `LISTEN`
//! session and forwards the notifications to its subscribers.
//!
//! A notification's payload is `<origin> <run_id> <last_seq> <new_work>`:
//! the sending store's random id (16 hex digits), the run, its last seq
//! after the commit, and `1` if the commit created runnable tasks, else `0`.
//!
//! A listening session only reads, so it would never notice a network that
//! drops its packets without a word: after [`QUIET`] without a
//! notification, the listener pings the server, and a ping not answered
//! within the store's timeout counts as a lost connection.

use std::time::Duration;

use keel_core::RunId;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{Acquire, Connection};
use tokio::sync::{broadcast, mpsc};
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::{Losses, backend, silent};
use crate::{Committed, Result};

/// The channel commits are announced on.
pub const CHANNEL: &str = "keel_commits";

/// Sent to subscribers after the listener lost its connection and made a
/// new one: commits made meanwhile were not heard, so anyone waiting should
/// look again. Its run id is the nil UUID, which names no run.
pub const RECONNECTED: Committed = Committed {
    run_id: RunId(Uuid::nil()),
    last_seq: 0,
    new_work: true,
};

/// How the listening session shows in `pg_stat_activity`.
pub(super) const APPLICATION_NAME: &str = "keel-listen";

/// The first wait before reconnecting; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How long the listener hears nothing before it pings the server (or the
/// store's timeout, if shorter).
const QUIET: Duration = Duration::from_secs(5);

/// The payload announcing a commit.
pub(super) fn payload(origin: u64, commit: &Committed) -> String {
    format!(
        "{origin:016x} {} {} {}",
        commit.run_id,
        commit.last_seq,
        u8::from(commit.new_work)
    )
}

/// Reads a payload: who sent it and what it announces.
fn parse(payload: &str) -> Option<(u64, Committed)> {
    let mut fields = payload.split(' ');
    let origin = u64::from_str_radix(fields.next()?, 16).ok()?;
    let run_id = fields.next()?.parse().ok()?;
    let last_seq = fields.next()?.parse().ok()?;
    let new_work = match fields.next()? {
        "0" => false,
        "1" => true,
        _ => return None,
    };
    if fields.next().is_some() {
        return None;
    }
    let commit = Committed {
        run_id,
        last_seq,
        new_work,
    };
    Some((origin, commit))
}

/// A `LISTEN` session on its own connection (a pool of one that replaces
/// it if it drops), listening within `timeout`.
async fn listen(options: &PgConnectOptions, timeout: Duration) -> Result<PgListener> {
    let listen = async {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(timeout)
            .connect_with(options.clone().application_name(APPLICATION_NAME))
            .await?;
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(listener)
    };
    match tokio::time::timeout(timeout, listen).await {
        Ok(listener) => listener.map_err(backend),
        Err(_) => Err(silent(timeout)),
    }
}

/// The task forwarding other stores' notifications to this store's
/// subscribers.
pub(super) struct Listener {
    /// Where to reconnect to.
    options: PgConnectOptions,
    /// Longest the server may take to answer a ping or a connect.
    timeout: Duration,
    listener: PgListener,
    /// This store's id: its own notifications were delivered at commit.
    origin: u64,
    commits: broadcast::Sender<Committed>,
    /// Ends when the last store handle is dropped.
    closed: mpsc::Receiver<()>,
    /// Told when the session drops.
    losses: Losses,
}

impl Listener {
    /// Starts listening, so commits made elsewhere from now on are heard.
    pub(super) async fn connect(
        options: PgConnectOptions,
        timeout: Duration,
        origin: u64,
        commits: broadcast::Sender<Committed>,
        closed: mpsc::Receiver<()>,
        losses: Losses,
    ) -> Result<Listener> {
        let listener = listen(&options, timeout).await?;
        Ok(Listener {
            options,
            timeout,
            listener,
            origin,
            commits,
            closed,
            losses,
        })
    }

    /// Forwards notifications until the store is dropped, reconnecting
    /// with backoff when the connection fails or stops answering.
    pub(super) async fn run(mut self) {
        let quiet = QUIET.min(self.timeout);
        loop {
            tokio::select! {
                _ = self.closed.recv() => break,
                received = self.listener.try_recv() => match received {
                    Ok(Some(notification)) => self.forward(notification.payload()),
                    // The listener already reconnected and listens again.
                    Ok(None) => {
                        warn!(channel = CHANNEL, "listen connection dropped, reconnected");
                        self.losses.record();
                        self.wake();
                    }
                    Err(e) => {
                        warn!(error = %e, channel = CHANNEL, "listen connection failed");
                        self.losses.record();
                        if !self.reconnect().await {
                            break;
                        }
                    }
                },
                // Waiting for a notification is cancel-safe (sqlx reads
                // whole messages only).
                () = tokio::time::sleep(quiet) => {
                    if let Err(e) = self.ping().await {
                        warn!(
                            error = %e,
                            channel = CHANNEL,
                            "listen connection stopped answering"
                        );
                        self.losses.record();
                        if !self.reconnect().await {
                            break;
                        }
                    }
                }
            }
        }
        debug!("store listener stopped");
    }

    /// Makes a new listening connection, waiting longer after each failure;
    /// false if the store was dropped meanwhile.
    async fn reconnect(&mut self) -> bool {
        let mut backoff = MIN_BACKOFF;
        loop {
            tokio::select! {
                _ = self.closed.recv() => return false,
                () = tokio::time::sleep(backoff) => {}
            }
            match listen(&self.options, self.timeout).await {
                Ok(listener) => {
                    info!(channel = CHANNEL, "listening again");
                    self.listener = listener;
                    self.wake();
                    return true;
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "could not listen again");
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Asks the server for an answer within the timeout. Notifications
    /// arriving meanwhile are kept for the next receive.
    async fn ping(&mut self) -> Result<()> {
        let ping = async {
            let conn = (&mut self.listener).acquire().await?;
            conn.ping().await
        };
        match tokio::time::timeout(self.timeout, ping).await {
            Ok(answered) => answered.map_err(backend),
            Err(_) => Err(silent(self.timeout)),
        }
    }

    /// Hands another store's notification to the subscribers.
    fn forward(&self, payload: &str) {
        match parse(payload) {
            Some((origin, _)) if origin == self.origin => {}
            // No subscriber is fine.
            Some((_, commit)) => drop(self.commits.send(commit)),
            None => warn!(
                payload,
                channel = CHANNEL,
                "ignoring a malformed notification"
            ),
        }
    }

    /// Tells the subscribers they may have missed commits.
    fn wake(&self) {
        let _ = self.commits.send(RECONNECTED);
    }
}

#[cfg(test)]
mod tests {
    use super::{parse, payload};
    use crate::Committed;
    use keel_core::RunId;

    #[test]
    fn payloads_round_trip() {
        let commit = Committed {
            run_id: RunId::new(),
            last_seq: 42,
            new_work: true,
        };
        let text = payload(7, &commit);
        assert_eq!(text.len(), 16 + 1 + 36 + 1 + 2 + 1 + 1);
        assert_eq!(parse(&text), Some((7, commit)));
        let not_a_flag = format!("{:016x} {} 42 2", 7, commit.run_id);
        for bad in ["", "7", "zz 1 2 1", &format!("{text} x"), &not_a_flag] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
