//! The control plane with the file source, end to end: proxies get their certificates from it
//! (CSR + bootstrap token) and discover endpoints through `Discovery.Watch`; endpoint file
//! changes reach them, bad files and bad tokens are refused with clear errors, certificates
//! renew under load, and a control plane that is down for 30 s costs no request.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use remora_tests::control::*;
use remora_tests::*;

const TOKEN: &str = "client-token-0123456789";
const WEB_TOKEN: &str = "web-token-0123456789abc";
const DAY: Duration = Duration::from_secs(24 * 3600);

fn eps(apps: &[&NamedApp]) -> Vec<(SocketAddr, Option<String>)> {
    apps.iter().map(|a| (a.addr, None)).collect()
}

/// Waits until requests for `authority` through `proxy` are answered by app `name`.
async fn wait_for_app(what: &str, proxy: SocketAddr, authority: &str, name: &str) {
    wait_until(what, async || {
        get_via(proxy, authority)
            .await
            .is_ok_and(|(s, b)| s == 200 && b == name)
    })
    .await;
}

/// Sends `n` requests to `authority` and returns how many each body (app name) got.
async fn spread(
    proxy: SocketAddr,
    authority: &str,
    n: usize,
) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for _ in 0..n {
        let (status, body) = get_via(proxy, authority).await.expect("request");
        assert_eq!(status, 200, "{authority}: {body}");
        *out.entry(body).or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_source_drives_discovery_and_certificates() {
    capture_logs();
    let pki = Pki::new("cluster.local");
    let (a1, a2) = (NamedApp::start("a1").await, NamedApp::start("a2").await);
    let client_id = pki.id("client");
    let file = |web: Vec<(SocketAddr, Option<String>)>| {
        endpoints_toml(&[("web.test:80", web), ("empty.test:80", vec![])])
    };
    let cp = TestControl::start(
        loopback0(),
        &pki,
        &file(eps(&[&a1])),
        &[(TOKEN, &client_id)],
        DAY,
    )
    .await;
    // Ready means it holds a certificate from the control plane.
    let proxy = TestProxy::start(proxy_config(
        refused_addr().await,
        &pki,
        &cp.target(),
        "client",
        TOKEN,
    ))
    .await;
    let m = proxy.metrics().await;
    assert!(
        metric(&m, "remora_identity_reloads_total", &[]) >= 1.0,
        "{m}"
    );
    assert_eq!(
        spread(proxy.outbound, "web.test:80", 5).await.get("a1"),
        Some(&5)
    );

    // A known service with no endpoints is an error, not a DNS lookup.
    let (status, body) = get_via(proxy.outbound, "empty.test:80").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(!body.contains("DNS"), "{body}");
    // A name the control plane does not know falls back to DNS.
    let (status, body) = get_via(proxy.outbound, &format!("localhost:{}", a2.addr.port()))
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "a2"));

    // An edit of the file reaches the proxy; requests in between all succeed.
    let edited = Instant::now();
    cp.set_endpoints(&file(eps(&[&a2])));
    wait_for_app(
        "the proxy follows the file",
        proxy.outbound,
        "web.test:80",
        "a2",
    )
    .await;
    let took = edited.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "file change took {took:?} to reach the proxy"
    );
    assert_eq!(
        spread(proxy.outbound, "web.test:80", 5).await.get("a2"),
        Some(&5)
    );

    // A broken file is refused, named with its line; the last good endpoints keep serving.
    cp.set_endpoints(
        "[[service]]\nname = \"web.test:80\"\nendpoints = [{ addr = \"not-an-address\" }]\n",
    );
    wait_until("the bad file is refused", async || {
        metric(
            &cp.metrics().await,
            "remora_control_source_reload_failures_total",
            &[],
        ) >= 1.0
    })
    .await;
    let logs = captured_logs();
    assert!(
        logs.contains("line 3: endpoint address \"not-an-address\" is not ip:port; keeping the previous endpoints"),
        "{logs}"
    );
    assert_eq!(
        spread(proxy.outbound, "web.test:80", 5).await.get("a2"),
        Some(&5)
    );
    // Removing the service makes the name unknown: DNS, which cannot resolve it.
    cp.set_endpoints(&endpoints_toml(&[("empty.test:80", vec![])]));
    wait_until("the service is gone", async || {
        get_via(proxy.outbound, "web.test:80")
            .await
            .is_ok_and(|(s, b)| s == 503 && b.contains("DNS lookup of web.test:80 failed"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_with_a_bad_token_is_refused_and_stays_not_ready() {
    capture_logs();
    let pki = Pki::new("cluster.local");
    let client_id = pki.id("client");
    let cp = TestControl::start(loopback0(), &pki, "", &[(TOKEN, &client_id)], DAY).await;
    for (sa, token, reason) in [
        (
            "client",
            "wrong-token-0123456789",
            "the token is not in the bootstrap tokens",
        ),
        (
            "intruder",
            TOKEN,
            "this bootstrap token is for spiffe://cluster.local/ns/default/sa/client, not spiffe://cluster.local/ns/default/sa/intruder",
        ),
    ] {
        let proxy = Unready::start(proxy_config(
            refused_addr().await,
            &pki,
            &cp.target(),
            sa,
            token,
        ))
        .await;
        // Several attempts (the first retry comes within a second) and never ready.
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            proxy.assert_not_ready("bad token").await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let logs = captured_logs();
        let want = format!(
            "identity spiffe://cluster.local/ns/default/sa/{sa}: cannot get a certificate: control plane {}: The caller does not have permission to execute the specified operation: cannot certify spiffe://cluster.local/ns/default/sa/{sa}: {reason}",
            cp.addr
        );
        assert!(logs.contains(&want), "missing {want:?} in:\n{logs}");
        proxy.stop().await;
    }
    let m = cp.metrics().await;
    assert!(
        metric(&m, "remora_control_certify_total", &[("result", "denied")]) >= 4.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "remora_control_certify_total", &[("result", "issued")]),
        0.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_second_certificates_renew_under_load_without_failures() {
    let pki = Pki::new("cluster.local");
    let (client_id, web_id) = (pki.id("client"), pki.id("web"));
    let app = NamedApp::start("web").await;
    let cp = TestControl::start(
        loopback0(),
        &pki,
        "",
        &[(TOKEN, &client_id), (WEB_TOKEN, &web_id)],
        Duration::from_secs(10),
    )
    .await;
    let server =
        TestProxy::start(proxy_config(app.addr, &pki, &cp.target(), "web", WEB_TOKEN)).await;
    let client = TestProxy::start(proxy_config(
        refused_addr().await,
        &pki,
        &cp.target(),
        "client",
        TOKEN,
    ))
    .await;
    // The client reaches the server's inbound over mTLS, expecting the web identity.
    cp.set_endpoints(&endpoints_toml(&[(
        "web.test:80",
        vec![(server.inbound, Some(web_id.to_string()))],
    )]));
    wait_for_app(
        "the endpoint is discovered",
        client.outbound,
        "web.test:80",
        "web",
    )
    .await;
    let expiry = |m: &str| metric(m, "remora_identity_expiry_timestamp_seconds", &[]);
    let first_expiry = (
        expiry(&client.metrics().await),
        expiry(&server.metrics().await),
    );

    // 25 s of requests: two and a half lifetimes, so each proxy renews at least three times.
    let (mut ok, mut failed) = (0u32, Vec::new());
    let until = Instant::now() + Duration::from_secs(25);
    while Instant::now() < until && ok + (failed.len() as u32) < 20_000 {
        match get_via(client.outbound, "web.test:80").await {
            Ok((200, b)) if b == "web" => ok += 1,
            other => failed.push(format!("{other:?}")),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 500, "only {ok} requests in 25 s");
    for (who, p, first) in [
        ("client", &client, first_expiry.0),
        ("server", &server, first_expiry.1),
    ] {
        let m = p.metrics().await;
        let reloads = metric(&m, "remora_identity_reloads_total", &[]);
        assert!(
            reloads >= 4.0,
            "{who} loaded {reloads} certificates in 25 s of 10 s lifetimes"
        );
        assert!(
            expiry(&m) >= first + 15.0,
            "{who}'s certificate expiry did not move: {first} → {}",
            expiry(&m)
        );
        assert_eq!(
            metric(&m, "remora_identity_reload_failures_total", &[]),
            0.0,
            "{who}: {m}"
        );
    }
    // Each handshake after a renewal presents a current certificate: the server accepted every
    // one, and the client verified every one (any failure would have shown above).
    eprintln!("{ok} requests across renewals, none failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_down_for_30s_costs_no_request() {
    capture_logs();
    let pki = Pki::new("cluster.local");
    let client_id = pki.id("client");
    let (a1, a2, a3) = (
        NamedApp::start("a1").await,
        NamedApp::start("a2").await,
        NamedApp::start("a3").await,
    );
    let cp = TestControl::start(
        loopback0(),
        &pki,
        &endpoints_toml(&[("web.test:80", eps(&[&a1, &a2]))]),
        &[(TOKEN, &client_id)],
        DAY,
    )
    .await;
    let (addr, endpoints) = (cp.addr, cp.endpoints.clone());
    let proxy = TestProxy::start(proxy_config(
        refused_addr().await,
        &pki,
        &cp.target(),
        "client",
        TOKEN,
    ))
    .await;
    assert_eq!(spread(proxy.outbound, "web.test:80", 10).await.len(), 2);

    let load = {
        let outbound = proxy.outbound;
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut seen_a3 = None;
            let start = Instant::now();
            // Bounded: at most 60 s and 30k requests; stops 2 s after a3 first answers.
            while start.elapsed() < Duration::from_secs(60) && ok < 30_000 {
                match get_via(outbound, "web.test:80").await {
                    Ok((200, b)) => {
                        ok += 1;
                        if b == "a3" && seen_a3.is_none() {
                            seen_a3 = Some(start.elapsed());
                        }
                    }
                    other => failed.push(format!("{other:?}")),
                }
                if seen_a3.is_some_and(|t| start.elapsed() > t + Duration::from_secs(2)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (ok, failed, seen_a3)
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    cp.kill().await;
    let killed = Instant::now();
    // While it is away the proxy keeps its endpoints (and says so).
    wait_until("the proxy notices the control plane is gone", async || {
        captured_logs().contains("keeping 2 known endpoints")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(killed.elapsed())).await;
    // Back, with a third endpoint: updates flow again once the proxy has reconnected.
    write_atomic(
        &endpoints,
        &endpoints_toml(&[("web.test:80", eps(&[&a1, &a2, &a3]))]),
    );
    let back = TestControl::start_with(addr, &pki, endpoints, None, DAY).await;
    let restarted = Instant::now();
    let (ok, failed, seen_a3) = load.await.expect("load task");
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let seen = seen_a3.expect("the new endpoint never answered after the control plane came back");
    eprintln!(
        "{ok} requests, none failed; a3 answered {:?} after the restart",
        restarted.elapsed().saturating_sub(Duration::from_secs(2))
    );
    assert!(ok > 1000, "only {ok} requests");
    assert!(
        seen > Duration::from_secs(30),
        "a3 answered before the control plane came back?"
    );
    drop(back);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_watches_are_dropped_and_the_control_plane_must_prove_its_identity() {
    capture_logs();
    let pki = Pki::new("cluster.local");
    let client_id = pki.id("client");
    let a1 = NamedApp::start("a1").await;
    let cp = TestControl::start(
        loopback0(),
        &pki,
        &endpoints_toml(&[("web.test:80", eps(&[&a1]))]),
        &[(TOKEN, &client_id)],
        DAY,
    )
    .await;
    let mut cfg = proxy_config(refused_addr().await, &pki, &cp.target(), "client", TOKEN);
    cfg.discovery_idle_timeout = Duration::from_secs(1);
    let proxy = TestProxy::start(cfg).await;
    let watches = async || metric(&cp.metrics().await, "remora_control_watches", &[]);
    assert_eq!(
        get_via(proxy.outbound, "web.test:80").await.unwrap().1,
        "a1"
    );
    assert_eq!(watches().await, 1.0);
    // Unused for longer than the idle timeout: the proxy lets the watch go...
    wait_until("the idle watch is dropped", async || watches().await == 0.0).await;
    wait_until("the proxy counts no watch", async || {
        metric(&proxy.metrics().await, "remora_discovery_watches", &[]) == 0.0
    })
    .await;
    // ...and subscribes again on the next request.
    assert_eq!(
        get_via(proxy.outbound, "web.test:80").await.unwrap().1,
        "a1"
    );

    // A control plane that cannot prove the identity the proxy expects gets nothing from it:
    // no certificate, so the proxy never becomes ready, and the log says why.
    let mut target = cp.target();
    target.identity = Some(pki.id("impostor"));
    let proxy = Unready::start(proxy_config(
        refused_addr().await,
        &pki,
        &target,
        "client",
        TOKEN,
    ))
    .await;
    wait_until("the proxy refuses the control plane", async || {
        captured_logs().contains("server presented identity spiffe://cluster.local/ns/remora/sa/control, expected spiffe://cluster.local/ns/default/sa/impostor")
    })
    .await;
    proxy.assert_not_ready("impostor control plane").await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_issuer_never_replaces_the_working_one() {
    capture_logs();
    let pki = Pki::new("cluster.local");
    let client_id = pki.id("client");
    let cp = TestControl::start(loopback0(), &pki, "", &[(TOKEN, &client_id)], DAY).await;
    let good = std::fs::read(pki.dir.join("issuer.key")).unwrap();
    // A key that does not match issuer.crt (another CA's issuer key).
    let other = Pki::new("cluster.local");
    std::fs::copy(other.dir.join("issuer.key"), pki.dir.join("issuer.key")).unwrap();
    wait_until("the mismatched issuer is refused", async || {
        metric(
            &cp.metrics().await,
            "remora_control_issuer_reload_failures_total",
            &[],
        ) >= 1.0
    })
    .await;
    assert!(
        captured_logs().contains("keeping the previous issuer"),
        "{}",
        captured_logs()
    );
    // Certificates keep coming from the previous issuer, and they verify.
    let proxy = TestProxy::start(proxy_config(
        refused_addr().await,
        &pki,
        &cp.target(),
        "client",
        TOKEN,
    ))
    .await;
    assert!(metric(&proxy.metrics().await, "remora_identity_reloads_total", &[]) >= 1.0);
    std::fs::write(pki.dir.join("issuer.key"), good).unwrap();
}

/// TokenReview against a FAKE API server (see `FakeTokenReview`: nothing that serves
/// TokenReview can run here): a ServiceAccount token proves exactly its own identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_are_checked_with_a_token_review() {
    capture_logs();
    let pki = Pki::new("cluster.local");
    let fake = FakeTokenReview::start(&[
        (
            "sa-token-client-0123456789",
            "system:serviceaccount:default:client",
            &["remora"],
        ),
        (
            "sa-token-other-audience-01",
            "system:serviceaccount:default:client",
            &["vault"],
        ),
        (
            "user-token-0123456789abcdef",
            "alice@example.com",
            &["remora"],
        ),
    ])
    .await;
    let cp = TestControl::start_token_review(&pki, &fake.kubeconfig, &["remora"]).await;
    // The right token: certified, ready.
    let proxy = TestProxy::start(proxy_config(
        refused_addr().await,
        &pki,
        &cp.target(),
        "client",
        "sa-token-client-0123456789",
    ))
    .await;
    assert!(metric(&proxy.metrics().await, "remora_identity_reloads_total", &[]) >= 1.0);
    drop(proxy);
    for (sa, token, reason) in [
        (
            "billing",
            "sa-token-client-0123456789",
            "the token belongs to system:serviceaccount:default:client (spiffe://cluster.local/ns/default/sa/client), not spiffe://cluster.local/ns/default/sa/billing",
        ),
        (
            "client",
            "sa-token-other-audience-01",
            "TokenReview: the token is not authenticated: token audiences do not match",
        ),
        (
            "client",
            "user-token-0123456789abcdef",
            "the token belongs to alice@example.com, which is not a service account",
        ),
        (
            "client",
            "forged-token-0123456789abc",
            "TokenReview: the token is not authenticated: invalid bearer token",
        ),
    ] {
        let proxy = Unready::start(proxy_config(
            refused_addr().await,
            &pki,
            &cp.target(),
            sa,
            token,
        ))
        .await;
        wait_until(reason, async || captured_logs().contains(reason)).await;
        proxy.assert_not_ready(token).await;
        proxy.stop().await;
    }
    assert!(fake.requests.load(std::sync::atomic::Ordering::Relaxed) >= 5);
}

/// With the control plane unreachable from the start, a proxy with file credentials still
/// serves: the first request for a name waits for the control plane at most 3 s, then uses DNS,
/// and later requests for that name do not wait again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_control_plane_falls_back_to_dns_once() {
    let pki = Pki::new("cluster.local");
    let app = NamedApp::start("app").await;
    let mut cfg = config(refused_addr().await);
    cfg.identity_dir = Some(pki.identity_dir("client"));
    cfg.control = Some(remora_proxy::ControlTarget {
        addr: refused_addr().await.to_string(),
        identity: None,
    });
    let proxy = TestProxy::start(cfg).await;
    let name = format!("localhost:{}", app.addr.port());
    let t = Instant::now();
    assert_eq!(get_via(proxy.outbound, &name).await.unwrap().1, "app");
    let first = t.elapsed();
    assert!(
        first < Duration::from_secs(10),
        "first request took {first:?}"
    );
    let t = Instant::now();
    for _ in 0..5 {
        assert_eq!(get_via(proxy.outbound, &name).await.unwrap().1, "app");
    }
    let later = t.elapsed();
    assert!(
        later < Duration::from_secs(2),
        "5 later requests took {later:?} (first took {first:?})"
    );
}

/// Two replicas on the same inputs (the control plane keeps no state of its own): the proxy
/// uses one; when it dies the proxy moves to the other, and updates keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_dies() {
    let pki = Pki::new("cluster.local");
    let client_id = pki.id("client");
    let (a1, a2) = (NamedApp::start("a1").await, NamedApp::start("a2").await);
    let file = scratch("endpoints.toml");
    write_atomic(&file, &endpoints_toml(&[("web.test:80", eps(&[&a1]))]));
    let tokens = scratch("tokens");
    std::fs::write(&tokens, format!("{TOKEN} {client_id}\n")).unwrap();
    let first =
        TestControl::start_with(loopback0(), &pki, file.clone(), Some(tokens.clone()), DAY).await;
    let second = TestControl::start_with(loopback0(), &pki, file.clone(), Some(tokens), DAY).await;
    let mut target = first.target();
    target.addr = format!("{},{}", first.addr, second.addr);
    let proxy = TestProxy::start(proxy_config(
        refused_addr().await,
        &pki,
        &target,
        "client",
        TOKEN,
    ))
    .await;
    assert_eq!(
        spread(proxy.outbound, "web.test:80", 5).await.get("a1"),
        Some(&5)
    );
    assert_eq!(
        metric(&first.metrics().await, "remora_control_watches", &[]),
        1.0
    );

    first.kill().await;
    write_atomic(&file, &endpoints_toml(&[("web.test:80", eps(&[&a2]))]));
    let t = Instant::now();
    let (mut ok, mut failed) = (0, Vec::new());
    loop {
        match get_via(proxy.outbound, "web.test:80").await {
            Ok((200, b)) if b == "a2" => break,
            Ok((200, _)) => ok += 1,
            other => failed.push(format!("{other:?}")),
        }
        assert!(
            t.elapsed() < WAIT,
            "the update never came through the second replica"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "moved to the second replica and saw the update {:?} after the first died ({ok} requests on the old set meanwhile)",
        t.elapsed()
    );
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(
        metric(&second.metrics().await, "remora_control_watches", &[]),
        1.0
    );
}

/// A tokens file that vanishes (a ConfigMap being replaced, a mistaken `rm`) is not an empty
/// token set: the tokens already loaded keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_tokens_file_keeps_the_tokens_already_loaded() {
    capture_logs();
    let pki = Pki::new("cluster.local");
    let client_id = pki.id("client");
    let file = scratch("endpoints.toml");
    write_atomic(&file, "# no services\n");
    let tokens = scratch("tokens");
    std::fs::write(&tokens, format!("{TOKEN} {client_id}\n")).unwrap();
    let cp = TestControl::start_with(loopback0(), &pki, file, Some(tokens.clone()), DAY).await;
    std::fs::remove_file(&tokens).unwrap();
    let want = format!("bootstrap tokens {}: cannot read", tokens.display());
    wait_until("the missing file is noticed", async || {
        captured_logs().contains(&want)
    })
    .await;
    assert!(captured_logs().contains("keeping the previous tokens"));
    let proxy = TestProxy::start(proxy_config(
        refused_addr().await,
        &pki,
        &cp.target(),
        "client",
        TOKEN,
    ))
    .await;
    assert!(metric(&proxy.metrics().await, "remora_identity_reloads_total", &[]) >= 1.0);
}
