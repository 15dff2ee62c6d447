//! Losing the database: while runs are in flight on PostgreSQL, every
//! session of the database is terminated again and again (as a PgBouncer
//! restart, a failover or a network blip does: write, read and LISTEN
//! connections alike), then the database refuses connections for a few
//! seconds; and, through a proxy, connections are cut right after they
//! send a COMMIT (committed, but the worker never hears it). No process
//! dies: each must reconnect by itself, lose no step, repeat no call beyond
//! its journaled starts, strand no task under its lease, answer the API
//! with a success or a clear 503 meanwhile (never hang), and hear other
//! processes' commits through NOTIFY again afterwards. And through a proxy
//! that black-holes every connection (nothing passes, nothing closes, as a
//! network dropping packets does), then lets them through again; or leaves
//! them silent for good and refuses new ones for a while, then lets new
//! ones through (a failover whose old node vanished without a word): each
//! process notices within its `--database-timeout`, not the ~15 minutes
//! TCP takes to give up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use keel::mock::Mock;
use serde_json::{Value, json};
use sqlx::PgConnection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::support::*;

/// How long an idle worker sleeps before looking for work unasked
/// (`keel_engine::Options::poll`): a wake-up well under it came from NOTIFY.
const POLL: Duration = Duration::from_secs(1);

/// Tool steps of each run (`tools:8`: eight tool steps, then the answer).
const TOOL_STEPS: usize = 8;

/// The server's clock, in seconds since the epoch.
async fn server_clock(admin: &mut PgConnection) -> f64 {
    sqlx::query_scalar("SELECT extract(epoch FROM clock_timestamp())::float8")
        .fetch_one(admin)
        .await
        .expect("clock")
}

/// LISTEN sessions on database `name` opened after `since` (server clock).
async fn listening_since(admin: &mut PgConnection, name: &str, since: f64) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = $1 AND application_name = 'keel-listen' \
           AND query ILIKE 'LISTEN%' AND extract(epoch FROM backend_start) > $2",
    )
    .bind(name)
    .bind(since)
    .fetch_one(admin)
    .await
    .expect("listening sessions")
}

/// What a request made while the database was cut off got back: its
/// status (none: no answer at all), its body and how long it took.
struct Probe {
    what: &'static str,
    status: Option<u16>,
    body: String,
    took: Duration,
}

/// Idempotency keys submitted, with the run id each got (none when refused).
type Keys = Vec<(String, Option<String>)>;

/// Reads a run and submits one (with an idempotency key) again and again
/// until `stop`: every answer, and the keys submitted.
fn prober(
    api: String,
    read: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<Probe>, Keys)> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .expect("client");
        let mut probes = Vec::new();
        let mut keys = Vec::new();
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let answer = http.get(format!("{api}/v1/runs/{read}")).send().await;
            probes.push(Probe::of("read", answer, started).await);

            let key = format!("probe-{i}");
            let started = Instant::now();
            let answer = http
                .post(format!("{api}/v1/runs"))
                .header("idempotency-key", &key)
                .json(&json!({"agent": "steady", "input": format!("probe {i}")}))
                .send()
                .await;
            let probe = Probe::of("submit", answer, started).await;
            let id = (probe.status == Some(202))
                .then(|| serde_json::from_str::<Value>(&probe.body).ok())
                .flatten()
                .and_then(|body| body["id"].as_str().map(str::to_string));
            keys.push((key, id));
            probes.push(probe);
            i += 1;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        (probes, keys)
    })
}

impl Probe {
    async fn of(
        what: &'static str,
        answer: reqwest::Result<reqwest::Response>,
        started: Instant,
    ) -> Probe {
        let (status, body) = match answer {
            Ok(r) => (
                Some(r.status().as_u16()),
                r.text().await.unwrap_or_default(),
            ),
            Err(e) => (None, e.to_string()),
        };
        Probe {
            what,
            status,
            body,
            took: started.elapsed(),
        }
    }
}

