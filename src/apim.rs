//! NHS API Management: user-restricted access tokens for the national APIs.
//!
//! - [`client`]: APIM's `/oauth2/token` (RFC 8693 token exchange with an RS512 client assertion,
//!   refresh, the combined pattern's authorization code) and `/oauth2/authorize` URL.
//! - [`grant`]: a grant as it is sealed in the token cache.
//! - [`tokens`]: the per-session token cache, sealed in the session store, with one APIM call at
//!   a time per session across every replica.

pub mod client;
pub mod grant;
pub mod tokens;

pub use client::{ApimClient, ApimError, TokenGrant};
pub use tokens::{IssuedToken, TokenService, TokenSubject, token_field};
