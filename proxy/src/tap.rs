//! Live request events: what `GET /tap` on the admin server streams (one JSON line per
//! request, `remora tap` prints them) and what the access log writes — the same fields.
//!
//! A request's event holds no body and no header value except [`Event::content_type`] and
//! [`Event::user_agent`] (an allow-list): tap shows live traffic to whoever may watch it, and
//! headers carry credentials. The query string is left out for the same reason (tokens ride in
//! it). Watchers are bounded three ways: at most [`MAX_WATCHERS`] at once, each with a maximum
//! rate (a token bucket) and an optional sampling fraction, and a full watcher's events are
//! dropped and counted, never queued without bound. With no watcher the request path pays one
//! atomic load.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

use crate::direction::Direction;

/// Watchers one proxy serves at once; the next is refused with 429.
pub(crate) const MAX_WATCHERS: usize = 8;
/// Events per second a watcher gets at most, unless it asks for fewer.
pub(crate) const DEFAULT_RATE: u32 = 100;
/// The highest rate a watcher may ask for.
pub(crate) const MAX_RATE: u32 = 1000;
/// Events buffered per watcher before new ones are dropped.
const QUEUE: usize = 256;

/// One request, as tap and the access log show it.
#[derive(Clone, Debug)]
pub(crate) struct Event<'a> {
    pub direction: Direction,
    pub method: &'a str,
    /// The request's authority (`:authority` or `Host`), as sent.
    pub authority: Option<&'a str>,
    /// The path without its query.
    pub path: &'a str,
    pub status: u16,
    pub grpc_status: Option<u8>,
    pub latency: Duration,
    pub response_bytes: u64,
    /// Inbound: the verified client; outbound: the identity the server proved.
    pub peer_identity: Option<&'a str>,
    /// The endpoint that answered (inbound: the app).
    pub endpoint: Option<SocketAddr>,
    pub finished: bool,
    pub content_type: Option<&'a str>,
    pub user_agent: Option<&'a str>,
}

/// Appends `s` as a JSON string.
fn json_str(out: &mut String, s: &str) {
    use std::fmt::Write;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_opt(out: &mut String, key: &str, v: Option<&str>) {
    out.push_str(",\"");
    out.push_str(key);
    out.push_str("\":");
    match v {
        Some(v) => json_str(out, v),
        None => out.push_str("null"),
    }
}

impl Event<'_> {
    /// One JSON object and a newline. Field names are a contract (tap, access log, `remora tap`).
    pub(crate) fn to_json(&self) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(256);
        let ts = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let _ = write!(out, "{{\"ts\":{ts:.6},\"direction\":");
        json_str(&mut out, self.direction.as_str());
        out.push_str(",\"method\":");
        json_str(&mut out, self.method);
        json_opt(&mut out, "authority", self.authority);
        out.push_str(",\"path\":");
        json_str(&mut out, self.path);
        let _ = write!(out, ",\"status\":{}", self.status);
        match self.grpc_status {
            Some(g) => {
                let _ = write!(out, ",\"grpc_status\":{g}");
            }
            None => out.push_str(",\"grpc_status\":null"),
        }
        let _ = write!(
            out,
            ",\"latency_ms\":{:.3},\"response_bytes\":{}",
            self.latency.as_secs_f64() * 1000.0,
            self.response_bytes
        );
        json_opt(&mut out, "peer_identity", self.peer_identity);
        let endpoint = self.endpoint.map(|e| e.to_string());
        json_opt(&mut out, "endpoint", endpoint.as_deref());
        let _ = write!(out, ",\"finished\":{}", self.finished);
        json_opt(&mut out, "content_type", self.content_type);
        json_opt(&mut out, "user_agent", self.user_agent);
        out.push_str("}\n");
        out
    }
}

/// Which requests a watcher wants; every field set must match.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Filter {
    pub direction: Option<Direction>,
    /// Exact, case-insensitive; a missing `:port` matches any port.
    pub authority: Option<String>,
    pub path_prefix: Option<String>,
    /// Exact, case-sensitive (methods are).
    pub method: Option<String>,
    /// The peer's SPIFFE ID, exact.
    pub identity: Option<String>,
}

impl Filter {
    pub(crate) fn matches(&self, e: &Event<'_>) -> bool {
        self.direction.is_none_or(|d| d == e.direction)
            && self
                .authority
                .as_deref()
                .is_none_or(|want| e.authority.is_some_and(|a| authority_matches(want, a)))
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| e.path.starts_with(p))
            && self.method.as_deref().is_none_or(|m| m == e.method)
            && self
                .identity
                .as_deref()
                .is_none_or(|id| e.peer_identity == Some(id))
    }
}

fn authority_matches(want: &str, got: &str) -> bool {
    if want.eq_ignore_ascii_case(got) {
        return true;
    }
    // `web` matches `web:8080`, not `web2:8080` or `web.other:80`.
    !want.contains(':')
        && got
            .rsplit_once(':')
            .is_some_and(|(host, _)| host.eq_ignore_ascii_case(want))
}

/// Why a watch was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WatchError {
    TooMany,
}

struct Watcher {
    filter: Filter,
    tx: mpsc::Sender<Bytes>,
    /// Keep one matching event in `1 / sample`; 1.0 keeps all.
    sample: f64,
    bucket: Bucket,
}

/// A token bucket: `rate` events per second, bursts up to one second's worth.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Self {
        Bucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The proxy's watchers.
#[derive(Default)]
pub(crate) struct Tap {
    active: AtomicUsize,
    watchers: Mutex<Vec<Watcher>>,
    /// Events not sent to a watcher: over its rate, or its queue full.
    dropped: Counter,
    watching: Gauge,
}

