//! Zone-aware routing, end to end from the file source: the control plane tells a proxy its
//! zone (the zone of the endpoints at the address the proxy connects from: 127.0.0.1 here),
//! the proxy keeps traffic in its zone while the local endpoints are healthy, spills over to
//! the other zone when they slow down, comes back when they recover, and follows a live edit
//! of the zones, all under h2load with no failed request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use remora_tests::control::*;
use remora_tests::*;
use tokio::net::TcpListener;

const TOKEN: &str = "client-token-0123456789";
const DAY: Duration = Duration::from_secs(24 * 3600);

/// An HTTP/1.1 + HTTP/2 app that answers after an adjustable delay and counts its requests.
struct ZoneApp {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ZoneApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ZoneApp {
    async fn start(ip: [u8; 4], delay_ms: u64) -> ZoneApp {
        let listener = TcpListener::bind(SocketAddr::from((ip, 0)))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicU64::new(0));
        let delay = Arc::new(AtomicU64::new(delay_ms));
        let (h, d) = (hits.clone(), delay.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (h, d) = (h.clone(), d.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        h.fetch_add(1, Ordering::Relaxed);
                        let ms = d.load(Ordering::Relaxed);
                        async move {
                            if ms > 0 {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(
                                Bytes::from_static(b"ok"),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        ZoneApp {
            addr,
            hits,
            delay_ms: delay,
            task,
        }
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

/// The file-source TOML of `web.test:80` with each app in the zone given.
fn web(apps: &[(&ZoneApp, &str)]) -> String {
    let eps: Vec<String> = apps
        .iter()
        .map(|(a, z)| format!("  {{ addr = \"{}\", zone = \"{z}\" }},", a.addr))
        .collect();
    format!(
        "[[service]]\nname = \"web.test:80\"\nendpoints = [\n{}\n]\n",
        eps.join("\n")
    )
}

/// `h2load -n N` (2 connections, 1 stream each: a steady trickle, not a flood) through
/// `proxy`; returns how many answers were 2xx.
async fn h2load(proxy: SocketAddr, n: u32) -> u32 {
    let url = format!("http://{proxy}/");
    let n = n.to_string();
    let out = run(
        "h2load",
        &[
            "-n",
            &n,
            "-c",
            "2",
            "-m",
            "1",
            "-H",
            ":authority: web.test:80",
            &url,
        ],
    )
    .await;
    assert_eq!(out.status, 0, "h2load: {}", out.stderr);
    out.stdout
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no status codes in: {}", out.stdout))
}

/// Requests the apps got since `before`.
fn since(apps: &[&ZoneApp], before: &[u64]) -> Vec<u64> {
    apps.iter()
        .zip(before)
        .map(|(a, b)| a.hits() - b)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_stays_in_the_callers_zone_spills_when_it_slows_and_follows_live_edits() {
    let pki = Pki::new("cluster.local");
    // Zone a on 127.0.0.1 (where the client proxy connects from), zone b on 127.0.0.2 behind
    // a 3 ms "cross-zone hop".
    let a1 = ZoneApp::start([127, 0, 0, 1], 0).await;
    let a2 = ZoneApp::start([127, 0, 0, 1], 0).await;
    let b1 = ZoneApp::start([127, 0, 0, 2], 3).await;
    let b2 = ZoneApp::start([127, 0, 0, 2], 3).await;
    let apps = [&a1, &a2, &b1, &b2];
    let zones = [(&a1, "a"), (&a2, "a"), (&b1, "b"), (&b2, "b")];
    let client_id = pki.id("client");
    let cp = TestControl::start(loopback0(), &pki, &web(&zones), &[(TOKEN, &client_id)], DAY).await;
    let proxy = TestProxy::start(proxy_config(
        refused_addr().await,
        &pki,
        &cp.target(),
        "client",
        TOKEN,
    ))
    .await;

    // Healthy: the first answers teach the balancer the latencies, then zone a keeps ≥ 95 %.
    assert_eq!(h2load(proxy.outbound, 200).await, 200);
    let before: Vec<u64> = apps.iter().map(|a| a.hits()).collect();
    assert_eq!(h2load(proxy.outbound, 2_000).await, 2_000);
    let got = since(&apps, &before);
    let local = got[0] + got[1];
    assert!(
        local * 100 >= 95 * 2_000,
        "zone a got {local} of 2000 while healthy: {got:?}"
    );

    // Zone a slows to 100 ms: most traffic moves to zone b (zone a is still tried now and
    // then, to see whether it recovered).
    a1.delay_ms.store(100, Ordering::Relaxed);
    a2.delay_ms.store(100, Ordering::Relaxed);
    let before: Vec<u64> = apps.iter().map(|a| a.hits()).collect();
    assert_eq!(h2load(proxy.outbound, 1_000).await, 1_000);
    let got = since(&apps, &before);
    let remote = got[2] + got[3];
    eprintln!("zone a slow: {got:?}");
    assert!(
        remote * 100 >= 90 * 1_000,
        "zone b got only {remote} of 1000 while zone a was slow: {got:?}"
    );

    // Zone a recovers: traffic comes back once the balancer has tried it again.
    a1.delay_ms.store(0, Ordering::Relaxed);
    a2.delay_ms.store(0, Ordering::Relaxed);
    wait_until("traffic back in zone a", async || {
        let before: Vec<u64> = apps.iter().map(|a| a.hits()).collect();
        assert_eq!(h2load(proxy.outbound, 500).await, 500);
        let got = since(&apps, &before);
        (got[0] + got[1]) * 100 >= 95 * 500
    })
    .await;

    // A live edit puts b1 in zone a (as fast as the others there): it joins the local set,
    // under load, with no failure.
    let load = {
        let outbound = proxy.outbound;
        tokio::spawn(async move { h2load(outbound, 10_000).await })
    };
    b1.delay_ms.store(0, Ordering::Relaxed);
    cp.set_endpoints(&web(&[(&a1, "a"), (&a2, "a"), (&b1, "a"), (&b2, "b")]));
    wait_until("b1 counted as zone a", async || {
        let before = b1.hits();
        tokio::time::sleep(Duration::from_millis(200)).await;
        b1.hits() - before > 20
    })
    .await;
    assert_eq!(load.await.expect("h2load"), 10_000, "no request failed");
    let before: Vec<u64> = apps.iter().map(|a| a.hits()).collect();
    assert_eq!(h2load(proxy.outbound, 2_000).await, 2_000);
    let got = since(&apps, &before);
    assert!(
        got[3] * 100 <= 5 * 2_000,
        "b2 (the only remote one now) got {}: {got:?}",
        got[3]
    );
    assert!(got[2] > 100, "b1 takes local traffic now: {got:?}");
    proxy.stop().await;
}
