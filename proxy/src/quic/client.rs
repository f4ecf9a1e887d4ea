//! Outbound: an endpoint's HTTP/2 client connection carried over one HTTP/3 connection.
//!
//! [`connect`] makes the QUIC connection (mTLS, the peer's SPIFFE ID checked by the same
//! verifier as TCP) and hands back one end of an in-memory pipe; the endpoint runs its usual
//! HTTP/2 client on it. On the other end a bridge serves HTTP/2 and sends each stream as an
//! HTTP/3 request. When the peer says GOAWAY, the bridge says GOAWAY too, so the endpoint
//! opens a new connection for new requests while the streams in flight finish.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use bytes::Bytes;
use h3::ConnectionState;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::DuplexStream;

use super::bridge::{BridgeError, H3Body, pipe};
use super::streams;
use crate::config::MeshTransport;
use crate::http::{MAX_HEADER_BYTES, STREAM_WINDOW};

/// Sent with each request when the QUIC port is not the endpoint's own port (interception:
/// the endpoint is `pod-ip:app-port`, QUIC goes to the peer proxy's inbound port): the app
/// port the request is for. The peer proxy reads and removes it; like every `x-remora-*`
/// header it is never forwarded, and TCP requests carrying it are scrubbed as always.
pub(crate) const PORT_HEADER: HeaderName = HeaderName::from_static("x-remora-port");

type SendRequest = h3::client::SendRequest<streams::Opener, Bytes>;
type ResponseBody = H3Body<h3::client::RequestStream<streams::Recv, Bytes>>;

/// The proxy's QUIC client side: the transport policy and one UDP endpoint per address family,
/// bound on first use and shared by every peer connection.
pub struct QuicClient {
    mode: MeshTransport,
    v4: Mutex<Option<quinn::Endpoint>>,
    v6: Mutex<Option<quinn::Endpoint>>,
}

/// Why a QUIC connection was not made.
pub(crate) enum ConnectError {
    /// No answer in time (UDP blocked or nobody listening): TCP should carry the request.
    Unreachable(String),
    /// The peer answered and the handshake failed (its identity, our certificate): the same
    /// failure TCP would meet, so no fallback.
    Failed(String),
}

impl QuicClient {
    /// `None` when the policy never uses QUIC.
    pub(crate) fn new(mode: MeshTransport) -> Option<Arc<Self>> {
        (mode != MeshTransport::Tcp).then(|| {
            Arc::new(QuicClient {
                mode,
                v4: Mutex::new(None),
                v6: Mutex::new(None),
            })
        })
    }

    /// Where to reach an endpoint at `addr` over QUIC, given the port it advertises: `auto`
    /// uses what is advertised, `quic` also tries the endpoint's own port number.
    pub(crate) fn target(&self, addr: SocketAddr, advertised: Option<u16>) -> Option<SocketAddr> {
        match (self.mode, advertised) {
            (MeshTransport::Tcp, _) | (MeshTransport::Auto, None) => None,
            (_, Some(port)) => Some(SocketAddr::new(addr.ip(), port)),
            (MeshTransport::Quic, None) => Some(addr),
        }
    }

    fn endpoint(&self, v6: bool) -> std::io::Result<quinn::Endpoint> {
        let slot = if v6 { &self.v6 } else { &self.v4 };
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ep) = &*slot {
            return Ok(ep.clone());
        }
        let any: SocketAddr = if v6 {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let socket = super::udp_socket(any)?;
        let ep = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        *slot = Some(ep.clone());
        Ok(ep)
    }
}

/// Connects to `udp` over QUIC expecting the peer to prove the identity `cfg` checks, and
/// returns the pipe end the endpoint's HTTP/2 client speaks on. `port`: the app port for
/// [`PORT_HEADER`], when the QUIC port is another one.
pub(crate) async fn connect(
    client: &QuicClient,
    udp: SocketAddr,
    cfg: quinn::ClientConfig,
    server_name: &str,
    port: Option<u16>,
) -> Result<DuplexStream, ConnectError> {
    let ep = client
        .endpoint(udp.is_ipv6())
        .map_err(|e| ConnectError::Unreachable(format!("no UDP socket for QUIC: {e}")))?;
    let connecting = ep
        .connect_with(cfg, udp, server_name)
        .map_err(|e| ConnectError::Unreachable(format!("QUIC connect to {udp}: {e}")))?;
    let conn = match tokio::time::timeout(super::HANDSHAKE_TIMEOUT, connecting).await {
        Err(_) | Ok(Err(quinn::ConnectionError::TimedOut)) => {
            return Err(ConnectError::Unreachable(format!(
                "no QUIC handshake with {udp} within {:?} (UDP blocked, or no QUIC listener)",
                super::HANDSHAKE_TIMEOUT
            )));
        }
        // Refused before any TLS (the peer drains, or has no QUIC configuration): like an
        // unanswered handshake, TCP decides whether the peer is there.
        Ok(Err(quinn::ConnectionError::ConnectionClosed(c)))
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            return Err(ConnectError::Unreachable(format!(
                "{udp} refused the QUIC connection"
            )));
        }
        Ok(Err(e)) => return Err(ConnectError::Failed(handshake_error(e))),
        Ok(Ok(c)) => c,
    };
    let (driver, sender) = h3::client::builder()
        .max_field_section_size(super::MAX_FIELD_SECTION)
        .send_grease(false)
        .build(streams::Conn::new(conn.clone(), None))
        .await
        .map_err(|e| ConnectError::Failed(format!("HTTP/3 over QUIC to {udp}: {e}")))?;
    let (ours, theirs) = tokio::io::duplex(super::PIPE_BUFFER);
    let port = port.map(HeaderValue::from);
    tokio::spawn(bridge(conn, driver, sender, ours, port));
    Ok(theirs)
}

