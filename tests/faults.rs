//! Fault tests: what callers see while a dependency is down, and that the broker recovers by
//! itself. A private `redis-server` per Redis test (stopped, frozen and restarted under load),
//! the CIS2 simulator with discovery and JWKS down, and the APIM simulator slow or failing.
//! Every wait is bounded: a broken broker fails these tests, it never hangs them.

mod common;

use cis2_session_broker::config::Pattern;
use cis2_session_broker::grpc::pb;
use cis2_session_broker::sim::{ApimFault, Fault};
use common::*;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long Redis stays down in the outage tests.
const OUTAGE: Duration = Duration::from_millis(1500);
/// The broker must serve normally again this soon after Redis answers.
const RECOVERY: Duration = Duration::from_secs(2);
/// Load keeps running this long after Redis is back, so calls exist past [`RECOVERY`].
const AFTER_RECOVERY: Duration = Duration::from_secs(3);
/// A per-call deadline: a call that hangs fails the test instead of stalling it.
const CALL_DEADLINE: Duration = Duration::from_secs(5);

/// A `redis-server` of this test's own on a fixed port, so it can be restarted at the same
/// address the broker was configured with.
struct PrivateRedis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start() -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let dir =
            std::env::temp_dir().join(format!("sb-faults-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let mut redis = PrivateRedis {
            port,
            dir,
            child: None,
        };
        redis.launch();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (or restarts) the server on the same port and directory; returns once it answers.
    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers() {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
            return false;
        };
        redis::cmd("PING").query::<String>(&mut conn).is_ok()
    }

    /// `SHUTDOWN SAVE`: a clean stop that writes the data set, which the next start loads.
    fn shutdown_keeping_data(&mut self) {
        let client = redis::Client::open(self.url()).expect("redis URL");
        let mut conn = client.get_connection().expect("redis answers");
        // The server closes the connection instead of replying: an error here is success.
        let _ = redis::cmd("SHUTDOWN").arg("SAVE").query::<()>(&mut conn);
        self.wait_exit();
    }

    /// SIGKILL: the data set is lost with the process.
    fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
        }
        self.wait_exit();
    }

    fn wait_exit(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// SIGSTOP / SIGCONT: Redis hangs with every connection open, as a stalled host would.
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("redis is running").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} {pid}");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // SIGKILL ends a stopped process too.
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outage {
    /// Stopped cleanly and restarted with its data.
    RestartKeepingData,
    /// Killed and restarted empty.
    RestartLosingData,
    /// Frozen (SIGSTOP) and thawed: every command times out, then the same server answers.
    Freeze,
}

/// One call of the load: when it started and ended, and its reason ("OK" when it succeeded).
#[derive(Debug)]
struct Outcome {
    started: Instant,
    ended: Instant,
    reason: String,
}

async fn get_current_aal(client: &Client, token: &str) -> Result<(), tonic::Status> {
    let mut req = tonic::Request::new(pb::GetCurrentAalRequest {
        session_token: token.into(),
    });
    req.set_timeout(CALL_DEADLINE);
    client.clone().get_current_aal(req).await.map(|_| ())
}

/// `workers` loops of GetCurrentAal over `tokens` until `stop`, each outcome recorded.
fn run_load(
    client: &Client,
    tokens: &[String],
    workers: usize,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinSet<Vec<Outcome>> {
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        let client = client.clone();
        let tokens = tokens.to_vec();
        let stop = stop.clone();
        set.spawn(async move {
            let mut outcomes = Vec::new();
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let reason = match get_current_aal(&client, &tokens[i % tokens.len()]).await {
                    Ok(()) => "OK".to_owned(),
                    Err(status) => reason(&status),
                };
                outcomes.push(Outcome {
                    started,
                    ended: Instant::now(),
                    reason,
                });
                i += 1;
                // Refused connections fail fast: pace the loop so it does not starve the broker.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            outcomes
        });
    }
    set
}

