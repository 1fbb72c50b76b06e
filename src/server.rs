//! Wiring and serving: builds the broker from a [`Config`] and runs the gRPC and HTTP listeners
//! until shutdown. Tests call [`run`] with listeners bound to port 0.

use crate::apim::{ApimClient, TokenService};
use crate::broker::{Broker, BrokerSettings};
use crate::clock::{Clock, SystemClock};
use crate::config::{ClientAuthMethod, Config, SigningKeySource, StoreConfig};
use crate::grpc::auth::{CallerAuth, GrpcAccess};
use crate::grpc::{BrokerService, pb};
use crate::oidc::{Cis2Client, ClientAuth, OidcSettings};
use crate::session::memory::MemoryStore;
use crate::session::redis::RedisStore;
use crate::session::{KeyRing, SessionStore};
use crate::signing::SigningKeys;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tracing::{info, warn};

/// The largest gRPC request accepted; every legitimate request is far smaller.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Everything a running broker is made of.
#[derive(Clone)]
pub struct App {
    pub broker: Arc<Broker>,
    pub signing: Option<Arc<SigningKeys>>,
    /// Dev mode only: the `/dev` pages.
    pub dev: Option<Arc<crate::http::dev::DevPages>>,
    /// How long in-flight calls may run once shutdown begins (`server.shutdown_grace`).
    pub shutdown_grace: Duration,
    /// Callers, TLS and reflection of the gRPC port.
    pub grpc_access: GrpcAccess,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{0}")]
    Config(String),
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    #[error("server failed: {0}")]
    Serve(String),
}

/// Builds the broker. Touches no network: Redis and CIS2 may still be down, and readiness says so.
pub fn build(config: &Config, clock: Arc<dyn Clock>) -> Result<App, StartupError> {
    let grpc_access =
        GrpcAccess::from_config(config, clock.clone()).map_err(StartupError::Config)?;
    let store: Arc<dyn SessionStore> = match &config.store {
        StoreConfig::Memory => Arc::new(MemoryStore::new(clock.clone())),
        StoreConfig::Redis(settings) => Arc::new(
            RedisStore::new(settings.clone())
                .map_err(|e| StartupError::Config(format!("store: {e}")))?,
        ),
    };
    let keys = KeyRing::new(&config.encryption_keys)
        .map_err(|e| StartupError::Config(format!("encryption.keys: {e}")))?;
    let signing = signing_keys(&config.signing_keys)?;
    let client_auth = match &config.cis2.client_auth {
        ClientAuthMethod::ClientSecretPost(secret) => ClientAuth::SecretPost(secret.clone()),
        ClientAuthMethod::PrivateKeyJwt => ClientAuth::PrivateKeyJwt(
            signing
                .clone()
                .ok_or_else(|| StartupError::Config("private_key_jwt needs signing keys".into()))?,
        ),
    };
    let c = &config.cis2;
    let cis2 = Cis2Client::new(
        OidcSettings {
            issuer: c.issuer.clone(),
            discovery_url: c.discovery_url.clone(),
            client_id: c.client_id.clone(),
            client_auth,
            http_timeout: c.http_timeout,
            clock_skew: c.clock_skew,
            discovery_refresh: c.discovery_refresh,
            jwks_min_refresh_interval: c.jwks_min_refresh_interval,
            userinfo: c.userinfo,
        },
        clock.clone(),
    )
    .map_err(|e| StartupError::Config(format!("cis2: {e}")))?;
    let keys = Arc::new(keys);
    let tokens = match &config.apim {
        Some(apim) => {
            // Config validation already demands signing keys for the separate pattern.
            let client = ApimClient::new(apim, signing.clone(), clock.clone())
                .map_err(|e| StartupError::Config(format!("apim: {e}")))?;
            Some(TokenService::new(
                store.clone(),
                keys.clone(),
                client,
                clock.clone(),
                apim.lock_lease,
            ))
        }
        None => None,
    };
    let broker = Broker::new(
        store,
        keys,
        Arc::new(cis2),
        clock,
        BrokerSettings {
            sessions: config.sessions.clone(),
            cis2: config.cis2.clone(),
            apim: config.apim.clone(),
        },
        config.policy.clone(),
        tokens,
    );
    Ok(App {
        broker: Arc::new(broker),
        signing,
        dev: None,
        shutdown_grace: config.server.shutdown_grace,
        grpc_access,
    })
}

/// Builds from configuration with the system clock.
pub fn build_default(config: &Config) -> Result<App, StartupError> {
    build(config, Arc::new(SystemClock))
}

fn signing_keys(sources: &[SigningKeySource]) -> Result<Option<Arc<SigningKeys>>, StartupError> {
    if sources.is_empty() {
        return Ok(None);
    }
    let mut files = Vec::new();
    let mut pems = Vec::new();
    for s in sources {
        match s {
            SigningKeySource::File { kid, path } => files.push((kid.clone(), path.clone())),
            SigningKeySource::Pem { kid, pem } => pems.push((kid.clone(), pem.clone())),
        }
    }
    // Keys come either all from files or all inline: order (newest first) stays as configured.
    let keys = match (files.is_empty(), pems.is_empty()) {
        (false, true) => SigningKeys::from_pem_files(&files),
        (true, false) => SigningKeys::from_pems(&pems),
        _ => {
            return Err(StartupError::Config(
                "signing.keys: use private_key_file for every key, or private_key_pem for every key".into(),
            ));
        }
    }
    .map_err(|e| StartupError::Config(format!("signing.keys: {e}")))?;
    Ok(Some(Arc::new(keys)))
}

