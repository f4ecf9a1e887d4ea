//! One endpoint of a service, as static destinations (proxy), the control plane's sources and
//! its Discovery stream all describe it. It lives here, beside [`SpiffeId`], so the control
//! plane can use it without depending on the proxy.

use std::net::SocketAddr;

use crate::identity::SpiffeId;

/// Largest accepted weight; keeps cost arithmetic well away from overflow.
pub const MAX_WEIGHT: u32 = 10_000;

/// An endpoint: its address, its weight (relative share of traffic, default 1), the identity
/// it must prove when it is a peer proxy (then the proxy speaks mTLS to it), and whether its
/// port carries an opaque (non-HTTP or server-speaks-first) protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub addr: SocketAddr,
    pub weight: u32,
    pub identity: Option<SpiffeId>,
    /// No protocol detection on this port: its peer proxy is told so in the mTLS handshake
    /// (ALPN), so a server-speaks-first protocol (MySQL, NATS) does not wait for detection.
    pub opaque: bool,
}

impl EndpointSpec {
    /// An endpoint of weight 1 without identity (plaintext).
    ///
    /// ```
    /// let e = remora_certs::EndpointSpec::new("10.0.0.1:8080".parse().unwrap());
    /// assert_eq!((e.weight, e.identity), (1, None));
    /// ```
    pub fn new(addr: SocketAddr) -> Self {
        EndpointSpec {
            addr,
            weight: 1,
            identity: None,
            opaque: false,
        }
    }
}
