//! `session-broker`: parse the command line, load configuration, set up logging, run.

use cis2_session_broker::config::{Config, ConfigErrors};
use cis2_session_broker::grpc::auth as caller_auth;
use cis2_session_broker::telemetry::{self, LogFormat};
use cis2_session_broker::{dev, server, signing};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

// A quarter of the hot path's CPU went to glibc's malloc and free (docs/benchmarks.md): each
// call allocates and frees many small buffers across threads, which mimalloc serves faster.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "session-broker",
    version = telemetry::VERSION,
    about = "NHS CIS2 session broker: sign-in, AAL and APIM tokens over gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (production).
    Serve {
        /// The TOML configuration file; `BROKER__*` environment variables override it.
        #[arg(long, short, env = "BROKER_CONFIG")]
        config: PathBuf,
    },
    /// Run on loopback with the built-in CIS2 simulator and an in-memory store. Not for production.
    Dev {
        /// Keep sessions in this Redis instead of memory, e.g. redis://127.0.0.1:6379.
        #[arg(long)]
        redis: Option<String>,
        #[arg(long, default_value = "127.0.0.1:50051")]
        grpc_addr: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_addr: SocketAddr,
        /// Where the CIS2 simulator listens.
        #[arg(long, default_value = "127.0.0.1:8081")]
        sim_addr: SocketAddr,
        /// Where the APIM simulator listens.
        #[arg(long, default_value = "127.0.0.1:8082")]
        apim_addr: SocketAddr,
    },
    /// Check a configuration file and print every problem in it.
    CheckConfig { file: PathBuf },
    /// Manage the broker's RS512 signing keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Bearer tokens for the services that call the broker (`[[callers]]`).
    Callers {
        #[command(subcommand)]
        command: CallersCommand,
    },
}

#[derive(Subcommand)]
enum CallersCommand {
    /// Print a fresh random token (give it to the calling service) and its token_sha256 (put it
    /// in the broker's configuration).
    NewToken,
    /// Read a token from standard input and print its token_sha256.
    HashToken,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Write <dir>/<kid>.pem (private, mode 0600) and <dir>/<kid>.jwks.json (public).
    Generate {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        #[arg(long)]
        kid: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file).and_then(ready_to_serve) {
            Ok(_) => {
                println!("{}: OK", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{}: {e}", file.display());
                ExitCode::FAILURE
            }
        },
        Command::Callers { command } => callers(command),
        Command::Keys {
            command: KeysCommand::Generate { dir, kid },
        } => match signing::generate_key_files(&dir, &kid) {
            Ok((pem, jwks)) => {
                println!(
                    "private key: {}\npublic JWKS: {}",
                    pem.display(),
                    jwks.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("keys generate: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve { config } => {
            let config = match Config::load(&config).and_then(ready_to_serve) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{}: {e}", config.display());
                    return ExitCode::FAILURE;
                }
            };
            runtime(LogFormat::Json, async move {
                let app = server::build_default(&config)?;
                let grpc = tokio::net::TcpListener::bind(config.server.grpc_addr).await?;
                let http = tokio::net::TcpListener::bind(config.server.http_addr).await?;
                server::run(app, grpc, http, shutdown_signal()).await
            })
        }
        Command::Dev {
            redis,
            grpc_addr,
            http_addr,
            sim_addr,
            apim_addr,
        } => runtime(
            LogFormat::Text,
            dev::run(
                dev::DevOptions {
                    grpc_addr,
                    http_addr,
                    sim_addr,
                    apim_addr,
                    redis_url: redis,
                },
                shutdown_signal(),
            ),
        ),
    }
}

/// Problems that only matter to a broker about to serve (see `Config::callers_problem`).
fn ready_to_serve(config: Config) -> Result<Config, ConfigErrors> {
    match config.callers_problem() {
        Some(problem) => Err(ConfigErrors(vec![problem])),
        None => Ok(config),
    }
}

fn callers(command: CallersCommand) -> ExitCode {
    match command {
        CallersCommand::NewToken => {
            let (token, hash) = caller_auth::new_token();
            println!(
                "token:        {}\ntoken_sha256: {hash}\n\nGive the token to the calling service \
                 (it sends `authorization: Bearer <token>`); put only token_sha256 in [[callers]].",
                token.expose()
            );
            ExitCode::SUCCESS
        }
        CallersCommand::HashToken => {
            let mut token = String::new();
            if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut token) {
                eprintln!("callers hash-token: cannot read standard input: {e}");
                return ExitCode::FAILURE;
            }
            // A trailing newline from `echo` or a file is not part of the token.
            let token = token.trim_end_matches(['\r', '\n']);
            if token.is_empty() || token.contains(char::is_whitespace) {
                eprintln!("callers hash-token: give one token, without spaces, on standard input");
                return ExitCode::FAILURE;
            }
            println!(
                "{}",
                cis2_session_broker::hex::encode(&caller_auth::hash_token(token))
            );
            ExitCode::SUCCESS
        }
    }
}

/// Runs `work` with logging and tracing installed (inside the runtime: the OTLP exporter needs
/// it), then flushes the last spans whatever the outcome.
fn runtime(
    logs: LogFormat,
    work: impl std::future::Future<Output = Result<(), server::StartupError>>,
) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let telemetry = telemetry::init(logs);
        let result = work.await;
        telemetry.shutdown().await;
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("session-broker: {e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM (Kubernetes) or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
