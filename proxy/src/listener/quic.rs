//! Inbound QUIC: HTTP/3 from peer proxies on the inbound port's number over UDP.
//!
//! Same certificate, client-certificate verification, SPIFFE rules and hot reload as TCP mTLS
//! (each connection is accepted with the configuration of the credential set current at that
//! moment; a set that failed validation never becomes current). Each connection gets an
//! in-memory HTTP/2 connection served by the listener's own stack with the identity the QUIC
//! handshake verified, so scrubbing, policy, metrics and draining are the TCP path's (see
//! `crate::quic`). Under interception, requests name their app port in
//! [`PORT_HEADER`]; each port gets its own in-memory connection, as each port is its own TCP
//! connection there.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h3::error::Code;
use http::{HeaderValue, Request};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::{Conn, GaugeGuard, Listener};
use crate::drain::Drain;
use crate::http::{MAX_HEADER_BYTES, STREAM_WINDOW, serve_h2};
use crate::identity::{IdentityStore, Loaded};
use crate::metrics::{Direction, TlsResult, Transport};
use crate::quic::bridge::{H3Body, H3Send, h3_code, pipe};
use crate::quic::client::PORT_HEADER;
use crate::quic::streams::{self, Stopped};

type RequestBody = H3Body<h3::server::RequestStream<streams::Recv, Bytes>>;
type Bridge = http2::SendRequest<RequestBody>;

/// Free connection slots below which new QUIC peers must validate their address first.
const RETRY_BELOW_SLOTS: usize = 512;

/// App ports one connection may address under interception (each holds an in-memory HTTP/2
/// connection): a pod exposes a handful.
const MAX_PORTS: usize = 16;

/// Binds the UDP socket for QUIC at the inbound listener's address.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    crate::quic::udp_socket(addr)
}

/// Accepts QUIC connections until the drain starts; the connections then finish their streams
/// (they watch the drain themselves).
pub(crate) async fn serve(
    listener: Arc<Listener>,
    socket: std::net::UdpSocket,
    store: Arc<IdentityStore>,
    drain: Drain,
) {
    let local = socket.local_addr().ok();
    let udp_port = local.map(|a| a.port());
    // An endpoint without a server configuration drops every handshake, so it starts with the
    // first credential set (the proxy is not ready before one anyway). After that each
    // connection is accepted with the set current at that moment.
    let first = loop {
        if let Some(cfg) = store.current().and_then(|l| server_config(&l).ok()) {
            break cfg;
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
            _ = drain.signaled() => return,
        }
    };
    let endpoint = match quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some((*first).clone()),
        socket,
        Arc::new(quinn::TokioRuntime),
    ) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "QUIC listener failed; inbound is TCP only");
            return;
        }
    };
    tracing::info!(addr = ?local, "inbound QUIC (HTTP/3, mTLS) listening");
    let mut draining = false;
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = drain.signaled(), if !draining => {
                draining = true;
                continue;
            }
            // Draining: the socket is kept (refusing) until the listener's connections are
            // gone, then closed like a TCP listener.
            _ = tokio::time::sleep(std::time::Duration::from_millis(100)), if draining => {
                if listener.open.get() == 0 {
                    break;
                }
                continue;
            }
        };
        let Some(incoming) = incoming else { break };
        if draining {
            // Refused at once (CONNECTION_REFUSED), as a closed TCP listener refuses: the
            // caller moves on instead of waiting out its handshake timeout.
            incoming.refuse();
            continue;
        }
        let peer = incoming.remote_address();
        // A handshake holds a connection slot before the peer has proved anything, and an
        // Initial packet can come from a forged address. When slots run low, a peer must
        // first prove it receives at its address (a Retry round trip).
        if listener.slots.available_permits() < RETRY_BELOW_SLOTS
            && !incoming.remote_address_validated()
            && incoming.may_retry()
        {
            let _ = incoming.retry();
            continue;
        }
        let Ok(slot) = listener.slots.clone().try_acquire_owned() else {
            listener.refused.inc();
            incoming.refuse();
            continue;
        };
        let Some(loaded) = store.current() else {
            incoming.refuse();
            continue;
        };
        let Ok(cfg) = server_config(&loaded) else {
            incoming.refuse();
            continue;
        };
        let connecting = match incoming.accept_with(cfg) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "QUIC connection not accepted");
                continue;
            }
        };
        let span = tracing::info_span!(
            "conn",
            direction = "inbound",
            %peer,
            transport = "quic",
            identity = tracing::field::Empty,
        );
        let this = listener.clone();
        let d = drain.clone();
        drain.spawn(
            "inbound QUIC connection",
            Some(peer),
            tracing::Instrument::instrument(
                async move {
                    let _slot = slot;
                    this.quic_connection(connecting, loaded, udp_port, d).await
                },
                span,
            ),
        );
    }
    endpoint.close(crate::quic::NO_ERROR, b"");
}

