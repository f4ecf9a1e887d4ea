//! The admin server: `GET /live`, `GET /ready`, `GET /metrics`, `POST /shutdown` (contract).

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

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(body.into()));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

fn handle(state: &AdminState, peer: SocketAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
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
        (_, "/live" | "/ready" | "/metrics" | "/shutdown") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /live, /ready, /metrics or POST /shutdown\n",
        ),
    }
}
