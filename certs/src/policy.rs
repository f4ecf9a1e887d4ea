//! Traffic policy for one service, as callers apply it: the one model every source fills (the
//! Kubernetes source from Service annotations, the file source from TOML, the embedding API
//! directly) and the discovery stream carries beside the endpoints.
//!
//! The annotation names and value formats are a contract ([`ANNOTATIONS`]):
//!
//! | annotation | value | meaning |
//! |---|---|---|
//! | `remora.io/timeout` | a duration: `500ms`, `2s`, `1m` (1 ms … 1 h), then optionally per route `; /PREFIX=DURATION` (a path prefix or a gRPC `/pkg.Service/Method`; the longest matching prefix wins): `500ms; /pkg.Reports/=30s` | each request must have its response head by then: `504`, or `grpc-status: 4` (DEADLINE_EXCEEDED) |
//! | `remora.io/retries` | a count, 0 … 10, then optionally per route `; /PREFIX=COUNT` (as `timeout`): `2; /pkg.Orders/Create=0` | a request given a retryable answer (`remora.io/retry-on`) is tried again on another endpoint, up to this many times, within the destination's retry budget; a body larger than 64 KiB is never replayed |
//! | `remora.io/retry-on` | a list of `5xx`, `gateway-error` (502, 503, 504), status codes 400 … 599, `grpc:NAME` or `grpc:CODE` (`grpc:unavailable`, `grpc:resource-exhausted`, `grpc:14`), and `non-idempotent`; default `503,grpc:unavailable` | which answers are retried; requests with methods that are not idempotent (a plain `POST`, `PATCH`) are repeated only with `non-idempotent` (gRPC calls are retried on the listed gRPC codes) |
//! | `remora.io/retry-timeout` | a duration | each try of a request with retries must have its response head by then, or it is abandoned and tried again (the last one answers `504` / `grpc-status: 4`) |
//! | `remora.io/idle-timeout` | a duration, then optionally per route `; /PREFIX=DURATION` | a request or response stream with no data in either direction for this long is ended: gRPC gets `grpc-status: 4` (DEADLINE_EXCEEDED) in trailers, other streams are reset |
//! | `remora.io/split` | `other=PERCENT[,…]`: Services in the same namespace, whole percents, 100 at most in all | that share of the Service's requests goes to the other Service (same port) instead, picked per request; the rest stays (a canary at 5, then 50) |
//! | `remora.io/routes` | `header:NAME=VALUE=>other[; path:/PREFIX=>other…]`: Services in the same namespace | a request with that header value (exact) or path prefix goes to the other Service (same port); the first rule that matches wins, before any split |
//! | `remora.io/rate-limit` | requests per second, 1 … 1,000,000, then optionally per route `; /PREFIX=RATE` (`100; /pkg.Reports/=5`: a route's requests count against both) | each endpoint (pod) of the Service serves at most this many requests per second (a burst of one second's worth); the rest get `429` with `retry-after`, or `grpc-status: 8` (RESOURCE_EXHAUSTED). Enforced by the endpoint's own proxy, on the inbound side |
//! | `remora.io/rate-limit-per-client` | requests per second, 1 … 1,000,000 | the same, per calling identity (the verified peer; callers without one share one bucket) |
//! | `remora.io/failure-accrual` | a count, 0 … 1000 (default 7; 0: off) | an endpoint whose answers failed (5xx, gRPC `UNAVAILABLE`) this many times in a row is ejected from balancing for a backoff, then probed; never the last ready endpoint |
//!
//! A policy is validated whole: one bad field refuses the whole policy with a message naming
//! the field and the fix, and the caller keeps serving with the last good one.

use std::time::Duration;

/// The Service annotations the Kubernetes source reads (a contract: documented in the README).
pub const ANNOTATIONS: [&str; 10] = [
    TIMEOUT,
    RETRIES,
    RETRY_ON,
    RETRY_TIMEOUT,
    IDLE_TIMEOUT,
    FAILURE_ACCRUAL,
    SPLIT,
    ROUTES,
    RATE_LIMIT,
    RATE_LIMIT_PER_CLIENT,
];
/// `remora.io/retry-on`: which answers are retried.
pub const RETRY_ON: &str = "remora.io/retry-on";
/// `remora.io/retry-timeout`: the time each try has for its response head.
pub const RETRY_TIMEOUT: &str = "remora.io/retry-timeout";
/// `remora.io/idle-timeout`: how long a stream may carry no data.
pub const IDLE_TIMEOUT: &str = "remora.io/idle-timeout";
/// HTTP statuses `remora.io/retry-on` may list one by one.
pub const MAX_RETRY_STATUSES: usize = 16;
/// `remora.io/rate-limit`: requests per second each endpoint serves.
pub const RATE_LIMIT: &str = "remora.io/rate-limit";
/// `remora.io/rate-limit-per-client`: the same per calling identity.
pub const RATE_LIMIT_PER_CLIENT: &str = "remora.io/rate-limit-per-client";
/// The highest rate limit.
pub const MAX_RATE_LIMIT: u32 = 1_000_000;
/// `remora.io/timeout`: the per-request timeout.
pub const TIMEOUT: &str = "remora.io/timeout";
/// `remora.io/retries`: retries of `503` / gRPC `UNAVAILABLE` answers.
pub const RETRIES: &str = "remora.io/retries";

