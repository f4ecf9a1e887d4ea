//! The examples in `proxy/examples/`, run as tests: each example's `demo()` starts everything
//! on loopback port 0 and drives it through real TCP sockets; these tests check what it
//! reports. Every wait is on a response or a readiness signal, never a sleep; the timeout only
//! turns a hang into a failure.

// Each example brings its own copy of `examples/support` (it must build on its own).
#![allow(clippy::duplicate_mod)]

#[path = "../examples/sidecar.rs"]
#[allow(dead_code)]
mod sidecar;

#[path = "../examples/egress.rs"]
#[allow(dead_code)]
mod egress;

#[path = "../examples/custom_discovery.rs"]
#[allow(dead_code)]
mod custom_discovery;

#[path = "../examples/metrics.rs"]
#[allow(dead_code)]
mod metrics;

use std::future::Future;
use std::time::Duration;

use http::StatusCode;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs a demo, failing instead of hanging if it never finishes.
async fn run<T>(demo: impl Future<Output = Result<T, BoxError>>) -> T {
    match tokio::time::timeout(Duration::from_secs(60), demo).await {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => panic!("the demo failed: {e}"),
        Err(_) => panic!("the demo did not finish within 60 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_hook_answers_locally_and_tags_what_the_app_sees() {
    let r = run(sidecar::demo()).await;
    // The local answer: 403 with the hook's body, and the app never saw the request.
    assert_eq!(r.blocked_status, StatusCode::FORBIDDEN);
    assert_eq!(r.blocked_body, "blocked by the sidecar\n");
    assert_eq!(
        r.app_paths,
        ["/hello"],
        "the app saw exactly one request, /hello"
    );
    // The tag: the app saw remora's value, once; the client's forged one was replaced.
    assert_eq!(r.hello_status, StatusCode::OK);
    assert_eq!(r.hello_seen_by, ["remora"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_denies_unlisted_destinations_and_strips_credentials() {
    let r = run(egress::demo()).await;
    let [partner, vendor, denied] = &r.calls[..] else {
        panic!("expected three calls: {:?}", r.calls);
    };
    assert_eq!(partner.1, StatusCode::OK);
    assert_eq!(
        partner.2,
        "host=api.partner.test authorization=Bearer s3cret"
    );
    assert_eq!(vendor.1, StatusCode::OK);
    assert_eq!(vendor.2, "host=cdn.vendor.test authorization=none");
    assert_eq!(denied.1, StatusCode::FORBIDDEN);
    assert_eq!(denied.2, "destination not allowed by egress policy\n");
    // The denied call never left: the backend saw the two allowed ones only.
    assert_eq!(r.backend_saw, ["api.partner.test", "cdn.vendor.test"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_discovery_reroutes_live_traffic_without_failures() {
    let r = run(custom_discovery::demo()).await;
    assert_eq!(r.failed, 0, "no request may fail across the switch: {r:?}");
    // Everything done before the switch went to A (the switch waited for 20 requests).
    assert!(r.switched_after >= custom_discovery::BEFORE, "{r:?}");
    assert!(r.answers.len() >= r.switched_after, "{r:?}");
    assert!(
        r.answers[..r.switched_after].iter().all(|a| a == "A"),
        "{r:?}"
    );
    // Then B, for good: A* B+, never back to A once B has answered.
    let to_a = r.answers.iter().take_while(|a| *a == "A").count();
    assert!(r.answers[to_a..].iter().all(|a| a == "B"), "{r:?}");
    assert_eq!(r.answers.len() - to_a, custom_discovery::AFTER, "{r:?}");
    // The backends' own log agrees: each served exactly those requests, in that order.
    assert_eq!(r.served, r.answers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_share_the_callers_registry() {
    let r = run(metrics::demo()).await;
    let inbound_ok = [r#"direction="inbound""#, r#"status="200""#];
    let served = metrics::sample(&r.scrape, "remora_requests_total", &inbound_ok);
    assert_eq!(served, Some(f64::from(r.orders)), "{}", r.scrape);
    assert_eq!(r.orders, 3);
    // The application's own metric, in the same scrape.
    let placed = metrics::sample(&r.scrape, "shop_orders_total", &[]);
    assert_eq!(placed, Some(f64::from(r.orders)), "{}", r.scrape);
    assert!(
        r.scrape.contains("# TYPE shop_orders counter"),
        "{}",
        r.scrape
    );
    assert!(
        r.scrape.contains("# TYPE remora_requests counter"),
        "{}",
        r.scrape
    );
    assert!(r.scrape.trim_end().ends_with("# EOF"), "{}", r.scrape);
}
