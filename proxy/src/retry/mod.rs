//! Retries, in one place: which requests may be tried again on another endpoint, how much
//! retrying a destination may do ([`RetryBudget`]), and the recorded body that lets a request
//! refused before processing be resent ([`replay`]).
//!
//! The rules (Linkerd's): a request that never reached a backend (no connection, a refused
//! HTTP/2 stream) is always safe to send elsewhere; one that may have been processed is retried
//! only when it is idempotent and bodiless (GET/HEAD/OPTIONS), and only within the budget.
//! A destination's policy (`remora.io/retries`) adds retries of *answered* requests: a `503`
//! or gRPC `UNAVAILABLE` is tried again on another endpoint, for idempotent methods and gRPC,
//! with the body replayed when it fit in [`replay::MAX_REPLAY`], within the same budget.

pub(crate) mod replay;

use http::{Method, Request};
use tokio::time::Instant;

use replay::UpstreamBody;

/// Retries of requests that may have reached a backend are limited to a share of the traffic
/// (20 %, plus 10 per second so light traffic can still retry), so retries cannot multiply the
/// load on a struggling destination.
pub struct RetryBudget {
    state: std::sync::Mutex<(f64, Instant)>,
}

const RETRY_RATIO: f64 = 0.2;
const RETRY_MIN_PER_SEC: f64 = 10.0;
pub(crate) const RETRY_MAX_TOKENS: f64 = 100.0;

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            state: std::sync::Mutex::new((RETRY_MIN_PER_SEC, Instant::now())),
        }
    }
}

impl RetryBudget {
    pub fn deposit(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = (s.0 + RETRY_RATIO).min(RETRY_MAX_TOKENS);
    }

    pub fn withdraw(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * RETRY_MIN_PER_SEC;
        s.0 = (s.0 + refill).min(RETRY_MAX_TOKENS);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Whether a policy's retries may repeat a request that a backend answered: the methods RFC 9110
/// calls idempotent, and gRPC calls (a gRPC `UNAVAILABLE` means the call was not carried out,
/// which is why gRPC's own retry policy repeats them). A plain `POST` or `PATCH` is repeated
/// only when the policy opts in (`remora.io/retry-on: non-idempotent`): the first try may have
/// done its work.
pub(crate) fn policy_may_retry<B>(req: &Request<B>, grpc: bool) -> bool {
    grpc || matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// What a request keeps for a second try: a copy of its head when it may be repeated even after
/// a backend saw it. Boxed: it is kept in the request's future while the request is out, and
/// an unboxed head (224 bytes) would be there for every request, repeatable or not.
pub(crate) struct SecondTry {
    head: Option<Box<Request<()>>>,
}

impl SecondTry {
    pub(crate) fn new<B: http_body::Body>(req: &Request<B>) -> Self {
        let idempotent = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
            && req.body().is_end_stream();
        SecondTry {
            head: idempotent.then(|| {
                let mut r = Request::new(());
                *r.method_mut() = req.method().clone();
                *r.uri_mut() = req.uri().clone();
                *r.version_mut() = req.version();
                *r.headers_mut() = req.headers().clone();
                Box::new(r)
            }),
        }
    }

    /// The request to send to another endpoint after a failed try, if any: the original when
    /// it was never sent (`unsent`), else the copied head when the budget allows a retry.
    pub(crate) fn after(
        self,
        unsent: Option<Request<UpstreamBody>>,
        budget: &RetryBudget,
    ) -> Option<Request<UpstreamBody>> {
        match (unsent, self.head) {
            (Some(req), _) => Some(req),
            (None, Some(head)) if budget.withdraw() => Some(head.map(|()| UpstreamBody::empty())),
            _ => None,
        }
    }
}