/// Every run completed every step, and no call reached the tool server more
/// often than the journal says it was started; every journal is contiguous,
/// from its submit to its one end. Returns how many calls were repeated.
async fn assert_all_done(
    http: &reqwest::Client,
    api: &Server,
    mock: &Mock,
    ids: &[String],
    within: Duration,
) -> usize {
    let deadline = Instant::now() + within;
    let mut views = Vec::new();
    for id in ids {
        let left = deadline.saturating_duration_since(Instant::now());
        views.push(wait_terminal(http, api, id, left).await);
    }
    let calls = mock.counters.key_counts();
    let mut repeated = 0;
    for (id, run) in ids.iter().zip(&views) {
        repeated += check_tool_steps(id, run, TOOL_STEPS, &calls);
    }
    assert_eq!(
        calls.len(),
        ids.len() * TOOL_STEPS,
        "a call of a run that does not exist"
    );

    type Journal = Vec<(i64, String, Value)>;
    let journals: Vec<(String, Journal)> = futures_util::stream::iter(ids)
        .map(|id| {
            let http = http.clone();
            let url = api.url(&format!("/v1/runs/{id}/events"));
            async move { (id.clone(), sse(&http, &url, None).await) }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for (id, events) in &journals {
        let seqs: Vec<i64> = events.iter().map(|e| e.0).collect();
        assert_eq!(
            seqs,
            (1..=events.len() as i64).collect::<Vec<_>>(),
            "journal of {id}"
        );
        assert_eq!(events.first().map(|e| e.1.as_str()), Some("run_submitted"));
        assert_eq!(events.last().map(|e| e.1.as_str()), Some("run_completed"));
        let ends = events.iter().filter(|e| e.1 == "run_completed").count();
        assert_eq!(ends, 1, "journal of {id}");
    }
    repeated
}

/// Asserts that no process died or panicked.
fn assert_alive<'a>(servers: impl IntoIterator<Item = &'a mut Server>) {
    for server in servers {
        let log = std::fs::read_to_string(&server.log).unwrap_or_default();
        assert!(
            matches!(server.child.try_wait(), Ok(None)),
            "a process died; log: {log}"
        );
        assert!(!log.contains("panicked"), "{log}");
    }
}

/// The `host:port` of the database `url` names, for a proxy to reach.
fn upstream(url: &str) -> String {
    use std::str::FromStr;
    let options = sqlx::postgres::PgConnectOptions::from_str(url).expect("url");
    format!("{}:{}", options.get_host(), options.get_port())
}

/// `url` through a proxy on `port` of 127.0.0.1, in plain text (so the
/// proxy sees the protocol).
fn through(url: &str, port: u16) -> String {
    use sqlx::ConnectOptions;
    use std::str::FromStr;
    sqlx::postgres::PgConnectOptions::from_str(url)
        .expect("url")
        .host("127.0.0.1")
        .port(port)
        .ssl_mode(sqlx::postgres::PgSslMode::Disable)
        .to_url_lossy()
        .to_string()
}

/// An API process and two worker processes (8 workers each, leases of
/// `lease`) on the store `store` names, with the `steady` agent
/// (`TOOL_STEPS` tool steps) registered.
async fn steady_cluster(
    dir: &TempDir,
    mock: &Mock,
    store: &[&str],
    lease: &str,
) -> (Server, Vec<Server>) {
    let api = Server::start(&dir.db(), &[store, &["--role", "api"]].concat()).await;
    let worker = [
        store,
        &["--role", "worker", "--workers", "8", "--lease", lease],
    ]
    .concat();
    let workers = vec![
        Server::start(&dir.db(), &worker).await,
        Server::start(&dir.db(), &worker).await,
    ];
    let tools = format!("tools:{TOOL_STEPS}");
    let yaml = agent_yaml("steady", mock, &tools, "echo", "");
    register(&reqwest::Client::new(), &api, &yaml).await;
    (api, workers)
}

/// Every probe was answered within `within` with a success or a 503
/// `unavailable`, and at least one met `what` (else nothing was tested):
/// how many were refused.
fn check_probes(probes: &[Probe], within: Duration, what: &str) -> usize {
    let mut refused = 0;
    for probe in probes {
        let status = probe.status.unwrap_or_else(|| {
            panic!("{} got no answer: {}", probe.what, probe.body);
        });
        assert!(probe.took < within, "{} took {:?}", probe.what, probe.took);
        if status < 300 {
            continue;
        }
        refused += 1;
        assert_eq!(status, 503, "{}: {}", probe.what, probe.body);
        let body: Value = serde_json::from_str(&probe.body).expect("a JSON error");
        assert_eq!(body["error"]["code"], "unavailable", "{body}");
    }
    assert!(refused > 0, "no request met {what}: nothing was tested");
    refused
}

/// Submits each probe again with its idempotency key (`keys`: the key and
/// the run it got, if it was accepted): an accepted one gets the same run
/// back. The runs' ids.
async fn resubmit(
    http: &reqwest::Client,
    api: &Server,
    keys: &[(String, Option<String>)],
) -> Vec<String> {
    let mut ids = Vec::with_capacity(keys.len());
    for (i, (key, accepted)) in keys.iter().enumerate() {
        // The pool may still be reconnecting: a 503 says to come back
        // (Retry-After), as a client would.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let r = loop {
            let r = http
                .post(api.url("/v1/runs"))
                .header("idempotency-key", key)
                .json(&json!({"agent": "steady", "input": format!("probe {i}")}))
                .send()
                .await
                .expect("submit again");
            if r.status() != 503 || tokio::time::Instant::now() > deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 202, "{body}");
        let id = body["id"].as_str().expect("id").to_string();
        if let Some(accepted) = accepted {
            assert_eq!(&id, accepted, "key {key} made two runs");
        }
        ids.push(id);
    }
    ids
}