fn server_config(l: &Loaded) -> Result<Arc<quinn::ServerConfig>, String> {
    let res = l.quic_server(crate::quic::server_config);
    if let Err(e) = &res {
        tracing::warn!(error = %e, "no QUIC with this credential set; inbound stays on TCP");
    }
    res
}

impl Listener {
    /// One QUIC connection: the handshake, the peer's identity, then its requests.
    async fn quic_connection(
        self: Arc<Self>,
        connecting: quinn::Connecting,
        loaded: Arc<Loaded>,
        udp_port: Option<u16>,
        drain: Drain,
    ) {
        self.open.inc();
        let _open = GaugeGuard(&self.open);
        let conn = match tokio::time::timeout(self.detect_timeout, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                self.metrics.tls(self.direction, TlsResult::HandshakeFailed);
                tracing::info!(error = %e, "QUIC mTLS handshake failed");
                return;
            }
            Err(_) => {
                self.metrics.tls(self.direction, TlsResult::HandshakeFailed);
                tracing::info!(timeout = ?self.detect_timeout, "QUIC mTLS handshake timed out");
                return;
            }
        };
        let Some(client_id) = self.quic_peer(&conn, &loaded) else {
            conn.close(quinn::VarInt::from_u32(0x0101), b"peer identity refused");
            return;
        };
        self.metrics.tls(self.direction, TlsResult::Mtls);
        self.metrics
            .mesh_connection(Direction::Inbound, Transport::Quic);
        let stopped = Stopped::default();
        let mut h3 = match h3::server::builder()
            .max_field_section_size(crate::quic::MAX_FIELD_SECTION)
            .send_grease(false)
            .build(streams::Conn::new(conn.clone(), Some(stopped.clone())))
            .await
        {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(error = %e, "HTTP/3 setup failed");
                return;
            }
        };
        let bridges = Arc::new(Bridges {
            listener: self.clone(),
            client_id,
            local_ip: conn.local_ip(),
            udp_port,
            drain: drain.clone(),
            ports: tokio::sync::Mutex::new(HashMap::new()),
        });
        let mut draining = false;
        loop {
            let accepted = tokio::select! {
                a = h3.accept() => a,
                _ = drain.signaled(), if !draining => {
                    // GOAWAY: the peer sends new requests elsewhere; these streams finish.
                    draining = true;
                    let _ = h3.shutdown(0).await;
                    continue;
                }
            };
            let resolver = match accepted {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "QUIC connection ended");
                    break;
                }
            };
            let bridges = bridges.clone();
            let stopped = stopped.clone();
            let head_timeout = self.detect_timeout;
            drain.spawn(
                "inbound HTTP/3 request",
                Some(conn.remote_address()),
                async move {
                    // A stream that never completes its head holds a task: bounded like a
                    // TCP client's header read (h3 resets what it drops).
                    let head = tokio::time::timeout(head_timeout, resolver.resolve_request());
                    let (req, stream) = match head.await {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "HTTP/3 request refused");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("HTTP/3 request head not received in time");
                            return;
                        }
                    };
                    bridges.request(req, stream, &stopped).await;
                },
            );
        }
        conn.close(crate::quic::NO_ERROR, b"");
    }

    /// The peer's identity, checked as `terminate` checks it over TCP: the leaf's one SPIFFE
    /// ID, in this mesh's trust domain.
    fn quic_peer(&self, conn: &quinn::Connection, loaded: &Loaded) -> Option<HeaderValue> {
        let certs = conn.peer_identity().and_then(|a| {
            a.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        });
        let td = loaded.id().trust_domain().to_string();
        let id = match certs.as_ref().and_then(|c| c.first()) {
            Some(leaf) => remora_certs::validate::peer_identity(leaf, &td),
            None => Err(remora_certs::validate::PeerIdError::Missing),
        };
        match id.map(|id| HeaderValue::from_str(&id.to_string())) {
            Ok(Ok(v)) => {
                if let Ok(id) = v.to_str() {
                    tracing::Span::current().record("identity", id);
                }
                Some(v)
            }
            Ok(Err(_)) => {
                self.metrics.tls(self.direction, TlsResult::BadIdentity);
                tracing::info!("QUIC mTLS peer identity is not a valid header value; closing");
                None
            }
            Err(e) => {
                self.metrics.tls(self.direction, TlsResult::BadIdentity);
                tracing::info!(error = %e, "QUIC mTLS peer refused: its certificate chains to the trust bundle but carries no usable identity; issue it with one SPIFFE ID in this trust domain");
                None
            }
        }
    }
}

/// One QUIC connection's in-memory HTTP/2 connections into the stack, by app port.
struct Bridges {
    listener: Arc<Listener>,
    client_id: HeaderValue,
    local_ip: Option<std::net::IpAddr>,
    udp_port: Option<u16>,
    drain: Drain,
    ports: tokio::sync::Mutex<HashMap<Option<u16>, Bridge>>,
}