/// `remora.io/split`: shares of the traffic sent to other Services.
pub const SPLIT: &str = "remora.io/split";
/// `remora.io/routes`: requests matched by header or path prefix go elsewhere.
pub const ROUTES: &str = "remora.io/routes";
/// Route rules a policy may list.
pub const MAX_ROUTES: usize = 16;

/// Split targets a policy may list.
pub const MAX_SPLITS: usize = 8;

/// `remora.io/failure-accrual`: consecutive failed answers that eject an endpoint.
pub const FAILURE_ACCRUAL: &str = "remora.io/failure-accrual";

/// Consecutive failed answers that eject an endpoint when no policy says otherwise: on by
/// default (a backend answering only errors should not keep getting its share), and high
/// enough that a few failed requests do not eject a healthy one.
pub const DEFAULT_FAILURE_ACCRUAL: u32 = 7;
/// The highest failure-accrual threshold.
pub const MAX_FAILURE_ACCRUAL: u32 = 1000;

/// The longest timeout a policy may set.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// The most retries a policy may ask for (each also needs the retry budget).
pub const MAX_RETRIES: u32 = 10;

/// How callers treat requests to one service. `Policy::default()` is "no policy": no timeout
/// beyond the proxy's own, no retries of answered requests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Policy {
    /// Each request must have its response head within this.
    pub timeout: Option<Duration>,
    /// Per route: requests whose path starts with the prefix get this timeout instead (the
    /// longest matching prefix wins).
    pub route_timeouts: Vec<(String, Duration)>,
    /// Retries of a request answered `503` or gRPC `UNAVAILABLE`.
    pub retries: u32,
    /// Consecutive failed answers that eject an endpoint; `None`: the default
    /// ([`DEFAULT_FAILURE_ACCRUAL`]); `Some(0)`: never.
    pub failure_accrual: Option<u32>,
    /// Shares of the requests sent to other destinations instead (a canary); the rest stays.
    pub split: Vec<Split>,
    /// Rules sending matching requests to other destinations; the first match wins, before
    /// the split.
    pub routes: Vec<Route>,
    /// Inbound: requests per second each endpoint serves (all callers together).
    pub rate_limit: Option<u32>,
    /// Inbound: requests per second each endpoint serves to one calling identity.
    pub rate_limit_per_client: Option<u32>,
    /// Per route: retries of requests whose path starts with the prefix (longest wins).
    pub route_retries: Vec<(String, u32)>,
    /// Which answers are retried, and whether non-idempotent requests may be.
    pub retry_on: RetryOn,
    /// Each try of a request with retries must have its response head within this.
    pub retry_timeout: Option<Duration>,
    /// A stream with no data in either direction this long is ended.
    pub idle_timeout: Option<Duration>,
    /// Per route idle timeouts (longest prefix wins).
    pub route_idle_timeouts: Vec<(String, Duration)>,
    /// Inbound, per route: requests per second each endpoint serves on the prefix.
    pub route_rate_limits: Vec<(String, u32)>,
}

/// Which answers a policy's retries repeat (`remora.io/retry-on`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RetryOn {
    /// HTTP statuses, 400 … 599, sorted, at most [`MAX_RETRY_STATUSES`].
    pub statuses: Vec<u16>,
    /// Every 5xx.
    pub any_5xx: bool,
    /// gRPC codes, bit `1 << code` (codes 1 … 16).
    pub grpc: u32,
    /// Requests whose method is not idempotent (a plain `POST`, `PATCH`) may be repeated.
    pub non_idempotent: bool,
}

impl Default for RetryOn {
    /// `503` and gRPC `UNAVAILABLE`: the answers that say the request was not carried out.
    fn default() -> Self {
        RetryOn {
            statuses: vec![503],
            any_5xx: false,
            grpc: 1 << 14,
            non_idempotent: false,
        }
    }
}

/// gRPC status codes `retry-on` knows by name.
const GRPC_CODES: [(&str, u32); 16] = [
    ("cancelled", 1),
    ("unknown", 2),
    ("invalid-argument", 3),
    ("deadline-exceeded", 4),
    ("not-found", 5),
    ("already-exists", 6),
    ("permission-denied", 7),
    ("resource-exhausted", 8),
    ("failed-precondition", 9),
    ("aborted", 10),
    ("out-of-range", 11),
    ("unimplemented", 12),
    ("internal", 13),
    ("unavailable", 14),
    ("data-loss", 15),
    ("unauthenticated", 16),
];

