//! One server's connection, kept alive: connect (spawn the process, or
//! open the HTTP transport), handshake, list the tools, publish them; re-list
//! on change and every `refresh`; when the connection or the process dies,
//! reconnect after a backoff; on shutdown close the connection and stop the
//! process (killed if it does not exit within a grace period).
//!
//! Changes: a server of protocol 2025-11-25 sends
//! `notifications/tools/list_changed` unasked ([`Handler`]); one of
//! 2026-07-28 sends it only on a `subscriptions/listen` request that asked
//! for it, which [`listen`] opens when the server announces
//! `tools.listChanged` (rmcp routes such notifications to the subscription,
//! never to the handler).
//!
//! Processes: a stdio server is spawned in a process group of its own, and
//! on Linux with `PR_SET_PDEATHSIG` so the kernel kills it when Keel dies,
//! even by SIGKILL, when nothing closes its stdin in order
//! ([`die_with_parent`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_core::config::{Ref, expand};
use keel_core::spec::{McpTool, clip, human_duration};
use reqwest::header::{HeaderName, HeaderValue};
use rmcp::model::{
    ClientCapabilities, ClientConfig, Implementation, ProtocolVersion, SubscriptionFilter,
};
use rmcp::service::{
    MaybeSendFuture, NotificationContext, RunningServiceCancellationToken, Subscription,
};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, ClientLifecycleMode, ClientServiceExt, Peer, RoleClient, ServiceError};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Catalog, Server, redact};

/// How long a stopping server may take to exit before it is killed.
const GRACE: Duration = Duration::from_secs(2);

/// First and longest wait before reconnecting.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A connection up this long counts as healthy: the backoff starts over.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// Longest stderr line logged (the rest is cut).
const MAX_LOG_LINE: usize = 2000;

