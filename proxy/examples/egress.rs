//! An egress proxy: remora's outbound listener only, with a header policy. Destinations off the
//! allow-list get 403 from the hook before anything leaves the host, and the caller's
//! `authorization` header is stripped from requests to the third-party CDN, so credentials
//! meant for the partner API never reach it. Both names are static destinations pointing at
//! one local test backend, which answers with what it received.
//!
//!     cargo run -p remora-proxy --example egress
//!
//! Callers use the outbound listener as an HTTP proxy, like
//! `curl -x http://OUTBOUND http://api.partner.test/v1`; the demo's client sends the same.

#[path = "support/mod.rs"]
mod support;

use bytes::Bytes;
use http::{Response, StatusCode, header, request};
use remora_proxy::{Hooks, Listen, Proxy, RequestContext, StaticDestination};
use support::BoxError;
use tokio::net::TcpListener;

const ALLOWED: &[&str] = &["api.partner.test:80", "cdn.vendor.test:80"];
const NO_CREDENTIALS: &[&str] = &["cdn.vendor.test:80"];

struct Policy;

impl Hooks for Policy {
    fn on_request(
        &self,
        _: &mut request::Parts,
        cx: &RequestContext<'_>,
    ) -> Option<Response<Bytes>> {
        // `cx.destination` is the authority as remora routes it: normalised `host:port`.
        if cx.destination.is_some_and(|d| ALLOWED.contains(&d)) {
            return None;
        }
        let mut rsp = Response::new(Bytes::from_static(
            b"destination not allowed by egress policy\n",
        ));
        *rsp.status_mut() = StatusCode::FORBIDDEN;
        Some(rsp)
    }

    fn on_upstream_request(&self, req: &mut request::Parts, cx: &RequestContext<'_>) {
        // Routed by now: `cx.destination` is the normalised `host:port`.
        if cx.destination.is_some_and(|d| NO_CREDENTIALS.contains(&d)) {
            req.headers.remove(header::AUTHORIZATION);
        }
    }
}

/// What each call got back; the backend answers `host=… authorization=…` with what it saw.
#[derive(Debug)]
pub struct Report {
    /// Per destination host, in the order called: the status and the body.
    pub calls: Vec<(&'static str, StatusCode, String)>,
    /// The Host of every request the backend received, in order.
    pub backend_saw: Vec<String>,
}

pub async fn demo() -> Result<Report, BoxError> {
    let backend = TcpListener::bind("127.0.0.1:0").await?;
    let backend_addr = backend.local_addr()?;
    let hosts = support::Log::default();
    let log = hosts.clone();
    tokio::spawn(support::serve(backend, move |req| {
        let h = |name| {
            req.headers()
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let (host, auth) = (
            h(header::HOST).unwrap_or_default(),
            h(header::AUTHORIZATION),
        );
        log.push(&host);
        let auth = auth.unwrap_or_else(|| "none".into());
        support::text(StatusCode::OK, format!("host={host} authorization={auth}"))
    }));

    let proxy = Proxy::builder()
        .inbound(Listen::Off)
        .outbound(Listen::Addr("127.0.0.1:0".parse()?))
        .admin(Listen::Off)
        .destination(StaticDestination::new(ALLOWED[0], &[backend_addr]))
        .destination(StaticDestination::new(ALLOWED[1], &[backend_addr]))
        .dns_fallback(false) // nothing outside this program is ever looked up
        .hooks(Policy)
        .bind()
        .await?;
    let outbound = proxy.outbound_addr().ok_or("no outbound listener")?;
    let running = proxy.spawn();
    running.ready().await;

    let mut calls = Vec::new();
    for host in ["api.partner.test", "cdn.vendor.test", "exfil.example"] {
        // Absolute form, as an HTTP client configured with this proxy sends its requests.
        let url = format!("http://{host}/v1/upload");
        let creds = [("authorization", "Bearer s3cret")];
        let (status, body) = support::get(outbound, &url, &creds).await?;
        calls.push((host, status, body));
    }
    running.shutdown();
    running.wait().await?;
    Ok(Report {
        calls,
        backend_saw: hosts.entries(),
    })
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let r = demo().await?;
    for (host, status, body) in &r.calls {
        println!("{host:<17} → {status} ({})", body.trim());
    }
    println!("the backend received: {:?}", r.backend_saw);
    Ok(())
}