impl RetryOn {
    /// Whether an answer with this status and (head) `grpc-status` value is retried.
    pub fn retries(&self, status: u16, grpc_status: Option<&[u8]>) -> bool {
        if let Some(code) = grpc_status
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|c| (1..=16).contains(c))
            && self.grpc & (1 << code) != 0
        {
            return true;
        }
        (self.any_5xx && (500..=599).contains(&status)) || self.statuses.contains(&status)
    }

    /// Parses `5xx,gateway-error,429,grpc:unavailable,grpc:8,non-idempotent`.
    pub fn parse(v: &str) -> Result<RetryOn, String> {
        let mut r = RetryOn {
            statuses: Vec::new(),
            any_5xx: false,
            grpc: 0,
            non_idempotent: false,
        };
        let mut listed_answers = false;
        for item in v.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let item = item.to_ascii_lowercase();
            match item.as_str() {
                "non-idempotent" => {
                    r.non_idempotent = true;
                    continue;
                }
                "5xx" => r.any_5xx = true,
                "gateway-error" => r.statuses.extend([502, 503, 504]),
                _ => {
                    if let Some(g) = item.strip_prefix("grpc:") {
                        let code = GRPC_CODES
                            .iter()
                            .find(|(n, _)| *n == g)
                            .map(|(_, c)| *c)
                            .or_else(|| g.parse::<u32>().ok().filter(|c| (1..=16).contains(c)))
                            .ok_or_else(|| {
                                format!("{item:?} is not a gRPC code; use a name such as grpc:unavailable or a number 1 to 16")
                            })?;
                        r.grpc |= 1 << code;
                    } else {
                        let code = item
                            .parse::<u16>()
                            .ok()
                            .filter(|c| (400..=599).contains(c))
                            .ok_or_else(|| {
                                format!("{item:?} is neither 5xx, gateway-error, a status 400 to 599, grpc:CODE nor non-idempotent")
                            })?;
                        r.statuses.push(code);
                    }
                }
            }
            listed_answers = true;
        }
        if !listed_answers {
            // `non-idempotent` alone widens who is retried, not which answers.
            let d = RetryOn::default();
            (r.statuses, r.grpc) = (d.statuses, d.grpc);
        }
        r.statuses.sort_unstable();
        r.statuses.dedup();
        if r.statuses.len() > MAX_RETRY_STATUSES {
            return Err(format!(
                "lists {} statuses; use at most {MAX_RETRY_STATUSES} (or 5xx)",
                r.statuses.len()
            ));
        }
        Ok(r)
    }
}

/// A default value and per-route (path prefix) values.
type Routed<T> = (Option<T>, Vec<(String, T)>);

/// `[DEFAULT][; /PREFIX=VALUE …]`: a default (optional) and per-route values, the form of
/// `timeout`, `retries`, `idle-timeout` and `rate-limit`. Prefixes start with `/`, at most
/// [`MAX_ROUTES`].
fn parse_routed<T>(
    v: &str,
    what: &str,
    value: impl Fn(&str) -> Result<T, String>,
) -> Result<Routed<T>, String> {
    let mut default = None;
    let mut routes = Vec::new();
    for (i, part) in v
        .split(';')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .enumerate()
    {
        match part.rsplit_once('=') {
            Some((prefix, x)) => {
                let prefix = prefix.trim();
                check_prefix(prefix)?;
                routes.push((
                    prefix.to_string(),
                    value(x).map_err(|e| format!("{x:?} for {prefix} {e}"))?,
                ));
            }
            None if i == 0 => default = Some(value(part).map_err(|e| format!("{part:?} {e}"))?),
            None => {
                return Err(format!(
                    "{part:?} has no route; write /PREFIX={what} after the default"
                ));
            }
        }
    }
    if routes.len() > MAX_ROUTES {
        return Err(format!("{} routes; use at most {MAX_ROUTES}", routes.len()));
    }
    Ok((default, routes))
}

fn check_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.starts_with('/') || prefix.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(format!(
            "route {prefix:?} must be a path prefix starting with /"
        ));
    }
    Ok(())
}

/// The value of the longest prefix of `path` in `routes`.
fn longest<'a, T>(routes: &'a [(String, T)], path: &str) -> Option<&'a T> {
    routes
        .iter()
        .filter(|(p, _)| path.starts_with(p.as_str()))
        .max_by_key(|(p, _)| p.len())
        .map(|(_, v)| v)
}

/// One rule of a [`Policy::routes`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Route {
    pub when: Match,
    /// Where matching requests go (as [`Split::to`]).
    pub to: String,
}

/// What a [`Route`] matches.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Match {
    /// A request header (name in lower case) with exactly this value.
    Header { name: String, value: String },
    /// A path starting with this prefix (it starts with `/`).
    PathPrefix(String),
}

impl Match {
    /// Whether a request with this path and these headers matches.
    pub fn matches<'a>(&self, path: &str, header: impl Fn(&str) -> Option<&'a [u8]>) -> bool {
        match self {
            Match::Header { name, value } => header(name) == Some(value.as_bytes()),
            Match::PathPrefix(p) => path.starts_with(p.as_str()),
        }
    }
}

/// One share of a [`Policy::split`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Split {
    /// Where these requests go: an authority (`canary.shop.svc.cluster.local:80`) once the
    /// source has expanded it; in an annotation, a Service name in the same namespace.
    pub to: String,
    /// Whole percent of the requests, 1 … 100.
    pub percent: u32,
}

impl Policy {
    /// A policy with a timeout and a retry count, checked like annotations are.
    pub fn new(timeout: Option<Duration>, retries: u32) -> Result<Policy, String> {
        Policy::with_accrual(timeout, retries, None)
    }

