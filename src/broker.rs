//! The use cases: start a sign-in, finish it (creating or stepping up a session), read a
//! session, check access, log out. Inputs and outputs are domain types; `grpc` converts.

use crate::aal::{Aal, AalSource, authenticator_label};
use crate::apim::{IssuedToken, TokenService, TokenSubject};
use crate::clock::{Clock, from_unix_seconds, unix_seconds};
use crate::config::{ApimConfig, Cis2Config, Pattern, SessionConfig};
use crate::error::{BrokerError, FieldViolation, Result};
use crate::metrics;
use crate::oidc::{
    AuthorizationRequest, Cis2Client, IdTokenClaims, IdTokenExpectations, OidcError, pkce,
};
use crate::policy::{self, Access, ApiPolicy, PolicyTable};
use crate::secret::Secret;
use crate::session::codec::IdToken;
use crate::session::model::StepUpOf;
use crate::session::store::{IndexKind, StoredSession};
use crate::session::token::random_urlsafe;
use crate::session::{
    KeyRing, LoginKey, PendingLogin, Role, SessionId, SessionRecord, SessionStore, SessionToken,
    User,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::{info, instrument, warn};

/// Limits on caller input, so oversized fields are refused before any work is done.
pub mod limits {
    pub const REDIRECT_URI: usize = 2048;
    pub const APP_STATE: usize = 1024;
    pub const API: usize = 64;
    pub const SESSION_TOKEN: usize = 128;
    pub const STATE: usize = 512;
    pub const CODE: usize = 4096;
    pub const IDP_ERROR: usize = 256;
    pub const IDP_ERROR_DESCRIPTION: usize = 1024;
    pub const ISS: usize = 1024;
    /// The longest `min_validity` a caller may ask for; APIM access tokens live 10 minutes.
    pub const MIN_VALIDITY: std::time::Duration = std::time::Duration::from_secs(3600);
}
/// `StartLogin` input.
#[derive(Debug, Default)]
pub struct StartLogin {
    pub redirect_uri: String,
    pub required_aal: Option<Aal>,
    pub api: Option<String>,
    pub session_token: Option<Secret<String>>,
    pub app_state: String,
}

#[derive(Debug)]
pub struct LoginStarted {
    pub authorization_url: String,
    pub state: Secret<String>,
    pub expires_at: SystemTime,
    pub acr_values: String,
    pub step_up: bool,
}

/// `ExchangeCode` input: the callback's parameters as received.
#[derive(Debug, Default)]
pub struct ExchangeCode {
    pub state: Secret<String>,
    pub code: Secret<String>,
    pub error: String,
    pub error_description: String,
    pub iss: String,
}

#[derive(Debug)]
pub struct Exchanged {
    /// A new session's token; `None` after a step-up, whose token is unchanged.
    pub session_token: Option<SessionToken>,
    pub session: SessionView,
    pub stepped_up: bool,
    pub app_state: String,
}

/// Everything about a session that may be shown: no tokens.
#[derive(Debug, Clone)]
pub struct SessionView {
    pub session_id: SessionId,
    pub user: User,
    pub selected_role: Option<Role>,
    pub roles: Vec<Role>,
    pub organisations: Vec<crate::session::Organisation>,
    pub aal: Aal,
    pub aal_source: AalSource,
    pub acr: String,
    pub amr: Vec<String>,
    pub authenticator: String,
    pub auth_time: SystemTime,
    pub created_at: SystemTime,
    pub idle_expires_at: SystemTime,
    pub expires_at: SystemTime,
}

#[derive(Debug, Clone)]
pub struct AccessCheck {
    pub allowed: bool,
    pub api: String,
    pub required_aal: Aal,
    pub current_aal: Aal,
    pub message: String,
}

/// `Logout`'s answer.
#[derive(Debug)]
pub struct LoggedOut {
    /// CIS2's end-session URL; it carries the ID token as `id_token_hint`.
    pub end_session_url: Secret<String>,
}

/// The longest user id the admin RPCs accept.
pub const MAX_UID: usize = 64;

fn check_uid(uid: &str) -> Result<()> {
    if uid.is_empty() {
        return Err(BrokerError::invalid("uid", "is required"));
    }
    if uid.len() > MAX_UID {
        return Err(BrokerError::invalid(
            "uid",
            format!("is longer than {MAX_UID} bytes"),
        ));
    }
    Ok(())
}

/// What the broker needs to know of the configuration.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub sessions: SessionConfig,
    pub cis2: Cis2Config,
    pub apim: Option<ApimConfig>,
}

impl BrokerSettings {
    fn pattern(&self) -> Pattern {
        self.apim.as_ref().map_or(Pattern::Separate, |a| a.pattern)
    }
}

/// An access token for a national API, and the headers to send with it.
#[derive(Debug)]
pub struct ApiTokenView {
    pub access_token: Secret<String>,
    pub token_type: String,
    pub expires_at: SystemTime,
    pub api: String,
    pub aal: Aal,
    pub headers: BTreeMap<String, String>,
}
pub struct Broker {
    store: Arc<dyn SessionStore>,
    keys: Arc<KeyRing>,
    cis2: Arc<Cis2Client>,
    clock: Arc<dyn Clock>,
    settings: BrokerSettings,
    policy: PolicyTable,
    /// APIM tokens; `None` when no `[apim]` is configured.
    tokens: Option<TokenService>,
}

