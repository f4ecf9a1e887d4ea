//! A proxy listener: accept, detect, then serve HTTP through the layered stack or forward
//! opaque bytes. Inbound and outbound differ only in the [`Listener`] they build.

pub(crate) mod decide;
pub(crate) mod detect;
pub(crate) mod original_dst;
pub(crate) mod quic;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};

use crate::io::Stream;

use crate::config::MtlsMode;
use crate::drain::Drain;
use crate::endpoint::Endpoint;
use crate::http::forward::{ForwardService, Forwarder};
use crate::http::observe::{Observe, RequestHandles};
use crate::http::{serve_h1, serve_h2};
use crate::identity::{IdentityStore, Loaded};
use crate::io::{self, ProxyIo, ServerIo, UpstreamIo};
use crate::metrics::{
    ConnectionLabels, DetectResult, Direction, DirectionLabels, ErrorKind, Metrics, ProtocolLabel,
    TlsResult,
};
use crate::scrub::{Rules, Scrub};
use decide::{Action, First, Mtls, Refusal};
use detect::{Detected, MAX_DETECT_BYTES, Protocol};

/// The request path, outermost first: metrics, header scrubbing, forwarding.
pub type Stack = Observe<Scrub<ForwardService>>;

pub struct Listener {
    pub direction: Direction,
    pub forward: Arc<Forwarder>,
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
    /// Ports whose traffic skips detection when they are a connection's original port.
    pub opaque_ports: Vec<u16>,
    /// Inbound interception (`None` on outbound).
    pub app_ports: Option<AppPorts>,
    open: Gauge,
    bytes: (Counter, Counter),
    /// Connection slots: a connection holds one for its life.
    slots: Arc<tokio::sync::Semaphore>,
    refused: Counter,
}

/// A listening socket: TCP, or a Unix domain socket the local app connects to.
pub enum Acceptor {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Acceptor {
    async fn accept(&self) -> std::io::Result<(Stream, Option<std::net::SocketAddr>)> {
        match self {
            Acceptor::Tcp(l) => l.accept().await.map(|(s, p)| (Stream::Tcp(s), Some(p))),
            Acceptor::Unix(l) => l.accept().await.map(|(s, _)| (Stream::Unix(s), None)),
        }
    }
}

/// What one connection's routing depends on beyond its listener: interception's original
/// destination (`remora-proxy init`). Explicit-proxy connections have the default.
#[derive(Clone, Default)]
pub struct Conn {
    /// Inbound: the app at the connection's original port (`None`: the listener's app).
    pub app: Option<Arc<Endpoint>>,
    /// Outbound: where the app was connecting before the redirect.
    pub original: Option<std::net::SocketAddr>,
    /// Inbound: the address the peer reached (the pod's IP and port: the original destination
    /// when intercepted), whose rate limits apply.
    pub local: Option<std::net::SocketAddr>,
}

/// Inbound interception: the app is reached on the port the peer connected to.
pub struct AppPorts {
    /// The app's address (`REMORA_APP_ADDR`); its IP is used for every port.
    pub app: Arc<Endpoint>,
    pub connect_timeout: Duration,
    /// The proxy's own ports: a redirected connection to one of them would loop.
    pub own_ports: Vec<u16>,
    /// One endpoint (with its connection pool) per port seen; at most 65,535.
    pub by_port: std::sync::Mutex<std::collections::HashMap<u16, Arc<Endpoint>>>,
}

impl AppPorts {
    fn endpoint(&self, port: u16) -> Arc<Endpoint> {
        // An app on a Unix socket has one socket whatever port the peer dialled.
        if port == self.app.addr.port() || self.app.is_unix() {
            return self.app.clone();
        }
        let mut map = self.by_port.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(port)
            .or_insert_with(|| {
                Arc::new(Endpoint::new(
                    std::net::SocketAddr::new(self.app.addr.ip(), port),
                    1,
                    self.connect_timeout,
                    None,
                ))
            })
            .clone()
    }
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
        forward: Arc<Forwarder>,
        rules: Arc<Rules>,
        detect_timeout: Duration,
        skip_detection: bool,
        opaque_target: Option<Arc<Endpoint>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Listener {
            direction,
            handles: Arc::new(RequestHandles::new(
                &metrics,
                direction,
                forward.hooks_active.then(|| forward.hooks.clone()),
                forward.access_log,
                forward.tracer.clone(),
            )),
            forward,
            rules,
            detect_timeout,
            skip_detection,
            opaque_target,
            open: metrics
                .open_connections
                .get_or_create_owned(&DirectionLabels { direction }),
            bytes: metrics.byte_counters(direction),
            slots: Arc::new(tokio::sync::Semaphore::new(
                crate::config::derived_max_connections(),
            )),
            refused: metrics
                .connections_refused
                .get_or_create_owned(&DirectionLabels { direction }),
            metrics,
            tls: None,
            opaque_ports: Vec::new(),
            app_ports: None,
        }
    }