    /// [`Policy::new`] with a failure-accrual threshold.
    pub fn with_accrual(
        timeout: Option<Duration>,
        retries: u32,
        failure_accrual: Option<u32>,
    ) -> Result<Policy, String> {
        if let Some(n) = failure_accrual
            && n > MAX_FAILURE_ACCRUAL
        {
            return Err(format!(
                "failure-accrual {n} is too many; use 1 to {MAX_FAILURE_ACCRUAL}, or 0 for off"
            ));
        }
        if let Some(t) = timeout
            && (t < Duration::from_millis(1) || t > MAX_TIMEOUT)
        {
            return Err(format!(
                "timeout {t:?} is out of range; use 1ms to {}s",
                MAX_TIMEOUT.as_secs()
            ));
        }
        if retries > MAX_RETRIES {
            return Err(format!(
                "retries {retries} is too many; use 0 to {MAX_RETRIES}"
            ));
        }
        Ok(Policy {
            timeout,
            retries,
            failure_accrual,
            ..Policy::default()
        })
    }

    /// The policy with per-route retries, which answers are retried and a per-try timeout.
    pub fn with_retry_policy(
        mut self,
        route_retries: Vec<(String, u32)>,
        retry_on: RetryOn,
        retry_timeout: Option<Duration>,
    ) -> Result<Policy, String> {
        if route_retries.len() > MAX_ROUTES {
            return Err(format!(
                "retries: {} routes; use at most {MAX_ROUTES}",
                route_retries.len()
            ));
        }
        for (prefix, n) in &route_retries {
            check_prefix(prefix).map_err(|e| format!("retries: {e}"))?;
            if *n > MAX_RETRIES {
                return Err(format!(
                    "retries: {n} for {prefix} is too many; use 0 to {MAX_RETRIES}"
                ));
            }
        }
        if retry_on.statuses.len() > MAX_RETRY_STATUSES
            || retry_on.statuses.iter().any(|c| !(400..=599).contains(c))
            || retry_on.grpc & 1 != 0
            || retry_on.grpc >> 17 != 0
        {
            return Err(format!(
                "retry-on: statuses must be 400 to 599 (at most {MAX_RETRY_STATUSES}), gRPC codes 1 to 16"
            ));
        }
        if let Some(t) = retry_timeout
            && (t < Duration::from_millis(1) || t > MAX_TIMEOUT)
        {
            return Err(format!(
                "retry-timeout {t:?} is out of range; use 1ms to {}s",
                MAX_TIMEOUT.as_secs()
            ));
        }
        self.route_retries = route_retries;
        self.retry_on = retry_on;
        self.retry_timeout = retry_timeout;
        Ok(self)
    }

    /// The retries of a request to `path`: its longest matching route's, else the default.
    pub fn retries_for(&self, path: &str) -> u32 {
        longest(&self.route_retries, path)
            .copied()
            .unwrap_or(self.retries)
    }

    /// The policy with an idle timeout, by default and per route.
    pub fn with_idle_timeouts(
        mut self,
        default: Option<Duration>,
        routes: Vec<(String, Duration)>,
    ) -> Result<Policy, String> {
        if routes.len() > MAX_ROUTES {
            return Err(format!(
                "idle-timeout: {} routes; use at most {MAX_ROUTES}",
                routes.len()
            ));
        }
        for (prefix, d) in routes
            .iter()
            .map(|(p, d)| (p.as_str(), d))
            .chain(default.as_ref().map(|d| ("the default", d)))
        {
            if prefix != "the default" {
                check_prefix(prefix).map_err(|e| format!("idle-timeout: {e}"))?;
            }
            if *d < Duration::from_millis(1) || *d > MAX_TIMEOUT {
                return Err(format!(
                    "idle-timeout: {d:?} for {prefix} is out of range; use 1ms to {}s",
                    MAX_TIMEOUT.as_secs()
                ));
            }
        }
        self.idle_timeout = default;
        self.route_idle_timeouts = routes;
        Ok(self)
    }

    /// The idle timeout of a request to `path`: its longest matching route's, else the default.
    pub fn idle_timeout_for(&self, path: &str) -> Option<Duration> {
        longest(&self.route_idle_timeouts, path)
            .copied()
            .or(self.idle_timeout)
    }

    /// The policy with per-route inbound rate limits (each 1 … [`MAX_RATE_LIMIT`]).
    pub fn with_route_rate_limits(mut self, routes: Vec<(String, u32)>) -> Result<Policy, String> {
        if routes.len() > MAX_ROUTES {
            return Err(format!(
                "rate-limit: {} routes; use at most {MAX_ROUTES}",
                routes.len()
            ));
        }
        for (prefix, v) in &routes {
            check_prefix(prefix).map_err(|e| format!("rate-limit: {e}"))?;
            if !(1..=MAX_RATE_LIMIT).contains(v) {
                return Err(format!(
                    "rate-limit: {v} for {prefix} is out of range; use 1 to {MAX_RATE_LIMIT} requests per second"
                ));
            }
        }
        self.route_rate_limits = routes;
        Ok(self)
    }

    /// The rate limit of the longest route prefix of `path`, with that prefix.
    pub fn route_rate_limit_for(&self, path: &str) -> Option<(&str, u32)> {
        self.route_rate_limits
            .iter()
            .filter(|(p, _)| path.starts_with(p.as_str()))
            .max_by_key(|(p, _)| p.len())
            .map(|(p, v)| (p.as_str(), *v))
    }

