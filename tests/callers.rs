//! End to end: which calling services may use the broker, over real gRPC. Bearer service tokens
//! and client certificates (mutual TLS, with a throwaway CA made here), RPC allow-lists, rate
//! limits; health and reflection open to all; no caller token in any log line.

mod common;

use cis2_session_broker::grpc::auth::hash_token;
use cis2_session_broker::grpc::pb;
use cis2_session_broker::hex;
use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, SanType,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_types::StatusExt;

const WEB_TOKEN: &str = "sbc_web-frontend-7d1f0c2b9a8e4d6f8a1b3c5d7e9f0a2b";
const ADMIN_TOKEN: &str = "sbc_admin-console-1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d";

fn hash(token: &str) -> String {
    hex::encode(&hash_token(token))
}

/// The harness's own caller, a web front end limited to the sign-in RPCs, and an admin caller.
fn callers_toml(extra: &str) -> String {
    format!(
        r#"{harness}
[[callers]]
name = "web-frontend"
token_sha256 = "{web}"
rpcs = ["StartLogin", "ExchangeCode", "Logout", "GetSession"]

[[callers]]
name = "admin-console"
token_sha256 = "{admin}"
rpcs = ["ListUserSessions", "RevokeUserSessions", "ListApiPolicies"]
{extra}
"#,
        harness = harness_caller_toml(),
        web = hash(WEB_TOKEN),
        admin = hash(ADMIN_TOKEN),
    )
}

async fn start(extra_callers: &str, extra_toml: &str) -> Harness {
    Harness::start_with(Options {
        store: Store::Memory,
        callers_toml: Some(callers_toml(extra_callers)),
        extra_toml: extra_toml.to_owned(),
        ..Options::default()
    })
    .await
}

