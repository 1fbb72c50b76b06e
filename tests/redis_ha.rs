//! Redis as users run it: ACL users and key prefixes, TLS with a private CA, a Sentinel
//! failover in the middle of a run, and a whole sign-in against a Redis Cluster.
//!
//! The servers come from `scripts/test.sh`: `REDIS_URL` (a private plain Redis),
//! `REDIS_CLUSTER_URLS`, `REDIS_SENTINEL_URLS` and `REDIS_SENTINEL_MASTER`. The TLS test starts
//! its own `redis-server`. Without them these tests fail, they never skip.

mod common;

use cis2_session_broker::grpc::pb;
use cis2_session_broker::session::redis::{RedisMode, RedisSettings, RedisStore, RedisTopology};
use cis2_session_broker::session::token::random_urlsafe;
use cis2_session_broker::session::{SessionId, SessionStore, SessionToken, StoreError};
use common::{Harness, Options, SMARTCARD_AND_PASSKEY};
use std::time::{Duration, Instant};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run these tests through scripts/test.sh (they never skip)")
    })
}

fn env_urls(name: &str) -> Vec<String> {
    env(name).split(',').map(str::to_owned).collect()
}

fn settings(url: String, prefix: &str, timeout: Duration) -> RedisSettings {
    RedisSettings {
        url,
        key_prefix: prefix.to_owned(),
        connect_timeout: timeout,
        command_timeout: timeout,
    }
}

fn new_id() -> SessionId {
    SessionToken::generate().id()
}

/// A little of every kind of store call: plain commands, a MULTI/EXEC and the Lua scripts.
async fn exercise(store: &RedisStore) -> Result<(), StoreError> {
    let id = new_id();
    let ttl = Duration::from_secs(30);
    assert!(store.create_session(&id, b"sealed", ttl).await?);
    let got = store.get_session(&id).await?.expect("just created");
    assert_eq!(got.sealed, b"sealed");
    assert!(store.put_token(&id, "pds", b"tok", ttl).await?);
    assert!(store.acquire_lock(&id, "pds", "me", ttl).await?);
    assert!(store.renew_lock(&id, "pds", "me", ttl).await?);
    assert!(store.release_lock(&id, "pds", "me").await?);
    let (_, tokens) = store
        .get_session_with_tokens(&id)
        .await?
        .expect("still there");
    assert_eq!(tokens, vec![("pds".to_owned(), b"tok".to_vec())]);
    assert!(store.delete_session(&id).await?);
    store.ping().await
}

async fn admin(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("REDIS_URL parses")
        .get_multiplexed_async_connection()
        .await
        .expect("the private Redis answers")
}

fn with_credentials(url: &str, user: &str, password: &str) -> String {
    let mut url = url::Url::parse(url).expect("REDIS_URL parses");
    url.set_username(user).expect("a redis:// URL takes a user");
    url.set_password(Some(password))
        .expect("a redis:// URL takes a password");
    url.to_string()
}

#[tokio::test]
async fn an_acl_user_confined_to_its_prefix_can_run_the_store() {
    let base = env("REDIS_URL");
    let mut conn = admin(&base).await;
    let user = format!("broker-{}", random_urlsafe(6).replace(['-', '_'], "x"));
    let password = format!("pw-{}", random_urlsafe(12));
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(format!(">{password}"))
        .arg("~sb-acl:*")
        .arg("+@all")
        .query_async(&mut conn)
        .await
        .expect("ACL SETUSER works on the private Redis");
    let prefix = format!("sb-acl:{}:", random_urlsafe(8));
    let timeout = Duration::from_millis(500);

    // Credentials in the URL.
    let in_url = RedisStore::new(settings(
        with_credentials(&base, &user, &password),
        &prefix,
        timeout,
    ))
    .expect("valid settings");
    exercise(&in_url)
        .await
        .expect("the ACL user runs the store");

    // Credentials as store.username / store.password (the password from the environment).
    let topology = RedisTopology {
        urls: vec![base.clone()],
        username: Some(user.clone()),
        password: Some(password.clone()),
        ..RedisTopology::default()
    };
    let separate =
        RedisStore::new(settings(topology.to_url(), &prefix, timeout)).expect("valid settings");
    exercise(&separate)
        .await
        .expect("the ACL user runs the store with separate credentials");

    // A prefix outside the user's key pattern: refused by Redis, reported as unavailable.
    let outside = RedisStore::new(settings(
        with_credentials(&base, &user, &password),
        "sb-other:",
        timeout,
    ))
    .expect("valid settings");
    match outside.create_session(&new_id(), b"s", timeout).await {
        Err(StoreError::Unavailable(cause)) => assert!(cause.contains("NOPERM"), "{cause}"),
        other => panic!("a key outside the ACL pattern was written: {other:?}"),
    }

    // A wrong password: every call is unavailable, and nothing says what the password was.
    let wrong = "wrong-password-7c1d";
    let refused = RedisStore::new(settings(
        with_credentials(&base, &user, wrong),
        &prefix,
        timeout,
    ))
    .expect("valid settings");
    for outcome in [
        refused.ping().await.map(|_| ()),
        refused
            .create_session(&new_id(), b"s", timeout)
            .await
            .map(|_| ()),
        refused.get_session(&new_id()).await.map(|_| ()),
    ] {
        match outcome {
            Err(StoreError::Unavailable(cause)) => {
                assert!(!cause.contains(wrong), "{cause}");
                assert!(!cause.contains(&password), "{cause}");
            }
            Ok(()) => panic!("a wrong password was accepted"),
        }
    }
    let shown = format!("{refused:?}");
    assert!(!shown.contains(wrong), "{shown}");

    let _: i64 = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut conn)
        .await
        .expect("ACL DELUSER works");
}