    /// The policy with per-route timeouts (at most [`MAX_ROUTES`], prefixes starting with `/`).
    pub fn with_route_timeouts(mut self, t: Vec<(String, Duration)>) -> Result<Policy, String> {
        if t.len() > MAX_ROUTES {
            return Err(format!(
                "timeout: {} routes; use at most {MAX_ROUTES}",
                t.len()
            ));
        }
        for (prefix, d) in &t {
            if !prefix.starts_with('/') || prefix.bytes().any(|b| b.is_ascii_control() || b == b' ')
            {
                return Err(format!(
                    "timeout: route {prefix:?} must be a path prefix starting with /"
                ));
            }
            if *d < Duration::from_millis(1) || *d > MAX_TIMEOUT {
                return Err(format!(
                    "timeout: {d:?} for {prefix} is out of range; use 1ms to {}s",
                    MAX_TIMEOUT.as_secs()
                ));
            }
        }
        self.route_timeouts = t;
        Ok(self)
    }

    /// The timeout of a request to `path`: its longest matching route's, else the default.
    pub fn timeout_for(&self, path: &str) -> Option<Duration> {
        longest(&self.route_timeouts, path)
            .copied()
            .or(self.timeout)
    }

    /// The policy with inbound rate limits (each 1 … [`MAX_RATE_LIMIT`] per second).
    pub fn with_rate_limits(
        mut self,
        total: Option<u32>,
        per_client: Option<u32>,
    ) -> Result<Policy, String> {
        for (what, v) in [("rate-limit", total), ("rate-limit-per-client", per_client)] {
            if let Some(v) = v
                && !(1..=MAX_RATE_LIMIT).contains(&v)
            {
                return Err(format!(
                    "{what} {v} is out of range; use 1 to {MAX_RATE_LIMIT} requests per second"
                ));
            }
        }
        self.rate_limit = total;
        self.rate_limit_per_client = per_client;
        Ok(self)
    }

    /// What an endpoint's own proxy enforces of its Service's policy (the rate limits), as
    /// published for the endpoint's address.
    pub fn inbound_part(&self) -> Policy {
        Policy {
            rate_limit: self.rate_limit,
            rate_limit_per_client: self.rate_limit_per_client,
            route_rate_limits: self.route_rate_limits.clone(),
            ..Policy::default()
        }
    }

    /// The policy with these route rules (checked: at most [`MAX_ROUTES`], header names and
    /// values and path prefixes that a request can carry).
    pub fn with_routes(mut self, routes: Vec<Route>) -> Result<Policy, String> {
        if routes.len() > MAX_ROUTES {
            return Err(format!(
                "{} route rules; use at most {MAX_ROUTES}",
                routes.len()
            ));
        }
        for r in &routes {
            check_route(r)?;
        }
        self.routes = routes;
        Ok(self)
    }