/// Longest wait for a server to acknowledge `subscriptions/listen` (at
/// most half its `timeout`): without one, changes wait for the `refresh`.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps `server` connected until `cancel`.
pub(super) async fn supervise(
    server: Arc<Server>,
    http: reqwest::Client,
    cancel: CancellationToken,
) {
    let mut failures: u32 = 0;
    loop {
        let changed = Arc::new(Notify::new());
        let timeout = server.config.timeout;
        let attempt = tokio::select! {
            attempt = tokio::time::timeout(timeout, connect(&server, &http, changed.clone())) => attempt,
            _ = cancel.cancelled() => return,
        };
        let error = match attempt {
            Ok(Ok((link, tools))) => {
                let up = Instant::now();
                let Some(error) = serve(&server, link, tools, &changed, &cancel).await else {
                    return;
                };
                if up.elapsed() >= HEALTHY_AFTER {
                    failures = 0;
                }
                error
            }
            Ok(Err(error)) => error,
            Err(_) => format!("no connection within {}", human_duration::format(timeout)),
        };
        failures = failures.saturating_add(1);
        let delay = backoff(failures);
        warn!(server = %server.name, error = %error, attempt = failures, retry_in_ms = delay.as_millis() as u64, "mcp server unavailable, reconnecting");
        server.status.send_modify(|s| {
            s.peer = None;
            s.error = Some(error);
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// Exponential from [`BACKOFF_MIN`] to [`BACKOFF_MAX`], jittered over its upper half.
fn backoff(failures: u32) -> Duration {
    let exp = 2f64.powi(failures.saturating_sub(1).min(16) as i32);
    let base = (BACKOFF_MIN.as_secs_f64() * exp).min(BACKOFF_MAX.as_secs_f64());
    Duration::from_secs_f64(base * (0.5 + 0.5 * fastrand::f64()))
}

/// Publishes a live connection and keeps it until it is lost (the reason)
/// or `cancel` (`None`, after closing it).
async fn serve(
    server: &Server,
    mut link: Link,
    tools: Vec<McpTool>,
    changed: &Notify,
    cancel: &CancellationToken,
) -> Option<String> {
    info!(server = %server.name, tools = tools.len(), "mcp server connected");
    publish(server, tools, &link);
    let every = server.config.refresh;
    let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let lost = loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                server.status.send_modify(|s| s.peer = None);
                link.close().await;
                info!(server = %server.name, "mcp server stopped");
                return None;
            }
            _ = &mut link.done => break "the connection closed".to_string(),
            exit = exited(&mut link.child) => break format!("the process exited ({exit})"),
            _ = changed.notified() => relist(server, &link).await,
            heard = next_change(&mut link.listen) => {
                if let Err(end) = heard {
                    link.listen = None;
                    if link.peer.is_transport_closed() {
                        break "the connection closed".to_string();
                    }
                    // A change may have been missed: re-list now, listen
                    // again at the next refresh.
                    let end = redact(&end, &link.secrets);
                    warn!(server = %server.name, reason = %end, "mcp list_changed subscription ended");
                    link.relisten = true;
                }
                relist(server, &link).await;
            }
            _ = refresh.tick() => {
                if link.relisten {
                    (link.listen, link.relisten) = listen(server, &link.peer, &link.secrets).await;
                }
                relist(server, &link).await;
            }
        }
    };
    link.close().await;
    Some(lost)
}

/// Reads the tool list again; a failure keeps the last one.
async fn relist(server: &Server, link: &Link) {
    match tokio::time::timeout(server.config.timeout, list(&server.name, &link.peer)).await {
        Ok(Ok(tools)) => publish(server, tools, link),
        Ok(Err(error)) => {
            let error = redact(&error, &link.secrets);
            warn!(server = %server.name, error = %error, "mcp tool list failed, keeping the last one");
        }
        Err(_) => warn!(server = %server.name, "mcp tool list timed out, keeping the last one"),
    }
}

/// Publishes a connection and its tool list (a new generation if it changed).
fn publish(server: &Server, tools: Vec<McpTool>, link: &Link) {
    server.status.send_modify(|s| {
        let generation = match &s.catalog {
            Some(old) if old.tools == tools => old.generation,
            Some(old) => old.generation + 1,
            None => 1,
        };
        if s.catalog
            .as_ref()
            .is_none_or(|c| c.generation != generation)
        {
            s.catalog = Some(Arc::new(Catalog { tools, generation }));
        }
        s.peer = Some(link.peer.clone());
        s.error = None;
        s.secrets = link.secrets.clone();
    });
}

/// The server's tools, every page.
async fn list(server: &str, peer: &Peer<RoleClient>) -> Result<Vec<McpTool>, String> {
    let tools = peer
        .list_all_tools()
        .await
        .map_err(|e| format!("tools/list failed: {e}"))?;
    Ok(tools
        .into_iter()
        .map(|t| {
            McpTool::new(
                server,
                &t.name,
                t.description.map(|d| d.into_owned()).unwrap_or_default(),
                Value::Object((*t.input_schema).clone()),
            )
        })
        .collect())
}

/// A live connection.
struct Link {
    peer: Peer<RoleClient>,
    /// The `subscriptions/listen` request the server sends its
    /// list_changed notifications on (2026-07-28).
    listen: Option<Subscription>,
    /// Whether to open `listen` again at the next refresh (it ended or
    /// could not be opened, for a reason that may pass).
    relisten: bool,
    /// Stops the client's service loop (taken when used).
    stop: Option<RunningServiceCancellationToken>,
    /// The service loop; it ends when the connection does.
    done: JoinHandle<()>,
    /// The process of a stdio server.
    child: Option<Child>,
    secrets: Arc<Vec<String>>,
}

impl Link {
    /// Closes the connection, then waits for the process to exit (it sees
    /// its stdin close), killing it after [`GRACE`].
    async fn close(mut self) {
        if let Some(stop) = self.stop.take() {
            stop.cancel();
        }
        if !self.done.is_finished() {
            let _ = tokio::time::timeout(GRACE, &mut self.done).await;
            self.done.abort();
        }
        if let Some(mut child) = self.child.take()
            && tokio::time::timeout(GRACE, child.wait()).await.is_err()
        {
            let _ = child.kill().await;
        }
    }
}

/// Resolves when the process of a stdio server exits (never for HTTP).
async fn exited(child: &mut Option<Child>) -> String {
    match child {
        Some(child) => match child.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => e.to_string(),
        },
        None => std::future::pending().await,
    }
}

