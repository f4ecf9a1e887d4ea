//! A proxy listener: accept, detect, then serve HTTP through the layered stack or forward
//! opaque bytes. Inbound and outbound differ only in the [`Listener`] they build.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};

use crate::config::MtlsMode;
use crate::detect::{self, Detected, Protocol};
use crate::drain::Drain;
use crate::endpoint::Endpoint;
use crate::forward::{Forward, Shared};
use crate::http::{serve_h1, serve_h2};
use crate::identity::{IdentityStore, Loaded};
use crate::io::{ProxyIo, ServerIo};
use crate::metrics::{
    ConnectionLabels, DetectResult, Direction, DirectionLabels, ErrorKind, Metrics, Observe,
    ProtocolLabel, RequestHandles, TlsResult,
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
    /// Inbound mTLS: the identity and the policy (`None` on outbound, or without identity).
    pub tls: Option<InboundTls>,
    open: Gauge,
    bytes: (Counter, Counter),
}

pub struct InboundTls {
    pub store: Arc<IdentityStore>,
    pub mode: MtlsMode,
    /// Strict mode: plaintext HTTP/1.1 GET/HEAD to these paths still reaches the app.
    pub probe_paths: Arc<Vec<String>>,
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
            tls: None,
        }
    }

    /// The request stack for one connection; `client_id` is the verified peer identity.
    fn stack(&self, client_id: Option<HeaderValue>, probe_only: Option<Arc<Vec<String>>>) -> Stack {
        Observe::new(
            Scrub::new(
                Forward::new(self.forward.clone(), probe_only),
                self.rules.clone(),
                client_id,
            ),
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
        if self.skip_detection {
            self.metrics
                .detected(self.direction, DetectResult::OpaquePort);
            self.count_connection(Protocol::Opaque);
            let io = ProxyIo::new(tcp, Bytes::new(), Some(self.bytes.clone()));
            return self.opaque(ServerIo::Plain(io), peer).await;
        }
        let (detected, prefix) = match detect::detect(&mut tcp, self.detect_timeout).await {
            Ok(d) => d,
            Err(e) => {
                self.metrics.detected(self.direction, DetectResult::Error);
                self.metrics.error(self.direction, ErrorKind::ClientIo);
                tracing::debug!(%peer, error = %e, "reading the client failed during detection");
                return;
            }
        };
        let Some(protocol) = self.plain_protocol(&detected, peer) else {
            if let Detected::Tls { sni } = detected {
                self.tls(tcp, prefix, sni, peer, drain).await;
            }
            return;
        };
        let mut probe_only = None;
        if let Some(tls) = &self.tls {
            if tls.mode == MtlsMode::Strict {
                // Kubelet probes speak plaintext HTTP/1.1: they are let through to their paths
                // only; everything else plaintext is refused.
                if protocol != Protocol::Http1 || tls.probe_paths.is_empty() {
                    self.metrics
                        .tls(self.direction, TlsResult::RefusedPlaintext);
                    tracing::info!(%peer, "plaintext connection refused: REMORA_MTLS=strict accepts mTLS only (and HTTP/1.1 probes to REMORA_PROBE_PATHS)");
                    return;
                }
                probe_only = Some(tls.probe_paths.clone());
            } else {
                self.metrics.tls(self.direction, TlsResult::Plaintext);
            }
        }
        let io = ServerIo::Plain(ProxyIo::new(tcp, prefix, Some(self.bytes.clone())));
        self.serve_conn(protocol, io, None, probe_only, peer, &drain)
            .await
    }

    /// The protocol of a plaintext connection, or `None` (TLS, or closed) after recording why.
    fn plain_protocol(&self, detected: &Detected, peer: SocketAddr) -> Option<Protocol> {
        let (result, protocol) = match detected {
            Detected::Protocol(p) => (
                match p {
                    Protocol::Http1 => DetectResult::Http1,
                    Protocol::Http2 => DetectResult::Http2,
                    Protocol::Opaque => DetectResult::Opaque,
                },
                Some(*p),
            ),
            Detected::Idle => (DetectResult::Idle, Some(Protocol::Opaque)),
            Detected::Tls { .. } => (DetectResult::Tls, None),
            Detected::BadHello => {
                self.metrics.tls(self.direction, TlsResult::BadHello);
                tracing::info!(direction = self.direction.as_str(), %peer,
                    "TLS ClientHello truncated, stalled past the detect timeout, or malformed; closing");
                (DetectResult::Tls, None)
            }
            Detected::Stalled => {
                tracing::info!(direction = self.direction.as_str(), %peer, timeout = ?self.detect_timeout,
                    "client sent a partial request and stalled past the detect timeout; closing");
                (DetectResult::Timeout, None)
            }
            Detected::Closed => (DetectResult::Closed, None),
        };
        self.metrics.detected(self.direction, result);
        protocol
    }

    fn count_connection(&self, protocol: Protocol) {
        self.metrics
            .connections
            .get_or_create(&ConnectionLabels {
                direction: self.direction,
                protocol: ProtocolLabel::from(protocol),
            })
            .inc();
    }

    async fn serve_conn(
        &self,
        protocol: Protocol,
        io: ServerIo,
        client_id: Option<HeaderValue>,
        probe_only: Option<Arc<Vec<String>>>,
        peer: SocketAddr,
        drain: &Drain,
    ) {
        self.count_connection(protocol);
        match protocol {
            Protocol::Http1 => {
                serve_h1(
                    io,
                    self.stack(client_id, probe_only),
                    drain,
                    self.detect_timeout,
                )
                .await
            }
            Protocol::Http2 => serve_h2(io, self.stack(client_id, probe_only), drain).await,
            Protocol::Opaque => self.opaque(io, peer).await,
        }
    }

    /// A ClientHello: mTLS for this proxy (no server name, or its own), or the app's own TLS.
    async fn tls(
        &self,
        tcp: TcpStream,
        prefix: Bytes,
        sni: Option<String>,
        peer: SocketAddr,
        drain: Drain,
    ) {
        let io = ProxyIo::new(tcp, prefix, Some(self.bytes.clone()));
        let loaded = self.tls.as_ref().and_then(|t| {
            (t.mode != MtlsMode::Disabled)
                .then(|| t.store.current())
                .flatten()
                .map(|l| (t.mode, l))
        });
        let ours = |l: &Loaded| sni.as_deref().is_none_or(|s| s == l.sni);
        let Some((_, loaded)) = loaded.filter(|(_, l)| ours(l)) else {
            if self
                .tls
                .as_ref()
                .is_some_and(|t| t.mode == MtlsMode::Strict)
            {
                self.metrics
                    .tls(self.direction, TlsResult::RefusedPlaintext);
                tracing::info!(%peer, ?sni, "TLS for another server name refused: REMORA_MTLS=strict accepts mTLS to this proxy only");
                return;
            }
            // The app's own TLS: bytes through, untouched.
            self.metrics.tls(self.direction, TlsResult::Passthrough);
            self.count_connection(Protocol::Opaque);
            return self.opaque(ServerIo::Plain(io), peer).await;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(loaded.server.clone());
        let stream = match tokio::time::timeout(self.detect_timeout, acceptor.accept(io)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.metrics.tls(self.direction, TlsResult::HandshakeFailed);
                tracing::info!(%peer, error = %e, "mTLS handshake failed");
                return;
            }
            Err(_) => {
                self.metrics.tls(self.direction, TlsResult::HandshakeFailed);
                tracing::info!(%peer, timeout = ?self.detect_timeout, "mTLS handshake timed out");
                return;
            }
        };
        self.metrics.tls(self.direction, TlsResult::Mtls);
        let (_, conn) = stream.get_ref();
        // rustls verified the chain; the identity is the leaf's SPIFFE URI SAN.
        let client_id = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| remora_certs::validate::spiffe_id(c))
            .and_then(|id| HeaderValue::from_str(&id.to_string()).ok());
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        let mut stream = Box::new(stream);
        let (protocol, prefix) = match alpn.as_deref() {
            Some(crate::tls::ALPN_H2) => (Protocol::Http2, Bytes::new()),
            Some(crate::tls::ALPN_HTTP1) => (Protocol::Http1, Bytes::new()),
            _ => match detect::detect(&mut stream, self.detect_timeout).await {
                Ok((Detected::Protocol(p), prefix)) => (p, prefix),
                Ok((Detected::Idle, prefix)) => (Protocol::Opaque, prefix),
                _ => return,
            },
        };
        let io = ServerIo::Tls(ProxyIo::new(stream, prefix, None));
        self.serve_conn(protocol, io, client_id, None, peer, &drain)
            .await
    }

    async fn opaque(&self, mut io: ServerIo, peer: SocketAddr) {
        let Some(target) = &self.opaque_target else {
            self.metrics.error(self.direction, ErrorKind::NoDestination);
            tracing::info!(direction = self.direction.as_str(), %peer,
                "non-HTTP connection with no destination; tunnel opaque traffic with HTTP CONNECT host:port");
            return;
        };
        let mut upstream = match target.connect(None).await {
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