async fn redis_outage_under_load(outage: Outage) {
    let mut redis = PrivateRedis::start();
    let h = Harness::start_with(Options {
        redis_url: Some(redis.url()),
        ..Options::default()
    })
    .await;
    let mut tokens = Vec::new();
    for uid in [SMARTCARD_AND_PASSKEY, PASSKEY_ONLY, SMARTCARD_ONLY] {
        let ex = h
            .sign_in(pb::Aal::Aal2, uid, None)
            .await
            .expect("signed in while Redis is up");
        tokens.push(ex.session_token);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut load = run_load(&h.client, &tokens, 8, &stop);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let down_at = Instant::now();
    match outage {
        Outage::RestartKeepingData => redis.shutdown_keeping_data(),
        Outage::RestartLosingData => redis.kill(),
        Outage::Freeze => redis.signal("-STOP"),
    }
    tokio::time::sleep(OUTAGE).await;
    // Redis may answer any moment from here on.
    let restoring_at = Instant::now();
    match outage {
        Outage::RestartKeepingData | Outage::RestartLosingData => {
            redis = tokio::task::spawn_blocking(move || {
                redis.launch();
                redis
            })
            .await
            .expect("restart task");
        }
        Outage::Freeze => redis.signal("-CONT"),
    }
    let back_at = Instant::now();
    tokio::time::sleep(AFTER_RECOVERY).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    while let Some(worker) = load.join_next().await {
        outcomes.extend(worker.expect("load worker"));
    }

    // Calls wholly inside the outage: STORE_UNAVAILABLE, and nothing else but success. (A call
    // still waiting when Redis returns answers from the restarted server.)
    let during: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.started > down_at && o.ended < restoring_at)
        .collect();
    assert!(
        during.iter().any(|o| o.reason == "STORE_UNAVAILABLE"),
        "{outage:?}: the outage was never seen by a caller"
    );
    let odd: Vec<&&Outcome> = during
        .iter()
        .filter(|o| o.reason != "STORE_UNAVAILABLE" && o.reason != "OK")
        .collect();
    assert!(odd.is_empty(), "{outage:?}: during the outage: {odd:?}");

    // Once Redis is back, within RECOVERY: full service (or, where Redis lost the sessions,
    // SESSION_INVALID: failing closed on sessions that no longer exist).
    let want_after = if outage == Outage::RestartLosingData {
        "SESSION_INVALID"
    } else {
        "OK"
    };
    let settled = back_at + RECOVERY;
    let after: Vec<&Outcome> = outcomes.iter().filter(|o| o.started >= settled).collect();
    assert!(!after.is_empty(), "{outage:?}: no calls after recovery");
    let wrong: Vec<&&Outcome> = after.iter().filter(|o| o.reason != want_after).collect();
    assert!(
        wrong.is_empty(),
        "{outage:?}: {} of {} calls more than {RECOVERY:?} after Redis came back were not {want_after}: {:?}",
        wrong.len(),
        after.len(),
        wrong.first()
    );
    // Between the two windows nothing but the same outcomes and STORE_UNAVAILABLE.
    let unexpected: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.reason != "OK" && o.reason != "STORE_UNAVAILABLE" && o.reason != want_after)
        .collect();
    assert!(unexpected.is_empty(), "{outage:?}: {unexpected:?}");

    // The store works for new sign-ins too.
    let ex = h
        .sign_in(pb::Aal::Aal2, SMARTCARD_AND_PASSKEY, None)
        .await
        .expect("a new sign-in after the outage");
    h.current_aal(&ex.session_token)
        .await
        .expect("and its session is readable");
    if outage == Outage::RestartLosingData {
        let err = h
            .current_aal(&tokens[0])
            .await
            .expect_err("the session Redis lost is gone");
        assert_eq!(reason(&err), "SESSION_INVALID");
    } else {
        for token in &tokens {
            h.current_aal(token)
                .await
                .expect("a session Redis kept is still valid");
        }
    }
    h.stop().await;
    // Only now: the broker must not see Redis vanish while it shuts down.
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_with_its_data_only_store_unavailable_then_the_same_sessions() {
    redis_outage_under_load(Outage::RestartKeepingData).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_empty_only_store_unavailable_then_session_invalid() {
    redis_outage_under_load(Outage::RestartLosingData).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_times_out_as_store_unavailable_then_the_same_sessions() {
    redis_outage_under_load(Outage::Freeze).await;
}

#[tokio::test]
async fn cis2_discovery_and_jwks_down_sign_ins_with_known_keys_still_work() {
    let h = Harness::start_with(Options {
        store: Store::Memory,
        ..Options::default()
    })
    .await;
    h.sign_in(pb::Aal::Aal2, PASSKEY_ONLY, None)
        .await
        .expect("a first sign-in loads discovery and the JWKS");

    h.sim.set_fault(Fault::DiscoveryDown);
    h.sim.set_fault(Fault::JwksDown);
    for uid in [SMARTCARD_AND_PASSKEY, SMARTCARD_ONLY, PASSKEY_ONLY] {
        let ex = h
            .sign_in(pb::Aal::Aal2, uid, None)
            .await
            .unwrap_or_else(|e| panic!("{uid} signs in from the cached keys: {e:?}"));
        assert_eq!(ex.session.expect("session").user.expect("user").uid, uid);
    }

    // A key the cache does not hold cannot be fetched now: the sign-in fails closed.
    h.sim.set_fault(Fault::UnknownKid);
    let err = h
        .sign_in(pb::Aal::Aal2, PASSKEY_ONLY, None)
        .await
        .expect_err("an unknown kid with the JWKS down");
    assert!(
        ["IDP_UNAVAILABLE", "LOGIN_REJECTED"].contains(&reason(&err).as_str()),
        "{err:?}"
    );

    h.sim.clear_faults();
    h.sign_in(pb::Aal::Aal2, PASSKEY_ONLY, None)
        .await
        .expect("everything works once CIS2 is back");
    h.stop().await;
}

fn apim_harness_options(env: Vec<(String, String)>) -> Options {
    Options {
        apim: Some(Pattern::Separate),
        env,
        ..Options::default()
    }
}

async fn pds(h: &Harness, token: &str) -> Result<pb::ApiToken, tonic::Status> {
    let mut req = tonic::Request::new(pb::GetPdsTokenRequest {
        session_token: token.into(),
        min_validity: None,
    });
    req.set_timeout(Duration::from_secs(60));
    h.client
        .clone()
        .get_pds_token(req)
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn apim_slow_ends_in_apim_unavailable_at_the_timeout_and_releases_the_lock() {
    // A lease far longer than the timeout: a lock left behind would make the next call wait
    // out the lease (or fail), which the bounds below would catch.
    const SLOW: Duration = Duration::from_secs(20);
    const LEASE: Duration = Duration::from_secs(40);
    let h = Harness::start_with(apim_harness_options(vec![
        ("BROKER__APIM__HTTP_TIMEOUT".into(), "1s".into()),
        ("BROKER__APIM__LOCK_LEASE".into(), "40s".into()),
    ]))
    .await;
    let apim = h.apim.clone().expect("APIM simulator");
    let ex = h
        .sign_in(pb::Aal::Aal2, PASSKEY_ONLY, None)
        .await
        .expect("signed in");

    apim.set_fault(ApimFault::Slow(SLOW));
    let began = Instant::now();
    let err = pds(&h, &ex.session_token).await.expect_err("APIM too slow");
    let took = began.elapsed();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (tonic::Code::Unavailable, "APIM_UNAVAILABLE")
    );
    assert!(
        took < SLOW,
        "the call waited for APIM's slow answer ({took:?}) instead of timing out"
    );

    apim.clear_faults();
    let began = Instant::now();
    let t = pds(&h, &ex.session_token)
        .await
        .expect("the next call gets a token: the single-flight lock was released");
    assert!(
        began.elapsed() < LEASE / 2,
        "the next call waited {:?}: the lock was left for its lease to expire",
        began.elapsed()
    );
    assert_eq!(t.aal(), pb::Aal::Aal2);
    h.stop().await;
}

#[tokio::test]
async fn apim_5xx_caches_nothing_and_the_next_call_retries() {
    let h = Harness::start_with(apim_harness_options(Vec::new())).await;
    let apim = h.apim.clone().expect("APIM simulator");
    let ex = h
        .sign_in(pb::Aal::Aal2, PASSKEY_ONLY, None)
        .await
        .expect("signed in");

    apim.set_fault(ApimFault::ServerError);
    for _ in 0..2 {
        let err = pds(&h, &ex.session_token).await.expect_err("APIM 500");
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (tonic::Code::Unavailable, "APIM_UNAVAILABLE")
        );
    }
    let failed_calls = apim.token_calls();
    assert_eq!(
        failed_calls, 2,
        "each call went to APIM: no failure was cached"
    );

    apim.clear_faults();
    let t = pds(&h, &ex.session_token)
        .await
        .expect("the next call retries and succeeds");
    assert_eq!(apim.token_calls(), failed_calls + 1);
    assert!(apim.introspect(&t.access_token).is_some());
    let again = pds(&h, &ex.session_token).await.expect("from the cache");
    assert_eq!(again.access_token, t.access_token);
    assert_eq!(
        apim.token_calls(),
        failed_calls + 1,
        "the good token is cached"
    );
    h.stop().await;
}
