//! The floor: the least a session lookup over gRPC can cost. A tonic server with one unary RPC
//! that does exactly one Redis GET (of a 700-byte value, seeded at start-up) and returns it.
//! `scripts/bench.sh` drives it with the load generator (`--rpc floor`) and compares the
//! broker's hot RPCs with it.
//!
//! `cargo run --release --example floor -- --redis redis://127.0.0.1:6379 --listen 127.0.0.1:50061`

#[path = "common/floor_pb.rs"]
mod floor_pb;

use clap::Parser;
use floor_pb::{GET_PATH, GetRequest, GetResponse, SERVICE_NAME};
use redis::aio::ConnectionManager;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::codegen::http;

/// The key the floor reads: every request reads the same one, as the broker's benchmark reads a
/// handful of sessions.
const FLOOR_KEY: &str = "floor:value";
/// About the size of a sealed session.
const VALUE_BYTES: usize = 700;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "REDIS_URL")]
    redis: String,
    #[arg(long, default_value = "127.0.0.1:50061")]
    listen: std::net::SocketAddr,
    /// Leave Nagle's algorithm on for accepted connections (as `TcpIncoming::from(listener)`
    /// does), to show what it costs; the default sets TCP_NODELAY, as tonic's builder does.
    #[arg(long)]
    nagle: bool,
}

#[derive(Clone)]
struct Floor {
    redis: ConnectionManager,
}

/// The RPC body: one GET.
struct GetSvc(ConnectionManager);

impl tonic::server::UnaryService<GetRequest> for GetSvc {
    type Response = GetResponse;
    type Future =
        Pin<Box<dyn Future<Output = Result<tonic::Response<GetResponse>, tonic::Status>> + Send>>;

    fn call(&mut self, _request: tonic::Request<GetRequest>) -> Self::Future {
        let mut conn = self.0.clone();
        Box::pin(async move {
            let value: Option<Vec<u8>> = redis::cmd("GET")
                .arg(FLOOR_KEY)
                .query_async(&mut conn)
                .await
                .map_err(|_| tonic::Status::unavailable("redis"))?;
            let value = value.ok_or_else(|| tonic::Status::not_found("not seeded"))?;
            Ok(tonic::Response::new(GetResponse { value }))
        })
    }
}

impl tonic::codegen::Service<http::Request<Body>> for Floor {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let redis = self.redis.clone();
        Box::pin(async move {
            if req.uri().path() != GET_PATH {
                return Ok(tonic::Status::unimplemented("").into_http());
            }
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(GetSvc(redis), req).await)
        })
    }
}

impl tonic::server::NamedService for Floor {
    const NAME: &'static str = SERVICE_NAME;
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if !args.listen.ip().is_loopback() {
        return Err("the floor listens on loopback only".into());
    }
    let client = redis::Client::open(args.redis.as_str())?;
    let mut redis = ConnectionManager::new(client).await?;
    let _: () = redis::cmd("SET")
        .arg(FLOOR_KEY)
        .arg(vec![b'x'; VALUE_BYTES])
        .query_async(&mut redis)
        .await?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay((!args.nagle).then_some(true));
    println!("floor listening on {} (nagle: {})", args.listen, args.nagle);
    tonic::transport::Server::builder()
        .add_service(Floor { redis })
        .serve_with_incoming_shutdown(incoming, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