/// The handshake's failure in the words TCP would use: the TLS error itself (for example the
/// verifier's "invalid peer certificate: …" when the peer is not who discovery said).
fn handshake_error(e: quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::TransportError(t) if !t.reason.is_empty() => t.reason,
        quinn::ConnectionError::ConnectionClosed(c) if !c.reason.is_empty() => {
            format!(
                "refused by the peer: {}",
                String::from_utf8_lossy(&c.reason)
            )
        }
        other => other.to_string(),
    }
}

/// Serves the endpoint's HTTP/2 connection, sending each stream over HTTP/3, until either
/// side ends.
async fn bridge(
    conn: quinn::Connection,
    mut driver: h3::client::Connection<streams::Conn, Bytes>,
    sender: SendRequest,
    io: DuplexStream,
    port: Option<HeaderValue>,
) {
    let per_request = sender.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        send(per_request.clone(), req, port.clone())
    });
    let h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(super::MAX_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(128 * STREAM_WINDOW)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(h2);
    // `Some(error)`: the QUIC connection ended; `None`: the peer sent GOAWAY.
    let ended = {
        let closing = std::future::poll_fn(|cx| match driver.poll_close(cx) {
            Poll::Ready(e) => Poll::Ready(Some(e)),
            Poll::Pending if sender.is_closing() => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        });
        tokio::select! {
            _ = h2.as_mut() => {
                // The endpoint let go of the connection (removed, or its client closed).
                conn.close(super::NO_ERROR, b"");
                return;
            }
            e = closing => e,
        }
    };
    h2.as_mut().graceful_shutdown();
    match ended {
        Some(e) => {
            tracing::debug!(peer = %conn.remote_address(), error = %e, "QUIC connection to a peer ended");
            let _ = h2.await;
        }
        None => {
            tracing::debug!(peer = %conn.remote_address(), "peer sent GOAWAY over HTTP/3; finishing streams in flight");
            tokio::select! {
                _ = h2.as_mut() => {}
                _ = driver.wait_idle() => { let _ = h2.await; }
            }
        }
    }
    conn.close(super::NO_ERROR, b"");
}

/// One request: its head as an HTTP/3 request, its body piped alongside, the response back.
async fn send(
    mut sender: SendRequest,
    req: Request<Incoming>,
    port: Option<HeaderValue>,
) -> Result<Response<ResponseBody>, BridgeError> {
    let (mut parts, body) = req.into_parts();
    // HTTP/3 refuses a Host that differs from :authority as a connection error (every stream
    // on it would fail); :authority is what HTTP/2 and HTTP/3 route on, so Host goes.
    if parts.uri.authority().is_some() {
        parts.headers.remove(http::header::HOST);
    }
    if let Some(port) = port {
        parts.headers.insert(PORT_HEADER, port);
    }
    let stream = match sender.send_request(Request::from_parts(parts, ())).await {
        Ok(s) => s,
        // Too large for the peer: sending it elsewhere would fail the same way.
        Err(e @ h3::error::StreamError::HeaderTooBig { .. }) => {
            return Err(BridgeError::new(h2::Reason::INTERNAL_ERROR, e.to_string()));
        }
        // The stream could not be opened or its head written: the connection is going away
        // or gone, and no byte of this request left. REFUSED_STREAM lets the endpoint replay
        // it on a new connection.
        Err(e) => {
            return Err(BridgeError::new(
                h2::Reason::REFUSED_STREAM,
                format!("HTTP/3 request not sent: {e}"),
            ));
        }
    };
    let (mut tx, rx) = stream.split();
    if body.is_end_stream() {
        let _ = tx.finish().await;
    } else {
        // The request body flows while the response arrives (streaming both ways); a client
        // that goes away resets its body, which resets this stream.
        tokio::spawn(async move { pipe(body, &mut tx).await });
    }
    // Dropped before the response (the caller gave up), this stops the stream.
    let mut rsp_body = H3Body::new(rx);
    let head = rsp_body
        .recv_mut()
        .recv_response()
        .await
        .map_err(|e| match e {
            // A graceful close (H3_NO_ERROR) comes after the peer's GOAWAY and after it
            // answered every request it accepted (RFC 9114 §5.2; remora's server closes only
            // then): a request still without its answer's head is one the peer never took
            // (it raced the GOAWAY), so it may go elsewhere. Only before the head: a body cut
            // by the close was processed.
            h3::error::StreamError::ConnectionError(c) if c.is_h3_no_error() => BridgeError::new(
                h2::Reason::REFUSED_STREAM,
                "the peer closed gracefully before answering (it never took the request)",
            ),
            e => BridgeError::from_h3(&e),
        })?;
    if head.headers().contains_key("grpc-status") {
        rsp_body.settle().await;
    } else {
        rsp_body.peek();
    }
    Ok(head.map(|()| rsp_body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_endpoints_ride_quic() {
        let addr: SocketAddr = "10.0.0.7:8080".parse().unwrap();
        let at = |p: u16| Some(SocketAddr::new(addr.ip(), p));
        // (policy, advertised port, where QUIC goes)
        let table = [
            (MeshTransport::Auto, None, None),
            (MeshTransport::Auto, Some(4143), at(4143)),
            (MeshTransport::Quic, None, Some(addr)),
            (MeshTransport::Quic, Some(4143), at(4143)),
        ];
        for (mode, advertised, want) in table {
            let Some(client) = QuicClient::new(mode) else {
                panic!("{mode:?} has a QUIC client");
            };
            assert_eq!(
                client.target(addr, advertised),
                want,
                "{mode:?} {advertised:?}"
            );
        }
        assert!(
            QuicClient::new(MeshTransport::Tcp).is_none(),
            "tcp never tries QUIC"
        );
    }
}
