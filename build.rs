fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps the build free of system packages.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // The broker builds these headers as a BTreeMap: it moves into the answer as it is,
        // with no hashing on the GetPdsToken hot path. The wire form is the same.
        .btree_map(".session_broker.v1.ApiToken.headers")
        .file_descriptor_set_path(out.join("session_broker_descriptor.bin"))
        .compile_protos(
            &["proto/session_broker/v1/session_broker.proto"],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    git_revision();
    Ok(())
}

/// Sets `SESSION_BROKER_GIT_REVISION` for `--version` and the trace resource: taken from that
/// environment variable when set (a container build has no `.git`, so it passes the revision as
/// a build argument), else from `git rev-parse`, else "unknown".
fn git_revision() {
    const VAR: &str = "SESSION_BROKER_GIT_REVISION";
    println!("cargo:rerun-if-env-changed={VAR}");
    // A new commit moves HEAD or the branch it names: rebuild then so the revision stays true.
    for path in [".git/HEAD", ".git/packed-refs"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    if let Some(branch) = std::fs::read_to_string(".git/HEAD")
        .ok()
        .and_then(|head| head.strip_prefix("ref: ").map(|r| r.trim().to_owned()))
    {
        let path = format!(".git/{branch}");
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let from_env = std::env::var(VAR).ok().filter(|v| !v.trim().is_empty());
    let revision = from_env
        .or_else(from_git)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env={VAR}={revision}");
}

fn from_git() -> Option<String> {
    let output = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    let is_hex = !text.is_empty() && text.chars().all(|c| c.is_ascii_hexdigit());
    (output.status.success() && is_hex).then(|| text.to_owned())
}
