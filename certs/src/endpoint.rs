//! One endpoint of a service, as static destinations (proxy), the control plane's sources and
//! its Discovery stream all describe it. It lives here, beside [`SpiffeId`], so the control
//! plane can use it without depending on the proxy.

use std::net::SocketAddr;

use crate::identity::SpiffeId;

/// Largest accepted weight; keeps cost arithmetic well away from overflow.
pub const MAX_WEIGHT: u32 = 10_000;

/// An endpoint: its address, its weight (relative share of traffic, default 1), the identity
/// it must prove when it is a peer proxy (then the proxy speaks mTLS to it), whether its
/// port carries an opaque (non-HTTP or server-speaks-first) protocol, and the UDP port where
/// its proxy also serves HTTP/3.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub addr: SocketAddr,
    pub weight: u32,
    pub identity: Option<SpiffeId>,
    /// No protocol detection on this port: its peer proxy is told so in the mTLS handshake
    /// (ALPN), so a server-speaks-first protocol (MySQL, NATS) does not wait for detection.
    pub opaque: bool,
    /// The UDP port where the endpoint's proxy serves HTTP/3 with mTLS; `None`: not
    /// advertised, TCP only.
    pub quic: Option<u16>,
    /// Where it runs, for callers that prefer their own zone.
    pub locality: Locality,
}

/// An endpoint's zone, and the zones it serves when the source assigns it (Kubernetes
/// topology hints). Zone names are bounded like DNS labels by every source that sets them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Locality {
    /// Its own zone; `None`: unknown (never local to anyone).
    pub zone: Option<String>,
    /// The zones whose callers should use it (EndpointSlice `hints.forZones`); when not empty
    /// this, not `zone`, decides. Kubernetes may assign an endpoint to a neighbouring zone to
    /// even out zones of unequal size, and callers follow that assignment, as kube-proxy does.
    pub for_zones: Vec<String>,
}

impl Locality {
    /// An endpoint in `zone`, without hints.
    pub fn zone(zone: &str) -> Self {
        Locality {
            zone: Some(zone.to_string()),
            for_zones: Vec::new(),
        }
    }

    /// Whether a caller in `zone` should count this endpoint as its own zone's.
    ///
    /// ```
    /// use remora_certs::Locality;
    /// assert!(Locality::zone("a").is_local_to("a"));
    /// assert!(!Locality::zone("a").is_local_to("b"));
    /// let hinted = Locality { zone: Some("a".into()), for_zones: vec!["b".into()] };
    /// assert!(hinted.is_local_to("b") && !hinted.is_local_to("a"));
    /// assert!(!Locality::default().is_local_to("a"));
    /// ```
    pub fn is_local_to(&self, zone: &str) -> bool {
        if self.for_zones.is_empty() {
            self.zone.as_deref() == Some(zone)
        } else {
            self.for_zones.iter().any(|z| z == zone)
        }
    }

    /// Whether a source said anything about it.
    pub fn is_known(&self) -> bool {
        self.zone.is_some() || !self.for_zones.is_empty()
    }
}

/// Whether `s` is acceptable as a zone name: what Kubernetes allows in a label value (at most
/// 63 characters of `[A-Za-z0-9._-]`), non-empty.
pub fn is_zone_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
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
            quic: None,
            locality: Locality::default(),
        }
    }
}