async fn get_session(client: &mut Client) -> Result<pb::Session, tonic::Status> {
    client
        .get_session(pb::GetSessionRequest {
            session_token: "cis2sb_not-a-session".into(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn list_policies(client: &mut Client) -> Result<(), tonic::Status> {
    client
        .list_api_policies(pb::ListApiPoliciesRequest {})
        .await
        .map(|_| ())
}

fn assert_refused(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, why: &str) {
    let status = result.expect_err(why);
    assert_eq!(status.code(), code, "{why}: {status:?}");
    let want = match code {
        Code::Unauthenticated => "CALLER_UNAUTHENTICATED",
        Code::PermissionDenied => "CALLER_FORBIDDEN",
        _ => unreachable!("only caller refusals are asserted here"),
    };
    assert_eq!(reason(&status), want, "{why}");
    assert_eq!(
        status.get_details_error_info().map(|i| i.domain).as_deref(),
        Some("session-broker"),
        "{why}"
    );
}

#[tokio::test]
async fn callers_without_a_valid_credential_are_unauthenticated() {
    let h = start("", "").await;
    for (why, token) in [
        ("no credential", None),
        ("unknown token", Some("sbc_guessed-token")),
        (
            "a configured token with a byte more",
            Some(&*format!("{WEB_TOKEN}x")),
        ),
        ("the hash itself as the token", Some(&*hash(WEB_TOKEN))),
    ] {
        let mut client = h.client_with_token(token);
        assert_refused(get_session(&mut client).await, Code::Unauthenticated, why);
        assert_refused(
            client
                .start_login(Harness::login_request(pb::Aal::Aal2))
                .await,
            Code::Unauthenticated,
            why,
        );
    }
    // Not the bearer scheme at all.
    let mut req = tonic::Request::new(pb::ListApiPoliciesRequest {});
    req.metadata_mut().insert(
        "authorization",
        "Basic d2ViOnBhc3N3b3Jk".parse().expect("ascii"),
    );
    let mut bare = pb::session_broker_client::SessionBrokerClient::new(h.channel.clone());
    assert_refused(
        bare.list_api_policies(req).await,
        Code::Unauthenticated,
        "basic auth",
    );
    h.stop().await;
}

#[tokio::test]
async fn a_known_caller_may_use_only_its_rpcs() {
    let h = start("", "").await;
    let mut web = h.client_with_token(Some(WEB_TOKEN));
    let started = web
        .start_login(Harness::login_request(pb::Aal::Aal2))
        .await
        .expect("the web front end may start a sign-in");
    assert!(!started.get_ref().authorization_url.is_empty());
    let err = get_session(&mut web).await.expect_err("no such session");
    assert_eq!(
        reason(&err),
        "SESSION_INVALID",
        "GetSession is allowed: the broker itself answers"
    );
    assert_refused(
        web.get_current_aal(pb::GetCurrentAalRequest {
            session_token: "cis2sb_x".into(),
        })
        .await,
        Code::PermissionDenied,
        "GetCurrentAal is not in the web front end's list",
    );
    assert_refused(
        web.revoke_user_sessions(pb::RevokeUserSessionsRequest {
            uid: "656005750107".into(),
        })
        .await,
        Code::PermissionDenied,
        "admin RPCs are for the admin caller",
    );
    assert_refused(
        list_policies(&mut web).await,
        Code::PermissionDenied,
        "ListApiPolicies",
    );

    let mut admin = h.client_with_token(Some(ADMIN_TOKEN));
    list_policies(&mut admin)
        .await
        .expect("the admin caller may list policies");
    assert_refused(
        admin
            .start_login(Harness::login_request(pb::Aal::Aal2))
            .await,
        Code::PermissionDenied,
        "the admin caller may not start sign-ins",
    );
    // The harness's caller allows "*".
    list_policies(&mut h.client.clone())
        .await
        .expect("a caller with [\"*\"] may call anything");
    h.stop().await;
}

#[tokio::test]
async fn health_and_reflection_need_no_credential_and_reflection_can_be_switched_off() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    let h = start("", "").await;
    let mut health = HealthClient::new(h.channel.clone());
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers without a credential");
    let services = list_services(h.channel.clone())
        .await
        .expect("reflection answers without a credential");
    assert!(services.contains(&"session_broker.v1.SessionBroker".to_owned()));
    h.stop().await;

    let h = Harness::start_with(Options {
        store: Store::Memory,
        env: vec![("BROKER__SERVER__REFLECTION".into(), "false".into())],
        ..Options::default()
    })
    .await;
    let err = list_services(h.channel.clone())
        .await
        .expect_err("reflection is off");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    HealthClient::new(h.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health stays on");
    list_policies(&mut h.client.clone())
        .await
        .expect("the service itself is unaffected");
    h.stop().await;
}

async fn list_services(channel: Channel) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tonic::codegen::tokio_stream::iter(vec![req]))
        .await?
        .into_inner();
    match stream.message().await?.and_then(|m| m.message_response) {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("not a service list: {other:?}"),
    }
}

const SLOW_TOKEN: &str = "sbc_slow-caller-5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b";
const LOGINS_TOKEN: &str = "sbc_login-bound-0f1e2d3c4b5a69788796a5b4c3d2e1f0";

#[tokio::test]
async fn a_caller_over_its_limits_is_resource_exhausted_with_a_retry_hint() {
    use cis2_session_broker::clock::{Clock, ManualClock};
    // The limits read the broker's clock: frozen here, so the counts are exact.
    let clock = Arc::new(ManualClock::new(std::time::SystemTime::now()));
    let limited = format!(
        r#"
[[callers]]
name = "slow"
token_sha256 = "{}"
rpcs = ["*"]
rate_per_second = 1

[[callers]]
name = "login-bound"
token_sha256 = "{}"
rpcs = ["*"]
max_pending_logins_per_minute = 2
"#,
        hash(SLOW_TOKEN),
        hash(LOGINS_TOKEN)
    );
    let h = Harness::start_with(Options {
        store: Store::Memory,
        callers_toml: Some(callers_toml(&limited)),
        clock: Some(clock.clone() as Arc<dyn Clock>),
        ..Options::default()
    })
    .await;

    let mut slow = h.client_with_token(Some(SLOW_TOKEN));
    for i in 0..2 {
        list_policies(&mut slow)
            .await
            .unwrap_or_else(|e| panic!("call {i} is within the burst of twice the rate: {e:?}"));
    }
    let err = list_policies(&mut slow).await.expect_err("over the rate");
    assert_rate_limited(&err, Duration::from_secs(1));
    list_policies(&mut h.client.clone())
        .await
        .expect("other callers have their own buckets");
    clock.advance(Duration::from_secs(1));
    list_policies(&mut slow)
        .await
        .expect("a second later there is a token again");

    let mut logins = h.client_with_token(Some(LOGINS_TOKEN));
    for i in 0..2 {
        logins
            .start_login(Harness::login_request(pb::Aal::Aal2))
            .await
            .unwrap_or_else(|e| panic!("sign-in {i} is within the bound: {e:?}"));
    }
    let err = logins
        .start_login(Harness::login_request(pb::Aal::Aal2))
        .await
        .expect_err("a third sign-in in the minute");
    assert_rate_limited(&err, Duration::from_secs(30));
    list_policies(&mut logins)
        .await
        .expect("the sign-in bound leaves other RPCs alone");
    h.stop().await;
}

fn assert_rate_limited(err: &tonic::Status, retry: Duration) {
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(reason(err), "RATE_LIMITED");
    assert_eq!(
        err.get_details_retry_info().and_then(|r| r.retry_delay),
        Some(retry),
        "RetryInfo says when a token is back"
    );
}

// ---- mutual TLS ------------------------------------------------------------------------------

/// A throwaway PKI in a temporary directory: a CA, the broker's server certificate, and client
/// certificates on demand.
struct Pki {
    dir: PathBuf,
    ca_pem: String,
    ca: Issuer<'static, KeyPair>,
}

const SPIFFE_ID: &str = "spiffe://test.example/ns/rx/sa/api";

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "sb-callers-{}",
            cis2_session_broker::session::token::random_urlsafe(6).replace(['-', '_'], "x")
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (ca_pem, ca) = new_ca("Test Caller CA");
        std::fs::write(dir.join("ca.pem"), &ca_pem).expect("write CA");
        let pki = Pki { dir, ca_pem, ca };
        let mut server = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let (cert, key) = pki.sign(server);
        std::fs::write(pki.dir.join("server.pem"), cert).expect("write cert");
        std::fs::write(pki.dir.join("server.key"), key).expect("write key");
        pki
    }

    fn sign(&self, params: CertificateParams) -> (String, String) {
        let key = KeyPair::generate().expect("key generation");
        let cert = params.signed_by(&key, &self.ca).expect("signing");
        (cert.pem(), key.serialize_pem())
    }

    /// A client certificate with subject `O=<org>,CN=<cn>` and these URI SANs.
    fn client(&self, org: &str, cn: &str, uris: &[&str]) -> Identity {
        let (cert, key) = self.sign(client_params(org, cn, uris));
        Identity::from_pem(cert, key)
    }

    fn server_toml(&self, require_client_cert: bool) -> String {
        let path = |f: &str| self.dir.join(f).display().to_string();
        format!(
            "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\nrequire_client_cert = {require_client_cert}\n",
            path("server.pem"),
            path("server.key"),
            path("ca.pem"),
        )
    }

    fn client_tls(&self, identity: Option<Identity>) -> ClientTlsConfig {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("localhost");
        match identity {
            Some(id) => tls.identity(id),
            None => tls,
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn new_ca(cn: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("key generation");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).expect("self-signed CA");
    (cert.pem(), Issuer::new(params, key))
}

fn client_params(org: &str, cn: &str, uris: &[&str]) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name = DistinguishedName::new();
    // Encoded O then CN, so RFC 4514 (most specific first) reads "CN=...,O=...".
    params
        .distinguished_name
        .push(DnType::OrganizationName, org);
    params.distinguished_name.push(DnType::CommonName, cn);
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().expect("ASCII URI")))
        .collect();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

