//! An in-process sidecar: remora's inbound listener in front of a hyper service running in the
//! same program. One hook answers `GET /blocked` itself (403; the app never sees it), another
//! tags every request the app does receive with `x-seen-by: remora`. The app echoes the headers
//! it got, so the tag is visible in the response.
//!
//!     cargo run -p remora-proxy --example sidecar

#[path = "support/mod.rs"]
mod support;

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, request};
use remora_proxy::{Hooks, Listen, Proxy, RequestContext};
use support::BoxError;
use tokio::net::TcpListener;

/// The sidecar's policy, run by remora on every inbound request.
struct Policy;

impl Hooks for Policy {
    fn on_request(
        &self,
        req: &mut request::Parts,
        _: &RequestContext<'_>,
    ) -> Option<Response<Bytes>> {
        // Answered here: remora opens no connection to the app for it.
        (req.method == Method::GET && req.uri.path() == "/blocked").then(|| {
            let mut rsp = Response::new(Bytes::from_static(b"blocked by the sidecar\n"));
            *rsp.status_mut() = StatusCode::FORBIDDEN;
            rsp
        })
    }

    fn on_upstream_request(&self, req: &mut request::Parts, _: &RequestContext<'_>) {
        // `insert`, not `append`: a client's own `x-seen-by` is replaced, so the app can trust it.
        req.headers
            .insert("x-seen-by", HeaderValue::from_static("remora"));
    }
}

/// What happened, as the client and the app saw it.
#[derive(Debug)]
pub struct Report {
    pub hello_status: StatusCode,
    /// The `x-seen-by` values the app received with `GET /hello`, as it echoed them.
    pub hello_seen_by: Vec<String>,
    pub blocked_status: StatusCode,
    pub blocked_body: String,
    /// Every path the app served, in order.
    pub app_paths: Vec<String>,
}

pub async fn demo() -> Result<Report, BoxError> {
    // The app listens on loopback only: from outside, the sidecar is the way in.
    let app = TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = app.local_addr()?;
    let paths = support::Log::default();
    let seen = paths.clone();
    tokio::spawn(support::serve(app, move |req| {
        seen.push(req.uri().path());
        let echo: String = (req.headers().iter())
            .map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())))
            .collect();
        support::text(StatusCode::OK, echo)
    }));

    let proxy = Proxy::builder()
        .app(app_addr)
        .inbound(Listen::Addr("127.0.0.1:0".parse()?))
        .outbound(Listen::Off) // this app makes no outbound calls
        .admin(Listen::Off)
        .hooks(Policy)
        .bind()
        .await?;
    let inbound = proxy.inbound_addr().ok_or("no inbound listener")?;
    let running = proxy.spawn();
    running.ready().await;

    // The client tries to forge the tag; the app must see remora's value only.
    let forged = [("host", "app.local"), ("x-seen-by", "mallory")];
    let (hello_status, echoed) = support::get(inbound, "/hello", &forged).await?;
    let host = [("host", "app.local")];
    let (blocked_status, blocked_body) = support::get(inbound, "/blocked", &host).await?;
    running.shutdown();
    running.wait().await?;

    let hello_seen_by = (echoed.lines())
        .filter_map(|l| l.strip_prefix("x-seen-by: "))
        .map(str::to_string)
        .collect();
    let app_paths = paths.entries();
    Ok(Report {
        hello_status,
        hello_seen_by,
        blocked_status,
        blocked_body,
        app_paths,
    })
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let r = demo().await?;
    println!(
        "GET /hello   → {}; the app saw x-seen-by: {:?}",
        r.hello_status, r.hello_seen_by
    );
    println!(
        "GET /blocked → {}: {}",
        r.blocked_status,
        r.blocked_body.trim()
    );
    println!("paths the app served: {:?}", r.app_paths);
    Ok(())
}
