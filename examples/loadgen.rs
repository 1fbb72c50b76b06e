//! Load generator for the broker (and for the floor, `examples/floor.rs`).
//!
//! `cargo run --release --example loadgen -- --rpc get-current-aal --concurrency 64 --duration 10s`
//!
//! It signs its sessions in first, through the broker and the CIS2 simulator (StartLogin, follow
//! the authorization URL with `login_hint`, ExchangeCode), then runs `--concurrency` callers
//! for `--duration` and prints ops/s, p50/p90/p99/max latency and error counts by
//! `ErrorInfo.reason`, per `--report-every` interval and for the whole run. The last line,
//! `RESULT ...`, is for scripts. Loopback only: it refuses any other address.
//!
//! With `--target RPC,ADDR[,PID]` given more than once, it measures several targets in one run
//! (the benchmark: the floor and the broker's hot RPCs): the callers run each target's RPC in
//! turn for `--phase`, so every target is measured across the same seconds and a drift of the
//! machine falls on all of them alike. It then prints one `RESULT` line per target.

#[path = "common/floor_pb.rs"]
mod floor_pb;

use cis2_session_broker::grpc::pb;
use cis2_session_broker::grpc::pb::session_broker_client::SessionBrokerClient;
use clap::{Parser, ValueEnum};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use url::Url;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Rpc {
    GetCurrentAal,
    GetSession,
    /// GetPdsToken, served from the broker's cache (each session's token is fetched once first).
    GetPdsToken,
    /// A whole sign-in: StartLogin, the simulator's authorization endpoint, ExchangeCode.
    Login,
    /// The floor's one RPC (`examples/floor.rs`).
    Floor,
    /// 60% GetCurrentAal, 25% GetSession, 14% GetPdsToken, 1% sign-ins.
    Mixed,
}

#[derive(Parser)]
struct Args {
    /// The broker's (or the floor's) gRPC address.
    #[arg(long, env = "BROKER_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// The caller's bearer token (`session-broker dev` prints one).
    #[arg(long, env = "BROKER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[arg(long, value_enum, required_unless_present = "targets")]
    rpc: Option<Rpc>,
    /// Measure several targets in one run, taking turns (`RPC,ADDR[,PID]`, PID as for
    /// `--cpu-of`; e.g. `floor,http://127.0.0.1:7000,4242`). Replaces `--rpc`, `--addr` and
    /// `--cpu-of`.
    #[arg(long = "target", value_parser = TargetSpec::parse, conflicts_with_all = ["rpc", "report_every"])]
    targets: Vec<TargetSpec>,
    /// With several targets: how long each one runs before the next one's turn. The first tenth
    /// of a turn is not measured, so the calls of the previous turn have drained.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "500ms")]
    phase: Duration,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Run this long before measuring (connections, caches, allocator).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    warmup: Duration,
    /// Print a line of figures per interval (the soak test uses 60s); default: only the total.
    #[arg(long, value_parser = humantime::parse_duration)]
    report_every: Option<Duration>,
    /// Sessions to sign in before the run; the callers share them round-robin.
    #[arg(long, default_value_t = 32)]
    sessions: usize,
    /// HTTP/2 connections the callers share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// The redirect URI the broker is configured with; sign-ins stop when they reach it.
    #[arg(
        long,
        env = "BENCH_CALLBACK",
        default_value = "http://127.0.0.1:8080/dev/callback"
    )]
    callback: String,
    /// The simulator's test user to sign in.
    #[arg(long, default_value = "656005750107")]
    login_hint: String,
    /// Stop after this many operations in all, whatever the duration.
    #[arg(long, default_value_t = 50_000_000)]
    max_ops: u64,
    /// When GetPdsToken answers SESSION_INVALID (the ID token and APIM token have both run
    /// out, by design), sign that session in again as a real client would; counted as
    /// `renewed`, not as an error. The soak test turns this on.
    #[arg(long)]
    renew_sessions: bool,
    /// Print this process's VmRSS with every report (the soak test passes the broker's pid).
    #[arg(long)]
    watch_pid: Option<u32>,
    /// Report the CPU time this process (the server: the benchmark passes its pid) spent over
    /// the measured window, per call: a cost that depends far less than ops/s on what else
    /// runs on the machine's cores.
    #[arg(long)]
    cpu_of: Option<u32>,
    /// Print `measuring` to stderr when the measured window begins (scripts/instructions.sh
    /// starts counting the server's instructions then).
    #[arg(long)]
    announce: bool,
}