    /// The destination the first matching rule names, if any.
    pub fn route_for<'a>(
        &self,
        path: &str,
        header: impl Fn(&str) -> Option<&'a [u8]>,
    ) -> Option<&Route> {
        self.routes.iter().find(|r| r.when.matches(path, &header))
    }

    /// The policy with traffic split to `split` (checked: at most [`MAX_SPLITS`] targets,
    /// each named once, percents 1 … 100 adding up to 100 at most).
    pub fn with_split(mut self, split: Vec<Split>) -> Result<Policy, String> {
        check_split(&split)?;
        self.split = split;
        Ok(self)
    }

    /// Which split target, if any, one request goes to, given `draw` uniform in 0 … 99.
    pub fn split_for(&self, draw: u32) -> Option<&Split> {
        let mut below = 0;
        for s in &self.split {
            below += s.percent;
            if draw < below {
                return Some(s);
            }
        }
        None
    }

    /// The failure-accrual threshold in force (0: off).
    pub fn accrual(&self) -> u32 {
        self.failure_accrual.unwrap_or(DEFAULT_FAILURE_ACCRUAL)
    }

    /// True for the default (nothing configured).
    pub fn is_default(&self) -> bool {
        *self == Policy::default()
    }

    /// Reads the policy fields of a set of annotations (or TOML keys named the same way without
    /// the `remora.io/` prefix). Unknown `remora.io/*` keys are not this function's business.
    /// Errors name the field and the value's expected form.
    pub fn from_fields<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<Policy, String> {
        // `DEFAULT; /prefix=D; …`: the default (optional) first, then routes.
        let duration = |v: &str| parse_duration(v);
        let (timeout, route_timeouts) =
            parse_routed(get(TIMEOUT).unwrap_or(""), "DURATION", duration)
                .map_err(|e| format!("{TIMEOUT}: {e}"))?;
        let count = |v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| format!("is not a count; use a whole number from 0 to {MAX_RETRIES}"))
        };
        let (retries, route_retries) = parse_routed(get(RETRIES).unwrap_or(""), "COUNT", count)
            .map_err(|e| format!("{RETRIES}: {e}"))?;
        let retries = retries.unwrap_or(0);
        let retry_on = match get(RETRY_ON) {
            None => RetryOn::default(),
            Some(v) => RetryOn::parse(v).map_err(|e| format!("{RETRY_ON}: {e}"))?,
        };
        let retry_timeout = get(RETRY_TIMEOUT)
            .map(|v| parse_duration(v).map_err(|e| format!("{RETRY_TIMEOUT}: {v:?} {e}")))
            .transpose()?;
        let (idle, route_idle) =
            parse_routed(get(IDLE_TIMEOUT).unwrap_or(""), "DURATION", duration)
                .map_err(|e| format!("{IDLE_TIMEOUT}: {e}"))?;
        let failure_accrual = match get(FAILURE_ACCRUAL) {
            None => None,
            Some(v) => Some(v.trim().parse::<u32>().map_err(|_| {
                format!("{FAILURE_ACCRUAL}: {v:?} is not a count; use a whole number from 1 to {MAX_FAILURE_ACCRUAL}, or 0 for off")
            })?),
        };
        let split = match get(SPLIT) {
            None => Vec::new(),
            Some(v) => parse_split(v).map_err(|e| format!("{SPLIT}: {v:?} {e}"))?,
        };
        let policy = Policy::with_accrual(timeout, retries, failure_accrual).map_err(|e| {
            let field = match () {
                _ if e.starts_with("timeout") => TIMEOUT,
                _ if e.starts_with("retries") => RETRIES,
                _ => FAILURE_ACCRUAL,
            };
            format!("{field}: {e}")
        })?;
        let routes = match get(ROUTES) {
            None => Vec::new(),
            Some(v) => parse_routes(v).map_err(|e| format!("{ROUTES}: {e}"))?,
        };
        let rate = |v: &str| {
            v.trim().parse::<u32>().map_err(|_| {
                format!("is not a rate; give requests per second, 1 to {MAX_RATE_LIMIT}")
            })
        };
        let (total, route_rates) = parse_routed(get(RATE_LIMIT).unwrap_or(""), "RATE", rate)
            .map_err(|e| format!("{RATE_LIMIT}: {e}"))?;
        let per_client = get(RATE_LIMIT_PER_CLIENT)
            .map(|v| rate(v).map_err(|e| format!("{RATE_LIMIT_PER_CLIENT}: {v:?} {e}")))
            .transpose()?;
        policy
            .with_retry_policy(route_retries, retry_on, retry_timeout)
            .map_err(|e| match e.strip_prefix("retry-timeout") {
                Some(_) => format!("{RETRY_TIMEOUT}: {e}"),
                None if e.starts_with("retry-on") => format!("{RETRY_ON}: {e}"),
                None => format!("{RETRIES}: {}", e.trim_start_matches("retries: ")),
            })?
            .with_idle_timeouts(idle, route_idle)
            .map_err(|e| format!("{IDLE_TIMEOUT}: {}", e.trim_start_matches("idle-timeout: ")))?
            .with_route_rate_limits(route_rates)
            .map_err(|e| format!("{RATE_LIMIT}: {}", e.trim_start_matches("rate-limit: ")))?
            .with_route_timeouts(route_timeouts)
            .map_err(|e| format!("{TIMEOUT}: {}", e.trim_start_matches("timeout: ")))?
            .with_split(split)
            .map_err(|e| format!("{SPLIT}: {e}"))?
            .with_routes(routes)
            .map_err(|e| format!("{ROUTES}: {e}"))?
            .with_rate_limits(total, per_client)
            .map_err(|e| {
                let field = match e.starts_with("rate-limit-per-client") {
                    true => RATE_LIMIT_PER_CLIENT,
                    false => RATE_LIMIT,
                };
                format!("{field}: {e}")
            })
    }
}

/// `header:NAME=VALUE=>to; path:/PREFIX=>to; …` (names checked by the source).
pub fn parse_routes(v: &str) -> Result<Vec<Route>, String> {
    let mut out = Vec::new();
    for rule in v.split(';').map(str::trim).filter(|r| !r.is_empty()) {
        let (when, to) = rule.rsplit_once("=>").ok_or_else(|| {
            format!("rule {rule:?} has no =>; write header:x-canary=true=>web-canary or path:/v2/=>web-v2")
        })?;
        let (when, to) = (when.trim(), to.trim().to_ascii_lowercase());
        let when = if let Some(h) = when.strip_prefix("header:") {
            let (name, value) = h
                .split_once('=')
                .ok_or_else(|| format!("rule {rule:?}: header:NAME=VALUE"))?;
            Match::Header {
                name: name.trim().to_ascii_lowercase(),
                value: value.trim().to_string(),
            }
        } else if let Some(p) = when.strip_prefix("path:") {
            Match::PathPrefix(p.trim().to_string())
        } else {
            return Err(format!("rule {rule:?} matches neither header: nor path:"));
        };
        let route = Route { when, to };
        check_route(&route)?;
        out.push(route);
    }
    Ok(out)
}

fn check_route(r: &Route) -> Result<(), String> {
    if r.to.is_empty() {
        return Err("a route rule has no target".into());
    }
    match &r.when {
        Match::Header { name, value } => {
            let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            if name.is_empty() || !name.bytes().all(token) {
                return Err(format!("{name:?} is not a header name"));
            }
            if value.bytes().any(|b| b.is_ascii_control()) {
                return Err(format!("the value of {name} has control characters"));
            }
        }
        Match::PathPrefix(p) => {
            if !p.starts_with('/') || p.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                return Err(format!(
                    "path prefix {p:?} must start with / and have no spaces"
                ));
            }
        }
    }
    Ok(())
}

