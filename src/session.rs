//! Sessions: what a signed-in user's session holds, how its token and keys are made, how it is
//! sealed at rest, and where it is stored (Redis, or memory in dev mode and tests).

pub mod codec;
pub mod crypto;
pub mod memory;
pub mod model;
pub mod redis;
pub mod store;
pub mod token;

pub use crypto::{KeyRing, SealError};
pub use model::{Organisation, PendingLogin, Role, SessionRecord, User};
pub use store::{SessionStore, StoreError, StoredSession};
pub use token::{LoginKey, SessionId, SessionToken};