#[tokio::test]
async fn runs_survive_their_database_connections_being_killed_and_refused() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let mut admin = db.admin().await;
    let mock = Mock::start().await.expect("mock");
    mock.counters.llm_latency_ms.store(40, Ordering::Relaxed);
    let dir = TempDir::new();
    // An API process and two worker processes: the workers learn of
    // submits only through NOTIFY (or their poll). Their 60 s lease
    // outlasts the test: a task left under a live process's lease would
    // show as runs finishing late.
    let (api, mut workers) = steady_cluster(&dir, &mock, &["--database-url", &db.url], "60s").await;
    let http = reqwest::Client::new();
    let mut ids = submit_many(&http, &api, "steady", 150).await;
    let stop = Arc::new(AtomicBool::new(false));
    let probes = prober(api.url.clone(), ids[0].clone(), stop.clone());

    // Six rounds of killing every session, the LISTEN ones included.
    wait_tool_calls(&mock, 100, Duration::from_secs(30)).await;
    for _ in 0..6 {
        let (killed, listening) = db.terminate_sessions(&mut admin).await;
        assert!(killed > 0, "no session to kill");
        assert!(listening > 0, "no LISTEN session among {killed}");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // Then the database refuses connections for three seconds.
    db.allow_connections(&mut admin, false).await;
    db.terminate_sessions(&mut admin).await;
    let at_outage = mock.counters.tool_requests.load(Ordering::Relaxed);
    let total_calls = (ids.len() * TOOL_STEPS) as u64;
    assert!(
        at_outage < total_calls * 3 / 4,
        "the outage came too late to test anything ({at_outage} tool calls of {total_calls})"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    db.allow_connections(&mut admin, true).await;
    let back = Instant::now();
    let back_clock = server_clock(&mut admin).await;
    stop.store(true, Ordering::Relaxed);

    // Work goes on without any process restarting, and every process
    // listens again on a new session.
    let before = mock.counters.tool_requests.load(Ordering::Relaxed);
    wait_tool_calls(&mock, before + 1, Duration::from_secs(20)).await;
    let resumed = back.elapsed();
    let deadline = Instant::now() + Duration::from_secs(15);
    while listening_since(&mut admin, db.name(), back_clock).await < 3 {
        assert!(Instant::now() < deadline, "a process does not listen again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listening = back.elapsed();

    // Every request made meanwhile was answered, in bounded time, with a
    // success or a 503 saying the database is unavailable.
    let (probes, keys) = probes.await.expect("prober");
    let refused = check_probes(&probes, Duration::from_secs(12), "the outage");

    // A submit refused meanwhile is made again with its key; one accepted
    // meanwhile gets the same run back.
    ids.extend(resubmit(&http, &api, &keys).await);

    // Every run completes, well before a lease left behind would expire.
    let repeated = assert_all_done(&http, &api, &mock, &ids, Duration::from_secs(40)).await;
    let all_done = back.elapsed();

    // Runs submitted now are started at once, not at the next poll.
    let mut starts = Vec::new();
    for i in 0..5 {
        let before = mock.counters.llm_requests.load(Ordering::Relaxed);
        let submitted = Instant::now();
        let id = submit(&http, &api, "steady", &format!("late {i}")).await;
        while mock.counters.llm_requests.load(Ordering::Relaxed) == before {
            assert!(submitted.elapsed() < 2 * POLL, "run {i} never started");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        starts.push(submitted.elapsed());
        wait_terminal(&http, &api, &id, Duration::from_secs(10)).await;
    }
    for start in &starts {
        assert!(
            *start < POLL / 4,
            "a run waited {start:?} to start: {starts:?}"
        );
    }
    let mut api = api;
    assert_alive(std::iter::once(&mut api).chain(&mut workers));
    eprintln!(
        "outage: {} requests ({refused} refused, slowest {:?}); after the database came back: \
         work resumed in {resumed:?}, every process listened again in {listening:?}, \
         {} runs done in {all_done:?}; {repeated} calls repeated; runs started {starts:?} \
         after their submit",
        probes.len(),
        probes.iter().map(|p| p.took).max().unwrap_or_default(),
        ids.len(),
    );
}

/// The bytes of a simple-protocol `COMMIT` (`Query` message).
const COMMIT: &[u8] = b"Q\x00\x00\x00\x0bCOMMIT\x00";

/// A TCP proxy in front of PostgreSQL that, when armed, cuts a client's
/// connection right after passing on its `COMMIT`, and lets the server
/// answer it: the transaction commits, the client never hears of it.
struct Cutter {
    port: u16,
    /// Commits still to cut.
    armed: Arc<AtomicU32>,
    /// Commits cut so far.
    cut: Arc<AtomicU32>,
    accept: tokio::task::JoinHandle<()>,
}

impl Cutter {
    async fn start(upstream: String) -> Cutter {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let armed = Arc::new(AtomicU32::new(0));
        let cut = Arc::new(AtomicU32::new(0));
        let (a, c) = (armed.clone(), cut.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if let Ok(server) = TcpStream::connect(&upstream).await {
                    tokio::spawn(relay(client, server, a.clone(), c.clone()));
                }
            }
        });
        Cutter {
            port,
            armed,
            cut,
            accept,
        }
    }

    /// Cuts the next connection that commits.
    async fn cut_next_commit(&self) {
        let before = self.cut.load(Ordering::SeqCst);
        self.armed.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.cut.load(Ordering::SeqCst) == before {
            assert!(Instant::now() < deadline, "no commit to cut");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Cutter {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Writes what a read of `buf` got to `to`: its length, or `None` once
/// either side is closed.
async fn forward(
    read: std::io::Result<usize>,
    buf: &[u8],
    to: &mut tokio::net::tcp::OwnedWriteHalf,
) -> Option<usize> {
    let n = read.ok().filter(|n| *n > 0)?;
    to.write_all(&buf[..n]).await.ok()?;
    Some(n)
}

/// Passes bytes both ways until either side closes, or a `COMMIT` is cut.
async fn relay(client: TcpStream, server: TcpStream, armed: Arc<AtomicU32>, cut: Arc<AtomicU32>) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let mut up = vec![0u8; 64 * 1024];
    let mut down = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            read = from_client.read(&mut up) => {
                let Some(n) = forward(read, &up, &mut to_server).await else {
                    return;
                };
                let commits = up[..n].windows(COMMIT.len()).any(|w| w == COMMIT);
                let take = |left: u32| left.checked_sub(1);
                if commits && armed.fetch_update(Ordering::SeqCst, Ordering::SeqCst, take).is_ok() {
                    break;
                }
            }
            read = from_server.read(&mut down) => {
                if forward(read, &down, &mut to_client).await.is_none() {
                    return;
                }
            }
        }
    }
    // The client hears nothing more; the server reads the COMMIT and
    // answers (into the void) before its connection closes.
    drop((from_client, to_client));
    let _ = tokio::time::timeout(Duration::from_secs(2), from_server.read(&mut down)).await;
    cut.fetch_add(1, Ordering::SeqCst);
}

#[tokio::test]
async fn runs_survive_commits_whose_answer_is_lost() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let mock = Mock::start().await.expect("mock");
    mock.counters.llm_latency_ms.store(40, Ordering::Relaxed);
    let dir = TempDir::new();
    // The worker reaches the database through the cutter (in plain text,
    // so it can see the COMMITs); the API directly.
    let cutter = Cutter::start(upstream(&db.url)).await;
    let proxied = through(&db.url, cutter.port);
    let mut api = Server::start(&dir.db(), &["--database-url", &db.url, "--role", "api"]).await;
    // A short lease: a task whose claim was cut is this worker's without
    // its knowing, until the lease expires.
    let worker = [
        "--database-url",
        &proxied,
        "--role",
        "worker",
        "--workers",
        "8",
        "--lease",
        "4s",
    ];
    let mut worker = Server::start(&dir.db(), &worker).await;
    let http = reqwest::Client::new();
    let tools = format!("tools:{TOOL_STEPS}");
    register(
        &http,
        &api,
        &agent_yaml("steady", &mock, &tools, "echo", ""),
    )
    .await;
    let ids = submit_many(&http, &api, "steady", 60).await;

    // Five of the worker's commits go through unheard, while most of the
    // work is still to do.
    wait_tool_calls(&mock, 30, Duration::from_secs(30)).await;
    for _ in 0..5 {
        cutter.cut_next_commit().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let at_last_cut = mock.counters.tool_requests.load(Ordering::Relaxed);
    let total_calls = (ids.len() * TOOL_STEPS) as u64;
    assert!(
        at_last_cut < total_calls * 3 / 4,
        "the cuts came too late to test anything ({at_last_cut} tool calls of {total_calls})"
    );
    let cut = Instant::now();
    let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
    assert!(
        log.contains("commit failed, its outcome is unknown"),
        "the worker never saw a commit cut: {log}"
    );

    let repeated = assert_all_done(&http, &api, &mock, &ids, Duration::from_secs(40)).await;
    let all_done = cut.elapsed();
    assert_alive([&mut api, &mut worker]);
    eprintln!(
        "cut commits: {} runs done {all_done:?} after the last cut; {repeated} calls repeated",
        ids.len()
    );
}

/// What the network between Keel and PostgreSQL does (see [`Blackhole`]).
#[derive(Clone, Copy, Debug)]
struct Net {
    /// Nothing passes.
    down: bool,
    /// New connections are closed at once.
    refuse: bool,
    /// Only the connections opened since this many failovers pass.
    generation: u32,
}

impl Net {
    /// Whether the bytes of a connection opened at `generation` pass.
    fn passes(&self, generation: u32) -> bool {
        !self.down && generation == self.generation
    }
}

/// A TCP proxy in front of PostgreSQL that can black-hole its connections:
/// while down, no byte passes either way and no socket closes, so neither
/// end hears a word (new connections are accepted, and hang as well).
/// Then the network comes back ([`Blackhole::up`]: what was held passes,
/// as TCP retransmits it). Or the node behind it vanishes
/// ([`Blackhole::fail_over`]): its connections stay silent for good, new
/// ones are refused until another takes its place ([`Blackhole::promote`]).
struct Blackhole {
    port: u16,
    net: watch::Sender<Net>,
    accept: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    async fn start(upstream: String) -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (net, _) = watch::channel(Net {
            down: false,
            refuse: false,
            generation: 0,
        });
        let watched = net.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Net {
                    refuse, generation, ..
                } = *watched.borrow();
                if refuse {
                    drop(client);
                    continue;
                }
                if let Ok(server) = TcpStream::connect(&upstream).await {
                    tokio::spawn(pass(client, server, generation, watched.subscribe()));
                }
            }
        });
        Blackhole { port, net, accept }
    }

    /// Stops every byte, closing nothing.
    fn down(&self) {
        self.net.send_modify(|net| net.down = true);
    }

    /// Lets every connection's bytes through again.
    fn up(&self) {
        self.net.send_modify(|net| net.down = false);
    }

    /// The node vanishes: its connections stay silent for good, new ones
    /// are refused.
    fn fail_over(&self) {
        self.net.send_modify(|net| {
            net.down = false;
            net.refuse = true;
            net.generation += 1;
        });
    }

    /// Another node takes the old one's place: new connections pass.
    fn promote(&self) {
        self.net.send_modify(|net| net.refuse = false);
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Passes bytes both ways while the network lets this connection's through,
/// until either side closes.
async fn pass(
    client: TcpStream,
    server: TcpStream,
    generation: u32,
    mut net: watch::Receiver<Net>,
) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let mut up = vec![0u8; 64 * 1024];
    let mut down = vec![0u8; 64 * 1024];
    loop {
        if net.wait_for(|net| net.passes(generation)).await.is_err() {
            return;
        }
        // Reading a socket is cancel-safe: a change of the network stops
        // the reads without losing a byte.
        tokio::select! {
            read = from_client.read(&mut up) => {
                if forward(read, &up, &mut to_server).await.is_none() {
                    return;
                }
            }
            read = from_server.read(&mut down) => {
                if forward(read, &down, &mut to_client).await.is_none() {
                    return;
                }
            }
            _ = net.changed() => {}
        }
    }
}