// ---- TLS ---------------------------------------------------------------------------------------

/// A private CA and a `localhost` certificate it signed, as PEM files in `dir`.
fn write_tls_files(dir: &std::path::Path) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("key generation");
    let mut ca_params = CertificateParams::new(Vec::new()).expect("CA params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "redis test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("self-signed CA");
    let ca = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("key generation");
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("server params")
        .signed_by(&key, &ca)
        .expect("signing");
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let (ca_file, cert_file, key_file) = (path("ca.pem"), path("server.pem"), path("server.key"));
    std::fs::write(&ca_file, ca_cert.pem()).expect("write CA");
    std::fs::write(&cert_file, cert.pem()).expect("write certificate");
    std::fs::write(&key_file, key.serialize_pem()).expect("write key");
    (ca_file, cert_file, key_file)
}

/// A redis-server that stops with the test.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port")
}

#[tokio::test]
async fn rediss_with_a_private_ca_works_and_an_unknown_ca_is_refused() {
    let dir = std::env::temp_dir().join(format!("sb-redis-tls-{}", random_urlsafe(8)));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (ca_file, cert_file, key_file) = write_tls_files(&dir);
    let port = free_port();
    let _server = Server(
        std::process::Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--tls-cert-file", &cert_file, "--tls-key-file", &key_file])
            .args(["--tls-ca-cert-file", &ca_file, "--tls-auth-clients", "no"])
            .args(["--dir", &dir.to_string_lossy()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (built with TLS, as Debian's is) starts"),
    );
    let url = format!("rediss://localhost:{port}");
    let trusted = RedisTopology {
        urls: vec![url.clone()],
        tls_ca_file: Some(ca_file.clone()),
        ..RedisTopology::default()
    };
    let store = RedisStore::new(settings(
        trusted.to_url(),
        "sb-tls:",
        Duration::from_millis(1_000),
    ))
    .expect("valid settings");
    // The server may take a moment to listen.
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.ping().await.is_err() {
        assert!(Instant::now() < deadline, "the TLS Redis never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    exercise(&store).await.expect("the store works over TLS");

    // The system trust store does not know the private CA: refused, cleanly.
    let untrusted = RedisStore::new(settings(url, "sb-tls:", Duration::from_millis(1_000)))
        .expect("valid settings");
    match untrusted.ping().await {
        Err(StoreError::Unavailable(_)) => {}
        Ok(()) => panic!("a certificate from an unknown CA was accepted"),
    }

    // A CA file that is not one is refused at start-up, naming the setting.
    let bogus = dir.join("bogus.pem");
    std::fs::write(&bogus, "not a certificate").expect("write");
    let bad = RedisTopology {
        tls_ca_file: Some(bogus.to_string_lossy().into_owned()),
        ..trusted
    };
    let err = RedisStore::new(settings(bad.to_url(), "sb-tls:", Duration::from_secs(1)))
        .expect_err("a bogus CA file");
    assert!(err.to_string().contains("tls_ca_file"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- Sentinel ----------------------------------------------------------------------------------

async fn sentinel_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("sentinel URL parses")
        .get_multiplexed_async_connection()
        .await
        .expect("a sentinel answers")
}

/// The master's address as the sentinel names it. A loaded machine can make one query time out,
/// so it is asked again (for up to 30 s) rather than failing the test on a slow answer.
async fn master_addr(sentinel: &mut redis::aio::MultiplexedConnection, name: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let asked: Result<(String, String), _> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(name)
            .query_async(sentinel)
            .await;
        match asked {
            Ok((host, port)) => return format!("{host}:{port}"),
            Err(e) => assert!(
                Instant::now() < deadline,
                "the sentinel never answered: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether the server at `addr` holds the session record `id` (read directly, not via the store).
async fn holds(addr: &str, prefix: &str, id: &SessionId) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://{addr}")) else {
        return false;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    redis::cmd("EXISTS")
        .arg(format!("{prefix}s:{{{}}}", id.as_str()))
        .query_async(&mut conn)
        .await
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_follows_a_sentinel_failover() {
    let sentinels = env_urls("REDIS_SENTINEL_URLS");
    let name = env("REDIS_SENTINEL_MASTER");
    let topology = RedisTopology {
        mode: RedisMode::Sentinel,
        urls: sentinels.clone(),
        sentinel_master_name: Some(name.clone()),
        ..RedisTopology::default()
    };
    let prefix = format!("sb-failover:{}:", random_urlsafe(8));
    let store = RedisStore::new(settings(
        topology.to_url(),
        &prefix,
        Duration::from_millis(500),
    ))
    .expect("valid settings");

    let mut sentinel = sentinel_conn(&sentinels[0]).await;
    let before = master_addr(&mut sentinel, &name).await;
    let id = new_id();
    assert!(
        store
            .create_session(&id, b"before", Duration::from_secs(120))
            .await
            .expect("the master answers")
    );
    // The session reaches the replica before the switch (WAIT, on the master itself).
    let mut master = redis::Client::open(format!("redis://{before}"))
        .expect("address")
        .get_multiplexed_async_connection()
        .await
        .expect("the master answers");
    let synced: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5_000)
        .query_async(&mut master)
        .await
        .expect("WAIT");
    assert_eq!(synced, 1, "the replica acknowledged the write");

    // Sentinels learn of the replica shortly after start: retry until they accept.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let asked: Result<(), redis::RedisError> = redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(&name)
            .query_async(&mut sentinel)
            .await;
        match asked {
            Ok(()) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "no failover started: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }

    // Keep using the store through the switch: each call succeeds with the right answer or
    // fails as unavailable, never anything else, until it works against the new master.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut unavailable = 0;
    // Sentinel replication is asynchronous: until the old master is demoted (which drops its
    // clients) it still takes writes that the new master never sees. So the switch is over
    // when a write made through the store is found on the master the sentinels name.
    let after = loop {
        assert!(
            Instant::now() < deadline,
            "the store did not recover within 30 s"
        );
        let now = master_addr(&mut sentinel, &name).await;
        let probe = new_id();
        let read = store.get_session(&id).await;
        let wrote = store
            .create_session(&probe, b"during", Duration::from_secs(60))
            .await;
        match (read, wrote) {
            (Ok(Some(got)), Ok(true)) => {
                assert_eq!(got.sealed, b"before");
                if now != before && holds(&now, &prefix, &probe).await {
                    break now;
                }
            }
            (Ok(None), _) => panic!("the session written before the failover was lost"),
            (Err(StoreError::Unavailable(_)), _) | (_, Err(StoreError::Unavailable(_))) => {
                unavailable += 1;
            }
            (read, wrote) => panic!("unexpected outcome: {read:?} / {wrote:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(before, after);

    // The writes now land on the new master.
    let id2 = new_id();
    assert!(
        store
            .create_session(&id2, b"after", Duration::from_secs(60))
            .await
            .expect("the new master answers")
    );
    let mut new_master = redis::Client::open(format!("redis://{after}"))
        .expect("address")
        .get_multiplexed_async_connection()
        .await
        .expect("the new master answers");
    let stored: Option<Vec<u8>> = redis::cmd("GET")
        .arg(format!("{prefix}s:{{{}}}", id2.as_str()))
        .query_async(&mut new_master)
        .await
        .expect("GET");
    assert_eq!(stored.as_deref(), Some(&b"after"[..]));
    eprintln!("failover: {unavailable} unavailable round(s) during the switch");
    let _ = store.delete_session(&id).await;
    let _ = store.delete_session(&id2).await;
}

// ---- Cluster, end to end -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_sign_in_runs_against_a_redis_cluster() {
    let urls = env_urls("REDIS_CLUSTER_URLS");
    let list = urls
        .iter()
        .map(|u| format!("{u:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let harness = Harness::start_with(Options {
        redis_url: Some(urls[0].clone()),
        env: vec![
            ("BROKER__STORE__MODE".into(), "cluster".into()),
            ("BROKER__STORE__URLS".into(), format!("[{list}]")),
        ],
        ..Options::default()
    })
    .await;
    let signed_in = harness
        .sign_in(pb::Aal::Aal2, SMARTCARD_AND_PASSKEY, None)
        .await
        .expect("sign-in against the Cluster");
    let session = harness
        .session(&signed_in.session_token)
        .await
        .expect("the session reads back");
    assert_eq!(
        session.user.map(|u| u.uid).as_deref(),
        Some(SMARTCARD_AND_PASSKEY)
    );

    // Another replica on the same Cluster sees it.
    let replica = harness.replica().await;
    let aal = replica
        .client
        .clone()
        .get_current_aal(pb::GetCurrentAalRequest {
            session_token: signed_in.session_token.clone(),
        })
        .await
        .expect("the other replica reads the session")
        .into_inner();
    assert_eq!(aal.aal, session.aal, "both replicas read the same session");
    replica.stop().await;
    harness.stop().await;
}
