//! The QUIC meshed hop: HTTP/3 between two proxies, with the same mTLS identities as TCP.
//!
//! Over one TCP connection a lost packet stalls every stream behind it; QUIC streams are
//! independent, so one service pair's calls do not wait for each other's retransmissions.
//!
//! **Shape.** The request path (`Observe` → `Scrub` → `ForwardService` → `Endpoint`) is
//! written against hyper's HTTP/2 connections, and everything it does per request (scrubbing,
//! the verified identity header, policy, retries of never-processed requests on
//! REFUSED_STREAM/GOAWAY, metrics, draining) stays in that one place. QUIC is a transport
//! under it: each QUIC connection is paired with an in-memory HTTP/2 connection (a tokio
//! duplex pipe).
//! - Inbound (`listener::quic`): requests accepted over HTTP/3 are sent on an HTTP/2 connection
//!   served by the same stack as an mTLS TCP connection, with the identity QUIC's handshake
//!   verified.
//! - Outbound ([`client`]): the endpoint's HTTP/2 client connection is served by a bridge that
//!   sends each stream as an HTTP/3 request. `H3_REQUEST_REJECTED` and a peer's GOAWAY become
//!   REFUSED_STREAM and GOAWAY on the HTTP/2 side, so the endpoint's existing replay applies.
//!
//! The price is one HTTP/2 encode and decode in memory per request on each side (measured in
//! `benches/results/quic.md`); a body type shared by both transports would remove it.
//!
//! **Choices.**
//! - 0-RTT is off on both sides (rustls's defaults: no early data offered or accepted):
//!   early data can be replayed by anyone who captured it, and a replayed POST is a second
//!   order. Session resumption (1-RTT) stays on.
//! - The server refuses connection migration: a pod's address does not move, and a changed
//!   peer address is a different pod, not a roaming phone.
//! - Only HTTP/2 requests ride QUIC (gRPC, h2c): HTTP/3 keeps their semantics. HTTP/1.1,
//!   Upgrade and opaque tunnels stay on TCP + mTLS, so the app behind the peer proxy sees the
//!   protocol its client spoke.

pub(crate) mod bridge;
pub(crate) mod client;
pub(crate) mod streams;

use std::sync::Arc;
use std::time::Duration;

use crate::http::{MAX_HEADER_BYTES, STREAM_WINDOW};
use crate::identity::Loaded;
use remora_certs::SpiffeId;

/// The ALPN of HTTP/3 (RFC 9114); QUIC always runs TLS 1.3.
pub const ALPN_H3: &[u8] = b"h3";

/// How long a QUIC handshake may take before the request goes over TCP instead: a blocked
/// UDP path answers never, while with [`INITIAL_RTT`] a lost handshake packet is resent
/// after about 75 ms, then 150, 300: three losses in a row still fit.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(500);

/// The round trip assumed before one is measured. quinn's default (333 ms, the RFC's for the
/// open Internet) would make one lost Initial cost a second; a mesh hop is a few
/// milliseconds at most, and a guess too low only costs a spurious retransmission.
const INITIAL_RTT: Duration = Duration::from_millis(25);

/// Concurrent request streams per connection, as the HTTP/2 servers allow.
pub(crate) const MAX_STREAMS: u32 = 1024;

/// A connection with no traffic at all for this long is closed (keep-alives below keep a used
/// one open); the HTTP/2 hop's keep-alive gives up after 40 s of silence.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Client keep-alive: a PING when nothing else was sent for this long.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The in-memory HTTP/2 pipe's buffer each way.
pub(crate) const PIPE_BUFFER: usize = 256 * 1024;

/// UDP socket buffers asked of the kernel (it caps them at net.core.[rw]mem_max): a burst of
/// datagrams from 100 streams must not overflow a 208 KiB default.
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Flow-control windows as on the HTTP/2 hop: `STREAM_WINDOW` per stream; per connection the
/// receiving side's HTTP/2 window (requests into the server: 4 streams' worth, like the inbound
/// HTTP/2 server; responses into the client: 128, like the outbound HTTP/2 client).
fn transport(connection_streams: u32, keep_alive: bool) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(MAX_STREAMS.into());
    // HTTP/3's control and QPACK streams (three each way) and a little room.
    t.max_concurrent_uni_streams(8u32.into());
    t.stream_receive_window(STREAM_WINDOW.into());
    t.receive_window((connection_streams * STREAM_WINDOW).into());
    t.send_window(u64::from(128 * STREAM_WINDOW));
    t.initial_rtt(INITIAL_RTT);
    // No datagrams in HTTP/3 here: nothing to buffer for them (quinn would keep 1.25 MB).
    t.datagram_receive_buffer_size(None);
    t.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    t.keep_alive_interval(keep_alive.then_some(KEEP_ALIVE));
    Arc::new(t)
}

/// The inbound QUIC server configuration for one credential set: its TLS server config
/// (client certificates required and verified against the bundle) with ALPN h3.
pub(crate) fn server_config(loaded: &Loaded) -> Result<Arc<quinn::ServerConfig>, String> {
    let mut tls = (*loaded.server).clone();
    tls.alpn_protocols = vec![ALPN_H3.to_vec()];
    // No 0-RTT (see the module docs); rustls's default, stated because quinn would honour it.
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))
        .map_err(|e| format!("QUIC server configuration: {e}"))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(4, false));
    cfg.migration(false);
    Ok(Arc::new(cfg))
}

/// The outbound QUIC client configuration for a peer that must prove `peer`: the same rustls
/// configuration as TCP (cached per set and peer, so its session cache resumes), ALPN h3.
pub(crate) fn client_config(
    loaded: &Loaded,
    peer: &SpiffeId,
) -> Result<quinn::ClientConfig, String> {
    let tls = loaded
        .client_config(peer, ALPN_H3)
        .map_err(|e| e.to_string())?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| format!("QUIC client configuration: {e}"))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport(128, true));
    Ok(cfg)
}

/// A UDP socket bound to `addr` with larger buffers, for a quinn endpoint.
pub(crate) fn udp_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    use std::os::fd::AsRawFd;
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        let size = SOCKET_BUFFER as libc::c_int;
        // SAFETY: a valid socket descriptor, and a c_int option value of the right size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    Ok(socket)
}

/// H3_NO_ERROR (RFC 9114 §8.1), closing a connection that is done.
pub(crate) const NO_ERROR: quinn::VarInt = quinn::VarInt::from_u32(0x100);

/// The limit on a request or response head, as over HTTP/2.
pub(crate) const MAX_FIELD_SECTION: u64 = MAX_HEADER_BYTES as u64;
