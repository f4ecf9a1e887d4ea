//! Connections to one upstream address: a multiplexed HTTP/2 connection, a keep-alive pool of
//! HTTP/1.1 connections, and plain TCP for opaque traffic and tunnels.

pub(crate) mod load;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
// tokio's clock: latency samples, backoff and the shared-connect-failure window all feed
// decisions, and tests pause and advance it.
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::endpoint::load::PeakEwma;
use crate::identity::IdentityStore;
use crate::io::UpstreamIo;
use crate::metrics::{Direction, EndpointMetrics, Metrics, TlsResult, Transport};
use crate::quic::client::QuicClient;
use crate::retry::replay::{UpstreamBody, never_processed};
use remora_certs::SpiffeId;

/// When a request was handed to a connection (set again if it is resent). Every send path sets
/// it before handing the request over, so it reads the clock only then: one clock read fewer per
/// request than stamping at creation too (each is a `clock_gettime`, ~1 % of the CPU at 1,000
/// rps on a VM). A request never handed over has no latency sample.
pub struct Stamp {
    /// Nanoseconds after [`epoch`], plus one; 0 while unset.
    at_ns: std::sync::atomic::AtomicU64,
}

/// The instant [`Stamp`]s count from (the first use).
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Stamp {
    fn new() -> Self {
        Stamp {
            at_ns: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn set(&self) {
        let ns = epoch().elapsed().as_nanos() as u64;
        self.at_ns
            .store(ns.saturating_add(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Time from the last [`set`](Self::set) to `now`; `None` if it never ran.
    fn until(&self, now: Instant) -> Option<Duration> {
        match self.at_ns.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            at => Some(
                now.saturating_duration_since(epoch())
                    .saturating_sub(Duration::from_nanos(at - 1)),
            ),
        }
    }
}

/// How long a failing endpoint is skipped: a ceiling doubling from 100 ms to 10 s with equal
/// jitter ([`Backoff::with_floor`]: the delay is also what failfast judges, so it keeps half).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Failure state: the backoff (how many connects failed in a row), and when to try again.
struct Health {
    backoff: Backoff,
    retry_at: Instant,
    last_error: String,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            backoff: Backoff::with_floor(BACKOFF_MIN, BACKOFF_MAX),
            retry_at: Instant::now(),
            last_error: String::new(),
        }
    }
}

/// How long an endpoint whose QUIC handshake went unanswered is reached over TCP only before
/// QUIC is tried again: doubling from 10 s to 5 min while it keeps failing.
const QUIC_RETRY_MIN: Duration = Duration::from_secs(10);
const QUIC_RETRY_MAX: Duration = Duration::from_secs(300);

/// What trying QUIC gave.
enum Quic {
    Connected(tokio::io::DuplexStream),
    /// Not wanted (policy, no identity) or backing off after a fallback: TCP.
    NotTried,
    /// The handshake went unanswered: TCP, and a fallback if TCP works.
    Unanswered(String),
}

struct QuicFallback {
    backoff: Backoff,
    tcp_until: Option<Instant>,
}

impl Default for QuicFallback {
    fn default() -> Self {
        QuicFallback {
            backoff: Backoff::with_floor(QUIC_RETRY_MIN, QUIC_RETRY_MAX),
            tcp_until: None,
        }
    }
}

/// Idle HTTP/1.1 connections kept per endpoint; more can be open, extras close when done.
const MAX_H1_POOL: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("{proto} handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        proto: &'static str,
        source: hyper::Error,
    },
    #[error("mTLS to {addr} (expecting {id}) failed: {reason}")]
    Tls {
        addr: SocketAddr,
        id: String,
        reason: String,
    },
    #[error("{addr} closed the connection twice before the request could be written")]
    Closed { addr: SocketAddr },
    #[error("{addr} failed the request: {}", chain(source))]
    Request {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

/// hyper's errors say "http2 error"; the cause underneath says which one.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

impl EndpointError {
    /// True when the request certainly never reached the upstream application.
    /// The request failed because the *client's* body broke (bad chunk framing, a reset
    /// upload): the client's error, not the endpoint's.
    pub fn is_client_body(&self) -> bool {
        let EndpointError::Request { source, .. } = self else {
            return false;
        };
        if !source.is_user() {
            return false;
        }
        let mut cur = std::error::Error::source(source);
        while let Some(err) = cur {
            if err.downcast_ref::<hyper::Error>().is_some() {
                return true;
            }
            cur = err.source();
        }
        false
    }

    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            EndpointError::Connect { .. }
                | EndpointError::ConnectTimeout { .. }
                | EndpointError::Handshake { .. }
                | EndpointError::Tls { .. }
        )
    }
}

/// How an HTTP/2 attempt failed: handed back unsent, or failed after it was written.
enum Attempt {
    /// Boxed: rare, and the attempt's future holds its output's size.
    Unsent(Box<Request<UpstreamBody>>),
    Failed(hyper::Error),
}

/// A failed send; `unsent` holds the request when it never left the proxy.
pub struct SendError {
    pub error: EndpointError,
    pub unsent: Option<Request<UpstreamBody>>,
}

/// mTLS to an endpoint that is a peer proxy: the identity it must prove, and ours.
pub struct EndpointTls {
    pub id: SpiffeId,
    /// `id` as text, made once: the per-route `peer_identity` label of every response.
    pub label: Arc<str>,
    pub store: Arc<IdentityStore>,
    pub metrics: Arc<Metrics>,
    /// Set when the mesh transport policy may use QUIC.
    pub quic: Option<Arc<QuicClient>>,
}

pub struct Endpoint {
    pub addr: SocketAddr,
    /// A Unix domain socket reached instead of `addr` (the local app only).
    unix: Option<std::path::PathBuf>,
    pub tls: Option<EndpointTls>,
    pub weight: u32,
    /// The port carries an opaque protocol (discovery said so): tunnels to it over mTLS
    /// offer [`crate::tls::ALPN_OPAQUE`] so the peer proxy skips detection.
    pub opaque: bool,
    /// The UDP port where the endpoint's proxy serves HTTP/3 over QUIC (mTLS), when it says
    /// so (discovery's `quic` attribute); used per `REMORA_MESH_TRANSPORT`.
    pub quic: Option<u16>,
    /// Its zone and topology hints, for callers preferring their own zone.
    pub locality: remora_certs::Locality,
    pub load: PeakEwma,
    health: Mutex<Health>,
    /// Failure accrual: answers that failed in a row (5xx, gRPC UNAVAILABLE).
    failed_in_a_row: std::sync::atomic::AtomicU32,
    metrics: Option<EndpointMetrics>,
    connect_timeout: Duration,
    h2: Mutex<Option<http2::SendRequest<UpstreamBody>>>,
    // Serialises HTTP/2 connects so a burst of requests shares one new connection.
    h2_connect: tokio::sync::Mutex<()>,
    h2_failed: Mutex<Option<(Instant, std::io::ErrorKind, String)>>,
    h1: Mutex<Vec<http1::SendRequest<UpstreamBody>>>,
    /// After a QUIC handshake went unanswered: TCP until then, QUIC again after.
    quic_fallback: Mutex<QuicFallback>,
    /// The endpoint answered the HTTP/2 preface in HTTP/1: HTTP/2 requests are sent to it
    /// translated to HTTP/1.1 (an app that only speaks HTTP/1, as Linkerd also handles).
    h1_only: Arc<H1Only>,
}

/// Whether the endpoint answered the HTTP/2 preface in HTTP/1, and a wake-up for requests
/// waiting on a connection's verdict (see [`Endpoint::fall_back_to_h1`]).
#[derive(Default)]
struct H1Only {
    flag: std::sync::atomic::AtomicBool,
    /// Signalled whenever an HTTP/2 connection ends, its verdict stored first.
    ended: tokio::sync::Notify,
    /// The endpoint has answered a request over HTTP/2: it speaks it.
    speaks_h2: std::sync::atomic::AtomicBool,
    /// Until then, HTTP/2 requests go one at a time (each for at most [`FIRST_CONTACT`]). An
    /// HTTP/1 app answers the preface and closes; with many streams queued behind it the
    /// writes break the pipe before hyper reads that answer, no request learns why, and all
    /// of them failed (CI: 7 of 200 first-contact streams through interception got 502). A
    /// lone request reads the answer and falls back to HTTP/1.1 for everyone.
    first: tokio::sync::Mutex<()>,
}

/// How long a request waits for the one ahead of it to tell whether an endpoint speaks
/// HTTP/2; an app's answer to the preface takes a round trip, a slow first request must not
/// hold the others.
const FIRST_CONTACT: Duration = Duration::from_millis(100);

impl H1Only {
    fn load(&self, o: std::sync::atomic::Ordering) -> bool {
        self.flag.load(o)
    }

    fn swap(&self, v: bool, o: std::sync::atomic::Ordering) -> bool {
        self.flag.swap(v, o)
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Endpoint {
    pub fn new(
        addr: SocketAddr,
        weight: u32,
        connect_timeout: Duration,
        metrics: Option<EndpointMetrics>,
    ) -> Self {
        Endpoint {
            addr,
            unix: None,
            tls: None,
            opaque: false,
            quic: None,
            locality: Default::default(),
            weight: weight.max(1),
            load: PeakEwma::default(),
            health: Mutex::new(Health::default()),
            failed_in_a_row: std::sync::atomic::AtomicU32::new(0),
            metrics,
            connect_timeout,
            h2: Mutex::new(None),
            h2_connect: tokio::sync::Mutex::new(()),
            h2_failed: Mutex::new(None),
            h1: Mutex::new(Vec::new()),
            quic_fallback: Mutex::new(QuicFallback::default()),
            h1_only: Default::default(),
        }
    }

    /// Opens a connection: TCP, then mTLS when the endpoint has an identity (a peer proxy).
    /// `alpn` picks the protocol inside TLS; `None` for a byte tunnel.
    pub async fn connect(&self, alpn: Option<&[u8]>) -> Result<UpstreamIo, EndpointError> {
        if let Some(path) = &self.unix {
            return self.connect_unix(path).await;
        }
        let tcp = self.connect_tcp().await?;
        let Some(tls) = &self.tls else {
            return Ok(UpstreamIo::Plain(crate::io::Stream::Tcp(tcp)));
        };
        let res = self.handshake(tls, tcp, alpn).await;
        match &res {
            Ok(_) => {
                tls.metrics.tls(Direction::Outbound, TlsResult::Established);
                tls.metrics
                    .mesh_connection(Direction::Outbound, Transport::Tcp);
            }
            Err(e) => {
                tls.metrics.tls(Direction::Outbound, TlsResult::Failed);
                self.mark_down(e);
            }
        }
        res
    }

    /// A TLS failure toward this endpoint: its address, the identity expected, the reason.
    fn tls_error(&self, tls: &EndpointTls, reason: String) -> EndpointError {
        EndpointError::Tls {
            addr: self.addr,
            id: tls.id.to_string(),
            reason,
        }
    }

    /// This proxy's current credentials, for a handshake with a peer (TCP or QUIC).
    fn credentials(
        &self,
        tls: &EndpointTls,
    ) -> Result<Arc<crate::identity::Loaded>, EndpointError> {
        tls.store.current().ok_or_else(|| {
            self.tls_error(
                tls,
                "this proxy has no identity yet (REMORA_IDENTITY_DIR)".into(),
            )
        })
    }

    async fn handshake(
        &self,
        tls: &EndpointTls,
        tcp: TcpStream,
        alpn: Option<&[u8]>,
    ) -> Result<UpstreamIo, EndpointError> {
        let fail = |reason: String| self.tls_error(tls, reason);
        let loaded = self.credentials(tls)?;
        // Built once per credential set, peer and ALPN, so its session cache lets the next
        // connection to this peer resume instead of running a full handshake.
        let cfg = loaded
            .client_config(&tls.id, alpn.unwrap_or(b""))
            .map_err(|e| fail(e.to_string()))?;
        let name = crate::tls::server_name(&tls.id).map_err(fail)?;
        let connector = tokio_rustls::TlsConnector::from(cfg);
        match tokio::time::timeout(
            self.connect_timeout,
            connector.connect(name, crate::io::Stream::Tcp(tcp)),
        )
        .await
        {
            Ok(Ok(s)) => Ok(UpstreamIo::Tls(Box::new(s))),
            Ok(Err(e)) => Err(fail(e.to_string())),
            Err(_) => Err(fail(format!(
                "handshake timed out after {:?}",
                self.connect_timeout
            ))),
        }
    }

    /// The local app on a Unix domain socket (`REMORA_APP_ADDR=unix:PATH`): never TLS.
    async fn connect_unix(&self, path: &std::path::Path) -> Result<UpstreamIo, EndpointError> {
        let res =
            match tokio::time::timeout(self.connect_timeout, tokio::net::UnixStream::connect(path))
                .await
            {
                Err(_) => Err(EndpointError::ConnectTimeout {
                    addr: self.addr,
                    timeout: self.connect_timeout,
                }),
                Ok(Err(source)) => Err(EndpointError::Connect {
                    addr: self.addr,
                    source: std::io::Error::new(
                        source.kind(),
                        format!("unix socket {}: {source}", path.display()),
                    ),
                }),
                Ok(Ok(s)) => Ok(UpstreamIo::Plain(crate::io::Stream::Unix(s))),
            };
        match &res {
            Ok(_) => self.mark_up(),
            Err(e) => self.mark_down(e),
        }
        res
    }

    async fn connect_tcp(&self) -> Result<TcpStream, EndpointError> {
        let addr = self.addr;
        let res = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => Err(EndpointError::ConnectTimeout {
                addr,
                timeout: self.connect_timeout,
            }),
            Ok(Err(source)) => Err(EndpointError::Connect { addr, source }),
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                Ok(tcp)
            }
        };
        match &res {
            Ok(_) => self.mark_up(),
            Err(e) => self.mark_down(e),
        }
        res
    }

    /// Connects with mTLS, expecting the peer to prove `tls.id`.
    pub fn with_tls(mut self, tls: Option<EndpointTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Reaches the endpoint on the Unix domain socket at `path` instead of `addr` (which
    /// then only names it in logs and metrics).
    pub fn with_unix(mut self, path: Option<std::path::PathBuf>) -> Self {
        self.unix = path;
        self
    }

    pub fn is_unix(&self) -> bool {
        self.unix.is_some()
    }

    pub fn with_opaque(mut self, opaque: bool) -> Self {
        self.opaque = opaque;
        self
    }

    /// The endpoint's proxy serves HTTP/3 on this UDP port (`None`: not advertised).
    pub fn with_quic(mut self, port: Option<u16>) -> Self {
        self.quic = port;
        self
    }

    pub fn with_locality(mut self, locality: remora_certs::Locality) -> Self {
        self.locality = locality;
        self
    }

    /// Not backing off after a failure.
    pub fn is_ready(&self, now: Instant) -> bool {
        self.retry_at() <= now
    }

    /// When the endpoint may be tried again (in the past when it is healthy).
    pub fn retry_at(&self) -> Instant {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retry_at
    }

    pub fn last_error(&self) -> String {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error
            .clone()
    }

    fn mark_up(&self) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.backoff.attempts() > 0 {
            tracing::info!(addr = %self.addr, "endpoint reachable again");
            h.backoff.reset();
            if let Some(m) = &self.metrics {
                m.ready.set(1);
            }
        }
    }

    /// Tests: readiness flipping under a picker, as a failing backend makes it.
    #[cfg(test)]
    pub(crate) fn set_ready_for_test(&self, ready: bool) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.retry_at = if ready {
            let now = Instant::now();
            now.checked_sub(Duration::from_secs(1)).unwrap_or(now)
        } else {
            Instant::now() + Duration::from_secs(3600)
        };
    }

    /// Tests: an endpoint that failed and may be retried in `d`.
    #[cfg(test)]
    pub(crate) fn set_retry_in_for_test(&self, d: Duration) {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retry_at = Instant::now() + d;
    }

    /// Backs off exponentially ([`BACKOFF_MIN`] to [`BACKOFF_MAX`], jittered so proxies whose
    /// endpoint failed for all of them at once do not all come back at once); P2C skips the
    /// endpoint meanwhile.
    fn mark_down(&self, e: &EndpointError) {
        self.back_off(e.to_string(), true);
    }

    fn back_off(&self, why: String, count_failure: bool) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let delay = h.backoff.next_delay();
        h.retry_at = Instant::now() + delay;
        if let Some(m) = &self.metrics {
            m.ready.set(0);
            if count_failure {
                m.failures.inc();
            }
        }
        tracing::info!(addr = %self.addr, error = %why, retry_in = ?delay, "endpoint failing; backing off");
        h.last_error = why;
    }

    /// Failure accrual: records whether an answer failed; returns how many failed in a row.
    /// An answer that did not fail after failures marks the endpoint up again.
    pub(crate) fn answered(&self, failed: bool) -> u32 {
        use std::sync::atomic::Ordering::Relaxed;
        if failed {
            return self.failed_in_a_row.fetch_add(1, Relaxed).saturating_add(1);
        }
        // A load, not a store, on the common path: no cache-line write per request.
        if self.failed_in_a_row.load(Relaxed) > 0 && self.failed_in_a_row.swap(0, Relaxed) > 0 {
            self.mark_up();
        }
        0
    }

    /// Failure accrual: takes the endpoint out of balancing for a backoff (growing while it
    /// keeps failing), after which P2C probes it; one more failed answer ejects it again.
    pub(crate) fn eject(&self, in_a_row: u32, threshold: u32, status: http::StatusCode) {
        self.failed_in_a_row.store(
            threshold.saturating_sub(1),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.back_off(
            format!("{in_a_row} answers in a row failed (the last: {status}); ejected by failure accrual (remora.io/failure-accrual: {threshold})"),
            false,
        );
    }

    /// Opens the HTTP/2 connection before a request needs it.
    pub fn prewarm_h2(self: Arc<Self>) {
        tokio::spawn(async move {
            if let Err(e) = self.h2_sender().await {
                tracing::debug!(addr = %self.addr, error = %e, "could not pre-connect");
            }
        });
    }

    /// Sends a request over HTTP/2 (for HTTP/2 requests) or HTTP/1.1 (otherwise). The request
    /// must already have the URI form its protocol needs (absolute for h2, origin for h1).
    /// When no connection could be made the request is handed back, unsent, for another endpoint.
    ///
    /// A function returning an `async move` block rather than an `async fn`, here and on the
    /// rest of the request path: an `async fn` moves each argument into a local of its own,
    /// and a local that was borrowed (`req.version()`) keeps its place in the future across
    /// every await — a second copy of the request (300 bytes) per level, in every request's
    /// future, for as long as the request is in flight. A captured argument is stored once.
    ///
    /// The request comes boxed, and goes on boxed to `send_h2`: each level keeps its argument
    /// for as long as the request is out (an async block's captures are not reused once moved
    /// from), 8 bytes each instead of 296.
    #[allow(clippy::manual_async_fn)] // on purpose: see `Endpoint::send`
    pub fn send(
        &self,
        req: Box<Request<UpstreamBody>>,
    ) -> impl Future<Output = Result<Response<Incoming>, SendError>> + Send + '_ {
        async move {
            // The latency sample starts when the request is handed to a connection, so connecting
            // (a cold endpoint's first request) does not count as the endpoint being slow.
            let dispatched = Stamp::new();
            self.load.start();
            if let Some(m) = &self.metrics {
                m.requests.inc();
                m.in_flight.inc();
            }
            // Taken off the load however the send ends: a caller that gives up (a gRPC deadline,
            // a client gone) drops this future mid-way, and the endpoint must not stay "busy"
            // for ever (found by the fault tests).
            let mut pending = Pending {
                ep: self,
                done: false,
            };
            let res = if req.version() == http::Version::HTTP_2 {
                if self.h1_only.load(std::sync::atomic::Ordering::Relaxed) {
                    self.send_h1(to_http1(req), &dispatched).await
                } else {
                    self.send_h2(req, &dispatched).await
                }
            } else {
                self.send_h1(req, &dispatched).await
            };
            pending.done = true;
            // `finish` gives the new estimate: asking `rtt()` again would read the clock and
            // decay it for the nanoseconds since.
            let now = Instant::now();
            let rtt = match (&res, dispatched.until(now)) {
                (Ok(_), Some(took)) => Some(self.load.finish_at(took, now)),
                _ => {
                    self.load.abandon();
                    None
                }
            };
            if let Some(m) = &self.metrics {
                m.in_flight.dec();
                m.latency
                    .set(rtt.unwrap_or_else(|| self.load.rtt()).as_secs_f64());
                if matches!(&res, Err(e) if !e.error.is_connect() && !e.error.is_client_body()) {
                    m.failures.inc();
                }
            }
            res
        }
    }

    #[allow(clippy::manual_async_fn)] // on purpose: see `Endpoint::send`
    fn send_h2(
        &self,
        req: Box<Request<UpstreamBody>>,
        dispatched: &Stamp,
    ) -> impl Future<Output = Result<Response<Incoming>, SendError>> + Send {
        async move {
            use std::sync::atomic::Ordering::Acquire;
            let mut _first = None;
            if !self.h1_only.speaks_h2.load(Acquire) {
                if let Ok(guard) =
                    tokio::time::timeout(FIRST_CONTACT, self.h1_only.first.lock()).await
                    && !self.h1_only.speaks_h2.load(Acquire)
                {
                    _first = Some(guard);
                }
                if self.h1_only.load(Acquire) {
                    return Box::pin(self.send_h1(to_http1(req), dispatched)).await;
                }
            }
            // The cached connection synchronously; connecting (a large future) only when needed.
            let sender = match self.cached_h2() {
                Some(s) => s,
                None => match Box::pin(self.h2_sender()).await {
                    Ok(s) => s,
                    Err(error) => {
                        return Err(SendError {
                            error,
                            unsent: Some(unbox(req)),
                        });
                    }
                },
            };
            // Keep what a resend needs: the head, and a recording of the body. In a block of its
            // own, so that the head's parts are not kept in the future while the request is out.
            let (req, head, replay) = {
                let (parts, body) = unbox(req).into_parts();
                let (body, replay) = body.recording();
                let head = (
                    parts.method.clone(),
                    parts.uri.clone(),
                    parts.version,
                    parts.headers.clone(),
                );
                (Request::from_parts(parts, body), head, replay)
            };
            let failed = match self.h2_attempt(sender, req, dispatched).await {
                Ok(rsp) => {
                    self.h1_only
                        .speaks_h2
                        .store(true, std::sync::atomic::Ordering::Release);
                    return Ok(rsp);
                }
                Err(failed) => failed,
            };
            // Boxed: what a failure needs is not carried by every request's future.
            Box::pin(self.h2_failed(failed, replay, head, dispatched)).await
        }
    }

    /// What follows an HTTP/2 attempt that failed: the same request again when it provably
    /// never reached the application, or over HTTP/1.1 when the endpoint does not speak
    /// HTTP/2; otherwise the error.
    async fn h2_failed(
        &self,
        failed: Attempt,
        replay: crate::retry::replay::Replay,
        head: RequestHead,
        dispatched: &Stamp,
    ) -> Result<Response<Incoming>, SendError> {
        let error = match failed {
            Attempt::Unsent(req) => {
                // Handed back before it was written: resend as is.
                return Box::pin(self.h2_retry(*req, dispatched)).await;
            }
            Attempt::Failed(e) => e,
        };
        // Refused, or cut by a graceful GOAWAY: the server never processed it (RFC 9113 §8.7).
        if never_processed(&error)
            && let Some(body) = Box::pin(replay.body()).await
        {
            tracing::debug!(addr = %self.addr, error = %error, "upstream refused the stream; resending");
            return Box::pin(self.h2_retry(rebuild(head, body), dispatched)).await;
        }
        match Box::pin(self.fall_back_to_h1(&error, replay, head, dispatched)).await {
            Some(res) => res,
            None => Err(self.request_error(error)),
        }
    }

    /// The endpoint answered the preface in HTTP/1 (it never saw a request): from now on it
    /// gets HTTP/1.1, this request first. Requests that were queued on the same doomed
    /// connection fail with a broken pipe instead, once another request has found out: they
    /// were never processed either (no HTTP/2 server was there), so they follow it. `None`:
    /// not that case, or the body cannot be replayed.
    async fn fall_back_to_h1(
        &self,
        error: &hyper::Error,
        replay: crate::retry::replay::Replay,
        head: RequestHead,
        dispatched: &Stamp,
    ) -> Option<Result<Response<Incoming>, SendError>> {
        use std::sync::atomic::Ordering::{Acquire, Relaxed};
        let local = !remote_h2_error(error);
        let mut doomed = local && self.h1_only.load(Relaxed);
        if local && !doomed && !answered_in_http1(error) {
            // A broken pipe can reach this request before the connection's reader has seen
            // the HTTP/1 answer: wait for the connection's verdict, briefly.
            let ended = self.h1_only.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if !self.h1_only.load(Acquire) {
                let _ = tokio::time::timeout(Duration::from_millis(200), ended).await;
            }
            doomed = self.h1_only.load(Acquire);
        }
        if !(doomed || answered_in_http1(error)) {
            return None;
        }
        let body = Box::pin(replay.body()).await?;
        if !self
            .h1_only
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!(addr = %self.addr, "endpoint does not speak HTTP/2; translating HTTP/2 requests to HTTP/1.1 for it");
        }
        self.forget_h2();
        Some(Box::pin(self.send_h1(to_http1(Box::new(rebuild(head, body))), dispatched)).await)
    }

    /// The request goes to the connection when the future is first polled (hyper's direct
    /// sender, `handshake_direct`); the future then waits for the answer, and does not keep a
    /// copy of the request.
    fn h2_attempt(
        &self,
        mut sender: http2::SendRequest<UpstreamBody>,
        req: Request<UpstreamBody>,
        dispatched: &Stamp,
    ) -> impl Future<Output = Result<Response<Incoming>, Attempt>> + Send + use<> {
        dispatched.set();
        // A mapped future, not an `async move` block: a block would keep `sent` twice (the
        // captured value, and the copy it awaits).
        futures_util::FutureExt::map(sender.try_send_request(req), |sent| match sent {
            Ok(rsp) => Ok(rsp),
            Err(mut e) => match e.take_message() {
                Some(req) => Err(Attempt::Unsent(Box::new(req))),
                None => Err(Attempt::Failed(e.into_error())),
            },
        })
    }

    /// One more try on a fresh connection (the cached one is closed or going away).
    async fn h2_retry(
        &self,
        req: Request<UpstreamBody>,
        dispatched: &Stamp,
    ) -> Result<Response<Incoming>, SendError> {
        self.forget_h2();
        if self.h1_only.load(std::sync::atomic::Ordering::Relaxed) {
            return Box::pin(self.send_h1(to_http1(Box::new(req)), dispatched)).await;
        }
        let sender = match self.h2_sender().await {
            Ok(s) => s,
            Err(error) => {
                return Err(SendError {
                    error,
                    unsent: Some(req),
                });
            }
        };
        let (parts, body) = req.into_parts();
        let (body, replay) = body.recording();
        let head = (
            parts.method.clone(),
            parts.uri.clone(),
            parts.version,
            parts.headers.clone(),
        );
        match self
            .h2_attempt(sender, Request::from_parts(parts, body), dispatched)
            .await
        {
            Ok(rsp) => Ok(rsp),
            Err(Attempt::Failed(e)) => {
                match Box::pin(self.fall_back_to_h1(&e, replay, head, dispatched)).await {
                    Some(res) => res,
                    None => Err(self.request_error(e)),
                }
            }
            Err(Attempt::Unsent(req)) => Err(SendError {
                error: EndpointError::Closed { addr: self.addr },
                unsent: Some(*req),
            }),
        }
    }

    fn cached_h2(&self) -> Option<http2::SendRequest<UpstreamBody>> {
        let guard = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    /// Drops the cached connection only if it is closed: another request may already have
    /// replaced the one that failed with a healthy one.
    fn forget_h2(&self) {
        let mut guard = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_some_and(|s| s.is_closed()) {
            *guard = None;
        }
    }

    async fn h2_sender(&self) -> Result<http2::SendRequest<UpstreamBody>, EndpointError> {
        if let Some(s) = self.cached_h2() {
            return Ok(s);
        }
        let waiting_since = Instant::now();
        let _connecting = self.h2_connect.lock().await;
        if let Some(s) = self.cached_h2() {
            return Ok(s);
        }
        // A connect that failed while we queued for the lock answers for us too: requests to a
        // dead endpoint fail together instead of each waiting out its own connect timeout.
        if let Some((at, kind, msg)) = &*self.h2_failed.lock().unwrap_or_else(|p| p.into_inner())
            && *at >= waiting_since
        {
            return Err(EndpointError::Connect {
                addr: self.addr,
                source: std::io::Error::new(*kind, msg.clone()),
            });
        }
        let quic_unanswered = match self.connect_quic().await? {
            Quic::Connected(io) => return self.start_h2(io).await,
            Quic::NotTried => None,
            Quic::Unanswered(why) => Some(why),
        };
        let tcp = match self.connect(Some(crate::tls::ALPN_H2)).await {
            Ok(t) => {
                if let Some(why) = quic_unanswered {
                    self.quic_fell_back(&why);
                }
                t
            }
            Err(e) => {
                let (kind, msg) = match &e {
                    EndpointError::Connect { source, .. } => (source.kind(), source.to_string()),
                    other => (std::io::ErrorKind::TimedOut, other.to_string()),
                };
                *self.h2_failed.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((Instant::now(), kind, msg));
                return Err(e);
            }
        };
        self.start_h2(tcp).await
    }

    /// A QUIC connection to the endpoint's proxy, carrying this HTTP/2 connection, when the
    /// transport policy says to try one (and no recent fallback says not to). A handshake the
    /// peer answered and failed is an error, as it would be over TCP: no fallback.
    async fn connect_quic(&self) -> Result<Quic, EndpointError> {
        use crate::quic::client::ConnectError;
        let Some(tls) = &self.tls else {
            return Ok(Quic::NotTried);
        };
        let Some(client) = &tls.quic else {
            return Ok(Quic::NotTried);
        };
        let Some(udp) = client.target(self.addr, self.quic) else {
            return Ok(Quic::NotTried);
        };
        if self
            .quic_fallback
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .tcp_until
            .is_some_and(|t| Instant::now() < t)
        {
            return Ok(Quic::NotTried);
        }
        let fail = |reason: String| self.tls_error(tls, reason);
        let loaded = self.credentials(tls)?;
        let cfg = crate::quic::client_config(&loaded, &tls.id).map_err(fail)?;
        let port = (udp.port() != self.addr.port()).then_some(self.addr.port());
        match crate::quic::client::connect(client, udp, cfg, &tls.id.dns_name(), port).await {
            Ok(io) => {
                let mut f = self.quic_fallback.lock().unwrap_or_else(|p| p.into_inner());
                f.backoff.reset();
                f.tcp_until = None;
                drop(f);
                tls.metrics.tls(Direction::Outbound, TlsResult::Established);
                tls.metrics
                    .mesh_connection(Direction::Outbound, Transport::Quic);
                self.mark_up();
                Ok(Quic::Connected(io))
            }
            Err(ConnectError::Unreachable(why)) => Ok(Quic::Unanswered(format!("{udp}: {why}"))),
            Err(ConnectError::Failed(reason)) => {
                tls.metrics.tls(Direction::Outbound, TlsResult::Failed);
                let e = fail(reason);
                self.mark_down(&e);
                Err(e)
            }
        }
    }

    /// QUIC went unanswered and TCP worked (had TCP failed too, the peer is down, not its UDP
    /// path): TCP only for a while, then QUIC again; counted and logged.
    fn quic_fell_back(&self, why: &str) {
        let Some(tls) = &self.tls else { return };
        let delay = {
            let mut f = self.quic_fallback.lock().unwrap_or_else(|p| p.into_inner());
            let d = f.backoff.next_delay();
            f.tcp_until = Some(Instant::now() + d);
            d
        };
        tls.metrics.quic_fallbacks.inc();
        tracing::info!(addr = %self.addr, reason = %why, tcp_for = ?delay, "QUIC unavailable; using TCP + mTLS (counted in remora_quic_fallbacks_total)");
    }

    /// The HTTP/2 client handshake on a new connection (TCP, mTLS, or the pipe to a QUIC
    /// bridge), its connection task spawned, the sender cached.
    async fn start_h2<T>(&self, tcp: T) -> Result<http2::SendRequest<UpstreamBody>, EndpointError>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Every downstream stream to this endpoint shares this connection. A downstream
            // client that stops reading leaves its stream's window unreleased, so the stream
            // window is kept well below the connection window: it takes 128 stalled streams,
            // not 5, to hold the connection for everyone (issue: one h2 client stalling all).
            .initial_stream_window_size(crate::http::STREAM_WINDOW)
            .initial_connection_window_size(128 * crate::http::STREAM_WINDOW)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake_direct(TokioIo::new(crate::io::Gather::new(tcp)))
            .await
            .map_err(|source| EndpointError::Handshake {
                addr: self.addr,
                proto: "HTTP/2",
                source,
            })?;
        let addr = self.addr;
        let h1_only = self.h1_only.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
                if answered_in_http1(&e)
                    && !h1_only.flag.swap(true, std::sync::atomic::Ordering::AcqRel)
                {
                    tracing::info!(%addr, "endpoint does not speak HTTP/2; translating HTTP/2 requests to HTTP/1.1 for it");
                }
            }
            h1_only.ended.notify_waiters();
        });
        *self.h2.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender.clone());
        Ok(sender)
    }

    fn request_error(&self, source: hyper::Error) -> SendError {
        SendError {
            error: EndpointError::Request {
                addr: self.addr,
                source,
            },
            unsent: None,
        }
    }

    /// Not an `async fn`, for the reason [`Endpoint::send`] gives: the request is kept once.
    /// Boxed: `req` is assigned again when a pooled connection hands it back, so its place
    /// in the future is kept while the request is out — 8 bytes, not 296.
    #[allow(clippy::manual_async_fn)] // on purpose: see `Endpoint::send`
    fn send_h1(
        &self,
        mut req: Box<Request<UpstreamBody>>,
        dispatched: &Stamp,
    ) -> impl Future<Output = Result<Response<Incoming>, SendError>> + Send {
        async move {
            // A pooled connection can close between our check and the write; a request that
            // was never written is retried on the next one.
            while let Some(mut sender) = self.idle_h1() {
                dispatched.set();
                let sent = sender.try_send_request(unbox(req));
                self.return_h1(sender);
                match sent.await {
                    Ok(rsp) => return Ok(rsp),
                    Err(mut e) => match e.take_message() {
                        // `req` was moved out of (and its box freed) by the send above: clippy's
                        // `*req = back` would write through a moved-from box.
                        #[allow(clippy::replace_box)]
                        Some(back) => req = Box::new(back),
                        None => return Err(self.request_error(e.into_error())),
                    },
                }
            }
            let mut sender = match Box::pin(self.new_h1(false)).await {
                Ok(s) => s,
                Err(error) => {
                    return Err(SendError {
                        error,
                        unsent: Some(unbox(req)),
                    });
                }
            };
            dispatched.set();
            let sent = sender.send_request(unbox(req));
            self.return_h1(sender);
            sent.await.map_err(|source| self.request_error(source))
        }
    }

    /// Sends an HTTP/1.1 request on a connection of its own that may be upgraded (WebSocket).
    pub async fn send_upgrade(
        &self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, EndpointError> {
        let mut sender = self.new_h1(true).await?;
        sender
            .send_request(req)
            .await
            .map_err(|source| EndpointError::Request {
                addr: self.addr,
                source,
            })
    }

    fn idle_h1(&self) -> Option<http1::SendRequest<UpstreamBody>> {
        let mut pool = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        pool.retain(|s| !s.is_closed());
        let i = pool.iter().position(|s| s.is_ready())?;
        Some(pool.swap_remove(i))
    }

    /// Keeps a connection for reuse; it becomes ready again once its response has been read.
    fn return_h1(&self, sender: http1::SendRequest<UpstreamBody>) {
        let mut pool = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < MAX_H1_POOL {
            pool.push(sender);
        }
    }

    async fn new_h1(
        &self,
        upgrades: bool,
    ) -> Result<http1::SendRequest<UpstreamBody>, EndpointError> {
        let tcp = self.connect(Some(crate::tls::ALPN_HTTP1)).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|source| EndpointError::Handshake {
                addr: self.addr,
                proto: "HTTP/1.1",
                source,
            })?;
        let addr = self.addr;
        if upgrades {
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(%addr, error = %e, "upstream HTTP/1.1 connection ended");
                }
            });
        } else {
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%addr, error = %e, "upstream HTTP/1.1 connection ended");
                }
            });
        }
        Ok(sender)
    }
}

