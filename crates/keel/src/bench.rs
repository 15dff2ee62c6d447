//! `keel bench`: the engine on the embedded store (or, with
//! `--database-url`, on PostgreSQL with worker processes) against an in-process
//! OpenAI-compatible mock LLM and an HTTP tool (both over real loopback HTTP),
//! many runs at once. Prints durable steps per second (one step = one LLM call
//! plus one tool call, both journaled), CPU time per step, step latency
//! percentiles, wall time and peak RSS.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use keel_core::config::Config;
use keel_core::ids::DEFAULT_TENANT;
use keel_core::spec::redact_url;
use keel_core::{Agent, Event, Priority};
use keel_engine::{Engine, Options};
use keel_store::Store;
use keel_store::postgres::PgStore;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::mock::Mock;
use crate::service::{Service, Submit};

/// `keel bench` options.
// No `Debug`: the database URL may hold a password.
#[derive(clap::Args)]
pub struct Args {
    /// Runs to submit at once (default: 1000, or 2000 with `--llm-latency`).
    #[arg(long)]
    pub runs: Option<usize>,
    /// Tool steps per run, each run also making one final LLM call
    /// (default: 10, or 3 with `--llm-latency`).
    #[arg(long)]
    pub steps: Option<u32>,
    /// Latency of every mock LLM answer (e.g. 1s).
    #[arg(long, default_value = "0ms", value_parser = keel_core::spec::human_duration::parse)]
    pub llm_latency: Duration,
    /// Tasks executed at once per worker process (default: 128, or every run
    /// at once when the LLM is slow).
    #[arg(long)]
    pub workers: Option<usize>,
    /// SQLite file to use (default: a fresh file in the temp folder, removed after).
    #[arg(long, conflicts_with = "database_url")]
    pub db: Option<PathBuf>,
    /// Bench the PostgreSQL store on this server instead: each round gets a
    /// fresh database (created and dropped on it) and its own `keel serve
    /// --role worker` processes.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Worker processes per round on PostgreSQL, e.g. `1,2` for one round
    /// with one process then one with two (the scaling curve).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2",
        requires = "database_url"
    )]
    pub processes: Vec<usize>,
    /// Limit the mock model to this many requests per minute through Keel's
    /// shared rate limiter (a configuration with `rpm`); the mock LLM
    /// enforces the same limit (429 above it) and the achieved rate is
    /// printed against it.
    #[arg(long)]
    pub rpm: Option<u64>,
}

/// Runs of the bench with a slow LLM (`--llm-latency`) unless `--runs`
/// says otherwise.
const SLOW_LLM_RUNS: usize = 2_000;
/// Tool steps per run of the bench with a slow LLM unless `--steps` says
/// otherwise: with the final answer, four LLM calls a run.
const SLOW_LLM_STEPS: u32 = 3;

impl Args {
    /// Runs to submit: `--runs`, else 1000, or [`SLOW_LLM_RUNS`] with a
    /// slow LLM.
    fn runs(&self) -> usize {
        self.runs.unwrap_or(if self.llm_latency.is_zero() {
            1_000
        } else {
            SLOW_LLM_RUNS
        })
    }

