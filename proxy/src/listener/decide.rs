//! What a listener does with a connection, decided from what detection saw: a pure function of
//! the side, the port, the mTLS mode and the first bytes, tested as a table without sockets.
//!
//! The rule behind every row: bytes that reach the app without passing the HTTP stack (and its
//! scrubbing of `x-remora-client-id`) are only ever bytes that cannot be HTTP to any lenient
//! server, or bytes on a port the operator declared opaque; and in strict mode nothing reaches
//! the app without mTLS, except HTTP/1.1 probes (GET/HEAD to the probe paths, no upgrade).

/// The inbound mTLS mode in force for this connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mtls {
    /// No identity, or `REMORA_MTLS=disabled`: TLS is never terminated.
    Off,
    Permissive,
    Strict,
}

/// What the client sent first, as the decision needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum First {
    Http1,
    Http2,
    /// Looks like HTTP/1 but fails the strict parse.
    Malformed,
    /// Provably not HTTP.
    NotHttp,
    /// Nothing within the detect timeout.
    Idle,
    /// A ClientHello this proxy terminates (no server name, or its own).
    TlsOurs,
    /// A ClientHello for another name (the app's own TLS), or any TLS when mTLS is off.
    TlsOther,
    /// A broken ClientHello, a partial request that stalled, or a close before any byte.
    Broken,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Strict mode: not mTLS.
    Plaintext,
    /// Strict mode: TLS for a name that is not this proxy's.
    ForeignTls,
    /// HTTP-like bytes that fail the strict parse: answered `400` and closed.
    Malformed,
    /// Outbound: not HTTP, so no destination can be named (use `CONNECT`).
    NoDestination,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Through the HTTP stack; `probe_only` lets only probe requests through.
    Http {
        probe_only: bool,
    },
    /// Terminate mTLS, then decide again on what is inside ([`inside_mtls`]).
    Terminate,
    /// Bytes to the app, untouched.
    Opaque,
    /// Connect to the app and see who speaks first: the app (a server-speaks-first protocol:
    /// opaque), or the client (its bytes are detected again, without a timeout to hide behind).
    AwaitSpeaker,
    Refuse(Refusal),
    /// Nothing to serve (broken or closed); the reason is logged where it was seen.
    Close,
}

/// An inbound connection on a port that is not declared opaque.
pub fn inbound(mtls: Mtls, first: First) -> Action {
    use Action::*;
    match (mtls, first) {
        (_, First::Broken) => Close,
        (_, First::Malformed) => Refuse(Refusal::Malformed),
        (_, First::TlsOurs) if mtls != Mtls::Off => Terminate,
        (Mtls::Strict, First::Http1) => Http { probe_only: true },
        (Mtls::Strict, First::TlsOther) => Refuse(Refusal::ForeignTls),
        (Mtls::Strict, _) => Refuse(Refusal::Plaintext),
        (_, First::Http1 | First::Http2) => Http { probe_only: false },
        (_, First::NotHttp | First::TlsOurs | First::TlsOther) => Opaque,
        (_, First::Idle) => AwaitSpeaker,
    }
}

/// An inbound connection on a port declared opaque (`REMORA_OPAQUE_PORTS`): no HTTP detection,
/// but mTLS all the same. `first` is what the client sent before the app spoke (or `Idle` when
/// the app spoke first); in strict mode the proxy waits for the client's ClientHello.
pub fn inbound_opaque_port(mtls: Mtls, first: First) -> Action {
    match (mtls, first) {
        (Mtls::Off, _) => Action::Opaque,
        (_, First::TlsOurs) => Action::Terminate,
        (Mtls::Strict, First::TlsOther) => Action::Refuse(Refusal::ForeignTls),
        (Mtls::Strict, First::Broken) => Action::Close,
        (Mtls::Strict, _) => Action::Refuse(Refusal::Plaintext),
        (Mtls::Permissive, _) => Action::Opaque,
    }
}

/// Inside a terminated mTLS session (the peer's identity is verified, so strict mode is
/// satisfied). `first` is what detection saw inside when ALPN did not name the protocol.
pub fn inside_mtls(opaque_port: bool, first: First) -> Action {
    use Action::*;
    if opaque_port {
        return Opaque;
    }
    match first {
        First::Http1 | First::Http2 => Http { probe_only: false },
        First::Malformed => Refuse(Refusal::Malformed),
        // TLS inside the tunnel is the peer app's own; it cannot be HTTP to the app.
        First::NotHttp | First::TlsOurs | First::TlsOther => Opaque,
        First::Idle => AwaitSpeaker,
        First::Broken => Close,
    }
}

/// The outbound listener: HTTP names its destination; nothing else can (opaque traffic comes
/// as `CONNECT`).
pub fn outbound(first: First) -> Action {
    match first {
        First::Http1 | First::Http2 => Action::Http { probe_only: false },
        First::Malformed => Action::Refuse(Refusal::Malformed),
        First::Broken => Action::Close,
        First::NotHttp | First::Idle | First::TlsOurs | First::TlsOther => {
            Action::Refuse(Refusal::NoDestination)
        }
    }
}

