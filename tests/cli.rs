//! The binary's own commands, run as an operator would, and the public JWKS it serves.

mod common;

use std::process::Command;

fn broker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_session-broker"))
}

#[test]
fn keys_generate_writes_a_private_key_and_its_jwks_and_never_overwrites() {
    let dir = std::env::temp_dir().join(format!("sb-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let out = broker()
        .args(["keys", "generate", "--kid", "2026-12", "--dir"])
        .arg(&dir)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = std::fs::read_to_string(dir.join("2026-12.pem")).expect("private key written");
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let jwks: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("2026-12.jwks.json")).expect("jwks written"),
    )
    .expect("JSON");
    let key = &jwks["keys"][0];
    assert_eq!(
        (
            key["kid"].as_str(),
            key["alg"].as_str(),
            key["kty"].as_str()
        ),
        (Some("2026-12"), Some("RS512"), Some("RSA"))
    );
    assert!(
        key.get("d").is_none(),
        "the public JWKS must not carry the private exponent"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("2026-12.pem"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o077,
            0,
            "the private key is readable by others: {mode:o}"
        );
    }
    let again = broker()
        .args(["keys", "generate", "--kid", "2026-12", "--dir"])
        .arg(&dir)
        .output()
        .expect("runs");
    assert!(!again.status.success(), "overwrote an existing key");
    assert_eq!(
        std::fs::read_to_string(dir.join("2026-12.pem")).expect("still there"),
        pem
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_config_reports_every_problem_and_accepts_the_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/broker.example.toml");
    let key = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
    let ok = broker()
        .args(["check-config", example])
        .env("BROKER__ENCRYPTION__KEYS", format!("2026-12:{key}"))
        .output()
        .expect("runs");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let bad = std::env::temp_dir().join(format!("sb-bad-{}.toml", std::process::id()));
    std::fs::write(&bad, "[cis2]\nissuer = \"not a url\"\nclient_secret = \"hunter2-secret\"\n[sessions]\nidle_timeout_aal2 = \"soon\"\n")
        .expect("write");
    let out = broker()
        .arg("check-config")
        .arg(&bad)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "cis2.issuer",
        "cis2.client_id",
        "cis2.redirect_uris",
        "encryption.keys",
        "sessions.idle_timeout_aal2",
        "store.url",
    ] {
        assert!(err.contains(needle), "{needle} missing from:\n{err}");
    }
    assert!(!err.contains("hunter2-secret"), "a secret was echoed");
    let _ = std::fs::remove_file(&bad);
}

#[tokio::test]
async fn the_broker_publishes_its_public_signing_keys() {
    let h = common::Harness::start().await;
    let resp = reqwest::get(format!("http://{}/.well-known/jwks.json", h.http_addr))
        .await
        .expect("answers");
    assert_eq!(resp.status(), 200);
    let jwks: serde_json::Value = resp.json().await.expect("JSON");
    let keys = jwks["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kid"], "e2e-1");
    assert_eq!(keys[0]["use"], "sig");
    assert!(keys[0].get("d").is_none() && keys[0].get("p").is_none());
    h.stop().await;
}