type Client = SessionBrokerClient<InterceptedService<Channel, Bearer>>;

/// Adds the caller's bearer token to every call.
#[derive(Clone)]
struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// One interval's figures.
#[derive(Default)]
struct Window {
    /// Latencies of successful calls, microseconds.
    micros: Vec<u32>,
    errors: BTreeMap<String, u64>,
    /// Sessions signed in again after GetPdsToken said SESSION_INVALID (`--renew-sessions`).
    renewed: u64,
}

impl Window {
    fn merge(&mut self, other: Window) {
        self.micros.extend(other.micros);
        self.renewed += other.renewed;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

/// What to measure: an RPC, where, and whose CPU time to count for it.
#[derive(Clone, Debug)]
struct TargetSpec {
    rpc: Rpc,
    addr: String,
    cpu_of: Option<u32>,
}

impl TargetSpec {
    fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let (Some(rpc), Some(addr)) = (parts.next(), parts.next()) else {
            return Err("expected RPC,ADDR[,PID]".into());
        };
        let rpc = Rpc::from_str(rpc, true)?;
        let cpu_of = match parts.next() {
            Some(pid) => Some(pid.parse().map_err(|_| format!("{pid:?} is not a pid"))?),
            None => None,
        };
        if parts.next().is_some() {
            return Err("expected RPC,ADDR[,PID]".into());
        }
        Ok(TargetSpec {
            rpc,
            addr: addr.to_owned(),
            cpu_of,
        })
    }
}

/// Everything a caller needs to run one target's RPC.
struct Target {
    rpc: Rpc,
    cpu_of: Option<u32>,
    clients: Vec<Client>,
    /// The same connections, for the timed unary calls (`unary`).
    raw: Vec<Raw>,
    sessions: Sessions,
    args: Arc<Args>,
}

type Raw = tonic::client::Grpc<InterceptedService<Channel, Bearer>>;

/// What the timed calls decode their answers into: every field is read and skipped. The load
/// generator shares the machine's cores with what it measures, so building the answer (a
/// whole `Session` for GetSession, one byte string for the floor) would charge the RPCs
/// differently for work done on the client's side.
#[derive(Clone, PartialEq, prost::Message)]
struct Discard {}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Arc::new(Args::parse());
    let specs = match args.rpc {
        Some(rpc) => vec![TargetSpec {
            rpc,
            addr: args.addr.clone(),
            cpu_of: args.cpu_of,
        }],
        None => args.targets.clone(),
    };
    let mut targets = Vec::new();
    for spec in specs {
        let target = connect(spec, args.clone()).await?;
        prepare(&target).await?;
        targets.push(target);
    }
    let targets = Arc::new(targets);
    let figures = run(targets.clone()).await;
    for (target, figures) in targets.iter().zip(figures) {
        report_total(target, figures);
    }
    Ok(())
}

async fn connect(spec: TargetSpec, args: Arc<Args>) -> Result<Target, Box<dyn std::error::Error>> {
    let uri: tonic::codegen::http::Uri = spec.addr.parse()?;
    let loopback = matches!(
        uri.host(),
        Some("127.0.0.1" | "localhost" | "[::1]" | "::1")
    );
    if !loopback {
        return Err(format!(
            "{}: the load generator runs against loopback only",
            spec.addr
        )
        .into());
    }
    let bearer = Bearer(match &args.token {
        Some(t) => Some(format!("Bearer {t}").parse()?),
        None => None,
    });
    let mut clients = Vec::new();
    let mut raw = Vec::new();
    for _ in 0..args.connections.max(1) {
        let channel = Channel::from_shared(spec.addr.clone())?.connect().await?;
        clients.push(SessionBrokerClient::with_interceptor(
            channel.clone(),
            bearer.clone(),
        ));
        // The floor gets the same `authorization` header: equal requests on the wire.
        raw.push(tonic::client::Grpc::new(InterceptedService::new(
            channel,
            bearer.clone(),
        )));
    }
    Ok(Target {
        rpc: spec.rpc,
        cpu_of: spec.cpu_of,
        clients,
        raw,
        sessions: Sessions::default(),
        args,
    })
}

