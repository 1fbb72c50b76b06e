//! An in-process NHS CIS2 Authentication simulator, for dev mode and end-to-end tests. Never
//! started in production.
//!
//! It is a real OpenID Provider over HTTP, following OpenID Connect Core, RFC 6749 and RFC 7636
//! (PKCE, S256 only) the way CIS2 does (NHS-CIS2-REFERENCE.md §1): the realm path,
//! `/access_token`, `/connect/jwk_uri`, `/connect/endSession`, `acr_values` classes, the
//! `authentication_assurance_level` claim as a string, `client_secret_post` and RS512
//! `private_key_jwt` client authentication. Clients built against the standards work with it
//! unchanged; it takes no shortcuts that a real provider would not.
//!
//! - [`cis2`]: the routes, [`Cis2Simulator`], [`SimOptions`], [`SimClient`].
//! - [`users`]: the NHS test users (§6), their roles and authenticators, `acr_values` rules.
//! - [`faults`]: [`Fault`] knobs that make it misbehave, so tests prove clients fail closed.
//! - [`keys`]: its RSA signing key (one per process) and a rogue key for bad signatures.
//! - `page`: the sign-in, error and signed-out pages.
//!
//! A test starts one on port 0 and signs a user in without a browser:
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use cis2_session_broker::sim::{Cis2Simulator, SimClient, SimOptions};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let sim = Cis2Simulator::start(listener, SimOptions {
//!     clients: vec![SimClient {
//!         client_id: "broker".into(),
//!         client_secret: Some("secret".into()),
//!         jwks: None,
//!         redirect_uris: vec!["http://127.0.0.1:8080/callback".into()],
//!         post_logout_redirect_uris: vec![],
//!     }],
//!     ..SimOptions::default()
//! }).await?;
//! // Point the client at sim.discovery_url(); add `login_hint=656005750107` (and optionally
//! // `sim_authenticator=PASSKEY`, `sim_role=...`) to the authorization URL to skip the page.
//! # Ok(()) }
//! ```

pub mod apim;
pub mod cis2;
pub mod faults;
pub mod keys;
mod page;
pub mod users;

pub use apim::{ApimApp, ApimFault, ApimOptions, ApimSimulator, TokenInfo};
pub use cis2::{Cis2Simulator, REALM, SimClient, SimOptions};
pub use faults::Fault;
pub use users::{Authenticator, SimRole, SimUser};