/// The next notification of a list_changed subscription (never without
/// one); `Err` says how it ended.
async fn next_change(listen: &mut Option<Subscription>) -> Result<(), String> {
    let Some(subscription) = listen else {
        return std::future::pending().await;
    };
    // The filter asked only for `notifications/tools/list_changed`, and rmcp
    // refuses any other notification on it.
    match subscription.next().await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(match subscription.end() {
            Some(end) => format!("{end:?}"),
            None => "ended".into(),
        }),
        Err(e) => Err(e.to_string()),
    }
}

/// Opens the subscription a 2026-07-28 server sends
/// `notifications/tools/list_changed` on, if it announces them
/// (`tools.listChanged`); and whether to try again at the next refresh
/// (it failed for a reason that may pass). A server of an older protocol
/// sends them unasked ([`Handler`]).
async fn listen(
    server: &Server,
    peer: &Peer<RoleClient>,
    secrets: &[String],
) -> (Option<Subscription>, bool) {
    let Some(info) = peer.peer_info() else {
        return (None, false);
    };
    let announces = info
        .capabilities
        .tools
        .as_ref()
        .is_some_and(|t| t.list_changed == Some(true));
    if info.protocol_version.has_initialize() || !announces {
        return (None, false);
    }
    let filter = SubscriptionFilter::builder().tools_list_changed().build();
    let within = LISTEN_TIMEOUT.min(server.config.timeout / 2);
    let error = match tokio::time::timeout(within, peer.listen(filter)).await {
        Ok(Ok(subscription)) if subscription.acknowledged().tools_list_changed == Some(true) => {
            debug!(server = %server.name, "mcp list_changed subscription open");
            return (Some(subscription), false);
        }
        Ok(Ok(_)) => {
            info!(server = %server.name, "mcp server did not accept a list_changed subscription, re-listing every refresh");
            return (None, false);
        }
        // It answered: it does not take subscriptions.
        Ok(Err(ServiceError::McpError(e))) => {
            let error = redact(&e.message, secrets);
            info!(server = %server.name, error = %error, "mcp server refused a list_changed subscription, re-listing every refresh");
            return (None, false);
        }
        Ok(Err(e)) => redact(&e.to_string(), secrets),
        Err(_) => format!("no answer within {}", human_duration::format(within)),
    };
    warn!(server = %server.name, error = %error, "mcp list_changed subscription failed, trying again at the next refresh");
    (None, true)
}

/// Hears the server's notifications.
struct Handler {
    changed: Arc<Notify>,
}

impl ClientHandler for Handler {
    fn on_tool_list_changed(
        &self,
        _context: NotificationContext<RoleClient>,
    ) -> impl Future<Output = ()> + MaybeSendFuture + '_ {
        self.changed.notify_one();
        std::future::ready(())
    }

    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("keel", env!("CARGO_PKG_VERSION")),
        )
    }
}

/// The handshake: `server/discover` (2026-07-28), falling back to
/// `initialize` (2025-11-25) for a server that does not know it.
fn lifecycle() -> ClientLifecycleMode {
    ClientLifecycleMode::Auto {
        preferred_versions: vec![ProtocolVersion::V_2026_07_28],
        legacy_version: Some(ProtocolVersion::V_2025_11_25),
    }
}

