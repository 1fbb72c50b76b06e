//! Who is calling, and may they? Every `SessionBroker` RPC passes through [`CallerAuth`] before
//! it reaches the service; `grpc.health.v1` and reflection are separate services and stay open.
//!
//! A calling service proves who it is with either
//! - a bearer service token in the `authorization` metadata (`Bearer <token>`): configuration
//!   holds only the token's SHA-256, and the hash is compared with every configured one in
//!   constant time, or
//! - a client certificate (mutual TLS), which names the caller by its subject or by a subject
//!   alternative name; the TLS layer has already checked it chains to the configured client CA.
//!
//! The caller's allow-list then decides which RPCs it may use, and its rate limits apply
//! ([`super::limits`]). The [`Caller`] goes into the request's extensions and the tracing span.
//! The token itself never reaches a log line or an error message.

use super::limits::{CallerLimits, Limits};
use crate::clock::Clock;
use crate::config::{CallerConfig, Config, TlsConfig};
use crate::error::BrokerError;
use crate::secret::Secret;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Every RPC of `session_broker.v1.SessionBroker`, as allow-lists name them.
pub const RPC_NAMES: &[&str] = &[
    "StartLogin",
    "ExchangeCode",
    "GetCurrentAal",
    "GetSession",
    "CheckAccess",
    "GetPdsToken",
    "GetApiToken",
    "Logout",
    "ListUserSessions",
    "RevokeUserSessions",
    "ListApiPolicies",
];

/// The name callers get when `server.insecure_allow_unauthenticated_callers` lets them in bare.
pub const UNAUTHENTICATED_CALLER: &str = "unauthenticated";

/// Longest bearer token accepted; the broker's own are 47 characters.
const MAX_TOKEN_LEN: usize = 512;

/// Which RPCs a caller may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedRpcs {
    All,
    Only(BTreeSet<String>),
}

impl AllowedRpcs {
    /// From configuration: RPC names, or `["*"]` for all. Fails with the names that are not RPCs.
    pub fn parse(names: &[String]) -> Result<AllowedRpcs, Vec<String>> {
        if names.iter().any(|n| n == "*") {
            return match names.len() {
                1 => Ok(AllowedRpcs::All),
                _ => Err(vec!["\"*\" must stand alone".into()]),
            };
        }
        let unknown: Vec<String> = names
            .iter()
            .filter(|n| !RPC_NAMES.contains(&n.as_str()))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(unknown);
        }
        Ok(AllowedRpcs::Only(names.iter().cloned().collect()))
    }

    pub fn allows(&self, rpc: &str) -> bool {
        match self {
            AllowedRpcs::All => true,
            AllowedRpcs::Only(set) => set.contains(rpc),
        }
    }
}

