//! Graceful shutdown of the real binary: `session-broker serve` gets SIGTERM while a call is in
//! flight (the simulated CIS2 token endpoint is slow). It stops taking new connections, lets the
//! call finish within `server.shutdown_grace`, and exits 0; past the grace period it ends the
//! call and still exits 0. Its JSON log lines carry the caller's trace id, and no secret.

use cis2_session_broker::grpc::pb;
use cis2_session_broker::grpc::pb::session_broker_client::SessionBrokerClient;
use cis2_session_broker::session::KeyRing;
use cis2_session_broker::sim::{Cis2Simulator, Fault, SimClient, SimOptions};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::Channel;

const CLIENT_ID: &str = "shutdown-client";
const CLIENT_SECRET: &str = "shutdown-client-secret-81d3e";
const CALLBACK: &str = "https://app.example.test/callback";

/// The binary under test, its simulator, and every line it printed.
struct RunningBroker {
    sim: Cis2Simulator,
    child: Option<Child>,
    grpc: String,
    http: String,
    stdout: Arc<Mutex<Vec<String>>>,
    dir: std::path::PathBuf,
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("bound").port()
}

impl RunningBroker {
    async fn start(grace: &str) -> RunningBroker {
        let sim = Cis2Simulator::start(
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind simulator"),
            SimOptions {
                clients: vec![SimClient {
                    client_id: CLIENT_ID.into(),
                    client_secret: Some(CLIENT_SECRET.into()),
                    jwks: None,
                    redirect_uris: vec![CALLBACK.into()],
                    post_logout_redirect_uris: vec![],
                }],
                ..SimOptions::default()
            },
        )
        .await
        .expect("simulator starts");
        let grpc = format!("127.0.0.1:{}", free_port());
        let http = format!("127.0.0.1:{}", free_port());
        let dir = std::env::temp_dir().join(format!(
            "broker-shutdown-{}",
            cis2_session_broker::session::token::random_urlsafe(6).replace(['-', '_'], "x")
        ));
        std::fs::create_dir_all(&dir).expect("temp dir is writable");
        let config = dir.join("broker.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[server]
grpc_addr = "{grpc}"
http_addr = "{http}"
shutdown_grace = "{grace}"
insecure_allow_unauthenticated_callers = true
[store]
kind = "memory"
[cis2]
issuer = {issuer:?}
discovery_url = {discovery:?}
client_id = "{CLIENT_ID}"
client_auth = "client_secret_post"
redirect_uris = ["{CALLBACK}"]
http_timeout = "120s"
"#,
                issuer = sim.issuer(),
                discovery = sim.discovery_url(),
            ),
        )
        .expect("config written");
        let mut child = Command::new(env!("CARGO_BIN_EXE_session-broker"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env(
                "BROKER__ENCRYPTION__KEYS",
                format!("t1:{}", KeyRing::generate_key().expose()),
            )
            .env("BROKER__CIS2__CLIENT_SECRET", CLIENT_SECRET)
            .env("RUST_LOG", "info")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the session-broker binary starts");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stdout.take().expect("stdout is piped");
        let lines = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().expect("no panic while holding").push(line);
            }
        });
        let broker = RunningBroker {
            sim,
            child: Some(child),
            grpc,
            http,
            stdout,
            dir,
        };
        broker.until_ready().await;
        broker
    }

    async fn until_ready(&self) {
        for _ in 0..300 {
            let ready = reqwest::get(format!("http://{}/readyz", self.http))
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "the broker never became ready; it printed: {:?}",
            self.lines()
        );
    }

    async fn connect(&self) -> Result<SessionBrokerClient<Channel>, tonic::transport::Error> {
        let channel = Channel::from_shared(format!("http://{}", self.grpc))
            .expect("valid URI")
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await?;
        Ok(SessionBrokerClient::new(channel))
    }

    fn sigterm(&self) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill -TERM {pid} failed");
    }

    /// Waits (bounded) for the process to exit.
    async fn exit_status(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        for _ in 0..600 {
            if let Some(status) = child.try_wait().expect("try_wait works") {
                self.child = None;
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the broker did not exit after SIGTERM");
    }

    fn lines(&self) -> Vec<String> {
        self.stdout.lock().expect("no panic while holding").clone()
    }

    /// Follows the authorization URL through the simulator as a browser would.
    async fn authorize(&self, authorization_url: &str) -> pb::ExchangeCodeRequest {
        let mut url = url::Url::parse(authorization_url).expect("a URL");
        url.query_pairs_mut()
            .append_pair("login_hint", "656005750107");
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let resp = http.get(url).send().await.expect("simulator answers");
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .expect("a redirect to the callback")
            .to_owned();
        let mut req = pb::ExchangeCodeRequest::default();
        for (k, v) in url::Url::parse(&location)
            .expect("callback URL")
            .query_pairs()
        {
            match k.as_ref() {
                "code" => req.code = v.into_owned(),
                "state" => req.state = v.into_owned(),
                "iss" => req.iss = v.into_owned(),
                _ => {}
            }
        }
        req
    }

    /// Signs in up to the callback, then makes the token endpoint slow by `delay`.
    async fn callback_with_slow_cis2(&self, delay: Duration) -> pb::ExchangeCodeRequest {
        let mut client = self.connect().await.expect("connect");
        let started = client
            .start_login(pb::StartLoginRequest {
                redirect_uri: CALLBACK.into(),
                required_aal: pb::Aal::Aal2.into(),
                ..Default::default()
            })
            .await
            .expect("StartLogin")
            .into_inner();
        let req = self.authorize(&started.authorization_url).await;
        self.sim.set_fault(Fault::Slow(delay));
        req
    }

    /// Waits (bounded) until the simulator has received a token request.
    async fn until_token_request_arrives(&self) {
        for _ in 0..600 {
            let arrived = self
                .sim
                .received_traceparents()
                .iter()
                .any(|(path, _)| path.ends_with("/access_token"));
            if arrived {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the token request never reached the simulator");
    }
}

impl Drop for RunningBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.sim.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn sigterm_drains_the_call_in_flight_refuses_new_ones_and_exits_zero() {
    let mut broker = RunningBroker::start("30s").await;
    let req = broker.callback_with_slow_cis2(Duration::from_secs(4)).await;
    let secrets = [
        req.code.clone(),
        req.state.clone(),
        CLIENT_SECRET.to_owned(),
    ];
    let trace = "5e2a0c6b1f9d4e3a8b7c6d5e4f3a2b1c";
    let mut call = tonic::Request::new(req);
    call.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-a1b2c3d4e5f60718-01")
            .parse()
            .expect("valid metadata"),
    );
    let mut client = broker.connect().await.expect("connect");
    let in_flight = tokio::spawn(async move { client.exchange_code(call).await });
    broker.until_token_request_arrives().await;

    broker.sigterm();
    // New connections are refused while the old call is still running.
    let mut refused_while_in_flight = false;
    for _ in 0..200 {
        if broker.connect().await.is_err() {
            refused_while_in_flight = !in_flight.is_finished();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        refused_while_in_flight,
        "new connections were still accepted while draining"
    );

    let exchanged = in_flight
        .await
        .expect("the call task completes")
        .expect("the call in flight finishes successfully")
        .into_inner();
    assert!(exchanged.session_token.starts_with("cis2sb_"));
    let status = broker.exit_status().await;
    assert!(status.success(), "exit status {status:?}");

    // JSON lines, each the caller's trace when logged during its call, and no secret.
    let lines = broker.lines();
    assert!(!lines.is_empty());
    let mut token_lines = 0;
    for line in &lines {
        let json: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        for secret in secrets.iter().chain([&exchanged.session_token]) {
            assert!(!line.contains(secret.as_str()), "a secret in: {line}");
        }
        if json["endpoint"] == "token endpoint" {
            token_lines += 1;
            assert_eq!(json["trace_id"], trace, "{line}");
            assert!(json["span_id"].as_str().is_some_and(|s| s.len() == 16));
        }
    }
    assert!(
        token_lines >= 1,
        "no log line for the token request: {lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("shutting down")),
        "{lines:?}"
    );
}

#[tokio::test]
async fn past_the_grace_period_the_call_is_ended_and_the_exit_is_still_zero() {
    let mut broker = RunningBroker::start("1s").await;
    // Far longer than the grace period and than this test waits for the exit.
    let req = broker
        .callback_with_slow_cis2(Duration::from_secs(120))
        .await;
    let mut client = broker.connect().await.expect("connect");
    let in_flight = tokio::spawn(async move { client.exchange_code(req).await });
    broker.until_token_request_arrives().await;

    broker.sigterm();
    let status = broker.exit_status().await;
    assert!(status.success(), "exit status {status:?}");
    let outcome = in_flight.await.expect("the call task completes");
    assert!(outcome.is_err(), "the cut-off call cannot have succeeded");
    assert!(
        broker
            .lines()
            .iter()
            .any(|l| l.contains("grace period over")),
        "{:?}",
        broker.lines()
    );
}
