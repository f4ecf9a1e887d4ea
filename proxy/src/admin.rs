//! The admin server: `GET /live`, `GET /ready`, `GET /metrics`, `GET /tap`, `POST /shutdown`
//! (contract).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// When configured, the proxy is ready only once it holds a valid identity.
    pub identity: Option<Arc<crate::identity::IdentityStore>>,
    pub ready: AtomicBool,
    pub draining: AtomicBool,
    /// Cancelled by `POST /shutdown`; the proxy's run loop watches it.
    pub shutdown: CancellationToken,
}

impl AdminState {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && !self.draining.load(Ordering::Acquire)
            && self.identity.as_ref().is_none_or(|i| i.current().is_some())
            && self.expired_at().is_none()
    }

    /// When the current certificate expired, if the clock says it has (60 s of skew allowed,
    /// as validation does): a proxy presenting it is refused by its peers, so it is not ready.
    fn expired_at(&self) -> Option<std::time::SystemTime> {
        let current = self.identity.as_ref()?.current()?;
        let not_after = current.creds.not_after;
        (std::time::SystemTime::now() > not_after + std::time::Duration::from_secs(60))
            .then_some(not_after)
    }
}

pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, peer, req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// A whole answer, or tap's stream of JSON lines.
type AdminBody = http_body_util::Either<Full<Bytes>, TapBody>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<AdminBody> {
    let mut rsp = Response::new(http_body_util::Either::Left(Full::new(body.into())));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

fn handle(state: &AdminState, peer: SocketAddr, req: Request<Incoming>) -> Response<AdminBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/tap") => tap(state, peer, req.uri().query().unwrap_or("")),
        (&Method::GET | &Method::HEAD, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET | &Method::HEAD, "/ready") => {
            if state.draining.load(Ordering::Acquire) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if state.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else if let Some(at) = state.expired_at() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "not ready: this proxy's certificate expired at {}; check the clock and the certificate renewal\n",
                        remora_certs::validate::human_time(at)
                    ),
                )
            } else if state
                .identity
                .as_ref()
                .is_some_and(|i| i.current().is_none())
            {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: waiting for a valid identity (see the log)\n",
                )
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::GET | &Method::HEAD, "/metrics") => {
            let mut rsp = text(StatusCode::OK, state.metrics.encode());
            rsp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            rsp
        }
        (&Method::POST, "/shutdown") => {
            // Anyone who can reach the admin port from outside the pod must not stop it.
            // A dual-stack listener shows IPv4 loopback as ::ffff:127.0.0.1.
            if !peer.ip().to_canonical().is_loopback() {
                return text(
                    StatusCode::FORBIDDEN,
                    "shutdown is accepted from loopback only\n",
                );
            }
            tracing::info!(%peer, "shutdown requested through the admin server");
            state.shutdown.cancel();
            text(StatusCode::ACCEPTED, "shutting down\n")
        }
        (_, "/live" | "/ready" | "/metrics" | "/shutdown" | "/tap") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /live, /ready, /metrics, /tap or POST /shutdown\n",
        ),
    }
}

/// `GET /tap?direction=&authority=&path=&method=&identity=&rate=&sample=`: one JSON line per
/// matching request until the caller hangs up. Live traffic is for the pod's own operator:
/// loopback only (`kubectl exec`, or `kubectl port-forward`, which arrives on loopback).
fn tap(state: &AdminState, peer: SocketAddr, query: &str) -> Response<AdminBody> {
    if !peer.ip().to_canonical().is_loopback() {
        return text(
            StatusCode::FORBIDDEN,
            "tap shows live traffic and is served to loopback only; run remora tap in the pod or through kubectl port-forward\n",
        );
    }
    let (filter, rate, sample) = match tap_query(query) {
        Ok(q) => q,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    match state.metrics.tap.watch(filter, rate, sample) {
        Ok(rx) => {
            let mut rsp = Response::new(http_body_util::Either::Right(TapBody(rx)));
            rsp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/x-ndjson"),
            );
            rsp
        }
        Err(crate::tap::WatchError::TooMany) => text(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{} tap watchers already stream from this proxy; stop one and retry\n",
                crate::tap::MAX_WATCHERS
            ),
        ),
    }
}

/// Decodes `%XX` and `+` in a query value.
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent-encoding in {s:?}"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

/// The filter, rate and sampling fraction a `/tap` query asks for.
pub(crate) fn tap_query(query: &str) -> Result<(crate::tap::Filter, u32, f64), String> {
    let mut f = crate::tap::Filter::default();
    let (mut rate, mut sample) = (crate::tap::DEFAULT_RATE, 1.0);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v)?;
        let v = Some(v).filter(|v| !v.is_empty());
        match k {
            "direction" => {
                f.direction = match v.as_deref() {
                    Some("inbound") => Some(crate::Direction::Inbound),
                    Some("outbound") => Some(crate::Direction::Outbound),
                    None => None,
                    Some(other) => {
                        return Err(format!("direction={other}: use inbound or outbound"));
                    }
                }
            }
            "authority" => f.authority = v,
            "path" => f.path_prefix = v,
            "method" => f.method = v,
            "identity" => f.identity = v,
            "rate" => {
                rate = match v.as_deref().map(str::parse::<u32>) {
                    Some(Ok(r)) if (1..=crate::tap::MAX_RATE).contains(&r) => r,
                    None => rate,
                    _ => {
                        return Err(format!(
                            "rate: events per second from 1 to {}",
                            crate::tap::MAX_RATE
                        ));
                    }
                }
            }
            "sample" => {
                sample = match v.as_deref().map(str::parse::<f64>) {
                    Some(Ok(s)) if s > 0.0 && s <= 1.0 => s,
                    None => sample,
                    _ => return Err("sample: a fraction above 0 and at most 1".into()),
                }
            }
            other => {
                return Err(format!(
                    "unknown tap parameter {other:?}; use direction, authority, path, method, identity, rate or sample"
                ));
            }
        }
    }
    Ok((f, rate, sample))
}

/// Tap's response body: the watcher's lines as they come.
pub(crate) struct TapBody(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for TapBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(http_body::Frame::data(l))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_queries() {
        let (f, rate, sample) = tap_query(
            "direction=inbound&authority=web%3A8080&path=%2Fapi&method=POST&identity=spiffe%3A%2F%2Ftd%2Fns%2Fa%2Fsa%2Fb&rate=5&sample=0.5",
        )
        .unwrap();
        assert_eq!(f.direction, Some(crate::Direction::Inbound));
        assert_eq!(f.authority.as_deref(), Some("web:8080"));
        assert_eq!(f.path_prefix.as_deref(), Some("/api"));
        assert_eq!(f.method.as_deref(), Some("POST"));
        assert_eq!(f.identity.as_deref(), Some("spiffe://td/ns/a/sa/b"));
        assert_eq!((rate, sample), (5, 0.5));
        assert_eq!(
            tap_query("").unwrap(),
            (Default::default(), crate::tap::DEFAULT_RATE, 1.0)
        );
        for bad in [
            "direction=sideways",
            "rate=0",
            "rate=100000",
            "sample=2",
            "color=red",
            "path=%zz",
            "path=%ff",
        ] {
            assert!(tap_query(bad).is_err(), "{bad}");
        }
    }
}