/// The calling service, as authenticated: in the request's extensions for the handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: Arc<str>,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// SHA-256 of a bearer token: what configuration holds.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// 64 hex digits (either case) into a hash; `None` for anything else.
pub fn parse_token_hash(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    // from_str_radix alone would also take a sign ("+f").
    if hex.len() != 64 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let s = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// A fresh caller token (256 random bits) and the hex SHA-256 to put in configuration.
pub fn new_token() -> (Secret<String>, String) {
    let token = format!("sbc_{}", crate::session::token::random_urlsafe(32));
    let hash = crate::hex::encode(&hash_token(&token));
    (Secret::new(token), hash)
}

/// The `authorization` metadata as presented.
#[derive(Debug, PartialEq, Eq)]
pub enum Bearer {
    Absent,
    /// Present but not one `Bearer <token>`: refused, never ignored.
    Malformed,
    Token(Secret<String>),
}

impl Bearer {
    /// Reads every `authorization` value of a request.
    pub fn from_headers(headers: &http::HeaderMap) -> Bearer {
        let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
        let Some(first) = values.next() else {
            return Bearer::Absent;
        };
        if values.next().is_some() {
            return Bearer::Malformed;
        }
        first
            .to_str()
            .ok()
            .and_then(bearer_token)
            .map_or(Bearer::Malformed, |t| {
                Bearer::Token(Secret::new(t.to_owned()))
            })
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive, RFC 9110 §11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim_matches(' ');
    let ok = scheme.eq_ignore_ascii_case("bearer")
        && !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token.bytes().all(|b| b.is_ascii_graphic());
    ok.then_some(token)
}

/// The names a client certificate offers: its subject (RFC 4514) and its URI and DNS SANs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CertNames {
    pub subject: String,
    pub sans: Vec<String>,
}

impl CertNames {
    /// `None` when the DER does not parse: such a certificate names nobody.
    pub fn from_der(der: &[u8]) -> Option<CertNames> {
        use x509_cert::Certificate;
        use x509_cert::der::Decode;
        use x509_cert::ext::pkix::SubjectAltName;
        use x509_cert::ext::pkix::name::GeneralName;

        let cert = Certificate::from_der(der).ok()?;
        let subject = cert.tbs_certificate.subject.to_string();
        let sans = match cert.tbs_certificate.get::<SubjectAltName>() {
            Ok(Some((_, san))) => san
                .0
                .into_iter()
                .filter_map(|name| match name {
                    GeneralName::UniformResourceIdentifier(s) | GeneralName::DnsName(s) => {
                        Some(s.to_string())
                    }
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            // Two SAN extensions, or one that does not parse: refuse to guess.
            Err(_) => return None,
        };
        Some(CertNames { subject, sans })
    }
}

/// The credentials a request presented.
#[derive(Debug)]
pub struct Presented {
    pub bearer: Bearer,
    /// `None`: no client certificate. `Some(None)`: one that did not parse.
    pub cert: Option<Option<CertNames>>,
}

impl Presented {
    pub fn from_request<B>(req: &http::Request<B>) -> Presented {
        let cert = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .and_then(|chain| chain.first().map(|leaf| CertNames::from_der(leaf.as_ref())));
        Presented {
            bearer: Bearer::from_headers(req.headers()),
            cert,
        }
    }
}

/// Why a caller was not recognised: for the log only; callers see `CALLER_UNAUTHENTICATED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrecognised {
    NoCredential,
    MalformedAuthorization,
    UnknownToken,
    UnknownCertificate,
    /// The token and the certificate name different callers.
    Conflicting,
}

impl Unrecognised {
    fn as_str(self) -> &'static str {
        match self {
            Unrecognised::NoCredential => "no credential",
            Unrecognised::MalformedAuthorization => "malformed authorization metadata",
            Unrecognised::UnknownToken => "unknown bearer token",
            Unrecognised::UnknownCertificate => "client certificate names no caller",
            Unrecognised::Conflicting => "token and certificate name different callers",
        }
    }
}

struct Entry {
    caller: Caller,
    token_sha256: Option<[u8; 32]>,
    cert_subject: Option<String>,
    cert_san: Option<String>,
    rpcs: AllowedRpcs,
    limits: CallerLimits,
}

/// The configured callers and their limits: one per broker, shared by every connection.
pub struct Callers {
    entries: Vec<Entry>,
    /// Present only when unauthenticated callers are explicitly allowed.
    anonymous: Option<Entry>,
}

impl Callers {
    /// From validated configuration (names, hashes and subjects are unique there).
    pub fn new(
        configured: &[CallerConfig],
        allow_unauthenticated: bool,
        clock: Arc<dyn Clock>,
    ) -> Callers {
        let entries = configured
            .iter()
            .map(|c| Entry {
                caller: Caller {
                    name: c.name.as_str().into(),
                },
                token_sha256: c.token_sha256,
                cert_subject: c.client_cert_subject.clone(),
                cert_san: c.client_cert_san.clone(),
                rpcs: c.rpcs.clone(),
                limits: CallerLimits::new(c.limits, clock.clone()),
            })
            .collect();
        let anonymous = allow_unauthenticated.then(|| Entry {
            caller: Caller {
                name: UNAUTHENTICATED_CALLER.into(),
            },
            token_sha256: None,
            cert_subject: None,
            cert_san: None,
            rpcs: AllowedRpcs::All,
            limits: CallerLimits::new(Limits::default(), clock.clone()),
        });
        Callers { entries, anonymous }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Authenticates, authorises and rate-limits one call of `rpc`.
    pub fn admit(&self, presented: &Presented, rpc: &str) -> Result<Caller, BrokerError> {
        let entry = match self.identify(presented) {
            Ok(entry) => entry,
            Err(why) => {
                tracing::warn!(rpc, reason = why.as_str(), "caller refused");
                return Err(BrokerError::CallerUnauthenticated);
            }
        };
        if !entry.rpcs.allows(rpc) {
            tracing::warn!(caller = %entry.caller, rpc, "caller may not use this RPC");
            return Err(BrokerError::CallerForbidden);
        }
        if let Err(e) = entry.limits.check(rpc) {
            tracing::debug!(caller = %entry.caller, rpc, "caller over its rate limit");
            return Err(e);
        }
        Ok(entry.caller.clone())
    }

    /// Which caller presented these credentials. Every credential presented must check out:
    /// a wrong token is refused even alongside a good certificate, so a leak is noticed.
    fn identify(&self, presented: &Presented) -> Result<&Entry, Unrecognised> {
        let by_token = match &presented.bearer {
            Bearer::Absent => None,
            Bearer::Malformed => return Err(Unrecognised::MalformedAuthorization),
            Bearer::Token(token) => Some(
                self.by_token_hash(&hash_token(token.expose()))
                    .ok_or(Unrecognised::UnknownToken)?,
            ),
        };
        let by_cert = match &presented.cert {
            None => None,
            Some(names) => names.as_ref().and_then(|n| self.by_cert(n)),
        };
        match (by_token, by_cert, &presented.cert) {
            (Some(t), Some(c), _) if !std::ptr::eq(t, c) => Err(Unrecognised::Conflicting),
            // A service mesh may give every workload a certificate: the token names the caller.
            (Some(t), _, _) => Ok(t),
            (None, Some(c), _) => Ok(c),
            (None, None, Some(_)) => Err(Unrecognised::UnknownCertificate),
            (None, None, None) => self.anonymous.as_ref().ok_or(Unrecognised::NoCredential),
        }
    }

    /// The entry whose hash equals `presented`. Every configured hash is compared, in constant
    /// time, whether or not an earlier one matched, so timing reveals nothing of the hashes.
    fn by_token_hash(&self, presented: &[u8; 32]) -> Option<&Entry> {
        let mut found = Choice::from(0);
        let mut index = 0u32;
        for (i, entry) in self.entries.iter().enumerate() {
            let Some(hash) = &entry.token_sha256 else {
                continue;
            };
            let same = hash.ct_eq(presented);
            let i = u32::try_from(i).expect("fewer than 2^32 callers: configuration is a file");
            index.conditional_assign(&i, same);
            found |= same;
        }
        bool::from(found).then(|| &self.entries[index as usize])
    }

    fn by_cert(&self, names: &CertNames) -> Option<&Entry> {
        self.entries.iter().find(|e| {
            e.cert_subject.as_deref() == Some(names.subject.as_str())
                || e.cert_san
                    .as_ref()
                    .is_some_and(|san| names.sans.iter().any(|s| s == san))
        })
    }
}

/// How the gRPC port admits callers, built once from configuration.
#[derive(Clone)]
pub struct GrpcAccess {
    pub callers: Arc<Callers>,
    /// `None`: plaintext gRPC (behind a mesh or a TLS-terminating proxy).
    pub tls: Option<ServerTlsConfig>,
    pub reflection: bool,
}

impl GrpcAccess {
    /// Refuses a configuration under which no caller could ever be admitted, and reads the TLS
    /// files (so a bad one stops start-up rather than the first handshake).
    pub fn from_config(config: &Config, clock: Arc<dyn Clock>) -> Result<GrpcAccess, String> {
        if let Some(problem) = config.callers_problem() {
            return Err(problem);
        }
        let server = &config.server;
        if server.insecure_allow_unauthenticated_callers {
            tracing::warn!(
                "INSECURE: server.insecure_allow_unauthenticated_callers is set: calls without \
                 a credential may use every RPC"
            );
        }
        let tls = server.tls.as_ref().map(server_tls).transpose()?;
        if let Some(tls) = &tls {
            tonic::transport::Server::builder()
                .tls_config(tls.clone())
                .map_err(|e| format!("server.tls: {e}"))?;
        }
        Ok(GrpcAccess {
            callers: Arc::new(Callers::new(
                &config.callers,
                server.insecure_allow_unauthenticated_callers,
                clock,
            )),
            tls,
            reflection: server.reflection,
        })
    }
}

fn server_tls(tls: &TlsConfig) -> Result<ServerTlsConfig, String> {
    let read = |field: &str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| format!("server.tls.{field}: cannot read {}: {e}", path.display()))
    };
    let identity = Identity::from_pem(
        read("cert_file", &tls.cert_file)?,
        read("key_file", &tls.key_file)?,
    );
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca_file {
        config = config
            .client_ca_root(Certificate::from_pem(read("client_ca_file", ca)?))
            .client_auth_optional(!tls.require_client_cert);
    }
    Ok(config)
}

