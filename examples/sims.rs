//! The CIS2 and APIM simulators as a process of their own, so `scripts/bench.sh` can run the
//! production `session-broker serve` against them and measure the broker alone (its RSS
//! included). Loopback only; benchmarks and soak tests, never production.
//!
//! `cargo run --release --example sims -- --jwks DIR/bench-1.jwks.json --callback URL
//!  --client-secret-file FILE [--apim-secret-file FILE] --out DIR/sims.env`
//! writes `CIS2_ISSUER`, `CIS2_DISCOVERY_URL` and `APIM_TOKEN_URL` to the `--out` file once
//! both listen, then serves until SIGINT/SIGTERM.

use cis2_session_broker::sim::{
    ApimApp, ApimOptions, ApimSimulator, Cis2Simulator, SimClient, SimOptions,
};
use clap::Parser;
use std::path::PathBuf;
use tokio::net::TcpListener;

/// The client id and APIM key the benchmark broker is configured with.
const CLIENT_ID: &str = "bench-client";
const API_KEY: &str = "bench-api-key";

#[derive(Parser)]
struct Args {
    /// The broker's public signing keys (`session-broker keys generate` writes them): APIM
    /// checks its client assertions against them.
    #[arg(long)]
    jwks: PathBuf,
    /// The redirect URI the broker is configured with; the load generator stops there.
    #[arg(long)]
    callback: String,
    /// A file holding the CIS2 client secret (client_secret_post), so it is on no command line.
    #[arg(long)]
    client_secret_file: PathBuf,
    /// A file holding the APIM app's secret: with it the broker can redeem refresh tokens, as
    /// a production deployment of the separate pattern does; without it, it cannot.
    #[arg(long)]
    apim_secret_file: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:0")]
    cis2_addr: String,
    #[arg(long, default_value = "127.0.0.1:0")]
    apim_addr: String,
    /// Where to write the simulators' URLs as `KEY=value` lines.
    #[arg(long)]
    out: PathBuf,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let jwks: jsonwebtoken::jwk::JwkSet =
        serde_json::from_str(&std::fs::read_to_string(&args.jwks)?)?;
    let read = |path: &PathBuf| std::fs::read_to_string(path).map(|s| s.trim().to_owned());
    let secret = read(&args.client_secret_file)?;
    let apim_secret = args.apim_secret_file.as_ref().map(read).transpose()?;
    let cis2_listener = TcpListener::bind(&args.cis2_addr).await?;
    let apim_listener = TcpListener::bind(&args.apim_addr).await?;
    if !cis2_listener.local_addr()?.ip().is_loopback()
        || !apim_listener.local_addr()?.ip().is_loopback()
    {
        return Err("the simulators listen on loopback only".into());
    }
    let sim = Cis2Simulator::start(
        cis2_listener,
        SimOptions {
            clients: vec![SimClient {
                client_id: CLIENT_ID.into(),
                client_secret: Some(secret),
                jwks: Some(jwks.clone()),
                redirect_uris: vec![args.callback.clone()],
                post_logout_redirect_uris: Vec::new(),
            }],
            ..SimOptions::default()
        },
    )
    .await?;
    let mut apim_options = ApimOptions::for_cis2(&sim);
    apim_options.apps = vec![ApimApp {
        api_key: API_KEY.into(),
        client_secret: apim_secret,
        jwks: Some(jwks),
        redirect_uris: Vec::new(),
        apis: vec![
            "personal-demographics-service".into(),
            "electronic-prescription-service@aal3".into(),
        ],
    }];
    let apim = ApimSimulator::start(apim_listener, apim_options).await?;
    let env = format!(
        "CIS2_ISSUER={}\nCIS2_DISCOVERY_URL={}\nAPIM_TOKEN_URL={}\nCIS2_CLIENT_ID={CLIENT_ID}\nAPIM_API_KEY={API_KEY}\n",
        sim.issuer(),
        sim.discovery_url(),
        apim.token_url(),
    );
    // Written whole, then renamed: the script polls for the file and must never read half of it.
    let partial = args.out.with_extension("partial");
    std::fs::write(&partial, env)?;
    std::fs::rename(&partial, &args.out)?;
    shutdown().await;
    sim.shutdown();
    apim.shutdown();
    Ok(())
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