/// Signs the sessions in and fills the PDS token cache, so the measured calls find both ready.
async fn prepare(target: &Target) -> Result<(), Box<dyn std::error::Error>> {
    if target.rpc == Rpc::Floor {
        return Ok(());
    }
    let started = Instant::now();
    let mut sessions = Vec::new();
    for i in 0..target.args.sessions.max(1) {
        let client = target.clients[i % target.clients.len()].clone();
        let token = sign_in(client.clone(), &target.args)
            .await
            .map_err(|e| format!("signing session {i} in: {e}"))?;
        if matches!(target.rpc, Rpc::GetPdsToken | Rpc::Mixed) {
            pds_token(client, &token)
                .await
                .map_err(|s| format!("first GetPdsToken: {}", reason(&s)))?;
        }
        sessions.push(token);
    }
    eprintln!(
        "signed in {} sessions in {:.1?}",
        sessions.len(),
        started.elapsed()
    );
    target.sessions.set_once(sessions);
    Ok(())
}

/// A target's signed-in sessions, set once before the run; `--renew-sessions` replaces one
/// whose sign-in has run out.
#[derive(Default)]
struct Sessions(std::sync::OnceLock<Vec<Mutex<String>>>);
impl Sessions {
    fn set_once(&self, s: Vec<String>) {
        let _ = self.0.set(s.into_iter().map(Mutex::new).collect());
    }
    fn get(&self, i: usize) -> String {
        match self.0.get() {
            Some(v) if !v.is_empty() => v[i % v.len()]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            _ => String::new(),
        }
    }
    fn replace(&self, i: usize, token: String) {
        if let Some(v) = self.0.get().filter(|v| !v.is_empty()) {
            *v[i % v.len()].lock().unwrap_or_else(|p| p.into_inner()) = token;
        }
    }
}

/// A whole sign-in through the simulator; returns the new session token.
async fn sign_in(mut client: Client, args: &Args) -> Result<String, String> {
    let started = client
        .start_login(pb::StartLoginRequest {
            redirect_uri: args.callback.clone(),
            required_aal: pb::Aal::Aal2.into(),
            ..Default::default()
        })
        .await
        .map_err(|s| reason(&s))?
        .into_inner();
    let (code, state, iss) = authorize(&started.authorization_url, args).await?;
    let exchanged = client
        .exchange_code(pb::ExchangeCodeRequest {
            state,
            code,
            iss,
            ..Default::default()
        })
        .await
        .map_err(|s| reason(&s))?
        .into_inner();
    Ok(exchanged.session_token)
}

/// Plays the browser: follows redirects from the authorization URL, with `login_hint` so the
/// simulator signs the user in at once, until the callback; returns its code, state and iss.
async fn authorize(
    authorization_url: &str,
    args: &Args,
) -> Result<(String, String, String), String> {
    static HTTP: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let http = HTTP.get_or_init(|| {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default()
    });
    let mut url = Url::parse(authorization_url).map_err(|_| "AUTHORIZATION_URL_INVALID")?;
    url.query_pairs_mut()
        .append_pair("login_hint", &args.login_hint);
    for _ in 0..8 {
        if url.as_str().starts_with(&args.callback) {
            let mut out = (String::new(), String::new(), String::new());
            for (k, v) in url.query_pairs() {
                match k.as_ref() {
                    "code" => out.0 = v.into_owned(),
                    "state" => out.1 = v.into_owned(),
                    "iss" => out.2 = v.into_owned(),
                    "error" => return Err(format!("IDP_ERROR_{v}")),
                    _ => {}
                }
            }
            return Ok(out);
        }
        let resp = http
            .get(url.clone())
            .send()
            .await
            .map_err(|_| "SIMULATOR_UNREACHABLE")?;
        let location = resp
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .ok_or_else(|| format!("SIMULATOR_NO_REDIRECT_{}", resp.status().as_u16()))?;
        url = url.join(location).map_err(|_| "SIMULATOR_BAD_REDIRECT")?;
    }
    Err("SIMULATOR_TOO_MANY_REDIRECTS".into())
}