/// The RPC a request path names: `/session_broker.v1.SessionBroker/StartLogin` gives `StartLogin`.
pub fn rpc_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Wraps the `SessionBroker` service: only admitted calls reach it; the others get the
/// documented status (with `ErrorInfo`) without touching it.
#[derive(Clone)]
pub struct CallerAuth<S> {
    inner: S,
    callers: Arc<Callers>,
}

impl<S> CallerAuth<S> {
    pub fn new(inner: S, callers: Arc<Callers>) -> Self {
        CallerAuth { inner, callers }
    }
}

impl<S: NamedService> NamedService for CallerAuth<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<Body>> for CallerAuth<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let presented = Presented::from_request(&req);
        let rpc = rpc_name(req.uri().path());
        match self.callers.admit(&presented, rpc) {
            Ok(caller) => {
                // The call's server span (telemetry::grpc), current here, carries the caller
                // in traces; log lines get it from the call's context (telemetry::call).
                tracing::Span::current().record("caller", tracing::field::display(&caller));
                let call = crate::telemetry::call::Call {
                    caller: Arc::clone(&caller.name),
                    rpc: crate::telemetry::grpc::method_of(req.uri().path()),
                };
                req.extensions_mut().insert(caller);
                // The service polled ready serves this call; its clone waits for the next one.
                let ready = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, ready);
                Box::pin(crate::telemetry::call::serve(call, async move {
                    inner.call(req).await
                }))
            }
            Err(e) => {
                let response = tonic::Status::from(e).into_http();
                Box::pin(std::future::ready(Ok(response)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::time::{Duration, SystemTime};

    const WEB_TOKEN: &str = "sbc_web-frontend-token-0123456789abcdef";
    const RX_TOKEN: &str = "sbc_prescribing-token-0123456789abcdef";

    fn rpcs(names: &[&str]) -> AllowedRpcs {
        AllowedRpcs::parse(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("valid names")
    }

    fn caller(name: &str, token: Option<&str>, rpc_names: &[&str]) -> CallerConfig {
        CallerConfig {
            name: name.into(),
            token_sha256: token.map(hash_token),
            client_cert_subject: None,
            client_cert_san: None,
            rpcs: rpcs(rpc_names),
            limits: Limits::default(),
        }
    }

    fn callers(configured: Vec<CallerConfig>, anonymous: bool) -> Callers {
        Callers::new(
            &configured,
            anonymous,
            Arc::new(ManualClock::new(SystemTime::UNIX_EPOCH)),
        )
    }

    fn with_token(token: &str) -> Presented {
        Presented {
            bearer: Bearer::Token(Secret::new(token.into())),
            cert: None,
        }
    }

    fn with_cert(subject: &str, sans: &[&str]) -> Presented {
        Presented {
            bearer: Bearer::Absent,
            cert: Some(Some(CertNames {
                subject: subject.into(),
                sans: sans.iter().map(|s| s.to_string()).collect(),
            })),
        }
    }

    fn standard() -> Callers {
        let mut mtls = caller("mesh-service", None, &["GetSession"]);
        mtls.client_cert_subject = Some("CN=mesh-service,O=Trust".into());
        let mut spiffe = caller("spiffe-service", None, &["*"]);
        spiffe.client_cert_san = Some("spiffe://trust.example/ns/rx/sa/api".into());
        callers(
            vec![
                caller(
                    "web-frontend",
                    Some(WEB_TOKEN),
                    &["StartLogin", "ExchangeCode", "Logout", "GetSession"],
                ),
                caller(
                    "prescribing",
                    Some(RX_TOKEN),
                    &["GetApiToken", "GetCurrentAal"],
                ),
                mtls,
                spiffe,
            ],
            false,
        )
    }

    fn outcome(r: Result<Caller, BrokerError>) -> Result<String, &'static str> {
        r.map(|c| c.name.to_string()).map_err(|e| match e {
            BrokerError::CallerUnauthenticated => "CALLER_UNAUTHENTICATED",
            BrokerError::CallerForbidden => "CALLER_FORBIDDEN",
            BrokerError::RateLimited { .. } => "RATE_LIMITED",
            _ => "other",
        })
    }

    #[test]
    fn callers_are_recognised_by_token_or_certificate_and_held_to_their_rpcs() {
        let c = standard();
        let cases: Vec<(&str, Presented, &str, Result<String, &str>)> = vec![
            (
                "web token",
                with_token(WEB_TOKEN),
                "StartLogin",
                Ok("web-frontend".into()),
            ),
            (
                "web token, other RPC",
                with_token(WEB_TOKEN),
                "GetApiToken",
                Err("CALLER_FORBIDDEN"),
            ),
            (
                "rx token",
                with_token(RX_TOKEN),
                "GetApiToken",
                Ok("prescribing".into()),
            ),
            (
                "rx token, admin RPC",
                with_token(RX_TOKEN),
                "RevokeUserSessions",
                Err("CALLER_FORBIDDEN"),
            ),
            (
                "unknown token",
                with_token("sbc_guess"),
                "GetSession",
                Err("CALLER_UNAUTHENTICATED"),
            ),
            (
                "token with a suffix",
                with_token(&format!("{WEB_TOKEN}x")),
                "GetSession",
                Err("CALLER_UNAUTHENTICATED"),
            ),
            (
                "no credential",
                Presented {
                    bearer: Bearer::Absent,
                    cert: None,
                },
                "GetSession",
                Err("CALLER_UNAUTHENTICATED"),
            ),
            (
                "malformed authorization",
                Presented {
                    bearer: Bearer::Malformed,
                    cert: None,
                },
                "GetSession",
                Err("CALLER_UNAUTHENTICATED"),
            ),
            (
                "subject",
                with_cert("CN=mesh-service,O=Trust", &[]),
                "GetSession",
                Ok("mesh-service".into()),
            ),
            (
                "subject, other RPC",
                with_cert("CN=mesh-service,O=Trust", &[]),
                "StartLogin",
                Err("CALLER_FORBIDDEN"),
            ),
            (
                "subject differs in part",
                with_cert("CN=mesh-service", &[]),
                "GetSession",
                Err("CALLER_UNAUTHENTICATED"),
            ),
            (
                "SAN",
                with_cert(
                    "CN=anything",
                    &["api.example", "spiffe://trust.example/ns/rx/sa/api"],
                ),
                "Logout",
                Ok("spiffe-service".into()),
            ),
            (
                "unknown certificate",
                with_cert("CN=stranger", &["spiffe://x"]),
                "GetSession",
                Err("CALLER_UNAUTHENTICATED"),
            ),
            (
                "certificate that did not parse",
                Presented {
                    bearer: Bearer::Absent,
                    cert: Some(None),
                },
                "GetSession",
                Err("CALLER_UNAUTHENTICATED"),
            ),
            (
                "token beside an unknown mesh certificate",
                Presented {
                    bearer: Bearer::Token(Secret::new(WEB_TOKEN.into())),
                    cert: Some(Some(CertNames::default())),
                },
                "StartLogin",
                Ok("web-frontend".into()),
            ),
            (
                "token and certificate of different callers",
                Presented {
                    bearer: Bearer::Token(Secret::new(WEB_TOKEN.into())),
                    cert: with_cert("CN=mesh-service,O=Trust", &[]).cert,
                },
                "GetSession",
                Err("CALLER_UNAUTHENTICATED"),
            ),
            (
                "wrong token beside a good certificate",
                Presented {
                    bearer: Bearer::Token(Secret::new("sbc_wrong".into())),
                    cert: with_cert("CN=mesh-service,O=Trust", &[]).cert,
                },
                "GetSession",
                Err("CALLER_UNAUTHENTICATED"),
            ),
        ];
        for (what, presented, rpc, want) in cases {
            assert_eq!(outcome(c.admit(&presented, rpc)), want, "{what}");
        }
    }

    #[test]
    fn unauthenticated_callers_get_in_only_when_explicitly_allowed_and_only_bare() {
        let bare = || Presented {
            bearer: Bearer::Absent,
            cert: None,
        };
        let strict = callers(vec![caller("web", Some(WEB_TOKEN), &["*"])], false);
        assert_eq!(
            outcome(strict.admit(&bare(), "GetSession")),
            Err("CALLER_UNAUTHENTICATED")
        );
        let open = callers(vec![caller("web", Some(WEB_TOKEN), &["*"])], true);
        assert_eq!(
            outcome(open.admit(&bare(), "GetSession")),
            Ok(UNAUTHENTICATED_CALLER.into())
        );
        assert_eq!(
            outcome(open.admit(&with_token(WEB_TOKEN), "GetSession")),
            Ok("web".into())
        );
        assert_eq!(
            outcome(open.admit(&with_token("sbc_wrong"), "GetSession")),
            Err("CALLER_UNAUTHENTICATED"),
            "a wrong credential is refused even when none is needed"
        );
        let none = callers(vec![], false);
        assert!(none.is_empty());
        assert_eq!(
            outcome(none.admit(&with_token(WEB_TOKEN), "GetSession")),
            Err("CALLER_UNAUTHENTICATED")
        );
    }

    #[test]
    fn each_caller_has_its_own_rate_limit() {
        let clock = Arc::new(ManualClock::new(SystemTime::UNIX_EPOCH));
        let mut slow = caller("slow", Some(WEB_TOKEN), &["*"]);
        slow.limits = Limits {
            rate_per_second: 1,
            logins_per_minute: 600,
        };
        let c = Callers::new(
            &[slow, caller("other", Some(RX_TOKEN), &["*"])],
            false,
            clock.clone(),
        );
        for _ in 0..2 {
            c.admit(&with_token(WEB_TOKEN), "GetSession")
                .expect("burst of 2");
        }
        let Err(BrokerError::RateLimited { retry_after }) =
            c.admit(&with_token(WEB_TOKEN), "GetSession")
        else {
            panic!("over the limit")
        };
        assert_eq!(retry_after, Duration::from_secs(1));
        c.admit(&with_token(RX_TOKEN), "GetSession")
            .expect("another caller is unaffected");
        clock.advance(Duration::from_secs(1));
        c.admit(&with_token(WEB_TOKEN), "GetSession")
            .expect("refilled");
    }

    #[test]
    fn allow_lists_name_real_rpcs_or_everything() {
        assert_eq!(rpcs(&["*"]), AllowedRpcs::All);
        assert!(rpcs(&["*"]).allows("RevokeUserSessions"));
        let some = rpcs(&["StartLogin", "ExchangeCode"]);
        assert!(some.allows("StartLogin") && some.allows("ExchangeCode"));
        assert!(!some.allows("GetSession") && !some.allows("startlogin"));
        assert!(!rpcs(&[]).allows("StartLogin"));
        let bad = |names: &[&str]| {
            AllowedRpcs::parse(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect_err("invalid")
        };
        assert_eq!(
            bad(&["StartLogin", "Startlogin", "Delete"]),
            ["Startlogin", "Delete"]
        );
        assert_eq!(bad(&["*", "StartLogin"]).len(), 1);
    }

    #[test]
    fn the_rpc_list_is_exactly_the_services_methods() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(super::super::pb::FILE_DESCRIPTOR_SET)
            .expect("the compiled descriptor set decodes");
        let methods: BTreeSet<String> = set
            .file
            .iter()
            .flat_map(|f| &f.service)
            .filter(|s| s.name() == "SessionBroker")
            .flat_map(|s| &s.method)
            .map(|m| m.name().to_owned())
            .collect();
        let listed: BTreeSet<String> = RPC_NAMES.iter().map(|s| s.to_string()).collect();
        assert_eq!(listed, methods);
    }

    #[test]
    fn bearer_metadata_is_read_strictly() {
        let read = |values: &[&str]| {
            let mut h = http::HeaderMap::new();
            for v in values {
                h.append(
                    http::header::AUTHORIZATION,
                    http::HeaderValue::from_str(v).expect("test header"),
                );
            }
            Bearer::from_headers(&h)
        };
        let token = |t: &str| Bearer::Token(Secret::new(t.into()));
        assert_eq!(read(&[]), Bearer::Absent);
        assert_eq!(read(&["Bearer abc.DEF-_~+/="]), token("abc.DEF-_~+/="));
        assert_eq!(read(&["bearer abc"]), token("abc"));
        assert_eq!(read(&["BEARER  abc "]), token("abc"));
        for bad in [
            "",
            "Bearer",
            "Bearer ",
            "Basic dXNlcjpwYXNz",
            "Token abc",
            "abc",
            "Bearer a b",
        ] {
            assert_eq!(read(&[bad]), Bearer::Malformed, "{bad:?}");
        }
        assert_eq!(
            read(&[&format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1))]),
            Bearer::Malformed
        );
        assert_eq!(read(&["Bearer a", "Bearer b"]), Bearer::Malformed);
    }

    #[test]
    fn token_hashes_are_hex_sha256() {
        // sha256("abc"), a published test vector.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(crate::hex::encode(&hash_token("abc")), abc);
        assert_eq!(parse_token_hash(abc), Some(hash_token("abc")));
        assert_eq!(
            parse_token_hash(&abc.to_uppercase()),
            Some(hash_token("abc"))
        );
        for bad in [
            "",
            &abc[..62],
            &format!("{abc}00"),
            &abc.replace('b', "g"),
            &format!("+{}", &abc[1..]),
            &"é".repeat(32),
        ] {
            assert_eq!(parse_token_hash(bad), None, "{bad:?}");
        }
        let (token, hash) = new_token();
        assert!(token.expose().starts_with("sbc_") && token.expose().len() >= 47);
        assert_eq!(parse_token_hash(&hash), Some(hash_token(token.expose())));
        assert_ne!(new_token().0, token, "tokens are random");
    }

    #[test]
    fn certificates_offer_their_subject_and_uri_and_dns_names() {
        use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
        let mut params =
            CertificateParams::new(vec!["api.example".to_owned()]).expect("valid params");
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Example Trust");
        params.distinguished_name.push(DnType::CommonName, "rx-api");
        params.subject_alt_names.push(SanType::URI(
            "spiffe://example/ns/rx".try_into().expect("ascii"),
        ));
        params
            .subject_alt_names
            .push(SanType::IpAddress([10, 0, 0, 1].into()));
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("certificate");
        let names = CertNames::from_der(cert.der()).expect("parses");
        assert_eq!(names.subject, "CN=rx-api,O=Example Trust");
        assert_eq!(names.sans, ["api.example", "spiffe://example/ns/rx"]);
        // What configuration canonicalises a subject to is what a certificate shows.
        let configured: x509_cert::name::RdnSequence =
            "CN=rx-api,O=Example Trust".parse().expect("RFC 4514");
        assert_eq!(configured.to_string(), names.subject);

        assert_eq!(CertNames::from_der(b"not DER"), None);
        assert_eq!(
            CertNames::from_der(&cert.der()[..cert.der().len() - 1]),
            None
        );
    }

    #[test]
    fn rpc_names_come_from_the_path() {
        assert_eq!(
            rpc_name("/session_broker.v1.SessionBroker/StartLogin"),
            "StartLogin"
        );
        assert_eq!(rpc_name("/x"), "x");
        assert_eq!(rpc_name(""), "");
    }
}