/// Connects, shakes hands and lists the tools.
async fn connect(
    server: &Server,
    http: &reqwest::Client,
    changed: Arc<Notify>,
) -> Result<(Link, Vec<McpTool>), String> {
    let handler = Handler { changed };
    let (service, child, secrets) = if let Some(stdio) = &server.config.stdio {
        let stdio = stdio.clone();
        let name = server.name.clone();
        let mut prepared = tokio::task::spawn_blocking(move || prepare_stdio(&name, &stdio))
            .await
            .map_err(|e| format!("preparing the process failed: {e}"))??;
        let mut child = prepared
            .command
            .spawn()
            .map_err(|e| format!("cannot start `{}`: {e}", prepared.program.display()))?;
        let secrets = Arc::new(prepared.secrets);
        let (Some(stdout), Some(stdin)) = (child.stdout.take(), child.stdin.take()) else {
            return Err("the process has no stdin/stdout pipes".into());
        };
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(log_stderr(server.name.clone(), stderr, secrets.clone()));
        }
        let service = handler
            .serve_with_lifecycle((stdout, stdin), lifecycle())
            .await
            .map_err(|e| redact(&format!("handshake failed: {e}"), &secrets))?;
        (service, Some(child), secrets)
    } else if let Some(remote) = &server.config.http {
        let headers = remote.headers.clone();
        let (headers, secrets) = tokio::task::spawn_blocking(move || prepare_headers(&headers))
            .await
            .map_err(|e| format!("preparing the headers failed: {e}"))??;
        let secrets = Arc::new(secrets);
        let config = StreamableHttpClientTransportConfig::with_uri(remote.url.as_str())
            .custom_headers(headers);
        let transport = StreamableHttpClientTransport::with_client(http.clone(), config);
        let service = handler
            .serve_with_lifecycle(transport, lifecycle())
            .await
            .map_err(|e| redact(&format!("handshake failed: {e}"), &secrets))?;
        (service, None, secrets)
    } else {
        return Err("neither stdio nor http is configured".into());
    };
    let peer = service.peer().clone();
    let stop = service.cancellation_token();
    let done = tokio::spawn(async move {
        let _ = service.waiting().await;
    });
    // Subscribed before listing: no change after the list goes unheard.
    let (listen, relisten) = listen(server, &peer, &secrets).await;
    let link = Link {
        peer,
        listen,
        relisten,
        stop: Some(stop),
        done,
        child,
        secrets,
    };
    match list(&server.name, &link.peer).await {
        Ok(tools) => Ok((link, tools)),
        Err(error) => {
            let error = redact(&error, &link.secrets);
            link.close().await;
            Err(error)
        }
    }
}

/// A stdio server's command, ready to spawn.
struct Prepared {
    command: tokio::process::Command,
    program: PathBuf,
    secrets: Vec<String>,
}