/// A session loaded from the store and opened.
struct Loaded {
    id: SessionId,
    record: SessionRecord,
    idle_expires_at: SystemTime,
    /// The store TTL left after this read (and touch).
    ttl: Duration,
    /// The session's cached APIM tokens, when asked for.
    tokens: Vec<(String, Vec<u8>)>,
}
impl Broker {
    pub fn new(
        store: Arc<dyn SessionStore>,
        keys: Arc<KeyRing>,
        cis2: Arc<Cis2Client>,
        clock: Arc<dyn Clock>,
        settings: BrokerSettings,
        policy: PolicyTable,
        tokens: Option<TokenService>,
    ) -> Self {
        Broker {
            store,
            keys,
            cis2,
            clock,
            settings,
            policy,
            tokens,
        }
    }
    pub fn policy(&self) -> &PolicyTable {
        &self.policy
    }

    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }

    pub fn cis2(&self) -> &Arc<Cis2Client> {
        &self.cis2
    }

    #[instrument(skip_all, fields(api = req.api.as_deref(), step_up = req.session_token.is_some()))]
    pub async fn start_login(&self, req: StartLogin) -> Result<LoginStarted> {
        let mut bad = Vec::new();
        check_len(
            &mut bad,
            "redirect_uri",
            &req.redirect_uri,
            limits::REDIRECT_URI,
        );
        check_len(&mut bad, "app_state", &req.app_state, limits::APP_STATE);
        if let Some(api) = &req.api {
            check_len(&mut bad, "api", api, limits::API);
        }
        if !bad.is_empty() {
            return Err(BrokerError::InvalidArgument(bad));
        }
        if !self
            .settings
            .cis2
            .redirect_uris
            .iter()
            .any(|u| u == &req.redirect_uri)
        {
            bad.push(violation(
                "redirect_uri",
                "is not one of the broker's configured redirect URIs",
            ));
        }
        if req.required_aal == Some(Aal::Aal1) {
            bad.push(violation(
                "required_aal",
                "CIS2 sign-in is at AAL_2 or AAL_3",
            ));
        }
        let api_policy = match req.api.as_deref() {
            Some(api) => match self.policy.get(api) {
                Some(p) => Some(p),
                None => {
                    bad.push(violation(
                        "api",
                        "is not an API of the policy table (see ListApiPolicies)",
                    ));
                    None
                }
            },
            None => None,
        };
        if !bad.is_empty() {
            return Err(BrokerError::InvalidArgument(bad));
        }
        let required_aal = match (req.required_aal, api_policy) {
            (None, None) => self.settings.sessions.default_aal,
            (aal, p) => aal
                .into_iter()
                .chain(p.map(|p| p.required_aal))
                .max()
                .unwrap_or(Aal::Aal2),
        }
        .max(Aal::Aal2);

        let step_up = match &req.session_token {
            // Without an ID token the broker cannot tell who signed in, so it could not check
            // that the same user stepped up: refuse rather than guess.
            Some(_) if self.settings.pattern() == Pattern::Combined => {
                return Err(BrokerError::invalid(
                    "session_token",
                    "step-up needs the separate authentication pattern; start a new sign-in at the level needed",
                ));
            }
            Some(token) => {
                let loaded = self.load(token.expose()).await?;
                Some(StepUpOf {
                    session_id: loaded.id.to_string(),
                    uid: loaded.record.user.uid,
                })
            }
            None => None,
        };

        let now = self.clock.now();
        let state = Secret::new(random_urlsafe(32));
        let nonce = Secret::new(random_urlsafe(32));
        let verifier = pkce::new_verifier();
        let acr_values = self.settings.cis2.acr_values_for(required_aal).to_owned();
        let max_age = self.settings.cis2.max_age.map(|d| d.as_secs());
        let url = match (&self.tokens, self.settings.pattern()) {
            (Some(tokens), Pattern::Combined) => tokens
                .client()
                .authorization_url(&req.redirect_uri, state.expose(), &acr_values)
                .map_err(BrokerError::from)?,
            _ => self
                .cis2
                .authorization_url(&AuthorizationRequest {
                    redirect_uri: &req.redirect_uri,
                    scopes: &self.settings.cis2.scopes,
                    state: state.expose(),
                    nonce: nonce.expose(),
                    pkce_challenge: &pkce::challenge_s256(verifier.expose()),
                    acr_values: &acr_values,
                    max_age,
                    // NHS clients always send it: CIS2 then asks for a fresh sign-in and a role.
                    prompt: Some("login"),
                })
                .await
                .map_err(idp_error)?,
        };

        let is_step_up = step_up.is_some();
        let pending = PendingLogin {
            nonce,
            pkce_verifier: verifier,
            redirect_uri: req.redirect_uri,
            required_aal,
            acr_values: acr_values.clone(),
            api: req.api,
            app_state: req.app_state,
            started_at: unix_seconds(now),
            max_age,
            step_up,
        };
        let key = LoginKey::from_state(state.expose());
        let sealed = self
            .keys
            .seal_json(&pending, &login_aad(&key))
            .map_err(internal)?;
        let ttl = self.settings.sessions.pending_login_ttl;
        if !self.store.put_pending_login(&key, &sealed, ttl).await? {
            // 256 random bits never collide; if they did, refusing is the safe answer.
            return Err(BrokerError::Internal("pending login key collision".into()));
        }
        info!(aal = %required_aal, acr_values, "sign-in started");
        if is_step_up {
            metrics::step_up(metrics::StepUp::Started);
        }
        Ok(LoginStarted {
            authorization_url: url.to_string(),
            state,
            expires_at: now + ttl,
            acr_values,
            step_up: is_step_up,
        })
    }

    #[instrument(skip_all)]
    pub async fn exchange_code(&self, req: ExchangeCode) -> Result<Exchanged> {
        let mut bad = Vec::new();
        check_len(&mut bad, "state", req.state.expose(), limits::STATE);
        check_len(&mut bad, "code", req.code.expose(), limits::CODE);
        check_len(&mut bad, "error", &req.error, limits::IDP_ERROR);
        check_len(
            &mut bad,
            "error_description",
            &req.error_description,
            limits::IDP_ERROR_DESCRIPTION,
        );
        check_len(&mut bad, "iss", &req.iss, limits::ISS);
        if req.state.expose().is_empty() {
            bad.push(violation("state", "is required"));
        }
        if req.code.expose().is_empty() && req.error.is_empty() {
            bad.push(violation(
                "code",
                "is required unless the callback carried an error",
            ));
        }
        if !bad.is_empty() {
            return Err(BrokerError::InvalidArgument(bad));
        }

        // Consumed before anything else, so a state is good for one attempt only, whatever
        // happens next.
        let key = LoginKey::from_state(req.state.expose());
        let sealed = self
            .store
            .take_pending_login(&key)
            .await?
            .ok_or(BrokerError::LoginStateInvalid)?;
        let pending: PendingLogin =
            self.keys
                .open_json(&sealed, &login_aad(&key))
                .map_err(|e| {
                    warn!(error = %e, "pending sign-in could not be opened");
                    BrokerError::LoginStateInvalid
                })?;
        // Counts a failed step-up on every early return below, unless marked a success.
        let mut step_up_outcome = StepUpOutcome {
            armed: pending.step_up.is_some(),
        };

        if !req.error.is_empty() {
            return Err(BrokerError::LoginRejected {
                idp_error: Some(printable(&req.error, 64)),
                detail: match printable(&req.error_description, 200) {
                    d if d.is_empty() => "CIS2 did not sign the user in".into(),
                    d => format!("CIS2 did not sign the user in: {d}"),
                },
            });
        }
        // RFC 9207: an `iss` on the callback names who sent it; a mismatch means mix-up.
        if !req.iss.is_empty() && req.iss != self.cis2.issuer() {
            return Err(BrokerError::rejected(
                "the callback's iss is not the configured CIS2 issuer",
            ));
        }

        if self.settings.pattern() == Pattern::Combined {
            return self.exchange_combined(req, pending).await;
        }

        let tokens = self
            .cis2
            .redeem_code(
                req.code.expose(),
                &pending.redirect_uri,
                pending.pkce_verifier.expose(),
            )
            .await
            .map_err(idp_error)?;
        let claims = self
            .cis2
            .validate_id_token(
                tokens.id_token.expose(),
                &IdTokenExpectations {
                    nonce: pending.nonce.expose(),
                    min_aal: pending.required_aal,
                    not_before_auth: from_unix_seconds(pending.started_at),
                    max_age: pending.max_age,
                },
            )
            .await
            .map_err(idp_error)?;
        if let Some(step_up) = &pending.step_up
            && claims.sub != step_up.uid
        {
            return Err(BrokerError::rejected(
                "a different user signed in than the one stepping up",
            ));
        }
        let profile = match (&tokens.access_token, self.settings.cis2.userinfo) {
            (Some(access_token), true) => Some(
                self.cis2
                    .userinfo(access_token.expose(), &claims.sub)
                    .await
                    .map_err(idp_error)?,
            ),
            _ => None,
        };

        let now = self.clock.now();
        let (user, roles, organisations) = match profile {
            Some(p) => (p.user, p.roles, p.organisations),
            None => (user_from_claims(&claims), Vec::new(), Vec::new()),
        };
        let selected_role = claims.selected_roleid.as_ref().map(|id| {
            roles
                .iter()
                .find(|r| &r.role_id == id)
                .cloned()
                .unwrap_or_else(|| Role {
                    role_id: id.clone(),
                    ..Role::default()
                })
        });
        let signed_in = SignedIn {
            user: User {
                ial: claims.ial,
                ..user
            },
            selected_role,
            roles,
            organisations,
            id_token: tokens.id_token,
            claims,
        };

        match pending.step_up {
            Some(step_up) => {
                let view = self.step_up(&step_up, signed_in, now).await?;
                info!(session_id = %view.session_id, aal = %view.aal, "session stepped up");
                step_up_outcome.succeeded();
                Ok(Exchanged {
                    session_token: None,
                    session: view,
                    stepped_up: true,
                    app_state: pending.app_state,
                })
            }
            None => {
                let (token, view) = self.create(signed_in, now).await?;
                info!(session_id = %view.session_id, aal = %view.aal, authenticator = view.authenticator, "session created");
                metrics::sign_in(view.aal, &view.authenticator);
                Ok(Exchanged {
                    session_token: Some(token),
                    session: view,
                    stepped_up: false,
                    app_state: pending.app_state,
                })
            }
        }
    }

    async fn create(&self, s: SignedIn, now: SystemTime) -> Result<(SessionToken, SessionView)> {
        let expires_at = now + self.settings.sessions.absolute_lifetime;
        let record = SessionRecord {
            user: s.user,
            selected_role: s.selected_role,
            roles: s.roles,
            organisations: s.organisations,
            aal: s.claims.aal,
            aal_source: AalSource::IdToken,
            acr: s.claims.acr,
            amr: s.claims.amr,
            auth_time: s.claims.auth_time,
            created_at: unix_seconds(now),
            expires_at: unix_seconds(expires_at),
            cis2_sid: s.claims.sid,
            id_token: Secret::new(Some(IdToken::new(s.id_token.expose()))),
            id_token_expires_at: Some(s.claims.exp),
            generation: 0,
        };
        let token = SessionToken::generate();
        let id = token.id();
        let ttl = self.ttl_for(&record, now);
        let sealed = record
            .seal(&self.keys, &session_aad(&id))
            .map_err(internal)?;
        if !self.store.create_session(&id, &sealed, ttl).await? {
            return Err(BrokerError::Internal("session id collision".into()));
        }
        // A session that back-channel logout or an admin could not find must not exist.
        if let Err(e) = self.index_session(&id, &record, now).await {
            let _ = self.store.delete_session(&id).await;
            return Err(e.into());
        }
        let view = view(&id, record, now + ttl);
        Ok((token, view))
    }

    /// Upgrades the session in place. Nothing is written unless every check passed, and a
    /// session revoked meanwhile is not brought back.
    async fn step_up(&self, of: &StepUpOf, s: SignedIn, now: SystemTime) -> Result<SessionView> {
        let id = SessionId::parse(&of.session_id).ok_or(BrokerError::SessionInvalid)?;
        let current = self.load_by_id(id, false).await?;
        if current.record.user.uid != s.claims.sub {
            return Err(BrokerError::rejected(
                "a different user signed in than the one stepping up",
            ));
        }
        let mut record = current.record;
        record.aal = s.claims.aal;
        record.aal_source = AalSource::IdToken;
        record.acr = s.claims.acr;
        record.amr = s.claims.amr;
        record.auth_time = s.claims.auth_time;
        let old_sid = record.cis2_sid.clone();
        record.cis2_sid = s.claims.sid.or(record.cis2_sid);
        record.id_token = Secret::new(Some(IdToken::new(s.id_token.expose())));
        record.id_token_expires_at = Some(s.claims.exp);
        record.user = s.user;
        if s.selected_role.is_some() {
            record.selected_role = s.selected_role;
        }
        if !s.roles.is_empty() {
            record.roles = s.roles;
            record.organisations = s.organisations;
        }
        record.generation = record.generation.wrapping_add(1);
        let ttl = self.ttl_for(&record, now);
        let sealed = record
            .seal(&self.keys, &session_aad(&current.id))
            .map_err(internal)?;
        if !self
            .store
            .replace_session(&current.id, &sealed, ttl)
            .await?
        {
            return Err(BrokerError::SessionInvalid);
        }
        // The new CIS2 sid must find this session before the step-up counts; the old sid's
        // entry then only points at a session that no longer has that sid, so it goes.
        self.index_session(&current.id, &record, now).await?;
        if let Some(old) = old_sid.filter(|old| Some(old) != record.cis2_sid.as_ref()) {
            self.unindex_quietly(IndexKind::Cis2Sid, &old, &current.id)
                .await;
        }
        // Tokens minted at the lower level are keyed by the old generation and never served
        // again; dropping them now just frees the space.
        if let Some(tokens) = &self.tokens
            && let Err(e) = tokens.drop_tokens(&current.id).await
        {
            warn!(session_id = %current.id, error = %e, "could not drop the lower-level tokens");
        }
        Ok(view(&current.id, record, now + ttl))
    }

    /// The hot path: one store read, and a write at most once per touch interval. The hot
    /// RPCs open no span of their own: they record on the RPC's server span
    /// (`telemetry::grpc`), which declares `session_id` and `api`.
    pub async fn get_session(&self, session_token: &str) -> Result<SessionView> {
        let loaded = self.load(session_token).await?;
        Ok(view(&loaded.id, loaded.record, loaded.idle_expires_at))
    }

    pub async fn check_access(&self, session_token: &str, api: &str) -> Result<AccessCheck> {
        let policy = self.api_policy(api)?;
        let loaded = self.load(session_token).await?;
        let (allowed, message) =
            match policy::decide(policy, loaded.record.aal, loaded.record.user.ial) {
                Access::Allowed => (true, String::new()),
                Access::StepUpRequired { message, .. }
                | Access::IdentityTooWeak { message, .. } => (false, message),
            };
        Ok(AccessCheck {
            allowed,
            api: policy.api.clone(),
            required_aal: policy.required_aal,
            current_aal: loaded.record.aal,
            message,
        })
    }

    pub fn api_policy(&self, api: &str) -> Result<&ApiPolicy> {
        if api.is_empty() {
            return Err(BrokerError::invalid("api", "is required"));
        }
        if api.len() > limits::API {
            return Err(BrokerError::invalid(
                "api",
                format!("is longer than {} bytes", limits::API),
            ));
        }
        let policy = self.policy.get(api).ok_or_else(|| {
            BrokerError::invalid(
                "api",
                "is not an API of the policy table (see ListApiPolicies)",
            )
        })?;
        tracing::Span::current().record("api", policy.api.as_str());
        Ok(policy)
    }

    async fn load(&self, session_token: &str) -> Result<Loaded> {
        if session_token.len() > limits::SESSION_TOKEN {
            return Err(BrokerError::SessionInvalid);
        }
        let token = SessionToken::parse(session_token).ok_or(BrokerError::SessionInvalid)?;
        self.load_by_id(token.id(), false).await
    }

    /// Loads a session and, in the same store round trip, its cached APIM tokens.
    async fn load_with_tokens(&self, session_token: &str) -> Result<Loaded> {
        if session_token.len() > limits::SESSION_TOKEN {
            return Err(BrokerError::SessionInvalid);
        }
        let token = SessionToken::parse(session_token).ok_or(BrokerError::SessionInvalid)?;
        self.load_by_id(token.id(), true).await
    }

    async fn load_by_id(&self, id: SessionId, with_tokens: bool) -> Result<Loaded> {
        tracing::Span::current().record("session_id", id.as_str());
        let (stored, tokens) = if with_tokens {
            self.store
                .get_session_with_tokens(&id)
                .await?
                .ok_or(BrokerError::SessionInvalid)?
        } else {
            (
                self.store
                    .get_session(&id)
                    .await?
                    .ok_or(BrokerError::SessionInvalid)?,
                Vec::new(),
            )
        };
        // A removed encryption key, or tampering: either way this session is gone.
        let record = self
            .open_record(&id, &stored)
            .ok_or(BrokerError::SessionInvalid)?;
        let now = self.clock.now();
        let expires_at = from_unix_seconds(record.expires_at);
        if expires_at <= now || stored.ttl.is_zero() {
            return Err(BrokerError::SessionInvalid);
        }
        let mut idle_expires_at = now + stored.ttl;
        let mut ttl = stored.ttl;
        // Slide the idle timer only when the last slide is older than the touch interval: reads
        // stay reads. The TTL left tells how long ago the last slide was.
        let full = self.ttl_for(&record, now);
        if full.saturating_sub(stored.ttl) >= self.settings.sessions.touch_interval {
            if !self.store.touch_session(&id, full).await? {
                return Err(BrokerError::SessionInvalid);
            }
            idle_expires_at = now + full;
            ttl = full;
        }
        Ok(Loaded {
            id,
            record,
            idle_expires_at,
            ttl,
            tokens,
        })
    }

    /// A user-restricted APIM access token for `api`, if the session's level allows it.
    pub async fn get_api_token(
        &self,
        session_token: &str,
        api: &str,
        min_validity: Option<Duration>,
    ) -> Result<ApiTokenView> {
        let policy = self.api_policy(api)?;
        let min_validity = match min_validity {
            Some(d) if d > limits::MIN_VALIDITY => {
                return Err(BrokerError::invalid(
                    "min_validity",
                    "must be at most one hour",
                ));
            }
            Some(d) => d,
            None => self
                .settings
                .apim
                .as_ref()
                .map_or(Duration::from_secs(60), |a| a.min_validity),
        };
        let Some(tokens) = &self.tokens else {
            return Err(BrokerError::UpstreamRejected {
                upstream: "apim",
                error: "not_configured".into(),
                description: "this broker has no [apim] configuration".into(),
            });
        };
        let loaded = self.load_with_tokens(session_token).await?;
        let record = &loaded.record;
        match policy::decide(policy, record.aal, record.user.ial) {
            Access::Allowed => {}
            Access::StepUpRequired {
                required,
                current,
                message,
            } => {
                return Err(BrokerError::StepUpRequired {
                    api: policy.api.clone(),
                    required,
                    current,
                    message,
                });
            }
            Access::IdentityTooWeak {
                required_ial,
                message,
            } => {
                return Err(BrokerError::IdentityAssuranceInsufficient {
                    api: policy.api.clone(),
                    required_ial,
                    message,
                });
            }
        }
        let id_token = record.id_token.expose().as_ref();
        let subject = TokenSubject {
            session_id: &loaded.id,
            aal: record.aal,
            generation: record.generation,
            id_token,
            id_token_expires_at: record.id_token_expires_at,
            ttl: loaded.ttl,
        };
        let IssuedToken {
            access_token,
            token_type,
            expires_at,
        } = tokens
            .access_token(&subject, &loaded.tokens, min_validity)
            .await?;
        Ok(ApiTokenView {
            access_token,
            token_type,
            expires_at,
            api: policy.api.clone(),
            aal: record.aal,
            headers: self.api_headers(record),
        })
    }

    /// The headers PDS (and other national APIs) want beside the token (reference §3).
    fn api_headers(&self, record: &SessionRecord) -> BTreeMap<String, String> {
        let mut headers = BTreeMap::new();
        if let Some(role) = &record.selected_role {
            headers.insert("NHSD-Session-URID".to_owned(), role.role_id.clone());
            let org_header = self
                .settings
                .apim
                .as_ref()
                .is_some_and(|a| a.end_user_organisation_header);
            if org_header && !role.org_code.is_empty() {
                headers.insert(
                    "NHSD-End-User-Organisation-ODS".to_owned(),
                    role.org_code.clone(),
                );
            }
        }
        headers
    }

    /// The combined pattern: APIM ran CIS2 and hands over its own tokens, no ID token. The
    /// session's level is the one that was requested: the only lower bound known.
    async fn exchange_combined(
        &self,
        req: ExchangeCode,
        pending: PendingLogin,
    ) -> Result<Exchanged> {
        let tokens = self
            .tokens
            .as_ref()
            .ok_or_else(|| BrokerError::Internal("combined pattern without APIM".into()))?;
        let grant = tokens
            .client()
            .redeem_code(req.code.expose(), &pending.redirect_uri)
            .await
            .map_err(|e| match BrokerError::from(e) {
                // A code APIM will not redeem is a failed sign-in, not a broker misconfiguration.
                BrokerError::UpstreamRejected {
                    error, description, ..
                } => BrokerError::LoginRejected {
                    idp_error: Some(error),
                    detail: format!("APIM refused the code: {description}"),
                },
                other => other,
            })?;
        let now = self.clock.now();
        let record = SessionRecord {
            user: User::default(),
            selected_role: None,
            roles: Vec::new(),
            organisations: Vec::new(),
            aal: pending.required_aal,
            aal_source: AalSource::Requested,
            acr: pending.acr_values.clone(),
            amr: Vec::new(),
            auth_time: unix_seconds(now),
            created_at: unix_seconds(now),
            expires_at: unix_seconds(now + self.settings.sessions.absolute_lifetime),
            cis2_sid: None,
            id_token: Secret::new(None),
            id_token_expires_at: None,
            generation: 0,
        };
        let token = SessionToken::generate();
        let id = token.id();
        let ttl = self.ttl_for(&record, now);
        let sealed = record
            .seal(&self.keys, &session_aad(&id))
            .map_err(internal)?;
        if !self.store.create_session(&id, &sealed, ttl).await? {
            return Err(BrokerError::Internal("session id collision".into()));
        }
        let subject = TokenSubject {
            session_id: &id,
            aal: record.aal,
            generation: 0,
            id_token: None,
            id_token_expires_at: None,
            ttl,
        };
        if let Err(e) = tokens.store_grant(&subject, grant).await {
            // No half-made sessions: without its tokens the session is useless.
            let _ = self.store.delete_session(&id).await;
            return Err(e);
        }
        info!(session_id = %id, aal = %record.aal, "session created (combined pattern)");
        Ok(Exchanged {
            session_token: Some(token),
            session: view(&id, record, now + ttl),
            stepped_up: false,
            app_state: pending.app_state,
        })
    }

    /// Ends a session: its record, its APIM tokens and its index entries go at once for every
    /// replica, and the answer is where to send the browser to end the CIS2 session too.
    #[instrument(skip_all, fields(session_id))]
    pub async fn logout(
        &self,
        session_token: &str,
        post_logout_redirect_uri: Option<&str>,
    ) -> Result<LoggedOut> {
        if let Some(uri) = post_logout_redirect_uri {
            self.check_post_logout_redirect(uri)?;
        }
        if session_token.len() > limits::SESSION_TOKEN {
            return Err(BrokerError::SessionInvalid);
        }
        let token = SessionToken::parse(session_token).ok_or(BrokerError::SessionInvalid)?;
        let id = token.id();
        tracing::Span::current().record("session_id", id.as_str());
        let stored = self
            .store
            .get_session(&id)
            .await?
            .ok_or(BrokerError::SessionInvalid)?;
        // A record that cannot be opened is still deleted: logout must never leave it behind.
        let record = self.open_record(&id, &stored);
        if !self.store.delete_session(&id).await? {
            return Err(BrokerError::SessionInvalid);
        }
        if let Some(record) = &record {
            self.unindex_record(&id, record).await;
        }
        info!(session_id = %id, "signed out");
        let id_token = record
            .as_ref()
            .and_then(|r| r.id_token.expose().as_ref().map(IdToken::text));
        let url = self
            .cis2
            .end_session_url(id_token.as_deref(), post_logout_redirect_uri)
            .await
            .map_err(idp_error)?;
        Ok(LoggedOut {
            end_session_url: Secret::new(url.to_string()),
        })
    }

    fn check_post_logout_redirect(&self, uri: &str) -> Result<()> {
        if uri.len() > limits::REDIRECT_URI {
            return Err(BrokerError::invalid(
                "post_logout_redirect_uri",
                format!("is longer than {} bytes", limits::REDIRECT_URI),
            ));
        }
        if self
            .settings
            .cis2
            .post_logout_redirect_uris
            .iter()
            .any(|u| u == uri)
        {
            Ok(())
        } else {
            Err(BrokerError::invalid(
                "post_logout_redirect_uri",
                "is not one of the broker's configured post-logout redirect URIs",
            ))
        }
    }

    /// Admin: the user's live sessions, without tokens. Reading does not slide their idle timers.
    #[instrument(skip_all)]
    pub async fn list_user_sessions(&self, uid: &str) -> Result<Vec<SessionView>> {
        check_uid(uid)?;
        let now = self.clock.now();
        let mut views = Vec::new();
        for id in self.store.index_members(IndexKind::User, uid).await? {
            let Some(stored) = self.store.get_session(&id).await? else {
                self.unindex_quietly(IndexKind::User, uid, &id).await;
                continue;
            };
            match self.open_record(&id, &stored) {
                Some(record) if record.user.uid == uid && !stored.ttl.is_zero() => {
                    views.push(view(&id, record, now + stored.ttl));
                }
                _ => {}
            }
        }
        views.sort_by_key(|v| std::cmp::Reverse(v.created_at));
        Ok(views)
    }

    /// Admin: signs the user out everywhere. Returns how many sessions ended.
    #[instrument(skip_all)]
    pub async fn revoke_user_sessions(&self, uid: &str) -> Result<u32> {
        check_uid(uid)?;
        let ids = self.store.index_members(IndexKind::User, uid).await?;
        let revoked = self
            .revoke_matching(ids, |record| record.is_none_or(|r| r.user.uid == uid))
            .await?;
        info!(revoked, "user signed out everywhere");
        Ok(revoked)
    }

    /// Back-channel logout: checks the logout token (signature, claims, replay), then ends the
    /// sessions of its CIS2 `sid`, or every session of its `sub` when it names no sid. The
    /// session's APIM tokens go with it: APIM does not follow CIS2 logouts.
    #[instrument(skip_all)]
    pub async fn backchannel_logout(&self, logout_token: &str) -> Result<u32> {
        let claims = self
            .cis2
            .validate_logout_token(logout_token)
            .await
            .map_err(|e| match e {
                OidcError::Rejected { detail, .. } => BrokerError::rejected(detail),
                other => idp_error(other),
            })?;
        // Remembered while the token is acceptable, by issuer and jti: a replay is refused on
        // every replica. Marked before revoking, so a replayed sub-only token cannot end the
        // user's newer sessions.
        let now = unix_seconds(self.clock.now());
        let skew = self.cis2.settings().clock_skew.as_secs();
        let left = u64::try_from(claims.acceptable_until.saturating_sub(now)).unwrap_or(0);
        let remember = Duration::from_secs(left.saturating_add(skew).saturating_add(1));
        let marker = format!("logout-jti:{}:{}", self.cis2.issuer(), claims.jti);
        if !self.store.first_use(&marker, remember).await? {
            warn!("logout token replayed");
            return Err(BrokerError::rejected(
                "CIS2 logout token refused: its jti was already used",
            ));
        }
        let sub = claims.sub.as_deref();
        let revoked = match claims.sid.as_deref() {
            Some(sid) => {
                let ids = self.store.index_members(IndexKind::Cis2Sid, sid).await?;
                self.revoke_matching(ids, |record| {
                    record.is_none_or(|r| {
                        r.cis2_sid.as_deref() == Some(sid) && sub.is_none_or(|s| s == r.user.uid)
                    })
                })
                .await?
            }
            None => {
                let uid = sub.ok_or_else(|| BrokerError::rejected("no sid or sub"))?;
                let ids = self.store.index_members(IndexKind::User, uid).await?;
                self.revoke_matching(ids, |record| record.is_none_or(|r| r.user.uid == uid))
                    .await?
            }
        };
        info!(
            revoked,
            by_sid = claims.sid.is_some(),
            "back-channel logout"
        );
        Ok(revoked)
    }

    /// Deletes the sessions among `ids` that `matches` accepts (given their record, `None` when
    /// it cannot be opened: such a session is unusable anyway). Counts those that existed.
    async fn revoke_matching(
        &self,
        ids: Vec<SessionId>,
        matches: impl Fn(Option<&SessionRecord>) -> bool,
    ) -> Result<u32> {
        let mut revoked = 0u32;
        for id in ids {
            let Some(stored) = self.store.get_session(&id).await? else {
                continue;
            };
            let record = self.open_record(&id, &stored);
            if !matches(record.as_ref()) {
                continue;
            }
            if self.store.delete_session(&id).await? {
                revoked = revoked.saturating_add(1);
            }
            if let Some(record) = &record {
                self.unindex_record(&id, record).await;
            }
            info!(session_id = %id, "session revoked");
        }
        Ok(revoked)
    }

    fn open_record(&self, id: &SessionId, stored: &StoredSession) -> Option<SessionRecord> {
        SessionRecord::open(&self.keys, &stored.sealed, &session_aad(id))
            .map_err(|e| warn!(session_id = %id, error = %e, "session record could not be opened"))
            .ok()
    }

    /// Adds the session to the user and CIS2 sid indexes until its absolute end.
    async fn index_session(
        &self,
        id: &SessionId,
        record: &SessionRecord,
        now: SystemTime,
    ) -> std::result::Result<(), crate::session::StoreError> {
        let until = from_unix_seconds(record.expires_at)
            .duration_since(now)
            .unwrap_or(Duration::ZERO);
        if !record.user.uid.is_empty() {
            self.store
                .index_add(IndexKind::User, &record.user.uid, id, until)
                .await?;
        }
        if let Some(sid) = record.cis2_sid.as_deref().filter(|s| !s.is_empty()) {
            self.store
                .index_add(IndexKind::Cis2Sid, sid, id, until)
                .await?;
        }
        Ok(())
    }

    /// Removes a revoked session's index entries. A failure is only logged: an entry whose
    /// session is gone reads as absent, and it expires on its own.
    async fn unindex_record(&self, id: &SessionId, record: &SessionRecord) {
        if !record.user.uid.is_empty() {
            self.unindex_quietly(IndexKind::User, &record.user.uid, id)
                .await;
        }
        if let Some(sid) = record.cis2_sid.as_deref() {
            self.unindex_quietly(IndexKind::Cis2Sid, sid, id).await;
        }
    }

    async fn unindex_quietly(&self, kind: IndexKind, value: &str, id: &SessionId) {
        if let Err(e) = self.store.index_remove(kind, value, id).await {
            warn!(session_id = %id, index = kind.as_str(), error = %e, "index entry left to expire");
        }
    }

    /// The store TTL of a session: its idle timeout, never past its absolute end.
    fn ttl_for(&self, record: &SessionRecord, now: SystemTime) -> Duration {
        let idle = self.settings.sessions.idle_timeout(record.aal);
        let left = from_unix_seconds(record.expires_at)
            .duration_since(now)
            .unwrap_or(Duration::ZERO);
        idle.min(left)
    }
}