    /// Tool steps per run: `--steps`, else 10, or [`SLOW_LLM_STEPS`] with
    /// a slow LLM.
    fn steps(&self) -> u32 {
        self.steps.unwrap_or(if self.llm_latency.is_zero() {
            10
        } else {
            SLOW_LLM_STEPS
        })
    }
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.runs() == 0 || args.steps() == 0 {
        bail!("--runs and --steps must be at least 1");
    }
    if args.processes.contains(&0) {
        bail!("--processes: every round needs at least 1 worker process");
    }
    let mock = Mock::start()
        .await
        .context("cannot start the mock servers")?;
    mock.counters
        .llm_latency_ms
        .store(args.llm_latency.as_millis() as u64, Ordering::Relaxed);
    let workers = args.workers.unwrap_or(if args.llm_latency.is_zero() {
        128
    } else {
        args.runs() + 16
    });
    let spec = json!({
        "name": "bench",
        "version": "1",
        "model": {"provider": "openai", "model": format!("tools:{}", args.steps()), "base_url": mock.llm_url(), "timeout": "60s"},
        "tools": [{
            "name": "echo",
            "description": "Echoes its arguments.",
            "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
            "http": {"url": mock.tool_url("echo"), "method": "POST"},
            "idempotent": true
        }],
        "limits": {"max_steps": args.steps() + 1}
    });
    let agent = Agent::from_value(spec)?;
    let config = match args.rpm {
        None => Arc::new(Config::default()),
        Some(0) => bail!("--rpm must be at least 1"),
        Some(rpm) => {
            mock.counters.limit_llm(
                usize::try_from(rpm).unwrap_or(usize::MAX),
                Duration::from_secs(60),
            );
            let model = format!("tools:{}", args.steps());
            Arc::new(Config::from_value(json!({
                "providers": {"openai": {"kind": "openai", "models": {model: {"rpm": rpm}}}}
            }))?)
        }
    };

    if let Some(url) = &args.database_url {
        let mut figures = Vec::new();
        for &processes in &args.processes {
            mock.counters.reset();
            let steps_per_second =
                postgres_round(&args, &mock, &agent, &config, url, processes, workers)
                    .await
                    .with_context(|| format!("round with {processes} worker processes"))?;
            figures.push((processes, steps_per_second));
        }
        if figures.len() > 1 {
            println!(
                "\nscaling on PostgreSQL ({} runs x {} steps):",
                args.runs(),
                args.steps()
            );
            for (processes, rate) in figures {
                println!("  {processes} worker process(es)  {rate:.0} steps/s");
            }
        }
        return Ok(());
    }

    let temp = args.db.is_none();
    let db = args.db.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("keel-bench-{}.db", uuid::Uuid::now_v7()))
    });
    let embedded = crate::embedded::open(&db).await?;
    let store = embedded.store.clone();
    Service::new(store.clone())
        .register(DEFAULT_TENANT, &agent)
        .await?;
    let engine = Engine::new(
        store.clone(),
        Options {
            workers,
            config,
            ..Options::default()
        },
    );
    let cancel = CancellationToken::new();
    let pool = tokio::spawn(engine.run(cancel.clone()));
    println!(
        "keel bench: {} runs x {} tool steps, llm latency {:?}, {} workers, SQLite WAL synchronous=FULL at {}",
        args.runs(),
        args.steps(),
        args.llm_latency,
        workers,
        db.display()
    );
    let result = measure(&args, &mock, &store, &[]).await;
    cancel.cancel();
    let _ = pool.await;
    drop(embedded);
    if temp {
        for suffix in ["", "-wal", "-shm", ".lock"] {
            let mut p = db.as_os_str().to_owned();
            p.push(suffix);
            let _ = std::fs::remove_file(PathBuf::from(p));
        }
    }
    result.map(|_| ())
}

/// One round on a fresh PostgreSQL database with `processes` worker
/// processes; returns its steps per second.
async fn postgres_round(
    args: &Args,
    mock: &Mock,
    agent: &Agent,
    config: &Config,
    server_url: &str,
    processes: usize,
    workers: usize,
) -> anyhow::Result<f64> {
    let db = ScratchDatabase::create(server_url).await?;
    let outcome = async {
        let store = PgStore::connect(&db.url)
            .await
            .context("cannot open the PostgreSQL store")?;
        Service::new(store.clone())
            .register(DEFAULT_TENANT, agent)
            .await?;
        let exe = std::env::current_exe().context("cannot find the keel binary")?;
        // The rate limits, for the worker processes (JSON is YAML).
        let config_path = std::env::temp_dir().join(format!("{}.json", db.name));
        std::fs::write(&config_path, serde_json::to_string(config)?)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let mut children = Vec::new();
        for _ in 0..processes {
            let child = std::process::Command::new(&exe)
                .args(["serve", "--role", "worker", "--listen", "127.0.0.1:0"])
                .args(["--workers", &workers.to_string()])
                .arg("--config")
                .arg(&config_path)
                .env("KEEL_DATABASE_URL", &db.url)
                .env("KEEL_LOG", "warn")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .spawn()
                .context("cannot start a worker process")?;
            children.push(Worker(child));
        }
        println!(
            "\nkeel bench: {} runs x {} tool steps, llm latency {:?}, PostgreSQL, {processes} worker process(es) x {workers} workers",
            args.runs(), args.steps(), args.llm_latency,
        );
        let pids: Vec<u32> = children.iter().map(|c| c.0.id()).collect();
        let rate = measure(args, mock, &store, &pids).await;
        for mut child in children {
            child.stop();
        }
        let _ = std::fs::remove_file(&config_path);
        rate
    }
    .await;
    db.drop_it().await;
    outcome
}