    /// Caps the open connections of this listener (see `Config::max_connections`).
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.slots = Arc::new(tokio::sync::Semaphore::new(max.max(1)));
        self
    }

    /// The request stack for one connection; `client_id` is the verified peer identity.
    fn stack(
        &self,
        client_id: Option<HeaderValue>,
        probe_only: Option<Arc<Vec<String>>>,
        conn: &Conn,
    ) -> Stack {
        Observe::new(
            Scrub::new(
                ForwardService::new(
                    self.forward.clone(),
                    probe_only,
                    conn.clone(),
                    client_id.clone(),
                ),
                self.rules.clone(),
                client_id.clone(),
            ),
            self.handles.clone(),
            client_id,
        )
    }

    /// Accepts until the drain starts.
    pub async fn serve(self: Arc<Self>, listener: Acceptor, drain: Drain) {
        let mut last_refusal_log: Option<tokio::time::Instant> = None;
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = drain.signaled() => break,
            };
            match accepted {
                Ok((tcp, peer_addr)) => {
                    // A Unix socket's peer has no address; its connections are the local app's.
                    let peer = peer_addr.map_or_else(|| "unix".to_string(), |p| p.to_string());
                    let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                        // Overloaded: refuse at once (the client sees a close and can go
                        // elsewhere) instead of letting descriptors run out for everyone.
                        self.refused.inc();
                        let now = tokio::time::Instant::now();
                        if last_refusal_log.is_none_or(|t| now - t > Duration::from_secs(1)) {
                            last_refusal_log = Some(now);
                            tracing::warn!(direction = self.direction.as_str(), %peer,
                                "connection limit reached; refusing new connections (counted in remora_connections_refused_total)");
                        }
                        drop(tcp);
                        continue;
                    };
                    let this = self.clone();
                    let d = drain.clone();
                    let what = match this.direction {
                        Direction::Inbound => "inbound connection",
                        Direction::Outbound => "outbound connection",
                    };
                    // One span per connection: its log lines carry direction, peer and (once
                    // mTLS has verified it) the peer's identity, instead of repeating them.
                    let span = tracing::info_span!(
                        "conn",
                        direction = this.direction.as_str(),
                        %peer,
                        identity = tracing::field::Empty,
                    );
                    drain.spawn(
                        what,
                        peer_addr,
                        tracing::Instrument::instrument(
                            async move {
                                let _slot = slot;
                                this.connection(tcp, d).await
                            },
                            span,
                        ),
                    );
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(direction = self.direction.as_str(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn mtls(&self) -> Mtls {
        match &self.tls {
            None => Mtls::Off,
            Some(t) => match t.mode {
                MtlsMode::Disabled => Mtls::Off,
                MtlsMode::Permissive => Mtls::Permissive,
                MtlsMode::Strict => Mtls::Strict,
            },
        }
    }

    /// What the decision needs to know of a detection result (TLS: whether it is for us).
    fn first(&self, detected: &Detected) -> First {
        match detected {
            Detected::Protocol(Protocol::Http1) => First::Http1,
            Detected::Protocol(Protocol::Http2) => First::Http2,
            Detected::Protocol(Protocol::Opaque) => First::NotHttp,
            Detected::Malformed => First::Malformed,
            Detected::Idle => First::Idle,
            Detected::Tls { sni } => match self.loaded() {
                Some(l) if sni.as_deref().is_none_or(|s| s == l.sni) => First::TlsOurs,
                _ => First::TlsOther,
            },
            Detected::Stalled | Detected::Closed | Detected::BadHello => First::Broken,
        }
    }

    /// The identity to terminate mTLS with, when this listener terminates it at all.
    fn loaded(&self) -> Option<Arc<Loaded>> {
        self.tls
            .as_ref()
            .filter(|t| t.mode != MtlsMode::Disabled)
            .and_then(|t| t.store.current())
    }

    /// The connection's routing under interception; `None` refuses it (a loop).
    async fn intercepted(&self, original: std::net::SocketAddr) -> Option<(Conn, bool)> {
        let port = original.port();
        match self.direction {
            Direction::Inbound => {
                let ports = self.app_ports.as_ref()?;
                if ports.own_ports.contains(&port) {
                    self.metrics.error(self.direction, ErrorKind::Loop);
                    tracing::info!(%original, "redirected connection to one of the proxy's own ports refused (it would loop); remora-proxy init skips them, so check the interception rules");
                    return None;
                }
                let conn = Conn {
                    app: Some(ports.endpoint(port)),
                    original: None,
                    local: Some(original),
                };
                Some((conn, self.opaque_ports.contains(&port)))
            }
            Direction::Outbound => {
                if let Some(own) = self.forward.loops_to(original) {
                    self.metrics.error(self.direction, ErrorKind::Loop);
                    tracing::info!(%original, %own, "connection to the proxy's own listener refused (it would loop)");
                    return None;
                }
                // A server-speaks-first destination must not wait for detection: a listed
                // port, or endpoints discovery marks opaque (Service appProtocol).
                let opaque = self.opaque_ports.contains(&port)
                    || self.forward.original_is_opaque(original).await;
                let conn = Conn {
                    app: None,
                    original: Some(original),
                    local: None,
                };
                Some((conn, opaque))
            }
        }
    }

    async fn connection(self: Arc<Self>, mut tcp: Stream, drain: Drain) {
        if let Some(t) = tcp.tcp() {
            let _ = t.set_nodelay(true);
        }
        self.open.inc();
        let _open = GaugeGuard(&self.open);
        let (conn, skip) = match tcp.tcp().and_then(original_dst::original_dst) {
            None => {
                let local = match self.direction {
                    Direction::Inbound => tcp.tcp().and_then(|t| t.local_addr().ok()),
                    Direction::Outbound => None,
                };
                (
                    Conn {
                        local,
                        ..Conn::default()
                    },
                    self.skip_detection,
                )
            }
            // Boxed, as every stage is, detection too: this future lives as long as the
            // connection, sized for its largest stage (1,984 bytes with these inline; 656 with
            // only detection inline, against about 400 for awaiting the boxed connection, where
            // an HTTP connection spends its life).
            Some(original) => match Box::pin(self.intercepted(original)).await {
                Some(c) => c,
                None => return,
            },
        };
        let conn = &conn;
        if skip {
            self.metrics
                .detected(self.direction, DetectResult::OpaquePort);
            return Box::pin(self.opaque_port(tcp, drain, conn)).await;
        }
        let mut initial = Vec::new();
        loop {
            let (detected, prefix) = match Box::pin(detect::detect_after(
                &mut tcp,
                self.detect_timeout,
                initial,
            ))
            .await
            {
                Ok(d) => d,
                Err(e) => {
                    self.metrics.detected(self.direction, DetectResult::Error);
                    self.metrics.error(self.direction, ErrorKind::ClientIo);
                    tracing::debug!(error = %e, "reading the client failed during detection");
                    return;
                }
            };
            self.record(&detected);
            let first = self.first(&detected);
            let action = match self.direction {
                Direction::Inbound => decide::inbound(self.mtls(), first),
                Direction::Outbound if conn.original.is_some() => {
                    decide::outbound_transparent(first)
                }
                Direction::Outbound => decide::outbound(first),
            };
            if self.tls.is_some() && matches!(action, Action::Http { .. } | Action::Opaque) {
                self.metrics.tls(self.direction, TlsResult::Plaintext);
            }
            match action {
                Action::Http { probe_only } => {
                    let protocol = match first {
                        First::Http2 => Protocol::Http2,
                        _ => Protocol::Http1,
                    };
                    let probe_only = probe_only.then(|| {
                        self.tls
                            .as_ref()
                            .map(|t| t.probe_paths.clone())
                            .unwrap_or_default()
                    });
                    let io = ServerIo::Plain(ProxyIo::new(tcp, prefix, Some(self.bytes.clone())));
                    return self
                        .serve_conn(protocol, io, None, probe_only, &drain, conn)
                        .await;
                }
                Action::Terminate => {
                    let io = ProxyIo::new(tcp, prefix, Some(self.bytes.clone()));
                    return Box::pin(self.terminate(io, drain, None, conn)).await;
                }
                Action::Opaque => {
                    if matches!(first, First::TlsOther | First::TlsOurs) {
                        self.metrics.tls(self.direction, TlsResult::Passthrough);
                    }
                    self.count_connection(Protocol::Opaque);
                    let io = ServerIo::Plain(ProxyIo::new(tcp, prefix, Some(self.bytes.clone())));
                    return Box::pin(self.opaque(io, None, conn)).await;
                }
                Action::AwaitSpeaker => {
                    let Some(up) = Box::pin(self.connect_app(conn)).await else {
                        return;
                    };
                    match Box::pin(io::first_speaker(&mut tcp, &up, MAX_DETECT_BYTES)).await {
                        // The client spoke after its silence: judge its bytes like any others
                        // (a slow HTTP client still goes through the HTTP stack).
                        Ok(Some(bytes)) => initial = bytes,
                        Ok(None) => {
                            self.count_connection(Protocol::Opaque);
                            let io = ServerIo::Plain(ProxyIo::new(
                                tcp,
                                Bytes::new(),
                                Some(self.bytes.clone()),
                            ));
                            return Box::pin(self.opaque(io, Some(up), conn)).await;
                        }
                        Err(_) => return,
                    }
                }
                Action::Refuse(r) => return Box::pin(self.refuse(r, &mut tcp)).await,
                Action::Close => return,
            }
        }
    }

    /// A port declared opaque: no HTTP detection, but mTLS as on every port.
    async fn opaque_port(&self, mut tcp: Stream, drain: Drain, conn: &Conn) {
        let mtls = self.mtls();
        let (first, prefix, upstream) = match mtls {
            Mtls::Off => (First::NotHttp, Bytes::new(), None),
            // Strict: the client must open with a ClientHello; the app is not reached before.
            Mtls::Strict => match detect::detect(&mut tcp, self.detect_timeout).await {
                Ok((d @ (Detected::Tls { .. } | Detected::BadHello), prefix)) => {
                    (self.first(&d), prefix, None)
                }
                Ok((Detected::Closed, _)) | Err(_) => return,
                Ok((_, prefix)) => (First::NotHttp, prefix, None),
            },
            // Permissive: a server-speaks-first app must be able to speak, so connect at once;
            // a client that speaks first with a ClientHello for us gets mTLS (the app's first
            // bytes, if any, wait in its socket), anything else is passed through.
            Mtls::Permissive => {
                let Some(up) = self.connect_app(conn).await else {
                    return;
                };
                match io::first_speaker(&mut tcp, &up, MAX_DETECT_BYTES).await {
                    Ok(Some(bytes)) if bytes[0] == 0x16 => {
                        match detect::detect_after(&mut tcp, self.detect_timeout, bytes).await {
                            Ok((d, prefix)) => (self.first(&d), prefix, Some(up)),
                            Err(_) => return,
                        }
                    }
                    Ok(Some(bytes)) => (First::NotHttp, Bytes::from(bytes), Some(up)),
                    Ok(None) => (First::Idle, Bytes::new(), Some(up)),
                    Err(_) => return,
                }
            }
        };
        match decide::inbound_opaque_port(mtls, first) {
            Action::Terminate => {
                let io = ProxyIo::new(tcp, prefix, Some(self.bytes.clone()));
                Box::pin(self.terminate(io, drain, upstream, conn)).await
            }
            Action::Refuse(r) => self.refuse(r, &mut tcp).await,
            Action::Close => {}
            _ => {
                if self.tls.is_some() {
                    self.metrics.tls(self.direction, TlsResult::Plaintext);
                }
                self.count_connection(Protocol::Opaque);
                let io = ServerIo::Plain(ProxyIo::new(tcp, prefix, Some(self.bytes.clone())));
                Box::pin(self.opaque(io, upstream, conn)).await
            }
        }
    }

    /// Records what detection saw (metrics, and a log line for what is closed).
    fn record(&self, detected: &Detected) {
        let result = match detected {
            Detected::Protocol(Protocol::Http1) => DetectResult::Http1,
            Detected::Protocol(Protocol::Http2) => DetectResult::Http2,
            Detected::Protocol(Protocol::Opaque) => DetectResult::Opaque,
            Detected::Malformed => DetectResult::Malformed,
            Detected::Idle => DetectResult::Idle,
            Detected::Tls { .. } => DetectResult::Tls,
            Detected::BadHello => {
                self.metrics.tls(self.direction, TlsResult::BadHello);
                tracing::info!(
                    "TLS ClientHello truncated, stalled past the detect timeout, or malformed; closing"
                );
                DetectResult::Tls
            }
            Detected::Stalled => {
                tracing::info!(timeout = ?self.detect_timeout,
                    "client sent a partial request and stalled past the detect timeout; closing");
                DetectResult::Timeout
            }
            Detected::Closed => DetectResult::Closed,
        };
        self.metrics.detected(self.direction, result);
    }

    /// Turns a connection away, saying why in the log (and, for malformed HTTP, to the client).
    async fn refuse<W: AsyncWrite + Unpin>(&self, why: Refusal, io: &mut W) {
        match why {
            Refusal::Plaintext => {
                self.metrics
                    .tls(self.direction, TlsResult::RefusedPlaintext);
                tracing::info!(
                    "plaintext connection refused: REMORA_MTLS=strict accepts mTLS only (and HTTP/1.1 GET/HEAD probes to REMORA_PROBE_PATHS)"
                );
            }
            Refusal::ForeignTls => {
                self.metrics
                    .tls(self.direction, TlsResult::RefusedPlaintext);
                tracing::info!(
                    "TLS for another server name refused: REMORA_MTLS=strict accepts mTLS to this proxy only"
                );
            }
            Refusal::Malformed => {
                self.metrics.error(self.direction, ErrorKind::BadRequest);
                tracing::info!(
                    "malformed HTTP/1 request line refused (it could reach a lenient app server unscrubbed); if this port carries a non-HTTP protocol, list it in REMORA_OPAQUE_PORTS"
                );
                const BODY: &str = "remora: malformed HTTP/1 request line (RFC 9112: METHOD SP target SP HTTP/1.x CRLF)\n";
                let rsp = format!(
                    "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
                    BODY.len()
                );
                let _ = tokio::time::timeout(self.detect_timeout, async {
                    let _ = io.write_all(rsp.as_bytes()).await;
                    let _ = io.shutdown().await;
                })
                .await;
            }
            Refusal::NoDestination => {
                self.metrics.error(self.direction, ErrorKind::NoDestination);
                tracing::info!(
                    "non-HTTP connection with no destination; tunnel opaque traffic with HTTP CONNECT host:port"
                );
            }
        }
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

    /// Boxed here, each protocol's future at its own size (an `async fn` would be the size of
    /// the largest, HTTP/2's, for every connection, and keep its arguments besides).
    fn serve_conn<'a>(
        &'a self,
        protocol: Protocol,
        io: ServerIo,
        client_id: Option<HeaderValue>,
        probe_only: Option<Arc<Vec<String>>>,
        drain: &'a Drain,
        conn: &'a Conn,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        self.count_connection(protocol);
        match protocol {
            Protocol::Http1 => Box::pin(serve_h1(
                io,
                self.stack(client_id, probe_only, conn),
                drain,
                self.detect_timeout,
            )),
            Protocol::Http2 => {
                Box::pin(serve_h2(io, self.stack(client_id, probe_only, conn), drain))
            }
            Protocol::Opaque => Box::pin(self.opaque(io, None, conn)),
        }
    }

    /// Terminates mTLS (the decision said the ClientHello is for this proxy), checks the
    /// peer's identity, and decides again on what is inside. `upstream` is a connection to the
    /// app made before the handshake (opaque ports), used for opaque bytes inside.
    async fn terminate(
        &self,
        io: ProxyIo,
        drain: Drain,
        upstream: Option<UpstreamIo>,
        conn: &Conn,
    ) {
        let Some(loaded) = self.loaded() else {
            return;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(loaded.server.clone());
        let stream = match tokio::time::timeout(self.detect_timeout, acceptor.accept(io)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.metrics.tls(self.direction, TlsResult::HandshakeFailed);
                tracing::info!(error = %e, "mTLS handshake failed");
                return;
            }
            Err(_) => {
                self.metrics.tls(self.direction, TlsResult::HandshakeFailed);
                tracing::info!(timeout = ?self.detect_timeout, "mTLS handshake timed out");
                return;
            }
        };
        let (_, tls_conn) = stream.get_ref();
        // rustls verified the chain; the identity must be the leaf's one SPIFFE URI SAN, in
        // this mesh's trust domain: a CA-signed certificate without one, or with a foreign
        // domain, is not a mesh identity and gets nothing through.
        let td = loaded.id().trust_domain().to_string();
        let id = match tls_conn.peer_certificates().and_then(|c| c.first()) {
            Some(leaf) => remora_certs::validate::peer_identity(leaf, &td),
            None => Err(remora_certs::validate::PeerIdError::Missing),
        };
        let client_id = match id.map(|id| HeaderValue::from_str(&id.to_string())) {
            Ok(Ok(v)) => v,
            Ok(Err(_)) => {
                self.metrics.tls(self.direction, TlsResult::BadIdentity);
                tracing::info!("mTLS peer identity is not a valid header value; closing");
                return;
            }
            Err(e) => {
                self.metrics.tls(self.direction, TlsResult::BadIdentity);
                tracing::info!(error = %e, "mTLS peer refused: its certificate chains to the trust bundle but carries no usable identity; issue it with one SPIFFE ID in this trust domain");
                return;
            }
        };
        self.metrics.tls(self.direction, TlsResult::Mtls);
        self.metrics
            .mesh_connection(self.direction, crate::metrics::Transport::Tcp);
        if let Ok(id) = client_id.to_str() {
            tracing::Span::current().record("identity", id);
        }
        let alpn = tls_conn.alpn_protocol().map(<[u8]>::to_vec);
        let mut stream = Box::new(stream);
        let mut initial = Vec::new();
        let mut upstream = upstream;
        let opaque_port = self.skip_detection;
        loop {
            let (first, prefix) = match alpn.as_deref() {
                _ if opaque_port => (First::NotHttp, Bytes::new()),
                Some(crate::tls::ALPN_H2) => (First::Http2, Bytes::new()),
                Some(crate::tls::ALPN_HTTP1) => (First::Http1, Bytes::new()),
                // The caller's proxy says the port is opaque (discovery did): don't wait for
                // the client, let the first speaker decide at once. Only a hint: a client that
                // speaks first is still detected, so a peer offering this ALPN cannot carry
                // HTTP to the app past scrubbing and identity.
                Some(crate::tls::ALPN_OPAQUE) if initial.is_empty() => (First::Idle, Bytes::new()),
                _ => match detect::detect_after(&mut stream, self.detect_timeout, initial).await {
                    Ok((d, prefix)) => (self.first_inside(&d), prefix),
                    Err(_) => return,
                },
            };
            match decide::inside_mtls(opaque_port, first) {
                Action::Http { .. } => {
                    let protocol = match first {
                        First::Http2 => Protocol::Http2,
                        _ => Protocol::Http1,
                    };
                    let io = ServerIo::Tls(ProxyIo::new(stream, prefix, None));
                    return self
                        .serve_conn(protocol, io, Some(client_id), None, &drain, conn)
                        .await;
                }
                Action::AwaitSpeaker => {
                    let up = match upstream.take() {
                        Some(u) => u,
                        None => match self.connect_app(conn).await {
                            Some(u) => u,
                            None => return,
                        },
                    };
                    match io::first_speaker(&mut stream, &up, MAX_DETECT_BYTES).await {
                        Ok(Some(bytes)) => {
                            initial = bytes;
                            upstream = Some(up);
                        }
                        Ok(None) => {
                            self.count_connection(Protocol::Opaque);
                            let io = ServerIo::Tls(ProxyIo::new(stream, Bytes::new(), None));
                            return Box::pin(self.opaque(io, Some(up), conn)).await;
                        }
                        Err(_) => return,
                    }
                }
                Action::Refuse(r) => return self.refuse(r, &mut stream).await,
                Action::Close => return,
                Action::Opaque | Action::Terminate => {
                    self.count_connection(Protocol::Opaque);
                    let io = ServerIo::Tls(ProxyIo::new(stream, prefix, None));
                    return Box::pin(self.opaque(io, upstream, conn)).await;
                }
            }
        }
    }

    /// Detection inside mTLS: TLS there is the peer app's own (never terminated twice).
    fn first_inside(&self, detected: &Detected) -> First {
        match detected {
            Detected::Tls { .. } => First::TlsOther,
            d => self.first(d),
        }
    }

    async fn connect_app(&self, conn: &Conn) -> Option<UpstreamIo> {
        if let Some(original) = conn.original {
            return match self.forward.connect_original(original).await {
                Ok(u) => Some(u),
                Err(e) => {
                    self.metrics.error(self.direction, e.kind());
                    tracing::info!(error = %e, "intercepted connection could not be forwarded");
                    None
                }
            };
        }
        let target = conn.app.as_ref().or(self.opaque_target.as_ref())?;
        match target.connect(None).await {
            Ok(u) => Some(u),
            Err(e) => {
                self.metrics.error(self.direction, ErrorKind::ConnectFailed);
                tracing::info!(error = %e, "opaque connection failed");
                None
            }
        }
    }

    /// Bytes both ways between the client and the app (`upstream`, or a new connection).
    async fn opaque(&self, mut io: ServerIo, upstream: Option<UpstreamIo>, conn: &Conn) {
        let mut upstream = match upstream {
            Some(u) => u,
            None => match self.connect_app(conn).await {
                Some(u) => u,
                None => {
                    if self.opaque_target.is_none() && conn.original.is_none() {
                        self.metrics.error(self.direction, ErrorKind::NoDestination);
                    }
                    return;
                }
            },
        };
        // Half-closes are forwarded in each direction; a tunnel silent both ways is closed.
        if let Err(e) = io::tunnel(&mut io, &mut upstream, io::TUNNEL_IDLE_TIMEOUT).await {
            tracing::debug!(error = %e, "opaque connection ended with an error");
        }
    }
}

struct GaugeGuard<'a>(&'a Gauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