impl Tap {
    pub(crate) fn register(&self, r: &mut Registry) {
        r.register(
            "tap_watchers",
            "Tap watchers streaming from this proxy",
            self.watching.clone(),
        );
        r.register(
            "tap_dropped_events",
            "Matching requests not sent to a tap watcher (over its rate, or its queue full)",
            self.dropped.clone(),
        );
    }

    /// Whether anyone watches: the request path builds an event only then.
    pub(crate) fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed) > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Watcher>> {
        self.watchers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new watcher: its events arrive on the receiver, one JSON line each, until it is
    /// dropped.
    pub(crate) fn watch(
        &self,
        filter: Filter,
        rate: u32,
        sample: f64,
    ) -> Result<mpsc::Receiver<Bytes>, WatchError> {
        let mut w = self.lock();
        w.retain(|w| !w.tx.is_closed());
        if w.len() >= MAX_WATCHERS {
            self.set_active(w.len());
            return Err(WatchError::TooMany);
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        w.push(Watcher {
            filter,
            tx,
            sample: sample.clamp(0.0, 1.0),
            bucket: Bucket::new(rate.clamp(1, MAX_RATE)),
        });
        self.set_active(w.len());
        Ok(rx)
    }

    fn set_active(&self, n: usize) {
        self.active.store(n, Ordering::Relaxed);
        self.watching.set(n as i64);
    }

    /// Sends `e` to every watcher that wants it.
    pub(crate) fn publish(&self, e: &Event<'_>) {
        let mut line: Option<Bytes> = None;
        let now = Instant::now();
        let mut w = self.lock();
        let before = w.len();
        w.retain(|w| !w.tx.is_closed());
        for watcher in w.iter_mut() {
            if !watcher.filter.matches(e)
                || (watcher.sample < 1.0 && crate::random::unit_f64() >= watcher.sample)
            {
                continue;
            }
            if !watcher.bucket.take(now) {
                self.dropped.inc();
                continue;
            }
            let line = line.get_or_insert_with(|| Bytes::from(e.to_json())).clone();
            if watcher.tx.try_send(line).is_err() {
                self.dropped.inc();
            }
        }
        if w.len() != before {
            self.set_active(w.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event<'a>() -> Event<'a> {
        Event {
            direction: Direction::Outbound,
            method: "GET",
            authority: Some("web.prod:8080"),
            path: "/api/users",
            status: 200,
            grpc_status: None,
            latency: Duration::from_micros(1500),
            response_bytes: 128,
            peer_identity: Some("spiffe://td/ns/prod/sa/web"),
            endpoint: Some("10.0.0.7:8080".parse().unwrap()),
            finished: true,
            content_type: Some("text/plain"),
            user_agent: Some("curl/8 \"quoted\"\n"),
        }
    }

    #[test]
    fn filters() {
        let f = |filter: Filter| filter.matches(&event());
        let table = [
            (Filter::default(), true),
            (
                Filter {
                    direction: Some(Direction::Inbound),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    authority: Some("WEB.prod".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    authority: Some("web.prod:8080".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    authority: Some("web.prod:80".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    authority: Some("web".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    path_prefix: Some("/api/".into()),
                    method: Some("GET".into()),
                    identity: Some("spiffe://td/ns/prod/sa/web".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    path_prefix: Some("/admin".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    method: Some("get".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    identity: Some("spiffe://td/ns/prod/sa/other".into()),
                    ..Default::default()
                },
                false,
            ),
        ];
        for (filter, want) in table {
            assert_eq!(f(filter.clone()), want, "{filter:?}");
        }
    }

    #[test]
    fn json_lines_escape_what_clients_send() {
        let line = event().to_json();
        assert!(line.ends_with("}\n"));
        assert_eq!(line.matches('\n').count(), 1, "one line: {line}");
        assert!(
            line.contains(r#""user_agent":"curl/8 \"quoted\"\n""#),
            "{line}"
        );
        assert!(line.contains(r#""endpoint":"10.0.0.7:8080""#), "{line}");
        assert!(line.contains(r#""grpc_status":null"#), "{line}");
        assert!(line.contains(r#""latency_ms":1.500"#), "{line}");
    }

    #[tokio::test]
    async fn watchers_are_bounded_filtered_and_rate_limited() {
        let tap = Tap::default();
        assert!(!tap.active());
        let mut all = tap.watch(Filter::default(), 5, 1.0).unwrap();
        let mut inbound = tap
            .watch(
                Filter {
                    direction: Some(Direction::Inbound),
                    ..Default::default()
                },
                100,
                1.0,
            )
            .unwrap();
        assert!(tap.active());
        for _ in 0..20 {
            tap.publish(&event());
        }
        let mut got = 0;
        while all.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, 5, "the burst is one second at the watcher's rate");
        assert!(
            inbound.try_recv().is_err(),
            "the filter kept outbound events out"
        );
        assert_eq!(tap.dropped.get(), 15);
        let rest: Vec<_> = (0..MAX_WATCHERS - 2)
            .map(|_| tap.watch(Filter::default(), 10, 1.0).unwrap())
            .collect();
        assert_eq!(
            tap.watch(Filter::default(), 10, 1.0).unwrap_err(),
            WatchError::TooMany
        );
        drop(rest);
        drop(all);
        drop(inbound);
        tap.publish(&event());
        assert!(!tap.active(), "closed watchers are gone");
        assert!(tap.watch(Filter::default(), 10, 1.0).is_ok());
    }
}