/// A worker child process: SIGTERM then wait (SIGKILL if it is still there).
struct Worker(std::process::Child);

impl Worker {
    fn stop(&mut self) {
        let pid = self.0.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A database of the bench's own on a PostgreSQL server.
struct ScratchDatabase {
    url: String,
    name: String,
    server: String,
}

impl ScratchDatabase {
    async fn create(server: &str) -> anyhow::Result<ScratchDatabase> {
        let scratch = keel_store::postgres::create_database(server, "keel_bench")
            .await
            .with_context(|| {
                format!(
                    "cannot create a database on {} (the bench needs CREATEDB)",
                    redact_url(server)
                )
            })?;
        Ok(ScratchDatabase {
            url: scratch.url,
            name: scratch.name,
            server: server.to_string(),
        })
    }

    async fn drop_it(self) {
        if let Err(e) = keel_store::postgres::drop_database(&self.server, &self.name).await {
            eprintln!("warning: could not drop database {}: {e}", self.name);
        }
    }
}

/// Submits the runs, waits for them all and prints the figures; returns
/// steps per second. `children` are worker processes whose CPU and memory
/// count too.
async fn measure<S: Store>(
    args: &Args,
    mock: &Mock,
    store: &S,
    children: &[u32],
) -> anyhow::Result<f64> {
    let svc = Service::new(store.clone());
    let workers_cpu = || {
        children
            .iter()
            .map(|p| cpu_time(&p.to_string()))
            .sum::<Duration>()
    };
    let (own_start, workers_start) = (cpu_time("self"), workers_cpu());
    let machine_start = machine_ticks();
    let database_start = database_cpu_time();
    let started = Instant::now();
    let submits = futures_util::stream::iter(0..args.runs())
        .map(|i| {
            let svc = svc.clone();
            async move {
                svc.submit(Submit {
                    tenant: DEFAULT_TENANT.into(),
                    agent: "bench".into(),
                    version: Some("1".into()),
                    input: json!(format!("task {i}")),
                    idempotency_key: None,
                    priority: Priority::DEFAULT,
                    callback_url: None,
                })
                .await
            }
        })
        .buffer_unordered(1024)
        .collect::<Vec<_>>()
        .await;
    let mut ids = Vec::with_capacity(args.runs());
    for s in submits {
        ids.push(s.map_err(|e| anyhow::anyhow!("submit failed: {e}"))?.run_id);
    }
    let submitted_in = started.elapsed();

    // Wait until every run is over.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        // The store's cheap count (an index of unfinished runs), so that
        // waiting does not load the database.
        let unfinished = store.pending_runs(DEFAULT_TENANT, None).await?;
        if unfinished == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{unfinished} of {} runs did not finish in 10 minutes",
                args.runs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let wall = started.elapsed();
    let own_cpu = cpu_time("self").saturating_sub(own_start);
    let worker_cpu = workers_cpu().saturating_sub(workers_start);
    let cpu = own_cpu + worker_cpu;
    let database_cpu = database_cpu_time().saturating_sub(database_start);
    let machine = machine_ticks().and_then(|end| end.since(machine_start));
    let rss_kb = peak_rss_kb("self")
        + children
            .iter()
            .map(|p| peak_rss_kb(&p.to_string()))
            .sum::<u64>();

    // Figures from the journal itself.
    let mut latencies = Vec::new();
    let mut first_steps = Vec::new();
    // Per LLM call: from the event that made it due to its answer, less the
    // model's own latency: the time it waited (worker slot, rate limit).
    let mut llm_waits: Vec<i64> = Vec::new();
    let llm_latency = args.llm_latency.as_millis() as i64;
    let mut completed = 0;
    let mut first = i64::MAX;
    let mut last = i64::MIN;
    for id in &ids {
        let events = store.events(*id, 0, u32::MAX).await?;
        let mut boundary = None;
        let mut due: Option<i64> = None;
        for r in &events {
            match &r.event {
                Event::LlmCompleted { .. } => {
                    if let Some(d) = due.take() {
                        llm_waits.push((r.at - d - llm_latency).max(0));
                    }
                }
                Event::RunSubmitted { .. } => {
                    due = Some(r.at);
                    boundary = Some(r.at);
                    first = first.min(r.at);
                }
                Event::ToolCallCompleted { step, .. } => {
                    due = Some(r.at);
                    if let Some(b) = boundary {
                        // Step 1 also waited in the queue behind the other runs.
                        if *step == 1 {
                            first_steps.push(r.at - b);
                        } else {
                            latencies.push(r.at - b);
                        }
                    }
                    boundary = Some(r.at);
                }
                Event::RunCompleted { .. } => {
                    completed += 1;
                    last = last.max(r.at);
                }
                _ => {}
            }
        }
    }
    latencies.sort_unstable();
    first_steps.sort_unstable();
    llm_waits.sort_unstable();
    let steps = args.runs() as u64 * args.steps() as u64;
    let journal_wall = Duration::from_millis((last - first).max(1) as u64);
    let rate = steps as f64 / journal_wall.as_secs_f64();
    let keys = mock.counters.key_counts();
    let repeated = keys.values().filter(|n| **n > 1).count();
    println!("runs completed      {completed} / {}", args.runs());
    println!("steps               {steps} (each = 1 LLM call + 1 tool call, journaled)");
    println!(
        "llm calls           {}",
        mock.counters.llm_requests.load(Ordering::Relaxed)
    );
    println!(
        "tool calls          {} ({} distinct keys, {} repeated)",
        mock.counters.tool_requests.load(Ordering::Relaxed),
        keys.len(),
        repeated
    );
    println!(
        "submit              {:.3} s for {} runs",
        submitted_in.as_secs_f64(),
        args.runs()
    );
    println!(
        "wall time           {:.3} s (first submit to last completion: {:.3} s)",
        wall.as_secs_f64(),
        journal_wall.as_secs_f64()
    );
    println!("throughput          {rate:.0} steps/s");
    let per_step = |cpu: Duration| cpu.as_secs_f64() * 1000.0 / steps as f64;
    if children.is_empty() {
        println!(
            "cpu                 {:.3} ms per step ({:.2} s of CPU; includes the in-process mock servers)",
            per_step(cpu),
            cpu.as_secs_f64()
        );
    } else {
        println!(
            "cpu                 {:.3} ms per step in the worker processes ({:.2} s), {:.3} ms in this process (mock servers, submits; {:.2} s)",
            per_step(worker_cpu),
            worker_cpu.as_secs_f64(),
            per_step(own_cpu),
            own_cpu.as_secs_f64()
        );
    }
    if !database_cpu.is_zero() {
        println!(
            "database cpu        {:.3} ms per step ({:.2} s of CPU; postgres processes on this machine)",
            database_cpu.as_secs_f64() * 1000.0 / steps as f64,
            database_cpu.as_secs_f64()
        );
    }
    if let Some(busy) = machine {
        println!(
            "machine cpu         {:.0}% busy of {} cores over the wall time (everything on this machine)",
            busy.0 * 100.0,
            busy.1
        );
    }
    println!(
        "step latency        p50 {} ms, p99 {} ms, max {} ms (steps 2..{}: one LLM call + one tool call, both committed)",
        pct(&latencies, 0.50),
        pct(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0),
        args.steps()
    );
    println!(
        "first step          p50 {} ms, p99 {} ms (submit to first tool result, including the wait for a free worker)",
        pct(&first_steps, 0.50),
        pct(&first_steps, 0.99)
    );
    println!(
        "llm call wait       p50 {} ms, p99 {} ms (due to answered, less the model's latency: a free worker, the rate limit)",
        pct(&llm_waits, 0.50),
        pct(&llm_waits, 0.99)
    );
    if let Some(rpm) = args.rpm {
        let arrivals = mock.counters.llm_arrivals();
        let throttled = mock.counters.llm_throttled.load(Ordering::Relaxed);
        if let (Some(fitted), Some(first), Some(last)) =
            (arrival_rate(&arrivals), arrivals.first(), arrivals.last())
        {
            let achieved = fitted * 60.0;
            let span = last.duration_since(*first).as_secs_f64();
            let ends = (arrivals.len() - 1) as f64 * 60.0 / span.max(1e-9);
            println!(
                "rate limit          {achieved:.0} requests/min achieved against {rpm} ({:+.2}%; fitted to every arrival, first to last alone: {ends:.0}), {throttled} refused by the provider",
                (achieved / rpm as f64 - 1.0) * 100.0
            );
        }
    }
    println!("peak rss            {:.1} MB", rss_kb as f64 / 1024.0);
    if completed != args.runs() {
        bail!("{} runs did not complete", args.runs() - completed);
    }
    Ok(rate)
}

/// The rate of `arrivals` (sorted), per second: the slope of the
/// least-squares line through (arrival time, arrival number). The rate from
/// the first arrival to the last alone hangs on those two: one call that
/// arrives late (a cold connection, a stalled process) moved it by 4.5% in
/// a 9 s bench, while the rate the calls kept did not change. `None` for
/// fewer than two arrivals or all at one instant.
fn arrival_rate(arrivals: &[Instant]) -> Option<f64> {
    let first = *arrivals.first()?;
    if arrivals.len() < 2 {
        return None;
    }
    let n = arrivals.len() as f64;
    let times: Vec<f64> = arrivals
        .iter()
        .map(|a| a.duration_since(first).as_secs_f64())
        .collect();
    let mean_time = times.iter().sum::<f64>() / n;
    let mean_number = (n - 1.0) / 2.0;
    let (mut covariance, mut variance) = (0.0, 0.0);
    for (number, time) in times.iter().enumerate() {
        covariance += (time - mean_time) * (number as f64 - mean_number);
        variance += (time - mean_time) * (time - mean_time);
    }
    (variance > 0.0).then(|| covariance / variance)
}

fn pct(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// User + system CPU time of a process, `self` or a pid (from /proc; Linux
/// ticks are 10 ms).
fn cpu_time(pid: &str) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// CPU time of every PostgreSQL server process on this machine (zero if
/// the database is elsewhere or /proc cannot be read). Backends that exit
/// during the round take their time with them, so this is a lower bound.
fn database_cpu_time() -> Duration {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    let mut total = Duration::ZERO;
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim_end() == "postgres" {
            total += cpu_time(pid);
        }
    }
    total
}

/// Busy and total CPU ticks of the whole machine, and its number of cores.
#[derive(Clone, Copy)]
struct MachineTicks {
    busy: u64,
    total: u64,
    cores: usize,
}

impl MachineTicks {
    /// The share of the machine that was busy since `start`, and its cores.
    fn since(self, start: Option<MachineTicks>) -> Option<(f64, usize)> {
        let start = start?;
        let total = self.total.checked_sub(start.total).filter(|t| *t > 0)?;
        let busy = self.busy.saturating_sub(start.busy);
        Some((busy as f64 / total as f64, self.cores))
    }
}

/// The machine's CPU ticks so far, from /proc/stat.
fn machine_ticks() -> Option<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal: idle and iowait are not busy.
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    let cores = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count();
    Some(MachineTicks {
        busy: total.saturating_sub(idle),
        total,
        cores,
    })
}

/// Peak resident set size in kB (VmHWM) of a process, `self` or a pid.
fn peak_rss_kb(pid: &str) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
