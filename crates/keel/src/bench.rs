//! `keel bench`: the engine on the embedded store against an in-process
//! OpenAI-compatible mock LLM and an HTTP tool (both over real loopback HTTP),
//! many runs at once. Prints durable steps per second (one step = one LLM call
//! plus one tool call, both journaled), CPU time per step, step latency
//! percentiles, wall time and peak RSS.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use keel_core::run::Status;
use keel_core::{Agent, Event};
use keel_engine::{Engine, Options};
use keel_store::{RunFilter, Store};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::mock::Mock;
use crate::service::{Service, Submit};

/// `keel bench` options.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Runs to submit at once.
    #[arg(long, default_value_t = 1000)]
    pub runs: usize,
    /// Tool steps per run (each run also makes one final LLM call).
    #[arg(long, default_value_t = 10)]
    pub steps: u32,
    /// Latency of every mock LLM answer (e.g. 1s).
    #[arg(long, default_value = "0ms", value_parser = keel_core::spec::human_duration::parse)]
    pub llm_latency: Duration,
    /// Tasks executed at once (default: 128, or every run at once when the LLM is slow).
    #[arg(long)]
    pub workers: Option<usize>,
    /// SQLite file to use (default: a fresh file in the temp folder, removed after).
    #[arg(long)]
    pub db: Option<PathBuf>,
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.runs == 0 || args.steps == 0 {
        bail!("--runs and --steps must be at least 1");
    }
    let mock = Mock::start()
        .await
        .context("cannot start the mock servers")?;
    mock.counters
        .llm_latency_ms
        .store(args.llm_latency.as_millis() as u64, Ordering::Relaxed);
    let temp = args.db.is_none();
    let db = args.db.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("keel-bench-{}.db", uuid::Uuid::now_v7()))
    });
    let embedded = crate::embedded::open(&db).await?;
    let store = embedded.store.clone();
    let svc = Service::new(store.clone());

    let spec = json!({
        "name": "bench",
        "version": "1",
        "model": {"provider": "openai", "model": format!("tools:{}", args.steps), "base_url": mock.llm_url(), "timeout": "60s"},
        "tools": [{
            "name": "echo",
            "description": "Echoes its arguments.",
            "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
            "http": {"url": mock.tool_url("echo"), "method": "POST"}
        }],
        "limits": {"max_steps": args.steps + 1}
    });
    let agent = Agent::from_value(spec)?;
    svc.register(&agent).await?;

    let workers = args.workers.unwrap_or(if args.llm_latency.is_zero() {
        128
    } else {
        args.runs + 16
    });
    let engine = Engine::new(
        store.clone(),
        Options {
            workers,
            ..Options::default()
        },
    );
    let cancel = CancellationToken::new();
    let pool = tokio::spawn(engine.run(cancel.clone()));

    println!(
        "keel bench: {} runs x {} tool steps, llm latency {:?}, {} workers, SQLite WAL synchronous=FULL at {}",
        args.runs,
        args.steps,
        args.llm_latency,
        workers,
        db.display()
    );
    let cpu_start = cpu_time();
    let started = Instant::now();
    let submits = futures_util::stream::iter(0..args.runs)
        .map(|i| {
            let svc = svc.clone();
            async move {
                svc.submit(Submit {
                    agent: "bench".into(),
                    version: Some("1".into()),
                    input: json!(format!("task {i}")),
                    idempotency_key: None,
                })
                .await
            }
        })
        .buffer_unordered(1024)
        .collect::<Vec<_>>()
        .await;
    let mut ids = Vec::with_capacity(args.runs);
    for s in submits {
        ids.push(s.map_err(|e| anyhow::anyhow!("submit failed: {e}"))?.run_id);
    }
    let submitted_in = started.elapsed();

    // Wait until every run is over.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = count_terminal(&store).await?;
        if done >= args.runs {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {done} of {} runs finished in 10 minutes", args.runs);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let wall = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_start);
    cancel.cancel();
    let _ = pool.await;

    // Figures from the journal itself.
    let mut latencies = Vec::new();
    let mut first_steps = Vec::new();
    let mut completed = 0;
    let mut first = i64::MAX;
    let mut last = i64::MIN;
    for id in &ids {
        let events = store.events(*id, 0, u32::MAX).await?;
        let mut boundary = None;
        for r in &events {
            match &r.event {
                Event::RunSubmitted { .. } => {
                    boundary = Some(r.at);
                    first = first.min(r.at);
                }
                Event::ToolCallCompleted { step, .. } => {
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
    let steps = args.runs as u64 * args.steps as u64;
    let journal_wall = Duration::from_millis((last - first).max(1) as u64);
    let keys = mock.counters.key_counts();
    let repeated = keys.values().filter(|n| **n > 1).count();
    println!("runs completed      {completed} / {}", args.runs);
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
        args.runs
    );
    println!(
        "wall time           {:.3} s (first submit to last completion: {:.3} s)",
        wall.as_secs_f64(),
        journal_wall.as_secs_f64()
    );
    println!(
        "throughput          {:.0} steps/s",
        steps as f64 / journal_wall.as_secs_f64()
    );
    println!(
        "cpu                 {:.3} ms per step ({:.2} s of CPU; includes the in-process mock servers)",
        cpu.as_secs_f64() * 1000.0 / steps as f64,
        cpu.as_secs_f64()
    );
    println!(
        "step latency        p50 {} ms, p99 {} ms, max {} ms (steps 2..{}: one LLM call + one tool call, both committed)",
        pct(&latencies, 0.50),
        pct(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0),
        args.steps
    );
    println!(
        "first step          p50 {} ms, p99 {} ms (submit to first tool result, including the wait for a free worker)",
        pct(&first_steps, 0.50),
        pct(&first_steps, 0.99)
    );
    println!(
        "peak rss            {:.1} MB",
        peak_rss_kb() as f64 / 1024.0
    );

    drop(embedded);
    if temp {
        for suffix in ["", "-wal", "-shm", ".lock"] {
            let mut p = db.as_os_str().to_owned();
            p.push(suffix);
            let _ = std::fs::remove_file(PathBuf::from(p));
        }
    }
    if completed != args.runs {
        bail!("{} runs did not complete", args.runs - completed);
    }
    Ok(())
}

async fn count_terminal<S: Store>(store: &S) -> anyhow::Result<usize> {
    let mut total = 0;
    for status in [Status::Completed, Status::Failed, Status::Cancelled] {
        let mut before = None;
        loop {
            let page = store
                .list_runs(RunFilter {
                    tenant: keel_core::ids::DEFAULT_TENANT.into(),
                    status: Some(status),
                    agent: None,
                    before,
                    limit: 500,
                })
                .await?;
            total += page.len();
            if page.len() < 500 {
                break;
            }
            before = page.last().map(|r| r.id);
        }
    }
    Ok(total)
}

fn pct(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// User + system CPU time of this process (from /proc; Linux ticks are 10 ms).
fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
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

/// Peak resident set size in kB (VmHWM).
fn peak_rss_kb() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
