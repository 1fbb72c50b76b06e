//! Dev mode as a developer meets it: the walk-through pages, the simulator's sign-in, the
//! callback page showing the session, an AAL3 task asking for step-up, and the step-up itself.

use cis2_session_broker::dev::{self, DevListeners, DevOptions};
use reqwest::redirect::Policy;
use tokio::net::TcpListener;

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

/// Follows a chain of redirects by hand (adding the simulator's `login_hint` on its authorize
/// endpoint) and returns the final page.
async fn follow(
    http: &reqwest::Client,
    cookie: &mut String,
    start: String,
    uid: &str,
    amr: &str,
) -> (reqwest::StatusCode, String) {
    let mut url = start;
    for _ in 0..6 {
        let resp = http
            .get(&url)
            .header("cookie", cookie.as_str())
            .send()
            .await
            .expect("answers");
        if let Some(set) = resp.headers().get("set-cookie") {
            let set = set.to_str().expect("ascii");
            *cookie = set.split(';').next().expect("a name=value pair").to_owned();
        }
        if !resp.status().is_redirection() {
            let status = resp.status();
            return (status, resp.text().await.expect("body"));
        }
        let next = resp.headers()["location"]
            .to_str()
            .expect("ascii")
            .to_owned();
        let mut next = reqwest::Url::parse(&url)
            .expect("url")
            .join(&next)
            .expect("location");
        if next.path().ends_with("/authorize") {
            next.query_pairs_mut()
                .append_pair("login_hint", uid)
                .append_pair("sim_authenticator", amr);
        }
        url = next.to_string();
    }
    panic!("too many redirects");
}

#[tokio::test]
async fn the_walk_through_signs_in_and_steps_up_in_a_browser_like_client() {
    let listeners = DevListeners {
        grpc: bind().await,
        http: bind().await,
        sim: bind().await,
        apim: bind().await,
    };
    let http_addr = listeners.http.local_addr().expect("bound");
    let opts = DevOptions {
        grpc_addr: listeners.grpc.local_addr().expect("bound"),
        http_addr,
        sim_addr: listeners.sim.local_addr().expect("bound"),
        apim_addr: listeners.apim.local_addr().expect("bound"),
        redis_url: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        dev::serve(listeners, &opts, async move {
            let _ = stopped.await;
        })
        .await
        .expect("dev mode runs");
    });
    let base = format!("http://{http_addr}");
    let http = reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .expect("client");

    let mut cookie = String::new();
    let home = http
        .get(format!("{base}/dev"))
        .send()
        .await
        .expect("home")
        .text()
        .await
        .expect("body");
    assert!(home.contains("DEV MODE") && home.contains("id=\"login-aal2\""));

    let (status, page) = follow(
        &http,
        &mut cookie,
        format!("{base}/dev/login?aal=2"),
        "656005750107",
        "PASSKEY",
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("You are signed in."), "{page}");
    assert!(page.contains("656005750107"));
    assert!(page.contains("<td id=\"aal\">AAL2</td>"), "{page}");
    assert!(
        page.contains("<td id=\"authenticator\">Passkey</td>"),
        "{page}"
    );

    let pds = get(&http, &cookie, format!("{base}/dev/token?api=pds")).await;
    assert!(pds.contains("id=\"token-aal\">AAL2<"), "{pds}");
    assert!(pds.contains("NHSD-Session-URID"), "{pds}");
    let eps = get(&http, &cookie, format!("{base}/dev/token?api=eps")).await;
    assert!(
        eps.contains("id=\"step-up-needed\"") && eps.contains("smartcard"),
        "{eps}"
    );

    let check = http
        .get(format!("{base}/dev/check?api=eps"))
        .header("cookie", cookie.as_str())
        .send()
        .await
        .expect("check")
        .text()
        .await
        .expect("body");
    assert!(
        check.contains("id=\"step-up-needed\"") && check.contains("smartcard"),
        "{check}"
    );

    let (status, page) = follow(
        &http,
        &mut cookie,
        format!("{base}/dev/login?api=eps&step_up=true"),
        "656005750107",
        "N3_SMARTCARD",
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("upgraded"), "{page}");
    assert!(page.contains("<td id=\"aal\">AAL3</td>"), "{page}");
    let check = http
        .get(format!("{base}/dev/check?api=eps"))
        .header("cookie", cookie.as_str())
        .send()
        .await
        .expect("check")
        .text()
        .await
        .expect("body");
    assert!(check.contains("id=\"allowed\""), "{check}");
    let eps = get(&http, &cookie, format!("{base}/dev/token?api=eps")).await;
    assert!(eps.contains("id=\"token-aal\">AAL3<"), "{eps}");

    let _ = stop.send(());
    server.await.expect("dev mode stops cleanly");
}

async fn get(http: &reqwest::Client, cookie: &str, url: String) -> String {
    http.get(url)
        .header("cookie", cookie)
        .send()
        .await
        .expect("answers")
        .text()
        .await
        .expect("body")
}