/// `name=PERCENT[,name=PERCENT…]`; names are checked by the source (a Service name, or an
/// authority), the percents here.
pub fn parse_split(v: &str) -> Result<Vec<Split>, String> {
    let mut out = Vec::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (to, pct) = part
            .rsplit_once('=')
            .ok_or("is not name=PERCENT[,…]; e.g. web-canary=5")?;
        let percent = pct
            .trim()
            .trim_end_matches('%')
            .parse::<u32>()
            .map_err(|_| format!("has {pct:?} for {to}; give a whole percent from 1 to 100"))?;
        out.push(Split {
            to: to.trim().to_ascii_lowercase(),
            percent,
        });
    }
    check_split(&out).map_err(|e| format!("is refused: {e}"))?;
    Ok(out)
}

fn check_split(split: &[Split]) -> Result<(), String> {
    if split.len() > MAX_SPLITS {
        return Err(format!(
            "{} split targets; use at most {MAX_SPLITS}",
            split.len()
        ));
    }
    let mut total = 0;
    for (i, s) in split.iter().enumerate() {
        if s.to.is_empty() {
            return Err("a split target has no name".into());
        }
        if !(1..=100).contains(&s.percent) {
            return Err(format!(
                "{} gets {} %; give a whole percent from 1 to 100",
                s.to, s.percent
            ));
        }
        if split[..i].iter().any(|o| o.to == s.to) {
            return Err(format!("{} is named twice", s.to));
        }
        total += s.percent;
    }
    if total > 100 {
        return Err(format!(
            "the shares add up to {total} %; at most 100 can go elsewhere"
        ));
    }
    Ok(())
}