/// True when an HTTP/2 connection failed because the peer answered in HTTP/1 (`HTTP/1.1 400`
/// read as a frame header is far beyond the maximum frame size) or with other non-frames.
/// What a resend needs of a request besides its body.
pub(crate) type RequestHead = (http::Method, http::Uri, http::Version, http::HeaderMap);

/// The request out of its box, and the box freed now: moved out with `*req` inside an async
/// block, the allocation would stay until the block's scope ends — after the response came.
pub(crate) fn unbox(req: Box<Request<UpstreamBody>>) -> Request<UpstreamBody> {
    *req
}

pub(crate) fn rebuild<B>((method, uri, version, headers): RequestHead, body: B) -> Request<B> {
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    req
}

/// A stream reset or GOAWAY that a working HTTP/2 server sent.
fn remote_h2_error(e: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.is_remote();
        }
        cur = err.source();
    }
    false
}

fn answered_in_http1(e: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return !h2.is_remote()
                && matches!(
                    h2.reason(),
                    Some(h2::Reason::FRAME_SIZE_ERROR | h2::Reason::PROTOCOL_ERROR)
                );
        }
        cur = err.source();
    }
    false
}

/// An HTTP/2 request as HTTP/1.1: origin-form target, `Host` from the authority.
fn to_http1<B>(mut req: Box<Request<B>>) -> Box<Request<B>> {
    *req.version_mut() = http::Version::HTTP_11;
    if let Some(auth) = req.uri().authority().map(|a| a.as_str().to_string())
        && !req.headers().contains_key(http::header::HOST)
        && let Ok(v) = http::HeaderValue::from_str(&auth)
    {
        req.headers_mut().insert(http::header::HOST, v);
    }
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    if let Ok(u) = pq.parse::<http::Uri>() {
        *req.uri_mut() = u;
    }
    req
}