/// Serves gRPC on `grpc` and HTTP on `http` until `shutdown` completes, then lets in-flight calls
/// finish.
pub async fn run(
    app: App,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    let readiness = tokio::spawn(watch_readiness(app.broker.clone(), health, stop_rx.clone()));

    let reflection = app
        .grpc_access
        .reflection
        .then(|| {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .build_v1()
                .map_err(|e| StartupError::Serve(format!("reflection: {e}")))
        })
        .transpose()?;
    // Health and reflection stay open; every SessionBroker RPC passes the caller check first.
    let service = CallerAuth::new(
        pb::session_broker_server::SessionBrokerServer::new(BrokerService::new(app.broker.clone()))
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        app.grpc_access.callers.clone(),
    );
    let mut grpc_builder = tonic::transport::Server::builder();
    if let Some(tls) = &app.grpc_access.tls {
        grpc_builder = grpc_builder
            .tls_config(tls.clone())
            .map_err(|e| StartupError::Config(format!("server.tls: {e}")))?;
    }

    info!(grpc = %grpc.local_addr()?, http = %http.local_addr()?, "broker listening");
    let grpc_server = grpc_builder
        .layer(crate::telemetry::grpc::GrpcTelemetryLayer)
        .add_service(health_service)
        .add_optional_service(reflection)
        .add_service(service)
        // TCP_NODELAY: without it a reply written in two pieces waits for the client's
        // delayed ACK (40 ms per GetSession, measured in docs/benchmarks.md).
        .serve_with_incoming_shutdown(
            OneWriteIncoming(TcpIncoming::from(grpc).with_nodelay(Some(true))),
            stopped(stop_rx.clone()),
        );
    let http_server = axum::serve(http, crate::http::router(app.clone()))
        .with_graceful_shutdown(stopped(stop_rx.clone()))
        .into_future();

    let servers = async { tokio::join!(grpc_server, http_server) };
    let (g, h) = tokio::select! {
        done = servers => done,
        () = grace_over(stop_rx.clone(), app.shutdown_grace) => {
            // Dropping the servers ends the calls still running; Kubernetes would kill us soon.
            warn!(grace = ?app.shutdown_grace, "shutdown grace period over; ending calls still in flight");
            (Ok(()), Ok(()))
        }
    };
    readiness.abort();
    g.map_err(|e| StartupError::Serve(format!("gRPC: {e}")))?;
    h.map_err(|e| StartupError::Serve(format!("HTTP: {e}")))?;
    info!("broker stopped");
    Ok(())
}

/// Accepted gRPC connections, each as a [`OneWrite`] stream.
struct OneWriteIncoming(TcpIncoming);

impl futures_core::Stream for OneWriteIncoming {
    type Item = std::io::Result<OneWrite>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.0)
            .poll_next(cx)
            .map(|next| next.map(|accepted| accepted.map(OneWrite)))
    }
}

/// A TCP stream that tells HTTP/2 it has no vectored writes. h2 then copies a DATA frame of up
/// to 1 KiB into its write buffer instead of sending it as a separate buffer, so an answer of
/// a few hundred bytes (GetSession's) goes out with its headers and trailers in one write,
/// as a short one (GetCurrentAal's) already does: 1.6 writes a call instead of 2.8, measured in
/// docs/benchmarks.md. Every write still reaches the socket whole: tokio's default vectored
/// write sends the first buffer, and h2 loops until everything is written.
struct OneWrite(tokio::net::TcpStream);

impl tonic::transport::server::Connected for OneWrite {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.connect_info()
    }
}

impl tokio::io::AsyncRead for OneWrite {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for OneWrite {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Completes `grace` after shutdown begins.
async fn grace_over(rx: watch::Receiver<bool>, grace: Duration) {
    stopped(rx).await;
    info!(grace = ?grace, "shutting down: no new calls; waiting for calls in flight");
    tokio::time::sleep(grace).await;
}

/// Whether the broker can do its work: the store answers and CIS2's discovery is loaded.
pub async fn ready(broker: &Broker) -> bool {
    let store = broker.store().ping().await.is_ok();
    let cis2 = broker.cis2().ensure_ready().await.is_ok();
    store && cis2
}

async fn watch_readiness(
    broker: Arc<Broker>,
    health: tonic_health::server::HealthReporter,
    mut stop: watch::Receiver<bool>,
) {
    let service = <pb::session_broker_server::SessionBrokerServer<BrokerService> as tonic::server::NamedService>::NAME;
    let mut last = None;
    loop {
        let status = if ready(&broker).await {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            if status == ServingStatus::NotServing {
                warn!("not ready: the session store or CIS2 discovery is unavailable");
            } else {
                info!("ready");
            }
            health.set_service_status("", status).await;
            health.set_service_status(service, status).await;
            last = Some(status);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    // Draining: health checkers stop sending work here while the calls in flight finish.
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status(service, ServingStatus::NotServing)
        .await;
}
