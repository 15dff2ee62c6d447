//! The `keel` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use std::sync::Arc;

use keel_core::config::Config;
use keel_core::ids::DEFAULT_TENANT;
use keel_core::spec::{human_duration, redact_url};
use keel_core::{Agent, Event, Priority, RunId, TaskId};
use keel_engine::{Engine, Options};
use keel_store::postgres::PgStore;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use crate::progress::Printer;
use crate::retention::{self, Retention};
use crate::service::{self, Service, Submit};
use crate::{api, bench, embedded, events};

const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// How long `keel run` waits for more events after its run parked for an
/// operator (the events of one commit arrive together, well within it).
const PARKED_SETTLE: Duration = Duration::from_millis(300);

/// Keel: a durable runtime for AI agents.
// No `Debug` here and below: the serve arguments hold database passwords,
// NATS credentials and the webhook secret.
#[derive(Parser)]
#[command(name = "keel", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API and/or run workers, on the embedded store or on
    /// PostgreSQL (--database-url).
    Serve(Box<ServeArgs>),
    /// Apply the store's schema migrations and exit (they are also applied on start).
    Migrate {
        /// PostgreSQL URL; without it, the embedded SQLite file --db.
        #[arg(long, env = "KEEL_DATABASE_URL")]
        database_url: Option<String>,
        /// SQLite database file.
        #[arg(long, env = "KEEL_DB", default_value = "./keel.db")]
        db: PathBuf,
    },
    /// Event export in the store: its status (backlog, relay), or switch it off.
    Events {
        #[command(subcommand)]
        action: events::Command,
    },
    /// Run an agent spec on an input and show each journaled step: durably
    /// in-process on the embedded store, or on a server with --server.
    Run(RunArgs),
    /// Show a run.
    Status {
        /// Run id.
        id: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Follow a run's events live until it ends.
    Watch {
        /// Run id.
        id: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List runs, newest first.
    Runs {
        /// Only this status (PENDING, AWAITING_LLM, AWAITING_TOOL, AWAITING_APPROVAL,
        /// COMPENSATING, COMPLETED, FAILED, CANCELLED).
        #[arg(long)]
        status: Option<String>,
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Start after this run: the `next cursor` a previous page printed.
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Tokens and cost of the runs on a server: per agent, or of one agent.
    Usage {
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Only runs created at or after this time (epoch milliseconds).
        #[arg(long)]
        since: Option<i64>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List dead-lettered tasks, or put one back in the queue.
    Dlq {
        #[command(subcommand)]
        action: Option<DlqAction>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Approve a tool call a run waits for (optionally with edited arguments).
    Approve {
        /// Run id.
        run: String,
        /// Approval id (`<step>.<call>.<attempt>`, see `keel approvals`).
        approval: String,
        /// Edited arguments (a JSON object) to make the call with.
        #[arg(long = "args", value_name = "JSON")]
        arguments: Option<String>,
        /// Who decides (journaled; default: $USER).
        #[arg(long)]
        by: Option<String>,
        /// Why (optional when approving).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Reject a tool call a run waits for; the reason goes back to the model.
    Reject {
        /// Run id.
        run: String,
        /// Approval id.
        approval: String,
        /// Why: the call's result the model sees.
        #[arg(long)]
        reason: String,
        /// Who decides (journaled; default: $USER).
        #[arg(long)]
        by: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List the approvals waiting for a decision (the inbox, every page).
    Approvals {
        /// Only this agent's runs.
        #[arg(long)]
        agent: Option<String>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Register or list agent specs on a server.
    Agents {
        #[command(subcommand)]
        action: AgentsAction,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Measure durable steps per second with a mock LLM and tool.
    Bench(bench::Args),
}

#[derive(Subcommand, Debug)]
enum DlqAction {
    /// Re-drive a dead letter: its task goes back in the queue with fresh attempts.
    Retry {
        /// Dead letter id.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum AgentsAction {
    /// Register an agent spec file (YAML or JSON).
    Apply {
        /// The spec file.
        file: PathBuf,
    },
    /// List registered agent versions.
    List,
}

#[derive(clap::Args, Debug)]
struct ServerArg {
    /// URL of a running `keel serve`.
    // Global: `keel dlq retry ID --server URL` takes it after the subcommand.
    #[arg(long, env = "KEEL_SERVER", default_value = DEFAULT_SERVER, global = true)]
    server: String,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KEEL_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Server configuration file (YAML): LLM providers and their prices
    /// (docs/CONFIG.md).
    #[arg(long, env = "KEEL_CONFIG")]
    config: Option<PathBuf>,
    /// SQLite database file (the embedded store, used when no --database-url is given).
    #[arg(long, env = "KEEL_DB", default_value = "./keel.db")]
    db: PathBuf,
    /// PostgreSQL URL (`postgres://user@host:5432/db`): the store shared by any
    /// number of API and worker processes.
    #[arg(long, env = "KEEL_DATABASE_URL")]
    database_url: Option<String>,
    /// A direct PostgreSQL URL for LISTEN, when --database-url goes through
    /// PgBouncer in transaction pooling mode (LISTEN needs a session).
    #[arg(long, env = "KEEL_DATABASE_LISTEN_URL", requires = "database_url")]
    database_listen_url: Option<String>,
    /// Longest PostgreSQL may take to answer (a write batch, a read, a
    /// connect, the LISTEN session's ping) before its connection is deemed
    /// lost, as when the network drops packets without a word: the write
    /// is tried again on a new connection (or fails, if its COMMIT was
    /// sent), a read answers 503. Above the slowest healthy statement.
    #[arg(long, env = "KEEL_DATABASE_TIMEOUT", default_value = "20s", value_parser = parse_duration, allow_hyphen_values = true)]
    database_timeout: Duration,
    /// Tasks executed at once (at least 1).
    #[arg(long, env = "KEEL_WORKERS", default_value_t = 256, value_parser = parse_workers, allow_negative_numbers = true)]
    workers: usize,
    /// Lease of a task without heartbeat (e.g. 30s).
    #[arg(long, env = "KEEL_LEASE", default_value = "30s", value_parser = parse_duration, allow_hyphen_values = true)]
    lease: Duration,
    /// Most pending (unfinished) runs; beyond it submits get 429 with
    /// Retry-After and ingestion pauses. 0: no ceiling.
    #[arg(
        long,
        env = "KEEL_MAX_PENDING",
        default_value_t = 100_000,
        allow_negative_numbers = true
    )]
    max_pending: u64,
    /// Most pending runs of any one agent (default: no ceiling).
    #[arg(
        long,
        env = "KEEL_MAX_PENDING_PER_AGENT",
        allow_negative_numbers = true
    )]
    max_pending_per_agent: Option<u64>,
    /// What a submit refused for backpressure is told to wait (Retry-After).
    #[arg(long, env = "KEEL_RETRY_AFTER", default_value = "1s", value_parser = parse_duration, allow_hyphen_values = true)]
    retry_after: Duration,
    /// What this process does: `all` (API + workers), `api` (accept submits,
    /// serve reads) or `worker` (execute tasks; serves /healthz and /readyz).
    #[arg(long, env = "KEEL_ROLE", value_enum, default_value_t = Role::All)]
    role: Role,
    /// Export every journal event to this NATS JetStream server
    /// (`nats://127.0.0.1:4222`); see docs/EVENTS.md.
    #[arg(long, env = "KEEL_EVENTS", value_name = "NATS_URL")]
    events: Option<String>,
    /// Turn messages published to `<prefix>.ingest.<agent>` on this NATS
    /// JetStream server into runs; see docs/EVENTS.md.
    #[arg(long, env = "KEEL_INGEST", value_name = "NATS_URL")]
    ingest: Option<String>,
    /// Prefix of the NATS subjects and stream names (streams are named
    /// `<PREFIX>_EVENTS`, `<PREFIX>_INGEST`, `<PREFIX>_DEAD`).
    #[arg(long, env = "KEEL_NATS_PREFIX", default_value = "keel")]
    nats_prefix: String,
    /// How long NATS waits for Keel to acknowledge an ingested message
    /// before delivering it again (after a crash).
    #[arg(long, env = "KEEL_INGEST_ACK_WAIT", default_value = "30s", value_parser = parse_duration, allow_hyphen_values = true)]
    ingest_ack_wait: Duration,
    /// API token(s) every request must present as `Authorization: Bearer
    /// <token>` (but /healthz, /readyz and /openapi.json); several,
    /// comma-separated, while rolling a new one out. Open to anyone when
    /// unset. Set it through the environment, not the command line.
    #[arg(long, env = "KEEL_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Delete runs that ended longer ago than this (e.g. `30d`), with their
    /// journal, streamed output, dead letters and idempotency keys; kept
    /// forever when unset. Swept by the processes that run workers.
    #[arg(long, env = "KEEL_RETENTION", value_parser = parse_duration, allow_hyphen_values = true)]
    retention: Option<Duration>,
    /// Time between two retention sweeps.
    #[arg(long, env = "KEEL_RETENTION_INTERVAL", default_value = "1m", value_parser = parse_duration, allow_hyphen_values = true)]
    retention_interval: Duration,
    /// Secret signing webhook notifications with HMAC-SHA256 (the
    /// `Keel-Signature` header); unsigned when unset. Set it through the
    /// environment, not the command line.
    #[arg(long, env = "KEEL_WEBHOOK_SECRET", hide_env_values = true)]
    webhook_secret: Option<String>,
    /// Export OpenTelemetry traces (a run's submit, LLM and tool calls) to
    /// this OTLP/HTTP collector (`http://collector:4318`; spans are POSTed
    /// as JSON to `<URL>/v1/traces`); off when unset. See docs/TRACES.md.
    #[arg(long, env = "KEEL_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
}

/// The part a `keel serve` process plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    /// API and workers.
    All,
    /// API only.
    Api,
    /// Workers only.
    Worker,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Api => "api",
            Role::Worker => "worker",
        }
    }

    fn runs_workers(self) -> bool {
        matches!(self, Role::All | Role::Worker)
    }

    fn serves_api(self) -> bool {
        matches!(self, Role::All | Role::Api)
    }
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Agent spec file (YAML or JSON).
    spec: PathBuf,
    /// The input: text, or a JSON object/array.
    #[arg(long)]
    input: String,
    /// Priority under contention for workers: 0 (lowest) to 9 (highest);
    /// the server's default (5) when not given.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=9), allow_negative_numbers = true)]
    priority: Option<u8>,
    /// Submit to this server instead of running in-process.
    #[arg(long)]
    server: Option<String>,
    /// SQLite database file for in-process runs.
    #[arg(long, env = "KEEL_DB", default_value = "./keel.db")]
    db: PathBuf,
    /// Tasks executed at once (in-process; at least 1).
    #[arg(long, default_value_t = 16, value_parser = parse_workers, allow_negative_numbers = true)]
    workers: usize,
    /// Server configuration file (YAML): LLM providers and their prices
    /// (docs/CONFIG.md).
    #[arg(long, env = "KEEL_CONFIG")]
    config: Option<PathBuf>,
}

/// Reads and validates the configuration file, if one is given; the
/// errors name the file and the fields at fault.
/// The API tokens: `--api-token`'s, acting as the `default` tenant, and
/// each configured tenant's, read from its variable or file now; `None`
/// when there is none (the API is open). Errors name the source, never a
/// token.
fn api_tokens(flag: Option<&str>, config: &Config) -> anyhow::Result<Option<api::Tokens>> {
    let mut tokens = api::Tokens::default();
    if let Some(value) = flag.filter(|v| v.split(',').any(|t| !t.trim().is_empty())) {
        tokens
            .add(DEFAULT_TENANT, value)
            .map_err(|e| anyhow::anyhow!("--api-token (KEEL_API_TOKEN): {e}"))?;
    }
    for (name, tenant) in &config.tenants {
        let value = match (&tenant.api_tokens_env, &tenant.api_tokens_file) {
            (Some(var), _) => std::env::var(var).ok(),
            (None, Some(path)) => std::fs::read_to_string(path).ok(),
            (None, None) => None,
        };
        let Some(value) = value else {
            bail!(
                "tenant `{name}`: {} is not set or cannot be read",
                tenant.describe(name)
            );
        };
        tokens
            .add(name, &value)
            .map_err(|e| anyhow::anyhow!("tenant `{name}`: {}: {e}", tenant.describe(name)))?;
    }
    Ok((!tokens.is_empty()).then_some(tokens))
}

/// Each tenant's webhook secret (`tenants.<name>.webhook_secret_env`),
/// read now; an unset or empty variable stops the server, naming it.
fn tenant_webhook_secrets(
    config: &Config,
) -> anyhow::Result<std::collections::HashMap<String, String>> {
    let mut secrets = std::collections::HashMap::new();
    for (name, tenant) in &config.tenants {
        let Some(var) = &tenant.webhook_secret_env else {
            continue;
        };
        match std::env::var(var) {
            Ok(secret) if !secret.trim().is_empty() => {
                secrets.insert(name.clone(), secret);
            }
            _ => bail!(
                "tenant `{name}`: environment variable {var} (tenants.{name}.webhook_secret_env) is not set or empty"
            ),
        }
    }
    Ok(secrets)
}

pub fn load_config(path: Option<&Path>) -> anyhow::Result<Arc<Config>> {
    let Some(path) = path else {
        return Ok(Arc::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
    let config = Config::parse(&text).with_context(|| format!("in {}", path.display()))?;
    Ok(Arc::new(config))
}

fn parse_workers(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("must be a whole number of at least 1".into()),
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = human_duration::parse(text)?;
    if d.is_zero() {
        return Err("must be positive".into());
    }
    Ok(d)
}

/// Parses the arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet = !matches!(cli.command, Command::Serve(_));
    init_tracing(if quiet { "warn" } else { "info" });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => serve(*args).await.map(|_| ExitCode::SUCCESS),
        Command::Run(args) => match args.server.clone() {
            Some(server) => run_remote(&server, &args).await,
            None => run_local(args).await,
        },
        Command::Status { id, json, server } => {
            status(&Client::new(&server.server)?, run_id(&id)?, json).await
        }
        Command::Watch { id, server } => {
            let id = run_id(&id)?;
            let client = Client::new(&server.server)?;
            let mut printer = Printer::new();
            client.follow(id, |r| printer.print(r)).await?;
            status(&client, id, false).await
        }
        Command::Runs {
            status,
            agent,
            limit,
            cursor,
            server,
        } => {
            let filter = RunsFilter {
                status,
                agent,
                limit,
                cursor,
            };
            runs(&Client::new(&server.server)?, &filter)
                .await
                .map(|_| ExitCode::SUCCESS)
        }
        Command::Usage {
            agent,
            since,
            server,
        } => usage(&Client::new(&server.server)?, agent.as_deref(), since)
            .await
            .map(|_| ExitCode::SUCCESS),
        Command::Approve {
            run,
            approval,
            arguments,
            by,
            reason,
            server,
        } => {
            let arguments = match arguments {
                Some(text) => Some(
                    serde_json::from_str::<Value>(&text)
                        .with_context(|| format!("--args is not JSON: {text}"))?,
                ),
                None => None,
            };
            let mut body = json!({"decision": "approve", "by": decider(by)});
            if let Some(arguments) = arguments {
                body["arguments"] = arguments;
            }
            if let Some(reason) = reason {
                body["reason"] = json!(reason);
            }
            decide(
                &Client::new(&server.server)?,
                run_id(&run)?,
                &approval,
                &body,
            )
            .await
        }
        Command::Reject {
            run,
            approval,
            reason,
            by,
            server,
        } => {
            let body = json!({"decision": "reject", "reason": reason, "by": decider(by)});
            decide(
                &Client::new(&server.server)?,
                run_id(&run)?,
                &approval,
                &body,
            )
            .await
        }
        Command::Approvals {
            agent,
            json,
            server,
        } => approvals(&Client::new(&server.server)?, agent.as_deref(), json)
            .await
            .map(|_| ExitCode::SUCCESS),
        Command::Dlq { action, server } => dlq(&Client::new(&server.server)?, action)
            .await
            .map(|_| ExitCode::SUCCESS),
        Command::Agents { action, server } => {
            let client = Client::new(&server.server)?;
            match action {
                AgentsAction::Apply { file } => {
                    let text = std::fs::read_to_string(&file)
                        .with_context(|| format!("cannot read {}", file.display()))?;
                    let body = client
                        .put_agent(text)
                        .await
                        .with_context(|| format!("cannot register {}", file.display()))?;
                    outln!("{}", serde_json::to_string_pretty(&body)?);
                }
                AgentsAction::List => {
                    let body = client.get(&["v1", "agents"], &[]).await?;
                    for a in body["agents"].as_array().cloned().unwrap_or_default() {
                        outln!(
                            "{:<24} v{:<10} {}/{}",
                            a["name"].as_str().unwrap_or("?"),
                            a["version"].as_str().unwrap_or("?"),
                            a["model"]["provider"].as_str().unwrap_or("?"),
                            a["model"]["model"].as_str().unwrap_or("?")
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => bench::run(args).await.map(|_| ExitCode::SUCCESS),
        Command::Migrate { database_url, db } => {
            migrate(database_url.as_deref(), &db).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Events { action } => events::run(action).await.map(|_| ExitCode::SUCCESS),
    }
}

async fn migrate(database_url: Option<&str>, db: &Path) -> anyhow::Result<()> {
    match database_url {
        Some(url) => {
            let version = PgStore::migrate(url)
                .await
                .with_context(|| format!("cannot migrate {}", redact_url(url)))?;
            outln!("{} is at schema version {version}", redact_url(url));
        }
        None => {
            // Opening the embedded store applies its migrations.
            let embedded = embedded::open(db).await?;
            drop(embedded);
            outln!("{} is migrated", db.display());
        }
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // What the server is configured with is checked before a store is
    // opened (or migrated): a bad file, token or secret changes nothing.
    let config = load_config(args.config.as_deref())?;
    let setup = Setup {
        tokens: api_tokens(args.api_token.as_deref(), &config)?,
        webhook_secrets: tenant_webhook_secrets(&config)?,
        config,
    };
    if let Some(url) = &args.database_url {
        let mut options = keel_store::postgres::Options::new(url.clone());
        options.listen_url = args.database_listen_url.clone();
        options.timeout = args.database_timeout;
        let store = PgStore::connect_with(options)
            .await
            .with_context(|| format!("cannot open the PostgreSQL store at {}", redact_url(url)))?;
        match store.autovacuum().await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                "autovacuum is off on the PostgreSQL server: the tasks, outbox and deltas tables \
                 bloat and their query plans go stale, so every step gets slower; turn it on"
            ),
            Err(e) => tracing::warn!(error = %e, "could not read the server's autovacuum setting"),
        }
        return serve_on(store, &args, &redact_url(url), setup).await;
    }
    if args.role != Role::All {
        bail!(
            "--role {} needs a store shared by several processes: the embedded SQLite file belongs to one process (use --role all, or --database-url postgres://...)",
            args.role.as_str()
        );
    }
    let embedded = embedded::open(&args.db).await?;
    let store = embedded.store.clone();
    let described = args.db.display().to_string();
    serve_on(store, &args, &described, setup).await?;
    drop(embedded);
    Ok(())
}

/// What `keel serve` read and checked before opening its store.
struct Setup {
    /// The server configuration (`--config`).
    config: Arc<Config>,
    /// The API tokens, if any ([`api_tokens`]).
    tokens: Option<api::Tokens>,
    /// Each tenant's own webhook secret ([`tenant_webhook_secrets`]).
    webhook_secrets: std::collections::HashMap<String, String>,
}

/// Serves the API and/or runs workers (per `--role`) on any store, until
/// SIGTERM/SIGINT; then drains the workers and exits.
async fn serve_on<S: keel_store::Store>(
    store: S,
    args: &ServeArgs,
    described: &str,
    setup: Setup,
) -> anyhow::Result<()> {
    let Setup {
        config,
        tokens,
        webhook_secrets,
    } = setup;
    // Bound before anything starts: an address in use fails the start
    // before a worker claims a task or a consumer pulls a message.
    let listener = api::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let cancel = CancellationToken::new();
    let limits = service::Limits {
        max_pending: (args.max_pending > 0).then_some(args.max_pending),
        max_pending_per_agent: args.max_pending_per_agent.filter(|n| *n > 0),
        retry_after: args.retry_after,
    };
    let breakers = keel_engine::Breakers::default();
    let process = breakers.process().to_string();
    // Stopped after the workers, so the spans of their last steps go too.
    let trace_stop = CancellationToken::new();
    let exporter = match &args.otlp_endpoint {
        Some(endpoint) => {
            let options = keel_engine::trace::Options::new(endpoint.clone(), process.clone());
            let exporter = keel_engine::trace::Exporter::install(options)?;
            Some(tokio::spawn(exporter.run(trace_stop.clone())))
        }
        None => None,
    };
    let service = Service::with_limits(store.clone(), limits).with_providers(service::Providers {
        config: config.clone(),
        breakers: breakers.clone(),
    });
    let nats = start_nats(&service, args, &cancel).await?;
    let workers = if args.role.runs_workers() {
        let options = Options {
            workers: args.workers,
            lease: args.lease,
            heartbeat: args.lease / 3,
            config,
            breakers,
            webhook_secret: args.webhook_secret.clone(),
            tenant_webhook_secrets: webhook_secrets,
            ..Options::default()
        };
        Some(tokio::spawn(
            Engine::new(store.clone(), options).run(cancel.clone()),
        ))
    } else {
        None
    };
    let retention = match args.retention {
        Some(keep) if args.role.runs_workers() => Some(tokio::spawn(retention::run(
            store.clone(),
            Retention {
                keep,
                interval: args.retention_interval,
            },
            cancel.clone(),
        ))),
        _ => None,
    };
    let addr = listener.local_addr()?;
    tracing::info!(listen = %addr, store = %described, role = args.role.as_str(), workers = args.workers, %process, "keel serving");
    let app = if args.role.serves_api() {
        api::router(service)
    } else {
        api::health_router(service)
    };
    let app = match tokens {
        Some(tokens) => api::require_token(app, tokens),
        None => {
            if !addr.ip().is_loopback() {
                tracing::warn!(listen = %addr, "the API takes requests from anyone who can reach it: set KEEL_API_TOKEN");
            }
            app
        }
    };
    let signalled = cancel.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        signalled.cancel();
    });
    let stop = cancel.clone();
    tokio::select! {
        result = server => result.context("http server failed")?,
        // Open SSE streams never end by themselves: give connections a moment, then go.
        _ = async { stop.cancelled().await; tokio::time::sleep(Duration::from_secs(3)).await } => {}
    }
    cancel.cancel();
    if let Some(workers) = workers
        && let Err(e) = workers.await
    {
        tracing::warn!(error = %e, "worker pool ended abnormally");
    }
    if let Some(retention) = retention
        && let Err(e) = retention.await
    {
        tracing::warn!(error = %e, "retention sweep ended abnormally");
    }
    for task in nats {
        if let Err(e) = task.await {
            tracing::warn!(error = %e, "nats task ended abnormally");
        }
    }
    trace_stop.cancel();
    if let Some(exporter) = exporter
        && let Err(e) = exporter.await
    {
        tracing::warn!(error = %e, "trace exporter ended abnormally");
    }
    Ok(())
}

/// Starts event export and/or ingestion over NATS when asked for.
#[cfg(feature = "nats")]
async fn start_nats<S: keel_store::Store>(
    service: &Service<S>,
    args: &ServeArgs,
    cancel: &CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let serve = crate::nats::Serve {
        events: args.events.clone().map(crate::nats::Servers::new),
        ingest: args.ingest.clone().map(crate::nats::Servers::new),
        prefix: args.nats_prefix.clone(),
        ingest_ack_wait: args.ingest_ack_wait,
        sole_process: args.database_url.is_none(),
    };
    Ok(crate::nats::start(service.clone(), serve, cancel.clone()).await?)
}

#[cfg(not(feature = "nats"))]
async fn start_nats<S: keel_store::Store>(
    _service: &Service<S>,
    args: &ServeArgs,
    _cancel: &CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    if args.events.is_some() || args.ingest.is_some() {
        bail!("--events and --ingest need keel built with the `nats` feature");
    }
    Ok(Vec::new())
}

async fn shutdown_signal() {
    Interrupts::new().next().await;
    tracing::info!("shutting down");
}

/// SIGINT and SIGTERM, listened for from creation on: a signal that comes
/// while nobody awaits [`Interrupts::next`] (between two waits) is kept for
/// the next wait, not lost.
struct Interrupts {
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl Interrupts {
    fn new() -> Interrupts {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for {name}");
                    None
                }
            };
            Interrupts {
                int: listen(SignalKind::interrupt(), "SIGINT"),
                term: listen(SignalKind::terminate(), "SIGTERM"),
            }
        }
        #[cfg(not(unix))]
        Interrupts {}
    }

    /// The next signal (never, if neither could be listened for).
    async fn next(&mut self) {
        #[cfg(unix)]
        {
            async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
                match signal {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = recv(&mut self.int) => {}
                () = recv(&mut self.term) => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `--input` text: a JSON object or array is sent as JSON, anything else as text.
fn parse_input(text: &str) -> Value {
    match serde_json::from_str::<Value>(text) {
        Ok(v @ (Value::Object(_) | Value::Array(_))) => v,
        _ => Value::String(text.to_string()),
    }
}

/// Reads a spec file; relative `root`s of file built-ins resolve against the
/// spec file's folder.
fn load_spec(path: &Path) -> anyhow::Result<Agent> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut agent = Agent::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut changed = false;
    for tool in &mut agent.spec.tools {
        if let Some(root) = &tool.root
            && Path::new(root).is_relative()
        {
            let joined = base.join(root);
            let absolute = joined.canonicalize().unwrap_or(joined);
            tool.root = Some(absolute.to_string_lossy().into_owned());
            changed = true;
        }
    }
    if changed {
        agent = Agent::new(agent.spec).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    Ok(agent)
}

async fn run_local(args: RunArgs) -> anyhow::Result<ExitCode> {
    let agent = load_spec(&args.spec)?;
    let config = load_config(args.config.as_deref())?;
    service::check_config(&config, DEFAULT_TENANT, &agent)
        .with_context(|| format!("in {}", args.spec.display()))?;
    let embedded = embedded::open(&args.db).await?;
    let store = embedded.store.clone();
    let svc = Service::new(store.clone());
    if let Err(e) = svc.register(DEFAULT_TENANT, &agent).await {
        if let api::Error::Conflict(message) = &e {
            bail!(
                "{message}\nhint: runs are pinned to agent versions: bump `version` in {} or use another --db",
                args.spec.display()
            );
        }
        bail!("{e}");
    }
    let submitted = svc
        .submit(Submit {
            tenant: DEFAULT_TENANT.into(),
            agent: agent.spec.name.clone(),
            version: Some(agent.spec.version.clone()),
            input: parse_input(&args.input),
            idempotency_key: None,
            callback_url: None,
            priority: args
                .priority
                .and_then(|p| Priority::new(i64::from(p)))
                .unwrap_or_default(),
        })
        .await?;
    let run_id = submitted.run_id;
    outln!(
        "run {run_id}  agent {} v{}  store {}",
        agent.spec.name,
        agent.spec.version,
        args.db.display()
    );

    let options = Options {
        workers: args.workers,
        config,
        ..Options::default()
    };
    let drain = options.drain;
    let engine = Engine::new(store.clone(), options);
    let cancel = CancellationToken::new();
    let mut workers = tokio::spawn(engine.run(cancel.clone()));
    let mut printer = Printer::new();
    let mut events = std::pin::pin!(service::follow(store.clone(), run_id, 0));
    let mut outcome = Ok(());
    let mut interrupted = false;
    let mut interrupts = Interrupts::new();
    // Parked for an operator: nothing in this process can decide an approval
    // or re-drive a dead letter, so waiting would never end.
    let mut parked = false;
    loop {
        tokio::select! {
            item = events.next() => match item {
                Some(Ok(recorded)) => {
                    printer.print(&recorded);
                    parked = matches!(
                        recorded.event,
                        Event::ApprovalRequested { .. } | Event::TaskDeadLettered { .. }
                    );
                }
                Some(Err(e)) => { outcome = Err(anyhow::anyhow!("reading the journal: {e}")); break; }
                None => break,
            },
            // The rest of the parking commit (one approval per gated call) comes at once.
            _ = tokio::time::sleep(PARKED_SETTLE), if parked => break,
            () = interrupts.next() => {
                outln!(
                    "interrupted: steps in flight get up to {} to reach their next boundary (interrupt again to stop now); the run stays in {} and resumes with `keel serve --db {}`",
                    human_duration::format(drain),
                    args.db.display(),
                    args.db.display()
                );
                interrupted = true;
                break;
            }
        }
    }
    cancel.cancel();
    if interrupted {
        tokio::select! {
            _ = &mut workers => {}
            // Leases still held are taken back when the file is next opened.
            () = interrupts.next() => return Ok(ExitCode::FAILURE),
        }
    } else {
        let _ = workers.await;
    }
    outcome?;
    let view = svc.view(DEFAULT_TENANT, run_id).await?;
    print_summary(&serde_json::to_value(&view)?);
    if parked {
        let db = args.db.display();
        for approval in view.approvals.iter().filter(|a| a.status == "pending") {
            outln!(
                "waiting for a decision on {}({}): `keel approve {run_id} {}` or `keel reject {run_id} {} --reason TEXT`",
                approval.tool,
                keel_core::spec::clip(&approval.arguments.to_string(), 60),
                approval.id,
                approval.id
            );
        }
        outln!(
            "the run waits in {db} for an operator: these commands work once `keel serve --db {db}` serves it"
        );
    }
    Ok(if view.status == "COMPLETED" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn run_remote(server: &str, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(server)?;
    let text = std::fs::read_to_string(&args.spec)
        .with_context(|| format!("cannot read {}", args.spec.display()))?;
    let agent = client
        .put_agent(text)
        .await
        .with_context(|| format!("cannot register {}", args.spec.display()))?;
    let mut body = json!({
        "agent": agent["name"],
        "version": agent["version"],
        "input": parse_input(&args.input),
    });
    if let Some(priority) = args.priority {
        body["priority"] = json!(priority);
    }
    let run = client.post(&["v1", "runs"], &body).await?;
    let id = run["id"].as_str().unwrap_or_default().to_string();
    outln!(
        "run {id}  agent {} v{}  server {server}",
        agent["name"].as_str().unwrap_or("?"),
        agent["version"].as_str().unwrap_or("?")
    );
    let mut printer = Printer::new();
    client.follow(&id, |r| printer.print(r)).await?;
    status(&client, &id, false).await
}

async fn status(client: &Client, id: &str, raw: bool) -> anyhow::Result<ExitCode> {
    let view = client.get(&["v1", "runs", id], &[]).await?;
    if raw {
        outln!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print_summary(&view);
    }
    Ok(if view["status"] == "COMPLETED" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_summary(view: &Value) {
    let status = view["status"].as_str().unwrap_or("?");
    let took = view["updated_at"].as_i64().unwrap_or(0) - view["created_at"].as_i64().unwrap_or(0);
    outln!(
        "\n{status}  run {}  {} steps, {} tokens in / {} out, {:.3}s, {} journal events",
        view["id"].as_str().unwrap_or("?"),
        view["step_count"],
        view["usage"]["input_tokens"],
        view["usage"]["output_tokens"],
        took as f64 / 1000.0,
        view["last_seq"],
    );
    if let Some(error) = view["error"].as_str() {
        outln!("error: {error}");
    }
    if let Some(letter) = view["dead_letter"].as_str() {
        outln!("dead letter: {letter}  (re-drive with `keel dlq retry {letter}`)");
    }
    if let Some(output) = view["output"].as_str() {
        outln!("\n{output}");
    }
}

/// Which page of runs `keel runs` lists.
struct RunsFilter {
    /// Only this status.
    status: Option<String>,
    /// Only this agent.
    agent: Option<String>,
    /// Page size.
    limit: u32,
    /// Start after this run (a previous page's next cursor).
    cursor: Option<String>,
}

/// Lists one page of runs, newest first, then the cursor of the next page
/// when there may be one.
async fn runs(client: &Client, filter: &RunsFilter) -> anyhow::Result<()> {
    let limit = filter.limit.to_string();
    let mut query = vec![("limit", limit.as_str())];
    if let Some(s) = &filter.status {
        query.push(("status", s));
    }
    if let Some(a) = &filter.agent {
        query.push(("agent", a));
    }
    if let Some(c) = &filter.cursor {
        query.push(("cursor", c));
    }
    let body = client.get(&["v1", "runs"], &query).await?;
    for run in body["runs"].as_array().cloned().unwrap_or_default() {
        outln!(
            "{}  {:<17} {:<20} steps {:>3}  {}",
            run["id"].as_str().unwrap_or("?"),
            run["status"].as_str().unwrap_or("?"),
            format!(
                "{} v{}",
                run["agent"].as_str().unwrap_or("?"),
                run["version"].as_str().unwrap_or("?")
            ),
            run["step_count"].to_string(),
            run["error"].as_str().unwrap_or(""),
        );
    }
    if let Some(next) = body["next_cursor"].as_str() {
        outln!("next cursor: {next} (--cursor {next} lists the next page)");
    }
    Ok(())
}

async fn usage(client: &Client, agent: Option<&str>, since: Option<i64>) -> anyhow::Result<()> {
    let since = since.map(|ms| ms.to_string());
    let query: Vec<(&str, &str)> = since.iter().map(|ms| ("since", ms.as_str())).collect();
    let body = match agent {
        Some(name) => {
            // Agent names are URL-safe; anything else names no agent.
            let plain = name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if name.is_empty() || !plain {
                bail!("`{name}` is not an agent name (letters, digits, `_`, `-` or `.`)");
            }
            client.get(&["v1", "agents", name, "usage"], &query).await?
        }
        None => client.get(&["v1", "usage"], &query).await?,
    };
    let line = |name: &str, totals: &Value| {
        outln!(
            "{name:<24} {:>8} {:>14} {:>14} {:>12.4}",
            totals["runs"].to_string(),
            totals["input_tokens"].to_string(),
            totals["output_tokens"].to_string(),
            totals["cost_usd"].as_f64().unwrap_or(0.0),
        );
    };
    outln!(
        "{:<24} {:>8} {:>14} {:>14} {:>12}",
        "AGENT",
        "RUNS",
        "TOKENS IN",
        "TOKENS OUT",
        "COST (USD)"
    );
    match agent {
        Some(name) => line(name, &body),
        None => {
            for entry in body["agents"].as_array().cloned().unwrap_or_default() {
                line(entry["agent"].as_str().unwrap_or("?"), &entry);
            }
            line("total", &body);
        }
    }
    Ok(())
}

/// A run id from the command line, checked before any request: a UUID.
fn run_id(text: &str) -> anyhow::Result<&str> {
    if text.parse::<RunId>().is_err() {
        bail!("`{text}` is not a run id (a UUID like 019ab6c3-5d1e-7c4a-9f00-2b1d5e6f7a80)");
    }
    Ok(text)
}

/// Who decides: `--by`, else the user running the CLI.
fn decider(by: Option<String>) -> String {
    by.or_else(|| std::env::var("USER").ok())
        .filter(|b| !b.trim().is_empty())
        .unwrap_or_else(|| "cli".into())
}

async fn decide(
    client: &Client,
    run: &str,
    approval: &str,
    body: &Value,
) -> anyhow::Result<ExitCode> {
    let answer = client
        .post(&["v1", "runs", run, "approvals", approval], body)
        .await?;
    outln!(
        "{} {} of run {} by {}; the run is {}",
        answer["decision"].as_str().unwrap_or("?"),
        approval,
        run,
        answer["by"].as_str().unwrap_or("?"),
        answer["status"].as_str().unwrap_or("?"),
    );
    Ok(ExitCode::SUCCESS)
}

/// Approvals the CLI asks for per inbox page.
const INBOX_PAGE: u32 = 100;

/// Lists the whole inbox, page after page (following `next_cursor`).
async fn approvals(client: &Client, agent: Option<&str>, raw: bool) -> anyhow::Result<()> {
    let limit = INBOX_PAGE.to_string();
    let mut approvals = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut query = vec![("status", "pending"), ("limit", limit.as_str())];
        if let Some(agent) = agent {
            query.push(("agent", agent));
        }
        if let Some(c) = &cursor {
            query.push(("cursor", c));
        }
        let body = client.get(&["v1", "approvals"], &query).await?;
        approvals.extend(body["approvals"].as_array().cloned().unwrap_or_default());
        match body["next_cursor"].as_str() {
            // A cursor that does not move would page forever.
            Some(next) if cursor.as_deref() != Some(next) => cursor = Some(next.to_string()),
            _ => break,
        }
    }
    if raw {
        let body = json!({"approvals": approvals});
        outln!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    if approvals.is_empty() {
        outln!("no approvals waiting");
    }
    for a in approvals {
        let mut note = String::new();
        if a["reason"] == "uncertain" {
            note.push_str("  (repeat of a call that may have happened)");
        }
        if a["escalated"] == true {
            note.push_str("  ESCALATED");
        }
        outln!(
            "{}  {:<8} {:<16} {}({}){}",
            a["run_id"].as_str().unwrap_or("?"),
            a["id"].as_str().unwrap_or("?"),
            a["agent"].as_str().unwrap_or("?"),
            a["tool"].as_str().unwrap_or("?"),
            keel_core::spec::clip(&a["arguments"].to_string(), 80),
            note,
        );
    }
    Ok(())
}

async fn dlq(client: &Client, action: Option<DlqAction>) -> anyhow::Result<()> {
    match action {
        Some(DlqAction::Retry { id }) => {
            if id.parse::<TaskId>().is_err() {
                bail!("`{id}` is not a dead letter id (a UUID: see `keel dlq`)");
            }
            let body = client
                .post(&["v1", "dlq", &id, "retry"], &json!({}))
                .await?;
            outln!(
                "requeued {} of run {}",
                id,
                body["run_id"].as_str().unwrap_or("?")
            );
        }
        None => {
            let body = client.get(&["v1", "dlq"], &[]).await?;
            let letters = body["dead_letters"].as_array().cloned().unwrap_or_default();
            if letters.is_empty() {
                outln!("no dead letters");
            }
            for d in letters {
                outln!(
                    "{}  run {}  {} step {}  after {} attempts: {}",
                    d["id"].as_str().unwrap_or("?"),
                    d["run_id"].as_str().unwrap_or("?"),
                    d["kind"].as_str().unwrap_or("?"),
                    d["step"],
                    d["attempts"],
                    d["error"].as_str().unwrap_or(""),
                );
            }
        }
    }
    Ok(())
}