/// An in-flight send's share of its endpoint's load, given back if the send is dropped.
struct Pending<'a> {
    ep: &'a Endpoint,
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.ep.load.abandon();
            if let Some(m) = &self.ep.metrics {
                m.in_flight.dec();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn refused(a: SocketAddr) -> EndpointError {
        EndpointError::Connect {
            addr: a,
            source: std::io::ErrorKind::ConnectionRefused.into(),
        }
    }

    /// How long the endpoint is skipped from now.
    fn wait(e: &Endpoint) -> Duration {
        e.retry_at().saturating_duration_since(Instant::now())
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_endpoint_backs_off_and_returns_on_the_paused_clock() {
        let e = Endpoint::new(addr(3000), 1, Duration::from_secs(1), None);
        assert!(e.is_ready(Instant::now()));
        e.mark_down(&refused(e.addr));
        let first = wait(&e);
        assert!(
            first >= BACKOFF_MIN / 2 && first <= BACKOFF_MIN,
            "{first:?}"
        );
        assert!(e.last_error().contains("refused"), "{}", e.last_error());
        tokio::time::advance(first - Duration::from_nanos(1)).await;
        assert!(!e.is_ready(Instant::now()));
        tokio::time::advance(Duration::from_nanos(1)).await;
        assert!(e.is_ready(Instant::now()));
        // Failures in a row: the ceiling doubles to the cap, and half of it is always waited.
        for k in 1..12u32 {
            e.mark_down(&refused(e.addr));
            let ceiling = (BACKOFF_MIN * 2u32.pow(k)).min(BACKOFF_MAX);
            let w = wait(&e);
            assert!(w >= ceiling / 2 && w <= ceiling, "failure {k}: {w:?}");
            tokio::time::advance(w).await;
        }
        // A connect that works starts the backoff over.
        e.mark_up();
        e.mark_down(&refused(e.addr));
        let again = wait(&e);
        assert!(again <= BACKOFF_MIN, "{again:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn endpoints_failing_together_come_back_at_different_times() {
        // The same instant on the paused clock: only the jitter tells them apart.
        let eps: Vec<Endpoint> = (0..50)
            .map(|i| Endpoint::new(addr(4000 + i), 1, Duration::from_secs(1), None))
            .collect();
        let waits: std::collections::HashSet<Duration> = eps
            .iter()
            .map(|e| {
                e.mark_down(&refused(e.addr));
                wait(e)
            })
            .collect();
        assert!(waits.len() > 45, "{} distinct of 50", waits.len());
    }

    use crate::identity::testing::Pki;

    /// A peer proxy's mTLS listener (the store's current server configuration, as the
    /// inbound listener uses it) that writes `ok` on each connection and reads to the close.
    async fn peer(store: Arc<IdentityStore>) -> SocketAddr {
        let l = tokio::net::TcpListener::bind(addr(0)).await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = l.accept().await else {
                    return;
                };
                let acceptor =
                    tokio_rustls::TlsAcceptor::from(store.current().unwrap().server.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = tls.write_all(b"ok").await;
                    let mut rest = Vec::new();
                    let _ = tls.read_to_end(&mut rest).await;
                });
            }
        });
        a
    }

    /// Connects through `e` and reads the peer's greeting (which also takes in the session
    /// tickets the peer sent after the handshake); returns how the handshake went.
    async fn handshake_kind(e: &Endpoint) -> rustls::HandshakeKind {
        let io = e.connect(Some(crate::tls::ALPN_H2)).await.unwrap();
        let UpstreamIo::Tls(mut tls) = io else {
            panic!("a plain connection to an mTLS endpoint");
        };
        let mut greeting = [0u8; 2];
        tls.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting, b"ok");
        tls.get_ref().1.handshake_kind().unwrap()
    }

    /// One client configuration per credential set and peer: the second connection reuses it
    /// (and so resumes the TLS session), and a rotated set brings a new one (a full handshake
    /// with the new certificate).
    #[tokio::test]
    async fn client_configs_are_cached_per_peer_and_replaced_on_rotation() {
        let pki = Pki::new("cache");
        let metrics = Arc::new(Metrics::new());
        let server = IdentityStore::new(&pki.issue("server"), metrics.clone());
        server.load_now().unwrap();
        let client_dir = pki.issue("client");
        let client = IdentityStore::new(&client_dir, metrics.clone());
        let first_set = client.load_now().unwrap();
        let e = Endpoint::new(peer(server).await, 1, Duration::from_secs(5), None).with_tls(Some(
            EndpointTls {
                id: Pki::id("server"),
                label: Pki::id("server").to_string().into(),
                store: client.clone(),
                metrics,
                quic: None,
            },
        ));
        assert_eq!(handshake_kind(&e).await, rustls::HandshakeKind::Full);
        let cfg = first_set
            .client_config(&Pki::id("server"), crate::tls::ALPN_H2)
            .unwrap();
        assert_eq!(handshake_kind(&e).await, rustls::HandshakeKind::Resumed);
        let again = first_set
            .client_config(&Pki::id("server"), crate::tls::ALPN_H2)
            .unwrap();
        assert!(Arc::ptr_eq(&cfg, &again), "the same peer got a new config");
        // Another ALPN or another peer is another configuration.
        let h1 = first_set
            .client_config(&Pki::id("server"), crate::tls::ALPN_HTTP1)
            .unwrap();
        assert!(!Arc::ptr_eq(&cfg, &h1));
        let other = first_set
            .client_config(&Pki::id("other"), crate::tls::ALPN_H2)
            .unwrap();
        assert!(!Arc::ptr_eq(&cfg, &other));

        // Rotation: a new key and certificate for the client, loaded as a hot reload does.
        pki.issue("client");
        let second_set = client.load_now().unwrap();
        assert!(!Arc::ptr_eq(&first_set, &second_set));
        assert_eq!(handshake_kind(&e).await, rustls::HandshakeKind::Full);
        let rotated = second_set
            .client_config(&Pki::id("server"), crate::tls::ALPN_H2)
            .unwrap();
        assert!(!Arc::ptr_eq(&cfg, &rotated), "rotation kept the old config");
        assert_eq!(handshake_kind(&e).await, rustls::HandshakeKind::Resumed);
    }
}