/// Records a step-up as failed when dropped, unless it was marked a success first.
struct StepUpOutcome {
    armed: bool,
}

impl StepUpOutcome {
    fn succeeded(&mut self) {
        if self.armed {
            metrics::step_up(metrics::StepUp::Succeeded);
        }
        self.armed = false;
    }
}

impl Drop for StepUpOutcome {
    fn drop(&mut self) {
        if self.armed {
            metrics::step_up(metrics::StepUp::Failed);
        }
    }
}

struct SignedIn {
    user: User,
    selected_role: Option<Role>,
    roles: Vec<Role>,
    organisations: Vec<crate::session::Organisation>,
    id_token: Secret<String>,
    claims: IdTokenClaims,
}

fn view(id: &SessionId, r: SessionRecord, idle_expires_at: SystemTime) -> SessionView {
    SessionView {
        session_id: id.clone(),
        authenticator: authenticator_label(&r.amr),
        user: r.user,
        selected_role: r.selected_role,
        roles: r.roles,
        organisations: r.organisations,
        aal: r.aal,
        aal_source: r.aal_source,
        acr: r.acr,
        amr: r.amr,
        auth_time: from_unix_seconds(r.auth_time),
        created_at: from_unix_seconds(r.created_at),
        idle_expires_at,
        expires_at: from_unix_seconds(r.expires_at),
    }
}