/// `500ms`, `2s`, `1.5s`, `1m`, `1h`: a number and a unit (`ms`, `s`, `m`, `h`).
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    let v = v.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)
        .ok_or("is not a duration; write a number and a unit, e.g. 500ms, 2s or 1m")?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err("has no unit; write ms, s, m or h after the number, e.g. 500ms".into()),
    };
    if secs > MAX_TIMEOUT.as_secs_f64() {
        return Err(format!(
            "is longer than {}s; use a shorter one",
            MAX_TIMEOUT.as_secs()
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&'static str, &'static str)]) -> Result<Policy, String> {
        Policy::from_fields(|k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| *v))
    }

    #[test]
    fn annotations_parse_or_name_the_field() {
        assert_eq!(fields(&[]), Ok(Policy::default()));
        assert_eq!(
            fields(&[(TIMEOUT, "500ms"), (RETRIES, "2")]),
            Ok(Policy {
                timeout: Some(Duration::from_millis(500)),
                retries: 2,
                ..Policy::default()
            })
        );
        assert_eq!(
            fields(&[(TIMEOUT, "1.5s")]).map(|p| p.timeout),
            Ok(Some(Duration::from_millis(1500)))
        );
        assert_eq!(
            fields(&[]).map(|p| p.accrual()),
            Ok(DEFAULT_FAILURE_ACCRUAL)
        );
        let p = fields(&[(SPLIT, "Canary=5, v3=10%")]).unwrap();
        assert_eq!(
            p.split,
            [
                Split {
                    to: "canary".into(),
                    percent: 5
                },
                Split {
                    to: "v3".into(),
                    percent: 10
                }
            ]
        );
        let t = fields(&[(TIMEOUT, "500ms; /pkg.Reports/=30s; /pkg.Reports/Quick=1s")]).unwrap();
        let ms = |v| Some(Duration::from_millis(v));
        assert_eq!(t.timeout_for("/pkg.Svc/Get"), ms(500));
        assert_eq!(t.timeout_for("/pkg.Reports/Year"), ms(30_000));
        assert_eq!(
            t.timeout_for("/pkg.Reports/Quick"),
            ms(1_000),
            "the longest prefix"
        );
        let only_routes = fields(&[(TIMEOUT, "/slow/=5s")]).unwrap();
        assert_eq!(
            (
                only_routes.timeout_for("/x"),
                only_routes.timeout_for("/slow/a")
            ),
            (None, ms(5_000))
        );
        let r = fields(&[(
            ROUTES,
            "header:X-Canary=true=>web-canary; path:/v2/=>web-v2",
        )])
        .unwrap();
        let h = |k: &str| (k == "x-canary").then_some(&b"true"[..]);
        let none = |_: &str| None;
        assert_eq!(
            r.route_for("/", h).map(|r| r.to.as_str()),
            Some("web-canary")
        );
        assert_eq!(
            r.route_for("/v2/x", none).map(|r| r.to.as_str()),
            Some("web-v2")
        );
        assert_eq!(r.route_for("/v1/x", none), None);
        // Draws 0-4 go to the canary, 5-14 to v3, the rest stay.
        let to = |d| p.split_for(d).map(|s| s.to.as_str());
        assert_eq!(
            [to(0), to(4), to(5), to(14), to(15), to(99)],
            [
                Some("canary"),
                Some("canary"),
                Some("v3"),
                Some("v3"),
                None,
                None
            ]
        );
        assert_eq!(
            fields(&[(FAILURE_ACCRUAL, "0")]).map(|p| p.accrual()),
            Ok(0)
        );
        assert_eq!(
            fields(&[(FAILURE_ACCRUAL, "3")]).map(|p| p.accrual()),
            Ok(3)
        );
        assert_eq!(
            fields(&[(TIMEOUT, "2m")]).map(|p| p.timeout),
            Ok(Some(Duration::from_secs(120)))
        );
        for (k, v, says) in [
            (TIMEOUT, "500", "no unit"),
            (TIMEOUT, "fast", "not a duration"),
            (TIMEOUT, "0ms", "out of range"),
            (TIMEOUT, "2h", "longer than 3600s"),
            (TIMEOUT, "-1s", "not a duration"),
            (RETRIES, "two", "not a count"),
            (RETRIES, "-1", "not a count"),
            (RETRIES, "11", "too many"),
            (FAILURE_ACCRUAL, "many", "not a count"),
            (FAILURE_ACCRUAL, "1001", "too many"),
            (SPLIT, "canary", "not name=PERCENT"),
            (SPLIT, "canary=five", "whole percent"),
            (SPLIT, "canary=0", "whole percent"),
            (SPLIT, "a=60,b=50", "add up to 110"),
            (SPLIT, "a=5,a=5", "named twice"),
            (ROUTES, "header:x=1", "no =>"),
            (TIMEOUT, "1s; 2s", "has no route"),
            (TIMEOUT, "1s; reports=2s", "must be a path prefix"),
            (TIMEOUT, "1s; /r=soon", "not a duration"),
            (RATE_LIMIT, "lots", "not a rate"),
            (RATE_LIMIT, "0", "out of range"),
            (RATE_LIMIT_PER_CLIENT, "2000000", "out of range"),
            (ROUTES, "cookie:x=1=>b", "neither header: nor path:"),
            (ROUTES, "path:v2=>b", "must start with /"),
            (ROUTES, "header:bad name=1=>b", "not a header name"),
            (RETRIES, "2; /a=11", "too many"),
            (RETRIES, "2; a=1", "must be a path prefix"),
            (RETRY_ON, "5xx,teapot", "neither 5xx"),
            (RETRY_ON, "grpc:sleepy", "not a gRPC code"),
            (RETRY_ON, "grpc:17", "not a gRPC code"),
            (RETRY_ON, "399", "neither 5xx"),
            (RETRY_TIMEOUT, "soon", "not a duration"),
            (IDLE_TIMEOUT, "0ms", "out of range"),
            (IDLE_TIMEOUT, "1s; /x", "has no route"),
            (RATE_LIMIT, "10; /x=0", "out of range"),
        ] {
            let e = fields(&[(k, v)]).expect_err(v);
            assert!(e.starts_with(k) && e.contains(says), "{k}={v}: {e}");
        }
    }

    #[test]
    fn per_route_retries_retry_on_idle_and_route_rate_limits() {
        let p = fields(&[
            (RETRIES, "2; /pkg.Orders/Create=0; /pkg.Orders/=3"),
            (
                RETRY_ON,
                "gateway-error, 429, grpc:resource-exhausted, non-idempotent",
            ),
            (RETRY_TIMEOUT, "300ms"),
            (IDLE_TIMEOUT, "30s; /pkg.Watch/=10m"),
            (RATE_LIMIT, "100; /pkg.Reports/=5"),
        ])
        .unwrap();
        assert_eq!(p.retries_for("/pkg.Users/Get"), 2);
        assert_eq!(p.retries_for("/pkg.Orders/Create"), 0);
        assert_eq!(p.retries_for("/pkg.Orders/List"), 3);
        let r = &p.retry_on;
        assert!(r.non_idempotent);
        assert!(r.retries(502, None) && r.retries(504, None) && r.retries(429, None));
        assert!(!r.retries(500, None), "not listed");
        assert!(r.retries(200, Some(b"8")) && !r.retries(200, Some(b"14")));
        assert_eq!(p.retry_timeout, Some(Duration::from_millis(300)));
        assert_eq!(p.idle_timeout_for("/x"), Some(Duration::from_secs(30)));
        assert_eq!(
            p.idle_timeout_for("/pkg.Watch/All"),
            Some(Duration::from_secs(600))
        );
        assert_eq!(p.rate_limit, Some(100));
        assert_eq!(
            p.route_rate_limit_for("/pkg.Reports/Year"),
            Some(("/pkg.Reports/", 5))
        );
        assert_eq!(p.route_rate_limit_for("/pkg.Users/Get"), None);
        assert_eq!(p.inbound_part().route_rate_limits, p.route_rate_limits);
        // The defaults: 503 and UNAVAILABLE, idempotent requests only; `non-idempotent` alone
        // keeps those answers.
        let d = fields(&[]).unwrap().retry_on;
        assert!(d.retries(503, None) && d.retries(200, Some(b"14")));
        assert!(!d.retries(502, None) && !d.non_idempotent);
        let n = fields(&[(RETRY_ON, "non-idempotent")]).unwrap().retry_on;
        assert!(n.non_idempotent && n.retries(503, None) && !n.retries(502, None));
        let all = fields(&[(RETRY_ON, "5xx")]).unwrap().retry_on;
        assert!(all.retries(500, None) && all.retries(599, None) && !all.retries(200, Some(b"14")));
    }
}