async fn pds_token(mut client: Client, session: &str) -> Result<(), tonic::Status> {
    client
        .get_pds_token(pb::GetPdsTokenRequest {
            session_token: session.to_owned(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

/// The error's `ErrorInfo.reason`, or its gRPC code when it carries none (the floor's).
fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_else(|| format!("{:?}", status.code()))
}

/// One call of the chosen RPC; `n` picks the session and, in the mix, the RPC.
async fn call_once(target: &Target, worker: usize, n: u64) -> Result<Done, String> {
    let conn = worker % target.clients.len();
    let slot = worker + n as usize;
    let session = target.sessions.get(slot);
    let session = session.as_str();
    let rpc = match target.rpc {
        Rpc::Mixed => match (n.wrapping_mul(2654435761) >> 7) % 100 {
            0 => Rpc::Login,
            1..=14 => Rpc::GetPdsToken,
            15..=39 => Rpc::GetSession,
            _ => Rpc::GetCurrentAal,
        },
        other => other,
    };
    let raw = target.raw[conn].clone();
    let session_token = session.to_owned();
    let result = match rpc {
        Rpc::GetCurrentAal => {
            let req = pb::GetCurrentAalRequest { session_token };
            unary(raw, "/session_broker.v1.SessionBroker/GetCurrentAal", req).await
        }
        Rpc::GetSession => {
            let req = pb::GetSessionRequest { session_token };
            unary(raw, "/session_broker.v1.SessionBroker/GetSession", req).await
        }
        Rpc::GetPdsToken => {
            let req = pb::GetPdsTokenRequest {
                session_token,
                ..Default::default()
            };
            unary(raw, "/session_broker.v1.SessionBroker/GetPdsToken", req).await
        }
        Rpc::Login => {
            let client = target.clients[conn].clone();
            return sign_in(client, &target.args).await.map(|_| Done::Called);
        }
        Rpc::Floor => {
            // Shaped like a session token, so the request is the broker's size.
            let req = floor_pb::GetRequest {
                key: "cis2sb_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
            };
            unary(raw, floor_pb::GET_PATH, req).await
        }
        Rpc::Mixed => unreachable!("the mix picked a single RPC above"),
    };
    match result.map_err(|s| reason(&s)) {
        Ok(()) => Ok(Done::Called),
        Err(r)
            if r == "SESSION_INVALID" && rpc == Rpc::GetPdsToken && target.args.renew_sessions =>
        {
            let fresh = sign_in(target.clients[conn].clone(), &target.args).await?;
            target.sessions.replace(slot, fresh);
            Ok(Done::Renewed)
        }
        Err(r) => Err(r),
    }
}

/// What a successful call did.
enum Done {
    Called,
    /// Signed its session in again (`--renew-sessions`): not timed.
    Renewed,
}

/// One unary call whose answer is read whole and skipped ([`Discard`]).
async fn unary<Req>(mut grpc: Raw, path: &'static str, req: Req) -> Result<(), tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
{
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    grpc.unary::<_, Discard, _>(
        tonic::Request::new(req),
        path,
        tonic_prost::ProstCodec::default(),
    )
    .await
    .map(|_| ())
}

/// When each target runs, and which calls are measured. With one target: every call from the
/// end of the warm-up. With n targets, target k runs in turns k, k + n, k + 2n, ... of
/// `--phase` each, and a call is measured when it starts after the first tenth of its turn.
#[derive(Clone, Copy)]
struct Schedule {
    start: Instant,
    measure_from: Instant,
    end: Instant,
    phase: Duration,
    settle: Duration,
    targets: usize,
}

impl Schedule {
    fn new(args: &Args, targets: usize, start: Instant) -> Self {
        let measure_from = start + args.warmup;
        let end = measure_from + args.duration;
        let (phase, settle) = if targets > 1 {
            let phase = args.phase.max(Duration::from_millis(10));
            (phase, phase / 10)
        } else {
            // One turn, the whole run.
            ((end - start).max(Duration::from_nanos(1)), Duration::ZERO)
        };
        Schedule {
            start,
            measure_from,
            end,
            phase,
            settle,
            targets: targets.max(1),
        }
    }

    /// The target whose turn it is at `t`, and whether a call starting then is measured.
    fn at(&self, t: Instant) -> (usize, bool) {
        let since = t.saturating_duration_since(self.start).as_nanos();
        let phase = self.phase.as_nanos();
        let target = ((since / phase) % self.targets as u128) as usize;
        let measured =
            t >= self.measure_from && t < self.end && since % phase >= self.settle.as_nanos();
        (target, measured)
    }

    /// The measured part of every turn, `(target, from, to)`, in time order.
    fn spans(self) -> impl Iterator<Item = (usize, Instant, Instant)> {
        (0u64..)
            .map(move |k| {
                let begin = self.start
                    + Duration::from_nanos(k.saturating_mul(self.phase.as_nanos() as u64));
                (k, begin)
            })
            .take_while(move |(_, begin)| *begin < self.end)
            .filter_map(move |(k, begin)| {
                let from = (begin + self.settle).max(self.measure_from);
                let to = (begin + self.phase).min(self.end);
                (from < to).then_some(((k % self.targets as u64) as usize, from, to))
            })
    }

    /// How long `target` was measured, for a run whose callers stopped at `stopped`.
    fn measured(self, target: usize, stopped: Instant) -> Duration {
        self.spans()
            .filter(|(t, _, _)| *t == target)
            .map(|(_, from, to)| to.min(stopped).saturating_duration_since(from))
            .sum()
    }
}

/// A target's measured figures: per interval (index 0 first), over what time, at what CPU cost.
struct Figures {
    windows: Vec<Window>,
    measured: Duration,
    /// CPU time of the target's `--cpu-of` process over its measured spans.
    cpu_nanos: Option<u64>,
}

/// Runs the callers, taking turns between the targets; returns each target's figures.
async fn run(targets: Arc<Vec<Target>>) -> Vec<Figures> {
    let args = targets[0].args.clone();
    let n = targets.len();
    let schedule = Schedule::new(&args, n, Instant::now());
    let (measure_from, end) = (schedule.measure_from, schedule.end);
    let every = args
        .report_every
        .unwrap_or(args.duration)
        .max(Duration::from_millis(100));
    let intervals = args.duration.as_micros().div_ceil(every.as_micros()).max(1) as usize;
    // windows[target][interval]
    let windows: Arc<Mutex<Vec<Vec<Window>>>> = Arc::new(Mutex::new(
        (0..n)
            .map(|_| (0..intervals).map(|_| Window::default()).collect())
            .collect(),
    ));
    if args.announce {
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            eprintln!("measuring");
        });
    }
    let pids: Vec<Option<u32>> = targets.iter().map(|t| t.cpu_of).collect();
    let clock = tokio::spawn(cpu_per_target(schedule, pids));
    let budget = Arc::new(std::sync::atomic::AtomicU64::new(args.max_ops));
    let reporter = tokio::spawn(report_intervals(
        windows.clone(),
        measure_from,
        every,
        intervals,
        args.watch_pid,
    ));
    let mut tasks = Vec::new();
    for worker in 0..args.concurrency.max(1) {
        let targets = targets.clone();
        let windows = windows.clone();
        let budget = budget.clone();
        tasks.push(tokio::spawn(async move {
            let mut local: Vec<Window> = (0..n).map(|_| Window::default()).collect();
            let mut local_index = 0usize;
            let mut calls = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end
                    || budget
                        .fetch_update(
                            std::sync::atomic::Ordering::Relaxed,
                            std::sync::atomic::Ordering::Relaxed,
                            |b| b.checked_sub(1),
                        )
                        .is_err()
                {
                    break;
                }
                let (target, measured) = schedule.at(t0);
                let outcome = call_once(&targets[target], worker, calls).await;
                calls += 1;
                if !measured {
                    continue;
                }
                let index = ((t0 - measure_from).as_micros() / every.as_micros()) as usize;
                let index = index.min(intervals - 1);
                if index != local_index {
                    flush(&windows, local_index, &mut local);
                    local_index = index;
                }
                let w = &mut local[target];
                match outcome {
                    Ok(Done::Renewed) => w.renewed += 1,
                    Ok(Done::Called) => w
                        .micros
                        .push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX)),
                    Err(reason) => *w.errors.entry(reason).or_default() += 1,
                }
            }
            flush(&windows, local_index, &mut local);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    reporter.abort();
    let stopped = Instant::now();
    // A run cut short by --max-ops has no CPU figure: its last span was never closed.
    let cpu = if stopped >= end {
        clock.await.unwrap_or_else(|_| vec![None; n])
    } else {
        clock.abort();
        vec![None; n]
    };
    let windows = std::mem::take(&mut *windows.lock().unwrap_or_else(|p| p.into_inner()));
    windows
        .into_iter()
        .zip(cpu)
        .enumerate()
        .map(|(target, (windows, cpu_nanos))| Figures {
            windows,
            measured: schedule.measured(target, stopped),
            cpu_nanos,
        })
        .collect()
}

/// The CPU time each target's process spent in that target's measured spans.
async fn cpu_per_target(schedule: Schedule, pids: Vec<Option<u32>>) -> Vec<Option<u64>> {
    let mut totals: Vec<Option<u64>> = pids.iter().map(|p| p.map(|_| 0)).collect();
    for (target, from, to) in schedule.spans() {
        let Some(pid) = pids[target] else { continue };
        tokio::time::sleep_until(from.into()).await;
        let before = cpu_nanos(pid);
        tokio::time::sleep_until(to.into()).await;
        totals[target] = match (totals[target], before, cpu_nanos(pid)) {
            (Some(sum), Some(before), Some(after)) => Some(sum + after.saturating_sub(before)),
            _ => None,
        };
    }
    totals
}

/// CPU time a process has used so far, in nanoseconds: the sum of its threads' schedstat.
fn cpu_nanos(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Adds a caller's figures for one interval to the shared ones, and empties them.
fn flush(windows: &Mutex<Vec<Vec<Window>>>, index: usize, local: &mut [Window]) {
    let mut w = windows.lock().unwrap_or_else(|p| p.into_inner());
    for (target, figures) in local.iter_mut().enumerate() {
        if let Some(slot) = w.get_mut(target).and_then(|t| t.get_mut(index)) {
            slot.merge(std::mem::take(figures));
        }
    }
}

/// Prints each interval once the callers have moved past it (they flush on crossing it). Only
/// a run of one target has intervals (`--report-every` excludes `--target`).
async fn report_intervals(
    windows: Arc<Mutex<Vec<Vec<Window>>>>,
    measure_from: Instant,
    every: Duration,
    intervals: usize,
    pid: Option<u32>,
) {
    if intervals < 2 {
        return;
    }
    for i in 0..intervals - 1 {
        // A little after the next interval began, so every caller has flushed this one.
        let at = measure_from + every * (i as u32 + 1) + Duration::from_millis(500);
        tokio::time::sleep_until(at.into()).await;
        let mut w = windows.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = w.first_mut().and_then(|t| t.get_mut(i)) {
            let line = summary(slot, every);
            println!("interval {:>3} {line}{}", i + 1, rss_note(pid));
        }
    }
}

fn rss_note(pid: Option<u32>) -> String {
    match pid.and_then(vm_kib) {
        Some((rss, hwm)) => format!(" rss_kib={rss} hwm_kib={hwm}"),
        None => String::new(),
    }
}

/// VmRSS and VmHWM of a process, KiB.
fn vm_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// `ops_per_s=… p50_us=… p90_us=… p99_us=… max_us=… ok=… errors=… [reason=count …]`
fn summary(w: &mut Window, over: Duration) -> String {
    w.micros.sort_unstable();
    let pct = |p: f64| -> u32 {
        if w.micros.is_empty() {
            return 0;
        }
        let rank = ((p / 100.0) * w.micros.len() as f64).ceil() as usize;
        w.micros[rank.clamp(1, w.micros.len()) - 1]
    };
    let errors: u64 = w.errors.values().sum();
    let ops = (w.micros.len() as u64 + errors) as f64 / over.as_secs_f64().max(1e-9);
    let mut line = format!(
        "ops_per_s={ops:.0} p50_us={} p90_us={} p99_us={} max_us={} ok={} errors={errors}",
        pct(50.0),
        pct(90.0),
        pct(99.0),
        w.micros.last().copied().unwrap_or(0),
        w.micros.len(),
    );
    if w.renewed > 0 {
        line.push_str(&format!(" renewed={}", w.renewed));
    }
    for (reason, count) in &w.errors {
        line.push_str(&format!(" {reason}={count}"));
    }
    line
}

fn report_total(target: &Target, figures: Figures) {
    let mut total = Window::default();
    for w in figures.windows {
        total.merge(w);
    }
    let calls = total.micros.len() as u64 + total.errors.values().sum::<u64>();
    let cpu = match figures.cpu_nanos {
        Some(nanos) if calls > 0 => {
            format!(" cpu_us_per_call={:.1}", nanos as f64 / 1e3 / calls as f64)
        }
        _ => String::new(),
    };
    let line = summary(&mut total, figures.measured);
    println!(
        "RESULT rpc={:?} concurrency={} {line}{cpu}{}",
        target.rpc,
        target.args.concurrency,
        rss_note(target.args.watch_pid)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["loadgen", "--warmup", "1s", "--duration", "4s"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).expect("the test's arguments are valid")
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn one_target_is_measured_from_the_warm_up_to_the_end() {
        let t0 = Instant::now();
        let s = Schedule::new(&args(&["--rpc", "get-current-aal"]), 1, t0);
        assert_eq!(s.at(t0 + MS(999)), (0, false));
        assert_eq!(s.at(t0 + MS(1000)), (0, true));
        assert_eq!(s.at(t0 + MS(4999)), (0, true));
        assert_eq!(s.at(t0 + MS(5000)), (0, false));
        let spans: Vec<_> = s.spans().collect();
        assert_eq!(spans, vec![(0, t0 + MS(1000), t0 + MS(5000))]);
        assert_eq!(s.measured(0, t0 + MS(9000)), MS(4000));
        // Cut short by --max-ops: measured until the callers stopped.
        assert_eq!(s.measured(0, t0 + MS(3000)), MS(2000));
    }

    #[test]
    fn targets_take_turns_and_the_start_of_a_turn_is_not_measured() {
        let t0 = Instant::now();
        let spec = ["--target", "floor,http://127.0.0.1:1"];
        let s = Schedule::new(&args(&[spec[0], spec[1], "--phase", "500ms"]), 4, t0);
        // Turn 3 (1.5 s to 2 s) is target 3's; its first 50 ms settle.
        assert_eq!(s.at(t0 + MS(1520)), (3, false));
        assert_eq!(s.at(t0 + MS(1550)), (3, true));
        assert_eq!(s.at(t0 + MS(2000)), (0, false));
        assert_eq!(s.at(t0 + MS(2499)), (0, true));
        // Turns in the warm-up are not measured.
        assert_eq!(s.at(t0 + MS(700)), (1, false));
        // Turns 2 to 9 fall in the measured 4 s: two for each target, 450 ms measured of each.
        let spans: Vec<_> = s.spans().collect();
        assert_eq!(spans.len(), 8);
        assert_eq!(spans[0], (2, t0 + MS(1050), t0 + MS(1500)));
        for target in 0..4 {
            assert_eq!(s.measured(target, t0 + MS(5000)), MS(900));
        }
    }

    #[test]
    fn targets_are_rpc_address_and_an_optional_pid() {
        let t = TargetSpec::parse("get-pds-token,http://127.0.0.1:50051,42").expect("valid");
        assert_eq!(
            (t.rpc, t.addr.as_str(), t.cpu_of),
            (Rpc::GetPdsToken, "http://127.0.0.1:50051", Some(42))
        );
        let t = TargetSpec::parse("floor,http://127.0.0.1:7000").expect("valid");
        assert_eq!((t.rpc, t.cpu_of), (Rpc::Floor, None));
        for bad in [
            "floor",
            "nope,http://127.0.0.1:1",
            "floor,http://127.0.0.1:1,x",
            "floor,a,1,2",
        ] {
            assert!(TargetSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