/// Reads the references of the `env` (blocking: files), finds the program
/// on Keel's `PATH`, and builds the command: a clean environment with only
/// the configured variables, piped stdio, killed if dropped, in a process
/// group of its own (a terminal's Ctrl-C reaches Keel, which stops it),
/// and on Linux killed by the kernel if Keel dies ([`die_with_parent`]).
fn prepare_stdio(server: &str, stdio: &keel_core::config::StdioServer) -> Result<Prepared, String> {
    let mut env = BTreeMap::new();
    let mut secrets = Vec::new();
    for (var, template) in &stdio.env {
        let value = expand_secret(template, &mut secrets)
            .map_err(|e| format!("mcp_servers.{server}.stdio.env.{var}: {e}"))?;
        env.insert(var.clone(), value);
    }
    let program = find_program(&stdio.command).ok_or_else(|| {
        format!(
            "mcp_servers.{server}.stdio.command: `{}` is not an executable file nor found on PATH",
            stdio.command
        )
    })?;
    let mut command = tokio::process::Command::new(&program);
    command
        .args(&stdio.args)
        .env_clear()
        .envs(&env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(cwd) = &stdio.cwd {
        command.current_dir(cwd);
    }
    #[cfg(unix)]
    command.process_group(0);
    #[cfg(target_os = "linux")]
    die_with_parent(&mut command);
    Ok(Prepared {
        command,
        program,
        secrets,
    })
}

/// Makes the kernel SIGKILL the process when Keel dies, however it dies
/// (a SIGKILLed Keel closes no stdin in order, and a server that ignores
/// EOF would be orphaned).
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
/// not the process. The fork happens in `Command::spawn`, called from
/// [`connect`] on the supervisor's task: a worker thread of the tokio
/// runtime, which lives as long as the runtime (Keel's is multi-threaded;
/// nothing here uses `block_in_place`). It must not move to
/// `spawn_blocking`, whose threads exit when idle and would take the
/// server with them; [`prepare_stdio`] runs there but only builds the
/// command.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_parent(command: &mut tokio::process::Command) {
    let Ok(parent) = libc::pid_t::try_from(std::process::id()) else {
        return;
    };
    // SAFETY: the closure runs in the child between fork and exec, where
    // only async-signal-safe code may run: it makes two system calls
    // (prctl(2), getppid(2)), touches no lock and allocates nothing (an
    // `io::Error` from an OS error code is not boxed).
    unsafe {
        command.pre_exec(move || {
            let (signal, unused): (libc::c_ulong, libc::c_ulong) = (libc::SIGKILL as _, 0);
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal, unused, unused, unused) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // Keel died between the fork and the prctl: the signal will
            // never come (the child was re-parented), so do not start.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Expands `${VAR}` / `${file:...}` in `template`, keeping the values read as secrets.
fn expand_secret(template: &str, secrets: &mut Vec<String>) -> Result<String, String> {
    expand(template, |reference| {
        let value = match reference {
            Ref::Env(var) => std::env::var(var).ok()?,
            Ref::File(path) => std::fs::read_to_string(path).ok()?.trim().to_string(),
        };
        secrets.push(value.clone());
        Some(value)
    })
}

/// The HTTP headers of a remote server, values expanded and marked sensitive.
fn prepare_headers(
    headers: &BTreeMap<String, String>,
) -> Result<(HashMap<HeaderName, HeaderValue>, Vec<String>), String> {
    let mut out = HashMap::new();
    let mut secrets = Vec::new();
    for (name, template) in headers {
        let value =
            expand_secret(template, &mut secrets).map_err(|e| format!("header `{name}`: {e}"))?;
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("`{name}` is not a valid header name"))?;
        let mut value = HeaderValue::from_str(&value)
            .map_err(|_| format!("the value of header `{name}` is not a valid header value"))?;
        if template.contains("${") {
            value.set_sensitive(true);
        }
        out.insert(header, value);
    }
    Ok((out, secrets))
}

/// `command` itself when it names a file (has a `/`), else the first
/// executable of that name on Keel's `PATH`.
fn find_program(command: &str) -> Option<PathBuf> {
    if command.contains('/') {
        let path = PathBuf::from(command);
        return path.is_file().then_some(path);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(command))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        path.is_file()
    }
}

/// Logs what the process writes to stderr (its log), a line at a time,
/// with its secrets redacted.
async fn log_stderr(server: String, stderr: ChildStderr, secrets: Arc<Vec<String>>) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = redact(text.trim_end(), &secrets);
                info!(server = %server, line = %clip(&text, MAX_LOG_LINE), "mcp server stderr");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap() {
        for failures in 1..40 {
            let d = backoff(failures);
            assert!(
                d >= BACKOFF_MIN / 2 && d <= BACKOFF_MAX,
                "{failures}: {d:?}"
            );
        }
        assert!(backoff(30) >= BACKOFF_MAX / 2);
    }

    #[test]
    fn programs_are_found_on_the_path() {
        assert!(find_program("sh").is_some());
        assert!(find_program("surely-no-such-program-keel").is_none());
        assert!(find_program("/surely/not/here").is_none());
    }
}
