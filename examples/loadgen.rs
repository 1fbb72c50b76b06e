//! Load generator for the broker (and for the floor, `examples/floor.rs`).
//!
//! `cargo run --release --example loadgen -- --rpc get-current-aal --concurrency 64 --duration 10s`
//!
//! It signs its sessions in first, through the broker and the CIS2 simulator (StartLogin, follow
//! the authorization URL with `login_hint`, ExchangeCode), then runs `--concurrency` callers
//! for `--duration` and prints ops/s, p50/p90/p99/max latency and error counts by
//! `ErrorInfo.reason`, per `--report-every` interval and for the whole run. The last line,
//! `RESULT ...`, is for scripts. Loopback only: it refuses any other address.

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
    #[arg(long, value_enum)]
    rpc: Rpc,
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

/// Everything a caller needs to run its RPC.
struct Target {
    clients: Vec<Client>,
    /// The same connections, for the timed unary calls (`unary`).
    raw: Vec<Raw>,
    args: Args,
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
    let args = Args::parse();
    let target = Arc::new(connect(args).await?);
    prepare(&target).await?;
    let totals = run(target.clone()).await;
    report_total(&target.args, &totals);
    Ok(())
}

async fn connect(args: Args) -> Result<Target, Box<dyn std::error::Error>> {
    let uri: tonic::codegen::http::Uri = args.addr.parse()?;
    let loopback = matches!(
        uri.host(),
        Some("127.0.0.1" | "localhost" | "[::1]" | "::1")
    );
    if !loopback {
        return Err(format!(
            "{}: the load generator runs against loopback only",
            args.addr
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
        let channel = Channel::from_shared(args.addr.clone())?.connect().await?;
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
    Ok(Target { clients, raw, args })
}

/// Signs the sessions in and fills the PDS token cache, so the measured calls find both ready.
async fn prepare(target: &Arc<Target>) -> Result<(), Box<dyn std::error::Error>> {
    if target.args.rpc == Rpc::Floor {
        return Ok(());
    }
    let started = Instant::now();
    let mut sessions = Vec::new();
    for i in 0..target.args.sessions.max(1) {
        let client = target.clients[i % target.clients.len()].clone();
        let token = sign_in(client.clone(), &target.args)
            .await
            .map_err(|e| format!("signing session {i} in: {e}"))?;
        if matches!(target.args.rpc, Rpc::GetPdsToken | Rpc::Mixed) {
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
    SESSIONS.set_once(sessions);
    Ok(())
}

/// The signed-in sessions, set once before the run; `--renew-sessions` replaces one whose
/// sign-in has run out.
struct Sessions(std::sync::OnceLock<Vec<Mutex<String>>>);
static SESSIONS: Sessions = Sessions(std::sync::OnceLock::new());
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
    let session = SESSIONS.get(slot);
    let session = session.as_str();
    let rpc = match target.args.rpc {
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
            SESSIONS.replace(slot, fresh);
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

/// Runs the callers; returns the measured figures per interval (index 0 first).
async fn run(target: Arc<Target>) -> Vec<Window> {
    let args = &target.args;
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let every = args
        .report_every
        .unwrap_or(args.duration)
        .max(Duration::from_millis(100));
    let intervals = args.duration.as_micros().div_ceil(every.as_micros()).max(1) as usize;
    let windows: Arc<Mutex<Vec<Window>>> = Arc::new(Mutex::new(
        (0..intervals).map(|_| Window::default()).collect(),
    ));
    let cpu_at_start = args.cpu_of.map(|pid| {
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            cpu_nanos(pid)
        })
    });
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
        let target = target.clone();
        let windows = windows.clone();
        let budget = budget.clone();
        tasks.push(tokio::spawn(async move {
            let mut local = Window::default();
            let mut local_index = 0usize;
            let mut n = 0u64;
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
                let outcome = call_once(&target, worker, n).await;
                n += 1;
                if t0 < measure_from {
                    continue;
                }
                let index = ((t0 - measure_from).as_micros() / every.as_micros()) as usize;
                let index = index.min(intervals - 1);
                if index != local_index {
                    flush(&windows, local_index, std::mem::take(&mut local));
                    local_index = index;
                }
                match outcome {
                    Ok(Done::Renewed) => local.renewed += 1,
                    Ok(Done::Called) => local
                        .micros
                        .push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX)),
                    Err(reason) => *local.errors.entry(reason).or_default() += 1,
                }
            }
            flush(&windows, local_index, local);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    reporter.abort();
    // Every call counted started in the window and has ended by now.
    if let (Some(pid), Some(start)) = (args.cpu_of, cpu_at_start)
        && let (Ok(Some(before)), Some(after)) = (start.await, cpu_nanos(pid))
    {
        CPU_NANOS.get_or_init(|| after.saturating_sub(before));
    }
    let measured = Instant::now().saturating_duration_since(measure_from);
    // A run cut short by --max-ops is measured over the time it took.
    MEASURED.get_or_init(|| measured.min(args.duration));
    std::mem::take(&mut *windows.lock().unwrap_or_else(|p| p.into_inner()))
}

static MEASURED: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
/// CPU time of `--cpu-of` over the measured window.
static CPU_NANOS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// CPU time a process has used so far, in nanoseconds: the sum of its threads' schedstat.
fn cpu_nanos(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

fn flush(windows: &Mutex<Vec<Window>>, index: usize, local: Window) {
    let mut w = windows.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(slot) = w.get_mut(index) {
        slot.merge(local);
    }
}

/// Prints each interval once the callers have moved past it (they flush on crossing it).
async fn report_intervals(
    windows: Arc<Mutex<Vec<Window>>>,
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
        if let Some(slot) = w.get_mut(i) {
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

fn report_total(args: &Args, windows: &[Window]) {
    let mut total = Window::default();
    for w in windows {
        total.merge(Window {
            micros: w.micros.clone(),
            errors: w.errors.clone(),
            renewed: w.renewed,
        });
    }
    let over = MEASURED.get().copied().unwrap_or(args.duration);
    let calls = total.micros.len() as u64 + total.errors.values().sum::<u64>();
    let cpu = match CPU_NANOS.get() {
        Some(nanos) if calls > 0 => {
            format!(" cpu_us_per_call={:.1}", *nanos as f64 / 1e3 / calls as f64)
        }
        _ => String::new(),
    };
    let line = summary(&mut total, over);
    println!(
        "RESULT rpc={:?} concurrency={} {line}{cpu}{}",
        args.rpc,
        args.concurrency,
        rss_note(args.watch_pid)
    );
}
