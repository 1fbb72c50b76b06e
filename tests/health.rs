//! Health: gRPC `grpc.health.v1` and HTTP `/readyz` follow the session store, `/healthz` only
//! the process. The broker is pointed at a private `redis-server` that the test stops and
//! starts again on the same port.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A redis-server of this test's own, on `port`, keeping nothing on disk.
struct PrivateRedis {
    port: u16,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start(port: u16) -> PrivateRedis {
        let dir = std::env::temp_dir().join(format!("broker-health-redis-{port}"));
        std::fs::create_dir_all(&dir).expect("temp dir is writable");
        let mut redis = PrivateRedis {
            port,
            dir,
            child: None,
        };
        redis.resume();
        redis
    }

    fn resume(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        self.child = Some(child);
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("bound").port()
}

async fn grpc_status(h: &Harness, service: &str) -> Option<ServingStatus> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", h.grpc_addr))
        .expect("valid URI")
        .connect()
        .await
        .ok()?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(reply.into_inner().status).ok()
}

async fn http_status(h: &Harness, path: &str) -> u16 {
    reqwest::get(format!("http://{}{path}", h.http_addr))
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Waits (bounded: the broker re-checks every 2 s) until both health forms agree on `want`.
async fn until_health(h: &Harness, want: ServingStatus) {
    let want_http = if want == ServingStatus::Serving {
        200
    } else {
        503
    };
    let mut last = (None, None, 0);
    for _ in 0..150 {
        let overall = grpc_status(h, "").await;
        let named = grpc_status(h, "session_broker.v1.SessionBroker").await;
        let ready = http_status(h, "/readyz").await;
        if overall == Some(want) && named == Some(want) && ready == want_http {
            return;
        }
        last = (overall, named, ready);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("health never became {want:?}: last seen (\"\", SessionBroker, /readyz) = {last:?}");
}

#[tokio::test]
async fn health_follows_redis_down_and_back_up() {
    let mut redis = PrivateRedis::start(free_port());
    let h = Harness::start_with(Options {
        redis_url: Some(redis.url()),
        ..Options::default()
    })
    .await;
    until_health(&h, ServingStatus::Serving).await;
    assert_eq!(http_status(&h, "/healthz").await, 200);

    redis.stop();
    until_health(&h, ServingStatus::NotServing).await;
    // Liveness is about the process, not its dependencies: restarting it would not help.
    assert_eq!(http_status(&h, "/healthz").await, 200);

    redis.resume();
    until_health(&h, ServingStatus::Serving).await;
    h.stop().await;
}
