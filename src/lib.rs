//! cis2-session-broker: healthcare-worker sign-in with NHS CIS2 for backends in any language.
//!
//! A map of the crate:
//!
//! - [`config`]: the typed configuration (TOML + environment), validated once, every problem at once.
//! - [`broker`]: the use cases: start a sign-in, finish it, read a session, step up, log out.
//!   No gRPC types here.
//! - [`grpc`]: the `session_broker.v1.SessionBroker` service, proto <-> domain conversions, and
//!   the one table that maps [`error::BrokerError`] to gRPC statuses.
//! - [`session`]: session records, tokens and keys, sealing at rest, and the stores (Redis, memory).
//! - [`oidc`]: the CIS2 client: discovery, JWKS, code redemption, ID token checks, UserInfo.
//! - [`signing`]: the broker's own RS512 keys: client assertions and the public JWKS.
//! - [`apim`]: NHS API Management tokens: token exchange, refresh, the per-session cache.
//! - [`policy`]: which AAL each national API needs, and what to tell a clinician: pure functions.
//! - [`http`]: the HTTP port: health, the broker's JWKS, and the dev pages.
//! - [`telemetry`], [`metrics`]: logs, OpenTelemetry traces, Prometheus metrics.
//! - [`sim`]: a CIS2 simulator for dev mode and tests. Never started in production.
//! - [`aal`], [`clock`], [`secret`], [`error`], [`hex`]: small shared vocabulary.

pub mod aal;
pub mod apim;
pub mod broker;
pub mod clock;
pub mod config;
pub mod dev;
pub mod error;
pub mod grpc;
pub mod hex;
pub mod http;
pub mod metrics;
pub mod oidc;
pub mod policy;
pub mod secret;
pub mod server;
pub mod session;
pub mod signing;
pub mod sim;
pub mod telemetry;