/// An outbound connection redirected by interception (it has an original destination): HTTP
/// goes through the HTTP stack, anything else is forwarded as bytes to where the app was
/// connecting (its own TLS, a server-speaks-first protocol, something that only resembles
/// HTTP: a meshed destination's inbound proxy detects those bytes again).
pub fn outbound_transparent(first: First) -> Action {
    match first {
        First::Http1 | First::Http2 => Action::Http { probe_only: false },
        First::Broken => Action::Close,
        First::Malformed | First::NotHttp | First::Idle | First::TlsOurs | First::TlsOther => {
            Action::Opaque
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Action::*;
    use super::First::*;
    use super::Mtls::*;
    use super::Refusal as R;
    use super::*;

    const ALL: [First; 8] = [
        Http1, Http2, Malformed, NotHttp, Idle, TlsOurs, TlsOther, Broken,
    ];

    #[test]
    fn inbound_table() {
        let h = Http { probe_only: false };
        let p = Http { probe_only: true };
        #[rustfmt::skip]
        let table: &[(First, [Action; 3])] = &[
            //             Off                        Permissive                 Strict
            (Http1,     [h,                          h,                          p]),
            (Http2,     [h,                          h,                          Refuse(R::Plaintext)]),
            (Malformed, [Refuse(R::Malformed),       Refuse(R::Malformed),       Refuse(R::Malformed)]),
            (NotHttp,   [Opaque,                     Opaque,                     Refuse(R::Plaintext)]),
            (Idle,      [AwaitSpeaker,               AwaitSpeaker,               Refuse(R::Plaintext)]),
            (TlsOurs,   [Opaque,                     Terminate,                  Terminate]),
            (TlsOther,  [Opaque,                     Opaque,                     Refuse(R::ForeignTls)]),
            (Broken,    [Close,                      Close,                      Close]),
        ];
        assert_eq!(table.len(), ALL.len());
        for (first, want) in table {
            for (mtls, want) in [Off, Permissive, Strict].into_iter().zip(want) {
                assert_eq!(inbound(mtls, *first), *want, "{mtls:?} {first:?}");
            }
        }
    }

    #[test]
    fn strict_never_passes_plaintext_but_probes() {
        for first in ALL {
            let a = inbound(Strict, first);
            assert!(
                matches!(a, Terminate | Refuse(_) | Close | Http { probe_only: true }),
                "{first:?} -> {a:?}"
            );
            let a = inbound_opaque_port(Strict, first);
            assert!(
                matches!(a, Terminate | Refuse(_) | Close),
                "{first:?} -> {a:?}"
            );
        }
    }

    #[test]
    fn http_like_bytes_never_go_opaque_on_a_detected_port() {
        for mtls in [Off, Permissive, Strict] {
            assert_ne!(inbound(mtls, Malformed), Opaque);
            assert_ne!(inbound(mtls, Idle), Opaque);
        }
        assert_ne!(inside_mtls(false, Malformed), Opaque);
        assert_ne!(inside_mtls(false, Idle), Opaque);
    }

    #[test]
    fn opaque_port_table() {
        for first in ALL {
            assert_eq!(inbound_opaque_port(Off, first), Opaque);
        }
        assert_eq!(inbound_opaque_port(Permissive, TlsOurs), Terminate);
        assert_eq!(inbound_opaque_port(Permissive, NotHttp), Opaque);
        assert_eq!(inbound_opaque_port(Permissive, Idle), Opaque);
        assert_eq!(inbound_opaque_port(Strict, TlsOurs), Terminate);
        assert_eq!(inbound_opaque_port(Strict, Http1), Refuse(R::Plaintext));
        assert_eq!(inbound_opaque_port(Strict, Idle), Refuse(R::Plaintext));
        assert_eq!(inbound_opaque_port(Strict, TlsOther), Refuse(R::ForeignTls));
    }

    #[test]
    fn inside_mtls_table() {
        for first in ALL {
            assert_eq!(inside_mtls(true, first), Opaque);
        }
        assert_eq!(inside_mtls(false, Http1), Http { probe_only: false });
        assert_eq!(inside_mtls(false, Http2), Http { probe_only: false });
        assert_eq!(inside_mtls(false, Malformed), Refuse(R::Malformed));
        assert_eq!(inside_mtls(false, NotHttp), Opaque);
        assert_eq!(inside_mtls(false, Idle), AwaitSpeaker);
        assert_eq!(inside_mtls(false, Broken), Close);
    }

    #[test]
    fn outbound_table() {
        assert_eq!(outbound(Http1), Http { probe_only: false });
        assert_eq!(outbound(Http2), Http { probe_only: false });
        assert_eq!(outbound(Malformed), Refuse(R::Malformed));
        for f in [NotHttp, Idle, TlsOurs, TlsOther] {
            assert_eq!(outbound(f), Refuse(R::NoDestination));
        }
    }

    #[test]
    fn outbound_transparent_table() {
        // Intercepted: HTTP is served, everything else goes as bytes to the original
        // destination (whose inbound proxy, if any, detects again), nothing is refused.
        assert_eq!(outbound_transparent(Http1), Http { probe_only: false });
        assert_eq!(outbound_transparent(Http2), Http { probe_only: false });
        for f in [NotHttp, Idle, TlsOurs, TlsOther, Malformed] {
            assert_eq!(outbound_transparent(f), Opaque);
        }
        assert_eq!(outbound_transparent(Broken), Close);
    }
}