/// Whether a process's log says it gave up on a silent connection.
fn saw_silence(server: &Server, what: &str) -> bool {
    std::fs::read_to_string(&server.log)
        .unwrap_or_default()
        .contains(what)
}

#[tokio::test]
async fn runs_survive_a_network_that_drops_packets_silently() {
    /// Each process's `--database-timeout`.
    const TIMEOUT: Duration = Duration::from_secs(2);
    /// How long each black hole lasts: three deadlines.
    const HOLE: Duration = Duration::from_secs(6);

    let Some(db) = PgDb::create().await else {
        return;
    };
    let mut admin = db.admin().await;
    let mock = Mock::start().await.expect("mock");
    mock.counters.llm_latency_ms.store(40, Ordering::Relaxed);
    let dir = TempDir::new();
    // Every process reaches the database through the black hole.
    let hole = Blackhole::start(upstream(&db.url)).await;
    let proxied = through(&db.url, hole.port);
    let timeout = format!("{}s", TIMEOUT.as_secs());
    // A short lease: a task whose claim's answer was lost is this worker's
    // without its knowing until the lease expires.
    let store = ["--database-url", &proxied, "--database-timeout", &timeout];
    let (api, mut workers) = steady_cluster(&dir, &mock, &store, "4s").await;
    let http = reqwest::Client::new();
    let mut ids = submit_many(&http, &api, "steady", 60).await;
    wait_tool_calls(&mock, 30, Duration::from_secs(30)).await;

    // The network goes silent for three deadlines, then comes back: the
    // bytes held meanwhile pass (a COMMIT sent into the hole may commit
    // after its writer gave up on it).
    let stop = Arc::new(AtomicBool::new(false));
    let probes = prober(api.url.clone(), ids[0].clone(), stop.clone());
    hole.down();
    let at_first_hole = mock.counters.tool_requests.load(Ordering::Relaxed);
    tokio::time::sleep(HOLE).await;
    hole.up();
    let before = mock.counters.tool_requests.load(Ordering::Relaxed);
    wait_tool_calls(&mock, before + 1, Duration::from_secs(20)).await;

    // It goes silent again, and this time the old connections never come
    // back (the old node is gone), new ones are refused for a while, then
    // go through to its successor.
    hole.fail_over();
    tokio::time::sleep(HOLE).await;
    let cut_clock = server_clock(&mut admin).await;
    hole.promote();
    let back = Instant::now();
    let total_calls = (ids.len() * TOOL_STEPS) as u64;
    assert!(
        at_first_hole < total_calls / 2,
        "the black hole came too late to test anything ({at_first_hole} tool calls of {total_calls})"
    );

    // Every process notices its LISTEN session went silent and listens on
    // a new one (after a ping's deadline, then a connect refused until the
    // failover ended, then a reconnect's backoff of up to 5 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    while listening_since(&mut admin, db.name(), cut_clock).await < 3 {
        assert!(
            Instant::now() < deadline,
            "a process does not listen again after the failover"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listening = back.elapsed();
    stop.store(true, Ordering::Relaxed);

    // Every request made meanwhile was answered within a few deadlines,
    // with a success or a 503.
    let (probes, keys) = probes.await.expect("prober");
    let refused = check_probes(&probes, 5 * TIMEOUT, "the black hole");
    ids.extend(resubmit(&http, &api, &keys).await);

    // Every run completes, no step lost, no call repeated beyond its
    // journaled starts.
    let repeated = assert_all_done(&http, &api, &mock, &ids, Duration::from_secs(40)).await;
    let all_done = back.elapsed();

    // Runs submitted now are started at once, through NOTIFY.
    for i in 0..3 {
        let before = mock.counters.llm_requests.load(Ordering::Relaxed);
        let submitted = Instant::now();
        let id = submit(&http, &api, "steady", &format!("late {i}")).await;
        while mock.counters.llm_requests.load(Ordering::Relaxed) == before {
            assert!(
                submitted.elapsed() < POLL / 2,
                "run {i} waited for a poll to start"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        wait_terminal(&http, &api, &id, Duration::from_secs(10)).await;
    }

    // The deadlines are what noticed: writes, pool reads and listeners.
    let all: Vec<&Server> = std::iter::once(&api).chain(&workers).collect();
    for what in [
        "dropping the write connection",
        "listen connection stopped answering",
    ] {
        assert!(
            all.iter().any(|server| saw_silence(server, what)),
            "no process logged `{what}`"
        );
    }
    let mut api = api;
    assert_alive(std::iter::once(&mut api).chain(&mut workers));
    eprintln!(
        "black hole: {} requests ({refused} refused, slowest {:?}); after the failover every \
         process listened again in {listening:?}, {} runs done in {all_done:?}; {repeated} calls \
         repeated",
        probes.len(),
        probes.iter().map(|p| p.took).max().unwrap_or_default(),
        ids.len(),
    );
}
