//! A proxy listener: accept, detect, then serve HTTP through the layered stack or forward
//! opaque bytes. Inbound and outbound differ only in the [`Listener`] they build.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};

use crate::detect::{self, Detected, Protocol};
use crate::drain::Drain;
use crate::endpoint::Endpoint;
use crate::forward::{Forward, Shared};
use crate::http::{serve_h1, serve_h2};
use crate::io::ProxyIo;
use crate::metrics::{
    ConnectionLabels, DetectResult, Direction, DirectionLabels, ErrorKind, Metrics, Observe,
    ProtocolLabel, RequestHandles,
};
use crate::scrub::{Rules, Scrub};

/// The request path, outermost first: metrics, header scrubbing, forwarding.
pub type Stack = Observe<Scrub<Forward>>;

pub struct Listener {
    pub direction: Direction,
    pub forward: Arc<Shared>,
    pub handles: Arc<RequestHandles>,
    pub rules: Arc<Rules>,
    pub detect_timeout: Duration,
    /// Skip detection and forward opaque bytes (the port is listed as opaque).
    pub skip_detection: bool,
    /// Where opaque connections go; `None` when the listener cannot know (outbound without
    /// `CONNECT`).
    pub opaque_target: Option<Arc<Endpoint>>,
    pub metrics: Arc<Metrics>,
    open: Gauge,
    bytes: (Counter, Counter),
}

impl Listener {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        direction: Direction,
        forward: Arc<Shared>,
        rules: Arc<Rules>,
        detect_timeout: Duration,
        skip_detection: bool,
        opaque_target: Option<Arc<Endpoint>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Listener {
            direction,
            handles: Arc::new(RequestHandles::new(&metrics, direction)),
            forward,
            rules,
            detect_timeout,
            skip_detection,
            opaque_target,
            open: metrics
                .open_connections
                .get_or_create_owned(&DirectionLabels { direction }),
            bytes: metrics.byte_counters(direction),
            metrics,
        }
    }

    fn stack(&self) -> Stack {
        Observe::new(
            Scrub::new(Forward::new(self.forward.clone()), self.rules.clone()),
            self.handles.clone(),
        )
    }

    /// Accepts until the drain starts.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: Drain) {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = drain.signaled() => break,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let this = self.clone();
                    let d = drain.clone();
                    let what = match this.direction {
                        Direction::Inbound => "inbound connection",
                        Direction::Outbound => "outbound connection",
                    };
                    drain.spawn(what, Some(peer), async move {
                        this.connection(tcp, peer, d).await
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(direction = self.direction.as_str(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn connection(self: Arc<Self>, mut tcp: TcpStream, peer: SocketAddr, drain: Drain) {
        let _ = tcp.set_nodelay(true);
        self.open.inc();
        let _open = GaugeGuard(&self.open);
        let (protocol, prefix) = if self.skip_detection {
            self.metrics
                .detected(self.direction, DetectResult::OpaquePort);
            (Protocol::Opaque, Bytes::new())
        } else {
            match detect::detect(&mut tcp, self.detect_timeout).await {
                Ok((Detected::Protocol(p), prefix)) => {
                    let r = match p {
                        Protocol::Http1 => DetectResult::Http1,
                        Protocol::Http2 => DetectResult::Http2,
                        Protocol::Opaque => DetectResult::Opaque,
                    };
                    self.metrics.detected(self.direction, r);
                    (p, prefix)
                }
                Ok((Detected::Idle, prefix)) => {
                    self.metrics.detected(self.direction, DetectResult::Idle);
                    (Protocol::Opaque, prefix)
                }
                Ok((Detected::Stalled, _)) => {
                    self.metrics.detected(self.direction, DetectResult::Timeout);
                    tracing::info!(direction = self.direction.as_str(), %peer, timeout = ?self.detect_timeout,
                        "client sent a partial request and stalled past the detect timeout; closing");
                    return;
                }
                Ok((Detected::Closed, _)) => {
                    self.metrics.detected(self.direction, DetectResult::Closed);
                    return;
                }
                Err(e) => {
                    self.metrics.detected(self.direction, DetectResult::Error);
                    self.metrics.error(self.direction, ErrorKind::ClientIo);
                    tracing::debug!(%peer, error = %e, "reading the client failed during detection");
                    return;
                }
            }
        };
        self.metrics
            .connections
            .get_or_create(&ConnectionLabels {
                direction: self.direction,
                protocol: ProtocolLabel::from(protocol),
            })
            .inc();
        let io = ProxyIo::new(tcp, prefix, Some(self.bytes.clone()));
        match protocol {
            Protocol::Http1 => serve_h1(io, self.stack(), &drain, self.detect_timeout).await,
            Protocol::Http2 => serve_h2(io, self.stack(), &drain).await,
            Protocol::Opaque => self.opaque(io, peer).await,
        }
    }

    async fn opaque(&self, mut io: ProxyIo, peer: SocketAddr) {
        let Some(target) = &self.opaque_target else {
            self.metrics.error(self.direction, ErrorKind::NoDestination);
            tracing::info!(direction = self.direction.as_str(), %peer,
                "non-HTTP connection with no destination; tunnel opaque traffic with HTTP CONNECT host:port");
            return;
        };
        let mut upstream = match target.connect_tcp().await {
            Ok(u) => u,
            Err(e) => {
                self.metrics.error(self.direction, ErrorKind::ConnectFailed);
                tracing::info!(direction = self.direction.as_str(), %peer, error = %e, "opaque connection failed");
                return;
            }
        };
        // copy_bidirectional forwards a half-close in each direction on its own.
        if let Err(e) = tokio::io::copy_bidirectional(&mut io, &mut upstream).await {
            tracing::debug!(%peer, error = %e, "opaque connection ended with an error");
        }
    }
}

struct GaugeGuard<'a>(&'a Gauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