impl Bridges {
    /// The connection for `port` (`None`: the listener's app), made on first use.
    async fn get(&self, port: Option<u16>) -> Option<Bridge> {
        let mut ports = self.ports.lock().await;
        if let Some(b) = ports.get(&port).filter(|b| !b.is_closed()) {
            return Some(b.clone());
        }
        if ports.len() >= MAX_PORTS && !ports.contains_key(&port) {
            tracing::info!(
                ?port,
                "HTTP/3 request refused: too many app ports on one connection"
            );
            return None;
        }
        let conn = match port {
            None => Conn {
                local: self.listener_addr(),
                ..Conn::default()
            },
            Some(p) => {
                // The app port is reached at the address the peer reached (the pod's IP),
                // never at loopback: a peer gets nothing over QUIC that the pod network does
                // not already offer it (services bound to 127.0.0.1 stay private), and this
                // connection's endpoint dies with it (no per-port state outlives it).
                let ip = self.local_ip?;
                let addr = SocketAddr::new(ip, p);
                let ports = self.listener.app_ports.as_ref()?;
                if ports.own_ports.contains(&p) {
                    self.listener
                        .metrics
                        .error(self.listener.direction, crate::metrics::ErrorKind::Loop);
                    tracing::info!(
                        port = p,
                        "HTTP/3 request for one of the proxy's own ports refused (it would loop)"
                    );
                    return None;
                }
                Conn {
                    app: Some(Arc::new(crate::endpoint::Endpoint::new(
                        addr,
                        1,
                        ports.connect_timeout,
                        None,
                    ))),
                    original: None,
                    local: Some(addr),
                }
            }
        };
        let (ours, theirs) = tokio::io::duplex(crate::quic::PIPE_BUFFER);
        let stack = self
            .listener
            .stack(Some(self.client_id.clone()), None, &conn);
        self.listener
            .count_connection(super::detect::Protocol::Http2);
        // Not told of the drain: the QUIC connection's GOAWAY is what tells the peer, and a
        // stream the GOAWAY promised to serve must not meet a second one here. It ends when
        // the QUIC connection drops its senders.
        let undrained = Drain::new();
        self.drain.spawn("inbound HTTP/3 bridge", None, async move {
            serve_h2(theirs, stack, &undrained).await;
        });
        let (sender, h2) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(4 * STREAM_WINDOW)
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .handshake(TokioIo::new(ours))
            .await
            .ok()?;
        tokio::spawn(async move {
            let _ = h2.await;
        });
        ports.insert(port, sender.clone());
        Some(sender)
    }

    /// The address the peer reached, whose rate limits apply (as `local` of a TCP connection).
    fn listener_addr(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(self.local_ip?, self.udp_port?))
    }

    /// One request: into the stack, the response back; a peer that stops reading before the
    /// end cancels it, as RST_STREAM would.
    async fn request(
        &self,
        req: Request<()>,
        stream: h3::server::RequestStream<streams::Bidi, Bytes>,
        stopped: &Stopped,
    ) {
        let mut stop: streams::StoppedFuture = stopped
            .take(stream.id())
            .unwrap_or_else(|| Box::pin(std::future::pending()));
        let (mut tx, rx) = stream.split();
        let (mut parts, ()) = req.into_parts();
        let port = parts.headers.remove(PORT_HEADER);
        // Only interception makes an app port meaningful; without it the header is ignored.
        let port = match (&self.listener.app_ports, port) {
            (Some(_), Some(p)) => match p.to_str().ok().and_then(|p| p.parse::<u16>().ok()) {
                Some(p) => Some(p),
                None => {
                    tx.reset(Code::H3_MESSAGE_ERROR);
                    return;
                }
            },
            _ => None,
        };
        let Some(mut bridge) = self.get(port).await else {
            tx.reset(Code::H3_REQUEST_REJECTED);
            return;
        };
        parts.version = http::Version::HTTP_2;
        let mut body = H3Body::new(rx);
        body.peek();
        let req = Request::from_parts(parts, body);
        let rsp = tokio::select! {
            r = bridge.send_request(req) => r,
            _ = &mut stop => {
                tx.reset(Code::H3_REQUEST_CANCELLED);
                return;
            }
        };
        let rsp = match rsp {
            Ok(r) => r,
            Err(e) => {
                let code = if crate::retry::replay::never_processed(&e) {
                    Code::H3_REQUEST_REJECTED
                } else {
                    h3_code(&e)
                };
                tx.reset(code);
                return;
            }
        };
        let (parts, body) = rsp.into_parts();
        if tx
            .send_response(http::Response::from_parts(parts, ()))
            .await
            .is_err()
        {
            tx.reset(Code::H3_REQUEST_CANCELLED);
            return;
        }
        tokio::select! {
            _ = pipe(body, &mut tx) => {}
            _ = &mut stop => tx.reset(Code::H3_REQUEST_CANCELLED),
        }
    }
}