fn user_from_claims(c: &IdTokenClaims) -> User {
    User {
        uid: c.sub.clone(),
        name: c.name.clone().unwrap_or_default(),
        given_name: c.given_name.clone().unwrap_or_default(),
        family_name: c.family_name.clone().unwrap_or_default(),
        ..User::default()
    }
}

fn login_aad(key: &LoginKey) -> Vec<u8> {
    format!("login:{}", key.as_str()).into_bytes()
}

fn session_aad(id: &SessionId) -> Vec<u8> {
    format!("session:{id}").into_bytes()
}

fn violation(field: &'static str, description: &str) -> FieldViolation {
    FieldViolation {
        field,
        description: description.into(),
    }
}

fn check_len(bad: &mut Vec<FieldViolation>, field: &'static str, value: &str, max: usize) {
    if value.len() > max {
        bad.push(FieldViolation {
            field,
            description: format!("is longer than {max} bytes"),
        });
    }
}

/// IdP-supplied text reaches us through the user's browser: keep it short and printable.
fn printable(s: &str, max: usize) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(max)
        .collect()
}

fn internal(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Internal(e.to_string())
}

fn idp_error(e: OidcError) -> BrokerError {
    match e {
        OidcError::Unavailable(cause) => BrokerError::IdpUnavailable(cause),
        OidcError::Rejected { idp_error, detail } => {
            BrokerError::LoginRejected { idp_error, detail }
        }
        OidcError::Misconfigured(fix) => {
            tracing::error!(problem = %fix, "CIS2 configuration does not match the provider");
            BrokerError::IdpUnavailable(fix)
        }
    }
}