fn mtls_callers() -> String {
    callers_toml(&format!(
        r#"
[[callers]]
name = "mesh-client"
client_cert_subject = "CN=mesh-client,O=Test Trust"
rpcs = ["ListApiPolicies"]

[[callers]]
name = "spiffe-client"
client_cert_san = "{SPIFFE_ID}"
rpcs = ["GetSession"]
"#
    ))
}

/// A client over TLS with `identity` (or none) and no bearer token.
async fn tls_client(h: &Harness, tls: ClientTlsConfig) -> Result<Client, String> {
    let channel = Channel::from_shared(format!("https://{}", h.grpc_addr))
        .expect("uri")
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    Ok(
        pb::session_broker_client::SessionBrokerClient::with_interceptor(
            channel,
            BearerToken::new(None),
        ),
    )
}

#[tokio::test]
async fn a_client_certificate_names_the_caller_and_others_are_refused() {
    let pki = Pki::new();
    let h = Harness::start_with(Options {
        store: Store::Memory,
        extra_toml: pki.server_toml(false),
        callers_toml: Some(mtls_callers()),
        client_tls: Some(pki.client_tls(None)),
        ..Options::default()
    })
    .await;

    // Named by subject: may list policies, nothing else.
    let mut mesh = tls_client(
        &h,
        pki.client_tls(Some(pki.client("Test Trust", "mesh-client", &[]))),
    )
    .await
    .expect("connects");
    list_policies(&mut mesh)
        .await
        .expect("the certificate names mesh-client");
    assert_refused(
        get_session(&mut mesh).await,
        Code::PermissionDenied,
        "mesh-client may not read sessions",
    );

    // Named by a SPIFFE ID, whatever the subject.
    let spiffe_id = pki.client("Elsewhere", "pod-7f9c", &[SPIFFE_ID]);
    let mut spiffe = tls_client(&h, pki.client_tls(Some(spiffe_id)))
        .await
        .expect("connects");
    let err = get_session(&mut spiffe).await.expect_err("no such session");
    assert_eq!(
        reason(&err),
        "SESSION_INVALID",
        "spiffe-client may call GetSession"
    );
    assert_refused(
        list_policies(&mut spiffe).await,
        Code::PermissionDenied,
        "spiffe-client may only read sessions",
    );

    // From the right CA, but no caller has its name.
    let stranger = pki.client("Test Trust", "stranger", &["spiffe://test.example/other"]);
    let mut stranger = tls_client(&h, pki.client_tls(Some(stranger)))
        .await
        .expect("connects");
    assert_refused(
        list_policies(&mut stranger).await,
        Code::Unauthenticated,
        "a certificate naming no caller",
    );

    // No certificate and no token.
    let mut anonymous = tls_client(&h, pki.client_tls(None))
        .await
        .expect("connects");
    assert_refused(
        list_policies(&mut anonymous).await,
        Code::Unauthenticated,
        "TLS without a client certificate or a token",
    );
    // Over the same TLS, a bearer token still works, and health needs nothing.
    list_policies(&mut h.client.clone())
        .await
        .expect("bearer tokens work over TLS");
    tonic_health::pb::health_client::HealthClient::new(h.channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health needs no certificate");

    // The right subject from another CA never gets past the handshake.
    let other = Pki::new();
    let forged = other.client("Test Trust", "mesh-client", &[]);
    let outcome = match tls_client(&h, pki.client_tls(Some(forged))).await {
        Err(e) => Err(e),
        Ok(mut c) => list_policies(&mut c).await.map_err(|s| format!("{s:?}")),
    };
    assert!(
        outcome.is_err(),
        "a certificate from an unknown CA must be refused"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_required_client_certificate_keeps_out_connections_without_one() {
    let pki = Pki::new();
    let mesh = || pki.client("Test Trust", "mesh-client", &[]);
    let h = Harness::start_with(Options {
        store: Store::Memory,
        extra_toml: pki.server_toml(true),
        callers_toml: Some(mtls_callers()),
        client_tls: Some(pki.client_tls(Some(mesh()))),
        ..Options::default()
    })
    .await;
    let mut with_cert = tls_client(&h, pki.client_tls(Some(mesh())))
        .await
        .expect("connects");
    list_policies(&mut with_cert)
        .await
        .expect("the certificate names mesh-client");
    let outcome = match tls_client(&h, pki.client_tls(None)).await {
        Err(e) => Err(e),
        Ok(mut c) => list_policies(&mut c).await.map_err(|s| format!("{s:?}")),
    };
    assert!(outcome.is_err(), "no certificate, no connection");
    h.stop().await;
}

// ---- logs ------------------------------------------------------------------------------------

#[tokio::test]
async fn caller_tokens_never_reach_a_log_line_or_an_error() {
    // What `serve` (JSON) and `dev` (text) would print, at every level.
    let (json_logs, logs) = capture_logs();

    let limited = format!(
        "[[callers]]\nname = \"slow\"\ntoken_sha256 = \"{}\"\nrpcs = [\"GetSession\"]\nrate_per_second = 1\n",
        hash(SLOW_TOKEN)
    );
    let h = start(&limited, "").await;
    let mut statuses = Vec::new();
    // Admitted, signed in end to end (events inside the call carry the caller's span) ...
    let ex = h
        .sign_in(pb::Aal::Aal2, SMARTCARD_AND_PASSKEY, None)
        .await
        .expect("signed in");
    h.current_aal(&ex.session_token).await.expect("live");
    // ... forbidden, unknown, malformed and rate limited.
    let mut web = h.client_with_token(Some(WEB_TOKEN));
    statuses.push(list_policies(&mut web).await.expect_err("forbidden"));
    let guessed = format!("{WEB_TOKEN}-guessed");
    statuses.push(
        list_policies(&mut h.client_with_token(Some(&guessed)))
            .await
            .expect_err("unknown"),
    );
    let mut slow = h.client_with_token(Some(SLOW_TOKEN));
    for _ in 0..4 {
        if let Err(e) = get_session(&mut slow).await {
            statuses.push(e);
        }
    }
    h.stop().await;

    let text = logs.text();
    assert!(
        text.contains("caller refused") && text.contains("caller may not use this RPC"),
        "the refusals were logged: the capture works"
    );
    let started = text
        .lines()
        .find(|line| line.contains("sign-in started"))
        .expect("StartLogin logged");
    assert!(
        started.ends_with(&format!(" caller={CALLER_NAME} rpc=StartLogin")),
        "events inside a call carry the caller's name: {started}"
    );
    let json = json_logs.text();
    let started: serde_json::Value = json
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["message"] == "sign-in started")
        .expect("StartLogin logged as JSON");
    assert_eq!(started["caller"], CALLER_NAME, "{started}");
    assert_eq!(started["rpc"], "StartLogin", "{started}");
    let refused = text
        .lines()
        .find(|line| line.contains("caller refused"))
        .expect("a refusal logged");
    assert!(
        !refused.contains(" caller="),
        "a refused call has no caller: {refused}"
    );
    let text = format!("{text}{json}");
    for (what, token) in [
        ("harness token", CALLER_TOKEN),
        ("web token", WEB_TOKEN),
        ("slow token", SLOW_TOKEN),
        ("guessed token", guessed.as_str()),
    ] {
        assert!(!text.contains(token), "the {what} reached the log");
        for s in &statuses {
            assert!(
                !format!("{s:?}").contains(token),
                "the {what} reached an error"
            );
        }
    }
}
